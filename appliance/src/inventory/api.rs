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

use crate::http::Query;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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
use crate::http::{Caller, Guard, Route};

/// Everything the inventory handlers need.
pub struct InvState {
    pub inventory: Arc<RwLock<Inventory>>,
    pub status: Mutex<StatusBook>,
    pub tokens: Arc<TokenStore>,
    /// Serve reads without a token.
    pub public_reads: bool,
    /// `<data>/blobs/sha256`.
    pub blobs: PathBuf,
    /// The server's event log (power actions are recorded there).
    pub events: crate::events::Events,
    /// Group commit of API writes ([`super::group`]).
    pub committer: super::group::Committer,
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

    /// Runs a write through the group committer (off the async runtime:
    /// it may wait for a sync) and answers once the change is durable.
    pub(crate) async fn write_op<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&mut Inventory) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let st = self.clone();
        tokio::task::spawn_blocking(move || st.committer.run(&st.inventory, op))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage_failed",
                    format!("the inventory write did not finish: {e}"),
                )
            })?
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
            InvError::Storage(_) | InvError::NotDurable(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
/// The inventory's routes: the Cobbler model under `/api/v1`, the
/// target-facing service URLs (autoinstall files, status reports, boot
/// scripts, boot files) public because targets carry no token.
pub fn routes(state: Arc<InvState>) -> Vec<Route> {
    let st = state;
    use Guard::{Operator, Public, Read};
    vec![
        Route::get("/api/v1/{kind}", Read, "List objects of a kind (paged by name)")
            .response("[]")
            .to(list, st.clone()),
        Route::post("/api/v1/{kind}", Operator, "Create an object")
            .request(".")
            .response(".")
            .creates()
            .to(create, st.clone()),
        Route::patch(
            "/api/v1/{kind}",
            Operator,
            "Bulk edit: merge-patch every system the query selects (profile, image, prefix, netboot, or all=true), one commit",
        )
        .request("Object")
        .response("BulkEdited")
        .to(bulk_patch, st.clone()),
        Route::get("/api/v1/{kind}/{name}", Read, "Show one object, with its ETag")
            .response(".")
            .to(show, st.clone()),
        Route::put("/api/v1/{kind}/{name}", Operator, "Replace an object (If-Match: 412 when stale)")
            .request(".")
            .response(".")
            .to(replace, st.clone()),
        Route::patch(
            "/api/v1/{kind}/{name}",
            Operator,
            "Merge-patch an object (RFC 7386; If-Match: 412 when stale)",
        )
        .request("Object")
        .response(".")
        .to(patch, st.clone()),
        Route::delete(
            "/api/v1/{kind}/{name}",
            Operator,
            "Remove an object (?recursive=true removes its dependants too; If-Match: 412 when stale)",
        )
        .response("Removed")
        .to(remove, st.clone()),
        Route::post("/api/v1/{kind}/{name}/copy", Operator, "Copy an object")
            .request("NewName")
            .response(".")
            .creates()
            .to(copy, st.clone()),
        Route::post(
            "/api/v1/{kind}/{name}/rename",
            Operator,
            "Rename an object and every reference to it",
        )
        .request("NewName")
        .response(".")
        .to(rename, st.clone()),
        Route::get(
            "/api/v1/{kind}/{name}/blended",
            Read,
            "Blended variables with their sources",
        )
        .response("Blended")
        .to(blended, st.clone()),
        Route::get(
            "/api/v1/{kind}/{name}/autoinstall",
            Public,
            "Render a system's or profile's autoinstall file (installers fetch it)",
        )
        .response("text")
        .to(autoinstall, st.clone()),
        Route::get(
            "/api/v1/systems/{name}/nocloud/{doc}",
            Public,
            "cloud-init NoCloud user-data or meta-data",
        )
        .response("text")
        .to(nocloud, st.clone()),
        Route::post(
            "/api/v1/systems/{name}/status",
            Public,
            "Report install start, finish or failure (no token)",
        )
        .request("StatusReport")
        .response("StatusRow")
        .limit(64 << 10)
        .to(report_status, st.clone()),
        Route::post(
            "/api/v1/systems/{name}/status/{event}",
            Public,
            "Report an install event by URL (no token)",
        )
        .response("StatusRow")
        .limit(64 << 10)
        .to(report_event, st.clone()),
        Route::get(
            "/api/v1/systems/{name}/power",
            Read,
            "The system's power state, read from its BMC",
        )
        .response("PowerStatus")
        .to(crate::bmc::api::get_power, st.clone()),
        Route::post(
            "/api/v1/systems/{name}/power",
            Operator,
            "Power on, off or cycle, with an optional one-time boot device",
        )
        .request("PowerRequest")
        .response("PowerDone")
        .to(crate::bmc::api::post_power, st.clone()),
        Route::post(
            "/api/v1/systems/{name}/preview",
            Operator,
            "Render a template (saved, or unsaved text) for this system, changing nothing",
        )
        .request("PreviewRequest")
        .response("text")
        .limit(256 * 1024)
        .to(preview, st.clone()),
        Route::post(
            "/api/v1/systems/{name}/media",
            Operator,
            "Insert an ISO by URL as virtual media, or eject it (Redfish BMCs)",
        )
        .request("MediaRequest")
        .response("MediaDone")
        .to(crate::bmc::api::post_media, st.clone()),
        Route::get("/api/v1/status", Read, "Install status of every system")
            .response("[StatusRow]")
            .to(list_status, st.clone()),
        Route::get("/api/v1/settings", Read, "Global settings")
            .response("Settings")
            .to(get_settings, st.clone()),
        Route::put(
            "/api/v1/settings",
            Guard::Admin,
            "Replace the global settings",
        )
        .request("Settings")
        .response("Settings")
        .to(put_settings, st.clone()),
        Route::post(
            "/api/v1/batch",
            Operator,
            "Create or replace many objects in one commit",
        )
        .request("Batch")
        .response("Object")
        .creates()
        .limit(64 << 20)
        .to(batch, st.clone()),
        Route::get(
            "/api/v1/boot/{mac}",
            Public,
            "The iPXE script this MAC gets now",
        )
        .response("text")
        .to(boot_script, st.clone()),
        Route::get(
            "/cblr/svc/op/autoinstall/{kind}/{name}",
            Public,
            "Cobbler-compatible autoinstall URL (kind: system or profile)",
        )
        .response("text")
        .to(cobbler_autoinstall, st.clone()),
        Route::get(
            "/cblr/svc/op/ks/{kind}/{name}",
            Public,
            "Cobbler-compatible kickstart URL (kind: system or profile)",
        )
        .response("text")
        .to(cobbler_autoinstall, st.clone()),
        Route::get(
            "/cblr/svc/op/nopxe/system/{name}",
            Public,
            "Cobbler-compatible: install finished, netboot off",
        )
        .response("text")
        .to(cobbler_nopxe, st.clone()),
        Route::post(
            "/cblr/svc/op/nopxe/system/{name}",
            Public,
            "Cobbler-compatible: install finished, netboot off",
        )
        .response("text")
        .limit(64 << 10)
        .to(cobbler_nopxe, st.clone()),
        Route::get(
            "/cblr/svc/op/trig/mode/{mode}/system/{name}",
            Public,
            "Cobbler-compatible trigger: pre (start) or post (finish)",
        )
        .response("text")
        .to(cobbler_trig, st.clone()),
        Route::post(
            "/cblr/svc/op/trig/mode/{mode}/system/{name}",
            Public,
            "Cobbler-compatible trigger: pre (start) or post (finish)",
        )
        .response("text")
        .limit(64 << 10)
        .to(cobbler_trig, st.clone()),
        Route::get(
            "/blobs/sha256/{hex}",
            Public,
            "A distro's kernel or initrd by digest (boot files only; carry no secret)",
        )
        .response("binary")
        .to(boot_blob, st.clone()),
        Route::get(
            "/api/v1/blobs/sha256/{hex}",
            Read,
            "Any blob of the data partition by digest",
        )
        .response("binary")
        .to(blob, st),
    ]
}

/// The inventory's routes alone (tests), guarded by its own tokens.
pub fn router(state: Arc<InvState>) -> Router {
    let auth = crate::http::Auth::new(Some(state.tokens.clone()), state.public_reads);
    let mut all = routes(state.clone());
    all.extend(super::profile_report::routes(state));
    crate::http::build(all, auth)
}

/// Whether `sha256:<hex>` is a distro's kernel or initrd.
fn is_boot_file(inv: &Inventory, hex: &str) -> bool {
    let want = format!("sha256:{hex}");
    inv.list(Kind::Distro).any(|o| match o {
        Object::Distro(d) => d.kernel == want || d.initrd == want,
        _ => false,
    })
}

/// `/blobs/sha256/{hex}` without a token: only boot files. Captured disks
/// and everything else in the blob store need a token
/// (`/api/v1/blobs/sha256/{hex}`).
async fn boot_blob(
    State(st): S,
    Path(hex): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    if !is_boot_file(&st.read(), &hex) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("sha256:{hex} is not a distro's kernel or initrd; other blobs are at /api/v1/blobs/sha256/{{hex}} with a token"),
        ));
    }
    blob(State(st), Path(hex), req).await
}

