//! Giving a deployed clone its own identity, on the mounted root
//! filesystem of the written disk (or any directory: host-testable):
//!
//! - `/etc/hostname` (and the `127.0.1.1` line of `/etc/hosts`);
//! - `/etc/machine-id` emptied: systemd makes a new one at first boot
//!   (a copy in `/var/lib/dbus/machine-id` is removed);
//! - network settings from the system record as systemd-networkd files
//!   `/etc/systemd/network/10-appliance-<iface>.network`, matched by MAC
//!   (static address when the record has one, else DHCP); earlier
//!   `10-appliance-*` files are replaced;
//! - SSH host keys removed, and a first-boot unit
//!   (`appliance-ssh-hostkeys.service`, enabled for `multi-user.target`)
//!   that runs `ssh-keygen -A` before the SSH daemon starts.
//!
//! Safety: the tree belongs to another machine, so no path is followed
//! through a symlink: a symlinked directory on the way is an error, and a
//! symlinked file is replaced by a regular file (never written through,
//! which could land outside `root`).

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::inventory::model::System;

pub const SSH_UNIT: &str = "appliance-ssh-hostkeys.service";
const NETWORK_PREFIX: &str = "10-appliance-";

const SSH_UNIT_TEXT: &str = "\
# Written by the appliance when this machine was deployed from a capture:
# the captured SSH host keys were removed; make new ones at first boot.
[Unit]
Description=Regenerate SSH host keys after a clone deploy
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service sshd.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

/// What [`apply`] changed, for the deploy's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentityReport {
    pub hostname: String,
    pub machine_id_reset: bool,
    pub network_files: Vec<String>,
    pub ssh_keys_removed: Vec<String>,
}

/// `root` joined with a relative path whose every existing directory on
/// the way is a real directory (not a symlink); missing ones are created.
fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let rel = Path::new(rel);
    let mut p = root.to_owned();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        let Component::Normal(name) = c else {
            bail!("{} is not a plain relative path", rel.display());
        };
        p.push(name);
        if i + 1 == comps.len() {
            break;
        }
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "{} is a symlink in the deployed tree; refusing to follow it",
                p.display()
            ),
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} is not a directory", p.display()),
            Err(_) => {
                std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?
            }
        }
    }
    Ok(p)
}

/// Replaces the file at `rel` (never through a symlink).
fn put(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = inside(root, rel)?;
    if let Ok(m) = std::fs::symlink_metadata(&p) {
        if m.is_dir() {
            bail!("{} is a directory", p.display());
        }
        std::fs::remove_file(&p).with_context(|| format!("replacing {}", p.display()))?;
    }
    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", p.display()))
}

