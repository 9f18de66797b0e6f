//! Image definitions: the TOML files in `images/` that say what an image
//! holds. Parsing and validation only; [`crate::plan`] turns a definition
//! into bytes.
//!
//! Every error names the file, the line and the field. Unknown keys are
//! errors (a typo must not silently drop a partition). The format is
//! documented in `images/README.md`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::digest::Digest;

/// An image definition, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub image: ImageSection,
    /// Named inputs; files refer to them by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputSpec>,
    pub kernel: Option<KernelSection>,
    pub initramfs: Option<InitramfsSection>,
    pub uki: Option<UkiSection>,
    pub disk: Option<DiskSection>,
    #[serde(default)]
    pub partitions: Vec<PartitionSection>,
    /// A hybrid ISO made from the disk's partitions (`crate::iso9660`).
    pub iso: Option<IsoSection>,
    #[serde(default)]
    pub outputs: OutputsSection,
}

/// `[iso]`: a hybrid ISO 9660 image beside the disk image. The El Torito
/// UEFI image (and the hybrid GPT's ESP) is a FAT image, sized to fit,
/// holding the files of the `esp` partition; each `embed` partition is
/// carried whole (its bytes as in the disk image), as a file and as a
/// partition of the hybrid GPT with the same label.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsoSection {
    /// ISO volume identifier (A-Z 0-9 _); defaults to the image name.
    pub volume_id: Option<String>,
    /// Label of a `fat32` partition.
    pub esp: Spanned<String>,
    #[serde(default)]
    pub embed: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    pub name: String,
    #[serde(default = "default_version")]
    pub version: String,
    /// Timestamp for every file and filesystem, in seconds since the epoch.
    /// `SOURCE_DATE_EPOCH` in the environment overrides it.
    pub epoch: Option<i64>,
}

fn default_version() -> String {
    "0".into()
}

/// Where a named input comes from. The builder itself only reads inputs by
/// digest; `deb`/`file` specs are resolved to digests by the caller (the
/// xtask, through the bundle) before building.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The content digest, when known. For `kind = "tree"` this is the digest
    /// of a tree document (see [`crate::treefile`]).
    pub digest: Option<Digest>,
    #[serde(default)]
    pub kind: InputKind,
    /// A Debian package to take the input from.
    pub deb: Option<String>,
    /// With `deb`: a path (glob `*` allowed in the last component) inside the
    /// package; for trees, a directory prefix.
    pub path: Option<String>,
    /// A file on the build host (imported into the store by the caller).
    pub file: Option<PathBuf>,
    /// Produced by the caller at build time (for example the bundle
    /// snapshot); the text says what it is.
    pub generated: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    #[default]
    Blob,
    Tree,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// Input holding the kernel image (bzImage).
    pub image: Spanned<String>,
    /// Tree input holding `lib/modules/<version>/...`.
    pub modules_from: Option<Spanned<String>>,
    /// Modules to load at boot (names as in `modprobe`); their dependencies
    /// are added and ordered at build time.
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsSection {
    #[serde(default)]
    pub compression: CompressionSpec,
    /// gzip level 0-9.
    pub level: Option<u32>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Prebuilt cpio archives (inputs) appended after ours, e.g. microcode.
    #[serde(default)]
    pub append: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CompressionSpec {
    None,
    #[default]
    Gzip,
}

/// One entry of an archive or filesystem. Exactly one of the content keys
/// (`input`, `text`, `output`, `tree`, `symlink`, `hardlink`, `type`) says
/// what it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: Spanned<String>,
    /// A named blob input.
    pub input: Option<Spanned<String>>,
    /// Inline text content.
    pub text: Option<String>,
    /// A build output: `uki`, `kernel`, `initramfs`, `manifest`, `signature`.
    pub output: Option<Spanned<String>>,
    /// A named tree input, placed under `path` (optionally only its
    /// `subdir`).
    pub tree: Option<Spanned<String>>,
    pub subdir: Option<String>,
    pub symlink: Option<String>,
    pub hardlink: Option<String>,
    /// `dir`, `char`, `block` or `fifo`.
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub mode: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UkiSection {
    /// Input holding systemd's EFI stub (`linuxx64.efi.stub`).
    pub stub: Spanned<String>,
    /// `PRETTY_NAME` for `.osrel`; defaults to the image name and version.
    pub pretty_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub size: Spanned<Size>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSection {
    /// GPT partition name; also how the appliance finds its partitions.
    pub label: Spanned<String>,
    /// `esp`, `linux`, `root-x86-64`, `swap`, `bios-boot` or a GUID.
    #[serde(rename = "type")]
    pub type_: Spanned<String>,
    pub size: Spanned<SizeOrFill>,
    /// `fat32` (FAT16 when small), `ext4` or `none`.
    #[serde(default = "default_fs")]
    pub filesystem: Spanned<String>,
    /// Filesystem label; defaults to the partition label.
    pub fs_label: Option<String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
}

fn default_fs() -> Spanned<String> {
    Spanned::new(0..0, "none".to_string())
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    pub disk: Option<String>,
    pub uki: Option<String>,
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub manifest: Option<String>,
    /// The hybrid ISO (with an `[iso]` section); default `<name>.iso`.
    pub iso: Option<String>,
}

/// A byte size: an integer, or a string with a `KiB`/`MiB`/`GiB`/`TiB` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeOrFill {
    Size(u64),
    Fill,
}

/// Parse `"64MiB"`, `"4 GiB"`, `"512"`, `"1.5GiB"` is refused (whole units only).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. \"64MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?}: use KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for SizeOrFill {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(SizeOrFill::Size(n)),
            Raw::S(s) if s == "fill" => Ok(SizeOrFill::Fill),
            Raw::S(s) => parse_size(&s)
                .map(SizeOrFill::Size)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A definition error, located in its file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {field}: {message}")]
pub struct DefinitionError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// A definition together with its source text, for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: String,
    pub text: String,
}

