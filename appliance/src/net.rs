//! Network bring-up: interface discovery through sysfs, link/address/route
//! changes through rtnetlink, and the uplink's address from DHCP
//! ([`crate::dhcp::client`]) or the static `ip` setting.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::config::IpConfig;

/// `ARPHRD_ETHER` in `/sys/class/net/<if>/type`.
const ARPHRD_ETHER: &str = "1";

/// Ethernet interfaces under `sys_net` (normally `/sys/class/net`), sorted.
pub fn list_ethernet(sys_net: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(sys_net) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ty = std::fs::read_to_string(e.path().join("type")).ok()?;
            (name != "lo" && ty.trim() == ARPHRD_ETHER).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Picks the uplink: the configured one if present, else the first sorted.
pub fn choose_uplink(ifaces: &[String], configured: Option<&str>) -> Option<String> {
    match configured {
        Some(name) => ifaces.iter().find(|i| *i == name).cloned(),
        None => ifaces.first().cloned(),
    }
}

/// Waits until an ethernet interface (or the configured uplink) appears,
/// then a little longer for its siblings; returns what is there.
pub fn wait_for_ethernet(sys_net: &Path, uplink: Option<&str>, timeout: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let found = list_ethernet(sys_net);
        let ready = match uplink {
            Some(name) => found.iter().any(|i| i == name),
            None => !found.is_empty(),
        };
        if ready || start.elapsed() >= timeout {
            if ready && uplink.is_none() {
                // Multi-NIC machines probe NICs one by one.
                std::thread::sleep(Duration::from_millis(300));
                return list_ethernet(sys_net);
            }
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A connection to the kernel's routing netlink.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the netlink socket; must be called inside a tokio runtime.
    pub fn open() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The interface index of `name`.
    pub async fn index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = links
            .try_next()
            .await
            .with_context(|| format!("looking up interface {name}"))?
            .ok_or_else(|| anyhow!("interface {name} not found"))?;
        Ok(link.header.index)
    }

    /// Sets `name` up.
    pub async fn link_up(&self, name: &str) -> Result<u32> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting {name} up"))?;
        Ok(index)
    }

    /// Adds `addr/prefix` to the interface.
    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(()), // EEXIST
            Err(e) => Err(e).with_context(|| format!("adding {addr}/{prefix}")),
        }
    }

    /// Adds the default route via `gateway` on the interface.
    pub async fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .gateway(gateway)
            .build();
        match self.handle.route().add(route).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding default route via {gateway}")),
        }
    }
}

/// What the network ended up as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub iface: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// Brings up `lo`, every ethernet interface, and configures the uplink.
/// Returns the uplink, plus reasons for anything that went wrong on the way.
pub async fn bring_up(
    uplink: Option<&str>,
    ip: &IpConfig,
    mgmt: &[String],
    dhcp_total: Duration,
) -> (Option<Uplink>, Vec<String>) {
    let mut problems = Vec::new();
    let nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => return (None, vec![format!("{e:#}")]),
    };
    if let Err(e) = nl.link_up("lo").await {
        problems.push(format!("{e:#}"));
    }
    let sys_net = Path::new("/sys/class/net");
    let wanted = uplink.map(str::to_owned);
    let ifaces = tokio::task::spawn_blocking(move || {
        wait_for_ethernet(sys_net, wanted.as_deref(), Duration::from_secs(5))
    })
    .await
    .unwrap_or_default();
    tracing::info!(?ifaces, "ethernet interfaces");
    for name in &ifaces {
        if let Err(e) = nl.link_up(name).await {
            problems.push(format!("{e:#}"));
        }
    }
    let Some(iface) = choose_uplink(&ifaces, uplink) else {
        problems.push(match uplink {
            Some(name) => format!("uplink {name} not found (have {ifaces:?})"),
            None => "no ethernet interface found".to_owned(),
        });
        return (None, problems);
    };
    problems.extend(spawn_mgmt(&ifaces, mgmt, &iface, dhcp_total));
    match configure(&nl, &iface, ip, dhcp_total, true).await {
        Ok(up) => (Some(up), problems),
        Err(e) => {
            problems.push(format!("configuring {iface}: {e:#}"));
            (None, problems)
        }
    }
}

