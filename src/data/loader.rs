//! The batch loader: deterministic order, parallel decode + augmentation, bounded prefetch.
//!
//! A producer thread builds batches in order, each on a private rayon pool of `workers`
//! threads (one sample per task), and hands them over a bounded channel, so at most
//! `prefetch + 1` batches exist ahead of the trainer. Every random draw is seeded from
//! (seed, epoch, sample index) or (seed, epoch, batch index), so batches are bit-identical
//! whatever the worker count, and an epoch can be resumed at any batch.
//!
//! Over several ranks ([`Shard`]), batch `i` of an epoch is the same global batch of
//! `batch_size × world` images for every world size, and each rank builds its share of it
//! ([`shard_positions`]): every image is seen once per epoch across the ranks, and mixup/cutmix
//! pair the same images as one rank with the whole batch would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, Normalize, transform_sample};
use super::dataset::ImageDataset;
use super::mix::{MixInfo, mix_batch, soft_targets};
use super::rng::{Rng, Stream};

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Model input size [H, W].
    pub image_size: [usize; 2],
    /// Shuffle each epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop the last incomplete batch (training); keep it for evaluation.
    pub drop_last: bool,
    /// Decode/augment threads (0 = all cores).
    pub workers: usize,
    /// Finished batches allowed to wait for the trainer.
    pub prefetch: usize,
    pub seed: u64,
    /// Drop corrupt images from their batch (counted by [`Loader::skipped`]) instead of failing.
    pub skip_bad: bool,
    pub augment: AugmentConfig,
    /// This rank's share of each batch (one rank: all of it).
    #[serde(default)]
    pub shard: Shard,
}

/// A rank's place among the ranks that split every batch; `batch_size` is per rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

/// The positions in a global batch of `m` images that `rank` of `world` takes, each rank
/// `batch` of them.
///
/// `paired` (full training batches of an even per-rank size): mixup/cutmix mix position `p` with
/// `m-1-p` (the flipped batch), so each rank takes whole pairs and lays them out so that its own
/// flipped batch pairs them again: its pairs' first members in order, then their partners in
/// reverse order. Otherwise (evaluation, the last partial batch) contiguous slices. One rank
/// takes the batch as it is.
pub fn shard_positions(m: usize, batch: usize, shard: Shard, paired: bool) -> Vec<usize> {
    let Shard { rank, world } = shard;
    if world == 1 {
        return (0..m).collect();
    }
    if paired && batch.is_multiple_of(2) && m == batch * world {
        let h = batch / 2;
        let pairs = rank * h..(rank + 1) * h;
        return pairs.clone().chain(pairs.rev().map(|p| m - 1 - p)).collect();
    }
    let chunk = m.div_ceil(world);
    let start = (rank * chunk).min(m);
    (start..(start + chunk).min(m)).collect()
}

impl LoaderConfig {
    /// Training: shuffled, last partial batch dropped.
    pub fn train(batch_size: usize, image_size: [usize; 2], augment: AugmentConfig) -> Self {
        LoaderConfig {
            batch_size,
            image_size,
            shuffle: true,
            drop_last: true,
            workers: 0,
            prefetch: 4,
            seed: 0,
            skip_bad: false,
            augment,
            shard: Shard::default(),
        }
    }

    /// Evaluation: dataset order, every sample, no augmentation.
    pub fn eval(batch_size: usize, image_size: [usize; 2], normalize: Normalize) -> Self {
        LoaderConfig {
            shuffle: false,
            drop_last: false,
            ..Self::train(batch_size, image_size, AugmentConfig::eval(normalize))
        }
    }
}

/// One batch, ready to become tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// B×3×H×W, normalised, row-major.
    pub images: Vec<f32>,
    /// Hard labels (the unmixed class of each sample).
    pub labels: Vec<usize>,
    /// B×num_classes soft targets when mixing or label smoothing is on; rows sum to 1.
    pub targets: Option<Vec<f32>>,
    pub num_classes: usize,
    /// [H, W].
    pub size: [usize; 2],
    /// Dataset index of each sample (for checks and debugging).
    pub indices: Vec<usize>,
    /// Position of this batch in its epoch.
    pub index: usize,
    pub mix: MixInfo,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

