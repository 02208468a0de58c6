//! LSAGT: Locally Shifted Attention with Early Global Integration (Sheynin et al.).
//!
//! The image is embedded T times, once per shifted variant (CIFAR: 18 circular rolls; ImageNet:
//! 10 circular left/top paddings), each variant by its own convolution. The first layer of the
//! first stage is [`LocalShiftAttention`]: each token attends over its own T variants. Every
//! other layer is [`GlobalAttention`] over all tokens. Between stages a reduction (3×3 conv →
//! LayerNorm → 3×3/2 max pool) quarters the token count. Head: LayerNorm → token mean → Linear.
//!
//! Two quirks of the released code are kept (parity with its checkpoints needs them): one `norm1`
//! and one `norm2` per stage are shared by all the stage's layers, and the CIFAR models use a
//! single key/value head shared by all query heads.
//!
//! Module paths follow the official names (`layers.{k}.0` → `stages.{k}`, `layers.{k}.1` →
//! `stages.{k}.reduce`), see [`rename_official`].

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use serde::{Deserialize, Serialize};

use super::{DropPathNoise, ModelOutput, drop_path, ensure_divisible};
use crate::attention::lsagt::{GlobalAttention, LocalShiftAttention, LsagtAttentionConfig};
use crate::flops::{self, LayerCost};
use crate::init::{ConvInit, conv2d, linear};
use crate::kernels::patches::{shifted_patches, shifted_patches_reference};
use crate::nn::{LayerNorm, LayerNormConfig};
use crate::ops::{
    LinearRows, conv_geometry, conv2d_columns, conv2d_many_columns_unbiased, conv2d_nhwc, conv2d_nhwc_many,
};

/// LayerNorm epsilon used everywhere in LSAGT.
const LN_EPS: f64 = 1e-6;

/// CIFAR variants 1..=17: the whole image circularly rolled by `(dy, dx)` along (H, W)
/// (`torch.roll` semantics: a pixel moves from `(y, x)` to `(y + dy, x + dx)`).
pub const CIFAR_SHIFTS: [(i64, i64); 17] = [
    (1, 0),
    (0, 1),
    (-1, 0),
    (0, -1),
    (2, 0),
    (0, 2),
    (-2, 0),
    (0, -2),
    (1, 1),
    (1, 2),
    (1, -1),
    (-1, 1),
    (-1, 2),
    (-1, -1),
    (2, 1),
    (2, 2),
    (2, -1),
];

/// ImageNet variants 1..=9: the image circularly padded by `(left, top)` pixels (the canvas grows,
/// so the convolution windows shift).
pub const IMAGENET_PADS: [(usize, usize); 9] = [
    (1, 0),
    (2, 0),
    (3, 0),
    (0, 1),
    (0, 2),
    (0, 3),
    (1, 1),
    (2, 2),
    (3, 3),
];

/// How the shifted image variants are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShiftScheme {
    /// 18 variants: the image and 17 circular rolls ([`CIFAR_SHIFTS`]).
    Cifar,
    /// 10 variants: the image and 9 circular left/top paddings ([`IMAGENET_PADS`]).
    Imagenet,
}

impl ShiftScheme {
    /// T, the number of variants including the image itself.
    pub fn num_variants(self) -> usize {
        match self {
            Self::Cifar => CIFAR_SHIFTS.len() + 1,
            Self::Imagenet => IMAGENET_PADS.len() + 1,
        }
    }

    /// Extra canvas `(width, height)` of variant `t`.
    fn growth(self, t: usize) -> (usize, usize) {
        match self {
            Self::Imagenet if t > 0 => IMAGENET_PADS[t - 1],
            _ => (0, 0),
        }
    }

    /// The pixel of an `h×w` image at `(row, col)` of variant `t`'s canvas.
    fn source(self, t: usize, (h, w): (usize, usize), (y, x): (usize, usize)) -> (usize, usize) {
        match self {
            Self::Cifar if t > 0 => {
                let (dy, dx) = CIFAR_SHIFTS[t - 1];
                (
                    (y as i64 - dy).rem_euclid(h as i64) as usize,
                    (x as i64 - dx).rem_euclid(w as i64) as usize,
                )
            }
            _ => {
                let (left, top) = self.growth(t);
                ((y + h - top) % h, (x + w - left) % w)
            }
        }
    }

    /// For every variant, output position and kernel tap `(row, col)`, the image pixel that the
    /// patch column reads (row-major), or `h·w` (a zero pixel) where it falls in the convolution's
    /// zero padding; and the output grid. Cached per geometry.
    fn patch_index(
        self,
        (h, w): (usize, usize),
        (k, s, p): (usize, usize, usize),
    ) -> (Arc<Vec<i64>>, (usize, usize)) {
        type Key = (ShiftScheme, usize, usize, usize, usize, usize);
        type Index = (Arc<Vec<i64>>, (usize, usize));
        static CACHE: Mutex<Vec<(Key, Index)>> = Mutex::new(Vec::new());
        let key = (self, h, w, k, s, p);
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, v)) = cache.iter().find(|(k, _)| *k == key) {
            return v.clone();
        }
        let t_count = self.num_variants();
        let out = |n: usize| (n + 2 * p - k) / s + 1;
        let grid = (out(h), out(w));
        let mut index = Vec::with_capacity(t_count * grid.0 * grid.1 * k * k);
        for t in 0..t_count {
            let (gx, gy) = self.growth(t);
            let (ch, cw) = (h + gy, w + gx);
            assert!(
                (out(ch), out(cw)) == grid,
                "the shifted variants give different token grids (check the input size)"
            );
            for oy in 0..grid.0 {
                for ox in 0..grid.1 {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (cy, cx) = ((oy * s + ky) as i64 - p as i64, (ox * s + kx) as i64 - p as i64);
                            let inside = (0..ch as i64).contains(&cy) && (0..cw as i64).contains(&cx);
                            index.push(if inside {
                                let (y, x) = self.source(t, (h, w), (cy as usize, cx as usize));
                                (y * w + x) as i64
                            } else {
                                (h * w) as i64
                            });
                        }
                    }
                }
            }
        }
        let v = (Arc::new(index), grid);
        cache.push((key, v.clone()));
        v
    }
}

fn default_mlp_ratio() -> usize {
    4
}
fn default_drop_path() -> f64 {
    0.1
}

