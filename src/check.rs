//! Every fused kernel against its reference path: the output and every input gradient, on random
//! inputs. (Long: one check function per kernel and the cases of each, on the models' shapes.)
//! The fused kernels run on the backend under test; the reference path always runs on the CPU
//! backend, in exact f32 (on CUDA the reference's own matmuls would run in TF32, whose error grows
//! with the number of keys and hid nothing but noise). Used by the tests (WebGPU, on lavapipe in
//! CI) and by `vicinity check-kernels` (the CUDA build on a GPU).

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData};

use crate::attention::vicinity::{Locality, VicinityCore};

/// Where the reference paths run.
type Reference = burn::backend::Autodiff<crate::backend::Cpu>;

/// One kernel checked on one shape.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub case: String,
    /// Relative L2 error of the output and of each input gradient: `(what, error)`.
    pub errors: Vec<(&'static str, f32)>,
}

impl KernelCheck {
    pub fn worst(&self) -> f32 {
        self.errors.iter().map(|(_, e)| *e).fold(0.0, f32::max)
    }

    /// Compares the fused results with the reference's, named in order.
    fn new(
        kernel: &'static str,
        case: String,
        names: &[&'static str],
        fused: Vec<TensorData>,
        reference: Vec<TensorData>,
    ) -> Self {
        assert!(names.len() == fused.len() && fused.len() == reference.len());
        let errors = names
            .iter()
            .zip(fused.into_iter().zip(reference))
            .map(|(name, (a, b))| (*name, rel_err(a, b)))
            .collect();
        KernelCheck { kernel, case, errors }
    }
}

/// One line per check: kernel, case, then each error.
pub fn table(checks: &[KernelCheck]) -> String {
    let mut out = format!(
        "{:<20} {:<32} errors (relative L2, fused vs reference)\n",
        "kernel", "case"
    );
    for c in checks {
        let errs: Vec<String> = c
            .errors
            .iter()
            .map(|(what, e)| format!("{what} {e:.2e}"))
            .collect();
        out += &format!("{:<20} {:<32} {}\n", c.kernel, c.case, errs.join(", "));
    }
    out
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_err(a: TensorData, b: TensorData) -> f32 {
    let a = a.convert::<f32>().to_vec::<f32>().expect("f32");
    let b = b.convert::<f32>().to_vec::<f32>().expect("f32");
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt() as f32
}

/// Random normal values, made on the host so both backends get the same inputs.
fn random<const D: usize>(shape: [usize; D]) -> TensorData {
    Tensor::<crate::backend::Cpu, D>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
        .into_data()
}

/// Random normal values times `scale` plus `shift`.
fn random_affine<const D: usize>(shape: [usize; D], scale: f64, shift: f64) -> TensorData {
    Tensor::<crate::backend::Cpu, D>::random(shape, Distribution::Normal(shift, scale), &Default::default())
        .into_data()
}

/// The inputs rounded to bf16 when the check runs in bf16, so that the f32 reference starts from the
/// very values the kernel gets: the error then measures the kernel's bf16 arithmetic, not the
/// rounding of random inputs (which alone came within a few per cent of the tolerance).
fn exact_in<const N: usize>(data: [TensorData; N], bf16: bool) -> [TensorData; N] {
    if !bf16 {
        return data;
    }
    data.map(|d| d.convert::<half::bf16>().convert::<f32>())
}

fn on<B: Backend, const D: usize>(data: &TensorData, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(data.clone(), device)
}

/// `t` in bf16 when `bf16` is set (the fused kernels' widest vectors run only there).
fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, bf16: bool) -> Tensor<B, D> {
    if bf16 {
        t.cast(burn::tensor::DType::BF16)
    } else {
        t
    }
}

/// What a check's case name ends with when it ran in bf16 (`vicinity check-kernels` gives those
/// [`BF16_TOLERANCE`]).
fn bf16_suffix(bf16: bool) -> &'static str {
    if bf16 { " bf16" } else { "" }
}

/// The relative error a bf16 check may show: its inputs alone are rounded to ~3 significant
/// digits before the kernel sees them (the reference runs in f32 on the exact inputs).
pub const BF16_TOLERANCE: f32 = 2e-2;

/// The kernels whose vector width depends on the dtype, in bf16 at the models' shapes, against the f32
/// reference: 8 values per load on CUDA, where f32 takes 4 (only backends with bf16; not WebGPU).
/// Each case's name says `bf16`; compare with [`BF16_TOLERANCE`].
pub fn check_bf16<B: AutodiffBackend>(device: &B::Device) -> anyhow::Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for shape in [[2, 7, 192], [3, 300, 64], [2, 3, 40]] {
        out.push(check_layer_norm::<B>(shape, true, device)?);
    }
    out.push(check_layer_norm_shifted::<B>([3, 2, 16, 192], true, device)?);
    for shape in [[2, 5, 1024], [3, 4, 256], [2, 3, 18]] {
        out.push(check_softmax::<B>(shape, true, device)?);
    }
    let h = crate::kernels::local_attention::LocalHeads {
        heads: 4,
        kv_heads: 1,
        head_dim: 48,
    };
    out.push(check_local_attention::<B>([2, 7], 18, h, true, device)?);
    out.push(check_cast_square_sum::<B>(1 << 22, device)?);
    Ok(out)
}

