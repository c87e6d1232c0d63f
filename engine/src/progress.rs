//! Progress hooks: work a spinning waiter does while it waits.
//!
//! A thread that waits for an op spins a while before it sleeps
//! ([`crate::spin_until`]). What it waits for is often an answer that
//! another thread of this process would read off a link and hand over (a
//! hand-off that costs microseconds, and a spinning thread, of its own).
//! A layer that reads such links registers a hook ([`add`]); a spinning
//! waiter calls the hooks between its rounds of checks, so the answer can
//! be read and handled on the waiting thread itself (leader/follower).
//!
//! Only a thread whose last wait was short polls (at most two base spins:
//! a small round trip); after a long one its next wait spins and sleeps
//! as before, leaving the links to their readers (`polls`).
//!
//! Rules for a hook: it never blocks (it may run on any waiting thread,
//! which may hold locks of its own: take only `try_lock`s), and it says
//! whether it did anything. Hooks do not run inside a hook: a waiter
//! inside a hook's work (a callback that waits) only spins. A waiter about
//! to sleep (its spin ran out, or it does not spin) tells the hooks
//! ([`Call::Leave`]): whatever stood back while this thread polled (the
//! links' reader threads) must take over now, or the answer would wait
//! for them. A waiter whose wait ended while it polled says so too
//! ([`Call::End`]), so a hook can tell whether some thread polls now.
//!
//! # States
//!
//! The registry is a list behind a lock, replaced whole on a change, and
//! its length mirrored in an atomic (`ACTIVE`), so a waiter with no hooks
//! registered pays one relaxed load per round. A [`Hook`] handle removes its hook when dropped; a waiter
//! that copied the list just before may call it once more, so a hook must
//! stay safe to call until its owner's state is gone (it holds what it
//! needs, or a weak reference).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

type HookFn = Arc<dyn Fn(Call) -> bool + Send + Sync>;
/// A registered hook and its id.
type Entry = (u64, HookFn);

/// Why a waiter calls a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Between rounds of spinning: do what can be done now; say whether
    /// anything was.
    Poll,
    /// The waiter stops spinning and will sleep: it polls no more.
    Leave,
    /// The wait of a waiter that polled ended while it spun: it polls no
    /// more (until its next wait), and does not sleep. Every wait that
    /// polls (calls [`Call::Poll`] once or more) ends with one `End`, or
    /// with `Leave` (once or more; also when it unwinds); `Leave` also
    /// comes from waits that did not poll.
    End,
}

/// The registered hooks, replaced whole on a change (waiters call a
/// snapshot without the lock); None: none yet.
static HOOKS: RwLock<Option<Arc<[Entry]>>> = RwLock::new(None);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Replaces the registry with `f` applied to a copy of it.
fn change(f: impl FnOnce(&mut Vec<Entry>)) {
    let mut hooks = HOOKS.write();
    let mut list = hooks.as_deref().map(<[_]>::to_vec).unwrap_or_default();
    f(&mut list);
    ACTIVE.store(list.len(), Ordering::Relaxed);
    *hooks = Some(list.into());
}

thread_local! {
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    /// How long this thread's last wait took, in µs (0: none yet), and
    /// whether hooks did something during it.
    static LAST: Cell<(u64, bool)> = const { Cell::new((0, false)) };
    /// A hook did something on this thread since the last `take_did`.
    static DID: Cell<bool> = const { Cell::new(false) };
}

/// Whether a hook did something on this thread since the last call.
pub(crate) fn take_did() -> bool {
    DID.with(|d| d.replace(false))
}

/// Whether this thread's next wait polls: its last wait was short (at
/// most [`SHORT`] times the base spin), or none is known. A short wait is
/// a small round trip, which polling makes one thread's work; a long one
/// (a large round) gains nothing from it and leaves the links to their
/// reader threads, which spin and sleep as they did without pollers.
pub(crate) fn polls(base: std::time::Duration) -> bool {
    LAST.with(Cell::get).0 <= SHORT * base.as_micros() as u64
}

/// A polling wait's spin, from the base spin (`PSKV_SPIN_US`): about as
/// long as this thread's last wait took, when hooks did the work (a
/// quarter to spare, between base and `SHORT` times base), else base. A
/// polling waiter reads the links in place of their reader threads, which
/// stand back; giving up just before its answer came would cost a
/// hand-off back to them and their wake-up of it.
pub(crate) fn budget(base: std::time::Duration) -> std::time::Duration {
    let b = base.as_micros() as u64;
    std::time::Duration::from_micros(match LAST.with(Cell::get) {
        (us, true) => (us + us / 4).clamp(b, b * SHORT),
        _ => b,
    })
}

/// Records a wait (with hooks registered) that took `waited` in all
/// (spinning and sleeping), and whether the hooks did something during it.
pub(crate) fn record(waited: std::time::Duration, did: bool) {
    LAST.with(|l| l.set((waited.as_micros() as u64, did)));
}

