//! End-to-end builds through `builder::plan`, every artifact checked by the
//! real tool: `sgdisk -v`, `fsck.fat -n`, `e2fsck -fn`, `cpio -it`,
//! `objdump -h`; plus reproducibility and bad-input behaviour.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use builder::definition;
use builder::plan::{self, BuildRequest};
use builder::tree::Content;
use builder::treefile::{BlobDir, BlobSource, MemBlobs, TreeFile, TreeFileEntry, TreeFileKind};
use builder::Digest;

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is not runnable ({e}); install the packages in xtask/debian-packages.txt")
    });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn definition_text() -> String {
    r##"
[image]
name = "demo"
version = "1.2"
epoch = 1700000000

[inputs]
stub = { digest = "STUB", path = "usr/lib/systemd/boot/efi/linuxx64.efi.stub", deb = "systemd-boot-efi" }
kernel = { digest = "KERNEL" }
payload = { digest = "TREE", kind = "tree" }

[kernel]
image = "kernel"
cmdline = "console=ttyS0 appliance.mode=serve"

[initramfs]
files = [
  { path = "init", text = "#!/bin/sh\necho hi\n", mode = 0o755 },
  { path = "dev/console", type = "char", major = 5, minor = 1, mode = 0o600 },
  { path = "bin/sh", symlink = "/init" },
  { path = "bin/init2", hardlink = "init" },
  { path = "etc/payload", tree = "payload" },
]

[uki]
stub = "stub"

[disk]
size = "256MiB"

[[partitions]]
label = "esp"
type = "esp"
size = "64MiB"
filesystem = "fat32"
files = [
  { path = "EFI/BOOT/BOOTX64.EFI", output = "uki" },
  { path = "loader/readme.txt", text = "hello\n" },
]

[[partitions]]
label = "appliance-data"
type = "linux"
size = "fill"
filesystem = "ext4"
files = [
  { path = "release/manifest.json", output = "manifest" },
  { path = ".", tree = "payload" },
  { path = "dev/console", type = "char", major = 5, minor = 1 },
]
"##
    .to_string()
}

struct Fixture {
    blobs: MemBlobs,
    text: String,
}

fn fixture(kernel_bytes: &[u8]) -> Fixture {
    let mut blobs = MemBlobs::default();
    let stub = fs::read(STUB).unwrap_or_else(|e| panic!("{STUB}: {e}; install systemd-boot-efi"));
    let stub_d = blobs.put(stub);
    let kernel_d = blobs.put(kernel_bytes.to_vec());
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let big_d = blobs.put(big);
    let small_d = blobs.put(b"small file\n".to_vec());
    let e = |path: &str, kind: TreeFileKind, mode: u16| TreeFileEntry {
        path: path.into(),
        kind,
        mode,
        uid: 1000,
        gid: 1000,
        mtime: Some(1600000000),
    };
    let tf = TreeFile::new(vec![
        e("srv", TreeFileKind::Dir, 0o755),
        e(
            "srv/big.bin",
            TreeFileKind::File {
                size: 3_000_000,
                digest: big_d,
            },
            0o644,
        ),
        e(
            "srv/small.txt",
            TreeFileKind::File {
                size: 11,
                digest: small_d,
            },
            0o600,
        ),
        e(
            "srv/link",
            TreeFileKind::Symlink {
                target: "small.txt".into(),
            },
            0o777,
        ),
        e(
            "srv/hard",
            TreeFileKind::Hardlink {
                target: "srv/small.txt".into(),
            },
            0o600,
        ),
    ]);
    let tree_d = blobs.put(tf.to_bytes());
    let text = definition_text()
        .replace("STUB", &stub_d.to_string())
        .replace("KERNEL", &kernel_d.to_string())
        .replace("TREE", &tree_d.to_string());
    Fixture { blobs, text }
}

fn build(fx: &Fixture, out: &Path) -> Result<plan::BuildResult, String> {
    build_from(fx, &fx.blobs, out)
}

fn build_from(
    fx: &Fixture,
    blobs: &dyn BlobSource,
    out: &Path,
) -> Result<plan::BuildResult, String> {
    let (def, src) = definition::parse("demo.toml", &fx.text).map_err(|e| e.to_string())?;
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &BTreeMap::new()).map_err(|e| e.to_string())?,
        definition: &def,
        source: &src,
        blobs,
        epoch: 1700000000,
        out_dir: out,
        sign: None,
    };
    plan::build(&req).map_err(|e| e.to_string())
}

