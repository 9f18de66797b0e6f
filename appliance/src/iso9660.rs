//! A small read-only ISO 9660 reader: enough to import an installer ISO
//! (Debian, Ubuntu, Fedora/RHEL media) without mounting it or extracting it
//! with an external tool.
//!
//! Reads the primary volume descriptor and, for names, prefers Rock Ridge
//! (SUSP `NM` entries, with `CE` continuation areas, `RE`/`CL` directory
//! relocation) as every installer ISO made by xorriso/genisoimage carries,
//! then Joliet (a supplementary descriptor with UCS-2 names), then plain
//! ISO 9660 names (version `;N` and a trailing dot dropped, lowercased).
//! Multi-extent files (over 4 GiB) are read as one. Symbolic links are
//! listed but not followed.
//!
//! Everything read from the image is bounds-checked: a hostile or truncated
//! ISO gets an [`IsoError`] naming what is wrong, never a panic or an
//! unbounded allocation. Parsing is pure (over byte slices); I/O is `pread`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sectors before the first volume descriptor.
const SYSTEM_AREA: u64 = 16;
const SECTOR: u64 = 2048;
/// Largest directory we read (a sanity bound against hostile sizes).
const MAX_DIR: u64 = 64 << 20;
/// Volume descriptors we look at before giving up.
const MAX_DESCRIPTORS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an ISO 9660 image (no CD001 volume descriptor at sector 16)")]
    NotIso { path: PathBuf },
    #[error("{path}: malformed ISO 9660 image: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{path}: {name} not found in the image")]
    NotFound { path: PathBuf, name: String },
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub is_dir: bool,
    pub is_symlink: bool,
    /// `(byte offset, length)` of each extent, in order.
    pub extents: Vec<(u64, u64)>,
}

