//! `appliance power on|off|cycle|status <system> [--boot network|disk|cd]`
//! and `appliance power media <system> --insert URL|--eject`: a system's
//! power and virtual media through the server's API
//! (`/api/v1/systems/{name}/power`, `…/media`), which talks to the BMC.
//! Credentials stay on the server; nothing here prints them.

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::{print_json, Conn};

/// `appliance power …`.
#[derive(Debug, Args)]
pub struct PowerCmd {
    #[command(subcommand)]
    pub verb: PowerVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// A one-time boot device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Boot {
    Network,
    Disk,
    /// The (virtual) CD/DVD drive.
    Cd,
}

#[derive(Debug, Subcommand)]
pub enum PowerVerb {
    /// Power a system on (nothing when it is on already).
    On(Target),
    /// Power a system off, hard.
    Off(Target),
    /// Power-cycle a system (power it on when it is off).
    Cycle(Target),
    /// Read a system's power state from its BMC.
    Status {
        /// System name.
        system: String,
    },
    /// Insert an ISO as virtual media (Redfish BMCs), or eject it. To boot
    /// an ISO on a machine without PXE: `--insert URL`, then
    /// `cycle --boot cd`.
    Media {
        /// System name.
        system: String,
        /// The ISO's http:// or https:// URL (the BMC fetches it).
        #[arg(long, conflicts_with = "eject", required_unless_present = "eject")]
        insert: Option<String>,
        /// Eject whatever is inserted.
        #[arg(long)]
        eject: bool,
    },
}

/// The system and an optional one-time boot device.
#[derive(Debug, Args)]
pub struct Target {
    /// System name.
    pub system: String,
    /// Boot from this device next time only (set before the action).
    #[arg(long, value_enum)]
    pub boot: Option<Boot>,
}

pub fn power(cmd: PowerCmd) -> Result<()> {
    let c = cmd.conn.client();
    let (action, t) = match cmd.verb {
        PowerVerb::Status { system } => {
            let v = c.json("GET", &format!("/api/v1/systems/{system}/power"), None)?;
            if cmd.conn.json {
                print_json(&v);
            } else {
                println!(
                    "{}: {} ({})",
                    v["system"].as_str().unwrap_or(&system),
                    v["state"].as_str().unwrap_or("unknown"),
                    v["driver"].as_str().unwrap_or("?")
                );
            }
            return Ok(());
        }
        PowerVerb::Media {
            system,
            insert,
            eject: _,
        } => {
            let body = match &insert {
                Some(url) => json!({"action": "insert", "image": url}),
                None => json!({"action": "eject"}),
            };
            let v = c.json(
                "POST",
                &format!("/api/v1/systems/{system}/media"),
                Some(&body),
            )?;
            if cmd.conn.json {
                print_json(&v);
            } else if insert.is_some() {
                println!(
                    "{system}: inserted in {}",
                    v["slot"].as_str().unwrap_or("?")
                );
            } else {
                println!(
                    "{system}: ejected ({} slot(s) held media)",
                    v["ejected"].as_u64().unwrap_or(0)
                );
            }
            return Ok(());
        }
        PowerVerb::On(t) => ("on", t),
        PowerVerb::Off(t) => ("off", t),
        PowerVerb::Cycle(t) => ("cycle", t),
    };
    let mut body = json!({ "action": action });
    if let Some(b) = t.boot {
        body["boot"] = match b {
            Boot::Network => "network",
            Boot::Disk => "disk",
            Boot::Cd => "cd",
        }
        .into();
    }
    let v = c.json(
        "POST",
        &format!("/api/v1/systems/{}/power", t.system),
        Some(&body),
    )?;
    if cmd.conn.json {
        print_json(&v);
    } else {
        let boot = v["boot"]
            .as_str()
            .map(|b| format!(", next boot {b}"))
            .unwrap_or_default();
        println!(
            "{}: {action} done ({}{boot})",
            t.system,
            v["driver"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
