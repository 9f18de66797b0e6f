//! Sync over HTTP. A child calls its parent with its `replica:<id>` token
//! (only for its own id):
//! - `GET /api/v1/sync/<id>/state?head=H` → [`super::StateInfo`]
//! - `POST /api/v1/sync/<id>/blobs` `{"have":["<hex>",…]}` →
//!   `{"parent_lacks":["<hex>"],"child_lacks":[{"digest","size"}]}`
//! - `GET /api/v1/sync/<id>/blobs/<hex>/upload` → `{"offset":N}` (bytes held)
//! - `PUT /api/v1/sync/<id>/blobs/<hex>?offset=N&size=S` (a chunk) →
//!   `{"offset":N,"complete":bool}`
//! - `GET /api/v1/sync/<id>/blobs/<hex>?offset=N` → the blob from N
//! - `POST /api/v1/sync/<id>/push?head=H` (`application/x-git-pack`) →
//!   the merge outcome `{"action","head","state","changed","conflicts"}`
//! - `GET /api/v1/sync/<id>/pack?want=W&have=H` → a git pack
//!
//! and the node's own operator calls (operator token):
//! - `POST /api/v1/sync/run` → [`super::SyncReport`] (sync with the parent now)
//! - `GET /api/v1/sync/status` (public when reads are) → `{"node_id","head",
//!   "state","parent","parent_node_id","last_sync","last_error","conflicts"}`
//! - `GET /api/v1/sync/conflicts` → `[{"path","stamp","node","blob"}]`
//! - `GET /api/v1/sync/export?for=NODE` → a bundle file
//! - `POST /api/v1/sync/import` (a bundle file) → the import report.

use std::sync::Arc;

use crate::http::Query;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::Deserialize;
use uuid::Uuid;

use super::{BlobRef, SyncNode};
use crate::api::ApiError;
use crate::http::{Guard, Route};
use crate::inventory::git;

/// What the handlers share.
pub struct SyncState {
    pub node: Arc<SyncNode>,
    pub tokens: Arc<crate::auth::TokenStore>,
    pub public_reads: bool,
}

type S = State<Arc<SyncState>>;

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "sync_failed",
        format!("{e:#}"),
    )
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(anyhow::anyhow!("sync task failed: {e}")))?
        .map_err(internal)
}

/// Chunks of a blob a child uploads (the client sends 16 MiB).
const CHUNK_LIMIT: usize = 64 << 20;
/// A pushed git pack of inventory changes.
const PACK_LIMIT: usize = 256 << 20;
/// An imported sync bundle (blobs included).
const BUNDLE_LIMIT: usize = 4 << 30;

pub fn routes(state: Arc<SyncState>) -> Vec<Route> {
    let s = state;
    vec![
        Route::post(
            "/api/v1/sync/run",
            Guard::Operator,
            "Sync with the parent now",
        )
        .response("Object")
        .to(run, s.clone()),
        Route::get(
            "/api/v1/sync/status",
            Guard::Read,
            "Sync state, parent, last sync, conflicts",
        )
        .response("Object")
        .to(status, s.clone()),
        Route::get(
            "/api/v1/sync/conflicts",
            Guard::Read,
            "Versions that lost a merge",
        )
        .response("[Object]")
        .to(conflicts, s.clone()),
        Route::get(
            "/api/v1/sync/export",
            Guard::Operator,
            "A bundle file of the changes a node lacks (?for=NODE), for an air gap",
        )
        .response("binary")
        .to(export, s.clone()),
        Route::post(
            "/api/v1/sync/import",
            Guard::Operator,
            "Import a bundle file (origin-checked like an online push)",
        )
        .request("binary")
        .response("Object")
        .limit(BUNDLE_LIMIT)
        .to(import, s.clone()),
        Route::get(
            "/api/v1/sync/{node}/state",
            Guard::Replica,
            "A child asks what the parent holds",
        )
        .response("Object")
        .to(state_info, s.clone()),
        Route::post(
            "/api/v1/sync/{node}/blobs",
            Guard::Replica,
            "A child compares blob lists",
        )
        .request("Object")
        .response("Object")
        .to(blobs, s.clone()),
        Route::get(
            "/api/v1/sync/{node}/blobs/{hex}/upload",
            Guard::Replica,
            "How much of a blob upload the parent holds",
        )
        .response("Object")
        .to(upload_offset, s.clone()),
        Route::get(
            "/api/v1/sync/{node}/blobs/{hex}",
            Guard::Replica,
            "A blob the child lacks, from ?offset=",
        )
        .response("binary")
        .to(blob_get, s.clone()),
        Route::put(
            "/api/v1/sync/{node}/blobs/{hex}",
            Guard::Replica,
            "A chunk of a blob upload (?offset=&size=)",
        )
        .request("binary")
        .response("Object")
        .limit(CHUNK_LIMIT)
        .to(blob_put, s.clone()),
        Route::post(
            "/api/v1/sync/{node}/push",
            Guard::Replica,
            "A child pushes its inventory commits (a git pack, ?head=)",
        )
        .request("binary")
        .response("Object")
        .limit(PACK_LIMIT)
        .to(push, s.clone()),
        Route::get(
            "/api/v1/sync/{node}/pack",
            Guard::Replica,
            "A git pack of the parent's commits (?want=&have=)",
        )
        .response("binary")
        .to(pack, s.clone()),
        Route::post(
            "/api/v1/sync/{node}/audit",
            Guard::Replica,
            "A child forwards its audit log lines (?first=&offset=, JSON lines)",
        )
        .request("binary")
        .response("Object")
        .limit(AUDIT_LIMIT)
        .to(audit_forward, s.clone()),
        Route::get(
            "/api/v1/audit",
            Guard::Operator,
            "This node's audit log, with what its children forwarded (?after=&limit=)",
        )
        .response("Object")
        .to(audit_page, s),
    ]
}

