//! The training loop: fresh runs ([`train`]) and resumed ones ([`resume`]).
//!
//! One step: batch → tensors, forward, soft-target cross-entropy (f32), backward, AdamW with
//! parameter groups and global-norm clipping, EMA. The loss and gradient norm stay on the device
//! and are read back every `log_every` steps (one sync for the window), which is also when a
//! NaN/Inf is detected, with the exact step named. Every random draw is a function of the seed and
//! the position (data: seed, epoch, batch; drop-path: seed, global step), so a resumed run takes
//! exactly the steps the uninterrupted run would have taken.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, TensorData};

use super::budget::{format_duration, margin_s};
use super::checkpoint::{self, EMA_FILE, MODEL_FILE, OPTIM_FILE, RunState, STATE_FILE, read_all_f32};
use super::config::TrainConfig;
use super::evaluate::{all_reduce, evaluate};
use super::loss::{one_hot, soft_cross_entropy};
use super::metrics::{EpochMetrics, EvalSummary, history_csv, history_jsonl};
use super::optim::{AdamW, Ema};
use super::params::{cast_params, collect_flat, materialize};
use super::progress::Progress;
use super::schedule::Schedule;
use super::setup::{loaders, open_data, resolve_model};
use super::signals;
use crate::backend::Dtype;
use crate::data::Loader;
use crate::dist::Dist;
use crate::models::Model;
use crate::weights;

/// How a training session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The schedule is complete.
    Finished,
    /// Paused at a global step (`--stop-at-step`, or Ctrl-C); `last` holds the position.
    Paused(u64),
}

/// What a session did.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub stop: Stop,
    pub state: RunState,
    /// (global step, loss) of every step whose loss was read back (all of them with `log_every` 1).
    pub step_losses: Vec<(u64, f32)>,
    /// The last evaluation of the raw weights.
    pub last_eval: Option<EvalSummary>,
}

