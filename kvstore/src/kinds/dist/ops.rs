//! The engine ops of a distributed key: push (and push-pull), pull,
//! row-sparse pull and init. Each sends every part of the key and
//! completes when every server answered; its var rules make the key's ops
//! run in order. How a part's values are built (zero-copy slices, shared
//! slots, 2-bit or 1-bit codes, rows) and where answers land.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pskv_engine::{OpSpec, Property, RunContext};
use pskv_transport::copy::copy;
use pskv_transport::{KvResponse, Region, SlotSpan};

use super::inflight::OutPtr;
use super::parts::{OnAnswer, Round};
use super::staging::Way;
use super::{DistKey, DistStore, Segs};
use crate::compression::Compression;
use crate::error::{Fault, KvError, Result};
use crate::tensor::{check_rows, gpu_of, Buf, Storage, Tensor};
use crate::wire::{rows_header, Op};

/// Ops on at most this many bytes run at once on the thread that makes
/// them ready (they only hand buffers to the transport).
pub(super) const INLINE_BYTES: usize = 1 << 20;
impl DistStore {
    /// Which parts of a key travel through shared memory now.
    pub(super) fn shm_parts(&self, dk: &DistKey) -> Segs {
        if self.sync {
            let segs = dk.segs.read();
            // Empty for a key whose init has not checked its parts
            // (`check_parts` sets one per part): none mapped, its ops go by
            // message, and the servers answer for a key they do not hold.
            if !segs.is_empty() {
                debug_assert_eq!(segs.len(), dk.parts.len());
                return segs.iter().cloned().collect();
            }
        }
        Segs::from_elem(None, dk.parts.len())
    }

    /// Which parts of a push or pull travel through their shared segment
    /// now: those of [`DistStore::shm_parts`] whose slot is not in doubt (a
    /// push through it failed, and none has succeeded since, so the server
    /// may still complete a round with that push: it reads the worker's
    /// slot then, and writes the value slot; see `DistKey::unsure`).
    pub(super) fn shm_parts_now(&self, dk: &DistKey) -> Segs {
        let mut segs = self.shm_parts(dk);
        dk.unsure.mask(&mut segs);
        segs
    }

