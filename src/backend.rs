//! Backend choice: `flex` (pure-Rust CPU) always, `cuda` when built with the `cuda` feature.

/// The CPU backend every build has.
pub type Cpu = burn::backend::Flex;

/// The CUDA backend (with kernel fusion), present with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32, i32>;

/// The GPU this process drives: its local rank in a multi-process job (one process per GPU),
/// else 0. When each process sees a single GPU (`CUDA_VISIBLE_DEVICES` set per task, as SLURM
/// can), that one.
#[cfg(feature = "cuda")]
pub fn gpu_device() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(gpu_index())
}

/// The index of [`gpu_device`] (NCCL's communicator is built on the same GPU).
#[cfg(feature = "cuda")]
pub fn gpu_index() -> usize {
    let local = crate::dist::local_device_index();
    let count = cudarc::driver::result::init()
        .ok()
        .and_then(|()| cudarc::driver::result::device::get_count().ok())
        .unwrap_or(0) as usize;
    if count == 1 { 0 } else { local }
}

/// Which backend a command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// CUDA if this binary was built with it, otherwise the CPU.
    Auto,
    /// The pure-Rust CPU backend.
    Flex,
    /// NVIDIA GPUs through CubeCL (needs a binary built with `--features cuda`).
    Cuda,
}

/// Whether this build has CUDA and the machine has the NVIDIA driver's library.
pub fn cuda_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only looks the library up.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    false
}

impl BackendKind {
    /// Resolves `Auto` (CUDA where this build has it and the machine has the driver, else the
    /// CPU) and rejects `Cuda` in a CPU-only build.
    pub fn resolve(self) -> anyhow::Result<Self> {
        match self {
            Self::Auto if cuda_present() => Ok(Self::Cuda),
            Self::Auto => Ok(Self::Flex),
            Self::Cuda if !cfg!(feature = "cuda") => anyhow::bail!(
                "this vicinity binary was built without CUDA; rebuild with `cargo build --release --features cuda` or use --backend flex"
            ),
            other => Ok(other),
        }
    }
}

/// Where CubeCL keeps compiled kernels and autotune results: `--cache-dir`, else
/// `$VICINITY_CACHE`, else `~/.cache/vicinity`. Reusing it turns a cold start (minutes of NVRTC
/// compilation and autotuning) into seconds.
pub fn cache_dir(explicit: Option<&std::path::Path>) -> std::path::PathBuf {
    explicit
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("VICINITY_CACHE").map(Into::into))
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/vicinity")))
        .unwrap_or_else(|| std::path::PathBuf::from(".vicinity-cache"))
}

/// Points CubeCL's kernel and autotune caches at `dir` (CUDA builds; a no-op otherwise). Must run
/// before the first GPU operation. CubeCL's own `cubecl.toml` and `CUBECL_DEBUG_LOG` /
/// `CUBECL_AUTOTUNE_LEVEL` variables still apply; `autotune` (a level) needs the `autotune` build.
pub fn configure_gpu_cache(dir: &std::path::Path, autotune: Option<&str>) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    {
        use cubecl_runtime::config::{
            CubeClRuntimeConfig, RuntimeConfig, autotune::AutotuneLevel, cache::CacheConfig,
        };
        if autotune.is_some() && !cfg!(feature = "autotune") {
            anyhow::bail!(
                "--autotune needs a binary built with `--features autotune`; this one uses CubeCL's default kernels"
            );
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the kernel cache folder {}: {e}", dir.display()))?;
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        // One folder per version of the kernels' sources (see build.rs): CubeCL would otherwise
        // hand back a kernel compiled from older code under the same name and arguments.
        let kernels = format!("kernels-{}", env!("VICINITY_KERNELS_HASH"));
        config.compilation.cache = Some(CacheConfig::File(dir.join(kernels)));
        config.autotune.cache = CacheConfig::File(dir.join("autotune"));
        match autotune {
            None => {}
            Some("minimal") => config.autotune.level = AutotuneLevel::Minimal,
            Some("balanced") => config.autotune.level = AutotuneLevel::Balanced,
            Some("extensive") => config.autotune.level = AutotuneLevel::Extensive,
            Some("full") => config.autotune.level = AutotuneLevel::Full,
            Some(other) => {
                anyhow::bail!("unknown autotune level {other}: minimal, balanced, extensive or full")
            }
        }
        CubeClRuntimeConfig::set(config);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (dir, autotune);
    Ok(())
}

/// What [`compile_ahead`] compiled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompiledAhead {
    /// Kernels compiled (those found in the kernel cache are loaded, not counted).
    pub kernels: u64,
    /// NVRTC threads.
    pub threads: u64,
    /// NVRTC seconds summed over the threads.
    pub nvrtc_s: f64,
    /// The slowest single kernel's NVRTC seconds.
    pub longest_s: f64,
    /// Seconds of the earlier work (run first, its kernels compiled one by one).
    pub earlier_s: f64,
    /// Seconds of the pass that met the kernels (their compilation starts meanwhile).
    pub pass_s: f64,
    /// Seconds of waiting for the compiler after the pass, and loading.
    pub wait_s: f64,
}

