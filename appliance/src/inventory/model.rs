//! The provisioning objects (Cobbler's nouns): distro, profile, system, repo,
//! image, template and snippet, their on-disk JSON form and the checks that
//! need only the object itself (names, MAC and IP formats).
//!
//! Checks that need the whole inventory (references, uniqueness, cycles)
//! live in [`super::Inventory`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Free-form template variables (Cobbler's `autoinstall_meta`).
pub type Vars = BTreeMap<String, serde_json::Value>;

/// The kinds of object, in dependency order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Distro,
    Profile,
    System,
    Repo,
    Image,
    Template,
    Snippet,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Distro,
        Kind::Profile,
        Kind::System,
        Kind::Repo,
        Kind::Image,
        Kind::Template,
        Kind::Snippet,
    ];

    /// Singular name (`system`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Distro => "distro",
            Kind::Profile => "profile",
            Kind::System => "system",
            Kind::Repo => "repo",
            Kind::Image => "image",
            Kind::Template => "template",
            Kind::Snippet => "snippet",
        }
    }

    /// Plural name: the directory in the repository and the API collection.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Distro => "distros",
            Kind::Profile => "profiles",
            Kind::System => "systems",
            Kind::Repo => "repos",
            Kind::Image => "images",
            Kind::Template => "templates",
            Kind::Snippet => "snippets",
        }
    }

    pub fn from_plural(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == s)
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Templates and snippets are stored as their raw text; the rest as JSON.
    pub fn is_text(self) -> bool {
        matches!(self, Kind::Template | Kind::Snippet)
    }

    /// The file of object `name` inside the repository.
    pub fn file(self, name: &str) -> String {
        if self.is_text() {
            format!("{}/{name}", self.plural())
        } else {
            format!("{}/{name}.json", self.plural())
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An operating system release: kernel and initrd to boot its installer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Distro {
    pub name: String,
    /// `sha256:<hex>` of a blob in the data partition, or an http(s) URL.
    pub kernel: String,
    /// `sha256:<hex>` of a blob in the data partition, or an http(s) URL.
    pub initrd: String,
    /// `x86_64`, `aarch64`, …
    pub arch: String,
    /// `redhat`, `debian`, `ubuntu`, `suse`, `generic`, …
    pub breed: String,
    pub os_version: String,
    pub kernel_options: String,
    #[schema(value_type = Object)]
    pub variables: Vars,
    pub comment: String,
    /// Who installs it: empty (the distro's own installer: its kernel and
    /// initrd boot with the breed's autoinstall file), or `appliance` (the
    /// appliance's agent installs it onto the disk from the profile's apt
    /// mirror; kernel and initrd may then be empty).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub installer: String,
}

/// The distro's `installer` value for installs the appliance does itself.
pub const INSTALLER_APPLIANCE: &str = "appliance";

/// A distro (or parent profile) plus an autoinstall template and settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    pub name: String,
    /// Exactly one of `distro` and `parent` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distro: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Template name; empty: the shipped default for the distro's breed.
    pub autoinstall: String,
    pub kernel_options: String,
    pub repos: Vec<String>,
    #[schema(value_type = Object)]
    pub variables: Vars,
    pub comment: String,
}

/// One network interface of a system.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Interface {
    /// `eth0`, `ens3`, …
    pub name: String,
    /// Lowercase `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub netmask: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// How to power a system on and off (drivers: `crate::bmc`).
///
/// `password` is write-only: the API shows [`REDACTED`] when one is set,
/// and a write that sends [`REDACTED`] or leaves `password` out keeps the
/// stored one (send `""` to clear it). `serve` stores it sealed with the
/// node key, bound to `type`, `address`, `user` and `id`
/// ([`crate::secrets`]): changing those needs the password again.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
#[schema(example = json!({"type": "redfish", "address": "https://10.0.0.5", "user": "admin", "password": REDACTED, "id": "tls=insecure"}))]
pub struct Power {
    /// `redfish`, `ipmi`, `qmp`, `wol`, or empty for none.
    #[serde(rename = "type")]
    pub kind: String,
    /// BMC URL or host (redfish, ipmi), QMP socket path (qmp), broadcast
    /// address\[:port\] (wol).
    pub address: String,
    pub user: String,
    /// Write-only: answers show `********` when set.
    #[schema(write_only)]
    pub password: String,
    /// Driver-specific: redfish `SYSTEM_ID` and/or `tls=insecure`; qmp
    /// `net=QDEV_ID,disk=QDEV_ID` in normal boot order; wol the MAC.
    pub id: String,
}

/// What the API shows instead of a stored password.
pub const REDACTED: &str = "********";

impl Power {
    fn is_empty(&self) -> bool {
        self == &Power::default()
    }
}

/// One machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct System {
    pub name: String,
    /// Exactly one of `profile` and `image` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub hostname: String,
    pub interfaces: Vec<Interface>,
    pub kernel_options: String,
    #[schema(value_type = Object)]
    pub variables: Vars,
    #[serde(skip_serializing_if = "Power::is_empty")]
    pub power: Power,
    /// Boot the installer on the next network boot (Cobbler's `netboot_enabled`).
    pub netboot: bool,
    pub comment: String,
}

