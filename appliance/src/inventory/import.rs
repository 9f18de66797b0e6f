//! `appliance import`: recognise an installer tree, copy its kernel and
//! initrd into the blob store (`<data>/blobs/sha256/<hex>`, content
//! addressed, temp + rename) and describe a distro and a default profile.
//!
//! Recognised layouts, from a directory or an ISO image read natively
//! ([`crate::iso9660`]; see the module's tests for the exact trees):
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

/// What was found in a tree (paths relative to the tree's root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kernel: String,
    pub initrd: String,
    pub breed: String,
    pub os_version: String,
    pub arch: String,
}

/// An installer tree to import from: a directory or an ISO image (read
/// natively by [`crate::iso9660`]). Paths are relative, `/`-separated.
pub trait Tree {
    /// A small file as text, or "" when absent.
    fn text(&self, rel: &str) -> String;
    fn is_file(&self, rel: &str) -> bool;
    /// Names in a directory (empty when absent).
    fn list(&self, rel: &str) -> Vec<String>;
    fn open(&self, rel: &str) -> Result<Box<dyn Read + '_>>;
    /// Where `rel` is, for messages.
    fn describe(&self, rel: &str) -> String;
}

/// A directory tree.
pub struct DirTree(pub PathBuf);

impl Tree for DirTree {
    fn text(&self, rel: &str) -> String {
        std::fs::read_to_string(self.0.join(rel)).unwrap_or_default()
    }
    fn is_file(&self, rel: &str) -> bool {
        self.0.join(rel).is_file()
    }
    fn list(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.0.join(rel))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
    fn open(&self, rel: &str) -> Result<Box<dyn Read + '_>> {
        let p = self.0.join(rel);
        Ok(Box::new(
            std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?,
        ))
    }
    fn describe(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
}

/// An ISO 9660 image.
pub struct IsoTree(pub crate::iso9660::Iso);

impl Tree for IsoTree {
    fn text(&self, rel: &str) -> String {
        self.0.read_text(rel).unwrap_or_default()
    }
    fn is_file(&self, rel: &str) -> bool {
        self.0.lookup(rel).is_ok_and(|e| !e.is_dir && !e.is_symlink)
    }
    fn list(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .list(rel)
            .map(|es| es.into_iter().map(|e| e.name).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
    fn open(&self, rel: &str) -> Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.0.open_file(rel)?))
    }
    fn describe(&self, rel: &str) -> String {
        format!("{}:/{rel}", self.0.path().display())
    }
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

