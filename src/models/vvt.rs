//! VVT: the Vicinity Vision Transformer, a four-stage pyramid of vicinity attention blocks.
//!
//! Module names follow the official checkpoints where Burn allows (`stages.{i}` stands for the
//! official `patch_embed{i+1}` / `block{i+1}` / `norm{i+1}`), see [`rename_official`].

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use serde::{Deserialize, Serialize};

use super::{ModelOutput, PerStage, Probe, ProbeFn, ensure_divisible};
use crate::attention::{
    Attention, AttentionKind, GlobalContextConfig, LinformerAttentionConfig, Locality,
    PerformerAttentionConfig, PvtAttentionConfig, SoftmaxAttentionConfig, VicinityAttentionConfig, gcnet,
    linformer,
};
use crate::flops::LayerCost;
use crate::nn::{
    Conv2d, Conv2dConfig, ConvInit, DropPathNoise, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    drop_path,
};

fn default_true() -> bool {
    true
}
fn default_img_size() -> usize {
    224
}
fn default_drop_path() -> f64 {
    0.1
}
fn default_features() -> usize {
    64
}

/// A VVT configuration; the four released ones are [`VvtConfig::tiny`] … [`VvtConfig::large`].
/// Files naming a field it does not have are refused (a misspelling would otherwise be ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VvtConfig {
    /// Channels per stage.
    pub embed_dims: Vec<usize>,
    pub heads: Vec<usize>,
    /// MLP expansion ratio per stage.
    pub mlp_ratios: Vec<usize>,
    pub depths: Vec<usize>,
    /// Spatial reduction ratio r of keys/values per stage (1 = none).
    pub sr_ratios: Vec<usize>,
    /// Feature reduction ratio f per stage.
    pub fr_ratios: Vec<usize>,
    #[serde(default = "default_se_ratio")]
    pub se_ratio: usize,
    pub num_classes: usize,
    /// The attention of each stage (one kind for all, or one per stage; default vicinity).
    #[serde(default)]
    pub attention: PerStage<AttentionKind>,
    #[serde(default)]
    pub locality: Locality,
    /// The released code's magnitude clamps (needed for parity with official weights).
    #[serde(default = "default_true")]
    pub clamp: bool,
    /// The Feature Preserving Connection of vicinity and performer attention (off: VVT Table X's
    /// ablation). `fr_ratios` likewise reduce the features of both kinds.
    #[serde(default = "default_true")]
    pub fpc: bool,
    /// Random features m of `performer` attention.
    #[serde(default = "default_features")]
    pub performer_features: usize,
    /// Projected token count k of `linformer` attention (at most a stage's token count).
    #[serde(default = "default_features")]
    pub linformer_k: usize,
    /// Overlapping patch embedding (k7/s4, then k3/s2); off: plain non-overlapping patches
    /// (k4/s4, then k2/s2), VVT-Tiny* of the VVT paper's Table XIII.
    #[serde(default = "default_true")]
    pub overlap_patch_embed: bool,
    /// The convolutional feed-forward (a depth-wise 3×3 conv between the MLP's linears); off: a
    /// plain MLP (Table XIII).
    #[serde(default = "default_true")]
    pub conv_mlp: bool,
    #[serde(default = "default_drop_path")]
    pub drop_path: f64,
    /// Default input resolution (square).
    #[serde(default = "default_img_size")]
    pub img_size: usize,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
}

fn default_se_ratio() -> usize {
    1
}
fn default_in_chans() -> usize {
    3
}

