//! Apt partial mirrors end to end, with real peers on loopback: a tiny
//! archive built and signed with Debian's own tools (`dpkg-deb`,
//! `apt-ftparchive`, `gpg`, `xz`) served by a loopback HTTP server,
//! mirrored by `appliance repo sync` through a real `appliance serve`, and
//! then used by stock `apt-get` with signature checking on.

mod common;
use common::{bin, server};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

/// Tools the fixture needs; missing ones fail the test (they are in
/// xtask/debian-packages.txt).
fn need_tools() {
    for t in ["dpkg-deb", "apt-ftparchive", "gpg", "xz", "gzip", "apt-get"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{t} is missing: install apt-utils, gnupg, xz-utils, dpkg"
        );
    }
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The fixture archive: `root` (dists/, pool/) and the public key.
struct Archive {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: PathBuf,
    gnupg: PathBuf,
}

impl Archive {
    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &self.gnupg).args([
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    }

    /// Builds `pool/main/<n>/<name>/<name>_<version>_amd64.deb`; `payload`
    /// bytes go in stored uncompressed (a large package).
    fn add_package(&self, name: &str, version: &str, prio: &str, extra: &str, payload: &[u8]) {
        let src = self
            ._dir
            .path()
            .join("src")
            .join(format!("{name}-{version}"));
        std::fs::create_dir_all(src.join("DEBIAN")).unwrap();
        let doc = src.join("usr/share/doc").join(name);
        std::fs::create_dir_all(&doc).unwrap();
        std::fs::write(doc.join("README"), name).unwrap();
        if !payload.is_empty() {
            std::fs::write(doc.join("payload"), payload).unwrap();
        }
        std::fs::write(
            src.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: {version}\nArchitecture: amd64\n\
                 Maintainer: Test <test@example.invalid>\nPriority: {prio}\n{extra}\
                 Description: test package {name}\n"
            ),
        )
        .unwrap();
        let pool = self.root.join(format!("pool/main/{}/{name}", &name[..1]));
        std::fs::create_dir_all(&pool).unwrap();
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(if payload.is_empty() { "-Zxz" } else { "-Znone" })
            .arg(&src)
            .arg(pool.join(format!("{name}_{version}_amd64.deb"))));
    }

    /// (Re)writes the indexes and the signed Release files.
    fn publish(&self) {
        let root = &self.root;
        let bin_dir = root.join("dists/test/main/binary-amd64");
        std::fs::create_dir_all(&bin_dir).unwrap();
        for f in ["Packages", "Packages.xz", "Packages.gz"] {
            let _ = std::fs::remove_file(bin_dir.join(f));
        }
        let packages = run(Command::new("apt-ftparchive")
            .args(["packages", "pool"])
            .current_dir(root))
        .stdout;
        std::fs::write(bin_dir.join("Packages"), packages).unwrap();
        run(Command::new("xz")
            .args(["-k"])
            .arg(bin_dir.join("Packages")));
        run(Command::new("gzip")
            .args(["-kn"])
            .arg(bin_dir.join("Packages")));
        let dist = root.join("dists/test");
        for f in ["Release", "InRelease", "Release.gpg"] {
            let _ = std::fs::remove_file(dist.join(f));
        }
        let release = run(Command::new("apt-ftparchive")
            .args([
                "-o",
                "APT::FTPArchive::Release::Suite=test",
                "-o",
                "APT::FTPArchive::Release::Codename=test",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "-o",
                "APT::FTPArchive::Release::Architectures=amd64",
                "-o",
                "APT::FTPArchive::Release::Acquire-By-Hash=yes",
                "release",
                "dists/test",
            ])
            .current_dir(root))
        .stdout;
        std::fs::write(dist.join("Release"), release).unwrap();
        run(self
            .gpg()
            .args(["--yes", "--digest-algo", "SHA256", "--clearsign", "-o"])
            .arg(dist.join("InRelease"))
            .arg(dist.join("Release")));
        run(self
            .gpg()
            .args([
                "--yes",
                "--digest-algo",
                "SHA256",
                "--armor",
                "--detach-sign",
                "-o",
            ])
            .arg(dist.join("Release.gpg"))
            .arg(dist.join("Release")));
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.gnupg)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// Six packages: `hello-app` depends on `libgreet (>= 1.0)`,
/// `nonexistent-pkg | alt-real` and the virtual `virtual-mta` (provided
/// by `mail-provider`); `libgreet` pre-depends on `base-req`, which is
/// `Priority: required` anyway; `outsider` is in nobody's closure.
fn build_archive() -> Archive {
    archive_of(&[
        (
            "hello-app",
            "optional",
            "Depends: libgreet (>= 1.0), nonexistent-pkg | alt-real, virtual-mta\n",
        ),
        ("libgreet", "optional", "Pre-Depends: base-req\n"),
        ("base-req", "required", ""),
        ("alt-real", "optional", ""),
        ("mail-provider", "optional", "Provides: virtual-mta\n"),
        ("outsider", "optional", "Depends: libgreet\n"),
    ])
}