/// Whether `B` is the CUDA backend (with or without autodiff), where [`compile_ahead`] acts.
pub fn on_cuda<B: burn::tensor::backend::Backend>() -> bool {
    #[cfg(feature = "cuda")]
    {
        use std::any::TypeId;
        TypeId::of::<B>() == TypeId::of::<Gpu>()
            || TypeId::of::<B>() == TypeId::of::<burn::backend::Autodiff<Gpu>>()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Meets the GPU kernels `work` would launch without running any, then compiles them all at once
/// with one NVRTC thread per core; returns what it compiled. A fresh machine otherwise compiles a
/// step's few hundred kernels one by one as the step reaches them (about a minute). `work` must be
/// work whose results are thrown away (a step on clones): its kernels do not run, so every tensor
/// it makes holds garbage, and nothing it makes may outlive it ([`cached_constant`] keeps nothing
/// meanwhile); no other GPU work may run at the same time. Kernels `work` missed still compile
/// when first launched. A no-op (`None`) on backends other than CUDA, and in builds with CubeCL's
/// autotuning (whose timing launches would be skipped too).
pub fn compile_ahead<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    work: impl FnOnce(),
) -> anyhow::Result<Option<CompiledAhead>> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::cuda::compile_ahead::{collect, compiled};
        /// Stops collecting however `work` ends.
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                collect(false);
            }
        }
        if !on_cuda::<B>() || cfg!(feature = "autotune") {
            return Ok(None);
        }
        let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"));
        // Earlier work runs (and compiles) as usual.
        let t0 = std::time::Instant::now();
        sync()?;
        let t1 = std::time::Instant::now();
        let before = compiled();
        let stop = Stop;
        collect(true);
        work();
        // Burn's fusion hands the queued operations to the device here, while collecting.
        let collected = sync();
        drop(stop);
        collected?;
        let t2 = std::time::Instant::now();
        // The first sync after collecting waits for the compilations and loads the modules.
        sync()?;
        let t3 = std::time::Instant::now();
        let after = compiled();
        Ok(Some(CompiledAhead {
            kernels: after.ahead - before.ahead,
            threads: after.threads,
            nvrtc_s: after.ahead_nvrtc_s - before.ahead_nvrtc_s,
            longest_s: if after.ahead > before.ahead {
                after.longest_s
            } else {
                0.0
            },
            earlier_s: (t1 - t0).as_secs_f64(),
            pass_s: (t2 - t1).as_secs_f64(),
            wait_s: (t3 - t2).as_secs_f64(),
        }))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, work);
        Ok(None)
    }
}

