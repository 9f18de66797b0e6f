//! DHCP against real peers, each test in network namespaces it makes and
//! deletes (`appliance::dhcp::lab`): our client against busybox `udhcpd`
//! and against our server; busybox `udhcpc` against our server (lease,
//! boot options, a second MAC, a restart); our proxyDHCP next to
//! `dnsmasq`; the rogue-server probe. Needs root, `ip`, `busybox` and
//! `dnsmasq`; a missing one fails the test. No packet leaves the
//! namespaces.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::dhcp::lab::{require_tool, KillOnDrop, Lab, Netns, NodeSpec};
use appliance::dhcp::packet::{opt, Builder, MacAddr, MessageType, Packet, BOOTREPLY};
use appliance::dhcp::{
    serve, DefaultBootBackend, DhcpEvent, DhcpEventKind, DhcpMode, DhcpServerConfig,
};

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (network namespaces); CI runs it as root"
    );
}

fn tools(list: &[(&str, &[&str])]) {
    require_root();
    for (p, a) in list {
        require_tool(p, a).unwrap();
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("appliance=debug")
        .with_test_writer()
        .try_init();
}

/// Our server on a thread inside `ns`; stopped (leases saved) on drop.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
    events: tokio::sync::broadcast::Receiver<DhcpEvent>,
}

impl Server {
    fn start(ns: &Netns, cfg: DhcpServerConfig) -> Server {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tx, events) = tokio::sync::broadcast::channel(1024);
        let backend = Arc::new(DefaultBootBackend::new(&cfg.http_base_url));
        let join = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::select! {
                    r = serve(cfg, backend, tx) => r,
                    _ = stop_rx => Ok(()),
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        Server {
            stop: Some(stop),
            join: Some(join),
            events,
        }
    }

    /// Stops the server and returns how `serve` ended.
    fn finish(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join.take().unwrap().join().unwrap()?
    }

