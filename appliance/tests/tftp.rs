//! Our TFTP server against real clients (tftp-hpa's `tftp`, `curl`) and a
//! raw UDP socket for hostile packets, windowsize, retransmission and
//! duplicate ACKs. Everything runs on 127.0.0.1. A missing client tool
//! fails the test.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use appliance::tftp::{
    serve, DirBackend, TftpBackend, TftpConfig, TftpContent, TftpError, TftpEvent, TftpFile,
};
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

/// Path of a tool, or a failing test saying which package to install.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not installed (Debian packages tftp-hpa, curl; see xtask/debian-packages.txt)")
        })
}

/// Deterministic content: no repeating 512-byte pattern, so a misplaced
/// block is caught.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

struct Server {
    addr: SocketAddr,
    events: broadcast::Receiver<TftpEvent>,
    root: tempfile::TempDir,
}

/// Starts a server on its own runtime thread, serving a fresh directory.
fn start(cfg: TftpConfig) -> Server {
    let root = tempfile::tempdir().unwrap();
    let backend = Arc::new(DirBackend::new(root.path()).unwrap());
    start_with(backend, root, cfg)
}

fn start_with(backend: Arc<dyn TftpBackend>, root: tempfile::TempDir, cfg: TftpConfig) -> Server {
    let (tx, rx) = broadcast::channel(1024);
    let cfg = TftpConfig {
        events: Some(tx),
        ..cfg
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(sock.local_addr().unwrap()).unwrap();
            serve(sock, backend, cfg).await.unwrap();
        });
    });
    Server {
        addr: addr_rx.recv().unwrap(),
        events: rx,
        root,
    }
}

