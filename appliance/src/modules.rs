//! Kernel module loading from the builder's `modules.plan` (falling back
//! to `modules.list`).
//!
//! The plan ([`crate::contract::MODULES_PLAN`]) holds one module per line,
//! dependencies before dependents, four tab-separated fields:
//!
//! ```text
//! # appliance.modules.plan.v1
//! <abs path>\t<named: 0|1>\t<dep abs paths, comma-separated>\t<aliases, space-separated>
//! ```
//!
//! `named` says whether the image definition lists the module (`1`) or the
//! builder added it as a dependency (`0`); every dependency is an earlier
//! line; aliases are the module's `alias=` patterns. Blank lines and lines
//! starting with `#` are ignored.
//!
//! [`modules_to_load`] is the pure planner: a named module loads when it has
//! no device aliases ([`crate::modalias::is_device_alias`]) or one of them
//! matches a present device's modalias; a dependency loads only when
//! something that needs it does. Loading a bus driver makes new devices
//! appear (`virtio_pci` → `virtio:d00000001v…`), so [`load_for_devices`]
//! rescans and plans again until nothing new matches, and
//! [`LateDevices::watch`] keeps doing so for a while for devices that
//! appear asynchronously (USB and SCSI disks). Independent modules load on
//! parallel threads; a module starts only after all its dependencies loaded.
//!
//! The list ([`crate::contract::MODULES_LIST`]) holds one absolute path to an
//! uncompressed `.ko` per line, already in dependency order; blank lines and
//! `#` comments are ignored. Without a plan, every listed module is loaded.
//!
//! Each module is loaded with `finit_module(2)`; a module that is already
//! loaded (`EEXIST`) counts as loaded, any other failure is logged and
//! reported but never stops the boot.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::modalias::{glob_match, is_device_alias};

/// A malformed line in the modules list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("modules list line {line}: {reason}: {text:?}")]
pub struct ListError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Parses the modules list; malformed lines are returned as errors and
/// skipped, the rest keep their order.
pub fn parse_list(text: &str) -> (Vec<PathBuf>, Vec<ListError>) {
    let mut paths = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason| ListError {
            line: i + 1,
            reason,
            text: raw.to_owned(),
        };
        if !line.starts_with('/') {
            errors.push(err("not an absolute path"));
        } else if !line.ends_with(".ko") {
            errors.push(err("not an uncompressed .ko file"));
        } else {
            paths.push(PathBuf::from(line));
        }
    }
    (paths, errors)
}

/// What happened to one module.
#[derive(Debug)]
pub enum LoadOutcome {
    Loaded,
    AlreadyLoaded,
    Failed(std::io::Error),
    /// Not tried: this dependency failed (or was skipped) first.
    DependencyFailed(PathBuf),
}

/// Loads one module file with `finit_module(2)`.
pub fn load(path: &Path) -> LoadOutcome {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return LoadOutcome::Failed(e),
    };
    let params: &CStr = c"";
    match rustix::system::finit_module(&file, params, 0) {
        Ok(()) => LoadOutcome::Loaded,
        Err(rustix::io::Errno::EXIST) => LoadOutcome::AlreadyLoaded,
        Err(e) => LoadOutcome::Failed(e.into()),
    }
}

/// Reads the list at `list` and loads every module in order. Returns the
/// failures as human-readable reasons (an empty vector means all loaded). A
/// missing list is not an error: the kernel may have everything built in.
pub fn load_all(list: &Path) -> Vec<String> {
    load_list(list).failures
}

/// [`load_all`], saying what loaded.
fn load_list(list: &Path) -> Loading {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(list = %list.display(), "no modules list; loading no modules");
            return Loading::default();
        }
        Err(e) => {
            return Loading {
                failures: vec![format!("reading {}: {e}", list.display())],
                ..Loading::default()
            }
        }
    };
    let (paths, errors) = parse_list(&text);
    let mut state = Loading {
        planned: paths.len(),
        failures: errors.iter().map(ToString::to_string).collect(),
        ..Loading::default()
    };
    for e in &errors {
        tracing::error!("{e}");
    }
    for path in paths {
        match record(&path, load(&path)) {
            Some(f) => state.failures.push(f),
            None => state.loaded.push(path),
        }
    }
    tracing::info!(
        loaded = state.loaded.len(),
        listed = state.planned,
        failed = state.failures.len(),
        "modules done"
    );
    state
}

