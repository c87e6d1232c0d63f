//! Registered regions: long-lived shared memory that a node creates and the
//! peers on its host map, so that a layer above can move large values with
//! one copy and send only a small message naming where they lie. The
//! kvstore's co-located fast path is built on them (a key part's slots).
//!
//! A region is a file in `/dev/shm`, `pskv-region-<pid>-<random>` (the
//! creator's pid first, so that what a process left behind can be told),
//! holding a header page and `slots` slots of `slot_len` bytes, each slot
//! starting on a page. The creator reserves every page (`posix_fallocate`),
//! so a full `/dev/shm` is an error at creation, never a SIGBUS later.
//!
//! ```text
//!   page 0: magic | slots | slot_len | nonce      (written once, by the creator)
//!           words 0..REGION_WORDS, one per cache line    (zero at creation; the layer above's)
//!   page 1..: slot 0, slot 1, ..., slot slots-1   (each a whole number of pages)
//! ```
//!
//! # States of the file
//!
//! ```text
//!   created (mapped by the creator) --peers open it by its descriptor-->
//!   shared --creator: retire(), or its Region dropped--> retired
//! ```
//!
//! A retired region has no file: no one can open it any more, and every
//! mapping made before stays valid until dropped. The creator retires a
//! region once every peer that will map it has (the kvstore's server knows
//! from its workers' checks), so nothing is left in `/dev/shm` by a job,
//! even one that is killed later.
//!
//! # What the transport guarantees, and what it does not
//!
//! - A peer opens a region only by the creator's descriptor
//!   ([`Region::descriptor`]), only over a link whose van shares memory
//!   ([`crate::Postoffice::open_region`]), and only if the file's header and
//!   size agree with it: a descriptor from the network is checked, never
//!   trusted.
//! - Who writes which slot when is the caller's protocol: a region is plain
//!   memory. Happens-before between processes comes from the message that
//!   follows each write (the shared-memory van publishes with release and
//!   consumes with acquire), which is why the slot accessors are `unsafe`.
//! - The header's [`word`](Region::word)s are for the layer above's own
//!   protocol between the processes that map the region (its atomics, and a
//!   futex wait and wake on them: [`Region::wait_word`],
//!   [`Region::wake_word`]); the transport never reads or writes them.
//! - A region's [`tag`](Region::tag) is random per creation: a message that
//!   names the tag of the region it used is refused by a creator that has
//!   been restarted since (its new region has another tag), instead of
//!   reading a slot no one wrote.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use memmap2::MmapRaw;

use crate::error::TransportError;

/// Slots (and the header) start at multiples of this.
const PAGE: usize = 4096;

/// The header's first word: "PSKVREG1".
const MAGIC: u64 = u64::from_le_bytes(*b"PSKVREG1");

/// Words of the header for the layer above ([`Region::word`]).
pub const REGION_WORDS: usize = 56;

/// Where those words start in the header page, and the bytes between two
/// (a cache line each, so that one word's traffic does not slow another's).
const WORDS_AT: usize = 64;
const WORD_STRIDE: usize = 64;
const _: () = assert!(WORDS_AT >= 32 && WORDS_AT + REGION_WORDS * WORD_STRIDE <= PAGE);

/// Where region files live, and how their names start.
const DIR: &str = "/dev/shm";
const PREFIX: &str = "pskv-region-";

/// What a peer needs to map a region (sent by the layer above, opaque to it).
#[derive(serde::Serialize, serde::Deserialize)]
struct Descriptor {
    path: String,
    slots: u64,
    slot_len: u64,
}

/// A registered region, mapped.
pub struct Region {
    map: MmapRaw,
    path: PathBuf,
    /// Set once the file is gone (always, on a peer's side: only the
    /// creator removes it).
    retired: AtomicBool,
    slots: usize,
    slot_len: usize,
    stride: usize,
    nonce: u64,
}

// SAFETY: the mapping is plain shared memory; who writes which slot when is
// the caller's protocol (the accessors that hand out slices are unsafe).
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("path", &self.path)
            .field("slots", &self.slots)
            .field("slot_len", &self.slot_len)
            .finish()
    }
}

/// Bytes from one slot's start to the next's, if representable.
fn stride(slot_len: usize) -> Option<usize> {
    slot_len.max(1).checked_next_multiple_of(PAGE)
}

/// The file's length, if it fits in memory at all.
fn file_len(slots: usize, slot_len: usize) -> Option<usize> {
    stride(slot_len)?.checked_mul(slots)?.checked_add(PAGE)
}

