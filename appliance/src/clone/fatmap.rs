//! Which parts of a FAT12/16/32 volume are in use: the reserved sectors
//! (boot sector, FSInfo, backup boot sector), every copy of the FAT, the
//! fixed root directory of FAT12/16, and each data cluster whose FAT entry
//! is not free (0) and not marked bad. Pure over [`ReadAt`]: offsets are
//! relative to the volume's start.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use super::{Extents, ReadAt};

/// What the boot sector says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatInfo {
    /// 12, 16 or 32.
    pub bits: u8,
    pub cluster_size: u64,
    pub clusters: u64,
    pub used_clusters: u64,
    pub volume_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FatMapError {
    #[error("reading the FAT volume at {offset}: {source}")]
    Io { offset: u64, source: std::io::Error },
    #[error("not a FAT volume: {0}")]
    NotFat(String),
}

/// The boot sector fields we need.
#[derive(Debug, Clone, Copy)]
struct Bpb {
    sector: u64,
    per_cluster: u64,
    reserved: u64,
    fats: u64,
    root_entries: u64,
    total: u64,
    fat_sectors: u64,
    volume_id: u32,
}

fn parse_bpb(b: &[u8]) -> Result<Bpb, FatMapError> {
    let bad = |w: String| Err(FatMapError::NotFat(w));
    if b.len() < 512 || b[510] != 0x55 || b[511] != 0xaa {
        return bad("no boot signature".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let sector = u16_at(0x0B);
    let per_cluster = b[0x0D] as u64;
    if ![512, 1024, 2048, 4096].contains(&sector) {
        return bad(format!("{sector}-byte sectors"));
    }
    if per_cluster == 0 || !per_cluster.is_power_of_two() {
        return bad(format!("{per_cluster} sectors per cluster"));
    }
    let fat16 = u16_at(0x16);
    let fat_sectors = if fat16 != 0 { fat16 } else { u32_at(0x24) };
    let total = match u16_at(0x13) {
        0 => u32_at(0x20),
        n => n,
    };
    let bpb = Bpb {
        sector,
        per_cluster,
        reserved: u16_at(0x0E),
        fats: b[0x10] as u64,
        root_entries: u16_at(0x11),
        total,
        fat_sectors,
        volume_id: if fat16 != 0 {
            u32_at(0x27) as u32
        } else {
            u32_at(0x43) as u32
        },
    };
    if bpb.reserved == 0 || bpb.fats == 0 || bpb.fat_sectors == 0 || bpb.total == 0 {
        return bad("zero reserved sectors, FATs, FAT size or total size".into());
    }
    if bpb.data_start_sector() >= bpb.total {
        return bad("the FATs fill the whole volume".into());
    }
    Ok(bpb)
}

impl Bpb {
    fn root_sectors(&self) -> u64 {
        (self.root_entries * 32).div_ceil(self.sector)
    }
    fn data_start_sector(&self) -> u64 {
        self.reserved + self.fats * self.fat_sectors + self.root_sectors()
    }
    fn clusters(&self) -> u64 {
        (self.total - self.data_start_sector()) / self.per_cluster
    }
    fn bits(&self) -> u8 {
        match self.clusters() {
            n if n < 4085 => 12,
            n if n < 65525 => 16,
            _ => 32,
        }
    }
}

/// True when `boot` (the first sector) looks like a FAT boot sector.
pub fn probe(boot: &[u8]) -> bool {
    parse_bpb(boot).is_ok()
        && (boot.get(0x36..0x39) == Some(b"FAT") || boot.get(0x52..0x55) == Some(b"FAT"))
}

fn read(disk: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<(), FatMapError> {
    disk.pread(buf, offset)
        .map_err(|source| FatMapError::Io { offset, source })
}

/// The used byte extents of the FAT volume on `disk`.
pub fn used(disk: &dyn ReadAt) -> Result<(FatInfo, Extents), FatMapError> {
    let mut boot = vec![0u8; 512];
    read(disk, &mut boot, 0)?;
    let b = parse_bpb(&boot)?;
    let bits = b.bits();
    let clusters = b.clusters();
    let mut fat = vec![0u8; (b.fat_sectors * b.sector) as usize];
    read(disk, &mut fat, b.reserved * b.sector)?;
    let need = match bits {
        12 => (clusters + 2) * 3 / 2 + 1,
        16 => (clusters + 2) * 2,
        _ => (clusters + 2) * 4,
    };
    if (fat.len() as u64) < need {
        return Err(FatMapError::NotFat(format!(
            "a {}-byte FAT cannot hold {clusters} clusters",
            fat.len()
        )));
    }
    let entry = |n: u64| -> u32 {
        match bits {
            12 => {
                let o = (n * 3 / 2) as usize;
                let v = u16::from_le_bytes([fat[o], fat[o + 1]]);
                (if n % 2 == 0 { v & 0xfff } else { v >> 4 }) as u32
            }
            16 => u16::from_le_bytes([fat[(n * 2) as usize], fat[(n * 2 + 1) as usize]]) as u32,
            _ => {
                u32::from_le_bytes(
                    fat[(n * 4) as usize..(n * 4 + 4) as usize]
                        .try_into()
                        .unwrap(),
                ) & 0x0fff_ffff
            }
        }
    };
    let bad_mark = match bits {
        12 => 0xff7,
        16 => 0xfff7,
        _ => 0x0fff_fff7,
    };
    let mut out = Extents::default();
    out.add(0, b.data_start_sector() * b.sector);
    let cs = b.per_cluster * b.sector;
    let data = b.data_start_sector() * b.sector;
    let mut used_clusters = 0;
    for n in 2..clusters + 2 {
        let e = entry(n);
        if e != 0 && e != bad_mark {
            out.add(data + (n - 2) * cs, cs);
            used_clusters += 1;
        }
    }
    Ok((
        FatInfo {
            bits,
            cluster_size: cs,
            clusters,
            used_clusters,
            volume_id: format!("{:04X}-{:04X}", b.volume_id >> 16, b.volume_id & 0xffff),
        },
        out,
    ))
}
