//! Autoinstall rendering with minijinja (Jinja2 syntax), on demand, with
//! strict undefined variables.
//!
//! Template names resolve in the inventory first (`templates/NAME`), then
//! among the shipped templates (kickstart, Debian preseed, Ubuntu
//! autoinstall, cloud-init NoCloud user-data and meta-data, Ignition).
//! `{% include "snippets/NAME" %}` resolves a snippet the same way. The
//! context is the blended variables of the system plus `server_url`,
//! `autoinstall_url`, `status_url` and `repo_urls`.
//!
//! A render error names the template file, the line, and the expression
//! that was undefined.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};

use super::blend::blend;
use super::model::{Kind, Object};
use super::{InvError, Inventory};

/// Shipped templates: (name, source).
pub const SHIPPED: &[(&str, &str)] = &[
    ("kickstart.ks", include_str!("templates/kickstart.ks")),
    ("preseed.cfg", include_str!("templates/preseed.cfg")),
    (
        "autoinstall.yaml",
        include_str!("templates/autoinstall.yaml"),
    ),
    (
        "cloud-init-user-data",
        include_str!("templates/cloud-init-user-data"),
    ),
    (
        "cloud-init-meta-data",
        include_str!("templates/cloud-init-meta-data"),
    ),
    ("ignition.json", include_str!("templates/ignition.json")),
];

/// Shipped snippets: (name, source).
pub const SHIPPED_SNIPPETS: &[(&str, &str)] = &[
    (
        "status_start",
        include_str!("templates/snippets/status_start"),
    ),
    (
        "status_finish",
        include_str!("templates/snippets/status_finish"),
    ),
    (
        "status_failure",
        include_str!("templates/snippets/status_failure"),
    ),
    (
        "status_start_wget",
        include_str!("templates/snippets/status_start_wget"),
    ),
    (
        "status_finish_wget",
        include_str!("templates/snippets/status_finish_wget"),
    ),
    (
        "ssh_keys_target",
        include_str!("templates/snippets/ssh_keys_target"),
    ),
];

/// A shipped template by name.
pub fn shipped(name: &str) -> Option<&'static str> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The default template for a breed.
pub fn default_for_breed(breed: &str) -> &'static str {
    match breed {
        "redhat" | "fedora" | "centos" | "rhel" | "rocky" | "alma" | "almalinux" => "kickstart.ks",
        "debian" => "preseed.cfg",
        "ubuntu" => "autoinstall.yaml",
        "coreos" | "fcos" | "flatcar" => "ignition.json",
        _ => "cloud-init-user-data",
    }
}

/// Which document of a system to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// The profile's autoinstall template.
    Autoinstall,
    /// NoCloud `user-data` (the autoinstall template for Ubuntu/cloud-init breeds).
    UserData,
    /// NoCloud `meta-data`.
    MetaData,
}

/// Why a render failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Inventory(#[from] InvError),
    #[error("system {0:?} is deployed from an image and has no autoinstall template")]
    NoTemplate(String),
    #[error("{0}")]
    Template(String),
}

/// Everything a render needs, copied out of the inventory so the lock is
/// not held while rendering.
pub struct RenderJob {
    template: String,
    sources: Arc<BTreeMap<String, String>>,
    context: serde_json::Map<String, serde_json::Value>,
}

/// The profile's template name for a system or profile.
pub fn template_name(inv: &Inventory, profile: &str) -> String {
    for p in inv.profile_chain(profile) {
        if !p.autoinstall.is_empty() {
            return p.autoinstall.clone();
        }
    }
    let breed = inv
        .profile_distro(profile)
        .map(|d| d.breed.clone())
        .unwrap_or_default();
    default_for_breed(&breed).to_owned()
}

