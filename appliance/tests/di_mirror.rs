//! Installer mirrors (`repo add --installer`) and `appliance import --repo`
//! end to end on loopback, with Debian's own tools making the archive:
//! `dpkg-deb` builds the netboot package (a bzImage-shaped kernel whose
//! setup header names its release, an initrd, `version.info`),
//! `apt-ftparchive` indexes and `gpg` signs a `test` suite holding
//! `main/binary-amd64` and `main/debian-installer/binary-amd64`, and a
//! loopback HTTP server serves it but answers 404 for some udebs, as the
//! host's archive does for all of them.

mod common;
use common::{bin, server};

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn run(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (tools are in xtask/debian-packages.txt)"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A Linux bzImage as far as the installer import reads it: the `HdrS`
/// setup header and the version string its pointer names.
fn fake_bzimage(release: &str) -> Vec<u8> {
    let mut img = vec![0u8; 0x2000];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x20E..0x210].copy_from_slice(&0x0800u16.to_le_bytes());
    let v = format!("{release} (debian-kernel@lists.debian.org) #1 SMP Debian\0");
    img[0xA00..0xA00 + v.len()].copy_from_slice(v.as_bytes());
    img
}

struct Archive {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: PathBuf,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
}

/// The archive: `base-req` (required) and the netboot package with a
/// kernel of release `kernel_release`; the installer index lists
/// `kernel-image-<udeb_abi>-di` and `anna` (standard), served, and
/// `nic-modules-<udeb_abi>-di`, listed but absent (404).
fn build_archive(kernel_release: &str, udeb_abi: &str) -> Archive {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let kernel = fake_bzimage(kernel_release);
    let initrd = b"\x1f\x8b fake initrd of the installer".to_vec();
    let mk = |name: &str, prio: &str, files: &[(&str, &[u8])]| {
        let src = dir.path().join("src").join(name);
        std::fs::create_dir_all(src.join("DEBIAN")).unwrap();
        for (p, c) in files {
            let p = src.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        std::fs::write(
            src.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: 20230607+deb12u99\nArchitecture: all\n\
                 Maintainer: Test <test@example.invalid>\nPriority: {prio}\n\
                 Description: test package {name}\n"
            ),
        )
        .unwrap();
        let pool = root.join(format!("pool/main/{}/{name}", &name[..1]));
        std::fs::create_dir_all(&pool).unwrap();
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&src)
            .arg(pool.join(format!("{name}_20230607+deb12u99_all.deb"))));
    };
    let img = "usr/lib/debian-installer/images/12/amd64";
    mk(
        "base-req",
        "required",
        &[("usr/share/doc/base-req/README", b"x")],
    );
    mk(
        "debian-installer-12-netboot-amd64",
        "optional",
        &[
            (&format!("{img}/text/debian-installer/amd64/linux"), &kernel),
            (
                &format!("{img}/text/debian-installer/amd64/initrd.gz"),
                &initrd,
            ),
            (
                &format!("{img}/gtk/debian-installer/amd64/linux"),
                b"gtk, not taken",
            ),
            (
                &format!("{img}/text/version.info"),
                b"Debian version:  12 (bookworm)\nInstaller build: 20230607+deb12u99\n",
            ),
        ],
    );
    let bin_dir = root.join("dists/test/main/binary-amd64");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let packages = run(Command::new("apt-ftparchive")
        .args(["packages", "pool"])
        .current_dir(&root))
    .stdout;
    std::fs::write(bin_dir.join("Packages"), packages).unwrap();
    run(Command::new("xz").arg("-k").arg(bin_dir.join("Packages")));
    // The per-component Release the installer's choose-mirror checks.
    std::fs::write(
        bin_dir.join("Release"),
        "Archive: test\nComponent: main\nArchitecture: amd64\n",
    )
    .unwrap();

    // The installer index: two udebs served, one listed but absent.
    let mut di = String::new();
    for (name, prio, served) in [
        (format!("kernel-image-{udeb_abi}-di"), "standard", true),
        ("anna".to_string(), "standard", true),
        (format!("nic-modules-{udeb_abi}-di"), "standard", false),
    ] {
        let body = format!("udeb {name}\n").into_bytes();
        let rel = format!("pool/main/{}/{name}/{name}_1_amd64.udeb", &name[..1]);
        if served {
            let p = root.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, &body).unwrap();
        }
        di += &format!(
            "Package: {name}\nVersion: 1\nArchitecture: amd64\nPriority: {prio}\n\
             Section: debian-installer\nFilename: {rel}\nSize: {}\nSHA256: {}\n\
             Description: {name}\n\n",
            body.len(),
            sha256_hex(&body)
        );
    }
    let di_dir = root.join("dists/test/main/debian-installer/binary-amd64");
    std::fs::create_dir_all(&di_dir).unwrap();
    std::fs::write(di_dir.join("Packages"), di).unwrap();
    run(Command::new("xz").arg("-k").arg(di_dir.join("Packages")));

    let dist = root.join("dists/test");
    let release = run(Command::new("apt-ftparchive")
        .args([
            "-o",
            "APT::FTPArchive::Release::Suite=test",
            "-o",
            "APT::FTPArchive::Release::Codename=test",
            "-o",
            "APT::FTPArchive::Release::Components=main",
            "-o",
            "APT::FTPArchive::Release::Architectures=amd64",
            "release",
            "dists/test",
        ])
        .current_dir(&root))
    .stdout;
    std::fs::write(dist.join("Release"), release).unwrap();
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = || {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &gnupg).args([
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    };
    run(gpg().args([
        "--quick-gen-key",
        "Test Archive <archive@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ]));
    run(gpg()
        .args(["--yes", "--digest-algo", "SHA256", "--clearsign", "-o"])
        .arg(dist.join("InRelease"))
        .arg(dist.join("Release")));
    let key = dir.path().join("archive-key.gpg");
    std::fs::write(&key, run(gpg().args(["--export"])).stdout).unwrap();
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", &gnupg)
        .args(["--kill", "gpg-agent"])
        .status();
    Archive {
        _dir: dir,
        root,
        key,
        kernel,
        initrd,
    }
}

/// A loopback HTTP server over `root`: 200 with the file, else 404.
fn upstream(root: &Path) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/debian", listener.local_addr().unwrap());
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let _ = handle(s, &root);
            });
        }
    });
    url
}

