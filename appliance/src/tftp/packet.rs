//! TFTP packets: a pure parser and encoder (no I/O), so it can be fuzzed and
//! unit-tested without sockets.
//!
//! Covers RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR), RFC 2347 (options, OACK),
//! RFC 2348 (`blksize` 8..=65464), RFC 2349 (`tsize`, `timeout` 1..=255) and
//! RFC 7440 (`windowsize` 1..=65535). Parsing borrows from the input buffer
//! and never allocates.
//!
//! Rules beyond the RFCs, chosen to keep the server simple and safe:
//! - file names must be UTF-8, 1..=255 bytes, without NUL (the NUL ends the
//!   field, so an embedded NUL shows up as a bad mode or bad option);
//! - the mode is `octet` or `netascii` (case-insensitive); `netascii` is
//!   served byte for byte like `octet` (PXE only fetches binaries, and
//!   tftpd-hpa and most PXE servers do the same for files without CR/LF
//!   translation); `mail` and anything else are refused;
//! - option names are case-insensitive; unknown options are ignored, as RFC
//!   2347 asks; a known option with an unparsable or out-of-range value, or
//!   given twice, makes the whole packet invalid (the server answers ERROR 8).

use std::fmt;

/// Largest `blksize` RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest `blksize` RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// Block size without options (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Longest file name we accept, in bytes.
pub const MAX_NAME: usize = 255;

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    /// Served like `octet` (see the module docs).
    Netascii,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        }
    }
}

/// The options we understand (RFC 2347/2348/2349/7440).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u16>,
    /// Retransmission timeout in seconds.
    pub timeout: Option<u8>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u16>,
}

impl Options {
    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        *self == Options::default()
    }
}

/// A read or write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    pub mode: Mode,
    pub options: Options,
}

/// TFTP error codes (RFC 1350, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionNegotiation,
    /// A code outside 0..=8, kept as received.
    Other(u16),
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> ErrorCode {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTid,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            n => ErrorCode::Other(n),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Other(n) => n,
        }
    }
}

/// One TFTP packet, borrowing from the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a str },
    Oack(Options),
}

/// Why a buffer is not a valid TFTP packet; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {len} bytes is too short for a TFTP packet")]
    TooShort { len: usize },
    #[error("unknown TFTP opcode {0}")]
    UnknownOpcode(u16),
    #[error("{field} is not terminated by a NUL byte")]
    Unterminated { field: &'static str },
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("file name is empty")]
    EmptyName,
    #[error("file name of {len} bytes is longer than {MAX_NAME}")]
    NameTooLong { len: usize },
    #[error("transfer mode {0:?} is not supported (only octet and netascii)")]
    BadMode(String),
    #[error("option {name:?} has invalid value {value:?}")]
    BadOption { name: String, value: String },
    #[error("option {0:?} is given twice")]
    DuplicateOption(String),
    #[error("{0} packet has {1} trailing bytes")]
    Trailing(&'static str, usize),
}

impl PacketError {
    /// The TFTP error code to answer this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            PacketError::BadOption { .. } | PacketError::DuplicateOption(_) => {
                ErrorCode::OptionNegotiation
            }
            _ => ErrorCode::IllegalOperation,
        }
    }
}

/// Splits off one NUL-terminated field.
fn field<'a>(buf: &'a [u8], name: &'static str) -> Result<(&'a [u8], &'a [u8]), PacketError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(PacketError::Unterminated { field: name })?;
    Ok((&buf[..end], &buf[end + 1..]))
}

fn utf8<'a>(bytes: &'a [u8], name: &'static str) -> Result<&'a str, PacketError> {
    std::str::from_utf8(bytes).map_err(|_| PacketError::NotUtf8 { field: name })
}

