//! Boot configuration: what mode to run in and how to reach the network.
//!
//! Four sources, each a list of `key = value` settings with the same keys:
//! `appliance/config.json` on the ESP, `state/boot.json` on the data
//! partition (node state the installer writes, e.g. the uplink a replica
//! was installed through), QEMU fw_cfg `opt/appliance/config` (JSON), and
//! the kernel command line (`appliance.<key>=<value>`). Later sources win:
//! command line over fw_cfg over data state over ESP. Keys:
//!
//! | key | values | default |
//! | --- | --- | --- |
//! | `mode` | `serve`, `agent`, `install` | `serve` |
//! | `server` | `http://…` or `https://…` URL | none |
//! | `uplink` | interface name | first ethernet interface, sorted |
//! | `ip` | `dhcp`, or `<addr>/<prefix>[,<gateway>]` (IPv4) | `dhcp` |
//! | `mgmt` | comma-separated interface names that also get a DHCP address (no default route) | none |
//! | `http_port` | 1–65535 | 80 |
//! | `log` | a `tracing` env-filter directive | `info` |
//!
//! JSON sources are objects whose values are strings, numbers or booleans,
//! e.g. `{"ip": "10.0.0.5/24,10.0.0.1", "http_port": 8080}`. An unknown key
//! is a warning; a bad value falls back to the default and is an error, which
//! init also records as a degraded reason.

use std::fmt;
use std::net::Ipv4Addr;

/// Which job this boot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Agent,
    Install,
}

/// How the uplink gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpConfig {
    Dhcp,
    Static {
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    },
}

/// The resolved configuration init runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub mode: Mode,
    pub server: Option<String>,
    pub uplink: Option<String>,
    pub ip: IpConfig,
    /// Management interfaces: DHCP addresses beside the uplink, no routes.
    pub mgmt: Vec<String>,
    pub http_port: u16,
    pub log: Option<String>,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Serve,
            server: None,
            uplink: None,
            ip: IpConfig::Dhcp,
            mgmt: Vec::new(),
            http_port: 80,
            log: None,
        }
    }
}

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Esp,
    DataState,
    FwCfg,
    Cmdline,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Esp => "ESP config.json",
            Source::DataState => "data partition state/boot.json",
            Source::FwCfg => "fw_cfg opt/appliance/config",
            Source::Cmdline => "kernel command line",
        })
    }
}

/// A problem found while resolving the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Unknown key: logged as a warning.
    Warning(String),
    /// Bad value, replaced by the default: logged as an error and degraded.
    Error(String),
}

/// One setting from one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub source: Source,
}

/// Turns a JSON object into settings. Nested values are rejected.
pub fn settings_from_json(bytes: &[u8], source: Source) -> Result<Vec<Setting>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("{source}: invalid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!("{source}: expected a JSON object"));
    };
    let mut out = Vec::new();
    for (key, v) in map {
        let value = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(format!(
                    "{source}: key {key:?} must be a string, number or boolean, not {other}"
                ))
            }
        };
        out.push(Setting { key, value, source });
    }
    Ok(out)
}

/// Turns `appliance.*` command-line parameters into settings.
pub fn settings_from_cmdline(cmdline: &str) -> Vec<Setting> {
    crate::cmdline::appliance_params(cmdline)
        .into_iter()
        .map(|(key, value)| Setting {
            key,
            value,
            source: Source::Cmdline,
        })
        .collect()
}

/// Resolves settings given lowest priority first: the last setting of a key
/// wins. Never fails; problems are returned beside the result.
pub fn resolve(settings: &[Setting]) -> (BootConfig, Vec<Problem>) {
    let mut cfg = BootConfig::default();
    let mut problems = Vec::new();
    // Keep only the winning setting per key, in first-seen order.
    let mut winners: Vec<&Setting> = Vec::new();
    for s in settings {
        match winners.iter_mut().find(|w| w.key == s.key) {
            Some(w) => *w = s,
            None => winners.push(s),
        }
    }
    for s in winners {
        let bad = |what: &str| {
            Problem::Error(format!(
                "{}: bad value {:?} for {}: {what}; using the default",
                s.source, s.value, s.key
            ))
        };
        match s.key.as_str() {
            "mode" => match s.value.as_str() {
                "serve" => cfg.mode = Mode::Serve,
                "agent" => cfg.mode = Mode::Agent,
                "install" => cfg.mode = Mode::Install,
                _ => problems.push(bad("expected serve, agent or install")),
            },
            "server" => {
                if (s.value.starts_with("http://") || s.value.starts_with("https://"))
                    && s.value.len() > "https://".len()
                {
                    cfg.server = Some(s.value.clone());
                } else {
                    problems.push(bad("expected an http:// or https:// URL"));
                }
            }
            "uplink" => {
                if valid_ifname(&s.value) {
                    cfg.uplink = Some(s.value.clone());
                } else {
                    problems.push(bad("expected an interface name"));
                }
            }
            "mgmt" => {
                let names: Vec<String> = s
                    .value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                if names.iter().all(|n| valid_ifname(n)) {
                    cfg.mgmt = names;
                } else {
                    problems.push(bad("expected comma-separated interface names"));
                }
            }
            "ip" => match parse_ip(&s.value) {
                Ok(ip) => cfg.ip = ip,
                Err(e) => problems.push(bad(&e)),
            },
            "http_port" => match s.value.parse::<u16>() {
                Ok(p) if p != 0 => cfg.http_port = p,
                _ => problems.push(bad("expected a port number 1-65535")),
            },
            "log" => {
                if s.value.is_empty() {
                    problems.push(bad("expected a log filter"));
                } else {
                    cfg.log = Some(s.value.clone());
                }
            }
            _ => problems.push(Problem::Warning(format!(
                "{}: unknown key {:?} ignored",
                s.source, s.key
            ))),
        }
    }
    (cfg, problems)
}

