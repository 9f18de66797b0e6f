//! Capture and deploy against filesystems made by the real tools
//! (`mkfs.ext4 -d`, `mkfs.fat` + `mcopy`) and by our builder, checked by
//! the real tools (`e2fsck -fn`, `debugfs`, `fsck.fat -n`, `mtype`,
//! `sgdisk -v`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::manifest::Fs;
use super::store::DirStore;
use super::*;

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

/// Deterministic bytes.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sparse(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// A tree of files on the host, for `mkfs.ext4 -d` and `mcopy`.
fn host_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("d{}/file{i}", i % 4),
                bytes(i as u64 + 7, (i * 37_000 + 100) % 900_000),
            )
        })
        .chain([("etc/hostname".into(), b"source\n".to_vec())])
        .collect();
    for (p, b) in &files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b).unwrap();
    }
    files
}

fn debugfs_cat(img: &Path, file: &str) -> Vec<u8> {
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}")])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success());
    o.stdout
}

/// Copies `len` bytes at `off` of `src` into a new file (a partition).
fn extract(src: &Path, off: u64, len: u64, dst: &Path) {
    let s = File::open(src).unwrap();
    let d = File::create(dst).unwrap();
    d.set_len(len).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        s.pread(&mut buf[..n], off + pos).unwrap();
        if buf[..n].iter().any(|b| *b != 0) {
            d.write_all_at(&buf[..n], pos).unwrap();
        }
        pos += n as u64;
    }
}

fn capture_file(img: &Path, store: &DirStore) -> (Manifest, CaptureReport) {
    capture_path(img, store, &CaptureOptions::default(), &mut |_, _| {}).unwrap()
}

fn deploy_file(m: &Manifest, store: &DirStore, target: &Path) -> crate::writer::WriteReport {
    let mut f = deploy::StoreFetch(store);
    deploy::deploy(m, &mut f, target, &mut |_| {}).unwrap()
}

#[test]
fn mkfs_ext4_used_map_matches_the_superblock_and_restores_clean() {
    let d = tempfile::tempdir().unwrap();
    let files = host_tree(&d.path().join("tree"));
    let img = d.path().join("ext4.img");
    sparse(&img, 128 * MIB);
    let tree = d.path().join("tree");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let f = File::open(&img).unwrap();
    let (info, used) = ext4map::used(&f).unwrap();
    // The bitmaps agree with the superblock's free count (mkfs keeps it exact).
    assert_eq!(
        used.total(),
        (info.blocks - info.free_blocks) * info.block_size
    );

    let store = DirStore::new(&d.path().join("data"));
    let (m, rep) = capture_file(&img, &store);
    assert_eq!(m.table, ptable::TableKind::None);
    assert_eq!(m.partitions[0].fs, Fs::Ext4);
    assert!(
        rep.bytes_read as f64 <= 1.05 * rep.used_bytes as f64,
        "{rep:?}"
    );
    assert!(rep.bytes_read < 128 * MIB / 2, "{rep:?}");

    // Only the captured ranges onto zeros: a clean filesystem, same files.
    let out = d.path().join("restored.img");
    sparse(&out, 128 * MIB);
    deploy_file(&m, &store, &out);
    run("e2fsck", &["-fn", out.to_str().unwrap()]);
    for (p, b) in &files {
        assert_eq!(&debugfs_cat(&out, p), b, "{p}");
    }
    // Reproducible: the same disk gives the same manifest bytes.
    let (again, rep2) = capture_file(&img, &store);
    assert_eq!(again.to_bytes(), m.to_bytes());
    assert_eq!(rep2.new_chunks, 0);
}

