//! Mounting: the early pseudo filesystems, the data partition and the ESP,
//! and unmounting at shutdown.

use std::path::Path;

use anyhow::{Context, Result};
use rustix::mount::{mount, mount_remount, unmount, MountFlags, UnmountFlags};

/// One early mount.
struct Early {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MountFlags,
    data: Option<&'static std::ffi::CStr>,
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /run and /tmp. A target
/// that is already mounted (`EBUSY`) is fine. Returns failures as reasons.
pub fn mount_early() -> Vec<String> {
    let nosuid_noexec_nodev = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    let list = [
        Early {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        Early {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        Early {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MountFlags::NOSUID,
            data: Some(c"mode=0755"),
        },
        Early {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MountFlags::NOSUID | MountFlags::NOEXEC,
            data: Some(c"gid=5,mode=0620,ptmxmode=0666"),
        },
        Early {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: Some(c"mode=0755"),
        },
        Early {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: Some(c"mode=1777"),
        },
    ];
    let mut failures = Vec::new();
    for m in list {
        let _ = std::fs::create_dir_all(m.target);
        match mount(m.source, m.target, m.fstype, m.flags, m.data) {
            Ok(()) | Err(rustix::io::Errno::BUSY) => {}
            Err(e) => failures.push(format!("mounting {} on {}: {e}", m.fstype, m.target)),
        }
    }
    failures
}

/// Points stdin, stdout and stderr at `/dev/console`.
pub fn attach_console() -> Result<()> {
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .context("opening /dev/console")?;
    rustix::stdio::dup2_stdin(&console).context("redirecting stdin")?;
    rustix::stdio::dup2_stdout(&console).context("redirecting stdout")?;
    rustix::stdio::dup2_stderr(&console).context("redirecting stderr")?;
    // When PID 1 started with fds 0-2 closed, the console itself may be one
    // of them: keep it open then.
    if std::os::fd::AsRawFd::as_raw_fd(&console) <= 2 {
        let _ = std::os::fd::IntoRawFd::into_raw_fd(console);
    }
    Ok(())
}

/// Mounts `dev` (ext4) read-write at `target`.
pub fn mount_ext4(dev: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount(
        dev,
        target,
        "ext4",
        MountFlags::NOATIME | MountFlags::NODEV | MountFlags::NOSUID,
        None,
    )
    .with_context(|| format!("mounting {} (ext4) on {}", dev.display(), target.display()))
}

/// Mounts `dev` (ext4) read-only at `target`, without replaying the
/// journal (the medium may be read-only: a CD, a locked stick).
pub fn mount_ext4_ro(dev: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount(
        dev,
        target,
        "ext4",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
        Some(c"noload"),
    )
    .with_context(|| {
        format!(
            "mounting {} (ext4, read-only) on {}",
            dev.display(),
            target.display()
        )
    })
}

/// Mounts `dev` (FAT) read-only at `target`.
pub fn mount_vfat_ro(dev: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount(
        dev,
        target,
        "vfat",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
        None,
    )
    .with_context(|| format!("mounting {} (vfat) on {}", dev.display(), target.display()))
}

/// Mounts a tmpfs at `target`.
pub fn mount_tmpfs(target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount(
        "tmpfs",
        target,
        "tmpfs",
        MountFlags::NODEV | MountFlags::NOSUID,
        Some(c"mode=0755"),
    )
    .with_context(|| format!("mounting tmpfs on {}", target.display()))
}

/// Unmounts `target`; when it is busy, remounts it read-only instead so the
/// filesystem is clean for power-off.
pub fn unmount_or_readonly(target: &Path) -> Result<()> {
    match unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => mount_remount(target, MountFlags::RDONLY, "")
            .with_context(|| format!("remounting busy {} read-only", target.display())),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
}

/// Unmounts `target`, detaching it if busy.
pub fn unmount_lazy(target: &Path) -> Result<()> {
    unmount(target, UnmountFlags::DETACH)
        .with_context(|| format!("unmounting {}", target.display()))
}
