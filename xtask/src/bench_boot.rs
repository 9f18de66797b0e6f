//! `cargo xtask bench boot`: time from QEMU start to the API answering, for
//! the shipped image under OVMF, split into firmware, kernel and
//! init-to-API from the serial log; against the floor: the same UKI stub
//! and kernel with an initramfs holding only a trivial `/init` that prints
//! a marker and powers off, measured in the same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use builder::definition;
use builder::manifest::Manifest;
use builder::plan::{self, BuildRequest};
use builder::treefile::{BlobDir, TreeFile, TreeFileKind};
use bundle::store::Store;
use integration_tests::qemu::{Vm, VmConfig};
use integration_tests::{free_port, http};

use crate::image::{image, ImageOptions};

const RUNS: usize = 3;
const FLOOR_MARKER: &str = "BENCH-FLOOR-INIT-REACHED";
/// OVMF's last line before it starts the boot loader.
const FIRMWARE_DONE: &str = "BdsDxe: starting";

struct Sample {
    firmware: f64,
    kernel: f64,
    init_to_api: f64,
    total: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Poll the serial log and the API, noting when each milestone is first seen.
fn boot_ours(disk: &Path, work: &Path) -> Result<Sample> {
    let port = free_port();
    let mut vm = Vm::boot(&VmConfig {
        disk: disk.to_path_buf(),
        snapshot: true,
        memory_mb: 1024,
        api_port: port,
        dir: work.to_path_buf(),
        extra: vec![],
        rng: true,
        cpus: 2,
        guestfwd: vec![],
    })?;
    let t0 = vm.started;
    let (mut fw, mut init) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    let api = loop {
        let serial = vm.serial();
        if fw.is_none() && serial.contains(FIRMWARE_DONE) {
            fw = Some(t0.elapsed().as_secs_f64());
        }
        if init.is_none() && serial.contains("appliance: init started") {
            init = Some(t0.elapsed().as_secs_f64());
        }
        if init.is_some() {
            if let Ok(r) = http::get_within(port, "/api/v1/version", Duration::from_millis(300)) {
                if r.status == 200 {
                    break t0.elapsed().as_secs_f64();
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the appliance did not come up; serial:\n{serial}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(token) = vm.first_token() {
        let _ = http::post_auth(port, "/api/v1/power", r#"{"action":"poweroff"}"#, &token);
    }
    vm.wait_exit(Duration::from_secs(60));
    let fw = fw.context("OVMF's BdsDxe line never appeared on the serial console")?;
    let init = init.unwrap_or(api);
    Ok(Sample {
        firmware: fw,
        kernel: init - fw,
        init_to_api: api - init,
        total: api,
    })
}

fn boot_floor(disk: &Path, work: &Path) -> Result<Sample> {
    let mut vm = Vm::boot(&VmConfig {
        disk: disk.to_path_buf(),
        snapshot: true,
        memory_mb: 1024,
        api_port: free_port(),
        dir: work.to_path_buf(),
        extra: vec![],
        rng: true,
        cpus: 2,
        guestfwd: vec![],
    })?;
    let t0 = vm.started;
    let mut fw = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let total = loop {
        let serial = vm.serial();
        if fw.is_none() && serial.contains(FIRMWARE_DONE) {
            fw = Some(t0.elapsed().as_secs_f64());
        }
        if serial.contains(FLOOR_MARKER) {
            break t0.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("the floor image never printed its marker; serial:\n{serial}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    vm.wait_exit(Duration::from_secs(30));
    let fw = fw.unwrap_or(0.0);
    Ok(Sample {
        firmware: fw,
        kernel: total - fw,
        init_to_api: 0.0,
        total,
    })
}

/// The floor image: the shipped stub and kernel, an initramfs with busybox
/// and a two-line `/init`.
fn build_floor(store: &Store, m: &Manifest, out: &Path) -> Result<std::path::PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: install busybox-static");
    }
    let (bb, _) = store.put_file(busybox)?;
    let text = format!(
        r##"[image]
name = "floor"
epoch = {epoch}

[inputs]
kernel = {{ digest = "{kernel}" }}
stub = {{ digest = "{stub}" }}
busybox = {{ digest = "{bb}" }}

[kernel]
image = "kernel"
cmdline = "{cmdline}"

[initramfs]
files = [
  {{ path = "bin/busybox", input = "busybox", mode = 0o755 }},
  {{ path = "dev/console", type = "char", major = 5, minor = 1, mode = 0o600 }},
  {{ path = "init", mode = 0o755, text = "#!/bin/busybox sh\n/bin/busybox echo {FLOOR_MARKER} > /dev/console\n/bin/busybox poweroff -f\n" }},
]

[uki]
stub = "stub"

[disk]
size = "72MiB"

[[partitions]]
label = "esp"
type = "esp"
size = "fill"
filesystem = "fat32"
files = [{{ path = "EFI/BOOT/BOOTX64.EFI", output = "uki" }}]
"##,
        epoch = m.epoch,
        kernel = m.inputs["kernel"].digest,
        stub = m.inputs["stub"].digest,
        cmdline = m.kernel.as_ref().map(|k| k.cmdline.as_str()).unwrap_or(""),
    );
    let (def, src) = definition::parse("floor.toml", &text)?;
    let blobs = BlobDir::new(store.root());
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &BTreeMap::new())?,
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch: m.epoch,
        out_dir: out,
        sign: None,
    };
    plan::build(&req)?;
    Ok(out.join("floor.img"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub fn run() -> Result<()> {
    let opts = ImageOptions::from_args(&[])?;
    let out = image(&opts)?;
    let store = Store::open(&opts.store)?;
    let m = Manifest::from_bytes(&std::fs::read(out.join("manifest.json"))?)?;
    let work = crate::root().join("target/bench/boot");
    let floor_disk = build_floor(&store, &m, &work.join("floor"))?;

    // Size breakdown.
    let size = |k: &str| m.outputs.get(k).map(|o| o.size).unwrap_or(0);
    let modules_tree = TreeFile::load(&BlobDir::new(store.root()), &m.inputs["modules"].digest)?;
    let loaded: Vec<&String> = m
        .kernel
        .as_ref()
        .map(|k| k.modules.iter().collect())
        .unwrap_or_default();
    let modules_bytes: u64 = modules_tree
        .entries
        .iter()
        .filter(|e| {
            loaded
                .iter()
                .any(|n| builder::kmod::module_name(&e.path) == **n)
        })
        .map(|e| match e.kind {
            TreeFileKind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let bundle_tree = TreeFile::load(&BlobDir::new(store.root()), &m.inputs["bundle"].digest)?;
    let bundle_bytes: u64 = bundle_tree
        .entries
        .iter()
        .map(|e| match e.kind {
            TreeFileKind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    eprintln!("image size breakdown:");
    eprintln!("  kernel (bzImage)        {:7.1} MiB", mib(size("kernel")));
    eprintln!(
        "  initramfs (gzip)        {:7.1} MiB",
        mib(size("initramfs"))
    );
    eprintln!(
        "    modules ({:2}, raw)     {:7.1} MiB",
        loaded.len(),
        mib(modules_bytes)
    );
    eprintln!(
        "    appliance binary      {:7.1} MiB",
        mib(m.inputs["appliance"].size)
    );
    eprintln!("  UKI                     {:7.1} MiB", mib(size("uki")));
    eprintln!("  bundle on data part.    {:7.1} MiB", mib(bundle_bytes));

    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for i in 0..RUNS {
        let o = boot_ours(&out.join("appliance.img"), &work.join(format!("ours-{i}")))?;
        eprintln!(
            "run {}: ours {:.2} s (firmware {:.2}, kernel {:.2}, init→API {:.2})",
            i + 1,
            o.total,
            o.firmware,
            o.kernel,
            o.init_to_api
        );
        ours.push(o);
        let f = boot_floor(&floor_disk, &work.join(format!("floor-{i}")))?;
        eprintln!(
            "run {}: floor {:.2} s (firmware {:.2}, kernel+init {:.2})",
            i + 1,
            f.total,
            f.firmware,
            f.kernel
        );
        floor.push(f);
    }
    let o = median(ours.iter().map(|s| s.total).collect());
    let f = median(floor.iter().map(|s| s.total).collect());
    eprintln!(
        "median of {RUNS} ({}): ours {o:.2} s = firmware {:.2} + kernel {:.2} + init→API {:.2}; floor {f:.2} s",
        integration_tests::qemu::accel(),
        median(ours.iter().map(|s| s.firmware).collect()),
        median(ours.iter().map(|s| s.kernel).collect()),
        median(ours.iter().map(|s| s.init_to_api).collect()),
    );
    crate::bench::report("boot", o, "kernel-only", f, "s", "lower");
    Ok(())
}
