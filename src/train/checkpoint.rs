//! The run directory and its checkpoints.
//!
//! ```text
//! RUN/config.json        the resolved training configuration (for people; the state has it too)
//! RUN/last/              the latest checkpoint (every epoch, on Ctrl-C, on --save-every)
//! RUN/best/              the checkpoint with the best val top-1
//!     model.safetensors  native weights with their model configuration (f32)
//!     ema.safetensors    EMA weights (with --ema)
//!     optim.safetensors  AdamW moments (and f32 master weights with bf16), by parameter name
//!     state.json         RunState: position, schedule, history, classes, configuration
//! RUN/metrics.csv, RUN/metrics.jsonl, RUN/curves.png
//! ```
//!
//! A checkpoint directory is written whole into `.NAME.new/` (every file synced), then swapped in
//! with renames: `NAME → .NAME.old`, `.NAME.new → NAME`, remove `.NAME.old`. An interruption at
//! any moment leaves either the old or the new checkpoint complete, and [`resolve`] finds it
//! (`NAME`, or `.NAME.old` when the crash fell between the two renames). A failed write (full
//! disk, read-only folder) removes the partial `.NAME.new` and leaves `NAME` untouched.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::metrics::EpochMetrics;
use super::optim::HostTensors;
use super::params::{self, replace_flat};
use super::schedule::Schedule;
use super::trainer::Session;
use crate::data::Normalize;
use crate::models::{Model, ModelConfig};
use crate::weights;

pub const STATE_FILE: &str = "state.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";

/// Where a run stands; enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub version: u32,
    pub config: TrainConfig,
    /// The model as trained (classes and resolution resolved).
    pub model: ModelConfig,
    pub classes: Vec<String>,
    pub resolution: usize,
    pub normalize: Normalize,
    /// The epoch in progress (0-based) and the next batch of it.
    pub epoch: usize,
    pub batch: usize,
    /// Optimizer steps done.
    pub global_step: u64,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub schedule: Schedule,
    pub ema_updates: u64,
    pub best_top1: Option<f64>,
    pub best_epoch: Option<usize>,
    pub history: Vec<EpochMetrics>,
    /// Partial sums of the epoch in progress.
    pub epoch_loss_sum: f64,
    pub epoch_loss_count: u64,
    pub epoch_train_s: f64,
    /// Of `epoch_train_s`, the time spent waiting for batches.
    #[serde(default)]
    pub epoch_data_wait_s: f64,
    pub epoch_images: u64,
    /// Training seconds over all sessions (evaluation included).
    pub elapsed_s: f64,
    pub finished: bool,
}

impl RunState {
    pub const VERSION: u32 = 1;

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let state: RunState =
            serde_json::from_str(&text).with_context(|| format!("{} is not a run state", path.display()))?;
        if state.version != Self::VERSION {
            bail!(
                "{} has run-state version {}; this build reads version {}",
                path.display(),
                state.version,
                Self::VERSION
            );
        }
        Ok(state)
    }
}

/// Writes a checkpoint directory atomically: `fill` writes the files into a fresh temporary
/// directory, which then replaces `dir`. On any error `dir` is left as it was.
pub fn commit_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .into_owned();
    let new = parent.join(format!(".{name}.new"));
    let old = parent.join(format!(".{name}.old"));
    let attempt = (|| -> Result<()> {
        if new.exists() {
            std::fs::remove_dir_all(&new).with_context(|| format!("cannot remove {}", new.display()))?;
        }
        std::fs::create_dir_all(&new).with_context(|| format!("cannot create {}", new.display()))?;
        fill(&new)?;
        sync_dir(&new);
        Ok(())
    })();
    if let Err(e) = attempt {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e.context(format!(
            "could not write checkpoint {} (is the disk full or the folder read-only?); the previous checkpoint is untouched",
            dir.display()
        )));
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        std::fs::rename(dir, &old).with_context(|| format!("cannot move {} aside", dir.display()))?;
    }
    std::fs::rename(&new, dir)
        .with_context(|| format!("cannot move the new checkpoint to {}", dir.display()))?;
    sync_dir(parent);
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The complete checkpoint directory for `RUN/NAME`: `NAME` itself, or `.NAME.old` when an
/// interruption fell between the two renames of [`commit_dir`].
pub fn resolve(run: &Path, name: &str) -> Option<PathBuf> {
    [run.join(name), run.join(format!(".{name}.old"))]
        .into_iter()
        .find(|d| d.join(STATE_FILE).is_file())
}

/// Writes checkpoints on a background thread, one at a time and in order, so that training goes
/// on while the files reach the disk (the copy to the host stays in the training loop). Each write
/// is a [`commit_dir`], so an interruption still never leaves a torn checkpoint; dropping the
/// writer waits for the write in flight.
#[derive(Default)]
pub struct Writer {
    pending: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Writer {
    /// Starts `write` once the previous write has finished, and fails with that write's error.
    pub fn submit(&mut self, write: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        self.wait()?;
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(write)
            .context("cannot start the checkpoint writer thread")?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Waits for the write in flight, if any, and returns its result.
    pub fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the checkpoint writer thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("error: {e:#}");
        }
    }
}

