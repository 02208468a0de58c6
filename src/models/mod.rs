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
    pub stages: Vec<Tensor<B, 3>>,
}

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
        match self {
            Self::Vvt(c) => c.validate(),
            Self::Lsagt(c) => c.validate(),
        }
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

/// Every registered model name, in display order.
pub const MODEL_NAMES: [&str; 9] = [
    "vvt_tiny",
    "vvt_small",
    "vvt_medium",
    "vvt_large",
    "lsagt_cifar_tiny",
    "lsagt_cifar_small",
    "lsagt_cifar_base",
    "lsagt_imagenet_tiny",
    "lsagt_imagenet_small",
];

/// The released configuration of that name.
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
        _ => bail!(
            "unknown model '{name}'; valid names: {} (or pass a .json/.toml config file)",
            MODEL_NAMES.join(", ")
        ),
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
