//! The server side of OS installs: which agent installs what, the job
//! tokens, the records, netboot off at finish, stalled installs, and the
//! first-boot report.
//!
//! Records live in `<data>/state/os-installs.json` (owner-only: they hold
//! the attempts' job tokens), one per MAC, replaced atomically on every
//! change. The API shows them without tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{FirstBoot, MirrorRef, OsInstallWork, User};
use crate::agents::{AgentRecord, Work};
use crate::api::ApiError;
use crate::events::Events;
use crate::http::{Caller, Guard, Route};
use crate::install::InstallProgress;
use crate::inventory::api::InvState;
use crate::inventory::model::{Kind, INSTALLER_APPLIANCE};
use crate::inventory::status::Event as StatusEvent;

/// An install with no report for this long is marked stalled. The agent
/// reports every phase and beats every minute inside long ones.
pub const STALL_SECS: f64 = 15.0 * 60.0;

/// One machine's install, as recorded.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OsInstallRecord {
    pub mac: String,
    pub system: String,
    pub attempt: u64,
    /// `installing`, `installed` (finished, not yet booted), `booted`,
    /// `failed`, `stalled`.
    pub state: String,
    pub phase: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub started: f64,
    pub updated: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted: Option<f64>,
    /// Phase start times (Unix seconds), in order.
    #[serde(default)]
    pub phases: Vec<(String, f64)>,
    /// Seconds per phase, from the agent's final report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firstboot: Option<FirstBoot>,
    /// The attempt's job token (never shown by the API).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// The check-in time the attempt was handed out for.
    #[serde(default)]
    pub checkin: f64,
}

#[derive(Default, Serialize, Deserialize)]
struct Book {
    records: BTreeMap<String, OsInstallRecord>,
}

/// OS installs: work source, job tokens and routes.
#[derive(Clone)]
pub struct OsInstalls {
    data: PathBuf,
    file: PathBuf,
    inv: Option<Arc<InvState>>,
    events: Events,
    book: Arc<Mutex<Book>>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A new job token; none while the random pool is not ready.
fn new_token() -> Option<String> {
    crate::entropy::secret_hex(24)
        .ok()
        .map(|h| format!("osi_{h}"))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a system cannot be installed yet (said once per change).
fn blocked(msg: String) -> Option<Work> {
    tracing::warn!(%msg, "OS install blocked");
    Some(Work::Wait { retry_secs: 30 })
}

impl OsInstalls {
    pub fn open(data: &Path, inv: Option<Arc<InvState>>, events: Events) -> OsInstalls {
        let file = data.join("state/os-installs.json");
        let book = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Book>(&b).ok())
            .unwrap_or_default();
        OsInstalls {
            data: data.to_owned(),
            file,
            inv,
            events,
            book: Arc::new(Mutex::new(book)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, b: &Book) {
        if let Err(e) = crate::state::save_json(&self.file, b, true, crate::state::Secrecy::Secret)
        {
            tracing::error!(error = %e, "saving OS install records");
        }
    }

    /// Records without tokens, stalled ones marked.
    pub fn list(&self) -> Vec<OsInstallRecord> {
        self.check_stalled();
        self.lock()
            .records
            .values()
            .map(|r| OsInstallRecord {
                token: String::new(),
                ..r.clone()
            })
            .collect()
    }

    /// Marks installs silent for [`STALL_SECS`] stalled (once, with an
    /// event and a failure in the system's install status).
    pub fn check_stalled(&self) {
        let t = now();
        let mut stalled = Vec::new();
        {
            let mut b = self.lock();
            for r in b.records.values_mut() {
                if r.state == "installing" && t - r.updated > STALL_SECS {
                    r.state = "stalled".into();
                    r.message = format!(
                        "no report for {} minutes (last phase {})",
                        ((t - r.updated) / 60.0).round(),
                        r.phase
                    );
                    stalled.push(r.clone());
                }
            }
            if !stalled.is_empty() {
                let snapshot = Book {
                    records: b.records.clone(),
                };
                drop(b);
                self.save(&snapshot);
            }
        }
        for r in stalled {
            self.events.publish(
                "osinstall.stalled",
                Some(&r.mac),
                serde_json::json!({"system": r.system, "attempt": r.attempt, "phase": r.phase, "message": r.message}),
            );
            self.status(&r.system, StatusEvent::Failure, &r.message);
        }
    }

    /// Checks for stalled installs every 30 s.
    pub fn start_watchdog(&self) {
        let me = self.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(30));
            me.check_stalled();
        });
    }

