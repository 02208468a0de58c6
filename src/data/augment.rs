//! Per-sample transforms: crop/resize, flip, RandAugment, normalisation, random erasing.
//!
//! The train recipe follows timm's `create_transform` (as used by DeiT, VVT and LSAGT):
//! RandomResizedCrop → horizontal flip → RandAugment → to tensor → normalise → RandomErasing;
//! Mixup/CutMix and label smoothing act on whole batches (see [`super::mix`]). Every part is
//! switchable in [`AugmentConfig`], and every random draw comes from the sample's own [`Rng`],
//! so the output is a pure function of (seed, epoch, sample index).

use image::imageops;
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::randaugment::{RandAugment, rand_augment};
use super::resample;
use super::rng::Rng;

/// Spatial transform to the output size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Crop {
    /// Resize to the output size (nothing at all when the size already matches).
    Resize,
    /// Resize the shorter side to `size / crop_pct`, then take the centre (timm's eval).
    CenterCrop { crop_pct: f32 },
    /// timm's RandomResizedCrop: a random area fraction in `scale` and log-uniform aspect
    /// ratio in `ratio`, resized to the output size.
    RandomResized { scale: [f32; 2], ratio: [f32; 2] },
    /// Resize to the output size, pad every side by `pad` (mirror-reflected, or zeros), and take
    /// a random crop of the output size: the usual CIFAR recipe. No `pad`: an eighth of the
    /// shorter side, CIFAR's 4 pixels at 32² and the same share of the image at other sizes.
    PadCrop {
        #[serde(default)]
        pad: Option<u32>,
        reflect: bool,
    },
}

/// Resampling filter for resizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// What fills an erased rectangle (timm's RandomErasing modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EraseMode {
    /// Zeros (the normalised mean).
    Const,
    /// One normal draw per channel.
    Rand,
    /// One normal draw per pixel and channel.
    Pixel,
}

/// timm's RandomErasing, applied to the normalised image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomErasing {
    pub prob: f32,
    pub mode: EraseMode,
    /// Erased area as a fraction of the image, drawn uniformly in [min_area, max_area].
    pub min_area: f32,
    pub max_area: f32,
    /// Aspect ratio drawn log-uniformly in [min_aspect, 1/min_aspect].
    pub min_aspect: f32,
}

impl RandomErasing {
    /// timm's defaults with `--reprob 0.25 --remode pixel`.
    pub fn timm(prob: f32) -> Self {
        RandomErasing {
            prob,
            mode: EraseMode::Pixel,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
        }
    }
}

/// Batch mixing as timm's `Mixup` (mode 'batch'): see [`super::mix`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mixing {
    /// Beta(α, α) for Mixup; 0 disables Mixup.
    pub mixup_alpha: f32,
    /// Beta(α, α) for CutMix; 0 disables CutMix.
    pub cutmix_alpha: f32,
    /// Probability that a batch is mixed at all.
    pub prob: f32,
    /// Probability of CutMix instead of Mixup when both are enabled.
    pub switch_prob: f32,
    /// Recompute λ from the clipped CutMix box area (timm's `correct_lam`).
    pub correct_lam: bool,
}

impl Mixing {
    /// DeiT/timm: mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5.
    pub fn timm() -> Self {
        Mixing {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            correct_lam: true,
        }
    }
}

/// Per-channel normalisation `(x/255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// CIFAR-10 training-set statistics.
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };
    /// CIFAR-100 training-set statistics.
    pub const CIFAR100: Normalize = Normalize {
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };
}

/// The whole augmentation recipe; each part can be switched off independently.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    pub crop: Crop,
    pub interpolation: Interpolation,
    /// Horizontal flip probability (0 = off).
    pub hflip: f32,
    pub rand_augment: Option<RandAugment>,
    pub random_erasing: Option<RandomErasing>,
    pub mixing: Option<Mixing>,
    /// Label smoothing ε (0 = off): targets ε/K off-class, 1-ε+ε/K on-class.
    pub label_smoothing: f32,
    pub normalize: Normalize,
}

