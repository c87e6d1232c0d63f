//! Round trips over a pair of shared-memory rings between two threads
//! (`pskv_transport::shm_ring_round_trips`): the floor under a shm link's
//! round trip, with no reader thread, postoffice or kvstore above it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn rings(c: &mut Criterion) {
    let mut g = c.benchmark_group("shm_ring_round_trip");
    for bytes in [4usize, 4096] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter_custom(|iters| {
                pskv_transport::shm_ring_round_trips(iters, bytes).expect("the rings run")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, rings);
criterion_main!(benches);