async fn list(
    State(st): S,
    Path(kind): Path<String>,
    page: crate::http::PageParams,
) -> Result<Json<crate::http::Paged<serde_json::Value>>, ApiError> {
    let kind = kind_of(&kind)?;
    let inv = st.read();
    // Page by name first, then serialise only the page's objects.
    // Templates and snippets also list the shipped ones an inventory
    // object of the same name does not override.
    let shipped = shipped_texts(kind)
        .iter()
        .filter(|(name, _)| inv.get(kind, name).is_none())
        .map(|&(name, body)| (name.to_owned(), Some(body)));
    let names = inv
        .list(kind)
        .map(|o| (o.name().to_owned(), None))
        .chain(shipped);
    let p = page.page(names, |(n, _)| n.clone());
    let items = p
        .items
        .into_iter()
        .filter_map(|(name, builtin)| match builtin {
            Some(body) => Some(builtin_json(&name, body)),
            None => inv
                .get(kind, &name)
                .map(|o| with_origin(kind, o.to_api_json())),
        })
        .collect();
    Ok(Json(crate::http::Paged {
        items,
        next: p.next,
    }))
}

async fn show(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let inv = st.read();
    if let Some(o) = inv.get(kind, &name) {
        let v = o.to_api_json();
        let tag = etag(&v);
        return Ok(([(header::ETAG, tag)], Json(with_origin(kind, v))).into_response());
    }
    // An inventory template overrides a shipped one of the same name.
    match shipped_texts(kind).iter().find(|(n, _)| *n == name) {
        Some((n, body)) => Ok(Json(builtin_json(n, body)).into_response()),
        None => Err(InvError::NotFound { kind, name }.into()),
    }
}

