//! [`Tensor`]: shape, dtype, storage (dense or row-sparse), context, a shared
//! buffer and an engine var. What MXNet calls an NDArray, reduced to what a
//! kvstore needs.
//!
//! # The engine discipline (invariants)
//!
//! A tensor's data lives in a cell that only engine ops touch:
//!
//! - **T1.** The cell is read only inside an op that names the tensor's var
//!   (as a read or a write), and changed only inside an op that writes it.
//!   The engine runs a write alone and reads together, so no access races.
//!   Every public method that touches data is such an op (`to_vec` pushes a
//!   read op and waits for it), and the crate's own ops reach data only
//!   through the guards of `access.rs`, which the op's run context grants
//!   for exactly the vars it names: the `unsafe` of data access is there.
//! - **T2.** The bytes are an `Arc<Buf>`. A writer changes them in place only
//!   when the `Arc` is not shared; a shared buffer (a message in flight still
//!   holds a clone) is replaced by a copy first, or by a fresh buffer when
//!   the write overwrites everything. So the `Bytes` handed to the transport
//!   (zero-copy clones of the `Arc`) never change under it, however long the
//!   transport keeps them. A key's push buffer (its bytes are this worker's
//!   slots of the key's shared segments: `KvStore::push_buffer`) is also
//!   replaced once detached from them (a push from it failed), so a server
//!   that may still read a slot never sees it change.
//! - **T3.** A row-sparse tensor stores `rows.len()` rows, ascending and
//!   unique, each `row_len()` elements, in `buf`; a dense one stores all
//!   `len()` elements and no rows.
//!
//! GPU contexts: the data of a tensor on `Context::Gpu(n)` is device memory
//! of GPU n (`pskv_gpu::device`: CUDA, or the emulated device where there
//! is no GPU), reached only through engine ops that queue device work and
//! complete when it is done (`device.rs`); a tensor on
//! `Context::CpuPinned(n)` is host memory pinned for GPU n's copies.
//!
//! Rooms: this file is the tensor, its constructors and its checks;
//! `access.rs` the guards of data access (T1); `buf.rs` the bytes (T2);
//! `device.rs` ops on GPU tensors; `values.rs` what callers outside ops do
//! with the values (wait, read out, write in, copy).

mod access;
mod buf;
mod device;
mod values;

use std::fmt;
use std::sync::Arc;

use pskv_engine::{Context, Engine, OpSpec, Property, RunContext, Var};

use access::Cell;
pub(crate) use access::{DataMut, DataRef};

pub use buf::Home;
pub(crate) use buf::{copy_data, share, Buf, Data};
pub(crate) use device::{copy_any, device_op, gpu_of};
pub(crate) use values::{host_copy, KeptCopy};

use crate::dtype::{DType, Elem};
use crate::error::{KvError, Result};

/// How a tensor stores its elements.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Storage {
    /// Every element.
    Dense,
    /// Some rows of the first dimension, with their row indices; the other
    /// rows are zero.
    RowSparse,
}

struct Inner {
    engine: Engine,
    shape: Box<[usize]>,
    dtype: DType,
    ctx: Context,
    storage: Storage,
    var: Var,
    cell: Cell,
    /// The caller's memory the tensor was made over (`from_host_ptr`).
    home: Option<Arc<Home>>,
    /// A kept ticket let go of that memory: the tensor holds none now
    /// (`Ticket::spent`; set inside the settle op, which writes the var).
    spent: std::sync::atomic::AtomicBool,
}

/// A tensor: a handle (cloning it gives another handle to the same data).
///
/// ```
/// use pskv_engine::{Context, Engine};
/// use pskv_kvstore::Tensor;
///
/// let engine = Engine::builder().cpu_threads(1).build()?;
/// let a = Tensor::from_vec(&engine, &[2, 2], vec![1.0f32, 2.0, 3.0, 4.0], Context::Cpu)?;
/// let b = Tensor::zeros(&engine, &[2, 2], pskv_kvstore::DType::F32, Context::Gpu(0))?;
/// a.copy_to(&b)?; // an engine op: returns at once
/// assert_eq!(b.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), pskv_kvstore::KvError>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape())
            .field("dtype", &self.dtype())
            .field("storage", &self.storage())
            .field("ctx", &self.ctx())
            .field("var", &self.var().id())
            .finish()
    }
}

fn elements(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            KvError::invalid(format!(
                "shape {shape:?} has more elements than fit in memory"
            ))
        })
}

/// The bytes of a dense tensor of `shape` and `dtype`.
fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    elements(shape)?
        .checked_mul(dtype.size())
        .ok_or_else(|| KvError::invalid(format!("shape {shape:?} is too large")))
}

