//! The inventory's REST API under `/api/v1`, Cobbler's compatible service
//! URLs under `/cblr/svc/op`, blobs under `/blobs/sha256`, and the OpenAPI
//! document at `/api/v1/openapi.json`, generated from the same route table
//! ([`ROUTES`]) and the serde types' `utoipa::ToSchema` derives.
//!
//! Writes need `Authorization: Bearer <token>`; reads too when
//! `public_reads` is off. Install status reports and Cobbler's service URLs
//! are open, like Cobbler's, because targets carry no token.
//!
//! Error codes (stable): `not_found`, `already_exists`, `invalid_object`,
//! `invalid_request`, `conflict`, `in_use`, `storage_failed`,
//! `unauthorized`, `template_error`, and the power codes of
//! [`crate::bmc::api`].
//!
//! Credentials are never answered: objects go out through
//! [`Object::to_api_json`] (`power.password` → `********`), and writes run
//! through [`keep_secrets`] so a system sent back as it was shown (or
//! without `password`) keeps its stored password.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::blend::{blend, Blended};
use super::boot::{decide, ipxe_script};
use super::model::{Kind, Object, REDACTED};
use super::status::{self, Event, StatusBook, StatusRow};
use super::templates::{self, Document, RenderError};
use super::{Author, InvError, Inventory, Settings};
use crate::api::ApiError;
use crate::auth::TokenStore;

/// Everything the inventory handlers need.
pub struct InvState {
    pub inventory: Arc<RwLock<Inventory>>,
    pub status: Mutex<StatusBook>,
    pub tokens: TokenStore,
    /// Serve reads without a token.
    pub public_reads: bool,
    /// `<data>/blobs/sha256`.
    pub blobs: PathBuf,
    /// The server's event log (power actions are recorded there).
    pub events: crate::events::Events,
}

impl InvState {
    /// The shared inventory; it implements [`super::boot::BootPolicy`].
    pub fn boot_policy(&self) -> Arc<RwLock<Inventory>> {
        self.inventory.clone()
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Inventory> {
        super::fresh_read(&self.inventory)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inventory> {
        super::fresh_write(&self.inventory)
    }
}

type S = State<Arc<InvState>>;

impl From<InvError> for ApiError {
    fn from(e: InvError) -> Self {
        let status = match &e {
            InvError::NotFound { .. } => StatusCode::NOT_FOUND,
            InvError::Exists { .. } | InvError::Conflict(_) | InvError::InUse { .. } => {
                StatusCode::CONFLICT
            }
            InvError::Invalid(..) => StatusCode::UNPROCESSABLE_ENTITY,
            InvError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::Inventory(e) => e.into(),
            RenderError::NoTemplate(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            RenderError::Template(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_error", m)
            }
        }
    }
}

/// Before a create or replace of `kind` with body `v`: a system's
/// `power.password` left out or sent as [`REDACTED`] becomes the stored
/// one (`old`), so what the API showed can be sent back unchanged. The
/// placeholder without a stored password is refused rather than stored.
pub fn keep_secrets(
    kind: Kind,
    v: &mut serde_json::Value,
    old: Option<&Object>,
) -> Result<(), ApiError> {
    if kind != Kind::System {
        return Ok(());
    }
    let Some(p) = v.pointer_mut("/power").and_then(|p| p.as_object_mut()) else {
        return Ok(());
    };
    let sent = p.get("password").map(|x| x.as_str());
    if !matches!(sent, None | Some(Some(REDACTED))) {
        return Ok(());
    }
    let stored = match old {
        Some(Object::System(s)) => s.power.password.clone(),
        _ => String::new(),
    };
    if stored.is_empty() && sent.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_object",
            format!("power.password {REDACTED:?} is the placeholder the API shows; send the real password"),
        ));
    }
    p.insert("password".into(), stored.into());
    Ok(())
}

fn bad_request(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m)
}

fn kind_of(plural: &str) -> Result<Kind, ApiError> {
    Kind::from_plural(plural).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no collection {plural:?}"),
        )
    })
}

/// Checks the bearer token for a write (or a private read); returns the
/// author for commits.
pub(crate) fn authorize(
    state: &InvState,
    headers: &HeaderMap,
    write: bool,
) -> Result<Author, ApiError> {
    if !write && state.public_reads {
        return Ok(Author::new("anonymous"));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return Err(crate::auth::refused(
            Some(&state.tokens),
            "this request needs an Authorization: Bearer <token> header",
        ));
    };
    match state.tokens.verify(token) {
        Some(name) => Ok(Author::new(&name)),
        None => Err(crate::auth::refused(
            Some(&state.tokens),
            "the bearer token is not valid (revoked or mistyped)",
        )),
    }
}

