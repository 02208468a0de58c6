//! One pass of a model over a data split, accumulating the metrics.

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::metrics::EvalAccumulator;
use crate::data::Loader;
use crate::models::Model;

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
