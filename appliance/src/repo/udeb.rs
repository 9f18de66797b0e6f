//! The Debian installer's part of a mirror (`installer` repos): which
//! udebs to mirror, and fetching them where upstream serves them.
//!
//! The installer (anna) downloads, from the mirror it was given, the udebs
//! of priority `standard` and above, the kernel module udebs for its own
//! kernel ABI, and what they depend on. [`select`] picks that set from a
//! `main/debian-installer/binary-<arch>/Packages` index: the ABI is the
//! newest `kernel-image-<abi>-di`'s, and udebs built for another ABI
//! (`*-<other abi>-di`) are left out.
//!
//! Some package sources serve `.deb`s but answer 404 for every `.udeb`
//! (the host's archive here does). A udeb that upstream does not have is
//! recorded in the manifest's `missing` list (`appliance repo show`
//! prints it) instead of failing the sync: the installer index is still
//! published byte for byte, so the installer accepts the mirror, and an
//! operator sees which components an install would lack. Any other error
//! (a hash mismatch, a dropped connection) fails the sync as for a `.deb`.
//!
//! With `installer`, the sync also mirrors the signed netboot package
//! (`debian-installer-<release>-netboot-<arch>`, a normal `.deb` in
//! `main`), from which `appliance import --repo` takes the installer's
//! kernel and initrd ([`super::installer`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bundle::debian::{self, DebianError, Package};
use serde::{Deserialize, Serialize};

/// A file of the mirror that upstream did not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    /// The mirror path (`pool/main/…/x.udeb`).
    pub path: String,
    /// `name_version_arch`.
    pub package: String,
    /// What upstream answered.
    pub reason: String,
}

/// The kernel ABI (`6.1.0-50-amd64`) a udeb name is built for: the part
/// between `kernel-image-` or `<name>-modules-` and `-di`.
pub fn abi_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix("-di")?;
    if let Some(abi) = stem.strip_prefix("kernel-image-") {
        return Some(abi);
    }
    let i = stem.find("-modules-")?;
    Some(&stem[i + "-modules-".len()..])
}

/// The installer's kernel ABI in an index: that of the newest
/// `kernel-image-<abi>-di` (by version, then name).
pub fn installer_abi(index: &[Package]) -> Option<String> {
    index
        .iter()
        .filter(|p| p.name.starts_with("kernel-image-") && p.name.ends_with("-di"))
        .max_by(|a, b| {
            debian::compare_versions(&a.version, &b.version).then_with(|| a.name.cmp(&b.name))
        })
        .and_then(|p| abi_of(&p.name).map(str::to_owned))
}

/// Every kernel ABI the index has `kernel-image-*-di` udebs for.
pub fn installer_abis(index: &[Package]) -> BTreeSet<String> {
    index
        .iter()
        .filter(|p| p.name.starts_with("kernel-image-"))
        .filter_map(|p| abi_of(&p.name).map(str::to_owned))
        .collect()
}

/// The udebs an installer booted with the index's newest kernel fetches:
/// priority `required`, `important` or `standard`, every module udeb for
/// its ABI, and the `Depends`/`Pre-Depends` closure of those (first
/// existing alternative, else first provider), newest version of each.
/// Udebs for another ABI are never chosen. Returns (ABI, packages).
pub fn select(index: &[Package]) -> (Option<String>, Vec<Package>) {
    let abi = installer_abi(index);
    let fits = |p: &Package| match abi_of(&p.name) {
        Some(a) => Some(a) == abi.as_deref(),
        None => true,
    };
    let mut newest: HashMap<&str, &Package> = HashMap::new();
    let mut providers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in index.iter().filter(|p| fits(p)) {
        match newest.get(p.name.as_str()) {
            Some(q) if debian::compare_versions(&q.version, &p.version).is_ge() => {}
            _ => {
                newest.insert(&p.name, p);
            }
        }
        for v in &p.provides {
            providers.entry(v).or_default().push(&p.name);
        }
    }
    let mut todo: Vec<&str> = newest
        .values()
        .filter(|p| {
            matches!(
                p.priority.as_deref(),
                Some("required" | "important" | "standard")
            ) || (abi.is_some() && abi_of(&p.name).is_some())
        })
        .map(|p| p.name.as_str())
        .collect();
    let mut chosen: BTreeSet<&str> = BTreeSet::new();
    while let Some(n) = todo.pop() {
        if !chosen.insert(n) {
            continue;
        }
        let p = newest[n];
        for group in p.depends.iter().chain(&p.pre_depends) {
            let pick = group
                .iter()
                .find(|d| chosen.contains(d.name.as_str()))
                .or_else(|| group.iter().find(|d| newest.contains_key(d.name.as_str())))
                .map(|d| d.name.as_str())
                .or_else(|| {
                    group.iter().find_map(|d| {
                        providers
                            .get(d.name.as_str())
                            .and_then(|v| v.iter().min().copied())
                    })
                });
            // A dependency the index cannot satisfy (one for another ABI,
            // or a virtual package only the initrd provides) is skipped:
            // the installer resolves against what it already has.
            if let Some(d) = pick {
                todo.push(d);
            }
        }
    }
    let out = chosen.into_iter().map(|n| newest[n].clone()).collect();
    (abi, out)
}

