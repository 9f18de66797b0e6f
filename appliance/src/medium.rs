//! What the appliance booted from, as `/api/v1/version` reports it: the
//! device holding the data partition, whether it is a CD, a removable
//! stick or a fixed disk, whether it is read-only, and where state lives
//! (the data partition, or RAM when the medium is read-only or missing).
//!
//! Init decides ([`describe`]) and writes [`crate::contract::MEDIUM_FILE`]
//! (JSON); serve re-reads it on each version request. Parsing sysfs is
//! pure over a directory, so tests use a fake `/sys/class/block`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The body of `medium` in `GET /api/v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Medium {
    /// `disk`, `removable` (a USB stick), `cdrom`, or `none` (nothing
    /// found: netboot, or the data partition is missing).
    pub kind: String,
    /// The whole device, e.g. `/dev/vda` or `/dev/sr0`.
    pub device: Option<String>,
    pub read_only: bool,
    /// `partition` (persistent) or `ram` (a tmpfs: lost at power-off).
    pub state: String,
}

fn attr(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The whole-disk sysfs directory of `dev` (a partition or a disk) under
/// `sys_block` (normally `/sys/class/block`).
fn disk_dir(sys_block: &Path, dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?;
    let dir = std::fs::canonicalize(sys_block.join(name)).ok()?;
    if dir.join("partition").exists() {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir)
    }
}

fn kind_of(disk: &Path) -> String {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("sr") {
        "cdrom".into()
    } else if attr(disk, "removable").as_deref() == Some("1") {
        "removable".into()
    } else {
        "disk".into()
    }
}

/// Whether `dev` (a partition or disk) is read-only.
pub fn read_only(sys_block: &Path, dev: &Path) -> bool {
    let own = dev
        .file_name()
        .map(|n| sys_block.join(n))
        .and_then(|d| attr(&d, "ro"));
    let disk = disk_dir(sys_block, dev).and_then(|d| attr(&d, "ro"));
    own.as_deref() == Some("1") || disk.as_deref() == Some("1")
}

/// Describe the medium: the data partition's disk when there is one,
/// else the first CD drive with a medium in it.
pub fn describe(sys_block: &Path, data_dev: Option<&Path>, persistent: bool) -> Medium {
    let state = if persistent { "partition" } else { "ram" }.to_string();
    if let Some(dev) = data_dev {
        if let Some(disk) = disk_dir(sys_block, dev) {
            return Medium {
                kind: kind_of(&disk),
                device: disk
                    .file_name()
                    .map(|n| format!("/dev/{}", n.to_string_lossy())),
                read_only: read_only(sys_block, dev),
                state,
            };
        }
    }
    let mut cds: Vec<String> = std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sr"))
        .filter(|n| attr(&sys_block.join(n), "size").is_some_and(|s| s != "0"))
        .collect();
    cds.sort();
    match cds.first() {
        Some(cd) => Medium {
            kind: "cdrom".into(),
            device: Some(format!("/dev/{cd}")),
            read_only: true,
            state,
        },
        None => Medium {
            kind: "none".into(),
            device: None,
            read_only: false,
            state,
        },
    }
}

/// Init's record (written with temp + rename).
pub fn write(path: &Path, m: &Medium) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec(m)?;
    bytes.push(b'\n');
    crate::state::write_atomic(path, &bytes, false, crate::state::Secrecy::Public)?;
    Ok(())
}

/// Serve's read: `None` when init wrote none (not under init) or it is
/// unreadable.
pub fn read(path: &Path) -> Option<Medium> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/sys/class/block` with links into a devices tree, as the kernel
    /// lays it out.
    fn fake(root: &Path, disk: &str, parts: &[&str], removable: &str, ro: &str) {
        let dev = root.join("devices").join(disk);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("removable"), removable).unwrap();
        std::fs::write(dev.join("ro"), ro).unwrap();
        std::fs::write(dev.join("size"), "1000\n").unwrap();
        let class = root.join("class");
        std::fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&dev, class.join(disk)).unwrap();
        for p in parts {
            let pd = dev.join(p);
            std::fs::create_dir_all(&pd).unwrap();
            std::fs::write(pd.join("partition"), "2\n").unwrap();
            std::fs::write(pd.join("ro"), ro).unwrap();
            std::os::unix::fs::symlink(&pd, class.join(p)).unwrap();
        }
    }

    #[test]
    fn a_read_only_stick_is_removable_read_only_with_state_in_ram() {
        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "sda", &["sda1", "sda2"], "1\n", "1\n");
        let m = describe(&t.path().join("class"), Some(Path::new("/dev/sda2")), false);
        assert_eq!(
            m,
            Medium {
                kind: "removable".into(),
                device: Some("/dev/sda".into()),
                read_only: true,
                state: "ram".into(),
            }
        );
    }

    #[test]
    fn a_fixed_disk_is_persistent_and_a_cd_without_partitions_is_found() {
        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "vda", &["vda2"], "0\n", "0\n");
        fake(t.path(), "sr0", &[], "1\n", "1\n");
        let class = t.path().join("class");
        let m = describe(&class, Some(Path::new("/dev/vda2")), true);
        assert_eq!((m.kind.as_str(), m.read_only), ("disk", false));
        assert_eq!(m.device.as_deref(), Some("/dev/vda"));
        let m = describe(&class, None, false);
        assert_eq!(m.kind, "cdrom");
        assert_eq!(m.device.as_deref(), Some("/dev/sr0"));
        assert!(m.read_only);
        let file = t.path().join("medium");
        write(&file, &m).unwrap();
        assert_eq!(read(&file), Some(m));
    }
}
