//! The parent side of self-replication: serving this appliance's release
//! to machines that install it onto their disks.
//!
//! A booted appliance's own disk is not the image any more (node state, a
//! grown data partition), and an image cannot contain itself, so the image
//! served is rebuilt from the bundle with the embedded builder
//! ([`crate::rebuild::ensure_cached`], into `<data>/cache/release/`), and
//! its block map is computed once beside it. Rebuilding is exact, so the
//! served image is bit for bit the one this appliance was built as.
//!
//! - `GET /api/v1/release/manifest`, `/api/v1/release/signature`: the
//!   booted release manifest and its ed25519 signature.
//! - `GET /api/v1/release/bmap`, `/api/v1/release/image` (HTTP Range):
//!   the rebuilt image's block map and bytes (503 while preparing).
//! - `POST /api/v1/release/prepare`: start preparing now (operator).
//! - `GET /api/v1/installs`: install attempts by MAC with phase and bytes.
//! - `POST /api/v1/agents/{mac}/progress`: an installing machine's report,
//!   with the token issued in its install work; becomes `install.*`
//!   events and the replica's status.
//!
//! Who installs: a machine booted in install mode whose MAC is registered
//! as a replica, or any unknown machine when the inventory's
//! `default_boot` is `replicate`. The PXE script for a replica whose
//! install finished is local boot, so a machine never reinstalls forever.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::agents::{AgentRecord, Work};
use crate::api::ApiError;
use crate::events::Events;
use crate::http::{Guard, Route};
use crate::install::{ChildNetwork, InstallProgress, InstallWork};

/// Where the served image, its block map and checksum live.
pub const CACHE_DIR: &str = "cache/release";
pub const IMAGE_FILE: &str = "appliance.img";
pub const BMAP_FILE: &str = "appliance.img.bmap";

/// Preparation of the served image.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Prepared {
    Idle,
    Preparing,
    Ready {
        disk: String,
        data_bytes: u64,
        seconds: f64,
    },
    Failed {
        error: String,
    },
}

/// One install attempt, by MAC (node-local, `<data>/state/installs.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub mac: String,
    pub node_id: String,
    /// `installing`, `installed` or `failed`.
    pub state: String,
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    #[serde(default)]
    pub message: String,
    pub release: String,
    pub started: f64,
    pub updated: f64,
    /// Bytes of image data this parent sent for the attempt.
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// Token issued with the work (memory only, never persisted).
    #[serde(skip)]
    token: String,
}

struct Inner {
    prepared: Prepared,
    installs: BTreeMap<String, InstallRecord>,
}

