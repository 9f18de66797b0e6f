//! The trust chain the target checks before it writes a byte of a
//! package: `InRelease` (signature against the repo's keyring) → each
//! `Packages` index (size and SHA-256 from the signed Release) → each
//! `.deb` (size and SHA-256 from its index entry). The appliance serving
//! the files is not trusted for their content.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use bundle::debian::{self, Package};

use super::MirrorRef;

/// Largest index read (Debian's main/binary-amd64/Packages is ~45 MiB).
const MAX_INDEX: u64 = 256 << 20;
/// Largest `.deb` fetched.
const MAX_DEB: u64 = 2 << 30;

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// GET `url`, at most `max` bytes, retried a few times on errors.
pub fn fetch(url: &str, max: u64) -> Result<Vec<u8>> {
    let mut last = None;
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1 << attempt));
        }
        match client().get(url).call() {
            Ok(mut r) => {
                let mut buf = Vec::new();
                r.body_mut()
                    .as_reader()
                    .take(max + 1)
                    .read_to_end(&mut buf)
                    .with_context(|| format!("reading {url}"))?;
                if buf.len() as u64 > max {
                    bail!("{url} is larger than {max} bytes");
                }
                return Ok(buf);
            }
            Err(ureq::Error::StatusCode(404)) => bail!("{url}: 404 not found"),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow!("fetching {url}: {}", last.expect("an error")))
}

/// One package of the mirror as the target sees it.
#[derive(Debug, Clone)]
pub struct Pkg {
    pub pkg: Package,
    pub essential: bool,
}

/// The mirror's verified index for one suite and architecture.
pub struct MirrorIndex {
    pub mirror: MirrorRef,
    /// Newest version of each package name.
    pub packages: BTreeMap<String, Pkg>,
    /// Every stanza (for dependency resolution).
    pub all: Vec<Package>,
    pub keyring: Vec<u8>,
}

impl MirrorIndex {
    /// Fetch and verify `InRelease` and every component's `Packages`.
    pub fn load(mirror: &MirrorRef) -> Result<MirrorIndex> {
        let keyring = base64::engine::general_purpose::STANDARD
            .decode(&mirror.keyring_b64)
            .context("the work's keyring is not base64")?;
        let base = mirror.url.trim_end_matches('/');
        let ir_url = format!("{base}/dists/{}/InRelease", mirror.suite);
        let ir = fetch(&ir_url, 16 << 20)?;
        let release = debian::verify_inrelease(&ir, &keyring, &ir_url)
            .with_context(|| format!("verifying {ir_url} against the repo's keyring"))?;
        let mut all = Vec::new();
        let mut essential = BTreeSet::new();
        for comp in &mirror.components {
            let stem = format!("{comp}/binary-{}/Packages", mirror.arch);
            let (path, (digest, size)) = ["xz", "gz", ""]
                .iter()
                .map(|ext| {
                    if ext.is_empty() {
                        stem.clone()
                    } else {
                        format!("{stem}.{ext}")
                    }
                })
                .find_map(|p| release.sha256.get(&p).map(|v| (p, *v)))
                .ok_or_else(|| anyhow!("{ir_url} lists no {stem} index"))?;
            let url = format!("{base}/dists/{}/{path}", mirror.suite);
            let bytes = fetch(&url, MAX_INDEX)?;
            if bytes.len() as u64 != size || builder::Digest::of(&bytes) != digest {
                bail!("{url} does not match the signed Release (size or SHA-256 differ): the mirror is inconsistent");
            }
            let text = decompress(&path, &bytes)?;
            for stanza in debian::parse_stanzas(&text) {
                let get = |k: &str| stanza.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
                if get("Essential") == Some("yes") {
                    if let Some(n) = get("Package") {
                        essential.insert(n.to_owned());
                    }
                }
            }
            all.extend(debian::parse_packages(&text, &url)?);
        }
        let mut packages: BTreeMap<String, Pkg> = BTreeMap::new();
        for p in &all {
            let newer = packages
                .get(&p.name)
                .is_none_or(|q| debian::compare_versions(&p.version, &q.pkg.version).is_gt());
            if newer {
                packages.insert(
                    p.name.clone(),
                    Pkg {
                        essential: essential.contains(&p.name),
                        pkg: p.clone(),
                    },
                );
            }
        }
        Ok(MirrorIndex {
            mirror: mirror.clone(),
            packages,
            all,
            keyring,
        })
    }

