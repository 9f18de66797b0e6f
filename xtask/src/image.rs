//! `cargo xtask image`: resolve an image definition's inputs into the bundle
//! store (Debian packages from the archive named in the host's apt sources,
//! host files, the bundle snapshot), then build it with `builder`.
//!
//! The first build fetches and verifies; it records what each input resolved
//! to under the store ref `lock/<image>`, so later builds are fully offline
//! and byte-identical. `--refresh` resolves again from the archive.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use builder::definition::{self, Definition, InputKind, InputSpec};
use builder::plan::{self, BuildRequest, ResolvedInput};
use builder::treefile::{BlobDir, TreeFile, TreeFileEntry, TreeFileKind};
use builder::Digest;
use bundle::deb::{self, DebEntry, EntryKind};
use bundle::debian::{self, Archive, Package, Refresh};
use bundle::store::{self, Descriptor, Store};
use serde::{Deserialize, Serialize};

use crate::{cargo, root, run};

pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
const DEB_MEDIA_TYPE: &str = "application/vnd.debian.binary-package";

pub struct ImageOptions {
    pub definition: PathBuf,
    pub out: PathBuf,
    pub store: PathBuf,
    pub refresh: bool,
}

impl ImageOptions {
    pub fn from_args(args: &[&str]) -> Result<ImageOptions> {
        let root = root();
        let mut o = ImageOptions {
            definition: root.join("images/appliance.toml"),
            out: root.join("target/appliance"),
            store: std::env::var_os("APPLIANCE_STORE")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("cache/store")),
            refresh: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "--refresh" => o.refresh = true,
                "--definition" => {
                    o.definition = it.next().context("--definition needs a path")?.into()
                }
                "--out" => o.out = it.next().context("--out needs a path")?.into(),
                "--store" => o.store = it.next().context("--store needs a path")?.into(),
                other => bail!(
                    "unknown option {other:?} (known: --refresh, --definition, --out, --store)"
                ),
            }
        }
        Ok(o)
    }
}

/// What an input resolved to, kept in the lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Locked {
    /// The input spec it was resolved from; a changed spec resolves again.
    spec: String,
    digest: Digest,
    origin: String,
    /// Blobs the bundle must carry for this input (debs it came from).
    #[serde(default)]
    carry: Vec<Descriptor>,
}

type Lock = BTreeMap<String, Locked>;

fn spec_key(spec: &InputSpec) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        spec.kind, spec.deb, spec.path, spec.file
    )
}

