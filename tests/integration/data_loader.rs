//! Loader and augmentation invariants: shapes, soft targets, determinism, worker-count
//! independence, resume, eval identity; plus an ignored throughput benchmark on real data.

use std::sync::Arc;

use vicinity::data::augment::to_chw;
use vicinity::data::synth::synthetic_dataset;
use vicinity::data::{
    AugmentConfig, Batch, Crop, ImageDataset, Loader, LoaderConfig, Mixing, Normalize, Shard,
    measure_throughput, open_split, shard_positions,
};

const CLASSES: usize = 5;

fn dataset() -> Arc<ImageDataset> {
    Arc::new(synthetic_dataset(37, CLASSES, 20, 16))
}

fn loader(ds: &Arc<ImageDataset>, augment: AugmentConfig, seed: u64, workers: usize) -> Loader {
    let mut cfg = LoaderConfig::train(8, [24, 28], augment);
    cfg.seed = seed;
    cfg.workers = workers;
    Loader::new(ds.clone(), cfg).unwrap()
}

fn all(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch, 0).map(|b| b.unwrap()).collect()
}

fn assert_rows_sum_to_one(b: &Batch) {
    let t = b.targets.as_ref().expect("soft targets");
    assert_eq!(t.len(), b.len() * b.num_classes);
    for row in t.chunks(b.num_classes) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}: {row:?}");
        assert!(row.iter().all(|&v| v >= 0.0));
    }
}

/// The loader of rank `rank` of `world`, `per` images per rank.
fn shard_loader(
    ds: &Arc<ImageDataset>,
    augment: AugmentConfig,
    per: usize,
    rank: usize,
    world: usize,
) -> Loader {
    let mut cfg = LoaderConfig::train(per, [24, 28], augment);
    cfg.seed = 3;
    cfg.workers = 2;
    cfg.shard = Shard { rank, world };
    Loader::new(ds.clone(), cfg).unwrap()
}

#[test]
fn ranks_split_each_global_batch_and_mix_the_same_pairs() {
    let ds = dataset();
    let plane = 3 * 24 * 28;
    for world in [2, 4] {
        let per = 8 / world;
        let one = shard_loader(&ds, AugmentConfig::papers(), 8, 0, 1);
        let ranks: Vec<Loader> = (0..world)
            .map(|r| shard_loader(&ds, AugmentConfig::papers(), per, r, world))
            .collect();
        assert!(ranks.iter().all(|l| l.len() == one.len()));
        let mut seen = Vec::new();
        for (index, whole) in all(&one, 1).into_iter().enumerate() {
            // Each rank's images, labels and soft targets are the whole batch's rows at its positions.
            for (r, l) in ranks.iter().enumerate() {
                let part = l.batch(1, index).unwrap();
                assert_eq!(part.len(), per);
                let pos = shard_positions(8, per, Shard { rank: r, world }, true);
                let k = part.num_classes;
                for (i, &p) in pos.iter().enumerate() {
                    assert_eq!(part.indices[i], whole.indices[p]);
                    assert_eq!(
                        part.images[i * plane..(i + 1) * plane],
                        whole.images[p * plane..(p + 1) * plane]
                    );
                    let (a, b) = (part.targets.as_ref().unwrap(), whole.targets.as_ref().unwrap());
                    assert_eq!(a[i * k..(i + 1) * k], b[p * k..(p + 1) * k]);
                }
                assert_eq!(part.mix, whole.mix);
                seen.extend(part.indices);
            }
        }
        // Every image at most once per epoch, and as many as one rank sees.
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!((n, seen.len()), (one.len() * 8, one.len() * 8));
    }
}

