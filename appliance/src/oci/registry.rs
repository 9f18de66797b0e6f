//! The OCI distribution API, read-only, and the import route:
//!
//! - `GET /v2/` (guard `registry`): `{}` with `Docker-Distribution-API-Version:
//!   registry/2.0`; without a token (and anonymous pulls off) 401 with
//!   `WWW-Authenticate: Bearer …`, which is what makes skopeo and podman
//!   send `--registry-token`/`--src-registry-token` as a bearer token.
//! - `GET|HEAD /v2/{*path}` (guard `registry`), dispatched here since
//!   repository names contain `/`: `<name>/manifests/<tag|digest>`
//!   (`Content-Type` = the manifest's media type, `Docker-Content-Digest`),
//!   `<name>/blobs/<digest>` (`Range`, HEAD), `<name>/tags/list` and
//!   `_catalog` (both with `n`/`last` paging and a `Link: <…>; rel="next"`
//!   header when more remain).
//! - `POST /api/v1/oci/import?name=REPO:TAG` (operator): the body (an OCI
//!   layout tar or a docker-archive, ≤ [`MAX_UPLOAD`]) streamed to a
//!   temporary file, then imported ([`super::import`]) and tagged.
//!
//! Errors under `/v2/` are the distribution spec's JSON:
//! `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"…","detail":{…}}]}`.
//! Nothing under `/v2/` writes: other methods get 405.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use builder::Digest;
use serde_json::json;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::{Blobs, Tag, MAX_MANIFEST};
use crate::api::ApiError;
use crate::http::{Caller, Guard, Route};
use crate::inventory::{Author, Inventory};

/// Largest upload `POST /api/v1/oci/import` takes.
pub const MAX_UPLOAD: usize = 16 << 30;
/// Most tags or repositories one page lists.
pub const MAX_PAGE: usize = 10_000;

/// What the registry routes need.
pub struct RegistryState {
    pub data: PathBuf,
    pub blobs: Blobs,
    pub inventory: Arc<RwLock<Inventory>>,
    pub events: crate::events::Events,
}

impl RegistryState {
    pub fn new(
        data: PathBuf,
        inventory: Arc<RwLock<Inventory>>,
        events: crate::events::Events,
    ) -> Arc<Self> {
        Arc::new(RegistryState {
            blobs: Blobs::new(&data),
            data,
            inventory,
            events,
        })
    }

    fn tags(&self) -> BTreeMap<String, BTreeMap<String, Digest>> {
        Tag::all(&crate::inventory::fresh_read(&self.inventory))
    }
}

/// A distribution-spec error.
pub fn oci_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    if status.is_server_error() {
        tracing::error!(code, message = %message, "registry request failed");
    }
    let body = json!({"errors": [{"code": code, "message": message, "detail": {}}]});
    (status, Json(body)).into_response()
}

fn api_version(mut r: Response) -> Response {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

type S = State<Arc<RegistryState>>;

async fn base() -> Response {
    api_version(Json(json!({})).into_response())
}

/// One page of a sorted list: entries after `last`, at most `n`.
fn page<'a>(
    all: impl Iterator<Item = &'a String>,
    q: &HashMap<String, String>,
) -> Result<(Vec<String>, Option<String>), Box<Response>> {
    let n = match q.get("n") {
        None => MAX_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= MAX_PAGE => n,
            _ => {
                return Err(Box::new(oci_error(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    format!("n={s:?}: give a number from 0 to {MAX_PAGE}"),
                )))
            }
        },
    };
    let mut rest = all.filter(|t| q.get("last").is_none_or(|l| t.as_str() > l.as_str()));
    let items: Vec<String> = rest.by_ref().take(n).cloned().collect();
    let more = rest.next().is_some() && n > 0;
    Ok((items.clone(), more.then(|| items.last().cloned()).flatten()))
}

fn link(path: &str, last: &str, n: usize) -> HeaderValue {
    let v = format!("<{path}?last={last}&n={n}>; rel=\"next\"");
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn dispatch(
    st: S,
    UrlPath(path): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let st = st.0;
    let r = if path == "_catalog" {
        catalog(&st, &q)
    } else if let Some(name) = path.strip_suffix("/tags/list") {
        tags_list(&st, name, &q)
    } else if let Some((name, reference)) = path
        .rsplit_once("/manifests/")
        .filter(|(_, r)| !r.contains('/'))
    {
        manifest(&st, name, reference).await
    } else if let Some((name, digest)) = path
        .rsplit_once("/blobs/")
        .filter(|(_, r)| !r.contains('/'))
    {
        blob(&st, name, digest, req).await
    } else {
        oci_error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!("/v2/{path} is not a route of this read-only registry"),
        )
    };
    api_version(r)
}

