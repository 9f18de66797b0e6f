//! Positioned output: where writers put the bytes of a filesystem or a disk.
//!
//! A [`Sink`] receives `(offset, bytes)` writes. Regions never written stay
//! zero (holes in a sparse file), which is how a 4 GiB image with 200 MiB of
//! data occupies about 200 MiB on disk.
//!
//! **Contract:** a sink starts all-zero (a fresh sparse file, an empty `Vec`),
//! so writers never write runs of zeros: free space, empty tables and
//! journal bodies are simply not written.
//!
//! Writers that emit in ascending order say so with [`Sink::settle`], which
//! lets [`write_hashed`] hash an image on a second thread while it is still
//! being written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Positioned writes into an image.
pub trait Sink {
    /// Write `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// A promise: no later write lands below `offset`. A hint for sinks
    /// that read what was written before the writer is done; the default
    /// ignores it. Breaking the promise is a bug that costs time, never
    /// correctness ([`write_hashed`] notices and hashes again).
    fn settle(&mut self, _offset: u64) {}

    /// A handle to read back what was written, usable while writing goes
    /// on, when the sink has one (a file opened for reading too).
    fn read_back(&self) -> Option<ReadBack> {
        None
    }
}

/// Reads back what a sink wrote (see [`Sink::read_back`]); offsets are
/// those of the sink it came from.
pub struct ReadBack {
    file: File,
    base: u64,
}

impl ReadBack {
    fn of(file: &File) -> Option<ReadBack> {
        // A zero-byte read fails on a file not opened for reading.
        file.read_at(&mut [], 0).ok()?;
        Some(ReadBack {
            file: file.try_clone().ok()?,
            base: 0,
        })
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, self.base + offset)
    }
}

impl Sink for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn read_back(&self) -> Option<ReadBack> {
        ReadBack::of(self)
    }
}

impl Sink for &File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(*self, data, offset)
    }

    fn read_back(&self) -> Option<ReadBack> {
        ReadBack::of(self)
    }
}

impl Sink for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset as usize + data.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// A window `[base, base + len)` of another sink: offsets are relative to
/// `base`, and a write past `len` is an error instead of a corrupted neighbour.
/// Promises ([`Sink::settle`]) are passed on shifted by `base`, so they hold
/// for the whole image only when its windows are written in ascending order
/// (as `plan` writes partitions).
pub struct Window<'a> {
    inner: &'a mut dyn Sink,
    base: u64,
    len: u64,
}

impl<'a> Window<'a> {
    pub fn new(inner: &'a mut dyn Sink, base: u64, len: u64) -> Self {
        Window { inner, base, len }
    }
}

impl Sink for Window<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {offset} runs past the end of a {}-byte region",
                    data.len(),
                    self.len
                ),
            ));
        }
        self.inner.write_at(self.base + offset, data)
    }

    fn settle(&mut self, offset: u64) {
        self.inner.settle(self.base + offset.min(self.len));
    }

    fn read_back(&self) -> Option<ReadBack> {
        let mut r = self.inner.read_back()?;
        r.base += self.base;
        Some(r)
    }
}

/// A sink that remembers which byte ranges were written, so a reader can
/// skip the holes (everything else is zero by the sink contract).
pub struct Tracked<S> {
    pub inner: S,
    /// start → end of written ranges, merged when they touch.
    extents: BTreeMap<u64, u64>,
}

impl<S: Sink> Tracked<S> {
    pub fn new(inner: S) -> Self {
        Tracked {
            inner,
            extents: Default::default(),
        }
    }

    /// The written ranges, sorted and disjoint.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.extents.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// The written ranges clipped to `[from, to)`.
    fn extents_in(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let first = self
            .extents
            .range(..=from)
            .next_back()
            .map_or(from, |(&s, _)| s);
        self.extents
            .range(first..to)
            .map(|(&s, &e)| (s.max(from), e.min(to)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    fn record(&mut self, start: u64, end: u64) {
        let (mut start, mut end) = (start, end);
        // Merge with a range that begins at or before `start` and reaches it.
        if let Some((&s, &e)) = self.extents.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Absorb every range that begins inside [start, end].
        let inside: Vec<u64> = self.extents.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            end = end.max(self.extents.remove(&s).unwrap_or(end));
        }
        self.extents.insert(start, end);
    }
}

impl<S: Sink> Sink for Tracked<S> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, data)?;
        if !data.is_empty() {
            self.record(offset, offset + data.len() as u64);
        }
        Ok(())
    }

    fn settle(&mut self, offset: u64) {
        self.inner.settle(offset);
    }

    fn read_back(&self) -> Option<ReadBack> {
        self.inner.read_back()
    }
}

