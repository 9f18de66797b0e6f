//! Unified Kernel Images: systemd's EFI stub with the kernel, initramfs,
//! command line and os-release added as PE sections, plus the small PE32+
//! editor that does it (no crate edits an existing PE in place).
//!
//! Layout of the output, given a stub and sections in the order passed
//! (callers pass `.osrel .cmdline .uname .initrd .linux`, `.linux` last as
//! ukify does):
//!
//! - The stub's bytes up to the end of its last section's raw data are kept.
//!   Anything after that is dropped: a COFF symbol table (then
//!   `PointerToSymbolTable`/`NumberOfSymbols` are zeroed) and an Authenticode
//!   certificate table (then the security data directory is zeroed), since
//!   any change to the image invalidates a signature anyway. Sign the UKI
//!   afterwards if Secure Boot needs it.
//! - New section headers follow the existing ones; they must fit before
//!   `SizeOfHeaders` and before the first section's raw data.
//! - Each new section starts at the next `SectionAlignment` multiple after
//!   the highest existing virtual end (or `SizeOfImage`, if larger), and at
//!   the next `FileAlignment` multiple of the file. `VirtualSize` is the data
//!   length, `SizeOfRawData` that length rounded up to `FileAlignment` (zero
//!   padded). An empty section still reserves one `SectionAlignment` step of
//!   address space so no two sections share an address. Characteristics are
//!   `IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ`.
//! - `NumberOfSections`, `SizeOfImage`, `SizeOfInitializedData` and the PE
//!   checksum are updated. The output is a pure function of the inputs.

/// A section to add to the stub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// At most 8 bytes, e.g. `.linux`.
    pub name: String,
    pub data: Vec<u8>,
}

/// A section as found in a PE image's section table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeSection {
    pub name: String,
    pub virtual_address: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
}

/// Why a UKI could not be assembled or a PE image not parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UkiError {
    #[error("stub is not a PE32+ image: {0}")]
    NotPe32Plus(String),
    #[error("stub is not an x86-64 image: machine type {0:#06x}")]
    WrongMachine(u16),
    #[error("stub is not an EFI application: subsystem {0}")]
    NotEfiApplication(u16),
    #[error("section name {0:?} is empty, longer than 8 bytes or contains NUL")]
    BadSectionName(String),
    #[error("section {0:?} is already present in the stub or given twice")]
    DuplicateSection(String),
    #[error(
        "no room for {count} more section headers in the stub's headers (SizeOfHeaders {size_of_headers})"
    )]
    NoRoomForHeaders { count: usize, size_of_headers: u32 },
    #[error("the UKI would exceed the 4 GiB limit of PE32+ at section {0:?}")]
    TooLarge(String),
}

const IMAGE_FILE_MACHINE_AMD64: u16 = 0x8664;
const PE32PLUS_MAGIC: u16 = 0x20b;
const IMAGE_SUBSYSTEM_EFI_APPLICATION: u16 = 10;
const SCN_INITIALIZED_DATA_READ: u32 = 0x4000_0040;
const SECTION_HEADER_LEN: usize = 40;
const SECURITY_DIRECTORY: usize = 4;

// Offsets inside the optional header (PE32+).
const OPT_SIZE_OF_INITIALIZED_DATA: usize = 8;
const OPT_SECTION_ALIGNMENT: usize = 32;
const OPT_FILE_ALIGNMENT: usize = 36;
const OPT_SIZE_OF_IMAGE: usize = 56;
const OPT_SIZE_OF_HEADERS: usize = 60;
const OPT_CHECKSUM: usize = 64;
const OPT_SUBSYSTEM: usize = 68;
const OPT_NUMBER_OF_RVA_AND_SIZES: usize = 108;
const OPT_DATA_DIRECTORIES: usize = 112;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// The headers of a PE32+ image, located and checked.
struct Pe {
    /// Offset of the COFF file header (just after `PE\0\0`).
    coff: usize,
    /// Offset of the optional header.
    opt: usize,
    /// Offset of the section table.
    sections: usize,
    number_of_sections: usize,
    section_alignment: u32,
    file_alignment: u32,
    size_of_headers: u32,
    number_of_rva_and_sizes: u32,
}

