//! The agent's side of a clone job (PXE-booted into agent mode, handed
//! [`CaptureWork`] or [`DeployWork`]):
//!
//! - capture: pick the disk (the largest fixed disk holding a partition
//!   table), capture it with the server's store as the chunk store (its
//!   chunk list is fetched once; only missing chunks are compressed and
//!   uploaded), upload the manifest (the server makes the image);
//! - deploy/restore: fetch and check the manifest, pick the disk (the
//!   largest fixed disk at least the captured size), write it with the
//!   verified writer, grow the last ext4 to a bigger disk (mounted, the
//!   kernel's online resize), mount the root filesystem (the ext4 holding
//!   `/etc`) and give it the system's identity ([`super::identity`]).
//!
//! Progress goes to `POST /api/v1/clone/jobs/<id>/progress` at most every
//! two seconds and at each phase; a failure is reported with its message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::manifest::{Fs, Manifest};
use super::remote::{HttpFetch, HttpStore};
use super::server::{CaptureWork, DeployWork, JobProgress};
use super::store::ChunkStore;

const TARGET_MOUNT: &str = "/run/appliance/clone-target";

/// Sends progress for one job (the installer's reporter, aimed at the
/// clone job's progress URL).
pub struct Reporter(crate::install::Reporter);

impl Reporter {
    pub fn new(server: &str, job: &str, token: &str) -> Reporter {
        Reporter(crate::install::Reporter::to(
            format!(
                "{}/api/v1/clone/jobs/{job}/progress",
                server.trim_end_matches('/')
            ),
            token,
        ))
    }

    pub fn send(&mut self, p: &JobProgress) {
        self.0.send(p)
    }

    pub fn phase(&mut self, phase: &str, message: impl Into<String>) {
        self.0.phase(phase, message)
    }

    pub fn tick(&mut self, phase: &str, done: u64, total: u64) {
        self.0.tick(phase, done, total)
    }

    pub fn finish(&mut self, res: &Result<serde_json::Value>) {
        let p = match res {
            Ok(report) => JobProgress {
                phase: "done".into(),
                state: "done".into(),
                done_bytes: 0,
                total_bytes: 0,
                message: String::new(),
                report: Some(report.clone()),
            },
            Err(e) => JobProgress {
                phase: "failed".into(),
                state: "failed".into(),
                done_bytes: 0,
                total_bytes: 0,
                message: format!("{e:#}"),
                report: None,
            },
        };
        self.send(&p);
    }
}

