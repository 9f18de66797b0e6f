//! A small blocking HTTP client for the operator CLI (ureq over plain HTTP
//! or HTTPS with rustls): JSON in and out, bearer token, and the API's
//! `{code, message}` errors turned into readable failures.
//!
//! HTTPS trusts exactly the CA certificates given with [`Client::trust`]
//! (the site CA: `--ca`, `APPLIANCE_CA`, the config file's `ca`, or a
//! parent link's pinned CA), else the public web roots. A token is never
//! sent over plain `http://` to an address that is not loopback unless
//! [`Client::allow_plain_token`] says so (`--insecure-http`): anyone on
//! the provisioning network could read it.

use anyhow::{bail, Context, Result};

/// The server refused with its `{code, message}` error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub code: String,
    pub message: String,
    pub status: u16,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, HTTP {})", self.message, self.code, self.status)
    }
}

impl std::error::Error for ApiFailure {}

/// CA certificates to trust for HTTPS, parsed from PEM.
pub type Roots = std::sync::Arc<Vec<ureq::tls::Certificate<'static>>>;

/// Parses the CA certificates of a PEM file's text (at least one).
pub fn roots_from_pem(pem: &[u8]) -> Result<Roots> {
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.context("parsing PEM")? {
            out.push(c);
        }
    }
    anyhow::ensure!(!out.is_empty(), "no CERTIFICATE block in the PEM text");
    Ok(std::sync::Arc::new(out))
}

/// Whether `url`'s host is a loopback address or `localhost`.
pub fn is_loopback_url(url: &str) -> bool {
    match crate::tls::url_host(url) {
        Some(h) if h.eq_ignore_ascii_case("localhost") => true,
        Some(h) => h
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Where the server is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Client {
    pub url: String,
    pub token: Option<String>,
    agent: ureq::Agent,
    timeout: Option<std::time::Duration>,
    roots: Option<Roots>,
    plain_token_ok: bool,
}

fn agent(timeout: Option<std::time::Duration>, roots: Option<&Roots>) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
    if let Some(r) = roots {
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(r.clone()));
    }
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .tls_config(tls.build())
        .build();
    ureq::Agent::new_with_config(config)
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Self {
        Self::with_timeout(url, token, None)
    }

    /// As [`Client::new`], giving up on any request after `timeout`.
    pub fn with_timeout(
        url: &str,
        token: Option<String>,
        timeout: Option<std::time::Duration>,
    ) -> Self {
        let url = if url.starts_with("http://") || url.starts_with("https://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        Self {
            url: url.trim_end_matches('/').to_owned(),
            token,
            agent: agent(timeout, None),
            timeout,
            roots: None,
            plain_token_ok: false,
        }
    }

    /// Trusts exactly `roots` (the site CA) for HTTPS; `None` keeps the
    /// public web roots.
    pub fn trust(mut self, roots: Option<Roots>) -> Self {
        self.agent = agent(self.timeout, roots.as_ref());
        self.roots = roots;
        self
    }

    /// Allows sending the token over plain HTTP to a non-loopback address.
    pub fn allow_plain_token(mut self, yes: bool) -> Self {
        self.plain_token_ok = yes;
        self
    }

    /// The `Authorization` header, or an error when the token would cross
    /// the network in clear.
    fn auth(&self) -> Result<Option<String>> {
        let Some(t) = &self.token else {
            return Ok(None);
        };
        if self.url.starts_with("http://") && !self.plain_token_ok && !is_loopback_url(&self.url) {
            bail!(
                "refusing to send the API token over plain http to {} (anyone on that network \
                 could read it): use the server's https URL (port 8443 on the image) with \
                 --ca <site CA>, or pass --insecure-http",
                self.url
            );
        }
        Ok(Some(format!("Bearer {t}")))
    }

    /// Context for a failed connection, with a hint when TLS verification
    /// is the likely cause.
    fn connect_context(&self, method: &str, path: &str) -> String {
        let mut msg = format!("connecting to {} ({method} {path})", self.url);
        if self.url.starts_with("https://") && self.roots.is_none() {
            msg.push_str(
                "; an appliance's certificate is signed by its site CA: fetch it from \
                 /api/v1/tls/ca.pem, compare its fingerprint with the one the server printed, \
                 and pass it with --ca",
            );
        }
        msg
    }

    /// Sends a request; returns the body text of a 2xx answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String> {
        Ok(self.tagged(method, path, body, None)?.0)
    }

    /// GET of one object: its JSON and its `ETag` (for a later `If-Match`).
    pub fn get_tagged(&self, path: &str) -> Result<(serde_json::Value, Option<String>)> {
        let (text, tag) = self.tagged("GET", path, None, None)?;
        let v = serde_json::from_str(&text)
            .with_context(|| format!("parsing the answer to GET {path}"))?;
        Ok((v, tag))
    }

    /// As [`Client::json`], with `If-Match: if_match` when given: the
    /// server refuses (412 `precondition_failed`) if the object changed.
    pub fn json_if_match(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        if_match: Option<&str>,
    ) -> Result<serde_json::Value> {
        let text = self.tagged(method, path, body, if_match)?.0;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing the answer to {method} {path}"))
    }

    /// Sends a request (with `If-Match` when given); returns the body text
    /// and the `ETag` of a 2xx answer.
    fn tagged(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        if_match: Option<&str>,
    ) -> Result<(String, Option<String>)> {
        let url = format!("{}{path}", self.url);
        let auth = self.auth()?;
        let result = match (method, body) {
            ("GET" | "DELETE", _) => {
                let mut req = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                if let Some(t) = if_match {
                    req = req.header("If-Match", t);
                }
                req.call()
            }
            (_, body) => {
                let mut req = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.patch(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                if let Some(t) = if_match {
                    req = req.header("If-Match", t);
                }
                let text = body.map(|b| b.to_string()).unwrap_or_default();
                req.header("Content-Type", "application/json").send(text)
            }
        };
        let mut resp = result.with_context(|| self.connect_context(method, path))?;
        let status = resp.status();
        let tag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        if status.is_success() {
            return Ok((text, tag));
        }
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v.get("code").is_some() => Err(ApiFailure {
                code: v["code"].as_str().unwrap_or("").to_owned(),
                message: v["message"].as_str().unwrap_or("").to_owned(),
                status: status.as_u16(),
            }
            .into()),
            _ => bail!(
                "HTTP {} from {method} {path}: {}",
                status.as_u16(),
                text.trim()
            ),
        }
    }

    /// Sends `body` (bytes or a reader, with its content type) and returns
    /// a 2xx answer's length and a reader of its body (no size limit).
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<(ureq::SendBody<'_>, &str)>,
    ) -> Result<(Option<u64>, ureq::BodyReader<'static>)> {
        let url = format!("{}{path}", self.url);
        let auth = self.auth()?;
        let result = match body {
            None => {
                let mut req = match method {
                    "GET" => self.agent.get(&url),
                    "DELETE" => self.agent.delete(&url),
                    _ => bail!("{method} needs a body"),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            Some((body, ctype)) => {
                let mut req = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.patch(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.header("Content-Type", ctype).send(body)
            }
        };
        let resp = result.with_context(|| self.connect_context(method, path))?;
        let status = resp.status();
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let reader = resp.into_body().into_reader();
        if status.is_success() {
            return Ok((len, reader));
        }
        let mut text = String::new();
        use std::io::Read;
        let _ = reader.take(64 * 1024).read_to_string(&mut text);
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v.get("code").is_some() => Err(ApiFailure {
                code: v["code"].as_str().unwrap_or("").to_owned(),
                message: v["message"].as_str().unwrap_or("").to_owned(),
                status: status.as_u16(),
            }
            .into()),
            _ => bail!(
                "HTTP {} from {method} {path}: {}",
                status.as_u16(),
                text.trim()
            ),
        }
    }

    /// Sends bytes, returns the whole 2xx answer.
    pub fn bytes(&self, method: &str, path: &str, body: Option<(&[u8], &str)>) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut cursor: &[u8] = body.map(|b| b.0).unwrap_or_default();
        let send = body.map(|(_, t)| (ureq::SendBody::from_reader(&mut cursor), t));
        let (_, mut r) = self.stream(method, path, send)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        Ok(out)
    }

    /// Every item of a list route, following the one list shape
    /// (`{"items": [...], "next": cursor|null}`) page by page.
    pub fn list(&self, path: &str) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = match &after {
                None => path.to_owned(),
                Some(a) => format!("{path}{sep}after={}", encode_query(a)),
            };
            let mut page = self.json("GET", &url, None)?;
            match page.get_mut("items").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(items)) => out.extend(items),
                _ => bail!("GET {path}: the answer is not a list page (no items)"),
            }
            match page.get("next") {
                Some(serde_json::Value::String(n)) => after = Some(n.clone()),
                Some(serde_json::Value::Null) | None => return Ok(out),
                Some(other) => bail!("GET {path}: next is {other}, not a cursor"),
            }
        }
    }

    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let text = self.request(method, path, body)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing the answer to {method} {path}"))
    }
}

