//! The appliance side of cloning: jobs, the chunk store API agents talk
//! to, images and lineage in the inventory, and power.
//!
//! A job is one machine's capture, deploy or restore. Creating one
//! (`POST /api/v1/clone/jobs`, operator) records it by the system's MAC,
//! sets the machine's next boot to the network (one-time boot device) and
//! power-cycles it through its BMC ([`crate::bmc::driver_for`]) when the
//! system has power settings, else says to network-boot it by hand. While
//! a job is open, that MAC's PXE boot is the agent ([`CloneJobs::ipxe_for_mac`])
//! and its agent is handed the work ([`CloneJobs::work_for`]). The agent
//! reports progress (`POST /api/v1/clone/jobs/<id>/progress`, the job's
//! token) which becomes `clone.*` events. When it is done the system is
//! set back to local boot (`netboot` off, one-time boot from disk, power
//! cycle).
//!
//! Store API (job token or operator): `GET chunks`, `PUT chunks/<raw hex>`
//! (the server decompresses and checks before storing: a truncated or
//! wrong chunk is refused and nothing is kept), `GET blobs/<hex>` (a
//! bounded in-memory cache: deploying to many machines reads each chunk
//! from the store once), `POST manifests` (checks every chunk is stored,
//! makes the chunks durable, stores the manifest blob and the `image`
//! object: `type = "capture"`, `reference` = the manifest digest,
//! variables `system`, `parent` (the system's previous capture: lineage),
//! `captured` (server clock, Unix seconds), `disk_size`, `chunks`,
//! `captured_bytes`).
//!
//! Jobs are node-local state (`<data>/state/clone-jobs.json`); images are
//! shared state (the inventory), chunks and manifests are blobs (synced).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::Query;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use super::remote::KnownChunk;
use super::store::{self, hex_of, ChunkStore, DirStore};
use crate::api::ApiError;
use crate::events::Events;
use crate::http::{Caller, Guard, Route};
use crate::inventory::model::{Image, Object, System};
use crate::inventory::{Author, Inventory};

pub const JOBS_FILE: &str = "state/clone-jobs.json";
/// Frames kept in memory for deploys to many machines.
const CACHE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Capture,
    Deploy,
    Restore,
}

/// One machine's job. The token is never listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub action: Action,
    pub system: String,
    pub mac: String,
    /// Capture: the name to give; deploy/restore: the image to write.
    pub image: String,
    /// `pending` (waiting for the agent), `running`, `done`, `failed`.
    pub state: String,
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub message: String,
    pub created: f64,
    pub updated: f64,
    /// How the machine was started: `power cycled via qmp`, or the manual
    /// instruction.
    pub power: String,
    #[serde(skip_serializing)]
    #[serde(default)]
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// A running job whose agent has been silent this long is shown as
/// stalled (agents report at least every few seconds while they work).
const STALLED_AFTER: f64 = 120.0;

impl Job {
    fn open(&self) -> bool {
        self.state == "pending" || self.state == "running"
    }

    /// The job as answered at time `t`: a running job whose agent has gone
    /// quiet (the machine was switched off, lost its link, hung) says so.
    /// It stays open: powered on again, the machine PXE-boots back into
    /// the job and starts over.
    fn view(&self, t: f64) -> Job {
        let mut j = self.clone();
        let quiet = t - j.updated;
        if j.state == "running" && quiet > STALLED_AFTER {
            j.message = format!(
                "stalled: no word from the agent for {quiet:.0} s (is the machine on and cabled? powered on again, it PXE-boots back into this job)"
            );
        }
        j
    }
}

/// Work for an agent doing a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureWork {
    pub job: String,
    pub token: String,
    pub server: String,
    pub image: String,
}

/// Work for an agent doing a deploy or restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployWork {
    pub job: String,
    pub token: String,
    pub server: String,
    pub image: String,
    /// `sha256:` of the manifest blob.
    pub manifest: String,
    /// The target's record: hostname and network settings for its identity.
    pub system: System,
}

/// What the agent reports: the installer's progress record.
pub type JobProgress = crate::install::InstallProgress;

/// `POST /api/v1/clone/jobs`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct JobRequest {
    pub action: Action,
    /// Capture/restore: one system; deploy: the targets.
    pub systems: Vec<String>,
    /// Capture: the new image's name; deploy: the image; restore: the
    /// image, default the system's last capture.
    #[serde(default)]
    pub image: Option<String>,
}

struct FrameCache {
    map: HashMap<String, Arc<Vec<u8>>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl FrameCache {
    fn get(&self, k: &str) -> Option<Arc<Vec<u8>>> {
        self.map.get(k).cloned()
    }
    fn insert(&mut self, k: String, v: Arc<Vec<u8>>) {
        if v.len() > CACHE_BYTES / 4 || self.map.contains_key(&k) {
            return;
        }
        self.bytes += v.len();
        self.order.push_back(k.clone());
        self.map.insert(k, v);
        while self.bytes > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.map.remove(&old) {
                self.bytes -= v.len();
            }
        }
    }
}

/// A power action on a system, run by the job machinery (swappable in
/// tests): `network` = boot once from the network and cycle, `disk` =
/// boot once from disk and cycle. Returns what was done or the manual
/// instruction.
pub type PowerHook =
    Arc<dyn Fn(&System, crate::bmc::BootDevice) -> Result<String, String> + Send + Sync>;