impl Default for System {
    fn default() -> Self {
        Self {
            name: String::new(),
            profile: None,
            image: None,
            hostname: String::new(),
            interfaces: Vec::new(),
            kernel_options: String::new(),
            variables: Vars::new(),
            power: Power::default(),
            netboot: true,
            comment: String::new(),
        }
    }
}

/// A package repository targets install from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Repo {
    pub name: String,
    /// Where it is mirrored from (or served at).
    pub mirror: String,
    /// `apt`, `yum`, `rsync`, …
    pub breed: String,
    pub arch: String,
    /// Apt components (`main`) or other breed-specific settings.
    pub components: Vec<String>,
    pub comment: String,
    /// Apt: suites to mirror (`bookworm`, `bookworm-updates`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<String>,
    /// Apt: architectures to mirror (default: `arch`, else `amd64`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arches: Vec<String>,
    /// Apt: packages mirrored (with their dependency closure) besides
    /// every `required` and `important` one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Apt: also mirror the `debian-installer` (udeb) indexes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub installer: bool,
    /// Apt: installs from this mirror take `Recommends`, so the mirror's
    /// closure follows them too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recommends: bool,
    /// Apt: the OpenPGP keyring `InRelease` must verify against: a path on
    /// the server, `sha256:<hex>` (a blob), or an ASCII-armoured key block;
    /// empty means Debian's archive keyring.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// Apt: pool files a sync downloads at once (0: the default, 6; at
    /// most 32).
    #[serde(skip_serializing_if = "is_zero")]
    pub downloads: u32,
    /// Apt: `sha256:<hex>` of the mirror manifest blob
    /// (`appliance.apt-mirror.v1`) the last sync made; set by the sync.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A disk capture or an OCI image systems can be deployed from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Image {
    pub name: String,
    /// `capture`, `oci`, `iso`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Digest or reference of the content.
    pub reference: String,
    pub arch: String,
    #[schema(value_type = Object)]
    pub variables: Vars,
    pub comment: String,
}

/// An autoinstall template or a snippet: a name and minijinja source text.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Text {
    pub name: String,
    pub body: String,
}

/// Any object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Distro(Distro),
    Profile(Profile),
    System(System),
    Repo(Repo),
    Image(Image),
    Template(Text),
    Snippet(Text),
}

