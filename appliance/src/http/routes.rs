//! The route table: [`Route`] declares one method on one path with its
//! guard, OpenAPI summary and schemas, body limit and handler; [`build`]
//! makes the router and the OpenAPI document from the whole table.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use super::guard::{check, Auth, Guard};
use crate::api::ApiError;

/// Requests bodies above this are refused unless a route says otherwise.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What the OpenAPI document says of a route.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    pub method: Method,
    pub path: &'static str,
    pub guard: Guard,
    pub summary: &'static str,
    /// Schema name of the request body (`binary` and `text` for raw bodies;
    /// `.` / `[]` for the kind of a `{kind}` route).
    pub request: Option<&'static str>,
    /// Schema name of the answer, as for `request`.
    pub response: Option<&'static str>,
    pub body_limit: usize,
    /// `201` instead of `200` on success.
    pub creates: bool,
}

/// One route: its documentation and its handler.
pub struct Route {
    pub doc: RouteDoc,
    handler: Option<MethodRouter>,
}

fn filter(m: &Method) -> MethodFilter {
    match *m {
        Method::GET => MethodFilter::GET,
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::DELETE => MethodFilter::DELETE,
        Method::PATCH => MethodFilter::PATCH,
        _ => MethodFilter::HEAD,
    }
}

impl Route {
    fn new(method: Method, path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Route {
            doc: RouteDoc {
                method,
                path,
                guard,
                summary,
                request: None,
                response: None,
                body_limit: DEFAULT_BODY_LIMIT,
                creates: false,
            },
            handler: None,
        }
    }
    pub fn get(path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Self::new(Method::GET, path, guard, summary)
    }
    pub fn post(path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Self::new(Method::POST, path, guard, summary)
    }
    pub fn put(path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Self::new(Method::PUT, path, guard, summary)
    }
    pub fn delete(path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Self::new(Method::DELETE, path, guard, summary)
    }
    pub fn patch(path: &'static str, guard: Guard, summary: &'static str) -> Self {
        Self::new(Method::PATCH, path, guard, summary)
    }
    pub fn request(mut self, schema: &'static str) -> Self {
        self.doc.request = Some(schema);
        self
    }
    pub fn response(mut self, schema: &'static str) -> Self {
        self.doc.response = Some(schema);
        self
    }
    pub fn creates(mut self) -> Self {
        self.doc.creates = true;
        self
    }
    /// The largest request body this route takes.
    pub fn limit(mut self, bytes: usize) -> Self {
        self.doc.body_limit = bytes;
        self
    }
    /// The handler, with its state.
    pub fn to<H, T, S>(mut self, handler: H, state: S) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
        S: Clone + Send + Sync + 'static,
    {
        self.handler = Some(on(filter(&self.doc.method), handler).with_state(state));
        self
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Counts the answer (guard refusals included) for `/metrics`.
async fn count(
    axum::extract::State(counter): axum::extract::State<Arc<crate::metrics::RouteCounter>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let resp = next.run(req).await;
    counter.count(resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    static UNMATCHED: std::sync::OnceLock<Arc<crate::metrics::RouteCounter>> =
        std::sync::OnceLock::new();
    UNMATCHED
        .get_or_init(|| crate::metrics::http_counter("ANY", "unmatched"))
        .count(404);
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The router for `routes` (plus `GET /api/v1/openapi.json`, generated from
/// them): each route behind its guard and body limit, all traced.
pub fn build(mut routes: Vec<Route>, auth: Arc<Auth>) -> Router {
    routes.push(
        Route::get(
            "/api/v1/openapi.json",
            Guard::Public,
            "This document: every route, its guard and schemas",
        )
        .response("Object"),
    );
    let docs: Vec<RouteDoc> = routes.iter().map(|r| r.doc.clone()).collect();
    let doc = Arc::new(
        serde_json::to_value(super::openapi::document(&docs)).unwrap_or_else(
            |e| serde_json::json!({"error": format!("building the OpenAPI document: {e}")}),
        ),
    );
    let mut by_path: std::collections::BTreeMap<&'static str, MethodRouter> = Default::default();
    for route in routes {
        let RouteDoc {
            method,
            path,
            guard,
            body_limit,
            ..
        } = route.doc;
        let counter = crate::metrics::http_counter(method.as_str(), path);
        let handler = match route.handler {
            Some(h) => h,
            None => {
                let d = doc.clone();
                on(MethodFilter::GET, move || async move {
                    axum::Json((*d).clone())
                })
            }
        };
        let guarded = handler
            .layer(DefaultBodyLimit::max(body_limit))
            .route_layer(axum::middleware::from_fn_with_state(
                (guard, auth.clone()),
                check,
            ))
            .route_layer(axum::middleware::from_fn_with_state(counter, count));
        let merged = match by_path.remove(path) {
            Some(prev) => prev.merge(guarded),
            None => guarded,
        };
        by_path.insert(path, merged);
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods.fallback(method_not_allowed));
    }
    router
        .fallback(not_found)
        .layer(json_compression())
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Which answers [`json_compression`] compresses: `application/json`
/// bodies (the API's objects and lists) only. Blobs, images, boot files
/// and the registry's content are left as they are (they are compressed
/// already, or served with `Range`, or checked by digest byte for byte);
/// event streams and the console's assets too (the assets carry their own
/// gzip).
#[derive(Debug, Clone, Copy)]
pub struct JsonOnly;

impl tower_http::compression::Predicate for JsonOnly {
    fn should_compress<B>(&self, response: &axum::http::Response<B>) -> bool
    where
        B: axum::body::HttpBody,
    {
        let headers = response.headers();
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        json && !headers.contains_key(axum::http::header::CONTENT_RANGE)
    }
}

/// gzip for JSON answers above 1 KiB when the client accepts it (`Accept-
/// Encoding: gzip`; `Vary: Accept-Encoding` is added), applied once here
/// for every route of the table.
pub fn json_compression() -> tower_http::compression::CompressionLayer<
    tower_http::compression::predicate::And<
        tower_http::compression::predicate::SizeAbove,
        JsonOnly,
    >,
> {
    use tower_http::compression::predicate::{Predicate as _, SizeAbove};
    tower_http::compression::CompressionLayer::new()
        .gzip(true)
        .quality(tower_http::CompressionLevel::Fastest)
        .compress_when(SizeAbove::new(1024).and(JsonOnly))
}

/// `routes` with every guard open (unit tests of one module's handlers).
#[cfg(test)]
pub fn unguarded(routes: Vec<Route>) -> Router {
    build(routes, Auth::allow_all())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn guard_runs_before_the_body_is_read_and_errors_are_json() {
        let tokens = Arc::new(crate::auth::TokenStore::memory());
        let op = tokens.create("ops").unwrap().1;
        let auth = Auth::new(Some(tokens), false);
        async fn echo(caller: super::super::Caller, body: axum::body::Bytes) -> String {
            format!("{} {}", caller.name(), body.len())
        }
        let app = build(
            vec![Route::post("/x", Guard::Operator, "x")
                .limit(10)
                .to(echo, ())],
            auth,
        );
        let req = |t: Option<&str>, body: &'static [u8], m: &str| {
            let mut r = Request::builder().method(m).uri("/x");
            if let Some(t) = t {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            r.body(Body::from(body)).unwrap()
        };
        let r = app
            .clone()
            .oneshot(req(None, b"hello", "POST"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = app
            .clone()
            .oneshot(req(Some(&op), b"hello", "POST"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app
            .clone()
            .oneshot(req(Some(&op), b"far too long a body", "POST"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = app.clone().oneshot(req(None, b"", "GET")).await.unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = app
            .clone()
            .oneshot(req(None, b"", "GET").map(|b| b))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = app
            .oneshot(
                Request::get("/api/v1/openapi.json")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn only_json_answers_are_gzipped_and_only_when_asked() {
        let auth = Auth::new(None, true);
        async fn big_json() -> axum::Json<Vec<String>> {
            axum::Json((0..200).map(|i| format!("system-{i}")).collect())
        }
        async fn blob() -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
            (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                vec![0u8; 8192],
            )
        }
        let app = build(
            vec![
                Route::get("/j", Guard::Public, "j").to(big_json, ()),
                Route::get("/b", Guard::Public, "b").to(blob, ()),
            ],
            auth,
        );
        let get = |path: &str, gzip: bool| {
            let mut r = Request::get(path);
            if gzip {
                r = r.header("accept-encoding", "gzip");
            }
            r.body(Body::empty()).unwrap()
        };
        let enc = |r: &axum::http::Response<Body>| {
            r.headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let r = app.clone().oneshot(get("/j", true)).await.unwrap();
        assert_eq!(enc(&r).as_deref(), Some("gzip"));
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let mut json = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut json)
            .unwrap();
        assert!(json.starts_with("[\"system-0\""), "{json}");
        let r = app.clone().oneshot(get("/j", false)).await.unwrap();
        assert_eq!(enc(&r), None, "not asked");
        let r = app.oneshot(get("/b", true)).await.unwrap();
        assert_eq!(enc(&r), None, "blobs stay as they are");
    }
}
