//! Kernel module selection at build time: the closure of the modules an
//! image asks for, ordered so every module comes after everything it needs.
//! The booted appliance loads exactly this list with `finit_module`, so no
//! depmod/modprobe logic runs at boot.
//!
//! Debian's `linux-image-*` packages ship no `modules.dep` (depmod runs in
//! the postinst), so dependencies come from each module's own `.modinfo` ELF
//! section (`depends=` and `softdep=pre:`), read only for the modules in the
//! closure. `modules.builtin` (shipped) says which names need no file.
//!
//! Besides the flat order, [`ModuleIndex::load_plan`] keeps what PID 1 needs
//! to load only the modules the machine's devices ask for: whether the image
//! definition names a module, its direct dependencies and its `alias=`
//! patterns. [`format_plan`] writes that as `modules.plan`:
//!
//! ```text
//! # appliance.modules.plan.v1
//! <abs path>\t<named: 0|1>\t<dep abs paths, comma-separated>\t<aliases, space-separated>
//! ```
//!
//! One line per module, dependencies before dependents; every dependency is
//! an earlier line; empty fields are empty strings; lines starting with `#`
//! are comments. Dependencies are `depends=` plus the `softdep=pre:` modules
//! that are in the closure. Aliases containing whitespace (none in Linux
//! today) are left out, since they could not be written unambiguously.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("kernel module {0:?} is neither a module file nor built in")]
    Unknown(String),
    #[error("kernel module {path}: {why}")]
    BadModule { path: String, why: String },
    #[error("module dependency cycle through {0}")]
    Cycle(String),
}

/// `virtio-net`, `virtio_net.ko`, `kernel/x/virtio_net.ko.xz` → `virtio_net`.
pub fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|x| base.strip_suffix(x))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// The module files of one kernel version.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// Normalised module name → path relative to `lib/modules/<ver>/`.
    by_name: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

/// What a module's `.modinfo` says about loading it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub depends: Vec<String>,
    pub soft_pre: Vec<String>,
    /// `alias=` values: device match patterns (`pci:v00001AF4d00001000sv*…`)
    /// and other names (`fs-ext4`, `crypto-crc32c`), in `.modinfo` order.
    pub aliases: Vec<String>,
}

/// One module of the load plan ([`ModuleIndex::load_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedModule {
    /// Path relative to `lib/modules/<ver>/`.
    pub path: String,
    /// Whether the image definition names it (rather than only needing it).
    pub named: bool,
    /// Direct dependencies (paths as above), each an earlier entry.
    pub deps: Vec<String>,
    /// `alias=` patterns, without ones that contain whitespace.
    pub aliases: Vec<String>,
}

/// First line of `modules.plan`.
pub const PLAN_HEADER: &str = "# appliance.modules.plan.v1";

/// Writes `modules.plan` (format in the module docs); `base` is the module
/// directory without slashes around it, e.g. `lib/modules/6.1.0-1-amd64`.
pub fn format_plan(base: &str, plan: &[PlannedModule]) -> String {
    let abs = |p: &str| format!("/{base}/{p}");
    let mut out = format!("{PLAN_HEADER}\n");
    for m in plan {
        let deps: Vec<String> = m.deps.iter().map(|d| abs(d)).collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            abs(&m.path),
            u8::from(m.named),
            deps.join(","),
            m.aliases.join(" ")
        ));
    }
    out
}

