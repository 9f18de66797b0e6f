//! The `appliance` binary: sets up tracing and hands each subcommand to the
//! library. Invoked as `init` (or as PID 1) it runs [`appliance::init`].

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter};

/// Bootable, self-replicating provisioning appliance.
#[derive(Debug, Parser)]
#[command(version, about, term_width = 80)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// `--url`, `--token`, `--json`: global, before or after the subcommand.
    #[command(flatten)]
    conn: appliance::cli::Conn,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API server.
    Serve {
        /// Address to listen on; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        /// Also serve the API over HTTPS here, with a certificate from the
        /// site CA in <data>/state/tls (created at first start; the image
        /// uses 0.0.0.0:8443). Port 0 picks a free port (printed on stdout).
        #[arg(long)]
        listen_tls: Option<SocketAddr>,
        /// A DNS name or address the HTTPS certificate must also cover
        /// (repeatable; localhost, the host name and local addresses are
        /// always in it).
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// Data directory (the mounted data partition)
        /// [default: config file's `data`, else /data].
        #[arg(long, env = "APPLIANCE_DATA")]
        data: Option<PathBuf>,
        /// File with degraded reasons from init, one per line.
        #[arg(long)]
        degraded_file: Option<PathBuf>,
        /// Forward power requests to PID 1 even when not started by our init.
        #[arg(long)]
        allow_power: bool,
        /// Require a token for inventory reads too.
        #[arg(long)]
        private_reads: bool,
        /// URL this node is reachable at, reported to its parent
        /// (default: the listen address unless it is a wildcard).
        #[arg(long)]
        advertise_url: Option<String>,
        /// Seconds between check-ins with the parent (state/parent.json).
        #[arg(long, default_value_t = 60)]
        checkin_interval: u64,
        /// Seconds between syncs with the parent; 0: only on demand.
        #[arg(long, default_value_t = 300)]
        sync_interval: u64,
    },
    /// Run as PID 1 on the appliance image (refuses to run otherwise).
    Init,
    /// Report this machine's hardware to a server and wait for work
    /// (what PXE-booted targets run).
    Agent {
        /// The server's base URL, e.g. http://10.77.0.1
        #[arg(long)]
        server: String,
        /// Booted to install this appliance onto the local disk: accept
        /// install work from the server.
        #[arg(long)]
        install: bool,
        /// Management interfaces (comma-separated): never given a
        /// provisioning network by an install.
        #[arg(long, value_delimiter = ',')]
        mgmt: Vec<String>,
    },
    /// Run one OS install work item (the JSON an agent gets as
    /// `os-install` work) on this machine: what a PXE-booted agent does,
    /// for installing from a running system or a rescue shell.
    #[command(hide = true)]
    OsInstall {
        /// The work, as JSON.
        #[arg(long)]
        work: std::path::PathBuf,
        /// The MAC the installed system configures DHCP on.
        #[arg(long)]
        mac: String,
        /// `uefi` or `bios`.
        #[arg(long, default_value = "uefi")]
        firmware: String,
    },
    /// Rebuild this appliance's image from the bundle on its data
    /// partition, offline, and check it is bit-identical to the booted one.
    Rebuild {
        /// Data directory (the mounted data partition)
        /// [default: config file's `data`, else /data].
        #[arg(long, env = "APPLIANCE_DATA")]
        data: Option<PathBuf>,
        /// Output directory (replaced once the rebuild is complete).
        #[arg(long)]
        out: PathBuf,
    },
    #[command(flatten)]
    Ops(Box<appliance::cli::Ops>),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (appliance.1, appliance-system.1, appliance-system-list.1, …) into DIR.
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// A handle that swaps the log filter at run time.
type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Sets up tracing on stderr with `RUST_LOG` (default `info`).
/// ANSI colours only on a terminal, never on the serial console of init.
fn init_tracing(ansi: bool) -> FilterHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
        .init();
    handle
}

fn is_init_invocation() -> bool {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "init" || std::process::id() == 1
}

fn run_init(handle: &FilterHandle) -> Result<()> {
    let set_log = |directives: &str| -> Result<()> {
        let filter = EnvFilter::try_new(directives)
            .with_context(|| format!("parsing log filter {directives:?}"))?;
        handle.reload(filter).context("reloading the log filter")
    };
    match appliance::init::run(&set_log)? {}
}

fn main() -> std::process::ExitCode {
    let json = std::env::args().skip(1).any(|a| a == "--json");
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if json {
                eprintln!("{}", appliance::cli::error_json(&e));
            } else {
                eprintln!("Error: {e:?}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let as_init = is_init_invocation() || std::env::args().nth(1).as_deref() == Some("init");
    let handle = init_tracing(!as_init && std::io::stderr().is_terminal());
    if is_init_invocation() {
        return run_init(&handle);
    }
    let cli = Cli::parse();
    let json = cli.conn.json;
    match cli.command {
        Command::Serve {
            listen,
            listen_tls,
            tls_names,
            data,
            degraded_file,
            allow_power,
            private_reads,
            advertise_url,
            checkin_interval,
            sync_interval,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            rt.block_on(appliance::serve::run(appliance::serve::ServeOptions {
                degraded_file,
                allow_power,
                private_reads,
                advertise_url,
                checkin_interval: std::time::Duration::from_secs(checkin_interval.max(1)),
                sync_interval: (sync_interval > 0)
                    .then(|| std::time::Duration::from_secs(sync_interval)),
                listen_tls,
                tls_names,
                ..appliance::serve::ServeOptions::new(listen, appliance::cli::defaults::data(data)?)
            }))
        }
        Command::Init => run_init(&handle),
        Command::Agent {
            server,
            install,
            mgmt,
        } => {
            let release =
                appliance::serve::file_digest(std::path::Path::new("/etc/appliance/release")).ok();
            appliance::agent::run(&server, release, install, &mgmt)
        }
        Command::OsInstall {
            work,
            mac,
            firmware,
        } => {
            let w: appliance::osinstall::OsInstallWork = serde_json::from_slice(
                &std::fs::read(&work).with_context(|| format!("reading {}", work.display()))?,
            )
            .with_context(|| format!("{}: not OS install work", work.display()))?;
            let report = appliance::osinstall::target::run(&w, &mac, &firmware)?;
            println!("{report}");
            Ok(())
        }
        Command::Rebuild { data, out } => {
            appliance::rebuild::run_cli(&appliance::cli::defaults::data(data)?, &out, json)
        }
        Command::Ops(op) => appliance::cli::run(*op, cli.conn),
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            let n = std::fs::read_dir(&dir)?.count();
            eprintln!("{n} man pages in {}", dir.display());
            Ok(())
        }
        Command::Completions { shell } => {
            // Generated into a buffer, then written once: a reader that
            // went away (`| head`) is the end of the job, not a panic
            // (clap_complete panics on a failed write, and resetting
            // SIGPIPE would take `unsafe`, which only blkdev.rs may use).
            use clap::CommandFactory;
            use std::io::Write;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "appliance", &mut buf);
            let mut out = std::io::stdout().lock();
            match out.write_all(&buf).and_then(|()| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("writing the completions"),
            }
        }
    }
}
