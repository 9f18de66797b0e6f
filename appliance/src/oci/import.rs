//! Importing container images into the blob store: an OCI image layout
//! (a directory, or a tar of one, optionally gzipped) or a `docker save`
//! archive (`docker-archive`), converted to an OCI manifest.
//!
//! Order of work: stage → verify → adopt.
//! 1. **Stage.** A tar is read once, front to back: every regular file is
//!    streamed into a temporary file inside `<data>/blobs/sha256/` (same
//!    filesystem) while its sha256 is computed; symlinks and hardlinks are
//!    remembered as aliases. Entry paths are checked (no absolute path, no
//!    `..`, UTF-8, no duplicates). A directory is staged file by file, only
//!    the files the image names, never following a symlink out of it.
//! 2. **Verify.** OCI layout: `oci-layout`, `index.json`, then from the
//!    chosen manifest every descriptor: the blob must be present and have
//!    the descriptor's size and digest; manifests and indexes (≤ 4 MiB,
//!    nested ≤ 4 deep, ≤ 4,096 descriptors) are parsed with `oci-spec` and
//!    walked. Docker archive: `manifest.json`, the config (its file name,
//!    when it is a digest, must be the config's sha256), and each layer's
//!    uncompressed sha256 (gzip and zstd layers are inflated while hashed)
//!    must equal the config's `rootfs.diff_ids` entry; then an OCI manifest
//!    is written for it (config `application/vnd.oci.image.config.v1+json`,
//!    layers `…layer.v1.tar[+gzip|+zstd]`), the same bytes every time.
//! 3. **Adopt.** Only when everything verified are the staged files renamed
//!    to their digests (blobs already present are kept). Any error removes
//!    every staged file: a failed import leaves the store as it was.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use builder::Digest;
use serde::{Deserialize, Serialize};

use super::{Blobs, Child, MAX_CONFIG, MAX_DEPTH, MAX_DESCRIPTORS, MAX_MANIFEST};

/// Most entries a tar may hold.
pub const MAX_ENTRIES: usize = 65_536;
/// Most bytes the layers of a docker archive may inflate to, together.
pub const MAX_INFLATED: u64 = 64 << 30;
/// Longest symlink chain followed inside an archive.
const MAX_LINK_HOPS: usize = 8;

/// Which kind of input an import read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    OciLayout,
    DockerArchive,
}

/// What an import stored.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub format: Format,
    /// The manifest (or index) the tag names.
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// `architecture` of the config (`multi` for an index).
    pub arch: String,
    /// Every blob of the image (manifests, configs, layers).
    pub blobs: usize,
    /// How many of them were not in the store before.
    pub blobs_added: usize,
    /// Bytes of all the image's blobs.
    pub bytes: u64,
}

/// A file staged in the blob store's directory, hashed.
#[derive(Debug, Clone)]
struct Staged {
    tmp: PathBuf,
    digest: Digest,
    size: u64,
}

/// Temporary files of one import; removed on drop unless adopted.
struct Staging {
    blobs: Blobs,
    files: Vec<PathBuf>,
}

impl Staging {
    fn new(blobs: Blobs) -> Self {
        Staging {
            blobs,
            files: Vec::new(),
        }
    }

