//! Apt partial mirrors (`repo` objects of breed `apt`) that stock apt
//! trusts with the distribution's own key.
//!
//! A sync ([`sync_mirror`]) fetches each suite's `InRelease` (and `Release`,
//! `Release.gpg` when upstream has them and they agree with it), verifies
//! the signature against the repo's keyring, fetches the indexes the mirror
//! needs (`<comp>/binary-<arch>/Packages.*`, `<comp>/i18n/Translation-en.*`
//! when listed, and with `installer` `<comp>/debian-installer/binary-<arch>/Packages.*`),
//! each checked against the signed SHA256 list, computes the dependency
//! closure ([`closure`]) and downloads those `.deb`s, each checked against
//! its index entry. Every file is kept byte for byte, content-addressed in
//! `<data>/blobs/sha256/<hex>` (so it travels with sync and bundles, and a
//! `.deb` mirrored by two repos is stored once); the mirror's layout (path
//! → digest) is a manifest blob (`appliance.apt-mirror.v1`) whose digest
//! the sync writes into the repo object's `snapshot`. Nothing is re-signed:
//! apt checks upstream's signature, upstream's index hashes and the
//! `.deb` hashes itself.
//!
//! Resumable: a file whose digest is already a blob is never fetched again,
//! and when a suite's `InRelease` is unchanged nothing but it is fetched.

pub mod api;
pub mod closure;
pub mod installer;
pub mod udeb;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use builder::Digest;
use bundle::debian::{self, Fetch, Package};
use serde::{Deserialize, Serialize};

use crate::inventory::model::Repo;

/// Schema name of a mirror manifest.
pub const MANIFEST_SCHEMA: &str = "appliance.apt-mirror.v1";
/// Debian's archive keyring, the default trust anchor.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// One file of the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// `sha256:<hex>`: the blob holding its bytes.
    pub digest: String,
    pub size: u64,
}

/// What a suite's signed `Release` said.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SuiteInfo {
    /// `Date:` of the upstream Release.
    pub date: Option<String>,
    /// Digest of the `InRelease` bytes.
    pub inrelease: String,
    pub by_hash: bool,
}

/// The mirror manifest (`appliance.apt-mirror.v1`), stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub upstream: String,
    pub suites: BTreeMap<String, SuiteInfo>,
    /// Mirror path (`dists/…`, `pool/…`) → blob.
    pub files: BTreeMap<String, FileRef>,
    /// `name_version_arch` of every mirrored package.
    pub packages: Vec<String>,
    /// Bytes of the distinct blobs the mirror uses.
    pub bytes: u64,
    /// Installer udebs the index lists but upstream did not have (404):
    /// see [`udeb`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<udeb::Missing>,
}

impl Manifest {
    pub fn from_blob(data: &Path, digest: &str) -> Result<Manifest> {
        let bytes = read_blob(data, digest)?;
        let m: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("mirror manifest {digest}"))?;
        if m.schema != MANIFEST_SCHEMA {
            bail!("mirror manifest {digest}: schema {:?}", m.schema);
        }
        Ok(m)
    }
}

/// What a sync is asked to mirror.
#[derive(Debug, Clone)]
pub struct MirrorSpec {
    pub name: String,
    pub upstream: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub arches: Vec<String>,
    pub packages: Vec<String>,
    pub installer: bool,
    pub keyring: Vec<u8>,
    /// Installs from this mirror take `Recommends`: the closure follows them.
    pub recommends: bool,
    /// Pool files downloaded at once (0: [`DEFAULT_DOWNLOADS`]).
    pub downloads: usize,
}

impl MirrorSpec {
    /// Pool files downloaded at once: `downloads`, else
    /// [`DEFAULT_DOWNLOADS`], at most [`MAX_DOWNLOADS`].
    pub fn jobs(&self) -> usize {
        match self.downloads {
            0 => DEFAULT_DOWNLOADS,
            n => n.min(MAX_DOWNLOADS),
        }
    }