/// The optimizer's gradient norm under bf16: a bf16 tensor cast to f32, squared and summed (fused
/// into one reduction on CUDA), against the sum in f64 on the host. The result must keep f32
/// precision. (Not named `bf16`: the f32 tolerance applies.) The reference is not a backend's f32
/// sum: one adding in order is itself off by ~4e-3 over millions of squares.
pub fn check_cast_square_sum<B: Backend>(len: usize, device: &B::Device) -> anyhow::Result<KernelCheck> {
    let [data] = exact_in([random([len])], true);
    let values = data.to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let exact: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let x = on::<B, 1>(&data, device).cast(burn::tensor::DType::BF16);
    Ok(KernelCheck::new(
        "cast_square_sum",
        format!("{len} values, bf16 in, f32 sum"),
        &["sum"],
        vec![crate::train::params::to_f32(x).square().sum().into_data()],
        vec![TensorData::new(vec![exact as f32], [1])],
    ))
}

/// Every fused kernel on a few shapes. Fails if the backend has no fused kernels (so that a check
/// can never pass by comparing the reference with itself).
pub fn check_all<B: AutodiffBackend>(device: &B::Device) -> anyhow::Result<Vec<KernelCheck>> {
    anyhow::ensure!(
        crate::kernels::available::<B>(),
        "this backend has no fused kernels (they run on the cuda and wgpu builds)"
    );
    let mut out = Vec::new();
    let timed = |check: &dyn Fn() -> anyhow::Result<KernelCheck>| {
        let start = std::time::Instant::now();
        let c = check()?;
        eprintln!(
            "checked {} {} in {:.1} s",
            c.kernel,
            c.case,
            start.elapsed().as_secs_f64()
        );
        anyhow::Ok(c)
    };
    for (b, h, w, c, k, pad) in [
        (2, 5, 6, 8, 3, 1),
        (3, 7, 7, 40, 3, 1),
        (1, 6, 5, 4, 5, 2),
        (2, 4, 4, 3, 3, 0),
        // Rows wider than a thread's run of 8 outputs (a partial last run), and enough rows per
        // channel that the weight gradient sums several rows per chunk.
        (2, 9, 19, 8, 3, 1),
        (1, 5, 21, 12, 5, 2),
        (2, 70, 3, 1024, 3, 1),
    ] {
        out.push(timed(&|| check_depthwise::<B>([b, h, w, c], k, pad, device))?);
    }
    // (b, h, w, c, k, stride, pad): VVT's patch embeddings (7/4/3, 3/2/1), LSAGT's stage
    // transitions (3/1/1), and odd sizes whose last window overhangs.
    for (b, h, w, c, k, s, p) in [
        (2, 16, 12, 3, 7, 4, 3),
        (2, 8, 8, 6, 3, 2, 1),
        (1, 7, 9, 5, 3, 2, 1),
        (2, 6, 5, 4, 3, 1, 1),
        (1, 9, 7, 2, 5, 3, 0),
    ] {
        out.push(timed(&|| check_im2col::<B>([b, h, w, c], (k, s, p), device))?);
    }
    for (t, heads, kv_heads, head_dim) in [(5, 4, 1, 8), (3, 2, 2, 6), (18, 4, 1, 48), (4, 6, 3, 5)] {
        let h = crate::kernels::local_attention::LocalHeads {
            heads,
            kv_heads,
            head_dim,
        };
        out.push(timed(&|| {
            check_local_attention::<B>([2, 7], t, h, false, device)
        })?);
    }
    for (lhs, rhs, transposed) in [
        (vec![4, 33, 20], vec![1, 20, 17], false),
        (vec![4, 33, 20], vec![4, 20, 17], true),
        (vec![2, 3, 17, 9], vec![2, 3, 9, 11], false),
        (vec![2, 3, 17, 9], vec![1, 1, 9, 11], true),
        (vec![70, 48], vec![48, 130], true),
    ] {
        out.push(timed(&|| check_matmul::<B>(&lhs, &rhs, transposed, device))?);
    }
    // (rows, channels): fewer channels than a row's 32 threads, several per thread, a partial last
    // cube, LSAGT's and VVT's widths, and more groups of rows than the backward launches cubes
    // (cubes that take two groups, others one).
    for shape in [
        [2, 5, 6],
        [3, 7, 96],
        [1, 9, 33],
        [4, 300, 40],
        [2, 3, 512],
        [1, 17, 64],
        [2, 2300, 12],
    ] {
        out.push(timed(&|| check_layer_norm::<B>(shape, false, device))?);
    }
    // [T, B, N, C]: LSAGT's variant tokens (one shift row per variant and token).
    for shape in [[3, 2, 5, 8], [2, 3, 4, 96], [4, 2, 9, 33]] {
        out.push(timed(&|| check_layer_norm_shifted::<B>(shape, false, device))?);
    }
    // (rows, width): LSAGT's local (T = 18) and global (1,024 and 256 keys) widths, widths that
    // leave a row's last threads partly or wholly idle, and the widest row the kernel takes.
    for shape in [
        [2, 3, 18],
        [2, 5, 1024],
        [4, 7, 33],
        [1, 9, 256],
        [3, 2, 5],
        [2, 1, 4096],
    ] {
        out.push(timed(&|| check_softmax::<B>(shape, false, device))?);
    }
    // (batch, pixels, channels, variants, tokens, taps, width): LSAGT's 3×3 RGB patches padded
    // from 27 to 32 values, and an unpadded case.
    for (b, p, c, t, n, taps, width) in [(2, 30, 3, 4, 6, 9, 32), (3, 7, 2, 2, 5, 4, 8)] {
        out.push(timed(&|| {
            check_patches::<B::InnerBackend>([b, p, c], [t, n, taps], width, device)
        })?);
    }
    // The last case has more parts than WebGPU binds in one launch (several launches there).
    let many: Vec<usize> = (1..=40).map(|i| i * 37 % 300 + 1).collect();
    for lens in [
        vec![5, 300, 1, 257],
        vec![1024],
        vec![3, 1, 700, 256, 9, 70_000],
        many,
    ] {
        out.push(timed(&|| check_concat::<B::InnerBackend>(&lens, device))?);
    }
    // LSAGT's variant counts; rows whose gradients need a pitched buffer for aligned views, and
    // (f32 on CUDA) rows that are aligned already.
    for (count, shape) in [(18, [6, 27]), (10, [4, 5]), (18, [1, 128])] {
        out.push(timed(&|| check_stack::<B>(count, shape, device))?);
    }
    for (heads, d, q_grid, k_grid, locality, clamp) in [
        (1, 8, (4, 5), (4, 5), Locality::TwoD, true),
        (2, 6, (6, 6), (3, 3), Locality::TwoD, true),
        (3, 4, (3, 5), (3, 5), Locality::OneD, false),
        (2, 5, (5, 4), (5, 4), Locality::None, true),
        (1, 32, (7, 7), (7, 7), Locality::TwoD, false),
        // Enough keys for the reduction to split them into chunks and partial tiles.
        (1, 16, (14, 14), (14, 14), Locality::TwoD, true),
        (2, 64, (9, 9), (9, 9), Locality::TwoD, false),
    ] {
        let cfg = VicinityCore {
            heads,
            q_grid,
            k_grid,
            locality,
            clamp,
        };
        out.push(timed(&|| check_vicinity::<B>(2, d, cfg, device))?);
    }
    Ok(out)
}

