//! A tiny W3C WebDriver client for Debian's `chromedriver` driving headless
//! `chromium`: enough to log in to the web console, click, type, read text,
//! run a script and take screenshots. Plain HTTP/1.1 over a loopback
//! `TcpStream`, one request per connection, so the harness keeps its one
//! dependency (serde_json).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Debian's browser and driver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver failure: what was asked and what the driver answered.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err(m: impl Into<String>) -> Error {
    Error(m.into())
}

/// One HTTP exchange with the driver: (status, JSON body).
fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| err(format!("connecting to chromedriver on port {port}: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| err(format!("sending {method} {path}: {e}")))?;
    // chromedriver keeps the connection open even when asked to close it:
    // read the head, then exactly the body it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let complete = |raw: &[u8]| -> Option<usize> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let body = &raw[split + 4..];
        if head.contains("transfer-encoding: chunked") {
            return body.ends_with(b"0\r\n\r\n").then_some(split);
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())?;
        (body.len() >= len).then_some(split)
    };
    let split = loop {
        if let Some(split) = complete(&raw) {
            break split;
        }
        let n = s
            .read(&mut buf)
            .map_err(|e| err(format!("reading the answer to {method} {path}: {e}")))?;
        if n == 0 {
            break raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .ok_or_else(|| err(format!("{method} {path}: no HTTP header in the answer")))?;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut content = raw[split + 4..].to_vec();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err(format!("{method} {path}: bad status line {head:?}")))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        content = dechunk(&content);
    }
    let v = if content.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&content).map_err(|e| {
            err(format!(
                "{method} {path}: answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&content)
            ))
        })?
    };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

/// Decodes standard base64 (screenshots).
pub fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A running chromedriver (killed when dropped).
pub struct Driver {
    child: Child,
    pub port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts `chromedriver` on a free loopback port and waits until it is
    /// ready. Fails (never skips) when Debian's chromium-driver is missing.
    pub fn start() -> Result<Driver> {
        for p in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(p).exists() {
                return Err(err(format!(
                    "{p} is missing: install Debian's chromium and chromium-driver \
                     (xtask/debian-packages.txt; `cargo xtask test` installs them)"
                )));
            }
        }
        let port = crate::free_port();
        let mut child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| err(format!("starting {CHROMEDRIVER}: {e}")))?;
        // It says "ChromeDriver was started successfully" on stdout; then
        // drain stdout in the background so it never blocks.
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
        let d = Driver { child, port };
        let t0 = Instant::now();
        loop {
            if let Ok((200, v)) = call(port, "GET", "/status", None) {
                if v["value"]["ready"] == true {
                    return Ok(d);
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(err("chromedriver did not become ready in 30 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new headless browser with a fresh profile in `profile`.
    pub fn session(&self, profile: &Path, width: u32, height: u32) -> Result<Session> {
        self.new_session(profile, width, height, None)
    }

    /// A headless browser emulating a phone screen of `width`×`height`
    /// CSS pixels (desktop windows stop shrinking at 500 px).
    pub fn phone_session(&self, profile: &Path, width: u32, height: u32) -> Result<Session> {
        let m = json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 1.0, "mobile": true, "touch": true}});
        self.new_session(profile, width.max(500), height, Some(m))
    }

    fn new_session(
        &self,
        profile: &Path,
        width: u32,
        height: u32,
        mobile: Option<Value>,
    ) -> Result<Session> {
        let mut caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--no-default-browser-check",
                    "--disable-extensions", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        if let Some(m) = mobile {
            caps["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["mobileEmulation"] = m;
        }
        let (st, v) = call(self.port, "POST", "/session", Some(&caps))?;
        let id = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| err(format!("new session refused ({st}): {v}")))?
            .to_owned();
        Ok(Session {
            port: self.port,
            id,
        })
    }
}

/// One browser session (closed when dropped).
pub struct Session {
    port: u16,
    id: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = call(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let full = format!("/session/{}{path}", self.id);
        let (st, v) = call(self.port, method, &full, body.as_ref())?;
        if st != 200 {
            return Err(err(format!(
                "{method} {path}: {st} {} {}",
                v["value"]["error"],
                v["value"]["message"].as_str().unwrap_or("")
            )));
        }
        Ok(v["value"].clone())
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({"url": url})))
            .map(|_| ())
    }

    /// Runs `script` (a function body; `arguments` holds `args`).
    pub fn eval(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Runs an async script: the last argument is the callback to call.
    pub fn eval_async(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
    }

    pub fn find(&self, css: &str) -> Result<Element> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(|s| Element(s.to_owned()))
            .ok_or_else(|| err(format!("no element for {css:?}")))
    }

    pub fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until `css` matches an element.
    pub fn wait(&self, css: &str, timeout: Duration) -> Result<Element> {
        let t0 = Instant::now();
        loop {
            match self.find(css) {
                Ok(e) => return Ok(e),
                Err(e) if t0.elapsed() > timeout => {
                    return Err(err(format!(
                        "waited {timeout:?} for {css:?}: {e}; page text: {}",
                        self.page_text().unwrap_or_default()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
    }

    /// Waits until the text of `css` contains `needle`; returns the text.
    pub fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> Result<String> {
        let t0 = Instant::now();
        loop {
            let text = self
                .find(css)
                .and_then(|e| self.text(&e))
                .unwrap_or_default();
            if text.contains(needle) {
                return Ok(text);
            }
            if t0.elapsed() > timeout {
                return Err(err(format!(
                    "waited {timeout:?} for {css:?} to contain {needle:?}; it holds {text:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn click(&self, e: &Element) -> Result<()> {
        self.cmd("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .map(|_| ())
    }

    pub fn clear(&self, e: &Element) -> Result<()> {
        self.cmd("POST", &format!("/element/{}/clear", e.0), Some(json!({})))
            .map(|_| ())
    }

    pub fn type_text(&self, e: &Element, text: &str) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({"text": text})),
        )
        .map(|_| ())
    }

    pub fn text(&self, e: &Element) -> Result<String> {
        self.cmd("GET", &format!("/element/{}/text", e.0), None)
            .map(|v| v.as_str().unwrap_or_default().to_owned())
    }

    pub fn property(&self, e: &Element, name: &str) -> Result<Value> {
        self.cmd("GET", &format!("/element/{}/property/{name}", e.0), None)
    }

    pub fn attribute(&self, e: &Element, name: &str) -> Result<Value> {
        self.cmd("GET", &format!("/element/{}/attribute/{name}", e.0), None)
    }

    /// The visible text of the whole page (for failure messages).
    pub fn page_text(&self) -> Result<String> {
        self.eval("return document.body.innerText;", vec![])
            .map(|v| v.as_str().unwrap_or_default().to_owned())
    }

    pub fn set_size(&self, width: u32, height: u32) -> Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .map(|_| ())
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<PathBuf> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let png = base64(v.as_str().unwrap_or_default());
        if !png.starts_with(b"\x89PNG") {
            return Err(err("the screenshot is not a PNG"));
        }
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| err(format!("creating {}: {e}", d.display())))?;
        }
        std::fs::write(path, png).map_err(|e| err(format!("writing {}: {e}", path.display())))?;
        Ok(path.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_padding_and_all_alphabets() {
        assert_eq!(super::base64("aGVsbG8gd29ybGQ="), b"hello world");
        assert_eq!(super::base64("+/8="), [0xfb, 0xff]);
        assert_eq!(
            super::dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            b"abcde"
        );
    }
}
