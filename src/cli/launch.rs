//! `vicinity launch`: the local ranks of a multi-GPU job.

use anyhow::Result;
use clap::Args;

use super::{Matmul, Settings};
use crate::backend::BackendKind;
use crate::dist::launch::{LaunchPlan, free_port, launch};

/// `vicinity launch --nproc N <command> ...`.
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Processes to start on this node, one per GPU (each drives the GPU of its local rank).
    #[arg(long)]
    pub nproc: usize,
    /// Nodes in the job (run one launch per node).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's place among the nodes (0 holds rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of rank 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port rank 0 listens on (default: a free one with one node, 29500 with several).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// The command every rank runs, e.g. `train --model vvt_tiny --data ...`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the ranks; returns the job's exit code.
pub fn launch_command(a: &LaunchArgs, settings: &Settings) -> Result<i32> {
    let master_port = match a.master_port {
        Some(p) => p,
        None if a.nnodes == 1 => free_port()?,
        None => crate::dist::env::DEFAULT_PORT,
    };
    let plan = LaunchPlan {
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr.clone(),
        master_port,
    };
    plan.validate()?;
    // The global options given before `launch` apply to every rank.
    let mut args: Vec<String> = Vec::new();
    let backend = match settings.backend {
        BackendKind::Auto => "auto",
        BackendKind::Flex => "flex",
        BackendKind::Cuda => "cuda",
    };
    args.extend(["--backend".into(), backend.into()]);
    let matmul = match settings.matmul {
        Matmul::Cublas => "cublas",
        Matmul::Cubecl => "cubecl",
    };
    args.extend(["--matmul".into(), matmul.into()]);
    if let Some(d) = &settings.cache_dir {
        args.extend(["--cache-dir".into(), d.to_string_lossy().into_owned()]);
    }
    if let Some(t) = &settings.autotune {
        args.extend(["--autotune".into(), t.clone()]);
    }
    args.extend(a.command.iter().cloned());
    eprintln!(
        "launch: {} rank(s) on this node (ranks {}..{} of {}), rendezvous at {}:{master_port}",
        plan.nproc,
        plan.node_rank * plan.nproc,
        (plan.node_rank + 1) * plan.nproc - 1,
        plan.world(),
        plan.master_addr
    );
    launch(&plan, &args)
}
