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

/// `GroupNorm(groups, C)` of channels-last grids (`B×H×W×C`): each image's channels in `groups`
/// equal runs, normalised over the run and every position, then scaled and shifted per channel.
/// Its statistics come from one image, so it behaves the same at any batch size and on any
/// number of GPUs (the segmentation heads' normalisation). Record as Burn's `GroupNorm`.
#[derive(Config, Debug)]
pub struct GroupNormConfig {
    pub num_groups: usize,
    pub num_channels: usize,
    #[config(default = 1e-5)]
    pub epsilon: f64,
}

impl GroupNormConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> GroupNorm<B> {
        assert!(
            self.num_groups > 0 && self.num_channels.is_multiple_of(self.num_groups),
            "GroupNorm: {} channels do not split into {} groups",
            self.num_channels,
            self.num_groups
        );
        GroupNorm {
            gamma: Initializer::Ones.init([self.num_channels], device),
            beta: Initializer::Zeros.init([self.num_channels], device),
            num_groups: self.num_groups,
            epsilon: self.epsilon,
        }
    }
}

#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub num_groups: usize,
    pub epsilon: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// `x`: `B×H×W×C`. Statistics in f32 whatever the input's dtype.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, w, c] = x.dims();
        let g = self.num_groups;
        let dtype = x.dtype();
        let x = x.cast(burn::tensor::DType::F32).reshape([b, h * w, g, c / g]);
        let mean = x.clone().mean_dim(1).mean_dim(3);
        let centred = x - mean;
        let var = centred.clone().square().mean_dim(1).mean_dim(3);
        let y = centred
            .div(var.add_scalar(self.epsilon).sqrt())
            .reshape([b, h, w, c]);
        let y = y.cast(dtype);
        y * self.gamma.val().reshape([1, 1, 1, c]) + self.beta.val().reshape([1, 1, 1, c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

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

    /// The same values and gradients as Burn's (channels-first) module.
    #[test]
    fn group_norm_matches_burn() {
        let device = Default::default();
        let ours = GroupNormConfig::new(3, 6).init::<B>(&device);
        let ours = GroupNorm {
            gamma: Param::from_tensor(Tensor::random([6], Distribution::Normal(1.0, 0.5), &device)),
            beta: Param::from_tensor(Tensor::random([6], Distribution::Normal(0.0, 0.5), &device)),
            ..ours
        };
        let mut theirs = burn::nn::GroupNormConfig::new(3, 6).init::<B>(&device);
        theirs.gamma = Some(ours.gamma.clone());
        theirs.beta = Some(ours.beta.clone());
        let x = Tensor::<B, 4>::random([2, 5, 4, 6], Distribution::Normal(0.5, 2.0), &device).require_grad();
        let probe = Tensor::<B, 4>::random([2, 5, 4, 6], Distribution::Normal(0.0, 1.0), &device);
        let a = ours.forward(x.clone());
        let b = theirs
            .forward(x.clone().permute([0, 3, 1, 2]))
            .permute([0, 2, 3, 1]);
        a.clone()
            .into_data()
            .assert_approx_eq::<f32>(&b.clone().into_data(), Tolerance::absolute(1e-5));
        let ga = (a * probe.clone()).sum().backward();
        let gb = (b * probe).sum().backward();
        x.grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&x.grad(&gb).unwrap().into_data(), Tolerance::absolute(1e-4));
        ours.gamma.grad(&ga).unwrap().into_data().assert_approx_eq::<f32>(
            &theirs.gamma.unwrap().grad(&gb).unwrap().into_data(),
            Tolerance::absolute(1e-4),
        );
    }
}
