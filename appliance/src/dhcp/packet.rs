//! DHCPv4 wire format shared by the client and the server: a strict,
//! allocation-free parser for BOOTP/DHCP packets ([`Packet`]) and a reply
//! builder ([`Builder`]).
//!
//! The parser is the first thing hostile input meets, so it checks every
//! length before reading: the fixed header, the magic cookie, each option's
//! length against the end of the packet, and the length of the fixed-size
//! options the server relies on. A packet that fails any check is rejected
//! as a whole with a [`PacketError`] naming the problem. Option overload
//! (option 52, options in `sname`/`file`) is not supported: such options are
//! ignored. When an option appears twice the first occurrence wins.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The DHCP magic cookie (RFC 2131 §3).
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Length of the fixed BOOTP header, before the cookie.
pub const HEADER_LEN: usize = 236;
/// Smallest packet we accept: the header plus the cookie.
pub const MIN_LEN: usize = HEADER_LEN + 4;
/// Largest packet we accept (an Ethernet MTU).
pub const MAX_LEN: usize = 1500;
/// BOOTP minimum message size; we pad what we send to it (RFC 1542 §3.3).
pub const MIN_SEND: usize = 300;
/// Offset of the `file` field in the header.
const FILE_OFFSET: usize = 108;
/// Offset of the `sname` field in the header.
const SNAME_OFFSET: usize = 44;

/// Option codes used here (RFC 2132, 3004, 4578 and iPXE's).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const VENDOR_OPTS: u8 = 43;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MSG_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAM_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const VENDOR_CLASS: u8 = 60;
    pub const CLIENT_ID: u8 = 61;
    pub const TFTP_SERVER: u8 = 66;
    pub const BOOTFILE: u8 = 67;
    pub const USER_CLASS: u8 = 77;
    pub const CLIENT_ARCH: u8 = 93;
    pub const CLIENT_NDI: u8 = 94;
    pub const CLIENT_UUID: u8 = 97;
    /// iPXE's encapsulated options.
    pub const IPXE_ENCAP: u8 = 175;
    /// iPXE sub-option: skip waiting for proxyDHCP (`DHCP_EB_NO_PXEDHCP`).
    pub const IPXE_NO_PXEDHCP: u8 = 176;
    pub const END: u8 = 255;
}

