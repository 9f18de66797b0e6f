//! Block maps: which byte ranges of a sparse disk image carry data, each
//! with its sha256, so a writer fetches and writes only those and verifies
//! every one (the rest of the image is zeros). The file format is
//! bmaptool's ([`format`]): `bmaptool copy` uses our maps, and `appliance
//! flash` uses maps made by `bmaptool create`.
//!
//! A map this appliance makes is a pure function of the image's bytes and
//! the chunk size: ranges come from a fixed grid of `chunk_size` cells; a
//! cell that holds a non-zero byte gives one range, trimmed to its first
//! and last non-zero 4 KiB block. `SEEK_DATA`/`SEEK_HOLE` only spare us
//! reading holes, so the same image gives the same map bytes however it is
//! allocated.
//!
//! The writer holds a range in memory to check it before writing it, so it
//! takes ranges of at most [`MAX_RANGE`] bytes with a sha256 each. A map
//! from elsewhere whose ranges are longer, carry another hash (sha1 from
//! old bmaptool) or none is usable only with its image at hand
//! ([`Bmap::parse_for_image`]): such ranges are read from the image,
//! checked against the map's checksum, and cut into chunks with their
//! sha256.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod format;
pub mod xml;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK: u64 = 4 << 20;
/// Range alignment (and the smallest chunk size).
pub const BLOCK: u64 = 4096;
/// The longest range the writer takes (and the largest chunk size).
pub const MAX_RANGE: u64 = 64 << 20;

/// A block map (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    /// Size of the whole image in bytes.
    pub image_size: u64,
    /// sha256 of the whole image, holes read as zeros (`sha256:<hex>`);
    /// known for maps this appliance made (`<DiskDigest>` in the file).
    pub disk_digest: Option<String>,
    /// Data-bearing ranges: sorted, disjoint, at most [`MAX_RANGE`] long.
    pub ranges: Vec<Range>,
}

/// One data-bearing range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
    /// sha256 of the range's bytes (`sha256:<hex>`).
    pub digest: String,
}

impl Range {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl Bmap {
    /// Maps the image at `path` with cells of `chunk_size` bytes (a
    /// multiple of 4096 up to [`MAX_RANGE`]). Reads only the data regions
    /// the filesystem reports.
    pub fn from_file(path: &Path, chunk_size: u64) -> Result<Bmap> {
        Bmap::map_file(path, chunk_size, None)
    }

    /// Like [`Bmap::from_file`], but takes the whole image's digest from
    /// the caller, who has just computed it (the rebuild does), instead of
    /// hashing every hole again: on a slow CPU the zeros cost more than the
    /// data.
    pub fn from_file_with_digest(path: &Path, chunk_size: u64, disk_digest: &str) -> Result<Bmap> {
        check_digest(disk_digest).context("the given disk digest")?;
        Bmap::map_file(path, chunk_size, Some(disk_digest))
    }

