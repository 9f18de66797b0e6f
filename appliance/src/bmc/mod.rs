//! Power drivers for *targets* (the machines we provision): on, off, cycle,
//! status, and a one-time boot device, through each machine's BMC or
//! hypervisor. (`crate::power` is the appliance powering *itself* off.)
//!
//! One blocking trait, [`PowerDriver`]; async callers wrap calls in
//! `spawn_blocking`. Drivers are chosen by a system's `power.type`
//! ([`crate::inventory::model::Power`]): `qmp`, `redfish`, `ipmi`, `wol`.
//! Every driver call is bounded by a timeout: a BMC that does not answer
//! is a [`PowerError::Unreachable`] naming the address, never a hang.
//!
//! Drivers: [`qmp`] (QEMU over its unix socket), [`redfish`] (HTTP(S)
//! JSON, plus virtual media), [`wol`] (Wake-on-LAN, on only), [`ipmi`]
//! (IPMI v2.0 RMCP+). [`api`] is the REST side
//! (`/api/v1/systems/{name}/power`). Errors never carry credentials.

pub mod ipmi;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::inventory::model::{Power, System};

pub mod api;
pub mod qmp;
pub mod redfish;
pub mod wol;

/// A target's power state as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
    /// The driver cannot tell (Wake-on-LAN has no read-back).
    Unknown,
}

/// A one-time boot device for the next boot only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Network,
    Disk,
    /// The (virtual) CD/DVD drive: an ISO inserted as virtual
    /// media, on machines without PXE.
    Cd,
}

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    // A sealed password (crate::secrets) is opened here, for the driver only.
    let opened;
    let p = if crate::secrets::is_sealed(&power.password) {
        let password = crate::secrets::power_password(power)
            .map_err(|e| PowerError::Config(format!("{e:#}")))?;
        opened = Power {
            password,
            ..power.clone()
        };
        &opened
    } else {
        power
    };
    let d: Box<dyn PowerDriver> = match p.kind.as_str() {
        "" => return Ok(None),
        "qmp" => Box::new(qmp::Qmp::new(&p.address, &p.id, timeout)?),
        "redfish" => Box::new(redfish::Redfish::new(
            &p.address,
            &p.user,
            &p.password,
            &p.id,
            timeout,
        )?),
        "wol" => Box::new(wol::Wol::new(&p.address, &p.id)?),
        "ipmi" => Box::new(ipmi::Ipmi::new(p, timeout)?),
        other => {
            return Err(PowerError::Config(format!(
                "power.type {other:?} has no driver yet"
            )))
        }
    };
    Ok(Some(d))
}

/// [`driver_for`] a system: Wake-on-LAN without `power.id` wakes the MAC of
/// the system's first interface.
pub fn driver_for_system(
    sys: &System,
    timeout: Duration,
) -> Result<Option<Box<dyn PowerDriver>>, PowerError> {
    if sys.power.kind == "wol" && sys.power.id.is_empty() {
        let mut p = sys.power.clone();
        // Opened against the stored settings, before the id is filled in.
        p.password = crate::secrets::power_password(&sys.power)
            .map_err(|e| PowerError::Config(format!("{e:#}")))?;
        p.id = sys
            .interfaces
            .first()
            .map(|i| i.mac.clone())
            .unwrap_or_default();
        return driver_for(&p, timeout);
    }
    driver_for(&sys.power, timeout)
}

/// Runs `op` (after setting `boot` when given) and returns the state
/// afterwards for `status`, `None` otherwise.
pub fn run(
    d: &dyn PowerDriver,
    op: PowerOp,
    boot: Option<BootDevice>,
) -> Result<Option<PowerState>, PowerError> {
    if let Some(dev) = boot {
        d.boot_once(dev)?;
    }
    match op {
        PowerOp::Status => return d.status().map(Some),
        PowerOp::On => d.on()?,
        PowerOp::Off => d.off()?,
        PowerOp::Cycle => d.cycle()?,
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_by_type() {
        let mut p = Power::default();
        assert!(driver_for(&p, DEFAULT_TIMEOUT).unwrap().is_none());
        p.kind = "qmp".into();
        p.address = "/run/vm0.qmp".into();
        p.id = "net=nic0".into();
        assert_eq!(
            driver_for(&p, DEFAULT_TIMEOUT).unwrap().unwrap().name(),
            "qmp"
        );
        p.kind = "redfish".into();
        p.address = "10.0.0.5".into();
        p.id = "tls=insecure".into();
        assert_eq!(
            driver_for(&p, DEFAULT_TIMEOUT).unwrap().unwrap().name(),
            "redfish"
        );
        p.kind = "ipmi".into();
        p.id = String::new();
        assert_eq!(
            driver_for(&p, DEFAULT_TIMEOUT).unwrap().unwrap().name(),
            "ipmi"
        );
        p.kind = "telnet".into();
        assert!(matches!(
            driver_for(&p, DEFAULT_TIMEOUT),
            Err(PowerError::Config(_))
        ));
        let mut sys = System::default();
        sys.power.kind = "wol".into();
        assert!(matches!(
            driver_for_system(&sys, DEFAULT_TIMEOUT),
            Err(PowerError::Config(_))
        ));
        sys.interfaces.push(crate::inventory::model::Interface {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            ..Default::default()
        });
        assert_eq!(
            driver_for_system(&sys, DEFAULT_TIMEOUT)
                .unwrap()
                .unwrap()
                .name(),
            "wol"
        );
    }
}
