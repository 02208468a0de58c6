//! The rendezvous and host collectives over TCP: rank 0 listens on `MASTER_ADDR:MASTER_PORT`,
//! every other rank connects to it twice (one connection for collectives, one for the
//! watchdog's heartbeats). Collectives go through rank 0 (gather there, broadcast back), which
//! is what small host values and the NCCL unique id need; a rank that dies closes its
//! connections and one that hangs stops answering, and either is reported by rank number.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Collective, DistEnv};

const MAGIC: &[u8; 4] = b"VCNT";
const VERSION: u32 = 1;
/// What a connection is for, sent in its hello.
const COLLECTIVE: u8 = 0;
const HEARTBEAT: u8 = 1;
/// The largest frame accepted (a hostile or confused peer cannot make a rank allocate more).
const MAX_FRAME: u64 = 1 << 32;

/// One rank's connections.
pub struct Tcp {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the other ranks' collective connections, by rank (index 0 unused). The others:
    /// one, to rank 0.
    peers: Mutex<Vec<Option<TcpStream>>>,
    /// The heartbeat connections, taken by the watchdog.
    heartbeats: Mutex<Vec<(usize, TcpStream)>>,
}

impl Tcp {
    /// Rendezvous: rank 0 waits for the others, the others connect (retrying while rank 0 is not
    /// up yet), each for at most `timeout`.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let (peers, heartbeats) = if env.rank == 0 {
            accept_all(env, deadline)?
        } else {
            let addr = resolve(&env.master_addr, env.master_port)?;
            let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
            peers[0] = Some(dial(addr, env, COLLECTIVE, deadline)?);
            let hb = dial(addr, env, HEARTBEAT, deadline)?;
            (peers, vec![(0, hb)])
        };
        for s in peers.iter().flatten() {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
        }
        Ok(Tcp {
            rank: env.rank,
            world: env.world,
            timeout,
            peers: Mutex::new(peers),
            heartbeats: Mutex::new(heartbeats),
        })
    }

    /// The heartbeat connections (rank 0: one per other rank; the others: one to rank 0).
    pub fn take_heartbeats(&self) -> Vec<(usize, TcpStream)> {
        std::mem::take(&mut *self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Vec<Option<TcpStream>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> anyhow::Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
                "rank {peer} sent nothing for {} s (it hangs, or is far behind); stopping rank {} \
                 (VICINITY_DIST_TIMEOUT sets the wait)",
                self.timeout.as_secs(),
                self.rank
            ),
            std::io::ErrorKind::UnexpectedEof => anyhow::anyhow!(
                "lost rank {peer}: its connection closed (the process ended), see its own output; stopping rank {}",
                self.rank
            ),
            _ => anyhow::anyhow!(
                "lost rank {peer} ({e}): it has probably died, see its own output; stopping rank {}",
                self.rank
            ),
        }
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn gather(&self, bytes: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
        let mut peers = self.peers();
        if self.rank != 0 {
            let s = peers[0].as_mut().expect("a connection to rank 0");
            write_frame(s, &bytes).map_err(|e| self.lost(0, e))?;
            return Ok(None);
        }
        let mut all = vec![bytes];
        for (k, s) in peers.iter_mut().enumerate().skip(1) {
            let s = s.as_mut().expect("a connection per rank");
            all.push(read_frame(s).map_err(|e| self.lost(k, e))?);
        }
        Ok(Some(all))
    }

    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let mut peers = self.peers();
        if self.rank != 0 {
            let s = peers[0].as_mut().expect("a connection to rank 0");
            return read_frame(s).map_err(|e| self.lost(0, e));
        }
        for (k, s) in peers.iter_mut().enumerate().skip(1) {
            let s = s.as_mut().expect("a connection per rank");
            write_frame(s, &bytes).map_err(|e| self.lost(k, e))?;
        }
        Ok(bytes)
    }
}

/// The IPv4 address of `host` (rank 0 listens on IPv4; `localhost` may resolve to `::1` first).
fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve MASTER_ADDR {host}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("MASTER_ADDR {host} resolves to no address"))
}

fn hello(env: &DistEnv, kind: u8) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(VERSION.to_le_bytes());
    h.extend((env.rank as u32).to_le_bytes());
    h.extend((env.world as u32).to_le_bytes());
    h.push(kind);
    h
}

fn dial(addr: SocketAddr, env: &DistEnv, kind: u8, deadline: Instant) -> Result<TcpStream> {
    let mut last_error = None;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1)),
                ))?;
                s.write_all(&hello(env, kind))?;
                let mut ok = [0u8; 1];
                s.read_exact(&mut ok)
                    .with_context(|| format!("rank 0 at {addr} did not answer"))?;
                match ok[0] {
                    1 => return Ok(s),
                    2 => bail!(
                        "rank 0 at {addr} runs a job of another world size than {}",
                        env.world
                    ),
                    3 => bail!(
                        "rank 0 at {addr} already has a rank {} (two processes claim it)",
                        env.rank
                    ),
                    _ => bail!("rank 0 at {addr} refused this rank"),
                }
            }
            Err(e) => {
                last_error = Some(e);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    bail!(
        "rank 0 did not answer at {addr} ({}); is it running, and is MASTER_ADDR:MASTER_PORT reachable from here?",
        last_error.map_or("timed out".into(), |e| e.to_string())
    )
}

