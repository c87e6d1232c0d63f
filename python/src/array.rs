//! Python arrays as tensors over their own memory: numpy arrays (and
//! anything with `__array_interface__`) by their interface, other arrays
//! (torch, cupy, jax, ...) by DLPack (`__dlpack__`). No copy: the tensor
//! uses the array's memory in place, and the request that uses it keeps the
//! array (or its DLPack capsule) alive until it is done.

use std::ffi::c_void;
use std::fmt::Display;

use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, Tensor};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyString, PyTuple};

use crate::errors::{kv_err, Unsupported};

/// An array made a tensor, and what keeps its memory alive.
pub(crate) struct Placed {
    pub(crate) tensor: Tensor,
    pub(crate) keep: PyObject,
}

/// The dtype of a numpy type string (`<f4`, `=i8`, `|...`).
fn dtype_of_typestr(t: &str, what: &dyn Display) -> PyResult<DType> {
    let (order, kind) = t.split_at(1.min(t.len()));
    let little = cfg!(target_endian = "little");
    let native = match order {
        "<" => little,
        ">" => !little,
        "=" | "|" => true,
        _ => false,
    };
    if !native {
        return Err(PyValueError::new_err(format!(
            "{what}: byte order of dtype '{t}' is not this machine's"
        )));
    }
    Ok(match kind {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "V2" => {
            return Err(Unsupported::new_err(format!(
                "{what}: a 2-byte dtype of no numpy kind (bfloat16?) has no kernels in pskv yet; use float16 or float32"
            )))
        }
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what}: dtype '{t}' (pskv takes float32, float64, float16, int32, int64)"
            )))
        }
    })
}

/// The dtype of a numpy array (or anything with `__array_interface__`).
pub(crate) fn dtype_of(obj: &Bound<'_, PyAny>, what: &dyn Display) -> PyResult<DType> {
    let t: String = obj
        .getattr("__array_interface__")?
        .get_item("typestr")?
        .extract()?;
    dtype_of_typestr(&t, what)
}

/// The dtype of a DLPack type (code, bits, lanes).
fn dtype_of_dlpack(code: u8, bits: u8, lanes: u16, what: &dyn Display) -> PyResult<DType> {
    if lanes != 1 {
        return Err(PyTypeError::new_err(format!(
            "{what}: vector dtypes ({lanes} lanes)"
        )));
    }
    Ok(match (code, bits) {
        (2, 32) => DType::F32,
        (2, 64) => DType::F64,
        (2, 16) => DType::F16,
        (0, 32) => DType::I32,
        (0, 64) => DType::I64,
        (4, 16) => {
            return Err(Unsupported::new_err(format!(
                "{what}: bfloat16 has no kernels in pskv yet; use float16 or float32"
            )))
        }
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what}: DLPack dtype code {code} of {bits} bits (pskv takes float32, float64, float16, int32, int64)"
            )))
        }
    })
}

/// Whether `strides` (bytes; None for C order) are C order for `shape`.
fn c_contiguous(shape: &[usize], strides: Option<Vec<isize>>, size: usize) -> bool {
    let Some(st) = strides else { return true };
    if st.len() != shape.len() {
        return false;
    }
    let mut expect = size as isize;
    for (d, s) in shape.iter().zip(st.iter()).rev() {
        if *d > 1 && *s != expect {
            return false;
        }
        match isize::try_from(*d).ok().and_then(|d| expect.checked_mul(d)) {
            Some(e) => expect = e,
            None => return false,
        }
    }
    true
}

fn check_len(shape: &[usize], what: &dyn Display) -> PyResult<()> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.is_none() {
        return Err(PyValueError::new_err(format!(
            "{what}: shape {shape:?} holds more elements than memory"
        )));
    }
    if n == Some(0) {
        return Err(PyValueError::new_err(format!(
            "{what}: an empty array (shape {shape:?})"
        )));
    }
    Ok(())
}

/// `obj` as a tensor over its memory. `writable`: pskv will write it (an
/// output); a read-only numpy array is refused then (DLPack cannot say
/// that an array is read-only: a DLPack output must be writable).
pub(crate) fn place(
    engine: &Engine,
    obj: &Bound<'_, PyAny>,
    writable: bool,
    what: &dyn Display,
) -> PyResult<Placed> {
    let py = obj.py();
    if let Ok(st) = obj.getattr(intern!(py, "__array_struct__")) {
        if let Some(placed) = place_struct(engine, obj, &st, writable, what) {
            return placed;
        }
    }
    if let Ok(ai) = obj.getattr(intern!(py, "__array_interface__")) {
        return place_interface(engine, obj, &ai, writable, what);
    }
    if obj.hasattr("__dlpack__")? {
        return place_dlpack(engine, obj, what);
    }
    Err(PyTypeError::new_err(format!(
        "{what}: a {} is not an array (pskv takes numpy arrays and DLPack arrays)",
        obj.get_type().name()?
    )))
}

