//! Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"):
//! keys and values are projected along the token axis, `N → k`, by learned `E` and `F` (shared by
//! the heads), so the N queries attend to k projected tokens: O(N·k) instead of O(N²). `q`, `kv`
//! (keys then values, as [`super::softmax`]) and `proj` as in softmax attention, scale `1/√d_h`.
//!
//! `E` and `F` are `Linear(N, k)` over the token axis, so a layer is built for one token count: a
//! Linformer model runs at the resolution it was built for. `E` and `F` have no bias, as the
//! paper's projection matrices.
//!
//! [`LinformerAttention::forward_reference`] computes the same with plain loops over host memory,
//! for the tests.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::host::{HostLinear, attend, host};
use super::softmax::{scaled_dot_product, split_kv};
use crate::nn::{Linear, LinearConfig};

/// Shapes of a [`LinformerAttention`].
#[derive(Config, Debug)]
pub struct LinformerAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    /// The token count N the layer is built for (`E` and `F` are `Linear(N, k)`).
    pub tokens: usize,
    /// The projected length k; the layer uses `min(projected, tokens)`, since projecting to more
    /// tokens than there are adds nothing.
    #[config(default = 64)]
    pub projected: usize,
}

impl LinformerAttentionConfig {
    /// The k the layer uses: `min(projected, tokens)`.
    pub fn projected_tokens(&self) -> usize {
        self.projected.min(self.tokens)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> LinformerAttention<B> {
        assert!(
            self.heads > 0 && self.dim.is_multiple_of(self.heads),
            "attention dim {} is not divisible by {} heads",
            self.dim,
            self.heads
        );
        assert!(
            self.tokens > 0 && self.projected > 0,
            "Linformer needs tokens ({}) and projected tokens ({}) above 0",
            self.tokens,
            self.projected
        );
        let k = self.projected_tokens();
        let along_tokens = || {
            LinearConfig::new(self.tokens, k)
                .with_bias(false)
                .init::<B>(device)
        };
        LinformerAttention {
            q: LinearConfig::new(self.dim, self.dim).init(device),
            kv: LinearConfig::new(self.dim, 2 * self.dim).init(device),
            e: along_tokens(),
            f: along_tokens(),
            proj: LinearConfig::new(self.dim, self.dim).init(device),
            heads: self.heads,
            tokens: self.tokens,
        }
    }
}

/// Softmax attention of N queries over k keys and values projected along the token axis.
#[derive(Module, Debug)]
pub struct LinformerAttention<B: Backend> {
    pub q: Linear<B>,
    /// Keys then values (`Linear(D, 2·D)`).
    pub kv: Linear<B>,
    /// `E`: projects the keys over the tokens, `Linear(N, k)`.
    pub e: Linear<B>,
    /// `F`: projects the values over the tokens, `Linear(N, k)`.
    pub f: Linear<B>,
    pub proj: Linear<B>,
    pub heads: usize,
    /// The token count N the layer is built for.
    pub tokens: usize,
}

impl<B: Backend> LinformerAttention<B> {
    /// The projected length k.
    pub fn projected_tokens(&self) -> usize {
        self.e.weight.dims()[1]
    }

    fn check_tokens(&self, n: usize) {
        assert!(
            n == self.tokens,
            "Linformer layer built for {} tokens got {n}: a Linformer model runs at the resolution it was \
             built for",
            self.tokens
        );
    }

    /// `x`: `B×N×D` → `B×N×D`; N must be the token count the layer was built for.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        self.check_tokens(n);
        let (h, dh, k) = (self.heads, d / self.heads, self.projected_tokens());
        let q = self.q.forward(x.clone()).reshape([b, n, h, dh]).swap_dims(1, 2);
        let (keys, values) = split_kv(self.kv.forward(x));
        // `[B,N,D]` → `[B,D,N]` → `[B,D,k]`; channels are head-major, so `[B,h,d_h,k]` is a plain
        // reshape, and swapping the last two gives `[B,h,k,d_h]`.
        let project = |t: Tensor<B, 3>, along: &Linear<B>| {
            along
                .forward(t.swap_dims(1, 2))
                .reshape([b, h, dh, k])
                .swap_dims(2, 3)
        };
        let (keys, values) = (project(keys, &self.e), project(values, &self.f));
        let out = scaled_dot_product(q, keys, values)
            .swap_dims(1, 2)
            .reshape([b, n, d]);
        self.proj.forward(out)
    }