type Accepted = (Vec<Option<TcpStream>>, Vec<(usize, TcpStream)>);

fn accept_all(env: &DistEnv, deadline: Instant) -> Result<Accepted> {
    let listener = TcpListener::bind(("0.0.0.0", env.master_port)).with_context(|| {
        format!(
            "rank 0 cannot listen on port {} (taken by another job? pick another MASTER_PORT)",
            env.master_port
        )
    })?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
    let mut heartbeats: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
    let wanted = 2 * (env.world - 1);
    let mut got = 0;
    while got < wanted {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..env.world)
                .filter(|&k| peers[k].is_none() || heartbeats[k].is_none())
                .map(|k| k.to_string())
                .collect();
            bail!(
                "ranks {} did not join within the timeout (VICINITY_DIST_TIMEOUT); were they started, with MASTER_ADDR pointing here?",
                missing.join(", ")
            );
        }
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("accepting a rank"),
        };
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut h = [0u8; 17];
        if s.read_exact(&mut h).is_err() || &h[..4] != MAGIC {
            continue; // not a vicinity rank (a port scanner, a stale client)
        }
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes")) as usize;
        let (version, rank, world, kind) = (word(4), word(8), word(12), h[16]);
        let slot = match kind {
            COLLECTIVE => &mut peers,
            HEARTBEAT => &mut heartbeats,
            _ => continue,
        };
        let answer = if version != VERSION as usize || world != env.world {
            2
        } else if rank == 0 || rank >= env.world || slot[rank].is_some() {
            3
        } else {
            1
        };
        // A rank that left before the answer is simply not counted.
        if s.write_all(&[answer]).is_err() {
            continue;
        }
        if answer == 1 {
            slot[rank] = Some(s);
            got += 1;
        }
    }
    let heartbeats = heartbeats
        .into_iter()
        .enumerate()
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect();
    Ok((peers, heartbeats))
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes announced (not a vicinity rank?)"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{Dist, Launcher};
    use std::sync::Arc;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
        }
    }

    #[test]
    fn ranks_meet_and_sum_over_tcp() {
        let port = free_port();
        let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let t = Tcp::connect(&env(r, 3, port), Duration::from_secs(20)).unwrap();
                        assert_eq!(t.take_heartbeats().len(), if r == 0 { 2 } else { 1 });
                        let d = Dist::new(Arc::new(t));
                        let mut v = vec![r as f64, 1.0];
                        d.sum_f64(&mut v).unwrap();
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(sums.iter().all(|v| v == &[3.0, 3.0]));
    }

    #[test]
    fn a_rank_that_dies_or_hangs_is_named() {
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || {
                let t = Tcp::connect(&env(0, 3, port), Duration::from_secs(2)).unwrap();
                let d = Dist::new(Arc::new(t));
                format!("{:#}", d.sum_f64(&mut [1.0]).unwrap_err())
            });
            // Rank 1 joins and leaves at once; rank 2 joins and says nothing.
            let early =
                s.spawn(move || drop(Tcp::connect(&env(1, 3, port), Duration::from_secs(20)).unwrap()));
            let quiet = s.spawn(move || {
                let t = Tcp::connect(&env(2, 3, port), Duration::from_secs(20)).unwrap();
                std::thread::sleep(Duration::from_secs(4));
                drop(t);
            });
            let msg = root.join().unwrap();
            assert!(msg.contains("rank 1"), "{msg}");
            early.join().unwrap();
            quiet.join().unwrap();
        });
        // A hang: rank 1 stays connected but silent past the timeout.
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || {
                let t = Tcp::connect(&env(0, 2, port), Duration::from_secs(1)).unwrap();
                let d = Dist::new(Arc::new(t));
                format!("{:#}", d.sum_f64(&mut [1.0]).unwrap_err())
            });
            let quiet = s.spawn(move || {
                let t = Tcp::connect(&env(1, 2, port), Duration::from_secs(20)).unwrap();
                std::thread::sleep(Duration::from_secs(3));
                drop(t);
            });
            let msg = root.join().unwrap();
            assert!(msg.contains("rank 1 sent nothing"), "{msg}");
            quiet.join().unwrap();
        });
    }

    #[test]
    fn a_missing_rank_or_a_wrong_world_is_refused() {
        let port = free_port();
        let msg = format!(
            "{:#}",
            Tcp::connect(&env(0, 2, port), Duration::from_millis(300))
                .err()
                .unwrap()
        );
        assert!(msg.contains("ranks 1 did not join"), "{msg}");
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || Tcp::connect(&env(0, 2, port), Duration::from_secs(2)).err());
            let wrong = s.spawn(move || Tcp::connect(&env(1, 3, port), Duration::from_secs(2)).err());
            let msg = format!("{:#}", wrong.join().unwrap().unwrap());
            assert!(msg.contains("another world size"), "{msg}");
            assert!(root.join().unwrap().is_some());
        });
    }
}
