//! The integration tests in one binary: each test binary links the whole of Burn, and ten of
//! them filled CI's disk. `train_bf16` and `train_resume` stay in binaries of their own because
//! they depend on state that is global to the process (the default float type, the CPU backend's
//! random generator).

#[allow(dead_code)]
mod common;

mod cli_binary;
mod cli_features;
mod data_download;
mod data_loader;
mod data_readers;
mod explain;
mod fixtures_lsagt;
mod fixtures_vvt;
mod fuzz;
mod hostile;
mod launch;
mod run_dirs;
mod segment;
mod train_loop;
mod train_units;

/// No reader may ask for more than this in one allocation, whatever a file claims: the fuzz and
/// hostile-file tests would otherwise pass on a machine with enough memory.
const MAX_ALLOCATION: usize = 1 << 30;

struct Bounded;

// SAFETY: forwards to the system allocator, refusing (null) only requests past the bound.
unsafe impl std::alloc::GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;
