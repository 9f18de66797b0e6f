//! `cargo xtask bench tftp`: our TFTP server (in-process, on a tokio
//! runtime) against tftpd-hpa (`in.tftpd`, its own process), 64 MiB over
//! loopback, both driven by the same small blocking client below
//! (blksize + windowsize), in the same run.
//!
//! Cases: lock-step at blksize 512 and 1468 for both; ours with windowsize
//! 16 and 64 at blksize 1468; lock-step at 8192 for both as context. Each
//! case is the median of three fetches, and every fetch is checked byte for
//! byte. The JSON line compares ours at windowsize 64 with tftpd-hpa's best
//! lock-step rate at blksize 512/1468.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const SIZE: usize = 64 << 20;
const RUNS: usize = 3;

pub fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("creating the data directory")?;
    let data = dataset(SIZE);
    let file = dir.path().join("data.bin");
    std::fs::write(&file, &data).with_context(|| format!("writing {}", file.display()))?;
    // tftpd-hpa runs as root here, chroots into the directory and drops to
    // `nobody`, which must be able to read it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;

    let ours = start_ours(dir.path())?;
    let peer = Peer::start(dir.path())?;

    let cases: &[(&str, u16, u16)] = &[
        ("lock-step", 512, 1),
        ("lock-step", 1468, 1),
        ("lock-step", 8192, 1),
        ("windowsize 16", 1468, 16),
        ("windowsize 64", 1468, 64),
    ];
    let mut rows = Vec::new();
    for &(what, bs, w) in cases {
        let o = median_rate(ours, bs, w, &data)?;
        let p = if w == 1 {
            Some(median_rate(peer.addr, bs, 1, &data)?)
        } else {
            None
        };
        rows.push((what, bs, w, o, p));
    }
    drop(peer);

    eprintln!("\nTFTP, 64 MiB over loopback, MiB/s (median of {RUNS}, same client)");
    eprintln!(
        "{:<16} {:>7} {:>10} {:>10} {:>12}",
        "case", "blksize", "ours", "tftpd-hpa", "ours/peer"
    );
    for &(what, bs, _, o, p) in &rows {
        let (ps, rs) = match p {
            Some(p) => (format!("{p:.1}"), format!("{:.2}", o / p)),
            None => ("-".into(), "-".into()),
        };
        eprintln!("{what:<16} {bs:>7} {o:>10.1} {ps:>10} {rs:>12}");
    }
    let peer_best = rows
        .iter()
        .filter(|r| r.4.is_some() && r.1 <= 1468)
        .map(|r| r.4.unwrap_or(0.0))
        .fold(0.0, f64::max);
    let ours_best_lockstep = rows
        .iter()
        .filter(|r| r.2 == 1 && r.1 <= 1468)
        .map(|r| r.3)
        .fold(0.0, f64::max);
    let ws64 = rows.iter().find(|r| r.2 == 64).map(|r| r.3).unwrap_or(0.0);
    for &(_, bs, w, o, p) in &rows {
        if let (1, Some(p)) = (w, p) {
            eprintln!(
                "lock-step blksize {bs}: tftpd-hpa/ours = {:.2} (goal <= 1.2)",
                p / o
            );
        }
    }
    eprintln!(
        "best lock-step (blksize 512/1468): ours {ours_best_lockstep:.1}, tftpd-hpa {peer_best:.1}; \
         windowsize 64 / tftpd-hpa best = {:.2} (goal >= 2)",
        ws64 / peer_best
    );
    crate::bench::report("tftp", ws64, "tftpd-hpa", peer_best, "MiB/s", "higher");
    Ok(())
}

fn dataset(len: usize) -> Vec<u8> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
    v
}