fn handle(mut s: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let rel = path.strip_prefix("/debian/").unwrap_or("");
    match (!rel.contains(".."))
        .then(|| std::fs::read(root.join(rel)).ok())
        .flatten()
    {
        Some(b) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            s.write_all(&b)?;
        }
        None => write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    s.flush()
}

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("APPLIANCE_URL", url)
        .env("APPLIANCE_TOKEN", token)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(url: &str, token: &str, args: &[&str]) -> String {
    let o = cli(url, token, args);
    assert!(
        o.status.success(),
        "appliance {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn add_and_sync(url: &str, t: &str, name: &str, archive: &Archive) -> String {
    let up = upstream(&archive.root);
    ok(
        url,
        t,
        &[
            "repo",
            "add",
            name,
            "--breed",
            "apt",
            "--mirror",
            &up,
            "--suite",
            "test",
            "--installer",
            "--set",
            &format!(
                "keyring={}",
                serde_json::json!(archive.key.display().to_string())
            ),
        ],
    );
    ok(url, t, &["repo", "sync", name])
}

#[test]
fn an_installer_mirror_records_missing_udebs_and_imports_the_netboot_kernel() {
    let archive = build_archive("6.1.0-99-amd64", "6.1.0-99-amd64");
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    let out = add_and_sync(&url, t, "di", &archive);
    assert!(out.contains("di: "), "{out}");

    // The absent udeb is listed, the served ones are mirrored, the index
    // is served byte for byte.
    let show = ok(&url, t, &["repo", "show", "di"]);
    assert!(
        show.contains("missing udebs (1)")
            && show.contains("nic-modules-6.1.0-99-amd64-di_1_amd64")
            && !show.contains("anna_1_amd64"),
        "{show}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&url, t, &["--json", "repo", "show", "di"])).unwrap();
    assert_eq!(
        st["mirror_status"]["missing"][0]["path"],
        "pool/main/n/nic-modules-6.1.0-99-amd64-di/nic-modules-6.1.0-99-amd64-di_1_amd64.udeb",
        "{st}"
    );
    let agent: ureq::Agent = ureq::Agent::config_builder().proxy(None).build().into();
    let get = |p: &str| -> Vec<u8> {
        agent
            .get(format!("{url}/repos/di/{p}"))
            .call()
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .into_body()
            .read_to_vec()
            .unwrap()
    };
    for p in [
        "dists/test/main/debian-installer/binary-amd64/Packages.xz",
        "dists/test/main/binary-amd64/Release",
        "pool/main/a/anna/anna_1_amd64.udeb",
        "pool/main/d/debian-installer-12-netboot-amd64/debian-installer-12-netboot-amd64_20230607+deb12u99_all.deb",
    ] {
        assert_eq!(get(p), std::fs::read(archive.root.join(p)).unwrap(), "{p}");
    }

    // import --repo: the text kernel and initrd, as blobs, checked.
    let out = ok(&url, t, &["import", "--repo", "di", "--name", "deb-di"]);
    assert!(
        out.contains("kernel 6.1.0-99-amd64") && out.contains("did not serve 1 installer udebs"),
        "{out}"
    );
    let d: serde_json::Value =
        serde_json::from_str(&ok(&url, t, &["--json", "distro", "show", "deb-di"])).unwrap();
    assert_eq!(d["breed"], "debian");
    assert_eq!(d["os_version"], "12");
    for (field, want) in [("kernel", &archive.kernel), ("initrd", &archive.initrd)] {
        let digest = d[field].as_str().unwrap();
        assert_eq!(digest, format!("sha256:{}", sha256_hex(want)), "{d}");
        let blob = data
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        assert_eq!(&std::fs::read(blob).unwrap(), want);
    }
    let p: serde_json::Value =
        serde_json::from_str(&ok(&url, t, &["--json", "profile", "show", "deb-di"])).unwrap();
    assert_eq!(p["repos"], serde_json::json!(["di"]), "{p}");
    // No scratch store left behind.
    let cache: Vec<_> = std::fs::read_dir(data.path().join("cache"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cache
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("import-")),
        "{cache:?}"
    );
    // A second import under the same name is refused, naming it.
    let o = cli(&url, t, &["import", "--repo", "di", "--name", "deb-di"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("deb-di already exists"),
        "{e}"
    );
}

#[test]
fn a_netboot_kernel_for_another_abi_than_the_udebs_is_refused_naming_both() {
    let archive = build_archive("6.1.0-99-amd64", "6.1.0-98-amd64");
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    add_and_sync(&url, t, "di", &archive);
    let o = cli(&url, t, &["import", "--repo", "di"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("kernel ABI mismatch")
            && e.contains("6.1.0-99-amd64")
            && e.contains("6.1.0-98-amd64"),
        "{e}"
    );
    // Nothing was created.
    let o = cli(&url, t, &["distro", "show", "di"]);
    assert!(!o.status.success());
    // A repo without --installer is refused before anything is read.
    let plain = upstream(&archive.root);
    ok(
        &url,
        t,
        &[
            "repo",
            "add",
            "plain",
            "--breed",
            "apt",
            "--mirror",
            &plain,
            "--suite",
            "test",
            "--set",
            &format!(
                "keyring={}",
                serde_json::json!(archive.key.display().to_string())
            ),
        ],
    );
    ok(&url, t, &["repo", "sync", "plain"]);
    let o = cli(&url, t, &["import", "--repo", "plain"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not an installer mirror"), "{e}");
}