    /// The spec of an inventory repo (breed `apt`); reads its keyring.
    pub fn from_repo(data: &Path, r: &Repo) -> Result<MirrorSpec> {
        if r.breed != "apt" {
            bail!(
                "repo {} has breed {:?}: only apt repos are mirrored",
                r.name,
                r.breed
            );
        }
        if r.mirror.is_empty() {
            bail!("repo {} has no mirror URL", r.name);
        }
        if r.suites.is_empty() {
            bail!("repo {} lists no suites", r.name);
        }
        let arches = if !r.arches.is_empty() {
            r.arches.clone()
        } else if !r.arch.is_empty() {
            vec![r.arch.clone()]
        } else {
            vec!["amd64".into()]
        };
        let components = if r.components.is_empty() {
            vec!["main".into()]
        } else {
            r.components.clone()
        };
        Ok(MirrorSpec {
            name: r.name.clone(),
            upstream: r.mirror.trim_end_matches('/').to_string(),
            suites: r.suites.clone(),
            components,
            arches,
            packages: r.packages.clone(),
            installer: r.installer,
            keyring: load_keyring(data, &r.keyring)?,
            recommends: r.recommends,
            downloads: r.downloads as usize,
        })
    }
}

/// The keyring a repo names: empty (Debian's), a path, `sha256:<hex>` (a
/// blob) or an armoured key block. Checked to hold at least one key.
pub fn load_keyring(data: &Path, spec: &str) -> Result<Vec<u8>> {
    let spec = spec.trim();
    let bytes = if spec.is_empty() {
        match std::fs::read(DEFAULT_KEYRING) {
            Ok(b) => b,
            Err(e) => {
                // The image carries Debian's keyring in its bundle store.
                let store = bundle::Store::open(data.join("bundle"))
                    .map_err(|_| anyhow!("no keyring given and {DEFAULT_KEYRING}: {e}"))?;
                let d = store
                    .resolve(debian::KEYRING_REF)?
                    .with_context(|| format!("no keyring given and {DEFAULT_KEYRING}: {e}"))?;
                store.read_blob(&d.digest)?
            }
        }
    } else if spec.starts_with("-----BEGIN") {
        spec.as_bytes().to_vec()
    } else if spec.starts_with("sha256:") {
        read_blob(data, spec)?
    } else {
        std::fs::read(spec).with_context(|| format!("reading keyring {spec}"))?
    };
    debian::parse_keyring(
        &bytes,
        if spec.is_empty() {
            DEFAULT_KEYRING
        } else {
            spec
        },
    )?;
    Ok(bytes)
}

fn blob_dir(data: &Path) -> PathBuf {
    data.join("blobs/sha256")
}

fn hex_of(digest: &str) -> Result<&str> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{digest:?} is not sha256:<hex>");
    }
    Ok(hex)
}

/// Where a blob lives.
pub fn blob_path(data: &Path, digest: &str) -> Result<PathBuf> {
    Ok(blob_dir(data).join(hex_of(digest)?))
}

fn read_blob(data: &Path, digest: &str) -> Result<Vec<u8>> {
    let p = blob_path(data, digest)?;
    std::fs::read(&p).with_context(|| format!("reading blob {}", p.display()))
}

/// Streams `r` into the blob store, temp file then rename, only if it is
/// `size` bytes with sha256 `expected` (either when given). Returns the
/// digest and size. `what` names the file in errors.
fn put_blob(
    data: &Path,
    mut r: impl Read,
    expected: Option<(Digest, u64)>,
    what: &str,
) -> Result<(Digest, u64)> {
    use sha2::Digest as _;
    let dir = blob_dir(data);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".apt-{}-{}.tmp",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| -> Result<(Digest, u64)> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        let limit = expected.map(|(_, s)| s);
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("downloading {what}")),
            };
            n += k as u64;
            if limit.is_some_and(|l| n > l) {
                bail!(
                    "{what}: longer than the {} bytes its index says",
                    limit.unwrap_or(0)
                );
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k])
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        let got = Digest(h.finalize().into());
        if let Some((want, size)) = expected {
            if n != size || got != want {
                bail!(
                    "{what}: hash mismatch: got {got} ({n} bytes), its signed index says {want} ({size} bytes)"
                );
            }
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        let dest = dir.join(got.hex());
        std::fs::rename(&tmp, &dest).with_context(|| format!("naming {}", dest.display()))?;
        Ok((got, n))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn has_blob(data: &Path, d: &Digest) -> bool {
    blob_dir(data).join(d.hex()).is_file()
}

/// Where a download of blob `hex` in progress is kept, so a sync killed or
/// cut off mid-file resumes it (`<data>/blobs/apt-partial/<hex>`).
fn partial_path(data: &Path, d: &Digest) -> PathBuf {
    data.join("blobs/apt-partial").join(d.hex())
}

/// Pool files (`.deb`s, udebs) a sync downloads at once unless the repo
/// says otherwise (`downloads`): enough to hide a round trip and a slow
/// file behind the others, few enough not to flood one upstream.
pub const DEFAULT_DOWNLOADS: usize = 6;
/// The most a repo may ask for.
pub const MAX_DOWNLOADS: usize = 32;

/// Runs `work` over `items` on up to `jobs` threads, handing each result
/// to `done` on the calling thread as it completes (so progress is
/// reported from one place). After the first error (from `work` or
/// `done`) no new item is started; the ones in flight finish (a partial
/// download stays resumable) and the first error is returned.
fn for_each_parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> Result<R> + Sync,
    mut done: impl FnMut(&T, R) -> Result<()>,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    if items.is_empty() {
        return Ok(());
    }
    let jobs = jobs.clamp(1, items.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<R>)>();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (tx, next, stop, work) = (tx.clone(), &next, &stop, &work);
            s.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = work(&items[i]);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut first: Option<anyhow::Error> = None;
        for (i, r) in rx {
            if let Err(e) = r.and_then(|r| done(&items[i], r)) {
                stop.store(true, Ordering::Relaxed);
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    })
}

