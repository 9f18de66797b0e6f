//! Where TFTP files come from: the [`TftpBackend`] trait the server asks for
//! every read request, [`DirBackend`] (files under a root directory) and
//! [`MapBackend`] (generated content held in memory, optionally per client).
//!
//! Path rules of [`DirBackend`] (see [`normalize`]): one leading `/` is
//! stripped, because PXE firmware and pxelinux often ask for `/pxelinux.0`;
//! `\` counts as a separator (Windows clients); empty and `.` components are
//! skipped. Refused with an error: names over 255 bytes, NUL, `..` anywhere,
//! a name that is still absolute after stripping one `/` (`//etc/passwd`),
//! anything that after resolving symlinks is not a regular file below the
//! canonical root. The file opened is the canonical path that was checked.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::AsyncRead;

use super::packet::{ErrorCode, MAX_NAME};

/// A file the server can send.
pub struct TftpFile {
    /// Size in bytes when known; answers the `tsize` option.
    pub size: Option<u64>,
    pub content: TftpContent,
}

/// The bytes of a [`TftpFile`]. `Bytes` and `File` allow rewinding anywhere
/// (RFC 7440 retransmits from an earlier block); `Stream` is read once, the
/// server keeps the current window buffered.
pub enum TftpContent {
    /// In memory; sent without copying into a cache.
    Bytes(Bytes),
    /// A file read with positioned reads in large chunks.
    File(Arc<File>),
    /// Anything readable, e.g. content generated while it is sent.
    Stream(Box<dyn AsyncRead + Send + Unpin>),
}

impl TftpFile {
    pub fn from_bytes(bytes: impl Into<Bytes>) -> TftpFile {
        let bytes = bytes.into();
        TftpFile {
            size: Some(bytes.len() as u64),
            content: TftpContent::Bytes(bytes),
        }
    }
}

impl std::fmt::Debug for TftpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.content {
            TftpContent::Bytes(_) => "bytes",
            TftpContent::File(_) => "file",
            TftpContent::Stream(_) => "stream",
        };
        f.debug_struct("TftpFile")
            .field("size", &self.size)
            .field("content", &kind)
            .finish()
    }
}

/// Why a backend refused or failed to open a file; each names the request.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("{path:?}: file not found")]
    NotFound { path: String },
    #[error("{path:?}: access denied: {reason}")]
    Denied { path: String, reason: &'static str },
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl TftpError {
    /// The TFTP error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            TftpError::NotFound { .. } => ErrorCode::FileNotFound,
            TftpError::Denied { .. } => ErrorCode::AccessViolation,
            TftpError::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorCode::FileNotFound,
                io::ErrorKind::PermissionDenied => ErrorCode::AccessViolation,
                _ => ErrorCode::NotDefined,
            },
        }
    }

    /// The message sent to the client: says what is wrong without leaking
    /// server paths or OS error details.
    pub fn client_message(&self) -> &'static str {
        match self.code() {
            ErrorCode::FileNotFound => "file not found",
            ErrorCode::AccessViolation => "access violation",
            _ => "read error",
        }
    }
}

/// What the server asks for every read request.
///
/// `open` is `async fn open(&self, client, path) -> Result<TftpFile, _>`
/// written out with a boxed future so the trait stays usable as
/// `Arc<dyn TftpBackend>`.
pub trait TftpBackend: Send + Sync + 'static {
    fn open<'a>(
        &'a self,
        client: SocketAddr,
        path: &'a str,
    ) -> BoxFuture<'a, Result<TftpFile, TftpError>>;
}

/// Checks a requested name and turns it into a relative path (see the
/// module docs for the rules).
pub fn normalize(path: &str) -> Result<PathBuf, TftpError> {
    let denied = |reason| TftpError::Denied {
        path: path.to_string(),
        reason,
    };
    if path.len() > MAX_NAME {
        return Err(denied("name longer than 255 bytes"));
    }
    if path.contains('\0') {
        return Err(denied("NUL in name"));
    }
    let unified = path.replace('\\', "/");
    let rel = unified.strip_prefix('/').unwrap_or(&unified);
    if rel.starts_with('/') {
        return Err(denied("absolute path"));
    }
    let mut out = PathBuf::new();
    for comp in rel.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(denied("'..' in path")),
            c => out.push(c),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(TftpError::NotFound {
            path: path.to_string(),
        });
    }
    Ok(out)
}

/// Serves regular files below a root directory.
#[derive(Debug, Clone)]
pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    /// Canonicalizes `root` once; later symlink checks compare against it.
    pub fn new(root: impl AsRef<Path>) -> io::Result<DirBackend> {
        Ok(DirBackend {
            root: root.as_ref().canonicalize()?,
        })
    }

    /// Resolves and opens `path` (blocking).
    pub fn open_blocking(&self, path: &str) -> Result<TftpFile, TftpError> {
        let rel = normalize(path)?;
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                TftpError::NotFound {
                    path: path.to_string(),
                }
            } else {
                TftpError::Io {
                    path: path.to_string(),
                    source,
                }
            }
        };
        let real = self.root.join(rel).canonicalize().map_err(io_err)?;
        if !real.starts_with(&self.root) {
            return Err(TftpError::Denied {
                path: path.to_string(),
                reason: "resolves outside the root",
            });
        }
        let file = File::open(&real).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(TftpError::Denied {
                path: path.to_string(),
                reason: "not a regular file",
            });
        }
        Ok(TftpFile {
            size: Some(meta.len()),
            content: TftpContent::File(Arc::new(file)),
        })
    }
}

