//! The merge rule of the shared state (the inventory repository), as pure
//! functions over file maps plus the stamps every change carries.
//!
//! Every change to a path `P` made on a node also writes
//! `.sync/meta/P.json` = `{"stamp":"<hlc>","vv":{"<node>":"<hlc>",…},
//! "deleted":bool}`: `stamp` is a hybrid logical clock reading
//! `<unix ms, 13 digits>.<counter, 5 digits>.<node uuid>` (so string order is
//! time order, ties broken by node), `vv` holds, per node that ever edited
//! `P`, its latest stamp (a version vector), and a deletion keeps its meta
//! file as a tombstone.
//!
//! Merging two states, per path: the version with the greater
//! `(stamp, blob id)` wins (last writer wins; a deletion is a version like
//! any other, so edit against delete is decided by the same clock); the
//! merged meta keeps the winner's stamp and the pointwise maximum of both
//! version vectors. When the loser's vector is not dominated by the
//! winner's (neither side had seen the other's edit: a concurrent edit)
//! and the contents differ, the loser is recorded as a conflict file
//! `.sync/conflicts/<sha1 of path, stamp, blob>.json` =
//! `{"path","stamp","node","blob":"<git blob id>"|null}`; its content
//! stays in the history (the merge commit's second parent) and `appliance
//! sync conflicts` lists it. Conflict files merge by union. The rule is
//! commutative, associative and idempotent, so every node that has seen
//! the same changes holds the same tree: the state hash is its git tree id.
//! Because a node's clock moves past every stamp it merges or overwrites,
//! an edit made after seeing a version always has a greater stamp.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::inventory::git::{self, Change, GitError, Oid, Repo};

/// Meta files live under this prefix (then the object's path + `.json`).
pub const META: &str = ".sync/meta/";
/// Conflict records live under this prefix.
pub const CONFLICTS: &str = ".sync/conflicts/";

/// The stamp of versions written before stamps existed (or by hand).
const ZERO: &str = "0000000000000.00000.";

/// The meta of one path.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Meta {
    pub stamp: String,
    pub vv: BTreeMap<String, String>,
    #[serde(default)]
    pub deleted: bool,
}

impl Meta {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("meta serialises");
        b.push(b'\n');
        b
    }
    /// Whether this version had seen everything `other` had.
    fn dominates(&self, other: &Meta) -> bool {
        other
            .vv
            .iter()
            .all(|(n, s)| self.vv.get(n).is_some_and(|m| m >= s))
    }
}

/// One conflict record: a version that lost against a concurrent one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: String,
    pub stamp: String,
    /// The node that made the losing version.
    pub node: String,
    /// The losing content's git blob id (`git cat-file -p`), or null for a
    /// deletion that lost.
    pub blob: Option<String>,
}

impl Conflict {
    fn file(&self) -> String {
        let mut h = Sha1::new();
        h.update(self.path.as_bytes());
        h.update([0]);
        h.update(self.stamp.as_bytes());
        h.update([0]);
        h.update(self.blob.as_deref().unwrap_or("").as_bytes());
        format!("{CONFLICTS}{}.json", hex::encode(h.finalize()))
    }
}

/// The node a stamp was made on.
pub fn stamp_node(stamp: &str) -> &str {
    stamp.splitn(3, '.').nth(2).unwrap_or("")
}

/// The wall-clock part of a stamp (ms since the epoch; 0 if unparsable).
pub fn stamp_ms(stamp: &str) -> u64 {
    parse_stamp(stamp).map(|t| t.0).unwrap_or(0)
}

