//! Analytic cost model: multiply-accumulates and parameters per layer. Each model configuration
//! lists its layers' costs ([`crate::models::ModelConfig::costs`]).
//!
//! GFLOPs follow the convention of the papers' tables (fvcore / PVT style): one multiply-accumulate
//! counts as one FLOP, and element-wise work (norms, activations, softmax, re-weighting) is left out.

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

    /// A `Linear(i, o)` applied to `n` tokens.
    pub fn linear(name: impl Into<String>, n: u64, i: u64, o: u64, bias: bool) -> Self {
        Self::new(name, n * i * o, i * o + if bias { o } else { 0 })
    }

    /// A `Conv2d(cin, cout, k, groups)` with a bias producing an `oh×ow` map.
    pub fn conv2d(
        name: impl Into<String>,
        [cin, cout]: [u64; 2],
        k: u64,
        groups: u64,
        [oh, ow]: [u64; 2],
    ) -> Self {
        let weights = cout * (cin / groups) * k * k;
        Self::new(name, weights * oh * ow, weights + cout)
    }

    /// A LayerNorm over `c` channels (no MACs counted).
    pub fn norm(name: impl Into<String>, c: u64) -> Self {
        Self::new(name, 0, 2 * c)
    }
}

/// Total (MACs, params).
pub fn totals(costs: &[LayerCost]) -> (u64, u64) {
    costs.iter().fold((0, 0), |(m, p), c| (m + c.macs, p + c.params))
}
