//! Commands from the workers: stop, optimizer, profiler, optimizer states
//! out and in, checkpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pskv_transport::{KvRequest, Responder};

use super::Inner;
use crate::error::Fault;
use crate::optimizer::{OptState, Optimizer};
use crate::updater::{KeyState, Rule};
use crate::wire::command;

impl Inner {
    pub(super) fn command(self: &Arc<Self>, req: KvRequest, r: Responder) {
        let body = &req.body[..];
        let result: std::result::Result<Vec<u8>, Fault> = match req.cmd {
            command::CONTROLLER if body.starts_with(b"{\"optimizer\"") => self.set_optimizer(body),
            command::SET_MULTI_PRECISION => {
                self.multi_precision.store(true, Ordering::Release);
                self.settings_changed();
                Ok(Vec::new())
            }
            // Stopping happens after the reply below.
            command::STOP_SERVER => Ok(Vec::new()),
            command::SYNC_MODE => {
                self.sync_mode.store(true, Ordering::Release);
                self.settings_changed();
                Ok(Vec::new())
            }
            command::SET_GRADIENT_COMPRESSION => {
                *self.compression_params.lock() = Some(String::from_utf8_lossy(body).into_owned());
                self.settings_changed();
                Ok(Vec::new())
            }
            command::CHECKPOINT => self.checkpoint_all().map(|()| Vec::new()),
            command::SET_PROFILER_PARAMS => self.profiler(body),
            command::GET_STATES => self.get_states(),
            command::SET_STATES => self.set_states(body),
            head => match self.controller.read().clone() {
                // The controller is the user's: its reason is its own.
                Some(c) => c(head, body).map_err(Fault::Failed),
                None => Err(Fault::Unavailable(format!(
                    "command {head} is not one pskv knows and the server has no controller"
                ))),
            },
        };
        match result {
            Ok(b) => r.reply_body(Bytes::from(b)),
            Err(e) => r.error(e.to_string()),
        }
        // Subtle: only once the reply is queued on its link may `wait`
        // return: the server's owner then shuts the node down, which flushes
        // queued replies but closes idle links, so a stop acknowledged
        // before its reply was queued could be lost (seen in CI as a
        // worker's "connection lost" on the stop command).
        if req.cmd == command::STOP_SERVER {
            let mut s = self.stopped.lock();
            if s.is_none() {
                *s = Some(None);
            }
            self.stop_cv.notify_all();
        }
    }

    pub(super) fn set_optimizer(&self, body: &[u8]) -> std::result::Result<Vec<u8>, Fault> {
        #[derive(serde::Deserialize)]
        struct Msg {
            optimizer: Optimizer,
        }
        let m: Msg = serde_json::from_slice(body)
            .map_err(|e| Fault::Malformed(format!("bad optimizer: {e}")))?;
        m.optimizer.validate()?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if m.optimizer.multi_precision {
            self.multi_precision.store(true, Ordering::Release);
        }
        *self.rule.write() = Some(Rule::Optimizer {
            opt: Arc::new(m.optimizer),
            generation,
        });
        self.settings_changed();
        // Rounds the workers summed had no optimizer to run: the next ones
        // come here. (The workers waited for their ops before this call, so
        // no such round is under way.)
        self.close_gates(|_| true);
        Ok(Vec::new())
    }

    pub(super) fn profiler(&self, body: &[u8]) -> std::result::Result<Vec<u8>, Fault> {
        let text = String::from_utf8_lossy(body);
        match text.trim() {
            "start" => self.engine.start_profiling(),
            "stop" => self.engine.stop_profiling(),
            t if t.starts_with("dump:") => self
                .engine
                .write_profile(&t["dump:".len()..])
                .map_err(|e| Fault::Failed(e.to_string()))?,
            t => {
                return Err(Fault::Malformed(format!(
                    "unknown profiler command '{t}': expected start, stop or dump:<path>"
                )))
            }
        }
        Ok(Vec::new())
    }

    pub(super) fn generation(&self) -> Option<u64> {
        match &*self.rule.read() {
            Some(Rule::Optimizer { generation, .. }) => Some(*generation),
            _ => None,
        }
    }

    pub(super) fn get_states(&self) -> std::result::Result<Vec<u8>, Fault> {
        let generation = self.generation().ok_or_else(|| {
            Fault::Unavailable("the server has no optimizer, so no states".into())
        })?;
        let entries = self.entries_snapshot();
        let mut out: Vec<(u64, OptState)> = Vec::new();
        for (k, e) in entries.into_iter().filter(|(k, _)| self.serves(*k)) {
            let st = e.st.lock();
            if st.opt.generation == generation {
                if let Some(s) = &st.opt.state {
                    let mut s = s.clone();
                    s.master = st.master.clone().or(s.master);
                    out.push((k, s));
                }
            }
        }
        out.sort_by_key(|(k, _)| *k);
        postcard::to_stdvec(&out).map_err(|e| Fault::Failed(format!("encoding states: {e}")))
    }

    pub(super) fn set_states(&self, body: &[u8]) -> std::result::Result<Vec<u8>, Fault> {
        let generation = self.generation().ok_or_else(|| {
            Fault::Unavailable("set an optimizer before loading its states".into())
        })?;
        let states: Vec<(u64, OptState)> =
            postcard::from_bytes(body).map_err(|e| Fault::Malformed(format!("bad states: {e}")))?;
        // Every server gets the whole list and takes the keys of its range.
        let (begin, end) = (
            self.range_begin.load(Ordering::Acquire),
            self.range_end.load(Ordering::Acquire),
        );
        let states: Vec<(u64, OptState)> = states
            .into_iter()
            .filter(|(k, _)| *k >= begin && *k < end)
            .collect();
        let entries = self.entries.read();
        for (k, _) in &states {
            if !entries.contains_key(k) {
                return Err(Fault::Mismatch(format!(
                    "states for {} which this server does not hold",
                    self.describe(*k)
                )));
            }
        }
        let rule = self.rule.read().clone();
        for (k, mut s) in states {
            if let Some(Rule::Optimizer { opt, .. }) = &rule {
                opt.note_count(s.count);
            }
            let mut st = entries[&k].st.lock();
            if let Some(m) = s.master.take() {
                if m.len() != st.elems {
                    return Err(Fault::Mismatch(format!(
                        "master weights of {} have the wrong size",
                        self.describe(k)
                    )));
                }
                st.master = Some(m);
            }
            st.opt = KeyState {
                generation,
                state: Some(s),
            };
        }
        Ok(Vec::new())
    }
}
