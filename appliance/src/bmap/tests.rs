//! Block map tests: mapping sparse files, the bmaptool file format both
//! ways, maps as bmaptool writes them (all versions), and refusals.

use super::format::Kind;
use super::*;
use std::io::Write;

const MIB: u64 = 1 << 20;

/// A sparse file of `size` bytes with `writes` at their offsets.
fn sparse(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in writes {
        f.write_all_at(data, *off).unwrap();
    }
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// `doc` with its file checksum (`field`, hashed with `kind`) recomputed,
/// as a tool would after editing it.
fn reseal(doc: &str, field: &str, kind: Kind) -> Vec<u8> {
    let open = format!("<{field}>");
    let at = doc.find(&open).unwrap() + open.len();
    let len = doc[at..].find("</").unwrap();
    let value = doc[at..at + len].trim();
    let at = at + doc[at..].find(value).unwrap();
    let mut zeroed = doc.as_bytes().to_vec();
    zeroed[at..at + value.len()].fill(b'0');
    let mut h = kind.hasher();
    h.update(&zeroed);
    let sum = hex::encode(h.finalize());
    let mut out = doc.as_bytes().to_vec();
    out.splice(at..at + value.len(), sum.bytes());
    out
}

/// A map laid out as `bmaptool create` lays it out, for `img`'s bytes:
/// `version` picks the fields (1.0–1.2 none, 1.3 sha1, else
/// `ChecksumType` = `kind`); `ranges` are inclusive block numbers; single
/// blocks are written as one number; `bare` ranges have no checksum (as
/// with `bmaptool create --no-checksum`).
fn bmaptool_map(
    version: &str,
    kind: Option<Kind>,
    bare: bool,
    bs: u64,
    img: &[u8],
    ranges: &[(u64, u64)],
) -> Vec<u8> {
    let size = img.len() as u64;
    let (field, attr) = match version {
        "1.3" => ("BmapFileSHA1", "sha1"),
        "1.0" | "1.1" | "1.2" => ("", ""),
        _ => ("BmapFileChecksum", "chksum"),
    };
    let mapped: u64 = ranges.iter().map(|(a, z)| z - a + 1).sum();
    let mut s = format!(
        "<?xml version=\"1.0\" ?>\n<!-- a map -->\n\n<bmap version=\"{version}\">\n    \
         <!-- Image size in bytes -->\n    <ImageSize> {size} </ImageSize>\n\n    \
         <BlockSize> {bs} </BlockSize>\n    <BlocksCount> {} </BlocksCount>\n    \
         <MappedBlocksCount> {mapped}  </MappedBlocksCount>\n",
        size.div_ceil(bs)
    );
    if let (Some(k), "chksum") = (kind, attr) {
        s += &format!("    <ChecksumType> {} </ChecksumType>\n", k.name());
    }
    if let Some(k) = kind.filter(|_| !field.is_empty()) {
        s += &format!("    <{field}> {} </{field}>\n", "0".repeat(k.hex_len()));
    }
    s += "    <BlockMap>\n";
    for &(a, z) in ranges {
        let bytes = &img[(a * bs) as usize..(((z + 1) * bs) as usize).min(img.len())];
        let cs = match kind.filter(|_| !attr.is_empty() && !bare) {
            Some(k) => {
                let mut h = k.hasher();
                h.update(bytes);
                format!(" {attr}=\"{}\"", hex::encode(h.finalize()))
            }
            None => String::new(),
        };
        if a == z {
            s += &format!("        <Range{cs}> {a} </Range>\n");
        } else {
            s += &format!("        <Range{cs}> {a}-{z} </Range>\n");
        }
    }
    s += "    </BlockMap>\n</bmap>\n";
    match kind.filter(|_| !field.is_empty()) {
        Some(k) => reseal(&s, field, k),
        None => s.into_bytes(),
    }
}

/// Bytes that are not all zeros, different per seed.
fn noise(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn maps_data_cells_trimmed_to_nonzero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(
        dir.path(),
        "a.img",
        64 * MIB,
        &[
            (512, b"mbr"),
            (5 * MIB + 10, b"x"),
            (8 * MIB - 1, b"y"),
            (8 * MIB, b"z"),
        ],
    );
    let b = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
    let spans: Vec<_> = b.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(
        spans,
        vec![(0, 4096), (5 * MIB, 3 * MIB), (8 * MIB, 4096)],
        "{b:?}"
    );
    let whole = std::fs::read(&p).unwrap();
    assert_eq!(b.disk_digest.as_deref(), Some(digest_of(&whole).as_str()));
    for r in &b.ranges {
        assert_eq!(
            r.digest,
            digest_of(&whole[r.offset as usize..r.end() as usize])
        );
    }
    assert_eq!(Bmap::parse(&b.to_bytes()).unwrap(), b);
}

#[test]
fn writes_bmaptool_version_2_with_sha256_and_a_valid_file_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(
        dir.path(),
        "a.img",
        16 * MIB,
        &[(0, b"a"), (5 * MIB, b"b"), (16 * MIB - 1, b"c")],
    );
    let b = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
    let t = text(&b.to_bytes());
    for want in [
        "<bmap version=\"2.0\">",
        "<ImageSize> 16777216 </ImageSize>",
        "<BlockSize> 4096 </BlockSize>",
        "<BlocksCount> 4096 </BlocksCount>",
        "<MappedBlocksCount> 3 </MappedBlocksCount>",
        "<ChecksumType> sha256 </ChecksumType>",
        "> 0 </Range>",
        "> 1280 </Range>",
        "> 4095 </Range>",
    ] {
        assert!(t.contains(want), "{want} in\n{t}");
    }
    // The file checksum is sha256 of the file with its value as zeros.
    assert_eq!(reseal(&t, "BmapFileChecksum", Kind::Sha256), t.as_bytes());
    let m = format::read(t.as_bytes()).unwrap();
    assert_eq!(m.version, (2, 0));
    assert_eq!(m.disk_digest, b.disk_digest);
    assert_eq!(
        m.ranges[1].chksum.as_deref(),
        b.ranges[1].digest.strip_prefix("sha256:")
    );
    // Without a disk digest there is no DiskDigest element.
    let mut anon = b.clone();
    anon.disk_digest = None;
    let t2 = text(&anon.to_bytes());
    assert!(!t2.contains("DiskDigest"), "{t2}");
    assert_eq!(Bmap::parse(t2.as_bytes()).unwrap(), anon);
}

