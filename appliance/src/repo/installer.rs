//! `appliance import --repo NAME` (`POST /api/v1/repos/{name}/import`):
//! a distro and a profile for the Debian installer, from a mirror synced
//! with `installer`.
//!
//! Order of work, each step checked before the next:
//! 1. the mirror's manifest must hold a netboot package
//!    (`debian-installer-<N>-netboot-<arch>`, signed through the
//!    `Packages` index and `InRelease` when it was mirrored);
//! 2. its `data.tar` is streamed once from the blob store, verified
//!    against its digest, and only `…/<N>/<arch>/text/debian-installer/
//!    <arch>/{linux,initrd.gz}` and `text/version.info` are kept, as blobs
//!    in a scratch store beside the blob store, then renamed into it;
//! 3. the kernel's release (`6.1.0-50-amd64`, from the bzImage header's
//!    version string) must be a kernel ABI the mirrored
//!    `debian-installer` index has `kernel-image-<abi>-di` for: the
//!    installer loads modules only for its own ABI, so a mismatch is an
//!    error naming both;
//! 4. the distro (breed `debian`, kernel and initrd as blob digests) and a
//!    profile that uses the repo are returned for the caller to create.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use builder::Digest;
use serde::Serialize;

use super::{udeb, Manifest};
use crate::inventory::model::{Distro, Profile, Repo};

/// What an import found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `name_version` of the netboot package the kernel came from.
    pub netboot: String,
    /// The netboot kernel's release (its ABI).
    pub kernel_release: String,
    /// ABIs the mirrored installer index has kernel udebs for.
    pub udeb_abis: Vec<String>,
    /// Udebs upstream did not serve (the installer will lack them).
    pub missing_udebs: usize,
}

/// The release string of a Linux x86 bzImage (`6.1.0-50-amd64`): the
/// first word of the version string the setup header points at
/// (`kernel_version` at 0x20E, relative to 0x200; boot protocol ≥ 2.00).
pub fn bzimage_release(image: &[u8]) -> Result<String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a Linux bzImage (no HdrS setup header)");
    }
    let at = u16::from_le_bytes([image[0x20E], image[0x20F]]) as usize + 0x200;
    let tail = image
        .get(at..)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("kernel version pointer {at:#x} is past the image"))?;
    let end = tail
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(tail.len().min(64));
    let release = std::str::from_utf8(&tail[..end])
        .ok()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| anyhow!("kernel version string at {at:#x} is not text"))?;
    Ok(release.to_owned())
}

/// Checks that `kernel` is one of `abis` (from the mirrored installer
/// index). The error names both sides.
pub fn check_abi(kernel: &str, netboot: &str, abis: &[String]) -> Result<()> {
    if abis.iter().any(|a| a == kernel) {
        return Ok(());
    }
    if abis.is_empty() {
        bail!(
            "the mirror's debian-installer index lists no kernel-image-*-di udeb: \
             cannot check the netboot kernel {kernel} (from {netboot})"
        );
    }
    bail!(
        "kernel ABI mismatch: the netboot kernel from {netboot} is {kernel}, but the mirrored \
         installer udebs are for {} (kernel-image-{}-di): the installer would find no modules \
         for its kernel; sync the mirror again so both come from the same archive state",
        abis.join(", "),
        abis.last().map(String::as_str).unwrap_or("")
    )
}

fn deb_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

fn distro_arch(arch: &str) -> String {
    match arch {
        "amd64" => "x86_64".into(),
        "arm64" => "aarch64".into(),
        a => a.into(),
    }
}

