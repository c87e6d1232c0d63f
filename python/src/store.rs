//! `pskv.KVStore`: MXNet's kvstore API over numpy and DLPack arrays. Every
//! call that may block (init, collectives, waits, close) releases the GIL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, Key, KvStore, Tensor};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::args::{is_row_sparse, key_of, pairs, row_sparse_tensor, Of};
use crate::array::{place, Placed};
use crate::errors::{kv_err, PskvError};
use crate::request::{Inner, Request};

/// What one call issues: tensors per key, and what keeps their arrays.
#[derive(Default)]
struct Batch {
    items: Vec<(Key, Vec<Tensor>, Vec<Tensor>)>,
    keep: Vec<PyObject>,
}

impl Batch {
    fn tensors(&self) -> Vec<Tensor> {
        self.items
            .iter()
            .flat_map(|(_, v, o)| v.iter().chain(o).cloned())
            .collect()
    }

    fn keys(&self) -> Vec<Key> {
        self.items.iter().map(|(k, _, _)| k.clone()).collect()
    }
}

/// A kvstore (see `pskv.create`).
#[pyclass(name = "KVStore", module = "pskv", frozen, weakref)]
pub struct Store {
    kv: Arc<KvStore>,
    engine: Engine,
    /// Requests issued and not finished, or finished with an error the
    /// caller was not told of (their arrays stay alive meanwhile).
    pending: Mutex<Vec<Arc<Inner>>>,
    /// Sweep `pending` when it reaches this length.
    sweep_at: Mutex<usize>,
    /// `close` was called: every call is refused.
    closed: std::sync::atomic::AtomicBool,
}

impl Store {
    fn live(&self) -> PyResult<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PskvError::new_err(format!(
                "the {} store was closed",
                self.kv.type_name()
            )));
        }
        Ok(())
    }

    fn place_all(
        &self,
        arrays: &[Bound<'_, PyAny>],
        writable: bool,
        what: &dyn std::fmt::Display,
        keep: &mut Vec<PyObject>,
    ) -> PyResult<Vec<Tensor>> {
        arrays
            .iter()
            .map(|a| {
                if is_row_sparse(a) {
                    if writable {
                        return Err(PyTypeError::new_err(format!(
                            "{what}: a pskv.RowSparse cannot be an output; pull rows with row_sparse_pull"
                        )));
                    }
                    return row_sparse_tensor(&self.engine, a, what);
                }
                let Placed { tensor, keep: k } = place(&self.engine, a, writable, what)?;
                keep.push(k);
                Ok(tensor)
            })
            .collect()
    }

    /// Registers the ticket of `batch` as a request.
    fn request(&self, py: Python<'_>, batch: Batch) -> PyResult<Request> {
        let (keys, tensors) = (batch.keys(), batch.tensors());
        let kv = self.kv.clone();
        let ticket = py
            .allow_threads(move || kv.ticket(&keys, &tensors))
            .map_err(kv_err)?;
        // The ticket holds the tensors; the batch's copies go with it.
        let inner = Inner::new(ticket, batch.keep);
        let sweep = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(inner.clone());
            let at = *self.sweep_at.lock().unwrap_or_else(|p| p.into_inner());
            (pending.len() >= at).then(|| pending.clone())
        };
        // Subtle: settling releases the GIL, so not under `pending`'s lock
        // (a thread holding the GIL and wanting the lock would deadlock
        // with it), and dropping arrays may run Python code.
        if let Some(all) = sweep {
            for r in &all {
                r.settle(py, None)?;
            }
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|r| !r.settled_quietly());
            *self.sweep_at.lock().unwrap_or_else(|p| p.into_inner()) = (pending.len() * 2).max(256);
        }
        Ok(Request { inner })
    }

    /// Issues `batch` with `f` (GIL released), then its request. If a key
    /// fails to issue, the keys before it are in flight: the batch still
    /// becomes a request the store keeps (its arrays stay alive until pskv
    /// lets go of them), and the error is raised.
    fn issue(
        &self,
        py: Python<'_>,
        batch: Batch,
        f: impl Fn(&KvStore, &Key, &[Tensor], &[Tensor]) -> pskv_kvstore::Result<()> + Send + Sync,
    ) -> PyResult<Request> {
        self.live()?;
        let kv = self.kv.clone();
        let items = &batch.items;
        let issued = py.allow_threads(|| {
            for (k, v, o) in items {
                f(&kv, k, v, o)?;
            }
            Ok::<(), pskv_kvstore::KvError>(())
        });
        let request = self.request(py, batch)?;
        issued.map_err(kv_err)?;
        Ok(request)
    }

    fn blocking<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&KvStore) -> pskv_kvstore::Result<R> + Send,
    ) -> PyResult<R> {
        self.live()?;
        let kv = self.kv.clone();
        py.allow_threads(move || f(&kv)).map_err(kv_err)
    }
}

