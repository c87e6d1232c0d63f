//! Tickets and the caller's memory used in place: a request's ticket is
//! done when its ops are and pskv holds the memory no longer; a failure is
//! reported on the ticket of the request it hit, once, and the key works
//! again; results land in the caller's memory, also when the input and the
//! output are one buffer.

use std::time::Duration;

use pskv_engine::Context;
use pskv_kvstore::{Call, DType, Key, KvStore, Options, Tensor, Ticket};
use pskv_transport::VanKind;

mod common;
use common::*;

/// A tensor over `v`, used in place.
fn over(e: &pskv_engine::Engine, v: &mut [f32]) -> Tensor {
    // SAFETY: every test leaves `v` alone until the ticket of the request
    // that uses it is done.
    unsafe { Tensor::from_host_ptr(e, &[v.len()], DType::F32, v.as_mut_ptr() as usize) }
        .unwrap()
        .0
}

/// A test's store settings: a 30 s timeout, and keys of 1,000 elements
/// and more split over both servers.
fn split_at_1000() -> Options {
    Options {
        timeout: Duration::from_secs(30),
        bigarray_bound: 1000,
        ..Options::default()
    }
}

/// Initializes keys 0, 1, ... to f32 zeros of `sizes` elements; the keys.
fn init_zeros(kv: &KvStore, e: &pskv_engine::Engine, sizes: &[usize]) -> Vec<Key> {
    let keys: Vec<Key> = (0..sizes.len() as u32).map(Key::from).collect();
    for (k, &n) in keys.iter().zip(sizes) {
        kv.init(
            k.clone(),
            &Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
    }
    keys
}

/// An update rule that adds the gradient, and refuses one whose first
/// element is negative.
fn add_unless_negative(
    _: &Key,
    g: &pskv_kvstore::Values<'_>,
    w: &mut pskv_kvstore::ValuesMut<'_>,
) -> Result<(), String> {
    let g = g.as_slice::<f32>().unwrap();
    if g[0] < 0.0 {
        return Err("negative gradient".into());
    }
    for (w, g) in w.as_mut_slice::<f32>().unwrap().iter_mut().zip(g) {
        *w += g;
    }
    Ok(())
}

fn wait(mut t: Ticket) -> pskv_kvstore::Result<()> {
    t.wait()
}

#[test]
fn a_local_ticket_reports_its_own_failure_once_and_the_key_works_again() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.init(1, &tensor(&e, &[1.0f32, 2.0])).unwrap();
    kv.set_updater(add_unless_negative).unwrap();
    let k: Key = 1u32.into();

    // A push that fails: its ticket says so, once.
    let mut bad = [-1.0f32, 0.0];
    let g = over(&e, &mut bad);
    kv.push(1, std::slice::from_ref(&g), 0).unwrap();
    let mut t = kv.ticket(std::slice::from_ref(&k), &[g]).unwrap();
    let err = t.wait().unwrap_err().to_string();
    assert!(err.contains("negative gradient"), "{err}");
    assert!(t.wait().unwrap_err().to_string().contains("taken already"));

    // The key works again, and the next request's ticket is clean.
    let mut good = [1.0f32, 1.0];
    let mut out = [0.0f32; 2];
    let (g, o) = (over(&e, &mut good), over(&e, &mut out));
    kv.pushpull(1, std::slice::from_ref(&g), std::slice::from_ref(&o), 0)
        .unwrap();
    let t = kv.ticket(std::slice::from_ref(&k), &[g, o]).unwrap();
    wait(t).unwrap();
    assert_eq!(out, [2.0, 3.0]);
    // Nothing left for the engine to report.
    e.wait_for_all().unwrap();
    kv.close().unwrap();
}

