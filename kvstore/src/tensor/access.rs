//! The one way to a tensor's data: guards, granted to an engine op for the
//! tensors whose vars it names, for as long as its closure runs.
//!
//! # States and invariants
//!
//! A [`Cell`] holds a tensor's [`Data`] and a borrow count:
//!
//! - `0`: no guard;
//! - `1..WRITING`: that many read guards ([`DataRef`]);
//! - `WRITING`: one write guard ([`DataMut`]).
//!
//! - **A1.** A guard exists only under an engine [`RunContext`] whose op
//!   names the tensor's var: a read guard for a read or a write, a write
//!   guard for a write. The guard borrows the run context, so it cannot
//!   outlive the closure's call. Together with the engine's rule (a writer
//!   of a var runs alone, readers together: the tensor's T1) and A3, no
//!   other op touches the data while a guard lives.
//! - **A2.** Within one op, the count keeps guards from aliasing: a write
//!   guard only from `0`, a read guard only below `WRITING`. A second guard
//!   that would alias is an error, not undefined behaviour.
//!
//! - **A3.** An async op drops its guards before it hands its `Completion`
//!   on (to a send, an in-flight record, a device callback): once the op
//!   may complete, the engine may run the next op on its vars while the
//!   closure is still running. A guard still alive then makes the next
//!   op's guard fail (A2), an error rather than a race.
//!
//! So the `unsafe` of data access is [`Cell::read`] and [`Cell::write`]
//! alone; every other use of a tensor's data goes through them.
//!
//! Orderings: the count's changes are Acquire on taking a guard and Release
//! on dropping one, so an op that takes a guard after another guard of the
//! same op (on another thread of its own making) sees that guard's writes.
//! Across ops, the engine's hand-offs order the accesses (T1); the count is
//! not what orders them.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};

use pskv_engine::{Access, RunContext, Var};

use super::Data;
use crate::error::{KvError, Result};

/// The count of a cell with a write guard.
const WRITING: usize = usize::MAX;

/// A tensor's data and its borrow count.
pub(crate) struct Cell {
    data: UnsafeCell<Data>,
    borrow: AtomicUsize,
}

// SAFETY: the data is reached only through the guards, which A1 and A2
// keep from racing or aliasing; `Data` is plain owned memory.
unsafe impl Sync for Cell {}

impl Cell {
    pub(crate) fn new(data: Data) -> Cell {
        Cell {
            data: UnsafeCell::new(data),
            borrow: AtomicUsize::new(0),
        }
    }

    /// The data for reading, under `rc`, whose op must name `var` (A1).
    pub(crate) fn read<'g>(&'g self, var: &Var, rc: &'g RunContext<'_>) -> Result<DataRef<'g>> {
        if rc.access(var).is_none() {
            return Err(not_granted("read", var, rc));
        }
        let taken = self
            .borrow
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < WRITING - 1).then(|| n + 1)
            });
        if taken.is_err() {
            return Err(aliased("read", var, rc));
        }
        // SAFETY: A1 (no other op touches the cell now) and A2 (no write
        // guard of this op is alive: the count was below WRITING).
        let data = unsafe { &*self.data.get() };
        Ok(Guard {
            data,
            cell: self,
            weight: 1,
        })
    }

    /// The data for writing, under `rc`, whose op must write `var` (A1).
    pub(crate) fn write<'g>(&'g self, var: &Var, rc: &'g RunContext<'_>) -> Result<DataMut<'g>> {
        if rc.access(var) != Some(Access::Write) {
            return Err(not_granted("written", var, rc));
        }
        let taken = self
            .borrow
            .compare_exchange(0, WRITING, Ordering::Acquire, Ordering::Relaxed);
        if taken.is_err() {
            return Err(aliased("written", var, rc));
        }
        // SAFETY: A1 (this op alone may touch the cell now) and A2 (no
        // other guard of this op is alive: the count was 0).
        let data = unsafe { &mut *self.data.get() };
        Ok(Guard {
            data,
            cell: self,
            weight: WRITING,
        })
    }
}

fn not_granted(how: &str, var: &Var, rc: &RunContext<'_>) -> KvError {
    KvError::invalid(format!(
        "internal: op `{}` {how} the data of a tensor (var {}) that it does not {}",
        rc.op_name(),
        var.id(),
        if how == "read" { "name" } else { "write" },
    ))
}

fn aliased(how: &str, var: &Var, rc: &RunContext<'_>) -> KvError {
    KvError::invalid(format!(
        "internal: op `{}` {how} the data of a tensor (var {}) while holding it already",
        rc.op_name(),
        var.id()
    ))
}

/// A guard (A1, A2): `&Data` for reading, `&mut Data` for writing. It
/// holds `weight` of the cell's count (1 for a read, `WRITING` for the
/// write) and gives it back when dropped.
pub(crate) struct Guard<'g, R> {
    data: R,
    cell: &'g Cell,
    weight: usize,
}

/// A read guard.
pub(crate) type DataRef<'g> = Guard<'g, &'g Data>;
/// A write guard.
pub(crate) type DataMut<'g> = Guard<'g, &'g mut Data>;

impl<R: Deref<Target = Data>> Deref for Guard<'_, R> {
    type Target = Data;
    fn deref(&self) -> &Data {
        &self.data
    }
}

impl DerefMut for Guard<'_, &mut Data> {
    fn deref_mut(&mut self) -> &mut Data {
        self.data
    }
}

impl<R> Drop for Guard<'_, R> {
    fn drop(&mut self) {
        self.cell.borrow.fetch_sub(self.weight, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use pskv_engine::{Context, Engine, OpSpec};

    use crate::tensor::Tensor;

    /// An op gets guards for the tensors it names, as it names them, and
    /// never two that alias; the answers are recorded and checked outside
    /// the op.
    #[test]
    fn guards_are_granted_for_the_ops_vars_and_never_alias() {
        let e = Engine::builder().cpu_threads(2).build().unwrap();
        let t = |v: i32| Tensor::from_vec(&e, &[2], vec![v, v], Context::Cpu).unwrap();
        let (a, b, c) = (t(1), t(2), t(3));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, a2, b2, c2) = (seen.clone(), a.clone(), b.clone(), c.clone());
        let spec = OpSpec::new("guards").read(a.var()).write(b.var());
        e.push_sync(spec, move |rc| {
            let mut got = vec![
                a2.read(&rc).is_ok(),
                a2.write(&rc).is_ok(), // only read
                c2.read(&rc).is_ok(),  // not named
            ];
            {
                let mut w = b2.write(&rc)?;
                w.typed_mut::<i32>()[0] = 7;
                got.push(b2.read(&rc).is_ok()); // aliases the write guard
                got.push(b2.write(&rc).is_ok());
            }
            let (r1, r2) = (b2.read(&rc)?, b2.read(&rc)?);
            got.push(r1.typed::<i32>() == r2.typed::<i32>());
            got.push(b2.write(&rc).is_ok()); // readers alive
            drop((r1, r2));
            got.push(b2.write(&rc).is_ok());
            s.lock().unwrap().extend(got);
            Ok(())
        })
        .unwrap();
        e.wait_for_all().unwrap();
        let want = [true, false, false, false, false, true, false, true];
        assert_eq!(*seen.lock().unwrap(), want);
        assert_eq!(b.to_vec::<i32>().unwrap(), vec![7, 2]);
        assert_eq!(c.to_vec::<i32>().unwrap(), vec![3, 3]);
    }
}