/// How often one file's download is retried within a sync after a dropped
/// connection or a short body (each retry resumes with `Range`).
const RETRIES: u32 = 3;

/// Downloads `url` into the blob store as the blob `want` (`size` bytes),
/// resumably: bytes already received (by this sync or an earlier, killed
/// one) are kept in [`partial_path`] and the rest is asked for with
/// `Range`; a server that ignores the range restarts the file cleanly. A
/// dropped connection or short body is retried [`RETRIES`] times. The
/// whole file is checked against `want` before it is named; a mismatch
/// deletes the partial file and is an error naming `what`. Returns the
/// bytes transferred.
fn fetch_blob(
    data: &Path,
    fetcher: &dyn Fetch,
    url: &str,
    (want, size): (Digest, u64),
    what: &str,
) -> Result<u64> {
    use sha2::Digest as _;
    let part = partial_path(data, &want);
    let dir = part.parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut transferred = 0u64;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let mut held = f.metadata()?.len();
        if held > size {
            f.set_len(0)?;
            held = 0;
        }
        // The hash of what is held, then of what arrives.
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        if held > 0 {
            let mut r = std::fs::File::open(&part)?.take(held);
            loop {
                let k = r.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
            }
        }
        let mut n = held;
        let mut cut: Option<String> = None;
        if held < size {
            let (mut r, resumed) = match fetcher.get_from(url, held) {
                Ok(x) => x,
                // Nothing came at all: retry only after progress.
                Err(e) if attempt <= RETRIES && transferred > 0 => {
                    tracing::debug!(what, error = %e, "retrying");
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("downloading {what}")),
            };
            if held > 0 && !resumed {
                f.set_len(0)?;
                h = sha2::Sha256::new();
                n = 0;
            }
            loop {
                let k = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        cut = Some(e.to_string());
                        break;
                    }
                };
                if n + k as u64 > size {
                    drop(f);
                    let _ = std::fs::remove_file(&part);
                    bail!("{what}: longer than the {size} bytes its index says");
                }
                h.update(&buf[..k]);
                f.write_all(&buf[..k])
                    .with_context(|| format!("writing {}", part.display()))?;
                n += k as u64;
                transferred += k as u64;
            }
        }
        if n < size {
            let why = cut.unwrap_or_else(|| format!("got {n} of {size} bytes"));
            if attempt <= RETRIES {
                tracing::info!(what, held = n, "download cut short ({why}); resuming");
                continue;
            }
            bail!("downloading {what}: cut short after {attempt} attempts: {why}");
        }
        let got = Digest(h.finalize().into());
        if got != want {
            drop(f);
            let _ = std::fs::remove_file(&part);
            if held > 0 && attempt <= RETRIES {
                // The bytes kept from before did not belong: start over.
                continue;
            }
            bail!(
                "{what}: hash mismatch: got {got} ({n} bytes), its signed index says {want} ({size} bytes)"
            );
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", part.display()))?;
        let dest = blob_dir(data).join(want.hex());
        std::fs::create_dir_all(blob_dir(data))?;
        std::fs::rename(&part, &dest).with_context(|| format!("naming {}", dest.display()))?;
        return Ok(transferred);
    }
}

