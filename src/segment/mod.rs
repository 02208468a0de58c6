//! Semantic segmentation on the backbones (VVT paper Table V): metrics so far
//! ([`metrics`], mmsegmentation's definitions).

pub mod metrics;
