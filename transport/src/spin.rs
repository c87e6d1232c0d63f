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
//! Spinning yields the core every 64 checks, so a waiter does not starve
//! the thread it waits for when there are fewer cores than busy threads.

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
    let end = Instant::now() + budget;
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= end {
            return ready();
        }
        // Give the core to whoever we are waiting for, if they need it
        // (with fewer cores than busy threads, pure spinning starves them).
        std::thread::yield_now();
    }
}

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
