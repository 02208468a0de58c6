//! PVTv2's spatial-reduction attention, as timm's `pvt_v2.Attention` computes it (same parameter
//! names: `q`, `kv`, `proj`, `sr`, `norm`): softmax attention of every token over keys and values
//! taken from a reduced grid.
//!
//! - `sr_ratio` r > 1: the grid is reduced by an r×r convolution of stride r, then LayerNorm
//!   (PVTv1/v2's spatial-reduction attention);
//! - `linear`: the grid is average-pooled to 7×7 whatever its size, then a 1×1 convolution,
//!   LayerNorm and GELU (PVTv2-Li's linear attention: a constant 49 keys per query);
//! - otherwise plain multi-head softmax attention.
//!
//! [`PvtAttention::forward_reference`] computes the same with loops over host memory.

use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::module::adaptive_avg_pool2d;

use super::host::{HostLinear, attend, host};
use super::softmax::{scaled_dot_product, softmax_row, split_kv};
use crate::nn::{Conv2d, Conv2dConfig, ConvInit, LayerNorm, LayerNormConfig, Linear, LinearConfig};

/// The side of the pooled grid of the linear variant (PVTv2-Li).
pub const POOLED: usize = 7;

#[derive(Config, Debug)]
pub struct PvtAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    /// Spatial reduction ratio r of keys and values (1: none); unused by the linear variant.
    #[config(default = 1)]
    pub sr_ratio: usize,
    /// PVTv2-Li: keys and values from the grid average-pooled to 7×7.
    #[config(default = false)]
    pub linear: bool,
}

impl PvtAttentionConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> PvtAttention<B> {
        assert!(
            self.heads > 0 && self.dim.is_multiple_of(self.heads),
            "attention dim {} is not divisible by {} heads",
            self.dim,
            self.heads
        );
        let c = self.dim;
        let reduce = |k: usize| {
            Conv2dConfig::new([c, c], k)
                .with_stride(k)
                .with_init(ConvInit::FanOut)
                .init(device)
        };
        let (sr, norm) = if self.linear {
            (Some(reduce(1)), Some(LayerNormConfig::new(c).init(device)))
        } else if self.sr_ratio > 1 {
            (
                Some(reduce(self.sr_ratio)),
                Some(LayerNormConfig::new(c).init(device)),
            )
        } else {
            (None, None)
        };
        PvtAttention {
            q: LinearConfig::new(c, c).init(device),
            kv: LinearConfig::new(c, 2 * c).init(device),
            proj: LinearConfig::new(c, c).init(device),
            sr,
            norm,
            heads: self.heads,
            linear: self.linear,
        }
    }

    /// Multiply-accumulates for one image of an `h×w` grid.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (c, n) = (self.dim as u64, (h * w) as u64);
        let r = self.sr_ratio as u64;
        let (m, reduce) = if self.linear {
            let m = (POOLED * POOLED) as u64;
            (m, m * c * c)
        } else if r > 1 {
            let m = n / (r * r);
            (m, m * c * c * r * r)
        } else {
            (n, 0)
        };
        n * c * c + reduce + m * 2 * c * c + 2 * n * m * c + n * c * c
    }
}

#[derive(Module, Debug)]
pub struct PvtAttention<B: Backend> {
    pub q: Linear<B>,
    /// Keys then values (`reshape(B, M, 2, heads, d)` in timm).
    pub kv: Linear<B>,
    pub proj: Linear<B>,
    pub sr: Option<Conv2d<B>>,
    pub norm: Option<LayerNorm<B>>,
    pub heads: usize,
    pub linear: bool,
}

impl<B: Backend> PvtAttention<B> {
    /// The tokens keys and values are made from: `B×h×w×C` → `B×M×C`.
    fn reduced(&self, grid: Tensor<B, 4>, reference: bool) -> Tensor<B, 3> {
        self.reduced_grid(grid, reference).0
    }

