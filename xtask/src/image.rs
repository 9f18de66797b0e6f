//! `cargo xtask image`: resolve an image definition's inputs into the bundle
//! store (Debian packages from the archive named in the host's apt sources,
//! host files, the bundle snapshot), then build it with `builder`.
//!
//! The first build fetches and verifies; it records what each input resolved
//! to under the store ref `lock/<image>`, so later builds are fully offline
//! and byte-identical. `--refresh` resolves again from the archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use builder::definition::{self, Definition, InputKind};
use builder::plan::{self, BuildRequest, ResolvedInput};
use builder::signature::{self, SigningKey};
use builder::sshsig;
use builder::treefile::BlobDir;
use builder::Digest;
use bundle::deb::{self, DebEntry};
use bundle::debian::{self, Archive, Package, Refresh};
use bundle::resolve::{self, Lock, Locked, Selected, DEB_MEDIA_TYPE};
use bundle::store::{Descriptor, Store};

use crate::{cargo, root, run};

pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The release signing key, relative to the workspace, unless
/// `APPLIANCE_SIGNING_KEY` names another file.
pub const SIGNING_KEY: &str = "cache/keys/release.ed25519";
/// The public half the image definition takes as a `file` input; with
/// `APPLIANCE_SIGNING_KEY` set, `<that file>.pub` is read in its place.
pub const PUBLIC_KEY: &str = "cache/keys/release.ed25519.pub";

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

/// Build the static appliance binary (not part of the image's inputs'
/// resolution: its bytes are, through the `file` input).
///
/// Only the final link is static (`cargo rustc … -- -C
/// target-feature=+crt-static`): the dependencies are the very artifacts
/// `cargo xtask` itself was built from (same profile, same target
/// directory), so a fresh machine compiles them once, not twice.
pub fn build_appliance_binary() -> Result<PathBuf> {
    let bin = appliance_binary();
    // Tests that run this tool from inside `cargo test` reuse the binary
    // `cargo xtask test` already built instead of running cargo again.
    if std::env::var_os("XTASK_SKIP_APPLIANCE_BUILD").is_some() && bin.exists() {
        return Ok(bin);
    }
    run(Command::new(cargo()).current_dir(root()).args([
        "rustc",
        "--release",
        "-q",
        "-p",
        "appliance",
        "--bin",
        "appliance",
        "--",
        "-C",
        "target-feature=+crt-static",
        // Symbols are a fifth of the binary and the image carries no
        // debugger; panics still print their message and location.
        "-C",
        "strip=symbols",
    ]))?;
    // Cargo's own builds of the bin (`cargo test --release` links one for
    // the integration tests) overwrite target/release/appliance with a
    // dynamic binary, so the static one is copied where only this writes.
    let linked = root().join("target/release/appliance");
    check_static(&linked)?;
    std::fs::create_dir_all(bin.parent().expect("a parent"))?;
    let tmp = bin.with_extension("tmp");
    std::fs::copy(&linked, &tmp)
        .with_context(|| format!("copying {} to {}", linked.display(), tmp.display()))?;
    std::fs::rename(&tmp, &bin).with_context(|| format!("renaming into {}", bin.display()))?;
    Ok(bin)
}

/// Where [`build_appliance_binary`] leaves the static binary (the image
/// definition's `appliance` file input).
pub fn appliance_binary() -> PathBuf {
    root().join("target/static/appliance")
}

/// Refuses a dynamically linked binary: it would not start as PID 1.
fn check_static(bin: &Path) -> Result<()> {
    let out = Command::new("readelf")
        .arg("-lW")
        .arg(bin)
        .output()
        .with_context(|| format!("running readelf on {}", bin.display()))?;
    if !out.status.success() {
        bail!("readelf -l {} failed", bin.display());
    }
    if String::from_utf8_lossy(&out.stdout).contains("INTERP") {
        bail!(
            "{} is dynamically linked (it has a program interpreter); rebuild it with `cargo xtask image`",
            bin.display()
        );
    }
    Ok(())
}

