//! `cargo xtask`: project automation. `test` runs the whole suite with its
//! set-up, `bench <name>` runs a benchmark against its peer in the same run.

mod bench;
mod bench_boot;
mod bench_clone;
mod bench_console;
mod bench_dhcp;
mod bench_install;
mod bench_inventory;
mod bench_mirror;
mod bench_replicate;
mod bench_sync;
mod bench_tftp;
mod fleet;
mod image;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    forget_cargo_run_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["test", rest @ ..] => test(rest),
        ["bench", name, rest @ ..] => bench::run(name, rest),
        ["deps"] => install_deps(),
        ["image", rest @ ..] => image::image(&image::ImageOptions::from_args(rest)?).map(drop),
        ["qemu", rest @ ..] => qemu::qemu(rest),
        ["fleet", rest @ ..] => fleet::fleet(rest),
        ["osinstall", rest @ ..] => osinstall(rest),
        ["man", rest @ ..] => man(rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 image [--refresh] build target/appliance/ (fetching inputs once into cache/store)\n  \
                 qemu [--port N] [--no-rng] [--cpus N]  build the image if needed and boot it under OVMF\n  \
                 fleet [N] [--faults] [--sync]  replication chain of N machines in QEMU (default 3)\n  \
                 man [DIR]        the CLI's man pages from its clap definitions (default target/man)\n  \
                 osinstall [--firmware ovmf|seabios]  a blank QEMU machine installs Debian 12 from the appliance (default seabios: CI runs ovmf)\n  \
                 test [ARGS]      install missing test tools, build the image, run every test\n  \
                 bench builder    the builder against mkfs.ext4/mkfs.fat/mcopy/sgdisk/dd/cpio|gzip\n  \
                 bench console    the web console's machines page (10,000 systems) in Chromium vs curl | jq\n  \
                 bench clone      capture/deploy a 4 GiB ext4 (1 GiB used) vs partclone.ext4 -c and dd\n  \
                 bench tftp       our TFTP server against tftpd-hpa, 64 MiB over loopback\n  \
                 bench inventory  the inventory API against Cobbler 3.3.10 (XML-RPC)\n  \
                 bench replicate  image onto a child's disk: verified block-map writer against curl|dd\n  \
                 bench mirror     apt partial mirror vs aptly mirror create+update\n  \
                 bench sync       10,000 objects + 1 GiB of blobs to a parent vs git push + rsync\n  \
                 deps             install the Debian packages tests need (as root)"
            );
            bail!("unknown or missing command");
        }
    }
}

/// Drops what `cargo run` told this process about the xtask package
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, …) before anything runs cargo
/// again. Build scripts such as ring's rerun when those change, so the
/// cargo runs below would otherwise rebuild ring, rustls, ureq, bundle and
/// appliance each time, and the next plain `cargo` once more: same
/// environment, same fingerprints, one compile.
fn forget_cargo_run_env() {
    let names: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("CARGO_PKG_")
                || matches!(
                    k.as_ref(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
        })
        .collect();
    for k in names {
        // Single-threaded here: nothing else reads the environment yet.
        std::env::remove_var(k);
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Run a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn packages() -> Vec<String> {
    include_str!("../debian-packages.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Tools the tests call; a missing one means the packages are not installed.
const TOOLS: &[&str] = &[
    "e2fsck",
    "debugfs",
    "fsck.fat",
    "mcopy",
    "sgdisk",
    "sfdisk",
    "cpio",
    "objdump",
    "xorriso",
    "isoinfo",
    "skopeo",
    "umoci",
    "dpkg-deb",
    "qemu-system-x86_64",
    "chromium",
    "chromedriver",
    "jq",
    "openssl",
    "socat",
    "bmaptool",
    "npm",
];

fn missing_tools() -> Vec<&'static str> {
    TOOLS
        .iter()
        .copied()
        .filter(|t| {
            !std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
                .unwrap_or(false)
        })
        .collect()
}

fn install_deps() -> Result<()> {
    // One install step for CI and xtask: it also reconciles a preinstalled
    // backported qemu-utils with the archive's qemu-system-x86.
    run(Command::new("sh").arg(root().join("xtask/install-deps.sh")))
}

/// Install the Debian packages when a tool the tests or QEMU need is missing.
pub fn ensure_deps() -> Result<()> {
    if !missing_tools().is_empty() {
        eprintln!(
            "xtask: missing test tools {:?}; installing Debian packages",
            missing_tools()
        );
        install_deps()?;
    }
    if let Some(t) = missing_tools().first() {
        bail!(
            "{t} is still missing after installing {}",
            packages().join(" ")
        );
    }
    Ok(())
}

/// The Python peers the tests use (`python-packages.txt`) in
/// `target/peers/venv`, installed with pip when the list changed since the
/// last install (a copy of it is kept in the venv).
pub fn ensure_python_peers() -> Result<()> {
    let venv = root().join("target/peers/venv");
    let list = root().join("xtask/python-packages.txt");
    let stamp = venv.join("python-packages.txt");
    let want = std::fs::read(&list).with_context(|| format!("reading {}", list.display()))?;
    if std::fs::read(&stamp).ok().as_deref() == Some(&want[..]) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the Python test peers into {}",
        venv.display()
    );
    if !venv.join("bin/python").is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "-r"])
        .arg(&list))?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}