fn median_rate(server: SocketAddr, bs: u16, w: u16, data: &[u8]) -> Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..RUNS {
        let t = fetch(server, "data.bin", bs, w, data)
            .with_context(|| format!("fetching from {server} blksize {bs} windowsize {w}"))?;
        rates.push(data.len() as f64 / (1 << 20) as f64 / t.as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Starts our server on a runtime thread that lives until the process ends.
fn start_ours(root: &Path) -> Result<SocketAddr> {
    let backend = Arc::new(appliance::tftp::DirBackend::new(root)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let sock = rt.block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))?;
    let addr = sock.local_addr()?;
    std::thread::spawn(move || {
        let r = rt.block_on(appliance::tftp::serve(
            sock,
            backend,
            appliance::tftp::TftpConfig::default(),
        ));
        if let Err(e) = r {
            eprintln!("our TFTP server stopped: {e}");
        }
    });
    Ok(addr)
}

/// tftpd-hpa in the foreground; killed (by its PID) when dropped.
struct Peer {
    child: Child,
    addr: SocketAddr,
}

impl Peer {
    fn start(root: &Path) -> Result<Peer> {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new("in.tftpd")
            .args(["-L", "-s"])
            .arg(root)
            .arg("-a")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting in.tftpd (Debian package tftpd-hpa)")?;
        let peer = Peer { child, addr };
        // Ready when it answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            s.send_to(b"\0\x01nope\0octet\0", addr)?;
            if s.recv_from(&mut [0u8; 600]).is_ok() {
                return Ok(peer);
            }
            if Instant::now() > deadline {
                bail!("in.tftpd does not answer on {addr}");
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fetches `name` with `blksize` and `windowsize` (1 = lock-step; the
/// option is only sent when > 1) and checks it equals `expect`.
pub fn fetch(server: SocketAddr, name: &str, bs: u16, w: u16, expect: &[u8]) -> Result<Duration> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut req = vec![0, 1];
    req.extend_from_slice(name.as_bytes());
    req.extend_from_slice(b"\0octet\0");
    req.extend_from_slice(format!("blksize\0{bs}\0").as_bytes());
    if w > 1 {
        req.extend_from_slice(format!("windowsize\0{w}\0").as_bytes());
    }
    let started = Instant::now();
    s.send_to(&req, server)?;
    let mut buf = vec![0u8; 4 + bs as usize + 16];
    let mut out = vec![0u8; expect.len() + bs as usize];
    let (n, tid) = s.recv_from(&mut buf).context("waiting for the OACK")?;
    s.connect(tid)?;
    let (mut bs, mut w) = (bs as usize, 1u64);
    if buf[..2] == [0, 6] {
        let fields: Vec<&[u8]> = buf[2..n].split(|&b| b == 0).collect();
        for kv in fields.chunks(2) {
            if let [k, v] = kv {
                let v: usize = std::str::from_utf8(v)?.parse()?;
                match std::str::from_utf8(k)?.to_ascii_lowercase().as_str() {
                    "blksize" => bs = v,
                    "windowsize" => w = v as u64,
                    _ => {}
                }
            }
        }
    } else {
        bail!("expected an OACK, got {:?}", &buf[..n.min(64)]);
    }
    let ack = |b: u64| s.send(&[0, 4, (b >> 8) as u8, b as u8]);
    ack(0)?;
    let mut next: u64 = 1; // expected block
    let mut len: usize;
    let mut in_window = 0u64;
    let mut timeouts = 0;
    loop {
        let n = match s.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                timeouts += 1;
                if timeouts > 10 {
                    bail!("timed out at block {next}");
                }
                ack(next - 1)?;
                in_window = 0;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if n < 4 || buf[1] != 3 {
            bail!("unexpected packet {:?}", &buf[..n.min(64)]);
        }
        let b = u16::from_be_bytes([buf[2], buf[3]]);
        if b == next as u16 {
            let d = &buf[4..n];
            let off = (next as usize - 1) * bs;
            if off + d.len() > out.len() {
                bail!("server sent more than {} bytes", expect.len());
            }
            out[off..off + d.len()].copy_from_slice(d);
            len = off + d.len();
            in_window += 1;
            if d.len() < bs {
                ack(next)?;
                break;
            }
            if in_window == w {
                ack(next)?;
                in_window = 0;
            }
            next += 1;
        } else if b.wrapping_sub(next as u16) < 0x8000 {
            // A gap: ask for everything after the last block we have.
            ack(next - 1)?;
            in_window = 0;
        }
        // Blocks behind `next` are retransmissions we already have.
    }
    let t = started.elapsed();
    if len != expect.len() || out[..len] != *expect {
        bail!(
            "received {len} bytes that differ from the {} expected",
            expect.len()
        );
    }
    Ok(t)
}
