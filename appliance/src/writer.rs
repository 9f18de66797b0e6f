//! The verified image writer: lays a block-mapped image ([`crate::bmap`])
//! onto a disk or file so that a half-written disk never boots.
//!
//! Order of work ([`write_image`]):
//! 1. refuse a target smaller than the image, before writing anything;
//! 2. zero the target's first and last MiB (no old partition table
//!    survives) and sync;
//! 3. fetch every range from a [`ChunkSource`], check its sha256 against
//!    the map (refetching a bad chunk a few times), and write it; ranges
//!    touching the image's first or last MiB (the partition tables) are
//!    held back in memory;
//! 4. sync, drop the cache, read every written range back and check it;
//! 5. finish: on a larger target grow the GPT (backup at the real end, the
//!    last partition extended), write the held-back tail and the backup
//!    GPT, sync, then the held-back first MiB with the primary GPT, sync,
//!    and read those back too; a block device re-reads its partitions.
//!
//! Sources: [`FileSource`] (a local image or block device) and
//! [`HttpSource`] (HTTP `Range` requests that resume where a dropped
//! connection stopped).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::bmap::{digest_of, Bmap, Range};

/// The first and last MiB: zeroed first, written last.
pub const EDGE: u64 = 1 << 20;

/// Where image bytes come from.
pub trait ChunkSource {
    /// Exactly `len` bytes of the image at `offset`.
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Transport-level retries so far (reconnects, resumed bodies).
    fn retries(&self) -> u64 {
        0
    }
}

/// A local image file (or block device), read with `pread`.
pub struct FileSource {
    file: File,
    path: PathBuf,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(FileSource {
            file,
            path: path.to_owned(),
        })
    }
}

impl ChunkSource for FileSource {
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset).with_context(|| {
            format!(
                "reading {} bytes of {} at {offset}",
                len,
                self.path.display()
            )
        })?;
        Ok(buf)
    }
}

/// How [`HttpSource`] retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Give up when a range has made no progress for this long.
    pub give_up_after: Duration,
    /// First wait between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Per-request connect and response-header timeouts; a body may take
    /// four times as long before the attempt is cut (and resumed).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            give_up_after: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// An image served over HTTP: `GET <url>` with `Range: bytes=a-b` and an
/// optional bearer token. Connection errors, 5xx answers and short bodies
/// are retried with backoff; the next request asks for exactly the bytes
/// still missing.
pub struct HttpSource {
    url: String,
    token: Option<String>,
    policy: RetryPolicy,
    agent: ureq::Agent,
    retries: u64,
}

/// One attempt's failure.
enum Attempt {
    /// Worth trying again (connection, 5xx, short body).
    Transient(String),
    /// Will not get better (4xx, a server that ignores Range).
    Fatal(anyhow::Error),
}

impl HttpSource {
    pub fn new(url: &str, token: Option<String>, policy: RetryPolicy) -> HttpSource {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(policy.request_timeout))
            .timeout_recv_response(Some(policy.request_timeout))
            // A stalled body ends the attempt; what arrived is kept.
            .timeout_recv_body(Some(policy.request_timeout * 4))
            .build();
        HttpSource {
            url: url.to_owned(),
            token,
            policy,
            agent: ureq::Agent::new_with_config(config),
            retries: 0,
        }
    }

    /// One request for `[from, to]` (inclusive), appending to `buf`.
    fn attempt(&self, from: u64, to: u64, buf: &mut Vec<u8>) -> Result<(), Attempt> {
        let mut req = self
            .agent
            .get(&self.url)
            .header("Range", &format!("bytes={from}-{to}"));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req
            .call()
            .map_err(|e| Attempt::Transient(format!("requesting bytes {from}-{to}: {e}")))?;
        let status = resp.status().as_u16();
        if status >= 500 {
            return Err(Attempt::Transient(format!(
                "HTTP {status} for bytes {from}-{to}"
            )));
        }
        if status != 206 {
            return Err(Attempt::Fatal(anyhow!(
                "{} answered HTTP {status} to a request for bytes {from}-{to} (expected 206 Partial Content)",
                self.url
            )));
        }
        let want = to + 1 - from;
        let before = buf.len();
        let mut reader = resp.body_mut().as_reader().take(want);
        let res = reader.read_to_end(buf);
        let got = (buf.len() - before) as u64;
        match res {
            Ok(_) if got == want => Ok(()),
            Ok(_) => Err(Attempt::Transient(format!(
                "short body: {got} of {want} bytes from offset {from}"
            ))),
            Err(e) => Err(Attempt::Transient(format!(
                "reading bytes {from}-{to} (after {got}): {e}"
            ))),
        }
    }
}

