//! What a call costs through each interface: one push-pull of a 4 B and a
//! 4 MiB key on a `local` store (no network: the interface's own cost
//! shows), waited for, through
//! - the Rust API (`KvStore::pushpull` on tensors made once, then
//!   `wait_to_read` of the output);
//! - the Rust API planned once: the call (`KvStore::plan`, then
//!   `KvStore::issue`) and its ticket (`KvStore::ticket_for`): what a
//!   persistent C request does under the C layer;
//! - the Rust API on the caller's memory (tensors made over it per call,
//!   `KvStore::ticket`: what the C ABI and Python do underneath);
//! - the C ABI (`pskv_pushpull_async` + `pskv_wait` on the caller's
//!   buffers);
//! - the C ABI's persistent request over the same buffers, made once
//!   (`pskv_start` + `pskv_wait`).
//!
//! Python's figure is `python/bench/overhead.py`, on the same store.
//!
//! Run: `cargo bench -p pskv --bench api_overhead`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pskv::capi::*;
use pskv::engine::{Context, Engine};
use pskv::kvstore::{Call, DType, Key, KvStore, Tensor};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pushpull_local");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (name, n) in [("4B", 1usize), ("4MiB", 1 << 20)] {
        let engine = Engine::new().unwrap();
        let kv = KvStore::create("local", &engine).unwrap();
        kv.init(
            0,
            &Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        let v = Tensor::full(&engine, &[n], 1.0f32, Context::Cpu).unwrap();
        let o = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap();
        g.bench_function(format!("rust/{name}"), |b| {
            b.iter(|| {
                kv.pushpull(0, std::slice::from_ref(&v), std::slice::from_ref(&o), 0)
                    .unwrap();
                o.wait_to_read().unwrap();
            })
        });
        let key0: Key = 0u32.into();
        let plan = kv
            .ticket_plan(std::slice::from_ref(&key0), &[v.clone(), o.clone()])
            .unwrap();
        let call = kv
            .plan(
                Call::PushPull,
                0,
                std::slice::from_ref(&v),
                std::slice::from_ref(&o),
                0,
            )
            .unwrap();
        g.bench_function(format!("rust_plan/{name}"), |b| {
            b.iter(|| {
                kv.issue(&call).unwrap();
                let mut t = kv.ticket_for(&plan).unwrap();
                t.wait().unwrap();
            })
        });
        let mut vin = vec![1.0f32; n];
        let mut out = vec![0.0f32; n];
        let key: Key = 0u32.into();
        g.bench_function(format!("rust_in_place/{name}"), |b| {
            b.iter(|| {
                // SAFETY: the buffers are left alone until the ticket is done.
                let (vt, _) = unsafe {
                    Tensor::from_host_ptr(&engine, &[n], DType::F32, vin.as_mut_ptr() as usize)
                }
                .unwrap();
                let (ot, _) = unsafe {
                    Tensor::from_host_ptr(&engine, &[n], DType::F32, out.as_mut_ptr() as usize)
                }
                .unwrap();
                kv.pushpull(0, std::slice::from_ref(&vt), std::slice::from_ref(&ot), 0)
                    .unwrap();
                let mut t = kv.ticket(std::slice::from_ref(&key), &[vt, ot]).unwrap();
                t.wait().unwrap();
            })
        });
        kv.close().unwrap();

        let mut h: *mut PskvKvStore = std::ptr::null_mut();
        // SAFETY: the C ABI's contract: valid pointers, buffers left alone
        // until each request is waited for.
        unsafe {
            assert_eq!(pskv_create(c"local".as_ptr(), &mut h), PSKV_OK);
            let mut w = vec![0.0f32; n];
            let b = |p: &mut Vec<f32>| PskvBuffer {
                data: p.as_mut_ptr().cast(),
                count: n as u64,
                dtype: PSKV_FLOAT32,
                device_type: PSKV_DEVICE_CPU,
                device_id: 0,
                ndim: 0,
                shape: std::ptr::null(),
            };
            assert_eq!(pskv_init_batch(h, 1, &0i64, &b(&mut w)), PSKV_OK);
            let (bv, bo) = (b(&mut vin), b(&mut out));
            g.bench_function(format!("c/{name}"), |bch| {
                bch.iter(|| {
                    let mut req: *mut PskvRequest = std::ptr::null_mut();
                    let rc = pskv_pushpull_async(h, 1, &0i64, &bv, &bo, std::ptr::null(), &mut req);
                    assert_eq!(rc, PSKV_OK);
                    assert_eq!(pskv_wait(req), PSKV_OK);
                })
            });
            let mut preq: *mut PskvRequest = std::ptr::null_mut();
            let rc = pskv_pushpull_persistent(h, 1, &0i64, &bv, &bo, std::ptr::null(), &mut preq);
            assert_eq!(rc, PSKV_OK);
            g.bench_function(format!("c_persistent/{name}"), |bch| {
                bch.iter(|| {
                    assert_eq!(pskv_start(preq), PSKV_OK);
                    assert_eq!(pskv_wait(preq), PSKV_OK);
                })
            });
            assert_eq!(pskv_request_free(preq), PSKV_OK);
            assert_eq!(pskv_free(h), PSKV_OK);
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
