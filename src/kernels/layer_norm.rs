//! LayerNorm over the last dimension (both models, ~6 per stage).
//!
//! Reference path: Burn's `layer_norm` (a mean, a centred square, another mean, a square root, a
//! division and the affine part: 6–8 launches forward and about twice that backward). On the H100
//! one of vvt_tiny's stage-1 norms took ~260 µs in inference, where reading and writing the
//! tensor once takes ~25 µs (docs/BENCH.md, session 10). The fused path is one kernel forward (a
//! row per 32 threads: statistics in f32, in registers) and two backward (the input gradient row by
//! row; the scale and shift gradients as per-chunk column sums, then one sum over the chunks).

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

/// `(x − mean) / sqrt(var + eps) · gamma + beta` over the last dimension of `x`; `gamma`, `beta`:
/// the last dimension's size.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    if super::use_fused::<B>("layer_norm", &x.device()) {
        match fused(x, gamma, beta, eps) {
            Ok(y) => return y,
            Err((x, gamma, beta)) => return layer_norm_reference(x, gamma, beta, eps),
        }
    }
    layer_norm_reference(x, gamma, beta, eps)
}

/// Burn's own LayerNorm (what `burn::nn::LayerNorm::forward` computes).
pub fn layer_norm_reference<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    check(&x, &gamma, &beta);
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        Some(beta.into_primitive().tensor()),
        eps,
    )))
}

fn check<B: Backend, const D: usize>(x: &Tensor<B, D>, gamma: &Tensor<B, 1>, beta: &Tensor<B, 1>) {
    let c = x.dims()[D - 1];
    assert!(
        gamma.dims() == [c] && beta.dims() == [c],
        "layer_norm: x has {c} channels, gamma {:?} and beta {:?}",
        gamma.dims(),
        beta.dims()
    );
}

