//! A Debian archive client that fills the [`Store`]: signed `InRelease`,
//! `Packages` indexes, dependency resolution and verified `.deb` downloads.
//!
//! Trust flows from the keyring: `InRelease` must carry a valid OpenPGP
//! signature from a key in it; only the signed text is parsed, and its SHA256
//! list pins the `Packages` index, whose entries pin every `.deb`. Each
//! download streams through [`Store::put_verified`], so wrong bytes are never
//! stored.
//!
//! Everything fetched is kept so the next build is offline: the verified
//! `InRelease` and the compressed `Packages` are stored as blobs and named by
//! refs (`debian/<suite>/InRelease`, `debian/<suite>/<component>/binary-<arch>/Packages`,
//! and `debian/keyring` for the keyring). With [`Refresh::IfMissing`] or
//! [`Refresh::Never`] a stored `InRelease` is re-verified and used without
//! touching the network, and a blob already in the store (the `.deb`'s
//! sha256 from `Packages` *is* its blob digest) is never downloaded again.
//! `Valid-Until` is deliberately not enforced: an air-gapped rebuild must
//! work with the snapshot it carries.
//!
//! The network is behind the small [`Fetch`] trait so tests can serve a fake
//! archive from loopback.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, IsTerminal, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use builder::Digest;
use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey};

use crate::store::{Descriptor, Store, StoreError};

/// Media type of a stored `InRelease`.
pub const INRELEASE_MEDIA_TYPE: &str = "text/plain";
/// Media type of a stored `.deb`.
pub const DEB_MEDIA_TYPE: &str = "application/vnd.debian.binary-package";
/// Media type of a stored OpenPGP keyring.
pub const KEYRING_MEDIA_TYPE: &str = "application/pgp-keys";
/// Ref naming the keyring the archive is verified against.
pub const KEYRING_REF: &str = "debian/keyring";
/// Largest `InRelease` accepted.
const MAX_INRELEASE: u64 = 64 << 20;

/// What went wrong talking to a Debian archive.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error("fetching {url}: {detail}")]
    Fetch { url: String, detail: String },
    #[error("{what}: bad OpenPGP signature: {detail}")]
    BadSignature { what: String, detail: String },
    #[error("keyring {what}: {detail}")]
    BadKeyring { what: String, detail: String },
    #[error("{what}: is for suite {found:?}, expected {expected:?}")]
    SuiteMismatch {
        what: String,
        found: String,
        expected: String,
    },
    #[error("{what}: malformed: {detail}")]
    Malformed { what: String, detail: String },
    #[error("Release for {suite} lists none of {candidates:?}")]
    NotInRelease {
        suite: String,
        candidates: Vec<String>,
    },
    #[error("offline: no stored {what} (ref {reference}); fetch once with network first")]
    NotCached { what: String, reference: String },
    #[error("{what}: {source}")]
    Store { what: String, source: StoreError },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("unknown package {0:?}")]
    UnknownPackage(String),
    #[error("package {name:?} has no version {version:?} (available: {available:?})")]
    UnknownVersion {
        name: String,
        version: String,
        available: Vec<String>,
    },
    #[error("{package}: no package satisfies dependency {dependency:?}")]
    Unsatisfiable { package: String, dependency: String },
}

/// The raw transport: an HTTP GET returning the body as a stream.
pub trait Fetch: Send + Sync {
    /// Start fetching `url`; a non-success status is an error.
    fn get(&self, url: &str) -> Result<Box<dyn Read + Send>, DebianError>;

    /// Fetch `url` from byte `offset` on (an HTTP `Range` request). Returns
    /// the body and whether it starts at `offset` (`false`: the whole file,
    /// from byte 0, because the server ignored the range). The default
    /// always fetches the whole file.
    fn get_from(
        &self,
        url: &str,
        offset: u64,
    ) -> Result<(Box<dyn Read + Send>, bool), DebianError> {
        let _ = offset;
        Ok((self.get(url)?, false))
    }
}

/// Plain HTTP through `ureq`, honouring the usual proxy variables.
pub struct HttpFetcher {
    agent: ureq::Agent,
}

impl HttpFetcher {
    pub fn new() -> HttpFetcher {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .build();
        HttpFetcher {
            agent: config.into(),
        }
    }

    /// A fetcher that ignores proxy settings (for loopback servers).
    pub fn direct() -> HttpFetcher {
        let config = ureq::Agent::config_builder()
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_body(Some(Duration::from_secs(30)))
            .build();
        HttpFetcher {
            agent: config.into(),
        }
    }
}

impl Default for HttpFetcher {
    fn default() -> Self {
        HttpFetcher::new()
    }
}

