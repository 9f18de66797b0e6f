//! The content-addressed store the appliance carries, laid out as an OCI image
//! layout so stock tools (skopeo, oras, umoci) can read it.
//!
//! ```text
//! <root>/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! <root>/index.json            named references (annotation org.opencontainers.image.ref.name)
//! <root>/blobs/sha256/<hex>    immutable blobs, named by the sha256 of their bytes
//! <root>/tmp/                  temp files, renamed into blobs/ once complete and fsynced
//! ```
//!
//! Blobs are written to a temp file on the same filesystem, fsynced and renamed
//! into place, so a blob path either does not exist or holds complete content.
//! Every read goes through [`VerifyingReader`], so a tampered blob fails at end
//! of input instead of handing out wrong bytes.
//!
//! Every ref names an OCI manifest, so stock tools (`skopeo inspect --raw`,
//! `skopeo copy`, `umoci ls`) can follow it: an image's own manifest or
//! index as given, and any other blob (a keyring, a lock, a set document)
//! through an OCI 1.1 *artifact manifest* ([`artifact_manifest`]): the
//! empty config `{}`, `artifactType` = the blob's media type, and the blob
//! as the one layer with an `org.opencontainers.image.title` annotation.
//! [`Store::resolve`] follows such a manifest back to the blob;
//! [`Store::refs`] and [`parse_index_refs`] list what `index.json` holds.
//!
//! `index.json` is rewritten atomically (temp file + rename), sorted by ref
//! name with a fixed key order, so the same set of refs always gives the same
//! bytes. [`Store::gc`] keeps what the refs reach (OCI manifests and indexes,
//! and the appliance's own tree and set documents) and deletes the rest; it
//! takes no lock and must not run while another process writes to the store.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use builder::digest::VerifyingReader;
use builder::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Annotation that names a descriptor in `index.json`.
pub const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Media type of the appliance's file-tree documents: JSON in which every
/// object with a `digest` field names a blob (and its `mediaType`, if given).
pub const TREE_MEDIA_TYPE: &str = "application/vnd.appliance.tree.v1+json";
/// Media type of the appliance's blob-set documents:
/// `{"blobs":[{"digest":"sha256:..","mediaType":".."}]}` (`mediaType` optional).
pub const SET_MEDIA_TYPE: &str = "application/vnd.appliance.set.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed tar layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type for opaque bytes.
pub const OCTET_STREAM: &str = "application/octet-stream";
/// OCI 1.1 empty descriptor media type (the config of an artifact manifest).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The content of the OCI 1.1 empty descriptor.
pub const OCI_EMPTY_JSON: &[u8] = b"{}";
/// Annotation giving a layer's file name.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The `oci-layout` file's content.
pub const OCI_LAYOUT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
/// Temp files older than this are removed by [`Store::gc`].
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// What went wrong in a store operation; every variant names its input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not an OCI image layout: {reason}", root.display())]
    NotALayout { root: PathBuf, reason: String },
    #[error("blob {digest} is not in the store at {}", root.display())]
    Missing { digest: Digest, root: PathBuf },
    #[error("blob {digest} is corrupt: {detail}")]
    Corrupt { digest: Digest, detail: String },
    #[error("content does not match {expected} ({size} bytes): {detail}; nothing stored")]
    Mismatch {
        expected: Digest,
        size: u64,
        detail: String,
    },
    #[error("reading content for {expected}: {source}; nothing stored")]
    Source { expected: Digest, source: io::Error },
    #[error("{}: invalid index: {source}", path.display())]
    BadIndex {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("blob {digest} ({media_type}): invalid document: {detail}")]
    BadDocument {
        digest: Digest,
        media_type: String,
        detail: String,
    },
    #[error("reference {name:?}: cannot describe it in an OCI manifest: {detail}")]
    Manifest { name: String, detail: String },
    #[error("invalid reference name {0:?}: expected components of [A-Za-z0-9] joined by one of -._:@+ or /")]
    BadRefName(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a descriptor in `index.json` points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// What [`Store::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced blobs deleted.
    pub blobs: Vec<Digest>,
    /// Bytes freed by deleting them and stale temp files.
    pub bytes: u64,
    /// Stale temp files deleted.
    pub temp_files: usize,
}

/// An OCI image layout directory used as a content-addressed blob store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A reader over a stored blob that fails at end of input if the bytes do
/// not match the blob's digest.
pub type BlobReader = VerifyingReader<BufReader<File>>;

#[derive(Serialize, Deserialize)]
struct IndexJson {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default = "index_media_type")]
    media_type: String,
    #[serde(default)]
    manifests: Vec<IndexEntry>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

fn index_media_type() -> String {
    OCI_INDEX.to_string()
}

