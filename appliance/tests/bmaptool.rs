//! Block maps shared with bmaptool (Debian's bmap-tools): `appliance flash`
//! writes an image with the maps `bmaptool create` makes (with sha256 per
//! range, found as IMAGE.bmap or given with --bmap, and without checksums),
//! and `bmaptool copy` writes one with the map `appliance bmap` makes,
//! checking its checksums. Either side refuses an image that no longer
//! matches its map. Without bmaptool this test fails (it never skips):
//! bmap-tools is in xtask/debian-packages.txt.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::bin;

const MIB: u64 = 1 << 20;
/// Not a multiple of the block size: the last block is cut short.
const SIZE: u64 = 100 * MIB + 1000;

fn bmaptool(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("bmaptool");
    for a in args {
        c.arg(a);
    }
    match c.output() {
        Ok(o) => o,
        Err(e) => panic!(
            "bmaptool (Debian's bmap-tools) is needed by this test and could not run: {e}; \
             install it with `apt-get install bmap-tools` (xtask/debian-packages.txt lists it)"
        ),
    }
}

fn ok(what: &str, o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}{err}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

fn failed(what: &str, o: &Output) -> String {
    assert!(!o.status.success(), "{what} should have failed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Deterministic non-zero bytes.
fn noise(len: u64, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed as u8) | 1
        })
        .collect()
}

/// A sparse image: a boot block, a 70 MiB run of data (one bmaptool range
/// longer than the 64 MiB our writer takes at once), scattered blocks, and
/// data in the short last block.
fn make_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&noise(4096, 1), 0).unwrap();
    f.write_all_at(&noise(70 * MIB, 2), 3 * MIB).unwrap();
    for (i, off) in [90 * MIB, 90 * MIB + 8192, 97 * MIB]
        .into_iter()
        .enumerate()
    {
        f.write_all_at(&noise(4096, 10 + i as u64), off).unwrap();
    }
    f.write_all_at(&noise(1000, 20), SIZE - 1000).unwrap();
}

fn flash(dir: &Path, image: &Path, bmap: Option<&Path>, out: &Path) -> Output {
    let mut c = bin();
    c.arg("flash")
        .arg(out)
        .arg("--image")
        .arg(image)
        .arg("--yes")
        .arg("--data")
        .arg(dir.join("data"));
    if let Some(b) = bmap {
        c.arg("--bmap").arg(b);
    }
    c.output().unwrap()
}

fn same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        x == y,
        "{} and {} differ ({} and {} bytes)",
        a.display(),
        b.display(),
        x.len(),
        y.len()
    );
}

/// Block ranges (first, last) of a bmaptool map.
fn ranges(map: &str) -> Vec<(u64, u64)> {
    map.lines()
        .filter(|l| l.contains("<Range"))
        .map(|l| {
            let t = l
                .split('>')
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .trim();
            let (a, z) = t.split_once('-').unwrap_or((t, t));
            (a.trim().parse().unwrap(), z.trim().parse().unwrap())
        })
        .collect()
}

#[test]
fn appliance_flash_writes_with_maps_bmaptool_creates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    let img = d.join("disk.img");
    make_image(&img);

    // With checksums, found beside the image as bmaptool would.
    let side = d.join("disk.img.bmap");
    ok(
        "bmaptool create",
        &bmaptool(&[&"create", &img, &"-o", &side]),
    );
    let map = std::fs::read_to_string(&side).unwrap();
    assert!(
        map.contains("<ChecksumType> sha256 </ChecksumType>"),
        "{map}"
    );
    let rs = ranges(&map);
    assert!(
        rs.iter().any(|(a, z)| (z - a + 1) * 4096 > 64 * MIB),
        "no range longer than 64 MiB: {rs:?}"
    );
    let out = d.join("out1.img");
    ok("appliance flash (IMAGE.bmap)", &flash(d, &img, None, &out));
    same(&img, &out);

    // Without checksums (`--no-checksum`), given with --bmap.
    let bare = d.join("bare.bmap");
    ok(
        "bmaptool create --no-checksum",
        &bmaptool(&[&"create", &"--no-checksum", &img, &"-o", &bare]),
    );
    assert!(!std::fs::read_to_string(&bare).unwrap().contains("chksum="));
    let out = d.join("out2.img");
    ok("appliance flash --bmap", &flash(d, &img, Some(&bare), &out));
    same(&img, &out);

    // An image that changed since its map was made is refused before a
    // byte is written, in the long range and in a short one.
    for (at, name) in [(40 * MIB, "long"), (90 * MIB + 8192 + 5, "short")] {
        let other = d.join(format!("changed-{name}.img"));
        make_image(&other);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&other)
            .unwrap();
        f.write_all_at(&[0], at).unwrap();
        let out = d.join(format!("out-{name}.img"));
        let msg = failed(
            "appliance flash with a changed image",
            &flash(d, &other, Some(&side), &out),
        );
        assert!(
            msg.contains("does not match the block map") || msg.contains("failed its check"),
            "{msg}"
        );
        assert!(!out.exists(), "{} was left behind", out.display());
    }
}

#[test]
fn bmaptool_copy_writes_with_maps_appliance_bmap_makes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.img");
    make_image(&img);

    // Given with --bmap.
    let ours = d.join("ours.bmap");
    let o = bin()
        .arg("bmap")
        .arg(&img)
        .arg("-o")
        .arg(&ours)
        .output()
        .unwrap();
    ok("appliance bmap", &o);
    let map = std::fs::read_to_string(&ours).unwrap();
    assert!(map.contains("<bmap version=\"2.0\">"), "{map}");
    let out = d.join("out1.img");
    let log = ok(
        "bmaptool copy --bmap",
        &bmaptool(&[&"copy", &"--bmap", &ours, &img, &out]),
    );
    assert!(log.contains("using bmap file"), "{log}");
    same(&img, &out);

    // Found as IMAGE.bmap, as `appliance bmap IMAGE -o IMAGE.bmap` leaves it.
    let img2: PathBuf = d.join("auto.img");
    make_image(&img2);
    let side = d.join("auto.img.bmap");
    ok(
        "appliance bmap",
        &bin()
            .arg("bmap")
            .arg(&img2)
            .arg("-o")
            .arg(&side)
            .output()
            .unwrap(),
    );
    let out = d.join("out2.img");
    let log = ok("bmaptool copy", &bmaptool(&[&"copy", &img2, &out]));
    assert!(log.contains("discovered bmap file"), "{log}");
    same(&img2, &out);

    // bmaptool checks our per-range sha256: a changed image fails.
    let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
    f.write_all_at(&[0], 50 * MIB).unwrap();
    let msg = failed(
        "bmaptool copy of a changed image",
        &bmaptool(&[&"copy", &img2, &d.join("out3.img")]),
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");

    // ... and our file checksum: an edited map fails.
    let edited = d.join("edited.bmap");
    std::fs::write(&edited, map.replacen("</Range>", " </Range>", 1)).unwrap();
    let msg = failed(
        "bmaptool copy with an edited map",
        &bmaptool(&[&"copy", &"--bmap", &edited, &img, &d.join("out4.img")]),
    );
    assert!(msg.contains("checksum mismatch for bmap file"), "{msg}");
}
