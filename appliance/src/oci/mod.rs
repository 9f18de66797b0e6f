//! Container images (issue 16, part 3): a read-only OCI registry at `/v2/`
//! over the node's blob store, filled by `appliance repo import-oci`.
//!
//! - [`import`] reads an OCI image layout (a directory or a tar of one) or a
//!   `docker save` archive, verifies every blob against the descriptor or
//!   config entry that names it, converts a docker archive to an OCI
//!   manifest, and moves the verified blobs into `<data>/blobs/sha256/`.
//! - [`registry`] answers the OCI distribution API (manifests, blobs with
//!   `Range`, tags list, catalog) from those blobs, and the upload route
//!   `POST /api/v1/oci/import`.
//! - A tag is an inventory `image` object of type `oci` whose `reference`
//!   is `REPO:TAG@sha256:<manifest>` ([`Tag`]): the inventory writes it as a
//!   small JSON file (temp + rename, one git commit), so tags travel with
//!   sync and sync bundles like every other object, and the blobs they
//!   name travel as blobs.
//!
//! What a repository may serve is what its tags reach ([`reachable`]):
//! a blob that no tag of the repository names (a captured disk chunk, an
//! apt mirror file, another repository's layer) is `BLOB_UNKNOWN` there.

pub mod import;
pub mod registry;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use builder::Digest;
use serde_json::Value;

use crate::inventory::model::{Image, Kind, Object};
use crate::inventory::Inventory;

/// The `type` of inventory images that are OCI tags.
pub const IMAGE_TYPE: &str = "oci";
/// Largest manifest or index accepted (the distribution spec asks
/// registries to take at least 4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG: u64 = 8 << 20;
/// Most descriptors one image (all its manifests together) may name.
pub const MAX_DESCRIPTORS: usize = 4096;
/// Deepest nesting of indexes.
pub const MAX_DEPTH: usize = 4;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether `media_type` is a manifest we parse (OCI or Docker v2).
pub fn is_manifest(media_type: &str) -> bool {
    matches!(media_type, OCI_MANIFEST | DOCKER_MANIFEST)
}

/// Whether `media_type` is an index (OCI or a Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    matches!(media_type, OCI_INDEX | DOCKER_LIST)
}

