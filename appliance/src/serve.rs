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
    /// Where to serve HTTPS (the same API) with the site CA's certificate.
    pub listen_tls: Option<SocketAddr>,
    /// Names and addresses the server certificate covers besides the
    /// discovered ones (`crate::tls::Subjects::discover`).
    pub tls_names: Vec<String>,
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
            listen_tls: None,
            tls_names: Vec::new(),
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
pub async fn run(mut opts: ServeOptions) -> Result<()> {
    crate::http::server::raise_file_limit();
    // The HTTPS port is bound first, so what the node hands out (a child's
    // link back) names the port really bound, also for `--listen-tls :0`.
    let tls_listener = match opts.listen_tls {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?;
            opts.listen_tls = Some(l.local_addr().context("reading the bound address")?);
            Some(l)
        }
        None => None,
    };
    // A new data directory is created (as `git init` would); one that
    // cannot be is a degraded reason below, not a refusal to serve.
    if !opts.data.exists() {
        match std::fs::create_dir_all(&opts.data) {
            Ok(()) => tracing::info!(data = %opts.data.display(), "created the data directory"),
            Err(e) => {
                tracing::error!(data = %opts.data.display(), error = %e, "cannot create the data directory")
            }
        }
    }
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
    // BMC passwords are sealed with this node's key before they are stored.
    let sealer = Arc::new(crate::secrets::Sealer::new(&opts.data));
    crate::secrets::init(sealer.clone());
    if let Some(inv) = &inventory {
        crate::inventory::fresh_write(&inv.inventory).set_sealer(sealer);
    }
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
    let (app, sync_node) = build_app(&opts, state.clone(), events, inventory).await;
    start_parent_checkins(&opts, &state, addr);
    if let Some(node) = sync_node {
        start_background_sync(&opts, node);
    }
    let tls_server = match tls_listener {
        Some(listener) => start_tls(&opts, listener, app.clone()).await?,
        None => None,
    };
    crate::http::server::serve(
        listener,
        app,
        crate::http::server::Limits::default(),
        shutdown_signal(),
    )
    .await;
    if let Some(t) = tls_server {
        let _ = t.await;
    }
    tracing::info!("server stopped");
    Ok(())
}

/// The names and addresses the server certificate must cover now.
fn tls_subjects(opts: &ServeOptions, listen_tls: SocketAddr) -> crate::tls::Subjects {
    let mut extra = opts.tls_names.clone();
    if let Some(h) = opts.advertise_url.as_deref().and_then(crate::tls::url_host) {
        extra.push(h);
    }
    for ip in [opts.listen.ip(), listen_tls.ip()] {
        if !ip.is_unspecified() {
            extra.push(ip.to_string());
        }
    }
    crate::tls::Subjects::discover(&extra)
}

/// Loads or creates the site CA, prints the HTTPS address and the CA
/// fingerprint, and serves `app` over TLS on `listener` until shutdown;
/// the server certificate is reissued when the node's addresses change
/// (checked every 30 s). A broken TLS directory is logged and the node
/// serves plain HTTP only (a port that cannot be bound is an error of
/// `run`).
async fn start_tls(
    opts: &ServeOptions,
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let listen_tls = listener.local_addr().context("reading the bound address")?;
    let site = {
        let (data, subjects) = (opts.data.clone(), tls_subjects(opts, listen_tls));
        tokio::task::spawn_blocking(move || crate::tls::SiteTls::load_or_create(&data, subjects))
            .await
            .context("creating the site CA")?
    };
    let site = match site.and_then(|s| Ok((s.server_config()?, s))) {
        Ok((cfg, s)) => (cfg, Arc::new(s)),
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "TLS unavailable; serving plain HTTP only"
            );
            return Ok(None);
        }
    };
    let (config, site) = site;
    let addr = listen_tls;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening (https) on {addr}").context("writing to stdout")?;
        writeln!(
            out,
            "site CA SHA-256 fingerprint: {}",
            site.ca_fingerprint()
        )
        .context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    if crate::power::under_our_init() {
        crate::console::marker(&format!(
            "serving https on {addr}, site CA SHA-256 {}",
            site.ca_fingerprint()
        ));
    }
    {
        let (opts, site) = (opts.clone(), site.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            loop {
                tick.tick().await;
                let subjects = tls_subjects(&opts, listen_tls);
                let s = site.clone();
                match tokio::task::spawn_blocking(move || s.refresh(subjects)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        error = format!("{e:#}"),
                        "reissuing the server certificate failed"
                    ),
                    Err(e) => tracing::warn!(error = %e, "reissuing the server certificate failed"),
                }
            }
        });
    }
    Ok(Some(tokio::spawn(crate::http::server::serve_tls(
        listener,
        config,
        app,
        crate::http::server::Limits::default(),
        shutdown_signal(),
    ))))
}

