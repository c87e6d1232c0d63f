//! The C ABI (`include/pskv.h`, generated from this file by cbindgen).
//!
//! Every function returns a status: `PSKV_OK` (0) or a negative error code;
//! `pskv_last_error()` then gives the message, for the calling thread. No
//! function aborts the caller: null pointers and bad arguments are errors,
//! and a panic inside pskv is caught and reported as `PSKV_ERR_INTERNAL`.
//!
//! Buffers are float32 and copied: a push's input may be reused as soon as
//! the call returns, and a pull returns once `out` holds the value. The
//! `_device` functions take buffers in GPU memory (a device pointer, a
//! dtype code and a device id) with the same rules; their copies run on
//! the device.
//!
//! A handle is a token, not an address: `pskv_create` registers the store
//! in a table under a number never used again, and every call looks it up.
//! So a handle used after `pskv_free`, freed twice, or made up is an
//! argument error, not a crash; and a store freed while another thread
//! still uses it lives until that call returns.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{Context, Engine};
use crate::kvstore::{DType, Key, KvStore, Optimizer, Tensor};

/// Success.
pub const PSKV_OK: c_int = 0;
/// A null pointer, a bad string or a bad length was passed.
pub const PSKV_ERR_ARGUMENT: c_int = -1;
/// The kvstore refused or failed the operation (unknown key, wrong size,
/// a node that died, ...): see `pskv_last_error`.
pub const PSKV_ERR_KVSTORE: c_int = -2;
/// pskv failed internally (a caught panic): see `pskv_last_error`.
pub const PSKV_ERR_INTERNAL: c_int = -3;

/// A kvstore and the engine it schedules on (opaque to C: a handle is a
/// token for one of these, see the module docs).
pub struct PskvKvStore {
    kv: KvStore,
    _engine: Engine,
}

/// The live stores, by token.
fn stores() -> &'static Mutex<HashMap<usize, Arc<PskvKvStore>>> {
    static STORES: std::sync::OnceLock<Mutex<HashMap<usize, Arc<PskvKvStore>>>> =
        std::sync::OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Tokens: multiples of 16 from 16 up (never 0, never reused, and not
/// mistaken for a small integer cast to a pointer).
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);

/// The largest element count a buffer may have (its bytes must fit an
/// `isize`, as Rust's slices require).
const MAX_LEN: usize = isize::MAX as usize / std::mem::size_of::<f64>();

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let mut m = msg.into();
    m.retain(|c| c != '\0');
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(m).unwrap_or_default());
}

/// Runs `f`, turning its error or panic into a status code.
fn guard(f: impl FnOnce() -> Result<(), (c_int, String)>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => PSKV_OK,
        Ok(Err((code, msg))) => {
            set_error(msg);
            code
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error (panic): {what}"));
            PSKV_ERR_INTERNAL
        }
    }
}

fn arg(msg: impl Into<String>) -> (c_int, String) {
    (PSKV_ERR_ARGUMENT, msg.into())
}

fn kv_err(e: crate::kvstore::KvError) -> (c_int, String) {
    (PSKV_ERR_KVSTORE, e.to_string())
}

/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, (c_int, String)> {
    if p.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| arg(format!("{what} is not UTF-8")))
}

/// The store behind a handle (kept alive for the call).
fn handle(kv: *const PskvKvStore) -> Result<Arc<PskvKvStore>, (c_int, String)> {
    if kv.is_null() {
        return Err(arg("the kvstore handle is a null pointer"));
    }
    stores()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(kv as usize))
        .cloned()
        .ok_or_else(|| {
            arg(format!(
                "{kv:p} is not a live kvstore handle (freed already, or never made by pskv_create)"
            ))
        })
}