/// Build the static appliance binary (not part of the image's inputs'
/// resolution: its bytes are, through the `file` input).
pub fn build_appliance_binary() -> Result<PathBuf> {
    let bin = root().join(format!("target/{TARGET}/release/appliance"));
    // Tests that run this tool from inside `cargo test` reuse the binary
    // `cargo xtask test` already built instead of running cargo again.
    if std::env::var_os("XTASK_SKIP_APPLIANCE_BUILD").is_some() && bin.exists() {
        return Ok(bin);
    }
    run(Command::new(cargo())
        .current_dir(root())
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "appliance",
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    Ok(bin)
}

/// `cargo xtask image`: returns the output directory.
pub fn image(opts: &ImageOptions) -> Result<PathBuf> {
    build_appliance_binary()?;
    let store = Store::init(&opts.store)
        .with_context(|| format!("opening the store {}", opts.store.display()))?;
    let (def, src) = definition::load(&opts.definition)?;
    let lock_ref = format!("lock/{}", def.image.name);
    let mut lock: Lock = match store.resolve(&lock_ref)? {
        Some(d) if !opts.refresh => serde_json::from_slice(&store.read_blob(&d.digest)?)
            .with_context(|| format!("reading the lock {lock_ref}"))?,
        _ => Lock::new(),
    };
    let mut resolver = Resolver {
        store: &store,
        archive: None,
        index: None,
        extracted: BTreeMap::new(),
    };
    let mut resolved = BTreeMap::new();
    let mut generated = Vec::new();
    for (name, spec) in &def.inputs {
        if spec.digest.is_some() {
            continue;
        }
        if spec.generated.is_some() {
            generated.push(name.clone());
            continue;
        }
        let key = spec_key(spec);
        if let Some(file) = &spec.file {
            // Host files are always taken fresh: they are build products.
            let path = root().join(file);
            let (d, _) = store
                .put_file(&path)
                .with_context(|| format!("storing input {name:?} from {}", path.display()))?;
            lock.insert(
                name.clone(),
                Locked {
                    spec: key,
                    digest: d,
                    origin: format!("file:{}", file.display()),
                    carry: vec![],
                },
            );
        } else if let Some(pkg) = &spec.deb {
            let cached = lock
                .get(name)
                .filter(|l| l.spec == key && store.contains(&l.digest))
                .cloned();
            let l = match cached {
                Some(l) => l,
                None => {
                    let path = spec
                        .path
                        .as_deref()
                        .with_context(|| format!("input {name:?}: `deb` needs `path`"))?;
                    let (digest, origin, carry) = resolver.deb_input(pkg, path, spec.kind)?;
                    Locked {
                        spec: key,
                        digest,
                        origin,
                        carry,
                    }
                }
            };
            lock.insert(name.clone(), l);
        }
        let l = &lock[name];
        resolved.insert(
            name.clone(),
            ResolvedInput {
                digest: l.digest,
                origin: Some(l.origin.clone()),
            },
        );
    }
    lock.retain(|k, _| def.inputs.contains_key(k));
    let lock_bytes = serde_json::to_vec_pretty(&lock)?;
    let (ld, ls) = store.put_bytes(&lock_bytes)?;
    store.set_ref(
        &lock_ref,
        Descriptor {
            media_type: "application/json".into(),
            digest: ld,
            size: ls,
        },
    )?;

    // The bundle snapshot: an OCI layout with everything this image was
    // built from, carried on the data partition.
    for name in generated {
        let d = bundle_snapshot(&store, &def, &src.text, &lock, &resolved)?;
        resolved.insert(
            name,
            ResolvedInput {
                digest: d,
                origin: Some("generated:bundle snapshot".into()),
            },
        );
    }

    let epoch = definition::epoch(&def, std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
        .map_err(anyhow::Error::msg)?;
    let blobs = BlobDir::new(store.root());
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &resolved)?,
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch,
        out_dir: &opts.out,
    };
    let r = plan::build(&req).with_context(|| format!("building {}", opts.definition.display()))?;
    eprintln!("release {} ({})", r.release, r.manifest_path.display());
    if let Some((p, d)) = &r.disk {
        eprintln!("disk    {d} ({})", p.display());
    }
    Ok(opts.out.clone())
}

struct Resolver<'a> {
    store: &'a Store,
    archive: Option<Archive>,
    index: Option<Vec<Package>>,
    /// deb digest → its extracted entries.
    extracted: BTreeMap<Digest, Vec<DebEntry>>,
}

