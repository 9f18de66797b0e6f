//! Sync (issue 8): the shared state (the inventory repository) travels
//! between a child and its parent over the parent's HTTP API, or as one
//! bundle file.
pub mod merge;
