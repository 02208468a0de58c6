//! Convolutions written as shifted slices and matrix products.
//!
//! Without CubeCL autotuning, Burn's CUDA convolution falls back to direct kernels whose weight
//! gradient reduces over batch × height × width in one thread per weight: a handful of patch
//! embeddings then cost more than the rest of a training step. Here the models' convolutions become
//! im2col + one matmul (dense kernels) or nine shifted multiply-adds (depth-wise 3×3), which fuse and
//! run on the tensor cores. The layouts are channels-last (`B×H×W×C`), the layout of the tokens.
//! Each function is tested against `burn::nn::conv::Conv2d::forward` (the reference path).

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::kernels::depthwise::depthwise_conv2d;
use crate::kernels::im2col::{im2col, out_size};

/// [`Linear::forward`] with the images of a batch multiplied in groups of up to [`LINEAR_ROWS`]
/// rows. Burn 0.21 multiplies a `B×N×C` input image by image with the weight broadcast, and its
/// weight gradient builds `B×C×C'` before summing over the batch: 1 GiB for vvt_tiny's last MLP at
/// batch 512 and 32² input, where `N = 1`, and a product with `K = 1` per image. Only inputs of at
/// most [`LINEAR_TOKENS`] tokens per image are regrouped: regrouping every input measured +11 % at
/// 32² but −6 % at 224² (session 5, CubeCL's matmuls), and one 2-D product over all rows of every
/// layer, with fewer launches, measured slower again with cuBLAS (vvt_tiny 224² b64 bf16 training
/// ~1,590 against ~1,790 img/s, session 11). `VICINITY_LINEAR_ROWS=0` keeps Burn's shapes
/// everywhere (for A/B runs).
pub trait LinearRows<B: Backend> {
    fn forward_rows<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

/// Most rows in one regrouped product of [`LinearRows`].
pub const LINEAR_ROWS: usize = 4096;
/// Most tokens per image for [`LinearRows`] to regroup an input.
pub const LINEAR_TOKENS: usize = 16;

impl<B: Backend> LinearRows<B> for Linear<B> {
    fn forward_rows<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var("VICINITY_LINEAR_ROWS").is_ok_and(|v| v.trim() == "0"));
        if D < 3 || off {
            return self.forward(x);
        }
        let mut dims = x.dims();
        let (n, c) = (dims[D - 2], dims[D - 1]);
        if n > LINEAR_TOKENS {
            return self.forward(x);
        }
        let images = dims[..D - 2].iter().product::<usize>();
        // The largest divisor of the image count that keeps a group within LINEAR_ROWS rows.
        let per_group = (1..=images.min(LINEAR_ROWS / n.max(1)))
            .rev()
            .find(|k| images.is_multiple_of(*k))
            .unwrap_or(1);
        if per_group == 1 {
            return self.forward(x);
        }
        let groups = images / per_group;
        let y = if groups == 1 {
            self.forward(x.reshape([images * n, c])).unsqueeze::<3>()
        } else {
            self.forward(x.reshape([groups, per_group * n, c]))
        };
        dims[D - 1] = y.dims()[2];
        y.reshape(dims)
    }
}

/// Square kernel, stride and padding of a convolution (Burn keeps them per axis).
pub fn conv_geometry<B: Backend>(conv: &Conv2d<B>) -> (usize, usize, usize) {
    let [_, _, k, k2] = conv.weight.dims();
    assert_eq!(k, k2, "only square kernels are used by the models");
    let pad = match &conv.padding {
        burn::nn::PaddingConfig2d::Explicit(a, ..) => *a,
        burn::nn::PaddingConfig2d::Valid => 0,
        other => panic!("unsupported padding {other:?}"),
    };
    (k, conv.stride[0], pad)
}

/// The patches of a dense convolution of channels-last `x` (`B×H×W×Cin`): `B×(Ho·Wo)×(k·k·Cin)`,
/// ordered (row, col, channel) like [`kernel_matrix`], and the output grid `(Ho, Wo)`.
/// Non-overlapping kernels (stride = kernel, no padding) need no copy beyond a reshape.
pub fn im2col_nhwc<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> (Tensor<B, 3>, (usize, usize)) {
    let (k, s, p) = conv_geometry(conv);
    let [_, cin, _, _] = conv.weight.dims();
    assert_eq!(conv.groups, 1, "im2col is for dense convolutions");
    let [b, h, w, c] = x.dims();
    assert_eq!(
        c, cin,
        "convolution: {c} input channels, the kernel expects {cin}"
    );
    let (ho, wo) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let cols = if k == s && p == 0 && h == ho * k && w == wo * k {
        x.reshape([b, ho, k, wo, k, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b, ho * wo, k * k * c])
    } else {
        im2col(x, k, s, p)
    };
    (cols, (ho, wo))
}