/// A matrix product (cuBLAS on the CUDA build, CubeCL's kernel elsewhere): output and both
/// gradients, whose products take transposed operands. `transposed` stores `lhs` transposed (a
/// `swap_dims` view). The case names how many products cuBLAS took.
pub fn check_matmul<B: AutodiffBackend>(
    lhs: &[usize],
    rhs: &[usize],
    transposed: bool,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let out = crate::kernels::cublas::output_shape(lhs, rhs)
        .ok_or_else(|| anyhow::anyhow!("{lhs:?} and {rhs:?} do not multiply"))?;
    let rank = lhs.len();
    let mut stored = lhs.to_vec();
    if transposed {
        stored.swap(rank - 1, rank - 2);
    }
    let with_shape = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let data = Tensor::<crate::backend::Cpu, 1>::random(
            [n],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        TensorData::new(data.into_data().to_vec::<f32>().expect("f32"), shape.to_vec())
    };
    let data = [with_shape(&stored), with_shape(rhs), with_shape(&out)];
    let before = crate::kernels::cublas::stats().taken;
    let fast = matmul_run::<B>(&data, transposed, device);
    let taken = crate::kernels::cublas::stats().taken - before;
    Ok(KernelCheck::new(
        "matmul",
        format!(
            "{lhs:?}{} x {rhs:?}, cuBLAS {taken}",
            if transposed { "ᵀ" } else { "" }
        ),
        &["output", "grad lhs", "grad rhs"],
        fast,
        matmul_run::<Reference>(&data, transposed, &Default::default()),
    ))
}

fn matmul_run<B: AutodiffBackend>(
    data: &[TensorData; 3],
    transposed: bool,
    device: &B::Device,
) -> Vec<TensorData> {
    fn run<B: AutodiffBackend, const D: usize>(
        [l, r, probe]: &[TensorData; 3],
        transposed: bool,
        device: &B::Device,
    ) -> Vec<TensorData> {
        let l = on::<B, D>(l, device).require_grad();
        let r = on::<B, D>(r, device).require_grad();
        let lhs = if transposed {
            l.clone().swap_dims(D - 1, D - 2)
        } else {
            l.clone()
        };
        let y = lhs.matmul(r.clone());
        let grads = (y.clone() * on::<B, D>(probe, device)).sum().backward();
        vec![
            y.into_data(),
            l.grad(&grads).expect("lhs gradient").into_data(),
            r.grad(&grads).expect("rhs gradient").into_data(),
        ]
    }
    match data[0].shape.len() {
        2 => run::<B, 2>(data, transposed, device),
        3 => run::<B, 3>(data, transposed, device),
        4 => run::<B, 4>(data, transposed, device),
        r => panic!("matmul check of rank {r}"),
    }
}

/// Depth-wise convolution: output, input gradient and weight gradient.
pub fn check_depthwise<B: AutodiffBackend>(
    shape: [usize; 4],
    k: usize,
    pad: usize,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let [b, h, wd, c] = shape;
    // A random projection of the output as the loss, so every output value gets its own gradient.
    let data = [
        random(shape),
        random([c, k * k]),
        random([b, h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k, c]),
    ];
    Ok(KernelCheck::new(
        "depthwise_conv2d",
        format!("x {shape:?}, k {k}, pad {pad}"),
        &["output", "grad x", "grad w"],
        depthwise_run::<B>(&data, k, pad, true, device)?,
        depthwise_run::<Reference>(&data, k, pad, false, &Default::default())?,
    ))
}

fn depthwise_run<B: AutodiffBackend>(
    [x, w, probe]: &[TensorData; 3],
    k: usize,
    pad: usize,
    fast: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::depthwise::{depthwise_conv2d_reference, fused};
    let x = on::<B, 4>(x, device).require_grad();
    let w = on::<B, 2>(w, device).require_grad();
    let y = if fast {
        fused(x.clone(), w.clone(), k, pad)
            .map_err(|_| anyhow::anyhow!("the depthwise kernel did not run on this backend"))?
    } else {
        depthwise_conv2d_reference(x.clone(), w.clone(), k, 1, pad)
    };
    let grads = (y.clone() * on::<B, 4>(probe, device)).sum().backward();
    Ok(vec![
        y.into_data(),
        x.grad(&grads).expect("x gradient").into_data(),
        w.grad(&grads).expect("w gradient").into_data(),
    ])
}

