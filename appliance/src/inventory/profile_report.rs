//! Install reports from profile-level renders: a machine installed from a
//! profile's autoinstall file (a menu pick, or `default_boot = install`)
//! has no system record of its own, so its preseed, kickstart or Ignition
//! file reports to `/api/v1/profiles/{name}/status/{event}`.
//!
//! The report is tokenless, like the system-level one, so it is taken only
//! from an address this appliance's DHCP leased (the lease names the MAC):
//! - the MAC belongs to a system → recorded for that system, exactly as
//!   `/api/v1/systems/{name}/status/{event}` would (finish turns its
//!   netboot off);
//! - otherwise → an `install.status` event naming the profile, the MAC and
//!   the address; no inventory object changes;
//! - an address this appliance never leased → 403 `unknown_reporter`:
//!   there is nothing to tie the report to, and an anonymous caller must
//!   not be able to fill the event log under a profile's name.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::api::{parse_event, peer, record, InvState};
use super::model::Kind;
use super::InvError;
use crate::api::ApiError;
use crate::http::{Caller, Guard, Route};

async fn report(
    State(st): State<Arc<InvState>>,
    caller: Caller,
    Path((profile, event)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ev = parse_event(&event)?;
    let from = peer(&caller);
    let system = {
        let inv = st.read();
        if inv.profile(&profile).is_none() {
            return Err(InvError::NotFound {
                kind: Kind::Profile,
                name: profile,
            }
            .into());
        }
        let mac = caller.peer.and_then(|p| st.events.mac_of(p.ip()));
        let Some(mac) = mac else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_reporter",
                format!(
                    "{} was not leased by this appliance: a profile-level install report cannot be tied to a machine",
                    if from.is_empty() { "the caller" } else { from.as_str() }
                ),
            ));
        };
        match inv.system_by_mac(&mac) {
            Some(s) => Ok(s.name.clone()),
            None => Err(mac),
        }
    };
    match system {
        Ok(name) => {
            let row = record(&st, &name, ev, &format!("profile {profile}"), &from)?;
            Ok(Json(row).into_response())
        }
        Err(mac) => {
            let body = json!({
                "profile": profile,
                "event": event,
                "client": from,
                "system": null,
            });
            st.events
                .publish("install.status", Some(&mac), body.clone());
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// The profile-level report routes (tokenless, like the system ones).
pub fn routes(st: Arc<InvState>) -> Vec<Route> {
    vec![Route::post(
        "/api/v1/profiles/{name}/status/{event}",
        Guard::Public,
        "Install report from a profile-level autoinstall file (start, finish, failure); taken only from an address this appliance leased",
    )
    .response("Object")
    .limit(64 << 10)
    .to(report, st)]
}
