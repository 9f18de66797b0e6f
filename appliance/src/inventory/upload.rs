//! Resumable, verified blob uploads into the data partition's blob store
//! (`<data>/blobs/sha256/<hex>`), so `appliance import` works from any
//! machine: the client names the blob by the digest it computed, sends the
//! bytes (in pieces, resuming after a dropped connection), and the server
//! commits the blob only when the whole file hashes to that name.
//!
//! ```text
//! GET /api/v1/uploads/sha256/{hex}            → {"digest","state":"present"|"partial"|"absent","offset"}
//! PUT /api/v1/uploads/sha256/{hex}?offset=N&size=T   body: bytes N.. of the blob
//!     → 202 {"state":"partial","offset"}  more is expected
//!     → 201 {"state":"present","size"}    complete and verified
//!     → 200 {"state":"present","size"}    it was already there (body not read)
//!     → 409 upload_offset  {offset}       N is not what the server holds
//!     → 422 digest_mismatch               complete, but the bytes hash elsewhere
//! ```
//!
//! Partial bytes sit in `<blobs>/.upload-<hex>` (never served: blob routes
//! only serve 64-hex names) and are appended to at the offset the server
//! holds, which is the file's length; a client that lost its connection
//! asks for that offset and goes on. The final hash is computed over the
//! whole file, so a partial file damaged by a crash fails verification and
//! is removed rather than committed. One upload per digest at a time.
//!
//! The blob store's gc ([`expire_partials`], run by `serve` at start and
//! every [`crate::contract::UPLOAD_GC_INTERVAL`]) removes partial files
//! untouched for [`crate::contract::UPLOAD_PARTIAL_MAX_AGE`] (a client
//! that gave up never comes back for them); it holds the digest's upload
//! slot while it does, so an upload in flight is never cut from under it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::api::InvState;
use crate::api::ApiError;
use crate::http::{Guard, Route};

/// Largest blob accepted (an installer DVD image fits).
pub const MAX_BLOB: u64 = 16 << 30;

/// Uploads in flight, by hex digest.
fn busy() -> &'static Mutex<HashSet<String>> {
    static BUSY: std::sync::OnceLock<Mutex<HashSet<String>>> = std::sync::OnceLock::new();
    BUSY.get_or_init(Default::default)
}

/// Holds a digest's upload slot until dropped.
struct Slot(String);

impl Slot {
    fn take(hex: &str) -> Result<Self, ApiError> {
        let mut b = busy().lock().unwrap_or_else(|e| e.into_inner());
        if !b.insert(hex.to_owned()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_in_progress",
                format!("sha256:{hex} is being uploaded by another request"),
            ));
        }
        Ok(Slot(hex.to_owned()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        busy()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, msg)
}

fn internal(what: String) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_failed",
            format!("{what}: {e}"),
        )
    }
}

fn check_hex(hex: &str) -> Result<(), ApiError> {
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(bad(
            "bad_digest",
            "blob names are sha256 digests: 64 lowercase hex digits",
        ))
    }
}

/// What one gc pass of the upload partials removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExpiredPartials {
    /// Digests (`sha256:<hex>`) whose abandoned partial file was removed.
    pub digests: Vec<String>,
    /// Bytes those files held.
    pub bytes: u64,
}

