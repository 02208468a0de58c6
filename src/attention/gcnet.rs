//! The global context block of GCNet (Cao et al. 2019, "GCNet: Non-local Networks Meet
//! Squeeze-Excitation Networks"), a competitor of the VVT paper in place of a stage's attention:
//! one softmax over the N positions (`mask`, GCNet's 1×1 `conv_mask`) pools the tokens into one
//! context vector, which a bottleneck transform (`down`, LayerNorm, ReLU, `up`: GCNet's
//! `channel_add_conv` with `r = ratio`) turns into one vector added to every position. Cost
//! O(N·C), and the same output for every token.
//!
//! [`GlobalContext::forward_reference`] computes the same with plain loops over host memory, for
//! the tests.

use burn::prelude::*;
use burn::tensor::activation::relu;

use super::host::{HostLinear, host};
use crate::kernels::softmax::softmax_scaled;
use crate::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};

/// Shapes of a [`GlobalContext`] block.
#[derive(Config, Debug)]
pub struct GlobalContextConfig {
    pub dim: usize,
    /// Bottleneck reduction r of the transform (GCNet's 1/4): `hidden = max(dim / ratio, 1)`.
    #[config(default = 4)]
    pub ratio: usize,
}

impl GlobalContextConfig {
    /// Width of the bottleneck, `max(dim / ratio, 1)`.
    pub fn hidden(&self) -> usize {
        (self.dim / self.ratio).max(1)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> GlobalContext<B> {
        assert!(
            self.dim > 0 && self.ratio > 0,
            "global context needs dim ({}) and ratio ({}) above 0",
            self.dim,
            self.ratio
        );
        let hidden = self.hidden();
        GlobalContext {
            mask: LinearConfig::new(self.dim, 1).init(device),
            down: LinearConfig::new(self.dim, hidden).init(device),
            norm: LayerNormConfig::new(hidden).init(device),
            up: LinearConfig::new(hidden, self.dim).init(device),
        }
    }
}

/// GCNet's global context block, less its residual: the layer returns only the transformed
/// context `t` (broadcast to every token), because the VVT block around it adds its own residual
/// (`x + attn(norm(x))`), which makes it GCNet's fusion by addition, `x + t`.
#[derive(Module, Debug)]
pub struct GlobalContext<B: Backend> {
    /// GCNet's `conv_mask`: one attention logit per position.
    pub mask: Linear<B>,
    /// `Linear(D, hidden)`, GCNet's first 1×1 conv of `channel_add_conv`.
    pub down: Linear<B>,
    /// LayerNorm over the `hidden` channels (GCNet's over `[C/r, 1, 1]`), ε = 1e-5.
    pub norm: LayerNorm<B>,
    /// `Linear(hidden, D)`, the second 1×1 conv.
    pub up: Linear<B>,
}

impl<B: Backend> GlobalContext<B> {
    /// `x`: `B×N×D` → `B×N×D`, the same vector at every token.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        // `[B,N,1]` logits are `[B,1,N]` as they lie: a softmax over the last axis, then one
        // product pools the tokens into `[B,1,D]`.
        let weights = softmax_scaled(self.mask.forward(x.clone()).reshape([b, 1, n]), 1.0);
        let context = weights.matmul(x);
        let t = self
            .up
            .forward(relu(self.norm.forward(self.down.forward(context))));
        t.expand([b, n, d])
    }

    /// The context weights over the tokens of the first image of `x: B×N×D`, `1×N`: one row,
    /// the same for every query (GCNet's query-independent attention).
    pub fn attention_row(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [_, n, _] = x.dims();
        let logits = self.mask.forward(x.slice_dim(0, 0..1)).reshape([1, n]);
        softmax_scaled(logits.reshape([1, 1, n]), 1.0).reshape([1, n])
    }

