//! Native `.deb` extraction: the `ar` container, `control.tar.*` and
//! `data.tar.{xz,zst,gz}` (or plain `data.tar`), read as one stream.
//!
//! Every regular file's content goes into the [`Store`] as a blob; the caller
//! gets back a list of [`DebEntry`] (paths normalised to relative form with no
//! leading `./`) from which the builder makes its file trees. Entries whose
//! path would escape the root (`..`, absolute paths) are an error naming the
//! path, even when a filter would have skipped them.

use std::io::{self, BufReader, Read};

use builder::Digest;

use crate::store::{Store, StoreError};

/// What a `.deb` entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file whose content is the blob `digest`.
    File {
        digest: Digest,
        size: u64,
    },
    Dir,
    /// A symbolic link to the given target (as written, not normalised).
    Symlink(String),
    /// A hard link to another entry's normalised path.
    Hardlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One entry of a package's `data.tar`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebEntry {
    /// Relative, `/`-separated, no leading `./`, no `.` or `..` components.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits, including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

/// What [`extract`] found in a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebContents {
    /// The text of `control` from `control.tar.*`, if present.
    pub control: Option<String>,
    /// The `data.tar` entries that passed the filter, in archive order.
    pub entries: Vec<DebEntry>,
}

/// What went wrong extracting a `.deb`; `deb` names the package or file.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("{deb}: {source}")]
    Io { deb: String, source: io::Error },
    #[error("{deb}: not a .deb (no !<arch> magic)")]
    NotAnArchive { deb: String },
    #[error("{deb}: bad ar member header at offset {offset}: {detail}")]
    BadHeader {
        deb: String,
        offset: u64,
        detail: String,
    },
    #[error("{deb}: no {member} member")]
    MissingMember { deb: String, member: &'static str },
    #[error("{deb}: member {member} uses an unsupported compression")]
    UnsupportedCompression { deb: String, member: String },
    #[error("{deb}: unsafe path {path:?} in data.tar (absolute or containing ..)")]
    UnsafePath { deb: String, path: String },
    #[error("{deb}: entry {path:?} has unsupported tar type {kind}")]
    UnsupportedEntry {
        deb: String,
        path: String,
        kind: String,
    },
    #[error("{deb}: storing {path:?}: {source}")]
    Store {
        deb: String,
        path: String,
        source: Box<StoreError>,
    },
}

/// A path predicate: which normalised paths to keep.
pub type Filter<'a> = &'a dyn Fn(&str) -> bool;

/// Extract the package the blob `digest` holds (verified while read).
pub fn extract_blob(
    store: &Store,
    digest: &Digest,
    filter: Option<Filter<'_>>,
) -> Result<DebContents, DebError> {
    let deb = digest.to_string();
    let r = store.open_blob(digest).map_err(|source| DebError::Store {
        deb: deb.clone(),
        path: String::new(),
        source: Box::new(source),
    })?;
    extract(r, &deb, store, filter)
}

struct Member {
    name: String,
    size: u64,
}

/// Longest BSD member name read (sizes in an ar header are claims: they
/// are bounded before anything is allocated from them).
const MAX_NAME: u64 = 4096;
/// Largest GNU long-name table read (`.deb`s have three short members).
const MAX_NAME_TABLE: u64 = 1 << 20;
/// Largest `control` file read (real ones are a few KiB).
const MAX_CONTROL: u64 = 16 << 20;