impl Resolver<'_> {
    fn archive(&mut self) -> Result<(&Archive, &[Package])> {
        if self.archive.is_none() {
            let sources = bundle::apt::host_sources().context("reading the host's apt sources")?;
            let (uri, suite) = bundle::apt::debian_archive(&sources)?;
            let keyring = debian::load_keyring(self.store, Path::new(KEYRING))?;
            eprintln!("xtask: Debian archive {uri} suite {suite}");
            let a = Archive::new(uri, suite, keyring);
            self.index = Some(
                a.index(self.store, Refresh::IfMissing)
                    .context("reading the archive's package index")?,
            );
            self.archive = Some(a);
        }
        Ok((
            self.archive.as_ref().unwrap(),
            self.index.as_deref().unwrap(),
        ))
    }

    fn entries(&mut self, pkg: &Package) -> Result<Vec<DebEntry>> {
        let store = self.store;
        let (archive, _) = self.archive()?;
        let d = archive
            .fetch_deb(pkg, store)
            .with_context(|| format!("fetching {}", pkg.name))?;
        if let Some(e) = self.extracted.get(&d) {
            return Ok(e.clone());
        }
        eprintln!("xtask: extracting {} {}", pkg.name, pkg.version);
        let c = deb::extract_blob(self.store, &d, None)
            .with_context(|| format!("extracting {}", pkg.name))?;
        self.extracted.insert(d, c.entries.clone());
        Ok(c.entries)
    }

    /// Find `path` in `pkg` or, failing that, in its direct dependencies
    /// (a metapackage such as `linux-image-amd64` names the real one).
    fn deb_input(
        &mut self,
        pkg_name: &str,
        path: &str,
        kind: InputKind,
    ) -> Result<(Digest, String, Vec<Descriptor>)> {
        let (_, index) = self.archive()?;
        let top = debian::resolve(index, &[pkg_name], false)?
            .into_iter()
            .next()
            .context("resolving")?;
        let mut candidates = vec![top.clone()];
        for group in top.depends.iter().chain(&top.pre_depends) {
            if let Some(dep) = group.first() {
                if let Ok(mut p) = debian::resolve(index, &[dep.name.as_str()], false) {
                    candidates.append(&mut p);
                }
            }
        }
        let candidates = candidates.clone();
        for pkg in candidates {
            let entries = self.entries(&pkg)?;
            let carry = vec![Descriptor {
                media_type: DEB_MEDIA_TYPE.into(),
                digest: pkg.sha256,
                size: pkg.size,
            }];
            let origin = format!("deb:{}={}:{path}", pkg.name, pkg.version);
            match kind {
                InputKind::Blob => {
                    let hits: Vec<&DebEntry> = entries
                        .iter()
                        .filter(|e| glob_match(path, &e.path))
                        .collect();
                    match hits.as_slice() {
                        [] => continue,
                        [e] => match &e.kind {
                            EntryKind::File { digest, .. } => return Ok((*digest, origin, carry)),
                            _ => bail!("{path} in {} is not a regular file", pkg.name),
                        },
                        many => bail!(
                            "{path} matches several files in {}: {:?}",
                            pkg.name,
                            many.iter().map(|e| &e.path).collect::<Vec<_>>()
                        ),
                    }
                }
                InputKind::Tree => {
                    let prefix = path.trim_end_matches('/');
                    let sel: Vec<TreeFileEntry> = entries
                        .iter()
                        .filter(|e| e.path == prefix || e.path.starts_with(&format!("{prefix}/")))
                        .map(tree_entry)
                        .collect();
                    if sel.is_empty() {
                        continue;
                    }
                    let (d, _) = self.store.put_bytes(&TreeFile::new(sel).to_bytes())?;
                    return Ok((d, origin, carry));
                }
            }
        }
        bail!("no {path:?} in Debian package {pkg_name} or its direct dependencies")
    }
}

fn tree_entry(e: &DebEntry) -> TreeFileEntry {
    let kind = match &e.kind {
        EntryKind::File { digest, size } => TreeFileKind::File {
            size: *size,
            digest: *digest,
        },
        EntryKind::Dir => TreeFileKind::Dir,
        EntryKind::Symlink(t) => TreeFileKind::Symlink { target: t.clone() },
        EntryKind::Hardlink(t) => TreeFileKind::Hardlink { target: t.clone() },
        EntryKind::CharDevice { major, minor } => TreeFileKind::Char {
            major: *major,
            minor: *minor,
        },
        EntryKind::BlockDevice { major, minor } => TreeFileKind::Block {
            major: *major,
            minor: *minor,
        },
        EntryKind::Fifo => TreeFileKind::Fifo,
    };
    TreeFileEntry {
        path: e.path.clone(),
        kind,
        mode: (e.mode & 0o7777) as u16,
        uid: e.uid,
        gid: e.gid,
        mtime: Some(e.mtime),
    }
}

