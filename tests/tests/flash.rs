//! `appliance flash` on the host: the shipped image onto files of the same
//! size (byte-identical, `sgdisk -v` clean) and larger (grown GPT, `sgdisk
//! -v` and `e2fsck -fn` clean), and the refusals (no `--yes` without a
//! terminal, a target too small) that leave the target untouched. Needs
//! `target/appliance/` and the static binary from `cargo xtask image`
//! (which `cargo xtask test` runs first).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::workspace_root;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn image() -> PathBuf {
    let p = workspace_root().join("target/appliance/appliance.img");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask image` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The static binary `cargo xtask image` built and put in the image.
fn appliance() -> PathBuf {
    let p = workspace_root().join("target/static/appliance");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask image`",
        p.display()
    );
    p
}

fn flash(target: &Path, extra: &[&str], data: &Path) -> Output {
    Command::new(appliance())
        .arg("flash")
        .arg(target)
        .arg("--image")
        .arg(image())
        .arg("--data")
        .arg(data)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("running appliance flash")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{cmd}` is required (xtask/debian-packages.txt): {e}"));
    let t = text(&o);
    assert!(o.status.success(), "{cmd} {args:?} failed: {t}");
    t
}

fn sha256_of(p: &Path, size: u64) -> String {
    let f = File::open(p).unwrap();
    let (d, _) = builder::plan::hash_sparse(&f, &[(0, size)], size).unwrap();
    d.hex()
}

fn sparse_file(p: &Path, size: u64) {
    File::create(p).unwrap().set_len(size).unwrap();
}

#[test]
fn flash_onto_a_same_size_file_gives_the_image_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("stick.img");
    let size = std::fs::metadata(image()).unwrap().len();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image().with_file_name("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        Some(size),
        manifest["disk"]["size"].as_u64(),
        "the image's size"
    );
    sparse_file(&target, size);
    let o = flash(&target, &["--yes", "--json"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["grown"], false, "{report}");
    assert_eq!(report["retries"], 0, "{report}");
    let want = std::fs::read_to_string(image().with_extension("img.sha256")).unwrap();
    let want = want.split_whitespace().next().unwrap().to_string();
    assert_eq!(sha256_of(&target, size), want);
    let v = run("sgdisk", &["-v", target.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
}

#[test]
fn flash_onto_a_larger_file_grows_the_table_and_keeps_the_filesystem_clean() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("big.img");
    sparse_file(&target, 6 * GIB);
    let o = flash(&target, &["--yes", "--json"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["grown"], true, "{report}");
    let p = target.to_str().unwrap();
    let v = run("sgdisk", &["-v", p]);
    assert!(v.contains("No problems found"), "{v}");
    let layout = builder::gpt::read(&mut File::open(&target).unwrap()).unwrap();
    assert_eq!(layout.disk_size, 6 * GIB);
    let data = layout
        .partitions
        .iter()
        .find(|q| q.spec.label == "appliance-data")
        .expect("an appliance-data partition");
    let end = data.offset() + data.len();
    assert!(
        end <= 6 * GIB - 17 * 1024 && end + 2 * MIB > 6 * GIB,
        "data partition ends at {end}"
    );
    // e2fsck reads the partition in place through its `?offset=` syntax.
    run("e2fsck", &["-fn", &format!("{p}?offset={}", data.offset())]);
}

#[test]
fn flash_refuses_without_yes_off_a_terminal_and_too_small_targets_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("keep.img");
    let mut junk = vec![0x5Au8; 4096];
    junk.extend(vec![0xA5u8; 4096]);
    let f = File::create(&target).unwrap();
    f.set_len(5 * GIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &junk, 0).unwrap();
    drop(f);
    let o = flash(&target, &[], dir.path());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("without --yes"),
        "{}",
        text(&o)
    );
    let mut head = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(&target).unwrap(), &mut head, 0).unwrap();
    assert_eq!(head, junk, "the refused target changed");

    let small = dir.path().join("small.img");
    let f = File::create(&small).unwrap();
    f.set_len(GIB / 2).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &junk, 0).unwrap();
    drop(f);
    let o = flash(&small, &["--yes"], dir.path());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is too small"),
        "{}",
        text(&o)
    );
    std::os::unix::fs::FileExt::read_exact_at(&File::open(&small).unwrap(), &mut head, 0).unwrap();
    assert_eq!(head, junk, "the too-small target changed");
    assert_eq!(std::fs::metadata(&small).unwrap().len(), GIB / 2);
}
