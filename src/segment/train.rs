//! Training a segmentation model: mmseg's iteration-based schedule (PVT's ADE20K setting: AdamW
//! at lr 1e-4 and weight decay 1e-4, poly decay with power 0.9 to 0, batch 16, 80k iterations).
//!
//! One step: a batch from the training pipeline (prepared on a background thread, a pure
//! function of the seed and the step), forward, pixel cross-entropy (+ UPerNet's auxiliary
//! loss), backward, AdamW. Losses stay on the device and are read every `log_every` steps, when a
//! NaN is caught with its step. `RUN/last/` is rewritten atomically every `save_every` steps and
//! at the end; a resumed run continues bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, TensorData};
use serde::{Deserialize, Serialize};

use super::data::{SegDataset, open_segmentation};
use super::infer::{EvalSettings, evaluate};
use super::metrics::SegSummary;
use super::model::{Segmenter, SegmenterConfig, backbone_matching, load_backbone, seg_loss, segmenter_bytes};
use super::pipeline::{SegBatch, TrainPipeline};
use crate::backend::Dtype;
use crate::train::budget::format_duration;
use crate::train::checkpoint::{self, read_all_f32};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::params::cast_params;
use crate::train::progress::Progress;
use crate::train::signals;
use crate::train::trainer::mix_seed;
use crate::weights;

const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
const STATE_FILE: &str = "state.json";

/// Everything a segmentation run is made of (kept in `RUN/config.json` and every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegTrainConfig {
    pub model_name: String,
    pub model: SegmenterConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    pub train_split: String,
    pub val_split: String,
    pub iters: u64,
    pub batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    /// Poly decay exponent (0.9).
    pub power: f64,
    /// Linear warm-up steps (0 in PVT's setting; Swin's UPerNet uses 1500).
    pub warmup: u64,
    pub optimizer: AdamWConfig,
    pub clip: Option<f64>,
    pub pipeline: TrainPipeline,
    pub eval: EvalSettings,
    /// Evaluate (and save) every this many steps, and at the end.
    pub eval_every: u64,
    /// Evaluate on the first this many validation images only.
    pub eval_limit: Option<usize>,
    pub save_every: u64,
    pub log_every: u64,
    pub dtype: Dtype,
    pub seed: u64,
    /// Size the run to end within this many seconds (see [`SegSession::size_to_budget`]).
    pub budget_s: Option<f64>,
    /// Classification weights (official `.pth` or native) the backbone starts from.
    pub backbone_weights: Option<PathBuf>,
    pub quiet: bool,
}

impl SegTrainConfig {
    /// PVT's ADE20K setting for `model` on `data`.
    pub fn new(model_name: &str, model: SegmenterConfig, data: PathBuf, out: PathBuf) -> Self {
        Self {
            model_name: model_name.to_string(),
            model,
            data,
            out,
            train_split: "training".into(),
            val_split: "validation".into(),
            iters: 80_000,
            batch: 16,
            lr: 1e-4,
            min_lr: 0.0,
            power: 0.9,
            warmup: 0,
            optimizer: AdamWConfig {
                weight_decay: 1e-4,
                ..AdamWConfig::default()
            },
            clip: None,
            pipeline: TrainPipeline::default(),
            eval: EvalSettings::default(),
            eval_every: 8_000,
            eval_limit: None,
            save_every: 2_000,
            log_every: 20,
            dtype: Dtype::F32,
            seed: 0,
            budget_s: None,
            backbone_weights: None,
            quiet: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.pipeline.validate()?;
        self.model
            .check_input(self.pipeline.crop, self.pipeline.crop)
            .context("--crop")?;
        self.eval.validate()?;
        ensure!(self.eval_limit != Some(0), "--eval-limit must be at least 1");
        ensure!(self.iters > 0, "--iters must be at least 1");
        ensure!(
            (1..=4096).contains(&self.batch),
            "--batch {} is not in 1..=4096",
            self.batch
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "the learning rates must satisfy 0 ≤ min ≤ lr and lr > 0 (lr {}, min {})",
            self.lr,
            self.min_lr
        );
        ensure!(
            self.power.is_finite() && self.power > 0.0,
            "--power {} must be positive",
            self.power
        );
        ensure!(
            self.eval_every > 0 && self.save_every > 0 && self.log_every > 0,
            "--eval-every, --save-every and the log interval must be at least 1"
        );
        if let Some(b) = self.budget_s {
            ensure!(b.is_finite() && b > 0.0, "--budget must be positive");
        }
        Ok(())
    }

    /// The learning rate of step `step` of `total`: linear warm-up, then poly decay.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let progress = (step as f64 / total.max(1) as f64).min(1.0);
        (self.lr - self.min_lr) * (1.0 - progress).powf(self.power) + self.min_lr
    }
}