/// Hand the hasher a new stretch once the promise is this far ahead.
const HASH_STEP: u64 = 8 << 20;

/// One stretch of the file for the hasher: everything below `end` is
/// final; `data` are the written ranges in it (the rest is zeros).
struct Stretch {
    end: u64,
    data: Vec<(u64, u64)>,
}

/// The sink [`write_hashed`] hands its writer: a file of fixed size whose
/// settled prefix is hashed on another thread.
pub struct Hashed<'f> {
    file: Tracked<&'f File>,
    size: u64,
    /// The hasher has been given `[0, sent)`.
    sent: u64,
    /// The highest promise so far.
    settled: u64,
    /// A write landed below `sent`: the running digest is wrong.
    broken: bool,
    tx: Option<Sender<Stretch>>,
}

impl Hashed<'_> {
    fn send(&mut self, end: u64) {
        if end <= self.sent {
            return;
        }
        let data = self.file.extents_in(self.sent, end);
        if let Some(tx) = &self.tx {
            // A hasher that hung up has failed; `write_hashed` reports why.
            let _ = tx.send(Stretch { end, data });
        }
        self.sent = end;
    }
}

impl Sink for Hashed<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset < self.sent && !data.is_empty() {
            self.broken = true;
        }
        self.file.write_at(offset, data)
    }

    fn settle(&mut self, offset: u64) {
        self.settled = self.settled.max(offset.min(self.size));
        if self.settled >= self.sent + HASH_STEP {
            self.send(self.settled);
        }
    }

    fn read_back(&self) -> Option<ReadBack> {
        self.file.read_back()
    }
}

/// Run `write` over `file` (already `size` bytes long and all zero) and
/// compute the sha256 of the whole file meanwhile: a second thread hashes
/// each stretch the writer has settled ([`Sink::settle`]), reading back the
/// written ranges and hashing the holes as zeros without reading them.
/// Settling early overlaps hashing with writing; a writer that never
/// settles gets the file hashed at the end, and one that writes below a
/// settled offset gets it hashed again, so the digest is always that of
/// the final bytes. When `write` fails the hasher stops and its error is
/// returned.
pub fn write_hashed<T, E>(
    file: &File,
    size: u64,
    write: impl FnOnce(&mut Hashed<'_>) -> Result<T, E>,
) -> Result<(T, io::Result<Digest>), E> {
    let abort = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let hasher = scope.spawn(|| hash_stretches(file, rx, &abort));
        let mut sink = Hashed {
            file: Tracked::new(file),
            size,
            sent: 0,
            settled: 0,
            broken: false,
            tx: Some(tx),
        };
        let result = write(&mut sink);
        if result.is_err() {
            abort.store(true, Ordering::Relaxed);
        } else {
            sink.send(size);
        }
        sink.tx = None;
        let digest = match hasher.join() {
            Ok(d) => d,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let t = result?;
        let digest = match digest {
            Ok(_) if sink.broken => hash_sparse(file, &sink.file.extents(), size).map(|(d, _)| d),
            other => other,
        };
        Ok((t, digest))
    })
}

/// The hasher thread of [`write_hashed`].
fn hash_stretches(file: &File, rx: Receiver<Stretch>, abort: &AtomicBool) -> io::Result<Digest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = 0;
    for s in rx {
        if abort.load(Ordering::Relaxed) {
            return Err(io::Error::other("the write failed"));
        }
        pos = hash_range(&mut h, file, &mut buf, pos, &s.data, s.end)?;
    }
    Ok(Digest(h.finalize().into()))
}

/// Read size for hashing: small enough to stay in the CPU cache between
/// the copy and the hash.
const READ_CHUNK: usize = 256 << 10;

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Feed `[pos, end)` of `file` to `h`: `data` (sorted, disjoint, inside
/// the range) is read, the rest hashed as zeros. Returns `end`.
fn hash_range(
    h: &mut Sha256,
    file: &File,
    buf: &mut [u8],
    pos: u64,
    data: &[(u64, u64)],
    end: u64,
) -> io::Result<u64> {
    let zeros = |h: &mut Sha256, from: u64, to: u64| {
        let mut left = to.saturating_sub(from);
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..n]);
            left -= n as u64;
        }
    };
    let mut pos = pos;
    for &(start, stop) in data {
        let stop = stop.min(end);
        if start >= stop {
            continue;
        }
        zeros(h, pos, start);
        let mut off = start;
        while off < stop {
            let n = ((stop - off) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], off)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        pos = stop;
    }
    zeros(h, pos, end);
    Ok(end.max(pos))
}

