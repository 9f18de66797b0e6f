//! The power API of a system, part of the inventory router:
//! `GET /api/v1/systems/{name}/power` → [`PowerStatus`] and
//! `POST /api/v1/systems/{name}/power` [`PowerRequest`] → [`PowerDone`],
//! `POST /api/v1/systems/{name}/media` [`MediaRequest`] → [`MediaDone`]
//! (Redfish virtual media: insert an ISO by URL, or eject)
//! (token needed, like every inventory write; reads follow
//! `public_reads`).
//!
//! Driver calls are blocking and bounded by [`super::DEFAULT_TIMEOUT`]; they
//! run in `spawn_blocking`. Every POST is recorded as a `power.<action>`
//! event (`power.failed` when it fails) with the system, driver and boot
//! device, never credentials.
//!
//! Error codes (stable): `power_not_configured` (409: the system has no
//! `power.type`), `power_config_invalid` (422), `power_unsupported` (422:
//! e.g. Wake-on-LAN off), `power_unreachable` (502: no answer, connection
//! refused; the message names the address), `power_auth_failed` (502: the
//! BMC refused the credentials), `power_protocol_error` (502: the BMC
//! answered with an error or something we do not understand).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{BootDevice, PowerError, PowerOp, PowerState};
use crate::api::ApiError;
use crate::inventory::api::InvState;
use crate::inventory::model::{Kind, System};
use crate::inventory::InvError;

/// The answer to `GET /api/v1/systems/{name}/power`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerStatus {
    pub system: String,
    pub state: PowerState,
    /// `qmp`, `redfish`, `ipmi` or `wol`.
    pub driver: String,
}

/// What `POST` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    On,
    Off,
    Cycle,
}

impl From<PowerAction> for PowerOp {
    fn from(a: PowerAction) -> PowerOp {
        match a {
            PowerAction::On => PowerOp::On,
            PowerAction::Off => PowerOp::Off,
            PowerAction::Cycle => PowerOp::Cycle,
        }
    }
}

/// The body of `POST /api/v1/systems/{name}/power`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    pub action: PowerAction,
    /// One-time boot device, set before the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootDevice>,
}

/// The answer to a `POST`: what was done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerDone {
    pub system: String,
    pub driver: String,
    pub action: PowerAction,
    pub boot: Option<BootDevice>,
}

impl From<PowerError> for ApiError {
    fn from(e: PowerError) -> Self {
        let (status, code) = match &e {
            PowerError::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "power_unreachable"),
            PowerError::Auth { .. } => (StatusCode::BAD_GATEWAY, "power_auth_failed"),
            PowerError::Protocol { .. } => (StatusCode::BAD_GATEWAY, "power_protocol_error"),
            PowerError::Unsupported { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "power_unsupported")
            }
            PowerError::Config(_) => (StatusCode::UNPROCESSABLE_ENTITY, "power_config_invalid"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn system(st: &InvState, name: &str) -> Result<System, ApiError> {
    let sys = st
        .read()
        .system(name)
        .cloned()
        .ok_or_else(|| InvError::NotFound {
            kind: Kind::System,
            name: name.to_owned(),
        })?;
    if sys.power.kind.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "power_not_configured",
            format!("system {name:?} has no power settings (set power.type and power.address)"),
        ));
    }
    Ok(sys)
}

/// Runs one power operation on a blocking thread.
async fn drive(
    sys: System,
    op: PowerOp,
    boot: Option<BootDevice>,
) -> Result<Option<PowerState>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let d = super::driver_for_system(&sys, super::DEFAULT_TIMEOUT)?.ok_or_else(|| {
            PowerError::Config(format!("system {:?} has no power driver", sys.name))
        })?;
        super::run(d.as_ref(), op, boot)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("power task failed: {e}"),
        )
    })?
    .map_err(ApiError::from)
}

/// What `POST …/media` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MediaAction {
    Insert,
    Eject,
}

/// The body of `POST /api/v1/systems/{name}/media`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaRequest {
    pub action: MediaAction,
    /// `insert`: the ISO's URL, fetched by the BMC (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The answer to `POST …/media`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MediaDone {
    pub system: String,
    pub action: MediaAction,
    /// `insert`: the slot's `@odata.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// `eject`: how many slots held media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<usize>,
}

