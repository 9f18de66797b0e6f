//! Redfish (DMTF DSP0266) over HTTP(S) JSON: power state, reset, one-time
//! boot override, and virtual media for booting the appliance ISO on
//! machines without PXE.
//!
//! `power.address` is the BMC: `https://10.0.0.5`, `10.0.0.5` (HTTPS
//! assumed) or `http://127.0.0.1:8000`; a trailing `/redfish/v1` is
//! ignored. Credentials go in `power.user`/`power.password` (HTTP Basic),
//! never in the address. `power.id` is a comma-separated list: a bare word
//! or `system=ID` picks the ComputerSystem (default: the first member of
//! `/redfish/v1/Systems`), `tls=insecure` accepts any server certificate.
//!
//! **TLS decision.** rustls (through ureq) with the webpki roots verifies
//! certificates by default. BMCs nearly always ship self-signed
//! certificates, so a system opts out with `tls=insecure`; the choice is
//! per system and explicit, because an unverified connection hands the
//! BMC's password to whoever answers. Redirects are not followed (the
//! Basic credentials would go with them).
//!
//! Operations:
//! - `status`: the system's `PowerState`: `On`, `PoweringOn`, `Paused` →
//!   on; `Off`, `PoweringOff` → off.
//! - `on`/`off`/`cycle`: `ComputerSystem.Reset` with the first allowed of
//!   `On`,`ForceOn` / `ForceOff`,`GracefulShutdown`,`PushPowerButton` /
//!   `ForceRestart`,`PowerCycle`,`GracefulRestart` (allowed = the action's
//!   `ResetType@Redfish.AllowableValues`, else its `@Redfish.ActionInfo`,
//!   else anything). `on` of a machine that is on and `off` of one that is
//!   off do nothing; `cycle` of one that is off powers it on, and with no
//!   restart type allowed it is `ForceOff` then `On`.
//! - `boot_once`: PATCH `Boot` = `{"BootSourceOverrideEnabled":"Once",
//!   "BootSourceOverrideTarget":"Pxe"|"Hdd"}` (with `If-Match` when the
//!   system has an ETag).
//! - Virtual media (not in the trait): [`Redfish::virtual_media`],
//!   [`Redfish::insert_media`], [`Redfish::eject_media`] on the CD/DVD slot
//!   found through the system's `VirtualMedia` link (newer BMCs) or its
//!   managers' (`Links.ManagedBy` → `Managers/*/VirtualMedia/*`).

use std::time::Duration;

use serde_json::{json, Value};

use super::{BootDevice, PowerDriver, PowerError, PowerState};

/// The Redfish driver for one BMC (and one of its systems).
#[derive(Debug)]
pub struct Redfish {
    /// `scheme://host[:port]`, for messages and URLs.
    base: String,
    user: String,
    password: String,
    system_id: Option<String>,
    insecure: bool,
    agent: ureq::Agent,
}

/// One virtual media slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MediaSlot {
    /// The slot's `@odata.id`.
    pub path: String,
    pub media_types: Vec<String>,
    pub image: Option<String>,
    pub inserted: bool,
}

/// `power.id` for Redfish.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RedfishOptions {
    pub system: Option<String>,
    pub insecure: bool,
}

/// Parses `power.id`: `ID`, `system=ID`, `tls=insecure|verify`, comma-separated.
pub fn parse_options(id: &str) -> Result<RedfishOptions, PowerError> {
    let mut o = RedfishOptions::default();
    for part in id.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            None => o.system = Some(part.to_owned()),
            Some(("system", v)) if !v.trim().is_empty() => o.system = Some(v.trim().to_owned()),
            Some(("tls", "insecure")) => o.insecure = true,
            Some(("tls", "verify")) => o.insecure = false,
            _ => {
                return Err(PowerError::Config(format!(
                    "power.id {part:?}: use SYSTEM_ID, system=ID or tls=insecure|verify"
                )))
            }
        }
    }
    Ok(o)
}