impl Source {
    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// An error at a span.
    pub fn error(
        &self,
        span: Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> DefinitionError {
        DefinitionError {
            file: self.file.clone(),
            line: self.line_of(span.start),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Read and validate a definition file.
pub fn load(path: &Path) -> Result<(Definition, Source), DefinitionError> {
    let text = std::fs::read_to_string(path).map_err(|e| DefinitionError {
        file: path.display().to_string(),
        line: 0,
        field: "-".into(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&path.display().to_string(), &text)
}

/// Parse and validate definition text. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<(Definition, Source), DefinitionError> {
    let src = Source {
        file: file.to_string(),
        text: text.to_string(),
    };
    let def: Definition = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| src.line_of(s.start)).unwrap_or(0);
        // toml's message is multi-line with a source excerpt; keep the first
        // line of the actual message.
        let msg = e.message().lines().next().unwrap_or("").to_string();
        let field = field_at(text, e.span().map(|s| s.start).unwrap_or(0));
        DefinitionError {
            file: file.to_string(),
            line,
            field,
            message: msg,
        }
    })?;
    validate(&def, &src)?;
    Ok((def, src))
}

/// The dotted key on the line at `offset`, or the enclosing table header,
/// for naming the field of a type error.
fn field_at(text: &str, offset: usize) -> String {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let table = text[..start]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(['[', ']']).to_string());
    match (table, key.is_empty() || key.starts_with('[')) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t,
        (None, false) => key.to_string(),
        (None, true) => "-".into(),
    }
}

const OUTPUT_NAMES: [&str; 5] = ["uki", "kernel", "initramfs", "manifest", "signature"];

