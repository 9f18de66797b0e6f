//! Block maps (`appliance.bmap.v1`): which byte ranges of a sparse disk
//! image carry data, each with its sha256, so a writer fetches and writes
//! only those and verifies every one (the rest of the image is zeros).
//!
//! A map is a pure function of the image's bytes and the chunk size:
//! ranges come from a fixed grid of `chunk_size` cells; a cell that holds a
//! non-zero byte gives one range, trimmed to its first and last non-zero
//! 4 KiB block. `SEEK_DATA`/`SEEK_HOLE` only spare us reading holes, so
//! the same image gives the same map bytes however it is allocated.
//!
//! ```json
//! {"schema":"appliance.bmap.v1","image_size":4294967296,
//!  "disk_digest":"sha256:…","chunk_size":4194304,
//!  "ranges":[{"offset":0,"length":20480,"digest":"sha256:…"}]}
//! ```

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The schema string of this format.
pub const SCHEMA: &str = "appliance.bmap.v1";
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK: u64 = 4 << 20;
/// Range alignment (and the smallest chunk size).
pub const BLOCK: u64 = 4096;
/// Largest chunk size: a writer holds one range (at most one chunk) in
/// memory, so a map from elsewhere may not ask for more.
pub const MAX_CHUNK: u64 = 256 << 20;

/// A block map (see the module doc). Field order is the JSON order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bmap {
    pub schema: String,
    /// Size of the whole image in bytes.
    pub image_size: u64,
    /// sha256 of the whole image, holes read as zeros (`sha256:<hex>`).
    pub disk_digest: String,
    /// Largest range length; ranges never cross a multiple of it.
    pub chunk_size: u64,
    /// Data-bearing ranges, sorted, disjoint.
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
    /// multiple of 4096). Reads only the data regions the filesystem
    /// reports.
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
        if chunk_size == 0 || chunk_size % BLOCK != 0 || chunk_size > MAX_CHUNK {
            bail!("chunk size {chunk_size} is not a multiple of {BLOCK} between {BLOCK} and {MAX_CHUNK}");
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
            schema: SCHEMA.into(),
            image_size: size,
            disk_digest,
            chunk_size,
            ranges,
        })
    }

    /// `<image>.bmap` when it exists (and parses, and matches the image's
    /// size), else a map computed now.
    pub fn for_image(image: &Path) -> Result<Bmap> {
        let side = sidecar_path(image);
        let size = std::fs::metadata(image)
            .with_context(|| format!("reading metadata of {}", image.display()))?
            .len();
        match std::fs::read(&side) {
            Ok(bytes) => {
                let b =
                    Bmap::parse(&bytes).with_context(|| format!("reading {}", side.display()))?;
                if b.image_size != size {
                    bail!(
                        "{} maps a {}-byte image but {} has {size} bytes",
                        side.display(),
                        b.image_size,
                        image.display()
                    );
                }
                Ok(b)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Bmap::from_file(image, DEFAULT_CHUNK),
            Err(e) => Err(e).with_context(|| format!("reading {}", side.display())),
        }
    }

    /// Parses and checks a map: schema, digest syntax, ranges sorted,
    /// disjoint, aligned, non-empty, within the image and within one cell.
    pub fn parse(bytes: &[u8]) -> Result<Bmap> {
        let b: Bmap = serde_json::from_slice(bytes).context("parsing the block map JSON")?;
        b.check()?;
        Ok(b)
    }

    fn check(&self) -> Result<()> {
        if self.schema != SCHEMA {
            bail!("block map schema is {:?}, expected {SCHEMA:?}", self.schema);
        }
        if self.chunk_size == 0 || self.chunk_size % BLOCK != 0 || self.chunk_size > MAX_CHUNK {
            bail!(
                "block map chunk_size {} is not a multiple of {BLOCK} between {BLOCK} and {MAX_CHUNK}",
                self.chunk_size
            );
        }
        check_digest(&self.disk_digest).context("block map disk_digest")?;
        let mut prev_end = 0u64;
        for (i, r) in self.ranges.iter().enumerate() {
            let bad =
                |why: &str| anyhow::anyhow!("block map range {i} (offset {}): {why}", r.offset);
            check_digest(&r.digest).map_err(|e| bad(&e.to_string()))?;
            if r.length == 0 {
                return Err(bad("empty"));
            }
            if r.offset % BLOCK != 0 {
                return Err(bad("offset is not 4096-aligned"));
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
            if r.offset / self.chunk_size != (end - 1) / self.chunk_size {
                return Err(bad("crosses a chunk boundary"));
            }
            prev_end = end;
        }
        Ok(())
    }

    /// The map's bytes: compact JSON plus a newline (stable: fixed field
    /// order, ranges sorted).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("a block map serialises");
        v.push(b'\n');
        v
    }

    /// Bytes of data the map names.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }
}

