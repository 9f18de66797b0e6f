//! `appliance repo …`: the inventory verbs, plus `repo sync NAME` (mirror
//! an apt repo now, waiting for the end) and a `repo list` that shows what
//! each mirror holds.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::client::Client;
use super::{print_json, Conn, Noun, RepoNounVerb, Verb};
use crate::inventory::model::Kind;

/// `appliance repo …`.
#[derive(Debug, Args)]
pub struct RepoCmd {
    #[command(subcommand)]
    pub verb: RepoVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

// Parsed once per run: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RepoVerb {
    /// Sync an apt repo's partial mirror from upstream and wait for it.
    Sync {
        name: String,
        /// Start the sync and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Import a container image into the server's OCI registry: an OCI
    /// image layout (directory or tar) or a docker-archive (`docker save`).
    ImportOci {
        /// The layout directory or the tar file.
        file: std::path::PathBuf,
        /// Where the registry serves it, REPO:TAG (tag default: latest).
        #[arg(long)]
        name: String,
    },
    #[command(flatten)]
    Common(RepoNounVerb),
}

/// A sync's progress on the terminal: a bar over the pool files (with
/// the bytes downloaded) when stderr is a terminal, else a line per phase
/// change at most every few seconds; nothing with `--json`.
struct SyncProgress {
    name: String,
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last_phase: String,
    last_line: Instant,
}

impl SyncProgress {
    fn new(name: &str, terminal: bool, quiet: bool) -> Self {
        let bar = terminal.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} files {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_owned());
            b
        });
        SyncProgress {
            name: name.to_owned(),
            bar,
            quiet,
            last_phase: String::new(),
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, p: &Value) {
        let phase = p["phase"].as_str().unwrap_or("").to_owned();
        let (done, total) = (
            p["files_done"].as_u64().unwrap_or(0),
            p["files_total"].as_u64().unwrap_or(0),
        );
        let down = human(p["bytes_downloaded"].as_u64().unwrap_or(0));
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            b.set_message(format!("{down} downloaded; {phase}"));
        } else if !self.quiet
            && phase != self.last_phase
            && (self.last_line.elapsed() >= Duration::from_secs(2) || !phase.starts_with("pool:"))
        {
            eprintln!(
                "{}: {phase} ({done}/{total} files, {down} downloaded)",
                self.name
            );
            self.last_phase = phase;
            self.last_line = Instant::now();
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!()
}

fn when(secs: Option<f64>) -> String {
    match secs {
        Some(s) => {
            let ago = crate::inventory::status::now().saturating_sub(s as i64);
            format!("{ago}s ago")
        }
        None => "never".into(),
    }
}

pub fn repo(cmd: RepoCmd) -> Result<()> {
    let c = cmd.conn.client();
    match cmd.verb {
        RepoVerb::Common(v) => common(&c, cmd.conn, Verb::from(v)),
        RepoVerb::ImportOci { file, name } => import_oci(&c, &file, &name, cmd.conn.json),
        RepoVerb::Sync { name, no_wait } => {
            let path = format!("/api/v1/repos/{name}/sync");
            let mut v = c.json("POST", &path, Some(&Value::Null))?;
            let mut shown = SyncProgress::new(
                &name,
                !cmd.conn.json && std::io::stderr().is_terminal(),
                cmd.conn.json,
            );
            while !no_wait && v["state"] == "running" {
                std::thread::sleep(Duration::from_millis(250));
                v = c.json("GET", &path, None)?;
                shown.update(&v["job"]["progress"]);
            }
            shown.finish();
            if cmd.conn.json {
                print_json(&v);
            } else if v["state"] == "done" {
                let r = &v["job"]["report"];
                println!(
                    "{name}: {} packages, {} ({} files, {} downloaded); snapshot {}",
                    r["packages"],
                    human(r["bytes"].as_u64().unwrap_or(0)),
                    v["files"],
                    human(r["bytes_downloaded"].as_u64().unwrap_or(0)),
                    r["snapshot"].as_str().unwrap_or("")
                );
            } else {
                println!("{name}: {}", v["state"].as_str().unwrap_or("?"));
            }
            if v["state"] == "failed" {
                bail!(
                    "syncing {name}: {}",
                    v["job"]["error"].as_str().unwrap_or("failed")
                );
            }
            Ok(())
        }
    }
}

