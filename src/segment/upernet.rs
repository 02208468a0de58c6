//! UPerNet (Xiao et al. 2018) as Swin's segmentation experiments configure it with
//! mmsegmentation: a pyramid pooling module on the last stage, an FPN whose levels are all
//! brought to stride 4 and fused, and an auxiliary FCN head on stage 3 that only training sees.
//! Names follow mmseg's checkpoints (`decode_head.psp_modules.0.1.conv.weight`,
//! `auxiliary_head.convs.0.conv.weight`).

use burn::prelude::*;

use super::fpn::conv_seg;
use crate::nn::{Conv2d, ConvNormAct, ConvNormActConfig, Dropout2d, Resample, resize};

/// One pyramid pooling branch: adaptive average pooling to `scale`×`scale`, then a 1×1 conv
/// (mmseg's `nn.Sequential(AdaptiveAvgPool2d, ConvModule)`, so the conv sits at index 1).
#[derive(Module, Debug)]
pub struct PoolBranch<B: Backend> {
    pub scale: usize,
    pub conv: ConvNormAct<B>,
}

/// mmseg's `UPerHead`.
#[derive(Module, Debug)]
pub struct UperHead<B: Backend> {
    pub psp_modules: Vec<PoolBranch<B>>,
    pub bottleneck: ConvNormAct<B>,
    pub lateral_convs: Vec<ConvNormAct<B>>,
    pub fpn_convs: Vec<ConvNormAct<B>>,
    pub fpn_bottleneck: ConvNormAct<B>,
    pub dropout: Dropout2d,
    pub conv_seg: Conv2d<B>,
}

impl<B: Backend> UperHead<B> {
    pub fn new(
        in_channels: &[usize],
        channels: usize,
        pool_scales: &[usize],
        groups: usize,
        dropout: f64,
        classes: usize,
        device: &B::Device,
    ) -> Self {
        let conv = |cin, k| {
            ConvNormActConfig::new([cin, channels], k)
                .with_groups(Some(groups))
                .init(device)
        };
        let (last, rest) = in_channels.split_last().expect("UPerNet needs levels");
        UperHead {
            psp_modules: pool_scales
                .iter()
                .map(|&scale| PoolBranch {
                    scale,
                    conv: conv(*last, 1),
                })
                .collect(),
            bottleneck: conv(last + pool_scales.len() * channels, 3),
            lateral_convs: rest.iter().map(|&c| conv(c, 1)).collect(),
            fpn_convs: rest.iter().map(|_| conv(channels, 3)).collect(),
            fpn_bottleneck: conv(in_channels.len() * channels, 3),
            dropout: Dropout2d::new(dropout),
            conv_seg: conv_seg(channels, classes, device),
        }
    }

    /// The last level and its pooled summaries, concatenated and fused.
    fn psp_forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, h, w, _] = x.dims();
        let mut parts = vec![x.clone()];
        for branch in &self.psp_modules {
            let pooled = resize(x.clone(), (branch.scale, branch.scale), Resample::AdaptiveAverage);
            parts.push(resize(branch.conv.forward(pooled), (h, w), Resample::Bilinear));
        }
        self.bottleneck.forward(Tensor::cat(parts, 3))
    }

    /// Backbone levels, finest first → logits `B×H₀×W₀×classes` on the finest level's grid.
    pub fn forward(&self, mut levels: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
        let last = levels.pop().expect("UPerNet needs levels");
        let mut laterals: Vec<Tensor<B, 4>> = self
            .lateral_convs
            .iter()
            .zip(levels)
            .map(|(conv, x)| conv.forward(x))
            .collect();
        laterals.push(self.psp_forward(last));
        for i in (1..laterals.len()).rev() {
            let [_, h, w, _] = laterals[i - 1].dims();
            let up = resize(laterals[i].clone(), (h, w), Resample::Bilinear);
            laterals[i - 1] = laterals[i - 1].clone() + up;
        }
        let top = laterals.pop().expect("UPerNet needs levels");
        let mut outs: Vec<Tensor<B, 4>> = self
            .fpn_convs
            .iter()
            .zip(laterals)
            .map(|(conv, x)| conv.forward(x))
            .collect();
        outs.push(top);
        let [_, h, w, _] = outs[0].dims();
        let outs = outs
            .into_iter()
            .map(|x| resize(x, (h, w), Resample::Bilinear))
            .collect();
        let fused = self.fpn_bottleneck.forward(Tensor::cat(outs, 3));
        self.conv_seg.forward(self.dropout.forward(fused))
    }
}

/// mmseg's `FCNHead` with one 3×3 conv and no input concatenation: UPerNet's auxiliary head.
#[derive(Module, Debug)]
pub struct FcnHead<B: Backend> {
    pub convs: Vec<ConvNormAct<B>>,
    pub dropout: Dropout2d,
    pub conv_seg: Conv2d<B>,
}

impl<B: Backend> FcnHead<B> {
    pub fn new(
        in_channels: usize,
        channels: usize,
        groups: usize,
        dropout: f64,
        classes: usize,
        device: &B::Device,
    ) -> Self {
        FcnHead {
            convs: vec![
                ConvNormActConfig::new([in_channels, channels], 3)
                    .with_groups(Some(groups))
                    .init(device),
            ],
            dropout: Dropout2d::new(dropout),
            conv_seg: conv_seg(channels, classes, device),
        }
    }

    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for conv in &self.convs {
            x = conv.forward(x);
        }
        self.conv_seg.forward(self.dropout.forward(x))
    }
}
