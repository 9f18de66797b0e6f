//! `cargo xtask fleet <N>`: build the image if needed and run a replication
//! chain of N machines in QEMU ([`integration_tests::fleet`]). Prints one
//! row per generation; exits 0 only when the last machine runs the first
//! machine's release and every parent lists its child.

use anyhow::{bail, Context, Result};

use crate::image::{image, ImageOptions};

pub fn fleet(args: &[&str]) -> Result<()> {
    let faults = integration_tests::fleet::Faults {
        too_small: args.contains(&"--faults"),
        kill_mid_write: args.contains(&"--faults"),
        sync: args.contains(&"--sync"),
    };
    let args: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = match args.as_slice() {
        [] => 3,
        [n] => n
            .parse()
            .with_context(|| format!("{n:?} is not a machine count"))?,
        _ => bail!("usage: cargo xtask fleet [N] [--faults] [--sync]  (N ≥ 2 machines, default 3)"),
    };
    if n < 2 {
        bail!("a fleet needs at least two machines");
    }
    crate::ensure_deps()?;
    let out = image(&ImageOptions::from_args(&[])?)?;
    let work = tempfile::tempdir().context("creating a work directory")?;
    eprintln!("fleet of {n} in {}", work.path().display());
    let report = integration_tests::fleet::run(
        &out.join("appliance.img"),
        n,
        work.path(),
        faults,
        &mut |l| eprintln!("fleet: {l}"),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    print!("{}", integration_tests::fleet::table(&report));
    for p in &report.problems {
        eprintln!("problem: {p}");
    }
    println!(
        "{} release {} on all {n} machines, {:.1}s in all",
        if report.ok { "OK" } else { "FAILED" },
        report.release,
        report.total_seconds
    );
    if !report.ok {
        bail!("the fleet did not converge");
    }
    Ok(())
}