/// Percent-encodes `s` for a query value (everything but unreserved bytes).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_goes_over_plain_http_to_a_remote_address() {
        // Refused before any connection is made (192.0.2.1 is TEST-NET-1).
        let c = Client::new("http://192.0.2.1:80", Some("apl_x_y".into()));
        let e = c.request("GET", "/api/v1/version", None).unwrap_err();
        assert!(format!("{e:#}").contains("refusing to send the API token over plain http"));
        let e = c.bytes("GET", "/x", None).unwrap_err();
        assert!(format!("{e:#}").contains("--insecure-http"), "{e:#}");
        for url in [
            "http://127.0.0.1:80",
            "http://localhost:8080",
            "http://[::1]:80",
        ] {
            let c = Client::new(url, Some("apl_x_y".into()));
            assert!(c.auth().unwrap().is_some(), "{url}");
        }
        let c = Client::new("https://192.0.2.1:8443", Some("apl_x_y".into()));
        assert!(c.auth().unwrap().is_some());
        let c = Client::new("http://192.0.2.1", Some("t".into())).allow_plain_token(true);
        assert!(c.auth().unwrap().is_some());
        assert!(Client::new("http://192.0.2.1", None)
            .auth()
            .unwrap()
            .is_none());
    }

    #[test]
    fn roots_come_from_pem_and_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let site =
            crate::tls::SiteTls::load_or_create(d.path(), crate::tls::Subjects::default()).unwrap();
        assert_eq!(roots_from_pem(site.ca_pem.as_bytes()).unwrap().len(), 1);
        assert!(roots_from_pem(b"not pem").is_err());
    }
}
