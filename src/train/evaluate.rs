//! One pass of a model over a data split, accumulating the metrics.

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::metrics::EvalAccumulator;
use crate::data::Loader;
use crate::models::Model;

/// Adds up the accumulators of every rank (each evaluated its shard of the split): the exact
/// totals of the whole split, on every rank.
pub fn all_reduce(acc: &mut EvalAccumulator, dist: &crate::dist::Dist) -> Result<()> {
    if dist.world() == 1 {
        return Ok(());
    }
    let mut v: Vec<f64> = [acc.count as f64, acc.top1 as f64, acc.top5 as f64, acc.loss_sum]
        .into_iter()
        .chain(acc.confusion.iter().map(|&c| c as f64))
        .collect();
    dist.sum_f64(&mut v)?;
    // Counts below 2^53 are exact in f64.
    acc.count = v[0] as u64;
    acc.top1 = v[1] as u64;
    acc.top5 = v[2] as u64;
    acc.loss_sum = v[3];
    acc.confusion
        .iter_mut()
        .zip(&v[4..])
        .for_each(|(c, &t)| *c = t as u64);
    Ok(())
}

/// Runs `model` over every batch of `loader` and accumulates the metrics (with the mirror-image
/// test-time augmentation of [`Model::forward_tta`] when `flip` is set).
pub fn evaluate<B: Backend>(
    model: &Model<B>,
    loader: &Loader,
    device: &B::Device,
    flip: bool,
) -> Result<EvalAccumulator> {
    let k = loader.dataset().num_classes();
    let mut acc = EvalAccumulator::new(k);
    for batch in loader.epoch(0, 0) {
        crate::dist::watchdog::beat(None);
        let b = batch?;
        let [h, w] = b.size;
        let x = Tensor::<B, 4>::from_data(TensorData::new(b.images, [b.labels.len(), 3, h, w]), device);
        let logits = model.forward_tta(x, flip);
        let out_k = logits.dims()[1];
        if out_k != k {
            bail!("the model has {out_k} outputs but the dataset has {k} classes");
        }
        let (_, values) = crate::io::to_host(logits)?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "the model's output for image {} of {} is {} (NaN or infinite): its weights or the \
                 data are damaged, or the run diverged",
                bad / k + 1,
                b.labels.len(),
                values[bad]
            );
        }
        acc.add(&values, &b.labels);
    }
    Ok(acc)
}
