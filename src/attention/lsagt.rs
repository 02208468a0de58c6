//! The two attention kinds of LSAGT (Locally Shifted Attention with Early Global Integration).
//!
//! * [`LocalShiftAttention`] (the first layer of the first stage): every token has T embeddings, one
//!   per shifted image variant. One query, from variant 0 of the token, is compared with the keys
//!   of the T variants of *that same token*; the softmax over T weighs their values into the
//!   token's "virtually located" patch. Cost O(N·T) instead of O((N·T)²).
//! * [`GlobalAttention`]: ordinary softmax attention over all N tokens.
//!
//! Both use `wq: Linear(D, D)` split into h heads of `d_h = D/h`, and `wkv` giving keys then values
//! (the first half of its output are the keys). With `shared_kv` (the CIFAR models) `wkv` is
//! `Linear(D, 2·d_h)`: one key/value head shared by all query heads (multi-query attention);
//! otherwise `Linear(D, 2·D)` with h key/value heads. Heads are concatenated and projected by
//! `proj: Linear(D, D)`; the scale is `1/√d_h`.
//!
//! Each kind has a `forward_reference` that computes the same thing with plain loops over host
//! memory, used by the tests.

use burn::nn::{Dropout, DropoutConfig, Linear};

use crate::init::linear;
use crate::kernels::flash_attention::attention;
use crate::kernels::local_attention::{LocalHeads, local_attention};
use crate::ops::LinearRows;
use burn::prelude::*;

/// Shapes of either LSAGT attention kind.
#[derive(Config, Debug)]
pub struct LsagtAttentionConfig {
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

impl LsagtAttentionConfig {
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

    fn parts<B: Backend>(&self, device: &B::Device) -> (Linear<B>, Linear<B>, Linear<B>, Dropout) {
        assert!(
            self.heads > 0 && self.dim.is_multiple_of(self.heads),
            "attention dim {} is not divisible by {} heads",
            self.dim,
            self.heads
        );
        (
            linear(self.dim, self.dim, true, device),
            linear(self.dim, self.kv_dim(), true, device),
            linear(self.dim, self.dim, true, device),
            DropoutConfig::new(self.dropout).init(),
        )
    }

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

