//! DHCPv4 client: packet building and parsing (pure, unit-tested) and the
//! DISCOVER/OFFER/REQUEST/ACK exchange over a UDP socket.
//!
//! The socket is bound to `0.0.0.0:68` with `SO_BINDTODEVICE` and
//! `SO_BROADCAST`, and requests carry the broadcast flag, so replies reach us
//! before the interface has an address (QEMU's slirp answers from 10.0.2.2
//! with 10.0.2.15/24). Lease renewal is not done yet: the lease is applied
//! once, which is enough for slirp's 24 h leases and a provisioning network.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// What a server offered or acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub server_id: Ipv4Addr,
}

/// A reply addressed to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Lease),
    Ack(Lease),
    Nak,
}

/// Why a packet was not a usable reply to us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed DHCP packet: {0}")]
    Malformed(String),
    #[error("not a BOOTREPLY")]
    NotReply,
    #[error("transaction id {got:#010x} is not ours ({want:#010x})")]
    OtherXid { got: u32, want: u32 },
    #[error("reply is for another client hardware address")]
    OtherClient,
    #[error("reply has no DHCP message type")]
    NoMessageType,
    #[error("unexpected DHCP message type {0:?}")]
    UnexpectedType(MessageType),
    #[error("subnet mask {0} is not contiguous")]
    BadMask(Ipv4Addr),
    #[error("reply has no server identifier")]
    NoServerId,
}

/// Options we ask servers for.
const WANTED: [OptionCode; 5] = [
    OptionCode::SubnetMask,
    OptionCode::Router,
    OptionCode::DomainNameServer,
    OptionCode::DomainName,
    OptionCode::AddressLeaseTime,
];

/// Minimum BOOTP message size (shared with the server).
const MIN_PACKET: usize = super::packet::MIN_SEND;

fn base_request(xid: u32, mac: &[u8; 6], kind: MessageType) -> Message {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut msg =
        Message::new_with_id(xid, unspecified, unspecified, unspecified, unspecified, mac);
    msg.set_opcode(Opcode::BootRequest);
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(WANTED.to_vec()));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    msg
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(300);
    msg.encode(&mut Encoder::new(&mut buf))
        .expect("encoding a DHCP message into a Vec cannot fail");
    // RFC 1542 §3.3 / BOOTP: pad to at least 300 bytes; some servers
    // (busybox udhcpd among them) ignore shorter requests.
    if buf.len() < MIN_PACKET {
        buf.resize(MIN_PACKET, 0);
    }
    buf
}

/// Builds a DHCPDISCOVER.
pub fn build_discover(xid: u32, mac: &[u8; 6]) -> Vec<u8> {
    encode(&base_request(xid, mac, MessageType::Discover))
}

/// Builds the DHCPREQUEST that accepts `offer`.
pub fn build_request(xid: u32, mac: &[u8; 6], offer: &Lease) -> Vec<u8> {
    let mut msg = base_request(xid, mac, MessageType::Request);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::RequestedIpAddress(offer.addr));
    opts.insert(DhcpOption::ServerIdentifier(offer.server_id));
    encode(&msg)
}

/// Prefix length of a contiguous subnet mask.
pub fn prefix_from_mask(mask: Ipv4Addr) -> Result<u8, ParseError> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(ParseError::BadMask(mask));
    }
    Ok(prefix as u8)
}

/// Classful prefix, used only when a server sends no subnet mask.
fn classful_prefix(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Parses a packet received on port 68, checking it answers `xid` for `mac`.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Result<Reply, ParseError> {
    let msg = Message::decode(&mut Decoder::new(bytes))
        .map_err(|e| ParseError::Malformed(e.to_string()))?;
    if msg.opcode() != Opcode::BootReply {
        return Err(ParseError::NotReply);
    }
    if msg.xid() != xid {
        return Err(ParseError::OtherXid {
            got: msg.xid(),
            want: xid,
        });
    }
    if msg.chaddr().get(..6) != Some(&mac[..]) {
        return Err(ParseError::OtherClient);
    }
    let opts = msg.opts();
    let kind = opts.msg_type().ok_or(ParseError::NoMessageType)?;
    if kind == MessageType::Nak {
        return Ok(Reply::Nak);
    }
    if kind != MessageType::Offer && kind != MessageType::Ack {
        return Err(ParseError::UnexpectedType(kind));
    }
    let addr = msg.yiaddr();
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => prefix_from_mask(*mask)?,
        _ => classful_prefix(addr),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(list)) => list.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(list)) => list.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(s)) => Some(*s),
        _ => None,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ if !msg.siaddr().is_unspecified() => msg.siaddr(),
        _ => return Err(ParseError::NoServerId),
    };
    let lease = Lease {
        addr,
        prefix,
        router,
        dns,
        lease_secs,
        server_id,
    };
    Ok(if kind == MessageType::Offer {
        Reply::Offer(lease)
    } else {
        Reply::Ack(lease)
    })
}