/// The newest netboot package file in the mirror for `arch`:
/// (mirror path, `name_version`).
fn netboot_file<'a>(m: &'a Manifest, arch: &str) -> Option<(&'a str, String)> {
    let suffix = format!("-netboot-{arch}");
    m.packages
        .iter()
        .filter_map(|id| {
            let mut parts = id.splitn(3, '_');
            let (name, version) = (parts.next()?, parts.next()?);
            (name.starts_with("debian-installer-") && name.ends_with(&suffix))
                .then_some((name, version))
        })
        .max_by(|a, b| bundle::debian::compare_versions(a.1, b.1))
        .and_then(|(name, version)| {
            // Pool file names carry the version without its epoch.
            let v = version.split_once(':').map(|x| x.1).unwrap_or(version);
            let file = format!("/{name}_{v}_");
            m.files
                .keys()
                .find(|p| p.starts_with("pool/") && p.contains(&file) && p.ends_with(".deb"))
                .map(|p| (p.as_str(), format!("{name}_{version}")))
        })
}

/// Every kernel ABI of the mirrored installer indexes.
fn mirrored_abis(data: &Path, m: &Manifest) -> Result<Vec<String>> {
    let mut abis = std::collections::BTreeSet::new();
    let mut seen_dirs = std::collections::BTreeSet::new();
    for (path, f) in &m.files {
        if !path.contains("/debian-installer/binary-") || path.contains("/by-hash/") {
            continue;
        }
        let Some((dir, name)) = path.rsplit_once('/') else {
            continue;
        };
        if !name.starts_with("Packages") || seen_dirs.contains(dir) {
            continue;
        }
        seen_dirs.insert(dir.to_owned());
        let text = super::decompress(path, &super::read_blob(data, &f.digest)?)?;
        let index = bundle::debian::parse_packages(&text, path)?;
        abis.extend(udeb::installer_abis(&index));
    }
    Ok(abis.into_iter().collect())
}

