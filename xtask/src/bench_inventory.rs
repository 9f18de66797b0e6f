//! `cargo xtask bench inventory`: the inventory (`appliance serve`, REST on
//! loopback) against Cobbler 3.3.10 (`cobblerd -F`, XML-RPC, file storage)
//! as `peers.md` describes, in the same run.
//!
//! Both sides are driven by the same fleet: 8 concurrent clients, each with
//! its own connection, one request (ours) or one XML-RPC edit sequence
//! (Cobbler) per system. Headline (last line): seconds to create 1,200
//! systems and then edit `kernel_options` on all of them until every new
//! boot script is served (ours: median of 3 runs, each on a fresh server;
//! every answered write is a durable git commit, concurrent writes share
//! one by group commit); Cobbler's figure is create + edit + `sync` (its
//! boot files only change on sync). The line before it: our bulk edit (one
//! `PATCH /api/v1/systems?profile=p` until all 1,200 new boot scripts are
//! served, median of 5) against Cobbler's edit all + sync. Also printed:
//! min/median/max, list latency at 10,000 systems, boot-script latency for
//! one MAC and renders per second, and Cobbler's sync, `get_systems()` and
//! one render.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::root;

const N: usize = 1200;
/// Systems for the list measurement.
const BULK: usize = 10_000;
const KERNEL: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn mac(i: usize) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Http {
    agent: ureq::Agent,
    url: String,
    auth: String,
}

impl Http {
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> Result<String> {
        let url = format!("{}{path}", self.url);
        let resp = match method {
            "GET" => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            "POST" => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default().to_string()),
            _ => self
                .agent
                .patch(&url)
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default().to_string()),
        };
        let mut resp = resp.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("{method} {path}: HTTP {status}: {text}");
        }
        Ok(text)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// "min/median/max" of `v` (seconds) in milliseconds.
fn spread_ms(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "{:.0}/{:.0}/{:.0} ms",
        v[0] * 1000.0,
        v[v.len() / 2] * 1000.0,
        v[v.len() - 1] * 1000.0
    )
}

/// Clients at once on both sides: a fleet of operators' scripts and
/// provisioning hooks, each with its own connection.
const CLIENTS: usize = 8;
/// Runs of the headline workload (each on a fresh server).
const RUNS: usize = 3;
/// Bulk edits timed on 1,200 systems.
const BULK_RUNS: usize = 5;