/// One evaluation of the run, with the training loss since the previous one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegRecord {
    pub iter: u64,
    pub train_loss: f64,
    pub miou: f64,
    pub macc: f64,
    pub aacc: f64,
    pub elapsed_s: f64,
}

/// What a checkpoint holds besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegState {
    pub config: SegTrainConfig,
    pub classes: Vec<String>,
    pub iter: u64,
    /// The schedule's length (the configured `iters`, or what `--budget` sized it to).
    pub total: u64,
    pub history: Vec<SegRecord>,
    pub loss_sum: f64,
    pub loss_count: u64,
    pub elapsed_s: f64,
    /// Seconds per step, once measured.
    pub step_s: Option<f64>,
    pub finished: bool,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SegOutcome {
    pub state: SegState,
    pub last_eval: Option<SegSummary>,
    /// (step, loss) of every step whose loss was read back.
    pub losses: Vec<(u64, f32)>,
    /// Whether the schedule is complete (not paused).
    pub finished: bool,
}

/// Opens a split, refusing a dataset whose classes differ from `classes` when given.
fn open_split(cfg: &SegTrainConfig, split: &str) -> Result<SegDataset> {
    open_segmentation(&cfg.data, split)
        .with_context(|| format!("opening the '{split}' split of {}", cfg.data.display()))
}

