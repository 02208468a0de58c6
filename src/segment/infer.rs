//! Segmentation inference as mmseg's test pipeline runs it: the whole image resized to fit
//! `scale` (sides rounded up to multiples of 32), or `crop`² windows slid over the resized image
//! with their logits averaged; either way the logits are brought back to the image's own size
//! and each pixel takes its most likely class. Also the dataset evaluation (mIoU) and the
//! colour pictures `vicinity segment` writes.

use anyhow::{Result, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use image::{Rgb, RgbImage};
use rayon::prelude::*;

use super::data::SegDataset;
use super::metrics::SegAccumulator;
use super::model::Segmenter;
use super::pipeline::{eval_size, fit_size, normalise, windows};
use crate::data::augment::{Interpolation, Normalize};
use crate::data::resample::resize as resize_image;
use crate::nn::{Resample, resize};

/// Whole image or sliding windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    Whole,
    Slide,
}

/// How images are presented to the model at test time (defaults: ADE20K's).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalSettings {
    pub mode: EvalMode,
    /// `(long, short)` the image is fitted into (2048, 512).
    pub scale: (usize, usize),
    /// Sliding windows: side and step (512, 341).
    pub crop: usize,
    pub stride: usize,
    pub normalize: Normalize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            mode: EvalMode::Whole,
            scale: (2048, 512),
            crop: 512,
            stride: 341,
            normalize: Normalize::IMAGENET,
        }
    }
}

impl EvalSettings {
    /// Fails on settings no image can be evaluated with (checked before a run starts).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.scale.0 > 0 && self.scale.1 > 0,
            "--eval-scale {}x{} must be positive",
            self.scale.0,
            self.scale.1
        );
        if self.mode == EvalMode::Slide {
            ensure!(
                self.crop >= 32 && self.crop.is_multiple_of(32) && (1..=self.crop).contains(&self.stride),
                "sliding windows need a crop that is a multiple of 32 and a stride from 1 to the crop ({} / {})",
                self.crop,
                self.stride
            );
        }
        Ok(())
    }
}

/// An image as a `1×3×H×W` tensor.
fn image_tensor<B: Backend>(img: &RgbImage, n: &Normalize, device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    Tensor::from_data(TensorData::new(normalise(img, n), [1, 3, h, w]), device)
}

/// The logits of one image at its own size, `1×H×W×K` (f32).
pub fn image_logits<B: Backend>(
    model: &Segmenter<B>,
    img: &RgbImage,
    s: &EvalSettings,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    ensure!(w > 0 && h > 0, "an empty image");
    let f32 = burn::tensor::DType::F32;
    let logits = match s.mode {
        EvalMode::Whole => {
            let (ew, eh) = eval_size((w, h), s.scale, 32);
            let x = image_tensor::<B>(
                &resize_image(img, ew as u32, eh as u32, Interpolation::Bilinear),
                &s.normalize,
                device,
            );
            // As mmseg: to the network's input size, then to the image's.
            let at_input = model.forward_resized(x, (eh, ew)).cast(f32);
            resize(at_input, (h, w), Resample::Bilinear)
        }
        EvalMode::Slide => {
            s.validate()?;
            let (rw, rh) = fit_size((w, h), s.scale);
            let resized = resize_image(img, rw as u32, rh as u32, Interpolation::Bilinear);
            let mut sum: Option<Tensor<B, 4>> = None;
            let mut count = vec![0f32; rw * rh];
            for (x0, y0, cw, ch) in windows((rw, rh), s.crop, s.stride) {
                // Each window padded to crop² (zeros after normalisation), its logits cut back.
                let window = image::imageops::crop_imm(&resized, x0 as u32, y0 as u32, cw as u32, ch as u32)
                    .to_image();
                let plane = normalise(&window, &s.normalize);
                let c = s.crop;
                let mut padded = vec![0f32; 3 * c * c];
                for k in 0..3 {
                    for y in 0..ch {
                        let (from, to) = (k * cw * ch + y * cw, k * c * c + y * c);
                        padded[to..to + cw].copy_from_slice(&plane[from..from + cw]);
                    }
                }
                let x = Tensor::<B, 4>::from_data(TensorData::new(padded, [1, 3, c, c]), device);
                let part = model
                    .forward_resized(x, (c, c))
                    .cast(f32)
                    .slice([0..1, 0..ch, 0..cw]);
                let k = part.dims()[3];
                let total = sum.unwrap_or_else(|| Tensor::zeros([1, rh, rw, k], (device, f32)));
                let region = [0..1, y0..y0 + ch, x0..x0 + cw, 0..k];
                let updated = total.clone().slice(region.clone()) + part;
                sum = Some(total.slice_assign(region, updated));
                for y in y0..y0 + ch {
                    count[y * rw + x0..y * rw + x0 + cw]
                        .iter_mut()
                        .for_each(|v| *v += 1.0);
                }
            }
            let sum = sum.expect("at least one window");
            let count = Tensor::<B, 4>::from_data(TensorData::new(count, [1, rh, rw, 1]), (device, f32));
            resize(sum / count, (h, w), Resample::Bilinear)
        }
    };
    Ok(logits)
}

