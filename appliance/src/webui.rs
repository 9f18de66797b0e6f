//! The web console: plain ES modules and CSS kept in `appliance/console/`,
//! embedded in the binary with `rust-embed` (also in debug builds), so every
//! copy serves it offline. No build step, no request leaves the appliance.
//!
//! Two public routes, both through the route table:
//! - `GET /` answers `index.html` with `no-cache` and an ETag; the page
//!   names its assets under `/console/<set>/…`.
//! - `GET /console/{set}/{*path}` answers one asset. `<set>` is a digest
//!   of every asset's path and content, so a name under it never changes
//!   meaning: those answers are `immutable` for a year. An old `<set>` is a
//!   404 (the page that named it is stale; reloading `/` fixes it).
//!
//! Compressible assets are gzipped once, when the set is first built
//! (flate2, mtime 0: the same bytes every time) and sent when the client
//! accepts gzip. Every answer carries an ETag (`If-None-Match` gives 304),
//! `nosniff`, and the page a strict Content-Security-Policy (`'self'` only,
//! no inline script, no framing).
//!
//! **Architecture Invariant:** the assets are public and carry no secret:
//! they are the same bytes in every copy of the binary. The console logs in
//! with an API token the operator types, kept in `sessionStorage` (never in
//! a URL, never in a cookie), and calls only the documented REST API.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, OnceLock};

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::api::ApiError;
use crate::http::{Guard, Route};

#[derive(rust_embed::Embed)]
#[folder = "console/"]
struct Embedded;

/// Placeholder in `index.html` for the assets' base path.
const BASE: &str = "%ASSETS%";

/// The page's Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One asset, ready to send.
pub struct Asset {
    pub body: Bytes,
    /// The gzip encoding, when it is smaller.
    pub gzip: Option<Bytes>,
    /// Quoted strong ETag of `body` (`gzip` gets `-gz` appended inside).
    pub etag: String,
    pub content_type: &'static str,
}

/// Every asset of this binary's console.
pub struct Console {
    /// Digest prefix naming the whole set (`/console/<set>/…`).
    pub set: String,
    pub index: Asset,
    pub files: BTreeMap<String, Asset>,
}

/// The content type of an asset by its extension.
pub fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn compressible(ctype: &str) -> bool {
    ctype.starts_with("text/") || ctype == "image/svg+xml" || ctype == "application/json"
}

fn gzip(data: &[u8]) -> Option<Bytes> {
    // GzBuilder writes mtime 0 and no name: the same bytes on every build.
    let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).ok()?;
    let out = enc.finish().ok()?;
    (out.len() < data.len()).then(|| Bytes::from(out))
}

fn asset(path: &str, body: Vec<u8>) -> Asset {
    let content_type = content_type(path);
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&body))[..32]);
    let gzip = if compressible(content_type) {
        gzip(&body)
    } else {
        None
    };
    Asset {
        body: Bytes::from(body),
        gzip,
        etag,
        content_type,
    }
}

impl Console {
    /// The console of this binary (built once).
    pub fn get() -> Arc<Console> {
        static ONE: OnceLock<Arc<Console>> = OnceLock::new();
        ONE.get_or_init(|| Arc::new(Console::build())).clone()
    }

    fn build() -> Console {
        let mut raw: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for path in Embedded::iter() {
            if let Some(f) = Embedded::get(&path) {
                raw.insert(path.into_owned(), f.data.into_owned());
            }
        }
        let mut h = Sha256::new();
        for (p, d) in &raw {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
            h.update(Sha256::digest(d));
        }
        let set = hex::encode(h.finalize())[..16].to_owned();
        let page = raw.remove("index.html").unwrap_or_default();
        let page = String::from_utf8_lossy(&page).replace(BASE, &format!("/console/{set}"));
        let index = asset("index.html", page.into_bytes());
        let files = raw.into_iter().map(|(p, d)| {
            let a = asset(&p, d);
            (p, a)
        });
        Console {
            set,
            index,
            files: files.collect(),
        }
    }

