//! The appliance rebuilds its own image, bit for bit, from the bundle on its
//! data partition and with no network: once on the host (`appliance
//! rebuild` against the data partition's files, pulled out with `debugfs
//! rdump`). It must give the disk digest and the release of
//! `target/appliance/` (from `cargo xtask image`, which `cargo xtask test`
//! runs first). The same rebuild inside a booted image, compared from
//! outside through `GET /api/v1/release`, is part of the fleet test
//! (`tests/fleet.rs`): every parent rebuilds before it serves its image.

use std::path::{Path, PathBuf};
use std::process::Command;

use builder::Digest;
use integration_tests::workspace_root;

fn image_dir() -> PathBuf {
    let dir = workspace_root().join("target/appliance");
    for f in ["appliance.img", "manifest.json", "manifest.json.sig"] {
        assert!(
            dir.join(f).exists(),
            "{} has no {f}: run `cargo xtask image` (cargo xtask test does)",
            dir.display()
        );
    }
    dir
}

/// `sha256:<hex>` from `appliance.img.sha256`.
fn host_disk_digest(dir: &Path) -> String {
    let sum = std::fs::read_to_string(dir.join("appliance.img.sha256")).unwrap();
    format!("sha256:{}", sum.split_whitespace().next().unwrap())
}

/// `sha256:<hex>` from `appliance.iso.sha256`.
fn host_iso_digest(dir: &Path) -> String {
    let sum = std::fs::read_to_string(dir.join("appliance.iso.sha256")).unwrap();
    format!("sha256:{}", sum.split_whitespace().next().unwrap())
}

fn host_release(dir: &Path) -> String {
    Digest::of(&std::fs::read(dir.join("manifest.json")).unwrap()).to_string()
}

fn appliance_bin() -> PathBuf {
    let bin = workspace_root().join("target/static/appliance");
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask image`",
        bin.display()
    );
    bin
}

#[test]
fn appliance_rebuild_on_the_host_from_the_data_partition_is_identical() {
    let dir = image_dir();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    integration_tests::extract_data_partition(&dir, work.path(), &data);
    let before = dir_listing(&data.join("bundle"));

    let out = work.path().join("out");
    let o = Command::new(appliance_bin())
        .args(["rebuild", "--json", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .env("http_proxy", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "appliance rebuild failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
    assert_eq!(
        r["disk"].as_str(),
        Some(host_disk_digest(&dir).as_str()),
        "{r}"
    );
    assert_eq!(
        r["iso"].as_str(),
        Some(host_iso_digest(&dir).as_str()),
        "the rebuilt ISO differs: {r}"
    );
    assert_eq!(
        r["rebuilt_release"].as_str(),
        Some(host_release(&dir).as_str()),
        "{r}"
    );
    assert_eq!(r["booted_release"], r["rebuilt_release"], "{r}");
    assert_eq!(r["identical"], true, "{r}");
    for f in [
        "manifest.json",
        "manifest.json.sig",
        "appliance.img.sha256",
        "appliance.iso.sha256",
    ] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(dir.join(f)).unwrap(),
            "{f} differs from target/appliance/{f}"
        );
    }
    // The bundle was only read; derived blobs went to the scratch store.
    assert_eq!(dir_listing(&data.join("bundle")), before);
    assert!(data.join("cache/scratch/blobs/sha256").is_dir());

    // A signature that does not cover the rebuilt manifest fails the
    // rebuild, names the problem, and leaves no output behind.
    let sig_path = data.join("release/manifest.sig");
    let mut sig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sig_path).unwrap()).unwrap();
    sig["manifest"] = serde_json::Value::String(Digest::of(b"another manifest").to_string());
    std::fs::write(&sig_path, serde_json::to_vec(&sig).unwrap()).unwrap();
    let out2 = work.path().join("out2");
    let o = Command::new(appliance_bin())
        .args(["rebuild", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a bad signature was accepted");
    assert!(
        err.contains("does not match") && err.contains("manifest.sig"),
        "{err}"
    );
    assert!(!out2.exists(), "a failed rebuild left {}", out2.display());
}

/// Every path below `dir` with its size, sorted.
fn dir_listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len()));
        }
    }
    out.sort();
    out
}