/// An archive of `pkgs` (`(name, priority, extra control fields)`, each
/// version 1.0), signed with a throwaway key.
fn archive_of(pkgs: &[(&str, &str, &str)]) -> Archive {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    // A throwaway signing key in a temp GNUPGHOME.
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = dir.path().join("archive-key.gpg");
    let a = Archive {
        _dir: dir,
        root,
        key,
        gnupg,
    };
    for (name, prio, extra) in pkgs {
        a.add_package(name, "1.0", prio, extra, b"");
    }
    run(a.gpg().args([
        "--quick-gen-key",
        "Test Archive <archive@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ]));
    a.publish();
    let exported = run(a.gpg().args(["--export"])).stdout;
    assert!(!exported.is_empty());
    std::fs::write(&a.key, exported).unwrap();
    a
}

type Files = Arc<Mutex<HashMap<String, Vec<u8>>>>;
type Log = Arc<Mutex<Vec<String>>>;

/// A fault the fixture server plays on one path.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Send this many bytes of the body, then drop the connection (once).
    CutAfter(usize),
    /// Send this many bytes, then hang until the fault is removed, then
    /// drop the connection.
    StallAfter(usize),
}
type Faults = Arc<Mutex<HashMap<String, Fault>>>;

/// Every file under `root`, keyed by its URL path.
fn load(root: &Path) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                files.insert(format!("/debian/{rel}"), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

/// A loopback HTTP server holding every file of `root` in memory (so a
/// test can tamper with one), logging the paths asked for (with ` Range:
/// <value>` when a range was asked), honouring `Range: bytes=N-`.
fn upstream(root: &Path) -> (String, Files, Log) {
    let (url, files, log, _) = upstream_with_faults(root);
    (url, files, log)
}

fn upstream_with_faults(root: &Path) -> (String, Files, Log, Faults) {
    let files: Files = Arc::new(Mutex::new(load(root)));
    let log: Log = Arc::default();
    let faults: Faults = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/debian", listener.local_addr().unwrap());
    let (f, l, x) = (files.clone(), log.clone(), faults.clone());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let (f, l, x) = (f.clone(), l.clone(), x.clone());
            std::thread::spawn(move || {
                let _ = handle(s, &f, &l, &x);
            });
        }
    });
    (url, files, log, faults)
}

