//! `cargo xtask bench mirror`: an apt partial mirror of the same package
//! set (bookworm `main`, amd64) from the same local source, made by
//! `appliance repo sync` and by `aptly mirror create -filter …
//! -filter-with-deps` + `aptly mirror update`, in the same run.
//!
//! The package set: priority required and important, `openssh-server`,
//! what the appliance's installer puts on every target
//! (`osinstall::MIRROR_BASE`), and their dependency closure, made closed
//! under *both* tools' rules for alternatives: ours (the mirror's rule,
//! `closure::resolve_for_mirror`) takes the first alternative that can be
//! met unless something chosen already meets the group, and also every
//! group's first alternative that can be met (stock apt's pick on an
//! empty root); aptly takes every alternative of a group nothing in its list
//! meets yet (`PackageList.FilterWithProgress`, aptly 1.5), and a virtual
//! package's provider in Go map order. So the set is grown until our
//! closure and [`aptly_closure`] of it are the set itself; both tools are
//! then given that set's names as roots (aptly as `Name (= x)` queries: a
//! bare name is a dependency query that every provider meets, which is
//! what broke this bench before, `usr-is-merged` pulling in `usrmerge`
//! and perl) and must mirror exactly it (checked after each run: the
//! package lists are compared and the bench fails when they differ).
//!
//! The source is a loopback HTTP server (`python3 -m http.server`) over a
//! local copy of a subset of the Debian archive named in the host's apt
//! sources: the suite's signed `InRelease`/`Release`/`Release.gpg`, its
//! `main/binary-amd64/Packages.xz` and the pool files of the set. It is
//! built once, verified against Debian's key, under `cache/mirror-src/`
//! (the set's names in `cache/mirror-src/packages.txt`), so the network
//! is not measured. Scratch data lives on tmpfs (`/dev/shm`) when there
//! is one.
//!
//! Each tool mirrors [`RUNS`] times from empty (`BENCH_MIRROR_RUNS`
//! overrides); reported per run and as min/median/max: time, bytes stored
//! (ours: the blob store, and of it the Release files, indexes and
//! manifest; aptly: its root directory, pool and database, and again once
//! published), and the time of a stock `apt-get update` + `apt-get install
//! --download-only openssh-server` (an empty dpkg status: the .debs of the
//! whole closure are downloaded) against each (ours served by `appliance
//! serve` with Debian's signature; aptly's published with `aptly publish
//! snapshot -skip-signing` and served by `aptly serve`, so that client
//! uses `[trusted=yes]`); a client failure fails the bench. The last line is the JSON headline: the median
//! seconds of our sync against the median of aptly's create + update.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::root;

/// The packages asked for besides priority required and important.
const PACKAGES: &[&str] = &["openssh-server"];
/// What the client installs from each mirror.
const CLIENT_INSTALL: &str = "openssh-server";
/// Runs of each tool (median reported) unless `BENCH_MIRROR_RUNS` says.
const RUNS: usize = 3;
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

