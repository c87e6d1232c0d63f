//! Hot paths of the kvstore, each beside the memory-bandwidth baseline
//! measured in the same run:
//! - optimizer updates on 1M f32 (SGD with momentum, Adam): elements per
//!   second against a copy of the same bytes the update touches;
//! - a local store's push of two devices' 4 MiB values (in host memory)
//!   and pull back (reduce, update, copy out) against the copies alone.
//!
//! `cargo bench -p pskv-kvstore --bench kvstore`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, GradRef, KvStore, Optimizer, Tensor, WeightMut};

const N: usize = 1 << 20;

fn optimizers(c: &mut Criterion) {
    let mut g = c.benchmark_group("optimizer_update_1M_f32");
    g.throughput(Throughput::Elements(N as u64));
    let grad: Vec<f32> = (0..N).map(|i| ((i % 97) as f32 - 48.0) / 100.0).collect();
    for (name, opt, streams) in [
        (
            "sgd_momentum",
            Optimizer::sgd(0.01).momentum(0.9).wd(1e-4),
            5usize,
        ),
        ("adam", Optimizer::adam(0.001).wd(1e-4), 7),
    ] {
        let mut w = vec![0.5f32; N];
        let mut st = None;
        g.bench_function(name, |b| {
            b.iter(|| {
                opt.update(0, WeightMut::F32(&mut w), GradRef::F32(&grad), &mut st)
                    .unwrap();
            })
        });
        // Baseline: copying as many bytes as the update reads and writes
        // (SGD-momentum touches 5 streams of N floats, Adam 7).
        let src = vec![1.0f32; N * streams / 2];
        let mut dst = vec![0.0f32; N * streams / 2];
        g.bench_function(format!("{name}_baseline_copy"), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
            })
        });
    }
    g.finish();
}

fn local_round(c: &mut Criterion) {
    let mut g = c.benchmark_group("local_push_pull_4MiB_2_devices");
    g.throughput(Throughput::Bytes(4 << 20));
    let e = Engine::builder()
        .cpu_threads(2)
        .gpu_threads(1)
        .build()
        .unwrap();
    let n = 1 << 20;
    let kv = KvStore::create("local", &e).unwrap();
    kv.init(
        0,
        &Tensor::zeros(&e, &[n], DType::F32, Context::Cpu).unwrap(),
    )
    .unwrap();
    // Two devices' values in host memory (the device path, GPU tensors,
    // is benches/device.rs).
    let vals = [
        Tensor::full(&e, &[n], 1.0f32, Context::Cpu).unwrap(),
        Tensor::full(&e, &[n], 2.0f32, Context::Cpu).unwrap(),
    ];
    let out = Tensor::zeros(&e, &[n], DType::F32, Context::Cpu).unwrap();
    g.bench_function("push_pull", |b| {
        b.iter(|| {
            kv.push(0, &vals, 0).unwrap();
            kv.pull(0, std::slice::from_ref(&out), 0).unwrap();
            out.wait_to_read().unwrap();
        })
    });
    // Baseline: the memory traffic of the round done directly: sum two
    // buffers into a third, copy it twice (stored value, output).
    let (a, b2) = (vec![1.0f32; n], vec![2.0f32; n]);
    let (mut sum, mut stored, mut o) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    g.bench_function("baseline_sum_and_copies", |b| {
        b.iter(|| {
            for ((s, x), y) in sum.iter_mut().zip(&a).zip(&b2) {
                *s = x + y;
            }
            stored.copy_from_slice(&sum);
            o.copy_from_slice(black_box(&stored));
        })
    });
    g.finish();
}

criterion_group!(benches, optimizers, local_round);
criterion_main!(benches);
