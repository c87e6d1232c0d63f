//! The demo's model: a multi-layer perceptron (16-128-128-4, ReLU, softmax
//! cross-entropy), forward and backward by hand in plain loops. Single
//! threaded and in a fixed order, so the same inputs give the same bits in
//! every process.

use super::data::{Dataset, Rng, CLASSES, FEATURES};

/// Units per layer, input first.
pub const LAYERS: [usize; 4] = [FEATURES, 128, 128, CLASSES];

/// The parameter tensors in key order: weight 0 (`out x in`, row-major),
/// bias 0, weight 1, bias 1, ...
pub fn shapes() -> Vec<Vec<usize>> {
    let mut s = Vec::new();
    for l in 0..LAYERS.len() - 1 {
        s.push(vec![LAYERS[l + 1], LAYERS[l]]);
        s.push(vec![LAYERS[l + 1]]);
    }
    s
}

/// Initial parameters: uniform weights scaled by fan-in (He), zero biases.
pub fn init(seed: u64) -> Vec<Vec<f32>> {
    let mut r = Rng::new(seed);
    let mut p = Vec::new();
    for l in 0..LAYERS.len() - 1 {
        let (fan_in, out) = (LAYERS[l], LAYERS[l + 1]);
        let scale = (6.0 / fan_in as f32).sqrt();
        p.push(
            (0..out * fan_in)
                .map(|_| (r.unit() * 2.0 - 1.0) * scale)
                .collect(),
        );
        p.push(vec![0.0; out]);
    }
    p
}

/// The activations of one sample, layer by layer (input first).
fn forward(p: &[Vec<f32>], x: &[f32], acts: &mut Vec<Vec<f32>>) {
    acts.clear();
    acts.push(x.to_vec());
    let last = LAYERS.len() - 2;
    for l in 0..=last {
        let (w, b) = (&p[2 * l], &p[2 * l + 1]);
        let (n_in, n_out) = (LAYERS[l], LAYERS[l + 1]);
        let input = &acts[l];
        let mut out = vec![0.0f32; n_out];
        for (o, out_o) in out.iter_mut().enumerate() {
            let row = &w[o * n_in..(o + 1) * n_in];
            let mut s = b[o];
            for (wi, xi) in row.iter().zip(input) {
                s += wi * xi;
            }
            *out_o = if l < last { s.max(0.0) } else { s };
        }
        acts.push(out);
    }
}

/// Softmax of logits, in place; returns nothing.
fn softmax(z: &mut [f32]) {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
}

/// The summed gradients over samples `idx` of `d`, the summed loss and the
/// number classified right.
pub fn gradients(p: &[Vec<f32>], d: &Dataset, idx: &[usize]) -> (Vec<Vec<f32>>, f32, usize) {
    let mut g: Vec<Vec<f32>> = p.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut acts = Vec::new();
    let (mut loss, mut right) = (0.0f32, 0usize);
    for &i in idx {
        forward(p, d.row(i), &mut acts);
        let label = d.y[i] as usize;
        let mut delta = acts.pop().expect("output layer");
        softmax(&mut delta);
        if argmax(&delta) == label {
            right += 1;
        }
        loss -= delta[label].max(1e-30).ln();
        delta[label] -= 1.0;
        // Back through the layers: delta is dLoss/d(pre-activation) of l.
        for l in (0..LAYERS.len() - 1).rev() {
            let (n_in, n_out) = (LAYERS[l], LAYERS[l + 1]);
            let input = &acts[l];
            let (gw, rest) = g[2 * l..].split_at_mut(1);
            let (gw, gb) = (&mut gw[0], &mut rest[0]);
            for o in 0..n_out {
                gb[o] += delta[o];
                let row = &mut gw[o * n_in..(o + 1) * n_in];
                for (gwi, xi) in row.iter_mut().zip(input) {
                    *gwi += delta[o] * xi;
                }
            }
            if l > 0 {
                let w = &p[2 * l];
                let mut prev = vec![0.0f32; n_in];
                for o in 0..n_out {
                    let row = &w[o * n_in..(o + 1) * n_in];
                    for (pi, wi) in prev.iter_mut().zip(row) {
                        *pi += delta[o] * wi;
                    }
                }
                // ReLU: no gradient where the unit was off.
                for (pi, ai) in prev.iter_mut().zip(input) {
                    if *ai <= 0.0 {
                        *pi = 0.0;
                    }
                }
                delta = prev;
            }
        }
    }
    (g, loss, right)
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Mean loss and accuracy over all of `d`.
pub fn evaluate(p: &[Vec<f32>], d: &Dataset) -> (f32, f32) {
    let idx: Vec<usize> = (0..d.len()).collect();
    let mut loss = 0.0;
    let mut right = 0;
    for chunk in idx.chunks(256) {
        let mut acts = Vec::new();
        for &i in chunk {
            forward(p, d.row(i), &mut acts);
            let mut z = acts.pop().expect("output layer");
            softmax(&mut z);
            let label = d.y[i] as usize;
            loss -= z[label].max(1e-30).ln();
            if argmax(&z) == label {
                right += 1;
            }
        }
    }
    (loss / d.len() as f32, right as f32 / d.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::super::data::spirals;
    use super::*;

    #[test]
    fn gradients_match_finite_differences() {
        let d = spirals(8, 3);
        let p = init(5);
        let idx: Vec<usize> = (0..8).collect();
        let (g, _, _) = gradients(&p, &d, &idx);
        let loss_at = |p: &[Vec<f32>]| {
            let (_, l, _) = gradients(p, &d, &idx);
            l as f64
        };
        for (t, k) in [(0usize, 3usize), (1, 2), (2, 100), (4, 7), (5, 1)] {
            let h = 1e-2f32;
            let mut plus = p.clone();
            plus[t][k] += h;
            let mut minus = p.clone();
            minus[t][k] -= h;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64);
            let analytic = g[t][k] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-2 * (1.0 + analytic.abs()),
                "tensor {t} element {k}: numeric {numeric} analytic {analytic}"
            );
        }
    }

    #[test]
    fn the_data_is_the_same_every_time_and_balanced() {
        let a = spirals(1000, 1);
        let b = spirals(1000, 1);
        assert_eq!(a.x, b.x);
        assert_eq!(a.y, b.y);
        for c in 0..CLASSES as u8 {
            let n = a.y.iter().filter(|&&y| y == c).count();
            assert!((200..300).contains(&n), "class {c}: {n}");
        }
    }
}