/// Prepares the render of `doc` for system `name` (or profile when
/// `kind` is Profile) as served from `server_url` (`http://host:port`).
pub fn prepare(
    inv: &Inventory,
    kind: Kind,
    name: &str,
    doc: Document,
    server_url: &str,
) -> Result<RenderJob, RenderError> {
    let blended = blend(inv, kind, name)?;
    let profile = match inv.get(kind, name) {
        Some(Object::System(s)) => s
            .profile
            .clone()
            .ok_or_else(|| RenderError::NoTemplate(name.to_owned()))?,
        Some(Object::Profile(p)) => p.name.clone(),
        _ => {
            return Err(InvError::NotFound {
                kind,
                name: name.to_owned(),
            }
            .into())
        }
    };
    let template = match doc {
        Document::MetaData => "cloud-init-meta-data".to_owned(),
        Document::UserData => {
            let t = template_name(inv, &profile);
            if t.ends_with(".yaml")
                || t.starts_with("cloud-init")
                || inv.get(Kind::Template, &t).is_some()
            {
                t
            } else {
                "cloud-init-user-data".to_owned()
            }
        }
        Document::Autoinstall => template_name(inv, &profile),
    };
    let mut context = blended.values();
    let base = format!("{server_url}/api/v1/{}/{name}", kind.plural());
    context.insert("server_url".into(), server_url.into());
    context.insert(
        "autoinstall_url".into(),
        format!("{base}/autoinstall").into(),
    );
    context.insert("status_url".into(), format!("{base}/status").into());
    if kind == Kind::Profile {
        // A profile's file serves any machine: it names no system, and the
        // hostname is what DHCP gives (Debian's example value until then).
        context.entry("system_name").or_insert_with(|| "".into());
        context
            .entry("hostname")
            .or_insert_with(|| "unassigned-hostname".into());
    } else {
        context.entry("system_name").or_insert_with(|| name.into());
        context.entry("hostname").or_insert_with(|| name.into());
    }
    context
        .entry("interfaces")
        .or_insert_with(|| serde_json::Value::Array(vec![]));
    let repos: Vec<serde_json::Value> = inv
        .profile(&profile)
        .map(|_| inv.profile_chain(&profile))
        .unwrap_or_default()
        .iter()
        .flat_map(|p| p.repos.iter())
        .filter_map(|r| match inv.get(Kind::Repo, r) {
            Some(Object::Repo(r)) => {
                Some(serde_json::json!({"name": r.name, "mirror": r.mirror, "breed": r.breed}))
            }
            _ => None,
        })
        .collect();
    // The first synced apt mirror of the profile's repos, served by this
    // appliance at `/repos/NAME/`: the installer's mirror (preseed's
    // `mirror_host`/`mirror_dir`/`mirror_suite` unless variables set them).
    let apt_mirror = inv
        .profile(&profile)
        .map(|_| inv.profile_chain(&profile))
        .unwrap_or_default()
        .iter()
        .flat_map(|p| p.repos.iter())
        .find_map(|r| match inv.get(Kind::Repo, r) {
            Some(Object::Repo(r)) if r.breed == "apt" => Some(r.clone()),
            _ => None,
        });
    if let Some(r) = apt_mirror {
        let host = server_url
            .split_once("://")
            .map(|x| x.1)
            .unwrap_or(server_url)
            .trim_end_matches('/');
        context.entry("mirror_host").or_insert_with(|| host.into());
        context
            .entry("mirror_dir")
            .or_insert_with(|| format!("/repos/{}", r.name).into());
        if let Some(s) = r.suites.first() {
            context
                .entry("mirror_suite")
                .or_insert_with(|| s.clone().into());
        }
    }
    let repos: Vec<serde_json::Value> = repos
        .into_iter()
        .map(|mut v| {
            if v["breed"] == "apt" {
                v["url"] =
                    format!("{server_url}/repos/{}", v["name"].as_str().unwrap_or("")).into();
            }
            v
        })
        .collect();
    context.insert("repo_urls".into(), repos.into());
    let mut sources = BTreeMap::new();
    for (n, s) in SHIPPED {
        sources.insert((*n).to_owned(), (*s).to_owned());
    }
    for (n, s) in SHIPPED_SNIPPETS {
        sources.insert(format!("snippets/{n}"), (*s).to_owned());
    }
    for o in inv.list(Kind::Template) {
        if let Object::Template(t) = o {
            sources.insert(t.name.clone(), t.body.clone());
        }
    }
    for o in inv.list(Kind::Snippet) {
        if let Object::Snippet(t) = o {
            sources.insert(format!("snippets/{}", t.name), t.body.clone());
        }
    }
    if !sources.contains_key(&template) {
        return Err(InvError::NotFound {
            kind: Kind::Template,
            name: template,
        }
        .into());
    }
    Ok(RenderJob {
        template,
        sources: Arc::new(sources),
        context,
    })
}

