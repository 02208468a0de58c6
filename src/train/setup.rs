//! Setting a run up: the data splits, the model configuration as trained, the loaders, the
//! default run directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::config::TrainConfig;
use crate::data::{ImageDataset, Loader, LoaderConfig, MissingSplit, Shard, check_same_classes, open_splits};
use crate::models::ModelConfig;

/// Whether `err` says that the split `name` does not exist.
fn is_missing(err: &anyhow::Error, name: &str) -> bool {
    err.downcast_ref::<MissingSplit>()
        .is_some_and(|m| m.split == name)
}

/// Opens the train and validation splits (`auto`: `val`, else `test`) and checks they agree.
pub fn open_data(cfg: &TrainConfig) -> Result<(ImageDataset, ImageDataset, String)> {
    let open = |val: &str| -> Result<(ImageDataset, ImageDataset)> {
        let mut v = open_splits(&cfg.data, &[cfg.train_split.as_str(), val])?;
        let val_ds = v.pop().expect("two splits");
        let train_ds = v.pop().expect("two splits");
        Ok((train_ds, val_ds))
    };
    let (train, val, split) = if cfg.val_split == "auto" {
        // Only a missing 'val' split falls back to 'test'; a damaged one is reported as it is.
        match open("val") {
            Ok((t, v)) => (t, v, "val".to_string()),
            Err(first) if is_missing(&first, "val") => match open("test") {
                Ok((t, v)) => (t, v, "test".to_string()),
                Err(second) if is_missing(&second, "test") => {
                    bail!(
                        "no validation split found in {}: neither 'val' nor 'test' exists ({first:#}); \
                         name one with --val-split",
                        cfg.data.display()
                    );
                }
                Err(second) => return Err(second),
            },
            Err(first) => return Err(first),
        }
    } else {
        let (t, v) = open(&cfg.val_split)?;
        (t, v, cfg.val_split.clone())
    };
    check_same_classes(&train, &val)?;
    // Every validation image is decoded now rather than after the first epoch of training.
    let mut val = val;
    let left_out = val.verify(cfg.skip_bad)?;
    if left_out > 0 {
        eprintln!(
            "warning: left {left_out} unreadable images out of {} (--skip-bad)",
            val.name
        );
    }
    Ok((train, val, split))
}

/// The model configuration as trained: classifier size, resolution and drop-path applied.
pub fn resolve_model(cfg: &TrainConfig, data_classes: usize) -> Result<(ModelConfig, usize)> {
    let classes = cfg.num_classes.unwrap_or(data_classes);
    if classes != data_classes {
        bail!("--num-classes {classes} does not match the dataset, which has {data_classes} classes");
    }
    let res = cfg.resolution.unwrap_or_else(|| cfg.model.default_resolution());
    let mut model = cfg.model.clone().with_num_classes(classes).at_resolution(res);
    if let Some(p) = cfg.drop_path {
        match &mut model {
            ModelConfig::Vvt(c) => c.drop_path = p,
            ModelConfig::Lsagt(c) => c.drop_path = p,
        }
    }
    model.validate()?;
    model
        .check_input(res, res)
        .with_context(|| format!("the model cannot train at {res}x{res} (--resolution)"))?;
    Ok((model, res))
}

/// The training and validation loaders of one rank of `dist` (each takes its share of every
/// global batch).
pub(super) fn loaders(
    cfg: &TrainConfig,
    train: ImageDataset,
    val: ImageDataset,
    res: usize,
    dist: &crate::dist::Dist,
) -> Result<(Loader, Loader)> {
    if cfg.skip_bad && dist.world() > 1 {
        // A rank leaving a batch out would take one step fewer than the others.
        bail!(
            "--skip-bad works on one process only: over several ranks a batch left out on one rank \
             would put the ranks out of step; find the bad files with one process (`vicinity eval` or \
             `train --skip-bad` name them) and remove them"
        );
    }
    let shard = Shard {
        rank: dist.rank(),
        world: dist.world(),
    };
    let mut tc = LoaderConfig::train(cfg.batch_on(dist.world())?, [res, res], cfg.augment.clone());
    tc.seed = cfg.seed;
    tc.workers = cfg.workers;
    tc.skip_bad = cfg.skip_bad;
    tc.shard = shard;
    let mut vc = LoaderConfig::eval(cfg.eval_batch_size, [res, res], cfg.normalize());
    vc.workers = cfg.workers;
    vc.shard = shard;
    let train_loader = Loader::new(Arc::new(train), tc).context("training data")?;
    let val_loader = Loader::new(Arc::new(val), vc).context("validation data")?;
    Ok((train_loader, val_loader))
}

/// The default run directory: `runs/<model>-<unix time>`.
pub fn default_run_dir(model_name: &str) -> PathBuf {
    let stem = Path::new(model_name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{secs}"))
}