/// Read the next ar member header; `None` at end of archive.
fn next_member(
    r: &mut impl Read,
    deb: &str,
    offset: &mut u64,
    gnu_names: &mut Option<Vec<u8>>,
) -> Result<Option<Member>, DebError> {
    let io = |source| DebError::Io {
        deb: deb.to_string(),
        source,
    };
    let bad = |offset: u64, detail: String| DebError::BadHeader {
        deb: deb.to_string(),
        offset,
        detail,
    };
    loop {
        if *offset % 2 == 1 {
            let mut pad = [0u8; 1];
            if r.read(&mut pad).map_err(io)? == 0 {
                return Ok(None);
            }
            *offset += 1;
        }
        let mut h = [0u8; 60];
        let mut got = 0;
        while got < 60 {
            let k = r.read(&mut h[got..]).map_err(io)?;
            if k == 0 {
                break;
            }
            got += k;
        }
        if got == 0 {
            return Ok(None);
        }
        if got < 60 {
            return Err(bad(*offset, "truncated header".into()));
        }
        let at = *offset;
        *offset += 60;
        if &h[58..60] != b"`\n" {
            return Err(bad(at, "bad header terminator".into()));
        }
        let field = |a: usize, b: usize| String::from_utf8_lossy(&h[a..b]).trim().to_string();
        let mut size: u64 = field(48, 58)
            .parse()
            .map_err(|_| bad(at, format!("bad size {:?}", field(48, 58))))?;
        let raw = field(0, 16);
        let name = if let Some(n) = raw.strip_prefix("#1/") {
            // BSD: the name follows the header and counts towards the size.
            let n: u64 = n
                .parse()
                .map_err(|_| bad(at, format!("bad name {raw:?}")))?;
            if n > size {
                return Err(bad(at, format!("name length {n} exceeds size {size}")));
            }
            if n > MAX_NAME {
                return Err(bad(at, format!("name length {n} is more than {MAX_NAME}")));
            }
            let mut buf = vec![0u8; n as usize];
            r.read_exact(&mut buf).map_err(io)?;
            *offset += n;
            size -= n;
            String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string()
        } else if raw == "//" {
            // GNU long-name table.
            if size > MAX_NAME_TABLE {
                return Err(bad(
                    at,
                    format!("long-name table of {size} bytes is more than {MAX_NAME_TABLE}"),
                ));
            }
            let mut buf = vec![0u8; size as usize];
            r.read_exact(&mut buf).map_err(io)?;
            *offset += size;
            *gnu_names = Some(buf);
            continue;
        } else if raw == "/" || raw == "/SYM64/" {
            // Symbol table: skip.
            io::copy(&mut r.take(size), &mut io::sink()).map_err(io)?;
            *offset += size;
            continue;
        } else if let Some(idx) = raw.strip_prefix('/') {
            let idx: usize = idx
                .parse()
                .map_err(|_| bad(at, format!("bad name {raw:?}")))?;
            let table = gnu_names
                .as_ref()
                .ok_or_else(|| bad(at, "long name without a // table".into()))?;
            let rest = table
                .get(idx..)
                .ok_or_else(|| bad(at, format!("long name offset {idx} out of range")))?;
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .trim_end_matches('/')
                .to_string()
        } else {
            raw.trim_end_matches('/').to_string()
        };
        return Ok(Some(Member { name, size }));
    }
}

fn decompressor<'a>(
    name: &str,
    r: impl Read + 'a,
    deb: &str,
) -> Result<Box<dyn Read + 'a>, DebError> {
    let rest = name
        .strip_prefix("data.tar")
        .or_else(|| name.strip_prefix("control.tar"))
        .unwrap_or("");
    Ok(match rest {
        "" => Box::new(r),
        ".xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)),
        ".gz" => Box::new(flate2::read::MultiGzDecoder::new(r)),
        ".zst" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(BufReader::new(r)).map_err(|e| {
                DebError::Io {
                    deb: deb.to_string(),
                    source: io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")),
                }
            })?,
        ),
        _ => {
            return Err(DebError::UnsupportedCompression {
                deb: deb.to_string(),
                member: name.to_string(),
            })
        }
    })
}

/// Read the `ar` magic that starts every `.deb`.
fn read_magic(r: &mut impl Read, deb: &str) -> Result<(), DebError> {
    let not_deb = || DebError::NotAnArchive {
        deb: deb.to_string(),
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| not_deb())?;
    if &magic != b"!<arch>\n" {
        return Err(not_deb());
    }
    Ok(())
}