#[test]
fn evaluation_shards_cover_every_image_once() {
    let ds = dataset();
    for world in [1, 2, 3, 5] {
        let mut seen = Vec::new();
        for r in 0..world {
            let mut cfg = LoaderConfig::eval(4, [24, 28], Normalize::IMAGENET);
            cfg.shard = Shard { rank: r, world };
            let l = Loader::new(ds.clone(), cfg).unwrap();
            seen.extend(all(&l, 0).into_iter().flat_map(|b| b.indices));
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..ds.len()).collect::<Vec<_>>(), "world {world}");
    }
    // Mixing pairs cannot be split over ranks when a rank's batch is odd.
    let mut cfg = LoaderConfig::train(3, [24, 28], AugmentConfig::papers());
    cfg.shard = Shard { rank: 0, world: 2 };
    let err = Loader::new(ds.clone(), cfg)
        .err()
        .expect("odd batch with mixing refused");
    assert!(format!("{err:#}").contains("even batch"), "{err:#}");
}

#[test]
fn papers_recipe_shapes_and_soft_targets() {
    let ds = dataset();
    let l = loader(&ds, AugmentConfig::papers(), 1, 2);
    assert_eq!(l.len(), 4); // 37 / 8, last partial batch dropped
    let batches = all(&l, 0);
    assert_eq!(batches.len(), 4);
    let mut mixed = 0;
    for b in &batches {
        assert_eq!(b.len(), 8);
        assert_eq!(b.size, [24, 28]);
        assert_eq!(b.images.len(), 8 * 3 * 24 * 28);
        assert!(b.images.iter().all(|v| v.is_finite()));
        assert_eq!(b.num_classes, CLASSES);
        for (&i, &y) in b.indices.iter().zip(&b.labels) {
            assert_eq!(ds.samples[i].label, y);
        }
        assert_rows_sum_to_one(b);
        // Each row puts its weight on the sample's label and its flipped partner's label.
        let t = b.targets.as_ref().unwrap();
        for (i, &y) in b.labels.iter().enumerate() {
            let partner = b.labels[b.len() - 1 - i];
            let row = &t[i * CLASSES..(i + 1) * CLASSES];
            let main = row[y] + if partner != y { row[partner] } else { 0.0 };
            let rest = 1.0 - main;
            let others = CLASSES - if partner != y { 2 } else { 1 };
            assert!((rest - others as f32 * 0.1 / CLASSES as f32).abs() < 1e-5);
        }
        if b.mix.lam < 1.0 {
            mixed += 1;
        }
    }
    assert!(mixed > 0, "Mixup/CutMix with prob 1.0 never mixed");
}

#[test]
fn label_smoothing_alone_gives_exact_values() {
    let ds = dataset();
    let aug = AugmentConfig {
        label_smoothing: 0.1,
        ..AugmentConfig::cifar_fast()
    };
    let b = loader(&ds, aug, 3, 1).batch(0, 0).unwrap();
    let t = b.targets.as_ref().unwrap();
    let (off, on) = (0.1 / CLASSES as f32, 0.9 + 0.1 / CLASSES as f32);
    for (i, &y) in b.labels.iter().enumerate() {
        for c in 0..CLASSES {
            let want = if c == y { on } else { off };
            assert!((t[i * CLASSES + c] - want).abs() < 1e-6);
        }
    }
    // No mixing and no smoothing: no soft targets at all.
    let b = loader(&ds, AugmentConfig::cifar_fast(), 3, 1)
        .batch(0, 0)
        .unwrap();
    assert!(b.targets.is_none());
}