#[test]
fn ranges_off_the_4k_grid_round_trip_with_a_smaller_block_size() {
    let b = Bmap {
        image_size: 10_000,
        disk_digest: None,
        ranges: vec![
            Range {
                offset: 512,
                length: 1024,
                digest: digest_of(b"1"),
            },
            Range {
                offset: 8192,
                length: 1808,
                digest: digest_of(b"2"),
            },
        ],
    };
    let t = text(&b.to_bytes());
    assert!(t.contains("<BlockSize> 512 </BlockSize>"), "{t}");
    assert!(t.contains("> 1-2 </Range>"), "{t}");
    assert!(t.contains("> 16-19 </Range>"), "{t}");
    assert_eq!(Bmap::parse(t.as_bytes()).unwrap(), b);
}

#[test]
fn a_known_digest_gives_the_same_map_without_rehashing() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(
        dir.path(),
        "k.img",
        16 * MIB,
        &[(4096, b"a"), (9 * MIB, b"b")],
    );
    let full = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
    let known =
        Bmap::from_file_with_digest(&p, DEFAULT_CHUNK, full.disk_digest.as_deref().unwrap())
            .unwrap();
    assert_eq!(known, full);
    assert!(Bmap::from_file_with_digest(&p, DEFAULT_CHUNK, "md5:00").is_err());
}

#[test]
fn same_content_same_bytes_however_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let a = sparse(dir.path(), "a.img", 16 * MIB, &[(MIB, b"data")]);
    // The same content, fully allocated.
    let full = dir.path().join("b.img");
    let mut f = File::create(&full).unwrap();
    f.write_all(&std::fs::read(&a).unwrap()).unwrap();
    drop(f);
    let ba = Bmap::from_file(&a, DEFAULT_CHUNK).unwrap();
    let bb = Bmap::from_file(&full, DEFAULT_CHUNK).unwrap();
    assert_eq!(ba.to_bytes(), bb.to_bytes());
    assert_eq!(ba.ranges.len(), 1);
    // An odd-sized tail still maps, and round-trips through the file.
    let t = sparse(
        dir.path(),
        "t.img",
        3 * BLOCK + 100,
        &[(3 * BLOCK + 99, b"e")],
    );
    let bt = Bmap::from_file(&t, BLOCK).unwrap();
    assert_eq!(bt.ranges.len(), 1);
    assert_eq!((bt.ranges[0].offset, bt.ranges[0].length), (3 * BLOCK, 100));
    let tt = text(&bt.to_bytes());
    assert!(tt.contains("<BlocksCount> 4 </BlocksCount>"), "{tt}");
    assert!(tt.contains("> 3 </Range>"), "{tt}");
    assert_eq!(Bmap::parse(tt.as_bytes()).unwrap(), bt);
    assert_eq!(Bmap::parse_for_image(tt.as_bytes(), &t).unwrap(), bt);
    assert!(Bmap::from_file(&t, 1000).is_err());
    assert!(Bmap::from_file(&t, MAX_RANGE + BLOCK).is_err());
}