/// LayerNorm over the last dimension: output and the gradients of the input, scale and shift.
pub fn check_layer_norm<B: AutodiffBackend>(
    shape: [usize; 3],
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let c = shape[2];
    // Inputs off zero mean and unit scale, a scale and shift away from 1 and 0.
    let data = exact_in(
        [
            random_affine(shape, 3.0, 1.5),
            random_affine([c], 1.0, 1.0),
            random([c]),
            random(shape),
        ],
        bf16,
    );
    Ok(KernelCheck::new(
        "layer_norm",
        format!("x {shape:?}{}", bf16_suffix(bf16)),
        &["output", "grad x", "grad gamma", "grad beta"],
        layer_norm_run::<B>(&data, true, bf16, device)?,
        layer_norm_run::<Reference>(&data, false, false, &Default::default())?,
    ))
}

/// LayerNorm of `x + shift`, the shift broadcast over the batch: output and the gradients of
/// `x`, the shift, `gamma` and `beta`.
pub fn check_layer_norm_shifted<B: AutodiffBackend>(
    shape: [usize; 4],
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let [t, _, n, c] = shape;
    let data = exact_in(
        [
            random_affine(shape, 3.0, 1.5),
            random([t, n, c]),
            random_affine([c], 1.0, 1.0),
            random([c]),
            random(shape),
        ],
        bf16,
    );
    Ok(KernelCheck::new(
        "layer_norm",
        format!("x {shape:?} + shift{}", bf16_suffix(bf16)),
        &["output", "grad x", "grad shift", "grad gamma", "grad beta"],
        layer_norm_shifted_run::<B>(&data, true, bf16, device)?,
        layer_norm_shifted_run::<Reference>(&data, false, false, &Default::default())?,
    ))
}

fn layer_norm_shifted_run<B: AutodiffBackend>(
    [x, shift, gamma, beta, probe]: &[TensorData; 5],
    fast: bool,
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::layer_norm::{layer_norm_shifted, layer_norm_shifted_reference};
    let x = in_dtype(on::<B, 4>(x, device), bf16).require_grad();
    let shift = in_dtype(on::<B, 3>(shift, device), bf16).require_grad();
    let gamma = in_dtype(on::<B, 1>(gamma, device), bf16).require_grad();
    let beta = in_dtype(on::<B, 1>(beta, device), bf16).require_grad();
    let eps = 1e-6;
    let args = (x.clone(), shift.clone(), gamma.clone(), beta.clone(), eps);
    let y = if fast {
        anyhow::ensure!(
            crate::kernels::available::<B>(),
            "the layer_norm kernel did not run on this backend"
        );
        layer_norm_shifted(args.0, args.1, args.2, args.3, args.4)
    } else {
        layer_norm_shifted_reference(args.0, args.1, args.2, args.3, args.4)
    };
    let grads = (y.clone() * in_dtype(on::<B, 4>(probe, device), bf16))
        .sum()
        .backward();
    Ok(vec![
        y.into_data(),
        x.grad(&grads).expect("x gradient").into_data(),
        shift.grad(&grads).expect("shift gradient").into_data(),
        gamma.grad(&grads).expect("gamma gradient").into_data(),
        beta.grad(&grads).expect("beta gradient").into_data(),
    ])
}

fn layer_norm_run<B: AutodiffBackend>(
    [x, gamma, beta, probe]: &[TensorData; 4],
    fast: bool,
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::layer_norm::{fused, layer_norm_reference};
    let x = in_dtype(on::<B, 3>(x, device), bf16).require_grad();
    let gamma = in_dtype(on::<B, 1>(gamma, device), bf16).require_grad();
    let beta = in_dtype(on::<B, 1>(beta, device), bf16).require_grad();
    let eps = 1e-6;
    let y = if fast {
        fused(x.clone(), gamma.clone(), beta.clone(), eps)
            .map_err(|_| anyhow::anyhow!("the layer_norm kernel did not run on this backend"))?
    } else {
        layer_norm_reference(x.clone(), gamma.clone(), beta.clone(), eps)
    };
    let grads = (y.clone() * in_dtype(on::<B, 3>(probe, device), bf16))
        .sum()
        .backward();
    Ok(vec![
        y.into_data(),
        x.grad(&grads).expect("x gradient").into_data(),
        gamma.grad(&grads).expect("gamma gradient").into_data(),
        beta.grad(&grads).expect("beta gradient").into_data(),
    ])
}

/// Softmax of scaled scores over the last dimension: output and input gradient.
pub fn check_softmax<B: AutodiffBackend>(
    shape: [usize; 3],
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    // Scores spread wide enough that the maximum matters (exp of them would overflow in bf16).
    let data = exact_in([random_affine(shape, 8.0, 0.0), random(shape)], bf16);
    Ok(KernelCheck::new(
        "softmax",
        format!("x {shape:?}{}", bf16_suffix(bf16)),
        &["output", "grad x"],
        softmax_run::<B>(&data, true, bf16, device)?,
        softmax_run::<Reference>(&data, false, false, &Default::default())?,
    ))
}

fn softmax_run<B: AutodiffBackend>(
    [x, probe]: &[TensorData; 2],
    fast: bool,
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::softmax::{fused, softmax_scaled_reference};
    let x = in_dtype(on::<B, 3>(x, device), bf16).require_grad();
    let scale = 0.7;
    let y = if fast {
        fused(x.clone(), scale)
            .map_err(|_| anyhow::anyhow!("the softmax kernel did not run on this backend"))?
    } else {
        softmax_scaled_reference(x.clone(), scale)
    };
    let grads = (y.clone() * in_dtype(on::<B, 3>(probe, device), bf16))
        .sum()
        .backward();
    Ok(vec![
        y.into_data(),
        x.grad(&grads).expect("x gradient").into_data(),
    ])
}