#[derive(Serialize, Deserialize, Clone)]
struct IndexEntry {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

impl IndexEntry {
    fn name(&self) -> Option<&str> {
        self.annotations.get(REF_ANNOTATION).map(String::as_str)
    }
}

/// Canonical `index.json` bytes: descriptors sorted by ref name (unnamed
/// last, by digest), pretty JSON, trailing newline.
fn index_bytes(
    mut manifests: Vec<IndexEntry>,
    extra: BTreeMap<String, serde_json::Value>,
) -> Vec<u8> {
    manifests.sort_by(|a, b| {
        (a.name().is_none(), a.name(), a.digest).cmp(&(b.name().is_none(), b.name(), b.digest))
    });
    let index = IndexJson {
        schema_version: 2,
        media_type: OCI_INDEX.into(),
        manifests,
        extra,
    };
    let mut bytes = serde_json::to_vec_pretty(&index).expect("index serialises");
    bytes.push(b'\n');
    bytes
}

/// The `index.json` of a layout holding exactly these named references
/// (as `index.json` lists them: manifests, see [`Store::wrap`]),
/// byte-identical to what [`Store::set_ref`] would write for them. Used to
/// describe a bundle snapshot without writing a second store.
pub fn index_document(refs: &[(String, Descriptor)]) -> Vec<u8> {
    let manifests = refs
        .iter()
        .map(|(name, d)| IndexEntry {
            media_type: d.media_type.clone(),
            digest: d.digest,
            size: d.size,
            annotations: BTreeMap::from([(REF_ANNOTATION.to_string(), name.clone())]),
            extra: BTreeMap::new(),
        })
        .collect();
    index_bytes(manifests, BTreeMap::new())
}

/// The named references in `index.json` bytes as listed there (manifest
/// descriptors; see [`artifact_payload`]), sorted by name (for a
/// layout read without opening it as a [`Store`], e.g. a read-only bundle).
pub fn parse_index_refs(index: &[u8]) -> Result<Vec<(String, Descriptor)>, serde_json::Error> {
    let index: IndexJson = serde_json::from_slice(index)?;
    let mut out: Vec<(String, Descriptor)> = index
        .manifests
        .into_iter()
        .filter_map(|e| {
            Some((
                e.name()?.to_string(),
                Descriptor {
                    media_type: e.media_type,
                    digest: e.digest,
                    size: e.size,
                },
            ))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A set document's bytes (`{"blobs":[descriptor…]}`, [`SET_MEDIA_TYPE`]):
/// the descriptors sorted by digest without repeats, pretty JSON, trailing
/// newline.
pub fn set_document(blobs: &[Descriptor]) -> Vec<u8> {
    let mut blobs = blobs.to_vec();
    blobs.sort_by_key(|b| b.digest);
    blobs.dedup_by(|a, b| a.digest == b.digest);
    let doc = serde_json::json!({ "blobs": blobs });
    let mut bytes = serde_json::to_vec_pretty(&doc).expect("set serialises");
    bytes.push(b'\n');
    bytes
}

/// Whether a descriptor of this media type is itself an OCI (or Docker)
/// manifest or index, which `index.json` can name directly.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST
    )
}

fn oci_descriptor(
    media_type: &str,
    d: &Digest,
    size: u64,
) -> Result<oci_spec::image::Descriptor, String> {
    let digest = oci_spec::image::Digest::try_from(d.to_string()).map_err(|e| e.to_string())?;
    Ok(oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::from(media_type),
        size,
        digest,
    ))
}

/// The OCI 1.1 artifact manifest that names `payload` under the ref `name`:
/// compact JSON (oci-spec's field order) of
/// `{"schemaVersion":2,"mediaType":OCI_MANIFEST,"artifactType":<payload's
/// media type>,"config":<the empty descriptor>,"layers":[<payload, with
/// title = the ref's last component>]}`. Same name and payload, same bytes;
/// nothing in it depends on time.
pub fn artifact_manifest(name: &str, payload: &Descriptor) -> Result<Vec<u8>, StoreError> {
    if is_manifest_type(&payload.media_type) {
        return Err(StoreError::Manifest {
            name: name.to_string(),
            detail: format!(
                "{} ({}) is a manifest itself; name it directly",
                payload.digest, payload.media_type
            ),
        });
    }
    let title = name.rsplit('/').next().unwrap_or(name);
    artifact_manifest_of(
        name,
        &payload.media_type,
        &[(payload.clone(), Some(title.to_string()))],
    )
}

/// An OCI 1.1 artifact manifest of `artifact_type` whose layers are
/// `layers` (in this order, each with its title annotation if given) and
/// whose config is the empty descriptor.
pub fn artifact_manifest_of(
    name: &str,
    artifact_type: &str,
    layers: &[(Descriptor, Option<String>)],
) -> Result<Vec<u8>, StoreError> {
    let fail = |d: &Descriptor, detail: String| StoreError::Manifest {
        name: name.to_string(),
        detail: format!("{} ({}): {detail}", d.digest, d.media_type),
    };
    let mut oci_layers = Vec::new();
    for (d, title) in layers {
        let mut layer = oci_descriptor(&d.media_type, &d.digest, d.size).map_err(|e| fail(d, e))?;
        if let Some(t) = title {
            layer.set_annotations(Some([(TITLE_ANNOTATION.to_string(), t.clone())].into()));
        }
        oci_layers.push(layer);
    }
    let empty = Descriptor {
        media_type: OCI_EMPTY.into(),
        digest: Digest::of(OCI_EMPTY_JSON),
        size: OCI_EMPTY_JSON.len() as u64,
    };
    let config =
        oci_descriptor(OCI_EMPTY, &empty.digest, empty.size).map_err(|e| fail(&empty, e))?;
    let manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(oci_spec::image::MediaType::ImageManifest)
        .artifact_type(oci_spec::image::MediaType::from(artifact_type))
        .config(config)
        .layers(oci_layers)
        .build()
        .map_err(|e| fail(&empty, e.to_string()))?;
    serde_json::to_vec(&manifest).map_err(|e| fail(&empty, e.to_string()))
}

/// The blob an artifact manifest made by [`artifact_manifest`] names: its
/// one layer, when the config is the empty descriptor and `artifactType` is
/// the layer's media type. `None` for any other manifest (an image).
pub fn artifact_payload(manifest: &[u8]) -> Option<Descriptor> {
    let m = oci_spec::image::ImageManifest::from_reader(manifest).ok()?;
    let [layer] = m.layers().as_slice() else {
        return None;
    };
    if m.config().media_type() != &oci_spec::image::MediaType::EmptyJSON
        || m.artifact_type().as_ref() != Some(layer.media_type())
    {
        return None;
    }
    Some(Descriptor {
        media_type: layer.media_type().to_string(),
        digest: layer.digest().to_string().parse().ok()?,
        size: layer.size(),
    })
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp file in `<root>/tmp` that is deleted on drop unless persisted.
struct TempBlob {
    path: PathBuf,
    file: Option<File>,
}

impl TempBlob {
    fn create(dir: &Path) -> Result<TempBlob, StoreError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}-{nanos}-{n}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(TempBlob {
            path,
            file: Some(file),
        })
    }

