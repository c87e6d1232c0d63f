//! What workers and servers say to each other on top of the transport:
//! the request head (in the transport's `cmd` field), the layout of each
//! request's values, the server commands, and how a key is cut into parts
//! (each its own server key, "ps key").
//!
//! # Head (`cmd`, an `i32`)
//!
//! | bits | meaning |
//! |---|---|
//! | 0..4 | op: 1 init, 2 push, 3 pull, 4 push-pull, 5 row push, 6 row pull, 7 check, 8 replicate (server to its backup) |
//! | 4..8 | element type (mshadow code: 0 f32, 1 f64, 2 f16, 4 i32, 6 i64) |
//! | 8..10 | compression (0 none, 1 2-bit, 2 1-bit) |
//! | 10 | sync mode (the round of all workers) |
//! | 11 | multi-precision (f32 master weights for f16 keys) |
//! | 12 | shared memory: the push is in the sender's slot, the answer's value in the value slot unless the answer carries it (the slot protocol at the top of `kinds/dist/segments.rs`) |
//! | 16..32 | with bit 12: the tag of the segment the worker used |
//!
//! Other bits are zero; a server refuses a head it cannot read. Carrying
//! the mode and compression in every request (MXNet sets them by separate
//! commands) means a server never applies a push under the wrong mode.
//!
//! # Values of one ps key
//!
//! - init, push, push-pull: the part's elements, little-endian; compressed:
//!   see [`crate::compression`].
//! - row push: `n: u32`, `row_len: u32` (elements per row), `n` row ids as
//!   `i64` relative to the part's first row, then those rows' elements.
//! - row pull: `n: u32`, `row_len: u32` and `n` row ids; the answer is
//!   those rows.
//! - shared-memory push (bit 12): the byte count the worker wrote into its
//!   slot, as a `u64` (checked against the key's size, as a message's
//!   length is).
//! - check ([`Check`]): what the worker holds of the part, and whether it
//!   will map the part's shared segment; the answer is empty, or the
//!   transport's descriptor of the segment's region.
//! - replicate: a postcard header (`server/replica.rs`) of `n` bytes after
//!   `n: u32`, then the part's value.
//! - pull and push-pull answers: the part's elements.
//!
//! A sync push carries its round as the request's tag (one more than the
//! key's rounds its worker saw complete, `DistKey::seen`; async pushes
//! carry 0): a push of a round its server holds complete already (a push
//! sent again after its answer was lost, or to the backup after the
//! server died) is answered without being applied again, and a restarted
//! server learns from it how far the workers are
//! (`server/entry/cut_short.rs`).
//!
//! # Parts
//!
//! A key whose elements are fewer than the big-array bound lives on one
//! server, `(id * 9973) % servers` (MXNet's choice); a larger one is split
//! evenly over all servers, starting at that one. Each server's piece is
//! cut into parts of at most the partition size (BytePS's idea: parts
//! travel and are summed independently, so sending, summing and receiving
//! overlap). Part `j` of key id `k` on server `s` has ps key
//! `range(s).begin + (k << 16) + j`. Row-sparse keys are cut the same way
//! in whole rows.

use crate::dtype::DType;
use crate::error::{Fault, KvError, Result};

/// What a request does.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Init = 1,
    Push = 2,
    Pull = 3,
    PushPull = 4,
    RowPush = 5,
    RowPull = 6,
    /// Every worker, after `init`: check what it holds of the part against
    /// the server's record (and get the part's shared segment).
    Check = 7,
    /// A server to its backup: the part's state after a round (or its
    /// init), before the round is answered (`server/replica.rs`).
    Replicate = 8,
}

/// The head of a data request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) op: Op,
    pub(crate) dtype: DType,
    pub(crate) compression: u8,
    pub(crate) sync: bool,
    pub(crate) multi_precision: bool,
    pub(crate) shm: bool,
    /// With `shm`: the tag of the segment the worker used (`Region::tag`).
    pub(crate) shm_tag: u16,
}

impl Head {
    pub(crate) fn encode(&self) -> i32 {
        (self.op as i32)
            | ((self.dtype.code() as i32) << 4)
            | ((self.compression as i32) << 8)
            | ((self.sync as i32) << 10)
            | ((self.multi_precision as i32) << 11)
            | ((self.shm as i32) << 12)
            | ((self.shm_tag as u32) << 16) as i32
    }

