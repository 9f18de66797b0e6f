//! Node state files (`<data>/state/…`): written whole to a temporary file
//! and renamed, so a crash leaves the old file or the new one, never half
//! of either. Files holding secrets (tokens, job tokens, the parent link)
//! are created mode 0600 before a byte is written.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Whether a state file holds a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// World-readable (0644 under the usual umask).
    Public,
    /// Owner only (0600).
    Secret,
}

/// Writes `bytes` to `path` atomically; `durable` fsyncs the file and its
/// directory.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    durable: bool,
    secrecy: Secrecy,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no directory", path.display())))?;
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let r = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secrecy == Secrecy::Secret {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        #[cfg(unix)]
        if secrecy == Secrecy::Secret {
            // A leftover temporary file keeps its old mode: set it.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}

/// Writes `value` as pretty JSON (with a final newline) atomically.
pub fn save_json<T: serde::Serialize + ?Sized>(
    path: &Path,
    value: &T,
    durable: bool,
    secrecy: Secrecy,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, durable, secrecy)
}

/// Reads a JSON state file; `None` when it does not exist.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    use anyhow::Context as _;
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_owner_only_and_writes_replace_whole_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/x.json");
        save_json(
            &p,
            &serde_json::json!({"token": "t"}),
            true,
            Secrecy::Secret,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&p, b"new", false, Secrecy::Secret).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        assert!(write_atomic(Path::new("/"), b"x", false, Secrecy::Public).is_err());
    }
}