/// Kernels this process compiled one by one as launches met them, and their seconds (CUDA builds).
pub fn compiled_one_by_one() -> Option<(u64, f64)> {
    #[cfg(feature = "cuda")]
    {
        let c = cubecl::cuda::compile_ahead::compiled();
        Some((c.one_by_one, c.one_by_one_s))
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Whether [`compile_ahead`] is collecting kernels now (tensors made meanwhile hold garbage).
fn collecting_kernels() -> bool {
    #[cfg(feature = "cuda")]
    {
        cubecl::cuda::compile_ahead::collecting()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// CubeCL's memory on the default CUDA device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuMemory {
    /// Held by live tensors.
    pub in_use: u64,
    /// Reserved by CubeCL's memory pools (what the device has given up).
    pub reserved: u64,
}

/// Memory of the default CUDA device; `None` in CPU builds. Call it only after CUDA work ran on this
/// thread (it would otherwise start a CUDA context).
pub fn gpu_memory() -> Option<GpuMemory> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::Runtime;
        let client = cubecl::cuda::CudaRuntime::client(&Default::default());
        let usage = client.memory_usage().ok()?;
        Some(GpuMemory {
            in_use: usage.bytes_in_use,
            reserved: usage.bytes_reserved,
        })
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Number format of a model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    /// Weights, activations and gradients in bf16; training keeps f32 master weights, Adam moments
    /// and loss.
    Bf16,
}

impl Dtype {
    /// Makes this the default float type of `device`: call it before any tensor exists there.
    pub fn apply<B: burn::prelude::Backend>(self, device: &B::Device) -> anyhow::Result<()> {
        use burn::tensor::{FloatDType, IntDType};
        if self == Dtype::F32 {
            return Ok(());
        }
        if let Err(e) = burn::tensor::set_default_dtypes::<B>(device, FloatDType::BF16, IntDType::I32) {
            // Already set (to bf16 by an earlier run in this process) is fine; anything else is not.
            if burn::tensor::get_device_settings::<B>(device).float_dtype != FloatDType::BF16 {
                anyhow::bail!(
                    "cannot switch the device to bf16 ({e:?}): tensors were created on it before, or it lacks bf16"
                );
            }
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Whether `B` is the CUDA backend (plain or under autodiff), where memory statistics exist and
/// NCCL works on the tensors.
pub fn is_cuda<B: burn::prelude::Backend>() -> bool {
    #[cfg(feature = "cuda")]
    {
        use std::any::TypeId;
        let t = TypeId::of::<B>();
        t == TypeId::of::<Gpu>() || t == TypeId::of::<burn::backend::Autodiff<Gpu>>()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// A constant tensor (position features, fixed random features) built once per backend, device
/// and `key`, and kept for the process: rebuilding it cost host work and kernel launches in every
/// forward.
pub fn cached_constant<B: burn::prelude::Backend, const D: usize>(
    key: String,
    device: &B::Device,
    make: impl FnOnce() -> burn::prelude::Tensor<B, D>,
) -> burn::prelude::Tensor<B, D> {
    use std::any::{Any, TypeId};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (TypeId, String, String);
    static CACHE: OnceLock<Mutex<HashMap<Key, Box<dyn Any + Send>>>> = OnceLock::new();
    let key = (TypeId::of::<B>(), key, format!("{device:?}"));
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = cache
        .get(&key)
        .and_then(|t| t.downcast_ref::<burn::prelude::Tensor<B, D>>())
    {
        return t.clone();
    }
    let t = make();
    // Made while kernels are collected, its values are garbage: kept for no later call.
    if !collecting_kernels() {
        cache.insert(key, Box::new(t.clone()));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off CUDA the work is not run at all: a training step would otherwise run twice on the CPU.
    #[test]
    fn compile_ahead_leaves_other_backends_alone() {
        let mut ran = false;
        let ahead = compile_ahead::<Cpu>(&Default::default(), || ran = true).unwrap();
        assert_eq!(ahead, None);
        assert!(!ran);
    }
}
