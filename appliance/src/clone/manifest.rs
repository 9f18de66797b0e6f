//! The capture manifest (`appliance.capture.v1`): what a disk held,
//! partition by partition, and the chunks that rebuild it. Compact JSON,
//! fields in declaration order, one trailing newline; no clock, no host
//! names: the same disk gives the same bytes (blob digests depend on the
//! zstd version, raw digests only on the disk).
//!
//! ```json
//! {"schema":"appliance.capture.v1","disk_size":8589934592,"table":"gpt",
//!  "chunk_size":1048576,
//!  "partitions":[{"number":1,"offset":1048576,"size":134217728,
//!    "type":"C12A7328-…","name":"esp","fs":"fat32","fs_id":"ABCD-1234",
//!    "used_bytes":5242880}],
//!  "chunks":[{"offset":0,"length":20480,"digest":"sha256:…",
//!    "blob":"sha256:…","stored":1234}]}
//! ```
//! Regions outside every partition (the tables, gaps) are captured as
//! `raw` data, like a partition whose filesystem is unknown: only their
//! non-zero 4 KiB blocks are chunks, and a deploy zeroes the rest.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::ptable::TableKind;
use super::store::hex_of;

pub const SCHEMA: &str = "appliance.capture.v1";
/// Largest `chunk_size`: chunks are read, compressed and uploaded whole
/// (the server refuses a chunk of more than 64 MiB).
pub const MAX_CHUNK: u64 = 64 << 20;

/// A partition's filesystem as the capture saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    /// Only the header page is kept (label, UUID); contents are not.
    Swap,
    /// Unknown: non-zero blocks are kept, zero runs skipped.
    Raw,
}

impl Fs {
    /// Whether bytes between this partition's chunks must read as zeros
    /// on the target (only raw data; a filesystem ignores its free space).
    pub fn holes_matter(self) -> bool {
        self == Fs::Raw
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Slot in the table (1-based; 0 for a disk without a table).
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// GPT type GUID, `0xNN` for MBR, empty without a table.
    #[serde(rename = "type")]
    pub type_id: String,
    pub name: String,
    pub fs: Fs,
    /// Filesystem UUID / volume id / swap UUID, when there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_id: String,
    /// Bytes the filesystem uses (what the capture read).
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// Disk offset of the chunk's first byte.
    pub offset: u64,
    pub length: u64,
    /// sha256 of the raw bytes.
    pub digest: String,
    /// sha256 of the stored zstd frame: the blob's name.
    pub blob: String,
    /// Size of the stored frame.
    pub stored: u64,
}

impl Chunk {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: String,
    /// Size of the captured disk; a target must be at least this big.
    pub disk_size: u64,
    pub table: TableKind,
    /// Chunks never cross a multiple of this.
    pub chunk_size: u64,
    pub partitions: Vec<Partition>,
    /// Sorted by offset, disjoint.
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("a manifest serialises");
        b.push(b'\n');
        b
    }

