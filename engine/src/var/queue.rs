//! The per-var dependency queue that orders the ops touching a var.
//!
//! # The per-var state machine
//!
//! Every var owns a [`VarQueue`]: three fields under one small lock.
//!
//! - `running_reads`: reads that were granted and have not completed;
//! - `write_running`: a granted write has not completed;
//! - `queue`: ops that touch the var and were not granted yet, in push order.
//!
//! ```text
//!            append read            append write (queued)
//!   IDLE ───────────────► READING ───────────────────────► READING + queue
//!    │ ▲                    │  ▲                               │ last read completes:
//!    │ │ last read,         │  │ write completes,            ▼ grant the front write
//!    │ │ queue empty        │  │ front reads granted        WRITING
//!    │ └────────────────────┘  └─────────────────────────────┘
//!    │ append write                                           ▲
//!    └────────────────────────────────────────────────────────┘
//! ```
//!
//! Invariants, kept by every transition below (checked by `debug_assert`s, by a
//! proptest against a reference model and by the loom model in `loom_tests`):
//!
//! - **I1** `running_reads > 0` and `write_running` never hold together.
//! - **I2** When no write runs, the queue is empty or its front is a write: a
//!   read is granted at once unless a write is ahead of it.
//! - **I3** When nothing runs, the queue is empty: nothing grantable waits.
//!
//! So reads between two writes run together, a write waits for every earlier op
//! and blocks every later one, and ops take effect in push order.
//!
//! Granting an op only *returns* it to the caller; the caller decrements the
//! op's wait counter after releasing the var lock (no lock is ever held while
//! another is taken, so no lock-order deadlock is possible).

use std::collections::VecDeque;

/// Where a release puts the ops it grants: a push each (a `SmallVec`'s
/// `Extend` of one item reserved and iterated: about 50 instructions a
/// grant, against a few for a push).
pub(crate) trait Grants<T> {
    fn grant(&mut self, op: T);
}

#[cfg(test)] // the model tests' grants
impl<T> Grants<T> for Vec<T> {
    fn grant(&mut self, op: T) {
        self.push(op);
    }
}

impl<A: smallvec::Array> Grants<A::Item> for smallvec::SmallVec<A> {
    #[inline]
    fn grant(&mut self, op: A::Item) {
        self.push(op);
    }
}

/// How an op uses a var.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// The per-var dependency queue (see the module docs for its states).
/// `T` is the handle of a waiting op: `Waiting` in the engine, a test type in
/// the model tests.
#[derive(Debug)]
pub(crate) struct VarQueue<T> {
    running_reads: u32,
    write_running: bool,
    /// Completed writes.
    version: u64,
    queue: VecDeque<(T, Access)>,
}

impl<T> Default for VarQueue<T> {
    fn default() -> Self {
        VarQueue {
            running_reads: 0,
            write_running: false,
            version: 0,
            queue: VecDeque::new(),
        }
    }
}

impl<T> VarQueue<T> {
    /// Registers a new op on this var. Returns true if it may start now (as
    /// far as this var is concerned); otherwise `op()` is queued and granted
    /// later by `complete`. (`op` is a closure so that the common case, a
    /// grant at once, makes no handle.)
    #[inline]
    pub(crate) fn append(&mut self, access: Access, op: impl FnOnce() -> T) -> bool {
        if self.try_grant(access) {
            return true;
        }
        self.queue.push_back((op(), access));
        self.check();
        false
    }

    /// Grants `access` if it may start now (what `append` grants at once);
    /// otherwise changes nothing and returns false. A grant is released by
    /// `complete`, as an appended op's.
    #[inline]
    pub(crate) fn try_grant(&mut self, access: Access) -> bool {
        let granted = match access {
            Access::Read if !self.write_running && self.queue.is_empty() => {
                self.running_reads += 1;
                true
            }
            // I3: no write running and no read running means the queue is empty.
            Access::Write if !self.write_running && self.running_reads == 0 => {
                debug_assert!(self.queue.is_empty(), "I3 broken");
                self.write_running = true;
                true
            }
            _ => false,
        };
        self.check();
        granted
    }