impl ModuleIndex {
    /// `paths`: every module file, relative to `lib/modules/<ver>/`;
    /// `builtin`: the text of `modules.builtin`.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a str>, builtin: &str) -> ModuleIndex {
        ModuleIndex {
            by_name: paths
                .into_iter()
                .filter(|p| p.contains(".ko"))
                .map(|p| (module_name(p), p.to_string()))
                .collect(),
            builtin: builtin
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(module_name)
                .collect(),
        }
    }

    /// The load order (paths) for `wanted`: dependencies before users, soft
    /// "pre" dependencies included when they exist, built-ins skipped, each
    /// module once. `modinfo` returns a module file's bytes' `.modinfo`.
    pub fn load_order(
        &self,
        wanted: &[String],
        modinfo: impl FnMut(&str) -> Result<ModInfo, KmodError>,
    ) -> Result<Vec<String>, KmodError> {
        Ok(self
            .load_plan(wanted, modinfo)?
            .into_iter()
            .map(|m| m.path)
            .collect())
    }

    /// [`ModuleIndex::load_order`] with, for every module, whether `wanted`
    /// names it, its direct dependencies in the closure and its aliases.
    pub fn load_plan(
        &self,
        wanted: &[String],
        mut modinfo: impl FnMut(&str) -> Result<ModInfo, KmodError>,
    ) -> Result<Vec<PlannedModule>, KmodError> {
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        let mut active = BTreeSet::new();
        let mut named = BTreeSet::new();
        for w in wanted {
            let n = module_name(w);
            match self.by_name.get(&n) {
                Some(p) => {
                    named.insert(p.clone());
                    self.visit(p, &mut out, &mut done, &mut active, &mut modinfo)?
                }
                None if self.builtin.contains(&n) => {}
                None => return Err(KmodError::Unknown(w.clone())),
            }
        }
        for m in &mut out {
            m.named = named.contains(&m.path);
        }
        Ok(out)
    }

    fn visit(
        &self,
        path: &str,
        out: &mut Vec<PlannedModule>,
        done: &mut BTreeSet<String>,
        active: &mut BTreeSet<String>,
        modinfo: &mut dyn FnMut(&str) -> Result<ModInfo, KmodError>,
    ) -> Result<(), KmodError> {
        if done.contains(path) {
            return Ok(());
        }
        if !active.insert(path.to_string()) {
            return Err(KmodError::Cycle(path.to_string()));
        }
        let info = modinfo(path)?;
        let mut deps: Vec<String> = Vec::new();
        for s in &info.soft_pre {
            if let Some(p) = self.by_name.get(&module_name(s)) {
                if !active.contains(p) {
                    self.visit(p, out, done, active, modinfo)?;
                }
                // A soft dependency still being visited (a cycle through a
                // softdep) comes later, so it cannot be a dependency.
                if done.contains(p) && !deps.contains(p) {
                    deps.push(p.clone());
                }
            }
        }
        for d in &info.depends {
            let n = module_name(d);
            match self.by_name.get(&n) {
                Some(p) => {
                    self.visit(p, out, done, active, modinfo)?;
                    if !deps.contains(p) {
                        deps.push(p.clone());
                    }
                }
                None if self.builtin.contains(&n) => {}
                None => {
                    return Err(KmodError::BadModule {
                        path: path.to_string(),
                        why: format!("depends on {d:?}, which is not in the module tree"),
                    })
                }
            }
        }
        let mut aliases: Vec<String> = Vec::new();
        for a in info.aliases {
            if !a.is_empty() && !a.chars().any(char::is_whitespace) && !aliases.contains(&a) {
                aliases.push(a);
            }
        }
        active.remove(path);
        done.insert(path.to_string());
        out.push(PlannedModule {
            path: path.to_string(),
            named: false,
            deps,
            aliases,
        });
        Ok(())
    }
}

/// Parse the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for kv in section.split(|&b| b == 0) {
        let Ok(kv) = std::str::from_utf8(kv) else {
            continue;
        };
        if let Some(a) = kv.strip_prefix("alias=") {
            info.aliases.push(a.to_string());
        } else if let Some(d) = kv.strip_prefix("depends=") {
            info.depends
                .extend(d.split(',').filter(|s| !s.is_empty()).map(str::to_string));
        } else if let Some(s) = kv.strip_prefix("softdep=") {
            let mut in_pre = false;
            for t in s.split_whitespace() {
                match t {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => info.soft_pre.push(t.to_string()),
                    _ => {}
                }
            }
        }
    }
    info
}

