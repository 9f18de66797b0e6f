//! Growing the data filesystem to fill its partition on first boot: an
//! image flashed onto a larger disk gets a grown GPT from the writer, and
//! init then grows the mounted ext4 online (`EXT4_IOC_RESIZE_FS`, what
//! `resize2fs` does for a mounted filesystem).
//!
//! The comparison is pure ([`parse_superblock`], [`grow_to`]); only
//! [`grow_mounted`] touches the device.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// What we need of an ext4 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub blocks: u64,
    pub block_size: u64,
}

/// Parses the 1024-byte superblock (found at byte 1024 of the device).
pub fn parse_superblock(sb: &[u8]) -> Result<Superblock> {
    if sb.len() < 1024 {
        bail!("superblock is {} bytes, expected 1024", sb.len());
    }
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    if magic != 0xEF53 {
        bail!("no ext4 superblock (magic {magic:#06x})");
    }
    let log = u32_at(0x18);
    if log > 6 {
        bail!("ext4 block size 1024 << {log} is out of range");
    }
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let hi = if incompat_64bit {
        u32_at(0x150) as u64
    } else {
        0
    };
    Ok(Superblock {
        blocks: (hi << 32) | u32_at(0x4) as u64,
        block_size: 1024 << log,
    })
}

/// The block count to grow to when the partition (`part_bytes`) holds at
/// least 1 MiB more than the filesystem, else `None`.
pub fn grow_to(sb: &Superblock, part_bytes: u64) -> Option<u64> {
    let fits = part_bytes / sb.block_size;
    let min_gain = ((1 << 20) / sb.block_size).max(1);
    (fits >= sb.blocks + min_gain).then_some(fits)
}

/// What [`grow_mounted`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grown {
    /// The filesystem already fills its partition.
    Fits { blocks: u64 },
    /// Grown from `from` to `to` blocks.
    Grown { from: u64, to: u64, block_size: u64 },
}

/// Grows the ext4 on `dev` (mounted at `mountpoint`) to its partition's
/// size as `<sys_block>/<dev name>/size` reports it.
pub fn grow_mounted(dev: &Path, mountpoint: &Path, sys_block: &Path) -> Result<Grown> {
    let name = dev
        .file_name()
        .with_context(|| format!("{} has no device name", dev.display()))?;
    let size_file = sys_block.join(name).join("size");
    let sectors: u64 = std::fs::read_to_string(&size_file)
        .with_context(|| format!("reading {}", size_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", size_file.display()))?;
    let mut sb = [0u8; 1024];
    File::open(dev)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .with_context(|| format!("reading the superblock of {}", dev.display()))?;
    let sb = parse_superblock(&sb).with_context(|| format!("reading {}", dev.display()))?;
    let Some(to) = grow_to(&sb, sectors * 512) else {
        return Ok(Grown::Fits { blocks: sb.blocks });
    };
    let dir =
        File::open(mountpoint).with_context(|| format!("opening {}", mountpoint.display()))?;
    crate::blkdev::ext4_resize(&dir, to).with_context(|| {
        format!(
            "growing the ext4 on {} from {} to {to} blocks",
            dev.display(),
            sb.blocks
        )
    })?;
    Ok(Grown::Grown {
        from: sb.blocks,
        to,
        block_size: sb.block_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(blocks: u64, log: u32, bit64: bool) -> Vec<u8> {
        let mut s = vec![0u8; 1024];
        s[0x4..0x8].copy_from_slice(&(blocks as u32).to_le_bytes());
        s[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        s[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        if bit64 {
            s[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
            s[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        s
    }

    #[test]
    fn superblock_fields() {
        let s = parse_superblock(&sb(1_000_000, 2, false)).unwrap();
        assert_eq!(
            s,
            Superblock {
                blocks: 1_000_000,
                block_size: 4096
            }
        );
        let big = (5u64 << 32) + 7;
        let s = parse_superblock(&sb(big, 2, true)).unwrap();
        assert_eq!(s.blocks, big);
        let mut bad = sb(1, 2, false);
        bad[0x38] = 0;
        assert!(parse_superblock(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse_superblock(&[0; 10]).is_err());
    }

    #[test]
    fn grows_only_when_the_partition_is_bigger_by_a_mib() {
        let s = Superblock {
            blocks: 1000,
            block_size: 4096,
        };
        assert_eq!(grow_to(&s, 1000 * 4096), None);
        assert_eq!(grow_to(&s, 1000 * 4096 + 4096 * 255), None);
        assert_eq!(grow_to(&s, 1256 * 4096 + 100), Some(1256));
        // A partition smaller than the filesystem is left alone.
        assert_eq!(grow_to(&s, 10 * 4096), None);
    }

    #[test]
    fn reads_partition_size_and_superblock() {
        // A filesystem that already fits: no ioctl is attempted.
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("vdz2");
        let mut img = vec![0u8; 4096];
        img[1024..2048].copy_from_slice(&sb(16, 2, false));
        std::fs::write(&dev, img).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/vdz2")).unwrap();
        std::fs::write(dir.path().join("sys/vdz2/size"), "128\n").unwrap();
        assert_eq!(
            grow_mounted(&dev, dir.path(), &dir.path().join("sys")).unwrap(),
            Grown::Fits { blocks: 16 }
        );
        // Bigger partition: the ioctl on a non-ext4 directory fails with
        // an error naming the device.
        std::fs::write(dir.path().join("sys/vdz2/size"), "1000000\n").unwrap();
        let e = grow_mounted(&dev, dir.path(), &dir.path().join("sys")).unwrap_err();
        assert!(format!("{e:#}").contains("growing the ext4 on"), "{e:#}");
    }
}