    /// Fsync and rename to `dest` (unless `dest` already exists).
    fn persist(mut self, dest: &Path) -> Result<(), StoreError> {
        let file = self.file.take().expect("temp file open until persisted");
        file.sync_all().map_err(io_err(&self.path))?;
        drop(file);
        if dest.exists() {
            return Ok(()); // dropped: the temp file is removed
        }
        fs::rename(&self.path, dest).map_err(io_err(dest))?;
        if let Some(dir) = dest.parent() {
            sync_dir(dir)?;
        }
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        self.file.take();
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Copy `r` into `w`, hashing on the way; returns digest and length.
fn copy_hashing(mut r: impl Read, w: &mut impl Write) -> io::Result<(Digest, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
    Ok((Digest(h.finalize().into()), n))
}

/// Whether `name` is a valid OCI reference name (`org.opencontainers.image.ref.name`).
pub fn valid_ref_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|component| {
            let b = component.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._:@+".contains(c))
        })
}

impl Store {
    /// Open an existing store; fails if `root` is not an OCI image layout.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        let layout = root.join("oci-layout");
        let text = fs::read_to_string(&layout).map_err(|e| StoreError::NotALayout {
            root: root.clone(),
            reason: format!("reading {}: {e}", layout.display()),
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| StoreError::NotALayout {
                root: root.clone(),
                reason: format!("{}: {e}", layout.display()),
            })?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(StoreError::NotALayout {
                root,
                reason: format!("{} has no imageLayoutVersion 1.0.0", layout.display()),
            });
        }
        let store = Store { root };
        for dir in [store.blob_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(store)
    }