    /// Streams `r` into a new temporary file, hashing it.
    fn stage(&mut self, mut r: impl Read, what: &str) -> Result<Staged> {
        use sha2::Digest as _;
        let tmp = self.blobs.temp_path("import")?;
        self.files.push(tmp.clone());
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {what}")),
            };
            h.update(&buf[..k]);
            f.write_all(&buf[..k])
                .with_context(|| format!("writing {}", tmp.display()))?;
            n += k as u64;
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(Staged {
            tmp,
            digest: Digest(h.finalize().into()),
            size: n,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Checks and normalises a path inside an archive or layout: relative,
/// `/`-separated, no `..`; `./` and empty parts dropped.
pub fn clean_path(p: &str) -> Result<String> {
    if p.starts_with('/') {
        bail!("{p:?}: absolute paths are not allowed in an image archive");
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("{p:?}: '..' is not allowed in an image archive"),
            c if c.contains('\0') => bail!("{p:?}: NUL in a path"),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        bail!("{p:?}: empty path");
    }
    Ok(parts.join("/"))
}

/// Joins a link target to the link's directory, checked like [`clean_path`]
/// (a `..` may not climb above the archive's root).
fn resolve_link(link: &str, target: &str) -> Result<String> {
    if target.starts_with('/') {
        bail!("{link:?} links to the absolute path {target:?}");
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("{link:?} links to {target:?}, outside the archive");
                }
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        bail!("{link:?} links to the archive's root");
    }
    Ok(parts.join("/"))
}

/// Where the importer gets files from.
trait Source {
    /// The file at `path` (clean), staged, or `None` when absent.
    fn get(&mut self, staging: &mut Staging, path: &str) -> Result<Option<Staged>>;
}

/// A tar read once into staging.
struct TarSource {
    files: HashMap<String, Staged>,
    /// Symlinks (target relative to the link) and hardlinks (target from
    /// the root), already resolved to clean paths.
    links: HashMap<String, String>,
}

impl TarSource {
    fn read(staging: &mut Staging, path: &Path) -> Result<TarSource> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic).context("reading the archive")?;
        f.rewind().context("reading the archive")?;
        let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
            Box::new(flate2::read::GzDecoder::new(BufReader::new(f)))
        } else {
            Box::new(BufReader::new(f))
        };
        let mut ar = tar::Archive::new(reader);
        let mut src = TarSource {
            files: HashMap::new(),
            links: HashMap::new(),
        };
        let mut count = 0usize;
        for entry in ar.entries().context("reading the tar archive")? {
            let entry = entry.context("reading a tar entry (truncated or not a tar?)")?;
            count += 1;
            if count > MAX_ENTRIES {
                bail!("the archive has more than {MAX_ENTRIES} entries");
            }
            let raw: String = {
                let p = entry.path().context("a tar entry's path")?;
                p.to_str()
                    .with_context(|| format!("{}: path is not UTF-8", p.display()))?
                    .to_owned()
            };
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                // Nothing to stage, but a hostile name is still refused.
                if raw.starts_with('/') || raw.split('/').any(|c| c == "..") {
                    clean_path(&raw)?;
                    bail!("{raw:?}: not a path inside the archive");
                }
                continue;
            }
            let p = clean_path(&raw)?;
            if src.files.contains_key(&p) || src.links.contains_key(&p) {
                bail!("{p:?} appears twice in the archive");
            }
            use tar::EntryType as E;
            match kind {
                E::Regular | E::Continuous => {
                    let staged = staging.stage(entry, &p)?;
                    src.files.insert(p, staged);
                }
                E::Symlink | E::Link => {
                    let target: String = {
                        let t = entry
                            .link_name()
                            .with_context(|| format!("{p}: link target"))?
                            .with_context(|| format!("{p}: link without a target"))?;
                        t.to_str()
                            .with_context(|| format!("{p}: link target is not UTF-8"))?
                            .to_owned()
                    };
                    let resolved = if kind == E::Symlink {
                        resolve_link(&p, &target)?
                    } else {
                        clean_path(&target)?
                    };
                    src.links.insert(p, resolved);
                }
                // PAX/GNU metadata entries are consumed by the tar crate;
                // devices and fifos have no place in an image archive.
                E::XGlobalHeader | E::XHeader | E::GNULongName | E::GNULongLink => {}
                other => bail!("{p:?}: entry type {other:?} has no place in an image archive"),
            }
        }
        Ok(src)
    }
}

impl Source for TarSource {
    fn get(&mut self, _: &mut Staging, path: &str) -> Result<Option<Staged>> {
        let mut p = path.to_owned();
        for _ in 0..=MAX_LINK_HOPS {
            if let Some(s) = self.files.get(&p) {
                return Ok(Some(s.clone()));
            }
            match self.links.get(&p) {
                Some(t) => p = t.clone(),
                None => return Ok(None),
            }
        }
        bail!("{path:?}: more than {MAX_LINK_HOPS} links in a row")
    }
}

/// A layout directory; files are staged when asked for.
struct DirSource {
    root: PathBuf,
    staged: HashMap<String, Staged>,
}

impl Source for DirSource {
    fn get(&mut self, staging: &mut Staging, path: &str) -> Result<Option<Staged>> {
        if let Some(s) = self.staged.get(path) {
            return Ok(Some(s.clone()));
        }
        let full = self.root.join(path);
        let real = match full.canonicalize() {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", full.display())),
        };
        if !real.starts_with(&self.root) {
            bail!("{path:?} leads outside the layout directory (a symlink?)");
        }
        if !real.is_file() {
            bail!("{path:?} is not a regular file");
        }
        let f = File::open(&real).with_context(|| format!("opening {}", real.display()))?;
        let s = staging.stage(f, path)?;
        self.staged.insert(path.to_owned(), s.clone());
        Ok(Some(s))
    }
}

