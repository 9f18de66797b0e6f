//! The build: a validated definition plus resolved inputs in, every output
//! (disk image, UKI, kernel, initramfs, manifest) out.
//!
//! Order of work: resolve inputs → pick kernel modules → initramfs → UKI →
//! disk layout → manifest → partitions and GPT → disk digest. Everything is
//! written into a temporary directory beside the outputs and renamed into
//! place only when complete, so a failed build leaves nothing behind.
//! Outputs are not fsynced: a build is re-runnable and its outputs are
//! verified by digest wherever they are used; the writers that put an image
//! on a real disk (install, flash) sync and verify.
//! Identifiers (disk and partition GUIDs, filesystem UUIDs, the ext4 hash
//! seed, the FAT volume id) derive from a seed that hashes the definition,
//! every input digest and the epoch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::definition::{CompressionSpec, Definition, FileSpec, InputKind, SizeOrFill, Source};
use crate::digest::Digest;
use crate::gpt::{self, Guid};
use crate::iso9660::{self, IsoData, IsoFile, IsoOptions};
use crate::manifest::{
    self, DiskRecord, InputRecord, IsoFileRecord, IsoRecord, KernelRecord, Manifest, OutputRecord,
    PartitionRecord,
};
use crate::sink::{Sink, Window};
use crate::tree::{Content, Entry, Meta, Node, Tree};
use crate::treefile::{BlobSource, TreeFile};
use crate::{ext4, fat, initramfs, kmod, uki};

/// An input pinned to a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInput {
    pub digest: Digest,
    /// Where the digest came from (recorded in the manifest).
    pub origin: Option<String>,
}

/// Everything a build needs.
pub struct BuildRequest<'a> {
    pub definition: &'a Definition,
    pub source: &'a Source,
    /// A digest for every input of the definition.
    pub inputs: BTreeMap<String, ResolvedInput>,
    pub blobs: &'a dyn BlobSource,
    pub epoch: i64,
    pub out_dir: &'a Path,
    /// Signs the release manifest: given its bytes, returns the signature
    /// file (`crate::signature`). The result is the `signature` output,
    /// written beside the manifest as `<manifest>.sig`.
    pub sign: Option<&'a Signer<'a>>,
}

/// What [`BuildRequest::sign`] calls with the manifest bytes.
pub type Signer<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + 'a;

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// sha256 of the manifest file: the release id.
    pub release: Digest,
    /// The signature file beside the manifest, when the build was signed.
    pub signature_path: Option<PathBuf>,
    pub disk: Option<(PathBuf, Digest)>,
    /// The hybrid ISO, when the definition has an `[iso]` section.
    pub iso: Option<(PathBuf, Digest)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("input {name:?} has no digest: {why}")]
    Unresolved { name: String, why: String },
    #[error("{context}: {source}")]
    Step {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn step<E: std::error::Error + Send + Sync + 'static>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> BuildError {
    let context = context.into();
    move |e| BuildError::Step {
        context,
        source: Box::new(e),
    }
}

/// Pin every input: digests written in the definition, then `overrides`
/// (what the caller resolved from Debian packages or host files).
pub fn resolve_inputs(
    def: &Definition,
    overrides: &BTreeMap<String, ResolvedInput>,
) -> Result<BTreeMap<String, ResolvedInput>, BuildError> {
    let mut out = BTreeMap::new();
    for (name, spec) in &def.inputs {
        let r = match (overrides.get(name), spec.digest) {
            (Some(r), Some(d)) if r.digest != d => {
                return Err(BuildError::Unresolved {
                    name: name.clone(),
                    why: format!("the definition pins {d} but {} was supplied", r.digest),
                })
            }
            (Some(r), _) => r.clone(),
            (None, Some(d)) => ResolvedInput { digest: d, origin: None },
            (None, None) => {
                return Err(BuildError::Unresolved {
                    name: name.clone(),
                    why: "it names a Debian package or host file; resolve it first (cargo xtask image does) or pin `digest`"
                        .into(),
                })
            }
        };
        out.insert(name.clone(), r);
    }
    if let Some(extra) = overrides.keys().find(|k| !def.inputs.contains_key(*k)) {
        return Err(BuildError::Unresolved {
            name: extra.clone(),
            why: "the definition has no such input".into(),
        });
    }
    Ok(out)
}