#[test]
fn reads_maps_as_bmaptool_writes_them_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = vec![0u8; 40 * 4096 + 1000];
    img[..4096].copy_from_slice(&noise(4096, 1));
    img[8 * 4096..20 * 4096].copy_from_slice(&noise(12 * 4096, 2));
    let tail = img.len() - 1000;
    img[tail..].copy_from_slice(&noise(1000, 3));
    let p = dir.path().join("img");
    std::fs::write(&p, &img).unwrap();
    let ranges = [(0, 0), (8, 19), (40, 40)];
    let want: Vec<(u64, u64)> = vec![(0, 4096), (8 * 4096, 12 * 4096), (40 * 4096, 1000)];
    let check = |b: &Bmap| {
        let mut pos = 0;
        for r in &b.ranges {
            assert!(r.offset >= pos);
            assert_eq!(
                r.digest,
                digest_of(&img[r.offset as usize..r.end() as usize])
            );
            pos = r.end();
        }
        let covered: u64 = b.mapped_bytes();
        assert_eq!(covered, 4096 + 12 * 4096 + 1000);
    };
    // 2.0 with sha256: taken as it is, with or without the image.
    let m = bmaptool_map("2.0", Some(Kind::Sha256), false, 4096, &img, &ranges);
    let b = Bmap::parse(&m).unwrap();
    let spans: Vec<_> = b.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(spans, want);
    assert_eq!(b.disk_digest, None);
    check(&b);
    assert_eq!(Bmap::parse_for_image(&m, &p).unwrap(), b);
    // 1.4 (a misnumbered 2.0), 2.x, and other hashes.
    for (v, k) in [
        ("1.4", Kind::Sha256),
        ("2.1", Kind::Sha256),
        ("2.0", Kind::Sha512),
        ("2.0", Kind::Sha1),
        ("1.3", Kind::Sha1),
    ] {
        let m = bmaptool_map(v, Some(k), false, 4096, &img, &ranges);
        let b = Bmap::parse_for_image(&m, &p).unwrap_or_else(|e| panic!("{v} {k:?}: {e:#}"));
        check(&b);
        if k != Kind::Sha256 {
            let e = format!("{:#}", Bmap::parse(&m).unwrap_err());
            assert!(
                e.contains(&format!("{} checksum, not sha256", k.name())),
                "{e}"
            );
            assert!(e.contains("only usable with its image"), "{e}");
        }
    }
    // No checksums: 1.0-1.2, or `bmaptool create --no-checksum`.
    for m in [
        bmaptool_map("1.2", None, false, 4096, &img, &ranges),
        bmaptool_map("2.0", Some(Kind::Sha256), true, 4096, &img, &ranges),
    ] {
        check(&Bmap::parse_for_image(&m, &p).unwrap());
        let e = format!("{:#}", Bmap::parse(&m).unwrap_err());
        assert!(e.contains("has no checksum"), "{e}");
    }
    // Another block size.
    let m = bmaptool_map(
        "2.0",
        Some(Kind::Sha256),
        false,
        1024,
        &img,
        &[(0, 3), (32, 79), (160, 160)],
    );
    let b = Bmap::parse_for_image(&m, &p).unwrap();
    assert_eq!(
        b.ranges
            .iter()
            .map(|r| (r.offset, r.length))
            .collect::<Vec<_>>(),
        want
    );
    // The image must be the map's size.
    let short = dir.path().join("short");
    std::fs::write(&short, &img[..4096]).unwrap();
    let e = format!("{:#}", Bmap::parse_for_image(&m, &short).unwrap_err());
    assert!(e.contains("but") && e.contains("4096 bytes"), "{e}");
}

