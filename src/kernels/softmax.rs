//! Softmax over the last dimension of scaled scores, `softmax(s·x)` (LSAGT's attentions: over
//! the 1,024 or 256 keys of a global attention, over the T variants of the local one).
//!
//! Reference path: Burn's `softmax` after a scalar multiply (a maximum, a subtraction and
//! exponential, a sum, a division: five launches, the division unvectorised). On the H100 the
//! stage-1 global attention of lsagt_cifar_tiny (128 × 4 × 1,024 × 1,024 scores, 1 GiB in bf16)
//! spent ~4.8 ms of a 24 ms inference step there (docs/BENCH.md, session 10). The fused path reads
//! and writes the scores once forward, and reads the scores and their gradient once backward
//! (it recomputes the softmax rather than keep it).

use burn::prelude::*;
use burn::tensor::activation::softmax;

/// `softmax(scale·x)` over the last dimension.
pub fn softmax_scaled<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
    if super::use_fused::<B>("softmax", &x.device()) {
        match fused(x, scale) {
            Ok(y) => return y,
            Err(x) => return softmax_scaled_reference(x, scale),
        }
    }
    softmax_scaled_reference(x, scale)
}

/// Burn's softmax of the scaled input.
pub fn softmax_scaled_reference<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
    softmax(x.mul_scalar(scale), D - 1)
}

/// The fused kernels, or the input back when this backend has none.
pub fn fused<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Result<Tensor<B, D>, Tensor<B, D>> {
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        let dims = x.dims();
        let c = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let op = cube::Softmax { scale: scale as f32 };
        match super::cube::run::<B, _, 1>(&op, [primitive(x.reshape([rows, c]))]) {
            Ok(y) => Ok(tensor::<B, 2>(y).reshape(dims)),
            Err([x]) => Err(tensor::<B, 2>(x).reshape(dims)),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = scale;
        Err(x)
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::Shape;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use crate::kernels::cube::{FusedOp, dense, empty};
    use crate::kernels::rows::{LANES, ROWS, load, load_or, row_launch, row_max, row_sum, store};

    /// This thread's share of the softmax of its row: `exp(scale·x − max)` in `e` (zeros past the
    /// row's end), divided by the row's sum.
    #[cube]
    fn row_softmax<E: Float>(
        sums: &mut SharedMemory<f32>,
        x: &Tensor<E>,
        row: usize,
        live: bool,
        lane: usize,
        slot: usize,
        scale: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
    ) -> Array<f32> {
        // Past the row's end: the lowest value, so that it neither wins the maximum nor adds.
        let mut e = load_or::<E>(x, row, live, lane, f32::new(-3.0e38), c, per);
        let mut m = f32::new(-3.0e38);
        #[unroll]
        for i in 0..per {
            e[i] *= scale;
            m = f32::max(m, e[i]);
        }
        let m = row_max(sums, m, lane, slot);
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            let mut v = f32::new(0.0);
            if lane + i * comptime!(LANES) < c {
                v = f32::exp(e[i] - m);
            }
            e[i] = v;
            s += v;
        }
        let inv = f32::new(1.0) / row_sum(sums, s, lane, slot);
        #[unroll]
        for i in 0..per {
            e[i] *= inv;
        }
        e
    }

    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float>(
        x: &Tensor<E>,
        out: &mut Tensor<E>,
        rows: usize,
        scale: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let y = row_softmax::<E>(&mut sums, x, row, live, lane, slot, scale, c, per);
        store::<E>(out, &y, row, live, lane, c, per);
    }

    /// `dx = scale·y·(g − Σ g·y)`, with the softmax `y` recomputed from `x`.
    #[cube(launch_unchecked)]
    fn backward_kernel<E: Float>(
        x: &Tensor<E>,
        grad: &Tensor<E>,
        dx: &mut Tensor<E>,
        rows: usize,
        scale: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let y = row_softmax::<E>(&mut sums, x, row, live, lane, slot, scale, c, per);
        let mut g = load::<E>(grad, row, live, lane, c, per);
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            s += g[i] * y[i];
        }
        let s = row_sum(&mut sums, s, lane, slot);
        #[unroll]
        for i in 0..per {
            g[i] = scale * y[i] * (g[i] - s);
        }
        store::<E>(dx, &g, row, live, lane, c, per);
    }

    #[derive(Clone, Debug)]
    pub struct Softmax {
        pub scale: f32,
    }

    fn rows_and_width<R: CubeRuntime>(x: &CubeTensor<R>) -> (usize, usize) {
        let s = x.meta.shape();
        (s[0], s[1])
    }

    impl FusedOp<1> for Softmax {
        fn output_shape(&self, [x]: &[Shape; 1]) -> Shape {
            x.clone()
        }

        fn forward<R: CubeRuntime>(&self, [x]: [CubeTensor<R>; 1]) -> CubeTensor<R> {
            let x = into_contiguous(x);
            let (rows, c) = rows_and_width(&x);
            let out = empty(&x, [rows, c], x.dtype);
            let (count, dim) = row_launch(rows);
            let dtype = x.dtype;
            unsafe {
                forward_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    x.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows,
                    self.scale,
                    c,
                    c.div_ceil(LANES),
                    dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            [x]: [CubeTensor<R>; 1],
            grad: CubeTensor<R>,
            [want_x]: [bool; 1],
        ) -> [Option<CubeTensor<R>>; 1] {
            if !want_x {
                return [None];
            }
            let x = into_contiguous(x);
            let dtype = x.dtype;
            let grad = dense(grad, dtype);
            let (rows, c) = rows_and_width(&x);
            let dx = empty(&x, [rows, c], dtype);
            let (count, dim) = row_launch(rows);
            unsafe {
                backward_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    x.clone().into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dx.clone().into_tensor_arg(),
                    rows,
                    self.scale,
                    c,
                    c.div_ceil(LANES),
                    dtype.into(),
                )
            };
            [Some(dx)]
        }
    }
}
