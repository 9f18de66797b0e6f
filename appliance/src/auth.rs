//! API bearer tokens, node-local in `<data>/state/tokens.json`.
//!
//! A token is `apl_<id>_<secret>` (id: 8 hex, secret: 64 hex). Only its
//! SHA-256 is stored: `{"tokens":[{"id":"…","name":"…","sha256":"<hex of
//! the whole token>","created":<unix s>}]}`. The token's name is the author
//! of inventory commits made with it. The first token is created at first
//! start and printed once; later ones come from `appliance token create`.
//! The server re-reads the file when it changes, so tokens made or revoked
//! by the CLI take effect at once.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// One stored token (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub sha256: String,
    pub created: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// The token file, cached and re-read when its modification time changes.
pub struct TokenStore {
    path: Option<PathBuf>,
    cache: Mutex<(Option<SystemTime>, Vec<TokenRecord>)>,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut out = String::new();
    while out.len() < bytes * 2 {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    out.truncate(bytes * 2);
    out
}

impl TokenStore {
    /// Tokens in `path` (created on first write).
    pub fn open(path: &Path) -> Self {
        Self {
            path: Some(path.to_owned()),
            cache: Mutex::new((None, Vec::new())),
        }
    }

    /// Tokens in memory only (tests).
    pub fn memory() -> Self {
        Self {
            path: None,
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn load(&self) -> Result<Vec<TokenRecord>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = &self.path else {
            return Ok(cache.1.clone());
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == cache.0 {
            return Ok(cache.1.clone());
        }
        let tokens = match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice::<TokenFile>(&b)
                    .with_context(|| format!("parsing {}", path.display()))?
                    .tokens
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        *cache = (mtime, tokens.clone());
        Ok(tokens)
    }

    fn save(&self, tokens: Vec<TokenRecord>) -> Result<()> {
        if let Some(path) = &self.path {
            let mut bytes = serde_json::to_vec_pretty(&TokenFile {
                tokens: tokens.clone(),
            })?;
            bytes.push(b'\n');
            crate::inventory::git::write_atomic(path, &bytes, true)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("restricting {}", path.display()))?;
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        *cache = (None, tokens);
        Ok(())
    }

    /// Every token record.
    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        self.load()
    }

    /// Creates a token named `name`; returns the record and the secret
    /// token (shown once).
    pub fn create(&self, name: &str) -> Result<(TokenRecord, String)> {
        crate::inventory::model::check_name(name).map_err(|e| anyhow::anyhow!("token name {e}"))?;
        let mut tokens = self.load()?;
        let id = random_hex(4);
        let token = format!("apl_{id}_{}", random_hex(32));
        let created = crate::inventory::status::now();
        let rec = TokenRecord {
            id,
            name: name.to_owned(),
            sha256: hash(&token),
            created,
        };
        tokens.push(rec.clone());
        self.save(tokens)?;
        Ok((rec, token))
    }

    /// Revokes tokens by id or name; returns how many.
    pub fn revoke(&self, id_or_name: &str) -> Result<usize> {
        let mut tokens = self.load()?;
        let before = tokens.len();
        tokens.retain(|t| t.id != id_or_name && t.name != id_or_name);
        let n = before - tokens.len();
        if n == 0 {
            bail!("no token with id or name {id_or_name:?}");
        }
        self.save(tokens)?;
        Ok(n)
    }

    /// The name of the token `presented`, if valid.
    pub fn verify(&self, presented: &str) -> Option<String> {
        let tokens = match self.load() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "token file unreadable; refusing writes"
                );
                return None;
            }
        };
        let h = hash(presented.trim());
        tokens.into_iter().find(|t| t.sha256 == h).map(|t| t.name)
    }

    /// Creates the first token if there is none; returns it (to print once).
    pub fn ensure_first(&self) -> Result<Option<String>> {
        if let Some(p) = &self.path {
            if p.exists() {
                return Ok(None);
            }
        } else if !self.load()?.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.create("admin")?.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tokens.json");
        let store = TokenStore::open(&path);
        let first = store.ensure_first().unwrap().unwrap();
        assert!(store.ensure_first().unwrap().is_none());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&first), "secret stored in clear");
        assert!(text.contains(&hash(&first)));
        assert_eq!(store.verify(&first).as_deref(), Some("admin"));
        // Another process (the CLI) adds a token: seen without restart.
        let other = TokenStore::open(&path);
        let (rec, ci) = other.create("ci").unwrap();
        assert_eq!(store.verify(&ci).as_deref(), Some("ci"));
        other.revoke(&rec.id).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // mtime granularity: force a re-read through a fresh store too.
        assert_eq!(TokenStore::open(&path).verify(&ci), None);
        assert_eq!(store.verify("apl_nope"), None);
        assert!(other.revoke("nobody").is_err());
    }
}