    pub(crate) fn decode(cmd: i32) -> std::result::Result<Head, Fault> {
        let bits = cmd as u32;
        if (bits >> 13) & 0x7 != 0 {
            return Err(Fault::Malformed(format!(
                "request head {bits:#x} has unknown bits set"
            )));
        }
        let op = match cmd & 0xf {
            1 => Op::Init,
            2 => Op::Push,
            3 => Op::Pull,
            4 => Op::PushPull,
            5 => Op::RowPush,
            6 => Op::RowPull,
            7 => Op::Check,
            8 => Op::Replicate,
            x => {
                return Err(Fault::Malformed(format!(
                    "request head {cmd:#x}: unknown op {x}"
                )))
            }
        };
        let dtype = DType::from_code(((cmd >> 4) & 0xf) as u8).ok_or_else(|| {
            Fault::Malformed(format!("request head {cmd:#x}: unknown element type"))
        })?;
        let compression = ((cmd >> 8) & 0x3) as u8;
        if compression == 3 {
            return Err(Fault::Malformed(format!(
                "request head {cmd:#x}: unknown compression 3"
            )));
        }
        Ok(Head {
            op,
            dtype,
            compression,
            sync: cmd & (1 << 10) != 0,
            multi_precision: cmd & (1 << 11) != 0,
            shm: cmd & (1 << 12) != 0,
            shm_tag: (bits >> 16) as u16,
        })
    }
}

/// Server command heads. 0..=5 are MXNet's `CommandType` ids.
pub(crate) mod command {
    /// Body: an optimizer as JSON (`{"optimizer": ...}`); any other body
    /// goes to the server's controller, as MXNet's kController does.
    pub const CONTROLLER: i32 = 0;
    /// Keep f32 master weights for f16 keys.
    pub const SET_MULTI_PRECISION: i32 = 1;
    /// Stop the server.
    pub const STOP_SERVER: i32 = 2;
    /// Sync mode (pskv requests carry their mode; accepted for MXNet's
    /// sake).
    pub const SYNC_MODE: i32 = 3;
    /// Gradient compression parameters (pskv's compressed messages carry
    /// their own; accepted and recorded).
    pub const SET_GRADIENT_COMPRESSION: i32 = 4;
    /// Profiler: `start`, `stop` or `dump:<path>` (a Chrome trace of the
    /// server's engine).
    pub const SET_PROFILER_PARAMS: i32 = 5;
    /// pskv: answer the optimizer state of every ps key.
    pub const GET_STATES: i32 = 6;
    /// pskv: set the optimizer state of ps keys.
    pub const SET_STATES: i32 = 7;
    /// pskv: record every key in the server's checkpoint and answer once
    /// it is on disk (no-op without `PSKV_CHECKPOINT_DIR`).
    pub const CHECKPOINT: i32 = 8;
}

/// One part of a key.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    /// The server's rank.
    pub(crate) server: u32,
    /// The part's server key.
    pub(crate) ps_key: u64,
    /// First unit (element, or row for row-sparse keys).
    pub(crate) start: usize,
    /// Units in the part.
    pub(crate) len: usize,
}

/// Bits of a ps key's offset that number the parts of a key.
pub(crate) const PART_BITS: u32 = 16;

/// Cuts a key of `units` units of `unit_bytes` bytes into parts.
pub(crate) fn plan(
    key_id: u64,
    units: usize,
    unit_bytes: usize,
    big: bool,
    partition_bytes: usize,
    ranges: &[(u64, u64)],
) -> Result<Vec<Part>> {
    let servers = ranges.len();
    if servers == 0 {
        return Err(KvError::invalid("the cluster has no servers"));
    }
    if partition_bytes == 0 {
        // `Options::partition_for` resolves the default before any plan.
        return Err(KvError::invalid(format!(
            "internal: no part size was set for key id {key_id}"
        )));
    }
    let first = (key_id.wrapping_mul(9973) % servers as u64) as usize;
    let pieces = if big && servers > 1 { servers } else { 1 };
    // Units per part: at most the partition size, at least one unit.
    let per_part = (partition_bytes / unit_bytes.max(1)).max(1);
    let mut parts = Vec::new();
    for p in 0..pieces {
        let lo = units * p / pieces;
        let hi = units * (p + 1) / pieces;
        let server = (first + p) % servers;
        let n = hi - lo;
        let chunks = n.div_ceil(per_part).max(1);
        for c in 0..chunks {
            let s = lo + n * c / chunks;
            let e = lo + n * (c + 1) / chunks;
            let j = parts.len() as u64;
            if j >= 1 << PART_BITS {
                return Err(KvError::invalid(format!(
                    "key id {key_id} needs more than {} parts; raise PSKV_PARTITION_BYTES",
                    1u64 << PART_BITS
                )));
            }
            let (begin, end) = ranges[server];
            let offset = (key_id << PART_BITS) | j;
            if key_id >= 1 << (64 - PART_BITS) || offset >= end - begin {
                return Err(KvError::invalid(format!(
                    "key id {key_id} does not fit the key range of {servers} servers"
                )));
            }
            parts.push(Part {
                server: server as u32,
                ps_key: begin + offset,
                start: s,
                len: e - s,
            });
        }
    }
    Ok(parts)
}

