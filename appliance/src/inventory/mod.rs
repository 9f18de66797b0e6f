//! The provisioning inventory: Cobbler's model (distro, profile, system,
//! repo, image, template, snippet) held in memory and stored one readable
//! file per object in a git repository (`<data>/inventory`).
//!
//! Layout of the repository (format `appliance.inventory.v1`):
//! `settings.json` (global variables, kernel options and the default boot
//! action), `distros/<name>.json`, `profiles/<name>.json`,
//! `systems/<name>.json`, `repos/<name>.json`, `images/<name>.json`
//! (pretty JSON without the `name` field, which is the file name), and
//! `templates/<name>`, `snippets/<name>` (raw minijinja text). Every change
//! is one commit whose author is the API token's name.
//!
//! The committed tree is the truth: it is loaded once at start-up into
//! memory (with MAC, IP and host name indexes), the work tree is healed to
//! match it, and every later change is validated against memory, committed,
//! and only then applied to memory. Node-local state (identity, leases,
//! tokens, install status) lives in `<data>/state`, never here.

pub mod api;
pub mod blend;
pub mod boot;
pub mod git;
pub mod gitpack;
pub mod group;
pub mod import;
pub mod model;
pub mod profile_report;
pub mod status;
pub mod templates;
pub mod upload;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use self::git::{Change, Repo, Signature};
use self::model::{Invalid, Kind, Object, Vars};

/// What network-booting machines the inventory does not know get.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultBoot {
    /// Exit iPXE and boot the local disk.
    Local,
    /// An iPXE menu of every profile, local boot first.
    Menu,
    /// The appliance's own agent (install-self, capture, deploy). The
    /// default: like MAAS enlistment, an unknown machine reports its
    /// hardware and waits; the agent writes nothing to disk unasked.
    #[default]
    Agent,
    /// Install `default_profile` without asking.
    Install,
    /// Install this appliance onto the machine's disk (self-replication):
    /// the machine becomes a child appliance of this one.
    Replicate,
}

/// Global settings, stored as `settings.json` in the repository.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Variables every object inherits first.
    #[schema(value_type = Object)]
    pub variables: Vars,
    /// Kernel options every install inherits first.
    pub kernel_options: String,
    pub default_boot: DefaultBoot,
    /// Profile for `default_boot = install` (and the menu's default entry).
    pub default_profile: String,
    /// Kernel options for `default_boot = agent`.
    pub agent_kernel_options: String,
    /// Anyone on the network may pull from the OCI registry (`/v2/`)
    /// without a token. Off by default: turn it on only when no image
    /// carries a secret.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub registry_anonymous_pulls: bool,
}

impl Settings {
    /// Checks what needs only the settings: the kernel options go onto
    /// iPXE `kernel` lines (one line, no command separators), variable
    /// names are identifiers, a default profile is an object name.
    pub fn check(&self) -> Result<(), Invalid> {
        model::check_kernel_options("kernel_options", &self.kernel_options)?;
        model::check_kernel_options("agent_kernel_options", &self.agent_kernel_options)?;
        model::check_vars(&self.variables)?;
        if !self.default_profile.is_empty() {
            model::check_name(&self.default_profile).map_err(|e| Invalid {
                field: "default_profile".into(),
                message: e.message,
            })?;
        }
        Ok(())
    }
}

/// Errors of inventory operations, each with a stable API code.
#[derive(Debug, thiserror::Error)]
pub enum InvError {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: Kind, name: String },
    #[error("invalid {kind}: {0}", kind = .1)]
    Invalid(Invalid, Kind),
    #[error("{0}")]
    Conflict(String),
    #[error("{kind} {name:?} is still used by {users}; remove those first or use recursive removal", users = .users.join(", "))]
    InUse {
        kind: Kind,
        name: String,
        users: Vec<String>,
    },
    #[error("storing the change: {0}")]
    Storage(#[from] git::GitError),
    /// The group commit this change rode in failed: nothing of it is stored.
    #[error("storing the change: {0}")]
    NotDurable(String),
}

impl InvError {
    /// The stable error code the API returns.
    pub fn code(&self) -> &'static str {
        match self {
            InvError::NotFound { .. } => "not_found",
            InvError::Exists { .. } => "already_exists",
            InvError::Invalid(..) => "invalid_object",
            InvError::Conflict(_) => "conflict",
            InvError::InUse { .. } => "in_use",
            InvError::Storage(_) | InvError::NotDurable(_) => "storage_failed",
        }
    }
}

fn inv(kind: Kind) -> impl Fn(Invalid) -> InvError {
    move |e| InvError::Invalid(e, kind)
}

/// Who is changing the inventory.
#[derive(Debug, Clone)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl Author {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            email: format!("{name}@appliance"),
        }
    }
    fn signature(&self) -> Signature {
        Signature::now(&self.name, &self.email)
    }
}

/// The inventory: objects in memory, persisted through [`Repo`].
pub struct Inventory {
    repo: Repo,
    settings: Settings,
    objects: BTreeMap<Kind, BTreeMap<String, Object>>,
    by_mac: HashMap<String, String>,
    by_ip: HashMap<String, String>,
    by_host: HashMap<String, String>,
    /// Files that could not be parsed at load (path: reason).
    pub load_errors: Vec<String>,
    /// This node's clock: when set, every change also writes its sync
    /// stamp (`.sync/meta/…`, see [`crate::sync::merge`]).
    hlc: Option<std::sync::Arc<crate::sync::merge::Hlc>>,
    /// When set, a system's clear BMC password is sealed before it is
    /// stored ([`crate::secrets`]).
    sealer: Option<std::sync::Arc<crate::secrets::Sealer>>,
    /// While a group commit is open ([`Inventory::begin_group`]): the
    /// changes applied to memory and not yet committed.
    group: Option<PendingGroup>,
}

