//! The DHCP server: authoritative (addresses and boot options) or
//! proxyDHCP (boot options only, next to another DHCP server).
//!
//! "Listener + handler + backend": [`Handler::handle`] is pure (packet,
//! port, source and clock in; reply and events out) and asks a
//! [`BootBackend`] what a MAC boots; the lease table ([`LeaseDb`]) is
//! in-memory state it owns. [`serve`] is the listener: sockets, the lease
//! file (coalesced writes, see `leases.rs`), the rogue-server probe, the
//! event channel and the IPv6 router advertisements.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::broadcast;

use super::boot::{classify, BootBackend, BootDecision, ClientClass};
use super::leases::{AllocError, LeaseDb};
use super::packet::{
    opt, parse_request, prefix_mask, Builder, MacAddr, MessageType, Packet, PacketError,
};

/// The DHCP server port.
pub const DHCP_PORT: u16 = 67;
/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server port (proxyDHCP REQUESTs).
pub const PXE_PORT: u16 = 4011;
/// Lease file name inside the state directory.
pub const LEASE_FILE: &str = "dhcp-leases.json";

/// Which mode the server runs in.
#[derive(Clone, Debug)]
pub enum DhcpMode {
    /// We own the segment: hand out addresses from `pool`.
    Authoritative {
        /// First and last address of the pool (inclusive).
        pool: (Ipv4Addr, Ipv4Addr),
        /// Prefix length of the subnet (24 for 255.255.255.0).
        subnet: u8,
        router: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
        lease_secs: u32,
        /// Fixed addresses; they may lie outside the pool but inside the
        /// subnet.
        reservations: Vec<(MacAddr, Ipv4Addr)>,
    },
    /// Another server hands out addresses; we add boot information.
    Proxy,
}

/// Everything [`serve`] needs.
#[derive(Clone, Debug)]
pub struct DhcpServerConfig {
    /// The provisioning interface.
    pub iface: String,
    /// Our address on it (server identifier).
    pub server_ip: Ipv4Addr,
    pub mode: DhcpMode,
    /// Where the lease file lives.
    pub state_dir: PathBuf,
    /// `http://<server>` (for [`super::boot::DefaultBootBackend`]).
    pub http_base_url: String,
    /// Next-server for TFTP boot files.
    pub tftp_server: Ipv4Addr,
    /// Start authoritative mode even when another server answers.
    pub force: bool,
    /// How long the rogue-server probe listens.
    pub probe_timeout: Duration,
    /// Answer IPv6 router solicitations (needs CAP_NET_RAW; best effort).
    pub router_advertisements: bool,
    /// How long a declined address stays out of the pool.
    pub decline_secs: u64,
    /// Longest time a lease change waits before it is written.
    pub save_interval: Duration,
}

impl DhcpServerConfig {
    /// A configuration with the usual defaults for the optional knobs.
    pub fn new(iface: &str, server_ip: Ipv4Addr, mode: DhcpMode, state_dir: PathBuf) -> Self {
        DhcpServerConfig {
            iface: iface.to_owned(),
            server_ip,
            mode,
            state_dir,
            http_base_url: format!("http://{server_ip}"),
            tftp_server: server_ip,
            force: false,
            probe_timeout: Duration::from_secs(3),
            router_advertisements: true,
            decline_secs: 600,
            save_interval: Duration::from_millis(500),
        }
    }
}

/// What happened, for the API's event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpEventKind {
    Discover,
    Offer,
    Request,
    Ack,
    Nak,
    Decline,
    Release,
    Inform,
    Exhausted,
}

/// One structured DHCP event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DhcpEvent {
    pub kind: DhcpEventKind,
    pub mac: MacAddr,
    pub xid: u32,
    /// The address concerned (offered, acknowledged, declined…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    /// Boot file for offers/acks, the reason for NAKs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which socket a packet came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 67.
    Dhcp,
    /// 4011 (proxy mode).
    Pxe,
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub dest: SocketAddrV4,
    pub bytes: Vec<u8>,
}

/// What handling one packet produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<Outgoing>,
    pub events: Vec<DhcpEvent>,
}

struct Auth {
    leases: LeaseDb,
    subnet: u8,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    lease_secs: u32,
}

/// The pure request handler.
pub struct Handler {
    server_ip: Ipv4Addr,
    tftp_server: Ipv4Addr,
    decline_secs: u64,
    backend: Arc<dyn BootBackend>,
    auth: Option<Auth>,
}

fn event(kind: DhcpEventKind, p: &Packet<'_>, addr: Option<Ipv4Addr>) -> DhcpEvent {
    DhcpEvent {
        kind,
        mac: p.mac(),
        xid: p.xid(),
        addr,
        detail: None,
    }
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let m = u32::from(prefix_mask(prefix));
    u32::from(a) & m == u32::from(b) & m
}

/// Where a reply goes (RFC 2131 §4.1). Without an address the client gets a
/// broadcast even when it did not set the broadcast flag: unicasting to
/// `yiaddr` needs an ARP entry a UDP socket cannot install.
fn destination(p: &Packet<'_>, kind: MessageType) -> SocketAddrV4 {
    if !p.giaddr().is_unspecified() {
        return SocketAddrV4::new(p.giaddr(), DHCP_PORT);
    }
    if kind != MessageType::Nak && !p.ciaddr().is_unspecified() {
        return SocketAddrV4::new(p.ciaddr(), CLIENT_PORT);
    }
    SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
}

