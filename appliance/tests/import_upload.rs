//! `appliance import` from another machine: the CLI reads the installer
//! tree where it runs and uploads the kernel and initrd through the API
//! (resumable, verified); nothing is written to the client's data
//! directory, and the server serves the kernel it received.

mod common;
use common::{bin, server};

use std::process::Stdio;

#[test]
fn import_uploads_the_boot_files_through_the_api() {
    let server_data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(server_data.path(), &[]);
    // The client's own data directory: must stay untouched.
    let client = tempfile::tempdir().unwrap();
    let client_data = client.path().join("data");

    let tree = tempfile::tempdir().unwrap();
    let di = tree.path().join("debian-installer/amd64");
    std::fs::create_dir_all(&di).unwrap();
    // Big enough to take several pieces would make the test slow; the
    // protocol's pieces and resumption are unit-tested in inventory::upload.
    let kernel: Vec<u8> = (0..3_000_000u32).map(|i| (i % 239) as u8).collect();
    std::fs::write(di.join("linux"), &kernel).unwrap();
    std::fs::write(di.join("initrd.gz"), b"an initrd").unwrap();
    std::fs::write(
        tree.path().join("version.info"),
        b"Debian version:  12 (bookworm)\n",
    )
    .unwrap();

    let o = bin()
        .args(["--json", "import", "--path"])
        .arg(tree.path())
        .args(["--name", "deb12"])
        .env("APPLIANCE_URL", &url)
        .env("APPLIANCE_TOKEN", &token)
        .env("APPLIANCE_DATA", &client_data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let digest = v["distro"]["kernel"].as_str().unwrap().to_owned();
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(
        !client_data.exists(),
        "import wrote into the client's data directory"
    );
    assert_eq!(
        std::fs::read(server_data.path().join("blobs/sha256").join(hex)).unwrap(),
        kernel,
        "the server does not hold the uploaded kernel"
    );

    // The kernel URL a PXE client is given answers with those bytes (curl).
    let out = std::env::temp_dir().join(format!("import-upload-{}", std::process::id()));
    let c = std::process::Command::new("curl")
        .args(["-sSf", "-o"])
        .arg(&out)
        .arg(format!("{url}/blobs/sha256/{hex}"))
        .status()
        .unwrap();
    assert!(c.success(), "curl could not fetch the served kernel");
    assert_eq!(std::fs::read(&out).unwrap(), kernel);
    let _ = std::fs::remove_file(&out);

    // Import again: the blobs are there already, so nothing is sent again
    // and the distro exists: a clear conflict, nothing changed.
    let o = bin()
        .args(["import", "--path"])
        .arg(tree.path())
        .args(["--name", "deb12"])
        .env("APPLIANCE_URL", &url)
        .env("APPLIANCE_TOKEN", &token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("deb12"), "{err}");

    // Without a token the upload is refused before any byte is stored.
    let o = bin()
        .args(["import", "--path"])
        .arg(tree.path())
        .args(["--name", "other"])
        .env("APPLIANCE_URL", &url)
        .env_remove("APPLIANCE_TOKEN")
        .env("HOME", client.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
}
