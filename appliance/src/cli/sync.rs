//! `appliance sync [status|conflicts]` and `appliance bundle export|import`:
//! sync with the parent through the local server, the conflicts merges
//! found, and offline bundles (with progress bars).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::Conn;

/// `appliance sync …`.
#[derive(Debug, Args)]
pub struct SyncCmd {
    #[command(subcommand)]
    pub verb: Option<SyncVerb>,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum SyncVerb {
    /// Sync with the parent now (the default).
    Run,
    /// This node's state hash, parent and last sync.
    Status,
    /// Versions that lost against a concurrent edit (kept in history).
    Conflicts,
}

/// `appliance bundle …`.
#[derive(Debug, Args)]
pub struct BundleCmd {
    #[command(subcommand)]
    pub verb: BundleVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum BundleVerb {
    /// Write one file with what NODE lacks (history and blobs).
    Export {
        /// The node id the bundle is for (everything when unknown).
        #[arg(long = "for")]
        for_node: Option<String>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Apply a bundle file exactly as an online sync would.
    Import { file: PathBuf },
}

pub fn sync(cmd: SyncCmd) -> Result<()> {
    let client = cmd.conn.client();
    let v = match cmd.verb.unwrap_or(SyncVerb::Run) {
        SyncVerb::Run => client.json("POST", "/api/v1/sync/run", Some(&Value::Null))?,
        SyncVerb::Status => client.json("GET", "/api/v1/sync/status", None)?,
        SyncVerb::Conflicts => {
            let v = Value::Array(client.list("/api/v1/sync/conflicts")?);
            if !cmd.conn.json {
                println!("{:<32} {:<36} {:<40} FROM NODE", "PATH", "STAMP", "BLOB");
                for c in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<36} {:<40} {}",
                        c["path"].as_str().unwrap_or(""),
                        c["stamp"].as_str().unwrap_or(""),
                        c["blob"].as_str().unwrap_or("(deleted)"),
                        c["node"].as_str().unwrap_or(""),
                    );
                }
                return Ok(());
            }
            v
        }
    };
    if cmd.conn.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", sync_text(&v));
    }
    Ok(())
}

/// `sync` and `sync status` for people: one `key: value` line per field
/// (nested objects flattened with dots), sorted by key.
fn sync_text(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, out: &mut String) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            Value::Array(a) if !a.is_empty() && a.iter().all(|x| !x.is_object()) => {
                let items: Vec<String> = a.iter().map(scalar).collect();
                out.push_str(&format!("{prefix}: {}\n", items.join(", ")));
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, x) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), x, out);
                }
            }
            x => out.push_str(&format!("{prefix}: {}\n", scalar(x))),
        }
    }
    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            Value::Object(_) | Value::Array(_) => "(none)".into(),
            x => x.to_string(),
        }
    }
    let mut out = String::new();
    walk("", v, &mut out);
    out
}

/// A progress display: a bar on a terminal, a line per 10% otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: Option<u64>,
    done: u64,
    next_line: u64,
    what: String,
}

impl Progress {
    fn new(what: &str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what.to_owned());
            b
        });
        Self {
            bar,
            total,
            done: 0,
            next_line: 0,
            what: what.to_owned(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        match (&self.bar, self.total) {
            (Some(b), _) => b.set_position(self.done),
            (None, Some(t)) if t > 0 && self.done * 10 / t >= self.next_line => {
                eprintln!(
                    "{}: {}% ({} bytes)",
                    self.what,
                    self.done * 100 / t,
                    self.done
                );
                self.next_line = self.done * 10 / t + 1;
            }
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

struct Counting<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

pub fn bundle(cmd: BundleCmd) -> Result<()> {
    let client = cmd.conn.client();
    match cmd.verb {
        BundleVerb::Export { for_node, output } => {
            let q = for_node
                .as_deref()
                .map(|n| format!("?for={n}"))
                .unwrap_or_default();
            let (len, body) = client.stream("GET", &format!("/api/v1/sync/export{q}"), None)?;
            let name = output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = output.with_file_name(format!(".{name}.part"));
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut r = Counting {
                inner: body,
                progress: Progress::new("export", len),
            };
            let res = std::io::copy(&mut r, &mut f)
                .and_then(|n| f.sync_all().map(|()| n))
                .with_context(|| format!("writing {}", tmp.display()));
            r.progress.finish();
            let n = match res {
                Ok(n) if len.is_none_or(|l| l == n) => n,
                Ok(n) => {
                    let _ = std::fs::remove_file(&tmp);
                    anyhow::bail!("the server sent {n} of {len:?} bytes; nothing written");
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
            if cmd.conn.json {
                println!("{}", serde_json::json!({"file": output, "bytes": n}));
            } else {
                println!("wrote {} ({n} bytes)", output.display());
            }
        }
        BundleVerb::Import { file } => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata()?.len();
            let mut r = Counting {
                inner: f,
                progress: Progress::new("import", Some(len)),
            };
            let res = client.stream(
                "POST",
                "/api/v1/sync/import",
                Some((
                    ureq::SendBody::from_reader(&mut r),
                    "application/octet-stream",
                )),
            );
            r.progress.finish();
            let (_, mut body) = res?;
            let mut text = String::new();
            body.read_to_string(&mut text)?;
            let v: Value = serde_json::from_str(&text).context("parsing the import answer")?;
            if cmd.conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "imported {} objects, {} new blobs from {}: {} (state {})",
                    v["objects"],
                    v["blobs_added"],
                    v["from"].as_str().unwrap_or(""),
                    v["merge"]["action"].as_str().unwrap_or(""),
                    v["merge"]["state"].as_str().unwrap_or("")
                );
            }
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sync_text_flattens_nested_fields() {
        let v = serde_json::json!({"state": "in_sync", "parent": {"url": "http://p", "node": null}, "pushed": 3, "ids": ["a", "b"]});
        assert_eq!(
            super::sync_text(&v),
            "ids: a, b\nparent.node: -\nparent.url: http://p\npushed: 3\nstate: in_sync\n"
        );
    }
}