impl TftpBackend for DirBackend {
    fn open<'a>(
        &'a self,
        _client: SocketAddr,
        path: &'a str,
    ) -> BoxFuture<'a, Result<TftpFile, TftpError>> {
        Box::pin(async move {
            let this = self.clone();
            let p = path.to_string();
            tokio::task::spawn_blocking(move || this.open_blocking(&p))
                .await
                .map_err(|e| TftpError::Io {
                    path: path.to_string(),
                    source: io::Error::other(e),
                })?
        })
    }
}

/// Generated files held in memory: shared ones, and ones that only one
/// client address sees (which win over shared ones of the same name).
/// Names are looked up after [`normalize`], so `/a` and `a` are the same.
#[derive(Debug, Default)]
pub struct MapBackend {
    files: RwLock<HashMap<(Option<IpAddr>, PathBuf), Bytes>>,
}

impl MapBackend {
    pub fn new() -> MapBackend {
        MapBackend::default()
    }

    /// Adds or replaces a file every client sees.
    pub fn insert(&self, name: &str, data: impl Into<Bytes>) -> Result<(), TftpError> {
        self.insert_key(None, name, data.into())
    }

    /// Adds or replaces a file only `client` sees.
    pub fn insert_for(
        &self,
        client: IpAddr,
        name: &str,
        data: impl Into<Bytes>,
    ) -> Result<(), TftpError> {
        self.insert_key(Some(client), name, data.into())
    }

    /// Removes a file; true if it was there.
    pub fn remove(&self, client: Option<IpAddr>, name: &str) -> bool {
        match normalize(name) {
            Ok(p) => self.lock_write().remove(&(client, p)).is_some(),
            Err(_) => false,
        }
    }

    fn insert_key(&self, ip: Option<IpAddr>, name: &str, data: Bytes) -> Result<(), TftpError> {
        let p = normalize(name)?;
        self.lock_write().insert((ip, p), data);
        Ok(())
    }

    fn lock_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<(Option<IpAddr>, PathBuf), Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.files.write().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, client: IpAddr, path: &str) -> Result<TftpFile, TftpError> {
        let p = normalize(path)?;
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        let key = (Some(client), p);
        let data = files
            .get(&key)
            .or_else(|| files.get(&(None, key.1.clone())));
        data.map(|d| TftpFile::from_bytes(d.clone()))
            .ok_or_else(|| TftpError::NotFound {
                path: path.to_string(),
            })
    }
}

impl TftpBackend for MapBackend {
    fn open<'a>(
        &'a self,
        client: SocketAddr,
        path: &'a str,
    ) -> BoxFuture<'a, Result<TftpFile, TftpError>> {
        Box::pin(async move { self.get(client.ip(), path) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rules() {
        assert_eq!(normalize("/pxelinux.0").unwrap(), Path::new("pxelinux.0"));
        assert_eq!(
            normalize("boot\\x86\\wdsnbp.com").unwrap(),
            Path::new("boot/x86/wdsnbp.com")
        );
        assert_eq!(normalize("a/./b//c").unwrap(), Path::new("a/b/c"));
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "//etc/passwd",
            "a\0b",
            "..\\x",
        ] {
            let e = normalize(bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::AccessViolation, "{bad:?}");
        }
        assert!(normalize(&"a".repeat(256)).is_err());
        assert_eq!(normalize("/").unwrap_err().code(), ErrorCode::FileNotFound);
    }

    #[test]
    fn dir_backend_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::fs::write(root.path().join("ok"), b"hello").unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        std::os::unix::fs::symlink("ok", root.path().join("inside-link")).unwrap();
        let b = DirBackend::new(root.path()).unwrap();
        assert_eq!(b.open_blocking("/ok").unwrap().size, Some(5));
        assert_eq!(b.open_blocking("inside-link").unwrap().size, Some(5));
        let e = b.open_blocking("link").unwrap_err();
        assert_eq!(e.code(), ErrorCode::AccessViolation);
        assert!(e.to_string().contains("outside the root"), "{e}");
        assert_eq!(
            b.open_blocking("sub").unwrap_err().code(),
            ErrorCode::AccessViolation
        );
        assert_eq!(
            b.open_blocking("missing").unwrap_err().code(),
            ErrorCode::FileNotFound
        );
    }

    #[tokio::test]
    async fn map_backend_per_client() {
        let m = MapBackend::new();
        m.insert("/boot.ipxe", "shared").unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        m.insert_for(ip, "boot.ipxe", "mine").unwrap();
        let mine = m.open("10.0.0.7:1000".parse().unwrap(), "boot.ipxe").await;
        let other = m.open("10.0.0.8:1000".parse().unwrap(), "/boot.ipxe").await;
        let get = |f: TftpFile| match f.content {
            TftpContent::Bytes(b) => b,
            _ => unreachable!(),
        };
        assert_eq!(get(mine.unwrap()), "mine");
        assert_eq!(get(other.unwrap()), "shared");
        assert!(m.remove(None, "boot.ipxe"));
        assert!(m
            .open("10.0.0.8:1000".parse().unwrap(), "boot.ipxe")
            .await
            .is_err());
    }
}