fn handle(mut s: TcpStream, files: &Files, log: &Log, faults: &Faults) -> std::io::Result<()> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_owned());
            }
        }
    }
    log.lock().unwrap().push(match &range {
        Some(r) => format!("{path} Range: {r}"),
        None => path.clone(),
    });
    let Some(b) = files.lock().unwrap().get(&path).cloned() else {
        write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return s.flush();
    };
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let body = match from {
        Some(n) if n < b.len() => {
            write!(
                s,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len() - 1,
                b.len(),
                b.len() - n
            )?;
            &b[n..]
        }
        _ => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            &b[..]
        }
    };
    let fault = faults.lock().unwrap().get(&path).copied();
    match fault {
        Some(Fault::CutAfter(n)) => {
            faults.lock().unwrap().remove(&path);
            s.write_all(&body[..n.min(body.len())])?;
            s.flush()?;
            return s.shutdown(std::net::Shutdown::Both);
        }
        Some(Fault::StallAfter(n)) => {
            s.write_all(&body[..n.min(body.len())])?;
            s.flush()?;
            while faults.lock().unwrap().contains_key(&path) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            return s.shutdown(std::net::Shutdown::Both);
        }
        None => s.write_all(body)?,
    }
    s.flush()
}

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("APPLIANCE_URL", url)
        .env("APPLIANCE_TOKEN", token)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(url: &str, token: &str, args: &[&str]) -> String {
    let o = cli(url, token, args);
    assert!(
        o.status.success(),
        "appliance {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn add_repo(url: &str, token: &str, name: &str, upstream: &str, key: &Path) {
    add_repo_for(url, token, name, upstream, key, &["hello-app"]);
}

fn add_repo_for(url: &str, token: &str, name: &str, upstream: &str, key: &Path, packages: &[&str]) {
    ok(
        url,
        token,
        &[
            "repo",
            "add",
            name,
            "--breed",
            "apt",
            "--mirror",
            upstream,
            "--set",
            r#"suites=["test"]"#,
            "--set",
            r#"components=["main"]"#,
            "--set",
            r#"arches=["amd64"]"#,
            "--set",
            &format!("packages={}", serde_json::json!(packages)),
            "--set",
            &format!("keyring={}", serde_json::json!(key.display().to_string())),
        ],
    );
}

fn http_get(url: &str) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().proxy(None).build().into();
    match agent.get(url).call() {
        Ok(r) => Ok(r.into_body().read_to_vec().map_err(|e| e.to_string())?),
        Err(e) => Err(e.to_string()),
    }
}