    /// Names with `Essential: yes`.
    pub fn essential(&self) -> Vec<String> {
        self.packages
            .values()
            .filter(|p| p.essential)
            .map(|p| p.pkg.name.clone())
            .collect()
    }

    /// Names of the given priority.
    pub fn with_priority(&self, prio: &str) -> Vec<String> {
        self.packages
            .values()
            .filter(|p| p.pkg.priority.as_deref() == Some(prio))
            .map(|p| p.pkg.name.clone())
            .collect()
    }

    /// Whether `name` is a package or something a package provides.
    pub fn has(&self, name: &str) -> bool {
        self.packages.contains_key(name)
            || self
                .all
                .iter()
                .any(|p| p.provides.iter().any(|v| v == name))
    }

    /// The `Depends`/`Pre-Depends` closure of `roots`. A root the mirror
    /// lacks is an error naming it and who asked for it (`why`).
    pub fn closure(&self, roots: &[String], why: &str) -> Result<Vec<Package>> {
        for r in roots {
            if !self.has(r) {
                bail!(
                    "the mirror {:?} ({} {}) has no package {r:?} ({why}); add it to the repo's packages and sync again",
                    self.mirror.name,
                    self.mirror.suite,
                    self.mirror.arch
                );
            }
        }
        // The mirror's own resolver, so the agent wants exactly the files
        // a sync of these roots fetched (e.g. `awk` is the `mawk` already
        // chosen, not the first provider by name).
        let roots: Vec<(String, String)> =
            roots.iter().map(|r| (r.clone(), why.to_owned())).collect();
        let chosen = crate::repo::closure::resolve(&self.all, None, &roots).map_err(|e| {
            anyhow!(
                "resolving {why} in the mirror {:?}: {e} (a dependency is missing from the mirror: sync it again, or add the package to the repo's packages)",
                self.mirror.name
            )
        })?;
        let mut seen = BTreeSet::new();
        Ok(self
            .all
            .iter()
            .filter(|p| {
                let key = (p.name.clone(), p.version.clone());
                chosen.contains(&key) && seen.insert(key)
            })
            .cloned()
            .collect())
    }

    /// Whether the mirror serves `p`'s pool file (a partial mirror keeps
    /// the whole upstream index but only its closure's files).
    pub fn serves(&self, p: &Package) -> bool {
        let url = format!("{}/{}", self.mirror.url.trim_end_matches('/'), p.filename);
        matches!(client().head(&url).call(), Ok(r) if r.status().is_success())
    }

    /// Names of the packages in `pkgs` whose pool files the mirror lacks.
    pub fn missing(&self, pkgs: &[Package]) -> Vec<String> {
        pkgs.iter()
            .filter(|p| !self.serves(p))
            .map(|p| p.name.clone())
            .collect()
    }

    /// Download `p` into `dir` (named as in its pool path's file name),
    /// checked against its index entry; reuses a file already there and
    /// intact. Returns the path.
    pub fn download(&self, p: &Package, dir: &Path) -> Result<PathBuf> {
        let file = p
            .filename
            .rsplit('/')
            .next()
            .filter(|f| f.ends_with(".deb") && !f.contains(".."))
            .ok_or_else(|| anyhow!("{}: unusable pool file name {:?}", p.name, p.filename))?;
        let dest = dir.join(file);
        if let Ok(b) = std::fs::read(&dest) {
            if b.len() as u64 == p.size && builder::Digest::of(&b) == p.sha256 {
                return Ok(dest);
            }
        }
        let url = format!("{}/{}", self.mirror.url.trim_end_matches('/'), p.filename);
        let bytes = fetch(&url, MAX_DEB.min(p.size))?;
        if bytes.len() as u64 != p.size {
            bail!(
                "{url}: {} bytes, the signed index says {} (truncated or replaced)",
                bytes.len(),
                p.size
            );
        }
        let got = builder::Digest::of(&bytes);
        if got != p.sha256 {
            bail!(
                "{url}: {got} does not match the signed index ({})",
                p.sha256
            );
        }
        let tmp = dir.join(format!(".{file}.part"));
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
        Ok(dest)
    }
}

fn decompress(path: &str, bytes: &[u8]) -> Result<String> {
    let r: Box<dyn Read> = if path.ends_with(".xz") {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(bytes))
    } else if path.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut s = String::new();
    r.take(MAX_INDEX * 8)
        .read_to_string(&mut s)
        .with_context(|| format!("decompressing {path}"))?;
    Ok(s)
}
