//! The replication chain in QEMU (`cargo xtask fleet <N>` and the fleet
//! integration test): machine 0 boots the appliance image; machine k (a
//! blank disk) sits on machine k-1's provisioning switch, PXE-boots from
//! it, installs the appliance onto its own disk, boots from that disk and
//! serves its own provisioning switch for machine k+1.
//!
//! Every VM's provisioning traffic stays on unix-socket wires; each VM also
//! has a user-networking NIC (`restrict=on`, loopback-only port forward)
//! through which the harness reads its API, named to the appliance as a
//! management interface (`mgmt`) by fw_cfg.
//!
//! NICs per machine k ≥ 1, in PCI order: eth0 the uplink wire (client side
//! of wire k-1, PXE), eth1 its own provisioning wire k (listening side),
//! eth2 management. Machine 0: eth0 management + uplink, eth1 wire 0.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::http;
use crate::qemu::{base_command, Firmware, Vm};

/// Disk size of each blank machine: bigger than the image, so the data
/// partition grows on first boot.
pub const CHILD_DISK: u64 = 2 << 30;
/// The too-small machine: a disk smaller than the image.
const TINY_DISK: u64 = 512 << 20;
const TINY_MAC: &str = "52:54:00:f1:99:00";

/// Memory per VM (the parent rebuilds its image while serving).
pub const MEMORY_MB: u32 = 1536;

/// Faults injected into a run (the issue's fault tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// A machine with a disk smaller than the image on machine 0's second
    /// provisioning wire: its install must fail with a clear error reported
    /// to the parent, and its disk must stay untouched.
    pub too_small: bool,
    /// Kill machine 1's QEMU while it streams the image, then start it
    /// again: its disk must not be bootable (first MiB zero), and it must
    /// PXE-boot again and complete.
    pub kill_mid_write: bool,
    /// After the chain: add a profile on the last machine and sync up the
    /// chain (issue 8). Off in CI: pushing from a freshly installed replica
    /// fails today ("the pack does not hold the pushed head").
    pub sync: bool,
}

/// One generation's figures.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub index: usize,
    /// VM start to the installer's check-in (firmware PXE, iPXE, kernel).
    pub pxe_boot: f64,
    /// Check-in to install work (the parent's image is prepared before
    /// the child starts, so this is the work round trip).
    pub wait: f64,
    /// Work handed out to the install reported done (stream, write,
    /// read-back verify, partition table, node state).
    pub stream: f64,
    /// Of `stream`: fetching and writing the ranges, as the child's writer
    /// measured it.
    pub write: f64,
    /// Install done to the child's API answering from its own disk.
    pub reboot: f64,
    pub total: f64,
    pub bytes_sent: u64,
    pub data_bytes: u64,
}

/// What a fleet run found.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub release: String,
    pub generations: Vec<Generation>,
    pub total_seconds: f64,
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Where one machine's things go.
struct Machine {
    dir: PathBuf,
    disk: PathBuf,
    port: u16,
    mac_uplink: String,
    token: Option<String>,
}

fn mac(k: usize, nic: u8) -> String {
    format!("52:54:00:f1:{k:02x}:{nic:02x}")
}

fn wire(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("wire{k}.sock"))
}

/// Machine 0's second provisioning wire (the too-small machine's).
fn extra_wire(dir: &Path) -> PathBuf {
    dir.join("extra.sock")
}

/// Whether the first `n` bytes of `path` are all zero.
fn zeros(path: &Path, n: u64) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    f.take(n).read_to_end(&mut buf).is_ok() && buf.iter().all(|b| *b == 0)
}