impl Region {
    /// Creates a region of `slots` slots of `slot_len` bytes, zeroed, with
    /// every page reserved.
    pub fn create(slots: usize, slot_len: usize) -> Result<Region, TransportError> {
        let len = file_len(slots, slot_len)
            .filter(|_| slots > 0)
            .ok_or_else(|| {
                TransportError::Invalid(format!(
                    "a region of {slots} slots of {slot_len} bytes cannot be made"
                ))
            })?;
        let n = crate::security::nonce();
        let nonce = u64::from_le_bytes(n[..8].try_into().expect("8 bytes"));
        let path = Path::new(DIR).join(format!("{PREFIX}{}-{nonce:016x}", std::process::id()));
        let context = || format!("creating the shared region {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| TransportError::io(context(), e))?;
        let map = super::ring::reserve(&file, 0, len)
            .and_then(|()| MmapRaw::map_raw(&file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                TransportError::io(context(), e)
            })?;
        // SAFETY: the header page of a fresh mapping no one else has yet.
        unsafe {
            let p = map.as_mut_ptr() as *mut u64;
            p.write(MAGIC.to_le());
            p.add(1).write((slots as u64).to_le());
            p.add(2).write((slot_len as u64).to_le());
            p.add(3).write(nonce.to_le());
        }
        Ok(Region {
            map,
            path,
            retired: AtomicBool::new(false),
            slots,
            slot_len,
            stride: stride(slot_len).expect("checked by file_len"),
            nonce,
        })
    }

    /// Maps the region a descriptor names, checking the file against it.
    /// The caller has checked that the creator shares memory with this
    /// process ([`crate::Postoffice::open_region`]).
    pub(crate) fn open(descriptor: &[u8]) -> Result<Region, TransportError> {
        let bad = |why: String| TransportError::Invalid(format!("shared region: {why}"));
        let d: Descriptor =
            postcard::from_bytes(descriptor).map_err(|_| bad("a malformed descriptor".into()))?;
        let path = Path::new(&d.path);
        let named_right = path.parent() == Some(Path::new(DIR))
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX));
        if !named_right {
            return Err(bad(format!("{} is not a pskv region", d.path)));
        }
        let (slots, slot_len) = (d.slots as usize, d.slot_len as usize);
        let len = file_len(slots, slot_len)
            .ok_or_else(|| bad(format!("{slots} slots of {slot_len} bytes cannot exist")))?;
        let context = || format!("mapping the shared region {}", d.path);
        // Not through a link, and only a plain file.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| TransportError::io(context(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| TransportError::io(context(), e))?;
        if !meta.is_file() {
            return Err(bad(format!("{} is not a plain file", d.path)));
        }
        let have = meta.len();
        if have != len as u64 {
            return Err(bad(format!(
                "{} has {have} bytes; {slots} slots of {slot_len} bytes need {len}",
                d.path
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| TransportError::io(context(), e))?;
        if map.len() != len {
            return Err(bad(format!("{} changed size while being mapped", d.path)));
        }
        // SAFETY: the header page is inside the checked length; the creator
        // wrote it before anyone could learn the file's name.
        let word =
            |i: usize| unsafe { u64::from_le((map.as_ptr() as *const u64).add(i).read_volatile()) };
        if word(0) != MAGIC || word(1) != d.slots || word(2) != d.slot_len {
            return Err(bad(format!(
                "{}'s header does not match its descriptor",
                d.path
            )));
        }
        Ok(Region {
            nonce: word(3),
            map,
            path: path.to_path_buf(),
            retired: AtomicBool::new(true),
            slots,
            slot_len,
            stride: stride(slot_len).expect("checked by file_len"),
        })
    }

    /// What a peer on this host needs to map the region, for the layer
    /// above to send it ([`crate::Postoffice::open_region`] takes it).
    pub fn descriptor(&self) -> Bytes {
        let d = Descriptor {
            path: self.path.display().to_string(),
            slots: self.slots as u64,
            slot_len: self.slot_len as u64,
        };
        Bytes::from(postcard::to_allocvec(&d).expect("a descriptor always serializes"))
    }

    /// The backing file (for diagnostics; gone once retired).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Slots in the region.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of each slot.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// A 16-bit tag of this creation of the region (never 0; both ends see
    /// the same): random, so a creator restarted since a peer mapped its
    /// old region tells a message meant for that one from one for its own.
    pub fn tag(&self) -> u16 {
        let n = self.nonce;
        ((n ^ (n >> 16) ^ (n >> 32) ^ (n >> 48)) as u16).max(1)
    }

    /// Word `i` of the header's words for the layer above (zero when the
    /// region is made; every process that maps the region sees the same
    /// word). What they mean, and the orderings that make them safe, are
    /// the caller's protocol.
    ///
    /// # Panics
    /// If `i` is not below [`REGION_WORDS`].
    pub fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < REGION_WORDS, "header word {i} of {REGION_WORDS}");
        // SAFETY: within the header page (WORDS_AT + REGION_WORDS * WORD_STRIDE is
        // below PAGE), 4-aligned (the mapping is page-aligned), and shared
        // memory is only ever accessed through atomics at these offsets.
        unsafe { &*(self.map.as_ptr().add(WORDS_AT + i * WORD_STRIDE) as *const AtomicU32) }
    }