/// `cargo xtask image`: returns the output directory.
pub fn image(opts: &ImageOptions) -> Result<PathBuf> {
    build_appliance_binary()?;
    let store = Store::init(&opts.store)
        .with_context(|| format!("opening the store {}", opts.store.display()))?;
    // Refs recorded before every ref had an OCI manifest get one now.
    for name in store.upgrade_refs()? {
        eprintln!("xtask: store ref {name} now names an OCI artifact manifest");
    }
    let (def, src) = definition::load(&opts.definition)?;
    let lock_ref = format!("lock/{}", def.image.name);
    let mut lock: Lock = match store.resolve(&lock_ref)? {
        Some(d) if !opts.refresh => resolve::parse_lock(&store.read_blob(&d.digest)?)
            .with_context(|| {
                format!("reading the lock {lock_ref} (`--refresh` resolves every input again)")
            })?,
        _ => Lock::new(),
    };
    let key = signing_key()?;
    let mut resolver = Resolver {
        store: &store,
        archive: None,
        index: None,
        extracted: BTreeMap::new(),
    };
    let blobs = BlobDir::new(store.root());
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
        let spec_key = resolve::spec_key(spec);
        if let Some(file) = &spec.file {
            // Host files are always taken fresh: they are build products.
            let path = if file == Path::new(PUBLIC_KEY) {
                key.public_path.clone()
            } else {
                root().join(file)
            };
            let (d, _) = store
                .put_file(&path)
                .with_context(|| format!("storing input {name:?} from {}", path.display()))?;
            lock.insert(
                name.clone(),
                Locked {
                    spec: spec_key,
                    digest: d,
                    origin: format!("file:{}", file.display()),
                    carry: vec![],
                },
            );
        } else if let Some(pkg) = &spec.deb {
            // Offline first: the locked blob, or derived again from the
            // package the lock says it came from.
            let offline = lock
                .get(name)
                .map(|l| resolve::resolve_locked(name, spec, l, &blobs, &store));
            match offline {
                Some(Ok(_)) => {}
                other => {
                    if let Some(Err(e)) = other {
                        eprintln!("xtask: {e}; resolving again");
                    }
                    let path = spec
                        .path
                        .as_deref()
                        .with_context(|| format!("input {name:?}: `deb` needs `path`"))?;
                    let (digest, origin, carry) = resolver.deb_input(pkg, path, spec.kind)?;
                    lock.insert(
                        name.clone(),
                        Locked {
                            spec: spec_key,
                            digest,
                            origin,
                            carry,
                        },
                    );
                }
            }
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
    let (ld, ls) = store.put_bytes(&resolve::lock_bytes(&lock))?;
    store.set_ref(
        &lock_ref,
        Descriptor {
            media_type: resolve::LOCK_MEDIA_TYPE.into(),
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
                origin: Some(resolve::SNAPSHOT_ORIGIN.into()),
            },
        );
    }

    let epoch = definition::epoch(&def, std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
        .map_err(anyhow::Error::msg)?;
    let signer = |m: &[u8]| -> Result<Vec<u8>, String> { Ok(signature::sign(&key.secret, m)) };
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &resolved)?,
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch,
        out_dir: &opts.out,
        sign: Some(&signer),
    };
    let r = plan::build(&req).with_context(|| format!("building {}", opts.definition.display()))?;
    eprintln!("release {} ({})", r.release, r.manifest_path.display());
    if let Some(p) = &r.signature_path {
        eprintln!("signed  {}", p.display());
    }
    // The same signature in the form stock OpenSSH checks, with the
    // `allowed_signers` line that trusts the release key (README: "Verifying
    // a release by hand").
    let manifest_bytes = std::fs::read(&r.manifest_path)
        .with_context(|| format!("reading {}", r.manifest_path.display()))?;
    let ssh_sig = opts.out.join("manifest.json.sshsig");
    write_replacing(
        &ssh_sig,
        sshsig::sign(&key.secret, &manifest_bytes).as_bytes(),
    )?;
    write_replacing(
        &opts.out.join("allowed_signers"),
        sshsig::allowed_signers_line(&key.secret.verifying_key()).as_bytes(),
    )?;
    eprintln!("signed  {} (ssh-keygen -Y verify)", ssh_sig.display());
    // The manifest cannot name the disk's digest (the disk holds the
    // manifest), so the digest file is signed on its own: verifying it and
    // then `sha256sum -c` checks the image itself.
    let sums = opts.out.join("appliance.img.sha256");
    if r.disk.is_some() {
        let text = std::fs::read(&sums).with_context(|| format!("reading {}", sums.display()))?;
        write_replacing(
            &opts.out.join("appliance.img.sha256.sshsig"),
            sshsig::sign(&key.secret, &text).as_bytes(),
        )?;
    }
    if let Some((p, d)) = &r.disk {
        eprintln!("disk    {d} ({})", p.display());
    }
    // The ISO's digest likewise (it holds the manifest too).
    if let Some((p, d)) = &r.iso {
        let sums = opts.out.join(format!(
            "{}.sha256",
            p.file_name().unwrap_or_default().to_string_lossy()
        ));
        let text = std::fs::read(&sums).with_context(|| format!("reading {}", sums.display()))?;
        let mut sig = sums.clone().into_os_string();
        sig.push(".sshsig");
        write_replacing(Path::new(&sig), sshsig::sign(&key.secret, &text).as_bytes())?;
        eprintln!("iso     {d} ({})", p.display());
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
            match resolve::select(&entries, path, kind, &pkg.name).map_err(anyhow::Error::msg)? {
                None => continue,
                Some(Selected::Blob(d)) => return Ok((d, origin, carry)),
                Some(Selected::Tree(doc)) => {
                    let (d, _) = self.store.put_bytes(&doc)?;
                    return Ok((d, origin, carry));
                }
            }
        }
        bail!("no {path:?} in Debian package {pkg_name} or its direct dependencies")
    }
}

