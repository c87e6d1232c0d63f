//! The blocking calls of ABI version 1: float32 buffers copied in and
//! out (`pskv_push` and friends), and GPU memory the same way (`_device`):
//! a push's input may be reused when the call returns, a pull returns once
//! its output holds the value.

use std::ffi::c_int;

use super::buffer::{count_of, place};
use super::store::{handle, PskvKvStore};
use super::{arg, guard, key, kv_err, Failure};
use crate::engine::Context;
use crate::kvstore::{DType, Tensor};

/// # Safety
/// `p` is null or points to `len` floats.
unsafe fn floats<'a>(p: *const f32, len: usize, what: &str) -> Result<&'a [f32], Failure> {
    if p.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    count_of(len as u64, &what)?;
    Ok(std::slice::from_raw_parts(p, len))
}

/// Initializes `key` (0 to 2^32-1) with `len` floats.
///
/// # Safety
/// `kv` is a live handle; `data` points to `len` floats.
#[no_mangle]
pub unsafe extern "C" fn pskv_init(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const f32,
    len: usize,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let v = floats(data, len, "data")?;
        let t = Tensor::from_slice(h.kv.engine(), &[len], v, Context::Cpu).map_err(kv_err)?;
        h.kv.init(self::key(key)?, &t).map_err(kv_err)
    })
}

/// Pushes `len` floats to `key` (copied; returns once scheduled).
///
/// # Safety
/// `kv` is a live handle; `data` points to `len` floats.
#[no_mangle]
pub unsafe extern "C" fn pskv_push(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const f32,
    len: usize,
    priority: c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let v = floats(data, len, "data")?;
        let t = Tensor::from_slice(h.kv.engine(), &[len], v, Context::Cpu).map_err(kv_err)?;
        h.kv.push(self::key(key)?, &[t], priority).map_err(kv_err)
    })
}

/// Pulls `key`'s value into `out` (`len` floats); returns once `out` holds
/// it, after every push of this handle before it.
///
/// # Safety
/// `kv` is a live handle; `out` points to `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pskv_pull(
    kv: *mut PskvKvStore,
    key: i64,
    out: *mut f32,
    len: usize,
    priority: c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        floats(out, len, "out")?;
        let t = Tensor::zeros(h.kv.engine(), &[len], DType::F32, Context::Cpu).map_err(kv_err)?;
        h.kv.pull(self::key(key)?, std::slice::from_ref(&t), priority)
            .map_err(kv_err)?;
        let v = t.to_vec::<f32>().map_err(kv_err)?;
        std::slice::from_raw_parts_mut(out, len).copy_from_slice(&v);
        Ok(())
    })
}

/// Pushes `data` and pulls the result into `out` (one round trip in a
/// distributed store); `data` and `out` may be the same buffer.
///
/// # Safety
/// `kv` is a live handle; `data` and `out` point to `len` floats.
#[no_mangle]
pub unsafe extern "C" fn pskv_pushpull(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const f32,
    out: *mut f32,
    len: usize,
    priority: c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let v = floats(data, len, "data")?;
        floats(out, len, "out")?;
        let e = h.kv.engine();
        let t = Tensor::from_slice(e, &[len], v, Context::Cpu).map_err(kv_err)?;
        let o = Tensor::zeros(e, &[len], DType::F32, Context::Cpu).map_err(kv_err)?;
        h.kv.pushpull(self::key(key)?, &[t], std::slice::from_ref(&o), priority)
            .map_err(kv_err)?;
        let r = o.to_vec::<f32>().map_err(kv_err)?;
        std::slice::from_raw_parts_mut(out, len).copy_from_slice(&r);
        Ok(())
    })
}

/// A device buffer of the caller's: `len` elements of dtype code `dtype`
/// (MXNet's: 0 float32, 1 float64, 2 float16, 4 int32, 6 int64) at
/// `ptr` on GPU `device`, as a tensor over that memory.
///
/// # Safety
/// As `Tensor::from_device_ptr`: the caller's memory is valid on that
/// device and left alone until the tensor's ops are done.
unsafe fn device_tensor(
    h: &PskvKvStore,
    ptr: *const std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
    what: &str,
) -> Result<Tensor, Failure> {
    let b = super::PskvBuffer::flat(
        ptr as *mut std::ffi::c_void,
        len as u64,
        dtype,
        super::PSKV_DEVICE_GPU,
        device,
    );
    place(h.kv.engine(), &b, None, &what)
}