    fn status(&self, system: &str, ev: StatusEvent, msg: &str) {
        if let Some(inv) = &self.inv {
            if let Err(e) = crate::inventory::api::record(inv, system, ev, msg, "os-install") {
                tracing::warn!(error = ?e, system, "recording install status");
            }
        }
    }

    /// The work for an agent: an OS install when its MAC belongs to a
    /// system with netboot on whose profile's distro the appliance
    /// installs.
    pub fn work_for(&self, rec: &AgentRecord, base: &str) -> Option<Work> {
        if rec.mode.as_deref() == Some("install") {
            return None;
        }
        let inv_state = self.inv.as_ref()?;
        let (work_base, system) = {
            let inv = inv_state.read();
            let sys = inv.system_by_mac(&rec.mac)?.clone();
            if !sys.netboot {
                return None;
            }
            let profile = sys.profile.clone()?;
            let distro = inv.profile_distro(&profile)?.clone();
            if distro.installer != INSTALLER_APPLIANCE {
                return None;
            }
            let vars = match crate::inventory::blend::blend(&inv, Kind::System, &sys.name) {
                Ok(b) => b.values(),
                Err(e) => return blocked(format!("system {}: {e}", sys.name)),
            };
            let repo_name = inv
                .profile_chain(&profile)
                .iter()
                .flat_map(|p| p.repos.iter())
                .find(|r| {
                    matches!(inv.get(Kind::Repo, r), Some(crate::inventory::model::Object::Repo(x)) if x.breed == "apt")
                })
                .cloned();
            let Some(repo_name) = repo_name else {
                return blocked(format!(
                    "system {}: profile {profile} names no apt repo to install from (set the profile's repos)",
                    sys.name
                ));
            };
            let Some(crate::inventory::model::Object::Repo(repo)) =
                inv.get(Kind::Repo, &repo_name).cloned()
            else {
                return None;
            };
            if repo.snapshot.is_empty() {
                return blocked(format!(
                    "repo {repo_name} has never been synced: `appliance repo sync {repo_name}`"
                ));
            }
            let keyring = match crate::repo::MirrorSpec::from_repo(&self.data, &repo) {
                Ok(s) => s.keyring,
                Err(e) => return blocked(format!("repo {repo_name}: {e:#}")),
            };
            let suite = repo
                .suites
                .first()
                .cloned()
                .unwrap_or_else(|| distro.os_version.clone());
            let arch = repo
                .arches
                .first()
                .cloned()
                .unwrap_or_else(|| match repo.arch.as_str() {
                    "" | "x86_64" => "amd64".into(),
                    a => a.to_owned(),
                });
            let components = if repo.components.is_empty() {
                vec!["main".into()]
            } else {
                repo.components.clone()
            };
            let s = |k: &str| vars.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            let list = |k: &str| -> Vec<String> {
                match vars.get(k) {
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    Some(serde_json::Value::String(t)) => {
                        t.split_whitespace().map(str::to_owned).collect()
                    }
                    _ => Vec::new(),
                }
            };
            let keys = |k: &str| -> Vec<String> {
                match vars.get(k) {
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    Some(serde_json::Value::String(t)) => t
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    _ => Vec::new(),
                }
            };
            let mut users = Vec::new();
            if let Some(serde_json::Value::Array(us)) = vars.get("users") {
                for u in us {
                    match serde_json::from_value::<User>(u.clone()) {
                        Ok(u) if super::target::valid_user_name(&u.name) => users.push(u),
                        _ => return blocked(format!("system {}: variable users holds an entry that is not {{name, password_hash, ssh_authorized_keys, sudo}} with a valid user name", sys.name)),
                    }
                }
            } else if let Some(name) = s("user") {
                users.push(User {
                    name,
                    password_hash: s("user_password_hash"),
                    ssh_authorized_keys: keys("user_ssh_authorized_keys"),
                    sudo: vars
                        .get("user_sudo")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true),
                });
            }
            let hostname = if sys.hostname.is_empty() {
                sys.name.clone()
            } else {
                sys.hostname.clone()
            };
            let work = OsInstallWork {
                system: sys.name.clone(),
                hostname,
                attempt: 0,
                server_url: base.to_owned(),
                token: String::new(),
                mirror: MirrorRef {
                    name: repo_name.clone(),
                    url: format!("{}/repos/{repo_name}", base.trim_end_matches('/')),
                    suite,
                    components,
                    arch,
                    keyring_b64: base64::engine::general_purpose::STANDARD.encode(&keyring),
                },
                priority: s("install_priority").unwrap_or_else(|| "required".into()),
                packages: list("packages"),
                disk: s("disk"),
                wipe: vars
                    .get("disk_wipe")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
                esp_mib: vars.get("esp_mib").and_then(|v| v.as_u64()).unwrap_or(256),
                root_password_hash: s("root_password_hash"),
                root_ssh_authorized_keys: keys("ssh_authorized_keys"),
                users,
                kernel_options: s("kernel_options_post").unwrap_or_default(),
                timezone: s("timezone").unwrap_or_default(),
            };
            (work, sys.name)
        };
        // One token per attempt: an attempt is one boot of the agent (one
        // check-in). A second asker without a new check-in gets nothing.
        let t = now();
        let (work, new_attempt) = {
            let mut b = self.lock();
            let prev = b.records.get(&rec.mac).cloned();
            if let Some(p) = &prev {
                if p.system == system && rec.last_seen <= p.checkin {
                    return Some(Work::Wait { retry_secs: 30 });
                }
            }
            let attempt = prev
                .as_ref()
                .filter(|p| p.system == system)
                .map(|p| p.attempt)
                .unwrap_or(0)
                + 1;
            let Some(token) = new_token() else {
                return Some(Work::Wait { retry_secs: 10 });
            };
            let r = OsInstallRecord {
                mac: rec.mac.clone(),
                system: system.clone(),
                attempt,
                state: "installing".into(),
                phase: "assigned".into(),
                message: String::new(),
                started: t,
                updated: t,
                finished: None,
                booted: None,
                phases: vec![("assigned".into(), t)],
                report: None,
                firstboot: None,
                token: token.clone(),
                checkin: rec.last_seen,
            };
            b.records.insert(rec.mac.clone(), r);
            let snapshot = Book {
                records: b.records.clone(),
            };
            drop(b);
            self.save(&snapshot);
            (
                OsInstallWork {
                    attempt,
                    token,
                    ..work_base
                },
                attempt,
            )
        };
        self.events.publish(
            "osinstall.assigned",
            Some(&rec.mac),
            serde_json::json!({"system": system, "attempt": new_attempt, "mirror": work.mirror.url, "suite": work.mirror.suite}),
        );
        self.status(
            &system,
            StatusEvent::Start,
            &format!("attempt {new_attempt}"),
        );
        Some(Work::OsInstall(Box::new(work)))
    }

    /// A progress report of the attempt `mac` holds the token of.
    pub fn progress(&self, mac: &str, p: InstallProgress) -> Result<OsInstallRecord, ApiError> {
        let t = now();
        let (rec, changed_phase) = {
            let mut b = self.lock();
            let r = b.records.get_mut(mac).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no OS install for {mac}"),
                )
            })?;
            if r.state != "installing" && r.state != "stalled" {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_installing",
                    format!("the install of {mac} is {}", r.state),
                ));
            }
            r.updated = t;
            if r.state == "stalled" {
                r.state = "installing".into();
            }
            let changed = r.phase != p.phase;
            if changed {
                r.phases.push((p.phase.clone(), t));
            }
            r.phase = p.phase.clone();
            r.message = p.message.chars().take(4000).collect();
            match p.state.as_str() {
                "done" if p.phase == "finish" => {
                    r.state = "installed".into();
                    r.finished = Some(t);
                    r.report = p.report.clone();
                }
                "failed" => {
                    r.state = "failed".into();
                    r.finished = Some(t);
                }
                _ => {}
            }
            let rec = r.clone();
            let snapshot = Book {
                records: b.records.clone(),
            };
            drop(b);
            self.save(&snapshot);
            (rec, changed)
        };
        match rec.state.as_str() {
            "installed" => {
                self.events.publish(
                    "osinstall.finished",
                    Some(mac),
                    serde_json::json!({"system": rec.system, "attempt": rec.attempt, "seconds": rec.report}),
                );
                // Netboot off: the next boot is from the disk.
                self.status(
                    &rec.system,
                    StatusEvent::Finish,
                    "installed by the appliance",
                );
            }
            "failed" => {
                self.events.publish(
                    "osinstall.failed",
                    Some(mac),
                    serde_json::json!({"system": rec.system, "attempt": rec.attempt, "phase": rec.phase, "message": rec.message}),
                );
                self.status(&rec.system, StatusEvent::Failure, &rec.message);
            }
            _ if changed_phase => {
                self.events.publish(
                    "osinstall.phase",
                    Some(mac),
                    serde_json::json!({"system": rec.system, "attempt": rec.attempt, "phase": rec.phase, "message": rec.message}),
                );
            }
            _ => {}
        }
        Ok(OsInstallRecord {
            token: String::new(),
            ..rec
        })
    }

    /// The installed system's first boot: the token is spent.
    pub fn firstboot(&self, mac: &str, fb: FirstBoot) -> Result<OsInstallRecord, ApiError> {
        let t = now();
        let rec = {
            let mut b = self.lock();
            let r = b.records.get_mut(mac).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no OS install for {mac}"),
                )
            })?;
            if r.state != "installed" {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_installed",
                    format!("the install of {mac} is {}, not installed", r.state),
                ));
            }
            r.state = "booted".into();
            r.booted = Some(t);
            r.updated = t;
            r.phase = "firstboot".into();
            r.phases.push(("firstboot".into(), t));
            r.token.clear();
            let mut fb = fb;
            fb.dpkg_audit = fb.dpkg_audit.chars().take(8000).collect();
            r.firstboot = Some(fb);
            let rec = r.clone();
            let snapshot = Book {
                records: b.records.clone(),
            };
            drop(b);
            self.save(&snapshot);
            rec
        };
        self.events.publish(
            "osinstall.booted",
            Some(mac),
            serde_json::json!({"system": rec.system, "attempt": rec.attempt, "firstboot": rec.firstboot}),
        );
        Ok(rec)
    }
}