/// `http://host[:port]` the client used, for URLs inside rendered files.
fn server_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn parse_body(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body is not JSON: {e}")))
}

/// `?recursive=true` for removal.
#[derive(Debug, Default, Deserialize)]
pub struct RemoveQuery {
    #[serde(default)]
    pub recursive: bool,
}

/// The body of copy and rename.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewName {
    pub new_name: String,
}

/// The body of a status report.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusReport {
    pub event: Event,
    #[serde(default)]
    pub message: String,
}

/// The answer to a removal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Removed {
    pub removed: Vec<String>,
}

/// A bulk create-or-replace.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Batch {
    /// Commit message.
    #[serde(default)]
    pub message: String,
    pub objects: Vec<BatchItem>,
}

/// One object of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    pub kind: Kind,
    #[schema(value_type = Object)]
    pub object: serde_json::Value,
}

/// Builds the inventory router.
pub fn router(state: Arc<InvState>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/settings", get(get_settings).put(put_settings))
        .route("/api/v1/status", get(list_status))
        .route("/api/v1/batch", post(batch))
        .route("/api/v1/boot/{mac}", get(boot_script))
        .route("/api/v1/{kind}", get(list).post(create))
        .route(
            "/api/v1/{kind}/{name}",
            get(show).put(replace).patch(patch).delete(remove),
        )
        .route("/api/v1/{kind}/{name}/copy", post(copy))
        .route("/api/v1/{kind}/{name}/rename", post(rename))
        .route("/api/v1/{kind}/{name}/blended", get(blended))
        .route("/api/v1/{kind}/{name}/autoinstall", get(autoinstall))
        .route("/api/v1/systems/{name}/nocloud/{doc}", get(nocloud))
        .route("/api/v1/systems/{name}/status", post(report_status))
        .route(
            "/api/v1/systems/{name}/power",
            get(crate::bmc::api::get_power).post(crate::bmc::api::post_power),
        )
        .route(
            "/api/v1/systems/{name}/media",
            post(crate::bmc::api::post_media),
        )
        .route("/api/v1/systems/{name}/status/{event}", post(report_event))
        .route(
            "/cblr/svc/op/autoinstall/{kind}/{name}",
            get(cobbler_autoinstall),
        )
        .route("/cblr/svc/op/ks/{kind}/{name}", get(cobbler_autoinstall))
        .route(
            "/cblr/svc/op/nopxe/system/{name}",
            get(cobbler_nopxe).post(cobbler_nopxe),
        )
        .route(
            "/cblr/svc/op/trig/mode/{mode}/system/{name}",
            get(cobbler_trig).post(cobbler_trig),
        )
        .route("/blobs/sha256/{hex}", get(blob))
        .with_state(state)
}

async fn list(
    State(st): S,
    Path(kind): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    authorize(&st, &headers, false)?;
    let inv = st.read();
    // Serialise straight into one buffer: 10,000 systems stay well under 50 ms.
    let mut out = Vec::with_capacity(inv.count(kind) * 256);
    out.push(b'[');
    for (i, o) in inv.list(kind).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &o.to_api_json())
            .map_err(|e| bad_request(e.to_string()))?;
    }
    out.push(b']');
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

async fn show(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind_of(&kind)?;
    authorize(&st, &headers, false)?;
    let inv = st.read();
    let o = inv
        .get(kind, &name)
        .ok_or(InvError::NotFound { kind, name })?;
    Ok(Json(o.to_api_json()))
}

async fn create(
    State(st): S,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let mut v = parse_body(&body)?;
    keep_secrets(kind, &mut v, None)?;
    let obj = Object::from_json(kind, v).map_err(|e| InvError::Invalid(e, kind))?;
    let name = obj.name().to_owned();
    let mut inv = st.write();
    inv.create(obj, &author)?;
    Ok((
        StatusCode::CREATED,
        Json(inv.get(kind, &name).expect("created").to_api_json()),
    ))
}

