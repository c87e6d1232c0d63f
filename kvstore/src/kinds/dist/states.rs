//! A key's optimizer state across its parts: joined from the parts'
//! states (`optimizer_states`), cut into them (`set_optimizer_states`),
//! and the calls that get and set them on the servers.

use std::collections::HashMap;

use bytes::Bytes;

use super::DistStore;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::optimizer::{OptState, StateVals};
use crate::wire::command;

impl DistStore {
    /// The servers' optimizer states, joined per key (`optimizer_states`).
    pub(super) fn get_states(&self) -> Result<Vec<(Key, OptState)>> {
        if self.worker_rule.read().is_some() {
            return Err(KvError::Unsupported {
                what: "saving the states of a worker-side updater".into(),
                why: "a custom updater keeps its own state".into(),
            });
        }
        self.engine.wait_for_all()?;
        let resp = self.command(command::GET_STATES, Bytes::new())?;
        let mut by_ps: HashMap<u64, OptState> = HashMap::new();
        for (node, body) in resp.bodies {
            let v: Vec<(u64, OptState)> = postcard::from_bytes(&body).map_err(|e| {
                KvError::invalid(format!("node {node} sent unreadable optimizer states: {e}"))
            })?;
            by_ps.extend(v);
        }
        let mut out = Vec::new();
        for (key, dk) in self.keys.all() {
            let parts: Option<Vec<OptState>> =
                dk.parts.iter().map(|p| by_ps.remove(&p.ps_key)).collect();
            if let Some(s) = parts.and_then(join_states) {
                out.push((key, s));
            }
        }
        Ok(out)
    }

    /// Cuts `states` into the keys' parts and sends them to the servers
    /// (`set_optimizer_states`).
    pub(super) fn set_states(&self, states: Vec<(Key, OptState)>) -> Result<()> {
        let mut list: Vec<(u64, OptState)> = Vec::new();
        for (key, s) in &states {
            let dk = self.dist_key(key)?;
            let n = dk.local.meta.len();
            let lens_ok = s.bufs.iter().all(|b| match b {
                StateVals::F32(v) => v.len() == n,
                StateVals::F64(v) => v.len() == n,
            }) && s.master.as_ref().is_none_or(|m| m.len() == n);
            if !lens_ok {
                return Err(KvError::mismatch(
                    key,
                    format!("the saved optimizer state does not have the key's {n} elements"),
                ));
            }
            for p in dk.parts.iter() {
                let r = p.start * dk.unit..(p.start + p.len) * dk.unit;
                list.push((p.ps_key, slice_state(s, r)));
            }
        }
        self.engine.wait_for_all()?;
        let body = postcard::to_stdvec(&list)
            .map_err(|e| KvError::invalid(format!("encoding optimizer states: {e}")))?;
        self.command(command::SET_STATES, Bytes::from(body))
            .map(|_| ())
    }
}

/// Concatenates the states of a key's parts (in part order).
pub(super) fn join_states(parts: Vec<OptState>) -> Option<OptState> {
    let first = parts.first()?.clone();
    let mut out = OptState {
        count: first.count,
        bufs: first
            .bufs
            .iter()
            .map(|b| match b {
                StateVals::F32(_) => StateVals::F32(Vec::new()),
                StateVals::F64(_) => StateVals::F64(Vec::new()),
            })
            .collect(),
        master: first.master.as_ref().map(|_| Vec::new()),
    };
    for p in parts {
        if p.bufs.len() != out.bufs.len() {
            return None;
        }
        for (o, b) in out.bufs.iter_mut().zip(p.bufs) {
            match (o, b) {
                (StateVals::F32(o), StateVals::F32(b)) => o.extend(b),
                (StateVals::F64(o), StateVals::F64(b)) => o.extend(b),
                _ => return None,
            }
        }
        match (&mut out.master, p.master) {
            (Some(o), Some(m)) => o.extend(m),
            (None, None) => {}
            _ => return None,
        }
    }
    Some(out)
}

/// The state of elements `range` of a key's state.
pub(super) fn slice_state(s: &OptState, range: std::ops::Range<usize>) -> OptState {
    OptState {
        count: s.count,
        bufs: s
            .bufs
            .iter()
            .map(|b| match b {
                StateVals::F32(v) => StateVals::F32(v[range.clone()].to_vec()),
                StateVals::F64(v) => StateVals::F64(v[range.clone()].to_vec()),
            })
            .collect(),
        master: s.master.as_ref().map(|m| m[range.clone()].to_vec()),
    }
}
