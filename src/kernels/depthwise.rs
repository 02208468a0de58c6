//! Depth-wise k×k convolution of channels-last tensors (VVT's MLP convolution).
//!
//! Reference path: k² shifted slices times per-channel weights, summed. On the GPU its backward
//! zero-fills and slice-assigns the input gradient k² times over the MLP's widest tensor. The fused
//! path is one kernel per pass: the output, the input gradient (the same kernel with the filter
//! flipped) and the weight gradient (per-chunk partial sums, then one sum over the chunks).

use burn::prelude::*;
use burn::tensor::Slice;

/// `x`: `B×H×W×C`; `weight`: `C×k²` (one k×k filter per channel, taps row-major). Stride `stride`,
/// zero padding `pad` on every side, no bias. Returns `B×Ho×Wo×C`.
pub fn depthwise_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 2>,
    k: usize,
    stride: usize,
    pad: usize,
) -> Tensor<B, 4> {
    // Its backward replaces k² zero-filled slice-assigns.
    if stride == 1 && super::available::<B>() {
        match fused(x, weight, k, pad) {
            Ok(y) => return y,
            Err((x, weight)) => return depthwise_conv2d_reference(x, weight, k, stride, pad),
        }
    }
    depthwise_conv2d_reference(x, weight, k, stride, pad)
}

/// The fused kernel, or the inputs back when this backend has none (stride 1 only).
pub fn fused<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 2>,
    k: usize,
    pad: usize,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 2>)> {
    check(&x, &weight, k);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        let op = cube::Depthwise { k, pad };
        match super::cube::run::<B, _, 2>(&op, [primitive(x), primitive(weight)]) {
            Ok(y) => Ok(tensor(y)),
            Err([x, w]) => Err((tensor(x), tensor(w))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = pad;
        Err((x, weight))
    }
}

fn check<B: Backend>(x: &Tensor<B, 4>, weight: &Tensor<B, 2>, k: usize) {
    let c = x.dims()[3];
    assert_eq!(
        weight.dims(),
        [c, k * k],
        "depthwise_conv2d: the weight must be channels × k² ({c} × {})",
        k * k
    );
}

/// k² shifted slices times per-channel weights, summed (one fused element-wise pass on the GPU).
pub fn depthwise_conv2d_reference<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 2>,
    k: usize,
    stride: usize,
    pad: usize,
) -> Tensor<B, 4> {
    check(&x, &weight, k);
    let [b, h, w, c] = x.dims();
    let (ho, wo) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
    // `[k², C]`: row `ij` holds every channel's weight at kernel position (i, j).
    let taps = weight.transpose();
    let xp = pad_nhwc(x, pad);
    let span = |start: usize, n: usize| {
        Slice::new(
            start as isize,
            Some((start + stride * (n - 1) + 1) as isize),
            stride as isize,
        )
    };
    let mut y: Option<Tensor<B, 4>> = None;
    for ij in 0..k * k {
        let (i, j) = (ij / k, ij % k);
        let wij = taps.clone().slice([ij..ij + 1, 0..c]).reshape([1, 1, 1, c]);
        let window = xp
            .clone()
            .slice([Slice::full(), span(i, ho), span(j, wo), Slice::full()]);
        let term = window * wij;
        y = Some(match y {
            Some(acc) => acc + term,
            None => term,
        });
    }
    y.expect("kernel has at least one tap").reshape([b, ho, wo, c])
}

