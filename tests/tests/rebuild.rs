//! The appliance rebuilds its own image, bit for bit, from the bundle on its
//! data partition and with no network: once on the host (`appliance
//! rebuild` against the data partition's files, pulled out with `debugfs
//! rdump`; fast to debug) and once inside the booted image through
//! `POST /api/v1/release/rebuild`. Both must give the disk digest and the
//! release of `target/appliance/` (from `cargo xtask image`, which `cargo
//! xtask test` runs first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use builder::Digest;
use integration_tests::qemu::{Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

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

fn host_release(dir: &Path) -> String {
    Digest::of(&std::fs::read(dir.join("manifest.json")).unwrap()).to_string()
}

/// Copy the data partition out of the image and `debugfs rdump` its
/// `release/` and `bundle/` into `data`.
fn extract_data_partition(dir: &Path, work: &Path, data: &Path) {
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
    let st = Command::new("dd")
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
        let o = Command::new("debugfs")
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

fn appliance_bin() -> PathBuf {
    let bin = workspace_root().join("target/x86_64-unknown-linux-gnu/release/appliance");
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
    extract_data_partition(&dir, work.path(), &data);
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
        r["rebuilt_release"].as_str(),
        Some(host_release(&dir).as_str()),
        "{r}"
    );
    assert_eq!(r["booted_release"], r["rebuilt_release"], "{r}");
    assert_eq!(r["identical"], true, "{r}");
    for f in ["manifest.json", "manifest.json.sig", "appliance.img.sha256"] {
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

#[test]
fn booted_appliance_rebuilds_itself_bit_for_bit_through_the_api() {
    let dir = image_dir();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut vm = Vm::boot(&VmConfig::new(dir.join("appliance.img"), port, work.path())).unwrap();
    vm.wait_http("/api/v1/version", Duration::from_secs(240))
        .unwrap();
    let r = http::request(port, "GET", "/api/v1/release", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v["release"].as_str(),
        Some(host_release(&dir).as_str()),
        "{v}"
    );
    assert!(v["cached"].is_null(), "{v}");

    let r = http::post(port, "/api/v1/release/rebuild", "{}").unwrap();
    assert_eq!(r.status, 401, "a rebuild without a token: {}", r.body);
    let token = vm
        .first_token()
        .unwrap_or_else(|| panic!("no first API token on the console:\n{}", vm.serial()));
    // Under TCG the rebuild takes minutes (it hashes the whole 4 GiB disk).
    let r = http::request_within(
        port,
        "POST",
        "/api/v1/release/rebuild",
        Some("{}"),
        Some(&token),
        Duration::from_secs(1800),
    )
    .unwrap_or_else(|e| panic!("rebuild request: {e}\nserial:\n{}", vm.serial()));
    assert_eq!(r.status, 200, "{}\nserial:\n{}", r.body, vm.serial());
    let report: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        report["disk"].as_str(),
        Some(host_disk_digest(&dir).as_str()),
        "{report}"
    );
    assert_eq!(
        report["rebuilt_release"].as_str(),
        Some(host_release(&dir).as_str()),
        "{report}"
    );
    assert_eq!(report["identical"], true, "{report}");

    let r = http::request(port, "GET", "/api/v1/release", None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["cached"]["disk"], report["disk"], "{v}");
}
