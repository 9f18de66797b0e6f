//! bmaptool's block map file (what `bmaptool create` writes and `bmaptool
//! copy` reads): reading every version bmaptool 3.x reads, writing
//! version 2.0 with sha256.
//!
//! Versions: 1.0 to 1.2 carry no checksums; 1.3 has sha1 (`sha1=` on each
//! range, `BmapFileSHA1`); 1.4 (a misnumbered 2.0) and 2.x name the hash
//! in `ChecksumType` (`chksum=`, `BmapFileChecksum`). The file checksum is
//! the hash of the file's bytes with the first occurrence of its own value
//! replaced by as many ASCII zeros. Block numbers are inclusive; the last
//! block may be cut short by the end of the image, and a range's checksum
//! covers only the image's bytes.

use anyhow::{anyhow, bail, Context, Result};
use sha2::digest::DynDigest;

use super::{check_digest, xml, Bmap, BLOCK};

/// Largest map file read (a map of a badly fragmented multi-terabyte
/// image is still far smaller).
pub const MAX_FILE: usize = 64 << 20;

/// The element the appliance adds (bmaptool ignores elements it does not
/// know): the sha256 of the whole image, holes as zeros.
pub const DISK_DIGEST: &str = "DiskDigest";

/// A hash bmaptool may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Sha1,
        Kind::Sha224,
        Kind::Sha256,
        Kind::Sha384,
        Kind::Sha512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sha1 => "sha1",
            Kind::Sha224 => "sha224",
            Kind::Sha256 => "sha256",
            Kind::Sha384 => "sha384",
            Kind::Sha512 => "sha512",
        }
    }

    fn from_name(n: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == n)
    }

    pub fn hasher(self) -> Box<dyn DynDigest> {
        use sha2::Digest as _;
        match self {
            Kind::Sha1 => Box::new(sha1::Sha1::new()),
            Kind::Sha224 => Box::new(sha2::Sha224::new()),
            Kind::Sha256 => Box::new(sha2::Sha256::new()),
            Kind::Sha384 => Box::new(sha2::Sha384::new()),
            Kind::Sha512 => Box::new(sha2::Sha512::new()),
        }
    }

    /// Length of a hex digest.
    pub fn hex_len(self) -> usize {
        self.hasher().output_size() * 2
    }

    fn check_hex(self, v: &str) -> Result<()> {
        if v.len() != self.hex_len() || !v.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            bail!(
                "{v:?} is not a {} checksum ({} lowercase hex digits)",
                self.name(),
                self.hex_len()
            );
        }
        Ok(())
    }
}

/// A parsed, checked map file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFile {
    pub version: (u64, u64),
    pub image_size: u64,
    pub block_size: u64,
    /// None for versions before 1.3.
    pub checksum: Option<Kind>,
    /// The appliance's `DiskDigest`, when present.
    pub disk_digest: Option<String>,
    /// Sorted, disjoint, inside the image.
    pub ranges: Vec<FileRange>,
}

/// One `<Range>`: blocks `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    pub first: u64,
    pub last: u64,
    /// Hex digest of the range's bytes, when the map has one.
    pub chksum: Option<String>,
}

impl MapFile {
    /// The byte span `[start, end)` of range `r` (the image's end cuts the
    /// last block short).
    pub fn span(&self, r: &FileRange) -> (u64, u64) {
        // `last < BlocksCount` (checked), so neither overflows in u128 and
        // both fit u64 once clamped to the image size.
        let a = u128::from(r.first) * u128::from(self.block_size);
        let z = (u128::from(r.last) + 1) * u128::from(self.block_size);
        let size = u128::from(self.image_size);
        (a.min(size) as u64, z.min(size) as u64)
    }
}

fn one<'a>(root: &'a xml::Element, name: &'a str) -> Result<&'a xml::Element> {
    let mut it = root.children_named(name);
    let first = it.next().ok_or_else(|| anyhow!("<{name}> is missing"))?;
    if it.next().is_some() {
        bail!("<{name}> appears more than once");
    }
    Ok(first)
}

fn number(root: &xml::Element, name: &str) -> Result<u64> {
    let t = one(root, name)?.text.trim();
    t.parse::<u64>()
        .map_err(|_| anyhow!("<{name}> is {t:?}, not a whole number"))
}

