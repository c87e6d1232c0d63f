//! `pskv_transport::copy::copy` at a slow distance of `rep movsb` (the
//! destination 16 bytes past the source modulo a page: a page-aligned
//! shared-memory slot into a heap buffer), against `memcpy` at that
//! distance and at distance 0 (the speed the copy should reach). 4 MiB
//! copied a sample, in pieces of 64 KiB and 256 KiB (two sizes in the block
//! copy's range), between buffers that stay in the last-level cache.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TOTAL: usize = 4 << 20;
const PAGE: usize = 4096;

/// A buffer with room for `len` bytes from a page boundary on, and that
/// boundary's offset in it (it over-allocates by two pages: room for the
/// skew past the boundary too). Filled with ones, not zeros: a zeroed
/// vector's pages would all be the kernel's one zero page until written,
/// and reads of it would come from cache.
fn page_aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![1u8; len + 2 * PAGE];
    let at = (PAGE - v.as_ptr() as usize % PAGE) % PAGE;
    (v, at)
}

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_4mib");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    let (src, s0) = page_aligned(TOTAL);
    let (mut dst, d0) = page_aligned(TOTAL);
    let src = &src[s0..s0 + TOTAL];
    for piece in [64usize << 10, 256 << 10] {
        for (name, skew, ours) in [
            ("copy_at_16", 16usize, true),
            ("memcpy_at_16", 16, false),
            ("memcpy_at_0", 0, false),
        ] {
            let id = BenchmarkId::new(name, format!("{}KiB", piece >> 10));
            g.bench_function(id, |b| {
                b.iter(|| {
                    let out = &mut dst[d0 + skew..d0 + skew + TOTAL];
                    for (o, i) in out.chunks_mut(piece).zip(src.chunks(piece)) {
                        if ours {
                            pskv_transport::copy::copy(o, i);
                        } else {
                            o.copy_from_slice(i);
                        }
                    }
                    std::hint::black_box(&mut dst[d0]);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, copies);
criterion_main!(benches);
