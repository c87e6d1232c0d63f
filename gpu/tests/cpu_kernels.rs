//! Every CPU kernel against a plain scalar reference written the way MXNet
//! writes its kernels (byte pointers and masks), on random inputs and edge
//! cases, single- and multi-threaded.

use half::f16;
use proptest::prelude::*;
use pskv_gpu::cpu::{CpuKernels, MIN_PARALLEL_ELEMS};
use pskv_gpu::{layout, KernelError, Kernels};

// ---- references -----------------------------------------------------------

fn ref_quantize_2bit(grad: &[f32], residual: &mut [f32], t: f32) -> Vec<u8> {
    let mut bytes = vec![0u8; layout::words_2bit(grad.len()) * 4];
    let posbits = [0xc0u8, 0x30, 0x0c, 0x03];
    let negbits = [0x80u8, 0x20, 0x08, 0x02];
    for i in 0..grad.len() {
        residual[i] += grad[i];
        if residual[i] >= t {
            bytes[i >> 2] |= posbits[i & 3];
            residual[i] -= t;
        } else if residual[i] <= -t {
            bytes[i >> 2] |= negbits[i & 3];
            residual[i] -= -t;
        }
    }
    bytes
}

fn ref_dequantize_2bit(bytes: &[u8], n: usize, t: f32) -> Vec<f32> {
    let posbits = [0xc0u8, 0x30, 0x0c, 0x03];
    let negbits = [0x80u8, 0x20, 0x08, 0x02];
    (0..n)
        .map(|i| {
            let masked = bytes[i >> 2] & posbits[i & 3];
            if masked == posbits[i & 3] {
                t
            } else if masked == negbits[i & 3] {
                -t
            } else {
                0.0
            }
        })
        .collect()
}

fn ref_quantize_1bit(grad: &[f32], residual: &mut [f32], t: f32) -> Vec<u8> {
    let mut bytes = vec![0u8; layout::words_1bit(grad.len()) * 4];
    let bits = [0x80u8, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01];
    for i in 0..grad.len() {
        residual[i] += grad[i];
        if residual[i] > t {
            bytes[i >> 3] |= bits[i & 7];
            residual[i] -= 1.0;
        } else {
            residual[i] += 1.0;
        }
    }
    bytes
}