    /// Bytes of every asset, gzipped where that is what a browser gets.
    pub fn transfer_size(&self) -> usize {
        std::iter::once(&self.index)
            .chain(self.files.values())
            .map(|a| a.gzip.as_ref().map_or(a.body.len(), |g| g.len()))
            .sum()
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.trim().split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|q| {
                q.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    == Some(0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// The answer for `a`: the encoding the client takes, its ETag, 304 when
/// the client has it.
fn send(a: &Asset, headers: &HeaderMap, cache: &'static str, page: bool) -> Response {
    let gz = a.gzip.as_ref().filter(|_| accepts_gzip(headers));
    let etag = match gz {
        Some(_) => format!("{}-gz\"", a.etag.trim_end_matches('"')),
        None => a.etag.clone(),
    };
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        });
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match gz {
            Some(g) => g.clone().into_response(),
            None => a.body.clone().into_response(),
        }
    };
    let h = resp.headers_mut();
    let v = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::ETAG, v(&etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if gz.is_some() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if page {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    resp
}

async fn page(headers: HeaderMap) -> Response {
    send(&Console::get().index, &headers, "no-cache", true)
}

async fn file(Path((set, path)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let c = Console::get();
    match c.files.get(&path).filter(|_| set == c.set) {
        Some(a) => send(a, &headers, "public, max-age=31536000, immutable", false),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no console asset {path:?} in set {set:?} (this binary serves set {:?}: reload /)",
                c.set
            ),
        )
        .into_response(),
    }
}

/// `GET /` and `GET /console/{set}/{*path}`, both public.
pub fn routes() -> Vec<Route> {
    vec![
        Route::get(
            "/",
            Guard::Public,
            "The web console (public HTML; it logs in with an API token)",
        )
        .response("text")
        .to(page, ()),
        Route::get(
            "/console/{set}/{*path}",
            Guard::Public,
            "A web console asset (immutable under its set digest)",
        )
        .response("binary")
        .to(file, ()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(uri: &str, hdrs: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let app = crate::http::build(routes(), crate::http::Auth::new(None, false));
        let mut r = Request::get(uri);
        for (k, v) in hdrs {
            r = r.header(*k, *v);
        }
        let resp = app.oneshot(r.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (parts.status, parts.headers, body)
    }

    #[tokio::test]
    async fn the_page_names_its_assets_under_the_set_and_they_are_served_with_their_types() {
        let c = Console::get();
        let (st, h, body) = get("/", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        let page = String::from_utf8(body).unwrap();
        assert!(!page.contains(BASE), "placeholder left in the page");
        let base = format!("/console/{}/", c.set);
        assert!(page.contains(&format!("{base}app.js")), "{page}");
        assert!(page.contains(&format!("{base}style.css")), "{page}");
        for (name, ctype) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
        ] {
            let (st, h, body) = get(&format!("{base}{name}"), &[]).await;
            assert_eq!(st, StatusCode::OK, "{name}");
            assert_eq!(h[header::CONTENT_TYPE], ctype);
            assert_eq!(
                h[header::CACHE_CONTROL],
                "public, max-age=31536000, immutable"
            );
            assert_eq!(body, c.files[name].body.to_vec());
        }
    }

    #[tokio::test]
    async fn gzip_is_sent_only_when_accepted_and_decodes_to_the_asset() {
        let c = Console::get();
        let uri = format!("/console/{}/app.js", c.set);
        let (_, h, plain) = get(&uri, &[("accept-encoding", "identity")]).await;
        assert!(h.get(header::CONTENT_ENCODING).is_none());
        let (_, h, gz) = get(&uri, &[("accept-encoding", "br, gzip")]).await;
        assert_eq!(h[header::CONTENT_ENCODING], "gzip");
        assert_eq!(h[header::VARY], "Accept-Encoding");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(gz.len() < plain.len());
        let (_, h, _) = get(&uri, &[("accept-encoding", "gzip;q=0")]).await;
        assert!(
            h.get(header::CONTENT_ENCODING).is_none(),
            "q=0 refuses gzip"
        );
        // Two builds of the set give the same bytes.
        assert_eq!(
            Console::build().files["app.js"].gzip,
            c.files["app.js"].gzip
        );
    }

    #[tokio::test]
    async fn a_known_etag_gets_304_and_a_stale_set_gets_404() {
        let c = Console::get();
        let (_, h, _) = get("/", &[]).await;
        let etag = h[header::ETAG].to_str().unwrap().to_owned();
        let (st, _, body) = get("/", &[("if-none-match", &etag)]).await;
        assert_eq!(st, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        let (st, _, _) = get("/", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, body) = get("/console/0000000000000000/app.js", &[]).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains(&c.set));
        let (st, _, _) = get(&format!("/console/{}/nope.js", c.set), &[]).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }

    #[test]
    fn assets_stay_small_and_carry_no_token_or_outside_address() {
        let c = Console::get();
        assert!(
            c.transfer_size() < 200 * 1024,
            "console is {} bytes compressed",
            c.transfer_size()
        );
        for (p, a) in std::iter::once(("index.html", &c.index))
            .chain(c.files.iter().map(|(p, a)| (p.as_str(), a)))
        {
            // An SVG's namespace is a name, not an address anything fetches.
            let text = String::from_utf8_lossy(&a.body)
                .replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("apl_"), "{p} holds something token-like");
            for outside in ["http://", "https://", "//cdn", "@import url("] {
                assert!(
                    !text.contains(outside),
                    "{p} names an outside address ({outside})"
                );
            }
            assert!(
                !text.contains("localStorage"),
                "{p}: tokens stay in sessionStorage"
            );
        }
    }
}
