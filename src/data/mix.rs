//! Batch-level Mixup / CutMix and label smoothing, as timm's `Mixup` (mode 'batch').
//!
//! Sample `i` is mixed with sample `B-1-i` (timm's `x.flip(0)`), one λ per batch, and the soft
//! targets are `λ·smooth(y) + (1-λ)·smooth(flip(y))`, so every row sums to 1.

use rayon::prelude::*;

use super::augment::Mixing;
use super::rng::Rng;

/// What was done to a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixInfo {
    /// Weight of each sample's own label (1 = unmixed).
    pub lam: f32,
    pub cutmix: bool,
}

/// One-hot targets with label smoothing `eps`, mixed with the flipped batch by `lam`:
/// a `labels.len() × num_classes` row-major matrix whose rows sum to 1.
pub fn soft_targets(labels: &[usize], num_classes: usize, lam: f32, eps: f32) -> Vec<f32> {
    let off = eps / num_classes as f32;
    let on = 1.0 - eps + off;
    let b = labels.len();
    let mut t = vec![off; b * num_classes];
    for (i, &y) in labels.iter().enumerate() {
        let row = &mut t[i * num_classes..(i + 1) * num_classes];
        let y2 = labels[b - 1 - i];
        // lam·onehot(y) + (1-lam)·onehot(y2), both smoothed; off·(lam + 1-lam) = off elsewhere.
        row[y] += lam * (on - off);
        row[y2] += (1.0 - lam) * (on - off);
    }
    t
}

/// timm's `rand_bbox` + `correct_lam`: a box of area ≈ (1-λ)·H·W centred uniformly, clipped.
/// Returns (y0, y1, x0, x1) and the λ implied by the clipped box.
pub fn cutmix_box(h: usize, w: usize, lam: f64, rng: &mut Rng) -> ((usize, usize, usize, usize), f64) {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let cy = rng.below(h) as i64;
    let cx = rng.below(w) as i64;
    let clip = |v: i64, n: usize| v.clamp(0, n as i64) as usize;
    let (y0, y1) = (clip(cy - cut_h / 2, h), clip(cy + cut_h / 2, h));
    let (x0, x1) = (clip(cx - cut_w / 2, w), clip(cx + cut_w / 2, w));
    let corrected = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
    ((y0, y1, x0, x1), corrected)
}

/// The pairs (i, B-1-i) as (front[i], back[B/2-1-i]), in parallel on the current rayon pool
/// (each pair is independent, so the result does not depend on the thread count).
fn pairs<'a>(
    front: &'a mut [f32],
    back: &'a mut [f32],
    per: usize,
) -> impl ParallelIterator<Item = (&'a mut [f32], &'a mut [f32])> {
    front.par_chunks_mut(per).zip(back.par_chunks_mut(per).rev())
}

/// Mixes a batch of normalised CHW images in place (`images.len() = B·3·H·W`) and returns λ.
pub fn mix_batch(images: &mut [f32], batch: usize, size: [usize; 2], cfg: &Mixing, rng: &mut Rng) -> MixInfo {
    let unmixed = MixInfo {
        lam: 1.0,
        cutmix: false,
    };
    let (mixup, cutmix) = (cfg.mixup_alpha > 0.0, cfg.cutmix_alpha > 0.0);
    if batch == 0 || !(mixup || cutmix) || !rng.chance(cfg.prob as f64) {
        return unmixed;
    }
    let use_cutmix = if mixup && cutmix {
        rng.chance(cfg.switch_prob as f64)
    } else {
        cutmix
    };
    let alpha = if use_cutmix {
        cfg.cutmix_alpha
    } else {
        cfg.mixup_alpha
    } as f64;
    let mut lam = rng.beta(alpha, alpha);
    let [h, w] = size;
    let per = 3 * h * w;
    assert_eq!(images.len(), batch * per, "image buffer does not match the batch");
    // Pairs (i, B-1-i) are mixed together from their original values, as `x.flip(0)` does.
    let (front, back) = images.split_at_mut(batch / 2 * per);
    let back = &mut back[(batch % 2) * per..];
    if use_cutmix {
        let ((y0, y1, x0, x1), corrected) = cutmix_box(h, w, lam, rng);
        if cfg.correct_lam {
            lam = corrected;
        }
        pairs(front, back, per).for_each(|(a, b)| {
            for c in 0..3 {
                for y in y0..y1 {
                    let r = c * h * w + y * w;
                    a[r + x0..r + x1].swap_with_slice(&mut b[r + x0..r + x1]);
                }
            }
        });
    } else {
        let l = lam as f32;
        pairs(front, back, per).for_each(|(a, b)| {
            for (p, q) in a.iter_mut().zip(b.iter_mut()) {
                let (x, y) = (*p, *q);
                *p = l * x + (1.0 - l) * y;
                *q = l * y + (1.0 - l) * x;
            }
        });
    }
    MixInfo {
        lam: lam as f32,
        cutmix: use_cutmix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_values() {
        let t = soft_targets(&[2, 0], 4, 1.0, 0.1);
        let (off, on) = (0.1 / 4.0, 1.0 - 0.1 + 0.1 / 4.0);
        let expect = [off, off, on, off, on, off, off, off];
        for (a, b) in t.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn mixed_targets_pair_with_the_flipped_batch() {
        let t = soft_targets(&[0, 1, 2], 3, 0.7, 0.0);
        assert_eq!(
            t[0..3].iter().map(|v| (v * 10.0).round()).collect::<Vec<_>>(),
            [7.0, 0.0, 3.0]
        );
        assert_eq!(
            t[3..6].iter().map(|v| (v * 10.0).round()).collect::<Vec<_>>(),
            [0.0, 10.0, 0.0]
        );
        assert_eq!(
            t[6..9].iter().map(|v| (v * 10.0).round()).collect::<Vec<_>>(),
            [3.0, 0.0, 7.0]
        );
    }

    #[test]
    fn mixup_blends_pairs_and_cutmix_swaps_a_box() {
        let (b, h, w) = (3, 4, 4);
        let per = 3 * h * w;
        let orig: Vec<f32> = (0..b * per).map(|i| (i / per) as f32).collect();
        let mixup = Mixing {
            cutmix_alpha: 0.0,
            ..Mixing::timm()
        };
        let mut x = orig.clone();
        let info = mix_batch(&mut x, b, [h, w], &mixup, &mut Rng::new(5));
        assert!(!info.cutmix && info.lam > 0.0 && info.lam < 1.0);
        let l = info.lam;
        assert!((x[0] - (1.0 - l) * 2.0).abs() < 1e-5);
        assert!((x[2 * per] - (l * 2.0)).abs() < 1e-5);
        assert_eq!(x[per], 1.0); // the middle sample mixes with itself
        let cutmix = Mixing {
            mixup_alpha: 0.0,
            ..Mixing::timm()
        };
        for seed in 0..20 {
            let mut x = orig.clone();
            let info = mix_batch(&mut x, b, [h, w], &cutmix, &mut Rng::new(seed));
            assert!(info.cutmix);
            let swapped = x[..per].iter().filter(|&&v| v == 2.0).count();
            let kept = x[..per].iter().filter(|&&v| v == 0.0).count();
            assert_eq!(swapped + kept, per);
            // The corrected λ is exactly the kept fraction.
            assert!((info.lam - kept as f32 / per as f32).abs() < 1e-6);
        }
    }
}
