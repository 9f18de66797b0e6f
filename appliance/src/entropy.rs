//! Randomness that never holds up the boot, and the seed kept for the next
//! boot.
//!
//! On a machine without a hardware RNG (QEMU without `virtio-rng`, TCG
//! without RDRAND) the kernel's random pool is not initialized at boot;
//! until it is, `getrandom(2)` without flags blocks, and so does everything
//! built on it (`uuid::Uuid::new_v4`, `rand`, the `getrandom` crate). A
//! caller blocked in `getrandom(2)` makes the kernel gather timing jitter
//! and the pool is ready within about a second (1 s under TCG, one vCPU);
//! but in our static glibc binary the `getrandom` crate finds no
//! `getrandom` through `dlsym` and falls back to polling `/dev/random`,
//! which waits passively for interrupts: that held the first boot's DHCP
//! (a `Uuid::new_v4` transaction id) for 340–410 s. The appliance's rule:
//!
//! - **Nothing on the way to the network and the API waits for entropy.**
//!   What needs uniqueness but no secrecy — DHCP transaction ids, node and
//!   job ids, temporary names — comes from [`unique_uuid`] / [`fast_u32`] /
//!   [`fast_bytes`]: `getrandom(GRND_INSECURE)` (Linux ≥ 5.6; else
//!   `/dev/urandom`, which never blocks either), hashed together with the
//!   clocks, the process id, a counter and this machine's identifiers
//!   (DMI UUID and serials, MAC addresses, the kernel's boot id), so two
//!   machines booting the same image in the same way still differ.
//! - **Secrets need an initialized pool and never wait for it in a request
//!   or on the boot path.** [`secret`] uses `GRND_NONBLOCK` and answers
//!   [`NotReady`] while the pool is not initialized; the API turns that into
//!   503. Only background threads wait ([`wait_ready`], `getrandom(2)`
//!   itself, so the kernel gathers jitter): init's seed saver and serve's
//!   first-token thread, which say on the console what they wait for.
//!
//! # The random seed (`<data>/state/random-seed`)
//!
//! As systemd-random-seed does: 512 bytes, mode 0600, only ever written
//! from an initialized pool. At boot, once `/data` is mounted and before
//! the network, init reads it, mixes it into the kernel's pool and credits
//! it (`RNDADDENTROPY`), so the pool is ready at once, then immediately
//! replaces the file with fresh bytes (temporary file, fsync, rename, fsync
//! of the directory), so a seed is never used twice. When the pool is not
//! ready (first boot: there is no seed yet), the old file is removed and a
//! background thread writes a new seed as soon as the pool is ready. At
//! shutdown the seed is refreshed again. A copy of a stopped node's data
//! partition carries the same seed as the original: clear
//! `state/random-seed` in such copies (as for `state/node.json`).

// One ioctl (RNDADDENTROPY) has no safe wrapper; see `ioctl` below.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use rustix::io::Errno;
use rustix::rand::{getrandom, GetRandomFlags};
use sha2::{Digest, Sha256};

use crate::contract::RANDOM_SEED;

/// Size of the seed file: what systemd-random-seed keeps, and 16 times
/// what the kernel needs to initialize its pool.
pub const SEED_SIZE: usize = 512;

/// The kernel's random pool is not initialized yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the kernel's random pool is not initialized yet (no hardware RNG and no \
     saved seed on this boot); try again in a few minutes"
)]
pub struct NotReady;

/// Fills `buf` from the initialized pool, without waiting.
pub fn secret(buf: &mut [u8]) -> Result<(), NotReady> {
    let mut done = 0;
    while done < buf.len() {
        match getrandom(&mut buf[done..], GetRandomFlags::NONBLOCK) {
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(_) => return Err(NotReady),
        }
    }
    Ok(())
}

/// `n` secret bytes as lowercase hex.
pub fn secret_hex(n: usize) -> Result<String, NotReady> {
    let mut b = vec![0u8; n];
    secret(&mut b)?;
    Ok(hex::encode(b))
}

/// Whether the kernel's random pool is initialized.
pub fn is_ready() -> bool {
    secret(&mut [0u8; 1]).is_ok()
}