impl Fetch for HttpFetcher {
    fn get(&self, url: &str) -> Result<Box<dyn Read + Send>, DebianError> {
        let resp = self.agent.get(url).call().map_err(|e| DebianError::Fetch {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
        Ok(Box::new(resp.into_body().into_reader()))
    }

    fn get_from(
        &self,
        url: &str,
        offset: u64,
    ) -> Result<(Box<dyn Read + Send>, bool), DebianError> {
        if offset == 0 {
            return Ok((self.get(url)?, false));
        }
        let resp = self
            .agent
            .get(url)
            .header("Range", &format!("bytes={offset}-"))
            .call()
            .map_err(|e| DebianError::Fetch {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        let resumed = resp.status().as_u16() == 206;
        if resumed {
            // A 206 must start where we asked, or the bytes do not fit.
            let start = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if start != Some(offset) {
                return Err(DebianError::Fetch {
                    url: url.to_string(),
                    detail: format!(
                        "asked for bytes from {offset}, got Content-Range starting at {start:?}"
                    ),
                });
            }
        }
        Ok((Box::new(resp.into_body().into_reader()), resumed))
    }
}

/// When to fetch `InRelease` rather than use the stored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Use the stored `InRelease` if there is one; fetch otherwise.
    IfMissing,
    /// Always fetch a fresh `InRelease`.
    Always,
    /// Never use the network: everything must already be in the store.
    Never,
}

/// The parsed, signature-checked `Release` fields of an `InRelease`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub date: Option<String>,
    /// Index files by path relative to `dists/<suite>/`: digest and size.
    pub sha256: BTreeMap<String, (Digest, u64)>,
    /// Digest of the `InRelease` file this came from.
    pub inrelease: Digest,
}

/// One dependency alternative: `name (op version)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    pub name: String,
    /// The version constraint as written, e.g. `>= 2.34`; not enforced by
    /// [`resolve`].
    pub constraint: Option<String>,
}

/// One stanza of a `Packages` index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Path relative to the archive root.
    pub filename: String,
    pub size: u64,
    /// The `.deb`'s sha256, which is also its blob digest in the store.
    pub sha256: Digest,
    /// Groups of alternatives (`a | b, c`).
    pub depends: Vec<Vec<Dep>>,
    pub pre_depends: Vec<Vec<Dep>>,
    /// Virtual package names this package provides (versions dropped).
    pub provides: Vec<String>,
    pub section: Option<String>,
    pub priority: Option<String>,
    /// The first line of the description.
    pub description: Option<String>,
}

/// A Debian archive (`<base_url>/dists/<suite>/...`) and the keyring that signs it.
pub struct Archive {
    pub base_url: String,
    pub suite: String,
    pub keyring: Vec<u8>,
    fetcher: Box<dyn Fetch>,
}

/// Read the keyring from the store (ref `debian/keyring`) or, on first use,
/// from `host_path`, storing it and recording the ref.
pub fn load_keyring(store: &Store, host_path: &Path) -> Result<Vec<u8>, DebianError> {
    let what = |e| DebianError::Store {
        what: format!("keyring {}", host_path.display()),
        source: e,
    };
    if let Some(d) = store.resolve(KEYRING_REF).map_err(what)? {
        return store.read_blob(&d.digest).map_err(what);
    }
    let bytes = std::fs::read(host_path).map_err(|source| DebianError::Io {
        what: format!("reading keyring {}", host_path.display()),
        source,
    })?;
    parse_keyring(&bytes, &host_path.display().to_string())?;
    let (digest, size) = store.put_bytes(&bytes).map_err(what)?;
    store
        .set_ref(
            KEYRING_REF,
            Descriptor {
                media_type: KEYRING_MEDIA_TYPE.into(),
                digest,
                size,
            },
        )
        .map_err(what)?;
    Ok(bytes)
}

/// Parse an OpenPGP keyring, binary (`.gpg`) or ASCII-armoured (`.asc`).
pub fn parse_keyring(bytes: &[u8], what: &str) -> Result<Vec<SignedPublicKey>, DebianError> {
    let bad = |detail: String| DebianError::BadKeyring {
        what: what.to_string(),
        detail,
    };
    let keys: Result<Vec<SignedPublicKey>, _> = if bytes.starts_with(b"-----BEGIN") {
        SignedPublicKey::from_armor_many(bytes)
            .map_err(|e| bad(e.to_string()))?
            .0
            .collect()
    } else {
        SignedPublicKey::from_bytes_many(bytes)
            .map_err(|e| bad(e.to_string()))?
            .collect()
    };
    let keys = keys.map_err(|e| bad(e.to_string()))?;
    if keys.is_empty() {
        return Err(bad("no public keys".into()));
    }
    Ok(keys)
}

