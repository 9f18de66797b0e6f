//! Writer tests: local files as targets, in-process fake sources and a
//! tiny HTTP server on 127.0.0.1 that drops connections, answers 503 and
//! corrupts bytes.

use super::*;
use builder::gpt::{self, types, Guid, PartitionSpec, SizeSpec};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 64 * MIB;

/// A 64 MiB GPT image: an 8 MiB ESP and a data partition filling the
/// rest, with data at the ESP start, in the middle and at the very end
/// of the data partition (next to the backup GPT).
fn make_image(dir: &Path) -> PathBuf {
    let part = |label: &str, ty, size| PartitionSpec {
        label: label.into(),
        type_guid: ty,
        guid: Guid::derive(&[b"writer-test", label.as_bytes()]),
        size,
        attributes: 0,
    };
    let layout = gpt::plan(
        IMAGE,
        Guid::derive(&[b"writer-test-disk"]),
        vec![
            part("esp", types::ESP, SizeSpec::Bytes(8 * MIB)),
            part("appliance-data", types::LINUX_FS, SizeSpec::Fill),
        ],
    )
    .unwrap();
    let path = dir.join("image.img");
    let mut f = File::create(&path).unwrap();
    f.set_len(IMAGE).unwrap();
    gpt::write(&layout, &mut f).unwrap();
    let data_end = layout.partitions[1].offset() + layout.partitions[1].len();
    for (off, len, seed) in [
        (MIB, 300_000, 1u8),
        (20 * MIB + 4096, 2 * MIB as usize, 2),
        (data_end - 8192, 8192, 3),
    ] {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect();
        f.write_all_at(&bytes, off).unwrap();
    }
    path
}

fn bmap_of(p: &Path) -> Bmap {
    Bmap::from_file(p, MIB).unwrap()
}

/// A target of `size` bytes full of 0xEE (an "old disk").
fn old_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let junk = vec![0xEEu8; MIB as usize];
    for off in [0, size / 2, size - MIB] {
        f.write_all_at(&junk, off).unwrap();
    }
    p
}

fn write(bmap: &Bmap, src: &mut dyn ChunkSource, target: &Path) -> Result<WriteReport> {
    let mut last = None;
    let r = write_image(bmap, src, target, &WriteOptions::default(), &mut |p| {
        last = Some(p)
    });
    if r.is_ok() {
        let p = last.unwrap();
        assert_eq!((p.phase, p.done), (Phase::Finish, p.total));
    }
    r
}

fn sgdisk_verify(p: &Path) -> String {
    let out = Command::new("sgdisk")
        .arg("-v")
        .arg(p)
        .output()
        .expect("sgdisk is required (apt-get install gdisk)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

#[test]
fn same_size_target_becomes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let r = write(&bmap, &mut FileSource::open(&img).unwrap(), &target).unwrap();
    assert_same(&img, &target);
    assert_eq!(r.bytes_fetched, bmap.mapped_bytes());
    assert_eq!(r.retries, 0);
    assert!(!r.grown);
    assert!(r.bytes_written >= bmap.mapped_bytes() + 2 * MIB);
    assert!(sgdisk_verify(&target).contains("No problems found"));
}

#[test]
fn larger_target_gets_a_grown_gpt() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let target = old_disk(dir.path(), "t.img", 100 * MIB + 512 * 7);
    let r = write(&bmap, &mut FileSource::open(&img).unwrap(), &target).unwrap();
    assert!(r.grown);
    let v = sgdisk_verify(&target);
    assert!(v.contains("No problems found"), "{v}");
    let l = gpt::read(&mut File::open(&target).unwrap()).unwrap();
    assert_eq!(l.disk_size, 100 * MIB + 512 * 7);
    let data = &l.partitions[1];
    assert_eq!(data.offset() + data.len(), 99 * MIB);
    // Every mapped range outside the tables is the image's.
    let t = File::open(&target).unwrap();
    for rg in bmap
        .ranges
        .iter()
        .filter(|r| r.offset >= MIB && r.end() <= IMAGE - MIB)
    {
        let mut b = vec![0; rg.length as usize];
        t.read_exact_at(&mut b, rg.offset).unwrap();
        assert_eq!(digest_of(&b), rg.digest);
    }
}

#[test]
fn too_small_target_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let target = old_disk(dir.path(), "t.img", IMAGE - MIB);
    let before = std::fs::read(&target).unwrap();
    let e = write(
        &bmap_of(&img),
        &mut FileSource::open(&img).unwrap(),
        &target,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is too small"), "{e:#}");
    assert!(std::fs::read(&target).unwrap() == before);
}

/// Wraps a source and damages the ranges at `bad_offset`: the first
/// `times` fetches (all when `times` is `u32::MAX`).
struct Corrupting {
    inner: FileSource,
    bad_offset: u64,
    times: u32,
}

impl ChunkSource for Corrupting {
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut d = self.inner.read_range(offset, len)?;
        if offset == self.bad_offset && self.times > 0 {
            self.times -= 1;
            d[len as usize / 2] ^= 0x40;
        }
        Ok(d)
    }
}