impl Pe {
    fn parse(b: &[u8]) -> Result<Pe, UkiError> {
        let bad = |why: &str| UkiError::NotPe32Plus(why.to_string());
        if b.get(..2) != Some(b"MZ") {
            return Err(bad("no MZ signature"));
        }
        let lfanew = u32_at(b, 0x3c).ok_or_else(|| bad("truncated DOS header"))? as usize;
        if b.get(lfanew..lfanew.saturating_add(4)) != Some(b"PE\0\0") {
            return Err(bad(&format!("no PE signature at offset {lfanew:#x}")));
        }
        let coff = lfanew + 4;
        let trunc = || bad("truncated COFF header");
        let machine = u16_at(b, coff).ok_or_else(trunc)?;
        let number_of_sections = u16_at(b, coff + 2).ok_or_else(trunc)? as usize;
        let size_of_optional = u16_at(b, coff + 16).ok_or_else(trunc)? as usize;
        let opt = coff + 20;
        let magic = u16_at(b, opt).ok_or_else(|| bad("no optional header"))?;
        if magic != PE32PLUS_MAGIC {
            return Err(bad(&format!(
                "optional header magic {magic:#x}, expected {PE32PLUS_MAGIC:#x}"
            )));
        }
        if machine != IMAGE_FILE_MACHINE_AMD64 {
            return Err(UkiError::WrongMachine(machine));
        }
        if size_of_optional < OPT_DATA_DIRECTORIES || b.len() < opt + size_of_optional {
            return Err(bad(&format!(
                "optional header of {size_of_optional} bytes is too short or truncated"
            )));
        }
        let field = |off| u32_at(b, opt + off).expect("inside the checked optional header");
        let subsystem = u16_at(b, opt + OPT_SUBSYSTEM).expect("checked");
        let number_of_rva_and_sizes = field(OPT_NUMBER_OF_RVA_AND_SIZES)
            .min(((size_of_optional - OPT_DATA_DIRECTORIES) / 8) as u32);
        let pe = Pe {
            coff,
            opt,
            sections: opt + size_of_optional,
            number_of_sections,
            section_alignment: field(OPT_SECTION_ALIGNMENT),
            file_alignment: field(OPT_FILE_ALIGNMENT),
            size_of_headers: field(OPT_SIZE_OF_HEADERS),
            number_of_rva_and_sizes,
        };
        if !pe.section_alignment.is_power_of_two() || !pe.file_alignment.is_power_of_two() {
            return Err(bad(&format!(
                "SectionAlignment {:#x} or FileAlignment {:#x} is not a power of two",
                pe.section_alignment, pe.file_alignment
            )));
        }
        if b.len() < pe.sections + number_of_sections * SECTION_HEADER_LEN {
            return Err(bad("section table is truncated"));
        }
        if subsystem != IMAGE_SUBSYSTEM_EFI_APPLICATION {
            return Err(UkiError::NotEfiApplication(subsystem));
        }
        Ok(pe)
    }

    fn section(&self, b: &[u8], i: usize) -> PeSection {
        let h = &b[self.sections + i * SECTION_HEADER_LEN..][..SECTION_HEADER_LEN];
        let name_len = h[..8].iter().position(|&c| c == 0).unwrap_or(8);
        let f = |off| u32_at(h, off).expect("inside the section header");
        PeSection {
            name: String::from_utf8_lossy(&h[..name_len]).into_owned(),
            virtual_size: f(8),
            virtual_address: f(12),
            raw_size: f(16),
            raw_offset: f(20),
        }
    }
}

/// Sections of a PE32+ EFI image, in section table order.
pub fn list_sections(pe: &[u8]) -> Result<Vec<PeSection>, UkiError> {
    let p = Pe::parse(pe)?;
    Ok((0..p.number_of_sections)
        .map(|i| p.section(pe, i))
        .collect())
}

