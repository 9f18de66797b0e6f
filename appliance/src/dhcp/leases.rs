//! The lease table of the authoritative server: which address belongs to
//! which MAC until when, reservations, declined addresses, and its JSON
//! file.
//!
//! The table is plain in-memory state the handler mutates; it does no I/O
//! except [`LeaseDb::save`] / [`LeaseDb::load`], which the listener calls.
//! **Invariant:** one address maps to at most one MAC (`by_addr` is the
//! only owner record and every allocation goes through it).
//!
//! Crash safety with coalesced writes: the file stores an allocation
//! cursor placed `slack` addresses past the cursor at save time, and the
//! handler asks for a synchronous save (`must_save`) before it hands out an
//! address past that mark. After a crash, fresh allocations start beyond
//! every address handed out since the last save.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::packet::MacAddr;

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD_SECS: u64 = 60;

/// State of one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Offered,
    Bound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEntry {
    pub mac: MacAddr,
    pub addr: Ipv4Addr,
    /// Unix seconds.
    pub expires: u64,
    pub state: LeaseState,
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    schema: String,
    next: u32,
    leases: Vec<LeaseEntry>,
    declined: Vec<(Ipv4Addr, u64)>,
}

const SCHEMA: &str = "appliance.dhcp-leases.v1";

/// Why no address could be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("address pool exhausted")]
    Exhausted,
}

/// The lease table.
#[derive(Debug)]
pub struct LeaseDb {
    start: u32,
    size: u32,
    by_mac: HashMap<MacAddr, LeaseEntry>,
    by_addr: HashMap<Ipv4Addr, MacAddr>,
    declined: HashMap<Ipv4Addr, u64>,
    reservations: HashMap<MacAddr, Ipv4Addr>,
    reserved: HashMap<Ipv4Addr, MacAddr>,
    /// Addresses never handed out (the server's own).
    excluded: Vec<Ipv4Addr>,
    /// Next pool offset to try.
    cursor: u32,
    /// Pool offsets below `saved_mark` (mod size) are covered by the file.
    saved_mark: u32,
    allocated_since_save: u32,
    slack: u32,
    dirty: bool,
}

