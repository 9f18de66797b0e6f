//! The operator CLI: Cobbler's nouns and verbs against a server's API
//! (`appliance system add NAME --profile P --mac M`, `… list --json`,
//! `appliance report --blended system NAME`, `appliance status`,
//! `appliance power on|off|cycle|status NAME`), plus the
//! node-local `appliance token` and `appliance import`.
//!
//! `--url`, `--token` and `--json` are global flags of the top-level
//! parser (accepted before or after the subcommand); where their values
//! come from when not given (environment, `~/.config/appliance/config.toml`,
//! built-in defaults) is decided in [`defaults`] alone. Every command takes
//! `--json` and then prints the API's JSON (and errors as `{code,message}`
//! JSON on stderr, see [`error_json`]).

pub mod client;
pub mod defaults;
pub mod flash;

mod clone;
mod network;
mod power;
mod replica;
mod repo;
mod sync;
mod upload;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::inventory::model::Kind;
use client::Client;

/// How to reach the server: the global flags of the top-level parser.
#[derive(Debug, Clone, Default, Args)]
pub struct Conn {
    /// Server base URL [default: config file's `url`, else http://127.0.0.1:80].
    #[arg(long, global = true, env = "APPLIANCE_URL")]
    pub url: Option<String>,
    /// API bearer token, needed for changes [default: config file's `token`].
    #[arg(long, global = true, env = "APPLIANCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text (errors too, on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// PEM file of the site CA to trust for an https URL (fetch it from
    /// /api/v1/tls/ca.pem and compare its fingerprint with the one the
    /// server printed) [default: config file's `ca`].
    #[arg(long, global = true, env = "APPLIANCE_CA")]
    pub ca: Option<PathBuf>,
    /// Send the token over plain http to a non-loopback address anyway
    /// (anyone on that network can read it).
    #[arg(long, global = true)]
    pub insecure_http: bool,
    /// The certificates of `ca`, read by [`Conn::resolve`].
    #[arg(skip)]
    pub roots: Option<client::Roots>,
}

impl Conn {
    fn client(&self) -> Client {
        Client::new(
            self.url.as_deref().unwrap_or(defaults::DEFAULT_URL),
            self.token.clone(),
        )
        .trust(self.roots.clone())
        .allow_plain_token(self.insecure_http)
    }

    /// Fills in what flags and environment left open from the config file
    /// and the built-in defaults, and reads the CA file.
    pub fn resolve(mut self) -> Result<Conn> {
        self.url = Some(defaults::url(self.url.as_deref())?);
        self.token = defaults::token(self.token.as_deref())?;
        self.ca = defaults::ca(self.ca.take())?;
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            self.roots = Some(
                client::roots_from_pem(&pem)
                    .with_context(|| format!("reading the CA file {}", ca.display()))?,
            );
        }
        Ok(self)
    }
}

/// An error as the JSON `{code, message}` printed under `--json`: the
/// API's own code when the server refused, else `error`.
pub fn error_json(e: &anyhow::Error) -> Value {
    match e.downcast_ref::<client::ApiFailure>() {
        Some(f) => json!({"code": f.code, "message": f.message, "status": f.status}),
        None => json!({"code": "error", "message": format!("{e:#}")}),
    }
}

/// The operator commands `main.rs` flattens into its own.
#[derive(Debug, Subcommand)]
pub enum Ops {
    /// Distros: a kernel and initrd to boot an installer.
    Distro(DistroCmd),
    /// Profiles: a distro or parent profile plus template and options.
    Profile(ProfileCmd),
    /// Systems: machines by MAC, with profile or image and netboot flag.
    System(SystemCmd),
    /// Change every system a filter selects, in one commit.
    BulkEdit(BulkEdit),
    /// Repos: package mirrors targets install from; `repo sync NAME`.
    Repo(repo::RepoCmd),
    /// Images: disk captures or OCI images to deploy.
    Image(ImageCmd),
    /// Templates: autoinstall files (minijinja).
    Template(TextCmd),
    /// Snippets: pieces templates include.
    Snippet(TextCmd),
    /// Show objects in detail, or blended variables with their sources.
    Report(Report),
    /// Install status of every system; flags installs that went quiet.
    Status(StatusCmd),
    /// Global settings: variables, kernel options, default boot action.
    Settings(SettingsCmd),
    /// Import an installer tree as a distro and a default profile.
    Import(Import),
    /// Manage API tokens (on the server's data directory).
    Token(TokenCmd),
    /// Provisioning networks: serve PXE on an interface, list, stop.
    Network(network::NetworkCmd),
    /// Machines that PXE-booted into agent mode and reported their hardware.
    Agents(network::AgentsCmd),
    /// Children of this node: register, list, remove; join a parent.
    Replica(replica::ReplicaCmd),
    /// Write the appliance image onto a disk (USB stick) or file, verified.
    Flash(flash::FlashCmd),
    /// Print an image's block map (bmaptool's XML format, sha256 per range).
    Bmap(flash::BmapCmd),
    /// Sync the shared state with the parent; status; conflicts.
    Sync(sync::SyncCmd),
    /// Offline sync: export or import one bundle file.
    Bundle(sync::BundleCmd),
    /// Power systems on, off or cycle through their BMC; read their state.
    Power(power::PowerCmd),
    /// Capture a machine's disk, deploy an image to many, restore one.
    Clone(clone::CloneCmd),
    /// The audit log: every write this node took, and those its children
    /// forwarded with their syncs.
    Audit(AuditCmd),
}