/// Check `inrelease`'s cleartext signature against `keyring` and parse the
/// signed `Release` fields. `what` names the file in errors.
pub fn verify_inrelease(
    inrelease: &[u8],
    keyring: &[u8],
    what: &str,
) -> Result<Release, DebianError> {
    let bad_sig = |detail: String| DebianError::BadSignature {
        what: what.to_string(),
        detail,
    };
    let keys = parse_keyring(keyring, "for InRelease")?;
    let text = std::str::from_utf8(inrelease).map_err(|e| bad_sig(format!("not UTF-8: {e}")))?;
    let (msg, _) = CleartextSignedMessage::from_string(text).map_err(|e| bad_sig(e.to_string()))?;
    let ok = keys
        .iter()
        .any(|k| msg.verify(k).is_ok() || k.public_subkeys.iter().any(|sk| msg.verify(sk).is_ok()));
    if !ok {
        return Err(bad_sig(format!(
            "no signature verifies against any of the {} keys in the keyring",
            keys.len()
        )));
    }
    let signed = msg.signed_text().replace("\r\n", "\n");
    let mut release = parse_release(&signed, what)?;
    release.inrelease = Digest::of(inrelease);
    Ok(release)
}

/// Split a deb822 document into stanzas of (field, value) pairs; continuation
/// lines are joined to their field's value with `\n`.
pub fn parse_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(last) = cur.last_mut() {
                last.1.push('\n');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parse the fields of a (signed) `Release` text.
pub fn parse_release(text: &str, what: &str) -> Result<Release, DebianError> {
    let bad = |detail: String| DebianError::Malformed {
        what: what.to_string(),
        detail,
    };
    let stanza = parse_stanzas(text)
        .into_iter()
        .next()
        .ok_or_else(|| bad("empty".into()))?;
    let get = |k: &str| {
        stanza
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let mut sha256 = BTreeMap::new();
    for line in get("SHA256").unwrap_or_default().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let [hex, size, path] = f[..] else {
            return Err(bad(format!("bad SHA256 line {line:?}")));
        };
        let digest: Digest = format!("sha256:{hex}")
            .parse()
            .map_err(|e| bad(format!("{e}")))?;
        let size: u64 = size
            .parse()
            .map_err(|_| bad(format!("bad size in {line:?}")))?;
        sha256.insert(path.to_string(), (digest, size));
    }
    if sha256.is_empty() {
        return Err(bad("no SHA256 field".into()));
    }
    Ok(Release {
        suite: get("Suite"),
        codename: get("Codename"),
        date: get("Date"),
        sha256,
        inrelease: Digest::of(text.as_bytes()),
    })
}

/// Parses a dependency field (`a (>= 1) | b, c`) into groups of
/// alternatives.
pub fn parse_deps(v: &str) -> Vec<Vec<Dep>> {
    v.split(',')
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let alt = alt.trim();
                    // The version constraint is inside `(…)`; `[arch]` and
                    // `<profile>` restrictions follow it (a `<` inside the
                    // parentheses is the `<<`/`<=` operator, kept).
                    let (name, constraint) = match alt.split_once('(') {
                        Some((n, c)) => (n, Some(c.split(')').next().unwrap_or("").trim())),
                        None => (alt, None),
                    };
                    let name = name.split(['[', '<']).next().unwrap_or("").trim();
                    let name = name.split(':').next().unwrap_or("").trim();
                    (!name.is_empty()).then(|| Dep {
                        name: name.to_string(),
                        constraint: constraint.map(str::to_string),
                    })
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// Parse a (decompressed) `Packages` index.
pub fn parse_packages(text: &str, what: &str) -> Result<Vec<Package>, DebianError> {
    let mut out = Vec::new();
    for stanza in parse_stanzas(text) {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let name = get("Package").unwrap_or("?").to_string();
        let bad = |detail: String| DebianError::Malformed {
            what: format!("{what}: package {name}"),
            detail,
        };
        let need = |k: &str| get(k).ok_or_else(|| bad(format!("no {k} field")));
        let sha256 = format!("sha256:{}", need("SHA256")?)
            .parse()
            .map_err(|e| bad(format!("{e}")))?;
        let size = need("Size")?.parse().map_err(|_| bad("bad Size".into()))?;
        out.push(Package {
            name: need("Package")?.to_string(),
            version: need("Version")?.to_string(),
            architecture: need("Architecture")?.to_string(),
            filename: need("Filename")?.to_string(),
            size,
            sha256,
            depends: get("Depends").map(parse_deps).unwrap_or_default(),
            pre_depends: get("Pre-Depends").map(parse_deps).unwrap_or_default(),
            provides: get("Provides")
                .map(|v| {
                    parse_deps(v)
                        .into_iter()
                        .flatten()
                        .map(|d| d.name)
                        .collect()
                })
                .unwrap_or_default(),
            section: get("Section").map(str::to_string),
            priority: get("Priority").map(str::to_string),
            description: get("Description").map(|d| d.lines().next().unwrap_or("").to_string()),
        });
    }
    Ok(out)
}

/// Compare two Debian version strings the way dpkg does.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn part(mut a: &[u8], mut b: &[u8]) -> std::cmp::Ordering {
        use std::cmp::Ordering::*;
        while !a.is_empty() || !b.is_empty() {
            // Non-digit prefix.
            loop {
                let ca = a.first().copied().filter(|c| !c.is_ascii_digit());
                let cb = b.first().copied().filter(|c| !c.is_ascii_digit());
                if ca.is_none() && cb.is_none() {
                    break;
                }
                let (oa, ob) = (order(ca), order(cb));
                if oa != ob {
                    return oa.cmp(&ob);
                }
                a = &a[1..];
                b = &b[1..];
            }
            let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
            let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
            let da = std::str::from_utf8(&a[..na])
                .unwrap_or("0")
                .trim_start_matches('0');
            let db = std::str::from_utf8(&b[..nb])
                .unwrap_or("0")
                .trim_start_matches('0');
            let c = da.len().cmp(&db.len()).then(da.cmp(db));
            if c != Equal {
                return c;
            }
            a = &a[na..];
            b = &b[nb..];
        }
        Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| part(ra.as_bytes(), rb.as_bytes()))
}

