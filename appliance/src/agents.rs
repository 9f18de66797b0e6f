//! The server side of agent mode: machines PXE-booted into
//! `appliance.mode=agent` check in with their hardware inventory
//! (`POST /api/v1/agents`), are listed at `GET /api/v1/agents`, and ask for
//! work at `GET /api/v1/agents/{mac}/work` (for now always `wait`; install,
//! capture and deploy come with the replication and cloning work).
//!
//! Check-ins are node-local state, kept in `<data>/state/agents.json`
//! (written temp + rename) so a restart keeps the list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::events::Events;
use crate::hwinfo::Hardware;

/// What an agent sends when it checks in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckIn {
    /// The MAC of the interface it booted from (lowercase, `:`-separated).
    pub mac: String,
    pub hardware: Hardware,
    /// The release the agent is running.
    #[serde(default)]
    pub release: Option<String>,
    /// `agent` or `install` (what the boot asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// A known agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub mac: String,
    pub hardware: Hardware,
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub first_seen: f64,
    pub last_seen: f64,
    pub checkins: u64,
    /// The address it checked in from; its work is answered only there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

/// At most this many agents are remembered; a new MAC beyond it replaces
/// the one silent longest (if silent for an hour) or is refused.
pub const MAX_AGENTS: usize = 1024;
/// Check-ins one address may make per minute.
pub const CHECKINS_PER_MINUTE: u32 = 60;

/// Work handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Work {
    /// Nothing to do yet; ask again later.
    Wait { retry_secs: u64 },
    /// Install this appliance onto the local disk (replication).
    Install(crate::install::InstallWork),
    /// Capture the local disk into the server's chunk store.
    Capture(crate::clone::server::CaptureWork),
    /// Write a captured image onto the local disk (deploy or restore).
    Deploy(Box<crate::clone::server::DeployWork>),
    /// Install an OS (Debian) onto the local disk from the appliance's
    /// mirror ([`crate::osinstall`]).
    #[serde(rename = "os-install")]
    OsInstall(Box<crate::osinstall::OsInstallWork>),
}

/// Decides an agent's work (`None`: wait). Given the agent's record and
/// the base URL the agent reached us at.
pub type WorkSource = Arc<dyn Fn(&AgentRecord, &str) -> Option<Work> + Send + Sync>;

#[derive(Clone)]
pub struct Agents {
    inner: Arc<Mutex<BTreeMap<String, AgentRecord>>>,
    /// Per source address: the minute's start and its check-ins.
    rate: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, (f64, u32)>>>,
    file: Option<PathBuf>,
    events: Events,
    work: Option<WorkSource>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Lowercase `aa:bb:cc:dd:ee:ff`, or `None` if not a MAC address.
/// A MAC from a URL path, normalised, or a 400 naming it.
pub fn mac_param(mac: &str) -> Result<String, ApiError> {
    normalize_mac(mac).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_mac",
            format!("{mac:?} is not a MAC address"),
        )
    })
}

pub fn normalize_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

