//! Shared harness for the integration tests in `tests/tests/` and for
//! `cargo xtask qemu`: booting images in QEMU under OVMF, and a tiny HTTP
//! client for talking to a booted appliance through a loopback port.

pub mod fleet;
pub mod http;
pub mod mirror;
pub mod qemu;
pub mod webdriver;

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

/// Copy the data partition out of the image and `debugfs rdump` its
/// `release/` and `bundle/` into `data`.
pub fn extract_data_partition(
    dir: &std::path::Path,
    work: &std::path::Path,
    data: &std::path::Path,
) {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let p = m["disk"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "appliance-data")
        .expect("an appliance-data partition");
    let (offset, size) = (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    assert_eq!((offset % (1 << 20), size % (1 << 20)), (0, 0));
    let part = work.join("data.ext4");
    let st = std::process::Command::new("dd")
        .arg(format!("if={}", dir.join("appliance.img").display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", "conv=sparse", "status=none"])
        .arg(format!("skip={}", offset >> 20))
        .arg(format!("count={}", size >> 20))
        .status()
        .unwrap();
    assert!(st.success(), "dd failed");
    std::fs::create_dir_all(data).unwrap();
    for d in ["release", "bundle"] {
        let o = std::process::Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /{d} {}", data.display()))
            .arg(&part)
            .output()
            .expect("running debugfs (e2fsprogs)");
        assert!(
            o.status.success() && data.join(d).is_dir(),
            "debugfs rdump /{d}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::remove_file(&part).unwrap();
}