/// Removes the scratch store however the import ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Imports the Debian installer of `repo` (synced, with `installer`) as
/// distro and profile `name`: kernel and initrd go into `<data>/blobs`.
pub fn import(
    data: &Path,
    repo: &Repo,
    manifest: &Manifest,
    name: &str,
) -> Result<(Distro, Profile, Report)> {
    crate::inventory::model::check_name(name).map_err(|e| anyhow!("distro {e}"))?;
    if !repo.installer {
        bail!(
            "repo {} is not an installer mirror: set `installer` (repo add --installer) and sync it \
             so the netboot package and the debian-installer index are mirrored",
            repo.name
        );
    }
    let arch = deb_arch(
        repo.arches
            .first()
            .map(String::as_str)
            .unwrap_or(repo.arch.as_str()),
    )
    .to_owned();
    let (deb_path, netboot) = netboot_file(manifest, &arch).ok_or_else(|| {
        anyhow!(
            "repo {}: no debian-installer-*-netboot-{arch} package in the mirror; sync it again \
             (with installer set, the sync mirrors it)",
            repo.name
        )
    })?;
    let f = &manifest.files[deb_path];
    let digest: Digest = f
        .digest
        .parse()
        .map_err(|e| anyhow!("{deb_path}: digest {:?}: {e}", f.digest))?;
    let blob = super::blob_path(data, &f.digest)?;
    let file = std::fs::File::open(&blob)
        .with_context(|| format!("opening {deb_path} ({})", blob.display()))?;
    let reader = builder::digest::VerifyingReader::new(
        std::io::BufReader::new(file),
        digest,
        f.size,
        deb_path,
    );

    let dir = format!("/{arch}/text/debian-installer/{arch}/");
    let want = |p: &str| {
        p.starts_with("usr/lib/debian-installer/images/")
            && (p.ends_with(&format!("{dir}linux"))
                || p.ends_with(&format!("{dir}initrd.gz"))
                || p.ends_with(&format!("/{arch}/text/version.info")))
    };
    let scratch = Scratch(data.join("cache").join(format!(
        "import-{}-{}",
        std::process::id(),
        crate::entropy::fast_u32()
    )));
    let store = bundle::Store::init(&scratch.0)
        .with_context(|| format!("creating {}", scratch.0.display()))?;
    let filter: bundle::deb::Filter<'_> = &want;
    let contents = bundle::deb::extract(reader, &netboot, &store, Some(filter))?;
    let find = |suffix: &str| {
        contents.entries.iter().find_map(|e| match &e.kind {
            bundle::deb::EntryKind::File { digest, size } if e.path.ends_with(suffix) => {
                Some((*digest, *size))
            }
            _ => None,
        })
    };
    let (kernel, _) = find(&format!("{dir}linux"))
        .ok_or_else(|| anyhow!("{netboot}: no text/debian-installer/{arch}/linux in it"))?;
    let (initrd, _) = find(&format!("{dir}initrd.gz"))
        .ok_or_else(|| anyhow!("{netboot}: no text/debian-installer/{arch}/initrd.gz in it"))?;
    let version_info = match find(&format!("/{arch}/text/version.info")) {
        Some((d, _)) => String::from_utf8_lossy(&store.read_blob(&d)?).into_owned(),
        None => String::new(),
    };

    // The ABI check, before anything lands in the blob store.
    let mut head = Vec::new();
    store
        .open_blob(&kernel)?
        .take(64 << 10)
        .read_to_end(&mut head)
        .context("reading the netboot kernel")?;
    let release =
        bzimage_release(&head).with_context(|| format!("{netboot}: text/…/{arch}/linux"))?;
    let abis = mirrored_abis(data, manifest)?;
    check_abi(&release, &netboot, &abis)?;

    let blobs = data.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    for d in [kernel, initrd] {
        let to = blobs.join(d.hex());
        if !to.is_file() {
            std::fs::rename(store.blob_path(&d), &to)
                .with_context(|| format!("moving {d} into {}", blobs.display()))?;
        }
    }
    let os_version = version_info
        .split_once("version:")
        .map(|x| x.1)
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    let distro = Distro {
        name: name.to_owned(),
        kernel: kernel.to_string(),
        initrd: initrd.to_string(),
        arch: distro_arch(&arch),
        breed: "debian".into(),
        os_version,
        comment: format!(
            "Debian installer {netboot} (kernel {release}) from repo {}",
            repo.name
        ),
        ..Default::default()
    };
    let profile = Profile {
        name: name.to_owned(),
        distro: Some(name.to_owned()),
        autoinstall: "preseed.cfg".into(),
        // A provisioning network often has no router: netcfg would ask
        // "Continue without a default route?" before the preseed loads.
        kernel_options: "netcfg/no_default_route=true".into(),
        repos: vec![repo.name.clone()],
        comment: format!("Debian installer (preseed) from the mirror {}", repo.name),
        ..Default::default()
    };
    let report = Report {
        netboot,
        kernel_release: release,
        udeb_abis: abis,
        missing_udebs: manifest.missing.len(),
    };
    Ok((distro, profile, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let at: u16 = 0x300;
        img[0x20E..0x210].copy_from_slice(&at.to_le_bytes());
        let s = 0x200 + at as usize;
        img[s..s + version.len()].copy_from_slice(version.as_bytes());
        img
    }

    #[test]
    fn the_kernel_release_is_read_from_the_setup_header() {
        let img = bzimage("6.1.0-50-amd64 (debian-kernel@lists.debian.org) #1 SMP\0");
        assert_eq!(bzimage_release(&img).unwrap(), "6.1.0-50-amd64");
        let e = bzimage_release(&[0u8; 0x300]).unwrap_err().to_string();
        assert!(e.contains("not a Linux bzImage"), "{e}");
        let mut bad = bzimage("x");
        bad[0x20E..0x210].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(bzimage_release(&bad)
            .unwrap_err()
            .to_string()
            .contains("past the image"));
    }

    #[test]
    fn an_abi_mismatch_names_both_versions() {
        let abis = vec!["6.1.0-47-amd64".to_string()];
        let e = check_abi(
            "6.1.0-50-amd64",
            "debian-installer-12-netboot-amd64_1",
            &abis,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("6.1.0-50-amd64") && e.contains("6.1.0-47-amd64") && e.contains("mismatch"),
            "{e}"
        );
        check_abi("6.1.0-47-amd64", "n", &abis).unwrap();
        assert!(check_abi("6.1.0-47-amd64", "n", &[])
            .unwrap_err()
            .to_string()
            .contains("no kernel-image"));
    }
}
