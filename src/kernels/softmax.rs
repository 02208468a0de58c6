//! Softmax over the last dimension of scaled scores, `softmax(s·x)` (LSAGT's attentions: over
//! the 1,024 or 256 keys of a global attention, over the T variants of the local one).
//!
//! Reference path: Burn's `softmax` after a scalar multiply (a maximum, a subtraction and
//! exponential, a sum, a division: five launches, the division unvectorised). On the H100 the
//! stage-1 global attention of lsagt_cifar_tiny (128 × 4 × 1,024 × 1,024 scores, 1 GiB in bf16)
//! spent ~4.8 ms of a 24 ms inference step there. The fused path reads
//! and writes the scores once forward, and reads the scores and their gradient once backward
//! (it recomputes the softmax rather than keep it).

use burn::prelude::*;
use burn::tensor::activation::softmax;

/// `softmax(scale·x)` over the last dimension.
pub fn softmax_scaled<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
    if super::available::<B>() {
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
        if c > super::rows::MAX_WIDTH {
            return Err(x);
        }
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

    use crate::kernels::cube::{FusedOp, dense, empty, vector_width};
    use crate::kernels::rows::{
        LANES, ROWS, load_vectors_or, row_launch, row_max, row_sum, store_vectors, vector_max, vector_sum,
    };

    /// This thread's share of the softmax of its row (`cv` vectors): `exp(scale·x − max)` (zeros
    /// past the row's end), divided by the row's sum.
    #[cube]
    fn row_softmax<E: Float, N: Size>(
        sums: &mut SharedMemory<f32>,
        x: &Tensor<Vector<E, N>>,
        row: usize,
        live: bool,
        lane: usize,
        slot: usize,
        scale: f32,
        #[comptime] cv: usize,
        #[comptime] per: usize,
    ) -> Array<Vector<f32, N>> {
        // Past the row's end: the lowest value, so that it neither wins the maximum nor adds.
        let mut e = load_vectors_or::<E, N>(x, row, live, lane, f32::new(-3.0e38), cv, per);
        let mut m = f32::new(-3.0e38);
        #[unroll]
        for i in 0..per {
            e[i] = e[i] * Vector::new(scale);
            m = f32::max(m, vector_max::<N>(e[i]));
        }
        let m = row_max(sums, m, lane, slot);
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            let mut v = Vector::<f32, N>::new(f32::new(0.0));
            if lane + i * comptime!(LANES) < cv {
                v = Vector::exp(e[i] - Vector::new(m));
            }
            e[i] = v;
            s += vector_sum::<N>(v);
        }
        let inv = Vector::new(f32::new(1.0) / row_sum(sums, s, lane, slot));
        #[unroll]
        for i in 0..per {
            e[i] = e[i] * inv;
        }
        e
    }

    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        scale: f32,
        #[comptime] cv: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let y = row_softmax::<E, N>(&mut sums, x, row, live, lane, slot, scale, cv, per);
        store_vectors::<E, N>(out, &y, row, live, lane, cv, per);
    }

    /// `dx = scale·y·(g − Σ g·y)`, with the softmax `y` recomputed from `x`.
    #[cube(launch_unchecked)]
    fn backward_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        grad: &Tensor<Vector<E, N>>,
        dx: &mut Tensor<Vector<E, N>>,
        rows: usize,
        scale: f32,
        #[comptime] cv: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let y = row_softmax::<E, N>(&mut sums, x, row, live, lane, slot, scale, cv, per);
        let mut g = load_vectors_or::<E, N>(grad, row, live, lane, f32::new(0.0), cv, per);
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            s += vector_sum::<N>(g[i] * y[i]);
        }
        let s = Vector::new(row_sum(&mut sums, s, lane, slot));
        let scale = Vector::new(scale);
        #[unroll]
        for i in 0..per {
            g[i] = scale * y[i] * (g[i] - s);
        }
        store_vectors::<E, N>(dx, &g, row, live, lane, cv, per);
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
            let n = vector_width(&x.client, dtype, &[c]);
            unsafe {
                forward_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    n,
                    x.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows,
                    self.scale,
                    c / n,
                    (c / n).div_ceil(LANES),
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
            let n = vector_width(&x.client, dtype, &[c]);
            unsafe {
                backward_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    n,
                    x.clone().into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dx.clone().into_tensor_arg(),
                    rows,
                    self.scale,
                    c / n,
                    (c / n).div_ceil(LANES),
                    dtype.into(),
                )
            };
            [Some(dx)]
        }
    }
}