impl VvtConfig {
    fn released(mlp_ratios: [usize; 4], depths: [usize; 4]) -> Self {
        Self {
            embed_dims: vec![96, 160, 320, 512],
            heads: vec![1, 2, 5, 8],
            mlp_ratios: mlp_ratios.to_vec(),
            depths: depths.to_vec(),
            sr_ratios: vec![1; 4],
            fr_ratios: vec![2; 4],
            se_ratio: 1,
            num_classes: 1000,
            attention: PerStage::All(AttentionKind::Vicinity),
            locality: Locality::TwoD,
            clamp: true,
            fpc: true,
            performer_features: 64,
            linformer_k: 64,
            overlap_patch_embed: true,
            conv_mlp: true,
            drop_path: 0.1,
            img_size: 224,
            in_chans: 3,
        }
    }
    pub fn tiny() -> Self {
        Self::released([8, 8, 4, 4], [2, 2, 2, 2])
    }
    pub fn small() -> Self {
        Self::released([8, 8, 4, 4], [3, 3, 9, 3])
    }
    pub fn medium() -> Self {
        Self::released([8, 8, 4, 4], [3, 3, 27, 3])
    }
    /// VVT-Tiny as one of the papers' ablations (Tables VI–XIII): `1d` / `nolocality` (Table VI),
    /// `no_fpc` (Table X), `plain` (VVT-Tiny*, Table XIII), `performer_fra_fpc` (Table XI: the
    /// Performer inside the Vicinity Attention Block), or every stage's attention replaced by a
    /// competitor (the Performer plain, as the paper's baseline); PVTv2's attention keeps PVTv2's
    /// spatial reductions 8, 4, 2, 1.
    pub fn tiny_ablation(variant: &str) -> Option<Self> {
        let mut c = Self::tiny();
        match variant {
            "1d" => c.locality = Locality::OneD,
            "nolocality" => c.locality = Locality::None,
            "no_fpc" => c.fpc = false,
            "plain" => (c.overlap_patch_embed, c.conv_mlp) = (false, false),
            "performer_fra_fpc" => c.attention = PerStage::All(AttentionKind::Performer),
            "performer" => {
                c.attention = PerStage::All(AttentionKind::Performer);
                (c.fr_ratios, c.fpc) = (vec![1; 4], false);
            }
            kind => {
                let kind: AttentionKind = kind.parse().ok().filter(|k| *k != AttentionKind::Vicinity)?;
                c.attention = PerStage::All(kind);
                if kind == AttentionKind::Pvt {
                    c.sr_ratios = vec![8, 4, 2, 1];
                }
            }
        }
        Some(c)
    }

    pub fn large() -> Self {
        Self::released([4, 4, 4, 4], [4, 4, 36, 4])
    }

    pub fn num_stages(&self) -> usize {
        self.embed_dims.len()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.num_stages();
        if n == 0 {
            bail!("VVT config has no stages (embed_dims is empty)");
        }
        for (name, len) in [
            ("heads", self.heads.len()),
            ("mlp_ratios", self.mlp_ratios.len()),
            ("depths", self.depths.len()),
            ("sr_ratios", self.sr_ratios.len()),
            ("fr_ratios", self.fr_ratios.len()),
        ] {
            if len != n {
                bail!("VVT config: {name} has {len} entries but embed_dims has {n} (one per stage)");
            }
        }
        if self.performer_features == 0 || self.linformer_k == 0 {
            bail!("VVT config: performer_features and linformer_k must be at least 1");
        }
        if let PerStage::Each(kinds) = &self.attention
            && kinds.len() != n
        {
            bail!(
                "VVT config: attention names {} kinds but embed_dims has {n} stages (one kind, or one per stage)",
                kinds.len()
            );
        }
        for i in 0..n {
            let (c, h, f) = (self.embed_dims[i], self.heads[i], self.fr_ratios[i]);
            let stage = format!("stage {}", i + 1);
            if c == 0 {
                bail!("VVT config: {stage} has embed_dim 0; every stage needs channels");
            }
            ensure_divisible(&format!("{stage}: embed_dim"), c, "heads", h)?;
            ensure_divisible(
                &format!("{stage}: embed_dim/heads"),
                c / h,
                "feature reduction f",
                f,
            )?;
            ensure_divisible(&format!("{stage}: embed_dim"), c, "se_ratio", self.se_ratio)?;
            if self.mlp_ratios[i] == 0 || self.sr_ratios[i] == 0 {
                bail!("VVT config: {stage} has a zero mlp_ratio or sr_ratio");
            }
        }
        if self.num_classes == 0 {
            bail!("VVT config: num_classes must be at least 1");
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            bail!("VVT config: drop_path must be in [0, 1), got {}", self.drop_path);
        }
        Ok(())
    }

    /// Grid sizes `(h, w)` of each stage for an `h×w` input.
    pub fn grids(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let mut grids = Vec::new();
        let (mut gh, mut gw) = (h, w);
        for i in 0..self.num_stages() {
            let (k, s, p) = self.patch_geometry(i);
            gh = (gh + 2 * p).saturating_sub(k) / s + 1;
            gw = (gw + 2 * p).saturating_sub(k) / s + 1;
            grids.push((gh, gw));
        }
        grids
    }

