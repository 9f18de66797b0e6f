//! `appliance replica register|list|remove|join`: this node's children over
//! the server's API, and (`join`) the node-local parent link of a child.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Conn;

/// `appliance replica …`.
#[derive(Debug, Args)]
pub struct ReplicaCmd {
    #[command(subcommand)]
    pub verb: ReplicaVerb,
    /// The top-level connection flags (filled in by [`super::run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum ReplicaVerb {
    /// Register a child and print its node id and token (shown once).
    Register {
        #[arg(long)]
        name: Option<String>,
        /// MAC of the child's boot interface.
        #[arg(long)]
        mac: Option<String>,
        /// Node id to register (default: a new random one).
        #[arg(long)]
        node_id: Option<uuid::Uuid>,
    },
    /// List children with their release and last contact.
    List,
    /// Forget a child and revoke its token.
    Remove {
        node_id: uuid::Uuid,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Make a data directory a child of PARENT (writes state/parent.json
    /// and state/node.json; for host setups and tests). `--token` is the
    /// token the parent issued at registration.
    Join {
        /// The child's data directory [default: config file's `data`, else /data].
        #[arg(long, env = "APPLIANCE_DATA")]
        data: Option<PathBuf>,
        /// The parent's API base URL.
        #[arg(long)]
        parent: String,
        /// This node's id as the parent registered it.
        #[arg(long)]
        node_id: uuid::Uuid,
        /// The parent's node id (default: asked from the parent).
        #[arg(long)]
        parent_node_id: Option<uuid::Uuid>,
    },
}

pub fn replica(cmd: ReplicaCmd) -> Result<()> {
    let client = cmd.conn.client();
    match cmd.verb {
        ReplicaVerb::Register { name, mac, node_id } => {
            let v = client.json(
                "POST",
                "/api/v1/replicas",
                Some(&json!({"name": name, "mac": mac, "node_id": node_id})),
            )?;
            if cmd.conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("node_id {}", v["node_id"].as_str().unwrap_or(""));
                println!("token {}", v["token"].as_str().unwrap_or(""));
                println!(
                    "parent_node_id {}",
                    v["parent_node_id"].as_str().unwrap_or("")
                );
                eprintln!("the token is shown only now");
            }
        }
        ReplicaVerb::List => {
            let v = serde_json::Value::Array(client.list("/api/v1/replicas")?);
            if cmd.conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<36} {:<16} {:<18} {:<10} {:<14} URL",
                "NODE ID", "NAME", "MAC", "STATUS", "LAST CONTACT"
            );
            for r in v.as_array().into_iter().flatten() {
                println!(
                    "{:<36} {:<16} {:<18} {:<10} {:<14} {}",
                    r["node_id"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or("-"),
                    r["mac"].as_str().unwrap_or("-"),
                    r["status"].as_str().unwrap_or(""),
                    super::fmt_time(&r["last_contact"]),
                    r["url"].as_str().unwrap_or("-"),
                );
            }
        }
        ReplicaVerb::Remove { node_id, yes } => {
            super::confirm(
                &format!("forget replica {node_id} and revoke its token"),
                yes,
            )?;
            let v = client.json("DELETE", &format!("/api/v1/replicas/{node_id}"), None)?;
            if cmd.conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("removed replica {node_id}");
            }
        }
        ReplicaVerb::Join {
            data,
            parent,
            node_id,
            parent_node_id,
        } => {
            let parent_token = cmd
                .conn
                .token
                .clone()
                .context("replica join needs --token (the token the parent issued)")?;
            let url = super::client::Client::new(&parent, None).url;
            // An https parent is pinned to the CA given with --ca.
            let ca = match (&cmd.conn.ca, url.starts_with("https://")) {
                (Some(path), true) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading the CA file {}", path.display()))?,
                ),
                (None, true) => anyhow::bail!(
                    "an https parent needs its site CA (--ca FILE) to pin it in the parent link"
                ),
                (_, false) => None,
            };
            let client = |token: Option<String>| {
                super::client::Client::new(&url, token)
                    .trust(cmd.conn.roots.clone())
                    .allow_plain_token(cmd.conn.insecure_http)
            };
            let parent_node_id = match parent_node_id {
                Some(id) => id,
                None => {
                    let v = client(None)
                        .json("GET", "/api/v1/version", None)
                        .context("asking the parent for its node id (or pass --parent-node-id)")?;
                    v["node_id"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .context("the parent's /api/v1/version has no node_id")?
                }
            };
            // A child keeps only its own replica token: an operator's token
            // in a child's state would hand the whole parent to whoever
            // reads the child's disk.
            let who = client(Some(parent_token.clone()))
                .json("GET", &format!("/api/v1/replicas/{node_id}/token"), None)
                .context("checking the token with the parent")?;
            let want = format!("replica:{node_id}");
            if who["scope"].as_str() != Some(want.as_str()) {
                anyhow::bail!(
                    "the token given is a {} token; replica join stores only the replica token \
                     that `appliance replica register` printed for node {node_id}",
                    who["scope"].as_str().unwrap_or("unknown")
                );
            }
            let link = crate::parent::ParentLink {
                url,
                token: parent_token,
                node_id,
                parent_node_id,
                ca,
            };
            let data = super::defaults::data(data)?;
            crate::parent::join(&data, &link)?;
            if cmd.conn.json {
                println!(
                    "{}",
                    json!({"node_id": node_id, "parent": link.url, "parent_node_id": parent_node_id})
                );
            } else {
                println!(
                    "{} is node {node_id}, child of {parent_node_id} at {}",
                    data.display(),
                    link.url
                );
            }
        }
    }
    Ok(())
}