/// First line the builder writes into `modules.plan`.
pub const PLAN_HEADER: &str = "# appliance.modules.plan.v1";

/// One module of the load plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEntry {
    pub path: PathBuf,
    /// Named in the image definition (not only a dependency).
    pub named: bool,
    /// Direct dependencies, each an earlier entry's path.
    pub deps: Vec<PathBuf>,
    /// The module's `alias=` patterns.
    pub aliases: Vec<String>,
}

/// The parsed `modules.plan`, in dependency order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
}

/// A malformed line in the modules plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("modules plan line {line}: {reason}: {text:?}")]
pub struct PlanError {
    pub line: usize,
    pub reason: String,
    pub text: String,
}

/// Parses a modules plan. A malformed line is reported and skipped; a
/// dependency that is not an earlier entry is reported and dropped (the
/// module still loads, and the kernel says what it misses).
pub fn parse_plan(text: &str) -> (Plan, Vec<PlanError>) {
    let mut entries: Vec<PlanEntry> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        let mut err = |reason: String| {
            errors.push(PlanError {
                line: i + 1,
                reason,
                text: raw.to_owned(),
            })
        };
        let fields: Vec<&str> = raw.split('\t').collect();
        let [path, named, deps, aliases] = fields[..] else {
            err(format!("{} tab-separated fields, not 4", fields.len()));
            continue;
        };
        if !path.starts_with('/') || !path.ends_with(".ko") {
            err("not an absolute path to an uncompressed .ko file".into());
            continue;
        }
        let named = match named {
            "0" => false,
            "1" => true,
            _ => {
                err("named is not 0 or 1".into());
                continue;
            }
        };
        let path = PathBuf::from(path);
        if !seen.insert(path.clone()) {
            err("module listed twice".into());
            continue;
        }
        let mut dep_paths = Vec::new();
        for d in deps.split(',').filter(|d| !d.is_empty()) {
            let d = PathBuf::from(d);
            if seen.contains(&d) && d != path {
                dep_paths.push(d);
            } else {
                err(format!(
                    "dependency {} is not an earlier module",
                    d.display()
                ));
            }
        }
        entries.push(PlanEntry {
            path,
            named,
            deps: dep_paths,
            aliases: aliases
                .split(' ')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        });
    }
    (Plan { entries }, errors)
}

/// Writes a plan in the format [`parse_plan`] reads (the builder writes the
/// same bytes).
pub fn format_plan(plan: &Plan) -> String {
    let mut out = format!("{PLAN_HEADER}\n");
    for e in &plan.entries {
        let deps: Vec<String> = e.deps.iter().map(|d| d.display().to_string()).collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            e.path.display(),
            u8::from(e.named),
            deps.join(","),
            e.aliases.join(" ")
        ));
    }
    out
}

/// Whether a named module is wanted on a machine with these devices: it has
/// no device aliases, or one of them matches a present modalias.
fn wanted(entry: &PlanEntry, present: &[String]) -> bool {
    let mut device = entry
        .aliases
        .iter()
        .filter(|a| is_device_alias(a))
        .peekable();
    device.peek().is_none() || device.any(|a| present.iter().any(|m| glob_match(a, m)))
}

/// The modules to load, in load order, on a machine whose devices have the
/// modaliases `present`: every wanted named module (see [`wanted`]) and,
/// before it, what it depends on, each once.
pub fn modules_to_load(plan: &Plan, present: &[String]) -> Vec<PathBuf> {
    let index: BTreeMap<&Path, usize> = plan
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_path(), i))
        .collect();
    let mut visited = vec![false; plan.entries.len()];
    let mut out = Vec::new();
    fn visit(
        i: usize,
        plan: &Plan,
        index: &BTreeMap<&Path, usize>,
        visited: &mut [bool],
        out: &mut Vec<PathBuf>,
    ) {
        if std::mem::replace(&mut visited[i], true) {
            return;
        }
        for d in &plan.entries[i].deps {
            if let Some(&j) = index.get(d.as_path()) {
                visit(j, plan, index, visited, out);
            }
        }
        out.push(plan.entries[i].path.clone());
    }
    for (i, e) in plan.entries.iter().enumerate() {
        if e.named && wanted(e, present) {
            visit(i, plan, &index, &mut visited, &mut out);
        }
    }
    out
}