/// Removes temporary files a killed sync left in the blob store (named
/// with another process's id: only one server owns a data directory).
fn clean_stale_temps(data: &Path) {
    let me = format!(".apt-{}-", std::process::id());
    let Ok(rd) = std::fs::read_dir(blob_dir(data)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".apt-") && name.ends_with(".tmp") && !name.starts_with(&me) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Checks that every file of a snapshot is in the blob store with its
/// size, so a snapshot is published (and served) only when whole.
pub fn check_complete(data: &Path, files: &BTreeMap<String, FileRef>) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (path, f) in files {
        if !seen.insert(f.digest.as_str()) {
            continue;
        }
        let p = blob_path(data, &f.digest)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == f.size => {}
            Ok(m) => bail!(
                "{path}: blob {} holds {} bytes, the snapshot says {}",
                f.digest,
                m.len(),
                f.size
            ),
            Err(_) => bail!("{path}: blob {} is not on this node", f.digest),
        }
    }
    Ok(())
}

/// Progress of a running sync, reported through a callback.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_downloaded: u64,
    pub files_downloaded: u64,
}

/// What a finished sync did.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub snapshot: String,
    pub packages: usize,
    pub bytes: u64,
    pub files_downloaded: u64,
    pub bytes_downloaded: u64,
    pub suites: BTreeMap<String, SuiteInfo>,
}

/// The packages to mirror from one architecture's index (all suites):
/// every `Priority: required` and `important` package, the `wanted` ones,
/// and the closure of their `Depends` and `Pre-Depends`. For a group of
/// alternatives the first one already chosen wins, else the first that
/// exists as a real package, else the first provider of a virtual package
/// (`Provides`). Version constraints are not used to choose (an index is
/// one consistent suite; across suites the newest version is taken);
/// `Recommends` and `Suggests` are not followed. Names only: the caller
/// takes each name's newest version in every suite.
pub fn closure(index: &[Package], wanted: &[String]) -> Result<BTreeSet<String>> {
    let mut roots: BTreeSet<&str> = index
        .iter()
        .filter(|p| matches!(p.priority.as_deref(), Some("required" | "important")))
        .map(|p| p.name.as_str())
        .collect();
    roots.extend(wanted.iter().map(String::as_str));
    let roots: Vec<&str> = roots.into_iter().collect();
    let chosen = debian::resolve(index, &roots, true)?;
    Ok(chosen.into_iter().map(|p| p.name).collect())
}

/// The newest version of each name in `index`.
fn newest_by_name(index: &[Package]) -> HashMap<&str, &Package> {
    let mut m: HashMap<&str, &Package> = HashMap::new();
    for p in index {
        match m.get(p.name.as_str()) {
            Some(q) if debian::compare_versions(&q.version, &p.version).is_ge() => {}
            _ => {
                m.insert(&p.name, p);
            }
        }
    }
    m
}

/// The text of an index file, decompressed by its name (`.xz`, `.gz`).
pub fn decompress(path: &str, bytes: &[u8]) -> Result<String> {
    let mut r: Box<dyn Read> = if path.ends_with(".xz") {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(bytes))
    } else if path.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut s = String::new();
    r.read_to_string(&mut s)
        .with_context(|| format!("decompressing {path}"))?;
    Ok(s)
}

/// Whether `e` is the upstream not having a file (as opposed to a file
/// that failed verification, which must stop the sync).
fn is_fetch_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<debian::DebianError>(),
            Some(debian::DebianError::Fetch { .. })
        )
    })
}

fn fetch_all(f: &dyn Fetch, url: &str, max: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    f.get(url)?
        .take(max)
        .read_to_end(&mut out)
        .with_context(|| format!("fetching {url}"))?;
    Ok(out)
}

/// The signed text of a cleartext-signed `InRelease` (between the armour
/// header's blank line and the signature).
fn signed_section(text: &str) -> &str {
    let start = text.find("\n\n").map(|i| i + 2).unwrap_or(0);
    let end = text[start..]
        .find("\n-----BEGIN PGP SIGNATURE")
        .map(|i| start + i)
        .unwrap_or(text.len());
    &text[start..end]
}

