//! The demo's dataset: four interleaved spiral arms in the plane, seen
//! through a fixed random non-linear embedding in 16 dimensions. Generated
//! from a seed, so every process builds the same samples without a file.

/// Features per sample.
pub const FEATURES: usize = 16;
/// Classes (spiral arms).
pub const CLASSES: usize = 4;

/// Samples, row-major, and their labels.
pub struct Dataset {
    /// `len * FEATURES` features.
    pub x: Vec<f32>,
    /// One label per sample, below `CLASSES`.
    pub y: Vec<u8>,
}

impl Dataset {
    /// Samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Sample `i`'s features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * FEATURES..(i + 1) * FEATURES]
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// Seeded (any seed; zero is mapped away).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal (the sum of four uniforms, centred and scaled).
    pub fn normal(&mut self) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit() - 2.0) * 1.732
    }
    /// A permutation of 0..n (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// `n` samples drawn with `seed` (the embedding is the same for every seed).
pub fn spirals(n: usize, seed: u64) -> Dataset {
    let mut emb = Rng::new(7);
    let proj: Vec<(f32, f32, f32)> = (0..FEATURES)
        .map(|_| {
            (
                emb.normal() * 1.5,
                emb.normal() * 1.5,
                emb.unit() * std::f32::consts::TAU,
            )
        })
        .collect();
    let mut r = Rng::new(seed);
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let c = (r.next_u64() % CLASSES as u64) as usize;
        let t = r.unit();
        let angle = c as f32 * std::f32::consts::FRAC_PI_2 + t * 8.0;
        let radius = 0.1 + t;
        let px = radius * angle.cos() + 0.03 * r.normal();
        let py = radius * angle.sin() + 0.03 * r.normal();
        for &(a, b, phase) in &proj {
            x.push((a * px + b * py + phase).sin());
        }
        y.push(c as u8);
    }
    Dataset { x, y }
}
