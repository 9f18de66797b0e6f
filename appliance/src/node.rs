//! Node identity: a random UUID created at first start and kept in
//! `<data>/state/node.json` as `{"node_id": "<uuid>"}`.
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

/// Returns the node id stored under `data`, creating it on first use.
pub fn load_or_create(data: &Path) -> Result<uuid::Uuid> {
    let path = data.join(NODE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let node: NodeFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?;
            return Ok(node.node_id);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    if !data.is_dir() {
        bail!("data directory {} does not exist", data.display());
    }
    let node = NodeFile {
        node_id: uuid::Uuid::new_v4(),
    };
    let dir = path.parent().expect("node file has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".node.json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut bytes = serde_json::to_vec_pretty(&node).context("encoding node file")?;
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
    Ok(node.node_id)
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
}
