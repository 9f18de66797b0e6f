//! Helpers shared by the tests that run the `appliance` binary.
#![allow(dead_code)] // each test crate uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
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
