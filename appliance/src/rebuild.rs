//! `appliance rebuild`: rebuild this appliance's own image, bit for bit,
//! from the bundle on its data partition, with no network.
//!
//! The definition (`release/definition/<image>`) and the lock
//! (`lock/<image>`) come from `<data>/bundle`, the image name and epoch from
//! `<data>/release/manifest.json`. Inputs are resolved offline
//! ([`bundle::resolve`]): tree inputs the bundle does not hold (the kernel
//! modules) are derived again from the carried `.deb`s into a scratch store
//! at `<data>/cache/scratch`, never into the bundle. The embedded builder
//! then builds into a temporary directory that is renamed to the output
//! directory once complete.
//!
//! There is no signing key on the appliance: the "signer" reuses the carried
//! signature (`<data>/release/manifest.sig`) after checking it against the
//! *rebuilt* manifest bytes and the trusted public key
//! (`/etc/appliance/release.pub` in the initramfs, else
//! `<data>/release/release.pub`). A rebuild whose manifest differs fails,
//! naming what differs; a successful one is therefore signed by the release
//! key exactly like the original.
//!
//! [`ensure_cached`] keeps one verified rebuild in `<data>/cache/release`
//! for features that hand out the image (install over the network); one
//! rebuild runs at a time per process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use builder::definition;
use builder::manifest::Manifest;
use builder::plan::{self, BuildRequest};
use builder::signature::{self, VerifyingKey};
use builder::treefile::{BlobDir, BlobSource, Layered};
use builder::Digest;
use bundle::resolve::{self, Lock};
use bundle::Store;
use serde::{Deserialize, Serialize};

use crate::contract::RELEASE_MANIFEST;

/// The carried signature of the release manifest, in the data directory.
pub const RELEASE_SIGNATURE: &str = "release/manifest.sig";
/// The release public key, in the data directory.
pub const RELEASE_PUBLIC_KEY: &str = "release/release.pub";
/// The release public key in the initramfs (preferred: it came with the
/// UKI that booted).
pub const INITRAMFS_PUBLIC_KEY: &str = "/etc/appliance/release.pub";
/// The bundle (an OCI layout) in the data directory.
pub const BUNDLE: &str = "bundle";
/// Where [`ensure_cached`] and the API keep the rebuilt release.
pub const CACHE_RELEASE: &str = "cache/release";
/// Scratch store for blobs derived during a rebuild.
pub const SCRATCH: &str = "cache/scratch";
/// The report beside a rebuild's outputs.
pub const REPORT_FILE: &str = "report.json";

/// What a rebuild found. `identical` is true when the rebuilt manifest is
/// byte-identical to the booted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildReport {
    /// `sha256:` of `<data>/release/manifest.json`.
    pub booted_release: String,
    /// `sha256:` of the rebuilt `manifest.json`.
    pub rebuilt_release: String,
    pub identical: bool,
    /// `sha256:` of the rebuilt disk image.
    pub disk: String,
    /// `sha256:` of the rebuilt hybrid ISO, when the definition makes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<String>,
    pub seconds: f64,
    /// Where the outputs are.
    pub out: PathBuf,
}

/// Whether a rebuild is running in this process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Held while a rebuild runs; dropping it lets the next one start.
pub struct RebuildSlot(());

