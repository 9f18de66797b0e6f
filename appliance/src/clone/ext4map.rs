//! Which blocks of an ext4 (or ext2/3) filesystem are in use, from its
//! block bitmaps: a small reader of our own (ext4-view reads files, not
//! bitmaps).
//!
//! Handled: 32- and 64-byte group descriptors (`64bit`), `flex_bg`
//! (bitmaps and inode tables of many groups packed in one), groups whose
//! bitmap was never written (`BLOCK_UNINIT`: their used blocks are the
//! superblock backup, the descriptor table and its reserve, and any
//! group's metadata that lies inside them), `sparse_super`,
//! `sparse_super2` and `meta_bg` descriptor placement, 1 KiB blocks
//! (`s_first_data_block` = 1). Metadata blocks (every group's bitmaps and
//! inode table, superblocks and descriptors) are always counted as used,
//! whatever the bitmap says. `bigalloc` is refused (clusters, not blocks).
//!
//! Pure over [`ReadAt`]: offsets are relative to the filesystem's start.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use super::{Extents, ReadAt};

/// What the superblock says about the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Info {
    pub block_size: u64,
    pub blocks: u64,
    /// Blocks the superblock counts as free.
    pub free_blocks: u64,
    pub uuid: String,
    pub label: String,
}

/// Why a filesystem could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum Ext4MapError {
    #[error("reading the ext4 filesystem at {offset}: {source}")]
    Io { offset: u64, source: std::io::Error },
    #[error("not an ext2/3/4 filesystem (magic {0:#06x})")]
    Magic(u16),
    #[error("ext4 superblock: {0}")]
    Superblock(String),
    #[error("ext4 feature {0} is not supported by the capture")]
    Unsupported(&'static str),
    #[error(
        "ext4 group {group}: {what} at block {block} lies outside the {blocks}-block filesystem"
    )]
    BadDescriptor {
        group: u64,
        what: &'static str,
        block: u64,
        blocks: u64,
    },
}

const MAGIC: u16 = 0xEF53;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// True when the 1024 bytes at filesystem offset 1024 look like an ext
/// superblock.
pub fn probe(sb: &[u8]) -> bool {
    sb.len() >= 0x3a && u16::from_le_bytes([sb[0x38], sb[0x39]]) == MAGIC
}

struct Super {
    block_size: u64,
    blocks: u64,
    free_blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    desc_size: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    incompat: u32,
    ro_compat: u32,
    compat: u32,
    backup_bgs: [u64; 2],
    uuid: [u8; 16],
    label: [u8; 16],
}

fn parse_super(sb: &[u8]) -> Result<Super, Ext4MapError> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    let magic = u16_at(0x38) as u16;
    if magic != MAGIC {
        return Err(Ext4MapError::Magic(magic));
    }
    let log = u32_at(0x18);
    if log > 6 {
        return Err(Ext4MapError::Superblock(format!(
            "block size 1024 << {log} is out of range"
        )));
    }
    let incompat = u32_at(0x60);
    let ro_compat = u32_at(0x64);
    let bit64 = incompat & INCOMPAT_64BIT != 0;
    let hi = |o: usize| if bit64 { (u32_at(o) as u64) << 32 } else { 0 };
    let s = Super {
        block_size: 1024 << log,
        blocks: hi(0x150) | u32_at(0x4) as u64,
        free_blocks: hi(0x158) | u32_at(0xC) as u64,
        first_data_block: u32_at(0x14) as u64,
        blocks_per_group: u32_at(0x20) as u64,
        desc_size: if bit64 { u16_at(0xFE).max(32) } else { 32 },
        reserved_gdt: u16_at(0xCE),
        first_meta_bg: u32_at(0x104) as u64,
        incompat,
        ro_compat,
        compat: u32_at(0x5C),
        backup_bgs: [u32_at(0x24C) as u64, u32_at(0x250) as u64],
        uuid: sb[0x68..0x78].try_into().unwrap(),
        label: sb[0x78..0x88].try_into().unwrap(),
    };
    if s.blocks_per_group == 0 || s.blocks_per_group > 8 * s.block_size {
        return Err(Ext4MapError::Superblock(format!(
            "{} blocks per group with {}-byte blocks",
            s.blocks_per_group, s.block_size
        )));
    }
    if s.blocks <= s.first_data_block {
        return Err(Ext4MapError::Superblock(format!("{} blocks", s.blocks)));
    }
    if bit64 && (s.desc_size > 1024 || !s.desc_size.is_power_of_two()) {
        return Err(Ext4MapError::Superblock(format!(
            "descriptor size {}",
            s.desc_size
        )));
    }
    if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err(Ext4MapError::Unsupported("bigalloc"));
    }
    Ok(s)
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n % base == 0 {
        n /= base;
    }
    n == 1
}

