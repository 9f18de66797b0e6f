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

fn stanza(name: &str, version: &str, prio: &str, fields: &str) -> String {
    format!(
        "Package: {name}\nVersion: {version}\nArchitecture: amd64\nPriority: {prio}\n\
         Filename: pool/main/{name}_{version}_amd64.deb\nSize: 1\nSHA256: {}\n{fields}",
        "0".repeat(64)
    )
}

fn index(stanzas: &[String]) -> (String, Vec<Package>) {
    let text = stanzas.join("\n");
    let pkgs = debian::parse_packages(&text, "test").unwrap();
    (text, pkgs)
}

fn roots(names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| (n.to_string(), "asked for by repo t".to_string()))
        .collect()
}

#[test]
fn versioned_dependencies_pick_the_newest_version_that_satisfies_them() {
    let (_, idx) = index(&[
        stanza(
            "app",
            "1",
            "optional",
            "Depends: libc (>= 2), libold (<< 2), virt\n",
        ),
        stanza("libc", "1", "optional", ""),
        stanza("libc", "2", "optional", ""),
        stanza("libc", "3", "optional", ""),
        stanza("libold", "1.5", "optional", ""),
        stanza("libold", "2.1", "optional", ""),
        stanza("prov-b", "1", "optional", "Provides: virt\n"),
        stanza("prov-a", "1", "optional", "Provides: virt\n"),
        stanza("tool", "1", "optional", "Depends: libc (= 2)\n"),
        // `awk` is met by mawk, a root still waiting when base is taken.
        stanza("base", "1", "required", "Pre-Depends: awk\n"),
        stanza("gawk", "1", "optional", "Provides: awk\n"),
        stanza("mawk", "1", "required", "Provides: awk\n"),
        // `lsb` is a real package and provided: apt takes the real one.
        stanza("sysv", "1", "required", "Provides: lsb\n"),
        stanza("lsb", "11", "optional", ""),
        stanza("sshd", "1", "optional", "Depends: lsb\n"),
    ]);
    let got = closure::resolve(
        &idx,
        None,
        &roots(&["app", "base", "mawk", "sshd", "sysv", "tool"]),
    )
    .unwrap();
    let got: Vec<String> = got.iter().map(|(n, v)| format!("{n}={v}")).collect();
    // libc 3 for app (newest >= 2), libc 2 too for tool (= 2), libold
    // 1.5 (<< 2: not the newest), the first provider of virt by name.
    assert_eq!(
        got,
        [
            "app=1",
            "base=1",
            "libc=2",
            "libc=3",
            "libold=1.5",
            "lsb=11",
            "mawk=1",
            "prov-a=1",
            "sshd=1",
            "sysv=1",
            "tool=1"
        ]
    );
    assert!(closure::satisfies("1:1.0", Some(">> 2.0")));
    assert!(closure::satisfies("2.36-9+deb12u4", Some(">= 2.36")));
    assert!(!closure::satisfies("2.36~rc1", Some(">= 2.36")));
}

#[test]
fn recommends_are_followed_only_when_the_repo_says_installs_take_them() {
    let (text, idx) = index(&[
        stanza(
            "app",
            "1",
            "optional",
            "Depends: lib\nRecommends: extra | gone, missing-rec\n",
        ),
        stanza("lib", "1", "optional", ""),
        stanza("extra", "1", "optional", "Depends: lib\n"),
    ]);
    let recs = closure::parse_recommends(&text);
    let names = |set: BTreeSet<(String, String)>| -> Vec<String> {
        set.into_iter().map(|(n, _)| n).collect()
    };
    let without = closure::resolve(&idx, None, &roots(&["app"])).unwrap();
    assert_eq!(names(without), ["app", "lib"]);
    // A recommendation nothing satisfies is skipped, as apt does.
    let with = closure::resolve(&idx, Some(&recs), &roots(&["app"])).unwrap();
    assert_eq!(names(with), ["app", "extra", "lib"]);
}

#[test]
fn the_mirror_keeps_each_groups_first_alternative_that_apt_takes_on_an_empty_root() {
    // Debian's `usrmerge | usr-is-merged`: the required `usr-is-merged`
    // meets the group for our installer, but stock apt on a root holding
    // neither takes `usrmerge` (and what it needs).
    let (_, idx) = index(&[
        stanza(
            "helpers",
            "1",
            "optional",
            "Depends: usrmerge | usr-is-merged, gone | vmta\n",
        ),
        stanza("usrmerge", "35", "optional", "Depends: perl (>= 5)\n"),
        stanza("perl", "5.36", "standard", ""),
        stanza("usr-is-merged", "35", "required", ""),
        // `gone` is in no index: the first that can be met is `vmta`'s
        // first provider by name.
        stanza("zmail", "1", "optional", "Provides: vmta\n"),
        stanza("amail", "1", "optional", "Provides: vmta\n"),
    ]);
    let roots = roots(&["helpers", "usr-is-merged", "zmail"]);
    let names = |set: BTreeSet<(String, String)>| -> Vec<String> {
        set.into_iter().map(|(n, _)| n).collect()
    };
    // The installer's choice is unchanged.
    let installer = closure::resolve(&idx, None, &roots).unwrap();
    assert_eq!(names(installer), ["helpers", "usr-is-merged", "zmail"]);
    let mirror = closure::resolve_for_mirror(&idx, None, &roots).unwrap();
    assert_eq!(
        names(mirror),
        [
            "amail",
            "helpers",
            "perl",
            "usr-is-merged",
            "usrmerge",
            "zmail"
        ]
    );
}