/// The kernel of a dense convolution as a `(k·k·Cin)×Cout` matrix (rows ordered like [`im2col_nhwc`]).
pub fn kernel_matrix<B: Backend>(conv: &Conv2d<B>) -> Tensor<B, 2> {
    let [cout, cin, k, k2] = conv.weight.dims();
    conv.weight
        .val()
        .permute([2, 3, 1, 0])
        .reshape([k * k2 * cin, cout])
}

/// A dense (groups = 1) convolution of channels-last `x` (`B×H×W×Cin`) → `B×Ho×Wo×Cout`, as
/// im2col + a matmul.
pub fn conv2d_nhwc<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let b = x.dims()[0];
    let (cols, (ho, wo)) = im2col_nhwc(conv, x);
    let weight = kernel_matrix(conv);
    let cout = weight.dims()[1];
    // One product per image against the shared kernel: the weight gradient then runs as `b`
    // products over `ho·wo` rows plus a sum, instead of one product whose reduction runs over all
    // `b·ho·wo` rows on a handful of thread blocks (CubeCL's untuned matmul has no split-K). This
    // made lsagt_cifar_tiny's training step 2.1× faster (docs/GPU_RESULTS.md, 2026-11-22).
    let mut y = cols.matmul(weight.unsqueeze_dim::<3>(0));
    if let Some(bias) = &conv.bias {
        y = y + bias.val().reshape([1, 1, cout]);
    }
    y.reshape([b, ho, wo, cout])
}

/// `T` dense convolutions with the same geometry, convolution `t` applied to input `t`
/// (`T×B×H×W×Cin` given as `T` tensors) → `T×B×(Ho·Wo)×Cout` and the output grid: one batched
/// product instead of `T`, and no stacking of the large outputs.
pub fn conv2d_nhwc_many<B: Backend>(
    convs: &[Conv2d<B>],
    xs: Vec<Tensor<B, 4>>,
) -> (Tensor<B, 4>, (usize, usize)) {
    assert!(
        !convs.is_empty() && convs.len() == xs.len(),
        "one input per convolution"
    );
    let mut grid = None;
    let cols = convs
        .iter()
        .zip(xs)
        .map(|(conv, x)| {
            let (cols, g) = im2col_nhwc(conv, x);
            if let Some(first) = grid {
                assert!(
                    first == g,
                    "convolutions give different output grids: {first:?} and {g:?} (check the input size)"
                );
            }
            grid = Some(g);
            cols
        })
        .collect();
    let cols: Tensor<B, 4> = Tensor::stack(cols, 0);
    (
        conv2d_many_columns(convs, cols),
        grid.expect("at least one convolution"),
    )
}

/// `T` dense convolutions applied to their patches `cols` (`T×B×P×(k·k·Cin)`, ordered like
/// [`im2col_nhwc`]) → `T×B×P×Cout`.
pub fn conv2d_many_columns<B: Backend>(convs: &[Conv2d<B>], cols: Tensor<B, 4>) -> Tensor<B, 4> {
    match conv2d_many_columns_unbiased(convs, cols) {
        (y, Some(bias)) => {
            let [t, cout] = bias.dims();
            y + bias.reshape([t, 1, 1, cout])
        }
        (y, None) => y,
    }
}