/// Parses and checks a map file: the XML, the version, the sizes, the
/// file checksum, and ranges sorted, disjoint and inside the image, their
/// blocks adding up to `MappedBlocksCount`.
pub fn read(bytes: &[u8]) -> Result<MapFile> {
    if bytes.len() > MAX_FILE {
        bail!(
            "the block map is {} bytes, more than the {} MiB accepted",
            bytes.len(),
            MAX_FILE >> 20
        );
    }
    if bytes.trim_ascii_start().starts_with(b"{") {
        bail!(
            "this is a JSON block map (the appliance's old appliance.bmap.v1 format); \
             block maps are bmaptool's XML now: make one with `appliance bmap IMAGE -o IMAGE.bmap`"
        );
    }
    let root = xml::parse(bytes).context("the block map is not well-formed XML")?;
    if root.name != "bmap" {
        bail!(
            "not a bmaptool block map: the root element is <{}>, not <bmap>",
            root.name
        );
    }
    let v = root
        .attr("version")
        .ok_or_else(|| anyhow!("<bmap> has no version attribute"))?;
    let version = v
        .split_once('.')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .ok_or_else(|| anyhow!("bmap version {v:?} is not MAJOR.MINOR"))?;
    // Which hash, in which file field and range attribute.
    let (file_field, range_attr) = match version {
        (2, _) | (1, 4) => ("BmapFileChecksum", "chksum"),
        (1, 3) => ("BmapFileSHA1", "sha1"),
        (1, 0..=2) => ("", ""),
        _ => bail!("bmap format version {v} is not supported (1.0 to 2.x are)"),
    };
    let block_size = number(&root, "BlockSize")?;
    let blocks_count = number(&root, "BlocksCount")?;
    let mapped_count = number(&root, "MappedBlocksCount")?;
    let image_size = number(&root, "ImageSize")?;
    if block_size == 0 {
        bail!("<BlockSize> is 0");
    }
    if image_size == 0 {
        bail!("<ImageSize> is 0: an empty image");
    }
    if blocks_count != image_size.div_ceil(block_size) {
        bail!(
            "<BlocksCount> is {blocks_count}, but a {image_size}-byte image has {} blocks of {block_size} bytes",
            image_size.div_ceil(block_size)
        );
    }
    let checksum = match file_field {
        "" => None,
        "BmapFileSHA1" => Some(Kind::Sha1),
        _ => {
            let t = one(&root, "ChecksumType")?.text.trim();
            Some(Kind::from_name(t).ok_or_else(|| {
                anyhow!(
                    "checksum type {t:?} is not supported ({} are)",
                    Kind::ALL.map(Kind::name).join(", ")
                )
            })?)
        }
    };
    if let Some(kind) = checksum {
        let want = one(&root, file_field)?.text.trim();
        kind.check_hex(want)
            .with_context(|| format!("<{file_field}>"))?;
        // As bmaptool does: the first occurrence of the value, zeroed.
        let at = bytes
            .windows(want.len())
            .position(|w| w == want.as_bytes())
            .ok_or_else(|| anyhow!("<{file_field}> is not written out plainly in the file"))?;
        let mut h = kind.hasher();
        h.update(&bytes[..at]);
        h.update(&vec![b'0'; want.len()]);
        h.update(&bytes[at + want.len()..]);
        let got = hex::encode(h.finalize());
        if got != want {
            bail!(
                "the block map's own {} is {got}, but <{file_field}> says {want}: \
                 the file is damaged or was edited",
                kind.name()
            );
        }
    }
    let disk_digest = match root.children_named(DISK_DIGEST).count() {
        0 => None,
        _ => {
            let d = one(&root, DISK_DIGEST)?.text.trim().to_owned();
            check_digest(&d).with_context(|| format!("<{DISK_DIGEST}>"))?;
            Some(d)
        }
    };
    let map = one(&root, "BlockMap")?;
    let mut ranges: Vec<FileRange> = Vec::new();
    let mut mapped: u128 = 0;
    for el in map.children_named("Range") {
        let t = el.text.trim();
        let bad = |why: String| anyhow!("<Range> {t:?} on line {}: {why}", el.line);
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| bad("not FIRST-LAST or a block number".into()))
        };
        let (first, last) = match t.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(t)?, num(t)?),
        };
        if first > last {
            return Err(bad("its first block comes after its last".into()));
        }
        if last >= blocks_count {
            return Err(bad(format!(
                "ends beyond the image's {blocks_count} blocks"
            )));
        }
        if ranges.last().is_some_and(|p| first <= p.last) {
            return Err(bad("overlaps or comes before the previous range".into()));
        }
        let chksum = match (checksum, el.attr(range_attr)) {
            (Some(kind), Some(c)) => {
                kind.check_hex(c).map_err(|e| bad(e.to_string()))?;
                Some(c.to_owned())
            }
            _ => None,
        };
        mapped += u128::from(last - first) + 1;
        ranges.push(FileRange {
            first,
            last,
            chksum,
        });
    }
    if mapped != u128::from(mapped_count) {
        bail!("<MappedBlocksCount> is {mapped_count}, but the ranges hold {mapped} blocks");
    }
    Ok(MapFile {
        version,
        image_size,
        block_size,
        checksum,
        disk_digest,
        ranges,
    })
}