impl Agents {
    /// Load the registry from `<data>/state/agents.json` (missing = empty).
    pub fn open(data: &Path, events: Events) -> Agents {
        let file = data.join("state/agents.json");
        let map = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<AgentRecord>>(&b).ok())
            .map(|v| v.into_iter().map(|a| (a.mac.clone(), a)).collect())
            .unwrap_or_default();
        Agents {
            inner: Arc::new(Mutex::new(map)),
            rate: Default::default(),
            file: Some(file),
            events,
            work: None,
        }
    }

    pub fn in_memory(events: Events) -> Agents {
        Agents {
            inner: Default::default(),
            rate: Default::default(),
            file: None,
            events,
            work: None,
        }
    }

    /// Hands out work from `source` instead of always `wait`.
    pub fn with_work(mut self, source: WorkSource) -> Agents {
        self.work = Some(source);
        self
    }

    pub fn list(&self) -> Vec<AgentRecord> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Records a check-in from `from`. Where this appliance's DHCP leased
    /// `from` to a MAC, only that MAC may check in from it; each address
    /// gets [`CHECKINS_PER_MINUTE`]; at most [`MAX_AGENTS`] are kept.
    pub fn check_in(
        &self,
        c: CheckIn,
        from: Option<std::net::IpAddr>,
    ) -> Result<AgentRecord, ApiError> {
        let mac = normalize_mac(&c.mac).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_mac",
                format!("{:?} is not a MAC address", c.mac),
            )
        })?;
        let t = now();
        if let Some(ip) = from {
            if let Some(leased) = self.events.mac_of(ip).filter(|m| *m != mac) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "lease_mismatch",
                    format!("{ip} was leased to {leased}, not {mac}"),
                ));
            }
            let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            if rate.len() > 4 * MAX_AGENTS {
                rate.retain(|_, (start, _)| t - *start < 60.0);
            }
            let slot = rate.entry(ip).or_insert((t, 0));
            if t - slot.0 >= 60.0 {
                *slot = (t, 0);
            }
            slot.1 += 1;
            if slot.1 > CHECKINS_PER_MINUTE {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("{ip} checked in more than {CHECKINS_PER_MINUTE} times this minute"),
                ));
            }
        }
        let (rec, all) = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if !g.contains_key(&mac) && g.len() >= MAX_AGENTS {
                let oldest = g
                    .values()
                    .min_by(|a, b| a.last_seen.total_cmp(&b.last_seen))
                    .filter(|o| t - o.last_seen > 3600.0)
                    .map(|o| o.mac.clone());
                match oldest {
                    Some(o) => {
                        g.remove(&o);
                    }
                    None => {
                        return Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "agents_full",
                            format!(
                            "{MAX_AGENTS} agents checked in within the hour; not recording {mac}"
                        ),
                        ))
                    }
                }
            }
            let rec = g
                .entry(mac.clone())
                .and_modify(|r| {
                    r.hardware = c.hardware.clone();
                    r.release = c.release.clone();
                    r.mode = c.mode.clone();
                    r.last_seen = t;
                    r.checkins += 1;
                    r.address = from;
                })
                .or_insert_with(|| AgentRecord {
                    mac: mac.clone(),
                    hardware: c.hardware.clone(),
                    release: c.release.clone(),
                    mode: c.mode.clone(),
                    first_seen: t,
                    last_seen: t,
                    checkins: 1,
                    address: from,
                })
                .clone();
            (rec, g.values().cloned().collect::<Vec<_>>())
        };
        if let Some(f) = &self.file {
            if let Err(e) = persist(f, &all) {
                tracing::error!(file = %f.display(), error = %e, "saving agents failed");
            }
        }
        self.events.publish(
            "agent.checkin",
            Some(&mac),
            serde_json::json!({
                "disks": rec.hardware.disks.len(),
                "memory_bytes": rec.hardware.memory_bytes,
                "firmware": rec.hardware.firmware,
                "release": rec.release,
                "mode": rec.mode,
            }),
        );
        Ok(rec)
    }
}

fn persist(file: &Path, all: &[AgentRecord]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(all)?)?;
    std::fs::rename(&tmp, file)
}

pub fn routes(agents: Agents) -> Vec<crate::http::Route> {
    use crate::http::{Guard, Route};
    vec![
        Route::get(
            "/api/v1/agents",
            Guard::Read,
            "Machines that booted the agent and reported (hardware, mode, last seen)",
        )
        .response("[Object]")
        .to(list, agents.clone()),
        Route::post(
            "/api/v1/agents",
            Guard::Public,
            "An agent's check-in (hardware report); bounded and rate-limited",
        )
        .request("Object")
        .response("Object")
        .limit(CHECKIN_LIMIT)
        .to(check_in, agents.clone()),
        Route::get(
            "/api/v1/agents/{mac}/work",
            Guard::Public,
            "What the agent at this MAC should do now (carries no secret it does not need)",
        )
        .response("Object")
        .to(work, agents),
    ]
}

#[cfg(test)]
fn router(agents: Agents) -> Router {
    crate::http::routes::unguarded(routes(agents))
}

/// The largest check-in body (a hardware report).
pub const CHECKIN_LIMIT: usize = 64 << 10;