/// Starts a new run in `cfg.out`; with `stop_at`, pauses after that step (as Ctrl-C does).
pub fn train<B: AutodiffBackend>(
    mut cfg: SegTrainConfig,
    stop_at: Option<u64>,
    device: &B::Device,
) -> Result<SegOutcome> {
    cfg.validate()?;
    let run = cfg.out.clone();
    let lock = checkpoint::lock_run(&run)?;
    if checkpoint::resolve(&run, "last").is_some() {
        bail!(
            "{} already holds a run; continue it with `vicinity seg-train --resume {}` or pick another --out",
            run.display(),
            run.display()
        );
    }
    checkpoint::check_writable(&run)?;
    cfg.data = std::path::absolute(&cfg.data)?;
    let train_ds = open_split(&cfg, &cfg.train_split)?;
    let val_ds = open_split(&cfg, &cfg.val_split)?;
    ensure!(
        train_ds.classes == val_ds.classes,
        "the training and validation splits list different classes"
    );
    ensure!(
        train_ds.classes.len() == cfg.model.num_classes,
        "the data has {} classes, the model {}",
        train_ds.classes.len(),
        cfg.model.num_classes
    );
    if let Some(path) = &cfg.backbone_weights {
        cfg.model = backbone_matching(&cfg.model, path)?;
    }
    cfg.dtype.apply::<B>(device)?;
    B::seed(device, cfg.seed);
    let mut model: Segmenter<B> = cfg.model.init(device)?;
    if let Some(path) = &cfg.backbone_weights {
        model = load_backbone(model, path)?;
        if cfg.dtype == Dtype::Bf16 {
            model = cast_params(model, FloatDType::BF16);
        }
    }
    weights::write_atomic(&run.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    let state = SegState {
        classes: train_ds.classes.clone(),
        iter: 0,
        total: cfg.iters,
        history: Vec::new(),
        loss_sum: 0.0,
        loss_count: 0,
        elapsed_s: 0.0,
        step_s: None,
        finished: false,
        config: cfg.clone(),
    };
    let optim = AdamW::new(cfg.optimizer, cfg.dtype == Dtype::Bf16);
    let mut session = SegSession::new(device, model, optim, train_ds, val_ds, state);
    session.stop_at = stop_at;
    session.progress.line(&format!(
        "training {} ({} parameters) on {} [{} images, {} for validation, {} classes], crop {}², batch {}, {} steps, lr {:.1e} poly {}, wd {}, {}",
        cfg.model_name,
        crate::cli::group_thousands(session.model.num_params() as u64),
        cfg.data.display(),
        session.train_ds.samples.len(),
        session.val_ds.samples.len(),
        session.state.classes.len(),
        cfg.pipeline.crop,
        cfg.batch,
        cfg.iters,
        cfg.lr,
        cfg.power,
        cfg.optimizer.weight_decay,
        cfg.dtype.name()
    ));
    let out = session.run();
    drop(lock);
    out
}

/// Continues the run in `run` from its `last/` checkpoint (`data`: where the dataset is now, if
/// it moved; `stop_at`: pause after that step).
pub fn resume<B: AutodiffBackend>(
    run: &Path,
    data: Option<PathBuf>,
    quiet: bool,
    stop_at: Option<u64>,
    device: &B::Device,
) -> Result<SegOutcome> {
    let lock = checkpoint::lock_run(run)?;
    let ck = checkpoint::resolve(run, "last")
        .with_context(|| format!("{} holds no checkpoint (no last/{STATE_FILE})", run.display()))?;
    let text = std::fs::read_to_string(ck.join(STATE_FILE))?;
    let mut state: SegState = serde_json::from_str(&text)
        .with_context(|| format!("{} is unreadable", ck.join(STATE_FILE).display()))?;
    if let Some(d) = data {
        state.config.data = std::path::absolute(d)?;
    }
    state.config.out = run.to_path_buf();
    state.config.quiet = quiet;
    if state.finished {
        eprintln!(
            "{} is finished ({} steps); nothing to resume",
            run.display(),
            state.iter
        );
        return Ok(SegOutcome {
            state,
            last_eval: None,
            losses: Vec::new(),
            finished: true,
        });
    }
    let cfg = state.config.clone();
    let train_ds = open_split(&cfg, &cfg.train_split)?;
    let val_ds = open_split(&cfg, &cfg.val_split)?;
    ensure!(
        train_ds.classes == state.classes,
        "the dataset's classes are not the ones this run was trained on"
    );
    cfg.dtype.apply::<B>(device)?;
    let bytes = std::fs::read(ck.join(MODEL_FILE))?;
    let model: Segmenter<B> = weights::load_module_bytes(
        cfg.model.init(device)?,
        bytes,
        &ck.join(MODEL_FILE).display().to_string(),
    )?;
    let model = if cfg.dtype == Dtype::Bf16 {
        cast_params(model, FloatDType::BF16)
    } else {
        model
    };
    let mut optim = AdamW::new(cfg.optimizer, cfg.dtype == Dtype::Bf16);
    optim
        .load_host(&model.valid(), read_all_f32(&ck.join(OPTIM_FILE))?, state.iter)
        .with_context(|| {
            format!(
                "cannot restore the optimizer from {}",
                ck.join(OPTIM_FILE).display()
            )
        })?;
    let mut session = SegSession::new(device, model, optim, train_ds, val_ds, state);
    session.stop_at = stop_at;
    session.progress.line(&format!(
        "resuming {} at step {}/{}",
        run.display(),
        session.state.iter,
        session.state.total
    ));
    let out = session.run();
    drop(lock);
    out
}

/// A step whose loss is still on the device.
struct Pending<B: Backend> {
    step: u64,
    loss: Tensor<B, 1>,
}

struct SegSession<B: AutodiffBackend> {
    device: B::Device,
    model: Segmenter<B>,
    optim: AdamW<B::InnerBackend>,
    train_ds: Arc<SegDataset>,
    val_ds: SegDataset,
    state: SegState,
    progress: Progress,
    pending: Vec<Pending<B::InnerBackend>>,
    losses: Vec<(u64, f32)>,
    started: Instant,
    elapsed_before: f64,
    window: Option<(Instant, u64)>,
    /// `--budget` has yet to size the run (at step 12; a run resumed later keeps its size).
    budget_pending: bool,
    last_eval: Option<SegSummary>,
    /// Pause after this step.
    stop_at: Option<u64>,
}

/// Batches of steps `start, start + 1, …` made ahead on another thread (two in flight).
fn prefetch(
    data: Arc<SegDataset>,
    pipeline: TrainPipeline,
    seed: u64,
    start: u64,
    batch: usize,
) -> Receiver<Result<SegBatch>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        for step in start.. {
            if tx.send(pipeline.batch(&data, seed, step, batch)).is_err() {
                break;
            }
        }
    });
    rx
}

