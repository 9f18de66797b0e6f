//! The audit log: every write the API accepts or refuses after its guard
//! let it through is one JSON line in `<data>/state/audit.jsonl`:
//! `{"time":<unix s>,"who":"<token name | job | anonymous>","role":"…",
//! "from":"<peer ip:port>","method":"POST","path":"/api/v1/…","status":201}`.
//! It survives restarts; at 64 MiB it moves to `audit.jsonl.1` (one
//! generation kept). Writes never fail a request: a log that cannot be
//! written is reported in the server log.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// The log `init` set up, if any.
fn log_path() -> Option<PathBuf> {
    LOG.get()
        .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Where the log lives under a data directory.
pub fn path_in(data: &Path) -> PathBuf {
    data.join("state/audit.jsonl")
}

/// How far a child's log has been forwarded to its parent (child side,
/// `state/audit-sent.json`), or received from one child (parent side,
/// one entry per child in `state/audit-received.json`): `first` is the
/// SHA-256 of the log file's first line (it tells a rotated file from
/// the one the offset counts in), `offset` the bytes of that file done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub first: String,
    pub offset: u64,
    /// When the child last forwarded (unix s; child side only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A sync that changed nothing forwards audit lines at most this often,
/// so a quiet sync stays one round trip (`appliance sync` itself is a
/// write each time); a sync that moved anything forwards them at once.
pub const QUIET_FORWARD_SECS: u64 = 300;

/// Whether a quiet sync should forward now.
pub fn quiet_forward_due(data: &Path) -> bool {
    let sent: Cursor = crate::state::load_json(&data.join(SENT_FILE))
        .ok()
        .flatten()
        .unwrap_or_default();
    (crate::inventory::status::now().max(0) as u64).saturating_sub(sent.at) >= QUIET_FORWARD_SECS
}

/// Most bytes forwarded in one request.
pub const FORWARD_CHUNK: usize = 512 << 10;

const SENT_FILE: &str = "state/audit-sent.json";
const RECEIVED_FILE: &str = "state/audit-received.json";

fn first_line_id(path: &Path) -> std::io::Result<Option<String>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut line = Vec::new();
    std::io::BufReader::new(f).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Ok(None);
    }
    Ok(Some(hex::encode(Sha256::digest(&line))))
}

/// Whole lines of `path` from `offset`, at most `max` bytes (but at least
/// one line, however long).
fn lines_from(path: &Path, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(max as u64).read_to_end(&mut buf)?;
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(end) => buf.truncate(end + 1),
        None => {
            // One line longer than `max`, or a line still being written.
            buf.clear();
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            std::io::BufReader::new(f).read_until(b'\n', &mut buf)?;
            if !buf.ends_with(b"\n") {
                buf.clear();
            }
        }
    }
    Ok(buf)
}

/// The next lines of this node's log its parent has not been sent, with
/// the cursor they start at and the cursor after them; `None` when the
/// parent has everything. A log that rotated since the last forward
/// first finishes the rotated file (`audit.jsonl.1`), when it is the one
/// the cursor counts in.
pub fn pending(data: &Path, max: usize) -> Result<Option<(Vec<u8>, Cursor, Cursor)>> {
    let log = path_in(data);
    let sent: Cursor = crate::state::load_json(&data.join(SENT_FILE))?.unwrap_or_default();
    let _held = LOG
        .get()
        .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
    let Some(current) =
        first_line_id(&log).with_context(|| format!("reading {}", log.display()))?
    else {
        return Ok(None);
    };
    let (file, start) = if sent.first == current {
        (log, sent.offset)
    } else {
        let old = log.with_extension("jsonl.1");
        match first_line_id(&old)? {
            Some(id) if id == sent.first && std::fs::metadata(&old)?.len() > sent.offset => {
                (old, sent.offset)
            }
            _ => (log, 0),
        }
    };
    let id = first_line_id(&file)?.unwrap_or_default();
    let start = if id == sent.first { start } else { 0 };
    let chunk =
        lines_from(&file, start, max).with_context(|| format!("reading {}", file.display()))?;
    if chunk.is_empty() {
        return Ok(None);
    }
    let from = Cursor {
        first: id.clone(),
        offset: start,
        at: 0,
    };
    let to = Cursor {
        first: id,
        offset: start + chunk.len() as u64,
        at: 0,
    };
    Ok(Some((chunk, from, to)))
}