#[test]
fn a_ticket_is_done_only_when_pskv_lets_go_of_the_memory() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.init(2, &tensor(&e, &[0.0f32; 3])).unwrap();
    let mut v = [1.0f32, 2.0, 3.0];
    let (g, home) =
        unsafe { Tensor::from_host_ptr(&e, &[3], DType::F32, v.as_mut_ptr() as usize) }.unwrap();
    kv.push(2, std::slice::from_ref(&g), 0).unwrap();
    // A clone held elsewhere (as a message in flight would hold it).
    let held = g.clone();
    let mut t = kv.ticket(&[2u32.into()], &[g]).unwrap();
    let err = t
        .wait_for(Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(err.contains("timed out"), "{err}");
    assert!(!t.is_done() && !home.is_released());
    drop(held);
    assert!(t.is_done() && home.is_released());
    t.wait().unwrap();
    let out = Tensor::zeros(&e, &[3], DType::F32, Context::Cpu).unwrap();
    kv.pull(2, std::slice::from_ref(&out), 0).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), v);
    kv.close().unwrap();
}

#[test]
fn misaligned_or_null_memory_is_refused() {
    let e = engine();
    let mut v = [0u64; 2];
    let odd = (v.as_mut_ptr() as usize) + 2;
    let err = unsafe { Tensor::from_host_ptr(&e, &[1], DType::F32, odd) }.unwrap_err();
    assert!(err.to_string().contains("aligned"), "{err}");
    assert!(unsafe { Tensor::from_host_ptr(&e, &[1], DType::F32, 0) }.is_err());
    // f16 needs only 2 bytes.
    assert!(unsafe { Tensor::from_host_ptr(&e, &[1], DType::F16, odd) }.is_ok());
}

/// Pushpull of many keys in place over two workers: in one buffer (input
/// and output alike) and in two; the sums are exact, every ticket done.
#[test]
fn dist_requests_in_place_sum_over_workers() {
    for van in [VanKind::Tcp, VanKind::Shm] {
        let opts = split_at_1000();
        let got = cluster_van(2, 2, van).run("dist_sync", opts, move |kv, e| {
            let sizes = [1usize, 7, 1000, 5000, 64];
            let keys = init_zeros(kv, e, &sizes);
            let r = kv.rank() as f32 + 1.0;
            let mut bufs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![r; n]).collect();
            let mut outs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![-1.0; n]).collect();
            let mut tickets = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                let g = over(e, &mut bufs[i]);
                // Odd keys in one buffer, even keys into another.
                let o = if i % 2 == 1 {
                    g.clone()
                } else {
                    over(e, &mut outs[i])
                };
                kv.pushpull(
                    k.clone(),
                    std::slice::from_ref(&g),
                    std::slice::from_ref(&o),
                    -(i as i32),
                )
                .unwrap();
                tickets.push(kv.ticket(std::slice::from_ref(k), &[g, o]).unwrap());
            }
            // Waited in reverse order: each reports its own request.
            for t in tickets.into_iter().rev() {
                wait(t).unwrap();
            }
            (0..sizes.len())
                .map(|i| {
                    if i % 2 == 1 {
                        bufs[i].clone()
                    } else {
                        outs[i].clone()
                    }
                })
                .collect::<Vec<_>>()
        });
        for (rank, res) in got.iter().enumerate() {
            for (i, v) in res.iter().enumerate() {
                assert!(
                    v.iter().all(|&x| x == 3.0),
                    "{van:?} rank {rank} key {i}: {:?}",
                    &v[..v.len().min(4)]
                );
            }
        }
    }
}