async fn list(
    State(a): State<Agents>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<AgentRecord>> {
    Json(page.page(a.list(), |r| r.mac.clone()))
}

async fn check_in(
    State(a): State<Agents>,
    caller: crate::http::Caller,
    body: Result<Json<CheckIn>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<AgentRecord>), ApiError> {
    let Json(c) = body?;
    Ok((
        StatusCode::OK,
        Json(a.check_in(c, caller.peer.map(|p| p.ip()))?),
    ))
}

async fn work(
    State(a): State<Agents>,
    UrlPath(mac): UrlPath<String>,
    caller: crate::http::Caller,
    headers: axum::http::HeaderMap,
) -> Result<Json<Work>, ApiError> {
    let mac = mac_param(&mac)?;
    let rec = a
        .inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&mac)
        .cloned();
    let Some(rec) = rec else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            format!("{mac} has not checked in"),
        ));
    };
    // Work goes only to the address that checked in as this MAC (which,
    // where our DHCP serves it, is the address leased to this MAC).
    if let (Some(want), Some(peer)) = (rec.address, caller.peer) {
        if want != peer.ip() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "wrong_address",
                format!(
                    "{mac} checked in from {want}; its work is not answered to {}",
                    peer.ip()
                ),
            ));
        }
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let base = format!("http://{host}");
    if let Some(source) = a.work.clone() {
        let w = tokio::task::spawn_blocking(move || source(&rec, &base))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
        if let Some(w) = w {
            return Ok(Json(w));
        }
    }
    Ok(Json(Work::Wait { retry_secs: 10 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn hw() -> Hardware {
        Hardware {
            firmware: "uefi".into(),
            cpus: 2,
            cpu_model: Some("QEMU".into()),
            memory_bytes: 1 << 30,
            nics: vec![],
            disks: vec![],
            vendor: None,
            product: None,
            serial: None,
        }
    }

    #[test]
    fn macs_are_normalised() {
        assert_eq!(
            normalize_mac("52-54-00-AB-CD-EF").as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:zz"), None);
    }

    #[tokio::test]
    async fn check_in_lists_persists_and_emits_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let events = Events::new();
        let agents = Agents::open(dir.path(), events.clone());
        let app = router(agents);
        let body = serde_json::to_string(&CheckIn {
            mac: "52:54:00:12:34:56".into(),
            hardware: hw(),
            release: None,
            mode: None,
        })
        .unwrap();
        let resp = app
            .clone()
            .oneshot(
                Request::post("/api/v1/agents")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = app
            .clone()
            .oneshot(Request::get("/api/v1/agents").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let list: crate::http::Paged<AgentRecord> =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!((list.items.len(), list.next), (1, None));
        assert_eq!(events.page(0, 10)[0].kind, "agent.checkin");
        let reopened = Agents::open(dir.path(), Events::new());
        assert_eq!(reopened.list()[0].mac, "52:54:00:12:34:56");
        let resp = app
            .oneshot(
                Request::get("/api/v1/agents/52:54:00:00:00:09/work")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn bad_mac_is_a_json_error() {
        let app = router(Agents::in_memory(Events::new()));
        let body = serde_json::to_string(&CheckIn {
            mac: "nope".into(),
            hardware: hw(),
            release: None,
            mode: None,
        })
        .unwrap();
        let resp = app
            .oneshot(
                Request::post("/api/v1/agents")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(e["code"], "invalid_mac");
    }

    fn ci(mac: &str) -> CheckIn {
        CheckIn {
            mac: mac.into(),
            hardware: hw(),
            release: None,
            mode: None,
        }
    }

    #[test]
    fn a_leased_address_checks_in_only_as_its_mac_and_work_goes_only_there() {
        let events = Events::new();
        let a = Agents::in_memory(events.clone());
        let ip: std::net::IpAddr = "10.77.0.50".parse().unwrap();
        events.learn(ip, "52:54:00:00:00:01");
        let e = a.check_in(ci("52:54:00:00:00:02"), Some(ip)).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, "lease_mismatch")
        );
        let rec = a.check_in(ci("52:54:00:00:00:01"), Some(ip)).unwrap();
        assert_eq!(rec.address, Some(ip));
    }

    #[tokio::test]
    async fn work_is_answered_only_to_the_address_that_checked_in() {
        let a = Agents::in_memory(Events::new());
        let ip: std::net::IpAddr = "10.77.0.50".parse().unwrap();
        a.check_in(ci("52:54:00:00:00:01"), Some(ip)).unwrap();
        let call = |peer: &str| {
            let peer: std::net::SocketAddr = peer.parse().unwrap();
            let mut req = Request::get("/api/v1/agents/52:54:00:00:00:01/work")
                .body(Body::empty())
                .unwrap();
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            router(a.clone()).oneshot(req)
        };
        assert_eq!(
            call("10.77.0.50:4000").await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            call("10.77.0.66:4000").await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn check_ins_are_rate_limited_per_address_and_bounded_in_number() {
        let a = Agents::in_memory(Events::new());
        let ip: std::net::IpAddr = "10.77.0.9".parse().unwrap();
        for _ in 0..CHECKINS_PER_MINUTE {
            a.check_in(ci("52:54:00:00:00:01"), Some(ip)).unwrap();
        }
        let e = a.check_in(ci("52:54:00:00:00:01"), Some(ip)).unwrap_err();
        assert_eq!(e.code, "rate_limited");
        // Many addresses, many MACs: the registry stops at MAX_AGENTS (one
        // is already there).
        for i in 0..MAX_AGENTS - 1 {
            let mac = format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
            let from = std::net::IpAddr::from([10, 1, (i >> 8) as u8, (i & 0xff) as u8]);
            a.check_in(ci(&mac), Some(from)).unwrap();
        }
        let e = a
            .check_in(ci("02:00:00:ff:ff:ff"), Some("10.2.0.1".parse().unwrap()))
            .unwrap_err();
        assert_eq!(e.code, "agents_full");
        assert_eq!(a.list().len(), MAX_AGENTS);
    }
}
