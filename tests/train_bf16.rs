//! `--dtype bf16` on the CPU backend (which computes in bf16 too): the model runs in bf16 while
//! the optimizer keeps f32 master weights, so saved weights are f32 with more precision than bf16,
//! the loss falls, and a bf16 run resumes. Alone in its binary because the default float type is
//! set once per device and process.

use std::path::PathBuf;

use vicinity::train::schedule::Warmup;
use vicinity::train::{Dtype, Recipe, ResumeOptions, Stop, TrainConfig, demo, resume, train};

type AB = burn::backend::Autodiff<burn::backend::Flex>;

#[test]
fn bf16_training_keeps_f32_master_weights() {
    let root = std::env::temp_dir().join(format!("vicinity-bf16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let colors = [[220u8, 30, 30], [30, 220, 30], [30, 30, 220]];
    for (split, n) in [("train", 16u32), ("test", 4)] {
        for (c, color) in colors.iter().enumerate() {
            let dir = data.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    let h = ((x * 7 + y * 13 + i * 31) % 41) as u8;
                    image::Rgb(color.map(|v| v.saturating_add(h).saturating_sub(20)))
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let out: PathBuf = root.join("run");
    let mut c = TrainConfig::new(Recipe::CifarFast, "micro", demo::micro_vvt(3), data, out.clone());
    c.dtype = Dtype::Bf16;
    c.batch_size = 16;
    c.eval_batch_size = 12;
    c.epochs = 4;
    c.lr = 3e-3;
    c.min_lr = 3e-3;
    c.warmup = Warmup::Epochs(0.0);
    c.workers = 2;
    c.log_every = 1;
    c.quiet = true;
    c.stop_at_step = Some(6);
    let device = Default::default();
    let first = train::<AB>(c, &device).unwrap();
    assert_eq!(first.stop, Stop::Paused(6));
    let opts = ResumeOptions {
        quiet: true,
        ..Default::default()
    };
    let second = resume::<AB>(&out, opts, &device).unwrap();
    // The device computes in bf16 by default now (what the model ran in).
    let probe = burn::tensor::Tensor::<AB, 1>::zeros([1], &device);
    assert_eq!(probe.dtype(), burn::tensor::DType::BF16);
    assert_eq!(second.stop, Stop::Finished);
    let losses: Vec<f32> = first
        .step_losses
        .iter()
        .chain(&second.step_losses)
        .map(|s| s.1)
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let (a, b) = (losses[..3].iter().sum::<f32>(), losses[9..].iter().sum::<f32>());
    assert!(b < 0.8 * a, "bf16 loss did not fall: {losses:?}");
    // Saved weights are the f32 master copy: many values are not bf16-representable.
    let weights = vicinity::train::checkpoint::read_all_f32(&out.join("last/model.safetensors")).unwrap();
    let (mut total, mut beyond_bf16) = (0usize, 0usize);
    for (_, (_, v)) in weights {
        total += v.len();
        beyond_bf16 += v.iter().filter(|x| x.to_bits() & 0xffff != 0).count();
    }
    assert!(
        beyond_bf16 > total / 2,
        "{beyond_bf16} of {total} weights carry f32 precision"
    );
    let _ = std::fs::remove_dir_all(&root);
}