impl crate::http::JobTokens for OsInstalls {
    fn job_of(&self, token: &str) -> Option<crate::http::JobRef> {
        let b = self.lock();
        b.records
            .values()
            .find(|r| {
                matches!(r.state.as_str(), "installing" | "stalled" | "installed")
                    && !r.token.is_empty()
                    && ct_eq(r.token.as_bytes(), token.as_bytes())
            })
            .map(|r| crate::http::JobRef {
                kind: "osinstall",
                id: r.system.clone(),
                mac: Some(r.mac.clone()),
            })
    }
}

fn need_job(caller: &Caller) -> Result<(), ApiError> {
    if caller.job().is_some_and(|j| j.kind == "osinstall") || caller.is_operator() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this report needs the token issued with the OS install work",
        ))
    }
}

async fn progress(
    State(o): State<OsInstalls>,
    UrlPath(mac): UrlPath<String>,
    caller: Caller,
    body: Result<Json<InstallProgress>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<OsInstallRecord>, ApiError> {
    need_job(&caller)?;
    let Json(p) = body?;
    let mac = crate::agents::mac_param(&mac)?;
    let o2 = o.clone();
    tokio::task::spawn_blocking(move || o2.progress(&mac, p))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map(Json)
}

async fn firstboot(
    State(o): State<OsInstalls>,
    UrlPath(mac): UrlPath<String>,
    caller: Caller,
    body: Result<Json<FirstBoot>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<OsInstallRecord>, ApiError> {
    need_job(&caller)?;
    let Json(fb) = body?;
    let mac = crate::agents::mac_param(&mac)?;
    o.firstboot(&mac, fb).map(Json)
}

async fn list(
    State(o): State<OsInstalls>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<OsInstallRecord>> {
    Json(page.page(o.list(), |r| r.mac.clone()))
}

async fn get_one(
    State(o): State<OsInstalls>,
    UrlPath(mac): UrlPath<String>,
) -> Result<Json<OsInstallRecord>, ApiError> {
    let mac = crate::agents::mac_param(&mac)?;
    o.list()
        .into_iter()
        .find(|r| r.mac == mac)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no OS install for {mac}"),
            )
        })
}