/// # Safety
/// `p` is null or points to `len` floats.
unsafe fn floats<'a>(p: *const f32, len: usize, what: &str) -> Result<&'a [f32], (c_int, String)> {
    if p.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    if len == 0 {
        return Err(arg(format!("{what}: a length of 0")));
    }
    if len > MAX_LEN {
        return Err(arg(format!(
            "{what}: a length of {len} elements is more than any buffer can hold"
        )));
    }
    Ok(std::slice::from_raw_parts(p, len))
}

fn key(k: i64) -> Result<Key, (c_int, String)> {
    Key::int(k).map_err(kv_err)
}

/// The message of the calling thread's last error ("" if none). The pointer
/// stays valid until this thread's next failing call.
#[no_mangle]
pub extern "C" fn pskv_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates a kvstore of `kind` ("local", "device", "dist_sync",
/// "dist_async", ...) on an engine of its own, configured from the
/// environment (a distributed kind joins the cluster named by DMLC_*, as
/// set by `pskv launch`). Writes the handle to `*out`.
///
/// # Safety
/// `kind` is a NUL-terminated string; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_create(kind: *const c_char, out: *mut *mut PskvKvStore) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is a null pointer"));
        }
        let kind = string(kind, "kind")?;
        crate::logging::init();
        let engine = Engine::new().map_err(|e| (PSKV_ERR_KVSTORE, e.to_string()))?;
        let kv = KvStore::create(kind, &engine).map_err(kv_err)?;
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed) * 16;
        stores().lock().unwrap_or_else(|p| p.into_inner()).insert(
            token,
            Arc::new(PskvKvStore {
                kv,
                _engine: engine,
            }),
        );
        *out = token as *mut PskvKvStore;
        Ok(())
    })
}

/// Waits for the store's operations, leaves the cluster (rank 0 stops the
/// servers after a barrier) and frees the handle. Null is accepted; a
/// handle freed already is an argument error.
///
/// # Safety
/// Any value may be passed (handles are checked).
#[no_mangle]
pub unsafe extern "C" fn pskv_free(kv: *mut PskvKvStore) -> c_int {
    guard(|| {
        if kv.is_null() {
            return Ok(());
        }
        let h = handle(kv)?;
        stores()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kv as usize));
        h.kv.close().map_err(kv_err)
    })
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
) -> Result<Tensor, (c_int, String)> {
    if ptr.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    if len == 0 || len > MAX_LEN {
        return Err(arg(format!("{what}: a length of {len} elements")));
    }
    let dt = u8::try_from(dtype)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| {
            arg(format!(
                "{what}: dtype code {dtype} (expected 0 float32, 1 float64, 2 float16, 4 int32, 6 int64)"
            ))
        })?;
    let dev = u32::try_from(device).map_err(|_| arg(format!("{what}: device {device}")))?;
    Tensor::from_device_ptr(h.kv.engine(), &[len], dt, Context::Gpu(dev), ptr as u64)
        .map_err(|e| arg(format!("{what}: {e}")))
}

/// Copies `src` to `dst` on the device and waits for the copy (so a
/// buffer of the caller's among them is free again when this returns).
fn device_copy(src: &Tensor, dst: &Tensor) -> Result<(), (c_int, String)> {
    src.copy_to(dst).map_err(kv_err)?;
    dst.wait_to_read().map_err(kv_err)
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
) -> Result<Tensor, (c_int, String)> {
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
    guard(|| {
        let h = handle(kv)?;
        let t = device_input(&h, data, len, dtype, device)?;
        h.kv.init(self::key(key)?, &t).map_err(kv_err)
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
    guard(|| {
        let h = handle(kv)?;
        let t = device_input(&h, data, len, dtype, device)?;
        h.kv.push(self::key(key)?, &[t], priority).map_err(kv_err)
    })
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
        let t = o.zeros_like(o.ctx()).map_err(kv_err)?;
        h.kv.pull(self::key(key)?, std::slice::from_ref(&t), priority)
            .map_err(kv_err)?;
        device_copy(&t, &o)
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
        let r = t.zeros_like(t.ctx()).map_err(kv_err)?;
        h.kv.pushpull(self::key(key)?, &[t], std::slice::from_ref(&r), priority)
            .map_err(kv_err)?;
        device_copy(&r, &o)
    })
}