/// A chunk of forwarded audit lines (the child sends at most
/// [`crate::audit::FORWARD_CHUNK`], or one longer line).
const AUDIT_LIMIT: usize = 2 << 20;

#[derive(Debug, Deserialize)]
struct AuditQ {
    first: String,
    offset: u64,
}

async fn audit_forward(
    State(st): S,
    Path(node): Path<String>,
    Query(q): Query<AuditQ>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = node_id(&node)?;
    if q.first.len() != 64 || !q.first.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "first must be the SHA-256 (hex) of the log's first line",
        ));
    }
    let data = st.node.data.clone();
    let from = crate::audit::Cursor {
        first: q.first,
        offset: q.offset,
        at: 0,
    };
    let lines = tokio::task::spawn_blocking(move || {
        crate::audit::append_forwarded(&data, &id, &from, &body)
    })
    .await
    .map_err(|e| internal(anyhow::anyhow!("audit task failed: {e}")))?
    .map_err(bad)?;
    Ok(Json(serde_json::json!({ "lines": lines })))
}

#[derive(Debug, Deserialize)]
struct AuditPageQ {
    after: Option<usize>,
    limit: Option<usize>,
}

async fn audit_page(
    State(st): S,
    Query(q): Query<AuditPageQ>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let data = st.node.data.clone();
    let limit = q.limit.unwrap_or(500).clamp(1, 10_000);
    let (items, next) =
        blocking(move || crate::audit::page(&data, q.after.unwrap_or(0), limit)).await?;
    let next = next.map(|n| n.to_string());
    Ok(Json(serde_json::json!({ "items": items, "next": next })))
}

#[cfg(test)]
pub fn router(state: Arc<SyncState>) -> Router {
    let auth = crate::http::Auth::new(Some(state.tokens.clone()), state.public_reads);
    crate::http::build(routes(state), auth)
}

fn node_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|e| bad(format!("{s:?} is not a node id: {e}")))
}

#[derive(Debug, Deserialize)]
struct HeadQ {
    head: Option<String>,
    /// The parent head the child last recorded: is it still held here?
    base: Option<String>,
    /// The hash of the child's blob list: when it equals ours, the child
    /// holds every blob we do (recorded for bundle export).
    blobs: Option<String>,
}

