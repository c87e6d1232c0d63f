//! `OpRef`, the counted handle to an op in flight, and the recycled blocks
//! that hold ops. `unsafe` code, as is `core_ref.rs`.
//!
//! Why: an op is one allocation (header and closure), made by the thread
//! that pushes it and most often freed by the worker that finishes it. The
//! system allocator's per-thread caches do not serve that flow: the
//! workers' frees return to the pusher's arena under its lock, and the
//! pusher's next allocations take the same lock (`perf` of the dispatch
//! bench: a fifth of the pusher's time in glibc's arena-lock futex waits
//! and wakes). MXNet, too, takes its op blocks from a pool of its own.
//!
//! # Blocks
//!
//! A block is one of `CLASSES` sizes (128 B doubling to 2 KiB), aligned to
//! 16 B (the system allocator's own alignment: its fast path); an op
//! larger or more aligned than that is an ordinary allocation. Free blocks
//! of a class are kept in two places, and a block only ever sits among
//! its own class's:
//!
//! - per thread, a stack of at most `2 * BATCH`: a free pushes, an
//!   allocation pops;
//! - per process, a queue of at most `GLOBAL_BATCHES` batches of `BATCH`
//!   blocks or fewer, under one mutex per class. A thread whose stack is
//!   full moves its `BATCH` oldest blocks there; a thread whose stack is
//!   empty takes the oldest batch. Blocks so flow from the threads that
//!   finish ops to the threads that push them, at one lock per `BATCH` ops.
//!   (The `Vec` that carries a batch is the system allocator's, made by
//!   the giver and freed by the taker: one per `BATCH` ops. Letting those
//!   circulate instead made the chain below slower, 51 against 40 ms, in
//!   the one run tried.)
//!
//! The caps are small on purpose: a chain of ops queued on one var (the
//! dispatch bench's (b)) ran slower the more blocks were recycled (fresh
//! memory: 35 ms; 16 batches: 40 ms; 4,096 batches: 51 ms), while the
//! pusher of independent ops needs only enough to skip the system
//! allocator's lock most of the time (BENCHMARKS.md, "Recycled op blocks").
//!
//! Beyond those caps, and for a thread whose stack is gone (its exit) or
//! busy, blocks go to and come from the system allocator with the class's
//! layout, so a block can always be freed either way. A thread's stack moves
//! to the process's at its exit. What is kept is bounded: per live thread
//! that freed ops, `2 * BATCH` blocks of each class (248 KiB if every class
//! were full); per process, `GLOBAL_BATCHES * BATCH` of each (1.94 MiB if
//! every class were full).
//!
//! # OpRef
//!
//! A block holds a `Counted` op: a reference count and the op (`Op<B>` for
//! the closure's type `B`, seen through the handle as `Op<dyn BodyCell>`).
//! `OpRef` follows `Arc`'s protocol on that count: a clone adds one
//! (Relaxed: the clone already holds a reference, nothing is published);
//! a drop subtracts one with Release, and the drop that reaches zero
//! fences with Acquire before it drops the op and frees the block, so every
//! other holder's use of the op happens before its destruction.
//!
//! # Waiting: the handles of an op not yet ready
//!
//! A var queue holds the ops that wait for it, and a release hands the ops
//! it grants on to `Waiting::grant`: those handles (`Waiting`) hold no
//! count. The op's wait counter (`Op::wait`) keeps it alive instead:
//!
//! - **W1.** A push makes the op with one count (its own handle) and a
//!   wait counter of its var count plus one (the push's hold). The push
//!   appends the op to each var, then takes its hold and the vars granted
//!   at once off the counter: if that reaches zero, the push dispatches
//!   the op with its count; else it leaves the count to the counter and
//!   touches the op no more (a push that keeps a handle, the naive
//!   engine's, clones it before its subtraction). The push holds its handle
//!   in a `ManuallyDrop`: an unwind from inside it leaks the op rather than
//!   free it under a handle a queue holds.
//! - **W2.** The one subtraction that takes the counter to zero gets that
//!   count back as a handle (`Waiting::grant`): the op is then ready, and
//!   the handle dispatches it, as the push's own would have.
//! - **W3.** So while a `Waiting` has not made its subtraction, the
//!   counter is above zero and the op cannot run, finish or be freed: the
//!   handle is valid. `grant` consumes it: its holder does not touch the
//!   op after the subtraction (another may have freed it by then).
//!   Subtle: the subtractions are AcqRel (`Waiting::grant`), so every
//!   holder's reads of the op come before the last one's, which then
//!   passes them on to the handle's drop as a clone would have.
//!
//! A `Waiting` dropped without its grant leaves its op waiting for good
//! and its block allocated (a leak, never a free): only an unwind out of
//! the engine's own release path could do that, and the op would have
//! waited for good before too.
//!
//! Why: a counted handle per queued append cost the pusher a locked
//! addition per var, its own handle's drop a locked subtraction, and every
//! release that granted an op not yet ready another (the fan-in's sink: a
//! thousand, from two workers, on the line of its wait counter).
//!
//! Checked under Miri (not in CI, which has no nightly toolchain):
//! `cargo +nightly miri test -p pskv-engine --lib op_block`, and engine
//! tests through `OpRef` with `MIRIFLAGS="-Zmiri-disable-isolation
//! -Zmiri-ignore-leaks"` (pool threads still run at exit). Checked under
//! AddressSanitizer and its leak check (not in CI either), the engine
//! tests and a driver of 2,000 random programs:
//! `RUSTFLAGS=-Zsanitizer=address cargo +nightly test -p pskv-engine
//! --target x86_64-unknown-linux-gnu` (a count left over on purpose, one
//! per grant that made an op ready, shows there as leaks by the hundred
//! thousand). The loom model of the var queue (`var::queue::loom_tests`)
//! keeps its queues' handles uncounted as W1-W3 say, and fails on a count
//! left over.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::body::BodyCell;
use crate::op::Op;

