//! A one-pass FAT32/FAT16 filesystem writer: builds the EFI system partition
//! (`EFI/BOOT/BOOTX64.EFI`) and small FAT images such as an ISO's El Torito
//! EFI boot image from a [`Tree`].
//!
//! We write our own because the crates fall short: `fatfs` 0.3.6 writes `..`
//! entries that `fsck.fat` rejects (a top-level directory's `..` must name
//! cluster 0, not the root cluster) and `hadris-fat` is a release candidate.
//! This writer computes the whole layout first (so a too-small volume fails
//! before a byte is written), allocates clusters contiguously in
//! [`Tree::walk`] order, streams file data from [`Content::open`] straight to
//! the [`Sink`] in 1 MiB chunks, and never writes runs of zeros. The same tree
//! and options always give the same bytes.
//!
//! On-disk choices: 512-byte sectors, 2 FATs, media `0xF8`. FAT32 is used
//! whenever the volume holds at least 65525 clusters with the cluster size of
//! Microsoft's table (fatgen103: 512 B up to 260 MiB, 4 KiB up to 8 GiB, 8 KiB
//! up to 16 GiB, 16 KiB up to 32 GiB, 32 KiB above); it has 32 reserved
//! sectors, FSInfo at sector 1 and a backup of sectors 0-1 at 6-7. Smaller
//! volumes (about 2.1 MiB to 33 MiB) are FAT16 with 512 B clusters up to
//! 16 MiB and 2 KiB clusters above, one reserved sector and at least 512 root
//! entries. FAT12 is not written, so volumes too small for 4085 clusters are
//! refused.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use crate::sink::Sink;
use crate::tree::{file_name, normalize_path, parent_of, Content, Meta, Node, Tree};

const SECTOR: u64 = 512;
const CHUNK: usize = 1 << 20;
const MIN_FAT32_CLUSTERS: u64 = 65525;
const MIN_FAT16_CLUSTERS: u64 = 4085;
const MAX_FAT16_CLUSTERS: u64 = 65524;
const MAX_FAT32_CLUSTERS: u64 = 0x0FFF_FFF4;
const ATTR_READ_ONLY: u8 = 0x01;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LFN: u8 = 0x0F;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FatOptions {
    /// Volume size in bytes; a multiple of 512.
    pub size: u64,
    /// The volume serial number.
    pub volume_id: u32,
    /// Up to 11 characters, stored uppercased; empty means `NO NAME` and no
    /// label entry in the root directory.
    pub label: String,
    /// Sectors before the volume on its disk (the partition's start LBA), or 0.
    pub hidden_sectors: u32,
}

impl FatOptions {
    /// Options for a volume of `size` bytes, volume id 0, no label, no hidden sectors.
    pub fn new(size: u64) -> FatOptions {
        FatOptions {
            size,
            volume_id: 0,
            label: String::new(),
            hidden_sectors: 0,
        }
    }
}

/// Which FAT variant was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    Fat16,
    Fat32,
}

/// What a written volume looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatStats {
    pub fat_type: FatType,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters holding directories and file data.
    pub clusters_used: u32,
    /// Data clusters on the volume.
    pub clusters_total: u32,
}

/// Why a FAT volume could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("FAT volume size {0} is not a positive multiple of 512 bytes")]
    BadSize(u64),
    #[error("FAT volume of {size} bytes is too small: FAT16 needs at least 4085 clusters (about 2.1 MiB), FAT12 is not supported")]
    VolumeTooSmall { size: u64 },
    #[error("FAT volume of {size} bytes is too large: {clusters} clusters exceed the FAT32 limit")]
    VolumeTooLarge { size: u64, clusters: u64 },
    #[error("FAT volume of {size} bytes is too small for its content: needs {needed} clusters of {cluster_size} bytes, has {available}")]
    TooSmall {
        size: u64,
        needed: u64,
        cluster_size: u32,
        available: u64,
    },
    #[error("invalid FAT volume label {label:?}: {why}")]
    BadLabel { label: String, why: &'static str },
    #[error("{path:?} is a {kind}, which FAT cannot hold")]
    Unsupported { path: String, kind: &'static str },
    #[error("name of {path:?} cannot be stored on FAT: {why}")]
    BadName { path: String, why: String },
    #[error("{path:?} and {other:?} differ only in case, but FAT names are case-insensitive")]
    CaseDuplicate { path: String, other: String },
    #[error("directory {path:?} needs {slots} directory entries; FAT allows at most {max}")]
    TooManyEntries { path: String, slots: u64, max: u64 },
    #[error("file {path:?} is {size} bytes; FAT files are at most 4294967295 bytes")]
    FileTooLarge { path: String, size: u64 },
    #[error("hardlink {path:?} points to {target:?}, which is not a regular file in the tree")]
    BadHardlink { path: String, target: String },
    #[error("content of {path:?} is declared as {declared} bytes but yields {actual}")]
    ContentLength {
        path: String,
        declared: u64,
        actual: String,
    },
    #[error("reading content of {path:?}: {source}")]
    Read { path: String, source: io::Error },
    #[error("writing {what} of the FAT volume at offset {offset}: {source}")]
    Write {
        what: String,
        offset: u64,
        source: io::Error,
    },
}

/// Where everything goes on the volume. All counts are in sectors unless named otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    fat_type: FatType,
    total_sectors: u64,
    sectors_per_cluster: u64,
    reserved: u64,
    fat_sectors: u64,
    /// FAT16 only: fixed root directory entries (a multiple of 16).
    root_entries: u64,
    data_start: u64,
    clusters: u64,
}

impl Layout {
    fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        (self.data_start + (u64::from(cluster) - 2) * self.sectors_per_cluster) * SECTOR
    }

    fn root_dir_offset(&self) -> u64 {
        (self.reserved + 2 * self.fat_sectors) * SECTOR
    }
}

