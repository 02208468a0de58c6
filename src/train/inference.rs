//! `vicinity eval` (top-1/top-5, per-class accuracy, confusion matrix) and `vicinity predict`
//! (top-k classes of image files), for native and official checkpoints.
//!
//! A native checkpoint written by the trainer sits beside its `state.json`, which supplies the
//! class names, the input resolution and the normalisation it was trained with; without one
//! (official `.pth` files, converted weights) the model's own resolution and ImageNet
//! normalisation are used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::Serialize;

use super::checkpoint::{RunState, STATE_FILE};
use super::config::normalize_by_name;
use super::evaluate::evaluate;
use super::metrics::{EvalAccumulator, EvalSummary};
use crate::data::rng::{Rng, Stream};
use crate::data::{
    AugmentConfig, CIFAR10_CLASSES, CIFAR100_CLASSES, Loader, LoaderConfig, Normalize, open_split,
};
use crate::models::{Model, ModelConfig};

/// What the trainer recorded beside a checkpoint, if anything.
pub fn run_state_beside(weights: &Path) -> Option<RunState> {
    let dir = weights.parent()?;
    let path = dir.join(STATE_FILE);
    path.is_file().then(|| RunState::read(dir).ok()).flatten()
}

/// Where the class names came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassSource {
    /// `--classes` (a file or a known set).
    Given,
    /// The run state saved with the checkpoint.
    Checkpoint,
    /// Assumed from the class count (10: CIFAR-10, 100: CIFAR-100).
    Assumed(String),
    /// Unknown: indices only.
    Indices,
}

/// The class names for a model with `k` outputs: `--classes` (a file with one name per line, or
/// `cifar10` / `cifar100` / `indices`), else the checkpoint's run state, else CIFAR names for 10 or
/// 100 classes, else indices.
pub fn class_names(
    k: usize,
    given: Option<&str>,
    state: Option<&RunState>,
) -> Result<(Vec<String>, ClassSource)> {
    let known = |set: &[&str]| set.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let indices = || (0..k).map(|i| format!("class {i}")).collect::<Vec<_>>();
    let names = match given {
        Some("cifar10") => (known(&CIFAR10_CLASSES), ClassSource::Given),
        Some("cifar100") => (known(&CIFAR100_CLASSES), ClassSource::Given),
        Some("indices") => (indices(), ClassSource::Given),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read class names from {path}"))?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            (names, ClassSource::Given)
        }
        None => match state {
            Some(s) => (s.classes.clone(), ClassSource::Checkpoint),
            None if k == 10 => (known(&CIFAR10_CLASSES), ClassSource::Assumed("CIFAR-10".into())),
            None if k == 100 => (known(&CIFAR100_CLASSES), ClassSource::Assumed("CIFAR-100".into())),
            None => (indices(), ClassSource::Indices),
        },
    };
    if names.0.len() != k {
        bail!("{} class names for a model with {k} outputs", names.0.len());
    }
    Ok(names)
}

/// Settings of `vicinity eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub checkpoint: CheckpointInput,
    pub data: PathBuf,
    pub split: String,
    pub batch: usize,
    /// Folder for `summary.json`, `per_class.csv`, `confusion.csv`.
    pub out: Option<PathBuf>,
    pub workers: usize,
    /// Average the logits of each image and its mirror image.
    pub tta_flip: bool,
    /// Leave undecodable images out (counted in a warning) instead of stopping.
    pub skip_bad: bool,
}

/// The result of `vicinity eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub weights: PathBuf,
    pub data: PathBuf,
    pub split: String,
    pub resolution: usize,
    pub tta_flip: bool,
    #[serde(flatten)]
    pub summary: EvalSummary,
    pub classes: Vec<String>,
    pub per_class: Vec<Option<f64>>,
    #[serde(skip)]
    pub accumulator: EvalAccumulator,
    pub out: Option<PathBuf>,
}

fn input_settings(
    config: &ModelConfig,
    state: Option<&RunState>,
    resolution: Option<usize>,
    normalize: Option<&str>,
) -> Result<(usize, Normalize)> {
    let res = resolution
        .or(state.map(|s| s.resolution))
        .unwrap_or_else(|| config.default_resolution());
    config.check_input(res, res)?;
    let norm = match normalize {
        Some(n) => normalize_by_name(n)?,
        None => state.map_or(Normalize::IMAGENET, |s| s.normalize),
    };
    Ok((res, norm))
}