    fn map_file(path: &Path, chunk_size: u64, known: Option<&str>) -> Result<Bmap> {
        if chunk_size == 0 || chunk_size % BLOCK != 0 || chunk_size > MAX_RANGE {
            bail!(
                "chunk size {chunk_size} is not a positive multiple of {BLOCK} up to {MAX_RANGE}"
            );
        }
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading metadata of {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let size = meta.len();
        let extents =
            data_extents(&file, size).with_context(|| format!("mapping {}", path.display()))?;
        let mut ranges = Vec::new();
        let mut whole = Sha256::new();
        let mut hashed = 0u64; // `whole` covers [0, hashed)
        let zeros = vec![0u8; chunk_size as usize];
        let mut buf = vec![0u8; chunk_size as usize];
        // Cells touched by data, in order, each once.
        let mut last_cell: Option<u64> = None;
        for (start, end) in extents {
            let mut cell = start / chunk_size;
            while cell * chunk_size < end {
                if last_cell.is_some_and(|c| c >= cell) {
                    cell += 1;
                    continue;
                }
                last_cell = Some(cell);
                let off = cell * chunk_size;
                let len = chunk_size.min(size - off);
                let b = &mut buf[..len as usize];
                file.read_exact_at(b, off)
                    .with_context(|| format!("reading {} at {off}", path.display()))?;
                if known.is_none() {
                    // The zeros before this cell.
                    feed_zeros(&mut whole, &zeros, off - hashed);
                    whole.update(&*b);
                    hashed = off + len;
                }
                if let Some((a, z)) = nonzero_span(b) {
                    let data = &b[a..z];
                    ranges.push(Range {
                        offset: off + a as u64,
                        length: data.len() as u64,
                        digest: digest_of(data),
                    });
                }
                cell += 1;
            }
        }
        let disk_digest = match known {
            Some(d) => d.to_owned(),
            None => {
                feed_zeros(&mut whole, &zeros, size - hashed);
                format!("sha256:{}", hex::encode(whole.finalize()))
            }
        };
        Ok(Bmap {
            image_size: size,
            disk_digest: Some(disk_digest),
            ranges,
        })
    }

    /// `<image>.bmap` when it exists (read with [`Bmap::parse_for_image`]),
    /// else a map computed now.
    pub fn for_image(image: &Path) -> Result<Bmap> {
        let side = sidecar_path(image);
        match std::fs::read(&side) {
            Ok(bytes) => Bmap::parse_for_image(&bytes, image)
                .with_context(|| format!("reading {}", side.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Bmap::from_file(image, DEFAULT_CHUNK),
            Err(e) => Err(e).with_context(|| format!("reading {}", side.display())),
        }
    }

    /// Parses a block map file whose ranges the writer takes as they are:
    /// every range with a sha256 and at most [`MAX_RANGE`] long (what this
    /// appliance writes, and what it fetches from another one). Other maps
    /// are refused, saying why; see [`Bmap::parse_for_image`].
    pub fn parse(bytes: &[u8]) -> Result<Bmap> {
        let m = format::read(bytes).context("reading the block map")?;
        Bmap::from_map(&m, None, MAX_RANGE, DEFAULT_CHUNK)
    }

    /// Parses any block map bmaptool reads, for the local image (file or
    /// block device) at `image`, which must have the map's size (a block
    /// device may be larger). Ranges the writer cannot take as they are
    /// (longer than [`MAX_RANGE`], another hash than sha256, or none) are
    /// read from the image now, checked against the map's checksum when
    /// it has one, and cut at the [`DEFAULT_CHUNK`] grid into ranges with
    /// their sha256.
    pub fn parse_for_image(bytes: &[u8], image: &Path) -> Result<Bmap> {
        let m = format::read(bytes).context("reading the block map")?;
        let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let size = crate::blkdev::size_of(&file)
            .with_context(|| format!("reading the size of {}", image.display()))?;
        let block = file.metadata().map(|m| !m.is_file()).unwrap_or(false);
        if size < m.image_size || (!block && size != m.image_size) {
            bail!(
                "the block map is for a {}-byte image, but {} has {size} bytes",
                m.image_size,
                image.display()
            );
        }
        Bmap::from_map(&m, Some((&file, image)), MAX_RANGE, DEFAULT_CHUNK)
    }

    /// The writer's map of `m`: ranges with a sha256 and at most
    /// `max_range` long as they are, the others read from `image` (if
    /// given), checked, and cut at the `chunk` grid.
    fn from_map(
        m: &format::MapFile,
        image: Option<(&File, &Path)>,
        max_range: u64,
        chunk: u64,
    ) -> Result<Bmap> {
        let mut ranges = Vec::with_capacity(m.ranges.len());
        let mut read_bytes = 0u64;
        for (i, r) in m.ranges.iter().enumerate() {
            let (a, z) = m.span(r);
            let what = || format!("range {i} (blocks {}-{}, {} bytes)", r.first, r.last, z - a);
            let unfit = match (&r.chksum, m.checksum) {
                (None, _) => Some("has no checksum".to_owned()),
                (Some(_), Some(k)) if k != format::Kind::Sha256 => {
                    Some(format!("has a {} checksum, not sha256", k.name()))
                }
                _ if z - a > max_range => Some(format!(
                    "is longer than the {} MiB the writer checks at once",
                    max_range >> 20
                )),
                _ => None,
            };
            let Some(why) = unfit else {
                ranges.push(Range {
                    offset: a,
                    length: z - a,
                    digest: format!("sha256:{}", r.chksum.as_deref().unwrap_or_default()),
                });
                continue;
            };
            let Some((file, path)) = image else {
                bail!(
                    "block map {} {why}; a map like this is only usable with its image at hand \
                     (appliance flash --image IMAGE --bmap MAP)",
                    what()
                );
            };
            // Read it, checking the map's checksum over the whole range
            // and taking a sha256 per chunk.
            let mut whole = m.checksum.map(format::Kind::hasher);
            let mut pos = a;
            while pos < z {
                let end = z.min((pos / chunk + 1) * chunk);
                let mut buf = vec![0u8; (end - pos) as usize];
                file.read_exact_at(&mut buf, pos)
                    .with_context(|| format!("reading {} at {pos}", path.display()))?;
                if let Some(h) = whole.as_mut() {
                    h.update(&buf);
                }
                ranges.push(Range {
                    offset: pos,
                    length: end - pos,
                    digest: digest_of(&buf),
                });
                pos = end;
            }
            read_bytes += z - a;
            if let (Some(want), Some(h)) = (&r.chksum, whole) {
                let got = hex::encode(h.finalize());
                if &got != want {
                    bail!(
                        "{} of {} does not match the block map: {} {got}, the map says {want}",
                        what(),
                        path.display(),
                        m.checksum.map_or("", format::Kind::name)
                    );
                }
            }
        }
        if read_bytes > 0 {
            let note = match m.checksum {
                Some(k) if m.ranges.iter().all(|r| r.chksum.is_some()) => {
                    format!("checked against the map's {}", k.name())
                }
                _ => "the map has no checksums for some: those are trusted as read now".into(),
            };
            tracing::info!(
                bytes = read_bytes,
                "read ranges of the image to cut them into chunks ({note})"
            );
        }
        let b = Bmap {
            image_size: m.image_size,
            disk_digest: m.disk_digest.clone(),
            ranges,
        };
        b.check()?;
        Ok(b)
    }

    /// Checks what the writer relies on: digests well-formed, ranges
    /// sorted, disjoint, non-empty, within the image, at most
    /// [`MAX_RANGE`] long.
    pub fn check(&self) -> Result<()> {
        if let Some(d) = &self.disk_digest {
            check_digest(d).context("block map disk digest")?;
        }
        let mut prev_end = 0u64;
        for (i, r) in self.ranges.iter().enumerate() {
            let bad = |why: &str| anyhow!("block map range {i} (offset {}): {why}", r.offset);
            check_digest(&r.digest).map_err(|e| bad(&e.to_string()))?;
            if r.length == 0 {
                return Err(bad("empty"));
            }
            if r.length > MAX_RANGE {
                return Err(bad("longer than the writer takes"));
            }
            if r.offset < prev_end {
                return Err(bad("overlaps or precedes the previous range"));
            }
            let end = r
                .offset
                .checked_add(r.length)
                .ok_or_else(|| bad("overflows"))?;
            if end > self.image_size {
                return Err(bad("ends beyond the image"));
            }
            prev_end = end;
        }
        Ok(())
    }

    /// The map file: bmaptool's XML, version 2.0, sha256 per range, with
    /// the disk digest (see [`format::write`]). Deterministic.
    pub fn to_bytes(&self) -> Vec<u8> {
        format::write(self)
    }

    /// Bytes of data the map names.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }
}

/// `<image>.bmap` (where bmaptool looks too).
pub fn sidecar_path(image: &Path) -> std::path::PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".bmap");
    s.into()
}

fn check_digest(d: &str) -> Result<()> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| anyhow::anyhow!("digest {d:?} does not start with sha256:"))?;
    if hex.len() != 64 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        bail!("digest {d:?} is not 64 lowercase hex digits");
    }
    Ok(())
}

fn feed_zeros(h: &mut Sha256, zeros: &[u8], mut n: u64) {
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        h.update(&zeros[..k]);
        n -= k as u64;
    }
}

/// The span `[a, z)` from the first to the end of the last 4 KiB block of
/// `b` holding a non-zero byte (z clamped to `b.len()`).
fn nonzero_span(b: &[u8]) -> Option<(usize, usize)> {
    let bs = BLOCK as usize;
    let nonzero = |i: usize| {
        b[i * bs..((i + 1) * bs).min(b.len())]
            .iter()
            .any(|&x| x != 0)
    };
    let blocks = b.len().div_ceil(bs);
    let first = (0..blocks).find(|&i| nonzero(i))?;
    let last = (first..blocks).rev().find(|&i| nonzero(i))?;
    Some((first * bs, ((last + 1) * bs).min(b.len())))
}

/// The data regions of `file` as `(start, end)` pairs, from `SEEK_DATA` and
/// `SEEK_HOLE`. A filesystem without them reports one region: the file.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) if pos == 0 => {
                out.push((0, size));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
