//! Boot a disk image in QEMU (q35, OVMF, virtio disk and NIC on user
//! networking with `restrict=on` and a loopback-only port forward).
//!
//! The accelerator is TCG unless `APPLIANCE_QEMU_ACCEL` says otherwise: on
//! these machines `/dev/kvm` exists but is a paravirtual KVM about 100×
//! slower than TCG for an unmodified kernel, so KVM is only used when asked
//! for (`APPLIANCE_QEMU_ACCEL=kvm`) or when a probe boot proves it works
//! (`APPLIANCE_QEMU_ACCEL=auto`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Firmware to boot with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF (UEFI), the default.
    Ovmf,
    /// SeaBIOS, QEMU's default BIOS (PXE through the NIC's iPXE option ROM).
    SeaBios,
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub disk: PathBuf,
    /// Keep the disk unchanged (writes go to a temporary overlay).
    pub snapshot: bool,
    pub memory_mb: u32,
    /// Loopback port forwarded to the guest's port 80.
    pub api_port: u16,
    /// Where the VM's files (OVMF variables, serial log) go.
    pub dir: PathBuf,
    /// Extra QEMU arguments.
    pub extra: Vec<String>,
    /// A `virtio-rng-pci` device: the guest's random pool is ready at once.
    /// Without one (and without RDRAND, as under TCG) a first boot has an
    /// uninitialized pool for minutes, and must still bring up the network
    /// and the API at once.
    pub rng: bool,
    /// vCPUs.
    pub cpus: u32,
    /// User-network forwards from the guest to the host:
    /// (`10.0.2.100:8080`, host loopback port). They work with
    /// `restrict=on`: the guest reaches exactly these, nothing else.
    pub guestfwd: Vec<(String, u16)>,
}

impl VmConfig {
    /// A VM booting `disk` under OVMF with the API on `api_port`.
    pub fn new(disk: impl Into<PathBuf>, api_port: u16, dir: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            disk: disk.into(),
            snapshot: true,
            memory_mb: 1024,
            api_port,
            dir: dir.into(),
            extra: vec![],
            rng: true,
            cpus: 2,
            guestfwd: vec![],
        }
    }

    /// Add a virtio NIC on a point-to-point "wire" made of a unix socket
    /// (QEMU's `-netdev stream`); the `listen` side must start first.
    pub fn wire(
        mut self,
        id: &str,
        socket: &Path,
        listen: bool,
        mac: &str,
        bootindex: Option<u32>,
    ) -> VmConfig {
        self.extra.push("-netdev".into());
        self.extra.push(format!(
            "stream,id={id},server={},addr.type=unix,addr.path={}",
            if listen { "on" } else { "off" },
            socket.display()
        ));
        self.extra.push("-device".into());
        let boot = bootindex
            .map(|b| format!(",bootindex={b}"))
            .unwrap_or_default();
        self.extra
            .push(format!("virtio-net-pci,netdev={id},mac={mac}{boot}"));
        self
    }
}

impl VmConfig {
    /// Attach `file` as an extra raw virtio disk, read-only when asked.
    /// It sits in PCI slot 0x10, after the auto-placed boot disk, so the
    /// guest probes it second and names it `vdb` (one such drive per VM).
    pub fn virtio_drive(mut self, id: &str, file: &Path, readonly: bool) -> VmConfig {
        self.extra.push("-drive".into());
        self.extra.push(format!(
            "if=none,id={id},format=raw,file={},readonly={}",
            file.display(),
            if readonly { "on" } else { "off" }
        ));
        self.extra.push("-device".into());
        self.extra
            .push(format!("virtio-blk-pci,drive={id},addr=0x10"));
        self
    }

    /// Attach `file` as a removable USB stick on an xHCI controller (the
    /// guest sees a SCSI disk, `sda`).
    pub fn usb_stick(mut self, file: &Path) -> VmConfig {
        self.extra.extend([
            "-device".into(),
            "qemu-xhci,id=xhci".into(),
            "-drive".into(),
            format!("if=none,id=stick,format=raw,file={}", file.display()),
            "-device".into(),
            "usb-storage,bus=xhci.0,drive=stick,removable=on".into(),
        ]);
        self
    }
}