/// The strong `ETag` of an object: `"sha256:<hex>"` of its JSON as the
/// API shows it (so a stored password enters it only as the placeholder
/// and the tag reveals nothing the GET does not).
pub fn etag(api_json: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(api_json).unwrap_or_default();
    format!("\"{}\"", builder::digest::Digest::of(&bytes))
}

/// Honours `If-Match` against the object as it is now (`None`: it does
/// not exist): no header passes; `*` passes when it exists; otherwise
/// one of the listed strong tags must equal its [`etag`]. Refusal: 412
/// `precondition_failed` with the current tag (header and message).
fn check_if_match(headers: &HeaderMap, now: Option<&Object>) -> Result<(), ApiError> {
    let Some(h) = headers.get(header::IF_MATCH) else {
        return Ok(());
    };
    let sent = h
        .to_str()
        .map_err(|_| bad_request("If-Match: not visible ASCII"))?;
    let current = now.map(|o| etag(&o.to_api_json()));
    let ok = match &current {
        None => false,
        Some(tag) => sent
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t == tag.as_str()),
    };
    if ok {
        return Ok(());
    }
    let e = ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        match &current {
            Some(tag) => format!(
                "If-Match {sent} is stale: the object changed since it was read (it is now {tag}); read it again"
            ),
            None => format!("If-Match {sent}: the object does not exist"),
        },
    );
    Err(match current {
        Some(tag) => e.with_etag(tag),
        None => e,
    })
}

/// A written object's answer: its JSON and its new `ETag`.
fn with_etag(v: serde_json::Value) -> Response {
    let tag = etag(&v);
    ([(header::ETAG, tag)], Json(v)).into_response()
}

/// The templates or snippets shipped in the binary (none for other kinds).
fn shipped_texts(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Template => super::templates::SHIPPED,
        Kind::Snippet => super::templates::SHIPPED_SNIPPETS,
        _ => &[],
    }
}

/// Templates and snippets say where they come from: `inventory` (this
/// object, overriding a shipped one of the same name) or `builtin`.
fn with_origin(kind: Kind, mut v: serde_json::Value) -> serde_json::Value {
    if kind.is_text() {
        if let Some(m) = v.as_object_mut() {
            m.insert("origin".into(), "inventory".into());
        }
    }
    v
}

fn builtin_json(name: &str, body: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "body": body, "origin": "builtin"})
}

