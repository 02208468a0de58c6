//! LSAGT configurations: the released ones, the authors' JSON hyper-parameters, checks of what
//! an input or a configuration can be, and the cost model.

use anyhow::{Context, Result, bail};
use burn::module::Initializer;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{DropoutConfig, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::shift::{ShiftScheme, ShiftedPatchEmbed};
use super::{Block, LayerAttention, Lsagt, Mlp, Reduce, Stage};
use crate::attention::SoftmaxAttentionConfig;
use crate::flops::LayerCost;
use crate::models::{PerStage, ensure_divisible};
use crate::nn::{Conv2dConfig, LayerNorm, LayerNormConfig, LinearConfig, conv_out};

/// LayerNorm epsilon used everywhere in LSAGT.
const LN_EPS: f64 = 1e-6;

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
    /// T, the image and its first T − 1 shifts (LSAGT Table 5 "#Shifting"; default all of the
    /// scheme's). With T = 1 there is no local attention: stage 1's first layer is global too.
    pub variants: usize,
    /// Each variant made by its own convolution of the rolled image (the released models), or
    /// (false) the image translated with reflection padding and one shared convolution
    /// (Table 5 "Conv. Variations").
    pub conv_variants: bool,
    /// One position embedding per variant (the released models), or one shared by all
    /// (Table 5 "Pos. Embed.").
    pub variant_pos_emb: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLsagtConfig {
    scheme: ShiftScheme,
    image_size: usize,
    dims: Vec<[usize; 2]>,
    heads: PerStage<usize>,
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
    #[serde(default)]
    variants: Option<usize>,
    #[serde(default = "default_true")]
    conv_variants: bool,
    #[serde(default = "default_true")]
    variant_pos_emb: bool,
}

fn default_true() -> bool {
    true
}

impl From<RawLsagtConfig> for LsagtConfig {
    fn from(r: RawLsagtConfig) -> Self {
        let heads = r.heads.to_vec(r.dims.len());
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
            variants: r.variants.unwrap_or(r.scheme.num_variants()),
            conv_variants: r.conv_variants,
            variant_pos_emb: r.variant_pos_emb,
        }
    }
}

/// Grid side after the reduction's max pool (kernel 3, stride 2, padding 1).
fn pool_out(size: usize) -> usize {
    (size + 2 - 3) / 2 + 1
}

impl LsagtConfig {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn released(
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
            variants: scheme.num_variants(),
            conv_variants: true,
            variant_pos_emb: true,
        }
    }

    /// An LSAGT paper Table 5 variant of this model: `A` (no shifting), `B` (9 variants), `C`
    /// (translated variants, one shared convolution and position embedding), `D` (translated
    /// variants, one position embedding each), `E` (own convolutions, one shared position
    /// embedding); `Full` is the model itself.
    pub fn table5(mut self, variant: &str) -> Option<Self> {
        match variant {
            "A" => self.variants = 1,
            "B" => self.variants = 9,
            "C" => (self.conv_variants, self.variant_pos_emb) = (false, false),
            "D" => self.conv_variants = false,
            "E" => self.variant_pos_emb = false,
            "Full" => {}
            _ => return None,
        }
        Some(self)
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
        self.variants
    }

    /// Token grid `(rows, cols)` that the patch embedding makes of an `h×w` image, if every
    /// variant gives the same one.
    pub fn token_grid(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride.max(1), self.padding);
        let grid = (conv_out(h, k, s, p)?, conv_out(w, k, s, p)?);
        for t in 1..self.num_variants() {
            let (gw, gh) = if self.conv_variants {
                self.scheme.growth(t)
            } else {
                (0, 0)
            };
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
        let most = self.scheme.num_variants();
        if !(1..=most).contains(&self.variants) {
            bail!(
                "LSAGT config: variants = {} but the {:?} scheme has 1 to {most} (the image and its shifts)",
                self.variants,
                self.scheme
            );
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
            variants: t,
            reflect: !self.conv_variants,
            projections: (0..if self.conv_variants { t } else { 1 })
                .map(|_| {
                    Conv2dConfig::new([3, d0], k)
                        .with_stride(s)
                        .with_padding(p)
                        .init(device)
                })
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
                let attn = SoftmaxAttentionConfig::new(d, self.heads[i])
                    .with_shared_kv(self.shared_kv)
                    .with_dropout(self.dropout);
                let pos = Initializer::Normal { mean: 0.0, std: 0.02 };
                let blocks = (0..self.layers[i])
                    .map(|j| Block {
                        attn: if i == 0 && j == 0 && t > 1 {
                            LayerAttention::Local(attn.init_local(device))
                        } else {
                            LayerAttention::Global(attn.init(device))
                        },
                        mlp: Mlp {
                            fc1: LinearConfig::new(d, d * self.mlp_ratio).init(device),
                            fc2: LinearConfig::new(d * self.mlp_ratio, d).init(device),
                            drop: DropoutConfig::new(self.dropout).init(),
                        },
                    })
                    .collect();
                Stage {
                    variant_pos_emb: (i == 0)
                        .then(|| pos.init([if self.variant_pos_emb { t } else { 1 }, n, d], device)),
                    pos_emb: (i > 0).then(|| pos.init([n, d], device)),
                    norm1: layer_norm(d, device),
                    norm2: layer_norm(d, device),
                    blocks,
                    reduce: (i < last).then(|| Reduce {
                        conv: Conv2dConfig::new([d, d_out], 3).with_padding(1).init(device),
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
            mlp_head: LinearConfig::new(d_last, self.num_classes).init(device),
        }
    }
}

fn layer_norm<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device)
}

