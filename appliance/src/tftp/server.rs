//! The TFTP listener and transfer handler: one UDP socket takes read
//! requests; every transfer gets its own task and its own ephemeral UDP
//! socket (RFC 1350's transfer identifier), connected to the client so the
//! kernel drops datagrams from anyone else.
//!
//! A transfer negotiates options (OACK, then ACK 0), then sends `windowsize`
//! DATA blocks and waits for an ACK (RFC 7440; `windowsize` 1 is RFC 1350
//! lock-step). An ACK of the window's last block moves to the next window;
//! an ACK of an earlier block in the window rewinds to the block after it;
//! an ACK of a block before the window is a duplicate and is ignored, so a
//! late duplicate never triggers a resend (the sorcerer's apprentice bug).
//! Retransmission is driven by the timeout alone: the whole window again
//! after `timeout` (the configured one or the client's `timeout` option),
//! at most `retries` times in a row, then the transfer gives up.
//! Block numbers wrap from 65535 to 0, as tftp-hpa and curl expect.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tracing::Instrument;

use super::backend::{TftpBackend, TftpContent, TftpError, TftpFile};
use super::packet::{
    data_header, ErrorCode, Options, Packet, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE,
};

/// Server settings.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Largest `blksize` granted (capped at 65464); larger requests are
    /// negotiated down.
    pub max_blksize: u16,
    /// Largest `windowsize` granted; larger requests are negotiated down.
    pub max_windowsize: u16,
    /// Retransmission timeout when the client does not send `timeout`.
    pub timeout: Duration,
    /// Retransmissions in a row without progress before giving up.
    pub retries: u32,
    /// SO_SNDBUF/SO_RCVBUF asked for every socket (the kernel may cap it at
    /// `net.core.wmem_max`/`rmem_max`).
    pub socket_buffer: usize,
    /// Where transfer events go, if anyone listens.
    pub events: Option<broadcast::Sender<TftpEvent>>,
}

impl Default for TftpConfig {
    fn default() -> TftpConfig {
        TftpConfig {
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
            socket_buffer: 4 << 20,
            events: None,
        }
    }
}

/// What happened to a transfer, for the API's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TftpEvent {
    Started {
        client: SocketAddr,
        file: String,
        /// The options granted (what the OACK said).
        options: Options,
    },
    Completed {
        client: SocketAddr,
        file: String,
        bytes: u64,
        blocks: u64,
        duration: Duration,
        options: Options,
    },
    Failed {
        client: SocketAddr,
        file: String,
        error: String,
    },
}

/// Serves read requests on `socket` until an I/O error on it that is not
/// about one client. Write requests and malformed packets get an ERROR
/// packet and the server keeps serving.
pub async fn serve(
    socket: UdpSocket,
    backend: Arc<dyn TftpBackend>,
    cfg: TftpConfig,
) -> io::Result<()> {
    set_buffers(&SockRef::from(&socket), cfg.socket_buffer);
    let local = socket.local_addr()?;
    let cfg = Arc::new(cfg);
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(512);
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // ICMP errors from earlier replies surface here on some systems.
            Err(e) if is_per_peer(&e) => continue,
            Err(e) => return Err(e),
        };
        let reply = match Packet::parse(&buf[..n]) {
            Ok(Packet::Rrq(req)) => {
                let file = req.filename.to_string();
                let span = tracing::info_span!("tftp", %client, file = %file);
                let task = Transfer {
                    client,
                    local: local.ip(),
                    file,
                    requested: req.options,
                    backend: backend.clone(),
                    cfg: cfg.clone(),
                };
                tokio::spawn(task.run().instrument(span));
                None
            }
            Ok(Packet::Wrq(req)) => {
                tracing::info!(%client, file = req.filename, "write request refused");
                Some((ErrorCode::AccessViolation, "read-only server".to_string()))
            }
            Ok(Packet::Error { .. }) => None, // never answer an error
            Ok(_) => Some((
                ErrorCode::IllegalOperation,
                "expected a read request".to_string(),
            )),
            Err(e) => {
                tracing::info!(%client, error = %e, "bad request");
                Some((e.code(), e.to_string()))
            }
        };
        if let Some((code, message)) = reply {
            Packet::Error {
                code,
                message: &message,
            }
            .encode(&mut out);
            if let Err(e) = socket.send_to(&out, client).await {
                if !is_per_peer(&e) {
                    return Err(e);
                }
            }
        }
    }
}

fn is_per_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::PermissionDenied
    )
}

fn set_buffers(s: &SockRef<'_>, size: usize) {
    // Best effort: a smaller buffer only costs speed.
    let _ = s.set_send_buffer_size(size);
    let _ = s.set_recv_buffer_size(size);
}