/// An LSAGT configuration; the released ones are [`LsagtConfig::cifar_tiny`] …
/// [`LsagtConfig::imagenet_small`].
///
/// In JSON/TOML, `shared_kv` defaults to `true` for the CIFAR scheme and `false` for ImageNet,
/// and `heads` may be one number for every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawLsagtConfig")]
pub struct LsagtConfig {
    pub scheme: ShiftScheme,
    /// Default input resolution (square); the position embeddings are sized for it.
    pub image_size: usize,
    /// Per stage: `[transformer dim, dim after the reduction]`; the last stage has no reduction
    /// and its two entries must be equal.
    pub dims: Vec<[usize; 2]>,
    pub heads: Vec<usize>,
    /// Layers per stage; layer 0 of stage 1 is the local attention.
    pub layers: Vec<usize>,
    pub num_classes: usize,
    /// Patch-embedding convolution: kernel, stride and (zero) padding.
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// One key/value head shared by all query heads (the CIFAR code) instead of one per head.
    pub shared_kv: bool,
    pub mlp_ratio: usize,
    /// Stochastic-depth rate, the same in every layer (training only).
    pub drop_path: f64,
    /// Dropout after attention projections and in the MLPs (training only).
    pub dropout: f64,
}

/// One number for all stages, or one per stage.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerStage {
    All(usize),
    Each(Vec<usize>),
}

#[derive(Deserialize)]
struct RawLsagtConfig {
    scheme: ShiftScheme,
    image_size: usize,
    dims: Vec<[usize; 2]>,
    heads: PerStage,
    layers: Vec<usize>,
    num_classes: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    #[serde(default)]
    shared_kv: Option<bool>,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: usize,
    #[serde(default = "default_drop_path")]
    drop_path: f64,
    #[serde(default)]
    dropout: f64,
}

impl From<RawLsagtConfig> for LsagtConfig {
    fn from(r: RawLsagtConfig) -> Self {
        let heads = match r.heads {
            PerStage::All(h) => vec![h; r.dims.len()],
            PerStage::Each(v) => v,
        };
        Self {
            shared_kv: r.shared_kv.unwrap_or(r.scheme == ShiftScheme::Cifar),
            scheme: r.scheme,
            image_size: r.image_size,
            dims: r.dims,
            heads,
            layers: r.layers,
            num_classes: r.num_classes,
            kernel: r.kernel,
            stride: r.stride,
            padding: r.padding,
            mlp_ratio: r.mlp_ratio,
            drop_path: r.drop_path,
            dropout: r.dropout,
        }
    }
}

/// `(size + 2·pad − kernel) / stride + 1`, or `None` when the kernel does not fit.
fn conv_out(size: usize, kernel: usize, stride: usize, pad: usize) -> Option<usize> {
    (size + 2 * pad).checked_sub(kernel).map(|s| s / stride + 1)
}

/// Grid side after the reduction's max pool (kernel 3, stride 2, padding 1).
fn pool_out(size: usize) -> usize {
    (size + 2 - 3) / 2 + 1
}

impl LsagtConfig {
    #[allow(clippy::too_many_arguments)]
    fn released(
        scheme: ShiftScheme,
        image_size: usize,
        dims: &[[usize; 2]],
        heads: &[usize],
        layers: &[usize],
        num_classes: usize,
        (kernel, stride, padding): (usize, usize, usize),
    ) -> Self {
        Self {
            scheme,
            image_size,
            dims: dims.to_vec(),
            heads: heads.to_vec(),
            layers: layers.to_vec(),
            num_classes,
            kernel,
            stride,
            padding,
            shared_kv: scheme == ShiftScheme::Cifar,
            mlp_ratio: 4,
            drop_path: 0.1,
            dropout: 0.0,
        }
    }

    fn cifar(d: usize, heads: usize, layers: &[usize]) -> Self {
        Self::released(
            ShiftScheme::Cifar,
            32,
            &[[d, d]; 4],
            &[heads; 4],
            layers,
            10,
            (3, 1, 1),
        )
    }

    /// 10,141,834 parameters (10 classes).
    pub fn cifar_tiny() -> Self {
        Self::cifar(192, 4, &[2, 4, 4, 4])
    }
    /// 32,767,370 parameters (the paper says 36.2M; this is the released code).
    pub fn cifar_small() -> Self {
        Self::cifar(384, 6, &[2, 4, 4, 4])
    }
    /// 102,779,146 parameters (the paper says 115.8M; this is the released code).
    pub fn cifar_base() -> Self {
        Self::cifar(768, 12, &[3, 3, 3, 3])
    }
    /// 9,909,928 parameters (1000 classes).
    pub fn imagenet_tiny() -> Self {
        Self::released(
            ShiftScheme::Imagenet,
            224,
            &[[192, 192]; 4],
            &[4; 4],
            &[2, 4, 4, 4],
            1000,
            (9, 7, 1),
        )
    }
    /// 22,145,320 parameters (1000 classes).
    pub fn imagenet_small() -> Self {
        Self::released(
            ShiftScheme::Imagenet,
            224,
            &[[64, 192], [192, 384], [384, 384]],
            &[2, 6, 12],
            &[2, 2, 10],
            1000,
            (4, 4, 0),
        )
    }

