//! Host staging of device tensors for the wire (MXNet's `comm_buf_`).
//!
//! The transport sends and receives host bytes. A key whose gradients or
//! outputs live on a GPU goes through a host tensor in memory pinned for
//! that GPU, kept per key and per direction: a push copies the (reduced)
//! gradient device to host into the *send* buffer, then the push op reads
//! it; a pull lands in the *receive* buffer, then copies host to device.
//! The copies are ops on the GPU's copy lane, ordered with the wire ops by
//! the buffers' vars, so the engine overlaps them with other keys' work.
//!
//! Send and receive are separate buffers: a push-pull reads one and writes
//! the other in one op. A buffer is reused by the key's next operation
//! once the engine has finished the ops that read it (their var says so).

use parking_lot::Mutex;
use pskv_engine::Context;

use crate::error::Result;
use crate::tensor::{gpu_of, Storage, Tensor};

/// Which way a staged tensor travels.
#[derive(Clone, Copy)]
pub(super) enum Way {
    /// To the servers (push values, init values).
    Send,
    /// From the servers (pulled values, pulled rows).
    Recv,
}

/// One key's staging buffers, made on first use: by direction and storage.
#[derive(Default)]
pub(super) struct Staging {
    slots: Mutex<[Option<Tensor>; 4]>,
}

impl Staging {
    /// The host tensor that carries `t` over the wire: `t` itself when it
    /// is on the host, else this key's pinned buffer of `t`'s shape and
    /// storage for that way.
    pub(super) fn host_for(&self, t: &Tensor, way: Way) -> Result<Tensor> {
        let Some(gpu) = gpu_of(t.ctx()) else {
            return Ok(t.clone());
        };
        let i =
            2 * matches!(way, Way::Recv) as usize + (t.storage() == Storage::RowSparse) as usize;
        let mut slots = self.slots.lock();
        if let Some(s) = slots[i]
            .as_ref()
            .filter(|s| s.ctx() == Context::CpuPinned(gpu))
        {
            return Ok(s.clone());
        }
        let s = t.zeros_like(Context::CpuPinned(gpu))?;
        slots[i] = Some(s.clone());
        Ok(s)
    }

    /// `t` on the host for sending: `t` itself, or the send buffer after an
    /// op (of this priority) that copies `t` there.
    pub(super) fn send(&self, t: &Tensor, priority: i32) -> Result<Tensor> {
        let h = self.host_for(t, Way::Send)?;
        crate::comm::copy_prio(t, &h, priority)?;
        Ok(h)
    }
}

/// `t` on the host, for a one-off read (row ids, an init value): `t`
/// itself, or a new host tensor after an op that copies `t` there.
pub(super) fn host_once(t: &Tensor, priority: i32) -> Result<Tensor> {
    if gpu_of(t.ctx()).is_none() {
        return Ok(t.clone());
    }
    let h = t.zeros_like(Context::Cpu)?;
    crate::comm::copy_prio(t, &h, priority)?;
    Ok(h)
}