    /// Builds the values of part `i` of a push of `grad` (inside an op that
    /// reads `grad` and writes the key's var): shared-slot copy, 2-bit or
    /// 1-bit codes, row-sparse rows, or a zero-copy slice.
    pub(super) fn push_part(
        &self,
        dk: &DistKey,
        grad: &Tensor,
        compression: Compression,
        (seg, lent): (Option<&Arc<Region>>, Option<&SlotSpan>),
        (i, rc): (usize, &RunContext<'_>),
    ) -> std::result::Result<(Bytes, u16), Fault> {
        let d = grad.read(rc)?;
        let size = dk.local.meta.dtype.size();
        let p = dk.parts[i];
        let ub = dk.unit * size;
        if grad.storage() == Storage::RowSparse {
            let rb = dk.unit * size;
            let lo = d.rows.partition_point(|&r| (r as usize) < p.start);
            let hi = d.rows.partition_point(|&r| (r as usize) < p.start + p.len);
            let rel: Vec<i64> = d.rows[lo..hi].iter().map(|r| r - p.start as i64).collect();
            let mut v = rows_header(&rel, dk.unit);
            v.extend_from_slice(&d.bytes()[lo * rb..hi * rb]);
            return Ok((Bytes::from(v), 0));
        }
        let range = p.start * dk.unit..(p.start + p.len) * dk.unit;
        if compression.is_on() {
            let grad: &[f32] = d.typed();
            let mut res = dk.residual.lock();
            if res.len() != grad.len() {
                *res = vec![0.0; grad.len()];
            }
            return compression
                .encode(&self.comm.kernels, &grad[range.clone()], &mut res[range])
                .map(|b| (b, 0))
                .map_err(Fault::from);
        }
        let range = p.start * ub..(p.start + p.len) * ub;
        self.dense_payload(seg, &d.bytes()[range.clone()], lent, || d.share(range))
    }

    /// The payload of a dense part of values `bytes`: when the part
    /// travels through `seg`, this worker's slot there holds the values and
    /// the payload is their count, with the segment's tag; else `share()`,
    /// the bytes themselves without a copy. The slot holds them already
    /// when the bytes lie in the key's push buffer `lent`, in this slot:
    /// nothing is copied. (No other bytes come here with a slot the push
    /// buffer holds: `DistStore::mask_lent`.)
    pub(super) fn dense_payload(
        &self,
        seg: Option<&Arc<Region>>,
        bytes: &[u8],
        lent: Option<&SlotSpan>,
        share: impl FnOnce() -> Bytes,
    ) -> std::result::Result<(Bytes, u16), Fault> {
        let Some(seg) = seg else {
            return Ok((share(), 0));
        };
        let me = self.po.my_rank() as usize;
        if lent.is_some_and(|l| l.is_slot_at(bytes.as_ptr(), bytes.len(), seg, me)) {
            self.in_place.fetch_add(1, Ordering::Relaxed);
        } else if self.sync && late_round(seg, bytes.len()) {
            // A round whose workers arrive before they copy: the values
            // travel with the push to its gate, which copies into the slot
            // only the chunks others sum (`gate/late.rs`).
            return Ok((share(), seg.tag()));
        } else {
            // SAFETY: this worker's own slot, which the server reads
            // only after the push below (see `kinds/dist/segments.rs`),
            // and which no push buffer holds (`mask_lent`).
            copy(unsafe { seg.slot_mut(me) }, bytes);
        }
        // The server checks the count against the key's size, as it
        // checks a message's length.
        let count = (bytes.len() as u64).to_le_bytes();
        Ok((Bytes::copy_from_slice(&count), seg.tag()))
    }

    /// Pushes the op that sends `grad` to the servers; with `into`, as a
    /// push-pull whose answers (the new values) land in `into`. Either may
    /// be a dense tensor on a GPU: the op then stages it through the key's
    /// pinned buffers part by part (`staging`), each part's copy
    /// overlapping the transfer of the others.
    pub(super) fn push_op(
        &self,
        dk: &Arc<DistKey>,
        grad: &Tensor,
        into: Option<&Tensor>,
        priority: i32,
    ) -> Result<()> {
        let compression = *self.compression.read();
        let meta = &dk.local.meta;
        let rows = grad.storage() == Storage::RowSparse;
        let on_gpu = gpu_of(grad.ctx()).is_some();
        if rows && on_gpu {
            return Err(KvError::invalid(
                "a row-sparse push from a GPU is staged whole first (a dist bug)",
            ));
        }
        // The pinned send buffer of an uncompressed push from a GPU.
        let send = if on_gpu && !compression.is_on() {
            Some(dk.stage.host_for(grad, Way::Send)?)
        } else {
            None
        };
        let land = into.map(|o| dk.stage.landing(o)).transpose()?;
        let prop = if meta.bytes() <= INLINE_BYTES && !compression.is_on() && !on_gpu {
            Property::Async
        } else {
            Property::Normal
        };
        let name = if into.is_some() { "pushpull" } else { "push" };
        let mut spec = OpSpec::new(if into.is_some() {
            "kvstore_dist_pushpull"
        } else {
            "kvstore_dist_push"
        })
        .priority(priority)
        .property(prop)
        .read(grad.var())
        .write(&dk.var);
        for t in send.iter().chain(
            land.iter()
                .flat_map(|l| [Some(&l.host), l.device.as_ref()])
                .flatten(),
        ) {
            spec = spec.write(t.var());
        }
        let me = self.handle();
        let (dk2, g) = (dk.clone(), grad.clone());
        self.engine.push_async(spec, move |rc, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let dtype = dk2.local.meta.dtype;
            // The key's push buffer, if one lives (L1 of `push_buffer.rs`).
            let lent = dk2.unsure.lent();
            let segs = if rows || compression.is_on() {
                Segs::from_elem(None, dk2.parts.len())
            } else {
                let mut segs = me.shm_parts_now(&dk2);
                if let Some(l) = &lent {
                    me.mask_lent(&dk2, &g, l, &mut segs, &rc);
                }
                segs
            };
            let op = match (rows, &land) {
                (true, _) => Op::RowPush,
                (false, None) => Op::Push,
                (false, Some(_)) => Op::PushPull,
            };
            let head = me.head(op, dtype, compression);
            let mut round = Round {
                // Acquire: the key's previous push counted its round (that
                // op completed before this one runs).
                tag: if head.sync {
                    dk2.seen.load(Ordering::Acquire) + 1
                } else {
                    0
                },
                ..Round::ignore_answers(head, priority, name)
            };
            let mut settle = Vec::new();
            // The output is the round's to keep from here (`Round::keep`).
            if let Some(l) = land {
                match me.landing(&dk2, (&l, Some(&g)), segs.clone(), &rc) {
                    Ok((on_answer, lanes, land)) => {
                        (round.on_answer, settle, round.land) = (on_answer, lanes, land);
                        round.keep = Some(l.host);
                    }
                    Err(e) => return completion.fail(e),
                }
            }
            match (&send, on_gpu) {
                (Some(h), _) => me.send_staged(&dk2, &g, h, segs, round, (completion, &rc), settle),
                (None, true) => {
                    me.send_quantized(&dk2, &g, compression, round, (completion, &rc), settle)
                }
                (None, false) => {
                    // Subtle: the gradient and the push buffer are moved into
                    // `prepare`, which `send_parts` drops before it sends the
                    // last part. The op may complete as soon as that part is
                    // answered, and a caller that then drops the push buffer
                    // it pushed from must find it gone (a key's next push
                    // buffer is refused while one lives). The output, the
                    // round keeps until then (`Round::keep`).
                    let (me2, dk3, rc2) = (&me, &dk2, &rc);
                    let prepare = move |i: usize| {
                        me2.push_part(
                            dk3,
                            &g,
                            compression,
                            (segs[i].as_ref(), lent.as_deref()),
                            (i, rc2),
                        )
                    };
                    me.send_parts(&dk2, 0..dk2.parts.len(), round, completion, settle, prepare)
                }
            }
        })?;
        Ok(())
    }

