//! The audit log: every write the API accepts or refuses after its guard
//! let it through is one JSON line in `<data>/state/audit.jsonl`:
//! `{"time":<unix s>,"who":"<token name | job | anonymous>","role":"…",
//! "from":"<peer ip:port>","method":"POST","path":"/api/v1/…","status":201}`.
//! It survives restarts; at 64 MiB it moves to `audit.jsonl.1` (one
//! generation kept). Writes never fail a request: a log that cannot be
//! written is reported in the server log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use axum::http::{Method, StatusCode};

use crate::http::{Caller, Role};

const ROTATE_AT: u64 = 64 << 20;

static LOG: OnceLock<Mutex<PathBuf>> = OnceLock::new();

/// Where audit lines go (called once by `serve`; without it nothing is
/// recorded, e.g. in unit tests).
pub fn init(data: &std::path::Path) {
    let _ = LOG.set(Mutex::new(data.join("state/audit.jsonl")));
}

/// Records one write.
pub fn record(caller: &Caller, method: &Method, path: &str, status: StatusCode) {
    let Some(log) = LOG.get() else { return };
    let role = match &caller.role {
        Role::Anonymous => "anonymous".to_owned(),
        Role::Token { scope, .. } => scope.to_string(),
        Role::Job(j) => format!("job:{}", j.kind),
    };
    let line = serde_json::json!({
        "time": crate::inventory::status::now(),
        "who": caller.name(),
        "role": role,
        "from": caller.peer.map(|p| p.to_string()),
        "method": method.as_str(),
        "path": path,
        "status": status.as_u16(),
    });
    let path = log.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = append(&path, &line) {
        tracing::error!(path = %path.display(), error = %e, "writing the audit log failed");
    }
}

fn append(path: &std::path::Path, line: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > ROTATE_AT) {
        std::fs::rename(path, path.with_extension("jsonl.1"))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    f.write_all(&bytes)
}