async fn replace(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let mut v = parse_body(&body)?;
    match v.get("name").and_then(|n| n.as_str()) {
        Some(n) if n != name => {
            return Err(bad_request(format!(
                "body names {n:?} but the URL names {name:?}; use rename"
            )))
        }
        _ => {}
    }
    if let Some(m) = v.as_object_mut() {
        m.insert("name".into(), name.clone().into());
    }
    let mut inv = st.write();
    keep_secrets(kind, &mut v, inv.get(kind, &name))?;
    let obj = Object::from_json(kind, v).map_err(|e| InvError::Invalid(e, kind))?;
    inv.update(obj, &author)?;
    Ok(Json(inv.get(kind, &name).expect("updated").to_api_json()))
}

async fn patch(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let mut v = parse_body(&body)?;
    if v.get("name")
        .is_some_and(|n| n.as_str() != Some(name.as_str()))
    {
        return Err(bad_request("PATCH cannot change the name; use rename"));
    }
    // A merge patch keeps what it leaves out; the placeholder means the same.
    if let Some(p) = v.pointer_mut("/power").and_then(|p| p.as_object_mut()) {
        if p.get("password").and_then(|x| x.as_str()) == Some(REDACTED) {
            p.remove("password");
        }
    }
    let obj = st.write().patch(kind, &name, &v, &author)?;
    Ok(Json(obj.to_api_json()))
}

async fn remove(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<RemoveQuery>,
    headers: HeaderMap,
) -> Result<Json<Removed>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let removed = st.write().remove(kind, &name, q.recursive, &author)?;
    let mut book = st.status.lock().unwrap_or_else(|e| e.into_inner());
    for r in &removed {
        if let Some(sys) = r.strip_prefix("system ") {
            if let Err(e) = book.forget(sys) {
                tracing::warn!(error = format!("{e:#}"), "forgetting install status failed");
            }
        }
    }
    Ok(Json(Removed { removed }))
}

fn new_name(body: &Bytes) -> Result<String, ApiError> {
    let v: NewName = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("expected {{\"new_name\": \"…\"}}: {e}")))?;
    Ok(v.new_name)
}

async fn copy(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let new = new_name(&body)?;
    let mut inv = st.write();
    inv.copy(kind, &name, &new, &author)?;
    Ok((
        StatusCode::CREATED,
        Json(inv.get(kind, &new).expect("copied").to_api_json()),
    ))
}

async fn rename(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = authorize(&st, &headers, true)?;
    let new = new_name(&body)?;
    let mut inv = st.write();
    inv.rename(kind, &name, &new, &author)?;
    Ok(Json(inv.get(kind, &new).expect("renamed").to_api_json()))
}

async fn blended(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Blended>, ApiError> {
    let kind = kind_of(&kind)?;
    authorize(&st, &headers, false)?;
    Ok(Json(blend(&st.read(), kind, &name)?))
}

fn render(
    st: &InvState,
    kind: Kind,
    name: &str,
    doc: Document,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if !matches!(kind, Kind::System | Kind::Profile) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "only systems and profiles have autoinstall files",
        ));
    }
    let job = templates::prepare(&st.read(), kind, name, doc, &server_url(headers))?;
    let text = job.render()?;
    let ctype = if job.template().ends_with(".json") {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    Ok(([(header::CONTENT_TYPE, ctype)], text).into_response())
}

async fn autoinstall(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    render(&st, kind, &name, Document::Autoinstall, &headers)
}

async fn nocloud(
    State(st): S,
    Path((name, doc)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let doc = match doc.as_str() {
        "user-data" => Document::UserData,
        "meta-data" => Document::MetaData,
        "vendor-data" | "network-config" => return Ok(String::new().into_response()),
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no NoCloud document {other:?}"),
            ))
        }
    };
    render(&st, Kind::System, &name, doc, &headers)
}

async fn cobbler_autoinstall(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = Kind::from_name(&kind).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no object type {kind:?}"),
        )
    })?;
    render(&st, kind, &name, Document::Autoinstall, &headers)
}

