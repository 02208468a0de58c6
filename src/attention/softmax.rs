//! Softmax attention over all tokens: `wq: Linear(D, D)` split into h heads of `d_h = D/h`,
//! `wkv` giving keys then values (the first half of its output are the keys), heads concatenated
//! and projected by `proj: Linear(D, D)`, scale `1/√d_h`. With `shared_kv` (LSAGT's CIFAR models)
//! `wkv` is `Linear(D, 2·d_h)`: one key/value head shared by all query heads (multi-query
//! attention); otherwise `Linear(D, 2·D)` with h key/value heads. LSAGT's global layers, and the
//! vanilla-attention kind of a VVT stage.
//!
//! [`SoftmaxAttention::forward_reference`] computes the same with plain loops over host memory,
//! for the tests.

use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;

use super::host::{HostLinear, attend, host};
use crate::kernels::softmax::softmax_scaled;
use crate::nn::{Linear, LinearConfig};

/// Shapes of a softmax attention ([`SoftmaxAttention`], or [`LocalShiftAttention`] over shifted
/// variants).
#[derive(Config, Debug)]
pub struct SoftmaxAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    /// One key/value head shared by all query heads (multi-query attention, the CIFAR code);
    /// `false` gives one key/value head per query head (the ImageNet code).
    #[config(default = false)]
    pub shared_kv: bool,
    /// Dropout after the output projection (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl SoftmaxAttentionConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    pub fn kv_heads(&self) -> usize {
        if self.shared_kv { 1 } else { self.heads }
    }

    /// Output width of `wkv`: keys and values of every key/value head.
    pub fn kv_dim(&self) -> usize {
        2 * self.kv_heads() * self.head_dim()
    }

    pub(crate) fn parts<B: Backend>(&self, device: &B::Device) -> (Linear<B>, Linear<B>, Linear<B>, Dropout) {
        assert!(
            self.heads > 0 && self.dim.is_multiple_of(self.heads),
            "attention dim {} is not divisible by {} heads",
            self.dim,
            self.heads
        );
        (
            LinearConfig::new(self.dim, self.dim).init(device),
            LinearConfig::new(self.dim, self.kv_dim()).init(device),
            LinearConfig::new(self.dim, self.dim).init(device),
            DropoutConfig::new(self.dropout).init(),
        )
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> SoftmaxAttention<B> {
        let (wq, wkv, proj, proj_drop) = self.parts(device);
        SoftmaxAttention {
            wq,
            wkv,
            proj,
            proj_drop,
            heads: self.heads,
            kv_heads: self.kv_heads(),
        }
    }
}

/// Splits the `wkv` output `[..., 2·kvh·d_h]` into keys and values (first half keys).
pub(crate) fn split_kv<B: Backend, const D: usize>(kv: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let mut halves = kv.chunk(2, D - 1).into_iter();
    let k = halves.next().expect("two halves");
    let v = halves.next().expect("two halves");
    (k, v)
}

/// One query's attention weights, `softmax(q·kᵀ/√d)` per head: `q` is `heads×d`, `k`
/// `heads×M×d` (query head `i` uses key head `i / (heads / key heads)`) → `heads×M`.
pub fn softmax_row<B: Backend>(q: Tensor<B, 2>, k: Tensor<B, 3>) -> Tensor<B, 2> {
    let [heads, d] = q.dims();
    let [kv_heads, m, _] = k.dims();
    let g = heads / kv_heads;
    let q = q.reshape([kv_heads, g, d]);
    let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar((d as f64).powf(-0.5));
    burn::tensor::activation::softmax(scores.reshape([heads, m]), 1)
}

/// `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, d]` inputs (keys and values have the same
/// token count; queries may have another): the scores, a softmax over the keys (the fused row
/// kernel where the backend has it, [`crate::kernels::softmax`]), the weighted values.
pub fn scaled_dot_product<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let ([qb, qh, _, qd], [kb, kh, kn, kd], [vb, vh, vn, _]) = (q.dims(), k.dims(), v.dims());
    assert!(
        (qb, qh, qd) == (kb, kh, kd) && (kb, kh, kn) == (vb, vh, vn),
        "attention: queries {:?}, keys {:?} and values {:?} do not fit",
        q.dims(),
        k.dims(),
        v.dims()
    );
    softmax_scaled(q.matmul(k.swap_dims(2, 3)), (qd as f64).powf(-0.5)).matmul(v)
}

