//! Throughput of training steps and inference on synthetic data, timed like the anchors: the first
//! step (kernel compilation and autotuning) is reported on its own, then warm-up steps, then the
//! mean over timed steps with the device synchronised.

/// The bench's optimizer runs in one process: its step has no collective that could fail.
pub(crate) const SOLO: &str = "a one-process optimizer step cannot fail";

use std::time::Instant;

use anyhow::Result;
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::backend::Dtype;
use crate::models::ModelConfig;
use crate::train::optim::{AdamW, AdamWConfig};

pub mod attention;
pub mod segment;

/// What one bench row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward, cross-entropy, backward and an AdamW step.
    Train,
    /// Forward only, without autodiff.
    Infer,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Infer => "infer",
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BenchRow {
    pub model: String,
    pub mode: Mode,
    pub dtype: String,
    /// The input's height (and width, unless `width` says otherwise).
    pub resolution: usize,
    /// The input's width where it differs from its height (segmentation at 512×2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    pub batch: usize,
    /// Seconds of the first step (compilation and autotuning included).
    pub first_step_s: f64,
    pub mean_step_ms: f64,
    pub images_per_s: f64,
    /// Loss of the last timed training step (a NaN here means the step is broken).
    pub last_loss: Option<f32>,
    /// Most memory held by live tensors at any sync point of a measured step (after the forward, the
    /// backward and the optimiser step), GiB; the counterpart of `torch.cuda.max_memory_allocated`.
    pub peak_in_use_gib: Option<f64>,
    /// Most memory CubeCL's pools reserved from the device, GiB.
    pub peak_reserved_gib: Option<f64>,
}

pub struct BenchSpec<'a> {
    pub name: &'a str,
    pub config: &'a ModelConfig,
    pub mode: Mode,
    pub dtype: Dtype,
    pub resolution: usize,
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Sample GPU memory (CUDA only).
    pub gpu: bool,
}

/// The highest GPU memory seen at the sync points where it is sampled.
#[derive(Default)]
pub(crate) struct PeakMemory {
    pub(crate) enabled: bool,
    in_use: u64,
    reserved: u64,
}

impl PeakMemory {
    /// Frees the backend's cached memory first, so the peak is this row's own.
    pub(crate) fn new<B: Backend>(enabled: bool, device: &B::Device) -> Self {
        B::memory_cleanup(device);
        Self {
            enabled,
            ..Default::default()
        }
    }

    pub(crate) fn sample(&mut self) {
        if let Some(m) = self.enabled.then(crate::backend::gpu_memory).flatten() {
            self.in_use = self.in_use.max(m.in_use);
            self.reserved = self.reserved.max(m.reserved);
        }
    }

    fn gib(&self) -> (Option<f64>, Option<f64>) {
        let gib = |b: u64| (self.enabled && b > 0).then(|| b as f64 / (1u64 << 30) as f64);
        (gib(self.in_use), gib(self.reserved))
    }
}

pub(crate) fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))
}

/// What a row measured: the first step apart, then `iters` timed steps, and the memory peak.
pub(crate) struct Measured {
    first_s: f64,
    timed_s: f64,
    iters: usize,
    memory: PeakMemory,
}

impl Measured {
    /// The measurement at the end of the timed steps (the memory peak sampled once more there).
    pub(crate) fn after(first_s: f64, timed_s: f64, iters: usize, mut memory: PeakMemory) -> Self {
        memory.sample();
        Self {
            first_s,
            timed_s,
            iters,
            memory,
        }
    }
}

impl BenchRow {
    /// `512`, or `512x2048` for a non-square input.
    pub fn size(&self) -> String {
        match self.width {
            Some(w) if w != self.resolution => format!("{}x{w}", self.resolution),
            _ => self.resolution.to_string(),
        }
    }

    pub(crate) fn new(
        model: &str,
        mode: Mode,
        dtype: Dtype,
        resolution: usize,
        batch: usize,
        m: &Measured,
    ) -> Self {
        let mean = m.timed_s / m.iters as f64;
        let (peak_in_use_gib, peak_reserved_gib) = m.memory.gib();
        BenchRow {
            model: model.to_string(),
            mode,
            dtype: dtype.name().to_string(),
            resolution,
            width: None,
            batch,
            first_step_s: m.first_s,
            mean_step_ms: mean * 1e3,
            images_per_s: batch as f64 / mean,
            last_loss: None,
            peak_in_use_gib,
            peak_reserved_gib,
        }
    }
}

