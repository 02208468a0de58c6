//! 2-D convolutions of channels-last token grids (`B×H×W×C`, the layout of the tokens).
//!
//! Without CubeCL autotuning, Burn's CUDA convolution falls back to direct kernels whose weight
//! gradient reduces over batch × height × width in one thread per weight: a handful of patch
//! embeddings then cost more than the rest of a training step. Here a dense convolution is its
//! patches (im2col, a fused gather where the backend has it) times the kernel matrix, one product
//! per image, and a depth-wise one a fused kernel or k² shifted multiply-adds. Both are tested
//! against Burn's `conv2d` ([`Conv2d::forward_reference`]).

use burn::module::{Initializer, Param};
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;
use serde::{Deserialize, Serialize};

use crate::kernels::depthwise::depthwise_conv2d;
use crate::kernels::im2col::im2col;

/// How a convolution's weights are drawn (biases start at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvInit {
    /// normal(0, 0.02) (LSAGT).
    Normal002,
    /// normal(0, √(2/fan_out)), fan_out = k·k·C_out/groups (VVT, as in PVT; mmcv's
    /// `kaiming_init` of a segmentation `ConvModule`).
    FanOut,
    /// normal(0, 0.01) (a segmentation head's classifier, `conv_seg`).
    Normal001,
    /// uniform(±√(6/(fan_in + fan_out))) (mmseg's FPN neck, `xavier_init`).
    XavierUniform,
}

/// `Conv2d(C_in, C_out, k, stride, padding, groups)` with a bias.
#[derive(Config, Debug)]
pub struct Conv2dConfig {
    /// `[C_in, C_out]`.
    pub channels: [usize; 2],
    pub kernel: usize,
    #[config(default = 1)]
    pub stride: usize,
    /// Zero padding on every side.
    #[config(default = 0)]
    pub padding: usize,
    #[config(default = 1)]
    pub groups: usize,
    #[config(default = "ConvInit::Normal002")]
    pub init: ConvInit,
    /// Off where a normalisation follows (its shift makes a bias redundant).
    #[config(default = true)]
    pub bias: bool,
}

impl Conv2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Conv2d<B> {
        let [cin, cout] = self.channels;
        let k = self.kernel;
        assert!(
            self.groups > 0 && cin.is_multiple_of(self.groups) && cout.is_multiple_of(self.groups),
            "Conv2d: {cin} → {cout} channels do not split into {} groups",
            self.groups
        );
        let (fan_in, fan_out) = (k * k * cin / self.groups, k * k * cout / self.groups);
        let init = match self.init {
            ConvInit::Normal002 => Initializer::Normal { mean: 0.0, std: 0.02 },
            ConvInit::Normal001 => Initializer::Normal { mean: 0.0, std: 0.01 },
            ConvInit::FanOut => Initializer::Normal {
                mean: 0.0,
                std: (2.0 / fan_out as f64).sqrt(),
            },
            ConvInit::XavierUniform => {
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
                Initializer::Uniform { min: -a, max: a }
            }
        };
        Conv2d {
            weight: init.init([cout, cin / self.groups, k, k], device),
            bias: self.bias.then(|| Initializer::Zeros.init([cout], device)),
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        }
    }
}

/// A square-kernel convolution: weights `[C_out, C_in/groups, k, k]` as in PyTorch and Burn.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

/// Output side of a convolution, or `None` when the kernel does not fit.
pub fn conv_out(size: usize, kernel: usize, stride: usize, pad: usize) -> Option<usize> {
    (size + 2 * pad)
        .checked_sub(kernel)
        .map(|s| s / stride.max(1) + 1)
}

