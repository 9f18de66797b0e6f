//! `cargo xtask bench install`: the appliance's Debian installer against
//! its floor, on this host, from the same mirror (a host appliance serving
//! a mirror of the host's Debian archive on loopback, see
//! `integration_tests::mirror`).
//!
//! - ours: `appliance os-install` (what a PXE-booted agent runs) onto a
//!   loop device: verify the indexes, download, partition, mkfs, unpack,
//!   dpkg, apt, configure, GRUB (BIOS: the host kernel has no vfat);
//!   phase by phase.
//! - floor: `debootstrap --variant=minbase` into a plain directory, then
//!   `apt-get install` of the same second-stage packages in a chroot (no
//!   partitioning, filesystems or boot loader: less work than ours).
//! - four at once: four `appliance os-install` onto four loop devices at
//!   the same time, against one mirror; printed as its own JSON line
//!   (`install-4`, against one target's time).
//!
//! The install under QEMU (TCG) is measured by the OS install test, which
//! prints each phase. Needs root (loop devices, chroot).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use integration_tests::mirror::{appliance_bin, HostMirror};

const PACKAGES: &[&str] = &["openssh-server", "less"];

fn sh(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        // Partitions attached by the installer (a host kernel that does
        // not scan loop partitions) first, then the disk.
        if let Ok(list) = sh(Command::new("losetup").args([
            "--list",
            "--noheadings",
            "--output",
            "NAME,BACK-FILE",
        ])) {
            for l in list.lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() == 2 && f[1] == self.0 {
                    let _ = Command::new("losetup").args(["-d", f[0]]).status();
                }
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn loop_disk(file: &Path) -> Result<Loop> {
    std::fs::File::create(file)?.set_len(8 << 30)?;
    let dev = sh(Command::new("losetup").args(["--find", "--show"]).arg(file))?;
    Ok(Loop(dev.trim().to_owned()))
}

fn work_json(m: &HostMirror, disk: &str, system: &str) -> Result<serde_json::Value> {
    let keyring = std::fs::read("/usr/share/keyrings/debian-archive-keyring.gpg")
        .context("Debian's archive keyring (debian-archive-keyring)")?;
    Ok(serde_json::json!({
        "system": system, "hostname": system, "attempt": 1,
        "server_url": m.url(), "token": "bench",
        "mirror": {
            "name": "bookworm", "url": format!("{}/repos/bookworm", m.url()),
            "suite": "bookworm", "components": ["main"], "arch": "amd64",
            "keyring_b64": base64::engine::general_purpose::STANDARD.encode(keyring),
        },
        "priority": "required", "packages": PACKAGES, "disk": disk, "wipe": true,
        "esp_mib": 256, "kernel_options": "console=ttyS0,115200", "timezone": "",
        "root_ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZhY2VkZWFkYmVlZmNhZmVmYWNlZGVhZGJlZWZjYWZl bench"],
    }))
}

/// One `appliance os-install` onto `disk`; its phase report.
fn ours(m: &HostMirror, dir: &Path, n: usize) -> Result<std::process::Child> {
    let file = dir.join(format!("disk{n}.img"));
    let disk = loop_disk(&file)?;
    let work = dir.join(format!("work{n}.json"));
    std::fs::write(
        &work,
        serde_json::to_vec(&work_json(m, &disk.0, &format!("bench{n}"))?)?,
    )?;
    std::mem::forget(disk); // detached by `cleanup`
    Command::new(appliance_bin())
        .args([
            "os-install",
            "--firmware",
            "bios",
            "--mac",
            &format!("52:54:00:99:00:{n:02x}"),
            "--work",
        ])
        .arg(&work)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting appliance os-install")
}

fn finish(child: std::process::Child) -> Result<serde_json::Value> {
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!(
            "appliance os-install failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("the install's report: {last:?}"))
}

fn cleanup(dir: &Path) {
    if let Ok(list) =
        sh(Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]))
    {
        let d = dir.display().to_string();
        // Partition loops (backed by a loop device) first.
        let mut names: Vec<(String, String)> = list
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 2).then(|| (f[0].to_owned(), f[1].to_owned()))
            })
            .collect();
        let disks: Vec<String> = names
            .iter()
            .filter(|(_, b)| b.starts_with(&d))
            .map(|(n, _)| n.clone())
            .collect();
        names.retain(|(_, b)| disks.contains(b));
        for (n, _) in names {
            let _ = Command::new("losetup").args(["-d", &n]).status();
        }
        for n in disks {
            let _ = Command::new("losetup").args(["-d", &n]).status();
        }
    }
}