/// Renders `/etc/resolv.conf` for a lease; `None` when it has no DNS servers.
pub fn resolv_conf(lease: &Lease) -> Option<String> {
    if lease.dns.is_empty() {
        return None;
    }
    let mut out = String::from("# written by appliance init from DHCP\n");
    for ns in &lease.dns {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    Some(out)
}

/// A fresh transaction id. Never waits for the kernel's random pool: it
/// needs no secrecy, and waiting held up the first boot for minutes.
fn new_xid() -> u32 {
    crate::entropy::fast_u32()
}

/// Opens the client socket on `iface`.
fn open_socket(iface: &str) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_broadcast(true)?;
    sock.bind_device(Some(iface.as_bytes()))?;
    sock.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())?;
    Ok(sock.into())
}

/// The source address the kernel would put on a broadcast from `iface`.
/// A DHCP client must send from 0.0.0.0 (RFC 2131 §4.1); with a UDP socket
/// the kernel picks the address of another interface when there is one,
/// and a server on this host then drops the DISCOVER as a martian (that is
/// why busybox udhcpd in the same namespace never answered).
fn kernel_source(iface: &str) -> std::io::Result<Ipv4Addr> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    s.connect(&SocketAddrV4::new(Ipv4Addr::BROADCAST, 67).into())?;
    Ok(s.local_addr()?
        .as_socket_ipv4()
        .map_or(Ipv4Addr::UNSPECIFIED, |a| *a.ip()))
}

