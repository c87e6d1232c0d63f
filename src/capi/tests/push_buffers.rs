//! `pskv_push_buffer` on a local store (where a push buffer is ordinary
//! memory: the shared-memory case runs in `tests/c_abi.rs`, under `pskv
//! launch` over shm), and its misuse.

use super::super::*;
use super::*;

#[test]
fn a_push_buffer_is_the_keys_memory_and_the_same_on_every_call() {
    let kv = create(c"local");
    unsafe {
        let mut none = PskvBuffer::flat(std::ptr::null_mut(), 0, 0, 0, 0);
        expect(
            pskv_push_buffer(kv, 7, &mut none, std::ptr::null_mut()),
            PSKV_ERR_KVSTORE,
            &["7"],
        );
        let mut w = [1.0f64; 5];
        let key = 7i64;
        let init = host(&mut w, PSKV_FLOAT64);
        assert_eq!(pskv_init_batch(kv, 1, &key, &init), PSKV_OK, "{}", last());
        expect(
            pskv_push_buffer(kv, key, std::ptr::null_mut(), std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["out"],
        );
        let (mut b, mut shared) = (none, -1);
        assert_eq!(
            pskv_push_buffer(kv, key, &mut b, &mut shared),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(
            (b.count, b.dtype, b.device_type, b.ndim),
            (5, PSKV_FLOAT64, PSKV_DEVICE_CPU, 0)
        );
        assert_eq!(shared, 0, "a local store has no shared segments");
        let g = std::slice::from_raw_parts_mut(b.data.cast::<f64>(), 5);
        assert_eq!(g, &[0.0; 5], "a push buffer starts zeroed");
        g.copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut again = none;
        assert_eq!(
            pskv_push_buffer(kv, key, &mut again, std::ptr::null_mut()),
            PSKV_OK
        );
        assert_eq!(again.data, b.data, "the same buffer on every call");
        // A push from it (no optimizer: the value is replaced), pulled back.
        let mut req: *mut PskvRequest = std::ptr::null_mut();
        let prio = 0;
        assert_eq!(
            pskv_push_async(kv, 1, &key, &b, &prio, &mut req),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        let mut out = [0.0f64; 5];
        let o = host(&mut out, PSKV_FLOAT64);
        assert_eq!(
            pskv_pull_async(kv, 1, &key, &o, &prio, &mut req),
            PSKV_OK,
            "{}",
            last()
        );
        assert_eq!(pskv_wait(req), PSKV_OK, "{}", last());
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(pskv_free(kv), PSKV_OK);
        expect(
            pskv_push_buffer(kv, key, &mut again, std::ptr::null_mut()),
            PSKV_ERR_ARGUMENT,
            &["handle"],
        );
    }
}
