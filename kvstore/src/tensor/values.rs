//! What callers outside ops do with a tensor's values, each through an
//! engine op on its var (T1): wait for them, read them out (`to_vec`,
//! `to_row_sparse`), write them in (`copy_from_slice`, `set_row_sparse`,
//! `map_mut`), and copy between tensors and contexts (`copy_to`,
//! `host_copy`, small ones inline; `KeptCopy`, a small host copy made once
//! for a planned call and run at once on idle tensors).

use pskv_engine::{Context, OpError, OpSpec, Property, RunContext};

use super::{check_rows, copy_data, device, Buf, Data, Storage, Tensor};
use crate::dtype::Elem;
use crate::error::{KvError, Result};

impl Tensor {
    /// Blocks until every op pushed on this tensor so far has finished; an
    /// op that failed on it returns its error here.
    pub fn wait_to_read(&self) -> Result<()> {
        Ok(self.engine().wait_for_var(self.var())?)
    }

    /// Runs `f` on the data in a read op after every write pushed so far,
    /// and returns its result.
    fn read_with<R: Send + 'static>(
        &self,
        name: &'static str,
        f: impl FnOnce(&Tensor, &Data) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let t = self.clone();
        let spec = Tensor::copy_spec(name, self.ctx(), Context::Cpu).read(self.var());
        self.engine().push_sync(spec, move |rc| {
            let r = t.read(&rc).map(|d| f(&t, &d));
            // Subtle: the op's hold on the tensor ends before the caller
            // has the result, so a caller that drops its last handle then
            // has dropped the tensor (a key's next push buffer is refused
            // while the last one lives).
            drop(t);
            let _ = tx.send(r);
            Ok(())
        })?;
        // Reports a failure stored on the tensor by an earlier write.
        self.wait_to_read()?;
        // The wait above is a read too, so the read op may still be running.
        let limit = self
            .engine()
            .config()
            .wait_timeout
            .unwrap_or(std::time::Duration::from_secs(u32::MAX as u64));
        rx.recv_timeout(limit).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => KvError::Timeout {
                what: format!("{name} of tensor {}", self.var().describe()),
                after: limit,
            },
            std::sync::mpsc::RecvTimeoutError::Disconnected => KvError::invalid(format!(
                "{name}: the read was skipped because an earlier op on the tensor failed"
            )),
        })?
    }

    /// Copies the elements out (row-sparse: the dense equivalent), after
    /// every write pushed on the tensor so far.
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>()?;
        if device::gpu_of(self.ctx()).is_some() {
            return self.copy_to_ctx(Context::Cpu)?.to_vec();
        }
        self.read_with("tensor_to_vec", |t, d| match t.storage() {
            Storage::Dense => d.typed::<T>().to_vec(),
            Storage::RowSparse => densify(d.typed::<T>(), &d.rows, t.len(), t.row_len()),
        })
    }

    /// The address of a host tensor's first byte now (after its ops so
    /// far); it moves when a write replaces the buffer (T2).
    pub(crate) fn host_addr(&self) -> Result<usize> {
        if device::gpu_of(self.ctx()).is_some() {
            return Err(KvError::invalid("host_addr: the tensor is on a GPU"));
        }
        self.read_with("tensor_host_addr", |_, d| d.bytes().as_ptr() as usize)
    }

    /// Whether some of the tensor's bytes are slots of shared segments (a
    /// key's push buffer, [`KvStore::push_buffer`](crate::KvStore::push_buffer)):
    /// waits for the tensor's ops so far, as [`Tensor::to_vec`] does. A
    /// push from it that fails moves it to ordinary memory (its server may
    /// still read the slots). Whether pushes from it copy nothing depends
    /// on the key too: its segments now (a restarted server makes new
    /// ones) and no compression ([`KvStore::pushed_in_place`](crate::KvStore::pushed_in_place)
    /// counts the parts that did).
    pub fn in_shared_memory(&self) -> Result<bool> {
        self.read_with("tensor_in_shared_memory", |_, d| {
            d.buf.slot_span().is_some_and(|s| s.placed_count() > 0)
        })
    }

    /// The stored rows and their values of a row-sparse tensor.
    pub fn to_row_sparse<T: Elem>(&self) -> Result<(Vec<i64>, Vec<T>)> {
        self.check_dtype::<T>()?;
        if self.storage() != Storage::RowSparse {
            return Err(KvError::invalid("to_row_sparse: the tensor is dense"));
        }
        if device::gpu_of(self.ctx()).is_some() {
            return self.copy_to_ctx(Context::Cpu)?.to_row_sparse();
        }
        self.read_with("tensor_to_row_sparse", |_, d| {
            (d.rows.clone(), d.typed::<T>().to_vec())
        })
    }

    /// Overwrites a dense tensor's elements with `values` (an engine op; the
    /// values are copied now).
    pub fn copy_from_slice<T: Elem>(&self, values: &[T]) -> Result<()> {
        self.check_dtype::<T>()?;
        if self.storage() != Storage::Dense {
            return Err(KvError::invalid(
                "copy_from_slice writes dense tensors; use set_row_sparse",
            ));
        }
        if values.len() != self.len() {
            return Err(KvError::invalid(format!(
                "the tensor holds {} elements, {} values were given",
                self.len(),
                values.len()
            )));
        }
        if device::gpu_of(self.ctx()).is_some() {
            let h = Tensor::from_slice(self.engine(), self.shape(), values, Context::Cpu)?;
            return device::transfer(&h, self, 0);
        }
        let src: Vec<u8> = bytemuck::cast_slice(values).to_vec();
        let t = self.clone();
        let spec = Tensor::copy_spec("tensor_write", Context::Cpu, self.ctx()).write(self.var());
        self.engine().push_sync(spec, move |rc| {
            t.write(&rc)?.overwrite().copy_from_slice(&src);
            Ok(())
        })?;
        Ok(())
    }

    /// Replaces a row-sparse tensor's rows and values (an engine op).
    pub fn set_row_sparse<T: Elem>(&self, rows: Vec<i64>, values: &[T]) -> Result<()> {
        self.check_dtype::<T>()?;
        if self.storage() != Storage::RowSparse {
            return Err(KvError::invalid("set_row_sparse: the tensor is dense"));
        }
        check_rows(&rows, self.shape()[0], "set_row_sparse")?;
        if values.len() != rows.len() * self.row_len() {
            return Err(KvError::invalid(format!(
                "{} rows of {} elements need {} values, got {}",
                rows.len(),
                self.row_len(),
                rows.len() * self.row_len(),
                values.len()
            )));
        }
        if device::gpu_of(self.ctx()).is_some() {
            let h = Tensor::row_sparse(self.engine(), self.shape(), rows, values, Context::Cpu)?;
            return device::transfer(&h, self, 0);
        }
        let buf = Buf::from_bytes(bytemuck::cast_slice(values));
        let t = self.clone();
        let spec = Tensor::copy_spec("tensor_set_rows", Context::Cpu, self.ctx()).write(self.var());
        self.engine().push_sync(spec, move |rc| {
            t.write(&rc)?.set(rows, buf);
            Ok(())
        })?;
        Ok(())
    }

    /// Runs `f` on the elements of a dense tensor, as an engine op that
    /// writes it (returns at once).
    pub fn map_mut<T: Elem>(&self, f: impl FnOnce(&mut [T]) + Send + 'static) -> Result<()> {
        self.check_dtype::<T>()?;
        if self.storage() != Storage::Dense {
            return Err(KvError::invalid("map_mut works on dense tensors"));
        }
        if device::gpu_of(self.ctx()).is_some() {
            // The closure runs on the host: the data goes there and back.
            let h = self.copy_to_ctx(Context::Cpu)?;
            h.map_mut(f)?;
            return device::transfer(&h, self, 0);
        }
        let t = self.clone();
        let spec = OpSpec::new("tensor_map_mut")
            .context(self.ctx())
            .write(self.var());
        self.engine().push_sync(spec, move |rc| {
            f(t.write(&rc)?.typed_mut::<T>());
            Ok(())
        })?;
        Ok(())
    }

    /// Copies this tensor into `dst` (an engine op that reads this one and
    /// writes `dst`; on a GPU's copy pool when one is involved). Same dtype
    /// and shape; dense and row-sparse convert either way (dense to
    /// row-sparse keeps the rows that are not all zero).
    pub fn copy_to(&self, dst: &Tensor) -> Result<()> {
        dst.check_engine(self.engine())?;
        if self.same(dst) {
            return Ok(());
        }
        if self.dtype() != dst.dtype() || self.shape() != dst.shape() {
            return Err(KvError::invalid(format!(
                "copy_to: source is {} {:?}, destination {} {:?}",
                self.dtype(),
                self.shape(),
                dst.dtype(),
                dst.shape()
            )));
        }
        device::copy_any(self, dst, 0)
    }

    /// A copy of this tensor on another context (an engine op).
    pub fn copy_to_ctx(&self, ctx: Context) -> Result<Tensor> {
        let t = self.zeros_like(ctx)?;
        self.copy_to(&t)?;
        Ok(t)
    }
}