    /// Pushes the op that pulls the key's value into `out` (dense; on a
    /// GPU, through the key's pinned receive buffer, part by part).
    pub(super) fn pull_op(&self, dk: &Arc<DistKey>, out: &Tensor, priority: i32) -> Result<()> {
        let meta = &dk.local.meta;
        let land = dk.stage.landing(out)?;
        let prop = if meta.bytes() <= INLINE_BYTES && land.device.is_none() {
            Property::Async
        } else {
            Property::Normal
        };
        let mut spec = OpSpec::new("kvstore_dist_pull")
            .priority(priority)
            .property(prop)
            .read(&dk.var)
            .write(land.host.var());
        if let Some(d) = &land.device {
            spec = spec.write(d.var());
        }
        let me = self.handle();
        let dk2 = dk.clone();
        self.engine.push_async(spec, move |rc, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let dtype = dk2.local.meta.dtype;
            let segs = me.shm_parts_now(&dk2);
            let (on_answer, settle, land_in) =
                match me.landing(&dk2, (&land, None), segs.clone(), &rc) {
                    Ok(x) => x,
                    Err(e) => return completion.fail(e),
                };
            let round = Round {
                on_answer,
                land: land_in,
                // The output is the round's to keep from here.
                keep: Some(land.host),
                ..Round::ignore_answers(
                    me.head(Op::Pull, dtype, Compression::None),
                    priority,
                    "pull",
                )
            };
            me.send_parts(&dk2, 0..dk2.parts.len(), round, completion, settle, |i| {
                Ok((Bytes::new(), segs[i].as_ref().map_or(0, |s| s.tag())))
            });
        })?;
        Ok(())
    }

    /// Pushes the op that pulls rows `row_ids` into the row-sparse `out`.
    pub(super) fn pull_rows_op(
        &self,
        dk: &Arc<DistKey>,
        out: &Tensor,
        row_ids: &Tensor,
        priority: i32,
    ) -> Result<()> {
        let spec = OpSpec::new("kvstore_dist_pull_row_sparse")
            .priority(priority)
            .property(Property::Normal)
            .read(&dk.var)
            .read(row_ids.var())
            .write(out.var());
        let me = self.handle();
        let (dk2, o, r) = (dk.clone(), out.clone(), row_ids.clone());
        self.engine.push_async(spec, move |rc, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let meta = &dk2.local.meta;
            let guards = r.read(&rc).and_then(|rd| Ok((rd, o.write(&rc)?)));
            let (rd, mut od) = match guards {
                Ok(x) => x,
                Err(e) => return completion.fail(e),
            };
            let mut rows: Vec<i64> = rd.typed::<i64>().to_vec();
            rows.sort_unstable();
            rows.dedup();
            if let Err(e) = check_rows(
                &rows,
                meta.shape[0],
                &format!("pull_row_sparse of key {}", dk2.local.key),
            ) {
                return completion.fail(e);
            }
            let rl = dk2.unit;
            let rb = rl * meta.dtype.size();
            od.set(rows.clone(), Buf::zeroed(rows.len() * rb));
            let buf = od.bytes_mut();
            let ptr = OutPtr(buf.as_mut_ptr(), buf.len());
            // Subtle: the guards go before the completion is handed on (the
            // op may complete inside `send_parts`, and the engine then runs
            // the next op on these vars); the answers fill `o` through `ptr`.
            drop((rd, od));
            // Each part's requested rows are a run of the sorted list.
            let mut payloads = Vec::new();
            let mut offsets = vec![0usize; dk2.parts.len()];
            let mut counts = vec![0usize; dk2.parts.len()];
            let mut at = 0;
            for (i, p) in dk2.parts.iter().enumerate() {
                let lo = at;
                while at < rows.len() && (rows[at] as usize) < p.start + p.len {
                    at += 1;
                }
                if at > lo {
                    let rel: Vec<i64> = rows[lo..at].iter().map(|x| x - p.start as i64).collect();
                    offsets[i] = lo * rb;
                    counts[i] = at - lo;
                    payloads.push((i, Bytes::from(rows_header(&rel, rl))));
                }
            }
            let head = me.head(Op::RowPull, meta.dtype, Compression::None);
            let which: Vec<usize> = payloads.iter().map(|(i, _)| *i).collect();
            let mut bodies: Vec<Option<Bytes>> = vec![None; dk2.parts.len()];
            for (i, b) in payloads {
                bodies[i] = Some(b);
            }
            let round = Round {
                on_answer: Arc::new(move |i, resp, _| {
                    check_len(resp, counts[i] * rb)?;
                    copy_parts(&ptr, offsets[i], resp)
                }),
                // The answers write into `o`'s buffer: the round keeps it.
                keep: Some(o.clone()),
                ..Round::ignore_answers(head, priority, "pull_row_sparse")
            };
            me.send_parts(
                &dk2,
                which.iter().copied(),
                round,
                completion,
                Vec::new(),
                |i| Ok((bodies[i].take().unwrap_or_default(), 0)),
            );
        })?;
        Ok(())
    }

    /// Pushes the op that sends rank 0's initial value of a key.
    pub(super) fn init_op(&self, dk: &Arc<DistKey>, value: &Tensor) -> Result<()> {
        let spec = OpSpec::new("kvstore_dist_init")
            .property(Property::Normal)
            .read(value.var())
            .write(&dk.var);
        let me = self.handle();
        let (dk2, v) = (dk.clone(), value.clone());
        self.engine.push_async(spec, move |rc, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let meta = &dk2.local.meta;
            let ub = dk2.unit * meta.dtype.size();
            let d = match v.read(&rc) {
                Ok(d) => d,
                Err(e) => return completion.fail(e),
            };
            let dense: Bytes = match v.storage() {
                Storage::Dense => d.share(0..d.bytes().len()),
                Storage::RowSparse => {
                    let mut b = vec![0u8; meta.bytes()];
                    for (i, &r) in d.rows.iter().enumerate() {
                        let r = r as usize;
                        b[r * ub..(r + 1) * ub].copy_from_slice(&d.bytes()[i * ub..(i + 1) * ub]);
                    }
                    Bytes::from(b)
                }
            };
            // The guard goes before the completion is handed on.
            drop(d);
            let mut bodies: Vec<Option<Bytes>> = dk2
                .parts
                .iter()
                .map(|p| Some(dense.slice(p.start * ub..(p.start + p.len) * ub)))
                .collect();
            let head = me.head(Op::Init, meta.dtype, Compression::None);
            let round = Round::ignore_answers(head, 0, "init");
            me.send_parts(&dk2, 0..bodies.len(), round, completion, Vec::new(), |i| {
                Ok((bodies[i].take().unwrap_or_default(), 0))
            });
        })?;
        Ok(())
    }
}

