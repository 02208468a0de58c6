//! Vicinity attention (VVT paper §3): linear attention whose query/key features are re-weighted by
//! token positions so that `q'_i·k'_j = relu(q_i)·relu(k_j)·(cos(a_i−a_j) + cos(b_i−b_j))`, a weight
//! that falls with Manhattan distance, computed in O(N) through `k'ᵀv`.
//!
//! The block also holds Feature Reduction Attention (q/k/v projected to C/f), optional spatial
//! reduction of keys/values (r), the Feature Preserving Connection (a squeeze-excitation gate) and
//! the released code's magnitude clamps.
//!
//! Two forms of the same attention live here: [`linear_core`], the plain tensor ops the model
//! runs (the reference of the fused CubeCL core, [`crate::kernels::vicinity`], which replaces it
//! where the backend has kernels), and [`VicinityAttention::forward_reference`], the block with
//! the explicit N×N weight matrix (VVT paper Eq. 8–10), for tests.

use std::f64::consts::FRAC_PI_2;

use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use serde::{Deserialize, Serialize};

use crate::kernels::vicinity::CoreShape;
pub use crate::kernels::vicinity::EPS;
use crate::nn::{Conv2d, Conv2dConfig, ConvInit, LayerNorm, LayerNormConfig, Linear, LinearConfig};

/// How token positions re-weight attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locality {
    /// Row and column angles: a Manhattan-distance weight (the paper's default).
    #[default]
    #[serde(rename = "2d")]
    TwoD,
    /// Flat token index, as in cosFormer.
    #[serde(rename = "1d")]
    OneD,
    /// Plain `relu(q)·relu(k)` linear attention.
    None,
}

impl Locality {
    /// How many re-weighted copies of each feature a head carries.
    pub fn expansion(self) -> usize {
        match self {
            Self::TwoD => 4,
            Self::OneD => 2,
            Self::None => 1,
        }
    }
}

/// Lower and upper magnitude bounds of the released code's clamps.
const CLAMP_MIN: f64 = 1e-4;
const CLAMP_MAX: f64 = 1e4;

/// `sign(t)·min(max(|t|, 1e-4), 1e4)`: keeps magnitudes in range, zeros stay zero.
///
/// Written as `clamp_min` + `clamp_max` rather than `clamp`: CubeCL 0.10's fused `clamp` fails to
/// compile on vectorised lines (seen on the H100).
pub fn clamp_magnitude<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.clone().sign() * t.abs().clamp_min(CLAMP_MIN).clamp_max(CLAMP_MAX)
}

/// The Feature Preserving Connection's gate (VVT paper §3.3, a squeeze-excitation): `sigmoid(fc2 ·
/// relu(fc1 · mean token))`, `B×C` from `x: B×N×C`.
pub fn fpc_gate<B: Backend>(fc1: &Linear<B>, fc2: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 2> {
    let [batch, _, c] = x.dims();
    let pooled = x.mean_dim(1).reshape([batch, c]);
    sigmoid(fc2.forward(relu(fc1.forward(pooled))))
}

/// `out + out·gate`: the attention output kept, plus its channels re-weighted by the gate.
pub fn fpc_apply<B: Backend>(out: Tensor<B, 3>, gate: Tensor<B, 2>) -> Tensor<B, 3> {
    let [batch, c] = gate.dims();
    out.clone() + out * gate.reshape([batch, 1, c])
}

/// Shapes of a Feature Preserving Connection around another attention (VVT paper Table XI).
#[derive(Config, Debug)]
pub struct FeaturePreservingConfig {
    pub dim: usize,
    /// Squeeze to `dim / se_ratio` channels.
    #[config(default = 1)]
    pub se_ratio: usize,
}

impl FeaturePreservingConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeaturePreserving<B> {
        let squeezed = self.dim / self.se_ratio;
        FeaturePreserving {
            se_fc1: LinearConfig::new(self.dim, squeezed)
                .with_bias(false)
                .init(device),
            se_fc2: LinearConfig::new(squeezed, self.dim)
                .with_bias(false)
                .init(device),
        }
    }
}

