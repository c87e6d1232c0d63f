//! Calls every worker makes together (`init`, `set_optimizer`, `barrier`,
//! `close`) end together: a worker whose part failed makes the workers'
//! barrier fail on every worker with its cause (instead of leaving them
//! waiting for the timeout), and what every worker must share (the keys'
//! shapes and types, the optimizer) is compared at the barrier, so that a
//! difference is an error everywhere rather than one worker's setting
//! silently winning.
//!
//! The first barrier of every collective call names the call: workers that
//! make different calls at once (one `set_optimizer`, as MXNet's rank 0
//! alone sends it, the others `barrier`) fail on all of them, naming both
//! calls, instead of pairing one call's barrier with the other's.

use pskv_transport::protocol::vote_failure;
use pskv_transport::{Group, TransportError};

use super::DistStore;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::registry::Meta;
use crate::wire::Part;

/// A stable 64-bit digest of a setting's bytes.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    crate::hash::fnv1a64(bytes)
}

/// At most this much of a setting's description goes into an error.
const SUMMARY_CHARS: usize = 600;

fn shorten(mut s: String) -> String {
    if s.len() > SUMMARY_CHARS {
        let mut cut = SUMMARY_CHARS;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" ...");
    }
    s
}

/// The digest and description of the keys of an `init` call: each key's
/// type and shape, and the parts this worker cuts it into (workers that
/// cut a key apart would push parts of other lengths, or to other
/// servers): the digest covers every part's server and length, the
/// description their count, followed by the settings that cut them
/// (`partition_bytes`, `bigarray_bound`; not in the digest: settings that
/// cut every key alike agree).
pub(super) fn keys_setting(
    items: &[(Key, Meta, &[Part])],
    partition_bytes: usize,
    bigarray_bound: usize,
) -> (u64, String) {
    use std::fmt::Write;
    let mut cuts = String::new();
    let all: Vec<String> = items
        .iter()
        .map(|(k, m, parts)| {
            for p in parts.iter() {
                let _ = write!(cuts, "{}:{} ", p.server, p.len);
            }
            cuts.push(';');
            format!(
                "key {k} {} {:?}{} in {} part{}",
                m.dtype,
                m.shape,
                if m.storage == crate::tensor::Storage::RowSparse {
                    " row-sparse"
                } else {
                    ""
                },
                parts.len(),
                if parts.len() == 1 { "" } else { "s" }
            )
        })
        .collect();
    let keys = all.join(", ");
    let hash = digest(format!("{keys}|{cuts}").as_bytes());
    let text = format!(
        "{} (parts of at most {partition_bytes} bytes: PSKV_PARTITION_BYTES, by default {} \
         with PSKV_VAN=tcp, else {}; arrays of {bigarray_bound} elements or more split over \
         the servers: PSKV_KVSTORE_BIGARRAY_BOUND)",
        shorten(keys),
        crate::options::TCP_PARTITION_BYTES,
        crate::options::DEFAULT_PARTITION_BYTES,
    );
    (hash, text)
}

/// The digest and description of an optimizer (its JSON).
pub(super) fn json_setting(name: &str, json: &[u8]) -> (u64, String) {
    (
        digest(json),
        shorten(format!("{name} {}", String::from_utf8_lossy(json))),
    )
}

impl DistStore {
    /// This worker's end of a collective call: if its part failed
    /// (`local`), the workers' barrier fails on every worker with the cause
    /// and the error is returned; else it waits at the barrier, bringing
    /// `agree` (a setting's digest and description) if given.
    pub(super) fn collective(
        &self,
        call: &'static str,
        local: Result<()>,
        agree: Option<(u64, String)>,
    ) -> Result<()> {
        if let Err(e) = local {
            // The others get this worker's failure as the barrier's; this
            // worker reports it in the same words.
            let reason = e.to_string();
            if let Err(b) = self.po.barrier_fail(Group::WORKERS, &reason) {
                tracing::warn!("telling the other workers that {call} failed here ({reason}): {b}");
            }
            return Err(KvError::Collective {
                call,
                message: vote_failure(Group::WORKERS, self.po.my_id(), &reason),
            });
        }
        let r = match agree {
            Some((d, s)) => {
                // The call is part of what must agree.
                let d = digest(format!("{call}\0{d:016x}").as_bytes());
                let s = if s.is_empty() {
                    call.to_string()
                } else {
                    format!("{call} of {s}")
                };
                self.po
                    .barrier_agree(Group::WORKERS, d, &s, self.opts.timeout)
            }
            None => self.po.barrier(Group::WORKERS, self.opts.timeout),
        };
        match r {
            Err(TransportError::Barrier(message)) => Err(KvError::Collective { call, message }),
            // The others never came: most likely they do not make this call
            // (MXNet code that calls it on one rank only). They are told
            // (`Postoffice::missed_barriers`), and their next collective call
            // fails with the cause.
            Err(TransportError::Timeout { after, .. }) => Err(KvError::Timeout {
                what: format!(
                    "the other workers to make the collective call {call} (every worker must make it, in the same order; those that did not are told, and their next collective call fails)"
                ),
                after,
            }),
            r => Ok(r?),
        }
    }
}