/// A convolution's patches (`(k, stride, pad)`): output and input gradient.
pub fn check_im2col<B: AutodiffBackend>(
    shape: [usize; 4],
    (k, s, p): (usize, usize, usize),
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use crate::kernels::im2col::out_size;
    let [b, h, w, c] = shape;
    let rows = out_size(h, k, s, p) * out_size(w, k, s, p);
    let data = [random(shape), random([b, rows, k * k * c])];
    Ok(KernelCheck::new(
        "im2col",
        format!("x {shape:?}, k {k}, stride {s}, pad {p}"),
        &["output", "grad x"],
        im2col_run::<B>(&data, (k, s, p), true, device)?,
        im2col_run::<Reference>(&data, (k, s, p), false, &Default::default())?,
    ))
}

fn im2col_run<B: AutodiffBackend>(
    [x, probe]: &[TensorData; 2],
    (k, s, p): (usize, usize, usize),
    fast: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::im2col::{fused, im2col_reference};
    let x = on::<B, 4>(x, device).require_grad();
    let y = if fast {
        fused(x.clone(), k, s, p)
            .map_err(|_| anyhow::anyhow!("the im2col kernel did not run on this backend"))?
    } else {
        im2col_reference(x.clone(), k, s, p)
    };
    let grads = (y.clone() * on::<B, 3>(probe, device)).sum().backward();
    Ok(vec![
        y.into_data(),
        x.grad(&grads).expect("x gradient").into_data(),
    ])
}

/// LSAGT's local attention: output, query gradient and key/value gradient.
pub fn check_local_attention<B: AutodiffBackend>(
    [b, n]: [usize; 2],
    t: usize,
    h: crate::kernels::local_attention::LocalHeads,
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let data = exact_in(
        [
            random([b, n, h.heads * h.head_dim]),
            random([t, b, n, 2 * h.kv_heads * h.head_dim]),
            random([b, n, h.heads * h.head_dim]),
        ],
        bf16,
    );
    Ok(KernelCheck::new(
        "local_attention",
        format!(
            "T {t}, heads {}/{} of {}{}",
            h.heads,
            h.kv_heads,
            h.head_dim,
            bf16_suffix(bf16)
        ),
        &["output", "grad q", "grad kv"],
        local_attention_run::<B>(&data, h, true, bf16, device)?,
        local_attention_run::<Reference>(&data, h, false, false, &Default::default())?,
    ))
}

fn local_attention_run<B: AutodiffBackend>(
    [q, kv, probe]: &[TensorData; 3],
    h: crate::kernels::local_attention::LocalHeads,
    fast: bool,
    bf16: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::kernels::local_attention::{fused, local_attention_reference};
    let q = in_dtype(on::<B, 3>(q, device), bf16).require_grad();
    let kv = in_dtype(on::<B, 4>(kv, device), bf16).require_grad();
    let y = if fast {
        fused(q.clone(), kv.clone(), h)
            .map_err(|_| anyhow::anyhow!("the local attention kernel did not run on this backend"))?
    } else {
        local_attention_reference(q.clone(), kv.clone(), h)
    };
    let grads = (y.clone() * in_dtype(on::<B, 3>(probe, device), bf16))
        .sum()
        .backward();
    Ok(vec![
        y.into_data(),
        q.grad(&grads).expect("q gradient").into_data(),
        kv.grad(&grads).expect("kv gradient").into_data(),
    ])
}

/// LSAGT's shifted patches: the output (the fused path has no gradient: the image takes none).
pub fn check_patches<B: Backend>(
    [b, p, c]: [usize; 3],
    [t, n, taps]: [usize; 3],
    width: usize,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use crate::kernels::patches::{fused, shifted_patches_reference};
    let pixels = random([b, p, c]);
    // Every pixel number and the padding's (`p`), in a scrambled order.
    let index: Vec<i64> = (0..t * n * taps)
        .map(|i| ((i * 7 + 3) % (p + 1)) as i64)
        .collect();
    let fast = fused(on::<B, 3>(&pixels, device), &index, [t, n, taps], width)
        .map_err(|_| anyhow::anyhow!("the patches kernel did not run on this backend"))?;
    let reference = shifted_patches_reference(
        on::<crate::backend::Cpu, 3>(&pixels, &Default::default()),
        &index,
        [t, n, taps],
        width,
    );
    Ok(KernelCheck::new(
        "patches",
        format!("{t}x{b}x{n} of {taps}x{c} in {width}"),
        &["output"],
        vec![fast.into_data()],
        vec![reference.into_data()],
    ))
}

/// The differentiable stack of `count` same-shaped tensors: output and every input's gradient
/// (stacked for the comparison).
pub fn check_stack<B: AutodiffBackend>(
    count: usize,
    shape: [usize; 2],
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let inputs: Vec<TensorData> = (0..count).map(|_| random(shape)).collect();
    let probe = random([count, shape[0], shape[1]]);
    Ok(KernelCheck::new(
        "stack",
        format!("{count} x {shape:?}"),
        &["output", "grads"],
        stack_run::<B>(&inputs, &probe, true, device)?,
        stack_run::<Reference>(&inputs, &probe, false, &Default::default())?,
    ))
}

