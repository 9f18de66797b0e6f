//! GUID Partition Table: a pure function from a partition layout to the bytes
//! of a protective MBR, the primary and backup GPT headers and entry arrays,
//! and a reader that parses and verifies them again.
//!
//! Choices (fixed, so the same layout always gives the same bytes):
//! - 512-byte logical sectors, 128 entries of 128 bytes (32 sectors), so the
//!   first usable LBA is 34 and the last is `sectors - 34`.
//! - Every partition starts on a 1 MiB boundary; the first at 1 MiB.
//! - `SizeSpec::Bytes` sizes are rounded up to whole sectors.
//! - At most one partition may be `SizeSpec::Fill`, in any position. It takes
//!   what the others leave, rounded down to whole MiB, so partitions after it
//!   stay aligned and a last `Fill` ends on the last whole MiB before the
//!   backup GPT.
//! - GUIDs are inputs (see [`Guid::derive`]); nothing is random.
//! - Only non-zero bytes are written (the sink contract): unused entries,
//!   gaps and partition contents are left alone.

// `%` instead of `is_multiple_of`: the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::sink::Sink;

/// Logical sector size.
pub const SECTOR: u64 = 512;
/// Partition alignment: 1 MiB.
pub const ALIGN: u64 = 1 << 20;
/// Entries in each partition entry array.
pub const ENTRIES: u64 = 128;
/// Bytes per entry.
pub const ENTRY_SIZE: u64 = 128;
const ENTRY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR; // 32
const ALIGN_SECTORS: u64 = ALIGN / SECTOR; // 2048
const HEADER_SIZE: usize = 92;
const MAX_LABEL_UNITS: usize = 36;

/// A GUID, held in its textual (big-endian, RFC 4122) byte order:
/// `C12A7328-F81F-11D2-BA4B-00A0C93EC93B` is `[0xC1, 0x2A, ...]`. On disk
/// GPT stores the first three fields little-endian; see [`Guid::to_disk`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID (marks an unused entry).
    pub const ZERO: Guid = Guid([0; 16]);

    /// From the 128-bit number the textual form spells.
    pub const fn from_u128(v: u128) -> Guid {
        Guid(v.to_be_bytes())
    }

    /// A deterministic GUID: sha256 over the length-prefixed parts, cut to
    /// 16 bytes, with the RFC 4122 variant and version-4 bits set (so tools
    /// treat it like any random GUID). Same parts, same GUID.
    pub fn derive(parts: &[&[u8]]) -> Guid {
        let mut h = Sha256::new();
        h.update(b"builder.gpt.guid\0");
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        Guid(b)
    }

    /// The mixed-endian on-disk encoding used by GPT (and UEFI).
    pub fn to_disk(&self) -> [u8; 16] {
        let g = &self.0;
        let mut d = *g;
        d[0..4].copy_from_slice(&[g[3], g[2], g[1], g[0]]);
        d[4..6].copy_from_slice(&[g[5], g[4]]);
        d[6..8].copy_from_slice(&[g[7], g[6]]);
        d
    }

    /// Decode the mixed-endian on-disk encoding.
    pub fn from_disk(d: &[u8; 16]) -> Guid {
        // The byte swap is its own inverse.
        Guid(Guid(*d).to_disk())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        for (i, b) in g.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Guid {
    type Err = GptError;
    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, either case.
    fn from_str(s: &str) -> Result<Guid, GptError> {
        let err = || GptError::BadGuid(s.to_string());
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return Err(err());
        }
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        let mut out = [0u8; 16];
        hex::decode_to_slice(&hex, &mut out).map_err(|_| err())?;
        Ok(Guid(out))
    }
}

/// Well-known partition type GUIDs (UEFI spec and the Discoverable
/// Partitions Specification).
pub mod types {
    use super::Guid;