    /// Parses and checks every rule: schema, partitions inside the disk
    /// and disjoint, chunks sorted, disjoint, non-empty, inside the disk,
    /// within one `chunk_size` cell, digests well-formed.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes).context("parsing the capture manifest")?;
        m.check()?;
        Ok(m)
    }

    pub fn check(&self) -> Result<()> {
        if self.schema != SCHEMA {
            bail!(
                "capture manifest schema is {:?}, expected {SCHEMA:?}",
                self.schema
            );
        }
        if self.chunk_size == 0 || self.chunk_size % 4096 != 0 || self.chunk_size > MAX_CHUNK {
            bail!(
                "chunk_size {} is not a multiple of 4096 between 4096 and {MAX_CHUNK}",
                self.chunk_size
            );
        }
        let mut end = 0;
        for p in &self.partitions {
            if p.offset < end
                || p.offset
                    .checked_add(p.size)
                    .is_none_or(|e| e > self.disk_size)
            {
                bail!(
                    "partition {} ({}+{}) overlaps another or lies outside the {}-byte disk",
                    p.number,
                    p.offset,
                    p.size,
                    self.disk_size
                );
            }
            end = p.offset + p.size;
        }
        let mut end = 0;
        for c in &self.chunks {
            if c.length == 0 {
                bail!("chunk at {} is empty", c.offset);
            }
            if c.offset < end {
                bail!(
                    "chunk at {} overlaps the one before or is out of order",
                    c.offset
                );
            }
            if c.offset
                .checked_add(c.length)
                .is_none_or(|e| e > self.disk_size)
            {
                bail!("chunk at {} (+{}) ends past the disk", c.offset, c.length);
            }
            if c.offset / self.chunk_size != (c.end() - 1) / self.chunk_size {
                bail!(
                    "chunk at {} (+{}) crosses a {}-byte cell",
                    c.offset,
                    c.length,
                    self.chunk_size
                );
            }
            hex_of(&c.digest).with_context(|| format!("chunk at {}", c.offset))?;
            hex_of(&c.blob).with_context(|| format!("chunk at {}", c.offset))?;
            end = c.end();
        }
        Ok(())
    }

    /// Bytes the chunks cover.
    pub fn captured_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.length).sum()
    }

    /// Bytes of every distinct stored frame.
    pub fn stored_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .filter(|c| seen.insert(&c.blob))
            .fold(0u64, |n, c| n.saturating_add(c.stored))
    }

    /// Disk regions whose holes (bytes no chunk covers) must be zero on a
    /// target: raw partitions and everything outside the partitions.
    pub fn zero_regions(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        for p in &self.partitions {
            if p.offset > pos {
                out.push((pos, p.offset - pos));
            }
            if p.fs.holes_matter() {
                out.push((p.offset, p.size));
            }
            pos = p.offset + p.size;
        }
        if self.disk_size > pos {
            out.push((pos, self.disk_size - pos));
        }
        out
    }

    /// The holes inside [`Manifest::zero_regions`]: what a deploy zeroes.
    pub fn holes_to_zero(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut ci = 0;
        for (start, len) in self.zero_regions() {
            let end = start + len;
            let mut pos = start;
            while ci < self.chunks.len() && self.chunks[ci].end() <= start {
                ci += 1;
            }
            let mut k = ci;
            while k < self.chunks.len() && self.chunks[k].offset < end {
                let c = &self.chunks[k];
                if c.offset > pos {
                    out.push((pos, c.offset - pos));
                }
                pos = pos.max(c.end());
                k += 1;
            }
            if end > pos {
                out.push((pos, end - pos));
            }
        }
        out
    }

    /// The last partition by offset (the one a bigger disk grows).
    pub fn last_partition(&self) -> Option<&Partition> {
        self.partitions.iter().max_by_key(|p| p.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, length: u64) -> Chunk {
        Chunk {
            offset,
            length,
            digest: format!("sha256:{}", "a".repeat(64)),
            blob: format!("sha256:{}", "b".repeat(64)),
            stored: 10,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            schema: SCHEMA.into(),
            disk_size: 16 << 20,
            table: TableKind::Gpt,
            chunk_size: 1 << 20,
            partitions: vec![
                Partition {
                    number: 1,
                    offset: 1 << 20,
                    size: 4 << 20,
                    type_id: "x".into(),
                    name: "root".into(),
                    fs: Fs::Ext4,
                    fs_id: String::new(),
                    used_bytes: 0,
                },
                Partition {
                    number: 2,
                    offset: 5 << 20,
                    size: 4 << 20,
                    type_id: "x".into(),
                    name: "blob".into(),
                    fs: Fs::Raw,
                    fs_id: String::new(),
                    used_bytes: 0,
                },
            ],
            chunks: vec![chunk(0, 4096), chunk(1 << 20, 8192), chunk(6 << 20, 4096)],
        }
    }

    #[test]
    fn round_trip_and_holes() {
        let m = manifest();
        let b = m.to_bytes();
        assert_eq!(Manifest::parse(&b).unwrap(), m);
        assert!(b.ends_with(b"\n"));
        assert_eq!(
            m.holes_to_zero(),
            vec![
                (4096, (1 << 20) - 4096),
                (5 << 20, 1 << 20),
                ((6 << 20) + 4096, (3 << 20) - 4096),
                (9 << 20, 7 << 20)
            ]
        );
    }

    #[test]
    fn bad_manifests_are_refused_by_rule() {
        type Break = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Break, &str)> = vec![
            (Box::new(|m| m.schema = "x".into()), "schema"),
            (Box::new(|m| m.chunks.swap(0, 1)), "out of order"),
            (Box::new(|m| m.chunks[2].length = 8 << 20), "crosses"),
            (Box::new(|m| m.chunks[2].offset = 16 << 20), "past the disk"),
            (Box::new(|m| m.chunks[0].length = 0), "empty"),
            (Box::new(|m| m.chunks[0].digest = "md5:1".into()), "digest"),
            (Box::new(|m| m.partitions[1].offset = 2 << 20), "overlaps"),
            (Box::new(|m| m.chunk_size = 1 << 40), "between 4096 and"),
        ];
        for (f, want) in cases {
            let mut m = manifest();
            f(&mut m);
            let e = Manifest::parse(&m.to_bytes()).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{want}: {e:#}");
        }
        let e = Manifest::parse(b"{\"schema\":").unwrap_err();
        assert!(format!("{e:#}").contains("parsing"), "{e:#}");
    }

    /// Thousands of mutated manifests: each parses or is refused, none
    /// panics, and the sums and holes of whatever parses do not overflow.
    #[test]
    fn mutated_manifests_never_panic() {
        let good = manifest().to_bytes();
        let mut rng = crate::mutate::Rng::new(0x5eed_c10e);
        for _ in 0..3000 {
            if let Ok(m) = Manifest::parse(&rng.mutate(&good)) {
                let _ = (m.captured_bytes(), m.stored_bytes(), m.holes_to_zero());
            }
        }
    }
}