/// `<image>.bmap`.
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
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `size` bytes with `writes` at their offsets.
    pub(crate) fn sparse(
        dir: &Path,
        name: &str,
        size: u64,
        writes: &[(u64, &[u8])],
    ) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in writes {
            f.write_all_at(data, *off).unwrap();
        }
        p
    }

    #[test]
    fn maps_data_cells_trimmed_to_nonzero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(
            dir.path(),
            "a.img",
            64 * MIB,
            &[
                (512, b"mbr"),
                (5 * MIB + 10, b"x"),
                (8 * MIB - 1, b"y"),
                (8 * MIB, b"z"),
            ],
        );
        let b = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
        let spans: Vec<_> = b.ranges.iter().map(|r| (r.offset, r.length)).collect();
        assert_eq!(
            spans,
            vec![(0, 4096), (5 * MIB, 3 * MIB), (8 * MIB, 4096)],
            "{b:?}"
        );
        let whole = std::fs::read(&p).unwrap();
        assert_eq!(b.disk_digest, digest_of(&whole));
        for r in &b.ranges {
            assert_eq!(
                r.digest,
                digest_of(&whole[r.offset as usize..r.end() as usize])
            );
        }
        assert_eq!(Bmap::parse(&b.to_bytes()).unwrap(), b);
    }

    #[test]
    fn a_known_digest_gives_the_same_map_without_rehashing() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(
            dir.path(),
            "k.img",
            16 * MIB,
            &[(4096, b"a"), (9 * MIB, b"b")],
        );
        let full = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
        let known = Bmap::from_file_with_digest(&p, DEFAULT_CHUNK, &full.disk_digest).unwrap();
        assert_eq!(known, full);
        assert!(Bmap::from_file_with_digest(&p, DEFAULT_CHUNK, "md5:00").is_err());
    }

    #[test]
    fn same_content_same_bytes_however_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let a = sparse(dir.path(), "a.img", 16 * MIB, &[(MIB, b"data")]);
        // The same content, fully allocated.
        let full = dir.path().join("b.img");
        let mut f = File::create(&full).unwrap();
        f.write_all(&std::fs::read(&a).unwrap()).unwrap();
        drop(f);
        let ba = Bmap::from_file(&a, DEFAULT_CHUNK).unwrap();
        let bb = Bmap::from_file(&full, DEFAULT_CHUNK).unwrap();
        assert_eq!(ba.to_bytes(), bb.to_bytes());
        assert_eq!(ba.ranges.len(), 1);
        // An odd-sized tail still maps.
        let t = sparse(
            dir.path(),
            "t.img",
            3 * BLOCK + 100,
            &[(3 * BLOCK + 99, b"e")],
        );
        let bt = Bmap::from_file(&t, BLOCK).unwrap();
        assert_eq!(bt.ranges.len(), 1);
        assert_eq!((bt.ranges[0].offset, bt.ranges[0].length), (3 * BLOCK, 100));
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(dir.path(), "a.img", 16 * MIB, &[(0, b"x"), (5 * MIB, b"y")]);
        let good = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
        type Mutation = Box<dyn Fn(&mut Bmap)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|b| b.schema = "x".into()), "schema"),
            (Box::new(|b| b.ranges[1].offset = 0), "overlaps"),
            (Box::new(|b| b.ranges[0].offset = 1), "aligned"),
            (
                Box::new(|b| b.ranges[1].length = 16 * MIB),
                "beyond the image",
            ),
            (
                Box::new(|b| b.ranges[1].length = 4 * MIB),
                "crosses a chunk",
            ),
            (Box::new(|b| b.ranges[0].digest = "md5:x".into()), "sha256:"),
            (Box::new(|b| b.chunk_size = 1000), "chunk_size"),
            // A map from elsewhere may not make a writer hold 1 TiB.
            (
                Box::new(|b| {
                    b.chunk_size = 1 << 40;
                    b.image_size = 1 << 41;
                    b.ranges = vec![Range {
                        offset: 0,
                        length: 1 << 40,
                        digest: b.disk_digest.clone(),
                    }];
                }),
                "between 4096 and",
            ),
        ];
        for (mutate, want) in cases {
            let mut b = good.clone();
            mutate(&mut b);
            let e = format!("{:#}", Bmap::parse(&b.to_bytes()).unwrap_err());
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(Bmap::from_file(&p, 1000).is_err());
    }

    #[test]
    fn sidecar_wins_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(dir.path(), "a.img", 8 * MIB, &[(0, b"x")]);
        let computed = Bmap::for_image(&p).unwrap();
        let mut other = computed.clone();
        other.chunk_size = BLOCK;
        std::fs::write(sidecar_path(&p), other.to_bytes()).unwrap();
        assert_eq!(Bmap::for_image(&p).unwrap(), other);
        other.image_size = 1 << 30;
        std::fs::write(sidecar_path(&p), other.to_bytes()).unwrap();
        assert!(Bmap::for_image(&p).is_err());
    }

    /// Thousands of mutated maps: each parses or is refused, none panics,
    /// and whatever parses can be summed without overflow.
    #[test]
    fn mutated_maps_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(dir.path(), "a.img", 16 * MIB, &[(0, b"x"), (5 * MIB, b"y")]);
        let good = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap().to_bytes();
        let mut rng = crate::mutate::Rng::new(0x5eed_b3a9);
        for _ in 0..3000 {
            if let Ok(b) = Bmap::parse(&rng.mutate(&good)) {
                let _ = b.mapped_bytes();
            }
        }
    }
}
