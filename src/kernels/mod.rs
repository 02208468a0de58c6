//! Fused CubeCL kernels, each next to the plain tensor-op path it replaces (its reference).
//!
//! Model code calls these functions with any `Backend`. On the CubeCL backends this build knows
//! (CUDA with `--features cuda`, WebGPU with `--features wgpu`; plain, fused or under autodiff)
//! the kernel runs; on every other backend, or when `VICINITY_FUSED` leaves it out ([`enabled`]), the
//! reference path runs.
//! The default kernels run in training, the vicinity core in inference too ([`use_fused`]). Tests
//! and `vicinity check-kernels` run each kernel on its backend and its reference path on the CPU,
//! and compare values and gradients.

pub mod check;
pub mod concat;
pub mod cublas;
pub mod depthwise;
pub mod flash_attention;
pub mod im2col;
pub mod layer_norm;
pub mod local_attention;
pub mod patches;
pub mod softmax;
pub mod vicinity;

#[cfg(feature = "kernels")]
pub(crate) mod cube;
#[cfg(feature = "kernels")]
pub(crate) mod rows;

use std::sync::OnceLock;

use burn::prelude::*;

/// The fused kernels, by the names `VICINITY_FUSED` takes.
pub const KERNELS: [&str; 9] = [
    "concat",
    "depthwise",
    "flash_attention",
    "im2col",
    "layer_norm",
    "local_attention",
    "patches",
    "softmax",
    "vicinity",
];

/// The kernels used by default: those measured faster than their reference path on the GPU
/// (docs/GPU_RESULTS.md); see [`INFERENCE_DEFAULT`] for inference. The flash attention kernels
/// are correct but slower than the composed path with the fused softmax (session 10), so they
/// are opt-in. (The local attention kernel was too, until its loads were vectorised in session 12.)
const DEFAULT: [&str; 8] = [
    "concat",
    "depthwise",
    "im2col",
    "layer_norm",
    "local_attention",
    "patches",
    "softmax",
    "vicinity",
];

/// The kernels used in inference too, by default: the same list. (Sessions 8–9 kept all but the
/// vicinity core out of inference on A/B runs that never switched them on: the A/B script split
/// `VICINITY_FUSED_INFER=a,b` at its commas. Measured properly in session 10, the depth-wise and
/// im2col kernels alone took vvt_tiny 224² b64 bf16 inference from ~2,800 to ~5,760 img/s on the
/// H100, docs/GPU_RESULTS.md.)
const INFERENCE_DEFAULT: [&str; 8] = DEFAULT;

/// The kernel names an environment variable lists: `0`/`off`/`none`, `all`, or a comma-separated
/// list of [`KERNELS`]; `default` when it is unset.
fn listed(var: &str, default: &[&str]) -> Vec<String> {
    match std::env::var(var) {
        Err(_) => default.iter().map(|k| k.to_string()).collect(),
        Ok(v) => match v.trim() {
            "0" | "off" | "none" | "false" => Vec::new(),
            "1" | "all" | "on" => KERNELS.iter().map(|k| k.to_string()).collect(),
            list => {
                let names: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
                for n in names.iter().filter(|n| !KERNELS.contains(&n.as_str())) {
                    eprintln!("warning: {var} names an unknown kernel {n:?} (known: {KERNELS:?})");
                }
                names
            }
        },
    }
}

/// Whether the fused kernel `name` is used where the backend has it: `VICINITY_FUSED` lists them
/// (see [`listed`]); unset means [`DEFAULT`].
pub fn enabled(name: &str) -> bool {
    static CHOICE: OnceLock<Vec<String>> = OnceLock::new();
    chosen(&CHOICE, "VICINITY_FUSED", &DEFAULT, name)
}

/// Whether the fused kernel `name` runs without autodiff (inference) too: `VICINITY_FUSED_INFER`
/// lists them like `VICINITY_FUSED`; unset means [`INFERENCE_DEFAULT`].
fn in_inference(name: &str) -> bool {
    static CHOICE: OnceLock<Vec<String>> = OnceLock::new();
    chosen(&CHOICE, "VICINITY_FUSED_INFER", &INFERENCE_DEFAULT, name)
}

/// Whether `var`'s list (read once into `choice`) names `name`.
fn chosen(choice: &OnceLock<Vec<String>>, var: &str, default: &[&str], name: &str) -> bool {
    choice
        .get_or_init(|| listed(var, default))
        .iter()
        .any(|k| k == name)
}

/// Whether the fused kernel `name` should replace its reference here: it is [`enabled`] and
/// gradients can flow (`B` is an autodiff backend: training), or it is listed for inference.
/// (`Tensor::is_require_grad` cannot tell training: it is true only for leaf tensors, so a check
/// on a layer's input or reshaped weight silently kept the fused kernels off in training.)
pub fn use_fused<B: Backend>(name: &str, device: &B::Device) -> bool {
    enabled(name) && (B::ad_enabled(device) || in_inference(name))
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

#[cfg(test)]
mod tests {
    #[test]
    fn fused_kernels_are_for_training_backends() {
        type Cpu = crate::backend::Cpu;
        let device = Default::default();
        assert!(super::use_fused::<burn::backend::Autodiff<Cpu>>(
            "vicinity", &device
        ));
        assert!(super::use_fused::<Cpu>("depthwise", &device));
        assert!(!super::use_fused::<Cpu>("flash_attention", &device));
        assert!(super::use_fused::<burn::backend::Autodiff<Cpu>>(
            "layer_norm",
            &device
        ));
        assert!(!super::use_fused::<burn::backend::Autodiff<Cpu>>(
            "no_such_kernel",
            &device
        ));
    }
}