/// Blocks until the kernel's random pool is initialized. For background
/// threads only: never call it on the boot path or in a request.
pub fn wait_ready() {
    let mut b = [0u8; 1];
    loop {
        match getrandom(&mut b[..], GetRandomFlags::empty()) {
            Ok(_) => return,
            Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "getrandom failed; polling");
                std::thread::sleep(std::time::Duration::from_secs(1));
                if is_ready() {
                    return;
                }
            }
        }
    }
}

/// Bytes from the kernel that never block: `GRND_INSECURE` where the kernel
/// has it (5.6), else `/dev/urandom`. Not hashed; see [`fast_bytes`].
fn kernel_insecure(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match getrandom(&mut buf[done..], GetRandomFlags::INSECURE) {
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(_) => break,
        }
    }
    if done == buf.len() {
        return true;
    }
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, buf))
        .is_ok()
}

/// What makes this machine differ from others booting the same image:
/// read once per process.
fn machine_salt() -> &'static [u8; 32] {
    static SALT: OnceLock<[u8; 32]> = OnceLock::new();
    SALT.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(b"appliance machine salt v1\0");
        for f in [
            "/sys/class/dmi/id/product_uuid",
            "/sys/class/dmi/id/product_serial",
            "/sys/class/dmi/id/board_serial",
            "/sys/class/dmi/id/chassis_serial",
            "/proc/sys/kernel/random/boot_id",
            "/etc/hostname",
        ] {
            if let Ok(b) = std::fs::read(f) {
                h.update(f.as_bytes());
                h.update((b.len() as u64).to_le_bytes());
                h.update(&b);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
            let mut macs: Vec<Vec<u8>> = dir
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("address")).ok())
                .collect();
            macs.sort();
            for m in macs {
                h.update(&m);
            }
        }
        h.finalize().into()
    })
}

/// Unique, unpredictable-enough bytes that never wait for the kernel's
/// pool: for ids and transaction ids, never for secrets.
pub fn fast_bytes(out: &mut [u8]) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut kernel = [0u8; 32];
    let from_kernel = kernel_insecure(&mut kernel);
    let salt = machine_salt();
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut h = Sha256::new();
        h.update(b"appliance fast bytes v1\0");
        h.update(kernel);
        h.update([u8::from(from_kernel)]);
        h.update(salt);
        for id in [
            rustix::time::ClockId::Realtime,
            rustix::time::ClockId::Monotonic,
            rustix::time::ClockId::Boottime,
        ] {
            let t = rustix::time::clock_gettime(id);
            h.update(t.tv_sec.to_le_bytes());
            h.update(t.tv_nsec.to_le_bytes());
        }
        h.update(std::process::id().to_le_bytes());
        h.update(format!("{:?}", std::thread::current().id()).as_bytes());
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.update((i as u64).to_le_bytes());
        let d = h.finalize();
        chunk.copy_from_slice(&d[..chunk.len()]);
    }
}

/// A random-looking `u32` that never waits (DHCP transaction ids).
pub fn fast_u32() -> u32 {
    let mut b = [0u8; 4];
    fast_bytes(&mut b);
    u32::from_le_bytes(b)
}

/// A version 4 UUID that never waits: unique, not secret (node ids, job
/// ids, temporary names). `uuid::Uuid::new_v4` blocks until the pool is
/// initialized.
pub fn unique_uuid() -> uuid::Uuid {
    let mut b = [0u8; 16];
    fast_bytes(&mut b);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// The kernel's random pool, as the seed logic uses it (a trait so tests
/// can stand in for the kernel: crediting needs CAP_SYS_ADMIN and would
/// change the test host's pool).
pub trait Pool {
    /// Mixes `bytes` into the pool and credits `bits` of entropy.
    fn credit(&mut self, bytes: &[u8], bits: u32) -> io::Result<()>;
    /// Mixes `bytes` into the pool without crediting.
    fn mix(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Fills `buf` from the initialized pool, or [`NotReady`].
    fn secret(&mut self, buf: &mut [u8]) -> Result<(), NotReady>;
}

/// The running kernel.
#[derive(Debug, Default)]
pub struct Kernel;

impl Pool for Kernel {
    fn credit(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        ioctl::add_entropy(&f, bytes, bits)
    }

    fn mix(&mut self, bytes: &[u8]) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?
            .write_all(bytes)
    }

    fn secret(&mut self, buf: &mut [u8]) -> Result<(), NotReady> {
        secret(buf)
    }
}

/// What happened to the saved seed at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedUse {
    /// There was none (first boot, or the last boot never had a ready pool).
    Missing,
    /// Mixed in and credited: the pool is initialized.
    Credited { bytes: usize },
    /// Mixed in, but crediting failed (`reason`); the pool may still wait.
    Mixed { bytes: usize, reason: String },
}

