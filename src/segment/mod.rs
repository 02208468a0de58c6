//! Semantic segmentation on the backbones (VVT paper Table V). So far: the datasets on disk
//! ([`data`]: ADE20K's layout and folders of image/mask pairs, checked file by file) and the
//! metrics ([`metrics`], mmsegmentation's definitions).

pub mod data;
pub mod metrics;
