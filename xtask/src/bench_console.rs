//! `cargo xtask bench console`: the web console's machines page with 10,000
//! systems (and 50 discovered agents) in headless Chromium, cold cache,
//! against the floor a user could otherwise have: the same JSON from the
//! same server with `curl | jq`. Time to interactive is the moment the page
//! has drawn its first page of rows and wired search and paging
//! (`main[data-ready]`, `window.consoleReady`, relative to navigation
//! start); first render is Chromium's first contentful paint; bytes are
//! every response's transfer size (page, assets and the API calls).
//! The floor runs `curl -s -H 'Authorization: …' URL/api/v1/systems?limit=10000
//! | jq '.items | length'` and the same for `…/api/v1/agents`, as one shell
//! pipeline each (one page holds them all).
//! Median of 5 runs each. Also reported: the assets' compressed size and
//! the server's memory growth with 50 consoles following events live.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use integration_tests::webdriver::Driver;
use serde_json::{json, Value};

use crate::root;

const SYSTEMS: usize = 10_000;
/// Below the 60 check-ins a minute one address may make.
const AGENTS: usize = 50;
const RUNS: usize = 5;

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mac(i: usize) -> String {
    format!(
        "52:54:01:{:02x}:{:02x}:{:02x}",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn send(agent: &ureq::Agent, url: &str, auth: &str, body: Value) -> Result<()> {
    let mut r = agent
        .post(url)
        .header("Authorization", auth)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?;
    if !r.status().is_success() {
        bail!(
            "POST {url}: {} {}",
            r.status(),
            r.body_mut().read_to_string()?
        );
    }
    Ok(())
}

pub fn run() -> Result<()> {
    eprintln!("console bench: machines page, {SYSTEMS} systems + {AGENTS} agents, headless Chromium vs curl | jq");
    crate::ensure_deps()?;
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "appliance",
    ]))?;
    let work = root().join("target/bench/console");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("data"))?;
    let mut child = Command::new(root().join("target/release/appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(work.join("data"))
        .env("RUST_LOG", "warn")
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
    let base = format!("http://{addr}");
    let auth = format!("Bearer {token}");
    let http = ureq::Agent::new_with_defaults();

    send(
        &http,
        &format!("{base}/api/v1/distros"),
        &auth,
        json!({"name": "d",
        "kernel": "http://127.0.0.1:9/linux", "initrd": "http://127.0.0.1:9/initrd", "breed": "debian", "arch": "x86_64"}),
    )?;
    send(
        &http,
        &format!("{base}/api/v1/profiles"),
        &auth,
        json!({"name": "p", "distro": "d"}),
    )?;
    for b in 0..SYSTEMS / 1000 {
        let objects: Vec<Value> = (0..1000)
            .map(|j| {
                let i = b * 1000 + j;
                json!({"kind": "system", "object": {"name": format!("s{i:05}"), "profile": "p", "hostname": format!("host-{i}"),
                    "interfaces": [{"name": "eth0", "mac": mac(i), "ip": format!("10.1.{}.{}", i >> 8, i & 0xff)}]}})
            })
            .collect();
        send(
            &http,
            &format!("{base}/api/v1/batch"),
            &auth,
            json!({"objects": objects}),
        )?;
    }
    for i in 0..AGENTS {
        let m = mac(100_000 + i);
        send(
            &http,
            &format!("{base}/api/v1/agents"),
            "",
            json!({"mac": m, "hardware": {
            "firmware": "uefi", "cpus": 2, "cpu_model": "bench", "memory_bytes": 1u64 << 32,
            "nics": [{"name": "ens3", "mac": m, "driver": null, "speed_mbps": null}], "disks": [],
            "vendor": null, "product": null, "serial": null}}),
        )?;
    }

    // The floor: the same two lists through curl | jq.
    let sh = |script: String| -> Result<String> {
        let o = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("AUTH", &auth)
            .output()
            .with_context(|| format!("running {script}"))?;
        if !o.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let mut floor_bytes = 0usize;
    for path in ["/api/v1/systems?limit=10000", "/api/v1/agents?limit=10000"] {
        floor_bytes += sh(format!(
            "curl -sf -H \"Authorization: $AUTH\" -o /dev/null -w '%{{size_download}}' '{base}{path}'"
        ))?
        .parse::<usize>()
        .context("curl's size_download")?;
    }
    let mut floor = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let systems = sh(format!(
            "curl -sf -H \"Authorization: $AUTH\" '{base}/api/v1/systems?limit=10000' | jq '.items | length'"
        ))?;
        let agents = sh(format!(
            "curl -sf -H \"Authorization: $AUTH\" '{base}/api/v1/agents?limit=10000' | jq '.items | length'"
        ))?;
        floor.push(t.elapsed().as_secs_f64() * 1000.0);
        if systems != SYSTEMS.to_string() || agents != AGENTS.to_string() {
            bail!("curl | jq counted {systems} systems and {agents} agents");
        }
    }
    let floor_ms = median(floor);

    // Ours: a cold browser profile per run, logged in (token in the tab's
    // sessionStorage, as the login form leaves it), opening #/machines.
    let driver = Driver::start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut tti, mut fcp, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let profile = work.join(format!("profile-{run}"));
        let s = driver
            .session(&profile, 1280, 900)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Same origin first (about:blank has no sessionStorage of ours),
        // then the measured navigation.
        s.goto(&format!("{base}/api/v1/version"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.eval(
            "sessionStorage.setItem('appliance.token', arguments[0]);",
            vec![json!(token)],
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.goto(&format!("{base}/#/machines"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.wait(
            "main[data-page='machines'][data-ready]",
            std::time::Duration::from_secs(60),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let count = s
            .find("#count")
            .and_then(|e| s.text(&e))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !count.contains(&format!("({SYSTEMS} systems, {AGENTS} discovered)")) {
            bail!("the machines page shows {count:?}");
        }
        let m = s
            .eval(
                "const nav = performance.getEntriesByType('navigation')[0];
                 const res = performance.getEntriesByType('resource');
                 const paint = performance.getEntriesByName('first-contentful-paint')[0];
                 return {tti: window.consoleReady, fcp: paint ? paint.startTime : null,
                         bytes: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
                         assets: nav.transferSize + res.filter(r => r.name.includes('/console/')).reduce((a, r) => a + r.transferSize, 0)};",
                vec![],
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!("  run {run}: {m}");
        tti.push(m["tti"].as_f64().context("no consoleReady")?);
        fcp.push(m["fcp"].as_f64().unwrap_or(f64::NAN));
        sizes.push((
            m["bytes"].as_f64().unwrap_or(0.0),
            m["assets"].as_f64().unwrap_or(0.0),
        ));
    }
    // 50 consoles following the events live: the server's memory growth.
    let rss = |pid: u32| -> Result<u64> {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .context("no VmRSS")
    };
    let pid = server.0.id();
    let before = rss(pid)?;
    let mut followers = Vec::new();
    for _ in 0..50 {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr)?;
        write!(c, "GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nAuthorization: {auth}\r\n\r\n")?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut head = [0u8; 12];
        c.read_exact(&mut head)?;
        if &head != b"HTTP/1.1 200" {
            bail!("an event follower got {:?}", String::from_utf8_lossy(&head));
        }
        followers.push(c);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = rss(pid)?;
    drop(followers);
    drop(server);
    eprintln!(
        "  server memory: {:.1} MiB before, {:.1} MiB with 50 consoles following events (+{:.2} MiB)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after as f64 - before as f64) / 1048576.0
    );
    let ours = median(tti);
    let (bytes, assets) = sizes[sizes.len() / 2];
    let assets_gz = appliance::webui::Console::get().transfer_size();
    eprintln!("  ours: first render {:.0} ms, interactive {ours:.0} ms (median of {RUNS}), {:.0} KiB transferred ({:.1} KiB of console assets; {:.1} KiB compressed in the binary)",
        median(fcp), bytes / 1024.0, assets / 1024.0, assets_gz as f64 / 1024.0);
    eprintln!("  floor: curl | jq of /api/v1/systems + /api/v1/agents {floor_ms:.0} ms (median of {RUNS}), {:.0} KiB", floor_bytes as f64 / 1024.0);
    crate::bench::report("console", ours, "curl|jq", floor_ms, "ms", "lower");
    Ok(())
}
