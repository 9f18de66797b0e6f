//! `appliance agent --install`: what a machine PXE-booted into
//! `appliance.mode=install` does once its parent hands it install work.
//!
//! 1. Fetch the parent's release manifest and its signature; verify the
//!    signature with the public key in our own initramfs
//!    (`/etc/appliance/release.pub`) and that the manifest is the release
//!    the work names.
//! 2. Fetch the block map; its image size must be the manifest's disk size.
//! 3. Pick the target disk ([`choose_disk`]): the named one, else the
//!    largest non-removable, writable disk big enough and with no partition
//!    table; a disk holding partitions only when the work says wipe.
//! 4. Stream the image's data ranges with the verified writer
//!    ([`crate::writer`]): each chunk's sha256 checked against the block
//!    map, the first MiB zeroed first and written last, read back before
//!    the partition table goes down.
//! 5. Mount the new data partition, check its `release/manifest.json` is the
//!    signed manifest byte for byte and the ESP's UKI has the manifest's
//!    digest, and write node state: `state/node.json` (the id the parent
//!    registered), `state/parent.json` (parent URL, credentials),
//!    `state/boot.json` (the uplink we installed through),
//!    `state/networks.json` (the provisioning networks to serve) and, when
//!    this machine's random pool is ready, `state/random-seed` (so the new
//!    node's first boot credits it instead of waiting for entropy).
//!    A failed check zeroes the first MiB again: nothing half-checked boots.
//! 6. Report to the parent at every phase, then ask init to reboot.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Public key the release must be signed with (in the initramfs).
pub const RELEASE_PUBKEY: &str = "/etc/appliance/release.pub";
/// Node state naming the image a replica was installed from:
/// `{"disk_digest","release","parent_url"}`.
pub const IMAGE_STATE: &str = "state/image.json";

/// Where the installer mounts the new disk's partitions.
const TARGET_MOUNT: &str = "/run/appliance/target";

/// A provisioning network the new replica will serve on one of its
/// non-uplink interfaces (in interface order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildNetwork {
    /// Our address and prefix, e.g. `10.78.0.1/24`.
    pub cidr: String,
    /// `A-B`; default: the upper half of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Install work the parent hands an agent booted in install mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallWork {
    /// `sha256:` of the manifest bytes: the release to install.
    pub release: String,
    /// Base URL of the parent, as the agent reached it.
    pub parent_url: String,
    pub parent_node_id: String,
    /// The node id the parent registered for this machine.
    pub node_id: String,
    /// Bearer token scoped to this replica.
    pub token: String,
    /// Networks to serve, assigned to non-uplink interfaces in order.
    #[serde(default)]
    pub networks: Vec<ChildNetwork>,
    /// Target disk name (`vda`), else chosen by policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Allow overwriting a disk that holds partitions.
    #[serde(default)]
    pub wipe: bool,
    /// The URL the new node keeps calling its parent at once installed
    /// (`https://host:8443` when the parent serves TLS); `parent_url`
    /// when absent. Only the installer's own reports use `parent_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_url: Option<String>,
    /// The parent's site CA (PEM), pinned by the new node for every call
    /// on `link_url` (`state/parent.json`'s `ca`). Public: it is the
    /// certificate, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// Progress report sent to the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallProgress {
    /// `verify`, `disk`, `stream`, `check`, `state`, `done`.
    pub phase: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    #[serde(default)]
    pub done_bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Seconds per phase, in the final report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// What [`choose_disk`] knows about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCandidate {
    pub name: String,
    pub size_bytes: u64,
    pub removable: bool,
    pub read_only: bool,
    pub has_partitions: bool,
}

/// Picks the target: `wanted` if given (still checked), else the largest
/// non-removable, writable disk of at least `min_size` bytes with no
/// partition table (any partition table when `wipe`). Ties: first name.
pub fn choose_disk(
    disks: &[DiskCandidate],
    min_size: u64,
    wanted: Option<&str>,
    wipe: bool,
) -> Result<String, String> {
    let check = |d: &DiskCandidate| -> Result<(), String> {
        if d.read_only {
            return Err(format!("{} is read-only", d.name));
        }
        if d.size_bytes < min_size {
            return Err(format!(
                "{} is too small: {} bytes, the image needs {min_size}",
                d.name, d.size_bytes
            ));
        }
        if d.has_partitions && !wipe {
            return Err(format!(
                "{} holds a partition table; it is only overwritten when the install policy says wipe",
                d.name
            ));
        }
        Ok(())
    };
    if let Some(w) = wanted {
        let d = disks
            .iter()
            .find(|d| d.name == w)
            .ok_or_else(|| format!("disk {w} not found"))?;
        check(d)?;
        return Ok(d.name.clone());
    }
    let mut why = Vec::new();
    let mut best: Option<&DiskCandidate> = None;
    for d in disks {
        if d.removable {
            why.push(format!("{} is removable", d.name));
            continue;
        }
        if let Err(e) = check(d) {
            why.push(e);
            continue;
        }
        if best.is_none_or(|b| d.size_bytes > b.size_bytes) {
            best = Some(d);
        }
    }
    best.map(|d| d.name.clone()).ok_or_else(|| {
        if why.is_empty() {
            "no disks found".to_owned()
        } else {
            format!("no disk qualifies: {}", why.join("; "))
        }
    })
}