/// `appliance audit`.
#[derive(Debug, Args)]
pub struct AuditCmd {
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// A noun's command, with its verbs (filled in by [`run`]).
#[derive(Debug)]
pub struct Noun {
    pub verb: Verb,
    pub conn: Conn,
}

/// Verbs every noun has, with the noun's field flags made into [`Fields`].
#[derive(Debug)]
pub enum Verb {
    List,
    Show {
        name: String,
    },
    Add {
        name: String,
        fields: Fields,
    },
    Edit {
        name: String,
        fields: Fields,
    },
    Remove {
        name: String,
        recursive: bool,
        yes: bool,
    },
    Copy {
        name: String,
        new_name: String,
    },
    Rename {
        name: String,
        new_name: String,
    },
}

/// Declares a noun's command (`$cmd`, holding `$verb`) whose `add` and
/// `edit` take only that noun's field flags (`$fields`): a flag that does
/// not apply is refused by clap, never silently dropped.
macro_rules! noun_cmd {
    ($cmd:ident, $verb:ident, $fields:ty) => {
        /// A noun's verbs.
        #[derive(Debug, Args)]
        pub struct $cmd {
            #[command(subcommand)]
            pub verb: $verb,
        }

        /// The verbs of one noun.
        #[derive(Debug, Subcommand)]
        pub enum $verb {
            /// List objects.
            List,
            /// Show one object.
            Show { name: String },
            /// Add an object.
            Add {
                name: String,
                #[command(flatten)]
                fields: $fields,
            },
            /// Change fields of an object (refused if it changed meanwhile).
            Edit {
                name: String,
                #[command(flatten)]
                fields: $fields,
            },
            /// Remove an object.
            Remove {
                name: String,
                /// Also remove objects that use it (profiles, systems).
                #[arg(long)]
                recursive: bool,
                /// Do not ask (required when stdin is not a terminal).
                #[arg(long)]
                yes: bool,
            },
            /// Copy an object under a new name.
            Copy { name: String, new_name: String },
            /// Rename an object and every reference to it.
            Rename { name: String, new_name: String },
        }

        impl From<$verb> for Verb {
            fn from(v: $verb) -> Verb {
                match v {
                    $verb::List => Verb::List,
                    $verb::Show { name } => Verb::Show { name },
                    $verb::Add { name, fields } => Verb::Add {
                        name,
                        fields: fields.into(),
                    },
                    $verb::Edit { name, fields } => Verb::Edit {
                        name,
                        fields: fields.into(),
                    },
                    $verb::Remove {
                        name,
                        recursive,
                        yes,
                    } => Verb::Remove {
                        name,
                        recursive,
                        yes,
                    },
                    $verb::Copy { name, new_name } => Verb::Copy { name, new_name },
                    $verb::Rename { name, new_name } => Verb::Rename { name, new_name },
                }
            }
        }
    };
}

noun_cmd!(DistroCmd, DistroVerb, DistroFields);
noun_cmd!(ProfileCmd, ProfileVerb, ProfileFields);
noun_cmd!(SystemCmd, SystemVerb, SystemFields);
noun_cmd!(RepoNounCmd, RepoNounVerb, RepoFields);
noun_cmd!(ImageCmd, ImageVerb, ImageFields);
noun_cmd!(TextCmd, TextVerb, TextFields);

/// What add and edit change, whichever noun's flags it came from.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub distro: Option<String>,
    pub parent: Option<String>,
    pub profile: Option<String>,
    pub image: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub arch: Option<String>,
    pub breed: Option<String>,
    pub os_version: Option<String>,
    pub installer_by: Option<String>,
    pub kernel_options: Option<String>,
    pub autoinstall: Option<String>,
    pub repos: Vec<String>,
    pub mac: Option<String>,
    pub ip: Option<String>,
    pub netmask: Option<String>,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
    pub hostname: Option<String>,
    pub netboot: Option<bool>,
    pub mirror: Option<String>,
    pub suites: Vec<String>,
    pub packages: Vec<String>,
    pub installer: Option<bool>,
    pub image_type: Option<String>,
    pub reference: Option<String>,
    pub file: Option<PathBuf>,
    pub comment: Option<String>,
    pub vars: Vec<String>,
    pub set: Vec<String>,
}

/// `--comment`, `--var` and `--set`, for the nouns with variables.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonFlags {
    /// Free text kept with the object.
    #[arg(long)]
    pub comment: Option<String>,
    /// Variable KEY=VALUE (VALUE as JSON if it parses); repeat.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Any field: FIELD=JSON (e.g. power='{"type":"ipmi"}'); repeat.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

