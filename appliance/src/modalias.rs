//! Device modaliases: which devices the running machine has, and whether a
//! module's `alias=` pattern matches one of them (what udev and `modprobe`
//! do when a device appears, without either).
//!
//! A device's modalias is the one-line text in its sysfs `modalias` file,
//! e.g. `pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00` or
//! `virtio:d00000001v00001AF4`. A module's aliases are `fnmatch(3)` patterns
//! over those strings (`pci:v00001AF4d00001000sv*sd*bc*sc*i*`), matched
//! here by [`glob_match`].
//!
//! Not every alias names a device: `fs-ext4`, `crypto-crc32c`,
//! `char-major-10-229`, `devname:fuse` or a bare `ext3` let the kernel
//! request a module by function. [`is_device_alias`] tells them apart.

use std::collections::BTreeSet;
use std::path::Path;

/// Modalias bus prefixes the kernel's `file2alias` writes (the text before
/// the first `:`, a trailing `*` removed: `acpi*:` and `dmi*:` patterns).
const DEVICE_BUSES: &[&str] = &[
    "acpi",
    "amba",
    "ap",
    "auxiliary",
    "bcma",
    "ccw",
    "cdx",
    "coreboot",
    "cpu",
    "css",
    "dfl",
    "dmi",
    "eisa",
    "fsl-mc",
    "hdaudio",
    "hid",
    "i2c",
    "i3c",
    "ieee1394",
    "input",
    "ipack",
    "ishtp",
    "mcb",
    "mdio",
    "mei",
    "mhi",
    "mipscdmm",
    "nd",
    "of",
    "parisc",
    "pci",
    "pcmcia",
    "platform",
    "pnp",
    "rapidio",
    "rpmsg",
    "scsi",
    "sdio",
    "sdw",
    "serio",
    "slim",
    "spi",
    "spmi",
    "ssam",
    "ssb",
    "tbsvc",
    "tee",
    "typec",
    "ulpi",
    "usb",
    "vchiq",
    "vdpa",
    "vio",
    "virtio",
    "vmbus",
    "wmi",
    "x86cpu",
    "xen",
    "xen-backend",
    "zorro",
];

/// Whether a module alias matches devices (so a module that has one should
/// load only when such a device is present).
///
/// Rule: the alias has a `:` and the text before the first `:`, without a
/// trailing `*`, is a known modalias bus ([`DEVICE_BUSES`]). Anything else
/// (`fs-*`, `crypto-*`, `char-major-*`, `devname:*`, bare names, unknown
/// prefixes) is not a device alias. An unknown bus therefore errs on the
/// side of loading a module the image names, never of skipping it.
pub fn is_device_alias(alias: &str) -> bool {
    let Some((bus, _)) = alias.split_once(':') else {
        return false;
    };
    let bus = bus.strip_suffix('*').unwrap_or(bus);
    DEVICE_BUSES.binary_search(&bus).is_ok()
}

