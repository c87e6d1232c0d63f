//! Input bandwidth of the CPU kernels on 64 MiB of f32, beside a memcpy of
//! the same size measured in the same run, single- and multi-threaded.
//!
//! Run: `cargo bench -p pskv-gpu --bench kernels`
//! (GPU kernels: `--features cuda`, on a machine with a GPU.)
//!
//! "Input bytes" per kernel: quantize reads 64 MiB of gradient (its residual
//! is read and written too); dequantize produces 64 MiB of f32 from 4 MiB
//! (2-bit) or 2 MiB (1-bit) of codes and is reported on the 64 MiB it writes;
//! dequantize-and-add reads and writes those 64 MiB, reported the same way;
//! sum reads two 64 MiB inputs (128 MiB); memcpy reads 64 MiB.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::{layout, Kernels};
use rayon::prelude::*;

const N: usize = 16 << 20; // 16 Mi f32 = 64 MiB
const BYTES: u64 = (N * 4) as u64;

fn data(seed: u32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let variants = [
        ("1thread", CpuKernels::single_threaded()),
        ("threads", CpuKernels::with_threads(threads).unwrap()),
    ];
    let a = data(1);
    let b = data(2);
    let mut out = vec![0.0f32; N];
    let mut residual = vec![0.0f32; N];
    let mut codes2 = vec![0u32; layout::words_2bit(N)];
    let mut codes1 = vec![0u32; layout::words_1bit(N)];
    // Codes of real data, for the dequantize benches run alone (a filter).
    let k1 = CpuKernels::single_threaded();
    k1.quantize_2bit(&a, &mut residual, &mut codes2, 0.25)
        .unwrap();
    k1.quantize_1bit(&a, &mut residual, &mut codes1, 0.0)
        .unwrap();

    let mut g = c.benchmark_group("cpu_64MiB");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (name, k) in &variants {
        let label = if *name == "threads" {
            format!("{threads}threads")
        } else {
            name.to_string()
        };
        g.throughput(Throughput::Bytes(BYTES));
        g.bench_function(BenchmarkId::new("memcpy", &label), |bch| {
            bch.iter(|| match k.threads() {
                1 => out.copy_from_slice(black_box(&a)),
                t => {
                    let chunk = N.div_ceil(t);
                    out.par_chunks_mut(chunk)
                        .zip(a.par_chunks(chunk))
                        .for_each(|(o, i)| o.copy_from_slice(i))
                }
            })
        });
        g.bench_function(BenchmarkId::new("quantize_2bit", &label), |bch| {
            bch.iter(|| {
                k.quantize_2bit(black_box(&a), &mut residual, &mut codes2, 0.25)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("dequantize_2bit", &label), |bch| {
            bch.iter(|| {
                k.dequantize_2bit(black_box(&codes2), &mut out, 0.25)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("quantize_1bit", &label), |bch| {
            bch.iter(|| {
                k.quantize_1bit(black_box(&a), &mut residual, &mut codes1, 0.0)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("dequantize_1bit", &label), |bch| {
            bch.iter(|| k.dequantize_1bit(black_box(&codes1), &mut out).unwrap())
        });
        g.bench_function(BenchmarkId::new("add_dequantized_2bit", &label), |bch| {
            bch.iter(|| {
                k.add_dequantized_2bit(black_box(&codes2), &mut out, 0.25)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("add_dequantized_1bit", &label), |bch| {
            bch.iter(|| {
                k.add_dequantized_1bit(black_box(&codes1), &mut out)
                    .unwrap()
            })
        });
        g.throughput(Throughput::Bytes(2 * BYTES));
        g.bench_function(BenchmarkId::new("sum_2_inputs", &label), |bch| {
            bch.iter(|| k.sum(&mut out[..], &[black_box(&a[..]), &b[..]]).unwrap())
        });
    }
    g.finish();
}

/// The CUDA kernels on 64 MiB, beside a device-to-device copy of 64 MiB in
/// the same run (the device's copy bandwidth). Skipped, with a line saying
/// why, where there is no GPU.
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use pskv_gpu::cuda::CudaKernels;
    use std::time::Instant;
    let k = match CudaKernels::new(0) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cuda benches skipped: {e}");
            return;
        }
    };
    eprintln!("cuda benches on {}", k.describe());
    let a = k.upload(&data(1)).unwrap();
    let b = k.upload(&data(2)).unwrap();
    let mut out = k.zeros::<f32>(N).unwrap();
    let mut residual = k.zeros::<f32>(N).unwrap();
    let mut codes2 = k.zeros::<u32>(layout::words_2bit(N)).unwrap();
    let mut codes1 = k.zeros::<u32>(layout::words_1bit(N)).unwrap();
    let mut g = c.benchmark_group("cuda_64MiB");
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    // Time `iters` launches, then wait for the stream: device time.
    macro_rules! timed {
        ($name:expr, $bytes:expr, $body:expr) => {
            g.throughput(Throughput::Bytes($bytes));
            g.bench_function($name, |bch| {
                bch.iter_custom(|iters| {
                    k.synchronize().unwrap();
                    let start = Instant::now();
                    for _ in 0..iters {
                        $body;
                    }
                    k.synchronize().unwrap();
                    start.elapsed()
                })
            });
        };
    }
    timed!("device_copy", BYTES, k.copy(&a, &mut out).unwrap());
    timed!(
        "quantize_2bit",
        BYTES,
        k.quantize_2bit(&a, &mut residual, &mut codes2, 0.25)
            .unwrap()
    );
    timed!(
        "dequantize_2bit",
        BYTES,
        k.dequantize_2bit(&codes2, &mut out, 0.25).unwrap()
    );
    timed!(
        "quantize_1bit",
        BYTES,
        k.quantize_1bit(&a, &mut residual, &mut codes1, 0.0)
            .unwrap()
    );
    timed!(
        "dequantize_1bit",
        BYTES,
        k.dequantize_1bit(&codes1, &mut out).unwrap()
    );
    timed!(
        "add_dequantized_2bit",
        BYTES,
        k.add_dequantized_2bit(&codes2, &mut out, 0.25).unwrap()
    );
    timed!(
        "add_dequantized_1bit",
        BYTES,
        k.add_dequantized_1bit(&codes1, &mut out).unwrap()
    );
    timed!(
        "sum_2_inputs",
        2 * BYTES,
        k.sum(&mut out, &[&a, &b]).unwrap()
    );
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, bench, bench_cuda);
criterion_main!(benches);
