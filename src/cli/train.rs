//! `vicinity train`, `eval` and `predict`: their flags, and the flags turned into a
//! [`TrainConfig`] (a recipe, then every override).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;

use crate::data::{Crop, Mixing, RandomErasing, parse_randaug};
use crate::models;
use crate::train::budget::{format_duration, parse_duration};
use crate::train::config::{Dtype, Recipe, TrainConfig, normalize_by_name};
use crate::train::demo;
use crate::train::inference::{self, CheckpointInput, EvalOptions, PredictOptions};
use crate::train::schedule::Warmup;
use crate::train::trainer::{self, ResumeOptions, Stop, TrainOutcome};

/// `vicinity train`.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// A short real job on a CPU: draws an 8-class shapes dataset, trains a tiny VVT for about
    /// 90 s (--budget) and prints its test accuracy.
    #[arg(long)]
    pub quick: bool,
    /// Continue the run in this directory from its `last` checkpoint (same data order and schedule).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Registered model name or a .json/.toml config file.
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset: ImageFolder dir or .tar/.tar.gz/.tar.zst archive, CIFAR binary dir, Fashion-MNIST IDX dir.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_name = "SPLIT")]
    pub train_split: Option<String>,
    /// Validation split (default: `val`, else `test`).
    #[arg(long, value_name = "SPLIT")]
    pub val_split: Option<String>,
    /// Classifier size (default: the dataset's class count; must match it).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Square input size (default: the model's; VVT takes multiples of 32).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Recipe preset; every part can be overridden by the flags below.
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub eval_batch: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Wall-clock budget (90s, 4m, 1h): measures the speed, then sizes epochs and schedule to fit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub budget: Option<f64>,
    /// Peak learning rate (papers: per 512 images, scaled by batch/512; see --lr-scaling).
    #[arg(long)]
    pub lr: Option<f64>,
    /// `linear`: lr × batch/512 (papers), `none`: lr as given (cifar-fast).
    #[arg(long, value_parser = ["linear", "none"])]
    pub lr_scaling: Option<String>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warm-up: epochs (`5`) or a share of the steps (`5%`).
    #[arg(long)]
    pub warmup: Option<String>,
    /// AdamW weight decay (never on norms, biases, position embeddings).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0: off).
    #[arg(long)]
    pub clip: Option<f64>,
    /// EMA of the weights with this decay, evaluated and saved too (0: off).
    #[arg(long)]
    pub ema: Option<f64>,
    /// Stochastic depth rate.
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Mixup alpha (0: off).
    #[arg(long)]
    pub mixup: Option<f32>,
    /// CutMix alpha (0: off).
    #[arg(long)]
    pub cutmix: Option<f32>,
    /// Probability of mixing a batch.
    #[arg(long)]
    pub mix_prob: Option<f32>,
    /// Probability of CutMix rather than Mixup when both are on.
    #[arg(long)]
    pub switch_prob: Option<f32>,
    /// RandAugment as timm writes it (`rand-m9-mstd0.5-inc1`, `rand-m7-n2`) or `off`.
    #[arg(long)]
    pub randaug: Option<String>,
    /// Random erasing probability (0: off).
    #[arg(long)]
    pub erasing: Option<f32>,
    /// Label smoothing (0: off).
    #[arg(long)]
    pub smoothing: Option<f32>,
    /// Horizontal flip probability.
    #[arg(long)]
    pub hflip: Option<f32>,
    /// Spatial augmentation: `random-resized` (papers), `pad-crop` (CIFAR: reflect pad, random crop), `resize`.
    #[arg(long, value_parser = ["random-resized", "pad-crop", "resize"])]
    pub crop: Option<String>,
    /// Padding of `pad-crop` in input pixels (default: an eighth of the side, 4 at 32²).
    #[arg(long, value_name = "PIXELS")]
    pub crop_pad: Option<u32>,
    /// Input normalisation: imagenet, cifar10, cifar100.
    #[arg(long)]
    pub normalize: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// f32, or bf16 (bf16 weights/activations/gradients with f32 master weights, moments and loss).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Read the loss back and refresh the progress line every N steps.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Also checkpoint every N steps (default: at epoch ends only).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Data decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Leave out images that cannot be decoded (each is named in a warning) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Run directory (default: runs/<model>-<time>).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Pause after this global step (checkpoint written; continue with --resume).
    #[arg(long)]
    pub stop_at_step: Option<u64>,
    /// Test hook: feed NaN images at this (0-based) global step.
    #[arg(long, hide = true)]
    pub debug_nan_at_step: Option<u64>,
}