/// `fnmatch(pattern, text, 0)`: `*` any run, `?` any one character,
/// `[...]` a class (ranges `a-z`, negated by a leading `!` or `^`, a leading
/// `]` is literal; an unterminated `[` is literal), `\x` a literal `x`.
/// Byte-wise, as the kernel's modaliases are ASCII.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where to resume after the last `*`: (pattern after it, text position).
    let mut resume: Option<(usize, usize)> = None;
    while ti < t.len() {
        if p.get(pi) == Some(&b'*') {
            pi += 1;
            resume = Some((pi, ti));
            continue;
        }
        if let Some(next) = match_one(p, pi, t[ti]) {
            pi = next;
            ti += 1;
            continue;
        }
        match resume {
            Some((rp, rt)) => {
                pi = rp;
                ti = rt + 1;
                resume = Some((rp, rt + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether the one pattern element at `pi` (not `*`) matches `c`; the index
/// after that element if it does.
fn match_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match *p.get(pi)? {
        b'?' => Some(pi + 1),
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        b'[' => match class(p, pi, c) {
            Some((true, next)) => Some(next),
            Some((false, _)) => None,
            None => (c == b'[').then_some(pi + 1),
        },
        b => (b == c).then_some(pi + 1),
    }
}

/// A `[...]` class at `p[start]`: whether `c` is in it and the index after
/// the closing `]`; `None` when there is no closing `]`.
fn class(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let b = *p.get(i)?;
        if b == b']' && !first {
            return Some((found != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&e| e != b']') {
            let e = p[i + 2];
            found |= b <= c && c <= e;
            i += 3;
        } else {
            found |= b == c;
            i += 1;
        }
    }
}

/// Every device modalias under `sys_bus` (normally `/sys/bus`): the
/// non-empty lines of each `<bus>/devices/*/modalias`, sorted, once each.
/// ACPI devices are `/sys/bus/acpi/devices/*`. Unreadable entries are
/// skipped: a device that vanished or has no modalias has nothing to match.
pub fn present(sys_bus: &Path) -> Vec<String> {
    let mut out = BTreeSet::new();
    let Ok(buses) = std::fs::read_dir(sys_bus) else {
        return Vec::new();
    };
    for bus in buses.flatten() {
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for dev in devices.flatten() {
            if let Ok(text) = std::fs::read_to_string(dev.path().join("modalias")) {
                out.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_buses_are_sorted_for_binary_search() {
        assert!(DEVICE_BUSES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn device_aliases_are_told_from_function_aliases() {
        for a in [
            "pci:v00001AF4d00001000sv*sd*bc*sc*i*",
            "pci:v*d*sv*sd*bc0Csc03i30*",
            "virtio:d00000001v*",
            "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
            "scsi:t-0x00*",
            "acpi*:QEMU0002:*",
            "acpi*:PNP0C0A:*",
            "dmi*:svnLENOVO*",
            "of:N*T*Cqemu,fw-cfg-mmio",
            "of:N*T*Cqemu,fw-cfg-mmioC*",
            "platform:fw_cfg",
            "cpu:type:x86,ven*fam*mod*:feature:*0081*",
            "hid:b0003g*v0000046Dp0000C52B",
            "input:b*v*p*e*-e*1,*k*110*",
            "pnp:dPNP0501*",
            "xen:vbd",
        ] {
            assert!(is_device_alias(a), "{a}");
        }
        for a in [
            "fs-ext4",
            "ext3",
            "crypto-crc32c",
            "crc32c",
            "nls_utf8",
            "char-major-10-229",
            "block-major-8-*",
            "devname:fuse",
            "net-pf-10",
            "rtnl-link-bridge",
            "somebus:thing",
            "",
            ":",
        ] {
            assert!(!is_device_alias(a), "{a}");
        }
    }

    #[test]
    fn glob_matches_real_aliases_and_modaliases() {
        let virtio_net_pci = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00";
        let e1000e = "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00";
        let xhci = "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30";
        let virtio_dev = "virtio:d00000001v00001AF4";
        let cases = [
            ("pci:v00001AF4d00001000sv*sd*bc*sc*i*", virtio_net_pci, true),
            ("pci:v00001AF4d00001000sv*sd*bc*sc*i*", e1000e, false),
            ("pci:v00001AF4d*sv*sd*bc*sc*i*", virtio_net_pci, true),
            ("pci:v00008086d000010D3sv*sd*bc*sc*i*", e1000e, true),
            (
                "pci:v00008086d000010D3sv*sd*bc*sc*i*",
                virtio_net_pci,
                false,
            ),
            ("pci:v*d*sv*sd*bc0Csc03i30*", xhci, true),
            ("pci:v*d*sv*sd*bc0Csc03i20*", xhci, false),
            ("virtio:d00000001v*", virtio_dev, true),
            ("virtio:d00000002v*", virtio_dev, false),
            ("virtio:d00000001v*", "virtio:d00000001", false),
            ("acpi*:QEMU0002:*", "acpi:QEMU0002:", true),
            ("acpi*:QEMU0002:*", "acpi:QEMU0003:", false),
            ("scsi:t-0x00*", "scsi:t-0x00", true),
            ("scsi:t-0x00*", "scsi:t-0x05", false),
            (
                "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
                "usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00",
                true,
            ),
            (
                "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
                "usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip62in00",
                false,
            ),
            ("", "", true),
            ("*", "", true),
            ("?", "", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("**x", "yyx", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn glob_classes_and_escapes() {
        let cases = [
            ("[abc]", "b", true),
            ("[abc]", "d", false),
            ("[!abc]", "d", true),
            ("[^abc]", "a", false),
            ("[0-9A-F]x", "Cx", true),
            ("[0-9A-F]x", "cx", false),
            ("[]]", "]", true),
            ("[!]]", "]", false),
            ("[a-]", "-", true),
            ("v[0-9][0-9]*", "v12abc", true),
            ("v[0-9][0-9]*", "v1a", false),
            ("[unterminated", "[unterminated", true),
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("a?c", "abc", true),
            (
                "of:N*T*Cqemu,fw-cfg-mmio",
                "of:NfwcfgTCqemu,fw-cfg-mmio",
                true,
            ),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn present_reads_every_bus_once() {
        let dir = tempfile::tempdir().unwrap();
        let dev = |bus: &str, name: &str, alias: Option<&str>| {
            let d = dir.path().join(bus).join("devices").join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(a) = alias {
                std::fs::write(d.join("modalias"), a).unwrap();
            }
        };
        dev(
            "pci",
            "0000:00:01.0",
            Some("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n"),
        );
        dev("virtio", "virtio0", Some("virtio:d00000001v00001AF4\n"));
        dev("acpi", "QEMU0002:00", Some("acpi:QEMU0002:\n"));
        dev("platform", "QEMU0002:00", Some("acpi:QEMU0002:\n"));
        dev("pci", "0000:00:00.0", None);
        std::fs::create_dir_all(dir.path().join("nodevices")).unwrap();
        assert_eq!(
            present(dir.path()),
            [
                "acpi:QEMU0002:",
                "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
                "virtio:d00000001v00001AF4",
            ]
        );
        assert!(present(&dir.path().join("missing")).is_empty());
    }
}
