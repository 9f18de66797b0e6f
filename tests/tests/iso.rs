//! The hybrid ISO (`builder::iso9660`, `[iso]` in a definition) checked by
//! the stock tools: `xorriso -report_el_torito/-report_system_area`,
//! `isoinfo -d`, `osirrox -extract` compared with the inputs, `sgdisk -v`
//! and `fdisk -l` on the hybrid GPT, `fsck.fat -n` on the EFI image; and
//! two builds give the same bytes.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use builder::definition;
use builder::plan::{self, BuildRequest};
use builder::treefile::{MemBlobs, TreeFile, TreeFileEntry, TreeFileKind};

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is not runnable ({e}); install the packages in xtask/debian-packages.txt")
    });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const DEFINITION: &str = r##"
[image]
name = "demo"
epoch = 1700000000

[inputs]
stub = { digest = "STUB" }
kernel = { digest = "KERNEL" }
payload = { digest = "TREE", kind = "tree" }

[kernel]
image = "kernel"
cmdline = "console=ttyS0"

[initramfs]
files = [{ path = "init", text = "#!/bin/sh\n", mode = 0o755 }]

[uki]
stub = "stub"

[disk]
size = "64MiB"

[[partitions]]
label = "esp"
type = "esp"
size = "32MiB"
filesystem = "fat32"
fs_label = "DEMO"
files = [{ path = "EFI/BOOT/BOOTX64.EFI", output = "uki" }]

[[partitions]]
label = "appliance-data"
type = "linux"
size = "fill"
filesystem = "ext4"
files = [
  { path = "release/manifest.json", output = "manifest" },
  { path = ".", tree = "payload" },
]

[iso]
esp = "esp"
embed = ["appliance-data"]
"##;