/// BOOTP op codes.
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
/// Hardware type Ethernet.
pub const HTYPE_ETHER: u8 = 1;
/// The broadcast bit of the `flags` field.
pub const FLAG_BROADCAST: u16 = 0x8000;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex pairs separated by ':' or '-')")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(|| BadMac(s.to_owned()))?;
            if p.len() != 2 {
                return Err(BadMac(s.to_owned()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// DHCP message types (option 53).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<Self> {
        use MessageType::*;
        Some(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }
}

/// Why bytes are not an acceptable DHCP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than a BOOTP header with magic cookie ({MIN_LEN})")]
    TooShort(usize),
    #[error("packet of {0} bytes is larger than {MAX_LEN}")]
    TooLong(usize),
    #[error("missing DHCP magic cookie")]
    NoMagic,
    #[error("option {code} at offset {at} runs past the end of the packet")]
    OptionOverrun { code: u8, at: usize },
    #[error("option {code} has length {len}, expected {want}")]
    OptionLength { code: u8, len: usize, want: usize },
    #[error("op {0} is not BOOTREQUEST")]
    NotRequest(u8),
    #[error("op {0} is not BOOTREPLY")]
    NotReply(u8),
    #[error("hardware type {htype} length {hlen} is not Ethernet")]
    NotEthernet { htype: u8, hlen: u8 },
    #[error("no DHCP message type option")]
    NoMessageType,
    #[error("unknown DHCP message type {0}")]
    BadMessageType(u8),
}

/// A parsed packet borrowing its bytes. Option values are slices into it.
#[derive(Clone)]
pub struct Packet<'a> {
    raw: &'a [u8],
    /// (offset of the value, length) per option code; length 0 with offset
    /// 0 means absent (a present empty option has a non-zero offset).
    index: [(u16, u8); 256],
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

impl<'a> Packet<'a> {
    /// Parses the header, cookie and option layout; checks nothing about
    /// op, hardware type or message type (see [`parse_request`]).
    pub fn parse(raw: &'a [u8]) -> Result<Self, PacketError> {
        if raw.len() < MIN_LEN {
            return Err(PacketError::TooShort(raw.len()));
        }
        if raw.len() > MAX_LEN {
            return Err(PacketError::TooLong(raw.len()));
        }
        if raw[HEADER_LEN..MIN_LEN] != MAGIC {
            return Err(PacketError::NoMagic);
        }
        let mut index = [(0u16, 0u8); 256];
        let mut at = MIN_LEN;
        while at < raw.len() {
            let code = raw[at];
            match code {
                opt::PAD => at += 1,
                opt::END => break,
                _ => {
                    let Some(&len) = raw.get(at + 1) else {
                        return Err(PacketError::OptionOverrun { code, at });
                    };
                    let start = at + 2;
                    let end = start + len as usize;
                    if end > raw.len() {
                        return Err(PacketError::OptionOverrun { code, at });
                    }
                    let slot = &mut index[code as usize];
                    if slot.0 == 0 {
                        // raw.len() <= MAX_LEN < u16::MAX
                        *slot = (start as u16, len);
                    }
                    at = end;
                }
            }
        }
        let p = Packet { raw, index };
        for (code, want) in [
            (opt::MSG_TYPE, 1),
            (opt::REQUESTED_IP, 4),
            (opt::SERVER_ID, 4),
            (opt::SUBNET_MASK, 4),
            (opt::LEASE_TIME, 4),
            (opt::MAX_SIZE, 2),
        ] {
            if let Some(v) = p.option(code) {
                if v.len() != want {
                    return Err(PacketError::OptionLength {
                        code,
                        len: v.len(),
                        want,
                    });
                }
            }
        }
        if let Some(v) = p.option(opt::MSG_TYPE) {
            if MessageType::from_u8(v[0]).is_none() {
                return Err(PacketError::BadMessageType(v[0]));
            }
        }
        Ok(p)
    }

    pub fn op(&self) -> u8 {
        self.raw[0]
    }
    pub fn htype(&self) -> u8 {
        self.raw[1]
    }
    pub fn hlen(&self) -> u8 {
        self.raw[2]
    }
    pub fn xid(&self) -> u32 {
        u32::from_be_bytes([self.raw[4], self.raw[5], self.raw[6], self.raw[7]])
    }
    pub fn flags(&self) -> u16 {
        u16::from_be_bytes([self.raw[10], self.raw[11]])
    }
    pub fn broadcast(&self) -> bool {
        self.flags() & FLAG_BROADCAST != 0
    }
    pub fn ciaddr(&self) -> Ipv4Addr {
        ip_at(self.raw, 12)
    }
    pub fn yiaddr(&self) -> Ipv4Addr {
        ip_at(self.raw, 16)
    }
    pub fn siaddr(&self) -> Ipv4Addr {
        ip_at(self.raw, 20)
    }
    pub fn giaddr(&self) -> Ipv4Addr {
        ip_at(self.raw, 24)
    }
    /// The first six bytes of `chaddr`.
    pub fn mac(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.raw[28..34]);
        MacAddr(m)
    }
    /// The whole 16-byte `chaddr` field.
    pub fn chaddr(&self) -> &'a [u8] {
        &self.raw[28..44]
    }
    /// The `file` field up to its first NUL.
    pub fn file(&self) -> &'a [u8] {
        let f = &self.raw[FILE_OFFSET..FILE_OFFSET + 128];
        &f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())]
    }

    /// The value of option `code`, if present.
    pub fn option(&self, code: u8) -> Option<&'a [u8]> {
        let (start, len) = self.index[code as usize];
        (start != 0).then(|| &self.raw[start as usize..start as usize + len as usize])
    }

    pub fn msg_type(&self) -> Option<MessageType> {
        self.option(opt::MSG_TYPE)
            .and_then(|v| MessageType::from_u8(v[0]))
    }
    fn option_ip(&self, code: u8) -> Option<Ipv4Addr> {
        self.option(code).map(|v| ip_at(v, 0))
    }
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.option_ip(opt::REQUESTED_IP)
    }
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.option_ip(opt::SERVER_ID)
    }
    pub fn subnet_mask(&self) -> Option<Ipv4Addr> {
        self.option_ip(opt::SUBNET_MASK)
    }
    pub fn lease_time(&self) -> Option<u32> {
        self.option(opt::LEASE_TIME)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
    /// Option 93's first architecture type.
    pub fn client_arch(&self) -> Option<u16> {
        self.option(opt::CLIENT_ARCH)
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
    }
    /// The packet's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.raw
    }
}

/// Parses a packet a server received: a BOOTREQUEST from an Ethernet
/// client carrying a known DHCP message type.
pub fn parse_request(raw: &[u8]) -> Result<Packet<'_>, PacketError> {
    let p = Packet::parse(raw)?;
    if p.op() != BOOTREQUEST {
        return Err(PacketError::NotRequest(p.op()));
    }
    if p.htype() != HTYPE_ETHER || p.hlen() != 6 {
        return Err(PacketError::NotEthernet {
            htype: p.htype(),
            hlen: p.hlen(),
        });
    }
    if p.option(opt::MSG_TYPE).is_none() {
        return Err(PacketError::NoMessageType);
    }
    Ok(p)
}