impl Entry {
    pub fn size(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    RockRidge { skip: usize },
    Joliet,
    Plain,
}

/// An open ISO image.
pub struct Iso {
    file: File,
    path: PathBuf,
    len: u64,
    block: u64,
    root: (u64, u64),
    names: Names,
}

/// Whether `path` starts like an ISO 9660 image.
pub fn is_iso(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut b = [0u8; 6];
    f.read_exact_at(&mut b, SYSTEM_AREA * SECTOR).is_ok() && &b[1..6] == b"CD001"
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// One raw directory record, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record<'a> {
    extent: u32,
    size: u32,
    flags: u8,
    ident: &'a [u8],
    system_use: &'a [u8],
}

const FLAG_DIR: u8 = 0x02;
const FLAG_MULTI: u8 = 0x80;

/// Splits a directory's bytes into records (records never cross a sector;
/// a zero length byte pads to the next sector).
fn records(dir: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        let len = dir[at] as usize;
        if len == 0 {
            at = (at / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        let rec = dir
            .get(at..at + len)
            .ok_or_else(|| format!("directory record at byte {at} runs past its directory"))?;
        if len < 34 {
            return Err(format!(
                "directory record at byte {at} is {len} bytes (< 34)"
            ));
        }
        let name_len = rec[32] as usize;
        let ident = rec
            .get(33..33 + name_len)
            .ok_or_else(|| format!("directory record at byte {at}: name runs past the record"))?;
        let su_start = 33 + name_len + usize::from(name_len.is_multiple_of(2));
        let system_use = rec.get(su_start..).unwrap_or(&[]);
        out.push(Record {
            extent: le32(rec, 2).unwrap_or(0),
            size: le32(rec, 10).unwrap_or(0),
            flags: rec[25],
            ident,
            system_use,
        });
        at += len;
    }
    Ok(out)
}

/// What the Rock Ridge entries of one record say.
#[derive(Debug, Default, PartialEq, Eq)]
struct RockRidge {
    name: Option<String>,
    symlink: bool,
    /// `RE`: a relocated directory, listed through its `CL` placeholder.
    relocated: bool,
    /// `CL`: this placeholder stands for the directory at this block.
    child_link: Option<u32>,
    /// `CE`: continue at (block, offset, length).
    continuation: Option<(u32, u32, u32)>,
}

/// Parses SUSP entries in `area` into `rr` (name pieces appended).
fn parse_susp(area: &[u8], rr: &mut RockRidge, name: &mut Vec<u8>) {
    let mut at = 0usize;
    while at + 4 <= area.len() {
        let sig = &area[at..at + 2];
        let len = area[at + 2] as usize;
        if len < 4 || at + len > area.len() {
            break;
        }
        let e = &area[at..at + len];
        match sig {
            b"NM" if len >= 5 => {
                let flags = e[4];
                if flags & 0x02 != 0 {
                    name.extend_from_slice(b".");
                } else if flags & 0x04 != 0 {
                    name.extend_from_slice(b"..");
                } else {
                    name.extend_from_slice(&e[5..]);
                }
                rr.name = Some(String::new()); // filled from `name` by the caller
            }
            b"SL" => rr.symlink = true,
            b"RE" => rr.relocated = true,
            b"CL" => rr.child_link = le32(e, 4),
            b"CE" => {
                if let (Some(b), Some(o), Some(l)) = (le32(e, 4), le32(e, 12), le32(e, 20)) {
                    rr.continuation = Some((b, o, l));
                }
            }
            b"ST" => break,
            _ => {}
        }
        at += len;
    }
}

fn plain_name(ident: &[u8]) -> String {
    let s = String::from_utf8_lossy(ident);
    let s = s.split(';').next().unwrap_or("");
    let s = s.strip_suffix('.').unwrap_or(s);
    s.to_ascii_lowercase()
}

fn joliet_name(ident: &[u8]) -> String {
    let units: Vec<u16> = ident
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16_lossy(&units);
    match s.rsplit_once(';') {
        Some((n, v)) if v.chars().all(|c| c.is_ascii_digit()) => n.to_owned(),
        _ => s,
    }
}

impl Iso {
    /// Opens `path` and reads its volume descriptors.
    pub fn open(path: &Path) -> Result<Iso, IsoError> {
        let io = |source| IsoError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut iso = Iso {
            file,
            path: path.to_owned(),
            len,
            block: SECTOR,
            root: (0, 0),
            names: Names::Plain,
        };
        let mut primary = None;
        let mut joliet = None;
        for i in 0..MAX_DESCRIPTORS {
            let mut vd = vec![0u8; SECTOR as usize];
            if iso.read_at(&mut vd, (SYSTEM_AREA + i) * SECTOR).is_err() {
                break;
            }
            if &vd[1..6] != b"CD001" {
                if i == 0 {
                    return Err(IsoError::NotIso {
                        path: path.to_owned(),
                    });
                }
                break;
            }
            match vd[0] {
                1 if primary.is_none() => primary = Some(vd),
                2 if joliet.is_none()
                    && vd[88] == b'%'
                    && vd[89] == b'/'
                    && matches!(vd[90], b'@' | b'C' | b'E') =>
                {
                    joliet = Some(vd)
                }
                255 => break,
                _ => {}
            }
        }
        let pvd = primary.ok_or_else(|| iso.malformed("no primary volume descriptor"))?;
        let block = u16::from_le_bytes([pvd[128], pvd[129]]) as u64;
        if !matches!(block, 512 | 1024 | 2048) {
            return Err(iso.malformed(format!("logical block size {block}")));
        }
        iso.block = block;
        let root_of = |vd: &[u8]| -> Result<(u64, u64), String> {
            let r = records(&vd[156..190])?;
            let r = r.first().ok_or("no root directory record")?;
            Ok((r.extent as u64 * block, r.size as u64))
        };
        iso.root = root_of(&pvd).map_err(|d| iso.malformed(d))?;
        // Rock Ridge: an `SP` entry in the root's "." record.
        let root = iso.read_dir_bytes(iso.root)?;
        let rr = records(&root)
            .map_err(|d| iso.malformed(d))?
            .first()
            .and_then(|dot| {
                let su = dot.system_use;
                // (`then_some(su[6])` would index before the check: an
                // image without system use data panicked here.)
                su.get(6)
                    .filter(|_| &su[0..2] == b"SP" && su[4] == 0xBE && su[5] == 0xEF)
                    .map(|&skip| skip as usize)
            });
        if let Some(skip) = rr {
            iso.names = Names::RockRidge { skip };
        } else if let Some(j) = joliet {
            iso.root = root_of(&j).map_err(|d| iso.malformed(d))?;
            iso.names = Names::Joliet;
        }
        Ok(iso)
    }

    fn malformed(&self, detail: impl Into<String>) -> IsoError {
        IsoError::Malformed {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), IsoError> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(self.malformed(format!(
                "{} bytes at offset {offset} lie past the end of the image ({} bytes): truncated?",
                buf.len(),
                self.len
            )));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| IsoError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn read_dir_bytes(&self, (offset, size): (u64, u64)) -> Result<Vec<u8>, IsoError> {
        if size > MAX_DIR {
            return Err(self.malformed(format!("a directory of {size} bytes")));
        }
        let mut b = vec![0u8; size as usize];
        self.read_at(&mut b, offset)?;
        Ok(b)
    }

    /// The entries of the directory `dir` ("" or "/" is the root).
    pub fn list(&self, dir: &str) -> Result<Vec<Entry>, IsoError> {
        let d = self.lookup(dir)?;
        if !d.is_dir {
            return Err(self.malformed(format!("{dir} is not a directory")));
        }
        self.entries(d.extents[0])
    }

    fn entries(&self, at: (u64, u64)) -> Result<Vec<Entry>, IsoError> {
        let bytes = self.read_dir_bytes(at)?;
        let recs = records(&bytes).map_err(|d| self.malformed(d))?;
        let mut out: Vec<Entry> = Vec::new();
        let mut pending_multi = false;
        for r in recs {
            if r.ident == [0] || r.ident == [1] {
                continue;
            }
            let offset = r.extent as u64 * self.block;
            let mut e = Entry {
                name: String::new(),
                is_dir: r.flags & FLAG_DIR != 0,
                is_symlink: false,
                extents: vec![(offset, r.size as u64)],
            };
            match self.names {
                Names::RockRidge { skip } => {
                    let rr = self.rock_ridge(r.system_use.get(skip..).unwrap_or(&[]))?;
                    if rr.0.relocated {
                        continue;
                    }
                    e.is_symlink = rr.0.symlink;
                    e.name = rr.1.unwrap_or_else(|| plain_name(r.ident));
                    if let Some(block) = rr.0.child_link {
                        // The real directory: its size is in its own "." record.
                        let at = block as u64 * self.block;
                        let mut first = vec![0u8; 34];
                        self.read_at(&mut first, at)?;
                        let dot = records(&first).map_err(|d| self.malformed(d))?;
                        let size = dot.first().map(|d| d.size as u64).unwrap_or(0);
                        e.is_dir = true;
                        e.extents = vec![(at, size)];
                    }
                }
                Names::Joliet => e.name = joliet_name(r.ident),
                Names::Plain => e.name = plain_name(r.ident),
            }
            if e.name.is_empty() || e.name.contains('/') || e.name == "." || e.name == ".." {
                return Err(self.malformed(format!("an entry named {:?}", e.name)));
            }
            // Later records of a multi-extent file continue the previous one.
            if pending_multi {
                if let Some(prev) = out.last_mut() {
                    if prev.name == e.name {
                        prev.extents.push((offset, r.size as u64));
                        pending_multi = r.flags & FLAG_MULTI != 0;
                        continue;
                    }
                }
            }
            pending_multi = r.flags & FLAG_MULTI != 0;
            for &(o, l) in &e.extents {
                if !e.is_symlink && o.saturating_add(l) > self.len {
                    return Err(self.malformed(format!(
                        "{} claims bytes {o}..{} of a {}-byte image: truncated?",
                        e.name,
                        o.saturating_add(l),
                        self.len
                    )));
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Rock Ridge entries of one record, following `CE` continuations
    /// (at most 16, against loops); with the assembled name.
    fn rock_ridge(&self, area: &[u8]) -> Result<(RockRidge, Option<String>), IsoError> {
        let mut rr = RockRidge::default();
        let mut name = Vec::new();
        parse_susp(area, &mut rr, &mut name);
        let mut hops = 0;
        while let Some((block, off, len)) = rr.continuation.take() {
            hops += 1;
            if hops > 16 || len as u64 > SECTOR * 4 {
                return Err(self.malformed("a Rock Ridge continuation chain loops or is too long"));
            }
            let mut b = vec![0u8; len as usize];
            self.read_at(&mut b, block as u64 * self.block + off as u64)?;
            parse_susp(&b, &mut rr, &mut name);
        }
        let n = rr
            .name
            .take()
            .map(|_| String::from_utf8_lossy(&name).into_owned());
        Ok((rr, n))
    }

    /// The entry at `path` (components separated by `/`; "" is the root).
    pub fn lookup(&self, path: &str) -> Result<Entry, IsoError> {
        let mut cur = Entry {
            name: String::new(),
            is_dir: true,
            is_symlink: false,
            extents: vec![self.root],
        };
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." || !cur.is_dir {
                return Err(self.not_found(path));
            }
            let entries = self.entries(cur.extents[0])?;
            cur = match entries.iter().find(|e| e.name == part) {
                Some(e) => e.clone(),
                None if self.names == Names::Plain => entries
                    .into_iter()
                    .find(|e| e.name.eq_ignore_ascii_case(part))
                    .ok_or_else(|| self.not_found(path))?,
                None => return Err(self.not_found(path)),
            };
        }
        Ok(cur)
    }

    fn not_found(&self, name: &str) -> IsoError {
        IsoError::NotFound {
            path: self.path.clone(),
            name: name.to_owned(),
        }
    }

    /// A reader over a regular file's bytes.
    pub fn open_file(&self, path: &str) -> Result<IsoFile<'_>, IsoError> {
        let e = self.lookup(path)?;
        if e.is_dir || e.is_symlink {
            return Err(self.malformed(format!("{path} is not a regular file")));
        }
        Ok(IsoFile {
            iso: self,
            extents: e.extents,
            index: 0,
            pos: 0,
        })
    }

    /// A whole (small) file as text; `None` when absent.
    pub fn read_text(&self, path: &str) -> Option<String> {
        let mut s = String::new();
        let mut f = self.open_file(path).ok()?;
        (&mut f).take(1 << 20).read_to_string(&mut s).ok()?;
        Some(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads one file's extents in order.
pub struct IsoFile<'a> {
    iso: &'a Iso,
    extents: Vec<(u64, u64)>,
    index: usize,
    pos: u64,
}

impl Read for IsoFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(&(off, len)) = self.extents.get(self.index) {
            if self.pos >= len {
                self.index += 1;
                self.pos = 0;
                continue;
            }
            let n = (len - self.pos).min(buf.len() as u64) as usize;
            self.iso
                .read_at(&mut buf[..n], off + self.pos)
                .map_err(std::io::Error::other)?;
            self.pos += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn xorriso(args: &[&str], tree: &Path, out: &Path) {
        let o = Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet"])
            .args(args)
            .arg("-o")
            .arg(out)
            .arg(tree)
            .output()
            .expect("xorriso is installed (.ci/run installs it)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let deep = "a/b/c/d/e/f/g/h/i/j";
        for (p, c) in [
            ("install.amd/vmlinuz", "kernel bytes".to_owned()),
            ("install.amd/initrd.gz", "x".repeat(5000)),
            (".disk/info", "Debian GNU/Linux 12.5.0 amd64".to_owned()),
            ("Mixed_Case-Name.With.Dots", "m".to_owned()),
            (&format!("{deep}/deep.txt"), "deep".to_owned()),
        ] {
            let p = t.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        std::os::unix::fs::symlink("install.amd", t.path().join("link")).unwrap();
        t
    }

    fn read_all(iso: &Iso, p: &str) -> Vec<u8> {
        let mut v = Vec::new();
        iso.open_file(p).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn rock_ridge_joliet_and_plain_names() {
        let t = tree();
        let out = tempfile::tempdir().unwrap();
        for (flags, names) in [
            (vec!["-R"], "rr"),
            (vec!["-J", "-joliet-long"], "joliet"),
            (vec![], "plain"),
        ] {
            let iso_path = out.path().join(format!("{names}.iso"));
            xorriso(&flags, t.path(), &iso_path);
            assert!(is_iso(&iso_path));
            let iso = Iso::open(&iso_path).unwrap();
            assert_eq!(
                read_all(&iso, "install.amd/vmlinuz"),
                b"kernel bytes",
                "{names}"
            );
            assert_eq!(
                read_all(&iso, "install.amd/initrd.gz").len(),
                5000,
                "{names}"
            );
            assert_eq!(
                iso.read_text(".disk/info").as_deref(),
                Some("Debian GNU/Linux 12.5.0 amd64"),
                "{names}"
            );
            if names != "plain" {
                assert!(iso.lookup("Mixed_Case-Name.With.Dots").is_ok(), "{names}");
                // Rock Ridge relocates directories deeper than 8 levels.
                assert_eq!(read_all(&iso, "a/b/c/d/e/f/g/h/i/j/deep.txt"), b"deep");
            }
            let root: Vec<String> = iso.list("").unwrap().into_iter().map(|e| e.name).collect();
            assert!(root.iter().any(|n| n == "install.amd"), "{names}: {root:?}");
            assert!(matches!(
                iso.lookup("install.amd/nope"),
                Err(IsoError::NotFound { .. })
            ));
            if names == "rr" {
                assert!(iso.lookup("link").unwrap().is_symlink);
                assert!(iso.open_file("link").is_err());
                assert!(!root.iter().any(|n| n == "rr_moved"), "{root:?}");
            }
        }
    }

    /// The builder's writer (`builder::iso9660`) and this reader agree:
    /// plain names come back lowercased without `;1`, every byte intact.
    #[test]
    fn reads_what_the_builders_hybrid_iso_writer_wrote() {
        use builder::iso9660 as w;
        let opts = w::IsoOptions {
            volume_id: "APPLIANCE".into(),
            epoch: 1_767_225_600,
            disk_guid: builder::gpt::Guid::derive(&[b"t"]),
        };
        let esp: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let files = vec![
            w::IsoFile {
                name: "EFIBOOT.IMG".into(),
                data: w::IsoData::Bytes(esp.clone()),
                partition: Some(builder::gpt::PartitionSpec {
                    label: "esp".into(),
                    type_guid: builder::gpt::types::ESP,
                    guid: builder::gpt::Guid::derive(&[b"e"]),
                    size: builder::gpt::SizeSpec::Fill,
                    attributes: 0,
                }),
                efi_boot: true,
            },
            w::IsoFile {
                name: "MANIFEST.JSON".into(),
                data: w::IsoData::Bytes(b"{}\n".to_vec()),
                partition: None,
                efi_boot: false,
            },
        ];
        let layout = w::plan(&opts, &files).unwrap();
        let mut bytes: Vec<u8> = Vec::new();
        w::write(&opts, &files, &layout, &mut bytes).unwrap();
        bytes.resize(layout.size as usize, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.iso");
        std::fs::write(&path, &bytes).unwrap();
        assert!(is_iso(&path));
        let iso = Iso::open(&path).unwrap();
        let mut names: Vec<String> = iso.list("").unwrap().into_iter().map(|e| e.name).collect();
        names.sort();
        assert_eq!(names, ["boot.cat", "efiboot.img", "manifest.json"]);
        assert_eq!(read_all(&iso, "efiboot.img"), esp);
        assert_eq!(read_all(&iso, "manifest.json"), b"{}\n");
    }

    #[test]
    fn truncated_and_foreign_files_are_named() {
        let t = tree();
        let out = tempfile::tempdir().unwrap();
        let iso_path = out.path().join("x.iso");
        xorriso(&["-R"], t.path(), &iso_path);
        let full = std::fs::read(&iso_path).unwrap();
        // Cut inside the file data: opening works, reading names the truncation.
        let cut = out.path().join("cut.iso");
        let iso = Iso::open(&iso_path).unwrap();
        let e = iso.lookup("install.amd/initrd.gz").unwrap();
        std::fs::write(&cut, &full[..(e.extents[0].0 + 10) as usize]).unwrap();
        let err = match Iso::open(&cut).and_then(|i| i.lookup("install.amd/initrd.gz")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a truncated file was accepted"),
        };
        assert!(err.contains("truncated"), "{err}");
        let not = out.path().join("not.iso");
        std::fs::write(&not, vec![0u8; 40000]).unwrap();
        assert!(matches!(Iso::open(&not), Err(IsoError::NotIso { .. })));
        assert!(!is_iso(&not));
    }

    #[test]
    fn hostile_records_are_errors_not_panics() {
        // A record claiming more bytes than its directory holds.
        let mut short = vec![0u8; 100];
        short[0] = 200;
        assert!(records(&short).is_err());
        let mut dir = vec![0u8; 2048];
        // A record too short to hold its fixed part.
        dir[0] = 20;
        assert!(records(&dir).is_err());
        // A name running past its record.
        dir[0] = 34;
        dir[32] = 100;
        assert!(records(&dir).is_err());
        // SUSP entries with silly lengths stop parsing quietly.
        let mut rr = RockRidge::default();
        let mut name = Vec::new();
        parse_susp(b"NM\x02\x01NM\xff\x01abc", &mut rr, &mut name);
        assert!(name.is_empty());
    }
}