/// fatgen103's FAT32 cluster size (in sectors) for a volume of `sectors`.
fn fat32_sectors_per_cluster(sectors: u64) -> u64 {
    match sectors {
        0..=532_480 => 1,
        532_481..=16_777_216 => 8,
        16_777_217..=33_554_432 => 16,
        33_554_433..=67_108_864 => 32,
        _ => 64,
    }
}

/// FAT16 cluster size: 512 B up to 16 MiB (fatgen103 says FAT12 or 1 KiB
/// there; 512 B keeps volumes down to ~2.1 MiB above the FAT16 minimum),
/// 2 KiB above; [`plan_layout`] doubles it if there would be too many clusters.
fn fat16_sectors_per_cluster(sectors: u64) -> u64 {
    if sectors <= 32_768 {
        1
    } else {
        4
    }
}

/// Compute the layout of a volume of `size` bytes whose FAT16 root directory
/// would need `root_slots` entries.
fn plan_layout(size: u64, root_slots: u64) -> Result<Layout, FatError> {
    if size == 0 || size & (SECTOR - 1) != 0 {
        return Err(FatError::BadSize(size));
    }
    let total = size / SECTOR;
    // FAT32 first.
    let spc = fat32_sectors_per_cluster(total);
    let reserved = 32;
    if total > reserved + 2 {
        let upper = (total - reserved) / spc + 2;
        let mut fat = (upper * 4).div_ceil(SECTOR);
        let misalign = (reserved + 2 * fat) % spc;
        if misalign != 0 {
            fat += (spc - misalign).div_ceil(2);
        }
        let data_start = reserved + 2 * fat;
        let clusters = total.saturating_sub(data_start) / spc;
        if clusters > MAX_FAT32_CLUSTERS {
            return Err(FatError::VolumeTooLarge { size, clusters });
        }
        if clusters >= MIN_FAT32_CLUSTERS {
            return Ok(Layout {
                fat_type: FatType::Fat32,
                total_sectors: total,
                sectors_per_cluster: spc,
                reserved,
                fat_sectors: fat,
                root_entries: 0,
                data_start,
                clusters,
            });
        }
    }
    // FAT16.
    let root_entries = root_slots.max(512).next_multiple_of(16);
    let root_sectors = root_entries * 32 / SECTOR;
    let mut spc = fat16_sectors_per_cluster(total);
    loop {
        let base = 1 + root_sectors;
        if total <= base + 2 {
            return Err(FatError::VolumeTooSmall { size });
        }
        let upper = (total - base) / spc + 2;
        let fat = (upper * 2).div_ceil(SECTOR);
        let mut reserved = 1;
        let misalign = (reserved + 2 * fat + root_sectors) % spc;
        if misalign != 0 {
            reserved += spc - misalign;
        }
        let data_start = reserved + 2 * fat + root_sectors;
        let clusters = total.saturating_sub(data_start) / spc;
        if clusters < MIN_FAT16_CLUSTERS {
            return Err(FatError::VolumeTooSmall { size });
        }
        if clusters > MAX_FAT16_CLUSTERS {
            spc *= 2;
            continue;
        }
        return Ok(Layout {
            fat_type: FatType::Fat16,
            total_sectors: total,
            sectors_per_cluster: spc,
            reserved,
            fat_sectors: fat,
            root_entries,
            data_start,
            clusters,
        });
    }
}

/// A DOS date, time and 10 ms units (0..=199) for a Unix time in UTC,
/// clamped to 1980-01-01 00:00:00 ..= 2107-12-31 23:59:59.
fn dos_datetime(unix: i64) -> (u16, u16, u8) {
    const MIN: i64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: i64 = 4_354_819_199; // 2107-12-31T23:59:59Z
    let t = unix.clamp(MIN, MAX);
    let (year, month, day, h, m, s) = crate::civil::civil(t);
    let date = ((year - 1980) << 9) | (month << 5) | day;
    let time = (h << 11) | (m << 5) | (s / 2);
    (date as u16, time as u16, ((s % 2) * 100) as u8)
}

/// The VFAT checksum of an 11-byte short name, stored in each LFN entry.
fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

fn short_char_ok(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&c)
}

/// `name` as a padded 11-byte 8.3 name if it is a valid uppercase 8.3 name.
fn valid_short(name: &str) -> Option<[u8; 11]> {
    let (base, ext) = match name.split_once('.') {
        Some((b, e)) => (b, Some(e)),
        None => (name, None),
    };
    let ok = |s: &str, max| s.len() <= max && s.bytes().all(short_char_ok);
    if base.is_empty() || !ok(base, 8) || ext.is_some_and(|e| e.is_empty() || !ok(e, 3)) {
        return None;
    }
    Some(pack_short(base, ext.unwrap_or("")))
}

fn pack_short(base: &str, ext: &str) -> [u8; 11] {
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    out
}