/// Why a transfer ended early.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error(transparent)]
    Backend(#[from] TftpError),
    #[error("no acknowledgement for block {block} after {retries} retransmissions")]
    TimedOut { block: u64, retries: u32 },
    #[error("client sent error {code}: {message:?}")]
    Client { code: u16, message: String },
    #[error("reading {file:?}: {source}")]
    Read { file: String, source: io::Error },
    #[error("socket: {0}")]
    Socket(#[from] io::Error),
}

struct Transfer {
    client: SocketAddr,
    local: IpAddr,
    file: String,
    requested: Options,
    backend: Arc<dyn TftpBackend>,
    cfg: Arc<TftpConfig>,
}

struct Stats {
    bytes: u64,
    blocks: u64,
    options: Options,
}

impl Transfer {
    async fn run(self) {
        let started = Instant::now();
        let sock = match self.socket() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open transfer socket");
                self.event(TftpEvent::Failed {
                    client: self.client,
                    file: self.file.clone(),
                    error: format!("opening transfer socket: {e}"),
                });
                return;
            }
        };
        match self.transfer(&sock).await {
            Ok(st) => {
                let duration = started.elapsed();
                tracing::info!(
                    bytes = st.bytes,
                    blocks = st.blocks,
                    duration_ms = duration.as_secs_f64() * 1e3,
                    options = %st.options,
                    "transfer complete"
                );
                self.event(TftpEvent::Completed {
                    client: self.client,
                    file: self.file.clone(),
                    bytes: st.bytes,
                    blocks: st.blocks,
                    duration,
                    options: st.options,
                });
            }
            Err(e) => {
                let reply = match &e {
                    TransferError::Backend(b) => Some((b.code(), b.client_message())),
                    TransferError::TimedOut { .. } => Some((ErrorCode::NotDefined, "timed out")),
                    TransferError::Read { .. } => Some((ErrorCode::NotDefined, "read error")),
                    TransferError::Client { .. } | TransferError::Socket(_) => None,
                };
                if let Some((code, message)) = reply {
                    let _ = sock.send(&Packet::Error { code, message }.to_vec()).await;
                }
                tracing::warn!(error = %e, "transfer failed");
                self.event(TftpEvent::Failed {
                    client: self.client,
                    file: self.file.clone(),
                    error: e.to_string(),
                });
            }
        }
    }

    fn event(&self, ev: TftpEvent) {
        if let Some(tx) = &self.cfg.events {
            // Fails only when nobody subscribes, which is fine.
            let _ = tx.send(ev);
        }
    }

    /// An ephemeral socket on the listening address, connected to the
    /// client. With an unspecified listening address the kernel picks the
    /// source address by route.
    fn socket(&self) -> io::Result<UdpSocket> {
        let ip = if self.local.is_unspecified() || self.local.is_ipv4() != self.client.is_ipv4() {
            match self.client {
                SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
                SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
            }
        } else {
            self.local
        };
        let s = Socket::new(
            Domain::for_address(self.client),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        set_buffers(&SockRef::from(&s), self.cfg.socket_buffer);
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
        s.connect(&self.client.into())?;
        UdpSocket::from_std(s.into())
    }

    async fn transfer(&self, sock: &UdpSocket) -> Result<Stats, TransferError> {
        let file = self.backend.open(self.client, &self.file).await?;
        let req = self.requested;
        let granted = Options {
            blksize: req
                .blksize
                .map(|b| b.min(self.cfg.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE))),
            timeout: req.timeout,
            tsize: req.tsize.and(file.size),
            windowsize: req
                .windowsize
                .map(|w| w.min(self.cfg.max_windowsize.max(1))),
        };
        self.event(TftpEvent::Started {
            client: self.client,
            file: self.file.clone(),
            options: granted,
        });
        let timeout = granted
            .timeout
            .map_or(self.cfg.timeout, |t| Duration::from_secs(t.into()));
        let bs = usize::from(granted.blksize.unwrap_or(DEFAULT_BLKSIZE));
        let window = u64::from(granted.windowsize.unwrap_or(1));
        let mut rbuf = vec![0u8; 2048];

        if !granted.is_empty() {
            let oack = Packet::Oack(granted).to_vec();
            let mut tries = 0;
            loop {
                sock.send(&oack).await?;
                match self.recv_ack(sock, &mut rbuf, timeout, 0, 0).await? {
                    Some(_) => break,
                    None if tries < self.cfg.retries => tries += 1,
                    None => {
                        return Err(TransferError::TimedOut {
                            block: 0,
                            retries: tries,
                        })
                    }
                }
            }
        }

        let mut src = Source::new(file, bs, window as usize);
        let mut last = src.size.map(|s| s / bs as u64 + 1);
        let mut pkt = vec![0u8; 4 + bs];
        let mut base: u64 = 1; // first block not acknowledged
        let mut tries = 0;
        let mut sent_blocks = 0u64;
        loop {
            // Send one window from `base`.
            let mut end = base - 1;
            while end < base - 1 + window && last.is_none_or(|l| end < l) {
                let b = end + 1;
                let data = src
                    .read((b - 1) * bs as u64, bs, (base - 1) * bs as u64)
                    .await
                    .map_err(|source| TransferError::Read {
                        file: self.file.clone(),
                        source,
                    })?;
                let n = data.len();
                pkt[4..4 + n].copy_from_slice(data);
                data_header(&mut pkt, b as u16);
                sock.send(&pkt[..4 + n]).await?;
                sent_blocks += 1;
                end = b;
                if n < bs {
                    last = Some(b);
                }
            }
            match self
                .recv_ack(sock, &mut rbuf, timeout, base - 1, end - (base - 1))
                .await?
            {
                Some(acked) => {
                    tries = 0;
                    base = acked + 1;
                    if Some(acked) == last {
                        let blocks = acked;
                        if sent_blocks > blocks {
                            tracing::debug!(resent = sent_blocks - blocks, "blocks sent again");
                        }
                        return Ok(Stats {
                            bytes: src.size.unwrap_or(0).max(src.max_end),
                            blocks,
                            options: granted,
                        });
                    }
                }
                None if tries < self.cfg.retries => tries += 1,
                None => {
                    return Err(TransferError::TimedOut {
                        block: base,
                        retries: tries,
                    })
                }
            }
        }
    }

    /// Waits until `timeout` for an ACK of a block in `after+1 ..=
    /// after+count` (wire numbers wrap) and returns that block; `count` 0
    /// waits for an ACK of `after` itself (block 0 after an OACK). Other
    /// ACKs are duplicates and ignored; so is anything that is not an ACK
    /// or ERROR. `None` means the time ran out.
    async fn recv_ack(
        &self,
        sock: &UdpSocket,
        buf: &mut [u8],
        timeout: Duration,
        after: u64,
        count: u64,
    ) -> Result<Option<u64>, TransferError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(buf)).await {
                Err(_) => return Ok(None),
                Ok(r) => r?,
            };
            match Packet::parse(&buf[..n]) {
                Ok(Packet::Ack { block }) => {
                    let delta = u64::from(block.wrapping_sub(after as u16));
                    if count == 0 && delta == 0 {
                        return Ok(Some(after));
                    }
                    if delta >= 1 && delta <= count {
                        return Ok(Some(after + delta));
                    }
                }
                Ok(Packet::Error { code, message }) => {
                    return Err(TransferError::Client {
                        code: code.as_u16(),
                        message: message.to_string(),
                    })
                }
                _ => {}
            }
        }
    }
}