impl Server {
    fn put(&self, name: &str, data: &[u8]) {
        let p = self.root.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

fn curl_get(addr: SocketAddr, name: &str, blksize: Option<usize>, out: &Path) {
    let mut cmd = Command::new(tool("curl"));
    cmd.args(["-s", "-S", "--max-time", "60"])
        .arg(format!("tftp://{addr}/{name}"))
        .arg("-o")
        .arg(out);
    if let Some(b) = blksize {
        cmd.args(["--tftp-blksize", &b.to_string()]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "curl {name} blksize {blksize:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// curl does not create the output file for an empty transfer.
fn read_out(out: &Path) -> Vec<u8> {
    std::fs::read(out).unwrap_or_default()
}

const SIZES: &[usize] = &[
    0,
    1,
    511,
    512,
    513,
    1024,
    1468,
    512 * 7,
    8192 * 3,
    100_003,
    3 << 20,
];

#[test]
fn tftp_hpa_fetches_every_size() {
    let tftp = tool("tftp");
    let srv = start(TftpConfig::default());
    let out = tempfile::tempdir().unwrap();
    for (i, &len) in SIZES.iter().enumerate() {
        let data = content(len, i as u64 + 1);
        let name = format!("f{len}");
        srv.put(&name, &data);
        for verbose in [false, true] {
            let dst = out.path().join(format!("{name}-{verbose}"));
            let mut cmd = Command::new(&tftp);
            if verbose {
                cmd.arg("-v");
            }
            let o = cmd
                .args(["-m", "binary", "127.0.0.1"])
                .arg(srv.addr.port().to_string())
                .arg("-c")
                .arg("get")
                .arg(&name)
                .arg(&dst)
                .output()
                .unwrap();
            assert!(o.status.success(), "tftp get {name}: {o:?}");
            assert!(
                !String::from_utf8_lossy(&o.stderr).contains("Error"),
                "tftp get {name}: {o:?}"
            );
            assert_eq!(std::fs::read(&dst).unwrap(), data, "tftp get {name}");
        }
    }
}

#[test]
fn curl_fetches_every_size_and_blksize() {
    let srv = start(TftpConfig::default());
    let out = tempfile::tempdir().unwrap();
    // curl 7.88.1 fails every empty file with "(71) getpeername() failed",
    // against tftpd-hpa too; tftp-hpa covers the empty file.
    for (i, &len) in SIZES.iter().enumerate().filter(|(_, &l)| l > 0) {
        let data = content(len, i as u64 + 100);
        let name = format!("dir/g{len}");
        srv.put(&name, &data);
        for blksize in [None, Some(512), Some(1468), Some(8192)] {
            let dst = out.path().join(format!("g{len}-{blksize:?}"));
            curl_get(srv.addr, &name, blksize, &dst);
            assert_eq!(read_out(&dst), data, "curl {name} blksize {blksize:?}");
        }
    }
    // A leading '/' is accepted (PXE clients send "/pxelinux.0").
    let dst = out.path().join("slash");
    curl_get(srv.addr, "/dir/g512", Some(512), &dst);
    assert_eq!(read_out(&dst).len(), 512);
}

/// More than 65535 blocks: block numbers wrap to 0 as curl expects.
#[test]
fn block_numbers_wrap_with_curl() {
    let srv = start(TftpConfig::default());
    let data = content(65536 * 8 + 77, 7);
    srv.put("wrap", &data);
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("wrap");
    curl_get(srv.addr, "wrap", Some(8), &dst);
    assert_eq!(read_out(&dst), data);
}

#[test]
fn twenty_parallel_fetches() {
    let srv = start(TftpConfig::default());
    let out = Arc::new(tempfile::tempdir().unwrap());
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| content(300_000 + i * 1001, i as u64 + 9))
        .collect();
    for (i, d) in files.iter().enumerate() {
        srv.put(&format!("p{i}"), d);
    }
    let files = Arc::new(files);
    let threads: Vec<_> = (0..20)
        .map(|t| {
            let (addr, out, files) = (srv.addr, out.clone(), files.clone());
            std::thread::spawn(move || {
                let i = t % files.len();
                let dst = out.path().join(format!("out{t}"));
                let blk = [512, 1468, 8192, 4096][t % 4];
                curl_get(addr, &format!("p{i}"), Some(blk), &dst);
                assert_eq!(read_out(&dst), files[i], "fetch {t}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

// ---- raw socket client -------------------------------------------------

fn rrq(name: &[u8], opts: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![0, 1];
    v.extend_from_slice(name);
    v.extend_from_slice(b"\0octet\0");
    for (k, val) in opts {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

fn raw() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).expect("a reply from the server");
    buf.truncate(n);
    (buf, from)
}

/// Nothing arrives within `d`.
fn quiet(s: &UdpSocket, d: Duration) {
    s.set_read_timeout(Some(d)).unwrap();
    let mut buf = [0u8; 70000];
    if let Ok((n, _)) = s.recv_from(&mut buf) {
        panic!("unexpected packet {:?}", &buf[..n.min(16)]);
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}

fn ack(s: &UdpSocket, to: SocketAddr, block: u16) {
    let mut p = vec![0, 4];
    p.extend_from_slice(&block.to_be_bytes());
    s.send_to(&p, to).unwrap();
}

fn expect_data(s: &UdpSocket, block: u16) -> (Vec<u8>, SocketAddr) {
    let (p, from) = recv(s);
    assert_eq!(&p[..2], &[0, 3], "expected DATA {block}, got {p:?}");
    assert_eq!(u16::from_be_bytes([p[2], p[3]]), block, "DATA block number");
    (p[4..].to_vec(), from)
}

fn expect_error(s: &UdpSocket, code: u16, what: &str) {
    let (p, _) = recv(s);
    assert_eq!(&p[..2], &[0, 5], "{what}: expected ERROR, got {p:?}");
    assert_eq!(
        u16::from_be_bytes([p[2], p[3]]),
        code,
        "{what}: error code (message {:?})",
        String::from_utf8_lossy(&p[4..])
    );
}

#[test]
fn hostile_requests_get_errors_and_serving_continues() {
    let srv = start(TftpConfig::default());
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        srv.root.path().join("escape"),
    )
    .unwrap();
    srv.put("ok", &content(5000, 3));
    let s = raw();
    let mut truncated = rrq(b"ok", &[]);
    truncated.truncate(5);
    let mut wrq = rrq(b"upload", &[]);
    wrq[1] = 2;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("dot-dot", rrq(b"../etc/passwd", &[]), 2),
        ("dot-dot inside", rrq(b"a/../../etc/passwd", &[]), 2),
        // One leading '/' is stripped: this is etc/passwd below the root.
        ("absolute", rrq(b"/etc/passwd", &[]), 1),
        ("double slash", rrq(b"//etc/passwd", &[]), 2),
        ("symlink outside", rrq(b"escape", &[]), 2),
        ("NUL in name", rrq(b"ok\0x", &[]), 4),
        ("overlong name", rrq(&[b'a'; 300], &[]), 4),
        ("truncated RRQ", truncated, 4),
        ("blksize abc", rrq(b"ok", &[("blksize", "abc")]), 8),
        ("blksize 0", rrq(b"ok", &[("blksize", "0")]), 8),
        ("blksize 70000", rrq(b"ok", &[("blksize", "70000")]), 8),
        ("WRQ", wrq, 2),
        ("stray ACK", vec![0, 4, 0, 1], 4),
        ("garbage", vec![0xff; 7], 4),
        ("missing", rrq(b"nope", &[]), 1),
        ("directory", rrq(b".", &[]), 1),
    ];
    for (what, pkt, code) in cases {
        s.send_to(&pkt, srv.addr).unwrap();
        expect_error(&s, code, what);
    }
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("ok");
    curl_get(srv.addr, "ok", Some(1468), &dst);
    assert_eq!(read_out(&dst), content(5000, 3));
}

#[test]
fn windowsize_sends_a_window_and_rewinds_on_early_ack() {
    let mut srv = start(TftpConfig::default());
    let data = content(512 * 40 + 100, 11);
    srv.put("w", &data);
    let s = raw();
    s.send_to(
        &rrq(
            b"w",
            &[("blksize", "512"), ("windowsize", "8"), ("tsize", "0")],
        ),
        srv.addr,
    )
    .unwrap();
    let (oack, tid) = recv(&s);
    assert_eq!(
        oack,
        format!(
            "\0\x06blksize\x00512\0tsize\0{}\0windowsize\x008\0",
            data.len()
        )
        .into_bytes()
    );
    ack(&s, tid, 0);
    let mut got = Vec::new();
    for b in 1..=8 {
        got.extend(expect_data(&s, b).0);
    }
    // A full window and no more until we ACK.
    quiet(&s, Duration::from_millis(300));
    // ACK block 3 as if 4 was lost: the server resends from 4.
    ack(&s, tid, 3);
    got.truncate(3 * 512);
    let mut next = 4;
    loop {
        let mut last = false;
        for _ in 0..8 {
            let (d, _) = expect_data(&s, next);
            last = d.len() < 512;
            got.extend(d);
            next += 1;
            if last {
                break;
            }
        }
        ack(&s, tid, next - 1);
        if last {
            break;
        }
    }
    assert_eq!(got, data);
    let done = loop {
        match srv.events.blocking_recv().unwrap() {
            TftpEvent::Completed {
                file,
                bytes,
                blocks,
                options,
                ..
            } => break (file, bytes, blocks, options),
            _ => continue,
        }
    };
    assert_eq!(done.0, "w");
    assert_eq!(done.1, data.len() as u64);
    assert_eq!(done.2, 41);
    assert_eq!(done.3.windowsize, Some(8));
}

#[test]
fn lost_data_is_sent_again_after_the_timeout() {
    let srv = start(TftpConfig::default());
    let data = content(700, 5);
    srv.put("r", &data);
    let s = raw();
    s.send_to(&rrq(b"r", &[]), srv.addr).unwrap();
    // Ignore the first DATA 1: it comes again after the 1 s timeout.
    let (first, tid) = expect_data(&s, 1);
    let (again, tid2) = expect_data(&s, 1);
    assert_eq!(first, again);
    assert_eq!(tid, tid2);
    ack(&s, tid, 1);
    let (second, _) = expect_data(&s, 2);
    ack(&s, tid, 2);
    assert_eq!([first, second].concat(), data);
}

#[test]
fn duplicate_ack_does_not_resend() {
    let srv = start(TftpConfig::default());
    srv.put("d", &content(2000, 6));
    let s = raw();
    s.send_to(&rrq(b"d", &[]), srv.addr).unwrap();
    let (_, tid) = expect_data(&s, 1);
    ack(&s, tid, 1);
    expect_data(&s, 2);
    // A late duplicate of ACK 1 must not make the server send DATA 2 again
    // (sorcerer's apprentice).
    ack(&s, tid, 1);
    quiet(&s, Duration::from_millis(500));
    ack(&s, tid, 2);
    expect_data(&s, 3);
}

#[test]
fn gives_up_after_the_retries() {
    let srv = start(TftpConfig {
        timeout: Duration::from_millis(100),
        retries: 2,
        ..TftpConfig::default()
    });
    srv.put("g", &content(2000, 8));
    let s = raw();
    s.send_to(&rrq(b"g", &[]), srv.addr).unwrap();
    for _ in 0..3 {
        expect_data(&s, 1);
    }
    expect_error(&s, 0, "give up");
    let mut events = srv.events;
    loop {
        if let TftpEvent::Failed { error, .. } = events.blocking_recv().unwrap() {
            assert!(error.contains("block 1"), "{error}");
            break;
        }
    }
}

/// Serves every name as a stream of unknown size (generated content).
struct StreamBackend(Vec<u8>);

impl TftpBackend for StreamBackend {
    fn open<'a>(
        &'a self,
        _client: SocketAddr,
        _path: &'a str,
    ) -> BoxFuture<'a, Result<TftpFile, TftpError>> {
        let data = self.0.clone();
        Box::pin(async move {
            Ok(TftpFile {
                size: None,
                content: TftpContent::Stream(Box::new(std::io::Cursor::new(data))),
            })
        })
    }
}

#[test]
fn stream_of_unknown_size_rewinds_within_the_window() {
    let data = content(512 * 20, 13); // a multiple: ends with an empty block
    let srv = start_with(
        Arc::new(StreamBackend(data.clone())),
        tempfile::tempdir().unwrap(),
        TftpConfig::default(),
    );
    let s = raw();
    s.send_to(
        &rrq(b"gen", &[("windowsize", "4"), ("tsize", "0")]),
        srv.addr,
    )
    .unwrap();
    let (oack, tid) = recv(&s);
    // No tsize: the size is not known.
    assert_eq!(oack, b"\0\x06windowsize\x004\0");
    ack(&s, tid, 0);
    let mut got = Vec::new();
    for b in 1..=4 {
        got.extend(expect_data(&s, b).0);
    }
    ack(&s, tid, 2);
    got.truncate(2 * 512);
    let mut next = 3;
    loop {
        let mut last = false;
        for _ in 0..4 {
            let (d, _) = expect_data(&s, next);
            last = d.len() < 512;
            got.extend(d);
            next += 1;
            if last {
                break;
            }
        }
        ack(&s, tid, next - 1);
        if last {
            break;
        }
    }
    assert_eq!(next - 1, 21, "20 full blocks and an empty one");
    assert_eq!(got, data);
    // And a real client.
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("gen");
    curl_get(srv.addr, "gen", Some(1468), &dst);
    assert_eq!(read_out(&dst), data);
}