/// The checkpoint `eval` and `predict` run, and how to feed it.
#[derive(Debug, Clone)]
pub struct CheckpointInput {
    /// Official `.pth` or native `.safetensors` weights.
    pub weights: PathBuf,
    /// Registered model name or config file (optional with native weights).
    pub model: Option<String>,
    /// Input resolution (default: the run's, else the model's).
    pub resolution: Option<usize>,
    /// Input normalisation (default: the run's, else ImageNet).
    pub normalize: Option<String>,
}

/// A checkpoint ready for `eval`/`predict`: its model, the run state saved beside it (if any), and
/// the input resolution and normalisation to use.
pub(crate) struct Loaded<B: Backend> {
    pub state: Option<RunState>,
    pub config: ModelConfig,
    pub model: Model<B>,
    pub res: usize,
    pub norm: Normalize,
}

impl CheckpointInput {
    pub(crate) fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>> {
        let state = run_state_beside(&self.weights);
        let (config, model) = crate::cli::build_model(self.model.as_deref(), Some(&self.weights), device)?;
        let (res, norm) = input_settings(
            &config,
            state.as_ref(),
            self.resolution,
            self.normalize.as_deref(),
        )?;
        Ok(Loaded {
            state,
            config,
            model,
            res,
            norm,
        })
    }
}

/// `vicinity eval`: metrics of a checkpoint on a dataset split.
pub fn eval_checkpoint<B: Backend>(opts: &EvalOptions, device: &B::Device) -> Result<EvalReport> {
    let loaded = opts.checkpoint.load::<B>(device)?;
    let (state, config, model) = (loaded.state, loaded.config, loaded.model);
    let (res, norm) = (loaded.res, loaded.norm);
    let dataset = open_split(&opts.data, &opts.split)?;
    if dataset.num_classes() != config.num_classes() {
        bail!(
            "the model has {} outputs but {} has {} classes",
            config.num_classes(),
            dataset.name,
            dataset.num_classes()
        );
    }
    if let Some(s) = &state
        && s.classes != dataset.classes
    {
        bail!(
            "the dataset's classes are not the ones the checkpoint was trained on ({:?}...)",
            &s.classes[..s.classes.len().min(5)]
        );
    }
    let classes = dataset.classes.clone();
    let mut cfg = LoaderConfig::eval(opts.batch, [res, res], norm);
    cfg.workers = opts.workers;
    cfg.skip_bad = opts.skip_bad;
    let loader = Loader::new(Arc::new(dataset), cfg)?;
    let acc = evaluate(&model, &loader, device, opts.tta_flip)?;
    if loader.skipped() > 0 {
        eprintln!(
            "warning: {} images could not be decoded and were left out (--skip-bad)",
            loader.skipped()
        );
    }
    let report = EvalReport {
        weights: opts.checkpoint.weights.clone(),
        data: opts.data.clone(),
        split: opts.split.clone(),
        resolution: res,
        tta_flip: opts.tta_flip,
        summary: acc.summary(),
        per_class: acc.per_class(),
        classes,
        accumulator: acc,
        out: opts.out.clone(),
    };
    if let Some(out) = &opts.out {
        write_eval_files(&report, out)?;
    }
    Ok(report)
}

/// `summary.json`, `per_class.csv` and `confusion.csv` in `out`.
pub fn write_eval_files(report: &EvalReport, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let acc = &report.accumulator;
    crate::weights::write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(report)?)?;
    crate::weights::write_atomic(
        &out.join("per_class.csv"),
        acc.per_class_csv(&report.classes).as_bytes(),
    )?;
    crate::weights::write_atomic(
        &out.join("confusion.csv"),
        acc.confusion_csv(&report.classes).as_bytes(),
    )
}

