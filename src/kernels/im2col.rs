//! The patches of a dense k×k convolution of a channels-last tensor (`nn::Conv2d::im2col`), for the
//! patch embeddings and stage transitions of both models.
//!
//! Reference path: k² strided slices of the zero-padded input, stacked. Its forward is ~k² + 6
//! kernel launches and its backward twice that (a zero-fill and slice-assign per window), ~270
//! launches per vvt_tiny training step, where the host's time per launch is most of a step on the
//! GPU. The fused path is one gather forward and one gather backward (each input value sums the
//! patch entries that copied it).

use burn::prelude::*;
use burn::tensor::Slice;

use super::depthwise::pad_nhwc;

/// `x`: `B×H×W×C`. Returns `B×(Ho·Wo)×(k·k·C)`, each row the patch of one output position ordered
/// (row, col, channel), for stride `stride` and zero padding `pad`.
pub fn im2col<B: Backend>(x: Tensor<B, 4>, k: usize, stride: usize, pad: usize) -> Tensor<B, 3> {
    if super::available::<B>() {
        match fused(x, k, stride, pad) {
            Ok(y) => return y,
            Err(x) => return im2col_reference(x, k, stride, pad),
        }
    }
    im2col_reference(x, k, stride, pad)
}

/// Output side of a convolution.
pub fn out_size(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - k) / stride + 1
}