/// The outcome of [`use_seed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSeed {
    pub used: SeedUse,
    /// A fresh seed replaced the old one; `false`: the pool is not ready,
    /// the old seed (if any) was removed and a new one is still to write.
    pub saved: bool,
}

/// At boot: feeds `<data>/state/random-seed` to `pool` (credited), then
/// replaces it at once with fresh bytes, or removes it when the pool is not
/// ready to give any, so no seed is ever used twice.
pub fn use_seed(data: &Path, pool: &mut dyn Pool) -> Result<BootSeed> {
    let path = data.join(RANDOM_SEED);
    let old = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let used = if old.is_empty() {
        SeedUse::Missing
    } else {
        let bits = u32::try_from(old.len().saturating_mul(8)).unwrap_or(u32::MAX);
        match pool.credit(&old, bits) {
            Ok(()) => SeedUse::Credited { bytes: old.len() },
            Err(e) => {
                let reason = format!("crediting the seed: {e}");
                match pool.mix(&old) {
                    Ok(()) => SeedUse::Mixed {
                        bytes: old.len(),
                        reason,
                    },
                    Err(e2) => SeedUse::Mixed {
                        bytes: 0,
                        reason: format!("{reason}; writing it to /dev/urandom: {e2}"),
                    },
                }
            }
        }
    };
    let saved = save_seed(data, pool)?;
    if !saved && !old.is_empty() {
        // Never use a seed twice: without fresh bytes, no seed at all.
        std::fs::remove_file(&path)
            .with_context(|| format!("removing the used seed {}", path.display()))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
    }
    Ok(BootSeed { used, saved })
}