impl AugmentConfig {
    /// The papers' (DeiT/timm) recipe: RandomResizedCrop (0.08-1, 3/4-4/3, bicubic), flip 0.5,
    /// rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel), Mixup 0.8 / CutMix 1.0 (switch 0.5),
    /// label smoothing 0.1, ImageNet mean/std.
    pub fn papers() -> Self {
        AugmentConfig {
            crop: Crop::RandomResized {
                scale: [0.08, 1.0],
                ratio: [3.0 / 4.0, 4.0 / 3.0],
            },
            interpolation: Interpolation::Bicubic,
            hflip: 0.5,
            rand_augment: Some(RandAugment::m9_mstd05_inc1()),
            random_erasing: Some(RandomErasing::timm(0.25)),
            mixing: Some(Mixing::timm()),
            label_smoothing: 0.1,
            normalize: Normalize::IMAGENET,
        }
    }

    /// The fast CIFAR recipe: reflect-pad an eighth of the side (4 at 32²) + random crop, flip 0.5,
    /// CIFAR-10 mean/std.
    pub fn cifar_fast() -> Self {
        AugmentConfig {
            crop: Crop::PadCrop {
                pad: None,
                reflect: true,
            },
            interpolation: Interpolation::Bilinear,
            hflip: 0.5,
            rand_augment: None,
            random_erasing: None,
            mixing: None,
            label_smoothing: 0.0,
            normalize: Normalize::CIFAR10,
        }
    }

    /// Evaluation: resize to the input size (identity when it matches), normalise, nothing random.
    pub fn eval(normalize: Normalize) -> Self {
        AugmentConfig {
            crop: Crop::Resize,
            interpolation: Interpolation::Bicubic,
            hflip: 0.0,
            rand_augment: None,
            random_erasing: None,
            mixing: None,
            label_smoothing: 0.0,
            normalize,
        }
    }

    /// timm-style evaluation: resize the shorter side to `size / crop_pct`, centre crop.
    pub fn eval_center(crop_pct: f32, normalize: Normalize) -> Self {
        AugmentConfig {
            crop: Crop::CenterCrop { crop_pct },
            ..Self::eval(normalize)
        }
    }

    /// Whether batches carry soft targets (mixing or label smoothing on).
    pub fn soft_targets(&self) -> bool {
        self.mixing.is_some() || self.label_smoothing > 0.0
    }
}

/// Decoded image → normalised CHW floats in `out` (len 3·H·W), applying the per-sample part of
/// the recipe with draws from `rng`.
pub fn transform_sample(
    img: RgbImage,
    cfg: &AugmentConfig,
    size: [usize; 2],
    rng: &mut Rng,
    out: &mut [f32],
) {
    let [h, w] = size;
    let mut img = spatial(img, &cfg.crop, cfg.interpolation, size, rng);
    if cfg.hflip > 0.0 && rng.chance(cfg.hflip as f64) {
        imageops::flip_horizontal_in_place(&mut img);
    }
    if let Some(ra) = &cfg.rand_augment {
        let fill = cfg
            .normalize
            .mean
            .map(|m| (255.0 * m).round().clamp(0.0, 255.0) as u8);
        rand_augment(&mut img, ra, fill, rng);
    }
    to_chw(&img, &cfg.normalize, out);
    if let Some(re) = &cfg.random_erasing {
        random_erase(out, h, w, re, rng);
    }
}

