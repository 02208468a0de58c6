//! Performer attention (FAVOR+, Choromanski et al. 2021, "Rethinking Attention with Performers"):
//! softmax attention estimated through positive orthogonal random features `φ`, so that
//! `softmax(q·kᵀ/√d)·v ≈ D⁻¹·φ(Q)·(φ(K)ᵀ·V)` with `D = diag(φ(Q)·(φ(K)ᵀ·1))`: linear in the token
//! count N, where softmax attention is quadratic. Projections as in [`super::softmax`]: `q:
//! Linear(C, C)` split into h heads of `d = C/h`, `kv: Linear(C, 2·C)` (keys first, then values),
//! heads concatenated and projected by `proj: Linear(C, C)`. All heads share one `m×d` feature
//! matrix `ω`.
//!
//! With `feature_reduction` f > 1 and `fpc`, the layer sits inside VVT's Vicinity Attention Block
//! (VVT paper Table XI): `q`, `kv` project to `C/f` channels, `proj` back from `C/f`, and the
//! Feature Preserving Connection of [`super::vicinity`] gates the output.
//!
//! The paper redraws `ω` during training so that the model does not fit one draw: under autodiff
//! every forward draws fresh features (a function of the layer's seed and of the draw the trainer
//! set for the step, [`seed_draws`]); evaluation uses the features of the layer's `seed`, so
//! inference is deterministic.
//!
//! [`PerformerAttention::forward_reference`] computes the same with plain loops over host memory
//! and the explicit N×N kernel matrix, and [`PerformerAttention::exact_softmax_reference`] the
//! softmax attention it estimates, for the tests.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::host::{HostLinear, attend, fpc_host, host};
use super::softmax::split_kv;
use super::vicinity::{FeaturePreserving, FeaturePreservingConfig};
use crate::nn::{Linear, LinearConfig};

/// Added to every feature after the exponential (lucidrains' `eps`): keeps `D` away from zero.
pub const KERNEL_EPS: f64 = 1e-4;

/// The next training draw: each training forward takes one and gets its own features. The trainer
/// sets it from its seed and step ([`seed_draws`]), so a resumed run draws what the uninterrupted
/// one would have.
static DRAWS: AtomicU64 = AtomicU64::new(0);

/// Makes the next training forwards draw from `seed` on (the trainer calls this before each step).
pub fn seed_draws(seed: u64) {
    DRAWS.store(seed, Ordering::Relaxed);
}

/// Shapes of a Performer attention.
#[derive(Config, Debug)]
pub struct PerformerAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    /// Number m of random features per head.
    #[config(default = 64)]
    pub features: usize,
    /// Seed of the evaluation features (and base of the training draws); give each layer its own
    /// so that layers do not share one draw.
    #[config(default = 0)]
    pub seed: u64,
    /// Feature Reduction Attention: queries, keys and values have `dim / feature_reduction`
    /// channels.
    #[config(default = 1)]
    pub feature_reduction: usize,
    /// The Feature Preserving Connection (squeeze `dim → dim / se_ratio`, excitation back).
    #[config(default = false)]
    pub fpc: bool,
    #[config(default = 1)]
    pub se_ratio: usize,
}

impl PerformerAttentionConfig {
    /// Channels of queries, keys and values: `dim / feature_reduction`.
    pub fn inner(&self) -> usize {
        self.dim / self.feature_reduction.max(1)
    }

