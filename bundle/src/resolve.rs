//! Offline resolution: an image definition plus its lock plus blobs in, a
//! digest for every input out, with no network. `cargo xtask image` uses it
//! for every input its lock already covers, and `appliance rebuild` uses it
//! on a booted appliance against the bundle on the data partition.
//!
//! - a `file` input is its locked blob;
//! - a `deb` input is its locked blob or tree document when present, else it
//!   is derived again from the `.deb` the lock says it came from (`carry`):
//!   the file matching `path` (a blob), or the entries under `path` (a tree
//!   document), and must come out with the locked digest;
//! - the `generated = "bundle snapshot"` tree input is computed from an OCI
//!   layout's `index.json` and the blobs it references ([`snapshot`]), the
//!   same function `cargo xtask image` uses, so both make identical bytes.
//!
//! Everything derived is written to a *scratch* [`Store`]; the blobs read
//! (typically scratch first, then a read-only bundle, see
//! [`builder::treefile::Layered`]) are never written.

use std::collections::{BTreeMap, BTreeSet};

use builder::definition::{Definition, InputKind, InputSpec};
use builder::plan::ResolvedInput;
use builder::treefile::{BlobError, BlobSource, TreeFile, TreeFileEntry, TreeFileKind};
use builder::Digest;
use serde::{Deserialize, Serialize};

use crate::deb::{self, DebEntry, DebError, EntryKind};
use crate::store::{self, Descriptor, Store, StoreError};

/// Media type of a carried Debian package.
pub const DEB_MEDIA_TYPE: &str = "application/vnd.debian.binary-package";
/// Artifact type of `release/debs`: a manifest whose layers are the `.deb`s
/// the bundle carries.
pub const DEBS_ARTIFACT_TYPE: &str = "application/vnd.appliance.debs.v1";
/// The one generator `generated = "…"` inputs may name.
pub const SNAPSHOT_GENERATOR: &str = "bundle snapshot";
/// Origin recorded for the bundle snapshot input.
pub const SNAPSHOT_ORIGIN: &str = "generated:bundle snapshot";

/// Schema string of the lock document.
pub const LOCK_SCHEMA: &str = "appliance.lock.v1";
/// Media type of the lock document (`lock/<image>`).
pub const LOCK_MEDIA_TYPE: &str = "application/vnd.appliance.lock.v1+json";

/// What an input resolved to, kept in the lock (`lock/<image>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    /// The input spec it was resolved from ([`spec_key`]); a changed spec
    /// resolves again.
    pub spec: LockedSpec,
    pub digest: Digest,
    pub origin: String,
    /// Blobs the bundle must carry for this input (the `.deb` it came from).
    #[serde(default)]
    pub carry: Vec<Descriptor>,
}

/// The parts of an input spec that decide what it resolves to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LockedSpec {
    pub kind: LockedKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// An input's kind, as the lock spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LockedKind {
    Blob,
    Tree,
}

impl std::fmt::Display for LockedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

/// The lock: input name → what it resolved to.
pub type Lock = BTreeMap<String, Locked>;

/// The lock document: `{"schema": LOCK_SCHEMA, "inputs": {name: Locked}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockDoc {
    schema: String,
    inputs: Lock,
}

/// Why a lock document cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the lock is not JSON: {0}")]
    Json(serde_json::Error),
    #[error("the lock has schema {found:?}; this build reads {LOCK_SCHEMA:?}")]
    Schema { found: String },
    #[error("the lock is not an {LOCK_SCHEMA} document: {0}")]
    Invalid(serde_json::Error),
    #[error("the lock predates {LOCK_SCHEMA} and its entry {name:?} cannot be read: {why}")]
    Legacy { name: String, why: String },
}

/// The lock's canonical bytes: pretty JSON of `{"schema","inputs"}`, keys
/// in a fixed order (inputs sorted by name), trailing newline.
pub fn lock_bytes(lock: &Lock) -> Vec<u8> {
    let doc = LockDoc {
        schema: LOCK_SCHEMA.into(),
        inputs: lock.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&doc).expect("locks serialise");
    bytes.push(b'\n');
    bytes
}

/// Read a lock written by [`lock_bytes`], or by the builds before it (a
/// bare map whose `spec` was Rust debug text `Blob|Some("pkg")|…`),
/// which is converted so an existing store stays offline.
pub fn parse_lock(bytes: &[u8]) -> Result<Lock, LockError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(LockError::Json)?;
    match v.get("schema") {
        Some(serde_json::Value::String(s)) if s == LOCK_SCHEMA => {
            let doc: LockDoc = serde_json::from_value(v).map_err(LockError::Invalid)?;
            Ok(doc.inputs)
        }
        Some(other) => Err(LockError::Schema {
            found: other.to_string(),
        }),
        None => parse_legacy_lock(v),
    }
}