/// `appliance repo import-oci FILE --name REPO:TAG`: uploads the file (a
/// directory is sent as a tar made on the fly into a temporary file) to
/// `POST /api/v1/oci/import`.
/// The verbs every noun has, with a `list` and `show` that add each apt
/// mirror's sync state.
fn common(c: &Client, conn: Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List => {
            let list = Value::Array(c.list("/api/v1/repos")?);
            let mut rows = Vec::new();
            for r in list.as_array().into_iter().flatten() {
                let name = r["name"].as_str().unwrap_or("");
                let st = if r["breed"] == "apt" {
                    c.json("GET", &format!("/api/v1/repos/{name}/sync"), None)?
                } else {
                    Value::Null
                };
                rows.push((r.clone(), st));
            }
            if conn.json {
                let v: Vec<Value> = rows
                    .into_iter()
                    .map(|(mut r, st)| {
                        r["mirror_status"] = st;
                        r
                    })
                    .collect();
                print_json(&Value::from(v));
                return Ok(());
            }
            println!(
                "{:<16} {:<6} {:>8} {:>10} {:<12} {:<32} MIRROR",
                "NAME", "BREED", "PACKAGES", "BYTES", "LAST SYNC", "UPSTREAM RELEASE DATE"
            );
            for (r, st) in rows {
                let date = st["suites"]
                    .as_object()
                    .and_then(|m| m.values().next())
                    .and_then(|s| s["date"].as_str())
                    .unwrap_or("-");
                let state = match st["state"].as_str() {
                    Some("running") => "syncing".to_string(),
                    _ if st.is_null() => "-".into(),
                    _ => when(st["last_sync"].as_f64()),
                };
                println!(
                    "{:<16} {:<6} {:>8} {:>10} {:<12} {:<32} {}",
                    r["name"].as_str().unwrap_or(""),
                    r["breed"].as_str().unwrap_or(""),
                    st["packages"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or("-".into()),
                    st["bytes"].as_u64().map(human).unwrap_or("-".into()),
                    state,
                    date,
                    r["mirror"].as_str().unwrap_or(""),
                );
            }
            Ok(())
        }
        Verb::Show { name } => {
            let obj = c.json("GET", &format!("/api/v1/repos/{name}"), None)?;
            let st = if obj["breed"] == "apt" {
                c.json("GET", &format!("/api/v1/repos/{name}/sync"), None)?
            } else {
                Value::Null
            };
            if conn.json {
                let mut v = obj;
                v["mirror_status"] = st;
                print_json(&v);
                return Ok(());
            }
            super::print_object(Kind::Repo, &obj);
            if st.is_null() {
                return Ok(());
            }
            println!(
                "mirror: {}, last sync {}, {} packages, {} files, {}",
                st["state"].as_str().unwrap_or("?"),
                when(st["last_sync"].as_f64()),
                st["packages"].as_u64().unwrap_or(0),
                st["files"].as_u64().unwrap_or(0),
                st["bytes"].as_u64().map(human).unwrap_or("-".into()),
            );
            if let Some(e) = st["last_error"].as_str() {
                println!("last error: {e}");
            }
            let missing = st["missing"].as_array().cloned().unwrap_or_default();
            if !missing.is_empty() {
                println!(
                    "missing udebs ({}): upstream did not serve them; the Debian installer \
                 will stop at \"Loading additional components\"",
                    missing.len()
                );
                for m in &missing {
                    println!(
                        "  {}  {}",
                        m["package"].as_str().unwrap_or(""),
                        m["path"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        verb => super::noun(Kind::Repo, Noun { verb, conn }),
    }
}

fn import_oci(
    c: &super::client::Client,
    file: &std::path::Path,
    name: &str,
    json: bool,
) -> Result<()> {
    use anyhow::Context;
    use std::io::Read;
    crate::oci::parse_name(name)?;
    let meta = std::fs::metadata(file).with_context(|| format!("opening {}", file.display()))?;
    let _tmp;
    let upload = if meta.is_dir() {
        let t = tempfile::NamedTempFile::new().context("creating a temporary tar")?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(t.reopen()?));
        b.follow_symlinks(false);
        b.append_dir_all(".", file)
            .with_context(|| format!("packing {}", file.display()))?;
        b.into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .context("writing the temporary tar")?;
        let p = t.path().to_path_buf();
        _tmp = t;
        p
    } else {
        file.to_path_buf()
    };
    let mut f =
        std::fs::File::open(&upload).with_context(|| format!("opening {}", upload.display()))?;
    let path = format!("/api/v1/oci/import?name={name}");
    let (_, mut body) = c.stream(
        "POST",
        &path,
        Some((ureq::SendBody::from_reader(&mut f), "application/x-tar")),
    )?;
    let mut text = String::new();
    body.read_to_string(&mut text)?;
    let v: Value = serde_json::from_str(&text).context("parsing the import answer")?;
    if json {
        print_json(&v);
    } else {
        println!(
            "{}:{} = {} ({}, {} blobs, {} new, {})",
            v["repo"].as_str().unwrap_or(""),
            v["tag"].as_str().unwrap_or(""),
            v["digest"].as_str().unwrap_or(""),
            v["format"].as_str().unwrap_or(""),
            v["blobs"],
            v["blobs_added"],
            human(v["bytes"].as_u64().unwrap_or(0))
        );
    }
    Ok(())
}
