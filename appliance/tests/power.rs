//! Power drivers against real peers: QMP against `qemu-system-x86_64`
//! (TCG, no disk image: a null block device and a NIC without a backend),
//! Redfish against the `sushy-tools` emulator (PyPI; fake driver, HTTPS
//! with a self-signed certificate, Basic auth), and `appliance power`
//! end to end through `appliance serve` (Wake-on-LAN to a loopback
//! listener, an unreachable QMP socket, credential redaction).
//!
//! The peers are installed by `.ci/run` and `cargo xtask test`
//! (`xtask/debian-packages.txt`, `xtask/python-packages.txt` into
//! `target/peers/venv`); a missing peer fails the test, it never skips.

mod common;
use common::{bin, server, sushy, Killed};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use appliance::bmc::qmp::Qmp;
use appliance::bmc::redfish::Redfish;
use appliance::bmc::{BootDevice, PowerDriver, PowerError, PowerState};

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- QMP against QEMU ----

fn qemu(dir: &Path) -> (Killed, PathBuf) {
    let sock = dir.join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-no-shutdown",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args([
            "-device",
            "virtio-net-pci,id=nic0,romfile=",
            "-blockdev",
            "driver=null-co,node-name=d0",
            "-device",
            "virtio-blk-pci,id=disk0,drive=d0",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (Debian qemu-system-x86; xtask/debian-packages.txt)");
    let child = Killed(child);
    wait_for("the QMP socket", Duration::from_secs(30), || {
        sock.exists().then_some(())
    });
    (child, sock)
}

#[test]
fn qmp_powers_and_boots_a_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, sock) = qemu(dir.path());
    let q = Qmp::new(
        sock.to_str().unwrap(),
        "disk=disk0,net=nic0",
        Duration::from_secs(20),
    )
    .unwrap();
    // -S: prelaunch, i.e. off.
    assert_eq!(q.status().unwrap(), PowerState::Off);
    q.on().unwrap();
    assert_eq!(q.status().unwrap(), PowerState::On);
    q.on().unwrap(); // already on: nothing happens
    assert_eq!(q.status().unwrap(), PowerState::On);
    q.off().unwrap();
    assert_eq!(q.status().unwrap(), PowerState::Off);
    q.off().unwrap();
    assert_eq!(q.status().unwrap(), PowerState::Off);

    // One-time network boot: the NIC goes first until the next power-on.
    q.boot_once(BootDevice::Network).unwrap();
    assert_eq!(q.bootindex(BootDevice::Network).unwrap(), 0);
    assert_eq!(q.bootindex(BootDevice::Disk).unwrap(), 1);
    q.cycle().unwrap(); // off → on
    assert_eq!(q.status().unwrap(), PowerState::On);
    // Consumed by that reset: back to the normal order (disk, then net).
    assert_eq!(q.bootindex(BootDevice::Network).unwrap(), 2);
    assert_eq!(q.bootindex(BootDevice::Disk).unwrap(), 1);

    // While running: one-time disk boot, then a cycle.
    q.boot_once(BootDevice::Disk).unwrap();
    assert_eq!(q.bootindex(BootDevice::Disk).unwrap(), 0);
    q.cycle().unwrap();
    assert_eq!(q.status().unwrap(), PowerState::On);
    assert_eq!(q.bootindex(BootDevice::Disk).unwrap(), 1);
    assert_eq!(q.bootindex(BootDevice::Network).unwrap(), 2);
    q.off().unwrap();
    assert_eq!(q.status().unwrap(), PowerState::Off);

    // A boot device power.id does not name is a settings error.
    let q2 = Qmp::new(sock.to_str().unwrap(), "net=nic0", Duration::from_secs(20)).unwrap();
    assert!(matches!(
        q2.boot_once(BootDevice::Disk),
        Err(PowerError::Config(_))
    ));
    // A device QEMU does not have is QEMU's error, named.
    let q3 = Qmp::new(sock.to_str().unwrap(), "net=nope", Duration::from_secs(20)).unwrap();
    let e = q3.boot_once(BootDevice::Network).unwrap_err();
    assert!(
        matches!(&e, PowerError::Protocol { detail, .. } if detail.contains("qom-get")),
        "{e}"
    );
}

// ---- Redfish against sushy-tools ----

