//! Helpers shared by the tests that run the `appliance` binary.
#![allow(dead_code)] // each test crate uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `appliance` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
}

/// Starts `appliance serve` on a loopback port with `data` (and `extra`
/// arguments); returns it, its URL and the first token it printed.
pub fn server(data: &Path, extra: &[&str]) -> (Killed, String, String) {
    let child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    line.clear();
    out.read_line(&mut line).unwrap();
    let token = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(token.starts_with("apl_"), "{line}");
    (child, format!("http://{addr}"), token)
}

/// The `sushy-emulator` script: `$SUSHY_EMULATOR`, the workspace's
/// `target/peers/venv`, or `PATH`.
pub fn sushy_emulator() -> PathBuf {
    if let Some(p) = std::env::var_os("SUSHY_EMULATOR") {
        return p.into();
    }
    let venv =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers/venv/bin/sushy-emulator");
    if venv.exists() {
        return venv;
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("sushy-emulator"))
                .find(|c| c.is_file())
        })
        .expect(
            "sushy-emulator not found: run .ci/run or `python3 -m venv target/peers/venv && \
             target/peers/venv/bin/pip install -r xtask/python-packages.txt`",
        )
}

/// The Python interpreter of a script (its `#!` line).
pub fn python_of(script: &Path) -> PathBuf {
    let text = std::fs::read_to_string(script).unwrap();
    let first = text.lines().next().unwrap();
    let interp = first.trim_start_matches("#!").trim();
    // `#!/usr/bin/env python3` or `#!/path/python3`.
    interp.split_whitespace().last().unwrap().into()
}

/// A Redfish BMC: `sushy-emulator` (fake driver) on a loopback port over
/// HTTPS (self-signed) with Basic auth `admin`/`pa55word`, one system
/// `node0` that starts powered off. Returns it and its URL.
pub fn sushy(dir: &Path) -> (Killed, String) {
    let exe = sushy_emulator();
    let python = python_of(&exe);
    let hash = Command::new(&python)
        .args([
            "-c",
            "import bcrypt; print(bcrypt.hashpw(b'pa55word', bcrypt.gensalt()).decode())",
        ])
        .output()
        .unwrap();
    assert!(hash.status.success(), "{hash:?}");
    let htpasswd = dir.join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("admin:{}", String::from_utf8(hash.stdout).unwrap()),
    )
    .unwrap();
    let (cert, key) = (dir.join("bmc.crt"), dir.join("bmc.key"));
    let o = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=bmc.invalid", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .output()
        .expect("openssl (Debian openssl; xtask/debian-packages.txt)");
    assert!(o.status.success());
    let port = integration_tests::free_port();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.join("emulator.conf");
    std::fs::write(
        &config,
        format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_STATE_DIR = '{}'\n\
             SUSHY_EMULATOR_AUTH_FILE = '{}'\n\
             SUSHY_EMULATOR_SSL_CERT = '{}'\n\
             SUSHY_EMULATOR_SSL_KEY = '{}'\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '6d7e2f0c-0000-4000-8000-000000000001', \
             'name': 'node0', 'power_state': 'Off', 'external_notifier': False, \
             'nics': [{{'mac': '52:54:00:aa:bb:01', 'ip': '10.77.0.10'}}]}}]\n",
            state.display(),
            htpasswd.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let child = Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Killed(child), format!("https://127.0.0.1:{port}"))
}
