//! The mirror's routes:
//!
//! - `POST /api/v1/repos/{name}/sync` (operator): start a sync job → 202
//!   and its status; 409 while one runs.
//! - `GET /api/v1/repos/{name}/sync` (read): the job's progress, the last
//!   sync (node-local, `<data>/state/repos/<name>.json`) and what the
//!   mirror holds (from the manifest the repo's `snapshot` names).
//! - `POST /api/v1/repos/{name}/import` (operator) `{"name"?}`: the
//!   Debian installer's distro and profile from an `installer` mirror
//!   ([`super::installer`]) → 201 `{"distro","profile","report"}`.
//! - `GET /repos/{name}/{*path}` (public: installers and apt fetch without
//!   a token; the mirror holds no secret): a file of the mirror, the
//!   same bytes upstream served, from the blob store.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::{Manifest, MirrorSpec, Progress, SyncReport};
use crate::api::ApiError;
use crate::http::{Caller, Guard, Route};
use crate::inventory::model::{Kind, Object, Repo};
use crate::inventory::{Author, Inventory};

/// A sync job's state.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    pub started_by: String,
    pub started: f64,
    pub finished: Option<f64>,
    pub progress: Progress,
    pub error: Option<String>,
    pub report: Option<SyncReport>,
}

/// Node-local record of the last sync (`<data>/state/repos/<name>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastSync {
    /// Unix seconds of the last successful sync.
    pub last_sync: Option<f64>,
    pub last_error: Option<String>,
    pub snapshot: Option<String>,
}

/// What the mirror routes need.
pub struct RepoState {
    pub data: PathBuf,
    pub inventory: Arc<RwLock<Inventory>>,
    pub events: crate::events::Events,
    jobs: Mutex<HashMap<String, Job>>,
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
    /// Snapshots found whole (blobs are immutable: once whole, always).
    whole: Mutex<HashSet<String>>,
}

impl RepoState {
    pub fn new(
        data: PathBuf,
        inventory: Arc<RwLock<Inventory>>,
        events: crate::events::Events,
    ) -> Arc<Self> {
        Arc::new(RepoState {
            data,
            inventory,
            events,
            jobs: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            whole: Mutex::new(HashSet::new()),
        })
    }

    fn repo(&self, name: &str) -> Option<Repo> {
        match crate::inventory::fresh_read(&self.inventory).get(Kind::Repo, name) {
            Some(Object::Repo(r)) => Some(r.clone()),
            _ => None,
        }
    }

    fn manifest(&self, digest: &str) -> anyhow::Result<Arc<Manifest>> {
        if let Some(m) = self.lock_manifests().get(digest) {
            return Ok(m.clone());
        }
        let m = Arc::new(Manifest::from_blob(&self.data, digest)?);
        let mut cache = self.lock_manifests();
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(digest.to_owned(), m.clone());
        Ok(m)
    }