/// Records an event; a finish turns netboot off (one commit).
fn record(
    st: &InvState,
    name: &str,
    event: Event,
    message: &str,
    from: &str,
) -> Result<StatusRow, ApiError> {
    let netboot = {
        let mut inv = st.write();
        let sys = inv
            .system(name)
            .cloned()
            .ok_or_else(|| InvError::NotFound {
                kind: Kind::System,
                name: name.to_owned(),
            })?;
        if event == Event::Finish && sys.netboot {
            let mut s = sys.clone();
            s.netboot = false;
            inv.update(Object::System(s), &Author::new("install-status"))?;
            false
        } else {
            sys.netboot
        }
    };
    let record = st
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(name, event, status::now(), from, message)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage_failed",
                format!("{e:#}"),
            )
        })?;
    tracing::info!(system = name, ?event, "install status");
    Ok(StatusRow {
        system: name.to_owned(),
        record,
        netboot,
        quiet: false,
    })
}

fn peer(headers: &HeaderMap) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn report_status(
    State(st): S,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<StatusRow>, ApiError> {
    let r: StatusReport = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "expected {{\"event\": \"start|finish|failure\"}}: {e}"
        ))
    })?;
    Ok(Json(record(
        &st,
        &name,
        r.event,
        &r.message,
        &peer(&headers),
    )?))
}

fn parse_event(s: &str) -> Result<Event, ApiError> {
    match s {
        "start" | "pre" => Ok(Event::Start),
        "finish" | "post" => Ok(Event::Finish),
        "failure" | "failed" => Ok(Event::Failure),
        other => Err(bad_request(format!(
            "unknown event {other:?}: use start, finish or failure"
        ))),
    }
}

async fn report_event(
    State(st): S,
    Path((name, event)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<StatusRow>, ApiError> {
    Ok(Json(record(
        &st,
        &name,
        parse_event(&event)?,
        "",
        &peer(&headers),
    )?))
}

async fn cobbler_nopxe(
    State(st): S,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<&'static str, ApiError> {
    record(&st, &name, Event::Finish, "nopxe", &peer(&headers))?;
    Ok("True")
}

async fn cobbler_trig(
    State(st): S,
    Path((mode, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<&'static str, ApiError> {
    record(&st, &name, parse_event(&mode)?, "trigger", &peer(&headers))?;
    Ok("True")
}

/// Every system's status (systems that never reported are `unknown`).
pub fn status_rows(inv: &Inventory, book: &StatusBook, now: i64) -> Vec<StatusRow> {
    inv.list(Kind::System)
        .filter_map(|o| match o {
            Object::System(s) => Some(s),
            _ => None,
        })
        .map(|s| {
            let record = book.get(&s.name).cloned().unwrap_or_default();
            let quiet = status::is_quiet(&record, now);
            StatusRow {
                system: s.name.clone(),
                record,
                netboot: s.netboot,
                quiet,
            }
        })
        .collect()
}

async fn list_status(State(st): S, headers: HeaderMap) -> Result<Json<Vec<StatusRow>>, ApiError> {
    authorize(&st, &headers, false)?;
    let inv = st.read();
    let book = st.status.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Json(status_rows(&inv, &book, status::now())))
}

async fn get_settings(State(st): S, headers: HeaderMap) -> Result<Json<Settings>, ApiError> {
    authorize(&st, &headers, false)?;
    Ok(Json(st.read().settings().clone()))
}

async fn put_settings(
    State(st): S,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Settings>, ApiError> {
    let author = authorize(&st, &headers, true)?;
    let s: Settings =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("settings: {e}")))?;
    st.write().set_settings(s.clone(), &author)?;
    Ok(Json(s))
}

async fn batch(
    State(st): S,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let author = authorize(&st, &headers, true)?;
    let b: Batch = serde_json::from_slice(&body).map_err(|e| bad_request(format!("batch: {e}")))?;
    let mut objs = Vec::with_capacity(b.objects.len());
    for (i, mut item) in b.objects.into_iter().enumerate() {
        {
            let inv = st.read();
            let name = item
                .object
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_owned();
            keep_secrets(item.kind, &mut item.object, inv.get(item.kind, &name))?;
        }
        let o = Object::from_json(item.kind, item.object).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_object",
                format!("objects[{i}]: {e}"),
            )
        })?;
        objs.push(o);
    }
    let message = if b.message.is_empty() {
        format!("Batch of {} objects", objs.len())
    } else {
        b.message
    };
    let n = st.write().put_many(objs, &author, &message)?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"written": n}))))
}

async fn boot_script(
    State(st): S,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mac = mac.trim_end_matches(".ipxe");
    super::model::normalize_mac(mac).map_err(bad_request)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let script = ipxe_script(&decide(&st.read(), mac, &host));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response())
}

