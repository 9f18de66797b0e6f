//! An ISO 9660 writer for hybrid boot media: one image that boots as a CD
//! (El Torito, UEFI entry) and, written to a USB stick, as a GPT disk.
//!
//! Layout, in 2048-byte blocks (documented in ARCHITECTURE.md, "ISO
//! image"):
//!
//! | block | what |
//! | --- | --- |
//! | 0-15 | system area: protective MBR and primary GPT (first 17 KiB) |
//! | 16 | primary volume descriptor |
//! | 17 | El Torito boot record volume descriptor |
//! | 18 | volume descriptor set terminator |
//! | 19 | type L path table |
//! | 20 | type M path table |
//! | 21.. | root directory |
//! | next | El Torito boot catalog (`BOOT.CAT`) |
//! | next.. | the files, in the order given; a file that is also a GPT partition starts on a 1 MiB boundary |
//! | last 33 sectors (512 B) | backup GPT |
//!
//! Only a root directory is written (every file is a root entry with an
//! ISO 9660 level 2 name, upper-case d-characters and `;1`); no Rock Ridge
//! or Joliet. The boot catalog has one entry: a validation entry for
//! platform 0xEF (UEFI) and a no-emulation default entry pointing at the
//! file marked `efi_boot` (a FAT image with `EFI/BOOT/BOOTX64.EFI`). The
//! same file is the GPT's EFI system partition, so firmware booting the
//! image as a disk finds the same loader.
//!
//! Reproducible: every date is the given epoch; GUIDs are the caller's
//! (derived from content). The writer emits in ascending order and settles
//! as it goes ([`Sink::settle`]), so the image is hashed while written.
//!
//! `appliance/src/iso9660.rs` is the reader; `tests/tests/iso.rs` checks
//! this writer with xorriso, isoinfo, osirrox, sgdisk and fsck.fat.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::gpt::{self, Guid, PartitionSpec, Placed, SizeSpec};
use crate::sink::Sink;

