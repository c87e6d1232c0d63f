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
//!   transport keeps them.
//! - **T3.** A row-sparse tensor stores `rows.len()` rows, ascending and
//!   unique, each `row_len()` elements, in `buf`; a dense one stores all
//!   `len()` elements and no rows.
//!
//! GPU contexts: the data of a tensor on `Context::Gpu(n)` is device memory
//! of GPU n (`pskv_gpu::device`: CUDA, or the emulated device where there
//! is no GPU), reached only through engine ops that queue device work and
//! complete when it is done (`device.rs`); a tensor on
//! `Context::CpuPinned(n)` is host memory pinned for GPU n's copies.

mod access;
mod buf;
mod device;

use std::fmt;
use std::sync::Arc;

use pskv_engine::{Context, Engine, OpSpec, Property, RunContext, Var};

use access::Cell;
pub(crate) use access::{DataMut, DataRef};

pub use buf::Home;
pub(crate) use buf::{copy_data, share, Buf, Data};
pub(crate) use device::{copy_any, device_op, gpu_of};

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
    let mut spec = Tensor::copy_spec("tensor_copy", src.ctx(), dst.ctx())
        .priority(priority)
        .read(src.var())
        .write(dst.var());
    // A small copy runs on the thread that makes it ready (the caller's,
    // when its tensors are idle): handing it to a pool worker, and the
    // worker's finish back to a waiting caller, costs microseconds of
    // wake-ups for a copy of nanoseconds.
    if src.len().max(dst.len()) * src.dtype().size() <= INLINE_COPY_BYTES {
        spec = spec.property(Property::Async);
    }
    let (s, d) = (src.clone(), dst.clone());
    src.engine().push_sync(spec, move |rc| {
        let (sd, mut dd) = (s.read(&rc)?, d.write(&rc)?);
        copy_data(
            &sd,
            s.storage(),
            &mut dd,
            d.storage(),
            s.dtype(),
            s.row_len(),
        );
        Ok(())
    })?;
    Ok(())
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

fn densify<T: Elem>(vals: &[T], rows: &[i64], len: usize, row_len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        out[r * row_len..(r + 1) * row_len].copy_from_slice(&vals[i * row_len..(i + 1) * row_len]);
    }
    out
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
mod tests {
    use super::*;
    use bytes::Bytes;
    use parking_lot::Mutex;

    fn engine() -> Engine {
        Engine::builder().cpu_threads(2).build().unwrap()
    }

    #[test]
    fn copies_and_reads_follow_push_order() {
        let e = engine();
        let a = Tensor::from_vec(&e, &[4], vec![1.0f32, 2.0, 3.0, 4.0], Context::Cpu).unwrap();
        let b = Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(1)).unwrap();
        a.copy_to(&b).unwrap();
        a.copy_from_slice(&[9.0f32; 4]).unwrap();
        assert_eq!(b.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(a.to_vec::<f32>().unwrap(), vec![9.0; 4]);
        b.map_mut::<f32>(|v| v.iter_mut().for_each(|x| *x *= 2.0))
            .unwrap();
        assert_eq!(b.to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
        assert!(a.to_vec::<f64>().is_err());
        assert!(a.copy_from_slice(&[1.0f32; 3]).is_err());
    }

    #[test]
    fn shared_buffers_are_copied_before_a_write() {
        let e = engine();
        let a = Tensor::from_vec(&e, &[2], vec![1i32, 2], Context::Cpu).unwrap();
        let held = Arc::new(Mutex::new(Bytes::new()));
        let (h2, a2) = (held.clone(), a.clone());
        e.push_sync(OpSpec::new("share").read(a.var()), move |rc| {
            *h2.lock() = a2.read(&rc)?.share(0..8);
            Ok(())
        })
        .unwrap();
        a.map_mut::<i32>(|v| v[0] = 7).unwrap();
        assert_eq!(a.to_vec::<i32>().unwrap(), vec![7, 2]);
        assert_eq!(&held.lock()[..], bytemuck::cast_slice::<i32, u8>(&[1, 2]));
    }

    #[test]
    fn row_sparse_round_trips_and_densifies() {
        let e = engine();
        let rs = Tensor::row_sparse(
            &e,
            &[4, 2],
            vec![1, 3],
            &[1.0f32, 2.0, 3.0, 4.0],
            Context::Cpu,
        )
        .unwrap();
        assert_eq!(
            rs.to_vec::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
        );
        let dense = Tensor::zeros(&e, &[4, 2], DType::F32, Context::Cpu).unwrap();
        rs.copy_to(&dense).unwrap();
        let back = Tensor::zeros_row_sparse(&e, &[4, 2], DType::F32, Context::Cpu).unwrap();
        dense.copy_to(&back).unwrap();
        assert_eq!(
            back.to_row_sparse::<f32>().unwrap(),
            (vec![1, 3], vec![1.0, 2.0, 3.0, 4.0])
        );
        assert!(Tensor::row_sparse(&e, &[4, 2], vec![3, 1], &[0.0f32; 4], Context::Cpu).is_err());
        assert!(Tensor::row_sparse(&e, &[4, 2], vec![4], &[0.0f32; 2], Context::Cpu).is_err());
        assert!(Tensor::row_sparse(&e, &[4, 2], vec![0], &[0.0f32; 3], Context::Cpu).is_err());
    }

    #[test]
    fn tensors_of_another_engine_are_refused() {
        let (e1, e2) = (engine(), engine());
        let a = Tensor::zeros(&e1, &[1], DType::F32, Context::Cpu).unwrap();
        let b = Tensor::zeros(&e2, &[1], DType::F32, Context::Cpu).unwrap();
        assert!(a.copy_to(&b).is_err());
    }
}