/// sha256 of a file of `size` bytes whose only non-zero bytes lie in
/// `extents` (sorted, disjoint): the written ranges are read, the holes
/// hashed as zeros without reading them (reading a hole would fill the
/// page cache with zero pages). Returns the digest and `size`.
pub fn hash_sparse(file: &File, extents: &[(u64, u64)], size: u64) -> io::Result<(Digest, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    hash_range(&mut h, file, &mut buf, 0, extents, size)?;
    Ok((Digest(h.finalize().into()), size))
}

/// Reads until `buf` is full or the reader ends; the bytes read.
pub(crate) fn read_full(r: &mut dyn io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds() {
        let mut v = Vec::new();
        {
            let mut w = Window::new(&mut v, 10, 4);
            w.write_at(0, b"abcd").unwrap();
            assert!(w.write_at(1, b"abcd").is_err());
        }
        assert_eq!(&v[10..14], b"abcd");
    }

    #[test]
    fn tracked_merges_extents() {
        let mut t = Tracked::new(Vec::new());
        for (o, n) in [
            (10u64, 5usize),
            (0, 3),
            (15, 5),
            (30, 1),
            (2, 9),
            (100, 0),
            (29, 2),
        ] {
            t.write_at(o, &vec![1; n]).unwrap();
        }
        assert_eq!(t.extents(), vec![(0, 20), (29, 31)]);
    }

    fn scratch(size: u64) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        f.set_len(size).unwrap();
        (dir, f)
    }

    fn sha256_of(f: &File) -> Digest {
        let mut f = f.try_clone().unwrap();
        io::Seek::seek(&mut f, io::SeekFrom::Start(0)).unwrap();
        Digest::of_reader(f).unwrap().0
    }

    /// Writes spread over several hash stretches, some settled, some not.
    fn writes(s: &mut dyn Sink, settle: bool) {
        for i in 0..40u64 {
            let at = i * 3 * MIB + i * 7;
            s.write_at(at, &vec![i as u8 + 1; 100_000 + i as usize])
                .unwrap();
            if settle {
                s.settle(at + 100_000 + i);
            }
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn hashed_while_written_is_the_file_digest() {
        let size = 130 * MIB + 512;
        for settle in [true, false] {
            let (_dir, f) = scratch(size);
            let ((), d) = write_hashed(&f, size, |s| {
                writes(s, settle);
                Ok::<_, io::Error>(())
            })
            .unwrap();
            assert_eq!(d.unwrap(), sha256_of(&f), "settle: {settle}");
        }
    }

    #[test]
    fn a_write_below_a_settled_offset_is_still_hashed() {
        let size = 64 * MIB;
        let (_dir, f) = scratch(size);
        let ((), d) = write_hashed(&f, size, |s| {
            s.write_at(0, b"first").unwrap();
            // The first 40 MiB go to the hasher now...
            s.settle(40 * MIB);
            // ...so this write breaks the promise.
            s.write_at(MIB, b"too late").unwrap();
            Ok::<_, io::Error>(())
        })
        .unwrap();
        assert_eq!(d.unwrap(), sha256_of(&f));
    }

    #[test]
    fn a_failed_write_stops_the_hasher_and_is_returned() {
        let size = 64 * MIB;
        let (_dir, f) = scratch(size);
        let r = write_hashed(&f, size, |s| {
            writes(s, true);
            Err::<(), _>("no space")
        });
        assert!(matches!(r, Err("no space")));
    }

    #[test]
    fn read_back_through_a_window() {
        let (_dir, f) = scratch(MIB);
        let mut f = f;
        let mut w = Window::new(&mut f, 4096, 8192);
        w.write_at(10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        w.read_back().unwrap().read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        // A file opened only for writing cannot read back.
        let dir = tempfile::tempdir().unwrap();
        let wo = File::create(dir.path().join("wo")).unwrap();
        assert!(wo.read_back().is_none());
    }
}
