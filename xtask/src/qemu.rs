//! `cargo xtask qemu`: build the image if needed and boot it under OVMF with
//! the API forwarded to a loopback port.

use anyhow::{Context, Result};
use integration_tests::qemu::{Vm, VmConfig};

use crate::image::{image, ImageOptions};

pub fn qemu(args: &[&str]) -> Result<()> {
    let mut port = 8080u16;
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
    let token = vm
        .first_token()
        .unwrap_or_else(|| "<token from the console>".into());
    println!("API token (printed once by the appliance): {token}");
    println!("power it off with: curl -X POST -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"action\":\"poweroff\"}}' http://127.0.0.1:{port}/api/v1/power");
    let st = vm.wait()?;
    println!("QEMU exited: {st}");
    Ok(())
}