    /// The configuration described by the authors' hyper-parameters as JSON (the fixtures' `.json`
    /// files and the `# {...}` headers of `keys/*.tsv`): `which` (`cifar`/`imagenet`),
    /// `image_size`, `dims`, `heads` (one number or one per stage), `layers`, `num_classes`,
    /// `kernel`, `stride`, `padding` and optionally `num_variants` (checked against `which`).
    pub fn from_official_json(j: &serde_json::Value) -> Result<Self> {
        let num = |key: &str| -> Result<usize> {
            j[key]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("official LSAGT config: '{key}' is missing or not a number"))
        };
        let list = |key: &str| -> Result<Vec<usize>> {
            j[key]
                .as_array()
                .with_context(|| format!("official LSAGT config: '{key}' is missing or not a list"))?
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("official LSAGT config: '{key}' holds a non-number"))
        };
        let scheme = match j["which"].as_str() {
            Some("cifar") => ShiftScheme::Cifar,
            Some("imagenet") => ShiftScheme::Imagenet,
            other => bail!("official LSAGT config: 'which' must be \"cifar\" or \"imagenet\", got {other:?}"),
        };
        let dims: Vec<[usize; 2]> = j["dims"]
            .as_array()
            .context("official LSAGT config: 'dims' is missing")?
            .iter()
            .map(|pair| -> Option<[usize; 2]> {
                let p = pair.as_array()?;
                match p.as_slice() {
                    [a, b] => Some([a.as_u64()? as usize, b.as_u64()? as usize]),
                    _ => None,
                }
            })
            .collect::<Option<_>>()
            .context("official LSAGT config: 'dims' must be a list of [dim, dim_out] pairs")?;
        let heads = if j["heads"].is_array() {
            list("heads")?
        } else {
            vec![num("heads")?; dims.len()]
        };
        let config = Self::released(
            scheme,
            num("image_size")?,
            &dims,
            &heads,
            &list("layers")?,
            num("num_classes")?,
            (num("kernel")?, num("stride")?, num("padding")?),
        );
        if let Some(t) = j["num_variants"].as_u64()
            && t as usize != scheme.num_variants()
        {
            bail!(
                "official LSAGT config: num_variants = {t}, but the {scheme:?} scheme has {}",
                scheme.num_variants()
            );
        }
        Ok(config)
    }

    pub fn num_stages(&self) -> usize {
        self.dims.len()
    }

    pub fn num_variants(&self) -> usize {
        self.scheme.num_variants()
    }

    /// Token grid `(rows, cols)` that the patch embedding makes of an `h×w` image, if every
    /// variant gives the same one.
    pub fn token_grid(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride.max(1), self.padding);
        let grid = (conv_out(h, k, s, p)?, conv_out(w, k, s, p)?);
        for t in 1..self.num_variants() {
            let (gw, gh) = self.scheme.growth(t);
            if (conv_out(h + gh, k, s, p)?, conv_out(w + gw, k, s, p)?) != grid {
                return None;
            }
        }
        (grid.0 > 0 && grid.1 > 0).then_some(grid)
    }

    /// Token grid of each stage for an `h×w` input (the first stage's from [`Self::token_grid`]).
    pub fn grids(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let Some(mut g) = self.token_grid(h, w) else {
            return Vec::new();
        };
        let mut grids = Vec::with_capacity(self.num_stages());
        for _ in 0..self.num_stages() {
            grids.push(g);
            g = (pool_out(g.0), pool_out(g.1));
        }
        grids
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.num_stages();
        if n == 0 {
            bail!("LSAGT config has no stages (dims is empty)");
        }
        for (name, len) in [("heads", self.heads.len()), ("layers", self.layers.len())] {
            if len != n {
                bail!("LSAGT config: {name} has {len} entries but dims has {n} (one per stage)");
            }
        }
        if self.layers[0] == 0 {
            bail!(
                "LSAGT config: stage 1 needs at least one layer (its layer 0 is the local shift attention)"
            );
        }
        for i in 0..n {
            let stage = format!("stage {}", i + 1);
            let [d, d_out] = self.dims[i];
            if d == 0 || d_out == 0 {
                bail!("LSAGT config: {stage} has a zero dim ({:?})", self.dims[i]);
            }
            if self.layers[i] == 0 {
                bail!("LSAGT config: {stage} has zero layers (every stage needs at least one)");
            }
            if self.heads[i] == 0 {
                bail!("LSAGT config: {stage} has zero heads");
            }
            ensure_divisible(&format!("LSAGT config: {stage} dim"), d, "heads", self.heads[i])?;
            if i + 1 < n && d_out != self.dims[i + 1][0] {
                bail!(
                    "LSAGT config: stage {} reduces to dim {d_out} but stage {} works at dim {}",
                    i + 1,
                    i + 2,
                    self.dims[i + 1][0]
                );
            }
            if i + 1 == n && d_out != d {
                bail!(
                    "LSAGT config: the last stage has no reduction, so its dims must be equal; got [{d}, {d_out}]"
                );
            }
        }
        if self.num_classes == 0 {
            bail!("LSAGT config: num_classes must be at least 1");
        }
        if self.mlp_ratio == 0 {
            bail!("LSAGT config: mlp_ratio must be at least 1");
        }
        if self.kernel == 0 || self.stride == 0 {
            bail!("LSAGT config: the patch-embedding kernel and stride must be at least 1");
        }
        for (name, rate) in [("drop_path", self.drop_path), ("dropout", self.dropout)] {
            if !(0.0..1.0).contains(&rate) {
                bail!("LSAGT config: {name} must be in [0, 1), got {rate}");
            }
        }
        let s = self.image_size;
        if self.token_grid(s, s).is_none() {
            bail!(
                "LSAGT config: kernel {}, stride {}, padding {} give no token grid for {s}x{s} images that all \
                 {} shifted variants share{}",
                self.kernel,
                self.stride,
                self.padding,
                self.num_variants(),
                if self.scheme == ShiftScheme::Imagenet {
                    " (the ImageNet variants grow the canvas by up to 3 pixels)"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// Sizes `lo..=hi` of one image side that give the configured grid side, if any.
    fn valid_sides(&self) -> Option<(usize, usize)> {
        let target = self.token_grid(self.image_size, self.image_size)?.0;
        let limit = 2 * self.image_size + 2 * self.kernel + 8;
        let ok: Vec<usize> = (1..=limit)
            .filter(|&s| self.token_grid(s, s).map(|g| g.0) == Some(target))
            .collect();
        Some((*ok.first()?, *ok.last()?))
    }

    /// The position embeddings fix the token grid, so only inputs that give exactly the
    /// configured grid are valid.
    pub fn check_input(&self, h: usize, w: usize) -> Result<()> {
        let s = self.image_size;
        let Some(expected) = self.token_grid(s, s) else {
            bail!("LSAGT config makes no token grid of its own {s}x{s} input (see validate)");
        };
        if self.token_grid(h, w) == Some(expected) {
            return Ok(());
        }
        let sizes = match self.valid_sides() {
            Some((lo, hi)) if lo == hi => format!("{lo}x{lo}"),
            Some((lo, hi)) => format!("HxW with H and W in {lo}..={hi}"),
            None => format!("{s}x{s}"),
        };
        bail!(
            "LSAGT's position embeddings fix the token grid at {}x{}, so this model takes {sizes} images \
             (the released resolution is {s}x{s}); got {h}x{w}",
            expected.0,
            expected.1
        )
    }

    /// Builds a randomly initialised model (the configuration is assumed valid).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Lsagt<B> {
        let t = self.num_variants();
        let d0 = self.dims[0][0];
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let patch_embed = ShiftedPatchEmbed {
            projections: (0..t)
                .map(|_| conv2d(3, d0, k, s, p, 1, ConvInit::Normal002, device))
                .collect(),
            scheme: self.scheme,
        };
        let grids = self.grids(self.image_size, self.image_size);
        let last = self.num_stages() - 1;
        let stages = (0..self.num_stages())
            .map(|i| {
                let [d, d_out] = self.dims[i];
                let (gh, gw) = grids[i];
                let n = gh * gw;
                let attn = LsagtAttentionConfig::new(d, self.heads[i])
                    .with_shared_kv(self.shared_kv)
                    .with_dropout(self.dropout);
                let pos = Initializer::Normal { mean: 0.0, std: 0.02 };
                let blocks = (0..self.layers[i])
                    .map(|j| {
                        let local = i == 0 && j == 0;
                        Block {
                            local: local.then(|| attn.init_local(device)),
                            global: (!local).then(|| attn.init_global(device)),
                            mlp: Mlp {
                                fc1: linear(d, d * self.mlp_ratio, true, device),
                                fc2: linear(d * self.mlp_ratio, d, true, device),
                                drop: DropoutConfig::new(self.dropout).init(),
                            },
                        }
                    })
                    .collect();
                Stage {
                    variant_pos_emb: (i == 0).then(|| pos.init([t, n, d], device)),
                    pos_emb: (i > 0).then(|| pos.init([n, d], device)),
                    norm1: layer_norm(d, device),
                    norm2: layer_norm(d, device),
                    blocks,
                    reduce: (i < last).then(|| Reduce {
                        conv: conv2d(d, d_out, 3, 1, 1, 1, ConvInit::Normal002, device),
                        norm: layer_norm(d_out, device),
                        pool: MaxPool2dConfig::new([3, 3])
                            .with_strides([2, 2])
                            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                            .init(),
                    }),
                    drop_path: self.drop_path,
                    grid: (gh, gw),
                }
            })
            .collect();
        let d_last = self.dims[last][1];
        Lsagt {
            patch_embed,
            stages,
            norm: layer_norm(d_last, device),
            mlp_head: linear(d_last, self.num_classes, true, device),
        }
    }
}

fn layer_norm<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device)
}