/// Builds a packet field by field; options are appended in call order.
#[derive(Clone, Debug)]
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    /// A BOOTREPLY answering `req`: same xid, flags, giaddr and chaddr,
    /// carrying message type `kind` as its first option.
    pub fn reply(req: &Packet<'_>, kind: MessageType) -> Self {
        let mut buf = vec![0u8; MIN_LEN];
        buf[0] = BOOTREPLY;
        buf[1] = req.htype();
        buf[2] = req.hlen();
        buf[4..8].copy_from_slice(&req.raw[4..8]);
        buf[10..12].copy_from_slice(&req.raw[10..12]);
        buf[24..28].copy_from_slice(&req.raw[24..28]);
        buf[28..44].copy_from_slice(req.chaddr());
        buf[HEADER_LEN..MIN_LEN].copy_from_slice(&MAGIC);
        let mut b = Builder { buf };
        b.option(opt::MSG_TYPE, &[kind as u8]);
        b
    }

    /// A BOOTREQUEST from `mac` (broadcast flag set), message type `kind`.
    pub fn request(xid: u32, mac: MacAddr, kind: MessageType) -> Self {
        let mut buf = vec![0u8; MIN_LEN];
        buf[0] = BOOTREQUEST;
        buf[1] = HTYPE_ETHER;
        buf[2] = 6;
        buf[4..8].copy_from_slice(&xid.to_be_bytes());
        buf[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
        buf[28..34].copy_from_slice(&mac.0);
        buf[HEADER_LEN..MIN_LEN].copy_from_slice(&MAGIC);
        let mut b = Builder { buf };
        b.option(opt::MSG_TYPE, &[kind as u8]);
        b
    }

    fn set_ip(&mut self, at: usize, ip: Ipv4Addr) -> &mut Self {
        self.buf[at..at + 4].copy_from_slice(&ip.octets());
        self
    }
    pub fn ciaddr(&mut self, ip: Ipv4Addr) -> &mut Self {
        self.set_ip(12, ip)
    }
    pub fn yiaddr(&mut self, ip: Ipv4Addr) -> &mut Self {
        self.set_ip(16, ip)
    }
    pub fn siaddr(&mut self, ip: Ipv4Addr) -> &mut Self {
        self.set_ip(20, ip)
    }
    pub fn flags(&mut self, flags: u16) -> &mut Self {
        self.buf[10..12].copy_from_slice(&flags.to_be_bytes());
        self
    }
    /// Sets the `file` field; a name that does not fit (127 bytes and a
    /// NUL) is left out, and the caller sends it as option 67 only.
    pub fn file(&mut self, name: &str) -> &mut Self {
        if name.len() < 128 {
            self.buf[FILE_OFFSET..FILE_OFFSET + 128].fill(0);
            self.buf[FILE_OFFSET..FILE_OFFSET + name.len()].copy_from_slice(name.as_bytes());
        }
        self
    }
    /// Sets the `sname` field (left out when longer than 63 bytes).
    pub fn sname(&mut self, name: &str) -> &mut Self {
        if name.len() < 64 {
            self.buf[SNAME_OFFSET..SNAME_OFFSET + 64].fill(0);
            self.buf[SNAME_OFFSET..SNAME_OFFSET + name.len()].copy_from_slice(name.as_bytes());
        }
        self
    }
    /// Appends option `code`; values longer than 255 bytes are split into
    /// consecutive instances (RFC 3396).
    pub fn option(&mut self, code: u8, value: &[u8]) -> &mut Self {
        if value.is_empty() {
            self.buf.extend_from_slice(&[code, 0]);
        }
        for chunk in value.chunks(255) {
            self.buf.push(code);
            self.buf.push(chunk.len() as u8);
            self.buf.extend_from_slice(chunk);
        }
        self
    }
    pub fn option_ip(&mut self, code: u8, ip: Ipv4Addr) -> &mut Self {
        self.option(code, &ip.octets())
    }
    pub fn option_ips(&mut self, code: u8, ips: &[Ipv4Addr]) -> &mut Self {
        let v: Vec<u8> = ips.iter().flat_map(|ip| ip.octets()).collect();
        self.option(code, &v)
    }
    pub fn option_u32(&mut self, code: u8, v: u32) -> &mut Self {
        self.option(code, &v.to_be_bytes())
    }
    /// Ends the options and pads to [`MIN_SEND`] bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        out.push(opt::END);
        if out.len() < MIN_SEND {
            out.resize(MIN_SEND, 0);
        }
        out
    }
}