    /// Create a store at `root` (or open the one already there).
    pub fn init(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        let store = Store { root };
        for dir in [store.blob_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, OCI_LAYOUT.as_bytes())?;
        }
        if !store.index_path().exists() {
            store.write_index(Vec::new(), BTreeMap::new())?;
        }
        Store::open(store.root)
    }

    /// The layout's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Where the blob named `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.hex())
    }

    /// Whether the blob is present (its content is not checked).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.missing(digest)),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn missing(&self, digest: &Digest) -> StoreError {
        StoreError::Missing {
            digest: *digest,
            root: self.root.clone(),
        }
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let mut tmp = TempBlob::create(&self.tmp_dir())?;
        let f = tmp.file.as_mut().expect("open");
        f.write_all(bytes).map_err(io_err(&tmp.path))?;
        // Unlike blobs, these files are replaced: rename over the old one.
        let file = tmp.file.take().expect("open");
        file.sync_all().map_err(io_err(&tmp.path))?;
        drop(file);
        fs::rename(&tmp.path, dest).map_err(io_err(dest))?;
        tmp.path = PathBuf::new();
        sync_dir(&self.root)
    }

    /// Store bytes; returns their digest and length.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), StoreError> {
        self.put_reader(bytes)
    }

    /// Store everything `r` yields; returns its digest and length.
    pub fn put_reader(&self, r: impl Read) -> Result<(Digest, u64), StoreError> {
        let mut tmp = TempBlob::create(&self.tmp_dir())?;
        let (digest, n) =
            copy_hashing(r, tmp.file.as_mut().expect("open")).map_err(io_err(&tmp.path.clone()))?;
        tmp.persist(&self.blob_path(&digest))?;
        Ok((digest, n))
    }

    /// Store the contents of a file.
    pub fn put_file(&self, path: impl AsRef<Path>) -> Result<(Digest, u64), StoreError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(io_err(path))?;
        let mut tmp = TempBlob::create(&self.tmp_dir())?;
        let (digest, n) = copy_hashing(BufReader::new(f), tmp.file.as_mut().expect("open"))
            .map_err(io_err(path))?;
        tmp.persist(&self.blob_path(&digest))?;
        Ok((digest, n))
    }

    /// Store what `r` yields only if it is exactly `size` bytes with digest
    /// `expected`; otherwise store nothing and fail.
    pub fn put_verified(
        &self,
        r: impl Read,
        expected: Digest,
        size: u64,
    ) -> Result<(), StoreError> {
        let mut tmp = TempBlob::create(&self.tmp_dir())?;
        let mut vr = VerifyingReader::new(r, expected, size, format!("content for {expected}"));
        let res = copy_hashing(&mut vr, tmp.file.as_mut().expect("open"));
        match res {
            Ok(_) => tmp.persist(&self.blob_path(&expected)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ) =>
            {
                Err(StoreError::Mismatch {
                    expected,
                    size,
                    detail: e.to_string(),
                })
            }
            Err(e) => Err(StoreError::Source {
                expected,
                source: e,
            }),
        }
    }

    /// Open a blob for reading; the reader fails at end of input if the
    /// stored bytes do not match `digest`.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let path = self.blob_path(digest);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.missing(digest)),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let len = f.metadata().map_err(io_err(&path))?.len();
        Ok(VerifyingReader::new(
            BufReader::new(f),
            *digest,
            len,
            format!("blob {digest} at {}", path.display()),
        ))
    }

    /// Read a whole blob into memory, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut out)
            .map_err(|e| StoreError::Corrupt {
                digest: *digest,
                detail: e.to_string(),
            })?;
        Ok(out)
    }

    /// Check that a blob's bytes match its name.
    pub fn verify(&self, digest: &Digest) -> Result<(), StoreError> {
        let r = self.open_blob(digest)?;
        io::copy(&mut { r }, &mut io::sink()).map_err(|e| StoreError::Corrupt {
            digest: *digest,
            detail: e.to_string(),
        })?;
        Ok(())
    }

    /// Every stored blob's digest, sorted.
    pub fn blobs(&self) -> Result<Vec<Digest>, StoreError> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if let Some(name) = e.file_name().to_str() {
                if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Verify every blob; returns the digests of those whose bytes do not
    /// match their name.
    pub fn verify_all(&self) -> Result<Vec<Digest>, StoreError> {
        let mut bad = Vec::new();
        for d in self.blobs()? {
            match self.verify(&d) {
                Ok(()) => {}
                Err(StoreError::Corrupt { .. }) => bad.push(d),
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    fn read_index(&self) -> Result<IndexJson, StoreError> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(IndexJson {
                    schema_version: 2,
                    media_type: OCI_INDEX.into(),
                    manifests: Vec::new(),
                    extra: BTreeMap::new(),
                })
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadIndex { path, source })
    }

    fn write_index(
        &self,
        manifests: Vec<IndexEntry>,
        extra: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.write_atomic(&self.index_path(), &index_bytes(manifests, extra))
    }

    /// Store the artifact manifest ([`artifact_manifest`]) that names
    /// `payload` under the ref `name`, and the empty config it points at;
    /// returns the manifest's descriptor (what `index.json` lists). A
    /// manifest or index `payload` is returned as it is.
    pub fn wrap(&self, name: &str, payload: &Descriptor) -> Result<Descriptor, StoreError> {
        if is_manifest_type(&payload.media_type) {
            return Ok(payload.clone());
        }
        let bytes = artifact_manifest(name, payload)?;
        self.put_bytes(OCI_EMPTY_JSON)?;
        let (digest, size) = self.put_bytes(&bytes)?;
        Ok(Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest,
            size,
        })
    }

    /// Store an artifact manifest ([`artifact_manifest_of`]) of
    /// `artifact_type` listing `layers`, and the empty config; returns its
    /// descriptor, for [`index_document`] or [`Store::set_ref`].
    pub fn put_artifact(
        &self,
        name: &str,
        artifact_type: &str,
        layers: &[(Descriptor, Option<String>)],
    ) -> Result<Descriptor, StoreError> {
        let bytes = artifact_manifest_of(name, artifact_type, layers)?;
        self.put_bytes(OCI_EMPTY_JSON)?;
        let (digest, size) = self.put_bytes(&bytes)?;
        Ok(Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest,
            size,
        })
    }

    /// Point the reference `name` at `desc`, replacing any previous
    /// descriptor of that name: directly when `desc` is a manifest or
    /// index, else through an artifact manifest ([`Store::wrap`]). The
    /// blob `desc` names need not be stored yet.
    pub fn set_ref(&self, name: &str, desc: Descriptor) -> Result<(), StoreError> {
        if !valid_ref_name(name) {
            return Err(StoreError::BadRefName(name.to_string()));
        }
        let desc = self.wrap(name, &desc)?;
        let index = self.read_index()?;
        let mut manifests: Vec<IndexEntry> = index
            .manifests
            .into_iter()
            .filter(|e| e.name() != Some(name))
            .collect();
        manifests.push(IndexEntry {
            media_type: desc.media_type,
            digest: desc.digest,
            size: desc.size,
            annotations: BTreeMap::from([(REF_ANNOTATION.to_string(), name.to_string())]),
            extra: BTreeMap::new(),
        });
        self.write_index(manifests, index.extra)
    }

    /// What the reference `name` stands for: the blob its artifact manifest
    /// names, or (for an image, or a ref written before refs had manifests)
    /// the descriptor in `index.json` itself.
    pub fn resolve(&self, name: &str) -> Result<Option<Descriptor>, StoreError> {
        let Some(d) = self.resolve_index(name)? else {
            return Ok(None);
        };
        if d.media_type == OCI_MANIFEST && self.contains(&d.digest) {
            if let Some(p) = artifact_payload(&self.read_blob(&d.digest)?) {
                return Ok(Some(p));
            }
        }
        Ok(Some(d))
    }

    /// The descriptor `index.json` lists under `name` (a manifest), if any.
    pub fn resolve_index(&self, name: &str) -> Result<Option<Descriptor>, StoreError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .find(|e| e.name() == Some(name))
            .map(|e| Descriptor {
                media_type: e.media_type,
                digest: e.digest,
                size: e.size,
            }))
    }

    /// All named references as `index.json` lists them (manifest
    /// descriptors; [`Store::resolve`] follows one to its blob), sorted by
    /// name.
    pub fn refs(&self) -> Result<Vec<(String, Descriptor)>, StoreError> {
        let mut out: Vec<(String, Descriptor)> = self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|e| {
                let name = e.name()?.to_string();
                Some((
                    name,
                    Descriptor {
                        media_type: e.media_type,
                        digest: e.digest,
                        size: e.size,
                    },
                ))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Give every ref that names a raw blob (a store written before refs
    /// had manifests) its artifact manifest; returns the names changed.
    pub fn upgrade_refs(&self) -> Result<Vec<String>, StoreError> {
        let mut changed = Vec::new();
        for (name, d) in self.refs()? {
            if !is_manifest_type(&d.media_type) {
                self.set_ref(&name, d)?;
                changed.push(name);
            }
        }
        Ok(changed)
    }

    /// Remove the reference `name`; returns whether it existed.
    pub fn remove_ref(&self, name: &str) -> Result<bool, StoreError> {
        let index = self.read_index()?;
        let before = index.manifests.len();
        let manifests: Vec<IndexEntry> = index
            .manifests
            .into_iter()
            .filter(|e| e.name() != Some(name))
            .collect();
        let removed = manifests.len() != before;
        if removed {
            self.write_index(manifests, index.extra)?;
        }
        Ok(removed)
    }

    /// Write a set document (`{"blobs":[...]}`, [`SET_MEDIA_TYPE`]) listing
    /// `blobs` sorted by digest, store it and point the ref `name` at it, so
    /// [`Store::gc`] keeps every listed blob. Returns the set's descriptor.
    pub fn put_set(&self, name: &str, blobs: &[Descriptor]) -> Result<Descriptor, StoreError> {
        let (digest, size) = self.put_bytes(&set_document(blobs))?;
        let desc = Descriptor {
            media_type: SET_MEDIA_TYPE.into(),
            digest,
            size,
        };
        self.set_ref(name, desc.clone())?;
        Ok(desc)
    }

    /// Blobs reachable from the descriptors in `index.json` (named or not).
    pub fn reachable(&self) -> Result<BTreeSet<Digest>, StoreError> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<(String, Digest)> = self
            .read_index()?
            .manifests
            .into_iter()
            .map(|e| (e.media_type, e.digest))
            .collect();
        while let Some((media_type, digest)) = todo.pop() {
            if !seen.insert(digest) || !self.contains(&digest) {
                continue;
            }
            if is_document(&media_type) {
                let bytes = self.read_blob(&digest)?;
                todo.extend(children(&media_type, &digest, &bytes)?);
            }
        }
        Ok(seen)
    }

    /// Delete every blob not reachable from `index.json`, and temp files
    /// older than an hour. Must not run while another writer is active.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_with_temp_age(STALE_TEMP)
    }

    /// Like [`Store::gc`], removing temp files older than `temp_age`.
    pub fn gc_with_temp_age(&self, temp_age: Duration) -> Result<GcReport, StoreError> {
        let keep = self.reachable()?;
        let mut report = GcReport::default();
        for d in self.blobs()? {
            if keep.contains(&d) {
                continue;
            }
            let path = self.blob_path(&d);
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io_err(&path))?;
            report.blobs.push(d);
            report.bytes += len;
        }
        let tmp = self.tmp_dir();
        let now = SystemTime::now();
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let m = e.metadata().map_err(io_err(&e.path()))?;
            let age = m
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(Duration::ZERO);
            if m.is_file() && age >= temp_age {
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                report.temp_files += 1;
                report.bytes += m.len();
            }
        }
        Ok(report)
    }
}