/// `torch.roll(x, shift, dim)`: element `i` moves to `i + shift` (mod size).
pub fn roll_like_torch<B: Backend, const D: usize>(x: Tensor<B, D>, shift: i64, dim: usize) -> Tensor<B, D> {
    let size = x.dims()[dim];
    let s = shift.rem_euclid(size as i64) as usize;
    if s == 0 {
        return x;
    }
    Tensor::cat(
        vec![x.clone().slice_dim(dim, size - s..), x.slice_dim(dim, ..size - s)],
        dim,
    )
}

/// `F.pad(x, (left, 0, top, 0), mode="circular")` on a `B×C×H×W` batch: the last `left` columns
/// are prepended on the left and the last `top` rows on top.
pub fn circular_pad_left_top<B: Backend>(x: Tensor<B, 4>, left: usize, top: usize) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let x = if left > 0 {
        Tensor::cat(vec![x.clone().slice_dim(3, w - left..), x], 3)
    } else {
        x
    };
    if top > 0 {
        Tensor::cat(vec![x.clone().slice_dim(2, h - top..), x], 2)
    } else {
        x
    }
}

/// T per-variant convolutions of the shifted images (official `to_patch_embedding`).
#[derive(Module, Debug)]
pub struct ShiftedPatchEmbed<B: Backend> {
    pub projections: Vec<Conv2d<B>>,
    pub scheme: ShiftScheme,
}

impl<B: Backend> ShiftedPatchEmbed<B> {
    /// Image variant `t` (0 is the image itself).
    pub fn variant(&self, img: Tensor<B, 4>, t: usize) -> Tensor<B, 4> {
        if t == 0 {
            return img;
        }
        match self.scheme {
            ShiftScheme::Cifar => {
                let (dy, dx) = CIFAR_SHIFTS[t - 1];
                roll_like_torch(roll_like_torch(img, dy, 2), dx, 3)
            }
            ShiftScheme::Imagenet => {
                let (left, top) = IMAGENET_PADS[t - 1];
                circular_pad_left_top(img, left, top)
            }
        }
    }

    /// `B×3×H×W` → the tokens of every variant, `T×B×N×D`, the tokens of variant 0 on their own
    /// (`B×N×D`: the same values, computed apart so that their gradient does not go through a
    /// slice of the large variant tensor), and the token grid `(rows, cols)`.
    ///
    /// The patches of all variants are one gather from the image ([`ShiftScheme::patch_index`])
    /// rather than T rolls or paddings, each with its own im2col: a few kernels instead of
    /// hundreds of small copies per step.
    pub fn forward(&self, img: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 3>, (usize, usize)) {
        match self.forward_unbiased(img) {
            (v, Some(bias), x0, grid) => {
                let [t, d] = bias.dims();
                (v + bias.reshape([t, 1, 1, d]), x0, grid)
            }
            (v, None, x0, grid) => (v, x0, grid),
        }
    }

