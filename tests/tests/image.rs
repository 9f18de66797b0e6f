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
        "appliance.img.sha256",
        "appliance.efi",
        "initrd.img",
        "vmlinuz",
    ] {
        let a = std::fs::read(first.join(f)).unwrap();
        let b = std::fs::read(out.path().join(f)).unwrap();
        assert!(a == b, "{f} differs between two builds of the same inputs");
    }
}
