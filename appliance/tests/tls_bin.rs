//! HTTPS with the site CA, end to end on loopback: the real `appliance
//! serve` with `--listen-tls`, checked by stock curl and openssl (the site
//! CA verifies the server, nothing else does, the fingerprint printed at
//! start is the CA's), the CLI over https with `--ca` / `APPLIANCE_CA`, its
//! refusal to send a token in clear, and a child that pins its parent's CA
//! and checks in over https.

mod common;
use common::{bin, Killed};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Tls {
    _child: Killed,
    http: String,
    https: String,
    token: String,
    fingerprint: String,
}

/// `appliance serve` with HTTP and HTTPS on loopback ports; reads the four
/// lines it prints.
fn serve_tls(data: &Path, extra: &[&str]) -> Tls {
    let child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen-tls",
            "127.0.0.1:0",
            "--sync-interval",
            "0",
            "--data",
        ])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..4 {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        lines.push(l.trim().to_owned());
    }
    let after = |prefix: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
            .to_owned()
    };
    Tls {
        http: format!("http://{}", after("listening on ")),
        https: format!("https://{}", after("listening (https) on ")),
        token: after("first API token (shown once, keep it): "),
        fingerprint: after("site CA SHA-256 fingerprint: "),
        _child: child,
    }
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The CLI with a clean environment (HOME in `home`, no APPLIANCE_*).
fn cli(home: &Path) -> Command {
    let mut c = bin();
    c.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("APPLIANCE_URL")
        .env_remove("APPLIANCE_TOKEN")
        .env_remove("APPLIANCE_DATA")
        .env_remove("APPLIANCE_CA");
    c
}

fn curl() -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10"]);
    c
}

