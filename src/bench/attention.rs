//! `bench --attention`: one attention layer alone, timed against the token count, so the attention
//! kinds can be compared without the rest of the model.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use super::{BenchRow, Measured, Mode, PeakMemory, first_step, sync, timed_loop};
use crate::attention::{Attention, AttentionKind, LocalShiftAttention, SoftmaxAttentionConfig};
use crate::backend::Dtype;
use crate::models::VvtConfig;

/// The attention kinds `bench --attention` can time (VVT paper Fig. 8 compares them alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionLayer {
    /// VVT's linear vicinity attention (f = 2, 2D locality, clamps on, FPC): O(N).
    Vicinity,
    /// The same with keys and values spatially reduced 4× (Fig. 8's VVT_sr).
    VicinitySr4,
    /// LSAGT's attention of each token over its shifted variants: O(N·T).
    LsagtLocal,
    /// LSAGT's softmax attention over all tokens: O(N²).
    LsagtGlobal,
    /// PVTv2's spatial-reduction attention with r = 8 (Fig. 8's setting).
    Pvt,
    /// PVTv2's linear attention (keys and values pooled to 7×7).
    PvtLinear,
    /// Performer, 64 random features.
    Performer,
    /// Linformer, tokens projected to k = 64.
    Linformer,
    /// cosFormer (1D cosine re-weighting, no feature reduction).
    Cosformer,
    /// GCNet's global context block.
    Gcnet,
}

impl AttentionLayer {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vicinity => "attn/vicinity",
            Self::VicinitySr4 => "attn/vicinity-sr4",
            Self::LsagtLocal => "attn/lsagt-local",
            Self::LsagtGlobal => "attn/lsagt-global",
            Self::Pvt => "attn/pvt",
            Self::PvtLinear => "attn/pvt-linear",
            Self::Performer => "attn/performer",
            Self::Linformer => "attn/linformer",
            Self::Cosformer => "attn/cosformer",
            Self::Gcnet => "attn/gcnet",
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
    /// A layer of the VVT backbone's kinds, on the token grid.
    Grid(Box<Attention<B>>),
    Local(Box<LocalShiftAttention<B>>),
}

impl AttentionLayer {
    /// The one-stage VVT whose layer this row times ([`VvtConfig::one_layer`]); `None` for LSAGT's
    /// local attention, which no VVT has.
    fn vvt(self, spec: &AttentionSpec) -> Option<VvtConfig> {
        let kind = match self {
            Self::LsagtLocal => return None,
            Self::Vicinity | Self::VicinitySr4 => AttentionKind::Vicinity,
            Self::LsagtGlobal => AttentionKind::Softmax,
            Self::Pvt => AttentionKind::Pvt,
            Self::PvtLinear => AttentionKind::PvtLinear,
            Self::Performer => AttentionKind::Performer,
            Self::Linformer => AttentionKind::Linformer,
            Self::Cosformer => AttentionKind::Cosformer,
            Self::Gcnet => AttentionKind::Gcnet,
        };
        let mut config = VvtConfig::one_layer(kind, spec.dim, spec.heads, spec.side);
        if self == Self::VicinitySr4 {
            config.sr_ratios = vec![4];
        }
        Some(config)
    }
}

impl<B: Backend> Layer<B> {
    /// The layer a model of this kind builds ([`VvtConfig::attention_layer`]), or LSAGT's local one.
    fn new(spec: &AttentionSpec, device: &B::Device) -> Self {
        match spec.kind.vvt(spec) {
            Some(config) => Self::Grid(Box::new(config.attention_layer(0, 0, device))),
            None => Self::Local(Box::new(
                SoftmaxAttentionConfig::new(spec.dim, spec.heads).init_local(device),
            )),
        }
    }

    fn forward(&self, x: Tensor<B, 3>, variants: &Tensor<B, 4>, side: usize) -> Tensor<B, 3> {
        match self {
            Self::Grid(a) => a.forward(x, side, side),
            Self::Local(a) => a.forward(x, variants.clone()),
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
    // The keys' spatial reduction must divide the grid (PVTv2-Li pools instead: r = 1 there).
    let multiple = spec.kind.vvt(spec).map_or(1, |c| c.sr_ratios[0]);
    anyhow::ensure!(
        spec.side.is_multiple_of(multiple),
        "{} needs a token grid whose side is a multiple of {multiple}; got {}",
        spec.kind.name(),
        spec.side
    );
    let n = spec.side * spec.side;
    // Only the local attention reads the variants: the others get an empty tensor.
    let variants = if spec.kind == AttentionLayer::LsagtLocal {
        spec.variants
    } else {
        0
    };
    B::memory_cleanup(device);
    let memory = PeakMemory {
        enabled: spec.gpu,
        ..Default::default()
    };
    let loops = (spec.warmup, spec.iters);
    let x_shape = [spec.batch, n, spec.dim];
    let v_shape = [variants, spec.batch, n, spec.dim];
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
    use clap::ValueEnum;

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    #[test]
    fn every_kind_times_train_and_infer_on_the_cpu() {
        for kind in AttentionLayer::value_variants().iter().copied() {
            for mode in [Mode::Train, Mode::Infer] {
                let spec = AttentionSpec {
                    kind,
                    side: 8,
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
                assert_eq!(row.resolution, 8);
                assert!(
                    row.images_per_s.is_finite() && row.images_per_s > 0.0,
                    "{kind:?} {mode:?}"
                );
                assert!(row.peak_in_use_gib.is_none());
            }
        }
    }

    /// The error of one untimed inference row of `kind` on a `side²` grid of `dim` channels.
    fn error_of(kind: AttentionLayer, side: usize, dim: usize, heads: usize) -> String {
        let spec = AttentionSpec {
            kind,
            side,
            batch: 1,
            dim,
            heads,
            variants: 1,
            mode: Mode::Infer,
            dtype: Dtype::F32,
            warmup: 0,
            iters: 1,
            gpu: false,
        };
        run_attention::<B>(&spec, &Default::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_grid_the_reduction_does_not_divide_is_an_error() {
        let err = error_of(AttentionLayer::Pvt, 12, 16, 2);
        assert!(err.contains("multiple of 8"), "{err}");
    }

    #[test]
    fn impossible_head_split_is_an_error() {
        let err = error_of(AttentionLayer::Vicinity, 4, 10, 3);
        assert!(err.contains("divisible"), "{err}");
    }
}