    /// The snapshot `/repos/NAME/` serves: the repo's `snapshot` when
    /// every file it names is on this node, else the last snapshot this
    /// node published itself (a snapshot that arrived by sync before its
    /// blobs did is never served half). `None`: nothing whole to serve.
    pub fn published(&self, name: &str, repo: &Repo) -> anyhow::Result<Option<Arc<Manifest>>> {
        let mut first_err = None;
        // The node-local record is read only when the repo's own snapshot
        // is not whole here.
        let candidates = std::iter::once(Some(repo.snapshot.clone()))
            .chain(std::iter::once_with(|| self.last(name).snapshot))
            .flatten();
        for d in candidates {
            if d.is_empty() {
                continue;
            }
            match self
                .manifest(&d)
                .and_then(|m| self.whole(&d, &m).map(|_| m))
            {
                Ok(m) => return Ok(Some(m)),
                Err(e) => {
                    tracing::warn!(repo = name, snapshot = %d, error = format!("{e:#}"), "not serving an incomplete snapshot");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Checks once per snapshot that all its blobs are here.
    fn whole(&self, digest: &str, m: &Manifest) -> anyhow::Result<()> {
        if self.lock_whole().contains(digest) {
            return Ok(());
        }
        super::check_complete(&self.data, &m.files)?;
        self.lock_whole().insert(digest.to_owned());
        Ok(())
    }

    fn lock_whole(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.whole.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_manifests(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Manifest>>> {
        self.manifests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn last_path(&self, name: &str) -> PathBuf {
        self.data.join("state/repos").join(format!("{name}.json"))
    }

    /// The node-local record of the last sync of `name`.
    pub fn last(&self, name: &str) -> LastSync {
        std::fs::read(self.last_path(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_last(&self, name: &str, last: &LastSync) {
        let path = self.last_path(name);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(last).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "recording the repo sync");
        }
    }

    /// Runs one sync of `name` to the end (blocking): the job record, the
    /// repo's `snapshot`, the node-local record and events.
    pub fn run_sync(self: &Arc<Self>, name: &str) -> anyhow::Result<SyncReport> {
        let result = (|| {
            let repo = self
                .repo(name)
                .ok_or_else(|| anyhow::anyhow!("no repo {name}"))?;
            let spec = MirrorSpec::from_repo(&self.data, &repo)?;
            let previous = (!repo.snapshot.is_empty())
                .then(|| self.manifest(&repo.snapshot).ok())
                .flatten();
            let fetcher = super::fetcher_for(&spec.upstream);
            let me = self.clone();
            let n = name.to_owned();
            let report = super::sync_mirror(
                &self.data,
                &spec,
                previous.as_deref(),
                fetcher.as_ref(),
                &mut |p| {
                    if let Some(j) = me.lock_jobs().get_mut(&n) {
                        j.progress = p.clone();
                    }
                },
            )?;
            // Record the snapshot in the inventory (it travels with sync);
            // unchanged manifests change nothing.
            let mut inv = crate::inventory::fresh_write(&self.inventory);
            if let Some(Object::Repo(mut r)) = inv.get(Kind::Repo, name).cloned() {
                if r.snapshot != report.snapshot {
                    r.snapshot = report.snapshot.clone();
                    inv.update(Object::Repo(r), &Author::new("repo-sync"))?;
                }
            }
            Ok(report)
        })();
        let mut last = self.last(name);
        let now = now();
        match &result {
            Ok(r) => {
                last.last_sync = Some(now);
                last.last_error = None;
                last.snapshot = Some(r.snapshot.clone());
                self.events.publish(
                    "repo.sync.done",
                    None,
                    json!({"repo": name, "snapshot": r.snapshot, "packages": r.packages,
                           "bytes": r.bytes, "files_downloaded": r.files_downloaded,
                           "bytes_downloaded": r.bytes_downloaded}),
                );
            }
            Err(e) => {
                last.last_error = Some(format!("{e:#}"));
                self.events.publish(
                    "repo.sync.failed",
                    None,
                    json!({"repo": name, "error": format!("{e:#}")}),
                );
            }
        }
        self.save_last(name, &last);
        if let Some(j) = self.lock_jobs().get_mut(name) {
            j.finished = Some(now);
            match &result {
                Ok(r) => {
                    j.state = "done";
                    j.report = Some(r.clone());
                }
                Err(e) => {
                    j.state = "failed";
                    j.error = Some(format!("{e:#}"));
                }
            }
        }
        result
    }

    /// What `GET /api/v1/repos/{name}/sync` answers.
    pub fn status(&self, name: &str) -> Option<Value> {
        let repo = self.repo(name)?;
        let job = self.lock_jobs().get(name).cloned();
        let last = self.last(name);
        let mut v = json!({
            "name": name,
            "upstream": repo.mirror,
            "state": job.as_ref().map(|j| j.state).unwrap_or("idle"),
            "job": job,
            "last_sync": last.last_sync,
            "last_error": last.last_error,
            "snapshot": (!repo.snapshot.is_empty()).then_some(&repo.snapshot),
        });
        if !repo.snapshot.is_empty() {
            match self.manifest(&repo.snapshot) {
                Ok(m) => {
                    v["packages"] = m.packages.len().into();
                    v["bytes"] = m.bytes.into();
                    v["files"] = m.files.len().into();
                    // Installer udebs upstream did not serve (404).
                    v["missing"] = json!(m.missing);
                    v["suites"] = json!(m
                        .suites
                        .iter()
                        .map(|(s, i)| (s.clone(), json!({"date": i.date, "by_hash": i.by_hash})))
                        .collect::<serde_json::Map<_, _>>());
                }
                Err(e) => v["manifest_error"] = format!("{e:#}").into(),
            }
        }
        Some(v)
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

type S = State<Arc<RepoState>>;

fn no_repo(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no repo {name}"),
    )
}

async fn start_sync(st: S, caller: Caller, UrlPath(name): UrlPath<String>) -> Response {
    let st = st.0;
    let Some(repo) = st.repo(&name) else {
        return no_repo(&name).into_response();
    };
    if repo.breed != "apt" {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "not_apt",
            format!(
                "repo {name} has breed {:?}: only apt repos are mirrored",
                repo.breed
            ),
        )
        .into_response();
    }
    {
        let mut jobs = st.lock_jobs();
        if jobs.get(&name).is_some_and(|j| j.state == "running") {
            return ApiError::new(
                StatusCode::CONFLICT,
                "sync_running",
                format!("a sync of {name} is running"),
            )
            .into_response();
        }
        jobs.insert(
            name.clone(),
            Job {
                state: "running",
                started_by: caller.name(),
                started: now(),
                finished: None,
                progress: Progress::default(),
                error: None,
                report: None,
            },
        );
    }
    st.events.publish(
        "repo.sync.started",
        None,
        json!({"repo": name, "by": caller.name()}),
    );
    let s = st.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = s.run_sync(&n) {
            tracing::warn!(repo = %n, error = format!("{e:#}"), "repo sync failed");
        }
    });
    let body = st.status(&name).unwrap_or(Value::Null);
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

async fn sync_status(st: S, UrlPath(name): UrlPath<String>) -> Response {
    match st.status(&name) {
        Some(v) => Json(v).into_response(),
        None => no_repo(&name).into_response(),
    }
}

async fn mirror_file(
    st: S,
    UrlPath((name, path)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    let not_found =
        |what: String| ApiError::new(StatusCode::NOT_FOUND, "not_found", what).into_response();
    let Some(repo) = st.repo(&name) else {
        return no_repo(&name).into_response();
    };
    let s2 = st.0.clone();
    let n2 = name.clone();
    let m = match tokio::task::spawn_blocking(move || s2.published(&n2, &repo)).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return not_found(format!("repo {name} has not been synced")),
        Ok(Err(e)) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "manifest_unreadable",
                format!("{e:#}"),
            )
            .into_response()
        }
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "manifest_unreadable",
                e.to_string(),
            )
            .into_response()
        }
    };
    let rel = path.trim_start_matches('/');
    let Some(f) = m.files.get(rel) else {
        return not_found(format!("{path} is not in the mirror {name}"));
    };
    let Ok(blob) = super::blob_path(&st.data, &f.digest) else {
        return not_found(format!("{path}: bad digest"));
    };
    if !blob.is_file() {
        return not_found(format!("{path}: blob {} is not on this node", f.digest));
    }
    let etag = format!("\"{}\"", f.digest.trim_start_matches("sha256:"));
    let cache = cache_control(rel);
    let mut req = req;
    // If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    if let Some(inm) = req.headers().get(header::IF_NONE_MATCH) {
        let hit = inm.to_str().unwrap_or("").split(',').any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        });
        if hit && matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(header::ETAG, hv(&etag));
            r.headers_mut().insert(header::CACHE_CONTROL, hv(cache));
            return r;
        }
        req.headers_mut().remove(header::IF_MODIFIED_SINCE);
    }
    // A path that changes with each publish is validated by its ETag
    // only: a blob's mtime says when those bytes reached this node, not
    // when they were published here (a new InRelease written in the same
    // second as the old one, or a publish back to older bytes, would be
    // answered 304 and apt would keep the stale index).
    let mutable = !cache.contains("immutable");
    if mutable {
        req.headers_mut().remove(header::IF_MODIFIED_SINCE);
        req.headers_mut().remove(header::IF_UNMODIFIED_SINCE);
    }
    // An If-Range naming another entity: the whole file.
    if let Some(ir) = req.headers().get(header::IF_RANGE) {
        let ir = ir.to_str().unwrap_or("");
        if ir.starts_with('"') || ir.starts_with("W/") {
            if ir != etag {
                req.headers_mut().remove(header::RANGE);
            }
            req.headers_mut().remove(header::IF_RANGE);
        } else if mutable {
            // A date cannot name these bytes (see above): the whole file.
            req.headers_mut().remove(header::RANGE);
            req.headers_mut().remove(header::IF_RANGE);
        }
    }
    match ServeFile::new(&blob).oneshot(req).await {
        Ok(resp) => {
            let mut resp = resp.into_response();
            let h = resp.headers_mut();
            h.insert(header::ETAG, hv(&etag));
            h.insert(header::CACHE_CONTROL, hv(cache));
            h.insert(header::ACCEPT_RANGES, hv("bytes"));
            if mutable {
                h.remove(header::LAST_MODIFIED);
            }
            resp
        }
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "read_failed",
            format!("{path}: {e}"),
        )
        .into_response(),
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// How long a client may cache a mirror file: pool files and by-hash
/// indexes are named by what they hold and never change; the Release
/// files and the indexes at their plain names change with each upstream
/// publish, so clients revalidate (by ETag; they carry no Last-Modified).
pub fn cache_control(path: &str) -> &'static str {
    if path.starts_with("pool/") || path.contains("/by-hash/") {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=0, must-revalidate"
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    /// Name of the new distro and profile (default: the repo's name).
    #[serde(default)]
    name: Option<String>,
}

