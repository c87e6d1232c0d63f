//! A key's optimizer state across its parts: joined from the parts'
//! states (`optimizer_states`), cut into them (`set_optimizer_states`).

use crate::optimizer::{OptState, StateVals};

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