impl RenderJob {
    /// Renders `template` instead of the profile's (a preview), with `body`
    /// as its source when given (unsaved text) instead of the stored one.
    pub fn with_template(
        mut self,
        template: &str,
        body: Option<String>,
    ) -> Result<RenderJob, RenderError> {
        match body {
            Some(b) => {
                Arc::make_mut(&mut self.sources).insert(template.to_owned(), b);
            }
            None if !self.sources.contains_key(template) => {
                return Err(InvError::NotFound {
                    kind: Kind::Template,
                    name: template.to_owned(),
                }
                .into())
            }
            None => {}
        }
        self.template = template.to_owned();
        Ok(self)
    }

    /// The template being rendered.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Renders; errors name file, line and the undefined expression.
    pub fn render(&self) -> Result<String, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        // Autoinstall files are not HTML; never escape (minijinja would
        // JSON-quote every value in `.yaml` and `.json` templates).
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.add_filter("sh_quote", sh_quote);
        env.add_filter("sh_word", sh_word);
        env.add_function("fail", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        });
        let sources = self.sources.clone();
        env.set_loader(move |name| Ok(sources.get(name).cloned()));
        let tmpl = env
            .get_template(&self.template)
            .map_err(|e| self.explain(e))?;
        tmpl.render(&self.context).map_err(|e| self.explain(e))
    }

    fn explain(&self, outer: minijinja::Error) -> RenderError {
        // An error inside an include is wrapped; report the innermost.
        let mut e = &outer;
        while let Some(inner) =
            std::error::Error::source(e).and_then(|s| s.downcast_ref::<minijinja::Error>())
        {
            e = inner;
        }
        let file = e.name().unwrap_or(&self.template).to_owned();
        let file = if file.starts_with("snippets/") {
            file
        } else {
            format!("templates/{file}")
        };
        let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
        let mut msg = format!("{file}{line}: ");
        if e.kind() == minijinja::ErrorKind::UndefinedError {
            let expr = e
                .name()
                .and_then(|n| self.sources.get(n))
                .zip(e.range())
                .and_then(|(src, r)| src.get(r))
                .map(str::trim)
                .unwrap_or("");
            if expr.is_empty() {
                msg.push_str("undefined variable");
            } else {
                msg.push_str(&format!("undefined variable `{expr}`"));
            }
            msg.push_str(" (set it in variables of the system, profile, distro or settings)");
        } else {
            msg.push_str(
                &e.detail()
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.kind().to_string()),
            );
        }
        RenderError::Template(msg)
    }
}

/// `sh_quote`: one shell word in single quotes, for values that go into a
/// shell command line (preseed `late_command`). A value with a line break
/// or another control character is refused: preseed values are one line.
fn sh_quote(v: String) -> Result<String, minijinja::Error> {
    if v.chars().any(|c| c.is_control()) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("sh_quote: {v:?} has a line break or control character"),
        ));
    }
    Ok(format!("'{}'", v.replace('\'', "'\\''")))
}

/// `sh_word`: a value used unquoted as a user or file name: only
/// `[A-Za-z0-9._-]`, not starting with `-`.
fn sh_word(v: String) -> Result<String, minijinja::Error> {
    if v.is_empty()
        || v.starts_with('-')
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("sh_word: {v:?} is not a plain name ([A-Za-z0-9._-], not starting with -)"),
        ));
    }
    Ok(v)
}

/// Renders one document in one call.
pub fn render(
    inv: &Inventory,
    kind: Kind,
    name: &str,
    doc: Document,
    server_url: &str,
) -> Result<String, RenderError> {
    prepare(inv, kind, name, doc, server_url)?.render()
}
