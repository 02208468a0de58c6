//! An interrupted and resumed run takes exactly the steps of an uninterrupted one: same losses
//! (bit for bit on the CPU), same final weights, EMA and optimizer state, also with a Performer
//! stage, whose random features are redrawn every training step. Alone in its test binary
//! because the CPU backend's random generator (drop-path) is global to the process.

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

#[test]
fn interrupted_then_resumed_equals_uninterrupted() {
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
