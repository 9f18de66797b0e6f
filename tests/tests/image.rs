//! `cargo xtask image` a second time: fully offline (the archive is made
//! unreachable through a dead loopback proxy) and byte-identical to the
//! first build in `target/appliance/` (which `cargo xtask test` makes),
//! signature included: both builds use the same release key in `cache/keys`.

use std::process::Command;

use integration_tests::workspace_root;

#[test]
fn second_image_build_is_offline_and_byte_identical() {
    let root = workspace_root();
    let first = root.join("target/appliance");
    assert!(
        first.join("manifest.json").exists(),
        "run `cargo xtask image` first (cargo xtask test does)"
    );
    let xtask = root.join("target/release/xtask");
    assert!(
        xtask.exists(),
        "{} missing: run through `cargo xtask test`",
        xtask.display()
    );
    let out = tempfile::tempdir().unwrap();
    // A proxy on a port nothing listens on: any download attempt fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let o = Command::new(&xtask)
        .current_dir(&root)
        .args(["image", "--out"])
        .arg(out.path())
        .env("http_proxy", &dead_url)
        .env("HTTP_PROXY", &dead_url)
        .env("XTASK_SKIP_APPLIANCE_BUILD", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "offline rebuild failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for f in [
        "manifest.json",
        "manifest.json.sig",
        "manifest.json.sshsig",
        "allowed_signers",
        "appliance.img.sha256",
        "appliance.img.sha256.sshsig",
        "appliance.iso.sha256",
        "appliance.iso.sha256.sshsig",
        "appliance.efi",
        "initrd.img",
        "vmlinuz",
    ] {
        let a = std::fs::read(first.join(f)).unwrap();
        let b = std::fs::read(out.path().join(f)).unwrap();
        assert!(a == b, "{f} differs between two builds of the same inputs");
    }
    // An operator verifies the release with stock OpenSSH alone (README),
    // and a changed file is refused.
    let tampered = out.path().join("manifest.json");
    let mut bytes = std::fs::read(&tampered).unwrap();
    bytes.push(b' ');
    std::fs::write(&tampered, bytes).unwrap();
    for (signed, want) in [
        (first.join("manifest.json"), true),
        (first.join("appliance.img.sha256"), true),
        (first.join("appliance.iso.sha256"), true),
        (tampered, false),
    ] {
        let sig = first.join(format!(
            "{}.sshsig",
            signed.file_name().unwrap().to_str().unwrap()
        ));
        let o = Command::new("ssh-keygen")
            .args(["-Y", "verify", "-f"])
            .arg(first.join("allowed_signers"))
            .args(["-I", "release@appliance", "-n", "appliance-release", "-s"])
            .arg(&sig)
            .stdin(std::fs::File::open(&signed).unwrap())
            .output()
            .expect("running ssh-keygen (openssh-client)");
        assert_eq!(
            o.status.success(),
            want,
            "ssh-keygen -Y verify on {}: {}{}",
            signed.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