/// Bytes in an ISO 9660 logical block.
pub const BLOCK: u64 = 2048;
const SECTOR: u64 = 512;
/// Where a file that is also a partition starts.
const PARTITION_ALIGN: u64 = 1 << 20;
const ROOT_LBA: u64 = 21;
/// Sectors the backup GPT takes at the end (entry array and header).
const BACKUP_GPT: u64 = 33 * SECTOR;
/// The most 512-byte sectors a boot catalog entry can say it loads.
const MAX_LOAD_SECTORS: u64 = 0xFFFF;

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("file name {0:?}: use 1-30 characters A-Z 0-9 _ with at most one dot")]
    BadName(String),
    #[error("file name {0:?} appears twice")]
    DuplicateName(String),
    #[error("volume id {0:?}: use 1-32 characters A-Z 0-9 _")]
    BadVolumeId(String),
    #[error("file {0:?} is 4 GiB or larger (ISO 9660 needs multi-extent files for that, not written here)")]
    TooLarge(String),
    #[error("{0} files are marked as the EFI boot image; exactly one must be")]
    BootImages(usize),
    #[error("{name:?}: source range is {got} bytes, the file says {want}")]
    ShortSource { name: String, got: u64, want: u64 },
    #[error("hybrid partition table: {0}")]
    Gpt(#[from] gpt::GptError),
    #[error("writing the ISO image: {0}")]
    Io(#[from] io::Error),
}

/// Where a file's bytes come from.
pub enum IsoData<'a> {
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `offset` (all-zero stretches are not
    /// copied: the sink is all zero already).
    Range {
        file: &'a File,
        offset: u64,
        len: u64,
    },
}

impl IsoData<'_> {
    pub fn len(&self) -> u64 {
        match self {
            IsoData::Bytes(b) => b.len() as u64,
            IsoData::Range { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One file of the root directory.
pub struct IsoFile<'a> {
    /// ISO 9660 name without the `;1` version, e.g. `ESP.IMG`.
    pub name: String,
    pub data: IsoData<'a>,
    /// When set, the file is also this partition of the hybrid GPT (the
    /// spec's `size` is ignored: the partition is the file).
    pub partition: Option<PartitionSpec>,
    /// The El Torito UEFI boot image (a FAT filesystem image).
    pub efi_boot: bool,
}

pub struct IsoOptions {
    /// Volume identifier (d-characters).
    pub volume_id: String,
    /// Every timestamp, seconds since 1970.
    pub epoch: i64,
    /// The hybrid GPT's disk GUID.
    pub disk_guid: Guid,
}

/// Where each file went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedFile {
    pub name: String,
    pub lba: u64,
    pub len: u64,
}

impl PlacedFile {
    pub fn offset(&self) -> u64 {
        self.lba * BLOCK
    }
}

/// The complete plan of an image, computed before anything is written.
#[derive(Debug, Clone)]
pub struct IsoLayout {
    /// Image size in bytes (a multiple of 2048).
    pub size: u64,
    pub root_blocks: u64,
    pub catalog_lba: u64,
    /// In the order of the files given.
    pub files: Vec<PlacedFile>,
    /// Index of the boot image in `files`.
    pub boot: usize,
    pub gpt: gpt::Layout,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 30
        && n.matches('.').count() <= 1
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// The directory record length for an identifier of `n` bytes.
fn record_len(n: usize) -> u64 {
    (33 + n + usize::from(n.is_multiple_of(2))) as u64
}

/// Place the files (names checked, sorted as ISO 9660 wants in the
/// directory; data kept in the order given).
pub fn plan(opts: &IsoOptions, files: &[IsoFile<'_>]) -> Result<IsoLayout, IsoError> {
    let lens: Vec<u64> = files.iter().map(|f| f.data.len()).collect();
    plan_lengths(opts, files, &lens)
}

/// [`plan`] with each file's length given (its data is not looked at),
/// for planning before the data exists.
pub fn plan_lengths(
    opts: &IsoOptions,
    files: &[IsoFile<'_>],
    lens: &[u64],
) -> Result<IsoLayout, IsoError> {
    if opts.volume_id.is_empty()
        || opts.volume_id.len() > 32
        || !opts
            .volume_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(IsoError::BadVolumeId(opts.volume_id.clone()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        if !valid_name(&f.name) || f.name == "BOOT.CAT" {
            return Err(IsoError::BadName(f.name.clone()));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(IsoError::DuplicateName(f.name.clone()));
        }
    }
    for (f, &len) in files.iter().zip(lens) {
        if len > u32::MAX as u64 {
            return Err(IsoError::TooLarge(f.name.clone()));
        }
    }
    let boots: Vec<usize> = (0..files.len()).filter(|&i| files[i].efi_boot).collect();
    if boots.len() != 1 {
        return Err(IsoError::BootImages(boots.len()));
    }
    // Root directory: ".", "..", the catalog and every file; records do
    // not cross a block.
    let mut names: Vec<String> = files.iter().map(|f| format!("{};1", f.name)).collect();
    names.push("BOOT.CAT;1".into());
    let mut blocks = 1u64;
    let mut used = 2 * record_len(1);
    for n in &names {
        let l = record_len(n.len());
        if used + l > BLOCK {
            blocks += 1;
            used = 0;
        }
        used += l;
    }
    let catalog_lba = ROOT_LBA + blocks;
    let mut at = (catalog_lba + 1) * BLOCK;
    let mut placed = Vec::new();
    let mut parts = Vec::new();
    for (f, &len) in files.iter().zip(lens) {
        if f.partition.is_some() {
            at = align(at, PARTITION_ALIGN);
        }
        placed.push(PlacedFile {
            name: f.name.clone(),
            lba: at / BLOCK,
            len,
        });
        if let Some(spec) = &f.partition {
            let end = align(at + len.max(1), SECTOR);
            parts.push(Placed {
                spec: PartitionSpec {
                    size: SizeSpec::Bytes(end - at),
                    ..spec.clone()
                },
                first_lba: at / SECTOR,
                last_lba: end / SECTOR - 1,
            });
        }
        at = align(at + len, BLOCK);
    }
    let size = align(at + BACKUP_GPT, BLOCK);
    Ok(IsoLayout {
        size,
        root_blocks: blocks,
        catalog_lba,
        files: placed,
        boot: boots[0],
        gpt: gpt::Layout {
            disk_size: size,
            disk_guid: opts.disk_guid,
            partitions: parts,
        },
    })
}

/// The 7-byte date of a directory record.
fn record_date(epoch: i64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = crate::civil::civil(epoch);
    [
        (y - 1900).clamp(0, 255) as u8,
        mo as u8,
        d as u8,
        h as u8,
        mi as u8,
        s as u8,
        0,
    ]
}

/// The 17-byte date of a volume descriptor.
fn descriptor_date(epoch: i64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = crate::civil::civil(epoch);
    let text = format!("{:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00", y.clamp(0, 9999));
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(text.as_bytes());
    out
}

fn both32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_le_bytes());
    b[4..8].copy_from_slice(&v.to_be_bytes());
}

fn both16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_le_bytes());
    b[2..4].copy_from_slice(&v.to_be_bytes());
}

fn dir_record(ident: &[u8], lba: u64, len: u64, dir: bool, epoch: i64) -> Vec<u8> {
    let mut r = vec![0u8; record_len(ident.len()) as usize];
    r[0] = r.len() as u8;
    both32(&mut r[2..10], lba as u32);
    both32(&mut r[10..18], len as u32);
    r[18..25].copy_from_slice(&record_date(epoch));
    r[25] = if dir { 0x02 } else { 0 };
    both16(&mut r[28..32], 1);
    r[32] = ident.len() as u8;
    r[33..33 + ident.len()].copy_from_slice(ident);
    r
}

fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    v.resize(len, b' ');
    v
}

fn primary_descriptor(opts: &IsoOptions, layout: &IsoLayout) -> Vec<u8> {
    let mut d = vec![0u8; BLOCK as usize];
    d[0] = 1;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[8..40].copy_from_slice(&padded("", 32));
    d[40..72].copy_from_slice(&padded(&opts.volume_id, 32));
    both32(&mut d[80..88], (layout.size / BLOCK) as u32);
    both16(&mut d[120..124], 1);
    both16(&mut d[124..128], 1);
    both16(&mut d[128..132], BLOCK as u16);
    both32(&mut d[132..140], 10);
    d[140..144].copy_from_slice(&19u32.to_le_bytes());
    d[148..152].copy_from_slice(&20u32.to_be_bytes());
    let root = dir_record(&[0], ROOT_LBA, layout.root_blocks * BLOCK, true, opts.epoch);
    d[156..190].copy_from_slice(&root);
    d[190..318].copy_from_slice(&padded("", 128));
    d[318..446].copy_from_slice(&padded("", 128));
    d[446..574].copy_from_slice(&padded("", 128));
    d[574..702].copy_from_slice(&padded("APPLIANCE BUILDER", 128));
    d[702..813].copy_from_slice(&padded("", 111));
    let date = descriptor_date(opts.epoch);
    d[813..830].copy_from_slice(&date);
    d[830..847].copy_from_slice(&date);
    d[847..863].copy_from_slice(b"0000000000000000");
    d[864..880].copy_from_slice(b"0000000000000000");
    d[881] = 1;
    d
}

fn boot_record(layout: &IsoLayout) -> Vec<u8> {
    let mut d = vec![0u8; BLOCK as usize];
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[7..30].copy_from_slice(b"EL TORITO SPECIFICATION");
    d[71..75].copy_from_slice(&(layout.catalog_lba as u32).to_le_bytes());
    d
}

fn terminator() -> Vec<u8> {
    let mut d = vec![0u8; BLOCK as usize];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

fn path_table(big_endian: bool) -> Vec<u8> {
    let mut t = vec![0u8; BLOCK as usize];
    t[0] = 1;
    let lba = ROOT_LBA as u32;
    if big_endian {
        t[2..6].copy_from_slice(&lba.to_be_bytes());
        t[6..8].copy_from_slice(&1u16.to_be_bytes());
    } else {
        t[2..6].copy_from_slice(&lba.to_le_bytes());
        t[6..8].copy_from_slice(&1u16.to_le_bytes());
    }
    t
}

/// The boot catalog: validation entry (platform 0xEF) and the default
/// entry, no emulation, loading the boot image.
pub fn boot_catalog(layout: &IsoLayout) -> Vec<u8> {
    let mut c = vec![0u8; BLOCK as usize];
    c[0] = 1;
    c[1] = 0xEF;
    c[30] = 0x55;
    c[31] = 0xAA;
    let sum = c[..32].chunks(2).fold(0u16, |s, w| {
        s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    c[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    let boot = &layout.files[layout.boot];
    let e = &mut c[32..64];
    e[0] = 0x88;
    let sectors = boot.len.div_ceil(SECTOR).min(MAX_LOAD_SECTORS) as u16;
    e[6..8].copy_from_slice(&sectors.to_le_bytes());
    e[8..12].copy_from_slice(&(boot.lba as u32).to_le_bytes());
    c
}

fn root_directory(opts: &IsoOptions, layout: &IsoLayout) -> Vec<u8> {
    let mut entries: Vec<(String, u64, u64)> = layout
        .files
        .iter()
        .map(|f| (format!("{};1", f.name), f.lba, f.len))
        .collect();
    entries.push(("BOOT.CAT;1".into(), layout.catalog_lba, BLOCK));
    entries.sort();
    let mut out = vec![0u8; (layout.root_blocks * BLOCK) as usize];
    let dir_len = layout.root_blocks * BLOCK;
    let mut at = 0usize;
    for ident in [&[0u8][..], &[1u8][..]] {
        let r = dir_record(ident, ROOT_LBA, dir_len, true, opts.epoch);
        out[at..at + r.len()].copy_from_slice(&r);
        at += r.len();
    }
    for (name, lba, len) in entries {
        let r = dir_record(name.as_bytes(), lba, len, false, opts.epoch);
        if at % BLOCK as usize + r.len() > BLOCK as usize {
            at = align(at as u64, BLOCK) as usize;
        }
        out[at..at + r.len()].copy_from_slice(&r);
        at += r.len();
    }
    out
}

/// Write `bytes` at `offset`, skipping all-zero 4 KiB pieces.
fn write_nonzero(sink: &mut dyn Sink, offset: u64, bytes: &[u8]) -> io::Result<()> {
    for (i, piece) in bytes.chunks(4096).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            sink.write_at(offset + (i * 4096) as u64, piece)?;
        }
    }
    Ok(())
}

/// Write the image planned by [`plan`] into `sink` (all zero, at least
/// `layout.size` bytes), in ascending order.
pub fn write(
    opts: &IsoOptions,
    files: &[IsoFile<'_>],
    layout: &IsoLayout,
    sink: &mut dyn Sink,
) -> Result<(), IsoError> {
    write_nonzero(sink, 0, &gpt::primary_region(&layout.gpt))?;
    let mut head = primary_descriptor(opts, layout);
    head.extend(boot_record(layout));
    head.extend(terminator());
    head.extend(path_table(false));
    head.extend(path_table(true));
    head.extend(root_directory(opts, layout));
    head.extend(boot_catalog(layout));
    write_nonzero(sink, 16 * BLOCK, &head)?;
    sink.settle((layout.catalog_lba + 1) * BLOCK);
    let mut buf = vec![0u8; 1 << 20];
    for (f, p) in files.iter().zip(&layout.files) {
        if f.data.len() != p.len {
            return Err(IsoError::ShortSource {
                name: f.name.clone(),
                got: f.data.len(),
                want: p.len,
            });
        }
        match &f.data {
            IsoData::Bytes(b) => write_nonzero(sink, p.offset(), b)?,
            IsoData::Range { file, offset, len } => {
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], offset + done)
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::UnexpectedEof => IsoError::ShortSource {
                                name: f.name.clone(),
                                got: done,
                                want: *len,
                            },
                            _ => IsoError::Io(e),
                        })?;
                    write_nonzero(sink, p.offset() + done, &buf[..n])?;
                    done += n as u64;
                    sink.settle(p.offset() + done);
                }
            }
        }
        sink.settle(p.offset() + p.len);
    }
    let (off, backup) = gpt::backup_region(&layout.gpt);
    write_nonzero(sink, off, &backup)?;
    sink.settle(layout.size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IsoOptions {
        IsoOptions {
            volume_id: "TEST".into(),
            epoch: 1_767_225_600,
            disk_guid: Guid::derive(&[b"disk"]),
        }
    }

    fn files() -> Vec<IsoFile<'static>> {
        vec![
            IsoFile {
                name: "ESP.IMG".into(),
                data: IsoData::Bytes(vec![0xAB; 3000]),
                partition: Some(PartitionSpec {
                    label: "esp".into(),
                    type_guid: gpt::types::ESP,
                    guid: Guid::derive(&[b"esp"]),
                    size: SizeSpec::Fill,
                    attributes: 0,
                }),
                efi_boot: true,
            },
            IsoFile {
                name: "README.TXT".into(),
                data: IsoData::Bytes(b"hello\n".to_vec()),
                partition: None,
                efi_boot: false,
            },
        ]
    }

    #[test]
    fn dates_are_the_epoch_in_utc() {
        assert_eq!(&descriptor_date(1_767_225_600)[..16], b"2026010100000000");
        assert_eq!(record_date(1_767_225_600), [126, 1, 1, 0, 0, 0, 0]);
        assert_eq!(crate::civil::civil(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn the_layout_puts_partition_files_on_a_mib_and_the_backup_gpt_last() {
        let l = plan(&opts(), &files()).unwrap();
        assert_eq!(l.catalog_lba, 22);
        assert_eq!(l.files[0].offset(), 1 << 20);
        assert_eq!(l.files[1].lba, ((1 << 20) + 4096) / BLOCK);
        let p = &l.gpt.partitions[0];
        assert_eq!((p.first_lba, p.last_lba), (2048, 2048 + 5));
        assert_eq!(l.size % BLOCK, 0);
        assert!(l.size >= l.files[1].offset() + 6 + BACKUP_GPT);
    }

    #[test]
    fn the_catalog_validation_entry_sums_to_zero() {
        let l = plan(&opts(), &files()).unwrap();
        let c = boot_catalog(&l);
        let sum = c[..32].chunks(2).fold(0u16, |s, w| {
            s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
        });
        assert_eq!(sum, 0);
        assert_eq!(c[32], 0x88);
        assert_eq!(u16::from_le_bytes([c[38], c[39]]), 6);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 512);
    }

    #[test]
    fn bad_names_and_missing_boot_images_are_refused() {
        let mut f = files();
        f[1].name = "lower.txt".into();
        assert!(matches!(plan(&opts(), &f), Err(IsoError::BadName(_))));
        let mut f = files();
        f[0].efi_boot = false;
        assert!(matches!(plan(&opts(), &f), Err(IsoError::BootImages(0))));
        let mut f = files();
        f[1].name = "ESP.IMG".into();
        assert!(matches!(plan(&opts(), &f), Err(IsoError::DuplicateName(_))));
    }

    #[test]
    fn the_same_files_give_the_same_bytes() {
        let build = || {
            let (o, f) = (opts(), files());
            let l = plan(&o, &f).unwrap();
            let mut v: Vec<u8> = Vec::new();
            write(&o, &f, &l, &mut v).unwrap();
            v.resize(l.size as usize, 0);
            v
        };
        let a = build();
        assert_eq!(a, build());
        assert_eq!(&a[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
        assert_eq!(&a[510..512], &[0x55, 0xAA]);
        assert_eq!(&a[512..520], b"EFI PART");
        assert_eq!(&a[a.len() - 512..a.len() - 504], b"EFI PART");
        let f0 = 1 << 20;
        assert_eq!(&a[f0..f0 + 3000], &[0xAB; 3000][..]);
    }
}
