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
/// before the first GPU operation.
pub fn configure_gpu_cache(dir: &std::path::Path, autotune: Option<&str>) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    {
        use cubecl_runtime::config::{
            CubeClRuntimeConfig, RuntimeConfig, autotune::AutotuneLevel, cache::CacheConfig,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the kernel cache folder {}: {e}", dir.display()))?;
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.cache = Some(CacheConfig::File(dir.join("kernels")));
        config.autotune.cache = CacheConfig::File(dir.join("autotune"));
        config.autotune.level = match autotune {
            None | Some("balanced") => AutotuneLevel::Balanced,
            Some("minimal") => AutotuneLevel::Minimal,
            Some("extensive") => AutotuneLevel::Extensive,
            Some("full") => AutotuneLevel::Full,
            Some(other) => {
                anyhow::bail!("unknown autotune level {other}: minimal, balanced, extensive or full")
            }
        };
        CubeClRuntimeConfig::set(config);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (dir, autotune);
    Ok(())
}