/// Build outputs that may be placed as files in partitions.
struct Outputs {
    uki: Option<Vec<u8>>,
    kernel: Option<Content>,
    initramfs: Option<Vec<u8>>,
    manifest: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

/// Run a build.
pub fn build(req: &BuildRequest<'_>) -> Result<BuildResult, BuildError> {
    let def = req.definition;
    let meta_dir = Meta::new(0o755, req.epoch);

    // Inputs.
    let mut records = BTreeMap::new();
    for (name, r) in &req.inputs {
        let spec = &def.inputs[name];
        let c = req
            .blobs
            .blob(&r.digest)
            .map_err(step(format!("input {name:?}")))?;
        let kind = match spec.kind {
            InputKind::Blob => "blob",
            InputKind::Tree => "tree",
        };
        records.insert(
            name.clone(),
            InputRecord {
                digest: r.digest,
                size: c.len(),
                kind: kind.into(),
                origin: r.origin.clone(),
            },
        );
    }
    let definition_digest = Digest::of(req.source.text.as_bytes());
    let builder_version = format!("builder {}", env!("CARGO_PKG_VERSION"));
    let seed = Digest::of(
        &serde_json::to_vec(&(&definition_digest, &records, req.epoch, &builder_version))
            .expect("serialisable"),
    );
    let blob = |name: &str| -> Result<Content, BuildError> {
        let r = &req.inputs[name];
        req.blobs
            .blob(&r.digest)
            .map_err(step(format!("input {name:?}")))
    };
    let tree_doc = |name: &str| -> Result<(Digest, TreeFile), BuildError> {
        let d = req.inputs[name].digest;
        Ok((
            d,
            TreeFile::load(req.blobs, &d).map_err(step(format!("input {name:?}")))?,
        ))
    };

    // Kernel and modules.
    let mut init_tree = Tree::new();
    let mut kernel_record = None;
    let mut kernel_content = None;
    if let Some(k) = &def.kernel {
        kernel_content = Some(blob(k.image.get_ref())?);
        let mut release = None;
        let mut loaded = Vec::new();
        if let Some(m) = &k.modules_from {
            let (_, tf) = tree_doc(m.get_ref())?;
            let (ver, plan) = select_modules(&tf, req.blobs, &k.modules).map_err(|e| {
                BuildError::Invalid(format!("kernel modules from input {:?}: {e}", m.get_ref()))
            })?;
            let order: Vec<&String> = plan.iter().map(|m| &m.path).collect();
            let base = format!("lib/modules/{ver}");
            for p in &order {
                let full = format!("{base}/{p}");
                let e = tf
                    .entries
                    .iter()
                    .find(|e| e.path == full)
                    .expect("selected modules exist");
                let crate::treefile::TreeFileKind::File { digest, .. } = &e.kind else {
                    return Err(BuildError::Invalid(format!(
                        "kernel module {full} is not a regular file"
                    )));
                };
                let c = req
                    .blobs
                    .blob(digest)
                    .map_err(step(format!("kernel module {full}")))?;
                init_tree
                    .insert(
                        &full,
                        Entry {
                            meta: Meta::new(0o644, req.epoch),
                            node: Node::File(c),
                        },
                        meta_dir,
                    )
                    .map_err(step("initramfs"))?;
            }
            // The full closure in load order (for reference, and for an
            // init without plan support) and the load plan PID 1 uses.
            let list: String = order.iter().map(|p| format!("/{base}/{p}\n")).collect();
            for (path, text) in [
                ("etc/appliance/modules.list", list),
                (
                    "etc/appliance/modules.plan",
                    kmod::format_plan(&base, &plan),
                ),
            ] {
                init_tree
                    .insert(
                        path,
                        Entry {
                            meta: Meta::new(0o644, req.epoch),
                            node: Node::File(Content::bytes(text)),
                        },
                        meta_dir,
                    )
                    .map_err(step("initramfs"))?;
            }
            loaded = order.iter().map(|p| kmod::module_name(p)).collect();
            release = Some(ver);
        }
        kernel_record = Some(KernelRecord {
            release,
            cmdline: k.cmdline.clone(),
            modules: loaded,
        });
    }

    // Initramfs.
    let mut outputs = Outputs {
        uki: None,
        kernel: kernel_content.clone(),
        initramfs: None,
        manifest: None,
        signature: None,
    };
    if let Some(i) = &def.initramfs {
        add_files(
            &mut init_tree,
            &i.files,
            "initramfs.files",
            req,
            &outputs,
            meta_dir,
        )?;
        init_tree.validate().map_err(step("initramfs"))?;
        let compression = match i.compression {
            CompressionSpec::None => initramfs::Compression::None,
            CompressionSpec::Gzip => initramfs::Compression::Gzip {
                level: i.level.unwrap_or(6),
            },
        };
        let mut archives = vec![initramfs::Archive::Tree {
            tree: init_tree,
            compression,
        }];
        for a in &i.append {
            archives.push(initramfs::Archive::Prebuilt(blob(a.get_ref())?));
        }
        let mut bytes = Vec::new();
        initramfs::build_initramfs(&archives, &mut bytes)
            .map_err(step("building the initramfs"))?;
        outputs.initramfs = Some(bytes);
    }

    // UKI.
    if let Some(u) = &def.uki {
        let k = def.kernel.as_ref().expect("validated: a UKI has a kernel");
        let stub = blob(u.stub.get_ref())?
            .read_all()
            .map_err(step("reading the EFI stub"))?;
        let mut osrel = uki::osrel(&def.image.name, &def.image.version, &def.image.name);
        if let Some(p) = &u.pretty_name {
            osrel = osrel
                .lines()
                .map(|l| {
                    if l.starts_with("PRETTY_NAME=") {
                        format!("PRETTY_NAME=\"{p}\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
        }
        let mut sections = vec![
            uki::Section {
                name: ".osrel".into(),
                data: osrel.into_bytes(),
            },
            uki::Section {
                name: ".cmdline".into(),
                data: k.cmdline.clone().into_bytes(),
            },
        ];
        if let Some(r) = kernel_record.as_ref().and_then(|r| r.release.clone()) {
            sections.push(uki::Section {
                name: ".uname".into(),
                data: r.into_bytes(),
            });
        }
        if let Some(i) = &outputs.initramfs {
            sections.push(uki::Section {
                name: ".initrd".into(),
                data: i.clone(),
            });
        }
        let kernel = outputs
            .kernel
            .as_ref()
            .expect("a kernel")
            .read_all()
            .map_err(step("reading the kernel"))?;
        sections.push(uki::Section {
            name: ".linux".into(),
            data: kernel,
        });
        outputs.uki =
            Some(uki::assemble_uki(&stub, &sections).map_err(step("assembling the UKI"))?);
    }

    // Disk layout.
    let name = &def.image.name;
    let out_name = |o: &Option<String>, default: String| o.clone().unwrap_or(default);
    let disk_plan = match &def.disk {
        None => None,
        Some(d) => {
            let disk_guid = Guid::derive(&[b"disk", &seed.0]);
            let mut specs = Vec::new();
            for p in &def.partitions {
                let type_guid = gpt::types::by_name(p.type_.get_ref())
                    .or_else(|| p.type_.get_ref().parse().ok())
                    .expect("validated partition type");
                specs.push(gpt::PartitionSpec {
                    label: p.label.get_ref().clone(),
                    type_guid,
                    guid: Guid::derive(&[b"partition", &seed.0, p.label.get_ref().as_bytes()]),
                    size: match p.size.get_ref() {
                        SizeOrFill::Size(n) => gpt::SizeSpec::Bytes(*n),
                        SizeOrFill::Fill => gpt::SizeSpec::Fill,
                    },
                    attributes: 0,
                });
            }
            let layout = gpt::plan(d.size.get_ref().0, disk_guid, specs).map_err(|e| {
                BuildError::Invalid(format!("{}: disk layout: {e}", req.source.file))
            })?;
            Some(layout)
        }
    };
    let fs_ids: Vec<(Guid, u32)> = def
        .partitions
        .iter()
        .map(|p| {
            let g = Guid::derive(&[b"filesystem", &seed.0, p.label.get_ref().as_bytes()]);
            (g, u32::from_le_bytes(g.0[..4].try_into().unwrap()))
        })
        .collect();

    // The ISO's EFI image and layout (before the manifest, which records
    // the layout; so the EFI image cannot hold the manifest itself).
    let iso_plan = match (&def.iso, &disk_plan) {
        (Some(iso), Some(layout)) => Some(plan_iso(
            def, iso, layout, &fs_ids, &seed, req, &outputs, meta_dir,
        )?),
        _ => None,
    };

    // Manifest.
    let mut out_records = BTreeMap::new();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut record =
        |key: &str, file: String, data: &[u8], size: Option<u64>, digest: Option<Digest>| {
            out_records.insert(
                key.to_string(),
                OutputRecord {
                    file,
                    size: size.unwrap_or(data.len() as u64),
                    digest: digest.unwrap_or_else(|| Digest::of(data)),
                },
            );
        };
    if let Some(u) = &outputs.uki {
        let f = out_name(&def.outputs.uki, format!("{name}.efi"));
        record("uki", f.clone(), u, None, None);
        files.push((f, u.clone()));
    }
    if let (Some(k), Some(kr)) = (&outputs.kernel, def.kernel.as_ref()) {
        let f = out_name(&def.outputs.kernel, "vmlinuz".into());
        let r = &req.inputs[kr.image.get_ref()];
        record("kernel", f.clone(), &[], Some(k.len()), Some(r.digest));
        files.push((f, k.read_all().map_err(step("reading the kernel"))?));
    }
    if let Some(i) = &outputs.initramfs {
        let f = out_name(&def.outputs.initramfs, "initrd.img".into());
        record("initramfs", f.clone(), i, None, None);
        files.push((f, i.clone()));
    }
    let disk_file = out_name(&def.outputs.disk, format!("{name}.img"));
    let manifest = Manifest {
        schema: manifest::SCHEMA.into(),
        image: manifest::ImageInfo {
            name: name.clone(),
            version: def.image.version.clone(),
        },
        builder: builder_version,
        epoch: req.epoch,
        definition: definition_digest,
        inputs: records,
        kernel: kernel_record,
        outputs: out_records,
        disk: disk_plan.as_ref().map(|l| DiskRecord {
            file: disk_file.clone(),
            size: l.disk_size,
            guid: l.disk_guid.to_string(),
            partitions: l
                .partitions
                .iter()
                .zip(&def.partitions)
                .zip(&fs_ids)
                .map(|((pl, p), (g, vol))| PartitionRecord {
                    label: pl.spec.label.clone(),
                    type_guid: pl.spec.type_guid.to_string(),
                    guid: pl.spec.guid.to_string(),
                    offset: pl.offset(),
                    size: pl.len(),
                    filesystem: p.filesystem.get_ref().clone(),
                    fs_id: match p.filesystem.get_ref().as_str() {
                        "fat32" => format!("{:04X}-{:04X}", vol >> 16, vol & 0xffff),
                        "ext4" => g.to_string().to_lowercase(),
                        _ => String::new(),
                    },
                })
                .collect(),
        }),
        iso: iso_plan.as_ref().map(|p| p.record.clone()),
    };
    let manifest_bytes = manifest.to_bytes();
    outputs.manifest = Some(manifest_bytes.clone());
    // Sign before the long part, so a refusing signer fails fast.
    if let Some(sign) = req.sign {
        let sig = sign(&manifest_bytes)
            .map_err(|e| BuildError::Invalid(format!("signing the release manifest: {e}")))?;
        outputs.signature = Some(sig);
    }

    // Write everything into a temporary directory, then rename into place.
    std::fs::create_dir_all(req.out_dir)
        .map_err(step(format!("creating {}", req.out_dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(req.out_dir)
        .map_err(step(format!(
            "creating a temporary directory in {}",
            req.out_dir.display()
        )))?;
    let mut disk_digest = None;
    if let Some(layout) = &disk_plan {
        let path = tmp.path().join(&disk_file);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(step(format!("creating {}", path.display())))?;
        f.set_len(layout.disk_size)
            .map_err(step(format!("sizing {}", path.display())))?;
        // The partition table first and the partitions in ascending order,
        // each settled when done, so the disk is hashed while it is
        // written (the hash of its zeros is most of the work).
        let (_, d) = crate::sink::write_hashed(&f, layout.disk_size, |f| {
            gpt::write(layout, f).map_err(step("writing the partition table"))?;
            for ((pl, p), (g, vol)) in layout.partitions.iter().zip(&def.partitions).zip(&fs_ids) {
                let label = p.label.get_ref();
                let field = format!("partition {label:?}");
                let mut tree = Tree::new();
                add_files(&mut tree, &p.files, &field, req, &outputs, meta_dir)?;
                tree.validate().map_err(step(field.clone()))?;
                f.settle(pl.offset());
                let mut window = Window::new(f, pl.offset(), pl.len());
                let fs_label = p.fs_label.clone().unwrap_or_else(|| label.clone());
                match p.filesystem.get_ref().as_str() {
                    "fat32" => {
                        let opts = fat::FatOptions {
                            size: pl.len(),
                            volume_id: *vol,
                            label: fs_label.to_uppercase(),
                            hidden_sectors: (pl.offset() / 512) as u32,
                        };
                        fat::write_fat(&tree, &opts, &mut window).map_err(step(field))?;
                    }
                    "ext4" => {
                        let opts = ext4::Ext4Options {
                            size: pl.len(),
                            uuid: g.0,
                            hash_seed: Guid::derive(&[b"hash-seed", &seed.0, label.as_bytes()]).0,
                            label: fs_label,
                            epoch: req.epoch,
                            reserve_inodes: None,
                        };
                        ext4::write_ext4(&tree, &opts, &mut window).map_err(step(field))?;
                    }
                    _ => {}
                }
                f.settle(pl.offset() + pl.len());
            }
            Ok::<_, BuildError>(())
        })?;
        let d = d.map_err(step(format!("hashing {}", path.display())))?;
        let sum = format!("{}  {disk_file}\n", d.hex());
        std::fs::write(tmp.path().join(format!("{disk_file}.sha256")), sum)
            .map_err(step("writing the disk digest"))?;
        disk_digest = Some(d);
    }
    let mut iso_digest = None;
    if let (Some(p), Some(layout)) = (&iso_plan, &disk_plan) {
        let disk_path = tmp.path().join(&disk_file);
        let disk =
            File::open(&disk_path).map_err(step(format!("opening {}", disk_path.display())))?;
        let mut files = vec![IsoFile {
            name: p.esp_name.clone(),
            data: IsoData::Bytes(p.esp.clone()),
            partition: Some(p.esp_partition.clone()),
            efi_boot: true,
        }];
        for (name, spec) in &p.embed {
            let pl = layout
                .partitions
                .iter()
                .find(|pl| pl.spec.label == spec.label)
                .expect("validated");
            files.push(IsoFile {
                name: name.clone(),
                data: IsoData::Range {
                    file: &disk,
                    offset: pl.offset(),
                    len: pl.len(),
                },
                partition: Some(spec.clone()),
                efi_boot: false,
            });
        }
        let path = tmp.path().join(&p.record.file);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(step(format!("creating {}", path.display())))?;
        f.set_len(p.layout.size)
            .map_err(step(format!("sizing {}", path.display())))?;
        let (_, d) = crate::sink::write_hashed(&f, p.layout.size, |sink| {
            iso9660::write(&p.options, &files, &p.layout, sink)
        })
        .map_err(step(format!("writing {}", path.display())))?;
        let d = d.map_err(step(format!("hashing {}", path.display())))?;
        let sum = format!("{}  {}\n", d.hex(), p.record.file);
        std::fs::write(tmp.path().join(format!("{}.sha256", p.record.file)), sum)
            .map_err(step("writing the ISO digest"))?;
        iso_digest = Some(d);
    }
    let manifest_file = out_name(&def.outputs.manifest, "manifest.json".into());
    let signature_file = format!("{manifest_file}.sig");
    if let Some(sig) = &outputs.signature {
        files.push((signature_file.clone(), sig.clone()));
    }
    files.push((manifest_file.clone(), manifest_bytes.clone()));
    for (f, data) in &files {
        let p = tmp.path().join(f);
        write_file(&p, data).map_err(step(format!("writing {}", p.display())))?;
    }
    // Rename: disk first, manifest last (its presence marks a complete build).
    let mut names: Vec<String> = Vec::new();
    if disk_digest.is_some() {
        names.push(disk_file.clone());
        names.push(format!("{disk_file}.sha256"));
    }
    if let (Some(p), Some(_)) = (&iso_plan, iso_digest) {
        names.push(p.record.file.clone());
        names.push(format!("{}.sha256", p.record.file));
    }
    names.extend(files.iter().map(|(f, _)| f.clone()));
    for n in &names {
        let to = req.out_dir.join(n);
        std::fs::rename(tmp.path().join(n), &to)
            .map_err(step(format!("moving {} into place", to.display())))?;
    }
    Ok(BuildResult {
        release: Digest::of(&manifest_bytes),
        manifest,
        manifest_path: req.out_dir.join(manifest_file),
        signature_path: outputs
            .signature
            .as_ref()
            .map(|_| req.out_dir.join(signature_file)),
        disk: disk_digest.map(|d| (req.out_dir.join(disk_file), d)),
        iso: iso_plan
            .as_ref()
            .zip(iso_digest)
            .map(|(p, d)| (req.out_dir.join(&p.record.file), d)),
    })
}

/// The ISO planned: its EFI image bytes, its layout and its manifest record.
struct IsoPlan {
    options: IsoOptions,
    esp_name: String,
    esp: Vec<u8>,
    esp_partition: gpt::PartitionSpec,
    /// ISO file name and hybrid partition of each embedded partition.
    embed: Vec<(String, gpt::PartitionSpec)>,
    layout: iso9660::IsoLayout,
    record: IsoRecord,
}

/// ISO 9660 name of an embedded partition: its label upper-cased, `-`
/// as `_`, `.IMG`.
fn iso_name(label: &str) -> String {
    let stem: String = label
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .take(26)
        .collect();
    format!("{stem}.IMG")
}

#[allow(clippy::too_many_arguments)]
fn plan_iso(
    def: &Definition,
    iso: &crate::definition::IsoSection,
    layout: &gpt::Layout,
    fs_ids: &[(Guid, u32)],
    seed: &Digest,
    req: &BuildRequest<'_>,
    outputs: &Outputs,
    meta_dir: Meta,
) -> Result<IsoPlan, BuildError> {
    let (i, p) = def
        .partitions
        .iter()
        .enumerate()
        .find(|(_, p)| p.label.get_ref() == iso.esp.get_ref())
        .expect("validated: iso.esp names a partition");
    let mut tree = Tree::new();
    add_files(&mut tree, &p.files, "iso.esp", req, outputs, meta_dir)?;
    tree.validate().map_err(step("iso.esp"))?;
    // Room for the files, their clusters' slack and the FATs.
    let want = tree.file_bytes();
    let size = (want + want / 8 + (2 << 20)).div_ceil(1 << 20) * (1 << 20);
    let mut esp: Vec<u8> = Vec::new();
    let opts = fat::FatOptions {
        size,
        volume_id: fs_ids[i].1,
        label: p
            .fs_label
            .clone()
            .unwrap_or_else(|| p.label.get_ref().clone())
            .to_uppercase(),
        hidden_sectors: 0,
    };
    fat::write_fat(&tree, &opts, &mut esp).map_err(step("iso.esp: the EFI image"))?;
    esp.resize(size as usize, 0);
    let part = |label: &str, type_guid: Guid| gpt::PartitionSpec {
        label: label.to_string(),
        type_guid,
        guid: Guid::derive(&[b"iso-partition", &seed.0, label.as_bytes()]),
        size: gpt::SizeSpec::Fill,
        attributes: 0,
    };
    let esp_partition = part(p.label.get_ref(), gpt::types::ESP);
    let mut embed = Vec::new();
    for e in &iso.embed {
        let pl = layout
            .partitions
            .iter()
            .find(|pl| &pl.spec.label == e.get_ref())
            .expect("validated: iso.embed names partitions");
        embed.push((iso_name(e.get_ref()), part(e.get_ref(), pl.spec.type_guid)));
    }
    let options = IsoOptions {
        volume_id: iso.volume_id.clone().unwrap_or_else(|| {
            iso_name(&def.image.name)
                .trim_end_matches(".IMG")
                .to_string()
        }),
        epoch: req.epoch,
        disk_guid: Guid::derive(&[b"iso-disk", &seed.0]),
    };
    let esp_name = "EFIBOOT.IMG".to_string();
    // Plan with placeholder data of the right lengths.
    let mut files = vec![IsoFile {
        name: esp_name.clone(),
        data: IsoData::Bytes(Vec::new()),
        partition: Some(esp_partition.clone()),
        efi_boot: true,
    }];
    let lens: Vec<u64> = std::iter::once(size)
        .chain(embed.iter().map(|(_, s)| {
            layout
                .partitions
                .iter()
                .find(|pl| pl.spec.label == s.label)
                .map(|pl| pl.len())
                .unwrap_or(0)
        }))
        .collect();
    for (name, spec) in &embed {
        files.push(IsoFile {
            name: name.clone(),
            data: IsoData::Bytes(Vec::new()),
            partition: Some(spec.clone()),
            efi_boot: false,
        });
    }
    let iso_layout = iso9660::plan_lengths(&options, &files, &lens)
        .map_err(|e| BuildError::Invalid(format!("{}: [iso]: {e}", req.source.file)))?;
    let file = def
        .outputs
        .iso
        .clone()
        .unwrap_or_else(|| format!("{}.iso", def.image.name));
    let record = IsoRecord {
        file,
        size: iso_layout.size,
        volume_id: options.volume_id.clone(),
        guid: options.disk_guid.to_string(),
        files: iso_layout
            .files
            .iter()
            .zip(&files)
            .map(|(pf, f)| IsoFileRecord {
                name: pf.name.clone(),
                offset: pf.offset(),
                size: pf.len,
                partition: f.partition.as_ref().map(|s| s.label.clone()),
                efi_boot: f.efi_boot,
            })
            .collect(),
    };
    Ok(IsoPlan {
        options,
        esp_name,
        esp,
        esp_partition,
        embed,
        layout: iso_layout,
        record,
    })
}

fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    File::create(path)?.write_all(data)
}

pub use crate::sink::hash_sparse;

/// The kernel version directory in a tree document and the module load plan.
fn select_modules(
    tf: &TreeFile,
    blobs: &dyn BlobSource,
    wanted: &[String],
) -> Result<(String, Vec<kmod::PlannedModule>), String> {
    let mut versions: Vec<&str> = tf
        .entries
        .iter()
        .filter_map(|e| e.path.strip_prefix("lib/modules/"))
        .filter_map(|r| r.split_once('/').map(|(v, _)| v))
        .collect();
    versions.dedup();
    versions.sort();
    versions.dedup();
    let ver = match versions.as_slice() {
        [v] => v.to_string(),
        [] => return Err("no lib/modules/<version>/ directory".into()),
        many => return Err(format!("several kernel versions: {many:?}")),
    };
    let base = format!("lib/modules/{ver}/");
    let file_digest = |rel: &str| {
        tf.entries
            .iter()
            .find(|e| e.path.strip_prefix(&base) == Some(rel))
            .and_then(|e| match &e.kind {
                crate::treefile::TreeFileKind::File { digest, .. } => Some(*digest),
                _ => None,
            })
    };
    let builtin = match file_digest("modules.builtin") {
        Some(d) => String::from_utf8_lossy(
            &blobs
                .blob(&d)
                .map_err(|e| e.to_string())?
                .read_all()
                .map_err(|e| e.to_string())?,
        )
        .into_owned(),
        None => String::new(),
    };
    let paths: Vec<&str> = tf
        .entries
        .iter()
        .filter_map(|e| e.path.strip_prefix(&base))
        .collect();
    let ix = kmod::ModuleIndex::new(paths, &builtin);
    let plan = ix
        .load_plan(wanted, |rel| {
            let bad = |why: String| kmod::KmodError::BadModule {
                path: rel.to_string(),
                why,
            };
            let d = file_digest(rel).ok_or_else(|| bad("not a regular file".into()))?;
            let mut bytes = Vec::new();
            blobs
                .blob(&d)
                .map_err(|e| bad(e.to_string()))?
                .open()
                .and_then(|mut r| r.read_to_end(&mut bytes))
                .map_err(|e| bad(e.to_string()))?;
            Ok(kmod::parse_modinfo(
                kmod::modinfo_section(&bytes).map_err(bad)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    Ok((ver, plan))
}

/// Add the entries a definition lists to a tree.
fn add_files(
    tree: &mut Tree,
    files: &[FileSpec],
    field: &str,
    req: &BuildRequest<'_>,
    outputs: &Outputs,
    dir_meta: Meta,
) -> Result<(), BuildError> {
    for (i, f) in files.iter().enumerate() {
        let path = f.path.get_ref();
        let at = |msg: String| {
            BuildError::Invalid(format!(
                "{}:{}: {field}[{i}] ({path}): {msg}",
                req.source.file,
                req.source.line_of(f.path.span().start)
            ))
        };
        let meta = |default: u16| Meta {
            mode: f.mode.unwrap_or(default),
            uid: f.uid.unwrap_or(0),
            gid: f.gid.unwrap_or(0),
            mtime: req.epoch,
        };
        let node = if let Some(r) = &f.input {
            let d = req.inputs[r.get_ref()].digest;
            Node::File(req.blobs.blob(&d).map_err(|e| at(e.to_string()))?)
        } else if let Some(t) = &f.text {
            Node::File(Content::bytes(t.as_bytes()))
        } else if let Some(o) = &f.output {
            let c = match o.get_ref().as_str() {
                "uki" => outputs.uki.clone().map(Content::bytes),
                "kernel" => outputs.kernel.clone(),
                "initramfs" => outputs.initramfs.clone().map(Content::bytes),
                "manifest" => outputs.manifest.clone().map(Content::bytes),
                "signature" => outputs.signature.clone().map(Content::bytes),
                _ => None,
            };
            Node::File(c.ok_or_else(|| match o.get_ref().as_str() {
                "signature" => {
                    at("output \"signature\" needs a signed build (a signing key)".into())
                }
                other => at(format!("output {other:?} is not available here")),
            })?)
        } else if let Some(t) = &f.tree {
            let d = req.inputs[t.get_ref()].digest;
            let tf = TreeFile::load(req.blobs, &d).map_err(|e| at(e.to_string()))?;
            let prefix = if path == "." {
                String::new()
            } else {
                let p = crate::tree::normalize_path(path).map_err(|e| at(e.to_string()))?;
                let dir = Entry {
                    meta: meta(0o755),
                    node: Node::Dir,
                };
                tree.insert(&p, dir, dir_meta)
                    .map_err(|e| at(e.to_string()))?;
                p
            };
            tf.add_to(&d, req.blobs, tree, &prefix, f.subdir.as_deref(), dir_meta)
                .map_err(|e| at(e.to_string()))?;
            continue;
        } else if let Some(s) = &f.symlink {
            Node::Symlink(s.clone())
        } else if let Some(h) = &f.hardlink {
            Node::Hardlink(crate::tree::normalize_path(h).map_err(|e| at(e.to_string()))?)
        } else {
            match f.kind.as_ref().map(|k| k.get_ref().as_str()) {
                Some("dir") => Node::Dir,
                Some("fifo") => Node::Fifo,
                Some("char") => Node::CharDevice {
                    major: f.major.unwrap_or(0),
                    minor: f.minor.unwrap_or(0),
                },
                Some("block") => Node::BlockDevice {
                    major: f.major.unwrap_or(0),
                    minor: f.minor.unwrap_or(0),
                },
                _ => return Err(at("no content".into())),
            }
        };
        let default_mode = match node {
            Node::Dir => 0o755,
            Node::Symlink(_) => 0o777,
            Node::CharDevice { .. } | Node::BlockDevice { .. } => 0o600,
            _ => 0o644,
        };
        tree.insert(
            path,
            Entry {
                meta: meta(default_mode),
                node,
            },
            dir_meta,
        )
        .map_err(|e| at(e.to_string()))?;
    }
    Ok(())
}