/// Removes every `<blobs>/.upload-<hex>` last written more than `max_age`
/// before `now`, skipping one whose upload is in flight (its slot is
/// held for the removal, so no upload starts on it meanwhile). Other
/// files are not touched. A missing `blobs` directory has nothing to
/// expire.
pub fn expire_partials(
    blobs: &std::path::Path,
    max_age: std::time::Duration,
    now: std::time::SystemTime,
) -> std::io::Result<ExpiredPartials> {
    let mut out = ExpiredPartials::default();
    let entries = match std::fs::read_dir(blobs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(hex) = name.strip_prefix(".upload-") {
            if check_hex(hex).is_ok() {
                names.push((hex.to_owned(), e.path()));
            }
        }
    }
    names.sort();
    for (hex, path) in names {
        let Ok(_slot) = Slot::take(&hex) else {
            continue; // being uploaded right now
        };
        // Read after taking the slot: a write just before counts.
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !m.is_file() {
            continue;
        }
        let age = now
            .duration_since(m.modified()?)
            .unwrap_or(std::time::Duration::ZERO);
        if age <= max_age {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        out.digests.push(format!("sha256:{hex}"));
        out.bytes += m.len();
    }
    Ok(out)
}

/// Runs [`expire_partials`] on `blobs` now and every
/// [`crate::contract::UPLOAD_GC_INTERVAL`], logging what it removed.
pub fn spawn_partial_gc(blobs: PathBuf) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::contract::UPLOAD_GC_INTERVAL);
        loop {
            tick.tick().await;
            let b = blobs.clone();
            let res = tokio::task::spawn_blocking(move || {
                expire_partials(
                    &b,
                    crate::contract::UPLOAD_PARTIAL_MAX_AGE,
                    std::time::SystemTime::now(),
                )
            })
            .await;
            match res {
                Ok(Ok(r)) if !r.digests.is_empty() => tracing::info!(
                    removed = r.digests.len(),
                    bytes = r.bytes,
                    digests = ?r.digests,
                    "removed abandoned blob upload partials"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    dir = %blobs.display(),
                    "expiring abandoned blob upload partials failed"
                ),
                Err(e) => tracing::warn!(error = %e, "the upload partial gc task failed"),
            }
        }
    });
}

fn partial_path(st: &InvState, hex: &str) -> PathBuf {
    st.blobs.join(format!(".upload-{hex}"))
}

/// What the server holds of `hex`: present (size), partial (offset) or absent.
async fn state_of(st: &InvState, hex: &str) -> Result<(&'static str, u64), ApiError> {
    if let Ok(m) = tokio::fs::metadata(st.blobs.join(hex)).await {
        if m.is_file() {
            return Ok(("present", m.len()));
        }
    }
    match tokio::fs::metadata(partial_path(st, hex)).await {
        Ok(m) => Ok(("partial", m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(("absent", 0)),
        Err(e) => Err(internal(format!("reading the upload of sha256:{hex}"))(e)),
    }
}

async fn status(
    State(st): State<Arc<InvState>>,
    Path(hex): Path<String>,
) -> Result<Response, ApiError> {
    check_hex(&hex)?;
    let (state, n) = state_of(&st, &hex).await?;
    let mut v = json!({"digest": format!("sha256:{hex}"), "state": state, "offset": n});
    if state == "present" {
        v["size"] = n.into();
    }
    Ok(Json(v).into_response())
}

/// `offset` and `size` from the query; both required, both decimal.
fn parse_query(q: Option<&str>) -> Result<(u64, u64), ApiError> {
    let (mut offset, mut size) = (None, None);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n: u64 = v
            .parse()
            .map_err(|_| bad("bad_query", format!("{k}={v:?} is not a byte count")))?;
        match k {
            "offset" => offset = Some(n),
            "size" => size = Some(n),
            _ => {
                return Err(bad(
                    "bad_query",
                    format!("unknown parameter {k:?} (known: offset, size)"),
                ))
            }
        }
    }
    let (Some(offset), Some(size)) = (offset, size) else {
        return Err(bad(
            "bad_query",
            "an upload names where its bytes go: ?offset=N&size=TOTAL",
        ));
    };
    if size > MAX_BLOB {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{size} bytes is over the {MAX_BLOB}-byte limit for one blob"),
        ));
    }
    if offset > size {
        return Err(bad(
            "bad_query",
            format!("offset {offset} is past size {size}"),
        ));
    }
    Ok((offset, size))
}

