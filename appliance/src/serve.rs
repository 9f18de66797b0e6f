//! `appliance serve`: builds the API state from the data directory and runs
//! the HTTP server until SIGTERM or SIGINT.
//!
//! Startup never fails on a bad data directory: a missing or unwritable data
//! dir (the node id then lives only in memory) or a missing release manifest
//! becomes a degraded reason instead. Once bound, it prints
//! `listening on <addr>` on stdout (the real port when given port 0), and
//! under our init also the console marker `serving on <addr>`.
//!
//! The first API token is printed on stdout as `first API token (shown
//! once, keep it): apl_…` right after that line, or, when the kernel's
//! random pool is not initialized yet, later by a thread that waits for it
//! ([`FirstToken::Waiting`]); the server does not wait.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::api::{self, AppState};
use crate::contract::RELEASE_MANIFEST;

/// Kernel arguments every PXE-booted agent gets besides its mode and server.
pub const AGENT_CMDLINE: &str = "console=tty0 console=ttyS0,115200 loglevel=4";

/// Options of `appliance serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub degraded_file: Option<PathBuf>,
    pub allow_power: bool,
    /// Inventory reads need a token too (default: reads are public).
    pub private_reads: bool,
    /// The URL this node's API is reachable at, sent to its parent; when
    /// absent, derived from `listen` unless that is a wildcard address.
    pub advertise_url: Option<String>,
    /// How often to check in with the parent (`state/parent.json`).
    pub checkin_interval: Duration,
    /// How often to sync with the parent (`None`: only on demand).
    pub sync_interval: Option<Duration>,
}

impl ServeOptions {
    /// Defaults for everything but where to listen and the data directory.
    pub fn new(listen: SocketAddr, data: PathBuf) -> Self {
        Self {
            listen,
            data,
            degraded_file: None,
            allow_power: false,
            private_reads: false,
            advertise_url: None,
            checkin_interval: crate::parent::CHECKIN_INTERVAL,
            sync_interval: Some(Duration::from_secs(300)),
        }
    }
}

/// `sha256:<hex>` of the exact bytes of a file.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
}

