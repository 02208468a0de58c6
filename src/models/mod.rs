//! The two model families and a registry of named configurations (in the spirit of timm's
//! `create_model`).
//!
//! A configuration is a plain serde struct, so any model can also come from a JSON or TOML file:
//! `{"family": "vvt", ...}` or `family = "lsagt"`.

pub mod lsagt;
pub mod vvt;

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use lsagt::{Lsagt, LsagtConfig};
pub use vvt::{Vvt, VvtConfig};

use crate::flops::LayerCost;

/// A setting given once for every stage, or once per stage (`2` or `[2, 4, 4]` in JSON/TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerStage<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Default> Default for PerStage<T> {
    fn default() -> Self {
        Self::All(T::default())
    }
}

impl<T: Copy> PerStage<T> {
    /// The value for stage `i` (0-based; `Each` must have been checked to have an entry).
    pub fn at(&self, i: usize) -> T {
        match self {
            Self::All(v) => *v,
            Self::Each(v) => v[i],
        }
    }

    /// One value per stage of `stages`.
    pub fn to_vec(&self, stages: usize) -> Vec<T> {
        match self {
            Self::All(v) => vec![*v; stages],
            Self::Each(v) => v.clone(),
        }
    }
}

/// Logits and every stage's output tokens (`B×N×C`), in the layout of the fixtures.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    pub logits: Tensor<B, 2>,
    /// Each stage's output tokens, `B×N×C`, on the grid of the same index in `grids`.
    pub stages: Vec<Tensor<B, 3>>,
    /// `(rows, columns)` of each stage's token grid.
    pub grids: Vec<(usize, usize)>,
}

/// A point of a forward pass that [`Model::forward_probed`] shows to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The tokens `B×N×C` entering block `block` of stage `stage` (VVT), on a `grid`.
    BlockInput {
        stage: usize,
        block: usize,
        grid: (usize, usize),
    },
    /// A stage's output tokens `B×N×C` (those of [`ModelOutput::stages`]), on a `grid`.
    StageOutput { stage: usize, grid: (usize, usize) },
}

/// Sees the tokens at a [`Probe`] and returns what the forward goes on with: the same tokens, or
/// tokens changed (a zero with a gradient added, for Grad-CAM).
pub type ProbeFn<'a, B> = dyn FnMut(Probe, Tensor<B, 3>) -> Tensor<B, 3> + 'a;

/// The most parameters a configuration may describe (4 × 2³⁰: 16 GiB of f32).
const MAX_PARAMS: u64 = 4 << 30;

/// Any configuration of either family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum ModelConfig {
    Vvt(VvtConfig),
    Lsagt(LsagtConfig),
}

/// A model of either family, so the CLI and trainer can hold one without knowing which.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one model per process; boxing buys nothing
pub enum Model<B: Backend> {
    Vvt(Vvt<B>),
    Lsagt(Lsagt<B>),
}

