//! The local kinds' planned calls (`kvstore/src/plan.rs`): a plan keeps
//! the key's entry (P2: a local store never removes a key) and the kept
//! specs of the call's small host copies. An issue with no updater, no
//! compression and one value on the host copies it into the stored value
//! and the stored value into each host output, each at once when its
//! tensors are idle (`KeptCopy`); anything else (several values, a device,
//! an updater, compression) takes the call's own path (`LocalKey::push`,
//! `Comm::broadcast`), with the checks a setting made since brings (P3).

use std::any::Any;
use std::sync::Arc;

use super::{check_values, LocalKey, LocalStore};
use crate::error::{KvError, Result};
use crate::kinds::check_planned;
use crate::plan::CallPlan;
use crate::tensor::KeptCopy;

/// What a local store keeps of a planned call: the key's entry, and its
/// small host copies in (one value) and out (every output on the host;
/// else the pull broadcasts as the call does).
struct LocalPlan {
    entry: Arc<LocalKey>,
    copy_in: Option<KeptCopy>,
    copy_out: Option<Vec<KeptCopy>>,
}

impl LocalStore {
    /// `Flavor::plan`.
    pub(super) fn plan_call(&self, plan: &CallPlan) -> Result<Box<dyn Any + Send + Sync>> {
        let entry = self.keys.get(&plan.key)?;
        check_planned(&entry.meta, plan)?;
        let priority = plan.priority;
        let copy_in = match &plan.values[..] {
            [v] => KeptCopy::new(v, &entry.stored, priority),
            _ => None,
        };
        let copy_out = plan
            .outs
            .iter()
            .map(|o| KeptCopy::new(&entry.stored, o, priority))
            .collect();
        Ok(Box::new(LocalPlan {
            entry,
            copy_in,
            copy_out,
        }))
    }

    /// `Flavor::issue`.
    pub(super) fn issue_planned(&self, plan: &CallPlan) -> Result<()> {
        let Some(p) = plan.kept.downcast_ref::<LocalPlan>() else {
            return Err(KvError::invalid("internal: a local plan without its entry"));
        };
        let (e, priority) = (&p.entry, plan.priority);
        if plan.call.pushes() {
            let compression = *self.compression.read();
            let rule = self.rule.read().clone();
            match (&p.copy_in, &rule) {
                // No updater, nothing to sum or compress: the value
                // becomes the stored one.
                (Some(c), None) if !compression.is_on() => c.run()?,
                _ => {
                    // What the plan's checks left to each issue (P3).
                    check_values(&plan.key, &e.meta, &plan.values, compression)?;
                    e.push(
                        &self.comm,
                        &plan.values,
                        rule.as_ref(),
                        compression,
                        self.device,
                        priority,
                    )?;
                }
            }
        }
        if plan.call.pulls() {
            match &p.copy_out {
                Some(copies) => copies.iter().try_for_each(KeptCopy::run)?,
                None => self.comm.broadcast(&e.stored, &plan.outs, priority)?,
            }
        }
        Ok(())
    }
}
