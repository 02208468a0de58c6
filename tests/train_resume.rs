//! An interrupted and resumed run takes exactly the steps of an uninterrupted one: same losses
//! (bit for bit on the CPU), same final weights, EMA and optimizer state, also with a Performer
//! stage, whose random features are redrawn every training step; and so does a segmentation run.
//! Alone in their test binary because the CPU backend's random generator (drop-path, dropout) is
//! global to the process; the two tests take turns ([`TURN`]).

use std::path::{Path, PathBuf};

use vicinity::attention::AttentionKind;
use vicinity::data::synth::{Encoding, write_image_folder};
use vicinity::data::{Mixing, RandAugment};
use vicinity::models::{ModelConfig, PerStage};
use vicinity::train::schedule::Warmup;
use vicinity::train::{Recipe, ResumeOptions, Stop, TrainConfig, demo, resume, train};

type AB = burn::backend::Autodiff<burn::backend::Flex>;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicinity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(data: &Path, out: PathBuf) -> TrainConfig {
    // Stage 2 has Performer attention, whose training forwards redraw their random features.
    let mut model = demo::micro_vvt(3);
    let ModelConfig::Vvt(vvt) = &mut model else {
        unreachable!("micro_vvt is a VVT")
    };
    let mut kinds = vec![AttentionKind::Vicinity; vvt.num_stages()];
    kinds[1] = AttentionKind::Performer;
    vvt.attention = PerStage::Each(kinds);
    let mut c = TrainConfig::new(Recipe::CifarFast, "micro", model, data.to_path_buf(), out);
    // Every random part on: drop-path (backend RNG), Mixup/CutMix, RandAugment, flips, crops.
    c.augment.mixing = Some(Mixing::timm());
    c.augment.rand_augment = Some(RandAugment::m9_mstd05_inc1());
    c.drop_path = Some(0.2);
    c.ema = Some(0.9);
    c.batch_size = 8;
    c.eval_batch_size = 16;
    c.epochs = 2;
    c.warmup = Warmup::Fraction(0.25);
    c.workers = 2;
    c.log_every = 1;
    c.seed = 7;
    c.quiet = true;
    c
}