impl Drop for Store {
    /// A store dropped without `close` is closed (rank 0 stops the
    /// servers), with the GIL released: its last ops may need it (a
    /// Python updater).
    fn drop(&mut self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let kv = self.kv.clone();
        Python::with_gil(|py| {
            if let Err(e) = py.allow_threads(move || kv.close()) {
                eprintln!("pskv: closing a dropped {} store: {e}", self.kv.type_name());
            }
        });
    }
}

#[pymethods]
impl Store {
    /// The kind: local, device, dist_sync, dist_async, dist_sync_device.
    #[getter]
    fn r#type(&self) -> &'static str {
        self.kv.type_name()
    }

    /// This worker's rank (0 in a local store).
    #[getter]
    fn rank(&self) -> u32 {
        self.kv.rank()
    }

    /// The number of workers (1 in a local store).
    #[getter]
    fn num_workers(&self) -> u32 {
        self.kv.num_workers()
    }

    /// Initializes keys: `kv.init(3, w)` or `kv.init([3, 5], [w3, w5])`
    /// (a `pskv.RowSparse` value makes a row-sparse key). Collective in a
    /// distributed store (rank 0's value is stored; one barrier for the
    /// call). Returns when done: the arrays may change then.
    fn init(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut batch = Batch::default();
        let mut all = Vec::new();
        for (k, vs) in pairs(key, value, "init")? {
            if vs.len() != 1 {
                return Err(PyValueError::new_err(format!(
                    "init of key {k}: one value per key, not {}",
                    vs.len()
                )));
            }
            let t = self.place_all(&vs, false, &Of("init", &k), &mut batch.keep)?;
            all.push((k.clone(), t[0].clone()));
            batch.items.push((k, t, Vec::new()));
        }
        self.blocking(py, move |kv| kv.init_many(&all))?;
        self.request(py, batch)?.inner.wait(py, None)
    }

    /// Pushes values (summed over a key's list of arrays, then over the
    /// workers on the servers). Returns a `Request` at once; the values
    /// must not change until it is done.
    #[pyo3(signature = (key, value, priority=0))]
    fn push(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        priority: i32,
    ) -> PyResult<Request> {
        let mut batch = Batch::default();
        for (k, vs) in pairs(key, value, "push")? {
            let t = self.place_all(&vs, false, &Of("push", &k), &mut batch.keep)?;
            batch.items.push((k, t, Vec::new()));
        }
        self.issue(py, batch, |kv, k, v, _| kv.push(k.clone(), v, priority))
    }

    /// Pulls keys' values into `out` (an array, a list of arrays per key,
    /// or a list of those for a list of keys). Returns a `Request` at once;
    /// `out` holds the values once it is done.
    #[pyo3(signature = (key, out=None, priority=0))]
    fn pull(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        out: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<Request> {
        let out =
            out.ok_or_else(|| PyValueError::new_err("pull needs out= (the arrays to fill)"))?;
        let mut batch = Batch::default();
        for (k, os) in pairs(key, out, "pull")? {
            let t = self.place_all(&os, true, &Of("pull", &k), &mut batch.keep)?;
            batch.items.push((k, Vec::new(), t));
        }
        self.issue(py, batch, |kv, k, _, o| kv.pull(k.clone(), o, priority))
    }

    /// Pushes `value` and pulls the result into `out` (into `value` when
    /// `out` is None), one round trip per key. Returns a `Request` at once.
    #[pyo3(signature = (key, value, out=None, priority=0))]
    fn pushpull(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        out: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<Request> {
        let mut batch = Batch::default();
        let vals = pairs(key, value, "pushpull")?;
        let outs = match out {
            Some(o) => pairs(key, o, "pushpull")?,
            None => vals.clone(),
        };
        for ((k, vs), (_, os)) in vals.into_iter().zip(outs) {
            let what = Of("pushpull", &k);
            // Without `out` the values are the outputs too: writable.
            let v = self.place_all(&vs, out.is_none(), &what, &mut batch.keep)?;
            let o = if out.is_none() && vs.len() == 1 {
                // In place: the value's tensor is the output too.
                v.clone()
            } else {
                self.place_all(&os, true, &what, &mut batch.keep)?
            };
            if batch.items.iter().any(|(k2, _, _)| *k2 == k) {
                return Err(PyValueError::new_err(format!(
                    "pushpull: key {k} is given twice; give each key once"
                )));
            }
            batch.items.push((k, v, o));
        }
        self.issue(py, batch, |kv, k, v, o| {
            kv.pushpull(k.clone(), v, o, priority)
        })
    }

    /// Pulls rows `row_ids` (any numbers; repeats allowed) of a row-sparse
    /// (or dense) key into `out`, an array of the key's whole shape, as
    /// MXNet's `row_sparse_pull`: those rows hold the key's values, every
    /// other row zeros. Returns a `Request` at once.
    #[pyo3(signature = (key, out=None, priority=0, row_ids=None))]
    fn row_sparse_pull(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        out: Option<&Bound<'_, PyAny>>,
        priority: i32,
        row_ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Request> {
        let out = out.ok_or_else(|| PyValueError::new_err("row_sparse_pull needs out="))?;
        let ids = row_ids.ok_or_else(|| PyValueError::new_err("row_sparse_pull needs row_ids="))?;
        // Any array or sequence of numbers (MXNet passes float NDArrays,
        // of any shape): as a flat list of int64.
        let ids: Vec<i64> = py
            .import("numpy")?
            .call_method1("asarray", (ids,))?
            .call_method1("astype", ("int64",))?
            .call_method0("ravel")?
            .call_method0("tolist")?
            .extract()?;
        let k = key_of(key)?;
        let what = Of("row_sparse_pull", &k);
        let mut batch = Batch::default();
        let o = self
            .place_all(std::slice::from_ref(out), true, &what, &mut batch.keep)?
            .remove(0);
        let (shape, dtype, _) = self.kv.key_info(&k).map_err(kv_err)?;
        if o.shape() != &shape[..] || o.dtype() != dtype {
            return Err(PyValueError::new_err(format!(
                "{what}: out is {} {:?}; the key is {} {:?}",
                o.dtype().name(),
                o.shape(),
                dtype.name(),
                shape
            )));
        }
        let e = &self.engine;
        let rows = Tensor::zeros_row_sparse(e, &shape, dtype, Context::Cpu).map_err(kv_err)?;
        let idt = Tensor::from_slice(e, &[ids.len()], &ids, Context::Cpu).map_err(kv_err)?;
        let (r, o2) = (rows.clone(), o.clone());
        self.blocking(py, move |kv| {
            kv.pull_row_sparse(k.clone(), std::slice::from_ref(&r), &[idt], priority)?;
            r.copy_to(&o2)
        })?;
        batch.items.push((key_of(key)?, vec![rows], vec![o]));
        self.request(py, batch)
    }

    /// Sets the optimizer the servers run on pushes, by MXNet name (sgd,
    /// nag, adam, adagrad) and MXNet's parameter names:
    /// `kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)`;
    /// `lr_scheduler="factor(step=100;factor=0.9)"`. Collective.
    #[pyo3(signature = (name, **params))]
    fn set_optimizer(
        &self,
        py: Python<'_>,
        name: &str,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let opt = crate::settings::optimizer(name, params)?;
        self.blocking(py, move |kv| kv.set_optimizer(opt))
    }

    /// Sets gradient compression, as MXNet:
    /// `kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})`.
    fn set_gradient_compression(&self, py: Python<'_>, params: &Bound<'_, PyDict>) -> PyResult<()> {
        let c = crate::settings::compression(params)?;
        self.blocking(py, move |kv| kv.set_gradient_compression(c))
    }

    /// Sets a Python update rule, `updater(key, grad, weight)`, which
    /// changes `weight` (a numpy array) in place; `grad` is the sum of the
    /// workers' pushes (a `pskv.RowSparse` for a row-sparse key). It runs where the weights are (on every worker of a
    /// distributed store), on pskv's threads, with the GIL; the arrays are
    /// views valid during the call only. An exception fails the push (its
    /// request raises it).
    fn set_updater(&self, py: Python<'_>, updater: PyObject) -> PyResult<()> {
        let f = crate::settings::updater(py, updater)?;
        self.blocking(py, move |kv| kv.set_updater(f))
    }

    /// Writes the optimizer state of every key to `fname`.
    fn save_optimizer_states(&self, py: Python<'_>, fname: String) -> PyResult<()> {
        self.blocking(py, move |kv| kv.save_optimizer_states(fname))
    }

    /// Reads optimizer state written by `save_optimizer_states`.
    fn load_optimizer_states(&self, py: Python<'_>, fname: String) -> PyResult<()> {
        self.blocking(py, move |kv| kv.load_optimizer_states(fname))
    }

    /// Waits until every worker reached the barrier.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.blocking(py, |kv| kv.barrier())
    }

    /// The number of nodes (of every group) that missed their heartbeats
    /// for `timeout_sec` seconds.
    #[pyo3(signature = (timeout_sec=60))]
    fn num_dead_nodes(&self, py: Python<'_>, timeout_sec: u64) -> PyResult<usize> {
        self.blocking(py, move |kv| {
            kv.num_dead_nodes(Duration::from_secs(timeout_sec))
        })
    }

    /// The key's push buffer: a zeroed numpy array of the key's shape and
    /// dtype to write its gradient into and push from. Where the key's
    /// values cross shared memory to its servers (dist_sync, servers on
    /// this host, `PSKV_VAN=shm`) it is this worker's slots of the key's
    /// segments, and a push from it copies nothing in
    /// (`pushed_in_place` counts the parts); elsewhere ordinary memory.
    /// The array keeps the buffer; one in shared memory per key at a time
    /// (another call while it lives is refused). Leave it alone while a
    /// request that uses it runs.
    fn push_buffer(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        self.live()?;
        let k = key_of(key)?;
        let kv = self.kv.clone();
        let (t, addr) = py.allow_threads(|| kv.push_buffer_at(k)).map_err(kv_err)?;
        let np = py.import("numpy")?.unbind();
        crate::view::array_over(py, &np, addr, t)
    }

    /// How many key parts this store pushed from push buffers in place.
    fn pushed_in_place(&self) -> u64 {
        self.kv.pushed_in_place()
    }

    /// The shape, dtype name and storage ("default" or "row_sparse") of
    /// an initialized key.
    fn key_info(
        &self,
        key: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<usize>, &'static str, &'static str)> {
        let (shape, dtype, st) = self.kv.key_info(key_of(key)?).map_err(kv_err)?;
        let dt = match dtype {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::I32 => "int32",
            DType::I64 => "int64",
        };
        let st = match st {
            pskv_kvstore::Storage::Dense => "default",
            pskv_kvstore::Storage::RowSparse => "row_sparse",
        };
        Ok((shape, dt, st))
    }

    /// Waits for every request this store issued; raises the first error
    /// not raised before.
    fn wait_all(&self, py: Python<'_>) -> PyResult<()> {
        let reqs: Vec<Arc<Inner>> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = None;
        for r in &reqs {
            let quiet = r.settled_quietly();
            if let Err(e) = r.wait(py, None) {
                if first.is_none() && !quiet {
                    first = Some(e);
                }
            }
        }
        // A request still in flight (its wait timed out) stays the store's:
        // its arrays must live until pskv lets go of them.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend(reqs.into_iter().filter(|r| !r.finished()));
        drop(pending);
        first.map_or(Ok(()), Err)
    }

    /// Waits for the store's requests and leaves the cluster (rank 0
    /// stops the servers). Every later call raises `PskvError`; a second
    /// `close` does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let r = self.wait_all(py);
        self.blocking(py, |kv| kv.close())?;
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        r
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _a: PyObject, _b: PyObject, _c: PyObject) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<pskv.KVStore {} rank {} of {}>",
            self.kv.type_name(),
            self.kv.rank(),
            self.kv.num_workers()
        )
    }
}

/// Creates a kvstore: `local`, `device`, `dist_sync`, `dist_async` or
/// `dist_sync_device` (a distributed kind joins the job of the `DMLC_*`
/// variables that `pskv launch` sets).
#[pyfunction]
#[pyo3(signature = (name="local"))]
pub fn create(py: Python<'_>, name: &str) -> PyResult<Store> {
    let name = name.to_string();
    let (kv, engine) = py.allow_threads(move || {
        let engine = Engine::new().map_err(|e| PskvError::new_err(e.to_string()))?;
        let kv = KvStore::create(&name, &engine).map_err(kv_err)?;
        Ok::<_, PyErr>((kv, engine))
    })?;
    Ok(Store {
        kv: Arc::new(kv),
        engine,
        pending: Mutex::new(Vec::new()),
        sweep_at: Mutex::new(256),
        closed: std::sync::atomic::AtomicBool::new(false),
    })
}
