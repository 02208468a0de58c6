//! What a segmentation sample goes through before the model, mmseg's ADE20K pipelines:
//!
//! - training ([`TrainPipeline`]): resize to `scale` × U(0.5, 2.0) keeping the aspect ratio,
//!   a random `crop`² window in which no class covers more than 75 % of the labelled pixels (up
//!   to ten draws), horizontal flip, photometric distortion (brightness, contrast, saturation,
//!   hue, each with probability ½), normalisation, padding to `crop`² (image 0, labels ignored);
//! - evaluation ([`eval_size`]): the whole image resized to fit `scale` (short side 512 for
//!   ADE20K) with each side rounded up to a multiple of 32, or sliding `crop`² windows over it
//!   ([`windows`]).
//!
//! Every draw comes from a generator seeded by (seed, sample position), so batches are the same
//! whatever the thread count, and a resumed run sees the data the uninterrupted one would have.

use anyhow::{Result, ensure};
use image::RgbImage;
use rayon::prelude::*;

use super::data::SegDataset;
use super::metrics::IGNORE;
use crate::data::augment::{Interpolation, Normalize};
use crate::data::resample::resize;
use crate::data::rng::{Rng, Stream};

/// The training pipeline's settings (defaults: PVT's ADE20K setting).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainPipeline {
    /// `(long, short)` sides the image is fitted into before the ratio (2048, 512).
    pub scale: (usize, usize),
    /// Range of the random ratio applied to `scale` (0.5, 2.0).
    pub ratio: (f64, f64),
    /// Side of the square crop (512).
    pub crop: usize,
    /// The largest share of a crop's labelled pixels one class may take (0.75).
    pub cat_max_ratio: f64,
    pub normalize: Normalize,
}

impl Default for TrainPipeline {
    fn default() -> Self {
        Self {
            scale: (2048, 512),
            ratio: (0.5, 2.0),
            crop: 512,
            cat_max_ratio: 0.75,
            normalize: Normalize::IMAGENET,
        }
    }
}

/// A batch on the host: images `B×3×S×S` (normalised, CHW per image) and labels `B×S×S`.
#[derive(Debug, Clone)]
pub struct SegBatch {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub size: [usize; 3],
}

/// `(w, h)` scaled by one factor so that the long side fits `long` and the short side `short`
/// (mmseg's `keep_ratio` rescale), rounded to whole pixels.
pub fn fit_size((w, h): (usize, usize), (long, short): (usize, usize)) -> (usize, usize) {
    let factor = (long as f64 / w.max(h) as f64).min(short as f64 / w.min(h) as f64);
    let side = |s: usize| ((s as f64 * factor + 0.5) as usize).max(1);
    (side(w), side(h))
}

/// The whole-image evaluation size of a `(w, h)` image: fitted into `scale`, each side rounded
/// up to a multiple of `divisor` (the backbone's 32).
pub fn eval_size(size: (usize, usize), scale: (usize, usize), divisor: usize) -> (usize, usize) {
    let (w, h) = fit_size(size, scale);
    (w.div_ceil(divisor) * divisor, h.div_ceil(divisor) * divisor)
}

/// Labels resized by nearest neighbour (as mmseg resizes masks), `(w, h)` → `(ow, oh)`.
pub fn resize_labels(labels: &[u8], (w, h): (usize, usize), (ow, oh): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(ow * oh);
    for y in 0..oh {
        let sy = ((y * h) / oh).min(h - 1);
        for x in 0..ow {
            out.push(labels[sy * w + ((x * w) / ow).min(w - 1)]);
        }
    }
    out
}

/// An image as normalised CHW floats.
pub fn normalise(img: &RgbImage, n: &Normalize) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (f32::from(p[c]) / 255.0 - n.mean[c]) / n.std[c];
        }
    }
    out
}