    /// Sleeps while word `i` holds `expected`, at most `timeout` (or until
    /// a [`wake_word`](Region::wake_word) on it from any process that maps
    /// the region; or at once, on any error). A futex wait: the kernel
    /// compares and sleeps atomically, so a wake after a change of the word
    /// is never slept through (the caller's protocol must make its waker
    /// wake when a sleeper may be waiting).
    pub fn wait_word(&self, i: usize, expected: u32, timeout: Duration) {
        super::futex::wait(self.word(i), expected, timeout);
    }

    /// Wakes every thread (of any process) sleeping in
    /// [`wait_word`](Region::wait_word) on word `i`.
    pub fn wake_word(&self, i: usize) {
        super::futex::wake(self.word(i));
    }

    /// A slot's first byte.
    ///
    /// # Panics
    /// If `i` is not below [`slots`](Region::slots).
    pub fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots, "slot {i} of a region of {}", self.slots);
        // SAFETY: within the mapping: PAGE + stride * slots is its length.
        unsafe { self.map.as_mut_ptr().add(PAGE + i * self.stride) }
    }

    /// A slot's bytes.
    ///
    /// # Safety
    /// No one (in any process) writes the slot while the slice lives.
    ///
    /// # Panics
    /// If `i` is not below [`slots`](Region::slots).
    pub unsafe fn slot(&self, i: usize) -> &[u8] {
        self.slot_range(i, 0..self.slot_len)
    }

    /// A slot's bytes, to write.
    ///
    /// # Safety
    /// No one else (in any process) reads or writes the slot while the
    /// slice lives.
    ///
    /// # Panics
    /// If `i` is not below [`slots`](Region::slots).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, i: usize) -> &mut [u8] {
        self.slot_range_mut(i, 0..self.slot_len)
    }

    /// Bytes `range` of a slot (others may write its other bytes meanwhile:
    /// a slot shared out in chunks).
    ///
    /// # Safety
    /// No one (in any process) writes those bytes while the slice lives.
    ///
    /// # Panics
    /// If `i` is not below [`slots`](Region::slots), or `range` is not
    /// within a slot.
    pub unsafe fn slot_range(&self, i: usize, range: std::ops::Range<usize>) -> &[u8] {
        std::slice::from_raw_parts(self.range_ptr(i, &range), range.len())
    }

    /// Bytes `range` of a slot, to write.
    ///
    /// # Safety
    /// No one else (in any process) reads or writes those bytes while the
    /// slice lives.
    ///
    /// # Panics
    /// As [`slot_range`](Region::slot_range).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_range_mut(&self, i: usize, range: std::ops::Range<usize>) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.range_ptr(i, &range), range.len())
    }

    /// The first byte of bytes `range` of slot `i`.
    ///
    /// # Panics
    /// As [`slot_range`](Region::slot_range).
    fn range_ptr(&self, i: usize, range: &std::ops::Range<usize>) -> *mut u8 {
        assert!(
            range.start <= range.end && range.end <= self.slot_len,
            "bytes {range:?} of a {}-byte slot",
            self.slot_len
        );
        // SAFETY: within slot `i` (checked above; `slot_ptr` checks `i`).
        unsafe { self.slot_ptr(i).add(range.start) }
    }

    /// Slot `i` as `Bytes` that read it in place (no copy) and keep the
    /// mapping alive while any clone lives.
    ///
    /// # Safety
    /// No one writes the slot while any clone of the result lives.
    ///
    /// # Panics
    /// If `i` is not below [`slots`](Region::slots).
    pub unsafe fn lease(self: &Arc<Self>, i: usize) -> Bytes {
        assert!(i < self.slots, "slot {i} of a region of {}", self.slots);
        Bytes::from_owner(Lease(self.clone(), i))
    }

    /// Removes the file: no peer can open the region any more, and every
    /// mapping stays valid. Only the creator's call does anything; dropping
    /// the creator's `Region` retires it too.
    pub fn retire(&self) {
        if !self.retired.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Whether the file is gone (always true on a peer's side).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.retire();
    }
}

