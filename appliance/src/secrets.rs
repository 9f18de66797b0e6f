//! Secrets at rest: BMC passwords sealed with a node key.
//!
//! A system's `power.password` is stored in the inventory (git objects,
//! synced to the parent and the rest of the tree, carried in sync bundles)
//! as `sealed:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`:
//! ChaCha20-Poly1305 (ring) under the 32-byte key in
//! `<data>/state/secrets.key` (mode 0600, node state: never synced, never
//! served, in no bundle), with the associated data
//! `appliance.bmc.v1\0<type>\0<address>\0<user>\0<id>`. So:
//!
//! - the inventory, its git history from then on, syncs and bundles hold
//!   only ciphertext;
//! - a sealed password opens only with the power settings it was entered
//!   for: an edit (or a synced change from a child) that points a system at
//!   another BMC address, user, driver or TLS setting cannot make this node
//!   send the password there; the password must be given again;
//! - a password opens only on the node that sealed it (the key id names
//!   it): another node's copy tells the operator to set the password there.
//!
//! The key is made on first use from the kernel's initialized pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use sha2::{Digest, Sha256};

use crate::inventory::model::Power;

/// The node key, inside the data directory.
pub const KEY_FILE: &str = "state/secrets.key";

/// How a sealed value starts.
pub const PREFIX: &str = "sealed:v1:";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Whether a stored value is sealed.
pub fn is_sealed(s: &str) -> bool {
    s.starts_with(PREFIX)
}

/// What a sealed BMC password is bound to.
pub fn power_aad(p: &Power) -> Vec<u8> {
    format!(
        "appliance.bmc.v1\0{}\0{}\0{}\0{}",
        p.kind, p.address, p.user, p.id
    )
    .into_bytes()
}

/// Seals and opens with this node's key (made on first use).
#[derive(Debug)]
pub struct Sealer {
    path: PathBuf,
    key: Mutex<Option<Arc<(LessSafeKey, String)>>>,
}

impl Sealer {
    /// The sealer of the node whose data directory is `data`.
    pub fn new(data: &Path) -> Sealer {
        Sealer {
            path: data.join(KEY_FILE),
            key: Mutex::new(None),
        }
    }

    /// The key and its id, read or created.
    fn key(&self, create: bool) -> Result<Option<Arc<(LessSafeKey, String)>>> {
        let mut slot = self.key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = &*slot {
            return Ok(Some(k.clone()));
        }
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut b = vec![0u8; 32];
                crate::entropy::secret(&mut b).map_err(|_| {
                    anyhow::anyhow!(
                        "the kernel's random pool is not ready yet to make the node key"
                    )
                })?;
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                crate::state::write_atomic(&self.path, &b, true, crate::state::Secrecy::Secret)?;
                b
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        if bytes.len() != 32 {
            bail!(
                "{} holds {} bytes, not a 32-byte key",
                self.path.display(),
                bytes.len()
            );
        }
        let id = hex::encode(
            &Sha256::digest([b"appliance.secrets.keyid\0".as_slice(), &bytes].concat())[..8],
        );
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| anyhow::anyhow!("bad key"))?,
        );
        let k = Arc::new((key, id));
        *slot = Some(k.clone());
        Ok(Some(k))
    }

    /// `clear` sealed, bound to `aad`.
    pub fn seal(&self, clear: &str, aad: &[u8]) -> Result<String> {
        let k = self.key(true)?.expect("created");
        let mut nonce = [0u8; NONCE_LEN];
        crate::entropy::secret(&mut nonce)
            .map_err(|_| anyhow::anyhow!("the kernel's random pool is not ready yet"))?;
        let mut buf = clear.as_bytes().to_vec();
        k.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}:{}", k.1, B64.encode(out)))
    }

    /// Opens a sealed value bound to `aad`; errors say why it cannot be.
    pub fn open(&self, sealed: &str, aad: &[u8]) -> Result<String> {
        let rest = sealed.strip_prefix(PREFIX).context("not a sealed value")?;
        let (id, b64) = rest
            .split_once(':')
            .context("a sealed value without a key id")?;
        let Some(k) = self.key(false)? else {
            bail!("it was sealed by node key {id}, and this node has no key yet: set the password again on this node");
        };
        if k.1 != id {
            bail!(
                "it was sealed by another node (key {id}; this node's is {}): set the password again on this node",
                k.1
            );
        }
        let raw = B64
            .decode(b64)
            .context("a sealed value that is not base64url")?;
        if raw.len() < NONCE_LEN {
            bail!("a sealed value too short to hold a nonce");
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let mut ct = ct.to_vec();
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
        let clear = k
            .0
            .open_in_place(nonce, Aad::from(aad), &mut ct)
            .map_err(|_| {
                anyhow::anyhow!(
                    "it was sealed for other power settings (type, address, user or id changed since): set the password again"
                )
            })?;
        String::from_utf8(clear.to_vec()).context("a sealed password that is not UTF-8")
    }

    /// Whether `sealed` was sealed with this node's key.
    pub fn is_ours(&self, sealed: &str) -> bool {
        let id = sealed
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once(':'))
            .map(|(id, _)| id);
        match (id, self.key(false)) {
            (Some(id), Ok(Some(k))) => k.1 == id,
            _ => false,
        }
    }
}

