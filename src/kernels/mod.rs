//! Fused CubeCL kernels, each next to the plain tensor-op path it replaces (its reference).
//!
//! Model code calls these functions with any `Backend`. On the CubeCL backends this build knows
//! (CUDA with `--features cuda`, WebGPU with `--features wgpu`; plain, fused or under autodiff)
//! the kernel runs; on every other backend, or when `VICINITY_FUSED` leaves it out ([`enabled`]), the
//! reference path runs.
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

/// The fused kernels, by the names `VICINITY_FUSED` takes.
pub const KERNELS: [&str; 3] = ["depthwise", "local_attention", "vicinity"];

/// The kernels used by default: those measured faster than their reference path on the GPU
/// (docs/GPU_RESULTS.md), both in training only. LSAGT's local attention kernel is correct but
/// slower, so it is opt-in.
const DEFAULT: [&str; 2] = ["depthwise", "vicinity"];

/// Whether the fused kernel `name` is used where the backend has it. `VICINITY_FUSED` picks:
/// `0`/`off`/`none`, `all`, or a comma-separated list of [`KERNELS`]; unset means [`DEFAULT`].
pub fn enabled(name: &str) -> bool {
    static CHOICE: OnceLock<Vec<String>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| match std::env::var("VICINITY_FUSED") {
        Err(_) => DEFAULT.iter().map(|k| k.to_string()).collect(),
        Ok(v) => match v.trim() {
            "0" | "off" | "none" | "false" => Vec::new(),
            "1" | "all" | "on" => KERNELS.iter().map(|k| k.to_string()).collect(),
            list => {
                let names: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
                for n in names.iter().filter(|n| !KERNELS.contains(&n.as_str())) {
                    eprintln!("warning: VICINITY_FUSED names an unknown kernel {n:?} (known: {KERNELS:?})");
                }
                names
            }
        },
    });
    choice.iter().any(|k| k == name)
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

#[cfg(feature = "kernels")]
pub(crate) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

#[cfg(feature = "kernels")]
pub(crate) fn tensor<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t))
}
