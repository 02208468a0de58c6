//! A linear layer (`y = x·W + b`, weights `[in, out]` as in Burn) whose `forward` multiplies
//! small per-image inputs as one product.
//!
//! Burn 0.21 multiplies a `B×N×C` input image by image with the weight broadcast, and its weight
//! gradient builds `B×C×C'` before summing over the batch: 1 GiB for vvt_tiny's last MLP at batch
//! 512 and 32² input, where `N = 1`, and a product with `K = 1` per image. Inputs of at most
//! [`GROUP_TOKENS`] tokens per image are regrouped into products of up to [`GROUP_ROWS`] rows;
//! larger ones keep Burn's shapes (regrouping them measured slower with cuBLAS on the H100).

use burn::module::{Initializer, Param};
use burn::prelude::*;

/// Most rows in one regrouped product.
pub const GROUP_ROWS: usize = 4096;
/// Most tokens per image for an input to be regrouped.
pub const GROUP_TOKENS: usize = 16;

/// `Linear(d_input, d_output)` with the papers' initialisation: weights normal(0, 0.02) (timm's
/// `trunc_normal_(std=0.02)` truncates at ±2, 100σ: the same distribution in practice), bias 0.
#[derive(Config, Debug)]
pub struct LinearConfig {
    pub d_input: usize,
    pub d_output: usize,
    #[config(default = true)]
    pub bias: bool,
}

impl LinearConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Linear<B> {
        let normal = Initializer::Normal { mean: 0.0, std: 0.02 };
        Linear {
            weight: normal.init_with(
                [self.d_input, self.d_output],
                Some(self.d_input),
                Some(self.d_output),
                device,
            ),
            bias: self
                .bias
                .then(|| Initializer::Zeros.init([self.d_output], device)),
        }
    }
}

/// Weights `[d_input, d_output]` and an optional bias (Burn's `Linear` record).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// `x`: `[..., d_input]` → `[..., d_output]`, inputs of few tokens per image regrouped.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if D < 3 {
            return self.forward_reference(x);
        }
        let mut dims = x.dims();
        let (n, c) = (dims[D - 2], dims[D - 1]);
        if n > GROUP_TOKENS {
            return self.forward_reference(x);
        }
        let images = dims[..D - 2].iter().product::<usize>();
        // The largest divisor of the image count that keeps a group within GROUP_ROWS rows.
        let per_group = (1..=images.min(GROUP_ROWS / n.max(1)))
            .rev()
            .find(|k| images.is_multiple_of(*k))
            .unwrap_or(1);
        if per_group == 1 {
            return self.forward_reference(x);
        }
        let groups = images / per_group;
        let y = if groups == 1 {
            self.forward_reference(x.reshape([images * n, c]))
                .unsqueeze::<3>()
        } else {
            self.forward_reference(x.reshape([groups, per_group * n, c]))
        };
        dims[D - 1] = y.dims()[2];
        y.reshape(dims)
    }

    /// Burn's linear function on the input as it is.
    pub fn forward_reference<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        burn::tensor::module::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, ElementConversion};

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    fn rel<Bk: Backend>(a: Tensor<Bk, 4>, b: Tensor<Bk, 4>) -> f32 {
        let num: f32 = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar().elem();
        let den: f32 = b.powi_scalar(2).sum().sqrt().into_scalar().elem();
        num / den.max(1e-12)
    }

    /// Grouped products, one 2-D product (all images in one group), Burn's own shape (`N` above
    /// `GROUP_TOKENS`, or a prime image count whose one group would be too big): the same outputs
    /// and gradients.
    #[test]
    fn regrouped_rows_match_the_plain_product_with_gradients() {
        let device = Default::default();
        let mut layer = LinearConfig::new(6, 5).init::<B>(&device);
        layer.bias = layer
            .bias
            .map(|b| b.map(|t| t.add_scalar(0.3).detach().require_grad()));
        for dims in [
            [4, 300, 16, 6],
            [1, 2, 3, 6],
            [1, 3, 17, 6],
            [1, 257, 16, 6],
            [2, 8, 1, 6],
        ] {
            let x = Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let ours = layer.forward(x.clone());
            let want = layer.forward_reference(x.clone());
            assert_eq!(ours.dims(), want.dims());
            assert!(rel(ours.clone(), want.clone()) < 1e-6, "forward {dims:?}");
            let probe = Tensor::<B, 4>::random(want.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (layer.forward_reference(x.clone()) * probe).sum().backward();
            let gx = |g: &_| x.grad(g).unwrap();
            let gw = |g: &_| layer.weight.val().grad(g).unwrap().unsqueeze::<4>();
            let gb = |g: &_| {
                layer
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(g)
                    .unwrap()
                    .unsqueeze::<4>()
            };
            assert!(rel(gx(&g1), gx(&g2)) < 1e-6, "dx {dims:?}");
            assert!(rel(gw(&g1), gw(&g2)) < 1e-5, "dw {dims:?}");
            assert!(rel(gb(&g1), gb(&g2)) < 1e-5, "db {dims:?}");
        }
        // A 3-D input takes the same path.
        let x = Tensor::<B, 3>::random([8, 2, 6], Distribution::Normal(0.0, 1.0), &device);
        let diff = (layer.forward(x.clone()) - layer.forward_reference(x))
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>();
        assert!(diff < 1e-5);
    }

    /// The record is Burn's: a `burn::nn::Linear` with the same tensors computes the same.
    #[test]
    fn equals_burns_linear_layer() {
        let device = Default::default();
        let ours = LinearConfig::new(4, 3).init::<B>(&device);
        let mut burns = burn::nn::LinearConfig::new(4, 3).init::<B>(&device);
        burns.weight = burn::module::Param::from_tensor(ours.weight.val());
        burns.bias = ours
            .bias
            .as_ref()
            .map(|b| burn::module::Param::from_tensor(b.val()));
        // Few tokens per image: the regrouped product.
        let x = Tensor::<B, 3>::random([30, 2, 4], Distribution::Normal(0.0, 1.0), &device);
        let d: f32 = (ours.forward(x.clone()) - burns.forward(x))
            .abs()
            .max()
            .into_scalar()
            .elem();
        assert!(d < 1e-6);
    }
}
