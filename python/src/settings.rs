//! What the settings calls of `pskv.KVStore` take from Python: an
//! optimizer by MXNet's name and parameters, compression parameters, and a
//! Python function as the update rule.

use pskv_kvstore::{Compression, Key, Optimizer, Updater};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{kv_err, PskvError};

/// An optimizer by MXNet's method name and parameters (`set_optimizer`).
pub(crate) fn optimizer(name: &str, params: Option<&Bound<'_, PyDict>>) -> PyResult<Optimizer> {
    // As text, as the C ABI takes them: a number as its shortest
    // round-trip form (the same f64 back), True/False as 1/0, a string
    // (a scheduler) as it is, anything else (MXNet's dicts of ignored
    // attributes) as its str.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in params.iter().flat_map(|p| p.iter()) {
        let text = if let Ok(b) = v.extract::<bool>() {
            (b as u8).to_string()
        } else if let Ok(x) = v.extract::<f64>() {
            x.to_string()
        } else {
            v.str()?.to_string()
        };
        pairs.push((k.extract()?, text));
    }
    Optimizer::from_text(name, &borrowed(&pairs))
        .map_err(kv_err)?
        .map_err(kv_err)
}

/// Name and value pairs as the kvstore's parsers take them.
fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Compression from MXNet's parameter dict (`set_gradient_compression`).
pub(crate) fn compression(params: &Bound<'_, PyDict>) -> PyResult<Compression> {
    let mut pairs = Vec::new();
    for (k, v) in params.iter() {
        pairs.push((k.extract::<String>()?, v.str()?.to_string()));
    }
    Compression::from_params(&borrowed(&pairs)).map_err(kv_err)
}

/// The update rule that calls Python's `updater(key, grad, weight)` with
/// numpy views (`set_updater`).
pub(crate) fn updater(py: Python<'_>, updater: PyObject) -> PyResult<impl Updater> {
    let np = py.import("numpy")?.unbind();
    let f = move |key: &Key,
                  grad: &pskv_kvstore::Values<'_>,
                  weight: &mut pskv_kvstore::ValuesMut<'_>| {
        // Subtle: an op may run after the interpreter exited (a store
        // never closed, its last pushes still queued): no GIL to take.
        // SAFETY: Py_IsInitialized may be called at any time.
        if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
            return Err("the Python interpreter has exited: the updater cannot run".to_string());
        }
        Python::with_gil(|py| -> PyResult<()> {
            let k = match key {
                Key::Int(i) => i.into_pyobject(py)?.into_any(),
                Key::Str(s) => s.into_pyobject(py)?.into_any(),
            };
            let g = crate::view::array(
                py,
                &np,
                grad.bytes().as_ptr() as usize,
                grad.shape(),
                grad.dtype(),
                true,
                grad.rows().map(|r| r.len()),
            )?;
            // A row-sparse gradient: its rows, as a pskv.RowSparse.
            let g = match grad.rows() {
                Some(rows) => py
                    .import("pskv")?
                    .getattr("RowSparse")?
                    .call1((g, rows.to_vec(), grad.shape().to_vec()))?
                    .unbind(),
                None => g,
            };
            let shape = weight.shape().to_vec();
            let dtype = weight.dtype();
            let w = crate::view::array(
                py,
                &np,
                weight.bytes_mut().as_mut_ptr() as usize,
                &shape,
                dtype,
                false,
                None,
            )?;
            updater.call1(py, (k, g.clone_ref(py), w.clone_ref(py)))?;
            // The views point into pskv's memory, valid during the call
            // only: an updater that kept one (or a slice of one) would
            // reach freed memory later. Refuse it.
            for (name, a) in [("grad", &g), ("weight", &w)] {
                if a.get_refcnt(py) > 1 {
                    return Err(PskvError::new_err(format!(
                        "the updater kept a reference to its {name} array (a view of pskv's memory, valid during the call only; keep a copy: {name}.copy())"
                    )));
                }
            }
            Ok(())
        })
        .map_err(|e| format!("the Python updater raised {e}"))
    };
    Ok(f)
}