    /// The weight each token's value gets in token `query`'s output (first image of
    /// `x: B×N×D`), `heads×N`: the softmax over the `k` projected keys, mapped back to the
    /// tokens through `F` (`Σ_t p_t·F_tj`; `F`'s bias, the same for every token, left out).
    pub fn attention_row(&self, x: Tensor<B, 3>, query: usize) -> Tensor<B, 2> {
        let [_, n, d] = x.dims();
        self.check_tokens(n);
        let (h, dh, k) = (self.heads, d / self.heads, self.projected_tokens());
        let x = x.slice_dim(0, 0..1);
        let q = self
            .q
            .forward(x.clone().slice_dim(1, query..query + 1))
            .reshape([h, 1, dh]);
        let (keys, _) = split_kv(self.kv.forward(x));
        let keys = self.e.forward(keys.swap_dims(1, 2)).reshape([h, dh, k]);
        let p = softmax(q.matmul(keys).mul_scalar((dh as f64).powf(-0.5)), 2).reshape([h, k]);
        p.matmul(self.f.weight.val().transpose())
    }

    /// The same computation with explicit loops over channels, tokens, heads and keys.
    pub fn forward_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        self.check_tokens(n);
        let (h, dh, k) = (self.heads, d / self.heads, self.projected_tokens());
        let device = x.device();
        let xs = host(x);
        let [wq, wkv, we, wf, wp] = HostLinear::all([&self.q, &self.kv, &self.e, &self.f, &self.proj]);
        let mut out = Vec::with_capacity(b * n * d);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * d..(bi * n + ni + 1) * d];
            let kv: Vec<Vec<f32>> = (0..n).map(|ni| wkv.apply(tok(ni))).collect();
            // Row j: projected key j, then projected value j (the layout `attend` reads).
            let mut projected = vec![vec![0.0f32; 2 * d]; k];
            for ch in 0..d {
                let keys: Vec<f32> = kv.iter().map(|t| t[ch]).collect();
                let values: Vec<f32> = kv.iter().map(|t| t[d + ch]).collect();
                let pairs = we.apply(&keys).into_iter().zip(wf.apply(&values));
                for (row, (pk, pv)) in projected.iter_mut().zip(pairs) {
                    row[ch] = pk;
                    row[d + ch] = pv;
                }
            }
            for ni in 0..n {
                let q = wq.apply(tok(ni));
                out.extend(wp.apply(&attend(&q, &projected, h, h, dh)));
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
    }
}

/// Multiply-accumulates per image: `q`, `kv` and `proj` over N tokens, `E` and `F` over the D
/// channels, and the scores and weighted values of N queries over k keys (`k` clamped to N).
pub fn macs(dim: usize, heads: usize, tokens: usize, k: usize) -> u64 {
    let (c, n, k) = (dim as u64, tokens as u64, k.min(tokens) as u64);
    let (h, dh) = (heads as u64, (dim / heads) as u64);
    let linears = n * c * c + n * c * 2 * c + n * c * c;
    let along_tokens = 2 * c * n * k;
    let attention = h * 2 * n * k * dh;
    linears + along_tokens + attention
}

#[cfg(test)]
mod tests {
    use super::super::host::tests::{max_rel_err, randomise_biases};
    use super::super::softmax::SoftmaxAttentionConfig;
    use super::*;
    use burn::module::Param;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    /// Weights of std 0.5, so that the softmax is far from uniform.
    fn randomise_weights(layers: [&mut Linear<B>; 5]) {
        for l in layers {
            let dims = l.weight.dims();
            let w = Tensor::random(dims, Distribution::Normal(0.0, 0.5), &l.weight.device());
            l.weight = Param::from_tensor(w);
        }
    }

    fn random_layer(dim: usize, heads: usize, tokens: usize, projected: usize) -> LinformerAttention<B> {
        let device = Default::default();
        let mut attn = LinformerAttentionConfig::new(dim, heads, tokens)
            .with_projected(projected)
            .init::<B>(&device);
        randomise_weights([
            &mut attn.q,
            &mut attn.kv,
            &mut attn.e,
            &mut attn.f,
            &mut attn.proj,
        ]);
        randomise_biases([&mut attn.q, &mut attn.kv, &mut attn.proj]);
        attn
    }

