//! The `vicinity` command line: parses arguments, picks the backend and calls into [`vicinity::cli`].

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::Backend;
use clap::{Parser, Subcommand};
use vicinity::backend::BackendKind;
use vicinity::{bench, cli};

#[derive(Parser)]
#[command(
    name = "vicinity",
    version,
    about = "VVT and LSAGT vision transformers on Burn"
)]
struct Args {
    /// Compute backend: cuda (GPU builds) or flex (CPU).
    #[arg(long, global = true, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Folder for compiled GPU kernels and autotune results (default: $VICINITY_CACHE or
    /// ~/.cache/vicinity); reusing it makes later starts take seconds instead of minutes.
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    /// GPU autotuning effort (binaries built with `--features autotune`): minimal, balanced
    /// (default), extensive or full.
    #[arg(long, global = true)]
    autotune: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the registered models with their parameters and GFLOPs.
    Models,
    /// Per-layer GFLOPs and parameters of one model.
    Flops {
        /// Registered model name or a .json/.toml config file.
        model: String,
        /// Input resolution (square); defaults to the model's own.
        #[arg(long)]
        resolution: Option<usize>,
        /// Only print the total.
        #[arg(long)]
        total: bool,
    },
    /// Run a model and write logits and every stage's tokens (stage1..K) to a safetensors file.
    Features {
        /// Registered model name or a .json/.toml config file (optional with native weights).
        #[arg(long)]
        model: Option<String>,
        /// Official .pth checkpoint or native .safetensors weights.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Image files, or one .safetensors file holding a B×3×H×W tensor named `input`.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Resize images to this resolution (defaults to the model's own).
        #[arg(long)]
        resolution: Option<usize>,
        #[arg(long, short, default_value = "features.safetensors")]
        output: PathBuf,
    },
    /// Training and inference throughput on synthetic data (first step timed on its own).
    Bench(Box<BenchArgs>),
    /// Train a model (`--quick`: a short CPU demo on synthetic shapes). See docs/TRAINING.md.
    Train(Box<vicinity::train::TrainArgs>),
    /// Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset split.
    Eval(vicinity::train::EvalArgs),
    /// Top-5 classes (with probabilities) of image files.
    Predict(vicinity::train::PredictArgs),
    /// Relative L2 error of every tensor two safetensors files share (exit code 1 above tolerance).
    Compare {
        actual: PathBuf,
        expected: PathBuf,
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
    },
    /// Convert an official .pth checkpoint to native safetensors (configuration included).
    /// Checks every fused GPU kernel against its reference path (values and gradients, random inputs).
    CheckKernels {
        /// Largest relative L2 error accepted.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f32,
    },
    Convert {
        #[arg(long)]
        model: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
    },
}

/// Calls `$body` with `B` bound to the autodiff backend of (`$backend`, `$dtype`).
macro_rules! with_dtype {
    ($backend:expr, $dtype:expr, |$b:ident| $body:expr) => {{
        match ($backend, AsRef::<str>::as_ref($dtype)) {
            (BackendKind::Flex, "f32") => {
                type $b = burn::backend::Autodiff<vicinity::backend::Cpu>;
                $body
            }
            #[cfg(feature = "cuda")]
            (BackendKind::Cuda, "f32") => {
                type $b = burn::backend::Autodiff<vicinity::backend::Gpu>;
                $body
            }
            #[cfg(feature = "cuda")]
            (BackendKind::Cuda, "bf16") => {
                type $b = burn::backend::Autodiff<burn::backend::Cuda<burn::tensor::bf16, i32>>;
                $body
            }
            (b, d) => {
                anyhow::bail!("dtype {d} is not available on backend {b:?} (f32 everywhere, bf16 on cuda)")
            }
        }
    }};
}