impl Handler {
    /// A handler for `cfg`; an authoritative one starts with an empty lease
    /// table (load it with [`Handler::leases_mut`]).
    pub fn new(cfg: &DhcpServerConfig, backend: Arc<dyn BootBackend>) -> anyhow::Result<Self> {
        let auth = match &cfg.mode {
            DhcpMode::Proxy => None,
            DhcpMode::Authoritative {
                pool,
                subnet,
                router,
                dns,
                lease_secs,
                reservations,
            } => {
                anyhow::ensure!(*subnet <= 32, "subnet prefix {subnet} is longer than 32");
                for (what, ip) in [("pool start", pool.0), ("pool end", pool.1)]
                    .into_iter()
                    .chain(reservations.iter().map(|(_, ip)| ("reservation", *ip)))
                {
                    anyhow::ensure!(
                        same_subnet(ip, cfg.server_ip, *subnet),
                        "{what} {ip} is outside {}/{subnet}",
                        cfg.server_ip
                    );
                }
                Some(Auth {
                    leases: LeaseDb::new(pool.0, pool.1, reservations, &[cfg.server_ip])?,
                    subnet: *subnet,
                    router: *router,
                    dns: dns.clone(),
                    lease_secs: (*lease_secs).max(60),
                })
            }
        };
        Ok(Handler {
            server_ip: cfg.server_ip,
            tftp_server: cfg.tftp_server,
            decline_secs: cfg.decline_secs,
            backend,
            auth,
        })
    }

    /// The lease table (authoritative mode).
    pub fn leases_mut(&mut self) -> Option<&mut LeaseDb> {
        self.auth.as_mut().map(|a| &mut a.leases)
    }

    /// Handles one packet that arrived on `port` from `src` at `now` (unix
    /// seconds). Bad packets are an error and change nothing.
    pub fn handle(
        &mut self,
        bytes: &[u8],
        port: Port,
        src: SocketAddrV4,
        now: u64,
    ) -> Result<Outcome, PacketError> {
        let p = parse_request(bytes)?;
        let span =
            tracing::debug_span!("dhcp", mac = %p.mac(), xid = format_args!("{:#010x}", p.xid()));
        let _enter = span.enter();
        let class = classify(&p);
        let kind = p.msg_type().ok_or(PacketError::NoMessageType)?;
        tracing::debug!(?kind, ?class, ?port, %src, "received");
        let out = if self.auth.is_some() {
            if port == Port::Pxe {
                Outcome::default()
            } else {
                self.authoritative(&p, kind, class, now)
            }
        } else {
            self.proxy(&p, kind, class, port, src)
        };
        for e in &out.events {
            tracing::info!(kind = ?e.kind, addr = ?e.addr, detail = ?e.detail, "dhcp event");
        }
        Ok(out)
    }

    /// Adds boot information for `decision`; returns the boot file when
    /// there is one.
    fn add_boot(
        &self,
        b: &mut Builder,
        p: &Packet<'_>,
        class: ClientClass,
        decision: &BootDecision,
    ) -> Option<String> {
        let file = match decision {
            BootDecision::Ignore | BootDecision::LocalBoot => return None,
            BootDecision::Chain { tftp_file } => {
                let server = self.tftp_server.to_string();
                b.siaddr(self.tftp_server)
                    .sname(&server)
                    .file(tftp_file)
                    .option(opt::TFTP_SERVER, server.as_bytes())
                    .option(opt::BOOTFILE, tftp_file.as_bytes());
                tftp_file.clone()
            }
            BootDecision::HttpUrl(url) | BootDecision::IpxeScript(url) => {
                b.siaddr(self.server_ip)
                    .file(url)
                    .option(opt::BOOTFILE, url.as_bytes());
                url.clone()
            }
        };
        let vc = p.option(opt::VENDOR_CLASS).unwrap_or_default();
        if vc.starts_with(b"HTTPClient") {
            b.option(opt::VENDOR_CLASS, b"HTTPClient");
        } else if vc.starts_with(b"PXEClient") {
            b.option(opt::VENDOR_CLASS, b"PXEClient");
            // PXE_DISCOVERY_CONTROL = 8: boot the file named here, no boot
            // server discovery. In both modes: without it EDK2 (OVMF, most
            // UEFI firmware) files the offer as "BINL" and waits for a boot
            // server on port 4011 that an authoritative server never runs.
            b.option(opt::VENDOR_OPTS, &[6, 1, 8, 255]);
        }
        if matches!(class, ClientClass::Ipxe { .. }) {
            b.option(opt::IPXE_ENCAP, &[opt::IPXE_NO_PXEDHCP, 1, 1]);
        }
        Some(file)
    }

    fn decision(&self, p: &Packet<'_>, class: ClientClass) -> BootDecision {
        if class.is_netboot() {
            self.backend.boot_decision(p.mac(), class)
        } else {
            BootDecision::Ignore
        }
    }

