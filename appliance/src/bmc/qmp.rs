//! QEMU Machine Protocol (QMP) over a unix socket: QEMU as a machine with a
//! power button and a one-time boot device, for the tests and the fleet.
//!
//! `power.address` is the socket path (`-qmp unix:PATH,server=on,wait=off`),
//! or `tcp:HOST:PORT` for a QMP server on the network
//! (`-qmp tcp:HOST:PORT,server=on,wait=off`, e.g. a lab hypervisor, or a
//! host's socket forwarded into the appliance's VM).
//! Every call opens its own connection, reads the greeting, sends
//! `qmp_capabilities` and then its commands; the whole call is bounded by
//! the driver's timeout, so a socket that never answers is an
//! [`PowerError::Unreachable`] naming the path. QEMU serves one QMP client
//! at a time: while another client holds the socket, ours waits for the
//! greeting and times out.
//!
//! **Power model.** QEMU is meant to run with `-no-shutdown` (a guest
//! poweroff leaves the process paused in `shutdown` state instead of
//! exiting) and optionally `-S` (start paused, i.e. off):
//! - `status`: `query-status` → `running` and `suspended` (ACPI S3, which a
//!   real BMC reports as on) are [`PowerState::On`]; everything else —
//!   `prelaunch`, `paused`, `shutdown`, `internal-error`, `guest-panicked`,
//!   `io-error`, migration states — is [`PowerState::Off`].
//! - `off` = `stop` + `system_reset` (pulling the plug: the guest gets no
//!   ACPI request, and the next `on` starts from firmware). QEMU leaves the
//!   machine in `prelaunch`.
//! - `on` = nothing when already running, else `system_reset` (which also
//!   clears `shutdown` and crash states that `cont` refuses) + `cont`.
//! - `cycle` = `stop` + `system_reset` + `cont`: a fresh boot from
//!   firmware whatever the state was.
//!
//! Every reset waits for QEMU's `RESET` event before going on, because
//! `system_reset` only queues the request.
//!
//! **Boot once.** `power.id` names the boot devices by qdev id, in their
//! normal boot order: `disk=disk0,net=nic0` (keys `net` and `disk`, values
//! `-device …,id=ID` ids or absolute QOM paths). Normally device *i* (from 1)
//! has `bootindex` *i*. `boot_once(dev)` sets that device's `bootindex` to 0
//! and the others to their normal index with `qom-set`; QEMU rebuilds the
//! firmware's `bootorder` (fw_cfg) from the bootindexes at every reset. The
//! next `on` or `cycle` resets the machine (taking the one-time order into
//! fw_cfg) and, before `cont`, sets every device back to its normal index,
//! so a later reboot uses the normal order again. A listed device with
//! `bootindex` 0 therefore means "a one-time boot is pending": give QEMU's
//! own `bootindex=` options values from 1, or none.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{BootDevice, PowerDriver, PowerError, PowerState};

/// The longest QMP message we accept (QEMU's are a few KiB at most).
const MAX_MESSAGE: u64 = 1 << 20;

/// The QMP driver for one QEMU process.
#[derive(Debug, Clone)]
pub struct Qmp {
    target: Target,
    timeout: Duration,
    /// Boot devices in normal boot order.
    devices: Vec<(BootDevice, String)>,
}

/// Parses `power.id` for QMP: `net=ID,disk=ID` in normal boot order.
pub fn parse_devices(id: &str) -> Result<Vec<(BootDevice, String)>, PowerError> {
    let mut out: Vec<(BootDevice, String)> = Vec::new();
    for part in id.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            PowerError::Config(format!(
                "power.id {part:?}: use net=ID,disk=ID (qdev ids of the boot devices)"
            ))
        })?;
        let dev = match k.trim() {
            "net" => BootDevice::Network,
            "disk" => BootDevice::Disk,
            "cd" => BootDevice::Cd,
            other => {
                return Err(PowerError::Config(format!(
                    "power.id key {other:?}: use net, disk or cd"
                )))
            }
        };
        let v = v.trim();
        if v.is_empty() || out.iter().any(|(d, _)| *d == dev) {
            return Err(PowerError::Config(format!(
                "power.id {part:?}: each of net and disk names one device, once"
            )));
        }
        out.push((dev, v.to_owned()));
    }
    Ok(out)
}

/// `query-status`'s `status` as a power state.
pub fn state_of(status: &str) -> PowerState {
    match status {
        "running" | "suspended" => PowerState::On,
        _ => PowerState::Off,
    }
}

/// The QOM path of a device named in `power.id`.
fn qom_path(id: &str) -> String {
    if id.starts_with('/') {
        id.to_owned()
    } else {
        format!("/machine/peripheral/{id}")
    }
}