/// One module to load and the dependencies it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub path: PathBuf,
    pub deps: Vec<PathBuf>,
}

/// Loads `jobs` (in dependency order) on up to `threads` threads with
/// `load`. A job starts once every dependency that is also a job finished
/// loading; when one failed, the job is not tried
/// ([`LoadOutcome::DependencyFailed`]). Dependencies that are not jobs
/// count as loaded. Returns the outcomes in job order.
pub fn load_parallel(
    jobs: &[Job],
    threads: usize,
    load: &(dyn Fn(&Path) -> LoadOutcome + Sync),
) -> Vec<LoadOutcome> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Waiting,
        Running,
        Ok,
        Bad,
    }
    let index: BTreeMap<&Path, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.path.as_path(), i))
        .collect();
    let deps: Vec<Vec<usize>> = jobs
        .iter()
        .map(|j| {
            j.deps
                .iter()
                .filter_map(|d| index.get(d.as_path()).copied())
                .collect()
        })
        .collect();
    let state = Mutex::new((
        vec![State::Waiting; jobs.len()],
        (0..jobs.len())
            .map(|_| None)
            .collect::<Vec<Option<LoadOutcome>>>(),
    ));
    let changed = Condvar::new();
    let worker = || loop {
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        let next = loop {
            let (states, outcomes) = &mut *guard;
            let mut pending = false;
            let mut pick = None;
            for i in 0..jobs.len() {
                if states[i] != State::Waiting {
                    continue;
                }
                pending = true;
                if let Some(&bad) = deps[i].iter().find(|&&d| states[d] == State::Bad) {
                    states[i] = State::Bad;
                    outcomes[i] = Some(LoadOutcome::DependencyFailed(jobs[bad].path.clone()));
                    changed.notify_all();
                } else if deps[i].iter().all(|&d| states[d] == State::Ok) {
                    states[i] = State::Running;
                    pick = Some(i);
                    break;
                }
            }
            match pick {
                Some(i) => break Some(i),
                None if !pending => break None,
                None if states.contains(&State::Running) => {
                    guard = changed.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                // Only unreachable dependencies left (a cycle in bad input):
                // the next pass marks nothing, so stop.
                None => break None,
            }
        };
        drop(guard);
        let Some(i) = next else {
            changed.notify_all();
            return;
        };
        let outcome = load(&jobs[i].path);
        let ok = matches!(outcome, LoadOutcome::Loaded | LoadOutcome::AlreadyLoaded);
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        guard.0[i] = if ok { State::Ok } else { State::Bad };
        guard.1[i] = Some(outcome);
        changed.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 1..threads.max(1) {
            s.spawn(worker);
        }
        worker();
    });
    let (_, outcomes) = state.into_inner().unwrap_or_else(|e| e.into_inner());
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                LoadOutcome::Failed(std::io::Error::other("dependency cycle in the plan"))
            })
        })
        .collect()
}

/// How many threads load modules: the CPUs, at most 4.
pub fn load_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Upper bound on plan/load/rescan rounds at boot.
const MAX_ROUNDS: usize = 8;

/// What module loading did so far; the plan stays for [`LateDevices`].
#[derive(Debug, Default)]
pub struct Loading {
    plan: Plan,
    /// Modules tried (loaded, failed or skipped), never tried again.
    tried: BTreeSet<PathBuf>,
    /// Modules that failed or were skipped; their users are skipped.
    failed: BTreeSet<PathBuf>,
    /// Paths loaded (or already loaded), in load order.
    pub loaded: Vec<PathBuf>,
    /// Modules in the plan (or list).
    pub planned: usize,
    /// Human-readable failures, for degraded reasons.
    pub failures: Vec<String>,
}

