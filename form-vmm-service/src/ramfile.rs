//! Guest memory files (`*.ram`): a VM's RAM kept in a sparse file, copied into a
//! snapshot and mapped privately by its clones (docs/vmm.md, "Clones whose cost does
//! not grow with memory"). A guest's memory is mostly never written, so these files
//! are mostly holes; both the copy and the digest skip holes, so their cost follows
//! the memory the guest wrote, not its size.
//!
//! The digest of a memory file is SHA-256 over the SHA-256 of each 2 MiB block of its
//! content, in order (the last block may be shorter). It depends on the content only
//! (a hole and a block of written zeros digest alike, so a copy made by a transfer
//! that writes every byte digests as its source), and a block that is a hole is not
//! read: its digest is that of zeros.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Extension of a memory file.
pub const EXT: &str = "ram";
/// Name of a snapshot's memory file (qemu backend), at the top of its directory: the
/// one file of a snapshot that has the block digest.
pub const NAME: &str = "memory.ram";
/// Block of the digest and of the copy.
pub const BLOCK: u64 = 2 << 20;

/// Whether `path` names a memory file (by its extension).
pub fn is_ram(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == EXT)
}

/// Whether `rel`, a path in a snapshot's directory, is its memory file.
pub fn is_snapshot_memory(rel: &Path) -> bool {
    rel == Path::new(NAME)
}

/// Size and digest of the memory file at `path`.
pub fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    walk(&File::open(path)?, &[])
}

/// A new file at `path`, readable and writable by the owner only.
fn create(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Reads every block of `src` that is not a hole, writes it to each of `to` (sized
/// already) at its offset, and returns the size and the digest. The blocks are
/// shared among the host's cores (at most 4 threads): each block's digest stands
/// alone, so the digest does not depend on who read what.
fn walk(src: &File, to: &[&File]) -> std::io::Result<(u64, String)> {
    let size = src.metadata()?.len();
    let count = size.div_ceil(BLOCK) as usize;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
        .min(count.max(1));
    let mut digests = vec![[0u8; 32]; count];
    let chunk = count.div_ceil(threads).max(1);
    std::thread::scope(|scope| -> std::io::Result<()> {
        let mut running = Vec::new();
        for (t, part) in digests.chunks_mut(chunk).enumerate() {
            running.push(scope.spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; BLOCK as usize];
                for (k, d) in part.iter_mut().enumerate() {
                    let off = (t * chunk + k) as u64 * BLOCK;
                    let len = (size - off).min(BLOCK);
                    if is_hole(src, off, len)? {
                        *d = zeros_digest(len);
                        continue;
                    }
                    let b = &mut buf[..len as usize];
                    src.read_exact_at(b, off)?;
                    *d = Sha256::digest(&*b).into();
                    // A block of zeros stays a hole (a copy pulled from another node
                    // has its holes written out).
                    if b.iter().all(|x| *x == 0) {
                        continue;
                    }
                    for dst in to {
                        dst.write_all_at(b, off)?;
                    }
                }
                Ok(())
            }));
        }
        for r in running {
            r.join()
                .map_err(|_| std::io::Error::other("a block reader panicked"))??;
        }
        Ok(())
    })?;
    let mut all = Sha256::new();
    for d in &digests {
        all.update(d);
    }
    Ok((size, hex(&all.finalize())))
}

/// An empty memfd that can be sealed.
fn memfd() -> std::io::Result<File> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(
        "form-snapshot-memory",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    Ok(File::from(fd))
}

/// Seals `memfd` for good: no write, grow or shrink, no new seal.
fn seal(memfd: File) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&memfd, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(memfd.into())
}

/// The memory file `path` loaded into a sealed memfd (no write, grow or shrink, and
/// no new seal, ever): what clones map privately. Its digest, computed as it loads,
/// must be `expect`. A sealed memfd cannot change, so a clone can only see what was
/// checked; QEMU 7.2 punches holes into the file of a private mapping when a balloon
/// inflates (`ram_block_discard_range`), which the seal refuses (the pages stay).
pub fn sealed(path: &Path, expect: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    let memfd = memfd()?;
    let src = File::open(path)?;
    memfd.set_len(src.metadata()?.len())?;
    let (_, got) = walk(&src, &[&memfd])?;
    if got != expect {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("its digest is {got}, the manifest says {expect}"),
        ));
    }
    seal(memfd)
}

/// A snapshot of a running guest's memory file `from`: copied to a new file `to`
/// (readable and writable by the owner only: it is a guest's whole memory; holes stay
/// holes) and, in the same pass, into a sealed memfd for the snapshot's clones, which
/// then need not load it. Returns the memfd, the size and the digest.
pub fn sealed_copy(from: &Path, to: &Path) -> std::io::Result<(std::os::fd::OwnedFd, u64, String)> {
    let (src, dst, memfd) = (File::open(from)?, create(to)?, memfd()?);
    let size = src.metadata()?.len();
    dst.set_len(size)?;
    memfd.set_len(size)?;
    let (size, digest) = walk(&src, &[&dst, &memfd])?;
    Ok((seal(memfd)?, size, digest))
}