    /// [`Self::reduced`] and the grid `(rows, cols)` of its tokens.
    fn reduced_grid(&self, grid: Tensor<B, 4>, reference: bool) -> (Tensor<B, 3>, (usize, usize)) {
        let [b, h, w, c] = grid.dims();
        let (Some(sr), Some(norm)) = (&self.sr, &self.norm) else {
            return (grid.reshape([b, h * w, c]), (h, w));
        };
        let grid = if self.linear {
            let pooled = if reference {
                avg_pool_reference(grid, POOLED)
            } else {
                adaptive_avg_pool2d(grid.permute([0, 3, 1, 2]), [POOLED, POOLED]).permute([0, 2, 3, 1])
            };
            sr.forward(pooled)
        } else if reference {
            sr.forward_reference(grid)
        } else {
            sr.forward(grid)
        };
        let [_, ho, wo, _] = grid.dims();
        let tokens = norm.forward(grid.reshape([b, ho * wo, c]));
        (if self.linear { gelu(tokens) } else { tokens }, (ho, wo))
    }

    /// The attention weights of token `query` of the first image of `x: B×N×C` (an `h×w` grid)
    /// over the reduced keys, `heads×M`, and the keys' grid.
    pub fn attention_row(
        &self,
        x: Tensor<B, 3>,
        (h, w): (usize, usize),
        query: usize,
    ) -> (Tensor<B, 2>, (usize, usize)) {
        let [_, _, c] = x.dims();
        let (heads, d) = (self.heads, c / self.heads);
        let x = x.slice_dim(0, 0..1);
        let q = self.q.forward(x.clone().slice_dim(1, query..query + 1));
        let (src, kgrid) = self.reduced_grid(x.reshape([1, h, w, c]), false);
        let (k, _) = split_kv(self.kv.forward(src));
        let m = kgrid.0 * kgrid.1;
        let k = k.reshape([m, heads, d]).swap_dims(0, 1);
        (softmax_row(q.reshape([heads, d]), k), kgrid)
    }