fn ref_dequantize_1bit(bytes: &[u8], n: usize) -> Vec<f32> {
    let bits = [0x80u8, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01];
    (0..n)
        .map(|i| {
            if bytes[i >> 3] & bits[i & 7] != 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

fn bytes_to_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Equal bit for bit, except that any NaN equals any NaN (NaN payloads are
/// not specified by IEEE arithmetic).
fn same_f32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

// ---- inputs ---------------------------------------------------------------

const T: f32 = 0.5;

fn special() -> Vec<f32> {
    vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        T,
        -T,
        T - f32::EPSILON,
        -(T - f32::EPSILON),
        f32::from_bits(T.to_bits() + 1),
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 4.0,
        f32::MAX,
        f32::MIN,
        1.0,
        -1.0,
    ]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..2.0,
        1 => proptest::sample::select(special()),
        1 => any::<f32>(),
    ]
}

fn kernels() -> Vec<CpuKernels> {
    vec![
        CpuKernels::single_threaded(),
        CpuKernels::with_threads(2).unwrap(),
    ]
}

// ---- 2-bit ------------------------------------------------------------------

fn check_2bit(grad: &[f32], residual0: &[f32], t: f32) -> Result<(), TestCaseError> {
    let mut ref_res = residual0.to_vec();
    let ref_bytes = ref_quantize_2bit(grad, &mut ref_res, t);
    for k in kernels() {
        let mut res = residual0.to_vec();
        let mut codes = vec![0xdead_beefu32; layout::words_2bit(grad.len())];
        k.quantize_2bit(grad, &mut res, &mut codes, t).unwrap();
        prop_assert_eq!(layout::words_to_bytes(&codes), ref_bytes.clone());
        prop_assert!(same_f32(&res, &ref_res), "residual differs");
        let mut out = vec![7.0f32; grad.len()];
        k.dequantize_2bit(&codes, &mut out, t).unwrap();
        prop_assert!(same_f32(
            &out,
            &ref_dequantize_2bit(&ref_bytes, grad.len(), t)
        ));
    }
    Ok(())
}

proptest! {
    #[test]
    fn quantize_2bit_matches_the_reference(
        grad in proptest::collection::vec(value(), 0..300),
        seed in proptest::collection::vec(value(), 300),
    ) {
        check_2bit(&grad, &seed[..grad.len()], T)?;
    }

    #[test]
    fn quantize_1bit_matches_the_reference(
        grad in proptest::collection::vec(value(), 0..300),
        seed in proptest::collection::vec(value(), 300),
        t in prop_oneof![Just(0.0f32), -1.0f32..1.0],
    ) {
        check_1bit(&grad, &seed[..grad.len()], t)?;
    }

    #[test]
    fn sum_matches_the_reference(
        n in 0usize..700,
        k in 1usize..6,
        vals in proptest::collection::vec(value(), 700 * 6),
    ) {
        let ins: Vec<Vec<f32>> = (0..k).map(|j| vals[j * n..(j + 1) * n].to_vec()).collect();
        check_sum(&ins)?;
    }

    /// Dequantize reads exactly the bits of the format: any word decodes like
    /// the reference (codes `01` decode to 0, as in MXNet).
    #[test]
    fn dequantize_decodes_any_word(words in proptest::collection::vec(any::<u32>(), 0..40), drop in 0usize..32) {
        let n2 = (words.len() * 16).saturating_sub(drop % 16);
        let n2 = if words.is_empty() { 0 } else { n2 };
        let bytes = layout::words_to_bytes(&words);
        for k in kernels() {
            let mut out = vec![0.0f32; n2];
            k.dequantize_2bit(&words[..layout::words_2bit(n2)], &mut out, 0.25).unwrap();
            prop_assert!(same_f32(&out, &ref_dequantize_2bit(&bytes, n2, 0.25)));
            let n1 = (words.len() * 32).saturating_sub(drop);
            let n1 = if words.is_empty() { 0 } else { n1 };
            let mut out = vec![0.0f32; n1];
            k.dequantize_1bit(&words[..layout::words_1bit(n1)], &mut out).unwrap();
            prop_assert!(same_f32(&out, &ref_dequantize_1bit(&bytes, n1)));
        }
    }

    /// Dequantize-and-add gives, bit for bit, what dequantizing into a
    /// buffer and adding it gives (signed zeros, infinities and NaNs in
    /// `out` included), on every back end and thread count.
    #[test]
    fn add_dequantized_is_dequantize_then_add(
        words in proptest::collection::vec(any::<u32>(), 1..80),
        drop in 0usize..32,
        base in proptest::collection::vec(value(), 80 * 32),
    ) {
        for k in kernels() {
            let n2 = words.len() * 16 - drop % 16;
            let mut want = vec![0.0f32; n2];
            k.dequantize_2bit(&words[..layout::words_2bit(n2)], &mut want, 0.375).unwrap();
            for (w, b) in want.iter_mut().zip(&base) {
                *w += *b;
            }
            let mut got = base[..n2].to_vec();
            k.add_dequantized_2bit(&words[..layout::words_2bit(n2)], &mut got, 0.375).unwrap();
            prop_assert!(same_f32(&got, &want), "2-bit, n={}", n2);

            let n1 = words.len() * 32 - drop;
            let mut want = vec![0.0f32; n1];
            k.dequantize_1bit(&words[..layout::words_1bit(n1)], &mut want).unwrap();
            for (w, b) in want.iter_mut().zip(&base) {
                *w += *b;
            }
            let mut got = base[..n1].to_vec();
            k.add_dequantized_1bit(&words[..layout::words_1bit(n1)], &mut got).unwrap();
            prop_assert!(same_f32(&got, &want), "1-bit, n={}", n1);
        }
    }
}

#[test]
fn add_dequantized_checks_its_arguments() {
    let k = CpuKernels::single_threaded();
    let mut out = vec![0.0f32; 40];
    assert!(
        k.add_dequantized_2bit(&[0u32; 2], &mut out, 0.5).is_err(),
        "40 elements need 3 words"
    );
    assert!(
        k.add_dequantized_2bit(&[0u32; 3], &mut out, 0.0).is_err(),
        "threshold 0"
    );
    assert!(
        k.add_dequantized_1bit(&[0u32; 1], &mut out).is_err(),
        "40 elements need 2 words"
    );
    k.add_dequantized_1bit(&[0u32; 2], &mut out).unwrap();
    assert!(out.iter().all(|&v| v == -1.0));
}

fn check_1bit(grad: &[f32], residual0: &[f32], t: f32) -> Result<(), TestCaseError> {
    let mut ref_res = residual0.to_vec();
    let ref_bytes = ref_quantize_1bit(grad, &mut ref_res, t);
    for k in kernels() {
        let mut res = residual0.to_vec();
        let mut codes = vec![0xdead_beefu32; layout::words_1bit(grad.len())];
        k.quantize_1bit(grad, &mut res, &mut codes, t).unwrap();
        prop_assert_eq!(layout::words_to_bytes(&codes), ref_bytes.clone());
        prop_assert!(same_f32(&res, &ref_res), "residual differs");
        let mut out = vec![7.0f32; grad.len()];
        k.dequantize_1bit(&codes, &mut out).unwrap();
        prop_assert!(same_f32(&out, &ref_dequantize_1bit(&ref_bytes, grad.len())));
    }
    Ok(())
}

fn check_sum(ins: &[Vec<f32>]) -> Result<(), TestCaseError> {
    let n = ins[0].len();
    let want: Vec<f32> = (0..n)
        .map(|i| ins[1..].iter().fold(ins[0][i], |acc, v| acc + v[i]))
        .collect();
    let refs: Vec<&[f32]> = ins.iter().map(|v| &v[..]).collect();
    for k in kernels() {
        let mut out = vec![0.0f32; n];
        k.sum(&mut out[..], &refs).unwrap();
        prop_assert!(same_f32(&out, &want));
    }
    // f64 and f16 on the same values.
    let ins64: Vec<Vec<f64>> = ins
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let want64: Vec<f64> = (0..n)
        .map(|i| ins64[1..].iter().fold(ins64[0][i], |acc, v| acc + v[i]))
        .collect();
    let ins16: Vec<Vec<f16>> = ins
        .iter()
        .map(|v| v.iter().map(|&x| f16::from_f32(x)).collect())
        .collect();
    let want16: Vec<f16> = (0..n)
        .map(|i| {
            f16::from_f32(
                ins16[1..]
                    .iter()
                    .fold(ins16[0][i].to_f32(), |acc, v| acc + v[i].to_f32()),
            )
        })
        .collect();
    for k in kernels() {
        let refs: Vec<&[f64]> = ins64.iter().map(|v| &v[..]).collect();
        let mut out = vec![0.0f64; n];
        k.sum(&mut out[..], &refs).unwrap();
        prop_assert!(out
            .iter()
            .zip(&want64)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
        let refs: Vec<&[f16]> = ins16.iter().map(|v| &v[..]).collect();
        let mut out = vec![f16::ZERO; n];
        k.sum(&mut out[..], &refs).unwrap();
        prop_assert!(out
            .iter()
            .zip(&want16)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }
    Ok(())
}

/// The portable (SSE/NEON/scalar) path gives the same bits as the AVX2 one.
/// (The other tests run whichever this CPU selects.)
#[test]
fn portable_and_avx2_paths_agree() {
    let n = 4099;
    let grad: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut grad = grad;
    for (i, v) in special().into_iter().enumerate() {
        grad[i * 37] = v;
    }
    let res: Vec<f32> = (0..n)
        .map(|i| ((i * 104729) % 100) as f32 / 400.0 - 0.125)
        .collect();
    let k = CpuKernels::single_threaded();
    let run = |avx2: bool| {
        pskv_gpu::cpu::allow_avx2(avx2);
        let (mut r2, mut r1) = (res.clone(), res.clone());
        let mut c2 = vec![0u32; layout::words_2bit(n)];
        let mut c1 = vec![0u32; layout::words_1bit(n)];
        k.quantize_2bit(&grad, &mut r2, &mut c2, T).unwrap();
        k.quantize_1bit(&grad, &mut r1, &mut c1, 0.1).unwrap();
        pskv_gpu::cpu::allow_avx2(true);
        (r2, c2, r1, c1)
    };
    let (a, b) = (run(false), run(true));
    assert_eq!(a.1, b.1);
    assert_eq!(a.3, b.3);
    assert!(same_f32(&a.0, &b.0) && same_f32(&a.2, &b.2));
    check_2bit(&grad, &res, T).unwrap();
}

/// Lengths around the word and chunk boundaries, including the split points
/// of the multi-threaded kernels.
#[test]
fn boundary_lengths() {
    let mut x = 12345u32;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) * 3.0 - 1.5
    };
    let big = MIN_PARALLEL_ELEMS * 3 + 17;
    for n in [
        0,
        1,
        15,
        16,
        17,
        31,
        32,
        33,
        1023,
        1024,
        1025,
        MIN_PARALLEL_ELEMS - 1,
        MIN_PARALLEL_ELEMS,
        big,
    ] {
        let grad: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let res: Vec<f32> = (0..n).map(|_| rnd() * 0.1).collect();
        check_2bit(&grad, &res, T).unwrap();
        check_1bit(&grad, &res, 0.0).unwrap();
        check_sum(&[grad.clone(), res.clone(), grad]).unwrap();
    }
}

/// Every special value at every position of a word.
#[test]
fn special_values_at_every_position() {
    let s = special();
    let n = 64;
    for (j, &v) in s.iter().enumerate() {
        let grad: Vec<f32> = (0..n)
            .map(|i| {
                if (i + j) % 3 == 0 {
                    v
                } else {
                    0.3 * (i as f32 - 30.0) / 30.0
                }
            })
            .collect();
        let res: Vec<f32> = (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    s[(i + j) % s.len()]
                } else {
                    0.0
                }
            })
            .collect();
        check_2bit(&grad, &res, T).unwrap();
        check_1bit(&grad, &res, 0.0).unwrap();
        check_1bit(&grad, &res, T).unwrap();
    }
}