/// Pick packages by name (`name` or `name=version`), and with
/// `follow_depends` their `Depends` and `Pre-Depends` closure.
///
/// For each dependency group the first alternative already selected wins;
/// otherwise the first alternative that exists as a real package (its highest
/// version), then the first provider (by name) of a virtual package. Version
/// constraints are not checked beyond the package existing: an index holds
/// one suite, where dependencies are consistent. `Recommends` is not
/// followed. The result is sorted by name and version, so the same request
/// gives the same list.
pub fn resolve(
    index: &[Package],
    names: &[&str],
    follow_depends: bool,
) -> Result<Vec<Package>, DebianError> {
    let mut by_name: HashMap<&str, Vec<&Package>> = HashMap::new();
    let mut providers: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for p in index {
        by_name.entry(&p.name).or_default().push(p);
        for v in &p.provides {
            providers.entry(v).or_default().insert(&p.name);
        }
    }
    let newest = |name: &str| -> Option<&Package> {
        by_name
            .get(name)?
            .iter()
            .copied()
            .max_by(|a, b| compare_versions(&a.version, &b.version))
    };
    let mut chosen: BTreeMap<String, &Package> = BTreeMap::new();
    let mut provided: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<&Package> = Vec::new();
    for req in names {
        let p = match req.split_once('=') {
            Some((n, v)) => {
                let all = by_name
                    .get(n)
                    .ok_or_else(|| DebianError::UnknownPackage(n.to_string()))?;
                *all.iter()
                    .find(|p| p.version == v)
                    .ok_or_else(|| DebianError::UnknownVersion {
                        name: n.to_string(),
                        version: v.to_string(),
                        available: all.iter().map(|p| p.version.clone()).collect(),
                    })?
            }
            None => newest(req).ok_or_else(|| DebianError::UnknownPackage(req.to_string()))?,
        };
        queue.push(p);
    }
    let mut i = 0;
    while i < queue.len() {
        let p = queue[i];
        i += 1;
        if chosen.contains_key(&p.name) {
            continue;
        }
        chosen.insert(p.name.clone(), p);
        provided.extend(p.provides.iter().cloned());
        if !follow_depends {
            continue;
        }
        for group in p.pre_depends.iter().chain(&p.depends) {
            let satisfied = group.iter().any(|d| {
                chosen.contains_key(&d.name)
                    || provided.contains(&d.name)
                    || queue[i..].iter().any(|q| q.name == d.name)
            });
            if satisfied {
                continue;
            }
            let pick = group.iter().find_map(|d| newest(&d.name)).or_else(|| {
                group.iter().find_map(|d| {
                    providers
                        .get(d.name.as_str())
                        .and_then(|s| s.iter().next())
                        .and_then(|n| newest(n))
                })
            });
            match pick {
                Some(q) => queue.push(q),
                None => {
                    return Err(DebianError::Unsatisfiable {
                        package: p.name.clone(),
                        dependency: group
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(" | "),
                    })
                }
            }
        }
    }
    Ok(chosen.into_values().cloned().collect())
}

/// Reports download progress: a bar on a terminal, a line every few seconds
/// otherwise.
struct Progress<R> {
    inner: R,
    bar: Option<indicatif::ProgressBar>,
    what: String,
    total: u64,
    done: u64,
    last_line: Instant,
}

impl<R: Read> Progress<R> {
    fn new(inner: R, what: String, total: u64) -> Self {
        let bar = io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(style);
            }
            b.set_message(what.clone());
            b
        });
        Progress {
            inner,
            bar,
            what,
            total,
            done: 0,
            last_line: Instant::now(),
        }
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        match &self.bar {
            Some(b) => {
                b.set_position(self.done);
                if n == 0 {
                    b.finish_and_clear();
                }
            }
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(5) {
                    self.last_line = Instant::now();
                    eprintln!("{}: {} of {} bytes", self.what, self.done, self.total);
                }
            }
        }
        Ok(n)
    }
}