/// The key id and part number of a ps key on the server of `range`.
pub(crate) fn decode_ps_key(ps_key: u64, range_begin: u64) -> (u64, u64) {
    let off = ps_key.wrapping_sub(range_begin);
    (off >> PART_BITS, off & ((1 << PART_BITS) - 1))
}

/// A worker's check of one part after `init` ([`Op::Check`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Check {
    /// Bytes of the part as the worker holds it.
    pub(crate) part_bytes: u64,
    /// The worker will map the part's shared segment.
    pub(crate) wants_shm: bool,
    /// The part's sync rounds the worker saw complete (`DistKey::seen`):
    /// a restarted server learns from it which rounds are done.
    pub(crate) seen: u64,
    /// The whole key's shape as the worker holds it (for the error).
    pub(crate) shape: Vec<u64>,
}

/// Bytes of a check before its shape: the flag, the part's bytes, the
/// rounds seen, the shape's length.
const CHECK_HEAD: usize = 1 + 8 + 8 + 4;

impl Check {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CHECK_HEAD + 8 * self.shape.len());
        v.push(self.wants_shm as u8);
        v.extend_from_slice(&self.part_bytes.to_le_bytes());
        v.extend_from_slice(&self.seen.to_le_bytes());
        v.extend_from_slice(&(self.shape.len() as u32).to_le_bytes());
        for d in &self.shape {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Check, Fault> {
        let bad = || Fault::Malformed(format!("a check request of {} bytes is malformed", b.len()));
        if b.len() < CHECK_HEAD || b[0] > 1 {
            return Err(bad());
        }
        let part_bytes = u64::from_le_bytes(b[1..9].try_into().map_err(|_| bad())?);
        let seen = u64::from_le_bytes(b[9..17].try_into().map_err(|_| bad())?);
        let n = u32::from_le_bytes(b[17..21].try_into().map_err(|_| bad())?) as usize;
        if n > 32 || b.len() != CHECK_HEAD + 8 * n {
            return Err(bad());
        }
        let shape = b[CHECK_HEAD..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Check {
            part_bytes,
            wants_shm: b[0] == 1,
            seen,
            shape,
        })
    }
}

/// A row request's header: rows and elements per row.
pub(crate) struct RowsHead {
    pub(crate) row_len: usize,
    pub(crate) rows: Vec<i64>,
}

/// Header and the bytes after it, of a row push or row pull.
pub(crate) fn split_rows(vals: &[u8]) -> std::result::Result<(RowsHead, &[u8]), Fault> {
    let bad = Fault::Malformed;
    if vals.len() < 8 {
        return Err(bad(format!(
            "a row request needs an 8-byte header, got {} bytes",
            vals.len()
        )));
    }
    let n = u32::from_le_bytes(vals[0..4].try_into().expect("4 bytes")) as usize;
    let row_len = u32::from_le_bytes(vals[4..8].try_into().expect("4 bytes")) as usize;
    if row_len == 0 {
        return Err(bad("a row request has rows of 0 elements".into()));
    }
    let need = 8 + n
        .checked_mul(8)
        .ok_or_else(|| bad("row count overflows".into()))?;
    if vals.len() < need {
        return Err(bad(format!(
            "a row request of {n} rows needs {need} bytes of header, got {}",
            vals.len()
        )));
    }
    let rows = vals[8..need]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((RowsHead { row_len, rows }, &vals[need..]))
}