/// Runs `step` `warmup` times, then `iters` timed times (synchronised before and after); returns
/// the state and the timed seconds.
pub(crate) fn timed_loop<S>(
    mut state: S,
    (warmup, iters): (usize, usize),
    mut step: impl FnMut(S) -> S,
    sync: impl Fn() -> Result<()>,
) -> Result<(S, f64)> {
    for _ in 0..warmup {
        state = step(state);
    }
    sync()?;
    let launched = launches();
    let start = Instant::now();
    for _ in 0..iters {
        state = step(state);
    }
    // Host time to issue the steps. Close to the whole: the host never ran ahead of the GPU (which
    // does not tell launch cost from waiting on the GPU).
    let issued = start.elapsed().as_secs_f64();
    sync()?;
    let total = start.elapsed().as_secs_f64();
    let per_step = |n: u64| n as f64 / iters.max(1) as f64;
    eprintln!(
        "host issued the {iters} timed steps in {:.1} ms per step ({:.0} % of the {:.1} ms until the GPU finished){}",
        issued * 1e3 / iters.max(1) as f64,
        100.0 * issued / total.max(1e-9),
        total * 1e3 / iters.max(1) as f64,
        launched
            .zip(launches())
            .map(|(a, b)| format!("; {:.0} CubeCL kernel launches per step", per_step(b - a)))
            .unwrap_or_default(),
    );
    Ok((state, total))
}

/// CubeCL kernel launches so far (cuBLAS's products not included), where the build counts them
/// (the CUDA build's patched cubecl-runtime).
fn launches() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        Some(cubecl_runtime::client::launch_count())
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Times one step on its own (compilation included), synchronised.
pub(crate) fn first_step(step: impl FnOnce(), sync: impl Fn() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    step();
    sync()?;
    Ok(start.elapsed().as_secs_f64())
}

/// One bench training step: forward, cross-entropy, backward and the trainer's AdamW, with
/// `pause` after each of the three (the first step synchronises and samples memory there); the new
/// model and the loss.
fn train_step<B: AutodiffBackend>(
    model: crate::models::Model<B>,
    optim: &mut AdamW<B::InnerBackend>,
    (x, y, loss_fn): (&Tensor<B, 4>, &Tensor<B, 1, Int>, &CrossEntropyLoss<B>),
    pause: &mut impl FnMut() -> Result<()>,
) -> Result<(crate::models::Model<B>, Tensor<B, 1>)> {
    let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
    pause()?;
    let grads = loss.backward();
    pause()?;
    let grads = GradientsParams::from_grads(grads, &model);
    let (model, _) = optim.step(model, grads, 1e-4, None, None)?;
    pause()?;
    Ok((model, loss))
}

/// One line on the kernels compiled ahead of the first step, when there were any.
fn report_ahead(spec: &BenchSpec, ahead: Option<crate::backend::CompiledAhead>) {
    if let Some(a) = ahead.filter(|a| a.kernels > 0) {
        eprintln!(
            "{}: compiled {} kernels ahead ({} NVRTC threads, {:.1} s of NVRTC in all, the longest {:.1} s): \
             earlier work {:.1} s, the pass that met them {:.1} s, then {:.1} s of compiling",
            spec.name, a.kernels, a.threads, a.nvrtc_s, a.longest_s, a.earlier_s, a.pass_s, a.wait_s
        );
    }
}

/// One line on the kernels compiled one by one (missed by [`report_ahead`]'s pass), when any were.
fn report_one_by_one(spec: &BenchSpec) {
    if let Some((n, s)) = crate::backend::compiled_one_by_one().filter(|&(n, _)| n > 0) {
        eprintln!(
            "{}: {n} kernels compiled one by one in this process so far, in {s:.1} s",
            spec.name
        );
    }
}

/// One line on what cuBLAS did per step of the warm-up and timed loops, when it took any product.
fn report_cublas(spec: &BenchSpec, before: crate::kernels::cublas::Stats) {
    let now = crate::kernels::cublas::stats();
    let steps = (spec.warmup + spec.iters).max(1) as f64;
    if now.taken > before.taken {
        eprintln!(
            "{}: cuBLAS took {:.0} products per step ({:.0} left to CubeCL), {:.2} ms host time per step",
            spec.name,
            (now.taken - before.taken) as f64 / steps,
            (now.declined - before.declined) as f64 / steps,
            (now.host_us - before.host_us) as f64 / steps / 1000.0,
        );
    }
}

