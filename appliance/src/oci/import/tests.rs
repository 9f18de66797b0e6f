use super::*;
use crate::oci::fixtures::*;

fn data() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Every file in the blob store's directory (temporary files included).
fn store_files(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("blobs/sha256"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A tar entry written byte by byte, so names the tar crate's builder
/// refuses (`..`, absolute) can be made.
fn raw_tar(entries: &[(&str, &[u8], tar::EntryType, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data, kind, link) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            h.as_ustar_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(*kind);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn an_oci_layout_tar_imports_every_blob_verified() {
    let d = data();
    let img = oci_image("hi", "v1");
    let input = write(d.path(), "in.tar", &tar_files(&img.files));
    let got = import_path(d.path(), &input, "demo/hello", "v1").unwrap();
    assert_eq!(got.format, Format::OciLayout);
    assert_eq!(got.digest, Digest::of(&img.manifest));
    assert_eq!(got.media_type, crate::oci::OCI_MANIFEST);
    assert_eq!(got.arch, "amd64");
    assert_eq!((got.blobs, got.blobs_added), (3, 3));
    let mut want: Vec<String> = [&img.manifest, &img.config, &img.layer_gz]
        .iter()
        .map(|b| Digest::of(b).hex())
        .collect();
    want.sort();
    assert_eq!(store_files(d.path()), want, "the blobs and nothing else");
    // A second import adds nothing.
    let again = import_path(d.path(), &input, "demo/hello", "v1").unwrap();
    assert_eq!((again.digest, again.blobs_added), (got.digest, 0));
    assert_eq!(store_files(d.path()), want);
}

#[test]
fn a_layout_directory_and_a_gzipped_tar_give_the_same_image() {
    let d = data();
    let img = oci_image("hi", "v1");
    let dir = d.path().join("layout");
    for (p, b) in &img.files {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b).unwrap();
    }
    let from_dir = import_path(d.path(), &dir, "hello", "v1").unwrap();
    let gz = write(d.path(), "in.tar.gz", &gzip(&tar_files(&img.files)));
    let from_gz = import_path(d.path(), &gz, "hello", "v1").unwrap();
    assert_eq!(from_dir.digest, Digest::of(&img.manifest));
    assert_eq!(from_gz.digest, from_dir.digest);
}

#[test]
fn a_docker_archive_becomes_an_oci_manifest_the_same_bytes_every_time() {
    let d = data();
    let (files, config) = docker_archive("hi there", "hello:v2");
    let input = write(d.path(), "docker.tar", &tar_files(&files));
    let got = import_path(d.path(), &input, "hello", "v2").unwrap();
    assert_eq!(got.format, Format::DockerArchive);
    assert_eq!(got.arch, "amd64");
    let blobs = Blobs::new(d.path());
    let m = blobs.read_small(&got.digest, MAX_MANIFEST).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(v["mediaType"], crate::oci::OCI_MANIFEST);
    assert_eq!(v["config"]["digest"], sha(&config));
    assert_eq!(
        v["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layer = &files[2].1;
    assert_eq!(v["layers"][0]["digest"], sha(layer));
    assert_eq!(
        v["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert!(blobs.has(&Digest::of(layer)));
    // Reproducible: another store, the same manifest digest.
    let d2 = data();
    let input2 = write(d2.path(), "docker.tar", &tar_files(&files));
    let again = import_path(d2.path(), &input2, "hello", "v2").unwrap();
    assert_eq!(again.digest, got.digest);
}

#[test]
fn a_docker_archive_with_gzipped_layers_is_checked_against_the_uncompressed_diff_ids() {
    let d = data();
    let (mut files, _) = docker_archive("zipped", "hello:v2");
    files[2].1 = gzip(&files[2].1);
    let input = write(d.path(), "docker.tar", &tar_files(&files));
    let got = import_path(d.path(), &input, "hello", "v2").unwrap();
    let m = Blobs::new(d.path())
        .read_small(&got.digest, MAX_MANIFEST)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(
        v["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}

/// Runs an import that must fail; checks the message and that the store
/// holds exactly what it held before (no blob, no temporary file).
fn refused(d: &Path, input: &Path, needle: &str) {
    let before = store_files(d);
    let e = format!(
        "{:#}",
        import_path(d, input, "hello", "v1").expect_err("must be refused")
    );
    assert!(e.contains(needle), "{e:?} should say {needle:?}");
    assert_eq!(store_files(d), before, "a failed import leaves nothing");
}

#[test]
fn dot_dot_and_absolute_paths_in_a_tar_are_refused() {
    let d = data();
    let evil = raw_tar(&[("../escape", b"x", tar::EntryType::Regular, "")]);
    refused(
        d.path(),
        &write(d.path(), "a.tar", &evil),
        "'..' is not allowed",
    );
    let evil = raw_tar(&[("blobs/../../x", b"x", tar::EntryType::Regular, "")]);
    refused(
        d.path(),
        &write(d.path(), "b.tar", &evil),
        "'..' is not allowed",
    );
    let evil = raw_tar(&[("/etc/passwd", b"x", tar::EntryType::Regular, "")]);
    refused(d.path(), &write(d.path(), "c.tar", &evil), "absolute");
    let evil = raw_tar(&[("link", b"", tar::EntryType::Symlink, "../../etc/passwd")]);
    refused(
        d.path(),
        &write(d.path(), "d.tar", &evil),
        "outside the archive",
    );
    let evil = raw_tar(&[("dev", b"", tar::EntryType::Char, "")]);
    refused(
        d.path(),
        &write(d.path(), "e.tar", &evil),
        "no place in an image archive",
    );
    assert!(!d.path().join("escape").exists());
}

#[test]
fn a_layout_missing_a_blob_is_refused_naming_it() {
    let d = data();
    let img = oci_image("hi", "v1");
    let layer = Digest::of(&img.layer_gz);
    let files: Vec<_> = img
        .files
        .into_iter()
        .filter(|(p, _)| !p.ends_with(&layer.hex()))
        .collect();
    let input = write(d.path(), "in.tar", &tar_files(&files));
    refused(
        d.path(),
        &input,
        &format!("blob {layer} (named by manifest"),
    );
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_is_refused() {
    let d = data();
    let img = oci_image("hi", "v1");
    let layer = Digest::of(&img.layer_gz).hex();
    let files: Vec<_> = img
        .files
        .into_iter()
        .map(|(p, b)| {
            if p.ends_with(&layer) {
                let mut b = b;
                let last = b.len() - 1;
                b[last] ^= 1;
                (p, b)
            } else {
                (p, b)
            }
        })
        .collect();
    let input = write(d.path(), "in.tar", &tar_files(&files));
    refused(d.path(), &input, "digest mismatch");
}

#[test]
fn a_docker_layer_that_does_not_match_its_diff_id_is_refused() {
    let d = data();
    let (mut files, _) = docker_archive("hi", "hello:v1");
    files[2].1 = tar_of(&[("hello", b"tampered")]);
    let input = write(d.path(), "docker.tar", &tar_files(&files));
    refused(d.path(), &input, "rootfs.diff_ids[0]");
    // A config whose file name is not its digest.
    let (mut files, _) = docker_archive("hi", "hello:v1");
    files[1].1.push(b' ');
    let input = write(d.path(), "docker2.tar", &tar_files(&files));
    refused(d.path(), &input, "its name says");
}

#[test]
fn a_huge_manifest_is_refused_before_it_is_parsed() {
    let d = data();
    let mut huge = b"{\"schemaVersion\":2,\"layers\":[]".to_vec();
    huge.resize(MAX_MANIFEST as usize + 10, b' ');
    huge.push(b'}');
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": crate::oci::OCI_MANIFEST, "digest": sha(&huge), "size": huge.len()}]
    }))
    .unwrap();
    let files = vec![
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_string(), index),
        (format!("blobs/sha256/{}", Digest::of(&huge).hex()), huge),
    ];
    let input = write(d.path(), "in.tar", &tar_files(&files));
    refused(d.path(), &input, "more than the 4194304 allowed");
}

#[test]
fn an_index_with_several_images_is_chosen_by_tag() {
    let d = data();
    let a = oci_image("a", "v1");
    let b = oci_image("b", "v2");
    let da = Digest::of(&a.manifest);
    let db = Digest::of(&b.manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": crate::oci::OCI_MANIFEST, "digest": da.to_string(), "size": a.manifest.len(),
             "annotations": {"org.opencontainers.image.ref.name": "v1"}},
            {"mediaType": crate::oci::OCI_MANIFEST, "digest": db.to_string(), "size": b.manifest.len(),
             "annotations": {"org.opencontainers.image.ref.name": "v2"}}]
    }))
    .unwrap();
    let mut files: Vec<_> = a
        .files
        .into_iter()
        .chain(b.files.into_iter().skip(2))
        .filter(|(p, _)| p != "index.json")
        .collect();
    files.push(("index.json".into(), index));
    let input = write(d.path(), "in.tar", &tar_files(&files));
    assert_eq!(import_path(d.path(), &input, "x", "v2").unwrap().digest, db);
    let e = format!(
        "{:#}",
        import_path(d.path(), &input, "x", "v3").unwrap_err()
    );
    assert!(e.contains("names: v1, v2"), "{e}");
}

#[test]
fn something_that_is_no_image_says_what_was_expected() {
    let d = data();
    let input = write(d.path(), "x.tar", &tar_of(&[("README", b"hi")]));
    refused(d.path(), &input, "neither an OCI image layout");
    let input = write(d.path(), "junk", b"not a tar at all, just some words");
    let e = format!("{:#}", import_path(d.path(), &input, "x", "v").unwrap_err());
    assert!(e.contains("tar"), "{e}");
}

#[test]
fn a_symlink_out_of_a_layout_directory_is_not_followed() {
    let d = data();
    let img = oci_image("hi", "v1");
    let dir = d.path().join("layout");
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for (p, b) in &img.files {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        if p.ends_with(&Digest::of(&img.layer_gz).hex()) {
            std::fs::write(outside.join("layer"), b).unwrap();
            std::os::unix::fs::symlink(outside.join("layer"), &f).unwrap();
        } else {
            std::fs::write(f, b).unwrap();
        }
    }
    refused(d.path(), &dir, "outside the layout directory");
}

#[test]
fn hostile_tars_never_panic() {
    // Mutations of a valid layout tar: each import returns Ok or Err.
    let d = data();
    let img = oci_image("hi", "v1");
    let good = tar_files(&img.files);
    let mut rng = crate::mutate::Rng::new(16);
    for i in 0..200 {
        let bad = rng.mutate(&good);
        let input = write(d.path(), &format!("m{i}.tar"), &bad);
        let _ = import_path(d.path(), &input, "m", "v1");
    }
    let left: Vec<_> = store_files(d.path())
        .into_iter()
        .filter(|f| f.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn names_follow_the_distribution_spec() {
    for ok in ["a", "library/busybox", "a.b_c__d---e/f0", "x/y/z"] {
        crate::oci::check_repo_name(ok).unwrap();
    }
    for bad in [
        "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a:b", "a/../b",
    ] {
        assert!(crate::oci::check_repo_name(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        crate::oci::parse_name("library/busybox").unwrap(),
        ("library/busybox".into(), "latest".into())
    );
    assert!(crate::oci::parse_name("x:.bad").is_err());
    assert!(crate::oci::parse_name("x:").is_err());
    assert!(crate::oci::parse_name(&format!("x:{}", "t".repeat(129))).is_err());
}