/// Changes of a group commit, in the order they were applied.
#[derive(Default)]
struct PendingGroup {
    changes: Vec<Change>,
    /// (author, message) of each change, for the commit message.
    parts: Vec<(Author, String)>,
}

/// What merging another node's head did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// `unchanged`, `fast-forward` or `merged`.
    pub action: String,
    pub head: Option<String>,
    /// The state hash: HEAD's tree id.
    pub state: Option<String>,
    /// Object paths whose content changed here.
    pub changed: usize,
    /// Conflicts this merge found.
    pub conflicts: Vec<crate::sync::merge::Conflict>,
}

/// A read lock on `lock`, first reloading the inventory when stock git
/// moved its branch on disk (one small file read per call), so a hand-made
/// commit is live at once, with no restart and no `sync` step.
pub fn fresh_read(
    lock: &std::sync::RwLock<Inventory>,
) -> std::sync::RwLockReadGuard<'_, Inventory> {
    {
        let g = lock.read().unwrap_or_else(|e| e.into_inner());
        if !g.moved_on_disk() {
            return g;
        }
    }
    drop(fresh_write(lock));
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// A write lock on `lock`, reloaded first when the branch moved on disk,
/// so our next commit builds on the operator's and never drops it.
pub fn fresh_write(
    lock: &std::sync::RwLock<Inventory>,
) -> std::sync::RwLockWriteGuard<'_, Inventory> {
    let mut w = lock.write().unwrap_or_else(|e| e.into_inner());
    if w.moved_on_disk() {
        match w.reload() {
            Ok(()) => tracing::info!(head = ?w.head(), "the inventory moved on disk; reloaded"),
            Err(e) => tracing::error!(error = %e, "reloading the inventory after a change on disk"),
        }
    }
    w
}

impl Inventory {
    /// Opens (creating if needed) the repository at `root` and loads it.
    /// Changes are stamped for sync with the node id in
    /// `<root>/../state/node.json` when that file exists.
    pub fn open(root: &Path) -> Result<Self, InvError> {
        let repo = Repo::init(root)?;
        let origin = root
            .parent()
            .and_then(|d| crate::node::load(d).ok().flatten());
        Self::load_with(
            repo,
            origin.map(|n| std::sync::Arc::new(crate::sync::merge::Hlc::new(&n))),
        )
    }

    /// As [`Inventory::open`], without fsync (tests and benchmarks of logic).
    pub fn open_volatile(root: &Path) -> Result<Self, InvError> {
        let mut repo = Repo::init(root)?;
        repo.durable = false;
        Self::load(repo)
    }

    fn load(repo: Repo) -> Result<Self, InvError> {
        Self::load_with(repo, None)
    }

    /// Stamps later changes as made on `node` (for sync).
    pub fn set_origin(&mut self, node: &uuid::Uuid) {
        self.hlc = Some(std::sync::Arc::new(crate::sync::merge::Hlc::new(node)));
    }

    /// Seals BMC passwords of later writes with `sealer`.
    pub fn set_sealer(&mut self, sealer: std::sync::Arc<crate::secrets::Sealer>) {
        self.sealer = Some(sealer);
    }

    /// Seals a system's clear BMC password; refuses a password sealed by
    /// this node that its new power settings no longer open (the address,
    /// user, driver or id changed: the password must be given again).
    fn seal(&self, obj: &mut Object) -> Result<(), InvError> {
        let (Some(sealer), Object::System(s)) = (&self.sealer, obj) else {
            return Ok(());
        };
        let p = &mut s.power;
        if p.password.is_empty() {
            return Ok(());
        }
        let aad = crate::secrets::power_aad(p);
        if crate::secrets::is_sealed(&p.password) {
            if sealer.is_ours(&p.password) && sealer.open(&p.password, &aad).is_err() {
                return Err(InvError::Conflict(format!(
                    "system {:?}: power settings changed, so the stored BMC password is not \
                     sent to them; send power.password again (\"\" to clear it)",
                    s.name
                )));
            }
            return Ok(());
        }
        p.password = sealer
            .seal(&p.password, &aad)
            .map_err(|e| InvError::Conflict(format!("sealing the BMC password: {e:#}")))?;
        Ok(())
    }

    /// The git repository (for sync).
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Commits `changes` now, or, while a group is open, queues them for
    /// the group's one commit (memory is updated by the caller either way).
    fn record(
        &mut self,
        changes: Vec<Change>,
        author: &Author,
        message: &str,
    ) -> Result<(), InvError> {
        match &mut self.group {
            Some(g) => {
                g.changes.extend(changes);
                g.parts.push((author.clone(), message.to_owned()));
            }
            None => {
                self.commit(changes, &author.signature(), message)?;
            }
        }
        Ok(())
    }

