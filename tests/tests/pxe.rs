//! PXE with QEMU's own firmware as the client: VM A boots the appliance
//! image and serves its second NIC; VM B, with a blank disk on the same
//! unix-socket wire, boots from the network (SeaBIOS with QEMU's iPXE
//! option ROM, and OVMF), gets iPXE, its per-MAC script, the appliance's
//! kernel and initramfs in agent mode, and checks in with A. Asserted
//! through A's API.

use std::time::{Duration, Instant};

use integration_tests::qemu::{boot_blank, Firmware, Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

fn image() -> std::path::PathBuf {
    let p = workspace_root().join("target/appliance/appliance.img");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask image` (cargo xtask test does)",
        p.display()
    );
    p
}

fn wait_for_agent(a: &mut Vm, b: &Vm, mac: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http::get(a.api_port, "/api/v1/agents") {
            if r.status == 200 && r.body.contains(mac) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{mac} did not check in within {timeout:?}\n--- A (server) serial:\n{}\n--- B (client) serial:\n{}\n--- events:\n{}",
            a.serial(),
            b.serial(),
            http::get(a.api_port, "/api/v1/events?limit=200").map(|r| r.body).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn pxe_boot(firmware: Firmware, mac: &str) {
    let work = tempfile::tempdir().unwrap();
    let wire = work.path().join("wire.sock");
    let port = free_port();
    let cfg = VmConfig::new(image(), port, work.path().join("a")).wire(
        "prov",
        &wire,
        true,
        "52:54:00:77:00:01",
        None,
    );
    let mut a = Vm::boot(&cfg).unwrap();
    a.wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap();
    let token = a
        .first_token()
        .unwrap_or_else(|| panic!("no first API token on A's console:\n{}", a.serial()));
    let r = http::post_auth(
        port,
        "/api/v1/networks",
        r#"{"iface":"eth1","cidr":"10.77.0.1/24","mode":"authoritative","pool":"10.77.0.100-10.77.0.199"}"#,
        &token,
    )
    .unwrap();
    assert!(
        r.status == 200 || r.status == 201,
        "serving the provisioning network: {} {}",
        r.status,
        r.body
    );
    let r = http::get(port, "/api/v1/networks").unwrap();
    assert!(
        r.body.contains("eth1") && r.body.contains("10.77.0.1/24"),
        "{}",
        r.body
    );

    let b = boot_blank(firmware, &wire, mac, 4 << 30, &work.path().join("b")).unwrap();
    wait_for_agent(&mut a, &b, mac, Duration::from_secs(420));

    // Every step is in the event log for B's MAC.
    let ev = http::get(port, &format!("/api/v1/events?mac={mac}&limit=500"))
        .unwrap()
        .body;
    // QEMU's option ROM is iPXE, so under SeaBIOS the client asks for its
    // script at once; OVMF's own PXE client chainloads ipxe.efi over TFTP.
    let mut kinds = vec![
        "dhcp.discover",
        "dhcp.ack",
        "http.ipxe",
        "http.file",
        "agent.checkin",
    ];
    if firmware == Firmware::Ovmf {
        kinds.push("tftp.transfer");
    }
    for kind in kinds {
        assert!(
            ev.contains(&format!("\"kind\":\"{kind}\"")),
            "no {kind} event for {mac}: {ev}"
        );
    }
    let agents = http::get(port, "/api/v1/agents").unwrap().body;
    let v: serde_json::Value = serde_json::from_str(&agents).unwrap();
    let rec = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["mac"] == mac)
        .unwrap();
    let expected_fw = if firmware == Firmware::Ovmf {
        "uefi"
    } else {
        "bios"
    };
    assert_eq!(rec["hardware"]["firmware"], expected_fw, "{rec}");
    assert_eq!(
        rec["hardware"]["disks"][0]["size_bytes"],
        4u64 << 30,
        "{rec}"
    );
    drop(b);
    let _ = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, &token);
    a.wait_exit(Duration::from_secs(60));
}

#[test]
fn blank_machine_pxe_boots_with_seabios_and_checks_in() {
    pxe_boot(Firmware::SeaBios, "52:54:00:77:00:b1");
}

#[test]
fn blank_machine_pxe_boots_with_ovmf_and_checks_in() {
    pxe_boot(Firmware::Ovmf, "52:54:00:77:00:e1");
}