/// Crop/resize `img` to `size` = [H, W] as configured.
pub fn spatial(
    img: RgbImage,
    crop: &Crop,
    interp: Interpolation,
    size: [usize; 2],
    rng: &mut Rng,
) -> RgbImage {
    let (oh, ow) = (size[0] as u32, size[1] as u32);
    let fit = |img: RgbImage| {
        if img.dimensions() == (ow, oh) {
            img
        } else {
            resample::resize(&img, ow, oh, interp)
        }
    };
    match *crop {
        Crop::Resize => fit(img),
        Crop::CenterCrop { crop_pct } => {
            // Resize the shorter side to size/crop_pct, centre crop: done as one box resize.
            let (iw, ih) = (img.width() as f64, img.height() as f64);
            let short = (oh.min(ow) as f64 / crop_pct as f64).floor().max(1.0);
            let s = short / iw.min(ih); // output pixels per input pixel
            let (bw, bh) = ((ow as f64 / s).min(iw), (oh as f64 / s).min(ih));
            let bx = [(iw - bw) / 2.0, (ih - bh) / 2.0, bw, bh];
            resample::resize_box(&img, bx, ow, oh, interp)
        }
        Crop::RandomResized { scale, ratio } => {
            let (x, y, w, h) = random_resized_box(img.width(), img.height(), scale, ratio, rng);
            let bx = [x as f64, y as f64, w as f64, h as f64];
            resample::resize_box(&img, bx, ow, oh, interp)
        }
        Crop::PadCrop { pad, reflect } => {
            let pad = pad.unwrap_or((oh.min(ow) / 8).max(1));
            let img = fit(img);
            let ox = rng.int_inclusive(0, 2 * pad as i64) - pad as i64;
            let oy = rng.int_inclusive(0, 2 * pad as i64) - pad as i64;
            shifted(&img, ox, oy, reflect)
        }
    }
}

/// The window at offset (ox, oy) of the padded image, without building the padded copy.
fn shifted(img: &RgbImage, ox: i64, oy: i64, reflect: bool) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let fix = |i: i64, n: i64| -> Option<u32> {
        if (0..n).contains(&i) {
            Some(i as u32)
        } else if reflect && n > 1 {
            // Mirror without repeating the edge (numpy 'reflect'), folded for large pads.
            let period = 2 * (n - 1);
            let m = i.rem_euclid(period);
            Some(if m < n { m } else { period - m } as u32)
        } else {
            None
        }
    };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        match (fix(x as i64 + ox, w), fix(y as i64 + oy, h)) {
            (Some(sx), Some(sy)) => *img.get_pixel(sx, sy),
            _ => Rgb([0, 0, 0]),
        }
    })
}

/// timm's `RandomResizedCropAndInterpolation.get_params`: returns (x, y, w, h).
pub fn random_resized_box(
    width: u32,
    height: u32,
    scale: [f32; 2],
    ratio: [f32; 2],
    rng: &mut Rng,
) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let log_ratio = [(ratio[0] as f64).ln(), (ratio[1] as f64).ln()];
    for _ in 0..10 {
        let target = rng.range(scale[0] as f64, scale[1] as f64) * area;
        let aspect = rng.range(log_ratio[0], log_ratio[1]).exp();
        let w = (target * aspect).sqrt().round() as i64;
        let h = (target / aspect).sqrt().round() as i64;
        if w > 0 && h > 0 && w <= width as i64 && h <= height as i64 {
            let y = rng.int_inclusive(0, height as i64 - h);
            let x = rng.int_inclusive(0, width as i64 - w);
            return (x as u32, y as u32, w as u32, h as u32);
        }
    }
    // Fallback: central crop with the ratio clamped into range.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] as f64 {
        (width, ((width as f64 / ratio[0] as f64).round() as u32).max(1))
    } else if in_ratio > ratio[1] as f64 {
        (((height as f64 * ratio[1] as f64).round() as u32).max(1), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// RGB u8 HWC → normalised f32 CHW.
pub fn to_chw(img: &RgbImage, norm: &Normalize, out: &mut [f32]) {
    let plane = (img.width() * img.height()) as usize;
    assert_eq!(
        out.len(),
        3 * plane,
        "output buffer does not match the image size"
    );
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c] as f32 * scale[c] - shift[c];
        }
    }
}

