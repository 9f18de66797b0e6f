use super::*;
use crate::oci::fixtures::*;
use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<RegistryState>,
    img: Image,
}

/// A node with `demo/hello:v1` imported (and tags `v2`…`v4` on it too).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let inv = Inventory::open_volatile(&dir.path().join("inventory")).unwrap();
    let state = RegistryState::new(
        dir.path().to_path_buf(),
        Arc::new(RwLock::new(inv)),
        crate::events::Events::new(),
    );
    let img = oci_image("hi", "v1");
    let input = dir.path().join("in.tar");
    std::fs::write(&input, tar_files(&img.files)).unwrap();
    let got = crate::oci::import::import_path(dir.path(), &input, "demo/hello", "v1").unwrap();
    for tag in ["v1", "v2", "v3", "v4"] {
        Tag {
            repo: "demo/hello".into(),
            tag: tag.into(),
            digest: got.digest,
        }
        .save(
            &mut state.inventory.write().unwrap(),
            "amd64",
            "",
            &Author::new("test"),
        )
        .unwrap();
    }
    Fixture {
        _dir: dir,
        state,
        img,
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut r = HttpRequest::builder().method(method).uri(uri);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(r.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let h = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, h, body)
}

fn oci_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn manifests_blobs_and_lists_are_served_as_the_distribution_spec_says() {
    let f = fixture();
    let app = crate::http::routes::unguarded(routes(f.state.clone()));
    let (s, h, _) = call(&app, "GET", "/v2/", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");

    let md = sha(&f.img.manifest);
    for uri in [
        "/v2/demo/hello/manifests/v1".to_string(),
        format!("/v2/demo/hello/manifests/{md}"),
    ] {
        let (s, h, body) = call(&app, "GET", &uri, &[]).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert_eq!(h["content-type"], crate::oci::OCI_MANIFEST);
        assert_eq!(h["docker-content-digest"], md.as_str());
        assert_eq!(body, f.img.manifest);
        let (s, h, body) = call(&app, "HEAD", &uri, &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            h["content-length"],
            f.img.manifest.len().to_string().as_str()
        );
        assert_eq!(h["docker-content-digest"], md.as_str());
        assert!(body.is_empty());
    }

    let ld = sha(&f.img.layer_gz);
    let uri = format!("/v2/demo/hello/blobs/{ld}");
    let (s, h, body) = call(&app, "GET", &uri, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["docker-content-digest"], ld.as_str());
    assert_eq!(body, f.img.layer_gz);
    let (s, h, body) = call(&app, "GET", &uri, &[("range", "bytes=2-5")]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, f.img.layer_gz[2..6]);
    assert!(h["content-range"]
        .to_str()
        .unwrap()
        .starts_with("bytes 2-5/"));
    let (s, h, body) = call(&app, "HEAD", &uri, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        h["content-length"],
        f.img.layer_gz.len().to_string().as_str()
    );
    assert!(body.is_empty());
    let cd = sha(&f.img.config);
    let (s, _, body) = call(&app, "GET", &format!("/v2/demo/hello/blobs/{cd}"), &[]).await;
    assert_eq!((s, body), (StatusCode::OK, f.img.config.clone()));

    let (s, _, body) = call(&app, "GET", "/v2/demo/hello/tags/list", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"name": "demo/hello", "tags": ["v1", "v2", "v3", "v4"]})
    );
    let (s, h, body) = call(&app, "GET", "/v2/demo/hello/tags/list?n=2", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["v1", "v2"]));
    assert_eq!(
        h["link"],
        "</v2/demo/hello/tags/list?last=v2&n=2>; rel=\"next\""
    );
    let (_, h, body) = call(&app, "GET", "/v2/demo/hello/tags/list?n=2&last=v2", &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["v3", "v4"]));
    assert!(h.get("link").is_none(), "the last page has no next link");
    let (s, _, body) = call(&app, "GET", "/v2/demo/hello/tags/list?n=x", &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(oci_code(&body), "PAGINATION_NUMBER_INVALID");

    let (s, _, body) = call(&app, "GET", "/v2/_catalog", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"repositories": ["demo/hello"]}));
}

