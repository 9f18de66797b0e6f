//! The appliance: one multi-call binary that is PID 1 on the booted image
//! (`init`), the provisioning server (`serve`), and later the agent and the
//! operator CLI.
//!
//! The binary (`main.rs`) only sets up tracing and dispatches; everything
//! lives here so it can be tested without a VM. Modules are named after the
//! format, protocol or concern they own; parsing is kept apart from I/O.

pub mod agent;
pub mod agents;
pub mod api;
pub mod audit;
pub mod auth;
pub mod blkdev;
pub mod bmap;
pub mod bmc;
pub mod cli;
pub mod clone;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod contract;
pub mod degraded;
pub mod dhcp;
pub mod entropy;
pub mod events;
pub mod flash;
pub mod growfs;
pub mod http;
pub mod hwinfo;
pub mod init;
pub mod install;
pub mod inventory;
pub mod iso9660;
pub mod medium;
pub mod metrics;
pub mod modalias;
pub mod modules;
pub mod mount;
#[cfg(test)]
pub(crate) mod mutate;
pub mod net;
pub mod network;
pub mod node;
pub mod oci;
pub mod osinstall;
pub mod parent;
pub mod partition;
pub mod power;
pub mod pxe;
pub mod rebuild;
pub mod replicas;
pub mod replicate;
pub mod repo;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod sync;
pub mod tftp;
pub mod tls;
pub mod webui;
pub mod writer;
