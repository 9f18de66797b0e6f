//! What the agent does with [`OsInstallWork`]: install Debian onto the
//! local disk from the appliance's mirror.
//!
//! 1. `disk`: pick the disk ([`crate::install::choose_disk`]), zero its
//!    first and last MiB (no old table or boot code survives), write a GPT
//!    (`bios` 1 MiB BIOS boot, `esp` FAT32, `root` ext4 the rest): one
//!    layout boots under UEFI and BIOS.
//! 2. `index`/`download`: verify the mirror's signed indexes and download
//!    the first-stage packages (essential, apt, debconf, e2fsprogs,
//!    dosfstools and their closure), each checked against its index entry.
//! 3. `filesystems`: `mke2fs` and `mkfs.fat` from the verified e2fsprogs
//!    and dosfstools packages, unpacked into a scratch directory and run
//!    through their own dynamic loader.
//! 4. `unpack`: mount the root (and the ESP at `/boot/efi`), make `/usr`
//!    merged, unpack every first-stage package's `data.tar` (in Rust).
//! 5. `base`: in a chroot, `dpkg --install --force-depends` the first
//!    stage (every maintainer script runs for real), then
//!    `dpkg --configure -a`.
//! 6. `packages`: `apt-get update` against the mirror (with the repo's
//!    keyring as `Signed-By`, never `trusted=yes`) and
//!    `apt-get install --no-install-recommends` the rest: required (and
//!    important) packages, the kernel, GRUB for this firmware, the
//!    profile's packages.
//! 7. `configure`: fstab, hostname, hosts, a systemd-networkd DHCP config
//!    for the boot NIC's MAC, users, root's password hash, SSH keys, the
//!    kernel command line, the timezone, and the first-boot report unit.
//! 8. `bootloader`: GRUB last (`--force-extra-removable` on UEFI, so
//!    firmware without a boot entry finds it), checked.
//! 9. `finish`: sync, unmount, report; the caller reboots.
//!
//! A failure after the disk was touched zeroes its first MiB again: a
//! half-installed disk never boots, and the machine falls back to the
//! network (a new attempt).

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use builder::gpt;

use super::index::MirrorIndex;
use super::{OsInstallWork, User};
use crate::install::{InstallProgress, Reporter};

/// Where the new root is mounted.
const TARGET: &str = "/run/appliance/os-target";
/// Scratch space (tmpfs/initramfs): downloaded packages, mkfs tools.
const SCRATCH: &str = "/run/appliance/os-scratch";
const MIB: u64 = 1 << 20;

/// The install log on the new system.
const LOG: &str = "var/log/appliance-install.log";

/// Install as `work` says. `mac`: the boot NIC; `firmware`: `uefi`/`bios`.
pub fn run(work: &OsInstallWork, mac: &str, firmware: &str) -> Result<serde_json::Value> {
    let url = format!(
        "{}/api/v1/os-installs/{mac}/progress",
        work.server_url.trim_end_matches('/')
    );
    let mut rep = Reporter::to(url, &work.token);
    let mut times = serde_json::Map::new();
    let mut disk_dev: Option<PathBuf> = None;
    let result = install(work, mac, firmware, &mut rep, &mut times, &mut disk_dev);
    match result {
        Ok(()) => {
            let report = serde_json::Value::Object(times);
            rep.send(&InstallProgress {
                phase: "finish".into(),
                state: "done".into(),
                done_bytes: 0,
                total_bytes: 0,
                message: format!(
                    "Debian installed on {}",
                    disk_dev
                        .map(|d| d.display().to_string())
                        .unwrap_or_default()
                ),
                report: Some(report.clone()),
            });
            Ok(report)
        }
        Err(e) => {
            rep.failed(format!("{e:#}"));
            cleanup_mounts();
            if let Some(dev) = &disk_dev {
                // Nothing half-installed may boot.
                if let Ok(f) = OpenOptions::new().write(true).open(dev) {
                    let _ = f.write_all_at(&vec![0u8; MIB as usize], 0);
                    let _ = f.sync_all();
                    let _ = crate::blkdev::reread_partitions(&f);
                }
            }
            Err(e)
        }
    }
}

fn phase(
    rep: &mut Reporter,
    times: &mut serde_json::Map<String, serde_json::Value>,
    started: &mut Option<(String, Instant)>,
    name: &str,
    msg: &str,
) {
    if let Some((p, t)) = started.take() {
        times.insert(
            p,
            serde_json::json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
        );
    }
    *started = Some((name.to_owned(), Instant::now()));
    rep.phase(name, msg.to_owned());
}

