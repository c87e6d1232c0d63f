//! The device interface, on the emulated device (everywhere) and on CUDA
//! devices (feature `cuda`, where there is a GPU; `PSKV_REQUIRE_GPU=1`
//! makes their absence a failure): copies, the kernels bit for bit against
//! the CPU kernels, lanes in order, and errors.

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::device::{self, Backend, Device, DeviceMem, Lane, SumType};
use pskv_gpu::{layout, Bits, Kernels};

/// The devices to test: emulated device 0, and CUDA device 0 if any.
fn devices() -> Vec<Arc<dyn Device>> {
    let mut v = vec![device::open_with(Backend::Emulated, 0).unwrap()];
    match device::open_with(Backend::Cuda, 0) {
        Ok(d) => v.push(d),
        Err(e) => {
            assert!(
                std::env::var("PSKV_REQUIRE_GPU").as_deref() != Ok("1"),
                "PSKV_REQUIRE_GPU=1 but no CUDA device: {e}"
            );
            eprintln!("CUDA device tests skipped: {e}");
        }
    }
    v
}

/// Waits for the work queued on `lane` so far.
fn sync(d: &dyn Device, lane: Lane) {
    let (tx, rx) = channel();
    d.then(lane, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the lane finished")
        .expect("without an error");
}

fn upload(d: &dyn Device, bytes: Vec<u8>) -> DeviceMem {
    let m = d.alloc(bytes.len()).unwrap();
    d.upload(Lane::Copy, Arc::new(bytes), &m, 0).unwrap();
    sync(d, Lane::Copy);
    m
}

fn download(d: &dyn Device, m: &DeviceMem) -> Vec<u8> {
    let mut out = vec![0xAAu8; m.len()];
    // SAFETY: `out` lives, untouched, until the sync below.
    unsafe { d.download(Lane::Copy, m, 0, out.as_mut_ptr(), m.len()) }.unwrap();
    sync(d, Lane::Copy);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    pskv_test_support::values_in(seed, n, 2.0)
}

#[test]
fn memory_is_separate_and_copies_are_explicit() {
    for d in devices() {
        let d = &*d;
        let fresh = d.alloc(100).unwrap();
        assert_eq!(download(d, &fresh), vec![0u8; 100], "{}", d.describe());
        let a = upload(d, (0..100u8).collect());
        assert_eq!(download(d, &a), (0..100u8).collect::<Vec<_>>());
        // Device to device, with offsets.
        let b = d.alloc(100).unwrap();
        d.copy(Lane::Compute, &a, 10, &b, 50, 20).unwrap();
        sync(d, Lane::Compute);
        let got = download(d, &b);
        assert_eq!(&got[50..70], &(10..30u8).collect::<Vec<_>>()[..]);
        assert!(got[..50].iter().chain(&got[70..]).all(|x| *x == 0));
        // From another device (a peer copy).
        let peer = if d.is_emulated() {
            device::open_with(Backend::Emulated, 1).unwrap()
        } else {
            device::open_with(Backend::Cuda, 0).unwrap()
        };
        if peer.ordinal() != d.ordinal() {
            let c = d.alloc(100).unwrap();
            peer.copy_from_peer(Lane::Copy, &a, &c).unwrap_err();
            let on_peer = peer.alloc(100).unwrap();
            peer.copy_from_peer(Lane::Copy, &a, &on_peer).unwrap();
            sync(&*peer, Lane::Copy);
            assert_eq!(download(&*peer, &on_peer), (0..100u8).collect::<Vec<_>>());
        }
        // A partial download.
        let mut part = [0u8; 5];
        // SAFETY: `part` lives until the sync.
        unsafe { d.download(Lane::Copy, &a, 95, part.as_mut_ptr(), 5) }.unwrap();
        sync(d, Lane::Copy);
        assert_eq!(part, [95, 96, 97, 98, 99]);
        // Pinned host memory is host memory.
        let mut p = d.alloc_pinned(16).unwrap();
        assert_eq!(p.bytes(), &[0u8; 16]);
        p.bytes_mut()[3] = 7;
        assert_eq!(p.bytes()[3], 7);
    }
}

#[test]
fn borrowed_memory_is_used_in_place_and_never_freed() {
    for d in devices() {
        let d = &*d;
        let a = upload(d, (0..64u8).collect());
        // SAFETY: `a` outlives `b` and the work on it (synced below).
        let b = unsafe { d.borrow(a.address(), 64) }.unwrap();
        assert_eq!(b.address(), a.address());
        assert_eq!(
            download(d, &b),
            (0..64u8).collect::<Vec<_>>(),
            "{}",
            d.describe()
        );
        // A write through the borrowed buffer lands in `a`.
        d.upload(Lane::Copy, Arc::new(vec![7u8; 16]), &b, 8)
            .unwrap();
        sync(d, Lane::Copy);
        drop(b);
        let got = download(d, &a);
        assert_eq!(&got[8..24], &[7u8; 16][..]);
        assert_eq!(&got[..8], &(0..8u8).collect::<Vec<_>>()[..]);
        // Bad addresses are errors.
        // SAFETY: refused before any use.
        for bad in [0u64, a.address() + 4] {
            let e = unsafe { d.borrow(bad, 8) }.unwrap_err().to_string();
            assert!(e.contains("address 0") || e.contains("aligned"), "{e}");
        }
    }
}

#[test]
fn the_kernels_agree_with_the_cpu_bit_for_bit() {
    let k = CpuKernels::single_threaded();
    for d in devices() {
        let d = &*d;
        for n in [1usize, 31, 1000, 4099] {
            let ins: Vec<Vec<f32>> = (0..4).map(|s| values(s + n as u64, n)).collect();
            let mut want = vec![0f32; n];
            let refs: Vec<&[f32]> = ins.iter().map(|v| &v[..]).collect();
            k.sum(&mut want, &refs).unwrap();
            let dev_ins: Vec<DeviceMem> = ins.iter().map(|v| upload(d, f32_bytes(v))).collect();
            let out = d.alloc(n * 4).unwrap();
            d.sum(Lane::Compute, SumType::F32, &out, &dev_ins).unwrap();
            sync(d, Lane::Compute);
            let got = f32s(&download(d, &out));
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: sum of {n}",
                d.describe()
            );
            // 2-bit and 1-bit, with their residuals.
            let g = &ins[0];
            for two in [true, false] {
                let words = if two {
                    layout::words_2bit(n)
                } else {
                    layout::words_1bit(n)
                };
                let mut res = values(99, n);
                let mut codes = vec![0u32; words];
                let mut deq = vec![0f32; n];
                let dg = upload(d, f32_bytes(g));
                let dr = upload(d, f32_bytes(&res));
                let dc = d.alloc(words * 4).unwrap();
                let dd = d.alloc(n * 4).unwrap();
                if two {
                    k.quantize_2bit(g, &mut res, &mut codes, 0.5).unwrap();
                    k.dequantize_2bit(&codes, &mut deq, 0.5).unwrap();
                    d.quantize(Lane::Compute, Bits::Two, &dg, &dr, &dc, 0.5)
                        .unwrap();
                    d.dequantize(Lane::Compute, Bits::Two, &dc, &dd, 0.5)
                        .unwrap();
                } else {
                    k.quantize_1bit(g, &mut res, &mut codes, 0.0).unwrap();
                    k.dequantize_1bit(&codes, &mut deq).unwrap();
                    d.quantize(Lane::Compute, Bits::One, &dg, &dr, &dc, 0.0)
                        .unwrap();
                    d.dequantize(Lane::Compute, Bits::One, &dc, &dd, 0.0)
                        .unwrap();
                }
                sync(d, Lane::Compute);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&f32s(&download(d, &dr))), bits(&res), "{two}");
                assert_eq!(bits(&f32s(&download(d, &dd))), bits(&deq), "{two}");
                let cw: Vec<u32> = download(d, &dc)
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(cw, codes, "{two}");
            }
        }
    }
}

