//! Disk cloning (issue 7): capture a machine's disk partition by partition
//! into content-addressed chunks and a manifest, and deploy a manifest
//! onto other disks through the verified writer.
//!
//! Capture ([`capture`]): read the partition table ([`ptable`]); for each
//! partition find what is used — ext4 block bitmaps ([`ext4map`]), the FAT
//! ([`fatmap`]), a swap header page (recorded, contents not copied) —
//! and treat everything else (unknown partitions, the tables, gaps) as raw
//! data whose all-zero 4 KiB blocks are skipped. Used bytes are cut on a
//! fixed grid of `chunk_size` cells aligned to disk offsets, so changing
//! one file touches a few chunks and the rest deduplicate. Each chunk is
//! hashed (sha256 of the raw bytes), looked up in a [`store::ChunkStore`],
//! and only when missing compressed (zstd) and stored. Reading, hashing
//! and compressing overlap: one reader, one worker per core.
//!
//! Deploy ([`deploy`]) and first-boot identity ([`identity`]) are the
//! other direction. The manifest format is in [`manifest`].

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod agent;
pub mod deploy;
pub mod ext4map;
pub mod fatmap;
pub mod identity;
pub mod manifest;
pub mod ptable;
pub mod remote;
pub mod server;
pub mod store;

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use manifest::{Chunk, Fs, Manifest, Partition};
use store::ChunkStore;

/// Positioned reads of a disk (a file, a block device, bytes in memory).
pub trait ReadAt: Sync {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let o = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        match self.get(o..o.saturating_add(buf.len())) {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A [`ReadAt`] seen from `base` (a partition of a disk).
pub struct Offset<'a> {
    pub inner: &'a dyn ReadAt,
    pub base: u64,
}

impl ReadAt for Offset<'_> {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.pread(buf, self.base + offset)
    }
}

/// Sorted, merged `(start, length)` extents. Adding in order is cheap;
/// out-of-order adds are sorted out when read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents {
    v: Vec<(u64, u64)>,
    sorted: bool,
}

impl Extents {
    pub fn add(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.v.is_empty() {
            self.sorted = true;
        }
        if let Some(last) = self.v.last_mut() {
            let end = last.0 + last.1;
            if start >= last.0 && start <= end {
                last.1 = last.1.max(start + len - last.0);
                return;
            }
            if start < last.0 {
                self.sorted = false;
            }
        }
        self.v.push((start, len));
    }

    /// The extents, sorted and merged.
    pub fn iter(&self) -> Vec<(u64, u64)> {
        if self.sorted {
            return self.v.clone();
        }
        let mut v = self.v.clone();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, l) in v {
            match out.last_mut() {
                Some(last) if s <= last.0 + last.1 => {
                    last.1 = last.1.max(s + l - last.0);
                }
                _ => out.push((s, l)),
            }
        }
        out
    }

    pub fn total(&self) -> u64 {
        self.iter().iter().map(|e| e.1).sum()
    }
}

/// Capture settings.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Grid cell size: chunks never cross a multiple of it (≥ 4096).
    pub chunk_size: u64,
    /// zstd level.
    pub level: i32,
    /// Hashing/compressing workers (0: one per core).
    pub threads: usize,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            chunk_size: 1 << 20,
            level: 1,
            threads: 0,
        }
    }
}

/// What a capture did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureReport {
    pub disk_size: u64,
    /// Bytes the filesystems use plus the raw regions' non-zero bytes.
    pub used_bytes: u64,
    /// Bytes read from the disk (raw regions are read whole to find zeros).
    pub bytes_read: u64,
    pub chunks: usize,
    /// Chunks the store lacked (compressed and stored now).
    pub new_chunks: usize,
    /// Stored bytes of the new chunks (what a remote store receives).
    pub new_stored_bytes: u64,
    /// Stored bytes of every distinct chunk of this capture.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// Work for the reader: read `len` bytes at `offset`, all of it data, or
/// raw (keep only its non-zero 4 KiB blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Data { offset: u64, len: u64 },
    Raw { offset: u64, len: u64 },
}

