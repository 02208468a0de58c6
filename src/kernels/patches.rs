//! LSAGT's shifted patch embedding: the patches of every shifted variant of a batch of images, in
//! the layout the variants' projection multiplies (`T×B×N×width`, variant first), rows padded
//! with zeros to `width` columns.
//!
//! Reference path: Burn's `select` of the pixels (batch first), a copy to put the variants first,
//! and a zero pad: on the H100 ~0.7 ms per lsagt_cifar_tiny b128 step for 127 MB, and the 27-wide
//! rows (`3×3×3`) left the projection's product on a slow unaligned kernel (0.77 ms). The fused
//! path writes the padded, variant-first rows in one pass. Forward only: the image takes no
//! gradient in training (the caller keeps the reference path when it does).

use burn::prelude::*;
use burn::tensor::TensorData;

/// `pixels`: `B×P×C` channels-last pixels; `index`: `T·N·taps` pixel numbers, `P` standing for a
/// zero pixel (the padding), taps in the row order of [`crate::nn::Conv2d::im2col`]. Returns
/// `T×B×N×width` with row `(t, b, n)` holding the `taps·C` values of its taps, then zeros
/// (`width ≥ taps·C`).
pub fn shifted_patches<B: Backend>(
    pixels: Tensor<B, 3>,
    index: &[i64],
    [t, n, taps]: [usize; 3],
    width: usize,
) -> Tensor<B, 4> {
    check(&pixels, index, [t, n, taps], width);
    if super::available::<B>() {
        match fused(pixels, index, [t, n, taps], width) {
            Ok(y) => return y,
            Err(pixels) => return shifted_patches_reference(pixels, index, [t, n, taps], width),
        }
    }
    shifted_patches_reference(pixels, index, [t, n, taps], width)
}

fn check<B: Backend>(pixels: &Tensor<B, 3>, index: &[i64], [t, n, taps]: [usize; 3], width: usize) {
    let [_, p, c] = pixels.dims();
    assert!(
        index.len() == t * n * taps && width >= taps * c && index.iter().all(|&i| i >= 0 && i as usize <= p),
        "shifted_patches: {} indices for {t}×{n}×{taps} taps of {p} pixels ({c} channels), width {width}",
        index.len()
    );
}

/// The fused kernel, or the pixels back when this backend has none.
pub fn fused<B: Backend>(
    pixels: Tensor<B, 3>,
    index: &[i64],
    [t, n, taps]: [usize; 3],
    width: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
    check(&pixels, index, [t, n, taps], width);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        // Pixel numbers as f32 (exact below 2^24), since the fused ops take float tensors.
        let device = pixels.device();
        let numbers: Vec<f32> = index.iter().map(|&i| i as f32).collect();
        let index = Tensor::<B, 1>::from_data(TensorData::new(numbers, [index.len()]), &device);
        let op = cube::Patches { t, n, taps, width };
        match super::cube::run::<B, _, 2>(&op, [primitive(pixels), primitive(index)]) {
            Ok(y) => Ok(tensor(y)),
            Err([pixels, _]) => Err(tensor(pixels)),
        }
    }
    #[cfg(not(feature = "kernels"))]
    Err(pixels)
}

/// A zero pixel appended, Burn's `select`, the variants moved first, the rows padded.
pub fn shifted_patches_reference<B: Backend>(
    pixels: Tensor<B, 3>,
    index: &[i64],
    [t, n, taps]: [usize; 3],
    width: usize,
) -> Tensor<B, 4> {
    check(&pixels, index, [t, n, taps], width);
    let [b, _, c] = pixels.dims();
    let device = pixels.device();
    let zero = Tensor::zeros([b, 1, c], (&device, pixels.dtype()));
    let pixels = Tensor::cat(vec![pixels, zero], 1);
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index.to_vec(), [index.len()]), &device);
    let cols = pixels
        .select(1, index)
        .reshape([b, t, n, taps * c])
        .swap_dims(0, 1);
    if width == taps * c {
        return cols;
    }
    let pad = Tensor::zeros([t, b, n, width - taps * c], (&device, cols.dtype()));
    Tensor::cat(vec![cols, pad], 3)
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use crate::kernels::cube::{FusedOp, dense, empty, launch_dims};

    /// One thread per output value `(t, b, n, j)`: tap `j / C`, channel `j % C` of row `(t, n)`'s
    /// pixel in image `b`; zero for the padding pixel and past `taps·C`.
    #[cube(launch_unchecked)]
    fn patches_kernel<E: Float>(
        pixels: &Tensor<E>,
        index: &Tensor<f32>,
        out: &mut Tensor<E>,
        batch: usize,
        #[comptime] p: usize,
        #[comptime] c: usize,
        #[comptime] n: usize,
        #[comptime] taps: usize,
        #[comptime] width: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let j = at % width;
        let row = at / width;
        let token = row % n;
        let image = (row / n) % batch;
        let variant = row / comptime!(n) / batch;
        let mut v = E::from_int(0);
        if j < comptime!(taps * c) {
            let pixel = u32::cast_from(index[(variant * n + token) * taps + j / c]) as usize;
            if pixel < p {
                v = pixels[(image * p + pixel) * c + j % c];
            }
        }
        out[at] = v;
    }

    #[derive(Clone, Debug)]
    pub struct Patches {
        pub t: usize,
        pub n: usize,
        pub taps: usize,
        pub width: usize,
    }

    impl FusedOp<2> for Patches {
        fn output_shape(&self, [pixels, _]: &[Shape; 2]) -> Shape {
            Shape::new([self.t, pixels[0], self.n, self.width])
        }

        fn forward<R: CubeRuntime>(&self, [pixels, index]: [CubeTensor<R>; 2]) -> CubeTensor<R> {
            let pixels = into_contiguous(pixels);
            let index = dense(index, DType::F32);
            let s = pixels.meta.shape().clone();
            let (b, p, c) = (s[0], s[1], s[2]);
            let dtype = pixels.dtype;
            let out = empty(&pixels, [self.t, b, self.n, self.width], dtype);
            let (count, dim) = launch_dims(&pixels.client, self.t * b * self.n * self.width);
            unsafe {
                patches_kernel::launch_unchecked(
                    &pixels.client,
                    count,
                    dim,
                    pixels.clone().into_tensor_arg(),
                    index.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    b,
                    p,
                    c,
                    self.n,
                    self.taps,
                    self.width,
                    dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            _: [CubeTensor<R>; 2],
            _: CubeTensor<R>,
            wanted: [bool; 2],
        ) -> [Option<CubeTensor<R>>; 2] {
            assert!(
                wanted == [false, false],
                "shifted_patches: the fused path has no gradient (kernels::patches::shifted_patches \
                 takes the reference path when the image needs one)"
            );
            [None, None]
        }
    }
}