    pub fn check_input(&self, h: usize, w: usize) -> Result<()> {
        let factor = 4 << (self.num_stages() - 1);
        if h == 0 || w == 0 || !h.is_multiple_of(factor) || !w.is_multiple_of(factor) {
            bail!("VVT takes images whose height and width are multiples of {factor}; got {h}x{w}");
        }
        if (0..self.num_stages()).any(|i| self.attention.at(i) == AttentionKind::Linformer)
            && (h, w) != (self.img_size, self.img_size)
        {
            bail!(
                "this VVT has Linformer attention, whose projections are built for {0}x{0} input; got {h}x{w} \
                 (set img_size, or --resolution when training)",
                self.img_size
            );
        }
        for (i, (&(gh, gw), &r)) in self.grids(h, w).iter().zip(&self.sr_ratios).enumerate() {
            let r = if self.attention.at(i) == AttentionKind::PvtLinear {
                1
            } else {
                r
            };
            if gh % r != 0 || gw % r != 0 {
                bail!(
                    "VVT stage {} has a {gh}x{gw} grid that spatial reduction r={r} does not divide; use an input that is a multiple of {}",
                    i + 1,
                    factor * r
                );
            }
        }
        Ok(())
    }

    /// The Performer of block `j` of stage `i`, inside the Vicinity Attention Block's feature
    /// reduction and Feature Preserving Connection when the configuration has them (Table XI).
    fn performer(&self, i: usize, j: usize) -> PerformerAttentionConfig {
        PerformerAttentionConfig::new(self.embed_dims[i], self.heads[i])
            .with_features(self.performer_features)
            .with_seed((i * 1000 + j) as u64)
            .with_feature_reduction(self.fr_ratios[i])
            .with_fpc(self.fpc)
            .with_se_ratio(self.se_ratio)
    }

    /// A one-stage VVT whose attention is `kind` with `dim` channels and `heads` heads on a
    /// `side × side` token grid, with the settings of `vvt_tiny_<kind>` (PVTv2's r = 8, the plain
    /// Performer): [`Self::attention_layer`]`(0, 0)` of it is the layer such a model builds, which
    /// `bench --attention` times alone.
    pub fn one_layer(kind: AttentionKind, dim: usize, heads: usize, side: usize) -> Self {
        let base = Self::tiny_ablation(kind.name()).unwrap_or_else(Self::tiny);
        Self {
            embed_dims: vec![dim],
            heads: vec![heads],
            mlp_ratios: vec![base.mlp_ratios[0]],
            depths: vec![1],
            sr_ratios: vec![base.sr_ratios[0]],
            fr_ratios: vec![base.fr_ratios[0]],
            // The first stage's overlapping embedding (k7, s4, p3) makes a side × side grid of it.
            img_size: 4 * side,
            ..base
        }
    }

