//! LayerNorm over the last dimension (both models, ~6 per stage).
//!
//! Reference path: Burn's `layer_norm` (a mean, a centred square, another mean, a square root, a
//! division and the affine part: 6–8 launches forward and about twice that backward). On the H100
//! one of vvt_tiny's stage-1 norms took ~260 µs in inference, where reading and writing the
//! tensor once takes ~25 µs. The fused path is one kernel forward (a
//! row per 32 threads: statistics in f32, in registers) and two backward (the input gradient row by
//! row, which also sums the scale and shift gradients per chunk of rows; then one sum over the
//! chunks).

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
    if super::available::<B>() {
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

/// `layer_norm(x + shift)` for `x`: `T×B×N×C` and `shift`: `T×N×C`, the same for every `B`
/// (LSAGT's variant tokens plus their position embedding and projection bias). The fused path
/// adds the shift inside the kernel, sparing a pass over the largest tensor of the model.
pub fn layer_norm_shifted<B: Backend>(
    x: Tensor<B, 4>,
    shift: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 4> {
    let [t, b, n, c] = x.dims();
    assert!(
        shift.dims() == [t, n, c],
        "layer_norm_shifted: x {:?} takes a shift of [{t}, {n}, {c}], not {:?}",
        x.dims(),
        shift.dims()
    );
    if super::available::<B>() {
        #[cfg(feature = "kernels")]
        {
            use super::{primitive, tensor};
            let op = cube::ShiftedLayerNorm {
                eps: eps as f32,
                batch: b,
                tokens: n,
            };
            let inputs = [
                primitive(x.clone().reshape([t * b * n, c])),
                primitive(shift.clone().reshape([t * n, c])),
                primitive(gamma.clone()),
                primitive(beta.clone()),
            ];
            if c <= super::rows::MAX_WIDTH
                && let Ok(y) = super::cube::run::<B, _, 4>(&op, inputs)
            {
                return tensor::<B, 2>(y).reshape([t, b, n, c]);
            }
        }
        #[cfg(not(feature = "kernels"))]
        let _ = b;
    }
    layer_norm_shifted_reference(x, shift, gamma, beta, eps)
}

/// The shift added as its own pass, then [`layer_norm`].
pub fn layer_norm_shifted_reference<B: Backend>(
    x: Tensor<B, 4>,
    shift: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 4> {
    layer_norm(x + shift.unsqueeze_dim(1), gamma, beta, eps)
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
        if c > super::rows::MAX_WIDTH {
            return Err((x, gamma, beta));
        }
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

    use crate::kernels::cube::{FusedOp, TensorOps, cast, dense, empty, vector_width};
    use crate::kernels::rows::{
        LANES, ROWS, load_vectors_or, row_launch, row_sum, store_vectors, vector_sum,
    };
    use burn::tensor::ops::FloatTensorOps;

    /// The mean of a row of `c` values whose vectors this thread holds in `v` (zeros past the end).
    #[cube]
    fn row_mean<N: Size>(
        sums: &mut SharedMemory<f32>,
        v: &Array<Vector<f32, N>>,
        lane: usize,
        slot: usize,
        #[comptime] c: usize,
        #[comptime] per: usize,
    ) -> f32 {
        let mut s = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            s += vector_sum::<N>(v[i]);
        }
        row_sum(sums, s, lane, slot) / f32::new(comptime!(c as f32))
    }

    /// `1/sqrt(var + eps)` of the row, from its mean (a second pass over the registers: no
    /// cancellation as in `E[x²] − mean²`).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn row_rstd<N: Size>(
        sums: &mut SharedMemory<f32>,
        v: &Array<Vector<f32, N>>,
        mean: f32,
        lane: usize,
        slot: usize,
        eps: f32,
        #[comptime] c: usize,
        #[comptime] cv: usize,
        #[comptime] per: usize,
    ) -> f32 {
        let mut q = f32::new(0.0);
        #[unroll]
        for i in 0..per {
            if lane + i * comptime!(LANES) < cv {
                let d = v[i] - Vector::new(mean);
                q += vector_sum::<N>(d * d);
            }
        }
        let var = row_sum(sums, q, lane, slot) / f32::new(comptime!(c as f32));
        f32::new(1.0) / f32::sqrt(var + eps)
    }

    /// Row `row` of `x`, plus its shift's row when `shifted` ([`ShiftedLayerNorm`]: row
    /// `(t, b, n)` of a `T×B×N` batch takes shift row `(t, n)`).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn load_row<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        shift: &Tensor<Vector<E, N>>,
        row: usize,
        live: bool,
        lane: usize,
        batch_tokens: usize,
        tokens: usize,
        #[comptime] cv: usize,
        #[comptime] per: usize,
        #[comptime] shifted: bool,
    ) -> Array<Vector<f32, N>> {
        let mut v = load_vectors_or::<E, N>(x, row, live, lane, f32::new(0.0), cv, per);
        if comptime!(shifted) {
            let srow = (row / batch_tokens) * tokens + row % tokens;
            let s = load_vectors_or::<E, N>(shift, srow, live, lane, f32::new(0.0), cv, per);
            #[unroll]
            for i in 0..per {
                v[i] = v[i] + s[i];
            }
        }
        v
    }

    /// A row per [`LANES`] threads, `N` values per load; `cv = c / N` vectors per row.
    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        shift: &Tensor<Vector<E, N>>,
        gamma: &Tensor<Vector<E, N>>,
        beta: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        eps: f32,
        batch_tokens: usize,
        tokens: usize,
        #[comptime] c: usize,
        #[comptime] cv: usize,
        #[comptime] per: usize,
        #[comptime] shifted: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let mut v = load_row::<E, N>(x, shift, row, live, lane, batch_tokens, tokens, cv, per, shifted);
        let mean = row_mean::<N>(&mut sums, &v, lane, slot, c, per);
        let rstd = row_rstd::<N>(&mut sums, &v, mean, lane, slot, eps, c, cv, per);
        #[unroll]
        for i in 0..per {
            let at = lane + i * comptime!(LANES);
            if at < cv {
                v[i] =
                    (v[i] - Vector::new(mean)) * Vector::new(rstd) * Vector::<f32, N>::cast_from(gamma[at])
                        + Vector::<f32, N>::cast_from(beta[at]);
            }
        }
        store_vectors::<E, N>(out, &v, row, live, lane, cv, per);
    }

    /// The input gradient, `rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = g·gamma`; with
    /// `columns`, also each row slot's partial scale and shift gradients (`Σ g·x̂` and `Σ g` over
    /// the rows it handled) in `partial[chunk, 0 | 1, channel]`, `chunk = cube·ROWS + slot`, for
    /// [`sum_chunks_kernel`]. Each cube takes the groups of [`ROWS`] rows `cube, cube + cubes, …`,
    /// so a launch of fewer cubes than groups sums over more rows per chunk. (The column sums were
    /// a kernel of their own that read `x` and `g` again: 33 launches and ~1.8 ms of a
    /// lsagt_cifar_tiny b128 training step on the H100.)
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn backward_rows_kernel<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        shift: &Tensor<Vector<E, N>>,
        gamma: &Tensor<Vector<E, N>>,
        grad: &Tensor<Vector<E, N>>,
        dx: &mut Tensor<Vector<E, N>>,
        partial: &mut Tensor<Vector<f32, N>>,
        rows: usize,
        eps: f32,
        batch_tokens: usize,
        tokens: usize,
        #[comptime] c: usize,
        #[comptime] cv: usize,
        #[comptime] per: usize,
        #[comptime] shifted: bool,
        #[comptime] columns: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let mut col_gx = Array::<Vector<f32, N>>::new(per);
        let mut col_g = Array::<Vector<f32, N>>::new(per);
        #[unroll]
        for i in 0..per {
            col_gx[i] = Vector::new(f32::new(0.0));
            col_g[i] = Vector::new(f32::new(0.0));
        }
        let groups = rows.div_ceil(comptime!(ROWS));
        // The same for every thread of the cube, which the row sums synchronise.
        let mut group = CUBE_POS;
        while group < groups {
            let row = group * comptime!(ROWS) + slot;
            let live = row < rows;
            let v = load_row::<E, N>(x, shift, row, live, lane, batch_tokens, tokens, cv, per, shifted);
            let mut gg = load_vectors_or::<E, N>(grad, row, live, lane, f32::new(0.0), cv, per);
            let mean = row_mean::<N>(&mut sums, &v, lane, slot, c, per);
            let rstd = row_rstd::<N>(&mut sums, &v, mean, lane, slot, eps, c, cv, per);
            let (mean_v, rstd_v) = (Vector::<f32, N>::new(mean), Vector::<f32, N>::new(rstd));
            let mut a = f32::new(0.0);
            let mut b = f32::new(0.0);
            #[unroll]
            for i in 0..per {
                let at = lane + i * comptime!(LANES);
                if at < cv {
                    let xhat = (v[i] - mean_v) * rstd_v;
                    if comptime!(columns) {
                        // Rows past the last are zeros in `gg`, so they add nothing.
                        col_gx[i] += gg[i] * xhat;
                        col_g[i] += gg[i];
                    }
                    gg[i] = gg[i] * Vector::<f32, N>::cast_from(gamma[at]);
                    a += vector_sum::<N>(gg[i]);
                    b += vector_sum::<N>(gg[i] * xhat);
                }
            }
            let a = Vector::<f32, N>::new(row_sum(&mut sums, a, lane, slot) / f32::new(comptime!(c as f32)));
            let b = Vector::<f32, N>::new(row_sum(&mut sums, b, lane, slot) / f32::new(comptime!(c as f32)));
            #[unroll]
            for i in 0..per {
                gg[i] = rstd_v * (gg[i] - a - (v[i] - mean_v) * rstd_v * b);
            }
            store_vectors::<E, N>(dx, &gg, row, live, lane, cv, per);
            group += CUBE_COUNT;
        }
        if comptime!(columns) {
            let chunk = CUBE_POS * comptime!(ROWS) + slot;
            #[unroll]
            for i in 0..per {
                let at = lane + i * comptime!(LANES);
                if at < cv {
                    partial[(chunk * 2) * cv + at] = col_gx[i];
                    partial[(chunk * 2 + 1) * cv + at] = col_g[i];
                }
            }
        }
    }

    /// `dgamma[ch] = Σ_chunk partial[chunk, 0, ch]`, `dbeta[ch] = Σ_chunk partial[chunk, 1, ch]`:
    /// a cube of [`LANES`] threads per channel. (A thread per channel walking all chunks took
    /// ~44 µs a call, 33 calls per LSAGT training step.)
    #[cube(launch_unchecked)]
    fn sum_chunks_kernel<E: Float>(
        partial: &Tensor<f32>,
        dgamma: &mut Tensor<E>,
        dbeta: &mut Tensor<E>,
        #[comptime] chunks: usize,
        #[comptime] c: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let ch = CUBE_POS;
        let lane = UNIT_POS_X as usize;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES));
        let mut gx = f32::new(0.0);
        let mut g = f32::new(0.0);
        let mut q = lane;
        while q < chunks {
            gx += partial[(q * 2) * c + ch];
            g += partial[(q * 2 + 1) * c + ch];
            q += comptime!(LANES);
        }
        let gx = row_sum(&mut sums, gx, lane, 0);
        let g = row_sum(&mut sums, g, lane, 0);
        if lane == 0 {
            dgamma[ch] = E::cast_from(gx);
            dbeta[ch] = E::cast_from(g);
        }
    }

    #[derive(Clone, Debug)]
    pub struct LayerNorm {
        pub eps: f32,
    }

    /// [`LayerNorm`] of `x + shift`, with row `(t, b, n)` of `x` (`T·B·N` rows) taking row
    /// `(t, n)` of `shift` (`T·N` rows).
    #[derive(Clone, Debug)]
    pub struct ShiftedLayerNorm {
        pub eps: f32,
        pub batch: usize,
        pub tokens: usize,
    }

    /// The shift and how rows map onto it: `(shift, batch·tokens, tokens)`.
    type Shift<R> = Option<(CubeTensor<R>, usize, usize)>;

    /// The kernels' shift arguments: whether there is one, the shift in `x`'s dtype (or `x`
    /// itself, which an unshifted kernel never reads), `batch·tokens` and `tokens`.
    fn shift_args<R: CubeRuntime>(shift: Shift<R>, x: &CubeTensor<R>) -> (bool, CubeTensor<R>, usize, usize) {
        match shift {
            Some((s, batch_tokens, tokens)) => (true, dense(s, x.dtype), batch_tokens, tokens),
            None => (false, x.clone(), 1, 1),
        }
    }

    fn rows_and_channels<R: CubeRuntime>(x: &CubeTensor<R>) -> (usize, usize) {
        let s = x.meta.shape();
        (s[0], s[1])
    }

    fn forward<R: CubeRuntime>(
        eps: f32,
        x: CubeTensor<R>,
        shift: Shift<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
    ) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let dtype = x.dtype;
        let (gamma, beta) = (dense(gamma, dtype), dense(beta, dtype));
        let (rows, c) = rows_and_channels(&x);
        let out = empty(&x, [rows, c], dtype);
        let (count, dim) = row_launch(rows);
        let n = vector_width(&x.client, dtype, &[c]);
        let (shifted, shift, batch_tokens, tokens) = shift_args(shift, &x);
        unsafe {
            forward_kernel::launch_unchecked(
                &x.client,
                count,
                dim,
                n,
                x.clone().into_tensor_arg(),
                shift.into_tensor_arg(),
                gamma.into_tensor_arg(),
                beta.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                rows,
                eps,
                batch_tokens,
                tokens,
                c,
                c / n,
                (c / n).div_ceil(LANES),
                shifted,
                dtype.into(),
            )
        };
        out
    }

    /// Most cubes of a backward launch that also sums the scale and shift gradients: 4 per SM of
    /// an H100 (each cube 8 rows × 32 threads), whose 4,224 partial sums per channel the second
    /// launch adds up.
    const COLUMN_CUBES: usize = 528;

    /// The gradients of `x` (also that of the shift, before its sum over the batch), `gamma` and
    /// `beta`, as wanted.
    #[allow(clippy::type_complexity)]
    fn backward<R: CubeRuntime>(
        eps: f32,
        [x, gamma, beta]: [CubeTensor<R>; 3],
        shift: Shift<R>,
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
        let n = vector_width(&client, dtype, &[c]);
        let (shifted, shift, batch_tokens, tokens) = shift_args(shift, &x);
        let columns = want_gamma || want_beta;
        // With the column sums, at most COLUMN_CUBES cubes (each sums more rows) so that the
        // partial sums (one per row slot of each cube) stay few; without, a cube per group of rows.
        let cubes = rows.div_ceil(ROWS).clamp(1, COLUMN_CUBES);
        let (count, dim) = if columns {
            (
                CubeCount::Static(cubes as u32, 1, 1),
                CubeDim::new_2d(LANES as u32, ROWS as u32),
            )
        } else {
            row_launch(rows)
        };
        let chunks = if columns { cubes * ROWS } else { 1 };
        let partial = empty(&x, [chunks, 2, c], DType::F32);
        unsafe {
            backward_rows_kernel::launch_unchecked(
                &client,
                count,
                dim,
                n,
                x.into_tensor_arg(),
                shift.into_tensor_arg(),
                gamma.into_tensor_arg(),
                grad.into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                rows,
                eps,
                batch_tokens,
                tokens,
                c,
                c / n,
                (c / n).div_ceil(LANES),
                shifted,
                columns,
                dtype.into(),
            )
        };
        let (mut dgamma, mut dbeta) = (None, None);
        if columns {
            // Both sums in one launch (one fewer per LayerNorm and step).
            let (gsum, bsum) = (empty(&partial, [c], dtype), empty(&partial, [c], dtype));
            unsafe {
                sum_chunks_kernel::launch_unchecked(
                    &client,
                    CubeCount::Static(c as u32, 1, 1),
                    CubeDim::new_1d(LANES as u32),
                    partial.into_tensor_arg(),
                    gsum.clone().into_tensor_arg(),
                    bsum.clone().into_tensor_arg(),
                    chunks,
                    c,
                    dtype.into(),
                )
            };
            dgamma = want_gamma.then(|| cast(gsum, gamma_dtype));
            dbeta = want_beta.then(|| cast(bsum, beta_dtype));
        }
        [want_x.then_some(dx), dgamma, dbeta]
    }

    impl FusedOp<3> for LayerNorm {
        fn output_shape(&self, [x, _, _]: &[Shape; 3]) -> Shape {
            x.clone()
        }

        fn forward<R: CubeRuntime>(&self, [x, gamma, beta]: [CubeTensor<R>; 3]) -> CubeTensor<R> {
            forward(self.eps, x, None, gamma, beta)
        }

        fn backward<R: CubeRuntime>(
            &self,
            inputs: [CubeTensor<R>; 3],
            grad: CubeTensor<R>,
            wanted: [bool; 3],
        ) -> [Option<CubeTensor<R>>; 3] {
            backward(self.eps, inputs, None, grad, wanted)
        }
    }

    impl FusedOp<4> for ShiftedLayerNorm {
        fn output_shape(&self, [x, _, _, _]: &[Shape; 4]) -> Shape {
            x.clone()
        }

        fn forward<R: CubeRuntime>(&self, [x, shift, gamma, beta]: [CubeTensor<R>; 4]) -> CubeTensor<R> {
            let shift = Some((shift, self.batch * self.tokens, self.tokens));
            forward(self.eps, x, shift, gamma, beta)
        }

        fn backward<R: CubeRuntime>(
            &self,
            [x, shift, gamma, beta]: [CubeTensor<R>; 4],
            grad: CubeTensor<R>,
            [want_x, want_shift, want_gamma, want_beta]: [bool; 4],
        ) -> [Option<CubeTensor<R>>; 4] {
            let (shift_dtype, shift_shape) = (shift.dtype, shift.meta.shape().clone());
            let (rows, c) = rows_and_channels(&x);
            let wanted = [want_x || want_shift, want_gamma, want_beta];
            let s = Some((shift, self.batch * self.tokens, self.tokens));
            let [dx, dgamma, dbeta] = backward(self.eps, [x, gamma, beta], s, grad, wanted);
            // The shift's gradient: the input gradient summed over the batch.
            let dshift = match (&dx, want_shift) {
                (Some(dx), true) => {
                    let t = rows / (self.batch * self.tokens);
                    let per_batch = TensorOps::<R>::float_reshape(
                        dx.clone(),
                        Shape::new([t, self.batch, self.tokens * c]),
                    );
                    let summed = TensorOps::<R>::float_sum_dim(per_batch, 1);
                    Some(cast(
                        TensorOps::<R>::float_reshape(summed, shift_shape),
                        shift_dtype,
                    ))
                }
                _ => None,
            };
            [dx.filter(|_| want_x), dshift, dgamma, dbeta]
        }
    }
}