    fn proxy(
        &mut self,
        p: &Packet<'_>,
        kind: MessageType,
        class: ClientClass,
        port: Port,
        src: SocketAddrV4,
    ) -> Outcome {
        let vc = p.option(opt::VENDOR_CLASS).unwrap_or_default();
        if !(vc.starts_with(b"PXEClient") || vc.starts_with(b"HTTPClient")) {
            tracing::debug!("not a PXE client; ignored in proxy mode");
            return Outcome::default();
        }
        let reply_kind = match (port, kind) {
            (Port::Dhcp, MessageType::Discover) => MessageType::Offer,
            (Port::Dhcp, MessageType::Request) if p.server_id() == Some(self.server_ip) => {
                MessageType::Ack
            }
            (Port::Pxe, MessageType::Request | MessageType::Inform) => MessageType::Ack,
            _ => return Outcome::default(),
        };
        let mut events = vec![event(
            if kind == MessageType::Discover {
                DhcpEventKind::Discover
            } else {
                DhcpEventKind::Request
            },
            p,
            None,
        )];
        let decision = self.decision(p, class);
        let mut b = Builder::reply(p, reply_kind);
        b.option_ip(opt::SERVER_ID, self.server_ip);
        let Some(file) = self.add_boot(&mut b, p, class, &decision) else {
            tracing::debug!(?decision, "no boot for this client; not answering");
            return Outcome {
                reply: None,
                events,
            };
        };
        let dest = match port {
            Port::Pxe if !src.ip().is_unspecified() => src,
            _ => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        };
        let mut e = event(
            if reply_kind == MessageType::Offer {
                DhcpEventKind::Offer
            } else {
                DhcpEventKind::Ack
            },
            p,
            None,
        );
        e.detail = Some(file);
        events.push(e);
        Outcome {
            reply: Some(Outgoing {
                dest,
                bytes: b.finish(),
            }),
            events,
        }
    }

    /// An OFFER or ACK for `addr` with the network and boot options.
    fn lease_reply(
        &self,
        p: &Packet<'_>,
        kind: MessageType,
        addr: Option<Ipv4Addr>,
        class: ClientClass,
    ) -> (Builder, Option<String>) {
        let auth = self.auth.as_ref().expect("authoritative");
        let mut b = Builder::reply(p, kind);
        b.option_ip(opt::SERVER_ID, self.server_ip);
        if let Some(a) = addr {
            b.yiaddr(a)
                .option_u32(opt::LEASE_TIME, auth.lease_secs)
                .option_u32(opt::RENEWAL_TIME, auth.lease_secs / 2)
                .option_u32(opt::REBINDING_TIME, auth.lease_secs / 8 * 7);
        } else {
            b.ciaddr(p.ciaddr());
        }
        b.option_ip(opt::SUBNET_MASK, prefix_mask(auth.subnet));
        if let Some(r) = auth.router {
            b.option_ip(opt::ROUTER, r);
        }
        if !auth.dns.is_empty() {
            b.option_ips(opt::DNS, &auth.dns);
        }
        let decision = self.decision(p, class);
        let file = self.add_boot(&mut b, p, class, &decision);
        (b, file)
    }

    fn nak(&self, p: &Packet<'_>, reason: &str, events: &mut Vec<DhcpEvent>) -> Option<Outgoing> {
        let mut b = Builder::reply(p, MessageType::Nak);
        b.option_ip(opt::SERVER_ID, self.server_ip)
            .option(opt::MESSAGE, reason.as_bytes());
        let mut e = event(DhcpEventKind::Nak, p, None);
        e.detail = Some(reason.to_owned());
        events.push(e);
        Some(Outgoing {
            dest: destination(p, MessageType::Nak),
            bytes: b.finish(),
        })
    }

    fn authoritative(
        &mut self,
        p: &Packet<'_>,
        kind: MessageType,
        class: ClientClass,
        now: u64,
    ) -> Outcome {
        let mac = p.mac();
        let mut events = Vec::new();
        let reply = match kind {
            MessageType::Discover => {
                events.push(event(DhcpEventKind::Discover, p, None));
                let auth = self.auth.as_mut().expect("authoritative");
                match auth.leases.offer(mac, p.requested_ip(), now) {
                    Err(AllocError::Exhausted) => {
                        tracing::warn!("address pool exhausted; no offer");
                        events.push(event(DhcpEventKind::Exhausted, p, None));
                        None
                    }
                    Ok(addr) => {
                        let (mut b, file) =
                            self.lease_reply(p, MessageType::Offer, Some(addr), class);
                        let mut e = event(DhcpEventKind::Offer, p, Some(addr));
                        e.detail = file;
                        events.push(e);
                        Some(Outgoing {
                            dest: destination(p, MessageType::Offer),
                            bytes: b.finish(),
                        })
                    }
                }
            }
            MessageType::Request => self.request(p, class, now, &mut events),
            MessageType::Decline => {
                let sid = p.server_id();
                if let (Some(ip), true) =
                    (p.requested_ip(), sid.is_none_or(|s| s == self.server_ip))
                {
                    let secs = self.decline_secs;
                    let auth = self.auth.as_mut().expect("authoritative");
                    auth.leases.decline(mac, ip, secs, now);
                    events.push(event(DhcpEventKind::Decline, p, Some(ip)));
                }
                None
            }
            MessageType::Release => {
                let ip = p.ciaddr();
                let auth = self.auth.as_mut().expect("authoritative");
                if auth.leases.release(mac, ip, now) {
                    events.push(event(DhcpEventKind::Release, p, Some(ip)));
                }
                None
            }
            MessageType::Inform => {
                events.push(event(DhcpEventKind::Inform, p, Some(p.ciaddr())));
                let (mut b, _) = self.lease_reply(p, MessageType::Ack, None, class);
                let dest = if p.ciaddr().is_unspecified() {
                    destination(p, MessageType::Ack)
                } else {
                    SocketAddrV4::new(p.ciaddr(), CLIENT_PORT)
                };
                events.push(event(DhcpEventKind::Ack, p, None));
                Some(Outgoing {
                    dest,
                    bytes: b.finish(),
                })
            }
            MessageType::Offer | MessageType::Ack | MessageType::Nak => None,
        };
        Outcome { reply, events }
    }

