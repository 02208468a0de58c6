//! `vicinity check-kernels`: every fused kernel against its reference path on the GPU.

use anyhow::Result;
use clap::Args;

use crate::backend::BackendKind;

/// `vicinity check-kernels`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Largest relative L2 error accepted for f32 cases (bf16 cases: 2e-2).
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
}

/// Runs the checks on CUDA and prints their table; fails above the tolerance.
pub fn check_command(a: &CheckArgs, backend: BackendKind) -> Result<()> {
    #[cfg(feature = "cuda")]
    if backend == BackendKind::Cuda {
        use crate::check;
        type G = burn::backend::Autodiff<crate::backend::Gpu>;
        let mut checks = check::check_all::<G>(&Default::default())?;
        checks.extend(check::check_bf16::<G>(&Default::default())?);
        print!("{}", check::table(&checks));
        let limit = |c: &check::KernelCheck| {
            if c.case.ends_with("bf16") {
                check::BF16_TOLERANCE
            } else {
                a.tolerance
            }
        };
        let failed = checks.iter().filter(|c| c.worst() > limit(c)).count();
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} checks above the tolerance {:e}",
            checks.len(),
            a.tolerance
        );
        let cublas = crate::kernels::cublas::stats().taken;
        println!("products taken by cuBLAS: {cublas}");
        anyhow::ensure!(
            cublas > 0 || !crate::kernels::cublas::install(),
            "cuBLAS is installed but took none of the checked products"
        );
        return Ok(());
    }
    let _ = a;
    anyhow::bail!(
        "the fused kernels run on the GPU (`--backend cuda` in a build with `--features cuda`); backend {backend:?} uses the reference paths"
    )
}