fn parse_legacy_lock(v: serde_json::Value) -> Result<Lock, LockError> {
    #[derive(Deserialize)]
    struct Legacy {
        spec: String,
        digest: Digest,
        origin: String,
        #[serde(default)]
        carry: Vec<Descriptor>,
    }
    let map: BTreeMap<String, Legacy> = serde_json::from_value(v).map_err(LockError::Invalid)?;
    let mut out = Lock::new();
    for (name, l) in map {
        let spec = legacy_spec(&l.spec).ok_or_else(|| LockError::Legacy {
            name: name.clone(),
            why: format!("unrecognised spec {:?}", l.spec),
        })?;
        out.insert(
            name,
            Locked {
                spec,
                digest: l.digest,
                origin: l.origin,
                carry: l.carry,
            },
        );
    }
    Ok(out)
}

/// `Blob|Some("pkg")|Some("path")|None` (the old `spec` text).
fn legacy_spec(text: &str) -> Option<LockedSpec> {
    let parts: Vec<&str> = text.split('|').collect();
    let [kind, deb, path, file] = parts.as_slice() else {
        return None;
    };
    let opt = |s: &str| -> Option<Option<String>> {
        if s == "None" {
            return Some(None);
        }
        let inner = s.strip_prefix("Some(\"")?.strip_suffix("\")")?;
        if inner.contains('\\') || inner.contains('"') {
            return None;
        }
        Some(Some(inner.to_string()))
    };
    Some(LockedSpec {
        kind: match *kind {
            "Blob" => LockedKind::Blob,
            "Tree" => LockedKind::Tree,
            _ => return None,
        },
        deb: opt(deb)?,
        path: opt(path)?,
        file: opt(file)?,
    })
}

/// What a lock entry keeps to notice a changed input spec.
pub fn spec_key(spec: &InputSpec) -> LockedSpec {
    LockedSpec {
        kind: match spec.kind {
            InputKind::Blob => LockedKind::Blob,
            InputKind::Tree => LockedKind::Tree,
        },
        deb: spec.deb.clone(),
        path: spec.path.clone(),
        file: spec.file.as_ref().map(|f| f.to_string_lossy().into_owned()),
    }
}

/// Why an input could not be resolved offline; every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("input {name:?} is not in the lock")]
    NotLocked { name: String },
    #[error("input {name:?} changed since it was locked (locked {locked}, now {now})")]
    SpecChanged {
        name: String,
        locked: String,
        now: String,
    },
    #[error("input {name:?}: blob {digest} is not available and cannot be derived: {why}")]
    Missing {
        name: String,
        digest: Digest,
        why: String,
    },
    #[error("input {name:?}: derived from {deb} it is {derived}, but the lock says {locked}")]
    DerivedMismatch {
        name: String,
        deb: Digest,
        derived: Digest,
        locked: Digest,
    },
    #[error("input {name:?}: unknown generator {generator:?} (known: {SNAPSHOT_GENERATOR:?})")]
    UnknownGenerator { name: String, generator: String },
    #[error("input {name:?}: {why}")]
    Select { name: String, why: String },
    #[error("input {name:?}: extracting {deb}: {source}")]
    Deb {
        name: String,
        deb: Digest,
        source: Box<DebError>,
    },
    #[error("bundle snapshot: {0}")]
    Snapshot(String),
    #[error("writing to the scratch store: {0}")]
    Store(#[from] StoreError),
    #[error("reading blob {digest}: {source}")]
    Blob { digest: Digest, source: BlobError },
}

/// `dir/name-*` style matching: `*` matches any run within the last component.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let (pd, pf) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let (d, f) = path.rsplit_once('/').unwrap_or(("", path));
    if pd != d {
        return false;
    }
    match pf.split_once('*') {
        None => pf == f,
        Some((a, b)) => f.len() >= a.len() + b.len() && f.starts_with(a) && f.ends_with(b),
    }
}

