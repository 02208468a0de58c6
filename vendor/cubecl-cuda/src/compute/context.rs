use cubecl_common::backtrace::BackTrace;
use cubecl_cpp::formatter::format_cpp;
use cubecl_cpp::{cuda::arch::CudaArchitecture, shared::CompilationOptions};
use cubecl_runtime::{
    compiler::CompilationError,
    validation::{validate_cube_dim, validate_units},
};

use super::storage::gpu::GpuResource;
use crate::{CudaCompiler, compute::stream::Stream};
use crate::{
    CudaComputeKernel,
    install::{cccl_include_path, include_path},
};
use cubecl_core::{
    compilation_cache::CompilationCache,
    hash::StableHash,
    server::ResourceLimitError,
    {ir::DeviceProperties, prelude::*},
};
use cubecl_runtime::timestamp_profiler::TimestampProfiler;
use cubecl_runtime::{compiler::CubeTask, logging::ServerLogger};
use cudarc::driver::DriverError;
use cudarc::driver::sys::CUfunc_st;
use cudarc::driver::sys::{CUctx_st, CUfunction_attribute, CUtensorMap};
use std::collections::HashMap;
use std::ffi::CString;
use std::ffi::c_char;
use std::str::FromStr;
use std::sync::Arc;
use std::{ffi::CStr, os::raw::c_void};

use cubecl_common::cache::CacheOption;

#[derive(Debug)]
pub(crate) struct CudaContext {
    pub context: *mut CUctx_st,
    pub module_names: HashMap<KernelId, CompiledKernel>,
    ptx_cache: Option<CompilationCache<StableHash, PtxCacheEntry>>,
    pub timestamps: TimestampProfiler,
    pub arch: CudaArchitecture,
    pub compilation_options: CompilationOptions,
    pub properties: DeviceProperties,
    /// vicinity patch: kernels queued by `defer_kernel`, each with its NVRTC job's result.
    pending: Vec<(PreparedKernel, std::sync::mpsc::Receiver<CompileResult>)>,
}

/// vicinity patch: a module image (or the error) and NVRTC's time for it.
type CompileResult = (Result<Vec<c_char>, CompilationError>, std::time::Duration);

/// vicinity patch: NVRTC threads, one per core (shared with the node's other ranks: the cores over
/// `LOCAL_WORLD_SIZE`, as torchrun and `vicinity launch` set it), started on first use and kept
/// for the process.
struct CompilePool {
    jobs: std::sync::mpsc::Sender<CompileJob>,
    threads: usize,
}

type CompileJob = (String, Vec<String>, std::sync::mpsc::Sender<CompileResult>);

impl CompilePool {
    /// Queues `source` for NVRTC; the receiver gets the result.
    fn submit(
        &self,
        source: String,
        options: Vec<String>,
    ) -> std::sync::mpsc::Receiver<CompileResult> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.jobs.send((source, options, tx));
        if let Err(std::sync::mpsc::SendError((source, options, tx))) = sent {
            // No thread left to take it: compile here.
            let started = std::time::Instant::now();
            let _ = tx.send((nvrtc_compile(&source, &options), started.elapsed()));
        }
        rx
    }
}

fn compile_pool() -> &'static CompilePool {
    static POOL: std::sync::OnceLock<CompilePool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ranks = std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let wanted = (cores / ranks).max(1);
        let (tx, rx) = std::sync::mpsc::channel::<CompileJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let mut threads = 0;
        for i in 0..wanted {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nvrtc-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap().recv();
                        let Ok((source, options, reply)) = job else { break };
                        let started = std::time::Instant::now();
                        let image = nvrtc_compile(&source, &options);
                        let _ = reply.send((image, started.elapsed()));
                    }
                });
            if spawned.is_err() {
                break;
            }
            threads += 1;
        }
        CompilePool {
            jobs: tx,
            threads: threads.max(1),
        }
    })
}

/// vicinity patch: a kernel whose source is ready for NVRTC.
#[derive(Debug)]
struct PreparedKernel {
    kernel_id: KernelId,
    hash: Option<StableHash>,
    source: String,
    entrypoint_name: String,
    cube_dim: CubeDim,
    shared_mem_bytes: usize,
}

