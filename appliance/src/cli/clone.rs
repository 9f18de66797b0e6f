//! `appliance clone capture|deploy|restore|jobs`: disk cloning through the
//! server (`/api/v1/clone/jobs`). The server sets each machine's next boot
//! to the network and power-cycles it through its BMC (or says to
//! network-boot it by hand); this command then follows the jobs until
//! each is done or failed, or gives up after `--timeout` (cancelling the
//! jobs, so the machines are set back to local boot).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::Conn;

/// `appliance clone …`.
#[derive(Debug, Args)]
pub struct CloneCmd {
    #[command(subcommand)]
    pub verb: CloneVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Args, Clone)]
pub struct Wait {
    /// Give up (and cancel) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Give up when a machine has not checked in after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub checkin_timeout: u64,
    /// Start the jobs and return at once.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum CloneVerb {
    /// Capture SYSTEM's disk as a new image.
    Capture {
        system: String,
        /// Name of the new image.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Write IMAGE onto each target system (overwrites their disks).
    Deploy {
        image: String,
        /// Target systems.
        #[arg(long = "to", required = true, num_args = 1..)]
        to: Vec<String>,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Put SYSTEM's last capture (or --from IMAGE) back on its disk.
    Restore {
        system: String,
        #[arg(long)]
        from: Option<String>,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// List clone jobs.
    Jobs,
}

fn line(j: &Value) -> String {
    let pct = match (j["done_bytes"].as_u64(), j["total_bytes"].as_u64()) {
        (Some(d), Some(t)) if t > 0 => format!(" {:>3}%", d * 100 / t),
        _ => String::new(),
    };
    format!(
        "{:<12} {:<8} {:<12} {:<8} {:<9}{pct} {}",
        j["id"].as_str().unwrap_or(""),
        j["action"].as_str().unwrap_or(""),
        j["system"].as_str().unwrap_or(""),
        j["state"].as_str().unwrap_or(""),
        j["phase"].as_str().unwrap_or(""),
        j["message"].as_str().unwrap_or(""),
    )
}

/// Percent-encodes a query value (RFC 3986 unreserved bytes pass).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn clone(cmd: CloneCmd) -> Result<()> {
    let client = cmd.conn.client();
    let (req, wait) = match cmd.verb {
        CloneVerb::Jobs => {
            let v = Value::Array(client.list("/api/v1/clone/jobs")?);
            if cmd.conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for j in v.as_array().into_iter().flatten() {
                    println!("{}", line(j));
                }
            }
            return Ok(());
        }
        CloneVerb::Capture { system, name, wait } => (
            json!({"action": "capture", "systems": [system], "image": name}),
            wait,
        ),
        CloneVerb::Deploy {
            image,
            to,
            yes,
            wait,
        } => {
            super::confirm(
                &format!(
                    "overwrite the disks of {} with image {image}",
                    to.join(", ")
                ),
                yes,
            )?;
            (
                json!({"action": "deploy", "systems": to, "image": image}),
                wait,
            )
        }
        CloneVerb::Restore {
            system,
            from,
            yes,
            wait,
        } => {
            super::confirm(
                &format!(
                    "overwrite the disk of {system} with {}",
                    from.as_deref().unwrap_or("its last capture")
                ),
                yes,
            )?;
            (
                json!({"action": "restore", "systems": [system], "image": from}),
                wait,
            )
        }
    };
    let jobs = client.json("POST", "/api/v1/clone/jobs", Some(&req))?;
    let ids: Vec<String> = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str().map(str::to_owned))
        .collect();
    for j in jobs.as_array().into_iter().flatten() {
        eprintln!(
            "job {} for {}: {}",
            j["id"].as_str().unwrap_or(""),
            j["system"].as_str().unwrap_or(""),
            j["power"].as_str().unwrap_or("")
        );
    }
    if wait.no_wait {
        if cmd.conn.json {
            println!("{}", serde_json::to_string_pretty(&jobs)?);
        }
        return Ok(());
    }
    let started = Instant::now();
    let mut last_line = std::collections::HashMap::new();
    let finals = loop {
        let mut all = Vec::new();
        for id in &ids {
            all.push(client.json("GET", &format!("/api/v1/clone/jobs/{id}"), None)?);
        }
        for j in &all {
            let l = line(j);
            if last_line.get(&l) != Some(&()) && !cmd.conn.json {
                eprintln!("{l}");
            }
            last_line.insert(l, ());
        }
        let open: Vec<&Value> = all
            .iter()
            .filter(|j| matches!(j["state"].as_str(), Some("pending" | "running")))
            .collect();
        if open.is_empty() {
            break all;
        }
        let elapsed = started.elapsed();
        let why = if elapsed > Duration::from_secs(wait.timeout) {
            Some(format!("timed out after {} s", wait.timeout))
        } else if elapsed > Duration::from_secs(wait.checkin_timeout)
            && open.iter().any(|j| j["state"] == "pending")
        {
            Some(format!(
                "the machine never checked in within {} s (is it set to network-boot?)",
                wait.checkin_timeout
            ))
        } else {
            None
        };
        if let Some(why) = why {
            for j in open {
                let id = j["id"].as_str().unwrap_or("");
                let _ = client.request(
                    "DELETE",
                    &format!("/api/v1/clone/jobs/{id}?reason={}", query_escape(&why)),
                    None,
                );
                eprintln!("job {id} ({}): {why}", j["system"].as_str().unwrap_or(""));
            }
            bail!("{why}");
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    if cmd.conn.json {
        println!("{}", serde_json::to_string_pretty(&finals)?);
    }
    let failed: Vec<String> = finals
        .iter()
        .filter(|j| j["state"] != "done")
        .map(|j| {
            format!(
                "{}: {}",
                j["system"].as_str().unwrap_or(""),
                j["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} jobs failed: {}",
            failed.len(),
            finals.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            super::query_escape("never checked in within 20 s (is it?)"),
            "never%20checked%20in%20within%2020%20s%20%28is%20it%3F%29"
        );
        assert_eq!(super::query_escape("a-b_c.d~é"), "a-b_c.d~%C3%A9");
    }
}