#[test]
fn long_ranges_are_checked_against_the_image_and_cut_into_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = vec![0u8; 64 * 4096];
    img[4096..50 * 4096].copy_from_slice(&noise(49 * 4096, 7));
    let p = dir.path().join("img");
    std::fs::write(&p, &img).unwrap();
    let doc = bmaptool_map("2.0", Some(Kind::Sha256), false, 4096, &img, &[(1, 49)]);
    let m = format::read(&doc).unwrap();
    let f = File::open(&p).unwrap();
    // A writer taking at most 16 blocks, chunks of 16 blocks.
    let (max, chunk) = (16 * 4096, 16 * 4096);
    let e = format!("{:#}", Bmap::from_map(&m, None, max, chunk).unwrap_err());
    assert!(e.contains("longer than"), "{e}");
    let b = Bmap::from_map(&m, Some((&f, &p)), max, chunk).unwrap();
    let spans: Vec<_> = b
        .ranges
        .iter()
        .map(|r| (r.offset / 4096, r.length / 4096))
        .collect();
    assert_eq!(spans, vec![(1, 15), (16, 16), (32, 16), (48, 2)]);
    for r in &b.ranges {
        assert_eq!(
            r.digest,
            digest_of(&img[r.offset as usize..r.end() as usize])
        );
    }
    // The image changed since the map was made: refused, naming the range.
    let mut other = img.clone();
    other[30 * 4096] ^= 0xff;
    let q = dir.path().join("other");
    std::fs::write(&q, &other).unwrap();
    let g = File::open(&q).unwrap();
    let e = format!(
        "{:#}",
        Bmap::from_map(&m, Some((&g, &q)), max, chunk).unwrap_err()
    );
    assert!(
        e.contains("range 0 (blocks 1-49") && e.contains("does not match"),
        "{e}"
    );
    // A short range with a wrong checksum is left to the writer, which
    // checks each range before writing it.
    let small = bmaptool_map("2.0", Some(Kind::Sha256), false, 4096, &img, &[(1, 2)]);
    let b = Bmap::parse_for_image(&small, &q).unwrap();
    assert_eq!(b.ranges[0].digest, digest_of(&img[4096..3 * 4096]));
}

