//! The release manifest: one JSON document naming every input and output of
//! a build by digest. Field order is fixed by the struct order and maps are
//! sorted, so the same build always serialises to the same bytes; its sha256
//! is the `release` a booted appliance reports.
//!
//! An image cannot contain its own digest: the manifest names every
//! component but not the whole disk image, whose digest goes beside it in
//! `<image>.sha256`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const SCHEMA: &str = "appliance.release.v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub schema: String,
    pub image: ImageInfo,
    /// Version of the builder that produced the bytes (layouts may change
    /// between versions).
    pub builder: String,
    pub epoch: i64,
    /// sha256 of the definition file's bytes.
    pub definition: Digest,
    pub inputs: BTreeMap<String, InputRecord>,
    pub kernel: Option<KernelRecord>,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub disk: Option<DiskRecord>,
    /// The hybrid ISO's layout (its digest, like the disk's, goes beside
    /// it in `<iso>.sha256`: the ISO holds this manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<IsoRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IsoRecord {
    pub file: String,
    pub size: u64,
    pub volume_id: String,
    /// The hybrid GPT's disk GUID.
    pub guid: String,
    /// Every file of the ISO's root directory but the boot catalog.
    pub files: Vec<IsoFileRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IsoFileRecord {
    /// ISO 9660 name (without `;1`).
    pub name: String,
    pub offset: u64,
    pub size: u64,
    /// The hybrid GPT partition that is this file, by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// The El Torito UEFI boot image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub efi_boot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputRecord {
    pub digest: Digest,
    pub size: u64,
    pub kind: String,
    /// Where it came from, e.g. `deb:linux-image-6.1.0-28-cloud-amd64=6.1.119-1:boot/vmlinuz-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelRecord {
    pub release: Option<String>,
    pub cmdline: String,
    /// Modules loaded at boot, in order.
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputRecord {
    pub file: String,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub file: String,
    pub size: u64,
    pub guid: String,
    pub partitions: Vec<PartitionRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRecord {
    pub label: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    pub filesystem: String,
    /// Filesystem UUID (ext4) or volume id (FAT), derived from the build.
    pub fs_id: String,
}

impl Manifest {
    /// Canonical bytes: pretty JSON with a trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifests always serialise");
        v.push(b'\n');
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Manifest, serde_json::Error> {
        serde_json::from_slice(b)
    }
}