/// Reads blocks of a [`TftpFile`] with as few syscalls and copies as
/// possible: `Bytes` are sliced, files are read in chunks of at least a
/// MiB (and two windows) with positioned reads on the blocking pool,
/// streams are buffered from the start of the current window.
struct Source {
    content: TftpContent,
    size: Option<u64>,
    cache: Vec<u8>,
    /// File offset of `cache[0]`.
    start: u64,
    chunk: usize,
    eof: bool,
    /// Largest end offset handed out, for the byte count of streams.
    max_end: u64,
}

impl Source {
    fn new(file: TftpFile, bs: usize, window: usize) -> Source {
        Source {
            content: file.content,
            size: file.size,
            cache: Vec::new(),
            start: 0,
            chunk: (1 << 20).max(2 * bs * window),
            eof: false,
            max_end: 0,
        }
    }

    /// Up to `len` bytes at `off` (fewer only at the end); `keep` is the
    /// lowest offset that may still be asked for again.
    async fn read(&mut self, off: u64, len: usize, keep: u64) -> io::Result<&[u8]> {
        let len = match self.size {
            Some(s) => len.min(s.saturating_sub(off) as usize),
            None => len,
        };
        let want = off + len as u64;
        self.max_end = self.max_end.max(want);
        let cached = off >= self.start && want <= self.start + self.cache.len() as u64;
        match &mut self.content {
            TftpContent::Bytes(b) => {
                let s = (off as usize).min(b.len());
                let e = (s + len).min(b.len());
                return Ok(&b[s..e]);
            }
            TftpContent::File(f) => {
                if !(cached || self.eof && off >= self.start) {
                    let from = keep.min(off);
                    let size = (self.chunk as u64).max(want - from) as usize;
                    let f = f.clone();
                    let mut buf = std::mem::take(&mut self.cache);
                    buf.resize(size, 0);
                    let (buf, res) = tokio::task::spawn_blocking(move || {
                        let r = pread_full(&f, &mut buf, from);
                        if let Ok(n) = r {
                            buf.truncate(n);
                        }
                        (buf, r)
                    })
                    .await
                    .map_err(io::Error::other)?;
                    self.cache = buf;
                    self.start = from;
                    self.eof = res? < size;
                }
            }
            TftpContent::Stream(r) => {
                if off < self.start {
                    return Err(io::Error::other("cannot rewind a stream"));
                }
                if !cached && !self.eof {
                    let gone = ((keep.max(self.start) - self.start) as usize).min(self.cache.len());
                    self.cache.drain(..gone);
                    self.start += gone as u64;
                    while self.start + (self.cache.len() as u64) < want {
                        self.cache.reserve(self.chunk);
                        if r.read_buf(&mut self.cache).await? == 0 {
                            self.eof = true;
                            break;
                        }
                    }
                }
            }
        }
        let s = ((off - self.start) as usize).min(self.cache.len());
        let e = (s + len).min(self.cache.len());
        Ok(&self.cache[s..e])
    }
}

fn pread_full(f: &std::fs::File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
