//! BMC passwords at rest: the real `appliance serve` seals a system's
//! `power.password` with its node key before the inventory stores it.
//! Stock git reads the inventory repository and finds only ciphertext; the
//! key is 0600 in node state; the API shows the placeholder; pointing the
//! system at another BMC without the password again is refused.

mod common;
use common::{bin, server};

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    bin()
        .args(["--url", url, "--token", token])
        .args(args)
        .env_remove("APPLIANCE_URL")
        .env_remove("APPLIANCE_TOKEN")
        .env_remove("APPLIANCE_CA")
        .stdin(Stdio::null())
        .output()
        .unwrap()
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

/// Everything stock git can show of the repository: every commit's patch.
fn git_history(repo: &Path) -> String {
    ok(Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["log", "-p", "--all", "--format=%H %s"])
        .output()
        .unwrap())
}

#[test]
fn bmc_passwords_are_sealed_in_the_inventory() {
    let data = tempfile::tempdir().unwrap();
    let (_srv, url, token) = server(data.path(), &["--sync-interval", "0"]);
    ok(cli(
        &url,
        &token,
        &["image", "add", "img1", "--set", "type=capture"],
    ));
    let power = r#"power={"type":"redfish","address":"https://192.0.2.10","user":"admin","password":"hunter2-secret"}"#;
    ok(cli(
        &url,
        &token,
        &["system", "add", "bmc1", "--image", "img1", "--set", power],
    ));
    // A second edit that leaves the password out keeps it (sealed).
    ok(cli(
        &url,
        &token,
        &["system", "edit", "bmc1", "--set", "hostname=bmc1"],
    ));

    let history = git_history(&data.path().join("inventory"));
    assert!(history.contains("systems/bmc1.json"), "{history}");
    assert!(!history.contains("hunter2-secret"), "clear password in git");
    assert!(history.contains("\"password\": \"sealed:v1:"), "{history}");
    {
        use std::os::unix::fs::PermissionsExt;
        let key = data.path().join("state/secrets.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&key).unwrap().len(), 32);
    }
    // The API shows the placeholder only.
    let shown = ok(cli(&url, &token, &["system", "show", "bmc1", "--json"]));
    assert!(
        shown.contains("********") && !shown.contains("sealed:"),
        "{shown}"
    );

    // Pointing it at another BMC without sending the password again is
    // refused: the sealed password is bound to the address it was given for.
    let moved = cli(
        &url,
        &token,
        &[
            "system",
            "edit",
            "bmc1",
            "--set",
            r#"power={"type":"redfish","address":"https://198.51.100.66","user":"admin"}"#,
        ],
    );
    assert!(!moved.status.success(), "moved without the password");
    let err = String::from_utf8_lossy(&moved.stderr);
    assert!(err.contains("send power.password again"), "{err}");
    // With the password it is sealed anew for the new address.
    ok(cli(
        &url,
        &token,
        &[
            "system",
            "edit",
            "bmc1",
            "--set",
            r#"power={"type":"redfish","address":"https://198.51.100.66","user":"admin","password":"hunter2-secret"}"#,
        ],
    ));
    assert!(!git_history(&data.path().join("inventory")).contains("hunter2-secret"));
}