/// Zero padding of `p` on both sides of the two spatial dims of `B×H×W×C`.
pub(crate) fn pad_nhwc<B: Backend>(x: Tensor<B, 4>, p: usize) -> Tensor<B, 4> {
    if p == 0 {
        return x;
    }
    let [b, h, w, c] = x.dims();
    let device = x.device();
    let rows = Tensor::zeros([b, p, w, c], &device);
    let x = Tensor::cat(vec![rows.clone(), x, rows], 1);
    let cols = Tensor::zeros([b, h + 2 * p, p, c], &device);
    Tensor::cat(vec![cols.clone(), x, cols], 2)
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use crate::kernels::cube::{FusedOp, TensorOps, cast, dense, empty, launch_dims};

    /// Output columns per thread in [`depthwise_kernel`]: each input value loaded feeds up to k
    /// outputs, so a row of `RUN` outputs loads `k·(RUN + k − 1)` values instead of `k²·RUN`.
    const RUN: usize = 8;

    /// One thread per (batch, output row, run of [`RUN`] output columns, channel): the k² taps of
    /// one channel, the filter held in registers (the output, or the input gradient).
    #[cube(launch_unchecked)]
    fn depthwise_kernel<E: Float>(
        input: &Tensor<E>,
        weight: &Tensor<E>,
        output: &mut Tensor<E>,
        threads: usize,
        #[comptime] in_h: usize,
        #[comptime] in_w: usize,
        #[comptime] out_h: usize,
        #[comptime] out_w: usize,
        #[comptime] c: usize,
        #[comptime] k: usize,
        #[comptime] pad: usize,
        #[comptime] run: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= threads {
            terminate!();
        }
        let runs = comptime!(out_w.div_ceil(run));
        let ch = pos % c;
        let x0 = ((pos / c) % runs) * run;
        let y = (pos / (c * runs)) % out_h;
        let b = pos / (c * runs * out_h);
        let mut w = Array::<f32>::new(comptime!(k * k));
        #[unroll]
        for t in 0..comptime!(k * k) {
            w[t] = f32::cast_from(weight[ch * comptime!(k * k) + t]);
        }
        let mut acc = Array::<f32>::new(run);
        #[unroll]
        for r in 0..run {
            acc[r] = f32::new(0.0);
        }
        #[unroll]
        for i in 0..k {
            let yy = y + i;
            if yy >= pad && yy < in_h + pad {
                let row = (b * in_h + yy - pad) * in_w;
                // Padded input column x0 + jj feeds output x0 + jj − j through tap j.
                #[unroll]
                for jj in 0..comptime!(run + k - 1) {
                    let xx = x0 + jj;
                    if xx >= pad && xx < in_w + pad {
                        let v = f32::cast_from(input[(row + xx - pad) * c + ch]);
                        #[unroll]
                        for j in 0..k {
                            if jj >= j && jj < run + j {
                                acc[jj - j] += v * w[i * k + j];
                            }
                        }
                    }
                }
            }
        }
        #[unroll]
        for r in 0..run {
            let x = x0 + r;
            if x < out_w {
                output[((b * out_h + y) * out_w + x) * c + ch] = E::cast_from(acc[r]);
            }
        }
    }

    /// Partial weight gradients: thread (chunk, channel) sums `grad · input` over the output rows
    /// `chunk·chunk_rows ..` (each a whole row of positions) for each of the k² taps, in f32. A
    /// k×k window of inputs slides along the row in registers: k new loads per position.
    #[cube(launch_unchecked)]
    fn weight_grad_kernel<E: Float>(
        input: &Tensor<E>,
        grad: &Tensor<E>,
        partial: &mut Tensor<f32>,
        rows: usize,
        #[comptime] in_h: usize,
        #[comptime] in_w: usize,
        #[comptime] out_h: usize,
        #[comptime] out_w: usize,
        #[comptime] c: usize,
        #[comptime] k: usize,
        #[comptime] pad: usize,
        #[comptime] chunk_rows: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos * k * k >= partial.len() {
            terminate!();
        }
        let ch = pos % c;
        let chunk = pos / c;
        let mut acc = Array::<f32>::new(comptime!(k * k));
        let mut win = Array::<f32>::new(comptime!(k * k));
        #[unroll]
        for t in 0..comptime!(k * k) {
            acc[t] = f32::new(0.0);
            win[t] = f32::new(0.0);
        }
        let start = chunk * chunk_rows;
        let end = select(start + chunk_rows < rows, start + chunk_rows, rows);
        for r in start..end {
            let y = r % out_h;
            let b = r / out_h;
            // Window column j holds padded input column x + j; the first k − 1 are loaded here
            // into slots 1.., the loop shifts them down before loading column x + k − 1.
            #[unroll]
            for i in 0..k {
                let yy = y + i;
                let row_ok = yy >= pad && yy < in_h + pad;
                let row = (b * in_h + yy - pad) * in_w;
                #[unroll]
                for j in 0..comptime!(k - 1) {
                    let mut v = f32::new(0.0);
                    if row_ok && j >= pad && j < in_w + pad {
                        v = f32::cast_from(input[(row + j - pad) * c + ch]);
                    }
                    win[i * k + j + 1] = v;
                }
            }
            for x in 0..out_w {
                #[unroll]
                for i in 0..k {
                    #[unroll]
                    for j in 0..comptime!(k - 1) {
                        win[i * k + j] = win[i * k + j + 1];
                    }
                    let yy = y + i;
                    let xx = x + k - 1;
                    let mut v = f32::new(0.0);
                    if yy >= pad && yy < in_h + pad && xx >= pad && xx < in_w + pad {
                        v = f32::cast_from(input[((b * in_h + yy - pad) * in_w + xx - pad) * c + ch]);
                    }
                    win[i * k + k - 1] = v;
                }
                let g = f32::cast_from(grad[(r * out_w + x) * c + ch]);
                #[unroll]
                for t in 0..comptime!(k * k) {
                    acc[t] += g * win[t];
                }
            }
        }
        #[unroll]
        for t in 0..comptime!(k * k) {
            partial[(chunk * k * k + t) * c + ch] = acc[t];
        }
    }

    /// `output[ch, t] = Σ_chunk partial[chunk, t, ch]`.
    #[cube(launch_unchecked)]
    fn sum_chunks_kernel<E: Float>(
        partial: &Tensor<f32>,
        output: &mut Tensor<E>,
        #[comptime] chunks: usize,
        #[comptime] c: usize,
        #[comptime] taps: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= output.len() {
            terminate!();
        }
        let t = pos % taps;
        let ch = pos / taps;
        let mut acc = f32::new(0.0);
        for q in 0..chunks {
            acc += partial[(q * taps + t) * c + ch];
        }
        output[pos] = E::cast_from(acc);
    }

    #[derive(Clone, Debug)]
    pub struct Depthwise {
        pub k: usize,
        pub pad: usize,
    }

    fn dims4<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
        let s = t.meta.shape();
        [s[0], s[1], s[2], s[3]]
    }

    fn conv<R: CubeRuntime>(x: CubeTensor<R>, w: CubeTensor<R>, k: usize, pad: usize) -> CubeTensor<R> {
        let [b, h, wd, c] = dims4(&x);
        let (ho, wo) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
        let out = empty(&x, [b, ho, wo, c], x.dtype);
        let run = RUN.min(wo);
        let threads = b * ho * wo.div_ceil(run) * c;
        let (count, dim) = launch_dims(&x.client, threads);
        let dtype = x.dtype;
        unsafe {
            depthwise_kernel::launch_unchecked(
                &x.client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                w.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                threads,
                h,
                wd,
                ho,
                wo,
                c,
                k,
                pad,
                run,
                dtype.into(),
            )
        };
        out
    }

    fn weight_grad<R: CubeRuntime>(
        x: CubeTensor<R>,
        g: CubeTensor<R>,
        k: usize,
        pad: usize,
    ) -> CubeTensor<R> {
        let [b, h, w, c] = dims4(&x);
        let [_, ho, wo, _] = dims4(&g);
        let rows = b * ho;
        // Enough (chunk, channel) threads to fill the GPU, each summing whole output rows.
        let chunks = (131_072 / c).clamp(1, rows);
        let chunk_rows = rows.div_ceil(chunks);
        let chunks = rows.div_ceil(chunk_rows);
        let client = x.client.clone();
        let partial = empty(&x, [chunks, k * k, c], DType::F32);
        let (count, dim) = launch_dims(&client, chunks * c);
        let dtype = x.dtype;
        unsafe {
            weight_grad_kernel::launch_unchecked(
                &client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                g.into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                rows,
                h,
                w,
                ho,
                wo,
                c,
                k,
                pad,
                chunk_rows,
                dtype.into(),
            )
        };
        let out = empty(&x, [c, k * k], dtype);
        let (count, dim) = launch_dims(&client, c * k * k);
        unsafe {
            sum_chunks_kernel::launch_unchecked(
                &client,
                count,
                dim,
                partial.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                chunks,
                c,
                k * k,
                dtype.into(),
            )
        };
        out
    }

    impl FusedOp<2> for Depthwise {
        fn output_shape(&self, [x, _]: &[Shape; 2]) -> Shape {
            let side = |n: usize| n + 2 * self.pad + 1 - self.k;
            Shape::new([x[0], side(x[1]), side(x[2]), x[3]])
        }

        fn forward<R: CubeRuntime>(&self, [x, w]: [CubeTensor<R>; 2]) -> CubeTensor<R> {
            let x = into_contiguous(x);
            let w = dense(w, x.dtype);
            conv(x, w, self.k, self.pad)
        }

        fn backward<R: CubeRuntime>(
            &self,
            [x, w]: [CubeTensor<R>; 2],
            grad: CubeTensor<R>,
            [want_x, want_w]: [bool; 2],
        ) -> [Option<CubeTensor<R>>; 2] {
            let w_dtype = w.dtype;
            let x = into_contiguous(x);
            let grad = dense(grad, x.dtype);
            // The input gradient is the same convolution of the output gradient with every
            // filter turned by 180° and padding k − 1 − pad.
            let dx = want_x.then(|| {
                let flipped = TensorOps::<R>::float_flip(dense(w, x.dtype), &[1]);
                conv(
                    grad.clone(),
                    into_contiguous(flipped),
                    self.k,
                    self.k - 1 - self.pad,
                )
            });
            let dw = want_w.then(|| cast(weight_grad(x, grad, self.k, self.pad), w_dtype));
            [dx, dw]
        }
    }
}
