//! Block device ioctls the writer and init need: device size
//! (`BLKGETSIZE64`), dropping a device's buffer cache (`BLKFLSBUF`),
//! re-reading its partition table (`BLKRRPART`) and growing a mounted ext4
//! filesystem (`EXT4_IOC_RESIZE_FS`).

// ioctl(2) has no safe wrapper in rustix for these requests; each call
// below passes the argument type the kernel's definition of the request
// expects, which is what makes it sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;

use rustix::ioctl::{ioctl, opcode, Getter, NoArg, Opcode, Setter};

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: Opcode = opcode::read::<u64>(0x12, 114);
/// `_IO(0x12, 97)`.
const BLKFLSBUF: Opcode = opcode::none(0x12, 97);
/// `_IO(0x12, 95)`.
const BLKRRPART: Opcode = opcode::none(0x12, 95);
/// `_IO(0x12, 127)`.
const BLKZEROOUT: Opcode = opcode::none(0x12, 127);
/// `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: Opcode = opcode::write::<u64>(b'f', 16);

/// Whether `file` is a block device.
pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Size in bytes: `BLKGETSIZE64` for a block device, else the file length.
pub fn size_of(file: &File) -> io::Result<u64> {
    if !is_block_device(file)? {
        return Ok(file.metadata()?.len());
    }
    // SAFETY: BLKGETSIZE64 writes one u64 through its argument, which is
    // what `Getter<_, u64>` provides.
    let size = unsafe { ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size)
}

/// Writes back and drops the buffer cache of a block device, so the next
/// reads come from the device.
pub fn flush_buffers(file: &File) -> io::Result<()> {
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe { ioctl(file, NoArg::<BLKFLSBUF>::new()) }?;
    Ok(())
}

/// Asks the kernel to re-read a disk's partition table.
pub fn reread_partitions(file: &File) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument.
    unsafe { ioctl(file, NoArg::<BLKRRPART>::new()) }?;
    Ok(())
}

/// Zeroes `len` bytes of a block device at `offset` (both multiples of
/// 512); the kernel uses the device's write-zeroes support when it has it.
pub fn zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: BLKZEROOUT reads a `uint64_t[2]` (start, length) through its
    // argument, which `Setter<_, [u64; 2]>` points at.
    unsafe { ioctl(file, Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len])) }?;
    Ok(())
}

/// Grows the mounted ext4 filesystem that `dir` (any open file or
/// directory on it) belongs to, to `blocks` filesystem blocks: the
/// kernel's online resize, what `resize2fs` does for a mounted filesystem.
pub fn ext4_resize(dir: &File, blocks: u64) -> io::Result<()> {
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count)
    // through its argument, which `Setter<_, u64>` points at.
    unsafe { ioctl(dir, Setter::<EXT4_IOC_RESIZE_FS, u64>::new(blocks)) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_kernel_headers() {
        // Values from <linux/fs.h> and <linux/ext4.h> on x86-64.
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
        assert_eq!(BLKFLSBUF as u64, 0x1261);
        assert_eq!(BLKRRPART as u64, 0x125f);
        assert_eq!(BLKZEROOUT as u64, 0x127f);
        assert_eq!(EXT4_IOC_RESIZE_FS as u64, 0x4008_6610);
    }

    #[test]
    fn a_regular_file_reports_its_length() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(12345).unwrap();
        assert!(!is_block_device(&f).unwrap());
        assert_eq!(size_of(&f).unwrap(), 12345);
    }
}