fn install(
    work: &OsInstallWork,
    mac: &str,
    firmware: &str,
    rep: &mut Reporter,
    times: &mut serde_json::Map<String, serde_json::Value>,
    disk_dev: &mut Option<PathBuf>,
) -> Result<()> {
    let mut cur = None;
    // One per process: on a host, several installs may run at once.
    let scratch = PathBuf::from(format!("{SCRATCH}-{}", std::process::id()));
    let debs = scratch.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;

    // The index first: a mirror that cannot serve this install fails
    // before the disk is touched.
    phase(
        rep,
        times,
        &mut cur,
        "index",
        &format!("verifying {} {}", work.mirror.url, work.mirror.suite),
    );
    let index = MirrorIndex::load(&work.mirror)?;
    let arch = work.mirror.arch.as_str();
    let mut stage1_roots = index.essential();
    for extra in ["apt", "debconf", "e2fsprogs"] {
        stage1_roots.push(extra.into());
    }
    // What debootstrap roots besides the essential set, so alternatives
    // resolve as on a stock Debian (and as the mirror's sync did, which
    // roots both): base-files' `awk` is `mawk`, and init-system-helpers'
    // `usrmerge | usr-is-merged` is met by `usr-is-merged` (merged /usr
    // is what we unpack), not by `usrmerge` and Perl.
    for default in ["mawk", "usr-is-merged"] {
        if index.has(default) {
            stage1_roots.push(default.into());
        }
    }
    if firmware == "uefi" {
        stage1_roots.push("dosfstools".into());
    }
    let stage1 = index.closure(&stage1_roots, "the first stage: essential packages and apt")?;
    let mut second = second_stage_packages(work, &index, firmware)?;
    // zstd only speeds the install up: without its file, go without.
    if let Ok(z) = index.closure(&["zstd".to_owned()], "zstd") {
        if !index.missing(&z).is_empty() {
            second.retain(|p| p != "zstd");
        }
    }
    // Resolve the second stage now too, and check the mirror serves every
    // file of both stages, so a missing package fails here with its name,
    // before the disk is touched, not after half an hour under apt.
    // With the first stage's roots: what it installs meets alternatives.
    let closure = index.closure(
        &stage1_roots
            .iter()
            .chain(&second)
            .cloned()
            .collect::<Vec<_>>(),
        "the profile's packages, the kernel and GRUB",
    )?;
    let mut missing = index.missing(&stage1);
    missing.extend(index.missing(&closure));
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        bail!(
            "the mirror {:?} lists but does not hold {}: sync the repo again (`appliance repo sync {}`), adding them to its packages if they are not in its closure",
            work.mirror.name,
            missing.join(", "),
            work.mirror.name
        );
    }
    let tools_roots: Vec<String> = if firmware == "uefi" {
        vec!["e2fsprogs".into(), "dosfstools".into()]
    } else {
        vec!["e2fsprogs".into()]
    };
    let tools = index.closure(&tools_roots, "the filesystem tools")?;

    phase(
        rep,
        times,
        &mut cur,
        "download",
        &format!("{} packages", stage1.len()),
    );
    let total: u64 = stage1.iter().map(|p| p.size).sum();
    let mut done = 0;
    let mut stage1_files = Vec::new();
    for p in &stage1 {
        stage1_files.push((p.name.clone(), index.download(p, &debs)?));
        done += p.size;
        rep.tick("download", done, total);
    }

    phase(rep, times, &mut cur, "disk", "partitioning");
    let name = match work.disk.as_deref().and_then(|d| d.strip_prefix("/dev/")) {
        // An explicit device path (a loop device on a host, say): the
        // operator named it; it must be a whole block device.
        Some(n) if !n.contains('/') && Path::new("/sys/block").join(n).exists() => n.to_owned(),
        Some(_) => bail!(
            "{:?} is not a whole block device under /sys/block",
            work.disk
        ),
        None => {
            let disks = crate::install::scan_disks(Path::new("/sys"), Path::new("/dev"));
            crate::install::choose_disk(&disks, 4 << 30, work.disk.as_deref(), work.wipe)
                .map_err(|e| anyhow!("choosing the target disk: {e}"))?
        }
    };
    let dev = PathBuf::from("/dev").join(&name);
    *disk_dev = Some(dev.clone());
    let parts = partition(&dev, &name, work, mac, firmware)?;

    phase(rep, times, &mut cur, "filesystems", "mkfs");
    let toolroot = scratch.join("tools");
    let _ = fs::remove_dir_all(&toolroot);
    fs::create_dir_all(&toolroot)?;
    for p in &tools {
        let f = index.download(p, &debs)?;
        bundle::deb::unpack_data(File::open(&f)?, &p.name, &toolroot)
            .with_context(|| format!("unpacking {} for its tools", p.name))?;
    }
    let root_uuid = derive_uuid(&[
        b"root",
        mac.as_bytes(),
        work.system.as_bytes(),
        &work.attempt.to_le_bytes(),
    ]);
    let esp_id = u32::from_le_bytes(
        derive_uuid(&[
            b"esp",
            mac.as_bytes(),
            work.system.as_bytes(),
            &work.attempt.to_le_bytes(),
        ])
        .as_bytes()[..4]
            .try_into()
            .expect("4 bytes"),
    );
    run_tool(
        &toolroot,
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "root",
            "-U",
            &root_uuid.to_string(),
            &parts.root.display().to_string(),
        ],
    )?;
    if let Some(esp) = &parts.esp {
        run_tool(
            &toolroot,
            "mkfs.fat",
            &[
                "-F",
                "32",
                "-n",
                "ESP",
                "-i",
                &format!("{esp_id:08X}"),
                &esp.display().to_string(),
            ],
        )?;
    }

    phase(
        rep,
        times,
        &mut cur,
        "unpack",
        &format!("{} packages", stage1_files.len()),
    );
    let target = target_dir();
    cleanup_mounts();
    fs::create_dir_all(&target)?;
    mount_fs(&parts.root, &target, "ext4")?;
    if let Some(esp) = &parts.esp {
        let efi = target.join("boot/efi");
        fs::create_dir_all(&efi)?;
        mount_fs(esp, &efi, "vfat")?;
    }
    merged_usr(&target)?;
    let n = stage1_files.len() as u64;
    for (i, (name, f)) in stage1_files.iter().enumerate() {
        bundle::deb::unpack_data(File::open(f)?, name, &target)
            .with_context(|| format!("unpacking {name}"))?;
        rep.tick("unpack", i as u64 + 1, n);
    }
    prepare_dpkg(&target, arch)?;
    let archives = target.join("var/cache/apt/archives");
    fs::create_dir_all(archives.join("partial"))?;
    let mut in_chroot = Vec::new();
    for (_, f) in &stage1_files {
        let file = f.file_name().expect("a file name");
        fs::copy(f, archives.join(file))?;
        in_chroot.push(format!(
            "/var/cache/apt/archives/{}",
            file.to_string_lossy()
        ));
    }
    let _ = fs::remove_dir_all(&scratch);
    chroot_mounts(&target)?;
    let log = Log::open(&target.join(LOG))?;

    phase(rep, times, &mut cur, "base", "dpkg --install (first stage)");
    let mut args = vec![
        "dpkg".to_owned(),
        "--install".into(),
        "--force-depends".into(),
    ];
    args.extend(in_chroot);
    chroot(&target, &args, None, &log, rep, "base")?;
    chroot(
        &target,
        &sv(&["dpkg", "--configure", "-a"]),
        None,
        &log,
        rep,
        "base",
    )?;

    phase(
        rep,
        times,
        &mut cur,
        "packages",
        &format!("apt-get install {}", second.join(" ")),
    );
    write_sources(&target, work, &index.keyring)?;
    if second.iter().any(|p| p == "zstd") {
        // Without it, update-initramfs falls back to gzip: minutes
        // slower on small machines.
        write_file(
            &target.join("etc/initramfs-tools/conf.d/appliance-compress"),
            b"# written by the appliance installer\nCOMPRESS=zstd\nCOMPRESSLEVEL=3\n",
            0o644,
        )?;
    }
    debconf(&target, firmware, &name, &log, rep)?;
    chroot(
        &target,
        &sv(&["apt-get", "update"]),
        None,
        &log,
        rep,
        "packages",
    )?;
    let mut args = sv(&[
        "apt-get",
        "install",
        "--yes",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]);
    args.extend(second.iter().cloned());
    // The kernel's hook skips its initramfs (`INITRD=No`) and the trigger
    // then has none to update: one initramfs is made below, not two.
    chroot_env(
        &target,
        &args,
        &[("INITRD", "No")],
        None,
        &log,
        rep,
        "packages",
    )?;
    let kernels: Vec<String> = fs::read_dir(target.join("usr/lib/modules"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if kernels.is_empty() {
        bail!("no kernel was installed (/lib/modules is empty)");
    }
    for k in &kernels {
        chroot(
            &target,
            &sv(&["update-initramfs", "-c", "-k", k]),
            None,
            &log,
            rep,
            "packages",
        )?;
    }

    phase(rep, times, &mut cur, "configure", "system configuration");
    configure(&target, work, mac, &parts, root_uuid, esp_id, &log, rep)?;

    phase(rep, times, &mut cur, "bootloader", "GRUB");
    bootloader(&target, firmware, &dev, &log, rep)?;
    finish_system(&target, &log, rep)?;

    phase(rep, times, &mut cur, "finish", "unmounting");
    rustix::fs::sync();
    cleanup_mounts();
    if let Some((p, t)) = cur.take() {
        times.insert(
            p,
            serde_json::json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
        );
    }
    Ok(())
}

fn sv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// What apt installs after the first stage.
fn second_stage_packages(
    work: &OsInstallWork,
    index: &MirrorIndex,
    firmware: &str,
) -> Result<Vec<String>> {
    let mut want: Vec<String> = index.with_priority("required");
    if work.priority == "important" {
        want.extend(index.with_priority("important"));
    }
    let arch = &work.mirror.arch;
    // Booted by systemd (`init` is only `important` in Debian 12).
    want.push("systemd-sysv".into());
    want.push(format!("linux-image-{arch}"));
    want.push(if firmware == "uefi" {
        "grub-efi-amd64".into()
    } else {
        "grub-pc".into()
    });
    if firmware == "uefi" {
        want.push("dosfstools".into());
    }
    let keys = !work.root_ssh_authorized_keys.is_empty()
        || work.users.iter().any(|u| !u.ssh_authorized_keys.is_empty());
    if keys {
        want.push("openssh-server".into());
    }
    if work.users.iter().any(|u| u.sudo) {
        want.push("sudo".into());
    }
    if index.has("zstd") {
        want.push("zstd".into());
    }
    want.extend(work.packages.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    want.retain(|p| seen.insert(p.clone()));
    Ok(want)
}

/// A UUID from content (reproducible for the same machine and attempt).
fn derive_uuid(parts: &[&[u8]]) -> uuid::Uuid {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// The partitions made.
pub struct Parts {
    pub esp: Option<PathBuf>,
    pub root: PathBuf,
}

/// Zero the ends of `dev`, write the GPT, and wait for the kernel's
/// partition devices.
fn partition(
    dev: &Path,
    name: &str,
    work: &OsInstallWork,
    mac: &str,
    firmware: &str,
) -> Result<Parts> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(dev)
        .with_context(|| format!("opening {} for writing", dev.display()))?;
    let size = crate::blkdev::size_of(&f).or_else(|_| f.seek(SeekFrom::End(0)))?;
    let esp = work.esp_mib.clamp(64, 4096) * MIB;
    if size < esp + 3 * MIB + (2 << 30) {
        bail!(
            "{} is too small: {size} bytes; a Debian install needs at least {} bytes",
            dev.display(),
            esp + 3 * MIB + (2 << 30)
        );
    }
    let zero = vec![0u8; MIB as usize];
    f.write_all_at(&zero, 0)?;
    f.write_all_at(&zero, size / 512 * 512 - MIB)?;
    let seed = [
        mac.as_bytes(),
        work.system.as_bytes(),
        &work.attempt.to_le_bytes(),
    ];
    let guid = |what: &[u8]| {
        let mut p: Vec<&[u8]> = vec![what];
        p.extend_from_slice(&seed);
        gpt::Guid::derive(&p)
    };
    let specs = vec![
        gpt::PartitionSpec {
            label: "bios".into(),
            type_guid: gpt::types::by_name("bios-boot").expect("known type"),
            guid: guid(b"bios"),
            size: gpt::SizeSpec::Bytes(MIB),
            attributes: 0,
        },
        gpt::PartitionSpec {
            label: "esp".into(),
            type_guid: gpt::types::by_name("esp").expect("known type"),
            guid: guid(b"esp"),
            size: gpt::SizeSpec::Bytes(esp),
            attributes: 0,
        },
        gpt::PartitionSpec {
            label: "root".into(),
            type_guid: gpt::types::by_name("root-x86-64").expect("known type"),
            guid: guid(b"root"),
            size: gpt::SizeSpec::Fill,
            attributes: 0,
        },
    ];
    let layout = gpt::plan(size / 512 * 512, guid(b"disk"), specs)
        .map_err(|e| anyhow!("planning the partition table of {}: {e}", dev.display()))?;
    let primary = gpt::primary_region(&layout);
    let (at, backup) = gpt::backup_region(&layout);
    f.write_all_at(&backup, at)?;
    f.write_all_at(&primary, 0)?;
    f.sync_all()?;
    // Read back before trusting it.
    let mut check = vec![0u8; primary.len()];
    f.read_exact_at(&mut check, 0)?;
    if check != primary {
        bail!(
            "{}: the partition table read back differs from what was written",
            dev.display()
        );
    }
    f.flush()?;
    let mut tries = 0;
    loop {
        match crate::blkdev::reread_partitions(&f) {
            Ok(()) => break,
            // A loop device without partition scanning (attached below).
            Err(_) if name.starts_with("loop") => break,
            Err(e) if tries < 10 => {
                tries += 1;
                tracing::debug!(error = %e, "BLKRRPART busy; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(anyhow!(
                    "re-reading the partition table of {}: {e}",
                    dev.display()
                ))
            }
        }
    }
    drop(f);
    let part = |n: u32| -> Result<PathBuf> {
        let wait = if name.starts_with("loop") { 3 } else { 30 };
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            if let Ok(rd) = fs::read_dir(Path::new("/sys/block").join(name)) {
                for e in rd.flatten() {
                    let p = e.path().join("partition");
                    if fs::read_to_string(&p)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                        == Some(n)
                    {
                        let dev = PathBuf::from("/dev").join(e.file_name());
                        if dev.exists() {
                            return Ok(dev);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("partition {n} of {name} did not appear in /sys/block/{name}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (esp_dev, root) = match (part(2), part(3)) {
        (Ok(e), Ok(r)) => (e, r),
        (e, r) if name.starts_with("loop") => {
            // A host kernel that does not scan loop devices' partitions:
            // attach each partition as its own loop device.
            tracing::warn!(esp = ?e.err(), root = ?r.err(), "no partition devices; attaching them with losetup");
            let attach = |p: &gpt::Placed| -> Result<PathBuf> {
                let out = Command::new("losetup")
                    .args([
                        "--find",
                        "--show",
                        "--offset",
                        &p.offset().to_string(),
                        "--sizelimit",
                        &p.len().to_string(),
                    ])
                    .arg(dev)
                    .output()
                    .context("running losetup")?;
                if !out.status.success() {
                    bail!("losetup: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            };
            (
                attach(&layout.partitions[1])?,
                attach(&layout.partitions[2])?,
            )
        }
        (e, r) => (e?, r?),
    };
    Ok(Parts {
        esp: (firmware == "uefi").then_some(esp_dev),
        root,
    })
}

/// Run a program from an unpacked tools tree through its own loader.
fn run_tool(root: &Path, prog: &str, args: &[&str]) -> Result<()> {
    let find = |cands: &[String]| cands.iter().map(|c| root.join(c)).find(|p| p.is_file());
    let ld = find(&sv(&[
        "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "lib64/ld-linux-x86-64.so.2",
    ]))
    .ok_or_else(|| anyhow!("no dynamic loader in the unpacked libc6"))?;
    let bin = find(&[
        format!("sbin/{prog}"),
        format!("usr/sbin/{prog}"),
        format!("bin/{prog}"),
        format!("usr/bin/{prog}"),
    ])
    .ok_or_else(|| anyhow!("{prog} is not in the unpacked tools"))?;
    let libs = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
        .iter()
        .map(|l| root.join(l).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let out = Command::new(&ld)
        .arg("--library-path")
        .arg(&libs)
        .arg(&bin)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("MKE2FS_CONFIG", root.join("etc/mke2fs.conf"))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn mount_fs(dev: &Path, target: &Path, fstype: &str) -> Result<()> {
    rustix::mount::mount(
        dev,
        target,
        fstype,
        rustix::mount::MountFlags::empty(),
        None,
    )
    .with_context(|| {
        format!(
            "mounting {} ({fstype}) on {}",
            dev.display(),
            target.display()
        )
    })
}

/// `/bin`, `/sbin`, `/lib`, `/lib64` as links into `/usr` (Debian 12's
/// layout, as debootstrap makes it).
fn merged_usr(root: &Path) -> Result<()> {
    for d in ["bin", "sbin", "lib", "lib64"] {
        fs::create_dir_all(root.join("usr").join(d))?;
        let link = root.join(d);
        if fs::symlink_metadata(&link).is_err() {
            symlink(format!("usr/{d}"), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let tmp = path.with_extension("appliance-tmp");
    fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The dpkg database of a system about to get its first package, and
/// what keeps the chroot quiet and fast: no services started, no fsync per
/// file (one sync at the end instead).
fn prepare_dpkg(root: &Path, arch: &str) -> Result<()> {
    let db = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers", "alternatives"] {
        fs::create_dir_all(db.join(d))?;
    }
    for f in ["status", "available"] {
        write_file(&db.join(f), b"", 0o644)?;
    }
    write_file(&db.join("arch"), format!("{arch}\n").as_bytes(), 0o644)?;
    write_file(
        &root.join("usr/sbin/policy-rc.d"),
        b"#!/bin/sh\n# installing: start no services\nexit 101\n",
        0o755,
    )?;
    write_file(
        &root.join("etc/dpkg/dpkg.cfg.d/appliance-install"),
        b"force-unsafe-io\n",
        0o644,
    )?;
    write_file(
        &root.join("etc/apt/apt.conf.d/99appliance-install"),
        b"Acquire::Languages \"none\";\nAPT::Install-Recommends \"false\";\n",
        0o644,
    )?;
    Ok(())
}

const CHROOT_MOUNTS: &[&str] = &["dev", "dev/pts", "proc", "sys", "run"];

fn chroot_mounts(root: &Path) -> Result<()> {
    use rustix::mount::{mount, mount_bind, MountFlags};
    let m = |p: &str| {
        let t = root.join(p);
        fs::create_dir_all(&t).map(|()| t)
    };
    mount_bind("/dev", m("dev")?).context("binding /dev into the target")?;
    let _ = mount(
        "devpts",
        m("dev/pts")?,
        "devpts",
        MountFlags::empty(),
        Some(c"gid=5,mode=620,ptmxmode=666"),
    );
    mount("proc", m("proc")?, "proc", MountFlags::empty(), None)
        .context("mounting proc in the target")?;
    mount("sysfs", m("sys")?, "sysfs", MountFlags::empty(), None)
        .context("mounting sysfs in the target")?;
    mount(
        "tmpfs",
        m("run")?,
        "tmpfs",
        MountFlags::empty(),
        Some(c"mode=755"),
    )
    .context("mounting /run in the target")?;
    Ok(())
}

/// Unmount everything under the target, innermost first (best effort).
/// Where the target's root is mounted: one per process, since several
/// installs may run at once on a host.
fn target_dir() -> PathBuf {
    PathBuf::from(format!("{TARGET}-{}", std::process::id()))
}

fn cleanup_mounts() {
    let root = &target_dir();
    let mut targets: Vec<PathBuf> = CHROOT_MOUNTS.iter().map(|p| root.join(p)).collect();
    targets.push(root.join("boot/efi"));
    targets.push(root.to_path_buf());
    // Innermost (longest) first.
    targets.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for t in targets {
        let s = t.display().to_string();
        if mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(s.as_str()))
        {
            if let Err(e) = rustix::mount::unmount(&t, rustix::mount::UnmountFlags::empty()) {
                tracing::warn!(error = %e, path = %s, "unmount failed; detaching");
                let _ = rustix::mount::unmount(&t, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
    // Empty once unmounted (remove_dir refuses anything else).
    let _ = fs::remove_dir(root);
}

/// The install log: every chroot command's output, kept on the new
/// system (`/var/log/appliance-install.log`).
struct Log {
    path: PathBuf,
}

impl Log {
    fn open(path: &Path) -> Result<Log> {
        if let Some(p) = path.parent() {
            fs::create_dir_all(p)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Log {
            path: path.to_owned(),
        })
    }

    fn file(&self) -> Result<File> {
        Ok(OpenOptions::new().append(true).open(&self.path)?)
    }

    fn note(&self, line: &str) {
        if let Ok(mut f) = self.file() {
            let _ = writeln!(f, "{line}");
        }
    }

    /// The last `n` lines.
    fn tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Run `args` chrooted into `root`, output to the log; a heartbeat to the
/// appliance every minute while it runs.
fn chroot(
    root: &Path,
    args: &[String],
    stdin: Option<&[u8]>,
    log: &Log,
    rep: &mut Reporter,
    phase: &str,
) -> Result<()> {
    chroot_env(root, args, &[], stdin, log, rep, phase)
}

/// [`chroot`] with extra environment variables.
fn chroot_env(
    root: &Path,
    args: &[String],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    log: &Log,
    rep: &mut Reporter,
    phase: &str,
) -> Result<()> {
    log.note(&format!("# {}", args.join(" ")));
    let out = log.file()?;
    let err = out.try_clone()?;
    let root_c = root.to_owned();
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("DEBCONF_NONINTERACTIVE_SEEN", "true")
        .env("LC_ALL", "C")
        .env("HOME", "/root")
        .envs(env.iter().copied())
        .stdout(out)
        .stderr(err)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    // SAFETY: between fork and exec only async-signal-safe calls
    // (chroot(2), chdir(2)) are made.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            std::os::unix::fs::chroot(&root_c)?;
            std::env::set_current_dir("/")
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} in the target", args[0]))?;
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("piped");
        s.write_all(input)?;
    }
    let started = Instant::now();
    let mut beat = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if beat.elapsed() >= Duration::from_secs(30) {
            beat = Instant::now();
            // What it is doing now: the log's last line ("Setting up …").
            let last: String = log.tail(1).chars().take(160).collect();
            rep.phase(
                phase,
                format!(
                    "{} running for {} s: {last}",
                    args[0],
                    started.elapsed().as_secs()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    log.note(&format!(
        "# {} ({status}, {:.1} s)",
        args[0],
        started.elapsed().as_secs_f64()
    ));
    if !status.success() {
        bail!(
            "`{}` failed in the target ({status}); the end of its output:\n{}",
            args.iter().take(6).cloned().collect::<Vec<_>>().join(" "),
            log.tail(25)
        );
    }
    Ok(())
}

fn keyring_name(work: &OsInstallWork, keyring: &[u8]) -> String {
    let ext = if keyring.starts_with(b"-----BEGIN") {
        "asc"
    } else {
        "gpg"
    };
    format!("appliance-{}.{ext}", work.mirror.name)
}

/// apt's source: the appliance's mirror, signed by the repo's keyring.
fn write_sources(root: &Path, work: &OsInstallWork, keyring: &[u8]) -> Result<()> {
    let kr = keyring_name(work, keyring);
    write_file(&root.join("etc/apt/keyrings").join(&kr), keyring, 0o644)?;
    let sources = format!(
        "# The appliance's mirror {name} (written by the appliance installer).\nTypes: deb\nURIs: {url}\nSuites: {suite}\nComponents: {comps}\nSigned-By: /etc/apt/keyrings/{kr}\n",
        name = work.mirror.name,
        url = work.mirror.url,
        suite = work.mirror.suite,
        comps = work.mirror.components.join(" "),
    );
    write_file(
        &root.join("etc/apt/sources.list.d/appliance.sources"),
        sources.as_bytes(),
        0o644,
    )?;
    let _ = fs::remove_file(root.join("etc/apt/sources.list"));
    Ok(())
}

fn debconf(root: &Path, firmware: &str, disk: &str, log: &Log, rep: &mut Reporter) -> Result<()> {
    let mut sel = String::new();
    if firmware == "bios" {
        sel.push_str(&format!(
            "grub-pc grub-pc/install_devices multiselect /dev/{disk}\n"
        ));
        sel.push_str("grub-pc grub-pc/install_devices_empty boolean false\n");
    } else {
        sel.push_str("grub-efi-amd64 grub2/force_efi_extra_removable boolean true\n");
        sel.push_str("grub-efi-amd64 grub2/update_nvram boolean false\n");
    }
    chroot(
        root,
        &sv(&["debconf-set-selections"]),
        Some(sel.as_bytes()),
        log,
        rep,
        "packages",
    )
}

#[allow(clippy::too_many_arguments)]
fn configure(
    root: &Path,
    work: &OsInstallWork,
    mac: &str,
    parts: &Parts,
    root_uuid: uuid::Uuid,
    esp_id: u32,
    log: &Log,
    rep: &mut Reporter,
) -> Result<()> {
    let host = if work.hostname.is_empty() {
        work.system.as_str()
    } else {
        work.hostname.as_str()
    };
    let short = host.split('.').next().unwrap_or(host);
    write_file(
        &root.join("etc/hostname"),
        format!("{short}\n").as_bytes(),
        0o644,
    )?;
    let fqdn = if host.contains('.') {
        format!("{host} {short}")
    } else {
        short.to_owned()
    };
    write_file(
        &root.join("etc/hosts"),
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{fqdn}\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n").as_bytes(),
        0o644,
    )?;
    let mut fstab = format!("# written by the appliance installer\nUUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n");
    if parts.esp.is_some() {
        fstab.push_str(&format!(
            "UUID={:04X}-{:04X}\t/boot/efi\tvfat\tumask=0077\t0\t1\n",
            esp_id >> 16,
            esp_id & 0xffff
        ));
    }
    write_file(&root.join("etc/fstab"), fstab.as_bytes(), 0o644)?;
    write_file(
        &root.join("etc/systemd/network/50-appliance.network"),
        format!("# The NIC this machine was installed through (written by the appliance installer).\n[Match]\nMACAddress={mac}\n\n[Network]\nDHCP=yes\n").as_bytes(),
        0o644,
    )?;
    chroot(
        root,
        &sv(&["systemctl", "enable", "systemd-networkd.service"]),
        None,
        log,
        rep,
        "configure",
    )?;
    if !work.timezone.is_empty() {
        let zone = root.join("usr/share/zoneinfo").join(&work.timezone);
        if valid_zone(&work.timezone) && zone.exists() {
            let lt = root.join("etc/localtime");
            let _ = fs::remove_file(&lt);
            symlink(format!("/usr/share/zoneinfo/{}", work.timezone), &lt)?;
            write_file(
                &root.join("etc/timezone"),
                format!("{}\n", work.timezone).as_bytes(),
                0o644,
            )?;
        }
    }
    // Root.
    match &work.root_password_hash {
        Some(h) => {
            check_hash(h)?;
            chroot(
                root,
                &sv(&["usermod", "--password", h, "root"]),
                None,
                log,
                rep,
                "configure",
            )?;
        }
        None => chroot(
            root,
            &sv(&["passwd", "--lock", "root"]),
            None,
            log,
            rep,
            "configure",
        )?,
    }
    if !work.root_ssh_authorized_keys.is_empty() {
        write_keys(root, "root", &work.root_ssh_authorized_keys, log, rep)?;
    }
    for u in &work.users {
        add_user(root, u, log, rep)?;
    }
    // The installed kernel's command line.
    let cmdline = work.kernel_options.trim();
    if cmdline.contains(['"', '\\', '$', '`', '\n']) {
        bail!("kernel_options {cmdline:?} holds a quote, backslash, $ or newline; it cannot go into /etc/default/grub");
    }
    write_file(
        &root.join("etc/default/grub.d/appliance.cfg"),
        format!("# written by the appliance installer\nGRUB_CMDLINE_LINUX=\"{cmdline}\"\nGRUB_TIMEOUT=1\n").as_bytes(),
        0o644,
    )?;
    firstboot_unit(root, work, mac)?;
    Ok(())
}

fn valid_zone(z: &str) -> bool {
    !z.is_empty()
        && !z.starts_with('/')
        && z.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_+-".contains(ch))
        })
}

/// A crypt(3) hash usable as `usermod --password`.
fn check_hash(h: &str) -> Result<()> {
    if h.is_empty() || h.contains([':', '\n', ' ']) || !h.starts_with('$') {
        bail!("password hash {:?}…: not a crypt(3) hash (`$6$…` or `$y$…`, no colons, spaces or newlines)", h.chars().take(4).collect::<String>());
    }
    Ok(())
}

/// A user name `useradd` takes on Debian.
pub fn valid_user_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some('a'..='z' | '_'))
        && n.len() <= 32
        && n.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-')
}

fn add_user(root: &Path, u: &User, log: &Log, rep: &mut Reporter) -> Result<()> {
    if !valid_user_name(&u.name) {
        bail!("user name {:?} is not a valid Debian user name", u.name);
    }
    let mut args = sv(&["useradd", "--create-home", "--shell", "/bin/bash"]);
    if u.sudo {
        args.extend(sv(&["--groups", "sudo"]));
    }
    if let Some(h) = &u.password_hash {
        check_hash(h)?;
        args.extend(["--password".into(), h.clone()]);
    }
    args.push(u.name.clone());
    chroot(root, &args, None, log, rep, "configure")?;
    if !u.ssh_authorized_keys.is_empty() {
        write_keys(root, &u.name, &u.ssh_authorized_keys, log, rep)?;
    }
    Ok(())
}

fn write_keys(
    root: &Path,
    user: &str,
    keys: &[String],
    log: &Log,
    rep: &mut Reporter,
) -> Result<()> {
    for k in keys {
        if k.contains(['\n', '\r']) || k.trim().is_empty() {
            bail!("an SSH key for {user} is empty or spans lines");
        }
    }
    let home = if user == "root" {
        PathBuf::from("root")
    } else {
        PathBuf::from("home").join(user)
    };
    let dir = root.join(&home).join(".ssh");
    let body = keys.iter().map(|k| k.trim()).collect::<Vec<_>>().join("\n") + "\n";
    write_file(&dir.join("authorized_keys"), body.as_bytes(), 0o600)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let inside = format!("/{}", home.join(".ssh").display());
    chroot(
        root,
        &sv(&["chown", "-R", &format!("{user}:"), &inside]),
        None,
        log,
        rep,
        "configure",
    )
}

/// The one-shot unit that reports the first boot of the installed system
/// (bash's `/dev/tcp`: no HTTP client needed), then never runs again.
fn firstboot_unit(root: &Path, work: &OsInstallWork, mac: &str) -> Result<()> {
    let url = work.server_url.trim_end_matches('/');
    let hostport = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("the first-boot report needs an http:// server URL, not {url}"))?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.to_owned()),
        _ => (hostport.to_owned(), "80".to_owned()),
    };
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
    {
        bail!("server host {host:?} cannot go into the first-boot script");
    }
    write_file(
        &root.join("etc/appliance/firstboot.token"),
        work.token.as_bytes(),
        0o600,
    )?;
    let script = format!(
        r#"#!/bin/bash
# Reports this system's first boot to the appliance that installed it,
# then removes its token (the unit's condition), so it runs once.
set -u
TOKEN=$(cat /etc/appliance/firstboot.token)
esc() {{ local s=${{1//\\/\\\\}}; s=${{s//\"/\\\"}}; s=${{s//$'\n'/\\n}}; s=${{s//$'\t'/ }}; printf '%s' "$s"; }}
AUDIT=$(dpkg --audit 2>&1)
BODY=$(printf '{{"debian_version":"%s","kernel":"%s","dpkg_audit":"%s","hostname":"%s"}}' \
  "$(esc "$(cat /etc/debian_version)")" "$(esc "$(uname -r)")" "$(esc "$AUDIT")" "$(esc "$(hostname)")")
for i in $(seq 1 60); do
  if exec 3<>/dev/tcp/{host}/{port}; then
    printf 'POST /api/v1/os-installs/{mac}/firstboot HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' "$TOKEN" "${{#BODY}}" "$BODY" >&3
    read -r STATUS <&3
    exec 3<&-
    case "$STATUS" in
      "HTTP/1."?" 2"*) rm -f /etc/appliance/firstboot.token; echo "first boot reported"; exit 0 ;;
      *) echo "first-boot report refused: $STATUS" ;;
    esac
  fi
  sleep 5
done
exit 1
"#
    );
    write_file(
        &root.join("usr/local/sbin/appliance-firstboot"),
        script.as_bytes(),
        0o755,
    )?;
    let unit = "[Unit]\nDescription=Report the first boot to the appliance that installed this system\nWants=network-online.target\nAfter=network-online.target\nConditionPathExists=/etc/appliance/firstboot.token\n\n[Service]\nType=oneshot\nExecStart=/usr/local/sbin/appliance-firstboot\nStandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n";
    write_file(
        &root.join("etc/systemd/system/appliance-firstboot.service"),
        unit.as_bytes(),
        0o644,
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    let link = wants.join("appliance-firstboot.service");
    let _ = fs::remove_file(&link);
    symlink("/etc/systemd/system/appliance-firstboot.service", &link)?;
    Ok(())
}

fn bootloader(
    root: &Path,
    firmware: &str,
    dev: &Path,
    log: &Log,
    rep: &mut Reporter,
) -> Result<()> {
    if firmware == "uefi" {
        chroot(
            root,
            &sv(&[
                "grub-install",
                "--target=x86_64-efi",
                "--efi-directory=/boot/efi",
                "--bootloader-id=debian",
                "--no-nvram",
                "--force-extra-removable",
            ]),
            None,
            log,
            rep,
            "bootloader",
        )?;
    } else {
        chroot(
            root,
            &sv(&[
                "grub-install",
                "--target=i386-pc",
                &dev.display().to_string(),
            ]),
            None,
            log,
            rep,
            "bootloader",
        )?;
    }
    chroot(root, &sv(&["update-grub"]), None, log, rep, "bootloader")?;
    // Verify before calling it done.
    let cfg = fs::read_to_string(root.join("boot/grub/grub.cfg"))
        .context("reading the new /boot/grub/grub.cfg")?;
    if !cfg.contains("linux") {
        bail!("/boot/grub/grub.cfg has no kernel entry:\n{}", log.tail(15));
    }
    let boot = fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    if !boot.iter().any(|f| f.starts_with("vmlinuz-"))
        || !boot.iter().any(|f| f.starts_with("initrd.img-"))
    {
        bail!("/boot holds no kernel and initrd after the install: {boot:?}");
    }
    if firmware == "uefi" && !root.join("boot/efi/EFI/BOOT/BOOTX64.EFI").exists() {
        bail!("GRUB did not write EFI/BOOT/BOOTX64.EFI to the ESP");
    }
    Ok(())
}

/// Undo what only the install needed.
fn finish_system(root: &Path, log: &Log, rep: &mut Reporter) -> Result<()> {
    for f in [
        "usr/sbin/policy-rc.d",
        "etc/dpkg/dpkg.cfg.d/appliance-install",
        "etc/apt/apt.conf.d/99appliance-install",
    ] {
        let _ = fs::remove_file(root.join(f));
    }
    chroot(root, &sv(&["apt-get", "clean"]), None, log, rep, "finish")?;
    // A fresh machine id on first boot (systemd's "first boot").
    write_file(&root.join("etc/machine-id"), b"", 0o444)?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    Ok(())
}
