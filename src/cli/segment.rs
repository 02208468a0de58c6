//! `vicinity seg-train`, `seg-eval`, `segment` and `seg-data`: semantic segmentation's flags
//! (docs/SEGMENTATION.md).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;

use crate::backend::Dtype;
use crate::segment::SegmenterConfig;
use crate::segment::compose::{self, ComposeOptions};
use crate::segment::data::open_segmentation;
use crate::segment::infer::{EvalMode, EvalSettings, colour_mask, evaluate, overlay, predict_labels};
use crate::segment::model::load_segmenter;
use crate::segment::train::{self, SegState, SegTrainConfig};
use crate::train::budget::parse_duration;
use crate::train::progress::Progress;

/// `LONGxSHORT` (e.g. `2048x512`).
fn parse_scale(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("'{s}' is not LONGxSHORT (e.g. 2048x512)"))?;
    let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
    ensure!(
        a >= b && b > 0,
        "'{s}': the long side comes first and both are positive"
    );
    Ok((a, b))
}

/// `LOW,HIGH` (e.g. `0.5,2.0`).
fn parse_ratio(s: &str) -> Result<(f64, f64)> {
    let (a, b) = s
        .split_once(',')
        .with_context(|| format!("'{s}' is not LOW,HIGH (e.g. 0.5,2.0)"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

/// How test images are presented to the model (shared by seg-train, seg-eval and segment).
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Whole image resized to fit --eval-scale, or sliding --eval-crop windows over it.
    #[arg(long, value_enum, default_value = "whole")]
    pub eval_mode: EvalMode,
    /// The size test images are fitted into, LONGxSHORT (ADE20K: 2048x512).
    #[arg(long, value_name = "LONGxSHORT", value_parser = parse_scale, default_value = "2048x512")]
    pub eval_scale: (usize, usize),
    /// Sliding windows: side (a multiple of 32) and step.
    #[arg(long, default_value_t = 512)]
    pub eval_crop: usize,
    #[arg(long, default_value_t = 341)]
    pub eval_stride: usize,
}

impl EvalArgs {
    fn settings(&self) -> EvalSettings {
        EvalSettings {
            mode: self.eval_mode,
            scale: self.eval_scale,
            crop: self.eval_crop,
            stride: self.eval_stride,
            ..EvalSettings::default()
        }
    }
}

/// `vicinity seg-train`.
#[derive(Args, Debug, Clone)]
pub struct SegTrainArgs {
    /// Continue the run in this directory from its `last` checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "model")]
    pub resume: Option<PathBuf>,
    /// `semfpn_<backbone>` or `upernet_<backbone>` (any registered VVT), or a .json/.toml
    /// segmenter config.
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset root: ADE20K's layout (images/, annotations/) or image/mask pairs with classes.txt.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory (default runs/seg-MODEL-TIME).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[arg(long, value_name = "SPLIT")]
    pub train_split: Option<String>,
    #[arg(long, value_name = "SPLIT")]
    pub val_split: Option<String>,
    /// Classification weights for the backbone: an official VVT .pth or vicinity's .safetensors.
    #[arg(long, value_name = "FILE")]
    pub backbone_weights: Option<PathBuf>,
    /// Training steps (80000).
    #[arg(long)]
    pub iters: Option<u64>,
    /// Images per step (16).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (1e-4) and the poly schedule's floor (0) and power (0.9).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long)]
    pub power: Option<f64>,
    /// Linear warm-up steps (0).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// AdamW weight decay (1e-4).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip gradients to this global norm.
    #[arg(long)]
    pub clip: Option<f64>,
    /// Training crop side (512).
    #[arg(long)]
    pub crop: Option<usize>,
    /// Training images are fitted into LONGxSHORT times a ratio from --ratio (2048x512).
    #[arg(long, value_name = "LONGxSHORT", value_parser = parse_scale)]
    pub scale: Option<(usize, usize)>,
    #[arg(long, value_name = "LOW,HIGH", value_parser = parse_ratio)]
    pub ratio: Option<(f64, f64)>,
    /// Largest share of a crop one class may take (0.75).
    #[arg(long)]
    pub cat_max_ratio: Option<f64>,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Evaluate every this many steps (8000) and at the end.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Evaluate on the first N validation images only.
    #[arg(long, value_name = "N")]
    pub eval_limit: Option<usize>,
    /// Checkpoint every this many steps (2000).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// bf16 (default on GPUs) or f32 (default on CPUs).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Size the run to end within this time (e.g. 10m, 2h): measures a few steps, then sets the
    /// step count, keeping 15 % for the final evaluation.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub budget: Option<f64>,
    /// Pause after this step, writing `last/` (as Ctrl-C does); --resume continues.
    #[arg(long, value_name = "STEP")]
    pub stop_at_step: Option<u64>,
    #[arg(long, short)]
    pub quiet: bool,
}

impl SegTrainArgs {
    /// The run's configuration: PVT's ADE20K setting, then every flag given.
    pub fn config<B: Backend>(&self) -> Result<SegTrainConfig> {
        let name = self.model.clone().unwrap_or_else(|| "semfpn_vvt_tiny".into());
        let data = self
            .data
            .clone()
            .context("--data is required: an ADE20K folder or a folder of image/mask pairs")?;
        let classes = open_segmentation(
            &data,
            self.train_split
                .as_deref()
                .unwrap_or_else(|| default_split(&data, true)),
        )?
        .classes
        .len();
        let model = SegmenterConfig::resolve(&name, classes)?;
        let out = self.out.clone().unwrap_or_else(|| {
            let stem = Path::new(&name)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string();
            crate::train::setup::default_run_dir(&format!("seg-{stem}"))
        });
        let mut c = SegTrainConfig::new(&name, model, data.clone(), out);
        c.train_split = self
            .train_split
            .clone()
            .unwrap_or_else(|| default_split(&data, true).into());
        c.val_split = self
            .val_split
            .clone()
            .unwrap_or_else(|| default_split(&data, false).into());
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {$(if let Some(v) = self.$flag.clone() { c.$field = v; })*};
        }
        set!(iters <- iters, batch <- batch, lr <- lr, min_lr <- min_lr, power <- power, warmup <- warmup,
             eval_every <- eval_every, save_every <- save_every);
        if let Some(v) = self.weight_decay {
            c.optimizer.weight_decay = v;
        }
        if let Some(v) = self.crop {
            c.pipeline.crop = v;
        }
        if let Some(v) = self.scale {
            c.pipeline.scale = v;
        }
        if let Some(v) = self.ratio {
            c.pipeline.ratio = v;
        }
        if let Some(v) = self.cat_max_ratio {
            c.pipeline.cat_max_ratio = v;
        }
        c.clip = self.clip;
        c.eval = self.eval.settings();
        c.eval_limit = self.eval_limit;
        c.dtype = self.dtype.unwrap_or(if crate::backend::is_cuda::<B>() {
            Dtype::Bf16
        } else {
            Dtype::F32
        });
        c.seed = self.seed;
        c.budget_s = self.budget;
        c.backbone_weights = self.backbone_weights.clone();
        c.quiet = self.quiet;
        c.iters = c.iters.max(1);
        c.eval_every = c.eval_every.min(c.iters);
        c.validate()?;
        Ok(c)
    }
}

/// ADE20K names its splits training/validation, the pairs layout train/val.
fn default_split(root: &Path, train: bool) -> &'static str {
    match (root.join("images").is_dir(), train) {
        (true, true) => "training",
        (true, false) => "validation",
        (false, true) => "train",
        (false, false) => "val",
    }
}

