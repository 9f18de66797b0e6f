//! The client half of `inventory::upload`: copy a blob to a local temporary
//! file while hashing it, then send it to the server in pieces, asking the
//! server where it stands after any failure and going on from there.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Context, Result};

use super::client::{ApiFailure, Client};

/// Bytes sent per request: a dropped connection costs at most this much.
const PIECE: u64 = 32 << 20;
/// Failed pieces retried (after asking the server its offset) before giving up.
const RETRIES: u32 = 5;

/// Uploads what `input` reads (`what` names it in errors); returns
/// `sha256:<hex>` once the server has verified and stored it.
pub fn upload_blob(c: &Client, input: &mut dyn Read, what: &str) -> Result<String> {
    let mut tmp = tempfile::tempfile().context("creating a temporary file")?;
    let (hex, size) =
        crate::inventory::import::copy_hashing(input, &mut tmp, what, "a temporary file")?;
    send(c, &mut tmp, &hex, size).with_context(|| format!("uploading {what} (sha256:{hex})"))?;
    Ok(format!("sha256:{hex}"))
}

/// Where the server stands: `None` when it holds the whole blob.
fn server_offset(c: &Client, hex: &str) -> Result<Option<u64>> {
    let v = c.json("GET", &format!("/api/v1/uploads/sha256/{hex}"), None)?;
    if v["state"] == "present" {
        return Ok(None);
    }
    Ok(Some(
        v["offset"]
            .as_u64()
            .context("the server's answer has no offset")?,
    ))
}

fn send(c: &Client, file: &mut std::fs::File, hex: &str, size: u64) -> Result<()> {
    let mut failures = 0;
    let Some(mut offset) = server_offset(c, hex)? else {
        return Ok(());
    };
    loop {
        if offset > size {
            bail!("the server holds {offset} bytes of a {size}-byte blob");
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut piece = (&mut *file).take(PIECE.min(size - offset));
        let path = format!("/api/v1/uploads/sha256/{hex}?offset={offset}&size={size}");
        let sent = c
            .stream(
                "PUT",
                &path,
                Some((
                    ureq::SendBody::from_reader(&mut piece),
                    "application/octet-stream",
                )),
            )
            .and_then(|(_, mut r)| {
                let mut body = Vec::new();
                r.read_to_end(&mut body)
                    .context("reading the server's answer")?;
                Ok(body)
            });
        match sent {
            Ok(body) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&body).context("reading the server's answer")?;
                if v["state"] == "present" {
                    return Ok(());
                }
                offset = v["offset"]
                    .as_u64()
                    .context("the server's answer has no offset")?;
            }
            // Verification failed, or we may not upload: retrying cannot help.
            Err(e)
                if e.downcast_ref::<ApiFailure>().is_some_and(|f| {
                    f.code != "upload_offset"
                        && f.code != "upload_interrupted"
                        && f.code != "upload_in_progress"
                }) =>
            {
                return Err(e)
            }
            Err(e) => {
                failures += 1;
                if failures > RETRIES {
                    return Err(e.context(format!("giving up after {RETRIES} retries")));
                }
                eprintln!("upload interrupted at byte {offset} ({e:#}); resuming");
                std::thread::sleep(std::time::Duration::from_millis(500 * u64::from(failures)));
                match server_offset(c, hex)? {
                    None => return Ok(()),
                    Some(o) => offset = o,
                }
            }
        }
    }
}
