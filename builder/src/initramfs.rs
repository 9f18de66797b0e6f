//! An initramfs: one or more cpio archives, each optionally compressed,
//! concatenated into the single blob the kernel unpacks at boot.
//!
//! The kernel's grammar (`Documentation/driver-api/early-userspace/buffer-format.rst`)
//! is `initramfs := ("\0" | cpio_archive | cpio_compressed_archive)*`, so
//! archives are simply written one after the other. One subtlety: the kernel
//! only recognises an *uncompressed* archive at an offset that is a multiple
//! of 4 from where the previous archive ended, so before an uncompressed
//! archive (ours, or a prebuilt one starting with the `0707` magic) that would
//! start unaligned, zero bytes are inserted, which the grammar allows. Nothing
//! is inserted before a compressed archive, so `gzip -dc` and multi-member
//! gzip decoders still read a run of gzip archives.
//!
//! Early CPU microcode must be the first archive and uncompressed (the
//! kernel's early loader looks only there); that is the caller's ordering.
//!
//! Gzip output is reproducible: header mtime 0, OS byte 3 (Unix), no file
//! name or comment; the same tree and level give the same bytes.

use std::io::{self, Read, Write};

use flate2::write::GzEncoder;
use flate2::GzBuilder;

use crate::cpio::{write_newc, CpioError};
use crate::tree::{Content, Tree};

/// How a tree archive is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    /// Gzip at `level` 0 (store) to 9 (best).
    Gzip {
        level: u32,
    },
}

/// One archive of the initramfs.
#[derive(Clone, Debug)]
pub enum Archive {
    /// A tree written as newc cpio, then compressed.
    Tree {
        tree: Tree,
        compression: Compression,
    },
    /// An existing cpio or compressed cpio (for example CPU microcode),
    /// appended verbatim.
    Prebuilt(Content),
}

/// Why an initramfs could not be built. `index` is the archive's position
/// in the list given to [`build_initramfs`].
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("initramfs archive {index}: gzip level {level} is not in 0..=9")]
    BadLevel { index: usize, level: u32 },
    #[error("initramfs archive {index}: {source}")]
    Cpio {
        index: usize,
        #[source]
        source: CpioError,
    },
    #[error("initramfs archive {index} (prebuilt): reading its content: {source}")]
    ReadPrebuilt {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("initramfs archive {index} (prebuilt): declares {expected} bytes but its content yielded {got}")]
    PrebuiltLength {
        index: usize,
        expected: u64,
        got: u64,
    },
    #[error("writing the initramfs: {0}")]
    Write(#[source] io::Error),
}

use crate::cpio::Counting;

impl<W: Write> Counting<W> {
    /// Write zeros up to the next multiple of 4 of the total.
    fn align4(&mut self) -> io::Result<()> {
        let pad = ((4 - self.count % 4) % 4) as usize;
        self.write_all(&[0u8; 3][..pad])
    }
}

/// Write `archives` one after another to `out`, returning the bytes written.
pub fn build_initramfs(archives: &[Archive], out: impl Write) -> Result<u64, InitramfsError> {
    let mut w = Counting {
        inner: out,
        count: 0,
    };
    for (index, archive) in archives.iter().enumerate() {
        match archive {
            Archive::Tree {
                tree,
                compression: Compression::None,
            } => {
                w.align4().map_err(InitramfsError::Write)?;
                write_newc(tree, &mut w).map_err(|source| cpio_error(index, source))?;
            }
            Archive::Tree {
                tree,
                compression: Compression::Gzip { level },
            } => {
                if *level > 9 {
                    return Err(InitramfsError::BadLevel {
                        index,
                        level: *level,
                    });
                }
                let mut gz: GzEncoder<&mut Counting<_>> = GzBuilder::new()
                    .mtime(0)
                    .operating_system(3)
                    .write(&mut w, flate2::Compression::new(*level));
                write_newc(tree, &mut gz).map_err(|source| cpio_error(index, source))?;
                gz.finish().map_err(InitramfsError::Write)?;
            }
            Archive::Prebuilt(content) => copy_prebuilt(index, content, &mut w)?,
        }
    }
    w.flush().map_err(InitramfsError::Write)?;
    Ok(w.count)
}