/// [`conv2d_many_columns`] without the biases, and the biases (`T×Cout`, if the convolutions have
/// them), for a caller that adds them in a later kernel.
pub fn conv2d_many_columns_unbiased<B: Backend>(
    convs: &[Conv2d<B>],
    cols: Tensor<B, 4>,
) -> (Tensor<B, 4>, Option<Tensor<B, 2>>) {
    let t = convs.len();
    let [cout, cin, k, k2] = convs[0].weight.dims();
    // Stacked as stored, then one permutation to im2col's row order (`kernel_matrix` of each).
    let weights: Tensor<B, 5> = stack_params(convs.iter().map(|c| c.weight.val()).collect());
    let weights = weights.permute([0, 3, 4, 2, 1]).reshape([t, k * k2 * cin, cout]);
    // Patch rows may come padded with zeros to an aligned width (kernels::patches).
    let rows = cols.dims()[3];
    let y = cols.matmul(zero_pad_dim(weights, 1, rows).unsqueeze_dim(1));
    let biases: Vec<Tensor<B, 1>> = convs
        .iter()
        .filter_map(|c| c.bias.as_ref().map(|b| b.val()))
        .collect();
    assert!(
        biases.is_empty() || biases.len() == t,
        "conv2d_nhwc_many: either every convolution has a bias or none has"
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
    if !crate::kernels::use_fused::<B>("concat", &ts[0].device()) {
        return Tensor::stack(ts, 0);
    }
    crate::kernels::concat::stack(ts).unwrap_or_else(|ts| Tensor::stack(ts, 0))
}

/// One dense convolution applied to its patches `cols` (`B×P×(k·k·Cin)`) → `B×P×Cout`.
/// `cols` may have zero columns past `k·k·Cin` (rows padded to an aligned width).
pub fn conv2d_columns<B: Backend>(conv: &Conv2d<B>, cols: Tensor<B, 3>) -> Tensor<B, 3> {
    let weight = zero_pad_dim(kernel_matrix(conv), 0, cols.dims()[2]);
    let cout = weight.dims()[1];
    let y = cols.matmul(weight.unsqueeze_dim::<3>(0));
    match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, 1, cout]),
        None => y,
    }
}

