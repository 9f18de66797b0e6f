//! Runs `appliance init` as PID 1 of fresh PID, mount and network namespaces
//! (needs root: CI runs as root) and checks the console markers, the API
//! inside the namespace, and a clean power-off requested through the API.
//!
//! The network namespace has only `lo`, so no DHCP traffic leaves it. The
//! kernel ends a PID namespace whose init calls `reboot(POWER_OFF)` with
//! SIGINT, which `unshare` passes on.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills `unshare` (and with `--kill-child` the namespace) if a check fails.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

#[test]
fn init_in_namespaces_serves_and_powers_off_cleanly() {
    // CI runs as root with these tools; a missing one is a failure, not a skip.
    assert!(
        rustix::process::geteuid().is_root() && have("unshare") && have("curl"),
        "this test needs root, unshare and curl (see xtask/debian-packages.txt)"
    );
    let data_existed = Path::new("/data").exists();
    let log = tempfile::NamedTempFile::new().unwrap();
    // One open file for both streams, so they share the write offset.
    let out = log.reopen().unwrap();
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--net",
            "--propagation",
            "private",
        ])
        .arg(env!("CARGO_BIN_EXE_appliance"))
        .arg("init")
        .env("APPLIANCE_INIT_KEEP_STDIO", "1")
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let unshare_pid = child.id();
    let _guard = KillOnDrop(unshare_pid);

    let wait_for = |needle: &str, secs: u64| -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(log.path()).unwrap();
            if text.contains(needle) {
                return text;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "no {needle:?} in:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("appliance: init started", 10);
    // The data partition wait (10 s) runs before the server starts.
    let text = wait_for("appliance: serving on 0.0.0.0:80", 30);
    assert!(text.contains("appliance: data on tmpfs"), "{text}");

    // The namespace's PID 1 is the only child of unshare.
    let children =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .unwrap();
    let init_pid = children.split_whitespace().next().unwrap().to_owned();
    let curl = |args: &[&str]| -> String {
        let out = Command::new("nsenter")
            .args(["-t", &init_pid, "-n", "curl", "-sS", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let version = curl(&["http://127.0.0.1:80/api/v1/version"]);
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    let degraded = v["degraded"].to_string();
    assert!(degraded.contains("appliance-data"), "{degraded}");
    assert!(v["release"].is_null());

    let log_text = std::fs::read_to_string(log.path()).unwrap();
    let token = log_text
        .lines()
        .find_map(|l| l.split("first API token (shown once, keep it): ").nth(1))
        .unwrap_or_else(|| panic!("no first token in the log:\n{log_text}"))
        .trim()
        .to_owned();
    let auth = format!("authorization: Bearer {token}");
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &auth,
        "-XPOST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"action":"poweroff"}"#,
        "http://127.0.0.1:80/api/v1/power",
    ]);
    assert_eq!(code, "202");
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("appliance: powering off"), "{text}");
    assert!(text.contains("server stopped"), "{text}");
    // unshare re-raises the signal that ended the namespace's init.
    use std::os::unix::process::ExitStatusExt;
    let by_sigint = status.signal() == Some(2) || status.code() == Some(130);
    assert!(by_sigint, "{status:?}\n{text}");
    if !data_existed {
        let _ = std::fs::remove_dir("/data");
    }
}
