//! Cloning and power end to end in QEMU (issue 7), driven by QMP.
//!
//! Machine 0 boots the appliance image. Its management NIC (user
//! networking, `restrict=on`) forwards its API to a loopback port and
//! forwards `10.0.2.100:444N` inside the VM to each machine's QMP socket
//! on the host (`guestfwd … cmd:socat`), so the appliance's QMP power
//! driver reaches the "BMCs". Every other machine sits on its own
//! provisioning wire (a unix-socket point-to-point link) to the
//! appliance, with a QMP socket, started powered off (`-S`) unless said.
//!
//! The flow, through the stock CLI (`appliance clone …`):
//! 1. A source machine holds a disk the builder made from an image
//!    definition: an ESP, a swap partition (header plus junk that must not
//!    be copied) and an ext4 root with known files and identity files.
//! 2. Faults first: a system whose BMC does not answer (clear error, job
//!    failed at once), and a target whose BMC works but which never checks
//!    in (the CLI's check-in timeout, the job failed with that reason).
//! 3. Capture the source (power cycled into the agent by the appliance).
//! 4. Deploy to two targets at once: t1 has the same disk size and an old
//!    partition table, t2 a bigger blank disk (last partition and its ext4
//!    grow). t1 is switched off mid-write: its disk is left unbootable
//!    (first MiB zero); powered on again it PXE-boots back into the job,
//!    which completes. Both disks, read back on the host, pass `sgdisk -v`,
//!    `fsck.fat -n` and `e2fsck -fn` and hold the source's files apart
//!    from the identity files, which are theirs.
//! 5. Change one file on the source; the second capture uploads a handful
//!    of chunks.
//! 6. The source dies; its replacement (new MAC, new BMC) gets its last
//!    capture with `clone restore`, keeping its identity.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use builder::definition;
use builder::plan::{self, BuildRequest};
use builder::treefile::{MemBlobs, TreeFile, TreeFileEntry, TreeFileKind};
use integration_tests::http;
use integration_tests::qemu::{base_command, bmc_command, Firmware, Vm};
use integration_tests::{free_port, workspace_root};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SRC_DISK: u64 = 320 * MIB;
const BIG_DISK: u64 = 640 * MIB;
const SWAP_BYTES: u64 = 16 * MIB;
/// The address inside the appliance VM that reaches the host's QMP sockets.
const BMC_HOST: &str = "10.0.2.100";

/// A machine with a BMC: name, MAC, QMP port as seen by the appliance.
struct Target {
    name: &'static str,
    mac: &'static str,
    bmc_port: u16,
    /// The appliance's provisioning NIC (and wire) it sits on, if any.
    wire: Option<usize>,
}

const SRC: Target = Target {
    name: "src",
    mac: "52:54:00:c1:00:01",
    bmc_port: 4441,
    wire: Some(1),
};
const T1: Target = Target {
    name: "t1",
    mac: "52:54:00:c1:00:02",
    bmc_port: 4442,
    wire: Some(2),
};
const T2: Target = Target {
    name: "t2",
    mac: "52:54:00:c1:00:03",
    bmc_port: 4443,
    wire: Some(3),
};
/// A target whose disk is smaller than the image.
const TINY: Target = Target {
    name: "tiny",
    mac: "52:54:00:c1:00:04",
    bmc_port: 4446,
    wire: Some(4),
};
/// The source's replacement hardware, on the source's wire.
const NEW: Target = Target {
    name: "src",
    mac: "52:54:00:c1:00:09",
    bmc_port: 4444,
    wire: Some(1),
};
/// A machine whose BMC works but whose NIC is cabled to nothing.
const MUTE: Target = Target {
    name: "mute",
    mac: "52:54:00:c1:00:05",
    bmc_port: 4445,
    wire: None,
};

struct Lab {
    work: PathBuf,
    port: u16,
    token: String,
    appliance: Vm,
}

