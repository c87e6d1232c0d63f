//! A call's arguments read from Python: keys (int or str), keys with
//! their values (one array, a list per device, or lists of those), and
//! `pskv.RowSparse` values; the names messages give them.

use half::f16;
use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, Key, Tensor};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyList, PyString, PyTuple, PyType};

use crate::array::place;
use crate::errors::kv_err;

/// A key from Python: an int (0 to 2**32-1) or a str.
pub(crate) fn key_of(k: &Bound<'_, PyAny>) -> PyResult<Key> {
    // A str first by its type: an int key (the usual one) makes no failed
    // extraction.
    if let Ok(s) = k.downcast::<PyString>() {
        return Ok(Key::from(s.to_cow()?.into_owned()));
    }
    let i: i64 = k.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "a key is an int or a str, not a {}",
            k.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Key::int(i).map_err(kv_err)
}

/// Keys with their values: `key` a key and `value` an array or a list of
/// arrays (one per device, summed), or `key` a list of keys and `value` a
/// list of as many of those.
pub(crate) fn pairs<'py>(
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Vec<(Key, Vec<Bound<'py, PyAny>>)>> {
    let items = |v: &Bound<'py, PyAny>| -> PyResult<Vec<Bound<'py, PyAny>>> {
        if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
            let l: Vec<Bound<'py, PyAny>> = v.try_iter()?.collect::<PyResult<_>>()?;
            if l.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "{what}: an empty list of arrays"
                )));
            }
            Ok(l)
        } else {
            Ok(vec![v.clone()])
        }
    };
    if key.is_instance_of::<PyList>() || key.is_instance_of::<PyTuple>() {
        let keys: Vec<Bound<'py, PyAny>> = key.try_iter()?.collect::<PyResult<_>>()?;
        let vals: Vec<Bound<'py, PyAny>> = value.try_iter()?.collect::<PyResult<_>>()?;
        if keys.len() != vals.len() {
            return Err(PyValueError::new_err(format!(
                "{what}: {} keys but {} values",
                keys.len(),
                vals.len()
            )));
        }
        keys.iter()
            .zip(&vals)
            .map(|(k, v)| Ok((key_of(k)?, items(v)?)))
            .collect()
    } else {
        Ok(vec![(key_of(key)?, items(value)?)])
    }
}

/// Whether `v` is a `pskv.RowSparse` (or of a subclass). The class is
/// looked up once: `hasattr` on every array of every call made (and
/// dropped) an `AttributeError` per array, about a microsecond each.
pub(crate) fn is_row_sparse(v: &Bound<'_, PyAny>) -> bool {
    static CLASS: GILOnceCell<Option<Py<PyType>>> = GILOnceCell::new();
    let py = v.py();
    let class = CLASS.get_or_init(py, || {
        let c = py
            .import("pskv")
            .and_then(|m| m.getattr("RowSparse"))
            .ok()?;
        c.downcast_into::<PyType>().ok().map(Bound::unbind)
    });
    match class {
        Some(c) => v.is_instance(c.bind(py)).unwrap_or(false),
        // `_pskv` without its package (not how it is installed): the
        // class's marker.
        None => v.hasattr(intern!(py, "_pskv_row_sparse")).unwrap_or(false),
    }
}

/// What a call does with a key, for messages ("pushpull of key 3"),
/// formatted only when a message needs it.
pub(crate) struct Of<'a>(pub(crate) &'static str, pub(crate) &'a Key);

impl std::fmt::Display for Of<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of key {}", self.0, self.1)
    }
}

/// A row-sparse value (`pskv.RowSparse`: shape, indices, data) as a
/// tensor (a copy: its rows are gathered into pskv's memory).
pub(crate) fn row_sparse_tensor(
    engine: &Engine,
    v: &Bound<'_, PyAny>,
    what: &dyn std::fmt::Display,
) -> PyResult<Tensor> {
    let py = v.py();
    let shape: Vec<usize> = v.getattr("shape")?.extract()?;
    let rows: Vec<i64> = v.getattr("indices")?.extract()?;
    let data = v.getattr("data")?;
    // No rows: no data to place (an empty array has no memory).
    let t = if rows.is_empty() {
        None
    } else {
        Some(place(engine, &data, false, what)?.tensor)
    };
    let dtype = match &t {
        Some(t) => t.dtype(),
        None => crate::array::dtype_of(&data, what)?,
    };
    macro_rules! typed {
        ($T:ty) => {{
            // `to_vec` waits for an engine op: not with the GIL (a Python
            // updater on the engine's threads needs it).
            let vals: Vec<$T> = match &t {
                Some(t) => py.allow_threads(|| t.to_vec()).map_err(kv_err)?,
                None => Vec::new(),
            };
            Tensor::row_sparse(engine, &shape, rows, &vals, Context::Cpu).map_err(kv_err)
        }};
    }
    match dtype {
        DType::F32 => typed!(f32),
        DType::F64 => typed!(f64),
        DType::F16 => typed!(f16),
        DType::I32 => typed!(i32),
        DType::I64 => typed!(i64),
    }
}