#[test]
fn corrupted_chunk_is_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let bad = bmap.ranges[2].offset;
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let mut src = Corrupting {
        inner: FileSource::open(&img).unwrap(),
        bad_offset: bad,
        times: 2,
    };
    let r = write(&bmap, &mut src, &target).unwrap();
    assert_eq!(r.retries, 2);
    assert_eq!(
        r.bytes_fetched,
        bmap.mapped_bytes() + 2 * bmap.ranges[2].length
    );
    assert_same(&img, &target);
}

#[test]
fn chunk_that_stays_corrupt_fails_naming_its_offset_and_nothing_boots() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let bad = bmap.ranges[2].offset;
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let mut src = Corrupting {
        inner: FileSource::open(&img).unwrap(),
        bad_offset: bad,
        times: u32::MAX,
    };
    let e = write(&bmap, &mut src, &target).unwrap_err();
    assert!(
        e.to_string().contains(&format!("chunk at offset {bad}")),
        "{e:#}"
    );
    let t = std::fs::read(&target).unwrap();
    assert!(
        t[..MIB as usize].iter().all(|&b| b == 0),
        "first MiB must be zero"
    );
    assert!(
        t[(IMAGE - MIB) as usize..].iter().all(|&b| b == 0),
        "last MiB must be zero"
    );
    assert!(gpt::read(&mut File::open(&target).unwrap()).is_err());
}

/// A source that dies for good after `left` ranges (a crash, a pulled
/// cable).
struct Dying {
    inner: FileSource,
    left: u32,
}

impl ChunkSource for Dying {
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        if self.left == 0 {
            bail!("source went away");
        }
        self.left -= 1;
        self.inner.read_range(offset, len)
    }
}

#[test]
fn interrupted_write_leaves_no_table_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    assert!(bmap.ranges.len() > 3, "{bmap:?}");
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let mut src = Dying {
        inner: FileSource::open(&img).unwrap(),
        left: 3,
    };
    let e = write(&bmap, &mut src, &target).unwrap_err();
    assert!(format!("{e:#}").contains("source went away"), "{e:#}");
    let t = std::fs::read(&target).unwrap();
    assert!(t[..MIB as usize].iter().all(|&b| b == 0));
    assert!(gpt::read(&mut File::open(&target).unwrap()).is_err());
    write(&bmap, &mut FileSource::open(&img).unwrap(), &target).unwrap();
    assert_same(&img, &target);
}

/// What the test HTTP server does to the next requests.
#[derive(Default)]
struct Faults {
    /// Close the connection after this many body bytes, for this many
    /// requests.
    drop_after: Option<(usize, u32)>,
    /// Stop sending (holding the connection open) after this many body
    /// bytes, for this many requests.
    stall_after: Option<(usize, u32)>,
    /// Answer 503 to this many requests.
    unavailable: u32,
    /// Flip a byte in this many answers.
    corrupt: u32,
    /// Ignore Range and answer 200 with the whole file.
    ignore_range: bool,
    requests: Vec<String>,
}

/// Serves `file` on 127.0.0.1 with Range support and the faults above;
/// requires `Authorization: Bearer <token>` when a token is given.
fn serve(file: PathBuf, token: Option<&'static str>, faults: Arc<Mutex<Faults>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let (file, faults) = (file.clone(), faults.clone());
            std::thread::spawn(move || {
                let _ = handle(conn, &file, token, &faults);
            });
        }
    });
    format!("http://{addr}/appliance.img")
}

fn handle(
    conn: TcpStream,
    file: &Path,
    token: Option<&str>,
    faults: &Mutex<Faults>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut range = None;
    let mut auth = None;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(": ").unwrap_or((h, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.to_string()),
            "authorization" => auth = Some(v.to_string()),
            _ => {}
        }
    }
    let mut out = conn;
    if token.is_some_and(|t| auth.as_deref() != Some(&format!("Bearer {t}"))) {
        return out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let total = std::fs::metadata(file)?.len();
    let mut f = faults.lock().unwrap();
    f.requests.push(range.clone().unwrap_or_default());
    if f.unavailable > 0 {
        f.unavailable -= 1;
        return out.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    if f.ignore_range {
        drop(f);
        let data = std::fs::read(file)?;
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        )?;
        return out.write_all(&data);
    }
    let spec = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .unwrap();
    let (a, b) = spec.split_once('-').unwrap();
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    let mut body = vec![0u8; b + 1 - a];
    File::open(file)?.read_exact_at(&mut body, a as u64)?;
    let mut cut = body.len();
    if let Some((n, times)) = f.drop_after {
        if times > 0 && n < body.len() {
            f.drop_after = Some((n, times - 1));
            cut = n.min(body.len());
        }
    }
    let mut stall = false;
    if let Some((n, times)) = f.stall_after {
        if times > 0 && n < body.len() {
            f.stall_after = Some((n, times - 1));
            cut = n;
            stall = true;
        }
    }
    if f.corrupt > 0 {
        f.corrupt -= 1;
        body[0] ^= 0xFF;
    }
    drop(f);
    write!(
        out,
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        total,
        body.len()
    )?;
    out.write_all(&body[..cut])?;
    out.flush()?;
    if stall {
        std::thread::sleep(Duration::from_secs(30));
    }
    Ok(())
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        give_up_after: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
    }
}