/// Map a long name to an uppercase `(base, ext)` stem for a `~N` short name.
fn lossy_stem(name: &str) -> (String, String) {
    let s = name.trim_start_matches('.');
    let (b, e) = match s.rfind('.') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    let map = |s: &str, max: usize| -> String {
        s.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| {
                let u = c.to_ascii_uppercase();
                if u.is_ascii() && short_char_ok(u as u8) {
                    u
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    };
    let base = map(b, 8);
    (if base.is_empty() { "_".into() } else { base }, map(e, 3))
}

/// Why a long name cannot be stored, if it cannot.
fn long_name_problem(name: &str) -> Option<String> {
    if let Some(c) = name
        .chars()
        .find(|&c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
    {
        return Some(format!("FAT forbids the character {c:?} in names"));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Some("FAT names cannot end with '.' or ' '".into());
    }
    if name.encode_utf16().count() > 255 {
        return Some("longer than 255 UTF-16 code units".into());
    }
    None
}

/// Case-folded name for the duplicate check.
fn fold(name: &str) -> String {
    name.chars()
        .map(|c| {
            let mut u = c.to_uppercase();
            match (u.next(), u.next()) {
                (Some(one), None) => one,
                _ => c,
            }
        })
        .collect()
}

/// Short names for the children of one directory (names in walk order).
/// Valid 8.3 names, and names that are 8.3 once uppercased, keep that name;
/// the rest get `STEM~N` with the lowest free N, in order.
fn short_names(names: &[&str]) -> Vec<[u8; 11]> {
    let mut used = BTreeSet::new();
    let mut out: Vec<Option<[u8; 11]>> = names
        .iter()
        .map(|n| {
            let s = n
                .is_ascii()
                .then(|| valid_short(&n.to_ascii_uppercase()))
                .flatten();
            if let Some(s) = s {
                used.insert(s);
            }
            s
        })
        .collect();
    for (i, slot) in out.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let (base, ext) = lossy_stem(names[i]);
        for n in 1u32.. {
            let tail = format!("~{n}");
            let keep = base.len().min(8 - tail.len());
            let s = pack_short(&format!("{}{tail}", &base[..keep]), &ext);
            if used.insert(s) {
                *slot = Some(s);
                break;
            }
        }
    }
    out.into_iter().flatten().collect()
}

/// One directory entry (without LFN entries) in its 32 bytes.
fn dir_entry(name: &[u8; 11], attr: u8, meta: Option<&Meta>, cluster: u32, size: u32) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    if let Some(meta) = meta {
        let (date, time, centis) = dos_datetime(meta.mtime);
        e[13] = centis;
        e[14..16].copy_from_slice(&time.to_le_bytes());
        e[16..18].copy_from_slice(&date.to_le_bytes());
        e[18..20].copy_from_slice(&date.to_le_bytes());
        e[22..24].copy_from_slice(&time.to_le_bytes());
        e[24..26].copy_from_slice(&date.to_le_bytes());
    }
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The LFN entries for `name`, in on-disk order (last part first).
fn lfn_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let units: Vec<u16> = name.encode_utf16().collect();
    let count = units.len().div_ceil(13);
    let sum = lfn_checksum(short);
    (0..count)
        .rev()
        .map(|i| {
            let mut e = [0u8; 32];
            e[0] = (i + 1) as u8 | if i + 1 == count { 0x40 } else { 0 };
            e[11] = ATTR_LFN;
            e[13] = sum;
            let offsets = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
            for (k, off) in offsets.into_iter().enumerate() {
                let unit = match (i * 13 + k).cmp(&units.len()) {
                    std::cmp::Ordering::Less => units[i * 13 + k],
                    std::cmp::Ordering::Equal => 0,
                    std::cmp::Ordering::Greater => 0xFFFF,
                };
                e[off..off + 2].copy_from_slice(&unit.to_le_bytes());
            }
            e
        })
        .collect()
}

enum Kind<'a> {
    Dir { children: Vec<usize> },
    File(&'a Content),
}

/// An entry of the volume; index 0 is the root directory.
struct Item<'a> {
    path: &'a str,
    meta: Meta,
    kind: Kind<'a>,
    parent: usize,
    short: [u8; 11],
    long: bool,
    /// Directories: entry slots including `.`/`..` or the label.
    slots: u64,
    first_cluster: u32,
}

impl Item<'_> {
    fn attr(&self) -> u8 {
        let ro = if self.meta.mode & 0o222 == 0 {
            ATTR_READ_ONLY
        } else {
            0
        };
        match self.kind {
            Kind::Dir { .. } => ATTR_DIRECTORY | ro,
            Kind::File(_) => ATTR_ARCHIVE | ro,
        }
    }
}

fn label_bytes(label: &str) -> Result<Option<[u8; 11]>, FatError> {
    if label.is_empty() {
        return Ok(None);
    }
    let bad = |why| FatError::BadLabel {
        label: label.to_string(),
        why,
    };
    let up = label.to_ascii_uppercase();
    if up.len() > 11 {
        return Err(bad("longer than 11 characters"));
    }
    if up.starts_with(' ') || !up.bytes().all(|c| c == b' ' || short_char_ok(c)) {
        return Err(bad(
            "only A-Z, 0-9, inner spaces and !#$%&'()-@^_`{}~ are allowed",
        ));
    }
    let mut out = [b' '; 11];
    out[..up.len()].copy_from_slice(up.as_bytes());
    Ok(Some(out))
}

/// Gather the tree's entries into items (walk order), checking kinds and names.
fn collect(tree: &Tree) -> Result<Vec<Item<'_>>, FatError> {
    let root_meta = Meta::new(0o755, 0);
    let mut items = vec![Item {
        path: "",
        meta: root_meta,
        kind: Kind::Dir {
            children: Vec::new(),
        },
        parent: 0,
        short: [b' '; 11],
        long: false,
        slots: 0,
        first_cluster: 0,
    }];
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (path, entry) in tree.walk() {
        let unsupported = |kind| FatError::Unsupported {
            path: path.to_string(),
            kind,
        };
        let kind = match &entry.node {
            Node::Dir => Kind::Dir {
                children: Vec::new(),
            },
            Node::File(c) => Kind::File(c),
            Node::Hardlink(target) => {
                let t = normalize_path(target).ok();
                match t.as_deref().and_then(|t| tree.get(t)).map(|e| &e.node) {
                    Some(Node::File(c)) => Kind::File(c),
                    _ => {
                        return Err(FatError::BadHardlink {
                            path: path.to_string(),
                            target: target.clone(),
                        })
                    }
                }
            }
            Node::Symlink(_) => return Err(unsupported("symbolic link")),
            Node::CharDevice { .. } => return Err(unsupported("character device")),
            Node::BlockDevice { .. } => return Err(unsupported("block device")),
            Node::Fifo => return Err(unsupported("FIFO")),
        };
        if let Kind::File(c) = kind {
            if c.len() > u64::from(u32::MAX) {
                return Err(FatError::FileTooLarge {
                    path: path.to_string(),
                    size: c.len(),
                });
            }
        }
        if let Some(why) = long_name_problem(file_name(path)) {
            return Err(FatError::BadName {
                path: path.to_string(),
                why,
            });
        }
        let parent = parent_of(path).map_or(0, |p| index[p]);
        let i = items.len();
        index.insert(path, i);
        items.push(Item {
            path,
            meta: entry.meta,
            kind,
            parent,
            short: [b' '; 11],
            long: false,
            slots: 0,
            first_cluster: 0,
        });
        if let Kind::Dir { children } = &mut items[parent].kind {
            children.push(i);
        }
    }
    // Names, per directory.
    for d in 0..items.len() {
        let Kind::Dir { children } = &items[d].kind else {
            continue;
        };
        let children = children.clone();
        let names: Vec<&str> = children.iter().map(|&c| file_name(items[c].path)).collect();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for &c in &children {
            if let Some(&o) = seen.get(&fold(file_name(items[c].path))) {
                return Err(FatError::CaseDuplicate {
                    path: items[c].path.to_string(),
                    other: items[o].path.to_string(),
                });
            }
            seen.insert(fold(file_name(items[c].path)), c);
        }
        let shorts = short_names(&names);
        let mut slots = if d == 0 { 0 } else { 2 };
        for ((&c, short), name) in children.iter().zip(shorts).zip(&names) {
            let long = valid_short(name).is_none();
            items[c].short = short;
            items[c].long = long;
            slots += 1 + if long {
                name.encode_utf16().count().div_ceil(13) as u64
            } else {
                0
            };
        }
        // The FAT16 root's entry count is a u16 (a multiple of 16), and
        // the root may also need a label entry.
        let max = if d == 0 { 65519 } else { 65536 };
        if slots > max {
            let path = if d == 0 { "/" } else { items[d].path };
            return Err(FatError::TooManyEntries {
                path: path.to_string(),
                slots,
                max,
            });
        }
        items[d].slots = slots;
    }
    Ok(items)
}