impl EvalReport {
    /// Human-readable summary (per-class lines for up to 20 classes).
    pub fn text(&self) -> String {
        let s = &self.summary;
        let mut out = format!(
            "{} on {} [{}] at {}x{}{}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} ({} images)\n",
            self.weights.display(),
            self.data.display(),
            self.split,
            self.resolution,
            self.resolution,
            if self.tta_flip { " with mirror TTA" } else { "" },
            s.top1 * 100.0,
            s.top5 * 100.0,
            s.loss,
            s.samples
        );
        if self.classes.len() <= 20 {
            for (c, a) in self.classes.iter().zip(&self.per_class) {
                out.push_str(&format!(
                    "  {c:<20} {}\n",
                    a.map_or("-".into(), |a| format!("{:.2}%", a * 100.0))
                ));
            }
        }
        if let Some(o) = &self.out {
            out.push_str(&format!(
                "wrote {}/{{summary.json,per_class.csv,confusion.csv}}\n",
                o.display()
            ));
        }
        out
    }
}

/// Settings of `vicinity predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub images: Vec<PathBuf>,
    pub checkpoint: CheckpointInput,
    pub top: usize,
    pub classes: Option<String>,
}

/// The top classes of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    /// Best first.
    pub top: Vec<TopClass>,
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopClass {
    pub index: usize,
    pub name: String,
    pub probability: f32,
}

/// Softmax probabilities of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / sum) as f32).collect()
}

/// The `k` best (index, probability) pairs of a probability row, best first (ties: lower index).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, probs[i])).collect()
}

/// Images as the model takes them at evaluation (`res × res`, normalised by `norm`): `B×3×res×res`.
pub fn input_batch<B: Backend>(
    images: Vec<image::RgbImage>,
    norm: Normalize,
    res: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let aug = AugmentConfig::eval(norm);
    let per = 3 * res * res;
    let n = images.len();
    let mut values = vec![0f32; n * per];
    for (img, out) in images.into_iter().zip(values.chunks_mut(per)) {
        let mut rng = Rng::for_item(0, 0, Stream::Sample, 0);
        crate::data::augment::transform_sample(img, &aug, [res, res], &mut rng, out);
    }
    Tensor::from_data(TensorData::new(values, [n, 3, res, res]), device)
}

/// `vicinity predict`: the top classes of each image, and where the names came from.
pub fn predict<B: Backend>(
    opts: &PredictOptions,
    device: &B::Device,
) -> Result<(Vec<Prediction>, ClassSource)> {
    if opts.images.is_empty() {
        bail!("no images given");
    }
    let Loaded {
        state,
        config,
        model,
        res,
        norm,
    } = opts.checkpoint.load::<B>(device)?;
    let k = config.num_classes();
    let (names, source) = class_names(k, opts.classes.as_deref(), state.as_ref())?;
    let images = opts
        .images
        .iter()
        .map(|p| crate::data::read_image(p))
        .collect::<Result<Vec<_>>>()?;
    let x = input_batch::<B>(images, norm, res, device);
    let (_, logits) = crate::io::to_host(model.forward(x))?;
    let preds = opts
        .images
        .iter()
        .zip(logits.chunks_exact(k))
        .map(|(path, row)| Prediction {
            image: path.clone(),
            top: top_k(&softmax(row), opts.top.min(k))
                .into_iter()
                .map(|(index, probability)| TopClass {
                    index,
                    name: names[index].clone(),
                    probability,
                })
                .collect(),
        })
        .collect();
    Ok((preds, source))
}

/// The text `vicinity predict` prints.
pub fn format_predictions(preds: &[Prediction], source: &ClassSource) -> String {
    let mut out = String::new();
    match source {
        ClassSource::Assumed(set) => out.push_str(&format!(
            "note: the checkpoint carries no class names; assuming the {set} order (pass --classes to override)\n"
        )),
        ClassSource::Indices => out.push_str(
            "note: class names unknown for this checkpoint (e.g. ImageNet-1k): showing indices; pass --classes FILE (one name per line)\n",
        ),
        _ => {}
    }
    for p in preds {
        out.push_str(&format!("{}\n", p.image.display()));
        for t in &p.top {
            out.push_str(&format!(
                "  {:>6.2}%  {} ({})\n",
                t.probability * 100.0,
                t.name,
                t.index
            ));
        }
    }
    out
}
