//! Fuzzes the DHCP packet parser, the server handler in authoritative and
//! proxy mode (both ports) and the client's reply parser: no input may
//! panic, and the lease table's one-address-one-MAC invariant must hold.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

use appliance::dhcp::server::{Handler, Port};
use appliance::dhcp::{DefaultBootBackend, DhcpMode, DhcpServerConfig};
use libfuzzer_sys::fuzz_target;

fn handler(mode: DhcpMode) -> Handler {
    let cfg = DhcpServerConfig::new("lo", Ipv4Addr::new(10, 0, 0, 1), mode, PathBuf::from("/nonexistent"));
    Handler::new(&cfg, Arc::new(DefaultBootBackend::new("http://10.0.0.1"))).expect("valid config")
}

fuzz_target!(|data: &[u8]| {
    let _ = appliance::dhcp::packet::parse_request(data);
    let _ = appliance::dhcp::client::parse_reply(data, 0, &[0; 6]);
    let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let mut auth = handler(DhcpMode::Authoritative {
        pool: (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 102)),
        subnet: 24,
        router: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: vec![],
        lease_secs: 60,
        reservations: vec![],
    });
    let mut proxy = handler(DhcpMode::Proxy);
    // The same bytes several times: state changes from the first must not
    // break the next.
    for now in [0, 1, 100] {
        for port in [Port::Dhcp, Port::Pxe] {
            let _ = auth.handle(data, port, src, now);
            let _ = proxy.handle(data, port, src, now);
        }
    }
    auth.leases_mut().expect("authoritative").check_invariant();
});
