//! `appliance network serve|list|stop` and `appliance agents`: provisioning
//! networks and enlisted machines, over the server's REST API.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::Conn;
use crate::network::{Mode, NetworkSpec};

/// `appliance network …`.
#[derive(Debug, Args)]
pub struct NetworkCmd {
    #[command(subcommand)]
    pub verb: NetworkVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum NetworkVerb {
    /// Serve PXE (DHCP, TFTP, HTTP boot) on an interface.
    Serve {
        /// The provisioning interface, e.g. eth1.
        iface: String,
        /// Our address and prefix on it, e.g. 10.77.0.1/24.
        #[arg(long)]
        cidr: String,
        /// authoritative: hand out addresses; proxy: boot options only.
        #[arg(long, value_enum, default_value_t = Mode::Authoritative)]
        mode: Mode,
        /// Address pool A-B (default: the upper half of the subnet).
        #[arg(long)]
        pool: Option<String>,
        /// Serve authoritatively even if another DHCP server answers.
        #[arg(long)]
        force: bool,
    },
    /// List served networks.
    List,
    /// Stop serving an interface.
    Stop { iface: String },
}

/// `appliance agents`: machines that PXE-booted into agent mode.
#[derive(Debug, Args)]
pub struct AgentsCmd {
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

pub fn network(cmd: NetworkCmd) -> Result<()> {
    let client = cmd.conn.client();
    let v = match cmd.verb {
        NetworkVerb::Serve {
            iface,
            cidr,
            mode,
            pool,
            force,
        } => {
            let spec = NetworkSpec {
                iface,
                cidr,
                mode,
                pool,
                force,
            };
            client.json(
                "POST",
                "/api/v1/networks",
                Some(&serde_json::to_value(&spec)?),
            )?
        }
        NetworkVerb::List => Value::Array(client.list("/api/v1/networks")?),
        NetworkVerb::Stop { iface } => {
            client.json("DELETE", &format!("/api/v1/networks/{iface}"), None)?;
            Value::Null
        }
    };
    if cmd.conn.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<&Value> = match &v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => vec![],
        one => vec![one],
    };
    if !rows.is_empty() {
        println!(
            "{:<10} {:<18} {:<14} {:<30} RUNNING",
            "IFACE", "CIDR", "MODE", "POOL"
        );
    }
    for r in rows {
        println!(
            "{:<10} {:<18} {:<14} {:<30} {}",
            r["iface"].as_str().unwrap_or(""),
            r["cidr"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["pool"].as_str().unwrap_or("(default)"),
            r["running"].as_bool().unwrap_or(false)
        );
    }
    Ok(())
}

pub fn agents(cmd: AgentsCmd) -> Result<()> {
    let v = Value::Array(cmd.conn.client().list("/api/v1/agents")?);
    if cmd.conn.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<6} {:>5} {:>8} {:>6} CHECK-INS",
        "MAC", "FW", "CPUS", "MEM MiB", "DISKS"
    );
    for a in v.as_array().into_iter().flatten() {
        let hw = &a["hardware"];
        println!(
            "{:<18} {:<6} {:>5} {:>8} {:>6} {}",
            a["mac"].as_str().unwrap_or(""),
            hw["firmware"].as_str().unwrap_or(""),
            hw["cpus"].as_u64().unwrap_or(0),
            hw["memory_bytes"].as_u64().unwrap_or(0) >> 20,
            hw["disks"].as_array().map(|d| d.len()).unwrap_or(0),
            a["checkins"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}
