//! End-to-end training runs on tiny synthetic data (CPU): the loss falls, the run directory holds
//! checkpoints, metrics and the chart; a NaN stops the run and leaves the last good checkpoint
//! loadable; `eval` and `predict` read the checkpoints (native and official).

use std::path::{Path, PathBuf};

use vicinity::data::synth::{Encoding, write_image_folder};
use vicinity::models::{self, Model};
use vicinity::train::checkpoint::{MODEL_FILE, RunState};
use vicinity::train::inference::{self, CheckpointInput, ClassSource, EvalOptions, PredictOptions};
use vicinity::train::schedule::Warmup;
use vicinity::train::{Recipe, Stop, TrainConfig, demo, train};

type B = burn::backend::Flex;
type AB = burn::backend::Autodiff<B>;

const CLASSES: [&str; 4] = ["red", "green", "blue", "grey"];

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicinity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 4 classes × 16 images (train) and × 4 (test), 32×32 PNG: a noisy class colour.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    let colors = [[200u8, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]];
    for (split, n) in [("train", 16), ("test", 4)] {
        for (class, color) in CLASSES.iter().zip(colors) {
            let dir = data.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    let h = (x * 7 + y * 13 + i * 31) % 41;
                    image::Rgb(color.map(|c| c.saturating_add(h as u8).saturating_sub(20)))
                });
                img.save(dir.join(format!("{i:04}.png"))).unwrap();
            }
        }
    }
    data
}

fn config(root: &Path, data: PathBuf) -> TrainConfig {
    let mut c = TrainConfig::new(
        Recipe::CifarFast,
        "micro",
        demo::micro_vvt(4),
        data,
        root.join("run"),
    );
    c.batch_size = 16;
    c.eval_batch_size = 8;
    c.epochs = 3;
    c.lr = 3e-3;
    c.min_lr = 3e-3;
    c.warmup = Warmup::Epochs(0.0);
    c.workers = 2;
    c.log_every = 1;
    c.quiet = true;
    c
}