/// True when the first sectors hold an MBR with a used entry or a GPT
/// header.
pub fn has_partition_table(first: &[u8]) -> bool {
    if first.len() >= 520 && &first[512..520] == b"EFI PART" {
        return true;
    }
    if first.len() >= 512 && first[510] == 0x55 && first[511] == 0xaa {
        return (0..4).any(|i| first[446 + i * 16 + 4] != 0);
    }
    false
}

/// Disks under `sys/block` (normally `/sys`), opened through `dev`.
pub fn scan_disks(sys: &Path, dev: &Path) -> Vec<DiskCandidate> {
    let hw = crate::hwinfo::collect(sys.parent().unwrap_or(Path::new("/")));
    hw.disks
        .iter()
        .map(|d| {
            let dir = sys.join("block").join(&d.name);
            let read_only = std::fs::read_to_string(dir.join("ro"))
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            let kernel_parts = std::fs::read_dir(&dir)
                .map(|rd| rd.flatten().any(|e| e.path().join("partition").exists()))
                .unwrap_or(false);
            let mut first = vec![0u8; 1024];
            let on_disk = std::fs::File::open(dev.join(&d.name))
                .and_then(|mut f| f.read_exact(&mut first))
                .map(|()| has_partition_table(&first))
                .unwrap_or(false);
            DiskCandidate {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                removable: d.removable,
                read_only,
                has_partitions: kernel_parts || on_disk,
            }
        })
        .collect()
}

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Reports progress to the parent (best effort: the install goes on when
/// the parent cannot be told).
pub struct Reporter {
    url: String,
    token: String,
    last: Instant,
}

impl Reporter {
    pub fn new(parent: &str, mac: &str, token: &str) -> Reporter {
        Reporter::to(
            format!(
                "{}/api/v1/agents/{mac}/progress",
                parent.trim_end_matches('/')
            ),
            token,
        )
    }

    /// A reporter posting to `url` (e.g. a clone job's progress).
    pub fn to(url: String, token: &str) -> Reporter {
        Reporter {
            url,
            token: token.to_owned(),
            last: Instant::now() - Duration::from_secs(60),
        }
    }

    pub fn send(&mut self, p: &InstallProgress) {
        crate::console::marker(&format!(
            "install {} {} {}/{} {}",
            p.phase, p.state, p.done_bytes, p.total_bytes, p.message
        ));
        self.last = Instant::now();
        let body = match serde_json::to_string(p) {
            Ok(b) => b,
            Err(_) => return,
        };
        let r = client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {}", self.token))
            .send(body);
        match r {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "progress report refused"),
            Err(e) => tracing::warn!(error = %e, "progress report failed"),
        }
    }

    /// Sends running progress at most every two seconds.
    pub fn tick(&mut self, phase: &str, done: u64, total: u64) {
        if self.last.elapsed() >= Duration::from_secs(2) || done == total {
            self.send(&InstallProgress {
                phase: phase.into(),
                state: "running".into(),
                done_bytes: done,
                total_bytes: total,
                message: String::new(),
                report: None,
            });
        }
    }

    /// Reports the install failed, with `message` (the error, in full).
    pub fn failed(&mut self, message: impl Into<String>) {
        self.send(&InstallProgress {
            phase: "failed".into(),
            state: "failed".into(),
            done_bytes: 0,
            total_bytes: 0,
            message: message.into(),
            report: None,
        });
    }

    pub fn phase(&mut self, phase: &str, message: impl Into<String>) {
        self.send(&InstallProgress {
            phase: phase.into(),
            state: "running".into(),
            done_bytes: 0,
            total_bytes: 0,
            message: message.into(),
            report: None,
        });
    }
}

