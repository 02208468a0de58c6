//! NCCL collectives on CubeCL's CUDA stream (the CUDA build).
//!
//! Each collective is a forward-only op queued in Burn's fusion stream
//! ([`crate::kernels::cube::run_many`]): when it runs, CubeCL's device thread hands it the raw
//! device pointers and the stream its kernels use, and the NCCL call is enqueued there, in order
//! with the kernels before and after it and without a host wait (as the cuBLAS products are).
//!
//! The library is loaded here rather than through cudarc 0.19's NCCL loader: that one looks for
//! `libnccl.so` and `libnccl.so.<CUDA major>`, while NCCL installs itself as `libnccl.so.2`
//! (PyTorch's wheels too), so it would not find NCCL on a typical machine.

use std::any::TypeId;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;

use super::Dist;
use crate::kernels::cube::{ManyOp, empty, run_many, same};

type Comm_ = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// NCCL's data types and reduction that vicinity uses (nccl.h).
const NCCL_FLOAT32: c_int = 7;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_FLOAT16: c_int = 6;
const NCCL_AVG: c_int = 4;

struct Lib {
    _lib: libloading::Library,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm_, c_int, UniqueId, c_int) -> c_int,
    all_reduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm_, *mut c_void) -> c_int,
    broadcast:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm_, *mut c_void) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// The names NCCL is found under, most specific first.
const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: loading NCCL runs its initialisers, which only set up the library; the symbols
        // are looked up with the signatures of nccl.h.
        unsafe {
            let lib = LIB_NAMES
                .iter()
                .find_map(|&n| libloading::Library::new(n).ok())
                .ok_or_else(|| {
                    format!(
                        "NCCL was not found (tried {}); install NCCL or add its folder to LD_LIBRARY_PATH \
                         (PyTorch's nvidia-nccl wheel puts it in site-packages/nvidia/nccl/lib)",
                        LIB_NAMES.join(", ")
                    )
                })?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("NCCL lacks {}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            Ok(Lib {
                get_version: sym!(b"ncclGetVersion"),
                get_unique_id: sym!(b"ncclGetUniqueId"),
                comm_init_rank: sym!(b"ncclCommInitRank"),
                all_reduce: sym!(b"ncclAllReduce"),
                broadcast: sym!(b"ncclBroadcast"),
                error_string: sym!(b"ncclGetErrorString"),
                _lib: lib,
            })
        }
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn check(lib: &Lib, code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for every result code.
    let msg = unsafe { std::ffi::CStr::from_ptr((lib.error_string)(code)) };
    bail!("{what} failed: {} (NCCL result {code})", msg.to_string_lossy())
}

/// One rank's NCCL communicator.
pub struct Comm {
    raw: usize,
    device: usize,
    pub version: i32,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nccl::Comm(device {}, NCCL {})", self.device, self.version)
    }
}

