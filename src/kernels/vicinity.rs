//! The vicinity attention core (VVT): `out_i = C(C(Σ_e φ_e(i)·q_i·KV_e) · C(1/(Σ_e φ_e(i)·q_i·S_e + ε)))`
//! with `KV_e = C(Σ_j ψ_e(j)·k_j·v_jᵀ)` and `S_e = Σ_j ψ_e(j)·k_j`, where φ/ψ are the position
//! features of queries/keys (`cos a, sin a, cos b, sin b` for the 2D locality) and `C` the released
//! code's magnitude clamp. Nothing N×N.
//!
//! Reference path: heads split out, features re-weighted into 4 copies, two matmuls, a sum and the
//! clamps as tensor ops ([`crate::attention::vicinity`]). Fused path: one pass over the keys for `KV`
//! and `S` (kept in f32), one over the queries; the backward recomputes `KV`/`S`, then one pass over
//! the queries (their gradient and the gradient of `KV`/`S` per query), one reduction over the
//! queries and one pass over the keys. The re-weighted copies are never written.

use burn::prelude::*;

use crate::attention::vicinity::{Locality, clamp_magnitude, reweight};

/// Added to the normaliser's denominator (as in the released code).
pub const EPS: f64 = 1e-4;

/// Shapes and switches of one vicinity attention core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VicinityCore {
    pub heads: usize,
    /// Query grid `(rows, cols)`; the keys' grid may be smaller (spatial reduction).
    pub q_grid: (usize, usize),
    pub k_grid: (usize, usize),
    pub locality: Locality,
    pub clamp: bool,
}

/// `q`: `B×N×(h·d)` (after ReLU), `k`, `v`: `B×M×(h·d)` (`k` after ReLU). Returns `B×N×(h·d)`,
/// heads concatenated.
pub fn vicinity_core<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    cfg: VicinityCore,
) -> Tensor<B, 3> {
    // In training at every grid size: on the H100 it made vvt_tiny 15–17 % faster at 32² (where the
    // reference's many small kernels dominate) and 4–8 % slower at 224² (where its products run on
    // the tensor cores, the kernels in f32 on the CUDA cores), but it keeps no 4× re-weighted
    // copies, which is what holds training memory below the authors' code up to 768²
    // (docs/GPU_RESULTS.md, session 5).
    if super::use_fused::<B>("vicinity", &q.device()) {
        match fused(q, k, v, cfg) {
            Ok(y) => return y,
            Err((q, k, v)) => return vicinity_core_reference(q, k, v, cfg),
        }
    }
    vicinity_core_reference(q, k, v, cfg)
}

fn check<B: Backend>(q: &Tensor<B, 3>, k: &Tensor<B, 3>, v: &Tensor<B, 3>, cfg: &VicinityCore) {
    let [b, n, c] = q.dims();
    assert!(
        n == cfg.q_grid.0 * cfg.q_grid.1
            && k.dims() == [b, cfg.k_grid.0 * cfg.k_grid.1, c]
            && k.dims() == v.dims(),
        "vicinity core: q {:?}, k {:?}, v {:?} do not fit grids {:?} / {:?}",
        q.dims(),
        k.dims(),
        v.dims(),
        cfg.q_grid,
        cfg.k_grid
    );
    assert!(
        c.is_multiple_of(cfg.heads),
        "vicinity core: {c} channels for {} heads",
        cfg.heads
    );
}

