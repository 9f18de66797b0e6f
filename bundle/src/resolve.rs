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
/// The one generator `generated = "…"` inputs may name.
pub const SNAPSHOT_GENERATOR: &str = "bundle snapshot";
/// Origin recorded for the bundle snapshot input.
pub const SNAPSHOT_ORIGIN: &str = "generated:bundle snapshot";

/// What an input resolved to, kept in the lock (`lock/<image>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Locked {
    /// The input spec it was resolved from ([`spec_key`]); a changed spec
    /// resolves again.
    pub spec: String,
    pub digest: Digest,
    pub origin: String,
    /// Blobs the bundle must carry for this input (the `.deb` it came from).
    #[serde(default)]
    pub carry: Vec<Descriptor>,
}

/// The lock: input name → what it resolved to.
pub type Lock = BTreeMap<String, Locked>;

/// The lock's canonical bytes (pretty JSON, no trailing newline).
pub fn lock_bytes(lock: &Lock) -> Vec<u8> {
    serde_json::to_vec_pretty(lock).expect("locks serialise")
}

/// The text a lock entry keeps to notice a changed input spec.
pub fn spec_key(spec: &InputSpec) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        spec.kind, spec.deb, spec.path, spec.file
    )
}

/// Why an input could not be resolved offline; every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("input {name:?} is not in the lock")]
    NotLocked { name: String },
    #[error("input {name:?} changed since it was locked (locked {locked:?}, now {now:?})")]
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
            locked: locked.spec.clone(),
            now,
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
/// descriptor's blob, and the members of set documents
/// ([`store::SET_MEDIA_TYPE`], e.g. `release/debs`).
pub fn layout_blobs(
    index: &[u8],
    blobs: &dyn BlobSource,
) -> Result<BTreeSet<Digest>, ResolveError> {
    let refs = store::parse_index_refs(index).map_err(|e| ResolveError::Snapshot(e.to_string()))?;
    let mut out = BTreeSet::new();
    for (_, d) in refs {
        out.insert(d.digest);
        if d.media_type == store::SET_MEDIA_TYPE {
            let bytes = read_all(blobs, &d.digest)?;
            let set: SetDoc = serde_json::from_slice(&bytes)
                .map_err(|e| ResolveError::Snapshot(format!("set document {}: {e}", d.digest)))?;
            out.extend(set.blobs.into_iter().map(|b| b.digest));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct SetDoc {
    blobs: Vec<SetMember>,
}

#[derive(Deserialize)]
struct SetMember {
    digest: Digest,
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

    fn fixture() -> Fixture {
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
        // The bundle carries only the blob inputs and the deb, as the
        // snapshot does: not the tree document nor its files.
        let bundle = Store::init(dir.path().join("bundle")).unwrap();
        for d in [kernel, tool, deb_d] {
            bundle.put_bytes(&host.read_blob(&d).unwrap()).unwrap();
        }
        let desc = |media: &str, d: Digest| Descriptor {
            media_type: media.into(),
            digest: d,
            size: bundle.size(&d).unwrap(),
        };
        bundle
            .set_ref("release/input/kernel", desc(store::OCTET_STREAM, kernel))
            .unwrap();
        bundle
            .set_ref("release/input/tool", desc(store::OCTET_STREAM, tool))
            .unwrap();
        bundle.put_set("release/debs", &carry).unwrap();
        let (ld, ls) = bundle.put_bytes(&lock_bytes(&lock)).unwrap();
        bundle
            .set_ref(
                "lock/demo",
                Descriptor {
                    media_type: "application/json".into(),
                    digest: ld,
                    size: ls,
                },
            )
            .unwrap();
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
        // refs (kernel, tool, lock, set) + the deb.
        assert_eq!(listed.len(), 5, "{listed:?}");
        assert_eq!(snap.entries.len(), 2 + listed.len());
        // Same inputs, same snapshot digest.
        let again = snapshot(&index, &blobs, &fx.scratch).unwrap();
        assert_eq!(again, r["bundle"].digest);
    }

    #[test]
    fn a_changed_or_unlocked_input_is_named() {
        let fx = fixture();
        let bundle_dir = BlobDir::new(fx.bundle.root());
        let index = std::fs::read(fx.bundle.root().join("index.json")).unwrap();
        let mut lock = fx.lock.clone();
        lock.get_mut("kernel").unwrap().spec = "something else".into();
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