/// `vicinity bench`: see docs/BENCH.md.
#[derive(clap::Args)]
struct BenchArgs {
    /// Registered model names or config files.
    #[arg(long, num_args = 1..)]
    model: Vec<String>,
    /// Time one attention layer alone instead of (or as well as) whole models; `--resolution` /
    /// `--sweep-res` then give the side of the token grid (N = side²).
    #[arg(long, value_enum, num_args = 1..)]
    attention: Vec<bench::attention::AttentionKind>,
    /// Channels of the attention-only layer (VVT-T stage 1: 64).
    #[arg(long, default_value_t = 64)]
    attention_dim: usize,
    #[arg(long, default_value_t = 1)]
    attention_heads: usize,
    /// Input resolution (square); defaults to the model's own.
    #[arg(long)]
    resolution: Option<usize>,
    /// Several resolutions, e.g. `224,384,512,768` (overrides --resolution).
    #[arg(long, value_delimiter = ',')]
    sweep_res: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, value_enum, num_args = 1.., default_values = ["train", "infer"])]
    mode: Vec<bench::Mode>,
    /// f32, or bf16 (CUDA only; the whole model runs in bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also append each row as a JSON line to this file (as it finishes).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write bench.csv, bench.jsonl and a bench.png chart (speed and memory against resolution)
    /// into this folder at the end.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let backend = args.backend.resolve()?;
    if backend == BackendKind::Cuda {
        let dir = vicinity::backend::cache_dir(args.cache_dir.as_deref());
        vicinity::backend::configure_gpu_cache(&dir, args.autotune.as_deref())?;
        // Matrix products through cuBLAS where the library loads (a note says when it does not).
        vicinity::kernels::cublas::install();
    }
    let args = match args.command {
        Command::Train(a) => return vicinity::train::train_command(*a, backend),
        Command::Eval(a) => return vicinity::train::eval_command(a, backend),
        Command::Predict(a) => return vicinity::train::predict_command(a, backend),
        command => Args { command, ..args },
    };
    if let Command::Bench(a) = args.command {
        return run_bench(backend, *a);
    }
    if let Command::CheckKernels { tolerance } = args.command {
        return check_kernels(backend, tolerance);
    }
    match backend {
        BackendKind::Flex => dispatch::<vicinity::backend::Cpu>(args.command, &Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => dispatch::<vicinity::backend::Gpu>(args.command, &Default::default()),
        other => anyhow::bail!("backend {other:?} is not available in this build"),
    }
}

fn check_kernels(backend: BackendKind, tolerance: f32) -> Result<()> {
    #[cfg(feature = "cuda")]
    if backend == BackendKind::Cuda {
        use vicinity::kernels::check;
        type G = burn::backend::Autodiff<vicinity::backend::Gpu>;
        let mut checks = check::check_all::<G>(&Default::default())?;
        checks.extend(check::check_bf16::<G>(&Default::default())?);
        print!("{}", check::table(&checks));
        let limit = |c: &check::KernelCheck| {
            if c.case.ends_with("bf16") {
                check::BF16_TOLERANCE
            } else {
                tolerance
            }
        };
        let failed = checks.iter().filter(|c| c.worst() > limit(c)).count();
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} checks above the tolerance {tolerance:e}",
            checks.len()
        );
        let cublas = vicinity::kernels::cublas::stats().taken;
        println!("products taken by cuBLAS: {cublas}");
        anyhow::ensure!(
            cublas > 0 || !vicinity::kernels::cublas::install(),
            "cuBLAS is installed but took none of the checked products"
        );
        return Ok(());
    }
    let _ = tolerance;
    anyhow::bail!(
        "the fused kernels run on the GPU (`--backend cuda` in a build with `--features cuda`); backend {backend:?} uses the reference paths"
    )
}