/// The Feature Preserving Connection as a module of its own, for attentions other than vicinity
/// (whose block keeps the released code's `se_fc` names).
#[derive(Module, Debug)]
pub struct FeaturePreserving<B: Backend> {
    pub se_fc1: Linear<B>,
    pub se_fc2: Linear<B>,
}

impl<B: Backend> FeaturePreserving<B> {
    /// `out` of an attention whose input was `x`, with the connection added.
    pub fn forward(&self, x: Tensor<B, 3>, out: Tensor<B, 3>) -> Tensor<B, 3> {
        fpc_apply(out, fpc_gate(&self.se_fc1, &self.se_fc2, x))
    }
}

#[derive(Config, Debug)]
pub struct VicinityAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    /// Feature reduction ratio f: q/k/v have C/f channels.
    #[config(default = 2)]
    pub feature_reduction: usize,
    /// Spatial reduction ratio r of keys/values (1 = none).
    #[config(default = 1)]
    pub spatial_reduction: usize,
    /// Squeeze ratio ρ of the Feature Preserving Connection.
    #[config(default = 1)]
    pub se_ratio: usize,
    #[config(default = "Locality::TwoD")]
    pub locality: Locality,
    /// Apply the released code's magnitude clamps (needed for parity with official weights).
    #[config(default = true)]
    pub clamp: bool,
    /// The Feature Preserving Connection (off: the attention output alone, VVT Table X).
    #[config(default = true)]
    pub fpc: bool,
}

#[derive(Module, Debug)]
pub struct VicinityAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    /// FPC squeeze (official `se_fc.0`); `None` without the connection.
    pub se_fc1: Option<Linear<B>>,
    /// FPC excitation (official `se_fc.2`).
    pub se_fc2: Option<Linear<B>>,
    pub sr: Option<Conv2d<B>>,
    pub norm: Option<LayerNorm<B>>,
    pub heads: usize,
    #[module(skip)]
    pub locality: Locality,
    pub clamp: bool,
}

