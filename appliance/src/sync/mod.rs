//! Sync (issue 8): the shared state, which is the inventory repository and
//! the blobs in `<data>/blobs/sha256`, travels from a child to its parent and
//! back over the parent's HTTP API (`api.rs`), or as one bundle file
//! (`bundle.rs`). Node-local state (`<data>/state`) never travels.
//!
//! A sync, run by the child (`appliance sync`, or `serve` every
//! `--sync-interval` seconds), with its `replica:<id>` token:
//! 1. `GET /api/v1/sync/<id>/state?head=<child head>` → the parent's head,
//!    state hash, blob-list hash and whether it already has the child's
//!    head. Equal heads and blob lists: done, one round trip.
//! 2. blobs: `POST …/blobs` with the child's digests → what each side
//!    lacks; uploads (`PUT …/blobs/<hex>?offset=N`) and downloads (`GET
//!    …/blobs/<hex>?offset=N`) resume from the bytes already received
//!    (`<data>/blobs/partial/<hex>`); a blob is verified before it is named.
//! 3. push (only when the parent lacks the child's head): a git pack of
//!    the commits and objects the parent lacks → the parent checks them,
//!    stores them, and merges the child's head into its own (`merge.rs`).
//! 4. pull: a git pack of what the child lacks from the parent's new head,
//!    then the same merge on the child (normally a fast-forward).
//!
//! Every step is idempotent: objects are content-addressed, merging a head
//! already merged changes nothing, so re-running after a crash sends only
//! what did not arrive and changes nothing that did.

pub mod api;
pub mod bundle;
pub mod merge;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::inventory::git::{self, Oid};
use crate::inventory::{Inventory, MergeOutcome};
use crate::parent::ParentLink;

/// Node-local record of this node's syncs with its parent.
pub const SYNC_FILE: &str = "state/sync.json";
/// Node-local record of the heads each peer is known to have.
pub const PEERS_FILE: &str = "state/sync-peers.json";
/// Node-local record of the blobs each peer is known to hold
/// (`<dir>/<node id>.json`), so a bundle for it carries only the others.
pub const PEER_BLOBS_DIR: &str = "state/sync-peer-blobs";
/// How far ahead of the parent's clock a pushed stamp may be (a child with
/// a clock far in the future would otherwise win every merge for as long).
pub const MAX_SKEW_MS: u64 = 3_600_000;
/// Blob chunk size of uploads (a crash loses at most one chunk).
pub const CHUNK: usize = 16 << 20;

/// The shared-state side of one node.
pub struct SyncNode {
    pub data: PathBuf,
    pub node_id: Uuid,
    pub inventory: Arc<RwLock<Inventory>>,
    /// This node's children (scoped tokens, sibling ids).
    pub replicas: Option<crate::replicas::Replicas>,
    /// One sync (or import) at a time.
    pub running: Mutex<()>,
}

/// `state/sync.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncRecord {
    /// The parent's head after the last successful sync.
    pub parent_head: Option<String>,
    /// Unix seconds of the last successful sync.
    pub last_sync: Option<i64>,
    /// The last error, cleared by a success.
    pub last_error: Option<String>,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    pub round_trips: u32,
    pub pushed_objects: usize,
    pub pushed_bytes: u64,
    pub pulled_objects: usize,
    pub pulled_bytes: u64,
    pub blobs_up: usize,
    pub blobs_down: usize,
    pub blob_bytes_up: u64,
    pub blob_bytes_down: u64,
    /// The parent's merge of our head, when we pushed.
    pub parent_merge: Option<MergeOutcome>,
    /// Our merge of the parent's head.
    pub merge: Option<MergeOutcome>,
    /// HEAD's tree id after the sync.
    pub state: Option<String>,
    /// The parent's head as the parent reported it (after our push): a
    /// commit the parent holds, so the next push may leave out everything
    /// reachable from it. Never our own merge result, which the parent
    /// may lack.
    pub parent_head: Option<String>,
    /// Audit log bytes forwarded to the parent.
    #[serde(default)]
    pub audit_bytes: u64,
}