    /// [`ShiftedPatchEmbed::forward`] with the variant tokens left without their projection's
    /// bias, which comes apart (`T×D`, if the projections have one): the first stage adds it
    /// inside its LayerNorm ([`Stage::forward_variants`]) rather than in a pass of its own over
    /// the largest tensor of the model. Variant 0's own tokens have their bias.
    #[allow(clippy::type_complexity)]
    pub fn forward_unbiased(
        &self,
        img: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Option<Tensor<B, 2>>, Tensor<B, 3>, (usize, usize)) {
        let [b, c, h, w] = img.dims();
        let t = self.projections.len();
        assert_eq!(t, self.scheme.num_variants(), "one projection per variant");
        let (k, s, p) = conv_geometry(&self.projections[0]);
        assert!(
            self.projections
                .iter()
                .all(|conv| conv_geometry(conv) == (k, s, p)),
            "the variant projections share one geometry"
        );
        let (index, (gh, gw)) = self.scheme.patch_index((h, w), (k, s, p));
        let n = gh * gw;
        // Patch rows padded with zeros to 16 bytes of bf16: 27-wide rows (3×3×3) kept the
        // projection's product on a slow unaligned kernel (session 12).
        let width = (k * k * c).next_multiple_of(8);
        let wants_grad = img.is_require_grad();
        let pixels = img.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let geometry = [t, n, k * k];
        let cols = if wants_grad {
            shifted_patches_reference(pixels, &index, geometry, width)
        } else {
            shifted_patches(pixels, &index, geometry, width)
        };
        let x0 = conv2d_columns(
            &self.projections[0],
            cols.clone().slice_dim(0, 0..1).squeeze_dim(0),
        );
        let (variants, bias) = conv2d_many_columns_unbiased(&self.projections, cols);
        (variants, bias, x0, (gh, gw))
    }

    /// [`ShiftedPatchEmbed::forward`]'s variant tokens computed as T rolled (or padded) images and
    /// T convolutions: the plain path the gather is tested against.
    pub fn forward_reference(&self, img: Tensor<B, 4>) -> (Tensor<B, 4>, (usize, usize)) {
        let variants = (0..self.projections.len())
            .map(|t| self.variant(img.clone(), t).permute([0, 2, 3, 1]))
            .collect::<Vec<_>>();
        conv2d_nhwc_many(&self.projections, variants)
    }
}

/// Transformer MLP: Linear(D, rD) → GELU → Linear(rD, D).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub drop: Dropout,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.drop.forward(gelu(self.fc1.forward_rows(x)));
        self.drop.forward(self.fc2.forward_rows(x))
    }
}

/// One layer: exactly one of `local` / `global` is present.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Official `layers.0.0.layers.0.0` (first layer of the first stage).
    pub local: Option<LocalShiftAttention<B>>,
    pub global: Option<GlobalAttention<B>>,
    pub mlp: Mlp<B>,
}

/// Between stages: 3×3 conv → LayerNorm over channels → 3×3/2 max pool (official `layers.{k}.1`).
#[derive(Module, Debug)]
pub struct Reduce<B: Backend> {
    pub conv: Conv2d<B>,
    pub norm: LayerNorm<B>,
    pub pool: MaxPool2d,
}

impl<B: Backend> Reduce<B> {
    /// `B×N×D` tokens of a `rows×cols` grid → `B×N'×D'` tokens and the new grid.
    pub fn forward(&self, x: Tensor<B, 3>, (gh, gw): (usize, usize)) -> (Tensor<B, 3>, (usize, usize)) {
        let [b, _, d] = x.dims();
        let y = conv2d_nhwc(&self.conv, x.reshape([b, gh, gw, d]));
        let y = self.pool.forward(self.norm.forward(y).permute([0, 3, 1, 2]));
        let [_, c, h2, w2] = y.dims();
        (y.reshape([b, c, h2 * w2]).swap_dims(1, 2), (h2, w2))
    }
}

/// One stage (official `layers.{k}.0`, plus its reduction `layers.{k}.1`).
#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    /// First stage: one position embedding per variant, `T×N×D`.
    pub variant_pos_emb: Option<Param<Tensor<B, 3>>>,
    /// Later stages: `N×D`.
    pub pos_emb: Option<Param<Tensor<B, 2>>>,
    /// Shared by every layer of the stage, as in the released code.
    pub norm1: LayerNorm<B>,
    pub norm2: LayerNorm<B>,
    pub blocks: Vec<Block<B>>,
    pub reduce: Option<Reduce<B>>,
    /// Stochastic-depth rate (training only).
    pub drop_path: f64,
    /// The token grid the position embeddings are sized for.
    pub grid: (usize, usize),
}

impl<B: Backend> Stage<B> {
    fn check_grid(&self, grid: (usize, usize)) {
        assert!(
            grid == self.grid,
            "LSAGT: the input gives a {}x{} token grid but the position embeddings are sized for {}x{} \
             (see LsagtConfig::check_input for valid input sizes)",
            grid.0,
            grid.1,
            self.grid.0,
            self.grid.1
        );
    }

    /// First stage: `T×B×N×D` variant tokens, less a per-variant `bias` (`T×D`) if one is given
    /// ([`ShiftedPatchEmbed::forward_unbiased`]), and variant 0's own (`B×N×D`, the same values
    /// as `variants[0]` with its bias) → `B×N×D`. The bias and the position embeddings are added
    /// inside the first LayerNorm ([`LayerNorm::forward_shifted`]). Each block takes two rows of
    /// `noise`.
    pub fn forward_variants(
        &self,
        variants: Tensor<B, 4>,
        bias: Option<Tensor<B, 2>>,
        x0: Tensor<B, 3>,
        grid: (usize, usize),
        noise: &mut DropPathNoise<B>,
    ) -> Tensor<B, 3> {
        self.check_grid(grid);
        let [t, _, n, d] = variants.dims();
        let pos = self.variant_pos_emb.as_ref().map(|p| p.val());
        let bias = bias.map(|b| b.reshape([t, 1, d]));
        let shift = match (pos.clone(), bias) {
            (Some(pos), Some(bias)) => Some(pos + bias),
            (Some(pos), None) => Some(pos),
            (None, Some(bias)) => Some(bias.expand([t, n, d])),
            (None, None) => None,
        };
        let x = match pos {
            Some(pos) => x0 + pos.slice_dim(0, 0..1),
            None => x0,
        };
        let normed = match shift {
            Some(shift) => self.norm1.forward_shifted(variants, shift),
            None => self.norm1.forward(variants),
        };
        self.run(x, Some(normed), noise)
    }

