//! Flashing the appliance onto a disk or file (`appliance flash`, `POST
//! /api/v1/flash`) and listing candidate disks (`GET /api/v1/disks`).
//!
//! The writing is [`crate::writer`]'s; this module decides what may be
//! written: never a mounted device or one with a mounted partition, never
//! the disk the running system booted from (the one holding the partition
//! mounted at the data directory), never a target smaller than the image.
//! A regular file that does not exist is created with the image's size
//! (sparse) and removed again if the write fails.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::bmap::Bmap;
use crate::http::{Guard, Route};
use crate::writer::{self, FileSource, Progress, WriteOptions, WriteReport};

/// The image `flash` writes unless told otherwise: what `appliance
/// rebuild` produces.
pub const DEFAULT_IMAGE: &str = "/data/cache/release/appliance.img";

/// Where the system sees things; tests point these at fakes.
#[derive(Debug, Clone)]
pub struct System {
    /// `/sys/class/block`.
    pub sys_block: PathBuf,
    /// `/proc/self/mounts` text.
    pub mounts: String,
    /// The data directory (its device's disk is the boot disk).
    pub data_dir: PathBuf,
}

impl System {
    /// The running system.
    pub fn current(data_dir: &Path) -> System {
        System {
            sys_block: PathBuf::from("/sys/class/block"),
            mounts: std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
            data_dir: data_dir.to_owned(),
        }
    }

    /// `(device name, mount point)` for every mount of a `/dev/` node.
    fn mounted(&self) -> Vec<(String, String)> {
        parse_mounts(&self.mounts)
            .into_iter()
            .filter_map(|(src, at)| {
                let p = std::fs::canonicalize(&src).unwrap_or_else(|_| PathBuf::from(&src));
                let name = p.strip_prefix("/dev").ok()?.to_str()?.to_owned();
                Some((name, at))
            })
            .collect()
    }

    /// The disk a block device name belongs to (itself for a disk).
    fn disk_of(&self, name: &str) -> String {
        if self.sys_block.join(name).join("partition").exists() {
            // /sys/class/block/sda2 -> …/block/sda/sda2
            if let Ok(real) = std::fs::canonicalize(self.sys_block.join(name)) {
                if let Some(parent) = real.parent().and_then(|p| p.file_name()) {
                    return parent.to_string_lossy().into_owned();
                }
            }
        }
        name.to_owned()
    }

    /// The disk holding the filesystem mounted at the data directory.
    pub fn boot_disk(&self) -> Option<String> {
        let data = self.data_dir.to_string_lossy();
        self.mounted()
            .into_iter()
            .rfind(|(_, at)| *at == data)
            .map(|(name, _)| self.disk_of(&name))
    }

    /// Mount points of `disk` and of its partitions.
    fn mounts_of(&self, disk: &str) -> Vec<String> {
        self.mounted()
            .into_iter()
            .filter(|(name, _)| self.disk_of(name) == disk)
            .map(|(_, at)| at)
            .collect()
    }
}

/// Source and mount point of each line of `/proc/self/mounts`
/// (octal escapes such as `\040` decoded).
pub fn parse_mounts(text: &str) -> Vec<(String, String)> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((unescape(f.next()?), unescape(f.next()?)))
        })
        .collect()
}

/// A disk that could be flashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub removable: bool,
    pub model: Option<String>,
    /// An MBR signature or a GPT header in its first sectors.
    pub has_partition_table: bool,
    /// The disk or one of its partitions is mounted.
    pub mounted: bool,
    /// It holds the running system's data partition.
    pub boot_disk: bool,
}