/// The default [`PowerHook`]: the system's BMC through `bmc::driver_for_system`.
pub fn bmc_power() -> PowerHook {
    Arc::new(|sys: &System, dev: crate::bmc::BootDevice| {
        use crate::bmc::{BootDevice, PowerError};
        let what = match dev {
            BootDevice::Network => "network",
            BootDevice::Disk => "disk",
            BootDevice::Cd => "cd",
        };
        match crate::bmc::driver_for_system(sys, crate::bmc::DEFAULT_TIMEOUT) {
            Ok(Some(d)) => {
                // A driver without one-time boot (Wake-on-LAN) still powers
                // the machine; its own boot order must then do the rest.
                let boot = match d.boot_once(dev) {
                    Ok(()) => format!("boot device {what} set"),
                    Err(PowerError::Unsupported { .. }) => {
                        format!(
                            "{} cannot set a boot device (boot it from {what})",
                            d.name()
                        )
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let how = match d.cycle() {
                    Ok(()) => "power cycled",
                    Err(PowerError::Unsupported { .. }) => {
                        d.on().map_err(|e| e.to_string())?;
                        "powered on"
                    }
                    Err(e) => return Err(e.to_string()),
                };
                Ok(format!("{boot} and {how} via {}", d.name()))
            }
            Ok(None) => Ok(match dev {
                BootDevice::Network => format!(
                    "{} has no power settings: network-boot it now (PXE)",
                    sys.name
                ),
                BootDevice::Disk | BootDevice::Cd => format!(
                    "{} has no power settings: reboot it from its {what}",
                    sys.name
                ),
            }),
            Err(e) => Err(e.to_string()),
        }
    })
}

#[derive(Clone)]
pub struct CloneJobs {
    data: PathBuf,
    pub store: Arc<DirStore>,
    inventory: Option<Arc<RwLock<Inventory>>>,
    events: Events,
    jobs: Arc<Mutex<BTreeMap<String, Job>>>,
    cache: Arc<Mutex<FrameCache>>,
    power: PowerHook,
    /// Extra kernel arguments for the agent's PXE boot.
    pub agent_cmdline: String,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, msg.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!(error = format!("{e:#}"), "clone store failure");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage_failed",
        "the clone store failed; see the server log",
    )
}

impl CloneJobs {
    pub fn new(
        data: &Path,
        inventory: Option<Arc<RwLock<Inventory>>>,
        events: Events,
        power: PowerHook,
    ) -> CloneJobs {
        let jobs: Vec<Job> = std::fs::read(data.join(JOBS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        CloneJobs {
            data: data.to_owned(),
            store: Arc::new(DirStore::new(data)),
            inventory,
            events,
            jobs: Arc::new(Mutex::new(
                jobs.into_iter().map(|j| (j.id.clone(), j)).collect(),
            )),
            cache: Arc::new(Mutex::new(FrameCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            })),
            power,
            agent_cmdline: String::new(),
        }
    }

    /// Re-enters every capture image's chunks into the store's index
    /// (images and blobs that arrived by sync have none). Best effort.
    pub fn reindex(&self) -> usize {
        let Ok(inv) = self.inv() else { return 0 };
        let refs: Vec<String> = inv
            .list(crate::inventory::model::Kind::Image)
            .filter_map(|o| match o {
                Object::Image(i) if i.kind == "capture" => Some(i.reference.clone()),
                _ => None,
            })
            .collect();
        drop(inv);
        let mut n = 0;
        for r in refs {
            let res = self
                .store
                .get_blob(&r)
                .and_then(|b| Manifest::parse(&b))
                .and_then(|m| self.store.index_manifest(&m));
            match res {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::warn!(manifest = %r, error = format!("{e:#}"), "not indexing a capture")
                }
            }
        }
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, jobs: &BTreeMap<String, Job>) {
        #[derive(Serialize)]
        struct Stored<'a> {
            #[serde(flatten)]
            job: &'a Job,
            token: &'a str,
        }
        let all: Vec<Stored> = jobs
            .values()
            .map(|j| Stored {
                job: j,
                token: &j.token,
            })
            .collect();
        let path = self.data.join(JOBS_FILE);
        let res = serde_json::to_vec_pretty(&all)
            .map_err(anyhow::Error::from)
            .and_then(|b| {
                crate::state::write_atomic(&path, &b, false, crate::state::Secrecy::Secret)
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = res {
            tracing::error!(error = format!("{e:#}"), "saving clone jobs failed");
        }
    }

    pub fn list(&self) -> Vec<Job> {
        let t = now();
        self.lock().values().map(|j| j.view(t)).collect()
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        let t = now();
        self.lock().get(id).map(|j| j.view(t))
    }

    fn inv(&self) -> Result<std::sync::RwLockReadGuard<'_, Inventory>, ApiError> {
        let inv = self.inventory.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_inventory",
                "this node has no inventory",
            )
        })?;
        Ok(inv.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The system's last capture (greatest `captured`), for restore.
    pub fn last_capture_of(&self, system: &str) -> Result<Option<String>, ApiError> {
        let inv = self.inv()?;
        Ok(inv
            .list(crate::inventory::model::Kind::Image)
            .filter_map(|o| match o {
                Object::Image(i)
                    if i.kind == "capture"
                        && i.variables.get("system").and_then(|v| v.as_str()) == Some(system) =>
                {
                    Some((
                        i.variables
                            .get("captured")
                            .and_then(|v| v.as_f64())
                            .unwrap_or(0.0),
                        i.name.clone(),
                    ))
                }
                _ => None,
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n))
    }

    /// Creates one job per system (checked first: every system exists and
    /// has a MAC, no open job on it, the image exists / the name is free),
    /// then powers each machine into the agent.
    pub fn create(&self, req: &JobRequest) -> Result<Vec<Job>, ApiError> {
        if req.systems.is_empty() {
            return Err(bad("no_targets", "name at least one system"));
        }
        if req.action != Action::Deploy && req.systems.len() != 1 {
            return Err(bad(
                "one_system",
                "capture and restore take exactly one system",
            ));
        }
        let mut planned = Vec::new();
        {
            let inv = self.inv()?;
            for name in &req.systems {
                let sys = inv.system(name).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_system",
                        format!("no system {name:?}"),
                    )
                })?;
                let mac = sys
                    .interfaces
                    .iter()
                    .find(|i| !i.mac.is_empty())
                    .map(|i| i.mac.clone())
                    .ok_or_else(|| {
                        bad(
                            "no_mac",
                            format!("system {name:?} has no interface with a MAC"),
                        )
                    })?;
                let image = match (req.action, &req.image) {
                    (Action::Capture, Some(n)) => {
                        if inv.image(n).is_some() {
                            return Err(ApiError::new(
                                StatusCode::CONFLICT,
                                "image_exists",
                                format!("an image named {n:?} exists"),
                            ));
                        }
                        n.clone()
                    }
                    (Action::Capture, None) => {
                        return Err(bad("no_name", "a capture needs --name"))
                    }
                    (_, Some(n)) => n.clone(),
                    (Action::Restore, None) => {
                        drop(inv);
                        let n = self.last_capture_of(name)?.ok_or_else(|| {
                            ApiError::new(StatusCode::NOT_FOUND, "no_capture", format!("system {name:?} has never been captured; name an image with --from"))
                        })?;
                        planned.push((sys_owned(self, name)?, mac, n));
                        break;
                    }
                    (Action::Deploy, None) => {
                        return Err(bad("no_image", "a deploy needs an image"))
                    }
                };
                if req.action != Action::Capture {
                    let img = inv.image(&image).ok_or_else(|| {
                        ApiError::new(
                            StatusCode::NOT_FOUND,
                            "unknown_image",
                            format!("no image {image:?}"),
                        )
                    })?;
                    if img.kind != "capture" {
                        return Err(bad(
                            "not_a_capture",
                            format!("image {image:?} is of type {:?}, not a capture", img.kind),
                        ));
                    }
                }
                planned.push((sys.clone(), mac, image));
            }
        }
        {
            let jobs = self.lock();
            for (sys, mac, _) in &planned {
                if let Some(j) = jobs
                    .values()
                    .find(|j| j.open() && (j.mac == *mac || j.system == sys.name))
                {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "job_open",
                        format!("system {:?} already has open job {}", sys.name, j.id),
                    ));
                }
            }
        }
        let mut out = Vec::new();
        for (sys, mac, image) in planned {
            let t = now();
            let mut job = Job {
                id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
                action: req.action,
                system: sys.name.clone(),
                mac: mac.clone(),
                image,
                state: "pending".into(),
                phase: "boot".into(),
                done_bytes: 0,
                total_bytes: 0,
                message: String::new(),
                created: t,
                updated: t,
                power: String::new(),
                token: format!("clj_{}", uuid::Uuid::new_v4().simple()),
                report: None,
            };
            // Registered before the power cycle, so the PXE boot finds it.
            {
                let mut jobs = self.lock();
                jobs.insert(job.id.clone(), job.clone());
                self.persist(&jobs);
            }
            match (self.power)(&sys, crate::bmc::BootDevice::Network) {
                Ok(what) => job.power = what,
                Err(e) => {
                    job.state = "failed".into();
                    job.message = format!("powering {} into the agent failed: {e}", sys.name);
                }
            }
            job.updated = now();
            {
                let mut jobs = self.lock();
                jobs.insert(job.id.clone(), job.clone());
                self.persist(&jobs);
            }
            self.events.publish(
                &format!("clone.{}", if job.state == "failed" { "failed" } else { "started" }),
                Some(&mac),
                serde_json::json!({"job": job.id, "action": job.action, "system": job.system, "image": job.image, "power": job.power, "message": job.message}),
            );
            out.push(job);
        }
        Ok(out)
    }

    /// Cancels an open job (a timeout seen by the CLI, or the operator).
    pub fn cancel(&self, id: &str, why: &str) -> Result<Job, ApiError> {
        let mut jobs = self.lock();
        let j = jobs.get_mut(id).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_job", format!("no job {id}"))
        })?;
        let was_open = j.open();
        if was_open {
            j.state = "failed".into();
            j.message = why.to_owned();
            j.updated = now();
        }
        let j = j.clone();
        self.persist(&jobs);
        drop(jobs);
        if was_open {
            // Back to local boot, as after any job.
            self.finish(&j);
        }
        self.events.publish(
            "clone.failed",
            Some(&j.mac),
            serde_json::json!({"job": j.id, "message": why}),
        );
        Ok(j)
    }

    /// The open job for `mac`.
    fn open_job(&self, mac: &str) -> Option<Job> {
        self.lock()
            .values()
            .find(|j| j.open() && j.mac == mac)
            .cloned()
    }

    /// PXE: the agent while a job is open for this MAC.
    pub fn ipxe_for_mac(&self, mac: &str, server: &str) -> Option<String> {
        self.open_job(mac)
            .map(|_| crate::pxe::agent_script(server, &self.agent_cmdline))
    }

    /// Agent work for an open job.
    pub fn work_for(
        &self,
        rec: &crate::agents::AgentRecord,
        base: &str,
    ) -> Option<crate::agents::Work> {
        let job = self.open_job(&rec.mac)?;
        match job.action {
            Action::Capture => Some(crate::agents::Work::Capture(CaptureWork {
                job: job.id,
                token: job.token,
                server: base.to_owned(),
                image: job.image,
            })),
            Action::Deploy | Action::Restore => {
                let inv = self.inv().ok()?;
                let img = inv.image(&job.image)?;
                let mut system = inv.system(&job.system)?.clone();
                // Work is fetched without a token: it carries what the
                // identity step needs (names, addresses), never the BMC's
                // credentials.
                system.power = Default::default();
                Some(crate::agents::Work::Deploy(Box::new(DeployWork {
                    job: job.id,
                    token: job.token,
                    server: base.to_owned(),
                    image: job.image,
                    manifest: img.reference.clone(),
                    system,
                })))
            }
        }
    }

    /// Records progress; a finished job sets the system back to local boot.
    pub fn progress(&self, id: &str, p: JobProgress) -> Result<Job, ApiError> {
        let job = {
            let mut jobs = self.lock();
            let j = jobs.get_mut(id).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_job", format!("no job {id}"))
            })?;
            if !j.open() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "job_closed",
                    format!("job {id} is {}", j.state),
                ));
            }
            j.phase = p.phase.clone();
            j.state = match p.state.as_str() {
                "done" | "failed" => p.state.clone(),
                _ => "running".into(),
            };
            j.done_bytes = p.done_bytes;
            j.total_bytes = p.total_bytes;
            j.message = p.message.clone();
            j.updated = now();
            if p.report.is_some() {
                j.report = p.report.clone();
            }
            let j = j.clone();
            self.persist(&jobs);
            j
        };
        let kind = match job.state.as_str() {
            "done" => "clone.done",
            "failed" => "clone.failed",
            _ => "clone.progress",
        };
        self.events.publish(
            kind,
            Some(&job.mac),
            serde_json::json!({"job": job.id, "action": job.action, "system": job.system, "phase": job.phase, "done_bytes": job.done_bytes, "total_bytes": job.total_bytes, "message": job.message}),
        );
        if !job.open() {
            self.finish(&job);
        }
        Ok(job)
    }

    /// Back to normal: deploys record the image on the target; every job
    /// turns the system's netboot off and boots it from its disk.
    fn finish(&self, job: &Job) {
        if let Some(inv) = &self.inventory {
            let mut inv = inv.write().unwrap_or_else(|p| p.into_inner());
            if let Some(mut sys) = inv.system(&job.system).cloned() {
                let before = sys.clone();
                sys.netboot = false;
                if job.state == "done" && job.action != Action::Capture {
                    sys.image = Some(job.image.clone());
                    sys.profile = None;
                }
                if sys != before {
                    if let Err(e) = inv.update(Object::System(sys.clone()), &Author::new("clone")) {
                        tracing::error!(system = %job.system, error = %e, "recording the deploy on the system failed");
                    }
                }
                drop(inv);
                let power = self.power.clone();
                let name = job.system.clone();
                std::thread::spawn(move || match power(&sys, crate::bmc::BootDevice::Disk) {
                    Ok(what) => tracing::info!(system = %name, "{what}"),
                    Err(e) => {
                        tracing::warn!(system = %name, error = %e, "setting local boot failed")
                    }
                });
            }
        }
    }

    /// Stores an uploaded chunk after checking it.
    pub fn put_chunk(&self, raw_hex: &str, frame: &[u8]) -> Result<KnownChunk, ApiError> {
        let raw = format!("sha256:{raw_hex}");
        hex_of(&raw).map_err(|e| bad("bad_digest", e.to_string()))?;
        if let Some((blob, stored)) = self.store.lookup(&raw).map_err(internal)? {
            return Ok(KnownChunk {
                digest: raw,
                blob,
                stored,
            });
        }
        let size = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .ok_or_else(|| {
                bad(
                    "bad_chunk",
                    "the chunk is not a zstd frame with its content size",
                )
            })?;
        if size > 64 << 20 {
            return Err(bad(
                "bad_chunk",
                format!("a chunk of {size} bytes is more than 64 MiB"),
            ));
        }
        store::decode(frame, size, &raw).map_err(|e| bad("bad_chunk", format!("{e:#}")))?;
        let blob = self.store.put(&raw, frame.to_vec()).map_err(internal)?;
        Ok(KnownChunk {
            digest: raw,
            blob,
            stored: frame.len() as u64,
        })
    }

    /// Stores a capture's manifest and makes it an image (with lineage).
    pub fn put_manifest(&self, job: &Job, bytes: &[u8]) -> Result<Image, ApiError> {
        let m = Manifest::parse(bytes).map_err(|e| bad("bad_manifest", format!("{e:#}")))?;
        for c in &m.chunks {
            let ok = self
                .store
                .blob_path(&c.blob)
                .map(|p| p.exists())
                .unwrap_or(false);
            if !ok {
                return Err(bad(
                    "missing_chunk",
                    format!("chunk at {} (blob {}) was never uploaded", c.offset, c.blob),
                ));
            }
        }
        self.store.commit().map_err(internal)?;
        self.store.index_manifest(&m).map_err(internal)?;
        let digest = self.store.put_bytes(bytes).map_err(internal)?;
        let parent = self.last_capture_of(&job.system)?.unwrap_or_default();
        let mut vars = crate::inventory::model::Vars::new();
        vars.insert("system".into(), job.system.clone().into());
        vars.insert("parent".into(), parent.into());
        vars.insert("captured".into(), (now().floor()).into());
        vars.insert("disk_size".into(), m.disk_size.into());
        vars.insert("chunks".into(), m.chunks.len().into());
        vars.insert("captured_bytes".into(), m.captured_bytes().into());
        let img = Image {
            name: job.image.clone(),
            kind: "capture".into(),
            reference: digest,
            arch: "x86_64".into(),
            variables: vars,
            comment: format!("captured from system {}", job.system),
        };
        let inv = self.inventory.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_inventory",
                "this node has no inventory",
            )
        })?;
        inv.write()
            .unwrap_or_else(|p| p.into_inner())
            .create(Object::Image(img.clone()), &Author::new("clone"))
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string()))?;
        self.events.publish(
            "clone.image",
            Some(&job.mac),
            serde_json::json!({"job": job.id, "image": img.name, "manifest": img.reference, "parent": img.variables.get("parent")}),
        );
        Ok(img)
    }

    /// A stored frame, through the shared cache.
    pub fn blob(&self, hex: &str) -> Result<Arc<Vec<u8>>, ApiError> {
        let digest = format!("sha256:{hex}");
        hex_of(&digest).map_err(|e| bad("bad_digest", e.to_string()))?;
        if let Some(b) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hex)
        {
            return Ok(b);
        }
        let bytes = match self.store.get_blob(&digest) {
            Ok(b) => Arc::new(b),
            Err(e)
                if !self
                    .store
                    .blob_path(&digest)
                    .map(|p| p.exists())
                    .unwrap_or(false) =>
            {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_blob",
                    format!("{e:#}"),
                ))
            }
            Err(e) => return Err(internal(e)),
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hex.to_owned(), bytes.clone());
        Ok(bytes)
    }
}

