//! Benchmarks. Each measures the tool a user would otherwise use in the same
//! run and ends with one JSON line:
//! `{"bench":NAME,"ours":X,"peer":PEER,"peer_value":Y,"unit":U,"ratio":X/Y,"better":...}`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use builder::Digest;

use crate::root;

pub fn run(name: &str, rest: &[&str]) -> Result<()> {
    match name {
        "builder" => builder_bench(),
        "boot" => crate::bench_boot::run(),
        "clone" => crate::bench_clone::run(),
        "console" => crate::bench_console::run(),
        "dhcp" => crate::bench_dhcp::run(),
        "inventory" => crate::bench_inventory::run(),
        "install" => crate::bench_install::run(),
        "tftp" => crate::bench_tftp::run(),
        "sync" => crate::bench_sync::run(),
        "replicate" => crate::bench_replicate::run(rest),
        "mirror" => crate::bench_mirror::run(),
        other => {
            bail!("unknown benchmark {other:?}; available: builder, boot, clone, console, dhcp, install, inventory, mirror, replicate, sync, tftp")
        }
    }
}

/// Print the closing JSON line.
pub fn report(bench: &str, ours: f64, peer: &str, peer_value: f64, unit: &str, better: &str) {
    // Written by hand: serde_json's map sorts keys, the documented order is this one.
    let s = |v: &str| serde_json::Value::from(v).to_string();
    let n = |v: f64| serde_json::Value::from(round(v)).to_string();
    println!(
        "{{\"bench\":{},\"ours\":{},\"peer\":{},\"peer_value\":{},\"unit\":{},\"ratio\":{},\"better\":{}}}",
        s(bench),
        n(ours),
        s(peer),
        n(peer_value),
        s(unit),
        n(ours / peer_value),
        s(better)
    );
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A small deterministic PRNG so the data set is the same on every machine.
pub(crate) struct XorShift(pub(crate) u64);
impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The data set: a few large files and thousands of small ones (≥ 500 MiB),
/// an ESP payload and an initramfs tree. Generated once into the cache.
fn dataset(dir: &Path) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let mut buf = vec![0u8; 1 << 20];
    let mut write = |path: PathBuf, size: usize, rng: &mut XorShift| -> Result<()> {
        fs::create_dir_all(path.parent().unwrap())?;
        let mut f = fs::File::create(&path)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n;
        }
        Ok(())
    };
    for (i, mib) in [128usize, 96, 64, 32].iter().enumerate() {
        write(
            dir.join(format!("data/large/blob{i}.bin")),
            mib << 20,
            &mut rng,
        )?;
    }
    for i in 0..4000usize {
        let size = 1024 + (rng.next() % (100 << 10)) as usize;
        write(
            dir.join(format!("data/small/d{:02}/f{i:05}.dat", i % 40)),
            size,
            &mut rng,
        )?;
    }
    write(dir.join("esp/EFI/BOOT/BOOTX64.EFI"), 24 << 20, &mut rng)?;
    write(dir.join("esp/loader/entries/appliance.conf"), 300, &mut rng)?;
    for i in 0..300usize {
        write(
            dir.join(format!("initramfs/lib/modules/m{i:03}.ko")),
            8 << 10,
            &mut rng,
        )?;
    }
    write(dir.join("initramfs/init"), 2 << 20, &mut rng)?;
    fs::write(&done, b"")?;
    Ok(())
}

