//! The site CA and the API's server certificate (HTTPS with rustls).
//!
//! On first start `appliance serve` creates, under `<data>/state/tls/`:
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `ca.key` | the site CA's private key (ECDSA P-256, PKCS#8 PEM) | 0600 |
//! | `ca.pem` | the site CA certificate (public; served at `GET /api/v1/tls/ca.pem`) | 0644 |
//! | `server.key` | the server certificate's private key (PKCS#8 PEM) | 0600 |
//! | `server.pem` | the server certificate, signed by the site CA | 0644 |
//! | `server.json` | `{"names":[…],"addresses":[…]}`: what `server.pem` covers | 0644 |
//!
//! Every file is written temp + rename. The server certificate names
//! `localhost`, the host name, the names given with `--tls-name`, the host
//! of `--advertise-url`, loopback and every address on the node's
//! interfaces; when that set changes (a new DHCP lease, a network added)
//! [`SiteTls::refresh`] issues a new one and the listener serves it from the
//! next handshake on. The CA is never reissued: its key is what operators
//! and children trust (by the SHA-256 fingerprint printed at start).
//!
//! The CA certificate is rebuilt from its key when needed to sign (rcgen
//! only needs the issuer's name and key): its subject is derived from the
//! key ([`ca_params`]), so a reissued server certificate always chains to
//! the stored `ca.pem`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{write_atomic, Secrecy};

/// Where the TLS files live inside the data directory.
pub const TLS_DIR: &str = "state/tls";

/// Default HTTPS port of the image (beside HTTP on 80).
pub const DEFAULT_TLS_PORT: u16 = 8443;

/// What a server certificate covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subjects {
    pub names: BTreeSet<String>,
    pub addresses: BTreeSet<IpAddr>,
}

impl Subjects {
    /// `localhost`, the host name, loopback, every local address, plus
    /// `extra` (names or addresses).
    pub fn discover(extra: &[String]) -> Subjects {
        let mut s = Subjects::default();
        s.names.insert("localhost".into());
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let h = h.trim();
            if valid_dns_name(h) {
                s.names.insert(h.to_owned());
            }
        }
        s.addresses.insert(IpAddr::from([127, 0, 0, 1]));
        s.addresses.insert("::1".parse().expect("::1"));
        s.addresses.extend(local_addresses());
        for e in extra {
            s.add(e);
        }
        s
    }

    /// Adds a name or an address (names that are no valid DNS names are
    /// skipped: they could not be matched anyway).
    pub fn add(&mut self, name_or_addr: &str) {
        let t = name_or_addr
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if let Ok(ip) = t.parse::<IpAddr>() {
            self.addresses.insert(ip);
        } else if valid_dns_name(t) {
            self.names.insert(t.to_ascii_lowercase());
        } else {
            tracing::warn!(
                name = t,
                "not a DNS name or address; left out of the certificate"
            );
        }
    }
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The host part of a URL (`http://[::1]:80/x` → `::1`).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// This node's unicast addresses: IPv4 from `/proc/net/fib_trie` (the
/// `host LOCAL` entries), IPv6 from `/proc/net/if_inet6` (link-local ones
/// left out: they need a zone no URL names). Missing files give none.
pub fn local_addresses() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    if let Ok(t) = std::fs::read_to_string("/proc/net/fib_trie") {
        out.extend(parse_fib_trie(&t));
    }
    if let Ok(t) = std::fs::read_to_string("/proc/net/if_inet6") {
        out.extend(parse_if_inet6(&t));
    }
    out
}

fn parse_fib_trie(text: &str) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(a) = l.strip_prefix("|-- ") {
            last = a.trim().parse().ok();
        } else if l.starts_with("/32 host LOCAL") {
            if let Some(ip) = last {
                out.insert(ip);
            }
        }
    }
    out
}

fn parse_if_inet6(text: &str) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bytes) = hex::decode(hex) else {
            continue;
        };
        let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice()) else {
            continue;
        };
        let ip = std::net::Ipv6Addr::from(b);
        if ip.segments()[0] & 0xffc0 == 0xfe80 {
            continue;
        }
        out.insert(IpAddr::V6(ip));
    }
    out
}

