//! A bare IPv6 router advertisement for the provisioning interface.
//!
//! Firmware with IPv6 enabled (QEMU's 2019 iPXE among them) sends router
//! solicitations and waits ~16 s for an answer before it boots over IPv4.
//! We answer each solicitation with an advertisement that says "no default
//! router" (router lifetime 0) and carries no prefix, so nothing configures
//! IPv6 from it. The packet builder and the solicitation check are pure;
//! the raw ICMPv6 socket (CAP_NET_RAW) is best effort: the caller logs a
//! failure and carries on.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use anyhow::Context;

use super::packet::MacAddr;

/// ICMPv6 type of a router solicitation.
pub const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 type of a router advertisement.
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// All-nodes multicast.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All-routers multicast.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Whether an ICMPv6 message (as a raw ICMPv6 socket delivers it, without
/// the IPv6 header) is a well-formed router solicitation.
pub fn is_router_solicitation(icmp: &[u8]) -> bool {
    icmp.len() >= 8 && icmp[0] == ROUTER_SOLICITATION && icmp[1] == 0
}

/// A router advertisement with router lifetime 0, no flags, no prefix, and
/// our link-layer address when known. The checksum is left 0: the kernel
/// fills it for ICMPv6 raw sockets (RFC 3542 §3.1).
pub fn build_router_advertisement(mac: Option<MacAddr>) -> Vec<u8> {
    let mut p = vec![
        ROUTER_ADVERTISEMENT,
        0, // code
        0,
        0,  // checksum
        64, // current hop limit
        0,  // flags: no M, no O
        0,
        0, // router lifetime 0: not a default router
        0,
        0,
        0,
        0, // reachable time: unspecified
        0,
        0,
        0,
        0, // retrans timer: unspecified
    ];
    if let Some(m) = mac {
        // Source link-layer address option: type 1, length 1 (8 bytes).
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&m.0);
    }
    p
}

/// Answers router solicitations on `iface` until an error.
pub async fn serve_router_advertisements(iface: &str) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mac = super::server::iface_mac(iface).ok();
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("opening a raw ICMPv6 socket (needs CAP_NET_RAW)")?;
    let index = rustix::net::netdevice::name_to_index(&s, iface)
        .with_context(|| format!("looking up the index of {iface}"))?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("binding the ICMPv6 socket to {iface}"))?;
    s.set_multicast_hops_v6(255)?;
    s.set_unicast_hops_v6(255)?;
    s.join_multicast_v6(&ALL_ROUTERS, index)
        .with_context(|| format!("joining ff02::2 on {iface}"))?;
    s.set_nonblocking(true)?;
    // A datagram socket as far as tokio is concerned: recvfrom/sendto only.
    let sock = tokio::net::UdpSocket::from_std(s.into())?;
    let ra = build_router_advertisement(mac);
    let dest = SocketAddrV6::new(ALL_NODES, 0, 0, index);
    let mut buf = vec![0u8; 1500];
    tracing::info!(iface, "answering IPv6 router solicitations");
    loop {
        let (n, from) = sock.recv_from(&mut buf).await.context("receiving ICMPv6")?;
        if !is_router_solicitation(&buf[..n]) {
            continue;
        }
        tracing::debug!(%from, "router solicitation; sending a bare advertisement");
        let to = match from {
            SocketAddr::V6(a) if !a.ip().is_unspecified() => {
                SocketAddrV6::new(*a.ip(), 0, 0, index)
            }
            _ => dest,
        };
        if let Err(e) = sock.send_to(&ra, to).await {
            tracing::warn!(%to, error = %e, "sending router advertisement");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_says_no_router_and_no_prefix() {
        let ra = build_router_advertisement(Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(ra.len(), 24);
        assert_eq!(ra[0], 134);
        assert_eq!(ra[1], 0);
        assert_eq!(&ra[6..8], &[0, 0], "router lifetime must be 0");
        assert_eq!(ra[5], 0, "no managed/other flags");
        assert_eq!(&ra[16..24], &[1, 1, 2, 0, 0, 0, 0, 1]);
        // No prefix information option (type 3) anywhere.
        let mut at = 16;
        while at + 1 < ra.len() {
            assert_ne!(ra[at], 3);
            at += ra[at + 1] as usize * 8;
        }
        assert_eq!(build_router_advertisement(None).len(), 16);
    }

    #[test]
    fn solicitations_are_recognised() {
        assert!(is_router_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_router_solicitation(&[133, 0, 0]));
        assert!(!is_router_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_router_solicitation(&[133, 1, 0, 0, 0, 0, 0, 0]));
    }
}