impl Qmp {
    pub fn new(address: &str, id: &str, timeout: Duration) -> Result<Qmp, PowerError> {
        if address.is_empty() {
            return Err(PowerError::Config(
                "power.address is empty: give the QMP unix socket path".into(),
            ));
        }
        Ok(Qmp {
            target: Target::parse(address)?,
            timeout,
            devices: parse_devices(id)?,
        })
    }

    fn address(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp(a) => format!("tcp:{a}"),
        }
    }

    fn connect(&self) -> Result<Session, PowerError> {
        Session::open(&self.target, self.address(), self.timeout)
    }

    /// Reads a device's `bootindex` (-1 when it has none).
    pub fn bootindex(&self, dev: BootDevice) -> Result<i64, PowerError> {
        let id = self.device(dev)?;
        self.connect()?.bootindex(id)
    }

    fn device(&self, dev: BootDevice) -> Result<&str, PowerError> {
        self.devices
            .iter()
            .find(|(d, _)| *d == dev)
            .map(|(_, id)| id.as_str())
            .ok_or_else(|| {
                let key = match dev {
                    BootDevice::Network => "net",
                    BootDevice::Disk => "disk",
                    BootDevice::Cd => "cd",
                };
                PowerError::Config(format!(
                    "power.id names no {key}= device (use net=ID,disk=ID)"
                ))
            })
    }

    /// Sets the listed devices' bootindexes to `want` (same order as
    /// `self.devices`), going through -1 so no two collide on the way.
    fn set_bootindexes(&self, s: &mut Session, want: &[i64]) -> Result<(), PowerError> {
        let have: Vec<i64> = self
            .devices
            .iter()
            .map(|(_, id)| s.bootindex(id))
            .collect::<Result<_, _>>()?;
        for (i, (_, id)) in self.devices.iter().enumerate() {
            if have[i] != want[i] && have[i] >= 0 {
                s.set_bootindex(id, -1)?;
            }
        }
        for (i, (_, id)) in self.devices.iter().enumerate() {
            if have[i] != want[i] && want[i] >= 0 {
                s.set_bootindex(id, want[i])?;
            }
        }
        Ok(())
    }

    fn normal_order(&self) -> Vec<i64> {
        (1..=self.devices.len() as i64).collect()
    }

    /// Resets, undoes a pending one-time boot order once the reset has put
    /// it into the firmware's boot order, and runs.
    fn reset_and_run(&self, s: &mut Session) -> Result<(), PowerError> {
        s.reset()?;
        if !self.devices.is_empty() {
            let pending = self
                .devices
                .iter()
                .map(|(_, id)| s.bootindex(id))
                .collect::<Result<Vec<_>, _>>()?
                .contains(&0);
            if pending {
                self.set_bootindexes(s, &self.normal_order())?;
            }
        }
        s.execute("cont", None)?;
        Ok(())
    }
}

impl PowerDriver for Qmp {
    fn name(&self) -> &'static str {
        "qmp"
    }

    fn status(&self) -> Result<PowerState, PowerError> {
        self.connect()?.status().map(|s| state_of(&s))
    }

    fn on(&self) -> Result<(), PowerError> {
        let mut s = self.connect()?;
        if state_of(&s.status()?) == PowerState::On {
            return Ok(());
        }
        self.reset_and_run(&mut s)
    }

    fn off(&self) -> Result<(), PowerError> {
        let mut s = self.connect()?;
        s.execute("stop", None)?;
        s.reset()
    }

    fn cycle(&self) -> Result<(), PowerError> {
        let mut s = self.connect()?;
        s.execute("stop", None)?;
        self.reset_and_run(&mut s)
    }

    fn boot_once(&self, dev: BootDevice) -> Result<(), PowerError> {
        self.device(dev)?;
        let want: Vec<i64> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, (d, _))| if *d == dev { 0 } else { i as i64 + 1 })
            .collect();
        let mut s = self.connect()?;
        self.set_bootindexes(&mut s, &want)
    }
}

/// Where QEMU's QMP server listens.
#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (kept unresolved: resolved at each connect).
    Tcp(String),
}

impl Target {
    fn parse(address: &str) -> Result<Target, PowerError> {
        match address.strip_prefix("tcp:") {
            Some(hp) => {
                let ok = hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return Err(PowerError::Config(format!(
                        "power.address {address:?}: use tcp:HOST:PORT or a unix socket path"
                    )));
                }
                Ok(Target::Tcp(hp.to_owned()))
            }
            None => Ok(Target::Unix(PathBuf::from(address))),
        }
    }

    /// Connects within `timeout` (a listener whose backlog is full, or a
    /// host that drops packets, would block a plain connect).
    fn connect(&self, timeout: Duration) -> std::io::Result<socket2::Socket> {
        use socket2::{SockAddr, Socket, Type};
        let addr = match self {
            Target::Unix(p) => SockAddr::unix(p)?,
            Target::Tcp(hp) => {
                use std::net::ToSocketAddrs;
                let a = hp.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                })?;
                SockAddr::from(a)
            }
        };
        let s = Socket::new(addr.domain(), Type::STREAM, None)?;
        s.connect_timeout(&addr, timeout)?;
        Ok(s)
    }
}