async fn put(
    State(st): State<Arc<InvState>>,
    Path(hex): Path<String>,
    RawQuery(q): RawQuery,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    check_hex(&hex)?;
    let (offset, size) = parse_query(q.as_deref())?;
    let _slot = Slot::take(&hex)?;
    let (state, held) = state_of(&st, &hex).await?;
    if state == "present" {
        return Ok((
            StatusCode::OK,
            Json(json!({"digest": format!("sha256:{hex}"), "state": "present", "size": held})),
        )
            .into_response());
    }
    if offset != held {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "upload_offset",
            format!("the server holds {held} bytes of sha256:{hex}; send from offset {held}, not {offset}"),
        ));
    }
    tokio::fs::create_dir_all(&st.blobs)
        .await
        .map_err(internal(format!("creating {}", st.blobs.display())))?;
    let path = partial_path(&st, &hex);
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(internal(format!("opening {}", path.display())))?;
    let mut n = held;
    let mut stream = req.into_body().into_data_stream();
    let mut read_error = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what arrived: the client resumes from it.
                read_error = Some(e.to_string());
                break;
            }
        };
        n += chunk.len() as u64;
        if n > size {
            drop(f);
            let _ = tokio::fs::remove_file(&path).await;
            return Err(bad(
                "upload_too_long",
                format!("more than the announced {size} bytes of sha256:{hex}; the partial upload is dropped"),
            ));
        }
        f.write_all(&chunk)
            .await
            .map_err(internal(format!("writing {}", path.display())))?;
    }
    f.sync_all()
        .await
        .map_err(internal(format!("syncing {}", path.display())))?;
    drop(f);
    if let Some(e) = read_error {
        return Err(bad(
            "upload_interrupted",
            format!("reading the upload of sha256:{hex} at byte {n}: {e}; resume from offset {n}"),
        ));
    }
    if n < size {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"digest": format!("sha256:{hex}"), "state": "partial", "offset": n})),
        )
            .into_response());
    }
    // Complete: verify the whole file before it takes the blob's name.
    let p = path.clone();
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut h = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&p)?, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| internal("hashing the upload".into())(std::io::Error::other(e)))?
    .map_err(internal(format!("hashing {}", path.display())))?;
    if actual != hex {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "digest_mismatch",
            format!("the {size} bytes uploaded hash to sha256:{actual}, not sha256:{hex}; nothing was stored"),
        ));
    }
    let dst = st.blobs.join(&hex);
    tokio::fs::rename(&path, &dst)
        .await
        .map_err(internal(format!("renaming into {}", dst.display())))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"digest": format!("sha256:{hex}"), "state": "present", "size": size})),
    )
        .into_response())
}

