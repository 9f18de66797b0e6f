//! Node identity: a random UUID created at first start and kept in
//! `<data>/state/node.json` as `{"node_id": "<uuid>"}`. It must be unique,
//! not secret (`/api/v1/version` shows it), so it never waits for the
//! kernel's random pool ([`crate::entropy::unique_uuid`]).
//!
//! The file is written to a temporary name, synced and renamed into place,
//! so a crash never leaves a half-written identity behind.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::contract::NODE_FILE;

/// The persisted identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    pub node_id: uuid::Uuid,
}

/// The node id stored under `data`, if the file exists.
pub fn load(data: &Path) -> Result<Option<uuid::Uuid>> {
    let path = data.join(NODE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let node: NodeFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?;
            Ok(Some(node.node_id))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Returns the node id stored under `data`, creating it on first use.
pub fn load_or_create(data: &Path) -> Result<uuid::Uuid> {
    load_or_create_with(data, None)
}

/// As [`load_or_create`], but a missing file is created with `wanted` (the
/// id a parent registered this node under) when given.
pub fn load_or_create_with(data: &Path, wanted: Option<uuid::Uuid>) -> Result<uuid::Uuid> {
    if let Some(id) = load(data)? {
        return Ok(id);
    }
    if !data.is_dir() {
        bail!("data directory {} does not exist", data.display());
    }
    let node = NodeFile {
        node_id: wanted.unwrap_or_else(crate::entropy::unique_uuid),
    };
    write(data, &node)?;
    Ok(node.node_id)
}

/// Writes `state/node.json` (temp + fsync + rename + directory fsync).
pub fn write(data: &Path, node: &NodeFile) -> Result<()> {
    let path = data.join(NODE_FILE);
    let dir = path.parent().expect("node file has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".node.json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut bytes = serde_json::to_vec_pretty(node).context("encoding node file")?;
    bytes.push(b'\n');
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // Make the rename durable too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.get_version_num(), 4);
        let text = std::fs::read_to_string(dir.path().join(NODE_FILE)).unwrap();
        let parsed: NodeFile = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.node_id, a);
        assert!(!dir.path().join("state/.node.json.tmp").exists());
    }

    #[test]
    fn missing_data_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_create(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err:#}");
    }

    #[test]
    fn corrupt_node_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join(NODE_FILE), b"{garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("parsing"), "{err:#}");
    }

    #[test]
    fn wanted_id_is_used_only_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let want = uuid::Uuid::new_v4();
        assert_eq!(load(dir.path()).unwrap(), None);
        assert_eq!(load_or_create_with(dir.path(), Some(want)).unwrap(), want);
        let other = uuid::Uuid::new_v4();
        assert_eq!(load_or_create_with(dir.path(), Some(other)).unwrap(), want);
    }
}
