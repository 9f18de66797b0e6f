//! HTTP boot and iPXE: what PXE clients fetch over HTTP.
//!
//! - `GET /boot/{mac}.ipxe` — the per-MAC iPXE script. A boot policy (the
//!   inventory, once wired) decides; the default boots the appliance's own
//!   kernel and initramfs in agent mode, reporting back to this server.
//! - `GET /boot/{file}` — `vmlinuz`, `initrd.img`, `ipxe.efi`,
//!   `undionly.kpxe` from `<data>/release/boot/` (HTTP Range supported).
//! - `GET /boot/blobs/sha256:{hex}` — any bundle blob by digest.
//!
//! Two iPXE quirks shape the script: systemd-stub replaces a UKI's embedded
//! command line with iPXE's load options, so we boot the plain kernel and
//! initramfs with the command line on the `kernel` line; and the 2019 iPXE
//! EFI build needs `initrd=<name>` on that line to hand the initrd over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
#[cfg(test)]
use axum::Router;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::agents::normalize_mac;
use crate::api::ApiError;
use crate::events::Events;

/// Decides the iPXE script for a MAC; `None` falls back to the default
/// (agent mode). `server` is the base URL the client reached us at.
pub type BootPolicy = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct PxeState {
    /// `<data>` (the data partition).
    pub data: PathBuf,
    pub events: Events,
    pub policy: Option<BootPolicy>,
    /// Extra kernel arguments for agents (e.g. the console).
    pub agent_cmdline: String,
}

/// The default script: boot this appliance's kernel and initramfs in agent
/// mode, pointed back at `server`. `server` comes from the request's
/// `Host` header: when it (or `extra`) could inject iPXE commands, the
/// script is [`crate::inventory::boot::refused_script`] instead.
pub fn agent_script(server: &str, extra: &str) -> String {
    use crate::inventory::boot::{
        ipxe_arg_problem, ipxe_url_problem, refused_script, UnsafeForIpxe,
    };
    let problem = ipxe_url_problem(server)
        .map(|why| ("server URL", server, why))
        .or_else(|| ipxe_arg_problem(extra).map(|why| ("kernel command line", extra, why)));
    if let Some((field, value, why)) = problem {
        let e = UnsafeForIpxe {
            field,
            value: value.to_owned(),
            why,
        };
        tracing::warn!(error = %e, "refusing to serve an iPXE script");
        return refused_script(&e);
    }
    format!(
        "#!ipxe\n\
         echo Booting the appliance agent from {server}\n\
         kernel {server}/boot/vmlinuz initrd=initrd.img {extra} appliance.mode=agent appliance.server={server}\n\
         initrd --name initrd.img {server}/boot/initrd.img\n\
         boot\n"
    )
}

/// The install script: the same kernel and initramfs in install mode
/// (the machine installs this appliance onto its disk).
pub fn install_script(server: &str, extra: &str) -> String {
    agent_script(server, extra)
        .replace("appliance.mode=agent", "appliance.mode=install")
        .replace("the appliance agent", "the appliance installer")
}

pub fn routes(state: PxeState) -> Vec<crate::http::Route> {
    use crate::http::{Guard, Route};
    let state = Arc::new(state);
    vec![
        Route::get(
            "/boot/{file}",
            Guard::Public,
            "HTTP boot: the agent kernel and initrd, and `<mac>.ipxe` boot scripts",
        )
        .response("binary")
        .to(boot_file, state.clone()),
        Route::get(
            "/boot/blobs/{digest}",
            Guard::Public,
            "HTTP boot: a boot file of the release by digest",
        )
        .response("binary")
        .to(blob, state),
    ]
}

#[cfg(test)]
fn router(state: PxeState) -> Router {
    crate::http::routes::unguarded(routes(state))
}

fn client_ip(req: &Request) -> Option<String> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

fn server_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// File names served from `release/boot`: one plain component.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

async fn boot_file(
    State(st): State<Arc<PxeState>>,
    UrlPath(file): UrlPath<String>,
    req: Request,
) -> Response {
    let client = client_ip(&req);
    if let Some(mac) = file.strip_suffix(".ipxe") {
        let Some(mac) = normalize_mac(mac) else {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{file:?}: not a MAC address"),
            )
            .into_response();
        };
        let server = server_base(req.headers());
        let script = st
            .policy
            .as_ref()
            .and_then(|p| p(&mac, &server))
            .unwrap_or_else(|| agent_script(&server, &st.agent_cmdline));
        st.events.publish(
            "http.ipxe",
            Some(&mac),
            serde_json::json!({ "client": client, "bytes": script.len() }),
        );
        return ([(header::CONTENT_TYPE, "text/plain")], script).into_response();
    }
    if !safe_name(&file) {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such boot file")
            .into_response();
    }
    let path = st.data.join("release/boot").join(&file);
    serve(&st, path, &format!("/boot/{file}"), client, req).await
}

