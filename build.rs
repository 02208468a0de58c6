//! Names the kernel cache after the kernels' sources. CubeCL keys its on-disk kernel cache by a
//! kernel's type and compile-time arguments, not by its body: after a kernel's code changed, a
//! cache filled by an earlier build handed back the old compiled kernel (wrong depth-wise weight
//! gradients were once seen that way). `VICINITY_KERNELS_HASH` hashes every file under
//! `src/kernels` and `vendor`, and `backend::configure_gpu_cache` keeps each build's kernels apart.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// FNV-1a, 64 bits: stable across Rust versions, unlike `DefaultHasher`.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let mut paths = Vec::new();
    for dir in ["src/kernels", "vendor"] {
        println!("cargo:rerun-if-changed={dir}");
        files(Path::new(dir), &mut paths);
    }
    paths.sort();
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    for path in &paths {
        hash.write(path.to_string_lossy().as_bytes());
        hash.write(&std::fs::read(path).unwrap_or_default());
    }
    println!("cargo:rustc-env=VICINITY_KERNELS_HASH={:016x}", hash.finish());
}