async fn state_info(
    State(st): S,
    Path(node): Path<String>,
    Query(q): Query<HeadQ>,
) -> Result<Json<super::StateInfo>, ApiError> {
    let id = node_id(&node)?;
    let n = st.node.clone();
    Ok(Json(
        blocking(move || {
            let info = n.state_info(q.head.as_deref(), q.base.as_deref())?;
            if q.blobs.is_some() && q.blobs.as_deref() == Some(info.blobs.as_str()) {
                let ours = n.blob_list()?;
                n.note_peer_blobs(&id.to_string(), ours.iter().map(String::as_str), true)?;
            }
            Ok(info)
        })
        .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct Have {
    have: Vec<String>,
}

async fn blobs(
    State(st): S,
    Path(node): Path<String>,
    Json(h): Json<Have>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = node_id(&node)?;
    let n = st.node.clone();
    blocking(move || {
        // The child's whole list: what a bundle for it may leave out.
        n.note_peer_blobs(&id.to_string(), h.have.iter().map(String::as_str), true)?;
        let ours = n.blob_list()?;
        let theirs: std::collections::BTreeSet<&String> = h.have.iter().collect();
        let ours_set: std::collections::BTreeSet<&String> = ours.iter().collect();
        let parent_lacks: Vec<&String> = theirs
            .iter()
            .filter(|d| super::is_hex64(d) && !ours_set.contains(*d))
            .copied()
            .collect();
        let mut child_lacks = Vec::new();
        for d in ours.iter().filter(|d| !theirs.contains(d)) {
            let size = std::fs::metadata(n.blob_dir().join(d))?.len();
            child_lacks.push(BlobRef {
                digest: format!("sha256:{d}"),
                size,
            });
        }
        Ok(Json(serde_json::json!({
            "parent_lacks": parent_lacks,
            "child_lacks": child_lacks,
        })))
    })
    .await
}

async fn upload_offset(
    State(st): S,
    Path((node, hex)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    node_id(&node)?;
    Ok(Json(
        serde_json::json!({"offset": st.node.partial_len(&hex)}),
    ))
}

#[derive(Debug, Deserialize)]
struct ChunkQ {
    offset: u64,
    size: u64,
}

async fn blob_put(
    State(st): S,
    Path((node, hex)): Path<(String, String)>,
    Query(q): Query<ChunkQ>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    node_id(&node)?;
    let n = st.node.clone();
    let (offset, complete) =
        blocking(move || n.put_blob_chunk(&hex, q.offset, q.size, &body)).await?;
    Ok(Json(
        serde_json::json!({"offset": offset, "complete": complete}),
    ))
}

#[derive(Debug, Deserialize)]
struct OffsetQ {
    #[serde(default)]
    offset: u64,
}

async fn blob_get(
    State(st): S,
    Path((node, hex)): Path<(String, String)>,
    Query(q): Query<OffsetQ>,
) -> Result<Response, ApiError> {
    node_id(&node)?;
    if !super::is_hex64(&hex) {
        return Err(bad("blob names are 64 lowercase hex digits"));
    }
    let path = st.node.blob_dir().join(&hex);
    let mut f = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blob {hex}: {e}"),
        )
    })?;
    let len = f.metadata().await.map_err(|e| internal(e.into()))?.len();
    use tokio::io::AsyncSeekExt;
    f.seek(std::io::SeekFrom::Start(q.offset.min(len)))
        .await
        .map_err(|e| internal(e.into()))?;
    let stream = tokio_util_stream(f);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_LENGTH,
                (len - q.offset.min(len)).to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A byte stream over a file, 1 MiB at a time.
fn tokio_util_stream(
    f: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(f, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

async fn push(
    State(st): S,
    Path(node): Path<String>,
    Query(q): Query<HeadQ>,
    body: Bytes,
) -> Result<Json<crate::inventory::MergeOutcome>, ApiError> {
    let id = node_id(&node)?;
    let head = q.head.ok_or_else(|| bad("push needs ?head=<commit>"))?;
    let oid = git::parse_hex_oid(&head).map_err(bad)?;
    let n = st.node.clone();
    let out = blocking(move || {
        let _one = n.running.lock().unwrap_or_else(|e| e.into_inner());
        n.store_pack(&body)?;
        if !n.inv().repo().has_object(&oid) {
            anyhow::bail!("the pack does not hold the pushed head {head}");
        }
        n.check_origins(&id, &oid)?;
        let m = n.merge(&oid, &format!("replica-{id}"))?;
        n.note_peer(&id.to_string(), &head)?;
        Ok(m)
    })
    .await
    .map_err(|e| {
        if e.message.contains("not in the pushing child's subtree")
            || e.message.contains("reading the pack")
        {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "rejected", e.message)
        } else {
            e
        }
    })?;
    tracing::info!(child = %id, action = %out.action, conflicts = out.conflicts.len(), "merged a child's push");
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
struct PackQ {
    want: String,
    have: Option<String>,
}

async fn pack(
    State(st): S,
    Path(node): Path<String>,
    Query(q): Query<PackQ>,
) -> Result<Response, ApiError> {
    node_id(&node)?;
    let want = git::parse_hex_oid(&q.want).map_err(bad)?;
    let have: Vec<_> = q
        .have
        .iter()
        .map(|h| git::parse_hex_oid(h))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let n = st.node.clone();
    let (pack, _) = blocking(move || n.build_pack(&want, &have)).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-git-pack")], pack).into_response())
}

async fn run(State(st): S) -> Result<Json<super::SyncReport>, ApiError> {
    let data = st.node.data.clone();
    let link = crate::parent::load(&data)
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_parent",
                "this node has no parent (state/parent.json); use bundles",
            )
        })?;
    let n = st.node.clone();
    Ok(Json(blocking(move || n.sync_with_parent(&link)).await?))
}

async fn status(State(st): S) -> Result<Json<serde_json::Value>, ApiError> {
    let n = st.node.clone();
    blocking(move || {
        let (head, state) = n.head_and_state();
        let rec = n.record()?;
        let link = crate::parent::load(&n.data)?;
        Ok(Json(serde_json::json!({
            "node_id": n.node_id,
            "head": head,
            "state": state,
            "parent": link.as_ref().map(|l| l.url.clone()),
            "parent_node_id": link.as_ref().map(|l| l.parent_node_id),
            "last_sync": rec.last_sync,
            "last_error": rec.last_error,
            "conflicts": n.conflicts()?.len(),
        })))
    })
    .await
}

async fn conflicts(
    State(st): S,
    page: crate::http::PageParams,
) -> Result<Json<crate::http::Paged<super::merge::Conflict>>, ApiError> {
    let n = st.node.clone();
    let all = blocking(move || n.conflicts()).await?;
    Ok(Json(page.page(all, |c| format!("{}@{}", c.path, c.stamp))))
}

#[derive(Debug, Deserialize)]
struct ExportQ {
    #[serde(rename = "for")]
    for_node: Option<String>,
}

async fn export(State(st): S, Query(q): Query<ExportQ>) -> Result<Response, ApiError> {
    let n = st.node.clone();
    // Written to a temporary file first, so the length is known and a
    // failure never streams half a bundle.
    let file = blocking(move || {
        let dir = n.data.join("tmp");
        std::fs::create_dir_all(&dir)?;
        let mut tmp = tempfile_in(&dir)?;
        super::bundle::export(
            &n,
            q.for_node.as_deref(),
            std::io::BufWriter::new(&mut tmp.1),
        )?;
        Ok(tmp)
    })
    .await?;
    let (path, f) = file;
    let len = f.metadata().map_err(|e| internal(e.into()))?.len();
    let f = tokio::fs::File::from_std(f);
    use tokio::io::AsyncSeekExt;
    let mut f = f;
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| internal(e.into()))?;
    let _ = std::fs::remove_file(&path); // open handle keeps the data
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(tokio_util_stream(f)),
    )
        .into_response())
}

