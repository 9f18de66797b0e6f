//! Who may call what. Every route names one [`Guard`]; [`check`] maps the
//! request's bearer token to a [`Caller`] or refuses, before the handler
//! (and its body extractor) runs.
//!
//! | guard | who passes |
//! | --- | --- |
//! | `public` | anyone (firmware, agents): such routes carry no secret |
//! | `read` | anyone when reads are public, else a `read`, `operator` or `admin` token |
//! | `operator` | an `operator` or `admin` token |
//! | `admin` | an `admin` token |
//! | `replica` | the `replica:<id>` token of the node in the path (`{node}`/`{node_id}`), or an operator |
//! | `job` | the token of an open job (clone job or install attempt) matching the path's `{id}`/`{mac}`, or an operator |
//! | `registry` | a `read`, `operator` or `admin` token; anyone only while the `registry_anonymous_pulls` setting is on (public reads do not open it) |
//!
//! Anything the guard cannot check (no token file, no job registry, a path
//! without the parameter a scoped token is bound to) is refused.

use std::sync::{Arc, RwLock};

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::ApiError;
use crate::auth::{Scope, TokenStore};

/// What a route demands of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guard {
    Public,
    Read,
    Operator,
    Admin,
    Replica,
    Job,
    /// Pulls from the OCI registry (`/v2/`).
    Registry,
}

impl Guard {
    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Public => "public",
            Guard::Read => "read",
            Guard::Operator => "operator",
            Guard::Admin => "admin",
            Guard::Replica => "replica",
            Guard::Job => "job",
            Guard::Registry => "registry",
        }
    }
}

/// The open job a job token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    /// `clone` or `install`.
    pub kind: &'static str,
    /// The job id (clone jobs) or the node id (installs).
    pub id: String,
    /// The MAC of the machine doing the job, lower-case `aa:bb:…`.
    pub mac: Option<String>,
}

/// Something that issues job tokens (clone jobs, install attempts).
pub trait JobTokens: Send + Sync {
    /// The open job `token` belongs to, if any.
    fn job_of(&self, token: &str) -> Option<JobRef>;
}

/// Who called, as established by the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No token (public routes, or reads while reads are public).
    Anonymous,
    /// A token: its name and scope.
    Token { name: String, scope: Scope },
    /// A job token.
    Job(JobRef),
}

/// The caller of a request; handlers take it as an extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The TCP peer address (never a forwarded-for header).
    pub peer: Option<std::net::SocketAddr>,
}

impl Caller {
    /// The name recorded as author of what this caller changes.
    pub fn name(&self) -> String {
        match &self.role {
            Role::Anonymous => "anonymous".into(),
            Role::Token { name, .. } => name.clone(),
            Role::Job(j) => format!("{}-job-{}", j.kind, j.id),
        }
    }

    /// The job this caller holds the token of.
    pub fn job(&self) -> Option<&JobRef> {
        match &self.role {
            Role::Job(j) => Some(j),
            _ => None,
        }
    }

    /// Whether the caller holds an operator (or admin) token.
    pub fn is_operator(&self) -> bool {
        matches!(
            &self.role,
            Role::Token {
                scope: Scope::Operator | Scope::Admin,
                ..
            }
        )
    }

    /// The child node this caller is scoped to (replica tokens).
    pub fn replica(&self) -> Option<uuid::Uuid> {
        match &self.role {
            Role::Token {
                scope: Scope::Replica(id),
                ..
            } => Some(*id),
            _ => None,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Fails closed: a handler that asks who called, on a route no guard
        // ran for, is refused.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_guard",
                "this route was mounted without a guard",
            )
        })
    }
}

