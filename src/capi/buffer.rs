//! `pskv_buffer`: the caller's memory as a descriptor (pointer, element
//! count, dtype, device), and the tensor pskv makes over it, in place.

use std::ffi::{c_int, c_void};

use super::{arg, Failure, PSKV_ERR_UNSUPPORTED};
use crate::engine::{Context, Engine};
use crate::kvstore::{DType, Tensor};

/// dtype code: 32-bit float (MXNet's codes throughout).
pub const PSKV_FLOAT32: i32 = 0;
/// dtype code: 64-bit float.
pub const PSKV_FLOAT64: i32 = 1;
/// dtype code: IEEE half precision.
pub const PSKV_FLOAT16: i32 = 2;
/// dtype code: 32-bit signed integer.
pub const PSKV_INT32: i32 = 4;
/// dtype code: 64-bit signed integer.
pub const PSKV_INT64: i32 = 6;
/// dtype code: bfloat16 (no kernels yet: `PSKV_ERR_UNSUPPORTED`).
pub const PSKV_BFLOAT16: i32 = 12;

/// Device type: host memory (DLPack's codes throughout).
pub const PSKV_DEVICE_CPU: i32 = 1;
/// Device type: memory of GPU `device_id` (a CUDA device pointer; without
/// a GPU, or with `PSKV_GPU=emulated`, the emulated device, whose device
/// pointers are host addresses).
pub const PSKV_DEVICE_GPU: i32 = 2;
/// Device type: host memory pinned for GPU copies (`cudaMallocHost`);
/// used as host memory.
pub const PSKV_DEVICE_CPU_PINNED: i32 = 3;

/// The caller's memory: `count` elements of `dtype` at `data`, on
/// `device_type` (`device_id`: the GPU's number, else 0), of shape
/// `shape[0..ndim]` (row-major; its product is `count`), or 1-D when `ndim`
/// is 0 (then `shape` may be NULL). Host memory must be aligned for its
/// dtype; GPU memory to 8 bytes. An initialized key takes the shape of its
/// init value; later buffers of the key may leave the shape out.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PskvBuffer {
    /// The first element.
    pub data: *mut c_void,
    /// The number of elements.
    pub count: u64,
    /// A `PSKV_FLOAT32`... dtype code.
    pub dtype: i32,
    /// A `PSKV_DEVICE_*` type.
    pub device_type: i32,
    /// The GPU's number for `PSKV_DEVICE_GPU`; 0 otherwise.
    pub device_id: i32,
    /// The number of dimensions (0: 1-D of `count` elements).
    pub ndim: i32,
    /// `ndim` dimensions, or NULL when `ndim` is 0.
    pub shape: *const i64,
}

impl PskvBuffer {
    /// A 1-D buffer.
    pub(crate) fn flat(
        data: *mut c_void,
        count: u64,
        dtype: i32,
        device_type: i32,
        device_id: i32,
    ) -> PskvBuffer {
        PskvBuffer {
            data,
            count,
            dtype,
            device_type,
            device_id,
            ndim: 0,
            shape: std::ptr::null(),
        }
    }

    /// Its shape: `ndim` dimensions whose product is `count` elements, or
    /// `[count]`.
    ///
    /// # Safety
    /// `shape` is null or points to `ndim` values.
    pub(crate) unsafe fn dims(
        &self,
        n: usize,
        what: &dyn std::fmt::Display,
    ) -> Result<Vec<usize>, Failure> {
        if self.ndim == 0 {
            return Ok(vec![n]);
        }
        let nd = usize::try_from(self.ndim)
            .ok()
            .filter(|&d| d <= 32)
            .ok_or_else(|| arg(format!("{what}: ndim {} (0 to 32)", self.ndim)))?;
        if self.shape.is_null() {
            return Err(arg(format!(
                "{what}: ndim {nd} but shape is a null pointer"
            )));
        }
        let dims: Vec<usize> = std::slice::from_raw_parts(self.shape, nd)
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| arg(format!("{what}: dimension {d}"))))
            .collect::<Result<_, _>>()?;
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(n) {
            return Err(arg(format!(
                "{what}: shape {dims:?} does not hold its {n} elements"
            )));
        }
        Ok(dims)
    }
}

/// The largest element count a buffer may have (its bytes must fit an
/// `isize`, as Rust's slices require).
pub(crate) const MAX_LEN: usize = isize::MAX as usize / std::mem::size_of::<f64>();

