//! `vicinity check-kernels`: every fused kernel against its reference path on the GPU.

use anyhow::Result;
use clap::Args;

use super::Matmul;
use crate::backend::BackendKind;

/// `vicinity check-kernels`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Largest relative L2 error accepted for f32 kernel cases (bf16 cases: 2e-2; whole models:
    /// 1e-2).
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
}

/// Largest relative L2 error accepted for a whole small model's logits and gradients.
#[cfg(feature = "cuda")]
const MODEL_TOLERANCE: f32 = 1e-2;

/// Runs the checks on CUDA and prints their table; fails above the tolerance, or when cuBLAS was
/// asked for (`--matmul cublas`, the default) and loaded but took no product.
pub fn check_command(a: &CheckArgs, backend: BackendKind, matmul: Matmul) -> Result<()> {
    #[cfg(feature = "cuda")]
    if backend == BackendKind::Cuda {
        use crate::check;
        type G = burn::backend::Autodiff<crate::backend::Gpu>;
        let device = Default::default();
        let mut checks = check::check_all::<G>(&device)?;
        checks.extend(check::check_real_shapes::<G>(&device)?);
        checks.extend(check::check_bf16::<G>(&device)?);
        for config in check::small_models() {
            checks.push(check::check_model::<G>(&config, 2, &device)?);
        }
        print!("{}", check::table(&checks));
        let limit = |c: &check::KernelCheck| {
            if c.case.ends_with("bf16") {
                check::BF16_TOLERANCE
            } else if c.kernel == "model" {
                // A whole model compounds every product's rounding (cuBLAS against exact f32).
                MODEL_TOLERANCE
            } else {
                a.tolerance
            }
        };
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| c.worst() > limit(c))
            .map(|c| format!("{} {} ({:.2e} > {:.0e})", c.kernel, c.case, c.worst(), limit(c)))
            .collect();
        anyhow::ensure!(
            failed.is_empty(),
            "{} of {} checks above their tolerance: {}",
            failed.len(),
            checks.len(),
            failed.join("; ")
        );
        let cublas = crate::kernels::cublas::stats().taken;
        println!("products taken by cuBLAS: {cublas}");
        anyhow::ensure!(
            cublas > 0 || matmul == Matmul::Cubecl || !crate::kernels::cublas::install(),
            "cuBLAS is installed but took none of the checked products"
        );
        return Ok(());
    }
    let _ = (a, matmul);
    anyhow::bail!(
        "the fused kernels run on the GPU (`--backend cuda` in a build with `--features cuda`); backend {backend:?} uses the reference paths"
    )
}
