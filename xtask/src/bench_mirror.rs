//! `cargo xtask bench mirror`: an apt partial mirror of the same package
//! set (priority required and important, `openssh-server`, and their
//! dependency closure, bookworm `main`, amd64) from the same local source,
//! made by `appliance repo sync` and by `aptly mirror create -filter …
//! -filter-with-deps` + `aptly mirror update`, in the same run.
//!
//! The source is a loopback HTTP server (`python3 -m http.server`) over a
//! local copy of a subset of the Debian archive named in the host's apt
//! sources: the suite's signed `InRelease`/`Release`/`Release.gpg`, its
//! `main/binary-amd64/Packages.xz` and the pool files of the closure
//! (plus any package aptly's closure adds, see `SOURCE_EXTRA`). It is
//! built once, verified against Debian's key, under `cache/mirror-src/`,
//! so the network is not measured. Scratch data lives on tmpfs
//! (`/dev/shm`) when there is one.
//!
//! Reported: time, bytes stored (ours: the blob store; aptly: its root
//! directory, pool and database), and the time of a stock `apt-get
//! update` + `apt-get install --download-only openssh-server` against each
//! (ours served by `appliance serve` with Debian's signature; aptly's
//! published with `aptly publish snapshot -skip-signing` and served by
//! `aptly serve`, so that client uses `[trusted=yes]`). The line before
//! the last says bytes ours vs aptly; the last line is the JSON headline:
//! seconds of our sync against aptly's create + update.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::root;

/// The packages asked for besides priority required and important.
const PACKAGES: &[&str] = &["openssh-server"];
/// What the client installs from each mirror.
const CLIENT_INSTALL: &str = "openssh-server";
/// Packages aptly's closure takes that ours does not (it chooses other
/// alternatives or providers); the source carries them too so aptly's
/// update does not fail on a missing file. Not given to our sync.
const SOURCE_EXTRA: &[&str] = &[];
/// Debian's archive keyring.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

use crate::bench_sync::Proc;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn appliance() -> PathBuf {
    root().join("target/release/appliance")
}

fn out_ok(cmd: &mut Command) -> Result<Output> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o)
}

/// Bytes of the regular files under `dir`, each inode once.
fn du(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert(m.ino()) {
                total += m.len();
            }
        }
    }
    Ok(total)
}

/// The local source: built once from the host's Debian archive with our
/// own verified sync, then laid out as an archive tree of hard links.
fn source() -> Result<(PathBuf, String)> {
    let dir = root().join("cache/mirror-src");
    let tree = dir.join("archive");
    let (upstream, suite) = bundle::apt::debian_archive(&bundle::apt::host_sources()?)?;
    let done = dir.join(".complete");
    // Bumped when the closure rules change (the source must hold it).
    let want = format!("v2 {upstream} {suite} {PACKAGES:?} {SOURCE_EXTRA:?}\n");
    if std::fs::read_to_string(&done).ok().as_deref() == Some(want.as_str()) {
        return Ok((tree, suite));
    }
    eprintln!("mirror bench: building the local source from {upstream} {suite} (once)");
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let spec = appliance::repo::MirrorSpec {
        name: "bench-source".into(),
        upstream: upstream.trim_end_matches('/').to_string(),
        suites: vec![suite.clone()],
        components: vec!["main".into()],
        arches: vec!["amd64".into()],
        packages: PACKAGES
            .iter()
            .chain(SOURCE_EXTRA)
            .map(|s| s.to_string())
            .collect(),
        installer: false,
        recommends: false,
        keyring: std::fs::read(KEYRING).with_context(|| format!("reading {KEYRING}"))?,
    };
    let fetcher = appliance::repo::fetcher_for(&spec.upstream);
    let mut last = Instant::now();
    let report = appliance::repo::sync_mirror(&data, &spec, None, fetcher.as_ref(), &mut |p| {
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {} ({}/{} files, {} MiB)",
                p.phase,
                p.files_done,
                p.files_total,
                p.bytes_downloaded >> 20
            );
            last = Instant::now();
        }
    })?;
    let m = appliance::repo::Manifest::from_blob(&data, &report.snapshot)?;
    let _ = std::fs::remove_dir_all(&tree);
    for (path, f) in &m.files {
        // Only the xz index: the source is a subset (others answer 404).
        if path.contains("/by-hash/")
            || (path.contains("/binary-") && !path.ends_with("Packages.xz"))
            || path.contains("/i18n/")
        {
            continue;
        }
        let dest = tree.join(path);
        std::fs::create_dir_all(dest.parent().context("no parent")?)?;
        std::fs::hard_link(appliance::repo::blob_path(&data, &f.digest)?, &dest)
            .with_context(|| format!("linking {}", dest.display()))?;
    }
    std::fs::write(&done, want)?;
    Ok((tree, suite))
}