/// A GPT disk the way the builder makes one: an ESP (our FAT writer), an
/// ext4 root (our ext4 writer) with known files, and a swap partition.
fn builder_disk(path: &Path, files: &[(String, Vec<u8>)]) -> builder::gpt::Layout {
    use builder::gpt::{self, Guid, PartitionSpec, SizeSpec};
    use builder::tree::{Content, Entry, Meta, Node, Tree};
    let size = 160 * MIB;
    let spec = |label: &str, ty: Guid, size: SizeSpec| PartitionSpec {
        label: label.into(),
        type_guid: ty,
        guid: Guid::derive(&[b"clone-test", label.as_bytes()]),
        size,
        attributes: 0,
    };
    let layout = gpt::plan(
        size,
        Guid::derive(&[b"clone-test-disk"]),
        vec![
            spec("esp", gpt::types::ESP, SizeSpec::Bytes(40 * MIB)),
            spec("swap", gpt::types::LINUX_SWAP, SizeSpec::Bytes(8 * MIB)),
            spec("root", gpt::types::LINUX_ROOT_X86_64, SizeSpec::Fill),
        ],
    )
    .unwrap();
    let mut disk = File::create(path).unwrap();
    disk.set_len(size).unwrap();
    gpt::write(&layout, &mut disk).unwrap();
    let dir = |t: &mut Tree, p: &str| {
        let _ = t.insert(
            p,
            Entry {
                meta: Meta::new(0o755, 0),
                node: Node::Dir,
            },
            Meta::new(0o755, 0),
        );
    };
    let mut esp = Tree::new();
    dir(&mut esp, "EFI");
    dir(&mut esp, "EFI/BOOT");
    esp.insert(
        "EFI/BOOT/BOOTX64.EFI",
        Entry {
            meta: Meta::new(0o644, 0),
            node: Node::File(Content::bytes(bytes(99, 300_000))),
        },
        Meta::new(0o755, 0),
    )
    .unwrap();
    let p = &layout.partitions[0];
    let mut w = builder::sink::Window::new(&mut disk, p.offset(), p.len());
    builder::fat::write_fat(&esp, &builder::fat::FatOptions::new(p.len()), &mut w).unwrap();

    let mut root = Tree::new();
    for (path, b) in files {
        root.insert(
            path,
            Entry {
                meta: Meta::new(0o644, 0),
                node: Node::File(Content::bytes(b.clone())),
            },
            Meta::new(0o755, 0),
        )
        .unwrap();
    }
    let p = &layout.partitions[2];
    let mut w = builder::sink::Window::new(&mut disk, p.offset(), p.len());
    builder::ext4::write_ext4(
        &root,
        &builder::ext4::Ext4Options::new(p.len(), [7; 16], 0),
        &mut w,
    )
    .unwrap();

    let p = &layout.partitions[1];
    let mut hdr = vec![0u8; 4096];
    hdr[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    hdr[1028..1032].copy_from_slice(&((p.len() / 4096 - 1) as u32).to_le_bytes());
    hdr[1036..1052].copy_from_slice(&[0x42; 16]);
    hdr[4086..].copy_from_slice(b"SWAPSPACE2");
    disk.write_all_at(&hdr, p.offset()).unwrap();
    // Something the capture must not copy.
    disk.write_all_at(&[0xAB; 8192], p.offset() + 2 * MIB)
        .unwrap();
    layout
}

fn root_files() -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| {
            (
                format!("srv/data/f{i:02}"),
                bytes(1000 + i, 200_000 + i as usize * 9_000),
            )
        })
        .collect();
    f.push(("etc/hostname".into(), b"source\n".to_vec()));
    f
}