/// The netboot package names (`debian-installer-<N>-netboot-<arch>`) an
/// index holds for `arch`.
pub fn netboot_packages(index: &[Package], arch: &str) -> Vec<String> {
    let suffix = format!("-netboot-{arch}");
    let names: BTreeSet<String> = index
        .iter()
        .filter(|p| p.name.starts_with("debian-installer-") && p.name.ends_with(&suffix))
        .map(|p| p.name.clone())
        .collect();
    names.into_iter().collect()
}

/// Whether a fetch error is upstream saying it does not have the file.
pub fn is_not_found(e: &DebianError) -> bool {
    match e {
        DebianError::Fetch { detail, .. } => {
            let d = detail.to_ascii_lowercase();
            d.contains("404") || d.contains("not found")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udeb(name: &str, version: &str, priority: &str, depends: &str) -> Package {
        let text = format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nPriority: {priority}\n\
             Filename: pool/main/{name}_{version}_amd64.udeb\nSize: 1\nSHA256: {}\n{}",
            "0".repeat(64),
            if depends.is_empty() {
                String::new()
            } else {
                format!("Depends: {depends}\n")
            },
        );
        debian::parse_packages(&text, "test").unwrap().remove(0)
    }

    #[test]
    fn the_newest_kernel_abi_is_chosen_and_other_abis_are_left_out() {
        let index = vec![
            udeb(
                "kernel-image-6.1.0-47-amd64-di",
                "6.1.170-1",
                "standard",
                "",
            ),
            udeb(
                "kernel-image-6.1.0-50-amd64-di",
                "6.1.176-1",
                "standard",
                "",
            ),
            udeb("nic-modules-6.1.0-47-amd64-di", "6.1.170-1", "standard", ""),
            udeb(
                "nic-modules-6.1.0-50-amd64-di",
                "6.1.176-1",
                "optional",
                "kernel-image-6.1.0-50-amd64-di",
            ),
            udeb("anna", "1.87", "standard", "libdebian-installer4-udeb"),
            udeb("libdebian-installer4-udeb", "0.123", "optional", ""),
            udeb("partman-base", "229", "standard", "parted-udeb | nope"),
            udeb("parted-udeb", "3.5", "optional", ""),
            udeb("network-console", "1.90", "optional", ""),
        ];
        let (abi, chosen) = select(&index);
        assert_eq!(abi.as_deref(), Some("6.1.0-50-amd64"));
        let names: Vec<&str> = chosen.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "anna",
                "kernel-image-6.1.0-50-amd64-di",
                "libdebian-installer4-udeb",
                "nic-modules-6.1.0-50-amd64-di",
                "parted-udeb",
                "partman-base",
            ]
        );
        assert_eq!(
            installer_abis(&index).into_iter().collect::<Vec<_>>(),
            ["6.1.0-47-amd64", "6.1.0-50-amd64"]
        );
        assert_eq!(abi_of("anna"), None);
        assert_eq!(
            abi_of("fat-modules-6.1.0-50-amd64-di"),
            Some("6.1.0-50-amd64")
        );
    }

    #[test]
    fn a_404_is_told_apart_from_other_fetch_errors() {
        let nf = DebianError::Fetch {
            url: "http://x/a.udeb".into(),
            detail: "http status: 404".into(),
        };
        let other = DebianError::Fetch {
            url: "http://x/a.udeb".into(),
            detail: "connection refused".into(),
        };
        assert!(is_not_found(&nf));
        assert!(!is_not_found(&other));
    }
}