#[test]
fn bad_maps_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(dir.path(), "a.img", 16 * MIB, &[(0, b"x"), (5 * MIB, b"y")]);
    let good = Bmap::from_file(&p, DEFAULT_CHUNK).unwrap();
    let good_text = text(&good.to_bytes());
    // Maps this appliance would write from a broken `Bmap`.
    type Mutation = Box<dyn Fn(&mut Bmap)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|b| b.ranges[1].offset = 0),
            "overlaps or comes before",
        ),
        (
            Box::new(|b| b.ranges[1].length = 16 * MIB),
            "beyond the image",
        ),
        (
            Box::new(|b| b.ranges[0].digest = "md5:x".into()),
            "not a sha256 checksum",
        ),
        (
            Box::new(|b| b.disk_digest = Some("sha256:00".into())),
            "DiskDigest",
        ),
    ];
    for (mutate, want) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let e = format!("{:#}", Bmap::parse(&b.to_bytes()).unwrap_err());
        assert!(e.contains(want), "{want}: {e}");
    }
    let mut long = good.clone();
    long.image_size = 128 * MIB;
    long.ranges[1].length = MAX_RANGE + BLOCK;
    let e = format!("{:#}", Bmap::parse(&long.to_bytes()).unwrap_err());
    assert!(e.contains("longer than the 64 MiB"), "{e}");
    assert!(long.check().is_err());

    // Edited files, resealed so that only the named rule fails.
    let edits: &[(&str, &str, &str)] = &[
        ("<BlockSize> 4096 ", "<BlockSize> 0 ", "<BlockSize> is 0"),
        (
            "<BlockSize> 4096 ",
            "<BlockSize> 512 ",
            "<BlocksCount> is 4096",
        ),
        ("<ImageSize> 16777216 ", "<ImageSize> 0 ", "empty image"),
        (
            "<ImageSize> 16777216 ",
            "<ImageSize> 16M ",
            "not a whole number",
        ),
        (
            "version=\"2.0\"",
            "version=\"3.0\"",
            "version 3.0 is not supported",
        ),
        ("version=\"2.0\"", "version=\"2\"", "not MAJOR.MINOR"),
        ("version=\"2.0\"", "version=\"1.7\"", "not supported"),
        ("> sha256 </ChecksumType>", "> md5 </ChecksumType>", "md5"),
        (
            "> 0 </Range>",
            "> 4096 </Range>",
            "beyond the image's 4096 blocks",
        ),
        (
            "> 0 </Range>",
            "> 1280 </Range>",
            "overlaps or comes before",
        ),
        ("> 0 </Range>", "> 3-1 </Range>", "first block comes after"),
        ("> 0 </Range>", "> zero </Range>", "not FIRST-LAST"),
        ("> 0 </Range>", "> 0-1 </Range>", "ranges hold 3 blocks"),
        (
            "<MappedBlocksCount> 2",
            "<MappedBlocksCount> 9",
            "<MappedBlocksCount> is 9",
        ),
        ("<BlockMap>", "<BlockMap><ImageSize> 1 </ImageSize>", ""),
        (
            "<BlockSize>",
            "<ImageSize> 1 </ImageSize><BlockSize>",
            "more than once",
        ),
        (
            "<BlocksCount>",
            "<NotBlocksCount>",
            "<BlocksCount> is missing",
        ),
        ("<bmap ", "<notbmap ", "root element is <notbmap>"),
        ("chksum=\"", "chksum=\"X", "lowercase hex"),
        ("<?xml version=\"1.0\" ?>", "<!DOCTYPE bmap>", "DOCTYPE"),
    ];
    for (from, to, want) in edits {
        assert!(good_text.contains(from), "{from}");
        let mut t = good_text.replacen(from, to, 1);
        if *from == "<bmap " {
            t = t.replace("</bmap>", "</notbmap>");
        }
        if *from == "<BlocksCount>" {
            t = t.replace("</BlocksCount>", "</NotBlocksCount>");
        }
        let doc = reseal(&t, "BmapFileChecksum", Kind::Sha256);
        let r = Bmap::parse(&doc);
        if want.is_empty() {
            // Unknown or misplaced elements are ignored, as bmaptool does.
            r.unwrap();
            continue;
        }
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains(want), "{from} -> {to}: want {want:?}: {e}");
    }
    // Edited without resealing.
    let t = good_text.replacen("> 0 </Range>", "> 1 </Range>", 1);
    let e = format!("{:#}", Bmap::parse(t.as_bytes()).unwrap_err());
    assert!(e.contains("damaged or was edited"), "{e}");
    // The old JSON format.
    let e = format!(
        "{:#}",
        Bmap::parse(b"{\"schema\":\"appliance.bmap.v1\"}").unwrap_err()
    );
    assert!(e.contains("appliance bmap IMAGE -o IMAGE.bmap"), "{e}");
    // Any prefix of a good map, and bytes flipped anywhere, give an error
    // or a valid map, never a panic.
    let bytes = good.to_bytes();
    for n in 0..bytes.len() {
        let _ = Bmap::parse(&bytes[..n]);
        let mut f = bytes.clone();
        f[n] ^= 0x5a;
        let _ = Bmap::parse(&f);
    }
}

#[test]
fn sidecar_wins_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(dir.path(), "a.img", 8 * MIB, &[(0, b"x"), (5 * MIB, b"y")]);
    let computed = Bmap::for_image(&p).unwrap();
    let mut other = computed.clone();
    other.disk_digest = None;
    std::fs::write(sidecar_path(&p), other.to_bytes()).unwrap();
    assert_eq!(Bmap::for_image(&p).unwrap(), other);
    let mut bigger = other.clone();
    bigger.image_size = 1 << 30;
    std::fs::write(sidecar_path(&p), bigger.to_bytes()).unwrap();
    let e = format!("{:#}", Bmap::for_image(&p).unwrap_err());
    assert!(
        e.contains("a.img.bmap") && e.contains("1073741824-byte image"),
        "{e}"
    );
}

#[test]
fn a_map_with_many_ranges_reads_in_linear_time() {
    // 200,000 ranges (a 20 MiB file): quadratic work would not finish.
    let ranges = (0..200_000u64)
        .map(|i| Range {
            offset: i * 2 * BLOCK,
            length: BLOCK,
            digest: digest_of(&i.to_le_bytes()),
        })
        .collect();
    let b = Bmap {
        image_size: 400_000 * BLOCK,
        disk_digest: Some(digest_of(b"disk")),
        ranges,
    };
    let bytes = b.to_bytes();
    assert!(bytes.len() > 20 << 20, "{}", bytes.len());
    let started = std::time::Instant::now();
    assert_eq!(Bmap::parse(&bytes).unwrap(), b);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
