//! The registry of this node's children (replicas), node-local in
//! `<data>/state/replicas.json`, and its API under `/api/v1/replicas`.
//!
//! Registering a child (`POST /api/v1/replicas`, operator token, or
//! [`Replicas::register`] in-process from the installer) creates its record
//! and a token scoped `replica:<node_id>`; the token is returned once and
//! only its hash is kept (`state/tokens.json`). The child then checks in
//! (`POST /api/v1/replicas/{node_id}/checkin`) with that token, and later
//! syncs with it. Registering an id that is already known issues a new token
//! and revokes the old one (an installer retry), keeping the record.
//!
//! File format (pretty JSON, written temp + fsync + rename):
//! `{"replicas":[{"node_id","name","mac","status","release","image_digest",
//! "url","registered","last_contact","token_id"}]}`; `registered` and
//! `last_contact` are Unix seconds, absent values are `null`. The API lists
//! the same fields without `token_id`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::ApiError;
use crate::auth::{Scope, TokenStore};
use crate::events::Events;
use crate::http::{Guard, Route};

/// Where the registry lives inside the data directory.
pub const REPLICAS_FILE: &str = "state/replicas.json";

/// One child as the API lists it (never its token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub node_id: Uuid,
    pub name: Option<String>,
    pub mac: Option<String>,
    /// `registered` until the child first checks in, then what it reports
    /// (default `running`).
    pub status: String,
    pub release: Option<String>,
    pub image_digest: Option<String>,
    /// Where the child's API is reachable, as it reported.
    pub url: Option<String>,
    /// Unix seconds.
    pub registered: i64,
    /// Unix seconds of the last check-in.
    pub last_contact: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    replica: Replica,
    token_id: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ReplicaFile {
    replicas: Vec<Stored>,
}

/// What registering a child returns (the token is shown only here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub node_id: Uuid,
    pub token: String,
    pub parent_node_id: Uuid,
}

/// The body of `POST /api/v1/replicas`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub node_id: Option<Uuid>,
}

/// The body of a child's check-in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    pub release: Option<String>,
    #[serde(default)]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no replica with node id {0}")]
    NotFound(Uuid),
    #[error("storing the replica registry: {0:#}")]
    Storage(anyhow::Error),
}

impl From<ReplicaError> for ApiError {
    fn from(e: ReplicaError) -> Self {
        let (status, code) = match &e {
            ReplicaError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ReplicaError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ReplicaError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_failed"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// The registry, shared by the API and the installer.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    file: Option<PathBuf>,
    map: Mutex<BTreeMap<Uuid, Stored>>,
    tokens: Arc<TokenStore>,
    /// This node's id: the children's parent.
    node_id: Uuid,
    events: Events,
    /// Only the unit tests' router reads it: in `serve` the route guard
    /// takes it from the serve options.
    #[cfg_attr(not(test), allow(dead_code))]
    public_reads: bool,
}

fn now() -> i64 {
    crate::inventory::status::now()
}

fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), ReplicaError> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(ReplicaError::Invalid {
            field,
            message: format!("{v:?}: 1-{max} printable characters"),
        });
    }
    Ok(())
}

