//! Semantic FPN (Kirillov et al. 2019) as PVT's and VVT's segmentation experiments configure it
//! with mmsegmentation: an FPN neck taking the four backbone stages to one width, then the FPN
//! head, which brings every level to stride 4 (3×3 conv + GroupNorm + ReLU, ×2 bilinear, per
//! octave), sums them and classifies each stride-4 position. Names follow mmseg's checkpoints
//! (`neck.lateral_convs.0.conv.weight`, `decode_head.scale_heads.2.0.conv.weight`).

use burn::prelude::*;

use crate::nn::{
    Conv2d, Conv2dConfig, ConvInit, ConvNormAct, ConvNormActConfig, Dropout2d, Resample, resize,
};

/// mmseg's `FPN` neck: 1×1 lateral convs to `channels`, a top-down path that adds each level,
/// upsampled (nearest), to the one below, then a 3×3 conv per level. No normalisation.
#[derive(Module, Debug)]
pub struct Fpn<B: Backend> {
    pub lateral_convs: Vec<ConvNormAct<B>>,
    pub fpn_convs: Vec<ConvNormAct<B>>,
}

impl<B: Backend> Fpn<B> {
    pub fn new(in_channels: &[usize], channels: usize, device: &B::Device) -> Self {
        let conv = |c, k| ConvNormActConfig::new([c, channels], k).init(device);
        Fpn {
            lateral_convs: in_channels.iter().map(|&c| conv(c, 1)).collect(),
            fpn_convs: in_channels.iter().map(|_| conv(channels, 3)).collect(),
        }
    }

    /// Levels `B×Hᵢ×Wᵢ×Cᵢ`, finest first → the same grids at `channels`.
    pub fn forward(&self, levels: Vec<Tensor<B, 4>>) -> Vec<Tensor<B, 4>> {
        let mut laterals: Vec<Tensor<B, 4>> = self
            .lateral_convs
            .iter()
            .zip(levels)
            .map(|(conv, x)| conv.forward(x))
            .collect();
        for i in (1..laterals.len()).rev() {
            let [_, h, w, _] = laterals[i - 1].dims();
            let up = resize(laterals[i].clone(), (h, w), Resample::Nearest);
            laterals[i - 1] = laterals[i - 1].clone() + up;
        }
        self.fpn_convs
            .iter()
            .zip(laterals)
            .map(|(conv, x)| conv.forward(x))
            .collect()
    }
}

/// One level's path to stride 4: its convs, each followed by a ×2 bilinear upsampling when the
/// level is coarser than stride 4 (mmseg's `scale_heads.i`, convs at even indices).
#[derive(Module, Debug)]
pub struct ScaleHead<B: Backend> {
    pub convs: Vec<ConvNormAct<B>>,
    pub upsample: bool,
}

impl<B: Backend> ScaleHead<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for conv in &self.convs {
            x = conv.forward(x);
            if self.upsample {
                let [_, h, w, _] = x.dims();
                x = resize(x, (2 * h, 2 * w), Resample::Bilinear);
            }
        }
        x
    }
}

/// mmseg's `FPNHead` for levels at strides 4, 8, 16, 32.
#[derive(Module, Debug)]
pub struct FpnHead<B: Backend> {
    pub scale_heads: Vec<ScaleHead<B>>,
    pub dropout: Dropout2d,
    pub conv_seg: Conv2d<B>,
}

impl<B: Backend> FpnHead<B> {
    pub fn new(
        in_channels: usize,
        levels: usize,
        channels: usize,
        groups: usize,
        dropout: f64,
        classes: usize,
        device: &B::Device,
    ) -> Self {
        let scale_heads = (0..levels)
            .map(|i| ScaleHead {
                // log2(stride_i / stride_0) convs, at least one.
                convs: (0..i.max(1))
                    .map(|k| {
                        let cin = if k == 0 { in_channels } else { channels };
                        ConvNormActConfig::new([cin, channels], 3)
                            .with_groups(Some(groups))
                            .init(device)
                    })
                    .collect(),
                upsample: i > 0,
            })
            .collect();
        FpnHead {
            scale_heads,
            dropout: Dropout2d::new(dropout),
            conv_seg: conv_seg(channels, classes, device),
        }
    }

    /// Neck levels, finest first → logits `B×H₀×W₀×classes` on the finest level's grid.
    pub fn forward(&self, levels: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
        let mut out: Option<Tensor<B, 4>> = None;
        for (head, x) in self.scale_heads.iter().zip(levels) {
            let y = head.forward(x);
            out = Some(match out {
                None => y,
                Some(o) => {
                    let [_, h, w, _] = o.dims();
                    o + resize(y, (h, w), Resample::Bilinear)
                }
            });
        }
        let out = out.expect("the FPN head has levels");
        self.conv_seg.forward(self.dropout.forward(out))
    }
}

/// The per-position classifier every decode head ends with (mmseg's `conv_seg`).
pub(super) fn conv_seg<B: Backend>(channels: usize, classes: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([channels, classes], 1)
        .with_init(ConvInit::Normal001)
        .init(device)
}
