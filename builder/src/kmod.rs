//! Kernel module selection at build time: from `modules.dep` (plus
//! `modules.softdep`, `modules.alias` and `modules.builtin`), the closure of the
//! modules an image asks for, in an order where every module comes after
//! everything it needs. The booted appliance loads exactly this list with
//! `finit_module`, so no depmod/modprobe logic runs at boot.

use std::collections::{BTreeMap, BTreeSet};

/// The parsed module metadata of one kernel version.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// Module path (relative to `lib/modules/<ver>/`) → its direct dependencies.
    deps: BTreeMap<String, Vec<String>>,
    /// Normalised module name → path.
    by_name: BTreeMap<String, String>,
    /// Normalised module name → modules to load before it (`softdep ... pre:`).
    soft_pre: BTreeMap<String, Vec<String>>,
    /// alias → normalised module name.
    aliases: BTreeMap<String, String>,
    /// Normalised names of modules built into the kernel.
    builtin: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
    #[error("modules.dep line {line}: {why}")]
    Malformed { line: usize, why: String },
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

impl ModuleIndex {
    /// Parse the depmod outputs. Only `modules_dep` is required.
    pub fn parse(
        modules_dep: &str,
        softdep: &str,
        alias: &str,
        builtin: &str,
    ) -> Result<ModuleIndex, KmodError> {
        let mut ix = ModuleIndex::default();
        for (i, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (m, rest) = line.split_once(':').ok_or_else(|| KmodError::Malformed {
                line: i + 1,
                why: format!("no ':' in {line:?}"),
            })?;
            let m = m.trim().to_string();
            ix.by_name.insert(module_name(&m), m.clone());
            ix.deps
                .insert(m, rest.split_whitespace().map(str::to_string).collect());
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(m) = w.next() else { continue };
            let mut pre = Vec::new();
            let mut in_pre = false;
            for t in w {
                match t {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => pre.push(t.to_string()),
                    _ => {}
                }
            }
            ix.soft_pre.entry(module_name(m)).or_default().extend(pre);
        }
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next()) {
                ix.aliases
                    .entry(a.to_string())
                    .or_insert_with(|| module_name(m));
            }
        }
        ix.builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        Ok(ix)
    }

    fn lookup(&self, name: &str) -> Option<&String> {
        let n = module_name(name);
        self.by_name
            .get(&n)
            .or_else(|| self.aliases.get(name).and_then(|a| self.by_name.get(a)))
    }

    /// The load order (paths relative to `lib/modules/<ver>/`) for `wanted`:
    /// every dependency before its user, soft "pre" dependencies included
    /// when present, built-in modules skipped, each module once.
    pub fn load_order(&self, wanted: &[String]) -> Result<Vec<String>, KmodError> {
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        let mut active = BTreeSet::new();
        for w in wanted {
            match self.lookup(w) {
                Some(p) => self.visit(p, &mut out, &mut done, &mut active)?,
                None if self.builtin.contains(&module_name(w)) => {}
                None => return Err(KmodError::Unknown(w.clone())),
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        path: &str,
        out: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        active: &mut BTreeSet<String>,
    ) -> Result<(), KmodError> {
        if done.contains(path) {
            return Ok(());
        }
        if !active.insert(path.to_string()) {
            return Err(KmodError::Cycle(path.to_string()));
        }
        // Optional soft dependencies first; unknown ones are skipped.
        if let Some(pre) = self.soft_pre.get(&module_name(path)) {
            for s in pre {
                if let Some(p) = self.lookup(s) {
                    if !active.contains(p) {
                        self.visit(&p.clone(), out, done, active)?;
                    }
                }
            }
        }
        for d in self.deps.get(path).into_iter().flatten() {
            self.visit(d, out, done, active)?;
        }
        active.remove(path);
        done.insert(path.to_string());
        out.push(path.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
";

    #[test]
    fn dependencies_come_first_once() {
        let ix = ModuleIndex::parse(
            DEP,
            "softdep ext4 pre: crc32c\n",
            "alias crc32c crc32c_generic\n",
            "kernel/drivers/virtio/virtio_pci.ko\n",
        )
        .unwrap();
        let order = ix
            .load_order(&[
                "virtio-net".into(),
                "ext4".into(),
                "virtio_pci".into(),
                "failover".into(),
            ])
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
        let ix = ModuleIndex::parse(DEP, "", "", "").unwrap();
        assert_eq!(
            ix.load_order(&["e1000".into()]),
            Err(KmodError::Unknown("e1000".into()))
        );
        let cyc = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "", "", "").unwrap();
        assert!(matches!(
            cyc.load_order(&["a".into()]),
            Err(KmodError::Cycle(_))
        ));
        assert!(ModuleIndex::parse("garbage\n", "", "", "").is_err());
    }
}