/// The npm peers the tests use (`npm-packages.txt`, exact versions) in
/// `target/peers/node/node_modules`, installed with Debian's npm when the
/// list changed since the last install (a copy of it is kept beside them).
pub fn ensure_node_peers() -> Result<()> {
    let dir = root().join("target/peers/node");
    let list = root().join("xtask/npm-packages.txt");
    let stamp = dir.join("npm-packages.txt");
    let want = std::fs::read(&list).with_context(|| format!("reading {}", list.display()))?;
    if std::fs::read(&stamp).ok().as_deref() == Some(&want[..]) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the npm test peers into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pkgs: Vec<&str> = std::str::from_utf8(&want)
        .context("npm-packages.txt is not UTF-8")?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--save-exact",
            "--prefix",
        ])
        .arg(&dir)
        .args(&pkgs))?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}

/// `cargo xtask man [DIR]`: one man page per command and subcommand,
/// generated by the appliance binary itself (`appliance man DIR`, from its
/// clap definitions with `clap_mangen`), so the pages always match the
/// binary the image carries (which writes the same pages on demand).
fn man(args: &[&str]) -> Result<()> {
    let dir = match args {
        [] => root().join("target/man"),
        [d] => PathBuf::from(d),
        _ => bail!("usage: cargo xtask man [DIR]"),
    };
    let bin = image::build_appliance_binary()?;
    run(Command::new(bin).arg("man").arg(&dir))?;
    eprintln!(
        "man pages in {} (man -l {}/appliance.1)",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// `cargo xtask osinstall [--firmware ovmf|seabios]`: the OS-install QEMU
/// scenario (`tests/tests/osinstall.rs`) for one target firmware. CI runs
/// the UEFI target with the rest of the suite; this runs the legacy-BIOS
/// one (the default here), about 20 minutes under TCG.
fn osinstall(args: &[&str]) -> Result<()> {
    let firmware = match args {
        [] => "seabios",
        ["--firmware", f @ ("ovmf" | "seabios")] => f,
        _ => bail!("usage: cargo xtask osinstall [--firmware ovmf|seabios]"),
    };
    ensure_deps()?;
    image::image(&image::ImageOptions::from_args(&[])?)?;
    run(Command::new(cargo())
        .current_dir(root())
        .args([
            "test",
            "--release",
            "-p",
            "integration-tests",
            "--test",
            "osinstall",
            "--",
            "--nocapture",
        ])
        .env("OSINSTALL_FIRMWARE", firmware))
}

fn test(extra: &[&str]) -> Result<()> {
    ensure_deps()?;
    ensure_python_peers()?;
    ensure_node_peers()?;
    // The QEMU tests boot the shipped image: build it first (offline after
    // the first time, thanks to the lock in the store).
    image::image(&image::ImageOptions::from_args(&[])?)?;
    run(Command::new(cargo())
        .current_dir(root())
        .args(["test", "--workspace", "--release"])
        .args(extra))
}