pub fn seg_train_command<B: AutodiffBackend>(a: &SegTrainArgs, device: &B::Device) -> Result<()> {
    let outcome = match &a.resume {
        Some(run) => {
            let overrides = [
                (a.iters.is_some(), "--iters"),
                (a.batch.is_some(), "--batch"),
                (a.lr.is_some(), "--lr"),
                (a.backbone_weights.is_some(), "--backbone-weights"),
                (a.crop.is_some(), "--crop"),
                (a.budget.is_some(), "--budget"),
            ];
            if let Some((_, flag)) = overrides.iter().find(|(set, _)| *set) {
                bail!("{flag} cannot change a run being resumed: a resumed run continues as it started");
            }
            train::resume::<B>(run, a.data.clone(), a.quiet, a.stop_at_step, device)?
        }
        None => train::train::<B>(a.config::<B>()?, a.stop_at_step, device)?,
    };
    crate::train::signals::exit_if_paused_by_signal("segmentation training");
    let s = &outcome.state;
    if !outcome.finished {
        println!(
            "paused at step {}/{}; `vicinity seg-train --resume {}` continues",
            s.iter,
            s.total,
            s.config.out.display()
        );
        return Ok(());
    }
    if let Some(e) = &outcome.last_eval {
        println!(
            "{}: step {}/{}, mIoU {:.2} %, mAcc {:.2} %, aAcc {:.2} % — run in {}",
            s.config.model_name,
            s.iter,
            s.total,
            100.0 * e.miou,
            100.0 * e.macc,
            100.0 * e.aacc,
            s.config.out.display()
        );
    }
    Ok(())
}