/// numpy's C-level array interface (`PyArrayInterface` in numpy's
/// `ndarraytypes.h`), which `__array_struct__` gives in a capsule.
#[repr(C)]
struct ArrayInterface {
    two: i32,
    nd: i32,
    typekind: u8,
    itemsize: i32,
    flags: i32,
    shape: *const isize,
    strides: *const isize,
    data: *mut c_void,
    descr: *mut c_void,
}

/// `PyArrayInterface` flags.
const C_CONTIGUOUS: i32 = 0x1;
const NOTSWAPPED: i32 = 0x200;
const WRITEABLE: i32 = 0x400;

/// `obj` placed by its `__array_struct__` capsule (`st`): numpy's cheap
/// way (no dict and no type string made per call, as `__array_interface__`
/// makes: about 0.7 us less per array). None for what this path does not
/// decide (a dtype other than pskv's, a swapped byte order, a capsule that
/// is not numpy's struct): the interface path then gives the answer or
/// its error.
fn place_struct(
    engine: &Engine,
    obj: &Bound<'_, PyAny>,
    st: &Bound<'_, PyAny>,
    writable: bool,
    what: &dyn Display,
) -> Option<PyResult<Placed>> {
    let cap = st.downcast::<PyCapsule>().ok()?;
    let p = cap.pointer() as *const ArrayInterface;
    if p.is_null() {
        return None;
    }
    // SAFETY: a capsule of `__array_struct__` holds a PyArrayInterface
    // (checked by its `two`), valid while the capsule lives (it does until
    // this function returns; the values are copied out here).
    let ai = unsafe { &*p };
    if ai.two != 2 || ai.nd < 0 || (ai.nd > 0 && ai.shape.is_null()) || ai.flags & NOTSWAPPED == 0 {
        return None;
    }
    let dtype = match (ai.typekind, ai.itemsize) {
        (b'f', 4) => DType::F32,
        (b'f', 8) => DType::F64,
        (b'f', 2) => DType::F16,
        (b'i', 4) => DType::I32,
        (b'i', 8) => DType::I64,
        _ => return None,
    };
    let dims: &[isize] = if ai.nd == 0 {
        &[]
    } else {
        // SAFETY: `shape` holds `nd` entries (checked non-null above).
        unsafe { std::slice::from_raw_parts(ai.shape, ai.nd as usize) }
    };
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    Some(placed_over(
        engine,
        obj,
        PlaceArgs {
            addr: ai.data as usize,
            readonly: ai.flags & WRITEABLE == 0,
            contiguous: ai.flags & C_CONTIGUOUS != 0,
            dtype,
            shape,
            writable,
        },
        what,
    ))
}

/// What both numpy paths read of an array, and whether pskv writes it.
struct PlaceArgs {
    addr: usize,
    readonly: bool,
    contiguous: bool,
    dtype: DType,
    shape: Vec<usize>,
    writable: bool,
}

/// The checks both numpy paths make, and the tensor over the memory.
fn placed_over(
    engine: &Engine,
    obj: &Bound<'_, PyAny>,
    a: PlaceArgs,
    what: &dyn Display,
) -> PyResult<Placed> {
    check_len(&a.shape, what)?;
    if !a.contiguous {
        return Err(PyValueError::new_err(format!(
            "{what}: the array is not contiguous (C order); pass numpy.ascontiguousarray(a)"
        )));
    }
    if a.writable && a.readonly {
        return Err(PyValueError::new_err(format!(
            "{what}: the array is read-only and pskv writes it"
        )));
    }
    let one;
    let shape = if a.shape.is_empty() {
        one = [1usize];
        &one[..]
    } else {
        &a.shape[..]
    };
    // SAFETY: the array's memory, `shape`'s elements of `dtype`; the
    // request that uses the tensor keeps `obj` alive until it is done, and
    // the caller's contract leaves the memory alone until then.
    let (tensor, _) = unsafe { Tensor::from_host_ptr(engine, shape, a.dtype, a.addr) }
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    Ok(Placed {
        tensor,
        keep: obj.clone().unbind(),
    })
}