/// Whether `path` is `prefix` or below it.
fn under(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The `.deb` entries an input of `kind` at `path` needs (the extraction
/// filter).
pub fn wants(path: &str, kind: InputKind, entry: &str) -> bool {
    match kind {
        InputKind::Blob => glob_match(path, entry),
        InputKind::Tree => under(path, entry),
    }
}

/// A tree document entry for a `.deb` entry.
pub fn tree_entry(e: &DebEntry) -> TreeFileEntry {
    let kind = match &e.kind {
        EntryKind::File { digest, size } => TreeFileKind::File {
            size: *size,
            digest: *digest,
        },
        EntryKind::Dir => TreeFileKind::Dir,
        EntryKind::Symlink(t) => TreeFileKind::Symlink { target: t.clone() },
        EntryKind::Hardlink(t) => TreeFileKind::Hardlink { target: t.clone() },
        EntryKind::CharDevice { major, minor } => TreeFileKind::Char {
            major: *major,
            minor: *minor,
        },
        EntryKind::BlockDevice { major, minor } => TreeFileKind::Block {
            major: *major,
            minor: *minor,
        },
        EntryKind::Fifo => TreeFileKind::Fifo,
    };
    TreeFileEntry {
        path: e.path.clone(),
        kind,
        mode: (e.mode & 0o7777) as u16,
        uid: e.uid,
        gid: e.gid,
        mtime: Some(e.mtime),
    }
}

/// What an input selects from a package's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// The one regular file matching a blob input's `path`.
    Blob(Digest),
    /// The tree document of a tree input's entries (not yet stored).
    Tree(Vec<u8>),
}

/// Pick what an input wants from a package's entries: `Ok(None)` when
/// nothing matches (the caller may look in another package), an error
/// naming `pkg` when the match is ambiguous or not a regular file.
pub fn select(
    entries: &[DebEntry],
    path: &str,
    kind: InputKind,
    pkg: &str,
) -> Result<Option<Selected>, String> {
    match kind {
        InputKind::Blob => {
            let hits: Vec<&DebEntry> = entries
                .iter()
                .filter(|e| glob_match(path, &e.path))
                .collect();
            match hits.as_slice() {
                [] => Ok(None),
                [e] => match &e.kind {
                    EntryKind::File { digest, .. } => Ok(Some(Selected::Blob(*digest))),
                    _ => Err(format!("{path} in {pkg} is not a regular file")),
                },
                many => Err(format!(
                    "{path} matches several files in {pkg}: {:?}",
                    many.iter().map(|e| &e.path).collect::<Vec<_>>()
                )),
            }
        }
        InputKind::Tree => {
            let sel: Vec<TreeFileEntry> = entries
                .iter()
                .filter(|e| under(path, &e.path))
                .map(tree_entry)
                .collect();
            if sel.is_empty() {
                return Ok(None);
            }
            Ok(Some(Selected::Tree(TreeFile::new(sel).to_bytes())))
        }
    }
}

/// Resolve one locked input without network: present as locked, or
/// derived again from the `.deb`s it carries (into `scratch`).
pub fn resolve_locked(
    name: &str,
    spec: &InputSpec,
    locked: &Locked,
    blobs: &dyn BlobSource,
    scratch: &Store,
) -> Result<ResolvedInput, ResolveError> {
    let now = spec_key(spec);
    if locked.spec != now {
        return Err(ResolveError::SpecChanged {
            name: name.into(),
            locked: locked.spec.to_string(),
            now: now.to_string(),
        });
    }
    let resolved = ResolvedInput {
        digest: locked.digest,
        origin: Some(locked.origin.clone()),
    };
    match blobs.blob(&locked.digest) {
        Ok(_) => return Ok(resolved),
        Err(BlobError::Missing(_)) => {}
        Err(source) => {
            return Err(ResolveError::Blob {
                digest: locked.digest,
                source,
            })
        }
    }
    let missing = |why: String| ResolveError::Missing {
        name: name.into(),
        digest: locked.digest,
        why,
    };
    let (Some(path), Some(_)) = (spec.path.as_deref(), spec.deb.as_deref()) else {
        return Err(missing("only deb inputs can be derived".into()));
    };
    if locked.carry.is_empty() {
        return Err(missing("the lock names no package it came from".into()));
    }
    for c in &locked.carry {
        let content = match blobs.blob(&c.digest) {
            Ok(content) => content,
            Err(BlobError::Missing(_)) => continue,
            Err(source) => {
                return Err(ResolveError::Blob {
                    digest: c.digest,
                    source,
                })
            }
        };
        let reader = content.open().map_err(|e| ResolveError::Blob {
            digest: c.digest,
            source: BlobError::Io {
                digest: c.digest,
                source: e,
            },
        })?;
        let filter = |p: &str| wants(path, spec.kind, p);
        let contents = deb::extract(reader, &c.digest.to_string(), scratch, Some(&filter))
            .map_err(|source| ResolveError::Deb {
                name: name.into(),
                deb: c.digest,
                source: Box::new(source),
            })?;
        let pkg = c.digest.to_string();
        let derived = match select(&contents.entries, path, spec.kind, &pkg).map_err(|why| {
            ResolveError::Select {
                name: name.into(),
                why,
            }
        })? {
            None => continue,
            Some(Selected::Blob(d)) => d,
            Some(Selected::Tree(doc)) => {
                // Check before storing: a wrong document stays out.
                let d = Digest::of(&doc);
                if d == locked.digest {
                    scratch.put_bytes(&doc)?;
                }
                d
            }
        };
        if derived != locked.digest {
            return Err(ResolveError::DerivedMismatch {
                name: name.into(),
                deb: c.digest,
                derived,
                locked: locked.digest,
            });
        }
        return Ok(resolved);
    }
    Err(missing(format!(
        "no carried package holds {path:?} (carried: {})",
        locked
            .carry
            .iter()
            .map(|c| c.digest.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Every blob an OCI layout with this `index.json` holds: each named
/// descriptor's blob and, following OCI manifests and indexes (config and
/// layers) and set documents ([`store::SET_MEDIA_TYPE`], e.g.
/// `release/debs`), the blobs they name. Tree documents are blobs like any
/// other here: the files they describe are not part of the layout.
pub fn layout_blobs(
    index: &[u8],
    blobs: &dyn BlobSource,
) -> Result<BTreeSet<Digest>, ResolveError> {
    let refs = store::parse_index_refs(index).map_err(|e| ResolveError::Snapshot(e.to_string()))?;
    let mut out = BTreeSet::new();
    let mut todo: Vec<(String, Digest)> = refs
        .into_iter()
        .map(|(_, d)| (d.media_type, d.digest))
        .collect();
    while let Some((media_type, digest)) = todo.pop() {
        if !out.insert(digest) {
            continue;
        }
        if store::is_manifest_type(&media_type) || media_type == store::SET_MEDIA_TYPE {
            let bytes = read_all(blobs, &digest)?;
            todo.extend(
                store::children(&media_type, &digest, &bytes)
                    .map_err(|e| ResolveError::Snapshot(e.to_string()))?,
            );
        }
    }
    Ok(out)
}

/// What the ref `name` in a layout's `index.json` stands for: the blob its
/// artifact manifest names ([`store::artifact_payload`]), or the listed
/// descriptor itself (an image, or a ref from before refs had manifests).
pub fn ref_payload(
    index: &[u8],
    name: &str,
    blobs: &dyn BlobSource,
) -> Result<Option<Descriptor>, ResolveError> {
    let refs = store::parse_index_refs(index).map_err(|e| ResolveError::Snapshot(e.to_string()))?;
    let Some((_, d)) = refs.into_iter().find(|(n, _)| n == name) else {
        return Ok(None);
    };
    if d.media_type == store::OCI_MANIFEST {
        if let Some(p) = store::artifact_payload(&read_all(blobs, &d.digest)?) {
            return Ok(Some(p));
        }
    }
    Ok(Some(d))
}

fn read_all(blobs: &dyn BlobSource, d: &Digest) -> Result<Vec<u8>, ResolveError> {
    let c = blobs
        .blob(d)
        .map_err(|source| ResolveError::Blob { digest: *d, source })?;
    c.read_all().map_err(|e| ResolveError::Blob {
        digest: *d,
        source: BlobError::Io {
            digest: *d,
            source: e,
        },
    })
}

/// The `index.json` of the bundle an image carries, every ref through an
/// OCI manifest ([`Store::wrap`], written to `store`):
/// `release/definition/<image>` (the definition's text), `lock/<image>`
/// ([`lock_bytes`]), `release/input/<name>` for every resolved blob input,
/// `release/debs` (an artifact manifest, [`DEBS_ARTIFACT_TYPE`], whose
/// layers are every `.deb` the lock carries), and
/// every `debian/…` ref of `store` (the keyring and the signed archive
/// metadata that prove where the debs came from). `cargo xtask image`
/// passes it to [`snapshot`]. Same inputs, same bytes.
pub fn bundle_index(
    store: &Store,
    def: &Definition,
    def_text: &str,
    lock: &Lock,
    resolved: &BTreeMap<String, ResolvedInput>,
) -> Result<Vec<u8>, ResolveError> {
    let image = &def.image.name;
    let mut refs: Vec<(String, Descriptor)> = Vec::new();
    let mut add = |name: String, media_type: &str, digest: Digest| -> Result<(), ResolveError> {
        let payload = Descriptor {
            media_type: media_type.into(),
            digest,
            size: store.size(&digest)?,
        };
        refs.push((name.clone(), store.wrap(&name, &payload)?));
        Ok(())
    };
    let (dd, _) = store.put_bytes(def_text.as_bytes())?;
    add(
        format!("release/definition/{image}"),
        "application/toml",
        dd,
    )?;
    let (ld, _) = store.put_bytes(&lock_bytes(lock))?;
    add(format!("lock/{image}"), LOCK_MEDIA_TYPE, ld)?;
    let mut debs = BTreeSet::new();
    for (name, r) in resolved {
        if def.inputs.get(name).map(|s| s.kind) == Some(InputKind::Blob) {
            add(
                format!("release/input/{name}"),
                store::OCTET_STREAM,
                r.digest,
            )?;
        }
        if let Some(l) = lock.get(name) {
            debs.extend(l.carry.iter().map(|c| c.digest));
        }
    }
    // `release/debs`: one artifact manifest listing every carried `.deb`
    // (sorted by digest), so stock tools see them reachable too.
    let titles: BTreeMap<Digest, String> = lock
        .values()
        .filter_map(|l| {
            let [c] = l.carry.as_slice() else { return None };
            // `deb:<pkg>=<version>:<path>`; a version may hold an epoch `1:`,
            // which Debian's file names spell `%3a`.
            let (pkg, version) = l
                .origin
                .strip_prefix("deb:")?
                .rsplit_once(':')?
                .0
                .split_once('=')?;
            Some((
                c.digest,
                format!("{pkg}_{}.deb", version.replace(':', "%3a")),
            ))
        })
        .collect();
    let members = debs
        .into_iter()
        .map(|d| {
            Ok((
                Descriptor {
                    media_type: DEB_MEDIA_TYPE.into(),
                    digest: d,
                    size: store.size(&d)?,
                },
                titles.get(&d).cloned(),
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let debs_manifest = store.put_artifact("release/debs", DEBS_ARTIFACT_TYPE, &members)?;
    for (name, _) in store.refs()? {
        if name.starts_with("debian/") {
            // Through `resolve`: a ref a store recorded before refs had
            // manifests gets one here.
            if let Some(p) = store.resolve(&name)? {
                add(name, &p.media_type, p.digest)?;
            }
        }
    }
    refs.push(("release/debs".into(), debs_manifest));
    Ok(store::index_document(&refs))
}

/// The bundle snapshot: the tree document of an OCI layout (`oci-layout`,
/// `index.json` = `index`, `blobs/sha256/<hex>` for [`layout_blobs`]),
/// stored in `store` with the two small files it names. Returns the tree
/// document's digest. `blobs` must hold every referenced blob (sizes are
/// read from it).
pub fn snapshot(
    index: &[u8],
    blobs: &dyn BlobSource,
    store: &Store,
) -> Result<Digest, ResolveError> {
    let (id, _) = store.put_bytes(index)?;
    let (od, _) = store.put_bytes(store::OCI_LAYOUT.as_bytes())?;
    let file = |path: String, digest: Digest, size: u64| TreeFileEntry {
        path,
        kind: TreeFileKind::File { size, digest },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: None,
    };
    let mut entries = vec![
        file("oci-layout".into(), od, store::OCI_LAYOUT.len() as u64),
        file("index.json".into(), id, index.len() as u64),
    ];
    for d in layout_blobs(index, blobs)? {
        let size = blobs
            .blob(&d)
            .map_err(|source| ResolveError::Blob { digest: d, source })?
            .len();
        entries.push(file(format!("blobs/sha256/{}", d.hex()), d, size));
    }
    let (td, _) = store.put_bytes(&TreeFile::new(entries).to_bytes())?;
    Ok(td)
}

/// Resolve every input of `def` that is not pinned by digest, offline:
/// locked inputs through [`resolve_locked`], the bundle snapshot from
/// `snapshot_index` (the `index.json` of the layout to describe; `None`
/// when the definition has no such input). Derived blobs go to `scratch`;
/// `blobs` should search `scratch` first.
pub fn resolve_offline(
    def: &Definition,
    lock: &Lock,
    blobs: &dyn BlobSource,
    scratch: &Store,
    snapshot_index: Option<&[u8]>,
) -> Result<BTreeMap<String, ResolvedInput>, ResolveError> {
    let mut out = BTreeMap::new();
    for (name, spec) in &def.inputs {
        if spec.digest.is_some() {
            continue;
        }
        if let Some(g) = &spec.generated {
            if g != SNAPSHOT_GENERATOR {
                return Err(ResolveError::UnknownGenerator {
                    name: name.clone(),
                    generator: g.clone(),
                });
            }
            let index = snapshot_index.ok_or_else(|| {
                ResolveError::Snapshot(format!("input {name:?}: no layout index to describe"))
            })?;
            let d = snapshot(index, blobs, scratch)?;
            out.insert(
                name.clone(),
                ResolvedInput {
                    digest: d,
                    origin: Some(SNAPSHOT_ORIGIN.into()),
                },
            );
            continue;
        }
        let locked = lock
            .get(name)
            .ok_or_else(|| ResolveError::NotLocked { name: name.clone() })?;
        out.insert(
            name.clone(),
            resolve_locked(name, spec, locked, blobs, scratch)?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use builder::definition;
    use builder::treefile::{BlobDir, Layered};

    #[test]
    fn globs() {
        assert!(glob_match("boot/vmlinuz-*", "boot/vmlinuz-6.1.0-28-amd64"));
        assert!(!glob_match("boot/vmlinuz-*", "boot/config-6.1.0-28-amd64"));
        assert!(!glob_match("boot/vmlinuz-*", "x/boot/vmlinuz-6"));
        assert!(glob_match("usr/lib/a.stub", "usr/lib/a.stub"));
        assert!(under("usr/share", "usr/share/empty"));
        assert!(under("usr/share/", "usr/share"));
        assert!(!under("usr/share", "usr/shared"));
    }

    const DEF: &str = r#"
[image]
name = "demo"
version = "1"
epoch = 1700000000

[inputs]
kernel = { deb = "demo", path = "boot/vmlinuz" }
share = { deb = "demo", path = "usr", kind = "tree" }
tool = { file = "tool.bin" }
bundle = { generated = "bundle snapshot", kind = "tree" }
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        /// Plays the read-only bundle.
        bundle: Store,
        scratch: Store,
        def: Definition,
        lock: Lock,
        /// What a full extraction says each input is.
        expect: BTreeMap<String, Digest>,
    }

    /// The Debian archive keyring (package `debian-archive-keyring`).
    const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

    /// Write the files of tree document `tree` (all regular files) under `dir`.
    fn materialize(store: &Store, tree: &Digest, dir: &std::path::Path) {
        let tf = TreeFile::load(&BlobDir::new(store.root()), tree).unwrap();
        for e in &tf.entries {
            let TreeFileKind::File { digest, .. } = e.kind else {
                panic!("{} is not a file", e.path)
            };
            let path = dir.join(&e.path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, store.read_blob(&digest).unwrap()).unwrap();
        }
    }

    fn fixture() -> Fixture {
        fixture_with(false)
    }

    fn fixture_with(with_keyring: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let deb_file = crate::deb::tests::build_deb(dir.path(), "demo", "xz");
        // Resolve the way `cargo xtask image` does, in a "host" store.
        let host = Store::init(dir.path().join("host")).unwrap();
        let (deb_d, deb_size) = host.put_file(&deb_file).unwrap();
        let all = deb::extract_blob(&host, &deb_d, None).unwrap().entries;
        let Some(Selected::Blob(kernel)) =
            select(&all, "boot/vmlinuz", InputKind::Blob, "demo").unwrap()
        else {
            panic!()
        };
        let Some(Selected::Tree(doc)) = select(&all, "usr", InputKind::Tree, "demo").unwrap()
        else {
            panic!()
        };
        let share = Digest::of(&doc);
        let (tool, _) = host.put_bytes(b"tool bytes").unwrap();
        let (def, _) = definition::parse("demo.toml", DEF).unwrap();
        let carry = vec![Descriptor {
            media_type: DEB_MEDIA_TYPE.into(),
            digest: deb_d,
            size: deb_size,
        }];
        let locked = |name: &str, digest, origin: &str, carry: &Vec<Descriptor>| {
            (
                name.to_string(),
                Locked {
                    spec: spec_key(&def.inputs[name]),
                    digest,
                    origin: origin.into(),
                    carry: carry.clone(),
                },
            )
        };
        let lock: Lock = [
            locked("kernel", kernel, "deb:demo=1.0:boot/vmlinuz", &carry),
            locked("share", share, "deb:demo=1.0:usr", &carry),
            locked("tool", tool, "file:tool.bin", &vec![]),
        ]
        .into_iter()
        .collect();
        // The bundle is made the way `cargo xtask image` makes it: its
        // index through `bundle_index`, its files through `snapshot`, then
        // written out as the builder writes the data partition's `bundle/`.
        // It carries only the blob inputs and the deb, not the tree
        // document nor its files.
        let resolved: BTreeMap<String, ResolvedInput> = lock
            .iter()
            .map(|(n, l)| {
                (
                    n.clone(),
                    ResolvedInput {
                        digest: l.digest,
                        origin: Some(l.origin.clone()),
                    },
                )
            })
            .collect();
        if with_keyring {
            crate::debian::load_keyring(&host, std::path::Path::new(KEYRING)).unwrap();
        }
        let index = bundle_index(&host, &def, DEF, &lock, &resolved).unwrap();
        let tree = snapshot(&index, &BlobDir::new(host.root()), &host).unwrap();
        let bundle_dir = dir.path().join("bundle");
        materialize(&host, &tree, &bundle_dir);
        let bundle = Store::open(&bundle_dir).unwrap();
        let scratch = Store::init(dir.path().join("scratch")).unwrap();
        let expect = BTreeMap::from([
            ("kernel".to_string(), kernel),
            ("share".to_string(), share),
            ("tool".to_string(), tool),
        ]);
        Fixture {
            _dir: dir,
            bundle,
            scratch,
            def,
            lock,
            expect,
        }
    }

    #[test]
    fn offline_resolution_derives_trees_from_carried_debs_into_scratch() {
        let fx = fixture();
        let scratch_dir = BlobDir::new(fx.scratch.root());
        let bundle_dir = BlobDir::new(fx.bundle.root());
        let blobs = Layered(vec![&scratch_dir, &bundle_dir]);
        let before = fx.bundle.blobs().unwrap();
        let index = std::fs::read(fx.bundle.root().join("index.json")).unwrap();
        let r = resolve_offline(&fx.def, &fx.lock, &blobs, &fx.scratch, Some(&index)).unwrap();
        for (name, d) in &fx.expect {
            assert_eq!(r[name].digest, *d, "{name}");
            assert_eq!(
                r[name].origin.as_deref(),
                Some(fx.lock[name].origin.as_str())
            );
        }
        // The tree and its files were derived into the scratch store only.
        assert!(fx.scratch.contains(&fx.expect["share"]));
        assert_eq!(
            fx.bundle.blobs().unwrap(),
            before,
            "the bundle was written to"
        );
        let tf = TreeFile::load(&blobs, &fx.expect["share"]).unwrap();
        assert!(tf.entries.iter().any(|e| e.path == "usr/bin/tool"));
        // The snapshot describes the layout: index, oci-layout, every blob.
        let snap = TreeFile::load(&blobs, &r["bundle"].digest).unwrap();
        let paths: Vec<&str> = snap.entries.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"index.json") && paths.contains(&"oci-layout"));
        let held: BTreeSet<Digest> = fx.bundle.blobs().unwrap().into_iter().collect();
        let listed = layout_blobs(&index, &blobs).unwrap();
        assert!(listed.is_subset(&held));
        // 4 refs (definition, kernel, tool, lock), each an artifact
        // manifest and its blob, `release/debs` and the deb it lists, the
        // manifests' one empty config.
        assert_eq!(listed.len(), 4 * 2 + 2 + 1, "{listed:?}");
        assert_eq!(listed, held, "the bundle holds exactly its layout");
        assert_eq!(snap.entries.len(), 2 + listed.len());
        // Same inputs, same snapshot digest.
        let again = snapshot(&index, &blobs, &fx.scratch).unwrap();
        assert_eq!(again, r["bundle"].digest);
    }

    /// Run a stock tool; its stdout, or a panic with its stderr.
    fn run(tool: &str, args: &[&str]) -> Vec<u8> {
        let o = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {tool} (xtask/install-deps.sh installs it): {e}"));
        assert!(
            o.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    #[test]
    fn the_bundle_is_an_oci_layout_skopeo_and_umoci_read() {
        let fx = fixture_with(true);
        let root = fx.bundle.root().to_str().unwrap().to_string();
        let refs = fx.bundle.refs().unwrap();
        let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "debian/keyring",
                "lock/demo",
                "release/debs",
                "release/definition/demo",
                "release/input/kernel",
                "release/input/tool"
            ]
        );
        let out = tempfile::tempdir().unwrap();
        for (i, (name, d)) in refs.iter().enumerate() {
            assert_eq!(d.media_type, store::OCI_MANIFEST, "{name}");
            // skopeo finds the ref and hands out our manifest byte for byte.
            let image = format!("oci:{root}:{name}");
            let raw = run("skopeo", &["inspect", "--raw", &image]);
            assert_eq!(raw, fx.bundle.read_blob(&d.digest).unwrap(), "{name}");
            let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(m["config"]["mediaType"], store::OCI_EMPTY, "{name}");
            let layers = m["layers"].as_array().unwrap();
            if name == "release/debs" {
                assert_eq!(m["artifactType"], DEBS_ARTIFACT_TYPE);
                assert_eq!(layers.len(), 1);
                assert_eq!(layers[0]["mediaType"], DEB_MEDIA_TYPE);
                assert_eq!(
                    layers[0]["annotations"][store::TITLE_ANNOTATION],
                    "demo_1.0.deb"
                );
            } else {
                let payload = fx.bundle.resolve(name).unwrap().unwrap();
                assert_eq!(m["artifactType"], payload.media_type.as_str(), "{name}");
                assert_eq!(layers.len(), 1);
                assert_eq!(layers[0]["digest"], payload.digest.to_string());
                assert_eq!(
                    layers[0]["annotations"][store::TITLE_ANNOTATION],
                    name.rsplit('/').next().unwrap()
                );
            }
            // skopeo copies it out; every blob arrives intact.
            let dest = out.path().join(i.to_string());
            run(
                "skopeo",
                &["copy", "-q", &image, &format!("dir:{}", dest.display())],
            );
            for l in layers {
                let digest: Digest = l["digest"].as_str().unwrap().parse().unwrap();
                assert_eq!(
                    std::fs::read(dest.join(digest.hex())).unwrap(),
                    fx.bundle.read_blob(&digest).unwrap(),
                    "{name}"
                );
            }
        }
        assert_eq!(
            fx.bundle
                .read_blob(&fx.bundle.resolve("debian/keyring").unwrap().unwrap().digest)
                .unwrap(),
            std::fs::read(KEYRING).unwrap()
        );
        // umoci lists every ref, and its garbage collector finds every blob
        // reachable from them: nothing in the layout is orphaned.
        let ls = String::from_utf8(run("umoci", &["ls", "--layout", &root])).unwrap();
        let mut listed: Vec<&str> = ls.lines().collect();
        listed.sort();
        assert_eq!(listed, names);
        let before = fx.bundle.blobs().unwrap();
        run("umoci", &["gc", "--layout", &root]);
        assert_eq!(fx.bundle.blobs().unwrap(), before, "umoci gc removed blobs");
    }

    #[test]
    fn the_lock_is_a_schema_document_read_back_by_parse_lock() {
        let fx = fixture();
        let bytes = lock_bytes(&fx.lock);
        assert_eq!(parse_lock(&bytes).unwrap(), fx.lock);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let tool = fx.lock["tool"].digest;
        assert!(
            text.starts_with("{\n  \"schema\": \"appliance.lock.v1\",\n  \"inputs\": {\n"),
            "{text}"
        );
        assert!(text.ends_with("}\n"), "{text}");
        assert!(
            text.contains(&format!(
                "    \"tool\": {{\n      \"spec\": {{\n        \"kind\": \"blob\",\n        \"file\": \"tool.bin\"\n      }},\n      \"digest\": \"{tool}\",\n      \"origin\": \"file:tool.bin\",\n      \"carry\": []\n    }}"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "\"kind\": \"tree\",\n        \"deb\": \"demo\",\n        \"path\": \"usr\""
            ),
            "{text}"
        );
        // The same lock in another insertion order: the same bytes.
        let reversed: Lock = fx.lock.clone().into_iter().rev().collect();
        assert_eq!(lock_bytes(&reversed), bytes);

        // A lock from before the schema (Rust debug text for the spec) is
        // read into the same entries.
        let legacy = serde_json::json!({
            "tool": {"spec": "Blob|None|None|Some(\"tool.bin\")", "digest": tool.to_string(), "origin": "file:tool.bin", "carry": []},
            "share": {"spec": "Tree|Some(\"demo\")|Some(\"usr\")|None", "digest": fx.lock["share"].digest.to_string(), "origin": "deb:demo=1.0:usr", "carry": fx.lock["share"].carry},
            "kernel": {"spec": "Blob|Some(\"demo\")|Some(\"boot/vmlinuz\")|None", "digest": fx.lock["kernel"].digest.to_string(), "origin": "deb:demo=1.0:boot/vmlinuz", "carry": fx.lock["kernel"].carry},
        });
        assert_eq!(parse_lock(legacy.to_string().as_bytes()).unwrap(), fx.lock);

        // Bad input names the problem.
        let e = parse_lock(br#"{"schema":"appliance.lock.v9","inputs":{}}"#).unwrap_err();
        assert!(e.to_string().contains("appliance.lock.v9"), "{e}");
        let e = parse_lock(br#"{"schema":"appliance.lock.v1","inputs":{},"extra":1}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = parse_lock(br#"{"k":{"spec":"Blob|Maybe|None|None","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","origin":"x"}}"#).unwrap_err();
        assert!(
            e.to_string().contains("\"k\"") && e.to_string().contains("Maybe"),
            "{e}"
        );
        let e = parse_lock(b"not json").unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn a_changed_or_unlocked_input_is_named() {
        let fx = fixture();
        let bundle_dir = BlobDir::new(fx.bundle.root());
        let index = std::fs::read(fx.bundle.root().join("index.json")).unwrap();
        let mut lock = fx.lock.clone();
        lock.get_mut("kernel").unwrap().spec.path = Some("boot/other".into());
        let e =
            resolve_offline(&fx.def, &lock, &bundle_dir, &fx.scratch, Some(&index)).unwrap_err();
        assert!(
            matches!(e, ResolveError::SpecChanged { ref name, .. } if name == "kernel"),
            "{e}"
        );
        let mut lock = fx.lock.clone();
        lock.remove("tool");
        let e =
            resolve_offline(&fx.def, &lock, &bundle_dir, &fx.scratch, Some(&index)).unwrap_err();
        assert!(e.to_string().contains("\"tool\""), "{e}");
    }

    #[test]
    fn a_wrong_lock_digest_is_a_mismatch_not_a_silent_success() {
        let fx = fixture();
        let bundle_dir = BlobDir::new(fx.bundle.root());
        let mut locked = fx.lock["share"].clone();
        locked.digest = Digest::of(b"not the tree");
        let e = resolve_locked(
            "share",
            &fx.def.inputs["share"],
            &locked,
            &bundle_dir,
            &fx.scratch,
        )
        .unwrap_err();
        assert!(matches!(e, ResolveError::DerivedMismatch { .. }), "{e}");
        assert!(!fx.scratch.contains(&Digest::of(b"not the tree")));
        // A missing file input cannot be derived.
        let mut locked = fx.lock["tool"].clone();
        locked.digest = Digest::of(b"gone");
        let e = resolve_locked(
            "tool",
            &fx.def.inputs["tool"],
            &locked,
            &bundle_dir,
            &fx.scratch,
        )
        .unwrap_err();
        assert!(matches!(e, ResolveError::Missing { .. }), "{e}");
    }
}
