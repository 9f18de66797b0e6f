//! Offline sync: one bundle file carries what another node lacks (history
//! as a git pack, and blobs) across an air gap.
//!
//! Format (`appliance.sync.bundle.v1`), in order:
//! 1. the line `APPLIANCE-SYNC-BUNDLE 1\n`;
//! 2. one line of compact JSON + `\n`: `{"from":"<node uuid>","for":<node or
//!    null>,"head":"<commit>","state":"<tree>","created":<unix s>,
//!    "pack_size":N,"objects":N,"blobs":[{"digest":"sha256:…","size":N}]}`;
//! 3. `pack_size` bytes: a git pack (version 2, no deltas) of the commits
//!    and objects from `head` back to what the receiver is known to have;
//! 4. each blob's bytes, in the listed order;
//! 5. the trailer `sha256:<hex>\n`: SHA-256 of every byte before it.
//!
//! Import checks the trailer over the whole file before anything else, then
//! the pack's own checksum and every blob's digest, and only then stores
//! blobs and objects and merges `head` exactly as an online sync does. So a
//! corrupt or truncated file is rejected whole, and importing a file twice
//! changes nothing the second time.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{BlobRef, SyncNode};
use crate::inventory::git;
use crate::inventory::MergeOutcome;

pub const MAGIC: &[u8] = b"APPLIANCE-SYNC-BUNDLE 1\n";
const TRAILER: u64 = 7 + 64 + 1;