/// Whole disks under `sys_block` (no partitions, loop, ram, zram, dm or
/// optical devices, nothing of size 0), sorted by name.
pub fn list_disks(sys: &System) -> Vec<Disk> {
    let boot = sys.boot_disk();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(&sys.sys_block) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if p.join("partition").exists()
            || ["loop", "ram", "zram", "dm-", "sr", "md"]
                .iter()
                .any(|x| name.starts_with(x))
        {
            continue;
        }
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .map(|s| s.trim().to_owned())
                .ok()
        };
        let size = read("size")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            * 512;
        if size == 0 {
            continue;
        }
        let path = format!("/dev/{name}");
        out.push(Disk {
            has_partition_table: has_partition_table(Path::new(&path)),
            mounted: !sys.mounts_of(&name).is_empty(),
            boot_disk: boot.as_deref() == Some(name.as_str()),
            removable: read("removable").as_deref() == Some("1"),
            model: read("device/model").filter(|m| !m.is_empty()),
            size,
            path,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn has_partition_table(dev: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1024];
    let Ok(f) = std::fs::File::open(dev) else {
        return false;
    };
    if f.read_exact_at(&mut b, 0).is_err() {
        return false;
    }
    b[510..512] == [0x55, 0xAA] || &b[512..520] == b"EFI PART"
}

/// Refuses a target that must not be written (see the module doc).
/// `image_size` is the size the target must have at least.
pub fn check_target(sys: &System, target: &Path, image: &Path, image_size: u64) -> Result<()> {
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        // A new file is created with the image's size.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", target.display())),
    };
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Ok(im) = std::fs::metadata(image) {
        if im.dev() == meta.dev() && im.ino() == meta.ino() {
            bail!("{} is the image itself", target.display());
        }
    }
    if meta.file_type().is_block_device() {
        let real = std::fs::canonicalize(target)
            .with_context(|| format!("resolving {}", target.display()))?;
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if sys.sys_block.join(&name).join("partition").exists() {
            bail!(
                "{} is a partition; flash the whole disk ({})",
                target.display(),
                sys.disk_of(&name)
            );
        }
        if sys.boot_disk().as_deref() == Some(name.as_str()) {
            bail!(
                "{} is the disk this system booted from (it holds {})",
                target.display(),
                sys.data_dir.display()
            );
        }
        let mounts = sys.mounts_of(&name);
        if !mounts.is_empty() {
            bail!(
                "{} is in use: mounted at {}",
                target.display(),
                mounts.join(", ")
            );
        }
    } else if !meta.is_file() {
        bail!(
            "{} is neither a block device nor a regular file",
            target.display()
        );
    }
    let size = std::fs::File::open(target)
        .and_then(|f| crate::blkdev::size_of(&f))
        .with_context(|| format!("reading the size of {}", target.display()))?;
    if size < image_size {
        bail!(
            "{} is too small: {size} bytes, the image needs {image_size} ({} MiB more)",
            target.display(),
            (image_size - size).div_ceil(1 << 20)
        );
    }
    Ok(())
}

/// The map of `image`: `bmap` (a block map file's text, bmaptool's
/// format) if given, else `<image>.bmap`, else computed. A given or found
/// map is checked against the image ([`Bmap::parse_for_image`]).
pub fn image_map(image: &Path, bmap: Option<String>) -> Result<Bmap> {
    match bmap {
        Some(b) => Bmap::parse_for_image(b.as_bytes(), image)
            .with_context(|| format!("using the given block map for {}", image.display())),
        None => Bmap::for_image(image).with_context(|| format!("mapping {}", image.display())),
    }
}

