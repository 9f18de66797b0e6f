//! Boot decisions: what a network-booting machine gets, per MAC, straight
//! from the in-memory inventory (no `sync` step: an edit is live at once).
//!
//! [`decide`] is a pure function of the inventory, the MAC and the server
//! URL; [`ipxe_script`] turns a decision into iPXE script text. The PXE
//! services ask through [`BootPolicy`], which the inventory implements.
//!
//! - a known system with netboot on and a profile → its installer: the
//!   distro's kernel and initrd with the blended kernel options plus the
//!   breed's autoinstall argument (`inst.ks=`, `url=`, `ds=nocloud-net`,
//!   `ignition.config.url=`);
//! - a known system with netboot on and a profile whose distro's
//!   `installer` is `appliance` → the appliance agent, whose work is the
//!   OS install ([`crate::osinstall`]);
//! - a known system with netboot on and an image → the appliance agent in
//!   deploy mode for that image;
//! - a known system with netboot off → local boot;
//! - an unknown MAC → `settings.default_boot`: local, menu, agent, install, replicate.
//!
//! The appliance's own kernel and initrd (agent mode) are expected at
//! `<server>/boot/vmlinuz` and `<server>/boot/initrd.img`;
//! blobs at `<server>/blobs/sha256/<hex>`.

use std::sync::{Arc, RwLock};

use super::model::{Kind, Object};
use super::{DefaultBoot, Inventory};

/// One bootable entry: kernel, initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub label: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

/// What a machine gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootDecision {
    /// Boot this entry now (install, or agent).
    Boot { why: String, entry: BootEntry },
    /// Exit iPXE; the firmware boots the next device (the local disk).
    Local { why: String },
    /// A menu; local boot is always the first item.
    Menu {
        why: String,
        entries: Vec<BootEntry>,
        default: Option<usize>,
    },
}