/// Everything `serve` answers: the route table of every module behind one
/// [`crate::http::Auth`], and the sync node for background syncs.
pub async fn build_app(
    opts: &ServeOptions,
    state: Arc<AppState>,
    events: crate::events::Events,
    inventory: Option<Arc<crate::inventory::api::InvState>>,
) -> (axum::Router, Option<Arc<crate::sync::SyncNode>>) {
    let networks = crate::network::Networks::new(&opts.data, events.clone());
    networks.restore().await;
    // One token store for every guard (the inventory opened it first).
    let tokens = match &inventory {
        Some(inv) => inv.tokens.clone(),
        None => Arc::new(crate::auth::TokenStore::open(
            &opts.data.join("state/tokens.json"),
        )),
    };
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
    // Self-replication: serves this release to machines installing it.
    let replication = crate::replicate::Replication::new(
        &opts.data,
        events.clone(),
        inventory.as_ref().map(|inv| inv.boot_policy()),
        replicas.clone(),
        networks.clone(),
    )
    .with_tls_port(opts.listen_tls.map(|a| a.port()));
    // Cloning: jobs, the chunk store agents upload to and deploy from.
    let mut cloning = crate::clone::server::CloneJobs::new(
        &opts.data,
        inventory.as_ref().map(|inv| inv.boot_policy()),
        events.clone(),
        crate::clone::server::bmc_power(),
    );
    cloning.agent_cmdline = AGENT_CMDLINE.into();
    {
        let c = cloning.clone();
        tokio::task::spawn_blocking(move || c.reindex());
    }
    // One trust model: every route's guard checks these tokens and the
    // job tokens of clone jobs and install attempts.
    let auth = crate::http::Auth::new(Some(tokens.clone()), !opts.private_reads);
    auth.add_jobs(Arc::new(cloning.clone()));
    auth.add_jobs(Arc::new(replication.clone()));
    // The appliance's own OS installer (Debian from an apt mirror).
    let os_installs =
        crate::osinstall::server::OsInstalls::open(&opts.data, inventory.clone(), events.clone());
    os_installs.start_watchdog();
    auth.add_jobs(Arc::new(os_installs.clone()));
    crate::audit::init(&opts.data);
    // The blob store's gc: abandoned upload partials expire.
    if let Some(inv) = &inventory {
        crate::inventory::upload::spawn_partial_gc(inv.blobs.clone());
    }
    let mut routes = api::routes(state.clone());
    routes.extend(crate::webui::routes());
    routes.extend(crate::tls::routes(opts.data.clone()));
    routes.extend(crate::network::routes(networks.clone()));
    routes.extend(crate::rebuild::routes(opts.data.clone()));
    routes.extend(crate::replicate::routes(replication.clone()));
    routes.extend(crate::flash::routes(crate::flash::FlashState::new(
        &opts.data,
    )));
    routes.extend(crate::clone::server::routes(cloning.clone()));
    routes.extend(crate::replicas::routes(replicas.clone()));
    routes.extend(crate::events::routes(events.clone()));
    routes.extend(crate::osinstall::server::routes(os_installs.clone()));
    routes.extend(crate::metrics::routes(crate::metrics::MetricsState {
        app: state.clone(),
        events: events.clone(),
        installs: Some(replication.clone()),
        clones: Some(cloning.clone()),
    }));
    routes.extend(crate::agents::routes(
        crate::agents::Agents::open(&opts.data, events.clone()).with_work({
            let r = replication.clone();
            let c = cloning.clone();
            let o = os_installs.clone();
            Arc::new(move |rec: &crate::agents::AgentRecord, base: &str| {
                c.work_for(rec, base)
                    .or_else(|| r.work_for(rec, base))
                    .or_else(|| o.work_for(rec, base))
            })
        }),
    ));
    // Open clone jobs decide first (their machines boot the agent), then
    // replication (registered replicas install, installed ones boot
    // locally), then the inventory.
    let inv_policy = inventory.as_ref().map(|inv| inv.boot_policy());
    {
        // The DHCP side of the same decision: a system with netboot off,
        // for which no clone job or replication has work, boots its disk.
        let (c, r, inv) = (cloning.clone(), replication.clone(), inv_policy.clone());
        networks.set_local_boot(Arc::new(move |mac: &str| {
            c.ipxe_for_mac(mac, "").is_none()
                && r.ipxe_for_mac(mac, "").is_none()
                && inv.as_ref().is_some_and(|inv| {
                    crate::inventory::fresh_read(inv)
                        .system_by_mac(mac)
                        .is_some_and(|s| !s.netboot)
                })
        }));
    }
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
    routes.extend(crate::pxe::routes(crate::pxe::PxeState {
        data: opts.data.clone(),
        events,
        policy,
        agent_cmdline: AGENT_CMDLINE.into(),
    }));
    let mut sync_node = None;
    if let Some(inv) = &inventory {
        let node = Arc::new(crate::sync::SyncNode::new(
            &opts.data,
            node_uuid,
            inv.inventory.clone(),
            Some(replicas.clone()),
        ));
        sync_node = Some(node.clone());
        routes.extend(crate::sync::api::routes(Arc::new(
            crate::sync::api::SyncState {
                node,
                tokens: tokens.clone(),
                public_reads: !opts.private_reads,
            },
        )));
    }
    if let Some(inv) = &inventory {
        // The OCI registry; anonymous pulls follow the inventory setting.
        let i = inv.inventory.clone();
        auth.set_registry_open(Arc::new(move || {
            crate::inventory::fresh_read(&i)
                .settings()
                .registry_anonymous_pulls
        }));
        routes.extend(crate::oci::registry::routes(
            crate::oci::registry::RegistryState::new(
                opts.data.clone(),
                inv.inventory.clone(),
                inv.events.clone(),
            ),
        ));
    }
    if let Some(inv) = inventory {
        // Apt partial mirrors of the inventory's apt repos.
        routes.extend(crate::repo::api::routes(crate::repo::api::RepoState::new(
            opts.data.clone(),
            inv.inventory.clone(),
            inv.events.clone(),
        )));
        routes.extend(crate::inventory::upload::routes(inv.clone()));
        routes.extend(crate::inventory::profile_report::routes(inv.clone()));
        routes.extend(crate::inventory::api::routes(inv));
    }
    let app = crate::http::build(routes, auth);
    (app, sync_node)
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
            ca: None,
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

    /// Walks the served OpenAPI document: every route the table declares
    /// is in it with its guard, and every guarded route refuses a request
    /// without a token, with a wrong token and with a token of the wrong
    /// scope, before it reads the (oversized) body.
    #[tokio::test]
    async fn every_guarded_route_refuses_missing_wrong_and_misscoped_tokens() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.private_reads = true;
        let state = Arc::new(build_state(&o));
        let events = crate::events::Events::new();
        let inv = crate::inventory::api::open_state(&o.data, false, events.clone()).unwrap();
        let admin = inv.tokens.ensure_first().unwrap().expect("a first token");
        let child = uuid::Uuid::new_v4();
        let read = inv
            .tokens
            .create_scoped("viewer", crate::auth::Scope::Read)
            .unwrap()
            .1;
        let operator = inv.tokens.create("ops").unwrap().1;
        let replica = inv
            .tokens
            .create_scoped("child", crate::auth::Scope::Replica(child))
            .unwrap()
            .1;
        let (app, _) = build_app(&o, state, events, Some(inv)).await;
        let resp = app
            .clone()
            .oneshot(
                Request::get("/api/v1/openapi.json")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let doc: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let other = uuid::Uuid::new_v4().to_string();
        let mut pairs = 0;
        let mut guarded = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            // A node in the path is never the replica token's own.
            let uri = path
                .replace("{node}", &other)
                .replace("{node_id}", &other)
                .replace("{mac}", "52:54:00:12:34:56")
                .replace("{hex}", &"0".repeat(64))
                .replace(['{', '}'], "");
            for (method, op) in item.as_object().unwrap() {
                pairs += 1;
                let guard = op["x-guard"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} has no x-guard"));
                let wrong_scope: &[&str] = match guard {
                    "public" => continue,
                    "read" => &[replica.as_str()],
                    "operator" | "job" => &[read.as_str(), replica.as_str()],
                    "admin" => &[read.as_str(), operator.as_str(), replica.as_str()],
                    "replica" => &[read.as_str(), replica.as_str()],
                    "registry" => &[replica.as_str()],
                    g => panic!("{method} {path}: unknown guard {g}"),
                };
                guarded += 1;
                assert!(
                    op.get("security").is_some(),
                    "{method} {path} is guarded but documents no security"
                );
                let call = |token: Option<&str>| {
                    let mut r = Request::builder()
                        .method(method.to_ascii_uppercase().as_str())
                        .uri(&uri)
                        .header("content-type", "application/json");
                    if let Some(t) = token {
                        r = r.header("authorization", format!("Bearer {t}"));
                    }
                    // Larger than any JSON route's limit: refused by the
                    // guard first, never read.
                    r.body(Body::from(vec![b'x'; 2 << 20])).unwrap()
                };
                let cases = [
                    (None, StatusCode::UNAUTHORIZED),
                    (
                        Some(format!("apl_00000000_{}", "0".repeat(64))),
                        StatusCode::UNAUTHORIZED,
                    ),
                ];
                for (token, want) in cases {
                    let resp = app.clone().oneshot(call(token.as_deref())).await.unwrap();
                    assert_eq!(resp.status(), want, "{method} {path} with {token:?}");
                }
                for t in wrong_scope {
                    let resp = app.clone().oneshot(call(Some(t))).await.unwrap();
                    assert_eq!(
                        resp.status(),
                        StatusCode::FORBIDDEN,
                        "{method} {path} ({guard}) with a token of the wrong scope"
                    );
                }
                // The right caller gets past the guard (whatever the
                // handler then says of the made-up body or names).
                // (A handler may still refuse by purpose, e.g. manifests
                // only from a capture job's agent: `not_a_capture`.)
                let resp = app.clone().oneshot(call(Some(&admin))).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let code = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                assert!(
                    status != StatusCode::UNAUTHORIZED && code != "forbidden",
                    "{method} {path}: admin refused with {status} {code}"
                );
            }
        }
        // Every route of every module is in the document (the table is
        // the only way to mount one).
        assert!(pairs >= 75, "only {pairs} route/method pairs documented");
        assert!(guarded >= 45, "only {guarded} guarded pairs");
    }
}