/// vicinity patch: compiles CUDA C++ with NVRTC to a module image: a CUBIN for the device's
/// architecture (no PTX JIT when it loads), PTX where NVRTC made none. Safe to call from many
/// threads at once (each call has its own NVRTC program).
fn nvrtc_compile(source: &str, options: &[String]) -> Result<Vec<c_char>, CompilationError> {
    let generic = |err: &dyn core::fmt::Debug| CompilationError::Generic {
        reason: format!("{err:?}"),
        backtrace: BackTrace::capture(),
    };
    let source = CString::from_str(source).unwrap();
    // SAFETY: NVRTC FFI on a program this call creates and destroys; the `CString` source is
    // null-terminated and outlives the program.
    unsafe {
        let program = cudarc::nvrtc::result::create_program(source.as_c_str(), None)
            .map_err(|err| generic(&err))?;
        let result = (|| {
            if cudarc::nvrtc::result::compile_program(program, options).is_err() {
                let log_raw =
                    cudarc::nvrtc::result::get_program_log(program).map_err(|err| generic(&err))?;
                let log = CStr::from_ptr(log_raw.as_ptr()).to_str().unwrap_or("(log not UTF-8)");
                let mut message = "[Compilation Error] ".to_string();
                for line in log.split('\n') {
                    if !line.is_empty() {
                        message += format!("\n    {line}").as_str();
                    }
                }
                return Err(CompilationError::Generic {
                    reason: format!("{message}\n[Source]  \n{}", source.to_str().unwrap_or("")),
                    backtrace: BackTrace::capture(),
                });
            }
            let mut size = 0usize;
            cudarc::nvrtc::sys::nvrtcGetCUBINSize(program, &mut size)
                .result()
                .map_err(|err| generic(&err))?;
            if size == 0 {
                return cudarc::nvrtc::result::get_ptx(program).map_err(|err| generic(&err));
            }
            let mut cubin: Vec<c_char> = vec![0; size];
            cudarc::nvrtc::sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr())
                .result()
                .map_err(|err| generic(&err))?;
            Ok(cubin)
        })();
        let _ = cudarc::nvrtc::result::destroy_program(program);
        result
    }
}

#[derive(Debug)]
pub struct CompiledKernel {
    cube_dim: CubeDim,
    shared_mem_bytes: usize,
    func: *mut CUfunc_st,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq, Clone)]
pub struct PtxCacheEntry {
    entrypoint_name: String,
    shared_mem_bytes: usize,
    ptx: Vec<std::ffi::c_char>,
}

impl CudaContext {
    pub fn new(
        compilation_options: CompilationOptions,
        properties: DeviceProperties,
        context: *mut CUctx_st,
        arch: CudaArchitecture,
    ) -> Self {
        Self {
            context,
            module_names: HashMap::new(),
            ptx_cache: {
                use cubecl_runtime::config::RuntimeConfig;
                let config = cubecl_runtime::config::CubeClRuntimeConfig::get();
                if let Some(cache) = &config.compilation.cache {
                    let root = cache.root();
                    Some(CompilationCache::new(
                        "ptx",
                        // vicinity patch: one cache per architecture (it holds CUBINs).
                        CacheOption::default().name(format!("cuda-sm{arch}")).root(root),
                    ))
                } else {
                    None
                }
            },
            arch,
            timestamps: TimestampProfiler::default(),
            compilation_options,
            properties,
            pending: Vec::new(),
        }
    }

    /// Switches the current CUDA context to this context.
    pub fn unsafe_set_current(&self) -> Result<(), DriverError> {
        // SAFETY: `self.context` is a valid CUDA context obtained from `primary_ctx::retain`
        // during server initialization and remains valid for the server's lifetime.
        unsafe { cudarc::driver::result::ctx::set_current(self.context) }
    }

    pub fn compile_kernel(
        &mut self,
        kernel_id: &KernelId,
        kernel: Box<dyn CubeTask<CudaCompiler>>,
        mode: ExecutionMode,
        logger: Arc<ServerLogger>,
    ) -> Result<(), LaunchError> {
        // vicinity patch: preparation (cache lookup, source), NVRTC and loading are three steps,
        // so that `compile_pending` can run the NVRTC step of many kernels on every core.
        let started = std::time::Instant::now();
        if let Some(prepared) = self.prepare_kernel(kernel_id, kernel, mode, logger)? {
            let image = nvrtc_compile(&prepared.source, &self.nvrtc_options())?;
            self.finish_kernel(prepared, image)?;
            crate::compile_ahead::record_one(started.elapsed());
        }
        Ok(())
    }