    pub fn init_global<B: Backend>(&self, device: &B::Device) -> GlobalAttention<B> {
        let (wq, wkv, proj, proj_drop) = self.parts(device);
        GlobalAttention {
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
fn split_kv<B: Backend, const D: usize>(kv: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let mut halves = kv.chunk(2, D - 1).into_iter();
    let k = halves.next().expect("two halves");
    let v = halves.next().expect("two halves");
    (k, v)
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
        let out = local_attention(self.wq.forward_rows(x), kv, heads);
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
        self.proj_drop.forward(self.proj.forward_rows(out))
    }

    /// The same computation with explicit loops over tokens, heads and variants.
    pub fn forward_reference(&self, x: Tensor<B, 3>, variants: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let t = variants.dims()[0];
        let (h, kvh, dh) = (self.heads, self.kv_heads, d / self.heads);
        let g = h / kvh;
        let device = x.device();
        let xs = host(x);
        let vs = host(variants);
        let (wq, wkv, wp) = (
            HostLinear::of(&self.wq),
            HostLinear::of(&self.wkv),
            HostLinear::of(&self.proj),
        );
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
                let mut heads_out = vec![0.0f32; d];
                for hi in 0..h {
                    let kh = hi / g;
                    let qh = &q[hi * dh..(hi + 1) * dh];
                    let scores: Vec<f32> = kv
                        .iter()
                        .map(|kvt| {
                            let kt = &kvt[kh * dh..(kh + 1) * dh];
                            dot(qh, kt) / (dh as f32).sqrt()
                        })
                        .collect();
                    let weights = softmax_vec(&scores);
                    for (ti, w) in weights.iter().enumerate() {
                        let vt = &kv[ti][kvh * dh + kh * dh..kvh * dh + (kh + 1) * dh];
                        for e in 0..dh {
                            heads_out[hi * dh + e] += w * vt[e];
                        }
                    }
                }
                out.extend(wp.apply(&heads_out));
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
    }
}

/// Softmax attention over all tokens (multi-head, or multi-query with `kv_heads == 1`).
#[derive(Module, Debug)]
pub struct GlobalAttention<B: Backend> {
    /// Official `Wq_odd`.
    pub wq: Linear<B>,
    /// Official `Wkv_odd`.
    pub wkv: Linear<B>,
    pub proj: Linear<B>,
    pub proj_drop: Dropout,
    pub heads: usize,
    pub kv_heads: usize,
}

impl<B: Backend> GlobalAttention<B> {
    /// `x`: `B×N×D` → `B×N×D`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (kvh, dh) = (self.kv_heads, d / self.heads);
        let g = self.heads / kvh;
        // Queries of the g heads that share a key/value head are stacked along the token axis.
        let q = self
            .wq
            .forward_rows(x.clone())
            .reshape([b, n, kvh, g, dh])
            .permute([0, 2, 3, 1, 4])
            .reshape([b * kvh, g * n, dh]);
        let (k, v) = split_kv(self.wkv.forward_rows(x));
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
        let out = attention(q.unsqueeze_dim(1), k.unsqueeze_dim(1), v.unsqueeze_dim(1))
            .reshape([b, kvh, g, n, dh])
            .permute([0, 3, 1, 2, 4])
            .reshape([b, n, d]);
        self.proj_drop.forward(self.proj.forward_rows(out))
    }

    /// The same computation with explicit loops over queries, heads and keys.
    pub fn forward_reference(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (h, kvh, dh) = (self.heads, self.kv_heads, d / self.heads);
        let g = h / kvh;
        let device = x.device();
        let xs = host(x);
        let (wq, wkv, wp) = (
            HostLinear::of(&self.wq),
            HostLinear::of(&self.wkv),
            HostLinear::of(&self.proj),
        );
        let mut out = Vec::with_capacity(b * n * d);
        for bi in 0..b {
            let tok = |ni: usize| &xs[(bi * n + ni) * d..(bi * n + ni + 1) * d];
            let q: Vec<Vec<f32>> = (0..n).map(|ni| wq.apply(tok(ni))).collect();
            let kv: Vec<Vec<f32>> = (0..n).map(|ni| wkv.apply(tok(ni))).collect();
            for qi in q.iter() {
                let mut heads_out = vec![0.0f32; d];
                for hi in 0..h {
                    let kh = hi / g;
                    let qh = &qi[hi * dh..(hi + 1) * dh];
                    let scores: Vec<f32> = kv
                        .iter()
                        .map(|kj| dot(qh, &kj[kh * dh..(kh + 1) * dh]) / (dh as f32).sqrt())
                        .collect();
                    let weights = softmax_vec(&scores);
                    for (j, w) in weights.iter().enumerate() {
                        let vj = &kv[j][kvh * dh + kh * dh..kvh * dh + (kh + 1) * dh];
                        for e in 0..dh {
                            heads_out[hi * dh + e] += w * vj[e];
                        }
                    }
                }
                out.extend(wp.apply(&heads_out));
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
    }
}

// ---- host-side helpers of the reference paths ----

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax_vec(s: &[f32]) -> Vec<f32> {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// A `Linear` copied to host memory: weight `[in, out]` (Burn layout) and bias.
struct HostLinear {
    w: Vec<f32>,
    b: Vec<f32>,
    o: usize,
}

impl HostLinear {
    fn of<B: Backend>(linear: &Linear<B>) -> Self {
        let [_, o] = linear.weight.dims();
        let b = linear
            .bias
            .as_ref()
            .map(|b| host(b.val()))
            .unwrap_or_else(|| vec![0.0; o]);
        Self {
            w: host(linear.weight.val()),
            b,
            o,
        }
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = self.b.clone();
        for (i, xi) in x.iter().enumerate() {
            let row = &self.w[i * self.o..(i + 1) * self.o];
            for (yo, wo) in y.iter_mut().zip(row) {
                *yo += xi * wo;
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    fn max_rel_err(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let diff: f32 = (a - b.clone()).powi_scalar(2).sum().into_scalar();
        let norm: f32 = b.powi_scalar(2).sum().into_scalar();
        (diff / norm).sqrt()
    }

    /// Random biases too, so that the reference check also covers them.
    fn randomise_biases(mut l: Linear<B>, device: &burn::tensor::Device<B>) -> Linear<B> {
        let [_, o] = l.weight.dims();
        l.bias = Some(burn::module::Param::from_tensor(Tensor::random(
            [o],
            Distribution::Normal(0.0, 0.5),
            device,
        )));
        l
    }

    #[test]
    fn local_attention_matches_reference() {
        let device = Default::default();
        for (heads, shared_kv) in [(2, true), (4, true), (2, false), (1, false)] {
            let cfg = LsagtAttentionConfig::new(8, heads).with_shared_kv(shared_kv);
            let mut attn: LocalShiftAttention<B> = cfg.init_local(&device);
            attn.wq = randomise_biases(attn.wq, &device);
            attn.wkv = randomise_biases(attn.wkv, &device);
            attn.proj = randomise_biases(attn.proj, &device);
            assert_eq!(attn.wkv.weight.dims(), [8, cfg.kv_dim()]);
            let x = Tensor::<B, 3>::random([2, 5, 8], Distribution::Normal(0.0, 3.0), &device);
            let variants = Tensor::<B, 4>::random([3, 2, 5, 8], Distribution::Normal(0.0, 3.0), &device);
            let fast = attn.forward(x.clone(), variants.clone());
            let slow = attn.forward_reference(x, variants);
            let err = max_rel_err(fast, slow);
            assert!(err < 1e-5, "heads {heads} shared_kv {shared_kv}: rel err {err}");
        }
    }

    #[test]
    fn global_attention_matches_reference() {
        let device = Default::default();
        for (heads, shared_kv) in [(2, true), (4, true), (2, false), (4, false), (1, false)] {
            let cfg = LsagtAttentionConfig::new(8, heads).with_shared_kv(shared_kv);
            let mut attn: GlobalAttention<B> = cfg.init_global(&device);
            attn.wq = randomise_biases(attn.wq, &device);
            attn.wkv = randomise_biases(attn.wkv, &device);
            attn.proj = randomise_biases(attn.proj, &device);
            let x = Tensor::<B, 3>::random([2, 7, 8], Distribution::Normal(0.0, 3.0), &device);
            let err = max_rel_err(attn.forward(x.clone()), attn.forward_reference(x));
            assert!(err < 1e-5, "heads {heads} shared_kv {shared_kv}: rel err {err}");
        }
    }

    #[test]
    fn local_attention_with_identical_variants_is_a_value_projection() {
        // All variants equal → softmax weights are uniform over identical values, so the output
        // is proj(value(x)) whatever the queries are.
        let device = Default::default();
        let attn: LocalShiftAttention<B> = LsagtAttentionConfig::new(8, 2).init_local(&device);
        let x = Tensor::<B, 3>::random([1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let variants = x.clone().unsqueeze_dim::<4>(0).repeat_dim(0, 5);
        let (_, v) = split_kv(attn.wkv.forward(x.clone()));
        let expected = attn.proj.forward(v);
        let err = max_rel_err(attn.forward(x, variants), expected);
        assert!(err < 1e-5, "rel err {err}");
    }
}