/// Runs one bench row on backend `B` (autodiff for training; its inner backend for inference).
pub fn run<B: AutodiffBackend>(spec: &BenchSpec, device: &B::Device) -> Result<BenchRow> {
    let config = spec.config;
    config.check_input(spec.resolution, spec.resolution)?;
    let shape = [spec.batch, 3, spec.resolution, spec.resolution];
    let classes = config.num_classes();
    let mut memory = PeakMemory::new::<B>(spec.gpu, device);
    let loops = (spec.warmup, spec.iters);
    let (first_s, timed_s, last_loss) = match spec.mode {
        Mode::Infer => {
            let model = config.init::<B::InnerBackend>(device)?;
            let x = Tensor::<B::InnerBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let step = |()| {
                let _ = model.forward(x.clone());
            };
            let start = Instant::now();
            // On a model of its own: the pass would otherwise initialise this one's lazy
            // parameters with its garbage.
            let ahead = crate::backend::compile_ahead::<B::InnerBackend>(device, || {
                if let Ok(m) = config.init::<B::InnerBackend>(device) {
                    let _ = m.forward(x.clone());
                }
            })?;
            report_ahead(spec, ahead);
            // The pass's own allocations stay out of the memory figures.
            B::InnerBackend::memory_cleanup(device);
            let first =
                start.elapsed().as_secs_f64() + first_step(|| step(()), || sync::<B::InnerBackend>(device))?;
            memory.sample();
            eprintln!(
                "{}: first inference step (compilation + autotune) {first:.1} s",
                spec.name
            );
            report_one_by_one(spec);
            let before = crate::kernels::cublas::stats();
            let ((), timed) = timed_loop((), loops, step, || sync::<B::InnerBackend>(device))?;
            report_cublas(spec, before);
            (first, timed, None)
        }
        Mode::Train => {
            let mut model = config.init::<B>(device)?;
            // The trainer's AdamW: f32 master weights with bf16, as the anchors' autocast keeps.
            let mut optim = AdamW::new(AdamWConfig::default(), spec.dtype == Dtype::Bf16);
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
            let y =
                Tensor::<B, 1, Int>::random([spec.batch], Distribution::Uniform(0.0, classes as f64), device);
            let loss_fn = CrossEntropyLossConfig::new().init(device);
            let data = (&x, &y, &loss_fn);
            // The first step (compilation included) syncs after the forward and the backward, where
            // memory peaks; later steps run without extra syncs.
            let start = Instant::now();
            // Two steps of a model of its own (a clone would share the parameters, and shared
            // tensors are not updated in place: other kernels), the first synchronised like the
            // first step below, the second like the timed ones (fusion's kernels end at syncs).
            let ahead = crate::backend::compile_ahead::<B>(device, || {
                let (Ok(mut m), mut o) = (config.init::<B>(device), optim.clone()) else {
                    return;
                };
                for synced in [true, false] {
                    let mut pause = || if synced { sync::<B>(device) } else { Ok(()) };
                    match train_step(m, &mut o, data, &mut pause) {
                        Ok((next, _)) => m = next,
                        Err(_) => return,
                    }
                }
            })?;
            report_ahead(spec, ahead);
            B::memory_cleanup(device);
            memory.sample();
            let mut pause = || {
                sync::<B>(device)?;
                memory.sample();
                Ok(())
            };
            model = train_step(model, &mut optim, data, &mut pause)?.0;
            let first = start.elapsed().as_secs_f64();
            eprintln!(
                "{}: first training step (compilation + autotune) {first:.1} s",
                spec.name
            );
            report_one_by_one(spec);
            let mut last = None;
            let step = |model: crate::models::Model<B>| {
                let (model, loss) = train_step(model, &mut optim, data, &mut || Ok(())).expect(SOLO);
                last = Some(loss);
                model
            };
            let before = crate::kernels::cublas::stats();
            let (_, timed) = timed_loop(model, loops, step, || sync::<B>(device))?;
            report_cublas(spec, before);
            (first, timed, last.map(|l| l.into_scalar().elem::<f32>()))
        }
    };
    let measured = Measured::after(first_s, timed_s, spec.iters, memory);
    Ok(BenchRow {
        last_loss,
        ..BenchRow::new(
            spec.name,
            spec.mode,
            spec.dtype,
            spec.resolution,
            spec.batch,
            &measured,
        )
    })
}

/// A fixed-width table of bench rows.
pub fn table(rows: &[BenchRow]) -> String {
    let w = rows.iter().map(|r| r.model.len()).max().unwrap_or(0).max(20);
    let mut out = format!(
        "{:<w$} {:<6} {:<5} {:>9} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9}\n",
        "model", "mode", "dtype", "res", "batch", "first s", "step ms", "images/s", "used GiB", "pool GiB"
    );
    let gib = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in rows {
        out.push_str(&format!(
            "{:<w$} {:<6} {:<5} {:>9} {:>6} {:>9.2} {:>9.2} {:>10.0} {:>9} {:>9}\n",
            r.model,
            r.mode.name(),
            r.dtype,
            r.size(),
            r.batch,
            r.first_step_s,
            r.mean_step_ms,
            r.images_per_s,
            gib(r.peak_in_use_gib),
            gib(r.peak_reserved_gib),
        ));
    }
    out
}

