//! The watcher of a worker's waits at the gates: finishes the waits
//! nobody polls, fails those past their deadline or whose round a dead
//! worker holds, helps sum their rounds, and moves on this worker's parts
//! of rounds of late copies (the rules: `worker_sum/mod.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    late_parts, progress, shared_rounds, take_out, Helper, Inner, Outcome, Wait, GATE_SLEEP, IDLE,
    LATE_SPIN, NAP, SHARED_SPIN,
};
use crate::error::Fault;
use crate::gate::{self, Gate, Withdrawal, MAX_HELPER_RANK};
use crate::kinds::dist::worker_sum::LatePart;

/// The watcher: finishes the waits nobody polls, fails those past their
/// deadline, helps sum their rounds (the summer wakes it: `Gate::share`).
pub(super) fn watch(inner: &Inner, timeout: Duration, helper: Option<&Helper>) {
    let mut empty_since = None;
    // The round last watched awake (its segment, epoch): once per round,
    // so a worker that waits long for a slow one sleeps.
    let mut watched: Option<(usize, u32)> = None;
    // The round of late copies (its segment, epoch) last watched awake.
    let mut late_watched: Option<(usize, u32)> = None;
    loop {
        let mut list = inner.list.lock();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let mut done = take_out(&mut list, &inner.len);
        let now = Instant::now();
        let dead = inner.dead.lock().clone();
        let mut i = 0;
        while i < list.len() {
            if let Some(part) = list[i].late.clone() {
                if let Some(o) = late_overdue(&mut list[i], &part, &dead, now, timeout) {
                    done.push((list.swap_remove(i), o));
                } else {
                    i += 1;
                }
                continue;
            }
            let gate = Gate::of(&list[i].seg);
            let summer = gate.summer(list[i].epoch).filter(|r| dead.contains(r));
            // A helper that died holding a chunk: the round cannot end
            // either (S2 of `gate/chunks.rs`).
            let len = list[i].seg.slot_len();
            let helper = || dead_among(&dead, gate.helpers_busy(list[i].epoch, len));
            if let Some((r, what)) = summer
                .map(|r| (r, "summing"))
                .or_else(|| helper().map(|r| (r, "helping to sum")))
            {
                let f = Fault::Unavailable(format!(
                    "worker {r}, which was {what} this round in shared memory, died: the round cannot end"
                ));
                done.push((list.swap_remove(i), Outcome::Failed(f, true)));
                continue;
            }
            if list[i].deadline > now {
                i += 1;
                continue;
            }
            if list[i].finishing {
                // S2 of `gate/chunks.rs`: the round cannot end while the
                // helper may still write.
                let f = Fault::Failed(format!(
                    "a worker helping to sum this round in shared memory held a chunk of it for {timeout:?} (ranks busy: {:#x}): the round cannot end",
                    gate.helpers_busy(list[i].epoch, len)
                ));
                done.push((list.swap_remove(i), Outcome::Failed(f, true)));
                continue;
            }
            let w = &mut list[i];
            let gate = Gate::of(&w.seg);
            let workers = gate.workers();
            let outcome = match gate.withdraw(w.epoch) {
                Withdrawal::Ended => Some(Outcome::Ended),
                // The gate closed since the look above: handed over, not
                // timed out (the others' pushes go to the server too).
                Withdrawal::Left if gate.round(w.epoch) == gate::Round::HandedOver => {
                    Some(Outcome::HandedOver)
                }
                Withdrawal::Left => Some(Outcome::Failed(
                    Fault::Unavailable(format!(
                        "the round that the workers sum in shared memory did not end within {timeout:?}: {} of {workers} workers had arrived at it with this one (its push is taken back; the others have not pushed this round)",
                        gate.arrived() + 1
                    )),
                    false,
                )),
                Withdrawal::Summing if !w.summing => {
                    // The last worker is summing: give it the time again.
                    w.summing = true;
                    w.deadline = now + timeout;
                    None
                }
                // Subtle: the arrival stays counted (the round is the
                // summer's now), so the slot may still be read: in doubt.
                Withdrawal::Summing => Some(Outcome::Failed(
                    Fault::Failed(
                        "the worker that came last to a round summed in shared memory did not finish it (it may have died while summing)".into(),
                    ),
                    true,
                )),
            };
            match outcome {
                Some(o) => done.push((list.swap_remove(i), o)),
                None => i += 1,
            }
        }
        inner.len.store(list.len(), Ordering::Release);
        if !done.is_empty() {
            drop(list);
            for (w, o) in done {
                (w.then)(o);
            }
            continue;
        }
        let late = late_parts(&list);
        if !late.is_empty() {
            drop(list);
            // Awake for a while once per part: its sums and copies come
            // ready as the others supply and sum, which wakes nobody.
            let part = (Arc::as_ptr(&late[0].seg) as usize, late[0].epoch);
            let spin = late_watched != Some(part);
            late_watched = Some(part);
            let t = Instant::now();
            let mut finished = progress(&late);
            while spin && !finished && t.elapsed() < LATE_SPIN && late.iter().any(|l| !l.done()) {
                std::thread::yield_now();
                finished = progress(&late);
            }
            if finished || spin {
                continue;
            }
            list = inner.list.lock();
        }
        let shared = shared_rounds(&list, helper.is_some());
        if let (false, Some(h)) = (shared.is_empty(), helper) {
            drop(list);
            match h.help(&shared) {
                Some(helped) => {
                    if helped {
                        h.settle(&shared);
                    }
                    continue;
                }
                // Another thread of this worker helps: sleep, below.
                None => list = inner.list.lock(),
            }
        }
        if list
            .iter()
            .any(|w| w.finishing || w.late.as_ref().is_some_and(|l| !l.done()))
        {
            // A round this worker sums waits for a helper's chunk: nothing
            // wakes anyone when it is summed, and only a look at the wait
            // ends the round.
            drop(list);
            empty_since = None;
            std::thread::sleep(NAP);
            continue;
        }
        let sleep_on = list
            .iter()
            .min_by_key(|w| w.deadline)
            .map(|w| (w.seg.clone(), w.epoch, w.deadline, w.late.is_some()));
        match sleep_on {
            Some((seg, epoch, deadline, late)) => {
                drop(list);
                empty_since = None;
                let gate = Gate::of(&seg);
                let len = seg.slot_len();
                let round = (Arc::as_ptr(&seg) as usize, epoch);
                if helper.is_some()
                    && !late
                    && gate::chunk_bytes(len).is_some()
                    && watched != Some(round)
                {
                    watched = Some(round);
                    // A round worth helping with: watch for its sharing
                    // (or end) awake, for a while; a wake-up would come
                    // late for a round of a few hundred microseconds.
                    let t = Instant::now();
                    while gate.round(epoch) == gate::Round::Gathering
                        && gate.shared(epoch, len).is_none()
                        && t.elapsed() < SHARED_SPIN
                    {
                        for _ in 0..32 {
                            std::hint::spin_loop();
                        }
                        std::thread::yield_now();
                    }
                    if t.elapsed() < SHARED_SPIN {
                        continue;
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // A thread of this worker polls the waits: it finishes
                // them as their rounds end, and the last poller to stop
                // wakes this thread if any is left (`pollers.rs`). Asleep
                // on the gate, this thread would be woken by every round's
                // end too (back to back small rounds: nearly every round).
                let mut list = inner.list.lock();
                if inner.pollers.any() {
                    inner.cv.wait_for(&mut list, left.min(NAP));
                    continue;
                }
                drop(list);
                gate.sleep(epoch, left.min(GATE_SLEEP));
            }
            None => {
                let since = *empty_since.get_or_insert(now);
                if now - since < IDLE {
                    inner.cv.wait_for(&mut list, NAP);
                } else {
                    inner.idle.store(true, Ordering::Release);
                    // Subtle: `add` pushes under the lock, then reads
                    // `idle`; this thread set `idle` under it, so either
                    // the push is seen below or `add` notifies after the
                    // wait began (the wait lets the lock go atomically).
                    if inner.len.load(Ordering::Acquire) == 0 {
                        inner.cv.wait_for(&mut list, IDLE * 20);
                    }
                    inner.idle.store(false, Ordering::Release);
                    empty_since = None;
                }
            }
        }
    }
}

/// How a wait of a round of late copies comes out at the watcher's look
/// at `now`, if it does: failed, in doubt, once a worker holding a chunk
/// not summed is known dead, or past its deadline (given the time again
/// once while every worker has arrived; never withdrawn, L2 of
/// `gate/late.rs`: its chunks may be in others' sums).
fn late_overdue(
    w: &mut Wait,
    part: &LatePart,
    dead: &[usize],
    now: Instant,
    timeout: Duration,
) -> Option<Outcome> {
    let gate = Gate::of(&w.seg);
    if let Some(r) = dead_among(dead, part.claimers_unsummed()) {
        // Its arrival stays (L2 of `gate/late.rs`): the next rounds go to
        // the server.
        gate.close();
        let f = Fault::Unavailable(format!(
            "worker {r}, which was summing part of this round in shared memory, died: the round cannot end"
        ));
        return Some(Outcome::Failed(f, true));
    }
    if w.deadline > now {
        return None;
    }
    match gate.round(w.epoch) {
        // The next look takes it out.
        gate::Round::HandedOver => return None,
        gate::Round::Ended if part.done() => return None,
        _ => {}
    }
    let (arrived, workers) = (gate.arrived() as usize, gate.workers());
    if arrived >= workers && !w.summing {
        w.summing = true;
        w.deadline = now + timeout;
        return None;
    }
    gate.close();
    let f = Fault::Failed(format!(
        "the round that the workers sum in shared memory did not end within {timeout:?} ({arrived} of {workers} workers had arrived; this worker's push stays in it, in doubt)"
    ));
    Some(Outcome::Failed(f, true))
}

/// A rank among the bits `busy` that is in `dead`.
fn dead_among(dead: &[usize], busy: u32) -> Option<usize> {
    dead.iter()
        .copied()
        .find(|&r| r < MAX_HELPER_RANK && busy & (1 << r) != 0)
}