/// Checks `target`, creates it when it is a missing file, and writes
/// `image` (mapped by `bmap`) onto it. A file this call created is removed
/// if the write fails.
pub fn flash(
    sys: &System,
    image: &Path,
    bmap: &Bmap,
    target: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<WriteReport> {
    check_target(sys, target, image, bmap.image_size)?;
    write_to(bmap, target, |bmap| {
        FileSource::open(image)
            .and_then(|mut src| writer::write_image(bmap, &mut src, target, opts, progress))
    })
}

/// Like [`flash`], from another appliance: the image and its block map
/// served at `<base>/api/v1/release/{bmap,image}` (what a replica installs),
/// fetched with HTTP Range requests that resume after a dropped connection.
/// Every chunk is checked against the served block map.
pub fn flash_from(
    sys: &System,
    base: &str,
    target: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<WriteReport> {
    let base = base.trim_end_matches('/');
    let url = format!("{base}/api/v1/release/bmap");
    let bytes = writer::fetch_all(&url, std::time::Duration::from_secs(300))?;
    let bmap = Bmap::parse(&bytes).with_context(|| format!("parsing {url}"))?;
    check_target(sys, target, Path::new(""), bmap.image_size)?;
    write_to(&bmap, target, |bmap| {
        let mut src = writer::HttpSource::new(
            &format!("{base}/api/v1/release/image"),
            None,
            writer::RetryPolicy::default(),
        );
        writer::write_image(bmap, &mut src, target, opts, progress)
    })
}

/// Creates `target` at the image's size when it is a missing file, runs
/// `write`, and removes the file it created if the write fails.
fn write_to(
    bmap: &Bmap,
    target: &Path,
    write: impl FnOnce(&Bmap) -> Result<WriteReport>,
) -> Result<WriteReport> {
    let mut created = false;
    if !target.exists() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .with_context(|| format!("creating {}", target.display()))?;
        created = true;
        f.set_len(bmap.image_size)
            .with_context(|| format!("sizing {}", target.display()))?;
    }
    let result = write(bmap);
    if result.is_err() && created {
        let _ = std::fs::remove_file(target);
    }
    result
}

/// `POST /api/v1/flash` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashRequest {
    /// Block device (or file) to write.
    pub device: PathBuf,
    /// Image to write; default: the verified rebuild in the server's data
    /// directory (`<data>/cache/release/appliance.img`, [`DEFAULT_IMAGE`]
    /// on the appliance).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// The image's block map: the text of a bmaptool block map file
    /// (`appliance bmap` or `bmaptool create`); default `<image>.bmap` or
    /// computed.
    #[serde(default)]
    pub bmap: Option<String>,
    /// Leave the target's bytes between mapped ranges as they are (a blank
    /// target) instead of zeroing them.
    #[serde(default)]
    pub keep_holes: bool,
}

/// `GET /api/v1/flash`: the last flash started since the server started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlashStatus {
    /// `idle`, `running`, `done` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<WriteReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The API's state: the data directory and the one flash job.
#[derive(Clone)]
pub struct FlashState {
    pub data_dir: PathBuf,
    pub status: Arc<Mutex<FlashStatus>>,
}

impl FlashState {
    pub fn new(data_dir: &Path) -> FlashState {
        FlashState {
            data_dir: data_dir.to_owned(),
            status: Arc::new(Mutex::new(FlashStatus {
                state: "idle",
                ..FlashStatus::default()
            })),
        }
    }
}

/// `GET /api/v1/disks`, `GET`/`POST /api/v1/flash`.
pub fn routes(state: FlashState) -> Vec<Route> {
    vec![
        Route::get(
            "/api/v1/disks",
            Guard::Read,
            "Local disks a flash could write: size, removable, mounted, boot disk",
        )
        .response("[Object]")
        .to(disks, state.clone()),
        Route::get(
            "/api/v1/flash",
            Guard::Read,
            "The flash in progress or last done",
        )
        .response("Object")
        .to(status, state.clone()),
        Route::post(
            "/api/v1/flash",
            Guard::Admin,
            "Write the appliance image onto a local disk (verified, first MiB last)",
        )
        .request("Object")
        .response("Object")
        .to(start, state),
    ]
}

#[cfg(test)]
fn router(state: FlashState) -> Router {
    crate::http::routes::unguarded(routes(state))
}

async fn disks(
    State(st): State<FlashState>,
    page: crate::http::PageParams,
) -> Json<crate::http::Paged<Disk>> {
    let sys = System::current(&st.data_dir);
    let list = tokio::task::spawn_blocking(move || list_disks(&sys))
        .await
        .unwrap_or_default();
    Json(page.page(list, |d| d.name.clone()))
}

async fn status(State(st): State<FlashState>) -> Json<FlashStatus> {
    Json(st.status.lock().map(|s| s.clone()).unwrap_or_default())
}

