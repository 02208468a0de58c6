//! The layers the models are built from. Each hides its fast path behind an ordinary `forward`
//! and keeps the plain path it must equal (tested against each other):
//!
//! - [`Linear`]: Burn's linear layer, with small per-image inputs multiplied as one product;
//! - [`Conv2d`]: convolutions of channels-last token grids (dense: patches + one product per
//!   image; depth-wise: a fused kernel or shifted sums);
//! - [`LayerNorm`]: Burn's LayerNorm with the fused CubeCL kernel where the backend has it;
//! - [`DropPathNoise`] / [`drop_path`]: stochastic depth for every residual branch of a pass;
//! - [`GroupNorm`], [`ConvNormAct`], [`Dropout2d`] and [`resize`]: what the segmentation heads are
//!   built from (resizing and adaptive pooling as two small matrix products).
//!
//! Records match Burn's modules of the same name, so official checkpoints map onto them.

mod conv;
mod conv_norm;
mod drop_path;
mod dropout;
mod linear;
mod norm;
mod resize;

pub use conv::{Conv2d, Conv2dConfig, ConvInit, conv_out, forward_many_columns, stack_params};
pub use conv_norm::{ConvNormAct, ConvNormActConfig};
pub use drop_path::{DropPathNoise, drop_path};
pub use dropout::Dropout2d;
pub use linear::{Linear, LinearConfig};
pub use norm::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig};
pub use resize::{Resample, resize, resize_matrix, resize_reference};