/// Checks a repository name against the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by `/`, at most
/// 255 bytes.
pub fn check_repo_name(name: &str) -> Result<()> {
    let bad = |why: &str| anyhow::anyhow!("repository name {name:?}: {why}");
    if name.is_empty() || name.len() > 255 {
        return Err(bad("must be 1-255 characters"));
    }
    for comp in name.split('/') {
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err(bad(
                "each '/'-separated part must start and end with a lower-case letter or digit",
            ));
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            // A separator: ".", "_", "__" or a run of "-".
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &comp[start..i];
            let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(bad(&format!(
                    "{sep:?} is not a separator (use '.', '_', '__' or dashes between lower-case letters and digits)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<()> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if !ok {
        bail!(
            "tag {tag:?}: use 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        );
    }
    Ok(())
}

/// `REPO:TAG` (the tag defaults to `latest`), checked.
pub fn parse_name(s: &str) -> Result<(String, String)> {
    let (repo, tag) = match s.rsplit_once(':') {
        Some((r, t)) => (r, t),
        None => (s, "latest"),
    };
    check_repo_name(repo)?;
    check_tag(tag)?;
    Ok((repo.to_owned(), tag.to_owned()))
}

/// One tag: a repository, a tag and the manifest (or index) it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub repo: String,
    pub tag: String,
    pub digest: Digest,
}

impl Tag {
    /// The inventory image name of this tag: the repository with `/` as
    /// `.`, then `-` and the tag (`library/busybox:1.36` →
    /// `library.busybox-1.36`).
    pub fn image_name(&self) -> String {
        format!("{}-{}", self.repo.replace('/', "."), self.tag)
    }

    /// The inventory `reference`: `REPO:TAG@sha256:<hex>`.
    pub fn reference(&self) -> String {
        format!("{}:{}@{}", self.repo, self.tag, self.digest)
    }

    /// Parses a `reference` written by [`Tag::reference`].
    pub fn parse_reference(r: &str) -> Result<Tag> {
        let (name, digest) = r
            .split_once('@')
            .with_context(|| format!("OCI image reference {r:?} has no @sha256:…"))?;
        let (repo, tag) = name
            .rsplit_once(':')
            .with_context(|| format!("OCI image reference {r:?} has no :TAG"))?;
        check_repo_name(repo)?;
        check_tag(tag)?;
        let digest: Digest = digest
            .parse()
            .with_context(|| format!("OCI image reference {r:?}"))?;
        Ok(Tag {
            repo: repo.into(),
            tag: tag.into(),
            digest,
        })
    }

    /// Every OCI tag in the inventory, by repository then tag. Images of
    /// type `oci` whose reference does not parse are skipped (and logged).
    pub fn all(inv: &Inventory) -> BTreeMap<String, BTreeMap<String, Digest>> {
        let mut out: BTreeMap<String, BTreeMap<String, Digest>> = BTreeMap::new();
        for obj in inv.list(Kind::Image) {
            let Object::Image(img) = obj else { continue };
            if img.kind != IMAGE_TYPE {
                continue;
            }
            match Tag::parse_reference(&img.reference) {
                Ok(t) => {
                    out.entry(t.repo).or_default().insert(t.tag, t.digest);
                }
                Err(e) => {
                    tracing::warn!(image = %img.name, error = format!("{e:#}"), "skipping an OCI image")
                }
            }
        }
        out
    }

    /// Writes this tag into the inventory (creates the image object, or
    /// moves an existing tag to a new digest). Refuses to take over an
    /// image of that name that is not this tag.
    pub fn save(
        &self,
        inv: &mut Inventory,
        arch: &str,
        comment: &str,
        author: &crate::inventory::Author,
    ) -> Result<()> {
        let name = self.image_name();
        crate::inventory::model::check_name(&name).map_err(|e| {
            anyhow::anyhow!(
                "{}:{} gives the image name {name:?}: {}",
                self.repo,
                self.tag,
                e.message
            )
        })?;
        let img = Image {
            name: name.clone(),
            kind: IMAGE_TYPE.into(),
            reference: self.reference(),
            arch: arch.into(),
            variables: Default::default(),
            comment: comment.into(),
        };
        match inv.get(Kind::Image, &name) {
            None => inv.create(Object::Image(img), author)?,
            Some(Object::Image(old)) => {
                let same_tag = old.kind == IMAGE_TYPE
                    && Tag::parse_reference(&old.reference)
                        .is_ok_and(|t| t.repo == self.repo && t.tag == self.tag);
                if !same_tag {
                    bail!(
                        "image {name:?} already exists and is not the tag {}:{} (type {:?}, reference {:?}); remove or rename it first",
                        self.repo,
                        self.tag,
                        old.kind,
                        old.reference
                    );
                }
                if old.reference != img.reference || old.arch != img.arch {
                    inv.update(Object::Image(img), author)?;
                }
            }
            Some(_) => unreachable!("Kind::Image lookups give images"),
        }
        Ok(())
    }
}

/// The node's blob store, `<data>/blobs/sha256/<hex>`, as the registry and
/// the importer use it.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn new(data: &Path) -> Self {
        Blobs {
            dir: data.join("blobs/sha256"),
        }
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Reads a blob of at most `max` bytes, checking its digest.
    pub fn read_small(&self, d: &Digest, max: u64) -> Result<Vec<u8>> {
        let p = self.path(d);
        let f = std::fs::File::open(&p).with_context(|| format!("opening blob {d}"))?;
        let mut bytes = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading blob {d}"))?;
        if bytes.len() as u64 > max {
            bail!("blob {d} is larger than {max} bytes");
        }
        if Digest::of(&bytes) != *d {
            bail!("blob {d} does not match its digest (corrupt store)");
        }
        Ok(bytes)
    }

    /// A fresh temporary path inside the store's directory (same
    /// filesystem, so a rename names it).
    pub fn temp_path(&self, what: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        Ok(self.dir.join(format!(
            ".oci-{what}-{}-{}.tmp",
            std::process::id(),
            crate::entropy::fast_u32()
        )))
    }

    /// Moves a file already checked to hold `d` into the store (a blob
    /// already there is kept and the file removed). Returns whether the
    /// blob is new.
    pub fn adopt(&self, file: &Path, d: &Digest) -> Result<bool> {
        let dest = self.path(d);
        if dest.is_file() {
            let _ = std::fs::remove_file(file);
            return Ok(false);
        }
        std::fs::rename(file, &dest)
            .with_context(|| format!("naming {} as {}", file.display(), dest.display()))?;
        Ok(true)
    }

    /// Stores `bytes` as a blob (temp + fsync + rename); returns its digest
    /// and whether it is new.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(Digest, bool)> {
        let d = Digest::of(bytes);
        if self.has(&d) {
            return Ok((d, false));
        }
        let tmp = self.temp_path("put")?;
        let res = (|| -> Result<bool> {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(bytes)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
            self.adopt(&tmp, &d)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok((d, res?))
    }
}

/// The media type of a manifest or index document: its `mediaType` field,
/// else (OCI allows leaving it out) an index when it has `manifests`, else
/// an OCI manifest.
pub fn manifest_media_type(bytes: &[u8]) -> Result<String> {
    let v: Value = serde_json::from_slice(bytes).context("parsing a manifest as JSON")?;
    if !v.is_object() {
        bail!("a manifest must be a JSON object");
    }
    Ok(match v.get("mediaType").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None if v.get("manifests").is_some() => OCI_INDEX.into(),
        None => OCI_MANIFEST.into(),
    })
}

/// A descriptor reduced to what the graph walk needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

fn child(d: &oci_spec::image::Descriptor) -> Result<Child> {
    let digest: Digest =
        d.digest().to_string().parse().with_context(|| {
            format!("descriptor digest {}: only sha256 is supported", d.digest())
        })?;
    Ok(Child {
        media_type: d.media_type().to_string(),
        digest,
        size: d.size(),
    })
}

/// What a manifest or index names: config and layers, or manifests.
pub fn children(media_type: &str, bytes: &[u8]) -> Result<Vec<Child>> {
    if is_index(media_type) {
        let idx =
            oci_spec::image::ImageIndex::from_reader(bytes).context("parsing an image index")?;
        idx.manifests().iter().map(child).collect()
    } else if is_manifest(media_type) {
        let m = oci_spec::image::ImageManifest::from_reader(bytes)
            .context("parsing an image manifest")?;
        let mut out = vec![child(m.config())?];
        for l in m.layers() {
            out.push(child(l)?);
        }
        Ok(out)
    } else {
        bail!("{media_type:?} is not a manifest or index media type this registry serves")
    }
}

/// Every blob reachable from `roots` in the store: the roots, and through
/// manifests and indexes their configs, layers and child manifests. A
/// child that is missing from the store is still listed (the walk stops
/// there). Bounded by [`MAX_DESCRIPTORS`] and [`MAX_DEPTH`].
pub fn reachable(blobs: &Blobs, roots: &[Digest]) -> Result<BTreeSet<Digest>> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<(Digest, Option<String>, usize)> =
        roots.iter().map(|d| (*d, None, 0)).collect();
    while let Some((d, media, depth)) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        if seen.len() > MAX_DESCRIPTORS * roots.len().max(1) {
            bail!("more than {MAX_DESCRIPTORS} blobs per tag");
        }
        let is_doc = media
            .as_deref()
            .is_none_or(|m| is_index(m) || is_manifest(m));
        if !is_doc || !blobs.has(&d) {
            continue;
        }
        let bytes = blobs.read_small(&d, MAX_MANIFEST)?;
        let mt = match media {
            Some(m) => m,
            None => manifest_media_type(&bytes)?,
        };
        if depth >= MAX_DEPTH && is_index(&mt) {
            bail!("indexes nested deeper than {MAX_DEPTH}");
        }
        for c in children(&mt, &bytes)? {
            stack.push((c.digest, Some(c.media_type), depth + 1));
        }
    }
    Ok(seen)
}