async fn import_installer(
    st: S,
    caller: Caller,
    UrlPath(repo_name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let st = st.0;
    let req: ImportRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ImportRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("import request: {e} (expected {{\"name\"?: string}})"),
                )
                .into_response()
            }
        }
    };
    let Some(repo) = st.repo(&repo_name) else {
        return no_repo(&repo_name).into_response();
    };
    let name = req.name.unwrap_or_else(|| repo_name.clone());
    if repo.snapshot.is_empty() {
        return ApiError::new(
            StatusCode::CONFLICT,
            "not_synced",
            format!(
                "repo {repo_name} has not been synced: run `appliance repo sync {repo_name}` first"
            ),
        )
        .into_response();
    }
    {
        let inv = crate::inventory::fresh_read(&st.inventory);
        for kind in [Kind::Distro, Kind::Profile] {
            if inv.get(kind, &name).is_some() {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "already_exists",
                    format!("{} {name} already exists", kind.name()),
                )
                .into_response();
            }
        }
    }
    let s = st.clone();
    let r = repo.clone();
    let n = name.clone();
    let result = tokio::task::spawn_blocking(move || {
        let m = s.manifest(&r.snapshot)?;
        super::installer::import(&s.data, &r, &m, &n)
    })
    .await;
    let (distro, profile, report) = match result {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "import_failed",
                format!("importing the installer of repo {repo_name}: {e:#}"),
            )
            .into_response()
        }
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "import_failed",
                format!("import task: {e}"),
            )
            .into_response()
        }
    };
    let author = Author::new(&caller.name());
    let mut inv = crate::inventory::fresh_write(&st.inventory);
    if let Err(e) = inv.create(Object::Distro(distro.clone()), &author) {
        return ApiError::from(e).into_response();
    }
    if let Err(e) = inv.create(Object::Profile(profile.clone()), &author) {
        // Nothing half-made: take the distro back out.
        let _ = inv.remove(Kind::Distro, &distro.name, false, &author);
        return ApiError::from(e).into_response();
    }
    st.events.publish(
        "repo.import",
        None,
        json!({"repo": repo_name, "distro": distro.name, "kernel_release": report.kernel_release,
               "netboot": report.netboot, "missing_udebs": report.missing_udebs}),
    );
    (
        StatusCode::CREATED,
        Json(json!({
            "distro": Object::Distro(distro).to_api_json(),
            "profile": Object::Profile(profile).to_api_json(),
            "report": report,
        })),
    )
        .into_response()
}

/// The mirror's routes.
pub fn routes(state: Arc<RepoState>) -> Vec<Route> {
    vec![
        Route::post(
            "/api/v1/repos/{name}/sync",
            Guard::Operator,
            "Start syncing an apt repo's partial mirror from upstream",
        )
        .response("Object")
        .to(start_sync, state.clone()),
        Route::get(
            "/api/v1/repos/{name}/sync",
            Guard::Read,
            "An apt mirror's sync progress, last sync and contents",
        )
        .response("Object")
        .to(sync_status, state.clone()),
        Route::post(
            "/api/v1/repos/{name}/import",
            Guard::Operator,
            "Create the Debian installer's distro and profile from an installer mirror",
        )
        .request("Object")
        .response("Object")
        .creates()
        .to(import_installer, state.clone()),
        Route::get(
            "/repos/{name}/{*path}",
            Guard::Public,
            "A file of an apt mirror (dists/…, pool/…), as upstream served it",
        )
        .response("binary")
        .to(mirror_file, state),
    ]
}