/// Checks the request synchronously (400 with `flash_refused` and the
/// reason), then writes in the background: 202 with the status; poll `GET
/// /api/v1/flash` until `state` is `done` (with the report) or `failed`.
async fn start(
    State(st): State<FlashState>,
    body: Result<Json<FlashRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<FlashStatus>), ApiError> {
    let Json(req) = body?;
    {
        let s = st
            .status
            .lock()
            .map_err(|_| internal("flash status lock poisoned"))?;
        if s.state == "running" {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "flash_running",
                format!(
                    "already flashing {}",
                    s.device.as_deref().unwrap_or(Path::new("?")).display()
                ),
            ));
        }
    }
    let image = req.image.clone().unwrap_or_else(|| {
        st.data_dir
            .join(crate::rebuild::CACHE_RELEASE)
            .join("appliance.img")
    });
    let sys = System::current(&st.data_dir);
    let (img, dev, bmap) = (image.clone(), req.device.clone(), req.bmap);
    let checked = tokio::task::spawn_blocking(move || -> Result<(System, Bmap)> {
        let bmap = image_map(&img, bmap)?;
        check_target(&sys, &dev, &img, bmap.image_size)?;
        Ok((sys, bmap))
    })
    .await
    .map_err(|e| internal(&e.to_string()))?;
    let (sys, bmap) = checked
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "flash_refused", format!("{e:#}")))?;
    let running = FlashStatus {
        state: "running",
        device: Some(req.device.clone()),
        image: Some(image.clone()),
        ..FlashStatus::default()
    };
    *st.status
        .lock()
        .map_err(|_| internal("flash status lock poisoned"))? = running.clone();
    let status = st.status.clone();
    let opts = WriteOptions {
        zero_holes: !req.keep_holes,
        ..WriteOptions::default()
    };
    let device = req.device;
    std::thread::spawn(move || {
        let progress_status = status.clone();
        let mut progress = move |p: Progress| {
            if let Ok(mut s) = progress_status.lock() {
                s.progress = Some(p);
            }
        };
        tracing::info!(device = %device.display(), image = %image.display(), "flashing");
        let result = flash(&sys, &image, &bmap, &device, &opts, &mut progress);
        let mut s = match status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match result {
            Ok(r) => {
                tracing::info!(device = %device.display(), report = ?r, "flash done");
                s.state = "done";
                s.report = Some(r);
            }
            Err(e) => {
                tracing::error!(device = %device.display(), "flash failed: {e:#}");
                s.state = "failed";
                s.error = Some(format!("{e:#}"));
            }
        }
    });
    Ok((StatusCode::ACCEPTED, Json(running)))
}