/// The largest fixed disk that passes `ok`.
fn pick_disk(ok: impl Fn(&crate::install::DiskCandidate) -> bool) -> Result<String> {
    let disks = crate::install::scan_disks(Path::new("/sys"), Path::new("/dev"));
    disks
        .iter()
        .filter(|d| !d.removable && ok(d))
        .max_by_key(|d| d.size_bytes)
        .map(|d| d.name.clone())
        .ok_or_else(|| {
            let seen: Vec<String> = disks
                .iter()
                .map(|d| {
                    format!(
                        "{} ({} bytes{})",
                        d.name,
                        d.size_bytes,
                        if d.has_partitions {
                            ", partitioned"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            anyhow!(
                "no suitable disk among: {}",
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                }
            )
        })
}

/// Runs a capture job.
pub fn capture(work: &CaptureWork) -> Result<serde_json::Value> {
    let mut rep = Reporter::new(&work.server, &work.job, &work.token);
    let res = (|| {
        let disk = pick_disk(|d| d.has_partitions)?;
        let dev = Path::new("/dev").join(&disk);
        rep.phase("capture", format!("capturing {}", dev.display()));
        let store = HttpStore::connect(&work.server, &work.token)?;
        let (m, report) = super::capture_path(
            &dev,
            &store,
            &super::CaptureOptions::default(),
            &mut |d, t| rep.tick("capture", d, t),
        )?;
        rep.phase(
            "manifest",
            format!("{} chunks, {} new", report.chunks, report.new_chunks),
        );
        store
            .request("POST", "manifests", Some(&m.to_bytes()))
            .context("uploading the manifest")?;
        store.commit()?;
        Ok(serde_json::json!({"disk": disk, "capture": report}))
    })();
    rep.finish(&res);
    res
}

/// The device of partition `n` of `disk` (`vda1`, `nvme0n1p1`).
fn partition_dev(disk: &str, n: u32) -> PathBuf {
    let sep = if disk.chars().last().is_some_and(|c| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    Path::new("/dev").join(format!("{disk}{sep}{n}"))
}

fn wait_for(dev: &Path) -> Result<()> {
    let t = Instant::now();
    while !dev.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!(
                "{} did not appear after the partition table was written",
                dev.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Runs a deploy or restore job.
pub fn deploy(work: &DeployWork) -> Result<serde_json::Value> {
    let mut rep = Reporter::new(&work.server, &work.job, &work.token);
    let res = (|| {
        let store = HttpStore::reader(&work.server, &work.token);
        let bytes = store
            .get_blob(&work.manifest)
            .context("fetching the manifest")?;
        let m = Manifest::parse(&bytes).context("checking the manifest")?;
        let disk = pick_disk(|d| d.size_bytes >= m.disk_size && !d.read_only).map_err(|e| {
            anyhow!(
                "{e:#}; the image needs a disk of at least {} bytes",
                m.disk_size
            )
        })?;
        let dev = Path::new("/dev").join(&disk);
        rep.phase(
            "write",
            format!("writing {} onto {}", work.image, dev.display()),
        );
        let mut fetch = HttpFetch(&store);
        let w = super::deploy::deploy(&m, &mut fetch, &dev, &mut |p| {
            let phase = match p.phase {
                crate::writer::Phase::Write => "write",
                crate::writer::Phase::Verify => "verify",
                crate::writer::Phase::Finish => "finish",
            };
            rep.tick(phase, p.done, p.total)
        })?;
        rep.phase(
            "identity",
            format!("giving {} its identity", work.system.name),
        );
        let identity = personalise(&disk, &m, w.target_size, w.grown, &work.system);
        if let Err(e) = &identity {
            // Never leave a clone with someone else's identity bootable.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(&dev)
                .and_then(|f| {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&vec![0u8; 1 << 20], 0)?;
                    f.sync_all()
                });
            bail!("{e:#}; the disk's partition table was zeroed");
        }
        Ok(serde_json::json!({"disk": disk, "writer": w, "identity": identity?}))
    })();
    rep.finish(&res);
    res
}

fn personalise(
    disk: &str,
    m: &Manifest,
    target_size: u64,
    grown: bool,
    system: &crate::inventory::model::System,
) -> Result<serde_json::Value> {
    let mnt = Path::new(TARGET_MOUNT);
    std::fs::create_dir_all(mnt).with_context(|| format!("creating {}", mnt.display()))?;
    let grow = super::deploy::ext4_to_grow(m, target_size, grown);
    let mut grown_fs = serde_json::Value::Null;
    let mut identity = None;
    // Last partition first: it is the one that may grow, and usually root.
    let mut ext4: Vec<_> = m.partitions.iter().filter(|p| p.fs == Fs::Ext4).collect();
    ext4.sort_by_key(|p| std::cmp::Reverse(p.offset));
    for p in ext4 {
        let dev = if p.number == 0 {
            Path::new("/dev").join(disk)
        } else {
            partition_dev(disk, p.number)
        };
        wait_for(&dev)?;
        crate::mount::mount_ext4(&dev, mnt)?;
        let res = (|| -> Result<()> {
            if grow.is_some_and(|(off, _)| off == p.offset) {
                let sys_block = if p.number == 0 {
                    PathBuf::from("/sys/block")
                } else {
                    Path::new("/sys/block").join(disk)
                };
                let g = crate::growfs::grow_mounted(&dev, mnt, &sys_block)?;
                grown_fs = serde_json::json!(format!("{g:?}"));
            }
            if identity.is_none() && mnt.join("etc").is_dir() {
                identity = Some(super::identity::apply(mnt, system)?);
            }
            Ok(())
        })();
        rustix::fs::sync();
        let un = crate::mount::unmount_or_readonly(mnt);
        res?;
        un?;
    }
    let identity =
        identity.context("no ext4 partition of the image holds /etc: cannot set the identity")?;
    Ok(serde_json::json!({"grown": grown_fs, "identity": identity}))
}
