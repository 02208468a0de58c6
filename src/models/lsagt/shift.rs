//! LSAGT's shifted image variants and their patch embedding.
//!
//! The image is embedded T times, once per shifted variant (CIFAR: 18 circular rolls; ImageNet:
//! 10 circular left/top paddings), each variant by its own convolution. The patches of all
//! variants are one gather from the image ([`ShiftScheme::patch_index`]); the rolls and paddings
//! themselves ([`ShiftedPatchEmbed::forward_reference`]) are the plain path it is tested against.

use std::sync::{Arc, Mutex};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::patches::{shifted_patches, shifted_patches_reference};
use crate::nn::{Conv2d, forward_many_columns};

/// CIFAR variants 1..=17: the whole image circularly rolled by `(dy, dx)` along (H, W)
/// (`torch.roll` semantics: a pixel moves from `(y, x)` to `(y + dy, x + dx)`).
pub const CIFAR_SHIFTS: [(i64, i64); 17] = [
    (1, 0),
    (0, 1),
    (-1, 0),
    (0, -1),
    (2, 0),
    (0, 2),
    (-2, 0),
    (0, -2),
    (1, 1),
    (1, 2),
    (1, -1),
    (-1, 1),
    (-1, 2),
    (-1, -1),
    (2, 1),
    (2, 2),
    (2, -1),
];

/// ImageNet variants 1..=9: the image circularly padded by `(left, top)` pixels (the canvas grows,
/// so the convolution windows shift).
pub const IMAGENET_PADS: [(usize, usize); 9] = [
    (1, 0),
    (2, 0),
    (3, 0),
    (0, 1),
    (0, 2),
    (0, 3),
    (1, 1),
    (2, 2),
    (3, 3),
];

/// How the shifted image variants are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShiftScheme {
    /// 18 variants: the image and 17 circular rolls ([`CIFAR_SHIFTS`]).
    Cifar,
    /// 10 variants: the image and 9 circular left/top paddings ([`IMAGENET_PADS`]).
    Imagenet,
}

impl ShiftScheme {
    /// T, the number of variants including the image itself.
    pub fn num_variants(self) -> usize {
        match self {
            Self::Cifar => CIFAR_SHIFTS.len() + 1,
            Self::Imagenet => IMAGENET_PADS.len() + 1,
        }
    }

    /// Extra canvas `(width, height)` of variant `t`.
    pub(crate) fn growth(self, t: usize) -> (usize, usize) {
        match self {
            Self::Imagenet if t > 0 => IMAGENET_PADS[t - 1],
            _ => (0, 0),
        }
    }

    /// The pixel of an `h×w` image at `(row, col)` of variant `t`'s canvas: circular (the
    /// released code), or with `reflect` the image translated with reflection padding (the LSAGT
    /// paper's "shifting variants as a pre-processing step", Table 5).
    fn source(
        self,
        t: usize,
        (h, w): (usize, usize),
        (y, x): (usize, usize),
        reflect: bool,
    ) -> (usize, usize) {
        if reflect && t > 0 {
            let (dy, dx) = match self {
                Self::Cifar => CIFAR_SHIFTS[t - 1],
                Self::Imagenet => {
                    let (left, top) = self.growth(t);
                    (top as i64, left as i64)
                }
            };
            return (mirror(y as i64 - dy, h), mirror(x as i64 - dx, w));
        }
        match self {
            Self::Cifar if t > 0 => {
                let (dy, dx) = CIFAR_SHIFTS[t - 1];
                (
                    (y as i64 - dy).rem_euclid(h as i64) as usize,
                    (x as i64 - dx).rem_euclid(w as i64) as usize,
                )
            }
            _ => {
                let (left, top) = self.growth(t);
                ((y + h - top) % h, (x + w - left) % w)
            }
        }
    }