impl ModelConfig {
    /// Checks the configuration and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Model<B>> {
        self.validate()?;
        Ok(match self {
            Self::Vvt(c) => Model::Vvt(c.init(device)),
            Self::Lsagt(c) => Model::Lsagt(c.init(device)),
        })
    }

    /// Fails with a message naming the impossible part of the configuration.
    pub fn validate(&self) -> Result<()> {
        self.check_sizes()?;
        match self {
            Self::Vvt(c) => c.validate()?,
            Self::Lsagt(c) => c.validate()?,
        }
        // The model must take its own resolution (position embeddings and Linformer projections
        // are sized for it), which is also where its parameters are counted.
        let r = self.default_resolution();
        self.check_input(r, r).with_context(|| {
            format!("the configuration's own resolution {r}x{r} is not one the model takes")
        })?;
        let params: u64 = self.costs(r, r).iter().map(|c| c.params).sum();
        anyhow::ensure!(
            params <= MAX_PARAMS,
            "the configuration describes {params} parameters, more than the {MAX_PARAMS} (16 GB of \
             f32) vicinity builds: is a width or depth mistyped?"
        );
        Ok(())
    }

    /// Bounds on every size, generous for any vision transformer, so that a configuration file
    /// (or the one inside a weights file) cannot ask for terabytes or overflow a cost.
    fn check_sizes(&self) -> Result<()> {
        let mut sizes: Vec<(&str, usize, usize)> = Vec::new();
        match self {
            Self::Vvt(c) => {
                sizes.extend(c.embed_dims.iter().map(|&d| ("an embed_dim", d, 1 << 14)));
                sizes.extend(c.depths.iter().map(|&d| ("a depth", d, 1 << 10)));
                sizes.extend(c.mlp_ratios.iter().map(|&d| ("an mlp_ratio", d, 64)));
                sizes.extend(c.heads.iter().map(|&d| ("a head count", d, 1 << 12)));
                sizes.extend([
                    ("the number of stages", c.embed_dims.len(), 8),
                    ("num_classes", c.num_classes, 1 << 24),
                    ("img_size", c.img_size, 1 << 13),
                    ("performer_features", c.performer_features, 1 << 12),
                    ("linformer_k", c.linformer_k, 1 << 12),
                    ("in_chans", c.in_chans, 64),
                ]);
            }
            Self::Lsagt(c) => {
                sizes.extend(c.dims.iter().flatten().map(|&d| ("a dim", d, 1 << 14)));
                sizes.extend(c.layers.iter().map(|&d| ("a layer count", d, 1 << 10)));
                sizes.extend(c.heads.iter().map(|&d| ("a head count", d, 1 << 12)));
                sizes.extend([
                    ("the number of stages", c.layers.len(), 8),
                    ("num_classes", c.num_classes, 1 << 24),
                    ("image_size", c.image_size, 1 << 13),
                    // Stage 1's tokens, whose square the global attention's cost holds.
                    (
                        "the first stage's token count",
                        (c.image_size / c.stride.max(1) + 1).pow(2),
                        1 << 24,
                    ),
                    ("mlp_ratio", c.mlp_ratio, 64),
                    ("kernel", c.kernel, 64),
                    ("stride", c.stride, 64),
                    ("padding", c.padding, 64),
                ]);
            }
        }
        for (what, value, most) in sizes {
            anyhow::ensure!(
                value <= most,
                "{what} of {value} is beyond any model vicinity builds (at most {most})"
            );
        }
        Ok(())
    }

    /// Fails unless the model can take a `height×width` image.
    pub fn check_input(&self, height: usize, width: usize) -> Result<()> {
        match self {
            Self::Vvt(c) => c.check_input(height, width),
            Self::Lsagt(c) => c.check_input(height, width),
        }
    }

    /// Per-layer multiply-accumulates and parameters at an `h×w` input.
    pub fn costs(&self, h: usize, w: usize) -> Vec<LayerCost> {
        match self {
            Self::Vvt(c) => c.costs(h, w),
            Self::Lsagt(c) => c.costs(h, w),
        }
    }

    /// The resolution the model was designed for (square).
    pub fn default_resolution(&self) -> usize {
        match self {
            Self::Vvt(c) => c.img_size,
            Self::Lsagt(c) => c.image_size,
        }
    }

    /// The same model built for `res`×`res` input: LSAGT's position embeddings and a Linformer
    /// attention's projections are sized for it.
    pub fn at_resolution(mut self, res: usize) -> Self {
        match &mut self {
            Self::Vvt(c) => c.img_size = res,
            Self::Lsagt(c) => c.image_size = res,
        }
        self
    }

    pub fn num_stages(&self) -> usize {
        match self {
            Self::Vvt(c) => c.num_stages(),
            Self::Lsagt(c) => c.num_stages(),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::Vvt(c) => c.num_classes,
            Self::Lsagt(c) => c.num_classes,
        }
    }

    /// The same model with a different classifier size.
    pub fn with_num_classes(mut self, classes: usize) -> Self {
        match &mut self {
            Self::Vvt(c) => c.num_classes = classes,
            Self::Lsagt(c) => c.num_classes = classes,
        }
        self
    }

    /// Reads a configuration from a `.json` or `.toml` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let config: Self = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text)
                .with_context(|| format!("{} is not a valid TOML model config", path.display()))?,
            _ => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid JSON model config", path.display()))?,
        };
        config
            .validate()
            .with_context(|| format!("impossible model config in {}", path.display()))?;
        Ok(config)
    }
}

