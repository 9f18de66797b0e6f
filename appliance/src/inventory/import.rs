//! `appliance import`: recognise an installer tree, copy its kernel and
//! initrd into the blob store (`<data>/blobs/sha256/<hex>`, content
//! addressed, temp + rename) and describe a distro and a default profile.
//!
//! Recognised layouts (directories; ISO images are refused with a hint to
//! extract them, see the module's tests for the exact trees):
//! - Debian/Ubuntu netboot: `debian-installer/<arch>/{linux,initrd.gz}` or
//!   `ubuntu-installer/<arch>/…`, version from `version.info`;
//! - Debian installer media: `install.<a>/{vmlinuz,initrd.gz}`, `.disk/info`;
//! - Ubuntu live server media: `casper/{vmlinuz,initrd}`, `.disk/info`;
//! - Fedora/RHEL family: `images/pxeboot/{vmlinuz,initrd.img}` with
//!   `.treeinfo` (or `.discinfo`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::model::{Distro, Profile};

/// What was found in a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub breed: String,
    pub os_version: String,
    pub arch: String,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn deb_arch(a: &str) -> String {
    match a {
        "amd64" | "amd" => "x86_64".into(),
        "arm64" => "aarch64".into(),
        "i386" | "386" => "i386".into(),
        other => other.into(),
    }
}

/// First `N.N` or `N` looking token after `key` words (e.g. "12", "22.04.3").
fn version_in(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c == '-' || c == '"' || c == '(')
        .find(|w| {
            !w.is_empty()
                && w.chars().next().is_some_and(|c| c.is_ascii_digit())
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .unwrap_or("")
        .to_owned()
}

fn ini_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            cur = s.to_owned();
        } else if cur == section {
            if let Some((k, v)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_owned());
                }
            }
        }
    }
    None
}

fn breed_of(family: &str) -> String {
    let f = family.to_ascii_lowercase();
    if f.contains("fedora") {
        "fedora".into()
    } else if f.contains("ubuntu") {
        "ubuntu".into()
    } else if f.contains("debian") {
        "debian".into()
    } else {
        "redhat".into()
    }
}

/// Recognises the tree at `dir`.
pub fn detect(dir: &Path) -> Result<Detected> {
    // Debian/Ubuntu netboot.
    for (top, breed) in [
        ("debian-installer", "debian"),
        ("ubuntu-installer", "ubuntu"),
    ] {
        let base = dir.join(top);
        if let Ok(entries) = std::fs::read_dir(&base) {
            let mut arches: Vec<String> = entries
                .flatten()
                .filter(|e| e.path().join("linux").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            arches.sort();
            if let Some(a) = arches.first() {
                let d = base.join(a);
                let info = read(&dir.join("version.info"));
                return Ok(Detected {
                    kernel: d.join("linux"),
                    initrd: d.join("initrd.gz"),
                    breed: breed.into(),
                    os_version: version_in(
                        info.split_once("version:").map(|x| x.1).unwrap_or(&info),
                    ),
                    arch: deb_arch(a),
                });
            }
        }
    }
    let disk_info = read(&dir.join(".disk/info"));
    // Debian installer media.
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut installs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("install."))
                    && p.join("vmlinuz").is_file()
            })
            .collect();
        installs.sort();
        if let Some(d) = installs.first() {
            let suffix = d
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("install.")
                .to_owned();
            let arch = disk_info
                .split_whitespace()
                .find(|w| ["amd64", "arm64", "i386"].contains(w))
                .map(deb_arch)
                .unwrap_or_else(|| deb_arch(&suffix));
            return Ok(Detected {
                kernel: d.join("vmlinuz"),
                initrd: d.join("initrd.gz"),
                breed: if disk_info.to_ascii_lowercase().contains("ubuntu") {
                    "ubuntu".into()
                } else {
                    "debian".into()
                },
                os_version: version_in(&disk_info),
                arch,
            });
        }
    }
    // Ubuntu live server.
    if dir.join("casper/vmlinuz").is_file() {
        let initrd = ["casper/initrd", "casper/initrd.gz", "casper/initrd.lz"]
            .iter()
            .map(|p| dir.join(p))
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join("casper/initrd"));
        let arch = disk_info
            .split_whitespace()
            .find(|w| ["amd64", "arm64"].contains(w))
            .map(deb_arch)
            .unwrap_or_else(|| "x86_64".into());
        return Ok(Detected {
            kernel: dir.join("casper/vmlinuz"),
            initrd,
            breed: "ubuntu".into(),
            os_version: version_in(&disk_info),
            arch,
        });
    }
    // Fedora / RHEL family.
    if dir.join("images/pxeboot/vmlinuz").is_file() {
        let ti = read(&dir.join(".treeinfo"));
        let (family, version, arch) = if !ti.is_empty() {
            (
                ini_get(&ti, "release", "name")
                    .or_else(|| ini_get(&ti, "general", "family"))
                    .unwrap_or_default(),
                ini_get(&ti, "release", "version")
                    .or_else(|| ini_get(&ti, "general", "version"))
                    .unwrap_or_default(),
                ini_get(&ti, "tree", "arch")
                    .or_else(|| ini_get(&ti, "general", "arch"))
                    .unwrap_or_default(),
            )
        } else {
            let di = read(&dir.join(".discinfo"));
            let lines: Vec<&str> = di.lines().collect();
            let fam = lines.get(1).copied().unwrap_or("");
            (
                fam.to_owned(),
                version_in(fam),
                lines.get(2).copied().unwrap_or("").to_owned(),
            )
        };
        return Ok(Detected {
            kernel: dir.join("images/pxeboot/vmlinuz"),
            initrd: dir.join("images/pxeboot/initrd.img"),
            breed: breed_of(&family),
            os_version: version,
            arch: if arch.is_empty() {
                "x86_64".into()
            } else {
                arch
            },
        });
    }
    bail!(
        "{}: not a recognised installer tree (looked for debian-installer/<arch>/linux, install.<arch>/vmlinuz, casper/vmlinuz, images/pxeboot/vmlinuz)",
        dir.display()
    )
}

