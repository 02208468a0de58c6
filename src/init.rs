//! The official initialisation of both families, shared so every layer is built the same way.
//!
//! timm's `trunc_normal_(std=0.02)` truncates at ±2 (absolute), i.e. 100σ: a plain normal is the
//! same distribution in practice. Biases start at zero (Burn's configs would draw them from the
//! weight initialiser).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

/// `Linear(i, o)`: weights normal(0, 0.02), bias (if any) zero.
pub fn linear<B: Backend>(i: usize, o: usize, bias: bool, device: &B::Device) -> Linear<B> {
    let mut layer = LinearConfig::new(i, o)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
        .init(device);
    if bias {
        layer.bias = Some(Initializer::Zeros.init([o], device));
    }
    layer
}

/// How a convolution's weights are drawn.
#[derive(Debug, Clone, Copy)]
pub enum ConvInit {
    /// normal(0, 0.02) (LSAGT).
    Normal002,
    /// normal(0, √(2/fan_out)), fan_out = k·k·C_out/groups (VVT, as in PVT).
    FanOut,
}

/// `Conv2d(cin, cout, k, stride, padding pad, groups)` with a zero bias.
#[allow(clippy::too_many_arguments)]
pub fn conv2d<B: Backend>(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    init: ConvInit,
    device: &B::Device,
) -> Conv2d<B> {
    let std = match init {
        ConvInit::Normal002 => 0.02,
        ConvInit::FanOut => (2.0 / (k * k * cout / groups) as f64).sqrt(),
    };
    let mut conv = Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_groups(groups)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device);
    conv.bias = Some(Initializer::Zeros.init([cout], device));
    conv
}