impl Lab {
    fn qmp(&self, port: u16) -> PathBuf {
        self.work.join(format!("bmc{port}.qmp"))
    }

    fn wire(&self, n: usize) -> PathBuf {
        self.work.join(format!("wire{n}.sock"))
    }

    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let r =
            http::request_with_token(self.port, method, path, body.as_deref(), Some(&self.token))
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone()));
        (r.status, v)
    }

    fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (st, v) = self.api(method, path, Some(&body));
        assert!((200..300).contains(&st), "{method} {path}: {st} {v}");
        v
    }

    /// Runs the stock CLI against the appliance.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_cmd(args)
            .output()
            .expect("running the appliance CLI")
    }

    fn cli_cmd(&self, args: &[&str]) -> Command {
        let bin = workspace_root().join("target/static/appliance");
        assert!(
            bin.exists(),
            "{} missing: run `cargo xtask image`",
            bin.display()
        );
        let mut c = Command::new(bin);
        c.args(args)
            .env("APPLIANCE_URL", format!("http://127.0.0.1:{}", self.port))
            .env("APPLIANCE_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn jobs(&self) -> Vec<Value> {
        let (st, v) = self.api("GET", "/api/v1/clone/jobs", None);
        assert_eq!(st, 200, "{v}");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn last_job(&self, system: &str) -> Value {
        self.jobs()
            .into_iter()
            .filter(|j| j["system"] == system)
            .max_by(|a, b| {
                a["created"]
                    .as_f64()
                    .partial_cmp(&b["created"].as_f64())
                    .unwrap()
            })
            .unwrap_or_else(|| panic!("no job for {system}"))
    }

    /// Starts a machine with a BMC: OVMF, its disk first and its NIC second
    /// in the boot order (qdev ids `disk0` and `nic0`), powered off unless
    /// `on`.
    fn machine(&self, t: &Target, disk: &Path, on: bool, extra_drive_opts: &str) -> Vm {
        let dir = self
            .work
            .join(format!("{}-{}", t.name, t.mac.replace(':', "")));
        fs::create_dir_all(&dir).unwrap();
        let qmp = self.qmp(t.bmc_port);
        let (mut cmd, serial) = bmc_command(&dir, 1024, &qmp).unwrap();
        if !on {
            cmd.arg("-S");
        }
        let netdev = match t.wire {
            Some(n) => format!(
                "stream,id=p,server=off,addr.type=unix,addr.path={}",
                self.wire(n).display()
            ),
            None => {
                let s = dir.join("nowhere.sock");
                let _ = fs::remove_file(&s);
                format!(
                    "stream,id=p,server=on,addr.type=unix,addr.path={}",
                    s.display()
                )
            }
        };
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d0,format=raw,file={}{extra_drive_opts}",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,id=disk0,bootindex=1"])
            .args(["-netdev", &netdev])
            .args([
                "-device",
                &format!(
                    "virtio-net-pci,netdev=p,mac={},id=nic0,bootindex=2,romfile=",
                    t.mac
                ),
            ])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let vm = Vm::spawn(cmd, serial, 0).unwrap();
        // The QMP socket is there once QEMU is up.
        wait("QEMU's QMP socket", Duration::from_secs(30), || {
            qmp.exists().then_some(())
        });
        vm
    }

    fn system(&self, t: &Target, hostname: &str) {
        self.ok(
            "POST",
            "/api/v1/systems",
            json!({
                "name": t.name,
                "image": "site-install",
                "hostname": hostname,
                "netboot": false,
                "interfaces": [{"name": "eth0", "mac": t.mac}],
                "power": {
                    "type": "qmp",
                    "address": format!("tcp:{BMC_HOST}:{}", t.bmc_port),
                    "id": "disk=disk0,net=nic0",
                },
            }),
        );
    }
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The source's root tree: identity files, a big file, many small ones.
fn root_files() -> Vec<(String, Vec<u8>)> {
    let mut f = vec![
        ("etc/hostname".into(), b"golden\n".to_vec()),
        (
            "etc/hosts".into(),
            b"127.0.0.1 localhost\n127.0.1.1 golden\n".to_vec(),
        ),
        (
            "etc/machine-id".into(),
            b"0123456789abcdef0123456789abcdef\n".to_vec(),
        ),
        (
            "etc/ssh/ssh_host_ed25519_key".into(),
            b"-----BEGIN OPENSSH PRIVATE KEY-----\ngolden\n".to_vec(),
        ),
        (
            "etc/ssh/ssh_host_ed25519_key.pub".into(),
            b"ssh-ed25519 AAAA golden\n".to_vec(),
        ),
        (
            "etc/ssh/sshd_config".into(),
            b"PermitRootLogin no\n".to_vec(),
        ),
        ("srv/big.bin".into(), noise(1, 96 * MIB as usize)),
        ("usr/bin/tool".into(), noise(2, 300_000)),
    ];
    for i in 0..300 {
        f.push((
            format!("srv/small/{i:03}.txt"),
            format!("small file {i}\n").repeat(i % 7 + 1).into_bytes(),
        ));
    }
    f
}

