//! Fused CubeCL kernels, each next to the plain tensor-op path it replaces (its reference).
//!
//! Model code calls these functions with any `Backend`. On the CubeCL backends this build knows
//! (CUDA with `--features cuda`, WebGPU with `--features wgpu`; plain, fused or under autodiff)
//! the kernel runs; on every other backend, or with `VICINITY_FUSED=0`, the reference path runs.
//! Tests and `vicinity check-kernels` run both paths on the same backend and compare values and
//! gradients.

pub mod check;
pub mod depthwise;
pub mod local_attention;
pub mod vicinity;

#[cfg(feature = "kernels")]
pub(crate) mod cube;

use std::sync::OnceLock;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::ops::FloatTensor;

/// Whether the fused kernels are used where they exist: `VICINITY_FUSED=0` turns them off (for
/// A/B measurements and for ruling them out when something looks wrong).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("VICINITY_FUSED").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

/// Whether this backend runs the fused kernels (whatever [`enabled`] says).
pub fn available<B: Backend>() -> bool {
    #[cfg(feature = "kernels")]
    {
        cube::supports::<B>()
    }
    #[cfg(not(feature = "kernels"))]
    {
        false
    }
}

pub(crate) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

pub(crate) fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}
