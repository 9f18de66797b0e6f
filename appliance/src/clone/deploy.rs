//! Deploy: a capture manifest plus its chunks onto a disk, through the
//! verified writer ([`crate::writer::write_ranges`]): every chunk's sha256
//! checked before it is written and on read-back, the first MiB zeroed
//! first and written last, the GPT grown on a bigger disk. A disk smaller
//! than the captured one is refused before anything is fetched or written.
//!
//! Holes: a filesystem ignores its free blocks, so only the holes of raw
//! regions (unknown partitions, gaps, the tables' surroundings) are zeroed
//! ([`Manifest::holes_to_zero`]); free space keeps whatever the disk held.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::manifest::{Chunk, Fs, Manifest};
use super::store::ChunkStore;
use crate::bmap::Range;
use crate::writer::{ChunkSource, Progress, WriteOptions, WriteReport};

/// Where a deploy gets stored frames from (a local store, or the
/// appliance over HTTP in the agent).
pub trait BlobFetch {
    /// The stored frame of `blob` (`sha256:<hex>`), verified against its
    /// name.
    fn fetch(&mut self, blob: &str) -> Result<Vec<u8>>;
}

/// A [`ChunkStore`] as a [`BlobFetch`].
pub struct StoreFetch<'a>(pub &'a dyn ChunkStore);

impl BlobFetch for StoreFetch<'_> {
    fn fetch(&mut self, blob: &str) -> Result<Vec<u8>> {
        self.0.get_blob(blob)
    }
}

/// The manifest's chunks as the writer's [`ChunkSource`]: a read of a
/// chunk's exact range fetches and decompresses its blob (the writer
/// verifies the raw digest).
pub struct ManifestSource<'a> {
    chunks: HashMap<u64, &'a Chunk>,
    fetch: &'a mut dyn BlobFetch,
}

impl<'a> ManifestSource<'a> {
    pub fn new(m: &'a Manifest, fetch: &'a mut dyn BlobFetch) -> ManifestSource<'a> {
        ManifestSource {
            chunks: m.chunks.iter().map(|c| (c.offset, c)).collect(),
            fetch,
        }
    }
}

impl ChunkSource for ManifestSource<'_> {
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let c = match self.chunks.get(&offset) {
            Some(c) if c.length == len => *c,
            _ => bail!("no chunk of {len} bytes at offset {offset} in the manifest"),
        };
        let frame = self
            .fetch
            .fetch(&c.blob)
            .with_context(|| format!("fetching blob {}", c.blob))?;
        zstd::bulk::decompress(&frame, len as usize)
            .with_context(|| format!("decompressing blob {} (chunk at {offset})", c.blob))
    }
}

/// The writer's ranges for a manifest.
pub fn ranges(m: &Manifest) -> Vec<Range> {
    m.chunks
        .iter()
        .map(|c| Range {
            offset: c.offset,
            length: c.length,
            digest: c.digest.clone(),
        })
        .collect()
}

/// Size of the disk or file at `target`.
pub fn target_size(target: &Path) -> Result<u64> {
    let f = std::fs::File::open(target).with_context(|| format!("opening {}", target.display()))?;
    crate::blkdev::size_of(&f).with_context(|| format!("reading the size of {}", target.display()))
}

/// Refuses a target smaller than the captured disk, naming both sizes.
pub fn check_fits(m: &Manifest, target: &Path) -> Result<u64> {
    let size = target_size(target)?;
    if size < m.disk_size {
        bail!(
            "{} is too small: {size} bytes, the image was captured from a {}-byte disk ({} MiB more needed); nothing was written",
            target.display(),
            m.disk_size,
            (m.disk_size - size).div_ceil(1 << 20)
        );
    }
    Ok(size)
}

/// Writes the captured disk `m` onto `target` (a block device or a file).
pub fn deploy(
    m: &Manifest,
    fetch: &mut dyn BlobFetch,
    target: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<WriteReport> {
    m.check().context("checking the manifest")?;
    check_fits(m, target)?;
    let ranges = ranges(m);
    let holes = m.holes_to_zero();
    let mut source = ManifestSource::new(m, fetch);
    let opts = WriteOptions {
        zero_holes: false,
        ..WriteOptions::default()
    };
    crate::writer::write_ranges(
        m.disk_size,
        &ranges,
        &holes,
        &mut source,
        target,
        &opts,
        progress,
    )
    .with_context(|| format!("deploying onto {}", target.display()))
}

/// The ext4 to grow after a deploy onto a bigger disk: the last partition
/// (which the writer's grown GPT extended) when it holds ext4, or the whole
/// disk when there is no table. `(offset, new size)` in bytes.
pub fn ext4_to_grow(m: &Manifest, target_size: u64, grown_table: bool) -> Option<(u64, u64)> {
    use super::ptable::TableKind;
    match m.table {
        TableKind::None => {
            let p = m.partitions.first()?;
            (p.fs == Fs::Ext4 && target_size > m.disk_size).then_some((0, target_size))
        }
        TableKind::Gpt if grown_table => {
            let p = m.last_partition()?;
            if p.fs != Fs::Ext4 {
                return None;
            }
            // What builder::gpt::grow gives the last partition.
            let last_usable = target_size / 512 - 34;
            let end = (last_usable + 1) / 2048 * 2048 * 512;
            (end > p.offset + p.size).then_some((p.offset, end - p.offset))
        }
        _ => None,
    }
}