    pub fn head_dim(&self) -> usize {
        self.inner() / self.heads
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> PerformerAttention<B> {
        assert!(
            self.feature_reduction > 0 && self.dim.is_multiple_of(self.feature_reduction),
            "performer attention: dim {} is not divisible by feature reduction {}",
            self.dim,
            self.feature_reduction
        );
        let inner = self.inner();
        assert!(
            self.heads > 0 && inner.is_multiple_of(self.heads),
            "performer attention: {inner} channels are not divisible by {} heads",
            self.heads
        );
        assert!(
            self.features > 0,
            "performer attention: needs at least one random feature"
        );
        PerformerAttention {
            q: LinearConfig::new(self.dim, inner).init(device),
            kv: LinearConfig::new(self.dim, 2 * inner).init(device),
            proj: LinearConfig::new(inner, self.dim).init(device),
            fpc: self.fpc.then(|| {
                FeaturePreservingConfig::new(self.dim)
                    .with_se_ratio(self.se_ratio)
                    .init(device)
            }),
            heads: self.heads,
            features: self.features,
            seed: self.seed,
            redraw: true,
        }
    }
}

/// Performer (FAVOR+) attention over all tokens, `B×N×C` → `B×N×C`.
#[derive(Module, Debug)]
pub struct PerformerAttention<B: Backend> {
    pub q: Linear<B>,
    /// Keys then values (the first half of its output are the keys).
    pub kv: Linear<B>,
    pub proj: Linear<B>,
    /// The Feature Preserving Connection, when the layer has one.
    pub fpc: Option<FeaturePreserving<B>>,
    pub heads: usize,
    /// Number m of random features per head.
    pub features: usize,
    /// Seed of the evaluation features.
    pub seed: u64,
    /// Draw fresh features in training forwards (off: the evaluation features always, for
    /// gradients of the evaluation model).
    pub redraw: bool,
}

impl PerformerAttentionConfig {
    /// Multiply-accumulates of one image of `n` tokens: the `q`, `kv` and `proj` linears, `ω·x` of
    /// queries and keys, `φ(K)ᵀ·V`, `φ(Q)·(φ(K)ᵀ·V)` and the normaliser `φ(Q)·Σφ(K)`, per head,
    /// and the Feature Preserving Connection's two linears (exponentials and sums left out, as in
    /// [`crate::flops`]).
    pub fn macs(&self, n: usize) -> u64 {
        let (c, i, h, m, n) = (
            self.dim as u64,
            self.inner() as u64,
            self.heads as u64,
            self.features as u64,
            n as u64,
        );
        let d = i / h;
        let linears = n * c * i + n * c * 2 * i + n * i * c;
        let core = h * (2 * n * m * d + 2 * n * m * d + n * m);
        linears + core + self.fpc_params()
    }

    /// Learnt parameters: the three linears with biases and the connection's two (`ω` is drawn,
    /// not learnt).
    pub fn params(&self) -> u64 {
        let (c, i) = (self.dim as u64, self.inner() as u64);
        (c * i + i) + (c * 2 * i + 2 * i) + (i * c + c) + self.fpc_params()
    }

    fn fpc_params(&self) -> u64 {
        match self.fpc {
            true => 2 * (self.dim * (self.dim / self.se_ratio)) as u64,
            false => 0,
        }
    }
}

/// A standard normal (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The rows of a `d×d` row-major matrix made orthonormal by Gram–Schmidt, each row orthogonalised
/// twice against the previous ones ("twice is enough": one pass loses orthogonality to rounding).
fn orthonormal_rows(mut a: Vec<f64>, d: usize) -> Vec<f64> {
    for i in 0..d {
        let (done, rest) = a.split_at_mut(i * d);
        let row = &mut rest[..d];
        for _ in 0..2 {
            for prev in done.chunks(d) {
                let p = dot64(row, prev);
                row.iter_mut().zip(prev).for_each(|(r, q)| *r -= p * q);
            }
        }
        let norm = dot64(row, row).sqrt();
        row.iter_mut().for_each(|r| *r /= norm);
    }
    a
}

/// `m` positive orthogonal random features of width `d`, row-major `m×d`, a pure function of
/// `seed`: lucidrains' `gaussian_orthogonal_random_matrix` with `scaling = 0`. Blocks of `d`
/// orthonormal rows (Gram–Schmidt of a `d×d` Gaussian matrix, the last block cut to the rows still
/// needed), each row then scaled by the length of an independent `d`-dim Gaussian vector: the
/// rows are marginally Gaussian (chi-distributed lengths), as the unbiased estimator needs, while
/// orthogonality within a block lowers its variance.
pub fn orthogonal_features(m: usize, d: usize, seed: u64) -> Vec<f32> {
    assert!(d > 0, "orthogonal features: width must be positive");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(m.div_ceil(d) * d * d);
    for _ in 0..m.div_ceil(d) {
        let block: Vec<f64> = (0..d * d).map(|_| normal(&mut rng)).collect();
        rows.extend(orthonormal_rows(block, d));
    }
    rows.truncate(m * d);
    let mut out = Vec::with_capacity(m * d);
    for row in rows.chunks(d) {
        let length = (0..d).map(|_| normal(&mut rng).powi(2)).sum::<f64>().sqrt();
        out.extend(row.iter().map(|r| (r * length) as f32));
    }
    out
}

/// The seed of training draw `draw` of a layer seeded `seed` (a SplitMix64 mix of both).
fn redraw_seed(seed: u64, draw: u64) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15) ^ draw.wrapping_add(1).wrapping_mul(0xd1b5_4a32_d192_ed03))
}