/// The node state files written onto the new disk's data partition.
pub fn write_node_state(
    data: &Path,
    work: &InstallWork,
    disk_digest: &str,
    uplink: &str,
    others: &[String],
) -> Result<()> {
    let state = data.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let node_id: uuid::Uuid = work
        .node_id
        .parse()
        .with_context(|| format!("node id {:?} from the parent", work.node_id))?;
    write_json(&state.join("node.json"), &crate::node::NodeFile { node_id })?;
    // The link holds the replica token: mode 0600 (`parent::save`). With
    // the parent's CA it is https and pinned from the first boot on.
    let parent_node_id: uuid::Uuid = work
        .parent_node_id
        .parse()
        .with_context(|| format!("parent node id {:?}", work.parent_node_id))?;
    crate::parent::save(
        data,
        &crate::parent::ParentLink {
            url: work
                .link_url
                .clone()
                .unwrap_or_else(|| work.parent_url.clone()),
            token: work.token.clone(),
            node_id,
            parent_node_id,
            ca: work.ca.clone(),
        },
    )?;
    write_json(
        &state.join("boot.json"),
        &serde_json::json!({ "uplink": uplink }),
    )?;
    // This machine's own pool, when the agent's boot got it ready: the
    // new node's first boot then credits it instead of waiting.
    match crate::entropy::save_seed(data, &mut crate::entropy::Kernel) {
        Ok(saved) => tracing::info!(saved, "random seed for the first boot"),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "writing a random seed failed"),
    }
    write_json(
        &data.join(IMAGE_STATE),
        &serde_json::json!({
            "disk_digest": disk_digest,
            "release": work.release,
            "parent_url": work.parent_url,
        }),
    )?;
    let nets: Vec<serde_json::Value> = work
        .networks
        .iter()
        .zip(others)
        .map(|(n, iface)| {
            let mut v = serde_json::json!({
                "iface": iface,
                "cidr": n.cidr,
                "mode": "authoritative",
            });
            if let Some(p) = &n.pool {
                v["pool"] = serde_json::Value::String(p.clone());
            }
            v
        })
        .collect();
    if work.networks.len() > others.len() {
        tracing::warn!(
            networks = work.networks.len(),
            interfaces = others.len(),
            "more provisioning networks than spare interfaces; the rest are not served"
        );
    }
    write_json(&state.join("networks.json"), &nets)?;
    Ok(())
}

/// Writes pretty JSON durably: temporary file, sync, rename, sync the
/// directory (the inventory's atomic write).
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    crate::state::write_atomic(path, &bytes, true, crate::state::Secrecy::Public)
        .with_context(|| format!("writing {}", path.display()))
}

/// Zeroes the first MiB so the disk no longer boots.
fn unboot(dev: &Path) {
    let res = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&vec![0u8; 1 << 20])?;
            f.sync_all()
        });
    if let Err(e) = res {
        tracing::error!(dev = %dev.display(), error = %e, "zeroing the partition table failed");
    }
}

