//! Analytic cost model: multiply-accumulates and parameters per layer.
//!
//! GFLOPs follow the convention of the papers' tables (fvcore / PVT style): one multiply-accumulate
//! counts as one FLOP, and element-wise work (norms, activations, softmax, re-weighting) is left out.

use crate::models::ModelConfig;

/// The cost of one named part of a model at a given input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCost {
    pub name: String,
    /// Multiply-accumulates for one image.
    pub macs: u64,
    pub params: u64,
}

impl LayerCost {
    pub fn new(name: impl Into<String>, macs: u64, params: u64) -> Self {
        Self {
            name: name.into(),
            macs,
            params,
        }
    }
}

/// MACs and params of a `Linear(i, o)` applied to `n` tokens.
pub fn linear(name: &str, n: u64, i: u64, o: u64, bias: bool) -> LayerCost {
    LayerCost::new(name, n * i * o, i * o + if bias { o } else { 0 })
}

/// MACs and params of a `Conv2d` producing an `oh×ow` map.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    name: &str,
    cin: u64,
    cout: u64,
    k: u64,
    groups: u64,
    oh: u64,
    ow: u64,
    bias: bool,
) -> LayerCost {
    let weights = cout * (cin / groups) * k * k;
    LayerCost::new(name, weights * oh * ow, weights + if bias { cout } else { 0 })
}

/// MACs and params of a LayerNorm over `c` channels (no MACs counted).
pub fn norm(name: &str, c: u64) -> LayerCost {
    LayerCost::new(name, 0, 2 * c)
}

/// Per-layer costs of a model at `h×w` input.
pub fn model_costs(config: &ModelConfig, h: usize, w: usize) -> Vec<LayerCost> {
    match config {
        ModelConfig::Vvt(c) => crate::models::vvt::costs(c, h, w),
        ModelConfig::Lsagt(c) => crate::models::lsagt::costs(c, h, w),
    }
}

/// Total (MACs, params).
pub fn totals(costs: &[LayerCost]) -> (u64, u64) {
    costs.iter().fold((0, 0), |(m, p), c| (m + c.macs, p + c.params))
}