/// The upload routes (operators only: an upload fills the data partition).
pub fn routes(st: Arc<InvState>) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/uploads/sha256/{hex}",
            Guard::Operator,
            "How much of a blob upload the server holds (present, partial, absent)",
        )
        .response("Object")
        .to(status, st.clone()),
        Route::put(
            "/api/v1/uploads/sha256/{hex}",
            Guard::Operator,
            "Upload a blob's bytes from ?offset=N of ?size=TOTAL; committed only when the whole blob hashes to its name",
        )
        .request("binary")
        .response("Object")
        .limit(MAX_BLOB as usize)
        .to(put, st),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use std::sync::RwLock;
    use tower::ServiceExt as _;

    struct Up {
        _dir: tempfile::TempDir,
        app: axum::Router,
        token: String,
        blobs: PathBuf,
    }

    fn up() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let inv = super::super::Inventory::open(&dir.path().join("inventory")).unwrap();
        let tokens = crate::auth::TokenStore::memory();
        let token = tokens
            .create_scoped("ops", crate::auth::Scope::Operator)
            .unwrap()
            .1;
        let tokens = Arc::new(tokens);
        let st = Arc::new(InvState {
            inventory: Arc::new(RwLock::new(inv)),
            status: Mutex::new(super::super::status::StatusBook::open(None).unwrap()),
            tokens: tokens.clone(),
            public_reads: true,
            blobs: dir.path().join("blobs/sha256"),
            events: crate::events::Events::new(),
            committer: Default::default(),
        });
        let auth = crate::http::Auth::new(Some(tokens), true);
        Up {
            app: crate::http::build(routes(st.clone()), auth),
            blobs: st.blobs.clone(),
            _dir: dir,
            token,
        }
    }

    impl Up {
        async fn call(
            &self,
            method: &str,
            uri: &str,
            body: Vec<u8>,
            auth: bool,
        ) -> (StatusCode, serde_json::Value) {
            let mut req = Request::builder().method(method).uri(uri);
            if auth {
                req = req.header("authorization", format!("Bearer {}", self.token));
            }
            let resp = self
                .app
                .clone()
                .oneshot(req.body(Body::from(body)).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            )
        }
    }

    /// 200,000 bytes and their hex digest; each test its own `seed`, as
    /// upload slots are process-wide and tests run in parallel.
    fn blob(seed: u32) -> (Vec<u8>, String) {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * seed % 253) as u8).collect();
        let hex = hex::encode(Sha256::digest(&data));
        (data, hex)
    }

    #[tokio::test]
    async fn an_upload_resumes_and_commits_only_verified_bytes() {
        let u = up();
        let (data, hex) = blob(7);
        let uri = |off: usize| {
            format!(
                "/api/v1/uploads/sha256/{hex}?offset={off}&size={}",
                data.len()
            )
        };
        let (s, v) = u
            .call(
                "GET",
                &format!("/api/v1/uploads/sha256/{hex}"),
                vec![],
                true,
            )
            .await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("absent")));

        // The first piece; the "connection drops" after it.
        let (s, v) = u.call("PUT", &uri(0), data[..70_000].to_vec(), true).await;
        assert_eq!(
            (s, v["offset"].as_u64()),
            (StatusCode::ACCEPTED, Some(70_000)),
            "{v}"
        );
        assert!(
            !u.blobs.join(&hex).exists(),
            "a partial upload took the blob's name"
        );
        let (_, v) = u
            .call(
                "GET",
                &format!("/api/v1/uploads/sha256/{hex}"),
                vec![],
                true,
            )
            .await;
        assert_eq!(
            (v["state"].as_str(), v["offset"].as_u64()),
            (Some("partial"), Some(70_000))
        );

        // Resuming from the wrong offset is refused and loses nothing.
        let (s, v) = u.call("PUT", &uri(0), data.clone(), true).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::CONFLICT, Some("upload_offset")),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains("70000"), "{v}");

        // The rest, from where the server stands: committed and served.
        let (s, v) = u
            .call("PUT", &uri(70_000), data[70_000..].to_vec(), true)
            .await;
        assert_eq!(
            (s, v["state"].as_str()),
            (StatusCode::CREATED, Some("present")),
            "{v}"
        );
        assert_eq!(std::fs::read(u.blobs.join(&hex)).unwrap(), data);
        assert!(!u.blobs.join(format!(".upload-{hex}")).exists());
        // Again: already there, nothing rewritten.
        let (s, v) = u.call("PUT", &uri(0), data.clone(), true).await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("present")));
    }

    #[tokio::test]
    async fn the_gc_expires_partials_untouched_past_the_max_age_and_nothing_else() {
        use crate::contract::UPLOAD_PARTIAL_MAX_AGE;
        use std::time::{Duration, SystemTime};
        let u = up();
        let (data, hex) = blob(13);
        // A real partial: 70,000 of the blob's bytes through the route.
        let uri = format!("/api/v1/uploads/sha256/{hex}?offset=0&size={}", data.len());
        let (s, _) = u.call("PUT", &uri, data[..70_000].to_vec(), true).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let old = u.blobs.join(format!(".upload-{hex}"));
        // A second partial touched just now, a committed blob and a file
        // that only looks like a partial stay.
        let fresh_hex = "ab".repeat(32);
        let fresh = u.blobs.join(format!(".upload-{fresh_hex}"));
        std::fs::write(&fresh, b"fresh").unwrap();
        let committed = u.blobs.join("cd".repeat(32));
        std::fs::write(&committed, b"blob").unwrap();
        let odd = u.blobs.join(".upload-not-a-digest");
        std::fs::write(&odd, b"odd").unwrap();
        let now = SystemTime::now();
        let past = now - UPLOAD_PARTIAL_MAX_AGE - Duration::from_secs(60);
        for p in [&old, &committed, &odd] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }

        // Within the age nothing goes.
        let r = expire_partials(&u.blobs, UPLOAD_PARTIAL_MAX_AGE * 2, now).unwrap();
        assert_eq!(r, ExpiredPartials::default());
        // An upload in flight holds the slot: its partial is kept.
        {
            let _busy = Slot::take(&hex).unwrap();
            let r = expire_partials(&u.blobs, UPLOAD_PARTIAL_MAX_AGE, now).unwrap();
            assert_eq!(r, ExpiredPartials::default());
            assert!(old.is_file());
        }
        let r = expire_partials(&u.blobs, UPLOAD_PARTIAL_MAX_AGE, now).unwrap();
        assert_eq!(
            r,
            ExpiredPartials {
                digests: vec![format!("sha256:{hex}")],
                bytes: 70_000
            }
        );
        assert!(!old.exists());
        assert!(fresh.is_file() && committed.is_file() && odd.is_file());
        // The server no longer offers to resume it: the client starts over
        // from 0 and the blob still commits.
        let (s, v) = u
            .call(
                "GET",
                &format!("/api/v1/uploads/sha256/{hex}"),
                vec![],
                true,
            )
            .await;
        assert_eq!(
            (s, v["state"].as_str()),
            (StatusCode::OK, Some("absent")),
            "{v}"
        );
        let (s, v) = u.call("PUT", &uri, data.clone(), true).await;
        assert_eq!(
            (s, v["state"].as_str()),
            (StatusCode::CREATED, Some("present")),
            "{v}"
        );
        // No blob directory yet: nothing to expire, no error.
        let none = tempfile::tempdir().unwrap();
        let r = expire_partials(
            &none.path().join("blobs/sha256"),
            UPLOAD_PARTIAL_MAX_AGE,
            now,
        );
        assert_eq!(r.unwrap(), ExpiredPartials::default());
    }

    #[tokio::test]
    async fn bytes_that_hash_elsewhere_are_not_stored() {
        let u = up();
        let (mut data, hex) = blob(11);
        data[1234] ^= 1;
        let (s, v) = u
            .call(
                "PUT",
                &format!("/api/v1/uploads/sha256/{hex}?offset=0&size={}", data.len()),
                data.clone(),
                true,
            )
            .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("digest_mismatch")),
            "{v}"
        );
        assert!(!u.blobs.join(&hex).exists());
        assert!(
            !u.blobs.join(format!(".upload-{hex}")).exists(),
            "the bad partial was kept"
        );
        // More bytes than announced: refused, partial dropped.
        let (s, v) = u
            .call(
                "PUT",
                &format!("/api/v1/uploads/sha256/{hex}?offset=0&size=10"),
                data,
                true,
            )
            .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("upload_too_long")),
            "{v}"
        );
        assert!(!u.blobs.join(format!(".upload-{hex}")).exists());
    }

    #[tokio::test]
    async fn uploads_need_an_operator_and_well_formed_names() {
        let u = up();
        let (data, hex) = blob(17);
        let uri = format!("/api/v1/uploads/sha256/{hex}?offset=0&size={}", data.len());
        let (s, _) = u.call("PUT", &uri, data.clone(), false).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(
            !u.blobs.exists(),
            "an unauthorised upload wrote to the data partition"
        );
        for bad in [
            format!("/api/v1/uploads/sha256/{}?offset=0&size=1", "A".repeat(64)),
            "/api/v1/uploads/sha256/..%2F..%2Fetc?offset=0&size=1".to_owned(),
            format!("/api/v1/uploads/sha256/{hex}"),
            format!("/api/v1/uploads/sha256/{hex}?offset=x&size=1"),
            format!("/api/v1/uploads/sha256/{hex}?offset=5&size=1"),
        ] {
            let (s, v) = u.call("PUT", &bad, b"x".to_vec(), true).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        }
        let (s, v) = u
            .call(
                "PUT",
                &format!(
                    "/api/v1/uploads/sha256/{hex}?offset=0&size={}",
                    MAX_BLOB + 1
                ),
                vec![],
                true,
            )
            .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    }
}