/// Streams a blob from disk (never read whole into memory), with Range
/// support so a target's installer can resume a large initrd or image.
async fn blob(
    State(st): S,
    Path(hex): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(bad_request("blob names are 64 lowercase hex digits"));
    }
    let path = st.blobs.join(&hex);
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(bad_request("not a blob")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob sha256:{hex}"),
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage_failed",
                format!("reading blob: {e}"),
            ))
        }
    }
    use tower::ServiceExt as _;
    let mut resp = tower_http::services::ServeFile::new_with_mime(
        &path,
        &"application/octet-stream"
            .parse()
            .expect("a valid mime type"),
    )
    .oneshot(req)
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            format!("reading blob: {e}"),
        )
    })?
    .map(axum::body::Body::new);
    // Content-addressed: the bytes behind a name never change.
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(resp)
}

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi().to_pretty_json().unwrap_or_default(),
    )
        .into_response()
}

/// One route of the API: method, path, summary, whether it writes, request
/// and response schema names. The OpenAPI document is made from this table;
/// a test checks the router answers every entry.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub write: bool,
    pub request: Option<&'static str>,
    pub response: Option<&'static str>,
}

const fn r(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    write: bool,
    request: Option<&'static str>,
    response: Option<&'static str>,
) -> Route {
    Route {
        method,
        path,
        summary,
        write,
        request,
        response,
    }
}

/// Every inventory route, `{kind}` expanded per kind in the document.
pub const ROUTES: &[Route] = &[
    r(
        "get",
        "/api/v1/{kind}",
        "List all objects of a kind",
        false,
        None,
        Some("[]"),
    ),
    r(
        "post",
        "/api/v1/{kind}",
        "Create an object",
        true,
        Some("."),
        Some("."),
    ),
    r(
        "get",
        "/api/v1/{kind}/{name}",
        "Show one object",
        false,
        None,
        Some("."),
    ),
    r(
        "put",
        "/api/v1/{kind}/{name}",
        "Replace an object",
        true,
        Some("."),
        Some("."),
    ),
    r(
        "patch",
        "/api/v1/{kind}/{name}",
        "Merge-patch an object (RFC 7386)",
        true,
        Some("Object"),
        Some("."),
    ),
    r(
        "delete",
        "/api/v1/{kind}/{name}",
        "Remove an object (?recursive=true removes its dependents)",
        true,
        None,
        Some("Removed"),
    ),
    r(
        "post",
        "/api/v1/{kind}/{name}/copy",
        "Copy an object",
        true,
        Some("NewName"),
        Some("."),
    ),
    r(
        "post",
        "/api/v1/{kind}/{name}/rename",
        "Rename an object and every reference to it",
        true,
        Some("NewName"),
        Some("."),
    ),
    r(
        "get",
        "/api/v1/{kind}/{name}/blended",
        "Blended variables with their sources",
        false,
        None,
        Some("Blended"),
    ),
    r(
        "get",
        "/api/v1/systems/{name}/autoinstall",
        "Render the system's autoinstall file",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/api/v1/profiles/{name}/autoinstall",
        "Render the profile's autoinstall file",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/api/v1/systems/{name}/nocloud/{doc}",
        "cloud-init NoCloud user-data or meta-data",
        false,
        None,
        Some("text"),
    ),
    r(
        "post",
        "/api/v1/systems/{name}/status",
        "Report install start, finish or failure (no token)",
        false,
        Some("StatusReport"),
        Some("StatusRow"),
    ),
    r(
        "post",
        "/api/v1/systems/{name}/status/{event}",
        "Report an install event by URL (no token)",
        false,
        None,
        Some("StatusRow"),
    ),
    r(
        "get",
        "/api/v1/systems/{name}/power",
        "The system's power state, read from its BMC",
        false,
        None,
        Some("PowerStatus"),
    ),
    r(
        "post",
        "/api/v1/systems/{name}/power",
        "Power on, off or cycle, with an optional one-time boot device",
        true,
        Some("PowerRequest"),
        Some("PowerDone"),
    ),
    r(
        "post",
        "/api/v1/systems/{name}/media",
        "Insert an ISO by URL as virtual media, or eject it (Redfish BMCs)",
        true,
        Some("MediaRequest"),
        Some("MediaDone"),
    ),
    r(
        "get",
        "/api/v1/status",
        "Install status of every system",
        false,
        None,
        Some("[StatusRow]"),
    ),
    r(
        "get",
        "/api/v1/settings",
        "Global settings",
        false,
        None,
        Some("Settings"),
    ),
    r(
        "put",
        "/api/v1/settings",
        "Replace the global settings",
        true,
        Some("Settings"),
        Some("Settings"),
    ),
    r(
        "post",
        "/api/v1/batch",
        "Create or replace many objects in one commit",
        true,
        Some("Batch"),
        Some("Object"),
    ),
    r(
        "get",
        "/api/v1/boot/{mac}",
        "The iPXE script this MAC gets now",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/api/v1/openapi.json",
        "This document",
        false,
        None,
        Some("Object"),
    ),
    r(
        "get",
        "/cblr/svc/op/autoinstall/system/{name}",
        "Cobbler-compatible autoinstall URL",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/cblr/svc/op/autoinstall/profile/{name}",
        "Cobbler-compatible autoinstall URL",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/cblr/svc/op/nopxe/system/{name}",
        "Cobbler-compatible: install finished, netboot off",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/cblr/svc/op/trig/mode/{mode}/system/{name}",
        "Cobbler-compatible trigger: pre (start) or post (finish)",
        false,
        None,
        Some("text"),
    ),
    r(
        "get",
        "/blobs/sha256/{hex}",
        "A kernel, initrd or other blob by digest",
        false,
        None,
        Some("binary"),
    ),
];