/// The PE checksum of `image`, treating the 4 bytes at `checksum_offset` as
/// zero: the 16-bit words (little-endian, an odd last byte zero-extended)
/// summed with end-around carry, plus the file length.
pub fn pe_checksum(image: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, w) in image.chunks(2).enumerate() {
        let off = i * 2;
        if off >= checksum_offset && off < checksum_offset + 4 {
            continue;
        }
        let word = u16::from_le_bytes([w[0], *w.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
        // Fold often enough that the u64 never overflows on any real input.
        if sum > u64::from(u32::MAX) {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (sum as u32).wrapping_add(image.len() as u32)
}

fn align_up(v: u64, a: u32) -> u64 {
    v.next_multiple_of(u64::from(a))
}

/// Add `sections` to the EFI `stub`, returning the new image (see the
/// module documentation for the layout).
pub fn assemble_uki(stub: &[u8], sections: &[Section]) -> Result<Vec<u8>, UkiError> {
    let pe = Pe::parse(stub)?;
    let existing = list_sections(stub)?;

    for (i, s) in sections.iter().enumerate() {
        if s.name.is_empty() || s.name.len() > 8 || s.name.contains('\0') {
            return Err(UkiError::BadSectionName(s.name.clone()));
        }
        if existing.iter().any(|e| e.name == s.name)
            || sections[..i].iter().any(|o| o.name == s.name)
        {
            return Err(UkiError::DuplicateSection(s.name.clone()));
        }
    }

    // Room for the new headers: before SizeOfHeaders and any section's data.
    let table_end = pe.sections + (pe.number_of_sections + sections.len()) * SECTION_HEADER_LEN;
    let first_raw = existing
        .iter()
        .filter(|s| s.raw_size > 0)
        .map(|s| s.raw_offset as usize)
        .min()
        .unwrap_or(usize::MAX);
    let count = pe.number_of_sections + sections.len();
    if table_end > pe.size_of_headers as usize || table_end > first_raw || count > 0xffff {
        return Err(UkiError::NoRoomForHeaders {
            count: sections.len(),
            size_of_headers: pe.size_of_headers,
        });
    }

    // Where the stub's content ends, in the file and in memory.
    let file_end = existing
        .iter()
        .map(|s| u64::from(s.raw_offset) + u64::from(s.raw_size))
        .chain([u64::from(pe.size_of_headers)])
        .max()
        .unwrap_or(0);
    if file_end > stub.len() as u64 {
        return Err(UkiError::NotPe32Plus(format!(
            "section data runs to offset {file_end}, past the end of the {}-byte file",
            stub.len()
        )));
    }
    let size_of_image = u32_at(stub, pe.opt + OPT_SIZE_OF_IMAGE).expect("checked");
    let virt_end = existing
        .iter()
        .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.raw_size)))
        .chain([u64::from(size_of_image)])
        .max()
        .unwrap_or(0);

    let mut out = stub[..file_end as usize].to_vec();

    // Drop what followed the last section: symbols and any signature.
    let sym_ptr = u32_at(&out, pe.coff + 8).expect("checked");
    if u64::from(sym_ptr) >= file_end || sym_ptr == 0 {
        put_u32(&mut out, pe.coff + 8, 0);
        put_u32(&mut out, pe.coff + 12, 0);
    }
    if pe.number_of_rva_and_sizes as usize > SECURITY_DIRECTORY {
        let dir = pe.opt + OPT_DATA_DIRECTORIES + SECURITY_DIRECTORY * 8;
        out[dir..dir + 8].fill(0);
    }

    let mut va = align_up(virt_end, pe.section_alignment);
    let mut added_init_data: u64 = 0;
    for (i, s) in sections.iter().enumerate() {
        let too_large = || UkiError::TooLarge(s.name.clone());
        let len = s.data.len() as u64;
        let raw_size = align_up(len, pe.file_alignment);
        let raw_offset = if len == 0 {
            0
        } else {
            align_up(out.len() as u64, pe.file_alignment)
        };
        let end_va = va + len.max(1);
        if raw_offset + raw_size > u64::from(u32::MAX) || end_va > u64::from(u32::MAX) {
            return Err(too_large());
        }
        if len > 0 {
            out.resize(raw_offset as usize, 0);
            out.extend_from_slice(&s.data);
            out.resize((raw_offset + raw_size) as usize, 0);
        }

        let h = pe.sections + (pe.number_of_sections + i) * SECTION_HEADER_LEN;
        let header = &mut out[h..h + SECTION_HEADER_LEN];
        header.fill(0);
        header[..s.name.len()].copy_from_slice(s.name.as_bytes());
        put_u32(header, 8, len as u32);
        put_u32(header, 12, va as u32);
        put_u32(header, 16, raw_size as u32);
        put_u32(header, 20, raw_offset as u32);
        put_u32(header, 36, SCN_INITIALIZED_DATA_READ);

        added_init_data += raw_size;
        va = align_up(end_va, pe.section_alignment);
    }

    put_u16(&mut out, pe.coff + 2, count as u16);
    put_u32(&mut out, pe.opt + OPT_SIZE_OF_IMAGE, va as u32);
    let init = u64::from(u32_at(&out, pe.opt + OPT_SIZE_OF_INITIALIZED_DATA).expect("checked"))
        + added_init_data;
    put_u32(
        &mut out,
        pe.opt + OPT_SIZE_OF_INITIALIZED_DATA,
        u32::try_from(init).map_err(|_| UkiError::TooLarge("SizeOfInitializedData".into()))?,
    );
    let ck = pe.opt + OPT_CHECKSUM;
    put_u32(&mut out, ck, 0);
    let sum = pe_checksum(&out, ck);
    put_u32(&mut out, ck, sum);
    Ok(out)
}

