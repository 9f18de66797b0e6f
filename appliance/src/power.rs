//! Power requests from the API to PID 1.
//!
//! `serve` never powers anything off itself: it signals PID 1 (our init),
//! which stops the server, syncs, unmounts and then calls `reboot(2)`.
//! Signals: [`crate::contract::SIGNAL_POWEROFF`] (SIGUSR1) and
//! [`crate::contract::SIGNAL_REBOOT`] (SIGUSR2). On a host, where PID 1 is not
//! ours, requests are refused unless `serve --allow-power` was given, so a
//! developer's machine is never powered off by a test.

use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::contract::{SIGNAL_POWEROFF, SIGNAL_REBOOT};

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Poweroff,
    Reboot,
}

impl PowerAction {
    /// The signal that asks our init for this action.
    pub fn signal(self) -> Signal {
        match self {
            PowerAction::Poweroff => SIGNAL_POWEROFF,
            PowerAction::Reboot => SIGNAL_REBOOT,
        }
    }
}

/// Why a power request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("power control is not available: {0}")]
    Unavailable(String),
}

/// Something that can carry out power requests. `request` only accepts or
/// refuses; the action itself may happen later (after the HTTP reply).
pub trait PowerControl: Send + Sync {
    fn request(&self, action: PowerAction) -> Result<(), PowerError>;
}

/// Signals PID 1 after a short delay, so the HTTP reply gets out first.
#[derive(Debug, Default)]
pub struct SignalInit;

impl PowerControl for SignalInit {
    fn request(&self, action: PowerAction) -> Result<(), PowerError> {
        let sig = action.signal();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            if let Err(e) = kill_process(Pid::INIT, sig) {
                tracing::error!(?action, error = %e, "signalling PID 1 failed");
            }
        });
        Ok(())
    }
}

/// Refuses every request (host without our init, no `--allow-power`).
#[derive(Debug)]
pub struct Refuse(pub String);

impl PowerControl for Refuse {
    fn request(&self, _action: PowerAction) -> Result<(), PowerError> {
        Err(PowerError::Unavailable(self.0.clone()))
    }
}

/// Whether this process runs as the `serve` child of our init: init sets
/// [`crate::contract::ENV_UNDER_INIT`] and is our parent, PID 1.
pub fn under_our_init() -> bool {
    std::env::var(crate::contract::ENV_UNDER_INIT).as_deref() == Ok("1")
        && rustix::process::getppid() == Some(Pid::INIT)
}

/// Chooses the power control for `serve`.
pub fn for_serve(allow_power: bool) -> Box<dyn PowerControl> {
    if allow_power || under_our_init() {
        Box::new(SignalInit)
    } else {
        Box::new(Refuse(
            "not running under the appliance init (use --allow-power to signal PID 1 anyway)"
                .into(),
        ))
    }
}