fn read_staged(s: &Staged, max: u64, what: &str) -> Result<Vec<u8>> {
    if s.size > max {
        bail!("{what} is {} bytes, more than the {max} allowed", s.size);
    }
    std::fs::read(&s.tmp).with_context(|| format!("reading {what}"))
}

/// Imports the image at `input` (a directory, or a tar file) into the blob
/// store of `data`. `tag` chooses among several images in one input (a
/// layout's `org.opencontainers.image.ref.name`, an archive's `RepoTags`).
pub fn import_path(data: &Path, input: &Path, repo: &str, tag: &str) -> Result<Imported> {
    let blobs = Blobs::new(data);
    let mut staging = Staging::new(blobs.clone());
    let meta = std::fs::metadata(input).with_context(|| format!("opening {}", input.display()))?;
    let mut src: Box<dyn Source> = if meta.is_dir() {
        let root = input
            .canonicalize()
            .with_context(|| format!("opening {}", input.display()))?;
        Box::new(DirSource {
            root,
            staged: HashMap::new(),
        })
    } else {
        Box::new(TarSource::read(&mut staging, input)?)
    };
    let (imported, keep) = verify(src.as_mut(), &mut staging, repo, tag)?;
    // Adopt what verified; the rest is removed with the staging.
    let mut added = 0;
    for s in keep.values() {
        if blobs.adopt(&s.tmp, &s.digest)? {
            added += 1;
        }
    }
    Ok(Imported {
        blobs_added: added,
        ..imported
    })
}

/// Verifies the image in `src` and returns what to keep (digest → staged).
fn verify(
    src: &mut dyn Source,
    staging: &mut Staging,
    repo: &str,
    tag: &str,
) -> Result<(Imported, BTreeMap<Digest, Staged>)> {
    let layout = src.get(staging, "oci-layout")?;
    let index = src.get(staging, "index.json")?;
    if let (Some(layout), Some(index)) = (layout, index) {
        return verify_layout(src, staging, &layout, &index, tag);
    }
    if let Some(m) = src.get(staging, "manifest.json")? {
        return verify_docker(src, staging, &m, repo, tag);
    }
    bail!(
        "neither an OCI image layout (oci-layout and index.json) nor a docker-archive (manifest.json)"
    )
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn verify_layout(
    src: &mut dyn Source,
    staging: &mut Staging,
    layout: &Staged,
    index: &Staged,
    tag: &str,
) -> Result<(Imported, BTreeMap<Digest, Staged>)> {
    let l = oci_spec::image::OciLayout::from_reader(&read_staged(layout, 4096, "oci-layout")?[..])
        .context("parsing oci-layout")?;
    if !l.image_layout_version().starts_with("1.") {
        bail!(
            "oci-layout: imageLayoutVersion {:?} is not 1.x",
            l.image_layout_version()
        );
    }
    let idx = oci_spec::image::ImageIndex::from_reader(
        &read_staged(index, MAX_MANIFEST, "index.json")?[..],
    )
    .context("parsing index.json")?;
    let ms = idx.manifests();
    let root = match ms.len() {
        0 => bail!("index.json lists no image"),
        1 => &ms[0],
        _ => {
            let named = |d: &&oci_spec::image::Descriptor| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|n| n == tag)
            };
            let hits: Vec<_> = ms.iter().filter(named).collect();
            if hits.len() != 1 {
                let names: Vec<String> = ms
                    .iter()
                    .map(|d| {
                        d.annotations()
                            .as_ref()
                            .and_then(|a| a.get(REF_NAME).cloned())
                            .unwrap_or_else(|| format!("(unnamed {})", d.digest()))
                    })
                    .collect();
                bail!(
                    "index.json lists {} images and {} of them are named {tag:?} ({REF_NAME}); names: {}",
                    ms.len(),
                    hits.len(),
                    names.join(", ")
                );
            }
            hits[0]
        }
    };
    let root = super::child(root).context("index.json")?;
    if !super::is_manifest(&root.media_type) && !super::is_index(&root.media_type) {
        bail!(
            "index.json names {} of type {:?}, not an image manifest or index",
            root.digest,
            root.media_type
        );
    }
    let mut keep = BTreeMap::new();
    let mut arch = String::new();
    walk(src, staging, &root, "index.json", 0, &mut keep, &mut arch)?;
    let bytes = keep.values().map(|s| s.size).sum();
    Ok((
        Imported {
            format: Format::OciLayout,
            digest: root.digest,
            media_type: root.media_type.clone(),
            size: root.size,
            arch,
            blobs: keep.len(),
            blobs_added: 0,
            bytes,
        },
        keep,
    ))
}