/// The fused kernels, or the inputs back when this backend has none.
#[allow(clippy::type_complexity)]
pub fn fused<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>)> {
    check(&x, &gamma, &beta);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        let dims = x.dims();
        let c = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let op = cube::LayerNorm { eps: eps as f32 };
        let inputs = [primitive(x.reshape([rows, c])), primitive(gamma), primitive(beta)];
        match super::cube::run::<B, _, 3>(&op, inputs) {
            Ok(y) => Ok(tensor::<B, 2>(y).reshape(dims)),
            Err([x, gamma, beta]) => Err((tensor::<B, 2>(x).reshape(dims), tensor(gamma), tensor(beta))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = eps;
        Err((x, gamma, beta))
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use crate::kernels::cube::{FusedOp, cast, dense, empty, launch_dims};
    use crate::kernels::rows::{LANES, ROWS, load, row_launch, row_sum, store};

    /// The mean of a row whose values this thread holds in `v`.
    #[cube]
    fn row_mean(
        sums: &mut SharedMemory<f32>,
        v: &Array<f32>,
        lane: usize,
        slot: usize,
        #[comptime] c: usize,
        #[comptime] per: usize,
    ) -> f32 {
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            s += v[i];
        }
        row_sum(sums, s, lane, slot) / f32::new(comptime!(c as f32))
    }

    /// `1/sqrt(var + eps)` of the row, from its mean (a second pass over the registers: no
    /// cancellation as in `E[x²] − mean²`).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn row_rstd(
        sums: &mut SharedMemory<f32>,
        v: &Array<f32>,
        mean: f32,
        lane: usize,
        slot: usize,
        eps: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
    ) -> f32 {
        let mut q = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            if lane + i * comptime!(LANES) < c {
                let d = v[i] - mean;
                q += d * d;
            }
        }
        let var = row_sum(sums, q, lane, slot) / f32::new(comptime!(c as f32));
        f32::new(1.0) / f32::sqrt(var + eps)
    }

    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float>(
        x: &Tensor<E>,
        gamma: &Tensor<E>,
        beta: &Tensor<E>,
        out: &mut Tensor<E>,
        rows: usize,
        eps: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let mut v = load::<E>(x, row, live, lane, c, per);
        let mean = row_mean(&mut sums, &v, lane, slot, c, per);
        let rstd = row_rstd(&mut sums, &v, mean, lane, slot, eps, c, per);
        #[unroll]
        for i in 0..per {
            let ch = lane + i * comptime!(LANES);
            if ch < c {
                v[i] = (v[i] - mean) * rstd * f32::cast_from(gamma[ch]) + f32::cast_from(beta[ch]);
            }
        }
        store::<E>(out, &v, row, live, lane, c, per);
    }

    /// The input gradient, `rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = g·gamma`, and each row's
    /// mean and 1/std (`stats[2·row]`, `stats[2·row + 1]`) for [`column_kernel`].
    #[cube(launch_unchecked)]
    fn backward_rows_kernel<E: Float>(
        x: &Tensor<E>,
        gamma: &Tensor<E>,
        grad: &Tensor<E>,
        dx: &mut Tensor<E>,
        row_stats: &mut Tensor<f32>,
        rows: usize,
        eps: f32,
        #[comptime] c: usize,
        #[comptime] per: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let v = load::<E>(x, row, live, lane, c, per);
        let mut gg = load::<E>(grad, row, live, lane, c, per);
        let mean = row_mean(&mut sums, &v, lane, slot, c, per);
        let rstd = row_rstd(&mut sums, &v, mean, lane, slot, eps, c, per);
        let mut a = f32::new(0.0);
        let mut b = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            let ch = lane + i * comptime!(LANES);
            if ch < c {
                gg[i] *= f32::cast_from(gamma[ch]);
                a += gg[i];
                b += gg[i] * (v[i] - mean) * rstd;
            }
        }
        let a = row_sum(&mut sums, a, lane, slot) / f32::new(comptime!(c as f32));
        let b = row_sum(&mut sums, b, lane, slot) / f32::new(comptime!(c as f32));
        #[unroll]
        for i in 0..per {
            gg[i] = rstd * (gg[i] - a - (v[i] - mean) * rstd * b);
        }
        store::<E>(dx, &gg, row, live, lane, c, per);
        if live && lane == 0 {
            row_stats[2 * row] = mean;
            row_stats[2 * row + 1] = rstd;
        }
    }

    /// Partial scale and shift gradients: thread (chunk, channel) sums `g·x̂` and `g` over the rows
    /// `chunk·chunk_rows ..` into `partial[chunk, 0 | 1, channel]`.
    #[cube(launch_unchecked)]
    fn column_kernel<E: Float>(
        x: &Tensor<E>,
        grad: &Tensor<E>,
        row_stats: &Tensor<f32>,
        partial: &mut Tensor<f32>,
        rows: usize,
        #[comptime] c: usize,
        #[comptime] chunk_rows: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos * 2 >= partial.len() {
            terminate!();
        }
        let ch = pos % c;
        let chunk = pos / c;
        let start = chunk * chunk_rows;
        let end = select(start + chunk_rows < rows, start + chunk_rows, rows);
        let mut gx = f32::new(0.0);
        let mut g = f32::new(0.0);
        for r in start..end {
            let gv = f32::cast_from(grad[r * c + ch]);
            let xhat = (f32::cast_from(x[r * c + ch]) - row_stats[2 * r]) * row_stats[2 * r + 1];
            gx += gv * xhat;
            g += gv;
        }
        partial[(chunk * 2) * c + ch] = gx;
        partial[(chunk * 2 + 1) * c + ch] = g;
    }

    /// `out[ch] = Σ_chunk partial[chunk, which, ch]`.
    #[cube(launch_unchecked)]
    fn sum_chunks_kernel<E: Float>(
        partial: &Tensor<f32>,
        out: &mut Tensor<E>,
        #[comptime] chunks: usize,
        #[comptime] c: usize,
        #[comptime] which: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let ch = ABSOLUTE_POS;
        if ch >= c {
            terminate!();
        }
        let mut acc = f32::new(0.0);
        for q in 0..chunks {
            acc += partial[(q * 2 + which) * c + ch];
        }
        out[ch] = E::cast_from(acc);
    }

    #[derive(Clone, Debug)]
    pub struct LayerNorm {
        pub eps: f32,
    }

    fn rows_and_channels<R: CubeRuntime>(x: &CubeTensor<R>) -> (usize, usize) {
        let s = x.meta.shape();
        (s[0], s[1])
    }

    impl FusedOp<3> for LayerNorm {
        fn output_shape(&self, [x, _, _]: &[Shape; 3]) -> Shape {
            x.clone()
        }

        fn forward<R: CubeRuntime>(&self, [x, gamma, beta]: [CubeTensor<R>; 3]) -> CubeTensor<R> {
            let x = into_contiguous(x);
            let (gamma, beta) = (dense(gamma, x.dtype), dense(beta, x.dtype));
            let (rows, c) = rows_and_channels(&x);
            let out = empty(&x, [rows, c], x.dtype);
            let (count, dim) = row_launch(rows);
            let dtype = x.dtype;
            unsafe {
                forward_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    x.clone().into_tensor_arg(),
                    gamma.into_tensor_arg(),
                    beta.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows,
                    self.eps,
                    c,
                    c.div_ceil(LANES),
                    dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            [x, gamma, beta]: [CubeTensor<R>; 3],
            grad: CubeTensor<R>,
            [want_x, want_gamma, want_beta]: [bool; 3],
        ) -> [Option<CubeTensor<R>>; 3] {
            let (gamma_dtype, beta_dtype) = (gamma.dtype, beta.dtype);
            let x = into_contiguous(x);
            let dtype = x.dtype;
            let gamma = dense(gamma, dtype);
            let grad = dense(grad, dtype);
            let (rows, c) = rows_and_channels(&x);
            let client = x.client.clone();
            let dx = empty(&x, [rows, c], dtype);
            let row_stats = empty(&x, [rows, 2], DType::F32);
            let (count, dim) = row_launch(rows);
            unsafe {
                backward_rows_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    x.clone().into_tensor_arg(),
                    gamma.into_tensor_arg(),
                    grad.clone().into_tensor_arg(),
                    dx.clone().into_tensor_arg(),
                    row_stats.clone().into_tensor_arg(),
                    rows,
                    self.eps,
                    c,
                    c.div_ceil(LANES),
                    dtype.into(),
                )
            };
            let (mut dgamma, mut dbeta) = (None, None);
            if want_gamma || want_beta {
                // Enough (chunk, channel) threads to fill the GPU, each summing whole rows.
                let chunks = (131_072 / c).clamp(1, rows.max(1));
                let chunk_rows = rows.div_ceil(chunks).max(1);
                let chunks = rows.div_ceil(chunk_rows).max(1);
                let partial = empty(&x, [chunks, 2, c], DType::F32);
                let (count, dim) = launch_dims(&client, chunks * c);
                unsafe {
                    column_kernel::launch_unchecked(
                        &client,
                        count,
                        dim,
                        x.into_tensor_arg(),
                        grad.into_tensor_arg(),
                        row_stats.into_tensor_arg(),
                        partial.clone().into_tensor_arg(),
                        rows,
                        c,
                        chunk_rows,
                        dtype.into(),
                    )
                };
                let sum = |which: usize, out_dtype: DType| {
                    let out = empty(&partial, [c], dtype);
                    let (count, dim) = launch_dims(&client, c);
                    unsafe {
                        sum_chunks_kernel::launch_unchecked(
                            &client,
                            count,
                            dim,
                            partial.clone().into_tensor_arg(),
                            out.clone().into_tensor_arg(),
                            chunks,
                            c,
                            which,
                            dtype.into(),
                        )
                    };
                    cast(out, out_dtype)
                };
                dgamma = want_gamma.then(|| sum(0, gamma_dtype));
                dbeta = want_beta.then(|| sum(1, beta_dtype));
            }
            [want_x.then_some(dx), dgamma, dbeta]
        }
    }
}