/// Waits longer than this many base spins do not poll.
const SHORT: u64 = 2;

/// A registered progress hook; dropping it removes the hook.
pub struct Hook {
    id: u64,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "progress::Hook({})", self.id)
    }
}

/// Registers `f`, which spinning waiters call between rounds (see the
/// module docs for its rules); it returns whether it did anything.
pub fn add(f: impl Fn(Call) -> bool + Send + Sync + 'static) -> Hook {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    change(|hooks| hooks.push((id, Arc::new(f))));
    Hook { id }
}

impl Drop for Hook {
    fn drop(&mut self) {
        change(|hooks| hooks.retain(|(id, _)| *id != self.id));
    }
}

/// Whether a waiter has hooks to call: some are registered, it is not
/// inside one, and it is not an op's closure (a pool worker that waits
/// inside an op would run other ops' completions, and ops they make ready
/// would be kept for it, stranded until its closure returns).
pub(crate) fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed) != 0 && !RUNNING.with(Cell::get) && !crate::core::in_op()
}

/// Runs `f` with this thread's hooks off (a wait that does not poll).
pub(crate) fn without<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RUNNING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RUNNING.with(|r| r.replace(true)));
    f()
}

/// Tells the hooks that this thread, which may have polled, goes to
/// sleep ([`Call::Leave`]); for waits outside the engine's latch.
pub fn leave() {
    if active() {
        run(Call::Leave);
    }
}

/// Calls every hook once with `call`, unless none is registered or this
/// thread is already inside one; whether any did something.
pub(crate) fn run(call: Call) -> bool {
    if !active() {
        return false;
    }
    // Not under the registry's lock: a hook's work may add or drop hooks.
    let Some(hooks) = HOOKS.read().clone() else {
        return false;
    };
    // Every hook is called, whatever the others did.
    let any = without(|| hooks.iter().fold(false, |any, (_, f)| f(call) | any));
    if any {
        DID.with(|d| d.set(true));
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn a_spinning_waiter_polls_the_hooks_then_leaves_or_ends() {
        // The hook "reads an answer" when one is there: the waiter's wait is
        // then done on its own thread.
        let answer = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (polls, leaves) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let ends = Arc::new(AtomicUsize::new(0));
        let (a, d, p, l) = (answer.clone(), done.clone(), polls.clone(), leaves.clone());
        let e = ends.clone();
        // Hooks are process-wide: count only this test's waits.
        let me = std::thread::current().id();
        let hook = add(move |call| {
            if std::thread::current().id() != me {
                return false;
            }
            assert!(!run(Call::Poll), "a hook runs no hooks");
            match call {
                Call::Leave => {
                    l.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Call::End => {
                    e.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Call::Poll => {
                    p.fetch_add(1, Ordering::Relaxed);
                    let got = a.load(Ordering::Acquire);
                    if got {
                        d.store(true, Ordering::Release);
                    }
                    got
                }
            }
        });
        // No answer: the waiter polls, gives up, and leaves once.
        assert!(!crate::spin_until(Duration::from_millis(2), || done.load(Ordering::Acquire)));
        assert!(polls.load(Ordering::Relaxed) >= 1);
        assert_eq!(leaves.load(Ordering::Relaxed), 1);
        assert_eq!(ends.load(Ordering::Relaxed), 0);
        // An answer: the hook completes the wait; no leave, one end.
        answer.store(true, Ordering::Release);
        assert!(crate::spin_until(Duration::from_secs(5), || done.load(Ordering::Acquire)));
        assert_eq!(leaves.load(Ordering::Relaxed), 1);
        assert_eq!(ends.load(Ordering::Relaxed), 1);
        // Done before any poll: neither.
        assert!(crate::spin_until(Duration::from_secs(5), || true));
        assert_eq!(
            (leaves.load(Ordering::Relaxed), ends.load(Ordering::Relaxed)),
            (1, 1)
        );
        // A wait that unwinds after it polled: a leave.
        let p0 = polls.load(Ordering::Relaxed);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::spin_until(Duration::from_secs(5), || {
                if polls.load(Ordering::Relaxed) > p0 {
                    panic!("a check that fails after a poll");
                }
                false
            })
        }));
        assert!(unwound.is_err());
        assert_eq!(
            (leaves.load(Ordering::Relaxed), ends.load(Ordering::Relaxed)),
            (2, 1)
        );
        // Dropped: no longer called.
        drop(hook);
        let before = polls.load(Ordering::Relaxed);
        assert!(!crate::spin_until(Duration::from_millis(2), || false));
        assert_eq!(polls.load(Ordering::Relaxed), before);
        assert_eq!(leaves.load(Ordering::Relaxed), 2);
    }
}