/// Builds the API state; every problem becomes a degraded reason.
pub fn build_state(opts: &ServeOptions) -> AppState {
    let mut degraded = Vec::new();
    // A child's id is the one its parent registered (parent.json); the
    // installer writes both files, serve fills in a missing node.json.
    let parent = match crate::parent::load(&opts.data) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "parent link unreadable");
            degraded.push(format!("parent link unreadable: {e:#}"));
            None
        }
    };
    let node_id = match crate::node::load_or_create_with(
        &opts.data,
        parent.as_ref().map(|p| p.node_id),
    ) {
        Ok(id) => {
            if let Some(p) = parent.as_ref().filter(|p| p.node_id != id) {
                tracing::error!(node_id = %id, registered = %p.node_id, "node id differs from the parent link");
                degraded.push(format!(
                    "node id {id} differs from the id {} the parent registered (state/parent.json)",
                    p.node_id
                ));
            }
            id.to_string()
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "node id not persisted");
            degraded.push(format!("node id not persisted: {e:#}"));
            crate::entropy::unique_uuid().to_string()
        }
    };
    let manifest = opts.data.join(RELEASE_MANIFEST);
    let release = match file_digest(&manifest) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(path = %manifest.display(), error = %e, "release manifest unreadable");
            degraded.push(format!("release manifest {}: {e}", manifest.display()));
            None
        }
    };
    AppState {
        version: env!("CARGO_PKG_VERSION"),
        node_id,
        started: Instant::now(),
        release,
        degraded,
        degraded_file: opts.degraded_file.clone(),
        power: crate::power::for_serve(opts.allow_power),
    }
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn run(opts: ServeOptions) -> Result<()> {
    let mut state = build_state(&opts);
    let events = crate::events::Events::new();
    // The inventory (issue 6): `<data>/inventory` and `<data>/state/tokens.json`.
    let inventory =
        match crate::inventory::api::open_state(&opts.data, !opts.private_reads, events.clone()) {
            Ok(inv) => Some(inv),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "inventory unavailable");
                state.degraded.push(format!("inventory unavailable: {e:#}"));
                None
            }
        };
    let tokens_file = opts.data.join("state/tokens.json");
    let first_token = first_token(&tokens_file);
    if let FirstToken::Failed(e) = &first_token {
        tracing::error!(error = %e, "creating the first API token failed");
        state
            .degraded
            .push(format!("creating the first API token: {e}"));
    }
    let state = Arc::new(state);
    tracing::info!(node_id = %state.node_id, release = ?state.release, "starting server");
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}").context("writing to stdout")?;
        if let FirstToken::Created(token) = &first_token {
            print_first_token(&mut out, token);
        }
        out.flush().context("flushing stdout")?;
    }
    if crate::power::under_our_init() {
        crate::console::marker(&format!("serving on {addr}"));
    }
    if first_token == FirstToken::Waiting {
        spawn_first_token_waiter(tokens_file);
    }
    let networks = crate::network::Networks::new(&opts.data, events.clone());
    networks.restore().await;
    let tokens = Arc::new(crate::auth::TokenStore::open(
        &opts.data.join("state/tokens.json"),
    ));
    let node_uuid = uuid::Uuid::parse_str(&state.node_id).expect("node ids are UUIDs");
    let replicas = crate::replicas::Replicas::open(
        &opts.data,
        tokens.clone(),
        node_uuid,
        events.clone(),
        !opts.private_reads,
    )
    .unwrap_or_else(|e| {
        tracing::error!(
            error = format!("{e:#}"),
            "replica registry unreadable; starting empty in memory"
        );
        crate::replicas::Replicas::memory(tokens.clone(), node_uuid, events.clone())
    });
    start_parent_checkins(&opts, &state, addr);
    // Self-replication: serves this release to machines installing it.
    let replication = crate::replicate::Replication::new(
        &opts.data,
        events.clone(),
        inventory.as_ref().map(|inv| inv.boot_policy()),
        replicas.clone(),
        networks.clone(),
    );
    // Operator writes (power, networks, rebuilds, flash) need a bearer token like the
    // inventory's; agent check-ins and PXE fetches come from targets, which
    // carry none.
    let guarded = api::router(state)
        .merge(crate::network::router(networks.clone()))
        .merge(crate::rebuild::router(opts.data.clone()))
        .merge(crate::replicate::router(replication.clone()))
        .merge(crate::flash::router(crate::flash::FlashState::new(
            &opts.data,
        )))
        .layer(axum::middleware::from_fn_with_state(
            tokens.clone(),
            require_token_for_writes,
        ));
    // Cloning: jobs, the chunk store agents upload to and deploy from.
    let mut cloning = crate::clone::server::CloneJobs::new(
        &opts.data,
        inventory.as_ref().map(|inv| inv.boot_policy()),
        events.clone(),
        Some(tokens.clone()),
        crate::clone::server::bmc_power(),
    );
    cloning.agent_cmdline = AGENT_CMDLINE.into();
    {
        let c = cloning.clone();
        tokio::task::spawn_blocking(move || c.reindex());
    }
    // Replica endpoints check operator or child-scoped tokens themselves.
    let mut app = guarded
        .merge(crate::clone::server::router(cloning.clone()))
        .merge(crate::replicas::router(replicas.clone()))
        .merge(crate::events::router(events.clone()))
        .merge(crate::replicate::agent_router(replication.clone()))
        .merge(crate::agents::router(
            crate::agents::Agents::open(&opts.data, events.clone()).with_work({
                let r = replication.clone();
                let c = cloning.clone();
                Arc::new(move |rec: &crate::agents::AgentRecord, base: &str| {
                    c.work_for(rec, base).or_else(|| r.work_for(rec, base))
                })
            }),
        ));
    // Open clone jobs decide first (their machines boot the agent), then
    // replication (registered replicas install, installed ones boot
    // locally), then the inventory.
    let inv_policy = inventory.as_ref().map(|inv| inv.boot_policy());
    let policy: Option<crate::pxe::BootPolicy> = Some(Arc::new(move |mac: &str, server: &str| {
        use crate::inventory::boot::BootPolicy as _;
        cloning
            .ipxe_for_mac(mac, server)
            .or_else(|| replication.ipxe_for_mac(mac, server))
            .or_else(|| {
                inv_policy
                    .as_ref()
                    .and_then(|inv| inv.ipxe_for_mac(mac, server))
            })
    }));
    app = app.merge(crate::pxe::router(crate::pxe::PxeState {
        data: opts.data.clone(),
        events,
        policy,
        agent_cmdline: AGENT_CMDLINE.into(),
    }));
    if let Some(inv) = &inventory {
        let node = Arc::new(crate::sync::SyncNode::new(
            &opts.data,
            node_uuid,
            inv.inventory.clone(),
            Some(replicas.clone()),
        ));
        start_background_sync(&opts, node.clone());
        app = app.merge(crate::sync::api::router(Arc::new(
            crate::sync::api::SyncState {
                node,
                tokens: tokens.clone(),
                public_reads: !opts.private_reads,
            },
        )));
    }
    if let Some(inv) = inventory {
        app = app.merge(
            crate::inventory::api::router(inv).layer(tower_http::trace::TraceLayer::new_for_http()),
        );
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving HTTP")?;
    tracing::info!("server stopped");
    Ok(())
}