/// The header of a row request.
pub(crate) fn rows_header(rows: &[i64], row_len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rows.len() * 8);
    v.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    v.extend_from_slice(&(row_len as u32).to_le_bytes());
    for r in rows {
        v.extend_from_slice(&r.to_le_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use pskv_transport::protocol::key_ranges;

    #[test]
    fn heads_round_trip_and_garbage_is_refused() {
        for op in [
            Op::Init,
            Op::Push,
            Op::Pull,
            Op::PushPull,
            Op::RowPush,
            Op::RowPull,
            Op::Check,
            Op::Replicate,
        ] {
            for dtype in [DType::F32, DType::F64, DType::F16, DType::I32, DType::I64] {
                for compression in 0..3 {
                    let h = Head {
                        op,
                        dtype,
                        compression,
                        sync: compression == 1,
                        multi_precision: dtype == DType::F16,
                        shm: compression == 2,
                        shm_tag: if compression == 2 { 0xfffe } else { 0 },
                    };
                    assert_eq!(Head::decode(h.encode()), Ok(h));
                }
            }
        }
        assert!(Head::decode(0).is_err());
        assert!(Head::decode(9).is_err());
        assert!(Head::decode(2 | (3 << 4)).is_err());
        assert!(Head::decode(2 | (3 << 8)).is_err());
        assert!(Head::decode(2 | (1 << 13)).is_err());
        assert!(Head::decode(-1).is_err());
    }

    #[test]
    fn small_keys_go_whole_to_one_server_and_big_ones_everywhere() {
        let r = key_ranges(3);
        let small = plan(5, 1000, 4, false, 4 << 20, &r).unwrap();
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].server, (5 * 9973 % 3) as u32);
        assert_eq!((small[0].start, small[0].len), (0, 1000));
        let big = plan(5, 3_000_000, 4, true, 4 << 20, &r).unwrap();
        let servers: Vec<u32> = big.iter().map(|p| p.server).collect();
        assert_eq!(servers.len(), 3);
        assert!(servers.contains(&0) && servers.contains(&1) && servers.contains(&2));
        // Parts tile the key.
        let mut at = 0;
        for p in &big {
            assert_eq!(p.start, at);
            at += p.len;
            let (b, e) = r[p.server as usize];
            assert!(p.ps_key >= b && p.ps_key < e);
            assert_eq!(decode_ps_key(p.ps_key, b).0, 5);
        }
        assert_eq!(at, 3_000_000);
        // 32 MiB of f32 on one server: 8 parts of 4 MiB.
        let parts = plan(9, 8 << 20, 4, false, 4 << 20, &r).unwrap();
        assert_eq!(parts.len(), 8);
        assert!(parts.iter().all(|p| p.len == 1 << 20));
        let keys: std::collections::HashSet<u64> = parts.iter().map(|p| p.ps_key).collect();
        assert_eq!(keys.len(), 8);
        assert!(plan(1, 1 << 20, 4, false, 8, &r).is_err());
        assert!(plan(1, 10, 4, false, 4 << 20, &[]).is_err());
        // An unresolved part size (0: "by van") is an error, not a part
        // per element.
        assert!(plan(1, 10, 4, false, 0, &r).is_err());
    }

    #[test]
    fn checks_round_trip_and_garbage_is_refused() {
        let c = Check {
            part_bytes: 400,
            wants_shm: true,
            seen: 7,
            shape: vec![10, 10],
        };
        assert_eq!(Check::decode(&c.encode()), Ok(c.clone()));
        let e = c.encode();
        assert!(Check::decode(&e[..e.len() - 1]).is_err());
        assert!(Check::decode(&[2; CHECK_HEAD]).is_err());
        assert!(Check::decode(&[]).is_err());
        let mut huge = vec![0u8; CHECK_HEAD];
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Check::decode(&huge).is_err());
    }

    #[test]
    fn row_requests_are_bounded() {
        let mut v = rows_header(&[3, 7], 5);
        v.extend_from_slice(&[1, 2, 3]);
        let (h, rest) = split_rows(&v).unwrap();
        assert_eq!((h.rows, h.row_len), (vec![3, 7], 5));
        assert_eq!(rest, &[1, 2, 3]);
        assert!(split_rows(&v[..7]).is_err());
        assert!(split_rows(&v[..14]).is_err());
        assert!(split_rows(&[255, 255, 255, 255, 1, 0, 0, 0]).is_err());
        assert!(split_rows(&rows_header(&[1], 0)).is_err());
    }
}