/// `vicinity seg-eval`.
#[derive(Args, Debug, Clone)]
pub struct SegEvalArgs {
    /// A checkpoint of seg-train (`RUN/last/model.safetensors`, or RUN itself), or an mmseg-style
    /// .pth with --model.
    #[arg(long)]
    pub weights: PathBuf,
    /// The model a .pth holds (a registered name or config file).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub data: PathBuf,
    /// Split to evaluate (validation for ADE20K, val for pairs).
    #[arg(long)]
    pub split: Option<String>,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// The first N images only.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Folder for metrics.json and per_class_iou.csv.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// `RUN` → `RUN/last/model.safetensors`; a file stays as it is.
fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("last").join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// Class names from the run a checkpoint belongs to (`last/state.json` beside it), if any.
fn run_classes(weights: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(weights.parent()?.join("state.json")).ok()?;
    Some(serde_json::from_str::<SegState>(&text).ok()?.classes)
}

fn load<B: Backend>(
    weights: &Path,
    model: Option<&str>,
    classes: usize,
    device: &B::Device,
) -> Result<(crate::segment::Segmenter<B>, SegmenterConfig)> {
    let config = model.map(|m| SegmenterConfig::resolve(m, classes)).transpose()?;
    let (model, config) = load_segmenter::<B>(weights, config.as_ref(), device)?;
    Ok((model.deterministic(), config))
}

pub fn seg_eval_command<B: Backend>(a: &SegEvalArgs, device: &B::Device) -> Result<()> {
    let split = a
        .split
        .clone()
        .unwrap_or_else(|| default_split(&a.data, false).into());
    let data = open_segmentation(&a.data, &split)?;
    let weights = weights_file(&a.weights);
    let (model, config) = load::<B>(&weights, a.model.as_deref(), data.classes.len(), device)?;
    ensure!(
        config.num_classes == data.classes.len(),
        "{} predicts {} classes, {} has {}: evaluate a model on the data it was trained for",
        weights.display(),
        config.num_classes,
        a.data.display(),
        data.classes.len()
    );
    let settings = a.eval.settings();
    settings.validate()?;
    let mut progress = Progress::new(false);
    let t0 = std::time::Instant::now();
    let acc = evaluate(&model, &data, &settings, a.limit, device, |done, n| {
        progress.update(&format!("evaluating: {done}/{n} images"));
    })?;
    let s = acc.summary();
    progress.line(&format!("evaluated in {:.1} s", t0.elapsed().as_secs_f64()));
    println!(
        "{}: mIoU {:.2} %, mAcc {:.2} %, aAcc {:.2} % ({} images of {split}, {:?})",
        weights.display(),
        100.0 * s.miou,
        100.0 * s.macc,
        100.0 * s.aacc,
        a.limit.map_or(data.samples.len(), |l| l.min(data.samples.len())),
        settings.mode
    );
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        crate::weights::write_atomic(&out.join("metrics.json"), &serde_json::to_vec_pretty(&s)?)?;
        crate::weights::write_atomic(
            &out.join("per_class_iou.csv"),
            acc.per_class_csv(&data.classes).as_bytes(),
        )?;
        println!("wrote {}/metrics.json and per_class_iou.csv", out.display());
    }
    Ok(())
}

