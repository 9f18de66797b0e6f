//! The bundle: content-addressed store and release machinery (being written).