#[test]
fn http_source_resumes_after_dropped_connections_and_503() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let faults = Arc::new(Mutex::new(Faults {
        drop_after: Some((100_000, 3)),
        unavailable: 2,
        ..Faults::default()
    }));
    let url = serve(img.clone(), Some("s3cret"), faults.clone());
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let mut src = HttpSource::new(&url, Some("s3cret".into()), quick());
    let r = write(&bmap, &mut src, &target).unwrap();
    assert_same(&img, &target);
    assert_eq!(r.retries, 5, "{r:?}");
    // Nothing fetched twice: each resumed request starts where the cut
    // one stopped.
    assert_eq!(r.bytes_fetched, bmap.mapped_bytes());
    let reqs = faults.lock().unwrap().requests.clone();
    let esp = bmap.ranges.iter().find(|r| r.offset == MIB).unwrap();
    for k in [0, 100_000, 200_000, 300_000] {
        let want = format!("bytes={}-{}", esp.offset + k, esp.end() - 1);
        assert!(reqs.contains(&want), "{want} not in {reqs:?}");
    }
}

#[test]
fn http_corruption_is_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let bmap = bmap_of(&img);
    let faults = Arc::new(Mutex::new(Faults {
        corrupt: 1,
        ..Faults::default()
    }));
    let url = serve(img.clone(), None, faults);
    let target = old_disk(dir.path(), "t.img", IMAGE);
    let r = write(&bmap, &mut HttpSource::new(&url, None, quick()), &target).unwrap();
    assert_eq!(r.retries, 1);
    assert_same(&img, &target);
}

#[test]
fn http_source_gives_up_and_refuses_bad_answers() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let faults = Arc::new(Mutex::new(Faults {
        unavailable: u32::MAX,
        ..Faults::default()
    }));
    let url = serve(img.clone(), None, faults);
    let mut policy = quick();
    policy.give_up_after = Duration::from_millis(300);
    let e = HttpSource::new(&url, None, policy)
        .read_range(0, 4096)
        .unwrap_err();
    assert!(
        e.to_string().contains("giving up on") && e.to_string().contains("HTTP 503"),
        "{e:#}"
    );
    // A server that ignores Range, a wrong token: errors at once.
    let faults = Arc::new(Mutex::new(Faults {
        ignore_range: true,
        ..Faults::default()
    }));
    let url = serve(img.clone(), None, faults);
    let e = HttpSource::new(&url, None, quick())
        .read_range(0, 4096)
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 200"), "{e:#}");
    let url = serve(img, Some("right"), Arc::default());
    let e = HttpSource::new(&url, Some("wrong".into()), quick())
        .read_range(0, 4096)
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 401"), "{e:#}");
    // Nobody listening: connection refused until it gives up.
    let dead = format!(
        "http://{}/x",
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let mut policy = quick();
    policy.give_up_after = Duration::from_millis(200);
    let e = HttpSource::new(&dead, None, policy)
        .read_range(0, 10)
        .unwrap_err();
    assert!(e.to_string().contains("giving up"), "{e:#}");
}

#[test]
fn http_source_cuts_a_stalled_body_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let faults = Arc::new(Mutex::new(Faults {
        stall_after: Some((50_000, 1)),
        ..Faults::default()
    }));
    let url = serve(img.clone(), None, faults.clone());
    let mut policy = quick();
    policy.request_timeout = Duration::from_secs(2);
    let mut src = HttpSource::new(&url, None, policy);
    let got = src.read_range(MIB, 200_000).unwrap();
    let want = FileSource::open(&img)
        .unwrap()
        .read_range(MIB, 200_000)
        .unwrap();
    assert!(got == want);
    assert_eq!(src.retries(), 1);
    let reqs = faults.lock().unwrap().requests.clone();
    assert_eq!(
        reqs,
        vec![
            format!("bytes={}-{}", MIB, MIB + 199_999),
            format!("bytes={}-{}", MIB + 50_000, MIB + 199_999)
        ]
    );
}