async fn blob(
    State(st): State<Arc<PxeState>>,
    UrlPath(digest): UrlPath<String>,
    req: Request,
) -> Response {
    let client = client_ip(&req);
    let Ok(d) = digest.parse::<builder::Digest>() else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_digest",
            format!("{digest:?} is not sha256:<hex>"),
        )
        .into_response();
    };
    let path = st.data.join("bundle/blobs/sha256").join(d.hex());
    serve(&st, path, &format!("/boot/blobs/{d}"), client, req).await
}

async fn serve(
    st: &PxeState,
    path: PathBuf,
    what: &str,
    client: Option<String>,
    req: Request,
) -> Response {
    if !path.is_file() {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} is not on this appliance"),
        )
        .into_response();
    }
    let t = Instant::now();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match ServeFile::new(&path).oneshot(req).await {
        Ok(resp) => {
            let bytes = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let mac = client
                .as_ref()
                .and_then(|c| c.parse().ok())
                .and_then(|ip| st.events.mac_of(ip));
            st.events.publish(
                "http.file",
                mac.as_deref(),
                serde_json::json!({
                    "path": what, "client": client, "status": resp.status().as_u16(),
                    "bytes": bytes, "range": range, "ms": t.elapsed().as_millis() as u64,
                }),
            );
            resp.map(Body::new)
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string())
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn state(dir: &std::path::Path) -> PxeState {
        PxeState {
            data: dir.to_path_buf(),
            events: Events::new(),
            policy: None,
            agent_cmdline: "console=ttyS0".into(),
        }
    }

    async fn get(app: Router, uri: &str, range: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut r = axum::http::Request::get(uri).header("host", "10.77.0.1");
        if let Some(range) = range {
            r = r.header("range", range);
        }
        let resp = app.oneshot(r.body(Body::empty()).unwrap()).await.unwrap();
        let (p, b) = resp.into_parts();
        (
            p.status,
            p.headers,
            b.collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    #[tokio::test]
    async fn default_script_boots_the_agent_from_this_server() {
        let d = tempfile::tempdir().unwrap();
        let (st, _, body) = get(
            router(state(d.path())),
            "/boot/52-54-00-AA-BB-CC.ipxe",
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let s = String::from_utf8(body).unwrap();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.77.0.1/boot/vmlinuz initrd=initrd.img console=ttyS0 appliance.mode=agent appliance.server=http://10.77.0.1"), "{s}");
        assert!(
            s.contains("initrd --name initrd.img http://10.77.0.1/boot/initrd.img"),
            "{s}"
        );
        let (st, _, _) = get(router(state(d.path())), "/boot/not-a-mac.ipxe", None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn policy_overrides_the_default() {
        let d = tempfile::tempdir().unwrap();
        let mut s = state(d.path());
        s.policy = Some(Arc::new(|mac: &str, _: &str| {
            (mac == "52:54:00:aa:bb:cc").then(|| "#!ipxe\nexit\n".to_string())
        }));
        let (_, _, body) = get(router(s), "/boot/52:54:00:aa:bb:cc.ipxe", None).await;
        assert_eq!(body, b"#!ipxe\nexit\n");
    }

    #[tokio::test]
    async fn files_with_ranges_and_no_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("release/boot")).unwrap();
        std::fs::write(d.path().join("release/boot/vmlinuz"), b"0123456789").unwrap();
        std::fs::write(d.path().join("secret"), b"no").unwrap();
        let st = state(d.path());
        let events = st.events.clone();
        let (s, _, b) = get(router(st.clone()), "/boot/vmlinuz", None).await;
        assert_eq!((s, b.as_slice()), (StatusCode::OK, &b"0123456789"[..]));
        let (s, h, b) = get(router(st.clone()), "/boot/vmlinuz", Some("bytes=2-5")).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert_eq!(b, b"2345");
        assert!(h.get("content-range").is_some());
        for bad in ["/boot/..%2Fsecret", "/boot/.hidden", "/boot/missing"] {
            let (s, _, _) = get(router(st.clone()), bad, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{bad}");
        }
        assert!(events.page(0, 10).iter().any(|e| e.kind == "http.file"));
        let digest = builder::Digest::of(b"blob");
        std::fs::create_dir_all(d.path().join("bundle/blobs/sha256")).unwrap();
        std::fs::write(
            d.path().join("bundle/blobs/sha256").join(digest.hex()),
            b"blob",
        )
        .unwrap();
        let (s, _, b) = get(router(st.clone()), &format!("/boot/blobs/{digest}"), None).await;
        assert_eq!((s, b.as_slice()), (StatusCode::OK, &b"blob"[..]));
        let (s, _, _) = get(router(st), "/boot/blobs/sha256:xyz", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
}
