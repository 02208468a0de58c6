//! LSAGT's local attention core: each token's query against the keys of its own T shifted
//! variants, softmax over T, weighted sum of their values.
//!
//! Reference path: reshapes, `T`-long batched matmuls and a softmax, with the keys and values split
//! out of the `wkv` output. The fused path reads `wkv`'s output as it is: one thread per
//! (token, query head) in the forward, one per (token, key/value head) in the backward, which
//! writes the gradient of the whole `wkv` output (keys and values) in one pass. Every load and
//! store moves a vector of 16 bytes (8 bf16 values on CUDA): with one value per load the kernel
//! was slower than the reference; with vectors it is faster (+9 % LSAGT training and +8 %
//! inference on the H100).

use super::softmax::softmax_scaled;
use burn::prelude::*;

/// The attention geometry: `heads` query heads of `head_dim`, `kv_heads` key/value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalHeads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl LocalHeads {
    /// The scores' scale, `1/√head_dim`.
    pub fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }
}

/// `q`: `B×N×D` queries (`D = heads·head_dim`); `kv`: `T×B×N×2·kv_heads·head_dim`, the keys of
/// every variant then their values. Returns the attended `B×N×D`, heads concatenated.
pub fn local_attention<B: Backend>(q: Tensor<B, 3>, kv: Tensor<B, 4>, heads: LocalHeads) -> Tensor<B, 3> {
    if super::available::<B>() {
        match fused(q, kv, heads) {
            Ok(y) => return y,
            Err((q, kv)) => return local_attention_reference(q, kv, heads),
        }
    }
    local_attention_reference(q, kv, heads)
}

fn check<B: Backend>(q: &Tensor<B, 3>, kv: &Tensor<B, 4>, h: LocalHeads) {
    let [b, n, d] = q.dims();
    let [_, kb, kn, kd] = kv.dims();
    assert!(
        d == h.heads * h.head_dim && h.heads.is_multiple_of(h.kv_heads),
        "local attention: {d} query channels for {} heads of {}",
        h.heads,
        h.head_dim
    );
    assert!(
        (kb, kn, kd) == (b, n, 2 * h.kv_heads * h.head_dim),
        "local attention: keys/values {:?} do not match queries {:?}",
        kv.dims(),
        q.dims()
    );
}

