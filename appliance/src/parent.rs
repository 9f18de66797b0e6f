//! The link from a child to its parent, node-local in
//! `<data>/state/parent.json` (mode 0600, it holds a secret):
//! `{"url":"http://host:port","token":"apl_…","node_id":"<this node's id as
//! registered>","parent_node_id":"<uuid>","ca":"-----BEGIN CERTIFICATE-----…"}`.
//!
//! `ca` (optional) pins the parent's site CA: with it the link's URL must
//! be `https://` and every call to the parent (check-ins, sync) trusts
//! exactly that CA. Without it (what the installer writes today) the link
//! is plain HTTP and the replica token crosses the network in clear.
//!
//! The installer (or `appliance replica join`) writes it together with
//! `state/node.json`, whose id must be the same. When it exists,
//! `appliance serve` checks in with the parent right after start and then
//! every interval ([`run_checkins`]), sending its release and the URL it is
//! reachable at; failures are logged and retried on the next tick.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cli::client::Client;
use crate::replicas::CheckinRequest;

/// Where the link lives inside the data directory.
pub const PARENT_FILE: &str = "state/parent.json";

/// Default interval between check-ins.
pub const CHECKIN_INTERVAL: Duration = Duration::from_secs(60);

/// The parent link.
/// Unknown fields are ignored (the installer may add some).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent's API base URL, e.g. `http://10.77.0.1`.
    pub url: String,
    /// The `replica:<node_id>` token the parent issued.
    pub token: String,
    /// This node's id, as the parent registered it.
    pub node_id: Uuid,
    /// The parent's own node id.
    pub parent_node_id: Uuid,
    /// The parent's site CA certificate (PEM), pinned for HTTPS calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl ParentLink {
    /// A client for the parent's API, with this link's token: trusting
    /// only the pinned CA when the link has one (an unparsable one trusts
    /// nothing), plain HTTP allowed only when it has none.
    pub fn client(&self, timeout: Duration) -> Client {
        let c = Client::with_timeout(&self.url, Some(self.token.clone()), Some(timeout));
        match &self.ca {
            Some(pem) => {
                let roots =
                    crate::cli::client::roots_from_pem(pem.as_bytes()).unwrap_or_else(|e| {
                        tracing::error!(
                            error = format!("{e:#}"),
                            "the parent link's CA is unreadable; trusting nothing"
                        );
                        std::sync::Arc::new(Vec::new())
                    });
                c.trust(Some(roots))
            }
            None => c.allow_plain_token(true),
        }
    }
}

/// The link under `data`, if there is one.
pub fn load(data: &Path) -> Result<Option<ParentLink>> {
    let path = data.join(PARENT_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the link atomically (temp + fsync + rename), mode 0600.
pub fn save(data: &Path, link: &ParentLink) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = data.join(PARENT_FILE);
    let mut bytes = serde_json::to_vec_pretty(link).context("encoding the parent link")?;
    bytes.push(b'\n');
    crate::state::write_atomic(&path, &bytes, true, crate::state::Secrecy::Secret)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))
}

/// Writes `parent.json` and `node.json` for a child (what the installer
/// does; `appliance replica join` for host setups). An existing `node.json`
/// with another id is an error: the node would check in as someone else.
pub fn join(data: &Path, link: &ParentLink) -> Result<()> {
    std::fs::create_dir_all(data.join("state"))
        .with_context(|| format!("creating {}", data.join("state").display()))?;
    if let Some(id) = crate::node::load(data)? {
        if id != link.node_id {
            anyhow::bail!(
                "{} already holds node id {id}, not {}; remove it to re-identify this node",
                data.join(crate::contract::NODE_FILE).display(),
                link.node_id
            );
        }
    } else {
        crate::node::write(
            data,
            &crate::node::NodeFile {
                node_id: link.node_id,
            },
        )?;
    }
    save(data, link)
}

/// One check-in with the parent (blocking).
pub fn checkin(link: &ParentLink, report: &CheckinRequest) -> Result<()> {
    link.client(Duration::from_secs(20))
        .json(
            "POST",
            &format!("/api/v1/replicas/{}/checkin", link.node_id),
            Some(&serde_json::to_value(report)?),
        )
        .with_context(|| format!("checking in with the parent {}", link.url))?;
    Ok(())
}

/// Checks in right away and then every `interval`, forever; failures are
/// logged and retried on the next tick.
pub async fn run_checkins(link: ParentLink, report: CheckinRequest, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let (l, r) = (link.clone(), report.clone());
        let res = tokio::task::spawn_blocking(move || checkin(&l, &r)).await;
        match res {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(parent = %link.url, "parent check-in works again");
                }
                tracing::debug!(parent = %link.url, "checked in with the parent");
                failing = false;
            }
            Ok(Err(e)) => {
                tracing::warn!(parent = %link.url, error = format!("{e:#}"), "parent check-in failed; retrying");
                failing = true;
            }
            Err(e) => tracing::error!(error = %e, "parent check-in task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> ParentLink {
        ParentLink {
            url: "http://127.0.0.1:1".into(),
            token: "apl_x_y".into(),
            node_id: Uuid::new_v4(),
            parent_node_id: Uuid::new_v4(),
            ca: None,
        }
    }

    #[test]
    fn save_load_and_join() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let l = link();
        join(dir.path(), &l).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(l.clone()));
        assert_eq!(crate::node::load(dir.path()).unwrap(), Some(l.node_id));
        let mode = std::fs::metadata(dir.path().join(PARENT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Joining again as the same node is fine; as another is refused.
        join(dir.path(), &l).unwrap();
        let err = join(dir.path(), &link()).unwrap_err();
        assert!(
            format!("{err:#}").contains("already holds node id"),
            "{err:#}"
        );
    }

    #[test]
    fn unreachable_parent_is_an_error_naming_it() {
        let err = checkin(&link(), &CheckinRequest::default()).unwrap_err();
        assert!(format!("{err:#}").contains("127.0.0.1:1"), "{err:#}");
    }
}