/// Whether blobs of this media type are JSON documents naming other blobs
/// (OCI manifests and indexes, the appliance's tree and set documents).
pub fn is_document(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST | TREE_MEDIA_TYPE | SET_MEDIA_TYPE
    )
}

/// The blobs a JSON document of `media_type` refers to, with their media
/// types (see [`is_document`]).
pub fn children(
    media_type: &str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<Vec<(String, Digest)>, StoreError> {
    let bad = |detail: String| StoreError::BadDocument {
        digest: *digest,
        media_type: media_type.to_string(),
        detail,
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let desc = |d: &serde_json::Value| -> Result<(String, Digest), StoreError> {
        let digest = d
            .get("digest")
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("descriptor without digest".into()))?
            .parse::<Digest>()
            .map_err(|e| bad(e.to_string()))?;
        let mt = d
            .get("mediaType")
            .and_then(|x| x.as_str())
            .unwrap_or(OCTET_STREAM);
        Ok((mt.to_string(), digest))
    };
    let list = |key: &str| -> Result<Vec<(String, Digest)>, StoreError> {
        match v.get(key) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a.iter().map(desc).collect(),
            Some(_) => Err(bad(format!("{key} is not a list"))),
        }
    };
    let mut out = Vec::new();
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = v
                .get("config")
                .ok_or_else(|| bad("manifest without config".into()))?;
            out.push(desc(config)?);
            out.extend(list("layers")?);
            if let Some(s) = v.get("subject") {
                out.push(desc(s)?);
            }
        }
        OCI_INDEX | DOCKER_LIST => out.extend(list("manifests")?),
        SET_MEDIA_TYPE => out.extend(list("blobs")?),
        TREE_MEDIA_TYPE => collect_digests(&v, &mut out, &bad)?,
        _ => {}
    }
    Ok(out)
}

