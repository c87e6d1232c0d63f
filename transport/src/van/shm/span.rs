//! Slot spans: one contiguous range of this process's memory whose pieces
//! are slots of registered regions, mapped there a second time, so that a
//! layer above can hand a caller a buffer that *is* its slots. The
//! kvstore's push buffers are spans (a key's parts, each in its own
//! server's region: a push from the buffer copies nothing).
//!
//! ```text
//!   span:   | piece 0 (region A, slot r) | piece 1 (region B, slot r) | piece 2 (no region) |
//!   memory: | the pages of A's slot r    | the pages of B's slot r    | private, zeroed     |
//! ```
//!
//! A piece lies in its slot (is *placed*) only where the page grain
//! allows: its offset a multiple of the page, its length too unless it is
//! the last piece, and the slot at least as long. Every other byte of the
//! span is private anonymous memory, zeroed. [`SlotSpan::placed`] says
//! which pieces are placed, and in which region.
//!
//! How: the whole span is reserved as private memory first; each placed
//! piece then gets a second mapping of its slot's pages over its range
//! (`mremap` with an old size of 0, which maps the same pages of a shared
//! mapping again, at the fixed address). The span needs no file
//! descriptor, so a region already retired (its file removed) can be
//! placed as long as this process maps it; the span's mapping keeps the
//! pages alive by itself, after the region is dropped too.
//!
//! # States
//!
//! ```text
//!   placed (its placed pieces are their slots) --detach()--> detached
//! ```
//!
//! [`SlotSpan::detach`] gives every placed piece private pages of the same
//! contents at the same addresses, at once for anyone reading them (each
//! piece's pages are swapped in one `mremap`, under the kernel's lock of
//! the address space: a reader faults and waits, then sees the copy); from
//! then on writes to the span no longer reach the slots, and it answers as
//! if no piece were placed. Each piece's `detached` flag is set before its
//! pages are swapped (Release; read with Acquire): whoever sees a piece
//! placed may find it detached a moment later; a piece seen detached is
//! private, or is being made so with the same bytes (the one exception: a
//! piece whose private pages could not even be mapped, whose flag is
//! cleared again, still its slot). The span's own `detached` flag says
//! that `detach` was called (`is_detached`).
//!
//! A remap that fails is mended where it can be: fresh private pages
//! where the kernel had already unmapped the range (a detach copies its
//! bytes back), placed only where nothing else has been mapped since. So
//! a span has no hole unless two mapping calls in a row failed (then its
//! range is leaked, never unmapped); a piece that `detach` could not even
//! start on stays its slot, and says so (`placed`).
//!
//! What the transport guarantees, and what it does not: as for a
//! [`Region`], who writes which byte when is the caller's protocol (no one
//! may write the span while it is being detached: a write between the
//! copy and the swap would be lost); the span only makes the memory appear
//! in one place. Its memory is freed (unmapped) when the span is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::region::Region;
use crate::error::TransportError;

const PAGE: usize = 4096;

/// One piece of a span, as asked for: its bytes, and the slot it should
/// lie in (if any).
pub struct Piece<'a> {
    /// Bytes of the span before the piece.
    pub offset: usize,
    /// Bytes of the piece.
    pub len: usize,
    /// The region and the slot of it that the piece should be.
    pub slot: Option<(&'a Arc<Region>, usize)>,
}

/// A contiguous range of memory made of slots of regions (see the module).
pub struct SlotSpan {
    base: *mut u8,
    len: usize,
    map_len: usize,
    /// Per piece: its range, the region and slot it lies in if placed,
    /// and whether it was detached.
    pieces: Vec<PieceState>,
    /// `detach` was called (see the module's states).
    detached: AtomicBool,
    /// A failed remap could not be mended (`refill`): the range is never
    /// unmapped, lest a mapping made since in a hole be unmapped with it.
    leak: AtomicBool,
}

/// The region and slot a placed piece lies in.
type Placed = (Arc<Region>, usize);