/// A `crop`-sided window `(x, y)` of a `(w, h)` image, drawn uniformly (0 where it does not fit).
fn crop_origin((w, h): (usize, usize), crop: usize, rng: &mut Rng) -> (usize, usize) {
    let pick = |side: usize, rng: &mut Rng| rng.below(side.saturating_sub(crop) + 1);
    let x = pick(w, rng);
    (x, pick(h, rng))
}

/// Whether a window's labels pass mmseg's `cat_max_ratio` test: at least two classes, none over
/// the ratio of the labelled pixels.
fn balanced(
    labels: &[u8],
    (w, _): (usize, usize),
    (x, y): (usize, usize),
    (cw, ch): (usize, usize),
    ratio: f64,
) -> bool {
    let mut counts = [0usize; 256];
    for row in y..y + ch {
        for &l in &labels[row * w + x..row * w + x + cw] {
            counts[l as usize] += 1;
        }
    }
    counts[IGNORE as usize] = 0;
    let total: usize = counts.iter().sum();
    let classes = counts.iter().filter(|&&c| c > 0).count();
    let most = counts.iter().copied().max().unwrap_or(0);
    classes > 1 && (most as f64) < ratio * total as f64
}

fn hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    (h, if max == 0.0 { 0.0 } else { d / max }, max)
}