/// Whether `len` bytes of `f` from `off` are all a hole.
fn is_hole(f: &File, off: u64, len: u64) -> std::io::Result<bool> {
    use nix::unistd::{Whence, lseek};
    let from = i64::try_from(off).map_err(std::io::Error::other)?;
    match lseek(f, from, Whence::SeekData) {
        Ok(data) => Ok(data as u64 >= off + len),
        // No data at or after `off`.
        Err(nix::errno::Errno::ENXIO) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// SHA-256 of `len` zero bytes (computed once for a whole block).
fn zeros_digest(len: u64) -> [u8; 32] {
    static BLOCK_OF_ZEROS: OnceLock<[u8; 32]> = OnceLock::new();
    let of = |n: u64| -> [u8; 32] { Sha256::digest(vec![0u8; n as usize]).into() };
    if len == BLOCK {
        *BLOCK_OF_ZEROS.get_or_init(|| of(BLOCK))
    } else {
        of(len)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(path: &Path, size: u64, writes: &[(u64, &[u8])]) {
        let f = File::create(path).expect("create");
        f.set_len(size).expect("size");
        for (at, data) in writes {
            f.write_all_at(data, *at).expect("write");
        }
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    #[test]
    fn the_digest_follows_content_not_holes_and_the_copy_keeps_holes() {
        let dir = form_testkit::TestDir::new("ramfile");
        let (a, dense, copied) = (
            dir.path().join("a.ram"),
            dir.path().join("dense.ram"),
            dir.path().join("copy.ram"),
        );
        let size = 64 * BLOCK + 4096 + 17; // a short last block
        let writes: [(u64, &[u8]); 3] = [
            (5, b"guest"),
            (40 * BLOCK + 3, b"memory"),
            (size - 3, b"end"),
        ];
        sparse(&a, size, &writes);
        // The same content with every byte written.
        let mut all = vec![0u8; size as usize];
        for (at, data) in writes {
            all[at as usize..at as usize + data.len()].copy_from_slice(data);
        }
        std::fs::write(&dense, &all).expect("dense");
        let d = digest(&a).expect("digest");
        assert_eq!(d, digest(&dense).expect("digest"), "holes digest as zeros");
        assert_eq!(d.0, size);
        let c = sealed_copy(&a, &copied)
            .map(|(_, n, d)| (n, d))
            .expect("copy");
        assert_eq!(c, d, "the copy's digest, computed as it copied");
        assert_eq!(digest(&copied).expect("digest"), d);
        assert_eq!(std::fs::read(&copied).expect("read"), all);
        assert!(
            allocated(&copied) < 8 * BLOCK,
            "holes stay holes: {} bytes allocated",
            allocated(&copied)
        );
        // One byte changed anywhere changes the digest, in a hole too.
        for at in [5, 20 * BLOCK, size - 1] {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&copied)
                .expect("open");
            let mut was = [0u8; 1];
            File::open(&copied)
                .expect("open")
                .read_exact_at(&mut was, at)
                .expect("read");
            f.write_all_at(&[was[0] ^ 1], at).expect("write");
            assert_ne!(digest(&copied).expect("digest"), d, "byte {at} changed");
            f.write_all_at(&was, at).expect("write back");
        }
        assert!(
            sealed_copy(&a, &copied).is_err(),
            "an existing file is not overwritten"
        );
        // A dense copy (as a transfer writes it) becomes sparse again.
        let again = dir.path().join("again.ram");
        assert_eq!(
            sealed_copy(&dense, &again)
                .map(|(_, n, d)| (n, d))
                .expect("copy"),
            d
        );
        assert!(allocated(&again) < 8 * BLOCK, "zeros are not written");
        assert!(is_ram(&a) && !is_ram(&dir.path().join("memory.bin")));
        assert!(is_snapshot_memory(Path::new("memory.ram")));
        assert!(!is_snapshot_memory(Path::new("workdir/memory.ram")));
    }

    #[test]
    fn a_sealed_copy_is_checked_as_it_loads_and_cannot_change() {
        use nix::fcntl::{FallocateFlags, fallocate};
        let dir = form_testkit::TestDir::new("ramfile-sealed");
        let path = dir.path().join("memory.ram");
        sparse(&path, 8 * BLOCK, &[(BLOCK + 9, b"state")]);
        let (_, d) = digest(&path).expect("digest");
        let fd = sealed(&path, &d).expect("loads");
        let memfd = File::from(fd);
        let mut got = [0u8; 5];
        memfd.read_exact_at(&mut got, BLOCK + 9).expect("read");
        assert_eq!(&got, b"state");
        assert_eq!(memfd.metadata().expect("stat").len(), 8 * BLOCK);
        assert!(
            memfd.write_all_at(b"x", 0).is_err(),
            "sealed against writes"
        );
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        assert!(
            fallocate(&memfd, punch, 0, BLOCK as i64 * 2).is_err(),
            "a balloon's discard cannot punch it"
        );
        memfd.read_exact_at(&mut got, BLOCK + 9).expect("read");
        assert_eq!(&got, b"state");
        let e = sealed(&path, "00").expect_err("wrong digest");
        assert!(e.to_string().contains("manifest says 00"), "{e}");
        // A snapshot's copy and its sealed memory in one pass: the same content.
        let to = dir.path().join("copy.ram");
        let (fd, size, d2) = sealed_copy(&path, &to).expect("sealed copy");
        assert_eq!((size, d2), digest(&to).expect("digest"));
        assert_eq!(digest(&path).expect("digest").1, d);
        let memfd = File::from(fd);
        memfd.read_exact_at(&mut got, BLOCK + 9).expect("read");
        assert_eq!(&got, b"state");
        assert!(
            memfd.write_all_at(b"x", 0).is_err(),
            "sealed against writes"
        );
    }
}