/// timm's RandomErasing (one rectangle, up to 10 attempts) on a normalised CHW image.
pub fn random_erase(chw: &mut [f32], h: usize, w: usize, cfg: &RandomErasing, rng: &mut Rng) {
    if !rng.chance(cfg.prob as f64) {
        return;
    }
    let area = (h * w) as f64;
    let log_aspect = [(cfg.min_aspect as f64).ln(), (1.0 / cfg.min_aspect as f64).ln()];
    for _ in 0..10 {
        let target = rng.range(cfg.min_area as f64, cfg.max_area as f64) * area;
        let aspect = rng.range(log_aspect[0], log_aspect[1]).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if ew < w && eh < h {
            let top = rng.int_inclusive(0, (h - eh) as i64) as usize;
            let left = rng.int_inclusive(0, (w - ew) as i64) as usize;
            let per_channel: [f32; 3] = std::array::from_fn(|_| match cfg.mode {
                EraseMode::Rand => rng.normal() as f32,
                _ => 0.0,
            });
            for (c, fill) in per_channel.iter().enumerate() {
                for y in top..top + eh {
                    let row = &mut chw[c * h * w + y * w + left..c * h * w + y * w + left + ew];
                    match cfg.mode {
                        EraseMode::Pixel => rng.fill_normal(row),
                        _ => row.fill(*fill),
                    }
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_crop_reflects_without_repeating_the_edge() {
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([x as u8, 0, 0]));
        let out = shifted(&img, -2, 0, true);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row, vec![2, 1, 0, 1]);
        let out = shifted(&img, 2, 0, false);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row, vec![2, 3, 0, 0]);
    }

    #[test]
    fn default_pad_is_an_eighth_of_the_side() {
        // A constant image with zero padding: the crop's zero border shows the shift, which
        // may reach the default pad but never exceed it.
        for (side, pad) in [(32u32, 4i64), (64, 8), (224, 28)] {
            let crop = Crop::PadCrop {
                pad: None,
                reflect: false,
            };
            let mut widest = 0;
            for seed in 0..200 {
                let img = RgbImage::from_pixel(side, side, Rgb([200, 200, 200]));
                let s = side as usize;
                let out = spatial(img, &crop, Interpolation::Bilinear, [s, s], &mut Rng::new(seed));
                let row: Vec<u8> = (0..side).map(|x| out.get_pixel(x, side / 2)[0]).collect();
                let zeros = row
                    .iter()
                    .take_while(|&&v| v == 0)
                    .count()
                    .max(row.iter().rev().take_while(|&&v| v == 0).count());
                widest = widest.max(zeros as i64);
            }
            assert_eq!(widest, pad, "side {side}");
        }
    }

    #[test]
    fn random_resized_box_stays_inside() {
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let (x, y, w, h) = random_resized_box(37, 23, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0], &mut rng);
            assert!(w >= 1 && h >= 1 && x + w <= 37 && y + h <= 23);
        }
    }

    #[test]
    fn normalisation_matches_formula() {
        let img = RgbImage::from_pixel(2, 1, Rgb([255, 0, 128]));
        let mut out = vec![0.0; 6];
        to_chw(&img, &Normalize::IMAGENET, &mut out);
        let n = Normalize::IMAGENET;
        assert!((out[0] - (1.0 - n.mean[0]) / n.std[0]).abs() < 1e-5);
        assert!((out[2] - (0.0 - n.mean[1]) / n.std[1]).abs() < 1e-5);
        assert!((out[5] - (128.0 / 255.0 - n.mean[2]) / n.std[2]).abs() < 1e-5);
    }

    #[test]
    fn random_erasing_changes_a_rectangle_only() {
        let (h, w) = (20, 20);
        let mut x = vec![0.5f32; 3 * h * w];
        let cfg = RandomErasing {
            prob: 1.0,
            ..RandomErasing::timm(1.0)
        };
        random_erase(&mut x, h, w, &cfg, &mut Rng::new(9));
        let changed = x.iter().filter(|&&v| v != 0.5).count();
        assert!(changed > 0 && changed <= 3 * h * w / 3 + 3 * w, "{changed}");
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = AugmentConfig::papers();
        let s = serde_json::to_string(&c).unwrap();
        let back: AugmentConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(c, back);
    }
}