    /// vicinity patch: while [`crate::compile_ahead`] collects, a kernel met for the first time is
    /// prepared (its source generated) and queued instead of compiled; the launch is skipped.
    pub fn defer_kernel(
        &mut self,
        kernel_id: &KernelId,
        kernel: Box<dyn CubeTask<CudaCompiler>>,
        mode: ExecutionMode,
        logger: Arc<ServerLogger>,
    ) -> Result<(), LaunchError> {
        if self.module_names.contains_key(kernel_id)
            || self.pending.iter().any(|(p, _)| &p.kernel_id == kernel_id)
        {
            return Ok(());
        }
        if let Some(mut prepared) = self.prepare_kernel(kernel_id, kernel, mode, logger)? {
            let source = core::mem::take(&mut prepared.source);
            let job = compile_pool().submit(source, self.nvrtc_options());
            self.pending.push((prepared, job));
        }
        Ok(())
    }

    /// vicinity patch: waits for the queued kernels' NVRTC jobs (they started as they were queued,
    /// on one thread per core), then loads them.
    pub fn compile_pending(&mut self) -> Result<(), LaunchError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = core::mem::take(&mut self.pending);
        let count = pending.len();
        let mut nvrtc = Vec::with_capacity(count);
        let mut first_error = None;
        for (prepared, job) in pending {
            let (image, took) = job.recv().unwrap_or_else(|_| {
                (
                    Err(CompilationError::Generic {
                        reason: "an NVRTC compilation thread stopped".into(),
                        backtrace: BackTrace::capture(),
                    }),
                    Default::default(),
                )
            });
            nvrtc.push(took);
            // Every job is waited for, so that none is left running behind an error.
            match image {
                Ok(image) if first_error.is_none() => {
                    if let Err(err) = self.finish_kernel(prepared, image) {
                        first_error = Some(err);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    first_error.get_or_insert(err.into());
                }
            }
        }
        let threads = compile_pool().threads.min(count);
        crate::compile_ahead::record(threads, &nvrtc);
        first_error.map_or(Ok(()), Err)
    }

    /// Looks the kernel up in the PTX cache (loading it when found) or generates its source.
    fn prepare_kernel(
        &mut self,
        kernel_id: &KernelId,
        kernel: Box<dyn CubeTask<CudaCompiler>>,
        mode: ExecutionMode,
        logger: Arc<ServerLogger>,
    ) -> Result<Option<PreparedKernel>, LaunchError> {
        let hash = if let Some(cache) = &self.ptx_cache {
            let hash = kernel_id.stable_hash();

            if let Some(entry) = cache.get(&hash) {
                log::trace!("Using PTX cache");

                self.load_ptx(
                    entry.ptx.clone(),
                    kernel_id.clone(),
                    entry.entrypoint_name.clone(),
                    kernel_id.cube_dim,
                    entry.shared_mem_bytes,
                )?;
                return Ok(None);
            }
            Some(hash)
        } else {
            None
        };

        log::trace!("Compiling kernel");

        validate_cube_dim(&self.properties, kernel_id)?;
        validate_units(&self.properties, kernel_id)?;

        let mut kernel_compiled = kernel.compile(
            &mut Default::default(),
            &self.compilation_options,
            mode,
            kernel.address_type(),
        )?;

        self.validate_shared(&kernel_compiled.repr)?;

        if logger.compilation_activated() {
            kernel_compiled.debug_info = Some(DebugInformation::new("cpp", kernel_id.clone()));

            if let Ok(formatted) = format_cpp(&kernel_compiled.source) {
                kernel_compiled.source = formatted;
            }
        }

        logger.log_compilation(&kernel_compiled);

        let repr = kernel_compiled.repr.unwrap();
        Ok(Some(PreparedKernel {
            kernel_id: kernel_id.clone(),
            hash,
            source: kernel_compiled.source,
            entrypoint_name: kernel_compiled.entrypoint_name,
            cube_dim: kernel_compiled.cube_dim,
            shared_mem_bytes: repr.shared_memory_size(),
        }))
    }

    /// NVRTC's options for this device.
    fn nvrtc_options(&self) -> Vec<String> {
        let arch = if self.arch.version >= 90 {
            format!("--gpu-architecture=sm_{}a", self.arch)
        } else {
            format!("--gpu-architecture=sm_{}", self.arch)
        };
        let include_path = include_path();
        let mut options = vec![
            arch,
            format!("--include-path={}", include_path.to_str().unwrap()),
            "-lineinfo".to_string(),
        ];
        let cccl_include_path = cccl_include_path();
        if cccl_include_path.exists() {
            options.push(format!(
                "--include-path={}",
                cccl_include_path.to_str().unwrap()
            ));
        }
        options
    }

