//! Matrix products through cuBLAS on the CUDA build.
//!
//! CubeCL's own matmul kernels reach about a tenth of what cuBLAS does on an H100 (88 against
//! 790 TFLOP/s at 8192³), and the models' products are a quarter (VVT) to
//! two fifths (LSAGT) of a training step. The CUDA build therefore registers a hook in the
//! vendored burn-cubecl ([`install`]) that hands every float matmul it can lay out to
//! `cublasGemmStridedBatchedEx`, enqueued from CubeCL's device thread on the stream its kernels
//! run on (the vendored cubecl-runtime and cubecl-cuda's `run_with_resources`), so the product
//! runs in order with everything around it. What it cannot lay out, and every product when
//! `libcublas` is missing, runs on CubeCL's kernels.
//!
//! [`plan`] maps Burn's row-major, possibly strided and broadcast operands onto cuBLAS's
//! column-major call; it is plain arithmetic, tested on the CPU against a naive product.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the cuBLAS path did so far (all zero when it is not in use): products taken, products left to CubeCL, and host time
/// spent in the hook (planning, allocating the output and submitting the product, including
/// any wait for CubeCL's device thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub taken: u64,
    pub declined: u64,
    pub host_us: u64,
}

/// The counters so far (the bench prints their change per step).
pub fn stats() -> Stats {
    Stats {
        taken: TAKEN.load(Ordering::Relaxed),
        declined: DECLINED.load(Ordering::Relaxed),
        host_us: HOST_US.load(Ordering::Relaxed),
    }
}

static TAKEN: AtomicU64 = AtomicU64::new(0);
static DECLINED: AtomicU64 = AtomicU64::new(0);
static HOST_US: AtomicU64 = AtomicU64::new(0);

/// One `cublasGemmStridedBatchedEx` call computing `out = lhs · rhs` for row-major `out`
/// (`[batch…, M, N]`, dense). cuBLAS is column-major, so it computes `outᵀ = rhsᵀ · lhsᵀ`:
/// its `A` is `rhs` and its `B` is `lhs`, `m = N`, `n = M` (times the batch when the batch is
/// folded into the rows), `k = K`. Strides and leading dimensions are in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `rhs` is stored column-major (`op(A) = Aᵀ`).
    pub trans_a: bool,
    pub lda: usize,
    pub stride_a: usize,
    /// `lhs` is stored column-major (`op(B) = Bᵀ`).
    pub trans_b: bool,
    pub ldb: usize,
    pub stride_b: usize,
    pub ldc: usize,
    pub stride_c: usize,
}

/// How a `rows×cols` matrix with strides `(row, col)` reads as a cuBLAS operand: `(transposed,
/// leading dimension)`, or `None` when it is neither row- nor column-major (e.g. broadcast).
fn matrix_layout(rows: usize, cols: usize, row: usize, col: usize) -> Option<(bool, usize)> {
    if (cols == 1 || col == 1) && (rows == 1 || row >= cols) {
        return Some((false, if rows == 1 { cols } else { row }));
    }
    if (rows == 1 || row == 1) && (cols == 1 || col >= rows) {
        return Some((true, if cols == 1 { rows } else { col }));
    }
    None
}

/// The one stride that walks an operand's batch in the output's batch order (0 when it is
/// broadcast over the whole batch), or `None` when its batch dimensions do not collapse.
fn batch_stride(shape: &[usize], strides: &[usize], out: &[usize]) -> Option<usize> {
    let mut stride = None;
    let mut span = 1;
    for d in (0..out.len()).rev() {
        if out[d] == 1 {
            continue;
        }
        let s = if shape[d] == 1 { 0 } else { strides[d] };
        let unit = *stride.get_or_insert(s);
        if s != unit * span {
            return None;
        }
        span *= out[d];
    }
    Some(stride.unwrap_or(0))
}

/// The output's shape for `lhs · rhs` (batch dimensions broadcast), or `None` if they do not fit.
pub fn output_shape(lhs: &[usize], rhs: &[usize]) -> Option<Vec<usize>> {
    let r = lhs.len();
    if r < 2 || rhs.len() != r || lhs[r - 1] != rhs[r - 2] {
        return None;
    }
    let mut out = Vec::with_capacity(r);
    for d in 0..r - 2 {
        match (lhs[d], rhs[d]) {
            (a, b) if a == b || b == 1 => out.push(a),
            (1, b) => out.push(b),
            _ => return None,
        }
    }
    out.extend([lhs[r - 2], rhs[r - 1]]);
    Some(out)
}

