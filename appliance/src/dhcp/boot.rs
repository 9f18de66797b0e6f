//! PXE boot decisions: what kind of firmware a request comes from
//! ([`classify`] → [`ClientClass`]), the question the DHCP handler asks
//! ([`BootBackend`]), and the standard policy ([`DefaultBootBackend`]).
//!
//! Classification uses option 93 (client architecture, RFC 4578), option
//! 60 (vendor class `PXEClient…`/`HTTPClient…`, whose `Arch:NNNNN` field
//! stands in for a missing option 93), option 77 (user class `iPXE`) and
//! iPXE's own option 175.

use super::packet::{opt, MacAddr, Packet};

/// CPU/firmware architecture of a client (RFC 4578 option 93 values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 0: x86 BIOS.
    X86Bios,
    /// 7 or 9: x64 UEFI.
    X64Uefi,
    /// 16: x64 UEFI HTTP boot.
    X64UefiHttp,
    /// 11: arm64 UEFI.
    Arm64Uefi,
    /// 19: arm64 UEFI HTTP boot.
    Arm64UefiHttp,
    /// Anything else.
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Arch::X86Bios,
            7 | 9 => Arch::X64Uefi,
            16 => Arch::X64UefiHttp,
            11 => Arch::Arm64Uefi,
            19 => Arch::Arm64UefiHttp,
            n => Arch::Other(n),
        }
    }
}

/// What asked for an address, as far as booting is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientClass {
    BiosPxe,
    UefiX64Pxe,
    UefiHttp,
    Arm64Pxe,
    Arm64Http,
    /// iPXE (user class `iPXE` or option 175), on the given architecture
    /// (`None` when it did not say).
    Ipxe {
        arch: Option<Arch>,
    },
    /// Not a network-boot client (an OS, a phone…).
    Unknown,
}

impl ClientClass {
    /// Whether the request carried vendor class `PXEClient` or
    /// `HTTPClient`, i.e. firmware that reads boot options.
    pub fn is_netboot(self) -> bool {
        !matches!(self, ClientClass::Unknown)
    }
}

/// What a client should boot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BootDecision {
    /// Give no boot information (in proxy mode: do not answer at all).
    Ignore,
    /// Load `tftp_file` from the TFTP server (next-server).
    Chain { tftp_file: String },
    /// UEFI HTTP boot from this URL.
    HttpUrl(String),
    /// iPXE: fetch and run this script URL.
    IpxeScript(String),
    /// Boot from the local disk: no boot file.
    LocalBoot,
}

/// "What should this MAC boot?" The inventory implements it; the DHCP
/// handler asks it for every netboot request and never looks elsewhere.
pub trait BootBackend: Send + Sync {
    fn boot_decision(&self, mac: MacAddr, class: ClientClass) -> BootDecision;
}

/// The vendor class (option 60), if it is text.
fn vendor_class<'a>(p: &Packet<'a>) -> Option<&'a [u8]> {
    p.option(opt::VENDOR_CLASS)
}