#[test]
fn builder_disk_captures_by_partition_and_deploys_onto_a_bigger_disk() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let files = root_files();
    let layout = builder_disk(&img, &files);
    let store = DirStore::new(&d.path().join("data"));
    let (m, rep) = capture_file(&img, &store);
    assert_eq!(m.table, ptable::TableKind::Gpt);
    let fs: Vec<Fs> = m.partitions.iter().map(|p| p.fs).collect();
    assert!(matches!(fs[0], Fs::Fat16 | Fs::Fat32), "{fs:?}");
    assert_eq!(&fs[1..], &[Fs::Swap, Fs::Ext4]);
    assert_eq!(
        m.partitions[1].used_bytes, 4096,
        "swap: only the header page"
    );
    let swap = &layout.partitions[1];
    assert!(
        !m.chunks
            .iter()
            .any(|c| c.end() > swap.offset() + 4096 && c.offset < swap.offset() + swap.len()),
        "swap contents were copied"
    );
    assert!(
        rep.bytes_read as f64 <= 1.05 * rep.used_bytes as f64 + 4.0 * MIB as f64,
        "{rep:?}"
    );

    // A bigger disk: the GPT grows with the last partition; the ext4 is
    // clean, grows with resize2fs, and holds the same files.
    let big = d.path().join("big.img");
    sparse(&big, 256 * MIB);
    let w = deploy_file(&m, &store, &big);
    assert!(w.grown);
    run("sgdisk", &["-v", big.to_str().unwrap()]);
    let grown = builder::gpt::read(&mut File::open(&big).unwrap()).unwrap();
    let root = &grown.partitions[2];
    assert!(root.len() > layout.partitions[2].len());
    let (off, new) = deploy::ext4_to_grow(&m, 256 * MIB, true).unwrap();
    assert_eq!((off, new), (root.offset(), root.len()));
    let part = d.path().join("root.img");
    extract(&big, root.offset(), root.len(), &part);
    run("e2fsck", &["-fn", part.to_str().unwrap()]);
    run("resize2fs", &[part.to_str().unwrap()]);
    run("e2fsck", &["-fn", part.to_str().unwrap()]);
    for (p, b) in &files {
        assert_eq!(&debugfs_cat(&part, p), b, "{p}");
    }
    let esp = &grown.partitions[0];
    let espimg = d.path().join("esp.img");
    extract(&big, esp.offset(), esp.len(), &espimg);
    run("fsck.fat", &["-n", espimg.to_str().unwrap()]);
    let o = Command::new("mtype")
        .args(["-i", espimg.to_str().unwrap(), "::EFI/BOOT/BOOTX64.EFI"])
        .output()
        .unwrap();
    assert_eq!(o.stdout, bytes(99, 300_000));
    // The swap header went across; the contents did not.
    let mut hdr = vec![0u8; 4096];
    File::open(&big)
        .unwrap()
        .pread(&mut hdr, swap.offset())
        .unwrap();
    assert_eq!(&hdr[4086..], b"SWAPSPACE2");
}

#[test]
fn fat_from_mkfs_fat_and_mcopy_restores_clean() {
    let d = tempfile::tempdir().unwrap();
    for (bits, size) in [("12", 4 * MIB), ("16", 64 * MIB), ("32", 80 * MIB)] {
        let img = d.path().join(format!("fat{bits}.img"));
        let _ = std::fs::remove_file(&img);
        run(
            "mkfs.fat",
            &[
                "-C",
                "-F",
                bits,
                img.to_str().unwrap(),
                &(size / 1024).to_string(),
            ],
        );
        let files: Vec<(String, Vec<u8>)> = (0..6)
            .map(|i| {
                (
                    format!("F{i}.BIN"),
                    bytes(i + 50, 100_000 * i as usize + 1000),
                )
            })
            .collect();
        for (n, b) in &files {
            let src = d.path().join(n);
            std::fs::write(&src, b).unwrap();
            run(
                "mcopy",
                &[
                    "-i",
                    img.to_str().unwrap(),
                    src.to_str().unwrap(),
                    &format!("::{n}"),
                ],
            );
        }
        run("mdel", &["-i", img.to_str().unwrap(), "::F2.BIN"]);
        let store = DirStore::new(&d.path().join(format!("data{bits}")));
        let (m, rep) = capture_file(&img, &store);
        assert_eq!(
            m.partitions[0].fs,
            match bits {
                "12" => Fs::Fat12,
                "16" => Fs::Fat16,
                _ => Fs::Fat32,
            }
        );
        let live: usize = files
            .iter()
            .filter(|(n, _)| n != "F2.BIN")
            .map(|(_, b)| b.len())
            .sum();
        assert!(rep.used_bytes < live as u64 + 2 * MIB, "FAT{bits}: {rep:?}");
        let out = d.path().join(format!("out{bits}.img"));
        // Old data on the target must not matter.
        std::fs::write(&out, bytes(5, size as usize)).unwrap();
        deploy_file(&m, &store, &out);
        run("fsck.fat", &["-n", out.to_str().unwrap()]);
        for (n, b) in files.iter().filter(|(n, _)| n != "F2.BIN") {
            let o = Command::new("mtype")
                .args(["-i", out.to_str().unwrap(), &format!("::{n}")])
                .output()
                .unwrap();
            assert_eq!(&o.stdout, b, "FAT{bits} {n}");
        }
    }
}

