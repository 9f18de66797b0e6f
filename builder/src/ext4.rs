//! ext4 filesystems from a [`Tree`], written through a [`Sink`] with the
//! `mkext4` crate: declare the whole namespace, seal the layout (every
//! metadata byte and every file's final offsets are decided there), let
//! mkext4 emit the metadata, then write file contents ourselves at the
//! layout's offsets, in declaration order, so ascending.
//!
//! Format (mkext4 0.0.3, pinned, so bytes are stable): 4 KiB blocks, 256-byte
//! inodes, `has_journal ext_attr dir_index filetype extent flex_bg
//! sparse_super large_file huge_file dir_nlink extra_isize metadata_csum`,
//! an empty journal sized like mke2fs does, 5 % reserved blocks, and
//! `lost+found`. The volume size is rounded down to whole 4 KiB blocks.
//!
//! Writing follows the sink contract: zero regions (free space, journal
//! body, unused inode tables) are never written, and all-zero 4 KiB blocks
//! inside metadata or file data are skipped too. Adjacent writes are
//! coalesced into large positioned writes, so thousands of small files
//! cost a handful of syscalls. File data tells the sink how far the image
//! is final as it goes ([`Sink::settle`]), so the disk digest is computed
//! while the data is still being written.
//!
//! Blob contents are checked against their digests by reading them back
//! from the image once all data is written, when the sink can
//! ([`Sink::read_back`]): that keeps hashing off the path that feeds the
//! disk hasher, and checks the bytes the image actually holds. Sinks that
//! cannot read back (memory) get each piece hashed as it is read.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::HashMap;
use std::fs::File;
use std::io;

use mkext4::{FsBuilder, InodeCount, InodeHandle, Options, RegionSink, SpecialKind, ROOT};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::sink::Sink;
use crate::tree::{file_name, normalize_path, parent_of, Content, Entry, Meta, Node, Tree};

/// ext4 block size used by mkext4.
pub const BLOCK_SIZE: u64 = 4096;

/// How to make the filesystem. Everything that ends up in the bytes is here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Options {
    /// Volume size in bytes (rounded down to whole 4 KiB blocks; at least 8 MiB).
    pub size: u64,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Directory-index hash seed (`s_hash_seed`), as stored on disk.
    pub hash_seed: [u8; 16],
    /// Volume label, at most 16 bytes.
    pub label: String,
    /// Superblock timestamps and the times of filesystem-owned inodes (root
    /// directory, `lost+found`).
    pub epoch: i64,
    /// Free inodes to leave beyond those the tree uses. `None` sizes the
    /// inode tables like mke2fs (one inode per 16 KiB), or exactly to the
    /// tree if it needs more.
    pub reserve_inodes: Option<u64>,
}

impl Ext4Options {
    /// Options with the hash seed taken from the UUID, no label, and the
    /// default inode ratio.
    pub fn new(size: u64, uuid: [u8; 16], epoch: i64) -> Ext4Options {
        Ext4Options {
            size,
            uuid,
            hash_seed: uuid,
            label: String::new(),
            epoch,
            reserve_inodes: None,
        }
    }
}

/// What a finished filesystem holds (from the superblock that was written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4Stats {
    pub block_size: u64,
    pub blocks_total: u64,
    /// Blocks in use: metadata, journal, directories and file data.
    pub blocks_used: u64,
    pub inodes_total: u64,
    /// Inodes in use, including the 11 reserved ones.
    pub inodes_used: u64,
    /// Regular file bytes streamed (hardlinked files counted once).
    pub data_bytes: u64,
    /// Bytes actually written to the sink (zero blocks are skipped).
    pub bytes_written: u64,
}

/// Why an ext4 volume could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("ext4 volume of {} is too small for its {} of content", size_text(*size), size_text(*content))]
    TooSmall { size: u64, content: u64 },
    #[error("ext4 volume of {} holds at most {max} inodes, the tree needs {need}", size_text(*size))]
    TooManyInodes { size: u64, need: u64, max: u64 },
    #[error("invalid ext4 options: {0}")]
    Options(String),
    #[error("{path:?}: {why}")]
    Entry { path: String, why: String },
    #[error("{path:?}: content is {actual} bytes, but {declared} were declared")]
    LengthMismatch {
        path: String,
        declared: u64,
        actual: u64,
    },
    #[error("{path:?}: reading content: {source}")]
    Read { path: String, source: io::Error },
    #[error("ext4 layout: {0}")]
    Layout(String),
    #[error("writing ext4 image: {0}")]
    Write(io::Error),
}

fn size_text(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

fn entry_err(path: &str, e: mkext4::Error) -> Ext4Error {
    Ext4Error::Entry {
        path: path.to_string(),
        why: e.to_string(),
    }
}

fn ext_meta(m: &Meta) -> mkext4::Meta {
    mkext4::Meta::new(m.mode, m.uid, m.gid, (m.mtime, 0))
}

/// A regular file to write after the metadata.
struct Fill<'t> {
    handle: InodeHandle,
    /// The tree path the content belongs to (for errors).
    path: &'t str,
    content: &'t Content,
}

