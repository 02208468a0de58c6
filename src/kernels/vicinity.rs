//! The linear vicinity-attention core as one fused op, forward and backward:
//! `out_i = C(C(Σ_e φ_e(i)·q_i·KV_e) · C(1/(Σ_e φ_e(i)·q_i·S_e + ε)))` with
//! `KV_e = C(Σ_j ψ_e(j)·k_j·v_jᵀ)` and `S_e = Σ_j ψ_e(j)·k_j`, where φ/ψ are given position
//! features of queries/keys and `C` the optional magnitude clamp. Nothing N×N. The plain
//! tensor-op form it replaces, and what the features are, live in [`crate::attention::vicinity`].
//!
//! Every reduction is a batched matrix product (cuBLAS on the CUDA build): `[KV, S] = k'ᵀ·[v, 1]`
//! and `[num, den] = q'·[C(KV), S]` forward, four more products backward, with one small kernel
//! for each re-weighting, clamp and normaliser step. The backward recomputes the re-weighted
//! copies instead of keeping them, which holds training memory below the plain path's.

use burn::prelude::*;

/// Added to the normaliser's denominator (as in the released code).
pub const EPS: f64 = 1e-4;

/// What the fused core needs besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreShape {
    pub heads: usize,
    /// Apply the magnitude clamps.
    pub clamp: bool,
}