    /// Records that a granted op finished with this var and grants what may now
    /// start.
    #[inline]
    pub(crate) fn complete(&mut self, access: Access, grants: &mut impl Grants<T>) {
        self.release(access, true, grants);
    }

    /// Gives back a grant of `try_grant` unused (the op did not run: no
    /// write is counted) and grants what may now start.
    #[inline]
    pub(crate) fn give_back(&mut self, access: Access, grants: &mut impl Grants<T>) {
        self.release(access, false, grants);
    }

    #[inline]
    fn release(&mut self, access: Access, ran: bool, grants: &mut impl Grants<T>) {
        match access {
            Access::Read => {
                debug_assert!(self.running_reads > 0, "completing a read that never ran");
                self.running_reads -= 1;
            }
            Access::Write => {
                debug_assert!(self.write_running, "completing a write that never ran");
                self.write_running = false;
                self.version += u64::from(ran);
                // The reads right behind the write may all start.
                while matches!(self.queue.front(), Some((_, Access::Read))) {
                    let (op, _) = self.queue.pop_front().expect("front checked above");
                    self.running_reads += 1;
                    grants.grant(op);
                }
            }
        }
        self.grant_write_if_idle(grants);
        self.check();
    }

    /// Records that `n` granted reads finished (a worker's held reads,
    /// `held_reads.rs`): as `n` calls of `complete(Read)`, the last of
    /// which alone can grant.
    #[inline]
    pub(crate) fn complete_reads(&mut self, n: u32, grants: &mut impl Grants<T>) {
        debug_assert!(self.running_reads >= n, "completing reads that never ran");
        self.running_reads -= n;
        self.grant_write_if_idle(grants);
        self.check();
    }

    /// Grants the write in front if nothing runs.
    #[inline]
    fn grant_write_if_idle(&mut self, grants: &mut impl Grants<T>) {
        if self.running_reads == 0 && !self.write_running {
            // I2: the front, if any, is a write.
            if let Some((op, access)) = self.queue.pop_front() {
                debug_assert_eq!(access, Access::Write, "I2 broken");
                self.write_running = true;
                grants.grant(op);
            }
        }
    }

    /// Nothing granted and nothing waiting (by I3: nothing granted).
    pub(crate) fn is_idle(&self) -> bool {
        self.running_reads == 0 && !self.write_running
    }

    /// Completed writes so far.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Ops granted and not completed, and ops waiting.
    pub(crate) fn pending(&self) -> (u32, bool, usize) {
        (self.running_reads, self.write_running, self.queue.len())
    }

    /// The ops waiting, front first.
    pub(crate) fn waiting(&self) -> impl Iterator<Item = &T> {
        self.queue.iter().map(|(op, _)| op)
    }