/// Normalises `server` (`host:port` or a URL) to `http://host:port`.
pub fn server_url(server: &str) -> String {
    let s = server.trim_end_matches('/');
    if s.starts_with("http://") || s.starts_with("https://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    }
}

/// The URL a kernel or initrd location is served at.
pub fn blob_url(location: &str, server_url: &str) -> String {
    match location.strip_prefix("sha256:") {
        Some(hex) => format!("{server_url}/blobs/sha256/{hex}"),
        None => location.to_owned(),
    }
}

/// The breed's kernel argument that points the installer at its answers.
pub fn autoinstall_args(breed: &str, template: &str, system_url: &str) -> String {
    let ai = format!("{system_url}/autoinstall");
    match breed {
        "redhat" | "fedora" | "centos" | "rhel" | "rocky" | "alma" | "almalinux" => {
            format!("inst.ks={ai}")
        }
        "debian" => format!("auto=true priority=critical url={ai}"),
        "ubuntu" => format!("autoinstall ds=nocloud-net;s={system_url}/nocloud/"),
        "coreos" | "fcos" | "flatcar" => {
            format!("ignition.config.url={ai} ignition.platform.id=metal")
        }
        _ if template.starts_with("ignition") => format!("ignition.config.url={ai}"),
        _ => format!("ds=nocloud-net;s={system_url}/nocloud/"),
    }
}

fn profile_entry(
    inv: &Inventory,
    kind: Kind,
    name: &str,
    profile: &str,
    server_url: &str,
) -> Option<BootEntry> {
    let distro = inv.profile_distro(profile)?;
    if distro.installer == super::model::INSTALLER_APPLIANCE {
        // The appliance's agent installs it: boot the agent, whose work
        // ([`crate::osinstall`]) names what to install.
        let mut e = agent_entry(inv, server_url, "");
        e.label = format!(
            "{} {name}: install {} (appliance installer)",
            kind.name(),
            distro.name
        );
        return Some(e);
    }
    let blended = super::blend::blend(inv, kind, name).ok()?;
    let kopts = blended
        .variables
        .get("kernel_options")
        .and_then(|v| v.value.as_str())
        .unwrap_or("")
        .to_owned();
    let template = super::templates::template_name(inv, profile);
    let url = format!("{server_url}/api/v1/{}/{name}", kind.plural());
    let auto = autoinstall_args(&distro.breed, &template, &url);
    let cmdline = [kopts.as_str(), auto.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    Some(BootEntry {
        label: format!("{} {name}", kind.name()),
        kernel: blob_url(&distro.kernel, server_url),
        initrd: blob_url(&distro.initrd, server_url),
        cmdline,
    })
}

/// The appliance's own kernel and initramfs in install mode: the machine
/// installs this appliance onto its disk ([`crate::install`]).
pub fn replicate_entry(inv: &Inventory, server_url: &str) -> BootEntry {
    let mut e = agent_entry(inv, server_url, "");
    e.cmdline = e
        .cmdline
        .replace("appliance.mode=agent", "appliance.mode=install");
    e.label = "install this appliance (replicate)".into();
    e
}

fn agent_entry(inv: &Inventory, server_url: &str, extra: &str) -> BootEntry {
    let base = Some(inv.settings().agent_kernel_options.clone())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| crate::serve::AGENT_CMDLINE.to_string());
    let cmdline = [
        base.as_str(),
        &format!("appliance.mode=agent appliance.server={server_url}"),
        extra,
    ]
    .iter()
    .filter(|s| !s.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    BootEntry {
        label: "appliance agent".into(),
        kernel: format!("{server_url}/boot/vmlinuz"),
        initrd: format!("{server_url}/boot/initrd.img"),
        cmdline,
    }
}

/// Decides what `mac` boots. `server` is `host:port` or a base URL.
pub fn decide(inv: &Inventory, mac: &str, server: &str) -> BootDecision {
    let url = server_url(server);
    if let Some(sys) = inv.system_by_mac(mac) {
        if !sys.netboot {
            return BootDecision::Local {
                why: format!("system {}: netboot off", sys.name),
            };
        }
        if let Some(p) = &sys.profile {
            return match profile_entry(inv, Kind::System, &sys.name, p, &url) {
                Some(entry) => BootDecision::Boot {
                    why: format!("system {}: install profile {p}", sys.name),
                    entry,
                },
                None => BootDecision::Local {
                    why: format!("system {}: profile {p} has no distro", sys.name),
                },
            };
        }
        if let Some(i) = &sys.image {
            let mut entry = agent_entry(
                inv,
                &url,
                &format!("appliance.deploy={i} appliance.system={}", sys.name),
            );
            entry.label = format!("deploy image {i}");
            return BootDecision::Boot {
                why: format!("system {}: deploy image {i}", sys.name),
                entry,
            };
        }
    }
    let s = inv.settings();
    match s.default_boot {
        DefaultBoot::Local => BootDecision::Local {
            why: "unknown MAC: default local boot".into(),
        },
        DefaultBoot::Agent => BootDecision::Boot {
            why: "unknown MAC: default agent".into(),
            entry: agent_entry(inv, &url, ""),
        },
        DefaultBoot::Replicate => BootDecision::Boot {
            why: "unknown MAC: default replicate".into(),
            entry: replicate_entry(inv, &url),
        },
        DefaultBoot::Install => match profile_entry(
            inv,
            Kind::Profile,
            &s.default_profile,
            &s.default_profile,
            &url,
        ) {
            Some(entry) => BootDecision::Boot {
                why: format!(
                    "unknown MAC: default install of profile {}",
                    s.default_profile
                ),
                entry,
            },
            None => BootDecision::Local {
                why: format!(
                    "unknown MAC: default profile {:?} unusable",
                    s.default_profile
                ),
            },
        },
        DefaultBoot::Menu => {
            let mut entries = Vec::new();
            let mut default = None;
            for o in inv.list(Kind::Profile) {
                if let Object::Profile(p) = o {
                    if let Some(e) = profile_entry(inv, Kind::Profile, &p.name, &p.name, &url) {
                        if p.name == s.default_profile {
                            default = Some(entries.len());
                        }
                        entries.push(e);
                    }
                }
            }
            entries.push(agent_entry(inv, &url, ""));
            BootDecision::Menu {
                why: "unknown MAC: default menu".into(),
                entries,
                default,
            }
        }
    }
}

/// A value that may not go into an iPXE script, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {field} {value:?} cannot go into an iPXE script: {why}")]
pub struct UnsafeForIpxe {
    /// What the value is (a fixed phrase, never input).
    pub field: &'static str,
    pub value: String,
    pub why: String,
}

/// Why `v` may not be the arguments of one iPXE command line, if it may
/// not. iPXE has no quoting: a script line ends at a newline (CR is
/// dropped, a trailing backslash joins the next line), and within a line
/// the words `||`, `&&`, `;` and any word starting with `#` end the
/// command (iPXE's `command_terminator`). Settings expansion (`${net0/mac}`)
/// stays allowed: it fills in a value, it cannot add a command.
pub fn ipxe_arg_problem(v: &str) -> Option<String> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Some(format!(
            "it holds the control character {c:?} (a newline would start another command)"
        ));
    }
    if v.ends_with('\\') {
        return Some("a trailing backslash would join the next script line to it".into());
    }
    v.split(' ')
        .find(|w| matches!(*w, "||" | "&&" | ";") || w.starts_with('#'))
        .map(|w| format!("the word {w:?} would end the iPXE command and start another"))
}

