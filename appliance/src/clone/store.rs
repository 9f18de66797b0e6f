//! Where capture chunks live: content-addressed blobs in
//! `<root>/blobs/sha256/<hex>` (hex = sha256 of the stored bytes, a zstd
//! frame), the same directory [`crate::sync`] moves between appliances,
//! so captures reach a parent with the next sync.
//!
//! Chunks are known by the sha256 of their *raw* bytes (what the disk
//! holds, what the writer verifies); an index
//! `<root>/cache/clone/chunks/<raw hex>` → `sha256:<blob hex>` says which
//! blob holds one. The index is a cache: every manifest lists both
//! digests, and [`DirStore::index_manifest`] re-enters them.
//!
//! Durability without an fsync per chunk: blobs are written and renamed
//! into place unsynced; [`ChunkStore::commit`] syncs the filesystem and
//! only then writes the index entries. After a crash an unsynced blob may
//! be short, but nothing points at it (and readers verify every blob's
//! digest), so the next capture stores it again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// A place chunks are looked up in and stored to.
pub trait ChunkStore: Send + Sync {
    /// The blob (`sha256:<hex>`) holding the chunk whose raw bytes have
    /// digest `raw` (`sha256:<hex>`), and its size, if stored.
    fn lookup(&self, raw: &str) -> Result<Option<(String, u64)>>;
    /// Stores a zstd `frame` whose content has digest `raw`; returns the
    /// blob digest. Idempotent.
    fn put(&self, raw: &str, frame: Vec<u8>) -> Result<String>;
    /// The stored frame of `blob`, verified against its name.
    fn get_blob(&self, blob: &str) -> Result<Vec<u8>>;
    /// Makes what was put durable and findable by [`ChunkStore::lookup`].
    fn commit(&self) -> Result<()> {
        Ok(())
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The 64 hex digits of a `sha256:` digest, or an error naming it.
pub fn hex_of(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => bail!("{digest:?} is not a sha256:<64 lowercase hex> digest"),
    }
}

/// Compresses a chunk (zstd `level`, one frame with its content size).
pub fn encode(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    zstd::bulk::compress(raw, level).context("compressing a chunk")
}

/// Decompresses a chunk frame that must hold exactly `len` bytes whose
/// digest is `raw`.
pub fn decode(frame: &[u8], len: u64, raw: &str) -> Result<Vec<u8>> {
    let data = zstd::bulk::decompress(frame, len as usize)
        .with_context(|| format!("decompressing chunk {raw}"))?;
    if data.len() as u64 != len {
        bail!(
            "chunk {raw} decompressed to {} bytes, expected {len}",
            data.len()
        );
    }
    let got = sha256(&data);
    if got != raw {
        bail!("chunk {raw} decompressed to different data ({got})");
    }
    Ok(data)
}

/// Chunks in a data directory (`<root>/blobs/sha256`, index under
/// `<root>/cache/clone/chunks`).
pub struct DirStore {
    root: PathBuf,
    /// Put since the last commit: raw hex → (blob digest, size).
    pending: Mutex<HashMap<String, (String, u64)>>,
}

impl DirStore {
    pub fn new(root: &Path) -> DirStore {
        DirStore {
            root: root.to_owned(),
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn index_dir(&self) -> PathBuf {
        self.root.join("cache/clone/chunks")
    }

    /// The path of a stored blob.
    pub fn blob_path(&self, blob: &str) -> Result<PathBuf> {
        Ok(self.blob_dir().join(hex_of(blob)?))
    }

    /// Stores arbitrary bytes (a manifest) as a blob, durably; returns its
    /// digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256(bytes);
        self.write_blob(hex_of(&digest)?, bytes, true)?;
        Ok(digest)
    }

    fn write_blob(&self, hex: &str, bytes: &[u8], sync: bool) -> Result<()> {
        let dest = self.blob_dir().join(hex);
        if dest.exists() {
            return Ok(());
        }
        let tmp_dir = self.root.join("blobs/partial");
        for d in [&tmp_dir, &self.blob_dir()] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .with_context(|| format!("creating a file in {}", tmp_dir.display()))?;
        tmp.write_all(bytes)
            .with_context(|| format!("writing blob {hex}"))?;
        if sync {
            tmp.as_file()
                .sync_data()
                .with_context(|| format!("syncing blob {hex}"))?;
        }
        tmp.persist(&dest)
            .with_context(|| format!("naming blob {}", dest.display()))?;
        Ok(())
    }

    /// Enters a manifest's chunks into the index (their blobs must exist).
    pub fn index_manifest(&self, m: &super::manifest::Manifest) -> Result<usize> {
        let mut n = 0;
        let dir = self.index_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for c in &m.chunks {
            let raw = hex_of(&c.digest)?;
            let path = dir.join(raw);
            if !path.exists() && self.blob_path(&c.blob)?.exists() {
                std::fs::write(&path, format!("{}\n", c.blob))
                    .with_context(|| format!("writing {}", path.display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every indexed raw digest with its blob (for agents' presence checks).
    pub fn known(&self) -> Result<Vec<(String, String, u64)>> {
        let mut out = Vec::new();
        let dir = self.index_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let raw = format!("sha256:{name}");
            if hex_of(&raw).is_err() {
                continue;
            }
            if let Ok(Some((blob, size))) = self.lookup(&raw) {
                out.push((raw, blob, size));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl ChunkStore for DirStore {
    fn lookup(&self, raw: &str) -> Result<Option<(String, u64)>> {
        let hex = hex_of(raw)?;
        if let Some(b) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hex)
        {
            return Ok(Some(b.clone()));
        }
        let text = match std::fs::read_to_string(self.index_dir().join(hex)) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        };
        let blob = text.trim();
        // A torn index entry or a blob removed since: not stored.
        if hex_of(blob).is_err() {
            return Ok(None);
        }
        match std::fs::metadata(self.blob_path(blob)?) {
            Ok(m) => Ok(Some((blob.to_owned(), m.len()))),
            Err(_) => Ok(None),
        }
    }

    fn put(&self, raw: &str, frame: Vec<u8>) -> Result<String> {
        let raw_hex = hex_of(raw)?.to_owned();
        let blob = sha256(&frame);
        self.write_blob(hex_of(&blob)?, &frame, false)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(raw_hex, (blob.clone(), frame.len() as u64));
        Ok(blob)
    }

    fn get_blob(&self, blob: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(blob)?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let got = sha256(&bytes);
        if got != blob {
            bail!("blob {} holds {got}: it is damaged", path.display());
        }
        Ok(bytes)
    }

    fn commit(&self) -> Result<()> {
        let pending: Vec<(String, (String, u64))> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let dir = self.blob_dir();
        let f = std::fs::File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
        rustix::fs::syncfs(&f).with_context(|| format!("syncing {}", dir.display()))?;
        let idx = self.index_dir();
        std::fs::create_dir_all(&idx).with_context(|| format!("creating {}", idx.display()))?;
        for (raw, (blob, _)) in pending {
            let path = idx.join(&raw);
            std::fs::write(&path, format!("{blob}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_lookup_commit_get() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::new(dir.path());
        let raw = vec![7u8; 100_000];
        let d = sha256(&raw);
        assert_eq!(s.lookup(&d).unwrap(), None);
        let blob = s.put(&d, encode(&raw, 1).unwrap()).unwrap();
        let size = std::fs::metadata(s.blob_path(&blob).unwrap())
            .unwrap()
            .len();
        assert_eq!(s.lookup(&d).unwrap(), Some((blob.clone(), size)));
        s.commit().unwrap();
        let s2 = DirStore::new(dir.path());
        assert_eq!(s2.lookup(&d).unwrap(), Some((blob.clone(), size)));
        assert_eq!(s2.known().unwrap(), vec![(d.clone(), blob.clone(), size)]);
        let frame = s2.get_blob(&blob).unwrap();
        assert_eq!(decode(&frame, raw.len() as u64, &d).unwrap(), raw);
        // A damaged blob is refused by name.
        std::fs::write(s2.blob_path(&blob).unwrap(), b"junk").unwrap();
        let e = s2.get_blob(&blob).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn decode_refuses_truncated_and_wrong_frames() {
        let raw = b"hello hello hello hello".repeat(100);
        let d = sha256(&raw);
        let f = encode(&raw, 3).unwrap();
        assert!(decode(&f[..f.len() / 2], raw.len() as u64, &d).is_err());
        assert!(decode(&f, raw.len() as u64 - 1, &d).is_err());
        let other = sha256(b"x");
        let e = decode(&f, raw.len() as u64, &other).unwrap_err();
        assert!(e.to_string().contains("different data"), "{e}");
        assert!(hex_of("sha256:ABC").is_err());
    }
}