fn rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let hp = h.rem_euclid(360.0) / 60.0;
    let x = c * (1.0 - (hp.rem_euclid(2.0) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    (r + m, g + m, b + m)
}

/// mmseg's `PhotoMetricDistortion` on 0–255 values: brightness ±32, contrast ×U(0.5, 1.5) before
/// or after the colour changes, saturation ×U(0.5, 1.5), hue ±18 of OpenCV's 180 (±36°), each
/// with probability ½, values clipped to 0–255 after each.
pub fn photometric(img: &mut RgbImage, rng: &mut Rng) {
    let affine = |img: &mut RgbImage, alpha: f32, beta: f32| {
        for v in img.iter_mut() {
            *v = (f32::from(*v) * alpha + beta).round().clamp(0.0, 255.0) as u8;
        }
    };
    if rng.chance(0.5) {
        affine(img, 1.0, rng.range(-32.0, 32.0) as f32);
    }
    let contrast_first = rng.chance(0.5);
    let contrast = |img: &mut RgbImage, rng: &mut Rng| {
        if rng.chance(0.5) {
            affine(img, rng.range(0.5, 1.5) as f32, 0.0);
        }
    };
    if contrast_first {
        contrast(img, rng);
    }
    let saturation = rng.chance(0.5).then(|| rng.range(0.5, 1.5) as f32);
    let hue = rng.chance(0.5).then(|| rng.int_inclusive(-18, 18) as f32 * 2.0);
    if saturation.is_some() || hue.is_some() {
        for p in img.pixels_mut() {
            let (h, s, v) = hsv(f32::from(p[0]), f32::from(p[1]), f32::from(p[2]));
            let s = (s * saturation.unwrap_or(1.0)).clamp(0.0, 1.0);
            let (r, g, b) = rgb(h + hue.unwrap_or(0.0), s, v);
            p.0 = [r, g, b].map(|c| c.round().clamp(0.0, 255.0) as u8);
        }
    }
    if !contrast_first {
        contrast(img, rng);
    }
}

impl TrainPipeline {
    /// Fails on settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.crop >= 32 && self.crop.is_multiple_of(32),
            "the crop side {} must be a multiple of 32 (the backbone's stride)",
            self.crop
        );
        ensure!(self.crop <= 4096, "a crop side of {} is beyond 4096", self.crop);
        let (lo, hi) = self.ratio;
        ensure!(
            lo > 0.0 && lo <= hi && hi <= 8.0,
            "the ratio range {lo}..{hi} must satisfy 0 < low ≤ high ≤ 8"
        );
        ensure!(
            self.scale.0 >= self.scale.1 && self.scale.1 >= 1 && self.scale.0 <= 8192,
            "the scale {}x{} must be long × short with 1 ≤ short ≤ long ≤ 8192",
            self.scale.0,
            self.scale.1
        );
        ensure!(
            self.cat_max_ratio > 0.0 && self.cat_max_ratio <= 1.0,
            "cat_max_ratio {} is not in (0, 1]",
            self.cat_max_ratio
        );
        Ok(())
    }

    /// One training sample: normalised CHW `crop`² image and its `crop`² labels.
    pub fn apply(&self, img: &RgbImage, labels: &[u8], rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
        let r = rng.range(self.ratio.0, self.ratio.1);
        let scale = (
            (self.scale.0 as f64 * r) as usize,
            ((self.scale.1 as f64 * r) as usize).max(1),
        );
        let src = (img.width() as usize, img.height() as usize);
        let (w, h) = fit_size(src, scale);
        let img = resize(img, w as u32, h as u32, Interpolation::Bilinear);
        let labels = resize_labels(labels, src, (w, h));
        let c = self.crop;
        let (cw, ch) = (c.min(w), c.min(h));
        let mut origin = crop_origin((w, h), c, rng);
        if self.cat_max_ratio < 1.0 {
            for _ in 0..10 {
                if balanced(&labels, (w, h), origin, (cw, ch), self.cat_max_ratio) {
                    break;
                }
                origin = crop_origin((w, h), c, rng);
            }
        }
        let flip = rng.chance(0.5);
        let mut crop = RgbImage::new(cw as u32, ch as u32);
        let mut out_labels = vec![IGNORE; c * c];
        for y in 0..ch {
            for x in 0..cw {
                let sx = if flip { origin.0 + cw - 1 - x } else { origin.0 + x };
                let (sy, src_x) = (origin.1 + y, sx);
                crop.put_pixel(x as u32, y as u32, *img.get_pixel(src_x as u32, sy as u32));
                out_labels[y * c + x] = labels[sy * w + src_x];
            }
        }
        photometric(&mut crop, rng);
        // Pad to crop² with zeros after normalisation (mmseg pads the normalised image with 0).
        let plane = normalise(&crop, &self.normalize);
        let mut out = vec![0f32; 3 * c * c];
        for ch_i in 0..3 {
            for y in 0..ch {
                let from = ch_i * cw * ch + y * cw;
                let to = ch_i * c * c + y * c;
                out[to..to + cw].copy_from_slice(&plane[from..from + cw]);
            }
        }
        (out, out_labels)
    }

    /// The training batch of global step `step`: samples `step·B … step·B + B − 1` of a stream
    /// that visits the dataset in a fresh order each pass (seeded by `seed` and the pass).
    pub fn batch(&self, data: &SegDataset, seed: u64, step: u64, batch: usize) -> Result<SegBatch> {
        let n = data.samples.len();
        ensure!(n > 0, "the training split of {} is empty", data.name);
        let positions: Vec<u64> = (0..batch as u64).map(|j| step * batch as u64 + j).collect();
        let samples: Vec<Result<(Vec<f32>, Vec<u8>)>> = positions
            .par_iter()
            .map(|&p| {
                let pass = p / n as u64;
                let order = Rng::for_item(seed, pass, Stream::Order, 0).permutation(n);
                let index = order[(p % n as u64) as usize];
                let (img, labels) = data.read(index)?;
                let mut rng = Rng::for_item(seed, pass, Stream::Sample, index as u64);
                Ok(self.apply(&img, &labels, &mut rng))
            })
            .collect();
        let c = self.crop;
        let mut out = SegBatch {
            images: Vec::with_capacity(batch * 3 * c * c),
            labels: Vec::with_capacity(batch * c * c),
            size: [batch, c, c],
        };
        for s in samples {
            let (img, labels) = s?;
            out.images.extend(img);
            out.labels.extend(labels);
        }
        Ok(out)
    }
}

