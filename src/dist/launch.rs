//! `vicinity launch`: starts the local ranks of a job, as `torchrun` does.
//!
//! Each rank is this binary run again with the given arguments and the torchrun variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), plus
//! `NCCL_NVLS_ENABLE=0` unless set (NVLink multicast can take shared GPUs out of service). When a
//! rank fails, the others get a few seconds to stop on their own and are then killed; the launch
//! exits with the failed rank's status.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the local ranks sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Processes on this node (one per GPU).
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchPlan {
    pub fn validate(&self) -> Result<()> {
        if self.nproc == 0 || self.nnodes == 0 {
            bail!("--nproc and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {} is not below --nnodes {}",
                self.node_rank,
                self.nnodes
            );
        }
        Ok(())
    }

    pub fn world(&self) -> usize {
        self.nproc * self.nnodes
    }

    /// The environment of local rank `local`.
    pub fn env(&self, local: usize) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("RANK", (self.node_rank * self.nproc + local).to_string()),
            ("WORLD_SIZE", self.world().to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            v.push(("NCCL_NVLS_ENABLE".into(), "0".into()));
        }
        v
    }
}

/// A free TCP port on this machine (for a one-node job with no `--master-port`).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs `args` as every local rank of `plan` and waits for them. Returns the job's exit code.
pub fn launch(plan: &LaunchPlan, args: &[String]) -> Result<i32> {
    plan.validate()?;
    if args.is_empty() {
        bail!(
            "nothing to launch: give the command after the launch options, e.g. `vicinity launch --nproc 8 train ...`"
        );
    }
    let exe = std::env::current_exe().context("cannot find the vicinity binary to start the ranks")?;
    // Ctrl-C reaches every rank (same process group); the launcher waits for them to pause.
    crate::train::signals::install_interrupt_handler();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(plan.nproc);
    for local in 0..plan.nproc {
        let child = Command::new(&exe)
            .args(args)
            .envs(plan.env(local))
            .spawn()
            .with_context(|| format!("cannot start local rank {local}"));
        match child {
            Ok(c) => children.push((local, c)),
            Err(e) => {
                stop_all(&mut children, Duration::ZERO);
                return Err(e);
            }
        }
    }
    let mut code = 0;
    while !children.is_empty() {
        let mut ended = Vec::new();
        for (i, (local, child)) in children.iter_mut().enumerate() {
            let Some(status) = child.try_wait().context("waiting for a rank")? else {
                continue;
            };
            ended.push(i);
            let rank = plan.node_rank * plan.nproc + *local;
            let c = exit_code(status);
            if c != 0 {
                eprintln!("launch: rank {rank} exited with {}", describe(status));
                if code == 0 {
                    code = c;
                }
            }
        }
        for i in ended.into_iter().rev() {
            children.swap_remove(i);
        }
        if code != 0 && !children.is_empty() {
            eprintln!("launch: stopping the other ranks");
            stop_all(&mut children, Duration::from_secs(5));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(code)
}

/// Gives the ranks `grace` to end on their own, then kills them.
fn stop_all(children: &mut [(usize, Child)], grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        return c;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("signal {sig}");
        }
    }
    format!("status {}", status.code().unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::DistEnv;

    #[test]
    fn each_local_rank_gets_torchrun_variables() {
        let plan = LaunchPlan {
            nproc: 4,
            nnodes: 2,
            node_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29501,
        };
        plan.validate().unwrap();
        let vars = plan.env(2);
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let e = DistEnv::from_vars(get).unwrap().unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (6, 8, 2));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 29501));
        let bad = LaunchPlan { node_rank: 2, ..plan };
        assert!(bad.validate().is_err());
    }
}
