//! Partition tables as a capture sees them: GPT (through
//! [`builder::gpt::read`], which checks both CRCs) or the four primary
//! entries of an MBR. Pure over a [`ReadAt`] so it runs on image files,
//! block devices and byte vectors alike.
//!
//! What is not a partition (the tables themselves, gaps, the backup GPT)
//! is captured as raw data by the caller, so nothing here needs to know
//! about boot code in the MBR gap.

use std::io::{self, Read, Seek, SeekFrom};

use serde::{Deserialize, Serialize};

use super::ReadAt;

/// The kind of table found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No table: the whole disk is one filesystem (or raw data).
    None,
}

/// One partition, in bytes from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// 1-based slot number in the table (0 for the whole disk).
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// GPT type GUID (upper-case text) or the MBR type byte as `0xNN`.
    pub type_id: String,
    /// GPT partition name, empty on MBR.
    pub name: String,
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub kind: TableKind,
    pub partitions: Vec<Part>,
}

/// Why a table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("reading the partition table: {0}")]
    Io(#[from] io::Error),
    #[error("the GPT is corrupt: {0}")]
    Gpt(String),
    #[error("partition {number} ({offset}+{size}) lies outside the {disk}-byte disk")]
    OutOfDisk {
        number: u32,
        offset: u64,
        size: u64,
        disk: u64,
    },
    #[error("partitions {a} and {b} overlap")]
    Overlap { a: u32, b: u32 },
}

/// Adapts a [`ReadAt`] to `Read + Seek` for the GPT reader.
struct Cursor<'a> {
    disk: &'a dyn ReadAt,
    size: u64,
    pos: u64,
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        self.disk.pread(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.size.saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

/// MBR partition types that only hold other partitions or mark a GPT.
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
const MBR_PROTECTIVE: u8 = 0xee;

/// Parses the four primary entries of an MBR sector (`None` without the
/// 0x55AA signature or with no used entry). Extended partitions are left
/// out: their contents are captured as raw data.
pub fn parse_mbr(sector: &[u8]) -> Option<Vec<Part>> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xaa {
        return None;
    }
    let mut parts = Vec::new();
    let mut any = false;
    for i in 0..4 {
        let e = &sector[446 + i * 16..446 + (i + 1) * 16];
        let ty = e[4];
        if ty == 0 {
            continue;
        }
        any = true;
        // Boot flag must be 0x00 or 0x80, else this is a boot sector
        // (a FAT volume's, say), not an MBR.
        if e[0] & 0x7f != 0 {
            return None;
        }
        let lba = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
        let count = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
        if count == 0 || MBR_EXTENDED.contains(&ty) {
            continue;
        }
        parts.push(Part {
            number: i as u32 + 1,
            offset: lba * 512,
            size: count * 512,
            type_id: format!("0x{ty:02x}"),
            name: String::new(),
        });
    }
    any.then_some(parts)
}

/// Reads the table of a disk of `size` bytes: a GPT when the protective
/// MBR or `EFI PART` says so, else an MBR, else none.
pub fn read(disk: &dyn ReadAt, size: u64) -> Result<Table, TableError> {
    let mut head = vec![0u8; 1024.min(size) as usize];
    disk.pread(&mut head, 0)?;
    let gpt_sig = head.len() >= 520 && &head[512..520] == b"EFI PART";
    let mbr = parse_mbr(&head);
    let protective = head.len() >= 512
        && head[510] == 0x55
        && head[511] == 0xaa
        && (0..4).any(|i| head[446 + i * 16 + 4] == MBR_PROTECTIVE);
    let table = if gpt_sig || protective {
        let layout = builder::gpt::read(&mut Cursor { disk, size, pos: 0 })
            .map_err(|e| TableError::Gpt(e.to_string()))?;
        let mut parts: Vec<Part> = layout
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| Part {
                number: i as u32 + 1,
                offset: p.offset(),
                size: p.len(),
                type_id: p.spec.type_guid.to_string(),
                name: p.spec.label.clone(),
            })
            .collect();
        parts.sort_by_key(|p| p.offset);
        Table {
            kind: TableKind::Gpt,
            partitions: parts,
        }
    } else if let Some(mut parts) = mbr {
        parts.sort_by_key(|p| p.offset);
        Table {
            kind: TableKind::Mbr,
            partitions: parts,
        }
    } else {
        Table {
            kind: TableKind::None,
            partitions: vec![Part {
                number: 0,
                offset: 0,
                size,
                type_id: String::new(),
                name: String::new(),
            }],
        }
    };
    for p in &table.partitions {
        if p.offset.checked_add(p.size).is_none_or(|e| e > size) {
            return Err(TableError::OutOfDisk {
                number: p.number,
                offset: p.offset,
                size: p.size,
                disk: size,
            });
        }
    }
    for w in table.partitions.windows(2) {
        if w[0].offset + w[0].size > w[1].offset {
            return Err(TableError::Overlap {
                a: w[0].number,
                b: w[1].number,
            });
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        for (i, (boot, ty, lba, n)) in entries.iter().enumerate() {
            let e = &mut s[446 + i * 16..446 + (i + 1) * 16];
            e[0] = *boot;
            e[4] = *ty;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xaa;
        s
    }

    #[test]
    fn mbr_primaries_without_extended() {
        let s = mbr(&[
            (0x80, 0x83, 2048, 4096),
            (0, 0x05, 8192, 100),
            (0, 0x82, 6144, 2048),
        ]);
        let p = parse_mbr(&s).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].offset, p[0].size), (2048 * 512, 4096 * 512));
        assert_eq!(p[1].type_id, "0x82");
        assert_eq!(p[1].number, 3);
    }

    #[test]
    fn a_boot_sector_is_not_an_mbr() {
        assert!(parse_mbr(&mbr(&[])).is_none());
        assert!(parse_mbr(&mbr(&[(0x33, 0x83, 1, 1)])).is_none());
        let mut s = mbr(&[(0, 0x83, 1, 1)]);
        s[511] = 0;
        assert!(parse_mbr(&s).is_none());
    }

    #[test]
    fn no_table_is_the_whole_disk_and_overlaps_are_refused() {
        let disk = vec![0u8; 8192];
        let t = read(&disk, 8192).unwrap();
        assert_eq!(t.kind, TableKind::None);
        assert_eq!(t.partitions[0].size, 8192);

        let mut d = mbr(&[(0, 0x83, 2, 10), (0, 0x83, 8, 4)]);
        d.resize(1 << 20, 0);
        let e = read(&d, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        let mut d = mbr(&[(0, 0x83, 2, 10_000)]);
        d.resize(1 << 20, 0);
        let e = read(&d, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }
}