/// The packages aptly 1.5's `-filter-with-deps` takes from `index` for
/// `roots` (names; each root's newest version), following
/// `PackageList.FilterWithProgress`: in rounds, every `Pre-Depends` and
/// `Depends` group of a taken package that nothing taken satisfies lists
/// *all* its alternatives as missing; each missing one that is still not
/// satisfied takes the newest version of that name meeting its
/// constraint, else (unversioned) a provider. aptly takes the first
/// provider in a Go map's order, which varies from run to run, so here
/// every provider is taken: the result holds whatever aptly may pick.
fn aptly_closure(
    index: &[bundle::debian::Package],
    roots: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<(String, String)> {
    use appliance::repo::closure::satisfies;
    use bundle::debian::{compare_versions, Dep, Package};
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    let mut by_name: HashMap<&str, Vec<&Package>> = HashMap::new();
    let mut providers: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
    for p in index {
        by_name.entry(&p.name).or_default().push(p);
        for v in &p.provides {
            providers.entry(v).or_default().push(p);
        }
    }
    for v in by_name.values_mut() {
        v.sort_by(|a, b| compare_versions(&b.version, &a.version));
    }
    let mut taken: BTreeMap<(String, String), &Package> = BTreeMap::new();
    for r in roots {
        if let Some(p) = by_name.get(r.as_str()).and_then(|v| v.first()) {
            taken.insert((p.name.clone(), p.version.clone()), p);
        }
    }
    let met = |d: &Dep, taken: &BTreeMap<(String, String), &Package>| {
        taken.values().any(|p| {
            (p.name == d.name && satisfies(&p.version, d.constraint.as_deref()))
                || (d.constraint.is_none() && p.provides.contains(&d.name))
        })
    };
    loop {
        let mut missing: Vec<&Dep> = Vec::new();
        for p in taken.values() {
            for group in p.pre_depends.iter().chain(&p.depends) {
                if !group.iter().any(|d| met(d, &taken)) {
                    missing.extend(group.iter());
                }
            }
        }
        let mut added = 0;
        for d in missing {
            if met(d, &taken) {
                continue;
            }
            let named = by_name
                .get(d.name.as_str())
                .and_then(|v| {
                    v.iter()
                        .find(|p| satisfies(&p.version, d.constraint.as_deref()))
                })
                .copied();
            let picks: Vec<&Package> = match named {
                Some(p) => vec![p],
                None if d.constraint.is_none() => {
                    providers.get(d.name.as_str()).cloned().unwrap_or_default()
                }
                None => vec![],
            };
            for p in picks {
                if taken
                    .insert((p.name.clone(), p.version.clone()), p)
                    .is_none()
                {
                    added += 1;
                }
            }
        }
        if added == 0 {
            return taken.into_keys().collect::<BTreeSet<_>>();
        }
    }
}

/// The bench's package set (names) over `index`: the roots, grown until
/// our closure and [`aptly_closure`] of it add nothing.
fn package_set(index: &[bundle::debian::Package]) -> Result<std::collections::BTreeSet<String>> {
    let mut names: std::collections::BTreeSet<String> = index
        .iter()
        .filter(|p| matches!(p.priority.as_deref(), Some("required" | "important")))
        .map(|p| p.name.clone())
        .collect();
    names.extend(PACKAGES.iter().map(|s| s.to_string()));
    for b in appliance::osinstall::MIRROR_BASE {
        if index.iter().any(|p| p.name == *b) {
            names.insert(b.to_string());
        }
    }
    loop {
        let roots: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.clone(), "bench".to_string()))
            .collect();
        let ours = appliance::repo::closure::resolve_for_mirror(index, None, &roots)?;
        let peer = aptly_closure(index, &names);
        let before = names.len();
        names.extend(ours.into_iter().chain(peer).map(|(n, _)| n));
        if names.len() == before {
            return Ok(names);
        }
    }
}

/// The local source: built once from the host's Debian archive with our
/// own verified sync, then laid out as an archive tree of hard links.
/// Returns the tree, the suite and the package set's names.
fn source() -> Result<(PathBuf, String, Vec<String>)> {
    let dir = root().join("cache/mirror-src");
    let tree = dir.join("archive");
    let list = dir.join("packages.txt");
    let (upstream, suite) = bundle::apt::debian_archive(&bundle::apt::host_sources()?)?;
    let done = dir.join(".complete");
    // Bumped when the rules for the set change (the source must hold it).
    let want = format!("v4 {upstream} {suite} {PACKAGES:?}\n");
    if std::fs::read_to_string(&done).ok().as_deref() == Some(want.as_str()) {
        let names = std::fs::read_to_string(&list)
            .with_context(|| format!("reading {}", list.display()))?;
        return Ok((tree, suite, names.lines().map(str::to_owned).collect()));
    }
    eprintln!("mirror bench: building the local source from {upstream} {suite} (once)");
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let keyring = std::fs::read(KEYRING).with_context(|| format!("reading {KEYRING}"))?;
    let sync = |packages: Vec<String>| -> Result<appliance::repo::Manifest> {
        let spec = appliance::repo::MirrorSpec {
            name: "bench-source".into(),
            upstream: upstream.trim_end_matches('/').to_string(),
            suites: vec![suite.clone()],
            components: vec!["main".into()],
            arches: vec!["amd64".into()],
            packages,
            installer: false,
            recommends: false,
            downloads: 0,
            keyring: keyring.clone(),
        };
        let fetcher = appliance::repo::fetcher_for(&spec.upstream);
        let mut last = Instant::now();
        let report =
            appliance::repo::sync_mirror(&data, &spec, None, fetcher.as_ref(), &mut |p| {
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
        appliance::repo::Manifest::from_blob(&data, &report.snapshot)
    };
    // The index (verified by the first sync), then the set, then its
    // pool files.
    let m = sync(PACKAGES.iter().map(|s| s.to_string()).collect())?;
    let xz = format!("dists/{suite}/main/binary-amd64/Packages.xz");
    let f = m
        .files
        .get(&xz)
        .with_context(|| format!("no {xz} mirrored"))?;
    let text = appliance::repo::decompress(
        &xz,
        &std::fs::read(appliance::repo::blob_path(&data, &f.digest)?)?,
    )?;
    let index = bundle::debian::parse_packages(&text, &xz)?;
    let names: Vec<String> = package_set(&index)?.into_iter().collect();
    let m = sync(names.clone())?;
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
    std::fs::write(&list, names.join("\n") + "\n")?;
    std::fs::write(&done, want)?;
    Ok((tree, suite, names))
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

/// [`client`]'s seconds; a failure (a mirror whose closure lacks what
/// apt picks on an empty system fails here) fails the bench naming the
/// mirror and apt's errors.
fn client_timed(work: &Path, source: &str, which: &str) -> Result<f64> {
    client(work, source).map_err(|e| {
        let msg = format!("{e:#}");
        let errors = msg
            .lines()
            .filter(|l| l.starts_with("E:"))
            .collect::<Vec<_>>()
            .join(" ");
        anyhow::anyhow!("stock apt-get against {which} failed: {errors}")
    })
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
    let (tree, suite, names) = source()?;
    let runs = match std::env::var("BENCH_MIRROR_RUNS") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("BENCH_MIRROR_RUNS={v:?}: want a count"))?,
        Err(_) => RUNS,
    };
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm/appliance-bench-mirror")
    } else {
        root().join("target/bench/mirror")
    };
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let res = bench(&base, &tree, &suite, &names, runs);
    let _ = std::fs::remove_dir_all(&base);
    res
}