/// Recognises the installer tree `t`.
pub fn detect(t: &dyn Tree) -> Result<Detected> {
    // Debian/Ubuntu netboot.
    for (top, breed) in [
        ("debian-installer", "debian"),
        ("ubuntu-installer", "ubuntu"),
    ] {
        let arches: Vec<String> = t
            .list(top)
            .into_iter()
            .filter(|a| t.is_file(&format!("{top}/{a}/linux")))
            .collect();
        if let Some(a) = arches.first() {
            let info = t.text("version.info");
            return Ok(Detected {
                kernel: format!("{top}/{a}/linux"),
                initrd: format!("{top}/{a}/initrd.gz"),
                breed: breed.into(),
                os_version: version_in(info.split_once("version:").map(|x| x.1).unwrap_or(&info)),
                arch: deb_arch(a),
            });
        }
    }
    let disk_info = t.text(".disk/info");
    // Debian installer media.
    let installs: Vec<String> = t
        .list("")
        .into_iter()
        .filter(|n| n.starts_with("install.") && t.is_file(&format!("{n}/vmlinuz")))
        .collect();
    if let Some(d) = installs.first() {
        let suffix = d.trim_start_matches("install.");
        let arch = disk_info
            .split_whitespace()
            .find(|w| ["amd64", "arm64", "i386"].contains(w))
            .map(deb_arch)
            .unwrap_or_else(|| deb_arch(suffix));
        return Ok(Detected {
            kernel: format!("{d}/vmlinuz"),
            initrd: format!("{d}/initrd.gz"),
            breed: if disk_info.to_ascii_lowercase().contains("ubuntu") {
                "ubuntu".into()
            } else {
                "debian".into()
            },
            os_version: version_in(&disk_info),
            arch,
        });
    }
    // Ubuntu live server.
    if t.is_file("casper/vmlinuz") {
        let initrd = ["casper/initrd", "casper/initrd.gz", "casper/initrd.lz"]
            .into_iter()
            .find(|p| t.is_file(p))
            .unwrap_or("casper/initrd");
        let arch = disk_info
            .split_whitespace()
            .find(|w| ["amd64", "arm64"].contains(w))
            .map(deb_arch)
            .unwrap_or_else(|| "x86_64".into());
        return Ok(Detected {
            kernel: "casper/vmlinuz".into(),
            initrd: initrd.into(),
            breed: "ubuntu".into(),
            os_version: version_in(&disk_info),
            arch,
        });
    }
    // Fedora / RHEL family.
    if t.is_file("images/pxeboot/vmlinuz") {
        let ti = t.text(".treeinfo");
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
            let di = t.text(".discinfo");
            let lines: Vec<&str> = di.lines().collect();
            let fam = lines.get(1).copied().unwrap_or("");
            (
                fam.to_owned(),
                version_in(fam),
                lines.get(2).copied().unwrap_or("").to_owned(),
            )
        };
        return Ok(Detected {
            kernel: "images/pxeboot/vmlinuz".into(),
            initrd: "images/pxeboot/initrd.img".into(),
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
        t.describe("")
    )
}

/// Copies `input` into `blobs` (`<data>/blobs/sha256`) under its digest
/// (temporary file, fsync, rename). Returns `sha256:<hex>`.
pub fn put_blob_from(blobs: &Path, input: &mut dyn Read, what: &str) -> Result<String> {
    std::fs::create_dir_all(blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let tmp = blobs.join(format!(".tmp-import-{}", std::process::id()));
    let result = (|| -> Result<String> {
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let (hex, _) = copy_hashing(input, &mut out, what, &tmp.display().to_string())?;
        out.sync_all().context("syncing the blob")?;
        let dst = blobs.join(&hex);
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
        Ok(format!("sha256:{hex}"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies `input` (`what`, for errors) to `out` (`to`, for errors);
/// returns the sha256 hex of the bytes and their count.
pub fn copy_hashing(
    input: &mut dyn Read,
    out: &mut dyn Write,
    what: &str,
    to: &str,
) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .with_context(|| format!("reading {what}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {to}"))?;
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// Copies the file `src` into `blobs` under its digest.
pub fn put_blob(blobs: &Path, src: &Path) -> Result<String> {
    let mut f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    put_blob_from(blobs, &mut f, &src.display().to_string())
}

/// Where [`import_with`] puts the boot files: given a reader and what it
/// reads (for errors), stores the bytes and returns `sha256:<hex>`.
pub type PutBlob<'a> = dyn FnMut(&mut dyn Read, &str) -> Result<String> + 'a;

/// Imports the tree at `path` (a directory or an ISO image) as distro and
/// profile `name`, its boot files copied into `blobs`.
pub fn import(path: &Path, name: &str, blobs: &Path) -> Result<(Distro, Profile)> {
    import_with(path, name, &mut |r, what| put_blob_from(blobs, r, what))
}

/// [`import`], with the boot files handed to `put` (the CLI uploads them
/// through the API).
pub fn import_with(path: &Path, name: &str, put: &mut PutBlob<'_>) -> Result<(Distro, Profile)> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    super::model::check_name(name).map_err(|e| anyhow::anyhow!("distro {e}"))?;
    let tree: Box<dyn Tree> = if meta.is_dir() {
        Box::new(DirTree(path.to_owned()))
    } else if crate::iso9660::is_iso(path) {
        Box::new(IsoTree(crate::iso9660::Iso::open(path)?))
    } else {
        bail!(
            "{}: neither a directory nor an ISO 9660 image",
            path.display()
        );
    };
    let d = detect(tree.as_ref())?;
    for f in [&d.kernel, &d.initrd] {
        if !tree.is_file(f) {
            bail!("{}: missing from the tree", tree.describe(f));
        }
    }
    let kernel = put(&mut tree.open(&d.kernel)?, &tree.describe(&d.kernel))?;
    let initrd = put(&mut tree.open(&d.initrd)?, &tree.describe(&d.initrd))?;
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
        let d = detect(&DirTree(t.path().to_owned())).unwrap();
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
        let d = detect(&DirTree(t.path().to_owned())).unwrap();
        assert_eq!(
            (d.breed.as_str(), d.os_version.as_str(), d.arch.as_str()),
            ("ubuntu", "22.04.3", "x86_64")
        );
        let t = tree(&[("install.amd/vmlinuz", "k"), ("install.amd/initrd.gz", "i"), (".disk/info", "Debian GNU/Linux 12.5.0 \"Bookworm\" - Official amd64 NETINST with firmware 20240210-11:27")]);
        let d = detect(&DirTree(t.path().to_owned())).unwrap();
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
        let d = detect(&DirTree(t.path().to_owned())).unwrap();
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
        let d = detect(&DirTree(t.path().to_owned())).unwrap();
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

    #[test]
    fn an_iso_imports_like_its_tree() {
        let t = tree(&[
            ("install.amd/vmlinuz", "kernel from the iso"),
            ("install.amd/initrd.gz", "initrd from the iso"),
            (
                ".disk/info",
                "Debian GNU/Linux 12.5.0 \"Bookworm\" - Official amd64 NETINST",
            ),
        ]);
        let out = tempfile::tempdir().unwrap();
        let iso = out.path().join("debian.iso");
        let o = std::process::Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-o"])
            .arg(&iso)
            .arg(t.path())
            .output()
            .expect("xorriso is installed (.ci/run installs it)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let from_dir = tempfile::tempdir().unwrap();
        let from_iso = tempfile::tempdir().unwrap();
        let (a, _) = import(t.path(), "deb", from_dir.path()).unwrap();
        let (b, _) = import(&iso, "deb", from_iso.path()).unwrap();
        assert_eq!((&a.kernel, &a.initrd), (&b.kernel, &b.initrd));
        assert_eq!(
            (b.breed.as_str(), b.os_version.as_str(), b.arch.as_str()),
            ("debian", "12.5.0", "x86_64")
        );
        let hex = b.kernel.strip_prefix("sha256:").unwrap();
        assert_eq!(
            std::fs::read(from_iso.path().join(hex)).unwrap(),
            b"kernel from the iso"
        );
        // Neither a tree nor an ISO: named.
        let junk = out.path().join("junk.bin");
        std::fs::write(&junk, vec![1u8; 50000]).unwrap();
        let e = import(&junk, "x", from_iso.path()).unwrap_err().to_string();
        assert!(e.contains("neither a directory nor an ISO"), "{e}");
    }
}