/// `qemu-system-x86_64` with what every VM here shares: q35, the
/// accelerator, 2 vCPUs, `memory_mb`, no display, the serial console in
/// `<dir>/serial.log`, and the firmware (OVMF gets its own copy of the
/// variable store).
pub fn base_command(
    firmware: Firmware,
    dir: &Path,
    memory_mb: u32,
) -> std::io::Result<(Command, PathBuf)> {
    base_command_cpus(firmware, dir, memory_mb, 2)
}

/// [`base_command`] with `cpus` vCPUs.
pub fn base_command_cpus(
    firmware: Firmware,
    dir: &Path,
    memory_mb: u32,
    cpus: u32,
) -> std::io::Result<(Command, PathBuf)> {
    let serial_log = dir.join("serial.log");
    let _ = fs::remove_file(&serial_log);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        &accel(),
        "-smp",
        &cpus.to_string(),
        "-m",
        &memory_mb.to_string(),
    ])
    .args(["-display", "none", "-no-reboot", "-monitor", "none"])
    .arg("-serial")
    .arg(format!("file:{}", serial_log.display()));
    if firmware == Firmware::Ovmf {
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{f} is missing: install the ovmf package (xtask/debian-packages.txt)"),
                ));
            }
        }
        let vars = dir.join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars)?;
        cmd.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    Ok((cmd, serial_log))
}

/// A machine with a "BMC": like [`base_command`] (OVMF), but a guest
/// reboot reboots instead of exiting QEMU, a guest poweroff pauses it
/// (`-no-shutdown`), and QEMU's machine protocol listens on `qmp` (a unix
/// socket) for the appliance's QMP power driver.
pub fn bmc_command(dir: &Path, memory_mb: u32, qmp: &Path) -> std::io::Result<(Command, PathBuf)> {
    let (base, serial_log) = base_command(Firmware::Ovmf, dir, memory_mb)?;
    let mut cmd = Command::new(base.get_program());
    cmd.args(base.get_args().filter(|a| *a != "-no-reboot"));
    let _ = fs::remove_file(qmp);
    cmd.arg("-no-shutdown")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    Ok((cmd, serial_log))
}

/// A blank machine that boots from the network: no uplink, one NIC on
/// `socket`, a blank (sparse) disk of `disk_bytes`.
pub fn boot_blank(
    firmware: Firmware,
    socket: &Path,
    mac: &str,
    disk_bytes: u64,
    dir: &Path,
) -> std::io::Result<Vm> {
    fs::create_dir_all(dir)?;
    let disk = dir.join("blank.img");
    fs::File::create(&disk)?.set_len(disk_bytes)?;
    boot_machine(firmware, socket, mac, &disk, dir, 1024, 2, false)
}

/// A machine with one NIC on `socket` and `disk` (kept as it is: booting
/// it again boots what is on it). Boot order: the network first, or with
/// `disk_first` the disk first (a blank or wiped disk falls through to
/// the network), as servers are usually set up. Its serial log is
/// `<dir>/serial.log` (a second boot overwrites it).
#[allow(clippy::too_many_arguments)]
pub fn boot_machine(
    firmware: Firmware,
    socket: &Path,
    mac: &str,
    disk: &Path,
    dir: &Path,
    memory_mb: u32,
    cpus: u32,
    disk_first: bool,
) -> std::io::Result<Vm> {
    let (disk_index, net_index) = if disk_first { (1, 2) } else { (2, 1) };
    let (mut cmd, serial_log) = base_command_cpus(firmware, dir, memory_mb, cpus)?;
    let rom = if firmware == Firmware::Ovmf {
        ",romfile="
    } else {
        ""
    };
    if firmware == Firmware::SeaBios {
        cmd.args(["-boot", "n"]);
    }
    cmd.arg("-drive")
        .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
        .args([
            "-device",
            &format!("virtio-blk-pci,drive=d0,bootindex={disk_index}"),
        ])
        .arg("-netdev")
        .arg(format!(
            "stream,id=p,server=off,addr.type=unix,addr.path={}",
            socket.display()
        ))
        // Under OVMF, no option ROM: OVMF's own virtio-net driver and PXE
        // client do the first stage (so iPXE is chainloaded over TFTP, as
        // on real UEFI machines); under SeaBIOS, QEMU's iPXE ROM does PXE.
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=p,mac={mac},bootindex={net_index}{rom}"),
        ])
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn()?;
    Ok(Vm {
        child,
        serial_log,
        api_port: 0,
        started: Instant::now(),
    })
}

