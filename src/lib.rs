//! vicinity: the Vicinity Vision Transformer (VVT) and Locally Shifted Attention with Early Global
//! Integration (LSAGT) on Burn.
//!
//! Layout (docs/ARCHITECTURE.md): [`attention`] holds each attention kind and its math, [`nn`]
//! the layers the models are built from, [`models`] the two families and the registry of named
//! configurations, [`kernels`] the fused CubeCL kernels (tensors only), [`weights`] the official
//! checkpoint loader and native safetensors, [`data`] the datasets and augmentation, [`train`]
//! the trainer, [`bench`] the throughput benchmark and [`cli`] the commands behind the
//! `vicinity` binary.

pub mod attention;
pub mod backend;
pub mod bench;
pub mod check;
pub mod cli;
pub mod data;
pub mod dist;
pub mod explain;
pub mod flops;
pub mod io;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod plot;
pub mod segment;
pub mod train;
pub mod weights;