impl<B: AutodiffBackend> SegSession<B> {
    fn new(
        device: &B::Device,
        model: Segmenter<B>,
        optim: AdamW<B::InnerBackend>,
        train_ds: SegDataset,
        val_ds: SegDataset,
        state: SegState,
    ) -> Self {
        Self {
            device: device.clone(),
            model,
            optim,
            train_ds: Arc::new(train_ds),
            val_ds,
            progress: Progress::new(state.config.quiet),
            pending: Vec::new(),
            losses: Vec::new(),
            started: Instant::now(),
            elapsed_before: state.elapsed_s,
            window: None,
            budget_pending: state.config.budget_s.is_some() && state.iter < 12,
            last_eval: None,
            stop_at: None,
            state,
        }
    }

    fn cfg(&self) -> &SegTrainConfig {
        &self.state.config
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    fn run(mut self) -> Result<SegOutcome> {
        signals::install_interrupt_handler();
        let cfg = self.cfg().clone();
        let batches = prefetch(
            self.train_ds.clone(),
            cfg.pipeline.clone(),
            cfg.seed,
            self.state.iter,
            cfg.batch,
        );
        while self.state.iter < self.state.total {
            if signals::interrupted() || self.stop_at == Some(self.state.iter) {
                self.flush()?;
                self.save()?;
                self.progress.line(&format!(
                    "paused at step {}; `vicinity seg-train --resume {}` continues",
                    self.state.iter,
                    cfg.out.display()
                ));
                return Ok(self.outcome());
            }
            let batch = match batches.recv().context("the data thread stopped") {
                Ok(Ok(batch)) => batch,
                // A bad file met mid-run: keep the steps done so far (`--resume` after fixing it).
                Ok(Err(e)) | Err(e) => {
                    self.flush()?;
                    self.save()?;
                    return Err(e.context(format!(
                        "preparing the batch of step {} (last/ holds the steps before it)",
                        self.state.iter + 1
                    )));
                }
            };
            self.step(batch)?;
            let i = self.state.iter;
            if i.is_multiple_of(cfg.log_every) || i == self.state.total {
                self.flush()?;
            }
            // --budget: time steps 3..=12 (the first ones compile kernels), then size the run.
            // (A run resumed in between measures at the first step with a timing window.)
            if self.budget_pending && (i == 2 || i >= 12) {
                self.flush()?;
                if i == 2 {
                    self.state.step_s = None;
                } else if self.state.step_s.is_some() {
                    self.size_to_budget();
                    self.budget_pending = false;
                }
            }
            if i.is_multiple_of(cfg.eval_every) || i == self.state.total {
                self.flush()?;
                if let Err(e) = self.evaluate() {
                    self.save()?;
                    return Err(e.context(format!(
                        "evaluating at step {i} (last/ holds this step's weights)"
                    )));
                }
                self.save()?;
            } else if i.is_multiple_of(cfg.save_every) {
                self.flush()?;
                self.save()?;
            }
        }
        self.state.finished = true;
        self.save()?;
        self.write_reports()?;
        Ok(self.outcome())
    }

    fn outcome(&self) -> SegOutcome {
        SegOutcome {
            state: self.state.clone(),
            last_eval: self.last_eval.clone(),
            losses: self.losses.clone(),
            finished: self.state.finished,
        }
    }

    fn step(&mut self, batch: SegBatch) -> Result<()> {
        let [n, h, w] = batch.size;
        let step_seed = mix_seed(self.cfg().seed, self.state.iter);
        B::seed(&self.device, step_seed);
        let x = Tensor::<B, 4>::from_data(TensorData::new(batch.images, [n, 3, h, w]), &self.device);
        let model = self.model.clone();
        let aux = self.cfg().model.head.aux_weight();
        let out = model.forward(x, aux > 0.0);
        let loss = seg_loss(out, &batch.labels, [n, h, w], aux)?;
        let value = loss.clone().inner();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = self.cfg().lr_at(self.state.iter, self.state.total);
        let clip = self.cfg().clip;
        let (model, _) = self.optim.step(model, grads, lr, clip, None)?;
        self.model = model;
        self.pending.push(Pending {
            step: self.state.iter,
            loss: value,
        });
        self.state.iter += 1;
        Ok(())
    }

    /// Reads pending losses (one sync), stops on a non-finite one, refreshes the progress line.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let all = Tensor::cat(pending.iter().map(|p| p.loss.clone()).collect(), 0);
        let (_, values) = crate::io::to_host(all)?;
        for (p, &v) in pending.iter().zip(&values) {
            if !v.is_finite() {
                let last = checkpoint::resolve(&self.state.config.out, "last")
                    .map_or("no checkpoint had been written yet".into(), |d| {
                        format!("the last checkpoint, {}, is untouched", d.display())
                    });
                bail!(
                    "training diverged: the loss is {v} at step {}; the run stopped without saving; {last}. \
                     Try a lower --lr, --clip or --dtype f32",
                    p.step + 1
                );
            }
            self.state.loss_sum += f64::from(v);
            self.state.loss_count += 1;
            self.losses.push((p.step, v));
        }
        let now = Instant::now();
        if let Some((t0, s0)) = self.window
            && self.state.iter > s0
        {
            let per = now.duration_since(t0).as_secs_f64() / (self.state.iter - s0) as f64;
            self.state.step_s = Some(self.state.step_s.map_or(per, |old| 0.7 * old + 0.3 * per));
        }
        self.window = Some((now, self.state.iter));
        let s = &self.state;
        let speed = s.step_s.map_or("- img/s".into(), |t| {
            format!("{:.1} img/s", self.cfg().batch as f64 / t)
        });
        let eta = s
            .step_s
            .map_or("?".into(), |t| format_duration((s.total - s.iter) as f64 * t));
        let text = format!(
            "step {}/{}  loss {:.4}  lr {:.3e}  {speed}  ETA {eta}",
            s.iter,
            s.total,
            values.last().copied().unwrap_or(f32::NAN),
            self.cfg().lr_at(s.iter.saturating_sub(1), s.total)
        );
        self.progress.update(&text);
        Ok(())
    }