/// One QMP connection, in command mode, with a deadline for the whole call.
struct Session {
    reader: BufReader<socket2::Socket>,
    writer: socket2::Socket,
    address: String,
    deadline: Instant,
    timeout: Duration,
    /// Events read while waiting for command answers.
    events: Vec<String>,
}

impl Session {
    fn open(target: &Target, address: String, timeout: Duration) -> Result<Self, PowerError> {
        let stream = target
            .connect(timeout)
            .map_err(|e| PowerError::Unreachable {
                address: address.clone(),
                detail: format!("connecting: {e}"),
            })?;
        let writer = stream.try_clone().map_err(|e| PowerError::Unreachable {
            address: address.clone(),
            detail: format!("cloning the socket: {e}"),
        })?;
        let mut s = Session {
            reader: BufReader::new(stream),
            writer,
            address,
            deadline: Instant::now() + timeout,
            timeout,
            events: Vec::new(),
        };
        let greeting = s.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(s.protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        s.execute("qmp_capabilities", None)?;
        Ok(s)
    }

    fn protocol(&self, detail: String) -> PowerError {
        PowerError::Protocol {
            address: self.address.clone(),
            detail,
        }
    }

    fn unreachable(&self, detail: String) -> PowerError {
        PowerError::Unreachable {
            address: self.address.clone(),
            detail,
        }
    }

    fn remaining(&self) -> Result<Duration, PowerError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.unreachable(format!(
                "no answer within {:.1}s",
                self.timeout.as_secs_f64()
            )));
        }
        Ok(left)
    }

    fn read_message(&mut self) -> Result<Value, PowerError> {
        let mut line = Vec::new();
        loop {
            let left = self.remaining()?;
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| self.unreachable(format!("setting a read timeout: {e}")))?;
            let budget = MAX_MESSAGE - line.len() as u64;
            match (&mut self.reader).take(budget).read_until(b'\n', &mut line) {
                Ok(0) if line.is_empty() => {
                    return Err(self.unreachable("QEMU closed the connection".into()))
                }
                Ok(_) if line.ends_with(b"\n") || line.len() as u64 >= MAX_MESSAGE => break,
                Ok(0) => return Err(self.unreachable("QEMU closed the connection".into())),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.unreachable(format!(
                        "no answer within {:.1}s",
                        self.timeout.as_secs_f64()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.unreachable(format!("reading: {e}"))),
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            self.protocol(format!(
                "not a QMP message ({e}): {:?}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ))
        })
    }

    /// Runs one command; returns its `return` value.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, PowerError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        let left = self.remaining()?;
        self.writer
            .set_write_timeout(Some(left))
            .map_err(|e| self.unreachable(format!("setting a write timeout: {e}")))?;
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| self.unreachable(format!("sending {command}: {e}")))?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(self.protocol(format!(
                    "{command}: {} ({})",
                    e["desc"].as_str().unwrap_or("error"),
                    e["class"].as_str().unwrap_or("?")
                )));
            }
            if let Some(ev) = m.get("event").and_then(Value::as_str) {
                self.events.push(ev.to_owned());
            }
        }
    }

    fn wait_event(&mut self, name: &str) -> Result<(), PowerError> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e == name) {
                self.events.drain(..=i);
                return Ok(());
            }
            let m = self.read_message()?;
            if let Some(ev) = m.get("event").and_then(Value::as_str) {
                self.events.push(ev.to_owned());
            }
        }
    }

    fn status(&mut self) -> Result<String, PowerError> {
        let r = self.execute("query-status", None)?;
        r["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.protocol(format!("query-status answered {r}")))
    }

    /// `system_reset`, then waits until QEMU has done it.
    fn reset(&mut self) -> Result<(), PowerError> {
        self.events.clear();
        self.execute("system_reset", None)?;
        self.wait_event("RESET")
    }

    fn bootindex(&mut self, id: &str) -> Result<i64, PowerError> {
        let r = self.execute(
            "qom-get",
            Some(json!({"path": qom_path(id), "property": "bootindex"})),
        )?;
        r.as_i64()
            .ok_or_else(|| self.protocol(format!("bootindex of {id} is {r}")))
    }

    fn set_bootindex(&mut self, id: &str, index: i64) -> Result<(), PowerError> {
        self.execute(
            "qom-set",
            Some(json!({"path": qom_path(id), "property": "bootindex", "value": index})),
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const DEFAULT: Duration = Duration::from_secs(1);

    #[test]
    fn device_list_syntax() {
        assert_eq!(
            parse_devices("disk=disk0, net=nic0").unwrap(),
            vec![
                (BootDevice::Disk, "disk0".to_owned()),
                (BootDevice::Network, "nic0".to_owned())
            ]
        );
        assert!(parse_devices("").unwrap().is_empty());
        assert_eq!(
            parse_devices("cd=cd0").unwrap(),
            vec![(BootDevice::Cd, "cd0".to_owned())]
        );
        for bad in ["nic0", "floppy=x", "net=", "net=a,net=b"] {
            assert!(
                matches!(parse_devices(bad), Err(PowerError::Config(_))),
                "{bad}"
            );
        }
        assert_eq!(qom_path("nic0"), "/machine/peripheral/nic0");
        assert_eq!(qom_path("/machine/unattached/x"), "/machine/unattached/x");
    }

    #[test]
    fn run_states() {
        assert_eq!(state_of("running"), PowerState::On);
        assert_eq!(state_of("suspended"), PowerState::On);
        for s in [
            "prelaunch",
            "paused",
            "shutdown",
            "internal-error",
            "inmigrate",
        ] {
            assert_eq!(state_of(s), PowerState::Off, "{s}");
        }
    }

    #[test]
    fn silent_socket_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // Listening, accepting into the backlog, never answering.
        let _listener = UnixListener::bind(&path).unwrap();
        let q = Qmp::new(path.to_str().unwrap(), "", Duration::from_millis(300)).unwrap();
        let t = Instant::now();
        let e = q.status().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        match &e {
            PowerError::Unreachable { address, detail } => {
                assert_eq!(address, path.to_str().unwrap());
                assert!(detail.contains("no answer"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("qmp.sock"), "{e}");
    }

    #[test]
    fn tcp_addresses() {
        for bad in ["tcp:", "tcp:host", "tcp::4444", "tcp:h:0", "tcp:h:x"] {
            assert!(
                matches!(Qmp::new(bad, "", DEFAULT), Err(PowerError::Config(_))),
                "{bad}"
            );
        }
        // Listening, never answering: a timeout naming the address.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", l.local_addr().unwrap());
        let q = Qmp::new(&addr, "", Duration::from_millis(300)).unwrap();
        let e = q.status().unwrap_err();
        assert!(
            matches!(&e, PowerError::Unreachable { address, detail }
                if *address == addr && detail.contains("no answer")),
            "{e}"
        );
        // Nobody listening: refused at connect.
        drop(l);
        let e = q.status().unwrap_err();
        assert!(
            matches!(&e, PowerError::Unreachable { detail, .. } if detail.contains("connecting")),
            "{e}"
        );
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let q = Qmp::new(path.to_str().unwrap(), "", Duration::from_secs(1)).unwrap();
        assert!(matches!(q.on(), Err(PowerError::Unreachable { .. })));
        // A socket file nobody listens on: connection refused.
        drop(UnixListener::bind(&path).unwrap());
        let e = q.status().unwrap_err();
        assert!(
            matches!(&e, PowerError::Unreachable { detail, .. } if detail.contains("connecting")),
            "{e}"
        );
    }

    /// A scripted QMP peer: answers each command from `answers` in order.
    fn fake_qemu(
        path: &std::path::Path,
        answers: Vec<&'static str>,
    ) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut got = Vec::new();
            let mut answers = answers.into_iter();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                got.push(v["execute"].as_str().unwrap().to_owned());
                line.clear();
                let a = answers.next().unwrap_or("{\"return\": {}}");
                w.write_all(a.as_bytes()).unwrap();
                w.write_all(b"\r\n").unwrap();
            }
            got
        })
    }

    #[test]
    fn scripted_status_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let peer = fake_qemu(
            &path,
            vec![
                "{\"return\": {}}",
                "{\"event\": \"STOP\", \"timestamp\": {}}\r\n{\"return\": {\"status\": \"paused\", \"running\": false}}",
            ],
        );
        let q = Qmp::new(path.to_str().unwrap(), "", Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), PowerState::Off);
        assert_eq!(peer.join().unwrap(), ["qmp_capabilities", "query-status"]);

        std::fs::remove_file(&path).unwrap();
        let peer = fake_qemu(
            &path,
            vec![
                "{\"return\": {}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}",
            ],
        );
        let e = q.off().unwrap_err();
        assert!(
            matches!(&e, PowerError::Protocol { detail, .. } if detail.contains("stop: nope")),
            "{e}"
        );
        peer.join().unwrap();
    }
}
