//! API bearer tokens, node-local in `<data>/state/tokens.json`.
//!
//! A token is `apl_<id>_<secret>` (id: 8 hex, secret: 64 hex). Only its
//! SHA-256 is stored: `{"tokens":[{"id":"…","name":"…","sha256":"<hex of
//! the whole token>","created":<unix s>}]}`. The token's name is the author
//! of inventory commits made with it. The first token is created at first
//! start and printed once; later ones come from `appliance token create`.
//! The server re-reads the file when it changes, so tokens made or revoked
//! by the CLI take effect at once.
//!
//! Secrets come from the kernel's initialized random pool and never wait
//! for it ([`crate::entropy::secret`]): creating a token before the pool is
//! ready fails with [`crate::entropy::NotReady`]. `serve` creates the first
//! token in a background thread that waits for the pool; until an operator
//! token exists, every guarded request is refused with 503 `no_token_yet`
//! ([`refused`]), never let through.
//!
//! A token carries a scope (`"scope"`, absent in older files and then
//! `operator`): `read` tokens may read everything, `operator` tokens may
//! do anything the API guards but the `admin` routes, `admin` tokens (the
//! first token is one) everything;
//! `replica:<node_id>` tokens are issued to a child at replication and may
//! only call that child's own replica endpoints (check-in, sync). What a
//! scope may call is decided in one place, `crate::http::guard`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// Everything the API guards (the default, and every token made before
    /// scopes existed).
    #[default]
    Operator,
    /// Only the replica endpoints of this child node (check-in, sync).
    Replica(uuid::Uuid),
    /// Reads only (every read route, even with private reads).
    Read,
    /// Everything, including what only an administrator may do (tokens,
    /// the appliance's own power, settings).
    Admin,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Operator => f.write_str("operator"),
            Scope::Read => f.write_str("read"),
            Scope::Admin => f.write_str("admin"),
            Scope::Replica(id) => write!(f, "replica:{id}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "operator" => return Ok(Scope::Operator),
            "read" => return Ok(Scope::Read),
            "admin" => return Ok(Scope::Admin),
            _ => {}
        }
        match s.strip_prefix("replica:").map(uuid::Uuid::parse_str) {
            Some(Ok(id)) => Ok(Scope::Replica(id)),
            _ => Err(format!(
                "token scope {s:?}: expected \"read\", \"operator\", \"admin\" or \"replica:<uuid>\""
            )),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One stored token (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub sha256: String,
    pub created: i64,
    /// `operator` or `replica:<node_id>`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub scope: Scope,
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

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The answer to a request without a valid token: 401 with `message`, or
/// 503 `no_token_yet` while `tokens` holds no operator token at all (the
/// first one is still waiting for the kernel's random pool).
pub fn refused(tokens: Option<&TokenStore>, message: &str) -> crate::api::ApiError {
    if tokens.is_some_and(|t| !t.has_operator()) {
        return crate::api::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "no_token_yet",
            NO_TOKEN_YET,
        );
    }
    crate::api::ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "unauthorized",
        message,
    )
}

