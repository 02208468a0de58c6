//! `vicinity bench`: training and inference throughput and peak memory of whole models or single
//! attention layers on synthetic data (docs/BENCH.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;

use crate::backend::Dtype;
use crate::bench::{self, BenchRow, BenchSpec, Mode, attention};
use crate::weights::write_atomic;

/// `vicinity bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Registered model names or config files.
    #[arg(long, num_args = 1..)]
    pub model: Vec<String>,
    /// Rows saved by `--json` (or a report's `bench.jsonl`): print their table and, with
    /// `--report DIR`, draw their report, measuring nothing.
    #[arg(long, num_args = 1.., value_name = "ROWS.jsonl", conflicts_with_all = ["model", "attention", "json"])]
    pub from: Vec<PathBuf>,
    /// Time one attention layer alone instead of (or as well as) whole models; `--resolution` /
    /// `--sweep-res` then give the side of the token grid (N = side²).
    #[arg(long, value_enum, num_args = 1..)]
    pub attention: Vec<attention::AttentionLayer>,
    /// Channels of the attention-only layer (VVT-T stage 1: 64).
    #[arg(long, default_value_t = 64)]
    pub attention_dim: usize,
    /// Heads of the attention-only layer.
    #[arg(long, default_value_t = 1)]
    pub attention_heads: usize,
    /// Input resolution (square); defaults to the model's own.
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Several resolutions, e.g. `224,384,512,768` (overrides --resolution).
    #[arg(long, value_delimiter = ',')]
    pub sweep_res: Vec<usize>,
    /// Segmentation models (`semfpn_…`, `upernet_…`): input height x width, e.g. `512x2048`
    /// (default: the square --resolution, 512).
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// Segmentation models: classes of the head (ADE20K's 150).
    #[arg(long, default_value_t = 150)]
    pub seg_classes: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub batch: usize,
    #[arg(long, value_enum, num_args = 1.., default_values = ["train", "infer"])]
    pub mode: Vec<Mode>,
    /// f32, or bf16 (the whole model in bf16; training keeps f32 master weights).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    /// Untimed steps after the first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub iters: usize,
    /// Also append each row as a JSON line to this file (as it finishes).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write bench.csv, bench.jsonl and a bench.png chart (speed and memory against resolution)
    /// into this folder at the end.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// A count of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a count of at least 1")),
    }
}

/// Runs every requested row on backend `B` (its inner backend for inference rows), printing each
/// as it finishes and the table at the end.
pub fn bench_command<B: AutodiffBackend>(a: &BenchArgs, device: &B::Device) -> Result<()> {
    if !a.from.is_empty() {
        return report_from(a);
    }
    anyhow::ensure!(
        !a.model.is_empty() || !a.attention.is_empty(),
        "name at least one --model (see `vicinity models`) or --attention kind (or --from ROWS.jsonl)"
    );
    a.dtype.apply::<B>(device)?;
    let gpu = crate::backend::is_cuda::<B>();
    let mut rows = Vec::new();
    let mut push = |row: BenchRow| -> Result<()> {
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
    let sides = |default: usize| match (&a.sweep_res[..], a.resolution) {
        ([], res) => vec![res.unwrap_or(default)],
        (sweep, _) => sweep.to_vec(),
    };
    for name in a.model.iter().filter(|n| is_segmenter(n)) {
        let config = crate::segment::SegmenterConfig::resolve(name, a.seg_classes)?;
        let sizes = match a.size {
            Some(size) => vec![size],
            None => sides(512).into_iter().map(|s| (s, s)).collect(),
        };
        for size in sizes {
            for &mode in &a.mode {
                let spec = crate::bench::segment::SegBenchSpec {
                    name,
                    config: &config,
                    mode,
                    dtype: a.dtype,
                    size,
                    batch: a.batch,
                    warmup: a.warmup,
                    iters: a.iters,
                    gpu,
                };
                push(crate::bench::segment::run_segmenter::<B>(&spec, device)?)?;
            }
        }
    }
    for name in a.model.iter().filter(|n| !is_segmenter(n)) {
        let config = crate::models::resolve_config(name)?;
        for res in sides(config.default_resolution()) {
            // Built for each resolution, as a model trained there would be.
            let config = config.clone().at_resolution(res);
            for &mode in &a.mode {
                let spec = BenchSpec {
                    name,
                    config: &config,
                    mode,
                    dtype: a.dtype,
                    resolution: res,
                    batch: a.batch,
                    warmup: a.warmup,
                    iters: a.iters,
                    gpu,
                };
                push(bench::run::<B>(&spec, device)?)?;
            }
        }
    }
    for &kind in &a.attention {
        for side in sides(56) {
            for &mode in &a.mode {
                let spec = attention::AttentionSpec {
                    kind,
                    side,
                    batch: a.batch,
                    dim: a.attention_dim,
                    heads: a.attention_heads,
                    variants: 18,
                    mode,
                    dtype: a.dtype,
                    warmup: a.warmup,
                    iters: a.iters,
                    gpu,
                };
                push(attention::run_attention::<B>(&spec, device)?)?;
            }
        }
    }
    if let Some(dir) = &a.report {
        write_report(dir, &rows)?;
    }
    print!("{}", bench::table(&rows));
    Ok(())
}

/// Whether a --model names a segmentation model (registered prefix or a segmenter config file).
fn is_segmenter(name: &str) -> bool {
    crate::segment::model::HEAD_PREFIXES
        .iter()
        .any(|p| name.starts_with(p))
        || std::fs::read_to_string(name).is_ok_and(|t| t.contains("\"head\"") || t.contains("[head]"))
}

/// `HxW`, e.g. `512x2048`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("'{s}' is not HEIGHTxWIDTH (e.g. 512x2048)"))?;
    Ok((h.trim().parse()?, w.trim().parse()?))
}

/// `bench.csv`, `bench.jsonl` and `bench.png` of `rows` in `dir`.
fn write_report(dir: &std::path::Path, rows: &[BenchRow]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(&dir.join("bench.csv"), bench::csv(rows).as_bytes())?;
    let jsonl: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    write_atomic(&dir.join("bench.jsonl"), jsonl.as_bytes())?;
    write_atomic(&dir.join("bench.png"), &bench::sweep_png(rows)?)?;
    eprintln!("wrote {}/bench.{{csv,jsonl,png}}", dir.display());
    Ok(())
}

/// `--from`: the table and report of rows saved earlier (`--json`, `bench.jsonl`), measuring
/// nothing: rows of several calls or machines on one chart.
fn report_from(a: &BenchArgs) -> Result<()> {
    let mut rows = Vec::new();
    for path in &a.from {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let row: BenchRow = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a bench row", path.display(), i + 1))?;
            rows.push(row);
        }
    }
    anyhow::ensure!(!rows.is_empty(), "the --from files hold no rows");
    if let Some(dir) = &a.report {
        write_report(dir, &rows)?;
    }
    print!("{}", bench::table(&rows));
    Ok(())
}