/// A depth-wise (groups = channels) convolution of channels-last `x`: the fused kernel where the
/// backend has one (stride 1), otherwise k² shifted slices times per-channel weights
/// ([`crate::kernels::depthwise`]).
pub fn depthwise_conv2d_nhwc<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let (k, s, p) = conv_geometry(conv);
    let c = x.dims()[3];
    assert!(
        conv.groups == c && conv.weight.dims()[0] == c && conv.weight.dims()[1] == 1,
        "depthwise_conv2d_nhwc needs one filter per channel"
    );
    let y = depthwise_conv2d(x, conv.weight.val().reshape([c, k * k]), k, s, p);
    match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, 1, 1, c]),
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ConvInit, conv2d};
    use burn::tensor::Distribution;

    type B = burn::backend::Autodiff<crate::backend::Cpu>;

    fn rel<Bk: Backend>(a: Tensor<Bk, 4>, b: Tensor<Bk, 4>) -> f32 {
        let num: f32 = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar().elem();
        let den: f32 = b.powi_scalar(2).sum().sqrt().into_scalar().elem();
        num / den.max(1e-12)
    }

    fn reference(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Tensor<B, 4> {
        conv.forward(x.clone().permute([0, 3, 1, 2]))
            .permute([0, 2, 3, 1])
    }

    /// Every (kernel, stride, padding) the models use, plus odd grid sizes.
    #[test]
    fn dense_conv_matches_burn_conv2d_forward_and_gradients() {
        let device = Default::default();
        for (cin, cout, k, s, p, h, w) in [
            (3, 8, 7, 4, 3, 32, 32),
            (4, 6, 3, 2, 1, 9, 7),
            (3, 5, 3, 1, 1, 8, 8),
            (5, 4, 2, 2, 0, 8, 6),
            (3, 4, 4, 4, 0, 9, 8),
            (3, 4, 3, 1, 0, 6, 6),
        ] {
            let conv = conv2d::<B>(cin, cout, k, s, p, 1, ConvInit::Normal002, &device);
            let conv = Conv2d {
                bias: Some(conv.bias.clone().unwrap().map(|b| b.add_scalar(0.3))),
                ..conv
            };
            let x = Tensor::<B, 4>::random([2, h, w, cin], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let ours = conv2d_nhwc(&conv, x.clone());
            let want = reference(&conv, &x);
            assert_eq!(ours.dims(), want.dims(), "k{k} s{s} p{p}");
            assert!(
                rel(ours.clone(), want.clone()) < 1e-5,
                "forward k{k} s{s} p{p} {h}x{w}"
            );
            // Same gradients for the input and the weight under a random linear loss.
            let probe = Tensor::<B, 4>::random(want.dims(), Distribution::Normal(0.0, 1.0), &device);
            // Separate graphs: a backward pass consumes the nodes it shares with another graph.
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (reference(&conv, &x) * probe).sum().backward();
            let gx = |g: &_| x.grad(g).unwrap();
            let gw = |g: &_| conv.weight.val().grad(g).unwrap();
            assert!(rel(gx(&g1), gx(&g2)) < 1e-5, "dx k{k} s{s} p{p}");
            assert!(rel(gw(&g1), gw(&g2)) < 1e-5, "dw k{k} s{s} p{p}");
        }
    }

    /// Grouped products, one 2-D product (all images in one group), Burn's own shape (`N` above
    /// `LINEAR_TOKENS`, or a prime image count whose one group would be too big): the same outputs and
    /// gradients.
    #[test]
    fn linear_rows_match_linear_forward_and_gradients() {
        let device = Default::default();
        let layer = crate::init::linear::<B>(6, 5, true, &device);
        let layer = Linear {
            bias: Some(
                layer
                    .bias
                    .clone()
                    .unwrap()
                    .map(|b| b.add_scalar(0.3).detach().require_grad()),
            ),
            ..layer
        };
        for dims in [
            [4, 300, 16, 6],
            [1, 2, 3, 6],
            [1, 3, 17, 6],
            [1, 257, 16, 6],
            [2, 8, 1, 6],
        ] {
            let x = Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let ours = layer.forward_rows(x.clone());
            let want = layer.forward(x.clone());
            assert_eq!(ours.dims(), want.dims());
            assert!(rel(ours.clone(), want.clone()) < 1e-6, "forward {dims:?}");
            let probe = Tensor::<B, 4>::random(want.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (layer.forward(x.clone()) * probe).sum().backward();
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
        let diff = (layer.forward_rows(x.clone()) - layer.forward(x))
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>();
        assert!(diff < 1e-5);
    }

    #[test]
    fn depthwise_conv_matches_burn_conv2d_forward_and_gradients() {
        let device = Default::default();
        for (c, h, w) in [(6, 7, 5), (4, 8, 8)] {
            let conv = conv2d::<B>(c, c, 3, 1, 1, c, ConvInit::FanOut, &device);
            let x =
                Tensor::<B, 4>::random([2, h, w, c], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let ours = depthwise_conv2d_nhwc(&conv, x.clone());
            let want = reference(&conv, &x);
            assert!(rel(ours.clone(), want.clone()) < 1e-5, "forward {h}x{w}");
            let probe = Tensor::<B, 4>::random(want.dims(), Distribution::Normal(0.0, 1.0), &device);
            // Separate graphs: a backward pass consumes the nodes it shares with another graph.
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (reference(&conv, &x) * probe).sum().backward();
            let gx = |g: &_| x.grad(g).unwrap();
            let gw = |g: &_| conv.weight.val().grad(g).unwrap();
            assert!(rel(gx(&g1), gx(&g2)) < 1e-5, "dx");
            assert!(rel(gw(&g1), gw(&g2)) < 1e-5, "dw");
        }
    }

    /// The batched form of several convolutions equals each convolution on its own input,
    /// values and gradients (input, kernel and bias of every convolution).
    #[test]
    fn many_convs_match_each_conv() {
        let device = Default::default();
        let convs: Vec<Conv2d<B>> = (0..3)
            .map(|i| {
                let c = conv2d::<B>(3, 5, 3, 1, 1, 1, ConvInit::Normal002, &device);
                Conv2d {
                    bias: Some(
                        c.bias
                            .clone()
                            .unwrap()
                            .map(|b| b.add_scalar(0.1 * i as f64).detach().require_grad()),
                    ),
                    ..c
                }
            })
            .collect();
        let xs: Vec<Tensor<B, 4>> = (0..3)
            .map(|_| Tensor::random([2, 6, 5, 3], Distribution::Normal(0.0, 1.0), &device).require_grad())
            .collect();
        let (ours, grid) = conv2d_nhwc_many(&convs, xs.clone());
        assert_eq!(grid, (6, 5));
        assert_eq!(ours.dims(), [3, 2, 30, 5]);
        let want = |xs: &[Tensor<B, 4>]| {
            Tensor::stack::<4>(
                convs
                    .iter()
                    .zip(xs)
                    .map(|(c, x)| reference(c, x).reshape([2, 30, 5]))
                    .collect(),
                0,
            )
        };
        let probe = Tensor::<B, 4>::random([3, 2, 30, 5], Distribution::Normal(0.0, 1.0), &device);
        assert!(rel(ours.clone(), want(&xs)) < 1e-5, "forward");
        let g1 = (ours * probe.clone()).sum().backward();
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