/// Whether a sync push of `len` bytes through `seg` goes to a round of
/// late copies at its gate (open now, and of that kind; the arrival checks
/// the kind again: G4 of `gate/mod.rs`).
fn late_round(seg: &Region, len: usize) -> bool {
    len == seg.slot_len() && crate::gate::Gate::of(seg).late_now().is_some()
}

pub(super) fn check_len(resp: &KvResponse, want: usize) -> std::result::Result<(), Fault> {
    if resp.len() != want {
        return Err(Fault::Mismatch(format!(
            "the server answered {} bytes, expected {want}",
            resp.len()
        )));
    }
    Ok(())
}

pub(super) fn copy_parts(
    ptr: &OutPtr,
    at: usize,
    resp: &KvResponse,
) -> std::result::Result<(), Fault> {
    let mut off = at;
    for p in &resp.parts {
        ptr.write(off, p)?;
        off += p.len();
    }
    Ok(())
}

/// What stores the answers of a pull or push-pull through `ptr`, the
/// output's buffer: a part's values from the answer, or from the part's
/// value slot when it went through shared memory and the answer says so
/// (carries no values: a server whose part's value left the slot, as a
/// round at the gate never ended, answers with the value instead:
/// `server/entry/segment.rs`). The output is kept alive by the op
/// (`Round::keep`) while answers may come.
pub(super) fn answer_into(dk: &DistKey, ptr: OutPtr, segs: Segs, workers: u32) -> OnAnswer {
    let ub = dk.unit * dk.local.meta.dtype.size();
    let parts = dk.parts.clone();
    Arc::new(move |i, resp, landed| {
        let p = parts[i];
        match (&segs[i], landed, resp.is_empty()) {
            // Copied into the output already, as the workers summed it at
            // the part's gate (`worker_sum::ChunkOut`).
            (Some(_), true, _) => check_len(resp, 0),
            (Some(seg), false, true) => {
                // SAFETY: the server wrote the value slot before answering
                // and writes it again only in a round this worker has not
                // pushed to yet (see `kinds/dist/segments.rs`).
                ptr.write(p.start * ub, unsafe { seg.slot(workers as usize) })
            }
            // In place already (the landing was exactly the part's bytes).
            (None, true, true) => {
                let said: usize = resp.lens.iter().map(|&l| l as usize).sum();
                if said != p.len * ub {
                    return Err(Fault::Mismatch(format!(
                        "the server answered {said} bytes, expected {}",
                        p.len * ub
                    )));
                }
                Ok(())
            }
            // The values in the answer: by message, a duplicate over
            // another link of an answer that landed, or a part whose value
            // left its slot.
            _ => {
                check_len(resp, p.len * ub)?;
                copy_parts(&ptr, p.start * ub, resp)
            }
        }
    })
}
