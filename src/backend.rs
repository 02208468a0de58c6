//! Backend choice: `flex` (pure-Rust CPU) always, `cuda` when built with the `cuda` feature.

/// The CPU backend every build has.
pub type Cpu = burn::backend::Flex;

/// The CUDA backend (with kernel fusion), present with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32, i32>;

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

impl BackendKind {
    /// Resolves `Auto` and rejects `Cuda` in a CPU-only build.
    pub fn resolve(self) -> anyhow::Result<Self> {
        match self {
            Self::Auto if cfg!(feature = "cuda") => Ok(Self::Cuda),
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
/// `VICINITY_KERNEL_LOG=FILE` logs one line per compiled kernel.
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
        // One line per kernel compilation, to see what a cold start spends its time on.
        if let Some(path) = std::env::var_os("VICINITY_KERNEL_LOG") {
            use cubecl_runtime::config::compilation::CompilationLogLevel;
            config.compilation.logger.level = CompilationLogLevel::Basic;
            config.compilation.logger.file = Some(path.into());
        }
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
