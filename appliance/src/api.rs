//! The HTTP API (`/healthz`, `/api/v1/...`): router, handlers and the one
//! [`ApiError`] type.
//!
//! Errors are JSON `{"code": "<stable_code>", "message": "<human text>"}`;
//! server-side detail goes to the log, not the client. Codes used so far:
//! `not_found`, `invalid_request`, `power_unavailable`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::http::{Guard, Route};

use crate::power::{PowerAction, PowerControl, PowerError};

/// Everything the handlers need, fixed at startup.
pub struct AppState {
    pub version: &'static str,
    pub node_id: String,
    pub started: Instant,
    /// `sha256:<hex>` of the release manifest, if it could be read.
    pub release: Option<String>,
    /// Reasons found by `serve` itself at startup.
    pub degraded: Vec<String>,
    /// Init's degraded file, re-read on each version request.
    pub degraded_file: Option<PathBuf>,
    pub power: Box<dyn PowerControl>,
}

/// The body of `GET /api/v1/version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub node_id: String,
    pub uptime_s: f64,
    pub release: Option<String>,
    pub degraded: Vec<String>,
    /// What the appliance booted from (init's record; absent when serve
    /// runs without init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<crate::medium::Medium>,
}

/// The body of `POST /api/v1/power`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerRequest {
    pub action: PowerAction,
}

/// The one error type every handler returns.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as the `ETag` header (a 412 says what the object is now).
    pub etag: Option<String>,
}

/// The JSON shape of an [`ApiError`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            etag: None,
        }
    }

    /// The same error, answered with an `ETag` header.
    pub fn with_etag(mut self, etag: String) -> Self {
        self.etag = Some(etag);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(v) = self.etag.and_then(|t| t.parse().ok()) {
            resp.headers_mut().insert(axum::http::header::ETAG, v);
        }
        resp
    }
}

impl From<crate::entropy::NotReady> for ApiError {
    fn from(e: crate::entropy::NotReady) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "random_pool_not_ready",
            e.to_string(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            rejection.body_text(),
        )
    }
}

impl From<PowerError> for ApiError {
    fn from(e: PowerError) -> Self {
        match e {
            PowerError::Unavailable(_) => {
                ApiError::new(StatusCode::CONFLICT, "power_unavailable", e.to_string())
            }
        }
    }
}

/// Health, version and the appliance's own power.
pub fn routes(state: Arc<AppState>) -> Vec<Route> {
    vec![
        Route::get("/healthz", Guard::Public, "Liveness: `ok`")
            .response("text")
            .to(healthz, ()),
        Route::get(
            "/api/v1/version",
            Guard::Public,
            "Version, node id, running release digest, degraded reasons",
        )
        .response("Object")
        .to(version, state.clone()),
        Route::get(
            "/api/v1/whoami",
            Guard::Read,
            "The caller's token name and scope (what the console may offer)",
        )
        .response("Object")
        .to(whoami, ()),
        Route::post(
            "/api/v1/power",
            Guard::Admin,
            "Power off or reboot the appliance itself",
        )
        .request("Object")
        .response("Object")
        .to(power, state),
    ]
}

/// The routes of [`routes`] alone (tests), guarded by `tokens`.
pub fn router(state: Arc<AppState>, tokens: Arc<crate::auth::TokenStore>) -> Router {
    crate::http::build(routes(state), crate::http::Auth::new(Some(tokens), true))
}

/// The body of `GET /api/v1/whoami`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The token's name (`anonymous` without one, while reads are public).
    pub name: String,
    /// `read`, `operator`, `admin`, `replica:<id>`, `job` or `anonymous`.
    pub scope: String,
    /// Whether operator routes (the inventory's writes) will take this caller.
    pub operator: bool,
}

async fn whoami(caller: crate::http::Caller) -> Json<WhoAmI> {
    use crate::http::guard::Role;
    let scope = match &caller.role {
        Role::Anonymous => "anonymous".to_owned(),
        Role::Token { scope, .. } => scope.to_string(),
        Role::Job(_) => "job".to_owned(),
    };
    Json(WhoAmI {
        name: caller.name(),
        scope,
        operator: caller.is_operator(),
    })
}

