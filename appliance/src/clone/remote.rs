//! The agent's view of the appliance's chunk store, over HTTP
//! (`/api/v1/clone/…`, bearer = the job's token):
//! - `GET  chunks` → `{"chunks":[{"digest","blob","stored"}]}`, fetched
//!   once per capture, so presence checks cost no round trip;
//! - `PUT  chunks/<raw hex>` with the zstd frame → `{"blob","stored"}`
//!   (the server decompresses and checks the digest; idempotent);
//! - `GET  blobs/<hex>` → a stored frame (chunks and manifests).
//!
//! Every request is retried with backoff on connection errors and 5xx,
//! so a capture or deploy rides out a server restart.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::deploy::BlobFetch;
use super::store::{hex_of, sha256, ChunkStore};

/// One known chunk, as `GET /api/v1/clone/chunks` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownChunk {
    pub digest: String,
    pub blob: String,
    pub stored: u64,
}

/// The appliance's store seen from an agent.
pub struct HttpStore {
    base: String,
    token: String,
    agent: ureq::Agent,
    known: Mutex<HashMap<String, (String, u64)>>,
    /// Give up on one request after this long without success.
    pub give_up: Duration,
}

impl HttpStore {
    /// `base`: the server URL; lists the chunks it has (for captures).
    pub fn connect(base: &str, token: &str) -> Result<HttpStore> {
        let s = HttpStore::reader(base, token);
        let mut known = HashMap::new();
        let mut path = format!("chunks?limit={}", crate::http::page::MAX_LIMIT);
        loop {
            let page: crate::http::Paged<KnownChunk> =
                serde_json::from_slice(&s.request("GET", &path, None)?)
                    .context("parsing the server's chunk list")?;
            known.extend(
                page.items
                    .into_iter()
                    .map(|c| (c.digest, (c.blob, c.stored))),
            );
            match page.next {
                Some(after) => {
                    path = format!(
                        "chunks?limit={}&after={after}",
                        crate::http::page::MAX_LIMIT
                    )
                }
                None => break,
            }
        }
        *s.known.lock().unwrap_or_else(|p| p.into_inner()) = known;
        Ok(s)
    }

    /// A store for fetching only (deploys): no chunk list.
    pub fn reader(base: &str, token: &str) -> HttpStore {
        HttpStore {
            base: format!("{}/api/v1/clone", base.trim_end_matches('/')),
            token: token.to_owned(),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(120)))
                .http_status_as_error(false)
                .build()
                .into(),
            known: Mutex::new(HashMap::new()),
            give_up: Duration::from_secs(300),
        }
    }

    /// One request with retries; the body of a 2xx answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>> {
        let url = format!("{}/{path}", self.base);
        let started = Instant::now();
        let mut delay = Duration::from_millis(300);
        loop {
            let auth = format!("Bearer {}", self.token);
            let res = match (method, body) {
                ("GET", _) => self.agent.get(&url).header("authorization", &auth).call(),
                ("PUT", Some(b)) => self
                    .agent
                    .put(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/octet-stream")
                    .send(b),
                (_, b) => self
                    .agent
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .send(b.unwrap_or_default()),
            };
            let why = match res {
                Ok(mut r) if r.status().is_success() => {
                    let mut out = Vec::new();
                    match r.body_mut().as_reader().read_to_end(&mut out) {
                        Ok(_) => return Ok(out),
                        Err(e) => format!("reading the answer: {e}"),
                    }
                }
                Ok(mut r) if r.status().is_client_error() => {
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    bail!("{method} {url}: HTTP {}: {text}", r.status());
                }
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > self.give_up {
                bail!("{method} {url}: {why} (gave up after {:?})", self.give_up);
            }
            tracing::warn!(%url, error = %why, "clone request failed; retrying");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

impl ChunkStore for HttpStore {
    fn lookup(&self, raw: &str) -> Result<Option<(String, u64)>> {
        Ok(self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(raw)
            .cloned())
    }

    fn put(&self, raw: &str, frame: Vec<u8>) -> Result<String> {
        let hex = hex_of(raw)?;
        let answer = self.request("PUT", &format!("chunks/{hex}"), Some(&frame))?;
        let k: KnownChunk = serde_json::from_slice(&answer).context("parsing the upload answer")?;
        if k.blob != sha256(&frame) {
            bail!(
                "the server stored chunk {raw} as {}, not as what was sent",
                k.blob
            );
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(raw.to_owned(), (k.blob.clone(), k.stored));
        Ok(k.blob)
    }

    fn get_blob(&self, blob: &str) -> Result<Vec<u8>> {
        let hex = hex_of(blob)?;
        let bytes = self.request("GET", &format!("blobs/{hex}"), None)?;
        let got = sha256(&bytes);
        if got != blob {
            bail!("blob {blob} arrived as {got}");
        }
        Ok(bytes)
    }
}

/// [`HttpStore`] as a deploy's [`BlobFetch`].
pub struct HttpFetch<'a>(pub &'a HttpStore);

impl BlobFetch for HttpFetch<'_> {
    fn fetch(&mut self, blob: &str) -> Result<Vec<u8>> {
        self.0.get_blob(blob)
    }
}