/// The cuBLAS call for `lhs · rhs` into a dense output, or `None` when the operands do not lay
/// out as one strided batched call (then the caller makes them dense and asks again, or leaves
/// the product to CubeCL). Shapes and strides are Burn's (row-major, in elements).
pub fn plan(
    lhs_shape: &[usize],
    lhs_strides: &[usize],
    rhs_shape: &[usize],
    rhs_strides: &[usize],
) -> Option<Gemm> {
    let out = output_shape(lhs_shape, rhs_shape)?;
    let r = out.len();
    let (rows, inner, cols) = (lhs_shape[r - 2], lhs_shape[r - 1], rhs_shape[r - 1]);
    if rows == 0 || inner == 0 || cols == 0 || out[..r - 2].contains(&0) {
        return None;
    }
    let (trans_b, ldb) = matrix_layout(rows, inner, lhs_strides[r - 2], lhs_strides[r - 1])?;
    let (trans_a, lda) = matrix_layout(inner, cols, rhs_strides[r - 2], rhs_strides[r - 1])?;
    // Trailing batch dimensions over which the weight is shared fold into the rows when the
    // input's row blocks follow each other at the row stride: `[B, M, K]·[1, K, N]` is one
    // `(B·M)×K · K×N` product, and LSAGT's 18 variant embeddings `[18, B, N, 27]·[18, 1, 27, D]`
    // are 18 products of `(B·N)` rows. (The output is dense, so its rows follow the same way.)
    let mut kept = r - 2;
    let mut n = rows;
    while kept > 0 && !trans_b {
        let d = kept - 1;
        let shared = rhs_shape[d] == 1 && lhs_shape[d] == out[d];
        if out[d] != 1 && !(shared && lhs_strides[d] == n * ldb) {
            break;
        }
        n *= out[d];
        kept -= 1;
    }
    let stride_b = batch_stride(&lhs_shape[..kept], &lhs_strides[..kept], &out[..kept])?;
    let stride_a = batch_stride(&rhs_shape[..kept], &rhs_strides[..kept], &out[..kept])?;
    let gemm = Gemm {
        batch: out[..kept].iter().product(),
        m: cols,
        n,
        k: inner,
        trans_a,
        lda,
        stride_a,
        trans_b,
        ldb,
        stride_b,
        ldc: cols,
        stride_c: n * cols,
    };
    let fits = |x: usize| x <= i32::MAX as usize;
    [gemm.batch, gemm.m, gemm.n, gemm.k, gemm.lda, gemm.ldb, gemm.ldc]
        .into_iter()
        .all(fits)
        .then_some(gemm)
}

