//! The `vicinity` command line: every command's flags and its dispatch. `main.rs` calls [`main`].
//!
//! Commands that run a model pick the backend here ([`Settings`]): `cuda` where this build has
//! it and the machine has the driver, `flex` (CPU) otherwise. `models`, `flops` and `compare`
//! touch no device.

mod ablate;
mod bench;
mod check;
mod explain;
mod launch;
mod models;
mod segment;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

pub use bench::BenchArgs;
pub use check::CheckArgs;
pub use models::{
    CompareArgs, ConvertArgs, FeatureInput, FeaturesArgs, FlopsArgs, build_model, compare, features,
    flops_table, group_thousands, list_models,
};
pub use train::{EvalArgs, PredictArgs, TrainArgs};

use crate::backend::BackendKind;

/// VVT and LSAGT vision transformers on Burn: official checkpoints, training, evaluation,
/// benchmarks.
#[derive(Parser, Debug)]
#[command(name = "vicinity", version)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Command,
}

/// Where and how the model commands run.
#[derive(clap::Args, Debug)]
pub struct Settings {
    /// Compute backend: cuda (GPU builds) or flex (CPU); auto picks cuda where it can.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Folder for compiled GPU kernels and autotune results (default: $VICINITY_CACHE or
    /// ~/.cache/vicinity); reusing it makes later starts take seconds instead of minutes.
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    /// GPU autotuning effort (binaries built with `--features autotune`): minimal, balanced
    /// (default), extensive or full.
    #[arg(long, global = true)]
    pub autotune: Option<String>,
    /// Matrix products on CUDA: cublas (when libcublas loads) or CubeCL's own kernels.
    #[arg(long, global = true, value_enum, default_value = "cublas")]
    pub matmul: Matmul,
}

/// Who computes the matrix products on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Matmul {
    /// cuBLAS, loaded at run time (CubeCL's kernels where it is missing).
    Cublas,
    /// CubeCL's own matmul kernels.
    Cubecl,
}