/// Builds the source disk with the builder from an image definition.
fn source_disk(out: &Path) -> PathBuf {
    let mut blobs = MemBlobs::default();
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, bytes) in root_files() {
        let mut d = Path::new(&path).parent();
        while let Some(p) = d.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            d = p.parent();
        }
        let size = bytes.len() as u64;
        let digest = blobs.put(bytes);
        entries.push(TreeFileEntry {
            mode: if path.starts_with("usr/bin") {
                0o755
            } else {
                0o644
            },
            path,
            kind: TreeFileKind::File { size, digest },
            uid: 0,
            gid: 0,
            mtime: Some(1_700_000_000),
        });
    }
    for d in dirs {
        entries.push(TreeFileEntry {
            path: d,
            kind: TreeFileKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Some(1_700_000_000),
        });
    }
    entries.push(TreeFileEntry {
        path: "srv/latest".into(),
        kind: TreeFileKind::Symlink {
            target: "big.bin".into(),
        },
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime: Some(1_700_000_000),
    });
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let tree = blobs.put(TreeFile::new(entries).to_bytes());
    let text = format!(
        r#"
[image]
name = "golden"
epoch = 1700000000

[inputs]
root = {{ digest = "{tree}", kind = "tree" }}

[disk]
size = "{}MiB"

[[partitions]]
label = "esp"
type = "esp"
size = "64MiB"
filesystem = "fat32"
files = [
  {{ path = "EFI/vendor/readme.txt", text = "golden ESP\n" }},
  {{ path = "loader/entries/golden.conf", text = "title golden\n" }},
]

[[partitions]]
label = "swap"
type = "swap"
size = "{}MiB"

[[partitions]]
label = "root"
type = "root-x86-64"
size = "fill"
filesystem = "ext4"
files = [{{ path = ".", tree = "root" }}]
"#,
        SRC_DISK / MIB,
        SWAP_BYTES / MIB
    );
    let (def, src) = definition::parse("golden.toml", &text).unwrap();
    let req = BuildRequest {
        inputs: plan::resolve_inputs(&def, &BTreeMap::new()).unwrap(),
        definition: &def,
        source: &src,
        blobs: &blobs,
        epoch: 1_700_000_000,
        out_dir: out,
        sign: None,
    };
    plan::build(&req).unwrap();
    let disk = out.join("golden.img");
    // A swap header (as mkswap writes it) and junk a swapped-out page left.
    let (off, len, _) = partitions(&disk)[1];
    assert_eq!(len, SWAP_BYTES);
    let mut hdr = vec![0u8; 4096];
    hdr[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    hdr[1028..1032].copy_from_slice(&((SWAP_BYTES / 4096 - 1) as u32).to_le_bytes());
    hdr[4086..].copy_from_slice(b"SWAPSPACE2");
    let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&hdr).unwrap();
    f.write_all(&noise(3, 2 * MIB as usize)).unwrap();
    disk
}