/// Shared state of the replication service.
#[derive(Clone)]
pub struct Replication {
    data: PathBuf,
    events: Events,
    inner: Arc<Mutex<Inner>>,
    inventory: Option<Arc<std::sync::RwLock<crate::inventory::Inventory>>>,
    replicas: crate::replicas::Replicas,
    networks: crate::network::Networks,
    /// Image bytes served per client MAC (from the DHCP neighbour table),
    /// reset when that MAC is handed install work.
    sent: Arc<Mutex<BTreeMap<String, u64>>>,
    /// This node's HTTPS port, when it serves TLS: install work then
    /// gives the child an `https://` link pinning this node's site CA.
    tls_port: Option<u16>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The provisioning networks a child serves by default: for every network
/// this appliance serves on a /24, the next /24 (third octet + 1), with the
/// child at `.1` — so a chain A → B → C gets 10.77.1.0/24, 10.77.2.0/24,
/// 10.77.3.0/24.
pub fn derive_child_networks(parent: &[crate::network::NetworkSpec]) -> Vec<ChildNetwork> {
    parent
        .iter()
        .filter_map(|n| {
            let (addr, prefix) = n.cidr.split_once('/')?;
            if prefix != "24" {
                return None;
            }
            let a: std::net::Ipv4Addr = addr.parse().ok()?;
            let [o1, o2, o3, _] = a.octets();
            let next = o3.checked_add(1)?;
            Some(ChildNetwork {
                cidr: format!("{o1}.{o2}.{next}.1/24"),
                pool: None,
            })
        })
        .collect()
}

impl Replication {
    pub fn new(
        data: &Path,
        events: Events,
        inventory: Option<Arc<std::sync::RwLock<crate::inventory::Inventory>>>,
        replicas: crate::replicas::Replicas,
        networks: crate::network::Networks,
    ) -> Replication {
        let installs = std::fs::read(data.join("state/installs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<InstallRecord>>(&b).ok())
            .map(|v| v.into_iter().map(|r| (r.mac.clone(), r)).collect())
            .unwrap_or_default();
        // A cache from an earlier run is checked (and rebuilt if stale) by
        // the first prepare.
        let prepared = Prepared::Idle;
        Replication {
            data: data.to_owned(),
            events,
            inner: Arc::new(Mutex::new(Inner { prepared, installs })),
            inventory,
            replicas,
            networks,
            sent: Default::default(),
            tls_port: None,
        }
    }

    /// Children installed from now on link back over HTTPS on `port`,
    /// pinning this node's site CA (`state/tls/ca.pem`).
    pub fn with_tls_port(mut self, port: Option<u16>) -> Replication {
        self.tls_port = port;
        self
    }

    /// The child's link to this node: `https://<host the agent
    /// reached>:<tls port>` and the site CA, when this node serves TLS and
    /// its CA is readable; else none (the child links over `base`).
    fn child_link(&self, base: &str) -> (Option<String>, Option<String>) {
        let Some(port) = self.tls_port else {
            return (None, None);
        };
        let ca_path = self.data.join(crate::tls::TLS_DIR).join("ca.pem");
        let ca = match std::fs::read_to_string(&ca_path) {
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!(path = %ca_path.display(), error = %e,
                    "no site CA to give the child; it links to this node over plain HTTP");
                return (None, None);
            }
        };
        let Some(host) = crate::tls::url_host(base) else {
            return (None, None);
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        (Some(format!("https://{host}:{port}")), Some(ca))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, all: &BTreeMap<String, InstallRecord>) {
        let f = self.data.join("state/installs.json");
        let v: Vec<&InstallRecord> = all.values().collect();
        let bytes = serde_json::to_vec_pretty(&v).expect("install records serialise");
        if let Err(e) = crate::state::write_atomic(&f, &bytes, false, crate::state::Secrecy::Secret)
        {
            tracing::error!(file = %f.display(), error = %e, "saving installs failed");
        }
    }

    fn sent_to(&self, mac: &str) -> u64 {
        let g = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        g.get(mac).copied().unwrap_or(0)
    }

    pub fn prepared(&self) -> Prepared {
        self.lock().prepared.clone()
    }

    /// Starts preparing the served image unless it is ready or under way.
    pub fn prepare(&self) {
        {
            let mut g = self.lock();
            if matches!(g.prepared, Prepared::Preparing | Prepared::Ready { .. }) {
                return;
            }
            g.prepared = Prepared::Preparing;
        }
        self.events
            .publish("release.preparing", None, serde_json::json!({}));
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("prepare-release".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let res = me.prepare_now();
                let state = match res {
                    Ok((disk, data_bytes)) => Prepared::Ready {
                        disk,
                        data_bytes,
                        seconds: started.elapsed().as_secs_f64(),
                    },
                    Err(e) => Prepared::Failed {
                        error: format!("{e:#}"),
                    },
                };
                tracing::info!(?state, "release prepared");
                me.events.publish(
                    "release.prepared",
                    None,
                    serde_json::to_value(&state).unwrap_or_default(),
                );
                me.lock().prepared = state;
            });
        if let Err(e) = spawned {
            self.lock().prepared = Prepared::Failed {
                error: format!("starting the rebuild: {e}"),
            };
        }
    }

    /// Rebuilds the image into the cache if needed and writes its block map.
    fn prepare_now(&self) -> anyhow::Result<(String, u64)> {
        use anyhow::Context;
        let report = crate::rebuild::ensure_cached(&self.data)?;
        let dir = self.data.join(CACHE_DIR);
        let image = dir.join(IMAGE_FILE);
        let bmap_path = dir.join(BMAP_FILE);
        let bmap = match std::fs::read(&bmap_path)
            .ok()
            .and_then(|b| crate::bmap::Bmap::parse(&b).ok())
        {
            Some(b) if b.disk_digest.as_deref() == Some(report.disk.as_str()) => b,
            _ => {
                let b = crate::bmap::Bmap::from_file_with_digest(
                    &image,
                    crate::bmap::DEFAULT_CHUNK,
                    &report.disk,
                )
                .with_context(|| format!("computing the block map of {}", image.display()))?;
                let tmp = bmap_path.with_extension("bmap.tmp");
                std::fs::write(&tmp, b.to_bytes())?;
                std::fs::rename(&tmp, &bmap_path)?;
                b
            }
        };
        if bmap.disk_digest.as_deref() != Some(report.disk.as_str()) {
            anyhow::bail!(
                "the block map says {:?} but the rebuilt image is {}",
                bmap.disk_digest,
                report.disk
            );
        }
        Ok((report.disk.clone(), bmap.mapped_bytes()))
    }

    /// Whether `mac` should install: a registered replica not yet
    /// installed, or an unknown machine under the `replicate` policy.
    fn wants_install(&self, mac: &str) -> bool {
        if let Some(r) = self.lock().installs.get(mac) {
            return r.state != "installed";
        }
        if self.replicas.by_mac(mac).is_some() {
            return true;
        }
        self.policy_replicates(mac)
    }

    fn policy_replicates(&self, mac: &str) -> bool {
        let Some(inv) = &self.inventory else {
            return false;
        };
        let inv = inv.read().unwrap_or_else(|e| e.into_inner());
        inv.system_by_mac(mac).is_none()
            && inv.settings().default_boot == crate::inventory::DefaultBoot::Replicate
    }

    /// The PXE script for `mac`, when replication decides it.
    pub fn ipxe_for_mac(&self, mac: &str, server: &str) -> Option<String> {
        let installed = self
            .lock()
            .installs
            .get(mac)
            .map(|r| r.state == "installed");
        match installed {
            Some(true) => Some(format!(
                "#!ipxe\n# replica {mac}: installed, boot the local disk\necho Booting from local disk\nexit\n"
            )),
            _ if self.replicas.by_mac(mac).is_some() || installed == Some(false) => {
                let url = crate::inventory::boot::server_url(server);
                Some(crate::pxe::install_script(&url, crate::serve::AGENT_CMDLINE))
            }
            _ => None,
        }
    }

    /// Work for an agent: install when it booted in install mode and
    /// should install; `wait` while the image is being prepared.
    pub fn work_for(&self, rec: &AgentRecord, base: &str) -> Option<Work> {
        if rec.mode.as_deref() != Some("install") || !self.wants_install(&rec.mac) {
            return None;
        }
        if let Some(r) = self.lock().installs.get(&rec.mac) {
            if r.state == "failed" {
                // A failed install waits for the operator (re-register).
                return Some(Work::Wait { retry_secs: 30 });
            }
            // One replica token per install attempt. An attempt is one
            // boot of the installer: it checks in once, then asks for work.
            // Asking again without a new check-in (a second asker under
            // this MAC) gets no token: it would revoke the real child's.
            // A machine that rebooted (killed mid-write) checks in again
            // and starts a new attempt.
            if r.state == "installing" && rec.last_seen <= r.started {
                return Some(Work::Wait { retry_secs: 30 });
            }
        }
        match self.prepared() {
            Prepared::Ready { .. } => {}
            Prepared::Failed { error } => {
                tracing::error!(%error, "cannot serve installs");
                return Some(Work::Wait { retry_secs: 30 });
            }
            _ => {
                self.prepare();
                return Some(Work::Wait { retry_secs: 5 });
            }
        }
        let release =
            crate::serve::file_digest(&self.data.join(crate::contract::RELEASE_MANIFEST)).ok()?;
        let reg = match self.replicas.register_for_install(&rec.mac) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), mac = %rec.mac, "registering the replica failed");
                return Some(Work::Wait { retry_secs: 30 });
            }
        };
        let networks = derive_child_networks(&self.networks.specs());
        let (link_url, ca) = self.child_link(base);
        let work = InstallWork {
            release: release.clone(),
            parent_url: base.to_owned(),
            parent_node_id: reg.parent_node_id.to_string(),
            node_id: reg.node_id.to_string(),
            token: reg.token.clone(),
            networks,
            disk: None,
            wipe: false,
            link_url,
            ca,
        };
        let t = now();
        let all = {
            let mut g = self.lock();
            g.installs.insert(
                rec.mac.clone(),
                InstallRecord {
                    mac: rec.mac.clone(),
                    node_id: work.node_id.clone(),
                    state: "installing".into(),
                    phase: "assigned".into(),
                    done_bytes: 0,
                    total_bytes: 0,
                    message: String::new(),
                    release,
                    started: t,
                    updated: t,
                    bytes_sent: 0,
                    report: None,
                    token: work.token.clone(),
                },
            );
            g.installs.clone()
        };
        self.persist(&all);
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.mac.clone(), 0);
        self.replicas.set_status(&work.node_id, "installing");
        self.events.publish(
            "install.assigned",
            Some(&rec.mac),
            serde_json::json!({ "node_id": work.node_id, "release": work.release }),
        );
        Some(Work::Install(work))
    }

    fn progress(&self, mac: &str, p: InstallProgress) -> Result<(), ApiError> {
        let (all, node_id) = {
            let mut g = self.lock();
            let Some(r) = g.installs.get_mut(mac) else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_install",
                    format!("{mac} has no install under way"),
                ));
            };
            r.phase = p.phase.clone();
            r.done_bytes = p.done_bytes;
            r.total_bytes = p.total_bytes;
            r.message = p.message.clone();
            r.updated = now();
            r.bytes_sent = self.sent_to(mac);
            match p.state.as_str() {
                "done" => {
                    r.state = "installed".into();
                    r.report = p.report.clone();
                }
                "failed" => r.state = "failed".into(),
                _ => {}
            }
            let node_id = r.node_id.clone();
            (g.installs.clone(), node_id)
        };
        self.persist(&all);
        let kind = match p.state.as_str() {
            "done" => "install.done",
            "failed" => "install.failed",
            _ => "install.progress",
        };
        match p.state.as_str() {
            "done" => self.replicas.set_status(&node_id, "installed"),
            "failed" => self
                .replicas
                .set_status(&node_id, &format!("failed: {}", p.message)),
            _ => {}
        }
        self.events.publish(
            kind,
            Some(mac),
            serde_json::to_value(&p).unwrap_or_default(),
        );
        Ok(())
    }

    /// Lets an operator retry a failed install (re-registers on next boot).
    /// Every install attempt this node holds.
    pub fn list(&self) -> Vec<InstallRecord> {
        self.lock().installs.values().cloned().collect()
    }

    pub fn forget(&self, mac: &str) -> bool {
        let (removed, all) = {
            let mut g = self.lock();
            let removed = g.installs.remove(mac).is_some();
            (removed, g.installs.clone())
        };
        self.persist(&all);
        removed
    }
}

