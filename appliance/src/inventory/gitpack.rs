//! Reading objects from git's own packs (`.git/objects/pack/*.{idx,pack}`),
//! as stock `git gc` or `git repack` leave them: index version 2, pack
//! version 2, whole objects and both delta kinds (`OFS_DELTA`,
//! `REF_DELTA`). The inventory writes only loose objects and sets
//! `gc.auto = 0`, but an operator may still run `git gc` by hand; the
//! appliance must keep reading its history afterwards.
//!
//! A pack is read whole into memory on first use (inventory packs are a
//! few MiB) and checked against its trailing SHA-1 and its index's copy of
//! it; the set of packs is re-scanned when the pack directory changes.
//! Every offset and length is bounds-checked, delta chains are limited in
//! depth, and each object read is verified against its id by the caller.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha1::{Digest, Sha1};

use super::git::{hex, GitError, Oid, MAX_OBJECT};

/// Deepest delta chain followed (git's own default is 50).
const MAX_DEPTH: usize = 256;

/// One pack and its index, in memory.
struct Pack {
    name: PathBuf,
    idx: Vec<u8>,
    data: Vec<u8>,
    count: usize,
}

impl Pack {
    fn load(idx_path: &Path) -> Result<Pack, GitError> {
        let corrupt = |why: String| GitError::Corrupt {
            oid: idx_path.display().to_string(),
            why,
        };
        let io = |what: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| GitError::Io {
                what,
                path: p,
                source,
            }
        };
        let idx = fs::read(idx_path).map_err(io("reading", idx_path))?;
        let pack_path = idx_path.with_extension("pack");
        let data = fs::read(&pack_path).map_err(io("reading", &pack_path))?;
        if idx.len() < 8 + 256 * 4 + 40 || &idx[..4] != b"\xfftOc" || idx[4..8] != [0, 0, 0, 2] {
            return Err(corrupt("not a version 2 pack index".into()));
        }
        let count = be32(&idx, 8 + 255 * 4) as usize;
        let need = 8 + 256 * 4 + count * (20 + 4 + 4) + 40;
        if idx.len() < need {
            return Err(corrupt(format!(
                "index of {count} objects is {} bytes",
                idx.len()
            )));
        }
        if data.len() < 32 || &data[..4] != b"PACK" || data[4..8] != [0, 0, 0, 2] {
            return Err(corrupt("its pack is not a version 2 pack".into()));
        }
        let (body, sum) = data.split_at(data.len() - 20);
        if Sha1::digest(body).as_slice() != sum || &idx[idx.len() - 40..idx.len() - 20] != sum {
            return Err(corrupt(
                "pack checksum does not match its content or its index".into(),
            ));
        }
        Ok(Pack {
            name: pack_path,
            idx,
            data,
            count,
        })
    }

    /// The pack offset of `oid`, if this pack holds it.
    fn offset_of(&self, oid: &Oid) -> Option<usize> {
        let fan = |i: usize| be32(&self.idx, 8 + i * 4) as usize;
        let first = oid[0] as usize;
        let (mut lo, mut hi) = (if first == 0 { 0 } else { fan(first - 1) }, fan(first));
        hi = hi.min(self.count);
        let names = 8 + 256 * 4;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let at = names + mid * 20;
            match self.idx[at..at + 20].cmp(&oid[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let offs = names + self.count * 24;
                    let o = be32(&self.idx, offs + mid * 4);
                    if o & 0x8000_0000 == 0 {
                        return Some(o as usize);
                    }
                    let large = offs + self.count * 4 + (o & 0x7fff_ffff) as usize * 8;
                    let b = self.idx.get(large..large + 8)?;
                    return Some(u64::from_be_bytes(b.try_into().ok()?) as usize);
                }
            }
        }
        None
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("checked length"))
}

/// The packs of one repository.
pub struct PackSet {
    dir: PathBuf,
    /// (pack directory mtime, packs) as last scanned.
    cache: Mutex<(Option<SystemTime>, Vec<Arc<Pack>>)>,
}

impl PackSet {
    pub fn new(git: &Path) -> PackSet {
        PackSet {
            dir: git.join("objects/pack"),
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn packs(&self) -> Result<Vec<Arc<Pack>>, GitError> {
        let mtime = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if mtime.is_none() {
            *c = (None, Vec::new());
            return Ok(Vec::new());
        }
        if c.0 != mtime {
            let mut idxs: Vec<PathBuf> = fs::read_dir(&self.dir)
                .map_err(|source| GitError::Io {
                    what: "listing",
                    path: self.dir.clone(),
                    source,
                })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "idx"))
                .filter(|p| p.with_extension("pack").exists())
                .collect();
            idxs.sort();
            let mut packs = Vec::with_capacity(idxs.len());
            for i in idxs {
                packs.push(Arc::new(Pack::load(&i)?));
            }
            *c = (mtime, packs);
        }
        Ok(c.1.clone())
    }

