//! `init`'s two halves: a call's keys added to this worker's registry (cut
//! into parts by the server key ranges), then the steps every worker takes
//! together (agree on the keys, rank 0 sends the values, each checks its
//! parts with the servers and maps the shared segments).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use pskv_engine::Var;

use super::{collective, staging, DistKey, DistStore, Staging};
use crate::error::Result;
use crate::key::Key;
use crate::kinds::local::LocalKey;
use crate::registry::Meta;
use crate::tensor::Tensor;
use crate::wire::{plan, Part};

impl DistStore {
    /// Checks the keys of an `init` call and adds them to this worker's
    /// registry, all or none.
    pub(super) fn register(&self, items: &[(Key, Tensor)]) -> Result<Vec<(Arc<DistKey>, Tensor)>> {
        self.keys.check_new(items.iter().map(|(k, _)| k))?;
        let ranges = self.po.server_key_ranges();
        // Every key is cut and given its storage first, then all are added
        // at once (`Registry::insert_all`): a key that cannot be cut (say,
        // into more than 65,536 parts) fails the call before any is added.
        let made = items
            .iter()
            .map(|(key, value)| Ok((key.clone(), self.make_key(key, value, &ranges)?)))
            .collect::<Result<Vec<_>>>()?;
        let added = self.keys.insert_all(made)?;
        Ok(added
            .into_iter()
            .zip(items)
            .map(|(dk, (_, value))| (dk, value.clone()))
            .collect())
    }

    /// One key of an `init` call, cut into parts, with its storage (not
    /// registered yet).
    fn make_key(&self, key: &Key, value: &Tensor, ranges: &[(u64, u64)]) -> Result<DistKey> {
        let meta = Meta::of(value);
        // Keys of two or more dimensions are cut in whole rows, so that
        // row-sparse pushes and pulls map onto parts.
        let (unit, units) = if meta.shape.len() >= 2 && meta.row_len() > 0 {
            (meta.row_len(), meta.shape[0])
        } else {
            (1, meta.len())
        };
        let parts = plan(
            key.id(),
            units,
            unit * meta.dtype.size(),
            meta.len() >= self.opts.bigarray_bound,
            self.opts.partition_bytes,
            ranges,
        )?;
        let stored = Tensor::zeros(
            &self.engine,
            &meta.shape,
            meta.dtype,
            pskv_engine::Context::Cpu,
        )?;
        Ok(DistKey {
            local: Arc::new(LocalKey::new(key.clone(), meta, stored)),
            parts: parts.into(),
            unit,
            var: Var::named(format!("kvstore key {key}")),
            residual: Mutex::new(Vec::new()),
            sum: Mutex::new(None),
            segs: RwLock::new(Vec::new()),
            unsure: Arc::default(),
            seen: Arc::new(AtomicU64::new(0)),
            stage: Staging::default(),
            settles: Arc::default(),
        })
    }

    /// The collective steps of `init`: the workers agree on the keys; rank
    /// 0 sends the values; every worker checks its parts with the servers
    /// (and maps the shared segments). Each step fails on every worker if
    /// it fails on one.
    pub(super) fn init_together(
        &self,
        items: &[(Key, Tensor)],
        added: &[(Arc<DistKey>, Tensor)],
    ) -> Result<()> {
        // `register` added every item, in order (or failed: no call here).
        debug_assert_eq!(items.len(), added.len());
        let metas: Vec<(Key, Meta, &[Part])> = items
            .iter()
            .zip(added)
            .map(|((k, v), (dk, _))| (k.clone(), Meta::of(v), &dk.parts[..]))
            .collect();
        let agree =
            collective::keys_setting(&metas, self.opts.partition_bytes, self.opts.bigarray_bound);
        self.collective("init", Ok(()), Some(agree))?;
        let mut sent = Ok(());
        if self.po.my_rank() == 0 {
            for (dk, value) in added {
                if let Err(e) = staging::host_once(value, 0).and_then(|v| self.init_op(dk, &v)) {
                    sent = Err(e);
                    break;
                }
            }
            if sent.is_ok() {
                sent = self.wait_vars(added.iter().map(|(dk, _)| &dk.var));
            }
        }
        self.collective("init", sent, None)?;
        let mut checked = Ok(());
        for (dk, _) in added {
            if let Err(e) = self.check_parts(dk, |_| true) {
                checked = Err(e);
                break;
            }
        }
        self.collective("init", checked, None)
    }
}