/// One piece of a span as made.
struct PieceState {
    offset: usize,
    len: usize,
    placed: Option<Placed>,
    /// Its pages were made private (set before the swap, Release; cleared
    /// again if the swap could not even start).
    detached: AtomicBool,
}

impl PieceState {
    /// The region and slot it lies in, unless unplaced or detached.
    fn slot(&self) -> Option<&Placed> {
        self.placed
            .as_ref()
            .filter(|_| !self.detached.load(Ordering::Acquire))
    }
}

// SAFETY: the span is plain memory owned by this value (the pointer is
// only its address); who touches which byte when is the caller's protocol,
// as for a `Region`.
unsafe impl Send for SlotSpan {}
// SAFETY: as above.
unsafe impl Sync for SlotSpan {}

impl SlotSpan {
    /// A span of `len` bytes made of `pieces` (in order, each starting
    /// where the one before ends, together `len` bytes), each placed in
    /// its slot where the page grain allows.
    pub fn new(len: usize, pieces: &[Piece<'_>]) -> Result<SlotSpan, TransportError> {
        let mut at = 0;
        for p in pieces {
            if p.offset != at {
                return Err(TransportError::Invalid(format!(
                    "a span's piece at byte {} follows one that ends at {at}",
                    p.offset
                )));
            }
            at = p.offset.checked_add(p.len).ok_or_else(|| {
                TransportError::Invalid("a span's pieces overflow the address space".into())
            })?;
            if let Some((r, slot)) = p.slot {
                if slot >= r.slots() {
                    return Err(TransportError::Invalid(format!(
                        "slot {slot} of a region of {}",
                        r.slots()
                    )));
                }
            }
        }
        if at != len {
            return Err(TransportError::Invalid(format!(
                "a span of {len} bytes was given pieces of {at}"
            )));
        }
        let map_len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: a fresh mapping, anywhere.
        let base = unsafe { private_pages(std::ptr::null_mut(), map_len, true) }.map_err(|e| {
            TransportError::io(format!("reserving {map_len} bytes for a slot span"), e)
        })?;
        let mut span = SlotSpan {
            base,
            len,
            map_len,
            pieces: Vec::with_capacity(pieces.len()),
            detached: AtomicBool::new(false),
            leak: AtomicBool::new(false),
        };
        let last = pieces.len().saturating_sub(1);
        for (k, p) in pieces.iter().enumerate() {
            let fits = |r: &Region| {
                p.len > 0
                    && p.offset % PAGE == 0
                    && (k == last || p.len % PAGE == 0)
                    && r.slot_len() >= p.len
            };
            let placed = match p.slot {
                Some((r, slot)) if fits(r) => {
                    span.place(p.offset, p.len, r, slot)?;
                    Some((r.clone(), slot))
                }
                _ => None,
            };
            span.pieces.push(PieceState {
                offset: p.offset,
                len: p.len,
                placed,
                detached: AtomicBool::new(false),
            });
        }
        Ok(span)
    }

    /// Maps slot `slot` of `r` again over the span's bytes from `offset`
    /// (`len` bytes, rounded up to whole pages: the slot's stride covers
    /// them, and the span's pages past its end are its own).
    fn place(
        &mut self,
        offset: usize,
        len: usize,
        r: &Region,
        slot: usize,
    ) -> Result<(), TransportError> {
        let pages = len.div_ceil(PAGE) * PAGE;
        // SAFETY: the source is the start of a slot of `r`'s shared
        // mapping, which holds whole pages from there (slots are page
        // multiples apart, the last ends on the mapping's end); the
        // target range is inside this span's own mapping (offset + pages
        // <= map_len: offset + len <= len, rounded up), which
        // MREMAP_FIXED replaces.
        let got = unsafe {
            libc::mremap(
                r.slot_ptr(slot).cast(),
                0,
                pages,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.base.add(offset).cast::<libc::c_void>(),
            )
        };
        if got == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // The range may have been unmapped before the move failed.
            self.refill(offset, pages);
            return Err(TransportError::io(
                format!("mapping a slot of {} into a span", r.path().display()),
                e,
            ));
        }
        Ok(())
    }

