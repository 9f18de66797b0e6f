//! Tree documents: a file tree named by one digest.
//!
//! A tree document is a JSON blob (media type
//! `application/vnd.appliance.tree.v1+json`) listing entries with their
//! metadata; regular files name their content by digest, so the document's
//! own digest pins every byte of the tree. The bundle stores Debian package
//! contents, the bundle snapshot and imported directories this way, and the
//! builder reads them through a [`BlobSource`].
//!
//! ```json
//! {"mediaType":"application/vnd.appliance.tree.v1+json","entries":[
//!   {"path":"lib/modules","type":"dir","mode":493,"uid":0,"gid":0,"mtime":0},
//!   {"path":"lib/x.ko","type":"file","mode":420,"uid":0,"gid":0,"mtime":0,
//!    "size":5,"digest":"sha256:…"},
//!   {"path":"bin/sh","type":"symlink","target":"busybox", …},
//!   {"path":"bin/ls","type":"hardlink","target":"bin/busybox", …},
//!   {"path":"dev/console","type":"char","major":5,"minor":1, …}]}
//! ```
//! Entries are sorted by path; `mtime` may be omitted (the build epoch is used).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::tree::{Content, Entry, Meta, Node, Tree, TreeError};

/// Media type of a tree document.
pub const MEDIA_TYPE: &str = "application/vnd.appliance.tree.v1+json";

/// Where the builder finds blobs by digest.
pub trait BlobSource {
    /// The blob with this digest, as verified-on-read content.
    fn blob(&self, digest: &Digest) -> Result<Content, BlobError>;
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} is not in the input store")]
    Missing(Digest),
    #[error("reading blob {digest}: {source}")]
    Io {
        digest: Digest,
        source: std::io::Error,
    },
}

/// A read-only view of an OCI-layout blob directory (`<root>/blobs/sha256/<hex>`).
/// The `bundle` crate writes stores; the builder only needs to read them.
#[derive(Debug, Clone)]
pub struct BlobDir {
    pub root: PathBuf,
}

impl BlobDir {
    pub fn new(root: impl Into<PathBuf>) -> BlobDir {
        BlobDir { root: root.into() }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }
}

impl BlobSource for BlobDir {
    fn blob(&self, digest: &Digest) -> Result<Content, BlobError> {
        let path = self.path(digest);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Content::Blob {
                path,
                digest: *digest,
                size: m.len(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::Missing(*digest)),
            Err(source) => Err(BlobError::Io {
                digest: *digest,
                source,
            }),
        }
    }
}

/// Several blob sources searched in order: the first that has a blob wins
/// (e.g. a writable scratch store first, then a read-only bundle).
pub struct Layered<'a>(pub Vec<&'a dyn BlobSource>);

impl BlobSource for Layered<'_> {
    fn blob(&self, digest: &Digest) -> Result<Content, BlobError> {
        for s in &self.0 {
            match s.blob(digest) {
                Err(BlobError::Missing(_)) => continue,
                other => return other,
            }
        }
        Err(BlobError::Missing(*digest))
    }
}

/// Blobs held in memory (tests, generated content).
#[derive(Debug, Default, Clone)]
pub struct MemBlobs(pub HashMap<Digest, Content>);

impl MemBlobs {
    pub fn put(&mut self, bytes: impl Into<Vec<u8>>) -> Digest {
        let b = bytes.into();
        let d = Digest::of(&b);
        self.0.insert(d, Content::bytes(b));
        d
    }
}

impl BlobSource for MemBlobs {
    fn blob(&self, digest: &Digest) -> Result<Content, BlobError> {
        self.0
            .get(digest)
            .cloned()
            .ok_or(BlobError::Missing(*digest))
    }
}

/// A tree document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeFile {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub entries: Vec<TreeFileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeFileEntry {
    pub path: String,
    #[serde(flatten)]
    pub kind: TreeFileKind,
    pub mode: u16,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TreeFileKind {
    Dir,
    File { size: u64, digest: Digest },
    Symlink { target: String },
    Hardlink { target: String },
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeFileError {
    #[error("tree document {digest}: {source}")]
    Blob { digest: Digest, source: BlobError },
    #[error("tree document {digest} is not valid JSON: {source}")]
    Json {
        digest: Digest,
        source: serde_json::Error,
    },
    #[error("tree document {digest} has media type {found:?}, expected {MEDIA_TYPE}")]
    MediaType { digest: Digest, found: String },
    #[error("tree document {digest}: entry {path:?}: {source}")]
    Entry {
        digest: Digest,
        path: String,
        source: TreeError,
    },
    #[error(
        "tree document {digest}: file {path:?} is {declared} bytes but its blob {blob} is {actual}"
    )]
    SizeMismatch {
        digest: Digest,
        path: String,
        blob: Digest,
        declared: u64,
        actual: u64,
    },
    #[error("reading tree document {digest}: {source}")]
    Io {
        digest: Digest,
        source: std::io::Error,
    },
}