/// Boots machine `k` (k = 0: the image; k ≥ 1: its own disk).
fn start(k: usize, m: &Machine, work: &Path, faults: Faults) -> Result<Vm, String> {
    let firmware = Firmware::Ovmf;
    let (mut cmd, serial_log) =
        base_command(firmware, &m.dir, MEMORY_MB).map_err(|e| e.to_string())?;
    // Keep the OVMF variables of the first boot (the boot order it learnt).
    let keep_vars = m.dir.join("OVMF_VARS.keep");
    let vars = m.dir.join("OVMF_VARS.fd");
    if keep_vars.exists() {
        std::fs::copy(&keep_vars, &vars).map_err(|e| e.to_string())?;
    }
    let mgmt = format!(
        "user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{}-:80",
        m.port
    );
    if k == 0 {
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d0,format=raw,file={}",
                m.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=1"])
            .args(["-netdev", &mgmt])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=mgmt,mac={},romfile=", mac(k, 2)),
            ]);
    } else {
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d0,format=raw,file={}",
                m.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=1"])
            .arg("-netdev")
            .arg(format!(
                "stream,id=up,server=off,addr.type=unix,addr.path={}",
                wire(work, k - 1).display()
            ))
            .args([
                "-device",
                &format!(
                    "virtio-net-pci,netdev=up,mac={},bootindex=2,romfile=",
                    m.mac_uplink
                ),
            ]);
    }
    // The machine's own provisioning wire (listening side).
    cmd.arg("-netdev")
        .arg(format!(
            "stream,id=prov,server=on,addr.type=unix,addr.path={}",
            wire(work, k).display()
        ))
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=prov,mac={},romfile=", mac(k, 1)),
        ]);
    if k == 0 && faults.too_small {
        cmd.arg("-netdev")
            .arg(format!(
                "stream,id=extra,server=on,addr.type=unix,addr.path={}",
                extra_wire(work).display()
            ))
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=extra,mac={},romfile=", mac(0, 3)),
            ]);
        let _ = std::fs::remove_file(extra_wire(work));
    }
    if k > 0 {
        cmd.args(["-netdev", &mgmt]).args([
            "-device",
            &format!("virtio-net-pci,netdev=mgmt,mac={},romfile=", mac(k, 2)),
        ]);
        cmd.args([
            "-fw_cfg",
            "name=opt/appliance/config,string={\"mgmt\":\"eth2\"}",
        ]);
    }
    cmd.args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let _ = std::fs::remove_file(wire(work, k));
    Vm::spawn(cmd, serial_log, m.port).map_err(|e| format!("starting machine {k}: {e}"))
}