/// Small images built in memory for the unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn sha(b: &[u8]) -> String {
        Digest::of(b).to_string()
    }

    /// A tar holding `files` (path, bytes).
    pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, p, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    pub fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// One image: its layer (uncompressed tar), the config and the files
    /// of an OCI layout holding it.
    pub struct Image {
        pub layer_gz: Vec<u8>,
        pub config: Vec<u8>,
        pub manifest: Vec<u8>,
        pub files: Vec<(String, Vec<u8>)>,
    }

    pub fn config_for(layer_tar: &[u8]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]}
        }))
        .unwrap()
    }

    pub fn oci_image(greeting: &str, ref_name: &str) -> Image {
        let layer_tar = tar_of(&[("hello", greeting.as_bytes())]);
        let layer_gz = gzip(&layer_tar);
        let config = config_for(&layer_tar);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha(&layer_gz), "size": layer_gz.len()}]
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha(&manifest),
                           "size": manifest.len(),
                           "annotations": {"org.opencontainers.image.ref.name": ref_name}}]
        }))
        .unwrap();
        let blob = |b: &[u8]| (format!("blobs/sha256/{}", Digest::of(b).hex()), b.to_vec());
        let files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index),
            blob(&manifest),
            blob(&config),
            blob(&layer_gz),
        ];
        Image {
            layer_gz,
            config,
            manifest,
            files,
        }
    }

    /// A `docker save` archive of one image (legacy layout:
    /// `<hex>.json`, `<id>/layer.tar`).
    pub fn docker_archive(greeting: &str, repo_tag: &str) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
        let layer_tar = tar_of(&[("hello", greeting.as_bytes())]);
        let config = config_for(&layer_tar);
        let chex = Digest::of(&config).hex();
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": format!("{chex}.json"), "RepoTags": [repo_tag],
             "Layers": ["0123abcd/layer.tar"]}
        ]))
        .unwrap();
        (
            vec![
                ("manifest.json".into(), manifest),
                (format!("{chex}.json"), config.clone()),
                ("0123abcd/layer.tar".into(), layer_tar),
            ],
            config,
        )
    }

    pub fn tar_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let v: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), &b[..])).collect();
        tar_of(&v)
    }
}
