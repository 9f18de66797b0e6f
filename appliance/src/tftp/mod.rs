//! Our read-only TFTP server for PXE, on tokio: RFC 1350 with option
//! negotiation (RFC 2347), `blksize` (2348), `tsize` and `timeout` (2349)
//! and `windowsize` (7440).
//!
//! Listener + handler + backend: [`serve`] owns the listening socket and
//! starts one task per transfer; the transfer asks a [`TftpBackend`] for the
//! file and never touches storage itself; [`packet`] parses and encodes
//! without I/O (fuzzed by `appliance/fuzz`). Why our own: `async-tftp`
//! 0.4.2 runs its own smol I/O thread and was 1.8× slower per packet than
//! tftpd-hpa in lock-step; no Rust crate has `windowsize`.
//!
//! Observability: one `tftp` tracing span per transfer (`client`, `file`),
//! an info event on completion (bytes, blocks, duration, options), and
//! [`TftpEvent`]s on an optional broadcast channel ([`TftpConfig::events`]).

pub mod backend;
pub mod packet;
mod server;

pub use backend::{
    normalize, DirBackend, MapBackend, TftpBackend, TftpContent, TftpError, TftpFile,
};
pub use packet::{ErrorCode, Mode, Options, Packet, PacketError, Request};
pub use server::{serve, TftpConfig, TftpEvent};