/// Why guarded requests are refused while no operator token exists.
pub const NO_TOKEN_YET: &str = "no API token exists yet: the first one is created and printed \
     on the console once the kernel's random pool is ready (a machine without a hardware RNG \
     may take minutes on its first boot); `appliance token create` on the node makes one";

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
            crate::state::write_atomic(path, &bytes, true, crate::state::Secrecy::Secret)?;
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
        self.create_scoped(name, Scope::Operator)
    }

    /// Creates a token named `name` with `scope`; returns the record and the
    /// secret token (shown once).
    pub fn create_scoped(&self, name: &str, scope: Scope) -> Result<(TokenRecord, String)> {
        crate::inventory::model::check_name(name).map_err(|e| anyhow::anyhow!("token name {e}"))?;
        let mut tokens = self.load()?;
        let id = crate::entropy::secret_hex(4)?;
        let token = format!("apl_{id}_{}", crate::entropy::secret_hex(32)?);
        let created = crate::inventory::status::now();
        let rec = TokenRecord {
            id,
            name: name.to_owned(),
            sha256: hash(&token),
            created,
            scope,
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

    /// Revokes every token of `scope`; returns how many (0 is not an error).
    pub fn revoke_scope(&self, scope: &Scope) -> Result<usize> {
        let mut tokens = self.load()?;
        let before = tokens.len();
        tokens.retain(|t| &t.scope != scope);
        let n = before - tokens.len();
        if n > 0 {
            self.save(tokens)?;
        }
        Ok(n)
    }

    /// The name and scope of the token `presented`, if valid.
    pub fn authenticate(&self, presented: &str) -> Option<(String, Scope)> {
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
        tokens
            .into_iter()
            .find(|t| t.sha256 == h)
            .map(|t| (t.name, t.scope))
    }

    /// Whether an operator token exists (an unreadable file counts as yes:
    /// requests are then refused with 401 like any bad token).
    pub fn has_operator(&self) -> bool {
        self.load()
            .map(|t| {
                t.iter()
                    .any(|t| matches!(t.scope, Scope::Operator | Scope::Admin))
            })
            .unwrap_or(true)
    }

    /// Creates the first token if there is none; returns it (to print once).
    /// Fails with [`crate::entropy::NotReady`] (inside the error) while the
    /// kernel's random pool is not initialized.
    pub fn ensure_first(&self) -> Result<Option<String>> {
        if let Some(p) = &self.path {
            if p.exists() {
                return Ok(None);
            }
        } else if !self.load()?.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.create_scoped("admin", Scope::Admin)?.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(store: &TokenStore, token: &str) -> Option<String> {
        store.authenticate(token).map(|(n, _)| n)
    }

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
        assert_eq!(name(&store, &first).as_deref(), Some("admin"));
        // Another process (the CLI) adds a token: seen without restart.
        let other = TokenStore::open(&path);
        let (rec, ci) = other.create("ci").unwrap();
        assert_eq!(name(&store, &ci).as_deref(), Some("ci"));
        other.revoke(&rec.id).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // mtime granularity: force a re-read through a fresh store too.
        assert_eq!(name(&TokenStore::open(&path), &ci), None);
        assert_eq!(name(&store, "apl_nope"), None);
        assert!(other.revoke("nobody").is_err());
    }

    #[test]
    fn guarded_requests_get_503_until_an_operator_token_exists() {
        use axum::http::StatusCode;
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("state/tokens.json"));
        let e = refused(Some(&store), "bad token");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "no_token_yet");
        // A replica token is not an operator token.
        store
            .create_scoped("replica-a", Scope::Replica(uuid::Uuid::nil()))
            .unwrap();
        assert_eq!(refused(Some(&store), "x").code, "no_token_yet");
        store.create("admin").unwrap();
        let e = refused(Some(&store), "bad token");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.message, "bad token");
        assert_eq!(refused(None, "x").status, StatusCode::UNAUTHORIZED);
        // An unreadable token file refuses with 401, like a bad token.
        std::fs::write(dir.path().join("state/tokens.json"), b"{not json").unwrap();
        let fresh = TokenStore::open(&dir.path().join("state/tokens.json"));
        assert_eq!(refused(Some(&fresh), "x").status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn old_token_files_load_as_operator_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let token = "apl_01234567_secret";
        std::fs::write(
            &path,
            format!(
                r#"{{"tokens":[{{"id":"01234567","name":"admin","sha256":"{}","created":1}}]}}"#,
                hash(token)
            ),
        )
        .unwrap();
        let store = TokenStore::open(&path);
        assert_eq!(name(&store, token).as_deref(), Some("admin"));
        assert_eq!(store.list().unwrap()[0].scope, Scope::Operator);
    }

    #[test]
    fn replica_tokens_are_not_operator_tokens() {
        let store = TokenStore::memory();
        let id = uuid::Uuid::new_v4();
        let (rec, t) = store
            .create_scoped("replica-a", Scope::Replica(id))
            .unwrap();
        assert!(
            !matches!(
                store.authenticate(&t),
                Some((_, Scope::Operator | Scope::Admin))
            ),
            "a replica token passed as operator"
        );
        let (name, scope) = store.authenticate(&t).unwrap();
        assert_eq!(name, "replica-a");
        assert_eq!(scope, Scope::Replica(id));
        // Round trip through JSON.
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["scope"], format!("replica:{id}"));
        let back: TokenRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back.scope, Scope::Replica(id));
        assert!("replica:nope".parse::<Scope>().is_err());
        assert_eq!(store.revoke_scope(&Scope::Replica(id)).unwrap(), 1);
        assert_eq!(store.authenticate(&t), None);
    }
}