fn sys_owned(j: &CloneJobs, name: &str) -> Result<System, ApiError> {
    j.inv()?.system(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_system",
            format!("no system {name:?}"),
        )
    })
}

/// The largest chunk an agent uploads (chunks are at most 4 MiB before
/// compression; the limit leaves room for incompressible ones).
const CHUNK_LIMIT: usize = 64 << 20;
/// The largest capture manifest.
const MANIFEST_LIMIT: usize = 64 << 20;

pub fn routes(jobs: CloneJobs) -> Vec<Route> {
    let j = jobs;
    vec![
        Route::get(
            "/api/v1/clone/jobs",
            Guard::Read,
            "Clone jobs: capture, deploy, restore",
        )
        .response("[Object]")
        .to(list_jobs, j.clone()),
        Route::post(
            "/api/v1/clone/jobs",
            Guard::Operator,
            "Start capture, deploy or restore jobs (power-cycles the machines)",
        )
        .request("Object")
        .response("Object")
        .creates()
        .to(create_jobs, j.clone()),
        Route::get("/api/v1/clone/jobs/{id}", Guard::Read, "One clone job")
            .response("Object")
            .to(get_job, j.clone()),
        Route::delete(
            "/api/v1/clone/jobs/{id}",
            Guard::Operator,
            "Cancel a job (?reason=); the machine goes back to local boot",
        )
        .response("Object")
        .to(cancel_job, j.clone()),
        Route::post(
            "/api/v1/clone/jobs/{id}/progress",
            Guard::Job,
            "The job's agent reports progress (its job token)",
        )
        .request("Object")
        .response("Object")
        .limit(crate::agents::CHECKIN_LIMIT)
        .to(job_progress, j.clone()),
        Route::get(
            "/api/v1/clone/chunks",
            Guard::Job,
            "Chunks the store holds (a capture agent skips them)",
        )
        .response("[Object]")
        .to(list_chunks, j.clone()),
        Route::put(
            "/api/v1/clone/chunks/{hex}",
            Guard::Job,
            "A capture agent uploads a chunk (zstd, named by its raw sha256)",
        )
        .request("binary")
        .response("Object")
        .creates()
        .limit(CHUNK_LIMIT)
        .to(upload_chunk, j.clone()),
        Route::get(
            "/api/v1/clone/blobs/{hex}",
            Guard::Job,
            "A deploy agent fetches a stored chunk",
        )
        .response("binary")
        .to(get_blob, j.clone()),
        Route::post(
            "/api/v1/clone/manifests",
            Guard::Job,
            "A capture agent uploads its manifest; the image is recorded when the job completes",
        )
        .request("binary")
        .response("Object")
        .creates()
        .limit(MANIFEST_LIMIT)
        .to(upload_manifest, j),
    ]
}