/// Size classes: 128 B, 256 B, ..., 2 KiB.
const CLASSES: usize = 5;
const SMALLEST: usize = 128;
const ALIGN: usize = 16;
/// Blocks moved between a thread and the process at once.
const BATCH: usize = 32;
/// Batches of each class the process keeps.
const GLOBAL_BATCHES: usize = 16;

/// The class a layout is served from, or None (an ordinary allocation).
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > ALIGN {
        return None;
    }
    let size = layout.size().max(SMALLEST).next_power_of_two();
    let class = (size / SMALLEST).trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

fn class_layout(class: usize) -> Layout {
    // Powers of two up to 2 KiB, aligned to 16: always a valid layout.
    Layout::from_size_align(SMALLEST << class, ALIGN).expect("a block's layout is valid")
}

/// A free block, owned by the stack that holds it (always a stack of its
/// own class: `give`, `dealloc` and the next allocation rely on it).
struct Free(NonNull<u8>);

// SAFETY: a free block is plain memory that no one else refers to; whoever
// holds the `Free` owns it, on any thread.
unsafe impl Send for Free {}

/// What the process keeps of each class: batches of free blocks, the
/// oldest first.
static GLOBAL: [Mutex<VecDeque<Vec<Free>>>; CLASSES] =
    [const { Mutex::new(VecDeque::new()) }; CLASSES];

/// A thread's stacks of free blocks, per class.
struct Local {
    stacks: [Vec<Free>; CLASSES],
}

impl Drop for Local {
    fn drop(&mut self) {
        for (class, stack) in self.stacks.iter_mut().enumerate() {
            while !stack.is_empty() {
                give(class, stack, BATCH);
            }
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local { stacks: [const { Vec::new() }; CLASSES] })
    };
}

fn global(class: usize) -> std::sync::MutexGuard<'static, VecDeque<Vec<Free>>> {
    // Nothing panics while holding it; a poisoned lock holds valid data.
    GLOBAL[class].lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves the `n` oldest blocks of `stack` (all, if fewer) to the process,
/// or frees them past its cap.
fn give(class: usize, stack: &mut Vec<Free>, n: usize) {
    let batch: Vec<Free> = stack.drain(..n.min(stack.len())).collect();
    let mut g = global(class);
    if g.len() < GLOBAL_BATCHES {
        g.push_back(batch);
        return;
    }
    drop(g);
    for block in batch {
        system_free(class, block);
    }
}