async fn create(
    State(st): S,
    caller: Caller,
    Path(kind): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
    let mut v = parse_body(&body)?;
    keep_secrets(kind, &mut v, None)?;
    let obj = Object::from_json(kind, v).map_err(|e| InvError::Invalid(e, kind))?;
    let name = obj.name().to_owned();
    let v = st
        .write_op(move |inv| {
            inv.create(obj, &author)?;
            Ok(inv.get(kind, &name).expect("created").to_api_json())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn replace(
    State(st): S,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
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
    let v = st
        .write_op(move |inv| {
            check_if_match(&headers, inv.get(kind, &name))?;
            keep_secrets(kind, &mut v, inv.get(kind, &name))?;
            let obj = Object::from_json(kind, v).map_err(|e| InvError::Invalid(e, kind))?;
            inv.update(obj, &author)?;
            Ok(inv.get(kind, &name).expect("updated").to_api_json())
        })
        .await?;
    Ok(with_etag(v))
}

async fn patch(
    State(st): S,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
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
    let v = st
        .write_op(move |inv| {
            check_if_match(&headers, inv.get(kind, &name))?;
            Ok(inv.patch(kind, &name, &v, &author)?.to_api_json())
        })
        .await?;
    Ok(with_etag(v))
}

/// The answer to a bulk edit.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkEdited {
    /// Systems the filter selected.
    pub matched: usize,
    /// Systems the patch changed (the rest already had its values).
    pub changed: usize,
}

async fn bulk_patch(
    State(st): S,
    caller: Caller,
    Path(kind): Path<String>,
    Query(filter): Query<super::SystemFilter>,
    body: Bytes,
) -> Result<Json<BulkEdited>, ApiError> {
    let kind = kind_of(&kind)?;
    if kind != Kind::System {
        return Err(bad_request(format!(
            "bulk edit is for systems; PATCH /api/v1/{}/{{name}} edits one {kind}",
            kind.plural()
        )));
    }
    filter.check().map_err(bad_request)?;
    let author = Author::new(&caller.name());
    let mut v = parse_body(&body)?;
    if !v.is_object() {
        return Err(bad_request(
            "a bulk edit takes a JSON object (an RFC 7386 merge patch)",
        ));
    }
    if let Some(p) = v.pointer_mut("/power").and_then(|p| p.as_object_mut()) {
        if p.get("password").and_then(|x| x.as_str()) == Some(REDACTED) {
            p.remove("password");
        }
    }
    let done = st
        .write_op(move |inv| {
            let (matched, changed) = inv.patch_systems(&filter, &v, &author)?;
            Ok(BulkEdited { matched, changed })
        })
        .await?;
    Ok(Json(done))
}

async fn remove(
    State(st): S,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<RemoveQuery>,
    headers: HeaderMap,
) -> Result<Json<Removed>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
    let removed = st
        .write_op(move |inv| {
            check_if_match(&headers, inv.get(kind, &name))?;
            Ok(inv.remove(kind, &name, q.recursive, &author)?)
        })
        .await?;
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
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
    let new = new_name(&body)?;
    let v = st
        .write_op(move |inv| {
            inv.copy(kind, &name, &new, &author)?;
            Ok(inv.get(kind, &new).expect("copied").to_api_json())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn rename(
    State(st): S,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind_of(&kind)?;
    let author = Author::new(&caller.name());
    let new = new_name(&body)?;
    let v = st
        .write_op(move |inv| {
            inv.rename(kind, &name, &new, &author)?;
            Ok(inv.get(kind, &new).expect("renamed").to_api_json())
        })
        .await?;
    Ok(Json(v))
}

async fn blended(
    State(st): S,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Blended>, ApiError> {
    let kind = kind_of(&kind)?;
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

/// The body of `POST /api/v1/systems/{name}/preview`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PreviewRequest {
    /// Template to render (saved or shipped); empty: the system's own.
    pub template: String,
    /// Source text to render under that name instead of the saved one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

async fn preview(
    State(st): S,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: PreviewRequest = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "expected {{\"template\": NAME, \"body\": TEXT (optional)}}: {e}"
        ))
    })?;
    let mut job = templates::prepare(
        &st.read(),
        Kind::System,
        &name,
        Document::Autoinstall,
        &server_url(&headers),
    )?;
    if !req.template.is_empty() || req.body.is_some() {
        let t = if req.template.is_empty() {
            job.template().to_owned()
        } else {
            req.template
        };
        job = job.with_template(&t, req.body)?;
    }
    let text = job.render()?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
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
/// Record an install event for system `name` (and on finish, netboot off).
pub(crate) fn record(
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
    let mac = st.read().system(name).and_then(|s| {
        s.interfaces
            .iter()
            .map(|i| i.mac.clone())
            .find(|m| !m.is_empty())
    });
    st.events.publish(
        "install.status",
        mac.as_deref(),
        serde_json::json!({
            "system": name, "event": event, "message": message, "from": from,
            "netboot": netboot,
        }),
    );
    Ok(StatusRow {
        system: name.to_owned(),
        record,
        netboot,
        quiet: false,
    })
}

/// The reporting machine's address: the TCP peer, never a header it sent.
pub(super) fn peer(caller: &Caller) -> String {
    caller.peer.map(|p| p.ip().to_string()).unwrap_or_default()
}

/// A tokenless install report speaks for `name` only from an address this
/// appliance's DHCP leased to one of the system's MACs, or from an address
/// it never leased (another DHCP server's network: nothing to check
/// against, as for agent check-ins). Without this any machine could turn
/// any system's netboot off, or forge its install history.
fn check_reporter(st: &InvState, name: &str, caller: &Caller) -> Result<(), ApiError> {
    let Some(ip) = caller.peer.map(|p| p.ip()) else {
        return Ok(());
    };
    let Some(leased) = st.events.mac_of(ip) else {
        return Ok(());
    };
    let inv = st.read();
    let sys = inv.system(name).ok_or_else(|| InvError::NotFound {
        kind: Kind::System,
        name: name.to_owned(),
    })?;
    let ours = sys
        .interfaces
        .iter()
        .filter_map(|i| crate::net::parse_mac(&i.mac))
        .any(|m| crate::net::parse_mac(&leased) == Some(m));
    if ours {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "lease_mismatch",
            format!("{ip} was leased to {leased}, which is not an interface of system {name}"),
        ))
    }
}

async fn report_status(
    State(st): S,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<StatusRow>, ApiError> {
    check_reporter(&st, &name, &caller)?;
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
        &peer(&caller),
    )?))
}