/// Every tensor of a safetensors file as (name, shape, bit patterns); metadata order may differ.
fn tensors(p: &Path) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    vicinity::train::checkpoint::read_all_f32(p)
        .unwrap()
        .into_iter()
        .map(|(k, (shape, v))| (k, shape, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// One test at a time: both draw from the backend's global generator.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn interrupted_then_resumed_equals_uninterrupted() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmp("resume");
    let data = root.join("data");
    write_image_folder(
        &data,
        &["train", "val"],
        &["a", "b", "c"],
        11,
        [32, 32],
        Encoding::Png,
    )
    .unwrap();
    let device = Default::default();

    // 33 images, batch 8 → 4 steps per epoch, 8 steps in all.
    let full = train::<AB>(config(&data, root.join("full")), &device).unwrap();
    assert_eq!(full.stop, Stop::Finished);
    assert_eq!(full.step_losses.len(), 8);

    // Pause right after the last batch of epoch 1 (before its evaluation), then mid-epoch 2
    // (after step 6 of 8), then run to the end; a new process would start with a fresh random
    // generator, so scramble this one's before each resume.
    let mut cfg = config(&data, root.join("split"));
    cfg.stop_at_step = Some(4);
    let first = train::<AB>(cfg, &device).unwrap();
    assert_eq!(first.stop, Stop::Paused(4));
    assert_eq!((first.state.epoch, first.state.batch), (0, 4));
    assert!(first.state.history.is_empty());
    <AB as burn::prelude::Backend>::seed(&device, 12345);
    let opts = |stop| ResumeOptions {
        quiet: true,
        stop_at_step: stop,
        ..Default::default()
    };
    let middle = resume::<AB>(&root.join("split"), opts(Some(6)), &device).unwrap();
    assert_eq!(middle.stop, Stop::Paused(6));
    assert_eq!((middle.state.epoch, middle.state.batch), (1, 2));
    assert_eq!(
        middle.state.history.len(),
        1,
        "epoch 1 ended in the resumed session"
    );
    <AB as burn::prelude::Backend>::seed(&device, 999);
    let second = resume::<AB>(&root.join("split"), opts(None), &device).unwrap();
    assert_eq!(second.stop, Stop::Finished);

    let joined: Vec<(u64, f32)> = first
        .step_losses
        .iter()
        .chain(&middle.step_losses)
        .chain(&second.step_losses)
        .copied()
        .collect();
    assert_eq!(joined.len(), 8);
    for ((s1, l1), (s2, l2)) in full.step_losses.iter().zip(&joined) {
        assert_eq!(s1, s2);
        assert_eq!(
            l1.to_bits(),
            l2.to_bits(),
            "step {s1}: {l1} vs {l2} (full vs resumed)"
        );
    }
    // The same final weights, EMA weights and optimizer state, and the same history.
    for f in ["model.safetensors", "ema.safetensors", "optim.safetensors"] {
        let (a, b) = (
            tensors(&root.join("full/last").join(f)),
            tensors(&root.join("split/last").join(f)),
        );
        assert!(!a.is_empty());
        assert!(
            a == b,
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    let (h1, h2) = (&full.state.history, &second.state.history);
    assert_eq!(h1.len(), 2);
    assert_eq!(h1.len(), h2.len());
    for (a, b) in h1.iter().zip(h2) {
        // (The history went through JSON in the resumed run: equal up to float printing.)
        let close = |x: Option<f64>, y: Option<f64>| (x.unwrap() - y.unwrap()).abs() < 1e-12;
        assert_eq!((a.epoch, a.step), (b.epoch, b.step));
        assert!(
            close(a.val_top1, b.val_top1) && close(a.ema_top1, b.ema_top1),
            "{a:?} vs {b:?}"
        );
        assert!(close(Some(a.train_loss), Some(b.train_loss)), "{a:?} vs {b:?}");
    }
    // Resuming a finished run does nothing.
    let again = resume::<AB>(&root.join("split"), opts(None), &device).unwrap();
    assert_eq!(again.stop, Stop::Finished);
    assert!(again.step_losses.is_empty());
    let _ = std::fs::remove_dir_all(&root);
}

/// A segmentation run (UPerNet: dropout in both heads, the auxiliary loss, random crops, flips
/// and photometric distortion) paused at step 3 and resumed ends where the uninterrupted one does.
#[test]
fn segmentation_interrupted_then_resumed_equals_uninterrupted() {
    use vicinity::segment::SegmenterConfig;
    use vicinity::segment::compose::{ComposeOptions, compose, write_idx};
    use vicinity::segment::train::{SegTrainConfig, resume as seg_resume, train as seg_train};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmp("seg-resume");
    // Garments: 28×28 squares of grey noise, so masks have ragged edges.
    let idx = root.join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    let n = 20;
    let images: Vec<u8> = (0..n * 28 * 28).map(|i| ((i * 7919) % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    write_idx(&idx, "train", &images, &labels, 28).unwrap();
    write_idx(&idx, "t10k", &images, &labels, 28).unwrap();
    let data = root.join("data");
    compose(&ComposeOptions {
        source: idx,
        out: data.clone(),
        train: 8,
        val: 2,
        size: 64,
        seed: 3,
    })
    .unwrap();
    let model_file = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/upernet_vvt_mini.json");
    let config = |out: PathBuf| {
        let mut c = SegTrainConfig::new(
            "upernet_vvt_mini",
            SegmenterConfig::resolve(model_file, 11).unwrap(),
            data.clone(),
            out,
        );
        (c.train_split, c.val_split) = ("train".into(), "val".into());
        (c.iters, c.batch, c.eval_every, c.save_every, c.log_every) = (6, 2, 3, 2, 1);
        (c.pipeline.crop, c.pipeline.scale) = (32, (128, 32));
        (c.eval.scale, c.lr, c.seed, c.quiet) = ((128, 64), 1e-3, 11, true);
        c
    };
    let device = Default::default();
    let full = seg_train::<AB>(config(root.join("full")), None, &device).unwrap();
    assert!(full.finished);
    let first = seg_train::<AB>(config(root.join("split")), Some(3), &device).unwrap();
    assert!(!first.finished);
    assert_eq!(first.state.iter, 3);
    let second = seg_resume::<AB>(&root.join("split"), None, true, None, &device).unwrap();
    assert!(second.finished);
    let losses: Vec<(u64, f32)> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(full.losses.len(), 6);
    assert_eq!(
        full.losses, losses,
        "the losses differ between the uninterrupted and the resumed run"
    );
    for f in ["model.safetensors", "optim.safetensors"] {
        let (a, b) = (
            tensors(&root.join("full/last").join(f)),
            tensors(&root.join("split/last").join(f)),
        );
        assert!(!a.is_empty());
        assert!(
            a == b,
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    let (h1, h2) = (&full.state.history, &second.state.history);
    assert_eq!(h1.len(), 2);
    assert_eq!((h1[1].iter, h1[1].miou), (h2[1].iter, h2[1].miou));
    let _ = std::fs::remove_dir_all(&root);
}
