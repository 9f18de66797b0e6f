//! Shared harness for the integration tests in `tests/tests/` and for
//! `cargo xtask qemu`: booting images in QEMU under OVMF, and a tiny HTTP
//! client for talking to a booted appliance through a loopback port.

pub mod fleet;
pub mod http;
pub mod qemu;

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}
