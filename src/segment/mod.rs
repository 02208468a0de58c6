//! Semantic segmentation on VVT backbones (VVT paper Table V): the heads ([`fpn`]: Semantic FPN,
//! [`upernet`]: UPerNet), the model and its registry ([`model`]), datasets on disk ([`data`]:
//! ADE20K's layout and folders of image/mask pairs, checked file by file), the metrics
//! ([`metrics`], mmsegmentation's definitions), the training and test pipelines ([`pipeline`]),
//! inference and evaluation ([`infer`]), the trainer ([`train`]) and a composed demo dataset
//! ([`compose`]). docs/SEGMENTATION.md is the user's guide.

pub mod compose;
pub mod data;
pub mod fpn;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod train;
pub mod upernet;

pub use model::{HeadConfig, SegHead, SegOutput, Segmenter, SegmenterConfig};