    /// The same computation with explicit loops over tokens and channels.
    pub fn forward_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let device = x.device();
        let xs = host(x);
        let [wm, wd, wu] = HostLinear::all([&self.mask, &self.down, &self.up]);
        let (gamma, beta) = (host(self.norm.gamma.val()), host(self.norm.beta.val()));
        let eps = self.norm.epsilon as f32;
        let mut out = Vec::with_capacity(b * n * d);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * d..(bi * n + ni + 1) * d];
            let logits: Vec<f32> = (0..n).map(|ni| wm.apply(tok(ni))[0]).collect();
            let mut context = vec![0.0f32; d];
            for (ni, a) in softmax(&logits).into_iter().enumerate() {
                for (c, v) in context.iter_mut().zip(tok(ni)) {
                    *c += a * v;
                }
            }
            let down = wd.apply(&context);
            let len = down.len() as f32;
            let mean = down.iter().sum::<f32>() / len;
            let var = down.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / len;
            let hidden: Vec<f32> = down
                .iter()
                .zip(gamma.iter().zip(&beta))
                .map(|(v, (g, be))| ((v - mean) / (var + eps).sqrt() * g + be).max(0.0))
                .collect();
            let t = wu.apply(&hidden);
            for _ in 0..n {
                out.extend_from_slice(&t);
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
    }
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Multiply-accumulates per image over `n` tokens: the logits and the weighted sum (`n·D` each),
/// and the bottleneck transform of the one context vector (`2·D·hidden`).
pub fn macs(dim: usize, ratio: usize, n: usize) -> u64 {
    let (c, n) = (dim as u64, n as u64);
    let hidden = (dim / ratio).max(1) as u64;
    2 * n * c + 2 * c * hidden
}

#[cfg(test)]
mod tests {
    use super::super::host::tests::{max_rel_err, randomise_biases};
    use super::*;
    use burn::module::Param;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    /// Random weights, biases and norm affine, so that the softmax is far from uniform and every
    /// parameter reaches the output.
    fn random_block(dim: usize) -> GlobalContext<B> {
        let device = Default::default();
        let mut block = GlobalContextConfig::new(dim).init::<B>(&device);
        for l in [&mut block.mask, &mut block.down, &mut block.up] {
            let dims = l.weight.dims();
            let w = Tensor::random(dims, Distribution::Normal(0.0, 0.5), &device);
            l.weight = Param::from_tensor(w);
        }
        randomise_biases([&mut block.mask, &mut block.down, &mut block.up]);
        let hidden = block.norm.gamma.dims()[0];
        let affine =
            |mean| Param::from_tensor(Tensor::random([hidden], Distribution::Normal(mean, 0.5), &device));
        block.norm.gamma = affine(1.0);
        block.norm.beta = affine(0.0);
        block
    }

    #[test]
    fn forward_matches_reference() {
        let device = Default::default();
        let block = random_block(16);
        for n in [12, 7] {
            let x = Tensor::<B, 3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device);
            let err = max_rel_err(block.forward(x.clone()), block.forward_reference(x));
            assert!(err < 1e-4, "n {n}: rel err {err}");
        }
    }

    /// The context row sums to one, and pooling the tokens with it gives the context the block
    /// adds (through `down`, the norm and `up`).
    #[test]
    fn context_row_pools_the_context() {
        let device = Default::default();
        let block = random_block(16);
        let x = Tensor::<B, 3>::random([1, 7, 16], Distribution::Normal(0.0, 1.0), &device);
        let row = block.attention_row(x.clone());
        let sum: f32 = row.clone().sum().into_scalar();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        let context = row.unsqueeze_dim::<3>(0).matmul(x.clone());
        let added = block
            .up
            .forward(relu(block.norm.forward(block.down.forward(context))));
        let want = block.forward(x).slice([0..1, 0..1, 0..16]);
        let err = max_rel_err(added, want);
        assert!(err < 1e-5, "rel err {err}");
    }

    /// Global context: every token gets the same vector, and the order of the tokens is
    /// irrelevant.
    #[test]
    fn output_is_the_same_for_every_token() {
        let device = Default::default();
        let block = random_block(16);
        let x = Tensor::<B, 3>::random([2, 12, 16], Distribution::Normal(0.0, 1.0), &device);
        let y = block.forward(x.clone());
        let first = y.clone().slice([0..2, 0..1, 0..16]).expand([2, 12, 16]);
        let spread: f32 = (y.clone() - first).abs().max().into_scalar();
        assert_eq!(spread, 0.0);
        let err = max_rel_err(block.forward(x.flip([1])), y);
        assert!(err < 1e-5, "token order changed the output: rel err {err}");
    }

    /// `mask` (D + 1), `down` (D·h + h), the norm (2·h) and `up` (h·D + D); h at least 1.
    #[test]
    fn parameter_count_and_hidden_width() {
        let device = Default::default();
        for (d, ratio, h) in [(16, 4, 4), (16, 1, 16), (3, 4, 1)] {
            let config = GlobalContextConfig::new(d).with_ratio(ratio);
            assert_eq!(config.hidden(), h);
            let block = config.init::<B>(&device);
            let want = (d + 1) + (d * h + h) + 2 * h + (h * d + d);
            assert_eq!(block.num_params(), want, "dim {d} ratio {ratio}");
            assert_eq!(macs(d, ratio, 10), (2 * 10 * d + 2 * d * h) as u64);
        }
    }
}
