//! Runs the built `appliance serve` binary on an ephemeral loopback port and
//! talks to it with a plain TCP HTTP/1.1 client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp.split(' ').nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[test]
fn serve_binary_answers_version_on_loopback() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("release")).unwrap();
    std::fs::write(data.path().join("release/manifest.json"), b"{}\n").unwrap();
    let degraded = data.path().join("degraded");
    std::fs::write(&degraded, "from init\n").unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .arg("--degraded-file")
        .arg(&degraded)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut line = String::new();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let mut token_line = String::new();
    stdout.read_line(&mut token_line).unwrap();
    let token = token_line
        .trim()
        .strip_prefix("first API token (shown once, keep it): ")
        .unwrap_or_else(|| panic!("no first token on stdout: {token_line:?}"))
        .to_owned();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let (status, body) = http(
        &addr,
        "GET /api/v1/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        v["release"],
        "sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"
    );
    assert_eq!(v["degraded"], serde_json::json!(["from init"]));
    let node_id = v["node_id"].as_str().unwrap();
    let stored = std::fs::read_to_string(data.path().join("state/node.json")).unwrap();
    assert!(stored.contains(node_id));

    let (status, body) = http(
        &addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (200, "ok"));

    // Writes need the bearer token.
    let payload = r#"{"action":"poweroff"}"#;
    let post = |auth: &str| {
        http(
            &addr,
            &format!(
                "POST /api/v1/power HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                payload.len()
            ),
        )
    };
    let (status, body) = post("");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
    // Not under our init and no --allow-power: power requests are refused.
    let (status, body) = post(&format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("power_unavailable"), "{body}");
}

#[test]
fn init_refuses_to_run_when_not_pid_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .arg("init")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PID 1"), "{stderr}");
}

#[test]
fn help_fits_80_columns() {
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
    }
}

#[test]
fn serve_creates_a_missing_data_directory_and_keeps_its_node_id_there() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("new/data");
    let child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut line = String::new();
    // Kept open to the end: serve prints its first token next, and a
    // closed pipe would stop it.
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let mut token_line = String::new();
    stdout.read_line(&mut token_line).unwrap();
    assert!(token_line.contains("first API token"), "{token_line:?}");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let (status, body) = http(
        &addr,
        "GET /api/v1/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let degraded = v["degraded"].to_string();
    assert!(!degraded.contains("node id"), "{degraded}");
    let stored = std::fs::read_to_string(data.join("state/node.json")).unwrap();
    assert!(stored.contains(v["node_id"].as_str().unwrap()));
}