    /// EFI System Partition.
    pub const ESP: Guid = Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
    /// Generic Linux filesystem data.
    pub const LINUX_FS: Guid = Guid::from_u128(0x0FC63DAF_8483_4772_8E79_3D69D8477DE4);
    /// Linux root filesystem on x86-64 (auto-discovered by systemd).
    pub const LINUX_ROOT_X86_64: Guid = Guid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
    /// Linux root filesystem on arm64.
    pub const LINUX_ROOT_ARM64: Guid = Guid::from_u128(0xB921B045_1DF0_41C3_AF44_4C6F280D3FAE);
    /// Linux swap.
    pub const LINUX_SWAP: Guid = Guid::from_u128(0x0657FD6D_A4AB_43C4_84E5_0933C84B4F4F);
    /// Linux /home.
    pub const LINUX_HOME: Guid = Guid::from_u128(0x933AC7E1_2EB4_4F13_B844_0E14E2AEF915);
    /// Linux /var.
    pub const LINUX_VAR: Guid = Guid::from_u128(0x4D21B016_B534_45C2_A9FB_5C16E091FD2D);
    /// Extended boot loader partition (XBOOTLDR).
    pub const XBOOTLDR: Guid = Guid::from_u128(0xBC13C2FF_59E6_4262_A352_B275FD6F7172);
    /// BIOS boot partition (GRUB core image on GPT with legacy BIOS).
    pub const BIOS_BOOT: Guid = Guid::from_u128(0x21686148_6449_6E6F_744E_656564454649);

    /// The type GUID for a short name as used in image definitions.
    pub fn by_name(name: &str) -> Option<Guid> {
        Some(match name {
            "esp" => ESP,
            "linux" => LINUX_FS,
            "root-x86-64" => LINUX_ROOT_X86_64,
            "root-arm64" => LINUX_ROOT_ARM64,
            "swap" => LINUX_SWAP,
            "home" => LINUX_HOME,
            "var" => LINUX_VAR,
            "xbootldr" => XBOOTLDR,
            "bios-boot" => BIOS_BOOT,
            _ => return None,
        })
    }
}

/// How big a partition is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeSpec {
    /// This many bytes, rounded up to whole sectors.
    Bytes(u64),
    /// Everything the other partitions leave (at most one per disk).
    Fill,
}

/// A partition as requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    /// Partition name, at most 36 UTF-16 code units.
    pub label: String,
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub guid: Guid,
    pub size: SizeSpec,
    /// GPT attribute bits (bit 0 required, bit 2 legacy BIOS bootable,
    /// 48..63 type-specific).
    pub attributes: u64,
}

/// A partition with its final place on the disk (inclusive LBAs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub spec: PartitionSpec,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Placed {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }

    /// Always false: a placed partition has at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A complete disk layout, ready to [`write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub disk_guid: Guid,
    pub partitions: Vec<Placed>,
}

impl Layout {
    /// Number of 512-byte sectors on the disk.
    pub fn sectors(&self) -> u64 {
        self.disk_size / SECTOR
    }

