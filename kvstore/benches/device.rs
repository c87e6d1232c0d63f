//! The kvstore's device paths, each beside its own baseline in the same
//! run (on the device `PSKV_GPU` picks: CUDA where there is one, else the
//! emulated device, whose figures are host-memory figures and say nothing
//! of a GPU):
//! - `device_reduce_4x64MiB`: the sum of 4 device buffers of 64 MiB (f32)
//!   that the `device` kind queues for 4 values on one GPU, against a
//!   device-to-device copy of 64 MiB (bytes: the 4 inputs read);
//! - `dist_sync_device_pushpull`: a push-pull of 4 MiB and 32 MiB through
//!   one server on 127.0.0.1, the worker's tensors on GPU 0 (staged through
//!   pinned memory) against the same with host tensors.
//!
//! `cargo bench -p pskv-kvstore --bench device` (CUDA: `--features cuda`,
//! `PSKV_GPU=cuda`; `scripts/gpu-check.sh` builds it for a GPU machine).

use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pskv_engine::{Context, Engine};
use pskv_gpu::device::{self, Device, Lane, SumType};
use pskv_kvstore::{DType, KvStore, Options, Server, Tensor};
use pskv_transport::{Config, Postoffice, Role};

/// Waits for the work queued on `lane` so far.
fn sync(d: &dyn Device, lane: Lane) {
    let (tx, rx) = channel();
    d.then(lane, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the device answered")
        .expect("without an error");
}

fn reduce(c: &mut Criterion) {
    const BYTES: usize = 64 << 20;
    let d = device::open(0).expect("device 0");
    eprintln!("device benches on {}", d.describe());
    let inputs: Vec<_> = (0..4).map(|_| d.alloc(BYTES).unwrap()).collect();
    let out = d.alloc(BYTES).unwrap();
    let mut g = c.benchmark_group("device_reduce_4x64MiB");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(4 * BYTES as u64));
    let dev = &*d;
    g.bench_function("sum_4_inputs", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.sum(Lane::Compute, SumType::F32, &out, &inputs).unwrap();
            }
            sync(dev, Lane::Compute);
            t.elapsed()
        })
    });
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.bench_function("baseline_device_copy", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.copy(Lane::Compute, &inputs[0], 0, &out, 0, BYTES)
                    .unwrap();
            }
            sync(dev, Lane::Compute);
            t.elapsed()
        })
    });
    g.finish();
}

fn config(role: Role, port: u16) -> Config {
    Config::new(role, "127.0.0.1", port, 1, 1).connect_timeout(Duration::from_secs(20))
}

fn dist(c: &mut Criterion) {
    let sched = Postoffice::start(config(Role::Scheduler, 0), None).unwrap();
    let port = sched.local_addr().port();
    let server = std::thread::spawn(move || {
        let e = Engine::builder().cpu_threads(1).build().unwrap();
        let s = Server::start(config(Role::Server, port), e).unwrap();
        s.wait(None).unwrap();
        s.shutdown();
    });
    let e = Engine::new().unwrap();
    let opts = Options {
        transport: Some(config(Role::Worker, port)),
        ..Options::default()
    };
    let kv = KvStore::create_with("dist_sync_device", &e, opts).unwrap();
    let mut g = c.benchmark_group("dist_sync_device_pushpull");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (key, bytes) in [(1, 4usize << 20), (2, 32 << 20)] {
        let n = bytes / 4;
        kv.init(
            key,
            &Tensor::zeros(&e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        g.throughput(Throughput::Bytes(bytes as u64));
        for (name, ctx) in [
            ("gpu_tensors", Context::Gpu(0)),
            ("host_tensors", Context::Cpu),
        ] {
            let grad = Tensor::full(&e, &[n], 1.0f32, ctx).unwrap();
            let out = Tensor::zeros(&e, &[n], DType::F32, ctx).unwrap();
            g.bench_with_input(
                BenchmarkId::new(name, format!("{}MiB", bytes >> 20)),
                &(),
                |b, _| {
                    b.iter(|| {
                        kv.pushpull(
                            key,
                            std::slice::from_ref(&grad),
                            std::slice::from_ref(&out),
                            0,
                        )
                        .unwrap();
                        out.wait_to_read().unwrap();
                    })
                },
            );
        }
    }
    g.finish();
    kv.close().unwrap();
    server.join().unwrap();
    sched.shutdown();
}

criterion_group!(benches, reduce, dist);
criterion_main!(benches);