static NODE: OnceLock<Arc<Sealer>> = OnceLock::new();

/// Sets this process's node sealer (`serve` at start).
pub fn init(sealer: Arc<Sealer>) {
    let _ = NODE.set(sealer);
}

/// This process's node sealer, when `serve` set one.
pub fn node() -> Option<&'static Arc<Sealer>> {
    NODE.get()
}

/// The password the power drivers send: a clear one as stored, a sealed
/// one opened with this node's key and the settings it is bound to.
pub fn power_password(p: &Power) -> Result<String> {
    if !is_sealed(&p.password) {
        return Ok(p.password.clone());
    }
    let Some(s) = node() else {
        bail!("power.password is sealed and this process has no node key");
    };
    s.open(&p.password, &power_aad(p))
        .context("power.password cannot be opened")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn power(address: &str) -> Power {
        Power {
            kind: "redfish".into(),
            address: address.into(),
            user: "admin".into(),
            password: String::new(),
            id: String::new(),
        }
    }

    #[test]
    fn seals_opens_and_binds_to_the_settings_and_the_node() {
        let d = tempfile::tempdir().unwrap();
        let s = Sealer::new(d.path());
        let p = power("https://10.0.0.5");
        let sealed = s.seal("hunter2", &power_aad(&p)).unwrap();
        assert!(
            is_sealed(&sealed) && !sealed.contains("hunter2"),
            "{sealed}"
        );
        assert!(s.is_ours(&sealed));
        assert_eq!(s.open(&sealed, &power_aad(&p)).unwrap(), "hunter2");
        // Two seals of the same password differ (fresh nonce).
        assert_ne!(s.seal("hunter2", &power_aad(&p)).unwrap(), sealed);
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(d.path().join(KEY_FILE)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        // Pointed at another BMC: it does not open.
        let e = s
            .open(&sealed, &power_aad(&power("https://10.6.6.6")))
            .unwrap_err();
        assert!(format!("{e:#}").contains("other power settings"), "{e:#}");
        // A flipped byte does not open.
        let mut bad = sealed.clone().into_bytes();
        let n = bad.len() - 2;
        bad[n] = if bad[n] == b'A' { b'B' } else { b'A' };
        assert!(s
            .open(std::str::from_utf8(&bad).unwrap(), &power_aad(&p))
            .is_err());
        // Another node's key does not open it, and says so.
        let other = tempfile::tempdir().unwrap();
        let o = Sealer::new(other.path());
        let e = o.open(&sealed, &power_aad(&p)).unwrap_err();
        assert!(format!("{e:#}").contains("set the password again"), "{e:#}");
        o.seal("x", b"").unwrap();
        let e = o.open(&sealed, &power_aad(&p)).unwrap_err();
        assert!(format!("{e:#}").contains("another node"), "{e:#}");
        // The key survives a restart (a new sealer reads the file).
        let again = Sealer::new(d.path());
        assert_eq!(again.open(&sealed, &power_aad(&p)).unwrap(), "hunter2");
    }
}