/// Prefix length of a contiguous subnet mask, `None` when not contiguous.
pub fn mask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0).then_some(prefix as u8)
}

/// The subnet mask of a prefix length (0..=32).
pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let p = u32::from(prefix.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn discover() -> Vec<u8> {
        let mut b = Builder::request(0xdead_beef, MAC, MessageType::Discover);
        b.option(opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001");
        b.finish()
    }

    #[test]
    fn request_round_trips_and_is_padded() {
        let bytes = discover();
        assert_eq!(bytes.len(), MIN_SEND);
        let p = parse_request(&bytes).unwrap();
        assert_eq!(p.xid(), 0xdead_beef);
        assert_eq!(p.mac(), MAC);
        assert!(p.broadcast());
        assert_eq!(p.msg_type(), Some(MessageType::Discover));
        assert_eq!(
            p.option(opt::VENDOR_CLASS),
            Some(&b"PXEClient:Arch:00000:UNDI:002001"[..])
        );
        assert_eq!(p.option(opt::USER_CLASS), None);
    }

    #[test]
    fn dhcproto_reads_what_we_build() {
        use dhcproto::{Decodable, Decoder};
        let req = discover();
        let p = parse_request(&req).unwrap();
        let mut b = Builder::reply(&p, MessageType::Offer);
        b.yiaddr(Ipv4Addr::new(10, 0, 0, 5))
            .siaddr(Ipv4Addr::new(10, 0, 0, 1))
            .file("undionly.kpxe")
            .option_ip(opt::SERVER_ID, Ipv4Addr::new(10, 0, 0, 1))
            .option(opt::BOOTFILE, &[b'x'; 300]);
        let bytes = b.finish();
        let m = dhcproto::v4::Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(m.xid(), 0xdead_beef);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 0, 5));
        // dhcproto keeps the terminating NUL.
        assert!(m.fname().unwrap().starts_with(b"undionly.kpxe"));
        assert_eq!(m.opts().msg_type(), Some(dhcproto::v4::MessageType::Offer));
    }

    #[test]
    fn hostile_packets_are_rejected() {
        let good = discover();
        assert_eq!(
            parse_request(&good[..100]).err(),
            Some(PacketError::TooShort(100))
        );
        assert_eq!(
            parse_request(&vec![0u8; 2000]).err(),
            Some(PacketError::TooLong(2000))
        );
        let mut b = good.clone();
        b[236] = 0;
        assert_eq!(parse_request(&b).err(), Some(PacketError::NoMagic));
        let mut b = good.clone();
        b[0] = BOOTREPLY;
        assert_eq!(parse_request(&b).err(), Some(PacketError::NotRequest(2)));
        let mut b = good.clone();
        b[2] = 16;
        assert!(matches!(
            parse_request(&b),
            Err(PacketError::NotEthernet { .. })
        ));
        // An option whose length runs past the end.
        let mut b = good[..MIN_LEN].to_vec();
        b.extend_from_slice(&[53, 1, 1, 60, 200, b'P']);
        assert!(matches!(
            parse_request(&b),
            Err(PacketError::OptionOverrun { code: 60, .. })
        ));
        // A message type of the wrong length.
        let mut b = good[..MIN_LEN].to_vec();
        b.extend_from_slice(&[53, 2, 1, 1, 255]);
        assert!(matches!(
            parse_request(&b),
            Err(PacketError::OptionLength { code: 53, .. })
        ));
        let mut b = good[..MIN_LEN].to_vec();
        b.extend_from_slice(&[53, 1, 42, 255]);
        assert_eq!(
            parse_request(&b).err(),
            Some(PacketError::BadMessageType(42))
        );
        let mut b = good[..MIN_LEN].to_vec();
        b.extend_from_slice(&[255]);
        assert_eq!(parse_request(&b).err(), Some(PacketError::NoMessageType));
        // A dangling option code at the very end.
        let mut b = good[..MIN_LEN].to_vec();
        b.extend_from_slice(&[53, 1, 1, 12]);
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn macs_parse_and_print() {
        assert_eq!("52:54:00:12:34:56".parse::<MacAddr>().unwrap(), MAC);
        assert_eq!("52-54-00-12-34-56".parse::<MacAddr>().unwrap(), MAC);
        assert_eq!(MAC.to_string(), "52:54:00:12:34:56");
        assert!("52:54:00:12:34".parse::<MacAddr>().is_err());
        assert!("52:54:00:12:34:56:78".parse::<MacAddr>().is_err());
        assert!("zz:54:00:12:34:56".parse::<MacAddr>().is_err());
    }

    #[test]
    fn masks_and_prefixes() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
        assert_eq!(prefix_mask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(prefix_mask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_mask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
