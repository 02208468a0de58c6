//! Segmentation rows of `vicinity bench`: a segmenter's training step (forward, pixel
//! cross-entropy on logits upsampled to the input, UPerNet's auxiliary loss, backward, AdamW) or
//! its inference (forward and upsampling to the input, as mmseg's whole-image test) on random
//! images of any `height×width`.

use super::SOLO;
use std::time::Instant;

use anyhow::Result;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;

use super::{BenchRow, Measured, Mode, PeakMemory, first_step, sync, timed_loop};
use crate::backend::Dtype;
use crate::segment::SegmenterConfig;
use crate::segment::model::{Segmenter, seg_loss};
use crate::train::optim::{AdamW, AdamWConfig};

pub struct SegBenchSpec<'a> {
    pub name: &'a str,
    pub config: &'a SegmenterConfig,
    pub mode: Mode,
    pub dtype: Dtype,
    /// `(height, width)` of the input.
    pub size: (usize, usize),
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    pub gpu: bool,
}

pub fn run_segmenter<B: AutodiffBackend>(spec: &SegBenchSpec, device: &B::Device) -> Result<BenchRow> {
    let config = spec.config;
    let (h, w) = spec.size;
    config.check_input(h, w)?;
    let shape = [spec.batch, 3, h, w];
    let mut memory = PeakMemory::new::<B>(spec.gpu, device);
    let loops = (spec.warmup, spec.iters);
    let (first_s, timed_s, last_loss) = match spec.mode {
        Mode::Infer => {
            let model: Segmenter<B::InnerBackend> = config.init(device)?.deterministic();
            let x = Tensor::<B::InnerBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let step = |()| {
                let _ = model.forward_resized(x.clone(), (h, w));
            };
            let first = first_step(|| step(()), || sync::<B::InnerBackend>(device))?;
            memory.sample();
            eprintln!("{}: first inference step {first:.1} s", spec.name);
            let ((), timed) = timed_loop((), loops, step, || sync::<B::InnerBackend>(device))?;
            (first, timed, None)
        }
        Mode::Train => {
            let model: Segmenter<B> = config.init(device)?;
            let mut optim = AdamW::new(AdamWConfig::default(), spec.dtype == Dtype::Bf16);
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let k = config.num_classes as u64;
            let labels: Vec<u8> = (0..(spec.batch * h * w) as u64)
                .map(|i| ((i * 2_654_435_761) % k) as u8)
                .collect();
            let size = [spec.batch, h, w];
            let aux = config.head.aux_weight();
            // The first step syncs after the forward and the backward, where memory peaks.
            let start = Instant::now();
            let out = model.forward(x.clone(), aux > 0.0);
            let loss = seg_loss(out, &labels, size, aux)?;
            sync::<B>(device)?;
            memory.sample();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            sync::<B>(device)?;
            memory.sample();
            let model = optim.step(model, grads, 1e-4, None, None)?.0;
            sync::<B>(device)?;
            memory.sample();
            let first = start.elapsed().as_secs_f64();
            eprintln!("{}: first training step {first:.1} s", spec.name);
            let mut last = None;
            let step = |model: Segmenter<B>| {
                let out = model.forward(x.clone(), aux > 0.0);
                let loss = seg_loss(out, &labels, size, aux).expect("the labels fill the batch");
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                last = Some(loss.inner());
                optim.step(model, grads, 1e-4, None, None).expect(SOLO).0
            };
            let (_, timed) = timed_loop(model, loops, step, || sync::<B>(device))?;
            (first, timed, last.map(|l| l.into_scalar().elem::<f32>()))
        }
    };
    let measured = Measured::after(first_s, timed_s, spec.iters, memory);
    Ok(BenchRow {
        last_loss,
        width: Some(w),
        ..BenchRow::new(spec.name, spec.mode, spec.dtype, h, spec.batch, &measured)
    })
}
