use super::*;

fn pkg(name: &str, version: &str, priority: &str, depends: &str, provides: &str) -> Package {
    let text = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: amd64\nPriority: {priority}\n\
         Filename: pool/main/{name}_{version}_amd64.deb\nSize: 1\nSHA256: {}\n{}{}",
        "0".repeat(64),
        if depends.is_empty() {
            String::new()
        } else {
            format!("Depends: {depends}\n")
        },
        if provides.is_empty() {
            String::new()
        } else {
            format!("Provides: {provides}\n")
        },
    );
    debian::parse_packages(&text, "test").unwrap().remove(0)
}

#[test]
fn closure_takes_required_important_wanted_and_their_dependencies() {
    let index = vec![
        pkg("base", "1", "required", "", ""),
        pkg("tool", "1", "important", "libc", ""),
        pkg("libc", "1", "optional", "", ""),
        pkg("libc", "2", "optional", "", ""),
        pkg(
            "app",
            "1",
            "optional",
            "missing | alt, mta, libc (>= 9)",
            "",
        ),
        pkg("alt", "1", "optional", "", ""),
        pkg("postfix", "1", "extra", "", "mta"),
        pkg("exim", "1", "extra", "", "mta"),
        pkg("outsider", "1", "optional", "libc", ""),
    ];
    let names = closure(&index, &["app".to_string()]).unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // `missing | alt`: the first alternative that exists; `mta`: the first
    // provider by name; the version constraint is not used to choose.
    assert_eq!(names, ["alt", "app", "base", "exim", "libc", "tool"]);
    assert_eq!(newest_by_name(&index)["libc"].version, "2");
    let err = closure(&index, &["nope".to_string()]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn a_bad_hash_is_refused_naming_the_file_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let good = b"hello".as_slice();
    let want = Digest::of(good);
    let err = put_blob(
        dir.path(),
        &b"hellO"[..],
        Some((want, 5)),
        "pool/main/h/hello.deb",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pool/main/h/hello.deb") && err.contains("mismatch"),
        "{err}"
    );
    let err = put_blob(dir.path(), &b"hello!"[..], Some((want, 5)), "x.deb").unwrap_err();
    assert!(err.to_string().contains("longer"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let (d, n) = put_blob(dir.path(), good, Some((want, 5)), "ok").unwrap();
    assert_eq!((d, n), (want, 5));
    assert_eq!(
        std::fs::read(blob_path(dir.path(), &d.to_string()).unwrap()).unwrap(),
        good
    );
    assert!(has_blob(dir.path(), &want));
}

#[test]
fn repo_objects_become_mirror_specs_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("nokey");
    std::fs::write(&key, b"not a key").unwrap();
    let mut r = Repo {
        name: "deb".into(),
        breed: "apt".into(),
        mirror: "http://127.0.0.1:1/debian/".into(),
        suites: vec!["bookworm".into()],
        keyring: key.display().to_string(),
        ..Default::default()
    };
    let err = MirrorSpec::from_repo(dir.path(), &r).unwrap_err();
    assert!(format!("{err:#}").contains("nokey"), "{err:#}");
    r.breed = "yum".into();
    assert!(MirrorSpec::from_repo(dir.path(), &r).is_err());
    // Old repo objects (no apt fields) still load, and write no new keys.
    let old: Repo = serde_json::from_str(
        r#"{"name":"x","mirror":"m","breed":"apt","arch":"amd64","components":["main"],"comment":""}"#,
    )
    .unwrap();
    let v = serde_json::to_value(&old).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 6, "{v}");
}

#[test]
fn by_hash_names_come_from_the_signed_release() {
    let ir = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: t\nAcquire-By-Hash: yes\n\
              SHA256:\n aa 1 main/binary-amd64/Packages\nSHA512:\n BB 1 main/binary-amd64/Packages\n\
              -----BEGIN PGP SIGNATURE-----\nSHA512:\n cc 1 evil\n-----END PGP SIGNATURE-----\n";
    let signed = signed_section(ir);
    assert!(
        signed.starts_with("Suite: t\n") && !signed.contains("evil"),
        "{signed}"
    );
    let h = hash_list(signed, "SHA512");
    assert_eq!(h.len(), 1);
    assert_eq!(h["main/binary-amd64/Packages"], "bb");
    assert_eq!(
        hash_list(signed, "SHA256")["main/binary-amd64/Packages"],
        "aa"
    );
}
