//! Air-gapped OS provisioning, end to end in QEMU: the appliance VM
//! mirrors Debian 12 (from a mirror of the host's Debian archive that a
//! host appliance serves on loopback, the only thing the VM can reach
//! besides its provisioning wire), and a blank machine under OVMF with
//! only the provisioning wire and an 8 GiB disk PXE-boots the agent,
//! installs Debian 12 from the appliance alone, reboots from its own disk
//! and reports its first boot. Then the host reads the target's disk:
//! `/etc/debian_version`, the inventory's hostname, the requested
//! packages (`dpkg-query` on the image's database), the SSH key,
//! `dpkg --audit` clean, `e2fsck -fn` and `sgdisk -v` clean.
//!
//! The install runs under TCG unless `APPLIANCE_QEMU_ACCEL` says
//! otherwise; each phase's seconds are printed (and are in the record).
//!
//! `OSINSTALL_FIRMWARE=seabios` runs the same test with a legacy-BIOS
//! target (QEMU's SeaBIOS and iPXE option ROM): GRUB for BIOS instead of
//! GRUB for UEFI. CI runs the UEFI target; `cargo xtask osinstall
//! --firmware seabios` runs this one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::mirror::{cli, HostMirror};
use integration_tests::qemu::{boot_machine, Firmware, Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZhY2VkZWFkYmVlZmNhZmVmYWNlZGVhZGJlZWZjYWZl test@appliance";

/// The target's firmware (`OSINSTALL_FIRMWARE`: `ovmf`, the default, or
/// `seabios`) and the GRUB package the install must give it.
fn firmware() -> (Firmware, &'static str) {
    match std::env::var("OSINSTALL_FIRMWARE").as_deref() {
        Err(_) | Ok("ovmf") => (Firmware::Ovmf, "grub-efi-amd64"),
        Ok("seabios") => (Firmware::SeaBios, "grub-pc"),
        Ok(other) => panic!("OSINSTALL_FIRMWARE={other:?}: expected ovmf or seabios"),
    }
}

/// The newest event id in the appliance's log.
fn last_event_id(port: u16, token: &str) -> u64 {
    let v = api(
        port,
        "GET",
        "/api/v1/events?order=newest&limit=1",
        "",
        token,
    );
    v["next"].as_u64().unwrap_or(0)
}

fn image() -> PathBuf {
    let p = workspace_root().join("target/appliance/appliance.img");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask image`",
        p.display()
    );
    p
}

fn api(port: u16, method: &str, path: &str, body: &str, token: &str) -> serde_json::Value {
    let body = (!body.is_empty()).then_some(body);
    let r = http::request_with_token(port, method, path, body, Some(token)).unwrap();
    assert!(
        r.status / 100 == 2,
        "{method} {path}: {} {}",
        r.status,
        r.body
    );
    serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null)
}

fn record(port: u16, mac: &str, token: &str) -> Option<serde_json::Value> {
    let r = http::request_with_token(
        port,
        "GET",
        &format!("/api/v1/os-installs/{mac}"),
        None,
        Some(token),
    )
    .ok()?;
    (r.status == 200)
        .then(|| serde_json::from_str(&r.body).ok())
        .flatten()
}

fn debugfs(img: &Path, offset: u64, cmd: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(format!("{}?offset={offset}", img.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "debugfs {cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn blank_machine_installs_debian_12_from_the_appliance_alone() {
    let (fw, grub) = firmware();
    eprintln!("target firmware: {fw:?}");
    let mirror = HostMirror::start().expect("the host mirror");
    let work = tempfile::tempdir().unwrap();
    let wire = work.path().join("wire.sock");
    let port = free_port();
    let mut cfg = VmConfig::new(image(), port, work.path().join("a")).wire(
        "prov",
        &wire,
        true,
        "52:54:00:78:00:01",
        None,
    );
    cfg.guestfwd.push(("10.0.2.100:8080".into(), mirror.port));
    let mut a = Vm::boot(&cfg).unwrap();
    a.wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap();
    let token = a
        .first_token()
        .unwrap_or_else(|| panic!("no first token:\n{}", a.serial()));
    let url = format!("http://127.0.0.1:{port}");
    api(
        port,
        "POST",
        "/api/v1/networks",
        r#"{"iface":"eth1","cidr":"10.78.0.1/24","mode":"authoritative","pool":"10.78.0.100-10.78.0.199"}"#,
        &token,
    );
    // The appliance mirrors the mirror: verified against Debian's key.
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
            "http://10.0.2.100:8080/repos/bookworm",
            "--set",
            r#"suites=["bookworm"]"#,
            "--set",
            r#"components=["main"]"#,
            "--set",
            r#"arches=["amd64"]"#,
        ],
    );
    let t = Instant::now();
    let out = cli(&url, &token, &["repo", "sync", "bookworm"]);
    eprintln!(
        "appliance mirror synced in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    drop(mirror); // From here on the appliance is alone.

    let mac = "52:54:00:78:00:e1";
    cli(
        &url,
        &token,
        &[
            "distro",
            "add",
            "debian12",
            "--breed",
            "debian",
            "--os-version",
            "bookworm",
            "--installer-by",
            "appliance",
        ],
    );
    cli(
        &url,
        &token,
        &[
            "profile",
            "add",
            "debian12",
            "--distro",
            "debian12",
            "--repo",
            "bookworm",
            "--set",
            r#"variables={"packages":["openssh-server","less"],"kernel_options_post":"console=ttyS0,115200","timezone":"Etc/UTC"}"#,
        ],
    );
    let vars = serde_json::json!({
        "ssh_authorized_keys": [KEY],
        "user": "ops",
        "user_ssh_authorized_keys": [KEY],
    });
    cli(
        &url,
        &token,
        &[
            "system",
            "add",
            "web1",
            "--profile",
            "debian12",
            "--mac",
            mac,
            "--hostname",
            "web1",
            "--set",
            &format!("variables={vars}"),
        ],
    );

    let bdir = work.path().join("b");
    std::fs::create_dir_all(&bdir).unwrap();
    let disk = bdir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let started = Instant::now();
    let mut b = boot_machine(fw, &wire, mac, &disk, &bdir, 1536, 2, true).unwrap();
    // The agent installs, then reboots (QEMU runs with -no-reboot: it exits).
    let mut last_phase = String::new();
    let limit = Duration::from_secs(45 * 60);
    loop {
        if let Some(r) = record(port, mac, &token) {
            let phase = format!("{} {} {}", r["state"], r["phase"], r["message"]);
            if phase != last_phase {
                eprintln!("[{:>5.0} s] {phase}", started.elapsed().as_secs_f64());
                last_phase = phase;
            }
            assert_ne!(
                r["state"],
                "failed",
                "the install failed: {r}\n--- target serial:\n{}",
                b.serial()
            );
        }
        if b.exited().is_some() {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "no install within {limit:?}\n--- target serial:\n{}\n--- appliance events:\n{}",
            b.serial(),
            http::request_with_token(
                port,
                "GET",
                &format!("/api/v1/events?mac={mac}&limit=100"),
                None,
                Some(&token)
            )
            .map(|r| r.body)
            .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let r = record(port, mac, &token).expect("an install record");
    assert_eq!(
        r["state"],
        "installed",
        "{r}\n--- target serial:\n{}",
        b.serial()
    );
    eprintln!(
        "install: {:.0} s; phases (s): {}",
        started.elapsed().as_secs_f64(),
        r["report"]
    );
    // Netboot is off. The machine now boots the network first: the
    // appliance's DHCP gives it an address but no boot file, so its
    // firmware goes on to the disk (iPXE's `exit` under OVMF did not).
    let sys = api(port, "GET", "/api/v1/systems/web1", "", &token);
    assert_eq!(sys["netboot"], false, "{sys}");
    drop(b);

    let before_boot2 = last_event_id(port, &token);
    let boot2 = Instant::now();
    let b = boot_machine(fw, &wire, mac, &disk, &bdir, 1024, 2, false).unwrap();
    let r = loop {
        let r = record(port, mac, &token).expect("an install record");
        if r["state"] == "booted" {
            break r;
        }
        assert!(
            boot2.elapsed() < Duration::from_secs(15 * 60),
            "the installed system did not report its first boot: {r}\n--- target serial:\n{}",
            b.serial()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!(
        "first boot reported {:.0} s after power-on",
        boot2.elapsed().as_secs_f64()
    );
    let fb = &r["firstboot"];
    assert!(
        fb["debian_version"].as_str().unwrap().starts_with("12."),
        "{fb}"
    );
    assert_eq!(fb["hostname"], "web1", "{fb}");
    assert_eq!(fb["dpkg_audit"], "", "{fb}");
    // The login banner comes from getty, which may start after the
    // first-boot unit has reported: wait for it rather than race it.
    let banner = Instant::now();
    while !b.serial().contains("Debian GNU/Linux 12") {
        assert!(
            banner.elapsed() < Duration::from_secs(180),
            "the console shows no Debian 12 login banner:\n{}",
            b.serial()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The network came first but offered nothing to boot: no boot file
    // was fetched and no iPXE script asked for (under OVMF, no iPXE ran at
    // all; under SeaBIOS the NIC's iPXE ROM runs, finds no boot file and
    // hands back to the BIOS).
    if fw == Firmware::Ovmf {
        assert!(
            !b.serial().contains("iPXE initialising"),
            "a machine with netboot off was given iPXE:\n{}",
            b.serial()
        );
    }
    let since = api(
        port,
        "GET",
        &format!("/api/v1/events?mac={mac}&limit=500"),
        "",
        &token,
    );
    let fetched: Vec<&serde_json::Value> = since["items"]
        .as_array()
        .expect("an events list")
        .iter()
        .filter(|e| e["id"].as_u64().unwrap_or(0) > before_boot2)
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("tftp.start" | "tftp.transfer" | "http.ipxe")
            )
        })
        .collect();
    assert!(
        fetched.is_empty(),
        "a machine with netboot off fetched boot files: {fetched:?}"
    );
    let ev = http::request_with_token(
        port,
        "GET",
        &format!("/api/v1/events?mac={mac}&limit=500"),
        None,
        Some(&token),
    )
    .unwrap()
    .body;
    for kind in [
        "osinstall.assigned",
        "osinstall.phase",
        "osinstall.finished",
        "osinstall.booted",
    ] {
        assert!(ev.contains(kind), "no {kind} event: {ev}");
    }
    drop(b);
    let _ = http::request_with_token(
        port,
        "POST",
        "/api/v1/power",
        Some(r#"{"action":"poweroff"}"#),
        Some(&token),
    );
    a.wait_exit(Duration::from_secs(60));

    // The disk, read from the host.
    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    let info = Command::new("sgdisk")
        .args(["-i", "3"])
        .arg(&disk)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    let first: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no root partition: {info}"));
    let off = first * 512;
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={off}", disk.display()))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert!(debugfs(&disk, off, "cat /etc/debian_version").starts_with("12."));
    assert_eq!(debugfs(&disk, off, "cat /etc/hostname").trim(), "web1");
    assert!(debugfs(&disk, off, "cat /root/.ssh/authorized_keys").contains(KEY));
    assert!(debugfs(&disk, off, "cat /home/ops/.ssh/authorized_keys").contains(KEY));
    let db = work.path().join("dpkg");
    std::fs::create_dir_all(&db).unwrap();
    debugfs(&disk, off, &format!("rdump /var/lib/dpkg {}", db.display()));
    let admin = db.join("dpkg");
    let q = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args([
            "-W",
            "-f",
            "${Package} ${db:Status-Abbrev}\\n",
            "openssh-server",
            "less",
            "linux-image-amd64",
            grub,
            "systemd-sysv",
        ])
        .output()
        .unwrap();
    let q = String::from_utf8_lossy(&q.stdout);
    for p in [
        "openssh-server",
        "less",
        "linux-image-amd64",
        grub,
        "systemd-sysv",
    ] {
        assert!(
            q.lines().any(|l| l.starts_with(&format!("{p} ii"))),
            "{p} is not installed: {q}"
        );
    }
    let audit = Command::new("dpkg")
        .arg(format!("--admindir={}", admin.display()))
        .arg("--audit")
        .output()
        .unwrap();
    assert!(
        audit.status.success() && audit.stdout.is_empty(),
        "dpkg --audit: {}",
        String::from_utf8_lossy(&audit.stdout)
    );
}
