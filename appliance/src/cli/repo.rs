//! `appliance repo …`: the inventory verbs, plus `repo sync NAME` (mirror
//! an apt repo now, waiting for the end) and a `repo list` that shows what
//! each mirror holds.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{print_json, Conn, Noun, Verb};
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
    #[command(flatten)]
    Common(Verb),
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
        RepoVerb::Common(Verb::List) => {
            let list = c.json("GET", "/api/v1/repos", None)?;
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
            if cmd.conn.json {
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
        RepoVerb::Common(Verb::Show { name }) => {
            let obj = c.json("GET", &format!("/api/v1/repos/{name}"), None)?;
            let st = if obj["breed"] == "apt" {
                c.json("GET", &format!("/api/v1/repos/{name}/sync"), None)?
            } else {
                Value::Null
            };
            if cmd.conn.json {
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
        RepoVerb::Common(verb) => super::noun(
            Kind::Repo,
            Noun {
                verb,
                conn: cmd.conn,
            },
        ),
        RepoVerb::Sync { name, no_wait } => {
            let path = format!("/api/v1/repos/{name}/sync");
            let mut v = c.json("POST", &path, Some(&Value::Null))?;
            let mut last_phase = String::new();
            while !no_wait && v["state"] == "running" {
                std::thread::sleep(Duration::from_millis(250));
                v = c.json("GET", &path, None)?;
                let phase = v["job"]["progress"]["phase"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                if phase != last_phase && !cmd.conn.json {
                    eprintln!("{name}: {phase}");
                    last_phase = phase;
                }
            }
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