impl crate::http::JobTokens for CloneJobs {
    fn job_of(&self, token: &str) -> Option<crate::http::JobRef> {
        if token.is_empty() {
            return None;
        }
        self.lock()
            .values()
            .find(|j| j.open() && j.token == token)
            .map(|j| crate::http::JobRef {
                kind: "clone",
                id: j.id.clone(),
                mac: Some(j.mac.clone()),
            })
    }
}

#[cfg(test)]
pub fn router(jobs: CloneJobs) -> Router {
    let auth = crate::http::Auth::allow_all();
    auth.add_jobs(Arc::new(jobs.clone()));
    crate::http::build(routes(jobs), auth)
}

/// The open job of the caller's job token, if it is one of `actions`.
fn caller_job(j: &CloneJobs, caller: &Caller, actions: &[Action]) -> Result<Option<Job>, ApiError> {
    if caller.is_operator() {
        return Ok(None);
    }
    let job = caller
        .job()
        .filter(|r| r.kind == "clone")
        .and_then(|r| j.lock().get(&r.id).cloned())
        .filter(|job| job.open())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this request needs an open clone job's token or an operator token",
            )
        })?;
    if !actions.contains(&job.action) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_job",
            format!("a {:?} job's token may not do this", job.action),
        ));
    }
    Ok(Some(job))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