/// The first operator token, made at first start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstToken {
    /// A token file exists: nothing to do.
    Exists,
    /// Created now; printed once.
    Created(String),
    /// The kernel's random pool is not initialized: a background thread
    /// waits for it (guarded requests answer 503 `no_token_yet` meanwhile).
    Waiting,
    /// Creating it failed otherwise (a degraded reason).
    Failed(String),
}

/// Creates the first token now when the kernel's random pool allows it.
pub fn first_token(tokens_file: &Path) -> FirstToken {
    match crate::auth::TokenStore::open(tokens_file).ensure_first() {
        Ok(Some(t)) => FirstToken::Created(t),
        Ok(None) => FirstToken::Exists,
        Err(e) if e.downcast_ref::<crate::entropy::NotReady>().is_some() => FirstToken::Waiting,
        Err(e) => FirstToken::Failed(format!("{e:#}")),
    }
}

fn print_first_token(out: &mut impl Write, token: &str) {
    let _ = writeln!(out, "first API token (shown once, keep it): {token}");
}

/// Waits for the kernel's random pool on a thread of its own (never a
/// runtime worker), then creates and prints the first token.
fn spawn_first_token_waiter(tokens_file: PathBuf) {
    let msg = "waiting for the kernel's random pool to create the API token \
               (no hardware RNG, no saved seed); writes answer 503 until then";
    tracing::warn!("{msg}");
    if crate::power::under_our_init() {
        crate::console::marker(msg);
    }
    let spawned = std::thread::Builder::new()
        .name("first-token".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            crate::entropy::wait_ready();
            tracing::info!(waited_s = t.elapsed().as_secs(), "kernel random pool ready");
            match first_token(&tokens_file) {
                FirstToken::Created(token) => {
                    let mut out = std::io::stdout().lock();
                    print_first_token(&mut out, &token);
                    let _ = out.flush();
                }
                FirstToken::Exists => {}
                other => tracing::error!(?other, "creating the first API token failed"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the first-token thread failed");
    }
}

/// The URL a parent can reach this node at: `advertise_url`, else the bound
/// address unless it is a wildcard.
pub fn reachable_url(opts: &ServeOptions, bound: SocketAddr) -> Option<String> {
    if let Some(u) = &opts.advertise_url {
        return Some(u.clone());
    }
    (!bound.ip().is_unspecified()).then(|| format!("http://{bound}"))
}

/// Spawns the periodic check-in with the parent when `state/parent.json`
/// exists.
/// The digest of the disk image this node was installed from
/// (`state/image.json`, written by the installer).
fn installed_image_digest(data: &Path) -> Option<String> {
    let bytes = std::fs::read(data.join(crate::install::IMAGE_STATE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["disk_digest"].as_str().map(str::to_owned)
}

fn start_parent_checkins(opts: &ServeOptions, state: &AppState, bound: SocketAddr) {
    let link = match crate::parent::load(&opts.data) {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "parent link unreadable; not checking in"
            );
            return;
        }
    };
    let report = crate::replicas::CheckinRequest {
        release: state.release.clone(),
        image_digest: installed_image_digest(&opts.data),
        url: reachable_url(opts, bound),
        status: Some("running".into()),
    };
    tracing::info!(parent = %link.url, every_s = opts.checkin_interval.as_secs(), "checking in with the parent");
    tokio::spawn(crate::parent::run_checkins(
        link,
        report,
        opts.checkin_interval,
    ));
}

/// Syncs with the parent every `sync_interval` when `state/parent.json`
/// exists (the first run right after start); failures are logged and
/// retried on the next tick.
fn start_background_sync(opts: &ServeOptions, node: Arc<crate::sync::SyncNode>) {
    let Some(every) = opts.sync_interval else {
        return;
    };
    let data = opts.data.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(Some(link)) = crate::parent::load(&data) else {
                continue;
            };
            let n = node.clone();
            match tokio::task::spawn_blocking(move || n.sync_with_parent(&link)).await {
                Ok(Ok(r)) => tracing::info!(
                    state = ?r.state, pushed = r.pushed_objects, pulled = r.pulled_objects,
                    "synced with the parent"
                ),
                Ok(Err(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "sync with the parent failed; retrying"
                ),
                Err(e) => tracing::error!(error = %e, "sync task failed"),
            }
        }
    });
}

