//! A small deterministic random number generator.
//!
//! Data order and every augmentation draw are a pure function of (seed, epoch, sample or batch
//! index), so a resumed run sees exactly the data it would have seen, whatever the thread count.
//! We use our own SplitMix64 rather than `rand`'s `StdRng` because its output is fixed by this
//! file, not by a dependency's version: a checkpoint resumed after an upgrade still gets the same
//! data order.

/// Which independent stream a generator serves (order, one sample, one batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The epoch's shuffled order.
    Order = 1,
    /// The augmentation of one sample (index = dataset index of the sample).
    Sample = 2,
    /// Batch-level draws: Mixup / CutMix (index = batch index in the epoch).
    Batch = 3,
}

/// SplitMix64: tiny, fast and statistically sound for augmentation purposes.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: mix64(seed) }
    }

    /// The generator for one (seed, epoch, stream, index): a pure function of its arguments.
    pub fn for_item(seed: u64, epoch: u64, stream: Stream, index: u64) -> Self {
        let mut h = mix64(seed ^ 0x5eed_f00d_da7a_0001);
        h = mix64(h ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        h = mix64(h ^ (stream as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
        h = mix64(h ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
        Rng { state: h }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n); `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform integer in [lo, hi], both ends included (Python's `random.randint`).
    pub fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as usize) as i64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fills `out` with standard normals, using both outputs of each Box-Muller step (random
    /// erasing draws one per erased value, so this halves its cost).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for pair in out.chunks_mut(2) {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            pair[0] = (r * c) as f32;
            if let Some(v) = pair.get_mut(1) {
                *v = (r * s) as f32;
            }
        }
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang, boosted for shape < 1.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b), as numpy's `np.random.beta` used by timm's Mixup.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y == 0.0 { 0.5 } else { x / (x + y) }
    }

    /// A permutation of 0..n (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_pure_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::for_item(1, 2, Stream::Sample, 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let b = Rng::for_item(1, 2, Stream::Sample, 4).next_u64();
        let c = Rng::for_item(1, 3, Stream::Sample, 3).next_u64();
        let d = Rng::for_item(1, 2, Stream::Batch, 3).next_u64();
        assert!(a[0] != b && a[0] != c && a[0] != d && b != c);
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let mut r = Rng::new(7);
        let n = 20_000;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let u: Vec<f64> = (0..n).map(|_| r.uniform()).collect();
        assert!((mean(&u) - 0.5).abs() < 0.01);
        let z: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = mean(&z);
        let var = z.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{m} {var}");
        // Beta(0.8, 0.8): mean 0.5, variance ab/((a+b)^2 (a+b+1)) = 0.64/(2.56*2.6) ~ 0.0962.
        let b: Vec<f64> = (0..n).map(|_| r.beta(0.8, 0.8)).collect();
        let m = mean(&b);
        let var = b.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(
            (m - 0.5).abs() < 0.01 && (var - 0.0962).abs() < 0.005,
            "{m} {var}"
        );
        assert!(b.iter().all(|x| (0.0..=1.0).contains(x)));
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[r.int_inclusive(0, 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 850), "{seen:?}");
        let mut p = r.permutation(100);
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