impl LsagtConfig {
    /// Per-layer MACs and parameters at `h×w` input (which must be valid, see
    /// [`LsagtConfig::check_input`]).
    pub fn costs(&self, h: usize, w: usize) -> Vec<LayerCost> {
        let config = self;
        let mut out = Vec::new();
        let grids = config.grids(h, w);
        if grids.is_empty() {
            return out;
        }
        let t = config.num_variants() as u64;
        let d0 = config.dims[0][0] as u64;
        let k = config.kernel as u64;
        let (gh, gw) = (grids[0].0 as u64, grids[0].1 as u64);
        let embed = LayerCost::conv2d("patch_embed", [3, d0], k, 1, [gh, gw]);
        out.push(LayerCost::new(
            format!("patch_embed ({t} variants)"),
            t * embed.macs,
            if config.conv_variants { t } else { 1 } * embed.params,
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
            let pos_t = if config.variant_pos_emb { t } else { 1 };
            let pos = if i == 0 { pos_t * n * d } else { n * d };
            out.push(LayerCost::new(format!("stage{s}.pos_emb"), 0, pos));
            out.push(LayerCost::new(format!("stage{s}.norm1+norm2 (shared)"), 0, 4 * d));
            for j in 0..config.layers[i] {
                let p = format!("stage{s}.block{j}");
                let projections = [
                    LayerCost::linear("wq", n, d, d, true),
                    LayerCost::linear("proj", n, d, d, true),
                ];
                let (mut macs, mut params) = projections
                    .iter()
                    .fold((0, 0), |(m, p), c| (m + c.macs, p + c.params));
                let (kind, keys) = if i == 0 && j == 0 && t > 1 {
                    // Keys/values of all T variants; scores and mixing over T per token and head.
                    let kv = LayerCost::linear("wkv", t * n, d, kv_dim, true);
                    ("local_attn", (kv, 2 * n * t * d))
                } else {
                    let kv = LayerCost::linear("wkv", n, d, kv_dim, true);
                    ("global_attn", (kv, 2 * n * n * d))
                };
                macs += keys.0.macs + keys.1;
                params += keys.0.params;
                out.push(LayerCost::new(format!("{p}.{kind}"), macs, params));
                let fc1 = LayerCost::linear("fc1", n, d, hidden, true);
                let fc2 = LayerCost::linear("fc2", n, hidden, d, true);
                out.push(LayerCost::new(
                    format!("{p}.mlp"),
                    fc1.macs + fc2.macs,
                    fc1.params + fc2.params,
                ));
            }
            if i + 1 < grids.len() {
                let conv = LayerCost::conv2d("conv", [d, d_out], 3, 1, [gh as u64, gw as u64]);
                out.push(LayerCost::new(
                    format!("stage{s}.reduce"),
                    conv.macs,
                    conv.params + 2 * d_out,
                ));
            }
        }
        let last = config.dims[config.num_stages() - 1][1] as u64;
        out.push(LayerCost::norm("norm", last));
        out.push(LayerCost::linear(
            "mlp_head",
            1,
            last,
            config.num_classes as u64,
            true,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn misspelled_fields_are_refused() {
        let err = serde_json::from_str::<LsagtConfig>(
            r#"{"scheme": "cifar", "image_size": 32, "dims": [[64, 64]], "heads": 2, "layers": [1],
                "num_classes": 10, "kernel": 3, "stride": 1, "padding": 1, "dropuot": 0.1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dropuot"), "{err}");
    }
}
