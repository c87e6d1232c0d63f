//! Shared-memory segments for the co-located fast path: a file in
//! `/dev/shm` mapped by a server and the workers on its host.
//!
//! A segment of a ps key holds `W + 1` slots of the key part's size: slot
//! `r` is where worker `r` writes its push, slot `W` holds the stored
//! value. The transport then only carries small messages ("my push is in
//! my slot", "the value is in its slot"), and a round costs one copy into
//! the slot per worker, one summing pass on the server, and one copy out
//! per worker, where the message path costs four more.
//!
//! # Who touches a slot when (sync mode only)
//!
//! - Worker `r` writes slot `r`, then sends its push. It writes again only
//!   after that push was answered, which the server does after summing.
//! - The server reads the input slots and writes the value slot only while
//!   completing a round, which needs every worker's next push; a worker
//!   pushes again only after it copied the value out of the slot. So no
//!   slot is read and written at once.
//! - Happens-before between processes comes from the message that follows
//!   each write: the transport's shared-memory rings publish with release
//!   and consume with acquire (and a socket's system calls are barriers).
//!
//! The server creates and owns the file (reserved with `posix_fallocate`,
//! so a full `/dev/shm` is an error now rather than a SIGBUS later), named
//! `pskv-kv-<pid>-<random>`, and unlinks it once no worker will map it any
//! more (see `server/entry.rs`), when the server stops, or when the key is
//! dropped.
//!
//! A request that says "in my slot" names its segment by a tag
//! ([`Segment::tag`]): a server restarted since the worker mapped the old
//! process's segment refuses it (the worker maps the new one and sends
//! again) rather than reading a slot the worker never wrote.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::MmapRaw;

/// Slots start at multiples of this.
const ALIGN: usize = 4096;

/// A mapped segment.
pub(crate) struct Segment {
    map: MmapRaw,
    path: PathBuf,
    owner: bool,
    unlinked: AtomicBool,
    slot_bytes: usize,
    slot_stride: usize,
    slots: usize,
}

// SAFETY: the mapping is plain shared memory; who writes which slot when
// is the protocol above, enforced by the callers.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("path", &self.path).finish()
    }
}

fn stride(slot_bytes: usize) -> usize {
    slot_bytes.max(1).next_multiple_of(ALIGN)
}

fn unique_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    // The creator's pid first: what a process left behind can be told.
    format!("pskv-kv-{}-{:016x}", std::process::id(), h.finish())
}

impl Segment {
    /// Creates a segment of `slots` slots of `slot_bytes` bytes.
    pub(crate) fn create(slots: usize, slot_bytes: usize) -> std::io::Result<Segment> {
        let st = stride(slot_bytes);
        let len = st
            .checked_mul(slots)
            .ok_or_else(|| std::io::Error::other("segment size overflows"))?;
        let path = Path::new("/dev/shm").join(unique_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // SAFETY: a valid descriptor; reserves the pages now.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            let _ = std::fs::remove_file(&path);
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let map = MmapRaw::map_raw(&file).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        Ok(Segment {
            map,
            path,
            owner: true,
            unlinked: AtomicBool::new(false),
            slot_bytes,
            slot_stride: st,
            slots,
        })
    }

    /// Maps a segment another process created.
    pub(crate) fn open(path: &Path, slots: usize, slot_bytes: usize) -> std::io::Result<Segment> {
        if path.parent() != Some(Path::new("/dev/shm"))
            || !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pskv-kv-"))
        {
            return Err(std::io::Error::other(format!(
                "{} is not a pskv segment",
                path.display()
            )));
        }
        let st = stride(slot_bytes);
        let len = st * slots;
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let have = file.metadata()?.len();
        if have != len as u64 {
            return Err(std::io::Error::other(format!(
                "segment {} has {have} bytes, expected {len}",
                path.display()
            )));
        }
        let map = MmapRaw::map_raw(&file)?;
        Ok(Segment {
            map,
            path: path.to_path_buf(),
            owner: false,
            unlinked: AtomicBool::new(true),
            slot_bytes,
            slot_stride: st,
            slots,
        })
    }

    /// Its file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A 16-bit tag of this segment (never 0), from its file name, which
    /// holds a random part: requests name the segment they used, so a
    /// server that restarted refuses a request meant for its old self's
    /// segment instead of reading a fresh slot.
    pub(crate) fn tag(&self) -> u16 {
        let h = crate::hash::fnv1a64(self.path.as_os_str().as_encoded_bytes());
        ((h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) as u16).max(1)
    }

    /// A slot's first byte.
    ///
    /// # Panics
    /// Never for `i < slots`; callers index with ranks below the slot count.
    pub(crate) fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots, "slot {i} of {}", self.slots);
        // SAFETY: within the mapping (i < slots, stride * slots = len).
        unsafe { self.map.as_mut_ptr().add(i * self.slot_stride) }
    }

    /// A slot's bytes.
    ///
    /// # Safety
    /// No one writes the slot while the slice lives (the protocol above).
    pub(crate) unsafe fn slot(&self, i: usize) -> &[u8] {
        std::slice::from_raw_parts(self.slot_ptr(i), self.slot_bytes)
    }

    /// A slot's bytes, to write.
    ///
    /// # Safety
    /// No one else reads or writes the slot while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slot_mut(&self, i: usize) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.slot_ptr(i), self.slot_bytes)
    }

    /// Removes the file (mappings stay valid).
    pub(crate) fn unlink(&self) {
        if self.owner && !self.unlinked.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// A slot seen as `Bytes`' owner (zero-copy views of a push in a slot).
pub(crate) struct SlotView(pub(crate) std::sync::Arc<Segment>, pub(crate) usize);

impl AsRef<[u8]> for SlotView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the view lives while the server sums the round; the
        // worker does not write its slot until the round is answered.
        unsafe { self.0.slot(self.1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_see_each_other_and_the_file_goes() {
        let a = Segment::create(3, 100).unwrap();
        let b = Segment::open(a.path(), 3, 100).unwrap();
        unsafe { a.slot_mut(1) }.copy_from_slice(&[7u8; 100]);
        assert_eq!(unsafe { b.slot(1) }, &[7u8; 100][..]);
        assert_eq!(unsafe { b.slot(2) }, &[0u8; 100][..]);
        assert!(Segment::open(a.path(), 4, 100).is_err());
        assert!(Segment::open(Path::new("/etc/passwd"), 1, 1).is_err());
        let p = a.path().to_path_buf();
        a.unlink();
        assert!(!p.exists());
        // The mapping outlives the file.
        let s = unsafe { b.slot_mut(0) };
        s[0] = 1;
        drop(a);
        assert_eq!(unsafe { b.slot(0) }[0], 1);
    }

    /// Both ends of a segment agree on its tag, and segments made one
    /// after the other (a server and its restarted self) differ.
    #[test]
    fn tags_name_a_segment() {
        let a = Segment::create(2, 8).unwrap();
        let b = Segment::open(a.path(), 2, 8).unwrap();
        assert_eq!(a.tag(), b.tag());
        assert_ne!(a.tag(), 0);
        let tags: std::collections::HashSet<u16> = (0..20)
            .map(|_| Segment::create(2, 8).unwrap().tag())
            .collect();
        assert!(tags.len() >= 19, "{tags:?}");
    }
}
