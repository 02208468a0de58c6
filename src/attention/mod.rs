//! The attention kinds, one file each, each owning its math: the plain tensor ops the model runs
//! (the reference of any fused kernel that replaces them), an explicit form for the tests, and its
//! configuration.
//!
//! - [`vicinity`]: VVT's linear attention with the 2D (or 1D, or no) locality re-weighting,
//!   feature reduction, spatial reduction and the feature-preserving connection;
//! - [`softmax`]: softmax attention over all tokens (multi-head or multi-query): LSAGT's global
//!   layers, and vanilla attention for a VVT stage;
//! - [`local_shift`]: LSAGT's attention of each token over its own shifted variants.
//!
//! A VVT stage takes any kind of [`AttentionKind`] by configuration ([`Attention`]); adding a kind
//! means a file here, a variant of both enums, and its cost in `models::vvt`.

mod host;
pub mod local_shift;
pub mod softmax;
pub mod vicinity;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use local_shift::LocalShiftAttention;
pub use softmax::{SoftmaxAttention, SoftmaxAttentionConfig};
pub use vicinity::{Locality, VicinityAttention, VicinityAttentionConfig};

/// The attention of a pyramid stage, chosen by configuration (`"vicinity"` or `"softmax"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// VVT's vicinity attention (the released models).
    #[default]
    Vicinity,
    /// Vanilla softmax attention over all tokens, one key/value head per query head.
    Softmax,
}

/// An attention layer over the tokens of an `h×w` grid, `B×N×C` → `B×N×C`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block; boxing buys nothing
pub enum Attention<B: Backend> {
    Vicinity(VicinityAttention<B>),
    Softmax(SoftmaxAttention<B>),
}

impl<B: Backend> Attention<B> {
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        match self {
            Self::Vicinity(a) => a.forward(x, h, w),
            Self::Softmax(a) => a.forward(x),
        }
    }
}