impl ChunkSource for HttpSource {
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len as usize);
        if len == 0 {
            return Ok(buf);
        }
        let mut backoff = self.policy.initial_backoff;
        let mut stalled_since = Instant::now();
        loop {
            let have = buf.len() as u64;
            match self.attempt(offset + have, offset + len - 1, &mut buf) {
                Ok(()) => return Ok(buf),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Transient(why)) => {
                    if buf.len() as u64 > have {
                        // Progress: the outage clock starts again.
                        stalled_since = Instant::now();
                        backoff = self.policy.initial_backoff;
                    }
                    if stalled_since.elapsed() >= self.policy.give_up_after {
                        bail!(
                            "giving up on {} at offset {} after {:?} without progress: {why}",
                            self.url,
                            offset + buf.len() as u64,
                            self.policy.give_up_after
                        );
                    }
                    self.retries += 1;
                    tracing::warn!(url = %self.url, retry = self.retries, "{why}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
            }
        }
    }

    fn retries(&self) -> u64 {
        self.retries
    }
}

/// GET a small document (manifest, signature, block map) whole, retrying
/// connection errors and 5xx answers with backoff for `total`.
pub fn fetch_all(url: &str, total: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + total;
    let mut delay = Duration::from_millis(500);
    loop {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let err = match agent.get(url).call() {
            Ok(mut r) if r.status() == 200 => {
                let mut body = Vec::new();
                match r.body_mut().as_reader().read_to_end(&mut body) {
                    Ok(_) => return Ok(body),
                    Err(e) => format!("reading the body: {e}"),
                }
            }
            Ok(r) if r.status().is_server_error() => {
                format!("HTTP {}", r.status())
            }
            Ok(mut r) => {
                let text = r.body_mut().read_to_string().unwrap_or_default();
                bail!("GET {url}: HTTP {}: {text}", r.status());
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() + delay > deadline {
            bail!("GET {url}: {err} (gave up after {total:?})");
        }
        tracing::warn!(%url, error = %err, "fetch failed; retrying");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Writer options.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Fetches of one chunk before a digest mismatch is an error.
    pub chunk_attempts: u32,
    /// Grow the GPT and last partition on a larger target.
    pub grow: bool,
    /// Zero the image's holes on the target (punched in a file,
    /// `BLKZEROOUT` on a device), so it reads as the image everywhere.
    /// Off, whatever the target held between mapped ranges stays.
    pub zero_holes: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_attempts: 3,
            grow: true,
            zero_holes: true,
        }
    }
}

/// The phase a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Fetching, checking and writing ranges.
    Write,
    /// Reading written ranges back.
    Verify,
    /// Partition tables and the first MiB.
    Finish,
}

/// Progress: `done` of `total` bytes in `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WriteReport {
    pub image_size: u64,
    pub target_size: u64,
    /// Image bytes received from the source (refetches included).
    pub bytes_fetched: u64,
    /// Bytes written to the target (zeroing and tables included).
    pub bytes_written: u64,
    pub write_secs: f64,
    pub verify_secs: f64,
    pub finish_secs: f64,
    /// Hole bytes zeroed (punched or zeroed out), not counted as written.
    pub bytes_zeroed: u64,
    /// Chunk refetches after a digest mismatch plus source retries.
    pub retries: u64,
    /// Whether the GPT was grown to a larger target.
    pub grown: bool,
    /// Why the kernel did not re-read the partition table, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reread_error: Option<String>,
}

