//! `GET /metrics` of a real `appliance serve`, checked by Prometheus's own
//! `promtool check metrics` (Debian package `prometheus`, listed in
//! xtask/debian-packages.txt). A missing promtool fails the test.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn metrics_pass_promtool_and_count_requests_events_and_degraded_reasons() {
    let data = tempfile::tempdir().unwrap();
    let degraded = data.path().join("degraded");
    std::fs::write(&degraded, "from init with \"quotes\" and \\ backslash\n").unwrap();
    let (_server, url, token) = common::server(
        data.path(),
        &["--degraded-file", degraded.to_str().unwrap()],
    );
    // Some traffic: a 2xx, a 401 (guard) and an unmatched 404.
    let ok = ureq::get(&format!("{url}/api/v1/version")).call().unwrap();
    assert_eq!(ok.status(), 200);
    let refused = ureq::post(&format!("{url}/api/v1/power"))
        .send("{}")
        .unwrap_err();
    assert!(
        matches!(refused, ureq::Error::StatusCode(401)),
        "{refused:?}"
    );
    let _ = ureq::get(&format!("{url}/nowhere")).call();
    let resp = ureq::get(&format!("{url}/metrics"))
        .header("authorization", &format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = resp.into_body().read_to_string().unwrap();
    for want in [
        "appliance_build_info{version=\"",
        "appliance_http_requests_total{method=\"GET\",route=\"/api/v1/version\",class=\"2xx\"} 1",
        "appliance_http_requests_total{method=\"POST\",route=\"/api/v1/power\",class=\"4xx\"} 1",
        "appliance_http_requests_total{method=\"ANY\",route=\"unmatched\",class=\"4xx\"} 1",
        "appliance_degraded{reason=\"from init with \\\"quotes\\\" and \\\\ backslash\"} 1",
        "# TYPE appliance_events_total counter",
        "# TYPE appliance_installs gauge",
        "# TYPE appliance_clone_jobs gauge",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Reads are public by default: Prometheus scrapes without a token.
    assert_eq!(
        ureq::get(&format!("{url}/metrics"))
            .call()
            .unwrap()
            .status(),
        200
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed for this test");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