struct Inner {
    dataset: Arc<ImageDataset>,
    cfg: LoaderConfig,
    pool: rayon::ThreadPool,
    skipped: AtomicUsize,
}

/// Produces the batches of an epoch; cheap to share (`Clone` shares the thread pool).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl Loader {
    pub fn new(dataset: Arc<ImageDataset>, cfg: LoaderConfig) -> Result<Self> {
        ensure!(cfg.batch_size > 0, "batch_size must be positive");
        ensure!(
            cfg.image_size[0] > 0 && cfg.image_size[1] > 0,
            "image_size must be positive"
        );
        ensure!(!dataset.is_empty(), "dataset {} is empty", dataset.name);
        let Shard { rank, world } = cfg.shard;
        ensure!(
            world > 0 && rank < world,
            "rank {rank} is not below the world size {world}"
        );
        let global = cfg.batch_size * world;
        ensure!(
            !cfg.drop_last || dataset.len() >= global,
            "dataset {} has {} samples, fewer than one batch of {global} (drop_last)",
            dataset.name,
            dataset.len(),
        );
        ensure!(
            world == 1 || cfg.augment.mixing.is_none() || cfg.batch_size.is_multiple_of(2),
            "mixup/cutmix over {world} ranks needs an even batch per rank (each rank mixes whole pairs of the global batch); \
             --batch is {}",
            cfg.batch_size
        );
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.workers
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("data-worker-{i}"))
            .build()
            .context("cannot start data worker threads")?;
        Ok(Loader {
            inner: Arc::new(Inner {
                dataset,
                cfg,
                pool,
                skipped: AtomicUsize::new(0),
            }),
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    pub fn dataset(&self) -> &ImageDataset {
        &self.inner.dataset
    }

    /// Batches per epoch (global batches, the same count on every rank).
    pub fn len(&self) -> usize {
        let cfg = &self.inner.cfg;
        let (n, b) = (self.inner.dataset.len(), cfg.batch_size * cfg.shard.world);
        if self.inner.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bad images skipped so far (with `skip_bad`).
    pub fn skipped(&self) -> usize {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// The epoch's sample order: a pure function of (seed, epoch).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        self.inner.order(epoch)
    }

    /// Builds one batch directly (no prefetch); `epoch(e, i)` yields the same batches.
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Batch> {
        ensure!(
            index < self.len(),
            "batch {index} out of range ({} per epoch)",
            self.len()
        );
        self.inner.build(epoch, index, &self.inner.order(epoch))
    }

    /// Iterates over the batches of `epoch`, starting at batch `start` (to resume mid-epoch),
    /// decoding ahead on the worker threads. A batch whose images were all skipped as bad is
    /// left out; an error ends the epoch after it is yielded.
    pub fn epoch(&self, epoch: usize, start: usize) -> Epoch {
        let (tx, rx) = sync_channel(self.inner.cfg.prefetch.max(1));
        let inner = self.inner.clone();
        let end = self.len();
        let handle = std::thread::Builder::new()
            .name("data-producer".into())
            .spawn(move || {
                let order = inner.order(epoch);
                for index in start..end {
                    let batch = inner.build(epoch, index, &order);
                    if batch.as_ref().is_ok_and(|b| b.is_empty()) {
                        continue; // every image of it was bad and skipped
                    }
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return; // the consumer is gone, or the epoch is over on an error
                    }
                }
            })
            .expect("cannot spawn the data producer thread");
        Epoch {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

impl Inner {
    fn order(&self, epoch: usize) -> Vec<usize> {
        let n = self.dataset.len();
        if self.cfg.shuffle {
            Rng::for_item(self.cfg.seed, epoch as u64, Stream::Order, 0).permutation(n)
        } else {
            (0..n).collect()
        }
    }

    fn build(&self, epoch: usize, index: usize, order: &[usize]) -> Result<Batch> {
        let cfg = &self.cfg;
        let global = cfg.batch_size * cfg.shard.world;
        let all = &order[index * global..((index + 1) * global).min(order.len())];
        let ids: Vec<usize> = shard_positions(all.len(), cfg.batch_size, cfg.shard, cfg.drop_last)
            .into_iter()
            .map(|p| all[p])
            .collect();
        let ids = &ids[..];
        let [h, w] = cfg.image_size;
        let per = 3 * h * w;
        let mut images = vec![0f32; ids.len() * per];
        advise_huge_pages(&mut images);
        let samples = &self.dataset.samples;
        let results: Vec<Result<()>> = self.pool.install(|| {
            images
                .par_chunks_mut(per)
                .zip(ids.par_iter())
                .map(|(out, &i)| {
                    let mut rng = Rng::for_item(cfg.seed, epoch as u64, Stream::Sample, i as u64);
                    let img = samples[i].decode()?;
                    transform_sample(img, &cfg.augment, cfg.image_size, &mut rng, out);
                    Ok(())
                })
                .collect()
        });
        let mut keep = Vec::with_capacity(ids.len());
        for (k, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => keep.push(k),
                Err(e) if cfg.skip_bad => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    eprintln!("warning: skipped {e:#}");
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "batch {} of epoch {} (pass --skip-bad to leave bad images out)",
                        index + 1,
                        epoch + 1
                    )));
                }
            }
        }
        let indices: Vec<usize> = keep.iter().map(|&k| ids[k]).collect();
        if keep.len() < ids.len() {
            for (dst, &k) in keep.iter().enumerate() {
                if dst != k {
                    images.copy_within(k * per..(k + 1) * per, dst * per);
                }
            }
            images.truncate(keep.len() * per);
        }
        let labels: Vec<usize> = indices.iter().map(|&i| samples[i].label).collect();
        let mut mix = MixInfo {
            lam: 1.0,
            cutmix: false,
        };
        if let Some(m) = &cfg.augment.mixing {
            let mut rng = Rng::for_item(cfg.seed, epoch as u64, Stream::Batch, index as u64);
            mix = self
                .pool
                .install(|| mix_batch(&mut images, labels.len(), cfg.image_size, m, &mut rng));
        }
        let num_classes = self.dataset.num_classes();
        let targets = cfg
            .augment
            .soft_targets()
            .then(|| soft_targets(&labels, num_classes, mix.lam, cfg.augment.label_smoothing));
        Ok(Batch {
            images,
            labels,
            targets,
            num_classes,
            size: cfg.image_size,
            indices,
            index,
            mix,
        })
    }
}

