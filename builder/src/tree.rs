//! A file tree to put into an archive or filesystem: the one content model
//! shared by the cpio, FAT and ext4 writers.
//!
//! Paths are relative, `/`-separated and normalised (no empty, `.` or `..`
//! components, no NUL). Entries iterate in byte order of their path, so a
//! directory always comes before everything inside it and the same tree
//! always produces the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use crate::digest::{Digest, VerifyingReader};

/// Ownership, permissions and modification time of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`0o7777` at most).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
}

impl Meta {
    pub fn new(mode: u16, mtime: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime,
        }
    }
}

/// Where the bytes of a regular file come from.
#[derive(Clone, Debug)]
pub enum Content {
    /// Bytes held in memory.
    Bytes(Arc<[u8]>),
    /// A content-addressed blob on disk; verified against its digest while read.
    Blob {
        path: PathBuf,
        digest: Digest,
        size: u64,
    },
}

impl Content {
    pub fn bytes(b: impl Into<Vec<u8>>) -> Content {
        Content::Bytes(Arc::from(b.into().into_boxed_slice()))
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Blob { size, .. } => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open the content for reading. Blob content fails at end of input if
    /// its bytes do not match its digest and size.
    pub fn open(&self) -> io::Result<Box<dyn Read + Send + '_>> {
        match self {
            Content::Bytes(b) => Ok(Box::new(&b[..])),
            Content::Blob { path, digest, size } => {
                let f = File::open(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("opening blob {digest} at {}: {e}", path.display()),
                    )
                })?;
                Ok(Box::new(VerifyingReader::new(
                    io::BufReader::with_capacity(1 << 20, f),
                    *digest,
                    *size,
                    format!("blob {digest}"),
                )))
            }
        }
    }

    /// Read the whole content into memory (verified).
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.len() as usize);
        self.open()?.read_to_end(&mut v)?;
        Ok(v)
    }
}

/// What an entry is.
#[derive(Clone, Debug)]
pub enum Node {
    Dir,
    File(Content),
    /// A symbolic link to the given target (stored verbatim).
    Symlink(String),
    /// Another name for the regular file at the given tree path.
    Hardlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One path in the tree.
#[derive(Clone, Debug)]
pub struct Entry {
    pub meta: Meta,
    pub node: Node,
}

/// Why an entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("invalid path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("two entries for path {0:?}")]
    Duplicate(String),
    #[error("{path:?}: parent {parent:?} is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("hardlink {path:?} points to {target:?}, which is not a regular file in the tree")]
    BadHardlink { path: String, target: String },
    #[error("mode {mode:#o} of {path:?} has bits outside 0o7777")]
    BadMode { path: String, mode: u32 },
}