impl<B: Backend> Conv2d<B> {
    pub fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }

    fn channels(&self) -> (usize, usize) {
        let [cout, cin_g, _, _] = self.weight.dims();
        (cin_g * self.groups, cout)
    }

    /// `x`: `B×H×W×C_in` → `B×Ho×Wo×C_out`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (cin, cout) = self.channels();
        if self.groups == 1 {
            let b = x.dims()[0];
            let (cols, (ho, wo)) = self.im2col(x);
            return self.forward_columns(cols).reshape([b, ho, wo, cout]);
        }
        assert!(
            self.groups == cin && cin == cout,
            "Conv2d: only dense and depth-wise convolutions are supported ({} groups of {cin} → {cout})",
            self.groups
        );
        let k = self.kernel();
        let y = depthwise_conv2d(
            x,
            self.weight.val().reshape([cin, k * k]),
            k,
            self.stride,
            self.padding,
        );
        match &self.bias {
            Some(bias) => y + bias.val().reshape([1, 1, 1, cout]),
            None => y,
        }
    }

    /// Burn's `conv2d` on the same channels-last input: the plain path [`Self::forward`] equals.
    pub fn forward_reference(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (s, p) = (self.stride, self.padding);
        let options = ConvOptions::new([s, s], [p, p], [1, 1], self.groups);
        let y = burn::tensor::module::conv2d(
            x.permute([0, 3, 1, 2]),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            options,
        );
        y.permute([0, 2, 3, 1])
    }

    /// The patches of a dense convolution of `x` (`B×H×W×C_in`): `B×(Ho·Wo)×(k·k·C_in)`, ordered
    /// (row, col, channel) like [`Self::kernel_matrix`], and the output grid `(Ho, Wo)`.
    /// Non-overlapping kernels (stride = kernel, no padding) need no copy beyond a reshape.
    pub fn im2col(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, (usize, usize)) {
        let (k, s, p) = (self.kernel(), self.stride, self.padding);
        let (cin, _) = self.channels();
        assert_eq!(self.groups, 1, "im2col is for dense convolutions");
        let [b, h, w, c] = x.dims();
        assert_eq!(
            c, cin,
            "convolution: {c} input channels, the kernel expects {cin}"
        );
        let out = |n| conv_out(n, k, s, p).expect("the kernel fits the input");
        let (ho, wo) = (out(h), out(w));
        let cols = if k == s && p == 0 && h == ho * k && w == wo * k {
            x.reshape([b, ho, k, wo, k, c])
                .permute([0, 1, 3, 2, 4, 5])
                .reshape([b, ho * wo, k * k * c])
        } else {
            im2col(x, k, s, p)
        };
        (cols, (ho, wo))
    }

    /// The kernel as a `(k·k·C_in)×C_out` matrix (rows ordered like [`Self::im2col`]).
    pub fn kernel_matrix(&self) -> Tensor<B, 2> {
        let [cout, cin, k, k2] = self.weight.dims();
        self.weight
            .val()
            .permute([2, 3, 1, 0])
            .reshape([k * k2 * cin, cout])
    }

    /// A dense convolution applied to its patches `cols` (`B×P×(k·k·C_in)`) → `B×P×C_out`.
    /// `cols` may have zero columns past `k·k·C_in` (rows padded to an aligned width).
    pub fn forward_columns(&self, cols: Tensor<B, 3>) -> Tensor<B, 3> {
        let weight = zero_pad_dim(self.kernel_matrix(), 0, cols.dims()[2]);
        let cout = weight.dims()[1];
        // One product per image against the shared kernel: the weight gradient then runs as `b`
        // products over `ho·wo` rows plus a sum, instead of one product whose reduction runs
        // over all `b·ho·wo` rows on a handful of thread blocks (CubeCL's untuned matmul has no
        // split-K). This made lsagt_cifar_tiny's training step 2.1× faster on the H200.
        let y = cols.matmul(weight.unsqueeze_dim::<3>(0));
        match &self.bias {
            Some(bias) => y + bias.val().reshape([1, 1, cout]),
            None => y,
        }
    }
}

