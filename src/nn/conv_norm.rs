//! Convolution → GroupNorm → ReLU, mmcv's `ConvModule` as the segmentation heads use it (parts
//! named `conv` and `gn`, as in mmseg's checkpoints).

use burn::prelude::*;
use burn::tensor::activation::relu;

use super::conv::{Conv2d, Conv2dConfig, ConvInit};
use super::norm::{GroupNorm, GroupNormConfig};

/// `kernel`×`kernel` convolution (padding `kernel / 2`) from `channels[0]` to `channels[1]`,
/// then, with `groups`, GroupNorm and ReLU; without, the convolution alone, with a bias.
#[derive(Config, Debug)]
pub struct ConvNormActConfig {
    pub channels: [usize; 2],
    pub kernel: usize,
    /// GroupNorm's group count; `None`: a plain convolution (FPN's lateral and output convs).
    pub groups: Option<usize>,
}

impl ConvNormActConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ConvNormAct<B> {
        let init = match self.groups {
            Some(_) => ConvInit::FanOut,
            None => ConvInit::XavierUniform,
        };
        ConvNormAct {
            conv: Conv2dConfig::new(self.channels, self.kernel)
                .with_padding(self.kernel / 2)
                .with_init(init)
                .with_bias(self.groups.is_none())
                .init(device),
            gn: self
                .groups
                .map(|g| GroupNormConfig::new(g, self.channels[1]).init(device)),
        }
    }
}

#[derive(Module, Debug)]
pub struct ConvNormAct<B: Backend> {
    pub conv: Conv2d<B>,
    pub gn: Option<GroupNorm<B>>,
}

impl<B: Backend> ConvNormAct<B> {
    /// `x`: `B×H×W×C_in` → `B×H×W×C_out`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.conv.forward(x);
        match &self.gn {
            Some(gn) => relu(gn.forward(y)),
            None => y,
        }
    }
}
