//! A writer for "newc" (`070701`) cpio archives, the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Layout choices, all deterministic so the same [`Tree`] gives the same bytes:
//!
//! - Entries are written in [`Tree::iter`] order (path byte order, parents
//!   before children), with relative names and no `.` entry for the root.
//! - Inode numbers are assigned from 1 in that order; all names of a hardlink
//!   group share the inode number of the group, which is numbered where its
//!   first name appears. Every name in a group carries the target file's
//!   metadata and `nlink` = size of the group; the data is stored once, on the
//!   **last** name in archive order, and the other names have size 0, as GNU
//!   cpio does. Both the kernel's unpacker and `cpio -i` accept this.
//! - Directories have `nlink` = 2 + number of subdirectories; other entries 1.
//! - `devmajor`/`devminor` and the checksum are 0; device nodes carry their
//!   numbers in `rdevmajor`/`rdevminor`.
//! - mtime outside `0..=u32::MAX` is an error rather than being clamped, so a
//!   wrong timestamp is never silently rewritten.
//! - Files of 4 GiB or more cannot be represented (32-bit size field) and are
//!   an error naming the path.

use std::collections::HashMap;
use std::io::{self, BufWriter, Read, Write};

use crate::tree::{normalize_path, parent_of, Content, Node, Tree};

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("initramfs entry {path:?} is {size} bytes; newc cannot hold files over 4 GiB - 1")]
    TooLarge { path: String, size: u64 },
    #[error("initramfs entry {path:?} has mtime {mtime}, outside newc's range 0..=4294967295")]
    MtimeOutOfRange { path: String, mtime: i64 },
    #[error(
        "initramfs entry {path:?} is a hardlink to {target:?}, which is not a regular file in the tree"
    )]
    BadHardlink { path: String, target: String },
    #[error("initramfs has more entries than newc's 32-bit inode numbers can count")]
    TooManyEntries,
    #[error("reading the content of initramfs entry {path:?}: {source}")]
    Read { path: String, source: io::Error },
    #[error("initramfs entry {path:?} declares {expected} bytes but its content yielded {got}")]
    LengthMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("writing the cpio archive: {0}")]
    Write(#[source] io::Error),
}

const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

const TRAILER: &str = "TRAILER!!!";

/// The fields of one newc header, besides the magic, name size and checksum.
#[derive(Default)]
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

