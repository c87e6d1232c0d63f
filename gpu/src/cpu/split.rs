//! The kernels' helper threads: a large kernel call is cut into chunks that
//! the calling thread and the helpers claim one at a time.
//!
//! Why not a rayon pool (what this replaced, BENCHMARKS.md "Kernel helpers
//! that the caller works beside"): a call into a rayon pool from outside it
//! sleeps until the pool's threads have done every chunk, and those threads
//! then spin, yielding, for a while before they sleep. On a machine whose
//! cores are all busy (a server's socket threads, a worker's waiters) that
//! cost a sleep and a wake-up per call and kept two more threads runnable.
//! Here the caller works too, and takes every chunk no helper took: a call
//! never waits for a helper to start, only for chunks a helper has started
//! (and, if that helper is preempted meanwhile, until it runs again: the
//! caller then spins and yields). Helpers sleep as soon as no chunk is left.
//!
//! # States and orderings
//!
//! A call publishes a `Job` under the lock (helpers read it under the lock:
//! they see the job's fields), wakes the helpers, and claims chunks itself.
//! - `next`: the next chunk to claim (`fetch_add`; a claim at or past `n`
//!   is no chunk and runs nothing).
//! - `done`: chunks finished. A chunk's runner adds one with `Release` after
//!   the chunk's writes; the caller returns once it reads `n` with
//!   `Acquire`, so every chunk's writes happen before the call returns.
//!
//! Subtle: the job's closure lives on the caller's stack; a raw pointer to
//! it, its lifetime erased, reaches the helpers. A helper calls it only
//! for a chunk it claimed below `n`, and the caller returns only after
//! `done == n`, that is after every such call has returned. A helper that
//! wakes late claims past `n` and touches only the job's counters, which
//! its `Arc` keeps. The caller's wait is in a drop guard made before the
//! helpers are woken, so an unwind out of the call still waits. A chunk
//! that panics is counted as done, its payload kept (not dropped on the
//! chunk's thread), and the caller raises it again after the wait (a
//! kernel's chunks index checked slices: a panic is a bug).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Checks of `done` between yields while the caller waits for chunks that
/// helpers are running.
const WAIT_SPINS: u32 = 64;