/// Normalise a tar path: strip leading `./`, drop `.` components; `None` if
/// absolute or containing `..`. The archive root (`./`) becomes `""`.
pub fn normalise_path(raw: &str) -> Option<String> {
    if raw.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Extract a `.deb` from `r`: regular files of `data.tar` that pass `filter`
/// go into `store`; `deb` names the package in errors. Reads `r` to its end
/// (so a verifying reader gets to check the whole package).
pub fn extract(
    mut r: impl Read,
    deb: &str,
    store: &Store,
    filter: Option<Filter<'_>>,
) -> Result<DebContents, DebError> {
    let io = |source| DebError::Io {
        deb: deb.to_string(),
        source,
    };
    read_magic(&mut r, deb)?;
    let mut offset = 8u64;
    let mut gnu = None;
    let mut control = None;
    let mut entries = None;
    while let Some(m) = next_member(&mut r, deb, &mut offset, &mut gnu)? {
        let mut take = (&mut r).take(m.size);
        if m.name.starts_with("control.tar") {
            control = Some(read_control(decompressor(&m.name, &mut take, deb)?, deb)?);
        } else if m.name.starts_with("data.tar") {
            entries = Some(read_data(
                decompressor(&m.name, &mut take, deb)?,
                deb,
                store,
                filter,
            )?);
        }
        io::copy(&mut take, &mut io::sink()).map_err(io)?;
        offset += m.size;
    }
    // Drain so a verifying reader checks the digest.
    io::copy(&mut r, &mut io::sink()).map_err(io)?;
    let entries = entries.ok_or(DebError::MissingMember {
        deb: deb.to_string(),
        member: "data.tar",
    })?;
    Ok(DebContents {
        control: control.flatten(),
        entries,
    })
}

/// Unpack the `data.tar` of the `.deb` read from `r` into the directory
/// `dest` (which must exist), as `dpkg --extract` would: modes, owners
/// and links kept, existing files replaced. Every path is checked before
/// anything is written: absolute paths and `..` are refused, and nothing
/// is written through a symlink that leads outside `dest`. Returns the
/// number of entries unpacked. `deb` names the package in errors.
pub fn unpack_data(mut r: impl Read, deb: &str, dest: &std::path::Path) -> Result<u64, DebError> {
    let io = |source| DebError::Io {
        deb: deb.to_string(),
        source,
    };
    read_magic(&mut r, deb)?;
    let mut offset = 8u64;
    let mut gnu = None;
    while let Some(m) = next_member(&mut r, deb, &mut offset, &mut gnu)? {
        let mut take = (&mut r).take(m.size);
        if m.name.starts_with("data.tar") {
            let mut ar = tar::Archive::new(decompressor(&m.name, &mut take, deb)?);
            ar.set_preserve_permissions(true);
            ar.set_preserve_ownerships(true);
            ar.set_preserve_mtime(true);
            ar.set_unpack_xattrs(false);
            ar.set_overwrite(true);
            let mut n = 0u64;
            for e in ar.entries().map_err(io)? {
                let mut e = e.map_err(io)?;
                let raw = String::from_utf8_lossy(&e.path_bytes()).to_string();
                let Some(norm) = normalise_path(&raw) else {
                    return Err(DebError::UnsafePath {
                        deb: deb.to_string(),
                        path: raw,
                    });
                };
                // A directory that exists already, possibly as a link to
                // one (`/lib` → `usr/lib` on a merged-/usr system), is
                // kept, as dpkg keeps it.
                if e.header().entry_type().is_dir() && dest.join(&norm).is_dir() {
                    n += 1;
                    continue;
                }
                // `unpack_in` refuses paths that resolve outside `dest`.
                if !e.unpack_in(dest).map_err(io)? {
                    return Err(DebError::UnsafePath {
                        deb: deb.to_string(),
                        path: raw,
                    });
                }
                n += 1;
            }
            return Ok(n);
        }
        io::copy(&mut take, &mut io::sink()).map_err(io)?;
        offset += m.size;
    }
    Err(DebError::MissingMember {
        deb: deb.to_string(),
        member: "data.tar",
    })
}

fn read_control(r: impl Read, deb: &str) -> Result<Option<String>, DebError> {
    let io = |source| DebError::Io {
        deb: deb.to_string(),
        source,
    };
    let mut ar = tar::Archive::new(r);
    let mut control = None;
    for e in ar.entries().map_err(io)? {
        let mut e = e.map_err(io)?;
        let path = String::from_utf8_lossy(&e.path_bytes()).to_string();
        if normalise_path(&path).as_deref() == Some("control") {
            let mut s = String::new();
            (&mut e)
                .take(MAX_CONTROL + 1)
                .read_to_string(&mut s)
                .map_err(io)?;
            if s.len() as u64 > MAX_CONTROL {
                return Err(io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("control file is more than {MAX_CONTROL} bytes"),
                )));
            }
            control = Some(s);
        }
    }
    Ok(control)
}

