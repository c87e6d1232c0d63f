//! An op's closure, kept in the op's own block (`Op<B>` is coerced to
//! `Op<dyn BodyCell>`) and taken once: `SyncBody` for `push_sync`,
//! `AsyncBody` for `push_async`, both over `TakeOnce`.
//!
//! # TakeOnce
//!
//! Two states: FULL (`taken` false; `f` holds the closure) and TAKEN
//! (`taken` true; `f` was moved out, or is being). `take` swaps `taken` to
//! true: the one swap that saw false moves `f` out and owns it; every
//! other gets None. The drop drops `f` only in FULL (it has the cell to
//! itself). The closure was written before the op was shared (a worker
//! gets the op through the pool's queue, after the wait counter's last
//! subtraction, which follows the var locks' grants: every step
//! release/acquire), so the swap itself orders nothing and is Relaxed;
//! it is atomic so that two takers can never both see FULL.
//!
//! Why not `Mutex<Option<F>>`, as before: a take was two locked
//! instructions where this is one, and the mutex's byte and the option's
//! tag cost an op with a one-word closure the block size class that fits
//! it (`op_block.rs`: 128 bytes, against 256; the dispatch bench's (a)
//! ran 17 to 20% faster with its ops in the smaller class).

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::OpError;
use crate::op::{Completion, OpRef, RunContext};

/// What running a body gave.
pub(crate) enum Ran {
    /// A `push_sync` closure returned this.
    Sync(Result<(), OpError>),
    /// A `push_async` closure returned; its completion handle finishes the op.
    Async,
    /// The closure was taken already (the op was finished without running).
    Gone,
}

/// An op's closure, taken and run once.
pub(crate) trait BodyCell: Send + Sync {
    fn run(&self, ctx: RunContext<'_>, op: &OpRef) -> Ran;
    /// Drops the closure without running it.
    fn discard(&self);
}

/// A value that one caller takes out of a shared reference (module docs).
pub(crate) struct TakeOnce<F> {
    taken: AtomicBool,
    f: UnsafeCell<MaybeUninit<F>>,
}

// SAFETY: a `TakeOnce` hands its value, by value, to one thread (the swap
// that saw FULL), as a `Mutex<Option<F>>` does: sending or sharing it is
// safe when sending `F` is.
unsafe impl<F: Send> Send for TakeOnce<F> {}
// SAFETY: as for Send; a shared reference never reads `F` in place.
unsafe impl<F: Send> Sync for TakeOnce<F> {}

impl<F> TakeOnce<F> {
    pub(crate) fn new(f: F) -> TakeOnce<F> {
        TakeOnce {
            taken: AtomicBool::new(false),
            f: UnsafeCell::new(MaybeUninit::new(f)),
        }
    }

    /// The value, to the first caller; None to every later one.
    #[inline]
    pub(crate) fn take(&self) -> Option<F> {
        if self.taken.swap(true, Ordering::Relaxed) {
            return None;
        }
        // SAFETY: this call's swap took FULL to TAKEN, so no other call
        // reads `f`, now or later, and the drop will not drop it: the value
        // moves out once, here. It was initialized by `new`.
        Some(unsafe { (*self.f.get()).assume_init_read() })
    }
}

impl<F> Drop for TakeOnce<F> {
    fn drop(&mut self) {
        if !*self.taken.get_mut() {
            // SAFETY: FULL: `f` holds the value `new` wrote, never taken.
            unsafe { self.f.get_mut().assume_init_drop() };
        }
    }
}

/// A `push_sync` closure: the op is complete when it returns.
pub(crate) struct SyncBody<F>(TakeOnce<F>);

impl<F> SyncBody<F> {
    pub(crate) fn new(f: F) -> SyncBody<F> {
        SyncBody(TakeOnce::new(f))
    }
}

/// A `push_async` closure: the op is complete when its handle says so.
pub(crate) struct AsyncBody<F>(TakeOnce<F>);

impl<F> AsyncBody<F> {
    pub(crate) fn new(f: F) -> AsyncBody<F> {
        AsyncBody(TakeOnce::new(f))
    }
}

impl<F> BodyCell for SyncBody<F>
where
    F: FnOnce(RunContext<'_>) -> Result<(), OpError> + Send,
{
    fn run(&self, ctx: RunContext<'_>, _op: &OpRef) -> Ran {
        match self.0.take() {
            Some(f) => Ran::Sync(f(ctx)),
            None => Ran::Gone,
        }
    }

    fn discard(&self) {
        drop(self.0.take());
    }
}

impl<F> BodyCell for AsyncBody<F>
where
    F: FnOnce(RunContext<'_>, Completion) + Send,
{
    fn run(&self, ctx: RunContext<'_>, op: &OpRef) -> Ran {
        match self.0.take() {
            Some(f) => {
                f(ctx, Completion::new(op.clone()));
                Ran::Async
            }
            None => Ran::Gone,
        }
    }

    fn discard(&self) {
        drop(self.0.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_value_goes_to_one_taker_and_is_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        // Taken: the taker drops it; the cell's drop does not.
        let cell = TakeOnce::new(Counted(drops.clone()));
        let v = cell.take();
        assert!(v.is_some());
        assert!(cell.take().is_none(), "a second take got the value");
        drop(v);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        drop(cell);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        // Never taken: the cell's drop drops it.
        drop(TakeOnce::new(Counted(drops.clone())));
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn racing_takers_get_it_once() {
        for _ in 0..200 {
            let drops = Arc::new(AtomicUsize::new(0));
            let cell = Arc::new(TakeOnce::new(Counted(drops.clone())));
            let got: usize = (0..4)
                .map(|_| {
                    let cell = cell.clone();
                    std::thread::spawn(move || cell.take().is_some() as usize)
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(got, 1);
            drop(cell);
            assert_eq!(drops.load(Ordering::Relaxed), 1);
        }
    }
}
