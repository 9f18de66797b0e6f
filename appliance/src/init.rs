//! `appliance init`: PID 1 on the booted image.
//!
//! Boot sequence: mount the pseudo filesystems and attach the console, read
//! the kernel command line, load the modules `modules.plan` selects for the
//! devices present (every module in `modules.list` when there is no plan;
//! a background thread keeps loading for devices that appear late), read the
//! first-boot config (fw_cfg, then the ESP), wait up to 10 s for the
//! `appliance-data` partition and mount it at `/data` (a tmpfs when it is
//! missing or unmountable, so the server still runs, with a degraded reason
//! saying state is not persistent), feed the saved random seed to the kernel
//! and replace it (`crate::entropy`; nothing on the way to the network and
//! the API waits for the kernel's random pool), start `serve` as a
//! supervised child, and
//! bring up the network beside it (the server binds `0.0.0.0` and does not
//! need to wait for an address).
//!
//! Then it reaps zombies, restarts the server with backoff when it dies, and
//! waits for SIGUSR1 (power off), SIGUSR2 or SIGTERM (reboot), or SIGINT
//! (ctrl-alt-del, reboot). Shutdown stops the server (SIGTERM, 5 s, then
//! SIGKILL), refreshes the random seed, syncs, unmounts `/data` (read-only
//! remount if busy) and calls
//! `reboot(2)`.
//!
//! PID 1 never exits: failures are logged, printed as console markers and
//! recorded in [`crate::contract::DEGRADED_FILE`]; a panic drops init into a
//! last-resort loop that keeps reaping zombies.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, waitpid, Pid, Signal, WaitOptions};
use rustix::system::{reboot, RebootCommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, BootConfig, Mode, Problem, Setting, Source};
use crate::console::marker;
use crate::contract::{
    BOOT_STATE, DATA_DIR, DATA_PARTNAME, DEGRADED_FILE, ENV_UNDER_INIT, ESP_CONFIG, ESP_MOUNT,
    ESP_PARTNAMES, FW_CFG_CONFIG, LIVE_MOUNT, MEDIUM_FILE, MODULES_LIST, MODULES_PLAN, RUN_DIR,
    SYS_BUS,
};

/// Test hook: when set, init keeps the stdio it was started with instead of
/// attaching `/dev/console` (for namespace-based tests on a host).
pub const ENV_KEEP_STDIO: &str = "APPLIANCE_INIT_KEEP_STDIO";

/// How long to wait for the data partition to appear.
const DATA_WAIT: Duration = Duration::from_secs(10);
/// How often and how long to look for devices that appear after boot-time
/// module loading (USB enumeration, SCSI scans, usb-storage's settle delay).
const LATE_EVERY: Duration = Duration::from_millis(250);
const LATE_FOR: Duration = Duration::from_secs(15);
/// How long DHCP keeps trying before the network is declared degraded.
const DHCP_TOTAL: Duration = Duration::from_secs(60);
/// The open-files limit init sets for itself and the server.
const NOFILE: u64 = 65_536;
/// How long the server gets to stop at shutdown.
const SERVER_STOP: Duration = Duration::from_secs(5);

/// Changes the log filter at run time (`appliance.log=`).
pub type SetLogFilter<'a> = &'a dyn Fn(&str) -> Result<()>;

/// Records a degraded reason: logged, and appended to the degraded file.
fn degrade(reason: &str) {
    tracing::error!("degraded: {reason}");
    if let Err(e) = crate::degraded::append(Path::new(DEGRADED_FILE), reason) {
        tracing::error!(error = %e, "recording degraded reason failed");
    }
}

/// Runs init. Never returns; refuses to start unless this process is PID 1.
pub fn run(set_log: SetLogFilter<'_>) -> Result<std::convert::Infallible> {
    if rustix::process::getpid() != Pid::INIT {
        bail!("init must run as PID 1 (it mounts filesystems and reboots the machine)");
    }
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot_and_supervise(set_log)));
    match outcome {
        Ok(Err(e)) => {
            marker("init failed");
            tracing::error!("init failed: {e:#}");
        }
        Ok(Ok(never)) => match never {},
        Err(_) => {
            marker("init panicked");
            tracing::error!("init panicked");
        }
    }
    last_resort()
}