fn stack_run<B: AutodiffBackend>(
    inputs: &[TensorData],
    probe: &TensorData,
    fast: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    let xs: Vec<Tensor<B, 2>> = inputs
        .iter()
        .map(|d| on::<B, 2>(d, device).require_grad())
        .collect();
    let y: Tensor<B, 3> = if fast {
        crate::kernels::concat::stack(xs.clone())
            .map_err(|_| anyhow::anyhow!("the stack kernel did not run on this backend"))?
    } else {
        Tensor::stack(xs.clone(), 0)
    };
    let grads = (y.clone() * on::<B, 3>(probe, device)).sum().backward();
    let dxs: Vec<_> = xs
        .iter()
        .map(|x| x.grad(&grads).expect("input gradient"))
        .collect();
    Ok(vec![y.into_data(), Tensor::stack::<3>(dxs, 0).into_data()])
}

/// The optimizer's flat gather: parts of uneven lengths at offsets rounded up to 256 values, the
/// gaps zero (compared as part of the buffer).
pub fn check_concat<B: Backend>(lens: &[usize], device: &B::Device) -> anyhow::Result<KernelCheck> {
    use crate::kernels::concat::{concat_flat_reference, fused};
    let mut offsets = Vec::with_capacity(lens.len());
    let mut len = 0;
    for &n in lens {
        offsets.push(len);
        len += n.max(1).next_multiple_of(256);
    }
    let data: Vec<TensorData> = lens.iter().map(|&n| random([n])).collect();
    let parts = |d: &B::Device| data.iter().map(|t| on::<B, 1>(t, d)).collect::<Vec<_>>();
    let got = fused(parts(device), &offsets, len)
        .map_err(|_| anyhow::anyhow!("the concat kernel did not run on this backend"))?;
    let cpu = Default::default();
    let cpu_parts = data
        .iter()
        .map(|t| on::<crate::backend::Cpu, 1>(t, &cpu))
        .collect();
    let want = concat_flat_reference(cpu_parts, &offsets, len);
    Ok(KernelCheck::new(
        "concat",
        format!("{} parts, {len} values", lens.len()),
        &["buffer"],
        vec![got.into_data()],
        vec![want.into_data()],
    ))
}

/// The vicinity attention core: output and the gradients of queries, keys and values.
pub fn check_vicinity<B: AutodiffBackend>(
    batch: usize,
    head_dim: usize,
    cfg: VicinityCore,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    let c = cfg.heads * head_dim;
    let (n, m) = (cfg.q_grid.0 * cfg.q_grid.1, cfg.k_grid.0 * cfg.k_grid.1);
    // Non-negative queries and keys, as after the model's ReLU.
    let abs = |d: TensorData| -> TensorData {
        Tensor::<crate::backend::Cpu, 3>::from_data(d, &Default::default())
            .abs()
            .into_data()
    };
    let data = [
        abs(random([batch, n, c])),
        abs(random([batch, m, c])),
        random([batch, m, c]),
        random([batch, n, c]),
    ];
    Ok(KernelCheck::new(
        "vicinity_core",
        format!(
            "{}x{} <- {}x{}, {}x{}, {:?}{}",
            cfg.q_grid.0,
            cfg.q_grid.1,
            cfg.k_grid.0,
            cfg.k_grid.1,
            cfg.heads,
            head_dim,
            cfg.locality,
            if cfg.clamp { ", clamp" } else { "" }
        ),
        &["output", "grad q", "grad k", "grad v"],
        vicinity_run::<B>(&data, cfg, true, device)?,
        vicinity_run::<Reference>(&data, cfg, false, &Default::default())?,
    ))
}

/// The models' real shapes: VVT-Tiny's attention cores at 224² (head widths 48, 40, 32 on 56²,
/// 28², 14² grids), LayerNorm widths 160–768, LSAGT's local attention (18 variants, head width 48).
pub fn check_real_shapes<B: AutodiffBackend>(device: &B::Device) -> anyhow::Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for (heads, d, side) in [(1, 48, 56), (2, 40, 28), (5, 32, 14)] {
        let cfg = VicinityCore {
            heads,
            q_grid: (side, side),
            k_grid: (side, side),
            locality: Locality::TwoD,
            clamp: true,
        };
        out.push(check_vicinity::<B>(1, d, cfg, device)?);
    }
    for c in [160, 192, 320, 384, 512, 768] {
        out.push(check_layer_norm::<B>([2, 37, c], false, device)?);
    }
    let h = crate::kernels::local_attention::LocalHeads {
        heads: 4,
        kv_heads: 1,
        head_dim: 48,
    };
    out.push(check_local_attention::<B>([2, 64], 18, h, false, device)?);
    Ok(out)
}

/// A small VVT (spatial reduction in stage 1) and a small LSAGT (CIFAR shift scheme: the local
/// attention, global attention, a stage reduction), without stochastic depth.
pub fn small_models() -> Vec<crate::models::ModelConfig> {
    let vvt = r#"{"family": "vvt", "embed_dims": [16, 32, 32, 32], "heads": [1, 2, 2, 2],
        "mlp_ratios": [2, 2, 2, 2], "depths": [1, 1, 1, 1], "sr_ratios": [2, 1, 1, 1],
        "fr_ratios": [2, 2, 2, 2], "num_classes": 5, "img_size": 64, "drop_path": 0.0}"#;
    let lsagt = r#"{"family": "lsagt", "scheme": "cifar", "image_size": 8, "dims": [[16, 24], [24, 24]],
        "heads": [2, 3], "layers": [2, 1], "num_classes": 5, "kernel": 3, "stride": 1,
        "padding": 1, "drop_path": 0.0}"#;
    [vvt, lsagt]
        .iter()
        .map(|j| serde_json::from_str(j).expect("a valid model config"))
        .collect()
}