/// The dtype of a code.
pub(crate) fn dtype_of(code: i32, what: &dyn std::fmt::Display) -> Result<DType, Failure> {
    if code == PSKV_BFLOAT16 {
        return Err((
            PSKV_ERR_UNSUPPORTED,
            format!("{what}: bfloat16 (dtype {code}) has no kernels in pskv yet; use float16 or float32"),
        ));
    }
    u8::try_from(code)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| {
            arg(format!(
            "{what}: dtype code {code} (expected 0 float32, 1 float64, 2 float16, 4 int32, 6 int64)"
        ))
        })
}

/// A checked element count.
pub(crate) fn count_of(count: u64, what: &dyn std::fmt::Display) -> Result<usize, Failure> {
    match usize::try_from(count) {
        Ok(0) => Err(arg(format!("{what}: a length of 0"))),
        Ok(n) if n <= MAX_LEN => Ok(n),
        _ => Err(arg(format!(
            "{what}: a length of {count} elements is more than any buffer can hold"
        ))),
    }
}

/// A tensor over the caller's buffer `b`, used in place, of `shape` if
/// given, else of the buffer's own.
///
/// # Safety
/// `b` describes memory as its docs say, left alone by the caller until
/// the request that uses the tensor is done.
pub(crate) unsafe fn place(
    engine: &Engine,
    b: &PskvBuffer,
    shape: Option<&[usize]>,
    what: &dyn std::fmt::Display,
) -> Result<Tensor, Failure> {
    if b.data.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    let n = count_of(b.count, what)?;
    let dtype = dtype_of(b.dtype, what)?;
    // A 1-D buffer's shape without an allocation (most calls).
    let flat = [n];
    let own = if b.ndim == 0 {
        None
    } else {
        Some(b.dims(n, what)?)
    };
    let shape = shape.or(own.as_deref()).unwrap_or(&flat);
    match b.device_type {
        PSKV_DEVICE_CPU | PSKV_DEVICE_CPU_PINNED => {
            if b.device_id != 0 && b.device_type == PSKV_DEVICE_CPU {
                return Err(arg(format!(
                    "{what}: host memory has device_id 0, not {}",
                    b.device_id
                )));
            }
            // The home is the ticket's to watch (`Tensor::home`).
            let (tensor, _home) = Tensor::from_host_ptr(engine, shape, dtype, b.data as usize)
                .map_err(|e| arg(format!("{what}: {e}")))?;
            Ok(tensor)
        }
        PSKV_DEVICE_GPU => {
            let dev = u32::try_from(b.device_id)
                .map_err(|_| arg(format!("{what}: device {}", b.device_id)))?;
            Tensor::from_device_ptr(engine, shape, dtype, Context::Gpu(dev), b.data as u64)
                .map_err(|e| arg(format!("{what}: {e}")))
        }
        other => Err(arg(format!(
            "{what}: device type {other} (expected 1 CPU, 2 GPU, 3 CPU pinned)"
        ))),
    }
}

/// Calls a C updater on a key's gradient and weight.
pub(crate) fn call_updater(
    f: unsafe extern "C" fn(
        i64,
        *const PskvBuffer,
        *const i64,
        usize,
        *mut PskvBuffer,
        *mut c_void,
    ) -> c_int,
    key: &crate::kvstore::Key,
    grad: &crate::kvstore::Values<'_>,
    weight: &mut crate::kvstore::ValuesMut<'_>,
    user: usize,
) -> Result<(), String> {
    let k = match key {
        crate::kvstore::Key::Int(k) => i64::from(*k),
        other => return Err(format!("a C updater takes integer keys, not {other}")),
    };
    let size = grad.dtype().size() as u64;
    let dtype = grad.dtype().code() as i32;
    let g = PskvBuffer::flat(
        grad.bytes().as_ptr() as *mut c_void,
        grad.bytes().len() as u64 / size,
        dtype,
        PSKV_DEVICE_CPU,
        0,
    );
    let wb = weight.bytes_mut();
    let mut w = PskvBuffer::flat(
        wb.as_mut_ptr() as *mut c_void,
        wb.len() as u64 / size,
        dtype,
        PSKV_DEVICE_CPU,
        0,
    );
    let (rows, nrows) = match grad.rows() {
        Some(r) => (r.as_ptr(), r.len()),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: the buffers are valid for the call (the updater's contract
    // is `pskv_updater`'s docs); `user` is the caller's, passed as it is.
    let rc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        f(k, &g, rows, nrows, &mut w, user as *mut c_void)
    }));
    match rc {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!("the C updater returned {code} for key {k}")),
        Err(p) => Err(format!(
            "the C updater panicked for key {k}: {}",
            super::panic_text(p.as_ref())
        )),
    }
}
