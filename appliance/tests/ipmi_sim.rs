//! Our IPMI v2.0 (RMCP+) driver against a real BMC: OpenIPMI's `ipmi_sim`
//! (Debian `openipmi`) on a free 127.0.0.1 port, configured from a temporary
//! directory. Its chassis control script keeps the simulated power state
//! and boot device in files there and logs every call, so the tests see
//! what the BMC was asked to do; stock `ipmitool -I lanplus` (Debian
//! `ipmitool`) checks the peer setup and reads the boot flags back. A
//! missing `ipmi_sim` or `ipmitool` fails the tests (see
//! `xtask/debian-packages.txt`).

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance::bmc::ipmi::{CipherSuite, Ipmi};
use appliance::bmc::{driver_for, BootDevice, PowerDriver, PowerError, PowerState};
use appliance::inventory::model::Power;

const USER: &str = "admin";
const PASSWORD: &str = "s3cret-pw";

/// Path of a tool, or a failing test saying which package to install.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: the IPMI tests need Debian packages openipmi \
                 (ipmi_sim) and ipmitool (see xtask/debian-packages.txt)"
            )
        })
}

/// A UDP port on 127.0.0.1 nobody uses right now.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One running `ipmi_sim`, killed (by its PID) on drop.
struct Sim {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

/// The chassis control script `ipmi_sim` runs as `chassis.sh 0x20 get
/// power boot …` (prints `power:1` …) and `chassis.sh 0x20 set power 1 …`.
const CHASSIS_SCRIPT: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls.log"
shift
op=$1
shift
case $op in
get)
  for p in "$@"; do
    case $p in
      power) v=$(cat "$dir/power" 2>/dev/null || echo 0) ;;
      boot) v=$(cat "$dir/boot" 2>/dev/null || echo default) ;;
      *) v=0 ;;
    esac
    echo "$p:$v"
  done ;;
set)
  while [ $# -ge 2 ]; do
    case $1 in
      power) echo "$2" > "$dir/power" ;;
      boot) echo "$2" > "$dir/boot" ;;
    esac
    shift 2
  done ;;
*) exit 1 ;;
esac
"#;

