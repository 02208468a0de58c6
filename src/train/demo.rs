//! `vicinity train --quick`: a real training job that needs no download and no GPU. It draws a
//! small dataset of coloured shapes and textures (8 classes; colours, positions and sizes are
//! random, so only the shape tells the class), trains a tiny VVT on it within a wall-clock budget
//! and reports the test accuracy.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

use super::config::{Recipe, TrainConfig};
use crate::attention::Locality;
use crate::data::Normalize;
use crate::data::rng::Rng;
use crate::models::{ModelConfig, VvtConfig};

/// The classes of the shapes dataset.
pub const SHAPE_CLASSES: [&str; 8] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "h_stripes",
    "v_stripes",
    "checker",
];

/// Images per class in the train and test splits of the quick demo.
pub const QUICK_PER_CLASS: (usize, usize) = (320, 80);

/// One `size×size` picture of class `label`; a pure function of (label, seed).
pub fn shape_image(label: usize, size: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ label as u64);
    // Random hues; a dark background and a bright foreground.
    let bg: [f64; 3] = std::array::from_fn(|_| rng.range(0.0, 110.0));
    let fg: [f64; 3] = std::array::from_fn(|_| rng.range(150.0, 255.0));
    let s = size as f64;
    let r = rng.range(0.22, 0.4) * s; // half-size of the shape
    let cx = rng.range(r, s - r);
    let cy = rng.range(r, s - r);
    let period = rng.range(3.0, 6.0);
    let noise = 18.0;
    RgbImage::from_fn(size, size, |x, y| {
        let (px, py) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
        let d = (px * px + py * py).sqrt();
        let in_box = px.abs() <= r && py.abs() <= r;
        let inside = match label {
            0 => d <= r,
            1 => px.abs() <= r * 0.8 && py.abs() <= r * 0.8,
            2 => py <= r * 0.8 && py >= -r && px.abs() <= (py + r) * 0.55,
            3 => (px.abs() <= r * 0.28 && py.abs() <= r) || (py.abs() <= r * 0.28 && px.abs() <= r),
            4 => d <= r && d >= r * 0.6,
            5 => in_box && ((py + r) / period).floor() as i64 % 2 == 0,
            6 => in_box && ((px + r) / period).floor() as i64 % 2 == 0,
            _ => in_box && (((px + r) / period).floor() as i64 + ((py + r) / period).floor() as i64) % 2 == 0,
        };
        let base = if inside { fg } else { bg };
        let h = hash(seed, label as u64, (y * size + x) as u64);
        Rgb(std::array::from_fn(|c| {
            let n = ((h >> (c * 8)) & 0xff) as f64 / 255.0 - 0.5;
            (base[c] + 2.0 * noise * n).clamp(0.0, 255.0) as u8
        }))
    })
}

fn hash(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `root/{train,test}/<class>/NNNN.png` (skipped when a complete tree is already there).
pub fn write_shapes(root: &Path, per_class: (usize, usize), size: u32) -> Result<()> {
    let marker = root.join(".complete");
    if marker.exists() {
        return Ok(());
    }
    for (split, n, offset) in [("train", per_class.0, 0u64), ("test", per_class.1, 1 << 32)] {
        for (label, class) in SHAPE_CLASSES.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            for i in 0..n {
                let img = shape_image(label, size, offset + i as u64);
                let path = dir.join(format!("{i:04}.png"));
                img.save(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
    }
    std::fs::write(&marker, b"")?;
    Ok(())
}

/// A four-stage, one-block-per-stage VVT at 32×32 with the given widths and heads.
fn small_vvt(embed_dims: [usize; 4], heads: [usize; 4], drop_path: f64, classes: usize) -> ModelConfig {
    ModelConfig::Vvt(VvtConfig {
        embed_dims: embed_dims.to_vec(),
        heads: heads.to_vec(),
        mlp_ratios: vec![2, 2, 2, 2],
        depths: vec![1, 1, 1, 1],
        sr_ratios: vec![1, 1, 1, 1],
        fr_ratios: vec![2, 2, 2, 2],
        se_ratio: 1,
        num_classes: classes,
        attention: Default::default(),
        locality: Locality::TwoD,
        clamp: true,
        fpc: true,
        performer_features: 64,
        linformer_k: 64,
        overlap_patch_embed: true,
        conv_mlp: true,
        drop_path,
        img_size: 32,
        in_chans: 3,
    })
}

/// The tiny VVT of the demo (4 stages, one block each; ~0.1M parameters at 8 classes).
pub fn tiny_vvt(classes: usize) -> ModelConfig {
    small_vvt([16, 32, 48, 64], [1, 2, 3, 4], 0.0, classes)
}

/// The demo's configuration: shapes in `data`, the run in `out`, sized to `budget_s` seconds.
pub fn quick_config(data: PathBuf, out: PathBuf, budget_s: f64) -> TrainConfig {
    let mut cfg = TrainConfig::new(
        Recipe::CifarFast,
        "quick-vvt",
        tiny_vvt(SHAPE_CLASSES.len()),
        data,
        out,
    );
    cfg.val_split = "test".into();
    cfg.resolution = Some(32);
    cfg.batch_size = 64;
    cfg.eval_batch_size = 200;
    cfg.drop_path = Some(0.0);
    cfg.budget_s = Some(budget_s);
    cfg.augment.normalize = Normalize {
        mean: [0.5, 0.5, 0.5],
        std: [0.29, 0.29, 0.29],
    };
    cfg
}

/// A micro VVT for tests and smoke runs (~10k parameters at 32×32).
pub fn micro_vvt(classes: usize) -> ModelConfig {
    small_vvt([8, 16, 16, 16], [1, 1, 1, 1], 0.1, classes)
}