async fn list_jobs(
    State(j): State<CloneJobs>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<Job>> {
    Json(page.page(j.list(), |j| j.id.clone()))
}

async fn get_job(
    State(j): State<CloneJobs>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Job>, ApiError> {
    j.get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_job", format!("no job {id}")))
}

async fn create_jobs(
    State(j): State<CloneJobs>,
    body: Result<Json<JobRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Vec<Job>>), ApiError> {
    let Json(req) = body?;
    let jobs = blocking(move || j.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(jobs)))
}

async fn cancel_job(
    State(j): State<CloneJobs>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Job>, ApiError> {
    // An optional `?reason=…` (the CLI's timeout says why).
    let reason = q
        .get("reason")
        .map(|r| r.trim().chars().take(300).collect::<String>())
        .filter(|r| !r.is_empty())
        .map(|r| format!("cancelled: {r}"))
        .unwrap_or_else(|| "cancelled by the operator".into());
    blocking(move || j.cancel(&id, &reason)).await.map(Json)
}

async fn job_progress(
    State(j): State<CloneJobs>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<JobProgress>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Job>, ApiError> {
    // The guard bound a job token to this `{id}`.
    caller_job(
        &j,
        &caller,
        &[Action::Capture, Action::Deploy, Action::Restore],
    )?;
    let Json(p) = body?;
    blocking(move || j.progress(&id, p)).await.map(Json)
}

async fn list_chunks(
    State(j): State<CloneJobs>,
    caller: Caller,
    page: crate::http::PageParams,
) -> Result<Json<crate::http::Paged<KnownChunk>>, ApiError> {
    caller_job(&j, &caller, &[Action::Capture])?;
    let chunks = blocking(move || {
        j.store.known().map_err(internal).map(|v| {
            v.into_iter()
                .map(|(digest, blob, stored)| KnownChunk {
                    digest,
                    blob,
                    stored,
                })
                .collect::<Vec<_>>()
        })
    })
    .await?;
    Ok(Json(page.page(chunks, |c: &KnownChunk| c.digest.clone())))
}

async fn upload_chunk(
    State(j): State<CloneJobs>,
    caller: Caller,
    UrlPath(hex): UrlPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<KnownChunk>), ApiError> {
    caller_job(&j, &caller, &[Action::Capture])?;
    let k = blocking(move || j.put_chunk(&hex, &body)).await?;
    Ok((StatusCode::CREATED, Json(k)))
}

async fn get_blob(
    State(j): State<CloneJobs>,
    caller: Caller,
    UrlPath(hex): UrlPath<String>,
) -> Result<Vec<u8>, ApiError> {
    caller_job(&j, &caller, &[Action::Deploy, Action::Restore])?;
    let b = blocking(move || j.blob(&hex)).await?;
    Ok(b.as_ref().clone())
}

async fn upload_manifest(
    State(j): State<CloneJobs>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let job = caller_job(&j, &caller, &[Action::Capture])?.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "not_a_capture",
            "manifests come from an open capture job's agent",
        )
    })?;
    let img = blocking(move || j.put_manifest(&job, &body)).await?;
    Ok((StatusCode::CREATED, Json(img)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    type Calls = Arc<Mutex<Vec<(String, crate::bmc::BootDevice)>>>;

    fn setup(dir: &Path) -> (CloneJobs, Calls) {
        let inv = crate::inventory::tests::sample(&dir.join("inventory"));
        let calls: Calls = Arc::default();
        let c = calls.clone();
        let power: PowerHook = Arc::new(move |s: &System, d| {
            c.lock().unwrap().push((s.name.clone(), d));
            Ok(format!("cycled {}", s.name))
        });
        let jobs = CloneJobs::new(dir, Some(Arc::new(RwLock::new(inv))), Events::new(), power);
        (jobs, calls)
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: &str,
        body: Vec<u8>,
    ) -> (StatusCode, serde_json::Value) {
        let resp = app
            .clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn capture_job_uploads_chunks_makes_an_image_and_returns_to_local_boot() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, calls) = setup(dir.path());
        let app = router(jobs.clone());
        let req = serde_json::json!({"action":"capture","systems":["web1"],"image":"web1-gold"});
        let (st, v) = call(
            &app,
            "POST",
            "/api/v1/clone/jobs",
            "",
            req.to_string().into_bytes(),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let id = v[0]["id"].as_str().unwrap().to_owned();
        assert!(v[0].get("token").is_none(), "tokens are never listed");
        assert_eq!(
            calls.lock().unwrap()[0],
            ("web1".into(), crate::bmc::BootDevice::Network)
        );
        // A second job on the same machine is refused while one is open.
        let (st, v) = call(
            &app,
            "POST",
            "/api/v1/clone/jobs",
            "",
            req.to_string().into_bytes(),
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT, "{v}");

        // The agent's PXE boot and work.
        let mac = "aa:bb:cc:00:00:01";
        assert!(jobs
            .ipxe_for_mac(mac, "http://s")
            .unwrap()
            .contains("appliance.mode=agent"));
        let rec = crate::agents::AgentRecord {
            mac: mac.into(),
            hardware: crate::hwinfo::Hardware {
                firmware: "uefi".into(),
                cpus: 1,
                cpu_model: None,
                memory_bytes: 0,
                nics: vec![],
                disks: vec![],
                vendor: None,
                product: None,
                serial: None,
            },
            release: None,
            mode: None,
            first_seen: 0.0,
            last_seen: 0.0,
            checkins: 1,
            address: None,
        };
        let Some(crate::agents::Work::Capture(w)) = jobs.work_for(&rec, "http://s") else {
            panic!("no capture work")
        };

        // Chunks: a bad one is refused and not kept; a good one is stored once.
        let raw = vec![3u8; 200_000];
        let digest = store::sha256(&raw);
        let hex = hex_of(&digest).unwrap().to_owned();
        let frame = store::encode(&raw, 1).unwrap();
        let (st, v) = call(
            &app,
            "PUT",
            &format!("/api/v1/clone/chunks/{hex}"),
            &w.token,
            frame[..frame.len() - 3].to_vec(),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["code"], "bad_chunk");
        let other = store::encode(&[9u8; 10], 1).unwrap();
        let (st, _) = call(
            &app,
            "PUT",
            &format!("/api/v1/clone/chunks/{hex}"),
            &w.token,
            other,
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/sha256"))
                .map(|r| r.count())
                .unwrap_or(0),
            0
        );
        let (st, v) = call(
            &app,
            "PUT",
            &format!("/api/v1/clone/chunks/{hex}"),
            &w.token,
            frame.clone(),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let blob = v["blob"].as_str().unwrap().to_owned();

        // A manifest naming a chunk never uploaded is refused.
        let chunk = |d: &str, b: &str| super::super::manifest::Chunk {
            offset: 0,
            length: raw.len() as u64,
            digest: d.into(),
            blob: b.into(),
            stored: frame.len() as u64,
        };
        let mut m = Manifest {
            schema: super::super::manifest::SCHEMA.into(),
            disk_size: 1 << 30,
            table: super::super::ptable::TableKind::None,
            chunk_size: 1 << 20,
            partitions: vec![],
            chunks: vec![chunk(&digest, &format!("sha256:{}", "0".repeat(64)))],
        };
        let (st, v) = call(
            &app,
            "POST",
            "/api/v1/clone/manifests",
            &w.token,
            m.to_bytes(),
        )
        .await;
        assert_eq!(
            (st, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("missing_chunk"))
        );
        m.chunks = vec![chunk(&digest, &blob)];
        let (st, v) = call(
            &app,
            "POST",
            "/api/v1/clone/manifests",
            &w.token,
            m.to_bytes(),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["type"], "capture");
        assert_eq!(v["variables"]["system"], "web1");
        assert_eq!(v["reference"], store::sha256(&m.to_bytes()));
        // The chunk list now has it.
        let (_, v) = call(&app, "GET", "/api/v1/clone/chunks", &w.token, vec![]).await;
        assert_eq!(v["items"][0]["digest"], digest.as_str());

        let p = serde_json::json!({"phase":"done","state":"done","message":"ok"});
        let (st, v) = call(
            &app,
            "POST",
            &format!("/api/v1/clone/jobs/{id}/progress"),
            &w.token,
            p.to_string().into_bytes(),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["state"], "done");
        assert!(jobs.ipxe_for_mac(mac, "http://s").is_none());
        {
            let inv = jobs.inventory.as_ref().unwrap().read().unwrap();
            assert!(!inv.system("web1").unwrap().netboot);
        }
        // Local boot is set from a background thread.
        for _ in 0..50 {
            if calls.lock().unwrap().len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            calls.lock().unwrap()[1],
            ("web1".into(), crate::bmc::BootDevice::Disk)
        );

        // Restore without --from picks that capture.
        assert_eq!(
            jobs.last_capture_of("web1").unwrap().as_deref(),
            Some("web1-gold")
        );
        let req = serde_json::json!({"action":"restore","systems":["web1"]});
        let (st, v) = call(
            &app,
            "POST",
            "/api/v1/clone/jobs",
            "",
            req.to_string().into_bytes(),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v[0]["image"], "web1-gold");
        let Some(crate::agents::Work::Deploy(d)) = jobs.work_for(&rec, "http://s") else {
            panic!("no deploy work")
        };
        assert_eq!(d.manifest, store::sha256(&m.to_bytes()));
        assert_eq!(d.system.hostname, "web1.lab");
        // The shared cache serves the blob.
        let (st, _) = call(
            &app,
            "GET",
            &format!("/api/v1/clone/blobs/{}", hex_of(&blob).unwrap()),
            &d.token,
            vec![],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let c = jobs.cancel(&d.job, "timed out").unwrap();
        assert_eq!(
            (c.state.as_str(), c.message.as_str()),
            ("failed", "timed out")
        );
    }

    #[test]
    fn a_quiet_running_job_is_shown_stalled() {
        let mut j = Job {
            id: "j".into(),
            action: Action::Deploy,
            system: "s".into(),
            mac: "m".into(),
            image: "i".into(),
            state: "running".into(),
            phase: "write".into(),
            done_bytes: 1,
            total_bytes: 2,
            message: String::new(),
            created: 0.0,
            updated: 1000.0,
            power: String::new(),
            token: String::new(),
            report: None,
        };
        assert_eq!(j.view(1000.0 + STALLED_AFTER - 1.0).message, "");
        let v = j.view(1000.0 + STALLED_AFTER + 10.0);
        assert!(
            v.message
                .starts_with("stalled: no word from the agent for 130 s"),
            "{}",
            v.message
        );
        assert_eq!(v.state, "running");
        j.state = "done".into();
        assert_eq!(j.view(1e9).message, "");
    }

    #[tokio::test]
    async fn refusals_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, _) = setup(dir.path());
        let app = router(jobs);
        for (req, code) in [
            (
                serde_json::json!({"action":"capture","systems":["nope"],"image":"x"}),
                "unknown_system",
            ),
            (
                serde_json::json!({"action":"capture","systems":["web1"]}),
                "no_name",
            ),
            (
                serde_json::json!({"action":"deploy","systems":["web1"],"image":"missing"}),
                "unknown_image",
            ),
            (
                serde_json::json!({"action":"restore","systems":["web1"]}),
                "no_capture",
            ),
            (
                serde_json::json!({"action":"deploy","systems":[]}),
                "no_targets",
            ),
        ] {
            let (_, v) = call(
                &app,
                "POST",
                "/api/v1/clone/jobs",
                "",
                req.to_string().into_bytes(),
            )
            .await;
            assert_eq!(v["code"], code, "{req}: {v}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_captures_and_deploys_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, _) = setup(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = router(jobs.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let req = JobRequest {
            action: Action::Capture,
            systems: vec!["web1".into()],
            image: Some("gold".into()),
        };
        let job = jobs.create(&req).unwrap().remove(0);
        let token = jobs.lock()[&job.id].token.clone();
        let disk = dir.path().join("disk.raw");
        let mut bytes = vec![0u8; 8 << 20];
        for (i, b) in bytes.iter_mut().enumerate().skip(3 << 20).take(600_000) {
            *b = (i * 7 % 251) as u8;
        }
        bytes[100] = 1;
        std::fs::write(&disk, &bytes).unwrap();
        let (u, t, d) = (url.clone(), token.clone(), disk.clone());
        let m = tokio::task::spawn_blocking(move || {
            let store = super::super::remote::HttpStore::connect(&u, &t).unwrap();
            let (m, rep) =
                super::super::capture_path(&d, &store, &Default::default(), &mut |_, _| {})
                    .unwrap();
            assert_eq!(rep.new_chunks, m.chunks.len());
            store
                .request("POST", "manifests", Some(&m.to_bytes()))
                .unwrap();
            m
        })
        .await
        .unwrap();
        let img = jobs.inv().unwrap().image("gold").cloned().unwrap();
        assert_eq!(img.reference, store::sha256(&m.to_bytes()));
        // A node that got the blobs and the image by sync has no index yet.
        std::fs::remove_dir_all(dir.path().join("cache/clone")).unwrap();
        assert_eq!(jobs.reindex(), m.chunks.len());
        // Deploy it back through HTTP onto a file holding old data.
        let target = dir.path().join("target.raw");
        std::fs::write(&target, vec![0x55u8; 8 << 20]).unwrap();
        // Job tokens are single-purpose: the capture's token reads nothing.
        let (u, t, r) = (url.clone(), token.clone(), img.reference.clone());
        let refused = tokio::task::spawn_blocking(move || {
            super::super::remote::HttpStore::reader(&u, &t)
                .get_blob(&r)
                .is_err()
        })
        .await
        .unwrap();
        assert!(refused, "a capture job's token read a stored blob");
        // (The test router lets any other token through as an operator.)
        let (u, t, tg, r) = (
            url,
            "operator".to_owned(),
            target.clone(),
            img.reference.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let store = super::super::remote::HttpStore::reader(&u, &t);
            let m = Manifest::parse(&store.get_blob(&r).unwrap()).unwrap();
            let mut f = super::super::remote::HttpFetch(&store);
            super::super::deploy::deploy(&m, &mut f, &tg, &mut |_| {}).unwrap();
        })
        .await
        .unwrap();
        assert!(
            std::fs::read(&target).unwrap() == bytes,
            "raw data and its zero runs come back"
        );
    }
}