    /// `x`: `B×N×C` over an `h×w` grid → `B×N×C`.
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let (heads, d) = (self.heads, c / self.heads);
        let split = |t: Tensor<B, 3>| {
            let m = t.dims()[1];
            t.reshape([b, m, heads, d]).swap_dims(1, 2)
        };
        let q = split(self.q.forward(x.clone()));
        let (k, v) = split_kv(self.kv.forward(self.reduced(x.reshape([b, h, w, c]), false)));
        let out = scaled_dot_product(q, split(k), split(v))
            .swap_dims(1, 2)
            .reshape([b, n, c]);
        self.proj.forward(out)
    }

    /// The same result with loops over queries, heads and keys (the reduction through Burn's
    /// own convolution and an explicit average pool).
    pub fn forward_reference(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let device = x.device();
        let src = host(self.reduced(x.clone().reshape([b, h, w, c]), true));
        let m = src.len() / (b * c);
        let xs = host(x);
        let [wq, wkv, wp] = HostLinear::all([&self.q, &self.kv, &self.proj]);
        let mut out = Vec::with_capacity(b * n * c);
        for bi in 0..b {
            let kv: Vec<Vec<f32>> = (0..m)
                .map(|j| wkv.apply(&src[(bi * m + j) * c..(bi * m + j + 1) * c]))
                .collect();
            for i in 0..n {
                let q = wq.apply(&xs[(bi * n + i) * c..(bi * n + i + 1) * c]);
                out.extend(wp.apply(&attend(&q, &kv, self.heads, self.heads, c / self.heads)));
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
    }
}

/// PyTorch's `AdaptiveAvgPool2d(s)` on a `B×H×W×C` grid with loops: output cell `i` averages
/// rows `⌊i·H/s⌋ .. ⌈(i+1)·H/s⌉` (and likewise columns).
fn avg_pool_reference<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [b, h, w, c] = x.dims();
    let device = x.device();
    let xs = host(x);
    let bins = |len: usize, i: usize| (i * len / s)..((i + 1) * len).div_ceil(s);
    let mut out = Vec::with_capacity(b * s * s * c);
    for bi in 0..b {
        for oi in 0..s {
            for oj in 0..s {
                let (rows, cols) = (bins(h, oi), bins(w, oj));
                let count = (rows.len() * cols.len()) as f32;
                for ch in 0..c {
                    let mut sum = 0.0;
                    for r in rows.clone() {
                        for q in cols.clone() {
                            sum += xs[((bi * h + r) * w + q) * c + ch];
                        }
                    }
                    out.push(sum / count);
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [b, s, s, c]), &device)
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::super::host::tests::{max_rel_err, randomise_biases};
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn every_variant_matches_its_loops_on_square_and_oblong_grids() {
        let device = Default::default();
        for (sr, linear, (h, w)) in [
            (1, false, (3, 4)),
            (2, false, (4, 6)),
            (4, false, (8, 4)),
            (1, true, (9, 10)),
            (1, true, (5, 3)),
        ] {
            let mut attn: PvtAttention<B> = PvtAttentionConfig::new(8, 2)
                .with_sr_ratio(sr)
                .with_linear(linear)
                .init(&device);
            randomise_biases([&mut attn.q, &mut attn.kv, &mut attn.proj]);
            let x = Tensor::<B, 3>::random([2, h * w, 8], Distribution::Normal(0.0, 2.0), &device);
            let err = max_rel_err(attn.forward(x.clone(), h, w), attn.forward_reference(x, h, w));
            assert!(err < 1e-5, "sr {sr} linear {linear} grid {h}x{w}: rel err {err}");
        }
    }

    /// Weighing the reduced keys' values with one query's row (then `proj`) gives that query's
    /// output.
    #[test]
    fn one_query_row_gives_that_query_output() {
        let device = Default::default();
        let (h, w, c, heads) = (8, 6, 8, 2);
        for (sr, linear, kgrid) in [(1, false, (8, 6)), (2, false, (4, 3)), (1, true, (7, 7))] {
            let attn: PvtAttention<B> = PvtAttentionConfig::new(c, heads)
                .with_sr_ratio(sr)
                .with_linear(linear)
                .init(&device);
            let x = Tensor::<B, 3>::random([1, h * w, c], Distribution::Normal(0.0, 1.0), &device);
            let all = attn.forward(x.clone(), h, w);
            let m = kgrid.0 * kgrid.1;
            let (_, v) = split_kv(
                attn.kv
                    .forward(attn.reduced(x.clone().reshape([1, h, w, c]), false)),
            );
            let v = v.reshape([m, heads, c / heads]).swap_dims(0, 1);
            for query in [0, 20, h * w - 1] {
                let (row, got) = attn.attention_row(x.clone(), (h, w), query);
                assert_eq!(got, kgrid);
                let mixed = row.unsqueeze_dim::<3>(1).matmul(v.clone()).reshape([1, 1, c]);
                let want = all.clone().slice([0..1, query..query + 1, 0..c]);
                let err = super::super::host::tests::max_rel_err(attn.proj.forward(mixed), want);
                assert!(err < 1e-4, "sr {sr} linear {linear} query {query}: rel err {err}");
            }
        }
    }

    #[test]
    fn the_linear_variant_attends_over_49_pooled_tokens() {
        let device = Default::default();
        let attn: PvtAttention<B> = PvtAttentionConfig::new(8, 2).with_linear(true).init(&device);
        let x = Tensor::<B, 3>::random([1, 16 * 12, 8], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(
            attn.reduced(x.reshape([1, 16, 12, 8]), false).dims(),
            [1, POOLED * POOLED, 8]
        );
    }

    /// timm's `pvt_v2.Attention` on the same weights (fixtures made by
    /// `tests/fixtures/make_pvt_fixtures.py`), loaded through the official-checkpoint path.
    #[test]
    fn equals_timms_pvt_v2_attention() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let device = Default::default();
        for (case, heads, sr, linear) in [
            ("plain", 2, 1, false),
            ("sr2", 2, 2, false),
            ("linear", 4, 1, true),
        ] {
            let attn: PvtAttention<B> = PvtAttentionConfig::new(32, heads)
                .with_sr_ratio(sr)
                .with_linear(linear)
                .init(&device);
            let path = dir.join(format!("pvt_attn_{case}.pth"));
            let attn = crate::weights::load_official(attn, &path, str::to_string).unwrap();
            let io: std::collections::HashMap<_, _> =
                crate::weights::read_pytorch(&dir.join(format!("pvt_attn_{case}_io.pth")))
                    .unwrap()
                    .into_iter()
                    .collect();
            let t = |name: &str| {
                let t = &io[name];
                Tensor::<B, 3>::from_data(TensorData::new(t.values.clone(), t.shape.clone()), &device)
            };
            let (h, w) = (io["grid"].values[0] as usize, io["grid"].values[1] as usize);
            let err = max_rel_err(attn.forward(t("input"), h, w), t("output"));
            assert!(err < 1e-5, "{case}: rel err {err} against timm");
        }
    }
}
