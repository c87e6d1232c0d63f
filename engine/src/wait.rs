//! Waiting for ops: a one-shot latch that a thread can block on (with a
//! timeout) or a task can await, and the [`VarReady`] future.
//!
//! # Latch states
//!
//! UNSET → SET, once (`set`). `set` takes the lock, flips the flag, takes the
//! registered waker, releases the lock, then wakes the condvar and the waker.
//! A waiter checks the flag under the same lock before sleeping or
//! registering its waker, so no wake-up is lost.
//!
//! A blocking waiter first spins for up to `PSKV_SPIN_US` microseconds
//! (default 50, yielding the core between rounds) on a mirror of the flag,
//! `fast`: on this kind of VM a futex wake-up costs about 30 µs, more than
//! the whole wait for a short op. `fast` is stored with Release after the
//! flag is set under the lock and read with Acquire, so a spinner that sees
//! it sees everything the setter did before `set`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::EngineError;
use crate::var::Var;

/// Spins until `done()` (true) or for `budget` (false), yielding the core
/// between rounds to the thread that will make it done (on a VM with fewer
/// cores than busy threads, a spinner that never yields starves it: rounds
/// are 8 checks while yields run other threads, 16 in the first 10 µs of
/// the wait and 64 after it while they return at once), and running the
/// progress hooks between rounds
/// ([`crate::progress`]). For waits whose end usually comes within
/// microseconds: a futex wake-up costs tens of them here. `done` should
/// read with Acquire.
pub fn spin_until(budget: Duration, done: impl Fn() -> bool) -> bool {
    // Done already (often, for a small request): no clock read.
    if budget.is_zero() || done() {
        return done();
    }
    // A wait that polled ends with an End or a Leave, even one that
    // unwinds out of a hook or `done` (a Leave then: the hooks count
    // their pollers).
    struct Ends {
        polled: bool,
    }
    impl Drop for Ends {
        fn drop(&mut self) {
            if self.polled && std::thread::panicking() {
                crate::progress::run(crate::progress::Call::Leave);
            }
        }
    }
    let mut ends = Ends { polled: false };
    let set = spin_polling(budget, &done, &mut ends.polled);
    // (A hook that unwinds inside this last call leaves the hooks after it
    // uncalled: they learn of this wait's end at the thread's next one.)
    if std::mem::take(&mut ends.polled) {
        // Done: this thread polls no more, and does not sleep. Not done:
        // about to sleep, so whoever stood back while we polled reads
        // again.
        crate::progress::run(if set {
            crate::progress::Call::End
        } else {
            crate::progress::Call::Leave
        });
    }
    set || done()
}

