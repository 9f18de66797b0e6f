//! Install status reported by targets (start, finish, failure), kept as
//! node-local state in `<data>/state/install-status.json` (not in the
//! inventory repository: it changes on every install and is per node).
//!
//! A finish turns the system's netboot flag off in the inventory (Cobbler's
//! `pxe_just_once`), which the API does as a separate commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a target reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Start,
    Finish,
    Failure,
}

/// The install state of one system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Unknown,
    Installing,
    Installed,
    Failed,
}

/// One system's record.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct Record {
    pub state: State,
    pub last_event: Option<Event>,
    /// Unix seconds.
    pub last_event_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Address the last report came from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A row of `appliance status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusRow {
    pub system: String,
    #[serde(flatten)]
    pub record: Record,
    pub netboot: bool,
    /// Installing with no report for longer than the quiet limit.
    pub quiet: bool,
}

/// Status of every system that ever reported, persisted on each event.
pub struct StatusBook {
    path: Option<PathBuf>,
    records: BTreeMap<String, Record>,
}

/// Seconds after which an install with no news is flagged.
pub const QUIET_AFTER_S: i64 = 3600;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl StatusBook {
    /// Loads the book from `path` (missing: empty). `None`: memory only.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let records = match path {
            Some(p) => match std::fs::read(p) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            },
            None => BTreeMap::new(),
        };
        Ok(Self {
            path: path.map(Path::to_owned),
            records,
        })
    }

    pub fn get(&self, system: &str) -> Option<&Record> {
        self.records.get(system)
    }

    pub fn all(&self) -> &BTreeMap<String, Record> {
        &self.records
    }

    /// Records an event at time `at` and persists the book.
    pub fn record(
        &mut self,
        system: &str,
        event: Event,
        at: i64,
        from: &str,
        message: &str,
    ) -> anyhow::Result<Record> {
        let r = self.records.entry(system.to_owned()).or_default();
        r.last_event = Some(event);
        r.last_event_at = Some(at);
        r.from = from.to_owned();
        r.message = message.to_owned();
        match event {
            Event::Start => {
                r.state = State::Installing;
                r.started_at = Some(at);
                r.finished_at = None;
            }
            Event::Finish => {
                r.state = State::Installed;
                r.finished_at = Some(at);
            }
            Event::Failure => {
                r.state = State::Failed;
                r.finished_at = Some(at);
            }
        }
        let out = r.clone();
        self.save()?;
        Ok(out)
    }

    /// Forgets a removed system.
    pub fn forget(&mut self, system: &str) -> anyhow::Result<()> {
        if self.records.remove(system).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(p) = &self.path {
            let bytes = serde_json::to_vec_pretty(&self.records)?;
            super::git::write_atomic(p, &bytes, true)?;
        }
        Ok(())
    }
}

/// Whether a record at time `now` is an install that went quiet.
pub fn is_quiet(r: &Record, now: i64) -> bool {
    r.state == State::Installing && r.last_event_at.is_some_and(|t| now - t > QUIET_AFTER_S)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_move_state_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/install-status.json");
        let mut b = StatusBook::open(Some(&p)).unwrap();
        b.record("web1", Event::Start, 100, "10.0.0.5", "").unwrap();
        assert!(is_quiet(b.get("web1").unwrap(), 100 + QUIET_AFTER_S + 1));
        assert!(!is_quiet(b.get("web1").unwrap(), 200));
        b.record("web1", Event::Finish, 300, "10.0.0.5", "")
            .unwrap();
        let b = StatusBook::open(Some(&p)).unwrap();
        let r = b.get("web1").unwrap();
        assert_eq!(r.state, State::Installed);
        assert_eq!((r.started_at, r.finished_at), (Some(100), Some(300)));
        assert!(!is_quiet(r, 10_000));
    }
}