/// Normalises `power.address` to `scheme://host[:port]`.
pub fn parse_address(address: &str) -> Result<String, PowerError> {
    let a = address.trim().trim_end_matches('/');
    if a.is_empty() {
        return Err(PowerError::Config(
            "power.address is empty: give the BMC's address".into(),
        ));
    }
    let a = a.strip_suffix("/redfish/v1").unwrap_or(a);
    let with_scheme = if a.starts_with("http://") || a.starts_with("https://") {
        a.to_owned()
    } else {
        format!("https://{a}")
    };
    let rest = with_scheme.split_once("://").map(|x| x.1).unwrap_or("");
    if rest.contains('@') {
        // Do not echo it: it holds a password.
        return Err(PowerError::Config(
            "power.address holds credentials: put them in power.user and power.password".into(),
        ));
    }
    if rest.is_empty() || rest.contains('/') {
        return Err(PowerError::Config(format!(
            "power.address {address:?}: use https://HOST[:PORT]"
        )));
    }
    Ok(with_scheme)
}

/// Standard base64 (RFC 4648) for the Basic header.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `PowerState` text as a power state.
pub fn state_of(s: &str) -> PowerState {
    match s {
        "On" | "PoweringOn" | "Paused" => PowerState::On,
        "Off" | "PoweringOff" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

/// The first of `prefs` that `allowed` permits (`None` = anything goes).
fn pick<'a>(prefs: &[&'a str], allowed: Option<&[String]>) -> Option<&'a str> {
    match allowed {
        None => prefs.first().copied(),
        Some(a) => prefs.iter().copied().find(|p| a.iter().any(|x| x == p)),
    }
}