/// Keeps PID 1 alive and reaping after an unrecoverable init error.
fn last_resort() -> ! {
    degrade("init failed; supervision and clean shutdown are unavailable");
    loop {
        match waitpid(None, WaitOptions::empty()) {
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn boot_and_supervise(set_log: SetLogFilter<'_>) -> Result<std::convert::Infallible> {
    let early = crate::mount::mount_early();
    if std::env::var_os(ENV_KEEP_STDIO).is_none() {
        if let Err(e) = crate::mount::attach_console() {
            tracing::error!("{e:#}");
        }
    }
    marker("init started");
    let _ = std::fs::create_dir_all(RUN_DIR);
    for reason in early {
        degrade(&reason);
    }
    if let Err(e) = reboot(RebootCommand::CadOff) {
        tracing::warn!(error = %e, "disabling ctrl-alt-del failed");
    }
    // The kernel's default of 1024 open files would let ~1,000 idle clients
    // stop the API and HTTP boot; the server inherits this.
    let files = rustix::process::Rlimit {
        current: Some(NOFILE),
        maximum: Some(NOFILE),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, files) {
        tracing::warn!(error = %e, "raising the open-files limit failed");
    }

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        degrade(&format!("reading /proc/cmdline: {e}"));
        String::new()
    });
    // Apply appliance.log as early as possible, before module loading.
    let cmdline_settings = config::settings_from_cmdline(&cmdline);
    let (early_cfg, _) = config::resolve(&cmdline_settings);
    apply_log_filter(set_log, early_cfg.log.as_deref());

    load_modules();

    // A PXE-booted agent runs from its initramfs alone: no data partition
    // to wait for (its disks are what it works on).
    let data_dev = if matches!(early_cfg.mode, Mode::Agent | Mode::Install) {
        None
    } else {
        crate::partition::wait_for_partname(
            Path::new("/sys/class/block"),
            &[DATA_PARTNAME],
            DATA_WAIT,
        )
    };
    let data_is_partition = mount_data(data_dev.as_deref());
    let medium = crate::medium::describe(
        Path::new("/sys/class/block"),
        data_dev.as_deref(),
        data_is_partition,
    );
    marker(&format!("medium {} {}", medium.kind, medium.state));
    if let Err(e) = crate::medium::write(Path::new(MEDIUM_FILE), &medium) {
        tracing::warn!("recording the boot medium: {e:#}");
    }
    // Before the network and the server: a saved seed makes the kernel's
    // random pool ready at once (crate::entropy).
    random_seed(data_is_partition);
    let cfg = read_config(&cmdline_settings);
    apply_log_filter(set_log, cfg.log.as_deref());
    tracing::info!(?cfg, "boot configuration");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the init runtime")?;
    let action = rt.block_on(supervise(&cfg))?;
    drop(rt);
    shutdown(action, data_is_partition)
}

/// Loads the modules the present devices need and starts the thread that
/// loads more for devices appearing later (USB, SCSI disks).
fn load_modules() {
    let state = crate::modules::load_for_devices(
        Path::new(MODULES_PLAN),
        Path::new(MODULES_LIST),
        Path::new(SYS_BUS),
    );
    let names = state.loaded_names();
    marker(&format!(
        "modules loaded {}/{}",
        state.loaded.len(),
        state.planned
    ));
    tracing::info!(modules = %names.join(" "), "modules loaded");
    for reason in &state.failures {
        degrade(reason);
    }
    if let Some(late) = crate::modules::LateDevices::new(state) {
        let spawned = std::thread::Builder::new()
            .name("late-modules".into())
            .spawn(|| late.watch(Path::new(SYS_BUS), LATE_EVERY, LATE_FOR, &degrade));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting the late module loader failed");
        }
    }
}

fn apply_log_filter(set_log: SetLogFilter<'_>, filter: Option<&str>) {
    if let Some(f) = filter {
        if let Err(e) = set_log(f) {
            degrade(&format!("bad appliance.log filter {f:?}: {e:#}"));
        }
    }
}