impl Loading {
    /// Plans against `present` and loads what is new; returns how many
    /// modules it tried.
    fn round(
        &mut self,
        present: &[String],
        threads: usize,
        load: &(dyn Fn(&Path) -> LoadOutcome + Sync),
    ) -> usize {
        let deps: BTreeMap<&Path, &Vec<PathBuf>> = self
            .plan
            .entries
            .iter()
            .map(|e| (e.path.as_path(), &e.deps))
            .collect();
        let mut jobs = Vec::new();
        let mut results = Vec::new();
        for path in modules_to_load(&self.plan, present) {
            if self.tried.contains(&path) {
                continue;
            }
            let deps = deps
                .get(path.as_path())
                .map(|d| d.to_vec())
                .unwrap_or_default();
            // A dependency that failed in an earlier round fails its users
            // now (and, through `failed`, theirs).
            if let Some(bad) = deps.iter().find(|d| self.failed.contains(*d)) {
                self.failed.insert(path.clone());
                results.push((path, LoadOutcome::DependencyFailed(bad.clone())));
            } else {
                jobs.push(Job { path, deps });
            }
        }
        let outcomes = load_parallel(&jobs, threads, load);
        results.extend(jobs.into_iter().map(|j| j.path).zip(outcomes));
        let tried = results.len();
        for (path, outcome) in results {
            self.tried.insert(path.clone());
            match record(&path, outcome) {
                Some(f) => {
                    self.failures.push(f);
                    self.failed.insert(path);
                }
                None => self.loaded.push(path),
            }
        }
        tried
    }

    /// Whether a named device module is still waiting for its device.
    fn waiting(&self) -> bool {
        self.plan
            .entries
            .iter()
            .any(|e| e.named && !self.tried.contains(&e.path))
    }

    /// The module names loaded, in load order (`virtio_net`, …).
    pub fn loaded_names(&self) -> Vec<String> {
        self.loaded.iter().map(|p| module_name(p)).collect()
    }
}

/// `/lib/modules/…/virtio_net.ko` → `virtio_net`.
pub fn module_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.strip_suffix(".ko").unwrap_or(&name).to_string()
}

/// Logs one outcome; returns the failure reason if it is one.
fn record(path: &Path, outcome: LoadOutcome) -> Option<String> {
    match outcome {
        LoadOutcome::Loaded => {
            tracing::debug!(module = %path.display(), "loaded");
            None
        }
        LoadOutcome::AlreadyLoaded => {
            tracing::debug!(module = %path.display(), "already loaded");
            None
        }
        LoadOutcome::Failed(e) => {
            tracing::error!(module = %path.display(), error = %e, "loading module failed");
            Some(format!("loading module {}: {e}", path.display()))
        }
        LoadOutcome::DependencyFailed(dep) => {
            tracing::error!(module = %path.display(), dependency = %dep.display(), "not loading module: a dependency failed");
            Some(format!(
                "not loading module {}: dependency {} failed",
                path.display(),
                dep.display()
            ))
        }
    }
}

/// Boot-time loading: reads the plan at `plan_path` and loads what the
/// devices under `sys_bus` (normally `/sys/bus`) ask for, rescanning after
/// each round until nothing new matches. Without a plan it loads every
/// module in `list_path` in order (see [`load_all`]).
pub fn load_for_devices(plan_path: &Path, list_path: &Path, sys_bus: &Path) -> Loading {
    let text = match std::fs::read_to_string(plan_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(plan = %plan_path.display(), "no modules plan; loading the whole modules list");
            return load_list(list_path);
        }
        Err(e) => {
            return Loading {
                failures: vec![format!("reading {}: {e}", plan_path.display())],
                ..Loading::default()
            }
        }
    };
    let (plan, errors) = parse_plan(&text);
    let mut state = Loading {
        planned: plan.entries.len(),
        plan,
        failures: errors.iter().map(ToString::to_string).collect(),
        ..Loading::default()
    };
    for e in &errors {
        tracing::error!("{e}");
    }
    let threads = load_threads();
    for round in 1..=MAX_ROUNDS {
        let present = crate::modalias::present(sys_bus);
        let tried = state.round(&present, threads, &load);
        tracing::debug!(round, devices = present.len(), tried, "module round");
        if tried == 0 {
            break;
        }
    }
    tracing::info!(
        loaded = state.loaded.len(),
        planned = state.planned,
        failed = state.failures.len(),
        "modules done"
    );
    state
}

/// Loading for devices that appear after boot-time loading (USB and SCSI
/// disks are found asynchronously after their host driver loaded).
pub struct LateDevices {
    state: Loading,
}

impl LateDevices {
    /// `None` when no named module is left that a device could still ask
    /// for.
    pub fn new(state: Loading) -> Option<LateDevices> {
        state.waiting().then_some(LateDevices { state })
    }

