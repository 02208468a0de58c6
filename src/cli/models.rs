//! `vicinity models`, `flops`, `features`, `convert` and `compare`: the registry, the cost model
//! and a model's outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::Args;

use crate::flops;
use crate::io;
use crate::models::{self, MODEL_NAMES, Model, ModelConfig};
use crate::weights;

/// `vicinity flops`.
#[derive(Args, Debug)]
pub struct FlopsArgs {
    /// Registered model name or a .json/.toml config file.
    pub model: String,
    /// Input resolution (square); defaults to the model's own.
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Only print the total.
    #[arg(long)]
    pub total: bool,
}

/// `vicinity features`.
#[derive(Args, Debug)]
pub struct FeaturesArgs {
    /// Registered model name or a .json/.toml config file (optional with native weights).
    #[arg(long)]
    pub model: Option<String>,
    /// Official .pth checkpoint or native .safetensors weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Image files, or one .safetensors file holding a B×3×H×W tensor named `input`.
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Resize images to this resolution (defaults to the model's own).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Output safetensors file.
    #[arg(long, short, default_value = "features.safetensors")]
    pub output: PathBuf,
}

/// `vicinity convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Registered model name or a .json/.toml config file the checkpoint belongs to.
    #[arg(long)]
    pub model: String,
    /// The official .pth checkpoint.
    #[arg(long)]
    pub weights: PathBuf,
    /// Native .safetensors file to write (configuration included).
    #[arg(long, short)]
    pub output: PathBuf,
}

/// `vicinity compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The safetensors file to check.
    pub actual: PathBuf,
    /// The safetensors file it should match.
    pub expected: PathBuf,
    /// Largest relative L2 error accepted (exit code 1 above it).
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
}

/// `vicinity flops`: prints the table.
pub fn flops_command(a: &FlopsArgs) -> Result<()> {
    let config = models::resolve_config(&a.model)?;
    let res = a.resolution.unwrap_or_else(|| config.default_resolution());
    print!("{}", flops_table(&config, res, !a.total)?);
    Ok(())
}

/// `vicinity features` on backend `B`.
pub fn features_command<B: Backend>(a: &FeaturesArgs, device: &B::Device) -> Result<()> {
    let input = match a.input.as_slice() {
        [one] if one.extension().is_some_and(|e| e == "safetensors") => FeatureInput::Tensor(one.clone()),
        _ => FeatureInput::Images(a.input.clone()),
    };
    if a.weights.is_none() {
        eprintln!("note: no --weights given: these are the features of randomly initialised weights");
    }
    let msg = features::<B>(
        a.model.as_deref(),
        a.weights.as_deref(),
        input,
        a.resolution,
        &a.output,
        device,
    )?;
    println!("{msg}");
    Ok(())
}

