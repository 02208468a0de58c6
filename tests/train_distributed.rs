//! Data-parallel training on the CPU: N ranks as threads of this process (a host all-reduce)
//! take the same steps as one rank with the whole global batch — mixup/cutmix, clipping and EMA
//! included — and a run paused on one world size resumes exactly on another.
//! Alone in their test binary because the CPU backend's random generator (the initial weights)
//! is global to the process; the tests take turns ([`TURN`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vicinity::data::Mixing;
use vicinity::dist::{Dist, Local};
use vicinity::train::checkpoint::read_all_f32;
use vicinity::train::schedule::Warmup;
use vicinity::train::trainer::{ResumeOptions, TrainOutcome, resume_on, train_on};
use vicinity::train::{Recipe, TrainConfig, demo};

type AB = burn::backend::Autodiff<burn::backend::Flex>;

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicinity-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 4 classes × 16 training images and × 5 test images (20 don't split evenly over 3 ranks).
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    let colors = [[200u8, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]];
    for (split, n) in [("train", 16), ("test", 5)] {
        for (class, color) in ["r", "g", "b", "k"].iter().zip(colors) {
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

/// `global` images per step over `world` ranks; mixup and cutmix on every batch, a clip that
/// binds, EMA, no stochastic depth (its masks are drawn per rank).
fn config(data: &Path, out: PathBuf, global: usize, world: usize) -> TrainConfig {
    let mut c = TrainConfig::new(
        Recipe::CifarFast,
        "micro",
        demo::micro_vvt(4),
        data.to_path_buf(),
        out,
    );
    c.batch_size = global / world;
    c.eval_batch_size = 3;
    c.epochs = 2;
    c.lr = 3e-3;
    c.min_lr = 1e-3;
    c.warmup = Warmup::Epochs(0.0);
    c.workers = 1;
    c.log_every = 1;
    c.quiet = true;
    c.drop_path = Some(0.0);
    c.clip = Some(0.5);
    c.ema = Some(0.9);
    c.augment.mixing = Some(Mixing {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        correct_lam: true,
    });
    c
}

/// Runs `f` as every rank of a `world`-rank group of threads; rank 0's outcome.
fn on_ranks(world: usize, f: impl Fn(&Dist) -> TrainOutcome + Sync) -> TrainOutcome {
    std::thread::scope(|s| {
        let handles: Vec<_> = Local::group(world)
            .into_iter()
            .map(|l| {
                let f = &f;
                s.spawn(move || f(&Dist::new(Arc::new(l))))
            })
            .collect();
        let mut outs: Vec<TrainOutcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        outs.swap_remove(0)
    })
}

/// The largest difference between two checkpoints' tensors, relative to the largest value.
fn max_diff(a: &Path, b: &Path, file: &str) -> f32 {
    let (a, b) = (
        read_all_f32(&a.join(file)).unwrap(),
        read_all_f32(&b.join(file)).unwrap(),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (name, (sa, va)) in &a {
        let (sb, vb) = &b[name];
        assert_eq!(sa, sb, "{name}");
        let scale = va.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

fn losses(o: &TrainOutcome) -> Vec<f32> {
    o.step_losses.iter().map(|s| s.1).collect()
}

#[test]
fn n_ranks_take_the_steps_of_one_rank_with_the_whole_batch() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let root = tmp("same");
    let data = dataset(&root);
    let one = train_on::<AB>(
        config(&data, root.join("one"), 16, 1),
        &Default::default(),
        &Dist::solo(),
    )
    .unwrap();
    assert_eq!(one.state.global_step, 8);
    for world in [2, 4] {
        let out = root.join(format!("w{world}"));
        let many = on_ranks(world, |d| {
            train_on::<AB>(config(&data, out.clone(), 16, world), &Default::default(), d).unwrap()
        });
        assert_eq!(many.state.global_step, 8);
        // The global loss of each step, the weights, the averages and the optimizer's moments.
        for (a, b) in losses(&one).iter().zip(losses(&many)) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "world {world}: loss {a} vs {b}"
            );
        }
        for file in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
            // The second moments are squares of small gradients: looser.
            let tol = if file.starts_with("optim") { 2e-3 } else { 1e-4 };
            let d = max_diff(&one.run_dir.join("last"), &many.run_dir.join("last"), file);
            assert!(d < tol, "world {world}: {file} differs by {d}");
        }
        // Evaluation totals over the shards are the whole split's.
        let (e1, en) = (one.last_eval.unwrap(), many.last_eval.unwrap());
        assert_eq!(en.samples, 20);
        assert_eq!(e1.top1, en.top1, "world {world}");
        assert!((e1.loss - en.loss).abs() < 1e-4);
        // Only rank 0 wrote the run.
        assert!(many.run_dir.join("metrics.csv").is_file());
    }
    // The comparison can fail: one rank at the per-rank batch takes other steps.
    let small = train_on::<AB>(
        config(&data, root.join("small"), 8, 1),
        &Default::default(),
        &Dist::solo(),
    )
    .unwrap();
    let d = max_diff(
        &one.run_dir.join("last"),
        &small.run_dir.join("last"),
        "model.safetensors",
    );
    assert!(d > 1e-2, "a different batch left the weights within {d}");
}

#[test]
fn a_run_paused_on_one_rank_resumes_on_two() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let root = tmp("resume");
    let data = dataset(&root);
    let whole = train_on::<AB>(
        config(&data, root.join("whole"), 16, 1),
        &Default::default(),
        &Dist::solo(),
    )
    .unwrap();
    let pause = |name: &str| {
        let mut cfg = config(&data, root.join(name), 16, 1);
        cfg.stop_at_step = Some(3);
        let paused = train_on::<AB>(cfg, &Default::default(), &Dist::solo()).unwrap();
        assert_eq!(paused.state.global_step, 3);
        paused.run_dir
    };
    let dir = pause("paused");
    let resumed = on_ranks(2, |d| {
        let opts = ResumeOptions {
            quiet: true,
            ..Default::default()
        };
        resume_on::<AB>(&dir, opts, &Default::default(), d).unwrap()
    });
    assert_eq!(resumed.state.global_step, 8);
    let d = max_diff(
        &whole.run_dir.join("last"),
        &resumed.run_dir.join("last"),
        "model.safetensors",
    );
    assert!(d < 1e-4, "the resumed run's weights differ by {d}");
    // Three ranks cannot share 16 images per step.
    let err = on_ranks_err(3, &pause("paused-again"));
    assert!(err.contains("cannot share"), "{err}");
}

fn on_ranks_err(world: usize, dir: &Path) -> String {
    std::thread::scope(|s| {
        let handles: Vec<_> = Local::group(world)
            .into_iter()
            .map(|l| {
                s.spawn(move || {
                    let opts = ResumeOptions {
                        quiet: true,
                        ..Default::default()
                    };
                    resume_on::<AB>(dir, opts, &Default::default(), &Dist::new(Arc::new(l)))
                        .err()
                        .map(|e| format!("{e:#}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" | ")
    })
}
