//! The Debian installer (preseed path) against the appliance's own mirror,
//! as far as this machine's package source allows (it answers 404 for
//! the installer's `.udeb`s, all but the kernel's).
//!
//! 1. Host: a partial mirror of the Debian archive named in the host's apt
//!    sources (`bookworm`, `installer`: the debian-installer index and the
//!    signed `debian-installer-12-netboot-amd64` package), synced by the
//!    host's `appliance serve` (`integration_tests::mirror::HostMirror`)
//!    into `cache/di-mirror/` (≈300 MB the first time; later runs fetch
//!    only what changed) and served from there on loopback.
//! 2. VM A boots the shipped image; its uplink may reach that server only
//!    (`restrict=on` + `guestfwd` 10.0.2.100:8080). A syncs the mirror from
//!    it (verifying `InRelease` with Debian's key from its bundle: a
//!    mirror of a mirror), imports the installer (`POST
//!    /api/v1/repos/deb12/import`: kernel ABI checked against the udebs'),
//!    and serves PXE on its provisioning wire for a system with the
//!    preseed profile (`console=ttyS0`).
//! 3. VM B, blank, under OVMF: PXE → iPXE → the d-i kernel and initrd from
//!    A → the rendered preseed → reports `start` (early_command, wget) →
//!    accepts A's mirror (Release + Release.gpg, the architecture) →
//!    "Loading additional components" → fails retrieving the first udeb
//!    upstream did not serve ("Download installer components"), read from
//!    B's serial console: that udeb is on A's list of missing ones. That is
//!    where this test stops: the host's archive has no more of the
//!    installer to give.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::mirror::HostMirror;
use integration_tests::qemu::{boot_blank, Firmware, Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

const REPO: &str = "deb12";

fn image() -> PathBuf {
    let p = workspace_root().join("target/appliance/appliance.img");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask image` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The Debian archive of the host's apt sources.
fn archive_url() -> String {
    let sources = bundle::apt::host_sources().expect("reading the host's apt sources");
    bundle::apt::debian_archive(&sources)
        .expect("a Debian archive in the host's apt sources")
        .0
}

fn wait_sync(port: u16, token: &str, what: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = http::request_with_token(
            port,
            "GET",
            &format!("/api/v1/repos/{REPO}/sync"),
            None,
            Some(token),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        match v["state"].as_str() {
            Some("done") => return v,
            Some("failed") => panic!("{what}: sync failed: {}", v["job"]["error"]),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{what}: sync not done within {timeout:?}: {v}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn repo_json(mirror: &str) -> String {
    serde_json::json!({"name": REPO, "breed": "apt", "mirror": mirror,
        "suites": ["bookworm"], "components": ["main"], "arches": ["amd64"],
        "installer": true})
    .to_string()
}

/// The host's mirror: `appliance serve` on `cache/di-mirror` (the shared
/// harness, kept between runs: a later sync fetches only what changed
/// upstream), repo `deb12` synced from the host's archive.
fn host_mirror() -> HostMirror {
    let m = HostMirror::serve(&workspace_root().join("cache/di-mirror")).expect("the host mirror");
    let r = http::request_with_token(
        m.port,
        "GET",
        &format!("/api/v1/repos/{REPO}"),
        None,
        Some(&m.token),
    )
    .unwrap();
    if r.status == 404 {
        let r = http::post_auth(
            m.port,
            "/api/v1/repos",
            &repo_json(&archive_url()),
            &m.token,
        )
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = http::post_auth(m.port, &format!("/api/v1/repos/{REPO}/sync"), "", &m.token).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let v = wait_sync(m.port, &m.token, "host", Duration::from_secs(1800));
    assert!(v["packages"].as_u64().unwrap() > 50, "{v}");
    m
}

#[test]
fn the_debian_installer_boots_from_the_appliance_and_accepts_its_mirror() {
    let upstream = host_mirror();
    // The mirror really is served: its InRelease.
    let r = http::get(
        upstream.port,
        &format!("/repos/{REPO}/dists/bookworm/InRelease"),
    )
    .unwrap();
    assert!(
        r.status == 200 && r.body.contains("Codename: bookworm"),
        "{} {}",
        r.status,
        &r.body[..r.body.len().min(300)]
    );

    let work = tempfile::tempdir().unwrap();
    let wire = work.path().join("wire.sock");
    let port = free_port();
    let mut cfg = VmConfig::new(image(), port, work.path().join("a")).wire(
        "prov",
        &wire,
        true,
        "52:54:00:d1:00:01",
        None,
    );
    cfg.guestfwd.push(("10.0.2.100:8080".into(), upstream.port));
    let mut a = Vm::boot(&cfg).unwrap();
    a.wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap();
    let token = a
        .first_token()
        .unwrap_or_else(|| panic!("no first API token on A's console:\n{}", a.serial()));
    let api = |method: &str, path: &str, body: Option<&str>| {
        http::request_within(
            port,
            method,
            path,
            body,
            Some(&token),
            Duration::from_secs(600),
        )
        .unwrap()
    };

    // A mirrors the host's mirror (verified again with Debian's key).
    let r = api(
        "POST",
        "/api/v1/repos",
        Some(&repo_json(&format!("http://10.0.2.100:8080/repos/{REPO}"))),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api("POST", &format!("/api/v1/repos/{REPO}/sync"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let st = wait_sync(port, &token, "A", Duration::from_secs(600));
    // Upstream serves no udebs: recorded, listed, not fatal.
    let missing = st["missing"].as_array().expect("a missing list");
    assert!(
        missing.len() > 20
            && missing
                .iter()
                .all(|m| m["path"].as_str().unwrap().ends_with(".udeb")),
        "{st}"
    );
    // The installer's own components are among them (the kernel's udebs,
    // from linux-signed-amd64, are served there and so mirrored).
    assert!(
        missing
            .iter()
            .any(|m| m["package"].as_str().unwrap().starts_with("anna_")),
        "{st}"
    );

    // The installer's kernel and initrd from the signed netboot package.
    let r = api(
        "POST",
        &format!("/api/v1/repos/{REPO}/import"),
        Some(r#"{"name":"deb12-di"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let imp: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let release = imp["report"]["kernel_release"].as_str().unwrap();
    assert!(
        release.ends_with("-amd64")
            && imp["report"]["udeb_abis"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == release),
        "{imp}"
    );
    assert_eq!(imp["distro"]["breed"], "debian", "{imp}");

    // The provisioning wire and a system that installs with the preseed.
    let r = api(
        "POST",
        "/api/v1/networks",
        Some(
            r#"{"iface":"eth1","cidr":"10.77.0.1/24","mode":"authoritative","pool":"10.77.0.100-10.77.0.199"}"#,
        ),
    );
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    let mac = "52:54:00:d1:00:b1";
    let system = serde_json::json!({
        "name": "target1", "profile": "deb12-di", "netboot": true,
        "interfaces": [{"name": "eth0", "mac": mac}],
        // The imported profile carries netcfg/no_default_route=true too;
        // the provisioning network's DHCP names no DNS server, so netcfg
        // would ask for one before the preseed loads.
        "kernel_options": "console=ttyS0,115200n8 netcfg/no_default_route=true netcfg/get_nameservers=10.77.0.1",
        "variables": {"root_password_hash": "$6$abc$xyz", "user_name": "ops",
            "user_password_hash": "$6$abc$xyz",
            "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey ops@lab"]}
    });
    let r = api("POST", "/api/v1/systems", Some(&system.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    let preseed = api("GET", "/api/v1/systems/target1/autoinstall", None);
    assert!(
        preseed.status == 200
            && preseed
                .body
                .contains(&format!("d-i mirror/http/directory string /repos/{REPO}")),
        "{} {}",
        preseed.status,
        preseed.body
    );

    let b = boot_blank(Firmware::Ovmf, &wire, mac, 8 << 30, &work.path().join("b")).unwrap();
    // The boundary of this machine's package source: d-i checks A's
    // mirror (choose-mirror: Release, its signature, the architecture),
    // anna reads the signed debian-installer index from it and starts
    // "Loading additional components"; the first udeb it retrieves is one
    // upstream answered 404 for (recorded missing by A's sync), so A
    // answers 404 too and d-i stops at "Download installer components".
    // With an archive that serves the udebs, d-i would go on from there.
    const FAILED: &str = "Download installer components";
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut started = false;
    let serial = loop {
        if !started {
            // The preseed's early_command (d-i's own wget) reported start.
            let s = api(
                "GET",
                &format!("/api/v1/events?mac={mac}&kind=install.status&limit=50"),
                None,
            );
            started = s.body.contains("\"event\":\"start\"");
        }
        let serial = b.serial();
        if started && serial.contains(FAILED) {
            break serial;
        }
        assert!(
            Instant::now() < deadline,
            "the installer did not reach the missing udebs (\"{FAILED}\"; start reported: {started})\n--- B serial (last 6000 bytes):\n{}\n--- events:\n{}",
            &serial[serial.len().saturating_sub(6000)..],
            api("GET", &format!("/api/v1/events?mac={mac}&limit=100"), None).body
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let tail = &serial[serial.len().saturating_sub(6000)..];
    let at = |needle: &str| {
        serial
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} on B's serial console:\n{tail}"))
    };
    // In order: the mirror checked and accepted, components loading, the
    // download failure.
    let checked = at("Checking the Debian archive mirror");
    let loading = at("Loading additional components");
    let failed = at(FAILED);
    assert!(checked < loading && loading < failed, "{tail}");
    for refused in ["Architecture not supported", "Bad archive mirror"] {
        assert!(!serial.contains(refused), "d-i refused A's mirror: {tail}");
    }
    // What anna was retrieving when the download failed is a udeb A's
    // sync recorded as missing (upstream's 404), not one A has.
    let retrieving = serial[loading..failed]
        .rmatch_indices("Retrieving ")
        .next()
        .map(|(i, r)| &serial[loading + i + r.len()..failed])
        .unwrap_or_else(|| panic!("no \"Retrieving …\" before the failure: {tail}"));
    let component: String = retrieving
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-+.".contains(*c))
        .collect();
    assert!(
        !component.is_empty()
            && missing.iter().any(|m| m["package"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{component}_"))),
        "d-i failed retrieving {component:?}, which A's sync did not record as missing: {st}\n{tail}"
    );
    eprintln!("d-i accepted A's mirror and stopped retrieving {component} (missing upstream)");
    let ev = api("GET", &format!("/api/v1/events?mac={mac}&limit=500"), None).body;
    for kind in ["dhcp.ack", "tftp.transfer", "http.ipxe", "install.status"] {
        assert!(
            ev.contains(&format!("\"kind\":\"{kind}\"")),
            "no {kind} event for {mac}: {ev}"
        );
    }
    drop(b);
    let _ = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, &token);
    a.wait_exit(Duration::from_secs(60));
}