/// `PXEClient:Arch:00007:UNDI:003016` → 7.
fn arch_from_vendor_class(vc: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(vc).ok()?;
    let mut parts = s.split(':');
    while let Some(p) = parts.next() {
        if p == "Arch" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Whether the user class (option 77) says iPXE. iPXE sends the bare
/// string; RFC 3004 clients send length-prefixed strings; accept both.
fn user_class_is_ipxe(uc: &[u8]) -> bool {
    uc == b"iPXE" || uc.windows(4).any(|w| w == b"iPXE")
}

/// Classifies a request by options 93, 60, 77 and 175.
pub fn classify(p: &Packet<'_>) -> ClientClass {
    let vc = vendor_class(p);
    let arch_code = p
        .client_arch()
        .or_else(|| vc.and_then(arch_from_vendor_class));
    let is_ipxe = p.option(opt::USER_CLASS).is_some_and(user_class_is_ipxe)
        || p.option(opt::IPXE_ENCAP).is_some();
    if is_ipxe {
        return ClientClass::Ipxe {
            arch: arch_code.map(Arch::from_code),
        };
    }
    let pxe = vc.is_some_and(|v| v.starts_with(b"PXEClient"));
    let http = vc.is_some_and(|v| v.starts_with(b"HTTPClient"));
    if !pxe && !http {
        return ClientClass::Unknown;
    }
    match (arch_code.map(Arch::from_code), http) {
        (Some(Arch::X64UefiHttp), _) => ClientClass::UefiHttp,
        (Some(Arch::Arm64UefiHttp), _) => ClientClass::Arm64Http,
        (Some(Arch::Arm64Uefi), true) => ClientClass::Arm64Http,
        (_, true) => ClientClass::UefiHttp,
        (Some(Arch::X64Uefi), false) => ClientClass::UefiX64Pxe,
        (Some(Arch::Arm64Uefi), false) => ClientClass::Arm64Pxe,
        (Some(Arch::X86Bios) | None, false) => ClientClass::BiosPxe,
        (Some(Arch::Other(_)), false) => ClientClass::Unknown,
    }
}

/// Whether everything the appliance knows (open jobs, replication, the
/// inventory) says this MAC (`aa:bb:…`) boots from its own disk now.
pub type LocalBootCheck = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// [`DefaultBootBackend`], except that a machine the appliance has decided
/// boots from its disk (a system with netboot off and no job open) gets
/// an address but no boot file: its firmware finds nothing to boot on the
/// network and goes on to the next boot option, its disk. Answering such
/// a machine with iPXE and an `exit` script relied on iPXE handing control
/// back to the firmware, which Debian 12's `ipxe.efi` under OVMF does not
/// do, so network-first machines never reached their disk.
#[derive(Clone)]
pub struct PolicyBootBackend {
    pub default: DefaultBootBackend,
    /// Filled once the server's jobs and inventory exist (networks are
    /// restored before them); until then every MAC gets the default.
    pub local: std::sync::Arc<std::sync::OnceLock<LocalBootCheck>>,
}

impl BootBackend for PolicyBootBackend {
    fn boot_decision(&self, mac: MacAddr, class: ClientClass) -> BootDecision {
        if let Some(local) = self.local.get() {
            if local(&mac.to_string()) {
                return BootDecision::LocalBoot;
            }
        }
        self.default.boot_decision(mac, class)
    }
}

/// The standard policy: BIOS PXE → `undionly.kpxe`, UEFI PXE →
/// `ipxe.efi` (`ipxe-arm64.efi` on arm64) over TFTP; UEFI HTTP boot →
/// `<base>/boot/ipxe.efi`; iPXE → `<base>/boot/<mac>.ipxe`.
#[derive(Clone, Debug)]
pub struct DefaultBootBackend {
    /// `http://<server>` without a trailing slash.
    pub http_base_url: String,
}

impl DefaultBootBackend {
    pub fn new(http_base_url: &str) -> Self {
        DefaultBootBackend {
            http_base_url: http_base_url.trim_end_matches('/').to_owned(),
        }
    }
}

impl BootBackend for DefaultBootBackend {
    fn boot_decision(&self, mac: MacAddr, class: ClientClass) -> BootDecision {
        let base = &self.http_base_url;
        match class {
            ClientClass::BiosPxe => BootDecision::Chain {
                tftp_file: "undionly.kpxe".into(),
            },
            ClientClass::UefiX64Pxe => BootDecision::Chain {
                tftp_file: "ipxe.efi".into(),
            },
            ClientClass::Arm64Pxe => BootDecision::Chain {
                tftp_file: "ipxe-arm64.efi".into(),
            },
            ClientClass::UefiHttp => BootDecision::HttpUrl(format!("{base}/boot/ipxe.efi")),
            ClientClass::Arm64Http => BootDecision::HttpUrl(format!("{base}/boot/ipxe-arm64.efi")),
            ClientClass::Ipxe { .. } => BootDecision::IpxeScript(format!("{base}/boot/{mac}.ipxe")),
            ClientClass::Unknown => BootDecision::Ignore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{parse_request, Builder, MessageType};
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

    fn class(opts: &[(u8, &[u8])]) -> ClientClass {
        let mut b = Builder::request(1, MAC, MessageType::Discover);
        for (c, v) in opts {
            b.option(*c, v);
        }
        let bytes = b.finish();
        classify(&parse_request(&bytes).unwrap())
    }

    #[test]
    fn classification_by_options() {
        use ClientClass::*;
        let pxe: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
        assert_eq!(class(&[(60, pxe)]), BiosPxe);
        assert_eq!(class(&[(60, pxe), (93, &[0, 0])]), BiosPxe);
        assert_eq!(class(&[(60, b"PXEClient"), (93, &[0, 7])]), UefiX64Pxe);
        assert_eq!(class(&[(60, b"PXEClient"), (93, &[0, 9])]), UefiX64Pxe);
        assert_eq!(
            class(&[(60, b"PXEClient:Arch:00007:UNDI:003016")]),
            UefiX64Pxe
        );
        assert_eq!(class(&[(60, b"PXEClient"), (93, &[0, 11])]), Arm64Pxe);
        assert_eq!(class(&[(60, b"HTTPClient"), (93, &[0, 16])]), UefiHttp);
        assert_eq!(
            class(&[(60, b"HTTPClient:Arch:00016:UNDI:003001")]),
            UefiHttp
        );
        assert_eq!(class(&[(60, b"HTTPClient"), (93, &[0, 19])]), Arm64Http);
        assert_eq!(
            class(&[(60, pxe), (77, b"iPXE"), (93, &[0, 0])]),
            Ipxe {
                arch: Some(Arch::X86Bios)
            }
        );
        // RFC 3004 length-prefixed user class.
        assert_eq!(
            class(&[(77, b"\x04iPXE"), (93, &[0, 7])]),
            Ipxe {
                arch: Some(Arch::X64Uefi)
            }
        );
        assert_eq!(
            class(&[(175, &[177, 5, 1, 0x10, 0xec, 0x81, 0x68])]),
            Ipxe { arch: None }
        );
        assert_eq!(class(&[]), Unknown);
        assert_eq!(class(&[(60, b"MSFT 5.0")]), Unknown);
        assert_eq!(class(&[(60, b"udhcp 1.36.1")]), Unknown);
        // A truncated option 93 is ignored, not a panic.
        assert_eq!(class(&[(60, b"PXEClient"), (93, &[7])]), BiosPxe);
    }

    #[test]
    fn default_policy() {
        let b = DefaultBootBackend::new("http://10.0.0.1/");
        assert_eq!(
            b.boot_decision(MAC, ClientClass::BiosPxe),
            BootDecision::Chain {
                tftp_file: "undionly.kpxe".into()
            }
        );
        assert_eq!(
            b.boot_decision(MAC, ClientClass::UefiX64Pxe),
            BootDecision::Chain {
                tftp_file: "ipxe.efi".into()
            }
        );
        assert_eq!(
            b.boot_decision(MAC, ClientClass::UefiHttp),
            BootDecision::HttpUrl("http://10.0.0.1/boot/ipxe.efi".into())
        );
        assert_eq!(
            b.boot_decision(MAC, ClientClass::Ipxe { arch: None }),
            BootDecision::IpxeScript("http://10.0.0.1/boot/02:00:00:00:00:09.ipxe".into())
        );
        assert_eq!(
            b.boot_decision(MAC, ClientClass::Unknown),
            BootDecision::Ignore
        );
    }

    #[test]
    fn a_machine_decided_local_gets_no_boot_file_and_others_the_default() {
        let local: LocalBootCheck = std::sync::Arc::new(|mac: &str| mac == "02:00:00:00:00:09");
        let b = PolicyBootBackend {
            default: DefaultBootBackend::new("http://10.0.0.1"),
            local: Default::default(),
        };
        // Before the server's policy exists: the default.
        assert_eq!(
            b.boot_decision(MAC, ClientClass::UefiX64Pxe),
            BootDecision::Chain {
                tftp_file: "ipxe.efi".into()
            }
        );
        b.local.set(local).ok().unwrap();
        assert_eq!(
            b.boot_decision(MAC, ClientClass::UefiX64Pxe),
            BootDecision::LocalBoot
        );
        assert_eq!(
            b.boot_decision(MacAddr([2, 0, 0, 0, 0, 8]), ClientClass::BiosPxe),
            BootDecision::Chain {
                tftp_file: "undionly.kpxe".into()
            }
        );
    }
}
