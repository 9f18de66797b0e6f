//! Hardware inventory of the machine an agent runs on: NICs, disks (size,
//! serial, removable), memory, CPUs, firmware type and DMI identity, read
//! from `/sys` and `/proc`. Every reader takes the root directory, so tests
//! run against a fake tree.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// `uefi` or `bios`.
    pub firmware: String,
    pub cpus: u32,
    pub cpu_model: Option<String>,
    pub memory_bytes: u64,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub driver: Option<String>,
    /// Link speed in Mbit/s, when the driver reports one.
    pub speed_mbps: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub removable: bool,
    pub rotational: bool,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `MemTotal` from `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Processor count and model from `/proc/cpuinfo` text.
pub fn parse_cpuinfo(text: &str) -> (u32, Option<String>) {
    let n = text.lines().filter(|l| l.starts_with("processor")).count() as u32;
    let model = text
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    (n, model)
}

/// Collect the inventory under `root` (`/` on a real machine).
pub fn collect(root: &Path) -> Hardware {
    let sys = root.join("sys");
    let (cpus, cpu_model) =
        parse_cpuinfo(&fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default());
    let mut nics = Vec::new();
    if let Ok(rd) = fs::read_dir(sys.join("class/net")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            // Physical NICs have a `device` link; skip lo, bridges, tunnels.
            if name == "lo" || !dir.join("device").exists() {
                continue;
            }
            let Some(mac) = read_trim(&dir.join("address")) else {
                continue;
            };
            let driver = fs::read_link(dir.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
            let speed_mbps = read_trim(&dir.join("speed"))
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|&s| s > 0)
                .map(|s| s as u32);
            nics.push(Nic {
                name,
                mac,
                driver,
                speed_mbps,
            });
        }
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    let mut disks = Vec::new();
    if let Ok(rd) = fs::read_dir(sys.join("block")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "md", "sr", "fd"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                continue;
            }
            let dir = e.path();
            let sectors: u64 = read_trim(&dir.join("size"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            let serial = read_trim(&dir.join("device/serial"))
                .or_else(|| read_trim(&dir.join("serial")))
                .or_else(|| read_trim(&dir.join("device/wwid")));
            disks.push(Disk {
                name,
                size_bytes: sectors * 512,
                model: read_trim(&dir.join("device/model")),
                serial,
                removable: read_trim(&dir.join("removable")).as_deref() == Some("1"),
                rotational: read_trim(&dir.join("queue/rotational")).as_deref() == Some("1"),
            });
        }
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    let dmi = sys.join("class/dmi/id");
    Hardware {
        firmware: if sys.join("firmware/efi").exists() {
            "uefi"
        } else {
            "bios"
        }
        .into(),
        cpus,
        cpu_model,
        memory_bytes: parse_meminfo(
            &fs::read_to_string(root.join("proc/meminfo")).unwrap_or_default(),
        ),
        nics,
        disks,
        vendor: read_trim(&dmi.join("sys_vendor")),
        product: read_trim(&dmi.join("product_name")),
        serial: read_trim(&dmi.join("product_serial")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, p: &str, s: &str) {
        let p = root.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn collects_from_a_fake_tree() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(r, "proc/cpuinfo", "processor\t: 0\nmodel name\t: QEMU Virtual CPU\n\nprocessor\t: 1\nmodel name\t: QEMU Virtual CPU\n");
        write(
            r,
            "proc/meminfo",
            "MemTotal:        1014212 kB\nMemFree: 1 kB\n",
        );
        write(r, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
        write(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        write(r, "sys/block/vda/size", "8388608\n");
        write(r, "sys/block/vda/serial", "disk-serial-1\n");
        write(r, "sys/block/vda/removable", "0\n");
        write(r, "sys/block/loop0/size", "100\n");
        write(r, "sys/block/sda/size", "0\n");
        fs::create_dir_all(r.join("sys/firmware/efi")).unwrap();
        write(
            r,
            "sys/class/dmi/id/product_name",
            "Standard PC (Q35 + ICH9, 2009)\n",
        );
        let hw = collect(r);
        assert_eq!(hw.firmware, "uefi");
        assert_eq!(hw.cpus, 2);
        assert_eq!(hw.cpu_model.as_deref(), Some("QEMU Virtual CPU"));
        assert_eq!(hw.memory_bytes, 1014212 * 1024);
        assert_eq!(hw.nics.len(), 1);
        assert_eq!(hw.nics[0].mac, "52:54:00:12:34:56");
        assert_eq!(hw.disks.len(), 1);
        assert_eq!(hw.disks[0].size_bytes, 4 << 30);
        assert_eq!(hw.disks[0].serial.as_deref(), Some("disk-serial-1"));
        assert_eq!(
            hw.product.as_deref(),
            Some("Standard PC (Q35 + ICH9, 2009)")
        );
    }
}