    fn request(
        &mut self,
        p: &Packet<'_>,
        class: ClientClass,
        now: u64,
        events: &mut Vec<DhcpEvent>,
    ) -> Option<Outgoing> {
        let mac = p.mac();
        let sid = p.server_id();
        let requested = p.requested_ip();
        let target = match (sid, requested) {
            (Some(_), Some(ip)) | (None, Some(ip)) => ip,
            _ => p.ciaddr(),
        };
        events.push(event(DhcpEventKind::Request, p, Some(target)));
        let server_ip = self.server_ip;
        let auth = self.auth.as_mut().expect("authoritative");
        if sid.is_some_and(|s| s != server_ip) {
            // The client chose another server's offer.
            auth.leases.drop_offer(mac);
            return None;
        }
        if target.is_unspecified() {
            return self.nak(p, "no address requested", events);
        }
        if !same_subnet(target, server_ip, auth.subnet) {
            return self.nak(p, "address is not on this network", events);
        }
        if auth.leases.holder(target, now).is_some_and(|m| m != mac) {
            return self.nak(p, "address belongs to another client", events);
        }
        let lease_secs = auth.lease_secs;
        if !auth.leases.bind(mac, target, lease_secs, now) {
            return self.nak(p, "address is not available", events);
        }
        let (mut b, file) = self.lease_reply(p, MessageType::Ack, Some(target), class);
        let mut e = event(DhcpEventKind::Ack, p, Some(target));
        e.detail = file;
        events.push(e);
        Some(Outgoing {
            dest: destination(p, MessageType::Ack),
            bytes: b.finish(),
        })
    }
}

/// Opens a UDP socket on `iface` port `port` the way a DHCP server or
/// client needs it: SO_REUSEADDR, SO_BROADCAST, SO_BINDTODEVICE (so a
/// broadcast leaves through `iface` even with no route), non-blocking.
pub fn udp_socket(iface: &str, port: u16) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    // Best effort: a bigger queue absorbs bursts of PXE clients.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    Ok(s.into())
}

fn async_udp(iface: &str, port: u16) -> anyhow::Result<tokio::net::UdpSocket> {
    let s =
        udp_socket(iface, port).with_context(|| format!("binding UDP port {port} on {iface}"))?;
    tokio::net::UdpSocket::from_std(s).context("registering the socket with tokio")
}

/// The MAC address of `iface` from sysfs.
pub fn iface_mac(iface: &str) -> anyhow::Result<MacAddr> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing the MAC address of {iface}"))
}

/// Sends a DISCOVER on `iface` and collects the server identifiers of every
/// OFFER that answers it within `timeout` (the DISCOVER is repeated each
/// second). Binds UDP port 68, so run it before a DHCP client starts.
pub async fn probe_other_servers(iface: &str, timeout: Duration) -> anyhow::Result<Vec<Ipv4Addr>> {
    let sock = async_udp(iface, CLIENT_PORT)?;
    // The interface's own MAC when sysfs shows it (it does not for a thread
    // that entered another network namespace); otherwise a random locally
    // administered one. Replies are broadcast either way.
    let mac = iface_mac(iface).unwrap_or_else(|_| {
        let mut b = [0u8; 6];
        crate::entropy::fast_bytes(&mut b);
        MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    });
    let xid = crate::entropy::fast_u32();
    let discover = {
        let mut b = Builder::request(xid, mac, MessageType::Discover);
        let mut cid = vec![1];
        cid.extend_from_slice(&mac.0);
        b.option(opt::CLIENT_ID, &cid)
            .option(opt::PARAM_LIST, &[opt::SUBNET_MASK, opt::ROUTER]);
        b.finish()
    };
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_PORT);
    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now();
    let mut found = Vec::new();
    let mut buf = vec![0u8; 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_send {
            sock.send_to(&discover, to)
                .await
                .with_context(|| format!("sending the probe DISCOVER on {iface}"))?;
            next_send = now + Duration::from_secs(1);
        }
        let wait = deadline.min(next_send) - now;
        let Ok(r) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await else {
            continue;
        };
        let (n, from) = r.with_context(|| format!("receiving on {iface}"))?;
        let Ok(p) = Packet::parse(&buf[..n]) else {
            continue;
        };
        if p.op() != super::packet::BOOTREPLY
            || p.xid() != xid
            || p.mac() != mac
            || p.msg_type() != Some(MessageType::Offer)
        {
            continue;
        }
        let server = p.server_id().unwrap_or(match from {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => continue,
        });
        if !found.contains(&server) {
            tracing::info!(%server, offered = %p.yiaddr(), "another DHCP server answered");
            found.push(server);
        }
    }
    Ok(found)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Owns the handler and writes the lease file when dropped, so a cancelled
