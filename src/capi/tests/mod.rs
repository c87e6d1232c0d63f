//! The C ABI called from Rust: each call, its errors, and never an abort.
//! `blocking.rs` the version-1 calls, `requests.rs` the requests and the
//! store's other calls, `persistent.rs` the persistent requests, `push_buffers.rs`
//! `pskv_push_buffer`; the helpers they use are here.

mod blocking;
mod persistent;
mod push_buffers;
mod requests;

use super::*;

pub(super) fn last() -> String {
    // SAFETY: pskv_last_error returns a valid C string.
    unsafe { CStr::from_ptr(pskv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// An 8-byte aligned "device" buffer of the emulated device (whose
/// device addresses are host addresses) holding `v`.
pub(super) fn emulated_buffer(v: &[f32]) -> Vec<u64> {
    let mut w = vec![0u64; v.len().div_ceil(2)];
    bytemuck_f32(&mut w)[..v.len()].copy_from_slice(v);
    w
}

pub(super) fn bytemuck_f32(w: &mut [u64]) -> &mut [f32] {
    // SAFETY: u64 words hold two f32 each, alignment 8 >= 4.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut f32, w.len() * 2) }
}

/// A host buffer descriptor over `v`.
pub(super) fn host<T>(v: &mut [T], dtype: i32) -> PskvBuffer {
    PskvBuffer::flat(
        v.as_mut_ptr().cast(),
        v.len() as u64,
        dtype,
        PSKV_DEVICE_CPU,
        0,
    )
}

pub(super) fn f32s(v: &mut [f32]) -> PskvBuffer {
    host(v, PSKV_FLOAT32)
}

/// Asserts `code` and that the last error mentions each of `words`.
pub(super) fn expect(code: c_int, want: c_int, words: &[&str]) {
    let msg = last();
    assert_eq!(code, want, "{msg}");
    for w in words {
        assert!(msg.contains(w), "'{w}' not in: {msg}");
    }
}

/// A push-pull of key `k` from `v` into `out`, waited for; its status.
pub(super) unsafe fn pushpull_wait(
    kv: *mut PskvKvStore,
    k: i64,
    v: &mut [f32],
    out: &mut [f32],
) -> c_int {
    let mut req: *mut PskvRequest = std::ptr::null_mut();
    let (vb, ob) = (f32s(v), f32s(out));
    let rc = pskv_pushpull_async(kv, 1, &k, &vb, &ob, std::ptr::null(), &mut req);
    if rc != PSKV_OK {
        return rc;
    }
    pskv_wait(req)
}

pub(super) fn create(kind: &CStr) -> *mut PskvKvStore {
    let mut kv: *mut PskvKvStore = std::ptr::null_mut();
    assert_eq!(
        unsafe { pskv_create(kind.as_ptr(), &mut kv) },
        PSKV_OK,
        "{}",
        last()
    );
    kv
}