    /// Rescans `sys_bus` every `every` until `for_` has passed, loading
    /// what new devices ask for; `failed` gets each failure reason.
    pub fn watch(mut self, sys_bus: &Path, every: Duration, for_: Duration, failed: &dyn Fn(&str)) {
        let end = Instant::now() + for_;
        let mut last = Vec::new();
        while Instant::now() < end && self.state.waiting() {
            std::thread::sleep(every);
            let present = crate::modalias::present(sys_bus);
            if present == last {
                continue;
            }
            let before = (self.state.loaded.len(), self.state.failures.len());
            self.state.round(&present, load_threads(), &load);
            for f in &self.state.failures[before.1..] {
                failed(f);
            }
            for p in &self.state.loaded[before.0..] {
                tracing::info!(module = %module_name(p), "loaded for a late device");
            }
            last = present;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_order_and_skips_comments() {
        let (paths, errors) = parse_list(
            "# generated\n/lib/modules/6.1/kernel/virtio.ko\n\n  \
             /lib/modules/6.1/kernel/virtio_ring.ko  # dep\n/lib/x/virtio_net.ko\n",
        );
        assert!(errors.is_empty());
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/lib/modules/6.1/kernel/virtio.ko"),
                PathBuf::from("/lib/modules/6.1/kernel/virtio_ring.ko"),
                PathBuf::from("/lib/x/virtio_net.ko"),
            ]
        );
    }