fn validate(def: &Definition, src: &Source) -> Result<(), DefinitionError> {
    let check_input =
        |r: &Spanned<String>, field: &str, want: InputKind| -> Result<(), DefinitionError> {
            match def.inputs.get(r.get_ref()) {
                None => Err(src.error(
                    r.span(),
                    field,
                    format!("no input named {:?} in [inputs]", r.get_ref()),
                )),
                Some(i) if i.kind != want => Err(src.error(
                    r.span(),
                    field,
                    format!(
                        "input {:?} is a {:?}, expected a {:?}",
                        r.get_ref(),
                        i.kind,
                        want
                    ),
                )),
                Some(_) => Ok(()),
            }
        };
    for (name, spec) in &def.inputs {
        let sources = [
            spec.digest.is_some(),
            spec.deb.is_some(),
            spec.file.is_some(),
            spec.generated.is_some(),
        ];
        if sources.iter().filter(|&&b| b).count() == 0 {
            let line = text_line_of_key(&src.text, name);
            return Err(DefinitionError {
                file: src.file.clone(),
                line,
                field: format!("inputs.{name}"),
                message: "an input needs `digest`, `deb`, `file` or `generated`".into(),
            });
        }
    }
    if let Some(k) = &def.kernel {
        check_input(&k.image, "kernel.image", InputKind::Blob)?;
        if let Some(m) = &k.modules_from {
            check_input(m, "kernel.modules_from", InputKind::Tree)?;
        } else if !k.modules.is_empty() {
            return Err(src.error(
                k.image.span(),
                "kernel.modules",
                "modules are listed but `modules_from` is not set",
            ));
        }
    }
    if let Some(u) = &def.uki {
        check_input(&u.stub, "uki.stub", InputKind::Blob)?;
        if def.kernel.is_none() {
            return Err(src.error(u.stub.span(), "uki", "a UKI needs a [kernel] section"));
        }
    }
    let check_files = |files: &[FileSpec], field: &str| -> Result<(), DefinitionError> {
        for (i, f) in files.iter().enumerate() {
            let field = format!("{field}[{i}]");
            // A tree may be placed at the root with `path = "."`.
            let tree_at_root = f.tree.is_some() && f.path.get_ref() == ".";
            if !tree_at_root {
                if let Err(e) = crate::tree::normalize_path(f.path.get_ref()) {
                    return Err(src.error(f.path.span(), &format!("{field}.path"), e.to_string()));
                }
            }
            let kinds = [
                f.input.is_some(),
                f.text.is_some(),
                f.output.is_some(),
                f.tree.is_some(),
                f.symlink.is_some(),
                f.hardlink.is_some(),
                f.kind.is_some(),
            ];
            if kinds.iter().filter(|&&b| b).count() != 1 {
                return Err(src.error(
                    f.path.span(),
                    &field,
                    "exactly one of input, text, output, tree, symlink, hardlink or type is required",
                ));
            }
            if let Some(r) = &f.input {
                check_input(r, &format!("{field}.input"), InputKind::Blob)?;
            }
            if let Some(r) = &f.tree {
                check_input(r, &format!("{field}.tree"), InputKind::Tree)?;
            }
            if let Some(o) = &f.output {
                if !OUTPUT_NAMES.contains(&o.get_ref().as_str()) {
                    return Err(src.error(
                        o.span(),
                        &format!("{field}.output"),
                        format!(
                            "unknown output {:?}; expected one of {OUTPUT_NAMES:?}",
                            o.get_ref()
                        ),
                    ));
                }
            }
            if let Some(k) = &f.kind {
                match k.get_ref().as_str() {
                    "dir" | "fifo" => {}
                    "char" | "block" if f.major.is_some() && f.minor.is_some() => {}
                    "char" | "block" => {
                        return Err(src.error(
                            k.span(),
                            &format!("{field}.type"),
                            "device nodes need `major` and `minor`",
                        ))
                    }
                    other => {
                        return Err(src.error(
                            k.span(),
                            &format!("{field}.type"),
                            format!("unknown type {other:?}; expected dir, char, block or fifo"),
                        ))
                    }
                }
            }
            if f.mode.is_some_and(|m| m > 0o7777) {
                return Err(src.error(
                    f.path.span(),
                    &format!("{field}.mode"),
                    "mode has bits outside 0o7777",
                ));
            }
        }
        Ok(())
    };
    if let Some(i) = &def.initramfs {
        check_files(&i.files, "initramfs.files")?;
        for a in &i.append {
            check_input(a, "initramfs.append", InputKind::Blob)?;
        }
        if i.level.is_some_and(|l| l > 9) {
            return Err(src.error(0..0, "initramfs.level", "gzip level must be 0-9"));
        }
    }
    let mut labels = std::collections::BTreeSet::new();
    let mut fills = 0;
    for (i, p) in def.partitions.iter().enumerate() {
        let field = format!("partitions[{i}]");
        check_files(&p.files, &format!("{field}.files"))?;
        if !labels.insert(p.label.get_ref().clone()) {
            return Err(src.error(
                p.label.span(),
                &format!("{field}.label"),
                "two partitions share this label",
            ));
        }
        if crate::gpt::types::by_name(p.type_.get_ref()).is_none()
            && p.type_.get_ref().parse::<crate::gpt::Guid>().is_err()
        {
            return Err(src.error(
                p.type_.span(),
                &format!("{field}.type"),
                format!("unknown partition type {:?}: use esp, linux, root-x86-64, swap, bios-boot or a GUID", p.type_.get_ref()),
            ));
        }
        match p.filesystem.get_ref().as_str() {
            "fat32" | "ext4" => {}
            "none" if p.files.is_empty() => {}
            "none" => {
                return Err(src.error(
                    p.label.span(),
                    &format!("{field}.files"),
                    "files need a filesystem",
                ))
            }
            other => {
                return Err(src.error(
                    p.filesystem.span(),
                    &format!("{field}.filesystem"),
                    format!("unknown filesystem {other:?}: use fat32, ext4 or none"),
                ))
            }
        }
        if *p.size.get_ref() == SizeOrFill::Fill {
            fills += 1;
            if fills > 1 {
                return Err(src.error(
                    p.size.span(),
                    &format!("{field}.size"),
                    "only one partition may fill the rest",
                ));
            }
        }
    }
    if !def.partitions.is_empty() && def.disk.is_none() {
        return Err(src.error(
            def.partitions[0].label.span(),
            "disk",
            "partitions need a [disk] section with a size",
        ));
    }
    if let Some(iso) = &def.iso {
        let part = |r: &Spanned<String>, field: &str| {
            def.partitions
                .iter()
                .find(|p| p.label.get_ref() == r.get_ref())
                .ok_or_else(|| {
                    src.error(
                        r.span(),
                        field,
                        format!("no partition labelled {:?}", r.get_ref()),
                    )
                })
        };
        let esp = part(&iso.esp, "iso.esp")?;
        if esp.filesystem.get_ref() != "fat32" {
            return Err(src.error(
                iso.esp.span(),
                "iso.esp",
                "the ISO's EFI image is made from a fat32 partition's files",
            ));
        }
        for e in &iso.embed {
            part(e, "iso.embed")?;
            if e.get_ref() == iso.esp.get_ref() {
                return Err(src.error(
                    e.span(),
                    "iso.embed",
                    "the esp partition is carried as the EFI image already",
                ));
            }
        }
        if let Some(v) = &iso.volume_id {
            if v.is_empty()
                || v.len() > 32
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(src.error(
                    iso.esp.span(),
                    "iso.volume_id",
                    format!("volume id {v:?}: use 1-32 characters A-Z 0-9 _"),
                ));
            }
        }
    }
    Ok(())
}