    /// For every variant, output position and kernel tap `(row, col)`, the image pixel that the
    /// patch column reads (row-major), or `h·w` (a zero pixel) where it falls in the convolution's
    /// zero padding; and the output grid. Cached per geometry.
    pub fn patch_index(
        self,
        (h, w): (usize, usize),
        (k, s, p): (usize, usize, usize),
        variants: usize,
        reflect: bool,
    ) -> (Arc<Vec<i64>>, (usize, usize)) {
        type Key = (ShiftScheme, usize, usize, usize, usize, usize, usize, bool);
        type Index = (Arc<Vec<i64>>, (usize, usize));
        static CACHE: Mutex<Vec<(Key, Index)>> = Mutex::new(Vec::new());
        let key = (self, h, w, k, s, p, variants, reflect);
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, v)) = cache.iter().find(|(k, _)| *k == key) {
            return v.clone();
        }
        let t_count = variants;
        let out = |n: usize| (n + 2 * p - k) / s + 1;
        let grid = (out(h), out(w));
        let mut index = Vec::with_capacity(t_count * grid.0 * grid.1 * k * k);
        for t in 0..t_count {
            // A translated variant keeps the image's canvas; a padded one grows it.
            let (gx, gy) = if reflect { (0, 0) } else { self.growth(t) };
            let (ch, cw) = (h + gy, w + gx);
            assert!(
                (out(ch), out(cw)) == grid,
                "the shifted variants give different token grids (check the input size)"
            );
            for oy in 0..grid.0 {
                for ox in 0..grid.1 {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (cy, cx) = ((oy * s + ky) as i64 - p as i64, (ox * s + kx) as i64 - p as i64);
                            let inside = (0..ch as i64).contains(&cy) && (0..cw as i64).contains(&cx);
                            index.push(if inside {
                                let (y, x) = self.source(t, (h, w), (cy as usize, cx as usize), reflect);
                                (y * w + x) as i64
                            } else {
                                (h * w) as i64
                            });
                        }
                    }
                }
            }
        }
        let v = (Arc::new(index), grid);
        cache.push((key, v.clone()));
        v
    }
}

/// Index `i` reflected into `0..n` without repeating the edge (`F.pad(mode="reflect")`).
fn mirror(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let i = i.rem_euclid(period);
    (if i < n { i } else { period - i }) as usize
}

/// `torch.roll(x, shift, dim)`: element `i` moves to `i + shift` (mod size).
pub fn roll_like_torch<B: Backend, const D: usize>(x: Tensor<B, D>, shift: i64, dim: usize) -> Tensor<B, D> {
    let size = x.dims()[dim];
    let s = shift.rem_euclid(size as i64) as usize;
    if s == 0 {
        return x;
    }
    Tensor::cat(
        vec![x.clone().slice_dim(dim, size - s..), x.slice_dim(dim, ..size - s)],
        dim,
    )
}

/// `F.pad(x, (left, 0, top, 0), mode="circular")` on a `B×C×H×W` batch: the last `left` columns
/// are prepended on the left and the last `top` rows on top.
pub fn circular_pad_left_top<B: Backend>(x: Tensor<B, 4>, left: usize, top: usize) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let x = if left > 0 {
        Tensor::cat(vec![x.clone().slice_dim(3, w - left..), x], 3)
    } else {
        x
    };
    if top > 0 {
        Tensor::cat(vec![x.clone().slice_dim(2, h - top..), x], 2)
    } else {
        x
    }
}

/// T per-variant convolutions of the shifted images (official `to_patch_embedding`), or one
/// convolution shared by all variants (`projections` of length 1, the LSAGT paper's ablation).
#[derive(Module, Debug)]
pub struct ShiftedPatchEmbed<B: Backend> {
    pub projections: Vec<Conv2d<B>>,
    pub scheme: ShiftScheme,
    /// T: the image and the first T − 1 shifts of the scheme.
    pub variants: usize,
    /// Variants translated with reflection padding instead of rolled / circularly padded.
    pub reflect: bool,
}

impl<B: Backend> ShiftedPatchEmbed<B> {
    /// The projection of variant `t`.
    fn projection(&self, t: usize) -> &Conv2d<B> {
        &self.projections[t.min(self.projections.len() - 1)]
    }

