//! Variable blending: global settings → distro → profiles (root first) →
//! image → system, each value tagged with the layer it came from
//! (`appliance report --blended`). Built-in fields (kernel, arch, hostname,
//! interfaces, …) are blended as variables too, so templates see one flat
//! namespace, as in Cobbler.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use super::model::{merge_kernel_options, Kind, Object, Vars};
use super::{InvError, Inventory};

/// One blended value and where it came from (`settings`, `distro:NAME`,
/// `profile:NAME`, `image:NAME`, `system:NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Sourced {
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    pub from: String,
}

/// The blended view of one object.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Blended {
    /// `system/web1`.
    pub object: String,
    /// Layers in the order applied, most general first.
    pub layers: Vec<String>,
    pub variables: BTreeMap<String, Sourced>,
}

impl Blended {
    /// The values without their sources (the template context).
    pub fn values(&self) -> serde_json::Map<String, serde_json::Value> {
        self.variables
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    }
}

struct Layers {
    layers: Vec<String>,
    vars: BTreeMap<String, Sourced>,
    kopts: Vec<(String, String)>,
}

impl Layers {
    fn set(&mut self, from: &str, key: &str, value: serde_json::Value) {
        self.vars.insert(
            key.to_owned(),
            Sourced {
                value,
                from: from.to_owned(),
            },
        );
    }
    fn set_str(&mut self, from: &str, key: &str, value: &str) {
        if !value.is_empty() {
            self.set(from, key, value.into());
        }
    }
    fn vars(&mut self, from: &str, vars: &Vars) {
        for (k, v) in vars {
            self.set(from, k, v.clone());
        }
    }
    fn layer(&mut self, from: String, kernel_options: &str) {
        if !kernel_options.is_empty() {
            self.kopts.push((from.clone(), kernel_options.to_owned()));
        }
        self.layers.push(from);
    }
}

/// Blends the variables of `kind`/`name`.
pub fn blend(inv: &Inventory, kind: Kind, name: &str) -> Result<Blended, InvError> {
    let obj = inv.get(kind, name).ok_or_else(|| InvError::NotFound {
        kind,
        name: name.to_owned(),
    })?;
    let mut l = Layers {
        layers: Vec::new(),
        vars: BTreeMap::new(),
        kopts: Vec::new(),
    };
    let s = inv.settings();
    l.vars("settings", &s.variables);
    l.layer("settings".into(), &s.kernel_options);

    // The profile chain this object sits on.
    let (profile, image, system) = match obj {
        Object::Profile(p) => (Some(p.name.as_str()), None, None),
        Object::System(sys) => (sys.profile.as_deref(), sys.image.as_deref(), Some(sys)),
        Object::Distro(_) => (None, None, None),
        Object::Image(i) => (None, Some(i.name.as_str()), None),
        _ => (None, None, None),
    };
    let chain = profile.map(|p| inv.profile_chain(p)).unwrap_or_default();
    let distro = match obj {
        Object::Distro(d) => Some(d),
        _ => chain
            .last()
            .and_then(|p| p.distro.as_deref())
            .and_then(|d| inv.distro(d)),
    };
    if let Some(d) = distro {
        let from = format!("distro:{}", d.name);
        l.set_str(&from, "distro", &d.name);
        l.set_str(&from, "kernel", &d.kernel);
        l.set_str(&from, "initrd", &d.initrd);
        l.set_str(&from, "arch", &d.arch);
        l.set_str(&from, "breed", &d.breed);
        l.set_str(&from, "os_version", &d.os_version);
        l.vars(&from, &d.variables);
        l.layer(from, &d.kernel_options);
    }
    for p in chain.iter().rev() {
        let from = format!("profile:{}", p.name);
        l.set_str(&from, "profile", &p.name);
        l.set_str(&from, "autoinstall", &p.autoinstall);
        if !p.repos.is_empty() {
            l.set(&from, "repos", p.repos.clone().into());
        }
        l.vars(&from, &p.variables);
        l.layer(from, &p.kernel_options);
    }
    if let Some(i) = image.and_then(|n| inv.image(n)) {
        let from = format!("image:{}", i.name);
        l.set_str(&from, "image", &i.name);
        l.set_str(&from, "image_type", &i.kind);
        l.set_str(&from, "image_reference", &i.reference);
        l.set_str(&from, "arch", &i.arch);
        l.vars(&from, &i.variables);
        l.layer(from, "");
    }
    if let Some(sys) = system {
        let from = format!("system:{}", sys.name);
        l.set_str(&from, "system_name", &sys.name);
        let hostname = if sys.hostname.is_empty() {
            sys.interfaces
                .iter()
                .find(|i| !i.hostname.is_empty())
                .map(|i| i.hostname.clone())
                .unwrap_or_else(|| sys.name.clone())
        } else {
            sys.hostname.clone()
        };
        l.set(&from, "hostname", hostname.into());
        l.set(
            &from,
            "interfaces",
            serde_json::to_value(&sys.interfaces).expect("serialises"),
        );
        if let Some(first) = sys.interfaces.first() {
            l.set_str(&from, "mac", &first.mac);
            l.set_str(&from, "ip", &first.ip);
            l.set_str(&from, "netmask", &first.netmask);
            l.set_str(&from, "gateway", &first.gateway);
            if !first.dns.is_empty() {
                l.set(&from, "name_servers", first.dns.clone().into());
            }
        }
        l.set(&from, "netboot", sys.netboot.into());
        l.vars(&from, &sys.variables);
        l.layer(from, &sys.kernel_options);
    }
    if !matches!(
        obj,
        Object::Distro(_) | Object::Profile(_) | Object::System(_) | Object::Image(_)
    ) {
        l.layers.push(format!("{kind}:{name}"));
    }
    let kopts: Vec<&str> = l.kopts.iter().map(|(_, k)| k.as_str()).collect();
    let merged = merge_kernel_options(&kopts);
    let from = l
        .kopts
        .last()
        .map(|(f, _)| f.clone())
        .unwrap_or_else(|| "settings".into());
    l.set(&from, "kernel_options", merged.into());
    Ok(Blended {
        object: format!("{kind}/{name}"),
        layers: l.layers,
        variables: l.vars,
    })
}
