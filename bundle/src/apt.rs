//! The host's apt sources: which Debian archive and suite to fetch from.
//!
//! Parses both the deb822 `*.sources` format and the one-line `sources.list`
//! format. Parsing is pure (text in, entries out); [`host_sources`] is the thin
//! layer that reads `/etc/apt/sources.list` and `/etc/apt/sources.list.d/`.
//! Only `deb` entries count; `deb-src`, comments, `Enabled: no` stanzas and
//! files with other extensions (such as `.disabled`) are ignored.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One apt source: an archive URI with its suites and components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// The `Signed-By` / `[signed-by=...]` value, if any (a path or inline key).
    pub signed_by: Option<String>,
}

/// What went wrong reading apt sources.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no Debian archive in the apt sources: need a deb entry with component main and a suite without -security, -updates or -backports")]
    NoArchive,
}

/// Parse deb822-style sources (`*.sources` files).
pub fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    // Stanzas are separated by blank lines; comment lines are dropped first
    // so a comment between fields does not split a stanza.
    let mut stanza: Vec<(String, String)> = Vec::new();
    let flush = |stanza: &mut Vec<(String, String)>, out: &mut Vec<SourceEntry>| {
        if let Some(e) = deb822_entry(stanza) {
            out.push(e);
        }
        stanza.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut stanza, &mut out);
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(last) = stanza.last_mut() {
                let cont = line.trim();
                if cont != "." {
                    last.1.push('\n');
                    last.1.push_str(cont);
                }
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            stanza.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    flush(&mut stanza, &mut out);
    out
}

fn deb822_entry(stanza: &[(String, String)]) -> Option<SourceEntry> {
    let get = |k: &str| stanza.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let words = |k: &str| -> Vec<String> {
        get(k)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
        return None;
    }
    if !words("types").iter().any(|t| t == "deb") {
        return None;
    }
    let uri = words("uris").into_iter().next()?;
    let suites = words("suites");
    if suites.is_empty() {
        return None;
    }
    Some(SourceEntry {
        uri,
        suites,
        components: words("components"),
        signed_by: get("signed-by").map(str::to_string),
    })
}

/// Parse one-line style sources (`sources.list`, `*.list`).
pub fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        if !rest.starts_with([' ', '\t']) {
            continue; // deb-src and friends
        }
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            for opt in opts.split_whitespace() {
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_string());
                }
            }
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(SourceEntry {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
            signed_by,
        });
    }
    out
}

/// The main Debian archive: the first entry with component `main` and a
/// suite without a `-security`, `-updates` or `-backports` suffix. Returns
/// the URI (without trailing `/`) and the suite.
pub fn debian_archive(sources: &[SourceEntry]) -> Result<(String, String), AptError> {
    for e in sources {
        if !e.components.iter().any(|c| c == "main") {
            continue;
        }
        for s in &e.suites {
            if ["-security", "-updates", "-backports"]
                .iter()
                .any(|suffix| s.ends_with(suffix))
                || s.contains('/')
            {
                continue;
            }
            return Ok((e.uri.trim_end_matches('/').to_string(), s.clone()));
        }
    }
    Err(AptError::NoArchive)
}

/// Read the apt sources under `etc_apt` (normally `/etc/apt`): first
/// `sources.list`, then `sources.list.d/*.list` and `*.sources` in name order.
pub fn read_sources(etc_apt: &Path) -> Result<Vec<SourceEntry>, AptError> {
    let read = |path: &Path| -> Result<Option<String>, AptError> {
        match fs::read_to_string(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AptError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    };
    let mut out = Vec::new();
    if let Some(t) = read(&etc_apt.join("sources.list"))? {
        out.extend(parse_one_line(&t));
    }
    let dir = etc_apt.join("sources.list.d");
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(AptError::Io { path: dir, source }),
    };
    files.sort();
    for f in files {
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => {
                if let Some(t) = read(&f)? {
                    out.extend(parse_one_line(&t));
                }
            }
            Some("sources") => {
                if let Some(t) = read(&f)? {
                    out.extend(parse_deb822(&t));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The host's apt sources (`/etc/apt`).
pub fn host_sources() -> Result<Vec<SourceEntry>, AptError> {
    read_sources(Path::new("/etc/apt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/src
Suites: bookworm
Components: main

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: trixie
Components: main
";

    #[test]
    fn deb822_stanzas() {
        let e = parse_deb822(DEB822);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].uri, "http://mirror.example/debian");
        assert_eq!(e[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(e[0].components, vec!["main"]);
        assert_eq!(
            e[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert_eq!(e[1].suites, vec!["bookworm-security"]);
        assert_eq!(
            debian_archive(&e).unwrap(),
            ("http://mirror.example/debian".into(), "bookworm".into())
        );
    }

    #[test]
    fn deb822_multiline_signed_by() {
        let text = "Types: deb\nURIs: http://m.example/d/\nSuites: trixie\nComponents: contrib main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n";
        let e = parse_deb822(text);
        assert_eq!(e.len(), 1);
        assert!(e[0].signed_by.as_deref().unwrap().contains("BEGIN PGP"));
        assert_eq!(
            debian_archive(&e).unwrap(),
            ("http://m.example/d".into(), "trixie".into())
        );
    }

    #[test]
    fn one_line_format() {
        let text = "\
# comment
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm-updates main
deb http://a.example/debian-security bookworm-security main contrib # trailing
deb [ signed-by=/k.gpg ] http://a.example/debian/ bookworm main non-free
deb http://other.example/x stable contrib
";
        let e = parse_one_line(text);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(e[0].suites, vec!["bookworm-updates"]);
        assert_eq!(e[1].components, vec!["main", "contrib"]);
        assert_eq!(e[2].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(
            debian_archive(&e).unwrap(),
            ("http://a.example/debian".into(), "bookworm".into())
        );
    }

    #[test]
    fn no_archive_is_an_error() {
        let e = parse_one_line("deb http://a.example/d bookworm-security main\n");
        assert!(matches!(debian_archive(&e), Err(AptError::NoArchive)));
    }

    #[test]
    fn reads_directory_ignoring_disabled_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sources.list.d");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("a.sources"), DEB822).unwrap();
        fs::write(
            d.join("b.list.disabled-by-farm"),
            "deb http://x.example/ y main\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("sources.list"),
            "deb http://first.example/debian bookworm-backports main\n",
        )
        .unwrap();
        let e = read_sources(dir.path()).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].uri, "http://first.example/debian");
        assert_eq!(debian_archive(&e).unwrap().1, "bookworm");
    }

    #[test]
    fn host_sources_parse() {
        // The host must name some Debian archive for builds to work.
        let e = host_sources().unwrap();
        let (uri, suite) = debian_archive(&e).unwrap();
        assert!(uri.starts_with("http"), "{uri}");
        assert!(!suite.is_empty());
    }
}