/// The fused core, or the inputs back when this backend has no kernels. `q`: `B×N×(h·d)`, `k`,
/// `v`: `B×M×(h·d)`, `phi`: `N×E` and `psi`: `M×E` position features (f32). Returns
/// `B×N×(h·d)`, heads concatenated.
#[allow(clippy::type_complexity)]
pub fn fused<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    phi: Tensor<B, 2>,
    psi: Tensor<B, 2>,
    shape: CoreShape,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    let ([b, n, c], [_, m, _]) = (q.dims(), k.dims());
    assert!(
        k.dims() == [b, m, c] && v.dims() == k.dims() && phi.dims()[0] == n && psi.dims()[0] == m,
        "vicinity core: q {:?}, k {:?}, v {:?}, features {:?} / {:?} do not fit",
        q.dims(),
        k.dims(),
        v.dims(),
        phi.dims(),
        psi.dims()
    );
    assert!(
        c.is_multiple_of(shape.heads) && phi.dims()[1] == psi.dims()[1],
        "vicinity core: {c} channels for {} heads, features {:?} / {:?}",
        shape.heads,
        phi.dims(),
        psi.dims()
    );
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        if !super::available::<B>() {
            return Err((q, k, v));
        }
        let op = cube::Core {
            heads: shape.heads,
            ex: phi.dims()[1],
            clamp: shape.clamp,
        };
        let inputs = [
            primitive(q),
            primitive(k),
            primitive(v),
            primitive(phi),
            primitive(psi),
        ];
        match super::cube::run::<B, _, 5>(&op, inputs) {
            Ok(y) => Ok(tensor(y)),
            Err([q, k, v, _, _]) => Err((tensor(q), tensor(k), tensor(v))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = (phi, psi);
        Err((q, k, v))
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::EPS;
    use crate::kernels::cube::{FusedOp, TensorOps, cast, dense, empty, launch_dims};
    use crate::kernels::rows::{LANES, ROWS, row_launch, row_sum};

    /// `sign(t)·min(max(|t|, 1e-4), 1e4)` when `on`.
    #[cube]
    fn clamp_mag(t: f32, #[comptime] on: bool) -> f32 {
        if on {
            let m = f32::min(f32::max(f32::abs(t), f32::new(1e-4)), f32::new(1e4));
            select(t > f32::new(0.0), m, select(t < f32::new(0.0), -m, f32::new(0.0)))
        } else {
            t
        }
    }

    /// Derivative of [`clamp_mag`]: 1 inside the band, 0 where it clamps.
    #[cube]
    fn clamp_slope(t: f32, #[comptime] on: bool) -> f32 {
        if on {
            let a = f32::abs(t);
            select(
                a > f32::new(1e-4) && a < f32::new(1e4),
                f32::new(1.0),
                f32::new(0.0),
            )
        } else {
            f32::new(1.0)
        }
    }

    /// Rows of `width` per (batch, head, token) from `x: B×L×(heads·d)`: column `e·d + p`
    /// (`e < ex`) is `x[b, l, h·d + p]`, times `pos[l, e]` when `weighted`; column `ex·d` is 1
    /// when `ones` (the column that turns `k'ᵀ·[v, 1]` into `[KV, S]`); the rest are 0.
    #[cube(launch_unchecked)]
    fn expand_kernel<E: Float>(
        x: &Tensor<E>,
        pos: &Tensor<f32>,
        out: &mut Tensor<E>,
        #[comptime] len: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] width: usize,
        #[comptime] weighted: bool,
        #[comptime] ones: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let col = at % width;
        let row = at / width;
        let l = row % len;
        let h = (row / len) % heads;
        let b = row / (len * heads);
        let mut v = f32::new(0.0);
        if col < comptime!(ex * d) {
            v = f32::cast_from(x[(b * len + l) * comptime!(heads * d) + h * d + col % d]);
            if weighted {
                v *= pos[l * ex + col / d];
            }
        }
        if ones && col == comptime!(ex * d) {
            v = f32::new(1.0);
        }
        out[at] = E::cast_from(v);
    }

    /// The transpose of [`expand_kernel`]: `out[b, l, h·d + p] = Σ_e pos[l, e]·xe[b, h, l, e·d + p]`
    /// (without `weighted`, the plain sum), rows of `xe` being `width` long.
    #[cube(launch_unchecked)]
    fn contract_kernel<E: Float>(
        xe: &Tensor<E>,
        pos: &Tensor<f32>,
        out: &mut Tensor<E>,
        #[comptime] len: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] width: usize,
        #[comptime] weighted: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let p = at % d;
        let h = (at / d) % heads;
        let row = at / comptime!(heads * d);
        let l = row % len;
        let b = row / len;
        let base = ((b * heads + h) * len + l) * width + p;
        let mut s = f32::new(0.0);
        #[unroll]
        for e in 0..ex {
            let t = f32::cast_from(xe[base + e * d]);
            if weighted {
                s += pos[l * ex + e] * t;
            } else {
                s += t;
            }
        }
        out[at] = E::cast_from(s);
    }

    /// Over `[KV_pre, S]` (rows of `width`): forward, `C(KV_pre)` beside `S`; backward, the
    /// gradient through that clamp (`∂L/∂KV · C'(KV_pre)` beside `∂L/∂S`).
    #[cube(launch_unchecked)]
    fn clamp_kv_kernel<E: Float>(
        acc: &Tensor<E>,
        grad: &Tensor<E>,
        out: &mut Tensor<E>,
        #[comptime] d: usize,
        #[comptime] width: usize,
        #[comptime] backward: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let kv = at % width < d;
        let a = f32::cast_from(acc[at]);
        if backward {
            let g = f32::cast_from(grad[at]);
            out[at] = E::cast_from(select(kv, g * clamp_slope(a, true), g));
        } else {
            out[at] = E::cast_from(select(kv, clamp_mag(a, true), a));
        }
    }

    /// `out[b, i, h·d + c] = C(C(num)·C(1/(den + ε)))` from the rows `nd[b, h, i] = [num, den, 0…]`.
    #[cube(launch_unchecked)]
    fn output_kernel<E: Float>(
        nd: &Tensor<E>,
        out: &mut Tensor<E>,
        #[comptime] n: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] width: usize,
        #[comptime] clamp: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let c = at % d;
        let h = (at / d) % heads;
        let row = at / comptime!(heads * d);
        let i = row % n;
        let b = row / n;
        let base = ((b * heads + h) * n + i) * width;
        let den = f32::cast_from(nd[base + d]);
        let z = clamp_mag(f32::new(1.0) / (den + f32::new(comptime!(EPS as f32))), clamp);
        let num = clamp_mag(f32::cast_from(nd[base + c]), clamp);
        out[at] = E::cast_from(clamp_mag(num * z, clamp));
    }

    /// One query row (batch, head, query) per [`LANES`] threads, a thread per column: from `nd`
    /// (as in [`output_kernel`]) and the output gradient, the row
    /// `dn = [∂L/∂num, ∂L/∂den, 0…]` (a thread per row wrote `width`-strided rows, several times
    /// slower).
    #[cube(launch_unchecked)]
    fn dn_kernel<E: Float>(
        nd: &Tensor<E>,
        grad: &Tensor<E>,
        dn: &mut Tensor<E>,
        rows: usize,
        #[comptime] n: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] width: usize,
        #[comptime] clamp: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let lane = UNIT_POS_X as usize;
        let slot = UNIT_POS_Y as usize;
        let row = CUBE_POS * comptime!(ROWS) + slot;
        let live = row < rows;
        let mut sums = SharedMemory::<f32>::new(comptime!(LANES * ROWS));
        let i = row % n;
        let h = (row / n) % heads;
        let b = row / comptime!(n * heads);
        let base = row * width;
        let g_at = (b * n + i) * comptime!(heads * d) + h * d;
        let mut z_pre = f32::new(1.0);
        if live {
            z_pre = f32::new(1.0) / (f32::cast_from(nd[base + d]) + f32::new(comptime!(EPS as f32)));
        }
        let z = clamp_mag(z_pre, clamp);
        let mut dz = f32::new(0.0);
        #[unroll]
        for k in 0..comptime!(width.div_ceil(LANES)) {
            let c = lane + k * comptime!(LANES);
            if live && c < d {
                let num_pre = f32::cast_from(nd[base + c]);
                let num = clamp_mag(num_pre, clamp);
                let g = f32::cast_from(grad[g_at + c]) * clamp_slope(num * z, clamp);
                dn[base + c] = E::cast_from(g * z * clamp_slope(num_pre, clamp));
                dz += g * num;
            } else if live && c > d && c < width {
                dn[base + c] = E::cast_from(f32::new(0.0));
            }
        }
        let dz = row_sum(&mut sums, dz, lane, slot);
        // Column d (the denominator's) belongs to lane d mod 32.
        if live && lane == comptime!(d % LANES) {
            dn[base + d] = E::cast_from(-dz * clamp_slope(z_pre, clamp) * z_pre * z_pre);
        }
    }

    #[derive(Clone, Debug)]
    pub struct Core {
        pub heads: usize,
        /// Position features per token (E).
        pub ex: usize,
        pub clamp: bool,
    }

    /// The operands of one core, dense and in the compute dtype.
    struct Operands<R: CubeRuntime> {
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        phi: CubeTensor<R>,
        psi: CubeTensor<R>,
        /// `(batch, queries, keys, heads, head width)`
        dims: (usize, usize, usize, usize, usize),
    }

    /// The saved intermediates of the forward pass, recomputed by the backward.
    struct Forward<R: CubeRuntime> {
        /// `q' = φ ⊗ q`, `B×h×N×(ex·d)`.
        qe: CubeTensor<R>,
        /// `k' = ψ ⊗ k`, `B×h×M×(ex·d)`.
        ke: CubeTensor<R>,
        /// `[v, 1, 0…]`, `B×h×M×width`.
        v1: CubeTensor<R>,
        /// `k'ᵀ·[v, 1]` = `[KV_pre, S]`, `B×h×(ex·d)×width`.
        acc: CubeTensor<R>,
        /// `[C(KV_pre), S]`.
        acc_c: CubeTensor<R>,
        /// `q'·acc_c` = `[num_pre, den]`, `B×h×N×width`.
        nd: CubeTensor<R>,
    }

    fn matmul<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
        TensorOps::<R>::float_matmul(lhs, rhs)
    }

    /// The last two dims swapped (a view; the products take it without a copy).
    fn t<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
        TensorOps::<R>::float_swap_dims(x, 2, 3)
    }

    impl Core {
        fn ex(&self) -> usize {
            self.ex
        }

        /// Row width of `[v, 1]`, `[num, den]` and their gradients: `d + 1` rounded up to 8
        /// (aligned rows for the tensor cores; the padding stays zero).
        fn width(d: usize) -> usize {
            (d + 1).next_multiple_of(8)
        }

        fn operands<R: CubeRuntime>(&self, [q, k, v, phi, psi]: [CubeTensor<R>; 5]) -> Operands<R> {
            let q = into_contiguous(q);
            let dtype = q.dtype;
            let (k, v) = (dense(k, dtype), dense(v, dtype));
            let (phi, psi) = (dense(phi, DType::F32), dense(psi, DType::F32));
            let (b, n, c) = (q.meta.shape()[0], q.meta.shape()[1], q.meta.shape()[2]);
            let dims = (b, n, k.meta.shape()[1], self.heads, c / self.heads);
            Operands {
                q,
                k,
                v,
                phi,
                psi,
                dims,
            }
        }

        /// `x: B×L×(h·d)` → `B×h×L×width` rows (see [`expand_kernel`]).
        fn expand<R: CubeRuntime>(
            &self,
            x: &CubeTensor<R>,
            pos: &CubeTensor<R>,
            ex: usize,
            width: usize,
            (weighted, ones): (bool, bool),
        ) -> CubeTensor<R> {
            let s = x.meta.shape();
            let (b, len, heads) = (s[0], s[1], self.heads);
            let d = s[2] / heads;
            let out = empty(x, [b, heads, len, width], x.dtype);
            let (count, dim) = launch_dims(&x.client, b * heads * len * width);
            unsafe {
                expand_kernel::launch_unchecked(
                    &x.client,
                    count,
                    dim,
                    x.clone().into_tensor_arg(),
                    pos.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    len,
                    heads,
                    d,
                    ex,
                    width,
                    weighted,
                    ones,
                    x.dtype.into(),
                )
            };
            out
        }

        /// `B×h×L×width` rows → `B×L×(h·d)` (see [`contract_kernel`]).
        fn contract<R: CubeRuntime>(
            &self,
            xe: CubeTensor<R>,
            pos: &CubeTensor<R>,
            (d, ex): (usize, usize),
            weighted: bool,
        ) -> CubeTensor<R> {
            let s = xe.meta.shape();
            let (b, heads, len, width) = (s[0], s[1], s[2], s[3]);
            let out = empty(&xe, [b, len, heads * d], xe.dtype);
            let (count, dim) = launch_dims(&xe.client, b * len * heads * d);
            let dtype = xe.dtype;
            unsafe {
                contract_kernel::launch_unchecked(
                    &xe.client,
                    count,
                    dim,
                    xe.clone().into_tensor_arg(),
                    pos.clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    len,
                    heads,
                    d,
                    ex,
                    width,
                    weighted,
                    dtype.into(),
                )
            };
            out
        }

        /// [`clamp_kv_kernel`]: `grad` `None` for the forward clamp, `Some` for its gradient.
        fn clamp_kv<R: CubeRuntime>(
            acc: &CubeTensor<R>,
            grad: Option<&CubeTensor<R>>,
            d: usize,
        ) -> CubeTensor<R> {
            let width = acc.meta.shape()[3];
            let out = empty(acc, acc.meta.shape().clone(), acc.dtype);
            let (count, dim) = launch_dims(&acc.client, acc.meta.shape().num_elements());
            unsafe {
                clamp_kv_kernel::launch_unchecked(
                    &acc.client,
                    count,
                    dim,
                    acc.clone().into_tensor_arg(),
                    grad.unwrap_or(acc).clone().into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    d,
                    width,
                    grad.is_some(),
                    acc.dtype.into(),
                )
            };
            out
        }

        fn run_forward<R: CubeRuntime>(&self, o: &Operands<R>) -> Forward<R> {
            let (_, _, _, _, d) = o.dims;
            let (ex, width) = (self.ex(), Self::width(d));
            let qe = self.expand(&o.q, &o.phi, ex, ex * d, (true, false));
            let ke = self.expand(&o.k, &o.psi, ex, ex * d, (true, false));
            let v1 = self.expand(&o.v, &o.psi, 1, width, (false, true));
            let acc = matmul(t(ke.clone()), v1.clone());
            let acc_c = if self.clamp {
                Self::clamp_kv(&acc, None, d)
            } else {
                acc.clone()
            };
            let nd = matmul(qe.clone(), acc_c.clone());
            Forward {
                qe,
                ke,
                v1,
                acc,
                acc_c,
                nd,
            }
        }
    }

    impl FusedOp<5> for Core {
        fn output_shape(&self, inputs: &[Shape; 5]) -> Shape {
            inputs[0].clone()
        }

        fn forward<R: CubeRuntime>(&self, inputs: [CubeTensor<R>; 5]) -> CubeTensor<R> {
            let o = self.operands(inputs);
            let (b, n, _, heads, d) = o.dims;
            let nd = self.run_forward(&o).nd;
            let out = empty(&o.q, o.q.meta.shape().clone(), o.q.dtype);
            let (count, dim) = launch_dims(&o.q.client, b * n * heads * d);
            unsafe {
                output_kernel::launch_unchecked(
                    &o.q.client,
                    count,
                    dim,
                    nd.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    n,
                    heads,
                    d,
                    Self::width(d),
                    self.clamp,
                    o.q.dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            inputs: [CubeTensor<R>; 5],
            grad: CubeTensor<R>,
            wanted: [bool; 5],
        ) -> [Option<CubeTensor<R>>; 5] {
            let dtypes = [inputs[0].dtype, inputs[1].dtype, inputs[2].dtype];
            let o = self.operands(inputs);
            let grad = dense(grad, o.q.dtype);
            let (b, n, _, heads, d) = o.dims;
            let (ex, width) = (self.ex(), Self::width(d));
            let f = self.run_forward(&o);

            // dn = [∂L/∂num_pre, ∂L/∂den] per query.
            let dn = empty(&f.nd, f.nd.meta.shape().clone(), o.q.dtype);
            let (count, dim) = row_launch(b * heads * n);
            unsafe {
                dn_kernel::launch_unchecked(
                    &o.q.client,
                    count,
                    dim,
                    f.nd.into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dn.clone().into_tensor_arg(),
                    b * heads * n,
                    n,
                    heads,
                    d,
                    width,
                    self.clamp,
                    o.q.dtype.into(),
                )
            };
            // [num_pre, den] = q'·acc_c: ∂L/∂acc_c = q'ᵀ·dn and ∂L/∂q' = dn·acc_cᵀ.
            let dacc = matmul(t(f.qe), dn.clone());
            let dq = wanted[0].then(|| {
                let dqe = matmul(dn, t(f.acc_c));
                self.contract(dqe, &o.phi, (d, ex), true)
            });
            let dacc = if self.clamp {
                Self::clamp_kv(&f.acc, Some(&dacc), d)
            } else {
                dacc
            };
            // acc = k'ᵀ·[v, 1]: ∂L/∂k' = [v, 1]·∂L/∂accᵀ and ∂L/∂[v, 1] = k'·∂L/∂acc.
            let dk = wanted[1].then(|| {
                let dke = matmul(f.v1, t(dacc.clone()));
                self.contract(dke, &o.psi, (d, ex), true)
            });
            let dv = wanted[2].then(|| {
                let dv1 = matmul(f.ke, dacc);
                self.contract(dv1, &o.psi, (d, 1), false)
            });
            [
                dq.map(|g| cast(g, dtypes[0])),
                dk.map(|g| cast(g, dtypes[1])),
                dv.map(|g| cast(g, dtypes[2])),
                None,
                None,
            ]
        }
    }
}