/// Serves `body` for any GET, until the test ends.
fn iso_server(body: &'static [u8]) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body);
        }
    });
    format!("http://{addr}/appliance.iso")
}

fn eventually(r: &Redfish, want: PowerState) {
    // The fake driver applies a power change 1-11 s after the request.
    wait_for(
        &format!("power state {want:?}"),
        Duration::from_secs(20),
        || (r.status().unwrap() == want).then_some(()),
    );
}

#[test]
fn redfish_against_the_sushy_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let (_bmc, url) = sushy(dir.path());
    let t = Duration::from_secs(10);
    let r = Redfish::new(&url, "admin", "pa55word", "tls=insecure", t).unwrap();
    // Up when it answers.
    wait_for("the emulator", Duration::from_secs(60), || {
        match r.status() {
            Err(PowerError::Unreachable { .. }) => None,
            other => Some(other.unwrap()),
        }
    });
    assert_eq!(r.status().unwrap(), PowerState::Off);

    // Wrong password: an authentication error, never the password.
    let bad = Redfish::new(&url, "admin", "wrong-pw", "tls=insecure", t).unwrap();
    let e = bad.status().unwrap_err();
    assert!(matches!(e, PowerError::Auth { .. }), "{e:?}");
    assert!(!e.to_string().contains("wrong-pw"));
    // Verified TLS refuses the self-signed certificate and says what to do.
    let strict = Redfish::new(&url, "admin", "pa55word", "", t).unwrap();
    let e = strict.status().unwrap_err();
    assert!(
        matches!(&e, PowerError::Protocol { detail, .. } if detail.contains("tls=insecure")),
        "{e:?}"
    );

    // One-time boot override, read back from the system.
    r.boot_once(BootDevice::Network).unwrap();
    assert_eq!(
        r.system_resource().unwrap()["Boot"]["BootSourceOverrideTarget"],
        "Pxe"
    );
    r.boot_once(BootDevice::Disk).unwrap();
    assert_eq!(
        r.system_resource().unwrap()["Boot"]["BootSourceOverrideTarget"],
        "Hdd"
    );
    // The same system by id.
    let sys_id = r.system_resource().unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_id = Redfish::new(
        &url,
        "admin",
        "pa55word",
        &format!("system={sys_id},tls=insecure"),
        t,
    )
    .unwrap();
    assert_eq!(by_id.status().unwrap(), PowerState::Off);

    r.on().unwrap();
    eventually(&r, PowerState::On);
    r.cycle().unwrap();
    eventually(&r, PowerState::On);
    r.off().unwrap();
    eventually(&r, PowerState::Off);

    // Virtual media: the emulator fetches the ISO from our URL.
    let iso = iso_server(b"not really an ISO, but bytes to fetch");
    let slot = r.insert_media(&iso).unwrap();
    assert!(slot.media_types.iter().any(|m| m == "CD" || m == "DVD"));
    let listed = r.virtual_media().unwrap();
    let (now, _) = listed.iter().find(|(s, _)| s.path == slot.path).unwrap();
    assert!(now.inserted, "{now:?}");
    assert_eq!(now.image.as_deref(), Some(iso.as_str()));
    assert_eq!(r.eject_media().unwrap(), 1);
    let listed = r.virtual_media().unwrap();
    let (now, _) = listed.iter().find(|(s, _)| s.path == slot.path).unwrap();
    assert!(!now.inserted, "{now:?}");

    // The same through the server and the CLI: boot an ISO on a machine
    // without PXE (insert, cycle with a one-time CD boot, eject).
    let data = tempfile::tempdir().unwrap();
    let (_srv, api, token) = server(data.path(), &[]);
    let tk = token.as_str();
    ok(&api, tk, &["image", "add", "img1", "--set", "type=capture"]);
    let power = format!(
        r#"power={{"type":"redfish","address":"{url}","user":"admin","password":"pa55word","id":"tls=insecure"}}"#
    );
    ok(
        &api,
        tk,
        &["system", "add", "bmc1", "--image", "img1", "--set", &power],
    );
    let out = ok(&api, tk, &["power", "media", "bmc1", "--insert", &iso]);
    assert!(out.contains(&format!("inserted in {}", slot.path)), "{out}");
    let listed = r.virtual_media().unwrap();
    let (now, _) = listed.iter().find(|(s, _)| s.path == slot.path).unwrap();
    assert!(
        now.inserted && now.image.as_deref() == Some(iso.as_str()),
        "{now:?}"
    );
    let out = ok(&api, tk, &["power", "cycle", "bmc1", "--boot", "cd"]);
    assert!(out.contains("next boot cd"), "{out}");
    assert_eq!(
        r.system_resource().unwrap()["Boot"]["BootSourceOverrideTarget"],
        "Cd"
    );
    let out = ok(&api, tk, &["power", "media", "bmc1", "--eject"]);
    assert!(out.contains("ejected (1 slot(s) held media)"), "{out}");
    // A bad URL is refused before the BMC is asked.
    let o = cli(
        &api,
        tk,
        &["power", "media", "bmc1", "--insert", "ftp://x/y.iso"],
    );
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("http://"),
        "{o:?}"
    );
}