/// Host copies of at most this many bytes run inline (`host_copy`).
const INLINE_COPY_BYTES: usize = 64 << 10;

/// Copies host tensor `src` into host tensor `dst` (an engine op).
pub(crate) fn host_copy(src: &Tensor, dst: &Tensor, priority: i32) -> Result<()> {
    let spec = host_copy_spec(src, dst, priority);
    let (s, d) = (src.clone(), dst.clone());
    src.engine()
        .push_sync(spec, move |rc| copy_body(&s, &d, &rc))?;
    Ok(())
}

/// The spec of `host_copy`'s op.
fn host_copy_spec(src: &Tensor, dst: &Tensor, priority: i32) -> OpSpec {
    let spec = Tensor::copy_spec("tensor_copy", src.ctx(), dst.ctx())
        .priority(priority)
        .read(src.var())
        .write(dst.var());
    // A small copy runs on the thread that makes it ready (the caller's,
    // when its tensors are idle): handing it to a pool worker, and the
    // worker's finish back to a waiting caller, costs microseconds of
    // wake-ups for a copy of nanoseconds.
    if inline_copy(src, dst) {
        spec.property(Property::Async)
    } else {
        spec
    }
}

/// Whether a host copy of `src` into `dst` runs inline (`host_copy_spec`).
fn inline_copy(src: &Tensor, dst: &Tensor) -> bool {
    src.len().max(dst.len()) * src.dtype().size() <= INLINE_COPY_BYTES
}

