//! The image builder: turns an image definition plus content-addressed inputs
//! into a GPT disk image, a UKI, an initramfs and PXE artifacts, with no root,
//! no loop devices and no external programs. Same inputs, same bytes.

mod civil;
pub mod cpio;
pub mod definition;
pub mod digest;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod initramfs;
pub mod iso9660;
pub mod kmod;
pub mod manifest;
pub mod plan;
pub mod signature;
pub mod sink;
pub mod sshsig;
pub mod tree;
pub mod treefile;
pub mod uki;

pub use digest::Digest;