/// Probes the filesystem of one partition and maps what it uses.
fn map_partition(disk: &dyn ReadAt, p: &ptable::Part) -> Result<(Partition, Vec<Region>)> {
    let part = Offset {
        inner: disk,
        base: p.offset,
    };
    let mut head = vec![0u8; 4096.min(p.size) as usize];
    part.pread(&mut head, 0)
        .with_context(|| format!("reading partition {}", p.number))?;
    let mut rec = Partition {
        number: p.number,
        offset: p.offset,
        size: p.size,
        type_id: p.type_id.clone(),
        name: p.name.clone(),
        fs: Fs::Raw,
        fs_id: String::new(),
        used_bytes: 0,
    };
    let clip = |ext: Vec<(u64, u64)>| -> Vec<Region> {
        ext.into_iter()
            .filter(|(s, _)| *s < p.size)
            .map(|(s, l)| Region::Data {
                offset: p.offset + s,
                len: l.min(p.size - s),
            })
            .collect()
    };
    if head.len() >= 2048 && ext4map::probe(&head[1024..2048]) {
        let (info, used) = ext4map::used(&part)
            .with_context(|| format!("mapping the ext4 of partition {}", p.number))?;
        if info.blocks * info.block_size > p.size {
            return Err(anyhow!(
                "partition {}: its ext4 ({} blocks of {}) is bigger than the partition ({} bytes)",
                p.number,
                info.blocks,
                info.block_size,
                p.size
            ));
        }
        rec.fs = Fs::Ext4;
        rec.fs_id = info.uuid;
        let regions = clip(used.iter());
        rec.used_bytes = region_bytes(&regions);
        return Ok((rec, regions));
    }
    if head.len() >= 512 && fatmap::probe(&head) {
        let (info, used) = fatmap::used(&part)
            .with_context(|| format!("mapping the FAT of partition {}", p.number))?;
        rec.fs = match info.bits {
            12 => Fs::Fat12,
            16 => Fs::Fat16,
            _ => Fs::Fat32,
        };
        rec.fs_id = info.volume_id;
        let regions = clip(used.iter());
        rec.used_bytes = region_bytes(&regions);
        return Ok((rec, regions));
    }
    if head.len() == 4096 && matches!(&head[4086..4096], b"SWAPSPACE2" | b"SWAP-SPACE") {
        rec.fs = Fs::Swap;
        let u = &head[1036..1052];
        if u.iter().any(|b| *b != 0) {
            rec.fs_id = uuid::Uuid::from_slice(u)
                .map(|u| u.to_string())
                .unwrap_or_default();
        }
        rec.used_bytes = 4096;
        return Ok((
            rec,
            vec![Region::Data {
                offset: p.offset,
                len: 4096,
            }],
        ));
    }
    Ok((
        rec,
        vec![Region::Raw {
            offset: p.offset,
            len: p.size,
        }],
    ))
}

fn region_bytes(r: &[Region]) -> u64 {
    r.iter()
        .map(|r| match r {
            Region::Data { len, .. } | Region::Raw { len, .. } => *len,
        })
        .sum()
}

/// The table, the partition records and the regions to read, in disk order.
fn plan(disk: &dyn ReadAt, size: u64) -> Result<(ptable::Table, Vec<Partition>, Vec<Region>)> {
    let table = ptable::read(disk, size)?;
    let mut parts = Vec::new();
    let mut regions = Vec::new();
    let mut pos = 0;
    for p in &table.partitions {
        if p.offset > pos {
            regions.push(Region::Raw {
                offset: pos,
                len: p.offset - pos,
            });
        }
        let (rec, r) = map_partition(disk, p)?;
        parts.push(rec);
        regions.extend(r);
        pos = p.offset + p.size;
    }
    if size > pos {
        regions.push(Region::Raw {
            offset: pos,
            len: size - pos,
        });
    }
    Ok((table, parts, regions))
}

/// Non-zero runs of `buf` (which starts at disk offset `base`), on the
/// disk's 4 KiB grid, as `(offset in buf, len)`.
fn nonzero_runs(buf: &[u8], base: u64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        let next = (((base + i as u64) / 4096 + 1) * 4096 - base) as usize;
        let end = next.min(buf.len());
        if buf[i..end].iter().any(|b| *b != 0) {
            match out.last_mut() {
                Some(l) if l.0 + l.1 == i => l.1 += end - i,
                _ => out.push((i, end - i)),
            }
        }
        i = end;
    }
    out
}

/// A piece of the disk to hash and store.
struct Piece {
    offset: u64,
    data: Vec<u8>,
}