    /// Opens a group commit: later changes apply to memory at once and are
    /// committed together by [`Inventory::commit_group`] (one commit, one
    /// sync). Hold the write lock from here to `commit_group`, so no
    /// reader sees a change before it is durable.
    pub fn begin_group(&mut self) {
        if self.group.take().is_some() {
            // A group left open (its leader panicked): drop what it applied.
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "reloading the inventory after an unfinished group");
            }
        }
        self.group = Some(PendingGroup::default());
    }

    /// Commits every change since [`Inventory::begin_group`] as one commit
    /// (a later write of the same path wins). On failure memory is reloaded
    /// from HEAD, so nothing of the group stays visible. `None`: nothing
    /// changed, no commit.
    pub fn commit_group(&mut self) -> Result<Option<git::Oid>, InvError> {
        let Some(g) = self.group.take() else {
            return Ok(None);
        };
        if g.changes.is_empty() {
            return Ok(None);
        }
        let mut last: BTreeMap<String, Change> = BTreeMap::new();
        for c in g.changes {
            let path = match &c {
                Change::Write(p, _) | Change::Delete(p) => p.clone(),
            };
            last.insert(path, c);
        }
        let changes: Vec<Change> = last.into_values().collect();
        let (sig, message) = group_message(&g.parts);
        match self.commit(changes, &sig, &message) {
            Ok(oid) => Ok(Some(oid)),
            Err(e) => {
                if let Err(r) = self.reload() {
                    tracing::error!(error = %r, "reloading the inventory after a failed group commit");
                }
                Err(e)
            }
        }
    }

    fn commit(
        &mut self,
        changes: Vec<Change>,
        sig: &Signature,
        message: &str,
    ) -> Result<git::Oid, InvError> {
        let changes = match &self.hlc {
            Some(h) => crate::sync::merge::stamp_changes(&self.repo, h, changes)?,
            None => changes,
        };
        Ok(self.repo.commit(&changes, sig, message)?)
    }

    /// Merges the commit `remote` (stored already, with everything it
    /// names) into HEAD by the sync rule, then reloads memory. Merging a
    /// head that is already part of HEAD changes nothing.
    pub fn merge_remote(&mut self, remote: &git::Oid, who: &str) -> Result<MergeOutcome, InvError> {
        let outcome = |me: &Self, action: &str, changed, conflicts| MergeOutcome {
            action: action.into(),
            head: me.head(),
            state: me.repo.head_tree().ok().flatten().map(|t| git::hex(&t)),
            changed,
            conflicts,
        };
        let local = self.repo.head();
        if local.as_ref() == Some(remote) {
            return Ok(outcome(self, "unchanged", 0, vec![]));
        }
        if let Some(l) = local {
            if self.repo.is_ancestor(remote, &l)? {
                return Ok(outcome(self, "unchanged", 0, vec![]));
            }
        }
        let sig = Author::new(who).signature();
        let remote_tree = self.repo.commit_info(remote)?.tree;
        let remote_files = self.repo.tree_files(&remote_tree)?;
        let merged = crate::sync::merge::merge_files(
            &self.repo,
            self.repo.files(),
            &remote_files,
            self.hlc.as_deref(),
        )?;
        let ff = match local {
            None => true,
            Some(l) => self.repo.is_ancestor(&l, remote)?,
        };
        let action = if ff && merged.files == remote_files {
            self.repo.fast_forward(remote, &sig)?;
            "fast-forward"
        } else {
            let mut msg = format!("Sync: merge {} from {who}", git::hex(remote));
            if !merged.conflicts.is_empty() {
                msg.push_str("\n\nConflicts (the losing versions are in the second parent):\n");
                for c in &merged.conflicts {
                    msg.push_str(&format!("{} {} from {}\n", c.path, c.stamp, c.node));
                }
            }
            self.repo
                .commit_merge(merged.files.clone(), remote, &sig, &msg)?;
            "merged"
        };
        self.reload()?;
        Ok(outcome(
            self,
            action,
            merged.changed.len(),
            merged.conflicts,
        ))
    }

    /// Rebuilds memory from HEAD (after a merge moved it).
    fn reload(&mut self) -> Result<(), InvError> {
        let mut repo = Repo::init(self.repo.root())?;
        repo.durable = self.repo.durable;
        let hlc = self.hlc.take();
        let sealer = self.sealer.take();
        *self = Self::load_with(repo, hlc)?;
        self.sealer = sealer;
        Ok(())
    }

    fn load_with(
        repo: Repo,
        hlc: Option<std::sync::Arc<crate::sync::merge::Hlc>>,
    ) -> Result<Self, InvError> {
        let files = repo.head_files()?;
        let mut me = Self {
            repo,
            settings: Settings::default(),
            objects: Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect(),
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
            by_host: HashMap::new(),
            load_errors: Vec::new(),
            hlc,
            sealer: None,
            group: None,
        };
        for (path, bytes) in &files {
            if path == "settings.json" {
                match serde_json::from_slice(bytes) {
                    Ok(s) => me.settings = s,
                    Err(e) => me.load_errors.push(format!("{path}: {e}")),
                }
                continue;
            }
            let Some((dir, file)) = path.split_once('/') else {
                continue;
            };
            let Some(kind) = Kind::from_plural(dir) else {
                continue;
            };
            let name = if kind.is_text() {
                Some(file)
            } else {
                file.strip_suffix(".json")
            };
            let Some(name) = name else { continue };
            match Object::from_file(kind, name, bytes) {
                Ok(obj) => {
                    me.index(&obj);
                    me.objects
                        .get_mut(&kind)
                        .expect("all kinds")
                        .insert(name.to_owned(), obj);
                }
                Err(e) => me.load_errors.push(format!("{path}: {e}")),
            }
        }
        for e in &me.load_errors {
            tracing::error!(error = %e, "inventory file ignored");
        }
        let healed = me.repo.checkout_head(&files)?;
        if healed > 0 {
            tracing::warn!(
                files = healed,
                "inventory work tree did not match HEAD; restored it"
            );
        }
        if me.repo.head().is_none() {
            let mut settings =
                serde_json::to_string_pretty(&me.settings).expect("settings serialise");
            settings.push('\n');
            me.commit(
                vec![
                    Change::Write("settings.json".into(), settings.into_bytes()),
                    Change::Write("README.md".into(), README.as_bytes().to_vec()),
                ],
                &Author::new("appliance").signature(),
                "Initialise the inventory",
            )?;
        }
        Ok(me)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the global settings.
    pub fn set_settings(&mut self, settings: Settings, author: &Author) -> Result<(), InvError> {
        settings
            .check()
            .map_err(|e| InvError::Conflict(format!("invalid settings: {e}")))?;
        if settings.default_boot == DefaultBoot::Install && settings.default_profile.is_empty() {
            return Err(InvError::Conflict(
                "default_boot \"install\" needs default_profile".into(),
            ));
        }
        if !settings.default_profile.is_empty()
            && self.get(Kind::Profile, &settings.default_profile).is_none()
        {
            return Err(InvError::NotFound {
                kind: Kind::Profile,
                name: settings.default_profile.clone(),
            });
        }
        let mut text = serde_json::to_string_pretty(&settings).expect("settings serialise");
        text.push('\n');
        self.record(
            vec![Change::Write("settings.json".into(), text.into_bytes())],
            author,
            "Edit settings",
        )?;
        self.settings = settings;
        Ok(())
    }

    /// Whether the branch moved on disk since we loaded it (an operator's
    /// `git revert`, `git commit` or `git reset` in the repository).
    pub fn moved_on_disk(&self) -> bool {
        match self.repo.read_head() {
            Ok(h) => h != self.repo.head(),
            Err(_) => false,
        }
    }

    /// The git commit HEAD names (hex).
    pub fn head(&self) -> Option<String> {
        self.repo.head().map(|h| git::hex(&h))
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Object> {
        self.objects[&kind].get(name)
    }

    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects[&kind].values()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.objects[&kind].len()
    }

    pub fn distro(&self, name: &str) -> Option<&model::Distro> {
        match self.get(Kind::Distro, name) {
            Some(Object::Distro(d)) => Some(d),
            _ => None,
        }
    }

    pub fn profile(&self, name: &str) -> Option<&model::Profile> {
        match self.get(Kind::Profile, name) {
            Some(Object::Profile(p)) => Some(p),
            _ => None,
        }
    }

    pub fn system(&self, name: &str) -> Option<&model::System> {
        match self.get(Kind::System, name) {
            Some(Object::System(s)) => Some(s),
            _ => None,
        }
    }

    pub fn image(&self, name: &str) -> Option<&model::Image> {
        match self.get(Kind::Image, name) {
            Some(Object::Image(i)) => Some(i),
            _ => None,
        }
    }

    /// A template or snippet body from the repository.
    pub fn text(&self, kind: Kind, name: &str) -> Option<&str> {
        match self.get(kind, name) {
            Some(Object::Template(t)) | Some(Object::Snippet(t)) => Some(&t.body),
            _ => None,
        }
    }

    /// The system that owns `mac` (any form).
    pub fn system_by_mac(&self, mac: &str) -> Option<&model::System> {
        let mac = model::normalize_mac(mac).ok()?;
        self.by_mac.get(&mac).and_then(|n| self.system(n))
    }

    /// The profile chain of `profile`, leaf first, ending at the profile
    /// that names the distro.
    pub fn profile_chain(&self, profile: &str) -> Vec<&model::Profile> {
        let mut out = Vec::new();
        let mut cur = self.profile(profile);
        while let Some(p) = cur {
            if out.iter().any(|q: &&model::Profile| q.name == p.name) {
                break; // Cycles are refused on write; never loop on bad data.
            }
            out.push(p);
            cur = p.parent.as_deref().and_then(|n| self.profile(n));
        }
        out
    }

    /// The distro a profile resolves to.
    pub fn profile_distro(&self, profile: &str) -> Option<&model::Distro> {
        self.profile_chain(profile)
            .last()
            .and_then(|p| p.distro.as_deref())
            .and_then(|d| self.distro(d))
    }

    fn index(&mut self, obj: &Object) {
        if let Object::System(s) = obj {
            for i in &s.interfaces {
                self.by_mac.insert(i.mac.clone(), s.name.clone());
                if !i.ip.is_empty() {
                    self.by_ip.insert(i.ip.clone(), s.name.clone());
                }
                if !i.hostname.is_empty() {
                    self.by_host
                        .insert(i.hostname.to_ascii_lowercase(), s.name.clone());
                }
            }
            if !s.hostname.is_empty() {
                self.by_host
                    .insert(s.hostname.to_ascii_lowercase(), s.name.clone());
            }
        }
    }

    fn unindex(&mut self, obj: &Object) {
        if let Object::System(s) = obj {
            let mine = |m: &mut HashMap<String, String>, k: &str| {
                if m.get(k) == Some(&s.name) {
                    m.remove(k);
                }
            };
            for i in &s.interfaces {
                mine(&mut self.by_mac, &i.mac);
                mine(&mut self.by_ip, &i.ip);
                mine(&mut self.by_host, &i.hostname.to_ascii_lowercase());
            }
            mine(&mut self.by_host, &s.hostname.to_ascii_lowercase());
        }
    }

    /// Checks `obj` against the rest of the inventory. `replacing` names the
    /// object(s) it replaces (their MACs etc. do not count as taken).
    fn check(&self, obj: &Object, replacing: &[&str]) -> Result<(), InvError> {
        let kind = obj.kind();
        let missing = |k: Kind, n: &str| InvError::NotFound {
            kind: k,
            name: n.to_owned(),
        };
        match obj {
            Object::Profile(p) => {
                if let Some(d) = &p.distro {
                    self.distro(d).ok_or_else(|| missing(Kind::Distro, d))?;
                }
                if let Some(parent) = &p.parent {
                    self.profile(parent)
                        .ok_or_else(|| missing(Kind::Profile, parent))?;
                    // Walk up from the parent; meeting ourselves is a cycle.
                    let mut seen = vec![p.name.as_str()];
                    let mut cur = Some(parent.as_str());
                    while let Some(n) = cur {
                        if seen.contains(&n) {
                            return Err(InvError::Invalid(
                                Invalid {
                                    field: "parent".into(),
                                    message: format!(
                                        "inheritance cycle: {} -> {n}",
                                        seen.join(" -> ")
                                    ),
                                },
                                kind,
                            ));
                        }
                        seen.push(n);
                        cur = self.profile(n).and_then(|q| q.parent.as_deref());
                    }
                }
                for r in &p.repos {
                    self.get(Kind::Repo, r)
                        .ok_or_else(|| missing(Kind::Repo, r))?;
                }
                if !p.autoinstall.is_empty()
                    && self.get(Kind::Template, &p.autoinstall).is_none()
                    && templates::shipped(&p.autoinstall).is_none()
                {
                    return Err(missing(Kind::Template, &p.autoinstall));
                }
            }
            Object::System(s) => {
                if let Some(p) = &s.profile {
                    self.profile(p).ok_or_else(|| missing(Kind::Profile, p))?;
                }
                if let Some(i) = &s.image {
                    self.image(i).ok_or_else(|| missing(Kind::Image, i))?;
                }
                let taken = |m: &HashMap<String, String>,
                             key: &str,
                             what: &str|
                 -> Result<(), InvError> {
                    match m.get(key) {
                        Some(owner) if owner != &s.name && !replacing.contains(&owner.as_str()) => {
                            Err(InvError::Conflict(format!(
                                "{what} {key} is already used by system {owner:?}"
                            )))
                        }
                        _ => Ok(()),
                    }
                };
                let mut mine: Vec<(&str, String)> = Vec::new();
                for i in &s.interfaces {
                    taken(&self.by_mac, &i.mac, "MAC")?;
                    mine.push(("MAC", i.mac.clone()));
                    if !i.ip.is_empty() {
                        taken(&self.by_ip, &i.ip, "IP address")?;
                        mine.push(("IP address", i.ip.clone()));
                    }
                    if !i.hostname.is_empty() {
                        taken(&self.by_host, &i.hostname.to_ascii_lowercase(), "host name")?;
                    }
                }
                if !s.hostname.is_empty() {
                    taken(&self.by_host, &s.hostname.to_ascii_lowercase(), "host name")?;
                }
                // Unique within the system too.
                let mut seen = std::collections::HashSet::new();
                for m in &mine {
                    if !seen.insert(m) {
                        return Err(InvError::Conflict(format!(
                            "{} {} appears twice in system {:?}",
                            m.0, m.1, s.name
                        )));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Objects that reference `kind`/`name`, as `kind/name` strings.
    pub fn users(&self, kind: Kind, name: &str) -> Vec<(Kind, String)> {
        let mut out = Vec::new();
        let n = Some(name.to_owned());
        for o in self.list(Kind::Profile) {
            if let Object::Profile(p) = o {
                let uses = match kind {
                    Kind::Distro => p.distro == n,
                    Kind::Profile => p.parent == n,
                    Kind::Repo => p.repos.iter().any(|r| r == name),
                    Kind::Template => p.autoinstall == name,
                    _ => false,
                };
                if uses {
                    out.push((Kind::Profile, p.name.clone()));
                }
            }
        }
        if matches!(kind, Kind::Profile | Kind::Image) {
            for o in self.list(Kind::System) {
                if let Object::System(s) = o {
                    if (kind == Kind::Profile && s.profile == n)
                        || (kind == Kind::Image && s.image == n)
                    {
                        out.push((Kind::System, s.name.clone()));
                    }
                }
            }
        }
        if kind == Kind::Profile && self.settings.default_profile == name {
            out.push((Kind::Profile, "(settings.default_profile)".into()));
        }
        out
    }

    /// Commits `changes` (kind, name, new value or removal) in one commit and
    /// applies them to memory. Validation has already happened.
    fn apply(
        &mut self,
        mut changes: Vec<(Kind, String, Option<Object>)>,
        author: &Author,
        message: &str,
    ) -> Result<(), InvError> {
        for (_, _, o) in changes.iter_mut() {
            if let Some(o) = o {
                self.seal(o)?;
            }
        }
        let git_changes: Vec<Change> = changes
            .iter()
            .map(|(k, n, o)| match o {
                Some(o) => Change::Write(k.file(n), o.to_file()),
                None => Change::Delete(k.file(n)),
            })
            .collect();
        self.record(git_changes, author, message)?;
        for (k, n, o) in changes {
            if let Some(old) = self.objects.get_mut(&k).expect("all kinds").remove(&n) {
                self.unindex(&old);
            }
            if let Some(o) = o {
                self.index(&o);
                self.objects.get_mut(&k).expect("all kinds").insert(n, o);
            }
        }
        Ok(())
    }

    /// Adds a new object.
    pub fn create(&mut self, mut obj: Object, author: &Author) -> Result<(), InvError> {
        let kind = obj.kind();
        obj.normalize_and_check().map_err(inv(kind))?;
        if self.get(kind, obj.name()).is_some() {
            return Err(InvError::Exists {
                kind,
                name: obj.name().to_owned(),
            });
        }
        self.check(&obj, &[])?;
        let name = obj.name().to_owned();
        self.apply(
            vec![(kind, name.clone(), Some(obj))],
            author,
            &format!("Add {kind} {name}"),
        )
    }

    /// Replaces an existing object (same name).
    pub fn update(&mut self, mut obj: Object, author: &Author) -> Result<(), InvError> {
        let kind = obj.kind();
        obj.normalize_and_check().map_err(inv(kind))?;
        let name = obj.name().to_owned();
        let old = self.get(kind, &name).ok_or_else(|| InvError::NotFound {
            kind,
            name: name.clone(),
        })?;
        if *old == obj {
            return Ok(()); // Nothing changed: no empty commit.
        }
        self.check(&obj, &[])?;
        self.apply(
            vec![(kind, name.clone(), Some(obj))],
            author,
            &format!("Edit {kind} {name}"),
        )
    }

    /// Merges a JSON object into an existing object (RFC 7386 merge patch).
    pub fn patch(
        &mut self,
        kind: Kind,
        name: &str,
        patch: &serde_json::Value,
        author: &Author,
    ) -> Result<Object, InvError> {
        let old = self.get(kind, name).ok_or_else(|| InvError::NotFound {
            kind,
            name: name.to_owned(),
        })?;
        let mut v = old.to_json();
        merge_patch(&mut v, patch);
        if let Some(m) = v.as_object_mut() {
            m.insert("name".into(), name.into());
        }
        let obj = Object::from_json(kind, v).map_err(inv(kind))?;
        self.update(obj, author)?;
        Ok(self.get(kind, name).cloned().expect("just updated"))
    }

    /// Merges `patch` (RFC 7386) into every system `filter` selects, in
    /// one commit: all of them or none (the first system the patch makes
    /// invalid or conflicting refuses the whole edit, named). Returns
    /// (matched, changed); systems the patch leaves as they were are not
    /// rewritten, and nothing changed makes no commit.
    pub fn patch_systems(
        &mut self,
        filter: &SystemFilter,
        patch: &serde_json::Value,
        author: &Author,
    ) -> Result<(usize, usize), InvError> {
        if !patch.is_object() {
            return Err(InvError::Conflict(
                "a bulk edit takes a JSON object (a merge patch)".into(),
            ));
        }
        if patch.get("name").is_some() {
            return Err(InvError::Conflict(
                "a bulk edit cannot change names; use rename".into(),
            ));
        }
        for (field, what) in [("profile", "profile"), ("image", "image")] {
            if let Some(n) = filter_value(filter, field) {
                let kind = if what == "profile" {
                    Kind::Profile
                } else {
                    Kind::Image
                };
                if self.get(kind, n).is_none() {
                    return Err(InvError::NotFound {
                        kind,
                        name: n.to_owned(),
                    });
                }
            }
        }
        let matched: Vec<model::System> = self
            .list(Kind::System)
            .filter_map(|o| match o {
                Object::System(s) if filter.matches(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let mut changes = Vec::new();
        let mut batch: HashMap<(&str, String), String> = HashMap::new();
        for old in &matched {
            let old_obj = Object::System(old.clone());
            let mut v = old_obj.to_json();
            merge_patch(&mut v, patch);
            if let Some(m) = v.as_object_mut() {
                m.insert("name".into(), old.name.clone().into());
            }
            let mut obj = Object::from_json(Kind::System, v).map_err(|e| {
                InvError::Invalid(
                    Invalid {
                        field: e.field,
                        message: format!("system {:?}: {}", old.name, e.message),
                    },
                    Kind::System,
                )
            })?;
            obj.normalize_and_check().map_err(|e| {
                InvError::Invalid(
                    Invalid {
                        field: e.field,
                        message: format!("system {:?}: {}", old.name, e.message),
                    },
                    Kind::System,
                )
            })?;
            if obj == old_obj {
                continue;
            }
            self.check(&obj, &[])?;
            if let Object::System(s) = &obj {
                // Unique across the edited systems too (memory does not
                // hold the earlier ones' new values yet).
                let mut keys = vec![];
                for i in &s.interfaces {
                    keys.push(("MAC", i.mac.clone()));
                    keys.push(("IP address", i.ip.clone()));
                    keys.push(("host name", i.hostname.to_ascii_lowercase()));
                }
                keys.push(("host name", s.hostname.to_ascii_lowercase()));
                for (what, key) in keys {
                    if key.is_empty() {
                        continue;
                    }
                    match batch.insert((what, key.clone()), s.name.clone()) {
                        Some(other) if other != s.name => {
                            return Err(InvError::Conflict(format!(
                                "the edit gives {what} {key} to both system {other:?} and {:?}",
                                s.name
                            )))
                        }
                        _ => {}
                    }
                }
            }
            changes.push((Kind::System, old.name.clone(), Some(obj)));
        }
        let changed = changes.len();
        if changed > 0 {
            let message = format!(
                "Bulk edit of {changed} systems ({})\n\n{}",
                filter.describe(),
                serde_json::to_string(patch).unwrap_or_default()
            );
            self.apply(changes, author, &message)?;
        }
        Ok((matched.len(), changed))
    }

    /// Removes an object; refused while others use it unless `recursive`,
    /// which removes profiles and systems below it and drops repo and
    /// template references from profiles.
    pub fn remove(
        &mut self,
        kind: Kind,
        name: &str,
        recursive: bool,
        author: &Author,
    ) -> Result<Vec<String>, InvError> {
        if self.get(kind, name).is_none() {
            return Err(InvError::NotFound {
                kind,
                name: name.to_owned(),
            });
        }
        let users = self.users(kind, name);
        if users.iter().any(|(_, n)| n.starts_with('(')) {
            return Err(InvError::InUse {
                kind,
                name: name.to_owned(),
                users: vec!["settings.default_profile".into()],
            });
        }
        if !users.is_empty() && !recursive {
            return Err(InvError::InUse {
                kind,
                name: name.to_owned(),
                users: users.iter().map(|(k, n)| format!("{k} {n}")).collect(),
            });
        }
        let mut changes: Vec<(Kind, String, Option<Object>)> = Vec::new();
        let mut removed = Vec::new();
        let mut queue = vec![(kind, name.to_owned())];
        while let Some((k, n)) = queue.pop() {
            if changes.iter().any(|(ck, cn, _)| *ck == k && *cn == n) {
                continue;
            }
            for (uk, un) in self.users(k, &n) {
                if matches!(k, Kind::Repo | Kind::Template) {
                    // Drop the reference, keep the profile.
                    if let Some(Object::Profile(p)) = self.get(uk, &un) {
                        let mut p = p.clone();
                        p.repos.retain(|r| r != &n);
                        if p.autoinstall == n {
                            p.autoinstall.clear();
                        }
                        changes.push((uk, un, Some(Object::Profile(p))));
                    }
                } else {
                    queue.push((uk, un));
                }
            }
            removed.push(format!("{k} {n}"));
            changes.push((k, n, None));
        }
        let message = if removed.len() == 1 {
            format!("Remove {kind} {name}")
        } else {
            format!("Remove {kind} {name} recursively\n\n{}", removed.join("\n"))
        };
        self.apply(changes, author, &message)?;
        Ok(removed)
    }

    /// Copies an object under a new name. A system copy has its MACs, IPs
    /// and host names cleared (they must stay unique).
    pub fn copy(
        &mut self,
        kind: Kind,
        name: &str,
        new: &str,
        author: &Author,
    ) -> Result<(), InvError> {
        let mut obj = self
            .get(kind, name)
            .cloned()
            .ok_or_else(|| InvError::NotFound {
                kind,
                name: name.to_owned(),
            })?;
        obj.set_name(new);
        if let Object::System(s) = &mut obj {
            s.hostname.clear();
            s.interfaces.clear();
        }
        obj.normalize_and_check().map_err(inv(kind))?;
        if self.get(kind, new).is_some() {
            return Err(InvError::Exists {
                kind,
                name: new.to_owned(),
            });
        }
        self.check(&obj, &[])?;
        self.apply(
            vec![(kind, new.to_owned(), Some(obj))],
            author,
            &format!("Copy {kind} {name} to {new}"),
        )
    }

    /// Renames an object and every reference to it, in one commit.
    pub fn rename(
        &mut self,
        kind: Kind,
        name: &str,
        new: &str,
        author: &Author,
    ) -> Result<(), InvError> {
        let mut obj = self
            .get(kind, name)
            .cloned()
            .ok_or_else(|| InvError::NotFound {
                kind,
                name: name.to_owned(),
            })?;
        model::check_name(new).map_err(inv(kind))?;
        if self.get(kind, new).is_some() {
            return Err(InvError::Exists {
                kind,
                name: new.to_owned(),
            });
        }
        if kind == Kind::Profile && self.settings.default_profile == name {
            return Err(InvError::InUse {
                kind,
                name: name.to_owned(),
                users: vec!["settings.default_profile".into()],
            });
        }
        obj.set_name(new);
        let mut changes = vec![
            (kind, name.to_owned(), None),
            (kind, new.to_owned(), Some(obj)),
        ];
        for (uk, un) in self.users(kind, name) {
            let mut u = self.get(uk, &un).cloned().expect("users exist");
            let n = Some(name.to_owned());
            match &mut u {
                Object::Profile(p) => {
                    if kind == Kind::Distro && p.distro == n {
                        p.distro = Some(new.to_owned());
                    }
                    if kind == Kind::Profile && p.parent == n {
                        p.parent = Some(new.to_owned());
                    }
                    if kind == Kind::Repo {
                        for r in &mut p.repos {
                            if r == name {
                                *r = new.to_owned();
                            }
                        }
                    }
                    if kind == Kind::Template && p.autoinstall == name {
                        p.autoinstall = new.to_owned();
                    }
                }
                Object::System(s) => {
                    if kind == Kind::Profile && s.profile == n {
                        s.profile = Some(new.to_owned());
                    }
                    if kind == Kind::Image && s.image == n {
                        s.image = Some(new.to_owned());
                    }
                }
                _ => {}
            }
            changes.push((uk, un, Some(u)));
        }
        self.apply(changes, author, &format!("Rename {kind} {name} to {new}"))
    }

    /// Creates or replaces many objects in one commit (bulk import).
    pub fn put_many(
        &mut self,
        objs: Vec<Object>,
        author: &Author,
        message: &str,
    ) -> Result<usize, InvError> {
        // Validate in order against a scratch copy of the indexes by applying
        // to memory tentatively is costly; instead check each object and
        // also against earlier objects of the same batch.
        let mut batch_macs: HashMap<String, String> = HashMap::new();
        let mut changes = Vec::new();
        let mut names = std::collections::HashSet::new();
        for mut obj in objs {
            let kind = obj.kind();
            obj.normalize_and_check().map_err(inv(kind))?;
            if !names.insert((kind, obj.name().to_owned())) {
                return Err(InvError::Conflict(format!(
                    "{kind} {} appears twice in the batch",
                    obj.name()
                )));
            }
            if matches!(kind, Kind::Profile) {
                // Profiles may refer to profiles earlier in the batch; check after.
            }
            self.check(&obj, &[]).or_else(|e| match (&e, kind) {
                (InvError::NotFound { .. }, _) if changes.iter().any(|(_, _, o): &(Kind, String, Option<Object>)| {
                    matches!(&e, InvError::NotFound { kind: k, name: n } if o.as_ref().is_some_and(|o| o.kind() == *k && o.name() == n))
                }) => Ok(()),
                _ => Err(e),
            })?;
            if let Object::System(s) = &obj {
                for i in &s.interfaces {
                    if let Some(other) = batch_macs.insert(i.mac.clone(), s.name.clone()) {
                        return Err(InvError::Conflict(format!(
                            "MAC {} is used by {other:?} and {:?} in the batch",
                            i.mac, s.name
                        )));
                    }
                }
            }
            changes.push((kind, obj.name().to_owned(), Some(obj)));
        }
        let n = changes.len();
        self.apply(changes, author, message)?;
        Ok(n)
    }
}

/// The author and message of a group commit: one part keeps its own;
/// several list each change with its author (the author is theirs when
/// they all share one, else `appliance`).
fn group_message(parts: &[(Author, String)]) -> (Signature, String) {
    if let [(a, m)] = parts {
        return (a.signature(), m.clone());
    }
    let first = &parts[0].0;
    let author = if parts.iter().all(|(a, _)| a.name == first.name) {
        first.clone()
    } else {
        Author::new("appliance")
    };
    let mut msg = format!("Group commit of {} changes\n\n", parts.len());
    for (a, m) in parts {
        let subject = m.lines().next().unwrap_or("");
        msg.push_str(&format!("{subject} (by {})\n", a.name));
    }
    (author.signature(), msg)
}

/// Which systems a bulk edit touches: every given field must match, and
/// `all` must be said outright to select every system.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemFilter {
    /// Systems of this profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Systems of this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Systems whose name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Systems whose netboot flag is this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netboot: Option<bool>,
    /// Select every system (needed when no other field is given).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

fn filter_value<'a>(f: &'a SystemFilter, field: &str) -> Option<&'a str> {
    match field {
        "profile" => f.profile.as_deref(),
        "image" => f.image.as_deref(),
        _ => None,
    }
}

impl SystemFilter {
    /// Refuses a filter that names nothing (use `all=true`) or says both.
    pub fn check(&self) -> Result<(), String> {
        let narrows = self.profile.is_some()
            || self.image.is_some()
            || self.prefix.is_some()
            || self.netboot.is_some();
        match (narrows, self.all) {
            (false, false) => Err(
                "a bulk edit needs a filter (profile, image, prefix, netboot) or all=true".into(),
            ),
            (true, true) => {
                Err("all=true selects every system; give it without other filters".into())
            }
            _ => Ok(()),
        }
    }

    pub fn matches(&self, s: &model::System) -> bool {
        self.profile
            .as_ref()
            .is_none_or(|p| s.profile.as_ref() == Some(p))
            && self
                .image
                .as_ref()
                .is_none_or(|i| s.image.as_ref() == Some(i))
            && self
                .prefix
                .as_ref()
                .is_none_or(|p| s.name.starts_with(p.as_str()))
            && self.netboot.is_none_or(|n| s.netboot == n)
    }

    /// The filter as a query string (`profile=p&netboot=true`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.profile {
            parts.push(format!("profile={p}"));
        }
        if let Some(i) = &self.image {
            parts.push(format!("image={i}"));
        }
        if let Some(p) = &self.prefix {
            parts.push(format!("prefix={p}"));
        }
        if let Some(n) = self.netboot {
            parts.push(format!("netboot={n}"));
        }
        if self.all {
            parts.push("all=true".into());
        }
        parts.join("&")
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    if let serde_json::Value::Object(p) = patch {
        if !target.is_object() {
            *target = serde_json::Value::Object(Default::default());
        }
        let t = target.as_object_mut().expect("just made an object");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

const README: &str = "# Appliance inventory\n\n\
This git repository is the provisioning inventory of an appliance\n\
(format `appliance.inventory.v1`). One file per object:\n\n\
- `settings.json`: global variables, kernel options, default boot action\n\
- `distros/NAME.json`, `profiles/NAME.json`, `systems/NAME.json`,\n\
  `repos/NAME.json`, `images/NAME.json`: pretty JSON, the file name is the name\n\
- `templates/NAME`, `snippets/NAME`: minijinja (Jinja2) text\n\n\
Every change the appliance makes is a commit by the API token's name.\n\
History, diff and revert work with stock git. Commits made here by hand\n\
(on the checked-out branch) are picked up by the running appliance at its\n\
next request; a file that does not parse is skipped and logged, the rest\n\
stay served. Stock `git gc` is safe: the appliance reads packs.\n";

#[cfg(test)]
pub(crate) mod tests;