/// Normalise and check a relative path: strips one leading `./`, refuses
/// absolute paths, `..`, `.`, empty components, NUL bytes and names over 255 bytes.
pub fn normalize_path(path: &str) -> Result<String, TreeError> {
    let bad = |why| TreeError::BadPath {
        path: path.to_string(),
        why,
    };
    let p = path.strip_prefix("./").unwrap_or(path);
    if p.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if p.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() {
        return Err(bad("empty path"));
    }
    for c in p.split('/') {
        match c {
            "" => return Err(bad("empty path component")),
            "." => return Err(bad("`.` component")),
            ".." => return Err(bad("`..` component escapes the tree")),
            c if c.len() > 255 => return Err(bad("a component is longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(p.to_string())
}

/// The parent of a normalised path, or `None` at the top level.
pub fn parent_of(path: &str) -> Option<&str> {
    path.rfind('/').map(|i| &path[..i])
}

/// The last component of a normalised path.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A validated set of entries keyed by normalised path.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Add an entry. Missing parent directories are created with `dir_meta`.
    pub fn insert(&mut self, path: &str, entry: Entry, dir_meta: Meta) -> Result<(), TreeError> {
        let path = normalize_path(path)?;
        if entry.meta.mode > 0o7777 {
            return Err(TreeError::BadMode {
                path,
                mode: entry.meta.mode as u32,
            });
        }
        if let Some(existing) = self.entries.get(&path) {
            // An implicit or explicit directory may be re-declared as a directory
            // (the later metadata wins); anything else is a duplicate.
            if matches!(existing.node, Node::Dir) && matches!(entry.node, Node::Dir) {
                self.entries.insert(path, entry);
                return Ok(());
            }
            return Err(TreeError::Duplicate(path));
        }
        let mut p = parent_of(&path);
        while let Some(parent) = p {
            match self.entries.get(parent) {
                Some(Entry {
                    node: Node::Dir, ..
                }) => break,
                Some(_) => {
                    return Err(TreeError::ParentNotDir {
                        path: path.clone(),
                        parent: parent.to_string(),
                    })
                }
                None => {
                    self.entries.insert(
                        parent.to_string(),
                        Entry {
                            meta: dir_meta,
                            node: Node::Dir,
                        },
                    );
                }
            }
            p = parent_of(parent);
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Check cross-entry rules (hardlink targets) once the tree is complete.
    pub fn validate(&self) -> Result<(), TreeError> {
        for (path, e) in &self.entries {
            if let Node::Hardlink(target) = &e.node {
                let ok = normalize_path(target)
                    .ok()
                    .and_then(|t| self.entries.get(&t))
                    .is_some_and(|t| matches!(t.node, Node::File(_)));
                if !ok {
                    return Err(TreeError::BadHardlink {
                        path: path.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Entries in path byte order (parents before children).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Entries in depth-first order: each directory is followed by its whole
    /// subtree, children sorted by name. Writers that need a parent handle
    /// before a child (ext4, FAT) walk this order.
    pub fn walk(&self) -> Vec<(&str, &Entry)> {
        let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for k in self.entries.keys() {
            children
                .entry(parent_of(k).unwrap_or(""))
                .or_default()
                .push(k);
        }
        for v in children.values_mut() {
            v.sort_by(|a, b| file_name(a).cmp(file_name(b)));
        }
        let mut out = Vec::with_capacity(self.entries.len());
        let mut stack: Vec<&str> = children
            .get("")
            .map(|v| v.iter().rev().copied().collect())
            .unwrap_or_default();
        while let Some(p) = stack.pop() {
            out.push((p, &self.entries[p]));
            if let Some(c) = children.get(p) {
                stack.extend(c.iter().rev().copied());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of regular file sizes (hardlinks counted once).
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.node {
                Node::File(c) => c.len(),
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(s: &str) -> Entry {
        Entry {
            meta: Meta::new(0o644, 0),
            node: Node::File(Content::bytes(s.as_bytes())),
        }
    }

    #[test]
    fn paths_are_checked() {
        for bad in ["/etc", "a/../b", "..", "a//b", "a/./b", "", "a\0b"] {
            assert!(normalize_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(normalize_path("./a/b/").unwrap(), "a/b");
        assert!(normalize_path(&"x".repeat(256)).is_err());
    }

    #[test]
    fn parents_are_created_and_duplicates_refused() {
        let mut t = Tree::new();
        let d = Meta::new(0o755, 0);
        t.insert("a/b/c", file("x"), d).unwrap();
        assert!(matches!(t.get("a").unwrap().node, Node::Dir));
        assert!(matches!(t.get("a/b").unwrap().node, Node::Dir));
        assert_eq!(
            t.insert("a/b/c", file("y"), d),
            Err(TreeError::Duplicate("a/b/c".into()))
        );
        assert!(matches!(
            t.insert("a/b/c/d", file("y"), d),
            Err(TreeError::ParentNotDir { .. })
        ));
        // Re-declaring a directory updates its metadata.
        t.insert(
            "a",
            Entry {
                meta: Meta::new(0o700, 5),
                node: Node::Dir,
            },
            d,
        )
        .unwrap();
        assert_eq!(t.get("a").unwrap().meta.mode, 0o700);
    }

    #[test]
    fn hardlinks_must_name_files() {
        let mut t = Tree::new();
        let d = Meta::new(0o755, 0);
        t.insert("f", file("x"), d).unwrap();
        t.insert(
            "g",
            Entry {
                meta: d,
                node: Node::Hardlink("f".into()),
            },
            d,
        )
        .unwrap();
        t.validate().unwrap();
        t.insert(
            "h",
            Entry {
                meta: d,
                node: Node::Hardlink("nope".into()),
            },
            d,
        )
        .unwrap();
        assert!(matches!(t.validate(), Err(TreeError::BadHardlink { .. })));
    }

    #[test]
    fn walk_is_depth_first() {
        let mut t = Tree::new();
        let d = Meta::new(0o755, 0);
        for p in ["a-b", "a/z", "a/b/c", "b"] {
            t.insert(p, file(p), d).unwrap();
        }
        let order: Vec<_> = t.walk().into_iter().map(|(p, _)| p).collect();
        assert_eq!(order, ["a", "a/b", "a/b/c", "a/z", "a-b", "b"]);
    }
}
