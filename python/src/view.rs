//! numpy arrays over pskv's memory: for a Python updater, views made
//! through `__array_interface__`, valid during the call only; and push
//! buffers (`KVStore.push_buffer`), whose arrays keep their memory.

use pskv_kvstore::{DType, Tensor};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyModule};

/// An object whose `__array_interface__` describes some memory (and
/// what keeps that memory alive, if anything).
#[pyclass(module = "pskv", frozen)]
pub struct MemoryView {
    iface: Py<PyDict>,
    _keep: Option<Tensor>,
}

#[pymethods]
impl MemoryView {
    #[getter]
    fn __array_interface__(&self, py: Python<'_>) -> Py<PyDict> {
        self.iface.clone_ref(py)
    }
}

fn typestr(d: DType) -> &'static str {
    match d {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
    }
}

/// A numpy array over `shape`'s elements of `dtype` at `addr`; with
/// `rows`, over that many rows of the shape's row length instead.
pub(crate) fn array(
    py: Python<'_>,
    np: &Py<PyModule>,
    addr: usize,
    shape: &[usize],
    dtype: DType,
    readonly: bool,
    rows: Option<usize>,
) -> PyResult<PyObject> {
    make(py, np, addr, (shape, dtype), (readonly, rows), None)
}

fn make(
    py: Python<'_>,
    np: &Py<PyModule>,
    addr: usize,
    (shape, dtype): (&[usize], DType),
    (readonly, rows): (bool, Option<usize>),
    keep: Option<Tensor>,
) -> PyResult<PyObject> {
    let mut shape = shape.to_vec();
    if let Some(n) = rows {
        if shape.is_empty() {
            shape.push(n);
        } else {
            shape[0] = n;
        }
    }
    let np = np.bind(py);
    if shape.iter().product::<usize>() == 0 {
        return Ok(np.call_method1("zeros", (shape, typestr(dtype)))?.unbind());
    }
    let d = PyDict::new(py);
    d.set_item("shape", pyo3::types::PyTuple::new(py, &shape)?)?;
    d.set_item("typestr", typestr(dtype))?;
    d.set_item("data", (addr, readonly))?;
    d.set_item("version", 3)?;
    let view = Py::new(
        py,
        MemoryView {
            iface: d.unbind(),
            _keep: keep,
        },
    )?;
    Ok(np.call_method1("asarray", (view,))?.unbind())
}

/// A writable numpy array over all of host tensor `t`'s memory at `addr`
/// (a push buffer's, whose memory stays where it is while `t` lives and no
/// op writes it): the array keeps `t`.
pub(crate) fn array_over(
    py: Python<'_>,
    np: &Py<PyModule>,
    addr: usize,
    t: Tensor,
) -> PyResult<PyObject> {
    let (shape, dtype) = (t.shape().to_vec(), t.dtype());
    make(py, np, addr, (&shape, dtype), (false, None), Some(t))
}
