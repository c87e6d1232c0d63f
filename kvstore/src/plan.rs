//! [`CallPlan`]: a push, pull or push-pull of one key over the same
//! tensors, looked up and checked once ([`KvStore::plan`]) and issued again
//! and again ([`KvStore::issue`]): a training loop's step over the same
//! gradient and weight buffers, the C ABI's persistent requests (MPI's
//! `MPI_Send_init`).
//!
//! An issue does what the call would ([`KvStore::push`], `pull`,
//! `pushpull`), in the same order with the store's other calls, but skips
//! what the plan fixed: the key's lookup, the tensors' checks, the
//! batch's vectors. The kind decides what it keeps
//! ([`Flavor::plan`](crate::kinds::Flavor::plan)): `local` and `device`
//! keep the key's entry and the specs of the call's small host copies,
//! which then run at once when their tensors are idle
//! ([`Engine::try_run_now`](pskv_engine::Engine::try_run_now)); the dist
//! kinds keep nothing and issue the call as it is (its time is the
//! network's).
//!
//! # Invariants
//!
//! - **P1.** A plan is issued only by the store that made it
//!   ([`KvStore::id`], never reused in a process): a plan keeps the key's
//!   entry, which names the store's memory.
//! - **P2.** What the plan checked cannot change: the key exists with its
//!   shape, dtype and storage (a key is initialized once; a local store
//!   never removes a key, so the entry a local plan keeps is the key's for
//!   good), and the tensors' shapes, dtypes and storages are theirs for
//!   good.
//! - **P3.** What can change is read at each issue, before anything runs:
//!   a tensor spent by a kept ticket (refused, by `KvStore::issue`, for
//!   every kind), the updater or optimizer and the compression (with the
//!   checks they bring: the kind's own path makes them, as for a call).
//! - **P4.** An issue's ops are the call's: the same vars, in the same
//!   order; a kept copy that cannot run at once (a var busy or failed) is
//!   pushed as the call pushes it.

use std::any::Any;

use crate::error::{KvError, Result};
use crate::key::{IntoKey, Key};
use crate::store::KvStore;
use crate::tensor::Tensor;

/// Which call a [`CallPlan`] makes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// [`KvStore::push`] of the values.
    Push,
    /// [`KvStore::pull`] into the outputs.
    Pull,
    /// [`KvStore::pushpull`] of the values into the outputs.
    PushPull,
}

impl Call {
    /// Whether it pushes values.
    pub fn pushes(self) -> bool {
        matches!(self, Call::Push | Call::PushPull)
    }

    /// Whether it pulls into outputs.
    pub fn pulls(self) -> bool {
        matches!(self, Call::Pull | Call::PushPull)
    }

    /// Its name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Call::Push => "push",
            Call::Pull => "pull",
            Call::PushPull => "pushpull",
        }
    }
}

/// A call on one key over the same tensors, made once by [`KvStore::plan`]
/// and issued by [`KvStore::issue`] (see the module docs). It holds its
/// tensors (and their memory) until dropped.
pub struct CallPlan {
    pub(crate) call: Call,
    pub(crate) key: Key,
    pub(crate) values: Vec<Tensor>,
    pub(crate) outs: Vec<Tensor>,
    pub(crate) priority: i32,
    /// What the kind looked up (its own type, `Flavor::plan`).
    pub(crate) kept: Box<dyn Any + Send + Sync>,
    /// The store that made it (`KvStore::id`): others refuse it.
    store: u64,
}

impl std::fmt::Debug for CallPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallPlan")
            .field("call", &self.call)
            .field("key", &self.key)
            .field("values", &self.values.len())
            .field("outs", &self.outs.len())
            .field("priority", &self.priority)
            .finish()
    }
}

impl CallPlan {
    /// Its key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Its call.
    pub fn call(&self) -> Call {
        self.call
    }
}