/// Writes a fresh seed from the initialized pool (temporary file with mode
/// 0600, fsync, rename, fsync of the directory). Returns `false`, writing
/// nothing, when the pool is not ready.
pub fn save_seed(data: &Path, pool: &mut dyn Pool) -> Result<bool> {
    let mut seed = [0u8; SEED_SIZE];
    if pool.secret(&mut seed).is_err() {
        return Ok(false);
    }
    let path = data.join(RANDOM_SEED);
    let dir = path.parent().expect("the seed file has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".random-seed.tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&seed)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

mod ioctl {
    //! `RNDADDENTROPY`, the one way to credit entropy to the kernel's pool
    //! (writing to `/dev/urandom` mixes without crediting). rustix has no
    //! safe wrapper for it.
    #![allow(unsafe_code)]

    use std::ffi::c_int;
    use std::fs::File;
    use std::io;

    use rustix::ioctl::{ioctl, opcode, Opcode, Setter};

    use super::SEED_SIZE;

    /// `_IOW('R', 0x03, int[2])`.
    const RNDADDENTROPY: Opcode = opcode::write::<[c_int; 2]>(b'R', 0x03);

    /// `struct rand_pool_info` with room for one seed: the kernel reads the
    /// two ints, then `buf_size` bytes after them.
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: c_int,
        buf_size: c_int,
        buf: [u8; SEED_SIZE],
    }

    /// Mixes `bytes` (at most [`SEED_SIZE`]) into the pool and credits
    /// `bits`. Needs CAP_SYS_ADMIN.
    pub fn add_entropy(urandom: &File, bytes: &[u8], bits: u32) -> io::Result<()> {
        let bytes = &bytes[..bytes.len().min(SEED_SIZE)];
        let mut info = RandPoolInfo {
            entropy_count: c_int::try_from(bits.min(bytes.len() as u32 * 8)).unwrap_or(c_int::MAX),
            buf_size: bytes.len() as c_int,
            buf: [0; SEED_SIZE],
        };
        info.buf[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` through its
        // argument: `entropy_count`, `buf_size`, then `buf_size` bytes.
        // `RandPoolInfo` has that C layout and `buf_size` never exceeds its
        // array; the kernel only reads it.
        unsafe { ioctl(urandom, Setter::<RNDADDENTROPY, RandPoolInfo>::new(info)) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that records what it was given.
    #[derive(Default)]
    struct Fake {
        ready: bool,
        credit_fails: bool,
        credited: Vec<(Vec<u8>, u32)>,
        mixed: Vec<Vec<u8>>,
        next: u8,
    }

    impl Pool for Fake {
        fn credit(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
            if self.credit_fails {
                return Err(io::Error::from_raw_os_error(1));
            }
            self.credited.push((bytes.to_vec(), bits));
            self.ready = true;
            Ok(())
        }
        fn mix(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.mixed.push(bytes.to_vec());
            Ok(())
        }
        fn secret(&mut self, buf: &mut [u8]) -> Result<(), NotReady> {
            if !self.ready {
                return Err(NotReady);
            }
            self.next = self.next.wrapping_add(1);
            buf.fill(self.next);
            Ok(())
        }
    }

    fn seed(data: &Path) -> Option<Vec<u8>> {
        std::fs::read(data.join(RANDOM_SEED)).ok()
    }

    #[test]
    fn first_boot_without_a_ready_pool_writes_nothing_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Fake::default();
        let r = use_seed(dir.path(), &mut pool).unwrap();
        assert_eq!(
            r,
            BootSeed {
                used: SeedUse::Missing,
                saved: false
            }
        );
        assert!(seed(dir.path()).is_none());
        // Later, once the pool is ready, the saver writes one.
        pool.ready = true;
        assert!(save_seed(dir.path(), &mut pool).unwrap());
        assert_eq!(seed(dir.path()).unwrap(), vec![1u8; SEED_SIZE]);
    }

    #[test]
    fn a_saved_seed_is_credited_once_and_replaced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Fake {
            ready: true,
            ..Fake::default()
        };
        assert!(save_seed(dir.path(), &mut pool).unwrap());
        let first = seed(dir.path()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(RANDOM_SEED))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Next boot: a pool that is not ready until the seed is credited.
        let mut boot = Fake {
            next: 10,
            ..Fake::default()
        };
        let r = use_seed(dir.path(), &mut boot).unwrap();
        assert_eq!(r.used, SeedUse::Credited { bytes: SEED_SIZE });
        assert!(r.saved);
        assert_eq!(boot.credited, vec![(first.clone(), (SEED_SIZE * 8) as u32)]);
        let second = seed(dir.path()).unwrap();
        assert_ne!(second, first, "a seed was kept for reuse");
        assert_eq!(second, vec![11u8; SEED_SIZE]);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["random-seed"]);
    }

    #[test]
    fn a_seed_that_cannot_be_credited_is_mixed_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join(RANDOM_SEED), [7u8; 100]).unwrap();
        let mut pool = Fake {
            credit_fails: true,
            ..Fake::default()
        };
        let r = use_seed(dir.path(), &mut pool).unwrap();
        assert!(
            matches!(&r.used, SeedUse::Mixed { bytes: 100, reason } if reason.contains("crediting")),
            "{r:?}"
        );
        assert!(!r.saved);
        assert_eq!(pool.mixed, vec![vec![7u8; 100]]);
        assert!(
            seed(dir.path()).is_none(),
            "the used seed was left in place"
        );
    }

    #[test]
    fn an_empty_seed_file_counts_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join(RANDOM_SEED), b"").unwrap();
        let mut pool = Fake {
            ready: true,
            ..Fake::default()
        };
        let r = use_seed(dir.path(), &mut pool).unwrap();
        assert_eq!(r.used, SeedUse::Missing);
        assert!(r.saved);
        assert!(pool.credited.is_empty());
        assert_eq!(seed(dir.path()).unwrap().len(), SEED_SIZE);
    }

    #[test]
    fn fast_randomness_differs_between_calls_and_uuids_are_v4() {
        let a = unique_uuid();
        let b = unique_uuid();
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 4);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        let mut x = [0u8; 100];
        let mut y = [0u8; 100];
        fast_bytes(&mut x);
        fast_bytes(&mut y);
        assert_ne!(x, y);
        assert_ne!(fast_u32(), fast_u32());
    }

    #[test]
    fn secrets_come_from_the_ready_pool() {
        // The test host's pool is initialized.
        assert!(is_ready());
        let a = secret_hex(32).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, secret_hex(32).unwrap());
    }
}
