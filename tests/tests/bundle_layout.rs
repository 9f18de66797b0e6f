//! The bundle on the real image's data partition (`target/appliance/`, from
//! `cargo xtask image`, which `cargo xtask test` runs first) is an OCI
//! layout stock tools read: every ref names a manifest `skopeo inspect
//! --raw` returns, `skopeo copy` copies out with its blob intact, and
//! `umoci ls` lists.

use std::process::Command;

use integration_tests::workspace_root;

fn run(tool: &str, args: &[&str]) -> Vec<u8> {
    let o = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool} (xtask/install-deps.sh installs it): {e}"));
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn the_image_bundle_refs_are_manifests_skopeo_and_umoci_read() {
    let dir = workspace_root().join("target/appliance");
    assert!(
        dir.join("appliance.img").exists(),
        "{} has no appliance.img: run `cargo xtask image` (cargo xtask test does)",
        dir.display()
    );
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    integration_tests::extract_data_partition(&dir, work.path(), &data);
    let bundle = data.join("bundle");
    let root = bundle.to_str().unwrap();
    let index = std::fs::read(bundle.join("index.json")).unwrap();
    let refs = bundle::store::parse_index_refs(&index).unwrap();
    let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["debian/keyring", "lock/appliance", "release/debs"] {
        assert!(names.contains(&want), "no {want} in {names:?}");
    }
    let blob = |hex: &str| std::fs::read(bundle.join("blobs/sha256").join(hex)).unwrap();
    let out = tempfile::tempdir().unwrap();
    for (i, (name, d)) in refs.iter().enumerate() {
        assert_eq!(
            d.media_type,
            bundle::store::OCI_MANIFEST,
            "{name} names no manifest"
        );
        let image = format!("oci:{root}:{name}");
        let raw = run("skopeo", &["inspect", "--raw", &image]);
        assert_eq!(raw, blob(&d.digest.hex()), "{name}");
        let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(m["config"]["mediaType"], bundle::store::OCI_EMPTY, "{name}");
        assert!(m["artifactType"].is_string(), "{name}: {m}");
        let layers = m["layers"].as_array().unwrap();
        // Small refs only: copying the kernel, the appliance binary or the
        // debs out adds time and proves nothing more.
        let size: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap()).sum();
        if size > 4 << 20 {
            continue;
        }
        let dest = out.path().join(i.to_string());
        run(
            "skopeo",
            &["copy", "-q", &image, &format!("dir:{}", dest.display())],
        );
        for l in layers {
            let hex = l["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            assert_eq!(std::fs::read(dest.join(hex)).unwrap(), blob(hex), "{name}");
        }
    }
    // The lock is the documented schema document.
    let lock = bundle::resolve::ref_payload(
        &index,
        "lock/appliance",
        &builder::treefile::BlobDir::new(&bundle),
    )
    .unwrap()
    .unwrap();
    let text = blob(&lock.digest.hex());
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["schema"], bundle::resolve::LOCK_SCHEMA);
    assert!(bundle::resolve::parse_lock(&text)
        .unwrap()
        .contains_key("kernel"));
    let ls = String::from_utf8(run("umoci", &["ls", "--layout", root])).unwrap();
    let mut listed: Vec<&str> = ls.lines().collect();
    listed.sort();
    assert_eq!(listed, names);
}
