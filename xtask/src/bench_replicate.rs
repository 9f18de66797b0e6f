//! `cargo xtask bench replicate`: getting the appliance image onto a
//! child's disk.
//!
//! 1. Rebuild time against the original build: `cargo xtask image` again
//!    (offline, every input cached) against `appliance rebuild` from the
//!    image's own data partition (what a parent does before serving).
//! 2. Ours against the peer, over the same loopback link from the same
//!    `appliance serve` (its `/api/v1/release/image`): our verified writer
//!    (`appliance flash --from <url>`: block map, only the data ranges,
//!    per-chunk sha256, read-back, first MiB last, fsync) against what an
//!    operator would type — `curl` of the whole raw image piped into
//!    `dd` onto the disk (`bs=4M conv=fsync`). Targets are fresh files the
//!    size of the image. Bytes sent against the image's data bytes.
//! 3. Unless `--no-fleet`: a two-machine replication in QEMU
//!    ([`integration_tests::fleet`]) for the per-generation split (PXE boot,
//!    stream, write, reboot).
//!
//! The last line: `ours` and `peer_value` are seconds to get the image onto
//! one child's disk (median of three), `"better":"lower"`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{image, ImageOptions};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(rest: &[&str]) -> Result<()> {
    let fleet = !rest.contains(&"--no-fleet");
    let out = image(&ImageOptions::from_args(&[])?)?;
    // 1. Rebuild against the original build.
    let t = Instant::now();
    image(&ImageOptions::from_args(&[])?)?;
    let original = t.elapsed().as_secs_f64();
    let work = tempfile::tempdir().context("creating a work directory")?;
    let data = work.path().join("data");
    integration_tests::extract_data_partition(&out, work.path(), &data);
    let bin = crate::root().join("target/static/appliance");
    let t = Instant::now();
    let o = Command::new(&bin)
        .args(["rebuild", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(data.join("cache/release"))
        .output()
        .context("running appliance rebuild")?;
    if !o.status.success() {
        bail!(
            "appliance rebuild failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let rebuild = t.elapsed().as_secs_f64();
    let img_digest = std::fs::read_to_string(out.join("appliance.img.sha256"))?;
    let rebuilt = std::fs::read_to_string(data.join("cache/release/appliance.img.sha256"))?;
    if img_digest.split_whitespace().next() != rebuilt.split_whitespace().next() {
        bail!("the rebuilt image differs: {rebuilt} vs {img_digest}");
    }

    // 2. Serve it and fetch it both ways.
    let mut serve = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting appliance serve")?;
    let res = (|| -> Result<(f64, f64, u64, u64, u64)> {
        let mut lines = BufReader::new(serve.stdout.take().context("serve stdout")?).lines();
        let addr = lines
            .next()
            .context("serve printed nothing")??
            .strip_prefix("listening on ")
            .context("no listening line")?
            .to_owned();
        let token = lines
            .next()
            .context("serve printed no token")??
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned();
        let base = format!("http://{addr}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(&format!("{base}/api/v1/release/prepare"))
            .header("authorization", &format!("Bearer {token}"))
            .send("{}")?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let data_bytes = loop {
            let v: serde_json::Value = agent
                .get(&format!("{base}/api/v1/release/prepare"))
                .call()?
                .body_mut()
                .read_json()?;
            match v["state"].as_str() {
                Some("ready") => break v["data_bytes"].as_u64().unwrap_or(0),
                Some("failed") => bail!("preparing the served image failed: {v}"),
                _ if Instant::now() > deadline => bail!("the served image was not ready: {v}"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let size = std::fs::metadata(data.join("cache/release/appliance.img"))?.len();
        let url = format!("{base}/api/v1/release/image");
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        let mut ours_bytes = 0;
        for i in 0..RUNS {
            let target = work.path().join(format!("ours{i}.img"));
            std::fs::File::create(&target)?.set_len(size)?;
            let t = Instant::now();
            let o = Command::new(&bin)
                .args(["flash", "--yes", "--json", "--from"])
                .arg(&base)
                .arg(&target)
                .output()
                .context("running appliance flash --from")?;
            if !o.status.success() {
                bail!(
                    "appliance flash --from failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            ours.push(t.elapsed().as_secs_f64());
            let rep: serde_json::Value = serde_json::from_slice(&o.stdout)
                .with_context(|| format!("flash report: {}", String::from_utf8_lossy(&o.stdout)))?;
            ours_bytes = rep["bytes_fetched"].as_u64().unwrap_or(0);
            check_same(&target, &img_digest)?;
            std::fs::remove_file(&target)?;

            let target = work.path().join(format!("peer{i}.img"));
            std::fs::File::create(&target)?.set_len(size)?;
            let t = Instant::now();
            let st = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "set -o pipefail; curl -sSf '{url}' | dd of='{}' bs=4M iflag=fullblock conv=fsync,notrunc status=none",
                    target.display()
                ))
                .status()
                .context("running curl | dd")?;
            if !st.success() {
                bail!("curl | dd failed with {st}");
            }
            peer.push(t.elapsed().as_secs_f64());
            check_same(&target, &img_digest)?;
            std::fs::remove_file(&target)?;
        }
        Ok((median(ours), median(peer), ours_bytes, size, data_bytes))
    })();
    let _ = serve.kill();
    let _ = serve.wait();
    let (ours, peer, ours_bytes, size, data_bytes) = res?;

    eprintln!("\nreplicate: getting the image onto one child's disk (median of {RUNS}, loopback)");
    eprintln!("  image {size} bytes, {data_bytes} bytes of data");
    eprintln!(
        "  ours  (block map, verified, first MiB last)  {ours:>8.2} s  {ours_bytes} bytes sent ({:.3}x the data)",
        ours_bytes as f64 / data_bytes.max(1) as f64
    );
    eprintln!(
        "  peer  (curl | dd of the raw image)           {peer:>8.2} s  {size} bytes sent ({:.3}x the data)",
        size as f64 / data_bytes.max(1) as f64
    );
    eprintln!("  rebuild from the bundle {rebuild:.2} s against the original build {original:.2} s ({:.2}x)", rebuild / original);

    if fleet {
        let fw = tempfile::tempdir()?;
        let r = integration_tests::fleet::run(
            &out.join("appliance.img"),
            2,
            fw.path(),
            Default::default(),
            &mut |l| eprintln!("fleet: {l}"),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        eprintln!("\nper generation in QEMU (TCG unless APPLIANCE_QEMU_ACCEL says otherwise):");
        eprint!("{}", integration_tests::fleet::table(&r));
        if !r.ok {
            bail!("the fleet did not converge: {:?}", r.problems);
        }
    }
    crate::bench::report("replicate", ours, "curl|dd", peer, "s", "lower");
    Ok(())
}

/// The first `image_size` bytes of `target` hash to the image's digest.
fn check_same(target: &Path, sha256sum_line: &str) -> Result<()> {
    let want = sha256sum_line.split_whitespace().next().unwrap_or_default();
    let o = Command::new("sha256sum").arg(target).output()?;
    let got = String::from_utf8_lossy(&o.stdout);
    if got.split_whitespace().next() != Some(want) {
        bail!("{} is not the image: {got} vs {want}", target.display());
    }
    Ok(())
}