impl VicinityAttentionConfig {
    /// cosFormer (Qin et al. 2022) as this block computes it: ReLU features with the cosine
    /// re-weighting of the 1D token distance, no feature reduction, no FPC, no clamps.
    pub fn cosformer(self) -> Self {
        self.with_feature_reduction(1)
            .with_locality(Locality::OneD)
            .with_fpc(false)
            .with_clamp(false)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> VicinityAttention<B> {
        let inner = self.dim / self.feature_reduction;
        let (se_fc1, se_fc2) = match self.fpc {
            true => {
                let fpc = FeaturePreservingConfig::new(self.dim)
                    .with_se_ratio(self.se_ratio)
                    .init(device);
                (Some(fpc.se_fc1), Some(fpc.se_fc2))
            }
            false => (None, None),
        };
        let r = self.spatial_reduction;
        let (sr, norm) = if r > 1 {
            let conv = Conv2dConfig::new([self.dim, self.dim], r)
                .with_stride(r)
                .with_init(ConvInit::FanOut)
                .init(device);
            (Some(conv), Some(LayerNormConfig::new(self.dim).init(device)))
        } else {
            (None, None)
        };
        VicinityAttention {
            q_proj: LinearConfig::new(self.dim, inner).init(device),
            k_proj: LinearConfig::new(self.dim, inner).init(device),
            v_proj: LinearConfig::new(self.dim, inner).init(device),
            out_proj: LinearConfig::new(inner, self.dim).init(device),
            se_fc1,
            se_fc2,
            sr,
            norm,
            heads: self.heads,
            locality: self.locality,
            clamp: self.clamp,
        }
    }
}

/// Per-token angles `(a, b)` of an `h×w` grid, each `N×1`: `a = (π/2)·row/h`, `b = (π/2)·col/w`
/// (2D), or `a = (π/2)·t/N` for the flat index `t` (1D).
fn angles<B: Backend>(
    locality: Locality,
    h: usize,
    w: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = h * w;
    let idx = Tensor::<B, 1, Int>::arange(0..n as i64, device);
    let (a, b) = match locality {
        Locality::OneD => {
            let a = idx.float().mul_scalar(FRAC_PI_2 / n as f64);
            (a.clone(), a)
        }
        _ => {
            let row = idx
                .clone()
                .div_scalar(w as i64)
                .float()
                .mul_scalar(FRAC_PI_2 / h as f64);
            let col = idx
                .remainder_scalar(w as i64)
                .float()
                .mul_scalar(FRAC_PI_2 / w as f64);
            (row, col)
        }
    };
    (a.reshape([n, 1]), b.reshape([n, 1]))
}

/// The position features of every token of an `h×w` grid, `N×E`: `[cos a, sin a, cos b, sin b]`
/// (2D), `[cos a, sin a]` (1D) or `[1]`, so that `φ(i)·φ(j)` is the locality weight.
pub fn position_features<B: Backend>(
    locality: Locality,
    (h, w): (usize, usize),
    device: &B::Device,
) -> Tensor<B, 2> {
    if locality == Locality::None {
        return Tensor::ones([h * w, 1], device);
    }
    let (a, b) = angles::<B>(locality, h, w, device);
    let mut parts = vec![a.clone().cos(), a.sin()];
    if locality == Locality::TwoD {
        parts.push(b.clone().cos());
        parts.push(b.sin());
    }
    Tensor::cat(parts, 1)
}

/// Re-weighted features: `[x cos a, x sin a, x cos b, x sin b]` (2D), `[x cos a, x sin a]` (1D),
/// or `x` itself, for `x: B×heads×N×d`.
pub fn reweight<B: Backend>(x: Tensor<B, 4>, locality: Locality, h: usize, w: usize) -> Tensor<B, 4> {
    if locality == Locality::None {
        return x;
    }
    let (a, b) = angles::<B>(locality, h, w, &x.device());
    let [n, _] = a.dims();
    let expand = |t: Tensor<B, 2>| t.reshape([1, 1, n, 1]);
    let mut parts = vec![x.clone() * expand(a.clone().cos()), x.clone() * expand(a.sin())];
    if locality == Locality::TwoD {
        parts.push(x.clone() * expand(b.clone().cos()));
        parts.push(x * expand(b.sin()));
    }
    Tensor::cat(parts, 3)
}

/// The locality weight between every query of a `qh×qw` grid and every key of a `kh×kw` grid
/// (`Nq×Nk`), written out explicitly: `cos(a_i−a_j) + cos(b_i−b_j)` for 2D.
pub fn locality_matrix<B: Backend>(
    locality: Locality,
    q_grid: (usize, usize),
    k_grid: (usize, usize),
    device: &B::Device,
) -> Tensor<B, 2> {
    let (nq, nk) = (q_grid.0 * q_grid.1, k_grid.0 * k_grid.1);
    if locality == Locality::None {
        return Tensor::ones([nq, nk], device);
    }
    let (qa, qb) = angles::<B>(locality, q_grid.0, q_grid.1, device);
    let (ka, kb) = angles::<B>(locality, k_grid.0, k_grid.1, device);
    let da = qa - ka.reshape([1, nk]);
    let db = qb - kb.reshape([1, nk]);
    match locality {
        Locality::TwoD => da.cos() + db.cos(),
        _ => da.cos(),
    }
}

/// The locality weights of one query token of an `h×w` grid against every token of a `k_grid`
/// (VVT paper Fig. 3): row `query` of [`locality_matrix`], computed for that row alone.
pub fn locality_row<B: Backend>(
    locality: Locality,
    grid: (usize, usize),
    k_grid: (usize, usize),
    query: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let nk = k_grid.0 * k_grid.1;
    if locality == Locality::None {
        return Tensor::ones([nk], device);
    }
    let (qa, qb) = angles::<B>(locality, grid.0, grid.1, device);
    let (qa, qb) = (qa.slice(query..query + 1), qb.slice(query..query + 1));
    let (ka, kb) = angles::<B>(locality, k_grid.0, k_grid.1, device);
    let (da, db) = ((qa - ka.reshape([1, nk])).cos(), (qb - kb.reshape([1, nk])).cos());
    let row = match locality {
        Locality::TwoD => da + db,
        _ => da,
    };
    row.reshape([nk])
}

/// Shapes and switches of one vicinity attention core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VicinityCore {
    pub heads: usize,
    /// Query grid `(rows, cols)`; the keys' grid may be smaller (spatial reduction).
    pub q_grid: (usize, usize),
    pub k_grid: (usize, usize),
    pub locality: Locality,
    pub clamp: bool,
}

