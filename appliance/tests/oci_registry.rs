//! The OCI registry end to end with stock skopeo on loopback: a tiny OCI
//! image layout (one gzipped layer and a config, made here) and a
//! `docker save`-style archive are imported with `appliance repo
//! import-oci` into a real `appliance serve`, then pulled with `skopeo
//! copy docker://… oci:DIR` and read with `skopeo inspect`, and the digests
//! compared. An untokened pull is refused until the
//! `registry_anonymous_pulls` setting opens the registry.

mod common;
use common::{bin, server};

use std::borrow::BorrowMut;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(0);
        b.append_data(&mut h, p, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn config_for(layer_tar: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]}
    }))
    .unwrap()
}

/// Writes an OCI image layout to `dir`; returns the manifest's and the
/// layer's digests.
fn oci_layout(dir: &Path) -> (String, String) {
    let layer_tar = tar_of(&[("hello", b"#!/bin/sh\necho hello from the appliance\n")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = config_for(&layer_tar);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(&layer), "size": layer.len()}]
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha(&manifest), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
    }))
    .unwrap();
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), index).unwrap();
    for b in [&manifest, &config, &layer] {
        let hex = sha(b).trim_start_matches("sha256:").to_owned();
        std::fs::write(dir.join("blobs/sha256").join(hex), b).unwrap();
    }
    (sha(&manifest), sha(&layer))
}

/// A `docker save` archive (legacy layout) of a one-layer image; returns
/// the config's and the (uncompressed) layer's digests.
fn docker_archive(path: &Path) -> (String, String) {
    let layer_tar = tar_of(&[("greeting", b"hello from docker\n")]);
    let config = config_for(&layer_tar);
    let chex = sha(&config).trim_start_matches("sha256:").to_owned();
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": format!("{chex}.json"), "RepoTags": ["greeter:v2"],
         "Layers": ["5f1c/layer.tar"]}
    ]))
    .unwrap();
    let cname = format!("{chex}.json");
    std::fs::write(
        path,
        tar_of(&[
            ("manifest.json", &manifest),
            (&cname, &config),
            ("5f1c/layer.tar", &layer_tar),
        ]),
    )
    .unwrap();
    (sha(&config), sha(&layer_tar))
}

fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    cmd.borrow_mut().stdin(Stdio::null()).output().unwrap()
}

fn ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let o = run(&mut *cmd);
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn skopeo(policy: &Path, args: &[&str]) -> Command {
    let found = Command::new("sh")
        .args(["-c", "command -v skopeo"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "skopeo is missing: it is in xtask/debian-packages.txt"
    );
    let mut c = Command::new("skopeo");
    // Neither the host's registries.conf nor a user's auth file counts.
    c.env("REGISTRY_AUTH_FILE", "/nonexistent/auth.json")
        .env("CONTAINERS_REGISTRIES_CONF", "/dev/null")
        .arg("--policy")
        .arg(policy)
        .args(args);
    c
}

#[test]
fn skopeo_pulls_imported_oci_and_docker_images_with_a_read_token_and_not_without() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // Inventory reads are public (the default); pulls still need a token.
    let (_server, url, admin) = server(data.path(), &[]);
    let host = url.trim_start_matches("http://").to_owned();
    // Signatures are not what is tested here.
    let policy = work.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut c = bin();
        c.args(["--url", &url, "--token", &admin]).args(args);
        c
    };

    // Import an OCI layout directory and a docker-archive tar.
    let layout = work.path().join("layout");
    let (manifest_digest, layer_digest) = oci_layout(&layout);
    let out = ok(cli(&["repo", "import-oci"])
        .arg(&layout)
        .args(["--name", "demo/hello:v1"]));
    assert!(out.contains(&manifest_digest), "{out}");
    let archive = work.path().join("greeter.tar");
    let (config_digest, diff_id) = docker_archive(&archive);
    let out = ok(cli(&["--json", "repo", "import-oci"])
        .arg(&archive)
        .args(["--name", "tools/greeter:v2"]));
    let docker: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(docker["format"], "docker-archive");
    let docker_manifest = docker["digest"].as_str().unwrap().to_owned();
    // A tampered archive is refused, naming the problem.
    let bad = work.path().join("bad.tar");
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"hello")
        .expect("layer text in the tar");
    bytes[at] = b'j';
    std::fs::write(&bad, bytes).unwrap();
    let o = run(cli(&["repo", "import-oci"])
        .arg(&bad)
        .args(["--name", "tools/greeter:bad"]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("digest mismatch"), "{err}");

    // A read token is the narrowest scope that pulls.
    let read = ok(bin()
        .args(["token", "create", "puller", "--scope", "read", "--data"])
        .arg(data.path()))
    .trim()
    .to_owned();

    // skopeo copy docker://… oci:DIR, then compare digests. With
    // --preserve-digests skopeo refuses any change to the manifest (for an
    // oci: destination it would otherwise gzip the docker archive's
    // uncompressed layers), so what arrives is what the registry served.
    let dest = work.path().join("pulled");
    for (name, tag) in [("demo/hello", "v1"), ("tools/greeter", "v2")] {
        let src = format!("docker://{host}/{name}:{tag}");
        let dst = format!("oci:{}:{tag}", dest.display());
        ok(skopeo(
            &policy,
            &[
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                "--src-registry-token",
                &read,
                &src,
                &dst,
            ],
        ));
    }
    let raw = ok(skopeo(&policy, &["inspect", "--raw"]).arg(format!("oci:{}:v1", dest.display())));
    assert_eq!(
        sha(raw.as_bytes()),
        manifest_digest,
        "the manifest arrived byte for byte"
    );
    let raw = ok(skopeo(&policy, &["inspect", "--raw"]).arg(format!("oci:{}:v2", dest.display())));
    assert_eq!(sha(raw.as_bytes()), docker_manifest);
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["config"]["digest"], config_digest.as_str());
    assert_eq!(
        m["layers"][0]["digest"],
        diff_id.as_str(),
        "docker layers stay uncompressed"
    );
    for d in [&layer_digest, &config_digest, &diff_id] {
        let hex = d.trim_start_matches("sha256:");
        let blob = std::fs::read(dest.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(&sha(&blob), d, "skopeo stored {d}");
    }

    // skopeo inspect against the registry shows the manifest and config.
    let out = ok(skopeo(
        &policy,
        &[
            "inspect",
            "--tls-verify=false",
            "--registry-token",
            &read,
            &format!("docker://{host}/demo/hello:v1"),
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], manifest_digest.as_str());
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Layers"][0], layer_digest.as_str());
    let tags = ok(skopeo(
        &policy,
        &[
            "list-tags",
            "--tls-verify=false",
            "--registry-token",
            &read,
            &format!("docker://{host}/demo/hello"),
        ],
    ));
    let tags: serde_json::Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1"]));

    // Without a token: refused (public inventory reads do not open it).
    let anon = |what: &str| {
        run(skopeo(
            &policy,
            &[
                "inspect",
                "--tls-verify=false",
                &format!("docker://{host}/{what}"),
            ],
        ))
    };
    let o = anon("demo/hello:v1");
    assert!(!o.status.success(), "an untokened pull must be refused");
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("unauthorized") || err.contains("401"), "{err}");
    // …until an admin opens the registry for anonymous pulls.
    ok(cli(&["settings", "--registry-anonymous-pulls", "true"]));
    let o = anon("demo/hello:v1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Digest"], manifest_digest.as_str());
    let o = anon("demo/nothing:v1");
    assert!(!o.status.success());
}