/// One run of each tool from empty.
struct Run {
    ours_s: f64,
    ours_bytes: u64,
    /// Of `ours_bytes`: the signed Release files and indexes (`dists/`),
    /// and the mirror's manifest.
    ours_index_bytes: u64,
    aptly_s: f64,
    aptly_bytes: u64,
    /// aptly's root once published (pool, database, public tree).
    aptly_published_bytes: u64,
    /// Stock `apt-get update` + `install --download-only` against each.
    ours_client_s: f64,
    aptly_client_s: f64,
}

/// Min, median and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

fn bench(base: &Path, tree: &Path, suite: &str, names: &[String], runs: usize) -> Result<()> {
    let (_src, src_url) = http_server(tree)?;
    println!(
        "package set: {} names (priority required + important + {PACKAGES:?} + the installer's \
         base, closed under our closure and aptly's -filter-with-deps; listed in \
         cache/mirror-src/packages.txt), {suite} main amd64; {runs} runs of each tool",
        names.len()
    );
    let mut all = Vec::new();
    for i in 0..runs {
        let dir = base.join(format!("run{i}"));
        std::fs::create_dir_all(&dir)?;
        let r = one_run(&dir, &src_url, suite, names, i == 0)?;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "run {}/{runs}: ours sync {:.2} s, {:.1} MiB stored ({:.1} MiB Release files, \
             indexes and manifest); aptly create+update {:.2} s, {:.1} MiB stored ({:.1} MiB \
             once published); stock apt-get update+install --download-only {CLIENT_INSTALL}: \
             ours {:.2} s, aptly {:.2} s",
            i + 1,
            r.ours_s,
            mib(r.ours_bytes),
            mib(r.ours_index_bytes),
            r.aptly_s,
            mib(r.aptly_bytes),
            mib(r.aptly_published_bytes),
            r.ours_client_s,
            r.aptly_client_s,
        );
        std::fs::remove_dir_all(&dir)?;
        all.push(r);
    }
    let (omin, omed, omax) = spread(all.iter().map(|r| r.ours_s).collect());
    let (amin, amed, amax) = spread(all.iter().map(|r| r.aptly_s).collect());
    println!("ours  sync (s):               min {omin:.2} median {omed:.2} max {omax:.2}");
    println!("aptly create+update (s):      min {amin:.2} median {amed:.2} max {amax:.2}");
    let (cmin, cmed, cmax) = spread(all.iter().map(|r| r.ours_client_s).collect());
    println!("client against ours (s):      min {cmin:.2} median {cmed:.2} max {cmax:.2}");
    let (cmin, cmed, cmax) = spread(all.iter().map(|r| r.aptly_client_s).collect());
    println!("client against aptly (s):     min {cmin:.2} median {cmed:.2} max {cmax:.2}");
    let (ob, ab, ap) = (
        all[0].ours_bytes,
        all[0].aptly_bytes,
        all[0].aptly_published_bytes,
    );
    println!(
        "bytes stored: ours {ob} aptly {ab} (ratio {:.3}); aptly once published {ap} (ratio {:.3})",
        ob as f64 / ab as f64,
        ob as f64 / ap as f64
    );
    crate::bench::report(
        "mirror",
        omed,
        "aptly mirror create+update",
        amed,
        "s",
        "lower",
    );
    Ok(())
}