impl Archive {
    /// An archive reached over plain HTTP.
    pub fn new(base_url: impl Into<String>, suite: impl Into<String>, keyring: Vec<u8>) -> Self {
        Archive::with_fetcher(base_url, suite, keyring, Box::new(HttpFetcher::new()))
    }

    /// An archive reached through `fetcher`.
    pub fn with_fetcher(
        base_url: impl Into<String>,
        suite: impl Into<String>,
        keyring: Vec<u8>,
        fetcher: Box<dyn Fetch>,
    ) -> Self {
        Archive {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            suite: suite.into(),
            keyring,
            fetcher,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path)
    }

    fn inrelease_ref(&self) -> String {
        format!("debian/{}/InRelease", self.suite)
    }

    fn store_err(what: impl Into<String>) -> impl FnOnce(StoreError) -> DebianError {
        let what = what.into();
        move |source| DebianError::Store { what, source }
    }

    /// The verified `Release` of this suite: from the store or the network
    /// according to `refresh`. A freshly fetched `InRelease` is stored (and
    /// its ref updated) only after its signature verified.
    pub fn release(&self, store: &Store, refresh: Refresh) -> Result<Release, DebianError> {
        let reference = self.inrelease_ref();
        if refresh != Refresh::Always {
            let stored = store
                .resolve(&reference)
                .map_err(Self::store_err(&reference))?;
            match stored {
                Some(d) => {
                    let bytes = store
                        .read_blob(&d.digest)
                        .map_err(Self::store_err(&reference))?;
                    return self.check_release(&bytes, &format!("stored {reference}"));
                }
                None if refresh == Refresh::Never => {
                    return Err(DebianError::NotCached {
                        what: format!("InRelease of {}", self.suite),
                        reference,
                    })
                }
                None => {}
            }
        }
        let url = self.url(&format!("dists/{}/InRelease", self.suite));
        let mut bytes = Vec::new();
        self.fetcher
            .get(&url)?
            .take(MAX_INRELEASE)
            .read_to_end(&mut bytes)
            .map_err(|e| DebianError::Fetch {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        let release = self.check_release(&bytes, &url)?;
        let (digest, size) = store.put_bytes(&bytes).map_err(Self::store_err(&url))?;
        store
            .set_ref(
                &reference,
                Descriptor {
                    media_type: INRELEASE_MEDIA_TYPE.into(),
                    digest,
                    size,
                },
            )
            .map_err(Self::store_err(&reference))?;
        Ok(release)
    }

    fn check_release(&self, bytes: &[u8], what: &str) -> Result<Release, DebianError> {
        let release = verify_inrelease(bytes, &self.keyring, what)?;
        let names = [&release.suite, &release.codename];
        if !names
            .iter()
            .any(|n| n.as_deref() == Some(self.suite.as_str()))
        {
            return Err(DebianError::SuiteMismatch {
                what: what.to_string(),
                found: release
                    .codename
                    .clone()
                    .or(release.suite.clone())
                    .unwrap_or_default(),
                expected: self.suite.clone(),
            });
        }
        Ok(release)
    }

    /// The `Packages` index of `component` for `arch`, pinned by `release`:
    /// read from the store if present, fetched (verified) otherwise, unless
    /// `offline`.
    pub fn packages(
        &self,
        store: &Store,
        release: &Release,
        component: &str,
        arch: &str,
        offline: bool,
    ) -> Result<Vec<Package>, DebianError> {
        let dir = format!("{component}/binary-{arch}");
        let candidates: Vec<String> = ["Packages.xz", "Packages.gz", "Packages"]
            .iter()
            .map(|f| format!("{dir}/{f}"))
            .collect();
        let (path, (digest, size)) = candidates
            .iter()
            .find_map(|c| release.sha256.get(c).map(|v| (c.clone(), *v)))
            .ok_or_else(|| DebianError::NotInRelease {
                suite: self.suite.clone(),
                candidates: candidates.clone(),
            })?;
        let url = self.url(&format!("dists/{}/{path}", self.suite));
        let reference = format!("debian/{}/{dir}/Packages", self.suite);
        if !store.contains(&digest) {
            if offline {
                return Err(DebianError::NotCached {
                    what: path.clone(),
                    reference,
                });
            }
            let r = self.fetcher.get(&url)?;
            store
                .put_verified(r, digest, size)
                .map_err(Self::store_err(&url))?;
        }
        let media_type = if path.ends_with(".xz") {
            "application/x-xz"
        } else if path.ends_with(".gz") {
            "application/gzip"
        } else {
            "text/plain"
        };
        store
            .set_ref(
                &reference,
                Descriptor {
                    media_type: media_type.into(),
                    digest,
                    size,
                },
            )
            .map_err(Self::store_err(&reference))?;
        let blob = store.open_blob(&digest).map_err(Self::store_err(&url))?;
        let mut r: Box<dyn Read> = if path.ends_with(".xz") {
            Box::new(liblzma::read::XzDecoder::new_multi_decoder(blob))
        } else if path.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(blob))
        } else {
            Box::new(blob)
        };
        let mut text = String::new();
        r.read_to_string(&mut text)
            .map_err(|source| DebianError::Io {
                what: format!("decompressing {url}"),
                source,
            })?;
        parse_packages(&text, &url)
    }