/// Stock apt-get with its own state, only our source and key: `update`
/// with signature checking on, then `install --download-only`.
fn apt(work: &Path, source: &str, args: &[&str]) -> Output {
    for d in [
        "etc/parts",
        "etc/trusted.d",
        "etc/prefs.d",
        "state/lists/partial",
        "cache/archives/partial",
    ] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    std::fs::write(work.join("etc/sources.list"), source).unwrap();
    if !work.join("status").exists() {
        std::fs::write(work.join("status"), "").unwrap();
    }
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
    ];
    let mut c = Command::new("apt-get");
    for o in &opts {
        c.arg("-o").arg(o);
    }
    c.args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Stock apt-get on an empty root `root` (`-o Dir=`, so its sources,
/// lists, archives and dpkg database all live there; the host's apt
/// configuration is kept out through `APT_CONFIG`), `dpkg --root` doing
/// the install.
fn apt_root(root: &Path, source: &str, args: &[&str]) -> Output {
    for d in [
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log/apt",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/apt/sources.list"), source).unwrap();
    if !root.join("var/lib/dpkg/status").exists() {
        std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    }
    let conf = root.with_extension("apt.conf");
    std::fs::write(
        &conf,
        format!(
            "Dir \"{}/\";\nDir::Etc::Main \"/dev/null\";\n",
            root.display()
        ),
    )
    .unwrap();
    let mut c = Command::new("apt-get");
    for o in [
        format!("Dir={}/", root.display()),
        "Dir::Bin::dpkg=/usr/bin/dpkg".into(),
        format!("DPkg::Options::=--root={}", root.display()),
        "Debug::NoLocking=1".into(),
        "APT::Sandbox::User=root".into(),
        "APT::Architecture=amd64".into(),
        "APT::Architectures::=amd64".into(),
        "APT::Install-Recommends=false".into(),
        "Acquire::http::Proxy=DIRECT".into(),
        "Acquire::Languages=none".into(),
        "Acquire::Retries=0".into(),
    ] {
        c.arg("-o").arg(o);
    }
    c.args(args)
        .env("APT_CONFIG", &conf)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Issue 16: the mirror serves upstream's whole index, so stock apt on a
/// root holding none of a group's alternatives takes the *first*
/// (Debian's `usrmerge | usr-is-merged` takes `usrmerge`), even where our
/// closure met the group with another (the required `usr-is-merged`).
/// The mirror must hold that first alternative and its closure, or the
/// install fails on a 404 for its pool file.
#[test]
fn stock_apt_installs_into_an_empty_root_the_first_alternative_our_resolver_did_not_pick() {
    let archive = archive_of(&[
        (
            "init-helpers",
            "optional",
            "Depends: merge-tool | merged-marker\n",
        ),
        ("merge-tool", "optional", "Depends: merge-lib\n"),
        ("merge-lib", "optional", ""),
        ("merged-marker", "required", ""),
        ("outsider", "optional", ""),
    ]);
    let (up, _files, log) = upstream(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo_for(&url, t, "first", &up, &archive.key, &["init-helpers"]);
    let out = ok(&url, t, &["repo", "sync", "first"]);
    assert!(out.contains("first: 4 packages"), "{out}");
    assert!(
        !log.lock().unwrap().iter().any(|p| p.contains("outsider")),
        "outsider fetched"
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let source = format!(
        "deb [arch=amd64 signed-by={}] {url}/repos/first test main\n",
        archive.key.display()
    );
    let o = apt_root(&root, &source, &["update"]);
    assert!(
        o.status.success() && !text(&o).contains("W:") && !text(&o).contains("E:"),
        "{}",
        text(&o)
    );
    let o = apt_root(&root, &source, &["install", "-y", "init-helpers"]);
    assert!(o.status.success(), "{}", text(&o));
    // Apt took the first alternative, fetched it from the mirror and
    // dpkg installed it: the dpkg database on the root says so.
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    let mut installed: Vec<&str> = status
        .split("\n\n")
        .filter(|s| s.contains("Status: install ok installed"))
        .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("Package: ")))
        .collect();
    installed.sort();
    assert_eq!(
        installed,
        ["init-helpers", "merge-lib", "merge-tool"],
        "{}",
        text(&o)
    );
    assert!(root.join("usr/share/doc/merge-tool/README").is_file());
}

#[test]
fn stock_apt_installs_from_a_synced_partial_mirror() {
    let archive = build_archive();
    let (up, _files, log) = upstream(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo(&url, t, "local", &up, &archive.key);

    let out = ok(&url, t, &["repo", "sync", "local"]);
    assert!(out.contains("local: 5 packages"), "{out}");
    {
        let log = log.lock().unwrap();
        assert!(
            log.iter().any(|p| p.ends_with("/hello-app_1.0_amd64.deb")),
            "{log:?}"
        );
        assert!(
            !log.iter().any(|p| p.contains("outsider")),
            "outsider fetched: {log:?}"
        );
    }

    // The mirror serves upstream's bytes; the package outside the closure
    // is not in it; by-hash paths are served (Acquire-By-Hash: yes).
    let mirror = format!("{url}/repos/local");
    for p in [
        "dists/test/InRelease",
        "dists/test/Release",
        "dists/test/Release.gpg",
        "dists/test/main/binary-amd64/Packages.xz",
        "pool/main/m/mail-provider/mail-provider_1.0_amd64.deb",
    ] {
        let got = http_get(&format!("{mirror}/{p}")).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(got, std::fs::read(archive.root.join(p)).unwrap(), "{p}");
    }
    let xz = std::fs::read(
        archive
            .root
            .join("dists/test/main/binary-amd64/Packages.xz"),
    )
    .unwrap();
    let hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&xz))
    };
    assert_eq!(
        http_get(&format!(
            "{mirror}/dists/test/main/binary-amd64/by-hash/SHA256/{hex}"
        ))
        .unwrap(),
        xz
    );
    let err = http_get(&format!(
        "{mirror}/pool/main/o/outsider/outsider_1.0_amd64.deb"
    ))
    .unwrap_err();
    assert!(err.contains("404"), "{err}");
    // Every mirrored file is a blob (it travels with sync and bundles).
    let deb = std::fs::read(
        archive
            .root
            .join("pool/main/h/hello-app/hello-app_1.0_amd64.deb"),
    )
    .unwrap();
    let deb_hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&deb))
    };
    assert!(data.path().join("blobs/sha256").join(&deb_hex).is_file());

    let list = ok(&url, t, &["repo", "list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("local "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains(" 5 ") && row.contains("ago") && row.contains("+0000"),
        "{list}"
    );

    // Stock apt: update verifies InRelease against the throwaway key.
    let work = tempfile::tempdir().unwrap();
    let source = format!(
        "deb [arch=amd64 signed-by={}] {mirror} test main\n",
        archive.key.display()
    );
    let o = apt(work.path(), &source, &["update"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !text.contains("W:") && !text.contains("E:"),
        "{text}"
    );
    // Served by hash (apt asks under SHA512 here), no fallback.
    assert!(!text.contains("Ign:"), "{text}");
    let o = apt(
        work.path(),
        &source,
        &["install", "--download-only", "-y", "hello-app"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    let mut got: Vec<String> = std::fs::read_dir(work.path().join("cache/archives"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".deb"))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "alt-real_1.0_amd64.deb",
            "base-req_1.0_amd64.deb",
            "hello-app_1.0_amd64.deb",
            "libgreet_1.0_amd64.deb",
            "mail-provider_1.0_amd64.deb"
        ],
        "{text}"
    );
    assert_eq!(
        std::fs::read(work.path().join("cache/archives/hello-app_1.0_amd64.deb")).unwrap(),
        deb
    );

    // The same mirror with another key: apt refuses (checking is on).
    if Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").exists() {
        let other = tempfile::tempdir().unwrap();
        let o = apt(
            other.path(),
            &format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} test main\n"),
            &["update"],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            text.contains("NO_PUBKEY") || text.contains("not signed"),
            "{text}"
        );
    }

    // A second sync with nothing new fetches nothing but InRelease.
    log.lock().unwrap().clear();
    let out = ok(&url, t, &["repo", "sync", "local"]);
    assert!(out.contains("local: 5 packages"), "{out}");
    assert_eq!(*log.lock().unwrap(), ["/debian/dists/test/InRelease"]);
}