/// Sets the optimizer the servers (or a local store) run on pushes: `name`
/// is sgd, nag, adam or adagrad; `params` is "" or comma-separated
/// `name=value` pairs with MXNet's names (learning_rate, momentum, wd,
/// rescale_grad, clip_gradient, beta1, beta2, epsilon, begin_num_update),
/// and optionally `lr_scheduler=KIND(name=value;...)` with MXNet's
/// scheduler and argument names, e.g.
/// `learning_rate=0.1,lr_scheduler=factor(step=100;factor=0.9;warmup_steps=10)`
/// or `lr_scheduler=multifactor(step=30:60:90;factor=0.1)`; kinds are
/// factor, multifactor, poly and cosine. MXNet's attributes pass as they
/// are: `lazy_update=1` and AdaGrad's `float_stable_eps` take effect
/// (`lazy_update=0` is refused); `aggregate_num`, `use_fused_step`,
/// `param_idx2name`, `idx2name`, `param_dict` and `sym` are ignored with a
/// logged warning, whatever their value (without a comma).
///
/// Collective, as `pskv_init` and `pskv_barrier`: every worker calls it
/// with the same optimizer; if it fails on one worker it fails on all.
/// Workers in another collective call meanwhile fail with it at once,
/// naming both calls. If some workers never call it (MXNet code that calls
/// it on rank 0 only), the callers fail at `PSKV_KVSTORE_TIMEOUT` saying the
/// others did not make the call; the others' pushes and pulls left waiting
/// fail at their timeout naming the call, and their next collective call
/// fails at once.
///
/// # Safety
/// `kv` is a live handle; `name` and `params` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn pskv_set_optimizer(
    kv: *mut PskvKvStore,
    name: *const c_char,
    params: *const c_char,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let name = string(name, "name")?;
        let params = string(params, "params")?;
        let mut pairs = Vec::new();
        let mut scheduler = None;
        for p in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| arg(format!("optimizer parameter '{p}': expected name=value")))?;
            if k.trim() == "lr_scheduler" {
                if scheduler.is_some() {
                    return Err(arg("lr_scheduler is given twice"));
                }
                let s = pskv_kvstore::LrScheduler::parse(v).map_err(|e| {
                    arg(format!(
                        "{e} (inside KIND(...), separate arguments with ';' and list steps with ':')"
                    ))
                })?;
                scheduler = Some(s);
                continue;
            }
            if Optimizer::IGNORED_MXNET_ATTRIBUTES.contains(&k.trim()) {
                // Its value need not be a number (MXNet's param_idx2name is
                // a dict): it has no meaning here either way.
                tracing::warn!(
                    "optimizer '{name}': MXNet attribute '{}' has no meaning in pskv; ignored",
                    k.trim()
                );
                continue;
            }
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| arg(format!("optimizer parameter '{p}': not a number")))?;
            pairs.push((k.trim(), v));
        }
        let opt = match scheduler {
            Some(s) => Optimizer::create_scheduled(name, &pairs, s),
            None => Optimizer::create(name, &pairs),
        }
        .map_err(kv_err)?;
        h.kv.set_optimizer(opt).map_err(kv_err)
    })
}

/// Waits until every worker reached the barrier.
///
/// # Safety
/// `kv` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn pskv_barrier(kv: *mut PskvKvStore) -> c_int {
    guard(|| handle(kv)?.kv.barrier().map_err(kv_err))
}

/// Writes this worker's rank (0 for a local store) to `*out`.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_rank(kv: *const PskvKvStore, out: *mut c_int) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let o = out.as_mut().ok_or_else(|| arg("out is a null pointer"))?;
        *o = h.kv.rank() as c_int;
        Ok(())
    })
}

