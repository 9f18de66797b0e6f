//! `cargo xtask qemu`: build the image if needed and boot it under OVMF with
//! the API forwarded to a loopback port.
//!
//! The VM gets a `virtio-rng-pci` device unless `--no-rng`: the disk is a
//! snapshot, so every run is a first boot, and without an RNG (under TCG)
//! the kernel's random pool takes minutes to initialize. The appliance
//! does not wait for it (the API and the network come up at once, see
//! `appliance::entropy`), but its first API token does. `--no-rng --cpus 1`
//! boots the way a bare QEMU command line would.

use anyhow::{Context, Result};
use integration_tests::qemu::{Vm, VmConfig};

use crate::image::{image, ImageOptions};

pub fn qemu(args: &[&str]) -> Result<()> {
    let mut port = 8080u16;
    let mut rng = true;
    let mut cpus = 2u32;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--port" => {
                port = it
                    .next()
                    .context("--port needs a number")?
                    .parse()
                    .context("parsing --port")?
            }
            "--no-rng" => rng = false,
            "--cpus" => {
                cpus = it
                    .next()
                    .context("--cpus needs a number")?
                    .parse()
                    .context("parsing --cpus")?
            }
            other => rest.push(other),
        }
    }
    crate::ensure_deps()?;
    let out = image(&ImageOptions::from_args(&rest)?)?;
    let cfg = VmConfig {
        disk: out.join("appliance.img"),
        snapshot: true,
        memory_mb: 1024,
        api_port: port,
        dir: out.join("qemu"),
        extra: vec![],
        rng,
        cpus,
        guestfwd: vec![],
    };
    let mut vm = Vm::boot(&cfg)?;
    println!(
        "booting {} (QEMU pid {}, serial log {})",
        cfg.disk.display(),
        vm.pid(),
        vm.serial_log.display()
    );
    let r = vm
        .wait_http("/api/v1/version", std::time::Duration::from_secs(300))
        .map_err(anyhow::Error::msg)?;
    println!("appliance API: http://127.0.0.1:{port}/api/v1/version");
    println!("{}", r.body);
    let token = vm.first_token().unwrap_or_else(|| {
        println!(
            "the first API token follows on the console once the guest's random pool is ready"
        );
        "<token from the console>".into()
    });
    println!("API token (printed once by the appliance): {token}");
    println!("power it off with: curl -X POST -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"action\":\"poweroff\"}}' http://127.0.0.1:{port}/api/v1/power");
    let st = vm.wait()?;
    println!("QEMU exited: {st}");
    Ok(())
}