    fn drain_events(&mut self) -> Vec<DhcpEvent> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn auth_cfg(iface: &str, state: &Path, net: u8) -> DhcpServerConfig {
    let ip = |n| Ipv4Addr::new(10, net, 0, n);
    let mut cfg = DhcpServerConfig::new(
        iface,
        ip(1),
        DhcpMode::Authoritative {
            pool: (ip(100), ip(150)),
            subnet: 24,
            router: Some(ip(1)),
            dns: vec![ip(53)],
            lease_secs: 3600,
            reservations: vec![],
        },
        state.to_path_buf(),
    );
    cfg.force = true;
    cfg.router_advertisements = false;
    cfg
}

/// Runs busybox udhcpc once in `ns` and returns the variables its script
/// saw on `bound`.
fn udhcpc(
    ns: &Netns,
    iface: &str,
    dir: &Path,
    vendor: &str,
) -> std::collections::HashMap<String, String> {
    let script = dir.join("udhcpc.sh");
    let out = dir.join("udhcpc.env");
    let _ = std::fs::remove_file(&out);
    std::fs::write(
        &script,
        "#!/bin/sh\nif [ \"$1\" = bound ]; then env > \"$UDHCPC_OUT\"; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = ns
        .command("busybox")
        .args([
            "udhcpc", "-i", iface, "-n", "-q", "-f", "-t", "5", "-T", "1", "-s",
        ])
        .arg(&script)
        .args(["-O", "bootfile", "-V", vendor])
        .env("UDHCPC_OUT", &out)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&out).unwrap_or_else(|_| {
        panic!(
            "udhcpc got no lease: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn client_gets_a_lease_from_busybox_udhcpd() {
    tools(&[("ip", &["-V"]), ("busybox", &["--help"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "udhcpd",
            addr: Some("10.99.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "cli",
            addr: None,
            mac: Some("02:00:00:00:00:01"),
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("udhcpd.conf");
    std::fs::write(dir.path().join("leases"), b"").unwrap();
    std::fs::write(
        &conf,
        format!(
            "start 10.99.0.100\nend 10.99.0.110\ninterface {1}\n\
             lease_file {0}/leases\npidfile {0}/pid\n\
             option subnet 255.255.255.0\noption router 10.99.0.1\n\
             option dns 10.99.0.53 10.99.0.54\noption lease 3600\n",
            dir.path().display(),
            lab.node(0).iface
        ),
    )
    .unwrap();
    let _server = KillOnDrop(
        lab.node(0)
            .ns
            .command("busybox")
            .args(["udhcpd", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let iface = lab.node(1).iface.clone();
    let lease = lab
        .node(1)
        .ns
        .spawn(move || {
            appliance::dhcp::client::acquire(&iface, [2, 0, 0, 0, 0, 1], Duration::from_secs(20))
        })
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        (100..=110).contains(&lease.addr.octets()[3]) && lease.addr.octets()[..3] == [10, 99, 0],
        "{lease:?}"
    );
    assert_eq!(lease.prefix, 24);
    assert_eq!(lease.router, Some(Ipv4Addr::new(10, 99, 0, 1)));
    assert_eq!(
        lease.dns,
        vec![Ipv4Addr::new(10, 99, 0, 53), Ipv4Addr::new(10, 99, 0, 54)]
    );
    assert_eq!(lease.lease_secs, Some(3600));
    assert_eq!(lease.server_id, Ipv4Addr::new(10, 99, 0, 1));
}

#[test]
fn client_gets_a_lease_from_our_server() {
    tools(&[("ip", &["-V"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "srv",
            addr: Some("10.97.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "cli",
            addr: None,
            mac: Some("02:00:00:00:00:02"),
        },
    ])
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &lab.node(0).ns,
        auth_cfg(&lab.node(0).iface, state.path(), 97),
    );
    let iface = lab.node(1).iface.clone();
    let lease = lab
        .node(1)
        .ns
        .spawn(move || {
            appliance::dhcp::client::acquire(&iface, [2, 0, 0, 0, 0, 2], Duration::from_secs(20))
        })
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(lease.addr, Ipv4Addr::new(10, 97, 0, 100));
    assert_eq!(lease.prefix, 24);
    assert_eq!(lease.router, Some(Ipv4Addr::new(10, 97, 0, 1)));
    assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 97, 0, 53)]);
    assert_eq!(lease.server_id, Ipv4Addr::new(10, 97, 0, 1));
    let kinds: Vec<_> = server.drain_events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DhcpEventKind::Discover,
            DhcpEventKind::Offer,
            DhcpEventKind::Request,
            DhcpEventKind::Ack
        ]
    );
    server.finish().unwrap();
}

#[test]
fn udhcpc_gets_lease_and_boot_options_and_keeps_it_across_a_restart() {
    tools(&[("ip", &["-V"]), ("busybox", &["--help"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "srv",
            addr: Some("10.96.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "cli",
            addr: None,
            mac: Some("02:00:00:00:00:0a"),
        },
    ])
    .unwrap();
    let (srv, cli) = (lab.node(0), lab.node(1));
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&srv.ns, auth_cfg(&srv.iface, state.path(), 96));
    let pxe = "PXEClient:Arch:00000:UNDI:002001";
    let env = udhcpc(&cli.ns, &cli.iface, dir.path(), pxe);
    let first = env["ip"].clone();
    assert_eq!(first, "10.96.0.100");
    assert_eq!(env["siaddr"], "10.96.0.1");
    assert_eq!(env["boot_file"], "undionly.kpxe");
    assert_eq!(env["bootfile"], "undionly.kpxe");
    assert_eq!(env["serverid"], "10.96.0.1");
    assert_eq!(env["subnet"], "255.255.255.0");
    assert_eq!(env["router"], "10.96.0.1");
    // A second client (another MAC) gets another address; a UEFI one gets
    // the UEFI loader.
    cli.ns
        .ip(&["link", "set", &cli.iface, "address", "02:00:00:00:00:0b"])
        .unwrap();
    let env = udhcpc(
        &cli.ns,
        &cli.iface,
        dir.path(),
        "PXEClient:Arch:00007:UNDI:003016",
    );
    assert_ne!(env["ip"], first);
    assert_eq!(env["boot_file"], "ipxe.efi");
    let second = env["ip"].clone();
    // Restart the server: both keep their addresses.
    server.finish().unwrap();
    assert!(state.path().join("dhcp-leases.json").exists());
    let server = Server::start(&srv.ns, auth_cfg(&srv.iface, state.path(), 96));
    let env = udhcpc(&cli.ns, &cli.iface, dir.path(), pxe);
    assert_eq!(env["ip"], second);
    cli.ns
        .ip(&["link", "set", &cli.iface, "address", "02:00:00:00:00:0a"])
        .unwrap();
    let env = udhcpc(&cli.ns, &cli.iface, dir.path(), pxe);
    assert_eq!(env["ip"], first);
    server.finish().unwrap();
}

/// A raw DHCP client socket in a namespace: sends one DISCOVER and
/// collects every reply for `wait`.
fn collect_offers(
    ns: &Netns,
    iface: &str,
    mac: MacAddr,
    opts: Vec<(u8, Vec<u8>)>,
    wait: Duration,
) -> Vec<Vec<u8>> {
    let iface = iface.to_owned();
    ns.spawn(move || {
        let sock = appliance::dhcp::server::udp_socket(&iface, 68).unwrap();
        sock.set_nonblocking(false).unwrap();
        let mut b = Builder::request(0x5150_0001, mac, MessageType::Discover);
        for (c, v) in &opts {
            b.option(*c, v);
        }
        sock.send_to(&b.finish(), SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))
            .unwrap();
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 1500];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    })
    .join()
    .unwrap()
    .unwrap()
}

fn dnsmasq(ns: &Netns, iface: &str, range: &str, dir: &Path) -> KillOnDrop {
    let child = ns
        .command("dnsmasq")
        .args([
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--user=root",
            "--no-ping",
            "--bind-interfaces",
        ])
        .arg(format!("--interface={iface}"))
        .arg(format!("--dhcp-range={range}"))
        .arg(format!("--dhcp-leasefile={}/dnsmasq.leases", dir.display()))
        .arg(format!("--pid-file={}/dnsmasq.pid", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    KillOnDrop(child)
}

#[test]
fn proxy_mode_adds_boot_info_next_to_dnsmasq() {
    tools(&[("ip", &["-V"]), ("dnsmasq", &["--version"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "proxy",
            addr: Some("10.95.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "dnsmasq",
            addr: Some("10.95.0.2/24"),
            mac: None,
        },
        NodeSpec {
            name: "cli",
            addr: None,
            mac: Some("02:00:00:00:00:20"),
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _dnsmasq = dnsmasq(
        &lab.node(1).ns,
        &lab.node(1).iface,
        "10.95.0.100,10.95.0.150,255.255.255.0,1h",
        dir.path(),
    );
    let mut cfg = DhcpServerConfig::new(
        &lab.node(0).iface,
        Ipv4Addr::new(10, 95, 0, 1),
        DhcpMode::Proxy,
        dir.path().to_path_buf(),
    );
    cfg.router_advertisements = false;
    let mut server = Server::start(&lab.node(0).ns, cfg);
    let mac = MacAddr([2, 0, 0, 0, 0, 0x20]);
    let pxe_opts = vec![
        (
            opt::VENDOR_CLASS,
            b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
        ),
        (opt::CLIENT_ARCH, vec![0, 7]),
    ];
    let cli = lab.node(2);
    let replies = collect_offers(
        &cli.ns,
        &cli.iface,
        mac,
        pxe_opts.clone(),
        Duration::from_secs(2),
    );
    let parsed: Vec<Packet<'_>> = replies
        .iter()
        .filter_map(|r| Packet::parse(r).ok())
        .filter(|p| p.op() == BOOTREPLY && p.msg_type() == Some(MessageType::Offer))
        .collect();
    let ours = parsed
        .iter()
        .find(|p| p.server_id() == Some(Ipv4Addr::new(10, 95, 0, 1)))
        .expect("an offer from our proxy");
    let theirs = parsed
        .iter()
        .find(|p| p.server_id() == Some(Ipv4Addr::new(10, 95, 0, 2)))
        .expect("an offer from dnsmasq");
    assert_eq!(ours.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(ours.file(), b"ipxe.efi");
    assert_eq!(ours.siaddr(), Ipv4Addr::new(10, 95, 0, 1));
    assert_eq!(ours.option(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
    assert_eq!(ours.option(opt::VENDOR_OPTS), Some(&[6, 1, 8, 255][..]));
    let addr = theirs.yiaddr();
    assert!(addr.octets()[3] >= 100, "{addr}");
    // A non-PXE client gets only dnsmasq's offer.
    let plain = collect_offers(
        &cli.ns,
        &cli.iface,
        MacAddr([2, 0, 0, 0, 0, 0x21]),
        vec![],
        Duration::from_secs(1),
    );
    assert!(plain
        .iter()
        .filter_map(|r| Packet::parse(r).ok())
        .all(|p| p.server_id() != Some(Ipv4Addr::new(10, 95, 0, 1))));
    // With the address from dnsmasq, the PXE REQUEST to port 4011 is
    // answered by unicast.
    cli.ns
        .ip(&["addr", "add", &format!("{addr}/24"), "dev", &cli.iface])
        .unwrap();
    let ack = cli
        .ns
        .spawn(move || {
            let sock = std::net::UdpSocket::bind((addr, 4011)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut b = Builder::request(0x5150_0002, mac, MessageType::Request);
            b.ciaddr(addr).flags(0);
            for (c, v) in &pxe_opts {
                b.option(*c, v);
            }
            sock.send_to(&b.finish(), (Ipv4Addr::new(10, 95, 0, 1), 4011))
                .unwrap();
            let mut buf = [0u8; 1500];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            (buf[..n].to_vec(), from)
        })
        .join()
        .unwrap()
        .unwrap();
    let p = Packet::parse(&ack.0).unwrap();
    assert_eq!(ack.1, "10.95.0.1:4011".parse().unwrap());
    assert_eq!(p.msg_type(), Some(MessageType::Ack));
    assert_eq!(p.file(), b"ipxe.efi");
    assert_eq!(p.yiaddr(), Ipv4Addr::UNSPECIFIED);
    let kinds: Vec<_> = server.drain_events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            DhcpEventKind::Discover,
            DhcpEventKind::Offer,
            DhcpEventKind::Request,
            DhcpEventKind::Ack
        ]
    );
    server.finish().unwrap();
}

#[test]
fn authoritative_start_is_refused_while_dnsmasq_answers() {
    tools(&[("ip", &["-V"]), ("dnsmasq", &["--version"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "srv",
            addr: Some("10.94.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "dnsmasq",
            addr: Some("10.94.0.2/24"),
            mac: None,
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = auth_cfg(&lab.node(0).iface, dir.path(), 94);
    cfg.force = false;
    cfg.probe_timeout = Duration::from_secs(2);
    {
        let _dnsmasq = dnsmasq(
            &lab.node(1).ns,
            &lab.node(1).iface,
            "10.94.0.160,10.94.0.200,255.255.255.0,1h",
            dir.path(),
        );
        let server = Server::start(&lab.node(0).ns, cfg.clone());
        std::thread::sleep(Duration::from_secs(3));
        let err = server.finish().expect_err("must refuse");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("refusing") && msg.contains("10.94.0.2"),
            "{msg}"
        );
        // `force` starts anyway (and probes nothing).
        let mut forced = cfg.clone();
        forced.force = true;
        let server = Server::start(&lab.node(0).ns, forced);
        server.finish().unwrap();
    }
    // dnsmasq gone: the probe finds nobody and the server runs.
    let server = Server::start(&lab.node(0).ns, cfg);
    std::thread::sleep(Duration::from_secs(3));
    server.finish().expect("starts when alone");
    // The probe on its own, from the server's namespace.
    let iface = lab.node(0).iface.clone();
    let found = lab
        .node(0)
        .ns
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(appliance::dhcp::probe_other_servers(
                    &iface,
                    Duration::from_millis(500),
                ))
        })
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn hostile_packets_do_not_stop_the_server() {
    tools(&[("ip", &["-V"])]);
    init_tracing();
    let lab = Lab::new(&[
        NodeSpec {
            name: "srv",
            addr: Some("10.93.0.1/24"),
            mac: None,
        },
        NodeSpec {
            name: "cli",
            addr: None,
            mac: Some("02:00:00:00:00:30"),
        },
    ])
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(
        &lab.node(0).ns,
        auth_cfg(&lab.node(0).iface, state.path(), 93),
    );
    let iface = lab.node(1).iface.clone();
    lab.node(1)
        .ns
        .spawn(move || {
            let sock = appliance::dhcp::server::udp_socket(&iface, 68).unwrap();
            let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
            let good =
                Builder::request(1, MacAddr([2, 0, 0, 0, 0, 0x30]), MessageType::Discover).finish();
            for n in [0, 1, 100, 239, 240, 241] {
                sock.send_to(&good[..n], to).unwrap();
            }
            sock.send_to(&[0xffu8; 1400], to).unwrap();
            let mut bad_len = good[..240].to_vec();
            bad_len.extend_from_slice(&[53, 1, 1, 60, 250, 1, 2]);
            sock.send_to(&bad_len, to).unwrap();
        })
        .join()
        .unwrap()
        .unwrap();
    let iface = lab.node(1).iface.clone();
    let lease = lab
        .node(1)
        .ns
        .spawn(move || {
            appliance::dhcp::client::acquire(&iface, [2, 0, 0, 0, 0, 0x30], Duration::from_secs(10))
        })
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(lease.addr, Ipv4Addr::new(10, 93, 0, 100));
    server.finish().unwrap();
}

#[test]
fn lab_namespaces_are_deleted() {
    require_root();
    let name = {
        let lab = Lab::new(&[
            NodeSpec {
                name: "a",
                addr: None,
                mac: None,
            },
            NodeSpec {
                name: "b",
                addr: None,
                mac: None,
            },
        ])
        .unwrap();
        lab.node(0).ns.name.clone()
    };
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));
}
