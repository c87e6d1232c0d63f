//! Spinning before sleeping, with a budget that adapts to the waits seen.
//!
//! Waking a sleeping thread costs about 30 µs on a VM (futex or condvar),
//! as much as a whole small round trip. So a waiter first watches its flag
//! for a while. How long is worth it depends on what it waits for: a 4-byte
//! answer comes in 5 µs, the echo of a 1 MiB push in 100 to 200 µs, and an
//! idle link's next frame maybe never. A [`Spin`] belongs to one waiting
//! site (a thread's slot waits, a ring's reader or writer) and spins for
//! about as long as that site's last wait took, within `[base, 10 x base]`
//! where base is `PSKV_SPIN_US` (default 50 µs; 0 turns spinning off). A
//! wait longer than the cap returns the budget to base, so a quiet link does
//! not burn a core: it spins at most base per frame.
//!
//! Spinning yields the core between rounds of checks, so a waiter does not
//! starve the thread it waits for when there are fewer cores than busy
//! threads. Rounds are 8 checks at first, and stay so for the first 10 µs
//! of a wait while yields hand the core to another thread (a yield that
//! takes 300 ns or more: a bare one takes about 150 ns here); from the
//! first yield that returns at once, or after 10 µs, they are 64. A
//! short wait (a small round trip, 5 to 10 µs) on a crowded core usually
//! waits for a thread that needs this very core to answer, and the sooner
//! it gets it the sooner the answer comes: with 2 workers and 1 server on
//! 2 cores, a 4 B round over shm goes from about 9.3 to 7.3 µs
//! (BENCHMARKS.md). A long wait (a 256 KiB round) that yielded that often
//! would spend its time switching threads (25% to 34% slower with 4
//! workers and 2 servers), and a waiter alone on its core would only add
//! system calls. The engine's latch (`pskv-engine`'s `wait.rs`) uses a
//! rule of its own: 16 checks at first, then 8 after each yield that
//! handed the core over, and after each that did not, 16 in the first 10
//! µs of the wait and 64 later.

use std::time::{Duration, Instant};

/// The adaptive spin budget of one waiting site.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spin {
    budget_us: u32,
}

impl Spin {
    pub(crate) fn new() -> Spin {
        Spin {
            budget_us: crate::config::spin_base_us(),
        }
    }

    /// How long to spin before sleeping.
    pub(crate) fn budget(&self) -> Duration {
        Duration::from_micros(self.budget_us as u64)
    }

    /// Records a wait that was not over at once and took `waited` in all
    /// (spinning and sleeping): the next spin covers a wait like it, with a
    /// quarter to spare, between base and ten times base.
    pub(crate) fn record(&mut self, waited: Duration) {
        let base = crate::config::spin_base_us();
        let cap = base.saturating_mul(10);
        let us = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX);
        self.budget_us = if us > cap {
            base
        } else {
            us.saturating_add(us / 4).clamp(base, cap)
        };
    }

    /// Waits for `ready()` through `sleep` (which sleeps a while, or until
    /// woken, and says whether to give up), spinning first; records the
    /// wait. Whether `ready()` held.
    pub(crate) fn wait(
        &mut self,
        ready: &dyn Fn() -> bool,
        sleep: &mut dyn FnMut() -> bool,
    ) -> bool {
        if ready() {
            return true;
        }
        let start = Instant::now();
        let mut ok = spin_until(ready, self.budget());
        while !ok {
            if sleep() {
                break;
            }
            ok = ready();
        }
        self.record(start.elapsed());
        ok
    }
}

/// Spins until `ready()` or `budget` passes; whether it became ready.
pub(crate) fn spin_until(ready: &dyn Fn() -> bool, budget: Duration) -> bool {
    if budget.is_zero() {
        return ready();
    }
    let start = Instant::now();
    let end = start + budget;
    let mut checks = EARLY_CHECKS;
    loop {
        for _ in 0..checks {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now >= end {
            return ready();
        }
        // Give the core to whoever we are waiting for, if they need it
        // (with fewer cores than busy threads, pure spinning starves them).
        std::thread::yield_now();
        // Late in the wait, or alone on the core: fewer yields from now on.
        if now - start >= EARLY || now.elapsed() < HANDED_OVER {
            checks = CHECKS;
        }
    }
}

/// Checks between yields early in a wait on a crowded core (see the
/// module docs).
const EARLY_CHECKS: u32 = 8;
/// How long a wait counts as early.
const EARLY: Duration = Duration::from_micros(10);
/// Checks between yields after that.
const CHECKS: u32 = 64;
/// A yield that takes this long ran another thread.
const HANDED_OVER: Duration = Duration::from_nanos(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_waits_within_its_bounds() {
        let base = crate::config::spin_base_us();
        let mut s = Spin::new();
        assert_eq!(s.budget_us, base);
        s.record(Duration::from_micros(base as u64 * 4));
        assert_eq!(s.budget_us, base * 5);
        // A long wait is not worth spinning for: back to base.
        s.record(Duration::from_millis(500));
        assert_eq!(s.budget_us, base);
        s.record(Duration::from_micros(1));
        assert_eq!(s.budget_us, base);
        s.record(Duration::from_micros((base as u64 * 10).saturating_sub(1)));
        assert_eq!(s.budget_us, base * 10);
    }

    #[test]
    fn wait_gives_up_when_sleep_says_so() {
        let mut s = Spin { budget_us: 10 };
        let mut sleeps = 0;
        let ok = s.wait(&|| false, &mut || {
            sleeps += 1;
            sleeps == 3
        });
        assert!(!ok);
        assert_eq!(sleeps, 3);
        let ok = s.wait(&|| true, &mut || unreachable!("ready at once"));
        assert!(ok);
    }
}