/// Build an ext4 filesystem holding `tree` into `sink` (offsets 0..size).
pub fn write_ext4(
    tree: &Tree,
    opts: &Ext4Options,
    sink: &mut dyn Sink,
) -> Result<Ext4Stats, Ext4Error> {
    let size = opts.size / BLOCK_SIZE * BLOCK_SIZE;
    let content = tree.file_bytes();
    if content > size {
        return Err(Ext4Error::TooSmall {
            size: opts.size,
            content,
        });
    }
    if opts.label.len() > 16 {
        return Err(Ext4Error::Options(format!(
            "label {:?} is longer than 16 bytes",
            opts.label
        )));
    }

    // Inodes: 1..=11 are reserved (11 is lost+found), then one per entry
    // that is not a hardlink.
    let own_inodes = tree
        .iter()
        .filter(|(_, e)| !matches!(e.node, Node::Hardlink(_)))
        .count() as u64;
    let need = 11 + own_inodes;
    let inodes = match opts.reserve_inodes {
        None if need <= size / 16384 => InodeCount::Auto,
        None => InodeCount::Exact(need.min(u32::MAX as u64) as u32),
        Some(extra) => InodeCount::Exact(need.saturating_add(extra).min(u32::MAX as u64) as u32),
    };

    let mut o = Options::new(size, opts.uuid, opts.epoch);
    o.hash_seed = mkext4::dirhash::seed_from_uuid(&opts.hash_seed);
    o.label = (!opts.label.is_empty()).then(|| opts.label.clone());
    o.inodes = inodes;
    let mut b = FsBuilder::new(o).map_err(|e| Ext4Error::Options(e.to_string()))?;

    let fills = declare(tree, &mut b)?;

    let layout = b.seal().map_err(|e| {
        let msg = e.to_string();
        if msg.contains("inodes needed") {
            Ext4Error::TooManyInodes {
                size: opts.size,
                need,
                max: max_inodes(size),
            }
        } else if msg.contains("too small") || msg.contains("image full") {
            Ext4Error::TooSmall {
                size: opts.size,
                content,
            }
        } else {
            Ext4Error::Layout(msg)
        }
    })?;

    // mkext4 emits every byte that is not file data (metadata, directories,
    // the journal) when its writer is made; file data is not streamed
    // through the writer but written below at the offsets the layout gives.
    let mut out = Coalescing::new(sink);
    drop(layout.writer(&mut out).map_err(|e| match e {
        mkext4::Error::Io(e) => Ext4Error::Write(e),
        e => Ext4Error::Layout(e.to_string()),
    })?);
    out.flush().map_err(Ext4Error::Write)?;
    let Coalescing {
        written,
        superblock,
        ..
    } = out;
    let data = write_data(&layout, &fills, sink)?;

    let sb = superblock.ok_or_else(|| Ext4Error::Layout("mkext4 emitted no superblock".into()))?;
    let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
    let blocks_total = le32(0x04) | le32(0x150) << 32;
    let free_blocks = le32(0x0C) | le32(0x158) << 32;
    let inodes_total = le32(0x00);
    let free_inodes = le32(0x10);
    Ok(Ext4Stats {
        block_size: BLOCK_SIZE,
        blocks_total,
        blocks_used: blocks_total - free_blocks,
        inodes_total,
        inodes_used: inodes_total - free_inodes,
        data_bytes: data.data_bytes,
        bytes_written: written + data.written,
    })
}

/// The most inodes mkext4 can give a volume of `size` bytes (32768 per
/// 128 MiB group).
fn max_inodes(size: u64) -> u64 {
    (size / BLOCK_SIZE).div_ceil(32768) * 32768
}