/// The linear core: `q`: `B×N×(h·d)` (after ReLU), `k`, `v`: `B×M×(h·d)` (`k` after ReLU) →
/// `B×N×(h·d)`, heads concatenated. The fused kernel where the backend has it, else
/// [`linear_core`].
pub fn vicinity_core<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    cfg: VicinityCore,
) -> Tensor<B, 3> {
    if !crate::kernels::available::<B>() {
        return linear_core(q, k, v, cfg);
    }
    let device = q.device();
    let phi = cached_features::<B>(cfg.locality, cfg.q_grid, &device);
    let psi = cached_features::<B>(cfg.locality, cfg.k_grid, &device);
    let shape = CoreShape {
        heads: cfg.heads,
        clamp: cfg.clamp,
    };
    match crate::kernels::vicinity::fused(q, k, v, phi, psi, shape) {
        Ok(y) => y,
        Err((q, k, v)) => linear_core(q, k, v, cfg),
    }
}

/// The position features of a grid in f32, built once per backend, device and grid: they are
/// constants, and rebuilding them took ~8 kernel launches per attention layer and step, where the
/// host's time per launch is most of a training step on the GPU.
fn cached_features<B: Backend>(locality: Locality, grid: (usize, usize), device: &B::Device) -> Tensor<B, 2> {
    crate::backend::cached_constant(
        format!("vicinity position features {locality:?} {grid:?}"),
        device,
        || position_features::<B>(locality, grid, device).cast(burn::tensor::FloatDType::F32),
    )
}

/// `B×L×(h·d)` → `B×h×L×d`.
fn split_heads<B: Backend>(t: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, len, inner] = t.dims();
    t.reshape([b, len, heads, inner / heads]).swap_dims(1, 2)
}

/// [`vicinity_core`] in plain tensor ops: per-head re-weighted features, `k'ᵀv`, the normaliser
/// and the clamps, all kept by autodiff for the backward.
pub fn linear_core<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    cfg: VicinityCore,
) -> Tensor<B, 3> {
    let [batch, n, c] = q.dims();
    assert!(
        n == cfg.q_grid.0 * cfg.q_grid.1
            && k.dims() == [batch, cfg.k_grid.0 * cfg.k_grid.1, c]
            && k.dims() == v.dims()
            && c.is_multiple_of(cfg.heads),
        "vicinity core: q {:?}, k {:?}, v {:?} do not fit grids {:?} / {:?} and {} heads",
        q.dims(),
        k.dims(),
        v.dims(),
        cfg.q_grid,
        cfg.k_grid,
        cfg.heads
    );
    let heads = cfg.heads;
    let split = |t| split_heads(t, heads);
    let clamp = |t: Tensor<B, 4>| if cfg.clamp { clamp_magnitude(t) } else { t };
    let qr = reweight(split(q), cfg.locality, cfg.q_grid.0, cfg.q_grid.1);
    let kr = reweight(split(k), cfg.locality, cfg.k_grid.0, cfg.k_grid.1);
    let kv = clamp(kr.clone().swap_dims(2, 3).matmul(split(v)));
    // q'·Σk' as a broadcast product and a sum rather than a matrix-vector product (n = 1), a
    // shape CubeCL's untuned matmul handles poorly; it fuses instead.
    let k_sum = kr.sum_dim(2);
    let z = clamp((qr.clone() * k_sum).sum_dim(3).add_scalar(EPS).recip());
    let num = clamp(qr.matmul(kv));
    clamp(num * z).swap_dims(1, 2).reshape([batch, n, c])
}

/// Which way the attention core is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Core {
    /// O(N): through `k'ᵀv` (what the model uses).
    Linear,
    /// O(N²): the explicit weight matrix (VVT paper Eq. 8–10), for tests.
    Quadratic,
}