/// Class indices of one image at its own size, row-major.
pub fn predict_labels<B: Backend>(
    model: &Segmenter<B>,
    img: &RgbImage,
    s: &EvalSettings,
    device: &B::Device,
) -> Result<Vec<u8>> {
    let logits = image_logits(model, img, s, device)?;
    let [_, h, w, _] = logits.dims();
    let classes = logits.argmax(3).reshape([h * w]).into_data();
    Ok(classes.iter::<i64>().map(|c| c as u8).collect())
}

/// mIoU and friends of `model` over the first `limit` images of `data` (all without a limit).
/// `on_image` is told how many images are done.
pub fn evaluate<B: Backend>(
    model: &Segmenter<B>,
    data: &SegDataset,
    s: &EvalSettings,
    limit: Option<usize>,
    device: &B::Device,
    mut on_image: impl FnMut(usize, usize),
) -> Result<SegAccumulator> {
    let n = limit.map_or(data.samples.len(), |l| l.min(data.samples.len()));
    ensure!(n > 0, "{} has no images to evaluate", data.name);
    let mut acc = SegAccumulator::new(data.classes.len());
    // Decoding runs ahead on the thread pool, a chunk at a time.
    const CHUNK: usize = 8;
    for start in (0..n).step_by(CHUNK) {
        let decoded: Vec<Result<(RgbImage, Vec<u8>)>> = (start..(start + CHUNK).min(n))
            .into_par_iter()
            .map(|i| data.read(i))
            .collect();
        for (j, item) in decoded.into_iter().enumerate() {
            let (img, labels) = item?;
            let pred = predict_labels(model, &img, s, device)?;
            acc.add(&pred, &labels);
            on_image(start + j + 1, n);
        }
    }
    Ok(acc)
}

/// A class's colour: the 20 of tab20 first, then well-spread hues.
pub fn class_colour(class: usize) -> Rgb<u8> {
    use crate::explain::render::TAB20;
    if class < TAB20.len() {
        return Rgb(TAB20[class]);
    }
    let golden = 0.618_034_f64;
    let h = (class as f64 * golden).fract() * 6.0;
    let x = (1.0 - (h % 2.0 - 1.0).abs()) * 200.0;
    let (r, g, b) = match h as u32 {
        0 => (200.0, x, 40.0),
        1 => (x, 200.0, 40.0),
        2 => (40.0, 200.0, x),
        3 => (40.0, x, 200.0),
        4 => (x, 40.0, 200.0),
        _ => (200.0, 40.0, x),
    };
    Rgb([r as u8, g as u8, b as u8])
}

/// The colour mask of `labels` (`w×h`).
pub fn colour_mask(labels: &[u8], w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| class_colour(labels[(y * w + x) as usize] as usize))
}

/// `image` with the colour mask laid over at half strength.
pub fn overlay(image: &RgbImage, mask: &RgbImage) -> RgbImage {
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let (a, b) = (image.get_pixel(x, y), mask.get_pixel(x, y));
        Rgb([0, 1, 2].map(|c| ((u16::from(a[c]) + u16::from(b[c])) / 2) as u8))
    })
}