/// Why `v` may not be a kernel or initrd URL in an iPXE script, if it may
/// not: a plain `http://` or `https://` URL of visible ASCII, no spaces,
/// no backslash (which iPXE reads as "continued on the next line" at the
/// end of one).
pub fn ipxe_url_problem(v: &str) -> Option<String> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"));
    match rest {
        None => Some("it is not an http:// or https:// URL".into()),
        Some(r) if r.is_empty() || r.starts_with('/') => Some("the URL has no host".into()),
        Some(_) => v
            .chars()
            .find(|&c| !c.is_ascii_graphic() || c == '\\')
            .map(|c| format!("the URL holds {c:?} (only visible ASCII, no spaces or backslashes)")),
    }
}

fn checked<'a>(
    field: &'static str,
    v: &'a str,
    problem: fn(&str) -> Option<String>,
) -> Result<&'a str, UnsafeForIpxe> {
    match problem(v) {
        None => Ok(v),
        Some(why) => Err(UnsafeForIpxe {
            field,
            value: v.to_owned(),
            why,
        }),
    }
}

/// Text of a `#` comment line: one line, no continuation.
fn comment_problem(v: &str) -> Option<String> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Some(format!("it holds the control character {c:?}"));
    }
    v.ends_with('\\')
        .then(|| "a trailing backslash would join the next script line to it".into())
}

/// The script served instead of one that would not be safe: it says so on
/// the console and boots the local disk. Names the field, never the value
/// (the server log has that).
pub fn refused_script(e: &UnsafeForIpxe) -> String {
    format!(
        "#!ipxe\n# refused: an unsafe {field} (see the server log)\n\
         echo This machine's boot script was refused: its {field} holds characters that would change the script.\n\
         echo See the server log. Booting from local disk.\n\
         exit\n",
        field = e.field
    )
}

/// iPXE script text for a decision. A value that could inject commands
/// (an inventory written before validation, a hostile `Host` header in
/// `server`) gives [`refused_script`] instead, and a warning in the log.
pub fn ipxe_script(d: &BootDecision) -> String {
    try_ipxe_script(d).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "refusing to serve an iPXE script");
        refused_script(&e)
    })
}

/// iPXE script text for a decision, or the value that may not go into it.
pub fn try_ipxe_script(d: &BootDecision) -> Result<String, UnsafeForIpxe> {
    let mut s = String::from("#!ipxe\n");
    match d {
        BootDecision::Local { why } => {
            let why = checked("boot reason", why, comment_problem)?;
            s.push_str(&format!("# {why}\necho Booting from local disk\nexit\n"));
        }
        BootDecision::Boot { why, entry } => {
            let why = checked("boot reason", why, comment_problem)?;
            s.push_str(&format!("# {why}\n"));
            push_entry(&mut s, entry)?;
        }
        BootDecision::Menu {
            why,
            entries,
            default,
        } => {
            let why = checked("boot reason", why, comment_problem)?;
            s.push_str(&format!(
                "# {why}\nmenu Appliance network boot\nitem local Boot from local disk\n"
            ));
            for (i, e) in entries.iter().enumerate() {
                let label = checked("menu label", &e.label, ipxe_arg_problem)?;
                s.push_str(&format!("item e{i} {label}\n"));
            }
            let def = default
                .map(|i| format!("e{i}"))
                .unwrap_or_else(|| "local".into());
            s.push_str(&format!(
                "choose --default {def} --timeout 20000 target && goto ${{target}} || goto local\n"
            ));
            s.push_str(":local\nexit\n");
            for (i, e) in entries.iter().enumerate() {
                s.push_str(&format!(":e{i}\n"));
                push_entry(&mut s, e)?;
            }
        }
    }
    Ok(s)
}

fn push_entry(s: &mut String, e: &BootEntry) -> Result<(), UnsafeForIpxe> {
    let kernel = checked("kernel URL", &e.kernel, ipxe_url_problem)?;
    let initrd = checked("initrd URL", &e.initrd, ipxe_url_problem)?;
    let cmdline = checked("kernel command line", &e.cmdline, ipxe_arg_problem)?;
    let args = if cmdline.is_empty() {
        String::new()
    } else {
        format!(" {cmdline}")
    };
    s.push_str(&format!("kernel {kernel} initrd=initrd.img{args}\n"));
    s.push_str(&format!("initrd --name initrd.img {initrd}\n"));
    s.push_str("boot\n");
    Ok(())
}

/// The backend the PXE services ask: MAC → iPXE script. `None` only for a
/// string that is not a MAC address.
pub trait BootPolicy: Send + Sync {
    fn ipxe_for_mac(&self, mac: &str, server: &str) -> Option<String>;
}

impl BootPolicy for RwLock<Inventory> {
    fn ipxe_for_mac(&self, mac: &str, server: &str) -> Option<String> {
        super::model::normalize_mac(mac).ok()?;
        let inv = super::fresh_read(self);
        Some(ipxe_script(&decide(&inv, mac, server)))
    }
}

impl<T: BootPolicy + ?Sized> BootPolicy for Arc<T> {
    fn ipxe_for_mac(&self, mac: &str, server: &str) -> Option<String> {
        (**self).ipxe_for_mac(mac, server)
    }
}
