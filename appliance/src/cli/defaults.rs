//! The one place the CLI's defaults come from: flags, then the environment
//! (`APPLIANCE_URL`, `APPLIANCE_TOKEN`, `APPLIANCE_DATA`, `APPLIANCE_CA`),
//! then the config file (`$XDG_CONFIG_HOME/appliance/config.toml`, else
//! `~/.config/appliance/config.toml`, with keys `url`, `token`, `data`,
//! `ca` — the site CA's PEM file),
//! then the built-in defaults (`http://127.0.0.1:80`, no token,
//! [`crate::contract::DATA_DIR`]).
//!
//! clap reads the flags and the environment (so `--help` names the
//! variables); this module adds the file and the built-in defaults.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The server URL when neither flag, environment nor file names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:80";

/// `config.toml`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    pub data: Option<PathBuf>,
    /// The site CA certificate (PEM file) trusted for https URLs.
    pub ca: Option<PathBuf>,
}

/// Where the config file is (whether or not it exists).
pub fn path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("appliance/config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config/appliance/config.toml"))
}

/// The config file; a missing file is an empty one, a malformed one an error.
pub fn load() -> Result<FileConfig> {
    let Some(p) = path() else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The server URL: `flag_or_env`, else the file's, else [`DEFAULT_URL`].
pub fn url(flag_or_env: Option<&str>) -> Result<String> {
    if let Some(u) = flag_or_env {
        return Ok(u.to_owned());
    }
    Ok(load()?.url.unwrap_or_else(|| DEFAULT_URL.to_owned()))
}

/// The API token: `flag_or_env`, else the file's.
pub fn token(flag_or_env: Option<&str>) -> Result<Option<String>> {
    if let Some(t) = flag_or_env {
        return Ok(Some(t.to_owned()));
    }
    Ok(load()?.token)
}

/// The data directory: `flag_or_env`, else the file's, else
/// [`crate::contract::DATA_DIR`].
pub fn data(flag_or_env: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = flag_or_env {
        return Ok(d);
    }
    Ok(load()?
        .data
        .unwrap_or_else(|| PathBuf::from(crate::contract::DATA_DIR)))
}

/// The site CA file: `flag_or_env`, else the file's, else none.
pub fn ca(flag_or_env: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if let Some(c) = flag_or_env {
        return Ok(Some(c));
    }
    Ok(load()?.ca)
}