// ---- `appliance power` through `appliance serve` ----

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("APPLIANCE_URL", url)
        .env("APPLIANCE_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(url: &str, token: &str, args: &[&str]) -> String {
    let o = cli(url, token, args);
    assert!(
        o.status.success(),
        "appliance {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn power_cli_through_the_server() {
    let data = tempfile::tempdir().unwrap();
    let (_srv, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    let wol = UdpSocket::bind("127.0.0.1:0").unwrap();
    wol.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let power = format!(
        r#"power={{"type":"wol","address":"{}","user":"ops","password":"s3cret-pw"}}"#,
        wol.local_addr().unwrap()
    );
    ok(&url, t, &["image", "add", "img1", "--set", "type=capture"]);
    ok(
        &url,
        t,
        &[
            "system",
            "add",
            "node1",
            "--image",
            "img1",
            "--mac",
            "52:54:00:00:00:21",
            "--set",
            &power,
        ],
    );
    // Wake-on-LAN: the magic packet for the first interface's MAC.
    let out = ok(&url, t, &["power", "on", "node1"]);
    assert!(out.contains("node1: on done (wol)"), "{out}");
    let mut buf = [0u8; 200];
    let (n, _) = wol.recv_from(&mut buf).unwrap();
    assert_eq!(n, 102);
    assert_eq!(&buf[..6], &[0xff; 6]);
    assert_eq!(&buf[6..12], &[0x52, 0x54, 0, 0, 0, 0x21]);
    let st = ok(&url, t, &["power", "status", "node1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"system": "node1", "state": "unknown", "driver": "wol"})
    );
    let o = cli(&url, t, &["power", "off", "node1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("power_unsupported"), "{err}");
    // Virtual media needs a Redfish BMC.
    let o = cli(&url, t, &["power", "media", "node1", "--eject"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("power_unsupported") && err.contains("redfish"),
        "{err}"
    );

    // Credentials never come back: show, list, report, edit keeps them.
    for args in [
        &["system", "show", "node1", "--json"][..],
        &["system", "list", "--json"],
        &["report", "--json"],
        &["system", "show", "node1"],
    ] {
        let out = ok(&url, t, args);
        assert!(!out.contains("s3cret"), "{args:?}: {out}");
        assert!(out.contains("********"), "{args:?}: {out}");
    }
    ok(&url, t, &["system", "edit", "node1", "--comment", "rack 4"]);
    let file = std::fs::read_to_string(data.path().join("inventory/systems/node1.json")).unwrap();
    // Stored sealed with the node key (crate::secrets), never in clear.
    assert!(
        !file.contains("s3cret-pw") && file.contains("sealed:v1:") && file.contains("rack 4"),
        "{file}"
    );

    // An unreachable BMC: 502 with a stable code naming the address.
    let gone = data.path().join("no-such-vm.qmp");
    let p = format!(
        r#"power={{"type":"qmp","address":"{}","id":"net=nic0","password":""}}"#,
        gone.display()
    );
    ok(&url, t, &["system", "edit", "node1", "--set", &p]);
    let o = cli(&url, t, &["power", "cycle", "node1", "--boot", "network"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("power_unreachable") && err.contains("no-such-vm.qmp"),
        "{err}"
    );
    // Both actions are in the event log, without credentials.
    let mut resp = String::new();
    let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "GET /api/v1/events?limit=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("\"power.on\""), "{resp}");
    assert!(resp.contains("\"power.failed\""), "{resp}");
    assert!(!resp.contains("s3cret"), "{resp}");
}