/// Describe the bundle the image carries as a tree document: an OCI layout
/// (`oci-layout`, `index.json`, `blobs/sha256/…`) holding the definition,
/// the lock, every input blob, the debs they came from, and the signed
/// archive metadata and keyring that prove where those came from, each ref
/// through an OCI manifest ([`resolve::bundle_index`]).
fn bundle_snapshot(
    store: &Store,
    def: &Definition,
    def_text: &str,
    lock: &Lock,
    resolved: &BTreeMap<String, ResolvedInput>,
) -> Result<Digest> {
    let index = resolve::bundle_index(store, def, def_text, lock, resolved)?;
    Ok(resolve::snapshot(
        &index,
        &BlobDir::new(store.root()),
        store,
    )?)
}

/// The release signing key and where its public half is.
struct ReleaseKey {
    secret: SigningKey,
    public_path: PathBuf,
}

/// Create or reuse the release signing key (`cache/keys/release.ed25519`,
/// or `$APPLIANCE_SIGNING_KEY`): 32 bytes from the OS, mode 0600, and its
/// public half in `<key>.pub` (`ed25519:<hex>`), which the image carries.
fn signing_key() -> Result<ReleaseKey> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::var_os("APPLIANCE_SIGNING_KEY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(SIGNING_KEY));
    let (secret, how) = if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the signing key {}", path.display()))?;
        let k = signature::parse_secret_key(&text)
            .with_context(|| format!("parsing the signing key {}", path.display()))?;
        (k, "reusing")
    } else {
        let dir = path
            .parent()
            .context("the signing key path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .context("reading 32 bytes from /dev/urandom")?;
        let k = signature::secret_key_from_seed(seed);
        // Written beside, then renamed: a key file is whole or absent.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(signature::format_secret_key(&k).as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
        (k, "created")
    };
    let public = signature::format_public_key(&secret.verifying_key());
    let mut public_path = path.clone().into_os_string();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    let text = format!("{public}\n");
    if std::fs::read_to_string(&public_path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&public_path, &text)
            .with_context(|| format!("writing {}", public_path.display()))?;
    }
    eprintln!(
        "xtask: {how} the release signing key {} (public key {public}, in {})",
        path.display(),
        public_path.display()
    );
    Ok(ReleaseKey {
        secret,
        public_path,
    })
}

/// Writes `data` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
fn write_replacing(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
