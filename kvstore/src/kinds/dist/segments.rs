//! What every worker checks of its keys with their servers after `init`,
//! and the shared segments of the co-located fast path that come with it.
//!
//! After rank 0's init reached the servers, every worker sends one check
//! per part ([`Op::Check`]): the type and byte count it holds, and whether
//! it will map the part's segment (sync mode, `PSKV_KVSTORE_SHM` not 0,
//! and a shared-memory link to the server). The server refuses a check
//! that does not match its record, so no worker can push or pull a key of
//! another size on any van; a worker that asks for the segment gets its
//! path and slot size, which must match its own. The server knows from the
//! checks who will map the file, and removes it once they have (`entry/segment.rs`),
//! so no file is left behind for workers that never map it.
//!
//! A restarted server has none of the old process's segments: the parts
//! it holds go back to plain messages at once, and a thread on every
//! worker checks those parts again with the new process (which maps the
//! new segments where they can be had).
//!
//! # A segment, and who touches a slot when (sync mode only)
//!
//! A part's segment is a transport [`Region`](pskv_transport::Region) the server creates, of
//! `W + 1` slots of the part's size: slot `r` is where worker `r` writes its
//! push, slot `W` holds the stored value. The messages then only say "my
//! push is in my slot" and "the value is in its slot", and a round costs
//! one copy into the slot per worker, one summing pass on the server, and
//! one copy out per worker, where the message path costs four more.
//!
//! - Worker `r` writes slot `r`, then sends its push. It writes again only
//!   after that push was answered, which the server does after summing.
//!   A push through the slot that failed instead (a timeout, a broken
//!   link) may still be held by the server, which reads the slot and
//!   writes the value slot when its round completes: the part's pushes and
//!   pulls go by message until a push succeeds (`DistKey::unsure`), and
//!   only then through the segment again.
//! - The server reads the input slots and writes the value slot only while
//!   completing a round, which needs every worker's next push; a worker
//!   pushes again only after it copied the value out of the slot. So no
//!   slot is read and written at once.
//! - Happens-before between processes comes from the message that follows
//!   each write (see [`Region`](pskv_transport::Region)).
//! - While the part's gate is open (`crate::gate`: the server opened it
//!   at the end of a round it summed with nothing to add), the workers sum
//!   the rounds themselves: each writes its slot and arrives at the gate,
//!   the last reads every slot and writes the value slot, and the others
//!   copy out only once it let them go. The gate's atomics, in the
//!   segment's header, order those writes, as the messages do here.
//! - A round at the gate that never ended (its summer, or a worker helping
//!   it with a chunk, stalled past the others' timeout or died) may still
//!   have a thread that writes the value slot later. The server finds such
//!   a round when it next sums one itself (every worker's arrival still
//!   counted at the gate; the arrivals of a round that never filled,
//!   which nobody sums, it only takes back) and moves the value out of
//!   the value slot for good: it shuts
//!   the gate, and answers "the value is in its slot" carry the value
//!   instead (`ops.rs`, `answer_into`, copies it out of the answer). The
//!   workers' slots still carry their pushes.
//! - A request that says "in my slot" carries the region's tag
//!   ([`Region::tag`](pskv_transport::Region::tag)): a server restarted since the worker mapped the old
//!   process's segment refuses it (the worker maps the new one and sends
//!   again) rather than reading a slot the worker never wrote.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pskv_transport::protocol::role_rank;
use pskv_transport::{NodeChange, Role};

use super::{DistKey, DistStore};
use crate::compression::Compression;
use crate::error::{KvError, Result};
use crate::wire::{Check, Op, Part};

impl DistStore {
    /// Key parts whose values travel through shared segments now.
    pub(super) fn shared_parts(&self) -> usize {
        self.keys
            .all()
            .iter()
            .map(|(_, dk)| dk.segs.read().iter().filter(|s| s.is_some()).count())
            .sum()
    }