    /// First LBA a partition may use (34).
    pub fn first_usable_lba(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    /// Last LBA a partition may use (before the backup entry array).
    pub fn last_usable_lba(&self) -> u64 {
        self.sectors() - 2 - ENTRY_SECTORS
    }
}

/// Why a layout could not be planned or a GPT could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("disk size {0} bytes is not a multiple of 512")]
    DiskSizeNotSectorMultiple(u64),
    #[error("disk of {size} bytes is too small for a GPT with 1 MiB-aligned partitions")]
    DiskTooSmall { size: u64 },
    #[error("{0} partitions requested, a GPT here holds at most 128")]
    TooManyPartitions(usize),
    #[error("partition {label:?}: label longer than 36 UTF-16 units")]
    LabelTooLong { label: String },
    #[error("partition {label:?}: size is zero")]
    ZeroSize { label: String },
    #[error("partition {label:?}: {what} GUID is all zeros")]
    ZeroGuid { label: String, what: &'static str },
    #[error("partitions {first:?} and {second:?} have the same partition GUID {guid}")]
    DuplicateGuid {
        first: String,
        second: String,
        guid: Guid,
    },
    #[error("only one partition may fill the rest ({first:?} and {second:?} both do)")]
    TwoFills { first: String, second: String },
    #[error("partitions need {} but the {} disk has {} usable", mib(*need), mib(*disk), mib(*usable))]
    DoesNotFit { need: u64, disk: u64, usable: u64 },
    #[error("partition {label:?} fills the rest, but less than 1 MiB is left ({} of {} usable taken by the others)", mib(*need), mib(*usable))]
    NoRoomForFill {
        label: String,
        need: u64,
        usable: u64,
    },
    #[error("invalid GUID {0:?}: expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX")]
    BadGuid(String),
    #[error("no valid GPT: {0}")]
    Corrupt(String),
    #[error("reading GPT: {0}")]
    Io(#[from] io::Error),
}

/// Bytes as MiB for messages: exact when whole, else one decimal.
fn mib(bytes: u64) -> String {
    if bytes % ALIGN == 0 {
        format!("{} MiB", bytes / ALIGN)
    } else {
        format!("{:.1} MiB", bytes as f64 / ALIGN as f64)
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Place `parts` on a disk of `disk_size` bytes (see the module doc for the
/// rules).
pub fn plan(
    disk_size: u64,
    disk_guid: Guid,
    parts: Vec<PartitionSpec>,
) -> Result<Layout, GptError> {
    if disk_size % SECTOR != 0 {
        return Err(GptError::DiskSizeNotSectorMultiple(disk_size));
    }
    let sectors = disk_size / SECTOR;
    // Room for the primary GPT, 1 MiB of alignment and the backup GPT.
    if sectors < ALIGN_SECTORS + 1 + ENTRY_SECTORS + 1 {
        return Err(GptError::DiskTooSmall { size: disk_size });
    }
    if disk_guid.is_zero() {
        return Err(GptError::ZeroGuid {
            label: "(disk)".into(),
            what: "disk",
        });
    }
    if parts.len() as u64 > ENTRIES {
        return Err(GptError::TooManyPartitions(parts.len()));
    }
    let last_usable = sectors - 2 - ENTRY_SECTORS;
    // Partitions end before the last MiB boundary at or below the backup GPT.
    let end_limit = (last_usable + 1) / ALIGN_SECTORS * ALIGN_SECTORS;
    let usable = end_limit.saturating_sub(ALIGN_SECTORS);

    let mut fill: Option<usize> = None;
    for (i, p) in parts.iter().enumerate() {
        if p.label.encode_utf16().count() > MAX_LABEL_UNITS {
            return Err(GptError::LabelTooLong {
                label: p.label.clone(),
            });
        }
        if p.type_guid.is_zero() {
            return Err(GptError::ZeroGuid {
                label: p.label.clone(),
                what: "type",
            });
        }
        if p.guid.is_zero() {
            return Err(GptError::ZeroGuid {
                label: p.label.clone(),
                what: "partition",
            });
        }
        if let Some(q) = parts[..i].iter().find(|q| q.guid == p.guid) {
            return Err(GptError::DuplicateGuid {
                first: q.label.clone(),
                second: p.label.clone(),
                guid: p.guid,
            });
        }
        match p.size {
            SizeSpec::Bytes(0) => {
                return Err(GptError::ZeroSize {
                    label: p.label.clone(),
                })
            }
            SizeSpec::Bytes(_) => {}
            SizeSpec::Fill => {
                if let Some(f) = fill {
                    return Err(GptError::TwoFills {
                        first: parts[f].label.clone(),
                        second: p.label.clone(),
                    });
                }
                fill = Some(i);
            }
        }
    }

    // Pass 1 with the fill at zero length: where everything would end.
    let place = |fill_sectors: u64| -> Vec<(u64, u64)> {
        let mut cursor = ALIGN_SECTORS;
        parts
            .iter()
            .map(|p| {
                let start = align_up(cursor, ALIGN_SECTORS);
                let len = match p.size {
                    SizeSpec::Bytes(b) => b.div_ceil(SECTOR),
                    SizeSpec::Fill => fill_sectors,
                };
                cursor = start + len;
                (start, len)
            })
            .collect()
    };
    let dry = place(0);
    // The end of the last partition, or the (aligned) start after which the
    // fill would begin if it came last with nothing after it.
    let end = dry
        .iter()
        .map(|&(s, l)| s + l)
        .max()
        .unwrap_or(ALIGN_SECTORS);
    let raw_end = end; // the last partition may end unaligned
    let need = (raw_end - ALIGN_SECTORS) * SECTOR;
    // Without a fill the last partition may run up to the last usable LBA.
    let limit = if fill.is_none() {
        last_usable + 1
    } else {
        end_limit
    };
    if raw_end > limit {
        return Err(GptError::DoesNotFit {
            need,
            disk: disk_size,
            usable: usable * SECTOR,
        });
    }
    let placed = match fill {
        None => dry,
        Some(fi) => {
            // Partitions after the fill keep their alignment if the fill is
            // a whole number of MiB.
            let slack = end_limit.saturating_sub(align_up(raw_end, ALIGN_SECTORS));
            let slack = slack / ALIGN_SECTORS * ALIGN_SECTORS;
            if slack == 0 {
                return Err(GptError::NoRoomForFill {
                    label: parts[fi].label.clone(),
                    need,
                    usable: usable * SECTOR,
                });
            }
            place(slack)
        }
    };
    let partitions = parts
        .into_iter()
        .zip(placed)
        .map(|(spec, (start, len))| Placed {
            spec,
            first_lba: start,
            last_lba: start + len - 1,
        })
        .collect();
    Ok(Layout {
        disk_size,
        disk_guid,
        partitions,
    })
}

/// The partition entry array (all 128 entries, 16 KiB).
fn entry_array(layout: &Layout) -> Vec<u8> {
    let mut a = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    for (i, p) in layout.partitions.iter().enumerate() {
        let e = &mut a[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&p.spec.type_guid.to_disk());
        e[16..32].copy_from_slice(&p.spec.guid.to_disk());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.spec.attributes.to_le_bytes());
        for (j, u) in p
            .spec
            .label
            .encode_utf16()
            .take(MAX_LABEL_UNITS)
            .enumerate()
        {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    a
}

/// One 512-byte header sector.
fn header(
    layout: &Layout,
    my_lba: u64,
    alt_lba: u64,
    entries_lba: u64,
    entries_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&layout.first_usable_lba().to_le_bytes());
    h[48..56].copy_from_slice(&layout.last_usable_lba().to_le_bytes());
    h[56..72].copy_from_slice(&layout.disk_guid.to_disk());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The protective MBR sector.
fn protective_mbr(layout: &Layout) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR as usize];
    let e = &mut m[446..462];
    e[0] = 0x00; // not bootable
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    e[4] = 0xEE;
    e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]); // CHS "beyond 8 GiB"
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = (layout.sectors() - 1).min(0xFFFF_FFFF) as u32;
    e[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// The first 34 sectors of the disk: protective MBR, primary header and
/// the full entry array (17 KiB). For writers that lay down partition
/// contents first and the partition table last.
pub fn primary_region(layout: &Layout) -> Vec<u8> {
    let entries = entry_array(layout);
    let crc = crc32fast::hash(&entries);
    let mut out = protective_mbr(layout);
    out.extend(header(layout, 1, layout.sectors() - 1, 2, crc));
    out.extend(entries);
    out
}

/// The backup entry array plus backup header (the last 33 sectors), and
/// the byte offset where they go.
pub fn backup_region(layout: &Layout) -> (u64, Vec<u8>) {
    let entries = entry_array(layout);
    let crc = crc32fast::hash(&entries);
    let last = layout.sectors() - 1;
    let entries_lba = last - ENTRY_SECTORS;
    let mut out = entries;
    out.extend(header(layout, last, 1, entries_lba, crc));
    (entries_lba * SECTOR, out)
}

/// Write the protective MBR, primary and backup GPT. Only sectors that are
/// not all zero are written (unused entries stay holes).
pub fn write(layout: &Layout, sink: &mut dyn Sink) -> io::Result<()> {
    write_nonzero(sink, 0, &primary_region(layout))?;
    let (off, backup) = backup_region(layout);
    write_nonzero(sink, off, &backup)
}

/// Write `data` at `offset`, skipping all-zero sectors.
fn write_nonzero(sink: &mut dyn Sink, offset: u64, data: &[u8]) -> io::Result<()> {
    let s = SECTOR as usize;
    let mut i = 0;
    while i < data.len() {
        if data[i..(i + s).min(data.len())].iter().all(|&b| b == 0) {
            i += s;
            continue;
        }
        let mut j = i + s;
        while j < data.len() && !data[j..(j + s).min(data.len())].iter().all(|&b| b == 0) {
            j += s;
        }
        let j = j.min(data.len());
        sink.write_at(offset + i as u64, &data[i..j])?;
        i = j;
    }
    Ok(())
}

/// Read and verify the primary GPT (header and entry CRCs, signature,
/// geometry) of a disk image. Partitions come back with
/// `SizeSpec::Bytes` of their exact length.
pub fn read(disk: &mut (impl Read + Seek)) -> Result<Layout, GptError> {
    let bad = |why: String| GptError::Corrupt(why);
    let disk_size = disk.seek(SeekFrom::End(0))?;
    let sectors = disk_size / SECTOR;
    if sectors < 2 + 2 * ENTRY_SECTORS + 1 {
        return Err(bad(format!("{disk_size}-byte disk is too small")));
    }
    let mut h = [0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.read_exact(&mut h)?;
    if &h[0..8] != b"EFI PART" {
        return Err(bad("no \"EFI PART\" signature at LBA 1".into()));
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let hsize = u32_at(&h, 12) as usize;
    if !(HEADER_SIZE..=SECTOR as usize).contains(&hsize) {
        return Err(bad(format!("header size {hsize}")));
    }
    let stored = u32_at(&h, 16);
    let mut hc = h;
    hc[16..20].fill(0);
    let crc = crc32fast::hash(&hc[..hsize]);
    if crc != stored {
        return Err(bad(format!(
            "primary header CRC32 is {stored:#010x}, computed {crc:#010x}"
        )));
    }
    if u64_at(&h, 24) != 1 {
        return Err(bad(format!(
            "primary header says it is at LBA {}",
            u64_at(&h, 24)
        )));
    }
    let first_usable = u64_at(&h, 40);
    let last_usable = u64_at(&h, 48);
    if last_usable >= sectors || first_usable > last_usable {
        return Err(bad(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit a {sectors}-sector disk"
        )));
    }
    let disk_guid = Guid::from_disk(h[56..72].try_into().unwrap());
    let entries_lba = u64_at(&h, 72);
    let count = u32_at(&h, 80) as u64;
    let esize = u32_at(&h, 84) as u64;
    if esize < 128 || esize % 8 != 0 || count > 1024 || entries_lba >= sectors {
        return Err(bad(format!(
            "entry array of {count} entries of {esize} bytes at LBA {entries_lba}"
        )));
    }
    let mut entries = vec![0u8; (count * esize) as usize];
    disk.seek(SeekFrom::Start(entries_lba * SECTOR))?;
    disk.read_exact(&mut entries)?;
    let ecrc = crc32fast::hash(&entries);
    if ecrc != u32_at(&h, 88) {
        return Err(bad(format!(
            "entry array CRC32 is {:#010x}, computed {ecrc:#010x}",
            u32_at(&h, 88)
        )));
    }
    let mut partitions = Vec::new();
    for e in entries.chunks(esize as usize) {
        let type_guid = Guid::from_disk(e[0..16].try_into().unwrap());
        if type_guid.is_zero() {
            continue;
        }
        let first_lba = u64_at(e, 32);
        let last_lba = u64_at(e, 40);
        if first_lba > last_lba || last_lba > last_usable || first_lba < first_usable {
            return Err(bad(format!(
                "partition at LBAs {first_lba}..={last_lba} outside {first_usable}..={last_usable}"
            )));
        }
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        partitions.push(Placed {
            spec: PartitionSpec {
                label: String::from_utf16_lossy(&units),
                type_guid,
                guid: Guid::from_disk(e[16..32].try_into().unwrap()),
                size: SizeSpec::Bytes((last_lba + 1 - first_lba) * SECTOR),
                attributes: u64_at(e, 48),
            },
            first_lba,
            last_lba,
        });
    }
    Ok(Layout {
        disk_size,
        disk_guid,
        partitions,
    })
}

/// Read the primary GPT of a disk of `disk_size` bytes from its first
/// bytes `head` (everything past `head` reads as zeros). For writers that
/// hold the head of an image in memory.
pub fn read_head(head: &[u8], disk_size: u64) -> Result<Layout, GptError> {
    read(&mut HeadDisk {
        head,
        size: disk_size,
        pos: 0,
    })
}

/// A disk of `size` bytes whose first bytes are `head`, zeros after.
struct HeadDisk<'a> {
    head: &'a [u8],
    size: u64,
    pos: u64,
}

impl Read for HeadDisk<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self.head.get(self.pos as usize + i).copied().unwrap_or(0);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for HeadDisk<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.size.saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

/// `layout` moved to a disk of `disk_size` bytes (at least its own): the
/// backup GPT goes to the new end and the partition that ends last grows
/// to the last whole MiB before it (as a last `Fill` would). GUIDs and
/// every other partition stay as they are.
pub fn grow(layout: &Layout, disk_size: u64) -> Result<Layout, GptError> {
    if disk_size % SECTOR != 0 {
        return Err(GptError::DiskSizeNotSectorMultiple(disk_size));
    }
    if disk_size < layout.disk_size {
        return Err(GptError::DiskTooSmall { size: disk_size });
    }
    let mut grown = Layout {
        disk_size,
        disk_guid: layout.disk_guid,
        partitions: layout.partitions.clone(),
    };
    let last_usable = grown.last_usable_lba();
    let end_limit = (last_usable + 1) / ALIGN_SECTORS * ALIGN_SECTORS;
    if let Some(p) = grown.partitions.iter_mut().max_by_key(|p| p.last_lba) {
        if end_limit > p.last_lba + 1 {
            p.last_lba = end_limit - 1;
            p.spec.size = SizeSpec::Bytes((p.last_lba + 1 - p.first_lba) * SECTOR);
        }
    }
    Ok(grown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn part(label: &str, ty: Guid, size: SizeSpec) -> PartitionSpec {
        PartitionSpec {
            label: label.into(),
            type_guid: ty,
            guid: Guid::derive(&[b"test", label.as_bytes()]),
            size,
            attributes: 0,
        }
    }

    fn disk_guid() -> Guid {
        Guid::derive(&[b"disk"])
    }

    #[test]
    fn guid_text_and_disk_encoding() {
        let esp: Guid = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".parse().unwrap();
        assert_eq!(esp, types::ESP);
        assert_eq!(
            esp.to_disk(),
            [
                0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
                0xC9, 0x3B
            ]
        );
        assert_eq!(Guid::from_disk(&esp.to_disk()), esp);
        assert_eq!(esp.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
                .parse::<Guid>()
                .unwrap(),
            esp
        );
        for bad in [
            "",
            "C12A7328F81F11D2BA4B00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93G",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad:?}");
        }
        assert_eq!(types::by_name("esp"), Some(types::ESP));
        assert_eq!(types::by_name("bios-boot"), Some(types::BIOS_BOOT));
        assert_eq!(types::by_name("nope"), None);
    }

    #[test]
    fn derived_guids_are_deterministic_v4() {
        let a = Guid::derive(&[b"a", b"bc"]);
        assert_eq!(a, Guid::derive(&[b"a", b"bc"]));
        assert_ne!(a, Guid::derive(&[b"ab", b"c"]));
        assert_eq!(a.0[6] >> 4, 4);
        assert_eq!(a.0[8] >> 6, 0b10);
    }

    #[test]
    fn plan_aligns_and_fills() {
        let l = plan(
            2048 * MIB,
            disk_guid(),
            vec![
                part("esp", types::ESP, SizeSpec::Bytes(64 * MIB)),
                part("odd", types::LINUX_FS, SizeSpec::Bytes(1000)),
                part("data", types::LINUX_FS, SizeSpec::Fill),
                part("tail", types::LINUX_SWAP, SizeSpec::Bytes(10 * MIB)),
            ],
        )
        .unwrap();
        let p = &l.partitions;
        assert_eq!((p[0].offset(), p[0].len()), (MIB, 64 * MIB));
        // 1000 bytes round up to 2 sectors.
        assert_eq!((p[1].offset(), p[1].len()), (65 * MIB, 1024));
        // Fill starts at the next MiB and leaves room for "tail" before the
        // last whole MiB (2047).
        assert_eq!(p[2].offset(), 66 * MIB);
        assert_eq!(p[3].offset() + p[3].len(), 2047 * MIB);
        assert_eq!(p[2].offset() + p[2].len(), p[3].offset());
        for q in p {
            assert_eq!(q.offset() % MIB, 0);
        }
        // Fill last: ends at the last whole MiB before the backup GPT.
        let l = plan(
            2048 * MIB,
            disk_guid(),
            vec![part("data", types::LINUX_FS, SizeSpec::Fill)],
        )
        .unwrap();
        assert_eq!(l.partitions[0].len(), 2046 * MIB);
    }

    #[test]
    fn plan_errors() {
        let e = plan(
            2048 * MIB,
            disk_guid(),
            vec![
                part("esp", types::ESP, SizeSpec::Bytes(214 * MIB)),
                part("data", types::LINUX_FS, SizeSpec::Bytes(2000 * MIB)),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "partitions need 2214 MiB but the 2048 MiB disk has 2046 MiB usable"
        );
        let e = plan(
            2048 * MIB,
            disk_guid(),
            vec![
                part("a", types::LINUX_FS, SizeSpec::Fill),
                part("b", types::LINUX_FS, SizeSpec::Fill),
            ],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("only one partition may fill the rest"),
            "{e}"
        );
        let e = plan(
            2048 * MIB,
            disk_guid(),
            vec![part(&"x".repeat(37), types::LINUX_FS, SizeSpec::Fill)],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("label longer than 36 UTF-16 units"),
            "{e}"
        );
        let e = plan(
            64 * MIB,
            disk_guid(),
            vec![
                part("big", types::LINUX_FS, SizeSpec::Bytes(62 * MIB)),
                part("data", types::LINUX_FS, SizeSpec::Fill),
            ],
        )
        .unwrap_err();
        assert!(matches!(e, GptError::NoRoomForFill { .. }), "{e}");
        assert!(matches!(
            plan(1000, disk_guid(), vec![]),
            Err(GptError::DiskSizeNotSectorMultiple(1000))
        ));
        assert!(matches!(
            plan(512 * 1024, disk_guid(), vec![]),
            Err(GptError::DiskTooSmall { .. })
        ));
        let mut dup = part("a", types::LINUX_FS, SizeSpec::Bytes(MIB));
        let mut dup2 = dup.clone();
        dup2.label = "b".into();
        assert!(matches!(
            plan(64 * MIB, disk_guid(), vec![dup.clone(), dup2]),
            Err(GptError::DuplicateGuid { .. })
        ));
        dup.size = SizeSpec::Bytes(0);
        assert!(matches!(
            plan(64 * MIB, disk_guid(), vec![dup]),
            Err(GptError::ZeroSize { .. })
        ));
    }

    #[test]
    fn last_partition_may_end_unaligned_before_backup() {
        // Without a fill, a sized last partition may use the tail up to the
        // last usable LBA.
        let sectors = 4 * 2048;
        let l = plan(
            sectors * SECTOR,
            disk_guid(),
            vec![part(
                "a",
                types::LINUX_FS,
                SizeSpec::Bytes((sectors - 2048 - 33) * SECTOR),
            )],
        )
        .unwrap();
        assert_eq!(l.partitions[0].last_lba, l.last_usable_lba());
        assert!(plan(
            sectors * SECTOR,
            disk_guid(),
            vec![part(
                "a",
                types::LINUX_FS,
                SizeSpec::Bytes((sectors - 2048 - 32) * SECTOR)
            )],
        )
        .is_err());
    }

    fn sample() -> Layout {
        let mut esp = part("ESP", types::ESP, SizeSpec::Bytes(64 * MIB));
        esp.attributes = 1;
        plan(
            2048 * MIB,
            disk_guid(),
            vec![esp, part("data-é", types::LINUX_FS, SizeSpec::Fill)],
        )
        .unwrap()
    }

    #[test]
    fn write_read_round_trip() {
        let l = sample();
        let mut v = Vec::new();
        write(&l, &mut v).unwrap();
        v.resize(l.disk_size as usize, 0);
        let mut back = read(&mut io::Cursor::new(&v)).unwrap();
        assert_eq!(back.disk_guid, l.disk_guid);
        assert_eq!(back.disk_size, l.disk_size);
        // Sizes come back exact; the Fill becomes its bytes.
        back.partitions[1].spec.size = SizeSpec::Fill;
        assert_eq!(back.partitions, l.partitions);
        // primary_region is what write puts at 0.
        let pr = primary_region(&l);
        assert_eq!(&v[..pr.len()], &pr[..]);
        // MBR: one 0xEE partition, capped size.
        assert_eq!(v[446 + 4], 0xEE);
        assert_eq!(&v[510..512], &[0x55, 0xAA]);
        // Corruption is detected.
        let mut c = v.clone();
        c[2 * 512 + 60] ^= 1;
        assert!(read(&mut io::Cursor::new(&c))
            .unwrap_err()
            .to_string()
            .contains("entry array CRC32"));
        let mut c = v.clone();
        c[512 + 40] ^= 1;
        assert!(read(&mut io::Cursor::new(&c))
            .unwrap_err()
            .to_string()
            .contains("header CRC32"));
    }

    #[test]
    fn grow_moves_the_backup_and_extends_the_last_partition() {
        let l = sample();
        let head = primary_region(&l);
        let back = read_head(&head, l.disk_size).unwrap();
        assert_eq!(back.partitions.len(), 2);
        assert_eq!(back.partitions[1].last_lba, l.partitions[1].last_lba);
        let g = grow(&back, 3072 * MIB).unwrap();
        assert_eq!(g.partitions[0], back.partitions[0]);
        assert_eq!(g.partitions[1].first_lba, l.partitions[1].first_lba);
        assert_eq!((g.partitions[1].last_lba + 1) * SECTOR, 3071 * MIB);
        // Same size: nothing moves.
        assert_eq!(grow(&back, l.disk_size).unwrap(), back);
        assert!(grow(&back, MIB).is_err());
        // The grown table reads back from a disk of the new size, and
        // sgdisk finds nothing wrong with it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grown.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(g.disk_size).unwrap();
        write(&g, &mut f).unwrap();
        drop(f);
        let mut f = std::fs::File::open(&path).unwrap();
        assert_eq!(read(&mut f).unwrap(), g);
        let v = run("sgdisk", &["-v", path.to_str().unwrap()]);
        assert!(v.contains("No problems found"), "{v}");
    }

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
            panic!("`{cmd}` is required for this test (apt-get install gdisk fdisk): {e}")
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
        text
    }

    #[test]
    fn sgdisk_and_sfdisk_accept_the_table() {
        let l = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(l.disk_size).unwrap();
        write(&l, &mut f).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let p = path.to_str().unwrap();

        let v = run("sgdisk", &["-v", p]);
        assert!(v.contains("No problems found"), "{v}");
        let pr = run("sgdisk", &["-p", p]);
        assert!(
            pr.contains(&format!("Disk identifier (GUID): {}", l.disk_guid)),
            "{pr}"
        );
        // Number  Start (sector)    End (sector)  Size       Code  Name
        assert!(
            pr.contains("   1            2048          133119   64.0 MiB    EF00  ESP"),
            "{pr}"
        );
        assert!(pr.contains("   2          133120         4192255"), "{pr}");
        assert!(pr.contains("8300  data-é"), "{pr}");
        let info = run("sgdisk", &["-i", "2", p]);
        assert!(
            info.contains(&format!(
                "Partition unique GUID: {}",
                l.partitions[1].spec.guid
            )),
            "{info}"
        );

        let js = run("sfdisk", &["--json", p]);
        let j: serde_json::Value = serde_json::from_str(&js).unwrap();
        let t = &j["partitiontable"];
        assert_eq!(t["label"], "gpt");
        assert_eq!(t["id"], l.disk_guid.to_string());
        assert_eq!(t["firstlba"], 34);
        assert_eq!(t["lastlba"], l.last_usable_lba());
        let parts = t["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        for (jp, lp) in parts.iter().zip(&l.partitions) {
            assert_eq!(jp["start"], lp.first_lba);
            assert_eq!(jp["size"], lp.last_lba + 1 - lp.first_lba);
            assert_eq!(jp["type"], lp.spec.type_guid.to_string());
            assert_eq!(jp["uuid"], lp.spec.guid.to_string());
            assert_eq!(jp["name"], lp.spec.label);
        }
        assert_eq!(parts[0]["attrs"], "RequiredPartition");

        // Sparse: the 2 GiB image holds a few KiB.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks * 512 <= 256 * 1024, "{blocks} blocks allocated");
    }
}
