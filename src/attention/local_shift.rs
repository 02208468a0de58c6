//! LSAGT's locally shifted attention (the first layer of the first stage): every token has T
//! embeddings, one per shifted image variant. One query, from variant 0 of the token, is compared
//! with the keys of the T variants of *that same token*; the softmax over T weighs their values
//! into the token's "virtually located" patch. Cost O(N·T) instead of O((N·T)²). Projections as
//! in [`super::softmax`] (`wq`, `wkv`, `proj`).
//!
//! [`LocalShiftAttention::forward_reference`] computes the same with plain loops over host
//! memory, for the tests.

use burn::nn::Dropout;
use burn::prelude::*;

use super::host::{HostLinear, attend, host};
use super::softmax::SoftmaxAttentionConfig;
use crate::kernels::local_attention::{LocalHeads, local_attention};
use crate::nn::Linear;

impl SoftmaxAttentionConfig {
    pub fn init_local<B: Backend>(&self, device: &B::Device) -> LocalShiftAttention<B> {
        let (wq, wkv, proj, proj_drop) = self.parts(device);
        LocalShiftAttention {
            wq,
            wkv,
            proj,
            proj_drop,
            heads: self.heads,
            kv_heads: self.kv_heads(),
        }
    }
}

/// Local attention over the T shifted variants of each token.
#[derive(Module, Debug)]
pub struct LocalShiftAttention<B: Backend> {
    /// Official `Wq_even`.
    pub wq: Linear<B>,
    /// Official `Wkv_even`.
    pub wkv: Linear<B>,
    pub proj: Linear<B>,
    pub proj_drop: Dropout,
    pub heads: usize,
    pub kv_heads: usize,
}