    /// Stores the compiled module in the cache and loads it.
    fn finish_kernel(
        &mut self,
        prepared: PreparedKernel,
        image: Vec<c_char>,
    ) -> Result<(), LaunchError> {
        if let (Some(cache), Some(hash)) = (&mut self.ptx_cache, prepared.hash) {
            let result = cache.insert(
                hash,
                PtxCacheEntry {
                    entrypoint_name: prepared.entrypoint_name.clone(),
                    shared_mem_bytes: prepared.shared_mem_bytes,
                    ptx: image.clone(),
                },
            );
            if let Err(err) = result {
                log::warn!("Unable to save the ptx {err:?}");
            }
        }

        self.load_ptx(
            image,
            prepared.kernel_id,
            prepared.entrypoint_name,
            prepared.cube_dim,
            prepared.shared_mem_bytes,
        )?;
        Ok(())
    }

    fn load_ptx(
        &mut self,
        ptx: Vec<c_char>,
        kernel_id: KernelId,
        entrypoint_name: String,
        cube_dim: CubeDim,
        shared_mem_bytes: usize,
    ) -> Result<(), CompilationError> {
        let func_name = CString::new(entrypoint_name).unwrap();
        // SAFETY: `ptx` is a module image from NVRTC: a CUBIN, or null-terminated PTX (also from
        // caches written before CUBINs). `func_name` is a
        // null-terminated `CString` matching the kernel entry point in the compiled module.
        let func = unsafe {
            let module = cudarc::driver::result::module::load_data(ptx.as_ptr() as *const _)
                .map_err(|err| CompilationError::Generic {
                    reason: format!("Unable to load the module: {err:?}"),
                    backtrace: BackTrace::capture(),
                })?;

            cudarc::driver::result::module::get_function(module, func_name).map_err(|err| {
                CompilationError::Generic {
                    reason: format!("Unable to fetch the function from the module: {err:?}"),
                    backtrace: BackTrace::capture(),
                }
            })?
        };

        // vicinity patch: the function's dynamic shared memory limit is set once, when it loads,
        // not before every launch (a driver call per launch).
        // SAFETY: `func` is the function just fetched from its loaded module.
        unsafe {
            cudarc::driver::result::function::set_function_attribute(
                func,
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_mem_bytes as i32,
            )
        }
        .map_err(|err| CompilationError::Generic {
            reason: format!("{err:?}"),
            backtrace: BackTrace::capture(),
        })?;
        self.module_names.insert(
            kernel_id.clone(),
            CompiledKernel {
                cube_dim,
                shared_mem_bytes,
                func,
            },
        );

        Ok(())
    }

    pub fn execute_task(
        &mut self,
        stream: &mut Stream,
        kernel_id: KernelId,
        dispatch_count: (u32, u32, u32),
        tensor_maps: &[CUtensorMap],
        resources: &[GpuResource],
        const_info: Option<*mut c_void>,
    ) -> Result<(), LaunchError> {
        let mut bindings = tensor_maps
            .iter()
            .map(|map| map as *const _ as *mut c_void)
            .collect::<Vec<_>>();
        bindings.extend(resources.iter().map(|memory| memory.binding));
        bindings.extend(const_info);

        let kernel = self.module_names.get(&kernel_id).unwrap();
        let cube_dim = kernel.cube_dim;
        // SAFETY: `kernel.func` is a valid function handle from a loaded module.
        // `stream.sys` is a valid CUDA stream. `bindings` contains valid device pointers
        // for all kernel arguments. The dispatch and cube dimensions are validated by
        // the caller.
        unsafe {
            cudarc::driver::result::launch_kernel(
                kernel.func,
                dispatch_count,
                (cube_dim.x, cube_dim.y, cube_dim.z),
                // Shared memory is collected into a single buffer, with each shared memory being
                // an offset pointer
                kernel.shared_mem_bytes as u32,
                stream.sys,
                &mut bindings,
            )
            .map_err(|err| LaunchError::Unknown {
                reason: format!("{err:?}"),
                backtrace: BackTrace::capture(),
            })?;
        };

        Ok(())
    }

    fn validate_shared(&self, repr: &Option<CudaComputeKernel>) -> Result<(), LaunchError> {
        let requested = repr.as_ref().map(|repr| repr.shared_memory_size());
        let max = self.properties.hardware.max_shared_memory_size;
        if let Some(requested) = requested
            && requested > max
        {
            Err(ResourceLimitError::SharedMemory {
                requested,
                max,
                backtrace: BackTrace::capture(),
            }
            .into())
        } else {
            Ok(())
        }
    }
}