/// The residual over many steps: each step matches the reference exactly,
/// and what was sent plus what is left equals what came in.
#[test]
fn residual_evolves_like_the_reference_over_many_steps() {
    let n = 1000;
    let k = CpuKernels::with_threads(2).unwrap();
    let mut x = 99u64;
    let mut rnd = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for (bits, t) in [(2, 0.25f32), (1, 0.0)] {
        let mut res = vec![0.0f32; n];
        let mut ref_res = vec![0.0f32; n];
        let mut sent = vec![0.0f64; n];
        let mut came = vec![0.0f64; n];
        for step in 0..300 {
            let grad: Vec<f32> = (0..n).map(|_| rnd() * 0.3).collect();
            let mut out = vec![0.0f32; n];
            if bits == 2 {
                let mut codes = vec![0u32; layout::words_2bit(n)];
                k.quantize_2bit(&grad, &mut res, &mut codes, t).unwrap();
                let ref_bytes = ref_quantize_2bit(&grad, &mut ref_res, t);
                assert_eq!(codes, bytes_to_words(&ref_bytes), "step {step}");
                k.dequantize_2bit(&codes, &mut out, t).unwrap();
            } else {
                let mut codes = vec![0u32; layout::words_1bit(n)];
                k.quantize_1bit(&grad, &mut res, &mut codes, t).unwrap();
                let ref_bytes = ref_quantize_1bit(&grad, &mut ref_res, t);
                assert_eq!(codes, bytes_to_words(&ref_bytes), "step {step}");
                k.dequantize_1bit(&codes, &mut out).unwrap();
            }
            assert!(same_f32(&res, &ref_res), "{bits}-bit residual, step {step}");
            for i in 0..n {
                sent[i] += out[i] as f64;
                came[i] += grad[i] as f64;
            }
        }
        for i in 0..n {
            let gap = (came[i] - sent[i] - res[i] as f64).abs();
            assert!(gap < 1e-3, "{bits}-bit: element {i} lost {gap}");
            // Error feedback keeps the residual bounded.
            assert!(res[i].abs() <= 1.5, "{bits}-bit: residual {} grew", res[i]);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let k = CpuKernels::single_threaded();
    let g = [0.0f32; 20];
    let mut r = [0.0f32; 20];
    let mut c = [0u32; 2];
    let mut out = [0.0f32; 20];
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            k.quantize_2bit(&g, &mut r, &mut c, t),
            Err(KernelError::Threshold { .. })
        ));
    }
    assert!(matches!(
        k.quantize_1bit(&g, &mut r, &mut c[..1], f32::NAN),
        Err(KernelError::Threshold { .. })
    ));
    let err = k.quantize_2bit(&g, &mut r[..19], &mut c, 0.5).unwrap_err();
    assert_eq!(
        err.to_string(),
        "quantize_2bit: the residual has 19 elements, expected 20"
    );
    assert!(matches!(
        k.quantize_2bit(&g, &mut r, &mut c[..1], 0.5),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        k.quantize_1bit(&g, &mut r, &mut c, 0.5),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        k.dequantize_2bit(&c[..1], &mut out, 0.5),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        k.dequantize_1bit(&c, &mut out),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        k.sum::<f32>(&mut out[..], &[]),
        Err(KernelError::NoInputs { .. })
    ));
    assert!(matches!(
        k.sum(&mut out[..], &[&g[..19]]),
        Err(KernelError::Length { .. })
    ));
}