/// Declare every entry of the tree in walk order; returns the files to fill,
/// in declaration order.
fn declare<'t>(tree: &'t Tree, b: &mut FsBuilder) -> Result<Vec<Fill<'t>>, Ext4Error> {
    let walk = tree.walk();
    let mut dirs: HashMap<&str, InodeHandle> = HashMap::with_capacity(walk.len() / 8 + 1);
    // Regular files by tree path, for hardlinks.
    let mut files: HashMap<&str, InodeHandle> = HashMap::new();
    let mut fills = Vec::new();
    for (path, entry) in walk {
        let parent = match parent_of(path) {
            None => ROOT,
            Some(p) => *dirs.get(p).ok_or_else(|| Ext4Error::Entry {
                path: path.to_string(),
                why: format!("parent {p:?} is not a directory"),
            })?,
        };
        let name = file_name(path);
        let meta = ext_meta(&entry.meta);
        let err = |e| entry_err(path, e);
        match &entry.node {
            Node::Dir => {
                let h = b.mkdir(parent, name, meta).map_err(err)?;
                dirs.insert(path, h);
            }
            Node::File(c) => {
                if let Some(&h) = files.get(path) {
                    // A hardlink earlier in the walk already declared it.
                    b.hardlink(parent, name, h).map_err(err)?;
                } else {
                    let h = b.file(parent, name, meta, c.len()).map_err(err)?;
                    files.insert(path, h);
                    if !c.is_empty() {
                        fills.push(Fill {
                            handle: h,
                            path,
                            content: c,
                        });
                    }
                }
            }
            Node::Hardlink(target) => {
                let bad = || Ext4Error::Entry {
                    path: path.to_string(),
                    why: format!("hardlink target {target:?} is not a regular file in the tree"),
                };
                let t = normalize_path(target).map_err(|_| bad())?;
                if let Some(&h) = files.get(t.as_str()) {
                    b.hardlink(parent, name, h).map_err(err)?;
                    continue;
                }
                // The link comes before its target in the walk: declare the
                // file (with the target's metadata) under this name.
                let (tpath, tentry) = tree.iter().find(|(p, _)| *p == t).ok_or_else(bad)?;
                let Entry {
                    meta: tmeta,
                    node: Node::File(c),
                } = tentry
                else {
                    return Err(bad());
                };
                let h = b
                    .file(parent, name, ext_meta(tmeta), c.len())
                    .map_err(err)?;
                files.insert(tpath, h);
                if !c.is_empty() {
                    fills.push(Fill {
                        handle: h,
                        path: tpath,
                        content: c,
                    });
                }
            }
            Node::Symlink(target) => {
                b.symlink(parent, name, target, meta).map_err(err)?;
            }
            Node::CharDevice { major, minor } => {
                let kind = SpecialKind::Char {
                    major: *major,
                    minor: *minor,
                };
                b.mknod(parent, name, meta, kind).map_err(err)?;
            }
            Node::BlockDevice { major, minor } => {
                let kind = SpecialKind::Block {
                    major: *major,
                    minor: *minor,
                };
                b.mknod(parent, name, meta, kind).map_err(err)?;
            }
            Node::Fifo => {
                b.mknod(parent, name, meta, SpecialKind::Fifo)
                    .map_err(err)?;
            }
        }
    }
    Ok(fills)
}

/// What [`write_data`] did.
#[derive(Default)]
struct DataStats {
    /// Regular file bytes streamed.
    data_bytes: u64,
    /// Bytes written to the sink (all-zero blocks skipped).
    written: u64,
}

/// Size of a data write.
const DATA_BUF: usize = 2 << 20;

/// Write every file's content at the offsets the layout gives, in
/// declaration order (so ascending), adjacent files gathered into one
/// large write, telling the sink ([`Sink::settle`]) how far the image is
/// final after each write.
///
/// Blob contents are checked against their digests. When the sink can
/// read back ([`Sink::read_back`]), that happens after all data is
/// written and over the image's bytes, so data reaches the image (and
/// whoever reads it as it settles) sooner and what is checked is what the
/// image holds; otherwise each piece is hashed as it is read.
fn write_data(
    layout: &mkext4::build::Layout,
    fills: &[Fill<'_>],
    sink: &mut dyn Sink,
) -> Result<DataStats, Ext4Error> {
    let back = sink.read_back();
    let mut w = DataWriter {
        sink,
        buf: vec![0u8; DATA_BUF],
        len: 0,
        buf_off: 0,
        high: 0,
        ascending: true,
        check_inline: back.is_none(),
        stats: DataStats::default(),
    };
    let extents: Vec<Vec<(u64, u64)>> = fills.iter().map(|f| layout.extents(f.handle)).collect();
    for (f, ext) in fills.iter().zip(&extents) {
        w.file(f, ext)?;
    }
    w.flush()?;
    if let Some(back) = back {
        let mut buf = vec![0u8; 256 << 10];
        for (f, ext) in fills.iter().zip(&extents) {
            let Content::Blob { digest, .. } = f.content else {
                continue;
            };
            let mut h = Sha256::new();
            for &(offset, len) in ext {
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(buf.len() as u64) as usize;
                    back.read_exact_at(&mut buf[..n], offset + at)
                        .map_err(Ext4Error::Write)?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
            }
            check_digest(f, digest, h)?;
        }
    }
    Ok(w.stats)
}

fn check_digest(f: &Fill<'_>, digest: &Digest, h: Sha256) -> Result<(), Ext4Error> {
    let got = Digest(h.finalize().into());
    if got == *digest {
        return Ok(());
    }
    Err(Ext4Error::Read {
        path: f.path.to_string(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("blob {digest}: content has digest {got}, expected {digest}"),
        ),
    })
}

/// The writing side of [`write_data`].
struct DataWriter<'s> {
    sink: &'s mut dyn Sink,
    /// `buf[..len]` is content for `[buf_off, buf_off + len)`, not yet
    /// written. Kept at full length so reads need no zeroing first.
    buf: Vec<u8>,
    len: usize,
    buf_off: u64,
    /// End of the highest write so far.
    high: u64,
    /// Every write so far came after the previous one, so the image below
    /// `high` is final (mkext4 emitted all the rest before).
    ascending: bool,
    /// Hash blob contents as they are read (the sink cannot read back).
    check_inline: bool,
    stats: DataStats,
}