/// The offset of the checksum field in a PE32+ image.
pub fn checksum_offset(pe: &[u8]) -> Result<usize, UkiError> {
    Ok(Pe::parse(pe)?.opt + OPT_CHECKSUM)
}

/// An os-release text for the `.osrel` section. Values are written bare
/// when they are plain words and double-quoted (with `\`, `"`, `$` and `` ` ``
/// escaped) otherwise; control characters become spaces.
pub fn osrel(name: &str, version: &str, id: &str) -> String {
    fn quote(v: &str) -> String {
        let v: String = v
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return v;
        }
        let mut q = String::from("\"");
        for c in v.chars() {
            if matches!(c, '\\' | '"' | '$' | '`') {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    }
    format!(
        "NAME={}\nID={}\nVERSION_ID={}\nPRETTY_NAME={}\n",
        quote(name),
        quote(id),
        quote(version),
        quote(&format!("{name} {version}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

    fn real_stub() -> Vec<u8> {
        std::fs::read(STUB).unwrap_or_else(|e| {
            panic!("reading the systemd EFI stub {STUB} (install systemd-boot-efi): {e}")
        })
    }

    fn uki_sections() -> Vec<Section> {
        let fill = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        vec![
            Section {
                name: ".osrel".into(),
                data: osrel("Appliance", "1.0", "appliance").into_bytes(),
            },
            Section {
                name: ".cmdline".into(),
                data: b"console=ttyS0 quiet".to_vec(),
            },
            Section {
                name: ".uname".into(),
                data: b"6.1.0-test-amd64".to_vec(),
            },
            Section {
                name: ".initrd".into(),
                data: fill(3 * 1024 + 5, 1),
            },
            Section {
                name: ".linux".into(),
                data: fill(10 * 1024 * 1024 + 3, 2),
            },
        ]
    }

    /// A minimal PE32+ EFI application: one `.text` section, `headers`
    /// bytes of headers, 0x200 file and 0x1000 section alignment.
    fn tiny_pe(lfanew: usize, headers: u32) -> Vec<u8> {
        let mut b = vec![0u8; headers as usize];
        b[..2].copy_from_slice(b"MZ");
        put_u32(&mut b, 0x3c, lfanew as u32);
        b[lfanew..lfanew + 4].copy_from_slice(b"PE\0\0");
        let coff = lfanew + 4;
        put_u16(&mut b, coff, IMAGE_FILE_MACHINE_AMD64);
        put_u16(&mut b, coff + 2, 1);
        put_u16(&mut b, coff + 16, 240);
        let opt = coff + 20;
        put_u16(&mut b, opt, PE32PLUS_MAGIC);
        put_u32(&mut b, opt + OPT_SECTION_ALIGNMENT, 0x1000);
        put_u32(&mut b, opt + OPT_FILE_ALIGNMENT, 0x200);
        put_u32(&mut b, opt + OPT_SIZE_OF_IMAGE, 0x2000);
        put_u32(&mut b, opt + OPT_SIZE_OF_HEADERS, headers);
        put_u16(&mut b, opt + OPT_SUBSYSTEM, IMAGE_SUBSYSTEM_EFI_APPLICATION);
        put_u32(&mut b, opt + OPT_NUMBER_OF_RVA_AND_SIZES, 16);
        let s = opt + 240;
        b[s..s + 5].copy_from_slice(b".text");
        put_u32(&mut b, s + 8, 0x10);
        put_u32(&mut b, s + 12, 0x1000);
        put_u32(&mut b, s + 16, 0x200);
        put_u32(&mut b, s + 20, headers);
        put_u32(&mut b, s + 36, 0x6000_0020);
        b.resize(headers as usize + 0x200, 0xcc);
        b
    }

    fn check_layout(out: &[u8], sections: &[Section]) -> Vec<PeSection> {
        let pe = Pe::parse(out).unwrap();
        let listed = list_sections(out).unwrap();
        let new = &listed[listed.len() - sections.len()..];
        for (s, p) in sections.iter().zip(new) {
            assert_eq!(p.name, s.name);
            assert_eq!(p.virtual_size as usize, s.data.len());
            assert_eq!(p.virtual_address % pe.section_alignment, 0, "{}", p.name);
            assert_eq!(p.raw_offset % pe.file_alignment, 0, "{}", p.name);
            assert_eq!(p.raw_size % pe.file_alignment, 0, "{}", p.name);
            assert!(p.raw_size as usize >= s.data.len());
            let data = &out[p.raw_offset as usize..][..s.data.len()];
            assert!(data == s.data, "data of {}", p.name);
        }
        // No two sections overlap, in memory or in the file.
        for (i, a) in listed.iter().enumerate() {
            for b in &listed[i + 1..] {
                let a_end = a.virtual_address + a.virtual_size;
                assert!(a_end <= b.virtual_address, "{} overlaps {}", a.name, b.name);
                if a.raw_size > 0 && b.raw_size > 0 {
                    assert!(a.raw_offset + a.raw_size <= b.raw_offset);
                }
            }
        }
        let size_of_image = u32_at(out, pe.opt + OPT_SIZE_OF_IMAGE).unwrap();
        assert_eq!(size_of_image % pe.section_alignment, 0);
        let last = listed.last().unwrap();
        assert!(size_of_image >= last.virtual_address + last.virtual_size);
        let ck = checksum_offset(out).unwrap();
        assert_eq!(u32_at(out, ck).unwrap(), pe_checksum(out, ck));
        listed
    }

    #[test]
    fn real_stub_becomes_a_uki_objdump_understands() {
        let stub = real_stub();
        let sections = uki_sections();
        let out = assemble_uki(&stub, &sections).unwrap();
        let listed = check_layout(&out, &sections);
        let before = list_sections(&stub).unwrap();
        assert_eq!(&listed[..before.len()], &before[..]);
        assert_eq!(listed.len(), before.len() + 5);
        // Nothing after the last section (symbols and signatures are dropped).
        let last = listed.last().unwrap();
        assert_eq!(out.len() as u32, last.raw_offset + last.raw_size);
        let coff = Pe::parse(&out).unwrap().coff;
        assert_ne!(u32_at(&stub, coff + 8).unwrap(), 0, "the stub has symbols");
        assert_eq!(u32_at(&out, coff + 8).unwrap(), 0, "symbol table pointer");
        assert_eq!(u32_at(&out, coff + 12).unwrap(), 0, "number of symbols");
        // Same inputs, same bytes.
        assert!(out == assemble_uki(&stub, &sections).unwrap());

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("uki.efi");
        std::fs::write(&f, &out).unwrap();
        let o = Command::new("objdump")
            .arg("-h")
            .arg(&f)
            .output()
            .unwrap_or_else(|e| panic!("running objdump (install binutils): {e}"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(text.contains("pei-x86-64"), "{text}");
        // Rows look like: "  8 .osrel  000000c2  0000000000019200 ...".
        let rows: Vec<(String, u64)> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 6 && f[0].parse::<u32>().is_ok())
                    .then(|| (f[1].to_string(), u64::from_str_radix(f[2], 16).unwrap()))
            })
            .collect();
        let tail: Vec<(String, u64)> = rows[rows.len() - 5..].to_vec();
        let want: Vec<(String, u64)> = sections
            .iter()
            .map(|s| (s.name.clone(), s.data.len() as u64))
            .collect();
        assert_eq!(tail, want, "{text}");

        // objcopy finds each section's bytes where the headers say.
        for s in &sections {
            let dump = dir.path().join(format!("dump{}", s.name));
            let o = Command::new("objcopy")
                .arg("--dump-section")
                .arg(format!("{}={}", s.name, dump.display()))
                .arg(&f)
                .arg(dir.path().join("copy.efi"))
                .output()
                .unwrap_or_else(|e| panic!("running objcopy (install binutils): {e}"));
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(std::fs::read(&dump).unwrap() == s.data, "{}", s.name);
        }
    }

    #[test]
    fn checksum_matches_the_stub_s_own() {
        // The Debian stub carries a correct checksum: our algorithm agrees.
        let stub = real_stub();
        let ck = checksum_offset(&stub).unwrap();
        assert_eq!(u32_at(&stub, ck).unwrap(), pe_checksum(&stub, ck));
    }

    #[test]
    fn checksum_small_cases() {
        assert_eq!(pe_checksum(&[], 100), 0);
        assert_eq!(pe_checksum(&[1, 2, 3], 100), 0x0201 + 3 + 3);
        // Carries wrap around into the low 16 bits.
        assert_eq!(pe_checksum(&[0xff, 0xff, 0x02, 0x00], 100), 0x0002 + 4);
        // The checksum field itself is skipped.
        assert_eq!(pe_checksum(&[9, 9, 9, 9, 1, 0], 0), 1 + 6);
    }

    #[test]
    fn tiny_pe_layout_and_signature_dropping() {
        let mut pe = tiny_pe(0x40, 0x400);
        // Pretend it is signed: a certificate table after the last section.
        let cert_at = pe.len() as u32;
        pe.extend_from_slice(&[0xaa; 24]);
        let opt = 0x40 + 4 + 20;
        let dir = opt + OPT_DATA_DIRECTORIES + SECURITY_DIRECTORY * 8;
        put_u32(&mut pe, dir, cert_at);
        put_u32(&mut pe, dir + 4, 24);
        let sections = vec![
            Section {
                name: ".cmdline".into(),
                data: b"x".to_vec(),
            },
            Section {
                name: ".empty".into(),
                data: Vec::new(),
            },
            Section {
                name: ".linux".into(),
                data: vec![7; 0x1001],
            },
        ];
        let out = assemble_uki(&pe, &sections).unwrap();
        let listed = check_layout(&out, &sections);
        assert_eq!(u32_at(&out, dir).unwrap(), 0);
        assert_eq!(u32_at(&out, dir + 4).unwrap(), 0);
        assert!(!out.windows(24).any(|w| w == [0xaa; 24]));
        let v: Vec<(u32, u32, u32, u32)> = listed
            .iter()
            .map(|s| (s.virtual_address, s.virtual_size, s.raw_offset, s.raw_size))
            .collect();
        assert_eq!(
            v,
            [
                (0x1000, 0x10, 0x400, 0x200),
                (0x2000, 1, 0x600, 0x200),
                (0x3000, 0, 0, 0),
                (0x4000, 0x1001, 0x800, 0x1200),
            ]
        );
        assert_eq!(u32_at(&out, opt + OPT_SIZE_OF_IMAGE).unwrap(), 0x6000);
        assert_eq!(
            u32_at(&out, opt + OPT_SIZE_OF_INITIALIZED_DATA).unwrap(),
            0x1400
        );
        assert_eq!(u16_at(&out, 0x44 + 2).unwrap(), 4);
        assert_eq!(out.len(), 0x800 + 0x1200);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let ok = tiny_pe(0x40, 0x400);
        let one = |name: &str| {
            vec![Section {
                name: name.into(),
                data: b"x".to_vec(),
            }]
        };
        let e = assemble_uki(b"hello, world", &one(".linux")).unwrap_err();
        assert_eq!(e.to_string(), "stub is not a PE32+ image: no MZ signature");
        assert!(assemble_uki(b"MZ", &one(".linux")).is_err());

        let mut pe32 = ok.clone();
        put_u16(&mut pe32, 0x40 + 24, 0x10b);
        let e = assemble_uki(&pe32, &one(".linux")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("stub is not a PE32+ image: optional header magic 0x10b"),
            "{e}"
        );

        let mut arm = ok.clone();
        put_u16(&mut arm, 0x44, 0xaa64);
        assert_eq!(
            assemble_uki(&arm, &one(".linux")),
            Err(UkiError::WrongMachine(0xaa64))
        );

        let mut app = ok.clone();
        put_u16(&mut app, 0x40 + 24 + OPT_SUBSYSTEM, 3);
        assert_eq!(
            assemble_uki(&app, &one(".linux")),
            Err(UkiError::NotEfiApplication(3))
        );

        let e = assemble_uki(&ok, &one(".toolong9")).unwrap_err();
        assert_eq!(e, UkiError::BadSectionName(".toolong9".into()));
        assert!(matches!(
            assemble_uki(&ok, &one("")),
            Err(UkiError::BadSectionName(_))
        ));
        assert_eq!(
            assemble_uki(&ok, &one(".text")),
            Err(UkiError::DuplicateSection(".text".into()))
        );
        let mut twice = one(".a");
        twice.extend(one(".a"));
        assert_eq!(
            assemble_uki(&ok, &twice),
            Err(UkiError::DuplicateSection(".a".into()))
        );

        // Headers end at 0x200; the table starts at 0x40+24+240 = 0x148 and
        // holds the .text header, leaving room for 3 more (0x170..0x1e8).
        let tight = tiny_pe(0x40, 0x200);
        let names = [".a", ".b", ".c", ".d", ".e"];
        let many: Vec<Section> = names.iter().flat_map(|n| one(n)).collect();
        assert!(assemble_uki(&tight, &many[..3]).is_ok());
        let e = assemble_uki(&tight, &many).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no room for 5 more section headers in the stub's headers (SizeOfHeaders 512)"
        );
    }

    #[test]
    fn osrel_text() {
        assert_eq!(
            osrel("Appliance", "1.0", "appliance"),
            "NAME=Appliance\nID=appliance\nVERSION_ID=1.0\nPRETTY_NAME=\"Appliance 1.0\"\n"
        );
        assert_eq!(
            osrel("My \"OS\"", "2 $x", "my-os"),
            "NAME=\"My \\\"OS\\\"\"\nID=my-os\nVERSION_ID=\"2 \\$x\"\nPRETTY_NAME=\"My \\\"OS\\\" 2 \\$x\"\n"
        );
    }
}