    /// Checks the parts of `dk` that `want` names with their servers (all
    /// at once) and installs the segments that come back; the first error
    /// (a mismatch with a server's record, a failed request) names the key.
    pub(super) fn check_parts(&self, dk: &DistKey, want: impl Fn(&Part) -> bool) -> Result<()> {
        let meta = &dk.local.meta;
        let ub = dk.unit * meta.dtype.size();
        let slots = self.po.num_workers() as usize + 1;
        let mut pending = Vec::new();
        for (i, p) in dk.parts.iter().enumerate().filter(|(_, p)| want(p)) {
            let server = Role::Server.id_of(p.server);
            let wants_shm = self.sync && self.opts.shm_direct && self.po.shares_memory_with(server);
            let check = Check {
                part_bytes: (p.len * ub) as u64,
                wants_shm,
                // Acquire: counted by answers of pushes on other threads.
                seen: dk.seen.load(Ordering::Acquire),
                shape: meta.shape.iter().map(|d| *d as u64).collect(),
            };
            let body = Bytes::from(check.encode());
            let head = self.head(Op::Check, meta.dtype, Compression::None);
            let mut opts = self.request_opts(head, 0);
            if self.replicas > 1 {
                opts.target = Some(self.route(p.server, false));
            }
            let sent = self
                .kv
                .push_pull(&[p.ps_key], &[body.len() as u32], body, opts)?;
            pending.push((i, sent));
        }
        let mut first_err = None;
        let mut fresh = Vec::new();
        for (i, sent) in pending {
            let got = sent.wait(self.opts.timeout);
            let resp = match got {
                Ok(r) => r,
                Err(e) => {
                    first_err.get_or_insert(KvError::Server {
                        op: "init",
                        key: dk.local.key.to_string(),
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let body = resp.to_bytes();
            if body.is_empty() {
                continue;
            }
            let want_bytes = dk.parts[i].len * ub;
            let server = Role::Server.id_of(dk.parts[i].server);
            let seg = self
                .po
                .open_region(server, &body)
                .map_err(|e| e.to_string())
                .and_then(|r| match (r.slots(), r.slot_len()) {
                    (s, b) if (s, b) == (slots, want_bytes) => Ok(r),
                    (s, b) => Err(format!(
                        "the server's segment has {s} slots of {b} bytes, this part needs {slots} of {want_bytes}"
                    )),
                });
            match seg {
                Ok(s) => fresh.push((i, Arc::new(s))),
                // The server removes the file after a round, once the grace for
                // mapping it has passed (`SHM_GRACE` in `server/entry/segment.rs`).
                Err(e) => tracing::warn!(
                    "key {} part {i}: no shared memory with its server ({e}); using messages",
                    dk.local.key
                ),
            }
        }
        let mut segs = dk.segs.write();
        if segs.len() != dk.parts.len() {
            *segs = vec![None; dk.parts.len()];
        }
        for (i, s) in fresh {
            segs[i] = Some(s);
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Watches for restarted servers: their parts leave shared memory at once,
/// and a thread checks them again with the new process.
pub(super) fn watch_restarts(store: &Arc<DistStore>) {
    let weak = Arc::downgrade(store);
    store.po.watch_nodes(Arc::new(move |change| {
        let Some(me) = weak.upgrade() else {
            return;
        };
        let id = match change {
            NodeChange::Dead(id) => {
                // Rounds gathering at the gates that need the dead node go
                // to a server, which fails them naming it (or, its server
                // dead, they fail): no wait for the timeout. (Closing
                // never blocks.)
                let server = match role_rank(id) {
                    Some((Role::Server, r)) => Some(r),
                    Some((Role::Worker, r)) => {
                        // A round it was summing never ends: its waiters
                        // fail now.
                        me.waits.worker_died(r as usize);
                        None
                    }
                    _ => None,
                };
                for (_, dk) in me.keys.all() {
                    me.close_gates_of(&dk, server);
                }
                return;
            }
            NodeChange::Restarted(id) => id,
        };
        let Some((Role::Server, rank)) = role_rank(id) else {
            return;
        };
        let Some(epoch) = me
            .restarts
            .get(rank as usize)
            .map(|r| r.fetch_add(1, Ordering::AcqRel) + 1)
        else {
            return;
        };
        for (_, dk) in me.keys.all() {
            // Rounds gathering at the old process's gates go to a server.
            me.close_gates_of(&dk, Some(rank));
            forget_segments(&dk, rank);
        }
        let weak = weak.clone();
        let spawned = std::thread::Builder::new()
            .name("pskv-recheck".into())
            .spawn(move || recheck(weak, rank, epoch));
        if let Err(e) = spawned {
            tracing::warn!("server {rank} restarted; its keys keep plain messages ({e})");
        }
    }));
}

/// Drops the segments of `dk`'s parts on server `rank` (their process is
/// gone): those parts go by message.
fn forget_segments(dk: &DistKey, rank: u32) {
    let mut segs = dk.segs.write();
    for (i, p) in dk.parts.iter().enumerate() {
        if p.server == rank {
            if let Some(s) = segs.get_mut(i) {
                *s = None;
            }
        }
    }
}

/// Checks the parts of server `rank` again with its new process (restart
/// number `epoch`), once the link to it is up.
fn recheck(weak: std::sync::Weak<DistStore>, rank: u32, epoch: u64) {
    let server = Role::Server.id_of(rank);
    let current = |me: &DistStore| {
        me.restarts[rank as usize].load(Ordering::Acquire) == epoch
            && !me.closed.load(Ordering::Acquire)
    };
    // Workers connect to the new process as they learn of it; its van says
    // whether segments can be shared at all.
    let mut waited = Duration::ZERO;
    let keys = loop {
        let Some(me) = weak.upgrade() else { return };
        if !current(&me) {
            return;
        }
        if me.po.van_to(server).is_some() {
            break me.keys.all();
        }
        if waited > me.opts.timeout {
            tracing::warn!(
                "server {rank} restarted but was not reached within {:?}; its keys keep plain messages",
                me.opts.timeout
            );
            return;
        }
        drop(me);
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    };
    // Every key's parts are checked; those refused (the new process may
    // not hold the key yet: it is still loading its checkpoint, or rank
    // 0's init has not reached it) are asked again, all of them each pass,
    // until the store's timeout. So one key the new process never gets
    // (initialized after its checkpoint was written) does not hold back
    // the others' checks, which tell it the rounds this worker saw
    // complete (`server/entry/cut_short.rs`: without them a round that a
    // crash left half answered waits for good).
    let mut left = keys;
    let mut waited = Duration::ZERO;
    loop {
        let Some(me) = weak.upgrade() else { return };
        let mut refused = Vec::new();
        for (key, dk) in left {
            // Subtle: segments of a process that has died since must not
            // be installed; `check_parts` installs under the lock that the
            // restart callback clears segments under, so check the epoch
            // first and again after (clearing what a later restart made
            // stale).
            if !current(&me) {
                return;
            }
            let checked = me.check_parts(&dk, |p| p.server == rank);
            if !current(&me) {
                forget_segments(&dk, rank);
                return;
            }
            if let Err(e) = checked {
                refused.push((key, dk, e));
            }
        }
        if refused.is_empty() {
            return;
        }
        if waited > me.opts.timeout {
            for (key, _, e) in refused {
                tracing::warn!("key {key} after server {rank} restarted: {e}");
            }
            return;
        }
        drop(me);
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
        left = refused.into_iter().map(|(k, d, _)| (k, d)).collect();
    }
}