fn features_tensor<B: Backend>(m: usize, d: usize, seed: u64, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(orthogonal_features(m, d, seed), [m, d]), device)
}

/// The evaluation features, built once per backend, device and shape: a constant, which would
/// otherwise cost a host draw and an upload per layer and forward.
fn fixed_features<B: Backend>(m: usize, d: usize, seed: u64, device: &B::Device) -> Tensor<B, 2> {
    crate::backend::cached_constant(format!("performer features {m}x{d} seed {seed}"), device, || {
        features_tensor::<B>(m, d, seed, device)
    })
}

/// `φ(x)` of queries or keys `x: B×h×N×d` with features `omega: m×d` → `B×h×N×m`. This is
/// lucidrains' `softmax_kernel` (performer-pytorch) exactly: with `x' = x·d^(-1/4)`,
/// `φ(x)_i = m^(-1/2)·(exp(ω_i·x' − |x'|²/2 − max) + eps)`, where `max` (kept out of the
/// gradient) is the row's largest `ω·x'` for queries and the largest over all keys and features
/// of the head for keys: it cancels in `D⁻¹` for queries, and scales all keys alike.
pub fn softmax_kernel<B: Backend>(x: Tensor<B, 4>, omega: Tensor<B, 2>, is_query: bool) -> Tensor<B, 4> {
    let [b, h, n, d] = x.dims();
    let [m, _] = omega.dims();
    let x = x.mul_scalar((d as f64).powf(-0.25));
    let dash = x
        .clone()
        .reshape([b * h * n, d])
        .matmul(omega.transpose())
        .reshape([b, h, n, m]);
    let diag = x.powi_scalar(2).sum_dim(3).mul_scalar(0.5);
    let row_max = dash.clone().max_dim(3);
    let max = if is_query { row_max } else { row_max.max_dim(2) };
    (dash - diag - max.detach())
        .exp()
        .add_scalar(KERNEL_EPS)
        .mul_scalar((m as f64).powf(-0.5))
}

/// `φ` of host rows (the loop form of [`softmax_kernel`]).
fn host_kernel(xs: &[Vec<f64>], omega: &[f64], d: usize, is_query: bool) -> Vec<Vec<f64>> {
    let m = omega.len() / d;
    let s = (d as f64).powf(-0.25);
    let dash: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| omega.chunks(d).map(|w| s * dot64(w, x)).collect())
        .collect();
    let key_max = dash.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
    xs.iter()
        .zip(&dash)
        .map(|(x, row)| {
            let diag = s * s * dot64(x, x) / 2.0;
            let max = if is_query {
                row.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            } else {
                key_max
            };
            row.iter()
                .map(|a| ((a - diag - max).exp() + KERNEL_EPS) / (m as f64).sqrt())
                .collect()
        })
        .collect()
}

/// Head `hi`'s `d` values of a host row starting at channel `offset + hi·d`, in f64.
fn head_part(t: &[f32], offset: usize, hi: usize, d: usize) -> Vec<f64> {
    t[offset + hi * d..offset + (hi + 1) * d]
        .iter()
        .map(|&v| f64::from(v))
        .collect()
}

