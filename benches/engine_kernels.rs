//! The engine scheduling real kernel work: for each of 16 keys, sum four
//! "device" gradients (4 MiB each) and 2-bit quantize the sum with the key's
//! residual — the worker side of a compressed push. Three ways, same run:
//! the engine (ops per key, ordered by their vars, spread over its workers);
//! a plain loop on one thread; the kernels' own thread split inside one
//! thread's loop.
//!
//! Run: `cargo bench -p pskv --bench engine_kernels`

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parking_lot::Mutex;
use pskv::engine::{Engine, OpSpec, Var};
use pskv::gpu::cpu::CpuKernels;
use pskv::gpu::{layout, Kernels};

const KEYS: usize = 16;
const DEVICES: usize = 4;
const N: usize = 1 << 20; // 4 MiB of f32 per device per key

struct Key {
    grads: Vec<Arc<Vec<f32>>>,
    merged: Arc<Mutex<Vec<f32>>>,
    residual: Arc<Mutex<Vec<f32>>>,
    codes: Arc<Mutex<Vec<u32>>>,
    grad_vars: Vec<Var>,
    merged_var: Var,
    codes_var: Var,
}

fn keys() -> Vec<Key> {
    (0..KEYS)
        .map(|k| Key {
            grads: (0..DEVICES)
                .map(|d| {
                    Arc::new(
                        (0..N)
                            .map(|i| ((i * 31 + k * 7 + d) % 1000) as f32 / 1000.0 - 0.5)
                            .collect(),
                    )
                })
                .collect(),
            merged: Arc::new(Mutex::new(vec![0.0; N])),
            residual: Arc::new(Mutex::new(vec![0.0; N])),
            codes: Arc::new(Mutex::new(vec![0; layout::words_2bit(N)])),
            grad_vars: (0..DEVICES).map(|_| Var::new()).collect(),
            merged_var: Var::new(),
            codes_var: Var::new(),
        })
        .collect()
}

fn step(k: &CpuKernels, key: &Key) {
    let ins: Vec<&[f32]> = key.grads.iter().map(|g| &g[..]).collect();
    let mut merged = key.merged.lock();
    k.sum(&mut merged[..], &ins).unwrap();
    k.quantize_2bit(
        &merged,
        &mut key.residual.lock(),
        &mut key.codes.lock(),
        0.25,
    )
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let ks = keys();
    let mut g = c.benchmark_group("push_path_16_keys_x_4_devices_x_4MiB");
    g.sample_size(10)
        .throughput(Throughput::Bytes((KEYS * DEVICES * N * 4) as u64));

    let one = CpuKernels::single_threaded();
    g.bench_function("loop_1thread", |b| {
        b.iter(|| ks.iter().for_each(|key| step(&one, key)))
    });

    let split = CpuKernels::with_threads(2).unwrap();
    g.bench_function("loop_kernel_split_2threads", |b| {
        b.iter(|| ks.iter().for_each(|key| step(&split, key)))
    });

    let engine = Engine::builder().cpu_threads(2).build().unwrap();
    g.bench_function("engine_2workers", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for (i, key) in ks.iter().enumerate() {
                    let (grads, merged) = (key.grads.clone(), key.merged.clone());
                    engine
                        .push_sync(
                            OpSpec::new("reduce")
                                .reads(&key.grad_vars)
                                .write(&key.merged_var)
                                .priority(-(i as i32)),
                            move |_| {
                                let ins: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
                                Ok(CpuKernels::single_threaded()
                                    .sum(&mut merged.lock()[..], &ins)?)
                            },
                        )
                        .unwrap();
                    let (merged, residual, codes) =
                        (key.merged.clone(), key.residual.clone(), key.codes.clone());
                    engine
                        .push_sync(
                            OpSpec::new("quantize")
                                .read(&key.merged_var)
                                .write(&key.codes_var)
                                .priority(-(i as i32)),
                            move |_| {
                                let k = CpuKernels::single_threaded();
                                Ok(k.quantize_2bit(
                                    &merged.lock(),
                                    &mut residual.lock(),
                                    &mut codes.lock(),
                                    0.25,
                                )?)
                            },
                        )
                        .unwrap();
                }
                engine.wait_for_all().unwrap();
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