/// `T` dense convolutions of one geometry applied to their own patches `cols`
/// (`T×B×P×(k·k·C_in)`, ordered like [`Conv2d::im2col`], possibly zero-padded past `k·k·C_in`)
/// → `T×B×P×C_out` without the biases, and the biases (`T×C_out`, if the convolutions have
/// them), for a caller that adds them in a later kernel. One batched product instead of `T`.
pub fn forward_many_columns<B: Backend>(
    convs: &[Conv2d<B>],
    cols: Tensor<B, 4>,
) -> (Tensor<B, 4>, Option<Tensor<B, 2>>) {
    let t = convs.len();
    let [cout, cin, k, k2] = convs[0].weight.dims();
    // Stacked as stored, then one permutation to im2col's row order (`kernel_matrix` of each).
    let weights: Tensor<B, 5> = stack_params(convs.iter().map(|c| c.weight.val()).collect());
    let weights = weights.permute([0, 3, 4, 2, 1]).reshape([t, k * k2 * cin, cout]);
    let rows = cols.dims()[3];
    let y = cols.matmul(zero_pad_dim(weights, 1, rows).unsqueeze_dim(1));
    let biases: Vec<Tensor<B, 1>> = convs
        .iter()
        .filter_map(|c| c.bias.as_ref().map(|b| b.val()))
        .collect();
    assert!(
        biases.is_empty() || biases.len() == t,
        "forward_many_columns: either every convolution has a bias or none has"
    );
    (y, (!biases.is_empty()).then(|| stack_params(biases)))
}

/// `m` with zeros appended along `dim` up to `len` entries (a weight matrix for patch rows that
/// come padded to an aligned width).
fn zero_pad_dim<B: Backend, const D: usize>(m: Tensor<B, D>, dim: usize, len: usize) -> Tensor<B, D> {
    let mut dims = m.dims();
    if dims[dim] >= len {
        return m;
    }
    dims[dim] = len - dims[dim];
    let zeros = Tensor::zeros(dims, (&m.device(), m.dtype()));
    Tensor::cat(vec![m, zeros], dim)
}