/// The release files are public (firmware and installers fetch them; they
/// carry no secret) but never start a rebuild; prepare and forget need an
/// operator; progress needs the token issued with the install work.
pub fn routes(r: Replication) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/release/manifest",
            Guard::Public,
            "The signed release manifest",
        )
        .response("binary")
        .to(manifest, r.clone()),
        Route::get(
            "/api/v1/release/signature",
            Guard::Public,
            "The manifest's ed25519 signature",
        )
        .response("binary")
        .to(signature, r.clone()),
        Route::get(
            "/api/v1/release/bmap",
            Guard::Public,
            "The prepared image's block map (503 until prepared)",
        )
        .response("binary")
        .to(bmap, r.clone()),
        Route::get(
            "/api/v1/release/image",
            Guard::Public,
            "The prepared disk image, with Range (503 until prepared)",
        )
        .response("binary")
        .to(image, r.clone()),
        Route::post(
            "/api/v1/release/prepare",
            Guard::Operator,
            "Rebuild the image children install (once, cached)",
        )
        .response("Object")
        .to(prepare, r.clone()),
        Route::get(
            "/api/v1/release/prepare",
            Guard::Read,
            "Whether the image children install is ready",
        )
        .response("Object")
        .to(prepared, r.clone()),
        Route::get(
            "/api/v1/installs",
            Guard::Read,
            "Installs of this appliance onto other machines: phase, bytes, report",
        )
        .response("[Object]")
        .to(installs, r.clone()),
        Route::delete(
            "/api/v1/installs/{mac}",
            Guard::Operator,
            "Forget a machine's install (to retry a failed one)",
        )
        .to(forget, r.clone()),
        Route::post(
            "/api/v1/agents/{mac}/progress",
            Guard::Job,
            "An installing machine's progress (the token issued with its work)",
        )
        .request("Object")
        .limit(crate::agents::CHECKIN_LIMIT)
        .to(progress, r),
    ]
}