    /// With `--budget`: the number of steps that end the run within it, from the measured step
    /// time, keeping 15 % of the budget for evaluation and the last checkpoint.
    fn size_to_budget(&mut self) {
        let (Some(budget), Some(step_s)) = (self.cfg().budget_s, self.state.step_s) else {
            return;
        };
        let left = budget * 0.85 - self.elapsed();
        let more = (left.max(0.0) / step_s) as u64;
        let total = (self.state.iter + more).clamp(self.state.iter.max(1), self.cfg().iters);
        self.state.total = total;
        self.state.config.eval_every = self.state.config.eval_every.min(total);
        self.progress.line(&format!(
            "budget {}: {:.3} s per step measured, so {total} steps",
            format_duration(budget),
            step_s
        ));
    }

    fn evaluate(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let model = self.model.valid().deterministic();
        let settings = self.cfg().eval.clone();
        let limit = self.cfg().eval_limit;
        let progress = &mut self.progress;
        let acc = evaluate(&model, &self.val_ds, &settings, limit, &self.device, |done, n| {
            progress.update(&format!("evaluating: {done}/{n} images"));
        })?;
        let summary = acc.summary();
        let train_loss = if self.state.loss_count > 0 {
            self.state.loss_sum / self.state.loss_count as f64
        } else {
            f64::NAN
        };
        self.state.loss_sum = 0.0;
        self.state.loss_count = 0;
        let record = SegRecord {
            iter: self.state.iter,
            train_loss,
            miou: summary.miou,
            macc: summary.macc,
            aacc: summary.aacc,
            elapsed_s: self.elapsed(),
        };
        self.progress.line(&format!(
            "step {}: train loss {:.4}, val mIoU {:.2} %, mAcc {:.2} %, aAcc {:.2} % ({:.1} s)",
            record.iter,
            record.train_loss,
            100.0 * record.miou,
            100.0 * record.macc,
            100.0 * record.aacc,
            t0.elapsed().as_secs_f64()
        ));
        self.state.history.push(record);
        let run = &self.state.config.out;
        weights::write_atomic(
            &run.join("per_class_iou.csv"),
            acc.per_class_csv(&self.state.classes).as_bytes(),
        )?;
        self.last_eval = Some(summary);
        self.write_reports()
    }

    fn write_reports(&self) -> Result<()> {
        let run = &self.state.config.out;
        let mut csv = String::from("iter,train_loss,miou,macc,aacc,elapsed_s\n");
        let mut jsonl = String::new();
        for r in &self.state.history {
            csv += &format!(
                "{},{:.5},{:.5},{:.5},{:.5},{:.1}\n",
                r.iter, r.train_loss, r.miou, r.macc, r.aacc, r.elapsed_s
            );
            jsonl += &(serde_json::to_string(r)? + "\n");
        }
        weights::write_atomic(&run.join("metrics.csv"), csv.as_bytes())?;
        weights::write_atomic(&run.join("metrics.jsonl"), jsonl.as_bytes())?;
        if !self.state.history.is_empty() {
            let png = curves_png(&self.state.history, &self.state.config.model_name)?;
            weights::write_atomic(&run.join("curves.png"), &png)?;
        }
        Ok(())
    }

