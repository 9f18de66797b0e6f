//! Positioned output: where writers put the bytes of a filesystem or a disk.
//!
//! A [`Sink`] receives `(offset, bytes)` writes. Regions never written stay
//! zero (holes in a sparse file), which is how a 4 GiB image with 200 MiB of
//! data occupies about 200 MiB on disk.
//!
//! **Contract:** a sink starts all-zero (a fresh sparse file, an empty `Vec`),
//! so writers never write runs of zeros: free space, empty tables and
//! journal bodies are simply not written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned writes into an image.
pub trait Sink {
    /// Write `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
}

impl Sink for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
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
}

/// A sink that remembers which byte ranges were written, so a reader can
/// skip the holes (everything else is zero by the sink contract).
pub struct Tracked<S> {
    pub inner: S,
    /// start → end of written ranges, merged when they touch.
    extents: std::collections::BTreeMap<u64, u64>,
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
}