impl Super {
    fn groups(&self) -> u64 {
        (self.blocks - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    fn group_start(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn group_end(&self, g: u64) -> u64 {
        (self.group_start(g) + self.blocks_per_group).min(self.blocks)
    }

    fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    /// Whether group `g` holds a superblock backup.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.contains(&g);
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        g == 1 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
    }

    /// Descriptor-table blocks (without meta_bg): all of them.
    fn gdt_blocks(&self) -> u64 {
        (self.groups() * self.desc_size).div_ceil(self.block_size)
    }

    /// The blocks at the start of group `g` taken by the superblock copy,
    /// the descriptor table and its reserve.
    fn base_meta(&self, g: u64) -> (u64, u64) {
        let start = self.group_start(g);
        // With 1 KiB blocks group 0 starts at block 1 (block 0 is the boot
        // area, also kept).
        let mut n = 0;
        if self.has_super(g) {
            n += 1;
            if !self.meta_bg() {
                n += self.gdt_blocks() + self.reserved_gdt;
            } else {
                n += self.first_meta_bg.min(self.gdt_blocks()) + self.reserved_gdt;
            }
        }
        if self.meta_bg() {
            // meta_bg: a descriptor block sits in the first, second and
            // last group of each meta group.
            let per = self.descs_per_block();
            let mg = g / per;
            if mg >= self.first_meta_bg {
                let i = g % per;
                let last = ((mg + 1) * per - 1).min(self.groups() - 1);
                if i == 0 || i == 1 || g == last {
                    n += 1;
                }
            }
        }
        (start, n.min(self.group_end(g) - start))
    }

    /// Block numbers of the descriptor blocks, in table order.
    fn desc_blocks(&self) -> Vec<u64> {
        let count = self.gdt_blocks();
        let first = self.first_data_block + 1;
        if !self.meta_bg() {
            return (0..count).map(|i| first + i).collect();
        }
        (0..count)
            .map(|i| {
                if i < self.first_meta_bg {
                    first + i
                } else {
                    let g = i * self.descs_per_block();
                    self.group_start(g) + u64::from(self.has_super(g))
                }
            })
            .collect()
    }
}

fn read(disk: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<(), Ext4MapError> {
    disk.pread(buf, offset)
        .map_err(|source| Ext4MapError::Io { offset, source })
}

/// The used byte extents of the filesystem on `disk` (offsets from its
/// start), and what its superblock says.
pub fn used(disk: &dyn ReadAt) -> Result<(Ext4Info, Extents), Ext4MapError> {
    let mut sbuf = vec![0u8; 1024];
    read(disk, &mut sbuf, 1024)?;
    let s = parse_super(&sbuf)?;
    let bs = s.block_size;
    let groups = s.groups();

    // Descriptors.
    let mut descs = Vec::with_capacity((groups * s.desc_size) as usize);
    let mut blk = vec![0u8; bs as usize];
    for b in s.desc_blocks() {
        if b >= s.blocks {
            return Err(Ext4MapError::Superblock(format!(
                "descriptor block {b} beyond the end"
            )));
        }
        read(disk, &mut blk, b * bs)?;
        descs.extend_from_slice(&blk);
    }
    let bit64 = s.incompat & INCOMPAT_64BIT != 0;
    struct Desc {
        block_bitmap: u64,
        inode_bitmap: u64,
        inode_table: u64,
        flags: u16,
    }
    let inode_table_blocks = {
        let ipg = u32::from_le_bytes(sbuf[0x28..0x2C].try_into().unwrap()) as u64;
        let isz = if u32::from_le_bytes(sbuf[0x4C..0x50].try_into().unwrap()) == 0 {
            128
        } else {
            u16::from_le_bytes([sbuf[0x58], sbuf[0x59]]) as u64
        };
        (ipg * isz).div_ceil(bs)
    };
    let mut parsed = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let d = &descs[(g * s.desc_size) as usize..((g + 1) * s.desc_size) as usize];
        let lo = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as u64;
        let hi = |o: usize| if bit64 { lo(o) << 32 } else { 0 };
        let desc = Desc {
            block_bitmap: hi(0x20) | lo(0x0),
            inode_bitmap: hi(0x24) | lo(0x4),
            inode_table: hi(0x28) | lo(0x8),
            flags: u16::from_le_bytes([d[0x12], d[0x13]]),
        };
        for (what, b, n) in [
            ("block bitmap", desc.block_bitmap, 1),
            ("inode bitmap", desc.inode_bitmap, 1),
            ("inode table", desc.inode_table, inode_table_blocks),
        ] {
            if b == 0 || b + n > s.blocks {
                return Err(Ext4MapError::BadDescriptor {
                    group: g,
                    what,
                    block: b,
                    blocks: s.blocks,
                });
            }
        }
        parsed.push(desc);
    }

    // Blocks always used, in block units: boot block(s), every group's
    // base metadata, bitmaps and inode tables.
    let mut used = Extents::default();
    used.add(0, s.first_data_block + 1);
    for (g, d) in parsed.iter().enumerate() {
        let (a, n) = s.base_meta(g as u64);
        used.add(a, n);
        used.add(d.block_bitmap, 1);
        used.add(d.inode_bitmap, 1);
        used.add(d.inode_table, inode_table_blocks);
    }
    // Initialised bitmaps.
    for (g, d) in parsed.iter().enumerate() {
        if d.flags & BG_BLOCK_UNINIT != 0 {
            continue;
        }
        let g = g as u64;
        read(disk, &mut blk, d.block_bitmap * bs)?;
        let start = s.group_start(g);
        let n = s.group_end(g) - start;
        let mut i = 0u64;
        while i < n {
            let byte = blk[(i / 8) as usize];
            if i % 8 == 0 && (byte == 0 || byte == 0xff) && i + 8 <= n {
                if byte == 0xff {
                    used.add(start + i, 8);
                }
                i += 8;
                continue;
            }
            if byte >> (i % 8) & 1 == 1 {
                used.add(start + i, 1);
            }
            i += 1;
        }
    }
    let mut bytes = Extents::default();
    for (a, n) in used.iter() {
        let end = (a + n).min(s.blocks);
        if end > a {
            bytes.add(a * bs, (end - a) * bs);
        }
    }
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches('\0')
            .to_string()
    };
    let u = s.uuid;
    let info = Ext4Info {
        block_size: bs,
        blocks: s.blocks,
        free_blocks: s.free_blocks,
        uuid: format!(
            "{}-{}-{}-{}-{}",
            hex::encode(&u[0..4]),
            hex::encode(&u[4..6]),
            hex::encode(&u[6..8]),
            hex::encode(&u[8..10]),
            hex::encode(&u[10..16])
        ),
        label: text(&s.label),
    };
    Ok((info, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        for (g, want) in [
            (0, true),
            (1, true),
            (2, false),
            (3, true),
            (9, true),
            (25, true),
            (49, true),
            (10, false),
            (27, true),
        ] {
            assert_eq!(
                g == 0 || g == 1 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7),
                want,
                "{g}"
            );
        }
    }

    #[test]
    fn not_ext4_is_named() {
        let disk = vec![0u8; 4096];
        let e = used(&disk).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
