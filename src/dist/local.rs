//! Ranks as threads of one process, exchanging through shared memory: the in-process harness
//! that tests data-parallel training on the CPU.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;

use super::Collective;

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One rank of a group of threads; [`Local::group`] makes all of them.
pub struct Local {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl Local {
    /// The `world` ranks of one group, rank 0 first (hand one to each thread).
    pub fn group(world: usize) -> Vec<Local> {
        assert!(world > 0, "a group has at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
        });
        (0..world)
            .map(|rank| Local {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collective for Local {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn gather(&self, bytes: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
        self.slots()[self.rank] = bytes;
        self.shared.barrier.wait();
        let out = (self.rank == 0).then(|| std::mem::take(&mut *self.slots()));
        if let Some(all) = &out {
            *self.slots() = vec![Vec::new(); all.len()];
        }
        // Nobody writes a slot again before rank 0 has taken them.
        self.shared.barrier.wait();
        Ok(out)
    }

    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if self.rank == 0 {
            self.slots()[0] = bytes;
        }
        self.shared.barrier.wait();
        let out = self.slots()[0].clone();
        self.shared.barrier.wait();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Dist;

    #[test]
    fn sums_and_broadcasts_agree_on_every_thread() {
        let results: Vec<(Vec<f64>, bool, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = Local::group(3)
                .into_iter()
                .map(|l| {
                    s.spawn(move || {
                        let rank = l.rank as f64;
                        let d = Dist::new(Arc::new(l));
                        let mut v = vec![rank, 10.0 * rank + 1.0];
                        d.sum_f64(&mut v).unwrap();
                        let any = d.any(d.rank() == 2).unwrap();
                        let none = d.any(false).unwrap();
                        (v, any, none)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (v, any, none) in results {
            assert_eq!(v, vec![3.0, 33.0]);
            assert!(any);
            assert!(!none);
        }
    }
}
