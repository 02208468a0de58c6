//! `vicinity ablate`: several model configurations trained under one recipe, budget and dataset,
//! one run each (per seed), and one table of what came out: the papers' ablation tables as one
//! command. Each run is an ordinary run directory under the ablation's folder, so a stopped
//! ablation continues where it was (finished runs are read back, a paused one is resumed).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use super::checkpoint::{RunState, STATE_FILE, resolve};
use super::config::TrainConfig;
use super::trainer::{ResumeOptions, Stop, resume, train};
use crate::weights::write_atomic;

/// One trained configuration of an ablation.
#[derive(Debug, Clone, Serialize)]
pub struct AblationRow {
    pub model: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub params: u64,
    /// GFLOPs at the training resolution (one multiply-accumulate = one FLOP).
    pub gflops: f64,
    pub resolution: usize,
    pub epochs: usize,
    /// Validation accuracy after the last epoch, in %.
    pub top1: f64,
    pub top5: f64,
    pub best_top1: f64,
    /// Training images per second over the epochs after the first (which compiles on a GPU).
    pub img_per_s: f64,
    pub train_s: f64,
}

impl AblationRow {
    fn of(model: &str, seed: u64, run_dir: &Path, state: &RunState) -> Self {
        let last = state.history.last();
        let pct = |v: Option<f64>| v.unwrap_or(f64::NAN) * 100.0;
        // Speed over the epochs after the first, whose time holds the kernels' compilation on a
        // GPU (the first epoch alone when there is only one).
        let timed = if state.history.len() > 1 {
            &state.history[1..]
        } else {
            &state.history[..]
        };
        let (images, seconds) = timed.iter().fold((0.0, 0.0), |(i, s), e| {
            (i + e.img_per_s * e.epoch_s, s + e.epoch_s)
        });
        let train_s = state.history.iter().map(|e| e.epoch_s).sum();
        let costs = state.model.costs(state.resolution, state.resolution);
        Self {
            model: model.to_string(),
            seed,
            run_dir: run_dir.to_path_buf(),
            params: costs.iter().map(|c| c.params).sum(),
            gflops: costs.iter().map(|c| c.macs).sum::<u64>() as f64 / 1e9,
            resolution: state.resolution,
            epochs: state.history.len(),
            top1: pct(last.and_then(|e| e.val_top1)),
            top5: pct(last.and_then(|e| e.val_top5)),
            best_top1: pct(state.best_top1),
            img_per_s: if seconds > 0.0 { images / seconds } else { 0.0 },
            train_s,
        }
    }
}

/// The run directory of `model` (a name or a config file) with `seed` inside `dir`.
pub fn run_dir(dir: &Path, model: &str, seed: u64) -> PathBuf {
    let stem = Path::new(model)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!("{stem}-seed{seed}"))
}

/// Trains (or finishes, or reads back) every configuration: `configs` are `(model name, train
/// configuration)` with their run directories set; `on_row` sees each row as it is done.
pub fn run_all<B: AutodiffBackend>(
    configs: Vec<(String, TrainConfig)>,
    device: &B::Device,
    mut on_row: impl FnMut(&AblationRow),
) -> Result<Vec<AblationRow>> {
    let mut rows = Vec::new();
    for (model, cfg) in configs {
        let (dir, seed, quiet) = (cfg.out.clone(), cfg.seed, cfg.quiet);
        let earlier = resolve(&dir, "last").map(|ck| RunState::read(&ck)).transpose()?;
        if let Some(state) = &earlier
            && let Some(diff) = recipe_difference(&state.config, &cfg)?
        {
            anyhow::bail!(
                "{} holds a run of {model} trained with other settings ({diff}); give the ablation another --out",
                dir.display()
            );
        }
        let outcome = match earlier {
            Some(state) if state.finished => None,
            Some(_) => Some(resume::<B>(
                &dir,
                ResumeOptions {
                    quiet,
                    ..Default::default()
                },
                device,
            )?),
            None => Some(train::<B>(cfg, device).with_context(|| format!("training {model} (seed {seed})"))?),
        };
        if let Some(o) = &outcome
            && o.stop != Stop::Finished
        {
            anyhow::bail!(
                "the run of {model} in {} was paused; run the ablation again to continue it",
                dir.display()
            );
        }
        let ck = resolve(&dir, "last").with_context(|| format!("{} has no {STATE_FILE}", dir.display()))?;
        let row = AblationRow::of(&model, seed, &dir, &RunState::read(&ck)?);
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// The first setting in which an earlier run's configuration differs from `new` (what only
/// changes how a run is watched, or where it lives, is not compared).
fn recipe_difference(earlier: &TrainConfig, new: &TrainConfig) -> Result<Option<String>> {
    let mut new = new.clone();
    new.data = std::path::absolute(&new.data)?;
    // `auto` became the split the run found.
    if new.val_split == "auto" {
        new.val_split = earlier.val_split.clone();
    }
    let (a, b) = (serde_json::to_value(earlier)?, serde_json::to_value(&new)?);
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else {
        return Ok(None);
    };
    const IGNORED: [&str; 5] = ["out", "workers", "log_every", "quiet", "skip_bad"];
    Ok(b.iter()
        .filter(|(k, _)| !IGNORED.contains(&k.as_str()))
        .find(|(k, v)| a.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: {} then, {v} now",
                a.get(k).map(|x| x.to_string()).unwrap_or_default()
            )
        }))
}