async fn healthz() -> &'static str {
    "ok"
}

/// Serve's own degraded reasons and init's (re-read from its file).
pub fn degraded_reasons(state: &AppState) -> Vec<String> {
    let mut degraded = state.degraded.clone();
    if let Some(path) = &state.degraded_file {
        match crate::degraded::read(path) {
            Ok(reasons) => degraded.extend(reasons),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "reading degraded file failed");
                degraded.push(format!("degraded file {} unreadable", path.display()));
            }
        }
    }
    degraded
}

async fn version(State(state): State<Arc<AppState>>) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: state.version.to_owned(),
        node_id: state.node_id.clone(),
        uptime_s: state.started.elapsed().as_secs_f64(),
        release: state.release.clone(),
        degraded: degraded_reasons(&state),
        // Init writes the medium beside its degraded file.
        medium: state
            .degraded_file
            .as_ref()
            .and_then(|p| crate::medium::read(&p.with_file_name("medium"))),
    })
}

async fn power(
    State(state): State<Arc<AppState>>,
    body: Result<Json<PowerRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PowerRequest>), ApiError> {
    let Json(req) = body?;
    state.power.request(req.action)?;
    tracing::warn!(action = ?req.action, "power request accepted");
    Ok((StatusCode::ACCEPTED, Json(req)))
}