/// The answer of `GET /api/v1/sync/<id>/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateInfo {
    pub node_id: Uuid,
    pub head: Option<String>,
    pub state: Option<String>,
    pub blobs: String,
    /// Whether the asker's head is already part of ours.
    pub known: bool,
    /// Whether we hold the `base` commit the asker named (the parent head
    /// it last recorded), so its pushes may leave out what that reaches.
    #[serde(default)]
    pub base_known: bool,
}

/// One blob: `sha256:<hex>` and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut b = serde_json::to_vec_pretty(v)?;
    b.push(b'\n');
    crate::state::write_atomic(path, &b, true, crate::state::Secrecy::Public)?;
    Ok(())
}

fn now() -> i64 {
    crate::inventory::status::now()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl SyncNode {
    pub fn new(
        data: &Path,
        node_id: Uuid,
        inventory: Arc<RwLock<Inventory>>,
        replicas: Option<crate::replicas::Replicas>,
    ) -> Self {
        Self {
            data: data.to_owned(),
            node_id,
            inventory,
            replicas,
            running: Mutex::new(()),
        }
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.data.join("blobs/sha256")
    }

    fn partial_dir(&self) -> PathBuf {
        self.data.join("blobs/partial")
    }

    fn inv(&self) -> std::sync::RwLockReadGuard<'_, Inventory> {
        self.inventory.read().unwrap_or_else(|e| e.into_inner())
    }

    fn inv_mut(&self) -> std::sync::RwLockWriteGuard<'_, Inventory> {
        self.inventory.write().unwrap_or_else(|e| e.into_inner())
    }

    /// HEAD and the state hash (HEAD's tree id).
    pub fn head_and_state(&self) -> (Option<String>, Option<String>) {
        let inv = self.inv();
        let state = inv.repo().head_tree().ok().flatten().map(|t| git::hex(&t));
        (inv.head(), state)
    }

    /// Sorted hex digests of the local blobs.
    pub fn blob_list(&self) -> Result<Vec<String>> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd {
                    let name = e
                        .with_context(|| format!("listing {}", dir.display()))?
                        .file_name();
                    let name = name.to_string_lossy();
                    if is_hex64(&name) {
                        out.push(name.into_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        }
        out.sort();
        Ok(out)
    }

    /// The hash of the blob list (equal lists, equal hashes).
    pub fn blob_hash(list: &[String]) -> String {
        let mut h = Sha256::new();
        for d in list {
            h.update(d.as_bytes());
            h.update(b"\n");
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    /// Our state, and whether `their_head` is part of it.
    pub fn state_info(&self, their_head: Option<&str>, base: Option<&str>) -> Result<StateInfo> {
        let (head, state) = self.head_and_state();
        let known = match (their_head, &head) {
            (None, _) => true,
            (Some(t), Some(h)) if t == h => true,
            (Some(t), Some(h)) => {
                let inv = self.inv();
                let t = git::parse_hex_oid(t)?;
                inv.repo().has_object(&t) && inv.repo().is_ancestor(&t, &git::parse_hex_oid(h)?)?
            }
            (Some(_), None) => false,
        };
        let base_known = match base {
            Some(b) => self.inv().repo().has_object(&git::parse_hex_oid(b)?),
            None => false,
        };
        Ok(StateInfo {
            node_id: self.node_id,
            head,
            state,
            blobs: Self::blob_hash(&self.blob_list()?),
            known,
            base_known,
        })
    }

    /// A git pack of everything reachable from `want` that is not
    /// reachable from `have`; with the number of objects.
    pub fn build_pack(&self, want: &Oid, have: &[Oid]) -> Result<(Vec<u8>, usize)> {
        let inv = self.inv();
        let repo = inv.repo();
        let ids = repo.objects_missing_from(want, have)?;
        let mut objects = Vec::with_capacity(ids.len());
        for id in &ids {
            objects.push(repo.read_object(id)?);
        }
        Ok((git::write_pack(&objects), ids.len()))
    }

    /// Verifies a whole pack, then stores its objects (commits last).
    pub fn store_pack(&self, pack: &[u8]) -> Result<usize> {
        let objects = git::read_pack(pack).context("reading the pack")?;
        let inv = self.inv();
        let repo = inv.repo();
        let mut commits = Vec::new();
        for (kind, body) in &objects {
            if kind == "commit" {
                commits.push((kind, body));
            } else {
                repo.store_object(kind, body)?;
            }
        }
        for (kind, body) in commits {
            repo.store_object(kind, body)?;
        }
        repo.sync_objects()?;
        Ok(objects.len())
    }

    /// Checks that a head a child pushed carries no new version claiming
    /// to come from this node or from one of the child's siblings (a child
    /// can only bring its own and its subtree's changes), nor one stamped
    /// more than [`MAX_SKEW_MS`] ahead of this node's clock.
    pub fn check_origins(&self, child: &Uuid, head: &Oid) -> Result<()> {
        let inv = self.inv();
        let repo = inv.repo();
        let mut forbidden: Vec<String> = vec![self.node_id.to_string()];
        if let Some(r) = &self.replicas {
            forbidden.extend(
                r.list()
                    .into_iter()
                    .filter(|x| &x.node_id != child)
                    .map(|x| x.node_id.to_string()),
            );
        }
        let theirs = repo.tree_files(&repo.commit_info(head)?.tree)?;
        let ours = repo.files();
        let max_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            + MAX_SKEW_MS;
        for (path, oid) in theirs.range(merge::META.to_owned()..) {
            if !path.starts_with(merge::META) {
                break;
            }
            if ours.get(path) == Some(oid) {
                continue;
            }
            let (_, body) = repo.read_object(oid)?;
            let Ok(theirs) = serde_json::from_slice::<merge::Meta>(&body) else {
                continue;
            };
            let known = match ours.get(path) {
                Some(o) => serde_json::from_slice::<merge::Meta>(&repo.read_object(o)?.1)
                    .map(|m| m.stamp >= theirs.stamp)
                    .unwrap_or(false),
                None => false,
            };
            let origin = merge::stamp_node(&theirs.stamp);
            if !known && merge::stamp_ms(&theirs.stamp) > max_ms {
                bail!(
                    "{path}: version {} is more than {} s ahead of this node's clock",
                    theirs.stamp,
                    MAX_SKEW_MS / 1000
                );
            }
            if !known && forbidden.iter().any(|f| f == origin) {
                bail!(
                    "{path}: version {} claims to come from node {origin}, which is not in the \
                     pushing child's subtree",
                    theirs.stamp
                );
            }
        }
        Ok(())
    }

    /// Merges a stored head into ours.
    pub fn merge(&self, head: &Oid, who: &str) -> Result<MergeOutcome> {
        Ok(self.inv_mut().merge_remote(head, who)?)
    }

    /// Every conflict in the current state.
    pub fn conflicts(&self) -> Result<Vec<merge::Conflict>> {
        let inv = self.inv();
        Ok(merge::conflicts(inv.repo(), inv.repo().files())?)
    }

    pub fn record(&self) -> Result<SyncRecord> {
        read_json(&self.data.join(SYNC_FILE))
    }

    /// Remembers that `peer` has `head` (for bundle export).
    pub fn note_peer(&self, peer: &str, head: &str) -> Result<()> {
        let path = self.data.join(PEERS_FILE);
        let mut peers: BTreeMap<String, serde_json::Value> = read_json(&path)?;
        peers.insert(
            peer.to_owned(),
            serde_json::json!({"head": head, "time": now()}),
        );
        write_json(&path, &peers)
    }

    /// The head `peer` is known to have (last sync or bundle).
    pub fn peer_head(&self, peer: &str) -> Result<Option<String>> {
        let peers: BTreeMap<String, serde_json::Value> = read_json(&self.data.join(PEERS_FILE))?;
        Ok(peers
            .get(peer)
            .and_then(|v| v["head"].as_str())
            .map(str::to_owned))
    }

    fn peer_blobs_path(&self, peer: &str) -> Result<PathBuf> {
        // Peers are node ids (uuids): nothing else names a file here.
        let id: Uuid = peer
            .parse()
            .with_context(|| format!("{peer:?} is not a node id"))?;
        Ok(self
            .data
            .join(PEER_BLOBS_DIR)
            .join(format!("{}.json", id.hyphenated())))
    }

    /// Records blobs `peer` is known to hold: `complete` when `blobs` is its
    /// whole list (it told us), else added to what was known (blobs are
    /// immutable and never removed, so knowledge only grows).
    pub fn note_peer_blobs<'a>(
        &self,
        peer: &str,
        blobs: impl IntoIterator<Item = &'a str>,
        complete: bool,
    ) -> Result<()> {
        let path = self.peer_blobs_path(peer)?;
        let old = self.peer_blobs(peer)?;
        let mut set = if complete {
            Default::default()
        } else {
            old.clone()
        };
        set.extend(blobs.into_iter().filter(|h| is_hex64(h)).map(str::to_owned));
        if set == old && path.exists() {
            return Ok(()); // a quiet sync writes nothing
        }
        write_json(&path, &set)
    }

    /// The blobs `peer` is known to hold (empty when nothing is known, or
    /// `peer` is not a node id).
    pub fn peer_blobs(&self, peer: &str) -> Result<std::collections::BTreeSet<String>> {
        match self.peer_blobs_path(peer) {
            Ok(p) => read_json(&p),
            Err(_) => Ok(Default::default()),
        }
    }

    /// Bytes already received of blob `hex` (0 when none).
    pub fn partial_len(&self, hex: &str) -> u64 {
        std::fs::metadata(self.partial_dir().join(hex))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Appends `chunk` at `offset` to the partial blob `hex`; when `size`
    /// bytes are there, verifies the digest and names the blob. Returns
    /// (bytes held, complete).
    pub fn put_blob_chunk(
        &self,
        hex: &str,
        offset: u64,
        size: u64,
        chunk: &[u8],
    ) -> Result<(u64, bool)> {
        if !is_hex64(hex) {
            bail!("blob names are 64 lowercase hex digits");
        }
        let done = self.blob_dir().join(hex);
        if done.exists() {
            return Ok((size, true));
        }
        let dir = self.partial_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(hex);
        let have = self.partial_len(hex);
        if offset != have {
            bail!("blob {hex}: upload at offset {offset}, but {have} bytes are held");
        }
        if have + chunk.len() as u64 > size {
            bail!("blob {hex}: more than its size {size}");
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(chunk)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        let held = have + chunk.len() as u64;
        if held < size {
            return Ok((held, false));
        }
        self.finish_blob(hex, &path)?;
        Ok((held, true))
    }

    /// Verifies a complete partial file against its name and moves it in.
    fn finish_blob(&self, hex: &str, path: &Path) -> Result<()> {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let got = hex::encode(h.finalize());
        if got != hex {
            let _ = std::fs::remove_file(path);
            bail!("blob sha256:{hex} arrived as sha256:{got}; discarded");
        }
        let dest = self.blob_dir().join(hex);
        std::fs::create_dir_all(self.blob_dir())?;
        std::fs::rename(path, &dest)
            .with_context(|| format!("renaming {} into place", path.display()))?;
        Ok(())
    }

    /// Runs one sync with the parent (blocking).
    pub fn sync_with_parent(&self, link: &ParentLink) -> Result<SyncReport> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let res = self.sync_inner(link).and_then(|mut rep| {
            self.forward_audit(link, &mut rep)?;
            Ok(rep)
        });
        let path = self.data.join(SYNC_FILE);
        let mut rec: SyncRecord = read_json(&path).unwrap_or_default();
        match &res {
            Ok(_) => {
                rec.last_sync = Some(now());
                rec.last_error = None;
            }
            Err(e) => rec.last_error = Some(format!("{e:#}")),
        }
        if let Ok(r) = &res {
            if r.parent_head.is_some() {
                rec.parent_head = r.parent_head.clone();
            }
        }
        if let Err(e) = write_json(&path, &rec) {
            tracing::warn!(error = format!("{e:#}"), "recording the sync");
        }
        res
    }

    fn sync_inner(&self, link: &ParentLink) -> Result<SyncReport> {
        let client = link.client(std::time::Duration::from_secs(600));
        let base = format!("/api/v1/sync/{}", link.node_id);
        let mut rep = SyncReport::default();
        let (head, _) = self.head_and_state();
        let blobs = self.blob_list()?;
        // The parent head we recorded last time: the parent confirms it
        // still holds it before a push leaves out what it reaches (a
        // restored or replaced parent may not).
        let recorded = self.record()?.parent_head;
        let mut q: Vec<String> = Vec::new();
        if let Some(h) = &head {
            q.push(format!("head={h}"));
        }
        if let Some(b) = &recorded {
            q.push(format!("base={b}"));
        }
        let our_hash = Self::blob_hash(&blobs);
        q.push(format!("blobs={}", our_hash.replace(':', "%3A")));
        let q = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        let st: StateInfo = serde_json::from_value(
            client
                .json("GET", &format!("{base}/state{q}"), None)
                .context("asking the parent for its state")?,
        )
        .context("parsing the parent's state")?;
        rep.round_trips += 1;
        let parent = link.parent_node_id.to_string();
        if st.head == head && st.blobs == our_hash {
            self.note_peer_blobs(&parent, blobs.iter().map(String::as_str), true)?;
            rep.state = st.state;
            rep.parent_head = st.head;
            return Ok(rep);
        }
        // Blobs first, so the parent never holds state naming a blob it lacks.
        if st.blobs != our_hash {
            self.exchange_blobs(&client, &base, &blobs, &mut rep)?;
            // The parent holds every blob we held and every one we fetched.
            let now = self.blob_list()?;
            self.note_peer_blobs(&parent, now.iter().map(String::as_str), false)?;
        }
        let mut parent_head = st.head.clone();
        if let (Some(h), false) = (&head, st.known) {
            let want = git::parse_hex_oid(h)?;
            let mut have = Vec::new();
            if let Some(p) = &parent_head {
                have.push(git::parse_hex_oid(p)?);
            }
            if let (Some(p), true) = (&recorded, st.base_known) {
                have.push(git::parse_hex_oid(p)?);
            }
            let (pack, n) = self.build_pack(&want, &have)?;
            rep.pushed_objects = n;
            rep.pushed_bytes = pack.len() as u64;
            let v = client
                .bytes(
                    "POST",
                    &format!("{base}/push?head={h}"),
                    Some((&pack, "application/x-git-pack")),
                )
                .context("pushing our changes")?;
            rep.round_trips += 1;
            let m: MergeOutcome = serde_json::from_slice(&v).context("parsing the push answer")?;
            parent_head = m.head.clone();
            rep.parent_merge = Some(m);
        }
        if let Some(p) = &parent_head {
            let want = git::parse_hex_oid(p)?;
            let have_it = self.inv().repo().has_object(&want);
            if !have_it {
                let q = head
                    .as_deref()
                    .map(|h| format!("&have={h}"))
                    .unwrap_or_default();
                let pack = client
                    .bytes("GET", &format!("{base}/pack?want={p}{q}"), None)
                    .context("fetching the parent's changes")?;
                rep.round_trips += 1;
                rep.pulled_bytes = pack.len() as u64;
                rep.pulled_objects = self.store_pack(&pack)?;
            }
            rep.merge = Some(self.merge(&want, "parent")?);
            self.note_peer(&link.parent_node_id.to_string(), p)?;
        }
        rep.parent_head = parent_head;
        rep.state = self.head_and_state().1;
        Ok(rep)
    }

    /// Sends the parent the audit lines it lacks (this node's writes and
    /// what its own children forwarded), a chunk per request, recording
    /// each acknowledged chunk (a retried chunk lands once: the parent
    /// skips what it received).
    fn forward_audit(&self, link: &ParentLink, rep: &mut SyncReport) -> Result<()> {
        let quiet = rep.round_trips <= 1;
        if quiet && !crate::audit::quiet_forward_due(&self.data) {
            return Ok(());
        }
        let client = link.client(std::time::Duration::from_secs(120));
        let base = format!("/api/v1/sync/{}/audit", link.node_id);
        while let Some((chunk, from, to)) =
            crate::audit::pending(&self.data, crate::audit::FORWARD_CHUNK)?
        {
            client
                .bytes(
                    "POST",
                    &format!("{base}?first={}&offset={}", from.first, from.offset),
                    Some((&chunk, "application/x-ndjson")),
                )
                .context("forwarding the audit log")?;
            rep.round_trips += 1;
            rep.audit_bytes += chunk.len() as u64;
            crate::audit::mark_sent(&self.data, &to)?;
        }
        Ok(())
    }

    fn exchange_blobs(
        &self,
        client: &crate::cli::client::Client,
        base: &str,
        blobs: &[String],
        rep: &mut SyncReport,
    ) -> Result<()> {
        #[derive(Deserialize)]
        struct Answer {
            parent_lacks: Vec<String>,
            child_lacks: Vec<BlobRef>,
        }
        let a: Answer = serde_json::from_value(client.json(
            "POST",
            &format!("{base}/blobs"),
            Some(&serde_json::json!({"have": blobs})),
        )?)
        .context("parsing the blob answer")?;
        rep.round_trips += 1;
        for hex in &a.parent_lacks {
            let path = self.blob_dir().join(hex);
            let size = std::fs::metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            let v = client.json("GET", &format!("{base}/blobs/{hex}/upload"), None)?;
            rep.round_trips += 1;
            let mut offset = v["offset"].as_u64().unwrap_or(0);
            let mut f = std::fs::File::open(&path)?;
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(offset))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let mut n = 0;
                while n < buf.len() {
                    let k = f.read(&mut buf[n..])?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                let v = client.bytes(
                    "PUT",
                    &format!("{base}/blobs/{hex}?offset={offset}&size={size}"),
                    Some((&buf[..n], "application/octet-stream")),
                )?;
                rep.round_trips += 1;
                rep.blob_bytes_up += n as u64;
                offset += n as u64;
                let v: serde_json::Value = serde_json::from_slice(&v)?;
                if v["complete"].as_bool() == Some(true) {
                    break;
                }
                if n == 0 {
                    bail!("blob {hex}: the parent did not accept the last bytes");
                }
            }
            rep.blobs_up += 1;
        }
        for b in &a.child_lacks {
            let Some(hex) = b.digest.strip_prefix("sha256:").filter(|h| is_hex64(h)) else {
                bail!("the parent named a bad blob {:?}", b.digest);
            };
            if self.blob_dir().join(hex).exists() {
                continue;
            }
            let dir = self.partial_dir();
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(hex);
            let offset = self.partial_len(hex);
            if offset < b.size {
                let (_, mut r) =
                    client.stream("GET", &format!("{base}/blobs/{hex}?offset={offset}"), None)?;
                rep.round_trips += 1;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                let n = std::io::copy(&mut (&mut r).take(b.size - offset), &mut f)
                    .with_context(|| format!("downloading blob {hex}"))?;
                f.sync_data()?;
                rep.blob_bytes_down += n;
            }
            self.finish_blob(hex, &path)?;
            rep.blobs_down += 1;
        }
        if !a.child_lacks.is_empty() {
            // Tell the parent what we hold now (it answers what each side
            // lacks; the answer is not needed), so a bundle it exports for
            // us carries only what we lack.
            let now = self.blob_list()?;
            client
                .json(
                    "POST",
                    &format!("{base}/blobs"),
                    Some(&serde_json::json!({"have": now})),
                )
                .context("confirming the blobs received")?;
            rep.round_trips += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{Kind, Object};
    use crate::inventory::Author;

    fn node(dir: &Path, origin: Uuid, replicas: Option<crate::replicas::Replicas>) -> SyncNode {
        let mut inv = Inventory::open_volatile(&dir.join("inventory")).unwrap();
        inv.set_origin(&origin);
        SyncNode::new(dir, origin, Arc::new(RwLock::new(inv)), replicas)
    }

    fn add(n: &SyncNode, name: &str) -> Oid {
        let o = Object::from_json(
            Kind::Repo,
            serde_json::json!({"name": name, "mirror": "http://m"}),
        )
        .unwrap();
        n.inventory
            .write()
            .unwrap()
            .create(o, &Author::new("t"))
            .unwrap();
        git::parse_hex_oid(&n.head_and_state().0.unwrap()).unwrap()
    }

    #[test]
    fn a_child_cannot_push_versions_of_its_parent_or_siblings() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let tokens = Arc::new(crate::auth::TokenStore::memory());
        let pid = Uuid::new_v4();
        let reg = crate::replicas::Replicas::memory(tokens, pid, crate::events::Events::new());
        let c = reg.register(Some("c"), None, None).unwrap().node_id;
        let d = reg.register(Some("d"), None, None).unwrap().node_id;
        let parent = node(dirs[0].path(), pid, Some(reg));
        let honest = node(dirs[1].path(), c, None);
        let forger = node(dirs[2].path(), d, None); // stamps as sibling D
        for (child, ok) in [(&honest, true), (&forger, false)] {
            let head = add(child, "r");
            let (pack, _) = child.build_pack(&head, &[]).unwrap();
            parent.store_pack(&pack).unwrap();
            let res = parent.check_origins(&c, &head);
            assert_eq!(res.is_ok(), ok, "{res:?}");
            if let Err(e) = res {
                assert!(format!("{e:#}").contains("not in the pushing child's subtree"));
            }
        }
        // Merging the honest head, then syncing state info.
        let head = git::parse_hex_oid(&honest.head_and_state().0.unwrap()).unwrap();
        let m = parent.merge(&head, "c").unwrap();
        assert_ne!(m.action, "unchanged");
        let info = parent.state_info(Some(&git::hex(&head)), None).unwrap();
        assert!(info.known);
        assert!(!info.base_known, "no base asked about");
        let h = git::hex(&head);
        assert!(parent.state_info(None, Some(&h)).unwrap().base_known);
        let never = git::hex(&add(&forger, "never-pushed"));
        assert!(!parent.state_info(None, Some(&never)).unwrap().base_known);
        assert_eq!(parent.merge(&head, "c").unwrap().action, "unchanged");
    }

    #[test]
    fn blob_chunks_resume_and_bad_blobs_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path(), Uuid::new_v4(), None);
        let data = vec![5u8; 1000];
        let hex = hex::encode(Sha256::digest(&data));
        assert_eq!(
            n.put_blob_chunk(&hex, 0, 1000, &data[..400]).unwrap(),
            (400, false)
        );
        assert_eq!(n.partial_len(&hex), 400);
        assert!(n.put_blob_chunk(&hex, 100, 1000, &data[100..200]).is_err());
        assert_eq!(
            n.put_blob_chunk(&hex, 400, 1000, &data[400..]).unwrap(),
            (1000, true)
        );
        assert_eq!(std::fs::read(n.blob_dir().join(&hex)).unwrap(), data);
        let wrong = hex::encode(Sha256::digest(b"other"));
        let err = n.put_blob_chunk(&wrong, 0, 3, b"abc").unwrap_err();
        assert!(format!("{err:#}").contains("discarded"));
        assert!(!n.blob_dir().join(&wrong).exists());
        assert_eq!(n.blob_list().unwrap(), vec![hex]);
    }

    /// Issue 15, hole 5, over HTTP: a replica pushes a 60-byte pack whose
    /// one object claims a terabyte. The answer is 422 naming the problem,
    /// and the server keeps answering (it used to abort).
    #[tokio::test]
    async fn a_sixty_byte_push_is_refused_and_the_server_lives() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let n = Arc::new(node(dir.path(), Uuid::new_v4(), None));
        let child = Uuid::new_v4();
        let tokens = Arc::new(crate::auth::TokenStore::memory());
        let (_, token) = tokens
            .create_scoped("child", crate::auth::Scope::Replica(child))
            .unwrap();
        let app = api::router(Arc::new(api::SyncState {
            node: n.clone(),
            tokens,
            public_reads: false,
        }));
        let mut pack = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        pack.extend_from_slice(&[0xb0, 0x80, 0x80, 0x80, 0x80, 0x20]);
        pack.extend_from_slice(&[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        pack.resize(40, 0);
        let sum: [u8; 20] = sha1::Sha1::digest(&pack).into();
        pack.extend_from_slice(&sum);
        assert_eq!(pack.len(), 60);
        let call = |uri: String, method: &str, body: Vec<u8>| {
            axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::from(body))
                .unwrap()
        };
        let head = "1".repeat(40);
        let resp = app
            .clone()
            .oneshot(call(
                format!("/api/v1/sync/{child}/push?head={head}"),
                "POST",
                pack,
            ))
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 422, "{text}");
        assert!(text.contains("object limit"), "{text}");
        let resp = app
            .oneshot(call(format!("/api/v1/sync/{child}/state"), "GET", vec![]))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}