/// A Redfish error body's most useful message.
fn redfish_message(body: &Value) -> Option<String> {
    let e = body.get("error")?;
    e.pointer("/@Message.ExtendedInfo/0/Message")
        .or_else(|| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The `@odata.id`s of the array at `pointer` in `v` (a collection's
/// `/Members`, a system's `/Links/ManagedBy`).
fn links(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("@odata.id").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

impl Redfish {
    pub fn new(
        address: &str,
        user: &str,
        password: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Redfish, PowerError> {
        let base = parse_address(address)?;
        let opts = parse_options(id)?;
        let tls = ureq::tls::TlsConfig::builder()
            .disable_verification(opts.insecure)
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .tls_config(tls)
            .build();
        Ok(Redfish {
            base,
            user: user.to_owned(),
            password: password.to_owned(),
            system_id: opts.system,
            insecure: opts.insecure,
            agent: ureq::Agent::new_with_config(config),
        })
    }

    fn protocol(&self, detail: String) -> PowerError {
        PowerError::Protocol {
            address: self.base.clone(),
            detail,
        }
    }

    fn transport(&self, method: &str, path: &str, e: ureq::Error) -> PowerError {
        let detail = format!("{method} {path}: {e}");
        // rustls reports a refused certificate as an I/O error.
        let tls = matches!(
            e,
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_)
        ) || detail.contains("certificate");
        if tls {
            let hint = if self.insecure {
                ""
            } else {
                " (a self-signed BMC certificate? add tls=insecure to power.id)"
            };
            return self.protocol(format!("TLS: {detail}{hint}"));
        }
        match e {
            ureq::Error::Io(ref io) if io.kind() == std::io::ErrorKind::InvalidData => {
                self.protocol(detail)
            }
            ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed => PowerError::Unreachable {
                address: self.base.clone(),
                detail,
            },
            _ => self.protocol(detail),
        }
    }

    /// One request; returns the status, the ETag and the JSON body (`Null`
    /// when empty). 401/403 are [`PowerError::Auth`], other non-2xx
    /// [`PowerError::Protocol`].
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<(u16, Option<String>, Value), PowerError> {
        let url = format!("{}{path}", self.base);
        let auth = format!(
            "Basic {}",
            base64(format!("{}:{}", self.user, self.password).as_bytes())
        );
        let result = match method {
            "GET" => self
                .agent
                .get(&url)
                .header("Authorization", &auth)
                .header("Accept", "application/json")
                .call(),
            _ => {
                let mut req = match method {
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.post(&url),
                }
                .header("Authorization", &auth)
                .header("Accept", "application/json")
                .header("Content-Type", "application/json");
                if let Some(tag) = if_match {
                    req = req.header("If-Match", tag);
                }
                req.send(body.map(Value::to_string).unwrap_or_else(|| "{}".into()))
            }
        };
        let mut resp = result.map_err(|e| self.transport(method, path, e))?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_string()
            .map_err(|e| self.transport(method, path, e))?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        match status {
            200..=299 => Ok((status, etag, json)),
            401 | 403 => Err(PowerError::Auth {
                address: self.base.clone(),
                detail: format!(
                    "{method} {path}: HTTP {status}{}",
                    redfish_message(&json)
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
            }),
            _ => Err(self.protocol(format!(
                "{method} {path}: HTTP {status}{}",
                redfish_message(&json)
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ))),
        }
    }

    fn get(&self, path: &str) -> Result<Value, PowerError> {
        self.call("GET", path, None, None).map(|(_, _, v)| v)
    }

    fn link<'a>(&self, v: &'a Value, what: &str) -> Result<&'a str, PowerError> {
        v.get("@odata.id")
            .and_then(Value::as_str)
            .ok_or_else(|| self.protocol(format!("{what} has no @odata.id")))
    }

    /// The system's `@odata.id`.
    pub fn system_path(&self) -> Result<String, PowerError> {
        if let Some(id) = &self.system_id {
            return Ok(format!("/redfish/v1/Systems/{id}"));
        }
        let c = self.get("/redfish/v1/Systems")?;
        let first = c
            .pointer("/Members/0")
            .ok_or_else(|| self.protocol("/redfish/v1/Systems has no members".into()))?;
        Ok(self.link(first, "the first system")?.to_owned())
    }

    fn system(&self) -> Result<(String, Option<String>, Value), PowerError> {
        let path = self.system_path()?;
        let (_, etag, v) = self.call("GET", &path, None, None)?;
        Ok((path, etag, v))
    }

    /// The ComputerSystem resource as the BMC shows it.
    pub fn system_resource(&self) -> Result<Value, PowerError> {
        self.system().map(|(_, _, v)| v)
    }

    fn power_state(&self, sys: &Value) -> PowerState {
        sys.get("PowerState")
            .and_then(Value::as_str)
            .map(state_of)
            .unwrap_or(PowerState::Unknown)
    }

    /// The reset action's target and allowed reset types.
    fn reset_action(
        &self,
        path: &str,
        sys: &Value,
    ) -> Result<(String, Option<Vec<String>>), PowerError> {
        let action = sys.pointer("/Actions/#ComputerSystem.Reset");
        let target = action
            .and_then(|a| a.get("target"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{path}/Actions/ComputerSystem.Reset"));
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        if let Some(a) = action.and_then(|a| a.get("ResetType@Redfish.AllowableValues")) {
            return Ok((target, Some(strings(a))));
        }
        if let Some(info) = action
            .and_then(|a| a.get("@Redfish.ActionInfo"))
            .and_then(Value::as_str)
        {
            let info = self.get(info)?;
            let allowed = info
                .get("Parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p["Name"] == "ResetType")
                .and_then(|p| p.get("AllowableValues"))
                .map(strings);
            return Ok((target, allowed));
        }
        Ok((target, None))
    }

    fn reset(&self, path: &str, sys: &Value, prefs: &[&str]) -> Result<(), PowerError> {
        let (target, allowed) = self.reset_action(path, sys)?;
        let kind = pick(prefs, allowed.as_deref()).ok_or_else(|| PowerError::Unsupported {
            driver: "redfish",
            what: format!(
                "reset with any of {prefs:?} (the BMC allows {:?})",
                allowed.unwrap_or_default()
            ),
        })?;
        tracing::debug!(bmc = %self.base, reset = kind, "redfish reset");
        self.call("POST", &target, Some(&json!({ "ResetType": kind })), None)
            .map(drop)
    }

    /// Virtual media collections: the system's, else its managers'.
    fn media_collections(&self) -> Result<Vec<String>, PowerError> {
        let (_, _, sys) = self.system()?;
        if let Some(c) = sys
            .pointer("/VirtualMedia/@odata.id")
            .and_then(Value::as_str)
        {
            return Ok(vec![c.to_owned()]);
        }
        let mut managers = links(&sys, "/Links/ManagedBy");
        if managers.is_empty() {
            managers = links(&self.get("/redfish/v1/Managers")?, "/Members");
        }
        let mut out = Vec::new();
        for m in managers {
            if let Some(c) = self
                .get(&m)?
                .pointer("/VirtualMedia/@odata.id")
                .and_then(Value::as_str)
            {
                out.push(c.to_owned());
            }
        }
        Ok(out)
    }

    /// Every virtual media slot of the system (or its managers).
    pub fn virtual_media(&self) -> Result<Vec<(MediaSlot, Value)>, PowerError> {
        let mut out = Vec::new();
        for c in self.media_collections()? {
            let coll = self.get(&c)?;
            for m in coll
                .get("Members")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let path = self.link(m, "a virtual media member")?.to_owned();
                let v = self.get(&path)?;
                let slot = MediaSlot {
                    path,
                    media_types: v
                        .get("MediaTypes")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                    image: v
                        .get("Image")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                    inserted: v.get("Inserted").and_then(Value::as_bool).unwrap_or(false),
                };
                out.push((slot, v));
            }
        }
        Ok(out)
    }

    fn cd_slots(&self) -> Result<Vec<(MediaSlot, Value)>, PowerError> {
        let slots: Vec<_> = self
            .virtual_media()?
            .into_iter()
            .filter(|(s, _)| s.media_types.iter().any(|t| t == "CD" || t == "DVD"))
            .collect();
        if slots.is_empty() {
            return Err(PowerError::Unsupported {
                driver: "redfish",
                what: format!("insert an ISO: {} has no CD/DVD virtual media", self.base),
            });
        }
        Ok(slots)
    }

    fn action_target(slot: &MediaSlot, v: &Value, action: &str) -> String {
        v.pointer(&format!("/Actions/#VirtualMedia.{action}/target"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}/Actions/VirtualMedia.{action}", slot.path))
    }

    /// Inserts the ISO at `image_url` into the first CD/DVD slot (ejecting
    /// what is there first); returns the slot.
    pub fn insert_media(&self, image_url: &str) -> Result<MediaSlot, PowerError> {
        let (mut slot, v) = self.cd_slots()?.remove(0);
        if slot.inserted {
            let eject = Self::action_target(&slot, &v, "EjectMedia");
            self.call("POST", &eject, Some(&json!({})), None)?;
        }
        let insert = Self::action_target(&slot, &v, "InsertMedia");
        self.call(
            "POST",
            &insert,
            Some(&json!({"Image": image_url, "Inserted": true, "WriteProtected": true})),
            None,
        )?;
        slot.image = Some(image_url.to_owned());
        slot.inserted = true;
        Ok(slot)
    }

    /// Ejects whatever is in the CD/DVD slots; returns how many it ejected.
    pub fn eject_media(&self) -> Result<usize, PowerError> {
        let mut n = 0;
        for (slot, v) in self.cd_slots()? {
            if slot.inserted || slot.image.is_some() {
                let eject = Self::action_target(&slot, &v, "EjectMedia");
                self.call("POST", &eject, Some(&json!({})), None)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl PowerDriver for Redfish {
    fn name(&self) -> &'static str {
        "redfish"
    }

    fn status(&self) -> Result<PowerState, PowerError> {
        let (_, _, sys) = self.system()?;
        Ok(self.power_state(&sys))
    }

    fn on(&self) -> Result<(), PowerError> {
        let (path, _, sys) = self.system()?;
        if self.power_state(&sys) == PowerState::On {
            return Ok(());
        }
        self.reset(&path, &sys, &["On", "ForceOn"])
    }

    fn off(&self) -> Result<(), PowerError> {
        let (path, _, sys) = self.system()?;
        if self.power_state(&sys) == PowerState::Off {
            return Ok(());
        }
        self.reset(
            &path,
            &sys,
            &["ForceOff", "GracefulShutdown", "PushPowerButton"],
        )
    }

    fn cycle(&self) -> Result<(), PowerError> {
        let (path, _, sys) = self.system()?;
        if self.power_state(&sys) == PowerState::Off {
            return self.reset(&path, &sys, &["On", "ForceOn"]);
        }
        let restarts = ["ForceRestart", "PowerCycle", "GracefulRestart"];
        let (_, allowed) = self.reset_action(&path, &sys)?;
        if pick(&restarts, allowed.as_deref()).is_some() {
            return self.reset(&path, &sys, &restarts);
        }
        self.reset(&path, &sys, &["ForceOff"])?;
        self.reset(&path, &sys, &["On", "ForceOn"])
    }

    fn boot_once(&self, dev: BootDevice) -> Result<(), PowerError> {
        let (path, etag, sys) = self.system()?;
        let target = match dev {
            BootDevice::Network => "Pxe",
            BootDevice::Disk => "Hdd",
            BootDevice::Cd => "Cd",
        };
        if let Some(allowed) = sys
            .pointer("/Boot/BootSourceOverrideTarget@Redfish.AllowableValues")
            .and_then(Value::as_array)
        {
            if !allowed.iter().any(|a| a == target) {
                return Err(PowerError::Unsupported {
                    driver: "redfish",
                    what: format!("boot from {target} (the BMC allows {allowed:?})"),
                });
            }
        }
        let body = json!({"Boot": {
            "BootSourceOverrideEnabled": "Once",
            "BootSourceOverrideTarget": target,
        }});
        self.call("PATCH", &path, Some(&body), etag.as_deref())
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn addresses_and_options() {
        assert_eq!(parse_address("10.0.0.5").unwrap(), "https://10.0.0.5");
        assert_eq!(
            parse_address("http://127.0.0.1:8000/redfish/v1/").unwrap(),
            "http://127.0.0.1:8000"
        );
        let e = parse_address("https://admin:hunter2@10.0.0.5").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(parse_address("").is_err());
        assert!(parse_address("https://h/x").is_err());
        assert_eq!(parse_options("").unwrap(), RedfishOptions::default());
        assert_eq!(
            parse_options("1, tls=insecure").unwrap(),
            RedfishOptions {
                system: Some("1".into()),
                insecure: true
            }
        );
        assert_eq!(
            parse_options("system=abc").unwrap().system.as_deref(),
            Some("abc")
        );
        assert!(parse_options("tls=maybe").is_err());
    }

    #[test]
    fn reset_type_choice() {
        let allowed = vec!["On".to_owned(), "PowerCycle".to_owned()];
        assert_eq!(
            pick(&["ForceRestart", "PowerCycle"], Some(&allowed)),
            Some("PowerCycle")
        );
        assert_eq!(pick(&["ForceOff"], Some(&allowed)), None);
        assert_eq!(pick(&["ForceOff", "X"], None), Some("ForceOff"));
        assert_eq!(state_of("PoweringOn"), PowerState::On);
        assert_eq!(state_of("Off"), PowerState::Off);
        assert_eq!(state_of("?"), PowerState::Unknown);
    }

    #[test]
    fn refused_connection_is_unreachable() {
        // Bind then drop: nothing listens on that port now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Redfish::new(
            &format!("http://127.0.0.1:{port}"),
            "u",
            "p",
            "",
            Duration::from_secs(2),
        )
        .unwrap();
        let e = r.status().unwrap_err();
        assert!(
            matches!(&e, PowerError::Unreachable { address, .. } if address.ends_with(&port.to_string())),
            "{e:?}"
        );
    }

    #[test]
    fn silent_bmc_times_out() {
        // Accepts (backlog) and never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let r = Redfish::new(
            &format!("http://{addr}"),
            "u",
            "p",
            "",
            Duration::from_millis(300),
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = r.on().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(&e, PowerError::Unreachable { address, .. } if address.contains(&addr.to_string())),
            "{e:?}"
        );
        drop(l);
    }
}