/// The header line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub from: uuid::Uuid,
    #[serde(rename = "for")]
    pub for_node: Option<String>,
    pub head: String,
    pub state: Option<String>,
    pub created: i64,
    pub pack_size: u64,
    pub objects: usize,
    pub blobs: Vec<BlobRef>,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReport {
    pub from: uuid::Uuid,
    pub objects: usize,
    pub blobs_added: usize,
    pub merge: MergeOutcome,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a bundle for `for_node` to `out`; returns the header.
pub fn export(node: &SyncNode, for_node: Option<&str>, out: impl Write) -> Result<Header> {
    let (head, state) = node.head_and_state();
    let head = head.context("the inventory has no commit yet")?;
    let mut have = Vec::new();
    if let Some(peer) = for_node {
        if let Some(h) = node.peer_head(peer)? {
            have.push(git::parse_hex_oid(&h)?);
        }
    }
    let (pack, objects) = node.build_pack(&git::parse_hex_oid(&head)?, &have)?;
    // Only the blobs the receiver is not known to hold (from its last
    // sync with us, or bundles it sent us).
    let known = match for_node {
        Some(peer) => node.peer_blobs(peer)?,
        None => Default::default(),
    };
    let mut blobs = Vec::new();
    for hex in node.blob_list()?.into_iter().filter(|h| !known.contains(h)) {
        let size = std::fs::metadata(node.blob_dir().join(&hex))?.len();
        blobs.push(BlobRef {
            digest: format!("sha256:{hex}"),
            size,
        });
    }
    let header = Header {
        from: node.node_id,
        for_node: for_node.map(str::to_owned),
        head,
        state,
        created: crate::inventory::status::now(),
        pack_size: pack.len() as u64,
        objects,
        blobs,
    };
    let mut w = Hashing {
        inner: out,
        hash: Sha256::new(),
        written: 0,
    };
    w.write_all(MAGIC)?;
    serde_json::to_writer(&mut w, &header)?;
    w.write_all(b"\n")?;
    w.write_all(&pack)?;
    for b in &header.blobs {
        let hex = &b.digest["sha256:".len()..];
        let path = node.blob_dir().join(hex);
        let mut f =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let n = std::io::copy(&mut (&mut f).take(b.size), &mut w)?;
        if n != b.size {
            bail!("blob {} shrank while exporting", b.digest);
        }
    }
    let sum = hex::encode(std::mem::take(&mut w.hash).finalize());
    w.inner.write_all(format!("sha256:{sum}\n").as_bytes())?;
    w.inner.flush()?;
    Ok(header)
}

/// Checks the trailer of the bundle file at `path` against its content.
pub fn verify(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if len < MAGIC.len() as u64 + TRAILER {
        bail!("{} is not a sync bundle (too short)", path.display());
    }
    let mut h = Sha256::new();
    let mut left = len - TRAILER;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = f.read(&mut buf[..left.min(1 << 20) as usize])?;
        if n == 0 {
            bail!("{} is truncated", path.display());
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = Vec::new();
    f.read_to_end(&mut trailer)?;
    let want = format!("sha256:{}\n", hex::encode(h.finalize()));
    if trailer != want.as_bytes() {
        bail!(
            "{} is corrupt or truncated: its checksum does not match its content; nothing applied",
            path.display()
        );
    }
    Ok(())
}

/// Imports a bundle file: verifies everything, then applies it.
pub fn import(node: &SyncNode, path: &Path) -> Result<ImportReport> {
    let _one = node.running.lock().unwrap_or_else(|e| e.into_inner());
    verify(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::new(f);
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic)?;
    if magic != MAGIC {
        bail!("{} is not a sync bundle (bad magic)", path.display());
    }
    let mut line = String::new();
    (&mut r).take(MAX_HEADER).read_line(&mut line)?;
    if !line.ends_with('\n') {
        bail!(
            "{} is not a sync bundle (no header line within {MAX_HEADER} bytes); nothing applied",
            path.display()
        );
    }
    let header: Header =
        serde_json::from_str(&line).context("parsing the bundle header; nothing applied")?;
    let head =
        git::parse_hex_oid(&header.head).context("reading the bundle's head; nothing applied")?;
    let blob_start = check_sizes(&header, line.len() as u64, std::fs::metadata(path)?.len())
        .map_err(|why| anyhow::anyhow!("{}: {why}; nothing applied", path.display()))?;
    let mut pack = vec![0u8; header.pack_size as usize];
    r.read_exact(&mut pack)
        .context("reading the bundle's pack")?;
    let objects = git::read_pack(&pack)
        .map_err(|e| anyhow::anyhow!("checking the bundle's pack: {e}; nothing applied"))?;
    // Blobs: check every digest before naming any.
    let mut pos = blob_start;
    let mut todo = Vec::new();
    for b in &header.blobs {
        let hex = b
            .digest
            .strip_prefix("sha256:")
            .filter(|h| super::is_hex64(h))
            .with_context(|| format!("bad blob digest {:?} in the bundle", b.digest))?;
        let mut h = Sha256::new();
        std::io::copy(&mut (&mut r).take(b.size), &mut HashSink(&mut h))?;
        if hex::encode(h.finalize()) != hex {
            bail!(
                "blob {} in the bundle does not match its digest; nothing applied",
                b.digest
            );
        }
        if !node.blob_dir().join(hex).exists() {
            todo.push((hex.to_owned(), pos, b.size));
        }
        pos += b.size;
    }
    // Everything checked: apply. Blobs first, then objects, then the merge.
    let dir = node.blob_dir();
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::File::open(path)?;
    for (hex, at, size) in &todo {
        f.seek(SeekFrom::Start(*at))?;
        let tmp = dir.join(format!(".tmp-{hex}"));
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut (&mut f).take(*size), &mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, dir.join(hex))?;
    }
    let n = objects.len();
    {
        let inv = node.inv();
        let repo = inv.repo();
        let (commits, rest): (Vec<_>, Vec<_>) = objects.iter().partition(|o| o.0 == "commit");
        for (k, b) in rest.into_iter().chain(commits) {
            repo.store_object(k, b)?;
        }
        repo.sync_objects()?;
    }
    let merge = node.merge(&head, &format!("bundle-{}", header.from))?;
    node.note_peer(&header.from.to_string(), &header.head)?;
    // The sender holds what it sent.
    node.note_peer_blobs(
        &header.from.to_string(),
        header
            .blobs
            .iter()
            .filter_map(|b| b.digest.strip_prefix("sha256:")),
        false,
    )?;
    Ok(ImportReport {
        from: header.from,
        objects: n,
        blobs_added: todo.len(),
        merge,
    })
}

/// Longest header line read (its blob list grows with the blobs: about
/// 100 bytes each).
const MAX_HEADER: u64 = 64 << 20;

/// Checks the header's sizes against the file's length before anything is
/// allocated from them: the pack and the blobs, end to end, must fill the
/// file exactly up to the trailer, and the pack must fit the in-memory
/// limit. Returns where the blobs start.
fn check_sizes(header: &Header, line_len: u64, file_len: u64) -> Result<u64, String> {
    let pack_start = MAGIC.len() as u64 + line_len;
    let body = file_len
        .checked_sub(pack_start + TRAILER)
        .ok_or("the file ends inside its header")?;
    if header.pack_size > git::MAX_PACK_BYTES {
        return Err(format!(
            "its pack_size {} is more than the {}-byte limit",
            header.pack_size,
            git::MAX_PACK_BYTES
        ));
    }
    let blobs = header
        .blobs
        .iter()
        .try_fold(0u64, |sum, b| sum.checked_add(b.size))
        .ok_or("its blob sizes overflow")?;
    match header.pack_size.checked_add(blobs) {
        Some(n) if n == body => Ok(pack_start + header.pack_size),
        _ => Err(format!(
            "its header announces a {}-byte pack and {blobs} bytes of blobs, but {body} bytes follow it",
            header.pack_size
        )),
    }
}

struct HashSink<'a>(&'a mut Sha256);
impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, RwLock};

    fn node(dir: &Path) -> SyncNode {
        let id = uuid::Uuid::new_v4();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        crate::node::write(dir, &crate::node::NodeFile { node_id: id }).unwrap();
        let inv = crate::inventory::Inventory::open_volatile(&dir.join("inventory")).unwrap();
        let mut inv = inv;
        inv.set_origin(&id);
        SyncNode::new(dir, id, Arc::new(RwLock::new(inv)), None)
    }

    /// Two nodes; the first has made one change (a repo `r1`).
    fn two_nodes_one_change(d1: &Path, d2: &Path) -> (SyncNode, SyncNode) {
        use crate::inventory::model::{Kind, Object};
        let (a, b) = (node(d1), node(d2));
        let repo = Object::from_json(
            Kind::Repo,
            serde_json::json!({"name": "r1", "mirror": "http://x"}),
        )
        .unwrap();
        a.inventory
            .write()
            .unwrap()
            .create(repo, &crate::inventory::Author::new("t"))
            .unwrap();
        (a, b)
    }

    #[test]
    fn bundles_apply_once_and_bad_ones_apply_nothing() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = two_nodes_one_change(d1.path(), d2.path());
        std::fs::create_dir_all(a.blob_dir()).unwrap();
        let blob = b"blob bytes";
        let hex = hex::encode(Sha256::digest(blob));
        std::fs::write(a.blob_dir().join(&hex), blob).unwrap();
        let file = d1.path().join("x.bundle");
        export(
            &a,
            Some(&b.node_id.to_string()),
            std::fs::File::create(&file).unwrap(),
        )
        .unwrap();
        let good = std::fs::read(&file).unwrap();
        let before = b.head_and_state();
        for bad in [
            {
                let mut v = good.clone();
                let n = v.len() - 200;
                v[n] ^= 1;
                v
            },
            good[..good.len() - 1].to_vec(),
            good[..10].to_vec(),
        ] {
            let p = d2.path().join("bad.bundle");
            std::fs::write(&p, &bad).unwrap();
            assert!(import(&b, &p).is_err());
            assert_eq!(b.head_and_state(), before);
            assert!(!b.blob_dir().join(&hex).exists());
        }
        let r = import(&b, &file).unwrap();
        assert_eq!(r.blobs_added, 1);
        assert_eq!(b.head_and_state().1, a.head_and_state().1);
        assert!(b
            .inventory
            .read()
            .unwrap()
            .get(crate::inventory::model::Kind::Repo, "r1")
            .is_some());
        let again = import(&b, &file).unwrap();
        assert_eq!(again.merge.action, "unchanged");
        assert_eq!(again.blobs_added, 0);
        assert_eq!(b.head_and_state().1, a.head_and_state().1);
    }

    /// `body` with a correct trailer, so a crafted bundle gets past the
    /// checksum (anyone can compute a SHA-256: it is not authentication).
    fn seal(body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(format!("sha256:{}\n", hex::encode(Sha256::digest(body))).as_bytes());
        v
    }

    /// Issue 15, hole 5: a crafted bundle (valid trailer, lying header)
    /// made import allocate `pack_size` bytes up front; a huge one aborts
    /// the process. Every such bundle is now refused with a reason.
    #[test]
    fn crafted_bundles_are_refused_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let b = node(d.path());
        let before = b.head_and_state();
        let head = "0".repeat(40);
        let header = |pack_size: u64, blobs: &str| {
            format!(
                "{{\"from\":\"{}\",\"for\":null,\"head\":\"{head}\",\"state\":null,\"created\":0,\"pack_size\":{pack_size},\"objects\":1,\"blobs\":[{blobs}]}}\n",
                uuid::Uuid::nil()
            )
            .into_bytes()
        };
        let blob = |size: u64| {
            format!(
                "{{\"digest\":\"sha256:{}\",\"size\":{size}}}",
                "a".repeat(64)
            )
        };
        // A 60-byte pack claiming a terabyte-sized object.
        let mut tiny = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        tiny.extend_from_slice(&[0xb0, 0x80, 0x80, 0x80, 0x80, 0x20]);
        tiny.extend_from_slice(&[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        tiny.resize(40, 0);
        let sum: [u8; 20] = sha1::Sha1::digest(&tiny).into();
        tiny.extend_from_slice(&sum);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (header(1 << 62, ""), "limit"),
            (header(u64::MAX, &blob(1)), "limit"),
            (
                header(10, &format!("{},{}", blob(u64::MAX), blob(1))),
                "overflow",
            ),
            (header(100, ""), "bytes follow it"),
            (
                header(0, &format!("{},{}", blob(1 << 40), blob(1 << 40))),
                "bytes follow it",
            ),
            (b"{\"from\":".to_vec(), "header"),
            (b"no newline at all".to_vec(), "header"),
            (header(tiny.len() as u64, ""), "pack"),
        ]
        .into_iter()
        .map(|(h, why)| {
            let mut body = MAGIC.to_vec();
            body.extend_from_slice(&h);
            if why == "pack" {
                body.extend_from_slice(&tiny);
            }
            (seal(&body), why)
        })
        .collect();
        for (i, (bytes, why)) in cases.iter().enumerate() {
            let p = d.path().join(format!("crafted-{i}.bundle"));
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", import(&b, &p).unwrap_err());
            assert!(e.contains(why), "case {i}: {e}");
            assert!(e.contains("nothing applied"), "case {i}: {e}");
            assert_eq!(b.head_and_state(), before);
        }
    }

    /// Hundreds of mutated bundles with a correct trailer: each imports or
    /// is refused; none panics or aborts.
    #[test]
    fn mutated_bundles_never_panic() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = two_nodes_one_change(d1.path(), d2.path());
        let mut good = Vec::new();
        export(&a, None, &mut good).unwrap();
        let body = &good[..good.len() - TRAILER as usize];
        let mut rng = crate::mutate::Rng::new(0x5eed_b0d1);
        let p = d2.path().join("m.bundle");
        for _ in 0..300 {
            let m = rng.mutate(body);
            std::fs::write(&p, seal(&m)).unwrap();
            let _ = import(&b, &p);
        }
    }
}