/// Starts `appliance serve` on loopback; its stdout stays open (a closed
/// pipe would stop it). Returns the child, its stdout, address and token.
fn serve(data: &std::path::Path) -> (Killed, impl BufRead, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let (mut line, mut token_line) = (String::new(), String::new());
    stdout.read_line(&mut line).unwrap();
    stdout.read_line(&mut token_line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let token = token_line
        .trim()
        .strip_prefix("first API token (shown once, keep it): ")
        .unwrap_or_else(|| panic!("no first token on stdout: {token_line:?}"))
        .to_owned();
    (child, stdout, addr, token)
}

/// `curl -s` with the token; returns (HTTP status, body).
fn curl(token: &str, args: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(args)
        .output()
        .expect("running curl");
    assert!(o.status.success(), "curl {args:?}: {o:?}");
    let text = String::from_utf8(o.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

#[test]
fn curl_pages_every_list_to_the_end_and_bad_queries_get_json_errors() {
    let data = tempfile::tempdir().unwrap();
    let (_child, _stdout, addr, token) = serve(data.path());
    let base = format!("http://{addr}");
    // The shipped templates, one a page, following `next` until null.
    let mut names = Vec::new();
    let mut url = format!("{base}/api/v1/templates?limit=1");
    loop {
        let (status, body) = curl(&token, &[&url]);
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1, "{body}");
        names.extend(items.iter().map(|t| t["name"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(n) => url = format!("{base}/api/v1/templates?limit=1&after={n}"),
            None => break,
        }
    }
    let (_, all) = curl(&token, &[&format!("{base}/api/v1/templates")]);
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let all: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(all.len() >= 2, "{all:?}");
    assert_eq!(names, all, "paging one by one sees each once, in order");
    // Every list route answers the same shape.
    for path in [
        "systems",
        "repos",
        "status",
        "agents",
        "replicas",
        "clone/jobs",
        "networks",
        "installs",
        "os-installs",
        "sync/conflicts",
    ] {
        let (status, body) = curl(&token, &[&format!("{base}/api/v1/{path}?limit=5")]);
        assert_eq!(status, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["items"].is_array() && v["next"].is_null(),
            "{path}: {body}"
        );
    }
    // Bad query values: 400, the error shape, the parameter named.
    for (q, needle) in [
        ("systems?limit=abc", "limit=abc"),
        ("systems?limit=0", "limit=0"),
        ("agents?limit=100000", "limit=100000"),
        ("replicas?colour=red", "colour"),
        ("events?limit=abc", "limit=abc"),
        ("events?after=yesterday", "after"),
        ("events?order=oldest", "order=oldest"),
        ("events?after=1&after=2", "after"),
        ("systems?limit=5&limit=6", "limit is given twice"),
    ] {
        let (status, body) = curl(&token, &[&format!("{base}/api/v1/{q}")]);
        assert_eq!(status, 400, "{q}: {body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["code"], "invalid_query", "{q}: {body}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{q}: {body}"
        );
    }
    // A wrong method is 405 in the same shape, not 401.
    let (status, body) = curl("", &["-X", "DELETE", &format!("{base}/api/v1/version")]);
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");
}

/// `curl -s -D -` plus `args`: (lowercased response headers, body bytes).
fn curl_headers(token: &str, args: &[&str]) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let o = Command::new("curl")
        .args(["-sS", "-D"])
        .arg(&head)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .args(args)
        .output()
        .expect("running curl");
    assert!(o.status.success(), "curl {args:?}: {o:?}");
    let h = std::fs::read_to_string(&head).unwrap().to_ascii_lowercase();
    (h, o.stdout)
}

#[test]
fn json_answers_are_gzipped_for_curl_compressed_and_other_answers_are_not() {
    let data = tempfile::tempdir().unwrap();
    let (_child, _stdout, addr, token) = serve(data.path());
    let base = format!("http://{addr}");
    // A list of a few KiB: stock curl asks for gzip and decodes it.
    let url = format!("{base}/api/v1/templates");
    let (plain_h, plain) = curl_headers(&token, &[&url]);
    assert!(
        !plain_h.contains("content-encoding"),
        "no gzip unasked: {plain_h}"
    );
    assert!(plain.len() > 1024, "the list is {} bytes", plain.len());
    let (gz_h, decoded) = curl_headers(&token, &["--compressed", &url]);
    assert!(gz_h.contains("content-encoding: gzip"), "{gz_h}");
    assert!(gz_h.contains("vary: accept-encoding"), "{gz_h}");
    let a: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(a, b, "curl --compressed decodes the same list");
    // On the wire it is smaller (curl without --compressed keeps the gzip).
    let (_, raw) = curl_headers(&token, &["-H", "Accept-Encoding: gzip", &url]);
    assert!(
        raw.starts_with(&[0x1f, 0x8b]) && raw.len() < plain.len(),
        "{} gzip bytes for {} JSON bytes",
        raw.len(),
        plain.len()
    );
    // Not JSON (Prometheus text) stays as it is, as do small answers.
    let (m_h, _) = curl_headers(&token, &["--compressed", &format!("{base}/metrics")]);
    assert!(!m_h.contains("content-encoding"), "{m_h}");
    let (v_h, _) = curl_headers(&token, &["--compressed", &format!("{base}/api/v1/version")]);
    assert!(!v_h.contains("content-encoding"), "{v_h}");
}