#[test]
fn a_missing_package_is_an_error_naming_it_and_who_needs_it() {
    let (_, idx) = index(&[
        stanza("base", "1", "required", ""),
        stanza(
            "app",
            "1",
            "optional",
            "Depends: base, libfoo (>= 3) | libbar\n",
        ),
        stanza("libfoo", "2", "optional", ""),
    ]);
    let err = closure::resolve(&idx, None, &roots(&["app"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package app 1 needs libfoo (>= 3) | libbar, which no package in the mirror's index \
         satisfies (the index has libfoo 2)"
    );
    let err = closure::resolve(&idx, None, &roots(&["nope"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package nope (asked for by repo t) is not in the mirror's index"
    );
}

#[test]
fn a_snapshot_with_a_missing_blob_is_not_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (d, n) = put_blob(dir.path(), &b"present"[..], None, "a").unwrap();
    let mut files = BTreeMap::new();
    files.insert(
        "dists/t/InRelease".to_string(),
        FileRef {
            digest: d.to_string(),
            size: n,
        },
    );
    check_complete(dir.path(), &files).unwrap();
    files.insert(
        "pool/main/x.deb".to_string(),
        FileRef {
            digest: Digest::of(b"absent").to_string(),
            size: 6,
        },
    );
    let err = check_complete(dir.path(), &files).unwrap_err().to_string();
    assert!(
        err.contains("pool/main/x.deb") && err.contains("not on this node"),
        "{err}"
    );
}

/// A fetcher over a map that serves at most `cut` bytes of a file per
/// request (a dropped connection), honouring offsets when `ranges`.
struct Flaky {
    files: HashMap<String, Vec<u8>>,
    cut: usize,
    ranges: bool,
    calls: std::sync::Mutex<Vec<(String, u64)>>,
}

impl Fetch for Flaky {
    fn get(&self, url: &str) -> Result<Box<dyn Read + Send>, debian::DebianError> {
        Ok(self.get_from(url, 0)?.0)
    }
    fn get_from(
        &self,
        url: &str,
        offset: u64,
    ) -> Result<(Box<dyn Read + Send>, bool), debian::DebianError> {
        self.calls.lock().unwrap().push((url.to_owned(), offset));
        let b = self
            .files
            .get(url)
            .ok_or_else(|| debian::DebianError::Fetch {
                url: url.to_owned(),
                detail: "404".into(),
            })?;
        let from = if self.ranges { offset as usize } else { 0 };
        let end = from.saturating_add(self.cut).min(b.len());
        Ok((
            Box::new(std::io::Cursor::new(b[from..end].to_vec())),
            self.ranges,
        ))
    }
}

#[test]
fn cut_downloads_resume_with_ranges_or_restart_cleanly() {
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let want = (Digest::of(&body), body.len() as u64);
    for ranges in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let f = Flaky {
            files: [("u".to_string(), body.clone())].into(),
            cut: 4000,
            ranges,
            calls: Default::default(),
        };
        let r = fetch_blob(dir.path(), &f, "u", want, "pool/x.deb");
        if ranges {
            assert_eq!(r.unwrap(), 10_000);
            let offsets: Vec<u64> = f.calls.lock().unwrap().iter().map(|c| c.1).collect();
            assert_eq!(offsets, [0, 4000, 8000]);
            assert_eq!(
                std::fs::read(blob_path(dir.path(), &want.0.to_string()).unwrap()).unwrap(),
                body
            );
        } else {
            // Never more than 4000 bytes: each retry restarts from 0, and
            // the error says what happened; the partial stays for later.
            let err = format!("{:#}", r.unwrap_err());
            assert!(
                err.contains("pool/x.deb") && err.contains("cut short"),
                "{err}"
            );
            assert!(!has_blob(dir.path(), &want.0));
            assert_eq!(
                std::fs::metadata(partial_path(dir.path(), &want.0))
                    .unwrap()
                    .len(),
                4000
            );
        }
    }
    // A partial that does not belong to the file is dropped, not kept.
    let dir = tempfile::tempdir().unwrap();
    let part = partial_path(dir.path(), &want.0);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, vec![0xffu8; 5000]).unwrap();
    let f = Flaky {
        files: [("u".to_string(), body.clone())].into(),
        cut: usize::MAX,
        ranges: true,
        calls: Default::default(),
    };
    fetch_blob(dir.path(), &f, "u", want, "x").unwrap();
    assert!(has_blob(dir.path(), &want.0) && !part.exists());
}

/// A fetcher that holds every request until `gate` are in flight at once
/// (or 10 s pass), recording the most ever in flight; `bad` is served with
/// one byte changed.
struct Gate {
    files: HashMap<String, Vec<u8>>,
    gate: usize,
    bad: String,
    now: std::sync::Mutex<usize>,
    most: std::sync::atomic::AtomicUsize,
    cv: std::sync::Condvar,
}

impl Fetch for Gate {
    fn get(&self, url: &str) -> Result<Box<dyn Read + Send>, debian::DebianError> {
        let mut b = self.files.get(url).cloned().unwrap();
        if url == self.bad {
            b[0] ^= 1;
        }
        let mut n = self.now.lock().unwrap();
        *n += 1;
        self.most.fetch_max(*n, std::sync::atomic::Ordering::SeqCst);
        self.cv.notify_all();
        let t0 = std::time::Instant::now();
        while self.most.load(std::sync::atomic::Ordering::SeqCst) < self.gate
            && t0.elapsed() < std::time::Duration::from_secs(10)
        {
            n = self
                .cv
                .wait_timeout(n, std::time::Duration::from_millis(100))
                .unwrap()
                .0;
        }
        *n -= 1;
        Ok(Box::new(std::io::Cursor::new(b)))
    }
}

#[test]
fn pool_files_download_several_at_once_and_a_bad_one_stops_the_rest() {
    let bodies: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 1000 + i as usize]).collect();
    let items: Vec<(String, (Digest, u64))> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("pool/f{i:02}.deb"), (Digest::of(b), b.len() as u64)))
        .collect();
    let gate = |bad: &str| Gate {
        files: items
            .iter()
            .zip(&bodies)
            .map(|((p, _), b)| (p.clone(), b.clone()))
            .collect(),
        gate: 4,
        bad: bad.into(),
        now: Default::default(),
        most: Default::default(),
        cv: Default::default(),
    };
    // All arrive, verified, never more than 4 at once and 4 at some point.
    let dir = tempfile::tempdir().unwrap();
    let f = gate("");
    let mut done = Vec::new();
    for_each_parallel(
        &items,
        4,
        |(p, want)| fetch_blob(dir.path(), &f, p, *want, p),
        |(p, _), n| {
            done.push((p.clone(), n));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(f.most.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(done.len(), 12);
    for ((_, (d, size)), b) in items.iter().zip(&bodies) {
        assert_eq!(
            std::fs::read(blob_path(dir.path(), &d.to_string()).unwrap()).unwrap(),
            *b
        );
        assert!(done.iter().any(|(_, n)| n == size));
    }
    // One file with a wrong byte: the error names it, nothing of it is
    // kept, what was verified stays, and no new file starts after it.
    let dir = tempfile::tempdir().unwrap();
    let f = gate("pool/f01.deb");
    let mut seen = 0;
    let err = for_each_parallel(
        &items,
        4,
        |(p, want)| fetch_blob(dir.path(), &f, p, *want, p),
        |_, _| {
            seen += 1;
            Ok(())
        },
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("pool/f01.deb") && msg.contains("hash mismatch"),
        "{msg}"
    );
    let bad = items[1].1 .0;
    assert!(!has_blob(dir.path(), &bad) && !partial_path(dir.path(), &bad).exists());
    let kept = items
        .iter()
        .filter(|(_, (d, _))| has_blob(dir.path(), d))
        .count();
    assert_eq!(kept, seen);
    // One at a time: nothing after the bad file is even asked for.
    let dir = tempfile::tempdir().unwrap();
    let mut f = gate("pool/f01.deb");
    f.gate = 1;
    let asked_cell = std::sync::Mutex::new(Vec::new());
    let err = for_each_parallel(
        &items,
        1,
        |(p, want)| {
            asked_cell.lock().unwrap().push(p.clone());
            fetch_blob(dir.path(), &f, p, *want, p)
        },
        |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("pool/f01.deb"), "{err:#}");
    let asked: Vec<String> = asked_cell.into_inner().unwrap();
    assert_eq!(asked, ["pool/f00.deb", "pool/f01.deb"]);
    // A spec's default and cap.
    let spec = |downloads| MirrorSpec {
        name: "x".into(),
        upstream: String::new(),
        suites: vec![],
        components: vec![],
        arches: vec![],
        packages: vec![],
        installer: false,
        keyring: vec![],
        recommends: false,
        downloads,
    };
    assert_eq!(spec(0).jobs(), DEFAULT_DOWNLOADS);
    assert_eq!(spec(2).jobs(), 2);
    assert_eq!(spec(1000).jobs(), MAX_DOWNLOADS);
}