/// Stages and checks one descriptor's blob, and recurses into manifests
/// and indexes.
fn walk(
    src: &mut dyn Source,
    staging: &mut Staging,
    d: &Child,
    named_by: &str,
    depth: usize,
    keep: &mut BTreeMap<Digest, Staged>,
    arch: &mut String,
) -> Result<()> {
    if keep.contains_key(&d.digest) {
        return Ok(());
    }
    if keep.len() >= MAX_DESCRIPTORS {
        bail!("the image names more than {MAX_DESCRIPTORS} blobs");
    }
    let path = format!("blobs/sha256/{}", d.digest.hex());
    let s = src.get(staging, &path)?.with_context(|| {
        format!(
            "blob {} (named by {named_by}) is missing from the layout",
            d.digest
        )
    })?;
    if s.digest != d.digest || s.size != d.size {
        bail!(
            "{path}: digest mismatch: the file is {} ({} bytes), {named_by} says {} ({} bytes)",
            s.digest,
            s.size,
            d.digest,
            d.size
        );
    }
    keep.insert(d.digest, s.clone());
    let doc = super::is_manifest(&d.media_type) || super::is_index(&d.media_type);
    if !doc {
        return Ok(());
    }
    if depth > MAX_DEPTH {
        bail!("manifests nested deeper than {MAX_DEPTH}");
    }
    let bytes = read_staged(&s, MAX_MANIFEST, &format!("manifest {}", d.digest))?;
    let own =
        super::manifest_media_type(&bytes).with_context(|| format!("manifest {}", d.digest))?;
    if own != d.media_type {
        bail!(
            "manifest {}: its mediaType is {own:?}, {named_by} says {:?}",
            d.digest,
            d.media_type
        );
    }
    let kids = super::children(&own, &bytes).with_context(|| format!("manifest {}", d.digest))?;
    let me = format!("manifest {}", d.digest);
    if super::is_manifest(&own) {
        // The config decides the architecture (the first manifest's, for
        // an image; an index is `multi`).
        let config = &kids[0];
        if config.size > MAX_CONFIG {
            bail!(
                "{me}: config {} is {} bytes, more than {MAX_CONFIG}",
                config.digest,
                config.size
            );
        }
        walk(src, staging, config, &me, depth + 1, keep, arch)?;
        if arch.is_empty() {
            let cs = &keep[&config.digest];
            let v: serde_json::Value =
                serde_json::from_slice(&read_staged(cs, MAX_CONFIG, "config")?)
                    .with_context(|| format!("{me}: config {} is not JSON", config.digest))?;
            *arch = v["architecture"].as_str().unwrap_or("").to_owned();
        }
        for l in &kids[1..] {
            walk(src, staging, l, &me, depth + 1, keep, arch)?;
        }
    } else {
        *arch = "multi".into();
        for k in &kids {
            walk(src, staging, k, &me, depth + 1, keep, arch)?;
        }
    }
    Ok(())
}

/// One image of a docker archive's `manifest.json`.
#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The hex digest a docker archive file name carries (`<hex>.json`,
/// `blobs/sha256/<hex>`), if any.
fn digest_in_name(path: &str) -> Option<Digest> {
    let base = path.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    format!("sha256:{hex}").parse().ok()
}