/// `vicinity convert` on backend `B`.
pub fn convert_command<B: Backend>(a: &ConvertArgs, device: &B::Device) -> Result<()> {
    let (config, m) = build_model::<B>(Some(&a.model), Some(&a.weights), device)?;
    weights::save_native(&m, &config, &a.output)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

/// `vicinity compare`: prints the table; `false` when a tensor is above the tolerance.
pub fn compare_command(a: &CompareArgs) -> Result<bool> {
    let (table, ok) = compare(&a.actual, &a.expected, a.tolerance)?;
    print!("{table}");
    Ok(ok)
}

/// `vicinity models`: every registered model with its parameters and GFLOPs at its default size.
pub fn list_models() -> Result<String> {
    let w = MODEL_NAMES.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut out = format!(
        "{:<w$} {:>14} {:>8} {:>10}\n",
        "model", "params", "input", "GFLOPs"
    );
    for name in MODEL_NAMES {
        let config = models::config_by_name(name)?;
        let res = config.default_resolution();
        let (macs, params) = flops::totals(&config.costs(res, res));
        out.push_str(&format!(
            "{name:<w$} {:>14} {:>8} {:>10.2}\n",
            group_thousands(params),
            format!("{res}²"),
            macs as f64 / 1e9
        ));
    }
    out.push_str("\nGFLOPs count one multiply-accumulate as one FLOP, as in the papers' tables.\n");
    Ok(out)
}

/// `vicinity flops`: the per-layer breakdown of one model.
pub fn flops_table(config: &ModelConfig, resolution: usize, per_layer: bool) -> Result<String> {
    config.check_input(resolution, resolution)?;
    let costs = config.costs(resolution, resolution);
    let (macs, params) = flops::totals(&costs);
    let mut out = String::new();
    if per_layer {
        out.push_str(&format!("{:<40} {:>12} {:>12}\n", "layer", "MFLOPs", "params"));
        for c in &costs {
            out.push_str(&format!(
                "{:<40} {:>12.3} {:>12}\n",
                c.name,
                c.macs as f64 / 1e6,
                group_thousands(c.params)
            ));
        }
    }
    out.push_str(&format!(
        "total at {resolution}²: {:.3} GFLOPs, {} params\n",
        macs as f64 / 1e9,
        group_thousands(params)
    ));
    Ok(out)
}

pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The model a command runs: from a name or config file, optionally with weights. A native
/// weights file carries its own configuration, so `model` may then be omitted.
pub fn build_model<B: Backend>(
    model: Option<&str>,
    weights_path: Option<&Path>,
    device: &B::Device,
) -> Result<(ModelConfig, Model<B>)> {
    let stored = match weights_path {
        Some(p) if p.extension().is_some_and(|e| e == "safetensors") => weights::native_config(p)?,
        _ => None,
    };
    let config = match (model, stored) {
        (Some(m), _) => models::resolve_config(m)?,
        (None, Some(c)) => c,
        (None, None) => bail!("say which model: --model NAME or a .json/.toml config file"),
    };
    let model = config.init::<B>(device)?;
    let model = match weights_path {
        Some(p) => weights::load_any(model, p)?,
        None => model,
    };
    Ok((config, model))
}

/// Where `vicinity features` takes its input from.
pub enum FeatureInput {
    Images(Vec<PathBuf>),
    Tensor(PathBuf),
}

/// `vicinity features`: logits and every stage's tokens into a safetensors file (fixture layout).
pub fn features<B: Backend>(
    model: Option<&str>,
    weights_path: Option<&Path>,
    input: FeatureInput,
    resolution: Option<usize>,
    output: &Path,
    device: &B::Device,
) -> Result<String> {
    let (config, model) = build_model::<B>(model, weights_path, device)?;
    let x = match input {
        FeatureInput::Tensor(path) => {
            let (shape, values) = io::read_safetensors_f32(&path, "input")?;
            if shape.len() != 4 || shape[0] == 0 || shape[1] != 3 {
                bail!(
                    "'input' in {} has shape {shape:?}; expected B×3×H×W with at least one image",
                    path.display()
                );
            }
            Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(values, shape), device)
        }
        FeatureInput::Images(paths) => {
            if paths.is_empty() {
                bail!("no input images given");
            }
            let r = resolution.unwrap_or_else(|| config.default_resolution());
            io::load_images::<B>(&paths, [r, r], device)?
        }
    };
    let [_, _, h, w] = x.dims();
    config.check_input(h, w)?;
    let out = model.forward_features(x);
    let mut tensors = BTreeMap::new();
    let logits = io::to_host(out.logits)?;
    let summary = format!("logits {:?}", logits.0);
    tensors.insert("logits".to_string(), logits);
    for (i, stage) in out.stages.into_iter().enumerate() {
        tensors.insert(format!("stage{}", i + 1), io::to_host(stage)?);
    }
    io::write_safetensors(output, &tensors)
        .with_context(|| format!("writing features to {}", output.display()))?;
    Ok(format!(
        "wrote {} ({summary}, {} stages)",
        output.display(),
        tensors.len() - 1
    ))
}

/// `vicinity compare`: relative L2 error of every tensor two safetensors files share, and the
/// worst one (e.g. CUDA features against a fixture).
pub fn compare(actual: &Path, expected: &Path, tolerance: f64) -> Result<(String, bool)> {
    let bytes = std::fs::read(expected).with_context(|| format!("cannot read {}", expected.display()))?;
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", expected.display()))?
        .names()
        .into_iter()
        .cloned()
        .collect();
    let mut names = names;
    names.sort();
    let mut worst = 0.0f64;
    let mut out = String::new();
    let mut compared = 0;
    for name in names {
        let Ok((shape_a, a)) = io::read_safetensors_f32(actual, &name) else {
            continue;
        };
        let (shape_b, b) = io::read_safetensors_f32(expected, &name)?;
        if shape_a != shape_b {
            bail!(
                "{name}: shape {shape_a:?} in {} but {shape_b:?} in {}",
                actual.display(),
                expected.display()
            );
        }
        let diff: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        let rel = (diff / norm.max(1e-300)).sqrt();
        let rel = if rel.is_nan() { f64::INFINITY } else { rel };
        worst = worst.max(rel);
        compared += 1;
        out.push_str(&format!("{name:<12} rel L2 {rel:.2e}\n"));
    }
    if compared == 0 {
        bail!(
            "{} and {} share no tensor names",
            actual.display(),
            expected.display()
        );
    }
    let ok = worst <= tolerance;
    out.push_str(&format!(
        "worst rel L2 {worst:.2e} over {compared} tensors: {} (tolerance {tolerance:.0e})\n",
        if ok { "OK" } else { "FAIL" }
    ));
    Ok((out, ok))
}