fn dispatch<B: Backend>(command: Command, device: &B::Device) -> Result<()> {
    match command {
        Command::Models => print!("{}", cli::list_models()?),
        Command::Flops {
            model,
            resolution,
            total,
        } => {
            let config = vicinity::models::resolve_config(&model)?;
            let res = resolution.unwrap_or_else(|| config.default_resolution());
            print!("{}", cli::flops_table(&config, res, !total)?);
        }
        Command::Features {
            model,
            weights,
            input,
            resolution,
            output,
        } => {
            let input = match input.as_slice() {
                [one] if one.extension().is_some_and(|e| e == "safetensors") => {
                    cli::FeatureInput::Tensor(one.clone())
                }
                _ => cli::FeatureInput::Images(input),
            };
            let msg = cli::features::<B>(
                model.as_deref(),
                weights.as_deref(),
                input,
                resolution,
                &output,
                device,
            )?;
            println!("{msg}");
        }
        Command::Bench(_) => unreachable!("handled by run_bench"),
        Command::Compare {
            actual,
            expected,
            tolerance,
        } => {
            let (table, ok) = cli::compare(&actual, &expected, tolerance)?;
            print!("{table}");
            if !ok {
                std::process::exit(1);
            }
        }
        Command::Train(_) | Command::Eval(_) | Command::Predict(_) | Command::CheckKernels { .. } => {
            unreachable!("handled in run")
        }
        Command::Convert {
            model,
            weights,
            output,
        } => {
            let (config, m) = cli::build_model::<B>(Some(&model), Some(&weights), device)?;
            vicinity::weights::save_native(&m, &config, &output)?;
            println!("wrote {}", output.display());
        }
    }
    Ok(())
}

fn run_bench(backend: BackendKind, a: BenchArgs) -> Result<()> {
    let gpu = backend == BackendKind::Cuda;
    let mut rows = Vec::new();
    let mut push = |row: bench::BenchRow| -> Result<()> {
        eprintln!(
            "{}",
            bench::table(std::slice::from_ref(&row))
                .lines()
                .nth(1)
                .unwrap_or_default()
        );
        if let Some(path) = &a.json {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{}", serde_json::to_string(&row)?)?;
        }
        rows.push(row);
        Ok(())
    };
    anyhow::ensure!(
        !a.model.is_empty() || !a.attention.is_empty(),
        "name at least one --model (see `vicinity models`) or --attention kind"
    );
    for name in &a.model {
        let config = vicinity::models::resolve_config(name)?;
        let resolutions = match (&a.sweep_res[..], a.resolution) {
            ([], res) => vec![res.unwrap_or_else(|| config.default_resolution())],
            (sweep, _) => sweep.to_vec(),
        };
        for res in resolutions {
            for &mode in &a.mode {
                let spec = bench::BenchSpec {
                    name,
                    config: &config,
                    mode,
                    dtype: &a.dtype,
                    resolution: res,
                    batch: a.batch,
                    warmup: a.warmup,
                    iters: a.iters,
                    gpu,
                };
                push(with_dtype!(backend, &a.dtype, |B| bench::run::<B>(
                    &spec,
                    &Default::default()
                ))?)?;
            }
        }
    }
    for &kind in &a.attention {
        let sides = match (&a.sweep_res[..], a.resolution) {
            ([], res) => vec![res.unwrap_or(56)],
            (sweep, _) => sweep.to_vec(),
        };
        for side in sides {
            for &mode in &a.mode {
                let spec = bench::attention::AttentionSpec {
                    kind,
                    side,
                    batch: a.batch,
                    dim: a.attention_dim,
                    heads: a.attention_heads,
                    variants: 18,
                    mode,
                    dtype: a.dtype.clone(),
                    warmup: a.warmup,
                    iters: a.iters,
                    gpu,
                };
                push(with_dtype!(backend, &a.dtype, |B| {
                    bench::attention::run_attention::<B>(&spec, &Default::default())
                })?)?;
            }
        }
    }
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir)?;
        vicinity::weights::write_atomic(&dir.join("bench.csv"), bench::csv(&rows).as_bytes())?;
        let jsonl: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        vicinity::weights::write_atomic(&dir.join("bench.jsonl"), jsonl.as_bytes())?;
        vicinity::weights::write_atomic(&dir.join("bench.png"), &bench::sweep_png(&rows)?)?;
        eprintln!("wrote {}/bench.{{csv,jsonl,png}}", dir.display());
    }
    print!("{}", bench::table(&rows));
    Ok(())
}