/// Where a file's content is read from.
enum Source<'c> {
    Mem(&'c [u8]),
    Blob(File),
}

impl DataWriter<'_> {
    /// Add one file's content; `extents` are its `(offset, bytes)` ranges.
    fn file(&mut self, f: &Fill<'_>, extents: &[(u64, u64)]) -> Result<(), Ext4Error> {
        let read_err = |source| Ext4Error::Read {
            path: f.path.to_string(),
            source,
        };
        let declared = f.content.len();
        let mut src = match f.content {
            Content::Bytes(b) => Source::Mem(b),
            Content::Blob { path, digest, .. } => Source::Blob(File::open(path).map_err(|e| {
                read_err(io::Error::new(
                    e.kind(),
                    format!("opening blob {digest} at {}: {e}", path.display()),
                ))
            })?),
        };
        let mut hash = match (&src, self.check_inline) {
            (Source::Blob(_), true) => Some(Sha256::new()),
            _ => None,
        };
        let mut done = 0u64;
        for &(offset, len) in extents {
            if self.len > 0 && offset != self.buf_off + self.len as u64 {
                self.flush()?;
            }
            if self.len == 0 {
                self.buf_off = offset;
            }
            let mut left = len;
            while left > 0 {
                if self.len == DATA_BUF {
                    self.flush()?;
                    self.buf_off = offset + (len - left);
                }
                let n = left.min((DATA_BUF - self.len) as u64) as usize;
                let piece = &mut self.buf[self.len..self.len + n];
                let got = match &mut src {
                    Source::Mem(m) => {
                        let k = n.min(m.len());
                        piece[..k].copy_from_slice(&m[..k]);
                        *m = &m[k..];
                        k
                    }
                    Source::Blob(file) => crate::sink::read_full(file, piece).map_err(read_err)?,
                };
                if got < n {
                    return Err(Ext4Error::LengthMismatch {
                        path: f.path.to_string(),
                        declared,
                        actual: done + got as u64,
                    });
                }
                if let Some(h) = &mut hash {
                    h.update(&piece[..n]);
                }
                self.len += n;
                done += n as u64;
                left -= n as u64;
            }
            // Zeros to the end of the block, where the next file may follow
            // in the same write.
            let end = self.len.next_multiple_of(BLOCK_SIZE as usize);
            self.buf[self.len..end].fill(0);
            self.len = end;
        }
        if done != declared {
            return Err(Ext4Error::Layout(format!(
                "{:?}: the layout holds {done} of its {declared} bytes",
                f.path
            )));
        }
        if let Source::Blob(file) = &mut src {
            // The content must end where it was declared to.
            if crate::sink::read_full(file, &mut [0u8; 1]).map_err(read_err)? != 0 {
                return Err(read_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content is longer than the declared {declared} bytes"),
                )));
            }
        }
        if let (Some(h), Content::Blob { digest, .. }) = (hash, f.content) {
            check_digest(f, digest, h)?;
        }
        self.stats.data_bytes += declared;
        Ok(())
    }

    /// Write the buffer (skipping all-zero blocks) and settle.
    fn flush(&mut self) -> Result<(), Ext4Error> {
        if self.len == 0 {
            return Ok(());
        }
        self.stats.written += write_nonzero(self.sink, self.buf_off, &self.buf[..self.len])
            .map_err(Ext4Error::Write)?;
        let end = self.buf_off + self.len as u64;
        self.ascending &= self.buf_off >= self.high;
        self.high = self.high.max(end);
        if self.ascending {
            self.sink.settle(end);
        }
        self.len = 0;
        Ok(())
    }
}