/// Refuse non-GET requests without a valid `Authorization: Bearer` token.
async fn require_token_for_writes(
    axum::extract::State(tokens): axum::extract::State<Arc<crate::auth::TokenStore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented.and_then(|t| tokens.verify(t)) {
        Some(_) => next.run(req).await,
        None => crate::auth::refused(
            Some(&tokens),
            "this request needs a valid bearer token (appliance token create)",
        )
        .into_response(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("installing signal handlers failed; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(data: &Path) -> ServeOptions {
        ServeOptions::new("127.0.0.1:0".parse().unwrap(), data.to_owned())
    }

    #[test]
    fn release_is_the_sha256_of_the_manifest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("release")).unwrap();
        std::fs::write(dir.path().join(RELEASE_MANIFEST), b"abc").unwrap();
        let state = build_state(&opts(dir.path()));
        assert_eq!(
            state.release.as_deref(),
            Some("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(state.degraded.is_empty(), "{:?}", state.degraded);
    }

    #[test]
    fn missing_data_dir_degrades_but_still_has_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let state = build_state(&opts(&dir.path().join("missing")));
        assert!(state.release.is_none());
        assert_eq!(state.degraded.len(), 2, "{:?}", state.degraded);
        assert!(uuid::Uuid::parse_str(&state.node_id).is_ok());
    }

    #[test]
    fn a_child_takes_the_id_its_parent_registered() {
        let dir = tempfile::tempdir().unwrap();
        let link = crate::parent::ParentLink {
            url: "http://127.0.0.1:1".into(),
            token: "apl_x_y".into(),
            node_id: uuid::Uuid::new_v4(),
            parent_node_id: uuid::Uuid::new_v4(),
        };
        crate::parent::save(dir.path(), &link).unwrap();
        let state = build_state(&opts(dir.path()));
        assert_eq!(state.node_id, link.node_id.to_string());
        // A node.json with another id is reported, not silently replaced.
        crate::parent::save(
            dir.path(),
            &crate::parent::ParentLink {
                node_id: uuid::Uuid::new_v4(),
                ..link.clone()
            },
        )
        .unwrap();
        let state = build_state(&opts(dir.path()));
        assert_eq!(state.node_id, link.node_id.to_string());
        assert!(
            state.degraded.iter().any(|d| d.contains("differs")),
            "{:?}",
            state.degraded
        );
    }
}
