//! The bundle: the content-addressed store the appliance carries (an OCI image
//! layout), the Debian archive client that fills it, and native `.deb`
//! extraction, and offline resolution of an image's inputs (`resolve`).

pub mod apt;
pub mod deb;
#[cfg(feature = "archive")]
pub mod debian;
pub mod resolve;
pub mod store;

pub use store::{Descriptor, Store, StoreError};