/// `vicinity segment`.
#[derive(Args, Debug, Clone)]
pub struct SegmentArgs {
    /// Images to segment.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// A checkpoint of seg-train (`RUN/last/model.safetensors`, or RUN itself), or an mmseg-style
    /// .pth with --model and --classes.
    #[arg(long)]
    pub weights: PathBuf,
    #[arg(long)]
    pub model: Option<String>,
    /// Class count of a .pth (native checkpoints carry theirs).
    #[arg(long)]
    pub classes: Option<usize>,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Folder for NAME_mask.png (colours), NAME_labels.png (class indices) and NAME_overlay.png.
    #[arg(long, short, default_value = "segmentation")]
    pub out: PathBuf,
}

pub fn segment_command<B: Backend>(a: &SegmentArgs, device: &B::Device) -> Result<()> {
    let weights = weights_file(&a.weights);
    if a.model.is_some() && a.classes.is_none() {
        bail!("--model (a .pth) needs --classes: the number of classes its head predicts");
    }
    let (model, _) = load::<B>(&weights, a.model.as_deref(), a.classes.unwrap_or(0), device)?;
    let names = run_classes(&weights);
    let settings = a.eval.settings();
    settings.validate()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut stems = std::collections::HashSet::new();
    for path in &a.images {
        let img = crate::data::read_image(path)?;
        let labels = predict_labels(&model, &img, &settings, device)?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_string();
        let stem = (1..)
            .map(|i| {
                if i == 1 {
                    stem.clone()
                } else {
                    format!("{stem}-{i}")
                }
            })
            .find(|s| stems.insert(s.clone()))
            .expect("a free name");
        let (w, h) = img.dimensions();
        let mask = colour_mask(&labels, w, h);
        let write = |suffix: &str, img: &image::RgbImage| -> Result<()> {
            let p = a.out.join(format!("{stem}_{suffix}.png"));
            img.save(&p)
                .with_context(|| format!("cannot write {}", p.display()))
        };
        write("mask", &mask)?;
        write("overlay", &overlay(&img, &mask))?;
        let p = a.out.join(format!("{stem}_labels.png"));
        image::GrayImage::from_raw(w, h, labels.clone())
            .expect("one label per pixel")
            .save(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        // The classes covering most of the image.
        let mut counts = std::collections::BTreeMap::<u8, usize>::new();
        labels.iter().for_each(|&l| *counts.entry(l).or_default() += 1);
        let mut top: Vec<(u8, usize)> = counts.into_iter().collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let shares: Vec<String> = top
            .iter()
            .take(5)
            .map(|&(c, n)| {
                let name = names
                    .as_ref()
                    .and_then(|v| v.get(c as usize))
                    .cloned()
                    .unwrap_or_else(|| format!("class {c}"));
                format!("{name} {:.1} %", 100.0 * n as f64 / labels.len() as f64)
            })
            .collect();
        println!("{}: {}", path.display(), shares.join(", "));
    }
    println!("wrote masks and overlays to {}", a.out.display());
    Ok(())
}

/// `vicinity seg-data`.
#[derive(Args, Debug, Clone)]
pub struct SegDataArgs {
    /// Folder of Fashion-MNIST's IDX files (.gz or not).
    #[arg(long, value_name = "DIR", default_value = compose::DEBIAN_DIR)]
    pub fashion_mnist: PathBuf,
    /// The new dataset's folder (must not exist).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Canvases in the training and validation splits.
    #[arg(long, default_value_t = 4000)]
    pub train: usize,
    #[arg(long, default_value_t = 500)]
    pub val: usize,
    /// Canvas side in pixels (a multiple of 32).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn seg_data_command(a: &SegDataArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    compose::compose(&ComposeOptions {
        source: a.fashion_mnist.clone(),
        out: a.out.clone(),
        train: a.train,
        val: a.val,
        size: a.size,
        seed: a.seed,
    })?;
    println!(
        "composed {} training and {} validation canvases of {}² ({} classes) in {} in {:.1} s",
        a.train,
        a.val,
        a.size,
        compose::CLASSES.len(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