/// Kept tensors (a persistent request): the same tensors over the same
/// memory push-pulled round after round over two workers, remade when a
/// ticket names them spent; every round's sums exact, in place. The last
/// rounds issue planned calls (`KvStore::plan`, the dist kinds' path); a
/// tensor spent there makes its plan refused (checked here when it
/// happens; `plan.rs`'s unit test makes it happen) and planned again.
#[test]
fn dist_kept_requests_sum_round_after_round() {
    for van in [VanKind::Tcp, VanKind::Shm] {
        let opts = split_at_1000();
        let got = cluster_van(2, 2, van).run("dist_sync", opts, move |kv, e| {
            let sizes = [1usize, 1000, 40_000];
            let keys = init_zeros(kv, e, &sizes);
            let r = kv.rank() as f32 + 1.0;
            let mut bufs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut outs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut ts: Vec<Tensor> = Vec::new();
            for i in 0..sizes.len() {
                ts.push(over(e, &mut bufs[i]));
                ts.push(over(e, &mut outs[i]));
            }
            let mut wrong = Vec::new();
            let (mut plans, mut stale) = (None, Vec::new());
            for round in 0..8 {
                for b in bufs.iter_mut() {
                    b.fill(r * (round + 1) as f32);
                }
                for (i, k) in keys.iter().enumerate() {
                    let (v, o) = (&ts[2 * i..2 * i + 1], &ts[2 * i + 1..2 * i + 2]);
                    if round < 4 {
                        kv.pushpull(k.clone(), v, o, -(i as i32)).unwrap();
                        continue;
                    }
                    let plans = plans.get_or_insert_with(Vec::new);
                    if plans.len() == i {
                        let p = kv.plan(Call::PushPull, k.clone(), v, o, -(i as i32));
                        plans.push(p.unwrap());
                    }
                    kv.issue(&plans[i]).unwrap();
                }
                let mut t = kv.ticket_kept(&keys, &ts).unwrap();
                t.wait().unwrap();
                if let (Some(ps), Some(&i)) = (&plans, t.spent().first()) {
                    stale.push(kv.issue(&ps[i / 2]).map_err(|e| e.to_string()));
                    plans = None;
                }
                for &i in t.spent() {
                    // SAFETY: the memory stays valid and untouched until the
                    // next ticket is done.
                    ts[i] = unsafe { ts[i].remade() }.unwrap().unwrap();
                }
                let want = 3.0 * (round + 1) as f32;
                for (i, o) in outs.iter().enumerate() {
                    if o.iter().any(|&x| x != want) {
                        wrong.push((round, i, o[0]));
                    }
                }
            }
            (wrong, stale)
        });
        for (rank, (wrong, stale)) in got.iter().enumerate() {
            assert!(
                wrong.is_empty(),
                "{van:?} rank {rank}: (round, key, got) {wrong:?}"
            );
            for s in stale {
                assert!(
                    s.as_ref().is_err_and(|e| e.contains("Ticket::spent")),
                    "{s:?}"
                );
            }
        }
    }
}

/// A request that fails (a worker-side update rule refuses it), then at
/// once another on the same key (one thread): the failure is the first's,
/// reported on its ticket, and the second goes through.
#[test]
fn a_failure_is_reported_on_its_own_request_not_the_next_one() {
    let opts = Options {
        timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let got = cluster(1, 1).run("dist_sync", opts, |kv, e| {
        kv.init(1, &tensor(e, &[0.0f32; 4])).unwrap();
        kv.set_updater(add_unless_negative).unwrap();
        let k: Key = 1u32.into();
        let mut results = Vec::new();
        for _ in 0..5 {
            let bad = tensor(e, &[-1.0f32; 4]);
            kv.push(1, std::slice::from_ref(&bad), 0).unwrap();
            let a = kv.ticket(std::slice::from_ref(&k), &[bad]).unwrap();
            let good = tensor(e, &[1.0f32; 4]);
            let issued = kv.push(1, std::slice::from_ref(&good), 0);
            let b = kv.ticket(std::slice::from_ref(&k), &[good]).unwrap();
            results.push((
                wait(a).map_err(|e| e.to_string()),
                issued.map_err(|e| e.to_string()),
                wait(b).map_err(|e| e.to_string()),
            ));
        }
        results
    });
    for (a, issued, b) in &got[0] {
        assert!(a.as_ref().is_err_and(|e| e.contains("negative")), "{a:?}");
        assert!(issued.is_ok() && b.is_ok(), "{issued:?} {b:?}");
    }
}