/// A slot as `Bytes`' owner.
struct Lease(Arc<Region>, usize);

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `Region::lease`'s caller promised no writer while it lives.
        unsafe { self.0.slot(self.1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_see_each_other_and_the_file_goes() {
        let a = Arc::new(Region::create(3, 100).unwrap());
        let b = Region::open(&a.descriptor()).unwrap();
        assert_eq!((b.slots(), b.slot_len()), (3, 100));
        unsafe { a.slot_mut(1) }.copy_from_slice(&[7u8; 100]);
        assert_eq!(unsafe { b.slot(1) }, &[7u8; 100][..]);
        assert_eq!(unsafe { b.slot(2) }, &[0u8; 100][..]);
        let leased = unsafe { a.lease(1) };
        assert_eq!(&leased[..], &[7u8; 100][..]);
        let p = a.path().to_path_buf();
        assert!(p.exists() && !a.is_retired() && b.is_retired());
        a.retire();
        assert!(!p.exists());
        assert!(Region::open(&a.descriptor()).is_err());
        // The mappings outlive the file, and a lease its region's owner.
        let s = unsafe { b.slot_mut(0) };
        s[0] = 1;
        drop(a);
        assert_eq!(unsafe { b.slot(0) }[0], 1);
        assert_eq!(leased[0], 7);
    }

    /// The header's words are zero, shared by every mapping, apart from the
    /// slots and the header's own fields; a sleeper on one is woken from
    /// another mapping, and one whose word moved on does not sleep.
    #[test]
    fn header_words_are_shared_and_can_be_slept_on() {
        let a = Arc::new(Region::create(2, 64).unwrap());
        let b = Arc::new(Region::open(&a.descriptor()).unwrap());
        for i in 0..REGION_WORDS {
            assert_eq!(b.word(i).load(Ordering::Relaxed), 0);
            a.word(i).store(i as u32 + 1, Ordering::Relaxed);
        }
        for i in 0..REGION_WORDS {
            assert_eq!(b.word(i).load(Ordering::Relaxed), i as u32 + 1);
        }
        assert_eq!(unsafe { b.slot(0) }, &[0u8; 64][..]);
        assert_eq!(b.tag(), a.tag(), "the header's own fields are intact");
        // A word that differs from what the sleeper expects: no sleep.
        let t = std::time::Instant::now();
        b.wait_word(3, 0, Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
        // A sleeper on `b`'s mapping, woken through `a`'s.
        let b2 = b.clone();
        let sleeper = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            while b2.word(0).load(Ordering::Acquire) == 1 {
                b2.wait_word(0, 1, Duration::from_secs(20));
            }
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        a.word(0).store(2, Ordering::Release);
        a.wake_word(0);
        assert!(sleeper.join().unwrap() < Duration::from_secs(10));
    }

    /// Descriptors from the network are checked against the file.
    #[test]
    fn bad_descriptors_are_errors() {
        let a = Region::create(2, 64).unwrap();
        let lie = |path: &str, slots: u64, slot_len: u64| {
            let d = Descriptor {
                path: path.into(),
                slots,
                slot_len,
            };
            Region::open(&postcard::to_allocvec(&d).unwrap()).unwrap_err()
        };
        let path = a.path().display().to_string();
        for e in [
            lie(&path, 3, 64),
            lie(&path, 2, 65),
            lie(&path, u64::MAX, u64::MAX),
            lie("/etc/passwd", 1, 1),
            lie("/dev/shm/../etc/pskv-region-1", 1, 1),
        ] {
            assert!(e.to_string().contains("region"), "{e}");
        }
        assert!(Region::open(b"\xff\xff").is_err());
        // A file of the right size without the header is refused too.
        let fake = Path::new(DIR).join(format!("{PREFIX}fake-{}", std::process::id()));
        std::fs::write(&fake, vec![0u8; file_len(2, 64).unwrap()]).unwrap();
        let e = lie(&fake.display().to_string(), 2, 64);
        let _ = std::fs::remove_file(&fake);
        assert!(e.to_string().contains("header"), "{e}");
        assert!(Region::create(0, 8).is_err());
        assert!(Region::create(usize::MAX, usize::MAX).is_err());
    }

    /// Both ends of a region agree on its tag, and regions made one after
    /// the other (a creator and its restarted self) differ.
    #[test]
    fn tags_name_a_region() {
        let a = Region::create(2, 8).unwrap();
        let b = Region::open(&a.descriptor()).unwrap();
        assert_eq!(a.tag(), b.tag());
        assert_ne!(a.tag(), 0);
        let tags: std::collections::HashSet<u16> = (0..20)
            .map(|_| Region::create(2, 8).unwrap().tag())
            .collect();
        assert!(tags.len() >= 19, "{tags:?}");
    }
}