/// `dir/name-*` style matching: `*` matches any run within the last component.
fn glob_match(pattern: &str, path: &str) -> bool {
    let (pd, pf) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let (d, f) = path.rsplit_once('/').unwrap_or(("", path));
    if pd != d {
        return false;
    }
    match pf.split_once('*') {
        None => pf == f,
        Some((a, b)) => f.len() >= a.len() + b.len() && f.starts_with(a) && f.ends_with(b),
    }
}

/// Describe the bundle the image carries as a tree document: an OCI layout
/// (`oci-layout`, `index.json`, `blobs/sha256/…`) holding the definition,
/// the lock, every input blob, the debs they came from, and the signed
/// archive metadata and keyring that prove where those came from.
fn bundle_snapshot(
    store: &Store,
    def: &Definition,
    def_text: &str,
    lock: &Lock,
    resolved: &BTreeMap<String, ResolvedInput>,
) -> Result<Digest> {
    let mut refs: Vec<(String, Descriptor)> = Vec::new();
    let desc = |media: &str, d: Digest| -> Result<Descriptor> {
        Ok(Descriptor {
            media_type: media.into(),
            digest: d,
            size: store.size(&d)?,
        })
    };
    let (dd, _) = store.put_bytes(def_text.as_bytes())?;
    refs.push((
        format!("release/definition/{}", def.image.name),
        desc("application/toml", dd)?,
    ));
    let lock_bytes = serde_json::to_vec_pretty(lock)?;
    let (ld, _) = store.put_bytes(&lock_bytes)?;
    refs.push((
        format!("lock/{}", def.image.name),
        desc("application/json", ld)?,
    ));
    let mut debs = BTreeSet::new();
    for (name, r) in resolved {
        let media = match def.inputs[name].kind {
            InputKind::Tree => store::TREE_MEDIA_TYPE,
            InputKind::Blob => store::OCTET_STREAM,
        };
        if def.inputs[name].kind == InputKind::Blob {
            refs.push((format!("release/input/{name}"), desc(media, r.digest)?));
        }
        if let Some(l) = lock.get(name) {
            for c in &l.carry {
                debs.insert(c.digest);
            }
        }
    }
    let deb_descs: Vec<Descriptor> = debs
        .iter()
        .map(|d| desc(DEB_MEDIA_TYPE, *d))
        .collect::<Result<_>>()?;
    let set_doc = {
        let mut v = serde_json::to_vec_pretty(&serde_json::json!({ "blobs": deb_descs }))?;
        v.push(b'\n');
        v
    };
    let (sd, _) = store.put_bytes(&set_doc)?;
    refs.push(("release/debs".into(), desc(store::SET_MEDIA_TYPE, sd)?));
    // Provenance: the keyring and the signed archive metadata in the store.
    for (name, d) in store.refs()? {
        if name.starts_with("debian/") {
            refs.push((name, d));
        }
    }
    let index = store::index_document(&refs);
    let (id, _) = store.put_bytes(&index)?;
    let (od, _) = store.put_bytes(store::OCI_LAYOUT.as_bytes())?;

    // Every blob the layout references, once.
    let mut blobs: BTreeSet<Digest> = refs.iter().map(|(_, d)| d.digest).collect();
    blobs.extend(debs);
    let file = |path: String, d: Digest| -> Result<TreeFileEntry> {
        Ok(TreeFileEntry {
            path,
            kind: TreeFileKind::File {
                size: store.size(&d)?,
                digest: d,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: None,
        })
    };
    let mut entries = vec![
        file("oci-layout".into(), od)?,
        file("index.json".into(), id)?,
    ];
    for d in blobs {
        entries.push(file(format!("blobs/sha256/{}", d.hex()), d)?);
    }
    let (td, _) = store.put_bytes(&TreeFile::new(entries).to_bytes())?;
    Ok(td)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("boot/vmlinuz-*", "boot/vmlinuz-6.1.0-28-amd64"));
        assert!(!glob_match("boot/vmlinuz-*", "boot/config-6.1.0-28-amd64"));
        assert!(!glob_match("boot/vmlinuz-*", "x/boot/vmlinuz-6"));
        assert!(glob_match("usr/lib/a.stub", "usr/lib/a.stub"));
    }
}