/// `path → hex` of one hash field (`SHA512`, …) of a Release text.
fn hash_list(release: &str, field: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in release.lines() {
        if !line.starts_with(' ') {
            inside = line.trim_end() == format!("{field}:");
            continue;
        }
        if inside {
            if let [hex, _size, path] = line.split_whitespace().collect::<Vec<_>>()[..] {
                out.insert(path.to_string(), hex.to_ascii_lowercase());
            }
        }
    }
    out
}

/// The fetcher for `upstream`: direct for loopback hosts, through the
/// usual proxy variables otherwise.
pub fn fetcher_for(upstream: &str) -> Box<dyn Fetch> {
    let host = upstream
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    if host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]") {
        Box::new(debian::HttpFetcher::direct())
    } else {
        Box::new(debian::HttpFetcher::new())
    }
}

/// Syncs the mirror `spec` into `data`'s blob store and returns the new
/// manifest (stored as a blob; its digest is the report's `snapshot`).
/// `previous` is the last manifest, if any: unchanged suites are taken
/// from it without fetching anything but `InRelease`.
pub fn sync_mirror(
    data: &Path,
    spec: &MirrorSpec,
    previous: Option<&Manifest>,
    fetcher: &dyn Fetch,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SyncReport> {
    clean_stale_temps(data);
    let mut prog = Progress::default();
    let mut files: BTreeMap<String, FileRef> = BTreeMap::new();
    let mut suites = BTreeMap::new();
    // Per arch: every suite's packages, and per suite its own index.
    let mut per_arch: BTreeMap<String, Vec<(String, Vec<Package>)>> = BTreeMap::new();
    let mut recommends = closure::Recommends::new();
    let url = |p: &str| format!("{}/{p}", spec.upstream);

    for suite in &spec.suites {
        prog.phase = format!("{suite}: InRelease");
        progress(&prog);
        let dist = format!("dists/{suite}");
        let ir_path = format!("{dist}/InRelease");
        let ir = fetch_all(fetcher, &url(&ir_path), 64 << 20)?;
        let release = debian::verify_inrelease(&ir, &spec.keyring, &ir_path)?;
        if ![&release.suite, &release.codename]
            .iter()
            .any(|n| n.as_deref() == Some(suite.as_str()))
        {
            bail!(
                "{ir_path}: is for suite {:?} (codename {:?}), not {suite}",
                release.suite.as_deref().unwrap_or(""),
                release.codename.as_deref().unwrap_or("")
            );
        }
        let text = String::from_utf8_lossy(&ir);
        let signed = signed_section(&text);
        let by_hash = signed
            .lines()
            .any(|l| l.trim().eq_ignore_ascii_case("Acquire-By-Hash: yes"));
        // apt asks by-hash under the strongest hash listed (SHA512 when
        // there is one); content is verified by SHA256, the name is apt's.
        let sha512 = hash_list(signed, "SHA512");
        let (ir_digest, ir_size) = put_blob(data, &ir[..], None, &ir_path)?;
        prog.files_downloaded += 1;
        prog.bytes_downloaded += ir_size;
        files.insert(
            ir_path.clone(),
            FileRef {
                digest: ir_digest.to_string(),
                size: ir_size,
            },
        );
        let unchanged = previous.and_then(|m| {
            m.suites
                .get(suite)
                .filter(|s| s.inrelease == ir_digest.to_string())
        });
        // Release and Release.gpg: kept when upstream has them and the
        // Release says what the signed InRelease says.
        match unchanged {
            Some(_) => {
                let prev = previous.expect("unchanged implies previous");
                for f in ["Release", "Release.gpg"] {
                    let p = format!("{dist}/{f}");
                    if let Some(r) = prev.files.get(&p) {
                        files.insert(p, r.clone());
                    }
                }
            }
            None => {
                if let Ok(rel) = fetch_all(fetcher, &url(&format!("{dist}/Release")), 64 << 20) {
                    let same = std::str::from_utf8(&rel)
                        .ok()
                        .and_then(|t| debian::parse_release(t, "Release").ok())
                        .is_some_and(|r| r.sha256 == release.sha256 && r.date == release.date);
                    if same {
                        let (d, s) = put_blob(data, &rel[..], None, "Release")?;
                        files.insert(
                            format!("{dist}/Release"),
                            FileRef {
                                digest: d.to_string(),
                                size: s,
                            },
                        );
                        if let Ok(sig) =
                            fetch_all(fetcher, &url(&format!("{dist}/Release.gpg")), 1 << 20)
                        {
                            let (d, s) = put_blob(data, &sig[..], None, "Release.gpg")?;
                            files.insert(
                                format!("{dist}/Release.gpg"),
                                FileRef {
                                    digest: d.to_string(),
                                    size: s,
                                },
                            );
                        }
                    } else {
                        tracing::warn!(
                            suite,
                            "upstream Release differs from InRelease; serving InRelease only"
                        );
                    }
                }
            }
        }
        suites.insert(
            suite.clone(),
            SuiteInfo {
                date: release.date.clone(),
                inrelease: ir_digest.to_string(),
                by_hash,
            },
        );

        // The indexes: every compression upstream lists and has.
        let mut dirs: Vec<(String, Option<String>, &[&str])> = Vec::new();
        for comp in &spec.components {
            for arch in &spec.arches {
                dirs.push((
                    format!("{comp}/binary-{arch}"),
                    Some(arch.clone()),
                    &["Packages.xz", "Packages.gz", "Packages", "Release"],
                ));
                if spec.installer {
                    dirs.push((
                        format!("{comp}/debian-installer/binary-{arch}"),
                        None,
                        &["Packages.xz", "Packages.gz", "Packages", "Release"],
                    ));
                }
            }
            dirs.push((
                format!("{comp}/i18n"),
                None,
                &[
                    "Translation-en.xz",
                    "Translation-en.bz2",
                    "Translation-en.gz",
                    "Translation-en",
                ],
            ));
        }
        for (dir, arch, names) in dirs {
            prog.phase = format!("{suite}: {dir}");
            progress(&prog);
            let mut parsed: Option<Vec<Package>> = None;
            let mut any_listed = false;
            let mut errors = Vec::new();
            for name in names {
                let rel_path = format!("{dir}/{name}");
                let Some(&(digest, size)) = release.sha256.get(&rel_path) else {
                    continue;
                };
                any_listed = true;
                let path = format!("{dist}/{rel_path}");
                let got = if has_blob(data, &digest) {
                    Ok((digest, size))
                } else {
                    match fetch_blob(data, fetcher, &url(&path), (digest, size), &path) {
                        Ok(n) => {
                            prog.files_downloaded += 1;
                            prog.bytes_downloaded += n;
                            Ok((digest, size))
                        }
                        // Upstream lists more compressions than it has
                        // (Debian lists the uncompressed Packages); a
                        // wrong hash is an error, not a missing file.
                        Err(e) if is_fetch_error(&e) => Err(e),
                        Err(e) => return Err(e),
                    }
                };
                match got {
                    Ok((d, s)) => {
                        let fr = FileRef {
                            digest: d.to_string(),
                            size: s,
                        };
                        if by_hash {
                            files.insert(
                                format!("{dist}/{dir}/by-hash/SHA256/{}", d.hex()),
                                fr.clone(),
                            );
                            if let Some(h) = sha512.get(&rel_path) {
                                files
                                    .insert(format!("{dist}/{dir}/by-hash/SHA512/{h}"), fr.clone());
                            }
                        }
                        files.insert(path.clone(), fr);
                        if arch.is_some() && parsed.is_none() {
                            let bytes = read_blob(data, &d.to_string())?;
                            let text = decompress(&path, &bytes)?;
                            parsed = Some(debian::parse_packages(&text, &path)?);
                            if spec.recommends {
                                recommends.extend(closure::parse_recommends(&text));
                            }
                        }
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if let Some(arch) = arch {
                let pkgs = parsed.ok_or_else(|| {
                    if any_listed {
                        anyhow!(
                            "{dist}/{dir}: no Packages index could be fetched: {}",
                            errors.join("; ")
                        )
                    } else {
                        anyhow!("{dist}/InRelease lists no {dir}/Packages index")
                    }
                })?;
                per_arch
                    .entry(arch)
                    .or_default()
                    .push((suite.clone(), pkgs));
            }
        }
    }

    // The closure, per architecture over every suite, by name and
    // version; then the chosen versions, and each chosen name's newest
    // version in every suite that has it (so each suite stands alone).
    let mut debs: BTreeMap<String, (Digest, u64, String)> = BTreeMap::new();
    for (arch, per_suite) in &per_arch {
        prog.phase = format!("closure ({arch})");
        progress(&prog);
        let all: Vec<Package> = per_suite
            .iter()
            .flat_map(|(_, p)| p.iter().cloned())
            .collect();
        let mut roots: BTreeMap<String, String> = BTreeMap::new();
        for p in &all {
            if let Some(prio @ ("required" | "important")) = p.priority.as_deref() {
                roots
                    .entry(p.name.clone())
                    .or_insert_with(|| format!("priority {prio}"));
            }
        }
        for n in &spec.packages {
            roots.insert(n.clone(), format!("asked for by repo {}", spec.name));
        }
        // What the appliance's own installer needs on every target
        // (kernel, boot loaders, mkfs tools), where the index has it.
        for base in crate::osinstall::MIRROR_BASE {
            if all.iter().any(|p| p.name == *base) {
                roots
                    .entry((*base).to_owned())
                    .or_insert_with(|| "the appliance's installer".to_owned());
            }
        }
        // The installer's netboot package (its kernel and initrd are what
        // `import --repo` extracts).
        if spec.installer {
            for n in udeb::netboot_packages(&all, arch) {
                roots
                    .entry(n)
                    .or_insert_with(|| "the Debian installer's netboot package".to_owned());
            }
        }
        let roots: Vec<(String, String)> = roots.into_iter().collect();
        let chosen =
            closure::resolve_for_mirror(&all, spec.recommends.then_some(&recommends), &roots)
                .with_context(|| format!("resolving the closure for {arch}"))?;
        let names: BTreeSet<&str> = chosen.iter().map(|(n, _)| n.as_str()).collect();
        for (_, pkgs) in per_suite {
            let newest = newest_by_name(pkgs);
            for p in pkgs {
                let take = chosen.contains(&(p.name.clone(), p.version.clone()))
                    || (names.contains(p.name.as_str())
                        && newest
                            .get(p.name.as_str())
                            .is_some_and(|q| std::ptr::eq(*q, p)));
                if !take {
                    continue;
                }
                if p.filename.starts_with('/') || p.filename.split('/').any(|s| s == "..") {
                    bail!("{}: unsafe Filename {:?}", p.name, p.filename);
                }
                debs.insert(
                    p.filename.clone(),
                    (
                        p.sha256,
                        p.size,
                        format!("{}_{}_{}", p.name, p.version, p.architecture),
                    ),
                );
            }
        }
    }
    prog.files_total = debs.len() as u64;
    prog.files_done = 0;
    // What is not a blob yet, in path order, one download per digest (two
    // pool paths with the same bytes share one partial file), started in
    // that order `downloads` at once.
    let mut todo: Vec<(Digest, (&str, u64))> = Vec::new();
    let mut queued: BTreeSet<Digest> = BTreeSet::new();
    for (filename, (digest, size, _)) in &debs {
        if has_blob(data, digest) {
            prog.files_done += 1;
        } else if queued.insert(*digest) {
            todo.push((*digest, (filename.as_str(), *size)));
        }
    }
    let jobs = spec.jobs();
    prog.phase = format!("pool: {} files to fetch, {jobs} at once", todo.len());
    progress(&prog);
    for_each_parallel(
        &todo,
        jobs,
        |(digest, (filename, size))| {
            fetch_blob(data, fetcher, &url(filename), (*digest, *size), filename)
        },
        |(_, (filename, _)), n| {
            prog.files_downloaded += 1;
            prog.bytes_downloaded += n;
            prog.files_done += 1;
            prog.phase = format!("pool: {filename}");
            progress(&prog);
            Ok(())
        },
    )?;
    prog.files_done = prog.files_total;
    let mut packages = BTreeSet::new();
    for (filename, (digest, size, id)) in &debs {
        files.insert(
            filename.clone(),
            FileRef {
                digest: digest.to_string(),
                size: *size,
            },
        );
        packages.insert(id.clone());
    }
    let missing = if spec.installer {
        sync_udebs(
            data,
            spec,
            &mut files,
            &mut packages,
            fetcher,
            &mut prog,
            progress,
        )?
    } else {
        Vec::new()
    };
    let bytes: u64 = files
        .values()
        .map(|f| (f.digest.as_str(), f.size))
        .collect::<BTreeMap<&str, u64>>()
        .values()
        .sum();
    // Publish only a whole snapshot: every file it names is here.
    prog.phase = "checking".into();
    progress(&prog);
    check_complete(data, &files)?;
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA.into(),
        upstream: spec.upstream.clone(),
        suites: suites.clone(),
        files,
        packages: packages.into_iter().collect(),
        bytes,
        missing,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)?;
    let (snapshot, _) = put_blob(data, &bytes[..], None, "mirror manifest")?;
    prog.phase = "done".into();
    progress(&prog);
    Ok(SyncReport {
        snapshot: snapshot.to_string(),
        packages: manifest.packages.len(),
        bytes: manifest.bytes,
        files_downloaded: prog.files_downloaded,
        bytes_downloaded: prog.bytes_downloaded,
        suites,
    })
}

/// The installer's udebs ([`udeb::select`] over every suite's
/// `debian-installer` index already in `files`), fetched into the blob
/// store; a 404 is recorded as missing, any other failure is an error.
fn sync_udebs(
    data: &Path,
    spec: &MirrorSpec,
    files: &mut BTreeMap<String, FileRef>,
    packages: &mut BTreeSet<String>,
    fetcher: &dyn Fetch,
    prog: &mut Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<udeb::Missing>> {
    let mut wanted: BTreeMap<String, (Digest, u64, String)> = BTreeMap::new();
    for suite in &spec.suites {
        for comp in &spec.components {
            for arch in &spec.arches {
                let dir = format!("dists/{suite}/{comp}/debian-installer/binary-{arch}");
                let Some((path, f)) =
                    ["Packages.xz", "Packages.gz", "Packages"]
                        .iter()
                        .find_map(|n| {
                            let p = format!("{dir}/{n}");
                            files.get(&p).map(|f| (p, f.clone()))
                        })
                else {
                    continue;
                };
                let text = decompress(&path, &read_blob(data, &f.digest)?)?;
                let index = debian::parse_packages(&text, &path)?;
                for p in udeb::select(&index).1 {
                    if p.filename.starts_with('/') || p.filename.split('/').any(|s| s == "..") {
                        bail!("{}: unsafe Filename {:?}", p.name, p.filename);
                    }
                    wanted.insert(
                        p.filename.clone(),
                        (
                            p.sha256,
                            p.size,
                            format!("{}_{}_{}", p.name, p.version, p.architecture),
                        ),
                    );
                }
            }
        }
    }
    let mut missing = Vec::new();
    prog.files_total += wanted.len() as u64;
    let mut todo = Vec::new();
    for (filename, (digest, size, id)) in wanted {
        if has_blob(data, &digest) {
            prog.files_done += 1;
            files.insert(
                filename,
                FileRef {
                    digest: digest.to_string(),
                    size,
                },
            );
            packages.insert(id);
        } else {
            todo.push((filename, (digest, size, id)));
        }
    }
    // Fetched `downloads` at once; a 404 is `Ok(Err(reason))`.
    for_each_parallel(
        &todo,
        spec.jobs(),
        |(filename, (digest, size, _))| -> Result<std::result::Result<(Digest, u64), String>> {
            match fetcher.get(&format!("{}/{filename}", spec.upstream)) {
                Ok(r) => Ok(Ok(put_blob(data, r, Some((*digest, *size)), filename)?)),
                Err(e) if udeb::is_not_found(&e) => Ok(Err(e.to_string())),
                Err(e) => Err(e).with_context(|| format!("fetching udeb {filename}")),
            }
        },
        |(filename, (_, _, id)), got| {
            prog.files_done += 1;
            prog.phase = format!("udeb: {filename}");
            match got {
                Ok((d, s)) => {
                    prog.files_downloaded += 1;
                    prog.bytes_downloaded += s;
                    files.insert(
                        filename.clone(),
                        FileRef {
                            digest: d.to_string(),
                            size: s,
                        },
                    );
                    packages.insert(id.clone());
                }
                Err(reason) => missing.push(udeb::Missing {
                    path: filename.clone(),
                    package: id.clone(),
                    reason,
                }),
            }
            progress(prog);
            Ok(())
        },
    )?;
    missing.sort_by(|a, b| a.path.cmp(&b.path));
    if !missing.is_empty() {
        tracing::warn!(
            repo = %spec.name,
            missing = missing.len(),
            "upstream does not serve some installer udebs; the installer will stop at loading additional components"
        );
    }
    Ok(missing)
}

#[cfg(test)]
mod tests;