/// Copies `src` into `blobs` (`<data>/blobs/sha256`) under its digest.
/// Returns `sha256:<hex>`.
pub fn put_blob(blobs: &Path, src: &Path) -> Result<String> {
    std::fs::create_dir_all(blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let tmp = blobs.join(format!(".tmp-import-{}", std::process::id()));
    let result = (|| -> Result<String> {
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input
                .read(&mut buf)
                .with_context(|| format!("reading {}", src.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        out.sync_all().context("syncing the blob")?;
        let hex = hex::encode(h.finalize());
        let dst = blobs.join(&hex);
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
        Ok(format!("sha256:{hex}"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Imports the tree at `path` as distro and profile `name`.
pub fn import(path: &Path, name: &str, blobs: &Path) -> Result<(Distro, Profile)> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        bail!(
            "{}: ISO images are not read natively yet; extract it first (xorriso -osirrox on -indev {} -extract / DIR) and import DIR",
            path.display(),
            path.display()
        );
    }
    super::model::check_name(name).map_err(|e| anyhow::anyhow!("distro {e}"))?;
    let d = detect(path)?;
    for f in [&d.kernel, &d.initrd] {
        if !f.is_file() {
            bail!("{}: missing from the tree", f.display());
        }
    }
    let kernel = put_blob(blobs, &d.kernel)?;
    let initrd = put_blob(blobs, &d.initrd)?;
    let distro = Distro {
        name: name.to_owned(),
        kernel,
        initrd,
        arch: d.arch,
        breed: d.breed,
        os_version: d.os_version,
        comment: format!("imported from {}", path.display()),
        ..Default::default()
    };
    let profile = Profile {
        name: name.to_owned(),
        distro: Some(name.to_owned()),
        ..Default::default()
    };
    Ok((distro, profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let p = dir.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        dir
    }

    #[test]
    fn debian_netboot() {
        let t = tree(&[
            ("debian-installer/amd64/linux", "kernel"),
            ("debian-installer/amd64/initrd.gz", "initrd"),
            (
                "version.info",
                "Debian version:  12 (bookworm)\nInstaller build: 20230607+deb12u5\n",
            ),
        ]);
        let d = detect(t.path()).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("debian", "12", "x86_64")
        );
    }

    #[test]
    fn ubuntu_live_and_debian_media() {
        let t = tree(&[
            ("casper/vmlinuz", "k"),
            ("casper/initrd", "i"),
            (
                ".disk/info",
                "Ubuntu-Server 22.04.3 LTS \"Jammy Jellyfish\" - Release amd64 (20230810)",
            ),
        ]);
        let d = detect(t.path()).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("ubuntu", "22.04.3", "x86_64")
        );
        let t = tree(&[("install.amd/vmlinuz", "k"), ("install.amd/initrd.gz", "i"), (".disk/info", "Debian GNU/Linux 12.5.0 \"Bookworm\" - Official amd64 NETINST with firmware 20240210-11:27")]);
        let d = detect(t.path()).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("debian", "12.5.0", "x86_64")
        );
    }

    #[test]
    fn fedora_treeinfo_and_rhel_discinfo() {
        let t = tree(&[
            ("images/pxeboot/vmlinuz", "k"),
            ("images/pxeboot/initrd.img", "i"),
            (".treeinfo", "[general]\nfamily = Fedora\nversion = 39\narch = x86_64\n[release]\nname = Fedora\nversion = 39\n[tree]\narch = x86_64\n"),
        ]);
        let d = detect(t.path()).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("fedora", "39", "x86_64")
        );
        let t = tree(&[
            ("images/pxeboot/vmlinuz", "k"),
            ("images/pxeboot/initrd.img", "i"),
            (
                ".discinfo",
                "1700000000.0\nRed Hat Enterprise Linux 9.3\naarch64\n",
            ),
        ]);
        let d = detect(t.path()).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("redhat", "9.3", "aarch64")
        );
    }

    #[test]
    fn import_copies_blobs_by_digest() {
        let t = tree(&[
            ("debian-installer/arm64/linux", "kernel"),
            ("debian-installer/arm64/initrd.gz", "initrd"),
        ]);
        let blobs = tempfile::tempdir().unwrap();
        let (d, p) = import(t.path(), "deb12", blobs.path()).unwrap();
        assert_eq!(d.arch, "aarch64");
        let hex = d.kernel.strip_prefix("sha256:").unwrap();
        assert_eq!(std::fs::read(blobs.path().join(hex)).unwrap(), b"kernel");
        assert_eq!(hex, hex::encode(Sha256::digest(b"kernel")));
        assert_eq!(p.distro.as_deref(), Some("deb12"));
        let names: Vec<_> = std::fs::read_dir(blobs.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
        let empty = tempfile::tempdir().unwrap();
        assert!(import(empty.path(), "x", blobs.path())
            .unwrap_err()
            .to_string()
            .contains("not a recognised"));
    }
}