fn json(port: u16, path: &str) -> Option<serde_json::Value> {
    let r = http::get_within(port, path, Duration::from_secs(5)).ok()?;
    (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    vms: &mut [&mut Vm],
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        for vm in vms.iter_mut() {
            if let Some(st) = vm.exited() {
                return Err(format!(
                    "waiting for {what}: a VM exited ({st}); its serial log:\n{}",
                    tail(&vm.serial(), 80)
                ));
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = vms.iter().map(|v| tail(&v.serial(), 60)).collect();
            return Err(format!(
                "{what} did not happen within {timeout:?}; serial logs:\n{}",
                logs.join("\n-----\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots an appliance and returns its operator token (printed once on its
/// console the first time it serves).
fn up(vm: &mut Vm, timeout: Duration) -> Result<String, String> {
    vm.wait_http("/api/v1/version", timeout)?;
    wait_for(
        "the first API token",
        Duration::from_secs(30),
        &mut [],
        || vm.first_token(),
    )
}

/// Runs a chain of `n` machines under `work`. `log` gets progress lines.
pub fn run(
    image: &Path,
    n: usize,
    work: &Path,
    faults: Faults,
    log: &mut dyn FnMut(&str),
) -> Result<FleetReport, String> {
    assert!(n >= 2, "a fleet needs at least two machines");
    let started = Instant::now();
    let mut machines: Vec<Machine> = (0..n)
        .map(|k| Machine {
            dir: work.join(format!("m{k}")),
            disk: if k == 0 {
                work.join("m0/disk.img")
            } else {
                work.join(format!("m{k}/disk.img"))
            },
            port: crate::free_port(),
            mac_uplink: mac(k, 0),
            token: None,
        })
        .collect();
    for m in &machines {
        std::fs::create_dir_all(&m.dir).map_err(|e| e.to_string())?;
    }
    // Machine 0 boots the image flashed onto a disk the size of a child's,
    // as a user's stick is bigger than the image: the writer grows the GPT,
    // init grows the data filesystem, and it holds the rebuild (image and
    // ISO) the parent serves installs from.
    std::fs::File::create(&machines[0].disk)
        .and_then(|f| f.set_len(CHILD_DISK))
        .map_err(|e| format!("creating {}: {e}", machines[0].disk.display()))?;
    let o = std::process::Command::new(crate::mirror::appliance_bin())
        .arg("flash")
        .arg(&machines[0].disk)
        .arg("--image")
        .arg(image)
        .arg("--data")
        .arg(&machines[0].dir)
        .args(["--yes", "--keep-holes"])
        .output()
        .map_err(|e| format!("appliance flash: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "appliance flash: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let mut vms: Vec<Vm> = Vec::new();
    let mut gens = Vec::new();
    let mut problems = Vec::new();

    let host_disk = std::fs::read_to_string(image.with_extension("img.sha256"))
        .ok()
        .and_then(|l| l.split_whitespace().next().map(|h| format!("sha256:{h}")))
        .ok_or_else(|| format!("{}.sha256 is missing", image.display()))?;
    let mut a = start(0, &machines[0], work, faults)?;
    let token = up(&mut a, Duration::from_secs(300))?;
    let release = json(machines[0].port, "/api/v1/version")
        .and_then(|v| v["release"].as_str().map(str::to_owned))
        .ok_or("machine 0 reports no release")?;
    log(&format!(
        "machine 0 up in {:.1}s, release {release}",
        started.elapsed().as_secs_f64()
    ));
    machines[0].token = Some(token);
    vms.push(a);

    for k in 1..n {
        let parent = k - 1;
        let pport = machines[parent].port;
        let ptoken = machines[parent].token.clone().ok_or("no parent token")?;
        // The parent serves its provisioning wire and knows the child.
        let cidr = format!("10.77.{}.1/24", k);
        let body = format!(r#"{{"iface":"eth1","cidr":"{cidr}","mode":"authoritative"}}"#);
        if parent == 0 {
            let r = http::post_auth(pport, "/api/v1/networks", &body, &ptoken)
                .map_err(|e| e.to_string())?;
            if !(200..300).contains(&r.status) {
                return Err(format!("machine 0: serving eth1: {} {}", r.status, r.body));
            }
        }
        let mut tiny: Option<(Vm, PathBuf)> = None;
        if parent == 0 && faults.too_small {
            let body = r#"{"iface":"eth2","cidr":"10.78.1.1/24","mode":"authoritative"}"#;
            let r = http::post_auth(pport, "/api/v1/networks", body, &ptoken)
                .map_err(|e| e.to_string())?;
            if !(200..300).contains(&r.status) {
                return Err(format!("machine 0: serving eth2: {} {}", r.status, r.body));
            }
            let r = http::post_auth(
                pport,
                "/api/v1/replicas",
                &format!(r#"{{"name":"tiny","mac":"{TINY_MAC}"}}"#),
                &ptoken,
            )
            .map_err(|e| e.to_string())?;
            if !(200..300).contains(&r.status) {
                return Err(format!(
                    "registering the tiny machine: {} {}",
                    r.status, r.body
                ));
            }
            let dir = work.join("tiny");
            let vm = crate::qemu::boot_blank(
                Firmware::Ovmf,
                &extra_wire(work),
                TINY_MAC,
                TINY_DISK,
                &dir,
            )
            .map_err(|e| format!("starting the tiny machine: {e}"))?;
            tiny = Some((vm, dir.join("blank.img")));
        }
        let r = http::post_auth(
            pport,
            "/api/v1/replicas",
            &format!(r#"{{"name":"m{k}","mac":"{}"}}"#, machines[k].mac_uplink),
            &ptoken,
        )
        .map_err(|e| e.to_string())?;
        if !(200..300).contains(&r.status) {
            return Err(format!(
                "machine {parent}: registering m{k}: {} {}",
                r.status, r.body
            ));
        }
        // Prepare the served image before the child is powered on (the
        // install waits for it either way; starting a blank machine on a
        // slow parent that is rebuilding makes the figures depend on CPU
        // contention, not on replication).
        let _ = http::post_auth(pport, "/api/v1/release/prepare", "{}", &ptoken);
        {
            let mut all: Vec<&mut Vm> = vms.iter_mut().collect();
            let prepared = wait_for(
                &format!("m{parent} preparing its image"),
                Duration::from_secs(1200),
                &mut all,
                || {
                    let v = json(pport, "/api/v1/release/prepare")?;
                    (v["state"] == "ready" || v["state"] == "failed").then_some(v)
                },
            )?;
            if prepared["state"] != "ready" {
                return Err(format!("m{parent} could not prepare its image: {prepared}"));
            }
            log(&format!(
                "m{parent} prepared its image in {:.1}s",
                prepared["seconds"].as_f64().unwrap_or(0.0)
            ));
        }

        std::fs::File::create(&machines[k].disk)
            .and_then(|f| f.set_len(CHILD_DISK))
            .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut child = start(k, &machines[k], work, faults)?;
        let mac_k = machines[k].mac_uplink.clone();
        let installs = |port: u16| -> Option<serde_json::Value> {
            json(port, "/api/v1/installs")?["items"]
                .as_array()?
                .iter()
                .find(|r| r["mac"] == mac_k.as_str())
                .cloned()
        };
        let checked_in = |port: u16| -> Option<()> {
            json(port, "/api/v1/agents")?["items"]
                .as_array()?
                .iter()
                .any(|a| a["mac"] == mac_k.as_str() && a["mode"] == "install")
                .then_some(())
        };
        {
            let mut all: Vec<&mut Vm> = vms.iter_mut().collect();
            all.push(&mut child);
            wait_for(
                &format!("m{k} installer check-in"),
                Duration::from_secs(600),
                &mut all,
                || checked_in(pport),
            )?;
        }
        let pxe_boot = t0.elapsed().as_secs_f64();
        log(&format!("m{k}: installer checked in after {pxe_boot:.1}s"));
        let tw = Instant::now();
        {
            let mut all: Vec<&mut Vm> = vms.iter_mut().collect();
            all.push(&mut child);
            wait_for(
                &format!("m{k} install work"),
                Duration::from_secs(900),
                &mut all,
                || installs(pport),
            )?;
        }
        let wait = tw.elapsed().as_secs_f64();
        // The parent rebuilt its image from its bundle, inside the VM:
        // compared from outside with the host's build.
        let cached = json(pport, "/api/v1/release")
            .map(|v| v["cached"].clone())
            .unwrap_or_default();
        if cached["identical"] != true
            || cached["disk"] != host_disk.as_str()
            || cached["rebuilt_release"] != release.as_str()
        {
            problems.push(format!(
                "m{parent}'s rebuild is not the host's build ({host_disk}, {release}): {cached}"
            ));
        } else {
            log(&format!(
                "m{parent} rebuilt the image bit for bit in {:.1}s: {host_disk}",
                cached["seconds"].as_f64().unwrap_or(0.0)
            ));
        }
        if let Some((mut vm, disk)) = tiny.take() {
            // Its install fails, reported to the parent, and writes nothing.
            let rec = wait_for(
                "the too-small machine's failure report",
                Duration::from_secs(300),
                &mut [&mut vm],
                || {
                    json(pport, "/api/v1/installs")?["items"]
                        .as_array()?
                        .iter()
                        .find(|r| r["mac"] == TINY_MAC && r["state"] == "failed")
                        .cloned()
                },
            )?;
            let msg = rec["message"].as_str().unwrap_or_default().to_owned();
            log(&format!(
                "too-small machine: install failed as it should: {msg}"
            ));
            if !msg.contains("too small") {
                problems.push(format!(
                    "the too-small machine failed for another reason: {msg}"
                ));
            }
            drop(vm);
            if !zeros(&disk, TINY_DISK) {
                problems.push("the too-small machine's disk was written".into());
            }
        }
        if k == 1 && faults.kill_mid_write {
            // Kill the machine while it streams, then power it on again.
            let rec = wait_for(
                &format!("m{k} streaming"),
                Duration::from_secs(300),
                &mut [&mut child],
                || {
                    let r = installs(pport)?;
                    (r["phase"] == "stream" && r["done_bytes"].as_u64()? > 0).then_some(r)
                },
            )?;
            drop(child);
            log(&format!(
                "m{k}: killed mid-write at {} of {} bytes",
                rec["done_bytes"], rec["total_bytes"]
            ));
            if !zeros(&machines[k].disk, 1 << 20) {
                problems.push(format!(
                    "m{k}'s first MiB is not zero after a kill mid-write"
                ));
            }
            child = start(k, &machines[k], work, faults)?;
            let first = rec["started"].as_f64();
            wait_for(
                &format!("m{k} installing again after the kill"),
                Duration::from_secs(600),
                &mut [&mut child],
                || {
                    let r = installs(pport)?;
                    (r["started"].as_f64() != first).then_some(())
                },
            )?;
            log(&format!("m{k}: PXE-booted again and streams"));
        }
        log(&format!("m{k}: install assigned {wait:.1}s later"));
        // The child powers itself off (-no-reboot) when the install is done.
        let deadline = Instant::now() + Duration::from_secs(1200);
        let exit = loop {
            if let Some(st) = child.exited() {
                break st;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "m{k} did not finish installing; serial:\n{}",
                    tail(&child.serial(), 80)
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let rec = installs(pport).unwrap_or_default();
        if rec["state"] != "installed" {
            return Err(format!(
                "m{k} exited ({exit}) but its parent's install record is {rec}; serial:\n{}",
                tail(&child.serial(), 80)
            ));
        }
        let stream =
            rec["updated"].as_f64().unwrap_or(0.0) - rec["started"].as_f64().unwrap_or(0.0);
        let write = rec["report"]["writer"]["write_secs"]
            .as_f64()
            .unwrap_or(0.0);
        let bytes_sent = rec["bytes_sent"].as_u64().unwrap_or(0);
        log(&format!(
            "m{k}: installed in {stream:.1}s ({bytes_sent} bytes sent)"
        ));
        // Power it on again: it boots from its own disk.
        let t2 = Instant::now();
        let _ = std::fs::copy(
            machines[k].dir.join("OVMF_VARS.fd"),
            machines[k].dir.join("OVMF_VARS.keep"),
        );
        drop(child);
        let mut child = start(k, &machines[k], work, faults)?;
        let token = up(&mut child, Duration::from_secs(600))?;
        let reboot = t2.elapsed().as_secs_f64();
        machines[k].token = Some(token);
        let data_bytes = json(pport, "/api/v1/release/prepare")
            .and_then(|v| v["data_bytes"].as_u64())
            .unwrap_or(0);
        log(&format!("m{k}: up from its own disk after {reboot:.1}s"));
        gens.push(Generation {
            index: k,
            pxe_boot,
            wait,
            stream,
            write,
            reboot,
            total: t0.elapsed().as_secs_f64(),
            bytes_sent,
            data_bytes,
        });
        vms.push(child);
    }

    // Every child runs A's release and its parent lists it.
    for k in 1..n {
        let port = machines[k].port;
        let pport = machines[k - 1].port;
        let v = json(port, "/api/v1/version").unwrap_or_default();
        if v["release"] != release.as_str() {
            problems.push(format!("m{k} runs release {} not {release}", v["release"]));
        }
        let node = v["node_id"].as_str().unwrap_or_default().to_owned();
        let listed = wait_for(
            &format!("m{} listing m{k} as a checked-in replica", k - 1),
            Duration::from_secs(120),
            &mut [],
            || {
                json(pport, "/api/v1/replicas")?["items"]
                    .as_array()?
                    .iter()
                    .find(|r| r["node_id"] == node.as_str() && r["release"] == release.as_str())
                    .cloned()
            },
        );
        if let Err(e) = listed {
            problems.push(e);
        }
    }
    // Sync (issue 8): a profile added on the last machine reaches machine
    // 0 after each generation syncs with its parent, last first.
    if n >= 3 && faults.sync {
        if let Err(e) = sync_up(&machines, log) {
            problems.push(e);
        }
    }
    Ok(FleetReport {
        release,
        ok: problems.is_empty(),
        generations: gens,
        total_seconds: started.elapsed().as_secs_f64(),
        problems,
    })
}

/// Adds a distro and a profile on the last machine, syncs every machine
/// with its parent from the last up, and checks machine 0 has the profile.
fn sync_up(machines: &[Machine], log: &mut dyn FnMut(&str)) -> Result<(), String> {
    let last = machines.last().ok_or("no machines")?;
    let token = last
        .token
        .as_deref()
        .ok_or("no token for the last machine")?;
    let post = |port: u16, path: &str, body: &str, token: &str| -> Result<String, String> {
        let r = http::request_within(
            port,
            "POST",
            path,
            Some(body),
            Some(token),
            Duration::from_secs(300),
        )
        .map_err(|e| format!("POST {path}: {e}"))?;
        if (200..300).contains(&r.status) {
            Ok(r.body)
        } else {
            Err(format!("POST {path}: {} {}", r.status, r.body))
        }
    };
    post(
        last.port,
        "/api/v1/distros",
        r#"{"name":"fleet-distro","kernel":"http://10.77.9.9/vmlinuz","initrd":"http://10.77.9.9/initrd.img","arch":"x86_64","breed":"debian"}"#,
        token,
    )?;
    post(
        last.port,
        "/api/v1/profiles",
        r#"{"name":"added-on-the-last-machine","distro":"fleet-distro"}"#,
        token,
    )?;
    let t = Instant::now();
    for k in (1..machines.len()).rev() {
        let m = &machines[k];
        let token = m.token.as_deref().ok_or("no token")?;
        let report = post(m.port, "/api/v1/sync/run", "{}", token)?;
        log(&format!("m{k} synced with its parent: {report}"));
        // A PXE-installed child links back over HTTPS, pinning its
        // parent's CA (the install work carried it).
        let status = json(m.port, "/api/v1/sync/status").ok_or("no sync status")?;
        let parent = status["parent"].as_str().unwrap_or_default();
        if !parent.starts_with("https://") {
            return Err(format!(
                "m{k} links to its parent at {parent:?}, not over https"
            ));
        }
    }
    // The writes made on the last machine reached m0's audit log through
    // the middle one: node = the last machine, via = m1.
    let id = |m: &Machine| -> Result<String, String> {
        json(m.port, "/api/v1/version")
            .and_then(|v| v["node_id"].as_str().map(str::to_owned))
            .ok_or_else(|| "no node id".to_owned())
    };
    if let (Some(m0_token), true) = (machines[0].token.as_deref(), machines.len() >= 3) {
        let (last_id, m1_id) = (id(last)?, id(&machines[1])?);
        let r = http::request_within(
            machines[0].port,
            "GET",
            "/api/v1/audit?limit=10000",
            None,
            Some(m0_token),
            Duration::from_secs(30),
        )
        .map_err(|e| format!("GET /api/v1/audit: {e}"))?;
        let page: serde_json::Value = serde_json::from_str(&r.body)
            .map_err(|e| format!("GET /api/v1/audit: {e}: {} {}", r.status, r.body))?;
        let forwarded = page["items"].as_array().into_iter().flatten().any(|l| {
            l["path"] == "/api/v1/profiles"
                && l["node"] == last_id.as_str()
                && l["via"] == m1_id.as_str()
        });
        if !forwarded {
            return Err(format!(
                "m0's audit log lacks the profile write made on the last machine ({last_id}) via m1 ({m1_id}): {}",
                r.body.chars().take(2000).collect::<String>()
            ));
        }
        log("the last machine's writes are in m0's audit log, forwarded by m1");
    }
    let got = json(
        machines[0].port,
        "/api/v1/profiles/added-on-the-last-machine",
    );
    match got {
        Some(v) if v["distro"] == "fleet-distro" || v["object"]["distro"] == "fleet-distro" => {
            log(&format!(
                "the profile added on m{} reached m0 in {:.1}s",
                machines.len() - 1,
                t.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        other => Err(format!(
            "the profile added on m{} is not on m0 after syncing: {other:?}",
            machines.len() - 1
        )),
    }
}

/// The report as a table, one row per generation.
pub fn table(r: &FleetReport) -> String {
    let mut s = format!(
        "{:>3} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>11} {:>11}\n",
        "gen",
        "pxe_s",
        "wait_s",
        "stream_s",
        "write_s",
        "reboot_s",
        "total_s",
        "bytes_sent",
        "data_bytes"
    );
    for g in &r.generations {
        s.push_str(&format!(
            "{:>3} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>9.1} {:>8.1} {:>11} {:>11}\n",
            g.index,
            g.pxe_boot,
            g.wait,
            g.stream,
            g.write,
            g.reboot,
            g.total,
            g.bytes_sent,
            g.data_bytes
        ));
    }
    s
}