/// A writer that counts the bytes passed through it.
pub(crate) struct Counting<W> {
    pub(crate) inner: W,
    pub(crate) count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Zero bytes needed to bring `n` to a multiple of 4.
fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

fn write_header(out: &mut impl Write, h: &Header, name: &str) -> io::Result<()> {
    let namesize = name.len() as u32 + 1;
    let text = format!(
        "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        h.ino,
        h.mode,
        h.uid,
        h.gid,
        h.nlink,
        h.mtime,
        h.filesize,
        0u32, // devmajor
        0u32, // devminor
        h.rdevmajor,
        h.rdevminor,
        namesize,
        0u32, // check
    );
    debug_assert_eq!(text.len(), 110);
    out.write_all(text.as_bytes())?;
    out.write_all(name.as_bytes())?;
    // The name's NUL, then padding of header + name to 4 bytes.
    out.write_all(&[0u8; 4][..1 + pad4(110 + u64::from(namesize))])?;
    Ok(())
}

/// Inode bookkeeping for a hardlink group, keyed by the target file's path.
struct Group {
    ino: u32,
    nlink: u32,
    /// Path of the name that carries the data (the last in archive order).
    last: String,
}

/// Write `tree` as a newc cpio archive (with its `TRAILER!!!`) to `out`,
/// returning the number of bytes written. Output is buffered internally.
pub fn write_newc<W: Write>(tree: &Tree, out: W) -> Result<u64, CpioError> {
    // Pass 1: hardlink groups, inode numbers and directory link counts.
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut subdirs: HashMap<&str, u32> = HashMap::new();
    for (path, entry) in tree.iter() {
        let key = match &entry.node {
            Node::File(_) => path.to_string(),
            Node::Hardlink(target) => hardlink_target(tree, path, target)?,
            Node::Dir => {
                if let Some(p) = parent_of(path) {
                    *subdirs.entry(p).or_default() += 1;
                }
                continue;
            }
            _ => continue,
        };
        let g = groups.entry(key).or_insert(Group {
            ino: 0,
            nlink: 0,
            last: String::new(),
        });
        g.nlink += 1;
        g.last = path.to_string();
    }

    let mut w = Counting {
        inner: BufWriter::with_capacity(1 << 20, out),
        count: 0,
    };
    let mut next_ino: u32 = 1;
    let mut take_ino = || -> Result<u32, CpioError> {
        let i = next_ino;
        next_ino = next_ino.checked_add(1).ok_or(CpioError::TooManyEntries)?;
        Ok(i)
    };

    for (path, entry) in tree.iter() {
        let meta = entry.meta;
        let mut h = Header {
            uid: meta.uid,
            gid: meta.gid,
            nlink: 1,
            ..Header::default()
        };
        // What follows the header: nothing, inline bytes, or file content.
        let mut body: Option<&Content> = None;
        let mut inline: &[u8] = &[];
        let mut meta = meta;
        match &entry.node {
            Node::Dir => {
                h.ino = take_ino()?;
                h.mode = S_IFDIR;
                h.nlink = 2 + subdirs.get(path).copied().unwrap_or(0);
            }
            Node::File(_) | Node::Hardlink(_) => {
                let key = match &entry.node {
                    Node::Hardlink(t) => hardlink_target(tree, path, t)?,
                    _ => path.to_string(),
                };
                let Some(target) = tree.get(&key) else {
                    unreachable!("hardlink_target checked {key:?}")
                };
                let Node::File(content) = &target.node else {
                    unreachable!("hardlink_target checked {key:?}")
                };
                // All names of one inode share the target's metadata.
                meta = target.meta;
                h.uid = meta.uid;
                h.gid = meta.gid;
                let g = groups.get_mut(&key).expect("grouped in pass 1");
                if g.ino == 0 {
                    g.ino = take_ino()?;
                }
                h.ino = g.ino;
                h.nlink = g.nlink;
                h.mode = S_IFREG;
                if g.last == path {
                    let size = content.len();
                    h.filesize = u32::try_from(size).map_err(|_| CpioError::TooLarge {
                        path: path.to_string(),
                        size,
                    })?;
                    body = Some(content);
                }
            }
            Node::Symlink(target) => {
                h.ino = take_ino()?;
                h.mode = S_IFLNK;
                inline = target.as_bytes();
                h.filesize = u32::try_from(inline.len()).map_err(|_| CpioError::TooLarge {
                    path: path.to_string(),
                    size: inline.len() as u64,
                })?;
            }
            Node::CharDevice { major, minor } => {
                h.ino = take_ino()?;
                h.mode = S_IFCHR;
                (h.rdevmajor, h.rdevminor) = (*major, *minor);
            }
            Node::BlockDevice { major, minor } => {
                h.ino = take_ino()?;
                h.mode = S_IFBLK;
                (h.rdevmajor, h.rdevminor) = (*major, *minor);
            }
            Node::Fifo => {
                h.ino = take_ino()?;
                h.mode = S_IFIFO;
            }
        }
        h.mode |= u32::from(meta.mode & 0o7777);
        h.mtime = u32::try_from(meta.mtime).map_err(|_| CpioError::MtimeOutOfRange {
            path: path.to_string(),
            mtime: meta.mtime,
        })?;

        write_header(&mut w, &h, path).map_err(CpioError::Write)?;
        if let Some(content) = body {
            copy_content(content, path, &mut w)?;
        } else {
            w.write_all(inline).map_err(CpioError::Write)?;
        }
        w.write_all(&[0u8; 3][..pad4(u64::from(h.filesize))])
            .map_err(CpioError::Write)?;
    }

    let trailer = Header {
        nlink: 1,
        ..Header::default()
    };
    write_header(&mut w, &trailer, TRAILER).map_err(CpioError::Write)?;
    w.flush().map_err(CpioError::Write)?;
    Ok(w.count)
}

/// The normalised path of a hardlink's target, checked to be a regular file.
fn hardlink_target(tree: &Tree, path: &str, target: &str) -> Result<String, CpioError> {
    let bad = || CpioError::BadHardlink {
        path: path.to_string(),
        target: target.to_string(),
    };
    let t = normalize_path(target).map_err(|_| bad())?;
    match tree.get(&t) {
        Some(e) if matches!(e.node, Node::File(_)) => Ok(t),
        _ => Err(bad()),
    }
}

/// Stream `content` into `out`, checking it yields exactly its declared length.
fn copy_content(content: &Content, path: &str, out: &mut impl Write) -> Result<(), CpioError> {
    let expected = content.len();
    let read_err = |source| CpioError::Read {
        path: path.to_string(),
        source,
    };
    let reader = content.open().map_err(read_err)?;
    // Read at most one byte more than declared, to notice overlong content
    // without copying an unbounded amount.
    let mut limited = reader.take(expected + 1);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        got += n as u64;
        if got > expected {
            break;
        }
        out.write_all(&buf[..n]).map_err(CpioError::Write)?;
    }
    if got != expected {
        return Err(CpioError::LengthMismatch {
            path: path.to_string(),
            expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::tree::{Entry, Meta};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;
    use std::process::{Command, Stdio};

    const DIR: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
    };

    fn add(t: &mut Tree, path: &str, mode: u16, node: Node) {
        let e = Entry {
            meta: Meta::new(mode, 1_700_000_000),
            node,
        };
        t.insert(path, e, DIR).unwrap();
    }

    /// A tree with every node kind.
    fn sample() -> Tree {
        let mut t = Tree::new();
        add(
            &mut t,
            "bin/busybox",
            0o755,
            Node::File(Content::bytes(b"\x7fELF fake".to_vec())),
        );
        add(&mut t, "bin/sh", 0o777, Node::Symlink("busybox".into()));
        add(
            &mut t,
            "dev/console",
            0o600,
            Node::CharDevice { major: 5, minor: 1 },
        );
        add(
            &mut t,
            "dev/sda",
            0o660,
            Node::BlockDevice { major: 8, minor: 0 },
        );
        add(&mut t, "run/initctl", 0o600, Node::Fifo);
        add(
            &mut t,
            "etc/empty",
            0o644,
            Node::File(Content::bytes(Vec::new())),
        );
        add(
            &mut t,
            "etc/hostname",
            0o644,
            Node::File(Content::bytes(b"node\n".to_vec())),
        );
        add(
            &mut t,
            "etc/setuid",
            0o4755,
            Node::File(Content::bytes(b"abc".to_vec())),
        );
        add(&mut t, "tmp", 0o1777, Node::Dir);
        // A hardlink group with its target in the middle of archive order.
        let big: Vec<u8> = (0..70_001u32).map(|i| (i * 7 % 251) as u8).collect();
        add(&mut t, "lib/b", 0o644, Node::File(Content::bytes(big)));
        add(&mut t, "lib/a", 0o644, Node::Hardlink("lib/b".into()));
        add(&mut t, "lib/c", 0o644, Node::Hardlink("lib/b".into()));
        t.validate().unwrap();
        t
    }

    /// Parsed headers: (name, ino, mode, nlink, filesize, rdev, data).
    type Parsed = (String, u32, u32, u32, u32, (u32, u32), Vec<u8>);

    fn parse(a: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let field = |off: usize, i: usize| {
            u32::from_str_radix(std::str::from_utf8(&a[off + 6 + 8 * i..][..8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            assert_eq!(&a[off..off + 6], b"070701", "magic at {off}");
            assert_eq!(off % 4, 0);
            let namesize = field(off, 11) as usize;
            let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[off + 110 + namesize - 1], 0);
            let data_off = (off + 110 + namesize).next_multiple_of(4);
            let size = field(off, 6);
            let data = a[data_off..data_off + size as usize].to_vec();
            out.push((
                name.clone(),
                field(off, 0),
                field(off, 1),
                field(off, 4),
                size,
                (field(off, 9), field(off, 10)),
                data,
            ));
            off = (data_off + size as usize).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(off, a.len());
                return out;
            }
        }
    }

    #[test]
    fn layout_of_every_node_kind() {
        let t = sample();
        let mut a = Vec::new();
        let n = write_newc(&t, &mut a).unwrap();
        assert_eq!(n, a.len() as u64);
        assert_eq!(a.len() % 4, 0);
        let p = parse(&a);
        let names: Vec<&str> = p.iter().map(|e| e.0.as_str()).collect();
        let mut want: Vec<&str> = t.iter().map(|(p, _)| p).collect();
        want.push(TRAILER);
        assert_eq!(names, want);
        let get = |n: &str| p.iter().find(|e| e.0 == n).unwrap();
        // Inodes are 1.. in order, except hardlinks share.
        assert_eq!(get("bin").1, 1);
        assert_eq!(get("bin/busybox").1, 2);
        let (a_, b_, c_) = (get("lib/a"), get("lib/b"), get("lib/c"));
        assert_eq!((a_.1, b_.1, c_.1), (a_.1, a_.1, a_.1));
        assert_eq!((a_.3, b_.3, c_.3), (3, 3, 3));
        assert_eq!((a_.4, b_.4), (0, 0));
        assert_eq!(c_.4, 70_001);
        assert_eq!(c_.6, t.get("lib/b").unwrap().unwrap_content());
        assert_eq!(get("bin/sh").2, 0o120777);
        assert_eq!(get("bin/sh").6, b"busybox");
        assert_eq!(get("dev/console").2, 0o020600);
        assert_eq!(get("dev/console").5, (5, 1));
        assert_eq!(get("dev/sda").2, 0o060660);
        assert_eq!(get("dev/sda").5, (8, 0));
        assert_eq!(get("run/initctl").2, 0o010600);
        assert_eq!(get("etc/setuid").2, 0o104755);
        assert_eq!(get("tmp").2, 0o041777);
        assert_eq!(get("tmp").3, 2);
        assert_eq!(get("etc/hostname").6, b"node\n");
        // Inode numbers are unique per inode and dense from 1.
        let mut inos: Vec<u32> = p[..p.len() - 1].iter().map(|e| e.1).collect();
        inos.sort();
        inos.dedup();
        assert_eq!(inos, (1..=inos.len() as u32).collect::<Vec<_>>());
        // Same tree, same bytes.
        let mut again = Vec::new();
        write_newc(&t, &mut again).unwrap();
        assert_eq!(a, again);
    }

    trait UnwrapContent {
        fn unwrap_content(&self) -> Vec<u8>;
    }
    impl UnwrapContent for Entry {
        fn unwrap_content(&self) -> Vec<u8> {
            match &self.node {
                Node::File(c) => c.read_all().unwrap(),
                _ => panic!("not a file"),
            }
        }
    }

    #[test]
    fn directory_nlink_counts_subdirectories() {
        let mut t = Tree::new();
        add(
            &mut t,
            "a/b/f",
            0o644,
            Node::File(Content::bytes(b"x".to_vec())),
        );
        add(&mut t, "a/c", 0o755, Node::Dir);
        add(
            &mut t,
            "a/g",
            0o644,
            Node::File(Content::bytes(b"x".to_vec())),
        );
        let mut a = Vec::new();
        write_newc(&t, &mut a).unwrap();
        let p = parse(&a);
        assert_eq!(p[0].0, "a");
        assert_eq!(p[0].3, 4);
        assert_eq!(p[1].0, "a/b");
        assert_eq!(p[1].3, 2);
    }

    #[test]
    fn empty_tree_is_just_a_trailer() {
        let mut a = Vec::new();
        let n = write_newc(&Tree::new(), &mut a).unwrap();
        assert_eq!(n, 124);
        assert_eq!(parse(&a).len(), 1);
    }

    #[test]
    fn oversized_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new();
        let blob = Content::Blob {
            path: dir.path().join("missing"),
            digest: Digest::of(b""),
            size: 5_000_000_000,
        };
        add(&mut t, "lib/big", 0o644, Node::File(blob));
        let e = write_newc(&t, io::sink()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "initramfs entry \"lib/big\" is 5000000000 bytes; newc cannot hold files over 4 GiB - 1"
        );
    }

    #[test]
    fn content_length_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, b"short").unwrap();
        // Declared longer than the file: the verifying reader or our count catches it.
        let mut t = Tree::new();
        let blob = Content::Blob {
            path: f.clone(),
            digest: Digest::of(b"short"),
            size: 9,
        };
        add(&mut t, "x", 0o644, Node::File(blob));
        let e = write_newc(&t, io::sink()).unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        // A missing blob names the entry too.
        let mut t = Tree::new();
        let blob = Content::Blob {
            path: dir.path().join("nope"),
            digest: Digest::of(b""),
            size: 0,
        };
        add(&mut t, "y", 0o644, Node::File(blob));
        let e = write_newc(&t, io::sink()).unwrap_err();
        assert!(matches!(e, CpioError::Read { .. }), "{e}");
        assert!(e.to_string().contains("\"y\""), "{e}");
    }