/// `then` callbacks come in queue order on a lane, after the lane's work.
#[test]
fn a_lane_runs_its_work_in_order() {
    for d in devices() {
        let d = &*d;
        let m = d.alloc(4 * 1024 * 1024).unwrap();
        let (tx, rx) = channel();
        for i in 0..20u32 {
            d.upload(Lane::Copy, Arc::new(vec![i as u8; m.len()]), &m, 0)
                .unwrap();
            let tx = tx.clone();
            d.then(
                Lane::Copy,
                Box::new(move |r| tx.send((i, r.is_ok())).unwrap()),
            );
        }
        let got: Vec<(u32, bool)> = (0..20)
            .map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        assert_eq!(got, (0..20).map(|i| (i, true)).collect::<Vec<_>>());
        assert!(download(d, &m).iter().all(|b| *b == 19));
    }
}

#[test]
fn bad_calls_are_errors_not_work() {
    for d in devices() {
        let d = &*d;
        let a = d.alloc(16).unwrap();
        let b = d.alloc(8).unwrap();
        assert!(d.copy(Lane::Compute, &a, 0, &b, 0, 16).is_err());
        assert!(d.copy(Lane::Compute, &a, 10, &a, 0, 8).is_err());
        assert!(d.upload(Lane::Copy, Arc::new(vec![0u8; 9]), &b, 0).is_err());
        let e = d
            .sum(Lane::Compute, SumType::F32, &a, std::slice::from_ref(&b))
            .unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
        assert!(d.sum(Lane::Compute, SumType::F32, &a, &[]).is_err());
        assert!(d
            .sum(Lane::Compute, SumType::F32, &a, std::slice::from_ref(&a))
            .is_err());
        // A buffer of another device.
        let other = device::open_with(Backend::Emulated, 1).unwrap();
        let c = other.alloc(16).unwrap();
        let e = d.copy(Lane::Compute, &c, 0, &a, 0, 16).unwrap_err();
        assert!(e.to_string().contains("device 1"), "{e}");
        // Still works after the refusals.
        sync(d, Lane::Compute);
    }
    let e = device::open_with(Backend::Emulated, 99).err().unwrap();
    assert!(e.to_string().contains("99"), "{e}");
}

#[test]
fn the_backend_comes_from_pskv_gpu() {
    assert_eq!(Backend::parse(None).unwrap(), Backend::Auto);
    assert_eq!(Backend::parse(Some("auto")).unwrap(), Backend::Auto);
    assert_eq!(Backend::parse(Some("cuda")).unwrap(), Backend::Cuda);
    assert_eq!(
        Backend::parse(Some(" emulated ")).unwrap(),
        Backend::Emulated
    );
    let e = Backend::parse(Some("tpu")).unwrap_err();
    assert!(e.to_string().contains("PSKV_GPU=tpu"), "{e}");
    // Without the `cuda` feature (or a GPU), asking for CUDA says why.
    if device::cuda_devices().is_err() {
        let e = device::open_with(Backend::Cuda, 0).err().unwrap();
        assert!(e.to_string().contains("CUDA"), "{e}");
        // auto falls back to the emulated device.
        assert!(device::open_with(Backend::Auto, 0).unwrap().is_emulated());
    }
}
