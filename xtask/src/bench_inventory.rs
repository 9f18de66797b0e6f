//! `cargo xtask bench inventory`: the inventory (`appliance serve`, REST on
//! loopback) against Cobbler 3.3.10 (`cobblerd -F`, XML-RPC, file storage)
//! as `peers.md` describes, in the same run.
//!
//! Headline (last line): seconds to create 1,200 systems one request at a
//! time and then edit `kernel_options` on all of them until every new boot
//! script is served; Cobbler's figure is create + edit + `sync` (its boot
//! files only change on sync). Also printed: 10,000-system bulk create,
//! list latency, boot-script latency for one MAC and renders per second
//! (ours over HTTP on one keep-alive connection), and Cobbler's sync,
//! `get_systems()` and one render.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::root;

const N: usize = 1200;
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

fn ours() -> Result<(f64, f64)> {
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "appliance",
    ]))?;
    let data = root().join("target/bench/inventory/ours");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let mut child = Command::new(root().join("target/release/appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting appliance serve")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let _server = Server(child);
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

    let t = Instant::now();
    for i in 0..N {
        http.send("POST", "/api/v1/systems", Some(json!({"name": format!("s{i:05}"), "profile": "p", "interfaces": [{"name": "eth0", "mac": mac(i), "ip": format!("10.1.{}.{}", i >> 8, i & 0xff)}]})))?;
    }
    let create = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..N {
        http.send(
            "PATCH",
            &format!("/api/v1/systems/s{i:05}"),
            Some(json!({"kernel_options": "console=ttyS0 edited=1"})),
        )?;
    }
    let edit_only = t.elapsed().as_secs_f64();
    for i in 0..N {
        let script = http.send("GET", &format!("/api/v1/boot/{}", mac(i)), None)?;
        if !script.contains("edited=1") {
            bail!("boot script of {} lacks the edit:\n{script}", mac(i));
        }
    }
    let edit = t.elapsed().as_secs_f64();
    eprintln!("  ours: create {N} systems {create:.2} s ({:.1} ms each); edit all {edit_only:.2} s, + every boot script served {edit:.2} s", create * 1000.0 / N as f64);

    // Bulk: 10,000 more systems in batches of 1,000 (one commit each).
    let t = Instant::now();
    for b in 0..BULK / 1000 {
        let objects: Vec<Value> = (0..1000)
            .map(|j| {
                let i = N + b * 1000 + j;
                json!({"kind": "system", "object": {"name": format!("s{i:05}"), "profile": "p", "interfaces": [{"mac": mac(i)}]}})
            })
            .collect();
        http.send("POST", "/api/v1/batch", Some(json!({"objects": objects})))?;
    }
    eprintln!(
        "  ours: bulk create {BULK} systems {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let list = median(
        (0..7)
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
                if seen == N + BULK {
                    s
                } else {
                    f64::NAN
                }
            })
            .collect(),
    );
    eprintln!(
        "  ours: list {} systems {:.1} ms (median of 7, HTTP + JSON)",
        N + BULK,
        list * 1000.0
    );
    let boots = 2000;
    let t = Instant::now();
    for i in 0..boots {
        http.send(
            "GET",
            &format!("/api/v1/boot/{}", mac(i % (N + BULK))),
            None,
        )?;
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
    Ok((create + edit, edit))
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
    eprintln!("inventory bench: {N} systems, ours (appliance serve, REST) vs Cobbler 3.3.10 (cobblerd -F, XML-RPC)");
    let (ours, _edit) = ours()?;
    let p = match peer() {
        Ok(p) => p,
        Err(e) => bail!("Cobbler could not be measured: {e:#}"),
    };
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "  cobbler: create {N} systems {:.2} s; sync {:.2} s; edit all + sync {:.2} s (boot file edited: {}); get_systems() {:.2} s; one render {:.1} ms",
        f("create"), f("sync"), f("edit_sync"), p["boot_file_edited"], f("get_systems"), f("render") * 1000.0
    );
    let peer_value = f("create") + f("edit_sync");
    // The project's benchmark line, keys in the documented order.
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{{\"bench\":\"inventory\",\"ours\":{},\"peer\":\"cobbler\",\"peer_value\":{},\"unit\":\"s\",\"ratio\":{},\"better\":\"lower\"}}",
        r(ours),
        r(peer_value),
        r(ours / peer_value)
    );
    Ok(())
}
