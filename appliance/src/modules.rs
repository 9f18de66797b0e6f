//! Kernel module loading from the builder's `modules.list`.
//!
//! The list ([`crate::contract::MODULES_LIST`]) holds one absolute path to an
//! uncompressed `.ko` per line, already in dependency order; blank lines and
//! `#` comments are ignored. Each module is loaded with `finit_module(2)`; a
//! module that is already loaded (`EEXIST`) counts as loaded, any other
//! failure is logged and reported but never stops the boot.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

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
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(list = %list.display(), "no modules list; loading no modules");
            return Vec::new();
        }
        Err(e) => return vec![format!("reading {}: {e}", list.display())],
    };
    let (paths, errors) = parse_list(&text);
    let mut failures: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for e in &errors {
        tracing::error!("{e}");
    }
    let mut loaded = 0;
    for path in &paths {
        match load(path) {
            LoadOutcome::Loaded => {
                loaded += 1;
                tracing::debug!(module = %path.display(), "loaded");
            }
            LoadOutcome::AlreadyLoaded => {
                tracing::debug!(module = %path.display(), "already loaded");
            }
            LoadOutcome::Failed(e) => {
                tracing::error!(module = %path.display(), error = %e, "loading module failed");
                failures.push(format!("loading module {}: {e}", path.display()));
            }
        }
    }
    tracing::info!(
        loaded,
        listed = paths.len(),
        failed = failures.len(),
        "modules done"
    );
    failures
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
}
