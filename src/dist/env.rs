//! Where a process stands in a multi-process job, read from the environment as `torchrun` and
//! `srun` set it (the authors' `main.py` reads the same variables).
//!
//! torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (under torchrun's
//! agent, whose own store holds `MASTER_PORT`, rank 0 listens on the port after it). SLURM, when
//! `WORLD_SIZE` is unset and the process is a task of an `srun` step: `SLURM_PROCID`,
//! `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`
//! defaulting to the first host of `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`) and
//! `MASTER_PORT` to [`DEFAULT_PORT`].

use anyhow::{Context, Result, bail};

/// The rendezvous port when neither the launcher nor the user names one (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// Which launcher's variables described the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `torchrun`, `vicinity launch`, or the variables set by hand.
    Torchrun,
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this node: the GPU it drives.
    pub local_rank: usize,
    /// Where rank 0 listens for the others.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

impl DistEnv {
    /// The job described by the process environment, `None` for a single process.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The job described by `var` (a lookup of environment variables), `None` for one process.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let int = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{name}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        let (launcher, rank, world, local) = if let Some(world) = int("WORLD_SIZE")? {
            let rank = int("RANK")?.context("WORLD_SIZE is set but RANK is not (torchrun sets both)")?;
            let local = int("LOCAL_RANK")?.unwrap_or(rank);
            (Launcher::Torchrun, rank, world, local)
        } else if let (Some(world), Some(_)) = (int("SLURM_STEP_NUM_TASKS")?, var("SLURM_PROCID")) {
            // A task of an `srun` step (an `salloc` shell or a batch script alone is not a job).
            let rank = int("SLURM_PROCID")?.context("SLURM_PROCID")?;
            let local = int("SLURM_LOCALID")?.unwrap_or(0);
            (Launcher::Slurm, rank, world, local)
        } else {
            return Ok(None);
        };
        if world == 0 {
            bail!("the world size is 0; it counts the processes of the job and must be at least 1");
        }
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        // One process is a job only when a launcher says where to meet (torchrun always does):
        // then it takes the multi-process path (NCCL with one rank), as under torchrun.
        if world == 1 && (var("MASTER_ADDR").is_none() || var("MASTER_PORT").is_none()) {
            return Ok(None);
        }
        let master_addr = match var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            Some(a) => a.trim().to_string(),
            None if launcher == Launcher::Slurm => {
                let list = var("SLURM_STEP_NODELIST")
                    .or_else(|| var("SLURM_JOB_NODELIST"))
                    .context("MASTER_ADDR is unset and SLURM gives no node list (SLURM_STEP_NODELIST or SLURM_JOB_NODELIST)")?;
                first_host(&list)?
            }
            None => bail!("MASTER_ADDR is unset: name the host of rank 0 (torchrun sets it)"),
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => {
                let port = p
                    .trim()
                    .parse::<u16>()
                    .with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?;
                // torchrun's agent holds its own store on MASTER_PORT: rank 0 listens on the next.
                if var("TORCHELASTIC_USE_AGENT_STORE").is_some() {
                    port.checked_add(1)
                        .context("MASTER_PORT is the last port; torchrun needs the next one free")?
                } else {
                    port
                }
            }
            None if launcher == Launcher::Slurm => DEFAULT_PORT,
            None => bail!("MASTER_PORT is unset: name the port rank 0 listens on (torchrun sets it)"),
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank: local,
            master_addr,
            master_port,
            launcher,
        }))
    }
}

/// The first host of a SLURM host list: `gpu[003-005,9],cpu1` gives `gpu003` (as `scontrol show
/// hostnames` would list it first).
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    // The first entry ends at a comma outside brackets.
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let Some(open) = entry.find('[') else {
        if entry.is_empty() {
            bail!("the SLURM node list {list:?} is empty");
        }
        return Ok(entry.to_string());
    };
    let close = entry[open..]
        .find(']')
        .map(|i| open + i)
        .with_context(|| format!("the SLURM node list {list:?} has an unclosed '['"))?;
    let range = entry[open + 1..close].split(',').next().unwrap_or("");
    let start = range.split('-').next().unwrap_or("").trim();
    if start.is_empty() || !start.chars().all(|c| c.is_ascii_digit()) {
        bail!("cannot read the SLURM node list {list:?}: {range:?} is not a number range");
    }
    // Zero padding is kept, as SLURM prints it (`gpu[003-005]` → `gpu003`).
    Ok(format!("{}{start}{}", &entry[..open], &entry[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_give_the_rank_and_rendezvous() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world: 8,
                local_rank: 1,
                master_addr: "node7".into(),
                master_port: 1234,
                launcher: Launcher::Torchrun
            }
        );
    }

    #[test]
    fn slurm_variables_fall_back_to_the_first_node_and_default_port() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_JOB_NODELIST", "gpu[007-008],cpu1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (5, 16, 5));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("gpu007", DEFAULT_PORT));
        assert_eq!(e.launcher, Launcher::Slurm);
        // Under torchrun's agent rank 0 listens on the port after MASTER_PORT.
        let t = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]);
        assert_eq!(t.unwrap().unwrap().master_port, 29501);
        // torchrun's variables win over SLURM's (torchrun inside an allocation).
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.launcher), (1, Launcher::Torchrun));
    }

    #[test]
    fn one_process_or_no_variables_is_not_a_job() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]).unwrap(),
            None
        );
        // An `salloc` shell or a batch script: SLURM_NTASKS without an srun step.
        assert_eq!(env(&[("SLURM_NTASKS", "8")]).unwrap(), None);
        assert_eq!(
            env(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")]).unwrap(),
            None
        );
        // A launcher's one-rank job takes the multi-process path.
        let one = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]);
        assert_eq!(one.unwrap().map(|e| e.world), Some(1));
    }

    #[test]
    fn bad_variables_are_named() {
        let msg = |pairs: &[(&str, &str)]| format!("{:#}", env(pairs).unwrap_err());
        assert!(msg(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(msg(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("rank 2"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")]).contains("MASTER_PORT"));
        assert!(
            msg(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "99999")
            ])
            .contains("MASTER_PORT")
        );
        assert!(msg(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_PROCID", "1")]).contains("node list"));
    }

    #[test]
    fn host_lists_expand_to_their_first_host() {
        assert_eq!(first_host("node1").unwrap(), "node1");
        assert_eq!(first_host("node1,node2").unwrap(), "node1");
        assert_eq!(first_host("gpu[003-005,9],cpu1").unwrap(), "gpu003");
        assert_eq!(first_host("a[9,10]").unwrap(), "a9");
        assert_eq!(first_host("rack[2-3]-n").unwrap(), "rack2-n");
        assert!(first_host("").is_err());
        assert!(first_host("n[1-2").is_err());
        assert!(first_host("n[x]").is_err());
    }
}
