//! Persistent requests: made once, started and reported round after
//! round on the same buffers, and their misuse.

use super::super::*;
use super::*;

/// The elements at a buffer's pointer: the test's only access to memory
/// that pskv holds between calls (the arrays themselves are not touched
/// once their pointers are given out).
unsafe fn view<'a, T>(b: &PskvBuffer) -> &'a mut [T] {
    std::slice::from_raw_parts_mut(b.data.cast(), b.count as usize)
}

/// A persistent push-pull of two keys (two dtypes), started round after
/// round with new values in the same buffers, reported by `pskv_wait`,
/// `pskv_test` and `pskv_wait_all`; a persistent push and pull beside it,
/// started together by `pskv_start_all`.
#[test]
fn persistent_requests_round_after_round() {
    let kv = create(c"local");
    unsafe {
        let mut w0 = [0.0f32; 4];
        let mut w1 = [0.0f64; 2];
        let mut w2 = [0i32; 3];
        let keys = [0i64, 1, 2];
        let inits = [
            f32s(&mut w0),
            host(&mut w1, PSKV_FLOAT64),
            host(&mut w2, PSKV_INT32),
        ];
        assert_eq!(
            pskv_init_batch(kv, 3, keys.as_ptr(), inits.as_ptr()),
            PSKV_OK
        );
        let mut g0 = [0.0f32; 4];
        let mut g1 = [0.0f64; 2];
        let mut o0 = [0.0f32; 4];
        let mut o1 = [0.0f64; 2];
        let vals = [f32s(&mut g0), host(&mut g1, PSKV_FLOAT64)];
        let outs = [f32s(&mut o0), host(&mut o1, PSKV_FLOAT64)];
        let prios = [-1, 3];
        let mut pp: *mut PskvRequest = std::ptr::null_mut();
        assert_eq!(
            pskv_pushpull_persistent(
                kv,
                2,
                keys.as_ptr(),
                vals.as_ptr(),
                outs.as_ptr(),
                prios.as_ptr(),
                &mut pp
            ),
            PSKV_OK,
            "{}",
            last()
        );
        // Made, not started: nothing moved.
        assert_eq!(view::<f32>(&outs[0]), [0.0; 4]);
        for round in 1..=5 {
            // No optimizer: a push replaces the value, the pull returns it.
            view::<f32>(&vals[0]).fill(round as f32);
            view::<f64>(&vals[1]).fill(-(round as f64));
            assert_eq!(pskv_start(pp), PSKV_OK, "{}", last());
            if round % 2 == 0 {
                let mut done = 0;
                while done == 0 {
                    assert_eq!(pskv_test(pp, &mut done), PSKV_OK, "{}", last());
                }
            } else {
                assert_eq!(pskv_wait(pp), PSKV_OK, "{}", last());
            }
            assert_eq!(view::<f32>(&outs[0]), [round as f32; 4], "round {round}");
            assert_eq!(view::<f64>(&outs[1]), [-(round as f64); 2], "round {round}");
        }

        // A persistent push of key 2 and a pull of it, started together.
        let mut g2 = [7i32; 3];
        let mut o2 = [0i32; 3];
        let (b2, ob2) = (host(&mut g2, PSKV_INT32), host(&mut o2, PSKV_INT32));
        let (mut push, mut pull): (*mut PskvRequest, *mut PskvRequest) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        assert_eq!(
            pskv_push_persistent(kv, 1, &keys[2], &b2, std::ptr::null(), &mut push),
            PSKV_OK
        );
        assert_eq!(
            pskv_pull_persistent(kv, 1, &keys[2], &ob2, std::ptr::null(), &mut pull),
            PSKV_OK
        );
        for round in 0..3 {
            view::<i32>(&b2).fill(round * 10);
            let both = [push, pull];
            assert_eq!(pskv_start_all(2, both.as_ptr()), PSKV_OK, "{}", last());
            let mut st = [9, 9];
            assert_eq!(
                pskv_wait_all(2, both.as_ptr(), st.as_mut_ptr()),
                PSKV_OK,
                "{}",
                last()
            );
            assert_eq!(st, [PSKV_OK; 2]);
            // The pull was issued after the push: it sees it.
            assert_eq!(view::<i32>(&ob2), [round * 10; 3]);
        }
        for r in [pp, push, pull] {
            assert_eq!(pskv_request_free(r), PSKV_OK, "{}", last());
        }
        assert_eq!(pskv_free(kv), PSKV_OK);
    }
}