impl Tensor {
    /// A dense tensor over `data`.
    fn dense(engine: &Engine, shape: &[usize], dtype: DType, ctx: Context, data: Data) -> Tensor {
        Tensor::build(engine, shape, dtype, ctx, Storage::Dense, data, None)
    }

    /// A tensor over `data`; `home`: the caller's memory it is made over.
    fn build(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        ctx: Context,
        storage: Storage,
        data: Data,
        home: Option<Arc<Home>>,
    ) -> Tensor {
        Tensor {
            inner: Arc::new(Inner {
                engine: engine.clone(),
                shape: shape.into(),
                dtype,
                ctx,
                storage,
                var: Var::new(),
                cell: Cell::new(data),
                home,
                spent: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// A dense tensor of zeros. On `Context::Gpu(n)` its data is device
    /// memory of GPU n (the emulated device where there is no GPU:
    /// `PSKV_GPU`); on `Context::CpuPinned(n)`, host memory pinned for GPU
    /// n's copies.
    pub fn zeros(engine: &Engine, shape: &[usize], dtype: DType, ctx: Context) -> Result<Tensor> {
        let bytes = byte_len(shape, dtype)?;
        Ok(Tensor::dense(
            engine,
            shape,
            dtype,
            ctx,
            new_data(ctx, bytes)?,
        ))
    }

    /// A dense tensor on `Context::Gpu(n)` whose data is the caller's device
    /// memory at `address` (a CUDA device pointer; on the emulated device, a
    /// host address), used in place and never freed by pskv. The address
    /// must be 8-byte aligned.
    ///
    /// # Safety
    /// The memory holds the tensor's bytes (`shape`'s elements of `dtype`)
    /// on GPU n and stays valid, touched by nothing else, until the tensor
    /// and every clone of it are dropped and the ops pushed on it are done
    /// (`wait_to_read` after the last write, or `Engine::wait_for_all`).
    pub unsafe fn from_device_ptr(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        ctx: Context,
        address: u64,
    ) -> Result<Tensor> {
        let Context::Gpu(n) = ctx else {
            return Err(KvError::invalid(format!(
                "a tensor over device memory needs a GPU context, not {ctx:?}"
            )));
        };
        let bytes = byte_len(shape, dtype)?;
        let mem = pskv_gpu::device::open(n)?.borrow(address, bytes)?;
        let data = Data::device(mem, Vec::new());
        Ok(Tensor::dense(engine, shape, dtype, ctx, data))
    }

    /// A dense tensor on the CPU whose data is the caller's host memory at
    /// `address`, used in place (no copy) and never freed by pskv: a push
    /// reads it there, a pull's answers land there. The address must be
    /// aligned for `dtype`. The returned [`Home`] says when pskv holds the
    /// memory no longer.
    ///
    /// Subtle: a result written while the memory was shared (a message in
    /// flight still held it, T2) lands in a buffer of pskv's instead;
    /// [`KvStore::ticket`](crate::KvStore::ticket) copies it home before
    /// its ticket is done, so read the memory after a ticket.
    ///
    /// Two tensors over the same memory (two views, or a view of a push
    /// buffer's memory and the buffer) have a var each: the engine orders
    /// the ops on each, not ops across them. A write through one (its
    /// `copy_from_slice` is an op, done later) is ordered before a push
    /// from the other only by waiting for it first (`wait_to_read`), or by
    /// writing through the address itself.
    ///
    /// # Safety
    /// The memory holds `shape`'s elements of `dtype`, stays valid, and is
    /// neither read nor written by anything else from this call until the
    /// home is released (every clone of the tensor dropped, every op on it
    /// done, and every message that shared it sent:
    /// [`Home::wait_released`]).
    pub unsafe fn from_host_ptr(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        address: usize,
    ) -> Result<(Tensor, Arc<Home>)> {
        let bytes = byte_len(shape, dtype)?;
        if address == 0 || address % dtype.size() != 0 {
            return Err(KvError::invalid(format!(
                "host memory at {address:#x} is not a valid address for {} elements (null or not aligned to {} bytes)",
                dtype.name(),
                dtype.size()
            )));
        }
        let (buf, home) = Buf::borrowed(address, bytes);
        let data = Data::host(buf, Vec::new());
        let t = Tensor::build(
            engine,
            shape,
            dtype,
            Context::Cpu,
            Storage::Dense,
            data,
            Some(home.clone()),
        );
        Ok((t, home))
    }

    /// The caller's memory this tensor was made over, if any.
    pub(crate) fn home(&self) -> Option<&Arc<Home>> {
        self.inner.home.as_ref()
    }

    /// Marks the tensor spent (a kept ticket took its buffer out).
    pub(crate) fn mark_spent(&self) {
        self.inner
            .spent
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a kept ticket let go of this tensor's memory
    /// ([`Ticket::spent`](crate::Ticket::spent)): the kvstore's calls refuse
    /// it; use [`Tensor::remade`] instead.
    pub fn is_spent(&self) -> bool {
        self.inner.spent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new tensor over the same host memory as this one (made by
    /// [`Tensor::from_host_ptr`]), of its shape and dtype, with a var of
    /// its own: for a kept tensor whose memory pskv let go of
    /// ([`Ticket::spent`](crate::Ticket::spent)). None for a tensor not
    /// made over the caller's memory.
    ///
    /// # Safety
    /// As [`Tensor::from_host_ptr`]: the memory is still valid and left
    /// alone until the new tensor's home is released or its ticket is done.
    pub unsafe fn remade(&self) -> Result<Option<Tensor>> {
        let Some(home) = self.home() else {
            return Ok(None);
        };
        let (t, _home) =
            Tensor::from_host_ptr(self.engine(), self.shape(), self.dtype(), home.addr())?;
        Ok(Some(t))
    }

    /// A dense tensor holding `values` (one copy).
    pub fn from_vec<T: Elem>(
        engine: &Engine,
        shape: &[usize],
        values: Vec<T>,
        ctx: Context,
    ) -> Result<Tensor> {
        Tensor::from_slice(engine, shape, &values, ctx)
    }

    /// A dense tensor holding a copy of `values` (on a GPU: uploaded by an
    /// engine op, so the call returns at once).
    pub fn from_slice<T: Elem>(
        engine: &Engine,
        shape: &[usize],
        values: &[T],
        ctx: Context,
    ) -> Result<Tensor> {
        let n = elements(shape)?;
        if values.len() != n {
            return Err(KvError::invalid(format!(
                "shape {shape:?} holds {n} elements but {} values were given",
                values.len()
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let host = match ctx {
            Context::CpuPinned(_) => {
                let mut d = new_data(ctx, bytes.len())?;
                d.overwrite().copy_from_slice(bytes);
                d
            }
            _ => Data::host(Buf::from_bytes(bytes), Vec::new()),
        };
        let h = Tensor::dense(engine, shape, T::DTYPE, host_ctx(ctx), host);
        h.moved_to(ctx)
    }

    /// A dense tensor with every element `value`.
    pub fn full<T: Elem>(
        engine: &Engine,
        shape: &[usize],
        value: T,
        ctx: Context,
    ) -> Result<Tensor> {
        let n = elements(shape)?;
        Tensor::from_vec(engine, shape, vec![value; n], ctx)
    }

    /// A row-sparse tensor: `rows` (ascending, unique, below `shape[0]`) and
    /// their values, `rows.len() * row_len` elements.
    pub fn row_sparse<T: Elem>(
        engine: &Engine,
        shape: &[usize],
        rows: Vec<i64>,
        values: &[T],
        ctx: Context,
    ) -> Result<Tensor> {
        let row_len = check_row_sparse_shape(shape)?;
        check_rows(&rows, shape[0], "row_sparse")?;
        if values.len() != rows.len() * row_len {
            return Err(KvError::invalid(format!(
                "{} rows of {row_len} elements need {} values, got {}",
                rows.len(),
                rows.len() * row_len,
                values.len()
            )));
        }
        let h = Tensor::build(
            engine,
            shape,
            T::DTYPE,
            host_ctx(ctx),
            Storage::RowSparse,
            Data::host(Buf::from_bytes(bytemuck::cast_slice(values)), rows),
            None,
        );
        h.moved_to(ctx)
    }

    /// A row-sparse tensor with no rows stored (all zeros).
    pub fn zeros_row_sparse(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        ctx: Context,
    ) -> Result<Tensor> {
        check_row_sparse_shape(shape)?;
        Ok(Tensor::build(
            engine,
            shape,
            dtype,
            ctx,
            Storage::RowSparse,
            new_data(ctx, 0)?,
            None,
        ))
    }

    /// This host tensor on `ctx` (itself if `ctx` is a host context; else a
    /// new tensor there, filled by a transfer op).
    fn moved_to(self, ctx: Context) -> Result<Tensor> {
        if device::gpu_of(ctx).is_none() {
            return Ok(self);
        }
        let t = self.zeros_like(ctx)?;
        device::transfer(&self, &t, 0)?;
        Ok(t)
    }

    /// A dense host tensor over a key's push buffer
    /// ([`KvStore::push_buffer`](crate::KvStore::push_buffer)).
    pub(crate) fn over_span(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        span: Arc<pskv_transport::SlotSpan>,
    ) -> Tensor {
        let data = Data::host(Buf::span(span), Vec::new());
        Tensor::dense(engine, shape, dtype, Context::Cpu, data)
    }

    /// A new tensor like this one (shape, dtype, storage), zero, on `ctx`.
    pub fn zeros_like(&self, ctx: Context) -> Result<Tensor> {
        match self.storage() {
            Storage::Dense => Tensor::zeros(self.engine(), self.shape(), self.dtype(), ctx),
            Storage::RowSparse => {
                Tensor::zeros_row_sparse(self.engine(), self.shape(), self.dtype(), ctx)
            }
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }

    /// Elements of the whole shape.
    pub fn len(&self) -> usize {
        self.inner.shape.iter().product()
    }

    /// Whether the shape holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements per row of the first dimension (1 for a 1-D tensor).
    pub fn row_len(&self) -> usize {
        self.inner.shape.iter().skip(1).product()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// Where it lives.
    pub fn ctx(&self) -> Context {
        self.inner.ctx
    }

    /// Dense or row-sparse.
    pub fn storage(&self) -> Storage {
        self.inner.storage
    }

    /// Its engine var: ops that read or write the data name it.
    pub fn var(&self) -> &Var {
        &self.inner.var
    }

    /// The engine its ops run on.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether two handles are the same tensor.
    pub fn same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The data, for reading, in an op (`rc`) that names this tensor's var
    /// (T1; the guard rules are in `access.rs`).
    pub(crate) fn read<'g>(&'g self, rc: &'g RunContext<'_>) -> Result<DataRef<'g>> {
        self.inner.cell.read(&self.inner.var, rc)
    }

    /// The data, for writing, in an op (`rc`) that writes this tensor's var.
    pub(crate) fn write<'g>(&'g self, rc: &'g RunContext<'_>) -> Result<DataMut<'g>> {
        self.inner.cell.write(&self.inner.var, rc)
    }

    pub(crate) fn check_engine(&self, engine: &Engine) -> Result<()> {
        if self.engine().id() != engine.id() {
            return Err(KvError::invalid(
                "a tensor of another engine was given: tensors and the kvstore must share one engine",
            ));
        }
        Ok(())
    }

    fn check_dtype<T: Elem>(&self) -> Result<()> {
        if T::DTYPE != self.dtype() {
            return Err(KvError::invalid(format!(
                "the tensor holds {} elements, not {}",
                self.dtype(),
                T::DTYPE
            )));
        }
        Ok(())
    }

    /// The spec of an op that copies between two contexts: it runs on the
    /// device's copy pool when a GPU is involved.
    pub(crate) fn copy_spec(name: &'static str, from: Context, to: Context) -> OpSpec {
        match (from, to) {
            (_, Context::Gpu(n)) => OpSpec::new(name)
                .context(Context::Gpu(n))
                .property(Property::CopyToDevice),
            (Context::Gpu(n), _) => OpSpec::new(name)
                .context(Context::Gpu(n))
                .property(Property::CopyFromDevice),
            _ => OpSpec::new(name),
        }
    }
}

/// The data of a new tensor of `bytes` zero bytes on `ctx`.
fn new_data(ctx: Context, bytes: usize) -> Result<Data> {
    Ok(match ctx {
        Context::Cpu => Data::host(Buf::zeroed(bytes), Vec::new()),
        Context::CpuPinned(n) => Data::host(Buf::pinned(n, bytes)?, Vec::new()),
        Context::Gpu(n) => Data::device(pskv_gpu::device::open(n)?.alloc(bytes)?, Vec::new()),
    })
}

/// Where a tensor for `ctx` is first filled on the host.
fn host_ctx(ctx: Context) -> Context {
    match ctx {
        Context::Gpu(_) => Context::Cpu,
        c => c,
    }
}

fn check_row_sparse_shape(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() {
        return Err(KvError::invalid(
            "a row-sparse tensor needs at least one dimension",
        ));
    }
    elements(shape)?;
    Ok(shape[1..].iter().product())
}

/// Checks row ids: ascending, unique, within `0..nrows`.
pub(crate) fn check_rows(rows: &[i64], nrows: usize, what: &str) -> Result<()> {
    if let Some(w) = rows.windows(2).find(|w| w[0] >= w[1]) {
        return Err(KvError::invalid(format!(
            "{what}: row ids must be ascending and unique, but {} is followed by {}",
            w[0], w[1]
        )));
    }
    if let Some(&r) = rows.iter().find(|&&r| r < 0 || r as u64 >= nrows as u64) {
        return Err(KvError::invalid(format!(
            "{what}: row id {r} is outside the {nrows} rows of the tensor"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
