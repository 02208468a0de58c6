//! Fused CubeCL kernels: fast paths for tensors and shapes, no model types. Each file offers its
//! op as a function that runs the kernel where the backend has one and a plain tensor-op path
//! (its reference) elsewhere, or as `fused(...)`, which hands its inputs back when the backend has
//! no kernels and leaves the plain path to the layer that calls it ([`crate::attention`],
//! [`crate::nn`]).
//!
//! The kernels run on the CubeCL backends this build knows (CUDA with `--features cuda`, WebGPU
//! with `--features wgpu`; plain, fused or under autodiff), in training and inference alike;
//! every other backend runs the plain paths. [`crate::check`] compares each kernel with its
//! reference, values and gradients (the tests on WebGPU, `vicinity check-kernels` on CUDA).

pub mod concat;
pub mod cublas;
pub mod depthwise;
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

use burn::prelude::*;

/// Whether this backend runs the fused kernels.
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
    fn the_cpu_backend_has_no_fused_kernels() {
        type Cpu = crate::backend::Cpu;
        assert!(!super::available::<Cpu>());
        assert!(!super::available::<burn::backend::Autodiff<Cpu>>());
    }
}
