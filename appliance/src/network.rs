//! Provisioning networks: the interfaces this appliance serves PXE on.
//!
//! Nothing is served until an operator asks (`appliance network serve`,
//! `POST /api/v1/networks`): a rogue DHCP server is a real outage at a real
//! site. Asking for authoritative mode first probes the segment for other
//! DHCP servers and refuses when one answers, unless `force` is set.
//! Serving a network assigns the address of `cidr` to the interface and
//! starts DHCP (authoritative or proxy) and TFTP on it; HTTP boot is the
//! main server on port 80. The choice is node-local state, persisted in
//! `<data>/state/networks.json` and restored at start.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::api::ApiError;
use crate::dhcp::server::{DhcpEvent, DhcpMode, DhcpServerConfig};
use crate::events::Events;
use crate::http::{Guard, Route};

/// How a network is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// We hand out addresses (and boot information).
    #[default]
    Authoritative,
    /// Another DHCP server hands out addresses; we add boot information.
    Proxy,
}

/// One provisioning network, as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub iface: String,
    /// Our address and prefix on the interface, e.g. `10.77.0.1/24`.
    pub cidr: String,
    #[serde(default)]
    pub mode: Mode,
    /// `A-B`, the address pool (authoritative mode); default: the upper
    /// half of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Start authoritative mode even when another DHCP server answers.
    #[serde(default)]
    pub force: bool,
}

/// A parsed, checked spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub pool: (Ipv4Addr, Ipv4Addr),
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_network", msg)
}

/// Check a spec: interface name, address/prefix, pool inside the subnet and
/// not containing our own address.
pub fn plan(spec: &NetworkSpec) -> Result<Plan, ApiError> {
    if spec.iface.is_empty() || spec.iface.len() > 15 || spec.iface.contains(['/', '\0', ' ']) {
        return Err(bad(format!("{:?} is not an interface name", spec.iface)));
    }
    let (a, p) = spec
        .cidr
        .split_once('/')
        .ok_or_else(|| bad(format!("cidr {:?}: expected ADDR/PREFIX", spec.cidr)))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| bad(format!("cidr {:?}: bad address", spec.cidr)))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| bad(format!("cidr {:?}: prefix must be 8-30", spec.cidr)))?;
    let mask = u32::MAX << (32 - prefix);
    let net = u32::from(addr) & mask;
    let bcast = net | !mask;
    if u32::from(addr) == net || u32::from(addr) == bcast {
        return Err(bad(format!(
            "{addr} is the network or broadcast address of {}",
            spec.cidr
        )));
    }
    let pool = match &spec.pool {
        Some(p) => {
            let (s, e) = p
                .split_once('-')
                .ok_or_else(|| bad(format!("pool {p:?}: expected A-B")))?;
            let s: Ipv4Addr = s
                .trim()
                .parse()
                .map_err(|_| bad(format!("pool {p:?}: bad start")))?;
            let e: Ipv4Addr = e
                .trim()
                .parse()
                .map_err(|_| bad(format!("pool {p:?}: bad end")))?;
            (s, e)
        }
        None => {
            let half = net + (bcast - net) / 2 + 1;
            (Ipv4Addr::from(half), Ipv4Addr::from(bcast - 1))
        }
    };
    let (s, e) = (u32::from(pool.0), u32::from(pool.1));
    if s > e || s & mask != net || e & mask != net || s == net || e == bcast {
        return Err(bad(format!(
            "pool {}-{} is not inside {}",
            pool.0, pool.1, spec.cidr
        )));
    }
    if (s..=e).contains(&u32::from(addr)) {
        return Err(bad(format!(
            "pool {}-{} contains our own address {addr}",
            pool.0, pool.1
        )));
    }
    Ok(Plan { addr, prefix, pool })
}

struct Running {
    spec: NetworkSpec,
    tasks: Vec<JoinHandle<()>>,
}

