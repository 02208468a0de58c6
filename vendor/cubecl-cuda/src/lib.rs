#[macro_use]
extern crate derive_new;
extern crate alloc;

mod compute;
mod device;
mod runtime;

pub use device::*;
pub use runtime::*;

/// vicinity patch: compile a step's kernels ahead, together. While [`compile_ahead::collect`] is
/// on, a kernel launch launches nothing: a kernel met for the first time is generated and handed
/// to a pool of NVRTC threads at once. The first launch or synchronisation after collecting waits
/// for those compilations and loads the modules (a cold start meets a few hundred kernels; one by
/// one they took about a minute). The switch is process-wide: outputs of every launch skipped
/// meanwhile are left unwritten, so run only work whose results are thrown away while collecting,
/// and no other GPU work at the same time.
pub mod compile_ahead {
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    static COLLECT: AtomicBool = AtomicBool::new(false);
    /// Kernels compiled together, and their NVRTC microseconds summed over the threads.
    static AHEAD: AtomicU64 = AtomicU64::new(0);
    static NVRTC_MICROS: AtomicU64 = AtomicU64::new(0);
    /// The longest single compilation and the threads of the last batch.
    static LONGEST_MICROS: AtomicU64 = AtomicU64::new(0);
    static THREADS: AtomicU64 = AtomicU64::new(0);
    /// Kernels compiled one by one, when a launch met them, and their microseconds.
    static ONE_BY_ONE: AtomicU64 = AtomicU64::new(0);
    static ONE_BY_ONE_MICROS: AtomicU64 = AtomicU64::new(0);

    /// Turns collecting on or off (for every CUDA device of the process).
    pub fn collect(on: bool) {
        COLLECT.store(on, Ordering::SeqCst);
    }

    /// Whether launches are being collected now (their outputs are left unwritten).
    pub fn collecting() -> bool {
        COLLECT.load(Ordering::SeqCst)
    }

    fn micros(d: core::time::Duration) -> u64 {
        d.as_micros() as u64
    }

    pub(crate) fn record(threads: usize, nvrtc: &[core::time::Duration]) {
        AHEAD.fetch_add(nvrtc.len() as u64, Ordering::Relaxed);
        NVRTC_MICROS.fetch_add(nvrtc.iter().map(|d| micros(*d)).sum(), Ordering::Relaxed);
        LONGEST_MICROS.store(nvrtc.iter().map(|d| micros(*d)).max().unwrap_or(0), Ordering::Relaxed);
        THREADS.store(threads as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_one(took: core::time::Duration) {
        ONE_BY_ONE.fetch_add(1, Ordering::Relaxed);
        ONE_BY_ONE_MICROS.fetch_add(micros(took), Ordering::Relaxed);
    }

    /// Kernel compilation so far in this process.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct Compiled {
        /// Kernels compiled together (after collecting).
        pub ahead: u64,
        /// Their NVRTC seconds summed over the threads.
        pub ahead_nvrtc_s: f64,
        /// The longest single NVRTC compilation of the last batch.
        pub longest_s: f64,
        /// Threads of the last batch.
        pub threads: u64,
        /// Kernels compiled one by one, when a launch met them.
        pub one_by_one: u64,
        /// Their seconds.
        pub one_by_one_s: f64,
    }

    /// What this process compiled so far.
    pub fn compiled() -> Compiled {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-6;
        Compiled {
            ahead: AHEAD.load(Ordering::Relaxed),
            ahead_nvrtc_s: s(&NVRTC_MICROS),
            longest_s: s(&LONGEST_MICROS),
            threads: THREADS.load(Ordering::Relaxed),
            one_by_one: ONE_BY_ONE.load(Ordering::Relaxed),
            one_by_one_s: s(&ONE_BY_ONE_MICROS),
        }
    }
}

#[cfg(feature = "ptx-wmma")]
pub(crate) type WmmaCompiler = cubecl_cpp::cuda::mma::PtxWmmaCompiler;

#[cfg(not(feature = "ptx-wmma"))]
pub(crate) type WmmaCompiler = cubecl_cpp::cuda::mma::CudaWmmaCompiler;

pub mod install {
    use std::path::PathBuf;

    pub fn include_path() -> PathBuf {
        let mut path = cuda_path().expect("
        CUDA installation not found.
        Please ensure that CUDA is installed and the CUDA_PATH environment variable is set correctly.
        Note: Default paths are used for Linux (/usr/local/cuda) and Windows (C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA/), which may not be correct.
    ");
        path.push("include");
        path
    }

    pub fn cccl_include_path() -> PathBuf {
        let mut path = include_path();
        path.push("cccl");
        path
    }

    pub fn cuda_path() -> Option<PathBuf> {
        if let Ok(path) = std::env::var("CUDA_PATH") {
            return Some(PathBuf::from(path));
        }

        #[cfg(target_os = "linux")]
        {
            // If it is installed as part of the distribution
            return if std::fs::exists("/usr/local/cuda").is_ok_and(|exists| exists) {
                Some(PathBuf::from("/usr/local/cuda"))
            } else if std::fs::exists("/opt/cuda").is_ok_and(|exists| exists) {
                Some(PathBuf::from("/opt/cuda"))
            } else if std::fs::exists("/usr/bin/nvcc").is_ok_and(|exists| exists) {
                // Maybe the compiler was installed within the user path.
                Some(PathBuf::from("/usr"))
            } else {
                None
            };
        }

        #[cfg(target_os = "windows")]
        {
            return Some(PathBuf::from(
                "C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA/",
            ));
        }

        #[allow(unreachable_code)]
        None
    }
}

#[cfg(test)]
#[allow(unexpected_cfgs)]
mod tests {
    pub type TestRuntime = crate::CudaRuntime;

    pub use half::{bf16, f16};

    cubecl_core::testgen_all!(f32: [f16, bf16, f32, f64], i32: [i8, i16, i32, i64], u32: [u8, u16, u32, u64]);
    cubecl_std::testgen!();
    cubecl_std::testgen_tensor_identity!([f16, bf16, f32, u32]);
    cubecl_std::testgen_quantized_view!(f16);
}