impl crate::http::JobTokens for Replication {
    fn job_of(&self, token: &str) -> Option<crate::http::JobRef> {
        let g = self.lock();
        g.installs
            .values()
            .find(|i| i.state == "installing" && !i.token.is_empty() && i.token == token)
            .map(|i| crate::http::JobRef {
                kind: "install",
                id: i.node_id.clone(),
                mac: Some(i.mac.clone()),
            })
    }
}

async fn file(path: PathBuf, req: Request) -> Response {
    match ServeFile::new(&path).oneshot(req).await {
        Ok(r) => r.into_response(),
        Err(e) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()).into_response()
        }
    }
}

async fn manifest(State(r): State<Replication>, req: Request) -> Response {
    file(r.data.join(crate::contract::RELEASE_MANIFEST), req).await
}

async fn signature(State(r): State<Replication>, req: Request) -> Response {
    file(r.data.join(crate::contract::RELEASE_SIGNATURE), req).await
}

fn not_ready(r: &Replication) -> Option<Response> {
    match r.prepared() {
        Prepared::Ready { .. } => None,
        _ => {
            // Never started from here: these routes are public, and a
            // rebuild is the operator's (prepare) or an install's to start.
            Some(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "preparing",
                    format!(
                        "the release image is not ready: {}",
                        serde_json::to_string(&r.prepared()).unwrap_or_default()
                    ),
                )
                .into_response(),
            )
        }
    }
}