impl<B: Backend> PerformerAttention<B> {
    /// `x`: `B×N×C` → `B×N×C`, with fresh features under autodiff (training) and the features of
    /// `seed` otherwise.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let device = x.device();
        let d = self.head_dim();
        let omega = if self.redraw && B::ad_enabled(&device) {
            let draw = DRAWS.fetch_add(1, Ordering::Relaxed);
            features_tensor::<B>(self.features, d, redraw_seed(self.seed, draw), &device)
        } else {
            fixed_features::<B>(self.features, d, self.seed, &device)
        };
        self.forward_with_features(x, omega)
    }

    /// [`Self::forward`] with given features `omega: m×d` (`d` the head width): `φ(K)ᵀ·V` and
    /// `φ(K)ᵀ·1` first, so that nothing of size N×N is formed.
    pub fn forward_with_features(&self, x: Tensor<B, 3>, omega: Tensor<B, 2>) -> Tensor<B, 3> {
        let [b, n, _] = x.dims();
        let (h, d) = (self.heads, self.head_dim());
        assert_eq!(
            omega.dims()[1],
            d,
            "performer attention: features of width {} for heads of width {d}",
            omega.dims()[1]
        );
        let split = |t: Tensor<B, 3>| t.reshape([b, n, h, d]).swap_dims(1, 2);
        let q = split(self.q.forward(x.clone()));
        let (k, v) = split_kv(self.kv.forward(x.clone()));
        let omega = omega.cast(q.dtype());
        let q = softmax_kernel(q, omega.clone(), true);
        let k = softmax_kernel(split(k), omega, false);
        let context = k.clone().swap_dims(2, 3).matmul(split(v)); // B×h×m×d
        // φ(Q)·Σφ(K) as a broadcast product and a sum rather than a matrix-vector product.
        let denom = (q.clone() * k.sum_dim(2)).sum_dim(3); // B×h×N×1
        let out = q.matmul(context) / denom;
        let out = self.proj.forward(out.swap_dims(1, 2).reshape([b, n, h * d]));
        match &self.fpc {
            Some(fpc) => fpc.forward(x, out),
            None => out,
        }
    }

    /// The weights `φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j)` of token `query` of the first image of
    /// `x: B×N×C` over every token, `heads×N`, with the evaluation features: the row of the
    /// kernel matrix that the linear form sums without forming it.
    pub fn attention_row(&self, x: Tensor<B, 3>, query: usize) -> Tensor<B, 2> {
        let [_, n, _] = x.dims();
        let (h, d) = (self.heads, self.head_dim());
        let x = x.slice_dim(0, 0..1);
        let omega = fixed_features::<B>(self.features, d, self.seed, &x.device()).cast(x.dtype());
        let split = |t: Tensor<B, 3>| {
            let m = t.dims()[1];
            t.reshape([1, m, h, d]).swap_dims(1, 2)
        };
        let q = self.q.forward(x.clone().slice_dim(1, query..query + 1));
        let q = softmax_kernel(split(q), omega.clone(), true);
        let (k, _) = split_kv(self.kv.forward(x));
        let k = softmax_kernel(split(k), omega, false);
        let scores = q.matmul(k.swap_dims(2, 3)).reshape([h, n]);
        scores.clone() / scores.sum_dim(1)
    }

    /// Channels of each head: those of the queries over the heads.
    pub fn head_dim(&self) -> usize {
        self.q.weight.dims()[1] / self.heads
    }

    /// The evaluation forward with explicit loops and the N×N kernel matrix `φ(q_i)·φ(k_j)`,
    /// normalised per query: the quadratic form the linear one rearranges.
    pub fn forward_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let (h, d) = (self.heads, self.head_dim());
        let device = x.device();
        let xs = host(x);
        let [wq, wkv, wp] = HostLinear::all([&self.q, &self.kv, &self.proj]);
        let omega: Vec<f64> = orthogonal_features(self.features, d, self.seed)
            .into_iter()
            .map(f64::from)
            .collect();
        let mut out = Vec::with_capacity(b * n * c);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * c..(bi * n + ni + 1) * c];
            let q: Vec<Vec<f32>> = (0..n).map(|ni| wq.apply(tok(ni))).collect();
            let kv: Vec<Vec<f32>> = (0..n).map(|ni| wkv.apply(tok(ni))).collect();
            let mut heads_out = vec![vec![0.0f64; h * d]; n];
            for hi in 0..h {
                let qs: Vec<Vec<f64>> = q.iter().map(|t| head_part(t, 0, hi, d)).collect();
                let ks: Vec<Vec<f64>> = kv.iter().map(|t| head_part(t, 0, hi, d)).collect();
                let vs: Vec<Vec<f64>> = kv.iter().map(|t| head_part(t, h * d, hi, d)).collect();
                let (qf, kf) = (
                    host_kernel(&qs, &omega, d, true),
                    host_kernel(&ks, &omega, d, false),
                );
                for (qi, row) in qf.iter().zip(heads_out.iter_mut()) {
                    let a: Vec<f64> = kf.iter().map(|kj| dot64(qi, kj)).collect();
                    let total: f64 = a.iter().sum();
                    for (aij, vj) in a.iter().zip(&vs) {
                        for (o, v) in row[hi * d..(hi + 1) * d].iter_mut().zip(vj) {
                            *o += aij / total * v;
                        }
                    }
                }
            }
            let mut image: Vec<f32> = Vec::with_capacity(n * c);
            for row in &heads_out {
                let row: Vec<f32> = row.iter().map(|&v| v as f32).collect();
                image.extend(wp.apply(&row));
            }
            self.fpc_reference(&xs[bi * n * c..(bi + 1) * n * c], &mut image);
            out.extend(image);
        }
        Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
    }

    /// The Feature Preserving Connection, if any, on one image's output by loops.
    fn fpc_reference(&self, xs: &[f32], out: &mut [f32]) {
        if let Some(fpc) = &self.fpc {
            let [fc1, fc2] = HostLinear::all([&fpc.se_fc1, &fpc.se_fc2]);
            fpc_host(&fc1, &fc2, xs, out);
        }
    }

    /// The softmax attention the layer estimates, with the same weights (scores `q·k/√d`), by
    /// explicit loops.
    pub fn exact_softmax_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let (h, d) = (self.heads, self.head_dim());
        let device = x.device();
        let xs = host(x);
        let [wq, wkv, wp] = HostLinear::all([&self.q, &self.kv, &self.proj]);
        let mut out = Vec::with_capacity(b * n * c);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * c..(bi * n + ni + 1) * c];
            let kv: Vec<Vec<f32>> = (0..n).map(|ni| wkv.apply(tok(ni))).collect();
            let mut image: Vec<f32> = (0..n)
                .flat_map(|ni| wp.apply(&attend(&wq.apply(tok(ni)), &kv, h, h, d)))
                .collect();
            self.fpc_reference(&xs[bi * n * c..(bi + 1) * n * c], &mut image);
            out.extend(image);
        }
        Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::tests::{max_rel_err, randomise_biases};
    use super::*;
    use burn::module::{AutodiffModule, Param};
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;
    type Train = burn::backend::Autodiff<B>;

    /// Query and key/value weights of normal(0, `std`): larger than the initial 0.02, so that the
    /// attention weights are far from uniform.
    fn with_weights<Bk: Backend>(mut attn: PerformerAttention<Bk>, std: f64) -> PerformerAttention<Bk> {
        for l in [&mut attn.q, &mut attn.kv] {
            let w = Tensor::random(
                l.weight.dims(),
                Distribution::Normal(0.0, std),
                &l.weight.device(),
            );
            l.weight = Param::from_tensor(w);
        }
        attn
    }

    #[test]
    fn linear_form_equals_explicit_kernel_form() {
        let device = Default::default();
        let cfg = PerformerAttentionConfig::new(16, 2)
            .with_features(32)
            .with_seed(7);
        let mut attn = with_weights(cfg.init::<B>(&device), 0.15);
        randomise_biases([&mut attn.q, &mut attn.kv, &mut attn.proj]);
        for n in [12, 15] {
            let x = Tensor::<B, 3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device);
            let err = max_rel_err(attn.forward(x.clone()), attn.forward_reference(x));
            assert!(err < 1e-4, "N {n}: rel err {err}");
        }
    }

    /// Inside the Vicinity Attention Block (Table XI): half the channels, and the connection.
    #[test]
    fn feature_reduction_and_fpc_follow_the_loops_and_count_their_parameters() {
        use burn::module::Module;
        let device = Default::default();
        let cfg = PerformerAttentionConfig::new(16, 2)
            .with_features(24)
            .with_seed(3)
            .with_feature_reduction(2)
            .with_fpc(true)
            .with_se_ratio(2);
        let mut attn = with_weights(cfg.init::<B>(&device), 0.15);
        randomise_biases([&mut attn.q, &mut attn.kv, &mut attn.proj]);
        assert_eq!(attn.head_dim(), 4);
        assert_eq!(cfg.params() as usize, attn.num_params());
        let x = Tensor::<B, 3>::random([2, 10, 16], Distribution::Normal(0.0, 1.0), &device);
        let err = max_rel_err(attn.forward(x.clone()), attn.forward_reference(x.clone()));
        assert!(err < 1e-4, "rel err {err}");
        // The connection changes the output: without it the layer computes something else.
        let mut plain = attn.clone();
        plain.fpc = None;
        let change = max_rel_err(plain.forward(x.clone()), attn.forward(x));
        assert!(change > 0.1, "the connection changed the output by {change} only");
        let plain_cfg = PerformerAttentionConfig::new(16, 2);
        assert_eq!(
            plain_cfg.params() as usize,
            plain_cfg.init::<B>(&device).num_params()
        );
    }

    /// Weighing the values with one query's row (then `proj`) gives that query's evaluation
    /// output.
    #[test]
    fn one_query_row_gives_that_query_output() {
        let device = Default::default();
        let (n, c, h) = (9, 16, 2);
        let attn = with_weights(
            PerformerAttentionConfig::new(c, h)
                .with_features(16)
                .init::<B>(&device),
            0.15,
        );
        let x = Tensor::<B, 3>::random([1, n, c], Distribution::Normal(0.0, 1.0), &device);
        let all = attn.forward(x.clone());
        let (_, v) = split_kv(attn.kv.forward(x.clone()));
        let v = v.reshape([n, h, c / h]).swap_dims(0, 1);
        for query in [0, 4, n - 1] {
            let row = attn.attention_row(x.clone(), query);
            let mixed = row.unsqueeze_dim::<3>(1).matmul(v.clone()).reshape([1, 1, c]);
            let want = all.clone().slice([0..1, query..query + 1, 0..c]);
            let err = max_rel_err(attn.proj.forward(mixed), want);
            assert!(err < 1e-4, "query {query}: rel err {err}");
        }
    }

    #[test]
    fn features_are_orthogonal_within_blocks_and_follow_the_seed() {
        let (m, d) = (20, 8); // two full blocks and a partial one
        let w = orthogonal_features(m, d, 3);
        assert_eq!(w.len(), m * d);
        let unit: Vec<Vec<f64>> = w
            .chunks(d)
            .map(|r| {
                let r: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
                let norm = dot64(&r, &r).sqrt();
                r.iter().map(|v| v / norm).collect()
            })
            .collect();
        for (bi, block) in unit.chunks(d).enumerate() {
            for (i, a) in block.iter().enumerate() {
                for (j, b) in block.iter().enumerate().skip(i + 1) {
                    let p = dot64(a, b);
                    assert!(p.abs() < 1e-4, "block {bi}: rows {i} and {j} have cosine {p}");
                }
            }
        }
        assert_eq!(orthogonal_features(m, d, 3), w, "a pure function of the seed");
        assert_ne!(orthogonal_features(m, d, 4), w, "another seed, other features");
        // Chi-distributed lengths (not all √d): the mean squared length is d.
        let many = orthogonal_features(4096, d, 5);
        let sq: Vec<f64> = many
            .chunks(d)
            .map(|r| r.iter().map(|&v| f64::from(v).powi(2)).sum())
            .collect();
        let mean = sq.iter().sum::<f64>() / sq.len() as f64;
        assert!((mean - d as f64).abs() < 0.3, "mean squared length {mean}");
        let spread =
            sq.iter().copied().fold(0.0, f64::max) - sq.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(spread > 1.0, "lengths vary: spread {spread}");
    }

    #[test]
    fn more_features_approach_softmax_attention() {
        let device = Default::default();
        let base = with_weights(PerformerAttentionConfig::new(16, 2).init::<B>(&device), 0.15);
        let x = Tensor::<B, 3>::random([2, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let exact = base.exact_softmax_reference(x.clone());
        let seeds = 4;
        let err = |m: usize| {
            let total: f32 = (0..seeds)
                .map(|seed| {
                    let mut attn = base.clone();
                    attn.features = m;
                    attn.seed = seed;
                    max_rel_err(attn.forward(x.clone()), exact.clone())
                })
                .sum();
            total / seeds as f32
        };
        let (few, many) = (err(16), err(2048));
        assert!(many < few, "m = 2048: rel err {many}, m = 16: {few}");
        // One draw of random weights and inputs in many reached 0.152: the bound leaves room.
        assert!(many < 0.25, "m = 2048: rel err {many}");
    }

    #[test]
    fn training_redraws_the_features_and_evaluation_does_not() {
        let device = Default::default();
        let cfg = PerformerAttentionConfig::new(16, 2).with_features(8);
        let attn = with_weights(cfg.init::<Train>(&device), 0.15);
        let x = Tensor::<Train, 3>::random([1, 6, 16], Distribution::Normal(0.0, 1.0), &device);
        let (a, b) = (attn.forward(x.clone()), attn.forward(x.clone()));
        let change = max_rel_err(a.inner(), b.inner());
        assert!(change > 1e-3, "two training forwards differ by {change} only");
        let eval = attn.valid();
        let x = x.inner();
        assert_eq!(
            eval.forward(x.clone()).into_data(),
            eval.forward(x).into_data(),
            "evaluation is deterministic"
        );
    }
}