/// The partition named `name` on disk `disk`, waiting up to `timeout`.
fn partition_on(disk: &str, name: &str, timeout: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        let dir = Path::new("/sys/block").join(disk);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let ev = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
                let ev = crate::partition::parse_uevent(&ev);
                if ev.devtype.as_deref() == Some("partition")
                    && ev.partname.as_deref() == Some(name)
                {
                    if let Some(d) = ev.devname {
                        return Some(Path::new("/dev").join(d));
                    }
                }
            }
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a whole install. `mac` and `uplink` are the interface we booted
/// from; `others` the remaining NICs (served networks go there).
pub fn run(
    work: &InstallWork,
    mac: &str,
    uplink: &str,
    others: &[String],
) -> Result<serde_json::Value> {
    let mut rep = Reporter::new(&work.parent_url, mac, &work.token);
    let started = Instant::now();
    let base = work.parent_url.trim_end_matches('/');

    // 1. The signed release.
    rep.phase("verify", format!("release {}", work.release));
    let manifest = crate::writer::fetch_all(
        &format!("{base}/api/v1/release/manifest"),
        Duration::from_secs(300),
    )?;
    let signature = crate::writer::fetch_all(
        &format!("{base}/api/v1/release/signature"),
        Duration::from_secs(300),
    )?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    if got != work.release {
        bail!(
            "the parent's manifest is {got}, but the work names {}",
            work.release
        );
    }
    let pubkey = std::fs::read_to_string(RELEASE_PUBKEY)
        .with_context(|| format!("reading the release public key {RELEASE_PUBKEY}"))?;
    let key = builder::signature::parse_public_key(pubkey.trim())
        .map_err(|e| anyhow!("the release public key {RELEASE_PUBKEY}: {e}"))?;
    builder::signature::verify(&signature, &manifest, &key)
        .map_err(|e| anyhow!("the release signature does not verify: {e}"))?;
    let parsed = builder::manifest::Manifest::from_bytes(&manifest)
        .context("parsing the signed manifest")?;
    let disk_rec = parsed
        .disk
        .as_ref()
        .context("the signed manifest describes no disk image")?;

    // 2. The block map.
    let bmap_bytes = crate::writer::fetch_all(
        &format!("{base}/api/v1/release/bmap"),
        Duration::from_secs(600),
    )?;
    let bmap = crate::bmap::Bmap::parse(&bmap_bytes).context("parsing the block map")?;
    let disk_digest = bmap
        .disk_digest
        .clone()
        .context("the parent's block map names no disk digest (<DiskDigest>)")?;
    if bmap.image_size != disk_rec.size {
        bail!(
            "the block map is for a {}-byte image, the signed manifest's disk is {} bytes",
            bmap.image_size,
            disk_rec.size
        );
    }

    // 3. The disk.
    let disks = scan_disks(Path::new("/sys"), Path::new("/dev"));
    let disk = choose_disk(&disks, bmap.image_size, work.disk.as_deref(), work.wipe)
        .map_err(|e| anyhow!("choosing the target disk: {e}"))?;
    let dev = Path::new("/dev").join(&disk);
    rep.phase("disk", format!("writing to {}", dev.display()));

    // 4. Stream and write.
    let t_stream = Instant::now();
    let total = bmap.mapped_bytes();
    let mut source = crate::writer::HttpSource::new(
        &format!("{base}/api/v1/release/image"),
        None,
        crate::writer::RetryPolicy::default(),
    );
    let report = crate::writer::write_image(
        &bmap,
        &mut source,
        &dev,
        &crate::writer::WriteOptions::default(),
        &mut |p: crate::writer::Progress| {
            let phase = match p.phase {
                crate::writer::Phase::Write => "stream",
                crate::writer::Phase::Verify => "verify",
                crate::writer::Phase::Finish => "finish",
            };
            rep.tick(phase, p.done, p.total)
        },
    )
    .with_context(|| format!("writing the image to {}", dev.display()))?;
    let stream_secs = t_stream.elapsed().as_secs_f64();

    // 5. Check and personalise.
    let t_state = Instant::now();
    rep.phase(
        "check",
        "checking the written release and writing node state",
    );
    if let Err(e) = check_and_personalise(
        &disk,
        work,
        &manifest,
        &parsed,
        &disk_digest,
        uplink,
        others,
    ) {
        unboot(&dev);
        return Err(e.context("the written disk failed its checks; its partition table was zeroed"));
    }
    rustix::fs::sync();
    let report = serde_json::json!({
        "disk": disk,
        "stream_seconds": stream_secs,
        "state_seconds": t_state.elapsed().as_secs_f64(),
        "total_seconds": started.elapsed().as_secs_f64(),
        "writer": report,
    });
    rep.send(&InstallProgress {
        phase: "done".into(),
        state: "done".into(),
        done_bytes: total,
        total_bytes: total,
        message: format!("installed release {} on {disk}", work.release),
        report: Some(report.clone()),
    });
    Ok(report)
}

