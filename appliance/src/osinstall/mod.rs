//! The appliance's own OS installer: a machine PXE-booted into the agent
//! installs Debian onto its disk from the appliance's apt mirror, with only
//! `.deb`s (no `.udeb`s), the way MAAS's curtin or Tinkerbell's actions do.
//!
//! - [`server`]: decides which agents get an install (a system with netboot
//!   on whose profile's distro has `installer = "appliance"`), hands out the
//!   [`OsInstallWork`] with a single-purpose job token, records every phase
//!   (`<data>/state/os-installs.json`), turns netboot off at finish, marks
//!   silent installs stalled, and takes the installed system's first-boot
//!   report.
//! - [`target`]: what the agent does with the work: partition, make the
//!   filesystems, unpack the essential packages (first stage, in Rust,
//!   each `.deb` verified against the mirror's signed indexes), complete
//!   the install with the target's own `dpkg` and `apt` in a chroot
//!   (second stage), configure, install GRUB last, report, reboot.
//! - [`index`]: the signed-index chain the target checks (InRelease →
//!   Packages → `.deb`) and the package selection.

pub mod index;
pub mod server;
pub mod target;

use serde::{Deserialize, Serialize};

/// Packages every apt mirror carries besides its `required`/`important`
/// set and the repo's own list, where the index has them: what
/// [`target`] installs on every machine.
pub const MIRROR_BASE: &[&str] = &[
    "linux-image-amd64",
    "grub-efi-amd64",
    "grub-pc",
    "dosfstools",
    "e2fsprogs",
    "initramfs-tools",
    "systemd-sysv",
    "openssh-server",
    "sudo",
    // The kernel's initramfs is compressed with it (gzip is several
    // times slower).
    "zstd",
];

/// Where the target installs from: an apt mirror the appliance serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRef {
    /// The repo's name in the inventory.
    pub name: String,
    /// `http://<server>/repos/<name>`: the archive root (`dists/`, `pool/`).
    pub url: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Debian architecture, `amd64`.
    pub arch: String,
    /// The OpenPGP keyring the mirror's `InRelease` verifies against,
    /// base64 (binary or ASCII-armoured, as the repo names it).
    pub keyring_b64: String,
}

/// A user the installed system gets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// A crypt(3) hash (`$6$…`, `$y$…`); none: password login disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Member of `sudo`.
    #[serde(default)]
    pub sudo: bool,
}

/// The work an agent gets: install this OS onto the local disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInstallWork {
    /// The inventory system being installed.
    pub system: String,
    pub hostname: String,
    /// 1 for the first attempt; a machine that reboots mid-install (or
    /// after a failure, with a new check-in) gets the next.
    pub attempt: u64,
    /// Base URL of the appliance as the agent reached it.
    pub server_url: String,
    /// Job token: progress of this attempt and the first-boot report.
    pub token: String,
    pub mirror: MirrorRef,
    /// `required` (minimal: essential + required + what is asked for) or
    /// `important` (also every `important` package, like debootstrap).
    pub priority: String,
    /// Packages beyond the base (`packages` variable of the profile chain).
    pub packages: Vec<String>,
    /// Target disk name (`vda`, `nvme0n1`); none: chosen by policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Overwrite a disk that holds partitions.
    pub wipe: bool,
    /// EFI system partition size, MiB.
    pub esp_mib: u64,
    /// Root's crypt(3) password hash; none: root password login disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_ssh_authorized_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Kernel command line of the installed system (GRUB_CMDLINE_LINUX).
    pub kernel_options: String,
    pub timezone: String,
}

/// The installed system's first-boot report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FirstBoot {
    /// `/etc/debian_version`.
    #[serde(default)]
    pub debian_version: String,
    /// `uname -r`.
    #[serde(default)]
    pub kernel: String,
    /// `dpkg --audit` output (empty: clean).
    #[serde(default)]
    pub dpkg_audit: String,
    /// The hostname the system came up with.
    #[serde(default)]
    pub hostname: String,
}

/// Phases of an install, in order (reported as they start).
pub const PHASES: &[&str] = &[
    "assigned",
    "disk",
    "index",
    "download",
    "filesystems",
    "unpack",
    "base",
    "packages",
    "configure",
    "bootloader",
    "finish",
];