/// Refills an empty `stack` with the process's oldest batch; false if it
/// has none.
fn take(class: usize, stack: &mut Vec<Free>) -> bool {
    let Some(batch) = global(class).pop_front() else {
        return false;
    };
    *stack = batch;
    true
}

fn system_alloc(layout: Layout) -> NonNull<u8> {
    assert!(layout.size() != 0, "an op block is never empty");
    // SAFETY: the layout has a non-zero size (checked above).
    NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| handle_alloc_error(layout))
}

/// Returns a free block of `class` to the system allocator.
fn system_free(class: usize, Free(p): Free) {
    // SAFETY: a `Free` owns its block, which was allocated with its
    // class's layout (the invariant on `Free`).
    unsafe { dealloc(p.as_ptr(), class_layout(class)) };
}

/// The most cache lines of a free block asked for ahead (`alloc_block`).
const PREFETCH_LINES: usize = 4;

/// A block for `layout`.
fn alloc_block(layout: Layout) -> NonNull<u8> {
    let Some(class) = class_of(layout) else {
        return system_alloc(layout);
    };
    let reused = LOCAL
        .try_with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let stack = &mut l.stacks[class];
            if stack.is_empty() && !take(class, stack) {
                return None;
            }
            let block = stack.pop();
            // The thread's next block: its lines come for writing while
            // this push goes on (a block comes back from the worker that
            // finished its op, so its lines sit in that worker's cache:
            // `perf` of the dispatch bench's (a) put nearly half of the
            // pusher's samples, 23% of all, on the stall of the first read
            // of a new op and of the next locked instruction, which waits
            // for the stores before it).
            if let Some(next) = stack.last() {
                crate::prefetch::bytes_for_write(
                    next.0.as_ptr(),
                    SMALLEST << class,
                    PREFETCH_LINES,
                );
            }
            block
        })
        .ok()
        .flatten();
    match reused {
        Some(Free(p)) => p,
        None => system_alloc(class_layout(class)),
    }
}

/// Frees a block that `alloc_block(layout)` gave.
///
/// # Safety
/// `p` came from `alloc_block(layout)` and nothing refers to it any more.
unsafe fn free_block(p: NonNull<u8>, layout: Layout) {
    let Some(class) = class_of(layout) else {
        // SAFETY: allocated by `system_alloc(layout)` (the caller's contract).
        unsafe { dealloc(p.as_ptr(), layout) };
        return;
    };
    let kept = LOCAL
        .try_with(|l| {
            let Ok(mut l) = l.try_borrow_mut() else {
                return false;
            };
            let stack = &mut l.stacks[class];
            stack.push(Free(p));
            if stack.len() >= 2 * BATCH {
                // The oldest go: the newest are the likeliest still in cache.
                give(class, stack, BATCH);
            }
            true
        })
        .unwrap_or(false);
    if !kept {
        system_free(class, Free(p));
    }
}

/// What a block holds: the reference count and the op.
pub(crate) struct Counted<B: ?Sized> {
    refs: AtomicUsize,
    op: Op<B>,
}

/// A counted reference to an op in a recycled block (`Arc<Op>`'s role).
pub(crate) struct OpRef {
    ptr: NonNull<Counted<dyn BodyCell>>,
    /// Owns a share of the op, as `Arc` does (drop check, auto traits).
    _owns: PhantomData<Counted<dyn BodyCell>>,
}

// SAFETY: an `OpRef` shares an `Op<dyn BodyCell>`, which is Send and Sync
// (checked below), and its count is atomic: sending or sharing the handle
// is `Arc`'s case.
unsafe impl Send for OpRef {}
// SAFETY: as for Send.
unsafe impl Sync for OpRef {}

/// The compiler's check of what the impls above assume: a field added to
/// `Op` that is not Send and Sync fails the build here.
const _: fn() = || {
    fn shared<T: ?Sized + Send + Sync>() {}
    shared::<Op<dyn BodyCell>>();
};