pub(super) fn parse_event(s: &str) -> Result<Event, ApiError> {
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
    caller: Caller,
    Path((name, event)): Path<(String, String)>,
) -> Result<Json<StatusRow>, ApiError> {
    check_reporter(&st, &name, &caller)?;
    Ok(Json(record(
        &st,
        &name,
        parse_event(&event)?,
        "",
        &peer(&caller),
    )?))
}

async fn cobbler_nopxe(
    State(st): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<&'static str, ApiError> {
    check_reporter(&st, &name, &caller)?;
    record(&st, &name, Event::Finish, "nopxe", &peer(&caller))?;
    Ok("True")
}

async fn cobbler_trig(
    State(st): S,
    caller: Caller,
    Path((mode, name)): Path<(String, String)>,
) -> Result<&'static str, ApiError> {
    check_reporter(&st, &name, &caller)?;
    record(&st, &name, parse_event(&mode)?, "trigger", &peer(&caller))?;
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

async fn list_status(
    State(st): S,
    page: crate::http::PageParams,
) -> Result<Json<crate::http::Paged<StatusRow>>, ApiError> {
    let inv = st.read();
    let book = st.status.lock().unwrap_or_else(|e| e.into_inner());
    let rows = status_rows(&inv, &book, status::now());
    Ok(Json(page.page(rows, |r| r.system.clone())))
}

async fn get_settings(State(st): S) -> Result<Json<Settings>, ApiError> {
    Ok(Json(st.read().settings().clone()))
}

async fn put_settings(
    State(st): S,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Settings>, ApiError> {
    let author = Author::new(&caller.name());
    let s: Settings =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("settings: {e}")))?;
    let saved = s.clone();
    st.write_op(move |inv| Ok(inv.set_settings(s, &author)?))
        .await?;
    Ok(Json(saved))
}

async fn batch(
    State(st): S,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let author = Author::new(&caller.name());
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
    let n = st
        .write_op(move |inv| Ok(inv.put_many(objs, &author, &message)?))
        .await?;
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

pub(crate) fn kind_schema(kind: Kind) -> &'static str {
    match kind {
        Kind::Distro => "Distro",
        Kind::Profile => "Profile",
        Kind::System => "System",
        Kind::Repo => "Repo",
        Kind::Image => "Image",
        Kind::Template | Kind::Snippet => "Text",
    }
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
    let tokens = Arc::new(TokenStore::open(&data.join("state/tokens.json")));
    let state = InvState {
        inventory: Arc::new(RwLock::new(inv)),
        status: Mutex::new(status),
        tokens,
        public_reads,
        blobs: data.join("blobs/sha256"),
        events,
        committer: Default::default(),
    };
    Ok(Arc::new(state))
}