/// A fixed state for other modules' unit tests.
#[cfg(test)]
pub fn tests_state() -> AppState {
    AppState {
        version: "9.9.9",
        node_id: "node-1".into(),
        started: Instant::now(),
        release: Some("sha256:abc".into()),
        degraded: vec![],
        degraded_file: None,
        power: crate::power::for_serve(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<PowerAction>>>);

    impl PowerControl for Recorder {
        fn request(&self, action: PowerAction) -> Result<(), PowerError> {
            self.0.lock().unwrap().push(action);
            Ok(())
        }
    }

    fn state(power: Box<dyn PowerControl>) -> AppState {
        AppState {
            version: "9.9.9",
            node_id: "node-1".into(),
            started: Instant::now(),
            release: Some("sha256:abc".into()),
            degraded: vec![],
            degraded_file: None,
            power,
        }
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    fn get_req(uri: &str) -> Request<Body> {
        Request::get(uri).body(Body::empty()).unwrap()
    }

    fn admin() -> (Arc<crate::auth::TokenStore>, String) {
        let t = Arc::new(crate::auth::TokenStore::memory());
        let tok = t.ensure_first().unwrap().unwrap();
        (t, tok)
    }

    fn router(state: Arc<AppState>) -> Router {
        let (t, tok) = admin();
        TOKEN.with(|c| *c.borrow_mut() = tok);
        super::router(state, t)
    }

    thread_local! {
        static TOKEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }

    fn power_req(body: &str) -> Request<Body> {
        Request::post("/api/v1/power")
            .header(
                "authorization",
                format!("Bearer {}", TOKEN.with(|c| c.borrow().clone())),
            )
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn whoami_answers_the_callers_scope_and_nothing_without_a_token() {
        let st = Arc::new(state(Box::new(Recorder::default())));
        let t = Arc::new(crate::auth::TokenStore::memory());
        let admin = t.ensure_first().unwrap().unwrap();
        let ro = t
            .create_scoped("viewer", crate::auth::Scope::Read)
            .unwrap()
            .1;
        let op = t.create("ops").unwrap().1;
        let private = crate::http::build(routes(st), crate::http::Auth::new(Some(t), false));
        let who = |tok: Option<String>| {
            let app = private.clone();
            async move {
                let mut r = Request::get("/api/v1/whoami");
                if let Some(tok) = tok {
                    r = r.header("authorization", format!("Bearer {tok}"));
                }
                let (st, body) = call(app, r.body(Body::empty()).unwrap()).await;
                (
                    st,
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                )
            }
        };
        let (st, v) = who(Some(ro)).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            (
                v["name"].as_str(),
                v["scope"].as_str(),
                v["operator"].as_bool()
            ),
            (Some("viewer"), Some("read"), Some(false))
        );
        let (_, v) = who(Some(op)).await;
        assert_eq!(
            (v["scope"].as_str(), v["operator"].as_bool()),
            (Some("operator"), Some(true))
        );
        let (_, v) = who(Some(admin)).await;
        assert_eq!(
            (v["scope"].as_str(), v["operator"].as_bool()),
            (Some("admin"), Some(true))
        );
        let (st, v) = who(None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    }

    #[tokio::test]
    async fn healthz_is_ok() {
        let app = router(Arc::new(state(Box::new(Recorder::default()))));
        assert_eq!(
            call(app, get_req("/healthz")).await,
            (StatusCode::OK, b"ok".to_vec())
        );
    }

    #[tokio::test]
    async fn version_reports_identity_and_release() {
        let app = router(Arc::new(state(Box::new(Recorder::default()))));
        let (status, body) = call(app, get_req("/api/v1/version")).await;
        assert_eq!(status, StatusCode::OK);
        let v: VersionInfo = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.version, "9.9.9");
        assert_eq!(v.node_id, "node-1");
        assert_eq!(v.release.as_deref(), Some("sha256:abc"));
        assert!(v.degraded.is_empty());
        assert!(v.uptime_s >= 0.0);
        // `release` is present as null when unknown.
        let mut s = state(Box::new(Recorder::default()));
        s.release = None;
        let (_, body) = call(router(Arc::new(s)), get_req("/api/v1/version")).await;
        let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(raw["release"].is_null());
    }

    #[tokio::test]
    async fn version_merges_own_and_init_degraded_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("degraded");
        std::fs::write(&file, "data partition not found\n").unwrap();
        let mut s = state(Box::new(Recorder::default()));
        s.degraded = vec!["release manifest missing".into()];
        s.degraded_file = Some(file.clone());
        let app = router(Arc::new(s));
        let (_, body) = call(app.clone(), get_req("/api/v1/version")).await;
        let v: VersionInfo = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v.degraded,
            vec!["release manifest missing", "data partition not found"]
        );
        // Reasons init appends later show up without a restart.
        crate::degraded::append(&file, "dhcp failed").unwrap();
        let (_, body) = call(app.clone(), get_req("/api/v1/version")).await;
        let v: VersionInfo = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.degraded.len(), 3);
        assert_eq!(v.medium, None);
        // The medium init records beside its degraded file is reported.
        let m = crate::medium::Medium {
            kind: "cdrom".into(),
            device: Some("/dev/sr0".into()),
            read_only: true,
            state: "ram".into(),
        };
        crate::medium::write(&dir.path().join("medium"), &m).unwrap();
        let (_, body) = call(app, get_req("/api/v1/version")).await;
        let v: VersionInfo = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.medium, Some(m));
    }

    #[tokio::test]
    async fn power_is_accepted_and_forwarded() {
        let rec = Recorder::default();
        let seen = rec.0.clone();
        let app = router(Arc::new(state(Box::new(rec))));
        let (status, _) = call(app.clone(), power_req(r#"{"action":"poweroff"}"#)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, _) = call(app, power_req(r#"{"action":"reboot"}"#)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerAction::Poweroff, PowerAction::Reboot]
        );
    }

    #[tokio::test]
    async fn power_is_refused_without_our_init() {
        let app = router(Arc::new(state(Box::new(crate::power::Refuse(
            "host".into(),
        )))));
        let (status, body) = call(app, power_req(r#"{"action":"poweroff"}"#)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let err: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.code, "power_unavailable");
    }

    #[tokio::test]
    async fn bad_power_body_is_a_json_error() {
        let rec = Recorder::default();
        let seen = rec.0.clone();
        let app = router(Arc::new(state(Box::new(rec))));
        let (status, body) = call(app, power_req(r#"{"action":"explode"}"#)).await;
        assert!(status.is_client_error(), "{status}");
        let err: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.code, "invalid_request");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unknown_path_is_a_json_404() {
        let app = router(Arc::new(state(Box::new(Recorder::default()))));
        let (status, body) = call(app, get_req("/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let err: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.code, "not_found");
    }
}
