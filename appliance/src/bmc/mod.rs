//! Power drivers for *targets* (the machines we provision): on, off, cycle,
//! status, and a one-time boot device, through each machine's BMC or
//! hypervisor. (`crate::power` is the appliance powering *itself* off.)
//!
//! One blocking trait, [`PowerDriver`]; async callers wrap calls in
//! `spawn_blocking`. Drivers are chosen by a system's `power.type`
//! ([`crate::inventory::model::Power`]): `qmp`, `redfish`, `ipmi`, `wol`.
//! Every driver call is bounded by a timeout: a BMC that does not answer
//! is a [`PowerError::Unreachable`] naming the address, never a hang.

pub mod ipmi;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::inventory::model::Power;

/// A target's power state as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
    /// The driver cannot tell (Wake-on-LAN has no read-back).
    Unknown,
}

/// A one-time boot device for the next boot only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Network,
    Disk,
}

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerOp {
    On,
    Off,
    Cycle,
    Status,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// No answer within the timeout (or connection refused).
    #[error("power controller {address} did not answer: {detail}")]
    Unreachable { address: String, detail: String },
    /// The BMC answered but refused our credentials.
    #[error("power controller {address} refused the credentials: {detail}")]
    Auth { address: String, detail: String },
    /// The BMC answered with something we do not understand or an error.
    #[error("power controller {address}: {detail}")]
    Protocol { address: String, detail: String },
    /// The driver cannot do this (e.g. Wake-on-LAN cannot power off).
    #[error("{driver} cannot {what}")]
    Unsupported { driver: &'static str, what: String },
    /// The system's power settings are incomplete or malformed.
    #[error("power settings: {0}")]
    Config(String),
}

/// The default bound on one driver call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Drives one target's power.
pub trait PowerDriver: Send + Sync {
    /// Driver name for messages (`qmp`, `redfish`, `ipmi`, `wol`).
    fn name(&self) -> &'static str;
    fn status(&self) -> Result<PowerState, PowerError>;
    fn on(&self) -> Result<(), PowerError>;
    fn off(&self) -> Result<(), PowerError>;
    /// Off then on (or a hard reset where the BMC has one); a target that is
    /// off is simply powered on.
    fn cycle(&self) -> Result<(), PowerError>;
    /// Boot from `dev` on the next boot only.
    fn boot_once(&self, dev: BootDevice) -> Result<(), PowerError>;
}

/// The driver for a system's power settings, or `Ok(None)` when it has none.
pub fn driver_for(
    power: &Power,
    timeout: Duration,
) -> Result<Option<Box<dyn PowerDriver>>, PowerError> {
    let _ = timeout;
    match power.kind.as_str() {
        "" => Ok(None),
        "ipmi" => Ok(Some(Box::new(ipmi::Ipmi::new(power, timeout)?))),
        other => Err(PowerError::Config(format!(
            "power.type {other:?} has no driver yet"
        ))),
    }
}