    #[inline]
    fn check(&self) {
        debug_assert!(!(self.running_reads > 0 && self.write_running), "I1 broken");
        debug_assert!(
            self.write_running || matches!(self.queue.front(), None | Some((_, Access::Write))),
            "I2 broken"
        );
        debug_assert!(
            self.write_running || self.running_reads > 0 || self.queue.is_empty(),
            "I3 broken"
        );
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reference model: the op at position i of the var's history may start
    /// when every earlier op it conflicts with has completed (two reads do not
    /// conflict), and every earlier op has been granted (push order).
    #[derive(Default)]
    struct Model {
        ops: Vec<(Access, bool, bool)>, // (access, granted, completed)
    }

    impl Model {
        fn grantable(&self) -> Vec<usize> {
            let mut out = Vec::new();
            let mut granted_now: Vec<bool> = self.ops.iter().map(|o| o.1).collect();
            for i in 0..self.ops.len() {
                let (acc, granted, _) = self.ops[i];
                if granted {
                    continue;
                }
                let earlier_ungranted = granted_now[..i].iter().any(|g| !g);
                let blocked = self.ops[..i]
                    .iter()
                    .any(|o| !o.2 && (acc == Access::Write || o.0 == Access::Write));
                if !earlier_ungranted && !blocked {
                    granted_now[i] = true;
                    out.push(i);
                }
            }
            out
        }
    }

    /// Reads completed at once grant as the same reads completed one by
    /// one: only the last can grant, the write behind them.
    #[test]
    fn reads_completed_at_once_grant_as_one_by_one() {
        for at_once in [1, 2, 3] {
            let mut q = VarQueue::<usize>::default();
            let mut grants: Vec<usize> = Vec::new();
            for id in 0..3 {
                assert!(q.append(Access::Read, || id));
            }
            assert!(!q.append(Access::Write, || 3));
            assert!(!q.append(Access::Read, || 4));
            let mut left = 3;
            while left > 0 {
                let n = at_once.min(left);
                q.complete_reads(n, &mut grants);
                left -= n;
                let expect: &[usize] = if left == 0 { &[3] } else { &[] };
                assert_eq!(grants, expect, "{at_once} at once, {left} left");
            }
            assert_eq!(q.pending(), (0, true, 1));
            q.complete(Access::Write, &mut grants);
            assert_eq!(grants, [3, 4]);
            assert_eq!(q.version(), 1);
        }
    }

    proptest! {
        /// Random appends and completions: the queue grants exactly what the
        /// reference model says may start, in push order.
        #[test]
        fn queue_matches_model(steps in proptest::collection::vec((any::<bool>(), any::<bool>(), 0usize..8), 1..200)) {
            let mut q = VarQueue::<usize>::default();
            let mut m = Model::default();
            let mut running: Vec<usize> = Vec::new();
            for (append, is_write, pick) in steps {
                let mut grants: Vec<usize> = Vec::new();
                if append || running.is_empty() {
                    let acc = if is_write { Access::Write } else { Access::Read };
                    let id = m.ops.len();
                    m.ops.push((acc, false, false));
                    if q.append(acc, || id) {
                        grants.push(id);
                    }
                } else {
                    let id = running.remove(pick % running.len());
                    m.ops[id].2 = true;
                    // An odd pick of a read completes every running read at
                    // once (a worker's held reads, `complete_reads`).
                    let reads: Vec<usize> = running
                        .iter()
                        .copied()
                        .filter(|&r| m.ops[r].0 == Access::Read)
                        .collect();
                    if m.ops[id].0 == Access::Read && pick % 2 == 1 && !reads.is_empty() {
                        running.retain(|r| !reads.contains(r));
                        for &r in &reads {
                            m.ops[r].2 = true;
                        }
                        q.complete_reads(1 + reads.len() as u32, &mut grants);
                    } else {
                        q.complete(m.ops[id].0, &mut grants);
                    }
                }
                let expected = m.grantable();
                // Everything the model says may start must have been granted now.
                let mut sorted = grants.clone();
                sorted.sort();
                prop_assert_eq!(&sorted, &expected);
                for g in grants {
                    m.ops[g].1 = true;
                    running.push(g);
                }
            }
            let writes = m.ops.iter().filter(|o| o.0 == Access::Write && o.2).count() as u64;
            prop_assert_eq!(q.version(), writes);
        }

        /// `try_grant` grants exactly when an op appended now would be
        /// granted at once, and otherwise changes nothing; a grant given
        /// back (`give_back`) releases as a completion does but counts no
        /// write.
        #[test]
        fn try_grant_is_an_append_granted_at_once(steps in proptest::collection::vec((0u8..3, any::<bool>(), 0usize..8), 1..200)) {
            let mut q = VarQueue::<usize>::default();
            let mut m = Model::default();
            let mut running: Vec<usize> = Vec::new();
            let mut given_back = 0u64;
            for (kind, is_write, pick) in steps {
                let acc = if is_write { Access::Write } else { Access::Read };
                let mut grants: Vec<usize> = Vec::new();
                match kind {
                    0 => {
                        let id = m.ops.len();
                        m.ops.push((acc, false, false));
                        if q.append(acc, || id) {
                            grants.push(id);
                        }
                    }
                    1 if !running.is_empty() => {
                        let id = running.remove(pick % running.len());
                        m.ops[id].2 = true;
                        if pick % 2 == 1 {
                            q.give_back(m.ops[id].0, &mut grants);
                            given_back += u64::from(m.ops[id].0 == Access::Write);
                        } else {
                            q.complete(m.ops[id].0, &mut grants);
                        }
                    }
                    _ => {
                        let before = q.pending();
                        let id = m.ops.len();
                        m.ops.push((acc, false, false));
                        let may = m.grantable().contains(&id);
                        prop_assert_eq!(q.try_grant(acc), may);
                        if may {
                            grants.push(id);
                        } else {
                            m.ops.pop();
                            prop_assert_eq!(q.pending(), before);
                        }
                    }
                }
                let mut sorted = grants.clone();
                sorted.sort();
                prop_assert_eq!(&sorted, &m.grantable());
                for g in grants {
                    m.ops[g].1 = true;
                    running.push(g);
                }
            }
            let writes = m.ops.iter().filter(|o| o.0 == Access::Write && o.2).count() as u64;
            prop_assert_eq!(q.version(), writes - given_back);
        }
    }
}

/// Model checks of the var lock and the op wait counter under every
/// interleaving loom can find. Run with:
/// `RUSTFLAGS="--cfg loom" cargo test -p pskv-engine --lib --release loom`
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{AtomicUsize, Mutex, Ordering};
    use loom::sync::Arc as LArc;

