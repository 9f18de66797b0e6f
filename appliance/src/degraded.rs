//! Degraded reasons: why the appliance runs with less than it should.
//!
//! Init records its reasons in [`crate::contract::DEGRADED_FILE`], one per
//! line; `serve` merges them with its own when answering `/api/v1/version`.

use std::io::Write;
use std::path::Path;

/// Parses a degraded file: one reason per line, blank lines ignored.
pub fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads a degraded file; a missing file means no reasons.
pub fn read(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Appends one reason (newlines inside it are flattened to spaces).
pub fn append(path: &Path, reason: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", reason.replace(['\n', '\r'], " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/degraded");
        assert!(read(&path).unwrap().is_empty());
        append(&path, "data partition not found").unwrap();
        append(&path, "two\nlines").unwrap();
        assert_eq!(
            read(&path).unwrap(),
            vec![
                "data partition not found".to_owned(),
                "two lines".to_owned()
            ]
        );
    }
}