impl LeaseDb {
    /// An empty table for the pool `start..=end`.
    pub fn new(
        start: Ipv4Addr,
        end: Ipv4Addr,
        reservations: &[(MacAddr, Ipv4Addr)],
        excluded: &[Ipv4Addr],
    ) -> anyhow::Result<Self> {
        let (s, e) = (u32::from(start), u32::from(end));
        anyhow::ensure!(s <= e, "DHCP pool start {start} is after its end {end}");
        let size = e - s + 1;
        let mut reserved = HashMap::new();
        for (mac, ip) in reservations {
            if let Some(other) = reserved.insert(*ip, *mac) {
                anyhow::bail!("address {ip} is reserved for both {other} and {mac}");
            }
        }
        Ok(LeaseDb {
            start: s,
            size,
            by_mac: HashMap::new(),
            by_addr: HashMap::new(),
            declined: HashMap::new(),
            reservations: reservations.iter().copied().collect(),
            reserved,
            excluded: excluded.to_vec(),
            cursor: 0,
            saved_mark: 0,
            allocated_since_save: 0,
            slack: (size / 4).clamp(1, 8192),
            dirty: false,
        })
    }

    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v >= self.start && v - self.start < self.size
    }

    /// Whether `ip` may be given to `mac` now (ignoring who holds it).
    fn allowed_for(&self, ip: Ipv4Addr, mac: MacAddr, now: u64) -> bool {
        if self.excluded.contains(&ip) {
            return false;
        }
        if let Some(owner) = self.reserved.get(&ip) {
            return *owner == mac;
        }
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        self.in_pool(ip)
    }

    /// Whether `ip` is free for `mac`: allowed, and not held by another MAC
    /// with an unexpired lease.
    fn free_for(&self, ip: Ipv4Addr, mac: MacAddr, now: u64) -> bool {
        if !self.allowed_for(ip, mac, now) {
            return false;
        }
        match self.by_addr.get(&ip) {
            None => true,
            Some(owner) if *owner == mac => true,
            Some(owner) => self.by_mac.get(owner).is_none_or(|l| l.expires <= now),
        }
    }

    /// The lease `mac` holds (expired or not).
    pub fn lease_of(&self, mac: MacAddr) -> Option<&LeaseEntry> {
        self.by_mac.get(&mac)
    }

    /// Who holds `ip` with an unexpired lease.
    pub fn holder(&self, ip: Ipv4Addr, now: u64) -> Option<MacAddr> {
        let owner = self.by_addr.get(&ip)?;
        self.by_mac
            .get(owner)
            .filter(|l| l.expires > now && l.addr == ip)
            .map(|l| l.mac)
    }

    /// Records `mac` → `ip`, evicting an expired previous holder of `ip`
    /// and `mac`'s previous address.
    fn assign(&mut self, mac: MacAddr, ip: Ipv4Addr, expires: u64, state: LeaseState) {
        if let Some(prev) = self.by_addr.get(&ip).copied() {
            if prev != mac {
                self.by_mac.remove(&prev);
            }
        }
        if let Some(old) = self.by_mac.get(&mac) {
            if old.addr != ip {
                self.by_addr.remove(&old.addr);
            }
        }
        self.by_addr.insert(ip, mac);
        self.by_mac.insert(
            mac,
            LeaseEntry {
                mac,
                addr: ip,
                expires,
                state,
            },
        );
        self.dirty = true;
    }

    /// Picks an address for `mac` (its reservation, its current or previous
    /// address, the address it asks for, or the next free one) and holds it
    /// as offered.
    pub fn offer(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Ipv4Addr, AllocError> {
        let ip = self.choose(mac, requested, now)?;
        let keep_bound = self
            .by_mac
            .get(&mac)
            .filter(|l| l.addr == ip && l.state == LeaseState::Bound && l.expires > now)
            .map(|l| l.expires);
        match keep_bound {
            Some(exp) => self.assign(mac, ip, exp, LeaseState::Bound),
            None => self.assign(mac, ip, now + OFFER_HOLD_SECS, LeaseState::Offered),
        }
        Ok(ip)
    }

    fn choose(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Ipv4Addr, AllocError> {
        if let Some(ip) = self.reservations.get(&mac).copied() {
            if self.free_for(ip, mac, now) {
                return Ok(ip);
            }
        }
        if let Some(l) = self.by_mac.get(&mac) {
            if self.free_for(l.addr, mac, now) {
                return Ok(l.addr);
            }
        }
        if let Some(ip) = requested {
            if self.in_pool(ip) && self.free_for(ip, mac, now) {
                return Ok(ip);
            }
        }
        for _ in 0..self.size {
            let off = self.cursor;
            self.cursor = (self.cursor + 1) % self.size;
            let ip = Ipv4Addr::from(self.start + off);
            if self.free_for(ip, mac, now) && !self.reserved.contains_key(&ip) {
                self.allocated_since_save += 1;
                return Ok(ip);
            }
        }
        Err(AllocError::Exhausted)
    }

    /// Binds `ip` to `mac` until `now + lease_secs` if `ip` is free for it;
    /// returns false (NAK) otherwise.
    pub fn bind(&mut self, mac: MacAddr, ip: Ipv4Addr, lease_secs: u32, now: u64) -> bool {
        if !self.free_for(ip, mac, now) {
            return false;
        }
        self.assign(mac, ip, now + u64::from(lease_secs), LeaseState::Bound);
        true
    }

    /// Forgets an offer `mac` did not take (it chose another server).
    pub fn drop_offer(&mut self, mac: MacAddr) {
        if let Some(l) = self.by_mac.get(&mac).copied() {
            if l.state == LeaseState::Offered {
                self.by_mac.remove(&mac);
                self.by_addr.remove(&l.addr);
            }
        }
    }

    /// `mac` found `ip` in use: keep it out of the pool for `secs`.
    pub fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, secs: u64, now: u64) {
        if self.by_addr.get(&ip) == Some(&mac) {
            self.by_addr.remove(&ip);
            self.by_mac.remove(&mac);
        }
        if self.in_pool(ip) {
            self.declined.insert(ip, now + secs);
        }
        self.dirty = true;
    }

    /// `mac` gives `ip` back; the address is free for anyone, and `mac`
    /// gets it again if nobody took it meanwhile.
    pub fn release(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) -> bool {
        match self.by_mac.get_mut(&mac) {
            Some(l) if l.addr == ip => {
                l.expires = now;
                self.dirty = true;
                true
            }
            _ => false,
        }
    }

    /// Whether there are unsaved changes.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether the next fresh allocation would pass the mark the lease file
    /// covers: save before handing out more.
    pub fn must_save(&self) -> bool {
        self.allocated_since_save + 1 >= self.slack
    }

    /// Number of bound, unexpired leases.
    pub fn bound_count(&self, now: u64) -> usize {
        self.by_mac
            .values()
            .filter(|l| l.state == LeaseState::Bound && l.expires > now)
            .count()
    }

    /// Serialises the bound leases (offers are not worth keeping).
    pub fn to_json(&mut self) -> Vec<u8> {
        let mut leases: Vec<LeaseEntry> = self
            .by_mac
            .values()
            .filter(|l| l.state == LeaseState::Bound)
            .copied()
            .collect();
        leases.sort_by_key(|l| u32::from(l.addr));
        let mut declined: Vec<(Ipv4Addr, u64)> =
            self.declined.iter().map(|(a, u)| (*a, *u)).collect();
        declined.sort();
        self.saved_mark = (self.cursor + self.slack) % self.size;
        self.allocated_since_save = 0;
        let file = LeaseFile {
            schema: SCHEMA.into(),
            next: self.saved_mark,
            leases,
            declined,
        };
        self.dirty = false;
        serde_json::to_vec(&file).expect("serialising leases cannot fail")
    }

    /// Writes the table to `path` (temporary file + rename).
    pub fn save(&mut self, path: &Path) -> anyhow::Result<()> {
        let bytes = self.to_json();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(())
    }

    /// Loads leases from `path` if it exists; leases outside the pool (the
    /// configuration changed) and conflicting ones are dropped with a log.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        self.load_json(&bytes)
            .with_context(|| format!("parsing lease file {}", path.display()))
    }

    pub fn load_json(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let file: LeaseFile = serde_json::from_slice(bytes)?;
        anyhow::ensure!(
            file.schema == SCHEMA,
            "unknown lease file schema {:?}",
            file.schema
        );
        for l in file.leases {
            let taken = self.by_addr.contains_key(&l.addr) || self.by_mac.contains_key(&l.mac);
            if !self.allowed_for(l.addr, l.mac, 0) || taken {
                tracing::warn!(mac = %l.mac, addr = %l.addr, "dropping stored lease outside the pool or conflicting");
                continue;
            }
            self.assign(l.mac, l.addr, l.expires, LeaseState::Bound);
        }
        self.declined.extend(file.declined);
        self.cursor = file.next % self.size;
        self.saved_mark = self.cursor;
        self.dirty = false;
        Ok(())
    }

    /// Checks the invariant (tests): every address has one owner and every
    /// owner's lease names that address.
    pub fn check_invariant(&self) {
        for (ip, mac) in &self.by_addr {
            let l = self.by_mac.get(mac).expect("by_addr owner has a lease");
            assert_eq!(l.addr, *ip, "lease of {mac} disagrees with by_addr");
        }
        for (mac, l) in &self.by_mac {
            assert_eq!(self.by_addr.get(&l.addr), Some(mac), "{mac} not in by_addr");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn random_operations_never_share_an_address() {
        let mut db = LeaseDb::new(ip(10), ip(19), &[(mac(99), ip(12))], &[ip(15)]).unwrap();
        let mut x = 0x1234_5678u64;
        let mut now = 1000;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = mac((x % 16) as u8 + 90);
            let a = ip((x >> 8) as u8 % 14 + 8);
            match (x >> 16) % 6 {
                0 => {
                    let _ = db.offer(m, Some(a), now);
                }
                1 => {
                    db.bind(m, a, 30, now);
                }
                2 => db.decline(m, a, 20, now),
                3 => {
                    db.release(m, a, now);
                }
                4 => db.drop_offer(m),
                _ => now += (x >> 24) % 10,
            }
            db.check_invariant();
            let mut seen = HashMap::new();
            for l in db.by_mac.values().filter(|l| l.expires > now) {
                assert!(seen.insert(l.addr, l.mac).is_none(), "{} shared", l.addr);
                assert!(db.in_pool(l.addr) && l.addr != ip(15));
                if l.addr == ip(12) {
                    assert_eq!(l.mac, mac(99));
                }
            }
        }
    }

    #[test]
    fn save_and_load_keep_bound_leases_and_skip_past_the_mark() {
        let mut db = LeaseDb::new(ip(10), ip(200), &[], &[]).unwrap();
        let a = db.offer(mac(1), None, 0).unwrap();
        assert!(db.bind(mac(1), a, 100, 0));
        let b = db.offer(mac(2), None, 0).unwrap();
        let bytes = db.to_json();
        let mut db2 = LeaseDb::new(ip(10), ip(200), &[], &[]).unwrap();
        db2.load_json(&bytes).unwrap();
        assert_eq!(db2.lease_of(mac(1)).unwrap().addr, a);
        assert!(db2.lease_of(mac(2)).is_none(), "offers are not stored");
        // A fresh allocation after a reload never reuses `b` (handed out
        // before the save) nor anything shortly after it.
        let c = db2.offer(mac(3), None, 0).unwrap();
        assert!(u32::from(c) > u32::from(b) + 10, "{c} vs {b}");
    }
}