fn tempfile_in(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, std::fs::File)> {
    let path = dir.join(format!(".bundle-{}", Uuid::new_v4().simple()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, f))
}

async fn import(State(st): S, body: Body) -> Result<Json<super::bundle::ImportReport>, ApiError> {
    // Stream the upload to a temporary file, then verify and apply.
    let dir = st.node.data.join("tmp");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| internal(e.into()))?;
    let path = dir.join(format!(".import-{}", Uuid::new_v4().simple()));
    let mut f = tokio::fs::File::create(&path)
        .await
        .map_err(|e| internal(e.into()))?;
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut stream = body.into_data_stream();
    let res: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad(format!("reading the upload: {e}")))?;
            f.write_all(&chunk).await.map_err(|e| internal(e.into()))?;
        }
        f.flush().await.map_err(|e| internal(e.into()))?;
        Ok(())
    }
    .await;
    drop(f);
    if let Err(e) = res {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e);
    }
    let n = st.node.clone();
    let p = path.clone();
    let out = blocking(move || super::bundle::import(&n, &p)).await;
    let _ = tokio::fs::remove_file(&path).await;
    out.map(Json).map_err(|e| {
        if e.message.contains("nothing applied") || e.message.contains("not a sync bundle") {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_bundle", e.message)
        } else {
            e
        }
    })
}