    /// The attention layer of block `j` of stage `i`.
    pub fn attention_layer<B: Backend>(&self, i: usize, j: usize, device: &B::Device) -> Attention<B> {
        let (c, heads) = (self.embed_dims[i], self.heads[i]);
        let vicinity = || {
            VicinityAttentionConfig::new(c, heads)
                .with_feature_reduction(self.fr_ratios[i])
                .with_spatial_reduction(self.sr_ratios[i])
                .with_se_ratio(self.se_ratio)
                .with_locality(self.locality)
                .with_clamp(self.clamp)
                .with_fpc(self.fpc)
        };
        match self.attention.at(i) {
            AttentionKind::Vicinity => Attention::Vicinity(vicinity().init(device)),
            AttentionKind::Cosformer => Attention::Vicinity(vicinity().cosformer().init(device)),
            AttentionKind::Softmax => Attention::Softmax(SoftmaxAttentionConfig::new(c, heads).init(device)),
            AttentionKind::Pvt | AttentionKind::PvtLinear => Attention::Pvt(
                PvtAttentionConfig::new(c, heads)
                    .with_sr_ratio(self.sr_ratios[i])
                    .with_linear(self.attention.at(i) == AttentionKind::PvtLinear)
                    .init(device),
            ),
            AttentionKind::Performer => Attention::Performer(self.performer(i, j).init(device)),
            AttentionKind::Linformer => {
                let (gh, gw) = self.grids(self.img_size, self.img_size)[i];
                Attention::Linformer(
                    LinformerAttentionConfig::new(c, heads, gh * gw)
                        .with_projected(self.linformer_k)
                        .init(device),
                )
            }
            AttentionKind::Gcnet => Attention::Gcnet(GlobalContextConfig::new(c).init(device)),
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Vvt<B> {
        let total_blocks: usize = self.depths.iter().sum();
        let mut block_index = 0;
        let mut stages = Vec::new();
        let norm = |c: usize, eps: f64| LayerNormConfig::new(c).with_epsilon(eps).init(device);
        for i in 0..self.num_stages() {
            let c_in = if i == 0 {
                self.in_chans
            } else {
                self.embed_dims[i - 1]
            };
            let c = self.embed_dims[i];
            let (k, s, p) = self.patch_geometry(i);
            let patch_embed = PatchEmbed {
                proj: Conv2dConfig::new([c_in, c], k)
                    .with_stride(s)
                    .with_padding(p)
                    .with_init(ConvInit::FanOut)
                    .init(device),
                norm: norm(c, 1e-5),
            };
            let blocks = (0..self.depths[i])
                .map(|j| {
                    let rate = if total_blocks > 1 {
                        self.drop_path * block_index as f64 / (total_blocks - 1) as f64
                    } else {
                        0.0
                    };
                    block_index += 1;
                    let hidden = c * self.mlp_ratios[i];
                    Block {
                        norm1: norm(c, 1e-6),
                        attn: self.attention_layer(i, j, device),
                        norm2: norm(c, 1e-6),
                        mlp: Mlp {
                            fc1: LinearConfig::new(c, hidden).init(device),
                            dwconv: self.conv_mlp.then(|| {
                                Conv2dConfig::new([hidden, hidden], 3)
                                    .with_padding(1)
                                    .with_groups(hidden)
                                    .with_init(ConvInit::FanOut)
                                    .init(device)
                            }),
                            fc2: LinearConfig::new(hidden, c).init(device),
                        },
                        drop_path: rate,
                    }
                })
                .collect();
            stages.push(Stage {
                patch_embed,
                blocks,
                norm: norm(c, 1e-6),
            });
        }
        let last = *self.embed_dims.last().expect("validated: at least one stage");
        Vvt {
            stages,
            head: LinearConfig::new(last, self.num_classes).init(device),
        }
    }
}

/// Kernel and stride of stage `i`'s overlapping patch embedding (padding `k/2`).
impl VvtConfig {
    /// Kernel, stride and padding of stage `i`'s patch embedding.
    fn patch_geometry(&self, i: usize) -> (usize, usize, usize) {
        match (self.overlap_patch_embed, i) {
            (true, 0) => (7, 4, 3),
            (true, _) => (3, 2, 1),
            (false, 0) => (4, 4, 0),
            (false, _) => (2, 2, 0),
        }
    }
}

/// Overlapping patch embedding: strided conv + LayerNorm.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
    pub norm: LayerNorm<B>,
}

/// Convolutional feed-forward: Linear → depth-wise 3×3 conv on the grid → GELU → Linear (without
/// `dwconv`: a plain MLP).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub dwconv: Option<Conv2d<B>>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        let x = self.fc1.forward(x);
        let x = match &self.dwconv {
            Some(dwconv) => {
                let [b, n, c] = x.dims();
                dwconv.forward(x.reshape([b, h, w, c])).reshape([b, n, c])
            }
            None => x,
        };
        self.fc2.forward(gelu(x))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    /// Stochastic-depth rate of this block (used in training only).
    pub drop_path: f64,
}

impl<B: Backend> Block<B> {
    /// Takes two rows of `noise` (one per residual branch).
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize, noise: &mut DropPathNoise<B>) -> Tensor<B, 3> {
        let a = self.attn.forward(self.norm1.forward(x.clone()), h, w);
        let x = x + drop_path(a, noise);
        let m = self.mlp.forward(self.norm2.forward(x.clone()), h, w);
        x + drop_path(m, noise)
    }
}

#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Vvt<B: Backend> {
    pub stages: Vec<Stage<B>>,
    pub head: Linear<B>,
}

