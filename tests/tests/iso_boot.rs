//! The hybrid ISO (`target/appliance/appliance.iso`, from `cargo xtask
//! image`) boots under OVMF: as a CD-ROM, as a read-only disk and as a
//! writable disk, and the API says what it booted from (`medium` in
//! `/api/v1/version`). From read-only media the appliance runs live:
//! state in RAM, with a degraded reason saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use builder::Digest;
use integration_tests::qemu::{base_command, Firmware, Vm};
use integration_tests::{free_port, workspace_root};

const API_UP: Duration = Duration::from_secs(240);

fn image_dir() -> PathBuf {
    let dir = workspace_root().join("target/appliance");
    assert!(
        dir.join("appliance.iso").exists() && dir.join("manifest.json").exists(),
        "{} has no appliance.iso/manifest.json: run `cargo xtask image` (cargo xtask test does)",
        dir.display()
    );
    dir
}

/// Boot under OVMF with the ISO attached by `drive` (QEMU arguments).
fn boot(drive: &[String], dir: &Path) -> Vm {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let (mut cmd, serial) = base_command(Firmware::Ovmf, dir, 1024).unwrap();
    cmd.args(drive)
        .arg("-netdev")
        .arg(format!(
            "user,id=up,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80"
        ))
        .args(["-device", "virtio-net-pci,netdev=up"])
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Vm::spawn(cmd, serial, port).unwrap()
}

fn version(vm: &mut Vm) -> serde_json::Value {
    let r = vm
        .wait_http("/api/v1/version", API_UP)
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn release(dir: &Path) -> String {
    Digest::of(&std::fs::read(dir.join("manifest.json")).unwrap()).to_string()
}

#[test]
fn the_iso_boots_as_a_cdrom_and_runs_live_with_state_in_ram() {
    let dir = image_dir();
    let work = tempfile::tempdir().unwrap();
    let iso = dir.join("appliance.iso");
    let mut vm = boot(
        &[
            "-drive".into(),
            format!(
                "if=none,id=cd,media=cdrom,format=raw,readonly=on,file={}",
                iso.display()
            ),
            "-device".into(),
            "ide-cd,drive=cd,bus=ide.0".into(),
        ],
        work.path(),
    );
    let v = version(&mut vm);
    let serial = vm.serial();
    assert_eq!(v["medium"]["kind"], "cdrom", "{v}\n{serial}");
    assert_eq!(v["medium"]["read_only"], true, "{v}");
    assert_eq!(v["medium"]["state"], "ram", "{v}");
    let degraded = v["degraded"].to_string();
    assert!(
        degraded.contains("not persistent") || degraded.contains("RAM only"),
        "{v}"
    );
    assert!(serial.contains("appliance: medium cdrom ram"), "{serial}");
}

#[test]
fn the_iso_as_a_read_only_disk_runs_live_and_as_a_writable_disk_keeps_state() {
    let dir = image_dir();
    let want = release(&dir);
    let work = tempfile::tempdir().unwrap();
    let iso = dir.join("appliance.iso");
    // Read-only: live, the release read from the medium, state in RAM.
    let mut vm = boot(
        &[
            "-drive".into(),
            format!("if=virtio,format=raw,readonly=on,file={}", iso.display()),
        ],
        &work.path().join("ro"),
    );
    let v = version(&mut vm);
    assert_eq!(v["medium"]["kind"], "disk", "{v}\n{}", vm.serial());
    assert_eq!(v["medium"]["device"], "/dev/vda", "{v}");
    assert_eq!(v["medium"]["read_only"], true, "{v}");
    assert_eq!(v["medium"]["state"], "ram", "{v}");
    assert_eq!(
        v["release"].as_str(),
        Some(want.as_str()),
        "{v}\n{}",
        vm.serial()
    );
    assert!(
        v["degraded"]
            .to_string()
            .contains("booted live from a read-only medium"),
        "{v}"
    );
    drop(vm);

    // Writable (a copy, as on a stick): the data partition is mounted and
    // state persists; nothing degraded.
    let copy = work.path().join("stick.iso");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&iso)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let mut vm = boot(
        &[
            "-drive".into(),
            format!("if=virtio,format=raw,file={}", copy.display()),
        ],
        &work.path().join("rw"),
    );
    let v = version(&mut vm);
    assert_eq!(v["medium"]["read_only"], false, "{v}");
    assert_eq!(v["medium"]["state"], "partition", "{v}");
    assert_eq!(v["release"].as_str(), Some(want.as_str()), "{v}");
    assert_eq!(v["degraded"], serde_json::json!([]), "{v}\n{}", vm.serial());
    assert!(
        vm.serial().contains("appliance: data mounted /dev/vda"),
        "{}",
        vm.serial()
    );
}
