//! DHCPv4: the client PID 1 uses at boot ([`client`]) and the provisioning
//! server ([`server`]) with proxyDHCP and PXE boot decisions ([`boot`]),
//! over a shared strict packet parser and builder ([`packet`]). The lease
//! table ([`leases`]) and IPv6 router advertisements ([`ra`]) serve the
//! server; [`lab`] builds network namespaces for tests and benchmarks.

pub mod boot;
pub mod client;
pub mod lab;
pub mod leases;
pub mod packet;
pub mod ra;
pub mod server;

pub use boot::{
    BootBackend, BootDecision, ClientClass, DefaultBootBackend, LocalBootCheck, PolicyBootBackend,
};
pub use packet::MacAddr;
pub use server::{
    probe_other_servers, serve, DhcpEvent, DhcpEventKind, DhcpMode, DhcpServerConfig,
};