/// Makes `to` a copy of the committed checkpoint `from` (e.g. `last` → `best`), atomically. Files
/// are hard-linked when the filesystem allows it (checkpoint files are never modified in place, a
/// new checkpoint is a new directory), copied otherwise.
pub fn link_dir(from: &Path, to: &Path) -> Result<()> {
    commit_dir(to, |tmp| {
        for entry in std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
            let entry = entry?;
            let dest = tmp.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &dest).is_err() {
                let bytes = std::fs::read(entry.path())?;
                write_synced(&dest, &bytes)?;
            }
        }
        Ok(())
    })
}

/// Writes a file inside a fresh checkpoint directory (no rename needed there), synced.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Holds a run directory for one process: a second `train` or `--resume` into the same folder
/// while this one runs is refused instead of both writing it. An advisory `flock`, so the
/// kernel releases it when the process ends in any way (even `kill -9`): no stale lock to clear.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// Takes the lock of `run` (created if needed).
pub fn lock_run(run: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(run)
        .with_context(|| format!("cannot create the run directory {}", run.display()))?;
    let path = run.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                // A file system without locks (some network mounts): run unguarded, and say so.
                eprintln!(
                    "warning: cannot lock {} ({err}); make sure no other run uses this folder",
                    path.display()
                );
                return Ok(RunLock { _file: file });
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            bail!(
                "another vicinity process{holder} is training in {}; wait for it, or pick another --out",
                run.display()
            );
        }
        file.set_len(0)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
    }
    Ok(RunLock { _file: file })
}

/// Fails early, with a clear message, when the run directory cannot be written.
pub fn check_writable(run: &Path) -> Result<()> {
    std::fs::create_dir_all(run)
        .with_context(|| format!("cannot create the run directory {}", run.display()))?;
    let probe = run.join(format!(".write-test{}", std::process::id()));
    let res = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    res.with_context(|| format!("the run directory {} is not writable", run.display()))
}

/// Weights for a checkpoint file: already serialised, or host tensors to serialise on the
/// checkpoint writer's thread.
enum WeightsOut {
    Bytes(Vec<u8>),
    Host(HostTensors),
}

impl WeightsOut {
    fn into_bytes(self, config: &crate::models::ModelConfig) -> Result<Vec<u8>> {
        match self {
            WeightsOut::Bytes(b) => Ok(b),
            WeightsOut::Host(h) => weights::native_bytes_from_host(&h, config),
        }
    }
}

/// Every F32 tensor of a safetensors file, by name.
pub fn read_all_f32(path: &Path) -> Result<HostTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = std::collections::BTreeMap::new();
    for (name, view) in st.tensors() {
        let values = crate::io::floats(&view).with_context(|| format!("{name} in {}", path.display()))?;
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

impl<B: AutodiffBackend> Session<B> {
    /// The weights to save (f32): the f32 master copy with bf16, else the model itself.
    fn model_to_save(&self) -> Model<B::InnerBackend> {
        let valid = self.model.valid();
        match self.optim.master_weights() {
            Some(master) if !master.is_empty() => replace_flat(valid, &master, Some(FloatDType::F32)),
            _ => params::cast_params(valid, FloatDType::F32),
        }
    }

    pub(super) fn ema_model(&self, dtype: Option<FloatDType>) -> Option<Model<B::InnerBackend>> {
        self.ema
            .as_ref()
            .map(|e| replace_flat(self.model.valid(), &self.optim.ema_values(e), dtype))
    }

    /// Writes `last` (and `best` too when `best` is set) atomically. The weights and optimizer
    /// state are copied to the host here; the files are written on the writer thread.
    pub(super) fn save(&mut self, best: bool) -> Result<()> {
        self.state.elapsed_s = self.elapsed();
        if !self.dist.is_main() {
            return Ok(()); // rank 0 writes for every rank (they hold the same weights)
        }
        let config = self.state.model.clone();
        // Each optimizer buffer comes to the host once; the files are serialised on the writer
        // thread. Before the first step (no buffers yet) the model is read parameter by
        // parameter, and so are averages restored by a resume and not yet laid out.
        let copy = self.optim.host_copy(self.ema.is_some())?;
        let (model, ema_host, optim) = match copy {
            Some(c) => (WeightsOut::Host(c.weights), c.ema, c.state),
            None => (
                WeightsOut::Bytes(weights::native_bytes(&self.model_to_save(), &config)?),
                None,
                HostTensors::new(),
            ),
        };
        let ema = match ema_host {
            Some(host) => Some(WeightsOut::Host(host)),
            None => self
                .ema_model(Some(FloatDType::F32))
                .map(|m| weights::native_bytes(&m, &config).map(WeightsOut::Bytes))
                .transpose()?,
        };
        let state_json = serde_json::to_vec_pretty(&self.state)?;
        let last = self.run_dir.join("last");
        let best = best.then(|| self.run_dir.join("best"));
        self.writer.submit(move || {
            commit_dir(&last, |dir| {
                weights::write_atomic(&dir.join(MODEL_FILE), &model.into_bytes(&config)?)?;
                if let Some(ema) = ema {
                    weights::write_atomic(&dir.join(EMA_FILE), &ema.into_bytes(&config)?)?;
                }
                crate::io::write_safetensors(&dir.join(OPTIM_FILE), &optim)?;
                write_synced(&dir.join(STATE_FILE), &state_json)
            })?;
            match best {
                Some(best) => link_dir(&last, &best),
                None => Ok(()),
            }
        })
    }
}