/// Every registered model name, in display order: the released models, then VVT-Tiny's
/// ablations ([`VvtConfig::tiny_ablation`]) and LSAGT-CIFAR-Tiny's ([`LsagtConfig::table5`]).
pub const MODEL_NAMES: [&str; 26] = [
    "vvt_tiny",
    "vvt_small",
    "vvt_medium",
    "vvt_large",
    "lsagt_cifar_tiny",
    "lsagt_cifar_small",
    "lsagt_cifar_base",
    "lsagt_imagenet_tiny",
    "lsagt_imagenet_small",
    "vvt_tiny_1d",
    "vvt_tiny_nolocality",
    "vvt_tiny_no_fpc",
    "vvt_tiny_plain",
    "vvt_tiny_softmax",
    "vvt_tiny_pvt",
    "vvt_tiny_pvt_linear",
    "vvt_tiny_performer",
    "vvt_tiny_performer_fra_fpc",
    "vvt_tiny_linformer",
    "vvt_tiny_cosformer",
    "vvt_tiny_gcnet",
    "lsagt_cifar_tiny_noshift",
    "lsagt_cifar_tiny_9shifts",
    "lsagt_cifar_tiny_translated_sharedpos",
    "lsagt_cifar_tiny_translated",
    "lsagt_cifar_tiny_sharedpos",
];

/// The LSAGT paper's Table 5 variants of `lsagt_cifar_tiny` by registered suffix.
const LSAGT_TABLE5: [(&str, &str); 5] = [
    ("noshift", "A"),
    ("9shifts", "B"),
    ("translated_sharedpos", "C"),
    ("translated", "D"),
    ("sharedpos", "E"),
];

/// The registered configuration of that name.
pub fn config_by_name(name: &str) -> Result<ModelConfig> {
    Ok(match name {
        "vvt_tiny" => ModelConfig::Vvt(VvtConfig::tiny()),
        "vvt_small" => ModelConfig::Vvt(VvtConfig::small()),
        "vvt_medium" => ModelConfig::Vvt(VvtConfig::medium()),
        "vvt_large" => ModelConfig::Vvt(VvtConfig::large()),
        "lsagt_cifar_tiny" => ModelConfig::Lsagt(LsagtConfig::cifar_tiny()),
        "lsagt_cifar_small" => ModelConfig::Lsagt(LsagtConfig::cifar_small()),
        "lsagt_cifar_base" => ModelConfig::Lsagt(LsagtConfig::cifar_base()),
        "lsagt_imagenet_tiny" => ModelConfig::Lsagt(LsagtConfig::imagenet_tiny()),
        "lsagt_imagenet_small" => ModelConfig::Lsagt(LsagtConfig::imagenet_small()),
        _ if !MODEL_NAMES.contains(&name) => bail!(
            "unknown model '{name}'; valid names: {} (or pass a .json/.toml config file)",
            MODEL_NAMES.join(", ")
        ),
        _ => match name.strip_prefix("vvt_tiny_").and_then(VvtConfig::tiny_ablation) {
            Some(c) => ModelConfig::Vvt(c),
            None => {
                let suffix = name.strip_prefix("lsagt_cifar_tiny_").unwrap_or_default();
                let letter = LSAGT_TABLE5.iter().find(|(s, _)| *s == suffix).map(|(_, l)| *l);
                let config = letter.and_then(|l| LsagtConfig::cifar_tiny().table5(l));
                ModelConfig::Lsagt(config.with_context(|| format!("'{name}' is listed but not built"))?)
            }
        },
    })
}

