//! The training configuration: a recipe preset plus every override, all serialisable so a run
//! directory records exactly what ran.

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::Warmup;
pub use crate::backend::Dtype;
use crate::data::{AugmentConfig, Normalize};
use crate::models::ModelConfig;

/// Recipe presets; every part can be overridden afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The papers' DeiT recipe: RandomResizedCrop, RandAugment m9, random erasing 0.25, Mixup 0.8 /
    /// CutMix 1.0, label smoothing 0.1, AdamW lr 5e-4·batch/512, wd 0.05, 5 warm-up epochs, cosine
    /// to 1e-5, clip 5, drop-path 0.1, 300 epochs.
    Papers,
    /// The anchors' fast CIFAR recipe: reflect-pad-4 crop + flip, label smoothing 0.1, AdamW lr 2e-3
    /// (not scaled), wd 0.05, 5% warm-up, cosine to 0, clip 5, drop-path 0.1, batch 256.
    CifarFast,
}

/// Everything a run needs; `TrainConfig::new` fills in a recipe's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model as named on the command line (registered name or config file).
    pub model_name: String,
    pub model: ModelConfig,
    /// Classifier size; `None` takes the dataset's class count.
    pub num_classes: Option<usize>,
    pub data: PathBuf,
    pub train_split: String,
    /// `auto` tries `val`, then `test`.
    pub val_split: String,
    /// Square input size; `None` is the model's own.
    pub resolution: Option<usize>,
    /// Images per step and rank (per GPU, as in the authors' code).
    pub batch_size: usize,
    /// Ranks the run started with: a step takes `batch_size × world_size` images.
    #[serde(default = "one")]
    pub world_size: usize,
    pub eval_batch_size: usize,
    pub epochs: usize,
    /// Wall-clock budget in seconds: sizes epochs and schedule to fit (overrides `epochs`).
    pub budget_s: Option<f64>,
    pub recipe: Recipe,
    pub augment: AugmentConfig,
    /// Stochastic depth rate; `None` keeps the model configuration's.
    pub drop_path: Option<f64>,
    /// Learning rate, per 512 images when `lr_per_512` is set.
    pub lr: f64,
    pub lr_per_512: bool,
    /// Cosine floor, scaled like `lr` (so the papers' 1e-5 at batch 512 stays under any peak).
    pub min_lr: f64,
    pub warmup: Warmup,
    pub optimizer: AdamWConfig,
    /// Maximum global gradient norm (`None`: no clipping).
    pub clip: Option<f64>,
    /// EMA decay of the weights (`None`: no EMA).
    pub ema: Option<f64>,
    pub seed: u64,
    pub dtype: Dtype,
    /// Evaluate every this many epochs (and after the last).
    pub eval_every: usize,
    /// Read the loss back (and refresh the progress line) every this many steps.
    pub log_every: usize,
    /// Also checkpoint `last` every this many steps (0: only at epoch ends).
    pub save_every: u64,
    /// Data decoding threads (0: all cores).
    pub workers: usize,
    /// Leave out images that cannot be decoded (counted and reported) instead of stopping.
    #[serde(default)]
    pub skip_bad: bool,
    pub out: PathBuf,
    /// Pause after this global step (checkpoint written; continue with `--resume`).
    #[serde(skip)]
    pub stop_at_step: Option<u64>,
    /// Test hook: feed NaN images at this global step.
    #[serde(skip)]
    pub debug_nan_at_step: Option<u64>,
    /// No progress output.
    #[serde(skip)]
    pub quiet: bool,
}

impl TrainConfig {
    pub fn new(recipe: Recipe, model_name: &str, model: ModelConfig, data: PathBuf, out: PathBuf) -> Self {
        let base = TrainConfig {
            model_name: model_name.to_string(),
            model,
            num_classes: None,
            data,
            train_split: "train".into(),
            val_split: "auto".into(),
            resolution: None,
            batch_size: 128,
            world_size: 1,
            eval_batch_size: 256,
            epochs: 300,
            budget_s: None,
            recipe,
            augment: AugmentConfig::papers(),
            drop_path: Some(0.1),
            lr: 5e-4,
            lr_per_512: true,
            min_lr: 1e-5,
            warmup: Warmup::Epochs(5.0),
            optimizer: AdamWConfig::default(),
            clip: Some(5.0),
            ema: None,
            seed: 0,
            dtype: Dtype::F32,
            eval_every: 1,
            log_every: 10,
            save_every: 0,
            workers: 0,
            skip_bad: false,
            out,
            stop_at_step: None,
            debug_nan_at_step: None,
            quiet: false,
        };
        match recipe {
            Recipe::Papers => base,
            Recipe::CifarFast => TrainConfig {
                augment: AugmentConfig {
                    label_smoothing: 0.1,
                    ..AugmentConfig::cifar_fast()
                },
                batch_size: 256,
                epochs: 10,
                lr: 2e-3,
                lr_per_512: false,
                min_lr: 0.0,
                warmup: Warmup::Fraction(0.05),
                ..base
            },
        }
    }