/// Per model (in first-seen order): mean final top-1 and the seeds' values.
fn by_model(rows: &[AblationRow]) -> Vec<(String, f64, Vec<f64>)> {
    let mut out: Vec<(String, f64, Vec<f64>)> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|(m, ..)| *m == r.model) {
            Some((_, _, v)) => v.push(r.top1),
            None => out.push((r.model.clone(), 0.0, vec![r.top1])),
        }
    }
    for (_, mean, v) in &mut out {
        *mean = v.iter().sum::<f64>() / v.len() as f64;
    }
    out
}

/// The table as markdown: one line per model, top-1 as mean ± standard deviation over seeds.
pub fn markdown(rows: &[AblationRow], title: &str) -> String {
    let mut s = format!(
        "# {title}\n\n| model | seeds | top-1 % (mean ± sd) | best top-1 % | top-5 % | params | GFLOPs | img/s | train s |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for (model, mean, values) in by_model(rows) {
        let mine: Vec<&AblationRow> = rows.iter().filter(|r| r.model == model).collect();
        let n = values.len() as f64;
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let avg = |f: fn(&AblationRow) -> f64| mine.iter().map(|r| f(r)).sum::<f64>() / n;
        s += &format!(
            "| {model} | {} | {mean:.2} ± {sd:.2} | {:.2} | {:.2} | {:.2} M | {:.3} | {:.0} | {:.0} |\n",
            values.len(),
            avg(|r| r.best_top1),
            avg(|r| r.top5),
            mine[0].params as f64 / 1e6,
            mine[0].gflops,
            avg(|r| r.img_per_s),
            avg(|r| r.train_s),
        );
    }
    s
}

/// One line per run.
pub fn csv(rows: &[AblationRow]) -> String {
    let mut s = String::from(
        "model,seed,params,gflops,resolution,epochs,top1,top5,best_top1,img_per_s,train_s,run_dir\n",
    );
    for r in rows {
        s += &format!(
            "{},{},{},{:.4},{},{},{:.4},{:.4},{:.4},{:.1},{:.1},{}\n",
            r.model,
            r.seed,
            r.params,
            r.gflops,
            r.resolution,
            r.epochs,
            r.top1,
            r.top5,
            r.best_top1,
            r.img_per_s,
            r.train_s,
            r.run_dir.display()
        );
    }
    s
}

/// Writes `ablation.md`, `ablation.csv` and `ablation.png` (final top-1 per model) into `dir`.
pub fn write_report(dir: &Path, rows: &[AblationRow], title: &str) -> Result<()> {
    write_atomic(&dir.join("ablation.md"), markdown(rows, title).as_bytes())?;
    write_atomic(&dir.join("ablation.csv"), csv(rows).as_bytes())?;
    let png = crate::plot::bars_png(title, "final val top-1 % (ticks: seeds)", &by_model(rows))?;
    write_atomic(&dir.join("ablation.png"), &png)
}
