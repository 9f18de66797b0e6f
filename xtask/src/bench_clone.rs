//! `cargo xtask bench clone`: capturing and deploying a disk.
//!
//! Fixture (made once in `target/bench/clone`): a 4 GiB ext4 image file
//! (`mkfs.ext4 -d`) holding 1 GiB of deterministic files — half random,
//! half text-like (compressible) — 48 large files and 4096 small ones.
//!
//! 1. Capture: our capture (used blocks from the bitmaps, 1 MiB chunks,
//!    sha256 + zstd, into a fresh chunk store) against `partclone.ext4 -c`
//!    of the same image file in the same run, both from a warm page
//!    cache, medians of three. Bytes read against the used bytes.
//! 2. Deploy: our verified deploy of the capture onto a fresh 4 GiB file
//!    (decompress, sha256 before writing and on read-back, first MiB last,
//!    fsync) against `dd bs=4M conv=fsync` of the same used bytes (laid
//!    out as one file) onto a fresh file: MB/s.
//! 3. Dedupe: one file replaced (`debugfs -w`: rm + write, 4 MiB), then a
//!    second capture into the same store: what it sends against the first.
//!
//! Last line: capture seconds, ours against partclone's, `"better":"lower"`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use appliance::clone::{self, store::DirStore, CaptureOptions};

use crate::bench::XorShift;
use crate::root;

const IMAGE: u64 = 4 << 30;
const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

const WORDS: &[&str] = &[
    "disk",
    "capture",
    "chunk",
    "appliance",
    "kernel",
    "module",
    "partition",
    "ext4",
    "block",
    "bitmap",
    "inode",
    "journal",
    "server",
    "agent",
    "deploy",
    "restore",
    "power",
    "network",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "on",
    "0",
    "1",
    "2",
    "3",
    "42",
    "1024",
];

/// `n` bytes: random when `random`, else words and numbers (text-like).
fn content(rng: &mut XorShift, n: usize, random: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 16);
    if random {
        while v.len() < n {
            v.extend_from_slice(&rng.next().to_le_bytes());
        }
    } else {
        while v.len() < n {
            let r = rng.next();
            v.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
            v.push(if r >> 40 & 15 == 0 { b'\n' } else { b' ' });
        }
    }
    v.truncate(n);
    v
}

fn fixture(dir: &Path) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let tree = dir.join("tree");
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for i in 0..48 {
        let p = tree.join(format!("big/file{i:02}.bin"));
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, content(&mut rng, 16 << 20, i % 2 == 0))?;
    }
    for i in 0..4096 {
        let p = tree.join(format!("small/d{:02}/f{i:04}.txt", i % 64));
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, content(&mut rng, 64 << 10, i % 2 == 0))?;
    }
    let img = dir.join("ext4.img");
    File::create(&img)?.set_len(IMAGE)?;
    crate::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&tree)
            .arg(&img)
            .env("SOURCE_DATE_EPOCH", "1767225600"),
    )?;
    std::fs::remove_dir_all(&tree)?;
    File::create(done)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Reads a file once so every contender starts from a warm page cache.
fn warm(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            return Ok(());
        }
        off += n as u64;
    }
}

fn sync_dir(p: &Path) -> Result<()> {
    rustix::fs::syncfs(File::open(p)?)?;
    Ok(())
}