    /// Forgets the scan, so the next look-up lists the pack directory
    /// again (after we wrote a pack: its mtime may not have moved within
    /// the file system's clock tick).
    pub fn rescan(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
    }

    /// Whether a pack holds `oid`.
    pub fn contains(&self, oid: &Oid) -> bool {
        self.packs()
            .map(|ps| ps.iter().any(|p| p.offset_of(oid).is_some()))
            .unwrap_or(false)
    }

    /// The object `oid` (kind, body), or `None` when no pack holds it.
    /// Not verified against its id here: [`super::git::Repo`] does that.
    pub fn read(&self, oid: &Oid) -> Result<Option<(String, Vec<u8>)>, GitError> {
        let packs = self.packs()?;
        for p in &packs {
            if let Some(off) = p.offset_of(oid) {
                return read_at(p, off, &packs, 0).map(Some);
            }
        }
        Ok(None)
    }
}

fn read_at(
    p: &Pack,
    off: usize,
    packs: &[Arc<Pack>],
    depth: usize,
) -> Result<(String, Vec<u8>), GitError> {
    let bad = |why: &str| GitError::Corrupt {
        oid: format!("{} at offset {off}", p.name.display()),
        why: why.to_owned(),
    };
    if depth > MAX_DEPTH {
        return Err(bad("delta chain too deep"));
    }
    let end = p.data.len() - 20;
    let byte_at = |i: usize| -> Result<u8, GitError> {
        if i < end {
            Ok(p.data[i])
        } else {
            Err(bad("entry runs past the pack"))
        }
    };
    let mut pos = off;
    let mut byte = byte_at(pos)?;
    pos += 1;
    let t = (byte >> 4) & 7;
    let mut size = (byte & 0x0f) as u64;
    let mut shift = 4;
    while byte & 0x80 != 0 {
        byte = byte_at(pos)?;
        pos += 1;
        if shift > 56 {
            return Err(bad("size too large"));
        }
        size |= ((byte & 0x7f) as u64) << shift;
        shift += 7;
    }
    if size > MAX_OBJECT {
        return Err(bad(&format!(
            "declared size {size} is more than the {MAX_OBJECT}-byte object limit"
        )));
    }
    let inflate = |at: usize| -> Result<Vec<u8>, GitError> {
        if at >= end {
            return Err(bad("entry runs past the pack"));
        }
        super::git::inflate_exact(&p.data[at..end], size as usize)
            .map(|(body, _)| body)
            .map_err(|w| bad(&w))
    };
    let kind = match t {
        1 => "commit",
        2 => "tree",
        3 => "blob",
        4 => "tag",
        6 => {
            // OFS_DELTA: the base is this many bytes before this entry.
            let mut b = byte_at(pos)?;
            pos += 1;
            let mut back = (b & 0x7f) as usize;
            while b & 0x80 != 0 {
                b = byte_at(pos)?;
                pos += 1;
                back = back
                    .checked_add(1)
                    .and_then(|x| x.checked_mul(128))
                    .ok_or_else(|| bad("base offset overflows"))?
                    | (b & 0x7f) as usize;
            }
            let base_off = off
                .checked_sub(back)
                .filter(|_| back > 0)
                .ok_or_else(|| bad("base offset outside the pack"))?;
            let (kind, base) = read_at(p, base_off, packs, depth + 1)?;
            let delta = inflate(pos)?;
            return Ok((kind, apply_delta(&base, &delta).map_err(|w| bad(&w))?));
        }
        7 => {
            // REF_DELTA: the base is named by id (in this or another pack).
            let id: Oid = p
                .data
                .get(pos..pos + 20)
                .filter(|_| pos + 20 <= end)
                .ok_or_else(|| bad("entry runs past the pack"))?
                .try_into()
                .expect("20 bytes");
            pos += 20;
            let (kind, base) = packs
                .iter()
                .find_map(|q| q.offset_of(&id).map(|o| (q, o)))
                .map(|(q, o)| read_at(q, o, packs, depth + 1))
                .unwrap_or_else(|| Err(GitError::Missing(hex(&id))))?;
            let delta = inflate(pos)?;
            return Ok((kind, apply_delta(&base, &delta).map_err(|w| bad(&w))?));
        }
        _ => return Err(bad("unknown object type")),
    };
    Ok((kind.to_owned(), inflate(pos)?))
}