impl TreeFile {
    pub fn new(mut entries: Vec<TreeFileEntry>) -> TreeFile {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        TreeFile {
            media_type: MEDIA_TYPE.to_string(),
            entries,
        }
    }

    /// Canonical bytes: entries sorted, compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut t = self.clone();
        t.entries.sort_by(|a, b| a.path.cmp(&b.path));
        serde_json::to_vec(&t).expect("tree documents always serialise")
    }

    /// Load the tree document `digest` from `blobs`.
    pub fn load(blobs: &dyn BlobSource, digest: &Digest) -> Result<TreeFile, TreeFileError> {
        let c = blobs.blob(digest).map_err(|source| TreeFileError::Blob {
            digest: *digest,
            source,
        })?;
        let bytes = c.read_all().map_err(|source| TreeFileError::Io {
            digest: *digest,
            source,
        })?;
        let t: TreeFile = serde_json::from_slice(&bytes).map_err(|source| TreeFileError::Json {
            digest: *digest,
            source,
        })?;
        if t.media_type != MEDIA_TYPE {
            return Err(TreeFileError::MediaType {
                digest: *digest,
                found: t.media_type,
            });
        }
        Ok(t)
    }

    /// Add the entries under `subdir` (all when `None`) to `tree` beneath
    /// `prefix` ("" for the root). Missing parents get `dir_meta`.
    pub fn add_to(
        &self,
        digest: &Digest,
        blobs: &dyn BlobSource,
        tree: &mut Tree,
        prefix: &str,
        subdir: Option<&str>,
        dir_meta: Meta,
    ) -> Result<(), TreeFileError> {
        let err = |path: &str, source| TreeFileError::Entry {
            digest: *digest,
            path: path.to_string(),
            source,
        };
        let subdir = subdir
            .map(|s| s.trim_matches('/'))
            .filter(|s| !s.is_empty());
        let place = |p: &str| -> Option<String> {
            let rel = match subdir {
                None => p,
                Some(s) => p.strip_prefix(s)?.strip_prefix('/')?,
            };
            Some(if prefix.is_empty() {
                rel.to_string()
            } else {
                format!("{prefix}/{rel}")
            })
        };
        for e in &self.entries {
            let Some(path) = place(&e.path) else { continue };
            let meta = Meta {
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime.unwrap_or(dir_meta.mtime),
            };
            let node = match &e.kind {
                TreeFileKind::Dir => Node::Dir,
                TreeFileKind::File { size, digest: d } => {
                    let c = blobs.blob(d).map_err(|source| TreeFileError::Blob {
                        digest: *digest,
                        source,
                    })?;
                    if c.len() != *size {
                        return Err(TreeFileError::SizeMismatch {
                            digest: *digest,
                            path: e.path.clone(),
                            blob: *d,
                            declared: *size,
                            actual: c.len(),
                        });
                    }
                    Node::File(c)
                }
                TreeFileKind::Symlink { target } => Node::Symlink(target.clone()),
                TreeFileKind::Hardlink { target } => match place(target) {
                    Some(t) => Node::Hardlink(t),
                    // A link to a file outside the selected subtree: copy it.
                    None => {
                        let Some(TreeFileKind::File { digest: d, .. }) = self
                            .entries
                            .iter()
                            .find(|x| &x.path == target)
                            .map(|x| &x.kind)
                        else {
                            return Err(err(
                                &e.path,
                                TreeError::BadHardlink {
                                    path: e.path.clone(),
                                    target: target.clone(),
                                },
                            ));
                        };
                        Node::File(blobs.blob(d).map_err(|source| TreeFileError::Blob {
                            digest: *digest,
                            source,
                        })?)
                    }
                },
                TreeFileKind::Char { major, minor } => Node::CharDevice {
                    major: *major,
                    minor: *minor,
                },
                TreeFileKind::Block { major, minor } => Node::BlockDevice {
                    major: *major,
                    minor: *minor,
                },
                TreeFileKind::Fifo => Node::Fifo,
            };
            tree.insert(&path, Entry { meta, node }, dir_meta)
                .map_err(|source| err(&e.path, source))?;
        }
        Ok(())
    }
}