/// A whole model's forward and backward on backend `B` against the CPU backend with the same
/// weights: logits, the input's gradient and every parameter's (all concatenated).
pub fn check_model<B: AutodiffBackend>(
    config: &crate::models::ModelConfig,
    batch: usize,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use burn::module::AutodiffModule;
    let reference = config.init::<Reference>(&Default::default())?;
    let bytes = crate::weights::native_bytes(&reference.valid(), config)?;
    let fused = crate::weights::load_native_bytes(config.init::<B>(device)?, bytes, "the reference model")?;
    let res = config.default_resolution();
    let data = [
        random([batch, 3, res, res]),
        random([batch, config.num_classes()]),
    ];
    let name = match config {
        crate::models::ModelConfig::Vvt(_) => "vvt",
        crate::models::ModelConfig::Lsagt(_) => "lsagt",
    };
    // On CUDA the model's kernels are compiled ahead, together (the path of the trainer's and the
    // bench's first step), so the comparison below covers the modules built that way.
    let ahead = crate::backend::compile_ahead::<B>(device, || {
        let _ = model_run::<B>(&fused, &data, device);
    })?;
    if let Some(a) = ahead {
        eprintln!(
            "{name} {res}x{res}: {} kernels compiled ahead in {:.1} s ({} threads)",
            a.kernels,
            a.pass_s + a.wait_s,
            a.threads
        );
    }
    Ok(KernelCheck::new(
        "model",
        format!("{name} {res}x{res}, batch {batch}"),
        &["logits", "grad input", "grad params"],
        model_run::<B>(&fused, &data, device),
        model_run::<Reference>(&reference, &data, &Default::default()),
    ))
}

fn model_run<B: AutodiffBackend>(
    model: &crate::models::Model<B>,
    [x, probe]: &[TensorData; 2],
    device: &B::Device,
) -> Vec<TensorData> {
    use burn::module::{Module, ModuleVisitor, Param};
    let x = on::<B, 4>(x, device).require_grad();
    let y = model.forward(x.clone());
    let grads = (y.clone() * on::<B, 2>(probe, device)).sum().backward();
    struct Grads<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        values: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                let v = g.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
                self.values.extend(v);
            }
        }
    }
    let mut visitor = Grads::<B> {
        grads: &grads,
        values: Vec::new(),
    };
    model.visit(&mut visitor);
    let n = visitor.values.len();
    vec![
        y.into_data(),
        x.grad(&grads).expect("input gradient").into_data(),
        TensorData::new(visitor.values, [n]),
    ]
}