impl Comm {
    /// Builds the communicator of every rank of `dist` on GPU `device`: rank 0 makes the unique
    /// id and hands it to the others over the host connection.
    pub fn init(dist: &Dist, device: usize) -> Result<Comm> {
        let lib = lib()?;
        let mut version = 0;
        // SAFETY: an out-parameter of the declared type.
        check(lib, unsafe { (lib.get_version)(&mut version) }, "ncclGetVersion")?;
        // Averaging (ncclAvg) and bf16 came with NCCL 2.10.
        if version < 21000 {
            bail!("NCCL {version} is too old: vicinity needs NCCL 2.10 or newer (ncclAvg, bf16)");
        }
        let id = if dist.is_main() {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: an out-parameter of the declared type.
            check(lib, unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let id = dist.collective().broadcast(id)?;
        if id.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes, not 128", id.len());
        }
        let mut uid = UniqueId { internal: [0; 128] };
        uid.internal
            .iter_mut()
            .zip(&id)
            .for_each(|(d, &s)| *d = s as c_char);
        cudarc::driver::result::init()
            .map_err(|e| anyhow::anyhow!("the CUDA driver did not start: {e:?}"))?;
        crate::kernels::cublas::bind_context(device).map_err(|e| anyhow::anyhow!("GPU {device}: {e}"))?;
        let mut raw: Comm_ = std::ptr::null_mut();
        // SAFETY: the context of `device` is current; `raw` is an out-parameter.
        let code =
            unsafe { (lib.comm_init_rank)(&mut raw, dist.world() as c_int, uid, dist.rank() as c_int) };
        check(lib, code, "ncclCommInitRank")
            .with_context(|| format!("rank {} of {} on GPU {device}", dist.rank(), dist.world()))?;
        Ok(Comm {
            raw: raw as usize,
            device,
            version,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mean,
    Broadcast,
}

/// One collective on one flat tensor, as a fusion-stream op.
#[derive(Debug, Clone)]
struct Collective {
    comm: Arc<Comm>,
    kind: Kind,
}

impl ManyOp for Collective {
    fn output_shape(&self, inputs: &[Shape]) -> Shape {
        inputs[0].clone()
    }

    fn forward<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> CubeTensor<R> {
        assert_eq!(
            TypeId::of::<R>(),
            TypeId::of::<CudaRuntime>(),
            "NCCL runs on CUDA tensors"
        );
        let input = into_contiguous(inputs.into_iter().next().expect("one input"));
        let x: CubeTensor<CudaRuntime> = same(input);
        let shape = x.meta.shape().clone();
        let count: usize = shape.num_elements();
        let dtype = match x.dtype {
            DType::F32 => NCCL_FLOAT32,
            DType::BF16 => NCCL_BFLOAT16,
            DType::F16 => NCCL_FLOAT16,
            other => panic!("NCCL collectives take float tensors, not {other:?}"),
        };
        let out = empty(&x, shape, x.dtype);
        let (comm, kind, device) = (self.comm.raw, self.kind, self.comm.device);
        let handles = vec![x.handle.clone(), out.handle.clone()];
        out.client.run_with_resources(
            handles,
            Box::new(move |resources| {
                let (src, dst) = (&resources[0], &resources[1]);
                let lib = lib().expect("NCCL was loaded when the communicator was built");
                if let Err(e) = crate::kernels::cublas::bind_context(device) {
                    panic!("NCCL on GPU {device}: {e}");
                }
                // SAFETY: both pointers are live CubeCL allocations of `count` elements (the
                // bindings keep them alive until this runs, and later work reusing them is
                // ordered after this call on the same stream); `comm` was built for this device.
                let code = unsafe {
                    let (s, d, st) = (
                        src.ptr as *const c_void,
                        dst.ptr as *mut c_void,
                        dst.stream as *mut c_void,
                    );
                    match kind {
                        Kind::Mean => (lib.all_reduce)(s, d, count, dtype, NCCL_AVG, comm as Comm_, st),
                        Kind::Broadcast => (lib.broadcast)(s, d, count, dtype, 0, comm as Comm_, st),
                    }
                };
                if let Err(e) = check(lib, code, "an NCCL collective") {
                    // Past the point of handing back an error: fail loudly rather than train
                    // on tensors another rank never sent.
                    panic!("{e:#}");
                }
            }),
        );
        same(out)
    }
}

fn run<B: Backend>(comm: &Arc<Comm>, kind: Kind, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    let op = Collective {
        comm: comm.clone(),
        kind,
    };
    match run_many::<B, _>(&op, vec![crate::kernels::primitive(t)]) {
        Ok(out) => Ok(crate::kernels::tensor(out)),
        Err(_) => bail!("NCCL collectives need the CUDA backend (--backend cuda)"),
    }
}

/// `t` averaged over the ranks, in its own dtype.
pub fn all_reduce_mean<B: Backend>(comm: &Arc<Comm>, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    run(comm, Kind::Mean, t)
}

/// Rank 0's `t` on every rank.
pub fn broadcast<B: Backend>(comm: &Arc<Comm>, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    run(comm, Kind::Broadcast, t)
}