/// `distro add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct DistroFields {
    /// Kernel (sha256:<hex> of a stored blob, or a URL).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd (sha256:<hex> of a stored blob, or a URL).
    #[arg(long)]
    pub initrd: Option<String>,
    /// CPU architecture (e.g. x86_64, amd64).
    #[arg(long)]
    pub arch: Option<String>,
    /// OS family: debian, ubuntu, redhat, …
    #[arg(long)]
    pub breed: Option<String>,
    /// OS release (e.g. bookworm, 12).
    #[arg(long)]
    pub os_version: Option<String>,
    /// Who installs it: `appliance` (the agent installs from the profile's
    /// apt mirror; no kernel/initrd needed) or `` (its own installer).
    #[arg(long = "installer-by")]
    pub installer_by: Option<String>,
    /// Kernel options (`key=value ...`, `!key` drops an inherited one).
    #[arg(long, allow_hyphen_values = true)]
    pub kernel_options: Option<String>,
    #[command(flatten)]
    pub common: CommonFlags,
}

/// `profile add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ProfileFields {
    /// Distro it installs (clears --parent).
    #[arg(long)]
    pub distro: Option<String>,
    /// Parent profile it inherits from (clears --distro).
    #[arg(long)]
    pub parent: Option<String>,
    /// Autoinstall template.
    #[arg(long)]
    pub autoinstall: Option<String>,
    /// Kernel options (`key=value ...`, `!key` drops an inherited one).
    #[arg(long, allow_hyphen_values = true)]
    pub kernel_options: Option<String>,
    /// Repos targets install from (repeat).
    #[arg(long = "repo")]
    pub repos: Vec<String>,
    #[command(flatten)]
    pub common: CommonFlags,
}

/// `system add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct SystemFields {
    /// Profile it installs (clears --image).
    #[arg(long)]
    pub profile: Option<String>,
    /// Image it deploys (clears --profile).
    #[arg(long)]
    pub image: Option<String>,
    /// MAC of the first interface.
    #[arg(long)]
    pub mac: Option<String>,
    /// IP address of the first interface.
    #[arg(long)]
    pub ip: Option<String>,
    /// Netmask of the first interface.
    #[arg(long)]
    pub netmask: Option<String>,
    /// Gateway of the first interface.
    #[arg(long)]
    pub gateway: Option<String>,
    /// DNS servers of the first interface (repeat).
    #[arg(long)]
    pub dns: Vec<String>,
    /// Host name the installed system gets.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Boot the installer on the next network boot.
    #[arg(long)]
    pub netboot: Option<bool>,
    /// Kernel options (`key=value ...`, `!key` drops an inherited one).
    #[arg(long, allow_hyphen_values = true)]
    pub kernel_options: Option<String>,
    #[command(flatten)]
    pub common: CommonFlags,
}

/// `repo add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RepoFields {
    /// Upstream mirror URL.
    #[arg(long)]
    pub mirror: Option<String>,
    /// Kind of repo: `apt` mirrors it here; others are only pointed at.
    #[arg(long)]
    pub breed: Option<String>,
    /// Architecture to mirror (e.g. amd64).
    #[arg(long)]
    pub arch: Option<String>,
    /// Apt repo: a suite to mirror (repeat).
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Apt repo: packages to mirror with their closure (space-separated;
    /// repeat).
    #[arg(long = "packages")]
    pub packages: Vec<String>,
    /// Apt repo: also mirror the Debian installer (udebs, netboot).
    #[arg(long, require_equals = true, num_args = 0..=1, default_missing_value = "true")]
    pub installer: Option<bool>,
    /// Free text kept with the repo.
    #[arg(long)]
    pub comment: Option<String>,
    /// Any field: FIELD=JSON (e.g. components='["main"]'); repeat.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

/// `image add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ImageFields {
    /// What it is: `capture`, `oci`, `iso`, …
    #[arg(long = "type")]
    pub image_type: Option<String>,
    /// Digest or reference of the content.
    #[arg(long)]
    pub reference: Option<String>,
    /// CPU architecture.
    #[arg(long)]
    pub arch: Option<String>,
    #[command(flatten)]
    pub common: CommonFlags,
}

/// `template|snippet add|edit` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct TextFields {
    /// The text, from a file.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

impl From<DistroFields> for Fields {
    fn from(f: DistroFields) -> Fields {
        Fields {
            kernel: f.kernel,
            initrd: f.initrd,
            arch: f.arch,
            breed: f.breed,
            os_version: f.os_version,
            installer_by: f.installer_by,
            kernel_options: f.kernel_options,
            ..f.common.into()
        }
    }
}

impl From<ProfileFields> for Fields {
    fn from(f: ProfileFields) -> Fields {
        Fields {
            distro: f.distro,
            parent: f.parent,
            autoinstall: f.autoinstall,
            kernel_options: f.kernel_options,
            repos: f.repos,
            ..f.common.into()
        }
    }
}

impl From<SystemFields> for Fields {
    fn from(f: SystemFields) -> Fields {
        Fields {
            profile: f.profile,
            image: f.image,
            mac: f.mac,
            ip: f.ip,
            netmask: f.netmask,
            gateway: f.gateway,
            dns: f.dns,
            hostname: f.hostname,
            netboot: f.netboot,
            kernel_options: f.kernel_options,
            ..f.common.into()
        }
    }
}

impl From<RepoFields> for Fields {
    fn from(f: RepoFields) -> Fields {
        Fields {
            mirror: f.mirror,
            breed: f.breed,
            arch: f.arch,
            suites: f.suites,
            packages: f.packages,
            installer: f.installer,
            comment: f.comment,
            set: f.set,
            ..Default::default()
        }
    }
}

