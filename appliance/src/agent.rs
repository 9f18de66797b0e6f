//! `appliance agent`: what a PXE-booted target runs (started by init when
//! the kernel command line says `appliance.mode=agent`). It reports its
//! hardware to the server that booted it (`appliance.server=<url>`), then
//! polls for work: `wait`, or (booted with `appliance.mode=install`)
//! `install`, which runs [`crate::install`] and reboots into the installed
//! appliance; `capture` and `deploy` run [`crate::clone::agent`].

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agents::{CheckIn, Work};

/// The MAC of the interface that has the default route, else the first NIC.
pub fn boot_mac(hw: &crate::hwinfo::Hardware) -> Option<String> {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let iface = route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000")).then(|| f[0].to_string())
    });
    iface
        .and_then(|i| hw.nics.iter().find(|n| n.name == i))
        .or_else(|| hw.nics.first())
        .map(|n| n.mac.clone())
}

fn agent_client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Check in once; returns the server's answer body.
pub fn check_in(server: &str, checkin: &CheckIn) -> Result<String> {
    let url = format!("{}/api/v1/agents", server.trim_end_matches('/'));
    let mut resp = agent_client()
        .post(&url)
        .header("content-type", "application/json")
        .send(serde_json::to_string(checkin)?)
        .with_context(|| format!("checking in at {url}"))?;
    resp.body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {url}"))
}

/// Run the agent loop: check in (retrying until the server answers), then
/// ask for work forever. `install`: booted to install this appliance.
pub fn run(server: &str, release: Option<String>, install: bool, mgmt: &[String]) -> Result<()> {
    if server.is_empty() {
        bail!("agent mode needs appliance.server=<url> on the kernel command line");
    }
    let hw = crate::hwinfo::collect(Path::new("/"));
    let mac = boot_mac(&hw).context("no network interface to report")?;
    let uplink = hw
        .nics
        .iter()
        .find(|n| n.mac == mac)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let others: Vec<String> = hw
        .nics
        .iter()
        .filter(|n| n.mac != mac && !mgmt.contains(&n.name))
        .map(|n| n.name.clone())
        .collect();
    let firmware = hw.firmware.clone();
    let ci = CheckIn {
        mac: mac.clone(),
        hardware: hw,
        release,
        mode: Some(if install { "install" } else { "agent" }.into()),
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match check_in(server, &ci) {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "check-in failed; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    crate::console::marker(&format!("agent checked in with {server} as {mac}"));
    let url = format!("{}/api/v1/agents/{mac}/work", server.trim_end_matches('/'));
    loop {
        let next = match agent_client().get(&url).call() {
            Ok(mut r) => match r.body_mut().read_json::<Work>() {
                Ok(Work::Wait { retry_secs }) => retry_secs.clamp(1, 300),
                Ok(Work::Install(work)) if install => {
                    match crate::install::run(&work, &mac, &uplink, &others) {
                        Ok(report) => {
                            tracing::info!(%report, "installed");
                            crate::console::marker("install complete; rebooting");
                            reboot();
                            300
                        }
                        Err(e) => {
                            let msg = format!("{e:#}");
                            crate::console::marker(&format!("install failed: {msg}"));
                            crate::install::Reporter::new(&work.parent_url, &mac, &work.token)
                                .failed(msg);
                            10
                        }
                    }
                }
                Ok(Work::Install(_)) => {
                    tracing::warn!("install work ignored: this boot is not in install mode");
                    30
                }
                Ok(Work::OsInstall(work)) => {
                    match crate::osinstall::target::run(&work, &mac, &firmware) {
                        Ok(report) => {
                            crate::console::marker(&format!(
                                "OS install complete ({report}); rebooting"
                            ));
                            reboot();
                            300
                        }
                        Err(e) => {
                            // `run` reported it to the server already.
                            crate::console::marker(&format!("OS install failed: {e:#}"));
                            30
                        }
                    }
                }
                Ok(Work::Capture(work)) => {
                    match crate::clone::agent::capture(&work) {
                        Ok(_) => crate::console::marker("capture complete"),
                        Err(e) => crate::console::marker(&format!("capture failed: {e:#}")),
                    }
                    5
                }
                Ok(Work::Deploy(work)) => {
                    match crate::clone::agent::deploy(&work) {
                        Ok(_) => crate::console::marker("deploy complete"),
                        Err(e) => crate::console::marker(&format!("deploy failed: {e:#}")),
                    }
                    5
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable work answer");
                    10
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "asking for work failed");
                10
            }
        };
        std::thread::sleep(Duration::from_secs(next));
    }
}

/// Asks init (PID 1) to reboot; outside our init, exits.
fn reboot() {
    if crate::power::under_our_init() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::INIT,
            crate::contract::SIGNAL_REBOOT,
        );
    } else {
        std::process::exit(0);
    }
}