impl Replicas {
    /// The registry of the node `node_id` whose data directory is `data`.
    pub fn open(
        data: &Path,
        tokens: Arc<TokenStore>,
        node_id: Uuid,
        events: Events,
        public_reads: bool,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = data.join(REPLICAS_FILE);
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<ReplicaFile>(&b)
                .with_context(|| format!("parsing {}", path.display()))?
                .replicas
                .into_iter()
                .map(|s| (s.replica.node_id, s))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self::new(
            Some(path),
            map,
            tokens,
            node_id,
            events,
            public_reads,
        ))
    }

    /// A registry in memory only (tests).
    pub fn memory(tokens: Arc<TokenStore>, node_id: Uuid, events: Events) -> Self {
        Self::new(None, BTreeMap::new(), tokens, node_id, events, true)
    }

    fn new(
        file: Option<PathBuf>,
        map: BTreeMap<Uuid, Stored>,
        tokens: Arc<TokenStore>,
        node_id: Uuid,
        events: Events,
        public_reads: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                file,
                map: Mutex::new(map),
                tokens,
                node_id,
                events,
                public_reads,
            }),
        }
    }

    /// This node's id (what children record as their parent).
    pub fn node_id(&self) -> Uuid {
        self.inner.node_id
    }

    /// The token store the scoped tokens live in.
    pub fn tokens(&self) -> &Arc<TokenStore> {
        &self.inner.tokens
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, Stored>> {
        self.inner.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, map: &BTreeMap<Uuid, Stored>) -> Result<(), ReplicaError> {
        let Some(path) = &self.inner.file else {
            return Ok(());
        };
        let file = ReplicaFile {
            replicas: map.values().cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| ReplicaError::Storage(anyhow::Error::new(e)))?;
        bytes.push(b'\n');
        crate::state::write_atomic(path, &bytes, true, crate::state::Secrecy::Public)
            .map_err(|e| ReplicaError::Storage(anyhow::Error::new(e)))
    }

    /// Registers a child (a new random id when `node_id` is `None`) and
    /// issues its scoped token. Registering a known id again issues a new
    /// token and revokes the old one.
    pub fn register(
        &self,
        name: Option<&str>,
        mac: Option<&str>,
        node_id: Option<Uuid>,
    ) -> Result<Registration, ReplicaError> {
        if let Some(n) = name {
            check_text("name", n, 128)?;
        }
        let mac = mac
            .map(|m| {
                crate::inventory::model::normalize_mac(m).map_err(|message| ReplicaError::Invalid {
                    field: "mac",
                    message,
                })
            })
            .transpose()?;
        let node_id = node_id.unwrap_or_else(Uuid::new_v4);
        if node_id == self.inner.node_id {
            return Err(ReplicaError::Invalid {
                field: "node_id",
                message: "a node cannot be its own replica".into(),
            });
        }
        let mut map = self.lock();
        let scope = Scope::Replica(node_id);
        // Old tokens of this id die with the new registration.
        self.inner
            .tokens
            .revoke_scope(&scope)
            .map_err(ReplicaError::Storage)?;
        let (rec, token) = self
            .inner
            .tokens
            .create_scoped(&format!("replica-{node_id}"), scope)
            .map_err(ReplicaError::Storage)?;
        let mut next = map.clone();
        let entry = next.entry(node_id).or_insert_with(|| Stored {
            replica: Replica {
                node_id,
                name: None,
                mac: None,
                status: "registered".into(),
                release: None,
                image_digest: None,
                url: None,
                registered: now(),
                last_contact: None,
            },
            token_id: String::new(),
        });
        if name.is_some() {
            entry.replica.name = name.map(str::to_owned);
        }
        if mac.is_some() {
            entry.replica.mac = mac.clone();
        }
        entry.token_id = rec.id.clone();
        if let Err(e) = self.save(&next) {
            let _ = self.inner.tokens.revoke(&rec.id);
            return Err(e);
        }
        *map = next;
        drop(map);
        self.inner.events.publish(
            "replica.registered",
            mac.as_deref(),
            serde_json::json!({"node_id": node_id, "name": name}),
        );
        Ok(Registration {
            node_id,
            token,
            parent_node_id: self.inner.node_id,
        })
    }

    /// Every registered child, by node id.
    pub fn list(&self) -> Vec<Replica> {
        self.lock().values().map(|s| s.replica.clone()).collect()
    }

    /// One child.
    pub fn get(&self, node_id: &Uuid) -> Option<Replica> {
        self.lock().get(node_id).map(|s| s.replica.clone())
    }

    /// Records a child's check-in and publishes `replica.checkin`.
    pub fn checkin(&self, node_id: Uuid, c: CheckinRequest) -> Result<Replica, ReplicaError> {
        for (field, v) in [
            ("release", &c.release),
            ("image_digest", &c.image_digest),
            ("url", &c.url),
            ("status", &c.status),
        ] {
            if let Some(v) = v {
                check_text(field, v, 512)?;
            }
        }
        let mut map = self.lock();
        let mut next = map.clone();
        let s = next
            .get_mut(&node_id)
            .ok_or(ReplicaError::NotFound(node_id))?;
        let r = &mut s.replica;
        if c.release.is_some() {
            r.release = c.release.clone();
        }
        if c.image_digest.is_some() {
            r.image_digest = c.image_digest.clone();
        }
        if c.url.is_some() {
            r.url = c.url.clone();
        }
        r.status = c.status.clone().unwrap_or_else(|| "running".into());
        r.last_contact = Some(now());
        let out = r.clone();
        self.save(&next)?;
        *map = next;
        drop(map);
        self.inner.events.publish(
            "replica.checkin",
            out.mac.as_deref(),
            serde_json::json!({
                "node_id": node_id,
                "release": out.release,
                "url": out.url,
                "status": out.status,
            }),
        );
        Ok(out)
    }

    /// The child registered with `mac` (normalised), if any.
    pub fn by_mac(&self, mac: &str) -> Option<Replica> {
        let mac = crate::inventory::model::normalize_mac(mac).ok()?;
        self.lock()
            .values()
            .find(|s| s.replica.mac.as_deref() == Some(mac.as_str()))
            .map(|s| s.replica.clone())
    }

    /// Registers the machine with `mac` for an install: the known replica
    /// of that MAC (issuing it a fresh token), else a new one.
    pub fn register_for_install(&self, mac: &str) -> Result<Registration, ReplicaError> {
        let known = self.by_mac(mac);
        let name = known.as_ref().and_then(|r| r.name.clone());
        self.register(name.as_deref(), Some(mac), known.map(|r| r.node_id))
    }

    /// Sets a child's status (install progress; not a check-in, so
    /// `last_contact` stays). Unknown ids and storage errors are logged.
    pub fn set_status(&self, node_id: &str, status: &str) {
        let Ok(id) = node_id.parse::<Uuid>() else {
            return;
        };
        let mut map = self.lock();
        let mut next = map.clone();
        let Some(s) = next.get_mut(&id) else {
            return;
        };
        s.replica.status = status.chars().take(512).collect();
        match self.save(&next) {
            Ok(()) => *map = next,
            Err(e) => tracing::error!(error = %e, "saving a replica status failed"),
        }
    }

    /// Forgets a child and revokes its tokens.
    pub fn remove(&self, node_id: Uuid) -> Result<Replica, ReplicaError> {
        let mut map = self.lock();
        let mut next = map.clone();
        let gone = next
            .remove(&node_id)
            .ok_or(ReplicaError::NotFound(node_id))?;
        self.save(&next)?;
        *map = next;
        drop(map);
        self.inner
            .tokens
            .revoke_scope(&Scope::Replica(node_id))
            .map_err(ReplicaError::Storage)?;
        self.inner.events.publish(
            "replica.removed",
            gone.replica.mac.as_deref(),
            serde_json::json!({"node_id": node_id}),
        );
        Ok(gone.replica)
    }
}