/// `(offset, size, type GUID)` of each partition, by `sfdisk --json`.
fn partitions(disk: &Path) -> Vec<(u64, u64, String)> {
    let o = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .expect("running sfdisk (fdisk)");
    assert!(
        o.status.success(),
        "sfdisk --json {}: {}",
        disk.display(),
        text(&o)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * ss,
                p["size"].as_u64().unwrap() * ss,
                p["type"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn extract(disk: &Path, off: u64, len: u64, to: &Path) {
    let mut f = fs::File::open(disk).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut out = fs::File::create(to).unwrap();
    let n = std::io::copy(&mut f.take(len), &mut out).unwrap();
    assert_eq!(n, len);
}

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}; install xtask/debian-packages.txt"));
    (o.status.success(), text(&o))
}

/// Every regular file and symlink under `dir` (relative path → content or
/// `-> target`).
fn walk(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else if m.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Checks a written disk with the real tools and returns its root tree
/// (`debugfs rdump`) and the root's block count.
fn read_back(disk: &Path, scratch: &Path) -> (BTreeMap<String, Vec<u8>>, u64) {
    fs::create_dir_all(scratch).unwrap();
    let d = disk.to_str().unwrap();
    let (ok, out) = tool("sgdisk", &["-v", d]);
    assert!(
        ok && out.contains("No problems found"),
        "sgdisk -v {d}: {out}"
    );
    let parts = partitions(disk);
    assert_eq!(parts.len(), 3, "{parts:?}");
    let esp = scratch.join("esp.img");
    extract(disk, parts[0].0, parts[0].1, &esp);
    let (ok, out) = tool("fsck.fat", &["-n", esp.to_str().unwrap()]);
    assert!(ok, "fsck.fat -n: {out}");
    let (ok, out) = tool(
        "mtype",
        &["-i", esp.to_str().unwrap(), "::/EFI/vendor/readme.txt"],
    );
    assert!(ok && out.contains("golden ESP"), "mtype: {out}");
    let root = scratch.join("root.img");
    extract(disk, parts[2].0, parts[2].1, &root);
    let (ok, out) = tool("e2fsck", &["-fn", root.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn: {out}");
    let (_, out) = tool("dumpe2fs", &["-h", root.to_str().unwrap()]);
    let blocks = out
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("dumpe2fs -h: {out}"));
    let tree = scratch.join("tree");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree).unwrap();
    let (ok, out) = tool(
        "debugfs",
        &[
            "-R",
            &format!("rdump /etc /srv /usr {}", tree.display()),
            root.to_str().unwrap(),
        ],
    );
    assert!(ok, "debugfs rdump: {out}");
    let files = walk(&tree);
    fs::remove_file(&root).unwrap();
    fs::remove_file(&esp).unwrap();
    (files, blocks)
}

/// Files a clone's identity may change.
fn identity_path(p: &str) -> bool {
    matches!(p, "etc/hostname" | "etc/hosts" | "etc/machine-id")
        || p.starts_with("etc/ssh/ssh_host_")
        || p.starts_with("etc/systemd/network/10-appliance-")
        || p.contains("appliance-ssh-hostkeys.service")
}

/// `clone`'s tree equals `source`'s apart from identity files, and the
/// identity is `hostname`'s.
fn same_but_identity(
    source: &BTreeMap<String, Vec<u8>>,
    clone: &BTreeMap<String, Vec<u8>>,
    hostname: &str,
    who: &str,
) {
    for (p, b) in source {
        if identity_path(p) {
            continue;
        }
        assert!(clone.get(p) == Some(b), "{who}: {p} differs or is missing");
    }
    for p in clone.keys() {
        assert!(
            source.contains_key(p) || identity_path(p),
            "{who}: unexpected file {p}"
        );
    }
    assert_eq!(
        clone.get("etc/hostname").map(Vec::as_slice),
        Some(format!("{hostname}\n").as_bytes()),
        "{who}: hostname"
    );
    assert_eq!(
        clone.get("etc/machine-id").map(Vec::as_slice),
        Some(&b""[..]),
        "{who}: machine-id must be emptied"
    );
    assert!(
        !clone.keys().any(|p| p.starts_with("etc/ssh/ssh_host_")),
        "{who}: the source's SSH host keys were kept"
    );
    assert!(
        clone.contains_key("etc/systemd/system/appliance-ssh-hostkeys.service"),
        "{who}: no first-boot unit for SSH host keys"
    );
    assert!(
        clone.contains_key("etc/systemd/network/10-appliance-eth0.network"),
        "{who}: no network settings from the system record"
    );
}

fn first_mib_zero(disk: &Path) -> bool {
    let mut b = vec![0u8; MIB as usize];
    fs::File::open(disk).unwrap().read_exact(&mut b).unwrap();
    b.iter().all(|x| *x == 0)
}

fn boot_appliance(work: &Path) -> Lab {
    let image = workspace_root().join("target/appliance/appliance.img");
    assert!(
        image.exists(),
        "{} missing: run `cargo xtask image` (cargo xtask test does)",
        image.display()
    );
    let dir = work.join("appliance");
    fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let (mut cmd, serial) = base_command(Firmware::Ovmf, &dir, 1536).unwrap();
    // Each guestfwd connection runs its own socat to the machine's QMP socket.
    let mut mgmt = format!("user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80");
    for t in [&SRC, &T1, &T2, &NEW, &MUTE, &TINY] {
        mgmt += &format!(
            ",guestfwd=tcp:{BMC_HOST}:{}-cmd:socat STDIO UNIX-CONNECT:{}",
            t.bmc_port,
            work.join(format!("bmc{}.qmp", t.bmc_port)).display()
        );
    }
    cmd.arg("-drive")
        .arg(format!(
            "if=none,id=d0,format=raw,file={},snapshot=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=1"])
        .args(["-netdev", &mgmt])
        .args(["-device", "virtio-net-pci,netdev=mgmt,romfile="]);
    for n in 1..=4 {
        let sock = work.join(format!("wire{n}.sock"));
        let _ = fs::remove_file(&sock);
        cmd.arg("-netdev")
            .arg(format!(
                "stream,id=w{n},server=on,addr.type=unix,addr.path={}",
                sock.display()
            ))
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=w{n},mac=52:54:00:c0:00:0{n},romfile="),
            ]);
    }
    cmd.args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut vm = Vm::spawn(cmd, serial, port).unwrap();
    vm.wait_http("/api/v1/version", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("the appliance did not come up: {e}"));
    let token = wait("the first API token", Duration::from_secs(30), || {
        vm.first_token()
    });
    Lab {
        work: work.to_owned(),
        port,
        token,
        appliance: vm,
    }
}