/// `serve` still saves.
struct Persisted {
    handler: Handler,
    path: PathBuf,
}

impl Persisted {
    fn save(&mut self) {
        if let Some(db) = self.handler.leases_mut() {
            if db.is_dirty() {
                if let Err(e) = db.save(&self.path) {
                    tracing::error!(error = format!("{e:#}"), "saving DHCP leases");
                }
            }
        }
    }
}

impl Drop for Persisted {
    fn drop(&mut self) {
        self.save();
    }
}

/// Runs the DHCP server until an I/O error. In authoritative mode it first
/// probes for other servers and refuses to start when one answers, unless
/// `cfg.force`.
pub async fn serve(
    cfg: DhcpServerConfig,
    backend: Arc<dyn BootBackend>,
    events: broadcast::Sender<DhcpEvent>,
) -> anyhow::Result<()> {
    let authoritative = matches!(cfg.mode, DhcpMode::Authoritative { .. });
    if authoritative && !cfg.force {
        let others = probe_other_servers(&cfg.iface, cfg.probe_timeout)
            .await
            .context("probing for other DHCP servers")?;
        let others: Vec<_> = others.into_iter().filter(|s| *s != cfg.server_ip).collect();
        if !others.is_empty() {
            anyhow::bail!(
                "refusing to start an authoritative DHCP server on {}: other DHCP servers answer ({}); use proxy mode or force",
                cfg.iface,
                others.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut state = Persisted {
        handler: Handler::new(&cfg, backend)?,
        path: cfg.state_dir.join(LEASE_FILE),
    };
    if let Some(db) = state.handler.leases_mut() {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        db.load(&state.path)?;
    }
    let s67 = async_udp(&cfg.iface, DHCP_PORT)?;
    let s4011 = if authoritative {
        None
    } else {
        Some(async_udp(&cfg.iface, PXE_PORT)?)
    };
    let _ra = if cfg.router_advertisements {
        let iface = cfg.iface.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = super::ra::serve_router_advertisements(&iface).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "IPv6 router advertisements disabled"
                );
            }
        })))
    } else {
        None
    };
    tracing::info!(iface = cfg.iface, server = %cfg.server_ip, ?cfg.mode, "DHCP server listening");
    let mut tick = tokio::time::interval(cfg.save_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    loop {
        let (n, from, port, sock) = tokio::select! {
            r = s67.recv_from(&mut buf) => {
                let (n, from) = r.context("receiving on port 67")?;
                (n, from, Port::Dhcp, &s67)
            }
            r = async {
                match &s4011 {
                    Some(s) => s.recv_from(&mut buf2).await,
                    None => std::future::pending().await,
                }
            } => {
                let (n, from) = r.context("receiving on port 4011")?;
                buf[..n].copy_from_slice(&buf2[..n]);
                (n, from, Port::Pxe, s4011.as_ref().expect("port 4011 socket"))
            }
            _ = tick.tick() => {
                state.save();
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        if state.handler.leases_mut().is_some_and(|db| db.must_save()) {
            state.save();
        }
        let out = match state
            .handler
            .handle(&buf[..n.min(buf.len())], port, from, unix_now())
        {
            Ok(out) => out,
            Err(e) => {
                tracing::debug!(%from, error = %e, "dropping packet");
                continue;
            }
        };
        for e in out.events {
            let _ = events.send(e);
        }
        if let Some(r) = out.reply {
            if let Err(e) = sock.send_to(&r.bytes, r.dest).await {
                tracing::warn!(dest = %r.dest, error = %e, "sending DHCP reply");
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::super::boot::DefaultBootBackend;
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const CLIENT_SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn auth_cfg(pool: (u8, u8), reservations: Vec<(MacAddr, Ipv4Addr)>) -> DhcpServerConfig {
        DhcpServerConfig::new(
            "lo",
            SERVER,
            DhcpMode::Authoritative {
                pool: (ip(pool.0), ip(pool.1)),
                subnet: 24,
                router: Some(SERVER),
                dns: vec![ip(53)],
                lease_secs: 3600,
                reservations,
            },
            PathBuf::from("/nonexistent"),
        )
    }

    fn handler(cfg: &DhcpServerConfig) -> Handler {
        Handler::new(cfg, Arc::new(DefaultBootBackend::new("http://10.0.0.1"))).unwrap()
    }

    fn pkt(kind: MessageType, m: MacAddr, opts: &[(u8, &[u8])]) -> Builder {
        let mut b = Builder::request(0x1000 + m.0[5] as u32, m, kind);
        for (c, v) in opts {
            b.option(*c, v);
        }
        b
    }

    fn send(h: &mut Handler, mut b: Builder, now: u64) -> Outcome {
        h.handle(&b.finish(), Port::Dhcp, CLIENT_SRC, now).unwrap()
    }

    fn reply(out: &Outcome) -> Packet<'_> {
        Packet::parse(&out.reply.as_ref().expect("a reply").bytes).unwrap()
    }

    fn kinds(out: &Outcome) -> Vec<DhcpEventKind> {
        out.events.iter().map(|e| e.kind).collect()
    }

    /// DISCOVER → OFFER → REQUEST → ACK for `m`; returns the address.
    fn dora(h: &mut Handler, m: MacAddr, opts: &[(u8, &[u8])], now: u64) -> Ipv4Addr {
        let out = send(h, pkt(MessageType::Discover, m, opts), now);
        assert_eq!(kinds(&out), [DhcpEventKind::Discover, DhcpEventKind::Offer]);
        let offer = reply(&out);
        assert_eq!(offer.msg_type(), Some(MessageType::Offer));
        let addr = offer.yiaddr();
        let mut req = pkt(MessageType::Request, m, opts);
        req.option_ip(opt::REQUESTED_IP, addr)
            .option_ip(opt::SERVER_ID, SERVER);
        let out = send(h, req, now);
        assert_eq!(kinds(&out), [DhcpEventKind::Request, DhcpEventKind::Ack]);
        let ack = reply(&out);
        assert_eq!(ack.msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), addr);
        addr
    }

    #[test]
    fn dora_gives_network_and_boot_options() {
        let mut h = handler(&auth_cfg((100, 200), vec![]));
        let pxe: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
        let out = send(&mut h, pkt(MessageType::Discover, mac(1), &[(60, pxe)]), 0);
        let offer = reply(&out);
        assert_eq!(offer.op(), super::super::packet::BOOTREPLY);
        assert_eq!(offer.xid(), 0x1001);
        assert_eq!(offer.yiaddr(), ip(100));
        assert_eq!(offer.siaddr(), SERVER);
        assert_eq!(offer.file(), b"undionly.kpxe");
        assert_eq!(offer.server_id(), Some(SERVER));
        assert_eq!(offer.subnet_mask(), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(offer.option(opt::ROUTER), Some(&[10, 0, 0, 1][..]));
        assert_eq!(offer.option(opt::DNS), Some(&[10, 0, 0, 53][..]));
        assert_eq!(offer.lease_time(), Some(3600));
        assert_eq!(offer.option(opt::BOOTFILE), Some(&b"undionly.kpxe"[..]));
        assert_eq!(offer.option(opt::TFTP_SERVER), Some(&b"10.0.0.1"[..]));
        assert_eq!(offer.option(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
        assert_eq!(
            offer.option(opt::VENDOR_OPTS),
            Some(&[6, 1, 8, 255][..]),
            "EDK2 needs it in every mode"
        );
        // Broadcast: the client has no address.
        assert_eq!(
            out.reply.as_ref().unwrap().dest,
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
        );
        assert_eq!(out.events[1].detail.as_deref(), Some("undionly.kpxe"));
        assert_eq!(dora(&mut h, mac(1), &[(60, pxe)], 0), ip(100));
        // A plain client gets an address and no boot file.
        let out = send(&mut h, pkt(MessageType::Discover, mac(2), &[]), 0);
        let offer = reply(&out);
        assert_eq!(offer.yiaddr(), ip(101));
        assert_eq!(offer.file(), b"");
        assert_eq!(offer.option(opt::BOOTFILE), None);
    }

    #[test]
    fn boot_answers_per_class() {
        let mut h = handler(&auth_cfg((100, 200), vec![]));
        let out = send(
            &mut h,
            pkt(
                MessageType::Discover,
                mac(3),
                &[(60, b"PXEClient"), (93, &[0, 7])],
            ),
            0,
        );
        assert_eq!(reply(&out).file(), b"ipxe.efi");
        let out = send(
            &mut h,
            pkt(
                MessageType::Discover,
                mac(4),
                &[(60, b"HTTPClient:Arch:00016:UNDI:003001"), (93, &[0, 16])],
            ),
            0,
        );
        let r = reply(&out);
        assert_eq!(r.file(), b"http://10.0.0.1/boot/ipxe.efi");
        assert_eq!(r.option(opt::VENDOR_CLASS), Some(&b"HTTPClient"[..]));
        let out = send(
            &mut h,
            pkt(
                MessageType::Discover,
                mac(5),
                &[(60, b"PXEClient:Arch:00000"), (77, b"iPXE")],
            ),
            0,
        );
        let r = reply(&out);
        assert_eq!(r.file(), b"http://10.0.0.1/boot/02:00:00:00:00:05.ipxe");
        assert_eq!(r.option(opt::IPXE_ENCAP), Some(&[176, 1, 1][..]));
    }

    #[test]
    fn same_mac_keeps_its_address_and_two_macs_never_share() {
        let mut h = handler(&auth_cfg((100, 104), vec![]));
        let a = dora(&mut h, mac(1), &[], 0);
        let b = dora(&mut h, mac(2), &[], 0);
        assert_ne!(a, b);
        assert_eq!(dora(&mut h, mac(1), &[], 10), a);
        // mac(2) asks for mac(1)'s address: it gets another one, and a
        // REQUEST for it is NAKed.
        let out = send(
            &mut h,
            {
                let mut p = pkt(MessageType::Discover, mac(2), &[]);
                p.option_ip(opt::REQUESTED_IP, a);
                p
            },
            20,
        );
        assert_ne!(reply(&out).yiaddr(), a);
        let mut req = pkt(MessageType::Request, mac(2), &[]);
        req.option_ip(opt::REQUESTED_IP, a);
        let out = send(&mut h, req, 20);
        assert_eq!(reply(&out).msg_type(), Some(MessageType::Nak));
        assert_eq!(kinds(&out), [DhcpEventKind::Request, DhcpEventKind::Nak]);
        h.leases_mut().unwrap().check_invariant();
    }

    #[test]
    fn reservations_win() {
        let mut h = handler(&auth_cfg((100, 110), vec![(mac(7), ip(50))]));
        assert_eq!(dora(&mut h, mac(7), &[], 0), ip(50));
        assert_eq!(dora(&mut h, mac(8), &[], 0), ip(100));
        // Nobody else may take the reserved address.
        let mut req = pkt(MessageType::Request, mac(9), &[]);
        req.option_ip(opt::REQUESTED_IP, ip(50));
        let out = send(&mut h, req, 0);
        assert_eq!(reply(&out).msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn leases_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_FILE);
        let cfg = auth_cfg((100, 200), vec![]);
        let mut h = handler(&cfg);
        let a = dora(&mut h, mac(1), &[], 0);
        let b = dora(&mut h, mac(2), &[], 0);
        h.leases_mut().unwrap().save(&path).unwrap();
        drop(h);
        let mut h = handler(&cfg);
        h.leases_mut().unwrap().load(&path).unwrap();
        // Renewal (ciaddr set, no server id) keeps the address.
        let mut renew = pkt(MessageType::Request, mac(2), &[]);
        renew.ciaddr(b).flags(0);
        let out = send(&mut h, renew, 100);
        assert_eq!(reply(&out).msg_type(), Some(MessageType::Ack));
        assert_eq!(reply(&out).yiaddr(), b);
        assert_eq!(
            out.reply.as_ref().unwrap().dest,
            SocketAddrV4::new(b, 68),
            "renewals are answered by unicast"
        );
        assert_eq!(dora(&mut h, mac(1), &[], 100), a);
        let c = dora(&mut h, mac(3), &[], 100);
        assert!(c != a && c != b);
    }

    #[test]
    fn exhaustion_is_an_event_and_no_offer() {
        let mut h = handler(&auth_cfg((100, 101), vec![]));
        dora(&mut h, mac(1), &[], 0);
        dora(&mut h, mac(2), &[], 0);
        let out = send(&mut h, pkt(MessageType::Discover, mac(3), &[]), 0);
        assert!(out.reply.is_none());
        assert_eq!(
            kinds(&out),
            [DhcpEventKind::Discover, DhcpEventKind::Exhausted]
        );
        // An expired lease is reclaimed.
        let out = send(&mut h, pkt(MessageType::Discover, mac(3), &[]), 4000);
        assert!(out.reply.is_some());
    }

    #[test]
    fn decline_quarantines_and_release_frees() {
        let mut cfg = auth_cfg((100, 100), vec![]);
        cfg.decline_secs = 600;
        let mut h = handler(&cfg);
        let a = dora(&mut h, mac(1), &[], 0);
        let mut d = pkt(MessageType::Decline, mac(1), &[]);
        d.option_ip(opt::REQUESTED_IP, a)
            .option_ip(opt::SERVER_ID, SERVER);
        let out = send(&mut h, d, 0);
        assert!(out.reply.is_none());
        assert_eq!(kinds(&out), [DhcpEventKind::Decline]);
        // The only address is quarantined: nobody gets it.
        let out = send(&mut h, pkt(MessageType::Discover, mac(2), &[]), 10);
        assert_eq!(
            kinds(&out),
            [DhcpEventKind::Discover, DhcpEventKind::Exhausted]
        );
        // After the quarantine it is usable again.
        assert_eq!(dora(&mut h, mac(2), &[], 700), a);
        let mut r = pkt(MessageType::Release, mac(2), &[]);
        r.ciaddr(a).option_ip(opt::SERVER_ID, SERVER);
        let out = send(&mut h, r, 700);
        assert!(out.reply.is_none());
        assert_eq!(kinds(&out), [DhcpEventKind::Release]);
        assert_eq!(
            dora(&mut h, mac(3), &[], 701),
            a,
            "released address is free"
        );
    }

    #[test]
    fn nak_cases() {
        let mut h = handler(&auth_cfg((100, 110), vec![]));
        let nak = |h: &mut Handler, b: Builder| {
            let out = send(h, b, 0);
            let r = reply(&out);
            assert_eq!(r.msg_type(), Some(MessageType::Nak));
            assert_eq!(out.reply.as_ref().unwrap().dest.ip(), &Ipv4Addr::BROADCAST);
            out.events.last().unwrap().detail.clone().unwrap()
        };
        // Another network.
        let mut r = pkt(MessageType::Request, mac(1), &[]);
        r.option_ip(opt::REQUESTED_IP, Ipv4Addr::new(192, 168, 1, 5));
        assert!(nak(&mut h, r).contains("not on this network"));
        // Ours but outside the pool.
        let mut r = pkt(MessageType::Request, mac(1), &[]);
        r.option_ip(opt::REQUESTED_IP, ip(250));
        assert!(nak(&mut h, r).contains("not available"));
        // Nothing requested.
        assert!(nak(&mut h, pkt(MessageType::Request, mac(1), &[])).contains("no address"));
        // Someone else's.
        let a = dora(&mut h, mac(2), &[], 0);
        let mut r = pkt(MessageType::Request, mac(1), &[]);
        r.ciaddr(a);
        assert!(nak(&mut h, r).contains("another client"));
        // A REQUEST for another server's offer is not for us: silence, and
        // our offer is withdrawn.
        send(&mut h, pkt(MessageType::Discover, mac(3), &[]), 0);
        let mut r = pkt(MessageType::Request, mac(3), &[]);
        r.option_ip(opt::REQUESTED_IP, ip(1))
            .option_ip(opt::SERVER_ID, Ipv4Addr::new(10, 0, 0, 2));
        let out = send(&mut h, r, 0);
        assert!(out.reply.is_none());
        assert!(h.leases_mut().unwrap().lease_of(mac(3)).is_none());
    }

    #[test]
    fn inform_is_answered_without_a_lease() {
        let mut h = handler(&auth_cfg((100, 110), vec![]));
        let mut i = pkt(MessageType::Inform, mac(1), &[]);
        i.ciaddr(ip(77)).flags(0);
        let out = send(&mut h, i, 0);
        let r = reply(&out);
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.lease_time(), None);
        assert_eq!(r.option(opt::ROUTER), Some(&[10, 0, 0, 1][..]));
        assert_eq!(
            out.reply.as_ref().unwrap().dest,
            SocketAddrV4::new(ip(77), 68)
        );
    }

    #[test]
    fn proxy_mode_gives_boot_info_only_to_pxe_clients() {
        let cfg = DhcpServerConfig::new("lo", SERVER, DhcpMode::Proxy, PathBuf::from("/x"));
        let mut h = handler(&cfg);
        let pxe: &[(u8, &[u8])] = &[(60, b"PXEClient:Arch:00007:UNDI:003016"), (93, &[0, 7])];
        let out = send(&mut h, pkt(MessageType::Discover, mac(1), pxe), 0);
        let r = reply(&out);
        assert_eq!(r.msg_type(), Some(MessageType::Offer));
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.siaddr(), SERVER);
        assert_eq!(r.file(), b"ipxe.efi");
        assert_eq!(r.option(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
        assert_eq!(r.option(opt::VENDOR_OPTS), Some(&[6, 1, 8, 255][..]));
        assert_eq!(r.lease_time(), None);
        assert_eq!(r.server_id(), Some(SERVER));
        // Port 4011: the REQUEST comes from the client's new address and is
        // answered there.
        let mut b = pkt(MessageType::Request, mac(1), pxe);
        b.ciaddr(ip(150)).flags(0);
        let src = SocketAddrV4::new(ip(150), 68);
        let out = h.handle(&b.finish(), Port::Pxe, src, 0).unwrap();
        assert_eq!(out.reply.as_ref().unwrap().dest, src);
        let r = reply(&out);
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.file(), b"ipxe.efi");
        // Non-PXE clients and REQUESTs for the real server are ignored.
        let out = send(&mut h, pkt(MessageType::Discover, mac(2), &[]), 0);
        assert_eq!(out, Outcome::default());
        let mut r = pkt(MessageType::Request, mac(1), pxe);
        r.option_ip(opt::SERVER_ID, ip(2));
        assert!(send(&mut h, r, 0).reply.is_none());
    }

    #[test]
    fn hostile_packets_are_dropped_and_serving_continues() {
        let mut h = handler(&auth_cfg((100, 110), vec![]));
        let good = pkt(MessageType::Discover, mac(1), &[(60, b"PXEClient")]).finish();
        let mut bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            good[..239].to_vec(),
            vec![0xff; 1501],
            vec![0; 4000],
        ];
        for (at, val) in [
            (0, 2u8),
            (1, 6),
            (2, 16),
            (236, 0),
            (242, 2),
            (241, 0),
            (240, 60),
        ] {
            let mut b = good.clone();
            b[at] = val;
            bad.push(b);
        }
        // Every truncation and every single-byte corruption of the options.
        for n in 0..good.len() {
            bad.push(good[..n].to_vec());
        }
        for at in 236..260 {
            for v in [0u8, 1, 53, 255, 0x80] {
                let mut b = good.clone();
                b[at] = v;
                bad.push(b);
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 236 + (x as usize % (b.len() - 236));
                b[at] = (x >> 32) as u8;
            }
            bad.push(b);
        }
        for b in &bad {
            for port in [Port::Dhcp, Port::Pxe] {
                let _ = h.handle(b, port, CLIENT_SRC, 0);
            }
        }
        h.leases_mut().unwrap().check_invariant();
        // Still serving.
        assert!(h
            .handle(&good, Port::Dhcp, CLIENT_SRC, 0)
            .unwrap()
            .reply
            .is_some());
    }
}