/// A field-level validation failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Distro(_) => Kind::Distro,
            Object::Profile(_) => Kind::Profile,
            Object::System(_) => Kind::System,
            Object::Repo(_) => Kind::Repo,
            Object::Image(_) => Kind::Image,
            Object::Template(_) => Kind::Template,
            Object::Snippet(_) => Kind::Snippet,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::Distro(o) => &o.name,
            Object::Profile(o) => &o.name,
            Object::System(o) => &o.name,
            Object::Repo(o) => &o.name,
            Object::Image(o) => &o.name,
            Object::Template(o) | Object::Snippet(o) => &o.name,
        }
    }

    pub fn set_name(&mut self, name: &str) {
        let n = match self {
            Object::Distro(o) => &mut o.name,
            Object::Profile(o) => &mut o.name,
            Object::System(o) => &mut o.name,
            Object::Repo(o) => &mut o.name,
            Object::Image(o) => &mut o.name,
            Object::Template(o) | Object::Snippet(o) => &mut o.name,
        };
        *n = name.to_owned();
    }

    /// Parses the API's JSON form of an object of `kind`.
    pub fn from_json(kind: Kind, mut v: serde_json::Value) -> Result<Object, Invalid> {
        let e = |e: serde_json::Error| invalid(kind.name(), e.to_string());
        // `origin` (inventory or builtin) is what a listing says of a
        // template or snippet, never stored.
        if kind.is_text() {
            if let Some(m) = v.as_object_mut() {
                m.remove("origin");
            }
        }
        Ok(match kind {
            Kind::Distro => Object::Distro(serde_json::from_value(v).map_err(e)?),
            Kind::Profile => Object::Profile(serde_json::from_value(v).map_err(e)?),
            Kind::System => Object::System(serde_json::from_value(v).map_err(e)?),
            Kind::Repo => Object::Repo(serde_json::from_value(v).map_err(e)?),
            Kind::Image => Object::Image(serde_json::from_value(v).map_err(e)?),
            Kind::Template => Object::Template(serde_json::from_value(v).map_err(e)?),
            Kind::Snippet => Object::Snippet(serde_json::from_value(v).map_err(e)?),
        })
    }

    /// The API's JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        let r = match self {
            Object::Distro(o) => serde_json::to_value(o),
            Object::Profile(o) => serde_json::to_value(o),
            Object::System(o) => serde_json::to_value(o),
            Object::Repo(o) => serde_json::to_value(o),
            Object::Image(o) => serde_json::to_value(o),
            Object::Template(o) | Object::Snippet(o) => serde_json::to_value(o),
        };
        r.expect("objects serialise")
    }

    /// The JSON the API and the CLI show: [`Object::to_json`] with secrets
    /// (`power.password`) replaced by [`REDACTED`].
    pub fn to_api_json(&self) -> serde_json::Value {
        let mut v = self.to_json();
        if let Object::System(s) = self {
            if !s.power.password.is_empty() {
                if let Some(p) = v.pointer_mut("/power/password") {
                    *p = REDACTED.into();
                }
            }
        }
        v
    }

    /// The file bytes: pretty JSON with a trailing newline (the name is the
    /// file name, so it is not repeated inside), or the raw template text.
    pub fn to_file(&self) -> Vec<u8> {
        match self {
            Object::Template(t) | Object::Snippet(t) => t.body.clone().into_bytes(),
            _ => {
                let mut v = self.to_json();
                if let Some(m) = v.as_object_mut() {
                    m.remove("name");
                }
                let mut s = serde_json::to_string_pretty(&v).expect("objects serialise");
                s.push('\n');
                s.into_bytes()
            }
        }
    }

    /// Parses file bytes of object `name`.
    pub fn from_file(kind: Kind, name: &str, bytes: &[u8]) -> Result<Object, Invalid> {
        if kind.is_text() {
            let body = String::from_utf8(bytes.to_vec())
                .map_err(|_| invalid("body", "template is not UTF-8"))?;
            let t = Text {
                name: name.to_owned(),
                body,
            };
            return Ok(if kind == Kind::Template {
                Object::Template(t)
            } else {
                Object::Snippet(t)
            });
        }
        let mut v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(kind.name(), e.to_string()))?;
        if let Some(m) = v.as_object_mut() {
            m.insert("name".into(), name.into());
        }
        Object::from_json(kind, v)
    }

    /// Normalises (lowercase MACs, trimmed strings) and checks everything
    /// that needs only this object.
    pub fn normalize_and_check(&mut self) -> Result<(), Invalid> {
        check_name(self.name())?;
        match self {
            Object::Distro(d) => {
                match d.installer.as_str() {
                    "" => {}
                    INSTALLER_APPLIANCE if d.breed == "debian" => {}
                    INSTALLER_APPLIANCE => {
                        let why = format!(
                            "the appliance installs only breed debian, not {:?}",
                            d.breed
                        );
                        return Err(invalid("installer", why));
                    }
                    other => {
                        return Err(invalid(
                            "installer",
                            format!(
                                "{other:?}: use \"\" (the distro's own installer) or \"appliance\""
                            ),
                        ))
                    }
                }
                for (field, v) in [("kernel", &d.kernel), ("initrd", &d.initrd)] {
                    if v.is_empty() {
                        if d.installer == INSTALLER_APPLIANCE {
                            continue;
                        }
                        return Err(invalid(field, "required"));
                    }
                    check_location(field, v)?;
                }
                check_kernel_options("kernel_options", &d.kernel_options)?;
                check_vars(&d.variables)?;
            }
            Object::Profile(p) => {
                match (&p.distro, &p.parent) {
                    (Some(_), Some(_)) => {
                        return Err(invalid("parent", "set either distro or parent, not both"))
                    }
                    (None, None) => {
                        return Err(invalid(
                            "distro",
                            "a distro or a parent profile is required",
                        ))
                    }
                    _ => {}
                }
                check_kernel_options("kernel_options", &p.kernel_options)?;
                check_vars(&p.variables)?;
            }
            Object::System(s) => {
                match (&s.profile, &s.image) {
                    (Some(_), Some(_)) => {
                        return Err(invalid("image", "set either profile or image, not both"))
                    }
                    (None, None) => {
                        return Err(invalid("profile", "a profile or an image is required"))
                    }
                    _ => {}
                }
                if !s.hostname.is_empty() {
                    check_hostname("hostname", &s.hostname)?;
                }
                let mut names = std::collections::BTreeSet::new();
                for (i, iface) in s.interfaces.iter_mut().enumerate() {
                    let f = |x: &str| format!("interfaces[{i}].{x}");
                    if iface.name.is_empty() {
                        iface.name = format!("eth{i}");
                    }
                    if !names.insert(iface.name.clone()) {
                        return Err(invalid(
                            f("name"),
                            format!("duplicate interface {}", iface.name),
                        ));
                    }
                    iface.mac = normalize_mac(&iface.mac).map_err(|m| invalid(f("mac"), m))?;
                    for (field, v) in [
                        ("ip", &iface.ip),
                        ("netmask", &iface.netmask),
                        ("gateway", &iface.gateway),
                    ] {
                        if !v.is_empty() && v.parse::<IpAddr>().is_err() {
                            return Err(invalid(f(field), format!("{v:?} is not an IP address")));
                        }
                    }
                    for (j, d) in iface.dns.iter().enumerate() {
                        if d.parse::<IpAddr>().is_err() {
                            return Err(invalid(
                                f(&format!("dns[{j}]")),
                                format!("{d:?} is not an IP address"),
                            ));
                        }
                    }
                    if !iface.hostname.is_empty() {
                        check_hostname(&f("hostname"), &iface.hostname)?;
                    }
                }
                check_kernel_options("kernel_options", &s.kernel_options)?;
                check_vars(&s.variables)?;
                if !matches!(
                    s.power.kind.as_str(),
                    "" | "redfish" | "ipmi" | "qmp" | "wol"
                ) {
                    return Err(invalid(
                        "power.type",
                        format!("{:?}: use redfish, ipmi, qmp or wol", s.power.kind),
                    ));
                }
            }
            Object::Repo(_) | Object::Template(_) | Object::Snippet(_) => {}
            Object::Image(i) => check_vars(&i.variables)?,
        }
        Ok(())
    }
}

