//! `vicinity ablate`: the papers' ablation tables, one command each ([`crate::train::ablate`]).

use anyhow::{Result, bail};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;

use super::train::TrainArgs;
use crate::train::ablate::{self, AblationRow};

/// VVT paper Tables VI and VII: the locality ablation and every attention kind on VVT-Tiny.
pub const DEFAULT_MODELS: [&str; 9] = [
    "vvt_tiny",
    "vvt_tiny_nolocality",
    "vvt_tiny_1d",
    "vvt_tiny_softmax",
    "vvt_tiny_pvt",
    "vvt_tiny_performer",
    "vvt_tiny_linformer",
    "vvt_tiny_cosformer",
    "vvt_tiny_gcnet",
];

/// `vicinity ablate`.
#[derive(Args, Debug, Clone)]
pub struct AblateArgs {
    /// Registered names or config files to compare (default: VVT paper Tables VI–VII, the
    /// locality ablation and every attention kind on VVT-Tiny).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub models: Vec<String>,
    /// One run per model and seed (mean ± sd in the table).
    #[arg(long, num_args = 1.., value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Every `train` flag sets the shared recipe (`--data`, `--recipe`, `--budget` per run,
    /// `--resolution`, ...); `--out` is the ablation's folder.
    #[command(flatten)]
    pub train: TrainArgs,
}

/// `vicinity ablate` on backend `B`.
pub fn ablate_command<B: AutodiffBackend>(a: &AblateArgs, device: &B::Device) -> Result<()> {
    crate::train::signals::install_interrupt_handler();
    if a.train.model.is_some() || a.train.resume.is_some() || a.train.quick || a.train.seed.is_some() {
        bail!(
            "ablate takes --models and --seeds (not --model, --seed, --resume or --quick); run it again to continue"
        );
    }
    let models: Vec<String> = if a.models.is_empty() {
        DEFAULT_MODELS.iter().map(|m| m.to_string()).collect()
    } else {
        a.models.clone()
    };
    let Some(dir) = a.train.out.clone() else {
        bail!("say where the ablation goes: --out DIR")
    };
    let mut configs = Vec::new();
    for model in &models {
        for &seed in &a.seeds {
            let mut args = a.train.clone();
            args.model = Some(model.clone());
            args.seed = Some(seed);
            args.out = Some(ablate::run_dir(&dir, model, seed));
            configs.push((model.clone(), args.to_config()?));
        }
    }
    let mut dirs = std::collections::HashSet::new();
    for (model, cfg) in &configs {
        if !dirs.insert(cfg.out.clone()) {
            bail!(
                "{model} (seed {}) would share the run folder {} with another entry: name each model \
                 and seed once (config files need distinct file names)",
                cfg.seed,
                cfg.out.display()
            );
        }
    }
    let total = configs.len();
    eprintln!(
        "ablation of {} models × {} seeds into {}",
        models.len(),
        a.seeds.len(),
        dir.display()
    );
    let title = format!(
        "ablation on {}",
        a.train
            .data
            .as_deref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    let mut done: Vec<AblationRow> = Vec::new();
    let rows = ablate::run_all::<B>(configs, device, |row| {
        done.push(row.clone());
        eprintln!(
            "[{}/{total}] {} seed {}: top-1 {:.2}% ({} epochs, {:.0} img/s)",
            done.len(),
            row.model,
            row.seed,
            row.top1,
            row.epochs,
            row.img_per_s
        );
        // The table grows with each run, so a stopped ablation still leaves one.
        if let Err(e) = ablate::write_report(&dir, &done, &title) {
            eprintln!("warning: could not write the table: {e:#}");
        }
    });
    if rows.is_err() {
        crate::train::signals::exit_if_paused_by_signal("the ablation");
    }
    let rows = rows?;
    ablate::write_report(&dir, &rows, &title)?;
    print!("{}", ablate::markdown(&rows, &title));
    eprintln!("wrote {}/ablation.{{md,csv,png}}", dir.display());
    Ok(())
}