impl OpRef {
    /// Moves `op` into a block.
    pub(crate) fn new<B: BodyCell + 'static>(op: Op<B>) -> OpRef {
        let block = alloc_block(Layout::new::<Counted<B>>()).cast::<Counted<B>>();
        // SAFETY: the block is fresh, sized and aligned for `Counted<B>`.
        unsafe {
            block.as_ptr().write(Counted {
                refs: AtomicUsize::new(1),
                op,
            })
        };
        OpRef {
            ptr: block,
            _owns: PhantomData,
        }
    }

    fn counted(&self) -> &Counted<dyn BodyCell> {
        // SAFETY: this handle holds a reference, so the block is alive.
        unsafe { self.ptr.as_ref() }
    }

    /// An id unique among live ops (its address).
    pub(crate) fn key(&self) -> usize {
        self.ptr.as_ptr() as *const () as usize
    }

    /// An uncounted handle for one of the op's var queues (W3).
    ///
    /// # Safety
    /// Called by the op's push on its own handle, once per var that
    /// queues the op, before the push's subtraction (W1): each handle made
    /// stands for one subtraction still to come.
    #[inline]
    pub(crate) unsafe fn waiting(&self) -> Waiting {
        Waiting { ptr: self.ptr }
    }
}

/// An uncounted handle to an op waiting for its grants (W3): a var queue's
/// entry, or a release's grant on its way to `grant`.
pub(crate) struct Waiting {
    ptr: NonNull<Counted<dyn BodyCell>>,
}

// SAFETY: as `OpRef`'s: the op it points at is Send and Sync, and the
// handle only reads it (and subtracts from its atomic wait counter).
unsafe impl Send for Waiting {}
// SAFETY: as for Send.
unsafe impl Sync for Waiting {}

impl Waiting {
    /// Counts one grant off the op's wait counter; the op's in-flight
    /// count, as a handle, if this took the counter to zero (W2): the op
    /// is ready.
    #[inline]
    pub(crate) fn grant(self) -> Option<OpRef> {
        // Subtle: the counter alone is borrowed, not the op: after a
        // subtraction that is not the last, another thread may free the
        // block while this call still runs, and a reference to the whole op
        // would claim its memory for as long as the call.
        // SAFETY: the handle has not made its subtraction: the op is alive
        // (W3).
        let wait = unsafe { &*std::ptr::addr_of!((*self.ptr.as_ptr()).op.wait) };
        // Subtle: AcqRel. The grants were made under different var locks by
        // different threads; the thread that reaches zero must see all of
        // them (and the op's fields) before it runs the op.
        if wait.fetch_sub(1, Ordering::AcqRel) == 1 {
            Some(OpRef {
                ptr: self.ptr,
                _owns: PhantomData,
            })
        } else {
            None
        }
    }

    /// Asks the CPU to bring the two cache lines from the block's start
    /// into this core's cache, without waiting: the count and the op's
    /// first fields (blocks are 16-byte aligned and the field order is the
    /// compiler's, so most of the header, likely not all of it): for an op
    /// that will be granted soon.
    #[inline]
    pub(crate) fn prefetch(&self) {
        crate::prefetch::for_read(self.ptr.as_ptr() as *const u8, 2);
    }
}

impl Deref for Waiting {
    type Target = Op;

    fn deref(&self) -> &Op {
        // SAFETY: valid until its `grant` (W3), which consumes it.
        unsafe { &self.ptr.as_ref().op }
    }
}

impl fmt::Debug for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Deref for OpRef {
    type Target = Op;

    fn deref(&self) -> &Op {
        &self.counted().op
    }
}

impl Clone for OpRef {
    fn clone(&self) -> OpRef {
        let before = self.counted().refs.fetch_add(1, Ordering::Relaxed);
        // As `Arc`: a count this high means leaked handles by the billions.
        if before > isize::MAX as usize {
            std::process::abort();
        }
        OpRef {
            ptr: self.ptr,
            _owns: PhantomData,
        }
    }
}

impl Drop for OpRef {
    fn drop(&mut self) {
        if self.counted().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Subtle: pairs with every other holder's Release subtraction, so
        // their uses of the op happen before it is dropped.
        fence(Ordering::Acquire);
        let layout = Layout::for_value(self.counted());
        // SAFETY: the count reached zero: this was the last handle, so the
        // op is dropped once and the block freed with the layout it was
        // allocated for (`for_value` of the value `new` wrote).
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            free_block(self.ptr.cast::<u8>(), layout);
        }
    }
}