fn verify_docker(
    src: &mut dyn Source,
    staging: &mut Staging,
    manifest: &Staged,
    repo: &str,
    tag: &str,
) -> Result<(Imported, BTreeMap<Digest, Staged>)> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&read_staged(manifest, 1 << 20, "manifest.json")?)
            .context("parsing manifest.json (docker-archive)")?;
    let want = format!("{repo}:{tag}");
    let entry = match entries.len() {
        0 => bail!("manifest.json lists no image"),
        1 => &entries[0],
        _ => {
            let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
            let hits: Vec<_> = entries
                .iter()
                .filter(|e| {
                    tags(e)
                        .iter()
                        .any(|t| *t == want || t.ends_with(&format!("/{want}")))
                })
                .collect();
            if hits.len() != 1 {
                let all: Vec<String> = entries.iter().flat_map(tags).collect();
                bail!(
                    "manifest.json lists {} images and {} of them are tagged {want:?}; tags: {}",
                    entries.len(),
                    hits.len(),
                    all.join(", ")
                );
            }
            hits[0]
        }
    };
    let mut keep = BTreeMap::new();
    let cpath = clean_path(&entry.config)?;
    let cs = src
        .get(staging, &cpath)?
        .with_context(|| format!("config {cpath} (named by manifest.json) is missing"))?;
    if let Some(d) = digest_in_name(&cpath) {
        if d != cs.digest {
            bail!(
                "{cpath}: digest mismatch: the file is {}, its name says {d}",
                cs.digest
            );
        }
    }
    let cbytes = read_staged(&cs, MAX_CONFIG, &cpath)?;
    let config = oci_spec::image::ImageConfiguration::from_reader(&cbytes[..])
        .with_context(|| format!("parsing the image config {cpath}"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        bail!(
            "manifest.json lists {} layers, the config's rootfs.diff_ids {}",
            entry.layers.len(),
            diff_ids.len()
        );
    }
    keep.insert(cs.digest, cs.clone());
    let mut layers = Vec::new();
    let mut inflated_total = 0u64;
    for (i, (lp, diff)) in entry.layers.iter().zip(diff_ids).enumerate() {
        let lp = clean_path(lp)?;
        let ls = src
            .get(staging, &lp)?
            .with_context(|| format!("layer {lp} (named by manifest.json) is missing"))?;
        if let Some(d) = digest_in_name(&lp) {
            if d != ls.digest {
                bail!(
                    "{lp}: digest mismatch: the file is {}, its name says {d}",
                    ls.digest
                );
            }
        }
        let want: Digest = diff
            .parse()
            .with_context(|| format!("config rootfs.diff_ids[{i}]"))?;
        let (media_type, got, n) = uncompressed_digest(&ls, MAX_INFLATED - inflated_total)
            .with_context(|| format!("reading layer {lp}"))?;
        inflated_total += n;
        if got != want {
            bail!("{lp}: digest mismatch: its uncompressed content is {got}, the config's rootfs.diff_ids[{i}] says {want}");
        }
        layers.push(oci_spec::image::Descriptor::new(
            media_type.into(),
            ls.size,
            spec_digest(&ls.digest)?,
        ));
        keep.insert(ls.digest, ls);
    }
    let m = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(oci_spec::image::MediaType::ImageManifest)
        .config(oci_spec::image::Descriptor::new(
            oci_spec::image::MediaType::ImageConfig,
            cs.size,
            spec_digest(&cs.digest)?,
        ))
        .layers(layers)
        .build()
        .context("building the OCI manifest")?;
    let bytes = serde_json::to_vec(&m).context("writing the OCI manifest")?;
    let ms = staging.stage(&bytes[..], "the converted manifest")?;
    let arch = config.architecture().to_string();
    keep.insert(ms.digest, ms.clone());
    let total = keep.values().map(|s| s.size).sum();
    Ok((
        Imported {
            format: Format::DockerArchive,
            digest: ms.digest,
            media_type: super::OCI_MANIFEST.into(),
            size: ms.size,
            arch,
            blobs: keep.len(),
            blobs_added: 0,
            bytes: total,
        },
        keep,
    ))
}

fn spec_digest(d: &Digest) -> Result<oci_spec::image::Digest> {
    d.to_string()
        .parse()
        .map_err(|e| anyhow::anyhow!("digest {d}: {e}"))
}

/// The layer's media type, the sha256 of its uncompressed bytes and their
/// count (gzip and zstd are inflated, at most `max` bytes).
fn uncompressed_digest(s: &Staged, max: u64) -> Result<(&'static str, Digest, u64)> {
    let mut f = File::open(&s.tmp)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    f.rewind()?;
    let f = BufReader::new(f);
    let (mt, reader): (&'static str, Box<dyn Read>) = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Box::new(flate2::read::GzDecoder::new(f)),
        )
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Box::new(zstd::stream::read::Decoder::new(f)?),
        )
    } else {
        if s.size > max {
            bail!("more than {max} bytes of layers");
        }
        return Ok(("application/vnd.oci.image.layer.v1.tar", s.digest, s.size));
    };
    let (d, n) = Digest::of_reader(reader.take(max.saturating_add(1)))?;
    if n > max {
        bail!("inflates to more than {max} bytes of layers");
    }
    Ok((mt, d, n))
}

#[cfg(test)]
mod tests;