/// Reads fw_cfg and ESP config and resolves them with the command line.
fn read_config(cmdline: &[Setting]) -> BootConfig {
    let mut settings = Vec::new();
    if let Some(bytes) = read_esp_config() {
        match config::settings_from_json(&bytes, Source::Esp) {
            Ok(s) => settings.extend(s),
            Err(e) => degrade(&e),
        }
    }
    let state = Path::new(DATA_DIR).join(BOOT_STATE);
    match std::fs::read(&state) {
        Ok(bytes) => match config::settings_from_json(&bytes, Source::DataState) {
            Ok(s) => settings.extend(s),
            Err(e) => degrade(&e),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => degrade(&format!("reading {}: {e}", state.display())),
    }
    match std::fs::read(FW_CFG_CONFIG) {
        Ok(bytes) => match config::settings_from_json(&bytes, Source::FwCfg) {
            Ok(s) => settings.extend(s),
            Err(e) => degrade(&e),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => degrade(&format!("reading {FW_CFG_CONFIG}: {e}")),
    }
    settings.extend_from_slice(cmdline);
    let (cfg, problems) = config::resolve(&settings);
    for p in problems {
        match p {
            Problem::Warning(w) => tracing::warn!("{w}"),
            Problem::Error(e) => degrade(&e),
        }
    }
    cfg
}

/// Mounts the ESP read-only for a moment and reads `appliance/config.json`.
fn read_esp_config() -> Option<Vec<u8>> {
    let dev = crate::partition::find_by_partname(Path::new("/sys/class/block"), ESP_PARTNAMES)?;
    let mnt = Path::new(ESP_MOUNT);
    if let Err(e) = crate::mount::mount_vfat_ro(&dev, mnt) {
        tracing::warn!("{e:#}");
        return None;
    }
    let path = mnt.join(ESP_CONFIG);
    let bytes = match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            degrade(&format!("reading {}: {e}", path.display()));
            None
        }
    };
    if let Err(e) = crate::mount::unmount_lazy(mnt) {
        tracing::warn!("{e:#}");
    }
    bytes
}

/// Mounts the data partition, or a tmpfs in its place. Returns whether the
/// real partition is mounted.
fn mount_data(dev: Option<&Path>) -> bool {
    let target = Path::new(DATA_DIR);
    let sys_block = Path::new("/sys/class/block");
    if let Some(dev) = dev.filter(|d| crate::medium::read_only(sys_block, d)) {
        live(dev, target);
        return false;
    }
    let reason = match dev {
        Some(dev) => match crate::mount::mount_ext4(dev, target) {
            Ok(()) => {
                marker(&format!("data mounted {}", dev.display()));
                grow_data(dev, target);
                return true;
            }
            Err(e) => format!("{e:#}"),
        },
        None => format!(
            "data partition {DATA_PARTNAME:?} not found after {}s",
            DATA_WAIT.as_secs()
        ),
    };
    degrade(&format!(
        "{reason}; /data is a tmpfs and state is not persistent"
    ));
    match crate::mount::mount_tmpfs(target) {
        Ok(()) => marker("data on tmpfs"),
        Err(e) => degrade(&format!("{e:#}")),
    }
    false
}

/// A live boot from a read-only medium: state in a tmpfs at `/data`, the
/// medium's data partition mounted read-only beside it, its release and
/// bundle linked in so the server reports and serves the release.
fn live(dev: &Path, target: &Path) {
    degrade(&format!(
        "booted live from a read-only medium ({}): /data is a tmpfs and state is in RAM only",
        dev.display()
    ));
    if let Err(e) = crate::mount::mount_tmpfs(target) {
        degrade(&format!("{e:#}"));
        return;
    }
    marker("data on tmpfs (live)");
    let live = Path::new(LIVE_MOUNT);
    if let Err(e) = crate::mount::mount_ext4_ro(dev, live) {
        degrade(&format!("{e:#}; the release and bundle are not available"));
        return;
    }
    for name in ["release", "bundle"] {
        if let Err(e) = std::os::unix::fs::symlink(live.join(name), target.join(name)) {
            degrade(&format!(
                "linking /data/{name} to the read-only medium: {e}"
            ));
        }
    }
}

/// Feeds the saved random seed to the kernel and replaces it; when the
/// pool is not ready (first boot), a thread saves a seed once it is. On a
/// tmpfs `/data` nothing is kept. Never blocks.
fn random_seed(data_is_partition: bool) {
    use crate::entropy::{self, SeedUse};
    if !data_is_partition {
        return;
    }
    let data = Path::new(DATA_DIR);
    match entropy::use_seed(data, &mut entropy::Kernel) {
        Ok(r) => {
            match &r.used {
                SeedUse::Credited { bytes } => {
                    marker(&format!("random seed credited ({bytes} bytes)"));
                }
                SeedUse::Mixed { bytes, reason } => {
                    tracing::warn!(bytes, %reason, "random seed mixed in, not credited");
                    marker(&format!("random seed not credited: {reason}"));
                }
                SeedUse::Missing => tracing::info!("no saved random seed"),
            }
            if r.saved {
                tracing::info!("random seed refreshed");
                return;
            }
        }
        Err(e) => tracing::error!("random seed: {e:#}"),
    }
    if entropy::is_ready() {
        // The pool was ready without the seed (a hardware RNG).
        save_seed_now();
        return;
    }
    marker("waiting for the kernel's random pool (no hardware RNG, no saved seed); network and API do not wait");
    let spawned = std::thread::Builder::new()
        .name("random-seed".into())
        .spawn(|| {
            let t = Instant::now();
            entropy::wait_ready();
            marker(&format!(
                "random pool ready after {}s",
                t.elapsed().as_secs()
            ));
            save_seed_now();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "starting the random seed thread failed");
    }
}

