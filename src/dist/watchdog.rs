//! Ends a job whose ranks stop making progress, naming the rank at fault.
//!
//! A collective on the GPU waits forever for a rank that died or hangs. So every rank's loop
//! reports progress ([`beat`]), each rank sends its progress to rank 0 every second over its
//! heartbeat connection, and:
//! - a rank whose process dies closes that connection: rank 0 stops at once, naming it, and the
//!   others stop when rank 0 is gone;
//! - when rank 0 sees no progress of its own for the timeout once training steps have begun, it
//!   names the ranks that are furthest behind and stops; a rank that stops hearing from rank 0
//!   stops too.
//!
//! Checkpoints are written whole or not at all (a temporary file renamed into place), so a stop
//! at any moment leaves the last one intact.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tcp::Tcp;

/// The default wait before a silent job is ended (the first step's kernel compilation and an
/// ImageNet evaluation pass fit well within it).
pub const DEFAULT_TIMEOUT_S: u64 = 600;

static STEP: AtomicU64 = AtomicU64::new(0);
static BEATS: AtomicU64 = AtomicU64::new(0);
/// Whether a training step has begun: before it (reading the data, compiling kernels) a long
/// silence is normal, and only a lost connection ends the job.
static STEPPING: AtomicBool = AtomicBool::new(false);
/// Set before the ranks' last exchange: connections closing from then on are ranks leaving.
static FINISHING: AtomicBool = AtomicBool::new(false);

/// Marks the end of the job's work: ranks may now exit without alarming the others.
pub fn finishing() {
    FINISHING.store(true, Ordering::SeqCst);
}

fn finishing_now() -> bool {
    FINISHING.load(Ordering::SeqCst)
}

/// The timeout: `VICINITY_DIST_TIMEOUT` seconds, else [`DEFAULT_TIMEOUT_S`].
pub fn timeout() -> Duration {
    let secs = std::env::var("VICINITY_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(DEFAULT_TIMEOUT_S as f64);
    Duration::from_secs_f64(secs)
}

/// Reports progress: a training step started (`Some(step)`) or other work moved on (`None`).
pub fn beat(step: Option<u64>) {
    if let Some(s) = step {
        STEP.store(s, Ordering::Relaxed);
        STEPPING.store(true, Ordering::Relaxed);
    }
    BEATS.fetch_add(1, Ordering::Relaxed);
}

fn stop(rank: usize, why: &str) -> ! {
    eprintln!("error: rank {rank}: {why}");
    std::process::exit(1);
}

/// Starts the heartbeat threads of a rank joined over `group`.
pub fn start(group: Arc<Tcp>, timeout: Duration) {
    use super::Collective;
    let rank = group.rank();
    let links = group.take_heartbeats();
    if rank != 0 {
        for (_, mut s) in links {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(timeout));
                loop {
                    let msg = [STEP.load(Ordering::Relaxed), BEATS.load(Ordering::Relaxed)];
                    let bytes: Vec<u8> = msg.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let sent = s.write_all(&bytes);
                    // Rank 0 answers each heartbeat; silence means it hangs or is gone.
                    let mut ack = [0u8; 1];
                    let answered = sent.and_then(|()| s.read_exact(&mut ack));
                    if finishing_now() {
                        // Keep the connection open until this process exits: rank 0 may still
                        // be writing its last checkpoint, and takes a closed connection for a
                        // rank that died until it reaches the final exchange itself.
                        loop {
                            std::thread::park();
                        }
                    }
                    if let Err(e) = answered {
                        stop(
                            rank,
                            &format!("lost rank 0 ({e}): it has stopped, see its output"),
                        );
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        return;
    }
    let world = group.world();
    // Each rank's (step, beats) as last heard.
    let seen = Arc::new(Mutex::new(vec![(0u64, 0u64); world]));
    for (peer, mut s) in links {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 16];
            loop {
                let read = s.read_exact(&mut buf);
                if read.is_err() && finishing_now() {
                    return;
                }
                match read {
                    Ok(()) => {
                        let step = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                        let beats = u64::from_le_bytes(buf[8..].try_into().expect("8 bytes"));
                        seen.lock().unwrap_or_else(|p| p.into_inner())[peer] = (step, beats);
                        if let Err(e) = s.write_all(&[1])
                            && !finishing_now()
                        {
                            stop(
                                0,
                                &format!(
                                    "lost rank {peer} ({e}): it has died, see its output; stopping the job"
                                ),
                            );
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        stop(
                            0,
                            &format!(
                                "rank {peer} sent no heartbeat for {} s; stopping the job",
                                timeout.as_secs()
                            ),
                        )
                    }
                    Err(e) => stop(
                        0,
                        &format!(
                            "lost rank {peer} ({e}): its process has ended, see its output; stopping the job"
                        ),
                    ),
                }
            }
        });
    }
    std::thread::spawn(move || {
        let mut last = (BEATS.load(Ordering::Relaxed), Instant::now());
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if finishing_now() {
                return;
            }
            let beats = BEATS.load(Ordering::Relaxed);
            if beats != last.0 || !STEPPING.load(Ordering::Relaxed) {
                last = (beats, Instant::now());
                continue;
            }
            if last.1.elapsed() < timeout {
                continue;
            }
            let mut steps = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            steps[0] = (STEP.load(Ordering::Relaxed), beats);
            stop(0, &stalled(&steps, timeout));
        }
    });
}

/// What rank 0 says when nothing moved for `timeout`: which ranks are furthest behind.
fn stalled(steps: &[(u64, u64)], timeout: Duration) -> String {
    let min = steps.iter().map(|s| s.0).min().unwrap_or(0);
    let max = steps.iter().map(|s| s.0).max().unwrap_or(0);
    let behind: Vec<String> = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.0 == min)
        .map(|(k, _)| k.to_string())
        .collect();
    if min == max {
        format!(
            "no progress for {} s; every rank is at step {min} (a collective hangs, or one rank is \
             stuck inside the step); stopping the job",
            timeout.as_secs()
        )
    } else {
        format!(
            "no progress for {} s; rank(s) {} stopped at step {min} while others reached step {max}: \
             they hang; stopping the job",
            timeout.as_secs(),
            behind.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_job_names_the_ranks_behind() {
        let t = Duration::from_secs(60);
        let msg = stalled(&[(12, 5), (11, 9), (12, 7), (11, 2)], t);
        assert!(msg.contains("rank(s) 1, 3 stopped at step 11"), "{msg}");
        assert!(stalled(&[(4, 1), (4, 1)], t).contains("every rank is at step 4"));
    }
}