impl TrainArgs {
    /// The configuration these flags describe (recipe first, then each override).
    pub fn to_config(&self) -> Result<TrainConfig> {
        let model_name = self
            .model
            .as_deref()
            .context("say which model: --model NAME or a .json/.toml file")?;
        let data = self
            .data
            .clone()
            .context("say which data: --data PATH (ImageFolder, archive, CIFAR, IDX)")?;
        let model = models::resolve_config(model_name)?;
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| crate::train::setup::default_run_dir(model_name));
        let mut c = TrainConfig::new(
            self.recipe.unwrap_or(Recipe::Papers),
            model_name,
            model,
            data,
            out,
        );
        let a = &mut c.augment;
        if let Some(v) = &self.crop {
            a.crop = match v.as_str() {
                "random-resized" => Crop::RandomResized {
                    scale: [0.08, 1.0],
                    ratio: [3.0 / 4.0, 4.0 / 3.0],
                },
                "pad-crop" => Crop::PadCrop {
                    pad: None,
                    reflect: true,
                },
                _ => Crop::Resize,
            };
        }
        if let Some(v) = self.hflip {
            a.hflip = v;
        }
        if let Some(v) = &self.randaug {
            a.rand_augment = parse_randaug(v)?;
        }
        if let Some(v) = self.erasing {
            a.random_erasing = (v > 0.0).then(|| RandomErasing::timm(v));
        }
        if let Some(v) = self.smoothing {
            a.label_smoothing = v;
        }
        if let Some(n) = &self.normalize {
            a.normalize = normalize_by_name(n)?;
        }
        for (flag, alpha) in [("--mixup", self.mixup), ("--cutmix", self.cutmix)] {
            if let Some(a) = alpha
                && !(a >= 0.0 && a.is_finite())
            {
                bail!("{flag} is a Beta(α, α) strength and must be 0 (off) or positive, got {a}");
            }
        }
        for (flag, p) in [("--mix-prob", self.mix_prob), ("--switch-prob", self.switch_prob)] {
            if let Some(p) = p
                && !(0.0..=1.0).contains(&p)
            {
                bail!("{flag} is a probability and must lie in [0, 1], got {p}");
            }
        }
        if self.mixup.is_some()
            || self.cutmix.is_some()
            || self.mix_prob.is_some()
            || self.switch_prob.is_some()
        {
            let mut m = a.mixing.clone().unwrap_or_else(|| Mixing {
                mixup_alpha: 0.0,
                cutmix_alpha: 0.0,
                ..Mixing::timm()
            });
            if let Some(v) = self.mixup {
                m.mixup_alpha = v;
            }
            if let Some(v) = self.cutmix {
                m.cutmix_alpha = v;
            }
            if let Some(v) = self.mix_prob {
                m.prob = v;
            }
            if let Some(v) = self.switch_prob {
                m.switch_prob = v;
            }
            a.mixing = (m.mixup_alpha > 0.0 || m.cutmix_alpha > 0.0).then_some(m);
        }
        macro_rules! set {
            ($($field:ident <- $arg:ident),*) => { $(if let Some(v) = self.$arg.clone() { c.$field = v; })* };
        }
        set!(train_split <- train_split, val_split <- val_split, batch_size <- batch, eval_batch_size <- eval_batch,
             epochs <- epochs, lr <- lr, min_lr <- min_lr, seed <- seed, dtype <- dtype, eval_every <- eval_every,
             log_every <- log_every, save_every <- save_every, workers <- workers);
        c.num_classes = self.num_classes;
        c.resolution = self.resolution;
        if let Some(v) = self.crop_pad {
            match &mut c.augment.crop {
                Crop::PadCrop { pad, .. } => *pad = Some(v),
                _ => bail!("--crop-pad applies to --crop pad-crop only"),
            }
        }
        if let Some(v) = self.drop_path {
            c.drop_path = Some(v);
        }
        if let Some(v) = &self.lr_scaling {
            c.lr_per_512 = v == "linear";
        }
        if let Some(v) = &self.warmup {
            c.warmup = Warmup::parse(v)?;
        }
        if let Some(v) = self.weight_decay {
            c.optimizer.weight_decay = v;
        }
        if let Some(v) = self.clip {
            c.clip = (v > 0.0).then_some(v);
        }
        if let Some(v) = self.ema {
            c.ema = (v > 0.0).then_some(v);
        }
        c.budget_s = self.budget;
        c.skip_bad = self.skip_bad;
        c.stop_at_step = self.stop_at_step;
        c.debug_nan_at_step = self.debug_nan_at_step;
        c.validate()?;
        Ok(c)
    }

    /// Flags that a resumed run ignores (its settings come from the run).
    fn ignored_on_resume(&self) -> Vec<&'static str> {
        [
            (self.model.is_some(), "--model"),
            (self.recipe.is_some(), "--recipe"),
            (self.batch.is_some(), "--batch"),
            (self.epochs.is_some(), "--epochs"),
            (self.budget.is_some(), "--budget"),
            (self.lr.is_some(), "--lr"),
            (self.resolution.is_some(), "--resolution"),
            (self.dtype.is_some(), "--dtype"),
            (self.seed.is_some(), "--seed"),
            (self.out.is_some(), "--out"),
            (self.train_split.is_some(), "--train-split"),
            (self.val_split.is_some(), "--val-split"),
            (self.num_classes.is_some(), "--num-classes"),
            (self.eval_batch.is_some(), "--eval-batch"),
            (self.lr_scaling.is_some(), "--lr-scaling"),
            (self.min_lr.is_some(), "--min-lr"),
            (self.warmup.is_some(), "--warmup"),
            (self.weight_decay.is_some(), "--weight-decay"),
            (self.clip.is_some(), "--clip"),
            (self.ema.is_some(), "--ema"),
            (self.drop_path.is_some(), "--drop-path"),
            (self.mixup.is_some(), "--mixup"),
            (self.cutmix.is_some(), "--cutmix"),
            (self.mix_prob.is_some(), "--mix-prob"),
            (self.switch_prob.is_some(), "--switch-prob"),
            (self.randaug.is_some(), "--randaug"),
            (self.erasing.is_some(), "--erasing"),
            (self.smoothing.is_some(), "--smoothing"),
            (self.hflip.is_some(), "--hflip"),
            (self.crop.is_some(), "--crop"),
            (self.crop_pad.is_some(), "--crop-pad"),
            (self.normalize.is_some(), "--normalize"),
            (self.eval_every.is_some(), "--eval-every"),
            (self.save_every.is_some(), "--save-every"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

fn report(outcome: &TrainOutcome) {
    if outcome.stop == Stop::Finished
        && let Some(e) = outcome.last_eval
    {
        println!(
            "final val top-1 {:.2}%, top-5 {:.2}% ({} images); best {:.2}% at epoch {}; {}",
            e.top1 * 100.0,
            e.top5 * 100.0,
            e.samples,
            outcome.state.best_top1.unwrap_or(0.0) * 100.0,
            outcome.state.best_epoch.unwrap_or(0),
            outcome.run_dir.display()
        );
    }
    if matches!(outcome.stop, Stop::Paused(_)) {
        crate::train::signals::exit_if_paused_by_signal("the run");
    }
}

/// `vicinity train` on backend `B`.
pub fn train_command<B: AutodiffBackend>(args: &TrainArgs, device: &B::Device) -> Result<()> {
    crate::train::signals::install_interrupt_handler();
    // One rank of a job when launched by `vicinity launch`, torchrun or srun; alone otherwise.
    let dist = crate::dist::join(crate::backend::is_cuda::<B>())?;
    // Every rank takes part in the last exchange before rank 0 reports (a pause by a signal
    // exits from the report) and the others leave.
    let finish = |outcome: TrainOutcome| -> Result<()> {
        dist.finish()?;
        if dist.is_main() {
            report(&outcome);
        } else if matches!(outcome.stop, Stop::Paused(_)) {
            crate::train::signals::exit_if_paused_by_signal(&format!("rank {}", dist.rank()));
        }
        Ok(())
    };
    if let Some(dir) = &args.resume {
        let ignored = args.ignored_on_resume();
        if !ignored.is_empty() {
            eprintln!(
                "note: {} ignored with --resume (the run's own settings apply)",
                ignored.join(", ")
            );
        }
        let opts = ResumeOptions {
            data: args.data.clone(),
            skip_bad: args.skip_bad,
            workers: args.workers,
            log_every: args.log_every,
            stop_at_step: args.stop_at_step,
            debug_nan_at_step: args.debug_nan_at_step,
            quiet: false,
        };
        return finish(trainer::resume_on::<B>(dir, opts, device, &dist)?);
    }
    if args.quick {
        if dist.world() > 1 {
            bail!("--quick is a one-process demo; run it without a launcher");
        }
        let budget = args.budget.unwrap_or(90.0);
        let data = PathBuf::from("runs/quick-data");
        eprintln!("quick demo: drawing the shapes dataset in {} ...", data.display());
        demo::write_shapes(&data, demo::QUICK_PER_CLASS, 32)?;
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| crate::train::setup::default_run_dir("quick"));
        let mut cfg = demo::quick_config(data, out, budget);
        if let Some(w) = args.workers {
            cfg.workers = w;
        }
        if let Some(s) = args.seed {
            cfg.seed = s;
        }
        let started = std::time::Instant::now();
        let outcome = trainer::train::<B>(cfg, device)?;
        let e = outcome
            .last_eval
            .context("the demo ended without an evaluation")?;
        println!(
            "quick demo: test accuracy {:.1}% on {} images of {} shape classes (chance {:.1}%) after {} epochs in {}; run dir {}",
            e.top1 * 100.0,
            e.samples,
            demo::SHAPE_CLASSES.len(),
            100.0 / demo::SHAPE_CLASSES.len() as f64,
            outcome.state.history.len(),
            format_duration(started.elapsed().as_secs_f64()),
            outcome.run_dir.display()
        );
        return Ok(());
    }
    let mut cfg = args.to_config()?;
    if dist.world() > 1 {
        // Rank 0 names the run directory for all (the default one carries the time).
        let out = dist
            .collective()
            .broadcast(cfg.out.to_string_lossy().into_owned().into_bytes())?;
        cfg.out = PathBuf::from(String::from_utf8(out).context("the run directory from rank 0")?);
    }
    finish(trainer::train_on::<B>(cfg, device, &dist)?)
}

/// `vicinity eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Native .safetensors (carries its config) or official .pth (needs --model).
    #[arg(long)]
    pub weights: PathBuf,
    /// Registered model name or config file (needed for .pth checkpoints).
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset (as for train).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Square input size (default: the run's, else the model's).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// imagenet, cifar10, cifar100 (default: the run's, else imagenet).
    #[arg(long)]
    pub normalize: Option<String>,
    /// Folder for summary.json, per_class.csv and confusion.csv (default: eval/<weights>-<split>).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Test-time augmentation: average the logits of each image and its mirror image.
    #[arg(long)]
    pub tta_flip: bool,
    /// Leave images that cannot be decoded out (counted in a warning) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
}