/// Records that the parent holds this node's log up to `to`.
pub fn mark_sent(data: &Path, to: &Cursor) -> Result<()> {
    let to = &Cursor {
        at: crate::inventory::status::now().max(0) as u64,
        ..to.clone()
    };
    Ok(crate::state::save_json(
        &data.join(SENT_FILE),
        to,
        true,
        crate::state::Secrecy::Public,
    )?)
}

/// Appends lines a child forwarded (its own writes and those its subtree
/// forwarded to it) to this node's log, each with `"via"` naming the
/// child that delivered it and `"node"` the node it says it came from
/// (the child's id when it names none). A line is only as true as that
/// child: `via` is what the replica token proved. `from` is where the
/// chunk starts in the child's log; what this node already received from
/// that child (a retried request) is skipped, so each line lands once.
/// Returns the lines appended.
pub fn append_forwarded(
    data: &Path,
    child: &uuid::Uuid,
    from: &Cursor,
    body: &[u8],
) -> Result<usize> {
    if !body.is_empty() && !body.ends_with(b"\n") {
        bail!("the audit chunk does not end with a whole line");
    }
    let mut lines = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let mut v: serde_json::Value = serde_json::from_slice(raw)
            .with_context(|| format!("audit line {} is not JSON", i + 1))?;
        let Some(obj) = v.as_object_mut() else {
            bail!("audit line {} is not a JSON object", i + 1);
        };
        let node = obj
            .get("node")
            .and_then(|n| n.as_str())
            .and_then(|n| uuid::Uuid::parse_str(n).ok())
            .unwrap_or(*child);
        obj.insert("node".into(), node.to_string().into());
        obj.insert("via".into(), child.to_string().into());
        lines.push((raw.len() + 1, v));
    }
    let received_path = data.join(RECEIVED_FILE);
    let log = log_path().unwrap_or_else(|| path_in(data));
    let guard = LOG
        .get()
        .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
    let mut received: std::collections::BTreeMap<String, Cursor> =
        crate::state::load_json(&received_path)?.unwrap_or_default();
    let key = child.to_string();
    let mut skip = match received.get(&key) {
        Some(c) if c.first == from.first && c.offset > from.offset => c.offset - from.offset,
        _ => 0,
    };
    let mut n = 0;
    for (len, line) in &lines {
        if skip >= *len as u64 {
            skip -= *len as u64;
            continue;
        }
        append(&log, line).with_context(|| format!("writing {}", log.display()))?;
        n += 1;
    }
    let end = from.offset + body.len() as u64;
    let keep = match received.get(&key) {
        Some(c) if c.first == from.first && c.offset > end => c.offset,
        _ => end,
    };
    received.insert(
        key,
        Cursor {
            first: from.first.clone(),
            offset: keep,
            at: 0,
        },
    );
    crate::state::save_json(
        &received_path,
        &received,
        true,
        crate::state::Secrecy::Public,
    )?;
    drop(guard);
    Ok(n)
}