/// Registers the cuBLAS matmul with burn-cubecl, once, if the library loads.
/// Returns whether cuBLAS is in use. A no-op returning `false` without the `cuda` feature.
pub fn install() -> bool {
    #[cfg(feature = "cuda")]
    {
        gpu::install()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::bind_context;

#[cfg(feature = "cuda")]
mod gpu {
    use std::any::Any;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use burn::tensor::DType;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::cuda::CudaRuntime;
    use cudarc::cublas::sys as cublas;
    use cudarc::driver::result as driver;

    use std::sync::atomic::Ordering;

    use super::{DECLINED, Gemm, HOST_US, TAKEN, output_shape, plan};
    use crate::kernels::cube::empty;

    type Tensor = CubeTensor<CudaRuntime>;

    pub fn install() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            // SAFETY: only looks the library up.
            if !unsafe { cublas::is_culib_present() } {
                eprintln!(
                    "note: cuBLAS (libcublas) was not found, so matmuls run on CubeCL's slower kernels; \
                     add the CUDA libraries' folder (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
                );
                return false;
            }
            burn_cubecl::kernel::matmul::set_matmul_hook(Box::new(hook))
        })
    }

    fn hook(lhs: &dyn Any, rhs: &dyn Any, dtype: DType) -> Option<Box<dyn Any>> {
        let (lhs, rhs) = (lhs.downcast_ref::<Tensor>()?, rhs.downcast_ref::<Tensor>()?);
        let start = std::time::Instant::now();
        let out = matmul(lhs, rhs, dtype);
        HOST_US.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        if out.is_none() && DECLINED.fetch_add(1, Ordering::Relaxed) == 0 {
            // Once per process: which product CubeCL's slower kernel computes instead.
            eprintln!(
                "note: cuBLAS left a product to CubeCL: {:?} {:?} (strides {:?}) × {:?} {:?} (strides {:?}), {dtype:?}",
                lhs.dtype,
                lhs.meta.shape().as_slice(),
                lhs.meta.strides(),
                rhs.dtype,
                rhs.meta.shape().as_slice(),
                rhs.meta.strides(),
            );
        }
        out.map(|t| Box::new(t) as Box<dyn Any>)
    }

    fn data_type(dtype: DType) -> Option<cublas::cudaDataType> {
        match dtype {
            DType::F32 => Some(cublas::cudaDataType::CUDA_R_32F),
            DType::BF16 => Some(cublas::cudaDataType::CUDA_R_16BF),
            DType::F16 => Some(cublas::cudaDataType::CUDA_R_16F),
            _ => None,
        }
    }

    fn layout(lhs: &Tensor, rhs: &Tensor) -> Option<Gemm> {
        plan(
            lhs.meta.shape().as_slice(),
            lhs.meta.strides(),
            rhs.meta.shape().as_slice(),
            rhs.meta.strides(),
        )
    }

    fn matmul(lhs: &Tensor, rhs: &Tensor, dtype: DType) -> Option<Tensor> {
        if lhs.dtype != dtype || rhs.dtype != dtype || lhs.device != rhs.device {
            return None;
        }
        let kind = data_type(dtype)?;
        let (mut lhs, mut rhs) = (lhs.clone(), rhs.clone());
        let gemm = match layout(&lhs, &rhs) {
            Some(g) => g,
            None => {
                lhs = into_contiguous(lhs);
                rhs = into_contiguous(rhs);
                layout(&lhs, &rhs)?
            }
        };
        let shape = output_shape(lhs.meta.shape().as_slice(), rhs.meta.shape().as_slice())?;
        let out = empty(&lhs, shape, dtype);
        let device = lhs.device.index;
        let handles = vec![rhs.handle.clone(), lhs.handle.clone(), out.handle.clone()];
        // Enqueued on CubeCL's device thread, in order with its kernels and without waiting for
        // them: `get_resource` would block until that thread caught up, which measured 380 µs
        // per product. The bindings keep the operands alive until it has run.
        out.client.run_with_resources(
            handles,
            Box::new(move |resources| {
                let [a, b, c] = [&resources[0], &resources[1], &resources[2]];
                if let Err(e) = launch(device, c.stream, &gemm, kind, a.ptr, b.ptr, c.ptr) {
                    // Past the point of handing the product back to CubeCL: fail loudly rather
                    // than leave the output unwritten.
                    panic!(
                        "cuBLAS failed on a product ({e}): {gemm:?}; rerun with `--matmul cubecl` \
                         to use CubeCL's kernels"
                    );
                }
            }),
        );
        TAKEN.fetch_add(1, Ordering::Relaxed);
        Some(out)
    }

    /// One cuBLAS handle per device, created on first use with the device's primary context.
    struct Handles(HashMap<usize, cublas::cublasHandle_t>);
    // SAFETY: a handle is only used under the mutex.
    unsafe impl Send for Handles {}

    fn launch(
        device: usize,
        stream: cudarc::driver::sys::CUstream,
        g: &Gemm,
        kind: cublas::cudaDataType,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), String> {
        static HANDLES: OnceLock<Mutex<Handles>> = OnceLock::new();
        let mut handles = HANDLES
            .get_or_init(|| Mutex::new(Handles(HashMap::new())))
            .lock()
            .map_err(|_| "cuBLAS handle lock poisoned".to_string())?;
        bind_context(device)?;
        let handle = match handles.0.get(&device) {
            Some(h) => *h,
            None => {
                let h = cudarc::cublas::result::create_handle().map_err(|e| format!("{e:?}"))?;
                handles.0.insert(device, h);
                h
            }
        };
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers are live CubeCL allocations of the sizes `plan` checked (the
        // tensors are held by the caller until this returns, and everything later that reuses
        // their memory runs after this product on the same stream); the handle belongs to this
        // device and is used under the mutex.
        unsafe {
            cudarc::cublas::result::set_stream(handle, stream as _).map_err(|e| format!("{e:?}"))?;
            cublas::cublasGemmStridedBatchedEx(
                handle,
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                a as *const _,
                kind,
                g.lda as i32,
                g.stride_a as i64,
                b as *const _,
                kind,
                g.ldb as i32,
                g.stride_b as i64,
                (&beta as *const f32).cast(),
                c as *mut _,
                kind,
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
            .map_err(|e| format!("{e:?}"))
        }
    }

    /// Makes `device`'s primary context (the one CubeCL uses) current on this thread.
    pub(crate) fn bind_context(device: usize) -> Result<(), String> {
        thread_local! {
            static BOUND: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
        }
        if BOUND.with(|b| b.get()) == Some(device) {
            return Ok(());
        }
        // SAFETY: CubeCL initialised the driver and retained this primary context already.
        unsafe {
            let dev = driver::device::get(device as i32).map_err(|e| format!("{e:?}"))?;
            let ctx = driver::primary_ctx::retain(dev).map_err(|e| format!("{e:?}"))?;
            driver::ctx::set_current(ctx).map_err(|e| format!("{e:?}"))?;
        }
        BOUND.with(|b| b.set(Some(device)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Gemm, output_shape, plan};

    /// cuBLAS's strided batched product, as its documentation defines it (column-major).
    fn run_cublas(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for batch in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0;
                    for p in 0..g.k {
                        let av = if g.trans_a {
                            a[batch * g.stride_a + p + i * g.lda]
                        } else {
                            a[batch * g.stride_a + i + p * g.lda]
                        };
                        let bv = if g.trans_b {
                            b[batch * g.stride_b + j + p * g.ldb]
                        } else {
                            b[batch * g.stride_b + p + j * g.ldb]
                        };
                        s += av * bv;
                    }
                    c[batch * g.stride_c + i + j * g.ldc] = s;
                }
            }
        }
    }

    /// Element `index` of a strided tensor stored in `data`.
    fn at(data: &[f32], strides: &[usize], index: &[usize]) -> f32 {
        data[index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>()]
    }

    /// The naive broadcast product of two strided tensors, dense row-major.
    fn naive(ls: &[usize], lst: &[usize], l: &[f32], rs: &[usize], rst: &[usize], r: &[f32]) -> Vec<f32> {
        let out = output_shape(ls, rs).unwrap();
        let rank = out.len();
        let total: usize = out.iter().product();
        let mut res = vec![0.0; total];
        for (flat, slot) in res.iter_mut().enumerate() {
            let mut idx = vec![0; rank];
            let mut rem = flat;
            for d in (0..rank).rev() {
                idx[d] = rem % out[d];
                rem /= out[d];
            }
            // An operand's index: the output's batch index (0 where it broadcasts), then its matrix
            // position.
            let index = |shape: &[usize], row: usize, col: usize| {
                let mut i: Vec<usize> = (0..rank - 2)
                    .map(|d| if shape[d] == 1 { 0 } else { idx[d] })
                    .collect();
                i.extend([row, col]);
                i
            };
            let mut s = 0.0;
            for p in 0..ls[rank - 1] {
                s += at(l, lst, &index(ls, idx[rank - 2], p)) * at(r, rst, &index(rs, p, idx[rank - 1]));
            }
            *slot = s;
        }
        res
    }

    /// A tensor of `shape` stored with its dimensions in `order` (outermost first), plus the
    /// padding `pad` on its innermost stored dimension: `(strides, storage size)`.
    fn strided(shape: &[usize], order: &[usize], pad: usize) -> (Vec<usize>, usize) {
        let mut strides = vec![0; shape.len()];
        let mut step = 1;
        for (i, &d) in order.iter().rev().enumerate() {
            strides[d] = step;
            step *= shape[d] + if i == 0 { pad } else { 0 };
        }
        (strides, step)
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 97) as f32 - 48.0) / 17.0)
            .collect()
    }

    #[test]
    fn planned_products_match_a_naive_product_for_strided_and_broadcast_operands() {
        // (lhs shape, lhs storage order, rhs shape, rhs storage order, lhs row padding)
        type Case = (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>, usize);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (vec![3, 5, 4], vec![0, 1, 2], vec![1, 4, 6], vec![0, 1, 2], 0),
            (vec![3, 5, 4], vec![0, 2, 1], vec![1, 4, 6], vec![0, 1, 2], 0),
            (vec![3, 5, 4], vec![0, 1, 2], vec![1, 4, 6], vec![0, 2, 1], 0),
            (vec![3, 5, 4], vec![0, 1, 2], vec![3, 4, 6], vec![0, 1, 2], 0),
            (vec![3, 5, 4], vec![0, 2, 1], vec![3, 4, 6], vec![0, 2, 1], 0),
            (vec![1, 5, 4], vec![0, 1, 2], vec![3, 4, 6], vec![0, 1, 2], 0),
            (vec![2, 3, 5, 4], vec![0, 1, 2, 3], vec![2, 3, 4, 6], vec![0, 1, 3, 2], 0),
            (vec![2, 3, 5, 4], vec![1, 0, 2, 3], vec![2, 3, 4, 6], vec![0, 1, 2, 3], 0),
            (vec![2, 3, 5, 4], vec![0, 1, 2, 3], vec![1, 1, 4, 6], vec![0, 1, 2, 3], 0),
            (vec![2, 3, 5, 4], vec![0, 1, 2, 3], vec![2, 1, 4, 6], vec![0, 1, 2, 3], 0),
            (vec![2, 3, 5, 4], vec![0, 1, 2, 3], vec![2, 1, 4, 6], vec![0, 1, 3, 2], 2),
            (vec![3, 5, 4], vec![0, 1, 2], vec![1, 4, 6], vec![0, 1, 2], 3),
            (vec![3, 1, 4], vec![0, 1, 2], vec![3, 4, 1], vec![0, 1, 2], 0),
            (vec![4, 7], vec![0, 1], vec![7, 2], vec![1, 0], 0),
            (vec![4, 7], vec![1, 0], vec![7, 2], vec![0, 1], 2),
        ];
        let mut planned = 0;
        for (ls, lo, rs, ro, pad) in cases {
            let (lst, ln) = strided(&ls, &lo, pad);
            let (rst, rn) = strided(&rs, &ro, 0);
            let (l, r) = (values(ln, 1), values(rn, 2));
            let expect = naive(&ls, &lst, &l, &rs, &rst, &r);
            let Some(g) = plan(&ls, &lst, &rs, &rst) else {
                // Permuted batch dimensions cannot be one strided call.
                assert!(
                    lo[..lo.len() - 2].windows(2).any(|w| w[0] > w[1]),
                    "{ls:?} {lst:?} {rs:?} {rst:?} declined"
                );
                continue;
            };
            planned += 1;
            let mut got = vec![f32::NAN; expect.len()];
            run_cublas(&g, &r, &l, &mut got);
            for (x, y) in got.iter().zip(&expect) {
                assert!(
                    (x - y).abs() < 1e-4,
                    "{ls:?}/{lst:?} · {rs:?}/{rst:?} with {g:?}: {x} vs {y}"
                );
            }
        }
        assert_eq!(planned, 14);
    }

    #[test]
    fn a_shared_weight_folds_the_batch_into_rows() {
        let g = plan(
            &[64, 3136, 96],
            &[3136 * 96, 96, 1],
            &[1, 96, 768],
            &[96 * 768, 768, 1],
        )
        .unwrap();
        assert_eq!((g.batch, g.m, g.n, g.k), (1, 768, 64 * 3136, 96));
        // Transposed inputs (a weight gradient's `xᵀ`) stay batched.
        let g = plan(
            &[64, 96, 3136],
            &[3136 * 96, 1, 96],
            &[64, 3136, 768],
            &[3136 * 768, 768, 1],
        )
        .unwrap();
        assert_eq!((g.batch, g.trans_b, g.ldb), (64, true, 96));
        // A weight per leading index, shared over the next: those two dims fold, not the first.
        let g = plan(
            &[18, 128, 1024, 27],
            &[128 * 1024 * 27, 1024 * 27, 27, 1],
            &[18, 1, 27, 192],
            &[27 * 256, 27 * 256, 256, 1],
        )
        .unwrap();
        assert_eq!(
            (g.batch, g.n, g.stride_b, g.stride_a),
            (18, 128 * 1024, 128 * 1024 * 27, 27 * 256)
        );
        // Permuted leading dims do not fold.
        let permuted = [27648, 497664, 27, 1];
        assert!(
            plan(
                &[18, 128, 1024, 27],
                &permuted,
                &[18, 1, 27, 192],
                &[6912, 6912, 256, 1]
            )
            .is_none()
        );
    }

    #[test]
    fn mismatched_or_broadcast_matrices_are_declined() {
        assert!(plan(&[2, 3], &[3, 1], &[4, 5], &[5, 1]).is_none());
        assert!(plan(&[2, 3, 4], &[12, 4, 1], &[3, 4, 5], &[20, 5, 1]).is_none());
        // A matrix broadcast along its rows (stride 0) is neither row- nor column-major.
        assert!(plan(&[3, 4], &[0, 1], &[4, 5], &[5, 1]).is_none());
        assert!(plan(&[0, 4], &[4, 1], &[4, 5], &[5, 1]).is_none());
    }
}
