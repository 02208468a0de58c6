//! LSAGT's local attention core: each token's query against the keys of its own T shifted
//! variants, softmax over T, weighted sum of their values.
//!
//! Reference path: reshapes, `T`-long batched matmuls and a softmax, with the keys and values split
//! out of the `wkv` output. The fused path reads `wkv`'s output as it is: one thread per
//! (token, query head) in the forward, one per (token, key/value head) in the backward, which
//! writes the gradient of the whole `wkv` output (keys and values) in one pass.

use super::softmax::softmax_scaled;
use burn::prelude::*;

/// The attention geometry: `heads` query heads of `head_dim`, `kv_heads` key/value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalHeads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `B×N×D` queries (`D = heads·head_dim`); `kv`: `T×B×N×2·kv_heads·head_dim`, the keys of
/// every variant then their values. Returns the attended `B×N×D`, heads concatenated.
pub fn local_attention<B: Backend>(q: Tensor<B, 3>, kv: Tensor<B, 4>, heads: LocalHeads) -> Tensor<B, 3> {
    if super::enabled("local_attention") {
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
    use crate::kernels::cube::{FusedOp, cast, dense, empty, launch_dims};

    /// Thread (token, query head): scores over the T variants, softmax, weighted values.
    #[cube(launch_unchecked)]
    fn forward_kernel<E: Float>(
        q: &Tensor<E>,
        kv: &Tensor<E>,
        out: &mut Tensor<E>,
        tokens: usize,
        #[comptime] t: usize,
        #[comptime] heads: usize,
        #[comptime] kv_heads: usize,
        #[comptime] dh: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= tokens * heads {
            terminate!();
        }
        let head = pos % heads;
        let token = pos / heads;
        let kh = head / (heads / kv_heads);
        let row = 2 * kv_heads * dh;
        let q_at = token * heads * dh + head * dh;
        let scale = f32::new(comptime!((dh as f32).powf(-0.5)));
        let mut p = Array::<f32>::new(t);
        let mut max = f32::new(-1.0e30);
        #[unroll]
        for ti in 0..t {
            let k_at = (ti * tokens + token) * row + kh * dh;
            let mut s = f32::new(0.0);
            for e in 0..dh {
                s += f32::cast_from(q[q_at + e]) * f32::cast_from(kv[k_at + e]);
            }
            s *= scale;
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
        for e in 0..dh {
            let mut acc = f32::new(0.0);
            #[unroll]
            for ti in 0..t {
                let v_at = (ti * tokens + token) * row + (kv_heads + kh) * dh;
                acc += p[ti] * f32::cast_from(kv[v_at + e]);
            }
            out[q_at + e] = E::cast_from(acc * inv);
        }
    }

    /// Thread (token, key/value head): recomputes the softmax of its `g` query heads, writes their
    /// query gradients, then the gradient of its keys and values in every variant.
    #[cube(launch_unchecked)]
    fn backward_kernel<E: Float>(
        q: &Tensor<E>,
        kv: &Tensor<E>,
        grad: &Tensor<E>,
        dq: &mut Tensor<E>,
        dkv: &mut Tensor<E>,
        tokens: usize,
        #[comptime] t: usize,
        #[comptime] heads: usize,
        #[comptime] kv_heads: usize,
        #[comptime] dh: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= tokens * kv_heads {
            terminate!();
        }
        let kh = pos % kv_heads;
        let token = pos / kv_heads;
        let g = comptime!(heads / kv_heads);
        let row = 2 * kv_heads * dh;
        let q0 = token * heads * dh + kh * g * dh;
        let scale = f32::new(comptime!((dh as f32).powf(-0.5)));
        // Softmax weights P and score gradients dS = P·(dP − Σ P·dP), per (query head, variant).
        let mut p = Array::<f32>::new(comptime!(g * t));
        let mut ds = Array::<f32>::new(comptime!(g * t));
        #[unroll]
        for gi in 0..g {
            let q_at = q0 + gi * dh;
            let mut max = f32::new(-1.0e30);
            #[unroll]
            for ti in 0..t {
                let k_at = (ti * tokens + token) * row + kh * dh;
                let mut s = f32::new(0.0);
                for e in 0..dh {
                    s += f32::cast_from(q[q_at + e]) * f32::cast_from(kv[k_at + e]);
                }
                s *= scale;
                p[gi * t + ti] = s;
                max = select(s > max, s, max);
            }
            let mut sum = f32::new(0.0);
            #[unroll]
            for ti in 0..t {
                let w = f32::exp(p[gi * t + ti] - max);
                p[gi * t + ti] = w;
                sum += w;
            }
            let inv = f32::new(1.0) / sum;
            let mut dot = f32::new(0.0);
            #[unroll]
            for ti in 0..t {
                p[gi * t + ti] *= inv;
                let v_at = (ti * tokens + token) * row + (kv_heads + kh) * dh;
                let mut s = f32::new(0.0);
                for e in 0..dh {
                    s += f32::cast_from(grad[q_at + e]) * f32::cast_from(kv[v_at + e]);
                }
                ds[gi * t + ti] = s;
                dot += p[gi * t + ti] * s;
            }
            #[unroll]
            for ti in 0..t {
                ds[gi * t + ti] = p[gi * t + ti] * (ds[gi * t + ti] - dot) * scale;
            }
            for e in 0..dh {
                let mut acc = f32::new(0.0);
                #[unroll]
                for ti in 0..t {
                    let k_at = (ti * tokens + token) * row + kh * dh;
                    acc += ds[gi * t + ti] * f32::cast_from(kv[k_at + e]);
                }
                dq[q_at + e] = E::cast_from(acc);
            }
        }
        // dK_t = Σ_heads dS_t · q, dV_t = Σ_heads P_t · grad.
        #[unroll]
        for ti in 0..t {
            let k_at = (ti * tokens + token) * row + kh * dh;
            let v_at = k_at + kv_heads * dh;
            for e in 0..dh {
                let mut dk = f32::new(0.0);
                let mut dv = f32::new(0.0);
                #[unroll]
                for gi in 0..g {
                    dk += ds[gi * t + ti] * f32::cast_from(q[q0 + gi * dh + e]);
                    dv += p[gi * t + ti] * f32::cast_from(grad[q0 + gi * dh + e]);
                }
                dkv[k_at + e] = E::cast_from(dk);
                dkv[v_at + e] = E::cast_from(dv);
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
            unsafe {
                forward_kernel::launch_unchecked(
                    &q.client,
                    count,
                    dim,
                    q.clone().into_tensor_arg(),
                    kv.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    tokens,
                    t,
                    h.heads,
                    h.kv_heads,
                    h.head_dim,
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
            let (count, dim) = launch_dims(&q.client, tokens * h.kv_heads);
            unsafe {
                backward_kernel::launch_unchecked(
                    &q.client,
                    count,
                    dim,
                    q.clone().into_tensor_arg(),
                    kv.into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dq.clone().into_tensor_arg(),
                    dkv.clone().into_tensor_arg(),
                    tokens,
                    t,
                    h.heads,
                    h.kv_heads,
                    h.head_dim,
                    dtype.into(),
                )
            };
            [want_q.then_some(dq), want_kv.then(|| cast(dkv, kv_dtype))]
        }
    }
}