/// The SHA-256 fingerprint of a DER certificate as `AB:CD:…` (what
/// `openssl x509 -noout -fingerprint -sha256` prints).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The DER certificates in a PEM text; none is an error.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e:?}"))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM text");
    Ok(certs)
}

/// The site CA's parameters, derived from its key alone (so the issuer can
/// be rebuilt to sign without parsing `ca.pem`).
fn ca_params(key: &KeyPair) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    let id = hex::encode(&Sha256::digest(key.public_key_der())[..8]);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "appliance site");
    dn.push(DnType::CommonName, format!("appliance site CA {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Appliances boot offline, often with a wrong clock: a validity from
    // 2024 to 2100 keeps a clock that is behind or ahead working.
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(p)
}

fn server_params(s: &Subjects) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).context("server parameters")?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "appliance site");
    let cn = s
        .names
        .iter()
        .find(|n| n.as_str() != "localhost")
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    for n in &s.names {
        p.subject_alt_names.push(SanType::DnsName(
            n.clone()
                .try_into()
                .with_context(|| format!("DNS name {n:?}"))?,
        ));
    }
    for a in &s.addresses {
        p.subject_alt_names.push(SanType::IpAddress(*a));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(p)
}

/// The site CA and the current server certificate; hands rustls the
/// certificate to serve.
#[derive(Debug)]
pub struct SiteTls {
    dir: PathBuf,
    ca_key: KeyPair,
    /// `ca.pem` as stored.
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    subjects: RwLock<Subjects>,
    current: Arc<Resolver>,
}