#[test]
fn a_small_model_learns_and_the_run_directory_is_complete() {
    let root = tmp("learn");
    let data = dataset(&root);
    let mut cfg = config(&root, data.clone());
    cfg.epochs = 4;
    cfg.ema = Some(0.9);
    let out = train::<AB>(cfg, &Default::default()).unwrap();
    assert_eq!(out.stop, Stop::Finished);
    assert_eq!(out.state.global_step, 16);
    let losses: Vec<f32> = out.step_losses.iter().map(|s| s.1).collect();
    assert_eq!(losses.len(), 16);
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[12..].iter().sum::<f32>() / 4.0;
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");
    let h = &out.state.history;
    assert_eq!(h.len(), 4);
    assert!(h.iter().all(|m| m.val_top1.is_some() && m.ema_top1.is_some()));
    // The wait for batches is part of the epoch's training time.
    assert!(
        h.iter()
            .all(|m| m.data_wait_s >= 0.0 && m.data_wait_s <= m.epoch_s),
        "{h:?}"
    );
    let run = &out.run_dir;
    for f in [
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "curves.png",
        "last/state.json",
        "last/model.safetensors",
        "last/ema.safetensors",
        "last/optim.safetensors",
        "best/model.safetensors",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("epoch,step,train_loss,val_loss,val_top1,val_top5"));
    assert!(
        csv.lines().next().unwrap().ends_with(",img_per_s,data_wait_s"),
        "{csv}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    let png = image::open(run.join("curves.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    let state = RunState::read(&run.join("last")).unwrap();
    assert!(state.finished);
    let mut sorted: Vec<String> = CLASSES.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    assert_eq!(state.classes, sorted, "ImageFolder classes in sorted order");

    // eval on the best checkpoint reproduces the run's own number for that epoch.
    let best = RunState::read(&run.join("best")).unwrap();
    let best_epoch = best.best_epoch.unwrap();
    let opts = EvalOptions {
        checkpoint: CheckpointInput {
            weights: run.join("best").join(MODEL_FILE),
            model: None,
            resolution: None,
            normalize: None,
        },
        data: data.clone(),
        split: "test".into(),
        batch: 5,
        out: Some(root.join("eval")),
        workers: 1,
        tta_flip: false,
        skip_bad: false,
    };
    let report = inference::eval_checkpoint::<B>(&opts, &Default::default()).unwrap();
    let expected = h[best_epoch - 1].val_top1.unwrap();
    assert!(
        (report.summary.top1 - expected).abs() < 1e-9,
        "{} vs {expected}",
        report.summary.top1
    );
    assert_eq!(report.summary.samples, 16);
    let confusion = std::fs::read_to_string(root.join("eval/confusion.csv")).unwrap();
    assert_eq!(confusion.lines().count(), 5);
    assert!(root.join("eval/per_class.csv").is_file() && root.join("eval/summary.json").is_file());
    // The mirror-image TTA evaluates every image twice; its report says so.
    let tta = inference::eval_checkpoint::<B>(
        &EvalOptions {
            tta_flip: true,
            skip_bad: false,
            out: None,
            ..opts
        },
        &Default::default(),
    )
    .unwrap();
    assert!(tta.tta_flip && tta.summary.samples == 16);
    assert!(tta.summary.loss.is_finite());

    // predict: class names from the checkpoint, probabilities sorted.
    let img = data.join("test").join("blue").join("0000.png");
    let popts = PredictOptions {
        images: vec![img.clone(), img],
        checkpoint: CheckpointInput {
            weights: run.join("last").join(MODEL_FILE),
            model: None,
            resolution: None,
            normalize: None,
        },
        top: 3,
        classes: None,
    };
    let (preds, source) = inference::predict::<B>(&popts, &Default::default()).unwrap();
    assert_eq!(source, ClassSource::Checkpoint);
    assert_eq!(preds.len(), 2);
    let top = &preds[0].top;
    assert_eq!(top.len(), 3);
    assert!(top.windows(2).all(|w| w[0].probability >= w[1].probability));
    assert!(top.iter().all(|t| CLASSES.contains(&t.name.as_str())));
    assert_eq!(preds[0].top, preds[1].top, "same image, same answer");
    let text = inference::format_predictions(&preds, &source);
    assert!(!text.contains("note:"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let root = tmp("nan");
    let data = dataset(&root);
    let mut cfg = config(&root, data);
    cfg.log_every = 3;
    // Step index 6 (the 7th step, in epoch 2) gets NaN images.
    cfg.debug_nan_at_step = Some(6);
    let err = train::<AB>(cfg, &Default::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("the loss is NaN at step 7 (epoch 2, batch 3 of 4)"),
        "{msg}"
    );
    assert!(msg.contains("untouched"), "{msg}");
    let run = root.join("run");
    let state = RunState::read(&run.join("last")).unwrap();
    assert_eq!(
        (state.global_step, state.epoch, state.batch),
        (4, 1, 0),
        "the epoch-1 checkpoint"
    );
    assert!(!state.finished);
    let model: Model<B> = state.model.init(&Default::default()).unwrap();
    let model = vicinity::weights::load_native(model, &run.join("last").join(MODEL_FILE)).unwrap();
    for (name, t) in vicinity::train::params::collect_flat(&model) {
        let v: Vec<f32> = t.into_data().to_vec().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn eval_reads_an_official_checkpoint_with_its_model() {
    let weights = crate::common::fixtures_dir().join("vvt_mini.pth");
    let root = tmp("official");
    let classes: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = classes.iter().map(String::as_str).collect();
    write_image_folder(&root.join("data"), &["test"], &refs, 2, [32, 32], Encoding::Jpeg).unwrap();
    let mut opts = EvalOptions {
        checkpoint: CheckpointInput {
            weights: weights.clone(),
            model: None,
            resolution: Some(32),
            normalize: None,
        },
        data: root.join("data"),
        split: "test".into(),
        batch: 8,
        out: None,
        workers: 1,
        tta_flip: false,
        skip_bad: false,
    };
    let err = inference::eval_checkpoint::<B>(&opts, &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("--model"), "{err:#}");
    opts.checkpoint.model = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/vvt_mini.json").into());
    let report = inference::eval_checkpoint::<B>(&opts, &Default::default()).unwrap();
    assert_eq!(report.summary.samples, 20);
    assert_eq!(report.accumulator.confusion.iter().sum::<u64>(), 20);
    assert!(report.summary.loss.is_finite());
    assert!(report.summary.top5 >= report.summary.top1);
    // predict with the official weights: 10 outputs and no run state → CIFAR-10 names assumed.
    let popts = PredictOptions {
        images: vec![root.join("data/test/c3/0000.jpg")],
        checkpoint: CheckpointInput {
            weights,
            resolution: Some(32),
            ..opts.checkpoint.clone()
        },
        top: 5,
        classes: None,
    };
    let (preds, source) = inference::predict::<B>(&popts, &Default::default()).unwrap();
    assert_eq!(source, ClassSource::Assumed("CIFAR-10".into()));
    let sum: f32 = preds[0].top.iter().map(|t| t.probability).sum();
    assert!(sum > 0.0 && sum <= 1.0 + 1e-5);
    assert!(models::MODEL_NAMES.contains(&"vvt_tiny"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_budget_sizes_the_schedule_and_the_run_ends_within_it() {
    let root = tmp("budget");
    let data = dataset(&root);
    let mut cfg = config(&root, data);
    // 10 s: under CI's load (57 tests on 2 cores) a 6 s budget once fitted a single epoch.
    cfg.budget_s = Some(10.0);
    cfg.min_lr = 0.0;
    cfg.warmup = Warmup::Fraction(0.05);
    cfg.log_every = 4;
    let start = std::time::Instant::now();
    let out = train::<AB>(cfg, &Default::default()).unwrap();
    let took = start.elapsed().as_secs_f64();
    assert_eq!(out.stop, Stop::Finished);
    assert!(took <= 10.0 + 1.0, "a 10 s budget took {took:.2} s");
    // The plan keeps ~2.5 s free at the end (margin, final checkpoint); a run that stopped after
    // its first epoch or sized itself from a wrong speed would end far earlier.
    assert!(took >= 5.0, "a 10 s budget used only {took:.2} s");
    let s = &out.state;
    assert!(
        s.epochs >= 2,
        "several epochs of 4 steps fit in 10 s: {}",
        s.epochs
    );
    // Re-sized after every epoch, the schedule ends inside its last planned epoch: after the end
    // of the epoch before it and at most one epoch later. (A re-size that shrank the run into a
    // partial epoch and a later one that grew it again leave a short epoch mid-run, so the count
    // is taken from the history, not from `epochs × steps`; when the deadline stopped the run
    // before its last planned epoch began, that epoch is missing from the history.)
    let spe = s.steps_per_epoch as u64;
    let ends: Vec<u64> = s.history.iter().map(|m| m.step).collect();
    assert!(
        ends.len() == s.epochs || ends.len() + 1 == s.epochs,
        "{} epochs planned, ran {ends:?}",
        s.epochs
    );
    let before_last = match ends.len() == s.epochs {
        true => ends.len().checked_sub(2).map_or(0, |i| ends[i]),
        false => ends.last().copied().unwrap_or(0),
    };
    let total = s.schedule.total_steps;
    assert!(
        total > before_last && total <= before_last + spe,
        "{total} steps for {} epochs of {spe}; steps at each epoch end: {ends:?}",
        s.epochs
    );
    assert_eq!(
        s.schedule.warmup_steps,
        (0.05 * s.schedule.total_steps as f64).round() as u64
    );
    // Either the whole sized schedule ran (lr annealed to the floor), or the run stopped early
    // to stay in budget.
    if s.global_step == s.schedule.total_steps {
        assert_eq!(s.history.len(), s.epochs);
        assert!(s.history.last().unwrap().lr < 1e-9);
    }
    assert!(out.last_eval.is_some(), "the run ends with an evaluation");
    let _ = std::fs::remove_dir_all(&root);
}