/// `vicinity predict`.
#[derive(Args, Debug, Clone)]
pub struct PredictArgs {
    /// Image files (JPEG/PNG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub weights: PathBuf,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Class names: a file with one per line, or cifar10 / cifar100 / indices (default: the
    /// checkpoint's, else CIFAR for 10/100 outputs, else indices).
    #[arg(long)]
    pub classes: Option<String>,
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long)]
    pub normalize: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `vicinity eval` on backend `B`: prints the summary.
pub fn eval_command<B: Backend>(args: &EvalArgs, device: &B::Device) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args
            .weights
            .file_stem()
            .map_or("weights".into(), |s| s.to_string_lossy().into_owned());
        let parent = args
            .weights
            .parent()
            .and_then(|p| p.file_name())
            .map_or(String::new(), |p| format!("{}-", p.to_string_lossy()));
        PathBuf::from("eval").join(format!("{parent}{stem}-{}", args.split))
    });
    let opts = EvalOptions {
        checkpoint: CheckpointInput {
            weights: args.weights.clone(),
            model: args.model.clone(),
            resolution: args.resolution,
            normalize: args.normalize.clone(),
        },
        data: args.data.clone(),
        split: args.split.clone(),
        batch: args.batch,
        out: Some(out),
        workers: args.workers,
        tta_flip: args.tta_flip,
        skip_bad: args.skip_bad,
    };
    print!("{}", inference::eval_checkpoint::<B>(&opts, device)?.text());
    Ok(())
}

