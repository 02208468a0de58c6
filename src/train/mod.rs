//! Training and evaluation: `vicinity train`, `eval` and `predict`.
//!
//! - [`config`]: the recipe presets (`papers`, `cifar-fast`) and every override, serialisable.
//! - [`trainer`]: the loop (fresh and resumed runs, budget sizing, NaN stop, progress, reports).
//! - [`optim`]: AdamW with parameter groups, global-norm clipping, f32 master weights, EMA.
//! - [`params`]: parameters by name (weight-decay groups, state keyed by name).
//! - [`schedule`]: warm-up + cosine per step, durations, the budget arithmetic.
//! - [`checkpoint`]: the run directory and atomic checkpoint directories.
//! - [`metrics`]: top-1/top-5, per-class accuracy, confusion matrix, per-epoch CSV/JSONL.
//! - [`plot`]: the `curves.png` chart.
//! - [`inference`]: `eval` and `predict` on native or official checkpoints.
//! - [`demo`]: `train --quick`, a CPU-sized job on synthetic shapes.
//! - [`args`]: the command-line flags and commands.
//!
//! See `docs/TRAINING.md` for the user-facing description.

pub mod args;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod inference;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod trainer;

pub use args::{EvalArgs, PredictArgs, TrainArgs, eval_command, predict_command, train_command};
pub use config::{Dtype, Recipe, TrainConfig};
pub use trainer::{ResumeOptions, Stop, TrainOutcome, resume, train};
