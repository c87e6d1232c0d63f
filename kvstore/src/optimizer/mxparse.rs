//! How a Python float hyperparameter becomes the `float` an MXNet kernel
//! sees, to the bit.
//!
//! MXNet's Python front end sends every operator argument as `str(x)` (the
//! shortest repr of the f64), and the C++ side parses it in one of three
//! ways:
//!
//! - **`float` fields** of an operator's parameters (lr, wd, momentum,
//!   rescale_grad, clip_gradient, beta1, beta2, epsilon of `sgd_update`,
//!   `nag_mom_update`, `adam_update`, ...) go through dmlc-core's own
//!   `ParseFloat<float>`, which is not correctly rounded: the integer part is
//!   converted exactly, the fraction is `val / 10^digits` in double rounded
//!   to float and added in float, and an exponent divides or multiplies by a
//!   power of ten built in float. [`param_f32`].
//! - **Tuples of floats** (`lrs`, `wds` of `multi_sgd_update`) are parsed
//!   by `std::istream`, which rounds correctly. [`tuple_f32`].
//! - **Scalars of NDArray arithmetic** (`grad * 0.5`, `hist + eps`) are
//!   `double` fields (dmlc `ParseFloat<double>`) cast to the element type.
//!   [`scalar_f32`], [`scalar_f64`].
//!
//! The differences are an ulp here and there (for example, an Adam learning
//! rate below 1e-4 is written `3.1622776601683816e-05` and parsed a little
//! off), which is exactly what bit-for-bit agreement with MXNet needs.

/// Python's `repr(x)` of a finite f64: the shortest digits that round-trip,
/// positional for exponents -4..16, else `1e-05` / `1.5e+16` form.
pub fn python_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits.
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} has an integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // x = 0.d1d2... * 10^decpt
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-decpt) as usize));
        out.push_str(&digits);
    } else if (decpt as usize) < digits.len() {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    } else {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', decpt as usize - digits.len()));
        out.push_str(".0");
    }
    out
}

/// The parts dmlc's parser reads: sign, integer digits, up to 19 fraction
/// digits, exponent.
struct Parts {
    negative: bool,
    int_part: u64,
    frac_val: u64,
    frac_pow10: u64,
    exp_negative: bool,
    exp: u32,
}

/// Reads an optional sign at `b[*i]`: whether it is `-`.
fn sign(b: &[u8], i: &mut usize) -> bool {
    match b.get(*i) {
        Some(c @ (b'-' | b'+')) => {
            *i += 1;
            *c == b'-'
        }
        _ => false,
    }
}

/// Hands each decimal digit from `b[*i]` on to `f`, in order.
fn digits(b: &[u8], i: &mut usize, mut f: impl FnMut(u8)) {
    while let Some(d) = b.get(*i).filter(|c| c.is_ascii_digit()) {
        f(d - b'0');
        *i += 1;
    }
}

fn split(s: &str) -> Parts {
    let b = s.as_bytes();
    let mut i = 0;
    let mut p = Parts {
        negative: false,
        int_part: 0,
        frac_val: 0,
        frac_pow10: 1,
        exp_negative: false,
        exp: 0,
    };
    p.negative = sign(b, &mut i);
    digits(b, &mut i, |d| {
        p.int_part = p.int_part.wrapping_mul(10).wrapping_add(d as u64);
    });
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let mut n = 0;
        digits(b, &mut i, |d| {
            if n < 19 {
                p.frac_val = p.frac_val * 10 + d as u64;
                p.frac_pow10 *= 10;
            }
            n += 1;
        });
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        p.exp_negative = sign(b, &mut i);
        digits(b, &mut i, |d| {
            p.exp = p.exp.saturating_mul(10).saturating_add(d as u32);
        });
    }
    p
}

macro_rules! dmlc_parse {
    ($(#[$doc:meta])* $name:ident, $t:ty, $max_exp:expr) => {
        $(#[$doc])*
        pub fn $name(s: &str) -> $t {
            let p = split(s);
            let mut value = p.int_part as $t;
            if p.frac_pow10 > 1 {
                // The fraction in f64, then rounded once to the type.
                value += (p.frac_val as f64 / p.frac_pow10 as f64) as $t;
            }
            if p.exp > 0 || s.contains(['e', 'E']) {
                let mut e = p.exp.min($max_exp);
                let mut scale: $t = 1.0;
                while e >= 8 {
                    scale *= 1e8;
                    e -= 8;
                }
                while e > 0 {
                    scale *= 10.0;
                    e -= 1;
                }
                value = if p.exp_negative {
                    value / scale
                } else {
                    value * scale
                };
            }
            if p.negative {
                -value
            } else {
                value
            }
        }
    };
}

dmlc_parse!(
    /// dmlc-core's `ParseFloat<float>` of a decimal string (finite input).
    dmlc_parse_f32,
    f32,
    38
);
dmlc_parse!(
    /// dmlc-core's `ParseFloat<double>` of a decimal string (finite input).
    dmlc_parse_f64,
    f64,
    308
);

/// A `float` operator parameter as MXNet's kernels see it.
pub fn param_f32(x: f64) -> f32 {
    dmlc_parse_f32(&python_repr(x))
}

/// A float of a tuple parameter (`lrs`, `wds`): correctly rounded.
pub fn tuple_f32(x: f64) -> f32 {
    python_repr(x)
        .parse::<f32>()
        .expect("python_repr writes a valid float")
}

/// A scalar of NDArray arithmetic, cast to f32.
pub fn scalar_f32(x: f64) -> f32 {
    dmlc_parse_f64(&python_repr(x)) as f32
}

/// A scalar of NDArray arithmetic, as f64.
pub fn scalar_f64(x: f64) -> f64 {
    dmlc_parse_f64(&python_repr(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_matches_python() {
        for (x, want) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (100.0, "100.0"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (3.1622776601683816e-05, "3.1622776601683816e-05"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0009000000000000001, "0.0009000000000000001"),
            (-0.25, "-0.25"),
            (123.456, "123.456"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(python_repr(x), want, "repr of {x:e}");
        }
    }

    #[test]
    fn parser_follows_dmlc() {
        // Positional strings below 1 parse like a correctly rounded cast.
        for x in [0.1, 0.001, 0.9, 0.999, 0.5, 0.0009000000000000001] {
            assert_eq!(param_f32(x), x as f32, "{x}");
        }
        // An exponent divides by a power of ten built in float: 1e-8 is
        // 1 / 1e8f, which is the correctly rounded value here.
        assert_eq!(dmlc_parse_f32("1e-08"), 1.0f32 / 1e8f32);
        assert_eq!(dmlc_parse_f32("2.5e+01"), 25.0);
        assert_eq!(dmlc_parse_f32("-1.5"), -1.5);
        assert_eq!(dmlc_parse_f64("1e-07"), 1e-7);
        assert_eq!(tuple_f32(0.1), 0.1f32);
        // Twenty fraction digits: the 20th is ignored.
        assert_eq!(
            dmlc_parse_f64("0.12345678901234567899"),
            dmlc_parse_f64("0.1234567890123456789")
        );
    }
}