#[derive(Debug)]
struct Resolver(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<rustls::sign::CertifiedKey> {
    use rustls::pki_types::pem::PemObject;
    let certs = certs_from_pem(cert_pem.as_bytes())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("server key: {e:?}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .context("loading the server key")?;
    Ok(rustls::sign::CertifiedKey::new(certs, signing))
}

fn read_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl SiteTls {
    /// Loads the site CA and server certificate under `<data>/state/tls`,
    /// creating what is missing, and reissues the server certificate when
    /// it does not cover `subjects`.
    pub fn load_or_create(data: &Path, subjects: Subjects) -> Result<SiteTls> {
        let dir = data.join(TLS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ca_key, ca_pem, new_ca) = match read_opt(&dir.join("ca.key"))? {
            Some(k) => {
                let key = KeyPair::from_pem(&k)
                    .with_context(|| format!("parsing {}", dir.join("ca.key").display()))?;
                match read_opt(&dir.join("ca.pem"))? {
                    Some(pem) => (key, pem, false),
                    None => {
                        // Crashed between the two writes: same key, same name.
                        let pem = ca_params(&key)?.self_signed(&key)?.pem();
                        write_atomic(&dir.join("ca.pem"), pem.as_bytes(), true, Secrecy::Public)?;
                        (key, pem, false)
                    }
                }
            }
            None => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .context("generating the site CA key")?;
                let pem = ca_params(&key)?.self_signed(&key)?.pem();
                write_atomic(
                    &dir.join("ca.key"),
                    key.serialize_pem().as_bytes(),
                    true,
                    Secrecy::Secret,
                )?;
                write_atomic(&dir.join("ca.pem"), pem.as_bytes(), true, Secrecy::Public)?;
                tracing::info!(dir = %dir.display(), "created the site CA");
                (key, pem, true)
            }
        };
        let ca_der = certs_from_pem(ca_pem.as_bytes())
            .with_context(|| format!("parsing {}", dir.join("ca.pem").display()))?
            .remove(0);
        let stored: Option<Subjects> =
            read_opt(&dir.join("server.json"))?.and_then(|t| serde_json::from_str(&t).ok());
        let cert = read_opt(&dir.join("server.pem"))?;
        let key = read_opt(&dir.join("server.key"))?;
        let reuse = match (&stored, &cert, &key) {
            (Some(s), Some(c), Some(k)) if !new_ca && *s == subjects => certified_key(c, k).ok(),
            _ => None,
        };
        let ck = match reuse {
            Some(ck) => ck,
            None => issue(&dir, &ca_key, &subjects)?,
        };
        Ok(SiteTls {
            dir,
            ca_key,
            ca_pem,
            ca_der,
            subjects: RwLock::new(subjects),
            current: Arc::new(Resolver(RwLock::new(Arc::new(ck)))),
        })
    }

    /// The CA's SHA-256 fingerprint (`AB:CD:…`).
    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    /// What the current server certificate covers.
    pub fn subjects(&self) -> Subjects {
        self.subjects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Issues a new server certificate when `subjects` differ from what the
    /// current one covers; later handshakes get it. Returns whether it did.
    pub fn refresh(&self, subjects: Subjects) -> Result<bool> {
        if self.subjects() == subjects {
            return Ok(false);
        }
        let ck = issue(&self.dir, &self.ca_key, &subjects)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        *self.subjects.write().unwrap_or_else(|e| e.into_inner()) = subjects;
        Ok(true)
    }

    /// A rustls server configuration (TLS 1.2 and 1.3, HTTP/1.1) that
    /// serves the current certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// `GET /api/v1/tls/ca.pem`: the site CA certificate (public data), for
/// operators to fetch and compare with the fingerprint the server printed.
pub fn routes(data: PathBuf) -> Vec<crate::http::Route> {
    use crate::http::{Guard, Route};
    vec![Route::get(
        "/api/v1/tls/ca.pem",
        Guard::Public,
        "The site CA certificate (PEM) the HTTPS listener's certificate chains to",
    )
    .response("text")
    .to(ca_pem, Arc::new(data))]
}

async fn ca_pem(
    axum::extract::State(data): axum::extract::State<Arc<PathBuf>>,
) -> Result<axum::response::Response, crate::api::ApiError> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let path = data.join(TLS_DIR).join("ca.pem");
    match tokio::fs::read(&path).await {
        Ok(pem) => Ok((
            [
                (header::CONTENT_TYPE, "application/x-pem-file"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            pem,
        )
            .into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(crate::api::ApiError::new(
            StatusCode::NOT_FOUND,
            "no_tls",
            "this node has no site CA (serve runs without --listen-tls)",
        )),
        Err(e) => Err(crate::api::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "tls_unreadable",
            format!("reading the site CA: {e}"),
        )),
    }
}

/// Issues and stores a server certificate for `subjects`.
fn issue(dir: &Path, ca_key: &KeyPair, subjects: &Subjects) -> Result<rustls::sign::CertifiedKey> {
    let issuer = ca_params(ca_key)?.self_signed(ca_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the server key")?;
    let cert = server_params(subjects)?
        .signed_by(&key, &issuer, ca_key)
        .context("signing the server certificate")?;
    let key_pem = key.serialize_pem();
    let cert_pem = cert.pem();
    // server.json is emptied first and completed last: a crash in between
    // leaves a server.json that names nothing, and the next start reissues.
    write_atomic(&dir.join("server.json"), b"{}\n", true, Secrecy::Public)?;
    write_atomic(
        &dir.join("server.key"),
        key_pem.as_bytes(),
        true,
        Secrecy::Secret,
    )?;
    write_atomic(
        &dir.join("server.pem"),
        cert_pem.as_bytes(),
        true,
        Secrecy::Public,
    )?;
    let mut json = serde_json::to_vec_pretty(subjects).context("encoding server.json")?;
    json.push(b'\n');
    write_atomic(&dir.join("server.json"), &json, true, Secrecy::Public)?;
    tracing::info!(names = ?subjects.names, addresses = ?subjects.addresses, "issued the server certificate");
    certified_key(&cert_pem, &key_pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    fn subjects(extra: &[&str]) -> Subjects {
        let mut s = Subjects::default();
        s.names.insert("localhost".into());
        s.addresses.insert(IpAddr::from([127, 0, 0, 1]));
        for e in extra {
            s.add(e);
        }
        s
    }

    #[test]
    fn creates_once_keeps_the_ca_and_reissues_on_new_addresses() {
        let d = tempfile::tempdir().unwrap();
        let a = SiteTls::load_or_create(d.path(), subjects(&[])).unwrap();
        let tls = d.path().join(TLS_DIR);
        for (f, mode) in [
            ("ca.key", 0o600),
            ("server.key", 0o600),
            ("ca.pem", 0o644),
            ("server.pem", 0o644),
        ] {
            let m = std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
            if mode == 0o600 {
                assert_eq!(m, 0o600, "{f}");
            } else {
                assert_eq!(m & 0o077, m & 0o044, "{f} is not writable by others");
            }
        }
        let server1 = std::fs::read(tls.join("server.pem")).unwrap();
        // Same subjects: nothing reissued.
        let b = SiteTls::load_or_create(d.path(), subjects(&[])).unwrap();
        assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
        assert_eq!(std::fs::read(tls.join("server.pem")).unwrap(), server1);
        // A new address: a new server certificate, the same CA.
        let c = SiteTls::load_or_create(d.path(), subjects(&["10.77.0.1"])).unwrap();
        assert_eq!(a.ca_fingerprint(), c.ca_fingerprint());
        assert_ne!(std::fs::read(tls.join("server.pem")).unwrap(), server1);
        let stored: Subjects =
            serde_json::from_slice(&std::fs::read(tls.join("server.json")).unwrap()).unwrap();
        assert!(stored.addresses.contains(&"10.77.0.1".parse().unwrap()));
        assert!(c.refresh(subjects(&["10.77.0.1"])).is_ok_and(|x| !x));
        assert!(c.refresh(subjects(&["host.example"])).unwrap());
        assert!(c.subjects().names.contains("host.example"));
    }

    #[test]
    fn the_server_certificate_verifies_against_the_site_ca_only() {
        let d = tempfile::tempdir().unwrap();
        let site = SiteTls::load_or_create(d.path(), subjects(&["10.77.0.1"])).unwrap();
        let other = tempfile::tempdir().unwrap();
        let other = SiteTls::load_or_create(other.path(), subjects(&[])).unwrap();
        let chain =
            certs_from_pem(&std::fs::read(d.path().join(TLS_DIR).join("server.pem")).unwrap())
                .unwrap();
        let verify = |ca: &SiteTls, name: &str| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca_der.clone()).unwrap();
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            v.verify_server_cert(
                &chain[0],
                &[],
                &rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
        };
        verify(&site, "10.77.0.1").unwrap();
        verify(&site, "localhost").unwrap();
        assert!(
            verify(&site, "10.77.0.2").is_err(),
            "a name it does not cover"
        );
        assert!(verify(&other, "10.77.0.1").is_err(), "another site's CA");
    }

    #[test]
    fn parses_local_addresses_and_url_hosts() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     |-- 10.0.2.15\n        /32 host LOCAL\n     |-- 10.0.2.255\n        /32 link BROADCAST\n";
        assert_eq!(
            parse_fib_trie(fib).into_iter().collect::<Vec<_>>(),
            vec!["10.0.2.15".parse::<IpAddr>().unwrap()]
        );
        let v6 = "00000000000000000000000000000001 01 80 10 80       lo\nfe800000000000000000000000000001 02 40 20 80 eth0\n20010db8000000000000000000000002 02 40 00 80 eth0\n";
        let got: Vec<String> = parse_if_inet6(v6).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, vec!["::1", "2001:db8::2"]);
        assert_eq!(url_host("https://[::1]:8443/x").as_deref(), Some("::1"));
        assert_eq!(url_host("http://host.lan:80").as_deref(), Some("host.lan"));
        assert_eq!(url_host("10.0.0.1").as_deref(), Some("10.0.0.1"));
        let mut s = Subjects::default();
        s.add("bad name\n");
        assert_eq!(s, Subjects::default());
    }
}
