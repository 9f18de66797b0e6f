//! `cargo xtask bench sync`: a child `appliance serve` syncs 10,000 new
//! inventory objects plus 1 GiB of new blobs (16 × 64 MiB; set
//! `APPLIANCE_BENCH_SYNC_MIB` for another total) to its parent over
//! loopback, against `git push` of the same history to a `git daemon` plus
//! `rsync` of the same blobs to an `rsync --daemon`, in the same run, on
//! tmpfs (`/dev/shm`) when there is one. Then a sync with nothing new,
//! which must be one round trip (median of 20, timed end to end through
//! the child's API).
//!
//! Headline (last line): seconds for our sync against seconds for
//! `git push` + `rsync`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::root;

const OBJECTS: usize = 10_000;
const BLOB_MIB: usize = 64;

pub(crate) struct Proc(pub(crate) std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn bin() -> PathBuf {
    root().join("target/release/appliance")
}

/// Starts `appliance serve`; returns it, its URL and its first token.
pub(crate) fn serve(data: &Path) -> Result<(Proc, String, String)> {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(["--sync-interval", "0", "--checkin-interval", "3600"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting appliance serve")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let p = Proc(child);
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
    Ok((p, format!("http://{addr}"), token))
}

fn call(agent: &ureq::Agent, method: &str, url: &str, token: &str, body: Value) -> Result<Value> {
    let auth = format!("Bearer {token}");
    let resp = if method == "GET" {
        agent.get(url).header("Authorization", &auth).call()
    } else {
        agent
            .post(url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.to_string())
    };
    let mut resp = resp.with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()?;
    if !status.is_success() {
        bail!("{method} {url}: HTTP {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn sha256_hex(data: &[u8]) -> String {
    hex_of(&builder::Digest::of(data).0)
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run() -> Result<()> {
    for tool in ["git", "rsync"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is needed (xtask/debian-packages.txt; apt-get install {tool})");
        }
    }
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "appliance",
    ]))?;
    let total_mib: usize = std::env::var("APPLIANCE_BENCH_SYNC_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm/appliance-bench-sync")
    } else {
        root().join("target/bench/sync")
    };
    let _ = std::fs::remove_dir_all(&base);
    let (pdata, cdata) = (base.join("parent"), base.join("child"));
    std::fs::create_dir_all(&pdata)?;
    std::fs::create_dir_all(&cdata)?;
    let res = bench(&base, &pdata, &cdata, total_mib);
    let _ = std::fs::remove_dir_all(&base);
    res
}

fn bench(base: &Path, pdata: &Path, cdata: &Path, total_mib: usize) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let (_p, purl, ptok) = serve(pdata)?;
    let reg = call(
        &agent,
        "POST",
        &format!("{purl}/api/v1/replicas"),
        &ptok,
        json!({"name": "bench-child"}),
    )?;
    let node_id = reg["node_id"].as_str().context("node id")?.to_owned();
    crate::run(
        Command::new(bin())
            .args(["replica", "join", "--data"])
            .arg(cdata)
            .args(["--parent", &purl, "--node-id", &node_id, "--token"])
            .arg(reg["token"].as_str().context("token")?)
            .stdout(Stdio::null()),
    )?;
    let (_c, curl, ctok) = serve(cdata)?;
    let sync_url = format!("{curl}/api/v1/sync/run");
    call(&agent, "POST", &sync_url, &ctok, Value::Null)?;

    // Peers start from the same state: a bare copy of the parent's
    // repository behind `git daemon`, an empty rsync module.
    let gitroot = base.join("git");
    std::fs::create_dir_all(&gitroot)?;
    crate::run(
        Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(pdata.join("inventory"))
            .arg(gitroot.join("peer.git")),
    )?;
    let gport = free_port()?;
    let _gd = Proc(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
            ])
            .arg(format!("--base-path={}", gitroot.display()))
            .args(["--listen=127.0.0.1", &format!("--port={gport}")])
            .arg(&gitroot)
            .stderr(Stdio::null())
            .spawn()
            .context("starting git daemon")?,
    );
    let rdst = base.join("rsync-dst");
    std::fs::create_dir_all(&rdst)?;
    let rconf = base.join("rsyncd.conf");
    std::fs::write(
        &rconf,
        format!(
            "uid = 0\ngid = 0\nuse chroot = false\npid file = {}\n[blobs]\npath = {}\nread only = false\n",
            base.join("rsyncd.pid").display(),
            rdst.display()
        ),
    )?;
    let rport = free_port()?;
    let _rd = Proc(
        Command::new("rsync")
            .args([
                "--daemon",
                "--no-detach",
                &format!("--port={rport}"),
                "--address=127.0.0.1",
            ])
            .arg(format!("--config={}", rconf.display()))
            .spawn()
            .context("starting rsync --daemon")?,
    );

    // The change on the child: 10,000 new objects in one commit, and blobs.
    let objects: Vec<Value> = (0..OBJECTS)
        .map(|i| json!({"kind": "repo", "object": {"name": format!("bench-{i:05}"), "mirror": format!("http://mirror.example/{i}"), "comment": "bench"}}))
        .collect();
    let t = Instant::now();
    call(
        &agent,
        "POST",
        &format!("{curl}/api/v1/batch"),
        &ctok,
        json!({"objects": objects}),
    )?;
    eprintln!(
        "created {OBJECTS} objects on the child in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let blobs = cdata.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let n_blobs = (total_mib / BLOB_MIB).max(1);
    let size = (total_mib.min(BLOB_MIB)) << 20;
    let mut buf = vec![0u8; size];
    for _ in 0..n_blobs {
        for c in buf.chunks_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            c.copy_from_slice(&rng.to_le_bytes()[..c.len()]);
        }
        let name = sha256_hex(&buf);
        std::fs::File::create(blobs.join(&name))?.write_all(&buf)?;
    }
    let blob_bytes = (n_blobs * size) as u64;
    eprintln!("wrote {n_blobs} blobs, {} MiB", blob_bytes >> 20);

    // Ours.
    let t = Instant::now();
    let r = call(&agent, "POST", &sync_url, &ctok, Value::Null)?;
    let ours = t.elapsed().as_secs_f64();
    let pstate = call(
        &agent,
        "GET",
        &format!("{purl}/api/v1/sync/status"),
        &ptok,
        Value::Null,
    )?;
    if pstate["state"] != r["state"] {
        bail!("parent and child differ after the sync: {pstate} vs {r}");
    }
    let our_bytes = r["pushed_bytes"].as_u64().unwrap_or(0)
        + r["pulled_bytes"].as_u64().unwrap_or(0)
        + r["blob_bytes_up"].as_u64().unwrap_or(0);
    eprintln!(
        "ours: {ours:.2} s, {} objects in a {} byte pack, {} blobs ({} bytes), {} round trips",
        r["pushed_objects"], r["pushed_bytes"], r["blobs_up"], r["blob_bytes_up"], r["round_trips"]
    );

    // Peer: git push of the same history + rsync of the same blobs.
    let peer_base = pstate_base(&gitroot.join("peer.git"))?;
    let t = Instant::now();
    let o = Command::new("git")
        .arg("-C")
        .arg(cdata.join("inventory"))
        .args([
            "push",
            "--quiet",
            &format!("git://127.0.0.1:{gport}/peer.git"),
            "main",
        ])
        .output()?;
    if !o.status.success() {
        bail!("git push failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let git_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let o = Command::new("rsync")
        .args(["-a", "--stats"])
        .arg(format!("{}/", blobs.display()))
        .arg(format!("rsync://127.0.0.1:{rport}/blobs/"))
        .output()?;
    if !o.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let rsync_s = t.elapsed().as_secs_f64();
    let stats = String::from_utf8_lossy(&o.stdout);
    let rsync_bytes: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.replace(',', "").trim().parse().unwrap_or(0))
        .unwrap_or(0);
    let pack_bytes = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C {} pack-objects --stdout --revs -q <<EOF | wc -c\nmain\n^{}\nEOF",
            cdata.join("inventory").display(),
            peer_base
        ))
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let peer = git_s + rsync_s;
    eprintln!(
        "peer: git push {git_s:.2} s (pack {pack_bytes} bytes) + rsync {rsync_s:.2} s ({rsync_bytes} bytes sent) = {peer:.2} s"
    );
    eprintln!("bytes: ours {our_bytes}, peer {}", pack_bytes + rsync_bytes);

    // A sync with nothing new.
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = call(&agent, "POST", &sync_url, &ctok, Value::Null)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if r["round_trips"] != 1 {
            bail!(
                "a sync with nothing new took {} round trips",
                r["round_trips"]
            );
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let quiet = times[times.len() / 2];
    eprintln!(
        "no-change sync: 1 round trip, median {quiet:.1} ms (max {:.1} ms){}",
        times[times.len() - 1],
        if quiet < 50.0 {
            ""
        } else {
            "  ** over the 50 ms goal **"
        }
    );
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    // The documented key order.
    println!(
        "{{\"bench\":\"sync\",\"ours\":{},\"peer\":\"git push + rsync\",\"peer_value\":{},\"unit\":\"s\",\"ratio\":{},\"better\":\"lower\"}}",
        r3(ours),
        r3(peer),
        r3(ours / peer)
    );
    Ok(())
}

/// The commit the peer repository held before the push (its `main`).
fn pstate_base(bare: &Path) -> Result<String> {
    let o = Command::new("git")
        .arg("--git-dir")
        .arg(bare)
        .args(["rev-parse", "main"])
        .output()?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}