    /// Images per step over all ranks.
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.world_size
    }

    /// The batch per rank when the run continues on `world` ranks (the global batch stays).
    pub fn batch_on(&self, world: usize) -> Result<usize> {
        let global = self.global_batch();
        if world == 0 || !global.is_multiple_of(world) {
            bail!(
                "this run takes {global} images per step ({} per rank on {} ranks), which {world} ranks cannot share evenly; \
                 resume it on a world size that divides {global}",
                self.batch_size,
                self.world_size
            );
        }
        Ok(global / world)
    }

    /// The peak learning rate: `lr`, times `global batch/512` when the recipe scales it.
    pub fn peak_lr(&self) -> f64 {
        if self.lr_per_512 {
            self.lr * self.global_batch() as f64 / 512.0
        } else {
            self.lr
        }
    }

    /// The cosine schedule's floor: `min_lr`, scaled like [`Self::peak_lr`].
    pub fn floor_lr(&self) -> f64 {
        if self.lr_per_512 {
            self.min_lr * self.global_batch() as f64 / 512.0
        } else {
            self.min_lr
        }
    }

    /// Normalisation of train and eval images.
    pub fn normalize(&self) -> Normalize {
        self.augment.normalize
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            bail!("batch sizes must be positive");
        }
        if self.epochs == 0 && self.budget_s.is_none() {
            bail!("--epochs must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be positive, got {}", self.lr);
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!("--min-lr {} must lie between 0 and --lr {}", self.min_lr, self.lr);
        }
        if let Some(d) = self.ema
            && !(0.0..1.0).contains(&d)
        {
            bail!("--ema decay must be in [0, 1), got {d}");
        }
        if let Some(c) = self.clip
            && c <= 0.0
        {
            bail!("--clip must be positive (0 turns clipping off)");
        }
        if let Some(p) = self.drop_path
            && !(0.0..1.0).contains(&p)
        {
            bail!("--drop-path must be in [0, 1), got {p}");
        }
        if self.log_every == 0 || self.eval_every == 0 {
            bail!("--log-every and --eval-every must be at least 1");
        }
        let wd = self.optimizer.weight_decay;
        if !(wd >= 0.0 && wd.is_finite()) {
            bail!("--weight-decay must be 0 or positive, got {wd}");
        }
        self.validate_augment()
    }

    /// Probabilities in [0, 1], smoothing in [0, 1), mixing strengths at least 0: a value outside
    /// would train on nonsense targets or images without a word.
    fn validate_augment(&self) -> Result<()> {
        let a = &self.augment;
        let probability = |flag: &str, p: f32| -> Result<()> {
            if !(0.0..=1.0).contains(&p) {
                bail!("{flag} is a probability and must lie in [0, 1], got {p}");
            }
            Ok(())
        };
        probability("--hflip", a.hflip)?;
        if !(0.0..1.0).contains(&a.label_smoothing) {
            bail!("--smoothing must lie in [0, 1), got {}", a.label_smoothing);
        }
        if let Some(e) = &a.random_erasing {
            probability("--erasing", e.prob)?;
        }
        if let Some(m) = &a.mixing {
            for (flag, alpha) in [("--mixup", m.mixup_alpha), ("--cutmix", m.cutmix_alpha)] {
                if !(alpha >= 0.0 && alpha.is_finite()) {
                    bail!("{flag} is a Beta(α, α) strength and must be 0 (off) or positive, got {alpha}");
                }
            }
            probability("--mix-prob", m.prob)?;
            probability("--switch-prob", m.switch_prob)?;
        }
        Ok(())
    }
}

/// Normalisation presets by name.
pub fn normalize_by_name(name: &str) -> Result<Normalize> {
    Ok(match name {
        "imagenet" => Normalize::IMAGENET,
        "cifar10" => Normalize::CIFAR10,
        "cifar100" => Normalize::CIFAR100,
        _ => bail!("unknown normalisation '{name}' (imagenet, cifar10, cifar100)"),
    })
}

fn one() -> usize {
    1
}