fn text_line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map(|i| i + 1)
        .unwrap_or(0)
}

/// The epoch to stamp everything with: `SOURCE_DATE_EPOCH` if set, else the
/// definition's `image.epoch`, else 0.
pub fn epoch(def: &Definition, env: Option<&str>) -> Result<i64, String> {
    match env {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not an integer")),
        None => Ok(def.image.epoch.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r##"
[image]
name = "demo"
epoch = 1700000000

[inputs]
kernel = { digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000" }
stub = { deb = "systemd-boot-efi", path = "usr/lib/systemd/boot/efi/linuxx64.efi.stub" }
mods = { deb = "linux-image-cloud-amd64", path = "lib/modules", kind = "tree" }

[kernel]
image = "kernel"
modules_from = "mods"
modules = ["virtio_net"]
cmdline = "console=ttyS0"

[initramfs]
files = [
  { path = "init", text = "#!/bin/sh\n", mode = 0o755 },
  { path = "dev/console", type = "char", major = 5, minor = 1, mode = 0o600 },
]

[uki]
stub = "stub"

[disk]
size = "1GiB"

[[partitions]]
label = "esp"
type = "esp"
size = "64MiB"
filesystem = "fat32"
files = [{ path = "EFI/BOOT/BOOTX64.EFI", output = "uki" }]

[[partitions]]
label = "data"
type = "linux"
size = "fill"
filesystem = "ext4"
"##;

    #[test]
    fn good_definition_parses() {
        let (d, _) = parse("good.toml", GOOD).unwrap();
        assert_eq!(d.partitions.len(), 2);
        assert_eq!(*d.partitions[0].size.get_ref(), SizeOrFill::Size(64 << 20));
        assert_eq!(*d.partitions[1].size.get_ref(), SizeOrFill::Fill);
        assert_eq!(d.disk.unwrap().size.get_ref().0, 1 << 30);
        assert_eq!(d.inputs["mods"].kind, InputKind::Tree);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4 GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("12XB").is_err());
    }

    fn err(text: &str) -> DefinitionError {
        parse("bad.toml", text).unwrap_err()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err(&GOOD.replace("size = \"64MiB\"", "size = \"64 parsecs\""));
        assert_eq!(e.file, "bad.toml");
        assert_eq!(
            e.line,
            GOOD.lines().position(|l| l.contains("64MiB")).unwrap() + 1,
            "{e}"
        );
        assert!(e.message.contains("parsecs"), "{e}");

        let e = err(&GOOD.replace("image = \"kernel\"", "image = \"kernal\""));
        assert_eq!(e.field, "kernel.image");
        assert!(e.message.contains("no input named \"kernal\""), "{e}");
        assert_eq!(
            e.line,
            GOOD.lines()
                .position(|l| l.contains("image = \"kernel\""))
                .unwrap()
                + 1
        );

        let e = err(&GOOD.replace("filesystem = \"ext4\"", "filesystem = \"btrfs\""));
        assert_eq!(e.field, "partitions[1].filesystem");

        let e = err(&GOOD.replace("label = \"data\"", "label = \"esp\""));
        assert!(e.message.contains("share"), "{e}");

        let e = err(&GOOD.replace("path = \"init\"", "path = \"../init\""));
        assert_eq!(e.field, "initramfs.files[0].path");
        assert!(e.message.contains(".."), "{e}");

        let e = err(&GOOD.replace("size = \"fill\"", "size = \"fill\"\nsizee = 3"));
        assert!(e.message.contains("sizee"), "{e}");
        assert!(e.line > 0);

        let e = err(&GOOD.replace("output = \"uki\"", "output = \"ukii\""));
        assert!(e.message.contains("unknown output"), "{e}");

        let e = err(&GOOD.replace("type = \"esp\"", "type = \"espp\""));
        assert_eq!(e.field, "partitions[0].type");

        let e = err(&GOOD.replace("sha256:0000", "sha256:zz00"));
        assert!(e.message.contains("invalid digest"), "{e}");
        assert_eq!(e.line, 7, "{e}");
    }

    #[test]
    fn epoch_precedence() {
        let (d, _) = parse("good.toml", GOOD).unwrap();
        assert_eq!(epoch(&d, None), Ok(1700000000));
        assert_eq!(epoch(&d, Some("42")), Ok(42));
        assert!(epoch(&d, Some("soon")).is_err());
    }
}
