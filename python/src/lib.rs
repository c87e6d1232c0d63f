//! `import pskv`: pskv's kvstore from Python, with MXNet's names and
//! semantics (python/mxnet/kvstore/kvstore.py), over numpy arrays and
//! DLPack arrays used in place. Built by maturin (`pip install ./python`);
//! `pskv/__init__.py` adds the pure-Python parts (RowSparse, waitall).
//!
//! Rooms: `store.rs` the `KVStore` class, `args.rs` its calls' arguments
//! (keys, key/value lists, row-sparse values), `settings.rs` what its
//! settings calls take (an optimizer, compression, a Python updater
//! function), `request.rs` a request in
//! flight, `array.rs` arrays as tensors over their memory, `view.rs`
//! numpy views for a Python updater, `errors.rs` the exceptions.

mod args;
mod array;
mod errors;
mod request;
mod settings;
mod store;
mod view;

use pyo3::prelude::*;

#[pymodule]
fn _pskv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(store::create, m)?)?;
    m.add_class::<store::Store>()?;
    m.add_class::<request::Request>()?;
    m.add_class::<view::MemoryView>()?;
    m.add("PskvError", m.py().get_type::<errors::PskvError>())?;
    m.add("Unsupported", m.py().get_type::<errors::Unsupported>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