    /// Later stages: `B×N×D` → `B×N×D`. Each block takes two rows of `noise`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        grid: (usize, usize),
        noise: &mut DropPathNoise<B>,
    ) -> Tensor<B, 3> {
        self.check_grid(grid);
        let x = match &self.pos_emb {
            Some(pos) => x + pos.val().unsqueeze_dim::<3>(0),
            None => x,
        };
        self.run(x, None, noise)
    }

    fn run(
        &self,
        mut x: Tensor<B, 3>,
        mut normed_variants: Option<Tensor<B, 4>>,
        noise: &mut DropPathNoise<B>,
    ) -> Tensor<B, 3> {
        for block in &self.blocks {
            let h = self.norm1.forward(x.clone());
            let a = match (&block.local, &block.global) {
                (Some(local), _) => {
                    let variants = normed_variants
                        .take()
                        .expect("the local layer needs the shifted variants");
                    local.forward(h, variants)
                }
                (None, Some(global)) => global.forward(h),
                (None, None) => unreachable!("an LSAGT block has an attention"),
            };
            x = x + drop_path(a, noise);
            let m = block.mlp.forward(self.norm2.forward(x.clone()));
            x = x + drop_path(m, noise);
        }
        x
    }
}

#[derive(Module, Debug)]
pub struct Lsagt<B: Backend> {
    /// Official `to_patch_embedding`.
    pub patch_embed: ShiftedPatchEmbed<B>,
    /// Official `layers`.
    pub stages: Vec<Stage<B>>,
    pub norm: LayerNorm<B>,
    pub mlp_head: Linear<B>,
}