fn check_and_personalise(
    disk: &str,
    work: &InstallWork,
    manifest: &[u8],
    parsed: &builder::manifest::Manifest,
    disk_digest: &str,
    uplink: &str,
    others: &[String],
) -> Result<()> {
    let mnt = Path::new(TARGET_MOUNT);
    // The ESP: its UKI must be the signed one.
    let esp = crate::contract::ESP_PARTNAMES
        .iter()
        .find_map(|n| partition_on(disk, n, Duration::from_millis(1)))
        .or_else(|| partition_on(disk, "esp", Duration::from_secs(10)))
        .context("the written disk has no ESP partition")?;
    if let Some(uki) = parsed.outputs.get("uki") {
        std::fs::create_dir_all(mnt)?;
        crate::mount::mount_vfat_ro(&esp, mnt)?;
        let got = std::fs::read(mnt.join("EFI/BOOT/BOOTX64.EFI"))
            .map(|b| format!("sha256:{}", hex::encode(Sha256::digest(&b))));
        crate::mount::unmount_lazy(mnt)?;
        let got = got.context("reading EFI/BOOT/BOOTX64.EFI on the written ESP")?;
        if got != uki.digest.to_string() {
            bail!(
                "the written UKI is {got}, the signed manifest says {}",
                uki.digest
            );
        }
    }
    let data = partition_on(
        disk,
        crate::contract::DATA_PARTNAME,
        Duration::from_secs(10),
    )
    .context("the written disk has no appliance-data partition")?;
    std::fs::create_dir_all(mnt)?;
    crate::mount::mount_ext4(&data, mnt)?;
    let res = (|| -> Result<()> {
        let on_disk = std::fs::read(mnt.join(crate::contract::RELEASE_MANIFEST))
            .context("reading release/manifest.json on the written disk")?;
        if on_disk != manifest {
            bail!("release/manifest.json on the written disk is not the signed manifest");
        }
        write_node_state(mnt, work, disk_digest, uplink, others)
    })();
    rustix::fs::sync();
    let un = crate::mount::unmount_or_readonly(mnt);
    res?;
    un
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str, gib: u64, removable: bool, parts: bool) -> DiskCandidate {
        DiskCandidate {
            name: name.into(),
            size_bytes: gib << 30,
            removable,
            read_only: false,
            has_partitions: parts,
        }
    }

    #[test]
    fn picks_the_largest_blank_fixed_disk() {
        let disks = [
            d("sda", 8, true, false),
            d("vda", 4, false, false),
            d("vdb", 16, false, true),
            d("vdc", 6, false, false),
        ];
        assert_eq!(choose_disk(&disks, 4 << 30, None, false).unwrap(), "vdc");
        assert_eq!(choose_disk(&disks, 4 << 30, None, true).unwrap(), "vdb");
        assert_eq!(
            choose_disk(&disks, 4 << 30, Some("sda"), false).unwrap(),
            "sda"
        );
    }

    #[test]
    fn refusals_name_the_reason() {
        let disks = [d("vda", 2, false, false), d("vdb", 8, false, true)];
        let e = choose_disk(&disks, 4 << 30, None, false).unwrap_err();
        assert!(e.contains("vda is too small"), "{e}");
        assert!(e.contains("vdb holds a partition table"), "{e}");
        let e = choose_disk(&disks, 4 << 30, Some("vdx"), false).unwrap_err();
        assert!(e.contains("not found"), "{e}");
        assert_eq!(
            choose_disk(&[], 1, None, false).unwrap_err(),
            "no disks found"
        );
    }

    #[test]
    fn partition_tables_are_recognised() {
        let mut s = vec![0u8; 1024];
        assert!(!has_partition_table(&s));
        s[510] = 0x55;
        s[511] = 0xaa;
        assert!(!has_partition_table(&s), "boot signature but no entries");
        s[446 + 4] = 0xee;
        assert!(has_partition_table(&s));
        let mut g = vec![0u8; 1024];
        g[512..520].copy_from_slice(b"EFI PART");
        assert!(has_partition_table(&g));
    }

    #[test]
    fn node_state_files() {
        let dir = tempfile::tempdir().unwrap();
        let work = InstallWork {
            release: "sha256:00".into(),
            parent_url: "http://10.0.0.1".into(),
            parent_node_id: uuid::Uuid::from_u128(1).to_string(),
            node_id: uuid::Uuid::nil().to_string(),
            token: "apl_x".into(),
            networks: vec![ChildNetwork {
                cidr: "10.1.2.1/24".into(),
                pool: None,
            }],
            disk: None,
            wipe: false,
            link_url: Some("https://10.0.0.1:8443".into()),
            ca: Some("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into()),
        };
        write_node_state(
            dir.path(),
            &work,
            "sha256:11",
            "eth0",
            &["eth1".into(), "eth2".into()],
        )
        .unwrap();
        let read = |f: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(dir.path().join("state").join(f)).unwrap())
                .unwrap()
        };
        assert_eq!(read("node.json")["node_id"], uuid::Uuid::nil().to_string());
        assert_eq!(read("parent.json")["token"], "apl_x");
        // The installed node calls its parent over https, pinning its CA,
        // and its token is readable by root only.
        assert_eq!(read("parent.json")["url"], "https://10.0.0.1:8443");
        assert!(read("parent.json")["ca"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("state/parent.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "parent.json holds the replica token");
        }
        assert_eq!(read("boot.json")["uplink"], "eth0");
        assert_eq!(read("image.json")["disk_digest"], "sha256:11");
        let nets = read("networks.json");
        assert_eq!(nets.as_array().unwrap().len(), 1);
        assert_eq!(nets[0]["iface"], "eth1");
        let spec: Vec<crate::network::NetworkSpec> =
            serde_json::from_value(nets).expect("networks.json is what network.rs reads");
        assert_eq!(spec[0].cidr, "10.1.2.1/24");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}