/// A registered name, or a path to a `.json`/`.toml` configuration file.
pub fn resolve_config(name_or_path: &str) -> Result<ModelConfig> {
    let path = Path::new(name_or_path);
    let is_file = matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "toml"));
    if is_file {
        ModelConfig::from_file(path)
    } else {
        config_by_name(name_or_path)
    }
}

impl<B: Backend> Model<B> {
    /// Logits and every stage's tokens for a `B×3×H×W` batch.
    ///
    /// # Panics
    /// On an empty batch, which no kernel is written for.
    pub fn forward_features(&self, x: Tensor<B, 4>) -> ModelOutput<B> {
        assert!(
            x.dims()[0] > 0,
            "the model was given an empty batch ({:?})",
            x.dims()
        );
        match self {
            Self::Vvt(m) => m.forward_features(x),
            Self::Lsagt(m) => m.forward_features(x),
        }
    }

    /// [`Self::forward_features`] with `probe` called at every [`Probe`] point (LSAGT has stage
    /// outputs only).
    pub fn forward_probed(&self, x: Tensor<B, 4>, probe: &mut ProbeFn<'_, B>) -> ModelOutput<B> {
        assert!(
            x.dims()[0] > 0,
            "the model was given an empty batch ({:?})",
            x.dims()
        );
        match self {
            Self::Vvt(m) => m.forward_probed(x, probe),
            Self::Lsagt(m) => m.forward_probed(x, probe),
        }
    }

    /// The same model with its random parts (drop-path, dropout, Performer's redraws) off, also
    /// under autodiff: gradients of the model as it evaluates (explanations).
    pub fn deterministic(self) -> Self {
        match self {
            Self::Vvt(m) => Self::Vvt(m.deterministic()),
            Self::Lsagt(m) => Self::Lsagt(m.deterministic()),
        }
    }

    /// Logits only.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        assert!(
            x.dims()[0] > 0,
            "the model was given an empty batch ({:?})",
            x.dims()
        );
        match self {
            Self::Vvt(m) => m.forward(x),
            Self::Lsagt(m) => m.forward(x),
        }
    }

    /// Logits averaged over the image and its mirror image when `flip` is set (test-time
    /// augmentation, as in fast CIFAR training); [`Self::forward`] otherwise.
    pub fn forward_tta(&self, x: Tensor<B, 4>, flip: bool) -> Tensor<B, 2> {
        if !flip {
            return self.forward(x);
        }
        let mirrored = x.clone().flip([3]);
        (self.forward(x) + self.forward(mirrored)).div_scalar(2.0)
    }
}

/// Shared checks for configurations.
pub(crate) fn ensure_divisible(what: &str, value: usize, by_what: &str, by: usize) -> Result<()> {
    if by == 0 || !value.is_multiple_of(by) {
        bail!("{what} = {value} is not divisible by {by_what} = {by}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_that_would_ask_for_terabytes_are_refused() {
        let base = config_by_name("vvt_tiny").unwrap();
        base.validate().unwrap();
        let mut wide = base.clone();
        let ModelConfig::Vvt(c) = &mut wide else {
            unreachable!()
        };
        c.embed_dims[3] = 1 << 20;
        let err = wide.validate().unwrap_err().to_string();
        assert!(err.contains("embed_dim of 1048576"), "{err}");
        // Within each bound, yet 16 GB of parameters in all.
        let mut deep = base.clone();
        let ModelConfig::Vvt(c) = &mut deep else {
            unreachable!()
        };
        c.embed_dims = vec![64, 128, 320, 16_384];
        c.heads = vec![1, 2, 5, 8];
        c.depths = vec![2, 2, 2, 1024];
        let err = deep.validate().unwrap_err().to_string();
        assert!(err.contains("parameters, more than"), "{err}");
        let mut stages = config_by_name("lsagt_cifar_tiny").unwrap();
        let ModelConfig::Lsagt(c) = &mut stages else {
            unreachable!()
        };
        c.layers = vec![1; 40];
        let err = stages.validate().unwrap_err().to_string();
        assert!(err.contains("number of stages of 40"), "{err}");
    }
}