/// Describe a host directory as a tree document. Regular files are handed to
/// `put`, which stores them and returns their digest. Entries are visited in
/// sorted order; metadata is taken from the files except `mtime`, which is
/// left unset (the build epoch applies) so the result does not depend on
/// when the files were written. Hardlinks within the directory are kept.
pub fn import_dir(
    dir: &std::path::Path,
    put: &mut dyn FnMut(&std::path::Path) -> std::io::Result<Digest>,
) -> std::io::Result<TreeFile> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut entries = Vec::new();
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&abs)?.collect::<Result<_, _>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().into_string().map_err(|n| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("non-UTF-8 file name {n:?} in {}", abs.display()),
                )
            })?;
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(e.path())?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push((e.path(), path.clone()));
                TreeFileKind::Dir
            } else if ft.is_symlink() {
                let t = std::fs::read_link(e.path())?;
                TreeFileKind::Symlink {
                    target: t.to_string_lossy().into_owned(),
                }
            } else if ft.is_file() {
                match links.get(&(md.dev(), md.ino())) {
                    Some(first) if md.nlink() > 1 => TreeFileKind::Hardlink {
                        target: first.clone(),
                    },
                    _ => {
                        if md.nlink() > 1 {
                            links.insert((md.dev(), md.ino()), path.clone());
                        }
                        TreeFileKind::File {
                            size: md.len(),
                            digest: put(&e.path())?,
                        }
                    }
                }
            } else if ft.is_char_device() || ft.is_block_device() {
                let (major, minor) = (
                    (md.rdev() >> 8) as u32 & 0xfff,
                    (md.rdev() & 0xff) as u32 | ((md.rdev() >> 12) as u32 & !0xff),
                );
                if ft.is_char_device() {
                    TreeFileKind::Char { major, minor }
                } else {
                    TreeFileKind::Block { major, minor }
                }
            } else if ft.is_fifo() {
                TreeFileKind::Fifo
            } else {
                continue; // sockets cannot be stored
            };
            entries.push(TreeFileEntry {
                path,
                kind,
                mode: (md.mode() & 0o7777) as u16,
                uid: md.uid(),
                gid: md.gid(),
                mtime: None,
            });
        }
    }
    Ok(TreeFile::new(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_placement() {
        let mut blobs = MemBlobs::default();
        let d = blobs.put(b"hello".to_vec());
        let tf = TreeFile::new(vec![
            TreeFileEntry {
                path: "lib/modules/6.1/a.ko".into(),
                kind: TreeFileKind::File { size: 5, digest: d },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: Some(7),
            },
            TreeFileEntry {
                path: "lib/modules/6.1/b.ko".into(),
                kind: TreeFileKind::Hardlink {
                    target: "lib/modules/6.1/a.ko".into(),
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: None,
            },
            TreeFileEntry {
                path: "boot/vmlinuz".into(),
                kind: TreeFileKind::Symlink { target: "x".into() },
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: None,
            },
        ]);
        let bytes = tf.to_bytes();
        let td = blobs.put(bytes.clone());
        let back = TreeFile::load(&blobs, &td).unwrap();
        assert_eq!(back, tf);
        assert!(String::from_utf8(bytes)
            .unwrap()
            .contains(r#""type":"file","size":5"#));

        let mut t = Tree::new();
        back.add_to(
            &td,
            &blobs,
            &mut t,
            "usr",
            Some("lib/modules"),
            Meta::new(0o755, 9),
        )
        .unwrap();
        t.validate().unwrap();
        assert!(matches!(t.get("usr/6.1/a.ko").unwrap().node, Node::File(_)));
        assert!(
            matches!(&t.get("usr/6.1/b.ko").unwrap().node, Node::Hardlink(p) if p == "usr/6.1/a.ko")
        );
        assert!(t.get("usr/vmlinuz").is_none());
        assert_eq!(t.get("usr/6.1/b.ko").unwrap().meta.mtime, 9);
    }

    #[test]
    fn missing_blob_and_bad_size_are_named() {
        let mut blobs = MemBlobs::default();
        let d = blobs.put(b"hello".to_vec());
        let tf = TreeFile::new(vec![TreeFileEntry {
            path: "f".into(),
            kind: TreeFileKind::File { size: 4, digest: d },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: None,
        }]);
        let td = blobs.put(tf.to_bytes());
        let e = tf
            .add_to(&td, &blobs, &mut Tree::new(), "", None, Meta::new(0o755, 0))
            .unwrap_err();
        assert!(e.to_string().contains("\"f\" is 4 bytes"), "{e}");
        let missing = Digest::of(b"nope");
        let e = TreeFile::load(&blobs, &missing).unwrap_err();
        assert!(e.to_string().contains("not in the input store"), "{e}");
    }
}