type S = State<Replicas>;

fn parse_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{s:?} is not a node id: {e}"),
        )
    })
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("request body: {e}"),
        )
    })
}

/// The registry's routes.
pub fn routes(replicas: Replicas) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/replicas",
            Guard::Read,
            "Children of this appliance: status, release, last contact",
        )
        .response("[Object]")
        .to(list, replicas.clone()),
        Route::post(
            "/api/v1/replicas",
            Guard::Operator,
            "Register a child (name, MAC): returns its node id and replica token",
        )
        .request("Object")
        .response("Object")
        .creates()
        .to(register, replicas.clone()),
        Route::get("/api/v1/replicas/{node_id}", Guard::Read, "One child")
            .response("Object")
            .to(show, replicas.clone()),
        Route::delete(
            "/api/v1/replicas/{node_id}",
            Guard::Operator,
            "Remove a child and revoke its token",
        )
        .response("Object")
        .to(remove, replicas.clone()),
        Route::post(
            "/api/v1/replicas/{node_id}/checkin",
            Guard::Replica,
            "A child's check-in (its own replica token)",
        )
        .request("Object")
        .response("Object")
        .to(checkin, replicas.clone()),
        Route::get(
            "/api/v1/replicas/{node_id}/token",
            Guard::Replica,
            "The scope of the presented token (a child checks it holds its own replica token)",
        )
        .response("Object")
        .to(token_scope, replicas),
    ]
}

async fn token_scope(caller: crate::http::Caller) -> Json<serde_json::Value> {
    let scope = match &caller.role {
        crate::http::Role::Token { scope, .. } => scope.to_string(),
        _ => "none".into(),
    };
    Json(serde_json::json!({"name": caller.name(), "scope": scope}))
}

#[cfg(test)]
pub fn router(replicas: Replicas) -> Router {
    let auth = crate::http::Auth::new(Some(replicas.tokens().clone()), replicas.inner.public_reads);
    crate::http::build(routes(replicas), auth)
}

async fn register(
    State(r): S,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Registration>), ApiError> {
    let req: RegisterRequest = json_body(&body)?;
    let reg = r.register(req.name.as_deref(), req.mac.as_deref(), req.node_id)?;
    Ok((StatusCode::CREATED, Json(reg)))
}

async fn list(
    State(r): S,
    page: crate::http::PageParams,
) -> Result<Json<crate::http::Paged<Replica>>, ApiError> {
    Ok(Json(page.page(r.list(), |r| r.node_id.to_string())))
}

async fn show(State(r): S, UrlPath(id): UrlPath<String>) -> Result<Json<Replica>, ApiError> {
    let id = parse_id(&id)?;
    r.get(&id)
        .map(Json)
        .ok_or_else(|| ReplicaError::NotFound(id).into())
}