/// Inserts or ejects virtual media through the system's Redfish BMC (the
/// one driver with virtual media): to boot an ISO on a machine
/// without PXE, insert it, then `cycle` with `boot: cd`.
pub async fn post_media(
    State(st): State<Arc<InvState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<MediaDone>, ApiError> {
    let req: MediaRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {{\"action\": \"insert|eject\", \"image\": \"URL\"}}: {e}"),
        )
    })?;
    let image = match (req.action, req.image.as_deref().map(str::trim)) {
        (MediaAction::Insert, Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {
            Some(u.to_owned())
        }
        (MediaAction::Insert, _) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "insert needs \"image\": the ISO's http:// or https:// URL",
            ))
        }
        (MediaAction::Eject, _) => None,
    };
    let sys = system(&st, &name)?;
    if sys.power.kind != "redfish" {
        return Err(PowerError::Unsupported {
            driver: "power",
            what: format!(
                "handle virtual media through {} (only redfish BMCs have it)",
                sys.power.kind
            ),
        }
        .into());
    }
    let mac = sys.interfaces.first().map(|i| i.mac.clone());
    let action = req.action;
    let result = tokio::task::spawn_blocking(move || {
        let p = &sys.power;
        let password = crate::secrets::power_password(p)
            .map_err(|e| super::PowerError::Config(format!("{e:#}")))?;
        let r = super::redfish::Redfish::new(
            &p.address,
            &p.user,
            &password,
            &p.id,
            super::DEFAULT_TIMEOUT,
        )?;
        match &image {
            Some(url) => r.insert_media(url).map(|s| (Some(s.path), None)),
            None => r.eject_media().map(|n| (None, Some(n))),
        }
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("media task failed: {e}"),
        )
    })?
    .map_err(ApiError::from);
    let mut detail = serde_json::json!({"system": name, "action": action});
    match &result {
        Ok((slot, ejected)) => {
            detail["slot"] = serde_json::json!(slot);
            detail["ejected"] = serde_json::json!(ejected);
            st.events.publish(
                match action {
                    MediaAction::Insert => "power.media_insert",
                    MediaAction::Eject => "power.media_eject",
                },
                mac.as_deref(),
                detail,
            );
        }
        Err(e) => {
            detail["code"] = e.code.into();
            detail["error"] = e.message.clone().into();
            st.events.publish("power.failed", mac.as_deref(), detail);
        }
    }
    let (slot, ejected) = result?;
    Ok(Json(MediaDone {
        system: name,
        action,
        slot,
        ejected,
    }))
}

pub async fn get_power(
    State(st): State<Arc<InvState>>,
    Path(name): Path<String>,
) -> Result<Json<PowerStatus>, ApiError> {
    let sys = system(&st, &name)?;
    let driver = sys.power.kind.clone();
    let state = drive(sys, PowerOp::Status, None)
        .await?
        .unwrap_or(PowerState::Unknown);
    Ok(Json(PowerStatus {
        system: name,
        state,
        driver,
    }))
}

pub async fn post_power(
    State(st): State<Arc<InvState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<PowerDone>, ApiError> {
    let req: PowerRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "expected {{\"action\": \"on|off|cycle\", \"boot\": \"network|disk|cd\"}}: {e}"
            ),
        )
    })?;
    let sys = system(&st, &name)?;
    let driver = sys.power.kind.clone();
    let mac = sys.interfaces.first().map(|i| i.mac.clone());
    let action = serde_json::to_value(req.action).unwrap_or_default();
    let boot = req.boot;
    let result = drive(sys, req.action.into(), boot).await;
    let mut detail = serde_json::json!({
        "system": name, "driver": driver, "action": action, "boot": boot,
    });
    match &result {
        Ok(_) => {
            let kind = format!("power.{}", action.as_str().unwrap_or("action"));
            st.events.publish(&kind, mac.as_deref(), detail);
        }
        Err(e) => {
            detail["code"] = e.code.into();
            detail["error"] = e.message.clone().into();
            st.events.publish("power.failed", mac.as_deref(), detail);
        }
    }
    result?;
    Ok(Json(PowerDone {
        system: name,
        driver,
        action: req.action,
        boot,
    }))
}