impl<B: Backend> VicinityAttention<B> {
    /// `x: B×N×C` tokens of an `h×w` grid → `B×N×C`.
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        self.forward_core(x, h, w, Core::Linear)
    }

    /// The same block with the explicit N×N attention weights (no clamps inside the core; the
    /// clamps on the block's outputs still follow `self.clamp`).
    pub fn forward_reference(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        self.forward_core(x, h, w, Core::Quadratic)
    }

    /// The tokens keys and values come from, `B×M×C`, and their grid: `x` itself, or its
    /// spatially reduced grid (stride-r conv, LayerNorm) when r > 1.
    fn key_source(&self, x: Tensor<B, 3>, h: usize, w: usize) -> (Tensor<B, 3>, (usize, usize)) {
        match (&self.sr, &self.norm) {
            (Some(sr), Some(norm)) => {
                let [batch, _, c] = x.dims();
                let reduced = sr.forward(x.reshape([batch, h, w, c]));
                let [_, kh, kw, _] = reduced.dims();
                (norm.forward(reduced.reshape([batch, kh * kw, c])), (kh, kw))
            }
            _ => (x, (h, w)),
        }
    }

    fn maybe_clamp<const D: usize>(&self, t: Tensor<B, D>) -> Tensor<B, D> {
        if self.clamp { clamp_magnitude(t) } else { t }
    }

    fn forward_core(&self, x: Tensor<B, 3>, h: usize, w: usize, core: Core) -> Tensor<B, 3> {
        let [batch, n, _] = x.dims();
        // Feature Preserving Connection gate from the mean token.
        let gate = match (&self.se_fc1, &self.se_fc2) {
            (Some(fc1), Some(fc2)) => Some(fpc_gate(fc1, fc2, x.clone())),
            _ => None,
        };

        let (src, (kh, kw)) = self.key_source(x.clone(), h, w);

        let heads = self.heads;
        let q = relu(self.q_proj.forward(x));
        let k = relu(self.k_proj.forward(src.clone()));
        let v = self.v_proj.forward(src);

        let merged = match core {
            Core::Linear => {
                let cfg = VicinityCore {
                    heads,
                    q_grid: (h, w),
                    k_grid: (kh, kw),
                    locality: self.locality,
                    clamp: self.clamp,
                };
                vicinity_core(q, k, v, cfg)
            }
            Core::Quadratic => {
                let split = |t| split_heads(t, heads);
                let weights = self.weights(split(q), split(k), (h, w), (kh, kw));
                let out = weights.matmul(split(v));
                let [_, _, _, d] = out.dims();
                out.swap_dims(1, 2).reshape([batch, n, heads * d])
            }
        };
        let out = self.maybe_clamp(self.out_proj.forward(merged));
        match gate {
            Some(gate) => self.maybe_clamp(fpc_apply(out, gate)),
            None => out,
        }
    }
}

impl<B: Backend> VicinityAttention<B> {
    /// The N×M attention matrix `B×h×N×M` of per-head queries `q` (`B×h×N×d`, after ReLU) and
    /// keys `k` (`B×h×M×d`): `q_i·k_j·loc(i, j)` normalised per query (VVT paper Eq. 8).
    fn weights(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        grid: (usize, usize),
        k_grid: (usize, usize),
    ) -> Tensor<B, 4> {
        let loc = locality_matrix::<B>(self.locality, grid, k_grid, &q.device());
        let [nq, nk] = loc.dims();
        let scores = q.matmul(k.swap_dims(2, 3)) * loc.reshape([1, 1, nq, nk]);
        let denom = scores.clone().sum_dim(3).add_scalar(EPS);
        scores / denom
    }