impl KvStore {
    /// Plans `call` of `key` over `values` (pushed; none for a pull) and
    /// `outs` (pulled into; none for a push) at `priority`: looks the key
    /// up once and checks now what no later setting changes (the key, the
    /// tensors' shapes, dtypes and storages); what a setting made later
    /// decides (compression, an updater) is checked at each issue, as the
    /// call checks it. [`KvStore::issue`] then makes the call again and
    /// again at less cost per call (see `plan.rs`). One key per plan;
    /// several values (one per device) are summed at each issue, as a
    /// push's.
    ///
    /// ```
    /// use pskv_engine::{Context, Engine};
    /// use pskv_kvstore::{Call, DType, KvStore, Tensor};
    ///
    /// let engine = Engine::builder().cpu_threads(2).build()?;
    /// let kv = KvStore::create("local", &engine)?;
    /// kv.init(3, &Tensor::zeros(&engine, &[4], DType::F32, Context::Cpu)?)?;
    /// let g = Tensor::full(&engine, &[4], 2.0f32, Context::Cpu)?;
    /// let w = Tensor::zeros(&engine, &[4], DType::F32, Context::Cpu)?;
    /// let step = kv.plan(Call::PushPull, 3, &[g], &[w.clone()], 0)?;
    /// for _ in 0..10 {
    ///     kv.issue(&step)?;
    /// }
    /// assert_eq!(w.to_vec::<f32>()?, vec![2.0; 4]);
    /// # Ok::<(), pskv_kvstore::KvError>(())
    /// ```
    pub fn plan(
        &self,
        call: Call,
        key: impl IntoKey,
        values: &[Tensor],
        outs: &[Tensor],
        priority: i32,
    ) -> Result<CallPlan> {
        let key = key.into_key()?;
        let side = |given: &[Tensor], used: bool, what: &str| {
            if used {
                self.check_tensors(&key, given)
            } else if given.is_empty() {
                Ok(())
            } else {
                Err(KvError::invalid(format!(
                    "a {} plan of key {key} takes no {what}: give none",
                    call.name()
                )))
            }
        };
        side(values, call.pushes(), "values")?;
        side(outs, call.pulls(), "outputs")?;
        let mut plan = CallPlan {
            call,
            key,
            values: values.to_vec(),
            outs: outs.to_vec(),
            priority,
            kept: Box::new(()),
            store: self.id(),
        };
        plan.kept = self.flavor().plan(&plan)?;
        Ok(plan)
    }

    /// Issues `plan`'s call (see [`KvStore::plan`]): as the call itself
    /// would, in the same order with this store's other calls. A plan
    /// made by another store is refused, as is one whose tensors a kept
    /// ticket let go of ([`Tensor::is_spent`]: plan again over the remade
    /// tensors).
    pub fn issue(&self, plan: &CallPlan) -> Result<()> {
        if plan.store != self.id() {
            return Err(KvError::invalid(format!(
                "the {} plan of key {} was made by another store: plan it on this one",
                plan.call.name(),
                plan.key
            )));
        }
        if plan.values.iter().chain(&plan.outs).any(Tensor::is_spent) {
            return Err(KvError::invalid(format!(
                "the {} plan of key {}: a kept ticket let go of one of its tensors' memory (Ticket::spent); plan again over the remade tensors (Tensor::remade)",
                plan.call.name(),
                plan.key
            )));
        }
        self.flavor().issue(plan)
    }
}

#[cfg(test)]
mod tests {
    use pskv_engine::{Context, Engine};

    use super::*;
    use crate::dtype::DType;

    /// A plan over a tensor a kept ticket let go of is refused (the plan
    /// must be made again over the remade tensor): `KvStore::issue` checks
    /// it before any kind's path.
    #[test]
    fn a_plan_over_a_spent_tensor_is_refused() {
        let e = Engine::builder().cpu_threads(1).build().unwrap();
        let kv = KvStore::create("local", &e).unwrap();
        let t = || Tensor::zeros(&e, &[2], DType::F32, Context::Cpu).unwrap();
        kv.init(0, &t()).unwrap();
        let (v, o) = (t(), t());
        let (v, o) = (std::slice::from_ref(&v), std::slice::from_ref(&o));
        let plan = kv.plan(Call::PushPull, 0, v, o, 0).unwrap();
        kv.issue(&plan).unwrap();
        o[0].mark_spent();
        let err = kv.issue(&plan).unwrap_err().to_string();
        assert!(err.contains("Ticket::spent"), "{err}");
        e.wait_for_all().unwrap();
    }
}