    /// Image variant `t` (0 is the image itself).
    pub fn variant(&self, img: Tensor<B, 4>, t: usize) -> Tensor<B, 4> {
        if t == 0 {
            return img;
        }
        if self.reflect {
            let [_, _, h, w] = img.dims();
            let (rows, cols): (Vec<i64>, Vec<i64>) = ((0..h as i64).collect(), (0..w as i64).collect());
            let (dy, dx) = match self.scheme {
                ShiftScheme::Cifar => CIFAR_SHIFTS[t - 1],
                ShiftScheme::Imagenet => {
                    let (left, top) = IMAGENET_PADS[t - 1];
                    (top as i64, left as i64)
                }
            };
            let device = img.device();
            let pick = |v: Vec<i64>, d: i64, n: usize| {
                let idx: Vec<i64> = v.iter().map(|&i| mirror(i - d, n) as i64).collect();
                Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &device)
            };
            return img.select(2, pick(rows, dy, h)).select(3, pick(cols, dx, w));
        }
        match self.scheme {
            ShiftScheme::Cifar => {
                let (dy, dx) = CIFAR_SHIFTS[t - 1];
                roll_like_torch(roll_like_torch(img, dy, 2), dx, 3)
            }
            ShiftScheme::Imagenet => {
                let (left, top) = IMAGENET_PADS[t - 1];
                circular_pad_left_top(img, left, top)
            }
        }
    }

    /// `B×3×H×W` → the tokens of every variant, `T×B×N×D`, the tokens of variant 0 on their own
    /// (`B×N×D`: the same values, computed apart so that their gradient does not go through a
    /// slice of the large variant tensor), and the token grid `(rows, cols)`.
    ///
    /// The patches of all variants are one gather from the image ([`ShiftScheme::patch_index`])
    /// rather than T rolls or paddings, each with its own im2col: a few kernels instead of
    /// hundreds of small copies per step.
    pub fn forward(&self, img: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 3>, (usize, usize)) {
        match self.forward_unbiased(img) {
            (v, Some(bias), x0, grid) => {
                let [t, d] = bias.dims();
                (v + bias.reshape([t, 1, 1, d]), x0, grid)
            }
            (v, None, x0, grid) => (v, x0, grid),
        }
    }

    /// [`ShiftedPatchEmbed::forward`] with the variant tokens left without their projection's
    /// bias, which comes apart (`T×D`, if the projections have one): the first stage adds it
    /// inside its LayerNorm ([`Stage::forward_variants`]) rather than in a pass of its own over
    /// the largest tensor of the model. Variant 0's own tokens have their bias.
    #[allow(clippy::type_complexity)]
    pub fn forward_unbiased(
        &self,
        img: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Option<Tensor<B, 2>>, Tensor<B, 3>, (usize, usize)) {
        let [b, c, h, w] = img.dims();
        let t = self.variants;
        let shared = self.projections.len() == 1 && t > 1;
        assert!(
            shared || self.projections.len() == t,
            "one projection per variant, or one for all"
        );
        let geometry = |c: &Conv2d<B>| (c.kernel(), c.stride, c.padding);
        let (k, s, p) = geometry(&self.projections[0]);
        assert!(
            self.projections.iter().all(|conv| geometry(conv) == (k, s, p)),
            "the variant projections share one geometry"
        );
        let (index, (gh, gw)) = self.scheme.patch_index((h, w), (k, s, p), t, self.reflect);
        let n = gh * gw;
        // Patch rows padded with zeros to 16 bytes of bf16: 27-wide rows (3×3×3) kept the
        // projection's product on a slow unaligned kernel.
        let width = (k * k * c).next_multiple_of(8);
        let wants_grad = img.is_require_grad();
        let pixels = img.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let geometry = [t, n, k * k];
        let cols = if wants_grad {
            shifted_patches_reference(pixels, &index, geometry, width)
        } else {
            shifted_patches(pixels, &index, geometry, width)
        };
        let x0 = self.projections[0].forward_columns(cols.clone().slice_dim(0, 0..1).squeeze_dim(0));
        if shared {
            let [_, _, _, kw] = cols.dims();
            let all = self.projections[0].forward_columns(cols.reshape([t * b, n, kw]));
            let d = all.dims()[2];
            return (all.reshape([t, b, n, d]), None, x0, (gh, gw));
        }
        let (variants, bias) = forward_many_columns(&self.projections, cols);
        (variants, bias, x0, (gh, gw))
    }

    /// [`ShiftedPatchEmbed::forward`]'s variant tokens computed as T rolled (or padded) images and
    /// T convolutions: the plain path the gather is tested against.
    pub fn forward_reference(&self, img: Tensor<B, 4>) -> (Tensor<B, 4>, (usize, usize)) {
        let mut grid = (0, 0);
        let variants = (0..self.variants)
            .map(|t| {
                let y = self
                    .projection(t)
                    .forward_reference(self.variant(img.clone(), t).permute([0, 2, 3, 1]));
                let [b, gh, gw, d] = y.dims();
                grid = (gh, gw);
                y.reshape([b, gh * gw, d])
            })
            .collect();
        (Tensor::stack(variants, 0), grid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Conv2dConfig;

    type B = burn::backend::Flex;

    #[test]
    fn mirror_reflects_without_repeating_the_edge() {
        // F.pad([0, 1, 2, 3], (2, 2), mode="reflect") = [2, 1, 0, 1, 2, 3, 2, 1].
        let padded: Vec<usize> = (-2..6).map(|i| mirror(i, 4)).collect();
        assert_eq!(padded, [2, 1, 0, 1, 2, 3, 2, 1]);
        assert_eq!(mirror(-3, 1), 0);
    }

    #[test]
    fn torch_roll_and_circular_pad_semantics() {
        let device = Default::default();
        let x = Tensor::<B, 1, Int>::arange(0..4, &device).float();
        // torch.roll([0,1,2,3], 1) = [3,0,1,2]; torch.roll(…, -1) = [1,2,3,0].
        let r: Vec<f32> = roll_like_torch(x.clone(), 1, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [3.0, 0.0, 1.0, 2.0]);
        let r: Vec<f32> = roll_like_torch(x.clone(), -5, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [1.0, 2.0, 3.0, 0.0]);
        // Burn's own roll shifts the other way: element i moves to i − shift.
        let r: Vec<f32> = x.roll_dim(1, 0).into_data().to_vec().unwrap();
        assert_eq!(r, [1.0, 2.0, 3.0, 0.0]);
        // F.pad(x, (2, 0, 1, 0), mode="circular") of [[0,1,2],[3,4,5]].
        let img = Tensor::<B, 1, Int>::arange(0..6, &device)
            .float()
            .reshape([1, 1, 2, 3]);
        let p: Vec<f32> = circular_pad_left_top(img, 2, 1).into_data().to_vec().unwrap();
        assert_eq!(
            p,
            [
                4.0, 5.0, 3.0, 4.0, 5.0, 1.0, 2.0, 0.0, 1.0, 2.0, 4.0, 5.0, 3.0, 4.0, 5.0
            ]
        );
    }

    #[test]
    fn gathered_patches_match_rolled_convolutions_with_gradients() {
        use burn::module::Module;
        use burn::tensor::Distribution;
        type A = burn::backend::Autodiff<B>;
        let device = Default::default();
        let close = |a: Tensor<B, 4>, b: Tensor<B, 4>, what: &str| {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
            assert_eq!(a.len(), b.len(), "{what}");
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            // Relative to the largest value once that exceeds 1 (a shared projection's gradient
            // sums over every variant).
            let scale = b.iter().fold(1f32, |m, y| m.max(y.abs()));
            assert!(worst <= 1e-5 * scale, "{what}: {worst} (scale {scale})");
        };
        // Non-square inputs; ImageNet's 9/7/1 geometry on a canvas that grows by up to 3 pixels.
        // The released layouts, then the ablations: fewer variants, one shared projection,
        // variants translated with reflection padding.
        for (scheme, (h, w), (k, s, p), variants, shared, reflect) in [
            (ShiftScheme::Cifar, (8, 6), (3, 1, 1), 18, false, false),
            (ShiftScheme::Imagenet, (29, 30), (9, 7, 1), 10, false, false),
            (ShiftScheme::Imagenet, (16, 12), (4, 4, 0), 10, false, false),
            (ShiftScheme::Cifar, (8, 6), (3, 1, 1), 9, false, false),
            (ShiftScheme::Cifar, (8, 6), (3, 1, 1), 18, true, true),
            (ShiftScheme::Cifar, (7, 9), (3, 1, 1), 18, false, true),
            (ShiftScheme::Imagenet, (16, 12), (4, 4, 0), 10, true, true),
        ] {
            let embed = ShiftedPatchEmbed::<A> {
                variants,
                reflect,
                projections: (0..if shared { 1 } else { variants })
                    .map(|_| {
                        Conv2dConfig::new([3, 5], k)
                            .with_stride(s)
                            .with_padding(p)
                            .init(&device)
                    })
                    .collect(),
                scheme,
            };
            let img = Tensor::<A, 4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
            let (v, x0, grid) = embed.forward(img.clone());
            let (vr, grid_r) = embed.forward_reference(img);
            assert_eq!(grid, grid_r, "{scheme:?}");
            let what = format!("{scheme:?} {h}x{w} T={variants} shared {shared} reflect {reflect}");
            close(v.clone().inner(), vr.clone().inner(), &what);
            close(
                x0.clone().unsqueeze::<4>().inner(),
                vr.clone().slice_dim(0, 0..1).inner(),
                &what,
            );
            // Gradients of every projection, with variant 0 reaching it through x0 (new) or
            // through a slice of the variants (reference).
            let weights = |t: usize| Tensor::<A, 1, Int>::arange(0..t as i64, &device).float().sin();
            let n = v.dims().iter().product::<usize>();
            let loss = (v.reshape([n]) * weights(n)).sum() + x0.powi_scalar(2).sum();
            let loss_r =
                (vr.clone().reshape([n]) * weights(n)).sum() + vr.slice_dim(0, 0..1).powi_scalar(2).sum();
            let (g, g_r) = (loss.backward(), loss_r.backward());
            for conv in &embed.projections {
                let (a, b) = (conv.weight.grad(&g).unwrap(), conv.weight.grad(&g_r).unwrap());
                close(a, b, &format!("{what} weight gradient"));
            }
            assert!(embed.num_params() > 0);
        }
    }
}