    /// Release, then `main` `Packages` for amd64, as one step.
    pub fn index(&self, store: &Store, refresh: Refresh) -> Result<Vec<Package>, DebianError> {
        let release = self.release(store, refresh)?;
        self.packages(store, &release, "main", "amd64", refresh == Refresh::Never)
    }

    /// Make sure `pkg`'s `.deb` is in the store, downloading (and verifying
    /// size and sha256 while streaming) only if it is not. Returns its digest.
    pub fn fetch_deb(&self, pkg: &Package, store: &Store) -> Result<Digest, DebianError> {
        if store.contains(&pkg.sha256) {
            return Ok(pkg.sha256);
        }
        let url = self.url(&pkg.filename);
        let r = self.fetcher.get(&url)?;
        let r = Progress::new(r, format!("{}_{}", pkg.name, pkg.version), pkg.size);
        store
            .put_verified(r, pkg.sha256, pkg.size)
            .map_err(Self::store_err(&url))?;
        Ok(pkg.sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    use pgp::composed::{KeyType, SecretKeyParamsBuilder, SignedSecretKey};
    use pgp::ser::Serialize;
    use pgp::types::Password;

    type Files = Arc<Mutex<HashMap<String, Vec<u8>>>>;

    /// A tiny HTTP/1.1 server on 127.0.0.1 that serves `files` and exits
    /// after 200 connections (or when the test process ends).
    fn serve(files: Files) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(stream) = stream else { continue };
                let _ = handle(stream, &files);
            }
        });
        format!("http://{addr}/debian")
    }

    fn handle(mut stream: TcpStream, files: &Files) -> io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
        }
        let body = files
            .lock()
            .unwrap()
            .get(path.strip_prefix("/debian/").unwrap_or(""))
            .cloned();
        match body {
            Some(b) => {
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    b.len()
                )?;
                stream.write_all(&b)?;
            }
            None => write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?,
        }
        stream.flush()
    }

    fn test_key() -> SignedSecretKey {
        let mut params = SecretKeyParamsBuilder::default();
        params
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .primary_user_id("Test Archive <archive@example.invalid>".into());
        params
            .build()
            .unwrap()
            .generate(rand::thread_rng())
            .unwrap()
    }

    fn sign(key: &SignedSecretKey, text: &str) -> Vec<u8> {
        CleartextSignedMessage::sign(
            rand::thread_rng(),
            text,
            &key.primary_key,
            &Password::empty(),
        )
        .unwrap()
        .to_armored_string(Default::default())
        .unwrap()
        .into_bytes()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Fake {
        _dir: tempfile::TempDir,
        files: Files,
        url: String,
        key: SignedSecretKey,
        keyring: Vec<u8>,
        deb: Vec<u8>,
        packages_text: String,
    }

    fn release_text(packages_xz: &[u8]) -> String {
        format!(
            "Origin: Test\nSuite: stable\nCodename: testsuite\nDate: Sat, 01 Jan 2000 00:00:00 UTC\nSHA256:\n {} {} main/binary-amd64/Packages.xz\n",
            Digest::of(packages_xz).hex(),
            packages_xz.len()
        )
    }

    fn fake_archive() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let deb_path = crate::deb::tests::build_deb(dir.path(), "hello", "xz");
        let deb = std::fs::read(deb_path).unwrap();
        let packages_text = format!(
            "Package: hello\nVersion: 1.0\nArchitecture: amd64\nDepends: libgreet (>= 1) | greeter, base-files\nFilename: pool/main/h/hello/hello_1.0_amd64.deb\nSize: {}\nSHA256: {}\nDescription: says hello\n more text\n\nPackage: libgreet\nVersion: 2.0\nArchitecture: amd64\nFilename: pool/main/libg/libgreet_2.0_amd64.deb\nSize: 1\nSHA256: {}\n\nPackage: base-files\nVersion: 12\nArchitecture: amd64\nProvides: base\nFilename: pool/main/b/base-files_12_amd64.deb\nSize: 1\nSHA256: {}\n",
            deb.len(),
            Digest::of(&deb).hex(),
            Digest::of(b"x").hex(),
            Digest::of(b"y").hex()
        );
        let packages_xz = xz(packages_text.as_bytes());
        let key = test_key();
        let keyring = SignedPublicKey::from(key.clone()).to_bytes().unwrap();
        let files: Files = Arc::new(Mutex::new(HashMap::from([
            (
                "dists/testsuite/InRelease".to_string(),
                sign(&key, &release_text(&packages_xz)),
            ),
            (
                "dists/testsuite/main/binary-amd64/Packages.xz".to_string(),
                packages_xz,
            ),
            (
                "pool/main/h/hello/hello_1.0_amd64.deb".to_string(),
                deb.clone(),
            ),
        ])));
        let url = serve(files.clone());
        Fake {
            _dir: dir,
            files,
            url,
            key,
            keyring,
            deb,
            packages_text,
        }
    }

    fn archive(url: &str, keyring: &[u8]) -> Archive {
        Archive::with_fetcher(
            url,
            "testsuite",
            keyring.to_vec(),
            Box::new(HttpFetcher::direct()),
        )
    }

    fn new_store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(d.path()).unwrap();
        (d, s)
    }

    #[test]
    fn happy_path_then_offline() {
        let f = fake_archive();
        let (_d, store) = new_store();
        let a = archive(&f.url, &f.keyring);
        let index = a.index(&store, Refresh::IfMissing).unwrap();
        assert_eq!(index.len(), 3);
        let hello = resolve(&index, &["hello"], false).unwrap();
        assert_eq!(hello.len(), 1);
        assert_eq!(hello[0].description.as_deref(), Some("says hello"));
        let d = a.fetch_deb(&hello[0], &store).unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), f.deb);
        // The package extracts.
        let c = crate::deb::extract_blob(&store, &d, None).unwrap();
        assert!(c.entries.iter().any(|e| e.path == "usr/bin/tool"));
        assert!(store
            .resolve("debian/testsuite/InRelease")
            .unwrap()
            .is_some());
        assert!(store
            .resolve("debian/testsuite/main/binary-amd64/Packages")
            .unwrap()
            .is_some());

        // A dead port: bind, note the address, drop the listener.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/debian", l.local_addr().unwrap())
        };
        let offline = archive(&dead, &f.keyring);
        for refresh in [Refresh::IfMissing, Refresh::Never] {
            let index2 = offline.index(&store, refresh).unwrap();
            assert_eq!(index2, index);
            assert_eq!(offline.fetch_deb(&hello[0], &store).unwrap(), d);
        }
        // Refreshing needs the network and fails cleanly.
        let e = offline.index(&store, Refresh::Always).unwrap_err();
        assert!(matches!(e, DebianError::Fetch { .. }), "{e}");
        // An empty store offline says what is missing.
        let (_d2, empty) = new_store();
        let e = offline.index(&empty, Refresh::Never).unwrap_err();
        assert!(e.to_string().contains("debian/testsuite/InRelease"), "{e}");
    }

    #[test]
    fn tampered_inrelease_is_rejected() {
        let f = fake_archive();
        let (_d, store) = new_store();
        {
            let mut files = f.files.lock().unwrap();
            let ir = files.get_mut("dists/testsuite/InRelease").unwrap();
            let text = String::from_utf8(ir.clone()).unwrap();
            *ir = text
                .replacen("Origin: Test", "Origin: Tost", 1)
                .into_bytes();
        }
        let e = archive(&f.url, &f.keyring)
            .index(&store, Refresh::IfMissing)
            .unwrap_err();
        assert!(matches!(e, DebianError::BadSignature { .. }), "{e}");
        assert!(store.blobs().unwrap().is_empty());
        assert!(store.refs().unwrap().is_empty());

        // Signed by another key: also rejected.
        let other = test_key();
        let packages_xz = xz(f.packages_text.as_bytes());
        f.files.lock().unwrap().insert(
            "dists/testsuite/InRelease".into(),
            sign(&other, &release_text(&packages_xz)),
        );
        let e = archive(&f.url, &f.keyring)
            .index(&store, Refresh::IfMissing)
            .unwrap_err();
        assert!(matches!(e, DebianError::BadSignature { .. }), "{e}");
        assert!(store.blobs().unwrap().is_empty());
    }

    #[test]
    fn wrong_packages_hash_is_rejected() {
        let f = fake_archive();
        let (_d, store) = new_store();
        // Serve a Packages.xz that differs from what Release pins.
        f.files.lock().unwrap().insert(
            "dists/testsuite/main/binary-amd64/Packages.xz".into(),
            xz(b"Package: evil\n"),
        );
        let e = archive(&f.url, &f.keyring)
            .index(&store, Refresh::IfMissing)
            .unwrap_err();
        assert!(
            matches!(
                e,
                DebianError::Store {
                    source: StoreError::Mismatch { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("Packages.xz"), "{e}");
        // Only the verified InRelease was kept (with the artifact manifest
        // its ref names and that manifest's empty config).
        assert_eq!(store.blobs().unwrap().len(), 3);
        let refs = store.refs().unwrap();
        assert_eq!(refs.len(), 1, "{refs:?}");
        assert_eq!(refs[0].0, "debian/testsuite/InRelease");
        let _ = &f.key;
    }

    #[test]
    fn wrong_deb_hash_is_rejected_and_nothing_stored() {
        let f = fake_archive();
        let (_d, store) = new_store();
        let a = archive(&f.url, &f.keyring);
        let index = a.index(&store, Refresh::IfMissing).unwrap();
        let before = store.blobs().unwrap();
        let mut bad = f.deb.clone();
        let n = bad.len();
        bad[n - 10] ^= 0xff;
        f.files
            .lock()
            .unwrap()
            .insert("pool/main/h/hello/hello_1.0_amd64.deb".into(), bad);
        let hello = resolve(&index, &["hello"], false).unwrap();
        let e = a.fetch_deb(&hello[0], &store).unwrap_err();
        assert!(e.to_string().contains("hello_1.0_amd64.deb"), "{e}");
        assert_eq!(store.blobs().unwrap(), before);
        assert!(!store.contains(&hello[0].sha256));
        assert_eq!(
            std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn resolve_closure() {
        let f = fake_archive();
        let index = parse_packages(&f.packages_text, "test").unwrap();
        let names = |v: Vec<Package>| v.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(
            names(resolve(&index, &["hello"], true).unwrap()),
            vec!["base-files", "hello", "libgreet"]
        );
        assert_eq!(
            names(resolve(&index, &["hello=1.0", "base-files"], false).unwrap()),
            vec!["base-files", "hello"]
        );
        let e = resolve(&index, &["nope"], false).unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let e = resolve(&index, &["hello=9"], false).unwrap_err();
        assert!(matches!(e, DebianError::UnknownVersion { .. }), "{e}");

        // Virtual packages through Provides; unsatisfiable deps are errors.
        let mut idx = index.clone();
        idx.retain(|p| p.name != "libgreet");
        idx[0].depends = parse_deps("base, missing-a | missing-b");
        let e = resolve(&idx, &["hello"], true).unwrap_err();
        assert!(e.to_string().contains("missing-a | missing-b"), "{e}");
        idx[0].depends = parse_deps("base");
        assert_eq!(
            names(resolve(&idx, &["hello"], true).unwrap()),
            vec!["base-files", "hello"]
        );
    }

    #[test]
    fn dep_and_version_parsing() {
        let d = parse_deps("libc6 (>= 2.34), a | b:any (<< 3) [amd64], python3:any <!nocheck>");
        assert_eq!(d.len(), 3);
        assert_eq!(d[0][0].constraint.as_deref(), Some(">= 2.34"));
        assert_eq!(d[1][1].name, "b");
        // `<<` is an operator inside the parentheses, not a profile.
        assert_eq!(d[1][1].constraint.as_deref(), Some("<< 3"));
        assert_eq!(d[2][0].name, "python3");
        assert_eq!(d[2][0].constraint, None);
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("1.0", "1.0"), Equal);
        assert_eq!(compare_versions("1.0~rc1", "1.0"), Less);
        assert_eq!(compare_versions("1:0.1", "2.0"), Greater);
        assert_eq!(compare_versions("6.1.0-10", "6.1.0-9"), Greater);
        assert_eq!(compare_versions("1.0a", "1.0+"), Less);
    }

    /// The host's real InRelease for its Debian suite verifies against the
    /// host's Debian keyring, and a copy with one byte changed does not.
    #[test]
    fn host_inrelease_verifies() {
        let sources = crate::apt::host_sources().unwrap();
        let (_, suite) = crate::apt::debian_archive(&sources).unwrap();
        let suffix = format!("_dists_{suite}_InRelease");
        let found = std::fs::read_dir("/var/lib/apt/lists")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&suffix));
        let path = found.unwrap_or_else(|| {
            panic!("no /var/lib/apt/lists/*{suffix}: run `apt-get update` first")
        });
        let keyring = std::fs::read("/usr/share/keyrings/debian-archive-keyring.gpg")
            .expect("reading /usr/share/keyrings/debian-archive-keyring.gpg (apt-get install debian-archive-keyring)");
        let bytes = std::fs::read(&path).unwrap();
        let release = verify_inrelease(&bytes, &keyring, &path.display().to_string()).unwrap();
        assert!(release
            .sha256
            .keys()
            .any(|k| k.starts_with("main/binary-amd64/Packages")));
        assert_eq!(release.codename.as_deref(), Some(suite.as_str()));
        // Change one hex digit inside the signed SHA256 list.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let at = text.find("\nSHA256:\n ").unwrap() + "\nSHA256:\n ".len();
        let mut bad = bytes.clone();
        bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
        let e = verify_inrelease(&bad, &keyring, "tampered").unwrap_err();
        assert!(matches!(e, DebianError::BadSignature { .. }), "{e}");
    }

    #[test]
    fn keyring_is_stored_on_first_use() {
        let f = fake_archive();
        let (_d, store) = new_store();
        let p = f._dir.path().join("keyring.gpg");
        std::fs::write(&p, &f.keyring).unwrap();
        assert_eq!(load_keyring(&store, &p).unwrap(), f.keyring);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(load_keyring(&store, &p).unwrap(), f.keyring);
        assert!(store.resolve(KEYRING_REF).unwrap().is_some());
    }
}