#[test]
fn mixup_only_and_cutmix_only() {
    let ds = dataset();
    for (mixup_alpha, cutmix_alpha) in [(0.8, 0.0), (0.0, 1.0)] {
        let aug = AugmentConfig {
            mixing: Some(Mixing {
                mixup_alpha,
                cutmix_alpha,
                ..Mixing::timm()
            }),
            label_smoothing: 0.0,
            ..AugmentConfig::cifar_fast()
        };
        for b in all(&loader(&ds, aug, 4, 2), 0) {
            assert_eq!(b.mix.cutmix, cutmix_alpha > 0.0);
            assert_rows_sum_to_one(&b);
            let t = b.targets.as_ref().unwrap();
            let y = b.labels[0];
            let partner = b.labels[b.len() - 1];
            if partner != y {
                assert!((t[y] - b.mix.lam).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different() {
    let ds = dataset();
    let a = all(&loader(&ds, AugmentConfig::papers(), 7, 2), 3);
    let b = all(&loader(&ds, AugmentConfig::papers(), 7, 2), 3);
    assert_eq!(a, b);
    let c = all(&loader(&ds, AugmentConfig::papers(), 8, 2), 3);
    assert_ne!(a[0].indices, c[0].indices);
    assert_ne!(a[0].images, c[0].images);
    // Another epoch: another order.
    let d = all(&loader(&ds, AugmentConfig::papers(), 7, 2), 4);
    assert_ne!(a[0].indices, d[0].indices);
}

#[test]
fn worker_count_does_not_change_batches() {
    let ds = dataset();
    let one = all(&loader(&ds, AugmentConfig::papers(), 11, 1), 0);
    let four = all(&loader(&ds, AugmentConfig::papers(), 11, 4), 0);
    assert_eq!(one, four);
}

#[test]
fn resume_mid_epoch_gives_the_same_batches() {
    let ds = dataset();
    let l = loader(&ds, AugmentConfig::papers(), 5, 2);
    let full = all(&l, 2);
    let resumed: Vec<Batch> = l.epoch(2, 2).map(|b| b.unwrap()).collect();
    assert_eq!(resumed.len(), 2);
    assert_eq!(resumed[0].index, 2);
    assert_eq!(&full[2..], &resumed[..]);
    // A fresh loader (as after a restart) and the direct per-batch path agree too.
    let fresh = loader(&ds, AugmentConfig::papers(), 5, 3);
    assert_eq!(fresh.batch(2, 3).unwrap(), full[3]);
    // Dropping an epoch early stops its producer without hanging.
    let mut it = l.epoch(0, 0);
    it.next().unwrap().unwrap();
    drop(it);
}

#[test]
fn order_is_a_permutation_and_eval_keeps_everything_in_order() {
    let ds = dataset();
    let l = loader(&ds, AugmentConfig::papers(), 9, 2);
    let mut order = l.order(0);
    order.sort();
    assert_eq!(order, (0..37).collect::<Vec<_>>());

    let eval = Loader::new(ds.clone(), LoaderConfig::eval(8, [16, 20], Normalize::CIFAR10)).unwrap();
    let batches = all(&eval, 0);
    assert_eq!(batches.len(), 5);
    assert_eq!(batches[4].len(), 5);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen, (0..37).collect::<Vec<_>>());
    // Same size in and out: eval is exactly the normalised image.
    let b = &batches[1];
    let per = 3 * 16 * 20;
    for (k, &i) in b.indices.iter().enumerate() {
        let mut want = vec![0.0; per];
        to_chw(&ds.samples[i].decode().unwrap(), &Normalize::CIFAR10, &mut want);
        assert_eq!(&b.images[k * per..(k + 1) * per], &want[..]);
    }
    assert!(b.targets.is_none());
}

#[test]
fn flip_mirrors_and_pad_crop_shifts() {
    let ds = dataset();
    let size = [16, 20];
    let mk = |aug: AugmentConfig| {
        let mut cfg = LoaderConfig::eval(37, size, Normalize::IMAGENET);
        cfg.augment = aug;
        Loader::new(ds.clone(), cfg).unwrap().batch(0, 0).unwrap()
    };
    let plain = mk(AugmentConfig::eval(Normalize::IMAGENET));
    let flipped = mk(AugmentConfig {
        hflip: 1.0,
        ..AugmentConfig::eval(Normalize::IMAGENET)
    });
    let (h, w) = (size[0], size[1]);
    for (a, b) in plain.images.chunks(w).zip(flipped.images.chunks(w)) {
        let mut rev = a.to_vec();
        rev.reverse();
        assert_eq!(rev, b);
    }
    // Pad-4 reflect + random crop: every output is the input shifted by at most 4 pixels,
    // and across the batch some shift is not zero.
    let padded = mk(AugmentConfig {
        hflip: 0.0,
        ..AugmentConfig::cifar_fast()
    });
    let plain = mk(AugmentConfig::eval(Normalize::CIFAR10));
    let per = 3 * h * w;
    let mut shifted = 0;
    for k in 0..37 {
        let (a, b) = (
            &plain.images[k * per..(k + 1) * per],
            &padded.images[k * per..(k + 1) * per],
        );
        let found = (-4i64..=4)
            .flat_map(|dy| (-4i64..=4).map(move |dx| (dy, dx)))
            .find(|&(dy, dx)| {
                (4..h - 4).all(|y| {
                    (4..w - 4)
                        .all(|x| b[y * w + x] == a[(y as i64 + dy) as usize * w + (x as i64 + dx) as usize])
                })
            });
        let (dy, dx) = found.expect("pad-crop output is not a shift of the input");
        if (dy, dx) != (0, 0) {
            shifted += 1;
        }
    }
    assert!(shifted > 20, "only {shifted} of 37 shifted");
}

#[test]
fn resize_and_crops_reach_the_model_size() {
    let ds = dataset(); // 20×16 images
    for crop in [
        Crop::Resize,
        Crop::CenterCrop { crop_pct: 0.875 },
        Crop::RandomResized {
            scale: [0.08, 1.0],
            ratio: [0.75, 1.333],
        },
        Crop::PadCrop {
            pad: Some(4),
            reflect: false,
        },
    ] {
        let mut cfg = LoaderConfig::eval(4, [40, 36], Normalize::IMAGENET);
        cfg.augment.crop = crop.clone();
        let b = Loader::new(ds.clone(), cfg).unwrap().batch(0, 1).unwrap();
        assert_eq!(b.images.len(), 4 * 3 * 40 * 36, "{crop:?}");
        assert!(b.images.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn bad_configs_fail() {
    let ds = dataset();
    let mut cfg = LoaderConfig::train(64, [8, 8], AugmentConfig::cifar_fast());
    assert!(Loader::new(ds.clone(), cfg.clone()).is_err()); // 37 < one batch with drop_last
    cfg.batch_size = 0;
    assert!(Loader::new(ds.clone(), cfg).is_err());
    let l = loader(&ds, AugmentConfig::cifar_fast(), 0, 1);
    assert!(l.batch(0, 4).is_err());
}

#[test]
fn throughput_helper_counts_images() {
    let ds = dataset();
    let l = loader(&ds, AugmentConfig::papers(), 0, 2);
    let t = measure_throughput(&l, 0, 3).unwrap();
    assert_eq!((t.batches, t.images), (3, 24));
    assert!(t.images_per_sec() > 0.0);
}

/// CPU seconds used by this process so far (Linux), to report speed per core even when other
/// jobs share the machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime + stime, in USER_HZ = 100 ticks
}

/// Loader speed on real images (Fashion-MNIST from Debian's `dataset-fashion-mnist`), all cores;
/// run with `cargo test --release --test integration bench_real_loader_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_real_loader_throughput() {
    let ds = Arc::new(open_split("/usr/share/datasets/fashion-mnist", "train").unwrap());
    let workers = 0;
    for (name, aug, size, batches) in [
        ("cifar_fast 32x32", AugmentConfig::cifar_fast(), 32, 100),
        ("eval 32x32", AugmentConfig::eval(Normalize::CIFAR10), 32, 100),
        ("papers 224x224", AugmentConfig::papers(), 224, 16),
        ("eval 224x224", AugmentConfig::eval(Normalize::IMAGENET), 224, 16),
    ] {
        let mut cfg = LoaderConfig::train(128, [size, size], aug);
        cfg.workers = workers;
        let l = Loader::new(ds.clone(), cfg).unwrap();
        let cpu = cpu_seconds();
        let t = measure_throughput(&l, 0, batches).unwrap();
        let cpu = cpu_seconds() - cpu;
        eprintln!(
            "{name}: {} images in {:.2} s = {:.0} images/s ({:.2} CPU s, {:.0} images per CPU second)",
            t.images,
            t.seconds,
            t.images_per_sec(),
            cpu,
            t.images as f64 / cpu.max(1e-9)
        );
    }
}