    #[test]
    fn list_rejects_relative_and_compressed() {
        let (paths, errors) = parse_list("virtio.ko\n/a/b.ko.xz\n/a/ok.ko\n");
        assert_eq!(paths, vec![PathBuf::from("/a/ok.ko")]);
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].line, 1);
        assert_eq!(
            errors[1].to_string(),
            "modules list line 2: not an uncompressed .ko file: \"/a/b.ko.xz\""
        );
    }

    #[test]
    fn missing_list_is_fine_and_bad_module_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_all(&dir.path().join("none")).is_empty());
        let list = dir.path().join("modules.list");
        std::fs::write(&list, format!("{}/missing.ko\n", dir.path().display())).unwrap();
        let failures = load_all(&list);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("missing.ko"), "{failures:?}");
    }

    const VIRTIO_NET_PCI: &str = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00";
    const VIRTIO_BLK_PCI: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";
    const E1000E_PCI: &str = "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00";

    /// A plan shaped like the appliance's: virtio, two NICs, a filesystem.
    fn synthetic_plan() -> Plan {
        let text = "# appliance.modules.plan.v1\n\
            /m/virtio_pci_modern_dev.ko\t0\t\t\n\
            /m/virtio_pci_legacy_dev.ko\t0\t\t\n\
            /m/virtio_pci.ko\t1\t/m/virtio_pci_modern_dev.ko,/m/virtio_pci_legacy_dev.ko\tpci:v00001AF4d*sv*sd*bc*sc*i*\n\
            /m/failover.ko\t0\t\t\n\
            /m/net_failover.ko\t0\t/m/failover.ko\t\n\
            /m/virtio_net.ko\t1\t/m/net_failover.ko\tvirtio:d00000001v*\n\
            /m/virtio_blk.ko\t1\t\tvirtio:d00000002v*\n\
            /m/e1000e.ko\t1\t\tpci:v00008086d000010D3sv*sd*bc*sc*i* pci:v00008086d000010D4sv*sd*bc*sc*i*\n\
            /m/mdio.ko\t0\t\t\n\
            /m/mlx5_core.ko\t1\t/m/mdio.ko\tpci:v000015B3d00001017sv*sd*bc*sc*i* auxiliary:mlx5_core.eth\n\
            /m/crc16.ko\t0\t\t\n\
            /m/ext4.ko\t1\t/m/crc16.ko\tfs-ext4 ext3 fs-ext3\n\
            /m/nls_utf8.ko\t1\t\t\n";
        let (plan, errors) = parse_plan(text);
        assert!(errors.is_empty(), "{errors:?}");
        plan
    }

    fn names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn plan_round_trips() {
        let plan = synthetic_plan();
        let text = format_plan(&plan);
        assert!(text.starts_with(PLAN_HEADER));
        let (again, errors) = parse_plan(&text);
        assert!(errors.is_empty());
        assert_eq!(again, plan);
        assert_eq!(format_plan(&again), text);
        assert_eq!(plan.entries[2].deps.len(), 2);
        assert_eq!(plan.entries[9].aliases.len(), 2);
    }

    #[test]
    fn plan_reports_bad_lines_and_keeps_the_rest() {
        let (plan, errors) = parse_plan(
            "/m/a.ko\t1\t\t\n\
             /m/b.ko\t1\n\
             m/c.ko\t1\t\t\n\
             /m/d.ko\tyes\t\t\n\
             /m/e.ko\t0\t/m/a.ko,/m/later.ko\tfs-e\n\
             /m/a.ko\t0\t\t\n\
             /m/later.ko\t0\t\t\n",
        );
        let reasons: Vec<(usize, &str)> =
            errors.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (2, "2 tab-separated fields, not 4"),
                (3, "not an absolute path to an uncompressed .ko file"),
                (4, "named is not 0 or 1"),
                (5, "dependency /m/later.ko is not an earlier module"),
                (6, "module listed twice"),
            ]
        );
        assert_eq!(
            names(
                &plan
                    .entries
                    .iter()
                    .map(|e| e.path.clone())
                    .collect::<Vec<_>>()
            ),
            ["a", "e", "later"]
        );
        assert_eq!(plan.entries[1].deps, [PathBuf::from("/m/a.ko")]);
    }

    #[test]
    fn virtio_vm_loads_virtio_and_function_modules_only() {
        let plan = synthetic_plan();
        // Before virtio_pci: only the PCI functions are visible.
        let first = modules_to_load(&plan, &[VIRTIO_NET_PCI.into(), VIRTIO_BLK_PCI.into()]);
        assert_eq!(
            names(&first),
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "crc16",
                "ext4",
                "nls_utf8"
            ]
        );
        // After: the virtio devices appear.
        let second = modules_to_load(
            &plan,
            &[
                VIRTIO_NET_PCI.into(),
                VIRTIO_BLK_PCI.into(),
                "virtio:d00000001v00001AF4".into(),
                "virtio:d00000002v00001AF4".into(),
            ],
        );
        assert_eq!(
            names(&second),
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk",
                "crc16",
                "ext4",
                "nls_utf8"
            ]
        );
    }

    #[test]
    fn e1000e_machine_loads_e1000e_not_virtio_or_mlx5() {
        let plan = synthetic_plan();
        let got = modules_to_load(
            &plan,
            &[
                E1000E_PCI.into(),
                "acpi:PNP0A08:PNP0A03:".into(),
                "cpu:type:x86,ven0000fam0006mod003F:feature:,0000".into(),
            ],
        );
        assert_eq!(names(&got), ["e1000e", "crc16", "ext4", "nls_utf8"]);
        // No devices at all: only modules without device aliases.
        assert_eq!(
            names(&modules_to_load(&plan, &[])),
            ["crc16", "ext4", "nls_utf8"]
        );
    }

    #[test]
    fn dependencies_come_first_even_when_the_file_order_does_not_say_so() {
        let plan = Plan {
            entries: vec![
                PlanEntry {
                    path: "/m/user.ko".into(),
                    named: true,
                    deps: vec!["/m/dep.ko".into()],
                    aliases: vec![],
                },
                PlanEntry {
                    path: "/m/dep.ko".into(),
                    named: true,
                    deps: vec![],
                    aliases: vec![],
                },
            ],
        };
        assert_eq!(names(&modules_to_load(&plan, &[])), ["dep", "user"]);
    }

    fn jobs_of(plan: &Plan, present: &[String]) -> Vec<Job> {
        modules_to_load(plan, present)
            .into_iter()
            .map(|p| Job {
                deps: plan
                    .entries
                    .iter()
                    .find(|e| e.path == p)
                    .unwrap()
                    .deps
                    .clone(),
                path: p,
            })
            .collect()
    }

    #[test]
    fn parallel_loading_keeps_dependency_order() {
        let plan = synthetic_plan();
        let present: Vec<String> = vec![
            VIRTIO_NET_PCI.into(),
            "virtio:d00000001v00001AF4".into(),
            "virtio:d00000002v00001AF4".into(),
        ];
        let jobs = jobs_of(&plan, &present);
        for threads in [1, 2, 4] {
            let order = Mutex::new(Vec::new());
            let outcomes = load_parallel(&jobs, threads, &|p: &Path| {
                std::thread::sleep(Duration::from_millis(2));
                order.lock().unwrap().push(p.to_path_buf());
                LoadOutcome::Loaded
            });
            assert!(outcomes.iter().all(|o| matches!(o, LoadOutcome::Loaded)));
            let order = order.into_inner().unwrap();
            assert_eq!(order.len(), jobs.len());
            let at = |p: &Path| order.iter().position(|o| o == p).unwrap();
            for j in &jobs {
                for d in &j.deps {
                    assert!(at(d) < at(&j.path), "{threads} threads: {order:?}");
                }
            }
        }
    }

    #[test]
    fn a_failed_dependency_skips_its_users_and_nothing_else() {
        let plan = synthetic_plan();
        let present: Vec<String> = vec![
            "virtio:d00000001v00001AF4".into(),
            "virtio:d00000002v00001AF4".into(),
        ];
        let jobs = jobs_of(&plan, &present);
        let outcomes = load_parallel(&jobs, 2, &|p: &Path| {
            if p.ends_with("failover.ko") {
                LoadOutcome::Failed(std::io::Error::other("boom"))
            } else {
                LoadOutcome::Loaded
            }
        });
        let got: Vec<(String, &str)> = jobs
            .iter()
            .zip(&outcomes)
            .map(|(j, o)| {
                let what = match o {
                    LoadOutcome::Loaded => "loaded",
                    LoadOutcome::AlreadyLoaded => "already",
                    LoadOutcome::Failed(_) => "failed",
                    LoadOutcome::DependencyFailed(_) => "skipped",
                };
                (module_name(&j.path), what)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("failover".into(), "failed"),
                ("net_failover".into(), "skipped"),
                ("virtio_net".into(), "skipped"),
                ("virtio_blk".into(), "loaded"),
                ("crc16".into(), "loaded"),
                ("ext4".into(), "loaded"),
                ("nls_utf8".into(), "loaded"),
            ]
        );
    }

    #[test]
    fn rounds_load_new_devices_once_and_remember_failures() {
        let mut state = Loading {
            plan: synthetic_plan(),
            ..Loading::default()
        };
        let fail_failover = |p: &Path| {
            if p.ends_with("failover.ko") {
                LoadOutcome::Failed(std::io::Error::other("boom"))
            } else {
                LoadOutcome::Loaded
            }
        };
        assert_eq!(state.round(&[VIRTIO_NET_PCI.into()], 2, &fail_failover), 6);
        assert_eq!(state.round(&[VIRTIO_NET_PCI.into()], 2, &fail_failover), 0);
        let more: Vec<String> = vec![VIRTIO_NET_PCI.into(), "virtio:d00000001v00001AF4".into()];
        // failover fails now; net_failover and virtio_net are skipped.
        assert_eq!(state.round(&more, 2, &fail_failover), 3);
        assert_eq!(state.failures.len(), 3, "{:?}", state.failures);
        assert_eq!(
            state.loaded_names(),
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "crc16",
                "ext4",
                "nls_utf8"
            ]
        );
        assert!(
            state.waiting(),
            "virtio_blk, e1000e and mlx5_core have no device yet"
        );
    }

    #[test]
    fn missing_plan_falls_back_to_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules.list");
        std::fs::write(&list, format!("{}/missing.ko\n", dir.path().display())).unwrap();
        let state = load_for_devices(&dir.path().join("modules.plan"), &list, dir.path());
        assert_eq!(state.planned, 1);
        assert!(state.loaded.is_empty());
        assert_eq!(state.failures.len(), 1);
        assert!(LateDevices::new(state).is_none());
    }

    #[test]
    fn plan_with_a_missing_module_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("modules.plan");
        std::fs::write(
            &plan,
            format!(
                "{PLAN_HEADER}\n{}/gone.ko\t1\t\tfs-gone\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let state = load_for_devices(&plan, &dir.path().join("modules.list"), dir.path());
        assert_eq!(state.planned, 1);
        assert_eq!(state.failures.len(), 1);
        assert!(
            state.failures[0].contains("gone.ko"),
            "{:?}",
            state.failures
        );
    }
}