/// What `host_copy`'s op does.
fn copy_body(s: &Tensor, d: &Tensor, rc: &RunContext<'_>) -> std::result::Result<(), OpError> {
    let (sd, mut dd) = (s.read(rc)?, d.write(rc)?);
    copy_data(
        &sd,
        s.storage(),
        &mut dd,
        d.storage(),
        s.dtype(),
        s.row_len(),
    );
    Ok(())
}

/// A small host copy made once and run again and again (a planned call's
/// steps, `plan.rs`): its spec is kept, and when its vars are free it runs
/// at once with nothing made, cloned or boxed
/// ([`pskv_engine::Engine::try_run_now`]); else it is pushed as
/// `host_copy` pushes it.
pub(crate) struct KeptCopy {
    spec: OpSpec,
    src: Tensor,
    dst: Tensor,
    priority: i32,
}

impl KeptCopy {
    /// The copy of `src` into `dst`; None unless both are on the host,
    /// distinct, and small enough to run inline.
    pub(crate) fn new(src: &Tensor, dst: &Tensor, priority: i32) -> Option<KeptCopy> {
        let host = |t: &Tensor| super::gpu_of(t.ctx()).is_none();
        (host(src) && host(dst) && !src.same(dst) && inline_copy(src, dst)).then(|| KeptCopy {
            spec: host_copy_spec(src, dst, priority),
            src: src.clone(),
            dst: dst.clone(),
            priority,
        })
    }

    /// Copies (or pushes the op that copies).
    pub(crate) fn run(&self) -> Result<()> {
        let (s, d) = (&self.src, &self.dst);
        match s
            .engine()
            .try_run_now(&self.spec, |rc| copy_body(s, d, &rc))
        {
            Ok(()) => Ok(()),
            Err(_) => host_copy(s, d, self.priority),
        }
    }
}

fn densify<T: Elem>(vals: &[T], rows: &[i64], len: usize, row_len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        out[r * row_len..(r + 1) * row_len].copy_from_slice(&vals[i * row_len..(i + 1) * row_len]);
    }
    out
}