/// Write `tree` as a FAT volume of `opts.size` bytes into `sink`, which must
/// be all zero. The layout and every name are checked before anything is written.
pub fn write_fat(
    tree: &Tree,
    opts: &FatOptions,
    sink: &mut dyn Sink,
) -> Result<FatStats, FatError> {
    let label = label_bytes(&opts.label)?;
    let mut items = collect(tree)?;
    items[0].slots += u64::from(label.is_some());
    let layout = plan_layout(opts.size, items[0].slots)?;
    let cb = layout.cluster_bytes();

    // Allocate contiguously in walk order; the FAT32 root comes first.
    let mut fat: Vec<u32> = vec![0x0FFF_FFF8, 0x0FFF_FFFF];
    let mut runs: Vec<(usize, u64)> = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        let bytes = match &item.kind {
            Kind::Dir { .. } if i == 0 && layout.fat_type == FatType::Fat16 => 0,
            Kind::Dir { .. } => (item.slots * 32).max(1),
            Kind::File(c) => c.len(),
        };
        let n = bytes.div_ceil(cb);
        if n == 0 {
            continue;
        }
        let first = fat.len() as u64;
        if first - 2 + n <= layout.clusters {
            item.first_cluster = first as u32;
            fat.extend((first + 1..first + n).map(|c| c as u32));
            fat.push(0x0FFF_FFFF);
        }
        runs.push((i, n));
    }
    let needed: u64 = runs.iter().map(|r| r.1).sum();
    if needed > layout.clusters {
        return Err(FatError::TooSmall {
            size: opts.size,
            needed,
            cluster_size: cb as u32,
            available: layout.clusters,
        });
    }

    // File data, streamed.
    let mut buf = vec![0u8; CHUNK];
    for item in &items {
        if let Kind::File(c) = item.kind {
            if item.first_cluster != 0 {
                let offset = layout.cluster_offset(item.first_cluster);
                stream(c, item.path, offset, &mut buf, sink)?;
            }
        }
    }

    // Directories.
    for (d, item) in items.iter().enumerate() {
        let Kind::Dir { children } = &item.kind else {
            continue;
        };
        let mut bytes = Vec::with_capacity(item.slots as usize * 32);
        if d == 0 {
            if let Some(l) = &label {
                bytes.extend(dir_entry(l, ATTR_VOLUME_ID, None, 0, 0));
            }
        } else {
            // `..` names cluster 0 when the parent is the root, also on FAT32.
            let parent = match item.parent {
                0 => 0,
                p => items[p].first_cluster,
            };
            let here = item.first_cluster;
            let attr = item.attr();
            bytes.extend(dir_entry(b".          ", attr, Some(&item.meta), here, 0));
            bytes.extend(dir_entry(b"..         ", attr, Some(&item.meta), parent, 0));
        }
        for &c in children {
            let child = &items[c];
            if child.long {
                for e in lfn_entries(file_name(child.path), &child.short) {
                    bytes.extend(e);
                }
            }
            let size = match child.kind {
                Kind::File(content) => content.len() as u32,
                Kind::Dir { .. } => 0,
            };
            bytes.extend(dir_entry(
                &child.short,
                child.attr(),
                Some(&child.meta),
                child.first_cluster,
                size,
            ));
        }
        let offset = if d == 0 && layout.fat_type == FatType::Fat16 {
            layout.root_dir_offset()
        } else {
            layout.cluster_offset(item.first_cluster)
        };
        let what = format!("directory {:?}", if d == 0 { "/" } else { item.path });
        put(sink, &what, offset, &bytes)?;
    }

    // The FATs.
    let fat_bytes: Vec<u8> = match layout.fat_type {
        FatType::Fat32 => fat.iter().flat_map(|e| e.to_le_bytes()).collect(),
        FatType::Fat16 => fat.iter().flat_map(|&e| (e as u16).to_le_bytes()).collect(),
    };
    for copy in 0..2 {
        let offset = (layout.reserved + copy * layout.fat_sectors) * SECTOR;
        put(sink, &format!("FAT {}", copy + 1), offset, &fat_bytes)?;
    }

    // Boot sector (and FSInfo plus backups on FAT32), last.
    let used = fat.len() as u64 - 2;
    let boot = boot_sector(&layout, opts, label.unwrap_or(*b"NO NAME    "));
    put(sink, "boot sector", 0, &boot)?;
    if layout.fat_type == FatType::Fat32 {
        let free = layout.clusters - used;
        let next = if free == 0 {
            u32::MAX
        } else {
            fat.len() as u32
        };
        let info = fsinfo(free as u32, next);
        put(sink, "FSInfo sector", SECTOR, &info)?;
        put(sink, "backup boot sector", 6 * SECTOR, &boot)?;
        put(sink, "backup FSInfo sector", 7 * SECTOR, &info)?;
    }
    Ok(FatStats {
        fat_type: layout.fat_type,
        cluster_size: cb as u32,
        clusters_used: used as u32,
        clusters_total: layout.clusters as u32,
    })
}