/// Object names: 1–128 of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit (they become file names and URL path segments).
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.ends_with(".tmp");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!("{name:?}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"),
        ))
    }
}

/// Accepts `aa:bb:cc:dd:ee:ff`, `AA-BB-…` or `aabb.ccdd.eeff`; returns
/// lowercase colon form.
pub fn normalize_mac(mac: &str) -> Result<String, String> {
    let hexdigits: String = mac
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    let seps_ok = mac.len() == 17
        && (mac.chars().filter(|&c| c == ':').count() == 5
            || mac.chars().filter(|&c| c == '-').count() == 5)
        || mac.len() == 14 && mac.chars().filter(|&c| c == '.').count() == 2
        || mac.len() == 12;
    if !seps_ok || hexdigits.len() != 12 || !hexdigits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let lower = hexdigits.to_ascii_lowercase();
    let parts: Vec<&str> = (0..6).map(|i| &lower[i * 2..i * 2 + 2]).collect();
    Ok(parts.join(":"))
}

fn check_hostname(field: &str, h: &str) -> Result<(), Invalid> {
    let ok = h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{h:?} is not a valid host name")))
    }
}

fn check_location(field: &str, v: &str) -> Result<(), Invalid> {
    if let Some(hex) = v.strip_prefix("sha256:") {
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Ok(());
        }
    } else if v.starts_with("http://") || v.starts_with("https://") {
        // Rendered into iPXE scripts: a plain URL, one word.
        return match super::boot::ipxe_url_problem(v) {
            None => Ok(()),
            Some(why) => Err(invalid(field, format!("{v:?}: {why}"))),
        };
    }
    Err(invalid(
        field,
        format!("{v:?}: use sha256:<64 hex> (a blob on this appliance) or an http(s) URL"),
    ))
}

