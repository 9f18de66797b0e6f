//! `appliance power on|off|cycle|status <system> [--boot network|disk]`:
//! a system's power through the server's API
//! (`/api/v1/systems/{name}/power`), which talks to the BMC. Credentials
//! stay on the server; nothing here prints them.

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::{print_json, Conn};

/// `appliance power …`.
#[derive(Debug, Args)]
pub struct PowerCmd {
    #[command(subcommand)]
    pub verb: PowerVerb,
    #[command(flatten)]
    pub conn: Conn,
}

/// A one-time boot device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Boot {
    Network,
    Disk,
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
        PowerVerb::On(t) => ("on", t),
        PowerVerb::Off(t) => ("off", t),
        PowerVerb::Cycle(t) => ("cycle", t),
    };
    let mut body = json!({ "action": action });
    if let Some(b) = t.boot {
        body["boot"] = match b {
            Boot::Network => "network",
            Boot::Disk => "disk",
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