fn catalog(st: &RegistryState, q: &HashMap<String, String>) -> Response {
    let tags = st.tags();
    let (repos, next) = match page(tags.keys(), q) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let n = repos.len();
    let mut r = Json(json!({ "repositories": repos })).into_response();
    if let Some(last) = next {
        r.headers_mut()
            .insert(header::LINK, link("/v2/_catalog", &last, n));
    }
    r
}

/// The tags of `name`, or the error to answer.
fn repo_tags(st: &RegistryState, name: &str) -> Result<BTreeMap<String, Digest>, Box<Response>> {
    if let Err(e) = super::check_repo_name(name) {
        return Err(Box::new(oci_error(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            format!("{e:#}"),
        )));
    }
    st.tags().remove(name).ok_or_else(|| {
        Box::new(oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no repository {name:?} in this registry"),
        ))
    })
}

fn tags_list(st: &RegistryState, name: &str, q: &HashMap<String, String>) -> Response {
    let tags = match repo_tags(st, name) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let (list, next) = match page(tags.keys(), q) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let n = list.len();
    let mut r = Json(json!({ "name": name, "tags": list })).into_response();
    if let Some(last) = next {
        r.headers_mut().insert(
            header::LINK,
            link(&format!("/v2/{name}/tags/list"), &last, n),
        );
    }
    r
}

/// Whether `d` is reachable from the tags of a repository.
async fn reachable_in(
    st: &Arc<RegistryState>,
    tags: &BTreeMap<String, Digest>,
    d: Digest,
) -> Result<bool, Response> {
    let roots: Vec<Digest> = tags.values().copied().collect();
    if roots.contains(&d) {
        return Ok(true);
    }
    let blobs = st.blobs.clone();
    match tokio::task::spawn_blocking(move || super::reachable(&blobs, &roots)).await {
        Ok(Ok(set)) => Ok(set.contains(&d)),
        Ok(Err(e)) => Err(oci_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("reading the repository's manifests: {e:#}"),
        )),
        Err(e) => Err(oci_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("{e}"),
        )),
    }
}

async fn manifest(st: &Arc<RegistryState>, name: &str, reference: &str) -> Response {
    let tags = match repo_tags(st, name) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let unknown = |what: String| oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", what);
    let digest = if reference.contains(':') {
        let d: Digest = match reference.parse() {
            Ok(d) => d,
            Err(e) => return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()),
        };
        match reachable_in(st, &tags, d).await {
            Ok(true) => d,
            Ok(false) => return unknown(format!("manifest {d} is not in repository {name:?}")),
            Err(e) => return e,
        }
    } else {
        match tags.get(reference) {
            Some(d) => *d,
            None => return unknown(format!("repository {name:?} has no tag {reference:?}")),
        }
    };
    let blobs = st.blobs.clone();
    // `None`: the blob is too large or not JSON, so not a manifest.
    let read = tokio::task::spawn_blocking(move || {
        let len = std::fs::metadata(blobs.path(&digest))?.len();
        if len > MAX_MANIFEST {
            return anyhow::Ok(None);
        }
        let bytes = blobs.read_small(&digest, MAX_MANIFEST)?;
        Ok(super::manifest_media_type(&bytes)
            .ok()
            .map(|mt| (bytes, mt)))
    })
    .await;
    let (bytes, mt) = match read {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return unknown(format!("{digest} is a blob, not a manifest")),
        Ok(Err(e)) if !st.blobs.has(&digest) => {
            return unknown(format!(
                "manifest {digest} of {name:?} is not on this node ({e:#})"
            ))
        }
        Ok(Err(e)) => {
            return oci_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                format!("reading manifest {digest}: {e:#}"),
            )
        }
        Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()),
    };
    if !super::is_manifest(&mt) && !super::is_index(&mt) {
        return unknown(format!("{digest} is a blob, not a manifest"));
    }
    let mut r = Response::new(Body::from(bytes.clone()));
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mt) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    h.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("a digest is a header value"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("a digest is a header value"),
    );
    r
}