fn build(out: &Path) -> plan::BuildResult {
    let mut blobs = MemBlobs::default();
    let stub = fs::read(STUB).unwrap_or_else(|e| panic!("{STUB}: {e}; install systemd-boot-efi"));
    let stub_d = blobs.put(stub);
    let kernel_d = blobs.put(
        (0..2_000_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    );
    let big_d = blobs.put(
        (0..3_000_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let tf = TreeFile::new(vec![TreeFileEntry {
        path: "big.bin".into(),
        kind: TreeFileKind::File {
            size: 3_000_000,
            digest: big_d,
        },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Some(1600000000),
    }]);
    let tree_d = blobs.put(tf.to_bytes());
    let text = DEFINITION
        .replace("STUB", &stub_d.to_string())
        .replace("KERNEL", &kernel_d.to_string())
        .replace("TREE", &tree_d.to_string());
    let (def, src) = definition::parse("demo.toml", &text).unwrap();
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &BTreeMap::new()).unwrap(),
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch: 1700000000,
        out_dir: out,
        sign: None,
    };
    plan::build(&req).unwrap()
}

fn slice(file: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn the_hybrid_iso_is_valid_by_xorriso_isoinfo_sgdisk_and_fsck_fat() {
    let dir = tempfile::tempdir().unwrap();
    let r = build(dir.path());
    let iso = dir.path().join("demo.iso");
    let iso_s = iso.to_str().unwrap();
    let (iso_path, digest) = r.iso.clone().expect("an ISO");
    assert_eq!(iso_path, iso);
    let rec = r
        .manifest
        .iso
        .clone()
        .expect("the manifest records the ISO");
    assert_eq!(fs::metadata(&iso).unwrap().len(), rec.size);
    // The digest beside it, in sha256sum format.
    let (ok, out) = tool(
        "sh",
        &[
            "-c",
            &format!(
                "cd {} && sha256sum -c demo.iso.sha256",
                dir.path().display()
            ),
        ],
    );
    assert!(ok, "sha256sum -c: {out}");
    assert!(fs::read_to_string(dir.path().join("demo.iso.sha256"))
        .unwrap()
        .starts_with(&digest.hex()));

    // El Torito: one UEFI no-emulation image at the EFI image's block.
    let (ok, out) = tool(
        "xorriso",
        &[
            "-indev",
            iso_s,
            "-report_el_torito",
            "plain",
            "-report_system_area",
            "plain",
        ],
    );
    eprintln!("{out}");
    assert!(ok, "xorriso: {out}");
    let efi = rec.files.iter().find(|f| f.efi_boot).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("El Torito boot img :   1 "))
        .unwrap_or_else(|| panic!("no boot image reported: {out}"));
    assert!(line.contains("UEFI"), "{line}");
    assert!(line.contains(&(efi.offset / 2048).to_string()), "{line}");
    assert!(out.contains("GPT"), "{out}");
    assert!(out.contains("MBR protective-msdos-label"), "{out}");
    assert!(
        out.contains("GPT partition path :   1  /EFIBOOT.IMG"),
        "{out}"
    );

    let (ok, out) = tool("isoinfo", &["-d", "-i", iso_s]);
    eprintln!("{out}");
    assert!(ok, "isoinfo: {out}");
    assert!(out.contains("Volume id: DEMO"), "{out}");
    assert!(out.contains("El Torito"), "{out}");
    assert!(
        out.contains(&format!("Volume size is: {}", rec.size / 2048)),
        "{out}"
    );
    let (ok, out) = tool("isoinfo", &["-l", "-i", iso_s]);
    assert!(ok, "isoinfo -l: {out}");
    for f in &rec.files {
        assert!(out.contains(&format!("{};1", f.name)), "{}: {out}", f.name);
    }

    // Extracted files equal what went in: the EFI image holds the UKI and
    // passes fsck.fat; the data partition is the disk image's, byte for byte.
    let x = dir.path().join("x");
    let (ok, out) = tool(
        "osirrox",
        &["-indev", iso_s, "-extract", "/", x.to_str().unwrap()],
    );
    assert!(ok, "osirrox: {out}");
    let find = |name: &str| {
        fs::read_dir(&x)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .eq_ignore_ascii_case(name)
            })
            .unwrap_or_else(|| panic!("{name} not extracted"))
    };
    let esp = find(&efi.name);
    let (ok, out) = tool("fsck.fat", &["-n", esp.to_str().unwrap()]);
    assert!(ok, "fsck.fat -n: {out}");
    let uki = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", esp.to_str().unwrap(), "::/EFI/BOOT/BOOTX64.EFI", "-"])
        .output()
        .unwrap();
    assert!(uki.stdout == fs::read(dir.path().join("demo.efi")).unwrap());
    let disk = r.manifest.disk.clone().unwrap();
    let data_part = disk
        .partitions
        .iter()
        .find(|p| p.label == "appliance-data")
        .unwrap();
    let data = find("APPLIANCE_DATA.IMG");
    assert!(
        fs::read(&data).unwrap()
            == slice(
                &dir.path().join("demo.img"),
                data_part.offset,
                data_part.size
            ),
        "the embedded data partition differs from the disk image's"
    );
    let (ok, out) = tool("e2fsck", &["-fn", data.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn: {out}");

    // The hybrid GPT: valid, and its partitions are those files.
    let (ok, out) = tool("sgdisk", &["-v", iso_s]);
    assert!(ok && out.contains("No problems found"), "sgdisk -v: {out}");
    let (ok, out) = tool("sgdisk", &["-p", iso_s]);
    assert!(ok, "sgdisk -p: {out}");
    for f in &rec.files {
        let label = f.partition.as_deref().unwrap();
        let first = f.offset / 512;
        let last = (f.offset + f.size).div_ceil(512) - 1;
        assert!(
            out.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 7
                    && w[1] == first.to_string()
                    && w[2] == last.to_string()
                    && l.ends_with(label)
            }),
            "partition {label} at {first}-{last} not in: {out}"
        );
    }
    let (ok, out) = tool("fdisk", &["-l", iso_s]);
    assert!(
        ok && out.contains("EFI System") && out.contains("gpt"),
        "fdisk -l: {out}"
    );
    // The EFI image as the firmware sees it through the GPT.
    let esp_part = slice(&iso, efi.offset, efi.size);
    assert!(esp_part == fs::read(&esp).unwrap());
}

#[test]
fn two_iso_builds_give_the_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ra = build(a.path());
    let rb = build(b.path());
    assert_eq!(ra.iso.unwrap().1, rb.iso.unwrap().1);
    assert!(
        fs::read(a.path().join("demo.iso")).unwrap()
            == fs::read(b.path().join("demo.iso")).unwrap()
    );
}
