//! The shipped image boots under OVMF in QEMU, reports the release it was
//! built from, and powers off on request. Needs `target/appliance/` from
//! `cargo xtask image` (which `cargo xtask test` runs first).

use std::time::Duration;

use builder::Digest;
use integration_tests::qemu::{Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

fn image_dir() -> std::path::PathBuf {
    let dir = workspace_root().join("target/appliance");
    assert!(
        dir.join("appliance.img").exists() && dir.join("manifest.json").exists(),
        "{} has no appliance.img/manifest.json: run `cargo xtask image` (cargo xtask test does)",
        dir.display()
    );
    dir
}

fn json_field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    v.get(k).unwrap_or_else(|| panic!("no {k:?} in {v}"))
}

#[test]
fn appliance_boots_under_ovmf_reports_its_release_and_powers_off() {
    let dir = image_dir();
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    let release = Digest::of(&manifest).to_string();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut vm = Vm::boot(&VmConfig {
        disk: dir.join("appliance.img"),
        snapshot: true,
        memory_mb: 1024,
        api_port: port,
        dir: work.path().to_path_buf(),
        extra: vec![],
    })
    .unwrap();
    let r = vm
        .wait_http("/api/v1/version", Duration::from_secs(240))
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    assert_eq!(
        json_field(&v, "release").as_str(),
        Some(release.as_str()),
        "{v}"
    );
    assert!(
        json_field(&v, "node_id")
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{v}"
    );
    let degraded = json_field(&v, "degraded").as_array().unwrap();
    assert!(
        degraded.is_empty(),
        "a healthy boot reports no degraded state: {v}\nserial:\n{}",
        vm.serial()
    );
    let serial = vm.serial();
    for marker in [
        "appliance: init started",
        "appliance: data mounted",
        "appliance: network up",
    ] {
        assert!(
            serial.contains(marker),
            "{marker:?} not on the console:\n{serial}"
        );
    }

    // Writes need the token printed once on the console at first start.
    let r = http::post(port, "/api/v1/power", r#"{"action":"poweroff"}"#).unwrap();
    assert_eq!(r.status, 401, "power without a token: {}", r.body);
    let token = vm
        .first_token()
        .unwrap_or_else(|| panic!("no first API token on the console:\n{}", vm.serial()));
    let r = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, &token).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let st = vm.wait_exit(Duration::from_secs(60));
    assert!(
        st.is_some(),
        "QEMU did not exit after poweroff; serial:\n{}",
        vm.serial()
    );
    assert!(
        vm.serial().contains("appliance: powering off"),
        "{}",
        vm.serial()
    );
}