/// The rows as CSV (one header line).
pub fn csv(rows: &[BenchRow]) -> String {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    let mut out = String::from(
        "model,mode,dtype,resolution,batch,first_step_s,mean_step_ms,images_per_s,peak_in_use_gib,peak_reserved_gib,width\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{:.3},{:.3},{:.1},{},{},{}\n",
            r.model,
            r.mode.name(),
            r.dtype,
            r.resolution,
            r.batch,
            r.first_step_s,
            r.mean_step_ms,
            r.images_per_s,
            opt(r.peak_in_use_gib),
            opt(r.peak_reserved_gib),
            r.width.unwrap_or(r.resolution),
        ));
    }
    out
}

/// A resolution sweep as a PNG: images/s (left) and peak memory in use (right) against the
/// resolution, one line per model, mode and dtype.
pub fn sweep_png(rows: &[BenchRow]) -> Result<Vec<u8>> {
    use crate::plot::{PALETTE, Panel, Series, two_panels_png};
    let mut keys: Vec<(String, Mode, String, usize)> = Vec::new();
    for r in rows {
        let key = (r.model.clone(), r.mode, r.dtype.clone(), r.batch);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let batches: std::collections::BTreeSet<usize> = rows.iter().map(|r| r.batch).collect();
    let series = |value: &dyn Fn(&BenchRow) -> Option<f64>| -> Vec<Series> {
        keys.iter()
            .enumerate()
            .map(|(i, (model, mode, dtype, batch))| Series {
                name: match batches.len() {
                    1 => format!("{model} {} {dtype}", mode.name()),
                    _ => format!("{model} {} {dtype} b{batch}", mode.name()),
                },
                color: PALETTE[i % PALETTE.len()],
                points: rows
                    .iter()
                    .filter(|r| {
                        &r.model == model && r.mode == *mode && &r.dtype == dtype && r.batch == *batch
                    })
                    .filter_map(|r| value(r).map(|v| (r.resolution as f64, v)))
                    .collect(),
            })
            .collect()
    };
    let mut xticks: Vec<f64> = rows.iter().map(|r| r.resolution as f64).collect();
    xticks.sort_by(f64::total_cmp);
    xticks.dedup();
    let speed = Panel {
        ylabel: "images/s".into(),
        xlabel: "resolution".into(),
        xticks: xticks.clone(),
        yrange: None,
        legend_below: false,
        series: series(&|r| Some(r.images_per_s)),
    };
    let memory = Panel {
        ylabel: "peak memory GiB".into(),
        xlabel: "resolution".into(),
        xticks,
        yrange: None,
        legend_below: false,
        series: series(&|r| r.peak_in_use_gib),
    };
    let title = match batches.iter().collect::<Vec<_>>()[..] {
        [batch] => format!("vicinity bench, batch {batch}"),
        _ => "vicinity bench".to_string(),
    };
    two_panels_png(&title, &speed, &memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(res: usize, ips: f64, mem: Option<f64>) -> BenchRow {
        BenchRow {
            model: "vvt_tiny".into(),
            mode: Mode::Train,
            dtype: "f32".into(),
            resolution: res,
            width: None,
            batch: 16,
            first_step_s: 1.0,
            mean_step_ms: 10.0,
            images_per_s: ips,
            last_loss: Some(2.3),
            peak_in_use_gib: mem,
            peak_reserved_gib: mem.map(|m| m * 1.5),
        }
    }

    #[test]
    fn csv_has_one_line_per_row_and_empty_memory_on_cpu() {
        let rows = [row(224, 100.0, Some(1.5)), row(384, 40.0, None)];
        let text = csv(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        assert!(lines[1].starts_with("vvt_tiny,train,f32,224,16,"));
        // Memory, then the width (square inputs: the resolution).
        assert!(lines[1].ends_with(",1.5000,2.2500,224"), "{}", lines[1]);
        assert!(lines[2].ends_with(",,,384"), "{}", lines[2]);
    }

    #[test]
    fn sweep_chart_is_a_png() {
        let rows = [
            row(224, 100.0, Some(1.5)),
            row(384, 40.0, Some(4.0)),
            row(512, 20.0, Some(7.0)),
        ];
        let png = sweep_png(&rows).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (960, 400));
    }
}