impl<B: Backend> Vvt<B> {
    pub fn forward_features(&self, x: Tensor<B, 4>) -> ModelOutput<B> {
        self.forward_probed(x, &mut |_, t| t)
    }

    /// [`Self::forward_features`] with `probe` shown (and allowed to replace) every block's input
    /// and every stage's output tokens: what explanations read and differentiate.
    pub fn forward_probed(&self, x: Tensor<B, 4>, probe: &mut ProbeFn<'_, B>) -> ModelOutput<B> {
        // Channels-last from here on: the grid of tokens is `B×H×W×C`.
        let mut x = x.permute([0, 2, 3, 1]);
        let mut outputs = Vec::with_capacity(self.stages.len());
        let mut grids = Vec::with_capacity(self.stages.len());
        let last = self.stages.len() - 1;
        let rates = self.stages.iter().flat_map(|s| &s.blocks);
        let rates = rates.flat_map(|b| [b.drop_path; 2]).collect();
        let mut noise = DropPathNoise::new(x.dims()[0], rates, &x.device());
        for (i, stage) in self.stages.iter().enumerate() {
            let grid = stage.patch_embed.proj.forward(x);
            let [b, h, w, c] = grid.dims();
            let mut tokens = stage.patch_embed.norm.forward(grid.reshape([b, h * w, c]));
            for (j, block) in stage.blocks.iter().enumerate() {
                let site = Probe::BlockInput {
                    stage: i,
                    block: j,
                    grid: (h, w),
                };
                tokens = block.forward(probe(site, tokens), h, w, &mut noise);
            }
            let site = Probe::StageOutput {
                stage: i,
                grid: (h, w),
            };
            let tokens = probe(site, stage.norm.forward(tokens));
            outputs.push(tokens.clone());
            grids.push((h, w));
            if i == last {
                let pooled = tokens.mean_dim(1).reshape([b, c]);
                return ModelOutput {
                    logits: self.head.forward(pooled),
                    stages: outputs,
                    grids,
                };
            }
            x = tokens.reshape([b, h, w, c]);
        }
        unreachable!("a VVT has at least one stage")
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_features(x).logits
    }

    /// The same model without its random parts (drop-path, Performer's feature redraws) under
    /// autodiff too: for gradients of the evaluation model ([`crate::explain`]).
    pub fn deterministic(mut self) -> Self {
        for block in self.stages.iter_mut().flat_map(|s| &mut s.blocks) {
            block.drop_path = 0.0;
            if let Attention::Performer(a) = &mut block.attn {
                a.redraw = false;
            }
        }
        self
    }
}

/// Official name → module path: `patch_embed2.proj.weight` → `stages.1.patch_embed.proj.weight`,
/// `block3.0.attn.se_fc.2.weight` → `stages.2.blocks.0.attn.se_fc2.weight`, `norm4.bias` →
/// `stages.3.norm.bias`.
pub fn rename_official(name: &str) -> String {
    let stage_of = |rest: &str| -> Option<(usize, String)> {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let i: usize = digits.parse().ok()?;
        Some((i.checked_sub(1)?, rest[digits.len()..].to_string()))
    };
    let mapped = if let Some((i, rest)) = name.strip_prefix("patch_embed").and_then(stage_of) {
        Some(format!("stages.{i}.patch_embed{rest}"))
    } else if let Some((i, rest)) = name.strip_prefix("block").and_then(stage_of) {
        let rest = rest
            .replace(".attn.se_fc.0.", ".attn.se_fc1.")
            .replace(".attn.se_fc.2.", ".attn.se_fc2.")
            .replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.");
        Some(format!("stages.{i}.blocks{rest}"))
    } else if let Some((i, rest)) = name.strip_prefix("norm").and_then(stage_of) {
        Some(format!("stages.{i}.norm{rest}"))
    } else {
        None
    };
    mapped.unwrap_or_else(|| name.to_string())
}