/// Writes a fresh seed for the next boot when the pool is ready.
fn save_seed_now() {
    match crate::entropy::save_seed(Path::new(DATA_DIR), &mut crate::entropy::Kernel) {
        Ok(true) => tracing::info!("random seed saved"),
        Ok(false) => tracing::info!("random pool not ready; no seed saved"),
        Err(e) => tracing::error!("saving the random seed: {e:#}"),
    }
}

/// Grows the data filesystem to its partition (after a flash onto a
/// larger disk); a failure is a degraded reason, never fatal.
fn grow_data(dev: &Path, target: &Path) {
    match crate::growfs::grow_mounted(dev, target, Path::new("/sys/class/block")) {
        Ok(crate::growfs::Grown::Fits { blocks }) => {
            tracing::info!(blocks, "data filesystem fills its partition");
        }
        Ok(crate::growfs::Grown::Grown {
            from,
            to,
            block_size,
        }) => marker(&format!(
            "data grown {} MiB -> {} MiB",
            (from * block_size) >> 20,
            (to * block_size) >> 20
        )),
        Err(e) => degrade(&format!("{e:#}; the data filesystem keeps its size")),
    }
}

/// What ended supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    PowerOff,
    Reboot,
}

/// The supervised `serve` child.
struct Server {
    args: Vec<String>,
    log: Option<String>,
    pid: Option<Pid>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<tokio::time::Instant>,
}

impl Server {
    fn spawn(&mut self) {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(&self.args)
            .env(ENV_UNDER_INIT, "1")
            .stdin(Stdio::null());
        if let Some(filter) = &self.log {
            cmd.env("RUST_LOG", filter);
        }
        self.started = Instant::now();
        match cmd.spawn() {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                tracing::info!(pid = child.id(), "server started");
                self.pid = pid;
                self.restart_at = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "starting the server failed");
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        // A server that ran a while gets a fresh backoff.
        if self.started.elapsed() > Duration::from_secs(60) {
            self.backoff = Duration::from_secs(1);
        }
        tracing::warn!(in_s = self.backoff.as_secs(), "restarting the server");
        self.restart_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    /// Called for every reaped child.
    fn reaped(&mut self, pid: Pid, status: &str) {
        if self.pid == Some(pid) {
            self.pid = None;
            marker(&format!("server exited {status}"));
            self.schedule_restart();
        }
    }
}

/// Reaps every finished child; tells the server about its own.
fn reap(server: &mut Server) {
    loop {
        match waitpid(None, WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let text = if let Some(code) = status.exit_status() {
                    format!("status {code}")
                } else if let Some(sig) = status.terminating_signal() {
                    format!("signal {sig}")
                } else {
                    "unknown".to_owned()
                };
                tracing::debug!(pid = pid.as_raw_nonzero().get(), %text, "reaped");
                server.reaped(pid, &text);
            }
            Ok(None) | Err(_) => return,
        }
    }
}