/// `spin_until`'s rounds (`polled`: it ran the hooks at least once).
fn spin_polling(budget: Duration, done: &impl Fn() -> bool, polled: &mut bool) -> bool {
    let start = Instant::now();
    let end = start + budget;
    let mut checks = EARLY_CHECKS;
    loop {
        for _ in 0..checks {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        // Read what we may be waiting for ourselves (`progress.rs`).
        if crate::progress::active() {
            *polled = true;
            if crate::progress::run(crate::progress::Call::Poll) && done() {
                return true;
            }
        }
        let now = Instant::now();
        if now >= end {
            return done();
        }
        std::thread::yield_now();
        // A yield that took a while ran another thread on this core: more
        // threads want the cores than there are, and the one we wait for
        // may be among them, so yield sooner next time. One that returned
        // at once gave nothing away: yielding often would only add system
        // calls (a 4 B round with 1 worker, 1 server: 7% slower).
        checks = if now.elapsed() >= HANDED_OVER {
            CONTENDED_CHECKS
        } else if now - start < EARLY {
            EARLY_CHECKS
        } else {
            CHECKS
        };
    }
}

/// Checks between yields while yields return at once.
const CHECKS: u32 = 64;
/// Checks between yields in the first `EARLY` of a wait. A short wait
/// (a small round trip) often waits for a thread queued behind this one on
/// its core, whose answer comes only once this thread yields: 64 checks
/// first (1.4 µs of `pause` on a recent Xeon) put that much on every such
/// round (a 4 B round with 2 workers and 1 server on 2 vCPUs: 0.93x the
/// time with 16; with 8, 4x2 256 KiB rounds lost 8%; BENCHMARKS.md).
const EARLY_CHECKS: u32 = 16;
/// How long a wait counts as early.
const EARLY: Duration = Duration::from_micros(10);
/// Checks between yields while yields run other threads.
const CONTENDED_CHECKS: u32 = 8;
/// A yield that takes this long ran another thread (a bare `sched_yield`
/// takes about 150 ns on this VM).
const HANDED_OVER: Duration = Duration::from_nanos(300);

#[derive(Default)]
struct LatchState {
    set: bool,
    waker: Option<Waker>,
}

/// A one-shot signal: unset, then set for good (`set`). A waiter spins
/// first (`spin_until`), then sleeps; see the module docs. The engine's
/// waits use it, and so do the kvstore's tickets.
#[derive(Default)]
pub struct Latch {
    state: Mutex<LatchState>,
    cv: Condvar,
    fast: AtomicBool,
}

impl Latch {
    /// An unset latch.
    pub fn new() -> Arc<Latch> {
        Arc::new(Latch::default())
    }

    /// Sets the latch (again: nothing) and wakes its waiters.
    pub fn set(&self) {
        let mut st = self.state.lock();
        st.set = true;
        let waker = st.waker.take();
        drop(st);
        self.fast.store(true, Ordering::Release);
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether it is set; with Acquire, so a caller that sees it set sees
    /// what the setter did before `set`.
    pub fn is_set(&self) -> bool {
        self.fast.load(Ordering::Acquire)
    }

    /// Blocks until set (true) or until `timeout` passes (false), spinning
    /// for `PSKV_SPIN_US` first. None: no limit.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.wait_spinning(crate::config::spin_budget(), timeout)
    }

    /// As `wait`, spinning for `spin` first (zero: sleeps at once). With
    /// progress hooks, the spin adapts to this thread's recent waits
    /// (`progress::budget`).
    pub fn wait_spinning(&self, spin: Duration, timeout: Option<Duration>) -> bool {
        if self.is_set() {
            return true;
        }
        if timeout == Some(Duration::ZERO) {
            // A look, not a wait (a request's `test`).
            return false;
        }
        if spin.is_zero() {
            return self.sleep(timeout);
        }
        let hooks = crate::progress::active();
        let polling = hooks && crate::progress::polls(spin);
        let start = hooks.then(|| {
            crate::progress::take_did();
            Instant::now()
        });
        let spin = if polling {
            crate::progress::budget(spin)
        } else {
            spin
        };
        let budget = spin.min(timeout.unwrap_or(Duration::MAX));
        let set = if polling {
            spin_until(budget, || self.is_set())
        } else {
            // An earlier wait of this thread may have polled: nobody reads
            // while this one spins unless the readers are back.
            crate::progress::leave();
            crate::progress::without(|| spin_until(budget, || self.is_set()))
        } || self.sleep(timeout);
        if let Some(t) = start {
            crate::progress::record(t.elapsed(), crate::progress::take_did());
        }
        set
    }

    /// The sleeping half of a wait: whatever stood back while this thread
    /// (or an earlier wait of it) polled takes over first (`progress.rs`).
    fn sleep(&self, timeout: Option<Duration>) -> bool {
        crate::progress::leave();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state.lock();
        while !st.set {
            match deadline {
                None => self.cv.wait(&mut st),
                Some(d) => {
                    if self.cv.wait_until(&mut st, d).timed_out() {
                        return st.set;
                    }
                }
            }
        }
        true
    }

    fn poll_set(&self, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut st = self.state.lock();
        if st.set {
            Poll::Ready(())
        } else {
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }
}

/// A future that resolves when every write pushed on a var before
/// [`crate::Engine::var_ready`] was called has finished (the reads after the
/// last write need not have), with the var's failure
/// if one is stored (and then cleared, as `wait_for_var` does).
///
/// The future takes no thread while it waits; wrap it in
/// `tokio::time::timeout` to bound the wait.
///
/// ```
/// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// # rt.block_on(async {
/// use pskv_engine::{Engine, OpSpec, Var};
/// let engine = Engine::builder().cpu_threads(1).build()?;
/// let v = Var::new();
/// engine.push_sync(OpSpec::new("fill").write(&v), |_| Ok(()))?;
/// engine.var_ready(&v).await?;
/// assert_eq!(v.version(), 1);
/// # Ok::<(), pskv_engine::EngineError>(())
/// # }).unwrap();
/// ```
#[must_use = "futures do nothing unless awaited"]
pub struct VarReady {
    pub(crate) state: Result<(Arc<Latch>, Var), Option<EngineError>>,
}

impl Future for VarReady {
    type Output = Result<(), EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            Err(e) => Poll::Ready(match e.take() {
                Some(e) => Err(e),
                None => Ok(()),
            }),
            Ok((latch, var)) => match latch.poll_set(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(match var.take_failure() {
                    Some(f) => Err(EngineError::Op(f)),
                    None => Ok(()),
                }),
            },
        }
    }
}
