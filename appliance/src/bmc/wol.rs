//! Wake-on-LAN: the magic packet (6 × `0xff`, then the target's MAC 16
//! times) in one UDP datagram.
//!
//! `power.address` is where to send it: a broadcast address with an
//! optional port (`10.77.0.255`, `10.77.0.255:7`), default
//! `255.255.255.255:9`. The MAC is `power.id`, else the system's first
//! interface ([`super::driver_for_system`] fills it in). Wake-on-LAN can
//! only switch a machine on: `status` is [`PowerState::Unknown`], and `off`,
//! `cycle` and `boot_once` are [`PowerError::Unsupported`]. The packet goes
//! out three times (UDP may drop one; a woken machine ignores the rest).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use super::{BootDevice, PowerDriver, PowerError, PowerState};

/// The default destination: limited broadcast, the discard port.
pub const DEFAULT_TARGET: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, 9));

/// How many copies `on` sends.
const COPIES: usize = 3;

/// The magic packet for `mac`.
pub fn magic_packet(mac: [u8; 6]) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for chunk in p[6..].chunks_exact_mut(6) {
        chunk.copy_from_slice(&mac);
    }
    p
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], PowerError> {
    let bad = || PowerError::Config(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Parses `power.address`: empty → [`DEFAULT_TARGET`], `IP` → port 9.
pub fn parse_target(address: &str) -> Result<SocketAddr, PowerError> {
    let a = address.trim();
    if a.is_empty() {
        return Ok(DEFAULT_TARGET);
    }
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok(sa);
    }
    a.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 9))
        .map_err(|_| {
            PowerError::Config(format!(
                "power.address {a:?}: give a broadcast address, optionally with :port"
            ))
        })
}

/// The Wake-on-LAN driver for one machine.
#[derive(Debug, Clone)]
pub struct Wol {
    target: SocketAddr,
    mac: [u8; 6],
}

impl Wol {
    pub fn new(address: &str, mac: &str) -> Result<Wol, PowerError> {
        if mac.trim().is_empty() {
            return Err(PowerError::Config(
                "wol needs a MAC: set power.id or give the system an interface".into(),
            ));
        }
        Ok(Wol {
            target: parse_target(address)?,
            mac: parse_mac(mac)?,
        })
    }

    fn unsupported(what: &str) -> PowerError {
        PowerError::Unsupported {
            driver: "wol",
            what: what.to_owned(),
        }
    }
}

impl PowerDriver for Wol {
    fn name(&self) -> &'static str {
        "wol"
    }

    fn status(&self) -> Result<PowerState, PowerError> {
        Ok(PowerState::Unknown)
    }

    fn on(&self) -> Result<(), PowerError> {
        let err = |e: std::io::Error| PowerError::Unreachable {
            address: self.target.to_string(),
            detail: format!("sending the magic packet: {e}"),
        };
        let bind: SocketAddr = if self.target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).map_err(err)?;
        sock.set_broadcast(true).map_err(err)?;
        let packet = magic_packet(self.mac);
        for _ in 0..COPIES {
            sock.send_to(&packet, self.target).map_err(err)?;
        }
        Ok(())
    }

    fn off(&self) -> Result<(), PowerError> {
        Err(Self::unsupported("power a machine off"))
    }

    fn cycle(&self) -> Result<(), PowerError> {
        Err(Self::unsupported(
            "power-cycle a machine (it cannot power off; use on)",
        ))
    }

    fn boot_once(&self, _dev: BootDevice) -> Result<(), PowerError> {
        Err(Self::unsupported(
            "set a boot device (the appliance's PXE answer decides what a woken machine boots)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_layout() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let p = magic_packet(mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(&p[6 + 6 * i..12 + 6 * i], &mac);
        }
    }

    #[test]
    fn addresses_and_macs() {
        assert_eq!(parse_target("").unwrap(), DEFAULT_TARGET);
        assert_eq!(
            parse_target("10.77.0.255").unwrap(),
            "10.77.0.255:9".parse().unwrap()
        );
        assert_eq!(
            parse_target("10.77.0.255:7").unwrap(),
            "10.77.0.255:7".parse().unwrap()
        );
        assert!(parse_target("not-an-ip").is_err());
        assert_eq!(
            parse_mac("52-54-00-AB-cd-01").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 1]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0g",
            "525:4:00:ab:cd:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert!(matches!(Wol::new("", ""), Err(PowerError::Config(_))));
    }

    #[test]
    fn sends_the_magic_packet_to_a_loopback_listener() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let w = Wol::new(&addr.to_string(), "52:54:00:12:34:56").unwrap();
        assert_eq!(w.status().unwrap(), PowerState::Unknown);
        w.on().unwrap();
        let mut buf = [0u8; 200];
        let (n, _) = listener.recv_from(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &magic_packet([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])[..]
        );
        assert!(matches!(
            w.off(),
            Err(PowerError::Unsupported { driver: "wol", .. })
        ));
        assert!(matches!(w.cycle(), Err(PowerError::Unsupported { .. })));
        assert!(matches!(
            w.boot_once(BootDevice::Network),
            Err(PowerError::Unsupported { .. })
        ));
    }
}