/// The served networks of this appliance.
#[derive(Clone)]
pub struct Networks {
    inner: Arc<tokio::sync::Mutex<BTreeMap<String, Running>>>,
    data: PathBuf,
    events: Events,
    local_boot: Arc<std::sync::OnceLock<crate::dhcp::LocalBootCheck>>,
}

/// A network in `GET /api/v1/networks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    #[serde(flatten)]
    pub spec: NetworkSpec,
    /// Whether its services are still running.
    pub running: bool,
}

impl Networks {
    /// Tells every DHCP server (running or started later) which machines
    /// boot from their disk: those get no boot file. Set once.
    pub fn set_local_boot(&self, check: crate::dhcp::LocalBootCheck) {
        let _ = self.local_boot.set(check);
    }

    pub fn new(data: &Path, events: Events) -> Networks {
        Networks {
            inner: Default::default(),
            data: data.to_path_buf(),
            events,
            local_boot: Default::default(),
        }
    }

    fn file(&self) -> PathBuf {
        self.data.join("state/networks.json")
    }

    async fn persist(&self, all: &BTreeMap<String, Running>) {
        let specs: Vec<&NetworkSpec> = all.values().map(|r| &r.spec).collect();
        let f = self.file();
        let res = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(f.parent().expect("state dir"))?;
            let tmp = f.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)?;
            std::fs::rename(&tmp, &f)
        })();
        if let Err(e) = res {
            tracing::error!(file = %f.display(), error = %e, "saving networks failed");
        }
    }

    /// The served specs as persisted (readable from any thread).
    pub fn specs(&self) -> Vec<NetworkSpec> {
        std::fs::read(self.file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Start every network saved in node state (at server start).
    pub async fn restore(&self) {
        let Ok(bytes) = std::fs::read(self.file()) else {
            return;
        };
        let specs: Vec<NetworkSpec> = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "networks.json is unreadable; serving nothing");
                return;
            }
        };
        for mut s in specs {
            // Already agreed once; do not let a probe block a restart.
            s.force = true;
            if let Err(e) = self.start(s.clone()).await {
                tracing::error!(iface = %s.iface, error = %e.message, "restoring a network failed");
            }
        }
    }

    pub async fn list(&self) -> Vec<NetworkStatus> {
        self.inner
            .lock()
            .await
            .values()
            .map(|r| NetworkStatus {
                spec: r.spec.clone(),
                running: r.tasks.iter().all(|t| !t.is_finished()),
            })
            .collect()
    }

    pub async fn stop(&self, iface: &str) -> Result<(), ApiError> {
        let mut g = self.inner.lock().await;
        let r = g.remove(iface).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_network",
                format!("{iface} is not served"),
            )
        })?;
        for t in r.tasks {
            t.abort();
        }
        self.persist(&g).await;
        self.events
            .publish("network.stop", None, serde_json::json!({ "iface": iface }));
        Ok(())
    }

    pub async fn start(&self, spec: NetworkSpec) -> Result<NetworkStatus, ApiError> {
        let plan = plan(&spec)?;
        let mut g = self.inner.lock().await;
        if let Some(r) = g.remove(&spec.iface) {
            for t in r.tasks {
                t.abort();
            }
        }
        configure_address(&spec.iface, plan.addr, plan.prefix)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "iface_unavailable",
                    format!("{}: {e:#}", spec.iface),
                )
            })?;
        if spec.mode == Mode::Authoritative && !spec.force {
            let others =
                crate::dhcp::server::probe_other_servers(&spec.iface, Duration::from_secs(3))
                    .await
                    .unwrap_or_default();
            let others: Vec<_> = others.into_iter().filter(|ip| *ip != plan.addr).collect();
            if !others.is_empty() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "other_dhcp_server",
                    format!(
                        "another DHCP server answers on {}: {others:?}; use proxy mode, or force to serve anyway",
                        spec.iface
                    ),
                ));
            }
        }
        let mode = match spec.mode {
            Mode::Authoritative => DhcpMode::Authoritative {
                pool: plan.pool,
                subnet: plan.prefix,
                router: None,
                dns: vec![],
                lease_secs: 3600,
                reservations: vec![],
            },
            Mode::Proxy => DhcpMode::Proxy,
        };
        let mut cfg = DhcpServerConfig::new(
            &spec.iface,
            plan.addr,
            mode,
            self.data.join("state").join(&spec.iface),
        );
        cfg.force = true; // probed above
        let base = cfg.http_base_url.clone();
        // TFTP first: when it cannot start (no boot files) nothing of this
        // network runs, DHCP included — an authoritative DHCP server left
        // behind by a refused request would answer on a wire nobody serves.
        let tftp = self.spawn_tftp(plan.addr)?;
        let (tx, rx) = broadcast::channel::<DhcpEvent>(1024);
        let mut tasks = vec![tftp];
        let backend = Arc::new(crate::dhcp::PolicyBootBackend {
            default: crate::dhcp::DefaultBootBackend::new(&base),
            local: self.local_boot.clone(),
        });
        let iface = spec.iface.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::dhcp::server::serve(cfg, backend, tx).await {
                tracing::error!(%iface, error = format!("{e:#}"), "DHCP server stopped");
            }
        }));
        tasks.push(tokio::spawn(bridge_dhcp(rx, self.events.clone())));
        g.insert(
            spec.iface.clone(),
            Running {
                spec: spec.clone(),
                tasks,
            },
        );
        self.persist(&g).await;
        self.events.publish(
            "network.serve",
            None,
            serde_json::to_value(&spec).unwrap_or_default(),
        );
        Ok(NetworkStatus {
            spec,
            running: true,
        })
    }

    fn spawn_tftp(&self, addr: Ipv4Addr) -> Result<JoinHandle<()>, ApiError> {
        let root = self.data.join("release/boot");
        let backend = crate::tftp::DirBackend::new(&root).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_boot_files",
                format!("{}: {e}", root.display()),
            )
        })?;
        let std_sock = std::net::UdpSocket::bind(SocketAddr::from((addr, 69))).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "tftp_bind",
                format!("binding {addr}:69: {e}"),
            )
        })?;
        std_sock.set_nonblocking(true).ok();
        let sock = tokio::net::UdpSocket::from_std(std_sock).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "tftp_bind",
                e.to_string(),
            )
        })?;
        let (tx, rx) = broadcast::channel(1024);
        let cfg = crate::tftp::TftpConfig {
            events: Some(tx),
            ..Default::default()
        };
        tokio::spawn(bridge_tftp(rx, self.events.clone()));
        Ok(tokio::spawn(async move {
            if let Err(e) = crate::tftp::serve(sock, Arc::new(backend), cfg).await {
                tracing::error!(error = %e, "TFTP server stopped");
            }
        }))
    }
}