    /// A stand-in for an op: its wait counter, the vars it touches, and a log
    /// slot checked by the model.
    struct TestOp {
        id: usize,
        wait: AtomicUsize,
        vars: Vec<(usize, Access)>,
    }

    /// A queue's uncounted handle of a waiting op, as the engine's
    /// `Waiting` (`op_block.rs`, W1-W3): the op's wait counter keeps it
    /// alive, and the push's count goes to the release that takes the
    /// counter to zero (loom reports an `Arc` leaked at the end of a run,
    /// so a count left over fails the model).
    struct Waiting(*const TestOp);

    // SAFETY: a pointer to a test op, which is Send and Sync.
    unsafe impl Send for Waiting {}

    type Q = Mutex<VarQueue<Waiting>>;

    struct World {
        vars: Vec<Q>,
        /// Per var: readers running (>0), a writer running (usize::MAX), or idle.
        occupancy: Vec<AtomicUsize>,
        /// Per var: the ids of completed writes, in order.
        history: Vec<loom::sync::Mutex<Vec<usize>>>,
        ready: loom::sync::Mutex<Vec<LArc<TestOp>>>,
    }

    /// Counts one grant off `op`; the op, with the push's count, to the
    /// ready list if this took its counter to zero (W2).
    fn release(world: &World, op: Waiting) {
        // Subtle: AcqRel so that the thread bringing the counter to zero sees
        // every var's grant, made under other threads' locks.
        // SAFETY: this handle has not made its subtraction: the op lives
        // (W3); nothing of it is touched after the subtraction unless it
        // was the last.
        if unsafe { &(*op.0).wait }.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: the push left its count to the counter (W1), which
            // this subtraction took to zero: the count is this call's.
            world
                .ready
                .lock()
                .unwrap()
                .push(unsafe { LArc::from_raw(op.0) });
        }
    }

    /// Appends `op` to its vars, then takes the vars granted at once and
    /// its own hold off the counter in one subtraction, as the engine's
    /// push does (W1).
    fn push(world: &World, op: LArc<TestOp>) {
        let at = LArc::as_ptr(&op);
        let mut granted = 0;
        for &(v, acc) in &op.vars {
            if world.vars[v].lock().append(acc, || Waiting(at)) {
                granted += 1;
            }
        }
        if op.wait.fetch_sub(granted + 1, Ordering::AcqRel) == granted + 1 {
            world.ready.lock().unwrap().push(op);
        } else {
            // The count is left to the counter's last subtraction (W1).
            let _ = LArc::into_raw(op);
        }
    }

    fn run(world: &World, op: &LArc<TestOp>) {
        for &(v, acc) in &op.vars {
            let occ = &world.occupancy[v];
            match acc {
                Access::Read => {
                    let prev = occ.fetch_add(1, Ordering::AcqRel);
                    assert_ne!(prev, usize::MAX, "read ran during a write");
                }
                Access::Write => {
                    let prev = occ.swap(usize::MAX, Ordering::AcqRel);
                    assert_eq!(prev, 0, "write ran beside another op");
                    world.history[v].lock().unwrap().push(op.id);
                }
            }
        }
        for &(v, acc) in &op.vars {
            let occ = &world.occupancy[v];
            match acc {
                Access::Read => {
                    occ.fetch_sub(1, Ordering::AcqRel);
                }
                Access::Write => occ.store(0, Ordering::Release),
            }
        }
        let mut grants: Vec<Waiting> = Vec::new();
        for &(v, acc) in &op.vars {
            world.vars[v].lock().complete(acc, &mut grants);
            for g in grants.drain(..) {
                release(world, g);
            }
        }
    }

    fn worker(world: &World, want: usize) -> usize {
        let mut done = 0;
        for _ in 0..want {
            let next = world.ready.lock().unwrap().pop();
            match next {
                Some(op) => {
                    run(world, &op);
                    done += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        done
    }

    fn world(nvars: usize) -> World {
        World {
            vars: (0..nvars)
                .map(|_| Mutex::new(VarQueue::default()))
                .collect(),
            occupancy: (0..nvars).map(|_| AtomicUsize::new(0)).collect(),
            history: (0..nvars)
                .map(|_| loom::sync::Mutex::new(Vec::new()))
                .collect(),
            ready: loom::sync::Mutex::new(Vec::new()),
        }
    }

    fn op(id: usize, vars: Vec<(usize, Access)>) -> LArc<TestOp> {
        LArc::new(TestOp {
            id,
            wait: AtomicUsize::new(vars.len() + 1),
            vars,
        })
    }

    /// One pusher, two workers; ops: W(a), R(a)+W(b), R(a), W(a)+R(b).
    /// Writes to each var must land in push order and never overlap.
    #[test]
    fn loom_push_and_complete_race() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let w = LArc::new(world(2));
            let ops = vec![
                op(0, vec![(0, Access::Write)]),
                op(1, vec![(0, Access::Read), (1, Access::Write)]),
                op(2, vec![(0, Access::Read)]),
                op(3, vec![(0, Access::Write), (1, Access::Read)]),
            ];
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let w = w.clone();
                    loom::thread::spawn(move || worker(&w, 3))
                })
                .collect();
            for o in ops {
                push(&w, o);
            }
            let mut done: usize = workers.into_iter().map(|h| h.join().unwrap()).sum();
            // Finish what the bounded workers left.
            loop {
                let next = w.ready.lock().unwrap().pop();
                match next {
                    Some(o) => {
                        run(&w, &o);
                        done += 1;
                    }
                    None => break,
                }
            }
            assert_eq!(done, 4, "an op was never granted");
            assert_eq!(*w.history[0].lock().unwrap(), vec![0, 3]);
            assert_eq!(*w.history[1].lock().unwrap(), vec![1]);
        });
    }
}