/// The fused kernel, or the inputs back when this backend has none.
pub fn fused<B: Backend>(
    q: Tensor<B, 3>,
    kv: Tensor<B, 4>,
    heads: LocalHeads,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 4>)> {
    check(&q, &kv, heads);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        match super::cube::run::<B, _, 2>(&cube::LocalAttention(heads), [primitive(q), primitive(kv)]) {
            Ok(y) => Ok(tensor(y)),
            Err([q, kv]) => Err((tensor(q), tensor(kv))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    Err((q, kv))
}

/// Tensor ops (the softmax through [`super::softmax`]): query head `kh·g + i` uses key/value head `kh` (`g = heads / kv_heads`).
pub fn local_attention_reference<B: Backend>(
    q: Tensor<B, 3>,
    kv: Tensor<B, 4>,
    h: LocalHeads,
) -> Tensor<B, 3> {
    check(&q, &kv, h);
    let [b, n, d] = q.dims();
    let t = kv.dims()[0];
    let (kvh, dh) = (h.kv_heads, h.head_dim);
    let g = h.heads / kvh;
    let q = q.reshape([b * n * kvh, g, dh]);
    let k = kv.clone().slice_dim(3, 0..kvh * dh);
    let v = kv.slice_dim(3, kvh * dh..2 * kvh * dh);
    let k = k.reshape([t, b * n * kvh, dh]).swap_dims(0, 1);
    let v = v.reshape([t, b * n * kvh, dh]).swap_dims(0, 1);
    softmax_scaled(q.matmul(k.swap_dims(1, 2)), (dh as f64).powf(-0.5))
        .matmul(v)
        .reshape([b, n, d])
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::Shape;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::LocalHeads;
    use crate::kernels::cube::{FusedOp, cast, dense, empty, launch_dims, vector_width};
    use crate::kernels::rows::vector_sum;

    /// `Σ a·b` over `len` vectors from `a_at` and `b_at`.
    #[cube]
    fn dot<E: Float, N: Size>(
        a: &Tensor<Vector<E, N>>,
        a_at: usize,
        b: &Tensor<Vector<E, N>>,
        b_at: usize,
        #[comptime] len: usize,
    ) -> f32 {
        let mut s = Vector::<f32, N>::new(f32::new(0.0));
        for e in 0..len {
            s += Vector::<f32, N>::cast_from(a[a_at + e]) * Vector::<f32, N>::cast_from(b[b_at + e]);
        }
        vector_sum::<N>(s)
    }

    /// Thread (token, query head): scores over the T variants, softmax, weighted values. Every
    /// index counts vectors of `N` values; a head is `hv` of them.
    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float, N: Size>(
        q: &Tensor<Vector<E, N>>,
        kv: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        tokens: usize,
        scale: f32,
        #[comptime] t: usize,
        #[comptime] heads: usize,
        #[comptime] kv_heads: usize,
        #[comptime] hv: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= tokens * heads {
            terminate!();
        }
        let head = pos % heads;
        let token = pos / heads;
        let kh = head / comptime!(heads / kv_heads);
        let row = comptime!(2 * kv_heads * hv);
        let q_at = pos * hv;
        let mut p = Array::<f32>::new(t);
        let mut max = f32::new(-1.0e30);
        #[unroll]
        for ti in 0..t {
            let s = dot::<E, N>(q, q_at, kv, (ti * tokens + token) * row + kh * hv, hv) * scale;
            p[ti] = s;
            max = select(s > max, s, max);
        }
        let mut sum = f32::new(0.0);
        #[unroll]
        for ti in 0..t {
            let w = f32::exp(p[ti] - max);
            p[ti] = w;
            sum += w;
        }
        let inv = Vector::<f32, N>::new(f32::new(1.0) / sum);
        let v0 = token * row + (kv_heads + kh) * hv;
        for e in 0..hv {
            let mut acc = Vector::<f32, N>::new(f32::new(0.0));
            #[unroll]
            for ti in 0..t {
                let at = ti * tokens * row + v0 + e;
                acc += Vector::<f32, N>::cast_from(kv[at]) * Vector::new(p[ti]);
            }
            out[q_at + e] = Vector::<E, N>::cast_from(acc * inv);
        }
    }

    /// Thread (token, query head), `tokens_per_cube` tokens per cube: recomputes its head's
    /// softmax and score gradients `dS = P·(dP − Σ P·dP)`, writes its query gradient, and shares
    /// `P` and `dS` through shared memory; then the `g` threads of a (token, key/value head) split
    /// the variants between them and write those variants' key and value gradients, summed over
    /// the `g` query heads. (One thread per (token, key/value head) doing all of it left the GPU
    /// with a quarter of the threads: ~4 ms of a 53 ms lsagt_cifar_tiny b128 training step.)
    #[cube(launch_unchecked)]
    fn backward_kernel<E: Float, N: Size>(
        q: &Tensor<Vector<E, N>>,
        kv: &Tensor<Vector<E, N>>,
        grad: &Tensor<Vector<E, N>>,
        dq: &mut Tensor<Vector<E, N>>,
        dkv: &mut Tensor<Vector<E, N>>,
        tokens: usize,
        scale: f32,
        #[comptime] t: usize,
        #[comptime] heads: usize,
        #[comptime] kv_heads: usize,
        #[comptime] hv: usize,
        #[comptime] tokens_per_cube: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let local = UNIT_POS as usize;
        let pos = CUBE_POS * comptime!(tokens_per_cube * heads) + local;
        let live = pos < tokens * heads;
        let g = comptime!(heads / kv_heads);
        let head = pos % heads;
        let token = pos / heads;
        let kh = head / g;
        let gi = head % g;
        let row = comptime!(2 * kv_heads * hv);
        let k0 = token * row + kh * hv;
        let v0 = k0 + comptime!(kv_heads * hv);
        let stride = tokens * row;
        let mut shared_p = SharedMemory::<f32>::new(comptime!(tokens_per_cube * heads * t));
        let mut shared_ds = SharedMemory::<f32>::new(comptime!(tokens_per_cube * heads * t));
        if live {
            let q_at = pos * hv;
            let mut p = Array::<f32>::new(t);
            let mut max = f32::new(-1.0e30);
            #[unroll]
            for ti in 0..t {
                let s = dot::<E, N>(q, q_at, kv, ti * stride + k0, hv) * scale;
                p[ti] = s;
                max = select(s > max, s, max);
            }
            let mut sum = f32::new(0.0);
            #[unroll]
            for ti in 0..t {
                let w = f32::exp(p[ti] - max);
                p[ti] = w;
                sum += w;
            }
            let inv = f32::new(1.0) / sum;
            let mut ds = Array::<f32>::new(t);
            let mut total = f32::new(0.0);
            #[unroll]
            for ti in 0..t {
                p[ti] *= inv;
                let s = dot::<E, N>(grad, q_at, kv, ti * stride + v0, hv);
                ds[ti] = s;
                total += p[ti] * s;
            }
            #[unroll]
            for ti in 0..t {
                ds[ti] = p[ti] * (ds[ti] - total) * scale;
                shared_p[local * t + ti] = p[ti];
                shared_ds[local * t + ti] = ds[ti];
            }
            for e in 0..hv {
                let mut acc = Vector::<f32, N>::new(f32::new(0.0));
                #[unroll]
                for ti in 0..t {
                    acc += Vector::<f32, N>::cast_from(kv[ti * stride + k0 + e]) * Vector::new(ds[ti]);
                }
                dq[q_at + e] = Vector::<E, N>::cast_from(acc);
            }
        }
        sync_cube();
        if live {
            // dK_t = Σ_heads dS_t · q, dV_t = Σ_heads P_t · grad, for t = gi, gi + g, ...
            let first = local - gi;
            let q0 = (pos - gi) * hv;
            let mut ti = gi;
            while ti < t {
                for e in 0..hv {
                    let mut dk = Vector::<f32, N>::new(f32::new(0.0));
                    let mut dv = Vector::<f32, N>::new(f32::new(0.0));
                    #[unroll]
                    for hi in 0..g {
                        let at = q0 + hi * hv + e;
                        let slot = (first + hi) * t + ti;
                        dk += Vector::<f32, N>::cast_from(q[at]) * Vector::new(shared_ds[slot]);
                        dv += Vector::<f32, N>::cast_from(grad[at]) * Vector::new(shared_p[slot]);
                    }
                    dkv[ti * stride + k0 + e] = Vector::<E, N>::cast_from(dk);
                    dkv[ti * stride + v0 + e] = Vector::<E, N>::cast_from(dv);
                }
                ti += g;
            }
        }
    }

    #[derive(Clone, Debug)]
    pub struct LocalAttention(pub LocalHeads);

    /// `(tokens, variants)` of queries `B×N×D` and keys/values `T×B×N×…`.
    fn sizes<R: CubeRuntime>(q: &CubeTensor<R>, kv: &CubeTensor<R>) -> (usize, usize) {
        (q.meta.shape()[0] * q.meta.shape()[1], kv.meta.shape()[0])
    }

    impl FusedOp<2> for LocalAttention {
        fn output_shape(&self, [q, _]: &[Shape; 2]) -> Shape {
            q.clone()
        }

        fn forward<R: CubeRuntime>(&self, [q, kv]: [CubeTensor<R>; 2]) -> CubeTensor<R> {
            let q = into_contiguous(q);
            let kv = dense(kv, q.dtype);
            let (h, (tokens, t)) = (self.0, sizes(&q, &kv));
            let out = empty(&q, q.meta.shape().clone(), q.dtype);
            let (count, dim) = launch_dims(&q.client, tokens * h.heads);
            let dtype = q.dtype;
            let n = vector_width(&q.client, dtype, &[h.head_dim]);
            unsafe {
                forward_kernel::launch_unchecked(
                    &q.client,
                    count,
                    dim,
                    n,
                    q.clone().into_tensor_arg(),
                    kv.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    tokens,
                    h.scale(),
                    t,
                    h.heads,
                    h.kv_heads,
                    h.head_dim / n,
                    dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            [q, kv]: [CubeTensor<R>; 2],
            grad: CubeTensor<R>,
            [want_q, want_kv]: [bool; 2],
        ) -> [Option<CubeTensor<R>>; 2] {
            let kv_dtype = kv.dtype;
            let q = into_contiguous(q);
            let dtype = q.dtype;
            let (kv, grad) = (dense(kv, dtype), dense(grad, dtype));
            let (h, (tokens, t)) = (self.0, sizes(&q, &kv));
            let dq = empty(&q, q.meta.shape().clone(), dtype);
            let dkv = empty(&q, kv.meta.shape().clone(), dtype);
            // Whole tokens per cube (a token's query heads share their variants through shared
            // memory), ~128 threads.
            let tokens_per_cube = (128 / h.heads).max(1);
            let cubes = tokens.div_ceil(tokens_per_cube) as u32;
            let count = if cubes <= 65_535 {
                CubeCount::Static(cubes, 1, 1)
            } else {
                CubeCount::Static(65_535, cubes.div_ceil(65_535), 1)
            };
            let dim = CubeDim::new_1d((tokens_per_cube * h.heads) as u32);
            let n = vector_width(&q.client, dtype, &[h.head_dim]);
            unsafe {
                backward_kernel::launch_unchecked(
                    &q.client,
                    count,
                    dim,
                    n,
                    q.clone().into_tensor_arg(),
                    kv.into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dq.clone().into_tensor_arg(),
                    dkv.clone().into_tensor_arg(),
                    tokens,
                    h.scale(),
                    t,
                    h.heads,
                    h.kv_heads,
                    h.head_dim / n,
                    tokens_per_cube,
                    dtype.into(),
                )
            };
            [want_q.then_some(dq), want_kv.then(|| cast(dkv, kv_dtype))]
        }
    }
}
