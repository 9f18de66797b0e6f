//! The shipped image boots under OVMF in QEMU, reports the release it was
//! built from, and powers off on request. Needs `target/appliance/` from
//! `cargo xtask image` (which `cargo xtask test` runs first).
//!
//! It boots the way a bare QEMU command line does: one vCPU, no
//! `virtio-rng` device, so under TCG (no RDRAND) the guest's random pool
//! stays uninitialized for minutes. The network and the API must not wait
//! for it (they once did: ~410 s); writes are refused (503) until the
//! first token exists; the second boot of the same disk credits the seed
//! the first one saved and has its pool at once. There, the web console
//! is opened once in headless Chromium through the forwarded API port: it
//! logs in with the first token and draws the overview of the booted node
//! (a screenshot lands in `target/console-screenshots/qemu-overview.png`).

use std::time::{Duration, Instant};

use builder::Digest;
use integration_tests::qemu::{Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

/// How long the API may take to answer: a healthy boot takes well under a
/// minute under TCG; one that waits for the random pool takes minutes.
const API_UP: Duration = Duration::from_secs(150);
/// How long the kernel may take to initialize its pool without an RNG.
const POOL_READY: Duration = Duration::from_secs(1200);
const WAITING: &str = "waiting for the kernel's random pool";

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

fn boot(disk: &std::path::Path, dir: &std::path::Path, port: u16) -> Vm {
    Vm::boot(&VmConfig {
        disk: disk.to_path_buf(),
        snapshot: false,
        memory_mb: 1024,
        api_port: port,
        dir: dir.to_path_buf(),
        extra: vec![],
        rng: false,
        cpus: 1,
        guestfwd: vec![],
    })
    .unwrap()
}

/// The console of the booted appliance, through the forwarded port, as a
/// person opens it: the login form, the token, the overview of this node.
fn console_overview(port: u16, token: &str, node_id: &str, release: &str) {
    use integration_tests::webdriver::Driver;
    const T: Duration = Duration::from_secs(60);
    let driver = Driver::start().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let s = driver.session(profile.path(), 1280, 900).unwrap();
    s.goto(&format!("http://127.0.0.1:{port}/")).unwrap();
    let input = s.wait("#token", T).unwrap();
    s.type_text(&input, token).unwrap();
    s.click(&s.find("#login button[type=submit]").unwrap())
        .unwrap();
    s.wait("main[data-page='overview'][data-ready]", T).unwrap();
    s.wait_text("#node-id", node_id, T).unwrap();
    let hex = release.trim_start_matches("sha256:");
    s.wait_text("#release", &hex[..12], T).unwrap();
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("console-screenshots");
    let p = s.screenshot(&dir.join("qemu-overview.png")).unwrap();
    eprintln!("screenshot: {}", p.display());
}

fn power_off(vm: &mut Vm, port: u16, token: &str) {
    let r = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, token).unwrap();
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

#[test]
fn appliance_boots_under_ovmf_without_an_rng_reports_its_release_and_powers_off() {
    let dir = image_dir();
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    let release = Digest::of(&manifest).to_string();
    let work = tempfile::tempdir().unwrap();
    // A copy of the disk (sparse), so the second boot sees what the first
    // one wrote.
    let disk = work.path().join("appliance.img");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(dir.join("appliance.img"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success(), "cp failed");
    let port = free_port();
    let mut vm = boot(&disk, &work.path().join("boot1"), port);
    let r = vm
        .wait_http("/api/v1/version", API_UP)
        .unwrap_or_else(|e| panic!("the API must not wait for the random pool: {e}"));
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

    // Writes need the token printed once on the console at first start;
    // while it waits for the random pool they are refused with 503, and
    // never let through.
    let r = http::post(port, "/api/v1/power", r#"{"action":"poweroff"}"#).unwrap();
    if vm.first_token().is_none() {
        assert_eq!(r.status, 503, "power before the first token: {}", r.body);
        assert!(r.body.contains("no_token_yet"), "{}", r.body);
        assert!(
            vm.serial().contains(WAITING),
            "the console does not say what it waits for:\n{}",
            vm.serial()
        );
    } else {
        assert_eq!(r.status, 401, "power without a token: {}", r.body);
    }
    let t = Instant::now();
    let token = loop {
        if let Some(t) = vm.first_token() {
            break t;
        }
        assert!(
            t.elapsed() < POOL_READY,
            "no first API token on the console after {POOL_READY:?}:\n{}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!("first token after {:?} more", t.elapsed());
    let r = http::post(port, "/api/v1/power", r#"{"action":"poweroff"}"#).unwrap();
    assert_eq!(r.status, 401, "power without a token: {}", r.body);
    power_off(&mut vm, port, &token);

    // Second boot of the same disk: the seed saved by the first boot is
    // credited before the network, nothing waits, and the token still works.
    let mut vm = boot(&disk, &work.path().join("boot2"), port);
    vm.wait_http("/api/v1/version", API_UP).unwrap();
    let serial = vm.serial();
    assert!(
        serial.contains("appliance: random seed credited"),
        "the saved seed was not credited:\n{serial}"
    );
    assert!(
        !serial.contains(WAITING),
        "the second boot waited for the random pool:\n{serial}"
    );
    assert!(
        vm.first_token().is_none(),
        "a second first token:\n{serial}"
    );
    let node_id = json_field(&v, "node_id").as_str().unwrap();
    console_overview(port, &token, node_id, &release);
    power_off(&mut vm, port, &token);
}
