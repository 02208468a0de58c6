//! vicinity: the Vicinity Vision Transformer (VVT) and Locally Shifted Attention with Early Global
//! Integration (LSAGT) on Burn.
//!
//! Layout: [`attention`] holds each attention kind (with a plain reference path for tests),
//! [`models`] the two families and the registry of named configurations, [`weights`] the official
//! checkpoint loader and native safetensors, [`flops`] the analytic cost model, [`data`] the
//! datasets and augmentation, and [`cli`] the commands behind the `vicinity` binary.

pub mod attention;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod data;
pub mod flops;
pub mod init;
pub mod io;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod ops;
pub mod plot;
pub mod train;
pub mod weights;