    /// Maps fresh private pages into the span's `pages` bytes from
    /// `offset`, a range a failed `mremap` left unmapped, so that there is
    /// no hole, and nothing else mapped there when the span unmaps its
    /// whole range.
    /// Whether it could; if not, the span keeps its range for good
    /// (`leak`: dropping it unmaps nothing).
    fn refill(&self, offset: usize, pages: usize) -> bool {
        // SAFETY: within the span's own range; only where nothing is
        // mapped (MAP_FIXED_NOREPLACE: a mapping another thread made in the
        // hole meanwhile is left alone, and the range is then leaked).
        let got = unsafe { private_pages(self.base.add(offset), pages, false) };
        let ok = got.is_ok();
        if !ok {
            self.leak.store(true, Ordering::Release);
        }
        ok
    }

    /// The span's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Bytes of the span.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives every placed piece private pages of the same contents at the
    /// same addresses (see the module's states); the span is then placed
    /// nowhere. Ok once every placed piece is private; on an error, a
    /// piece whose pages could not be prepared is still its slot (still
    /// placed: a later call tries it again), and one whose swap and mend
    /// both failed is a hole (the span is then leaked).
    ///
    /// No one may write the span meanwhile (a write between a piece's copy
    /// and its swap would be lost); reading it is fine.
    pub fn detach(&self) -> Result<(), TransportError> {
        self.detached.store(true, Ordering::Release);
        let mut first_err = None;
        for p in &self.pieces {
            if p.placed.is_none() || p.detached.swap(true, Ordering::AcqRel) {
                continue;
            }
            if let Err(e) = self.detach_piece(p) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Swaps private pages with the piece's bytes in over its range.
    fn detach_piece(&self, piece: &PieceState) -> Result<(), TransportError> {
        let offset = piece.offset;
        let pages = piece.len.div_ceil(PAGE) * PAGE;
        let context = || format!("detaching {pages} bytes of a slot span");
        // SAFETY: a fresh mapping, anywhere.
        let tmp = match unsafe { private_pages(std::ptr::null_mut(), pages, false) } {
            Ok(t) => t.cast::<libc::c_void>(),
            Err(e) => {
                // Nothing changed: the piece is still its slot.
                piece.detached.store(false, Ordering::Release);
                return Err(TransportError::io(context(), e));
            }
        };
        // SAFETY: `pages` bytes from the piece's start are mapped (its
        // slot's pages, `place`), and `tmp` is ours; no one writes the
        // piece meanwhile (the caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(offset), tmp.cast::<u8>(), pages);
        }
        // SAFETY: moves our private pages over the piece's range, which
        // lies in the span's mapping; the slot's mapping there is replaced
        // (the region's own mapping is untouched).
        let got = unsafe {
            libc::mremap(
                tmp,
                pages,
                pages,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.base.add(offset).cast::<libc::c_void>(),
            )
        };
        if got != libc::MAP_FAILED {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // The kernel unmaps the target before the move can fail: fresh
        // pages in the hole, then the bytes copied back (a reader meanwhile
        // may see zeroes: a path of two failed mapping calls).
        let mended = self.refill(offset, pages);
        // SAFETY: `tmp` was not moved; when mended, the piece's range is
        // ours and private.
        unsafe {
            if mended {
                std::ptr::copy_nonoverlapping(tmp.cast::<u8>(), self.base.add(offset), pages);
            }
            libc::munmap(tmp, pages);
        }
        if mended {
            Ok(())
        } else {
            Err(TransportError::io(context(), e))
        }
    }

    /// Whether [`SlotSpan::detach`] was called.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// The region and slot piece `k` lies in, if it is placed (and not
    /// detached).
    pub fn placed(&self, k: usize) -> Option<(&Arc<Region>, usize)> {
        self.pieces.get(k)?.slot().map(|(r, s)| (r, *s))
    }

    /// Whether the span's bytes `offset..offset + len` are one placed piece,
    /// lying in slot `slot` of `r` (the same region: the same mapping).
    pub fn is_slot(&self, offset: usize, len: usize, r: &Arc<Region>, slot: usize) -> bool {
        // Pieces are in offset order; only an empty piece shares its
        // offset with the next one, and an empty piece is never placed.
        let at = self
            .pieces
            .partition_point(|p| p.offset < offset || (p.offset == offset && p.len == 0));
        self.pieces.get(at).is_some_and(|p| {
            p.offset == offset
                && p.len == len
                && p.slot()
                    .is_some_and(|(pr, ps)| Arc::ptr_eq(pr, r) && *ps == slot)
        })
    }

    /// Whether the `len` bytes at `addr` are one placed piece of this span,
    /// lying in slot `slot` of `r` ([`SlotSpan::is_slot`] by address: any
    /// view of the span's memory, whoever made it).
    pub fn is_slot_at(&self, addr: *const u8, len: usize, r: &Arc<Region>, slot: usize) -> bool {
        let offset = (addr as usize).wrapping_sub(self.base as usize);
        offset < self.len && self.is_slot(offset, len, r, slot)
    }

    /// How many pieces are placed (and not detached).
    pub fn placed_count(&self) -> usize {
        self.pieces.iter().filter(|p| p.slot().is_some()).count()
    }
}

/// Maps `len` bytes of zeroed private pages, anywhere (`at` null) or at
/// `at` where nothing is mapped (`MAP_FIXED_NOREPLACE`); `noreserve`: swap
/// space is not set aside for them.
///
/// # Safety
/// A non-null `at` lies in this process's address space, `len` bytes
/// from it unused.
unsafe fn private_pages(at: *mut u8, len: usize, noreserve: bool) -> std::io::Result<*mut u8> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if !at.is_null() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    if noreserve {
        flags |= libc::MAP_NORESERVE;
    }
    let got = libc::mmap(
        at.cast(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        -1,
        0,
    );
    if got == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    if !at.is_null() && got.cast::<u8>() != at {
        // A kernel that takes the address as a hint only (before 4.17).
        libc::munmap(got, len);
        return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(got.cast())
}

impl Drop for SlotSpan {
    fn drop(&mut self) {
        if self.leak.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the span's own mapping (placed pieces replaced pages of
        // it; munmap of the whole range removes them too).
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

impl std::fmt::Debug for SlotSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SlotSpan({} bytes, {} of {} pieces placed)",
            self.len,
            self.placed_count(),
            self.pieces.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: usize, len: usize, slot: Option<(&Arc<Region>, usize)>) -> Piece<'_> {
        Piece { offset, len, slot }
    }

    /// A placed piece is the slot itself: writes through either are seen
    /// through the other; unplaced pieces are private zeroes.
    #[test]
    fn placed_pieces_are_their_slots() {
        let a = Arc::new(Region::create(3, 2 * PAGE).expect("region a"));
        let b = Arc::new(Region::create(3, 5000).expect("region b"));
        let len = 2 * PAGE + 5000 + 100;
        let span = SlotSpan::new(
            len,
            &[
                piece(0, 2 * PAGE, Some((&a, 1))),
                piece(2 * PAGE, 5000, Some((&b, 2))),
                piece(2 * PAGE + 5000, 100, None),
            ],
        )
        .expect("span");
        assert!(span.placed(0).is_some());
        // 5000 is not a page multiple and the piece is not last: not placed.
        assert!(span.placed(1).is_none() && span.placed(2).is_none());
        assert!(span.is_slot(0, 2 * PAGE, &a, 1));
        assert!(!span.is_slot(0, 2 * PAGE, &a, 0) && !span.is_slot(0, 2 * PAGE, &b, 1));
        // SAFETY: this test is the only user of the regions and the span.
        unsafe {
            let s = std::slice::from_raw_parts_mut(span.as_ptr(), len);
            assert!(s.iter().all(|&x| x == 0));
            s[10] = 7;
            s[2 * PAGE - 1] = 9;
            s[2 * PAGE] = 5;
            assert_eq!(a.slot(1)[10], 7);
            assert_eq!(a.slot(1)[2 * PAGE - 1], 9);
            assert!(a.slot(0).iter().all(|&x| x == 0));
            assert!(
                b.slot(2).iter().all(|&x| x == 0),
                "an unplaced piece is private"
            );
            a.slot_mut(1)[11] = 3;
            assert_eq!(s[11], 3);
        }
    }

    /// The last piece may end inside a page; the span outlives the
    /// regions it was made of.
    #[test]
    fn a_last_piece_of_any_length_and_a_span_that_outlives_its_regions() {
        let a = Arc::new(Region::create(2, PAGE).expect("region a"));
        let b = Arc::new(Region::create(2, 300).expect("region b"));
        let span = SlotSpan::new(
            PAGE + 300,
            &[
                piece(0, PAGE, Some((&a, 0))),
                piece(PAGE, 300, Some((&b, 1))),
            ],
        )
        .expect("span");
        assert_eq!(span.placed_count(), 2);
        assert!(span.is_slot(PAGE, 300, &b, 1) && span.is_slot(0, PAGE, &a, 0));
        assert!(!span.is_slot(PAGE, 299, &b, 1) && !span.is_slot(PAGE, 300, &a, 1));
        // SAFETY: addresses only (not read).
        let at = |o: usize| unsafe { span.as_ptr().add(o) }.cast_const();
        assert!(span.is_slot_at(at(PAGE), 300, &b, 1) && span.is_slot_at(at(0), PAGE, &a, 0));
        assert!(!span.is_slot_at(at(1), PAGE, &a, 0));
        assert!(!span.is_slot_at(std::ptr::null(), PAGE, &a, 0));
        // SAFETY: the only user.
        unsafe {
            b.slot_mut(1)[299] = 42;
            assert_eq!(*span.as_ptr().add(PAGE + 299), 42);
        }
        drop((a, b));
        // SAFETY: the span's own memory, mapped while it lives.
        unsafe {
            *span.as_ptr().add(PAGE + 1) = 1;
            assert_eq!(*span.as_ptr().add(PAGE + 299), 42);
        }
    }

    /// A detached span keeps its contents and addresses, and no longer
    /// reaches the slots (nor do the slots reach it).
    #[test]
    fn a_detached_span_keeps_its_bytes_and_leaves_the_slots() {
        let a = Arc::new(Region::create(2, PAGE + 10).expect("region"));
        let len = PAGE + 10;
        let span = SlotSpan::new(len, &[piece(0, len, Some((&a, 1)))]).expect("span");
        let p = span.as_ptr();
        // SAFETY: the only user of the region and the span.
        unsafe {
            for i in 0..len {
                *p.add(i) = (i % 251) as u8;
            }
            span.detach().expect("detach");
            assert!(span.is_detached() && span.placed(0).is_none());
            assert!(!span.is_slot(0, len, &a, 1) && span.placed_count() == 0);
            assert_eq!(span.as_ptr(), p);
            let s = std::slice::from_raw_parts_mut(p, len);
            assert!(s.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8));
            s[5] = 0;
            assert_eq!(a.slot(1)[5], 5, "a write after detach reached the slot");
            a.slot_mut(1)[6] = 0;
            assert_eq!(s[6], 6, "the slot reached the detached span");
        }
        span.detach().expect("twice");
    }

    #[test]
    fn pieces_that_do_not_tile_the_span_are_refused() {
        let a = Arc::new(Region::create(2, PAGE).expect("region"));
        let gap = SlotSpan::new(
            2 * PAGE,
            &[piece(0, PAGE, None), piece(PAGE + 1, PAGE - 1, None)],
        );
        assert!(gap.is_err());
        let short = SlotSpan::new(2 * PAGE, &[piece(0, PAGE, Some((&a, 0)))]);
        assert!(short.is_err());
        let bad_slot = SlotSpan::new(PAGE, &[piece(0, PAGE, Some((&a, 2)))]);
        assert!(bad_slot.is_err());
        // A slot shorter than its piece stays out.
        let long = SlotSpan::new(2 * PAGE, &[piece(0, 2 * PAGE, Some((&a, 0)))]).expect("span");
        assert_eq!(long.placed_count(), 0);
    }
}