async fn bridge_dhcp(mut rx: broadcast::Receiver<DhcpEvent>, events: Events) {
    loop {
        match rx.recv().await {
            Ok(e) => {
                let mac = e.mac.to_string();
                if let Some(ip) = e.addr {
                    if matches!(e.kind, crate::dhcp::server::DhcpEventKind::Ack) {
                        events.learn(ip.into(), &mac);
                    }
                }
                let kind = serde_json::to_value(e.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                events.publish(&format!("dhcp.{kind}"), Some(&mac), serde_json::json!({ "xid": format!("{:#010x}", e.xid), "addr": e.addr, "detail": e.detail }));
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "DHCP events lagged")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn bridge_tftp(mut rx: broadcast::Receiver<crate::tftp::TftpEvent>, events: Events) {
    loop {
        match rx.recv().await {
            Ok(e) => {
                use crate::tftp::TftpEvent;
                let (kind, client, detail) = match &e {
                    TftpEvent::Started { client, file, .. } => {
                        ("tftp.start", *client, serde_json::json!({ "file": file }))
                    }
                    TftpEvent::Completed {
                        client,
                        file,
                        bytes,
                        blocks,
                        duration,
                        options,
                    } => (
                        "tftp.transfer",
                        *client,
                        serde_json::json!({
                            "file": file, "bytes": bytes, "blocks": blocks,
                            "ms": duration.as_millis() as u64, "options": format!("{options:?}"),
                        }),
                    ),
                    TftpEvent::Failed {
                        client,
                        file,
                        error,
                    } => (
                        "tftp.failed",
                        *client,
                        serde_json::json!({ "file": file, "error": error }),
                    ),
                };
                let mac = events.mac_of(client.ip());
                let mut detail = detail;
                detail["client"] = serde_json::json!(client.to_string());
                events.publish(kind, mac.as_deref(), detail);
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Bring the interface up and give it our address (an address it already
/// has is fine).
async fn configure_address(iface: &str, addr: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
    let nl = crate::net::Netlink::open()?;
    let index = nl.link_up(iface).await?;
    match nl.add_address(index, addr, prefix).await {
        Ok(()) => Ok(()),
        Err(e) if format!("{e:#}").contains("File exists") => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn routes(networks: Networks) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/networks",
            Guard::Read,
            "Provisioning networks served (DHCP, TFTP, HTTP boot) and their state",
        )
        .response("[Object]")
        .to(list, networks.clone()),
        Route::post(
            "/api/v1/networks",
            Guard::Operator,
            "Serve PXE on an interface (authoritative DHCP or proxyDHCP, TFTP)",
        )
        .request("Object")
        .response("Object")
        .creates()
        .to(serve, networks.clone()),
        Route::delete(
            "/api/v1/networks/{iface}",
            Guard::Operator,
            "Stop serving an interface",
        )
        .to(stop, networks),
    ]
}

#[cfg(test)]
pub fn router(networks: Networks) -> Router {
    crate::http::routes::unguarded(routes(networks))
}

async fn list(
    State(n): State<Networks>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<NetworkStatus>> {
    Json(page.page(n.list().await, |s| s.spec.iface.clone()))
}

async fn serve(
    State(n): State<Networks>,
    body: Result<Json<NetworkSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<NetworkStatus>), ApiError> {
    let Json(spec) = body?;
    Ok((StatusCode::CREATED, Json(n.start(spec).await?)))
}

async fn stop(
    State(n): State<Networks>,
    UrlPath(iface): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    n.stop(&iface).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cidr: &str, pool: Option<&str>) -> NetworkSpec {
        NetworkSpec {
            iface: "eth1".into(),
            cidr: cidr.into(),
            mode: Mode::Authoritative,
            pool: pool.map(str::to_string),
            force: false,
        }
    }

    #[test]
    fn plans_are_checked() {
        let p = plan(&spec("10.77.0.1/24", None)).unwrap();
        assert_eq!(
            p.pool,
            (
                "10.77.0.128".parse().unwrap(),
                "10.77.0.254".parse().unwrap()
            )
        );
        assert_eq!(
            plan(&spec("10.77.0.1/24", Some("10.77.0.100-10.77.0.199")))
                .unwrap()
                .prefix,
            24
        );
        for (cidr, pool) in [
            ("10.77.0.1", None),
            ("10.77.0.0/24", None),
            ("10.77.0.1/31", None),
            ("10.77.0.1/24", Some("10.78.0.1-10.78.0.9")),
            ("10.77.0.1/24", Some("10.77.0.1-10.77.0.9")),
            ("10.77.0.1/24", Some("10.77.0.9-10.77.0.2")),
            ("10.77.0.1/24", Some("nonsense")),
        ] {
            let e = plan(&spec(cidr, pool)).unwrap_err();
            assert_eq!(e.code, "invalid_network", "{cidr} {pool:?}");
        }
        let mut s = spec("10.77.0.1/24", None);
        s.iface = "a/b".into();
        assert!(plan(&s).is_err());
    }
}