fn parse_options(mut rest: &[u8]) -> Result<Options, PacketError> {
    let mut opts = Options::default();
    while !rest.is_empty() {
        let (name, r) = field(rest, "option name")?;
        let (value, r) = field(r, "option value")?;
        rest = r;
        let name = String::from_utf8_lossy(name);
        let bad = || PacketError::BadOption {
            name: name.to_string(),
            value: String::from_utf8_lossy(value).into_owned(),
        };
        // Digits only: `str::parse` would accept a leading '+'.
        let num = |max: u64| -> Result<u64, PacketError> {
            if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            let v = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(bad)?;
            if v > max {
                return Err(bad());
            }
            Ok(v)
        };
        let lower = name.to_ascii_lowercase();
        let dup = |set: bool| {
            if set {
                Err(PacketError::DuplicateOption(lower.clone()))
            } else {
                Ok(())
            }
        };
        match lower.as_str() {
            "blksize" => {
                dup(opts.blksize.is_some())?;
                let v = num(MAX_BLKSIZE as u64)?;
                if v < MIN_BLKSIZE as u64 {
                    return Err(bad());
                }
                opts.blksize = Some(v as u16);
            }
            "timeout" => {
                dup(opts.timeout.is_some())?;
                let v = num(255)?;
                if v == 0 {
                    return Err(bad());
                }
                opts.timeout = Some(v as u8);
            }
            "tsize" => {
                dup(opts.tsize.is_some())?;
                opts.tsize = Some(num(u64::MAX)?);
            }
            "windowsize" => {
                dup(opts.windowsize.is_some())?;
                let v = num(u16::MAX as u64)?;
                if v == 0 {
                    return Err(bad());
                }
                opts.windowsize = Some(v as u16);
            }
            _ => {} // RFC 2347: unknown options are ignored.
        }
    }
    Ok(opts)
}

fn parse_request(rest: &[u8]) -> Result<Request<'_>, PacketError> {
    let (name, rest) = field(rest, "file name")?;
    if name.is_empty() {
        return Err(PacketError::EmptyName);
    }
    if name.len() > MAX_NAME {
        return Err(PacketError::NameTooLong { len: name.len() });
    }
    let filename = utf8(name, "file name")?;
    let (mode, rest) = field(rest, "mode")?;
    let mode = if mode.eq_ignore_ascii_case(b"octet") {
        Mode::Octet
    } else if mode.eq_ignore_ascii_case(b"netascii") {
        Mode::Netascii
    } else {
        return Err(PacketError::BadMode(
            String::from_utf8_lossy(mode).into_owned(),
        ));
    };
    Ok(Request {
        filename,
        mode,
        options: parse_options(rest)?,
    })
}

impl<'a> Packet<'a> {
    /// Parses one datagram.
    pub fn parse(buf: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        if buf.len() < 2 {
            return Err(PacketError::TooShort { len: buf.len() });
        }
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        let rest = &buf[2..];
        let block = || {
            if rest.len() < 2 {
                Err(PacketError::TooShort { len: buf.len() })
            } else {
                Ok(u16::from_be_bytes([rest[0], rest[1]]))
            }
        };
        match op {
            OP_RRQ => Ok(Packet::Rrq(parse_request(rest)?)),
            OP_WRQ => Ok(Packet::Wrq(parse_request(rest)?)),
            OP_DATA => Ok(Packet::Data {
                block: block()?,
                data: &rest[2..],
            }),
            OP_ACK => {
                let block = block()?;
                if rest.len() > 2 {
                    return Err(PacketError::Trailing("ACK", rest.len() - 2));
                }
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let code = ErrorCode::from_u16(block()?);
                let (msg, tail) = field(&rest[2..], "error message")?;
                if !tail.is_empty() {
                    return Err(PacketError::Trailing("ERROR", tail.len()));
                }
                Ok(Packet::Error {
                    code,
                    message: utf8(msg, "error message")?,
                })
            }
            OP_OACK => Ok(Packet::Oack(parse_options(rest)?)),
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }

    /// Appends the encoded packet to `out` (which is cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let str0 = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) {
                    OP_RRQ
                } else {
                    OP_WRQ
                };
                out.extend_from_slice(&op.to_be_bytes());
                str0(out, r.filename);
                str0(out, r.mode.as_str());
                encode_options(&r.options, out);
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&OP_DATA.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&code.as_u16().to_be_bytes());
                // A NUL inside the message would end it early on the wire.
                out.extend(message.bytes().filter(|&b| b != 0));
                out.push(0);
            }
            Packet::Oack(o) => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                encode_options(o, out);
            }
        }
    }

    /// The encoded packet as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Writes the 4-byte DATA header for `block` into `buf[..4]`.
pub fn data_header(buf: &mut [u8], block: u16) {
    buf[..2].copy_from_slice(&OP_DATA.to_be_bytes());
    buf[2..4].copy_from_slice(&block.to_be_bytes());
}

