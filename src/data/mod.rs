//! Datasets, augmentation and batch loading, free of any backend: batches are flat `Vec<f32>`
//! buffers that the trainer turns into tensors.
//!
//! - [`dataset`]: readers for ImageFolder trees and archives (`.tar`, `.tar.gz`, `.tar.zst`),
//!   CIFAR-10/100 binaries and Fashion-MNIST IDX files, behind [`open_split`].
//! - [`download`]: checksum-verified CIFAR download.
//! - [`augment`]: the per-sample recipe (crop, flip, RandAugment, normalise, random erasing).
//! - [`resample`]: PIL-style antialiased crop-and-resize.
//! - [`mix`]: Mixup / CutMix and label smoothing on a batch.
//! - [`loader`]: deterministic, resumable, parallel batch production.
//! - [`rng`]: the seeded generator that makes all of it reproducible.
//! - [`synth`]: tiny synthetic datasets and archives for tests and smoke runs.
//!
//! Typical use by a trainer (`ignore`: illustration only):
//!
//! ```ignore
//! let [train, val]: [ImageDataset; 2] =
//!     open_splits("data/cifar10-jpeg.tar.zst", &["train", "test"])?.try_into().unwrap();
//! check_same_classes(&train, &val)?;
//! let mut cfg = LoaderConfig::train(128, [224, 224], AugmentConfig::papers());
//! cfg.seed = 42;
//! let loader = Loader::new(Arc::new(train), cfg)?;
//! for batch in loader.epoch(epoch, start_batch) {
//!     let b = batch?; // b.images: B×3×H×W, b.targets: Some(B×K) soft targets
//! }
//! ```

pub mod augment;
pub mod classes;
pub mod dataset;
pub mod download;
pub mod loader;
pub mod mix;
pub mod randaugment;
pub mod resample;
pub mod rng;
pub mod synth;

pub use augment::{AugmentConfig, Crop, EraseMode, Interpolation, Mixing, Normalize, RandomErasing};
pub use dataset::{
    CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES, ImageDataset, MissingSplit, Sample, SampleData,
    check_same_classes, open_split, open_splits, read_image,
};
pub use download::{CIFAR_BASE_URL, Cifar, download_and_unpack, download_cifar};
pub use loader::{
    Batch, Epoch, Loader, LoaderConfig, Shard, Throughput, measure_throughput, shard_positions,
};
pub use mix::MixInfo;
pub use randaugment::{RandAugment, parse_randaug};
