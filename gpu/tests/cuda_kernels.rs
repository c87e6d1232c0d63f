//! The CUDA kernels: they compile (NVRTC, no GPU needed), and on a GPU they
//! give the CPU kernels' bits. Without NVRTC or a GPU the tests say they were
//! skipped and why; with `PSKV_REQUIRE_NVRTC=1` (CI) a missing NVRTC fails,
//! and with `PSKV_REQUIRE_GPU=1` a missing GPU fails.
#![cfg(feature = "cuda")]

use half::f16;
use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::cuda::{self, CudaKernels};
use pskv_gpu::{layout, Element, KernelError, Kernels};

fn require(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn gpu() -> Option<CudaKernels> {
    match CudaKernels::new(0) {
        Ok(k) => {
            eprintln!("GPU tests run on {}", k.describe());
            Some(k)
        }
        Err(e) => {
            assert!(!require("PSKV_REQUIRE_GPU"), "PSKV_REQUIRE_GPU=1 but: {e}");
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

#[test]
fn kernels_compile_to_ptx_with_nvrtc() {
    if !cuda::nvrtc_present() {
        assert!(
            !require("PSKV_REQUIRE_NVRTC"),
            "PSKV_REQUIRE_NVRTC=1 but libnvrtc was not found"
        );
        eprintln!("skipped: libnvrtc not found, the kernels were not compiled");
        return;
    }
    for arch in [cuda::PORTABLE_ARCH, "compute_80", "compute_90"] {
        let ptx = cuda::compile_ptx(arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .to_src();
        for name in cuda::KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}")),
                "{arch}: {name} missing from the PTX"
            );
        }
    }
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    match CudaKernels::new(10_000) {
        Err(KernelError::CudaUnavailable(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("GPU 10000 does not exist"),
    }
}

fn same_f32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

fn inputs(n: usize, seed: u32) -> Vec<f32> {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.25,
        -0.25,
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 8.0,
        1e30,
        -1e30,
    ];
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 97 == 13 {
                specials[(x as usize) % specials.len()]
            } else {
                (x as f32 / u32::MAX as f32) - 0.5
            }
        })
        .collect()
}

const LENGTHS: [usize; 14] = [
    1, 2, 4, 5, 15, 16, 17, 31, 32, 33, 1000, 65_537, 3_000_001, 9_000_003,
];

#[test]
fn compression_matches_the_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = CpuKernels::single_threaded();
    for n in LENGTHS {
        let grad = inputs(n, 7);
        let res0: Vec<f32> = inputs(n, 11).iter().map(|v| v * 0.1).collect();
        let dgrad = g.upload(&grad).unwrap();
        // Per scheme: 3 steps, residual carried; then the codes decoded,
        // into a buffer and onto one that holds values already.
        macro_rules! scheme {
            ($name:literal, $words:ident, $q:ident, $dq:ident, $add:ident, $t:expr $(, $dt:expr)?) => {{
                let (mut rc, mut rg) = (res0.clone(), g.upload(&res0).unwrap());
                for step in 0..3 {
                    let mut cc = vec![0u32; layout::$words(n)];
                    let mut cg = g.zeros::<u32>(layout::$words(n)).unwrap();
                    c.$q(&grad, &mut rc, &mut cc, $t).unwrap();
                    g.$q(&dgrad, &mut rg, &mut cg, $t).unwrap();
                    let at = format!("{}, n={n}, step {step}", $name);
                    assert_eq!(g.download(&cg).unwrap(), cc, "codes, {at}");
                    assert!(same_f32(&g.download(&rg).unwrap(), &rc), "residual, {at}");
                    let mut oc = vec![0.0f32; n];
                    let mut og = g.zeros::<f32>(n).unwrap();
                    c.$dq(&cc, &mut oc $(, $dt)?).unwrap();
                    g.$dq(&cg, &mut og $(, $dt)?).unwrap();
                    assert!(same_f32(&g.download(&og).unwrap(), &oc), "dequantize, {at}");
                    let (mut ac, mut ag) = (grad.clone(), g.upload(&grad).unwrap());
                    c.$add(&cc, &mut ac $(, $dt)?).unwrap();
                    g.$add(&cg, &mut ag $(, $dt)?).unwrap();
                    assert!(same_f32(&g.download(&ag).unwrap(), &ac), "dequantize-and-add, {at}");
                }
            }};
        }
        scheme!(
            "2-bit",
            words_2bit,
            quantize_2bit,
            dequantize_2bit,
            add_dequantized_2bit,
            0.25,
            0.25
        );
        scheme!(
            "1-bit",
            words_1bit,
            quantize_1bit,
            dequantize_1bit,
            add_dequantized_1bit,
            0.1
        );
    }
}

/// The sums of `ins` (in order) on the CPU and on the GPU: (GPU, CPU).
fn both_sums<T: Element>(c: &CpuKernels, g: &CudaKernels, ins: &[Vec<T>]) -> (Vec<T>, Vec<T>) {
    let refs: Vec<&[T]> = ins.iter().map(|v| &v[..]).collect();
    let mut want = ins[0].clone();
    c.sum(&mut want[..], &refs).unwrap();
    let dev: Vec<_> = ins.iter().map(|v| g.upload(v).unwrap()).collect();
    let drefs: Vec<_> = dev.iter().collect();
    let mut out = g.zeros::<T>(want.len()).unwrap();
    g.sum(&mut out, &drefs).unwrap();
    (g.download(&out).unwrap(), want)
}

#[test]
fn sum_matches_the_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = CpuKernels::single_threaded();
    for n in LENGTHS {
        for k in [1usize, 2, 3, 7] {
            let ins: Vec<Vec<f32>> = (0..k).map(|j| inputs(n, 100 + j as u32)).collect();
            let (got, want) = both_sums(&c, &g, &ins);
            assert!(same_f32(&got, &want), "f32 sum, n={n}, k={k}");

            let ins64: Vec<Vec<f64>> = ins
                .iter()
                .map(|v| v.iter().map(|&x| x as f64 * 1.000001).collect())
                .collect();
            let (got, want) = both_sums(&c, &g, &ins64);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
                "f64 sum, n={n}, k={k}"
            );

            // f16, including every f16 bit pattern when n is large enough.
            let ins16: Vec<Vec<f16>> = (0..k)
                .map(|j| {
                    (0..n)
                        .map(|i| f16::from_bits(((i * (2 * j + 1) + j * 7919) % 65536) as u16))
                        .collect()
                })
                .collect();
            let (got, want) = both_sums(&c, &g, &ins16);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
                "f16 sum, n={n}, k={k}"
            );
        }
    }
}

#[test]
fn gpu_argument_errors() {
    let Some(g) = gpu() else { return };
    let grad = g.upload(&[0.0f32; 20]).unwrap();
    let mut res = g.zeros::<f32>(19).unwrap();
    let mut codes = g.zeros::<u32>(2).unwrap();
    assert!(matches!(
        g.quantize_2bit(&grad, &mut res, &mut codes, 0.5),
        Err(KernelError::Length { .. })
    ));
    let mut res = g.zeros::<f32>(20).unwrap();
    assert!(matches!(
        g.quantize_2bit(&grad, &mut res, &mut codes, 0.0),
        Err(KernelError::Threshold { .. })
    ));
    let mut out = g.zeros::<f32>(20).unwrap();
    assert!(matches!(
        g.sum::<f32>(&mut out, &[]),
        Err(KernelError::NoInputs { .. })
    ));
}