    /// Rewrites `RUN/last/` atomically.
    fn save(&mut self) -> Result<()> {
        self.state.elapsed_s = self.elapsed();
        let model = segmenter_bytes(&self.model.valid(), &self.state.config.model)?;
        let optim = self.optim.to_host()?;
        let state = serde_json::to_vec_pretty(&self.state)?;
        let run = self.state.config.out.clone();
        checkpoint::commit_dir(&run.join("last"), |dir| {
            checkpoint::write_synced(&dir.join(MODEL_FILE), &model)?;
            checkpoint::write_synced(
                &dir.join(OPTIM_FILE),
                &crate::io::safetensors_bytes(&optim, None)?,
            )?;
            checkpoint::write_synced(&dir.join(STATE_FILE), &state)
        })
    }
}

/// Training loss and validation mIoU against the step.
fn curves_png(history: &[SegRecord], title: &str) -> Result<Vec<u8>> {
    use crate::plot::{PALETTE, Panel, Series, two_panels_png};
    let last = history.last().map_or(1.0, |r| r.iter as f64);
    let xticks = (0..=4)
        .map(|i| (last * i as f64 / 4.0).round())
        .collect::<Vec<_>>();
    let series = |name: &str, c: usize, f: &dyn Fn(&SegRecord) -> f64| Series {
        name: name.into(),
        color: PALETTE[c],
        points: history
            .iter()
            .map(|r| (r.iter as f64, f(r)))
            .filter(|p| p.1.is_finite())
            .collect(),
    };
    let loss = Panel {
        ylabel: "loss".into(),
        xlabel: "step".into(),
        xticks: xticks.clone(),
        yrange: None,
        legend_below: false,
        series: vec![series("train loss", 0, &|r| r.train_loss)],
    };
    let miou = Panel {
        ylabel: "%".into(),
        xlabel: "step".into(),
        xticks,
        yrange: Some((0.0, 100.0)),
        legend_below: true,
        series: vec![
            series("val mIoU", 0, &|r| 100.0 * r.miou),
            series("val mAcc", 2, &|r| 100.0 * r.macc),
            series("val aAcc", 3, &|r| 100.0 * r.aacc),
        ],
    };
    two_panels_png(title, &loss, &miou)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::SegmenterConfig;
    use crate::segment::compose::{ComposeOptions, compose, write_idx};

    type AB = burn::backend::Autodiff<crate::backend::Cpu>;

    /// `--budget` sets the step count from steps 3–12 and the run ends on its own; a run that
    /// ignored the budget would still be going at step 40, where this one is stopped.
    #[test]
    fn a_budget_sizes_the_run() {
        let root = std::env::temp_dir().join(format!("vicinity-seg-budget-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let idx = root.join("idx");
        std::fs::create_dir_all(&idx).unwrap();
        let images: Vec<u8> = (0..10 * 28 * 28).map(|i| ((i * 7919) % 251) as u8).collect();
        let labels: Vec<u8> = (0..10).map(|i| i as u8).collect();
        write_idx(&idx, "train", &images, &labels, 28).unwrap();
        write_idx(&idx, "t10k", &images, &labels, 28).unwrap();
        let data = root.join("data");
        let options = ComposeOptions {
            source: idx,
            out: data.clone(),
            train: 4,
            val: 1,
            size: 64,
            seed: 1,
        };
        compose(&options).unwrap();
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/semfpn_vvt_mini.json");
        let model = SegmenterConfig::resolve(model, 11).unwrap();
        let mut c = SegTrainConfig::new("semfpn_vvt_mini", model, data, root.join("run"));
        (c.train_split, c.val_split) = ("train".into(), "val".into());
        (c.iters, c.batch, c.quiet) = (1_000_000, 1, true);
        (c.pipeline.crop, c.pipeline.scale, c.eval.scale) = (32, (64, 32), (64, 32));
        c.budget_s = Some(0.01);
        let out = train::<AB>(c, Some(40), &Default::default()).unwrap();
        assert!(
            out.finished,
            "the run ignored its budget: paused at step {}",
            out.state.iter
        );
        assert_eq!(out.state.total, 12, "0.01 s is spent by step 12");
        assert_eq!(out.state.history.len(), 1, "one evaluation, at the end");
        let _ = std::fs::remove_dir_all(&root);
    }
}