#[tokio::test]
async fn unknown_names_and_digests_get_oci_errors_and_other_blobs_stay_hidden() {
    let f = fixture();
    let app = crate::http::routes::unguarded(routes(f.state.clone()));
    let cases = [
        (
            "/v2/nope/manifests/v1",
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/demo/hello/manifests/v9",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/Demo/manifests/v1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/demo/hello/manifests/sha256:zz",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/demo/hello/blobs/sha256:00",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        ("/v2/nope/tags/list", StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        (
            "/v2/demo/hello/referrers/x",
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
        ),
    ];
    for (uri, status, code) in cases {
        let (s, _, body) = call(&app, "GET", uri, &[]).await;
        assert_eq!(s, status, "{uri}");
        assert_eq!(oci_code(&body), code, "{uri}");
    }
    // A blob in the store that no tag of the repository reaches (a
    // captured disk chunk, a mirror file) is not served by digest.
    let (secret, _) = f.state.blobs.put_bytes(b"a captured disk chunk").unwrap();
    for uri in [
        format!("/v2/demo/hello/blobs/{secret}"),
        format!("/v2/demo/hello/manifests/{secret}"),
    ] {
        let (s, _, body) = call(&app, "GET", &uri, &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert!(
            ["BLOB_UNKNOWN", "MANIFEST_UNKNOWN"].contains(&oci_code(&body).as_str()),
            "{uri}"
        );
    }
    // A layer asked for as a manifest is not one.
    let ld = sha(&f.img.layer_gz);
    let (s, _, body) = call(&app, "GET", &format!("/v2/demo/hello/manifests/{ld}"), &[]).await;
    assert_eq!(
        (s, oci_code(&body).as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    // Writes do not exist.
    let (s, _, _) = call(&app, "PUT", "/v2/demo/hello/manifests/v1", &[]).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn pulls_need_a_read_token_unless_the_setting_opens_them() {
    let f = fixture();
    let tokens = Arc::new(crate::auth::TokenStore::memory());
    tokens.create("ops").unwrap();
    let read = tokens
        .create_scoped("puller", crate::auth::Scope::Read)
        .unwrap()
        .1;
    // Public inventory reads do not open the registry.
    let auth = crate::http::Auth::new(Some(tokens), true);
    let inv = f.state.inventory.clone();
    auth.set_registry_open(Arc::new(move || {
        inv.read().unwrap().settings().registry_anonymous_pulls
    }));
    let app = crate::http::build(routes(f.state.clone()), auth);
    let uri = "/v2/demo/hello/manifests/v1";
    for u in ["/v2/", uri] {
        let (s, h, body) = call(&app, "GET", u, &[("host", "10.0.0.1:8080")]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{u}");
        assert_eq!(
            h["www-authenticate"],
            "Bearer realm=\"http://10.0.0.1:8080/v2/token\",service=\"appliance\""
        );
        assert_eq!(oci_code(&body), "UNAUTHORIZED");
    }
    let bearer = format!("Bearer {read}");
    let (s, _, _) = call(&app, "GET", uri, &[("authorization", &bearer)]).await;
    assert_eq!(s, StatusCode::OK);
    // A hostile Host header does not shape the challenge.
    let (_, h, _) = call(&app, "GET", uri, &[("host", "evil\"x")]).await;
    assert_eq!(
        h["www-authenticate"],
        "Bearer realm=\"http://localhost/v2/token\",service=\"appliance\""
    );

    let mut settings = f.state.inventory.read().unwrap().settings().clone();
    settings.registry_anonymous_pulls = true;
    f.state
        .inventory
        .write()
        .unwrap()
        .set_settings(settings, &Author::new("test"))
        .unwrap();
    let (s, _, _) = call(&app, "GET", uri, &[]).await;
    assert_eq!(s, StatusCode::OK, "anonymous pulls are open");
    let (s, _, _) = call(&app, "GET", uri, &[("authorization", "Bearer apl_0_wrong")]).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a wrong token is still refused"
    );
    // The import route stays an operator's.
    let resp = app
        .clone()
        .oneshot(
            HttpRequest::post("/api/v1/oci/import?name=x:y")
                .header("authorization", &bearer)
                .body(Body::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_upload_route_imports_tags_and_refuses_bad_input_clearly() {
    let f = fixture();
    let app = crate::http::routes::unguarded(routes(f.state.clone()));
    let (files, _) = docker_archive("from docker", "x:y");
    let post = |uri: &str, body: Vec<u8>| {
        app.clone().oneshot(
            HttpRequest::post(uri.to_string())
                .body(Body::from(body))
                .unwrap(),
        )
    };
    let resp = post("/api/v1/oci/import?name=tools/dock:1.0", tar_files(&files))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["format"], "docker-archive");
    assert_eq!(v["image"], "tools.dock-1.0");
    let img = f
        .state
        .inventory
        .read()
        .unwrap()
        .image("tools.dock-1.0")
        .cloned()
        .unwrap();
    assert_eq!(img.kind, "oci");
    assert_eq!(
        img.reference,
        format!("tools/dock:1.0@{}", v["digest"].as_str().unwrap())
    );
    let (s, _, _) = call(&app, "GET", "/v2/tools/dock/manifests/1.0", &[]).await;
    assert_eq!(s, StatusCode::OK);

    let resp = post("/api/v1/oci/import?name=Bad:1", vec![]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post("/api/v1/oci/import", vec![]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post("/api/v1/oci/import?name=a:b", b"junk".to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let left: Vec<_> = std::fs::read_dir(f.state.data.join("tmp"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "uploads are removed: {left:?}");
}

/// A node with a sync identity, as bundles need.
fn sync_node(dir: &std::path::Path) -> (crate::sync::SyncNode, Arc<RwLock<Inventory>>) {
    let id = uuid::Uuid::new_v4();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    crate::node::write(dir, &crate::node::NodeFile { node_id: id }).unwrap();
    let mut inv = Inventory::open_volatile(&dir.join("inventory")).unwrap();
    inv.set_origin(&id);
    let inv = Arc::new(RwLock::new(inv));
    (crate::sync::SyncNode::new(dir, id, inv.clone(), None), inv)
}

#[tokio::test]
async fn a_sync_bundle_carries_tags_and_blobs_to_an_air_gapped_node() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, inv_a) = sync_node(da.path());
    let (b, inv_b) = sync_node(db.path());
    let (files, _) = docker_archive("carried", "x:y");
    let input = da.path().join("in.tar");
    std::fs::write(&input, tar_files(&files)).unwrap();
    let got = crate::oci::import::import_path(da.path(), &input, "site/app", "1").unwrap();
    Tag {
        repo: "site/app".into(),
        tag: "1".into(),
        digest: got.digest,
    }
    .save(
        &mut inv_a.write().unwrap(),
        &got.arch,
        "",
        &Author::new("t"),
    )
    .unwrap();
    let file = da.path().join("carry.bundle");
    crate::sync::bundle::export(&a, None, std::fs::File::create(&file).unwrap()).unwrap();
    crate::sync::bundle::import(&b, &file).unwrap();

    let state = RegistryState::new(db.path().to_path_buf(), inv_b, crate::events::Events::new());
    let app = crate::http::routes::unguarded(routes(state));
    let (s, h, body) = call(&app, "GET", "/v2/site/app/manifests/1", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["docker-content-digest"], got.digest.to_string().as_str());
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (s, _, body) = call(&app, "GET", &format!("/v2/site/app/blobs/{layer}"), &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sha(&body), layer);
}
