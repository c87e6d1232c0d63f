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
//!   read op and waits for it); the crate's own ops follow the same rule, and
//!   that is what makes the `unsafe` accessors below sound.
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
//! GPU contexts: pskv's engine runs their ops on the device's worker pools,
//! but the buffer is host memory (a stand-in that keeps every path testable
//! without a GPU). Device-resident buffers are not implemented yet.

use std::cell::UnsafeCell;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use pskv_engine::{Context, Engine, OpSpec, Property, Var};

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

/// An 8-byte aligned, fixed-length byte buffer.
pub(crate) struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    pub(crate) fn zeroed(len: usize) -> Buf {
        Buf {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Buf {
        let mut b = Buf::zeroed(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[..self.len]
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Lets `Bytes` borrow a shared buffer without a copy.
struct SharedBuf(Arc<Buf>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A zero-copy view of some bytes of a shared buffer; the buffer must not
/// be changed in place while shared (T2).
pub(crate) fn share(buf: &Arc<Buf>, range: std::ops::Range<usize>) -> Bytes {
    Bytes::from_owner(SharedBuf(buf.clone())).slice(range)
}

/// What the cell of a tensor holds (see T2, T3).
pub(crate) struct Data {
    pub(crate) buf: Arc<Buf>,
    pub(crate) rows: Vec<i64>,
}

impl Data {
    pub(crate) fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }

    pub(crate) fn typed<T: Elem>(&self) -> &[T] {
        bytemuck::cast_slice(self.buf.bytes())
    }

    /// The bytes, to change some of them: copies the buffer first if a
    /// message in flight shares it (T2).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(Buf::from_bytes(self.buf.bytes()));
        }
        Arc::get_mut(&mut self.buf)
            .expect("the buffer was just made unique")
            .bytes_mut()
    }

    /// The bytes, to overwrite all of them: a shared buffer is replaced by a
    /// fresh one without copying (T2). The contents are unspecified.
    pub(crate) fn overwrite(&mut self) -> &mut [u8] {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(Buf::zeroed(self.buf.len()));
        }
        Arc::get_mut(&mut self.buf)
            .expect("the buffer was just made unique")
            .bytes_mut()
    }

    pub(crate) fn typed_mut<T: Elem>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// A zero-copy view of some bytes for the transport (T2).
    pub(crate) fn share(&self, range: std::ops::Range<usize>) -> Bytes {
        share(&self.buf, range)
    }

    /// Replaces rows and bytes (row-sparse results).
    pub(crate) fn set(&mut self, rows: Vec<i64>, buf: Buf) {
        self.rows = rows;
        self.buf = Arc::new(buf);
    }
}

struct Inner {
    engine: Engine,
    shape: Box<[usize]>,
    dtype: DType,
    ctx: Context,
    storage: Storage,
    var: Var,
    cell: UnsafeCell<Data>,
}

// SAFETY: the cell is only reached through `Tensor::data` / `data_mut`,
// whose callers follow T1: the engine never runs a writer of the var
// together with any other op on it.
unsafe impl Sync for Inner {}
// SAFETY: `Data` is plain owned memory; moving it between threads is fine.
unsafe impl Send for Inner {}

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

impl Tensor {
    fn build(
        engine: &Engine,
        shape: &[usize],
        dtype: DType,
        ctx: Context,
        storage: Storage,
        data: Data,
    ) -> Tensor {
        Tensor {
            inner: Arc::new(Inner {
                engine: engine.clone(),
                shape: shape.into(),
                dtype,
                ctx,
                storage,
                var: Var::new(),
                cell: UnsafeCell::new(data),
            }),
        }
    }

    /// A dense tensor of zeros.
    pub fn zeros(engine: &Engine, shape: &[usize], dtype: DType, ctx: Context) -> Result<Tensor> {
        let n = elements(shape)?;
        let bytes = n
            .checked_mul(dtype.size())
            .ok_or_else(|| KvError::invalid(format!("shape {shape:?} is too large")))?;
        Ok(Tensor::build(
            engine,
            shape,
            dtype,
            ctx,
            Storage::Dense,
            Data {
                buf: Arc::new(Buf::zeroed(bytes)),
                rows: Vec::new(),
            },
        ))
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

    /// A dense tensor holding a copy of `values`.
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
        Ok(Tensor::build(
            engine,
            shape,
            T::DTYPE,
            ctx,
            Storage::Dense,
            Data {
                buf: Arc::new(Buf::from_bytes(bytemuck::cast_slice(values))),
                rows: Vec::new(),
            },
        ))
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
        Ok(Tensor::build(
            engine,
            shape,
            T::DTYPE,
            ctx,
            Storage::RowSparse,
            Data {
                buf: Arc::new(Buf::from_bytes(bytemuck::cast_slice(values))),
                rows,
            },
        ))
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
            Data {
                buf: Arc::new(Buf::zeroed(0)),
                rows: Vec::new(),
            },
        ))
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

    /// The data, for reading.
    ///
    /// # Safety
    /// The caller runs inside an engine op that names this tensor's var (T1).
    pub(crate) unsafe fn data(&self) -> &Data {
        &*self.inner.cell.get()
    }

    /// The data, for writing.
    ///
    /// # Safety
    /// The caller runs inside an engine op that writes this tensor's var, and
    /// holds no other reference into the cell (T1).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn data_mut(&self) -> &mut Data {
        &mut *self.inner.cell.get()
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
        self.engine().push_sync(spec, move |_| {
            // SAFETY: a read op on the tensor's var (T1).
            let r = f(&t, unsafe { t.data() });
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
        })
    }

    /// Copies the elements out (row-sparse: the dense equivalent), after
    /// every write pushed on the tensor so far.
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>()?;
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
        let src: Vec<u8> = bytemuck::cast_slice(values).to_vec();
        let t = self.clone();
        let spec = Tensor::copy_spec("tensor_write", Context::Cpu, self.ctx()).write(self.var());
        self.engine().push_sync(spec, move |_| {
            // SAFETY: a write op on the tensor's var (T1).
            unsafe { t.data_mut() }.overwrite().copy_from_slice(&src);
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
        let buf = Buf::from_bytes(bytemuck::cast_slice(values));
        let t = self.clone();
        let spec = Tensor::copy_spec("tensor_set_rows", Context::Cpu, self.ctx()).write(self.var());
        self.engine().push_sync(spec, move |_| {
            // SAFETY: a write op on the tensor's var (T1).
            unsafe { t.data_mut() }.set(rows, buf);
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
        let t = self.clone();
        let spec = OpSpec::new("tensor_map_mut")
            .context(self.ctx())
            .write(self.var());
        self.engine().push_sync(spec, move |_| {
            // SAFETY: a write op on the tensor's var (T1).
            f(unsafe { t.data_mut() }.typed_mut::<T>());
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
        let (src, d2) = (self.clone(), dst.clone());
        let spec = Tensor::copy_spec("tensor_copy", self.ctx(), dst.ctx())
            .read(self.var())
            .write(dst.var());
        self.engine().push_sync(spec, move |_| {
            // SAFETY: this op reads `src` and writes `d2`, two different
            // tensors (T1).
            let (s, d) = unsafe { (src.data(), d2.data_mut()) };
            copy_data(
                s,
                src.storage(),
                d,
                d2.storage(),
                src.dtype(),
                src.row_len(),
            );
            Ok(())
        })?;
        Ok(())
    }

    /// A copy of this tensor on another context (an engine op).
    pub fn copy_to_ctx(&self, ctx: Context) -> Result<Tensor> {
        let t = self.zeros_like(ctx)?;
        self.copy_to(&t)?;
        Ok(t)
    }
}

/// Copies `s` into `d` across storages (inside an op that reads the source
/// and writes the destination).
pub(crate) fn copy_data(
    s: &Data,
    s_storage: Storage,
    d: &mut Data,
    d_storage: Storage,
    dtype: DType,
    row_len: usize,
) {
    let row_bytes = row_len * dtype.size();
    match (s_storage, d_storage) {
        (Storage::Dense, Storage::Dense) => d.overwrite().copy_from_slice(s.bytes()),
        (Storage::RowSparse, Storage::RowSparse) => {
            d.set(s.rows.clone(), Buf::from_bytes(s.bytes()));
        }
        (Storage::RowSparse, Storage::Dense) => {
            let out = d.overwrite();
            out.fill(0);
            for (i, &r) in s.rows.iter().enumerate() {
                let r = r as usize;
                out[r * row_bytes..(r + 1) * row_bytes]
                    .copy_from_slice(&s.bytes()[i * row_bytes..(i + 1) * row_bytes]);
            }
        }
        (Storage::Dense, Storage::RowSparse) => {
            let bytes = s.bytes();
            let nrows = bytes.len().checked_div(row_bytes).unwrap_or(0);
            let rows: Vec<i64> = (0..nrows)
                .filter(|&r| {
                    bytes[r * row_bytes..(r + 1) * row_bytes]
                        .iter()
                        .any(|&b| b != 0)
                })
                .map(|r| r as i64)
                .collect();
            let mut buf = Buf::zeroed(rows.len() * row_bytes);
            for (i, &r) in rows.iter().enumerate() {
                let r = r as usize;
                buf.bytes_mut()[i * row_bytes..(i + 1) * row_bytes]
                    .copy_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
            }
            d.set(rows, buf);
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
        e.push_sync(OpSpec::new("share").read(a.var()), move |_| {
            *h2.lock() = unsafe { a2.data() }.share(0..8);
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