/// The largest power of two up to 4096 that every range's start and
/// length are multiples of (a length running to the image's end may stop
/// short).
fn block_size_of(b: &Bmap) -> u64 {
    let mut bs = BLOCK;
    for r in &b.ranges {
        while bs > 1 && (r.offset % bs != 0 || (r.end() != b.image_size && r.length % bs != 0)) {
            bs /= 2;
        }
    }
    bs
}

/// `b` as a version 2.0 map with sha256 per range and the appliance's
/// `DiskDigest` (when known). Deterministic. `b` must pass [`Bmap::check`].
pub fn write(b: &Bmap) -> Vec<u8> {
    use std::fmt::Write as _;
    let bs = block_size_of(b);
    let blocks = b.image_size.div_ceil(bs);
    let mapped: u64 = b.ranges.iter().map(|r| r.length.div_ceil(bs)).sum();
    let mut s = String::with_capacity(512 + b.ranges.len() * 100);
    s.push_str("<?xml version=\"1.0\" ?>\n");
    s.push_str(
        "<!-- A block map in bmaptool's format: the blocks listed under BlockMap hold\n     \
         the image's data, all others read as zeros. `bmaptool copy` and\n     \
         `appliance flash` write only the listed blocks and check each range\n     \
         against its sha256 (chksum). BmapFileChecksum is the sha256 of this file\n     \
         with that value written as zeros. Written by `appliance bmap`. -->\n",
    );
    s.push_str("<bmap version=\"2.0\">\n");
    let _ = writeln!(
        s,
        "    <!-- {} bytes, {} MiB; {} MiB of data -->",
        b.image_size,
        b.image_size >> 20,
        b.mapped_bytes().div_ceil(1 << 20)
    );
    let _ = writeln!(s, "    <ImageSize> {} </ImageSize>", b.image_size);
    let _ = writeln!(s, "    <BlockSize> {bs} </BlockSize>");
    let _ = writeln!(s, "    <BlocksCount> {blocks} </BlocksCount>");
    let _ = writeln!(s, "    <MappedBlocksCount> {mapped} </MappedBlocksCount>");
    s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
    s.push_str("    <BmapFileChecksum> ");
    let at = s.len();
    s.push_str(&"0".repeat(64));
    s.push_str(" </BmapFileChecksum>\n");
    if let Some(d) = &b.disk_digest {
        s.push_str(
            "    <!-- The appliance's addition, which bmaptool ignores: the sha256 of\n         \
             the whole image, holes read as zeros. -->\n",
        );
        let _ = writeln!(s, "    <{DISK_DIGEST}> {d} </{DISK_DIGEST}>");
    }
    s.push_str("    <BlockMap>\n");
    for r in &b.ranges {
        let first = r.offset / bs;
        let last = (r.end() - 1) / bs;
        let hex = r.digest.strip_prefix("sha256:").unwrap_or(&r.digest);
        if first == last {
            let _ = writeln!(s, "        <Range chksum=\"{hex}\"> {first} </Range>");
        } else {
            let _ = writeln!(
                s,
                "        <Range chksum=\"{hex}\"> {first}-{last} </Range>"
            );
        }
    }
    s.push_str("    </BlockMap>\n</bmap>\n");
    let mut out = s.into_bytes();
    let sum = super::digest_of(&out);
    out[at..at + 64].copy_from_slice(&sum.as_bytes()["sha256:".len()..]);
    out
}