/// Runs `work(http, i)` for i in 0..n on [`CLIENTS`] threads, each with its
/// own keep-alive connection, item i on client i % CLIENTS.
fn fleet(
    url: &str,
    auth: &str,
    n: usize,
    work: impl Fn(&Http, usize) -> Result<()> + Sync,
) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|w| {
                let work = &work;
                s.spawn(move || -> Result<()> {
                    let http = Http {
                        agent: ureq::Agent::new_with_defaults(),
                        url: url.to_owned(),
                        auth: auth.to_owned(),
                    };
                    for i in (w..n).step_by(CLIENTS) {
                        work(&http, i)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a client panicked"))?)
    })
}

/// Every boot script of systems 0..n carries `want` (fetched by the fleet).
fn scripts_carry(http: &Http, n: usize, want: &str) -> Result<()> {
    fleet(&http.url, &http.auth, n, |h, i| {
        let script = h.send("GET", &format!("/api/v1/boot/{}", mac(i)), None)?;
        if !script.contains(want) {
            bail!("boot script of {} lacks {want}:\n{script}", mac(i));
        }
        Ok(())
    })
}

fn start_server(data: &std::path::Path) -> Result<(Server, Http)> {
    let _ = std::fs::remove_dir_all(data);
    std::fs::create_dir_all(data)?;
    let mut child = Command::new(root().join("target/release/appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting appliance serve")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let server = Server(child);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("no listening line")?
        .to_owned();
    line.clear();
    out.read_line(&mut line)?;
    let token = line.trim().rsplit(' ').next().unwrap_or("").to_owned();
    let http = Http {
        agent: ureq::Agent::new_with_defaults(),
        url: format!("http://{addr}"),
        auth: format!("Bearer {token}"),
    };
    http.send("POST", "/api/v1/distros", Some(json!({"name": "d", "kernel": KERNEL, "initrd": KERNEL, "breed": "redhat", "arch": "x86_64", "variables": {"tree": "http://127.0.0.1/tree"}})))?;
    http.send(
        "POST",
        "/api/v1/profiles",
        Some(json!({"name": "p", "distro": "d"})),
    )?;
    Ok((server, http))
}

/// What our side measured.
struct Ours {
    /// Headline per run: create + edit + every boot script served.
    runs: Vec<f64>,
    /// Bulk edit of all systems until every new boot script is served.
    bulk: Vec<f64>,
}

fn ours() -> Result<Ours> {
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "appliance",
    ]))?;
    let data = root().join("target/bench/inventory/ours");
    let mut runs = Vec::new();
    let mut last = None;
    for run in 0..RUNS {
        let (server, http) = start_server(&data)?;
        let t = Instant::now();
        fleet(&http.url, &http.auth, N, |h, i| {
            h.send("POST", "/api/v1/systems", Some(json!({"name": format!("s{i:05}"), "profile": "p", "interfaces": [{"name": "eth0", "mac": mac(i), "ip": format!("10.1.{}.{}", i >> 8, i & 0xff)}]})))?;
            Ok(())
        })?;
        let create = t.elapsed().as_secs_f64();
        let t = Instant::now();
        fleet(&http.url, &http.auth, N, |h, i| {
            h.send(
                "PATCH",
                &format!("/api/v1/systems/s{i:05}"),
                Some(json!({"kernel_options": "console=ttyS0 edited=1"})),
            )?;
            Ok(())
        })?;
        let edit_only = t.elapsed().as_secs_f64();
        scripts_carry(&http, N, "edited=1")?;
        let edit = t.elapsed().as_secs_f64();
        let commits = Command::new("git")
            .arg("-C")
            .arg(data.join("inventory"))
            .args(["rev-list", "--count", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        eprintln!("  ours, run {}: {CLIENTS} clients: create {N} systems {create:.2} s; edit all {edit_only:.2} s, + every boot script served {edit:.2} s; {commits} commits for {} writes (group commit)", run + 1, 2 * N + 3);
        runs.push(create + edit);
        last = Some((server, http));
    }
    let (_server, http) = last.expect("RUNS > 0");

    // Bulk edit: one request for all 1,200, until every script is served.
    let mut bulk = Vec::new();
    for k in 0..BULK_RUNS {
        let t = Instant::now();
        let v = http.send(
            "PATCH",
            "/api/v1/systems?profile=p",
            Some(json!({"kernel_options": format!("console=ttyS0 bulk={k}")})),
        )?;
        let answered = t.elapsed().as_secs_f64();
        scripts_carry(&http, N, &format!("bulk={k}"))?;
        let served = t.elapsed().as_secs_f64();
        eprintln!(
            "  ours: bulk edit {k}: {v} answered {:.0} ms, every new boot script served {:.0} ms",
            answered * 1000.0,
            served * 1000.0
        );
        bulk.push(served);
    }
    eprintln!(
        "  ours: bulk edit of {N} systems until every new boot script is served (one request, one commit; {CLIENTS} clients fetch the scripts): min/median/max {} over {BULK_RUNS} runs",
        spread_ms(&bulk)
    );

    // Up to 10,000 systems in batches of 1,100 (one commit each).
    let t = Instant::now();
    for b in 0..(BULK - N) / 1100 {
        let objects: Vec<Value> = (0..1100)
            .map(|j| {
                let i = N + b * 1100 + j;
                json!({"kind": "system", "object": {"name": format!("s{i:05}"), "profile": "p", "interfaces": [{"mac": mac(i)}]}})
            })
            .collect();
        http.send("POST", "/api/v1/batch", Some(json!({"objects": objects})))?;
    }
    eprintln!(
        "  ours: batch create {} more systems {:.2} s",
        BULK - N,
        t.elapsed().as_secs_f64()
    );
    let list: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            // Every page (10,000 a page), as a client lists them all.
            let mut seen = 0;
            let mut path = "/api/v1/systems?limit=10000".to_owned();
            loop {
                let Ok(page) = http
                    .send("GET", &path, None)
                    .and_then(|b| Ok(serde_json::from_str::<Value>(&b)?))
                else {
                    return f64::NAN;
                };
                seen += page["items"].as_array().map_or(0, Vec::len);
                match page["next"].as_str() {
                    Some(n) => path = format!("/api/v1/systems?limit=10000&after={n}"),
                    None => break,
                }
            }
            let s = t.elapsed().as_secs_f64();
            if seen == BULK {
                s
            } else {
                f64::NAN
            }
        })
        .collect();
    eprintln!(
        "  ours: list {BULK} systems min/median/max {} over 7 runs (HTTP + JSON)",
        spread_ms(&list)
    );
    let boots = 2000;
    let t = Instant::now();
    for i in 0..boots {
        http.send("GET", &format!("/api/v1/boot/{}", mac(i % BULK)), None)?;
    }
    eprintln!(
        "  ours: boot script for one MAC {:.0} µs per request (HTTP round trip included)",
        t.elapsed().as_secs_f64() * 1e6 / boots as f64
    );
    let t = Instant::now();
    let mut renders = 0;
    while t.elapsed().as_secs_f64() < 2.0 {
        http.send(
            "GET",
            &format!("/api/v1/systems/s{:05}/autoinstall", renders % N),
            None,
        )?;
        renders += 1;
    }
    let rps = renders as f64 / t.elapsed().as_secs_f64();
    eprintln!("  ours: {rps:.0} kickstart renders/s (one client, HTTP included)");
    Ok(Ours { runs, bulk })
}