/// Write `data` (which starts on a block boundary) skipping all-zero
/// blocks; returns the bytes written.
fn write_nonzero(sink: &mut dyn Sink, offset: u64, data: &[u8]) -> io::Result<u64> {
    let bs = BLOCK_SIZE as usize;
    let is_zero = |c: &[u8]| c == &ZERO_BLOCK[..c.len()];
    let mut written = 0;
    let mut i = 0;
    while i < data.len() {
        let end = (i + bs).min(data.len());
        if is_zero(&data[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < data.len() {
            let e = (j + bs).min(data.len());
            if is_zero(&data[j..e]) {
                break;
            }
            j = e;
        }
        sink.write_at(offset + i as u64, &data[i..j])?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

/// Largest coalesced write.
const COALESCE: usize = 8 << 20;

static ZERO_BLOCK: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// mkext4's [`RegionSink`] over our [`Sink`]: `zeros` are free (sinks
/// start zeroed), adjacent `data` is gathered into large writes, all-zero
/// blocks are skipped, and the superblock is kept for the statistics.
struct Coalescing<'a> {
    sink: &'a mut dyn Sink,
    buf: Vec<u8>,
    buf_off: u64,
    written: u64,
    superblock: Option<Box<[u8; 1024]>>,
}

impl<'a> Coalescing<'a> {
    fn new(sink: &'a mut dyn Sink) -> Self {
        Coalescing {
            sink,
            buf: Vec::with_capacity(COALESCE),
            buf_off: 0,
            written: 0,
            superblock: None,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = write_nonzero(self.sink, self.buf_off, &buf);
            self.buf = buf;
            self.buf.clear();
            self.written += r?;
        }
        Ok(())
    }

    fn buf_end(&self) -> u64 {
        self.buf_off + self.buf.len() as u64
    }
}

impl RegionSink for Coalescing<'_> {
    fn data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if offset <= 1024 && offset + bytes.len() as u64 >= 2048 {
            let at = (1024 - offset) as usize;
            let mut sb = Box::new([0u8; 1024]);
            sb.copy_from_slice(&bytes[at..at + 1024]);
            self.superblock = Some(sb);
        }
        if !self.buf.is_empty()
            && offset == self.buf_end()
            && self.buf.len() + bytes.len() <= COALESCE
        {
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        self.flush()?;
        if bytes.len() >= COALESCE / 2 {
            self.written += write_nonzero(self.sink, offset, bytes)?;
            Ok(())
        } else {
            self.buf_off = offset;
            self.buf.extend_from_slice(bytes);
            Ok(())
        }
    }

    fn zeros(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // The sink is already zero. Short padding right after buffered data
        // (the tail of a file's last block) joins the buffer so the next
        // file's data can continue the same write.
        if !self.buf.is_empty()
            && offset == self.buf_end()
            && len < BLOCK_SIZE
            && self.buf.len() + len as usize <= COALESCE
        {
            self.buf.resize(self.buf.len() + len as usize, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::gpt;
    use crate::sink::Window;
    use std::path::Path;
    use std::process::Command;

    const MIB: u64 = 1 << 20;
    const EPOCH: i64 = 1_704_067_200;

    fn put(t: &mut Tree, path: &str, meta: Meta, node: Node) {
        t.insert(path, Entry { meta, node }, Meta::new(0o755, EPOCH))
            .unwrap();
    }

    /// Deterministic pseudo-random bytes.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn sample_tree() -> Tree {
        let mut t = Tree::new();
        let m = |mode| Meta::new(mode, EPOCH);
        put(&mut t, "etc", m(0o755), Node::Dir);
        put(
            &mut t,
            "etc/hostname",
            m(0o644),
            Node::File(Content::bytes(b"husky\n".to_vec())),
        );
        put(
            &mut t,
            "etc/shadow",
            m(0o600),
            Node::File(Content::bytes(b"root:*:1::::::\n".to_vec())),
        );
        for i in 0..2000 {
            put(
                &mut t,
                &format!("usr/share/many/d{}/f{i:04}.txt", i % 7),
                m(0o644),
                Node::File(Content::bytes(format!("file {i}\n").repeat(i % 13 + 1))),
            );
        }
        put(
            &mut t,
            "usr/lib/big.bin",
            m(0o644),
            Node::File(Content::bytes(noise(1, 5 * MIB as usize + 123))),
        );
        put(
            &mut t,
            "usr/lib/big2.bin",
            m(0o644),
            Node::File(Content::bytes(noise(2, 3 * MIB as usize))),
        );
        put(
            &mut t,
            "usr/bin/su",
            Meta {
                mode: 0o4755,
                uid: 0,
                gid: 0,
                mtime: EPOCH - 100,
            },
            Node::File(Content::bytes(b"#!/bin/sh\n".to_vec())),
        );
        put(
            &mut t,
            "home/user/notes",
            Meta {
                mode: 0o640,
                uid: 1000,
                gid: 1000,
                mtime: EPOCH + 5,
            },
            Node::File(Content::bytes(b"hello\n".to_vec())),
        );
        put(
            &mut t,
            "empty",
            m(0o644),
            Node::File(Content::bytes(Vec::new())),
        );
        put(&mut t, "bin", m(0o777), Node::Symlink("usr/bin".into()));
        let long = format!("/usr/share/many/{}", "x".repeat(80));
        put(&mut t, "long-link", m(0o777), Node::Symlink(long));
        // A hardlink that comes before its target in the walk, and one after.
        put(
            &mut t,
            "a-link",
            m(0o644),
            Node::Hardlink("usr/bin/su".into()),
        );
        put(
            &mut t,
            "usr/bin/su-again",
            m(0o644),
            Node::Hardlink("usr/bin/su".into()),
        );
        put(
            &mut t,
            "dev/console",
            m(0o600),
            Node::CharDevice { major: 5, minor: 1 },
        );
        put(
            &mut t,
            "dev/sda",
            m(0o660),
            Node::BlockDevice { major: 8, minor: 0 },
        );
        put(&mut t, "run/initctl", m(0o600), Node::Fifo);
        t.validate().unwrap();
        t
    }

    fn opts(size: u64) -> Ext4Options {
        let mut o = Ext4Options::new(size, *b"0123456789abcdef", EPOCH);
        o.label = "data".into();
        o
    }

    fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
            panic!("`{cmd}` is required for this test (apt-get install e2fsprogs gdisk): {e}")
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn fsck_clean(img: &Path) {
        let (ok, text) = tool("e2fsck", &["-fn", img.to_str().unwrap()]);
        assert!(ok, "e2fsck -fn failed:\n{text}");
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let (ok, text) = tool("debugfs", &["-R", req, img.to_str().unwrap()]);
        assert!(ok, "debugfs -R {req:?} failed: {text}");
        text
    }

    fn image(tree: &Tree, o: &Ext4Options, path: &Path) -> Ext4Stats {
        let mut f = File::create(path).unwrap();
        f.set_len(o.size).unwrap();
        let start = std::time::Instant::now();
        let stats = write_ext4(tree, o, &mut f).unwrap();
        let written = start.elapsed();
        f.sync_all().unwrap();
        if std::env::var_os("EXT4_TIMING").is_some() {
            eprintln!(
                "write_ext4 {written:.2?}, then sync_all {:.2?}",
                start.elapsed() - written
            );
        }
        stats
    }

    #[test]
    fn full_tree_is_fsck_clean_and_reads_back() {
        let t = sample_tree();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let o = opts(64 * MIB);
        let stats = image(&t, &o, &img);
        fsck_clean(&img);

        assert_eq!(stats.data_bytes, t.file_bytes()); // links counted once
        assert_eq!(stats.blocks_total, 64 * MIB / 4096);
        assert!(stats.inodes_used >= 11 + 2000 && stats.inodes_used < 11 + 2100);
        assert!(stats.blocks_used > 8 * MIB / 4096);

        // Contents.
        let cat = |p: &str| {
            let out = Command::new("debugfs")
                .args(["-R", &format!("cat /{p}"), img.to_str().unwrap()])
                .output()
                .unwrap();
            out.stdout
        };
        assert_eq!(cat("etc/hostname"), b"husky\n");
        assert_eq!(
            cat("usr/lib/big.bin"),
            noise(1, 5 * MIB as usize + 123),
            "big file content"
        );
        assert_eq!(cat("usr/lib/big2.bin"), noise(2, 3 * MIB as usize));
        assert_eq!(
            cat("usr/share/many/d6/f1000.txt"),
            "file 1000\n".repeat(1000 % 13 + 1).as_bytes()
        );
        assert_eq!(cat("a-link"), b"#!/bin/sh\n");

        // Metadata.
        let st = debugfs(&img, "stat /usr/bin/su");
        assert!(st.contains("Mode:  04755"), "{st}");
        assert!(st.contains("Links: 3"), "{st}");
        let st = debugfs(&img, "stat /etc/shadow");
        assert!(st.contains("Mode:  0600"), "{st}");
        let st = debugfs(&img, "stat /home/user/notes");
        assert!(st.contains("User:  1000   Group:  1000"), "{st}");
        assert!(st.contains("Mode:  0640"), "{st}");
        let st = debugfs(&img, "stat /dev/console");
        assert!(st.contains("Type: character special"), "{st}");
        assert!(st.contains("Device major/minor number: 05:01"), "{st}");
        let st = debugfs(&img, "stat /dev/sda");
        assert!(st.contains("Type: block special"), "{st}");
        assert!(st.contains("Device major/minor number: 08:00"), "{st}");
        let st = debugfs(&img, "stat /run/initctl");
        assert!(st.contains("Type: FIFO"), "{st}");
        let st = debugfs(&img, "stat /long-link");
        assert!(st.contains("Type: symlink"), "{st}");
        assert!(st.contains("Size: 96"), "{st}");
        // A slow symlink keeps its target in a data block.
        assert_eq!(
            cat("long-link"),
            format!("/usr/share/many/{}", "x".repeat(80)).as_bytes()
        );
        let st = debugfs(&img, "stat /bin");
        assert!(st.contains("Fast link dest: \"usr/bin\""), "{st}");
        let ls = debugfs(&img, "ls -l /usr/share/many/d0");
        assert_eq!(ls.matches(".txt").count(), 286, "{ls}");

        // Superblock.
        let (ok, h) = tool("dumpe2fs", &["-h", img.to_str().unwrap()]);
        assert!(ok, "{h}");
        assert!(h.contains("Filesystem volume name:   data"), "{h}");
        assert!(
            h.contains("Filesystem UUID:          30313233-3435-3637-3839-616263646566"),
            "{h}"
        );
        assert!(h.contains("has_journal"), "{h}");
    }

    #[test]
    fn builds_are_reproducible_and_sparse() {
        let t = sample_tree();
        let o = opts(64 * MIB);
        let mut a = Vec::new();
        let mut b = Vec::new();
        let sa = write_ext4(&t, &o, &mut a).unwrap();
        write_ext4(&t, &o, &mut b).unwrap();
        assert!(a == b, "two builds differ");
        // Only metadata and data (padded to blocks) were written, not the
        // 64 MiB volume.
        assert!(sa.bytes_written < 24 * MIB, "{sa:?}");
        let mut o2 = o.clone();
        o2.epoch += 1;
        let mut c = Vec::new();
        write_ext4(&t, &o2, &mut c).unwrap();
        assert!(a != c, "epoch must reach the bytes");
    }

    #[test]
    fn too_small_and_bad_content_are_errors() {
        let mut t = Tree::new();
        put(
            &mut t,
            "big",
            Meta::new(0o644, EPOCH),
            Node::File(Content::bytes(vec![1u8; 20 * MIB as usize])),
        );
        let e = write_ext4(&t, &opts(16 * MIB), &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ext4 volume of 16 MiB is too small for its 20 MiB of content"
        );
        // Fits by bytes, not with the journal and metadata.
        let mut t = Tree::new();
        put(
            &mut t,
            "big",
            Meta::new(0o644, EPOCH),
            Node::File(Content::bytes(vec![1u8; 15 * MIB as usize])),
        );
        let e = write_ext4(&t, &opts(16 * MIB), &mut Vec::new()).unwrap_err();
        assert!(matches!(e, Ext4Error::TooSmall { .. }), "{e}");

        // A blob whose file is shorter, longer or different than declared.
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"hello world").unwrap();
        let good = Digest::of(b"hello world");
        let mk = |digest, size| {
            let mut t = Tree::new();
            put(
                &mut t,
                "x/blob",
                Meta::new(0o644, EPOCH),
                Node::File(Content::Blob {
                    path: blob.clone(),
                    digest,
                    size,
                }),
            );
            t
        };
        write_ext4(&mk(good, 11), &opts(16 * MIB), &mut Vec::new()).unwrap();
        for (digest, size, want) in [
            (good, 20, "x/blob"),
            (good, 5, "x/blob"),
            (Digest::of(b"hello worle"), 11, "digest"),
        ] {
            let e = write_ext4(&mk(digest, size), &opts(16 * MIB), &mut Vec::new()).unwrap_err();
            let s = e.to_string();
            assert!(s.contains("\"x/blob\"") && s.contains(want), "{s}");
        }
        let e = write_ext4(
            &Tree::new(),
            &Ext4Options {
                label: "seventeen-bytes!!".into(),
                ..opts(16 * MIB)
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("label"), "{e}");
    }

    #[test]
    fn bad_blobs_are_caught_when_read_back_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = sample_tree();
        let mut blob = |name: &str, data: &[u8], digest: Digest| {
            let path = dir.path().join(name);
            std::fs::write(&path, data).unwrap();
            let c = Content::Blob {
                path,
                digest,
                size: data.len() as u64,
            };
            put(&mut t, name, Meta::new(0o644, EPOCH), Node::File(c));
        };
        let big = noise(7, 3 * MIB as usize);
        blob("good", &big, Digest::of(&big));
        let mut bad = big.clone();
        bad[2 * MIB as usize] ^= 1;
        blob("zz-bad", &bad, Digest::of(&big));
        let img = dir.path().join("fs.img");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        f.set_len(64 * MIB).unwrap();
        assert!(f.read_back().is_some());
        let e = write_ext4(&t, &opts(64 * MIB), &mut f).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("\"zz-bad\"") && s.contains("digest"), "{s}");
    }

    #[test]
    fn reserve_inodes_sets_the_inode_count() {
        let t = sample_tree();
        let mut o = opts(64 * MIB);
        o.reserve_inodes = Some(0);
        let s = write_ext4(&t, &o, &mut Vec::new()).unwrap();
        assert!(s.inodes_total - s.inodes_used < 100, "{s:?}");
        o.reserve_inodes = Some(10_000);
        let s = write_ext4(&t, &o, &mut Vec::new()).unwrap();
        assert!(s.inodes_total - s.inodes_used >= 10_000, "{s:?}");
        o.reserve_inodes = None;
        let s = write_ext4(&t, &o, &mut Vec::new()).unwrap();
        assert_eq!(s.inodes_total, 64 * MIB / 16384);
    }

    #[test]
    fn ext4_inside_gpt_partition() {
        let t = sample_tree();
        let layout = gpt::plan(
            256 * MIB,
            gpt::Guid::derive(&[b"disk"]),
            vec![
                gpt::PartitionSpec {
                    label: "ESP".into(),
                    type_guid: gpt::types::ESP,
                    guid: gpt::Guid::derive(&[b"esp"]),
                    size: gpt::SizeSpec::Bytes(32 * MIB),
                    attributes: 0,
                },
                gpt::PartitionSpec {
                    label: "data".into(),
                    type_guid: gpt::types::LINUX_FS,
                    guid: gpt::Guid::derive(&[b"data"]),
                    size: gpt::SizeSpec::Fill,
                    attributes: 0,
                },
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let mut f = File::create(&disk).unwrap();
        f.set_len(layout.disk_size).unwrap();
        let data = &layout.partitions[1];
        {
            let mut w = Window::new(&mut f, data.offset(), data.len());
            write_ext4(&t, &opts(data.len()), &mut w).unwrap();
        }
        gpt::write(&layout, &mut f).unwrap();
        f.sync_all().unwrap();
        drop(f);

        let (ok, v) = tool("sgdisk", &["-v", disk.to_str().unwrap()]);
        assert!(ok && v.contains("No problems found"), "{v}");

        // Copy the partition out for e2fsck.
        let bytes = std::fs::read(&disk).unwrap();
        let part = dir.path().join("part.img");
        std::fs::write(
            &part,
            &bytes[data.offset() as usize..(data.offset() + data.len()) as usize],
        )
        .unwrap();
        fsck_clean(&part);
        let mut f = File::open(&disk).unwrap();
        let back = gpt::read(&mut f).unwrap();
        assert_eq!(back.partitions[1].first_lba, data.first_lba);
    }

    /// Measures `write_ext4` against `mkfs.ext4 -d` on ~500 MiB of blobs
    /// (4 × 100 MiB plus 6000 small files); run with
    /// `cargo test --release -p builder bench_write_ext4 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_write_ext4() {
        let dir =
            tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or("/var/tmp".into())).unwrap();
        let src = dir.path().join("src");
        let mut t = Tree::new();
        let mut total = 0usize;
        let m = Meta::new(0o644, EPOCH);
        let mut add = |t: &mut Tree, rel: &str, data: Vec<u8>| {
            let p = src.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &data).unwrap();
            total += data.len();
            let c = Content::Blob {
                path: p,
                digest: Digest::of(&data),
                size: data.len() as u64,
            };
            put(t, rel, m, Node::File(c));
        };
        for i in 0..4 {
            add(&mut t, &format!("big/{i}"), noise(i, 100 * MIB as usize));
        }
        for i in 0..6000u64 {
            let len = 500 + (i as usize * 7919) % 30000;
            add(
                &mut t,
                &format!("small/d{}/f{i}", i % 60),
                noise(100 + i, len),
            );
        }
        let img = dir.path().join("fs.img");
        let o = opts(1024 * MIB);
        if std::env::var_os("MKFS_FIRST").is_some() {
            let start = std::time::Instant::now();
            let (ok, text) = tool(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-d",
                    src.to_str().unwrap(),
                    img.to_str().unwrap(),
                    "1G",
                ],
            );
            assert!(ok, "{text}");
            std::fs::File::open(&img).unwrap().sync_all().unwrap();
            eprintln!("mkfs.ext4 -d first: {:.2?}", start.elapsed());
            std::fs::remove_file(&img).unwrap();
        }
        let _ = Command::new("sync").status();
        let start = std::time::Instant::now();
        for (_, e) in t.iter() {
            if let Node::File(c) = &e.node {
                std::io::copy(&mut c.open().unwrap(), &mut std::io::sink()).unwrap();
            }
        }
        eprintln!("reading and verifying alone: {:.2?}", start.elapsed());
        struct Null;
        impl Sink for Null {
            fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
        }
        let start = std::time::Instant::now();
        write_ext4(&t, &o, &mut Null).unwrap();
        eprintln!("write_ext4 into a null sink: {:.2?}", start.elapsed());
        let start = std::time::Instant::now();
        let s = image(&t, &o, &img);
        let ours = start.elapsed();
        fsck_clean(&img);
        std::fs::remove_file(&img).unwrap();
        let _ = Command::new("sync").status();
        let start = std::time::Instant::now();
        let (ok, text) = tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-d",
                src.to_str().unwrap(),
                img.to_str().unwrap(),
                "1G",
            ],
        );
        assert!(ok, "{text}");
        std::fs::File::open(&img).unwrap().sync_all().unwrap();
        let theirs = start.elapsed();
        let rate = |d: std::time::Duration| total as f64 / MIB as f64 / d.as_secs_f64();
        eprintln!(
            "{} MiB in {} files: write_ext4 {ours:.2?} ({:.0} MiB/s), mkfs.ext4 -d {theirs:.2?} ({:.0} MiB/s); {s:?}",
            total >> 20,
            t.len(),
            rate(ours),
            rate(theirs)
        );
    }
}
