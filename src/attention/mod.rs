//! The attention kinds, one file each, each owning its math: the plain tensor ops the model runs
//! (the reference of any fused kernel that replaces them), an explicit form for the tests, and its
//! configuration.
//!
//! - [`vicinity`]: VVT's linear attention with the 2D (or 1D, or no) locality re-weighting,
//!   feature reduction, spatial reduction and the feature-preserving connection;
//! - [`softmax`]: softmax attention over all tokens (multi-head or multi-query): LSAGT's global
//!   layers, and vanilla attention for a VVT stage;
//! - [`local_shift`]: LSAGT's attention of each token over its own shifted variants;
//! - [`pvt`]: PVTv2's spatial-reduction attention and its linear (7×7-pooled) variant;
//! - [`performer`]: Performer's FAVOR+ linear attention with positive orthogonal random features;
//! - [`linformer`]: Linformer's attention over a learned projection of the token axis;
//! - [`gcnet`]: GCNet's global context block (one pooled context added to every token).
//!
//! A VVT stage takes any kind of [`AttentionKind`] by configuration ([`Attention`]); adding a kind
//! means a file here, a variant of both enums, and its cost in `models::vvt`.

pub mod gcnet;
mod host;
pub mod linformer;
pub mod local_shift;
pub mod performer;
pub mod pvt;
pub mod softmax;
pub mod vicinity;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use gcnet::{GlobalContext, GlobalContextConfig};
pub use linformer::{LinformerAttention, LinformerAttentionConfig};
pub use local_shift::LocalShiftAttention;
pub use performer::{PerformerAttention, PerformerAttentionConfig};
pub use pvt::{PvtAttention, PvtAttentionConfig};
pub use softmax::{SoftmaxAttention, SoftmaxAttentionConfig};
pub use vicinity::{Locality, VicinityAttention, VicinityAttentionConfig};

/// The attention of a pyramid stage, chosen by configuration (`"vicinity"`, `"softmax"`, ...):
/// VVT's own and the competitors of its paper's ablations (Tables VII–XI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// VVT's vicinity attention (the released models).
    #[default]
    Vicinity,
    /// Vanilla softmax attention over all tokens, one key/value head per query head.
    Softmax,
    /// PVTv2's spatial-reduction attention (the stage's `sr_ratio`).
    Pvt,
    /// PVTv2-Li: keys and values from the grid pooled to 7×7.
    PvtLinear,
    /// Performer (FAVOR+), with the configuration's number of random features.
    Performer,
    /// Linformer, projecting the token axis to the configuration's length; built for one
    /// resolution.
    Linformer,
    /// cosFormer: ReLU features re-weighted by the cosine of the 1D token distance (vicinity
    /// attention with 1D locality, without feature reduction or the FPC).
    Cosformer,
    /// GCNet's global context block.
    Gcnet,
}

impl AttentionKind {
    /// Every kind, in the order tables list them.
    pub const ALL: [AttentionKind; 8] = [
        Self::Vicinity,
        Self::Softmax,
        Self::Pvt,
        Self::PvtLinear,
        Self::Performer,
        Self::Linformer,
        Self::Cosformer,
        Self::Gcnet,
    ];

    /// The name configurations and flags use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vicinity => "vicinity",
            Self::Softmax => "softmax",
            Self::Pvt => "pvt",
            Self::PvtLinear => "pvt_linear",
            Self::Performer => "performer",
            Self::Linformer => "linformer",
            Self::Cosformer => "cosformer",
            Self::Gcnet => "gcnet",
        }
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
            anyhow::anyhow!("unknown attention kind '{s}'; the kinds are {}", names.join(", "))
        })
    }
}

/// An attention layer over the tokens of an `h×w` grid, `B×N×C` → `B×N×C`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block; boxing buys nothing
pub enum Attention<B: Backend> {
    Vicinity(VicinityAttention<B>),
    Softmax(SoftmaxAttention<B>),
    Pvt(PvtAttention<B>),
    Performer(PerformerAttention<B>),
    Linformer(LinformerAttention<B>),
    Gcnet(GlobalContext<B>),
}

impl<B: Backend> Attention<B> {
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        match self {
            Self::Vicinity(a) => a.forward(x, h, w),
            Self::Softmax(a) => a.forward(x),
            Self::Pvt(a) => a.forward(x, h, w),
            Self::Performer(a) => a.forward(x),
            Self::Linformer(a) => a.forward(x),
            Self::Gcnet(a) => a.forward(x),
        }
    }

    /// The attention weights of token `query` of the first image of `x: B×N×C` (on an `h×w`
    /// grid) over the keys, `heads×M`, with the keys' grid: one row of the attention matrix,
    /// computed alone (VVT paper Fig. 9). Performer's row is its kernel estimate's, Linformer's the
    /// weights its `F` projection gives each token's value, GCNet's its one context row for all
    /// queries.
    pub fn attention_row(
        &self,
        x: Tensor<B, 3>,
        grid: (usize, usize),
        query: usize,
    ) -> (Tensor<B, 2>, (usize, usize)) {
        match self {
            Self::Vicinity(a) => a.attention_row(x, grid, query),
            Self::Softmax(a) => (a.attention_row(x, query), grid),
            Self::Pvt(a) => a.attention_row(x, grid, query),
            Self::Performer(a) => (a.attention_row(x, query), grid),
            Self::Linformer(a) => (a.attention_row(x, query), grid),
            Self::Gcnet(a) => (a.attention_row(x), grid),
        }
    }
}