/// The batches of one epoch, in order. Dropping it stops the producer.
pub struct Epoch {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match self.rx.as_ref()?.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The producer finished (or panicked: report that rather than a short epoch).
                self.rx = None;
                let handle = self.handle.take()?;
                handle
                    .join()
                    .err()
                    .map(|_| Err(anyhow!("the data producer thread panicked")))
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Loader speed without any model.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub images: usize,
    pub batches: usize,
    pub seconds: f64,
}

impl Throughput {
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

/// Pulls up to `max_batches` batches of `epoch` through the prefetching iterator and times it.
pub fn measure_throughput(loader: &Loader, epoch: usize, max_batches: usize) -> Result<Throughput> {
    let start = Instant::now();
    let (mut images, mut batches) = (0, 0);
    for batch in loader.epoch(epoch, 0).take(max_batches) {
        images += batch?.len();
        batches += 1;
    }
    Ok(Throughput {
        images,
        batches,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Asks Linux to back a large fresh buffer with transparent huge pages. A 224×224 batch is
/// ~77 MB of new memory each time (it is handed to the trainer for good), and faulting it in
/// 4 KiB pages costs as much as resizing the images; 2 MiB pages cut that cost to a fraction.
#[cfg(target_os = "linux")]
fn advise_huge_pages(buf: &mut [f32]) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if hi > lo {
        // SAFETY: the range lies inside `buf`, which we own; MADV_HUGEPAGE is only advice and
        // changes no contents.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_buf: &mut [f32]) {}