fn encode_options(o: &Options, out: &mut Vec<u8>) {
    use std::io::Write;
    let mut opt = |name: &str, v: Option<u64>| {
        if let Some(v) = v {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{name}\0{v}\0");
        }
    };
    opt("blksize", o.blksize.map(u64::from));
    opt("timeout", o.timeout.map(u64::from));
    opt("tsize", o.tsize);
    opt("windowsize", o.windowsize.map(u64::from));
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        let mut put = |f: &mut fmt::Formatter<'_>, n: &str, v: Option<u64>| {
            if let Some(v) = v {
                let r = write!(f, "{sep}{n}={v}");
                sep = " ";
                r
            } else {
                Ok(())
            }
        };
        put(f, "blksize", self.blksize.map(u64::from))?;
        put(f, "timeout", self.timeout.map(u64::from))?;
        put(f, "tsize", self.tsize)?;
        put(f, "windowsize", self.windowsize.map(u64::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(name: &[u8], mode: &[u8], opts: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut v = vec![0, 1];
        v.extend_from_slice(name);
        v.push(0);
        v.extend_from_slice(mode);
        v.push(0);
        for (n, val) in opts {
            v.extend_from_slice(n);
            v.push(0);
            v.extend_from_slice(val);
            v.push(0);
        }
        v
    }

    #[test]
    fn parses_rrq_with_options() {
        let b = rrq(
            b"/pxelinux.0",
            b"OCTET",
            &[
                (b"BLKSIZE", b"1468"),
                (b"tsize", b"0"),
                (b"timeout", b"3"),
                (b"windowsize", b"16"),
                (b"multicast", b""),
            ],
        );
        let p = Packet::parse(&b).unwrap();
        assert_eq!(
            p,
            Packet::Rrq(Request {
                filename: "/pxelinux.0",
                mode: Mode::Octet,
                options: Options {
                    blksize: Some(1468),
                    timeout: Some(3),
                    tsize: Some(0),
                    windowsize: Some(16)
                }
            })
        );
        // Round trip through the encoder (unknown option dropped).
        let again = p.to_vec();
        assert_eq!(Packet::parse(&again).unwrap(), p);
    }

    #[test]
    fn netascii_is_accepted_mail_is_not() {
        let b = rrq(b"f", b"netascii", &[]);
        let p = Packet::parse(&b).unwrap();
        assert!(matches!(
            p,
            Packet::Rrq(Request {
                mode: Mode::Netascii,
                ..
            })
        ));
        assert_eq!(
            Packet::parse(&rrq(b"f", b"mail", &[])),
            Err(PacketError::BadMode("mail".into()))
        );
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(Packet::parse(&[0]), Err(PacketError::TooShort { len: 1 }));
        assert_eq!(
            Packet::parse(b"\0\x01file"),
            Err(PacketError::Unterminated { field: "file name" })
        );
        assert_eq!(
            Packet::parse(b"\0\x01file\0octet"),
            Err(PacketError::Unterminated { field: "mode" })
        );
        assert_eq!(
            Packet::parse(&rrq(b"", b"octet", &[])),
            Err(PacketError::EmptyName)
        );
        assert_eq!(
            Packet::parse(&rrq(&[b'a'; 256], b"octet", &[])),
            Err(PacketError::NameTooLong { len: 256 })
        );
        assert!(Packet::parse(&rrq(&[b'a'; 255], b"octet", &[])).is_ok());
        assert_eq!(
            Packet::parse(&rrq(b"\xff\xfe", b"octet", &[])),
            Err(PacketError::NotUtf8 { field: "file name" })
        );
        // A NUL inside the name ends it: the rest becomes a bad mode.
        assert_eq!(
            Packet::parse(&rrq(b"a\0b", b"octet", &[])),
            Err(PacketError::BadMode("b".into()))
        );
        assert_eq!(
            Packet::parse(&[0, 9, 0, 0]),
            Err(PacketError::UnknownOpcode(9))
        );
        // Option without its value.
        assert_eq!(
            Packet::parse(b"\0\x01f\0octet\0blksize\0"),
            Err(PacketError::Unterminated {
                field: "option value"
            })
        );
    }

    #[test]
    fn rejects_bad_option_values() {
        for (name, value) in [
            (&b"blksize"[..], &b"abc"[..]),
            (b"blksize", b"0"),
            (b"blksize", b"7"),
            (b"blksize", b"70000"),
            (b"blksize", b"65465"),
            (b"blksize", b"+512"),
            (b"blksize", b""),
            (b"timeout", b"0"),
            (b"timeout", b"256"),
            (b"windowsize", b"0"),
            (b"windowsize", b"65536"),
            (b"tsize", b"-1"),
            (b"tsize", b"99999999999999999999999"),
        ] {
            let e = Packet::parse(&rrq(b"f", b"octet", &[(name, value)])).unwrap_err();
            assert!(
                matches!(e, PacketError::BadOption { .. }),
                "{name:?}={value:?}: {e:?}"
            );
            assert_eq!(e.code(), ErrorCode::OptionNegotiation);
        }
        for (name, value) in [(&b"blksize"[..], &b"8"[..]), (b"blksize", b"65464")] {
            assert!(Packet::parse(&rrq(b"f", b"octet", &[(name, value)])).is_ok());
        }
        assert_eq!(
            Packet::parse(&rrq(
                b"f",
                b"octet",
                &[(b"blksize", b"512"), (b"BlkSize", b"1024")]
            )),
            Err(PacketError::DuplicateOption("blksize".into()))
        );
    }

    #[test]
    fn data_ack_error_oack() {
        assert_eq!(
            Packet::parse(b"\0\x03\x01\x02abc").unwrap(),
            Packet::Data {
                block: 0x0102,
                data: b"abc"
            }
        );
        assert_eq!(
            Packet::parse(b"\0\x03\0\x07").unwrap(),
            Packet::Data {
                block: 7,
                data: b""
            }
        );
        assert_eq!(
            Packet::parse(b"\0\x04\xff\xff").unwrap(),
            Packet::Ack { block: 0xffff }
        );
        assert_eq!(
            Packet::parse(b"\0\x04\0"),
            Err(PacketError::TooShort { len: 3 })
        );
        assert_eq!(
            Packet::parse(b"\0\x04\0\x01\0"),
            Err(PacketError::Trailing("ACK", 1))
        );
        let e = Packet::Error {
            code: ErrorCode::FileNotFound,
            message: "no such file",
        };
        assert_eq!(e.to_vec(), b"\0\x05\0\x01no such file\0");
        assert_eq!(Packet::parse(&e.to_vec()).unwrap(), e);
        assert_eq!(
            Packet::parse(b"\0\x05\0\x01oops"),
            Err(PacketError::Unterminated {
                field: "error message"
            })
        );
        let o = Packet::Oack(Options {
            blksize: Some(1468),
            tsize: Some(12345),
            ..Options::default()
        });
        assert_eq!(o.to_vec(), b"\0\x06blksize\x001468\0tsize\x0012345\0");
        assert_eq!(Packet::parse(&o.to_vec()).unwrap(), o);
        let mut buf = [0u8; 4];
        data_header(&mut buf, 258);
        assert_eq!(buf, [0, 3, 1, 2]);
    }

    #[test]
    fn options_display() {
        let o = Options {
            blksize: Some(1468),
            windowsize: Some(16),
            ..Options::default()
        };
        assert_eq!(o.to_string(), "blksize=1468 windowsize=16");
        assert_eq!(Options::default().to_string(), "");
    }

    /// The parser never panics, whatever the bytes (a deterministic stand-in
    /// for the fuzz target in `appliance/fuzz`).
    #[test]
    fn never_panics_on_random_bytes() {
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let alphabet: &[u8] = b"\0\x01\x02\x03\x04\x05\x06octetblksize0123456789tsizewindow";
        let mut buf = Vec::new();
        for i in 0..200_000 {
            buf.clear();
            let len = (next() % 64) as usize;
            for _ in 0..len {
                let r = next();
                // Mostly "interesting" bytes, sometimes anything.
                buf.push(if i % 3 == 0 {
                    r as u8
                } else {
                    alphabet[(r % alphabet.len() as u64) as usize]
                });
            }
            if i % 2 == 0 && buf.len() >= 2 {
                buf[0] = 0;
                buf[1] = (next() % 7) as u8;
            }
            if let Ok(p) = Packet::parse(&buf) {
                // Whatever parses must re-encode and parse again.
                let enc = p.to_vec();
                Packet::parse(&enc).expect("re-encoded packet parses");
            }
        }
    }
}