impl Settings {
    /// The backend to run on, with the GPU's kernel cache and cuBLAS set up.
    pub fn prepare(&self) -> Result<BackendKind> {
        let backend = self.backend.resolve()?;
        if cfg!(feature = "cuda") && self.backend == BackendKind::Auto && backend == BackendKind::Flex {
            eprintln!("note: no NVIDIA driver found, so this runs on the CPU (--backend flex)");
        }
        if backend == BackendKind::Cuda {
            let dir = crate::backend::cache_dir(self.cache_dir.as_deref());
            crate::backend::configure_gpu_cache(&dir, self.autotune.as_deref())?;
            if self.matmul == Matmul::Cublas {
                crate::kernels::cublas::install();
            }
        }
        Ok(backend)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the registered models with their parameters and GFLOPs.
    Models,
    /// Per-layer GFLOPs and parameters of one model.
    Flops(FlopsArgs),
    /// Run a model and write logits and every stage's tokens (stage1..K) to a safetensors file.
    Features(FeaturesArgs),
    /// Convert an official .pth checkpoint to native safetensors (configuration included).
    Convert(ConvertArgs),
    /// Relative L2 error of every tensor two safetensors files share (exit code 1 above tolerance).
    Compare(CompareArgs),
    /// Training and inference throughput on synthetic data (first step timed on its own).
    Bench(Box<BenchArgs>),
    /// Train a model (`--quick`: a short CPU demo on synthetic shapes). See docs/TRAINING.md.
    Train(Box<TrainArgs>),
    /// Train several models under one recipe and write one table (the papers' ablations).
    Ablate(Box<ablate::AblateArgs>),
    /// Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset split.
    Eval(EvalArgs),
    /// Top-5 classes (with probabilities) of image files.
    Predict(PredictArgs),
    /// Check every fused GPU kernel against its reference path (values and gradients).
    CheckKernels(CheckArgs),
    /// Explanation maps of images: Grad-CAM per stage, locality and attention rows, LSAGT's variants.
    Explain(Box<explain::ExplainArgs>),
    /// Train a segmentation model (Semantic FPN or UPerNet on a VVT). See docs/SEGMENTATION.md.
    SegTrain(Box<segment::SegTrainArgs>),
    /// mIoU, mean and pixel accuracy and per-class IoU of a segmentation checkpoint on a split.
    SegEval(Box<segment::SegEvalArgs>),
    /// Segment image files: colour mask, label image and overlay per image.
    Segment(Box<segment::SegmentArgs>),
    /// Compose the Fashion-MNIST segmentation demo dataset (image/mask pairs).
    SegData(segment::SegDataArgs),
    /// Start the local ranks of a multi-GPU job, like torchrun: `launch --nproc 8 train ...`.
    /// See docs/DISTRIBUTED.md.
    Launch(launch::LaunchArgs),
}

/// Runs `$body` with `$b` bound to the autodiff backend that `$kind` names and `$device` to its
/// default device.
macro_rules! on_backend {
    ($kind:expr, |$b:ident, $device:ident| $body:expr) => {{
        match $kind {
            BackendKind::Flex => {
                type $b = burn::backend::Autodiff<crate::backend::Cpu>;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $b = burn::backend::Autodiff<crate::backend::Gpu>;
                let $device = crate::backend::gpu_device();
                $body
            }
            #[allow(unreachable_patterns)]
            other => anyhow::bail!("backend {other:?} is not available in this build"),
        }
    }};
}

/// Parses the command line, runs the command and turns an error into a message and exit code 1.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; `compare` above its tolerance exits with code 1.
pub fn run(cli: Cli) -> Result<ExitCode> {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    match &cli.command {
        Command::Models => print!("{}", list_models()?),
        Command::Flops(a) => models::flops_command(a)?,
        Command::Compare(a) => {
            if !models::compare_command(a)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::CheckKernels(a) => check::check_command(a, cli.settings.prepare()?, cli.settings.matmul)?,
        Command::SegData(a) => segment::seg_data_command(a)?,
        Command::Launch(a) => {
            let code = launch::launch_command(a, &cli.settings)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        command => {
            // Only `train` splits its work over the processes of a job; any other command would
            // run once per process, all writing the same files.
            if !matches!(command, Command::Train(_))
                && let Some(env) = crate::dist::DistEnv::from_env()?
            {
                anyhow::bail!(
                    "only `train` runs over several processes; this process is rank {} of {} (set by {:?}): \
                     run this command without a launcher",
                    env.rank,
                    env.world,
                    env.launcher
                );
            }
            let backend = cli.settings.prepare()?;
            on_backend!(backend, |B, device| match command {
                Command::Features(a) => models::features_command::<Inner<B>>(a, &device)?,
                Command::Convert(a) => models::convert_command::<Inner<B>>(a, &device)?,
                Command::Bench(a) => bench::bench_command::<B>(a, &device)?,
                Command::Train(a) => train::train_command::<B>(a, &device)?,
                Command::Ablate(a) => ablate::ablate_command::<B>(a, &device)?,
                Command::Eval(a) => train::eval_command::<Inner<B>>(a, &device)?,
                Command::Predict(a) => train::predict_command::<Inner<B>>(a, &device)?,
                Command::Explain(a) => explain::explain_command::<B>(a, &device)?,
                Command::SegTrain(a) => segment::seg_train_command::<B>(a, &device)?,
                Command::SegEval(a) => segment::seg_eval_command::<Inner<B>>(a, &device)?,
                Command::Segment(a) => segment::segment_command::<Inner<B>>(a, &device)?,
                Command::Models
                | Command::Flops(_)
                | Command::Compare(_)
                | Command::CheckKernels(_)
                | Command::SegData(_)
                | Command::Launch(_) => {
                    unreachable!("run without a backend")
                }
            })
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command says what it does in `vicinity --help` and in its own `--help`.
    #[test]
    fn every_command_has_its_own_description() {
        let cli = Cli::command();
        let mut seen = std::collections::HashSet::new();
        for sub in cli.get_subcommands() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty(), "{} has no description", sub.get_name());
            assert!(
                seen.insert(about.clone()),
                "{} repeats another's description",
                sub.get_name()
            );
        }
        assert_eq!(seen.len(), 17);
        let convert = cli.find_subcommand("convert").expect("convert");
        assert!(convert.get_about().unwrap().to_string().contains("official .pth"));
        let check = cli.find_subcommand("check-kernels").expect("check-kernels");
        assert!(
            check
                .get_about()
                .unwrap()
                .to_string()
                .contains("fused GPU kernel")
        );
    }
}