/// Sends `packet` and waits up to `wait` for a reply accepted by `accept`.
fn exchange(
    sock: &std::net::UdpSocket,
    packet: &[u8],
    wait: Duration,
    xid: u32,
    mac: &[u8; 6],
) -> std::io::Result<Option<Reply>> {
    sock.send_to(packet, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => match parse_reply(&buf[..n], xid, mac) {
                Ok(reply) => return Ok(Some(reply)),
                Err(e) => tracing::debug!(%from, error = %e, "ignoring packet"),
            },
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Runs DISCOVER/OFFER/REQUEST/ACK on `iface` with exponential backoff
/// (1, 2, 4, 8 s… per try) until `total` has passed. Blocking.
pub fn acquire(iface: &str, mac: [u8; 6], total: Duration) -> anyhow::Result<Lease> {
    use anyhow::Context;
    let sock = open_socket(iface).with_context(|| format!("opening DHCP socket on {iface}"))?;
    match kernel_source(iface) {
        Ok(src) if !src.is_unspecified() => tracing::warn!(
            %src,
            "DHCP requests on {iface} leave with source {src}, not 0.0.0.0; a server on this host will ignore them"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot tell the source address"),
    }
    let start = Instant::now();
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0u32;
    while start.elapsed() < total {
        attempt += 1;
        let xid = new_xid();
        let span = tracing::info_span!("dhcp", iface, xid = format_args!("{xid:#010x}"), attempt);
        let _enter = span.enter();
        tracing::debug!("sending DISCOVER");
        let offer = match exchange(&sock, &build_discover(xid, &mac), wait, xid, &mac)
            .context("sending DISCOVER")?
        {
            Some(Reply::Offer(lease)) => lease,
            other => {
                tracing::info!(reply = ?other, "no offer; retrying");
                wait = (wait * 2).min(Duration::from_secs(8));
                continue;
            }
        };
        tracing::debug!(addr = %offer.addr, server = %offer.server_id, "got OFFER; sending REQUEST");
        match exchange(&sock, &build_request(xid, &mac, &offer), wait, xid, &mac)
            .context("sending REQUEST")?
        {
            Some(Reply::Ack(lease)) => {
                tracing::info!(addr = %lease.addr, prefix = lease.prefix, "got ACK");
                return Ok(lease);
            }
            other => {
                tracing::info!(reply = ?other, "no ACK; starting over");
                wait = (wait * 2).min(Duration::from_secs(8));
            }
        }
    }
    anyhow::bail!("no DHCP lease on {iface} after {attempt} attempts in {total:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A reply like slirp's: from 10.0.2.2, offering 10.0.2.15/24.
    fn reply(kind: MessageType, xid: u32) -> Vec<u8> {
        let mut msg = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        msg.set_opcode(Opcode::BootReply);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        opts.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]));
        opts.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 2, 3,
        )]));
        opts.insert(DhcpOption::AddressLeaseTime(86400));
        encode(&msg)
    }

    fn slirp_lease() -> Lease {
        Lease {
            addr: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            router: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            lease_secs: Some(86400),
            server_id: Ipv4Addr::new(10, 0, 2, 2),
        }
    }

    #[test]
    fn discover_has_broadcast_flag_type_and_params() {
        let bytes = build_discover(0x1234_5678, &MAC);
        let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(msg.opcode(), Opcode::BootRequest);
        assert_eq!(msg.xid(), 0x1234_5678);
        assert!(bytes.len() >= 300, "{}", bytes.len());
        assert!(msg.flags().broadcast());
        assert_eq!(&msg.chaddr()[..6], &MAC);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Discover));
        let Some(DhcpOption::ParameterRequestList(list)) =
            msg.opts().get(OptionCode::ParameterRequestList)
        else {
            panic!("no parameter request list")
        };
        assert!(list.contains(&OptionCode::Router));
        assert!(list.contains(&OptionCode::DomainNameServer));
    }

    #[test]
    fn request_names_offered_address_and_server() {
        let bytes = build_request(7, &MAC, &slirp_lease());
        let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Request));
        assert!(msg.flags().broadcast());
        assert_eq!(
            msg.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 2, 15)))
        );
        assert_eq!(
            msg.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)))
        );
    }

    #[test]
    fn offer_and_ack_parse_into_leases() {
        assert_eq!(
            parse_reply(&reply(MessageType::Offer, 9), 9, &MAC),
            Ok(Reply::Offer(slirp_lease()))
        );
        assert_eq!(
            parse_reply(&reply(MessageType::Ack, 9), 9, &MAC),
            Ok(Reply::Ack(slirp_lease()))
        );
        assert_eq!(
            parse_reply(&reply(MessageType::Nak, 9), 9, &MAC),
            Ok(Reply::Nak)
        );
    }

    #[test]
    fn replies_for_others_are_rejected() {
        assert_eq!(
            parse_reply(&reply(MessageType::Offer, 9), 10, &MAC),
            Err(ParseError::OtherXid { got: 9, want: 10 })
        );
        let other = [0, 1, 2, 3, 4, 5];
        assert_eq!(
            parse_reply(&reply(MessageType::Offer, 9), 9, &other),
            Err(ParseError::OtherClient)
        );
        // Our own broadcast DISCOVER echoes back on some setups.
        assert_eq!(
            parse_reply(&build_discover(9, &MAC), 9, &MAC),
            Err(ParseError::NotReply)
        );
        assert!(matches!(
            parse_reply(&[1, 2, 3], 9, &MAC),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn masks_convert_to_prefixes() {
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 255, 255, 0)), Ok(24));
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 255, 240, 0)), Ok(20));
        assert_eq!(prefix_from_mask(Ipv4Addr::new(0, 0, 0, 0)), Ok(0));
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 255, 255, 255)), Ok(32));
        assert!(prefix_from_mask(Ipv4Addr::new(255, 0, 255, 0)).is_err());
    }

    #[test]
    fn resolv_conf_lists_servers() {
        assert_eq!(
            resolv_conf(&slirp_lease()).unwrap(),
            "# written by appliance init from DHCP\nnameserver 10.0.2.3\n"
        );
        let mut l = slirp_lease();
        l.dns.clear();
        assert_eq!(resolv_conf(&l), None);
    }
}