    #[test]
    fn forward_matches_reference() {
        let device = Default::default();
        // k below N, and k at or above N (clamped to N).
        for (heads, projected, k) in [(2, 5, 5), (4, 5, 5), (1, 5, 5), (2, 12, 12), (2, 20, 12)] {
            let attn = random_layer(16, heads, 12, projected);
            assert_eq!(attn.e.weight.dims(), [12, k]);
            assert_eq!(attn.f.weight.dims(), [12, k]);
            let x = Tensor::<B, 3>::random([2, 12, 16], Distribution::Normal(0.0, 1.0), &device);
            let err = max_rel_err(attn.forward(x.clone()), attn.forward_reference(x));
            assert!(err < 1e-4, "heads {heads} projected {projected}: rel err {err}");
        }
    }

    /// Weighing the tokens' values with one query's row (then `proj`) gives that query's output
    /// (with `F`'s bias, which the row leaves out, at zero).
    #[test]
    fn one_query_row_gives_that_query_output() {
        let device = Default::default();
        let (n, d, h) = (12, 16, 2);
        let mut attn = random_layer(d, h, n, 5);
        attn.f.bias = None;
        let x = Tensor::<B, 3>::random([1, n, d], Distribution::Normal(0.0, 1.0), &device);
        let all = attn.forward(x.clone());
        let (_, v) = split_kv(attn.kv.forward(x.clone()));
        let v = v.reshape([n, h, d / h]).swap_dims(0, 1);
        for query in [0, 5, n - 1] {
            let row = attn.attention_row(x.clone(), query);
            let mixed = row.unsqueeze_dim::<3>(1).matmul(v.clone()).reshape([1, 1, d]);
            let want = all.clone().slice([0..1, query..query + 1, 0..d]);
            let err = max_rel_err(attn.proj.forward(mixed), want);
            assert!(err < 1e-4, "query {query}: rel err {err}");
        }
    }

    /// With `E = F = I` (k = N) the projection keeps every key and value: softmax attention.
    #[test]
    fn identity_projections_give_softmax_attention() {
        let device = Default::default();
        let mut attn = random_layer(16, 4, 9, 64);
        attn.e.weight = Param::from_tensor(Tensor::<B, 2>::eye(9, &device));
        attn.f.weight = Param::from_tensor(Tensor::<B, 2>::eye(9, &device));
        let mut softmax = SoftmaxAttentionConfig::new(16, 4).init::<B>(&device);
        softmax.wq = attn.q.clone();
        softmax.wkv = attn.kv.clone();
        softmax.proj = attn.proj.clone();
        let x = Tensor::<B, 3>::random([2, 9, 16], Distribution::Normal(0.0, 1.0), &device);
        let err = max_rel_err(attn.forward(x.clone()), softmax.forward(x));
        assert!(err < 1e-5, "rel err {err}");
    }

    #[test]
    #[should_panic(expected = "Linformer layer built for 12 tokens got 10: a Linformer model runs at")]
    fn wrong_token_count_panics() {
        let device = Default::default();
        let attn = LinformerAttentionConfig::new(16, 2, 12).init::<B>(&device);
        let _ = attn.forward(Tensor::<B, 3>::zeros([1, 10, 16], &device));
    }

    /// `q`, `kv` and `proj` (four `D×D` linears with biases), plus `E` and `F` (`N×k` each).
    #[test]
    fn parameter_count() {
        let device = Default::default();
        let (d, n) = (16, 12);
        for (projected, k) in [(5, 5), (64, 12)] {
            let attn = LinformerAttentionConfig::new(d, 2, n)
                .with_projected(projected)
                .init::<B>(&device);
            assert_eq!(
                attn.num_params(),
                4 * (d * d + d) + 2 * n * k,
                "projected {projected}"
            );
        }
    }

    #[test]
    fn macs_count_projections_and_attention() {
        let (c, n, k) = (16u64, 12u64, 5u64);
        assert_eq!(macs(16, 2, 12, 5), 4 * n * c * c + 2 * c * n * k + 2 * n * k * c);
        // k above N counts as N.
        assert_eq!(macs(16, 2, 12, 64), macs(16, 2, 12, 12));
    }
}