/// A write failure inside the cpio writer is a write failure of the initramfs.
fn cpio_error(index: usize, source: CpioError) -> InitramfsError {
    match source {
        CpioError::Write(e) => InitramfsError::Write(e),
        source => InitramfsError::Cpio { index, source },
    }
}

fn copy_prebuilt<W: Write>(
    index: usize,
    content: &Content,
    w: &mut Counting<W>,
) -> Result<(), InitramfsError> {
    let read_err = |source| InitramfsError::ReadPrebuilt { index, source };
    let write_err = InitramfsError::Write;
    let expected = content.len();
    // Read at most one byte more than declared, to notice overlong content.
    let mut r = content.open().map_err(read_err)?.take(expected + 1);

    // Peek at the magic: an uncompressed cpio must start 4-aligned.
    let mut head = [0u8; 4];
    let mut got = 0usize;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if head[..got] == *b"0707" {
        w.align4().map_err(write_err)?;
    }
    let mut got = got as u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = (got as usize).min(buf.len());
    buf[..n].copy_from_slice(&head[..n]);
    loop {
        if got > expected {
            break;
        }
        w.write_all(&buf[..n]).map_err(write_err)?;
        n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(read_err(e)),
        };
        got += n as u64;
    }
    if got != expected {
        return Err(InitramfsError::PrebuiltLength {
            index,
            expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Entry, Meta, Node};
    use flate2::read::MultiGzDecoder;
    use std::process::{Command, Stdio};

    fn tree(files: &[(&str, &str)]) -> Tree {
        let mut t = Tree::new();
        for (p, body) in files {
            let e = Entry {
                meta: Meta::new(0o644, 1_700_000_000),
                node: Node::File(Content::bytes(body.as_bytes().to_vec())),
            };
            t.insert(p, e, Meta::new(0o755, 1_700_000_000)).unwrap();
        }
        t
    }

    /// `cpio -it` on the given (uncompressed) archives; panics if cpio is missing.
    fn cpio_list(archive: &[u8]) -> Vec<String> {
        let mut child = Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running cpio (is GNU cpio installed?)");
        let mut sin = child.stdin.take().unwrap();
        let input = archive.to_vec();
        let feeder = std::thread::spawn(move || sin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn gzip_archive_is_reproducible_and_lists() {
        let t = tree(&[("init", "#!/bin/sh\n"), ("etc/hostname", "x\n")]);
        let a = [Archive::Tree {
            tree: t.clone(),
            compression: Compression::Gzip { level: 9 },
        }];
        let mut one = Vec::new();
        let n = build_initramfs(&a, &mut one).unwrap();
        assert_eq!(n, one.len() as u64);
        // Reproducible header: magic, deflate, no flags, mtime 0, OS 3.
        assert_eq!(&one[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&one[4..8], &[0, 0, 0, 0]);
        assert_eq!(one[9], 3);
        let mut two = Vec::new();
        build_initramfs(&a, &mut two).unwrap();
        assert_eq!(one, two);

        let mut plain = Vec::new();
        MultiGzDecoder::new(&one[..])
            .read_to_end(&mut plain)
            .unwrap();
        let mut direct = Vec::new();
        write_newc(&t, &mut direct).unwrap();
        assert_eq!(plain, direct);
        assert_eq!(cpio_list(&plain), ["etc", "etc/hostname", "init"]);
    }

    #[test]
    fn gzip_dc_reads_concatenated_gzip_archives() {
        let a = [
            Archive::Tree {
                tree: tree(&[("a", "1")]),
                compression: Compression::Gzip { level: 6 },
            },
            Archive::Tree {
                tree: tree(&[("b", "22")]),
                compression: Compression::Gzip { level: 1 },
            },
        ];
        let mut out = Vec::new();
        build_initramfs(&a, &mut out).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("initrd");
        std::fs::write(&f, &out).unwrap();
        let o = Command::new("gzip")
            .arg("-dc")
            .arg(&f)
            .output()
            .expect("running gzip");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // `cpio -it` stops at the first trailer; both archives are present.
        assert_eq!(cpio_list(&o.stdout), ["a"]);
        let mut dec = Vec::new();
        MultiGzDecoder::new(&out[..]).read_to_end(&mut dec).unwrap();
        assert_eq!(dec, o.stdout);
        let second = dec.windows(11).position(|w| w == b"TRAILER!!!\0").unwrap();
        let start = (second + 11).next_multiple_of(4);
        assert_eq!(cpio_list(&dec[start..]), ["b"]);
    }

    #[test]
    fn prebuilt_then_compressed_tree_lists_both() {
        // An uncompressed "microcode" archive first, as the kernel requires.
        let mut early = Vec::new();
        write_newc(
            &tree(&[("kernel/x86/microcode/GenuineIntel.bin", "ucode")]),
            &mut early,
        )
        .unwrap();
        let a = [
            Archive::Prebuilt(Content::bytes(early.clone())),
            Archive::Tree {
                tree: tree(&[("init", "x")]),
                compression: Compression::Gzip { level: 9 },
            },
        ];
        let mut out = Vec::new();
        build_initramfs(&a, &mut out).unwrap();
        assert_eq!(&out[..early.len()], &early[..]);
        assert_eq!(
            cpio_list(&out),
            [
                "kernel",
                "kernel/x86",
                "kernel/x86/microcode",
                "kernel/x86/microcode/GenuineIntel.bin"
            ]
        );
        let mut rest = Vec::new();
        MultiGzDecoder::new(&out[early.len()..])
            .read_to_end(&mut rest)
            .unwrap();
        assert_eq!(cpio_list(&rest), ["init"]);
    }

    #[test]
    fn uncompressed_archive_after_gzip_starts_aligned() {
        let a = [
            Archive::Tree {
                tree: tree(&[("a", "1")]),
                compression: Compression::Gzip { level: 9 },
            },
            Archive::Tree {
                tree: tree(&[("b", "2")]),
                compression: Compression::None,
            },
            Archive::Prebuilt(Content::bytes(b"\x1f\x8b odd".to_vec())),
            Archive::Prebuilt(Content::bytes({
                let mut v = Vec::new();
                write_newc(&tree(&[("c", "3")]), &mut v).unwrap();
                v
            })),
        ];
        let mut out = Vec::new();
        let n = build_initramfs(&a, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        let starts: Vec<usize> = out
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == b"070701")
            .map(|(i, _)| i)
            .collect();
        // Every uncompressed header (b, its trailer, c, its trailer) is 4-aligned.
        assert!(starts.len() >= 4, "{starts:?}");
        assert!(starts.iter().all(|s| s % 4 == 0), "{starts:?}");
        // The odd-length prebuilt blob is copied verbatim, not padded after.
        let odd = out.windows(6).position(|w| w == b"\x1f\x8b odd").unwrap();
        assert_eq!(odd % 4, 0, "it follows an aligned cpio archive");
    }

    #[test]
    fn errors_name_the_archive() {
        let a = [Archive::Tree {
            tree: Tree::new(),
            compression: Compression::Gzip { level: 10 },
        }];
        let e = build_initramfs(&a, io::sink()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "initramfs archive 0: gzip level 10 is not in 0..=9"
        );
        let dir = tempfile::tempdir().unwrap();
        let a = [
            Archive::Tree {
                tree: Tree::new(),
                compression: Compression::None,
            },
            Archive::Prebuilt(Content::Blob {
                path: dir.path().join("missing"),
                digest: crate::Digest::of(b""),
                size: 0,
            }),
        ];
        let e = build_initramfs(&a, io::sink()).unwrap_err();
        assert!(
            e.to_string().starts_with("initramfs archive 1 (prebuilt)"),
            "{e}"
        );
    }
}
