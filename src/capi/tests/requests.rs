//! Requests on the caller's buffers, the store's other calls, and their
//! misuse.

use std::ffi::c_void;

use super::super::*;
use super::*;

#[test]
fn versions() {
    assert_eq!(pskv_abi_version(), PSKV_ABI_VERSION);
    let v = unsafe { CStr::from_ptr(pskv_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
}

/// Many keys per call, each with its priority, in place; waited for by
/// `pskv_wait`, `pskv_test` and `pskv_wait_all`; dtypes other than f32.
#[test]
fn requests_on_a_local_store() {
    let kv = create(c"local");
    unsafe {
        let mut w0 = [1.0f32; 4];
        let mut w1 = [10.0f64; 3];
        let mut w2 = [5i32; 2];
        let keys = [0i64, 1, 2];
        let vals = [
            f32s(&mut w0),
            host(&mut w1, PSKV_FLOAT64),
            host(&mut w2, PSKV_INT32),
        ];
        assert_eq!(
            pskv_init_batch(kv, 3, keys.as_ptr(), vals.as_ptr()),
            PSKV_OK,
            "{}",
            last()
        );
        // The init values were read: they may change now.
        w0 = [0.0; 4];

        // A push of keys 0 and 1 (no optimizer: the push replaces the
        // value), priorities per key.
        let mut g0 = [2.0f32; 4];
        let mut g1 = [3.0f64; 3];
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        let pr = [-1, 5];
        let gs = [f32s(&mut g0), host(&mut g1, PSKV_FLOAT64)];
        assert_eq!(
            pskv_push_async(kv, 2, keys.as_ptr(), gs.as_ptr(), pr.as_ptr(), &mut req),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        // Reported once: the handle is gone.
        expect(
            pskv_wait(req),
            PSKV_ERR_ARGUMENT,
            &["not a live request handle"],
        );
        let mut done = 0;
        expect(
            pskv_test(req, &mut done),
            PSKV_ERR_ARGUMENT,
            &["not a live request"],
        );

        // Pull all three, tested until done.
        let mut o1 = [0.0f64; 3];
        let mut o2 = [0i32; 2];
        let outs = [
            f32s(&mut w0),
            host(&mut o1, PSKV_FLOAT64),
            host(&mut o2, PSKV_INT32),
        ];
        assert_eq!(
            pskv_pull_async(
                kv,
                3,
                keys.as_ptr(),
                outs.as_ptr(),
                std::ptr::null(),
                &mut req
            ),
            PSKV_OK
        );
        let mut done = 0;
        while done == 0 {
            assert_eq!(pskv_test(req, &mut done), PSKV_OK, "{}", last());
        }
        assert_eq!((w0, o1, o2), ([2.0; 4], [3.0; 3], [5, 5]));

        // Push-pull in one buffer, with an optimizer; a key given twice
        // in a push sums its values (MXNet's grouping).
        assert_eq!(
            pskv_set_optimizer(kv, c"sgd".as_ptr(), c"learning_rate=0.5".as_ptr()),
            PSKV_OK
        );
        let mut io = [1.0f32; 4];
        let b = [f32s(&mut io)];
        assert_eq!(
            pskv_pushpull_async(
                kv,
                1,
                keys.as_ptr(),
                b.as_ptr(),
                b.as_ptr(),
                std::ptr::null(),
                &mut req
            ),
            PSKV_OK
        );
        let mut reqs = [req, std::ptr::null_mut()];
        let (mut a, mut c) = ([1.0f32; 4], [1.0f32; 4]);
        let twice = [0i64, 0];
        let ac = [f32s(&mut a), f32s(&mut c)];
        assert_eq!(
            pskv_push_async(
                kv,
                2,
                twice.as_ptr(),
                ac.as_ptr(),
                std::ptr::null(),
                &mut reqs[1]
            ),
            PSKV_OK
        );
        let mut st = [9; 2];
        assert_eq!(
            pskv_wait_all(2, reqs.as_ptr(), st.as_mut_ptr()),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(st, [PSKV_OK; 2]);
        // 2 - 0.5 * 1, then - 0.5 * (1 + 1).
        assert_eq!(io, [1.5; 4]);
        let mut out = [0.0f32; 4];
        let o = [f32s(&mut out)];
        assert_eq!(
            pskv_pull_async(kv, 1, keys.as_ptr(), o.as_ptr(), std::ptr::null(), &mut req),
            PSKV_OK
        );
        assert_eq!(pskv_wait(req), PSKV_OK);
        assert_eq!(out, [0.5; 4]);
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}

/// Rows of a 2-D key in the caller's order, repeats and all.
#[test]
fn row_pulls_in_the_callers_order() {
    let kv = create(c"local");
    unsafe {
        let mut w: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let shape = [4i64, 3];
        let mut b = f32s(&mut w);
        b.ndim = 2;
        b.shape = shape.as_ptr();
        assert_eq!(
            pskv_init_batch(kv, 1, [7i64].as_ptr(), &b),
            PSKV_OK,
            "{}",
            last()
        );
        let ids = [3i64, 0, 3];
        let mut out = [0.0f32; 9];
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        assert_eq!(
            pskv_pull_rows_async(kv, 7, ids.as_ptr(), 3, &f32s(&mut out), 0, &mut req),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        assert_eq!(out, [9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 9.0, 10.0, 11.0]);
        // A row that does not exist fails the request, on its wait.
        let bad = [4i64];
        let mut one = [0.0f32; 3];
        assert_eq!(
            pskv_pull_rows_async(kv, 7, bad.as_ptr(), 1, &f32s(&mut one), 0, &mut req),
            PSKV_OK
        );
        expect(pskv_wait(req), PSKV_ERR_KVSTORE, &["row"]);
        // A 2-D key pulled whole with its shape left out, or given.
        let mut all = [0.0f32; 12];
        let mut ob = f32s(&mut all);
        assert_eq!(
            pskv_pull_async(kv, 1, [7i64].as_ptr(), &ob, std::ptr::null(), &mut req),
            PSKV_OK
        );
        assert_eq!(pskv_wait(req), PSKV_OK);
        assert_eq!(all[11], 11.0);
        let wrong = [3i64, 4];
        ob.ndim = 2;
        ob.shape = wrong.as_ptr();
        expect(
            pskv_pull_async(kv, 1, [7i64].as_ptr(), &ob, std::ptr::null(), &mut req),
            PSKV_ERR_KVSTORE,
            &["shape [4, 3]", "[3, 4]"],
        );
        ob.shape = [5i64, 3].as_ptr();
        expect(
            pskv_pull_async(kv, 1, [7i64].as_ptr(), &ob, std::ptr::null(), &mut req),
            PSKV_ERR_ARGUMENT,
            &["does not hold"],
        );
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}

unsafe extern "C" fn refuse_negative(
    key: i64,
    grad: *const PskvBuffer,
    rows: *const i64,
    nrows: usize,
    weight: *mut PskvBuffer,
    user: *mut c_void,
) -> c_int {
    let (g, w) = (&*grad, &mut *weight);
    assert!(rows.is_null() && nrows == 0);
    let g = std::slice::from_raw_parts(g.data as *const f32, g.count as usize);
    let w = std::slice::from_raw_parts_mut(w.data as *mut f32, w.count as usize);
    if g[0] < 0.0 {
        return 7;
    }
    *(user as *mut i64) += key;
    for (w, g) in w.iter_mut().zip(g) {
        *w -= g;
    }
    0
}

/// A C updater's refusal fails the request it hit, on that request's
/// wait, once; the next request on the key works.
#[test]
fn a_c_updater_and_its_failure_reach_the_request() {
    let kv = create(c"local");
    let mut calls = 0i64;
    unsafe {
        let mut w = [1.0f32; 2];
        assert_eq!(
            pskv_init_batch(kv, 1, [3i64].as_ptr(), &f32s(&mut w)),
            PSKV_OK
        );
        assert_eq!(
            pskv_set_updater(kv, Some(refuse_negative), (&mut calls as *mut i64).cast()),
            PSKV_OK
        );
        expect(
            pskv_set_updater(kv, None, std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["null"],
        );
        let mut g = [-1.0f32; 2];
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        assert_eq!(
            pskv_push_async(
                kv,
                1,
                [3i64].as_ptr(),
                &f32s(&mut g),
                std::ptr::null(),
                &mut req
            ),
            PSKV_OK
        );
        expect(pskv_wait(req), PSKV_ERR_KVSTORE, &["returned 7 for key 3"]);
        let mut io = [0.5f32; 2];
        let b = f32s(&mut io);
        assert_eq!(
            pskv_pushpull_async(kv, 1, [3i64].as_ptr(), &b, &b, std::ptr::null(), &mut req),
            PSKV_OK
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        assert_eq!(io, [0.5; 2]);
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
    assert_eq!(calls, 3);
}

/// Every misuse is an error with a message, never a crash.
#[test]
fn misuse_of_requests_is_an_error() {
    let kv = create(c"local");
    unsafe {
        let mut w = [1.0f32; 4];
        let k = [1i64];
        assert_eq!(pskv_init_batch(kv, 1, k.as_ptr(), &f32s(&mut w)), PSKV_OK);
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        let b = f32s(&mut w);
        let push = |n, keys: *const i64, vals: *const PskvBuffer, req: *mut *mut PskvRequest| {
            pskv_push_async(kv, n, keys, vals, std::ptr::null(), req)
        };
        expect(
            push(1, std::ptr::null(), &b, &mut req),
            PSKV_ERR_ARGUMENT,
            &["keys is a null pointer"],
        );
        expect(
            push(1, k.as_ptr(), std::ptr::null(), &mut req),
            PSKV_ERR_ARGUMENT,
            &["values is a null pointer"],
        );
        expect(
            push(1, k.as_ptr(), &b, std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["request is a null pointer"],
        );
        expect(
            push(0, k.as_ptr(), &b, &mut req),
            PSKV_ERR_ARGUMENT,
            &["0 keys"],
        );
        expect(
            push(1, [9i64].as_ptr(), &b, &mut req),
            PSKV_ERR_KVSTORE,
            &["key 9", "never initialized"],
        );
        expect(
            push(1, [-2i64].as_ptr(), &b, &mut req),
            PSKV_ERR_KVSTORE,
            &["-2"],
        );
        let mut short = [0.0f32; 3];
        expect(
            push(1, k.as_ptr(), &f32s(&mut short), &mut req),
            PSKV_ERR_KVSTORE,
            &["key 1 holds 4 elements", "3 elements"],
        );
        let mut d = [0.0f64; 4];
        expect(
            push(1, k.as_ptr(), &host(&mut d, PSKV_FLOAT64), &mut req),
            PSKV_ERR_KVSTORE,
            &["f32", "f64"],
        );
        let mut h = [0u16; 4];
        expect(
            push(1, k.as_ptr(), &host(&mut h, PSKV_BFLOAT16), &mut req),
            PSKV_ERR_UNSUPPORTED,
            &["bfloat16"],
        );
        expect(
            push(1, k.as_ptr(), &host(&mut h, 3), &mut req),
            PSKV_ERR_ARGUMENT,
            &["dtype code 3"],
        );
        let mut odd = b;
        odd.data = (w.as_mut_ptr() as *mut u8).add(2).cast();
        expect(
            push(1, k.as_ptr(), &odd, &mut req),
            PSKV_ERR_ARGUMENT,
            &["aligned"],
        );
        let mut nul = b;
        nul.data = std::ptr::null_mut();
        expect(
            push(1, k.as_ptr(), &nul, &mut req),
            PSKV_ERR_ARGUMENT,
            &["values[0] is a null pointer"],
        );
        let mut dev = b;
        dev.device_type = 7;
        expect(
            push(1, k.as_ptr(), &dev, &mut req),
            PSKV_ERR_ARGUMENT,
            &["device type 7"],
        );
        let mut huge = b;
        huge.count = u64::MAX;
        expect(
            push(1, k.as_ptr(), &huge, &mut req),
            PSKV_ERR_ARGUMENT,
            &["more than any buffer"],
        );
        let both = [b, b];
        expect(
            pskv_pushpull_async(
                kv,
                2,
                [1i64, 1].as_ptr(),
                both.as_ptr(),
                both.as_ptr(),
                std::ptr::null(),
                &mut req,
            ),
            PSKV_ERR_ARGUMENT,
            &["given twice"],
        );
        expect(
            pskv_pull_rows_async(kv, 1, std::ptr::null(), 1, &b, 0, &mut req),
            PSKV_ERR_ARGUMENT,
            &["row_ids"],
        );
        expect(
            pskv_set_gradient_compression(kv, c"type=3bit".as_ptr()),
            PSKV_ERR_ARGUMENT,
            &["3bit"],
        );
        expect(
            pskv_set_gradient_compression(kv, c"threshold".as_ptr()),
            PSKV_ERR_ARGUMENT,
            &["name=value"],
        );
        let mut n = -1;
        expect(
            pskv_num_dead_nodes(kv, -1, &mut n),
            PSKV_ERR_ARGUMENT,
            &["timeout_sec"],
        );
        assert_eq!(pskv_num_dead_nodes(kv, 1, &mut n), PSKV_OK);
        assert_eq!(n, 0);

        // Handles: made up, waited twice, in a batch with good ones.
        let made_up = 0x4240usize as *mut PskvRequest;
        expect(
            pskv_wait(made_up),
            PSKV_ERR_ARGUMENT,
            &["not a live request handle"],
        );
        expect(
            pskv_wait(std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["null"],
        );
        assert_eq!(push(1, k.as_ptr(), &b, &mut req), PSKV_OK);
        let reqs = [req, made_up, req];
        let mut st = [1; 3];
        expect(
            pskv_wait_all(3, reqs.as_ptr(), st.as_mut_ptr()),
            PSKV_ERR_ARGUMENT,
            &["request 1 of 3"],
        );
        assert_eq!(st, [PSKV_OK, PSKV_ERR_ARGUMENT, PSKV_ERR_ARGUMENT]);
        expect(
            pskv_wait_all(2, std::ptr::null(), std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["requests is a null pointer"],
        );
        assert_eq!(
            pskv_wait_all(0, std::ptr::null(), std::ptr::null_mut()),
            PSKV_OK
        );
        // A store's handle is not a request's, nor the other way round.
        expect(
            pskv_wait(kv.cast()),
            PSKV_ERR_ARGUMENT,
            &["not a live request"],
        );
        assert_eq!(push(1, k.as_ptr(), &b, &mut req), PSKV_OK);
        expect(
            pskv_barrier(req.cast()),
            PSKV_ERR_ARGUMENT,
            &["not a live kvstore"],
        );

        // A store freed with a request in flight: the request is still
        // reported, and the store's handle is dead.
        assert_eq!(pskv_free(kv), PSKV_OK);
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        expect(
            push(1, k.as_ptr(), &b, &mut req),
            PSKV_ERR_ARGUMENT,
            &["not a live kvstore handle"],
        );
    }
}

/// Compression through the C ABI: a `device` store quantizes pushes of
/// float32 keys with error feedback (MXNet's 2-bit arithmetic).
#[test]
fn gradient_compression_through_the_c_abi() {
    let kv = create(c"device");
    unsafe {
        let mut w = [0.0f32; 4];
        assert_eq!(
            pskv_init_batch(kv, 1, [5i64].as_ptr(), &f32s(&mut w)),
            PSKV_OK
        );
        assert_eq!(
            pskv_set_gradient_compression(kv, c"type=2bit, threshold=0.5".as_ptr()),
            PSKV_OK,
            "{}",
            last()
        );
        let mut g = [0.3f32, 0.6, -0.7, 0.1];
        let mut out = [9.0f32; 4];
        assert_eq!(
            pushpull_wait(kv, 5, &mut g, &mut out),
            PSKV_OK,
            "{}",
            last()
        );
        // Quantized: +-threshold where |g + residual| >= threshold, else 0.
        assert_eq!(out, [0.0, 0.5, -0.5, 0.0]);
        // The residual carries over: 0.3 + 0.3 reaches the threshold.
        let mut g2 = [0.3f32, 0.0, 0.0, 0.0];
        assert_eq!(
            pushpull_wait(kv, 5, &mut g2, &mut out),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(out, [0.5, 0.0, 0.0, 0.0]);
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}

/// A batch whose second key fails to issue (compression of a float64
/// key) after its first was issued: the call waits for the first (whose
/// buffers are the caller's again when it returns) and says so, at once,
/// not after the store's timeout.
#[test]
fn a_batch_that_fails_part_way_returns_once_the_issued_part_is_done() {
    let kv = create(c"device");
    unsafe {
        let mut w0 = [0.0f32; 4];
        let mut w1 = [0.0f64; 2];
        let keys = [0i64, 1];
        let inits = [f32s(&mut w0), host(&mut w1, PSKV_FLOAT64)];
        assert_eq!(
            pskv_init_batch(kv, 2, keys.as_ptr(), inits.as_ptr()),
            PSKV_OK
        );
        assert_eq!(
            pskv_set_gradient_compression(kv, c"type=2bit".as_ptr()),
            PSKV_OK,
            "{}",
            last()
        );
        let mut g0 = [1.0f32; 4];
        let mut g1 = [1.0f64; 2];
        let gs = [f32s(&mut g0), host(&mut g1, PSKV_FLOAT64)];
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        let start = std::time::Instant::now();
        let rc = pskv_push_async(
            kv,
            2,
            keys.as_ptr(),
            gs.as_ptr(),
            std::ptr::null(),
            &mut req,
        );
        expect(
            rc,
            PSKV_ERR_KVSTORE,
            &[
                "key 1",
                "the 1 key(s) before it in the batch were issued and are done",
            ],
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}

/// GPU buffers pass straight into requests, used in place (on the
/// emulated device, whose device addresses are host addresses): a
/// push-pull from one device's memory into another's.
#[test]
fn gpu_buffers_in_requests() {
    if !crate::gpu::device::open(0).is_ok_and(|d| d.is_emulated()) {
        eprintln!(
            "skipped: device 0 is not the emulated device (its addresses are not host memory)"
        );
        return;
    }
    let kv = create(c"device");
    unsafe {
        let gpu = |w: &mut Vec<u64>, n: u64, dev: i32| {
            PskvBuffer::flat(w.as_mut_ptr().cast(), n, PSKV_FLOAT32, PSKV_DEVICE_GPU, dev)
        };
        let mut w0 = emulated_buffer(&[1.0, 2.0, 3.0]);
        assert_eq!(
            pskv_init_batch(kv, 1, [4i64].as_ptr(), &gpu(&mut w0, 3, 0)),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(
            pskv_set_optimizer(kv, c"sgd".as_ptr(), c"learning_rate=0.5".as_ptr()),
            PSKV_OK
        );
        let mut g = emulated_buffer(&[2.0, 2.0, 2.0]);
        let mut out = emulated_buffer(&[9.0; 3]);
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        assert_eq!(
            pskv_pushpull_async(
                kv,
                1,
                [4i64].as_ptr(),
                &gpu(&mut g, 3, 1),
                &gpu(&mut out, 3, 2),
                std::ptr::null(),
                &mut req
            ),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        assert_eq!(&bytemuck_f32(&mut out)[..3], &[0.0, 1.0, 2.0]);
        // A GPU buffer misaligned for the device, or of a device that
        // does not exist: errors naming it.
        let mut big = emulated_buffer(&[0.0; 5]);
        let mut odd = gpu(&mut big, 3, 0);
        odd.data = (big.as_mut_ptr() as *mut u8).add(4).cast();
        expect(
            pskv_push_async(kv, 1, [4i64].as_ptr(), &odd, std::ptr::null(), &mut req),
            PSKV_ERR_ARGUMENT,
            &["aligned"],
        );
        let mut far = gpu(&mut g, 3, 99);
        far.device_id = 99;
        expect(
            pskv_push_async(kv, 1, [4i64].as_ptr(), &far, std::ptr::null(), &mut req),
            PSKV_ERR_ARGUMENT,
            &["99"],
        );
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}