/// Says whether anonymous pulls from the registry are allowed now.
pub type RegistryOpen = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the guards check against.
pub struct Auth {
    tokens: Option<Arc<TokenStore>>,
    public_reads: bool,
    jobs: RwLock<Vec<Arc<dyn JobTokens>>>,
    /// Whether anonymous registry pulls are allowed now (the inventory
    /// setting); absent means no.
    registry_open: RwLock<Option<RegistryOpen>>,
    /// Unit tests of one module's handlers only (never in a build).
    #[cfg(test)]
    allow_all: bool,
}

impl Auth {
    pub fn new(tokens: Option<Arc<TokenStore>>, public_reads: bool) -> Arc<Self> {
        Arc::new(Self {
            tokens,
            public_reads,
            jobs: RwLock::new(Vec::new()),
            registry_open: RwLock::new(None),
            #[cfg(test)]
            allow_all: false,
        })
    }

    /// Every guard passes as an admin named `test` (unit tests of one
    /// module's handlers; the guards themselves are tested here and by the
    /// route-table walk).
    #[cfg(test)]
    pub fn allow_all() -> Arc<Self> {
        Arc::new(Self {
            tokens: None,
            public_reads: true,
            jobs: RwLock::new(Vec::new()),
            registry_open: RwLock::new(None),
            allow_all: true,
        })
    }

    /// Adds an issuer of job tokens.
    pub fn add_jobs(&self, jobs: Arc<dyn JobTokens>) {
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(jobs);
    }

    /// Sets what decides whether anonymous registry pulls are allowed.
    pub fn set_registry_open(&self, open: RegistryOpen) {
        *self
            .registry_open
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(open);
    }

    fn registry_open(&self) -> bool {
        self.registry_open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|f| f())
    }

    fn job_of(&self, token: &str) -> Option<JobRef> {
        self.jobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|j| j.job_of(token))
    }

    /// Decides whether a request with `token` may call a route guarded by
    /// `guard` with path parameters `params`.
    pub fn decide(
        &self,
        guard: Guard,
        token: Option<&str>,
        params: &[(&str, &str)],
    ) -> Result<Role, ApiError> {
        #[cfg(test)]
        if self.allow_all {
            if let Some(j) = token.and_then(|t| self.job_of(t)) {
                return Ok(Role::Job(j));
            }
            return Ok(Role::Token {
                name: "test".into(),
                scope: Scope::Admin,
            });
        }
        if guard == Guard::Public {
            return Ok(Role::Anonymous);
        }
        // A token is still checked when one is sent, so a wrong token is
        // refused even while pulls are open.
        if guard == Guard::Registry && token.is_none_or(str::is_empty) && self.registry_open() {
            return Ok(Role::Anonymous);
        }
        if guard == Guard::Read && self.public_reads {
            // Anyone may read; a valid token still names its holder (so
            // `whoami` answers its scope), a missing or bad one is anonymous.
            let known = token
                .filter(|t| !t.is_empty())
                .and_then(|t| self.tokens.as_ref()?.authenticate(t));
            return Ok(match known {
                Some((name, scope)) => Role::Token { name, scope },
                None => Role::Anonymous,
            });
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(self.refused("this request needs an Authorization: Bearer <token> header"));
        };
        let param = |names: &[&str]| {
            params
                .iter()
                .find(|(k, _)| names.contains(k))
                .map(|(_, v)| *v)
        };
        if guard == Guard::Job {
            if let Some(j) = self.job_of(token) {
                if let Some(id) = param(&["id"]) {
                    if id != j.id {
                        return Err(forbidden("this job token belongs to another job"));
                    }
                }
                if let Some(mac) = param(&["mac"]) {
                    let ok = j
                        .mac
                        .as_deref()
                        .is_some_and(|m| crate::agents::mac_param(mac).is_ok_and(|p| p == m));
                    if !ok {
                        return Err(forbidden("this job token belongs to another machine"));
                    }
                }
                return Ok(Role::Job(j));
            }
        }
        let Some((name, scope)) = self.tokens.as_ref().and_then(|t| t.authenticate(token)) else {
            return Err(
                self.refused("the bearer token is not valid (revoked, expired or mistyped)")
            );
        };
        let ok = match (guard, &scope) {
            (_, Scope::Admin) => true,
            (Guard::Admin, _) => false,
            (
                Guard::Read | Guard::Operator | Guard::Replica | Guard::Job | Guard::Registry,
                Scope::Operator,
            ) => true,
            (Guard::Read | Guard::Registry, Scope::Read) => true,
            (Guard::Replica, Scope::Replica(id)) => match param(&["node", "node_id"]) {
                Some(p) => uuid::Uuid::parse_str(p).is_ok_and(|p| p == *id),
                None => false,
            },
            _ => false,
        };
        if ok {
            Ok(Role::Token { name, scope })
        } else {
            Err(forbidden(&format!(
                "a {scope} token may not call a route guarded {:?}",
                guard.as_str()
            )))
        }
    }
}

