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
    cache.insert(key, Box::new(t.clone()));
    t
}