/// The `.modinfo` section of an ELF64 little-endian relocatable module.
pub fn modinfo_section(elf: &[u8]) -> Result<&[u8], String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(
            "not an ELF64 little-endian file (compressed modules are not supported)".into(),
        );
    }
    let bad = || "truncated ELF headers".to_string();
    let shoff = u64_at(0x28).ok_or_else(bad)? as usize;
    let shentsize = u16_at(0x3a).ok_or_else(bad)? as usize;
    let shnum = u16_at(0x3c).ok_or_else(bad)? as usize;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)? as usize;
    let sh = |i: usize| -> Option<(u32, usize, usize)> {
        let o = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(o)?,
            u64_at(o + 0x18)? as usize,
            u64_at(o + 0x20)? as usize,
        ))
    };
    let (_, stroff, strsize) = sh(shstrndx).ok_or_else(bad)?;
    let strtab = elf
        .get(stroff..stroff.saturating_add(strsize))
        .ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = sh(i).ok_or_else(bad)?;
        let name = strtab.get(name as usize..).unwrap_or(&[]);
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name == b".modinfo" {
            return elf.get(off..off.saturating_add(size)).ok_or_else(bad);
        }
    }
    Err("no .modinfo section".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dep: &str, soft: &str) -> ModInfo {
        parse_modinfo(format!("license=GPL\0depends={dep}\0softdep={soft}\0name=x\0").as_bytes())
    }

    #[test]
    fn dependencies_come_first_once() {
        let paths = [
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/fs/ext4/ext4.ko",
            "kernel/lib/crc16.ko",
            "kernel/fs/mbcache.ko",
            "kernel/fs/jbd2/jbd2.ko",
            "kernel/crypto/crc32c_generic.ko",
        ];
        let ix = ModuleIndex::new(paths, "kernel/drivers/virtio/virtio_pci.ko\n");
        let mi = |p: &str| {
            Ok(match module_name(p).as_str() {
                "virtio_net" => info("net_failover,failover", ""),
                "net_failover" => info("failover", ""),
                "ext4" => info(
                    "crc16,mbcache,jbd2,virtio_pci",
                    "pre: crc32c_generic post: foo",
                ),
                _ => info("", "pre: nonexistent"),
            })
        };
        let order = ix
            .load_order(
                &[
                    "virtio-net".into(),
                    "ext4".into(),
                    "virtio_pci".into(),
                    "failover".into(),
                ],
                mi,
            )
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/crc16.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko",
            ]
        );
    }

    #[test]
    fn unknown_and_cycles() {
        let ix = ModuleIndex::new(["a.ko", "b.ko"], "");
        assert_eq!(
            ix.load_order(&["e1000".into()], |_| Ok(ModInfo::default())),
            Err(KmodError::Unknown("e1000".into()))
        );
        let cyc = |p: &str| {
            Ok(if p == "a.ko" {
                info("b", "")
            } else {
                info("a", "")
            })
        };
        assert!(matches!(
            ix.load_order(&["a".into()], cyc),
            Err(KmodError::Cycle(_))
        ));
        let missing = |_: &str| Ok(info("zzz", ""));
        assert!(matches!(
            ix.load_order(&["a".into()], missing),
            Err(KmodError::BadModule { .. })
        ));
    }

    #[test]
    fn modinfo_from_a_minimal_elf() {
        // ELF64 header + 3 sections: null, .modinfo, .shstrtab.
        let modinfo = b"depends=foo,bar\0softdep=pre: baz\0";
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo);
        let ss_off = elf.len();
        elf.extend_from_slice(shstr);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, mi_off, modinfo.len());
        sh(10, ss_off, shstr.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        let sec = modinfo_section(&elf).unwrap();
        assert_eq!(
            parse_modinfo(sec),
            ModInfo {
                depends: vec!["foo".into(), "bar".into()],
                soft_pre: vec!["baz".into()],
                aliases: vec![],
            }
        );
        assert!(modinfo_section(b"\x28\xb5\x2f\xfd").is_err());
        assert!(modinfo_section(&elf[..100]).is_err());
    }

    #[test]
    fn modinfo_aliases_in_order() {
        let mi = parse_modinfo(
            b"alias=virtio:d00000001v*\0depends=net_failover\0alias=pci:v00001AF4d00001000sv*sd*bc*sc*i*\0\0",
        );
        assert_eq!(
            mi.aliases,
            ["virtio:d00000001v*", "pci:v00001AF4d00001000sv*sd*bc*sc*i*"]
        );
        assert_eq!(mi.depends, ["net_failover"]);
    }

    #[test]
    fn plan_records_named_deps_and_aliases() {
        let paths = [
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/fs/ext4/ext4.ko",
            "kernel/crypto/crc32c_generic.ko",
        ];
        let ix = ModuleIndex::new(paths, "kernel/lib/crc16.ko\n");
        let mi = |p: &str| {
            Ok(match module_name(p).as_str() {
                "virtio_net" => parse_modinfo(
                    b"alias=virtio:d00000001v*\0alias=virtio:d00000001v*\0alias=bad alias\0depends=net_failover,failover\0",
                ),
                "net_failover" => info("failover", ""),
                "ext4" => parse_modinfo(
                    b"alias=fs-ext4\0alias=ext3\0depends=crc16\0softdep=pre: crc32c_generic\0",
                ),
                _ => ModInfo::default(),
            })
        };
        let plan = ix
            .load_plan(&["virtio_net".into(), "ext4".into()], mi)
            .unwrap();
        let text = format_plan("lib/modules/6.1", &plan);
        assert_eq!(
            text,
            "# appliance.modules.plan.v1\n\
             /lib/modules/6.1/kernel/net/core/failover.ko\t0\t\t\n\
             /lib/modules/6.1/kernel/drivers/net/net_failover.ko\t0\t/lib/modules/6.1/kernel/net/core/failover.ko\t\n\
             /lib/modules/6.1/kernel/drivers/net/virtio_net.ko\t1\t/lib/modules/6.1/kernel/drivers/net/net_failover.ko,/lib/modules/6.1/kernel/net/core/failover.ko\tvirtio:d00000001v*\n\
             /lib/modules/6.1/kernel/crypto/crc32c_generic.ko\t0\t\t\n\
             /lib/modules/6.1/kernel/fs/ext4/ext4.ko\t1\t/lib/modules/6.1/kernel/crypto/crc32c_generic.ko\tfs-ext4 ext3\n"
        );
        assert_eq!(
            ix.load_order(&["virtio_net".into(), "ext4".into()], mi)
                .unwrap(),
            plan.iter().map(|m| m.path.clone()).collect::<Vec<_>>()
        );
    }
}