impl Auth {
    /// 401, or 503 `no_token_yet` while no operator token exists at all
    /// (the first one waits for the kernel's random pool).
    fn refused(&self, m: &str) -> ApiError {
        crate::auth::refused(self.tokens.as_deref(), m)
    }
}

fn forbidden(m: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", m)
}

/// The middleware every route runs first.
pub async fn check(
    State((guard, auth)): State<(Guard, Arc<Auth>)>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Response {
    let params: Vec<(String, String)> = params
        .map(|p| {
            p.iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .ok()
        .unwrap_or_default();
    let pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let token = crate::auth::bearer(req.headers());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let decided = auth.decide(guard, token, &pairs);
    match decided {
        Ok(role) => {
            let caller = Caller { role, peer };
            let write = !matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            );
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            req.extensions_mut().insert(caller.clone());
            let resp = next.run(req).await;
            if write {
                crate::audit::record(&caller, &method, &path, resp.status());
            }
            resp
        }
        Err(e) if guard == Guard::Registry => registry_refusal(e, req.headers()),
        Err(e) => e.into_response(),
    }
}

/// A refusal as OCI clients expect it: the distribution spec's error
/// JSON, and on 401 a `WWW-Authenticate: Bearer` challenge (skopeo and
/// podman send their `--registry-token` only after one). The realm is
/// this server's `/v2/token`, which answers nobody a token: there is no
/// token service, tokens are made with `appliance token create`.
fn registry_refusal(e: ApiError, headers: &axum::http::HeaderMap) -> Response {
    let code = match e.status {
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::FORBIDDEN => "DENIED",
        _ => "UNAVAILABLE",
    };
    let body = serde_json::json!({"errors": [{"code": code, "message": e.message, "detail": {"reason": e.code}}]});
    let mut r = (e.status, axum::Json(body)).into_response();
    if e.status == StatusCode::UNAUTHORIZED {
        // The Host header only shapes the URL sent back to the same caller;
        // anything but a plain host[:port] gives `localhost`.
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .unwrap_or("localhost");
        let v = format!("Bearer realm=\"http://{host}/v2/token\",service=\"appliance\"");
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            r.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, v);
        }
    }
    r.headers_mut().insert(
        "docker-distribution-api-version",
        axum::http::HeaderValue::from_static("registry/2.0"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneJob;
    impl JobTokens for OneJob {
        fn job_of(&self, token: &str) -> Option<JobRef> {
            (token == "job_good").then(|| JobRef {
                kind: "clone",
                id: "j1".into(),
                mac: Some("52:54:00:00:00:01".into()),
            })
        }
    }

    fn auth(public_reads: bool) -> (Arc<Auth>, [String; 4], uuid::Uuid) {
        let t = Arc::new(TokenStore::memory());
        let child = uuid::Uuid::new_v4();
        let admin = t.create_scoped("root", Scope::Admin).unwrap().1;
        let op = t.create("ops").unwrap().1;
        let ro = t.create_scoped("viewer", Scope::Read).unwrap().1;
        let rep = t.create_scoped("child", Scope::Replica(child)).unwrap().1;
        let a = Auth::new(Some(t), public_reads);
        a.add_jobs(Arc::new(OneJob));
        (a, [admin, op, ro, rep], child)
    }

    #[test]
    fn every_guard_admits_exactly_its_callers() {
        let (a, [admin, op, ro, rep], child) = auth(false);
        let c = child.to_string();
        let node = [("node", c.as_str())];
        let other = uuid::Uuid::new_v4().to_string();
        let other_node = [("node", other.as_str())];
        let ok = |g, t: Option<&str>, p: &[(&str, &str)]| a.decide(g, t, p).is_ok();
        assert!(ok(Guard::Public, None, &[]));
        for g in [
            Guard::Read,
            Guard::Operator,
            Guard::Admin,
            Guard::Replica,
            Guard::Job,
        ] {
            assert!(!ok(g, None, &node), "{g:?} without a token");
            assert!(
                !ok(g, Some("apl_00000000_nope"), &node),
                "{g:?} with a wrong token"
            );
            assert!(ok(g, Some(&admin), &node), "{g:?} with admin");
        }
        assert!(ok(Guard::Read, Some(&ro), &[]));
        assert!(!ok(Guard::Operator, Some(&ro), &[]));
        assert!(ok(Guard::Operator, Some(&op), &[]));
        assert!(!ok(Guard::Admin, Some(&op), &[]));
        assert!(ok(Guard::Replica, Some(&rep), &node));
        assert!(!ok(Guard::Replica, Some(&rep), &other_node));
        assert!(!ok(Guard::Replica, Some(&rep), &[]), "no node in the path");
        assert!(!ok(Guard::Read, Some(&rep), &[]));
        assert!(!ok(Guard::Operator, Some(&rep), &[]));
        assert!(ok(Guard::Job, Some("job_good"), &[("id", "j1")]));
        assert!(!ok(Guard::Job, Some("job_good"), &[("id", "j2")]));
        assert!(ok(
            Guard::Job,
            Some("job_good"),
            &[("mac", "52-54-00-00-00-01")]
        ));
        assert!(!ok(
            Guard::Job,
            Some("job_good"),
            &[("mac", "52:54:00:00:00:02")]
        ));
        assert!(!ok(Guard::Operator, Some("job_good"), &[]));
        assert!(!ok(Guard::Read, Some("job_good"), &[]));
    }

    #[test]
    fn public_reads_open_only_read_routes() {
        let (a, _, _) = auth(true);
        assert!(a.decide(Guard::Read, None, &[]).is_ok());
        assert!(a.decide(Guard::Operator, None, &[]).is_err());
    }

    #[test]
    fn public_reads_still_name_a_valid_token_and_ignore_a_bad_one() {
        let (a, [_, op, ro, _], _) = auth(true);
        let scope = |t| match a.decide(Guard::Read, t, &[]).unwrap() {
            Role::Token { scope, .. } => scope.to_string(),
            Role::Anonymous => "anonymous".into(),
            Role::Job(_) => "job".into(),
        };
        assert_eq!(scope(Some(&ro)), "read");
        assert_eq!(scope(Some(&op)), "operator");
        assert_eq!(scope(Some("apl_00000000_nope")), "anonymous");
        assert_eq!(scope(None), "anonymous");
        // Naming the caller opens nothing more.
        assert!(a.decide(Guard::Operator, Some(&ro), &[]).is_err());
    }

    #[test]
    fn without_a_token_store_nothing_guarded_passes() {
        let a = Auth::new(None, false);
        for g in [
            Guard::Read,
            Guard::Operator,
            Guard::Admin,
            Guard::Replica,
            Guard::Job,
        ] {
            assert!(a.decide(g, Some("apl_x_y"), &[]).is_err(), "{g:?}");
        }
    }
}