/// Copies `src` to `dst` on the device and waits for the copy (so a
/// buffer of the caller's among them is free again when this returns).
fn device_copy(src: &Tensor, dst: &Tensor) -> Result<(), Failure> {
    src.copy_to(dst).map_err(kv_err)?;
    dst.wait_to_read().map_err(kv_err)
}

/// Runs `f` on a tensor of pskv's like `out` (the caller's device
/// buffer), then copies it into `out` and waits for the copy.
fn through_copy(
    out: &Tensor,
    f: impl FnOnce(&Tensor) -> crate::kvstore::Result<()>,
) -> Result<(), Failure> {
    let t = out.zeros_like(out.ctx()).map_err(kv_err)?;
    f(&t).map_err(kv_err)?;
    device_copy(&t, out)
}

/// A copy of the caller's device buffer `data` in a tensor of pskv's own
/// (on the same device), made before this returns.
///
/// # Safety
/// As `device_tensor`.
unsafe fn device_input(
    h: &PskvKvStore,
    data: *const std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
) -> Result<Tensor, Failure> {
    let d = device_tensor(h, data, len, dtype, device, "data")?;
    let t = d.zeros_like(d.ctx()).map_err(kv_err)?;
    device_copy(&d, &t)?;
    Ok(t)
}

/// Initializes `key` with `len` elements of device memory (see
/// `pskv_push_device` for the arguments).
///
/// # Safety
/// As `pskv_push_device`.
#[no_mangle]
pub unsafe extern "C" fn pskv_init_device(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
) -> c_int {
    let buf = (data, len, dtype, device);
    with_device_input(kv, key, buf, |kv, k, t| kv.init(k, &t))
}

/// Runs `f` on the store, the key and a copy of the caller's device
/// buffer `(data, len, dtype, device)`.
///
/// # Safety
/// As `pskv_push_device`.
unsafe fn with_device_input(
    kv: *mut PskvKvStore,
    key: i64,
    (data, len, dtype, device): (*const std::ffi::c_void, usize, c_int, c_int),
    f: impl FnOnce(&crate::kvstore::KvStore, crate::kvstore::Key, Tensor) -> crate::kvstore::Result<()>,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let t = device_input(&h, data, len, dtype, device)?;
        f(&h.kv, self::key(key)?, t).map_err(kv_err)
    })
}

/// Pushes `len` elements of dtype code `dtype` (MXNet's: 0 float32, 1
/// float64, 2 float16, 4 int32, 6 int64) that live on GPU `device` at
/// `data` (a CUDA device pointer, 8-byte aligned; on the emulated device,
/// `PSKV_GPU=emulated` or no GPU, a host address). The values are copied on
/// the device before the call returns (`data` may then be reused); the
/// push itself is scheduled, as `pskv_push`'s.
///
/// # Safety
/// `kv` is a live handle; `data` is `len` elements of device memory of
/// GPU `device`, not written until the call returns.
#[no_mangle]
pub unsafe extern "C" fn pskv_push_device(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
    priority: c_int,
) -> c_int {
    let buf = (data, len, dtype, device);
    with_device_input(kv, key, buf, |kv, k, t| kv.push(k, &[t], priority))
}

/// Pulls `key`'s value into device memory `out` (as `pskv_push_device`'s
/// `data`); returns once `out` holds it.
///
/// # Safety
/// `kv` is a live handle; `out` is `len` elements of device memory of GPU
/// `device`, not touched by the caller until the call returns.
#[no_mangle]
pub unsafe extern "C" fn pskv_pull_device(
    kv: *mut PskvKvStore,
    key: i64,
    out: *mut std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
    priority: c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let o = device_tensor(&h, out, len, dtype, device, "out")?;
        let k = self::key(key)?;
        through_copy(&o, |t| h.kv.pull(k, std::slice::from_ref(t), priority))
    })
}

/// Pushes device memory `data` and pulls the result into device memory
/// `out` (both as `pskv_push_device`'s `data`; they may be the same).
///
/// # Safety
/// As `pskv_push_device` and `pskv_pull_device`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pskv_pushpull_device(
    kv: *mut PskvKvStore,
    key: i64,
    data: *const std::ffi::c_void,
    out: *mut std::ffi::c_void,
    len: usize,
    dtype: c_int,
    device: c_int,
    priority: c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let o = device_tensor(&h, out, len, dtype, device, "out")?;
        let t = device_input(&h, data, len, dtype, device)?;
        let k = self::key(key)?;
        through_copy(&o, |r| {
            h.kv.pushpull(k, &[t], std::slice::from_ref(r), priority)
        })
    })
}