pub fn run() -> Result<()> {
    for tool in ["partclone.ext4", "mkfs.ext4", "debugfs", "dd"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!("{tool} is missing (see xtask/debian-packages.txt)");
        }
    }
    let dir = root().join("target/bench/clone");
    eprintln!("clone bench: fixture in {} (made once)", dir.display());
    fixture(&dir)?;
    let img = dir.join("ext4.img");
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    warm(&img)?;

    // 1. Capture.
    let opts = CaptureOptions::default();
    let mut ours = Vec::new();
    let mut last = None;
    for i in 0..RUNS {
        let store_dir = work.join(format!("store{i}"));
        let store = DirStore::new(&store_dir);
        let t = Instant::now();
        let (m, rep) = clone::capture_path(&img, &store, &opts, &mut |_, _| {})?;
        let s = t.elapsed().as_secs_f64();
        sync_dir(&store_dir)?;
        ours.push(s);
        eprintln!("  ours run {i}: {s:.2} s");
        if i + 1 < RUNS {
            std::fs::remove_dir_all(&store_dir)?;
        }
        last = Some((m, rep, store_dir));
    }
    let (manifest, report, store_dir) = last.context("no capture")?;
    let mut peer = Vec::new();
    let mut partclone_used = 0u64;
    for i in 0..RUNS {
        let out = work.join("partclone.img");
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        let o = Command::new("partclone.ext4")
            .args(["-c", "-q", "-s"])
            .arg(&img)
            .arg("-o")
            .arg(&out)
            .arg("-L")
            .arg(work.join("partclone.log"))
            .output()
            .context("running partclone.ext4")?;
        let s = t.elapsed().as_secs_f64();
        if !o.status.success() {
            bail!(
                "partclone.ext4 failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        sync_dir(&work)?;
        peer.push(s);
        eprintln!("  partclone run {i}: {s:.2} s");
        partclone_used = std::fs::metadata(&out)?.len();
    }
    let _ = std::fs::remove_file(work.join("partclone.img"));
    let (ours_s, peer_s) = (median(ours), median(peer));

    // 2. Deploy against dd of the same used bytes.
    let store = DirStore::new(&store_dir);
    let target = work.join("target.img");
    File::create(&target)?.set_len(IMAGE)?;
    let t = Instant::now();
    let mut fetch = clone::deploy::StoreFetch(&store);
    clone::deploy::deploy(&manifest, &mut fetch, &target, &mut |_| {})?;
    let deploy_s = t.elapsed().as_secs_f64();
    let captured = manifest.captured_bytes();
    std::fs::remove_file(&target)?;
    let flat = work.join("used.bin");
    {
        let src = File::open(&img)?;
        let mut out = std::io::BufWriter::new(File::create(&flat)?);
        let mut buf = Vec::new();
        for c in &manifest.chunks {
            buf.resize(c.length as usize, 0);
            src.read_exact_at(&mut buf, c.offset)?;
            out.write_all(&buf)?;
        }
        out.flush()?;
    }
    warm(&flat)?;
    let target = work.join("dd-target.img");
    File::create(&target)?.set_len(IMAGE)?;
    let t = Instant::now();
    crate::run(Command::new("dd").args([
        &format!("if={}", flat.display()),
        &format!("of={}", target.display()),
        "bs=4M",
        "conv=fsync,notrunc",
        "status=none",
    ]))?;
    let dd_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&target)?;
    std::fs::remove_file(&flat)?;

    // 3. One file changed, captured again into the same store.
    let changed = work.join("changed.img");
    crate::run(
        Command::new("cp")
            .args(["--sparse=always"])
            .arg(&img)
            .arg(&changed),
    )?;
    let newfile = work.join("new.bin");
    std::fs::write(&newfile, content(&mut XorShift(77), 4 << 20, true))?;
    for cmd in [
        "rm /big/file07.bin".to_owned(),
        format!("write {} /big/file07.bin", newfile.display()),
    ] {
        crate::run(
            Command::new("debugfs")
                .args(["-w", "-R", &cmd])
                .arg(&changed),
        )?;
    }
    let (_, second) = clone::capture_path(&changed, &store, &opts, &mut |_, _| {})?;
    std::fs::remove_file(&changed)?;
    let sent_ratio = second.new_stored_bytes as f64 / report.new_stored_bytes as f64;

    let mb = |b: u64| b as f64 / MIB as f64;
    println!(
        "image: {} MiB ext4, {:.0} MiB used",
        IMAGE / MIB,
        mb(report.used_bytes)
    );
    println!(
        "capture: ours {ours_s:.2} s, partclone.ext4 -c {peer_s:.2} s (median of {RUNS}); ratio {:.2}",
        ours_s / peer_s
    );
    println!(
        "bytes read: ours {:.0} MiB = {:.3}x used; partclone image {:.0} MiB",
        mb(report.bytes_read),
        report.bytes_read as f64 / report.used_bytes as f64,
        mb(partclone_used)
    );
    println!(
        "stored: {} chunks, {:.0} MiB of zstd frames ({:.2}x smaller than used)",
        report.chunks,
        mb(report.new_stored_bytes),
        report.used_bytes as f64 / report.new_stored_bytes as f64
    );
    println!(
        "deploy: ours {:.0} MB/s ({deploy_s:.2} s, verified, read back), dd {:.0} MB/s ({dd_s:.2} s) for {:.0} MiB",
        captured as f64 / deploy_s / 1e6,
        captured as f64 / dd_s / 1e6,
        mb(captured)
    );
    println!(
        "second capture after a one-file change: {} new chunks, {:.2} MiB sent = {:.3}% of the first ({:.0} MiB)",
        second.new_chunks,
        mb(second.new_stored_bytes),
        100.0 * sent_ratio,
        mb(report.new_stored_bytes)
    );
    let _ = std::fs::remove_dir_all(&work);
    crate::bench::report("clone", ours_s, "partclone", peer_s, "s", "lower");
    Ok(())
}