/// `python3 -m http.server` over `dir` on a loopback port.
fn http_server(dir: &Path) -> Result<(Proc, String)> {
    let port = free_port()?;
    let p = Proc(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?,
    );
    wait_port(port)?;
    Ok((p, format!("http://127.0.0.1:{port}")))
}

fn wait_port(port: u16) -> Result<()> {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Stock apt-get with its own state directory and only `source`:
/// `update`, then `install --download-only` of [`CLIENT_INSTALL`]. Returns
/// the seconds both took.
fn client(work: &Path, source: &str) -> Result<f64> {
    for d in [
        "etc/parts",
        "etc/trusted.d",
        "etc/prefs.d",
        "state/lists/partial",
        "cache/archives/partial",
    ] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::write(work.join("etc/sources.list"), source)?;
    std::fs::write(work.join("status"), "")?;
    // Only our configuration: the host's apt.conf.d (DEP-11, …) is read
    // before command-line options, so point the parts directory away
    // through APT_CONFIG, which apt reads first.
    std::fs::write(
        work.join("apt.conf"),
        format!(
            "Dir::Etc::Parts \"{}\";\nDir::Etc::Main \"/dev/null\";\n",
            work.join("etc/parts").display()
        ),
    )?;
    let w = |p: &str| format!("{}", work.join(p).display());
    let opts = [
        format!("Dir::Etc::SourceList={}", w("etc/sources.list")),
        format!("Dir::Etc::SourceParts={}", w("etc/parts")),
        format!("Dir::Etc::Parts={}", w("etc/parts")),
        format!("Dir::Etc::Trusted={}", w("etc/trusted.gpg")),
        format!("Dir::Etc::TrustedParts={}", w("etc/trusted.d")),
        format!("Dir::Etc::Preferences={}", w("etc/preferences")),
        format!("Dir::Etc::PreferencesParts={}", w("etc/prefs.d")),
        format!("Dir::State={}", w("state")),
        format!("Dir::State::status={}", w("status")),
        format!("Dir::Cache={}", w("cache")),
        "Debug::NoLocking=1".into(),
        "APT::Sandbox::User=root".into(),
        "APT::Architecture=amd64".into(),
        "APT::Architectures::=amd64".into(),
        "Acquire::http::Proxy=DIRECT".into(),
        "Acquire::Languages=none".into(),
        "Acquire::Retries=0".into(),
        "APT::Install-Recommends=false".into(),
    ];
    let apt = |args: &[&str]| -> Result<()> {
        let mut c = Command::new("apt-get");
        for o in &opts {
            c.arg("-o").arg(o);
        }
        c.args(args)
            .env("APT_CONFIG", work.join("apt.conf"))
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .stdin(Stdio::null());
        let o = out_ok(&mut c)?;
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        if text.contains("E:") {
            bail!("apt-get {args:?}: {text}");
        }
        Ok(())
    };
    let t0 = Instant::now();
    apt(&["update"])?;
    apt(&["install", "--download-only", "-y", CLIENT_INSTALL])?;
    Ok(t0.elapsed().as_secs_f64())
}

/// [`client`]'s seconds, or why it failed (a mirror whose closure lacks
/// what apt picks on an empty system fails here; said, not fatal).
fn client_or_reason(work: &Path, source: &str) -> String {
    match client(work, source) {
        Ok(s) => format!("{s:.2} s"),
        Err(e) => {
            let msg = format!("{e:#}");
            let last = msg
                .lines()
                .filter(|l| l.starts_with("E:"))
                .collect::<Vec<_>>()
                .join(" ");
            format!("FAILED ({last})")
        }
    }
}

pub fn run() -> Result<()> {
    for tool in ["aptly", "python3", "apt-get", "gpgv"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is needed (xtask/debian-packages.txt; cargo xtask deps)");
        }
    }
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "appliance",
    ]))?;
    let (tree, suite) = source()?;
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm/appliance-bench-mirror")
    } else {
        root().join("target/bench/mirror")
    };
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let res = bench(&base, &tree, &suite);
    let _ = std::fs::remove_dir_all(&base);
    res
}

