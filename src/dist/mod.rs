//! Data-parallel training over several processes, one per GPU, on one or many nodes.
//!
//! A job is started by `vicinity launch`, `torchrun` or `srun`; [`env`] reads where a process
//! stands from their variables. Rank 0 listens on `MASTER_ADDR:MASTER_PORT` and the others
//! connect to it ([`tcp`]): that connection carries small host values (evaluation totals, the
//! agreement to stop) and, on the CUDA build, the NCCL unique id from which every rank builds its
//! NCCL communicator ([`nccl`]). Gradients and the initial weights then move over NCCL on the
//! GPU; without NCCL (the CPU build) they go through rank 0 over TCP, which is slow but exact.
//!
//! Every rank holds the same weights: rank 0's are broadcast at the start, and each step
//! averages the gradients, so that the optimizer, clipping on the global norm and the EMA take
//! the same values everywhere. [`Local`] runs the ranks as threads of one process (the tests).

pub mod env;
pub mod launch;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;
pub mod watchdog;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;

pub use env::{DistEnv, Launcher};
pub use local::Local;

/// The host side of a group of ranks: each call is made by every rank, in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Rank 0 receives every rank's bytes, in rank order; the other ranks `None`.
    fn gather(&self, bytes: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>>;
    /// Every rank receives rank 0's bytes (what the others pass is ignored).
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
}

/// One process alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn gather(&self, bytes: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![bytes]))
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
}

/// A rank's handle on its group: host collectives, and device ones where the build has NCCL.
#[derive(Clone)]
pub struct Dist {
    comm: Arc<dyn Collective>,
    #[cfg(feature = "cuda")]
    nccl: Option<Arc<nccl::Comm>>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist(rank {} of {})", self.rank(), self.world())
    }
}

impl Default for Dist {
    fn default() -> Self {
        Self::solo()
    }
}

impl Dist {
    /// A single process: every collective is the identity.
    pub fn solo() -> Self {
        Self::new(Arc::new(Solo))
    }

    /// Ranks that move tensors through the host collective `comm`.
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Dist {
            comm,
            #[cfg(feature = "cuda")]
            nccl: None,
        }
    }

    /// Moves device tensors over NCCL (the CUDA build).
    #[cfg(feature = "cuda")]
    pub fn with_nccl(mut self, comm: Arc<nccl::Comm>) -> Self {
        self.nccl = Some(comm);
        self
    }

    /// Whether tensors move over NCCL rather than through the host.
    pub fn uses_nccl(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.nccl.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// Whether this rank writes files and prints progress (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn collective(&self) -> &dyn Collective {
        self.comm.as_ref()
    }

    /// Element-wise sums over the ranks, added in rank order: the same bits on every rank.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.sum_host(values)
    }

    /// Whether any rank says yes (stopping together: budget, Ctrl-C).
    pub fn any(&self, yes: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(yes))];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// The ranks' last exchange: after it, a rank may exit without the others taking it for a
    /// failure. Call once the command's work is done.
    pub fn finish(&self) -> Result<()> {
        if self.world() > 1 {
            watchdog::finishing();
            self.sum_f64(&mut [0.0])?;
        }
        Ok(())
    }

    /// Rank 0's `yes` on every rank (decisions that rank 0's clock makes for all).
    pub fn main_says(&self, yes: bool) -> Result<bool> {
        let mut v = [if self.is_main() {
            f64::from(u8::from(yes))
        } else {
            0.0
        }];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// `t` averaged over the ranks (gradients). f32 on the host path; NCCL averages in the
    /// tensor's own dtype.
    pub fn mean<B: Backend>(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if self.world() == 1 && !self.uses_nccl() {
            return Ok(t);
        }
        #[cfg(feature = "cuda")]
        if let Some(comm) = &self.nccl {
            return nccl::all_reduce_mean(comm, t);
        }
        let device = t.device();
        let dtype = t.dtype();
        let (_, mut values) = crate::io::to_host(t)?;
        self.sum_host(&mut values)?;
        let inv = 1.0 / self.world() as f32;
        values.iter_mut().for_each(|v| *v *= inv);
        let n = values.len();
        Ok(Tensor::from_data(TensorData::new(values, [n]), (&device, dtype)))
    }

    /// Rank 0's `t` on every rank (the initial weights).
    pub fn broadcast<B: Backend>(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if self.world() == 1 && !self.uses_nccl() {
            return Ok(t);
        }
        #[cfg(feature = "cuda")]
        if let Some(comm) = &self.nccl {
            return nccl::broadcast(comm, t);
        }
        let device = t.device();
        let dtype = t.dtype();
        let n = t.dims()[0];
        let bytes = if self.is_main() {
            let (_, values) = crate::io::to_host(t)?;
            encode(&values)
        } else {
            Vec::new()
        };
        let bytes = self.comm.broadcast(bytes)?;
        let values = decode::<f32>(&bytes, n).context("the weights from rank 0")?;
        Ok(Tensor::from_data(TensorData::new(values, [n]), (&device, dtype)))
    }

    /// Rank 0's parameters in `model` on every rank (the start of a run). The values move on
    /// the inner backend (NCCL works on plain device tensors) and come back as trainable
    /// parameters.
    pub fn broadcast_model<AB, M>(&self, model: M) -> Result<M>
    where
        AB: burn::tensor::backend::AutodiffBackend,
        M: burn::module::AutodiffModule<AB>,
    {
        if self.world() == 1 && !self.uses_nccl() {
            return Ok(model);
        }
        let mut values = std::collections::BTreeMap::new();
        for (name, t) in crate::train::params::collect_flat(&model.valid()) {
            values.insert(name, Tensor::<AB, 1>::from_inner(self.broadcast(t)?));
        }
        Ok(crate::train::params::replace_flat(model, &values, None))
    }

    /// Sums `values` over the ranks through rank 0: gathered, added in rank order, broadcast.
    fn sum_host<T: Wire>(&self, values: &mut [T]) -> Result<()> {
        let total = match self.comm.gather(encode(values))? {
            Some(all) => {
                let mut total = vec![T::default(); values.len()];
                for (rank, b) in all.iter().enumerate() {
                    let v = decode::<T>(b, values.len()).with_context(|| format!("rank {rank}'s values"))?;
                    total.iter_mut().zip(v).for_each(|(t, v)| *t = *t + v);
                }
                encode(&total)
            }
            None => Vec::new(),
        };
        let total = self.comm.broadcast(total)?;
        values.copy_from_slice(&decode::<T>(&total, values.len()).context("the sums from rank 0")?);
        Ok(())
    }
}