impl VvtConfig {
    /// Per-layer MACs and parameters at `h×w` input.
    pub fn costs(&self, h: usize, w: usize) -> Vec<LayerCost> {
        let mut out = Vec::new();
        for (i, &(gh, gw)) in self.grids(h, w).iter().enumerate() {
            let s = i + 1;
            let c = self.embed_dims[i] as u64;
            let c_in = if i == 0 {
                self.in_chans
            } else {
                self.embed_dims[i - 1]
            } as u64;
            let grid = [gh as u64, gw as u64];
            let k = self.patch_geometry(i).0 as u64;
            let n = (gh * gw) as u64;
            out.push(LayerCost::conv2d(
                format!("patch_embed{s}.proj"),
                [c_in, c],
                k,
                1,
                grid,
            ));
            out.push(LayerCost::norm(format!("patch_embed{s}.norm"), c));
            let hidden = c * self.mlp_ratios[i] as u64;
            for j in 0..self.depths[i] {
                let p = format!("block{s}.{j}");
                out.push(LayerCost::norm(format!("{p}.norm1"), c));
                self.attention_costs(i, &p, grid, &mut out);
                out.push(LayerCost::norm(format!("{p}.norm2"), c));
                out.push(LayerCost::linear(format!("{p}.mlp.fc1"), n, c, hidden, true));
                if self.conv_mlp {
                    out.push(LayerCost::conv2d(
                        format!("{p}.mlp.dwconv"),
                        [hidden, hidden],
                        3,
                        hidden,
                        grid,
                    ));
                }
                out.push(LayerCost::linear(format!("{p}.mlp.fc2"), n, hidden, c, true));
            }
            out.push(LayerCost::norm(format!("norm{s}"), c));
        }
        let last = *self.embed_dims.last().expect("validated: at least one stage") as u64;
        out.push(LayerCost::linear("head", 1, last, self.num_classes as u64, true));
        out
    }

    /// The attention of a block of stage `i` on a `grid`, named `{p}.attn.*`: per layer where the
    /// layout is VVT's, one line per block for the competitors.
    fn attention_costs(&self, i: usize, p: &str, [gh, gw]: [u64; 2], out: &mut Vec<LayerCost>) {
        let (c, heads, n) = (self.embed_dims[i] as u64, self.heads[i], (gh * gw) as usize);
        let linear = |i: u64, o: u64| i * o + o;
        let kind = self.attention.at(i);
        let (macs, params) = match kind {
            AttentionKind::Vicinity => return self.vicinity_costs(i, p, [gh, gw], self.fr_ratios[i], out),
            AttentionKind::Cosformer => return self.vicinity_costs(i, p, [gh, gw], 1, out),
            AttentionKind::Softmax => {
                out.push(LayerCost::linear(format!("{p}.attn.wq"), n as u64, c, c, true));
                out.push(LayerCost::linear(
                    format!("{p}.attn.wkv"),
                    n as u64,
                    c,
                    2 * c,
                    true,
                ));
                out.push(LayerCost::new(
                    format!("{p}.attn.softmax"),
                    2 * (n * n) as u64 * c,
                    0,
                ));
                out.push(LayerCost::linear(format!("{p}.attn.proj"), n as u64, c, c, true));
                return;
            }
            AttentionKind::Pvt | AttentionKind::PvtLinear => {
                let cfg = PvtAttentionConfig::new(c as usize, heads)
                    .with_sr_ratio(self.sr_ratios[i])
                    .with_linear(kind == AttentionKind::PvtLinear);
                let k = if cfg.linear { 1 } else { cfg.sr_ratio as u64 };
                let reduce = if cfg.linear || k > 1 {
                    linear(c * k * k, c) + 2 * c
                } else {
                    0
                };
                (cfg.macs(gh as usize, gw as usize), 4 * c * c + 4 * c + reduce)
            }
            AttentionKind::Performer => {
                let cfg = self.performer(i, 0);
                (cfg.macs(n), cfg.params())
            }
            AttentionKind::Linformer => {
                let k = self.linformer_k.min(n) as u64;
                (
                    linformer::macs(c as usize, heads, n, k as usize),
                    4 * c * c + 4 * c + 2 * n as u64 * k,
                )
            }
            AttentionKind::Gcnet => {
                let hidden = GlobalContextConfig::new(c as usize).hidden() as u64;
                (
                    gcnet::macs(c as usize, 4, n),
                    linear(c, 1) + linear(c, hidden) + 2 * hidden + linear(hidden, c),
                )
            }
        };
        out.push(LayerCost::new(format!("{p}.attn.{}", kind.name()), macs, params));
    }