#[test]
fn https_with_the_site_ca_curl_openssl_and_cli() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let s = serve_tls(data.path(), &[]);
    let tls = data.path().join("state/tls");
    let ca = tls.join("ca.pem");
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(tls.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    // The CA is public over plain HTTP, and it is the one on disk.
    let served = ok(run(curl()
        .arg("--fail")
        .arg(format!("{}/api/v1/tls/ca.pem", s.http))));
    assert_eq!(served, std::fs::read_to_string(&ca).unwrap());
    // The fingerprint printed at start is the CA's, as openssl computes it.
    let fp = ok(run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&ca)));
    assert_eq!(
        fp.trim().rsplit('=').next().unwrap(),
        s.fingerprint,
        "openssl: {fp}"
    );

    // curl trusting the site CA gets the API over https...
    let version = ok(run(curl()
        .arg("--fail")
        .arg("--cacert")
        .arg(&ca)
        .arg(format!("{}/api/v1/version", s.https))));
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // ...by name too (localhost is in the certificate).
    let port = s.https.rsplit(':').next().unwrap();
    ok(run(curl()
        .arg("--fail")
        .arg("--cacert")
        .arg(&ca)
        .arg(format!("https://localhost:{port}/healthz"))));
    // Without it, stock curl refuses the certificate (exit 60).
    let plain = run(curl().arg(format!("{}/api/v1/version", s.https)));
    assert_eq!(
        plain.status.code(),
        Some(60),
        "curl without --cacert: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    // Another site's CA does not verify it either.
    let other = tempfile::tempdir().unwrap();
    let other_ca = {
        let o = serve_tls(other.path(), &[]);
        drop(o);
        other.path().join("state/tls/ca.pem")
    };
    let wrong = run(curl()
        .arg("--cacert")
        .arg(&other_ca)
        .arg(format!("{}/api/v1/version", s.https)));
    assert_eq!(wrong.status.code(), Some(60), "curl with another site's CA");
    // openssl sees a chain to the site CA that names this address.
    let addr = s.https.trim_start_matches("https://").to_owned();
    let sc = run(Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr,
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            "-CAfile",
        ])
        .arg(&ca));
    let text = String::from_utf8_lossy(&sc.stdout);
    assert!(
        sc.status.success(),
        "openssl s_client: {text}\n{}",
        String::from_utf8_lossy(&sc.stderr)
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(
        text.contains("appliance site CA"),
        "issuer not the site CA: {text}"
    );

    // The CLI over https: a guarded write with --ca works.
    ok(run(cli(home.path())
        .args(["--url", &s.https, "--token", &s.token, "--ca"])
        .arg(&ca)
        .args([
            "image",
            "add",
            "over-https",
            "--set",
            "type=capture",
        ])));
    // APPLIANCE_CA and the config file's `ca` do the same.
    ok(run(cli(home.path())
        .env("APPLIANCE_CA", &ca)
        .args([
            "--url",
            &format!("https://localhost:{port}"),
            "--token",
            &s.token,
        ])
        .args(["image", "add", "by-env", "--set", "type=capture"])));
    let cfg = home.path().join(".config/appliance");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "url = {:?}\ntoken = {:?}\nca = {:?}\n",
            s.https, s.token, ca
        ),
    )
    .unwrap();
    ok(run(cli(home.path()).args([
        "image",
        "add",
        "by-config",
        "--set",
        "type=capture",
    ])));
    std::fs::remove_file(cfg.join("config.toml")).unwrap();
    // Without the CA the CLI refuses the certificate and says what to do.
    let refused = run(cli(home.path())
        .args(["--url", &s.https, "--token", &s.token])
        .args(["image", "add", "refused", "--set", "type=capture"]));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--ca") && err.contains("/api/v1/tls/ca.pem"),
        "{err}"
    );
    // A CA file that is no certificate is named as the problem.
    let junk = home.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let bad = run(cli(home.path())
        .args(["--url", &s.https, "--ca"])
        .arg(&junk)
        .args(["image", "add", "junk", "--set", "type=capture"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("junk.pem"));
    // A token is not sent in clear to a non-loopback address (refused
    // before connecting; 192.0.2.1 is a documentation address).
    let clear = run(cli(home.path())
        .args(["--url", "http://192.0.2.1:80", "--token", &s.token])
        .args(["image", "add", "clear", "--set", "type=capture"]));
    assert!(!clear.status.success());
    assert!(
        String::from_utf8_lossy(&clear.stderr).contains("--insecure-http"),
        "{}",
        String::from_utf8_lossy(&clear.stderr)
    );
    // Every write that succeeded arrived; none that was refused did.
    let list = ok(run(
        cli(home.path()).args(["--url", &s.http, "image", "list", "--json"])
    ));
    for name in ["over-https", "by-env", "by-config"] {
        assert!(list.contains(name), "{name} missing: {list}");
    }
    for name in ["refused", "junk", "clear"] {
        assert!(
            !list.contains(&format!("\"{name}\"")),
            "{name} arrived: {list}"
        );
    }
}

#[test]
fn a_child_pins_its_parents_ca_and_checks_in_over_https() {
    let pdata = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let p = serve_tls(pdata.path(), &[]);
    let ca: PathBuf = pdata.path().join("state/tls/ca.pem");
    let reg: serde_json::Value = serde_json::from_str(&ok(run(cli(home.path())
        .args(["--url", &p.https, "--token", &p.token, "--ca"])
        .arg(&ca)
        .args([
            "replica",
            "register",
            "--name",
            "child",
            "--mac",
            "52:54:00:aa:bb:cc",
            "--json",
        ]))))
    .unwrap();
    let node_id = reg["node_id"].as_str().unwrap().to_owned();
    let ctoken = reg["token"].as_str().unwrap().to_owned();

    let cdata = tempfile::tempdir().unwrap();
    let join = |with_ca: bool| {
        let mut c = cli(home.path());
        c.args(["--token", &ctoken]);
        if with_ca {
            c.arg("--ca").arg(&ca);
        }
        c.args(["replica", "join", "--data"])
            .arg(cdata.path())
            .args(["--parent", &p.https, "--node-id", &node_id]);
        run(&mut c)
    };
    // An https parent is joined only with its CA to pin.
    let refused = join(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--ca"));
    ok(join(true));
    let link: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cdata.path().join("state/parent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(link["url"], p.https.as_str());
    assert_eq!(link["ca"], std::fs::read_to_string(&ca).unwrap().as_str());

    // The child checks in over https, trusting only the pinned CA.
    let c = serve_tls(cdata.path(), &["--checkin-interval", "1"]);
    assert_ne!(c.fingerprint, p.fingerprint, "each node has its own CA");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list: serde_json::Value = serde_json::from_str(&ok(run(
            cli(home.path()).args(["--url", &p.http, "replica", "list", "--json"])
        )))
        .unwrap();
        if list[0]["url"] == c.http.as_str() {
            assert_eq!(list[0]["node_id"], node_id.as_str());
            assert_eq!(list[0]["status"], "running");
            break;
        }
        assert!(Instant::now() < deadline, "child never checked in: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
