//! What survives a crash and a death: records for the checkpoint, a
//! restart's restore before serving, and a worker's or peer's death.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pskv_transport::protocol::{describe, role_rank};
use pskv_transport::{NodeChange, Role};

use super::checkpoint::{self, CheckpointError};
use super::entry::EntryState;
use super::{Entry, Inner};
use crate::error::Fault;
use crate::updater::{KeyState, Rule};

impl Inner {
    /// Puts back the keys and settings of a checkpoint.
    pub(super) fn restore(&self, file: checkpoint::File) {
        let g = file.globals;
        self.generation.store(g.generation, Ordering::Release);
        if let Some(opt) = g.optimizer {
            // num_update goes on from the restored counts.
            for (_, rec) in &file.keys {
                if let Some(s) = &rec.opt {
                    opt.note_count(s.count);
                }
            }
            *self.rule.write() = Some(Rule::Optimizer {
                opt: Arc::new(opt),
                generation: g.generation,
            });
        }
        self.sync_mode.store(g.sync, Ordering::Release);
        self.multi_precision
            .store(g.multi_precision, Ordering::Release);
        *self.compression_params.lock() = g.compression;
        let mut entries = self.entries.write();
        let n = file.keys.len();
        let mut rounds = (u64::MAX, 0u64);
        for (ps_key, rec) in file.keys {
            let mut st = EntryState::new(rec.key_id, rec.part, rec.dtype, &rec.value, self.workers);
            st.rounds = rec.rounds;
            st.master = rec.master;
            st.opt = KeyState {
                generation: g.generation,
                state: rec.opt,
            };
            rounds = (rounds.0.min(rec.rounds), rounds.1.max(rec.rounds));
            entries.insert(ps_key, Entry::new(st));
        }
        tracing::warn!(
            "server restarted: {n} keys back from the checkpoint, at rounds {} to {}",
            if n == 0 { 0 } else { rounds.0 },
            rounds.1
        );
    }

    /// The server-wide settings a checkpoint keeps.
    pub(super) fn globals(&self) -> checkpoint::Globals {
        let (optimizer, generation) = match &*self.rule.read() {
            Some(Rule::Optimizer { opt, generation }) => (Some((**opt).clone()), *generation),
            _ => (None, self.generation.load(Ordering::Acquire)),
        };
        checkpoint::Globals {
            optimizer,
            generation,
            sync: self.sync_mode.load(Ordering::Acquire),
            multi_precision: self.multi_precision.load(Ordering::Acquire),
            compression: self.compression_params.lock().clone(),
        }
    }

    /// A key's state as the checkpoint keeps it (inside an op on the key,
    /// or under its lock).
    pub(super) fn record(&self, ps_key: u64, st: &EntryState) {
        let Some(c) = self.ckpt.get() else { return };
        let generation = self.generation();
        let opt = match (&st.opt.state, generation) {
            (Some(s), Some(g)) if st.opt.generation == g => Some(s.clone()),
            _ => None,
        };
        c.record(
            ps_key,
            checkpoint::KeyRecord {
                key_id: st.key_id,
                part: st.part,
                dtype: st.dtype,
                rounds: st.rounds,
                value: st.snapshot(),
                opt,
                master: st.master.clone(),
            },
        );
    }

    /// Records every key and the settings, and waits until they are on disk.
    pub(super) fn checkpoint_all(&self) -> std::result::Result<(), Fault> {
        let Some(c) = self.ckpt.get() else {
            return Ok(());
        };
        c.set_globals(self.globals());
        let entries = self.entries_snapshot();
        for (k, e) in entries.into_iter().filter(|(k, _)| self.serves(*k)) {
            let st = e.st.lock();
            self.record(k, &st);
        }
        c.flush(Duration::from_secs(120)).map_err(|e| match e {
            CheckpointError::Timeout { .. } => Fault::Failed(e.to_string()),
            _ => Fault::Failed(format!("the checkpoint was not written: {e}")),
        })
    }

    /// A worker died: every sync round in progress fails, naming it, and
    /// so does every sync push until it comes back (a round needs every
    /// worker). A restarted worker clears it.
    pub(super) fn membership(self: &Arc<Self>, change: NodeChange) {
        match change {
            NodeChange::Dead(id) => {
                if let (Some((Role::Server, r)), Some(p)) = (role_rank(id), self.repl.get()) {
                    if p.on && r == p.primary_of_copies() {
                        self.promote();
                    }
                    if p.on && id == p.backup() {
                        tracing::warn!(
                            "server {}: its backup {} died; rounds go on without copies",
                            p.rank,
                            describe(id)
                        );
                        p.backup_died();
                    }
                    return;
                }
                let Some((Role::Worker, _)) = role_rank(id) else {
                    return;
                };
                let msg = format!(
                    "{} died (the scheduler declared it dead): a sync round cannot complete \
                     without it",
                    describe(id)
                );
                tracing::warn!("server: {msg}");
                {
                    let mut dead = self.dead_workers.lock();
                    if !dead.contains(&id) {
                        dead.push(id);
                    }
                }
                let rank = role_rank(id).map_or(usize::MAX, |(_, r)| r as usize);
                for (_, e) in self.entries_snapshot() {
                    let mut st = e.st.lock();
                    // Rounds the workers sum come back here, to fail too.
                    st.close_gate();
                    st.fail_active_round(&msg);
                    st.worker_gone(rank);
                }
            }
            NodeChange::Restarted(id) => {
                self.dead_workers.lock().retain(|&d| d != id);
            }
        }
    }

    /// Why a sync push cannot be taken now, if a worker is dead: every
    /// dead worker, the first to die first (the others may be workers that
    /// stopped on the news of the first).
    pub(super) fn dead_worker(&self) -> Option<String> {
        let dead = self.dead_workers.lock();
        let (first, rest) = dead.split_first()?;
        Some(if rest.is_empty() {
            format!(
                "{} died (the scheduler declared it dead): a sync round cannot complete without it",
                describe(*first)
            )
        } else {
            let then: Vec<String> = rest.iter().map(|&d| describe(d)).collect();
            format!(
                "{} died (the scheduler declared it dead), then {}: a sync round cannot complete without them",
                describe(*first),
                then.join(", ")
            )
        })
    }
}