    /// The vicinity attention of a block of stage `i` on a `grid` with feature reduction `f`.
    fn vicinity_costs(&self, i: usize, p: &str, [gh, gw]: [u64; 2], f: usize, out: &mut Vec<LayerCost>) {
        let c = self.embed_dims[i] as u64;
        let f = f as u64;
        let r = self.sr_ratios[i] as u64;
        let heads = self.heads[i] as u64;
        let inner = c / f;
        let d = inner / heads;
        let locality = match self.attention.at(i) {
            AttentionKind::Cosformer => Locality::OneD,
            _ => self.locality,
        };
        let e = locality.expansion() as u64;
        let n = gh * gw;
        let m = n / (r * r);
        if r > 1 {
            out.push(LayerCost::conv2d(
                format!("{p}.attn.sr"),
                [c, c],
                r,
                1,
                [gh / r, gw / r],
            ));
            out.push(LayerCost::norm(format!("{p}.attn.norm"), c));
        }
        out.push(LayerCost::linear(format!("{p}.attn.q_proj"), n, c, inner, true));
        out.push(LayerCost::linear(format!("{p}.attn.k_proj"), m, c, inner, true));
        out.push(LayerCost::linear(format!("{p}.attn.v_proj"), m, c, inner, true));
        // k'ᵀv, q'·KV and the normaliser q'·Σk', per head.
        let core = heads * (m * e * d * d + n * e * d * d + n * e * d);
        out.push(LayerCost::new(format!("{p}.attn.vicinity"), core, 0));
        out.push(LayerCost::linear(format!("{p}.attn.out_proj"), n, inner, c, true));
        if self.fpc && self.attention.at(i) == AttentionKind::Vicinity {
            let squeezed = c / self.se_ratio as u64;
            out.push(LayerCost::new(
                format!("{p}.attn.se_fc"),
                2 * c * squeezed,
                2 * c * squeezed,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_maps_every_kind_of_name() {
        assert_eq!(
            rename_official("patch_embed1.proj.weight"),
            "stages.0.patch_embed.proj.weight"
        );
        assert_eq!(
            rename_official("block4.1.attn.se_fc.2.weight"),
            "stages.3.blocks.1.attn.se_fc2.weight"
        );
        assert_eq!(
            rename_official("block2.0.mlp.dwconv.dwconv.bias"),
            "stages.1.blocks.0.mlp.dwconv.bias"
        );
        assert_eq!(rename_official("norm3.weight"), "stages.2.norm.weight");
        assert_eq!(rename_official("head.bias"), "head.bias");
    }

    #[test]
    fn impossible_configs_are_rejected_with_a_reason() {
        let mut c = VvtConfig::tiny();
        c.heads[2] = 3;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("stage 3") && err.contains("divisible"), "{err}");
        let mut c = VvtConfig::tiny();
        c.depths.pop();
        assert!(c.validate().unwrap_err().to_string().contains("depths"));
        let err = VvtConfig::tiny().check_input(100, 224).unwrap_err().to_string();
        assert!(err.contains("multiples of 32"), "{err}");
        assert!(VvtConfig::tiny().check_input(224, 320).is_ok());
    }

    /// A stage's attention kind comes from the configuration, one for all stages or one each; the
    /// cost model counts the same parameters as the model holds.
    #[test]
    fn softmax_attention_is_chosen_by_configuration() {
        use burn::module::Module;
        type B = burn::backend::Flex;
        let json = |attention: &str| {
            format!(
                r#"{{"embed_dims": [16, 32, 32, 32], "heads": [1, 2, 2, 2], "mlp_ratios": [2, 2, 2, 2],
                "depths": [1, 1, 1, 1], "sr_ratios": [1, 1, 1, 1], "fr_ratios": [2, 2, 2, 2],
                "num_classes": 3, "img_size": 32, "attention": {attention}}}"#
            )
        };
        let all: VvtConfig = serde_json::from_str(&json(r#""softmax""#)).unwrap();
        assert_eq!(all.attention.at(3), AttentionKind::Softmax);
        let mixed: VvtConfig =
            serde_json::from_str(&json(r#"["softmax", "vicinity", "vicinity", "softmax"]"#)).unwrap();
        let device = Default::default();
        for config in [all, mixed.clone()] {
            config.validate().unwrap();
            let model = config.init::<B>(&device);
            let kinds: Vec<bool> = model
                .stages
                .iter()
                .map(|s| matches!(s.blocks[0].attn, Attention::Softmax(_)))
                .collect();
            let want: Vec<bool> = (0..4)
                .map(|i| config.attention.at(i) == AttentionKind::Softmax)
                .collect();
            assert_eq!(kinds, want);
            let x = Tensor::<B, 4>::ones([2, 3, 32, 32], &device);
            let y = model.forward(x);
            assert_eq!(y.dims(), [2, 3]);
            let v: Vec<f32> = y.into_data().to_vec().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
            let params: u64 = config.costs(32, 32).iter().map(|c| c.params).sum();
            assert_eq!(params as usize, model.num_params(), "{:?}", config.attention);
        }
        // The default is vicinity attention everywhere, and a JSON without the field reads so.
        let back: VvtConfig = serde_json::from_str(&serde_json::to_string(&mixed).unwrap()).unwrap();
        assert_eq!(back, mixed);
        let mut wrong = mixed;
        wrong.attention = PerStage::Each(vec![AttentionKind::Softmax; 3]);
        let err = wrong.validate().unwrap_err().to_string();
        assert!(err.contains("attention names 3 kinds"), "{err}");
        assert_eq!(VvtConfig::tiny().attention.at(2), AttentionKind::Vicinity);
    }

    /// Every attention kind, and the FPC switch, builds, runs forward and backward, and has the
    /// parameter count its cost model says.
    #[test]
    fn every_attention_kind_trains_and_counts_its_parameters() {
        use burn::module::Module;
        type A = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        let base = |attention| VvtConfig {
            embed_dims: vec![16, 32, 32, 32],
            heads: vec![1, 2, 2, 2],
            mlp_ratios: vec![2; 4],
            depths: vec![1; 4],
            sr_ratios: vec![2, 1, 1, 1],
            num_classes: 3,
            img_size: 64,
            performer_features: 8,
            linformer_k: 20,
            attention: PerStage::All(attention),
            ..VvtConfig::tiny()
        };
        let mut configs: Vec<VvtConfig> = AttentionKind::ALL.into_iter().map(base).collect();
        configs.push(VvtConfig {
            fpc: false,
            ..base(AttentionKind::Vicinity)
        });
        configs.push(VvtConfig {
            fr_ratios: vec![1; 4],
            fpc: false,
            ..base(AttentionKind::Performer)
        });
        configs.push(VvtConfig {
            overlap_patch_embed: false,
            conv_mlp: false,
            ..base(AttentionKind::Vicinity)
        });
        for config in configs {
            config.validate().unwrap();
            config.check_input(64, 64).unwrap();
            let model = config.init::<A>(&device);
            let params: u64 = config.costs(64, 64).iter().map(|c| c.params).sum();
            assert_eq!(
                params as usize,
                model.num_params(),
                "{:?} fpc {}",
                config.attention,
                config.fpc
            );
            let x = Tensor::<A, 4>::random(
                [2, 3, 64, 64],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            let y = model.forward(x);
            let v: Vec<f32> = y.clone().into_data().to_vec().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{:?}", config.attention);
            let grads = y.sum().backward();
            // norm1 feeds only the attention: a gradient there went through the attention.
            let norm1 = &model.stages[0].blocks[0].norm1.gamma;
            let g = norm1
                .grad(&grads)
                .expect("a gradient reaches through the attention");
            assert!(g.abs().sum().into_scalar() > 0.0, "{:?}", config.attention);
        }
        // Linformer models run at their own resolution only.
        let err = base(AttentionKind::Linformer)
            .check_input(96, 96)
            .unwrap_err()
            .to_string();
        assert!(err.contains("built for 64x64"), "{err}");
    }

    #[test]
    fn misspelled_fields_and_empty_stages_are_refused() {
        let json = serde_json::to_string(&VvtConfig::tiny()).unwrap();
        let typo = json.replace("\"drop_path\"", "\"drop_pth\"");
        let err = serde_json::from_str::<VvtConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("drop_pth"), "{err}");
        let mut c = VvtConfig::tiny();
        c.embed_dims[1] = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("stage 2") && err.contains("embed_dim 0"), "{err}");
    }
}