fn put(sink: &mut dyn Sink, what: &str, offset: u64, data: &[u8]) -> Result<(), FatError> {
    sink.write_at(offset, data)
        .map_err(|source| FatError::Write {
            what: what.to_string(),
            offset,
            source,
        })
}

/// Copy exactly `content.len()` bytes of `content` to `offset`, skipping all-zero chunks.
fn stream(
    content: &Content,
    path: &str,
    offset: u64,
    buf: &mut [u8],
    sink: &mut dyn Sink,
) -> Result<(), FatError> {
    let read_err = |source| FatError::Read {
        path: path.to_string(),
        source,
    };
    let declared = content.len();
    let mut r = content.open().map_err(read_err)?;
    let mut done = 0u64;
    while done < declared {
        let want = (declared - done).min(buf.len() as u64) as usize;
        let got = crate::sink::read_full(&mut r, &mut buf[..want]).map_err(read_err)?;
        if got < want {
            return Err(FatError::ContentLength {
                path: path.to_string(),
                declared,
                actual: (done + got as u64).to_string(),
            });
        }
        if buf[..want].iter().any(|&b| b != 0) {
            put(sink, &format!("file {path:?}"), offset + done, &buf[..want])?;
        }
        done += want as u64;
    }
    // Reading to the end also makes blob content check its digest.
    if crate::sink::read_full(&mut r, &mut buf[..1]).map_err(read_err)? != 0 {
        return Err(FatError::ContentLength {
            path: path.to_string(),
            declared,
            actual: "more".into(),
        });
    }
    Ok(())
}