/// `vicinity predict` on backend `B`: prints the predictions.
pub fn predict_command<B: Backend>(args: &PredictArgs, device: &B::Device) -> Result<()> {
    let opts = PredictOptions {
        images: args.images.clone(),
        checkpoint: CheckpointInput {
            weights: args.weights.clone(),
            model: args.model.clone(),
            resolution: args.resolution,
            normalize: args.normalize.clone(),
        },
        top: args.top,
        classes: args.classes.clone(),
    };
    let (preds, source) = inference::predict::<B>(&opts, device)?;
    if args.json {
        let json = serde_json::json!({ "class_names": source, "predictions": preds });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", inference::format_predictions(&preds, &source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cifar(resolution: Option<usize>, crop_pad: Option<u32>) -> TrainArgs {
        TrainArgs {
            model: Some("vvt_tiny".into()),
            data: Some("data".into()),
            recipe: Some(Recipe::CifarFast),
            resolution,
            crop_pad,
            ..Default::default()
        }
    }

    fn pad_of(args: &TrainArgs) -> Option<u32> {
        match args.to_config().unwrap().augment.crop {
            Crop::PadCrop { pad, .. } => pad,
            other => panic!("expected pad-crop, got {other:?}"),
        }
    }

    #[test]
    fn resume_names_every_recipe_flag_it_ignores() {
        let args = TrainArgs {
            resume: Some("runs/x".into()),
            mixup: Some(0.2),
            crop_pad: Some(2),
            lr: Some(1e-3),
            workers: Some(2),
            ..Default::default()
        };
        assert_eq!(args.ignored_on_resume(), ["--lr", "--mixup", "--crop-pad"]);
        assert!(TrainArgs::default().ignored_on_resume().is_empty());
    }

    #[test]
    fn pad_crop_shift_follows_the_resolution() {
        // Left to the crop, which takes an eighth of the side it produces (4 at 32², 8 at 64², 28
        // at vvt_tiny's own 224²: `augment::tests::default_pad_is_an_eighth_of_the_side`).
        assert_eq!(pad_of(&cifar(Some(32), None)), None);
        assert_eq!(pad_of(&cifar(None, None)), None);
        assert_eq!(pad_of(&cifar(Some(64), Some(3))), Some(3));
        let mut resize = cifar(Some(64), Some(3));
        resize.crop = Some("resize".into());
        let err = resize.to_config().unwrap_err().to_string();
        assert!(err.contains("--crop-pad"), "{err}");
    }

    /// Values a flag cannot take end in an error naming the flag.
    #[test]
    fn impossible_recipe_values_are_refused_by_flag() {
        type Set = fn(&mut TrainArgs);
        let cases: [(&str, Set); 7] = [
            ("--smoothing", |a| a.smoothing = Some(2.0)),
            ("--hflip", |a| a.hflip = Some(1.5)),
            ("--weight-decay", |a| a.weight_decay = Some(-0.1)),
            ("--mixup", |a| a.mixup = Some(-0.8)),
            ("--cutmix", |a| a.cutmix = Some(f32::NAN)),
            ("--mix-prob", |a| a.mix_prob = Some(1.2)),
            ("--erasing", |a| a.erasing = Some(1.5)),
        ];
        for (flag, set) in cases {
            let mut args = cifar(None, None);
            set(&mut args);
            let err = match args.to_config() {
                Ok(_) => panic!("{flag}: an impossible value was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(flag), "{flag}: {err}");
        }
        assert!(cifar(None, None).to_config().is_ok());
    }
}