/// Sliding windows over an `(w, h)` image: `(x, y, width, height)` of `crop`-sided windows every
/// `stride` pixels, the last of each row and column flush with the edge (mmseg's `slide`).
pub fn windows((w, h): (usize, usize), crop: usize, stride: usize) -> Vec<(usize, usize, usize, usize)> {
    let count = |side: usize| side.saturating_sub(crop).div_ceil(stride) + 1;
    let mut out = Vec::new();
    for gy in 0..count(h) {
        for gx in 0..count(w) {
            let (y2, x2) = ((gy * stride + crop).min(h), (gx * stride + crop).min(w));
            let (y1, x1) = (y2.saturating_sub(crop), x2.saturating_sub(crop));
            out.push((x1, y1, x2 - x1, y2 - y1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_mmseg() {
        // ADE20K-like 683×512 into (2048, 512): short side to 512.
        assert_eq!(fit_size((683, 512), (2048, 512)), (683, 512));
        assert_eq!(fit_size((400, 300), (2048, 512)), (683, 512));
        // A long panorama is limited by its long side.
        assert_eq!(fit_size((4000, 500), (2048, 512)), (2048, 256));
        assert_eq!(eval_size((683, 512), (2048, 512), 32), (704, 512));
        // Windows cover the image, the last flush with the edge.
        let w = windows((1000, 512), 512, 341);
        assert_eq!(w, vec![(0, 0, 512, 512), (341, 0, 512, 512), (488, 0, 512, 512)]);
        assert_eq!(windows((300, 200), 512, 341), vec![(0, 0, 300, 200)]);
    }

    #[test]
    fn labels_follow_their_pixels_through_the_training_pipeline() {
        // Left half class 1 (red), right half class 2 (blue): after resize, crop and flip, every
        // labelled pixel keeps its colour's class, and padding is ignored.
        let (w, h) = (96, 64);
        let img = RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        });
        let labels: Vec<u8> = (0..h)
            .flat_map(|_| (0..w).map(|x| if x < w / 2 { 1 } else { 2 }))
            .collect();
        let p = TrainPipeline {
            scale: (128, 64),
            crop: 64,
            normalize: Normalize {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            ..Default::default()
        };
        let mut saw_pad = false;
        for seed in 0..40 {
            let mut rng = Rng::new(seed);
            let (x, y) = p.apply(&img, &labels, &mut rng);
            assert_eq!((x.len(), y.len()), (3 * 64 * 64, 64 * 64));
            for (i, &l) in y.iter().enumerate() {
                let (r, b) = (x[i], x[2 * 64 * 64 + i]);
                // Bilinear resizing mixes the two colours next to the seam; labels are nearest.
                let row = &y[i - i % 64..i - i % 64 + 64];
                let col = i % 64;
                let seam = row[col.saturating_sub(2)..(col + 3).min(64)]
                    .iter()
                    .any(|&n| n != l);
                if seam && l != IGNORE {
                    continue;
                }
                match l {
                    // Photometric changes move values but keep red above blue and vice versa.
                    1 if r <= b => panic!("seed {seed}: pixel {i} labelled red is blue"),
                    2 if b <= r => panic!("seed {seed}: pixel {i} labelled blue is red"),
                    IGNORE => {
                        saw_pad = true;
                        assert_eq!((r, b), (0.0, 0.0), "padding is zero");
                    }
                    1 | 2 => {}
                    other => panic!("label {other} appeared"),
                }
            }
        }
        assert!(
            saw_pad,
            "a 0.5 ratio shrinks the image below the crop: padding must appear"
        );
    }

    #[test]
    fn hsv_round_trips() {
        for (r, g, b) in [
            (10.0, 200.0, 30.0),
            (255.0, 0.0, 0.0),
            (0.0, 0.0, 0.0),
            (90.0, 90.0, 90.0),
            (3.0, 40.0, 250.0),
        ] {
            let (h, s, v) = hsv(r, g, b);
            let (r2, g2, b2) = rgb(h, s, v);
            assert!((r - r2).abs() < 1e-3 && (g - g2).abs() < 1e-3 && (b - b2).abs() < 1e-3);
        }
    }
}