/// Management interfaces get a DHCP address beside the uplink (no default
/// route), in the background. Returns problems found on the way.
fn spawn_mgmt(
    ifaces: &[String],
    mgmt: &[String],
    uplink: &str,
    dhcp_total: Duration,
) -> Vec<String> {
    let mut problems = Vec::new();
    for m in mgmt.iter().filter(|m| **m != uplink) {
        if !ifaces.contains(m) {
            problems.push(format!(
                "management interface {m} not found (have {ifaces:?})"
            ));
            continue;
        }
        let m = m.clone();
        tokio::spawn(async move {
            let Ok(nl) = Netlink::open() else { return };
            match configure(&nl, &m, &IpConfig::Dhcp, dhcp_total, false).await {
                Ok(up) => crate::console::marker(&format!(
                    "management up {} {}/{}",
                    up.iface, up.addr, up.prefix
                )),
                Err(e) => tracing::error!("configuring management interface {m}: {e:#}"),
            }
        });
    }
    problems
}

/// Configures management interfaces after the uplink `uplink` is up.
pub async fn bring_up_mgmt(mgmt: &[String], uplink: &str, dhcp_total: Duration) -> Vec<String> {
    let ifaces = tokio::task::spawn_blocking(|| {
        wait_for_ethernet(Path::new("/sys/class/net"), None, Duration::from_secs(1))
    })
    .await
    .unwrap_or_default();
    spawn_mgmt(&ifaces, mgmt, uplink, dhcp_total)
}

async fn configure(
    nl: &Netlink,
    iface: &str,
    ip: &IpConfig,
    dhcp_total: Duration,
    default_route: bool,
) -> Result<Uplink> {
    let index = nl.index(iface).await?;
    let (addr, prefix, gateway) = match ip {
        IpConfig::Static {
            addr,
            prefix,
            gateway,
        } => (*addr, *prefix, *gateway),
        IpConfig::Dhcp => {
            let mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
                .with_context(|| format!("reading the MAC address of {iface}"))?;
            let mac = parse_mac(&mac_text)
                .ok_or_else(|| anyhow!("bad MAC address {mac_text:?} on {iface}"))?;
            let name = iface.to_owned();
            let lease = tokio::task::spawn_blocking(move || {
                crate::dhcp::client::acquire(&name, mac, dhcp_total)
            })
            .await
            .context("joining the DHCP task")??;
            if !default_route {
                nl.add_address(index, lease.addr, lease.prefix).await?;
                return Ok(Uplink {
                    iface: iface.to_owned(),
                    addr: lease.addr,
                    prefix: lease.prefix,
                });
            }
            if let Some(text) = crate::dhcp::client::resolv_conf(&lease) {
                let _ = std::fs::create_dir_all("/etc");
                if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
                    tracing::warn!(error = %e, "writing /etc/resolv.conf failed");
                }
            }
            (lease.addr, lease.prefix, lease.router)
        }
    };
    nl.add_address(index, addr, prefix).await?;
    if let Some(gw) = gateway {
        nl.add_default_route(index, gw).await?;
    }
    Ok(Uplink {
        iface: iface.to_owned(),
        addr,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56\n"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn ethernet_listing_is_sorted_and_skips_lo_and_non_ether() {
        let dir = tempfile::tempdir().unwrap();
        for (name, ty) in [
            ("lo", "772"),
            ("lo2", "1"),
            ("eth1", "1"),
            ("eth0", "1"),
            ("wg0", "65534"),
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("type"), format!("{ty}\n")).unwrap();
        }
        let found = list_ethernet(dir.path());
        assert_eq!(found, vec!["eth0", "eth1", "lo2"]);
        assert_eq!(choose_uplink(&found, None).as_deref(), Some("eth0"));
        assert_eq!(choose_uplink(&found, Some("eth1")).as_deref(), Some("eth1"));
        assert_eq!(choose_uplink(&found, Some("eth7")), None);
        assert_eq!(
            wait_for_ethernet(dir.path(), Some("eth7"), Duration::from_millis(150)),
            found
        );
    }
}