async fn blob(st: &Arc<RegistryState>, name: &str, digest: &str, req: Request) -> Response {
    let tags = match repo_tags(st, name) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let d: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()),
    };
    let unknown = || {
        oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {d} is not in repository {name:?}"),
        )
    };
    match reachable_in(st, &tags, d).await {
        Ok(true) => {}
        Ok(false) => return unknown(),
        Err(e) => return e,
    }
    let path = st.blobs.path(&d);
    if !path.is_file() {
        return unknown();
    }
    let (parts, _) = req.into_parts();
    let req = Request::from_parts(parts, Body::empty());
    match ServeFile::new(&path).oneshot(req).await {
        Ok(resp) => {
            let mut r = resp.into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                "docker-content-digest",
                HeaderValue::from_str(&d.to_string()).expect("a digest is a header value"),
            );
            r
        }
        Err(e) => oci_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("reading blob {d}: {e}"),
        ),
    }
}

fn bad(code: &'static str, m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, m)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// `POST /api/v1/oci/import?name=REPO:TAG`.
async fn import(
    st: S,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let st = st.0;
    let name = q
        .get("name")
        .ok_or_else(|| bad("missing_name", "give the tag as ?name=REPO:TAG"))?;
    let (repo, tag) = super::parse_name(name).map_err(|e| bad("invalid_name", format!("{e:#}")))?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("an image upload may be at most {MAX_UPLOAD} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD as u64) {
        return Err(too_large());
    }
    // Stream the body into a temporary file in `<data>/tmp`.
    let dir = st.data.join("tmp");
    tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
    let path = dir.join(format!(
        ".oci-upload-{}-{}",
        std::process::id(),
        crate::entropy::fast_u32()
    ));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(path.clone());
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::File::create(&path).await.map_err(internal)?;
        let mut stream = req.into_body().into_data_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| bad("upload_failed", format!("reading the upload: {e}")))?;
            n += chunk.len() as u64;
            if n > MAX_UPLOAD as u64 {
                return Err(too_large());
            }
            f.write_all(&chunk).await.map_err(internal)?;
        }
        f.flush().await.map_err(internal)?;
    }
    let data = st.data.clone();
    let p = path.clone();
    let (r, t) = (repo.clone(), tag.clone());
    let imported =
        tokio::task::spawn_blocking(move || super::import::import_path(&data, &p, &r, &t))
            .await
            .map_err(internal)?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "bad_image",
                    format!("{name}: {e:#}"),
                )
            })?;
    let t = Tag {
        repo: repo.clone(),
        tag: tag.clone(),
        digest: imported.digest,
    };
    let fmt = match imported.format {
        super::import::Format::OciLayout => "oci-layout",
        super::import::Format::DockerArchive => "docker-archive",
    };
    {
        let mut inv = crate::inventory::fresh_write(&st.inventory);
        t.save(
            &mut inv,
            &imported.arch,
            &format!("imported from a {fmt} upload"),
            &Author::new(&caller.name()),
        )
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "conflict", format!("{e:#}")))?;
    }
    let body = json!({
        "repo": repo, "tag": tag, "image": t.image_name(),
        "digest": imported.digest, "media_type": imported.media_type, "format": fmt,
        "arch": imported.arch, "blobs": imported.blobs, "blobs_added": imported.blobs_added,
        "bytes": imported.bytes,
    });
    st.events.publish("oci.import", None, body.clone());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The registry's routes.
pub fn routes(state: Arc<RegistryState>) -> Vec<Route> {
    vec![
        Route::get(
            "/v2/",
            Guard::Registry,
            "OCI distribution API base: answers {} (registry/2.0) once the caller may pull",
        )
        .response("Object")
        .to(base, ()),
        Route::get(
            "/v2/{*path}",
            Guard::Registry,
            "OCI distribution API, read-only: NAME/manifests/REF, NAME/blobs/DIGEST (Range), NAME/tags/list, _catalog",
        )
        .response("binary")
        .to(dispatch, state.clone()),
        Route::post(
            "/api/v1/oci/import",
            Guard::Operator,
            "Import a container image (?name=REPO:TAG; body: OCI layout tar or docker-archive)",
        )
        .request("binary")
        .response("Object")
        .limit(MAX_UPLOAD)
        .creates()
        .to(import, state),
    ]
}

#[cfg(test)]
mod tests;
