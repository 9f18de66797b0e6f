//! A minimal HTTP/1.0 client over `TcpStream`, enough to query a booted
//! appliance's API in tests without pulling an HTTP stack into the harness.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Send one request to `127.0.0.1:port` and read the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    request_with_token(port, method, path, body, None)
}

/// [`request`] with an `Authorization: Bearer` token.
pub fn request_with_token(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<Response> {
    request_within(port, method, path, body, token, Duration::from_secs(20))
}

/// [`request_with_token`] with each step bounded by `timeout` instead of
/// 20 s: for requests that work for minutes before answering.
pub fn request_within(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: appliance\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(port, &req, timeout)
}

/// A GET that gives up after `timeout`: for polling through QEMU's user
/// networking, which holds a forwarded connection open (retrying the guest
/// with backoff) while nothing listens in the guest yet, so one slow
/// attempt must not hide that the guest has come up since.
pub fn get_within(port: u16, path: &str, timeout: Duration) -> std::io::Result<Response> {
    exchange(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: appliance\r\n\r\n"),
        timeout,
    )
}

/// Send `req` to `127.0.0.1:port` and read the whole response, each step
/// bounded by `timeout`.
fn exchange(port: u16, req: &str, timeout: Duration) -> std::io::Result<Response> {
    let mut s =
        TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(&raw)
}

/// Status and body of a raw HTTP response.
fn parse(raw: &[u8]) -> std::io::Result<Response> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Response { status, body })
}

pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    request(port, "GET", path, None)
}

pub fn post(port: u16, path: &str, body: &str) -> std::io::Result<Response> {
    request(port, "POST", path, Some(body))
}

pub fn post_auth(port: u16, path: &str, body: &str, token: &str) -> std::io::Result<Response> {
    request_with_token(port, "POST", path, Some(body), Some(token))
}