impl<B: Backend> Lsagt<B> {
    /// Logits and each stage's tokens (after its transformer, before its reduction).
    pub fn forward_features(&self, x: Tensor<B, 4>) -> ModelOutput<B> {
        let (variants, bias, x0, mut grid) = self.patch_embed.forward_unbiased(x);
        let mut outputs = Vec::with_capacity(self.stages.len());
        let mut tokens: Option<Tensor<B, 3>> = None;
        let rates = self.stages.iter();
        let rates = rates
            .flat_map(|s| vec![s.drop_path; 2 * s.blocks.len()])
            .collect();
        let mut noise = DropPathNoise::new(x0.dims()[0], rates, &x0.device());
        let mut variants = Some((variants, bias, x0));
        for stage in &self.stages {
            let y = match (tokens.take(), variants.take()) {
                (Some(x), _) => stage.forward(x, grid, &mut noise),
                (None, Some((v, bias, x0))) => stage.forward_variants(v, bias, x0, grid, &mut noise),
                (None, None) => unreachable!(),
            };
            outputs.push(y.clone());
            tokens = Some(match &stage.reduce {
                Some(reduce) => {
                    let (y, g) = reduce.forward(y, grid);
                    grid = g;
                    y
                }
                None => y,
            });
        }
        let x = self
            .norm
            .forward(tokens.expect("an LSAGT has at least one stage"));
        let [b, _, d] = x.dims();
        let logits = self.mlp_head.forward(x.mean_dim(1).reshape([b, d]));
        ModelOutput {
            logits,
            stages: outputs,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_features(x).logits
    }
}

/// Official name → module path:
/// `to_patch_embedding.projections.3.bias` → `patch_embed.projections.3.bias`,
/// `layers.0.0.pos_emb` → `stages.0.variant_pos_emb` (later stages: `stages.{k}.pos_emb`),
/// `layers.0.0.layers.0.0.Wq_even.weight` → `stages.0.blocks.0.local.wq.weight`,
/// `layers.2.0.layers.1.0.Wkv_odd.bias` → `stages.2.blocks.1.global.wkv.bias`,
/// `layers.1.0.layers.3.1.fc2.weight` → `stages.1.blocks.3.mlp.fc2.weight`,
/// `layers.0.1.conv.weight` → `stages.0.reduce.conv.weight`, `layers.1.0.norm1.weight` →
/// `stages.1.norm1.gamma` (LayerNorm `weight`/`bias` become `gamma`/`beta`), `mlp_head.*` unchanged.
/// Unknown names are returned as they are (the loader then lists them as unused).
pub fn rename_official(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("to_patch_embedding.") {
        return format!("patch_embed.{rest}");
    }
    if let Some(rest) = name.strip_prefix("norm.") {
        return format!("norm.{}", norm_param(rest));
    }
    let parts: Vec<&str> = name.split('.').collect();
    let index = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let (Some("layers"), Some(k)) = (parts.first().copied(), index(1)) else {
        return name.to_string();
    };
    let tail = |from: usize| parts[from..].join(".");
    match (parts.get(2).copied(), parts.get(3).copied()) {
        (Some("1"), Some("norm")) => format!("stages.{k}.reduce.norm.{}", norm_param(&tail(4))),
        (Some("1"), Some(_)) => format!("stages.{k}.reduce.{}", tail(3)),
        (Some("0"), Some("pos_emb")) if parts.len() == 4 => {
            format!(
                "stages.{k}.{}",
                if k == 0 { "variant_pos_emb" } else { "pos_emb" }
            )
        }
        (Some("0"), Some(norm @ ("norm1" | "norm2"))) => {
            format!("stages.{k}.{norm}.{}", norm_param(&tail(4)))
        }
        (Some("0"), Some("layers")) => match (index(4), parts.get(5).copied(), parts.get(6).copied()) {
            (Some(j), Some("0"), Some(proj)) if parts.len() > 7 => {
                let kind = if k == 0 && j == 0 { "local" } else { "global" };
                let ours = match proj {
                    "Wq_even" | "Wq_odd" => "wq",
                    "Wkv_even" | "Wkv_odd" => "wkv",
                    other => other,
                };
                format!("stages.{k}.blocks.{j}.{kind}.{ours}.{}", tail(7))
            }
            (Some(j), Some("1"), Some(_)) => format!("stages.{k}.blocks.{j}.mlp.{}", tail(6)),
            _ => name.to_string(),
        },
        _ => name.to_string(),
    }
}

/// LayerNorm `weight`/`bias` → Burn's `gamma`/`beta`. Done here rather than left to the
/// loader's adapter: burn-store 0.21 finds tensors through such alternative names but then still
/// reports them as unused.
fn norm_param(param: &str) -> &str {
    match param {
        "weight" => "gamma",
        "bias" => "beta",
        other => other,
    }
}

/// Per-layer MACs and parameters at `h×w` input (which must be valid, see
/// [`LsagtConfig::check_input`]).
pub fn costs(config: &LsagtConfig, h: usize, w: usize) -> Vec<LayerCost> {
    let mut out = Vec::new();
    let grids = config.grids(h, w);
    if grids.is_empty() {
        return out;
    }
    let t = config.num_variants() as u64;
    let d0 = config.dims[0][0] as u64;
    let k = config.kernel as u64;
    let (gh, gw) = (grids[0].0 as u64, grids[0].1 as u64);
    let embed = flops::conv2d("patch_embed", 3, d0, k, 1, gh, gw, true);
    out.push(LayerCost::new(
        format!("patch_embed ({t} variants)"),
        t * embed.macs,
        t * embed.params,
    ));
    for (i, &(gh, gw)) in grids.iter().enumerate() {
        let s = i + 1;
        let [d, d_out] = config.dims[i];
        let (d, d_out) = (d as u64, d_out as u64);
        let n = (gh * gw) as u64;
        let heads = config.heads[i] as u64;
        let dh = d / heads;
        let kvh = if config.shared_kv { 1 } else { heads };
        let kv_dim = 2 * kvh * dh;
        let hidden = d * config.mlp_ratio as u64;
        let pos = if i == 0 { t * n * d } else { n * d };
        out.push(LayerCost::new(format!("stage{s}.pos_emb"), 0, pos));
        out.push(LayerCost::new(format!("stage{s}.norm1+norm2 (shared)"), 0, 4 * d));
        for j in 0..config.layers[i] {
            let p = format!("stage{s}.block{j}");
            let projections = [
                flops::linear("wq", n, d, d, true),
                flops::linear("proj", n, d, d, true),
            ];
            let (mut macs, mut params) = projections
                .iter()
                .fold((0, 0), |(m, p), c| (m + c.macs, p + c.params));
            let (kind, keys) = if i == 0 && j == 0 {
                // Keys/values of all T variants; scores and mixing over T per token and head.
                let kv = flops::linear("wkv", t * n, d, kv_dim, true);
                ("local_attn", (kv, 2 * n * t * d))
            } else {
                let kv = flops::linear("wkv", n, d, kv_dim, true);
                ("global_attn", (kv, 2 * n * n * d))
            };
            macs += keys.0.macs + keys.1;
            params += keys.0.params;
            out.push(LayerCost::new(format!("{p}.{kind}"), macs, params));
            let fc1 = flops::linear("fc1", n, d, hidden, true);
            let fc2 = flops::linear("fc2", n, hidden, d, true);
            out.push(LayerCost::new(
                format!("{p}.mlp"),
                fc1.macs + fc2.macs,
                fc1.params + fc2.params,
            ));
        }
        if i + 1 < grids.len() {
            let conv = flops::conv2d("conv", d, d_out, 3, 1, gh as u64, gw as u64, true);
            out.push(LayerCost::new(
                format!("stage{s}.reduce"),
                conv.macs,
                conv.params + 2 * d_out,
            ));
        }
    }
    let last = config.dims[config.num_stages() - 1][1] as u64;
    out.push(flops::norm("norm", last));
    out.push(flops::linear(
        "mlp_head",
        1,
        last,
        config.num_classes as u64,
        true,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn rename_maps_every_kind_of_name() {
        let cases = [
            (
                "to_patch_embedding.projections.3.bias",
                "patch_embed.projections.3.bias",
            ),
            ("layers.0.0.pos_emb", "stages.0.variant_pos_emb"),
            ("layers.2.0.pos_emb", "stages.2.pos_emb"),
            ("layers.1.0.norm1.weight", "stages.1.norm1.gamma"),
            ("layers.1.0.norm2.bias", "stages.1.norm2.beta"),
            (
                "layers.0.0.layers.0.0.Wq_even.weight",
                "stages.0.blocks.0.local.wq.weight",
            ),
            (
                "layers.0.0.layers.0.0.Wkv_even.bias",
                "stages.0.blocks.0.local.wkv.bias",
            ),
            (
                "layers.0.0.layers.0.0.proj.weight",
                "stages.0.blocks.0.local.proj.weight",
            ),
            (
                "layers.0.0.layers.1.0.Wq_odd.weight",
                "stages.0.blocks.1.global.wq.weight",
            ),
            (
                "layers.3.0.layers.0.0.proj.bias",
                "stages.3.blocks.0.global.proj.bias",
            ),
            (
                "layers.1.0.layers.3.1.fc2.weight",
                "stages.1.blocks.3.mlp.fc2.weight",
            ),
            ("layers.0.1.conv.weight", "stages.0.reduce.conv.weight"),
            ("layers.2.1.norm.bias", "stages.2.reduce.norm.beta"),
            ("norm.weight", "norm.gamma"),
            ("mlp_head.weight", "mlp_head.weight"),
            ("something.else", "something.else"),
        ];
        for (official, ours) in cases {
            assert_eq!(rename_official(official), ours, "{official}");
        }
    }

    #[test]
    fn torch_roll_and_circular_pad_semantics() {
        let device = Default::default();
        let x = Tensor::<B, 1, Int>::arange(0..4, &device).float();
        // torch.roll([0,1,2,3], 1) = [3,0,1,2]; torch.roll(…, -1) = [1,2,3,0].
        let r: Vec<f32> = roll_like_torch(x.clone(), 1, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [3.0, 0.0, 1.0, 2.0]);
        let r: Vec<f32> = roll_like_torch(x.clone(), -5, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [1.0, 2.0, 3.0, 0.0]);
        // Burn's own roll shifts the other way: element i moves to i − shift.
        let r: Vec<f32> = x.roll_dim(1, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [1.0, 2.0, 3.0, 0.0]);
        // F.pad(x, (2, 0, 1, 0), mode="circular") of [[0,1,2],[3,4,5]].
        let img = Tensor::<B, 1, Int>::arange(0..6, &device)
            .float()
            .reshape([1, 1, 2, 3]);
        let p: Vec<f32> = circular_pad_left_top(img, 2, 1).into_data().to_vec().unwrap();
        assert_eq!(
            p,
            [
                4.0, 5.0, 3.0, 4.0, 5.0, 1.0, 2.0, 0.0, 1.0, 2.0, 4.0, 5.0, 3.0, 4.0, 5.0
            ]
        );
    }

    #[test]
    fn gathered_patches_match_rolled_convolutions_with_gradients() {
        use burn::module::Module;
        use burn::tensor::Distribution;
        type A = burn::backend::Autodiff<B>;
        let device = Default::default();
        let close = |a: Tensor<B, 4>, b: Tensor<B, 4>, what: &str| {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
            assert_eq!(a.len(), b.len(), "{what}");
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{what}: {worst}");
        };
        // Non-square inputs; ImageNet's 9/7/1 geometry on a canvas that grows by up to 3 pixels.
        for (scheme, (h, w), (k, s, p)) in [
            (ShiftScheme::Cifar, (8, 6), (3, 1, 1)),
            (ShiftScheme::Imagenet, (29, 30), (9, 7, 1)),
            (ShiftScheme::Imagenet, (16, 12), (4, 4, 0)),
        ] {
            let embed = ShiftedPatchEmbed::<A> {
                projections: (0..scheme.num_variants())
                    .map(|_| conv2d(3, 5, k, s, p, 1, ConvInit::Normal002, &device))
                    .collect(),
                scheme,
            };
            let img = Tensor::<A, 4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
            let (v, x0, grid) = embed.forward(img.clone());
            let (vr, grid_r) = embed.forward_reference(img);
            assert_eq!(grid, grid_r, "{scheme:?}");
            let what = format!("{scheme:?} {h}x{w}");
            close(v.clone().inner(), vr.clone().inner(), &what);
            close(
                x0.clone().unsqueeze::<4>().inner(),
                vr.clone().slice_dim(0, 0..1).inner(),
                &what,
            );
            // Gradients of every projection, with variant 0 reaching it through x0 (new) or
            // through a slice of the variants (reference).
            let weights = |t: usize| Tensor::<A, 1, Int>::arange(0..t as i64, &device).float().sin();
            let n = v.dims().iter().product::<usize>();
            let loss = (v.reshape([n]) * weights(n)).sum() + x0.powi_scalar(2).sum();
            let loss_r =
                (vr.clone().reshape([n]) * weights(n)).sum() + vr.slice_dim(0, 0..1).powi_scalar(2).sum();
            let (g, g_r) = (loss.backward(), loss_r.backward());
            for conv in &embed.projections {
                let (a, b) = (conv.weight.grad(&g).unwrap(), conv.weight.grad(&g_r).unwrap());
                close(a, b, &format!("{what} weight gradient"));
            }
            assert!(embed.num_params() > 0);
        }
    }

    #[test]
    fn released_configs_are_valid_and_take_their_resolution() {
        for c in [
            LsagtConfig::cifar_tiny(),
            LsagtConfig::cifar_small(),
            LsagtConfig::cifar_base(),
            LsagtConfig::imagenet_tiny(),
            LsagtConfig::imagenet_small(),
        ] {
            c.validate().unwrap();
            c.check_input(c.image_size, c.image_size).unwrap();
        }
        let err = LsagtConfig::cifar_tiny()
            .check_input(64, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32x32") && err.contains("64x64"), "{err}");
        let err = LsagtConfig::imagenet_tiny()
            .check_input(256, 224)
            .unwrap_err()
            .to_string();
        assert!(err.contains("224..=227"), "{err}");
        assert!(LsagtConfig::imagenet_tiny().check_input(227, 225).is_ok());
        assert_eq!(
            LsagtConfig::imagenet_small().grids(224, 224),
            vec![(56, 56), (28, 28), (14, 14)]
        );
    }

    fn micro(scheme: ShiftScheme) -> LsagtConfig {
        let (size, kernel, stride, padding) = match scheme {
            ShiftScheme::Cifar => (8, 3, 1, 1),
            ShiftScheme::Imagenet => (16, 4, 4, 0),
        };
        LsagtConfig {
            drop_path: 0.5,
            ..LsagtConfig::released(
                scheme,
                size,
                &[[8, 16], [16, 16]],
                &[2, 4],
                &[2, 1],
                3,
                (kernel, stride, padding),
            )
        }
    }

    #[test]
    fn training_forward_is_stochastic_and_differentiable_eval_is_not() {
        use burn::module::AutodiffModule;
        type A = burn::backend::Autodiff<B>;
        let device = Default::default();
        for scheme in [ShiftScheme::Cifar, ShiftScheme::Imagenet] {
            let config = micro(scheme);
            config.validate().unwrap();
            let s = config.image_size;
            let x = Tensor::<A, 4>::random([8, 3, s, s], burn::tensor::Distribution::Default, &device);
            // Drop-path is active on the autodiff backend: two passes differ.
            let model = config.init::<A>(&device);
            let diff = (model.forward(x.clone()) - model.forward(x.clone()))
                .abs()
                .max()
                .into_scalar();
            assert!(diff > 0.0, "{scheme:?}: drop-path inactive in training");
            // The inner (eval) model is deterministic.
            let eval = model.valid();
            let diff = (eval.forward(x.clone().inner()) - eval.forward(x.clone().inner()))
                .abs()
                .max();
            assert_eq!(diff.into_scalar(), 0.0);
            // Without drop-path, gradients reach a shifted variant's embedding (through the
            // roll / circular padding and the local attention).
            let model = LsagtConfig {
                drop_path: 0.0,
                ..config
            }
            .init::<A>(&device);
            let grads = model.forward(x).sum().backward();
            let g = model.patch_embed.projections[5]
                .weight
                .grad(&grads)
                .expect("a gradient");
            assert!(g.abs().sum().into_scalar() > 0.0, "{scheme:?}: no gradient");
        }
    }

    #[test]
    fn json_and_toml_configs_use_defaults() {
        let c: LsagtConfig = serde_json::from_str(
            r#"{"scheme": "cifar", "image_size": 32, "dims": [[64, 64], [64, 64]], "heads": 2,
                "layers": [1, 1], "num_classes": 10, "kernel": 3, "stride": 1, "padding": 1}"#,
        )
        .unwrap();
        assert!(c.shared_kv);
        assert_eq!(
            (c.heads.clone(), c.mlp_ratio, c.drop_path, c.dropout),
            (vec![2, 2], 4, 0.1, 0.0)
        );
        c.validate().unwrap();
        let back: LsagtConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let t: LsagtConfig = toml::from_str(
            "scheme = \"imagenet\"\nimage_size = 56\ndims = [[32, 48], [48, 48]]\nheads = [2, 3]\n\
             layers = [1, 1]\nnum_classes = 5\nkernel = 9\nstride = 7\npadding = 1\n",
        )
        .unwrap();
        assert!(!t.shared_kv);
        t.validate().unwrap();
    }
}