async fn bmap(State(r): State<Replication>, req: Request) -> Response {
    if let Some(resp) = not_ready(&r) {
        return resp;
    }
    file(r.data.join(CACHE_DIR).join(BMAP_FILE), req).await
}

async fn image(State(r): State<Replication>, req: Request) -> Response {
    if let Some(resp) = not_ready(&r) {
        return resp;
    }
    let mac = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .and_then(|c| r.events.mac_of(c.0.ip()))
        .unwrap_or_else(|| "unknown".into());
    let resp = file(r.data.join(CACHE_DIR).join(IMAGE_FILE), req).await;
    if let Some(len) = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if resp.status().is_success() {
            *r.sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(mac)
                .or_insert(0) += len;
        }
    }
    resp
}

async fn prepare(State(r): State<Replication>) -> (StatusCode, Json<Prepared>) {
    r.prepare();
    (StatusCode::ACCEPTED, Json(r.prepared()))
}

async fn prepared(State(r): State<Replication>) -> Json<Prepared> {
    Json(r.prepared())
}

async fn installs(
    State(r): State<Replication>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<InstallRecord>> {
    Json(page.page(r.list(), |i| i.mac.clone()))
}

async fn forget(
    State(r): State<Replication>,
    UrlPath(mac): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let mac = crate::agents::mac_param(&mac)?;
    if r.forget(&mac) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_install",
            format!("{mac} has no install record"),
        ))
    }
}

async fn progress(
    State(r): State<Replication>,
    UrlPath(mac): UrlPath<String>,
    caller: crate::http::Caller,
    body: Result<Json<InstallProgress>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(p) = body?;
    let mac = crate::agents::mac_param(&mac)?;
    // The guard matched the token to this MAC's open install; an operator
    // may report too.
    if caller.job().is_none() && !caller.is_operator() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "progress needs the token issued with the install work",
        ));
    }
    r.progress(&mac, p)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cidr: &str) -> crate::network::NetworkSpec {
        serde_json::from_value(serde_json::json!({"iface": "eth1", "cidr": cidr})).unwrap()
    }

    #[test]
    fn child_networks_are_the_next_slash_24() {
        let got = derive_child_networks(&[
            spec("10.77.1.1/24"),
            spec("10.9.0.1/16"),
            spec("10.1.255.1/24"),
        ]);
        assert_eq!(
            got,
            vec![ChildNetwork {
                cidr: "10.77.2.1/24".into(),
                pool: None
            }]
        );
    }

    fn replication(data: &Path) -> Replication {
        let events = Events::new();
        let tokens = Arc::new(crate::auth::TokenStore::open(
            &data.join("state/tokens.json"),
        ));
        Replication::new(
            data,
            events.clone(),
            None,
            crate::replicas::Replicas::memory(tokens, uuid::Uuid::nil(), events.clone()),
            crate::network::Networks::new(data, events),
        )
    }

    #[test]
    fn a_child_links_back_over_https_pinning_the_ca_only_when_tls_is_served() {
        let dir = tempfile::tempdir().unwrap();
        // No TLS port: the child links to the URL the agent reached.
        let plain = replication(dir.path());
        assert_eq!(plain.child_link("http://10.77.0.1"), (None, None));
        // A TLS port but no CA (TLS failed to start): still plain.
        let r = replication(dir.path()).with_tls_port(Some(8443));
        assert_eq!(r.child_link("http://10.77.0.1"), (None, None));
        let tls = dir.path().join(crate::tls::TLS_DIR);
        std::fs::create_dir_all(&tls).unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";
        std::fs::write(tls.join("ca.pem"), pem).unwrap();
        assert_eq!(
            r.child_link("http://10.77.0.1:8080"),
            (Some("https://10.77.0.1:8443".into()), Some(pem.into()))
        );
        assert_eq!(
            r.child_link("http://[fd00::1]").0.as_deref(),
            Some("https://[fd00::1]:8443")
        );
    }
}
