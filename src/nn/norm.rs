//! LayerNorm with the fused kernel: Burn's `burn::nn::LayerNorm` keeps its epsilon private and
//! calls the backend's decomposed `layer_norm`, so the models use this one. Same configuration
//! and the same record (`gamma`, `beta`), so checkpoints load either way.

use burn::module::{Initializer, Param};
use burn::prelude::*;

use crate::kernels::layer_norm::{layer_norm, layer_norm_shifted};

/// Burn's `LayerNormConfig`, less the option to drop the shift (the models always have one).
#[derive(Config, Debug)]
pub struct LayerNormConfig {
    pub d_model: usize,
    #[config(default = 1e-5)]
    pub epsilon: f64,
}

impl LayerNormConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNorm {
            gamma: Initializer::Ones.init([self.d_model], device),
            beta: Initializer::Zeros.init([self.d_model], device),
            epsilon: self.epsilon,
        }
    }
}

/// `(x − mean) / sqrt(var + ε) · gamma + beta` over the last dimension
/// ([`crate::kernels::layer_norm`]: fused on the GPU, Burn's own elsewhere).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }

    /// `forward(x + shift)` for `x`: `T×B×N×C` and a `shift`: `T×N×C` shared by the batch
    /// (fused into the kernel where it runs: [`layer_norm_shifted`]).
    pub fn forward_shifted(&self, x: Tensor<B, 4>, shift: Tensor<B, 3>) -> Tensor<B, 4> {
        layer_norm_shifted(x, shift, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    /// The same values and gradients as Burn's module.
    #[test]
    fn matches_burn_layer_norm() {
        let device = Default::default();
        let random = |mean| Param::from_tensor(Tensor::random([6], Distribution::Normal(mean, 0.5), &device));
        let ours = LayerNorm::<B> {
            gamma: random(1.0),
            beta: random(0.0),
            ..LayerNormConfig::new(6).with_epsilon(1e-6).init(&device)
        };
        let mut burns = burn::nn::LayerNormConfig::new(6)
            .with_epsilon(1e-6)
            .init::<B>(&device);
        burns.gamma = ours.gamma.clone();
        burns.beta = Some(ours.beta.clone());
        let x = Tensor::<B, 3>::random([2, 5, 6], Distribution::Normal(1.0, 2.0), &device).require_grad();
        let probe = Tensor::<B, 3>::random([2, 5, 6], Distribution::Normal(0.0, 1.0), &device);
        let max_diff = |a: Tensor<crate::backend::Cpu, 3>, b: Tensor<crate::backend::Cpu, 3>| -> f32 {
            (a - b).abs().max().into_scalar()
        };
        // One graph after the other: a backward pass consumes the nodes it shares with another.
        let a = ours.forward(x.clone());
        let ga = (a.clone() * probe.clone()).sum().backward();
        let b = burns.forward(x.clone());
        let gb = (b.clone() * probe).sum().backward();
        assert!(max_diff(a.inner(), b.inner()) < 1e-5, "forward differs");
        assert!(
            max_diff(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) < 1e-5,
            "input gradient differs"
        );
        let gamma = |g: Tensor<crate::backend::Cpu, 1>| g.reshape([1, 1, 6]);
        assert!(
            max_diff(
                gamma(ours.gamma.grad(&ga).unwrap()),
                gamma(burns.gamma.grad(&gb).unwrap())
            ) < 1e-5,
            "gamma gradient differs"
        );
    }
}