fn kind_schema(kind: Kind) -> &'static str {
    match kind {
        Kind::Distro => "Distro",
        Kind::Profile => "Profile",
        Kind::System => "System",
        Kind::Repo => "Repo",
        Kind::Image => "Image",
        Kind::Template | Kind::Snippet => "Text",
    }
}

/// The OpenAPI 3.1 document for [`ROUTES`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::content::ContentBuilder;
    use utoipa::openapi::path::{
        HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
    };
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApiBuilder, PathsBuilder, RefOr};

    let mut components = ComponentsBuilder::new()
        .schema_from::<super::model::Distro>()
        .schema_from::<super::model::Profile>()
        .schema_from::<super::model::System>()
        .schema_from::<super::model::Interface>()
        .schema_from::<super::model::Power>()
        .schema_from::<super::model::Repo>()
        .schema_from::<super::model::Image>()
        .schema_from::<super::model::Text>()
        .schema_from::<super::model::Kind>()
        .schema_from::<Settings>()
        .schema_from::<super::DefaultBoot>()
        .schema_from::<Blended>()
        .schema_from::<super::blend::Sourced>()
        .schema_from::<StatusRow>()
        .schema_from::<status::Record>()
        .schema_from::<status::State>()
        .schema_from::<Event>()
        .schema_from::<StatusReport>()
        .schema_from::<NewName>()
        .schema_from::<Removed>()
        .schema_from::<Batch>()
        .schema_from::<BatchItem>()
        .schema_from::<crate::bmc::api::PowerStatus>()
        .schema_from::<crate::bmc::api::PowerRequest>()
        .schema_from::<crate::bmc::api::PowerAction>()
        .schema_from::<crate::bmc::api::PowerDone>()
        .schema_from::<crate::bmc::api::MediaRequest>()
        .schema_from::<crate::bmc::api::MediaAction>()
        .schema_from::<crate::bmc::api::MediaDone>()
        .schema_from::<crate::bmc::PowerState>()
        .schema_from::<crate::bmc::BootDevice>()
        .schema(
            "Error",
            ObjectBuilder::new()
                .property(
                    "code",
                    ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                )
                .property(
                    "message",
                    ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                )
                .required("code")
                .required("message"),
        )
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .build();
    components
        .schemas
        .entry("Object".into())
        .or_insert_with(|| RefOr::T(Schema::Object(ObjectBuilder::new().build())));

    let schema_ref = |name: &str| -> RefOr<Schema> {
        if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            let items: RefOr<Schema> = utoipa::openapi::Ref::from_schema_name(inner).into();
            RefOr::T(Schema::Array(ArrayBuilder::new().items(items).build()))
        } else {
            utoipa::openapi::Ref::from_schema_name(name).into()
        }
    };
    let mut paths = PathsBuilder::new();
    for route in ROUTES {
        let kinds: Vec<Option<Kind>> = if route.path.contains("{kind}") {
            Kind::ALL.iter().map(|k| Some(*k)).collect()
        } else {
            vec![None]
        };
        for kind in kinds {
            let path = match kind {
                Some(k) => route.path.replace("{kind}", k.plural()),
                None => route.path.to_owned(),
            };
            let resolve = |s: &str| -> String {
                match (s, kind) {
                    (".", Some(k)) => kind_schema(k).to_owned(),
                    ("[]", Some(k)) => format!("[{}]", kind_schema(k)),
                    _ => s.to_owned(),
                }
            };
            let mut op = OperationBuilder::new()
                .summary(Some(match kind {
                    Some(k) => format!("{} ({})", route.summary, k.plural()),
                    None => route.summary.to_owned(),
                }))
                .operation_id(Some(format!(
                    "{}_{}",
                    route.method,
                    path.trim_start_matches('/')
                        .replace(['/', '.', '-'], "_")
                        .replace(['{', '}'], "")
                )))
                .tag(
                    kind.map(|k| k.plural())
                        .unwrap_or(if path.starts_with("/cblr") {
                            "cobbler"
                        } else {
                            "appliance"
                        }),
                );
            for seg in path.split('/') {
                if let Some(p) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    op = op.parameter(
                        ParameterBuilder::new()
                            .name(p)
                            .parameter_in(ParameterIn::Path)
                            .required(utoipa::openapi::Required::True)
                            .schema(Some(
                                ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                            )),
                    );
                }
            }
            if route.method == "delete" {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name("recursive")
                        .parameter_in(ParameterIn::Query)
                        .required(utoipa::openapi::Required::False)
                        .schema(Some(
                            ObjectBuilder::new().schema_type(SchemaType::new(Type::Boolean)),
                        )),
                );
            }
            if let Some(req) = route.request {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(schema_ref(&resolve(req))))
                                .build(),
                        )
                        .required(Some(utoipa::openapi::Required::True))
                        .build(),
                ));
            }
            let ok = match route.response.map(resolve).as_deref() {
                Some("text") => ResponseBuilder::new()
                    .description("OK")
                    .content("text/plain", ContentBuilder::new().build()),
                Some("binary") => ResponseBuilder::new()
                    .description("OK")
                    .content("application/octet-stream", ContentBuilder::new().build()),
                Some(s) => ResponseBuilder::new().description("OK").content(
                    "application/json",
                    ContentBuilder::new().schema(Some(schema_ref(s))).build(),
                ),
                None => ResponseBuilder::new().description("OK"),
            };
            let code = if route.method == "post"
                && matches!(route.request, Some(".") | Some("NewName") | Some("Batch"))
                && !path.ends_with("/rename")
            {
                "201"
            } else {
                "200"
            };
            op = op.response(code, ok.build());
            op = op.response(
                "default",
                ResponseBuilder::new()
                    .description("Error with a stable code")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(schema_ref("Error")))
                            .build(),
                    )
                    .build(),
            );
            if route.write {
                op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
            }
            let method = match route.method {
                "get" => HttpMethod::Get,
                "post" => HttpMethod::Post,
                "put" => HttpMethod::Put,
                "patch" => HttpMethod::Patch,
                _ => HttpMethod::Delete,
            };
            paths = paths.path(path, PathItem::new(method, op.build()));
        }
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("appliance inventory API")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}

/// Opens the inventory at `<data>/inventory`, the install status book at
/// `<data>/state/install-status.json` and the tokens at
/// `<data>/state/tokens.json` (`serve` creates the first token, see
/// [`crate::serve::first_token`]).
pub fn open_state(
    data: &std::path::Path,
    public_reads: bool,
    events: crate::events::Events,
) -> anyhow::Result<Arc<InvState>> {
    use anyhow::Context;
    let root = data.join("inventory");
    let t = std::time::Instant::now();
    let inv = Inventory::open(&root)
        .with_context(|| format!("opening the inventory {}", root.display()))?;
    tracing::info!(
        systems = inv.count(Kind::System),
        profiles = inv.count(Kind::Profile),
        ms = t.elapsed().as_millis() as u64,
        "inventory loaded"
    );
    let status = StatusBook::open(Some(&data.join("state/install-status.json")))?;
    let tokens = TokenStore::open(&data.join("state/tokens.json"));
    let state = InvState {
        inventory: Arc::new(RwLock::new(inv)),
        status: Mutex::new(status),
        tokens,
        public_reads,
        blobs: data.join("blobs/sha256"),
        events,
    };
    Ok(Arc::new(state))
}
