//! A host appliance serving a Debian 12 apt mirror of the host's Debian
//! archive on a loopback port: what the OS install test and
//! `cargo xtask bench install` install from. Its data directory is
//! `target/osinstall-mirror`, kept between runs (a later run only checks
//! the upstream Release); the first API token is kept beside it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{free_port, workspace_root};

/// The static appliance binary `cargo xtask image` builds.
pub fn appliance_bin() -> PathBuf {
    let bin = workspace_root().join("target/static/appliance");
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask image`",
        bin.display()
    );
    bin
}

/// Run the appliance CLI against `url`; its stdout, or a panic with its
/// output.
pub fn cli(url: &str, token: &str, args: &[&str]) -> String {
    let o = Command::new(appliance_bin())
        .args(["--url", url, "--token", token])
        .args(args)
        .output()
        .expect("running the appliance CLI");
    assert!(
        o.status.success(),
        "appliance {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The running host mirror (stopped on drop).
pub struct HostMirror {
    child: Child,
    pub port: u16,
    pub token: String,
    /// Seconds the sync took.
    pub sync_secs: f64,
}

impl Drop for HostMirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostMirror {
    /// Start it and sync repo `bookworm` (main, amd64) from the Debian
    /// archive in the host's apt sources.
    pub fn start() -> Result<HostMirror, String> {
        let mut m = HostMirror::serve(&workspace_root().join("target/osinstall-mirror"))?;
        let (url, token) = (m.url(), m.token.clone());
        let sources = bundle::apt::host_sources().map_err(|e| e.to_string())?;
        let (upstream, suite) = bundle::apt::debian_archive(&sources).map_err(|e| e.to_string())?;
        if suite != "bookworm" {
            return Err(format!("the host's Debian suite is {suite}; the install test installs Debian 12 (bookworm)"));
        }
        if !cli(&url, &token, &["repo", "list"]).contains("bookworm") {
            cli(
                &url,
                &token,
                &[
                    "repo",
                    "add",
                    "bookworm",
                    "--breed",
                    "apt",
                    "--mirror",
                    &upstream,
                    "--set",
                    r#"suites=["bookworm"]"#,
                    "--set",
                    r#"components=["main"]"#,
                    "--set",
                    r#"arches=["amd64"]"#,
                    "--set",
                    r#"packages=["less"]"#,
                ],
            );
        }
        let t = Instant::now();
        cli(&url, &token, &["repo", "sync", "bookworm"]);
        m.sync_secs = t.elapsed().as_secs_f64();
        Ok(m)
    }

    /// `appliance serve` on a loopback port with the data directory
    /// `data`, kept between runs (its first API token is kept beside it,
    /// in `test-token`; without that file the directory is started
    /// afresh). Repos and syncs are the caller's.
    pub fn serve(data: &Path) -> Result<HostMirror, String> {
        let token_file = data.join("test-token");
        if !token_file.exists() {
            // Its first token is lost: start afresh (it prints a new one).
            let _ = std::fs::remove_dir_all(data);
        }
        std::fs::create_dir_all(data).map_err(|e| e.to_string())?;
        let port = free_port();
        let mut child = Command::new(appliance_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        // Stopped however this returns, until it is handed over.
        struct Guard(Option<Child>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(mut c) = self.0.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let mut guard = Guard(Some(child));
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("the host mirror exited before listening".into());
            }
            if line.contains("first API token") {
                let t = line.split_whitespace().last().unwrap_or_default();
                std::fs::write(&token_file, t).map_err(|e| e.to_string())?;
            }
            // The first start prints its token after "listening on".
            if line.starts_with("listening on") && token_file.exists()
                || line.contains("first API token")
            {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let token = std::fs::read_to_string(&token_file).map_err(|e| {
            format!(
                "{}: {e} (remove {} to start afresh)",
                token_file.display(),
                data.display()
            )
        })?;
        Ok(HostMirror {
            child: guard.0.take().expect("still held"),
            port,
            token: token.trim().to_owned(),
            sync_secs: 0.0,
        })
    }

    /// The appliance CLI against this mirror.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(&self.url(), &self.token, args)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