async fn checkin(
    State(r): S,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Replica>, ApiError> {
    let id = parse_id(&id)?;
    let req: CheckinRequest = json_body(&body)?;
    Ok(Json(r.checkin(id, req)?))
}

async fn remove(State(r): S, UrlPath(id): UrlPath<String>) -> Result<Json<Replica>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(r.remove(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn setup(dir: &Path) -> (Replicas, String, Events) {
        let tokens = Arc::new(TokenStore::open(&dir.join("state/tokens.json")));
        let op = tokens.create("admin").unwrap().1;
        let events = Events::new();
        let r = Replicas::open(dir, tokens, Uuid::new_v4(), events.clone(), true).unwrap();
        (r, op, events)
    }

    async fn call(
        r: &Replicas,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let req = req
            .header("Content-Type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router(r.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn register_checkin_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (r, op, events) = setup(dir.path());
        // No token, then operator token.
        let (s, _) = call(&r, "POST", "/api/v1/replicas", None, serde_json::json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, reg) = call(
            &r,
            "POST",
            "/api/v1/replicas",
            Some(&op),
            serde_json::json!({"name": "child-1", "mac": "52-54-00-AA-BB-CC"}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{reg}");
        assert_eq!(reg["parent_node_id"], r.node_id().to_string());
        let child: Uuid = reg["node_id"].as_str().unwrap().parse().unwrap();
        let token = reg["token"].as_str().unwrap().to_owned();
        // The child's token is not an operator token.
        let (s, _) = call(
            &r,
            "POST",
            "/api/v1/replicas",
            Some(&token),
            serde_json::json!({}),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(!matches!(
            r.tokens().authenticate(&token),
            Some((_, Scope::Operator | Scope::Admin))
        ));
        // A second child cannot check in for the first.
        let other = r.register(None, None, None).unwrap();
        let url = format!("/api/v1/replicas/{child}/checkin");
        let (s, _) = call(&r, "POST", &url, Some(&other.token), serde_json::json!({})).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, rec) = call(
            &r,
            "POST",
            &url,
            Some(&token),
            serde_json::json!({"release": "sha256:aa", "url": "http://127.0.0.1:9"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{rec}");
        assert_eq!(rec["status"], "running");
        assert!(rec["last_contact"].as_i64().is_some());
        let ev = events.page(0, 100);
        assert!(ev
            .iter()
            .any(|e| e.kind == "replica.checkin" && e.mac.as_deref() == Some("52:54:00:aa:bb:cc")));
        // Listing shows records, never tokens; and survives a restart.
        let (s, l) = call(&r, "GET", "/api/v1/replicas", None, serde_json::Value::Null).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(l["items"].as_array().unwrap().len(), 2, "{l}");
        assert_eq!(l["next"], serde_json::Value::Null);
        assert!(!l.to_string().contains("token"), "{l}");
        let text = std::fs::read_to_string(dir.path().join(REPLICAS_FILE)).unwrap();
        assert!(!text.contains(&token));
        let (again, _, _) = setup(dir.path());
        assert_eq!(
            again.get(&child).unwrap().release.as_deref(),
            Some("sha256:aa")
        );
        // Removal revokes the token.
        let (s, _) = call(
            &r,
            "DELETE",
            &format!("/api/v1/replicas/{child}"),
            Some(&token),
            serde_json::Value::Null,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = call(
            &r,
            "DELETE",
            &format!("/api/v1/replicas/{child}"),
            Some(&op),
            serde_json::Value::Null,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&r, "POST", &url, Some(&token), serde_json::json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(r.get(&child).is_none());
    }

    #[test]
    fn re_registering_an_id_replaces_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _, _) = setup(dir.path());
        let id = Uuid::new_v4();
        let a = r.register(Some("x"), None, Some(id)).unwrap();
        let b = r
            .register(None, Some("52:54:00:00:00:01"), Some(id))
            .unwrap();
        assert_eq!(a.node_id, id);
        assert!(r.tokens().authenticate(&a.token).is_none());
        assert!(r.tokens().authenticate(&b.token).is_some());
        let rec = r.get(&id).unwrap();
        assert_eq!(rec.name.as_deref(), Some("x"));
        assert_eq!(rec.mac.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(r.list().len(), 1);
        assert!(matches!(
            r.register(None, Some("nope"), None),
            Err(ReplicaError::Invalid { field: "mac", .. })
        ));
        assert!(r.register(None, None, Some(r.node_id())).is_err());
    }
}
