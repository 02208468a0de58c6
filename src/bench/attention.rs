//! `bench --attention`: one attention layer alone, timed against the token count, so the attention
//! kinds can be compared without the rest of the model.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use super::{BenchRow, Measured, Mode, PeakMemory, first_step, sync, timed_loop};
use crate::attention::{
    LocalShiftAttention, SoftmaxAttention, SoftmaxAttentionConfig, VicinityAttention, VicinityAttentionConfig,
};
use crate::backend::Dtype;

/// The attention kinds `bench --attention` can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionLayer {
    /// VVT's linear vicinity attention (f = 2, 2D locality, clamps on): O(N).
    Vicinity,
    /// LSAGT's attention of each token over its shifted variants: O(N·T).
    LsagtLocal,
    /// LSAGT's softmax attention over all tokens: O(N²).
    LsagtGlobal,
}

impl AttentionLayer {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vicinity => "attn/vicinity",
            Self::LsagtLocal => "attn/lsagt-local",
            Self::LsagtGlobal => "attn/lsagt-global",
        }
    }
}

/// One attention-only bench row: a `side × side` token grid of `dim` channels.
pub struct AttentionSpec {
    pub kind: AttentionLayer,
    pub side: usize,
    pub batch: usize,
    pub dim: usize,
    pub heads: usize,
    /// Shifted variants per token (LSAGT local attention; 18 in the CIFAR models).
    pub variants: usize,
    pub mode: Mode,
    pub dtype: Dtype,
    pub warmup: usize,
    pub iters: usize,
    pub gpu: bool,
}

enum Layer<B: Backend> {
    Vicinity(Box<VicinityAttention<B>>),
    Local(LocalShiftAttention<B>),
    Global(SoftmaxAttention<B>),
}

impl<B: Backend> Layer<B> {
    fn new(spec: &AttentionSpec, device: &B::Device) -> Self {
        let lsagt = SoftmaxAttentionConfig::new(spec.dim, spec.heads);
        match spec.kind {
            AttentionLayer::Vicinity => Self::Vicinity(Box::new(
                VicinityAttentionConfig::new(spec.dim, spec.heads).init(device),
            )),
            AttentionLayer::LsagtLocal => Self::Local(lsagt.init_local(device)),
            AttentionLayer::LsagtGlobal => Self::Global(lsagt.init(device)),
        }
    }

    fn forward(&self, x: Tensor<B, 3>, variants: &Tensor<B, 4>, side: usize) -> Tensor<B, 3> {
        match self {
            Self::Vicinity(a) => a.forward(x, side, side),
            Self::Local(a) => a.forward(x, variants.clone()),
            Self::Global(a) => a.forward(x),
        }
    }
}

/// Times one attention layer: forward (infer) or forward + backward of a scalar loss (train).
pub fn run_attention<B: AutodiffBackend>(spec: &AttentionSpec, device: &B::Device) -> Result<BenchRow> {
    anyhow::ensure!(
        spec.heads > 0 && spec.dim.is_multiple_of(spec.heads) && spec.dim.is_multiple_of(2 * spec.heads),
        "--attention-dim {} must be divisible by 2 × {} heads",
        spec.dim,
        spec.heads
    );
    let n = spec.side * spec.side;
    B::memory_cleanup(device);
    let memory = PeakMemory {
        enabled: spec.gpu,
        ..Default::default()
    };
    let loops = (spec.warmup, spec.iters);
    let x_shape = [spec.batch, n, spec.dim];
    let v_shape = [spec.variants, spec.batch, n, spec.dim];
    let (first_s, timed_s) = match spec.mode {
        Mode::Infer => {
            let layer = Layer::<B::InnerBackend>::new(spec, device);
            let x = Tensor::random(x_shape, Distribution::Normal(0.0, 1.0), device);
            let variants = Tensor::random(v_shape, Distribution::Normal(0.0, 1.0), device);
            let step = |()| {
                let _ = layer.forward(x.clone(), &variants, spec.side);
            };
            let sync = || sync::<B::InnerBackend>(device);
            let first = first_step(|| step(()), sync)?;
            (first, timed_loop((), loops, step, sync)?.1)
        }
        Mode::Train => {
            let layer = Layer::<B>::new(spec, device);
            let x = Tensor::<B, 3>::random(x_shape, Distribution::Normal(0.0, 1.0), device).require_grad();
            let variants =
                Tensor::<B, 4>::random(v_shape, Distribution::Normal(0.0, 1.0), device).require_grad();
            let step = |()| {
                let out = layer.forward(x.clone(), &variants, spec.side);
                let _grads = out.powi_scalar(2).mean().backward();
            };
            let sync = || sync::<B>(device);
            let first = first_step(|| step(()), sync)?;
            (first, timed_loop((), loops, step, sync)?.1)
        }
    };
    let measured = Measured::after(first_s, timed_s, spec.iters, memory);
    Ok(BenchRow::new(
        spec.kind.name(),
        spec.mode,
        spec.dtype,
        spec.side,
        spec.batch,
        &measured,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    #[test]
    fn every_kind_times_train_and_infer_on_the_cpu() {
        for kind in [
            AttentionLayer::Vicinity,
            AttentionLayer::LsagtLocal,
            AttentionLayer::LsagtGlobal,
        ] {
            for mode in [Mode::Train, Mode::Infer] {
                let spec = AttentionSpec {
                    kind,
                    side: 4,
                    batch: 2,
                    dim: 16,
                    heads: 2,
                    variants: 3,
                    mode,
                    dtype: Dtype::F32,
                    warmup: 0,
                    iters: 1,
                    gpu: false,
                };
                let row = run_attention::<B>(&spec, &Default::default()).unwrap();
                assert_eq!(row.resolution, 4);
                assert!(
                    row.images_per_s.is_finite() && row.images_per_s > 0.0,
                    "{kind:?} {mode:?}"
                );
                assert!(row.peak_in_use_gib.is_none());
            }
        }
    }

    #[test]
    fn impossible_head_split_is_an_error() {
        let spec = AttentionSpec {
            kind: AttentionLayer::Vicinity,
            side: 4,
            batch: 1,
            dim: 10,
            heads: 3,
            variants: 1,
            mode: Mode::Infer,
            dtype: Dtype::F32,
            warmup: 0,
            iters: 1,
            gpu: false,
        };
        let err = run_attention::<B>(&spec, &Default::default()).unwrap_err();
        assert!(err.to_string().contains("divisible"), "{err}");
    }
}
