//! The answer of a request: sent once every key is done, with the values
//! of a pull in key order, or the first error. A request of one key (every
//! request of the kvstore's parts) is answered by its key's [`Answer`]
//! itself ([`one`]); one of several keys gathers them in a [`Reply`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_transport::Responder;

use super::entry::Answer;
use crate::error::Fault;

/// The answer of a request of the one key `keys[0]` (`lens`: the
/// request's list of its length, reused for the answer's): the key's
/// result is the request's (no [`Reply`], its locks and lists: one key's
/// round is the small round's whole server side).
pub(super) fn one(responder: Responder, keys: Vec<u64>, mut lens: Vec<u32>, pull: bool) -> Answer {
    debug_assert_eq!(keys.len(), 1);
    Box::new(move |r| {
        let (error, v) = match r {
            Ok(v) => (None, v),
            Err(e) => (Some(e), None),
        };
        send(responder, error, pull, keys, || {
            let v = v.unwrap_or_default();
            lens.clear();
            lens.push(v.len() as u32);
            (lens, v)
        })
    })
}

/// Sends a request's answer: its first error, or that a push is done, or
/// a pull's values (`values` gives their lengths and bytes).
fn send(
    resp: Responder,
    error: Option<Fault>,
    pull: bool,
    keys: Vec<u64>,
    values: impl FnOnce() -> (Vec<u32>, Bytes),
) {
    if let Some(e) = error {
        // The wire carries the message; the worker names the op and key.
        return resp.error(e.to_string());
    }
    if !pull {
        return resp.ok();
    }
    let (lens, body) = values();
    resp.respond(keys, lens, body);
}

/// Answers a request of several keys once every key of it is done.
pub(super) struct Reply {
    responder: Mutex<Option<Responder>>,
    keys: Vec<u64>,
    remaining: AtomicUsize,
    values: Mutex<Vec<Option<Bytes>>>,
    error: Mutex<Option<Fault>>,
    pull: bool,
}

impl Reply {
    pub(super) fn new(responder: Responder, keys: Vec<u64>, pull: bool) -> Arc<Reply> {
        let n = keys.len();
        Arc::new(Reply {
            responder: Mutex::new(Some(responder)),
            keys,
            remaining: AtomicUsize::new(n),
            values: Mutex::new(vec![None; n]),
            error: Mutex::new(None),
            pull,
        })
    }

    /// The request's keys.
    pub(super) fn keys(&self) -> &[u64] {
        &self.keys
    }

    pub(super) fn answer(self: &Arc<Reply>, i: usize) -> Answer {
        let me = self.clone();
        Box::new(move |r| me.done(i, r))
    }

    pub(super) fn done(&self, i: usize, r: std::result::Result<Option<Bytes>, Fault>) {
        match r {
            Ok(v) => self.values.lock()[i] = v,
            Err(e) => {
                self.error.lock().get_or_insert(e);
            }
        }
        // AcqRel: the last one sees every value and error stored before.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(resp) = self.responder.lock().take() else {
            return;
        };
        let error = self.error.lock().take();
        send(resp, error, self.pull, self.keys.clone(), || {
            let vals = std::mem::take(&mut *self.values.lock());
            let lens: Vec<u32> = vals
                .iter()
                .map(|v| v.as_ref().map_or(0, |b| b.len() as u32))
                .collect();
            let body = if vals.len() == 1 {
                vals.into_iter().next().flatten().unwrap_or_default()
            } else {
                let mut all = Vec::with_capacity(lens.iter().map(|&l| l as usize).sum());
                for v in vals.iter().flatten() {
                    all.extend_from_slice(v);
                }
                Bytes::from(all)
            };
            (lens, body)
        });
    }
}
