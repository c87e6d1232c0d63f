//! Push buffers (a key's gradient written where its server reads it) and
//! the counts of how the store's pushes travelled.

use super::KvStore;
use crate::error::{KvError, Result};
use crate::key::IntoKey;
use crate::tensor::{Storage, Tensor};

impl KvStore {
    /// A dense host tensor of `key`'s shape and type, zeroed, to push the
    /// key from: fill it with the gradient, then `push` or `pushpull` it.
    /// Where the key's values cross shared memory to its servers (a sync
    /// distributed store, servers on this host, the shm van), its bytes
    /// are this worker's slots of the key's segments, so an uncompressed
    /// push from it copies nothing (MPI's `MPI_Alloc_mem`, NCCL's
    /// `ncclMemAlloc` play this part; [`KvStore::pushed_in_place`] counts
    /// the parts); elsewhere, and for the parts that cannot lie in a slot,
    /// ordinary memory ([`Tensor::in_shared_memory`] tells). One in shared
    /// memory per key on each worker at a time (another call while it
    /// lives is refused; in ordinary memory each call gives a new one);
    /// while it lives, the key's pushes from
    /// other tensors send the parts it holds by message. A push from it
    /// that fails moves it to ordinary memory (its server may still read
    /// the slots: the same bytes, at the same address); so does a server's
    /// restart, in effect (the new segments are not its slots): pushes
    /// from it then copy, as from any tensor.
    ///
    /// ```
    /// use pskv_engine::{Context, Engine};
    /// use pskv_kvstore::{KvStore, Tensor};
    /// let engine = Engine::new()?;
    /// let kv = KvStore::create("local", &engine)?;
    /// kv.init(3, &Tensor::from_vec(&engine, &[2], vec![1.0f32, 2.0], Context::Cpu)?)?;
    /// let grad = kv.push_buffer(3)?; // ordinary memory: a local store
    /// grad.copy_from_slice(&[0.5f32, 0.25])?;
    /// kv.push(3, std::slice::from_ref(&grad), 0)?;
    /// assert!(!grad.in_shared_memory()?);
    /// # Ok::<(), pskv_kvstore::KvError>(())
    /// ```
    pub fn push_buffer(&self, key: impl IntoKey) -> Result<Tensor> {
        let key = key.into_key()?;
        let m = self.flavor.key_meta(&key)?;
        if m.storage != Storage::Dense {
            return Err(KvError::invalid(format!(
                "push_buffer: key {key} is row-sparse; a push buffer holds dense values"
            )));
        }
        if let Some(t) = self.flavor.push_buffer(&key)? {
            return Ok(t);
        }
        Tensor::zeros(&self.engine, &m.shape, m.dtype, pskv_engine::Context::Cpu)
    }

    /// [`KvStore::push_buffer`] for callers that write it through a
    /// pointer (the C ABI): the tensor, which owns the memory, and the
    /// address of its first byte. Keep the tensor, and give it to no call
    /// that writes it (a pull into it): its memory then stays where it is.
    /// Values made over that memory ([`Tensor::from_host_ptr`]) push as
    /// the tensor does, without a copy where it lies in shared memory.
    pub fn push_buffer_at(&self, key: impl IntoKey) -> Result<(Tensor, usize)> {
        let t = self.push_buffer(key)?;
        let addr = t.host_addr()?;
        Ok((t, addr))
    }

    /// How many key parts this store pushed from push buffers in place
    /// (their values already in their slots: nothing copied), so far.
    pub fn pushed_in_place(&self) -> u64 {
        self.flavor.pushed_in_place()
    }

    /// How many key parts of this store's pushes were summed by the
    /// workers in shared memory, so far: their server had opened the
    /// part's gate (no optimizer on the servers, the part small enough:
    /// `PSKV_WORKER_SUM_BYTES`), and this worker arrived there rather than
    /// sending its push.
    pub fn worker_summed_parts(&self) -> u64 {
        self.flavor.worker_summed_parts()
    }

    /// How many chunks of rounds summed in shared memory this worker summed
    /// beside the worker that summed them (parts of more than 32 KiB are
    /// shared in chunks with the workers that wait for them; workers of rank
    /// 32 and above do not help), so far.
    pub fn worker_helped_chunks(&self) -> u64 {
        self.flavor.worker_helped_chunks()
    }

    /// Of `worker_summed_parts`, how many were summed in rounds whose
    /// workers arrive before they copy, each summing its share of the
    /// part from its own tensor (parts of 1 MiB or more, or of 256 KiB or
    /// more after a round whose workers arrived close together), so far.
    pub fn worker_late_parts(&self) -> u64 {
        self.flavor.worker_late_parts()
    }

    /// How many key parts exchange their values with a co-located server
    /// through shared memory (0 for local stores, and over tcp).
    pub fn shared_memory_parts(&self) -> usize {
        self.flavor.shared_memory_parts()
    }
}