fn internal(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        why.to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/class/block: disks `vda` (partitions vda1, vda2) and
    /// `sdb` (partition sdb1), laid out as the kernel does (class entries
    /// are links into the device tree).
    fn fake_sys(root: &Path, mounts: &str) -> System {
        let devs = root.join("devices");
        for (disk, parts, size) in [
            ("vda", &["vda1", "vda2"][..], "8388608"),
            ("sdb", &["sdb1"][..], "1000"),
        ] {
            let d = devs.join(disk);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("size"), size).unwrap();
            std::fs::write(d.join("removable"), if disk == "sdb" { "1" } else { "0" }).unwrap();
            for p in parts {
                std::fs::create_dir_all(d.join(p)).unwrap();
                std::fs::write(d.join(p).join("partition"), "1").unwrap();
            }
        }
        let class = root.join("class");
        std::fs::create_dir_all(&class).unwrap();
        for (name, to) in [
            ("vda", "vda"),
            ("vda1", "vda/vda1"),
            ("vda2", "vda/vda2"),
            ("sdb", "sdb"),
            ("sdb1", "sdb/sdb1"),
        ] {
            std::os::unix::fs::symlink(devs.join(to), class.join(name)).unwrap();
        }
        System {
            sys_block: class,
            mounts: mounts.into(),
            data_dir: PathBuf::from("/data"),
        }
    }

    #[test]
    fn mounts_parse_with_escapes() {
        let m =
            parse_mounts("/dev/vda2 /data ext4 rw 0 0\n/dev/sdb1 /mnt/my\\040stick vfat rw 0 0\n");
        assert_eq!(m[1], ("/dev/sdb1".into(), "/mnt/my stick".into()));
    }

    #[test]
    fn boot_disk_and_mounted_disks_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let sys = fake_sys(
            dir.path(),
            "proc /proc proc rw 0 0\n/dev/vda2 /data ext4 rw 0 0\n/dev/sdb1 /mnt vfat rw 0 0\n",
        );
        assert_eq!(sys.boot_disk().as_deref(), Some("vda"));
        assert_eq!(sys.mounts_of("sdb"), vec!["/mnt".to_string()]);
        let disks = list_disks(&sys);
        let names: Vec<_> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.boot_disk, d.mounted, d.removable, d.size))
            .collect();
        assert_eq!(
            names,
            vec![
                ("sdb", false, true, true, 512_000),
                ("vda", true, true, false, 4 << 30)
            ]
        );
    }

    #[test]
    fn file_targets_too_small_or_the_image_itself_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sys = fake_sys(dir.path(), "");
        let image = dir.path().join("a.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let e = check_target(&sys, &image, &image, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("is the image itself"), "{e}");
        let small = dir.path().join("small.img");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(1000)
            .unwrap();
        let e = check_target(&sys, &small, &image, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("is too small"), "{e}");
        check_target(&sys, &dir.path().join("new.img"), &image, 1 << 20).unwrap();
        let e = check_target(&sys, dir.path(), &image, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
    }

    #[test]
    fn a_new_file_is_created_and_removed_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let sys = fake_sys(dir.path(), "");
        let image = dir.path().join("a.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 3 << 20).unwrap();
        let bmap = Bmap::from_file(&image, 1 << 20).unwrap();
        let out = dir.path().join("out.img");
        flash(
            &sys,
            &image,
            &bmap,
            &out,
            &WriteOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
        // A map that does not match the image: the new file goes away.
        let mut wrong = bmap.clone();
        wrong.ranges[0].digest = crate::bmap::digest_of(b"other");
        let out2 = dir.path().join("out2.img");
        let e = flash(
            &sys,
            &image,
            &wrong,
            &out2,
            &WriteOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("failed its check"), "{e:#}");
        assert!(!out2.exists());
    }

    async fn call(
        app: Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn api_refuses_at_once_then_flashes_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 3 << 20).unwrap();
        let small = dir.path().join("small.img");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let app = router(FlashState::new(dir.path()));
        let (st, v) = call(app.clone(), "GET", "/api/v1/flash", "").await;
        assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("idle")));
        let req = |dev: &Path| serde_json::json!({"device": dev, "image": image}).to_string();
        let (st, v) = call(app.clone(), "POST", "/api/v1/flash", &req(&small)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["code"], "flash_refused");
        assert!(v["message"].as_str().unwrap().contains("too small"), "{v}");
        let (st, v) = call(
            app.clone(),
            "POST",
            "/api/v1/flash",
            r#"{"device":"/x","nope":1}"#,
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        let out = dir.path().join("out.img");
        let (st, v) = call(app.clone(), "POST", "/api/v1/flash", &req(&out)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["state"], "running");
        let v = loop {
            let (_, v) = call(app.clone(), "GET", "/api/v1/flash", "").await;
            if v["state"] != "running" {
                break v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(v["state"], "done", "{v}");
        assert_eq!(v["report"]["image_size"], 8 << 20);
        assert_eq!(v["progress"]["phase"], "finish");
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
    }

    #[tokio::test]
    async fn api_takes_the_block_map_file_text() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 5 << 20).unwrap();
        let map = String::from_utf8(Bmap::from_file(&image, 1 << 20).unwrap().to_bytes()).unwrap();
        let app = router(FlashState::new(dir.path()));
        let req = |out: &Path, bmap: &str| {
            serde_json::json!({"device": out, "image": image, "bmap": bmap}).to_string()
        };
        // A map that is not one, or not this image's: refused at once.
        let bad = map.replacen("</Range>", " </Range>", 1);
        let other = map.replace("<ImageSize> 8388608 ", "<ImageSize> 8388609 ");
        for (m, want) in [
            (bad.as_str(), "damaged or was edited"),
            (other.as_str(), "BlocksCount"),
        ] {
            let (st, v) = call(
                app.clone(),
                "POST",
                "/api/v1/flash",
                &req(&dir.path().join("x.img"), m),
            )
            .await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
            assert!(v["message"].as_str().unwrap().contains(want), "{v}");
        }
        let out = dir.path().join("out.img");
        let (st, v) = call(app.clone(), "POST", "/api/v1/flash", &req(&out, &map)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        let v = loop {
            let (_, v) = call(app.clone(), "GET", "/api/v1/flash", "").await;
            if v["state"] != "running" {
                break v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(v["state"], "done", "{v}");
        assert_eq!(v["report"]["bytes_fetched"], 4096);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
    }
}