async fn supervise(cfg: &BootConfig) -> Result<Action> {
    // Handlers first, so no signal is lost while booting.
    let mut chld = signal(SignalKind::child()).context("installing SIGCHLD handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let listen = format!("0.0.0.0:{}", cfg.http_port);
    // HTTPS (the operator and appliance-to-appliance API) beside HTTP.
    let listen_tls = format!("0.0.0.0:{}", crate::tls::DEFAULT_TLS_PORT);
    // The supervised child: the server, or in agent/install mode the agent.
    let args: Vec<String> = if cfg.mode == Mode::Serve {
        [
            "serve",
            "--listen",
            &listen,
            "--listen-tls",
            &listen_tls,
            "--data",
            DATA_DIR,
            "--degraded-file",
            DEGRADED_FILE,
        ]
        .map(str::to_owned)
        .to_vec()
    } else {
        let mut a = vec![
            "agent".into(),
            "--server".into(),
            cfg.server.clone().unwrap_or_default(),
        ];
        if cfg.mode == Mode::Install {
            a.push("--install".into());
        }
        if !cfg.mgmt.is_empty() {
            a.push("--mgmt".into());
            a.push(cfg.mgmt.join(","));
        }
        a
    };
    let mut server = Server {
        args,
        log: cfg.log.clone(),
        pid: None,
        started: Instant::now(),
        backoff: Duration::from_secs(1),
        restart_at: None,
    };
    server.spawn();

    let uplink = cfg.uplink.clone();
    let ip = cfg.ip.clone();
    let mgmt = cfg.mgmt.clone();
    // A PXE-booted agent or installer is useless without its uplink (its
    // server may be busy, e.g. rebuilding its image): it keeps asking.
    let keep_trying = matches!(cfg.mode, Mode::Agent | Mode::Install);
    tokio::spawn(async move {
        let mut mgmt = mgmt;
        loop {
            // An agent or installer configures its management interfaces
            // only once its uplink has a lease: while the uplink has no
            // address, the kernel sends its DHCP requests with the
            // management address as source, and the parent's reverse-path
            // filter drops them (a missed first offer then meant asking in
            // vain forever).
            let now: &[String] = if keep_trying { &[] } else { &mgmt };
            let (up, problems) =
                crate::net::bring_up(uplink.as_deref(), &ip, now, DHCP_TOTAL).await;
            if !keep_trying {
                // Management interfaces are configured on the first round only.
                mgmt.clear();
            }
            for p in &problems {
                degrade(p);
            }
            match up {
                Some(u) => {
                    marker(&format!("network up {} {}/{}", u.iface, u.addr, u.prefix));
                    if !mgmt.is_empty() {
                        for p in crate::net::bring_up_mgmt(&mgmt, &u.iface, DHCP_TOTAL).await {
                            degrade(&p);
                        }
                    }
                    break;
                }
                None if keep_trying => {
                    marker("network degraded; trying again");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                None => {
                    marker("network degraded");
                    break;
                }
            }
        }
    });

    loop {
        let restart = server.restart_at;
        tokio::select! {
            _ = chld.recv() => reap(&mut server),
            _ = async { tokio::time::sleep_until(restart.unwrap()).await }, if restart.is_some() => {
                server.spawn();
            }
            _ = usr1.recv() => return Ok(stop(&mut server, Action::PowerOff)),
            _ = usr2.recv() => return Ok(stop(&mut server, Action::Reboot)),
            _ = term.recv() => return Ok(stop(&mut server, Action::Reboot)),
            _ = int.recv() => return Ok(stop(&mut server, Action::Reboot)),
        }
    }
}

/// Stops the server: SIGTERM, wait, SIGKILL.
fn stop(server: &mut Server, action: Action) -> Action {
    marker(match action {
        Action::PowerOff => "powering off",
        Action::Reboot => "rebooting",
    });
    server.restart_at = None;
    let Some(pid) = server.pid else {
        return action;
    };
    let _ = kill_process(pid, Signal::TERM);
    let deadline = Instant::now() + SERVER_STOP;
    while server.pid.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        reap_for_shutdown(server);
    }
    if server.pid.is_some() {
        tracing::warn!("server did not stop; killing it");
        let _ = kill_process(pid, Signal::KILL);
        std::thread::sleep(Duration::from_millis(100));
        reap_for_shutdown(server);
    }
    action
}

fn reap_for_shutdown(server: &mut Server) {
    while let Ok(Some((pid, _))) = waitpid(None, WaitOptions::NOHANG) {
        if server.pid == Some(pid) {
            server.pid = None;
        }
    }
}

/// Syncs, releases /data and powers off or reboots. Never returns.
fn shutdown(action: Action, data_is_partition: bool) -> Result<std::convert::Infallible> {
    if data_is_partition {
        save_seed_now();
    }
    rustix::fs::sync();
    if data_is_partition {
        match crate::mount::unmount_or_readonly(&PathBuf::from(DATA_DIR)) {
            Ok(()) => tracing::info!("data unmounted"),
            Err(e) => tracing::error!("{e:#}"),
        }
    }
    rustix::fs::sync();
    let cmd = match action {
        Action::PowerOff => RebootCommand::PowerOff,
        Action::Reboot => RebootCommand::Restart,
    };
    match reboot(cmd) {
        Ok(()) => bail!("reboot({action:?}) returned"),
        Err(e) => bail!("calling reboot({action:?}): {e}"),
    }
}