fn place_interface<'py>(
    engine: &Engine,
    obj: &Bound<'py, PyAny>,
    ai: &Bound<'py, PyAny>,
    writable: bool,
    what: &dyn Display,
) -> PyResult<Placed> {
    let ai = ai.downcast::<PyDict>()?;
    let py = obj.py();
    // Interned names: a lookup hashes no new string per call.
    let get = |k: &Bound<'py, PyString>| -> PyResult<Bound<'py, PyAny>> {
        ai.get_item(k)?.ok_or_else(|| {
            PyTypeError::new_err(format!("{what}: __array_interface__ has no '{k}'"))
        })
    };
    let (addr, readonly): (usize, bool) = get(intern!(py, "data"))?.extract()?;
    let typestr: String = get(intern!(py, "typestr"))?.extract()?;
    let shape: Vec<usize> = get(intern!(py, "shape"))?.extract()?;
    let strides: Option<Vec<isize>> = get(intern!(py, "strides"))?.extract()?;
    let dtype = dtype_of_typestr(&typestr, what)?;
    let contiguous = c_contiguous(&shape, strides, dtype.size());
    let args = PlaceArgs {
        addr,
        readonly,
        contiguous,
        dtype,
        shape,
        writable,
    };
    placed_over(engine, obj, args, what)
}

/// DLPack's structures (dlpack.h, version 0.8: the legacy "dltensor"
/// capsule every producer gives without arguments).
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

fn place_dlpack(engine: &Engine, obj: &Bound<'_, PyAny>, what: &dyn Display) -> PyResult<Placed> {
    // CUDA memory: ask the producer to order its work before the legacy
    // default stream (stream=1), with which pskv's copies synchronize.
    let on_cuda = obj
        .call_method0("__dlpack_device__")
        .and_then(|d| d.extract::<(i32, i32)>())
        .is_ok_and(|(t, _)| t == 2);
    let cap = if on_cuda {
        let kw = PyDict::new(obj.py());
        kw.set_item("stream", 1)?;
        obj.call_method("__dlpack__", (), Some(&kw))?
    } else {
        obj.call_method0("__dlpack__")?
    };
    let cap = cap
        .downcast::<PyCapsule>()
        .map_err(|_| PyTypeError::new_err(format!("{what}: __dlpack__ did not give a capsule")))?;
    match cap.name()? {
        Some(n) if n.to_bytes() == b"dltensor" => {}
        other => {
            return Err(PyValueError::new_err(format!(
                "{what}: a DLPack capsule named {other:?}, not \"dltensor\" (used already?)"
            )))
        }
    }
    let p = cap.pointer() as *const DlManagedTensor;
    if p.is_null() {
        return Err(PyValueError::new_err(format!(
            "{what}: an empty DLPack capsule"
        )));
    }
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor, valid while the
    // capsule is (we keep it; its destructor calls the producer's deleter,
    // since we never rename it "used_dltensor").
    let t = unsafe { &(*p).dl_tensor };
    let dtype = dtype_of_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes, what)?;
    let nd = usize::try_from(t.ndim).unwrap_or(0);
    // SAFETY: DLPack gives `ndim` dims (and strides, when not null).
    let dims: &[i64] = if nd == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, nd) }
    };
    let shape: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
    let strides = if t.strides.is_null() || nd == 0 {
        None
    } else {
        // SAFETY: as above; DLPack strides are in elements.
        let s = unsafe { std::slice::from_raw_parts(t.strides, nd) };
        Some(
            s.iter()
                .map(|&x| x as isize * dtype.size() as isize)
                .collect(),
        )
    };
    check_len(&shape, what)?;
    if !c_contiguous(&shape, strides, dtype.size()) {
        return Err(PyValueError::new_err(format!(
            "{what}: the array is not contiguous (C order)"
        )));
    }
    let addr = (t.data as usize).wrapping_add(t.byte_offset as usize);
    let one = [1usize];
    let shape = if shape.is_empty() {
        &one[..]
    } else {
        &shape[..]
    };
    let tensor = match t.device.device_type {
        // CPU and CUDA host memory.
        1 | 3 => {
            // SAFETY: as in `place_interface`; the capsule is kept.
            unsafe { Tensor::from_host_ptr(engine, shape, dtype, addr) }
                .map(|(t, _)| t)
                .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?
        }
        // CUDA device memory.
        2 => {
            let dev = u32::try_from(t.device.device_id).map_err(|_| {
                PyValueError::new_err(format!("{what}: device {}", t.device.device_id))
            })?;
            // SAFETY: device memory of GPU `dev` (the producer's), kept
            // alive with the capsule.
            unsafe { Tensor::from_device_ptr(engine, shape, dtype, Context::Gpu(dev), addr as u64) }
                .map_err(kv_err)?
        }
        other => {
            return Err(Unsupported::new_err(format!(
                "{what}: DLPack device type {other} (pskv takes CPU, CUDA and CUDA host memory)"
            )))
        }
    };
    Ok(Placed {
        tensor,
        keep: PyTuple::new(obj.py(), [obj.clone(), cap.clone().into_any()])?
            .into_any()
            .unbind(),
    })
}