fn parse_stamp(stamp: &str) -> Option<(u64, u32)> {
    let mut it = stamp.splitn(3, '.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// A hybrid logical clock for one node.
pub struct Hlc {
    node: String,
    last: Mutex<(u64, u32)>,
}

impl Hlc {
    pub fn new(node: &uuid::Uuid) -> Self {
        Self {
            node: node.to_string(),
            last: Mutex::new((0, 0)),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A new stamp, greater than every stamp made or observed before.
    pub fn tick(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = if now > last.0 {
            (now, 0)
        } else {
            (last.0, last.1 + 1)
        };
        format!("{:013}.{:05}.{}", last.0, last.1, self.node)
    }

    /// Moves the clock past `stamp`.
    pub fn observe(&self, stamp: &str) {
        if let Some(t) = parse_stamp(stamp) {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if t > *last {
                *last = t;
            }
        }
    }
}

/// The meta path of an object path.
pub fn meta_path(path: &str) -> String {
    format!("{META}{path}.json")
}

fn read_meta(repo: &Repo, oid: Option<&Oid>) -> Result<Option<Meta>, GitError> {
    let Some(oid) = oid else { return Ok(None) };
    let (_, body) = repo.read_object(oid)?;
    Ok(serde_json::from_slice(&body).ok())
}

/// Adds the meta writes for `changes` (made on this node now) to them.
pub fn stamp_changes(
    repo: &Repo,
    hlc: &Hlc,
    mut changes: Vec<Change>,
) -> Result<Vec<Change>, GitError> {
    let mut metas = Vec::new();
    for c in &changes {
        let (path, deleted) = match c {
            Change::Write(p, _) => (p, false),
            Change::Delete(p) => (p, true),
        };
        if path.starts_with(".sync/") {
            continue;
        }
        let mp = meta_path(path);
        let old = read_meta(repo, repo.files().get(&mp))?.unwrap_or_default();
        hlc.observe(&old.stamp);
        let stamp = hlc.tick();
        let mut vv = old.vv;
        vv.insert(hlc.node().to_owned(), stamp.clone());
        metas.push(Change::Write(mp, Meta { stamp, vv, deleted }.to_bytes()));
    }
    changes.extend(metas);
    Ok(changes)
}

/// What merging a remote state into the local one gives.
#[derive(Debug, Default)]
pub struct Merged {
    /// The merged file map (blobs stored).
    pub files: BTreeMap<String, Oid>,
    /// Conflicts this merge found (also written as conflict files).
    pub conflicts: Vec<Conflict>,
    /// Object paths whose content changed relative to local.
    pub changed: Vec<String>,
}

struct Version {
    content: Option<Oid>,
    meta: Meta,
    has_meta: bool,
}

impl Version {
    fn key(&self) -> (&str, [u8; 20]) {
        (&self.meta.stamp, self.content.unwrap_or([0; 20]))
    }
}

/// Merges `remote` into `local` (file maps of two trees in `repo`); stores
/// the new meta and conflict blobs. Pure apart from those writes.
pub fn merge_files(
    repo: &Repo,
    local: &BTreeMap<String, Oid>,
    remote: &BTreeMap<String, Oid>,
    hlc: Option<&Hlc>,
) -> Result<Merged, GitError> {
    let mut files = local.clone();
    let mut logical = BTreeSet::new();
    let keys: BTreeSet<&String> = local.keys().chain(remote.keys()).collect();
    for path in keys {
        let (l, r) = (local.get(path), remote.get(path));
        if l == r {
            continue;
        }
        if path.starts_with(CONFLICTS) {
            // Union (same name: same record; keep the greater id if not).
            let pick = match (l, r) {
                (Some(a), Some(b)) => *a.max(b),
                (Some(a), None) => *a,
                (None, Some(b)) => *b,
                (None, None) => continue,
            };
            files.insert(path.clone(), pick);
        } else if let Some(p) = path.strip_prefix(META) {
            if let Some(p) = p.strip_suffix(".json") {
                logical.insert(p.to_owned());
            }
        } else if !path.starts_with(".sync/") {
            logical.insert(path.clone());
        }
    }
    let mut out = Merged::default();
    let version = |m: &BTreeMap<String, Oid>, p: &str| -> Result<Version, GitError> {
        let meta = read_meta(repo, m.get(&meta_path(p)))?;
        Ok(Version {
            content: m.get(p).copied(),
            has_meta: meta.is_some(),
            meta: meta.unwrap_or_else(|| Meta {
                stamp: ZERO.into(),
                ..Meta::default()
            }),
        })
    };
    for p in logical {
        let l = version(local, &p)?;
        let r = version(remote, &p)?;
        if let Some(h) = hlc {
            h.observe(&r.meta.stamp);
        }
        let (win, lose) = if r.key() > l.key() {
            (&r, &l)
        } else {
            (&l, &r)
        };
        let concurrent =
            !win.meta.dominates(&lose.meta) || (lose.meta.vv.is_empty() && win.meta.vv.is_empty());
        if concurrent && win.content != lose.content && (lose.has_meta || lose.content.is_some()) {
            let c = Conflict {
                path: p.clone(),
                stamp: lose.meta.stamp.clone(),
                node: stamp_node(&lose.meta.stamp).to_owned(),
                blob: lose.content.map(|o| git::hex(&o)),
            };
            let mut bytes = serde_json::to_vec(&c).expect("conflict serialises");
            bytes.push(b'\n');
            let oid = repo.store_object("blob", &bytes)?;
            files.insert(c.file(), oid);
            out.conflicts.push(c);
        }
        let mut vv = win.meta.vv.clone();
        for (n, s) in &lose.meta.vv {
            let e = vv.entry(n.clone()).or_default();
            if s > e {
                *e = s.clone();
            }
        }
        if win.content != l.content {
            out.changed.push(p.clone());
        }
        match win.content {
            Some(o) => files.insert(p.clone(), o),
            None => files.remove(&p),
        };
        if win.has_meta || lose.has_meta {
            let meta = Meta {
                stamp: win.meta.stamp.clone(),
                vv,
                deleted: win.content.is_none(),
            };
            let oid = repo.store_object("blob", &meta.to_bytes())?;
            files.insert(meta_path(&p), oid);
        }
    }
    out.files = files;
    Ok(out)
}

/// Every conflict record in a file map.
pub fn conflicts(repo: &Repo, files: &BTreeMap<String, Oid>) -> Result<Vec<Conflict>, GitError> {
    let mut out = Vec::new();
    for (p, oid) in files.range(CONFLICTS.to_owned()..) {
        if !p.starts_with(CONFLICTS) {
            break;
        }
        let (_, body) = repo.read_object(oid)?;
        if let Ok(c) = serde_json::from_slice::<Conflict>(&body) {
            out.push(c);
        }
    }
    out.sort_by(|a, b| (&a.path, &a.stamp).cmp(&(&b.path, &b.stamp)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::git::Signature;

    fn sig() -> Signature {
        Signature::now("t", "t@x")
    }

    /// A repo plus a clock for one node.
    struct Node {
        _dir: tempfile::TempDir,
        repo: Repo,
        hlc: Hlc,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut repo = Repo::init(dir.path()).unwrap();
        repo.durable = false;
        Node {
            _dir: dir,
            repo,
            hlc: Hlc::new(&uuid::Uuid::new_v4()),
        }
    }

    impl Node {
        fn edit(&mut self, changes: Vec<Change>) {
            let c = stamp_changes(&self.repo, &self.hlc, changes).unwrap();
            self.repo.commit(&c, &sig(), "edit").unwrap();
        }
        /// Copies `other`'s objects in and merges its head.
        fn pull(&mut self, other: &Node) {
            let theirs = other.repo.head().unwrap();
            for oid in other.repo.objects_missing_from(&theirs, &[]).unwrap() {
                let (k, b) = other.repo.read_object(&oid).unwrap();
                self.repo.store_object(&k, &b).unwrap();
            }
            let remote = self
                .repo
                .tree_files(&self.repo.commit_info(&theirs).unwrap().tree)
                .unwrap();
            let m = merge_files(&self.repo, self.repo.files(), &remote, Some(&self.hlc)).unwrap();
            self.repo
                .commit_merge(m.files, &theirs, &sig(), "merge")
                .unwrap();
        }
        fn tree(&self) -> Oid {
            self.repo.head_tree().unwrap().unwrap()
        }
        fn read(&self, p: &str) -> Option<Vec<u8>> {
            self.repo
                .files()
                .get(p)
                .map(|o| self.repo.read_object(o).unwrap().1)
        }
    }

    fn w(p: &str, b: &str) -> Change {
        Change::Write(p.into(), b.as_bytes().to_vec())
    }

    #[test]
    fn concurrent_edits_converge_and_the_loser_is_listed() {
        let mut a = node();
        a.edit(vec![w("systems/x.json", "0")]);
        let mut c = node();
        let mut e = node();
        c.pull(&a);
        e.pull(&a);
        c.edit(vec![w("systems/x.json", "from c")]);
        std::thread::sleep(std::time::Duration::from_millis(3));
        e.edit(vec![
            w("systems/x.json", "from e"),
            w("systems/y.json", "y"),
        ]);
        // Different orders.
        let mut a2 = node();
        a2.pull(&a);
        a.pull(&c);
        a.pull(&e);
        a2.pull(&e);
        a2.pull(&c);
        assert_eq!(a.tree(), a2.tree(), "merge order changed the state");
        assert_eq!(a.read("systems/x.json").unwrap(), b"from e");
        let cs = conflicts(&a.repo, a.repo.files()).unwrap();
        assert_eq!(cs.len(), 1, "{cs:?}");
        assert_eq!(cs[0].path, "systems/x.json");
        assert_eq!(cs[0].node, c.hlc.node());
        // The loser's content is in the store.
        let blob = git::parse_hex_oid(cs[0].blob.as_ref().unwrap()).unwrap();
        assert_eq!(a.repo.read_object(&blob).unwrap().1, b"from c");
        // Idempotent: merging the same again changes nothing.
        let before = a.tree();
        let remote = a.repo.tree_files(&c.tree()).unwrap();
        let m = merge_files(&a.repo, a.repo.files(), &remote, None).unwrap();
        assert_eq!(&m.files, a.repo.files());
        assert_eq!(a.tree(), before);
        // C and E learn the result and agree.
        c.pull(&a);
        e.pull(&a);
        assert_eq!(c.tree(), a.tree());
        assert_eq!(e.tree(), a.tree());
    }

    #[test]
    fn sequential_edits_are_not_conflicts_and_delete_is_a_version() {
        let mut a = node();
        a.edit(vec![w("p/a", "1")]);
        let mut b = node();
        b.pull(&a);
        b.edit(vec![w("p/a", "2")]);
        b.edit(vec![w("p/a", "3")]);
        a.pull(&b);
        assert_eq!(a.read("p/a").unwrap(), b"3");
        assert!(conflicts(&a.repo, a.repo.files()).unwrap().is_empty());
        // Edit on A against a later delete on B: the delete wins, the edit
        // is listed.
        a.edit(vec![w("p/a", "edited")]);
        std::thread::sleep(std::time::Duration::from_millis(3));
        b.edit(vec![Change::Delete("p/a".into())]);
        a.pull(&b);
        assert_eq!(a.read("p/a"), None);
        let cs = conflicts(&a.repo, a.repo.files()).unwrap();
        assert_eq!(cs.len(), 1);
        assert!(cs[0].blob.is_some());
        b.pull(&a);
        assert_eq!(a.tree(), b.tree());
        // An edit after seeing the delete brings it back, no conflict.
        b.edit(vec![w("p/a", "back")]);
        a.pull(&b);
        assert_eq!(a.read("p/a").unwrap(), b"back");
        assert_eq!(conflicts(&a.repo, a.repo.files()).unwrap().len(), 1);
    }

    #[test]
    fn clock_moves_past_what_it_sees() {
        let h = Hlc::new(&uuid::Uuid::nil());
        h.observe("9999999999999.00007.x");
        let s = h.tick();
        assert!(s.as_str() > "9999999999999.00007.x", "{s}");
        assert_eq!(stamp_node(&s), uuid::Uuid::nil().to_string());
    }
}