fn bench(base: &Path, tree: &Path, suite: &str) -> Result<()> {
    let (_src, src_url) = http_server(tree)?;

    // Ours: a real `appliance serve`, driven by its CLI.
    let data = base.join("ours");
    std::fs::create_dir_all(&data)?;
    let (_server, url, token) = crate::bench_sync::serve(&data)?;
    let cli = |args: &[&str]| -> Result<Output> {
        out_ok(
            Command::new(appliance())
                .args(args)
                .env("APPLIANCE_URL", &url)
                .env("APPLIANCE_TOKEN", &token)
                .env("HOME", "/nonexistent")
                .stdin(Stdio::null()),
        )
    };
    let packages = serde_json::to_string(PACKAGES)?;
    cli(&[
        "repo",
        "add",
        "bench",
        "--breed",
        "apt",
        "--mirror",
        &src_url,
        "--set",
        &format!("suites=[\"{suite}\"]"),
        "--set",
        "components=[\"main\"]",
        "--set",
        "arches=[\"amd64\"]",
        "--set",
        &format!("packages={packages}"),
    ])?;
    let t0 = Instant::now();
    let o = cli(&["repo", "sync", "bench"])?;
    let ours_s = t0.elapsed().as_secs_f64();
    eprint!("{}", String::from_utf8_lossy(&o.stdout));
    let ours_bytes = du(&data.join("blobs"))?;
    let ours_client = client_or_reason(
        &base.join("client-ours"),
        &format!("deb [arch=amd64 signed-by={KEYRING}] {url}/repos/bench {suite} main\n"),
    );

    // aptly, same source, same filter.
    let aroot = base.join("aptly");
    std::fs::create_dir_all(&aroot)?;
    let conf = base.join("aptly.conf");
    std::fs::write(
        &conf,
        serde_json::json!({
            "rootDir": aroot,
            "architectures": ["amd64"],
            "gpgProvider": "gpg",
            "downloadSourcePackages": false,
        })
        .to_string(),
    )?;
    let aptly = |args: &[&str]| -> Result<Output> {
        out_ok(
            Command::new("aptly")
                .arg(format!("-config={}", conf.display()))
                .args(args)
                .env("HOME", base)
                .env_remove("http_proxy")
                .env_remove("HTTP_PROXY")
                .stdin(Stdio::null()),
        )
    };
    let mut filter = "Priority (required) | Priority (important)".to_string();
    for p in PACKAGES {
        filter.push_str(&format!(" | {p}"));
    }
    let t0 = Instant::now();
    aptly(&[
        "mirror",
        "create",
        "-architectures=amd64",
        &format!("-keyring={KEYRING}"),
        &format!("-filter={filter}"),
        "-filter-with-deps",
        "bench",
        &src_url,
        suite,
        "main",
    ])?;
    aptly(&["mirror", "update", &format!("-keyring={KEYRING}"), "bench"])?;
    let aptly_s = t0.elapsed().as_secs_f64();
    let aptly_bytes = du(&aroot)?;
    let t1 = Instant::now();
    aptly(&["snapshot", "create", "bench", "from", "mirror", "bench"])?;
    aptly(&[
        "publish",
        "snapshot",
        "-skip-signing",
        &format!("-distribution={suite}"),
        "bench",
    ])?;
    let publish_s = t1.elapsed().as_secs_f64();
    // What aptly keeps to serve clients: pool, database and the published
    // tree (hard links counted once).
    let aptly_served_bytes = du(&aroot)?;
    let port = free_port()?;
    let _aptly_serve = Proc(
        Command::new("aptly")
            .arg(format!("-config={}", conf.display()))
            .args(["serve", &format!("-listen=127.0.0.1:{port}")])
            .env("HOME", base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting aptly serve")?,
    );
    wait_port(port)?;
    let aptly_client = client_or_reason(
        &base.join("client-aptly"),
        &format!("deb [arch=amd64 trusted=yes] http://127.0.0.1:{port}/ {suite} main\n"),
    );

    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "ours:  sync {ours_s:.2} s, {:.1} MiB stored; client update+install {ours_client}",
        mib(ours_bytes)
    );
    println!(
        "aptly: mirror create+update {aptly_s:.2} s, {:.1} MiB stored ({:.1} MiB once published); snapshot+publish {publish_s:.2} s; client update+install {aptly_client}",
        mib(aptly_bytes),
        mib(aptly_served_bytes)
    );
    println!(
        "bytes stored: ours {ours_bytes} aptly {aptly_bytes} (ratio {:.3})",
        ours_bytes as f64 / aptly_bytes as f64
    );
    crate::bench::report(
        "mirror",
        ours_s,
        "aptly mirror create+update",
        aptly_s,
        "s",
        "lower",
    );
    Ok(())
}
