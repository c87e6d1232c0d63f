//! Version 1's blocking calls: float32 buffers copied, and device memory.

use super::super::*;
use super::*;

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
                c"learning_rate=0.5,lazy_update=1,aggregate_num=4,param_idx2name={0: w}".as_ptr()
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