fn peer() -> Result<Value> {
    let work = root().join("target/bench/inventory");
    let venv = work.join("venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        crate::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "--no-deps",
            "cobbler==3.3.10",
        ]))?;
        crate::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "Cheetah3",
            "distro",
            "dnspython",
            "file-magic",
            "netaddr",
            "pymongo",
            "pyyaml",
            "requests",
            "schema",
        ]))?;
    }
    let driver = work.join("cobbler_driver.py");
    std::fs::write(&driver, include_str!("cobbler_driver.py"))?;
    let out = Command::new(&py)
        .arg(&driver)
        .arg(work.join("cobbler"))
        .arg(N.to_string())
        .arg(CLIENTS.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running the Cobbler driver")?;
    if !out.status.success() {
        bail!(
            "the Cobbler driver failed ({}); see {}",
            out.status,
            work.join("cobbler/cobblerd.log").display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("parsing the driver's output {last:?}"))
}

pub fn run() -> Result<()> {
    eprintln!("inventory bench: {N} systems, {CLIENTS} concurrent clients on both sides: ours (appliance serve, REST, a durable commit per answered write, group commit) vs Cobbler 3.3.10 (cobblerd -F, XML-RPC, file storage; its boot files change on sync)");
    let ours = ours()?;
    let p = match peer() {
        Ok(p) => p,
        Err(e) => bail!("Cobbler could not be measured: {e:#}"),
    };
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "  cobbler: {} clients: create {N} systems {:.2} s; sync {:.2} s; edit all + sync {:.2} s (boot file edited: {}); get_systems() {:.2} s; one render {:.1} ms",
        p["clients"], f("create"), f("sync"), f("edit_sync"), p["boot_file_edited"], f("get_systems"), f("render") * 1000.0
    );
    let peer_value = f("create") + f("edit_sync");
    let ours_value = median(ours.runs.clone());
    eprintln!(
        "  headline (create + edit until served), ours min/median/max over {RUNS} runs: {}; cobbler (create + edit + sync, one run) {:.0} ms",
        spread_ms(&ours.runs),
        peer_value * 1000.0
    );
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    // The bulk edit against Cobbler's way to the same end (edit all + sync).
    let bulk = median(ours.bulk.clone());
    println!(
        "{{\"bench\":\"inventory-bulk-edit\",\"ours\":{},\"peer\":\"cobbler\",\"peer_value\":{},\"unit\":\"s\",\"ratio\":{},\"better\":\"lower\"}}",
        r(bulk),
        r(f("edit_sync")),
        r(bulk / f("edit_sync"))
    );
    // The project's benchmark line, keys in the documented order.
    println!(
        "{{\"bench\":\"inventory\",\"ours\":{},\"peer\":\"cobbler\",\"peer_value\":{},\"unit\":\"s\",\"ratio\":{},\"better\":\"lower\"}}",
        r(ours_value),
        r(peer_value),
        r(ours_value / peer_value)
    );
    Ok(())
}