/// Every misuse of a persistent request is an argument error with a
/// message, never a crash; a start refused part way leaves it inactive.
#[test]
fn misuse_of_persistent_requests_is_an_error() {
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
        let mut g = [1.0f32; 4];
        let b = f32s(&mut g);
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        let make = |n, keys: *const i64, vals: *const PskvBuffer, req: *mut *mut PskvRequest| {
            pskv_push_persistent(kv, n, keys, vals, std::ptr::null(), req)
        };
        // Bad arguments are refused when the request is made.
        expect(
            make(1, keys.as_ptr(), &b, std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["request is a null pointer"],
        );
        expect(
            make(1, keys.as_ptr(), std::ptr::null(), &mut req),
            PSKV_ERR_ARGUMENT,
            &["values is a null pointer"],
        );
        expect(
            make(0, keys.as_ptr(), &b, &mut req),
            PSKV_ERR_ARGUMENT,
            &["0 keys"],
        );
        let mut short = [0.0f32; 3];
        expect(
            make(1, keys.as_ptr(), &f32s(&mut short), &mut req),
            PSKV_ERR_KVSTORE,
            &["key 0 holds 4 elements", "3 elements"],
        );
        expect(
            make(1, [9i64].as_ptr(), &b, &mut req),
            PSKV_ERR_KVSTORE,
            &["key 9", "never initialized"],
        );
        expect(
            pskv_pushpull_persistent(
                kv,
                1,
                keys.as_ptr(),
                &b,
                &b,
                std::ptr::null(),
                std::ptr::null_mut(),
            ),
            PSKV_ERR_ARGUMENT,
            &["request is a null pointer"],
        );
        expect(
            pskv_pull_persistent(
                0x4240usize as *mut PskvKvStore,
                1,
                keys.as_ptr(),
                &b,
                std::ptr::null(),
                &mut req,
            ),
            PSKV_ERR_ARGUMENT,
            &["not a live kvstore handle"],
        );

        assert_eq!(make(1, keys.as_ptr(), &b, &mut req), PSKV_OK, "{}", last());
        // Not started: nothing to wait for or test.
        expect(pskv_wait(req), PSKV_ERR_ARGUMENT, &["not started"]);
        let mut done = 0;
        expect(
            pskv_test(req, &mut done),
            PSKV_ERR_ARGUMENT,
            &["not started"],
        );
        // Started: not again, and not freed, until reported.
        assert_eq!(pskv_start(req), PSKV_OK, "{}", last());
        expect(pskv_start(req), PSKV_ERR_ARGUMENT, &["started already"]);
        expect(
            pskv_request_free(req),
            PSKV_ERR_ARGUMENT,
            &["is started", "wait for it"],
        );
        let twice = [req, req];
        expect(
            pskv_start_all(2, twice.as_ptr()),
            PSKV_ERR_ARGUMENT,
            &["request 0 of 2", "started already"],
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        expect(pskv_wait(req), PSKV_ERR_ARGUMENT, &["not started"]);
        expect(
            pskv_start_all(1, std::ptr::null()),
            PSKV_ERR_ARGUMENT,
            &["requests is a null pointer"],
        );

        // A request of a pskv_*_async call is not persistent.
        let mut once: *mut PskvRequest = std::ptr::null_mut();
        assert_eq!(
            pskv_push_async(kv, 1, keys.as_ptr(), &b, std::ptr::null(), &mut once),
            PSKV_OK
        );
        expect(pskv_start(once), PSKV_ERR_ARGUMENT, &["not persistent"]);
        expect(
            pskv_request_free(once),
            PSKV_ERR_ARGUMENT,
            &["not persistent"],
        );
        assert_eq!(pskv_wait(once), PSKV_OK);

        // Freed: the handle is gone; null is accepted.
        assert_eq!(pskv_request_free(req), PSKV_OK, "{}", last());
        expect(
            pskv_start(req),
            PSKV_ERR_ARGUMENT,
            &["not a live request handle"],
        );
        expect(
            pskv_request_free(req),
            PSKV_ERR_ARGUMENT,
            &["not a live request handle"],
        );
        assert_eq!(pskv_request_free(std::ptr::null_mut()), PSKV_OK);

        // A start refused part way (compression of a float64 key): the error
        // names the key once the part issued is done, and the request is
        // inactive again.
        assert_eq!(
            pskv_set_gradient_compression(kv, c"type=2bit".as_ptr()),
            PSKV_OK
        );
        let mut g1 = [1.0f64; 2];
        let gs = [f32s(&mut g), host(&mut g1, PSKV_FLOAT64)];
        assert_eq!(make(2, keys.as_ptr(), gs.as_ptr(), &mut req), PSKV_OK);
        for _ in 0..2 {
            expect(
                pskv_start(req),
                PSKV_ERR_KVSTORE,
                &[
                    "key 1",
                    "the 1 key(s) before it in the batch were issued and are done",
                ],
            );
            expect(pskv_wait(req), PSKV_ERR_ARGUMENT, &["not started"]);
        }
        assert_eq!(pskv_request_free(req), PSKV_OK, "{}", last());

        // A request that outlives its store: a start is an error, not a
        // crash; it is still freed.
        assert_eq!(make(1, keys.as_ptr(), &b, &mut req), PSKV_OK);
        assert_eq!(pskv_free(kv), PSKV_OK);
        expect(
            pskv_start(req),
            PSKV_ERR_ARGUMENT,
            &["the persistent request's store was freed"],
        );
        assert_eq!(pskv_request_free(req), PSKV_OK, "{}", last());
    }
}
