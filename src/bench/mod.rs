//! Throughput of training steps and inference on synthetic data, timed like the anchors: the first
//! step (kernel compilation and autotuning) is reported on its own, then warm-up steps, then the
//! mean over timed steps with the device synchronised.

use std::time::Instant;

use anyhow::Result;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::models::ModelConfig;

/// What one bench row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward, cross-entropy, backward and an AdamW step.
    Train,
    /// Forward only, without autodiff.
    Infer,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub model: String,
    pub mode: Mode,
    pub dtype: String,
    pub resolution: usize,
    pub batch: usize,
    /// Seconds of the first step (compilation and autotuning included).
    pub first_step_s: f64,
    pub mean_step_ms: f64,
    pub images_per_s: f64,
    /// Loss of the last timed training step (a NaN here means the step is broken).
    pub last_loss: Option<f32>,
}

pub struct BenchSpec<'a> {
    pub name: &'a str,
    pub config: &'a ModelConfig,
    pub mode: Mode,
    pub dtype: &'a str,
    pub resolution: usize,
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
}

fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))
}

/// Runs one bench row on backend `B` (autodiff for training; its inner backend for inference).
pub fn run<B: AutodiffBackend>(spec: &BenchSpec, device: &B::Device) -> Result<BenchRow> {
    let config = spec.config;
    config.check_input(spec.resolution, spec.resolution)?;
    let shape = [spec.batch, 3, spec.resolution, spec.resolution];
    let classes = config.num_classes();
    let row = |first: f64, total: f64, loss: Option<f32>| {
        let mean = total / spec.iters as f64;
        BenchRow {
            model: spec.name.to_string(),
            mode: spec.mode,
            dtype: spec.dtype.to_string(),
            resolution: spec.resolution,
            batch: spec.batch,
            first_step_s: first,
            mean_step_ms: mean * 1e3,
            images_per_s: spec.batch as f64 / mean,
            last_loss: loss,
        }
    };
    match spec.mode {
        Mode::Infer => {
            let model = config.init::<B::InnerBackend>(device)?;
            let x = Tensor::<B::InnerBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let step = || {
                let _ = model.forward(x.clone());
            };
            let start = Instant::now();
            step();
            sync::<B::InnerBackend>(device)?;
            let first = start.elapsed().as_secs_f64();
            eprintln!(
                "{}: first inference step (compilation + autotune) {first:.1} s",
                spec.name
            );
            for _ in 0..spec.warmup {
                step();
            }
            sync::<B::InnerBackend>(device)?;
            let start = Instant::now();
            for _ in 0..spec.iters {
                step();
            }
            sync::<B::InnerBackend>(device)?;
            Ok(row(first, start.elapsed().as_secs_f64(), None))
        }
        Mode::Train => {
            let mut model = config.init::<B>(device)?;
            let mut optim = AdamWConfig::new().with_weight_decay(0.05).init();
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let y =
                Tensor::<B, 1, Int>::random([spec.batch], Distribution::Uniform(0.0, classes as f64), device);
            let loss_fn = CrossEntropyLossConfig::new().init(device);
            let mut last = None;
            let mut step = |model: crate::models::Model<B>| {
                let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                last = Some(loss);
                optim.step(1e-4, model, grads)
            };
            let start = Instant::now();
            model = step(model);
            sync::<B>(device)?;
            let first = start.elapsed().as_secs_f64();
            eprintln!(
                "{}: first training step (compilation + autotune) {first:.1} s",
                spec.name
            );
            for _ in 0..spec.warmup {
                model = step(model);
            }
            sync::<B>(device)?;
            let start = Instant::now();
            for _ in 0..spec.iters {
                model = step(model);
            }
            sync::<B>(device)?;
            let total = start.elapsed().as_secs_f64();
            let loss = last.map(|l| l.into_scalar().elem::<f32>());
            Ok(row(first, total, loss))
        }
    }
}

/// A fixed-width table of bench rows.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:<5} {:>5} {:>6} {:>10} {:>10} {:>12}\n",
        "model", "mode", "dtype", "res", "batch", "first s", "step ms", "images/s"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:<6} {:<5} {:>5} {:>6} {:>10.2} {:>10.2} {:>12.0}\n",
            r.model,
            format!("{:?}", r.mode).to_lowercase(),
            r.dtype,
            r.resolution,
            r.batch,
            r.first_step_s,
            r.mean_step_ms,
            r.images_per_s
        ));
    }
    out
}