fn boot_sector(l: &Layout, opts: &FatOptions, label: [u8; 11]) -> [u8; 512] {
    let mut b = [0u8; 512];
    let fat32 = l.fat_type == FatType::Fat32;
    // Jump over the BPB to a `cli; hlt; jmp hlt` loop.
    let code = if fat32 { 0x5A } else { 0x3E };
    b[..3].copy_from_slice(&[0xEB, code as u8 - 2, 0x90]);
    b[code..code + 4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]);
    b[3..11].copy_from_slice(b"mkfs.fat");
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = l.sectors_per_cluster as u8;
    b[14..16].copy_from_slice(&(l.reserved as u16).to_le_bytes());
    b[16] = 2;
    b[17..19].copy_from_slice(&(l.root_entries as u16).to_le_bytes());
    if l.total_sectors < 0x10000 {
        b[19..21].copy_from_slice(&(l.total_sectors as u16).to_le_bytes());
    } else {
        b[32..36].copy_from_slice(&(l.total_sectors as u32).to_le_bytes());
    }
    b[21] = 0xF8;
    b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track
    b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads
    b[28..32].copy_from_slice(&opts.hidden_sectors.to_le_bytes());
    let ext = if fat32 {
        b[36..40].copy_from_slice(&(l.fat_sectors as u32).to_le_bytes());
        b[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
        b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
        b[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
        64
    } else {
        b[22..24].copy_from_slice(&(l.fat_sectors as u16).to_le_bytes());
        36
    };
    b[ext] = 0x80; // drive number
    b[ext + 2] = 0x29; // extended boot signature
    b[ext + 3..ext + 7].copy_from_slice(&opts.volume_id.to_le_bytes());
    b[ext + 7..ext + 18].copy_from_slice(&label);
    b[ext + 18..ext + 26].copy_from_slice(if fat32 { b"FAT32   " } else { b"FAT16   " });
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn fsinfo(free: u32, next_free: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    s[488..492].copy_from_slice(&free.to_le_bytes());
    s[492..496].copy_from_slice(&next_free.to_le_bytes());
    s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;
    use std::path::Path;
    use std::process::Command;

    const T: i64 = 1_700_000_000;

    fn put_file(t: &mut Tree, path: &str, data: impl Into<Vec<u8>>, mode: u16) {
        let e = Entry {
            meta: Meta::new(mode, T),
            node: Node::File(Content::bytes(data)),
        };
        t.insert(path, e, Meta::new(0o755, T)).unwrap();
    }

    fn put_node(t: &mut Tree, path: &str, node: Node) {
        let e = Entry {
            meta: Meta::new(0o644, T),
            node,
        };
        t.insert(path, e, Meta::new(0o755, T)).unwrap();
    }

    fn opts(size: u64) -> FatOptions {
        FatOptions {
            size,
            volume_id: 0x1234_5678,
            label: "Test Vol".into(),
            hidden_sectors: 0,
        }
    }

    /// Build `tree` into a sparse image file in `dir`.
    fn build(dir: &Path, tree: &Tree, o: &FatOptions) -> (std::path::PathBuf, FatStats) {
        let img = dir.join("fat.img");
        let mut f = std::fs::File::create(&img).unwrap();
        f.set_len(o.size).unwrap();
        let stats = write_fat(tree, o, &mut f).unwrap();
        (img, stats)
    }

    /// Run a real tool; a missing tool fails the test.
    fn run(tool: &str, args: &[&str]) -> std::process::Output {
        Command::new(tool)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {tool} ({e}); install dosfstools and mtools to run these tests")
            })
    }

    /// `fsck.fat -n -v` must pass without a single complaint; returns its output.
    fn fsck(img: &Path) -> String {
        let out = run("fsck.fat", &["-n", "-v", img.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fsck.fat failed:\n{text}\n{err}");
        assert!(err.trim().is_empty(), "fsck.fat stderr: {err}");
        for bad in [
            "differ",
            "wrong",
            "Warning",
            "invalid",
            "Bad",
            "Free cluster",
            "Dirty",
        ] {
            assert!(!text.contains(bad), "fsck.fat complains ({bad}):\n{text}");
        }
        text
    }

    fn mread(img: &Path, path: &str) -> Vec<u8> {
        let out = run(
            "mcopy",
            &[
                "-n",
                "-i",
                img.to_str().unwrap(),
                &format!("::/{path}"),
                "-",
            ],
        );
        assert!(
            out.status.success(),
            "mcopy {path:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn mdir(img: &Path, dir: &str) -> String {
        let out = run("mdir", &["-i", img.to_str().unwrap(), &format!("::/{dir}")]);
        assert!(out.status.success(), "mdir {dir:?}: {:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Read every file of `tree` back with mcopy and compare.
    fn check_files(img: &Path, tree: &Tree) -> usize {
        let mut n = 0;
        for (path, e) in tree.iter() {
            let c = match &e.node {
                Node::File(c) => c,
                Node::Hardlink(t) => match &tree.get(t).unwrap().node {
                    Node::File(c) => c,
                    _ => unreachable!(),
                },
                _ => continue,
            };
            assert!(mread(img, path) == c.read_all().unwrap(), "{path} differs");
            n += 1;
        }
        n
    }

    #[test]
    fn dos_time_conversion_and_clamping() {
        assert_eq!(dos_datetime(315_532_800), (0x21, 0, 0));
        assert_eq!(dos_datetime(0), (0x21, 0, 0));
        assert_eq!(dos_datetime(-5_000_000_000), (0x21, 0, 0));
        // 2000-02-29T12:34:57Z: odd seconds go to the 10 ms field.
        assert_eq!(
            dos_datetime(951_827_697),
            ((20 << 9) | (2 << 5) | 29, (12 << 11) | (34 << 5) | 28, 100)
        );
        let last = (
            (127 << 9) | (12 << 5) | 31,
            (23 << 11) | (59 << 5) | 29,
            100,
        );
        assert_eq!(dos_datetime(4_354_819_199), last);
        assert_eq!(dos_datetime(i64::MAX), last);
    }

    #[test]
    fn lfn_checksum_matches_reference() {
        fn reference(name: &[u8; 11]) -> u8 {
            let mut sum: u8 = 0;
            for &b in name {
                sum = (if sum & 1 != 0 { 0x80u8 } else { 0 })
                    .wrapping_add(sum >> 1)
                    .wrapping_add(b);
            }
            sum
        }
        for n in [
            b"BOOTX64 EFI",
            b"ALONGN~1TXT",
            b"           ",
            b"~~~~~~~~~~~",
        ] {
            assert_eq!(lfn_checksum(n), reference(n));
        }
        assert_eq!(lfn_checksum(b"FOO     BAR"), reference(b"FOO     BAR"));
    }

    #[test]
    fn lfn_entries_are_ordered_and_padded() {
        let short = *b"ABCDEF~1TXT";
        let e = lfn_entries("abcdefghijklmn", &short); // 14 units: 2 entries
        assert_eq!(e.len(), 2);
        assert_eq!(e[0][0], 0x42);
        assert_eq!(e[1][0], 0x01);
        assert!(e
            .iter()
            .all(|e| e[11] == ATTR_LFN && e[13] == lfn_checksum(&short)));
        assert_eq!(&e[1][1..3], &[b'a', 0]);
        assert_eq!(&e[0][1..3], &[b'n', 0]);
        assert_eq!(&e[0][3..5], &[0, 0]); // terminator
        assert_eq!(&e[0][5..7], &[0xFF, 0xFF]); // padding
        assert_eq!(lfn_entries("abcdefghijklm", &short).len(), 1);
    }

    #[test]
    fn short_name_generation() {
        let names = [
            "a long name.txt",
            "a long name2.txt",
            "ReadMe.md",
            "FOO",
            "x.tar.gz",
            ".bashrc",
            "ünï.txt",
            "AB~1",
            "AL~1",
        ];
        let got: Vec<String> = short_names(&names)
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "ALONGN~1TXT",
                "ALONGN~2TXT",
                "README  MD ",
                "FOO        ",
                "XTAR~1  GZ ",
                "BASHRC~1   ",
                "_N_~1   TXT",
                "AB~1       ",
                "AL~1       ",
            ]
        );
        // A literal 8.3 sibling reserves its name even when it comes later.
        let s = short_names(&["ab.cdef", "AB~1.CDE"]);
        assert_eq!(&s[0], b"AB~2    CDE");
        let many: Vec<String> = (0..12).map(|i| format!("longname{i}.txt")).collect();
        let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        let s = short_names(&refs);
        assert_eq!(&s[0], b"LONGNA~1TXT");
        assert_eq!(&s[8], b"LONGNA~9TXT");
        assert_eq!(&s[9], b"LONGN~10TXT");
        assert_eq!(s.iter().collect::<BTreeSet<_>>().len(), 12);
        assert!(valid_short("BOOTX64.EFI").is_some());
        for bad in [
            "bootx64.efi",
            "TOOLONGNAME",
            "A.B.C",
            ".X",
            "A.TOOL",
            "A B",
            "A+B",
        ] {
            assert!(valid_short(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn layout_math() {
        let mib = 1u64 << 20;
        let l = plan_layout(64 * mib, 0).unwrap();
        assert_eq!(
            (l.fat_type, l.sectors_per_cluster, l.reserved),
            (FatType::Fat32, 1, 32)
        );
        let l = plan_layout(300 * mib, 0).unwrap();
        assert_eq!((l.fat_type, l.sectors_per_cluster), (FatType::Fat32, 8));
        let l = plan_layout(4 * mib, 3).unwrap();
        assert_eq!(
            (l.fat_type, l.sectors_per_cluster, l.root_entries),
            (FatType::Fat16, 1, 512)
        );
        assert_eq!(plan_layout(4 * mib, 600).unwrap().root_entries, 608);
        assert!(matches!(
            plan_layout(mib, 0),
            Err(FatError::VolumeTooSmall { .. })
        ));
        assert!(matches!(plan_layout(1000, 0), Err(FatError::BadSize(1000))));
        for size in
            (3..200)
                .map(|m| m * mib + 7 * 512)
                .chain([2200 * 1024, 33 * mib, 20 * 1024 * mib])
        {
            let l = plan_layout(size, 0).unwrap();
            let bits = if l.fat_type == FatType::Fat32 { 32 } else { 16 };
            assert!(
                l.fat_sectors * 512 * 8 / bits >= l.clusters + 2,
                "{size}: FAT too small"
            );
            assert_eq!(l.data_start % l.sectors_per_cluster, 0, "{size}: unaligned");
            assert!(l.data_start + l.clusters * l.sectors_per_cluster <= l.total_sectors);
            match l.fat_type {
                FatType::Fat32 => assert!(l.clusters >= MIN_FAT32_CLUSTERS),
                FatType::Fat16 => {
                    assert!((MIN_FAT16_CLUSTERS..=MAX_FAT16_CLUSTERS).contains(&l.clusters))
                }
            }
        }
    }

    fn esp_tree() -> Tree {
        let mut t = Tree::new();
        let efi: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        put_file(&mut t, "EFI/BOOT/BOOTX64.EFI", efi, 0o644);
        put_file(
            &mut t,
            "loader/entries/appliance.conf",
            "title appliance\n",
            0o644,
        );
        t
    }

    #[test]
    fn esp_64mib_is_fat32_and_passes_fsck() {
        let dir = tempfile::tempdir().unwrap();
        let t = esp_tree();
        let o = FatOptions {
            label: "ESP".into(),
            ..opts(64 << 20)
        };
        let (img, stats) = build(dir.path(), &t, &o);
        assert_eq!((stats.fat_type, stats.cluster_size), (FatType::Fat32, 512));
        let report = fsck(&img);
        assert!(report.contains("32 bit entries"), "{report}");
        let summary = format!("{}/{} clusters", stats.clusters_used, stats.clusters_total);
        assert!(report.contains(&summary), "{report}");
        check_files(&img, &t);
        let root = mdir(&img, "");
        assert!(root.contains("ESP"), "{root}");
        assert!(mdir(&img, "EFI/BOOT").contains("BOOTX64  EFI"));
        let info = run("minfo", &["-i", img.to_str().unwrap()]);
        let info = String::from_utf8_lossy(&info.stdout);
        let free = stats.clusters_total - stats.clusters_used;
        assert!(info.contains(&format!("free clusters={free}\n")), "{info}");
        assert!(
            info.contains(&format!(
                "last allocated cluster={}\n",
                stats.clusters_used + 2
            )),
            "{info}"
        );
    }

    #[test]
    fn full_tree_fat32_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = esp_tree();
        for i in 0..500 {
            let body = format!("content of file {i}\n").repeat(i % 40);
            put_file(&mut t, &format!("many/file number {i}.txt"), body, 0o644);
        }
        put_file(&mut t, "deep/a/b/c/d/e/leaf.txt", "leaf", 0o644);
        put_file(&mut t, "Ünïcödé ファイル名 — long.txt", "unicode\n", 0o644);
        put_file(
            &mut t,
            "a name that is certainly longer than thirteen characters.data",
            "x",
            0o644,
        );
        put_file(&mut t, "empty", "", 0o644);
        put_file(&mut t, "deep/empty too.bin", "", 0o644);
        put_file(&mut t, "ro.txt", "read only", 0o444);
        put_file(&mut t, "zeros.bin", vec![0u8; 3 << 20], 0o644);
        let big: Vec<u8> = (0..(5u32 << 20) + 12345)
            .map(|i| (i ^ (i >> 9) ^ (i >> 17)) as u8)
            .collect();
        put_file(&mut t, "big/blob.bin", big, 0o644);
        put_node(
            &mut t,
            "big/link.bin",
            Node::Hardlink("big/blob.bin".into()),
        );
        put_node(&mut t, "emptydir", Node::Dir);
        t.validate().unwrap();

        let (img, stats) = build(dir.path(), &t, &opts(64 << 20));
        assert_eq!(stats.fat_type, FatType::Fat32);
        let report = fsck(&img);
        assert!(report.contains("32 bit entries"), "{report}");
        assert_eq!(check_files(&img, &t), 511);

        let listing = mdir(&img, "");
        for name in [
            "Ünïcödé ファイル名 — long.txt",
            "a name that is certainly longer than thirteen characters.data",
            "emptydir",
        ] {
            assert!(listing.contains(name), "mdir lacks {name}:\n{listing}");
        }
        assert!(listing.contains("TEST VOL"), "{listing}");
        assert!(mdir(&img, "many").contains("file number 499.txt"));
        let attr = run("mattrib", &["-i", img.to_str().unwrap(), "::/ro.txt"]);
        let attr = String::from_utf8_lossy(&attr.stdout);
        assert!(attr.split("::").next().unwrap().contains('R'), "{attr}");
        let attr = run("mattrib", &["-i", img.to_str().unwrap(), "::/empty"]);
        let attr = String::from_utf8_lossy(&attr.stdout);
        assert!(!attr.split("::").next().unwrap().contains('R'), "{attr}");
    }

    #[test]
    fn small_volume_is_fat16() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = esp_tree();
        for i in 0..40 {
            put_file(
                &mut t,
                &format!("a rather long root name {i}.cfg"),
                format!("{i}"),
                0o644,
            );
        }
        put_file(&mut t, "sub/dir/Mixed Case.Txt", "m", 0o644);
        let (img, stats) = build(dir.path(), &t, &opts(4 << 20));
        assert_eq!((stats.fat_type, stats.cluster_size), (FatType::Fat16, 512));
        let report = fsck(&img);
        assert!(report.contains("16 bit entries"), "{report}");
        check_files(&img, &t);
        assert!(mdir(&img, "sub/dir").contains("Mixed Case.Txt"));
    }

    #[test]
    fn empty_trees_pass_fsck() {
        let dir = tempfile::tempdir().unwrap();
        for (size, ty) in [(64 << 20, FatType::Fat32), (3 << 20, FatType::Fat16)] {
            for label in ["", "EMPTY"] {
                let o = FatOptions {
                    label: label.into(),
                    ..opts(size)
                };
                let (img, stats) = build(dir.path(), &Tree::new(), &o);
                assert_eq!(stats.fat_type, ty);
                fsck(&img);
            }
        }
    }

    #[test]
    fn too_small_fails_before_writing() {
        let mut t = Tree::new();
        put_file(&mut t, "big", vec![1u8; 5 << 20], 0o644);
        let mut sink = Vec::new();
        let err = write_fat(&t, &opts(4 << 20), &mut sink).unwrap_err();
        assert!(matches!(err, FatError::TooSmall { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with("FAT volume of 4194304 bytes is too small for its content: needs 10240 clusters of 512 bytes, has"), "{msg}");
        assert!(sink.is_empty());
        let err = write_fat(&t, &opts(1 << 20), &mut sink).unwrap_err();
        assert!(
            matches!(err, FatError::VolumeTooSmall { size: 1048576 }),
            "{err}"
        );
        assert!(sink.is_empty());
    }

    #[test]
    fn unsupported_nodes_and_names_are_errors() {
        let mut sink = Vec::new();
        let mut t = esp_tree();
        put_node(&mut t, "EFI/link", Node::Symlink("BOOT".into()));
        let err = write_fat(&t, &opts(8 << 20), &mut sink).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"EFI/link\" is a symbolic link, which FAT cannot hold"
        );

        let mut t = esp_tree();
        put_node(&mut t, "dev/null", Node::CharDevice { major: 1, minor: 3 });
        assert!(matches!(
            write_fat(&t, &opts(8 << 20), &mut sink),
            Err(FatError::Unsupported { .. })
        ));

        let mut t = esp_tree();
        put_file(&mut t, "EFI/boot", "x", 0o644);
        let err = write_fat(&t, &opts(8 << 20), &mut sink).unwrap_err();
        assert!(matches!(err, FatError::CaseDuplicate { .. }), "{err}");
        assert!(
            err.to_string().contains("\"EFI/boot\"") && err.to_string().contains("\"EFI/BOOT\""),
            "{err}"
        );

        for bad in ["what?.txt", "a:b", "trailing.", "back\\slash", "tab\there"] {
            let mut t = esp_tree();
            put_file(&mut t, &format!("dir/{bad}"), "x", 0o644);
            let err = write_fat(&t, &opts(8 << 20), &mut sink).unwrap_err();
            assert!(
                matches!(&err, FatError::BadName { path, .. } if path == &format!("dir/{bad}")),
                "{err}"
            );
        }
        assert!(matches!(
            write_fat(
                &esp_tree(),
                &FatOptions {
                    label: "way too long label".into(),
                    ..opts(8 << 20)
                },
                &mut sink
            ),
            Err(FatError::BadLabel { .. })
        ));
        assert!(sink.is_empty());
    }

    #[test]
    fn wrong_content_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"short").unwrap();
        let mut t = Tree::new();
        put_node(
            &mut t,
            "f",
            Node::File(Content::Blob {
                path: blob,
                digest: crate::Digest::of(b"short"),
                size: 10,
            }),
        );
        let err = write_fat(&t, &opts(8 << 20), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("\"f\""), "{err}");
    }

    #[test]
    fn dotdot_of_top_level_dir_names_cluster_zero() {
        // Regression: fatfs 0.3.6 points `..` of a top-level directory at
        // the root cluster; fsck.fat rejects that.
        let dir = tempfile::tempdir().unwrap();
        let t = esp_tree();
        let (img, stats) = build(dir.path(), &t, &opts(64 << 20));
        let mut bytes = std::fs::read(&img).unwrap();
        let l = plan_layout(64 << 20, 0).unwrap();
        // Walk order: root (cluster 2), then EFI (cluster 3).
        let efi = l.cluster_offset(3) as usize;
        assert_eq!(&bytes[efi..efi + 11], b".          ");
        assert_eq!(&bytes[efi + 26..efi + 28], &[3, 0]);
        assert_eq!(&bytes[efi + 32..efi + 43], b"..         ");
        assert_eq!(&bytes[efi + 32 + 20..efi + 32 + 22], &[0, 0]);
        assert_eq!(&bytes[efi + 32 + 26..efi + 32 + 28], &[0, 0]);
        assert_eq!(stats.fat_type, FatType::Fat32);
        let listing = mdir(&img, "EFI/BOOT");
        // Meta.mtime 1_700_000_000 is 2023-11-14 22:13:20 UTC.
        assert!(
            listing.contains("BOOTX64  EFI    300000 2023-11-14  22:13"),
            "{listing}"
        );
        bytes[efi + 32 + 26] = 2;
        std::fs::write(&img, &bytes).unwrap();
        let out = run("fsck.fat", &["-n", img.to_str().unwrap()]);
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            !out.status.success(),
            "fsck.fat accepted `..` = root cluster"
        );
    }

    #[test]
    fn output_is_reproducible() {
        let mut t = esp_tree();
        for i in 0..50 {
            put_file(
                &mut t,
                &format!("d{}/long file name {i}", i % 3),
                vec![i as u8; i * 100],
                0o644,
            );
        }
        for size in [64u64 << 20, 6 << 20] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            write_fat(&t, &opts(size), &mut a).unwrap();
            write_fat(&t, &opts(size), &mut b).unwrap();
            assert!(a == b, "two builds of {size} bytes differ");
            assert!(!a.is_empty());
        }
    }
}