impl RebuildSlot {
    /// The slot, unless a rebuild is already running.
    pub fn try_take() -> Option<RebuildSlot> {
        RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| RebuildSlot(()))
    }

    /// The slot, waiting for a running rebuild to finish.
    pub fn take() -> RebuildSlot {
        loop {
            if let Some(s) = RebuildSlot::try_take() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for RebuildSlot {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// The trusted release key: the initramfs copy when present, else the
/// data partition's.
pub fn trusted_key(data: &Path) -> Result<(VerifyingKey, PathBuf)> {
    let initramfs = Path::new(INITRAMFS_PUBLIC_KEY);
    let path = if initramfs.exists() {
        initramfs.to_path_buf()
    } else {
        data.join(RELEASE_PUBLIC_KEY)
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let key = signature::parse_public_key(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok((key, path))
}

fn read_blob(blobs: &dyn BlobSource, d: &Digest, what: &str) -> Result<Vec<u8>> {
    blobs
        .blob(d)
        .with_context(|| format!("finding {what} ({d}) in the bundle"))?
        .read_all()
        .with_context(|| format!("reading {what} ({d}) from the bundle"))
}

/// Which top-level fields (and which inputs and outputs) differ between
/// two manifests, for an error message.
fn manifest_diff(a: &[u8], b: &[u8]) -> String {
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<serde_json::Value>(a),
        serde_json::from_slice::<serde_json::Value>(b),
    ) else {
        return "one of the manifests is not JSON".into();
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "one of the manifests is not a JSON object".into();
    };
    let mut out = Vec::new();
    for (k, va) in a {
        let vb = b.get(k);
        if vb == Some(va) {
            continue;
        }
        match (va.as_object(), vb.and_then(|v| v.as_object())) {
            (Some(ia), Some(ib)) if k == "inputs" || k == "outputs" => {
                let mut names: Vec<&String> = ia.keys().chain(ib.keys()).collect();
                names.sort();
                names.dedup();
                let changed: Vec<String> = names
                    .into_iter()
                    .filter(|n| ia.get(*n) != ib.get(*n))
                    .map(|n| format!("{k}.{n}"))
                    .collect();
                out.extend(changed);
            }
            _ => out.push(k.clone()),
        }
    }
    if out.is_empty() {
        "same fields, different bytes".into()
    } else {
        format!("differs in {}", out.join(", "))
    }
}

/// Rebuild the image from `<data>/bundle` into `out` (created, or replaced
/// once the new build is complete).
pub fn rebuild(data: &Path, out: &Path) -> Result<RebuildReport> {
    let started = Instant::now();
    let manifest_path = data.join(RELEASE_MANIFEST);
    let booted_bytes = std::fs::read(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let booted = Digest::of(&booted_bytes);
    let manifest = Manifest::from_bytes(&booted_bytes)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let name = &manifest.image.name;
    let (trusted, key_path) = trusted_key(data)?;
    let sig_path = data.join(RELEASE_SIGNATURE);
    let carried_sig =
        std::fs::read(&sig_path).with_context(|| format!("reading {}", sig_path.display()))?;

    // The definition and the lock, from the bundle.
    let bundle_dir = data.join(BUNDLE);
    let index_path = bundle_dir.join("index.json");
    let index =
        std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let bundle_blobs = BlobDir::new(&bundle_dir);
    // Each ref names an artifact manifest; follow it to the blob.
    let find = |r: &str| -> Result<Digest> {
        resolve::ref_payload(&index, r, &bundle_blobs)
            .with_context(|| format!("reading {} for {r}", index_path.display()))?
            .map(|d| d.digest)
            .with_context(|| format!("the bundle {} has no ref {r}", bundle_dir.display()))
    };
    let def_ref = format!("release/definition/{name}");
    let def_text = String::from_utf8(read_blob(&bundle_blobs, &find(&def_ref)?, &def_ref)?)
        .with_context(|| format!("{def_ref} is not UTF-8"))?;
    if Digest::of(def_text.as_bytes()) != manifest.definition {
        bail!(
            "the bundle's {def_ref} is {} but the booted release was built from {}",
            Digest::of(def_text.as_bytes()),
            manifest.definition
        );
    }
    let (def, src) = definition::parse(&def_ref, &def_text)?;
    let lock_ref = format!("lock/{name}");
    let lock: Lock = resolve::parse_lock(&read_blob(&bundle_blobs, &find(&lock_ref)?, &lock_ref)?)
        .with_context(|| format!("parsing {lock_ref}"))?;

    // Resolve offline; derived blobs go to the scratch store only.
    let scratch_root = data.join(SCRATCH);
    let scratch = Store::init(&scratch_root)
        .with_context(|| format!("opening the scratch store {}", scratch_root.display()))?;
    let scratch_blobs = BlobDir::new(&scratch_root);
    let blobs = Layered(vec![&scratch_blobs, &bundle_blobs]);
    tracing::info!(image = %name, "resolving inputs offline");
    let resolved = resolve::resolve_offline(&def, &lock, &blobs, &scratch, Some(&index))
        .context("resolving the image's inputs from the bundle")?;

    // Reuse the carried signature, after checking it covers what we built.
    let signer = |m: &[u8]| -> Result<Vec<u8>, String> {
        signature::verify(&carried_sig, m, &trusted).map_err(|e| {
            format!(
                "the rebuilt manifest does not match {} (key {}): {e}; against the booted manifest it {}",
                sig_path.display(),
                key_path.display(),
                manifest_diff(&booted_bytes, m)
            )
        })?;
        Ok(carried_sig.clone())
    };

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".rebuild-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    tracing::info!(out = %out.display(), "building");
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &resolved)?,
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch: manifest.epoch,
        out_dir: tmp.path(),
        sign: Some(&signer),
    };
    let r = plan::build(&req).context("building the image")?;
    let (_, disk) = r
        .disk
        .clone()
        .context("the definition makes no disk image")?;
    let report = RebuildReport {
        booted_release: booted.to_string(),
        rebuilt_release: r.release.to_string(),
        identical: r.release == booted,
        disk: disk.to_string(),
        iso: r.iso.as_ref().map(|(_, d)| d.to_string()),
        seconds: started.elapsed().as_secs_f64(),
        out: out.to_path_buf(),
    };
    let mut report_bytes = serde_json::to_vec_pretty(&report)?;
    report_bytes.push(b'\n');
    std::fs::write(tmp.path().join(REPORT_FILE), &report_bytes)
        .with_context(|| format!("writing {REPORT_FILE}"))?;
    replace_dir(tmp.keep(), out)?;
    tracing::info!(
        release = %report.rebuilt_release,
        disk = %report.disk,
        identical = report.identical,
        seconds = report.seconds,
        "rebuilt"
    );
    Ok(report)
}

/// Move the complete directory `new` to `dest`, replacing what is there.
fn replace_dir(new: PathBuf, dest: &Path) -> Result<()> {
    let old = dest.with_file_name(format!(
        ".{}.old",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(dest, &old)
            .with_context(|| format!("moving the previous {} aside", dest.display()))?;
    }
    std::fs::rename(&new, dest)
        .with_context(|| format!("moving the rebuild to {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The rebuild in `<data>/cache/release`, if it is there and valid: its
/// manifest is the booted one, the carried signature covers it, the disk
/// image has the manifest's size and its digest file agrees with the
/// report. (The disk bytes are not hashed again: that takes minutes.)
pub fn cached(data: &Path) -> Result<Option<RebuildReport>> {
    let out = data.join(CACHE_RELEASE);
    let Ok(report) = std::fs::read(out.join(REPORT_FILE)) else {
        return Ok(None);
    };
    let Ok(report) = serde_json::from_slice::<RebuildReport>(&report) else {
        return Ok(None);
    };
    let booted = std::fs::read(data.join(RELEASE_MANIFEST))
        .with_context(|| format!("reading {}", data.join(RELEASE_MANIFEST).display()))?;
    let Ok(rebuilt) = std::fs::read(out.join("manifest.json")) else {
        return Ok(None);
    };
    if rebuilt != booted || Digest::of(&rebuilt).to_string() != report.rebuilt_release {
        return Ok(None);
    }
    let (trusted, _) = trusted_key(data)?;
    let sig = std::fs::read(out.join("manifest.json.sig")).unwrap_or_default();
    if signature::verify(&sig, &rebuilt, &trusted).is_err() {
        return Ok(None);
    }
    let manifest = Manifest::from_bytes(&rebuilt)?;
    let Some(disk) = manifest.disk else {
        return Ok(None);
    };
    let img = out.join(&disk.file);
    if std::fs::metadata(&img).map(|m| m.len()).ok() != Some(disk.size) {
        return Ok(None);
    }
    let sum =
        std::fs::read_to_string(out.join(format!("{}.sha256", disk.file))).unwrap_or_default();
    let hex = sum.split_whitespace().next().unwrap_or_default();
    if report.disk != format!("sha256:{hex}") {
        return Ok(None);
    }
    if let Some(iso) = &manifest.iso {
        let path = out.join(&iso.file);
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(iso.size) {
            return Ok(None);
        }
        let sum =
            std::fs::read_to_string(out.join(format!("{}.sha256", iso.file))).unwrap_or_default();
        let hex = sum.split_whitespace().next().unwrap_or_default();
        if report.iso.as_deref() != Some(format!("sha256:{hex}").as_str()) {
            return Ok(None);
        }
    }
    Ok(Some(RebuildReport { out, ..report }))
}

/// The verified rebuild in `<data>/cache/release`, rebuilding it first if
/// it is missing or stale. Waits for a rebuild already running.
pub fn ensure_cached(data: &Path) -> Result<RebuildReport> {
    let _slot = RebuildSlot::take();
    if let Some(r) = cached(data)? {
        return Ok(r);
    }
    rebuild(data, &data.join(CACHE_RELEASE))
}

/// `appliance rebuild`: print the report (JSON with `json`).
pub fn run_cli(data: &Path, out: &Path, json: bool) -> Result<()> {
    let r = rebuild(data, out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("booted release   {}", r.booted_release);
        println!("rebuilt release  {}", r.rebuilt_release);
        println!("identical        {}", r.identical);
        println!("disk             {}", r.disk);
        if let Some(iso) = &r.iso {
            println!("iso              {iso}");
        }
        println!("seconds          {:.1}", r.seconds);
        println!("out              {}", r.out.display());
    }
    if !r.identical {
        bail!("the rebuilt release differs from the booted one");
    }
    Ok(())
}

/// `GET /api/v1/release`: `{"release": "sha256:…"|null, "cached": report|null}`;
/// `POST /api/v1/release/rebuild`: rebuild into `<data>/cache/release` and
/// return the report (409 `busy` while one runs).
pub fn routes(data: PathBuf) -> Vec<crate::http::Route> {
    use crate::http::{Guard, Route};
    let data = Arc::new(data);
    vec![
        Route::get(
            "/api/v1/release",
            Guard::Read,
            "The running release and the cached rebuild's report",
        )
        .response("Object")
        .to(release_info, data.clone()),
        Route::post(
            "/api/v1/release/rebuild",
            Guard::Operator,
            "Rebuild the image from the bundle, offline; says identical or what differs",
        )
        .response("Object")
        .to(rebuild_now, data),
    ]
}

#[cfg(test)]
fn router(data: PathBuf) -> axum::Router {
    crate::http::routes::unguarded(routes(data))
}

async fn release_info(
    axum::extract::State(data): axum::extract::State<Arc<PathBuf>>,
) -> axum::Json<serde_json::Value> {
    let d = data.clone();
    let (release, cached) = tokio::task::spawn_blocking(move || {
        let release = crate::serve::file_digest(&d.join(RELEASE_MANIFEST)).ok();
        let cached = cached(&d).unwrap_or_else(|e| {
            tracing::warn!(error = format!("{e:#}"), "checking the cached rebuild");
            None
        });
        (release, cached)
    })
    .await
    .unwrap_or((None, None));
    axum::Json(serde_json::json!({ "release": release, "cached": cached }))
}

async fn rebuild_now(
    axum::extract::State(data): axum::extract::State<Arc<PathBuf>>,
) -> Result<axum::Json<RebuildReport>, crate::api::ApiError> {
    use axum::http::StatusCode;
    let Some(slot) = RebuildSlot::try_take() else {
        return Err(crate::api::ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "a rebuild is already running",
        ));
    };
    let d = data.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        rebuild(&d, &d.join(CACHE_RELEASE))
    })
    .await
    .map_err(|e| {
        crate::api::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rebuild_failed",
            format!("the rebuild task failed: {e}"),
        )
    })?;
    match r {
        Ok(r) => Ok(axum::Json(r)),
        Err(e) => Err(crate::api::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rebuild_failed",
            format!("{e:#}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_changed_inputs() {
        let a = br#"{"schema":"x","inputs":{"a":1,"b":2},"outputs":{"u":1},"epoch":1}"#;
        let b = br#"{"schema":"x","inputs":{"a":1,"b":3},"outputs":{"u":1},"epoch":2}"#;
        assert_eq!(manifest_diff(a, b), "differs in epoch, inputs.b");
        assert_eq!(manifest_diff(a, a), "same fields, different bytes");
    }

    async fn call(
        app: axum::Router,
        method: &str,
        uri: &str,
    ) -> (axum::http::StatusCode, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn api_reports_release_and_refuses_a_second_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("release")).unwrap();
        std::fs::write(dir.path().join(RELEASE_MANIFEST), b"abc").unwrap();
        let app = router(dir.path().to_path_buf());
        let (status, v) = call(app.clone(), "GET", "/api/v1/release").await;
        assert_eq!(status, 200);
        assert_eq!(
            v["release"],
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(v["cached"].is_null(), "{v}");
        // (The slot is per process: this is the only test that takes it.)
        {
            let _running = RebuildSlot::try_take().expect("free");
            assert!(RebuildSlot::try_take().is_none());
            let (status, v) = call(app.clone(), "POST", "/api/v1/release/rebuild").await;
            assert_eq!(status, 409, "{v}");
            assert_eq!(v["code"], "busy");
        }
        // Not a manifest: the rebuild fails with a JSON error, not a panic.
        let (status, v) = call(app, "POST", "/api/v1/release/rebuild").await;
        assert_eq!(status, 500, "{v}");
        assert_eq!(v["code"], "rebuild_failed");
        assert!(!dir.path().join(CACHE_RELEASE).exists());
    }

    #[test]
    fn missing_data_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let e = rebuild(dir.path(), &out).unwrap_err();
        assert!(format!("{e:#}").contains("release/manifest.json"), "{e:#}");
        assert!(!out.exists());
        assert!(cached(dir.path()).unwrap().is_none());
    }
}