fn collect_digests(
    v: &serde_json::Value,
    out: &mut Vec<(String, Digest)>,
    bad: &dyn Fn(String) -> StoreError,
) -> Result<(), StoreError> {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(s)) = m.get("digest") {
                let d = s.parse::<Digest>().map_err(|e| bad(e.to_string()))?;
                let mt = m
                    .get("mediaType")
                    .and_then(|x| x.as_str())
                    .unwrap_or(OCTET_STREAM);
                out.push((mt.to_string(), d));
            }
            for (k, x) in m {
                if k != "digest" {
                    collect_digests(x, out, bad)?;
                }
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                collect_digests(x, out, bad)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tmp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(dir.path().join("store")).unwrap();
        (dir, s)
    }

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn put_get_round_trip_and_dedup() {
        let (_d, s) = tmp_store();
        let (d1, n) = s.put_bytes(b"hello world").unwrap();
        assert_eq!(n, 11);
        assert_eq!(d1, Digest::of(b"hello world"));
        assert!(s.contains(&d1));
        assert_eq!(s.size(&d1).unwrap(), 11);
        assert_eq!(s.read_blob(&d1).unwrap(), b"hello world");
        let (d2, _) = s.put_reader(&b"hello world"[..]).unwrap();
        assert_eq!(d1, d2);
        let f = s.root().join("input");
        fs::write(&f, b"hello world").unwrap();
        assert_eq!(s.put_file(&f).unwrap().0, d1);
        assert_eq!(s.blobs().unwrap(), vec![d1]);
        assert_eq!(count_files(&s.root().join("tmp")), 0);
        assert!(s.verify_all().unwrap().is_empty());
        // Re-init and open keep the content.
        let s2 = Store::init(s.root()).unwrap();
        assert!(s2.contains(&d1));
        assert!(Store::open(s.root()).unwrap().contains(&d1));
        let missing = Digest::of(b"nope");
        assert!(matches!(
            s.open_blob(&missing),
            Err(StoreError::Missing { .. })
        ));
    }

    #[test]
    fn open_rejects_non_layout() {
        let dir = tempfile::tempdir().unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not an OCI image layout"), "{e}");
    }

    #[test]
    fn tampered_blob_fails_on_read() {
        let (_d, s) = tmp_store();
        let (d, _) = s.put_bytes(b"important bytes").unwrap();
        let p = s.blob_path(&d);
        let mut b = fs::read(&p).unwrap();
        b[3] ^= 1;
        fs::write(&p, b).unwrap();
        let e = s.read_blob(&d).unwrap_err();
        assert!(e.to_string().contains(&d.to_string()), "{e}");
        assert!(s.verify(&d).is_err());
        assert_eq!(s.verify_all().unwrap(), vec![d]);
    }

    #[test]
    fn put_verified_rejects_and_leaves_nothing() {
        let (_d, s) = tmp_store();
        let good = Digest::of(b"good");
        let e = s.put_verified(&b"evil"[..], good, 4).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        let e = s.put_verified(&b"goo"[..], good, 4).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        let e = s.put_verified(&b"goodgood"[..], good, 4).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        assert!(s.blobs().unwrap().is_empty());
        assert_eq!(count_files(&s.root().join("tmp")), 0);
        s.put_verified(&b"good"[..], good, 4).unwrap();
        assert_eq!(s.read_blob(&good).unwrap(), b"good");
    }

    #[test]
    fn refs_persist_with_stable_bytes() {
        let (_d, s) = tmp_store();
        let (a, na) = s.put_bytes(b"a").unwrap();
        let (b, nb) = s.put_bytes(b"b").unwrap();
        let da = Descriptor {
            media_type: OCTET_STREAM.into(),
            digest: a,
            size: na,
        };
        let db = Descriptor {
            media_type: OCTET_STREAM.into(),
            digest: b,
            size: nb,
        };
        s.set_ref("zeta", da.clone()).unwrap();
        s.set_ref("alpha/one", db.clone()).unwrap();
        let bytes1 = fs::read(s.root().join("index.json")).unwrap();
        // Same refs in another order, with a replacement in between.
        let (_d2, s2) = tmp_store();
        s2.set_ref("alpha/one", da.clone()).unwrap();
        s2.set_ref("alpha/one", db.clone()).unwrap();
        s2.set_ref("zeta", da.clone()).unwrap();
        let bytes2 = fs::read(s2.root().join("index.json")).unwrap();
        assert_eq!(bytes1, bytes2);
        let s3 = Store::open(s.root()).unwrap();
        assert_eq!(s3.resolve("zeta").unwrap(), Some(da.clone()));
        let refs = s3.refs().unwrap();
        let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["alpha/one", "zeta"]);
        assert!(refs.iter().all(|(_, d)| d.media_type == OCI_MANIFEST));
        assert_eq!(s3.resolve("alpha/one").unwrap(), Some(db));
        assert!(s3.remove_ref("zeta").unwrap());
        assert!(!s3.remove_ref("zeta").unwrap());
        assert_eq!(s3.resolve("zeta").unwrap(), None);
        assert!(matches!(
            s3.set_ref("../bad", s3.resolve("alpha/one").unwrap().unwrap()),
            Err(StoreError::BadRefName(_))
        ));
        let text = String::from_utf8(bytes1).unwrap();
        assert!(text.find("alpha/one").unwrap() < text.find("zeta").unwrap());
    }

    #[test]
    fn a_blob_ref_names_an_oci_artifact_manifest_with_stable_bytes() {
        let (_d, s) = tmp_store();
        let (a, na) = s.put_bytes(b"keyring bytes").unwrap();
        let payload = Descriptor {
            media_type: "application/pgp-keys".into(),
            digest: a,
            size: na,
        };
        s.set_ref("debian/keyring", payload.clone()).unwrap();
        let m = s.resolve_index("debian/keyring").unwrap().unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        let text = String::from_utf8(s.read_blob(&m.digest).unwrap()).unwrap();
        let empty = Digest::of(b"{}");
        assert_eq!(
            text,
            format!(
                "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"artifactType\":\"application/pgp-keys\",\
                 \"config\":{{\"mediaType\":\"{OCI_EMPTY}\",\"digest\":\"{empty}\",\"size\":2}},\
                 \"layers\":[{{\"mediaType\":\"application/pgp-keys\",\"digest\":\"{a}\",\"size\":13,\
                 \"annotations\":{{\"org.opencontainers.image.title\":\"keyring\"}}}}]}}"
            )
        );
        assert_eq!(s.read_blob(&empty).unwrap(), b"{}");
        assert_eq!(s.resolve("debian/keyring").unwrap(), Some(payload.clone()));
        assert_eq!(artifact_payload(text.as_bytes()), Some(payload.clone()));
        // Same name and blob in another store: the same manifest.
        let (_d2, s2) = tmp_store();
        s2.set_ref("debian/keyring", payload.clone()).unwrap();
        assert_eq!(s2.resolve_index("debian/keyring").unwrap(), Some(m.clone()));
        // gc keeps the manifest, the empty config and the blob.
        assert!(s.gc().unwrap().blobs.is_empty());
        // An image manifest is named directly and resolves to itself.
        let (img, _, _) = store_image(&s);
        s.set_ref("image", img.clone()).unwrap();
        assert_eq!(s.resolve_index("image").unwrap(), Some(img.clone()));
        assert_eq!(s.resolve("image").unwrap(), Some(img.clone()));
        assert_eq!(artifact_payload(&s.read_blob(&img.digest).unwrap()), None);
        assert!(matches!(
            artifact_manifest("x", &img),
            Err(StoreError::Manifest { .. })
        ));
        // A ref written before refs had manifests (raw blob) still resolves.
        let raw = index_document(&[("old/raw".to_string(), payload.clone())]);
        fs::write(s.root().join("index.json"), raw).unwrap();
        assert_eq!(s.resolve("old/raw").unwrap(), Some(payload.clone()));
        // ... and gets its manifest when the store is upgraded.
        assert_eq!(s.upgrade_refs().unwrap(), ["old/raw"]);
        assert_eq!(
            s.resolve_index("old/raw").unwrap().unwrap().media_type,
            OCI_MANIFEST
        );
        assert_eq!(s.resolve("old/raw").unwrap(), Some(payload));
        assert!(s.upgrade_refs().unwrap().is_empty());
    }

    /// Store a one-layer OCI image; returns the manifest descriptor and the
    /// config and layer digests.
    fn store_image(s: &Store) -> (Descriptor, Digest, Digest) {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, "hello.txt", &b"hello\n"[..])
            .unwrap();
        let layer = tar.into_inner().unwrap();
        let (ld, ln) = s.put_bytes(&layer).unwrap();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [ld.to_string()]},
        });
        let (cd, cn) = s.put_bytes(config.to_string().as_bytes()).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": ld.to_string(), "size": ln}],
        });
        let (md, mn) = s.put_bytes(manifest.to_string().as_bytes()).unwrap();
        (
            Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: md,
                size: mn,
            },
            cd,
            ld,
        )
    }

    #[test]
    fn gc_keeps_roots_and_children() {
        let (_d, s) = tmp_store();
        let (m, config, layer) = store_image(&s);
        s.set_ref("image", m.clone()).unwrap();
        // A set document holding a tree document that names a file blob.
        let (file, _) = s.put_bytes(b"file content").unwrap();
        let tree = serde_json::json!({"entries": [
            {"path": "etc/x", "digest": file.to_string(), "size": 12}
        ]});
        let (tree_d, tree_n) = s.put_bytes(tree.to_string().as_bytes()).unwrap();
        let set = serde_json::json!({"blobs": [
            {"digest": tree_d.to_string(), "mediaType": TREE_MEDIA_TYPE}
        ]});
        let (set_d, set_n) = s.put_bytes(set.to_string().as_bytes()).unwrap();
        s.set_ref(
            "set",
            Descriptor {
                media_type: SET_MEDIA_TYPE.into(),
                digest: set_d,
                size: set_n,
            },
        )
        .unwrap();
        let _ = tree_n;
        let (junk, junk_n) = s.put_bytes(b"unreferenced").unwrap();
        fs::write(s.root().join("tmp").join("stale.tmp"), b"xx").unwrap();
        let report = s.gc_with_temp_age(Duration::ZERO).unwrap();
        assert_eq!(report.blobs, vec![junk]);
        assert_eq!(report.temp_files, 1);
        assert_eq!(report.bytes, junk_n + 2);
        for d in [m.digest, config, layer, file, tree_d, set_d] {
            assert!(s.contains(&d), "{d} was collected");
        }
        // put_set roots its members.
        let (extra, extra_n) = s.put_bytes(b"kept by a set").unwrap();
        let member = Descriptor {
            media_type: OCTET_STREAM.into(),
            digest: extra,
            size: extra_n,
        };
        let set2 = s.put_set("debs", &[member.clone(), member]).unwrap();
        assert!(s.gc().unwrap().blobs.is_empty());
        assert!(s.contains(&extra) && s.contains(&set2.digest));
        // Dropping the image ref frees its three blobs.
        s.remove_ref("image").unwrap();
        let report = s.gc().unwrap();
        let mut expect = vec![m.digest, config, layer];
        expect.sort();
        assert_eq!(report.blobs, expect);
        assert!(s.contains(&file));
    }

    #[test]
    fn skopeo_inspects_stored_image() {
        let (_d, s) = tmp_store();
        let (m, _, layer) = store_image(&s);
        s.set_ref("demo", m.clone()).unwrap();
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:demo", s.root().display()))
            .output()
            .expect("running skopeo (install it: apt-get install -y skopeo)");
        assert!(
            out.status.success(),
            "skopeo inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Digest"], m.digest.to_string());
        assert_eq!(v["Layers"][0], layer.to_string());
        assert_eq!(v["Architecture"], "amd64");
    }
}