/// Softmax attention over all tokens (multi-head, or multi-query with `kv_heads == 1`).
#[derive(Module, Debug)]
pub struct SoftmaxAttention<B: Backend> {
    /// Official `Wq_odd`.
    pub wq: Linear<B>,
    /// Official `Wkv_odd`.
    pub wkv: Linear<B>,
    pub proj: Linear<B>,
    pub proj_drop: Dropout,
    pub heads: usize,
    pub kv_heads: usize,
}

impl<B: Backend> SoftmaxAttention<B> {
    /// `x`: `B×N×D` → `B×N×D`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (kvh, dh) = (self.kv_heads, d / self.heads);
        let g = self.heads / kvh;
        // Queries of the g heads that share a key/value head are stacked along the token axis.
        let q = self
            .wq
            .forward(x.clone())
            .reshape([b, n, kvh, g, dh])
            .permute([0, 2, 3, 1, 4])
            .reshape([b * kvh, g * n, dh]);
        let (k, v) = split_kv(self.wkv.forward(x));
        // With one key/value head (the CIFAR models) the halves of `wkv`'s output are the
        // per-head layout already: strided views, which the products read as they are (making
        // them dense took two copies per layer).
        let per_head = |t: Tensor<B, 3>| {
            if kvh == 1 {
                return t;
            }
            t.reshape([b, n, kvh, dh])
                .swap_dims(1, 2)
                .reshape([b * kvh, n, dh])
        };
        let (k, v) = (per_head(k), per_head(v));
        let out = scaled_dot_product(q.unsqueeze_dim(1), k.unsqueeze_dim(1), v.unsqueeze_dim(1))
            .reshape([b, kvh, g, n, dh])
            .permute([0, 3, 1, 2, 4])
            .reshape([b, n, d]);
        self.proj_drop.forward(self.proj.forward(out))
    }

    /// The attention weights of token `query` of the first image of `x: B×N×D` over all
    /// tokens, `heads×N`.
    pub fn attention_row(&self, x: Tensor<B, 3>, query: usize) -> Tensor<B, 2> {
        let [_, n, d] = x.dims();
        let (kvh, dh) = (self.kv_heads, d / self.heads);
        let x = x.slice_dim(0, 0..1);
        let q = self.wq.forward(x.clone().slice_dim(1, query..query + 1));
        let (k, _) = split_kv(self.wkv.forward(x));
        let k = k.reshape([n, kvh, dh]).swap_dims(0, 1);
        softmax_row(q.reshape([self.heads, dh]), k)
    }

    /// The same computation with explicit loops over queries, heads and keys.
    pub fn forward_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (h, kvh, dh) = (self.heads, self.kv_heads, d / self.heads);
        let device = x.device();
        let xs = host(x);
        let [wq, wkv, wp] = HostLinear::all([&self.wq, &self.wkv, &self.proj]);
        let mut out = Vec::with_capacity(b * n * d);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * d..(bi * n + ni + 1) * d];
            let q: Vec<Vec<f32>> = (0..n).map(|ni| wq.apply(tok(ni))).collect();
            let kv: Vec<Vec<f32>> = (0..n).map(|ni| wkv.apply(tok(ni))).collect();
            for qi in &q {
                out.extend(wp.apply(&attend(qi, &kv, h, kvh, dh)));
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

    /// Weighing the values with one query's row (then `proj`) gives that query's output, with
    /// one key/value head per query head and with one shared by all.
    #[test]
    fn one_query_row_gives_that_query_output() {
        let device = Default::default();
        let (n, d, h) = (7, 8, 2);
        for shared in [false, true] {
            let attn: SoftmaxAttention<B> = SoftmaxAttentionConfig::new(d, h)
                .with_shared_kv(shared)
                .init(&device);
            let x = Tensor::<B, 3>::random([2, n, d], Distribution::Normal(0.0, 1.0), &device);
            let all = attn.forward(x.clone());
            let kvh = attn.kv_heads;
            let (_, v) = split_kv(attn.wkv.forward(x.clone().slice_dim(0, 0..1)));
            let v = v.reshape([n, kvh, d / h]).swap_dims(0, 1).repeat_dim(0, h / kvh); // h×N×dh
            for query in [0, 3, n - 1] {
                let row = attn.attention_row(x.clone(), query);
                let sums: Vec<f32> = row.clone().sum_dim(1).into_data().to_vec().unwrap();
                assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
                let mixed = row.unsqueeze_dim::<3>(1).matmul(v.clone()).reshape([1, 1, d]);
                let want = all.clone().slice([0..1, query..query + 1, 0..d]);
                let err = max_rel_err(attn.proj.forward(mixed), want);
                assert!(err < 1e-4, "shared {shared} query {query}: rel err {err}");
            }
        }
    }
}
