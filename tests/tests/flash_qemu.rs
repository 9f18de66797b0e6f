//! Flashing inside a running appliance: the shipped image boots under OVMF
//! with the image attached a second time, read-only (`/dev/vdb`), and a
//! blank 5 GiB USB stick; `POST /api/v1/flash` writes the image from
//! `/dev/vdb` (with the block map computed on the host by `appliance
//! bmap`) onto the stick through the verified writer. A second VM then
//! boots from the stick alone: the GPT was grown to the stick, init grows
//! the data filesystem online, and the appliance comes up healthy with the
//! same release. Needs `cargo xtask image` (run by `cargo xtask test`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use builder::Digest;
use integration_tests::qemu::{Vm, VmConfig};
use integration_tests::{free_port, http, workspace_root};

const GIB: u64 = 1 << 30;

fn image_dir() -> PathBuf {
    let dir = workspace_root().join("target/appliance");
    assert!(
        dir.join("appliance.img").exists(),
        "{} has no appliance.img: run `cargo xtask image`",
        dir.display()
    );
    dir
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn appliance_flashes_itself_onto_a_usb_stick_that_then_boots_and_grows() {
    let dir = image_dir();
    let img = dir.join("appliance.img");
    let release = Digest::of(&std::fs::read(dir.join("manifest.json")).unwrap()).to_string();
    let work = tempfile::tempdir().unwrap();
    let stick = work.path().join("stick.img");
    std::fs::File::create(&stick)
        .unwrap()
        .set_len(5 * GIB)
        .unwrap();
    let bin = workspace_root().join("target/static/appliance");
    let out = Command::new(&bin)
        .arg("bmap")
        .arg(&img)
        .output()
        .expect("running appliance bmap");
    assert!(out.status.success(), "{out:?}");
    // bmaptool's XML, sent as the text of the request's `bmap`.
    let bmap = String::from_utf8(out.stdout).unwrap();
    assert!(bmap.contains("<bmap version=\"2.0\">"), "{bmap}");

    // VM 1: boots the image, flashes /dev/vdb onto the stick.
    let port = free_port();
    let cfg = VmConfig::new(&img, port, work.path().join("vm1"))
        .virtio_drive("src", &img, true)
        .usb_stick(&stick);
    let mut vm = Vm::boot(&cfg).unwrap();
    vm.wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap();
    let token = vm
        .first_token()
        .unwrap_or_else(|| panic!("no first API token:\n{}", vm.serial()));

    // The stick shows up (USB enumeration may lag the API).
    let deadline = Instant::now() + Duration::from_secs(60);
    let disks = loop {
        let r = http::get(port, "/api/v1/disks").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v = json(&r.body);
        if v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "sda")
            || Instant::now() > deadline
        {
            break v;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let list = disks["items"].as_array().unwrap();
    let find = |n: &str| {
        list.iter()
            .find(|d| d["name"] == n)
            .unwrap_or_else(|| panic!("no {n} in {disks}\nserial:\n{}", vm.serial()))
    };
    let (vda, sda) = (find("vda"), find("sda"));
    assert_eq!(vda["boot_disk"], true, "{disks}");
    assert_eq!(vda["mounted"], true, "{disks}");
    assert_eq!(sda["boot_disk"], false, "{disks}");
    assert_eq!(sda["size"], 5 * GIB, "{disks}");
    assert_eq!(sda["has_partition_table"], false, "{disks}");

    // Refusals: no token; the boot disk.
    let body = |device: &str| {
        serde_json::json!({"device": device, "image": "/dev/vdb", "bmap": bmap, "keep_holes": true})
            .to_string()
    };
    let r = http::post(port, "/api/v1/flash", &body("/dev/sda")).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = http::post_auth(port, "/api/v1/flash", &body("/dev/vda"), &token).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("booted from"), "{}", r.body);

    let r = http::post_auth(port, "/api/v1/flash", &body("/dev/sda"), &token).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        let r = http::get(port, "/api/v1/flash").unwrap();
        let v = json(&r.body);
        if v["state"] != "running" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "flash still running: {v}\nserial:\n{}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(
        status["state"],
        "done",
        "{status}\nserial:\n{}",
        vm.serial()
    );
    let report = &status["report"];
    assert_eq!(report["grown"], true, "{status}");
    assert_eq!(report["target_size"], 5 * GIB, "{status}");
    assert!(report.get("reread_error").is_none(), "{status}");
    let r = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, &token).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(vm.wait_exit(Duration::from_secs(120)).is_some());
    drop(vm);

    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&stick)
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(v.contains("No problems found"), "{v}");

    // VM 2: boots from the stick alone.
    let port = free_port();
    let mut cfg = VmConfig::new(&stick, port, work.path().join("vm2"));
    cfg.snapshot = false;
    let mut vm = Vm::boot(&cfg).unwrap();
    let r = vm
        .wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap();
    let v = json(&r.body);
    assert_eq!(v["release"].as_str(), Some(release.as_str()), "{v}");
    assert_eq!(
        v["degraded"].as_array().map(Vec::len),
        Some(0),
        "{v}\nserial:\n{}",
        vm.serial()
    );
    let serial = vm.serial();
    assert!(
        serial.contains("appliance: data grown"),
        "the data filesystem was not grown:\n{serial}"
    );
}