fn read_data(
    r: impl Read,
    deb: &str,
    store: &Store,
    filter: Option<Filter<'_>>,
) -> Result<Vec<DebEntry>, DebError> {
    let io = |source| DebError::Io {
        deb: deb.to_string(),
        source,
    };
    let mut ar = tar::Archive::new(r);
    let mut out = Vec::new();
    for e in ar.entries().map_err(io)? {
        let mut e = e.map_err(io)?;
        let raw = String::from_utf8_lossy(&e.path_bytes()).to_string();
        let unsafe_path = |p: &str| DebError::UnsafePath {
            deb: deb.to_string(),
            path: p.to_string(),
        };
        let path = normalise_path(&raw).ok_or_else(|| unsafe_path(&raw))?;
        let h = e.header();
        let ty = h.entry_type();
        let link = e
            .link_name_bytes()
            .map(|b| String::from_utf8_lossy(&b).to_string());
        if ty.is_pax_global_extensions() || ty.is_pax_local_extensions() {
            continue;
        }
        if path.is_empty() {
            continue; // the archive root, "./"
        }
        if filter.is_some_and(|f| !f(&path)) {
            continue;
        }
        let h = e.header();
        let mode = h.mode().map_err(io)? & 0o7777;
        let uid = h.uid().map_err(io)? as u32;
        let gid = h.gid().map_err(io)? as u32;
        let mtime = h.mtime().map_err(io)? as i64;
        let dev = |h: &tar::Header| -> Result<(u32, u32), DebError> {
            Ok((
                h.device_major().map_err(io)?.unwrap_or(0),
                h.device_minor().map_err(io)?.unwrap_or(0),
            ))
        };
        let kind = if ty.is_file() || ty.is_contiguous() {
            let (digest, size) = store.put_reader(&mut e).map_err(|source| DebError::Store {
                deb: deb.to_string(),
                path: path.clone(),
                source: Box::new(source),
            })?;
            EntryKind::File { digest, size }
        } else if ty.is_dir() {
            EntryKind::Dir
        } else if ty.is_symlink() {
            EntryKind::Symlink(link.unwrap_or_default())
        } else if ty.is_hard_link() {
            let target = link.unwrap_or_default();
            EntryKind::Hardlink(normalise_path(&target).ok_or_else(|| unsafe_path(&target))?)
        } else if ty.is_character_special() {
            let (major, minor) = dev(e.header())?;
            EntryKind::CharDevice { major, minor }
        } else if ty.is_block_special() {
            let (major, minor) = dev(e.header())?;
            EntryKind::BlockDevice { major, minor }
        } else if ty.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(DebError::UnsupportedEntry {
                deb: deb.to_string(),
                path,
                kind: format!("{ty:?}"),
            });
        };
        out.push(DebEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Build a small package with `dpkg-deb --build -Z<compression>`.
    pub(crate) fn build_deb(dir: &Path, name: &str, compression: &str) -> PathBuf {
        let root = dir.join(format!("{name}-{compression}-root"));
        fs::create_dir_all(root.join("DEBIAN")).unwrap();
        fs::write(
            root.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: Test <t@example.invalid>\nDescription: test package\n"
            ),
        )
        .unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("usr/share/empty")).unwrap();
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("boot/vmlinuz"), vec![7u8; 100_000]).unwrap();
        fs::set_permissions(root.join("boot/vmlinuz"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("../bin/tool", root.join("usr/share/tool-link")).unwrap();
        fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
        let out = dir.join(format!("{name}-{compression}.deb"));
        let st = Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .arg(format!("-Z{compression}"))
            .arg("--build")
            .arg(&root)
            .arg(&out)
            .output()
            .expect("running dpkg-deb");
        assert!(
            st.status.success(),
            "dpkg-deb: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        out
    }

    fn round_trip(compression: &str) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path().join("store")).unwrap();
        let deb = build_deb(dir.path(), "demo", compression);
        let (deb_digest, _) = store.put_file(&deb).unwrap();
        let c = extract_blob(&store, &deb_digest, None).unwrap();
        assert!(c.control.unwrap().contains("Package: demo"));
        let get = |p: &str| {
            c.entries
                .iter()
                .find(|e| e.path == p)
                .unwrap_or_else(|| panic!("{p} missing from {:?}", c.entries))
        };
        let tool = get("usr/bin/tool");
        let EntryKind::File { digest, size } = &tool.kind else {
            panic!("{tool:?}")
        };
        assert_eq!(*size, 18);
        assert_eq!(store.read_blob(digest).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(tool.mode, 0o755);
        assert_eq!((tool.uid, tool.gid), (0, 0));
        let k = get("boot/vmlinuz");
        assert_eq!(k.mode, 0o600);
        let EntryKind::File { digest, .. } = &k.kind else {
            panic!()
        };
        assert_eq!(store.read_blob(digest).unwrap(), vec![7u8; 100_000]);
        assert_eq!(get("usr/share/empty").kind, EntryKind::Dir);
        assert_eq!(
            get("usr/share/tool-link").kind,
            EntryKind::Symlink("../bin/tool".into())
        );
        // The second of the two names is a hard link to the first.
        let t2 = get("usr/bin/tool2");
        let links: Vec<&EntryKind> = [&tool.kind, &t2.kind]
            .into_iter()
            .filter(|k| matches!(k, EntryKind::Hardlink(_)))
            .collect();
        assert_eq!(links.len(), 1, "{tool:?} {t2:?}");
        assert!(
            matches!(links[0], EntryKind::Hardlink(p) if p == "usr/bin/tool" || p == "usr/bin/tool2"),
            "{links:?}"
        );
        assert!(c.entries.iter().all(|e| !e.path.starts_with('.')));

        // Filtered: only boot/.
        let only_boot = |p: &str| p == "boot" || p.starts_with("boot/");
        let c2 = extract_blob(&store, &deb_digest, Some(&only_boot)).unwrap();
        let paths: Vec<&str> = c2.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["boot", "boot/vmlinuz"]);
    }

    #[test]
    fn xz_round_trip() {
        round_trip("xz");
    }

    #[test]
    fn gzip_round_trip() {
        round_trip("gzip");
    }

    #[test]
    fn zstd_round_trip() {
        round_trip("zstd");
    }

    #[test]
    fn uncompressed_round_trip() {
        round_trip("none");
    }

    /// Build an ar archive by hand with the given members.
    fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"!<arch>\n".to_vec();
        for (name, data) in members {
            out.extend(
                format!(
                    "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                    name,
                    0,
                    0,
                    0,
                    100644,
                    data.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    fn tar_with(path: &str) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        // Write the name bytes directly: tar::Builder refuses "..".
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path()).unwrap();
        for bad in ["./../etc/passwd", "/etc/shadow", "usr/../../x"] {
            let deb = ar(&[("debian-binary", b"2.0\n"), ("data.tar", &tar_with(bad))]);
            let e = extract(&deb[..], "evil.deb", &store, None).unwrap_err();
            assert!(matches!(e, DebError::UnsafePath { .. }), "{e}");
            assert!(e.to_string().contains(bad), "{e}");
            assert!(e.to_string().contains("evil.deb"), "{e}");
        }
        assert!(store.blobs().unwrap().is_empty());
    }

    #[test]
    fn bsd_and_gnu_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path()).unwrap();
        let data = tar_with("./a");
        // BSD: "#1/8" followed by the 8-byte name.
        let mut bsd_member = b"data.tar".to_vec();
        bsd_member.extend_from_slice(&data);
        let deb = ar(&[("debian-binary", b"2.0\n"), ("#1/8", &bsd_member)]);
        let c = extract(&deb[..], "bsd.deb", &store, None).unwrap();
        assert_eq!(c.entries[0].path, "a");
        // GNU: "data.tar/" terminated names.
        let deb = ar(&[("debian-binary/", b"2.0\n"), ("data.tar/", &data)]);
        let c = extract(&deb[..], "gnu.deb", &store, None).unwrap();
        assert_eq!(c.entries[0].path, "a");
        // Not an archive, and an archive with no data member.
        assert!(matches!(
            extract(&b"hello world"[..], "x", &store, None),
            Err(DebError::NotAnArchive { .. })
        ));
        let deb = ar(&[("debian-binary", b"2.0\n")]);
        assert!(matches!(
            extract(&deb[..], "x", &store, None),
            Err(DebError::MissingMember { .. })
        ));
    }

    #[test]
    fn normalise() {
        assert_eq!(normalise_path("./usr/bin/").as_deref(), Some("usr/bin"));
        assert_eq!(normalise_path("./").as_deref(), Some(""));
        assert_eq!(normalise_path("a/./b").as_deref(), Some("a/b"));
        assert_eq!(normalise_path("/a"), None);
        assert_eq!(normalise_path("a/../b"), None);
    }

    /// Sizes in ar headers are claims: a 70-byte archive naming a 9 GB
    /// BSD name or long-name table is refused, not allocated.
    #[test]
    fn lying_member_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path()).unwrap();
        for (name, size) in [("#1/9999999999", "9999999999"), ("//", "9999999999")] {
            let mut deb = b"!<arch>\n".to_vec();
            deb.extend_from_slice(
                format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{size:<10}`\n", 0, 0, 0, 644).as_bytes(),
            );
            let e = extract(&deb[..], "liar.deb", &store, None).unwrap_err();
            assert!(matches!(e, DebError::BadHeader { .. }), "{e}");
            assert!(e.to_string().contains("is more than"), "{e}");
        }
    }

    /// Thousands of mutated packages: each extracts or fails, none panics.
    #[test]
    fn mutated_debs_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path()).unwrap();
        let mut control = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(13);
        h.set_mode(0o644);
        h.set_cksum();
        control
            .append_data(&mut h, "./control", &b"Package: demo"[..])
            .unwrap();
        let control = control.into_inner().unwrap();
        let good = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &control),
            ("data.tar", &tar_with("./a")),
        ]);
        assert!(extract(&good[..], "good.deb", &store, None).is_ok());
        let mut x: u64 = 0x5eed_0deb;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..=next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                match next() % 3 {
                    0 => b.truncate(at),
                    1 => b[at] = next() as u8,
                    _ => b[at] = b"0123456789 /#"[(next() % 13) as usize],
                }
                if b.is_empty() {
                    break;
                }
            }
            let _ = extract(&b[..], "m.deb", &store, None);
        }
    }
}