/// Mixes a seed and a counter (splitmix64), for per-step backend seeds.
pub(crate) fn mix_seed(seed: u64, n: u64) -> u64 {
    let mut z = seed
        ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Starts a new run in `cfg.out`.
pub fn train<B: AutodiffBackend>(cfg: TrainConfig, device: &B::Device) -> Result<TrainOutcome> {
    train_on::<B>(cfg, device, &Dist::solo())
}

/// Starts a new run as one rank of `dist`: `cfg.batch_size` images per rank and step; rank 0
/// alone writes the run directory and prints progress.
pub fn train_on<B: AutodiffBackend>(
    mut cfg: TrainConfig,
    device: &B::Device,
    dist: &Dist,
) -> Result<TrainOutcome> {
    let start = Instant::now();
    cfg.world_size = dist.world();
    cfg.validate()?;
    let run_dir = cfg.out.clone();
    let _lock = dist
        .is_main()
        .then(|| checkpoint::lock_run(&run_dir))
        .transpose()?;
    if dist.is_main() {
        check_new_run_dir(&run_dir)?;
    }
    // The data path is kept absolute, so the run can be resumed from any folder.
    cfg.data = std::path::absolute(&cfg.data)
        .with_context(|| format!("cannot resolve the data path {}", cfg.data.display()))?;
    let mut progress = Progress::new(cfg.quiet || !dist.is_main());
    let (train_ds, val_ds, val_split) = open_data(&cfg)?;
    cfg.val_split = val_split;
    let classes = train_ds.classes.clone();
    let (model_cfg, res) = resolve_model(&cfg, classes.len())?;
    cfg.dtype.apply::<B>(device)?;
    let model: Model<B> = {
        // A backend's generator can be global to the process (the CPU's is): seeding and
        // drawing the initial weights as one, so ranks run as threads of one process (the
        // tests) draw what a process alone would.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
        B::seed(device, cfg.seed);
        let model = model_cfg.init(device)?;
        materialize(&model);
        model
    };
    let model = dist.broadcast_model(model)?;
    progress.line(&format!(
        "training {} ({} parameters) on {} [{}: {} images, {}: {} images, {} classes] at {res}x{res}, {:?}{}",
        cfg.model_name,
        crate::cli::group_thousands(model.num_params() as u64),
        cfg.data.display(),
        cfg.train_split,
        train_ds.len(),
        cfg.val_split,
        val_ds.len(),
        classes.len(),
        cfg.dtype,
        ranks_note(dist)
    ));
    let (train_loader, val_loader) = loaders(&cfg, train_ds, val_ds, res, dist)?;
    let steps_per_epoch = train_loader.len();
    let mut optim = AdamW::new(cfg.optimizer, cfg.dtype == Dtype::Bf16);
    optim.set_dist(dist.clone());
    let ema = cfg.ema.map(Ema::new);
    let total = (cfg.epochs * steps_per_epoch) as u64;
    let state = RunState {
        version: RunState::VERSION,
        model: model_cfg,
        classes,
        resolution: res,
        normalize: cfg.normalize(),
        epoch: 0,
        batch: 0,
        global_step: 0,
        epochs: cfg.epochs,
        steps_per_epoch,
        schedule: Schedule {
            peak: cfg.peak_lr(),
            min: cfg.floor_lr(),
            warmup_steps: cfg.warmup.steps(total, steps_per_epoch),
            total_steps: total,
        },
        ema_updates: 0,
        best_top1: None,
        best_epoch: None,
        history: Vec::new(),
        epoch_loss_sum: 0.0,
        epoch_loss_count: 0,
        epoch_train_s: 0.0,
        epoch_data_wait_s: 0.0,
        epoch_images: 0,
        elapsed_s: 0.0,
        finished: false,
        config: cfg,
    };
    if dist.is_main() {
        weights::write_atomic(
            &run_dir.join("config.json"),
            &serde_json::to_vec_pretty(&state.config)?,
        )?;
    }
    let parts = Parts {
        model,
        optim,
        ema,
        loaders: (train_loader, val_loader),
    };
    let mut session = Session::new(device, parts, progress, start, state, dist.clone());
    if let Some(budget) = session.state.config.budget_s {
        session.size_to_budget(budget)?;
    }
    session.describe();
    session.run()
}

/// ", on N ranks" when there are several.
fn ranks_note(dist: &Dist) -> String {
    let how = if dist.uses_nccl() {
        "NCCL"
    } else {
        "host collectives"
    };
    match dist.world() {
        1 if dist.uses_nccl() => format!(", on 1 rank ({how})"),
        1 => String::new(),
        n => format!(", on {n} ranks ({how})"),
    }
}

/// Refuses a folder that already holds a run or other results; checks it can be written.
fn check_new_run_dir(run_dir: &Path) -> Result<()> {
    if checkpoint::resolve(run_dir, "last").is_some() {
        bail!(
            "{} already holds a run; continue it with --resume {} or pick another --out",
            run_dir.display(),
            run_dir.display()
        );
    }
    // A new run never writes over another's results (a `best/` or metrics without `last/`).
    let held: Vec<String> = std::fs::read_dir(run_dir)
        .with_context(|| format!("cannot list {}", run_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        // A run that failed before its first checkpoint leaves only its config.json: retrying
        // in the same folder is allowed.
        .filter(|n| !n.starts_with('.') && n != "config.json")
        .collect();
    if !held.is_empty() {
        bail!(
            "{} is not empty (it holds {}); a new run starts in an empty or new folder: pick another --out",
            run_dir.display(),
            held.join(", ")
        );
    }
    checkpoint::check_writable(run_dir)
}

/// What may change when a run is resumed (everything else comes from the run).
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Where the run's data is now, if it moved (or the run is resumed from another folder).
    pub data: Option<PathBuf>,
    pub skip_bad: bool,
    pub workers: Option<usize>,
    pub log_every: Option<usize>,
    pub stop_at_step: Option<u64>,
    pub debug_nan_at_step: Option<u64>,
    pub quiet: bool,
}

/// Continues the run in `run_dir` from its `last` checkpoint, with the same data order and schedule.
pub fn resume<B: AutodiffBackend>(
    run_dir: &Path,
    opts: ResumeOptions,
    device: &B::Device,
) -> Result<TrainOutcome> {
    resume_on::<B>(run_dir, opts, device, &Dist::solo())
}

/// Continues a run as one rank of `dist`, on any world size that divides the run's global
/// batch: the same global batches in the same order, each rank taking its share.
pub fn resume_on<B: AutodiffBackend>(
    run_dir: &Path,
    opts: ResumeOptions,
    device: &B::Device,
    dist: &Dist,
) -> Result<TrainOutcome> {
    let start = Instant::now();
    let ck = checkpoint::resolve(run_dir, "last").with_context(|| {
        format!(
            "{} has no checkpoint to resume (expected {}/last/{STATE_FILE})",
            run_dir.display(),
            run_dir.display()
        )
    })?;
    let _lock = dist
        .is_main()
        .then(|| checkpoint::lock_run(run_dir))
        .transpose()?;
    let mut state = RunState::read(&ck)?;
    let cfg = &mut state.config;
    cfg.out = run_dir.to_path_buf();
    if let Some(d) = opts.data {
        cfg.data = std::path::absolute(&d)
            .with_context(|| format!("cannot resolve the data path {}", d.display()))?;
    }
    cfg.skip_bad |= opts.skip_bad;
    if let Some(w) = opts.workers {
        cfg.workers = w;
    }
    if let Some(l) = opts.log_every {
        cfg.log_every = l.max(1);
    }
    cfg.stop_at_step = opts.stop_at_step;
    cfg.debug_nan_at_step = opts.debug_nan_at_step;
    cfg.quiet = opts.quiet;
    let mut progress = Progress::new(cfg.quiet || !dist.is_main());
    if state.finished {
        progress.line(&format!(
            "{} is already finished ({} epochs)",
            run_dir.display(),
            state.history.len()
        ));
        return Ok(TrainOutcome {
            run_dir: run_dir.to_path_buf(),
            stop: Stop::Finished,
            step_losses: Vec::new(),
            last_eval: None,
            state,
        });
    }
    if dist.is_main() {
        checkpoint::check_writable(run_dir)?;
    }
    let (train_ds, val_ds, _) = open_data(cfg).with_context(|| {
        format!(
            "opening the run's data {} (if it has moved, give its new place with --data)",
            cfg.data.display()
        )
    })?;
    if train_ds.classes != state.classes {
        bail!("the dataset's classes are not the ones this run was trained on");
    }
    cfg.dtype.apply::<B>(device)?;
    let model: Model<B> = state.model.init(device)?;
    let model = weights::load_native(model, &ck.join(MODEL_FILE))?;
    let model = if cfg.dtype == Dtype::Bf16 {
        cast_params(model, FloatDType::BF16)
    } else {
        model
    };
    let mut optim = AdamW::new(cfg.optimizer, cfg.dtype == Dtype::Bf16);
    optim.set_dist(dist.clone());
    // Keyed by parameter name, as this version names parameters.
    let optim_state = read_all_f32(&ck.join(OPTIM_FILE))?
        .into_iter()
        .map(|(name, t)| (weights::current_name(&name), t))
        .collect();
    optim
        .load_host(&model.valid(), optim_state, state.global_step)
        .with_context(|| {
            format!(
                "cannot restore the optimizer from {}",
                ck.join(OPTIM_FILE).display()
            )
        })?;
    let ema = match cfg.ema {
        Some(decay) => {
            let mut e = Ema::new(decay);
            e.updates = state.ema_updates;
            let path = ck.join(EMA_FILE);
            if path.exists() {
                let m: Model<B::InnerBackend> = state.model.init(device)?;
                e.pending = collect_flat(&weights::load_native(m, &path)?);
            }
            Some(e)
        }
        None => None,
    };
    let (train_loader, val_loader) = loaders(cfg, train_ds, val_ds, state.resolution, dist)?;
    if train_loader.len() != state.steps_per_epoch {
        bail!(
            "the training split now gives {} batches per epoch, the run had {}; was the dataset changed?",
            train_loader.len(),
            state.steps_per_epoch
        );
    }
    progress.line(&format!(
        "resuming {} at epoch {}, batch {} (step {}/{}){}",
        run_dir.display(),
        state.epoch + 1,
        state.batch,
        state.global_step,
        state.schedule.total_steps,
        ranks_note(dist)
    ));
    let loaders = (train_loader, val_loader);
    let parts = Parts {
        model,
        optim,
        ema,
        loaders,
    };
    let session = Session::new(device, parts, progress, start, state, dist.clone());
    session.run()
}

/// A step whose loss and gradient norm are still on the device.
struct Pending<B: Backend> {
    step: u64,
    epoch: usize,
    batch: usize,
    loss: Tensor<B, 1>,
    grad_norm: Tensor<B, 1>,
}

/// What a session trains with, fresh or restored.
struct Parts<B: AutodiffBackend> {
    model: Model<B>,
    optim: AdamW<B::InnerBackend>,
    ema: Option<Ema<B::InnerBackend>>,
    /// Training and validation.
    loaders: (Loader, Loader),
}

/// A run in progress: the model, optimizer and data, and the [`RunState`] that a checkpoint
/// saves. Its budget sizing lives in `budget.rs`, its checkpoint writing in `checkpoint.rs`.
pub(super) struct Session<B: AutodiffBackend> {
    pub(super) device: B::Device,
    pub(super) model: Model<B>,
    pub(super) optim: AdamW<B::InnerBackend>,
    pub(super) ema: Option<Ema<B::InnerBackend>>,
    pub(super) train_loader: Loader,
    pub(super) val_loader: Loader,
    pub(super) run_dir: PathBuf,
    pub(super) progress: Progress,
    step_losses: Vec<(u64, f32)>,
    pending: Vec<Pending<B::InnerBackend>>,
    /// When this process took the run up.
    started: Instant,
    /// Training seconds of earlier processes (a resumed run).
    elapsed_before: f64,
    /// Measured seconds per step, per evaluation pass, per checkpoint.
    pub(super) step_s: Option<f64>,
    pub(super) eval_s: Option<f64>,
    pub(super) save_s: Option<f64>,
    last_eval: Option<EvalSummary>,
    /// Start of the current timing window: (instant, global step).
    window: Option<(Instant, u64)>,
    pub(super) writer: checkpoint::Writer,
    pub(super) state: RunState,
    /// The ranks of a multi-process run (one alone otherwise).
    pub(super) dist: Dist,
    /// Whether the GPU kernels of a step were compiled ahead (once per process).
    compiled_ahead: bool,
}

impl<B: AutodiffBackend> Session<B> {
    /// A fresh or resumed run (`state.elapsed_s` is the time its earlier processes spent).
    fn new(
        device: &B::Device,
        parts: Parts<B>,
        progress: Progress,
        started: Instant,
        state: RunState,
        dist: Dist,
    ) -> Self {
        let Parts {
            model,
            optim,
            ema,
            loaders: (train_loader, val_loader),
        } = parts;
        Self {
            device: device.clone(),
            model,
            optim,
            ema,
            train_loader,
            val_loader,
            run_dir: state.config.out.clone(),
            progress,
            step_losses: Vec::new(),
            pending: Vec::new(),
            started,
            elapsed_before: state.elapsed_s,
            step_s: None,
            eval_s: None,
            save_s: None,
            last_eval: None,
            window: None,
            writer: checkpoint::Writer::default(),
            state,
            dist,
            compiled_ahead: false,
        }
    }

    pub(super) fn cfg(&self) -> &TrainConfig {
        &self.state.config
    }

    pub(super) fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    fn describe(&mut self) {
        let s = self.state.schedule;
        let c = &self.state.config;
        let batch = match self.dist.world() {
            1 => c.global_batch().to_string(),
            n => format!("{} ({} per rank x {n})", c.global_batch(), c.global_batch() / n),
        };
        let text = format!(
            "schedule: {} epochs x {} steps = {} steps, batch {}, lr {:.3e} (warm-up {} steps, cosine to {:.1e}), wd {}, clip {}, ema {}, run dir {}",
            self.state.epochs,
            self.state.steps_per_epoch,
            s.total_steps,
            batch,
            s.peak,
            s.warmup_steps,
            s.min,
            c.optimizer.weight_decay,
            c.clip.map_or("off".into(), |v| v.to_string()),
            c.ema.map_or("off".into(), |v| v.to_string()),
            self.run_dir.display()
        );
        self.progress.line(&text);
    }

    /// One training step; the loss and gradient norm stay on the device.
    fn step(&mut self, batch: crate::data::Batch, lr: f64) -> Result<()> {
        let n = batch.len();
        let [h, w] = batch.size;
        let k = batch.num_classes;
        let mut images = batch.images;
        if self.cfg().debug_nan_at_step == Some(self.state.global_step) {
            images.iter_mut().for_each(|v| *v = f32::NAN);
        }
        crate::dist::watchdog::beat(Some(self.state.global_step));
        crate::dist::debug_fault(&self.dist, self.state.global_step);
        let mut step_seed = mix_seed(self.cfg().seed, self.state.global_step);
        if self.dist.world() > 1 {
            // Each rank draws its own drop-path masks, as with one seed per process in DDP.
            step_seed = mix_seed(step_seed, self.dist.rank() as u64);
        }
        B::seed(&self.device, step_seed);
        crate::attention::performer::seed_draws(step_seed);
        let x = Tensor::<B, 4>::from_data(TensorData::new(images, [n, 3, h, w]), &self.device);
        let targets = batch.targets.unwrap_or_else(|| one_hot(&batch.labels, k));
        let t = Tensor::<B, 2>::from_data(TensorData::new(targets, [n, k]), (&self.device, DType::F32));
        let clip = self.cfg().clip;
        let Stepped {
            model,
            loss: loss_value,
            stats,
        } = train_step(
            self.model.clone(),
            &mut self.optim,
            self.ema.as_mut(),
            (x, t),
            lr,
            clip,
        )?;
        self.model = model;
        if self.ema.is_some() {
            self.state.ema_updates += 1;
        }
        self.pending.push(Pending {
            step: self.state.global_step,
            epoch: self.state.epoch,
            batch: batch.index,
            loss: loss_value,
            grad_norm: stats.grad_norm,
        });
        self.state.global_step += 1;
        self.state.batch = batch.index + 1;
        // Images of the global batch (every rank took its share).
        self.state.epoch_images += (n * self.dist.world()) as u64;
        Ok(())
    }

    /// Compiles the GPU kernels of a training step at `batch`'s shape ahead of the first step, all
    /// at once (see [`crate::backend::compile_ahead`]): a step on clones, thrown away.
    pub(super) fn compile_ahead(&mut self, batch: &crate::data::Batch) -> Result<()> {
        if std::mem::replace(&mut self.compiled_ahead, true) || !crate::backend::on_cuda::<B>() {
            return Ok(());
        }
        let [h, w] = batch.size;
        let (n, k) = (batch.len(), batch.num_classes);
        let x = Tensor::<B, 4>::zeros([n, 3, h, w], &self.device);
        let t = Tensor::<B, 2>::zeros([n, k], (&self.device, DType::F32));
        let (mut model, mut optim, mut ema) = (self.model.clone(), self.optim.clone(), self.ema.clone());
        // No collective: the other ranks' clones are thrown away too.
        optim.set_dist(Dist::solo());
        let clip = self.cfg().clip;
        let mut failed = None;
        // Two steps (the first creates the optimizer's state, the second updates it) and an
        // evaluation forward.
        let ahead = crate::backend::compile_ahead::<B>(&self.device, || {
            for _ in 0..2 {
                match train_step(
                    model.clone(),
                    &mut optim,
                    ema.as_mut(),
                    (x.clone(), t.clone()),
                    1e-4,
                    clip,
                ) {
                    Ok(stepped) => model = stepped.model,
                    Err(e) => {
                        failed = Some(e);
                        return;
                    }
                }
            }
            let _ = model.valid().forward(x.inner());
        })?;
        if let Some(e) = failed {
            return Err(e.context("the step that compiles the GPU kernels ahead failed"));
        }
        if let Some(a) = ahead.filter(|a| a.kernels > 0) {
            self.progress.line(&format!(
                "compiled {} GPU kernels ahead of the first step in {:.1} s ({} threads)",
                a.kernels,
                a.pass_s + a.wait_s,
                a.threads
            ));
        }
        Ok(())
    }

    /// Reads the pending losses back (one sync), stops on a non-finite value, refreshes the line.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let losses: Vec<Tensor<B::InnerBackend, 1>> = pending.iter().map(|p| p.loss.clone()).collect();
        let norms: Vec<Tensor<B::InnerBackend, 1>> = pending.iter().map(|p| p.grad_norm.clone()).collect();
        let (_, mut losses) = crate::io::to_host(Tensor::cat(losses, 0))?;
        let (_, norms) = crate::io::to_host(Tensor::cat(norms, 0))?;
        if self.dist.world() > 1 {
            // The global batch's loss: the mean of the ranks' (equal-sized) shares.
            let mut sums: Vec<f64> = losses.iter().map(|&l| f64::from(l)).collect();
            self.dist.sum_f64(&mut sums)?;
            let n = self.dist.world() as f64;
            losses = sums.iter().map(|&s| (s / n) as f32).collect();
        }
        for ((p, &loss), &norm) in pending.iter().zip(&losses).zip(&norms) {
            if !loss.is_finite() || !norm.is_finite() {
                let what = if loss.is_finite() {
                    format!("the gradient norm is {norm}")
                } else {
                    format!("the loss is {loss}")
                };
                let last = match checkpoint::resolve(&self.run_dir, "last") {
                    Some(d) => match RunState::read(&d) {
                        Ok(s) => format!(
                            "the last good checkpoint, {} (step {}), is untouched",
                            d.display(),
                            s.global_step
                        ),
                        Err(_) => format!("the last good checkpoint is {}", d.display()),
                    },
                    None => "no checkpoint had been written yet".into(),
                };
                let f32_hint = if self.cfg().dtype == Dtype::Bf16 {
                    ", or --dtype f32"
                } else {
                    ""
                };
                bail!(
                    "training diverged: {what} at step {} (epoch {}, batch {} of {}); the run stopped without saving; {last}. \
                     Try a lower --lr, --clip, a longer --warmup{f32_hint}",
                    p.step + 1,
                    p.epoch + 1,
                    p.batch + 1,
                    self.state.steps_per_epoch
                );
            }
            self.state.epoch_loss_sum += loss as f64;
            self.state.epoch_loss_count += 1;
            self.step_losses.push((p.step, loss));
        }
        // Timing window: wall time between read-backs (the device is in sync at both ends).
        let now = Instant::now();
        let step = self.state.global_step;
        if let Some((t0, s0)) = self.window
            && step > s0
        {
            let per = now.duration_since(t0).as_secs_f64() / (step - s0) as f64;
            self.step_s = Some(match self.step_s {
                Some(old) => 0.7 * old + 0.3 * per,
                None => per,
            });
        }
        self.window = Some((now, step));
        let last_loss = *losses.last().unwrap_or(&f32::NAN);
        let text = self.progress_text(last_loss);
        self.progress.update(&text);
        Ok(())
    }

    fn progress_text(&self, loss: f32) -> String {
        let s = &self.state;
        let total = s.schedule.total_steps;
        let lr = s.schedule.lr(s.global_step.saturating_sub(1));
        let (speed, eta) = match self.step_s {
            Some(step_s) => {
                let remaining = total.saturating_sub(s.global_step) as f64 * step_s;
                let images = self.cfg().global_batch() as f64;
                let epochs_left = s.epochs.saturating_sub(s.epoch) as f64;
                let evals = self.eval_s.unwrap_or(0.0) * (epochs_left / self.cfg().eval_every as f64).ceil();
                (
                    format!("{:.0} img/s", images / step_s),
                    format_duration(remaining + evals),
                )
            }
            None => ("- img/s".into(), "?".into()),
        };
        format!(
            "epoch {}/{}  step {}/{} (batch {}/{})  loss {loss:.4}  lr {lr:.3e}  {speed}  ETA {eta}",
            s.epoch + 1,
            s.epochs,
            s.global_step,
            total,
            s.batch,
            s.steps_per_epoch
        )
    }

    fn evaluate_models(&mut self) -> Result<(EvalSummary, Option<EvalSummary>, f64)> {
        let t0 = Instant::now();
        let pass = |m: &Model<B::InnerBackend>| -> Result<EvalSummary> {
            let mut acc = evaluate(m, &self.val_loader, &self.device, false)?;
            all_reduce(&mut acc, &self.dist)?;
            Ok(acc.summary())
        };
        let raw = pass(&self.model.valid())?;
        let ema = match self.ema_model(None) {
            Some(m) => Some(pass(&m)?),
            None => None,
        };
        let secs = t0.elapsed().as_secs_f64();
        self.eval_s = Some(secs);
        Ok((raw, ema, secs))
    }

    fn write_reports(&self) -> Result<()> {
        if !self.dist.is_main() {
            return Ok(());
        }
        let h = &self.state.history;
        weights::write_atomic(&self.run_dir.join("metrics.csv"), history_csv(h).as_bytes())?;
        weights::write_atomic(&self.run_dir.join("metrics.jsonl"), history_jsonl(h).as_bytes())?;
        let png = super::plot::curves_png(h, &self.cfg().model_name)?;
        weights::write_atomic(&self.run_dir.join("curves.png"), &png)
    }

    fn paused(mut self, train_start: Instant) -> Result<TrainOutcome> {
        self.flush()?;
        self.state.epoch_train_s += train_start.elapsed().as_secs_f64();
        self.save(false)?;
        let step = self.state.global_step;
        self.progress.line(&format!(
            "paused at step {step} (epoch {}, batch {}); checkpoint in {}; continue with: vicinity train --resume {}",
            self.state.epoch + 1,
            self.state.batch,
            self.run_dir.join("last").display(),
            self.run_dir.display()
        ));
        self.outcome(Stop::Paused(step))
    }

    /// The run's result, once its last checkpoint is on disk.
    fn outcome(mut self, stop: Stop) -> Result<TrainOutcome> {
        self.writer.wait()?;
        Ok(TrainOutcome {
            run_dir: self.run_dir,
            stop,
            state: self.state,
            step_losses: self.step_losses,
            last_eval: self.last_eval,
        })
    }

    /// Whether the end of `epoch` (0-based) evaluates.
    pub(super) fn evaluates_after(&self, epoch: usize) -> bool {
        (epoch + 1).is_multiple_of(self.cfg().eval_every)
    }

    fn run(mut self) -> Result<TrainOutcome> {
        let deadline = self.cfg().budget_s;
        while !self.state.finished && self.state.epoch < self.state.epochs {
            let total = self.state.schedule.total_steps;
            let epoch = self.state.epoch;
            let train_start = Instant::now();
            self.window = None;
            let mut out_of_time = false;
            // (A run paused after the last batch of an epoch resumes straight into its end.)
            if self.state.global_step < total && self.state.batch < self.state.steps_per_epoch {
                let mut batches = self.train_loader.epoch(epoch, self.state.batch);
                loop {
                    if self.state.global_step >= total {
                        break;
                    }
                    if let Some(budget) = deadline {
                        let need = self.step_s.unwrap_or(0.0)
                            + self.eval_s.unwrap_or(0.0)
                            + self.save_s.unwrap_or(0.0)
                            + margin_s(budget);
                        // Rank 0's clock decides for every rank.
                        let late = self.elapsed() + need > budget;
                        if self.dist.main_says(late)? {
                            out_of_time = true;
                            break;
                        }
                    }
                    let waited = Instant::now();
                    let Some(batch) = batches.next() else { break };
                    self.state.epoch_data_wait_s += waited.elapsed().as_secs_f64();
                    let lr = self.state.schedule.lr(self.state.global_step);
                    let batch = batch?;
                    self.compile_ahead(&batch)?;
                    self.step(batch, lr)?;
                    if self.pending.len() >= self.cfg().log_every {
                        self.flush()?;
                    }
                    let step = self.state.global_step;
                    // A signal reaches the ranks at different steps: they pause at the step
                    // where one has seen it.
                    let interrupted = if self.dist.world() > 1 {
                        self.dist.any(signals::interrupted())?
                    } else {
                        signals::interrupted()
                    };
                    if self.cfg().stop_at_step == Some(step) || interrupted {
                        drop(batches);
                        return self.paused(train_start);
                    }
                    let save_every = self.cfg().save_every;
                    if save_every > 0
                        && step.is_multiple_of(save_every)
                        && self.state.batch < self.state.steps_per_epoch
                    {
                        self.flush()?;
                        self.save(false)?;
                    }
                }
            }
            self.flush()?;
            self.state.epoch_train_s += train_start.elapsed().as_secs_f64();
            if !out_of_time {
                self.resize_to_budget();
                self.agree_on_schedule()?;
            }
            let last_epoch = out_of_time
                || self.state.global_step >= self.state.schedule.total_steps
                || epoch + 1 >= self.state.epochs;
            if out_of_time {
                self.progress.line(&format!(
                    "stopping at step {} to stay within the budget (the measured speed was optimistic)",
                    self.state.global_step
                ));
                // Out of time before this epoch's first step: the previous epoch, already
                // evaluated, is the last one (no empty epoch in the history).
                let evaluated = self.state.history.last().is_some_and(|m| m.val_top1.is_some());
                if self.state.epoch_images == 0 && evaluated {
                    break;
                }
            }
            self.end_epoch(last_epoch)?;
        }
        if !self.state.finished {
            self.state.finished = true;
            self.save(false)?;
        }
        let total = format_duration(self.elapsed());
        let best = self
            .state
            .best_top1
            .map_or("-".into(), |b| format!("{:.2}%", b * 100.0));
        self.progress.line(&format!(
            "finished: {} epochs, {} steps in {total}; best val top-1 {best}; run dir {}",
            self.state.history.len(),
            self.state.global_step,
            self.run_dir.display()
        ));
        self.outcome(Stop::Finished)
    }

    fn end_epoch(&mut self, last_epoch: bool) -> Result<()> {
        let epoch = self.state.epoch;
        let evaluate_now = last_epoch || self.evaluates_after(epoch);
        let (raw, ema, eval_s) = if evaluate_now {
            let (r, e, s) = self.evaluate_models()?;
            (Some(r), e, s)
        } else {
            (None, None, 0.0)
        };
        let s = &mut self.state;
        let train_s = s.epoch_train_s.max(1e-9);
        let m = EpochMetrics {
            epoch: epoch + 1,
            step: s.global_step,
            train_loss: s.epoch_loss_sum / s.epoch_loss_count.max(1) as f64,
            val_loss: raw.map(|r| r.loss),
            val_top1: raw.map(|r| r.top1),
            val_top5: raw.map(|r| r.top5),
            ema_top1: ema.map(|r| r.top1),
            ema_top5: ema.map(|r| r.top5),
            lr: s.schedule.lr(s.global_step.saturating_sub(1)),
            epoch_s: train_s,
            eval_s,
            img_per_s: s.epoch_images as f64 / train_s,
            data_wait_s: s.epoch_data_wait_s,
        };
        let improved = m
            .val_top1
            .is_some_and(|v| v.is_finite() && s.best_top1.is_none_or(|b| v > b));
        if improved {
            s.best_top1 = m.val_top1;
            s.best_epoch = Some(epoch + 1);
        }
        s.history.push(m.clone());
        s.epoch += 1;
        s.batch = 0;
        s.epoch_loss_sum = 0.0;
        s.epoch_loss_count = 0;
        s.epoch_train_s = 0.0;
        s.epoch_data_wait_s = 0.0;
        s.epoch_images = 0;
        s.finished = last_epoch;
        if raw.is_some() {
            self.last_eval = raw;
        }
        let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
        let ema_text = if self.ema.is_some() {
            format!(" (ema top-1 {})", pct(m.ema_top1))
        } else {
            String::new()
        };
        self.progress.line(&format!(
            "epoch {}/{}: train loss {:.4}, val loss {}, top-1 {}, top-5 {}{ema_text}, lr {:.2e}, {:.1} s (data wait {:.1} s), {:.0} img/s{}",
            m.epoch,
            self.state.epochs,
            m.train_loss,
            m.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            pct(m.val_top1),
            pct(m.val_top5),
            m.lr,
            m.epoch_s,
            m.data_wait_s,
            m.img_per_s,
            if improved { " [best]" } else { "" }
        ));
        let t0 = Instant::now();
        self.save(improved)?;
        self.save_s = Some(t0.elapsed().as_secs_f64());
        self.write_reports()
    }
}

/// What [`train_step`] returns, all on the device.
pub(super) struct Stepped<B: AutodiffBackend> {
    pub(super) model: Model<B>,
    pub(super) loss: Tensor<B::InnerBackend, 1>,
    pub(super) stats: super::optim::StepStats<B::InnerBackend>,
}

/// Forward, loss, backward and the optimizer's step (with the EMA).
pub(super) fn train_step<B: AutodiffBackend>(
    model: Model<B>,
    optim: &mut AdamW<B::InnerBackend>,
    ema: Option<&mut Ema<B::InnerBackend>>,
    (x, t): (Tensor<B, 4>, Tensor<B, 2>),
    lr: f64,
    clip: Option<f64>,
) -> Result<Stepped<B>> {
    let loss = soft_cross_entropy(model.forward(x), t);
    let loss_value = loss.clone().inner();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let (model, stats) = optim.step(model, grads, lr, clip, ema)?;
    Ok(Stepped {
        model,
        loss: loss_value,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_per_step() {
        assert_ne!(mix_seed(1, 0), mix_seed(1, 1));
        assert_ne!(mix_seed(1, 0), mix_seed(2, 0));
    }
}
