//! Finding partitions by GPT partition name through sysfs.
//!
//! The kernel exposes each partition's GPT name as `PARTNAME=` in
//! `/sys/class/block/<dev>/uevent`; devtmpfs creates `/dev/<DEVNAME>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fields of a block device `uevent` file that we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    pub devname: Option<String>,
    pub devtype: Option<String>,
    pub partname: Option<String>,
}

/// Parses a `uevent` file (`KEY=value` lines).
pub fn parse_uevent(text: &str) -> Uevent {
    let mut ev = Uevent::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = Some(v.to_owned());
        match k {
            "DEVNAME" => ev.devname = v,
            "DEVTYPE" => ev.devtype = v,
            "PARTNAME" => ev.partname = v,
            _ => {}
        }
    }
    ev
}

/// Looks once under `sys_block` (normally `/sys/class/block`) for a partition
/// named one of `names` (earlier names win); returns `/dev/<DEVNAME>`.
pub fn find_by_partname(sys_block: &Path, names: &[&str]) -> Option<PathBuf> {
    let mut found: Vec<(usize, String)> = Vec::new();
    for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("uevent")) else {
            continue;
        };
        let ev = parse_uevent(&text);
        if ev.devtype.as_deref() != Some("partition") {
            continue;
        }
        let (Some(part), Some(dev)) = (ev.partname, ev.devname) else {
            continue;
        };
        if let Some(rank) = names.iter().position(|n| *n == part) {
            found.push((rank, dev));
        }
    }
    // Deterministic: best name first, then device name.
    found.sort();
    found
        .into_iter()
        .next()
        .map(|(_, dev)| Path::new("/dev").join(dev))
}

/// Polls [`find_by_partname`] every 100 ms until `timeout`.
pub fn wait_for_partname(sys_block: &Path, names: &[&str], timeout: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_by_partname(sys_block, names) {
            return Some(dev);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_block(root: &Path, dev: &str, uevent: &str) {
        std::fs::create_dir_all(root.join(dev)).unwrap();
        std::fs::write(root.join(dev).join("uevent"), uevent).unwrap();
    }

    #[test]
    fn uevent_fields_parse() {
        let ev = parse_uevent(
            "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=appliance-data\n",
        );
        assert_eq!(ev.devname.as_deref(), Some("vda2"));
        assert_eq!(ev.devtype.as_deref(), Some("partition"));
        assert_eq!(ev.partname.as_deref(), Some("appliance-data"));
    }

    #[test]
    fn finds_the_named_partition_and_ignores_disks() {
        let dir = tempfile::tempdir().unwrap();
        fake_block(dir.path(), "vda", "DEVNAME=vda\nDEVTYPE=disk\n");
        fake_block(
            dir.path(),
            "vda1",
            "DEVNAME=vda1\nDEVTYPE=partition\nPARTNAME=EFI System Partition\n",
        );
        fake_block(
            dir.path(),
            "vda2",
            "DEVNAME=vda2\nDEVTYPE=partition\nPARTNAME=appliance-data\n",
        );
        assert_eq!(
            find_by_partname(dir.path(), &["appliance-data"]),
            Some(PathBuf::from("/dev/vda2"))
        );
        assert_eq!(
            find_by_partname(dir.path(), crate::contract::ESP_PARTNAMES),
            Some(PathBuf::from("/dev/vda1"))
        );
        assert_eq!(find_by_partname(dir.path(), &["other"]), None);
        assert_eq!(
            wait_for_partname(dir.path(), &["other"], Duration::from_millis(150)),
            None
        );
    }
}