fn varint(d: &[u8], pos: &mut usize) -> Result<usize, String> {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let b = *d.get(*pos).ok_or("delta header runs out")?;
        *pos += 1;
        if shift > 56 {
            return Err("delta size too large".into());
        }
        v |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// Applies a git delta (copy/insert instructions) to `base`.
pub fn apply_delta(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, String> {
    let mut pos = 0;
    let src = varint(delta, &mut pos)?;
    let dst = varint(delta, &mut pos)?;
    if src != base.len() {
        return Err(format!(
            "delta expects a {src}-byte base, got {}",
            base.len()
        ));
    }
    if dst as u64 > MAX_OBJECT {
        return Err(format!(
            "delta announces {dst} bytes, more than the {MAX_OBJECT}-byte object limit"
        ));
    }
    let mut out = Vec::with_capacity(dst.min(delta.len().saturating_mul(64)).min(1 << 20));
    while pos < delta.len() {
        let cmd = delta[pos];
        pos += 1;
        if cmd & 0x80 != 0 {
            let mut off = 0usize;
            let mut len = 0usize;
            for i in 0..4 {
                if cmd & (1 << i) != 0 {
                    off |= (*delta.get(pos).ok_or("copy runs out")? as usize) << (8 * i);
                    pos += 1;
                }
            }
            for i in 0..3 {
                if cmd & (0x10 << i) != 0 {
                    len |= (*delta.get(pos).ok_or("copy runs out")? as usize) << (8 * i);
                    pos += 1;
                }
            }
            if len == 0 {
                len = 0x10000;
            }
            let piece = off
                .checked_add(len)
                .and_then(|e| base.get(off..e))
                .ok_or("copy outside the base")?;
            out.extend_from_slice(piece);
        } else if cmd != 0 {
            let n = cmd as usize;
            out.extend_from_slice(delta.get(pos..pos + n).ok_or("insert runs out")?);
            pos += n;
        } else {
            return Err("reserved delta instruction 0".into());
        }
        if out.len() > dst {
            return Err("delta output longer than announced".into());
        }
    }
    if out.len() != dst {
        return Err(format!("delta made {} bytes, announced {dst}", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_copy_and_insert() {
        let base = b"hello, world";
        // src 12, dst 11: copy 7 bytes at 0 ("hello, "), insert "there".
        let mut d = vec![12, 12];
        d.extend_from_slice(&[0x80 | 0x10, 7]);
        d.push(5);
        d.extend_from_slice(b"there");
        assert_eq!(apply_delta(base, &d).unwrap(), b"hello, there");
        assert!(apply_delta(b"short", &d).is_err(), "wrong base size");
        let mut far = vec![12, 12, 0x80 | 0x01 | 0x10, 200, 7];
        assert!(apply_delta(base, &far).is_err(), "copy outside the base");
        far = vec![12, 1, 0];
        assert!(apply_delta(base, &far).is_err(), "reserved instruction");
    }

    use flate2::write::ZlibEncoder;
    use std::io::Write;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    use super::super::git::entry_header as header;

    /// git's offset encoding of an `OFS_DELTA` base distance.
    fn ofs(mut back: usize) -> Vec<u8> {
        let mut out = vec![(back & 0x7f) as u8];
        back >>= 7;
        while back > 0 {
            back -= 1;
            out.insert(0, 0x80 | (back & 0x7f) as u8);
            back >>= 7;
        }
        out
    }

    /// Pack bytes and entry offsets for `entries` (each a whole entry:
    /// header, base reference, zlib data).
    fn pack_bytes(entries: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut p = b"PACK\0\0\0\x02".to_vec();
        p.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        let mut offs = Vec::new();
        for e in entries {
            offs.push(p.len());
            p.extend_from_slice(e);
        }
        let sum: [u8; 20] = Sha1::digest(&p).into();
        p.extend_from_slice(&sum);
        (p, offs)
    }

    /// A version 2 index naming `objects` (id, pack offset) for `pack`.
    fn idx_bytes(pack: &[u8], objects: &[(Oid, usize)]) -> Vec<u8> {
        let mut objs = objects.to_vec();
        objs.sort();
        let mut i = b"\xfftOc\0\0\0\x02".to_vec();
        for b in 0..256usize {
            let n = objs.iter().filter(|(id, _)| (id[0] as usize) <= b).count() as u32;
            i.extend_from_slice(&n.to_be_bytes());
        }
        for (id, _) in &objs {
            i.extend_from_slice(id);
        }
        i.extend(std::iter::repeat_n(0u8, 4 * objs.len()));
        for (_, o) in &objs {
            i.extend_from_slice(&(*o as u32).to_be_bytes());
        }
        i.extend_from_slice(&pack[pack.len() - 20..]);
        let sum: [u8; 20] = Sha1::digest(&i).into();
        i.extend_from_slice(&sum);
        i
    }

    fn write(git: &Path, pack: &[u8], idx: &[u8]) -> PackSet {
        let dir = git.join("objects/pack");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("pack-t.pack"), pack).unwrap();
        fs::write(dir.join("pack-t.idx"), idx).unwrap();
        PackSet::new(git)
    }

    /// A blob "a", then `n` deltas, each copying the one before.
    fn chain(n: usize) -> Vec<Vec<u8>> {
        let mut entries = vec![[header(3, 1), zlib(b"a")].concat()];
        let mut at = 12 + entries[0].len();
        let mut prev = 12;
        let delta = [1u8, 1, 0x90, 1];
        for _ in 0..n {
            let e = [header(6, delta.len() as u64), ofs(at - prev), zlib(&delta)].concat();
            prev = at;
            at += e.len();
            entries.push(e);
        }
        entries
    }

    #[test]
    fn delta_chains_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let tip = [0xab; 20];
        for (n, ok) in [(100, true), (MAX_DEPTH + 50, false)] {
            let (pack, offs) = pack_bytes(&chain(n));
            let set = write(dir.path(), &pack, &idx_bytes(&pack, &[(tip, offs[n])]));
            match set.read(&tip) {
                Ok(Some((kind, body))) if ok => {
                    assert_eq!((kind.as_str(), &body[..]), ("blob", &b"a"[..]))
                }
                Err(e) if !ok => assert!(e.to_string().contains("too deep"), "{e}"),
                other => panic!("chain of {n}: {other:?}"),
            }
        }
        // Two REF_DELTAs naming each other.
        let (a, b) = ([0x11; 20], [0x22; 20]);
        let delta = zlib(&[1, 1, 0x90, 1]);
        let ea = [header(7, 4), b.to_vec(), delta.clone()].concat();
        let eb = [header(7, 4), a.to_vec(), delta].concat();
        let (pack, offs) = pack_bytes(&[ea, eb]);
        let set = write(
            dir.path(),
            &pack,
            &idx_bytes(&pack, &[(a, offs[0]), (b, offs[1])]),
        );
        let e = set.read(&a).unwrap_err().to_string();
        assert!(e.contains("too deep"), "{e}");
        // A delta announcing a terabyte, and an object claiming one.
        let mut d = vec![1u8];
        d.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
        d.extend([0x90, 1]);
        let mut entries = chain(0);
        entries.push([header(6, d.len() as u64), ofs(entries[0].len()), zlib(&d)].concat());
        entries.push([header(3, 1 << 40), zlib(b"x")].concat());
        let (pack, offs) = pack_bytes(&entries);
        let set = write(
            dir.path(),
            &pack,
            &idx_bytes(&pack, &[([1; 20], offs[1]), ([2; 20], offs[2])]),
        );
        for id in [[1; 20], [2; 20]] {
            let e = set.read(&id).unwrap_err().to_string();
            assert!(e.contains("object limit"), "{e}");
        }
    }

    /// Mutated packs and indexes (checksums fixed up so they load): every
    /// read is Ok or Err, none panics.
    #[test]
    fn mutated_packs_on_disk_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = chain(3);
        entries.push([header(3, 5), zlib(b"hello")].concat());
        let (pack, offs) = pack_bytes(&entries);
        let ids: Vec<(Oid, usize)> = offs
            .iter()
            .enumerate()
            .map(|(i, o)| ([i as u8 * 40; 20], *o))
            .collect();
        let idx = idx_bytes(&pack, &ids);
        let mut rng = crate::mutate::Rng::new(0x5eed_6a1c);
        for i in 0..600 {
            let (p, x) = if i % 3 == 0 {
                (pack.clone(), rng.mutate(&idx[..idx.len() - 40]))
            } else {
                (
                    rng.mutate(&pack[..pack.len() - 20]),
                    idx[..idx.len() - 40].to_vec(),
                )
            };
            let mut p = p;
            let sum: [u8; 20] = Sha1::digest(&p).into();
            p.extend_from_slice(&sum);
            let mut x = x;
            x.extend_from_slice(&sum);
            x.extend_from_slice(&[0; 20]);
            let set = write(dir.path(), &p, &x);
            for (id, _) in &ids {
                let _ = set.read(id);
                let _ = set.contains(id);
            }
        }
    }
}