impl From<ImageFields> for Fields {
    fn from(f: ImageFields) -> Fields {
        Fields {
            image_type: f.image_type,
            reference: f.reference,
            arch: f.arch,
            ..f.common.into()
        }
    }
}

impl From<TextFields> for Fields {
    fn from(f: TextFields) -> Fields {
        Fields {
            file: f.file,
            ..Default::default()
        }
    }
}

impl From<CommonFlags> for Fields {
    fn from(f: CommonFlags) -> Fields {
        Fields {
            comment: f.comment,
            vars: f.vars,
            set: f.set,
            ..Default::default()
        }
    }
}

/// `appliance report`.
#[derive(Debug, Args)]
pub struct Report {
    /// Kind (distro, profile, system, …); all kinds when absent.
    pub kind: Option<String>,
    /// Object name; every object of the kind when absent.
    pub name: Option<String>,
    /// Show blended variables and where each came from.
    #[arg(long)]
    pub blended: bool,
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// `appliance bulk-edit`: one JSON merge patch onto every system the
/// filter selects (`PATCH /api/v1/systems?...`), one commit.
#[derive(Debug, Args)]
pub struct BulkEdit {
    /// Systems of this profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// Systems of this image.
    #[arg(long)]
    pub image: Option<String>,
    /// Systems whose name starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Systems whose netboot flag is this (true or false).
    #[arg(long)]
    pub netboot: Option<bool>,
    /// Every system (instead of a filter).
    #[arg(long)]
    pub all: bool,
    /// The change, a JSON merge patch: '{"kernel_options":"quiet"}'.
    pub patch: String,
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// `appliance status`.
#[derive(Debug, Args)]
pub struct StatusCmd {
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// `appliance settings`.
#[derive(Debug, Args)]
pub struct SettingsCmd {
    /// Boot action for unknown MACs: local, menu, agent, install or
    /// replicate (install this appliance onto the machine: a child).
    #[arg(long)]
    pub default_boot: Option<String>,
    /// Profile for `install` (and the menu's default).
    #[arg(long)]
    pub default_profile: Option<String>,
    /// Global kernel options.
    #[arg(long, allow_hyphen_values = true)]
    pub kernel_options: Option<String>,
    /// Global variable KEY=VALUE; repeat.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Let anyone pull from the OCI registry without a token (only when
    /// no image holds a secret).
    #[arg(long, value_name = "BOOL")]
    pub registry_anonymous_pulls: Option<bool>,
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// `appliance import`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["path", "repo"])))]
pub struct Import {
    /// Installer tree: a directory or an ISO image.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// An apt mirror synced with --installer: the Debian installer's
    /// netboot kernel and initrd from it (on the server).
    #[arg(long, conflicts_with = "offline")]
    pub repo: Option<String>,
    /// Name of the new distro and profile [default with --repo: the
    /// repo's name].
    #[arg(long)]
    pub name: Option<String>,
    /// With --offline: the data directory whose `blobs/` and `inventory/`
    /// are written [default: config file's `data`, else /data]. Without
    /// it the boot files are uploaded to the server and nothing is
    /// written here.
    #[arg(long, env = "APPLIANCE_DATA")]
    pub data: Option<PathBuf>,
    /// Write the inventory directly instead of through a server's API.
    #[arg(long)]
    pub offline: bool,
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

/// `appliance token`.
#[derive(Debug, Args)]
pub struct TokenCmd {
    #[command(subcommand)]
    pub verb: TokenVerb,
    /// Data directory of the server (tokens are in state/tokens.json)
    /// [default: config file's `data`, else /data].
    #[arg(long, global = true, env = "APPLIANCE_DATA")]
    pub data: Option<PathBuf>,
    /// The top-level connection flags (filled in by [`run`]).
    #[arg(skip)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum TokenVerb {
    /// Create a token; it is printed once.
    Create {
        name: String,
        /// What it may do: `read` (every read), `operator` (every write but
        /// the admin routes), `admin` (everything: the appliance's own
        /// power, settings, flashing).
        #[arg(long, default_value = "operator", value_parser = ["read", "operator", "admin"])]
        scope: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke tokens by id or name.
    Revoke { id_or_name: String },
}

/// Runs one operator command with the top-level connection flags.
pub fn run(mut op: Ops, conn: Conn) -> Result<()> {
    let conn = conn.resolve()?;
    let noun_of = |verb: Verb, conn: &Conn| Noun {
        verb,
        conn: conn.clone(),
    };
    match &mut op {
        Ops::Distro(_)
        | Ops::Profile(_)
        | Ops::System(_)
        | Ops::Image(_)
        | Ops::Template(_)
        | Ops::Snippet(_) => {}
        Ops::Repo(r) => r.conn = conn.clone(),
        Ops::Report(r) => r.conn = conn.clone(),
        Ops::Status(s) => s.conn = conn.clone(),
        Ops::BulkEdit(b) => b.conn = conn.clone(),
        Ops::Settings(s) => s.conn = conn.clone(),
        Ops::Import(i) => i.conn = conn.clone(),
        Ops::Token(t) => t.conn = conn.clone(),
        Ops::Network(n) => n.conn = conn.clone(),
        Ops::Agents(a) => a.conn = conn.clone(),
        Ops::Replica(r) => r.conn = conn.clone(),
        Ops::Flash(f) => f.json = conn.json,
        Ops::Bmap(_) => {}
        Ops::Sync(s) => s.conn = conn.clone(),
        Ops::Bundle(b) => b.conn = conn.clone(),
        Ops::Power(p) => p.conn = conn.clone(),
        Ops::Clone(c) => c.conn = conn.clone(),
        Ops::Audit(a) => a.conn = conn.clone(),
    }
    match op {
        Ops::Distro(n) => noun(Kind::Distro, noun_of(n.verb.into(), &conn)),
        Ops::Profile(n) => noun(Kind::Profile, noun_of(n.verb.into(), &conn)),
        Ops::System(n) => noun(Kind::System, noun_of(n.verb.into(), &conn)),
        Ops::Repo(r) => repo::repo(r),
        Ops::Image(n) => noun(Kind::Image, noun_of(n.verb.into(), &conn)),
        Ops::Template(n) => noun(Kind::Template, noun_of(n.verb.into(), &conn)),
        Ops::Snippet(n) => noun(Kind::Snippet, noun_of(n.verb.into(), &conn)),
        Ops::Report(r) => report(r),
        Ops::Status(s) => status(s),
        Ops::BulkEdit(b) => bulk_edit(b),
        Ops::Settings(s) => settings(s),
        Ops::Import(i) => import(i),
        Ops::Token(t) => token(t),
        Ops::Network(n) => network::network(n),
        Ops::Agents(a) => network::agents(a),
        Ops::Replica(r) => replica::replica(r),
        Ops::Flash(f) => flash::run(f),
        Ops::Bmap(b) => flash::bmap(b),
        Ops::Sync(s) => sync::sync(s),
        Ops::Bundle(b) => sync::bundle(b),
        Ops::Power(p) => power::power(p),
        Ops::Clone(c) => clone::clone(c),
        Ops::Audit(a) => audit(a),
    }
}

fn audit(a: AuditCmd) -> Result<()> {
    let v = Value::Array(a.conn.client().list("/api/v1/audit?limit=5000")?);
    if a.conn.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<10} {:<16} {:<10} {:<8} {:<6} {:<40} {:<6} FROM",
        "TIME", "WHO", "ROLE", "NODE", "METHOD", "PATH", "STATUS"
    );
    for l in v.as_array().into_iter().flatten() {
        let node = l["node"]
            .as_str()
            .map(|n| &n[..n.len().min(8)])
            .unwrap_or("-");
        println!(
            "{:<10} {:<16} {:<10} {:<8} {:<6} {:<40} {:<6} {}",
            fmt_time(&l["time"]),
            l["who"].as_str().unwrap_or("-"),
            l["role"].as_str().unwrap_or("-"),
            node,
            l["method"].as_str().unwrap_or("-"),
            l["path"].as_str().unwrap_or("-"),
            l["status"],
            l["from"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

fn bulk_edit(b: BulkEdit) -> Result<()> {
    let patch: Value = serde_json::from_str(&b.patch)
        .with_context(|| format!("the patch is not JSON: {}", b.patch))?;
    let filter = crate::inventory::SystemFilter {
        profile: b.profile,
        image: b.image,
        prefix: b.prefix,
        netboot: b.netboot,
        all: b.all,
    };
    filter.check().map_err(anyhow::Error::msg)?;
    // Query values percent-encoded (all but RFC 3986 unreserved bytes).
    let enc = |v: &str| -> String {
        v.bytes()
            .map(|c| match c {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (c as char).to_string()
                }
                _ => format!("%{c:02X}"),
            })
            .collect()
    };
    let mut query = Vec::new();
    for (k, v) in [
        ("profile", filter.profile.clone()),
        ("image", filter.image.clone()),
        ("prefix", filter.prefix.clone()),
        ("netboot", filter.netboot.map(|n| n.to_string())),
        ("all", filter.all.then(|| "true".to_owned())),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={}", enc(&v)));
        }
    }
    let v = b.conn.client().json(
        "PATCH",
        &format!("/api/v1/systems?{}", query.join("&")),
        Some(&patch),
    )?;
    if b.conn.json {
        print_json(&v);
    } else {
        println!(
            "{} systems matched, {} changed ({})",
            v["matched"],
            v["changed"],
            filter.describe()
        );
    }
    Ok(())
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Applies field flags to an object's JSON.
pub fn apply_fields(kind: Kind, v: &mut Value, f: &Fields) -> Result<()> {
    let m = v.as_object_mut().context("objects are JSON objects")?;
    let mut set = |k: &str, x: &Option<String>| {
        if let Some(x) = x {
            m.insert(k.into(), x.clone().into());
        }
    };
    set("distro", &f.distro);
    set("parent", &f.parent);
    set("profile", &f.profile);
    set("image", &f.image);
    set("kernel", &f.kernel);
    set("initrd", &f.initrd);
    set("arch", &f.arch);
    set("breed", &f.breed);
    set("os_version", &f.os_version);
    set("installer", &f.installer_by);
    set("kernel_options", &f.kernel_options);
    set("autoinstall", &f.autoinstall);
    set("mirror", &f.mirror);
    set("type", &f.image_type);
    set("reference", &f.reference);
    set("comment", &f.comment);
    if kind == Kind::System {
        set("hostname", &f.hostname);
    }
    if !f.repos.is_empty() {
        m.insert("repos".into(), json!(f.repos));
    }
    if let Some(nb) = f.netboot {
        m.insert("netboot".into(), nb.into());
    }
    if kind == Kind::Repo {
        if !f.suites.is_empty() {
            m.insert("suites".into(), json!(f.suites));
        }
        if !f.packages.is_empty() {
            let p: Vec<&str> = f
                .packages
                .iter()
                .flat_map(|p| p.split_whitespace())
                .collect();
            m.insert("packages".into(), json!(p));
        }
        if let Some(i) = f.installer {
            m.insert("installer".into(), i.into());
        }
    }
    if let Some(file) = &f.file {
        let body =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        m.insert("body".into(), body.into());
    }
    // Setting a profile clears an image and the other way round.
    if f.profile.is_some() {
        m.remove("image");
    }
    if f.image.is_some() {
        m.remove("profile");
    }
    if f.distro.is_some() {
        m.remove("parent");
    }
    if f.parent.is_some() {
        m.remove("distro");
    }
    if kind == Kind::System
        && (f.mac.is_some()
            || f.ip.is_some()
            || f.netmask.is_some()
            || f.gateway.is_some()
            || !f.dns.is_empty())
    {
        let ifaces = m.entry("interfaces").or_insert_with(|| json!([]));
        let arr = ifaces.as_array_mut().context("interfaces is a list")?;
        if arr.is_empty() {
            arr.push(json!({"name": "eth0"}));
        }
        let first = arr[0]
            .as_object_mut()
            .context("an interface is an object")?;
        for (k, x) in [
            ("mac", &f.mac),
            ("ip", &f.ip),
            ("netmask", &f.netmask),
            ("gateway", &f.gateway),
        ] {
            if let Some(x) = x {
                first.insert(k.into(), x.clone().into());
            }
        }
        if !f.dns.is_empty() {
            first.insert("dns".into(), json!(f.dns));
        }
    }
    if !f.vars.is_empty() {
        let vars = m.entry("variables").or_insert_with(|| json!({}));
        for kv in &f.vars {
            let (k, val) = kv
                .split_once('=')
                .with_context(|| format!("--var {kv:?}: use KEY=VALUE"))?;
            let val = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.to_owned()));
            vars.as_object_mut()
                .context("variables is an object")?
                .insert(k.to_owned(), val);
        }
    }
    for kv in &f.set {
        let (k, val) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: use FIELD=VALUE"))?;
        let val = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.to_owned()));
        m.insert(k.to_owned(), val);
    }
    Ok(())
}

/// One line per object for `list`.
fn summary(kind: Kind, o: &Value) -> String {
    let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let name = s("name");
    match kind {
        Kind::Distro => format!(
            "{name:<24} {} {} {}",
            s("breed"),
            s("os_version"),
            s("arch")
        ),
        Kind::Profile => {
            let base = o
                .get("distro")
                .or(o.get("parent"))
                .and_then(Value::as_str)
                .unwrap_or("");
            format!("{name:<24} {base}")
        }
        Kind::System => {
            let target = o
                .get("profile")
                .or(o.get("image"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let mac = o
                .pointer("/interfaces/0/mac")
                .and_then(Value::as_str)
                .unwrap_or("");
            let nb = if o.get("netboot").and_then(Value::as_bool).unwrap_or(false) {
                "netboot"
            } else {
                ""
            };
            format!("{name:<24} {target:<16} {mac:<17} {nb}")
        }
        Kind::Repo => format!("{name:<24} {}", s("mirror")),
        Kind::Image => format!("{name:<24} {} {}", s("type"), s("reference")),
        Kind::Template | Kind::Snippet => format!("{name:<24} {}", s("origin")),
    }
}

pub(crate) fn print_object(kind: Kind, o: &Value) {
    if kind.is_text() {
        print!("{}", o.get("body").and_then(Value::as_str).unwrap_or(""));
        return;
    }
    if let Some(m) = o.as_object() {
        for (k, v) in m {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<16}: {text}");
        }
    }
}

pub(crate) fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to {what} without --yes (stdin is not a terminal)");
    }
    eprint!("{what}? [y/N] ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the answer")?;
    if !matches!(line.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed");
    }
    Ok(())
}

fn noun(kind: Kind, n: Noun) -> Result<()> {
    let c = n.conn.client();
    let base = format!("/api/v1/{}", kind.plural());
    let out = |v: &Value| {
        if n.conn.json {
            print_json(v)
        } else {
            print_object(kind, v)
        }
    };
    match n.verb {
        Verb::List => {
            let v = Value::Array(c.list(&base)?);
            if n.conn.json {
                print_json(&v);
            } else {
                for o in v.as_array().into_iter().flatten() {
                    println!("{}", summary(kind, o).trim_end());
                }
            }
        }
        Verb::Show { name } => out(&c.json("GET", &format!("{base}/{name}"), None)?),
        Verb::Add { name, fields } => {
            let mut v = json!({ "name": name });
            apply_fields(kind, &mut v, &fields)?;
            out(&c.json("POST", &base, Some(&v))?);
        }
        Verb::Edit { name, fields } => {
            // The PUT carries the GET's ETag: an edit made in between is
            // refused (412), never overwritten.
            let (mut v, tag) = c.get_tagged(&format!("{base}/{name}"))?;
            apply_fields(kind, &mut v, &fields)?;
            out(&c.json_if_match("PUT", &format!("{base}/{name}"), Some(&v), tag.as_deref())?);
        }
        Verb::Remove {
            name,
            recursive,
            yes,
        } => {
            let what = if recursive {
                format!("remove {kind} {name} and everything using it")
            } else {
                format!("remove {kind} {name}")
            };
            confirm(&what, yes)?;
            let v = c.json(
                "DELETE",
                &format!("{base}/{name}?recursive={recursive}"),
                None,
            )?;
            if n.conn.json {
                print_json(&v);
            } else {
                for r in v["removed"].as_array().into_iter().flatten() {
                    println!("removed {}", r.as_str().unwrap_or(""));
                }
            }
        }
        Verb::Copy { name, new_name } => out(&c.json(
            "POST",
            &format!("{base}/{name}/copy"),
            Some(&json!({"new_name": new_name})),
        )?),
        Verb::Rename { name, new_name } => out(&c.json(
            "POST",
            &format!("{base}/{name}/rename"),
            Some(&json!({"new_name": new_name})),
        )?),
    }
    Ok(())
}

fn parse_kind(s: &str) -> Result<Kind> {
    Kind::from_name(s)
        .or_else(|| Kind::from_plural(s))
        .with_context(|| {
            format!(
                "unknown kind {s:?}: use distro, profile, system, repo, image, template or snippet"
            )
        })
}

fn report(r: Report) -> Result<()> {
    let c = r.conn.client();
    let kinds: Vec<Kind> = match &r.kind {
        Some(k) => vec![parse_kind(k)?],
        None => Kind::ALL.to_vec(),
    };
    let mut all = Vec::new();
    for kind in kinds {
        let names: Vec<String> = match &r.name {
            Some(n) => vec![n.clone()],
            None => c
                .list(&format!("/api/v1/{}", kind.plural()))?
                .iter()
                .filter_map(|o| o["name"].as_str().map(str::to_owned))
                .collect(),
        };
        for name in names {
            let path = format!(
                "/api/v1/{}/{name}{}",
                kind.plural(),
                if r.blended { "/blended" } else { "" }
            );
            let v = c.json("GET", &path, None)?;
            if r.conn.json {
                all.push(v);
                continue;
            }
            println!("{kind} {name}");
            if r.blended {
                println!(
                    "  layers: {}",
                    v["layers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" -> ")
                );
                for (k, sv) in v["variables"].as_object().into_iter().flatten() {
                    let val = match &sv["value"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    println!(
                        "  {k:<16} = {val:<30} ({})",
                        sv["from"].as_str().unwrap_or("")
                    );
                }
            } else {
                print_object(kind, &v);
            }
            println!();
        }
    }
    if r.conn.json {
        print_json(&Value::Array(all));
    }
    Ok(())
}

pub(crate) fn fmt_time(t: &Value) -> String {
    match t.as_i64() {
        Some(s) => {
            let ago = crate::inventory::status::now() - s;
            if ago < 120 {
                format!("{ago}s ago")
            } else if ago < 7200 {
                format!("{}m ago", ago / 60)
            } else {
                format!("{}h ago", ago / 3600)
            }
        }
        None => "-".into(),
    }
}

fn status(s: StatusCmd) -> Result<()> {
    let v = Value::Array(s.conn.client().list("/api/v1/status")?);
    if s.conn.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<8} {:<10} {:<10} {:<10} NETBOOT",
        "SYSTEM", "STATE", "EVENT", "AT", "STARTED", "FINISHED"
    );
    for row in v.as_array().into_iter().flatten() {
        let quiet = if row["quiet"].as_bool().unwrap_or(false) {
            "  QUIET: no report for over an hour"
        } else {
            ""
        };
        println!(
            "{:<24} {:<10} {:<8} {:<10} {:<10} {:<10} {}{quiet}",
            row["system"].as_str().unwrap_or(""),
            row["state"].as_str().unwrap_or(""),
            row["last_event"].as_str().unwrap_or("-"),
            fmt_time(&row["last_event_at"]),
            fmt_time(&row["started_at"]),
            fmt_time(&row["finished_at"]),
            if row["netboot"].as_bool().unwrap_or(false) {
                "on"
            } else {
                "off"
            },
        );
    }
    Ok(())
}

fn settings(s: SettingsCmd) -> Result<()> {
    let c = s.conn.client();
    let mut v = c.json("GET", "/api/v1/settings", None)?;
    let changing = s.default_boot.is_some()
        || s.default_profile.is_some()
        || s.kernel_options.is_some()
        || !s.vars.is_empty()
        || s.registry_anonymous_pulls.is_some();
    if changing {
        let f = Fields {
            kernel_options: s.kernel_options.clone(),
            vars: s.vars.clone(),
            ..Default::default()
        };
        apply_fields(Kind::Distro, &mut v, &f)?;
        if let Some(b) = s.default_boot {
            v["default_boot"] = b.into();
        }
        if let Some(p) = s.default_profile {
            v["default_profile"] = p.into();
        }
        if let Some(open) = s.registry_anonymous_pulls {
            v["registry_anonymous_pulls"] = open.into();
        }
        v = c.json("PUT", "/api/v1/settings", Some(&v))?;
    }
    if s.conn.json {
        print_json(&v);
    } else {
        print_object(Kind::Distro, &v);
    }
    Ok(())
}

fn import(i: Import) -> Result<()> {
    if let Some(repo) = &i.repo {
        return import_repo(&i, repo);
    }
    let (Some(path), Some(name)) = (&i.path, &i.name) else {
        anyhow::bail!("import --path needs --name");
    };
    if !i.offline {
        // Through the API from any machine: the boot files are uploaded
        // (resumable, verified by the server), never written here.
        let c = i.conn.client();
        let (distro, profile) =
            crate::inventory::import::import_with(path, name, &mut |r, what| {
                upload::upload_blob(&c, r, what)
            })?;
        let d = serde_json::to_value(&distro)?;
        let p = serde_json::to_value(&profile)?;
        c.json("POST", "/api/v1/distros", Some(&d))?;
        c.json("POST", "/api/v1/profiles", Some(&p))?;
        return print_imported(&i, &distro, &profile, d, p);
    }
    let data = defaults::data(i.data.clone())?;
    let blobs = data.join("blobs/sha256");
    let (distro, profile) = crate::inventory::import::import(path, name, &blobs)?;
    let d = serde_json::to_value(&distro)?;
    let p = serde_json::to_value(&profile)?;
    {
        let root = data.join("inventory");
        let mut inv = crate::inventory::Inventory::open(&root)
            .with_context(|| format!("opening {}", root.display()))?;
        let who = crate::inventory::Author::new("import");
        inv.create(
            crate::inventory::model::Object::Distro(distro.clone()),
            &who,
        )?;
        inv.create(
            crate::inventory::model::Object::Profile(profile.clone()),
            &who,
        )?;
    }
    print_imported(&i, &distro, &profile, d, p)
}

fn print_imported(
    i: &Import,
    distro: &crate::inventory::model::Distro,
    profile: &crate::inventory::model::Profile,
    d: serde_json::Value,
    p: serde_json::Value,
) -> Result<()> {
    if i.conn.json {
        print_json(&json!({"distro": d, "profile": p}));
    } else {
        println!(
            "imported distro {} ({} {} {}) and profile {}\n  kernel {}\n  initrd {}",
            distro.name,
            distro.breed,
            distro.os_version,
            distro.arch,
            profile.name,
            distro.kernel,
            distro.initrd
        );
    }
    Ok(())
}

/// `appliance import --repo NAME`: the server extracts and checks the
/// installer (`POST /api/v1/repos/{name}/import`).
fn import_repo(i: &Import, repo: &str) -> Result<()> {
    let c = i.conn.client();
    let body = match &i.name {
        Some(n) => json!({ "name": n }),
        None => json!({}),
    };
    let v = c.json("POST", &format!("/api/v1/repos/{repo}/import"), Some(&body))?;
    if i.conn.json {
        print_json(&v);
    } else {
        let r = &v["report"];
        println!(
            "imported distro {} and profile {} from repo {repo}\n  netboot {} (kernel {}, matches the mirrored udebs)\n  kernel {}\n  initrd {}",
            v["distro"]["name"].as_str().unwrap_or(""),
            v["profile"]["name"].as_str().unwrap_or(""),
            r["netboot"].as_str().unwrap_or(""),
            r["kernel_release"].as_str().unwrap_or(""),
            v["distro"]["kernel"].as_str().unwrap_or(""),
            v["distro"]["initrd"].as_str().unwrap_or(""),
        );
        if let Some(n) = r["missing_udebs"].as_u64().filter(|n| *n > 0) {
            println!(
                "  warning: upstream did not serve {n} installer udebs; the installer will stop at \"Loading additional components\" (appliance repo show {repo})"
            );
        }
    }
    Ok(())
}

fn token(t: TokenCmd) -> Result<()> {
    let data = defaults::data(t.data.clone())?;
    let store = crate::auth::TokenStore::open(&data.join("state/tokens.json"));
    match t.verb {
        TokenVerb::Create { name, scope } => {
            let scope: crate::auth::Scope = scope.parse().map_err(anyhow::Error::msg)?;
            // An operator at the console may wait; the server never does.
            if !crate::entropy::is_ready() {
                eprintln!("waiting for the kernel's random pool to be initialized…");
                crate::entropy::wait_ready();
            }
            let (rec, secret) = store.create_scoped(&name, scope)?;
            if t.conn.json {
                print_json(&json!({"id": rec.id, "name": rec.name, "token": secret}));
            } else {
                println!("{secret}");
                eprintln!(
                    "token {} ({}) created; it is shown only now",
                    rec.id, rec.name
                );
            }
        }
        TokenVerb::List => {
            let list = store.list()?;
            if t.conn.json {
                print_json(&serde_json::to_value(&list)?);
            } else {
                for r in list {
                    println!(
                        "{} {:<24} {:<10} created {}",
                        r.id,
                        r.name,
                        r.scope,
                        fmt_time(&json!(r.created))
                    );
                }
            }
        }
        TokenVerb::Revoke { id_or_name } => {
            let n = store.revoke(&id_or_name)?;
            if t.conn.json {
                print_json(&json!({"revoked": n}));
            } else {
                println!("revoked {n} token(s)");
            }
        }
    }
    Ok(())
}