/// Linux interface names: 1–15 bytes, no `/`, whitespace or NUL.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\0' || c.is_whitespace())
}

/// Parses the `ip` value: `dhcp` or `<addr>/<prefix>[,<gateway>]`.
pub fn parse_ip(value: &str) -> Result<IpConfig, String> {
    if value == "dhcp" {
        return Ok(IpConfig::Dhcp);
    }
    let (cidr, gateway) = match value.split_once(',') {
        Some((c, g)) => (c, Some(g)),
        None => (value, None),
    };
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| "expected dhcp or <addr>/<prefix>[,<gateway>]".to_owned())?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length 0-32"))?;
    let gateway = gateway
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .map_err(|_| format!("gateway {g:?} is not an IPv4 address"))
        })
        .transpose()?;
    Ok(IpConfig::Static {
        addr,
        prefix,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(s: &str) -> (BootConfig, Vec<Problem>) {
        resolve(&settings_from_cmdline(s))
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        let (cfg, problems) = cmdline("console=ttyS0 quiet");
        assert_eq!(cfg, BootConfig::default());
        assert!(problems.is_empty());
    }

    #[test]
    fn every_key_parses() {
        let (cfg, problems) = cmdline(
            "appliance.mode=agent appliance.server=http://10.0.0.1:8080 \
             appliance.uplink=enp0s3 appliance.ip=10.0.0.5/24,10.0.0.1 \
             appliance.http_port=8080 appliance.log=debug",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            cfg,
            BootConfig {
                mode: Mode::Agent,
                server: Some("http://10.0.0.1:8080".into()),
                uplink: Some("enp0s3".into()),
                ip: IpConfig::Static {
                    addr: Ipv4Addr::new(10, 0, 0, 5),
                    prefix: 24,
                    gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                },
                mgmt: vec![],
                http_port: 8080,
                log: Some("debug".into()),
            }
        );
    }

    #[test]
    fn static_ip_without_gateway_and_dhcp() {
        assert_eq!(
            parse_ip("192.168.1.2/16"),
            Ok(IpConfig::Static {
                addr: Ipv4Addr::new(192, 168, 1, 2),
                prefix: 16,
                gateway: None
            })
        );
        assert_eq!(parse_ip("dhcp"), Ok(IpConfig::Dhcp));
        assert!(parse_ip("10.0.0.1").is_err());
        assert!(parse_ip("10.0.0.1/33").is_err());
        assert!(parse_ip("10.0.0.1/24,gw").is_err());
    }

    #[test]
    fn bad_values_fall_back_to_defaults_with_errors() {
        let (cfg, problems) = cmdline(
            "appliance.mode=dance appliance.http_port=0 appliance.ip=nope \
             appliance.server=ftp://x appliance.uplink=a/b",
        );
        assert_eq!(cfg, BootConfig::default());
        assert_eq!(problems.len(), 5);
        assert!(problems.iter().all(|p| matches!(p, Problem::Error(_))));
        let Problem::Error(msg) = &problems[0] else {
            unreachable!()
        };
        assert_eq!(
            msg,
            "kernel command line: bad value \"dance\" for mode: expected serve, \
             agent or install; using the default"
        );
    }

    #[test]
    fn unknown_keys_warn() {
        let (cfg, problems) = cmdline("appliance.colour=blue");
        assert_eq!(cfg, BootConfig::default());
        assert_eq!(
            problems,
            vec![Problem::Warning(
                "kernel command line: unknown key \"colour\" ignored".into()
            )]
        );
    }

    #[test]
    fn cmdline_wins_over_fw_cfg_over_esp() {
        let mut settings = settings_from_json(
            br#"{"http_port": 81, "mode": "install", "uplink": "eth9"}"#,
            Source::Esp,
        )
        .unwrap();
        settings.extend(
            settings_from_json(br#"{"http_port": "82", "mode": "agent"}"#, Source::FwCfg).unwrap(),
        );
        settings.extend(settings_from_cmdline("appliance.http_port=83"));
        let (cfg, problems) = resolve(&settings);
        assert!(problems.is_empty());
        assert_eq!(cfg.http_port, 83);
        assert_eq!(cfg.mode, Mode::Agent);
        assert_eq!(cfg.uplink.as_deref(), Some("eth9"));
    }

    #[test]
    fn json_must_be_a_flat_object() {
        assert!(settings_from_json(b"[1]", Source::FwCfg).is_err());
        assert!(settings_from_json(br#"{"ip": {"a": 1}}"#, Source::FwCfg).is_err());
        assert!(settings_from_json(b"{", Source::FwCfg).is_err());
    }

    #[test]
    fn mgmt_interfaces_and_data_state_source() {
        let mut settings = settings_from_json(
            br#"{"uplink": "eth0", "mgmt": "eth2, eth3"}"#,
            Source::DataState,
        )
        .unwrap();
        settings.extend(settings_from_cmdline("appliance.uplink=eth1"));
        let (cfg, problems) = resolve(&settings);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cfg.uplink.as_deref(), Some("eth1"));
        assert_eq!(cfg.mgmt, vec!["eth2".to_string(), "eth3".to_string()]);
        let (cfg, problems) = resolve(&settings_from_cmdline("appliance.mgmt=a/b"));
        assert!(cfg.mgmt.is_empty());
        assert!(
            matches!(&problems[..], [Problem::Error(e)] if e.contains("mgmt")),
            "{problems:?}"
        );
    }
}