/// Captures the disk `disk` of `size` bytes into `store`; returns the
/// manifest (not yet stored anywhere) and what was done. `progress` gets
/// (bytes read, bytes to read).
pub fn capture(
    disk: &dyn ReadAt,
    size: u64,
    store: &dyn ChunkStore,
    opts: &CaptureOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Manifest, CaptureReport)> {
    let started = Instant::now();
    if opts.chunk_size < 4096
        || opts.chunk_size % 4096 != 0
        || opts.chunk_size > manifest::MAX_CHUNK
    {
        return Err(anyhow!(
            "chunk size {} is not a multiple of 4096 between 4096 and {}",
            opts.chunk_size,
            manifest::MAX_CHUNK
        ));
    }
    let (table, partitions, regions) = plan(disk, size)?;
    let cs = opts.chunk_size;
    let total = region_bytes(&regions);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let chunks: Mutex<Vec<Chunk>> = Mutex::new(Vec::new());
    let new_chunks = AtomicU64::new(0);
    let new_bytes = AtomicU64::new(0);
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let (tx, rx) = mpsc::sync_channel::<Piece>(threads * 2);
    let rx = Mutex::new(rx);
    let mut bytes_read = 0u64;
    let mut raw_nonzero = 0u64;
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            s.spawn(|| loop {
                let piece = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(p) => p,
                    Err(_) => return,
                };
                let res = (|| -> Result<Chunk> {
                    let digest = store::sha256(&piece.data);
                    let (blob, stored) = match store.lookup(&digest)? {
                        Some(found) => found,
                        None => {
                            let frame = store::encode(&piece.data, opts.level)?;
                            let n = frame.len() as u64;
                            let b = store.put(&digest, frame)?;
                            new_chunks.fetch_add(1, Ordering::Relaxed);
                            new_bytes.fetch_add(n, Ordering::Relaxed);
                            (b, n)
                        }
                    };
                    Ok(Chunk {
                        offset: piece.offset,
                        length: piece.data.len() as u64,
                        digest,
                        blob,
                        stored,
                    })
                })();
                match res {
                    Ok(c) => chunks.lock().unwrap_or_else(|p| p.into_inner()).push(c),
                    Err(e) => {
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(
                                e.context(format!("storing the chunk at {}", piece.offset)),
                            );
                    }
                }
            });
        }
        let failed = || {
            first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        };
        for r in &regions {
            let (offset, len, raw) = match *r {
                Region::Data { offset, len } => (offset, len, false),
                Region::Raw { offset, len } => (offset, len, true),
            };
            let mut pos = offset;
            while pos < offset + len {
                if failed() {
                    break;
                }
                let cell_end = (pos / cs + 1) * cs;
                let n = cell_end.min(offset + len) - pos;
                let mut buf = vec![0u8; n as usize];
                disk.pread(&mut buf, pos)
                    .with_context(|| format!("reading {n} bytes of the disk at {pos}"))?;
                bytes_read += n;
                if raw {
                    for (a, l) in nonzero_runs(&buf, pos) {
                        raw_nonzero += l as u64;
                        let piece = Piece {
                            offset: pos + a as u64,
                            data: buf[a..a + l].to_vec(),
                        };
                        if tx.send(piece).is_err() {
                            break;
                        }
                    }
                } else if tx
                    .send(Piece {
                        offset: pos,
                        data: buf,
                    })
                    .is_err()
                {
                    break;
                }
                pos += n;
                progress(bytes_read, total);
            }
        }
        drop(tx);
        Ok(())
    })?;
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    store.commit().context("committing the stored chunks")?;
    let mut chunks = chunks.into_inner().unwrap_or_else(|p| p.into_inner());
    chunks.sort_by_key(|c| c.offset);
    let manifest = Manifest {
        schema: manifest::SCHEMA.into(),
        disk_size: size,
        table: table.kind,
        chunk_size: cs,
        partitions,
        chunks,
    };
    manifest.check().context("checking the new manifest")?;
    let data_bytes: u64 = regions
        .iter()
        .map(|r| match r {
            Region::Data { len, .. } => *len,
            Region::Raw { .. } => 0,
        })
        .sum();
    let report = CaptureReport {
        disk_size: size,
        used_bytes: data_bytes + raw_nonzero,
        bytes_read,
        chunks: manifest.chunks.len(),
        new_chunks: new_chunks.into_inner() as usize,
        new_stored_bytes: new_bytes.into_inner(),
        stored_bytes: manifest.stored_bytes(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((manifest, report))
}

/// Captures a disk or image file at `path` (see [`capture`]).
pub fn capture_path(
    path: &std::path::Path,
    store: &dyn ChunkStore,
    opts: &CaptureOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Manifest, CaptureReport)> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = crate::blkdev::size_of(&f)
        .with_context(|| format!("reading the size of {}", path.display()))?;
    capture(&f, size, store, opts, progress)
        .with_context(|| format!("capturing {}", path.display()))
}

#[cfg(test)]
mod tests;