    #[test]
    fn bad_mtime_and_bad_hardlink_are_refused() {
        let mut t = Tree::new();
        t.insert(
            "old",
            Entry {
                meta: Meta::new(0o644, -1),
                node: Node::Fifo,
            },
            DIR,
        )
        .unwrap();
        let e = write_newc(&t, io::sink()).unwrap_err();
        assert!(matches!(e, CpioError::MtimeOutOfRange { .. }), "{e}");
        assert!(e.to_string().contains("\"old\""));

        let mut t = Tree::new();
        add(&mut t, "l", 0o644, Node::Hardlink("nowhere".into()));
        let e = write_newc(&t, io::sink()).unwrap_err();
        assert!(matches!(e, CpioError::BadHardlink { .. }), "{e}");
    }

    /// Run a command with `stdin` as input; panic with its stderr on failure
    /// (including when the program is missing: CI must have it).
    fn run(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd:?} (is GNU cpio installed?): {e}"));
        let mut sin = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        let feeder = std::thread::spawn(move || sin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn gnu_cpio_lists_every_path() {
        let t = sample();
        let mut a = Vec::new();
        write_newc(&t, &mut a).unwrap();
        let listing = run(Command::new("cpio").arg("-it").arg("--quiet"), &a);
        let listed: Vec<&str> = std::str::from_utf8(&listing).unwrap().lines().collect();
        let want: Vec<&str> = t.iter().map(|(p, _)| p).collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn gnu_cpio_extracts_what_was_written() {
        let t = sample();
        let mut a = Vec::new();
        write_newc(&t, &mut a).unwrap();
        let dir = tempfile::tempdir().unwrap();
        run(
            Command::new("cpio")
                .args(["-idmu", "--quiet", "--no-absolute-filenames"])
                .current_dir(dir.path()),
            &a,
        );
        let root = dir.path();
        for (path, entry) in t.iter() {
            let p = root.join(path);
            let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{path}: {e}"));
            let ft = md.file_type();
            match &entry.node {
                Node::Dir => assert!(ft.is_dir(), "{path}"),
                Node::File(c) => {
                    assert!(ft.is_file(), "{path}");
                    assert_eq!(std::fs::read(&p).unwrap(), c.read_all().unwrap(), "{path}");
                    assert_eq!(md.mtime(), entry.meta.mtime, "{path}");
                }
                Node::Hardlink(target) => {
                    let tmd = std::fs::metadata(root.join(target)).unwrap();
                    assert_eq!(md.ino(), tmd.ino(), "{path} is not a link to {target}");
                    assert_eq!(md.nlink(), 3, "{path}");
                    let want = t.get(target).unwrap().unwrap_content();
                    assert_eq!(std::fs::read(&p).unwrap(), want, "{path}");
                }
                Node::Symlink(target) => {
                    assert!(ft.is_symlink(), "{path}");
                    assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(target));
                }
                Node::CharDevice { major, minor } => {
                    assert!(ft.is_char_device(), "{path}");
                    assert_eq!(md.rdev(), (*major as u64) << 8 | *minor as u64, "{path}");
                }
                Node::BlockDevice { major, minor } => {
                    assert!(ft.is_block_device(), "{path}");
                    assert_eq!(md.rdev(), (*major as u64) << 8 | *minor as u64, "{path}");
                }
                Node::Fifo => assert!(ft.is_fifo(), "{path}"),
            }
            if !matches!(entry.node, Node::Symlink(_)) {
                assert_eq!(
                    md.permissions().mode() & 0o7777,
                    u32::from(entry.meta.mode),
                    "mode of {path}"
                );
            }
        }
    }
}