fn du_bytes(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Put a host directory into a blob store as a tree document; returns its digest.
fn import(store: &Path, dir: &Path) -> Result<Digest> {
    let blobs = store.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let mut put = |p: &Path| -> std::io::Result<Digest> {
        let (d, _) = Digest::of_reader(fs::File::open(p)?)?;
        let dst = blobs.join(d.hex());
        if !dst.exists() {
            let tmp = blobs.join(format!(".tmp-{}", d.hex()));
            fs::copy(p, &tmp)?;
            fs::rename(&tmp, &dst)?;
        }
        Ok(d)
    };
    let tf = builder::treefile::import_dir(dir, &mut put)
        .with_context(|| format!("importing {}", dir.display()))?;
    let bytes = tf.to_bytes();
    let d = Digest::of(&bytes);
    fs::write(blobs.join(d.hex()), bytes)?;
    Ok(d)
}

fn timed(what: &str, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f().with_context(|| format!("running {what}"))?;
    let s = t.elapsed().as_secs_f64();
    eprintln!("  {what}: {s:.2} s");
    Ok(s)
}

fn sh(script: &str) -> Result<()> {
    crate::run(Command::new("bash").args(["-euo", "pipefail", "-c", script]))
}

fn builder_bench() -> Result<()> {
    let work = root().join("target/bench/builder");
    let src = work.join("src");
    eprintln!(
        "builder bench: generating the data set in {} (once)",
        src.display()
    );
    dataset(&src)?;
    let data_bytes = du_bytes(&src.join("data"));
    eprintln!(
        "  data partition content: {:.0} MiB in {} files",
        data_bytes as f64 / (1 << 20) as f64,
        walk(&src.join("data")).len()
    );
    if data_bytes < 500 << 20 {
        bail!("the data set holds only {data_bytes} bytes; the benchmark needs at least 500 MiB");
    }

    // Build our release binary first (not timed).
    crate::run(Command::new(crate::cargo()).current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "builder",
    ]))?;
    let builder_bin = root().join("target/release/builder");

    let store = work.join("store");
    let data_tree = import(&store, &src.join("data"))?;
    let esp_tree = import(&store, &src.join("esp"))?;
    let init_tree = import(&store, &src.join("initramfs"))?;
    let def = work.join("bench.toml");
    fs::write(
        &def,
        format!(
            r#"[image]
name = "bench"
epoch = 1700000000

[inputs]
data = {{ digest = "{data_tree}", kind = "tree" }}
esp = {{ digest = "{esp_tree}", kind = "tree" }}
init = {{ digest = "{init_tree}", kind = "tree" }}

[initramfs]
files = [{{ path = ".", tree = "init" }}]

[disk]
size = "2113MiB"

[[partitions]]
label = "esp"
type = "esp"
size = "64MiB"
filesystem = "fat32"
files = [{{ path = ".", tree = "esp" }}]

[[partitions]]
label = "data"
type = "linux"
size = "fill"
filesystem = "ext4"
files = [{{ path = ".", tree = "data" }}]
"#
        ),
    )?;

    let peer_sh = format!(
        r#"
cd {w}
rm -rf peer && mkdir peer && cd peer
export E2FSPROGS_FAKE_TIME=1700000000 SOURCE_DATE_EPOCH=1700000000 MTOOLS_SKIP_CHECK=1
mkfs.ext4 -q -F -E root_owner=0:0 -L data -d {s}/data data.img 2048M
mkfs.fat -F 32 -n ESP -C esp.img 65536 >/dev/null
mcopy -s -i esp.img {s}/esp/* ::/
(cd {s}/initramfs && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6 -n) > initrd.img
truncate -s 2113M disk.img
sgdisk -q -n 1:2048:+64M -t 1:ef00 -c 1:esp -n 2:0:0 -t 2:8300 -c 2:data disk.img
dd if=esp.img of=disk.img bs=1M seek=1 conv=notrunc,sparse status=none
dd if=data.img of=disk.img bs=1M seek=65 conv=notrunc,sparse status=none
"#,
        w = work.display(),
        s = src.display()
    );
    let mut ours_runs = Vec::new();
    let mut peer_runs = Vec::new();
    let mut cp_runs = Vec::new();
    for i in 0..3 {
        eprintln!("run {}", i + 1);
        let out = work.join("ours");
        let _ = fs::remove_dir_all(&out);
        ours_runs.push(timed("ours (builder build)", || {
            crate::run(
                Command::new(&builder_bin)
                    .args(["build"])
                    .arg(&def)
                    .arg("--store")
                    .arg(&store)
                    .arg("--out")
                    .arg(&out)
                    .stdout(std::process::Stdio::null()),
            )
        })?);
        peer_runs.push(timed("peer (mkfs pipeline)", || sh(&peer_sh))?);
        let cp_dst = work.join("cp");
        let _ = fs::remove_dir_all(&cp_dst);
        cp_runs.push(timed("cp -r of the same files", || {
            crate::run(Command::new("cp").arg("-r").arg(&src).arg(&cp_dst))
        })?);
    }
    // Sanity: our image must be valid, or the timing means nothing.
    sh(&format!(
        "sgdisk -v {}/ours/bench.img >/dev/null",
        work.display()
    ))?;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (ours, peer, cp) = (med(&mut ours_runs), med(&mut peer_runs), med(&mut cp_runs));
    let ours_blocks = fs::metadata(work.join("ours/bench.img")).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    })?;
    eprintln!(
        "median of 3: ours {ours:.2} s, peer {peer:.2} s, cp -r {cp:.2} s; ours/cp = {:.2}; image occupies {} MiB on disk",
        ours / cp,
        ours_blocks >> 20
    );
    report("builder", ours, "mkfs-pipeline", peer, "s", "lower");
    Ok(())
}
