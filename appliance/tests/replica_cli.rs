//! Replicas end to end: a parent `appliance serve`, a child registered with
//! `appliance replica register`, joined with `appliance replica join`, and
//! checking in by itself once started.

mod common;
use common::{bin, server};

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn cli(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = bin();
    c.args(args)
        .env("APPLIANCE_URL", url)
        .env_remove("APPLIANCE_TOKEN")
        .stdin(Stdio::null());
    if let Some(t) = token {
        c.env("APPLIANCE_TOKEN", t);
    }
    c.output().unwrap()
}

fn ok(url: &str, token: Option<&str>, args: &[&str]) -> String {
    let o = cli(url, token, args);
    assert!(
        o.status.success(),
        "appliance {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn child_registers_joins_and_checks_in() {
    let pdata = tempfile::tempdir().unwrap();
    let (_parent, purl, ptoken) = server(pdata.path(), &[]);
    // Registering needs an operator token.
    assert!(!cli(&purl, None, &["replica", "register"]).status.success());
    let reg: serde_json::Value = serde_json::from_str(&ok(
        &purl,
        Some(&ptoken),
        &[
            "replica",
            "register",
            "--name",
            "child",
            "--mac",
            "52:54:00:12:34:56",
            "--json",
        ],
    ))
    .unwrap();
    let node_id = reg["node_id"].as_str().unwrap().to_owned();
    let ctoken = reg["token"].as_str().unwrap().to_owned();
    // The child's token is not an operator token on the parent.
    assert!(!cli(&purl, Some(&ctoken), &["replica", "register"])
        .status
        .success());

    let cdata = tempfile::tempdir().unwrap();
    // The parent's operator token is never stored in a child's link.
    let refused = cli(
        &purl,
        Some(&ptoken),
        &[
            "replica",
            "join",
            "--data",
            cdata.path().to_str().unwrap(),
            "--parent",
            &purl,
            "--node-id",
            &node_id,
        ],
    );
    assert!(!refused.status.success(), "joined with an operator token");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("replica token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!cdata.path().join("state/parent.json").exists());
    let joined = ok(
        &purl,
        Some(&ctoken),
        &[
            "replica",
            "join",
            "--data",
            cdata.path().to_str().unwrap(),
            "--parent",
            &purl,
            "--node-id",
            &node_id,
        ],
    );
    assert!(joined.contains(&node_id), "{joined}");
    let (_child, curl, _) = server(cdata.path(), &["--checkin-interval", "1"]);
    // The child took the registered id.
    let version: serde_json::Value =
        serde_json::from_str(&ok(&curl, None, &["replica", "list", "--json"])).unwrap();
    assert_eq!(version, serde_json::json!([]));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&ok(&purl, None, &["replica", "list", "--json"])).unwrap();
        let r = &list[0];
        if r["url"] == curl.as_str() {
            assert_eq!(r["node_id"], node_id.as_str());
            assert_eq!(r["status"], "running");
            assert_eq!(r["mac"], "52:54:00:12:34:56");
            assert!(!list.to_string().contains("apl_"));
            break;
        }
        assert!(Instant::now() < deadline, "child never checked in: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = ok(&purl, None, &["replica", "list"]);
    assert!(text.contains("child") && text.contains(&node_id), "{text}");
    // Removing revokes: the child's next check-in is refused.
    ok(
        &purl,
        Some(&ptoken),
        &["replica", "remove", &node_id, "--yes"],
    );
    let o = cli(&purl, Some(&ctoken), &["replica", "list"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).lines().count() == 1);
}