impl fmt::Debug for OpRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_128_bytes_to_2_kib() {
        let l = |size, align| Layout::from_size_align(size, align).unwrap();
        assert_eq!(class_of(l(8, 8)), Some(0));
        assert_eq!(class_of(l(128, 8)), Some(0));
        assert_eq!(class_of(l(129, 8)), Some(1));
        assert_eq!(class_of(l(2048, 16)), Some(4));
        assert_eq!(class_of(l(2049, 8)), None);
        assert_eq!(class_of(l(64, 32)), None);
    }

    /// A block's address, sent to another thread.
    struct Sent(NonNull<u8>);
    // SAFETY: the test hands each block to exactly one thread.
    unsafe impl Send for Sent {}

    /// Frees every block this thread and the process keep (so that Miri's
    /// leak check sees the rest of the test's memory returned).
    fn release_all() {
        LOCAL.with(|l| {
            for (class, stack) in l.borrow_mut().stacks.iter_mut().enumerate() {
                stack.drain(..).for_each(|b| system_free(class, b));
            }
        });
        for class in 0..CLASSES {
            let batches: Vec<Vec<Free>> = global(class).drain(..).collect();
            batches
                .into_iter()
                .flatten()
                .for_each(|b| system_free(class, b));
        }
    }

    /// An op whose closure holds one word takes the smallest class (two
    /// cache lines): a field added to `Op` that breaks this costs every
    /// such op a 256-byte block (`Op`'s layout docs).
    #[test]
    fn one_word_closures_fit_the_smallest_class() {
        fn layout_of<F>(_: &F) -> Layout {
            Layout::new::<Counted<crate::body::SyncBody<F>>>()
        }
        let x = 7usize;
        let f = move |_: crate::op::RunContext<'_>| -> Result<(), crate::error::OpError> {
            std::hint::black_box(x);
            Ok(())
        };
        let layout = layout_of(&f);
        assert_eq!(
            class_of(layout),
            Some(0),
            "a one-word closure's op takes {} bytes, past the {SMALLEST}-byte class",
            layout.size()
        );
    }

    /// Blocks freed on another thread reach the process's queue at that
    /// thread's exit, and the next allocation of their class takes them;
    /// every size (inside and outside the classes) round-trips.
    #[test]
    fn blocks_freed_elsewhere_come_back_through_the_process() {
        let rounds = if cfg!(miri) { 2 } else { 20 };
        let sizes = [16usize, 200, 700, 2048, 5000];
        let layout = move |i: usize| Layout::from_size_align(sizes[i % sizes.len()], 8).unwrap();
        for _ in 0..rounds {
            release_all();
            let made: Vec<(Sent, usize)> = (0..3 * BATCH)
                .map(|i| {
                    let p = alloc_block(layout(i));
                    // SAFETY: a fresh block of at least the layout's size.
                    unsafe { p.as_ptr().write_bytes(i as u8, layout(i).size()) };
                    (Sent(p), i)
                })
                .collect();
            std::thread::spawn(move || {
                for (Sent(p), i) in made {
                    let last = layout(i).size() - 1;
                    // SAFETY: what the other thread wrote is still there.
                    assert_eq!(unsafe { *p.as_ptr().add(last) }, i as u8);
                    // SAFETY: from alloc_block(layout), used no more.
                    unsafe { free_block(p, layout(i)) };
                }
            })
            .join()
            .unwrap();
            // 200 B blocks (class 1): the other thread freed 20 of them.
            let class = class_of(layout(1)).unwrap();
            let queued: Vec<usize> = global(class)
                .iter()
                .flatten()
                .map(|Free(p)| p.as_ptr() as usize)
                .collect();
            assert!(!queued.is_empty(), "the exiting thread queued nothing");
            let p = alloc_block(layout(1));
            assert!(
                queued.contains(&(p.as_ptr() as usize)),
                "not a queued block"
            );
            // SAFETY: from alloc_block, unused.
            unsafe { free_block(p, layout(1)) };
        }
        release_all();
    }
}