#[test]
fn a_one_file_change_stores_few_new_chunks() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    builder_disk(&img, &root_files());
    let store = DirStore::new(&d.path().join("data"));
    let (_, first) = capture_file(&img, &store);
    // Change one file in the root filesystem with debugfs.
    let layout = builder::gpt::read(&mut File::open(&img).unwrap()).unwrap();
    let root = &layout.partitions[2];
    let part = d.path().join("root.img");
    extract(&img, root.offset(), root.len(), &part);
    let newfile = d.path().join("new");
    std::fs::write(&newfile, bytes(4242, 150_000)).unwrap();
    run(
        "debugfs",
        &["-w", "-R", "rm /srv/data/f05", part.to_str().unwrap()],
    );
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} /srv/data/f05", newfile.display()),
            part.to_str().unwrap(),
        ],
    );
    let p = std::fs::read(&part).unwrap();
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&p, root.offset())
        .unwrap();
    let (m2, second) = capture_file(&img, &store);
    assert!(second.new_chunks <= 8, "{second:?}");
    // A small disk: the changed data and its metadata are a good part of
    // it (the benchmark measures a realistic one).
    assert!(
        second.new_stored_bytes * 3 < first.new_stored_bytes,
        "{first:?} {second:?}"
    );
    let out = d.path().join("out.img");
    sparse(&out, 160 * MIB);
    deploy_file(&m2, &store, &out);
    let rp = d.path().join("root2.img");
    extract(&out, root.offset(), root.len(), &rp);
    run("e2fsck", &["-fn", rp.to_str().unwrap()]);
    assert_eq!(debugfs_cat(&rp, "srv/data/f05"), bytes(4242, 150_000));
}

#[test]
fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    builder_disk(&img, &root_files());
    let store = DirStore::new(&d.path().join("data"));
    let (m, _) = capture_file(&img, &store);

    // A smaller disk: refused, untouched.
    let small = d.path().join("small.img");
    std::fs::write(&small, vec![0x5a; (100 * MIB) as usize]).unwrap();
    let mut f = deploy::StoreFetch(&store);
    let e = deploy::deploy(&m, &mut f, &small, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("too small"), "{e:#}");
    assert!(std::fs::read(&small).unwrap().iter().all(|b| *b == 0x5a));

    // A damaged chunk: the deploy stops, and the target's first MiB is
    // zeros (it never boots half-written).
    let victim = &m.chunks[m.chunks.len() / 2];
    let path = store.blob_path(&victim.blob).unwrap();
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let out = d.path().join("out.img");
    std::fs::write(&out, vec![0x77; (160 * MIB) as usize]).unwrap();
    let mut f = deploy::StoreFetch(&store);
    let e = deploy::deploy(&m, &mut f, &out, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("damaged"), "{e:#}");
    let mut head = vec![1u8; MIB as usize];
    File::open(&out).unwrap().pread(&mut head, 0).unwrap();
    assert!(head.iter().all(|b| *b == 0));
    std::fs::write(&path, &good).unwrap();
    // Running it again completes it.
    deploy_file(&m, &store, &out);
    run("sgdisk", &["-v", out.to_str().unwrap()]);

    // A corrupt manifest is refused with the rule it breaks.
    let mut bad = m.to_bytes();
    let n = bad.len();
    bad.truncate(n / 2);
    assert!(Manifest::parse(&bad).is_err());
}

#[test]
fn raw_regions_keep_only_non_zero_blocks() {
    assert_eq!(nonzero_runs(&[0u8; 8192], 0), vec![]);
    let mut b = vec![0u8; 16384];
    b[5000] = 1;
    b[16383] = 1;
    assert_eq!(nonzero_runs(&b, 0), vec![(4096, 4096), (12288, 4096)]);
    // Off the 4 KiB grid: runs follow the disk's grid, not the buffer's.
    assert_eq!(
        nonzero_runs(&b[100..], 100),
        vec![(3996, 4096), (12188, 4096)]
    );
    let mut e = Extents::default();
    e.add(10, 5);
    e.add(0, 3);
    e.add(3, 2);
    e.add(12, 10);
    assert_eq!(e.iter(), vec![(0, 5), (10, 12)]);
}
