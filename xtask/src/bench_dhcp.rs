//! `cargo xtask bench dhcp`: full DISCOVER/OFFER/REQUEST/ACK exchanges per
//! second from many simulated clients (distinct MACs, a /16 pool) over a
//! veth pair between two network namespaces, against our authoritative
//! server and against dnsmasq in the same setup and run. The load generator
//! is one UDP socket bound to the client-side interface with many xids in
//! flight; lost packets are retransmitted after a second. Needs root and
//! dnsmasq.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use appliance::dhcp::lab::{require_tool, KillOnDrop, Lab, NodeSpec};
use appliance::dhcp::packet::{opt, Builder, MacAddr, MessageType, Packet, BOOTREPLY};
use appliance::dhcp::{DefaultBootBackend, DhcpMode, DhcpServerConfig};

/// dnsmasq slows down as its lease list grows (about 60 DORA/s past 7,000
/// leases), so the run is sized to finish in seconds for both.
const CLIENTS: u32 = 5_000;
const WINDOW: usize = 128;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 1);

struct Result1 {
    rate: f64,
    secs: f64,
    retransmits: u64,
}

pub fn run() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the DHCP benchmark needs root (network namespaces)");
    }
    require_tool("ip", &["-V"])?;
    require_tool("dnsmasq", &["--version"])?;
    let lab = Lab::new(&[
        NodeSpec {
            name: "bsrv",
            addr: Some("10.80.0.1/16"),
            mac: None,
        },
        NodeSpec {
            name: "bcli",
            addr: None,
            mac: None,
        },
    ])?;
    let (srv, cli) = (lab.node(0), lab.node(1));
    eprintln!(
        "dhcp bench: {CLIENTS} clients, {WINDOW} in flight, veth between two network namespaces"
    );

    // Ours: a single-threaded runtime, as on one core.
    let state = tempfile::tempdir()?;
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = DhcpServerConfig::new(
        &srv.iface,
        SERVER,
        DhcpMode::Authoritative {
            pool: (Ipv4Addr::new(10, 80, 1, 0), Ipv4Addr::new(10, 80, 255, 254)),
            subnet: 16,
            router: Some(SERVER),
            dns: vec![SERVER],
            lease_secs: 43200,
            reservations: vec![],
        },
        state.path().to_path_buf(),
    );
    cfg.force = true;
    cfg.router_advertisements = false;
    let backend = Arc::new(DefaultBootBackend::new(&cfg.http_base_url));
    let server = srv.ns.spawn(move || {
        let (tx, _rx) = tokio::sync::broadcast::channel(16);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a runtime")
            .block_on(async move {
                tokio::select! {
                    r = appliance::dhcp::serve(cfg, backend, tx) => r,
                    _ = stop_rx => Ok(()),
                }
            })
    });
    std::thread::sleep(Duration::from_millis(300));
    let ours = load(cli, 0x0100_0000);
    let _ = stop.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("our server thread panicked"))???;
    let ours = ours.context("loading our server")?;
    let leases = std::fs::read(state.path().join("dhcp-leases.json"))?;
    eprintln!("  our lease file: {} KiB", leases.len() / 1024);

    // dnsmasq, same pool, same lease time, lease file on, no ping check,
    // no per-packet logging (ours logs nothing at the default level).
    let dir = tempfile::tempdir()?;
    let child = srv
        .ns
        .command("dnsmasq")
        .args([
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--user=root",
            "--no-ping",
            "--quiet-dhcp",
            "--bind-interfaces",
            "--dhcp-lease-max=100000",
            "--dhcp-range=10.80.1.0,10.80.255.254,255.255.0.0,12h",
        ])
        .arg(format!("--interface={}", srv.iface))
        .arg(format!("--dhcp-leasefile={}/leases", dir.path().display()))
        .arg(format!("--pid-file={}/pid", dir.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq")?;
    let _dnsmasq = KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(500));
    let peer = load(cli, 0x0200_0000).context("loading dnsmasq")?;

    eprintln!(
        "  {:<8} {:>10} {:>9} {:>12}",
        "server", "DORA/s", "seconds", "retransmits"
    );
    for (name, r) in [("ours", &ours), ("dnsmasq", &peer)] {
        eprintln!(
            "  {:<8} {:>10.0} {:>9.2} {:>12}",
            name, r.rate, r.secs, r.retransmits
        );
    }
    crate::bench::report("dhcp", ours.rate, "dnsmasq", peer.rate, "DORA/s", "higher");
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Discover,
    Request(Ipv4Addr, Ipv4Addr),
}