/// One page of this node's log, oldest first: lines `after` (a line
/// number, 0 for the start) and at most `limit`, with the number to ask
/// after for the next page.
pub fn page(
    data: &Path,
    after: usize,
    limit: usize,
) -> Result<(Vec<serde_json::Value>, Option<usize>)> {
    let log = log_path().unwrap_or_else(|| path_in(data));
    let f = match std::fs::File::open(&log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", log.display())),
    };
    let mut items = Vec::new();
    let mut next = None;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate().skip(after) {
        let line = line.with_context(|| format!("reading {}", log.display()))?;
        if items.len() == limit {
            next = Some(i);
            break;
        }
        if let Ok(v) = serde_json::from_str(&line) {
            items.push(v);
        }
    }
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_lines(path: &Path, lines: &[&str]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Forwards everything pending from `child` to `parent`, as a sync does.
    fn forward(child: &Path, parent: &Path, id: &uuid::Uuid, max: usize) -> usize {
        let mut n = 0;
        while let Some((chunk, from, to)) = pending(child, max).unwrap() {
            n += append_forwarded(parent, id, &from, &chunk).unwrap();
            mark_sent(child, &to).unwrap();
        }
        n
    }

    #[test]
    fn a_childs_log_reaches_its_parent_once_through_retries_and_rotation() {
        let (child, parent) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = uuid::Uuid::from_u128(7);
        let grandchild = uuid::Uuid::from_u128(9);
        let log = path_in(child.path());
        write_lines(
            &log,
            &[
                r#"{"who":"admin","path":"/api/v1/systems","status":201}"#,
                r#"{"who":"ops","path":"/api/v1/profiles/p","status":200}"#,
            ],
        );
        // A line the child's own child forwarded keeps its node.
        write_lines(
            &log,
            &[&format!(
                r#"{{"who":"x","node":"{grandchild}","via":"{grandchild}"}}"#
            )],
        );
        assert!(
            pending(parent.path(), 1 << 20).unwrap().is_none(),
            "nothing to send"
        );
        // One line per request, and the first request retried: the parent
        // keeps each line once.
        let (chunk, from, _) = pending(child.path(), 10).unwrap().unwrap();
        assert_eq!(
            chunk.iter().filter(|&&b| b == b'\n').count(),
            1,
            "whole lines only"
        );
        assert_eq!(
            append_forwarded(parent.path(), &id, &from, &chunk).unwrap(),
            1
        );
        assert_eq!(forward(child.path(), parent.path(), &id, 10), 2);
        let got = read_lines(&path_in(parent.path()));
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0]["who"], "admin");
        assert_eq!(got[0]["node"], id.to_string());
        assert_eq!(got[0]["via"], id.to_string());
        assert_eq!(got[2]["node"], grandchild.to_string());
        assert_eq!(
            got[2]["via"],
            id.to_string(),
            "via is the child that delivered it"
        );
        assert!(pending(child.path(), 1 << 20).unwrap().is_none());
        // More lines, then the log rotates: the rest of the old file goes
        // first, then the new file from its start.
        write_lines(&log, &[r#"{"who":"late"}"#]);
        std::fs::rename(&log, log.with_extension("jsonl.1")).unwrap();
        write_lines(&log, &[r#"{"who":"new"}"#]);
        assert_eq!(forward(child.path(), parent.path(), &id, 1 << 20), 2);
        let got = read_lines(&path_in(parent.path()));
        let who: Vec<_> = got.iter().map(|v| v["who"].as_str().unwrap()).collect();
        assert_eq!(who, ["admin", "ops", "x", "late", "new"]);
        // Bad input is refused with its reason, and nothing is appended.
        let from = Cursor {
            first: "0".repeat(64),
            offset: 0,
            at: 0,
        };
        let e = append_forwarded(parent.path(), &id, &from, b"[1]\n").unwrap_err();
        assert!(format!("{e:#}").contains("not a JSON object"), "{e:#}");
        let e = append_forwarded(parent.path(), &id, &from, b"{\"a\":1}").unwrap_err();
        assert!(format!("{e:#}").contains("whole line"), "{e:#}");
        assert_eq!(read_lines(&path_in(parent.path())).len(), 5);
        // Paging.
        let (items, next) = page(parent.path(), 0, 2).unwrap();
        assert_eq!((items.len(), next), (2, Some(2)));
        let (items, next) = page(parent.path(), 4, 2).unwrap();
        assert_eq!((items.len(), next), (1, None));
        assert_eq!(items[0]["who"], "new");
    }
}