fn vicinity_run<B: AutodiffBackend>(
    [q, k, v, probe]: &[TensorData; 4],
    cfg: VicinityCore,
    fast: bool,
    device: &B::Device,
) -> anyhow::Result<Vec<TensorData>> {
    use crate::attention::vicinity::{linear_core, vicinity_core};
    let (q, k, v) = (
        on::<B, 3>(q, device).require_grad(),
        on::<B, 3>(k, device).require_grad(),
        on::<B, 3>(v, device).require_grad(),
    );
    let y = if fast {
        anyhow::ensure!(
            crate::kernels::available::<B>(),
            "the vicinity kernels do not run on this backend"
        );
        vicinity_core(q.clone(), k.clone(), v.clone(), cfg)
    } else {
        linear_core(q.clone(), k.clone(), v.clone(), cfg)
    };
    let grads = (y.clone() * on::<B, 3>(probe, device)).sum().backward();
    Ok(vec![
        y.into_data(),
        q.grad(&grads).expect("q gradient").into_data(),
        k.grad(&grads).expect("k gradient").into_data(),
        v.grad(&grads).expect("v gradient").into_data(),
    ])
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;

    type G = burn::backend::Autodiff<burn::backend::Wgpu>;

    /// Whether this machine has a WebGPU adapter (a GPU, or Mesa's software Vulkan driver); where
    /// it has none the test says so on stderr (uncaptured, so it shows in every run) and passes.
    fn adapter(test: &str) -> bool {
        use std::io::Write;
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let present = *PRESENT.get_or_init(|| {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let found = std::panic::catch_unwind(|| {
                let device = Default::default();
                let _ = Tensor::<burn::backend::Wgpu, 1>::zeros([1], &device).into_data();
            })
            .is_ok();
            std::panic::set_hook(hook);
            found
        });
        if !present {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no WebGPU adapter on this machine (install Mesa's software Vulkan driver, \
                 `apt-get install mesa-vulkan-drivers`, to run the fused-kernel tests on the CPU)"
            );
        }
        present
    }

    /// Rows wider than the row kernels take (GCNet's context over a 1024² image's first stage)
    /// go to the reference path, and the dispatcher's result is still the softmax.
    #[test]
    fn rows_wider_than_the_kernels_take_use_the_reference() {
        if !adapter("rows_wider_than_the_kernels_take_use_the_reference") {
            return;
        }
        use crate::kernels::softmax::{fused, softmax_scaled, softmax_scaled_reference};
        type Inner = <G as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let device = Default::default();
        let wide = crate::kernels::rows::MAX_WIDTH + 4;
        let x = Tensor::<Inner, 2>::random([2, wide], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        assert!(
            fused(x.clone(), 0.5).is_err(),
            "a {wide}-wide row went to the kernel"
        );
        let (gamma, beta) = (Tensor::ones([wide], &device), Tensor::zeros([wide], &device));
        let norm = crate::kernels::layer_norm::fused(x.clone(), gamma, beta, 1e-6);
        assert!(norm.is_err(), "a {wide}-wide LayerNorm row went to the kernel");
        let (a, b) = (softmax_scaled(x.clone(), 0.5), softmax_scaled_reference(x, 0.5));
        let d: f32 = (a - b).abs().max().into_scalar();
        assert!(d < 1e-7, "max diff {d}");
    }

    #[test]
    fn kernels_at_the_models_real_shapes_match_reference_on_wgpu() {
        if !adapter("kernels_at_the_models_real_shapes_match_reference_on_wgpu") {
            return;
        }
        let checks = check_real_shapes::<G>(&Default::default()).expect("fused kernels run on wgpu");
        eprint!("{}", table(&checks));
        for c in &checks {
            assert!(c.worst() < 1e-4, "{} {}: {:?}", c.kernel, c.case, c.errors);
        }
    }

    /// Whole models, forward and backward, with every fused kernel against the plain CPU path.
    /// Gradients get 1e-3: the models' kinks (ReLU features, the magnitude clamps, max-pools) can
    /// put a value a rounding error away on the other side of a branch in one run of many (seen
    /// once at 2.4e-4, against ~1e-6 otherwise); a wrong kernel is off by far more.
    #[test]
    fn whole_models_match_the_plain_path_on_wgpu() {
        if !adapter("whole_models_match_the_plain_path_on_wgpu") {
            return;
        }
        for config in small_models() {
            let c = check_model::<G>(&config, 2, &Default::default()).expect("models run on wgpu");
            eprint!("{}", table(std::slice::from_ref(&c)));
            for &(what, err) in &c.errors {
                let tolerance = if what == "logits" { 1e-4 } else { 1e-3 };
                assert!(err < tolerance, "{} {what}: {err} ({:?})", c.case, c.errors);
            }
        }
    }

    #[test]
    fn fused_kernels_match_reference_on_wgpu() {
        if !adapter("fused_kernels_match_reference_on_wgpu") {
            return;
        }
        let device = Default::default();
        let checks = check_all::<G>(&device).expect("fused kernels run on wgpu");
        assert!(!checks.is_empty());
        eprint!("{}", table(&checks));
        for c in &checks {
            assert!(c.worst() < 1e-4, "{} {}: {:?}", c.kernel, c.case, c.errors);
        }
    }

    /// Slices whose start is aligned and whose end is not are views (the vendored burn-cubecl's
    /// patch): as the optimizer's per-parameter views of its flat buffers, they must read and
    /// compute like copies, also reshaped and in products.
    #[test]
    fn slices_with_unaligned_ends_read_like_copies() {
        if !adapter("slices_with_unaligned_ends_read_like_copies") {
            return;
        }
        let device = Default::default();
        let host: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let buf = Tensor::<burn::backend::Wgpu, 1>::from_floats(host.as_slice(), &device);
        for range in [0..999, 256..262, 0..7, 512..1000] {
            let got = (buf.clone().slice(range.clone()) * 2.0 + 1.0)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let want: Vec<f32> = host[range.clone()].iter().map(|v| v * 2.0 + 1.0).collect();
            assert_eq!(got, want, "slice {range:?}");
        }
        // A 6×5 weight viewed at offset 256, in a product.
        let w = buf.clone().slice(256..286).reshape([6, 5]);
        let x = Tensor::<burn::backend::Wgpu, 2>::ones([2, 6], &device);
        let got = x.matmul(w).into_data().to_vec::<f32>().unwrap();
        let want: Vec<f32> = (0..10)
            .map(|j| (0..6).map(|i| host[256 + i * 5 + j % 5]).sum())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{got:?} against {want:?}");
        }
    }

    #[test]
    fn layer_norm_spills_into_a_second_cube_axis() {
        if !adapter("layer_norm_spills_into_a_second_cube_axis") {
            return;
        }
        // More than 65,535 cubes of 8 rows: the launch spills into a second axis (WebGPU's limit).
        let c =
            check_layer_norm::<G>([1, 65_535 * 8 + 40, 2], false, &Default::default()).expect("runs on wgpu");
        // A row lost or read twice at the spill is an O(1) error. Gamma's and beta's gradients
        // are f32 sums over 524k random-sign rows, whose rounding alone reaches ~1e-4 relative.
        for (what, err) in &c.errors {
            let tol = if what.starts_with("grad gamma") || what.starts_with("grad beta") {
                1e-3
            } else {
                1e-4
            };
            assert!(*err < tol, "{what}: {err:.2e} ≥ {tol:.0e} ({:?})", c.errors);
        }
    }

    #[test]
    fn cached_position_features_follow_the_grid_and_locality() {
        if !adapter("cached_position_features_follow_the_grid_and_locality") {
            return;
        }
        // The fused core builds each grid's features once; a later core on the same grid with
        // another locality, or on a transposed grid, must not get them.
        let device = Default::default();
        for (grid, locality) in [
            ((3, 4), Locality::TwoD),
            ((3, 4), Locality::OneD),
            ((4, 3), Locality::TwoD),
            ((3, 4), Locality::TwoD),
        ] {
            let cfg = VicinityCore {
                heads: 1,
                q_grid: grid,
                k_grid: grid,
                locality,
                clamp: true,
            };
            let c = check_vicinity::<G>(2, 4, cfg, &device).expect("vicinity kernels run on wgpu");
            assert!(c.worst() < 1e-4, "{grid:?} {locality:?}: {:?}", c.errors);
        }
    }

    #[test]
    fn reference_backends_have_no_fused_kernels() {
        if !adapter("reference_backends_have_no_fused_kernels") {
            return;
        }
        assert!(!crate::kernels::available::<crate::backend::Cpu>());
        assert!(crate::kernels::available::<G>());
        assert!(check_all::<burn::backend::Autodiff<crate::backend::Cpu>>(&Default::default()).is_err());
    }
}