/// The fused kernels, or the inputs back when this backend has none.
#[allow(clippy::type_complexity)]
pub fn fused<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    cfg: VicinityCore,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    check(&q, &k, &v, &cfg);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        if !super::available::<B>() {
            return Err((q, k, v));
        }
        let device = q.device();
        use crate::attention::vicinity::position_features;
        let phi = position_features::<B>(cfg.locality, cfg.q_grid, &device);
        let psi = position_features::<B>(cfg.locality, cfg.k_grid, &device);
        let inputs = [
            primitive(q),
            primitive(k),
            primitive(v),
            primitive(phi),
            primitive(psi),
        ];
        match super::cube::run::<B, _, 5>(&cube::Core(cfg), inputs) {
            Ok(y) => Ok(tensor(y)),
            Err([q, k, v, _, _]) => Err((tensor(q), tensor(k), tensor(v))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    Err((q, k, v))
}

/// Tensor ops: per-head re-weighted features, `k'ᵀv`, the normaliser and the clamps.
pub fn vicinity_core_reference<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    cfg: VicinityCore,
) -> Tensor<B, 3> {
    check(&q, &k, &v, &cfg);
    let [batch, n, c] = q.dims();
    let heads = cfg.heads;
    let split = |t: Tensor<B, 3>| {
        let [b, len, inner] = t.dims();
        t.reshape([b, len, heads, inner / heads]).swap_dims(1, 2)
    };
    let clamp = |t: Tensor<B, 4>| if cfg.clamp { clamp_magnitude(t) } else { t };
    let qr = reweight(split(q), cfg.locality, cfg.q_grid.0, cfg.q_grid.1);
    let kr = reweight(split(k), cfg.locality, cfg.k_grid.0, cfg.k_grid.1);
    let kv = clamp(kr.clone().swap_dims(2, 3).matmul(split(v)));
    // q'·Σk' as a broadcast product and a sum rather than a matrix-vector matmul (n = 1), a shape
    // CubeCL's untuned matmul handles poorly; it fuses instead.
    let k_sum = kr.sum_dim(2);
    let z = clamp((qr.clone() * k_sum).sum_dim(3).add_scalar(EPS).recip());
    let num = clamp(qr.matmul(kv));
    clamp(num * z).swap_dims(1, 2).reshape([batch, n, c])
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::{EPS, VicinityCore};
    use crate::kernels::cube::{FusedOp, cast, dense, empty, launch_dims};

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

    /// `acc[b, h, e, p, c] = Σ_j pos[j, e]·feat[b, j, h·d + p]·val[b, j, h·vw + c]` in f32, for
    /// `c < d + 1`; columns `c ≥ vw` read as 1 (so with `vw = d` the last one is `S`).
    ///
    /// One cube per (batch·head, chunk of keys); each unit owns one `p`, a slice of `cw` columns and
    /// every `e`, so a key's `feat` value and `val` row, staged in shared memory `tile` keys at a
    /// time, feed `ex·cw` accumulators. With several chunks, `acc` holds one partial sum per chunk
    /// (`[chunks, b, h, ex, d, d + 1]`), added up by [`sum_chunks_kernel`].
    #[cube(launch_unchecked)]
    fn reduce_kernel<E: Float>(
        feat: &Tensor<E>,
        val: &Tensor<E>,
        pos: &Tensor<f32>,
        acc: &mut Tensor<f32>,
        len: usize,
        chunk_len: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] vw: usize,
        #[comptime] cw: usize,
        #[comptime] slices: usize,
        #[comptime] tile: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let bh = CUBE_POS_X as usize;
        let chunk = CUBE_POS_Y as usize;
        let h = bh % heads;
        let b = bh / heads;
        let unit = UNIT_POS_X as usize;
        let units = comptime!(d * slices);
        let width = comptime!(cw * slices);
        let p = unit % d;
        let c0 = (unit / d) * cw;
        let mut fs = SharedMemory::<f32>::new(comptime!(tile * d));
        let mut vs = SharedMemory::<f32>::new(comptime!(tile * cw * slices));
        let mut ps = SharedMemory::<f32>::new(comptime!(tile * ex));
        let mut sums = Array::<f32>::new(comptime!(ex * cw));
        #[unroll]
        for i in 0..comptime!(ex * cw) {
            sums[i] = f32::new(0.0);
        }
        let start = chunk * chunk_len;
        let mut end = start + chunk_len;
        if end > len {
            end = len;
        }
        let mut j0 = start;
        while j0 < end {
            // Stage `tile` keys; rows past the chunk's end are zeros and add nothing.
            let mut at = unit;
            while at < comptime!(tile * d) {
                let j = j0 + at / d;
                let mut x = f32::new(0.0);
                if j < end {
                    x = f32::cast_from(feat[(b * len + j) * heads * d + h * d + at % d]);
                }
                fs[at] = x;
                at += units;
            }
            at = unit;
            while at < comptime!(tile * cw * slices) {
                let j = j0 + at / width;
                let c = at % width;
                let mut x = f32::new(0.0);
                if j < end {
                    x = f32::new(1.0);
                    if c < vw {
                        x = f32::cast_from(val[(b * len + j) * heads * vw + h * vw + c]);
                    }
                }
                vs[at] = x;
                at += units;
            }
            at = unit;
            while at < comptime!(tile * ex) {
                let j = j0 + at / ex;
                let mut x = f32::new(0.0);
                if j < end {
                    x = pos[j * ex + at % ex];
                }
                ps[at] = x;
                at += units;
            }
            sync_cube();
            // Only the keys of this tile that exist (a 1×1 grid stages one key, not `tile`).
            let mut valid = end - j0;
            if valid > tile {
                valid = tile;
            }
            for jj in 0..valid {
                let f = fs[jj * d + p];
                #[unroll]
                for e in 0..ex {
                    let fe = f * ps[jj * ex + e];
                    #[unroll]
                    for c in 0..cw {
                        sums[e * cw + c] += fe * vs[jj * width + c0 + c];
                    }
                }
            }
            sync_cube();
            j0 += tile;
        }
        let base = (chunk * CUBE_COUNT_X as usize + bh) * comptime!(ex * d * (d + 1));
        #[unroll]
        for e in 0..ex {
            #[unroll]
            for c in 0..cw {
                if c0 + c < d + 1 {
                    acc[base + (e * d + p) * (d + 1) + c0 + c] = sums[e * cw + c];
                }
            }
        }
    }

    /// `acc[t] = Σ_chunk part[chunk, t]`.
    #[cube(launch_unchecked)]
    fn sum_chunks_kernel(part: &Tensor<f32>, acc: &mut Tensor<f32>, chunks: usize) {
        let at = ABSOLUTE_POS;
        if at >= acc.len() {
            terminate!();
        }
        let mut sum = f32::new(0.0);
        for chunk in 0..chunks {
            sum += part[chunk * acc.len() + at];
        }
        acc[at] = sum;
    }

    /// One output value (query `i`, head `h`, channel `c`) per thread.
    #[cube(launch_unchecked)]
    fn query_kernel<E: Float>(
        q: &Tensor<E>,
        acc: &Tensor<f32>,
        phi: &Tensor<f32>,
        out: &mut Tensor<E>,
        n: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] clamp: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let c = at % d;
        let h = (at / d) % heads;
        let row = at / (d * heads);
        let i = row % n;
        let b = row / n;
        let q_at = row * heads * d + h * d;
        let acc_at = (b * heads + h) * ex * d * (d + 1);
        let mut den = f32::new(0.0);
        let mut num = f32::new(0.0);
        #[unroll]
        for e in 0..ex {
            let w = phi[i * ex + e];
            let mut s_dot = f32::new(0.0);
            let mut kv_dot = f32::new(0.0);
            for p in 0..d {
                let qp = f32::cast_from(q[q_at + p]);
                let base = acc_at + (e * d + p) * (d + 1);
                s_dot += qp * acc[base + d];
                kv_dot += qp * clamp_mag(acc[base + c], clamp);
            }
            den += w * s_dot;
            num += w * kv_dot;
        }
        let z = clamp_mag(f32::new(1.0) / (den + f32::new(comptime!(EPS as f32))), clamp);
        out[at] = E::cast_from(clamp_mag(clamp_mag(num, clamp) * z, clamp));
    }

    /// One query row (query `i`, head `h`) per thread: recomputes the row's output, then writes its
    /// query gradient and `dn[b, i, h, :] = (∂L/∂num_pre, ∂L/∂den)` for the reduction over queries.
    #[cube(launch_unchecked)]
    fn query_backward_kernel<E: Float>(
        q: &Tensor<E>,
        acc: &Tensor<f32>,
        phi: &Tensor<f32>,
        grad: &Tensor<E>,
        dq: &mut Tensor<E>,
        dn: &mut Tensor<E>,
        n: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] clamp: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at * d >= dq.len() {
            terminate!();
        }
        let h = at % heads;
        let row = at / heads;
        let i = row % n;
        let b = row / n;
        let q_at = row * heads * d + h * d;
        let acc_at = (b * heads + h) * ex * d * (d + 1);
        let mut den = f32::new(0.0);
        #[unroll]
        for e in 0..ex {
            let w = phi[i * ex + e];
            for p in 0..d {
                den += w * f32::cast_from(q[q_at + p]) * acc[acc_at + (e * d + p) * (d + 1) + d];
            }
        }
        let z_pre = f32::new(1.0) / (den + f32::new(comptime!(EPS as f32)));
        let z = clamp_mag(z_pre, clamp);
        let mut dnum = Array::<f32>::new(d);
        let mut dz = f32::new(0.0);
        for c in 0..d {
            let mut num_pre = f32::new(0.0);
            #[unroll]
            for e in 0..ex {
                let w = phi[i * ex + e];
                let mut s = f32::new(0.0);
                for p in 0..d {
                    s += f32::cast_from(q[q_at + p])
                        * clamp_mag(acc[acc_at + (e * d + p) * (d + 1) + c], clamp);
                }
                num_pre += w * s;
            }
            let num = clamp_mag(num_pre, clamp);
            let g = f32::cast_from(grad[q_at + c]) * clamp_slope(num * z, clamp);
            dnum[c] = g * z * clamp_slope(num_pre, clamp);
            dz += g * num;
        }
        let dden = -dz * clamp_slope(z_pre, clamp) * z_pre * z_pre;
        let dn_at = (row * heads + h) * (d + 1);
        for c in 0..d {
            dn[dn_at + c] = E::cast_from(dnum[c]);
        }
        dn[dn_at + d] = E::cast_from(dden);
        for p in 0..d {
            let mut s = f32::new(0.0);
            #[unroll]
            for e in 0..ex {
                let base = acc_at + (e * d + p) * (d + 1);
                let mut t = dden * acc[base + d];
                for c in 0..d {
                    t += dnum[c] * clamp_mag(acc[base + c], clamp);
                }
                s += phi[i * ex + e] * t;
            }
            dq[q_at + p] = E::cast_from(s);
        }
    }

    /// One key row (key `j`, head `h`) per thread: the gradients of its key and value from
    /// `dacc` (the gradient of `KV` and `S`) and `acc` (for the clamp's slope).
    #[cube(launch_unchecked)]
    fn key_backward_kernel<E: Float>(
        k: &Tensor<E>,
        v: &Tensor<E>,
        acc: &Tensor<f32>,
        dacc: &Tensor<f32>,
        psi: &Tensor<f32>,
        dk: &mut Tensor<E>,
        dv: &mut Tensor<E>,
        m: usize,
        #[comptime] heads: usize,
        #[comptime] d: usize,
        #[comptime] ex: usize,
        #[comptime] clamp: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at * d >= dk.len() {
            terminate!();
        }
        let h = at % heads;
        let row = at / heads;
        let j = row % m;
        let b = row / m;
        let x_at = row * heads * d + h * d;
        let acc_at = (b * heads + h) * ex * d * (d + 1);
        let mut dvs = Array::<f32>::new(d);
        for c in 0..d {
            dvs[c] = f32::new(0.0);
        }
        for p in 0..d {
            let kp = f32::cast_from(k[x_at + p]);
            let mut dkp = f32::new(0.0);
            #[unroll]
            for e in 0..ex {
                let w = psi[j * ex + e];
                let base = acc_at + (e * d + p) * (d + 1);
                let mut t = dacc[base + d];
                for c in 0..d {
                    let g = dacc[base + c] * clamp_slope(acc[base + c], clamp);
                    t += g * f32::cast_from(v[x_at + c]);
                    dvs[c] += w * kp * g;
                }
                dkp += w * t;
            }
            dk[x_at + p] = E::cast_from(dkp);
        }
        for c in 0..d {
            dv[x_at + c] = E::cast_from(dvs[c]);
        }
    }

    /// How [`reduce_kernel`] splits its work: `slices` column slices of `cw` columns per `p`
    /// (at most 1024 units a cube), `tile` keys staged at a time (≤ 32 KiB of shared memory), and
    /// the keys cut into `chunks` of `chunk_len` so that small batches still fill the GPU.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct ReducePlan {
        pub cw: usize,
        pub slices: usize,
        pub tile: usize,
        pub chunks: usize,
        pub chunk_len: usize,
    }

    impl ReducePlan {
        /// Aim for at least this many cubes (a few per SM on an H100)…
        const CUBES: usize = 1024;
        /// …but give each chunk at least this many keys.
        const MIN_KEYS: usize = 64;

        pub fn new(bh: usize, len: usize, d: usize, ex: usize) -> Self {
            let slices = (d + 1).div_ceil(16).min((1024 / d).max(1));
            let cw = (d + 1).div_ceil(slices);
            let tile = (8192 / (d + cw * slices + ex)).clamp(1, 32);
            let chunks = Self::CUBES
                .div_ceil(bh)
                .clamp(1, len.div_ceil(Self::MIN_KEYS).max(1));
            let chunk_len = len.div_ceil(chunks).max(1);
            ReducePlan {
                cw,
                slices,
                tile,
                chunks: len.div_ceil(chunk_len).max(1),
                chunk_len,
            }
        }
    }

    #[derive(Clone, Debug)]
    pub struct Core(pub VicinityCore);

    impl Core {
        fn dims<R: CubeRuntime>(
            &self,
            q: &CubeTensor<R>,
            k: &CubeTensor<R>,
        ) -> (usize, usize, usize, usize, usize) {
            let (b, n, c) = (q.meta.shape()[0], q.meta.shape()[1], q.meta.shape()[2]);
            (b, n, k.meta.shape()[1], self.0.heads, c / self.0.heads)
        }

        /// `KV` and `S` (or their gradients): Σ over the rows of `feat` (`B×L×(h·d)`) of
        /// `pos ⊗ feat ⊗ [val, 1]`, where `val` has `val_width` columns per head (`d`: the values,
        /// the ones column giving `S`; `d + 1`: `∂L/∂num` and `∂L/∂den`).
        fn reduce<R: CubeRuntime>(
            &self,
            feat: &CubeTensor<R>,
            val: &CubeTensor<R>,
            pos: &CubeTensor<R>,
            val_width: usize,
        ) -> CubeTensor<R> {
            let (heads, ex) = (self.0.heads, self.0.locality.expansion());
            let s = feat.meta.shape();
            let (b, len, d) = (s[0], s[1], s[2] / heads);
            let plan = ReducePlan::new(b * heads, len, d, ex);
            let acc = empty(feat, [b, heads, ex, d, d + 1], DType::F32);
            let part = if plan.chunks == 1 {
                acc.clone()
            } else {
                empty(feat, [plan.chunks, b, heads, ex, d, d + 1], DType::F32)
            };
            unsafe {
                reduce_kernel::launch_unchecked(
                    &feat.client,
                    CubeCount::Static((b * heads) as u32, plan.chunks as u32, 1),
                    CubeDim::new_1d((d * plan.slices) as u32),
                    feat.clone().into_tensor_arg(),
                    val.clone().into_tensor_arg(),
                    pos.clone().into_tensor_arg(),
                    part.clone().into_tensor_arg(),
                    len,
                    plan.chunk_len,
                    heads,
                    d,
                    ex,
                    val_width,
                    plan.cw,
                    plan.slices,
                    plan.tile,
                    feat.dtype.into(),
                )
            };
            if plan.chunks > 1 {
                let (count, dim) = launch_dims(&feat.client, b * heads * ex * d * (d + 1));
                unsafe {
                    sum_chunks_kernel::launch_unchecked(
                        &feat.client,
                        count,
                        dim,
                        part.into_tensor_arg(),
                        acc.clone().into_tensor_arg(),
                        plan.chunks,
                    )
                };
            }
            acc
        }
    }

    impl FusedOp<5> for Core {
        fn output_shape(&self, inputs: &[Shape; 5]) -> Shape {
            inputs[0].clone()
        }

        fn forward<R: CubeRuntime>(&self, [q, k, v, phi, psi]: [CubeTensor<R>; 5]) -> CubeTensor<R> {
            let q = into_contiguous(q);
            let dtype = q.dtype;
            let (k, v) = (dense(k, dtype), dense(v, dtype));
            let (phi, psi) = (dense(phi, DType::F32), dense(psi, DType::F32));
            let (b, n, _, heads, d) = self.dims(&q, &k);
            let ex = self.0.locality.expansion();
            let acc = self.reduce(&k, &v, &psi, d);
            let client = q.client.clone();
            let out = empty(&q, q.meta.shape().clone(), dtype);
            let (count, dim) = launch_dims(&client, b * n * heads * d);
            unsafe {
                query_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    q.into_tensor_arg(),
                    acc.into_tensor_arg(),
                    phi.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    n,
                    heads,
                    d,
                    ex,
                    self.0.clamp,
                    dtype.into(),
                )
            };
            out
        }

        fn backward<R: CubeRuntime>(
            &self,
            [q, k, v, phi, psi]: [CubeTensor<R>; 5],
            grad: CubeTensor<R>,
            wanted: [bool; 5],
        ) -> [Option<CubeTensor<R>>; 5] {
            let dtypes = [q.dtype, k.dtype, v.dtype];
            let q = into_contiguous(q);
            let dtype = q.dtype;
            let (k, v, grad) = (dense(k, dtype), dense(v, dtype), dense(grad, dtype));
            let (phi, psi) = (dense(phi, DType::F32), dense(psi, DType::F32));
            let (b, n, m, heads, d) = self.dims(&q, &k);
            let ex = self.0.locality.expansion();
            let client = q.client.clone();
            let acc = self.reduce(&k, &v, &psi, d);

            let dq = empty(&q, q.meta.shape().clone(), dtype);
            let dn = empty(&q, [b, n, heads, d + 1], dtype);
            let (count, dim) = launch_dims(&client, b * n * heads);
            unsafe {
                query_backward_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    q.clone().into_tensor_arg(),
                    acc.clone().into_tensor_arg(),
                    phi.clone().into_tensor_arg(),
                    grad.into_tensor_arg(),
                    dq.clone().into_tensor_arg(),
                    dn.clone().into_tensor_arg(),
                    n,
                    heads,
                    d,
                    ex,
                    self.0.clamp,
                    dtype.into(),
                )
            };
            // ∂L/∂KV and ∂L/∂S: Σ over queries of φ ⊗ q ⊗ (∂L/∂num, ∂L/∂den).
            let dacc = self.reduce(&q, &dn, &phi, d + 1);

            let dk = empty(&q, k.meta.shape().clone(), dtype);
            let dv = empty(&q, v.meta.shape().clone(), dtype);
            let (count, dim) = launch_dims(&client, b * m * heads);
            unsafe {
                key_backward_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    acc.into_tensor_arg(),
                    dacc.into_tensor_arg(),
                    psi.into_tensor_arg(),
                    dk.clone().into_tensor_arg(),
                    dv.clone().into_tensor_arg(),
                    m,
                    heads,
                    d,
                    ex,
                    self.0.clamp,
                    dtype.into(),
                )
            };
            let [want_q, want_k, want_v, ..] = wanted;
            [
                want_q.then(|| cast(dq, dtypes[0])),
                want_k.then(|| cast(dk, dtypes[1])),
                want_v.then(|| cast(dv, dtypes[2])),
                None,
                None,
            ]
        }
    }

    #[cfg(test)]
    mod tests {
        use super::ReducePlan;

        #[test]
        fn reduce_plans_fit_a_cube_and_cover_every_key() {
            for (bh, len, d, ex) in [
                (64, 3136, 64, 4),
                (2, 196, 16, 4),
                (1024, 64, 64, 4),
                (8, 5, 3, 1),
                (4, 900, 128, 4),
                (1, 40, 256, 2),
            ] {
                let plan = ReducePlan::new(bh, len, d, ex);
                assert!(d * plan.slices <= 1024, "{plan:?}");
                assert!(plan.cw * plan.slices > d, "{plan:?}: columns");
                assert!(
                    plan.tile >= 1 && plan.tile * (d + plan.cw * plan.slices + ex) * 4 <= 32 * 1024,
                    "{plan:?}"
                );
                assert!(plan.chunks * plan.chunk_len >= len, "{plan:?}: keys");
                assert!(
                    (plan.chunks - 1) * plan.chunk_len < len,
                    "{plan:?}: an empty chunk"
                );
            }
            assert_eq!(ReducePlan::new(64, 3136, 64, 4).slices, 5);
            assert_eq!(ReducePlan::new(64, 3136, 64, 4).chunks, 16);
        }
    }
}