/// A number that crosses the host connection as little-endian bytes.
trait Wire: Copy + Default + std::ops::Add<Output = Self> {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

/// Little-endian bytes of the float types the ranks exchange.
macro_rules! wire {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend(self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("SIZE bytes"))
            }
        }
    )*};
}
wire!(f32, f64);

fn encode<T: Wire>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * T::SIZE);
    values.iter().for_each(|v| v.put(&mut out));
    out
}

fn decode<T: Wire>(bytes: &[u8], n: usize) -> Result<Vec<T>> {
    if bytes.len() != n * T::SIZE {
        bail!(
            "expected {n} values, got {} bytes: the ranks disagree on what they exchange",
            bytes.len()
        );
    }
    Ok(bytes.chunks_exact(T::SIZE).map(T::get).collect())
}

/// Joins the job this process's environment describes (`torchrun`, `srun`, `vicinity launch`),
/// or stands alone when it describes none. On the CUDA build with `gpu` set, the ranks also build
/// an NCCL communicator and this process's GPU is its local rank.
pub fn join(gpu: bool) -> Result<Dist> {
    let Some(env) = DistEnv::from_env()? else {
        return Ok(Dist::solo());
    };
    let timeout = watchdog::timeout();
    let group = tcp::Tcp::connect(&env, timeout).with_context(|| {
        format!(
            "rank {} could not join the job at {}:{}",
            env.rank, env.master_addr, env.master_port
        )
    })?;
    let group = Arc::new(group);
    watchdog::start(group.clone(), timeout);
    let dist = Dist::new(group);
    #[cfg(feature = "cuda")]
    if gpu {
        let comm = nccl::Comm::init(&dist, crate::backend::gpu_index()).context("NCCL could not start")?;
        return Ok(dist.with_nccl(Arc::new(comm)));
    }
    let _ = gpu;
    Ok(dist)
}

/// The GPU a rank drives: its local rank (one process per GPU), 0 alone.
pub fn local_device_index() -> usize {
    DistEnv::from_env().ok().flatten().map_or(0, |e| e.local_rank)
}

/// Test hook: `VICINITY_DEBUG_FAULT=exit:RANK:STEP` ends rank `RANK` (status 3) as it starts step
/// `STEP`, `hang:RANK:STEP` stops it there forever, so that the tests can show how a job ends
/// when a rank dies or hangs. Read once; a malformed value is ignored.
pub fn debug_fault(dist: &Dist, step: u64) {
    static FAULT: std::sync::OnceLock<Option<(bool, usize, u64)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("VICINITY_DEBUG_FAULT").ok()?;
        let mut it = v.split(':');
        let hang = match it.next()? {
            "exit" => false,
            "hang" => true,
            _ => return None,
        };
        Some((hang, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    });
    if let Some((hang, rank, at)) = *fault
        && rank == dist.rank()
        && at == step
    {
        if hang {
            eprintln!("rank {rank}: VICINITY_DEBUG_FAULT: hanging at step {step}");
            loop {
                std::thread::park();
            }
        }
        eprintln!("rank {rank}: VICINITY_DEBUG_FAULT: exiting at step {step}");
        std::process::exit(3);
    }
}