/// The fused kernels, or the input back when this backend has none.
pub fn fused<B: Backend>(
    x: Tensor<B, 4>,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor<B, 3>, Tensor<B, 4>> {
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        let op = cube::Im2col { k, stride, pad };
        match super::cube::run::<B, _, 1>(&op, [primitive(x)]) {
            Ok(y) => Ok(tensor(y)),
            Err([x]) => Err(tensor(x)),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = (k, stride, pad);
        Err(x)
    }
}

/// k² strided slices of the padded input, stacked.
pub fn im2col_reference<B: Backend>(x: Tensor<B, 4>, k: usize, s: usize, p: usize) -> Tensor<B, 3> {
    let [b, h, w, c] = x.dims();
    let (ho, wo) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let xp = pad_nhwc(x, p);
    let span = |start: usize, n: usize| {
        Slice::new(
            start as isize,
            Some((start + s * (n - 1) + 1) as isize),
            s as isize,
        )
    };
    let windows = (0..k * k)
        .map(|ij| {
            xp.clone()
                .slice([Slice::full(), span(ij / k, ho), span(ij % k, wo), Slice::full()])
        })
        .collect();
    Tensor::stack::<5>(windows, 3).reshape([b, ho * wo, k * k * c])
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::Shape;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::out_size;
    use crate::kernels::cube::{FusedOp, dense, empty, launch_dims, vector_width};

    /// One thread per patch entry `(b, oy, ox, i, j, c)`: `x[b, oy·s + i − p, ox·s + j − p, c]`, 0 in
    /// the padding (read at a clamped, always valid index). Channels come `N` at a time (`c`
    /// counts vectors of `N`).
    #[cube(launch_unchecked)]
    fn gather_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        cols: &mut Tensor<Vector<E, N>>,
        #[comptime] h: usize,
        #[comptime] w: usize,
        #[comptime] ho: usize,
        #[comptime] wo: usize,
        #[comptime] c: usize,
        #[comptime] k: usize,
        #[comptime] s: usize,
        #[comptime] p: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= cols.len() {
            terminate!();
        }
        let ch = at % c;
        let j = (at / c) % k;
        let i = (at / comptime!(c * k)) % k;
        let pos = at / comptime!(c * k * k);
        let ox = pos % wo;
        let oy = (pos / wo) % ho;
        let b = pos / comptime!(wo * ho);
        let yy = oy * s + i;
        let xx = ox * s + j;
        let inside = yy >= p && yy < h + p && xx >= p && xx < w + p;
        let yi = select(yy < h + p, select(yy >= p, yy, p), p) - p;
        let xi = select(xx < w + p, select(xx >= p, xx, p), p) - p;
        let mut v = x[((b * h + yi) * w + xi) * c + ch];
        if !inside {
            v = Vector::<E, N>::new(E::from_int(0));
        }
        cols[at] = v;
    }

    /// One thread per input value `(b, y, x, c)`: the sum of the patch entries that copied it
    /// (`N` channels at a time, as [`gather_kernel`]).
    #[cube(launch_unchecked)]
    fn scatter_kernel<E: Float, N: Size>(
        grad: &Tensor<Vector<E, N>>,
        dx: &mut Tensor<Vector<E, N>>,
        #[comptime] h: usize,
        #[comptime] w: usize,
        #[comptime] ho: usize,
        #[comptime] wo: usize,
        #[comptime] c: usize,
        #[comptime] k: usize,
        #[comptime] s: usize,
        #[comptime] p: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= dx.len() {
            terminate!();
        }
        let ch = at % c;
        let x = (at / c) % w;
        let y = (at / comptime!(c * w)) % h;
        let b = at / comptime!(c * w * h);
        let mut sum = Vector::<f32, N>::new(f32::new(0.0));
        #[unroll]
        for i in 0..k {
            // Patch row oy takes input row y through tap i when oy·s + i = y + p.
            let ty = y + p;
            let dy = select(ty >= i, ty, i) - i;
            let oy = dy / s;
            let row_ok = ty >= i && dy % s == 0 && oy < ho;
            #[unroll]
            for j in 0..k {
                let tx = x + p;
                let dxx = select(tx >= j, tx, j) - j;
                let ox = dxx / s;
                let ok = row_ok && tx >= j && dxx % s == 0 && ox < wo;
                let oyc = select(oy < ho, oy, 0);
                let oxc = select(ox < wo, ox, 0);
                if ok {
                    sum += Vector::<f32, N>::cast_from(
                        grad[((b * ho + oyc) * wo + oxc) * comptime!(k * k * c) + (i * k + j) * c + ch],
                    );
                }
            }
        }
        dx[at] = Vector::<E, N>::cast_from(sum);
    }

    #[derive(Clone, Debug)]
    pub struct Im2col {
        pub k: usize,
        pub stride: usize,
        pub pad: usize,
    }

    impl Im2col {
        fn out(&self, h: usize, w: usize) -> (usize, usize) {
            (
                out_size(h, self.k, self.stride, self.pad),
                out_size(w, self.k, self.stride, self.pad),
            )
        }
    }

    impl FusedOp<1> for Im2col {
        fn output_shape(&self, [x]: &[Shape; 1]) -> Shape {
            let (ho, wo) = self.out(x[1], x[2]);
            Shape::new([x[0], ho * wo, self.k * self.k * x[3]])
        }

        fn forward<R: CubeRuntime>(&self, [x]: [CubeTensor<R>; 1]) -> CubeTensor<R> {
            let x = into_contiguous(x);
            let s = x.meta.shape().clone();
            let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
            let (ho, wo) = self.out(h, w);
            let k = self.k;
            let cols = empty(&x, [b, ho * wo, k * k * c], x.dtype);
            let dtype = x.dtype;
            let n = vector_width(&x.client, dtype, &[c]);
            let (count, dim) = launch_dims(&x.client, b * ho * wo * k * k * c / n);
            unsafe {
                gather_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    n,
                    x.clone().into_tensor_arg(),
                    cols.clone().into_tensor_arg(),
                    h,
                    w,
                    ho,
                    wo,
                    c / n,
                    k,
                    self.stride,
                    self.pad,
                    dtype.into(),
                )
            };
            cols
        }

        fn backward<R: CubeRuntime>(
            &self,
            [x]: [CubeTensor<R>; 1],
            grad: CubeTensor<R>,
            [want]: [bool; 1],
        ) -> [Option<CubeTensor<R>>; 1] {
            if !want {
                return [None];
            }
            let s = x.meta.shape().clone();
            let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
            let (ho, wo) = self.out(h, w);
            let grad = dense(grad, x.dtype);
            let dx = empty(&x, [b, h, w, c], x.dtype);
            let dtype = x.dtype;
            let n = vector_width(&x.client, dtype, &[c]);
            let (count, dim) = launch_dims(&x.client, b * h * w * c / n);
            unsafe {
                scatter_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    n,
                    grad.into_tensor_arg(),
                    dx.clone().into_tensor_arg(),
                    h,
                    w,
                    ho,
                    wo,
                    c / n,
                    self.k,
                    self.stride,
                    self.pad,
                    dtype.into(),
                )
            };
            [Some(dx)]
        }
    }
}