/// Kernel options go onto an iPXE `kernel` line: one line, and no word
/// that iPXE reads as the end of the command (`||`, `&&`, `;`, `#…`).
pub(crate) fn check_kernel_options(field: &str, v: &str) -> Result<(), Invalid> {
    match super::boot::ipxe_arg_problem(v) {
        None => Ok(()),
        Some(why) => Err(invalid(
            field,
            format!("kernel options must be one line of plain words: {why}"),
        )),
    }
}

pub(crate) fn check_vars(v: &Vars) -> Result<(), Invalid> {
    for k in v.keys() {
        let ok = !k.is_empty()
            && k.as_bytes()[0].is_ascii_alphabetic() | (k.as_bytes()[0] == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(invalid(
                format!("variables.{k}"),
                "variable names are identifiers (letters, digits, '_')",
            ));
        }
    }
    Ok(())
}

/// Kernel options as ordered `key[=value]` pairs; later keys replace earlier
/// ones, `!key` removes an inherited key (blending).
pub fn merge_kernel_options(layers: &[&str]) -> String {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for layer in layers {
        for tok in layer.split_whitespace() {
            if let Some(k) = tok.strip_prefix('!') {
                out.retain(|(key, _)| key != k);
                continue;
            }
            let (k, v) = match tok.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (tok.to_owned(), None),
            };
            if let Some(slot) = out.iter_mut().find(|(key, _)| *key == k) {
                slot.1 = v;
            } else {
                out.push((k, v));
            }
        }
    }
    out.into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise() {
        assert_eq!(
            normalize_mac("AA-BB-CC-DD-EE-0F").unwrap(),
            "aa:bb:cc:dd:ee:0f"
        );
        assert_eq!(
            normalize_mac("aabb.ccdd.eeff").unwrap(),
            "aa:bb:cc:dd:ee:ff"
        );
        assert!(normalize_mac("aa:bb:cc:dd:ee").is_err());
        assert!(normalize_mac("zz:bb:cc:dd:ee:ff").is_err());
        assert!(normalize_mac("aa:bb:cc:dd:ee:ff:00").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-01.lab_a").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b", "-x", &"a".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_options_merge_by_key() {
        assert_eq!(
            merge_kernel_options(&["quiet console=tty0 a=1", "console=ttyS0 !quiet", "b"]),
            "console=ttyS0 a=1 b"
        );
    }

    #[test]
    fn system_file_round_trips_without_name() {
        let mut o = Object::System(System {
            name: "web1".into(),
            profile: Some("p".into()),
            interfaces: vec![Interface {
                mac: "AA:BB:CC:DD:EE:FF".into(),
                ip: "10.0.0.5".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        o.normalize_and_check().unwrap();
        let bytes = o.to_file();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("web1"), "{text}");
        assert!(text.contains("aa:bb:cc:dd:ee:ff"));
        assert_eq!(Object::from_file(Kind::System, "web1", &bytes).unwrap(), o);
    }

    #[test]
    fn bad_fields_name_the_field() {
        let mut o = Object::System(System {
            name: "s".into(),
            profile: Some("p".into()),
            interfaces: vec![Interface {
                mac: "aa:bb:cc:dd:ee:ff".into(),
                ip: "10.0.0.500".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let e = o.normalize_and_check().unwrap_err();
        assert_eq!(e.field, "interfaces[0].ip");
    }
}