pub fn routes(o: OsInstalls) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/os-installs",
            Guard::Read,
            "OS installs the appliance did or is doing, per machine",
        )
        .response("[OsInstallRecord]")
        .to(list, o.clone()),
        Route::get(
            "/api/v1/os-installs/{mac}",
            Guard::Read,
            "One machine's OS install record",
        )
        .response("OsInstallRecord")
        .to(get_one, o.clone()),
        Route::post(
            "/api/v1/os-installs/{mac}/progress",
            Guard::Job,
            "An installing machine's phase (the token issued with its OS install work)",
        )
        .request("InstallProgress")
        .response("OsInstallRecord")
        .limit(64 << 10)
        .to(progress, o.clone()),
        Route::post(
            "/api/v1/os-installs/{mac}/firstboot",
            Guard::Job,
            "The installed system's first boot (the same token, spent by this call)",
        )
        .request("FirstBoot")
        .response("OsInstallRecord")
        .limit(64 << 10)
        .to(firstboot, o),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::JobTokens as _;
    use crate::inventory::model::{Distro, Object, Profile, Repo, System};
    use crate::inventory::Author;

    const MAC: &str = "52:54:00:aa:bb:01";

    fn agent(last_seen: f64) -> AgentRecord {
        AgentRecord {
            mac: MAC.into(),
            hardware: crate::hwinfo::Hardware {
                firmware: "uefi".into(),
                cpus: 2,
                cpu_model: None,
                memory_bytes: 1 << 30,
                nics: vec![],
                disks: vec![],
                vendor: None,
                product: None,
                serial: None,
            },
            release: None,
            mode: Some("agent".into()),
            first_seen: last_seen,
            last_seen,
            checkins: 1,
            address: None,
        }
    }

    /// An inventory with a synced apt repo, an appliance-installed distro,
    /// a profile and a system for [`MAC`].
    fn setup(dir: &Path, synced: bool) -> OsInstalls {
        let events = Events::new();
        let st = crate::inventory::api::open_state(dir, true, events.clone()).unwrap();
        {
            let mut inv = st.inventory.write().unwrap();
            let a = Author::new("test");
            inv.create(
                Object::Repo(Repo {
                    name: "bookworm".into(),
                    mirror: "http://upstream/debian".into(),
                    breed: "apt".into(),
                    suites: vec!["bookworm".into()],
                    components: vec!["main".into()],
                    arches: vec!["amd64".into()],
                    keyring: "/usr/share/keyrings/debian-archive-keyring.gpg".into(),
                    snapshot: if synced {
                        format!("sha256:{}", "ab".repeat(32))
                    } else {
                        String::new()
                    },
                    ..Default::default()
                }),
                &a,
            )
            .unwrap();
            inv.create(
                Object::Distro(Distro {
                    name: "debian12".into(),
                    breed: "debian".into(),
                    os_version: "bookworm".into(),
                    installer: INSTALLER_APPLIANCE.into(),
                    ..Default::default()
                }),
                &a,
            )
            .unwrap();
            let mut vars = crate::inventory::model::Vars::new();
            vars.insert(
                "packages".into(),
                serde_json::json!(["less", "openssh-server"]),
            );
            vars.insert(
                "ssh_authorized_keys".into(),
                serde_json::json!("ssh-ed25519 AAAA k1\nssh-ed25519 BBBB k2\n"),
            );
            vars.insert("user".into(), serde_json::json!("ops"));
            inv.create(
                Object::Profile(Profile {
                    name: "deb".into(),
                    distro: Some("debian12".into()),
                    repos: vec!["bookworm".into()],
                    variables: vars,
                    ..Default::default()
                }),
                &a,
            )
            .unwrap();
            let sys: System = serde_json::from_value(serde_json::json!({
                "name": "web1", "profile": "deb", "hostname": "web1.example",
                "interfaces": [{"mac": MAC}],
            }))
            .unwrap();
            inv.create(Object::System(sys), &a).unwrap();
        }
        OsInstalls::open(dir, Some(st), events)
    }

    fn work(w: Option<Work>) -> OsInstallWork {
        match w {
            Some(Work::OsInstall(w)) => *w,
            other => panic!("expected OS install work, got {other:?}"),
        }
    }

    fn progress(phase: &str, state: &str) -> InstallProgress {
        InstallProgress {
            phase: phase.into(),
            state: state.into(),
            done_bytes: 0,
            total_bytes: 0,
            message: String::new(),
            report: None,
        }
    }

    #[test]
    fn a_system_gets_its_install_with_its_variables_and_one_token_per_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let o = setup(dir.path(), true);
        let w = work(o.work_for(&agent(100.0), "http://10.0.0.1"));
        assert_eq!(w.system, "web1");
        assert_eq!(w.hostname, "web1.example");
        assert_eq!(w.attempt, 1);
        assert_eq!(w.mirror.url, "http://10.0.0.1/repos/bookworm");
        assert_eq!(
            (w.mirror.suite.as_str(), w.mirror.arch.as_str()),
            ("bookworm", "amd64")
        );
        assert_eq!(w.packages, vec!["less", "openssh-server"]);
        assert_eq!(w.root_ssh_authorized_keys.len(), 2);
        assert_eq!(w.users[0].name, "ops");
        assert!(w.users[0].sudo);
        assert!(!w.mirror.keyring_b64.is_empty());
        assert!(
            w.wipe,
            "an assigned profile with netboot on is the request to install"
        );
        // The token is this attempt's, for this MAC only.
        let j = o.job_of(&w.token).expect("the token is a job token");
        assert_eq!((j.kind, j.mac.as_deref()), ("osinstall", Some(MAC)));
        assert!(o.job_of("osi_wrong").is_none());
        // Asking again without a new check-in hands out nothing new.
        assert!(matches!(
            o.work_for(&agent(100.0), "http://10.0.0.1"),
            Some(Work::Wait { .. })
        ));
        assert!(o.job_of(&w.token).is_some());
        // A reboot (killed mid-install): a new check-in, a new attempt; the
        // old token is dead.
        let w2 = work(o.work_for(&agent(200.0), "http://10.0.0.1"));
        assert_eq!(w2.attempt, 2);
        assert_ne!(w2.token, w.token);
        assert!(o.job_of(&w.token).is_none());
        // Tokens never leave through the API.
        assert!(o.list().iter().all(|r| r.token.is_empty()));
        let on_disk = std::fs::read_to_string(dir.path().join("state/os-installs.json")).unwrap();
        assert!(on_disk.contains(&w2.token));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state/os-installs.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the records hold tokens: owner only");
    }

    #[test]
    fn finish_turns_netboot_off_and_first_boot_spends_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let o = setup(dir.path(), true);
        let w = work(o.work_for(&agent(100.0), "http://10.0.0.1"));
        o.progress(MAC, progress("packages", "running")).unwrap();
        let mut fin = progress("finish", "done");
        fin.report = Some(serde_json::json!({"packages": 12.5}));
        let r = o.progress(MAC, fin).unwrap();
        assert_eq!(r.state, "installed");
        let inv = o.inv.as_ref().unwrap();
        assert!(
            !inv.read().system("web1").unwrap().netboot,
            "finish turns netboot off"
        );
        // Netboot off: the agent gets no more install work.
        assert!(o.work_for(&agent(300.0), "http://10.0.0.1").is_none());
        // Progress after the finish is refused; the first boot is taken once.
        assert!(o.progress(MAC, progress("packages", "running")).is_err());
        assert!(
            o.job_of(&w.token).is_some(),
            "the installed system still reports its first boot"
        );
        let r = o
            .firstboot(
                MAC,
                FirstBoot {
                    debian_version: "12.15".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.state, "booted");
        assert!(
            o.job_of(&w.token).is_none(),
            "the first boot spends the token"
        );
        assert!(o.firstboot(MAC, FirstBoot::default()).is_err());
        let phases: Vec<&str> = r.phases.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(phases, ["assigned", "packages", "finish", "firstboot"]);
    }

    #[test]
    fn a_failure_is_recorded_and_waits_for_a_new_boot() {
        let dir = tempfile::tempdir().unwrap();
        let o = setup(dir.path(), true);
        work(o.work_for(&agent(100.0), "http://10.0.0.1"));
        let mut f = progress("failed", "failed");
        f.message = "the mirror \"bookworm\" has no package \"nginx\"".into();
        let r = o.progress(MAC, f).unwrap();
        assert_eq!(r.state, "failed");
        assert!(matches!(
            o.work_for(&agent(100.0), "http://10.0.0.1"),
            Some(Work::Wait { .. })
        ));
        assert_eq!(
            work(o.work_for(&agent(150.0), "http://10.0.0.1")).attempt,
            2
        );
    }

    #[test]
    fn a_silent_install_is_marked_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let o = setup(dir.path(), true);
        work(o.work_for(&agent(100.0), "http://10.0.0.1"));
        o.lock().records.get_mut(MAC).unwrap().updated = now() - STALL_SECS - 1.0;
        let r = &o.list()[0];
        assert_eq!(r.state, "stalled");
        assert!(r.message.contains("no report"), "{}", r.message);
        // A late report brings it back.
        assert_eq!(
            o.progress(MAC, progress("packages", "running"))
                .unwrap()
                .state,
            "installing"
        );
    }

    #[test]
    fn no_work_without_a_synced_mirror_an_appliance_distro_or_netboot() {
        let dir = tempfile::tempdir().unwrap();
        let o = setup(dir.path(), false);
        assert!(matches!(
            o.work_for(&agent(100.0), "http://10.0.0.1"),
            Some(Work::Wait { .. })
        ));
        assert!(o.list().is_empty());
        // An agent booted to replicate the appliance is not ours.
        let mut a = agent(100.0);
        a.mode = Some("install".into());
        assert!(o.work_for(&a, "http://10.0.0.1").is_none());
        // An unknown MAC is not ours either.
        let mut a = agent(100.0);
        a.mac = "52:54:00:aa:bb:02".into();
        assert!(o.work_for(&a, "http://10.0.0.1").is_none());
    }
}
