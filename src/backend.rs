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