    /// Row `query` of the attention matrix that the linear form implies, `heads×M` for the first
    /// image of `x: B×N×C` on an `h×w` grid (M: the keys' grid, returned, smaller than the
    /// queries' with spatial reduction). One query's row alone, in O(N). A row sums to
    /// `S / (S + EPS)` (`S` its unnormalised sum): one up to EPS, zero where the head's ReLU
    /// features of the query are all zero.
    pub fn attention_row(
        &self,
        x: Tensor<B, 3>,
        (h, w): (usize, usize),
        query: usize,
    ) -> (Tensor<B, 2>, (usize, usize)) {
        let [_, n, _] = x.dims();
        assert!(query < n, "query token {query} of {n}");
        let x = x.slice_dim(0, 0..1);
        let (src, (kh, kw)) = self.key_source(x.clone(), h, w);
        let heads = self.heads;
        let q = split_heads(relu(self.q_proj.forward(x.slice_dim(1, query..query + 1))), heads);
        let k = split_heads(relu(self.k_proj.forward(src)), heads);
        let m = kh * kw;
        let loc = locality_row::<B>(self.locality, (h, w), (kh, kw), query, &q.device());
        let scores = q.matmul(k.swap_dims(2, 3)).reshape([heads, m]) * loc.reshape([1, m]);
        let denom = scores.clone().sum_dim(1).add_scalar(EPS);
        (scores / denom, (kh, kw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    fn rel(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let d: f32 = (a - b.clone()).powi_scalar(2).sum().into_scalar();
        let n: f32 = b.powi_scalar(2).sum().into_scalar();
        (d / n).sqrt()
    }

    fn check(locality: Locality, h: usize, w: usize, r: usize) {
        let device = Default::default();
        let attn = VicinityAttentionConfig::new(24, 3)
            .with_spatial_reduction(r)
            .with_locality(locality)
            .with_clamp(false)
            .init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, h * w, 24], Distribution::Normal(0.0, 1.0), &device);
        let fast = attn.forward(x.clone(), h, w);
        let slow = attn.forward_reference(x, h, w);
        let err = rel(fast, slow);
        assert!(err < 1e-4, "{locality:?} {h}x{w} r={r}: rel err {err}");
    }

    #[test]
    fn linear_form_equals_quadratic_form() {
        for locality in [Locality::TwoD, Locality::OneD, Locality::None] {
            check(locality, 6, 6, 1);
            check(locality, 4, 10, 1);
            check(locality, 8, 6, 2);
            check(locality, 4, 8, 4);
        }
    }

    /// One query's row, computed alone, is that row of the N×M matrix of the quadratic form;
    /// with keys from a reduced grid too.
    #[test]
    fn one_query_row_equals_the_row_of_the_quadratic_form() {
        let device = Default::default();
        for (locality, (h, w), r) in [
            (Locality::TwoD, (4, 6), 1),
            (Locality::OneD, (5, 3), 1),
            (Locality::TwoD, (8, 4), 2),
        ] {
            let attn = VicinityAttentionConfig::new(24, 3)
                .with_spatial_reduction(r)
                .with_locality(locality)
                .init::<B>(&device);
            let x = Tensor::<B, 3>::random([2, h * w, 24], Distribution::Normal(0.0, 1.0), &device);
            let (src, kgrid) = match (&attn.sr, &attn.norm) {
                (Some(sr), Some(norm)) => {
                    let reduced = sr.forward(x.clone().reshape([2, h, w, 24]));
                    let [_, kh, kw, _] = reduced.dims();
                    (norm.forward(reduced.reshape([2, kh * kw, 24])), (kh, kw))
                }
                _ => (x.clone(), (h, w)),
            };
            let q = split_heads(relu(attn.q_proj.forward(x.clone())), 3);
            let k = split_heads(relu(attn.k_proj.forward(src)), 3);
            let full = attn.weights(q, k, (h, w), kgrid); // 2×3×N×M
            let m = kgrid.0 * kgrid.1;
            for query in [0, h * w / 2 + 1, h * w - 1] {
                let (row, got_grid) = attn.attention_row(x.clone(), (h, w), query);
                assert_eq!(got_grid, kgrid);
                let want = full
                    .clone()
                    .slice([0..1, 0..3, query..query + 1, 0..m])
                    .reshape([3, m]);
                let d: f32 = (row.clone() - want).abs().max().into_scalar();
                assert!(d < 1e-5, "{locality:?} {h}x{w} r={r} query {query}: max diff {d}");
                let sums: Vec<f32> = row.sum_dim(1).into_data().to_vec().unwrap();
                // S / (S + EPS): at most one; zero for a head whose query features are all zero.
                assert!(
                    sums.iter().all(|s| (0.0..=1.0 + 1e-5).contains(s)),
                    "row sums {sums:?}"
                );
            }
        }
    }

    #[test]
    fn locality_row_is_that_row_of_the_matrix() {
        let device = Default::default();
        for locality in [Locality::TwoD, Locality::OneD, Locality::None] {
            let ((h, w), kgrid) = ((5, 7), (5, 7));
            let full = locality_matrix::<B>(locality, (h, w), kgrid, &device);
            for query in [0, 17, 34] {
                let row = locality_row::<B>(locality, (h, w), kgrid, query, &device);
                let want = full.clone().slice([query..query + 1, 0..35]).reshape([35]);
                let d: f32 = (row - want).abs().max().into_scalar();
                assert!(d < 1e-6, "{locality:?} query {query}: {d}");
            }
        }
    }

    #[test]
    fn reweighted_features_give_the_locality_weight() {
        // q'ᵢ·k'ⱼ with unit features is exactly the locality matrix.
        let device = Default::default();
        let (h, w) = (5, 7);
        let ones = Tensor::<B, 4>::ones([1, 1, h * w, 1], &device);
        let f = reweight(ones, Locality::TwoD, h, w);
        let gram = f.clone().matmul(f.swap_dims(2, 3)).reshape([h * w, h * w]);
        let explicit = locality_matrix::<B>(Locality::TwoD, (h, w), (h, w), &device);
        let d: f32 = (gram - explicit).abs().max().into_scalar();
        assert!(d < 1e-5, "max diff {d}");
    }

    #[test]
    fn locality_weight_falls_with_manhattan_distance() {
        let device = Default::default();
        let (h, w) = (9, 9);
        let m = locality_matrix::<B>(Locality::TwoD, (h, w), (h, w), &device);
        let values: Vec<f32> = m.into_data().to_vec().unwrap();
        let query = 0; // corner (0, 0): every key is "down-right" of it
        let weight = |r: usize, c: usize| values[query * h * w + r * w + c];
        assert!((weight(0, 0) - 2.0).abs() < 1e-6, "self weight is 2");
        for r in 0..h {
            for c in 0..w {
                if r + 1 < h {
                    assert!(
                        weight(r + 1, c) < weight(r, c),
                        "falls down the column at ({r},{c})"
                    );
                }
                if c + 1 < w {
                    assert!(
                        weight(r, c + 1) < weight(r, c),
                        "falls along the row at ({r},{c})"
                    );
                }
            }
        }
        // From the centre, keys at a larger Manhattan distance along one axis weigh less.
        let centre = 4 * w + 4;
        let from_centre = |r: usize, c: usize| values[centre * h * w + r * w + c];
        assert!(from_centre(4, 4) > from_centre(4, 5));
        assert!(from_centre(4, 5) > from_centre(5, 5));
        assert!(from_centre(5, 5) > from_centre(6, 5));
        assert!((from_centre(3, 4) - from_centre(5, 4)).abs() < 1e-6, "symmetric");
    }

    #[test]
    fn clamp_keeps_zero_and_bounds_magnitudes() {
        let device = Default::default();
        let t = Tensor::<B, 1>::from_floats([0.0, 1e-7, -1e-7, 5.0, -2e5, 3e4], &device);
        let c: Vec<f32> = clamp_magnitude(t).into_data().to_vec().unwrap();
        assert_eq!(c, vec![0.0, 1e-4, -1e-4, 5.0, -1e4, 1e4]);
    }

    #[test]
    fn clamps_are_switchable() {
        let device = Default::default();
        let x = Tensor::<B, 3>::random([1, 16, 8], Distribution::Normal(0.0, 1.0), &device);
        let mut with = VicinityAttentionConfig::new(8, 2).init::<B>(&device);
        // An out_proj that outputs 1e-6 everywhere: the clamp lifts it to 1e-4, no clamp keeps it.
        with.out_proj.weight = with.out_proj.weight.clone().map(|w| w.zeros_like());
        with.out_proj.bias = with
            .out_proj
            .bias
            .clone()
            .map(|b| b.map(|t| t.zeros_like().add_scalar(1e-6)));
        let mut without = with.clone();
        without.clamp = false;
        let max_abs = |t: Tensor<B, 3>| -> f32 { t.abs().max().into_scalar() };
        let min_abs = |t: Tensor<B, 3>| -> f32 { t.abs().min().into_scalar() };
        assert!(max_abs(without.forward(x.clone(), 4, 4)) < 2.1e-6);
        assert!(min_abs(with.forward(x, 4, 4)) >= 0.99e-4);
    }
}