/// One call's chunks.
struct Job {
    /// Runs chunk `i`: the caller's closure, valid while the call lasts
    /// and called only then (see the module docs). A raw pointer, not a
    /// reference: a job may outlive the closure in a late helper's hands.
    run: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// The first chunk's panic, raised again on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `run` points to a `Sync` closure, called only while its call
// lasts (see `work`); the rest are atomics.
#[allow(unsafe_code)]
unsafe impl Send for Job {}
#[allow(unsafe_code)]
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs chunks until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: `i < n` was claimed here, so the call has not
            // returned (it waits for this chunk's `done`): the closure is
            // alive, and shared (`Sync`) between the threads running chunks.
            #[allow(unsafe_code)]
            let run = unsafe { &*self.run };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run(i))) {
                // Kept, not dropped here: a payload's drop could panic
                // again, and this thread must reach `done` below.
                let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                match *first {
                    None => *first = Some(payload),
                    Some(_) => std::mem::forget(payload),
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// Spins (yielding now and then) until every chunk is done.
    fn wait(&self) {
        let mut spins: u32 = 0;
        while self.done.load(Ordering::Acquire) < self.n {
            spins = spins.wrapping_add(1);
            if spins % WAIT_SPINS == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Waits for every chunk of its job when dropped, so that the caller's
/// frame (the closure and what it borrows) outlives every chunk even if
/// the caller unwinds between publishing the job and its own wait.
struct WaitAll<'a>(&'a Job);

impl Drop for WaitAll<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

#[derive(Default)]
struct State {
    /// The latest call's job (a call clears it when it returns, if it is
    /// still its own; calls at once: the helpers serve the latest, the
    /// others do their chunks alone).
    job: Option<Arc<Job>>,
    /// Bumped per published job, so a helper takes each job once.
    published: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The helper threads of a `CpuKernels` (threads - 1 of them: the caller
/// is the other).
pub(super) struct Helpers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Helpers {
    /// Starts `n` helper threads named `pskv-kernel-{i}`.
    pub(super) fn start(n: usize) -> std::io::Result<Helpers> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let mut helpers = Helpers {
            shared: shared.clone(),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("pskv-kernel-{i}"))
                .spawn(move || helper_loop(&shared))?;
            // (On an error, `helpers`' drop stops the ones started.)
            helpers.threads.push(t);
        }
        Ok(helpers)
    }

    /// Runs `f(part)` for every part, on this thread and on helpers that
    /// are free; returns when every part is done.
    pub(super) fn for_each<P: Send>(&self, parts: Vec<P>, f: impl Fn(P) + Sync) {
        let n = parts.len();
        if n <= 1 || self.threads.is_empty() {
            parts.into_iter().for_each(f);
            return;
        }
        let slots: Vec<Mutex<Option<P>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
        let run = |i: usize| {
            let part = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            // Each index is claimed once (`Job::next`), so the part is there.
            if let Some(part) = part {
                f(part);
            }
        };
        self.run(n, &run);
    }

    fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased (same pointer, same vtable):
        // see the module docs and `Job::work` for why it is never used
        // after this function returns.
        #[allow(unsafe_code)]
        let run = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(run)
        };
        let job = Arc::new(Job {
            run,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        });
        {
            let mut st = self.lock();
            st.job = Some(job.clone());
            st.published += 1;
        }
        let waited = WaitAll(&job);
        self.shared.wake.notify_all();
        job.work();
        drop(waited);
        {
            let mut st = self.lock();
            if st.job.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job)) {
                st.job = None;
            }
        }
        let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            // A chunk panicked (a bug in the kernel): on the caller, as if
            // the chunk had run here.
            std::panic::resume_unwind(payload);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn helper_loop(shared: &Shared) {
    let mut seen = 0;
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if st.published != seen {
                    seen = st.published;
                    if let Some(job) = &st.job {
                        break job.clone();
                    }
                }
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        job.work();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_with_and_without_helpers() {
        for helpers in [0, 1, 3] {
            let h = Helpers::start(helpers).unwrap();
            for n in [0, 1, 2, 7, 64] {
                let mut out = vec![0u32; n];
                let parts: Vec<(usize, &mut u32)> = out.iter_mut().enumerate().collect();
                h.for_each(parts, |(i, o)| *o += i as u32 + 1);
                assert!(out.iter().enumerate().all(|(i, &o)| o == i as u32 + 1));
            }
        }
    }

    #[test]
    fn calls_from_several_threads_at_once_each_finish_their_own() {
        let h = Helpers::start(2).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let h = &h;
                s.spawn(move || {
                    for round in 0..200u64 {
                        let mut out = [0u64; 16];
                        let parts: Vec<(usize, &mut u64)> = out.iter_mut().enumerate().collect();
                        h.for_each(parts, |(i, o)| *o = t * 1000 + round + i as u64);
                        for (i, &o) in out.iter().enumerate() {
                            assert_eq!(o, t * 1000 + round + i as u64);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_fails_the_call_after_the_others_finished() {
        let h = Helpers::start(1).unwrap();
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            h.for_each((0..8).collect(), |i: usize| {
                if i == 3 {
                    panic!("planted");
                }
                ran.fetch_add(1, Ordering::Relaxed);
            })
        }));
        // The chunk's own panic, raised on the caller.
        let payload = r.expect_err("the call panics");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"planted"));
        assert_eq!(ran.load(Ordering::Relaxed), 7);
        // The helpers still serve later calls.
        let mut out = [0u8; 4];
        h.for_each(out.iter_mut().collect(), |o| *o = 1);
        assert_eq!(out, [1; 4]);
    }
}