/// A running VM, killed on drop if still running.
pub struct Vm {
    child: Child,
    pub serial_log: PathBuf,
    pub api_port: u16,
    pub started: Instant,
}

/// The accelerator to use: `tcg` by default, `kvm` when asked for.
pub fn accel() -> String {
    match std::env::var("APPLIANCE_QEMU_ACCEL").as_deref() {
        Ok("kvm") => "kvm".into(),
        Ok("auto") if Path::new("/dev/kvm").exists() => "kvm:tcg".into(),
        _ => "tcg".into(),
    }
}

impl Vm {
    pub fn boot(cfg: &VmConfig) -> std::io::Result<Vm> {
        fs::create_dir_all(&cfg.dir)?;
        let (mut cmd, serial_log) =
            base_command_cpus(Firmware::Ovmf, &cfg.dir, cfg.memory_mb, cfg.cpus)?;
        cmd.arg("-drive")
            .arg(format!(
                "if=virtio,format=raw,file={},snapshot={}",
                cfg.disk.display(),
                if cfg.snapshot { "on" } else { "off" }
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=up,restrict=on,hostfwd=tcp:127.0.0.1:{}-:80{}",
                cfg.api_port,
                cfg.guestfwd
                    .iter()
                    // `cmd:` opens one connection per guest connection
                    // (a `tcp:` chardev would be one connection, made
                    // when QEMU starts).
                    .map(|(guest, port)| format!(
                        ",guestfwd=tcp:{guest}-cmd:socat - TCP:127.0.0.1:{port}"
                    ))
                    .collect::<String>()
            ))
            .args(["-device", "virtio-net-pci,netdev=up"]);
        if cfg.rng {
            cmd.args(["-device", "virtio-rng-pci"]);
        }
        cmd.args(&cfg.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("starting qemu-system-x86_64 ({e}); install qemu-system-x86"),
            )
        })?;
        Ok(Vm {
            child,
            serial_log,
            api_port: cfg.api_port,
            started: Instant::now(),
        })
    }

    /// Starts a VM from a prepared QEMU command (see [`base_command`]).
    pub fn spawn(mut cmd: Command, serial_log: PathBuf, api_port: u16) -> std::io::Result<Vm> {
        let child = cmd.spawn()?;
        Ok(Vm {
            child,
            serial_log,
            api_port,
            started: Instant::now(),
        })
    }

    /// The exit status once QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The serial console output so far.
    pub fn serial(&self) -> String {
        fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Poll `GET path` until it answers 200 or `timeout` passes.
    pub fn wait_http(
        &mut self,
        path: &str,
        timeout: Duration,
    ) -> Result<crate::http::Response, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "QEMU exited ({st}) before {path} answered; serial log:\n{}",
                    self.serial()
                ));
            }
            if let Ok(r) = crate::http::get_within(self.api_port, path, Duration::from_millis(500))
            {
                if r.status == 200 {
                    return Ok(r);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{path} did not answer within {timeout:?}; serial log:\n{}",
                    self.serial()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The API token a fresh appliance prints once on its console.
    pub fn first_token(&self) -> Option<String> {
        let serial = self.serial();
        let line = serial
            .lines()
            .find(|l| l.contains("first API token (shown once"))?;
        line.split_whitespace().last().map(str::to_string)
    }

    /// Wait for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }

    /// Wait until QEMU exits (used by `cargo xtask qemu`).
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