/// Same-shaped tensors stacked along a new first axis (`D2 = D + 1`): LSAGT stacks its variant
/// projections' weights and biases every step. Where the backend has the `concat` kernel this is
/// one launch each way ([`crate::kernels::concat::stack`]); Burn's `stack` otherwise.
pub fn stack_params<B: Backend, const D: usize, const D2: usize>(ts: Vec<Tensor<B, D>>) -> Tensor<B, D2> {
    assert!(!ts.is_empty(), "stack_params: nothing to stack");
    crate::kernels::concat::stack(ts).unwrap_or_else(|ts| Tensor::stack(ts, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, ElementConversion};

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    fn rel<Bk: Backend, const D: usize>(a: Tensor<Bk, D>, b: Tensor<Bk, D>) -> f32 {
        let num: f32 = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar().elem();
        let den: f32 = b.powi_scalar(2).sum().sqrt().into_scalar().elem();
        num / den.max(1e-12)
    }

    fn with_bias(conv: Conv2d<B>, shift: f64) -> Conv2d<B> {
        Conv2d {
            bias: conv
                .bias
                .map(|b| b.map(|t| t.add_scalar(shift).detach().require_grad())),
            ..conv
        }
    }

    /// The same values and input, weight and bias gradients as Burn's `conv2d`.
    fn check(conv: &Conv2d<B>, dims: [usize; 4], what: &str) {
        let device = Default::default();
        let x = Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad();
        let ours = conv.forward(x.clone());
        let want = conv.forward_reference(x.clone());
        assert_eq!(ours.dims(), want.dims(), "{what}");
        assert!(rel(ours.clone(), want.clone()) < 1e-5, "forward {what}");
        let probe = Tensor::<B, 4>::random(want.dims(), Distribution::Normal(0.0, 1.0), &device);
        // Separate graphs: a backward pass consumes the nodes it shares with another graph.
        let g1 = (ours * probe.clone()).sum().backward();
        let g2 = (conv.forward_reference(x.clone()) * probe).sum().backward();
        let gx = |g: &_| x.grad(g).unwrap();
        let gw = |g: &_| conv.weight.val().grad(g).unwrap();
        let gb = |g: &_| conv.bias.as_ref().unwrap().val().grad(g).unwrap();
        assert!(rel(gx(&g1), gx(&g2)) < 1e-5, "dx {what}");
        assert!(rel(gw(&g1), gw(&g2)) < 1e-5, "dw {what}");
        assert!(rel(gb(&g1), gb(&g2)) < 1e-5, "db {what}");
    }

    /// Every dense (kernel, stride, padding) the models use, plus odd grid sizes, and depth-wise
    /// convolutions.
    #[test]
    fn convs_match_burn_conv2d_forward_and_gradients() {
        let device = Default::default();
        let dense = [
            (3, 8, 7, 4, 3, 32, 32),
            (4, 6, 3, 2, 1, 9, 7),
            (3, 5, 3, 1, 1, 8, 8),
            (5, 4, 2, 2, 0, 8, 6),
            (3, 4, 4, 4, 0, 9, 8),
            (3, 4, 3, 1, 0, 6, 6),
        ]
        .map(|(cin, cout, k, s, p, h, w)| {
            let config = Conv2dConfig::new([cin, cout], k).with_stride(s).with_padding(p);
            (config, [2, h, w, cin], format!("k{k} s{s} p{p} {h}x{w}"))
        });
        let depthwise = [(6, 7, 5), (4, 8, 8)].map(|(c, h, w)| {
            let config = Conv2dConfig::new([c, c], 3)
                .with_padding(1)
                .with_groups(c)
                .with_init(ConvInit::FanOut);
            (config, [2, h, w, c], format!("depth-wise {h}x{w}"))
        });
        for (config, dims, what) in dense.into_iter().chain(depthwise) {
            check(&with_bias(config.init::<B>(&device), 0.3), dims, &what);
        }
    }

    /// The batched form of several convolutions equals each convolution on its own patches,
    /// values and gradients (input, kernel and bias of every convolution).
    #[test]
    fn many_convs_match_each_conv() {
        let device = Default::default();
        let convs: Vec<Conv2d<B>> = (0..3)
            .map(|i| {
                let c = Conv2dConfig::new([3, 5], 3).with_padding(1).init::<B>(&device);
                with_bias(c, 0.1 * i as f64)
            })
            .collect();
        let xs: Vec<Tensor<B, 4>> = (0..3)
            .map(|_| Tensor::random([2, 6, 5, 3], Distribution::Normal(0.0, 1.0), &device).require_grad())
            .collect();
        let ours = |xs: &[Tensor<B, 4>]| {
            let cols = convs.iter().zip(xs).map(|(c, x)| c.im2col(x.clone()).0).collect();
            let (y, bias) = forward_many_columns(&convs, Tensor::stack(cols, 0));
            y + bias.unwrap().reshape([3, 1, 1, 5])
        };
        let want = |xs: &[Tensor<B, 4>]| {
            Tensor::stack::<4>(
                convs
                    .iter()
                    .zip(xs)
                    .map(|(c, x)| c.forward_reference(x.clone()).reshape([2, 30, 5]))
                    .collect(),
                0,
            )
        };
        assert_eq!(ours(&xs).dims(), [3, 2, 30, 5]);
        let probe = Tensor::<B, 4>::random([3, 2, 30, 5], Distribution::Normal(0.0, 1.0), &device);
        assert!(rel(ours(&xs), want(&xs)) < 1e-5, "forward");
        let g1 = (ours(&xs) * probe.clone()).sum().backward();
        let g2 = (want(&xs) * probe).sum().backward();
        for (t, (conv, x)) in convs.iter().zip(&xs).enumerate() {
            assert!(rel(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-5, "dx {t}");
            let gw = |g: &_| conv.weight.val().grad(g).unwrap();
            assert!(rel(gw(&g1), gw(&g2)) < 1e-5, "dw {t}");
            let gb = |g: &_| conv.bias.as_ref().unwrap().val().grad(g).unwrap();
            let (b1, b2) = (gb(&g1), gb(&g2));
            let err: f32 = (b1 - b2.clone()).abs().max().into_scalar().elem();
            let scale: f32 = b2.abs().max().into_scalar().elem();
            assert!(err <= 1e-5 * scale.max(1.0), "db {t}");
        }
    }
}