fn remove(root: &Path, rel: &str) -> Result<bool> {
    let p = inside(root, rel)?;
    match std::fs::symlink_metadata(&p) {
        Ok(m) if !m.is_dir() => {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// A dotted netmask (`255.255.255.0`) or a prefix (`24`) as a prefix length.
fn prefix_len(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let ip: std::net::Ipv4Addr = mask.parse().ok()?;
    let bits = u32::from(ip);
    let n = bits.leading_ones();
    (bits.checked_shl(n).unwrap_or(0) == 0).then_some(n as u8)
}

/// The networkd file for one interface of the record.
pub fn network_file(i: &crate::inventory::model::Interface) -> Result<String> {
    let mut s = String::from("# Written by the appliance from the system record.\n[Match]\n");
    s.push_str(&format!("MACAddress={}\n\n[Network]\n", i.mac));
    if i.ip.is_empty() {
        s.push_str("DHCP=yes\n");
    } else {
        let addr = if i.ip.contains('/') {
            i.ip.clone()
        } else {
            let p = if i.netmask.is_empty() {
                24
            } else {
                prefix_len(&i.netmask)
                    .with_context(|| format!("interface {}: netmask {:?}", i.name, i.netmask))?
            };
            format!("{}/{p}", i.ip)
        };
        s.push_str(&format!("Address={addr}\n"));
        if !i.gateway.is_empty() {
            s.push_str(&format!("Gateway={}\n", i.gateway));
        }
        for d in &i.dns {
            s.push_str(&format!("DNS={d}\n"));
        }
    }
    Ok(s)
}

/// Applies the system's identity to the tree at `root`.
pub fn apply(root: &Path, system: &System) -> Result<IdentityReport> {
    let mut report = IdentityReport::default();
    let hostname = if system.hostname.is_empty() {
        system.name.clone()
    } else {
        system.hostname.clone()
    };
    if hostname.is_empty()
        || hostname.len() > 253
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        bail!("{hostname:?} is not a valid hostname");
    }
    put(
        root,
        "etc/hostname",
        format!("{hostname}\n").as_bytes(),
        0o644,
    )?;
    let hosts_path = inside(root, "etc/hosts")?;
    let hosts = match std::fs::symlink_metadata(&hosts_path) {
        Ok(m) if m.is_file() => std::fs::read_to_string(&hosts_path).unwrap_or_default(),
        _ => "127.0.0.1\tlocalhost\n".to_owned(),
    };
    let short = hostname.split('.').next().unwrap_or(&hostname);
    let mine = if short == hostname {
        format!("127.0.1.1\t{hostname}")
    } else {
        format!("127.0.1.1\t{hostname} {short}")
    };
    let mut lines: Vec<String> = hosts
        .lines()
        .filter(|l| !l.starts_with("127.0.1.1"))
        .map(str::to_owned)
        .collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("127.0.0.1"))
        .map_or(0, |i| i + 1);
    lines.insert(at, mine);
    put(
        root,
        "etc/hosts",
        (lines.join("\n") + "\n").as_bytes(),
        0o644,
    )?;
    report.hostname = hostname;

    put(root, "etc/machine-id", b"", 0o444)?;
    if let Ok(m) = std::fs::symlink_metadata(inside(root, "var/lib/dbus/machine-id")?) {
        if m.is_file() {
            remove(root, "var/lib/dbus/machine-id")?;
        }
    }
    report.machine_id_reset = true;

    let netdir = inside(root, "etc/systemd/network/x")?;
    let netdir = netdir.parent().expect("has a parent");
    std::fs::create_dir_all(netdir).with_context(|| format!("creating {}", netdir.display()))?;
    for e in std::fs::read_dir(netdir)
        .with_context(|| format!("listing {}", netdir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(NETWORK_PREFIX) && name.ends_with(".network") {
            remove(root, &format!("etc/systemd/network/{name}"))?;
        }
    }
    for (n, i) in system.interfaces.iter().enumerate() {
        if i.mac.is_empty() {
            continue;
        }
        let iface = if i.name.is_empty() {
            format!("if{n}")
        } else {
            i.name.clone()
        };
        if !iface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("interface name {iface:?} cannot name a file");
        }
        let rel = format!("etc/systemd/network/{NETWORK_PREFIX}{iface}.network");
        put(root, &rel, network_file(i)?.as_bytes(), 0o644)?;
        report.network_files.push(format!("/{rel}"));
    }

    let sshdir = root.join("etc/ssh");
    if std::fs::symlink_metadata(&sshdir).is_ok_and(|m| m.is_dir()) {
        let mut names: Vec<String> = std::fs::read_dir(&sshdir)
            .with_context(|| format!("listing {}", sshdir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with("ssh_host_") && (n.ends_with("_key") || n.ends_with("_key.pub"))
            })
            .collect();
        names.sort();
        for n in names {
            remove(root, &format!("etc/ssh/{n}"))?;
            report.ssh_keys_removed.push(format!("/etc/ssh/{n}"));
        }
    }
    put(
        root,
        &format!("etc/systemd/system/{SSH_UNIT}"),
        SSH_UNIT_TEXT.as_bytes(),
        0o644,
    )?;
    let link = inside(
        root,
        &format!("etc/systemd/system/multi-user.target.wants/{SSH_UNIT}"),
    )?;
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{SSH_UNIT}"), &link)
        .with_context(|| format!("enabling {SSH_UNIT}"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::Interface;

    fn system() -> System {
        System {
            name: "web-2".into(),
            hostname: "web-2.lab".into(),
            interfaces: vec![
                Interface {
                    name: "eth0".into(),
                    mac: "52:54:00:00:00:02".into(),
                    ip: "10.0.0.12".into(),
                    netmask: "255.255.255.0".into(),
                    gateway: "10.0.0.1".into(),
                    dns: vec!["10.0.0.53".into()],
                    ..Interface::default()
                },
                Interface {
                    name: "eth1".into(),
                    mac: "52:54:00:00:01:02".into(),
                    ..Interface::default()
                },
            ],
            ..System::default()
        }
    }

    #[test]
    fn sets_identity_on_a_plain_directory() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(r.join("etc/systemd/network")).unwrap();
        std::fs::create_dir_all(r.join("var/lib/dbus")).unwrap();
        std::fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(r.join("var/lib/dbus/machine-id"), "0123\n").unwrap();
        std::fs::write(
            r.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tsource\n::1 ip6\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key.pub"), "pub").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config"), "keep").unwrap();
        std::fs::write(r.join("etc/systemd/network/10-appliance-old.network"), "x").unwrap();
        std::fs::write(r.join("etc/systemd/network/50-mine.network"), "keep").unwrap();
        // A symlinked hostname pointing outside the tree is replaced, not
        // written through.
        let outside = d.path().join("outside");
        std::fs::write(&outside, "untouched").unwrap();
        std::os::unix::fs::symlink(&outside, r.join("etc/hostname")).unwrap();

        let rep = apply(r, &system()).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "web-2.lab\n"
        );
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hosts")).unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tweb-2.lab web-2\n::1 ip6\n"
        );
        assert_eq!(std::fs::read(r.join("etc/machine-id")).unwrap(), b"");
        assert!(!r.join("var/lib/dbus/machine-id").exists());
        assert!(!r.join("etc/ssh/ssh_host_ed25519_key").exists());
        assert!(r.join("etc/ssh/sshd_config").exists());
        assert_eq!(rep.ssh_keys_removed.len(), 2);
        assert!(!r
            .join("etc/systemd/network/10-appliance-old.network")
            .exists());
        assert!(r.join("etc/systemd/network/50-mine.network").exists());
        assert_eq!(
            std::fs::read_to_string(r.join("etc/systemd/network/10-appliance-eth0.network")).unwrap(),
            "# Written by the appliance from the system record.\n[Match]\nMACAddress=52:54:00:00:00:02\n\n[Network]\nAddress=10.0.0.12/24\nGateway=10.0.0.1\nDNS=10.0.0.53\n"
        );
        assert!(
            std::fs::read_to_string(r.join("etc/systemd/network/10-appliance-eth1.network"))
                .unwrap()
                .contains("DHCP=yes")
        );
        let unit = std::fs::read_to_string(r.join("etc/systemd/system").join(SSH_UNIT)).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/ssh-keygen -A"));
        assert_eq!(
            std::fs::read_link(
                r.join("etc/systemd/system/multi-user.target.wants")
                    .join(SSH_UNIT)
            )
            .unwrap(),
            Path::new("/etc/systemd/system").join(SSH_UNIT)
        );
        // Applying twice gives the same tree.
        assert_eq!(
            apply(r, &system()).unwrap().network_files,
            rep.network_files
        );
    }

    #[test]
    fn refuses_symlinked_directories_and_bad_names() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), d.path().join("etc")).unwrap();
        let e = apply(d.path(), &system()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        let mut s = system();
        s.hostname = "bad name".into();
        assert!(apply(tempfile::tempdir().unwrap().path(), &s).is_err());
        assert_eq!(prefix_len("255.255.240.0"), Some(20));
        assert_eq!(prefix_len("255.0.255.0"), None);
    }
}