fn floor(m: &HostMirror, dir: &Path) -> Result<f64> {
    let root = dir.join("floor");
    let _ = std::fs::remove_dir_all(&root);
    let index = sh(Command::new("curl")
        .args([
            "-fsS",
            &format!(
                "{}/repos/bookworm/dists/bookworm/main/binary-amd64/Packages.xz",
                m.url()
            ),
        ])
        .arg("-o")
        .arg(dir.join("Packages.xz")))
    .and_then(|_| {
        sh(Command::new("xz")
            .args(["-dc"])
            .arg(dir.join("Packages.xz")))
    })?;
    let mut required: Vec<String> = bundle::debian::parse_packages(&index, "Packages")?
        .into_iter()
        .filter(|p| p.priority.as_deref() == Some("required"))
        .map(|p| p.name)
        .collect();
    required.sort();
    required.dedup();
    let t = Instant::now();
    sh(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
            "bookworm",
        ])
        .arg(&root)
        .arg(format!("{}/repos/bookworm", m.url())))?;
    for (src, dst, fs) in [("proc", "proc", "proc"), ("sysfs", "sys", "sysfs")] {
        sh(Command::new("mount")
            .args(["-t", fs, src])
            .arg(root.join(dst)))?;
    }
    sh(Command::new("mount")
        .args(["--bind", "/dev"])
        .arg(root.join("dev")))?;
    let mut pkgs = required;
    pkgs.extend(
        ["systemd-sysv", "linux-image-amd64", "grub-pc"]
            .iter()
            .map(|s| s.to_string()),
    );
    pkgs.extend(PACKAGES.iter().map(|s| s.to_string()));
    let r = sh(Command::new("chroot")
        .arg(&root)
        .args(["apt-get", "install", "--yes", "--no-install-recommends"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    for d in ["dev", "sys", "proc"] {
        let _ = Command::new("umount").arg(root.join(d)).status();
    }
    r?;
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&root);
    Ok(s)
}

pub fn run() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("bench install needs root (loop devices, chroot)");
    }
    let m = HostMirror::start().map_err(anyhow::Error::msg)?;
    eprintln!("host mirror ready ({:.1} s sync check)", m.sync_secs);
    let dir: PathBuf = crate::root().join("target/bench-install");
    cleanup(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let t = Instant::now();
    let report = finish(ours(&m, &dir, 0)?);
    let one = t.elapsed().as_secs_f64();
    cleanup(&dir);
    let report = report?;
    eprintln!("ours, one target: {one:.1} s; phases (s): {report}");

    let floor_s = floor(&m, &dir)?;
    eprintln!("floor (debootstrap --variant=minbase + apt-get install): {floor_s:.1} s");

    let t = Instant::now();
    let kids: Vec<_> = (1..=4).map(|n| ours(&m, &dir, n)).collect::<Result<_>>()?;
    let results: Vec<_> = kids.into_iter().map(finish).collect();
    let four = t.elapsed().as_secs_f64();
    cleanup(&dir);
    for r in results {
        r?;
    }
    eprintln!(
        "ours, four targets at once: {four:.1} s ({:.2}× one)",
        four / one
    );
    let _ = std::fs::remove_dir_all(&dir);
    crate::bench::report("install-4", four, "one target", one, "s", "lower");
    crate::bench::report("install", one, "debootstrap+apt-get", floor_s, "s", "lower");
    Ok(())
}
