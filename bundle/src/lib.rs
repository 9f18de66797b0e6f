//! The bundle: the content-addressed store the appliance carries (an OCI image
//! layout), the Debian archive client that fills it, and native `.deb`
//! extraction.

pub mod apt;
pub mod deb;
pub mod debian;
pub mod store;

pub use store::{Descriptor, Store, StoreError};