/// Writes the number of workers (1 for a local store) to `*out`.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_num_workers(kv: *const PskvKvStore, out: *mut c_int) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let o = out.as_mut().ok_or_else(|| arg("out is a null pointer"))?;
        *o = h.kv.num_workers() as c_int;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: pskv_last_error returns a valid C string.
        unsafe { CStr::from_ptr(pskv_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    /// An 8-byte aligned "device" buffer of the emulated device (whose
    /// device addresses are host addresses) holding `v`.
    fn emulated_buffer(v: &[f32]) -> Vec<u64> {
        let mut w = vec![0u64; v.len().div_ceil(2)];
        bytemuck_f32(&mut w)[..v.len()].copy_from_slice(v);
        w
    }

    fn bytemuck_f32(w: &mut [u64]) -> &mut [f32] {
        // SAFETY: u64 words hold two f32 each, alignment 8 >= 4.
        unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut f32, w.len() * 2) }
    }

    #[test]
    fn device_buffers_through_the_c_abi() {
        if !crate::gpu::device::open(0).is_ok_and(|d| d.is_emulated()) {
            eprintln!(
                "skipped: device 0 is not the emulated device (its addresses are not host memory)"
            );
            return;
        }
        unsafe {
            let mut kv: *mut PskvKvStore = std::ptr::null_mut();
            assert_eq!(pskv_create(c"device".as_ptr(), &mut kv), PSKV_OK);
            let w0 = emulated_buffer(&[1.0, 2.0, 3.0]);
            assert_eq!(
                pskv_init_device(kv, 3, w0.as_ptr().cast(), 3, 0, 0),
                PSKV_OK
            );
            assert_eq!(
                pskv_set_optimizer(kv, c"sgd".as_ptr(), c"learning_rate=0.5".as_ptr()),
                PSKV_OK
            );
            // Two pushes from two devices, pulled onto a third.
            let mut g = emulated_buffer(&[2.0, 2.0, 2.0]);
            assert_eq!(
                pskv_push_device(kv, 3, g.as_ptr().cast(), 3, 0, 1, 0),
                PSKV_OK
            );
            // The values were copied: the buffer may change at once.
            bytemuck_f32(&mut g)[0] = 100.0;
            let mut out = emulated_buffer(&[9.0; 3]);
            assert_eq!(
                pskv_pull_device(kv, 3, out.as_mut_ptr().cast(), 3, 0, 2, 0),
                PSKV_OK
            );
            assert_eq!(&bytemuck_f32(&mut out)[..3], &[0.0, 1.0, 2.0]);
            let mut io = emulated_buffer(&[2.0, 2.0, 2.0]);
            let p = io.as_mut_ptr().cast();
            assert_eq!(pskv_pushpull_device(kv, 3, p, p, 3, 0, 0, 0), PSKV_OK);
            assert_eq!(&bytemuck_f32(&mut io)[..3], &[-1.0, 0.0, 1.0]);

            // Errors, each with its reason.
            let e = |code, what: &str| {
                assert_eq!(code, PSKV_ERR_ARGUMENT, "{what}");
                assert!(last().contains(what), "{what}: {}", last());
            };
            e(
                pskv_push_device(kv, 3, g.as_ptr().cast(), 3, 3, 0, 0),
                "dtype code 3",
            );
            e(
                pskv_push_device(kv, 3, std::ptr::null(), 3, 0, 0, 0),
                "null",
            );
            let odd = (g.as_ptr() as *const u8).add(4).cast();
            e(pskv_push_device(kv, 3, odd, 1, 0, 0, 0), "aligned");
            e(
                pskv_push_device(kv, 3, g.as_ptr().cast(), 3, 0, 99, 0),
                "99",
            );
            e(
                pskv_push_device(kv, 3, g.as_ptr().cast(), 3, 0, -1, 0),
                "device -1",
            );
            assert_eq!(
                pskv_push_device(kv, 3, g.as_ptr().cast(), 2, 0, 0, 0),
                PSKV_ERR_KVSTORE
            );
            assert_eq!(pskv_free(kv), PSKV_OK);
        }
    }

    #[test]
    fn a_local_store_through_the_c_abi() {
        unsafe {
            let mut kv: *mut PskvKvStore = std::ptr::null_mut();
            assert_eq!(pskv_create(c"local".as_ptr(), &mut kv), PSKV_OK);
            let mut r = -1;
            assert_eq!(pskv_rank(kv, &mut r), PSKV_OK);
            assert_eq!(r, 0);
            assert_eq!(pskv_num_workers(kv, &mut r), PSKV_OK);
            assert_eq!(r, 1);
            let v = [1.0f32, 2.0, 3.0];
            assert_eq!(pskv_init(kv, 7, v.as_ptr(), 3), PSKV_OK);
            assert_eq!(
                pskv_set_optimizer(kv, c"sgd".as_ptr(), c"learning_rate=0.5".as_ptr()),
                PSKV_OK
            );
            assert_eq!(pskv_push(kv, 7, [2.0f32, 2.0, 2.0].as_ptr(), 3, 0), PSKV_OK);
            let mut out = [0.0f32; 3];
            assert_eq!(pskv_pull(kv, 7, out.as_mut_ptr(), 3, 0), PSKV_OK);
            assert_eq!(out, [0.0, 1.0, 2.0]);
            let mut io = [2.0f32, 2.0, 2.0];
            assert_eq!(
                pskv_pushpull(kv, 7, io.as_ptr(), io.as_mut_ptr(), 3, 0),
                PSKV_OK
            );
            assert_eq!(io, [-1.0, 0.0, 1.0]);
            assert_eq!(pskv_barrier(kv), PSKV_OK);

            // Errors: codes and messages, never an abort.
            assert_eq!(pskv_pull(kv, 8, out.as_mut_ptr(), 3, 0), PSKV_ERR_KVSTORE);
            assert!(last().contains('8'), "{}", last());
            assert_eq!(pskv_pull(kv, 7, out.as_mut_ptr(), 2, 0), PSKV_ERR_KVSTORE);
            assert_eq!(pskv_push(kv, 7, std::ptr::null(), 3, 0), PSKV_ERR_ARGUMENT);
            assert!(last().contains("null"));
            assert_eq!(pskv_init(kv, -1, v.as_ptr(), 3), PSKV_ERR_KVSTORE);
            assert_eq!(
                pskv_set_optimizer(kv, c"sgd".as_ptr(), c"learning_rate".as_ptr()),
                PSKV_ERR_ARGUMENT
            );
            assert_eq!(
                pskv_set_optimizer(kv, c"rmsprop".as_ptr(), c"".as_ptr()),
                PSKV_ERR_KVSTORE
            );
            assert_eq!(pskv_rank(std::ptr::null(), &mut r), PSKV_ERR_ARGUMENT);

            // A scheduler: the rate halves after every 2 updates.
            assert_eq!(
                pskv_set_optimizer(
                    kv,
                    c"sgd".as_ptr(),
                    c"learning_rate=1,lr_scheduler=factor(step=2;factor=0.5)".as_ptr()
                ),
                PSKV_OK
            );
            assert_eq!(pskv_init(kv, 9, [0.0f32].as_ptr(), 1), PSKV_OK);
            let mut w = [0.0f32];
            for _ in 0..5 {
                assert_eq!(
                    pskv_pushpull(kv, 9, [1.0f32].as_ptr(), w.as_mut_ptr(), 1, 0),
                    PSKV_OK
                );
            }
            // Rates 1, 1, 0.5, 0.5, 0.25.
            assert_eq!(w, [-3.25]);
            assert_eq!(
                pskv_set_optimizer(kv, c"sgd".as_ptr(), c"lr_scheduler=factor(step=0)".as_ptr()),
                PSKV_ERR_ARGUMENT
            );
            assert!(last().contains("step must be at least 1"), "{}", last());
            // Without a learning rate, SGD takes the scheduler's base_lr
            // (as MXNet's create('sgd', lr_scheduler=...) does).
            assert_eq!(
                pskv_set_optimizer(
                    kv,
                    c"sgd".as_ptr(),
                    c"lr_scheduler=factor(step=100;base_lr=0.25)".as_ptr()
                ),
                PSKV_OK
            );
            assert_eq!(pskv_init(kv, 10, [0.0f32].as_ptr(), 1), PSKV_OK);
            assert_eq!(
                pskv_pushpull(kv, 10, [1.0f32].as_ptr(), w.as_mut_ptr(), 1, 0),
                PSKV_OK
            );
            assert_eq!(w, [-0.25]);
            assert_eq!(
                pskv_set_optimizer(
                    kv,
                    c"sgd".as_ptr(),
                    c"lr_scheduler=factor(step=1),lr_scheduler=cosine(max_update=3)".as_ptr()
                ),
                PSKV_ERR_ARGUMENT
            );
            // Settings out of range are refused.
            for p in [
                c"learning_rate=-1",
                c"learning_rate=0.1,momentum=5",
                c"learning_rate=0.1,rescale_grad=0",
            ] {
                assert_eq!(
                    pskv_set_optimizer(kv, c"sgd".as_ptr(), p.as_ptr()),
                    PSKV_ERR_KVSTORE,
                    "{p:?}"
                );
                assert!(last().contains("out of range"), "{}", last());
            }
            assert_eq!(
                pskv_set_optimizer(kv, c"adam".as_ptr(), c"epsilon=0".as_ptr()),
                PSKV_ERR_KVSTORE
            );
            // An MXNet optimizer's attributes pass as they are; a lazy
            // update pskv cannot do is refused.
            assert_eq!(
                pskv_set_optimizer(
                    kv,
                    c"sgd".as_ptr(),
                    c"learning_rate=0.5,lazy_update=1,aggregate_num=4,param_idx2name={0: w}"
                        .as_ptr()
                ),
                PSKV_OK,
                "{}",
                last()
            );
            assert_eq!(
                pskv_set_optimizer(kv, c"sgd".as_ptr(), c"lazy_update=0".as_ptr()),
                PSKV_ERR_KVSTORE
            );
            assert!(last().contains("lazy"), "{}", last());
            // A length no buffer can have: an error, no panic.
            assert_eq!(
                pskv_push(kv, 7, v.as_ptr(), usize::MAX / 4, 0),
                PSKV_ERR_ARGUMENT
            );
            assert!(last().contains("more than any buffer"), "{}", last());
            assert_eq!(pskv_free(kv), PSKV_OK);
            assert_eq!(pskv_free(std::ptr::null_mut()), PSKV_OK);
            // A freed handle, freed again or used: an error, not a crash.
            assert_eq!(pskv_free(kv), PSKV_ERR_ARGUMENT);
            assert!(last().contains("not a live kvstore handle"), "{}", last());
            assert_eq!(pskv_push(kv, 7, v.as_ptr(), 3, 0), PSKV_ERR_ARGUMENT);
            assert_eq!(pskv_rank(kv, &mut r), PSKV_ERR_ARGUMENT);
            let made_up = 0x1234usize as *mut PskvKvStore;
            assert_eq!(pskv_barrier(made_up), PSKV_ERR_ARGUMENT);

            let mut bad: *mut PskvKvStore = std::ptr::null_mut();
            assert_eq!(pskv_create(c"nope".as_ptr(), &mut bad), PSKV_ERR_KVSTORE);
            assert!(last().contains("unknown kvstore type"));
            assert!(bad.is_null());
            assert_eq!(pskv_create(std::ptr::null(), &mut bad), PSKV_ERR_ARGUMENT);
        }
    }
}