impl Sim {
    fn start() -> Sim {
        let ipmi_sim = tool("ipmi_sim");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let script = d.join("chassis.sh");
        std::fs::write(&script, CHASSIS_SCRIPT).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            d.join("lan.conf"),
            format!(
                r#"name "ipmitest"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{script} 0x20"
  user 2 true "{USER}" "{PASSWORD}" admin 10 md5
"#,
                script = script.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("sim.emu"),
            "mc_setbmc 0x20\n\
             mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n\
             mc_enable 0x20\n",
        )
        .unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        let child = Command::new(ipmi_sim)
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("sim.log")).unwrap())
            .stderr(std::fs::File::create(d.join("sim.err")).unwrap())
            .spawn()
            .unwrap();
        let mut sim = Sim { dir, port, child };
        sim.wait_ready();
        sim
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn driver(&self, user: &str, password: &str, timeout: Duration) -> Box<dyn PowerDriver> {
        let power = Power {
            kind: "ipmi".into(),
            address: self.address(),
            user: user.into(),
            password: password.into(),
            id: String::new(),
        };
        driver_for(&power, timeout)
            .unwrap()
            .expect("an ipmi driver")
    }

    fn power(&self) -> Power {
        Power {
            kind: "ipmi".into(),
            address: self.address(),
            user: USER.into(),
            password: PASSWORD.into(),
            id: String::new(),
        }
    }

    fn admin(&self) -> Box<dyn PowerDriver> {
        self.driver(USER, PASSWORD, Duration::from_secs(5))
    }

    /// Until the simulator answers a session (it binds its port after
    /// reading its configuration).
    fn wait_ready(&mut self) {
        let d = self.driver(USER, PASSWORD, Duration::from_millis(500));
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "ipmi_sim exited with {status}: {}",
                    std::fs::read_to_string(self.path("sim.err")).unwrap_or_default()
                );
            }
            match d.status() {
                Ok(_) => return,
                Err(e) if Instant::now() > until => panic!("ipmi_sim never answered: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn calls(&self) -> Vec<String> {
        self.read("calls.log").lines().map(str::to_string).collect()
    }

    /// Stock `ipmitool -I lanplus` against the simulator.
    fn ipmitool(&self, args: &[&str]) -> String {
        let out = Command::new(tool("ipmitool"))
            .args(["-I", "lanplus", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-P", PASSWORD, "-C", "3"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ipmitool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_state(d: &dyn PowerDriver, want: PowerState, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let got = d.status().unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "power stayed {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn power_control_and_boot_device_against_ipmi_sim() {
    let sim = Sim::start();
    // The peer is set up right: stock ipmitool gets a session too.
    assert!(
        sim.ipmitool(&["chassis", "power", "status"])
            .contains("Chassis Power is off"),
        "ipmitool sees the simulated chassis off"
    );

    let d = sim.admin();
    assert_eq!(d.name(), "ipmi");
    assert_eq!(d.status().unwrap(), PowerState::Off);

    d.on().unwrap();
    assert_eq!(sim.read("power"), "1");
    assert_eq!(d.status().unwrap(), PowerState::On);

    d.off().unwrap();
    assert_eq!(sim.read("power"), "0");
    assert_eq!(d.status().unwrap(), PowerState::Off);

    // Cycle while off is a plain power up.
    let before = sim.calls().len();
    d.cycle().unwrap();
    assert_eq!(sim.read("power"), "1");
    let new: Vec<String> = sim.calls()[before..].to_vec();
    assert!(
        !new.iter().any(|c| c.ends_with("set power 0")),
        "cycle from off powered down: {new:?}"
    );
    assert_eq!(d.status().unwrap(), PowerState::On);

    // Cycle while on: the BMC powers down, then up again.
    let before = sim.calls().len();
    d.cycle().unwrap();
    wait_for_state(d.as_ref(), PowerState::On, Duration::from_secs(10));
    let new: Vec<String> = sim.calls()[before..].to_vec();
    let down = new.iter().position(|c| c.ends_with("set power 0"));
    let up = new.iter().rposition(|c| c.ends_with("set power 1"));
    assert!(
        matches!((down, up), (Some(a), Some(b)) if a < b),
        "cycle did not go off then on: {new:?}"
    );

    // One-time boot device, read back by ipmitool and the chassis script.
    d.boot_once(BootDevice::Network).unwrap();
    assert_eq!(sim.read("boot"), "pxe");
    let flags = sim.ipmitool(&["chassis", "bootparam", "get", "5"]);
    assert!(flags.contains("Force PXE"), "{flags}");
    assert!(flags.contains("Options apply to only next boot"), "{flags}");
    // (ipmi_sim keeps only the device selector of the flags it is sent —
    // it answers data byte 1 as 0 — so the EFI boot-type bit we set is
    // checked by the unit tests, not here.)

    d.boot_once(BootDevice::Disk).unwrap();
    let flags = sim.ipmitool(&["chassis", "bootparam", "get", "5"]);
    assert!(
        flags.contains("Force Boot from default Hard-Drive"),
        "{flags}"
    );

    // Sessions are closed: many more calls than the user's 10 sessions.
    for _ in 0..12 {
        d.status().unwrap();
    }
}

#[test]
fn wrong_password_is_an_auth_error() {
    let sim = Sim::start();
    let started = Instant::now();
    let err = sim
        .driver(USER, "not-the-password", Duration::from_secs(5))
        .status()
        .unwrap_err();
    assert!(matches!(err, PowerError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&sim.address()), "{msg}");
    assert!(msg.contains("wrong password"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    let err = sim
        .driver("nobody", PASSWORD, Duration::from_secs(5))
        .status()
        .unwrap_err();
    assert!(matches!(err, PowerError::Auth { .. }), "{err:?}");
}

#[test]
fn cipher_suite_17_falls_back_to_3() {
    // ipmi_sim refuses suite 17's algorithms at Open Session (status 04h).
    let sim = Sim::start();
    let d = Ipmi::new(&sim.power(), Duration::from_secs(5))
        .unwrap()
        .with_cipher_suites(&[CipherSuite::Suite17, CipherSuite::Suite3]);
    assert_eq!(d.status().unwrap(), PowerState::Off);

    let only17 = Ipmi::new(&sim.power(), Duration::from_secs(5))
        .unwrap()
        .with_cipher_suites(&[CipherSuite::Suite17]);
    let err = only17.status().unwrap_err();
    assert!(matches!(err, PowerError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("cipher suite 17"), "{err}");
}

#[test]
fn silent_bmc_is_unreachable_quickly() {
    // A bound socket that never answers (no ICMP either).
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let power = Power {
        kind: "ipmi".into(),
        address: address.clone(),
        user: USER.into(),
        password: PASSWORD.into(),
        id: String::new(),
    };
    let d = driver_for(&power, Duration::from_millis(800))
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let err = d.status().unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PowerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&address), "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // It was asked several times.
    let mut buf = [0u8; 512];
    silent.set_nonblocking(true).unwrap();
    let mut n = 0;
    while silent.recv(&mut buf).is_ok() {
        n += 1;
    }
    assert!(n >= 2, "{n} tries");

    // Nothing listening: refused at once.
    let closed = format!("127.0.0.1:{}", free_port());
    let power = Power {
        address: closed.clone(),
        ..power
    };
    let started = Instant::now();
    let err = driver_for(&power, Duration::from_secs(5))
        .unwrap()
        .unwrap()
        .on()
        .unwrap_err();
    assert!(matches!(err, PowerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&closed), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4));
}