/// Bytes to write at an offset.
type Piece = (u64, Vec<u8>);

/// The open target.
struct Target {
    file: File,
    path: PathBuf,
    size: u64,
    block: bool,
    written: u64,
}

impl Target {
    fn open(path: &Path) -> Result<Target> {
        let probe =
            std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
        let block = {
            use std::os::unix::fs::FileTypeExt;
            probe.file_type().is_block_device()
        };
        if !block && !probe.is_file() {
            bail!(
                "{} is neither a block device nor a regular file",
                path.display()
            );
        }
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if block {
            // O_EXCL on a block device: fails while it (or a partition) is
            // mounted or claimed.
            o.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
        }
        let file = o
            .open(path)
            .with_context(|| format!("opening {} for writing", path.display()))?;
        let size = crate::blkdev::size_of(&file)
            .with_context(|| format!("reading the size of {}", path.display()))?;
        Ok(Target {
            file,
            path: path.to_owned(),
            size,
            block,
            written: 0,
        })
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).with_context(|| {
            format!(
                "writing {} bytes to {} at {offset}",
                data.len(),
                self.path.display()
            )
        })?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros.
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let what = || format!("zeroing {len} bytes of {} at {offset}", self.path.display());
        if self.block {
            // BLKZEROOUT wants whole sectors; the odd edges get zeros written.
            let a = offset.next_multiple_of(512);
            let z = (offset + len) / 512 * 512;
            if a < z {
                crate::blkdev::zero_out(&self.file, a, z - a).with_context(what)?;
            }
            for (o, l) in [
                (offset, a.min(offset + len) - offset),
                (z.max(a), (offset + len).saturating_sub(z.max(a))),
            ] {
                if l > 0 {
                    self.file
                        .write_all_at(&vec![0u8; l as usize], o)
                        .with_context(what)?;
                }
            }
            return Ok(());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; EDGE as usize];
                let mut o = offset;
                while o < offset + len {
                    let n = (offset + len - o).min(EDGE);
                    self.file
                        .write_all_at(&zeros[..n as usize], o)
                        .with_context(what)?;
                    o += n;
                }
                Ok(())
            }
            Err(e) => Err(e).with_context(what),
        }
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    /// After a sync: make the next reads come from the medium.
    fn drop_cache(&self) -> Result<()> {
        if self.block {
            crate::blkdev::flush_buffers(&self.file)
                .with_context(|| format!("dropping the buffer cache of {}", self.path.display()))
        } else {
            rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed)
                .with_context(|| format!("dropping the page cache of {}", self.path.display()))
        }
    }

    /// Reads `[offset, offset+len)` back and compares its digest.
    fn verify(&self, offset: u64, len: u64, digest: &str) -> Result<()> {
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("reading back {} at {offset}", self.path.display()))?;
        let got = digest_of(&buf);
        if got != digest {
            bail!(
                "{} reads back different data at offset {offset} ({len} bytes): {got}, written {digest}",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Fetches a range until its digest matches, at most `attempts` times.
fn fetch_verified(
    source: &mut dyn ChunkSource,
    r: &Range,
    attempts: u32,
    report: &mut WriteReport,
) -> Result<Vec<u8>> {
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        let data = source
            .read_range(r.offset, r.length)
            .with_context(|| format!("fetching the chunk at offset {}", r.offset))?;
        report.bytes_fetched += data.len() as u64;
        if data.len() as u64 != r.length {
            last = format!("{} bytes instead of {}", data.len(), r.length);
        } else {
            let got = digest_of(&data);
            if got == r.digest {
                return Ok(data);
            }
            last = format!("digest {got}, expected {}", r.digest);
        }
        if attempt < attempts {
            report.retries += 1;
            tracing::warn!(
                offset = r.offset,
                attempt,
                "chunk rejected ({last}); fetching it again"
            );
        }
    }
    bail!(
        "the chunk at offset {} ({} bytes) failed its check {attempts} times: {last}",
        r.offset,
        r.length
    )
}

/// Writes the image `bmap` describes, read from `source`, onto the block
/// device or regular file `target` (see the module doc for the order).
pub fn write_image(
    bmap: &Bmap,
    source: &mut dyn ChunkSource,
    target: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<WriteReport> {
    bmap.check().context("checking the block map")?;
    let size = bmap.image_size;
    let mut holes = Vec::new();
    if opts.zero_holes {
        let mut pos = 0;
        for (from, to) in bmap
            .ranges
            .iter()
            .map(|r| (r.offset, r.end()))
            .chain([(size, size)])
        {
            if from > pos {
                holes.push((pos, from - pos));
            }
            pos = to;
        }
    }
    write_ranges(size, &bmap.ranges, &holes, source, target, opts, progress)
}

/// Writes an image of `size` bytes given as data `ranges` (sorted,
/// disjoint, each with its sha256) and `zero` extents that must read as
/// zeros (the rest of the target is left as it is), in the same order and
/// with the same checks as [`write_image`]. Capture deploys use this with
/// only their raw regions' holes in `zero`.
pub fn write_ranges(
    size: u64,
    ranges: &[Range],
    zero: &[(u64, u64)],
    source: &mut dyn ChunkSource,
    target: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<WriteReport> {
    let mut end = 0;
    for r in ranges {
        if r.length == 0 || r.offset < end || r.end() > size {
            bail!(
                "range at {} (+{}) is empty, out of order or past the {size}-byte image",
                r.offset,
                r.length
            );
        }
        end = r.end();
    }
    let mut t = Target::open(target)?;
    if t.size < size {
        bail!(
            "{} is too small: {} bytes, the image needs {size} ({} MiB more)",
            target.display(),
            t.size,
            (size - t.size).div_ceil(1 << 20)
        );
    }
    let mut report = WriteReport {
        image_size: size,
        target_size: t.size,
        ..WriteReport::default()
    };

    // 1. No old table survives, whatever happens next.
    let started = Instant::now();
    let zeros = vec![0u8; EDGE as usize];
    let head_len = EDGE.min(t.size);
    t.write_at(&zeros[..head_len as usize], 0)?;
    let tail_len = EDGE.min(t.size);
    t.write_at(&zeros[..tail_len as usize], t.size - tail_len)?;
    for &(off, len) in zero {
        let len = len.min(size.saturating_sub(off));
        if len > 0 {
            t.zero(off, len)?;
            report.bytes_zeroed += len;
        }
    }
    t.sync()?;

    // 2. Fetch, check, write; hold back the edges.
    let held_back = |r: &Range| r.offset < EDGE || r.end() > size.saturating_sub(EDGE);
    let total: u64 = ranges.iter().map(|r| r.length).sum();
    let mut done = 0u64;
    let mut held: Vec<(Range, Vec<u8>)> = Vec::new();
    let mut written: Vec<&Range> = Vec::new();
    progress(Progress {
        phase: Phase::Write,
        done,
        total,
    });
    for r in ranges {
        let data = fetch_verified(source, r, opts.chunk_attempts, &mut report)?;
        if held_back(r) {
            held.push((r.clone(), data));
        } else {
            t.write_at(&data, r.offset)?;
            written.push(r);
        }
        done += r.length;
        progress(Progress {
            phase: Phase::Write,
            done,
            total,
        });
    }
    t.sync()?;
    report.write_secs = started.elapsed().as_secs_f64();

    // 3. Read back what is on the medium.
    let started = Instant::now();
    t.drop_cache()?;
    let vtotal: u64 = written.iter().map(|r| r.length).sum();
    let mut vdone = 0;
    progress(Progress {
        phase: Phase::Verify,
        done: 0,
        total: vtotal,
    });
    for r in &written {
        t.verify(r.offset, r.length, &r.digest)?;
        vdone += r.length;
        progress(Progress {
            phase: Phase::Verify,
            done: vdone,
            total: vtotal,
        });
    }
    report.verify_secs = started.elapsed().as_secs_f64();

    // 4. Tables and edges. The held-back head becomes one buffer from 0
    //    (gaps between its ranges are the image's zeros).
    let started = Instant::now();
    let (head, tail): (Vec<_>, Vec<_>) = held.into_iter().partition(|(r, _)| r.offset < EDGE);
    let mut first = vec![0u8; head.iter().map(|(r, _)| r.end()).max().unwrap_or(0) as usize];
    for (r, d) in &head {
        first[r.offset as usize..r.end() as usize].copy_from_slice(d);
    }
    let mut pieces: Vec<(u64, Vec<u8>)> = tail.into_iter().map(|(r, d)| (r.offset, d)).collect();
    if t.size > size && opts.grow {
        match grown_tables(&first, size, t.size) {
            Ok((primary, backup)) => {
                if first.len() < primary.len() {
                    first.resize(primary.len(), 0);
                }
                first[..primary.len()].copy_from_slice(&primary);
                pieces.push(backup);
                report.grown = true;
            }
            Err(e) => tracing::warn!("not growing the partition table: {e:#}"),
        }
    }
    let ftotal = pieces.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + first.len() as u64;
    let mut fdone = 0;
    progress(Progress {
        phase: Phase::Finish,
        done: 0,
        total: ftotal,
    });
    for (off, d) in &pieces {
        t.write_at(d, *off)?;
        fdone += d.len() as u64;
        progress(Progress {
            phase: Phase::Finish,
            done: fdone,
            total: ftotal,
        });
    }
    t.sync()?;
    // The first MiB last.
    if !first.is_empty() {
        t.write_at(&first, 0)?;
    }
    t.sync()?;
    progress(Progress {
        phase: Phase::Finish,
        done: ftotal,
        total: ftotal,
    });
    t.drop_cache()?;
    pieces.push((0, first));
    for (off, d) in pieces.iter().filter(|(_, d)| !d.is_empty()) {
        t.verify(*off, d.len() as u64, &digest_of(d))?;
    }
    report.finish_secs = started.elapsed().as_secs_f64();
    report.bytes_written = t.written;
    report.retries += source.retries();

    if t.block {
        drop(t);
        let reread = File::open(target).and_then(|f| crate::blkdev::reread_partitions(&f));
        if let Err(e) = reread {
            tracing::warn!(
                "re-reading the partition table of {}: {e}",
                target.display()
            );
            report.reread_error = Some(e.to_string());
        }
    }
    Ok(report)
}

/// The primary region and the backup GPT (offset, bytes) of the image's
/// table grown to `target_size`.
fn grown_tables(head: &[u8], image_size: u64, target_size: u64) -> Result<(Vec<u8>, Piece)> {
    use builder::gpt;
    let layout = gpt::read_head(head, image_size).context("reading the image's GPT")?;
    let target_size = target_size / gpt::SECTOR * gpt::SECTOR;
    let grown = gpt::grow(&layout, target_size).context("growing the GPT")?;
    if let (Some(a), Some(b)) = (
        layout.partitions.iter().max_by_key(|p| p.last_lba),
        grown.partitions.iter().max_by_key(|p| p.last_lba),
    ) {
        tracing::info!(partition = %a.spec.label, from = a.len(), to = b.len(), "growing the last partition");
    }
    Ok((gpt::primary_region(&grown), gpt::backup_region(&grown)))
}

#[cfg(test)]
mod tests;