/// Both tools mirror `names` from `src_url` into `base`; the package
/// lists they end up with must be equal. Then publishes aptly's mirror
/// and times a stock apt-get against each (`first`: says the check
/// passed).
fn one_run(base: &Path, src_url: &str, suite: &str, names: &[String], first: bool) -> Result<Run> {
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
    let packages = serde_json::to_string(names)?;
    cli(&[
        "repo",
        "add",
        "bench",
        "--breed",
        "apt",
        "--mirror",
        src_url,
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
    let list: serde_json::Value =
        serde_json::from_slice(&cli(&["repo", "list", "--json"])?.stdout)?;
    let snapshot = list[0]["mirror_status"]["snapshot"]
        .as_str()
        .context("repo list: no snapshot after the sync")?;
    let manifest = appliance::repo::Manifest::from_blob(&data, snapshot)?;
    // What is not a pool file: Release files, indexes, the manifest.
    let mut index_digests = std::collections::BTreeMap::new();
    for (path, f) in &manifest.files {
        if !path.starts_with("pool/") {
            index_digests.insert(f.digest.clone(), f.size);
        }
    }
    let manifest_size = std::fs::metadata(appliance::repo::blob_path(&data, snapshot)?)?.len();
    let ours_index_bytes = index_digests.values().sum::<u64>() + manifest_size;
    let ours_pkgs: std::collections::BTreeSet<String> = manifest.packages.into_iter().collect();
    let ours_client_s = client_timed(
        &base.join("client-ours"),
        &format!("deb [arch=amd64 signed-by={KEYRING}] {url}/repos/bench {suite} main\n"),
        "our mirror",
    )?;

    // aptly, same source, same roots.
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
    // `Name (= x)`, not a bare `x`: aptly reads a bare name as a
    // dependency, which every provider meets (`usr-is-merged` would take
    // `usrmerge`, which provides it, and with it perl).
    let filter = names
        .iter()
        .map(|n| format!("Name (= {n})"))
        .collect::<Vec<_>>()
        .join(" | ");
    let t0 = Instant::now();
    aptly(&[
        "mirror",
        "create",
        "-architectures=amd64",
        &format!("-keyring={KEYRING}"),
        &format!("-filter={filter}"),
        "-filter-with-deps",
        "bench",
        src_url,
        suite,
        "main",
    ])?;
    aptly(&["mirror", "update", &format!("-keyring={KEYRING}"), "bench"])?;
    let aptly_s = t0.elapsed().as_secs_f64();
    let aptly_bytes = du(&aroot)?;
    let shown = aptly(&["mirror", "show", "-with-packages", "bench"])?;
    let aptly_pkgs: std::collections::BTreeSet<String> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Packages:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if ours_pkgs != aptly_pkgs {
        let only_ours: Vec<_> = ours_pkgs.difference(&aptly_pkgs).collect();
        let only_aptly: Vec<_> = aptly_pkgs.difference(&ours_pkgs).collect();
        bail!(
            "the mirrors hold different package sets ({} ours, {} aptly's): only ours {only_ours:?}, only aptly's {only_aptly:?}",
            ours_pkgs.len(),
            aptly_pkgs.len()
        );
    }
    if first {
        println!(
            "package set check: both mirrors hold the same {} packages",
            ours_pkgs.len()
        );
    }
    let (aptly_published_bytes, aptly_client_s) = {
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
        // What aptly keeps to serve clients: pool, database and the
        // published tree (hard links counted once).
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
        let aptly_client_s = client_timed(
            &base.join("client-aptly"),
            &format!("deb [arch=amd64 trusted=yes] http://127.0.0.1:{port}/ {suite} main\n"),
            "aptly's published mirror",
        )?;
        eprintln!("aptly snapshot+publish {publish_s:.2} s");
        (aptly_served_bytes, aptly_client_s)
    };
    Ok(Run {
        ours_s,
        ours_bytes,
        ours_index_bytes,
        aptly_s,
        aptly_bytes,
        aptly_published_bytes,
        ours_client_s,
        aptly_client_s,
    })
}