struct Client {
    mac: MacAddr,
    phase: Phase,
    sent: Instant,
}

fn packet(xid: u32, c: &Client) -> Vec<u8> {
    let kind = match c.phase {
        Phase::Discover => MessageType::Discover,
        Phase::Request(..) => MessageType::Request,
    };
    let mut b = Builder::request(xid, c.mac, kind);
    let mut cid = vec![1];
    cid.extend_from_slice(&c.mac.0);
    b.option(opt::CLIENT_ID, &cid)
        .option(opt::PARAM_LIST, &[1, 3, 6, 51]);
    if let Phase::Request(addr, server) = c.phase {
        b.option_ip(opt::REQUESTED_IP, addr)
            .option_ip(opt::SERVER_ID, server);
    }
    b.finish()
}

/// Runs `CLIENTS` DORA exchanges from the client namespace; xids (and
/// MACs) start at `base` so runs do not see each other's replies.
fn load(cli: &appliance::dhcp::lab::Node, base: u32) -> Result<Result1> {
    let iface = cli.iface.clone();
    cli.ns
        .spawn(move || load_inner(&iface, base))
        .join()
        .map_err(|_| anyhow::anyhow!("load generator panicked"))??
}

fn load_inner(iface: &str, base: u32) -> Result<Result1> {
    let sock = appliance::dhcp::server::udp_socket(iface, 68)?;
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut inflight: HashMap<u32, Client> = HashMap::new();
    let mut next = 0u32;
    let mut done = 0u32;
    let mut retransmits = 0u64;
    let mut buf = [0u8; 1500];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let mut last_scan = Instant::now();
    while done < CLIENTS {
        if Instant::now() > deadline {
            eprintln!("  only {done} of {CLIENTS} exchanges finished in 60 s; rating those");
            break;
        }
        while inflight.len() < WINDOW && next < CLIENTS {
            let xid = base + next;
            let b = xid.to_be_bytes();
            let c = Client {
                mac: MacAddr([0x02, 0x42, b[0], b[1], b[2], b[3]]),
                phase: Phase::Discover,
                sent: Instant::now(),
            };
            sock.send_to(&packet(xid, &c), to)?;
            inflight.insert(xid, c);
            next += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let Ok(p) = Packet::parse(&buf[..n]) else {
                    continue;
                };
                if p.op() != BOOTREPLY {
                    continue;
                }
                let xid = p.xid();
                let Some(c) = inflight.get_mut(&xid) else {
                    continue;
                };
                match (p.msg_type(), c.phase) {
                    (Some(MessageType::Offer), Phase::Discover) => {
                        let server = p.server_id().unwrap_or(SERVER);
                        c.phase = Phase::Request(p.yiaddr(), server);
                        c.sent = Instant::now();
                        sock.send_to(&packet(xid, c), to)?;
                    }
                    (Some(MessageType::Ack), Phase::Request(addr, _)) if p.yiaddr() == addr => {
                        inflight.remove(&xid);
                        done += 1;
                    }
                    (Some(MessageType::Nak), _) => {
                        c.phase = Phase::Discover;
                        c.sent = Instant::now();
                        sock.send_to(&packet(xid, c), to)?;
                    }
                    _ => {}
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving replies"),
        }
        if last_scan.elapsed() > Duration::from_millis(100) {
            last_scan = Instant::now();
            for (xid, c) in inflight.iter_mut() {
                if c.sent.elapsed() > Duration::from_secs(1) {
                    c.sent = Instant::now();
                    retransmits += 1;
                    sock.send_to(&packet(*xid, c), to)?;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Result1 {
        rate: f64::from(done) / secs,
        secs,
        retransmits,
    })
}
