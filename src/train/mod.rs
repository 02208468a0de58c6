//! Training and evaluation: `vicinity train`, `eval` and `predict`.
//!
//! - [`config`]: the recipe presets (`papers`, `cifar-fast`) and every override, serialisable.
//! - [`trainer`]: the loop (fresh and resumed runs, NaN stop, progress, reports); [`setup`]: the
//!   data splits, the model as trained, the loaders.
//! - [`loss`]: soft-target cross-entropy; [`evaluate`]: one pass over a split.
//! - [`budget`]: sizing a run to a wall-clock budget, and durations.
//! - [`optim`]: AdamW with parameter groups, global-norm clipping, f32 master weights, EMA.
//! - [`params`]: parameters by name (weight-decay groups, state keyed by name).
//! - [`schedule`]: warm-up + cosine per step.
//! - [`checkpoint`]: the run directory and atomic checkpoint directories.
//! - [`signals`]: Ctrl-C, SIGTERM and SIGHUP pause a run.
//! - [`metrics`]: top-1/top-5, per-class accuracy, confusion matrix, per-epoch CSV/JSONL.
//! - [`plot`]: the `curves.png` chart.
//! - [`inference`]: `eval` and `predict` on native or official checkpoints.
//! - [`demo`]: `train --quick`, a CPU-sized job on synthetic shapes.
//!
//! The command-line flags live in [`crate::cli`]. See `docs/TRAINING.md` for the user-facing
//! description.

pub mod ablate;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod evaluate;
pub mod inference;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod setup;
pub mod signals;
pub mod trainer;

pub use config::{Dtype, Recipe, TrainConfig};
pub use trainer::{ResumeOptions, Stop, TrainOutcome, resume, train};