#[test]
fn capture_deploy_restore_and_power_faults_in_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let t0 = Instant::now();
    let golden = source_disk(&work.join("build"));
    let lab = boot_appliance(work);
    eprintln!(
        "clone: appliance up after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    for n in 1..=4 {
        lab.ok(
            "POST",
            "/api/v1/networks",
            json!({"iface": format!("eth{n}"), "cidr": format!("10.79.{n}.1/24"), "mode": "authoritative"}),
        );
    }
    // Systems need a profile or an image: an image standing for "whatever
    // the site installed", before anything was captured.
    lab.ok(
        "POST",
        "/api/v1/images",
        json!({"name": "site-install", "type": "local"}),
    );
    lab.system(&SRC, "src-host");
    lab.system(&T1, "t1-host");
    lab.system(&T2, "t2-host");
    lab.system(&MUTE, "mute-host");
    lab.system(&TINY, "tiny-host");
    lab.ok(
        "POST",
        "/api/v1/systems",
        json!({
            "name": "ghost", "image": "site-install", "netboot": false,
            "interfaces": [{"name": "eth0", "mac": "52:54:00:c1:00:06"}],
            "power": {"type": "qmp", "address": format!("tcp:{BMC_HOST}:4449"), "id": "net=nic0"},
        }),
    );

    // --- Fault: a BMC that does not answer.
    let o = lab.cli(&["power", "status", "ghost"]);
    assert!(
        !o.status.success() && text(&o).contains("did not answer"),
        "power status of a dead BMC: {}",
        text(&o)
    );
    let o = lab.cli(&["clone", "capture", "ghost", "--name", "ghost-img"]);
    assert!(!o.status.success(), "{}", text(&o));
    let j = lab.last_job("ghost");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["message"].as_str().unwrap().contains("did not answer"),
        "{j}"
    );

    // --- Fault: a target that never checks in (its NIC is cabled to
    // nothing): the check-in timeout, a clear status, back to local boot.
    let mute_disk = work.join("mute.img");
    fs::File::create(&mute_disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut mute = lab.machine(&MUTE, &mute_disk, false, "");
    let o = lab.cli(&[
        "clone",
        "capture",
        "mute",
        "--name",
        "mute-img",
        "--checkin-timeout",
        "20",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("never checked in"),
        "{}",
        text(&o)
    );
    let j = lab.last_job("mute");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["power"].as_str().unwrap().contains("qmp"), "{j}");
    assert!(
        j["message"].as_str().unwrap().contains("never checked in"),
        "{j}"
    );
    assert!(mute.exited().is_none(), "the mute machine's QEMU exited");
    drop(mute);
    eprintln!(
        "clone: power faults done after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // --- Capture the source (powered off; the appliance powers it on).
    let src_disk = work.join("src.img");
    fs::copy(&golden, &src_disk).unwrap();
    let src = lab.machine(&SRC, &src_disk, false, "");
    let o = lab.cli(&[
        "clone",
        "capture",
        "src",
        "--name",
        "golden",
        "--timeout",
        "900",
    ]);
    assert!(o.status.success(), "capture: {}", text(&o));
    let j = lab.last_job("src");
    assert_eq!(j["state"], "done", "{j}");
    let first = j["report"]["capture"].clone();
    eprintln!(
        "clone: captured after {:.1}s: {first}",
        t0.elapsed().as_secs_f64()
    );
    let chunks = first["chunks"].as_u64().unwrap();
    assert!(chunks > 90, "{first}");
    // Everything is new to the store (identical chunks are stored once).
    let new_first = first["new_chunks"].as_u64().unwrap();
    assert!(new_first > 90 && new_first <= chunks, "{first}");
    // Used bytes, not the disk: the junk in swap and the free space stay.
    let used = first["used_bytes"].as_u64().unwrap();
    assert!(used < 130 * MIB, "{first}");
    let (_, img) = lab.api("GET", "/api/v1/images/golden", None);
    assert_eq!(img["type"], "capture", "{img}");
    assert_eq!(img["variables"]["system"], "src", "{img}");
    let (_, sys) = lab.api("GET", "/api/v1/systems/src", None);
    assert_eq!(sys["netboot"], false, "{sys}");
    drop(src);

    // --- Deploy to t1 (old partition table, same size; switched off
    // mid-write), t2 (blank, bigger) and tiny (too small) at once.
    let t1_disk = work.join("t1.img");
    {
        let g = fs::read(&golden).unwrap();
        let mut f = fs::File::create(&t1_disk).unwrap();
        f.set_len(SRC_DISK).unwrap();
        f.write_all(&g[..MIB as usize]).unwrap();
        f.seek(SeekFrom::Start(SRC_DISK - 33 * 512)).unwrap();
        f.write_all(&g[(SRC_DISK - 33 * 512) as usize..]).unwrap();
    }
    assert!(!first_mib_zero(&t1_disk));
    let t2_disk = work.join("t2.img");
    fs::File::create(&t2_disk)
        .unwrap()
        .set_len(BIG_DISK)
        .unwrap();
    // t1's disk writes at 12 MB/s, so it is surely mid-write when pulled.
    let t1 = lab.machine(&T1, &t1_disk, false, ",throttling.bps-write=12000000");
    let t2 = lab.machine(&T2, &t2_disk, false, "");
    let tiny_disk = work.join("tiny.img");
    fs::File::create(&tiny_disk)
        .unwrap()
        .set_len(SRC_DISK / 2)
        .unwrap();
    let tiny = lab.machine(&TINY, &tiny_disk, false, "");
    let deploy = lab
        .cli_cmd(&[
            "clone",
            "deploy",
            "golden",
            "--to",
            "t1",
            "t2",
            "tiny",
            "--yes",
            "--timeout",
            "1200",
        ])
        .spawn()
        .unwrap();
    let j = wait("t1 writing", Duration::from_secs(600), || {
        let j = lab
            .jobs()
            .into_iter()
            .find(|j| j["system"] == "t1" && j["state"] != "failed" && j["action"] == "deploy")?;
        assert_ne!(
            j["state"], "done",
            "t1 finished before it could be pulled: {j}"
        );
        (j["phase"] == "write" && j["done_bytes"].as_u64() > Some(8 * MIB)).then_some(j)
    });
    drop(t1); // the power plug
    eprintln!(
        "clone: t1 switched off mid-write after {:.1}s: {} of {} bytes",
        t0.elapsed().as_secs_f64(),
        j["done_bytes"],
        j["total_bytes"]
    );
    assert!(
        first_mib_zero(&t1_disk),
        "a half-written t1 keeps a partition table: it could boot"
    );
    // Powered on again (disk first in its boot order): the disk does not
    // boot, the machine falls through to the network and the open job.
    let t1 = lab.machine(&T1, &t1_disk, true, "");
    let out = deploy.wait_with_output().unwrap();
    // One of three fails: the disk too small, said clearly, left untouched.
    assert!(
        !out.status.success() && text(&out).contains("1 of 3 jobs failed"),
        "deploy: {}",
        text(&out)
    );
    eprintln!("clone: deployed after {:.1}s", t0.elapsed().as_secs_f64());
    let j = lab.last_job("tiny");
    assert_eq!(j["state"], "failed", "{j}");
    let msg = j["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("needs a disk of at least {SRC_DISK} bytes")),
        "{j}"
    );
    drop(tiny);
    let mut b = Vec::new();
    fs::File::open(&tiny_disk)
        .unwrap()
        .read_to_end(&mut b)
        .unwrap();
    assert!(b.iter().all(|x| *x == 0), "the too-small disk was written");
    for t in ["t1", "t2"] {
        let j = lab.last_job(t);
        assert_eq!(j["state"], "done", "{j}");
        let (_, sys) = lab.api("GET", &format!("/api/v1/systems/{t}"), None);
        assert_eq!(sys["image"], "golden", "lineage: {sys}");
    }
    drop(t1);
    drop(t2);
    let (source_tree, source_blocks) = read_back(&golden, &work.join("rb-src"));
    let (t1_tree, t1_blocks) = read_back(&t1_disk, &work.join("rb-t1"));
    let (t2_tree, t2_blocks) = read_back(&t2_disk, &work.join("rb-t2"));
    same_but_identity(&source_tree, &t1_tree, "t1-host", "t1");
    same_but_identity(&source_tree, &t2_tree, "t2-host", "t2");
    assert_eq!(t1_blocks, source_blocks, "t1's root changed size");
    let p2 = partitions(&t2_disk);
    assert!(
        p2[2].0 + p2[2].1 > BIG_DISK - 2 * MIB,
        "t2's last partition did not grow: {p2:?}"
    );
    assert!(
        t2_blocks * 4096 > p2[2].1 - 4 * MIB && t2_blocks > source_blocks,
        "t2's ext4 did not grow: {t2_blocks} blocks in {} bytes",
        p2[2].1
    );
    // The swap's junk was not copied: only its header page.
    let swap = partitions(&t2_disk)[1].clone();
    let mut b = vec![0u8; 2 * MIB as usize];
    let mut f = fs::File::open(&t2_disk).unwrap();
    f.seek(SeekFrom::Start(swap.0 + 4096)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0), "swap contents were copied");

    // --- Change one file on the source, capture again.
    {
        let (off, len, _) = partitions(&src_disk)[2];
        let root = work.join("src-root.img");
        extract(&src_disk, off, len, &root);
        let new = work.join("changed.txt");
        fs::write(&new, "changed after the first capture\n").unwrap();
        let (ok, out) = tool(
            "debugfs",
            &[
                "-w",
                "-R",
                &format!("write {} /srv/changed.txt", new.display()),
                root.to_str().unwrap(),
            ],
        );
        assert!(ok, "debugfs write: {out}");
        let mut f = fs::OpenOptions::new().write(true).open(&src_disk).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        std::io::copy(&mut fs::File::open(&root).unwrap(), &mut f).unwrap();
    }
    let src = lab.machine(&SRC, &src_disk, false, "");
    let o = lab.cli(&[
        "clone",
        "capture",
        "src",
        "--name",
        "golden2",
        "--timeout",
        "900",
    ]);
    assert!(o.status.success(), "second capture: {}", text(&o));
    let second = lab.last_job("src")["report"]["capture"].clone();
    eprintln!("clone: second capture: {second}");
    let new_chunks = second["new_chunks"].as_u64().unwrap();
    assert!(
        (1..=8).contains(&new_chunks),
        "a one-file change sent {new_chunks} chunks: {second}"
    );
    assert!(
        second["new_stored_bytes"].as_u64().unwrap() * 20 < first["stored_bytes"].as_u64().unwrap(),
        "{second} vs {first}"
    );
    let (_, img) = lab.api("GET", "/api/v1/images/golden2", None);
    assert_eq!(img["variables"]["parent"], "golden", "lineage: {img}");
    drop(src);

    // --- The source dies; its replacement has a new MAC and a new BMC.
    lab.ok(
        "PATCH",
        "/api/v1/systems/src",
        json!({
            "interfaces": [{"name": "eth0", "mac": NEW.mac}],
            "power": {"type": "qmp", "address": format!("tcp:{BMC_HOST}:{}", NEW.bmc_port), "id": "disk=disk0,net=nic0"},
        }),
    );
    let new_disk = work.join("new.img");
    fs::File::create(&new_disk)
        .unwrap()
        .set_len(SRC_DISK)
        .unwrap();
    let new = lab.machine(&NEW, &new_disk, false, "");
    let o = lab.cli(&["clone", "restore", "src", "--yes", "--timeout", "900"]);
    assert!(o.status.success(), "restore: {}", text(&o));
    let j = lab.last_job("src");
    assert_eq!(
        (j["action"].as_str(), j["image"].as_str()),
        (Some("restore"), Some("golden2")),
        "{j}"
    );
    drop(new);
    let (restored, _) = read_back(&new_disk, &work.join("rb-new"));
    assert_eq!(
        restored.get("srv/changed.txt").map(Vec::as_slice),
        Some(&b"changed after the first capture\n"[..])
    );
    let mut expect = source_tree.clone();
    expect.insert(
        "srv/changed.txt".into(),
        b"changed after the first capture\n".to_vec(),
    );
    same_but_identity(&expect, &restored, "src-host", "restored");
    eprintln!("clone: all done after {:.1}s", t0.elapsed().as_secs_f64());
    drop(lab.appliance);
}