fn extract(disk: &Path, offset: u64, len: u64, to: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(disk).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    fs::write(to, buf).unwrap();
}

fn kernel() -> Vec<u8> {
    (0..2_000_000u32).map(|i| (i % 253) as u8).collect()
}

#[test]
fn full_image_is_valid_by_the_real_tools() {
    let fx = fixture(&kernel());
    let dir = tempfile::tempdir().unwrap();
    let r = build(&fx, dir.path()).unwrap();
    let disk = dir.path().join("demo.img");
    for f in [
        "demo.img",
        "demo.img.sha256",
        "demo.efi",
        "vmlinuz",
        "initrd.img",
        "manifest.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    // No temporary directory left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 6);

    let (ok, out) = tool("sgdisk", &["-v", disk.to_str().unwrap()]);
    assert!(ok && out.contains("No problems found"), "sgdisk -v: {out}");

    let m = &r.manifest;
    let parts = &m.disk.as_ref().unwrap().partitions;
    assert_eq!(parts[0].label, "esp");
    assert_eq!(parts[0].offset, 1 << 20);
    let esp = dir.path().join("esp.img");
    extract(&disk, parts[0].offset, parts[0].size, &esp);
    let (ok, out) = tool("fsck.fat", &["-n", esp.to_str().unwrap()]);
    assert!(ok, "fsck.fat -n: {out}");
    let uki_on_esp = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", esp.to_str().unwrap(), "::/EFI/BOOT/BOOTX64.EFI", "-"])
        .output()
        .unwrap();
    assert_eq!(
        uki_on_esp.stdout,
        fs::read(dir.path().join("demo.efi")).unwrap()
    );

    let data = dir.path().join("data.img");
    extract(&disk, parts[1].offset, parts[1].size, &data);
    let (ok, out) = tool("e2fsck", &["-fn", data.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn: {out}");
    let (_, out) = tool(
        "debugfs",
        &["-R", "cat /release/manifest.json", data.to_str().unwrap()],
    );
    assert!(out.contains(&fs::read_to_string(dir.path().join("manifest.json")).unwrap()));
    let (_, out) = tool("debugfs", &["-R", "stat /srv/hard", data.to_str().unwrap()]);
    assert!(out.contains("Links: 2"), "hardlink: {out}");
    let (_, out) = tool("dumpe2fs", &["-h", data.to_str().unwrap()]);
    assert!(out.contains("appliance-data"), "label: {out}");
    assert!(
        out.to_lowercase().contains(&parts[1].fs_id),
        "uuid {}: {out}",
        parts[1].fs_id
    );

    // The manifest's release is the sha256 of the manifest file.
    assert_eq!(
        r.release,
        Digest::of(&fs::read(dir.path().join("manifest.json")).unwrap())
    );
    // The disk digest sits beside the image in sha256sum format.
    let sum = fs::read_to_string(dir.path().join("demo.img.sha256")).unwrap();
    let (ok, out) = tool(
        "sh",
        &[
            "-c",
            &format!(
                "cd {} && sha256sum -c demo.img.sha256",
                dir.path().display()
            ),
        ],
    );
    assert!(ok, "sha256sum -c: {out} ({sum})");

    // Initramfs: a gzip'd newc archive holding every entry.
    let (ok, out) = tool(
        "sh",
        &[
            "-c",
            &format!(
                "gzip -dc {}/initrd.img | cpio -it --quiet",
                dir.path().display()
            ),
        ],
    );
    assert!(ok, "cpio -it: {out}");
    for p in [
        "init",
        "dev/console",
        "bin/sh",
        "bin/init2",
        "etc/payload/srv/big.bin",
        "etc/payload/srv/link",
    ] {
        assert!(out.lines().any(|l| l == p), "{p} not in initramfs: {out}");
    }

    // UKI sections.
    let (ok, out) = tool(
        "objdump",
        &["-h", dir.path().join("demo.efi").to_str().unwrap()],
    );
    assert!(ok, "objdump: {out}");
    for s in [".osrel", ".cmdline", ".initrd", ".linux"] {
        assert!(out.contains(s), "{s} missing: {out}");
    }

    // Written sparse: a 256 MiB image with ~30 MiB of data.
    use std::os::unix::fs::MetadataExt;
    let used = fs::metadata(&disk).unwrap().blocks() * 512;
    assert!(used < 80 << 20, "image occupies {used} bytes");
}

#[test]
fn builds_are_reproducible_and_inputs_change_digests() {
    let fx = fixture(&kernel());
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ra = build(&fx, a.path()).unwrap();
    let rb = build(&fx, b.path()).unwrap();
    assert_eq!(ra.release, rb.release);
    for f in [
        "demo.img",
        "demo.img.sha256",
        "demo.efi",
        "vmlinuz",
        "initrd.img",
        "manifest.json",
    ] {
        assert!(
            fs::read(a.path().join(f)).unwrap() == fs::read(b.path().join(f)).unwrap(),
            "{f} differs between builds"
        );
    }
    let mut k = kernel();
    k[1000] ^= 1;
    let c = tempfile::tempdir().unwrap();
    let rc = build(&fixture(&k), c.path()).unwrap();
    assert_ne!(ra.release, rc.release);
    assert_ne!(ra.disk.unwrap().1, rc.disk.unwrap().1);
    assert_ne!(
        fs::read(a.path().join("demo.efi")).unwrap(),
        fs::read(c.path().join("demo.efi")).unwrap()
    );
}

#[test]
fn a_partition_too_small_fails_clearly_and_leaves_nothing() {
    let mut fx = fixture(&kernel());
    // The data partition gets 3 MiB; its content needs more.
    fx.text = fx.text.replace("size = \"256MiB\"", "size = \"68MiB\"");
    let dir = tempfile::tempdir().unwrap();
    let e = build(&fx, dir.path()).unwrap_err();
    assert!(e.contains("appliance-data"), "{e}");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "partial output left behind"
    );
}

/// The ext4 writer checks file contents by reading them back from the
/// image after writing them; a store file that does not match its digest
/// must still fail the build.
#[test]
fn a_corrupted_store_file_fails_the_build_and_leaves_nothing() {
    let mut fx = fixture(&kernel());
    // Only in the ext4 partition (the initramfs would catch it first).
    let in_initramfs = "  { path = \"etc/payload\", tree = \"payload\" },\n";
    assert!(fx.text.contains(in_initramfs));
    fx.text = fx.text.replace(in_initramfs, "");
    let store = tempfile::tempdir().unwrap();
    let blobs = store.path().join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let mut big = None;
    for (d, c) in &fx.blobs.0 {
        let Content::Bytes(b) = c else { unreachable!() };
        fs::write(blobs.join(d.hex()), b).unwrap();
        if b.len() == 3_000_000 {
            big = Some(*d);
        }
    }
    let out = tempfile::tempdir().unwrap();
    let store_dir = BlobDir::new(store.path());
    build_from(&fx, &store_dir, out.path()).expect("the intact store builds");

    let path = blobs.join(big.unwrap().hex());
    let mut bytes = fs::read(&path).unwrap();
    bytes[2_500_000] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let e = build_from(&fx, &store_dir, out.path()).unwrap_err();
    assert!(
        e.contains("appliance-data") && e.contains("srv/big.bin") && e.contains("digest"),
        "{e}"
    );
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "partial output left behind"
    );
}

#[test]
fn missing_input_and_bad_paths_are_named() {
    let mut fx = fixture(&kernel());
    let missing = Digest::of(b"not stored");
    fx.text = fx.text.replacen(
        "kernel = { digest = \"sha256:",
        &format!("kernel = {{ digest = \"{missing}\", x = \"sha256:"),
        1,
    );
    let e = build(&fx, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.contains("demo.toml:"), "{e}");

    let mut fx = fixture(&kernel());
    fx.blobs.0.remove(
        &fx.blobs
            .0
            .keys()
            .copied()
            .find(|d| fx.text.contains(&format!("kernel = {{ digest = \"{d}\"")))
            .unwrap(),
    );
    let e = build(&fx, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(
        e.contains("input \"kernel\"") && e.contains("not in the input store"),
        "{e}"
    );

    let mut fx = fixture(&kernel());
    fx.text = fx.text.replace("path = \"bin/sh\"", "path = \"/bin/sh\"");
    let e = build(&fx, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.contains("absolute"), "{e}");

    let mut fx = fixture(&kernel());
    fx.text = fx.text.replace("path = \"bin/init2\"", "path = \"init\"");
    let e = build(&fx, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.contains("two entries for path \"init\""), "{e}");
}