impl<B: Backend> LocalShiftAttention<B> {
    /// `x`: `B×N×D` (the normalised variant-0 tokens, source of the queries); `variants`:
    /// `T×B×N×D` (the normalised tokens of every variant, source of keys and values).
    /// Returns `B×N×D`.
    pub fn forward(&self, x: Tensor<B, 3>, variants: Tensor<B, 4>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        let heads = LocalHeads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: d / self.heads,
        };
        // Query head `kvh_i·g + g_i` uses key/value head `kvh_i` (crate::kernels::local_attention).
        // `wkv`'s bias stays out of the `T×B×N` keys and values: the keys' part adds the same
        // `q·b_k` to every variant's score, which the softmax over the variants cancels, and the
        // values' part comes out of the weighted sum whole, added here to the `B×N` output.
        let kv = variants.matmul(self.wkv.weight.val().unsqueeze());
        let out = local_attention(self.wq.forward(x), kv, heads);
        let out = match &self.wkv.bias {
            Some(bias) => {
                let (kvh, dh) = (self.kv_heads, heads.head_dim);
                let g = self.heads / kvh;
                let value_bias = bias
                    .val()
                    .slice(kvh * dh..2 * kvh * dh)
                    .reshape([kvh, 1, dh])
                    .expand([kvh, g, dh])
                    .reshape([1, 1, d]);
                out + value_bias
            }
            None => out,
        };
        self.proj_drop.forward(self.proj.forward(out))
    }

    /// The softmax weights of each token's query over its T variants, `B×heads×N×T` (what
    /// [`Self::forward`] weighs the variants' values with; LSAGT paper Figs. 1–2).
    pub fn weights(&self, x: Tensor<B, 3>, variants: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, n, d] = x.dims();
        let t = variants.dims()[0];
        let (h, kvh) = (self.heads, self.kv_heads);
        let (g, dh) = (h / kvh, d / h);
        let q = self.wq.forward(x).reshape([b, n, kvh, g, dh]);
        // Keys without their bias: it adds the same score to every variant (see `forward`).
        let kv = variants.matmul(self.wkv.weight.val().unsqueeze());
        let k = kv.slice_dim(3, 0..kvh * dh).reshape([t, b, n, kvh, 1, dh]);
        let scores = (q.unsqueeze_dim::<6>(0) * k)
            .sum_dim(5)
            .mul_scalar((dh as f64).powf(-0.5));
        // T×B×N×kvh×g×1 → B×h×N×T, query head `kvh_i·g + g_i`.
        let scores = scores.reshape([t, b, n, h]).permute([1, 3, 2, 0]);
        burn::tensor::activation::softmax(scores, 3)
    }

    /// The same computation with explicit loops over tokens, heads and variants.
    pub fn forward_reference(&self, x: Tensor<B, 3>, variants: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let t = variants.dims()[0];
        let (h, kvh, dh) = (self.heads, self.kv_heads, d / self.heads);
        let device = x.device();
        let xs = host(x);
        let vs = host(variants);
        let [wq, wkv, wp] = HostLinear::all([&self.wq, &self.wkv, &self.proj]);
        let mut out = Vec::with_capacity(b * n * d);
        for bi in 0..b {
            for ni in 0..n {
                let row = |s: &[f32], vi: Option<usize>| {
                    let base = match vi {
                        Some(ti) => ((ti * b + bi) * n + ni) * d,
                        None => (bi * n + ni) * d,
                    };
                    s[base..base + d].to_vec()
                };
                let q = wq.apply(&row(&xs, None));
                let kv: Vec<Vec<f32>> = (0..t).map(|ti| wkv.apply(&row(&vs, Some(ti)))).collect();
                out.extend(wp.apply(&attend(&q, &kv, h, kvh, dh)));
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::tests::max_rel_err;
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    /// The weights sum to one per token and head, and weighing the variants' values with them
    /// (plus the value bias, through `proj`) gives the layer's output.
    #[test]
    fn variant_weights_sum_to_one_and_give_the_output() {
        let device = Default::default();
        let (b, n, d, t, h) = (2, 5, 8, 4, 2);
        // Two query heads sharing one key/value head (the CIFAR models' layout).
        let attn: LocalShiftAttention<B> = SoftmaxAttentionConfig::new(d, h)
            .with_shared_kv(true)
            .init_local(&device);
        let x = Tensor::<B, 3>::random([b, n, d], Distribution::Normal(0.0, 1.0), &device);
        let variants = Tensor::<B, 4>::random([t, b, n, d], Distribution::Normal(0.0, 1.0), &device);
        let w = attn.weights(x.clone(), variants.clone());
        assert_eq!(w.dims(), [b, h, n, t]);
        let sums: Vec<f32> = w.clone().sum_dim(3).into_data().to_vec().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let kvh = attn.kv_heads;
        let dh = d / h;
        let (_, v) = super::super::softmax::split_kv(attn.wkv.forward(variants.clone())); // T×B×N×kvh·dh
        let v = v.reshape([t, b, n, kvh, dh]).permute([1, 3, 2, 0, 4]); // B×kvh×N×T×dh
        let v = v.repeat_dim(1, h / kvh); // the heads of one key/value head read the same values
        let mixed = w.unsqueeze_dim::<5>(4).mul(v).sum_dim(3).reshape([b, h, n, dh]);
        let out = attn.proj.forward(mixed.swap_dims(1, 2).reshape([b, n, d]));
        let err = max_rel_err(out, attn.forward(x, variants));
        assert!(err < 1e-4, "rel err {err}");
    }

    #[test]
    fn local_attention_with_identical_variants_is_a_value_projection() {
        // All variants equal → softmax weights are uniform over identical values, so the output
        // is proj(value(x)) whatever the queries are.
        let device = Default::default();
        let attn: LocalShiftAttention<B> = SoftmaxAttentionConfig::new(8, 2).init_local(&device);
        let x = Tensor::<B, 3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let variants = x.clone().unsqueeze_dim::<4>(0).repeat_dim(0, 5);
        let (_, v) = super::super::softmax::split_kv(attn.wkv.forward(x.clone()));
        let expected = attn.proj.forward(v);
        let err = max_rel_err(attn.forward(x, variants), expected);
        assert!(err < 1e-5, "rel err {err}");
    }
}