#[test]
fn tampered_indexes_and_packages_are_refused_naming_the_file() {
    let archive = build_archive();
    let (up, files, _log) = upstream(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo(&url, t, "bad", &up, &archive.key);
    let flip = |path: &str| {
        let mut f = files.lock().unwrap();
        let b = f.get_mut(path).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x55;
    };
    let xz = "/debian/dists/test/main/binary-amd64/Packages.xz";
    flip(xz);
    let o = cli(&url, t, &["repo", "sync", "bad"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("dists/test/main/binary-amd64/Packages.xz") && err.contains("mismatch"),
        "{err}"
    );
    flip(xz);
    let deb = "/debian/pool/main/l/libgreet/libgreet_1.0_amd64.deb";
    flip(deb);
    let o = cli(&url, t, &["repo", "sync", "bad"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("pool/main/l/libgreet/libgreet_1.0_amd64.deb") && err.contains("mismatch"),
        "{err}"
    );
    // Nothing was published, and the failure is on record.
    let st = ok(&url, t, &["repo", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(
        v[0]["mirror_status"]["last_error"]
            .as_str()
            .unwrap()
            .contains("libgreet"),
        "{v}"
    );
    assert!(v[0]["mirror_status"]["snapshot"].is_null(), "{v}");
    // A signature from another key is refused too.
    flip(deb);
    let ir = "/debian/dists/test/InRelease";
    {
        let mut f = files.lock().unwrap();
        let text = String::from_utf8(f[ir].clone()).unwrap();
        f.insert(
            ir.into(),
            text.replace("Suite: test", "Suite: tesT").into_bytes(),
        );
    }
    let o = cli(&url, t, &["repo", "sync", "bad"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("InRelease") && err.contains("signature"),
        "{err}"
    );
}

/// Starts `appliance serve` again on a data directory that already has
/// its tokens (no first token is printed then); returns it and its URL.
fn restart(data: &Path) -> (common::Killed, String) {
    let mut child = common::Killed(
        bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (child, format!("http://{addr}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed().as_secs() < 60, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Incompressible bytes (stored as they are in a `-Znone` package).
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_killed_sync_keeps_the_old_snapshot_served_and_resumes_where_it_stopped() {
    let archive = build_archive();
    let (up, files, log, faults) = upstream_with_faults(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (first, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo(&url, t, "local", &up, &archive.key);
    // One download at a time, so the kill lands at a known point (the
    // concurrent path: see the test after this one).
    ok(&url, t, &["repo", "edit", "local", "--set", "downloads=1"]);
    ok(&url, t, &["repo", "sync", "local"]);
    let old_inrelease = std::fs::read(archive.root.join("dists/test/InRelease")).unwrap();

    // Upstream publishes three new required packages; the sync of them is
    // killed a MiB into the large one (after `add-on`, before `small-req`).
    archive.add_package("add-on", "1.0", "required", "", b"");
    archive.add_package("big-req", "1.0", "required", "", &noise(3 << 20));
    archive.add_package("small-req", "1.0", "required", "", b"");
    archive.publish();
    *files.lock().unwrap() = load(&archive.root);
    let big = "/debian/pool/main/b/big-req/big-req_1.0_amd64.deb";
    let small = "/debian/pool/main/s/small-req/small-req_1.0_amd64.deb";
    faults
        .lock()
        .unwrap()
        .insert(big.into(), Fault::StallAfter(1 << 20));
    log.lock().unwrap().clear();
    ok(&url, t, &["repo", "sync", "local", "--no-wait"]);
    let partial = data.path().join("blobs/apt-partial");
    let held = || -> u64 {
        std::fs::read_dir(&partial)
            .map(|rd| rd.flatten().map(|e| e.metadata().unwrap().len()).sum())
            .unwrap_or(0)
    };
    wait_for("a MiB of big-req on disk", || held() >= 1 << 20);
    drop(first); // SIGKILL, mid-file
    assert_eq!(held(), 1 << 20);
    let before_kill = log.lock().unwrap().clone();
    assert!(
        before_kill.iter().any(|l| l.contains("add-on"))
            && !before_kill.iter().any(|l| l.contains("small-req")),
        "{before_kill:?}"
    );

    // The old snapshot is still what is served, whole, to stock apt-get.
    let (_second, url) = restart(data.path());
    let mirror = format!("{url}/repos/local");
    assert_eq!(
        http_get(&format!("{mirror}/dists/test/InRelease")).unwrap(),
        old_inrelease
    );
    let work = tempfile::tempdir().unwrap();
    let source = format!(
        "deb [arch=amd64 signed-by={}] {mirror} test main\n",
        archive.key.display()
    );
    let o = apt(work.path(), &source, &["update"]);
    assert!(
        o.status.success() && !text(&o).contains("E:"),
        "{}",
        text(&o)
    );
    let o = apt(
        work.path(),
        &source,
        &["install", "--download-only", "-y", "hello-app"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = apt(
        work.path(),
        &source,
        &["install", "--download-only", "-y", "big-req"],
    );
    assert!(!o.status.success(), "big-req served early: {}", text(&o));

    // Resume: what was verified is not fetched again, big-req continues
    // from its MiB, and a connection dropped in small-req resumes too.
    faults.lock().unwrap().remove(big);
    faults
        .lock()
        .unwrap()
        .insert(small.into(), Fault::CutAfter(300));
    log.lock().unwrap().clear();
    let out = ok(&url, t, &["repo", "sync", "local"]);
    assert!(out.contains("local: 8 packages"), "{out}");
    let mut got = log.lock().unwrap().clone();
    got.sort();
    let mut want = vec![
        "/debian/dists/test/InRelease".to_string(),
        "/debian/dists/test/Release".into(),
        "/debian/dists/test/Release.gpg".into(),
        format!("{big} Range: bytes={}-", 1 << 20),
        small.into(),
        format!("{small} Range: bytes=300-"),
    ];
    want.sort();
    assert_eq!(got, want);
    assert!(!partial.exists() || held() == 0);
    assert_eq!(
        http_get(&format!("{mirror}/dists/test/InRelease")).unwrap(),
        std::fs::read(archive.root.join("dists/test/InRelease")).unwrap()
    );
    let o = apt(work.path(), &source, &["update"]);
    assert!(
        o.status.success() && !text(&o).contains("E:"),
        "{}",
        text(&o)
    );
    let o = apt(
        work.path(),
        &source,
        &["install", "--download-only", "-y", "big-req"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(work.path().join("cache/archives/big-req_1.0_amd64.deb")).unwrap(),
        std::fs::read(archive.root.join(&big["/debian/".len()..])).unwrap()
    );

    // Nothing new upstream: only the Release file travels.
    log.lock().unwrap().clear();
    ok(&url, t, &["repo", "sync", "local"]);
    assert_eq!(*log.lock().unwrap(), ["/debian/dists/test/InRelease"]);
}

fn blob_of(data: &Path, archive: &Archive, url_path: &str) -> PathBuf {
    let bytes = std::fs::read(archive.root.join(&url_path["/debian/".len()..])).unwrap();
    data.join("blobs/sha256")
        .join(builder::Digest::of(&bytes).hex())
}

#[test]
fn pool_files_download_at_once_so_a_stalled_one_holds_up_nothing_and_a_bad_one_publishes_nothing() {
    let archive = build_archive();
    let (up, files, log, faults) = upstream_with_faults(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo(&url, t, "local", &up, &archive.key);
    ok(&url, t, &["repo", "sync", "local"]);
    let mirror = format!("{url}/repos/local");
    let old_inrelease = http_get(&format!("{mirror}/dists/test/InRelease")).unwrap();

    // Three new required packages: the first in path order stalls after
    // 4 KiB, the last arrives with a byte changed.
    archive.add_package("add-on", "1.0", "required", "", b"");
    archive.add_package("big-req", "1.0", "required", "", &noise(1 << 20));
    archive.add_package("small-req", "1.0", "required", "", b"");
    archive.publish();
    *files.lock().unwrap() = load(&archive.root);
    let addon = "/debian/pool/main/a/add-on/add-on_1.0_amd64.deb";
    let big = "/debian/pool/main/b/big-req/big-req_1.0_amd64.deb";
    let small = "/debian/pool/main/s/small-req/small-req_1.0_amd64.deb";
    let flip = || {
        let mut f = files.lock().unwrap();
        let b = f.get_mut(small).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x55;
    };
    flip();
    faults
        .lock()
        .unwrap()
        .insert(big.into(), Fault::StallAfter(4096));
    log.lock().unwrap().clear();
    let (u, tk) = (url.clone(), token.clone());
    let sync = std::thread::spawn(move || cli(&u, &tk, &["repo", "sync", "local"]));
    // One at a time, nothing after big-req would start while it stalls.
    wait_for(
        "add-on fetched and small-req asked for while big-req stalls",
        || {
            log.lock().unwrap().iter().any(|l| l == small)
                && blob_of(data.path(), &archive, addon).exists()
        },
    );
    assert!(!blob_of(data.path(), &archive, big).exists());
    faults.lock().unwrap().remove(big); // drops big-req's connection
    let o = sync.join().unwrap();
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("pool/main/s/small-req/small-req_1.0_amd64.deb") && err.contains("mismatch"),
        "{err}"
    );
    // What was in flight finished (big-req resumed after the drop) and is
    // kept; the bad file is not; the old snapshot is still served.
    assert!(log
        .lock()
        .unwrap()
        .contains(&format!("{big} Range: bytes=4096-")));
    assert!(blob_of(data.path(), &archive, big).exists());
    assert!(!blob_of(data.path(), &archive, small).exists());
    assert_eq!(
        http_get(&format!("{mirror}/dists/test/InRelease")).unwrap(),
        old_inrelease
    );

    // Upstream fixed: only the file that failed travels.
    flip();
    log.lock().unwrap().clear();
    let out = ok(&url, t, &["repo", "sync", "local"]);
    assert!(out.contains("local: 8 packages"), "{out}");
    let mut got = log.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        [
            "/debian/dists/test/InRelease",
            "/debian/dists/test/Release",
            "/debian/dists/test/Release.gpg",
            small
        ]
    );
    assert_eq!(
        http_get(&format!("{mirror}/dists/test/InRelease")).unwrap(),
        std::fs::read(archive.root.join("dists/test/InRelease")).unwrap()
    );
}

#[test]
fn mirror_files_answer_range_and_conditional_requests() {
    let archive = build_archive();
    let (up, _files, _log) = upstream(&archive.root);
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_repo(&url, t, "local", &up, &archive.key);
    ok(&url, t, &["repo", "sync", "local"]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .build()
        .into();
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut r = agent.get(format!("{url}/repos/local/{path}"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let mut resp = r.call().unwrap();
        let h = |k: &str| {
            resp.headers()
                .get(k)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let (etag, lm, cc, cr) = (
            h("etag"),
            h("last-modified"),
            h("cache-control"),
            h("content-range"),
        );
        let body = resp.body_mut().read_to_vec().unwrap();
        (resp.status().as_u16(), etag, lm, cc, cr, body)
    };
    let deb_path = "pool/main/h/hello-app/hello-app_1.0_amd64.deb";
    let deb = std::fs::read(archive.root.join(deb_path)).unwrap();
    let hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&deb))
    };
    let (status, etag, lm, cc, _, body) = get(deb_path, &[]);
    assert_eq!((status, body.as_slice()), (200, deb.as_slice()));
    assert_eq!(etag, format!("\"{hex}\""));
    assert!(cc.contains("immutable") && !lm.is_empty(), "{cc} {lm}");

    let (status, _, _, _, cr, body) = get(deb_path, &[("Range", "bytes=10-19")]);
    assert_eq!(status, 206);
    assert_eq!(body, deb[10..20]);
    assert_eq!(cr, format!("bytes 10-19/{}", deb.len()));
    let (status, _, _, _, _, body) =
        get(deb_path, &[("Range", &format!("bytes={}-", deb.len() + 5))]);
    assert_eq!(status, 416, "{}", String::from_utf8_lossy(&body));

    let (status, e304, _, _, _, body) = get(deb_path, &[("If-None-Match", &etag)]);
    assert_eq!((status, body.len(), e304.as_str()), (304, 0, etag.as_str()));
    let (status, ..) = get(deb_path, &[("If-None-Match", "\"other\"")]);
    assert_eq!(status, 200);
    // If-None-Match wins over If-Modified-Since.
    let (status, ..) = get(
        deb_path,
        &[("If-None-Match", "\"other\""), ("If-Modified-Since", &lm)],
    );
    assert_eq!(status, 200);
    let (status, ..) = get(deb_path, &[("If-Modified-Since", &lm)]);
    assert_eq!(status, 304);
    let (status, _, _, _, _, body) = get(
        deb_path,
        &[("Range", "bytes=0-3"), ("If-Range", "\"other\"")],
    );
    assert_eq!((status, body.len()), (200, deb.len()));
    let (status, _, _, _, _, body) = get(deb_path, &[("Range", "bytes=0-3"), ("If-Range", &etag)]);
    assert_eq!((status, body.as_slice()), (206, &deb[..4]));

    let (status, _, _, cc, _, _) = get("dists/test/InRelease", &[]);
    assert_eq!(status, 200);
    assert!(cc.contains("must-revalidate"), "{cc}");

    // Files that change with each publish carry no Last-Modified and
    // ignore If-Modified-Since: a blob's mtime is not its publish time
    // (two publishes in one second left apt on the old index).
    let (status, _, lm, _, _, _) = get("dists/test/InRelease", &[]);
    assert_eq!((status, lm.as_str()), (200, ""));
    let (status, ..) = get(
        "dists/test/InRelease",
        &[("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")],
    );
    assert_eq!(status, 200);

    // Stock apt: a second update fetches the InRelease again (no date to
    // revalidate by) but no index, since their hashes did not change.
    let work = tempfile::tempdir().unwrap();
    let source = format!(
        "deb [arch=amd64 signed-by={}] {url}/repos/local test main\n",
        archive.key.display()
    );
    let o = apt(work.path(), &source, &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = apt(work.path(), &source, &["update"]);
    assert!(
        o.status.success() && !text(&o).contains("Packages"),
        "{}",
        text(&o)
    );
}
