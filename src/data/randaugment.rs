//! timm's RandAugment on 8-bit RGB images: the op set, the magnitude draws, each op as PIL
//! computes it, and timm's config strings (`rand-m9-mstd0.5-inc1`).

use anyhow::{Result, bail};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// timm's RandAugment (`rand-m9-mstd0.5-inc1` = 2 ops, magnitude 9, std 0.5, increasing set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandAugment {
    /// Ops applied per image, drawn with replacement.
    pub num_ops: usize,
    /// Magnitude on timm's 0..10 scale.
    pub magnitude: f32,
    /// Std of the Gaussian noise added to the magnitude at each op (0 = fixed).
    pub magnitude_std: f32,
    /// Probability that each drawn op is actually applied (timm: 0.5).
    pub prob: f32,
    /// timm's 'inc' op set, where larger magnitudes always mean stronger ops.
    pub increasing: bool,
}

impl RandAugment {
    /// timm's `rand-m9-mstd0.5-inc1`.
    pub fn m9_mstd05_inc1() -> Self {
        RandAugment {
            num_ops: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
            prob: 0.5,
            increasing: true,
        }
    }
}

/// timm's RandAugment string: `rand-m9-mstd0.5-inc1`, `rand-m7-n3-p1.0`, or `off`/`none`.
pub fn parse_randaug(s: &str) -> Result<Option<RandAugment>> {
    if matches!(s, "off" | "none" | "0") {
        return Ok(None);
    }
    let mut ra = RandAugment {
        increasing: false,
        magnitude_std: 0.0,
        ..RandAugment::m9_mstd05_inc1()
    };
    let mut parts = s.split('-');
    if parts.next() != Some("rand") {
        bail!("RandAugment '{s}' must start with 'rand-' (e.g. rand-m9-mstd0.5-inc1) or be 'off'");
    }
    for p in parts {
        let bad = || anyhow::anyhow!("cannot read '{p}' in RandAugment '{s}'");
        if let Some(v) = p.strip_prefix("mstd") {
            ra.magnitude_std = v.parse().map_err(|_| bad())?;
        } else if let Some(v) = p.strip_prefix("inc") {
            ra.increasing = v == "1";
        } else if let Some(v) = p.strip_prefix('m') {
            ra.magnitude = v.parse().map_err(|_| bad())?;
        } else if let Some(v) = p.strip_prefix('n') {
            ra.num_ops = v.parse().map_err(|_| bad())?;
        } else if let Some(v) = p.strip_prefix('p') {
            ra.prob = v.parse().map_err(|_| bad())?;
        } else {
            return Err(bad());
        }
    }
    Ok(Some(ra))
}

/// RandAugment's operations (timm's `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

impl Op {
    pub const ALL: [Op; 15] = [
        Op::AutoContrast,
        Op::Equalize,
        Op::Invert,
        Op::Rotate,
        Op::Posterize,
        Op::Solarize,
        Op::SolarizeAdd,
        Op::Color,
        Op::Contrast,
        Op::Brightness,
        Op::Sharpness,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateXRel,
        Op::TranslateYRel,
    ];
}

fn randomly_negate(v: f64, rng: &mut Rng) -> f64 {
    if rng.uniform() > 0.5 { -v } else { v }
}

/// Applies `num_ops` random ops (with replacement), each with probability `prob` and a
/// magnitude drawn around `magnitude`, clipped to timm's [0, 10].
pub fn rand_augment(img: &mut RgbImage, cfg: &RandAugment, fill: [u8; 3], rng: &mut Rng) {
    for _ in 0..cfg.num_ops {
        let op = Op::ALL[rng.below(Op::ALL.len())];
        if cfg.prob < 1.0 && rng.uniform() > cfg.prob as f64 {
            continue;
        }
        let mut m = cfg.magnitude as f64;
        if cfg.magnitude_std > 0.0 {
            m += cfg.magnitude_std as f64 * rng.normal();
        }
        apply_op(img, op, m.clamp(0.0, 10.0), cfg.increasing, fill, rng);
    }
}

/// One RandAugment op at `level` in [0, 10], with timm's level-to-argument mappings.
pub fn apply_op(img: &mut RgbImage, op: Op, level: f64, increasing: bool, fill: [u8; 3], rng: &mut Rng) {
    let frac = level / 10.0;
    let enhance = |rng: &mut Rng| {
        if increasing {
            (1.0 + randomly_negate(frac * 0.9, rng)).max(0.1)
        } else {
            frac * 1.8 + 0.1
        }
    };
    let (w, h) = (img.width() as f64, img.height() as f64);
    match op {
        Op::AutoContrast => auto_contrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => map_lut(img, |v| 255 - v),
        Op::Rotate => {
            let deg = randomly_negate(frac * 30.0, rng);
            // PIL rotates counter-clockwise about the centre; the matrix maps output → input.
            let a = -deg.to_radians();
            let (cx, cy) = (w / 2.0, h / 2.0);
            let (cos, sin) = (a.cos(), a.sin());
            let m = [
                cos,
                sin,
                cx - cos * cx - sin * cy,
                -sin,
                cos,
                cy + sin * cx - cos * cy,
            ];
            *img = affine(img, m, fill);
        }
        Op::Posterize => {
            let bits = (frac * 4.0) as i32;
            let bits = if increasing { 4 - bits } else { bits };
            posterize(img, bits.clamp(0, 8) as u32);
        }
        Op::Solarize => {
            let t = (frac * 256.0) as i32;
            let thresh = if increasing { 256 - t } else { t };
            map_lut(img, |v| if (v as i32) < thresh { v } else { 255 - v });
        }
        Op::SolarizeAdd => {
            let add = (frac * 110.0) as u32;
            map_lut(img, |v| {
                if v < 128 {
                    (v as u32 + add).min(255) as u8
                } else {
                    v
                }
            });
        }
        Op::Color => {
            let f = enhance(rng);
            let grey = img.clone();
            let mut grey = grey;
            for p in grey.pixels_mut() {
                let l = luma(p);
                *p = Rgb([l, l, l]);
            }
            blend(img, &grey, f);
        }
        Op::Contrast => {
            let f = enhance(rng);
            let n = (img.width() * img.height()).max(1) as f64;
            let mean = img.pixels().map(|p| luma(p) as f64).sum::<f64>() / n;
            let m = (mean + 0.5) as u8;
            let degenerate = RgbImage::from_pixel(img.width(), img.height(), Rgb([m, m, m]));
            blend(img, &degenerate, f);
        }
        Op::Brightness => {
            let f = enhance(rng);
            let black = RgbImage::new(img.width(), img.height());
            blend(img, &black, f);
        }
        Op::Sharpness => {
            let f = enhance(rng);
            let smooth = smooth(img);
            blend(img, &smooth, f);
        }
        Op::ShearX => {
            let s = randomly_negate(frac * 0.3, rng);
            *img = affine(img, [1.0, s, 0.0, 0.0, 1.0, 0.0], fill);
        }
        Op::ShearY => {
            let s = randomly_negate(frac * 0.3, rng);
            *img = affine(img, [1.0, 0.0, 0.0, s, 1.0, 0.0], fill);
        }
        Op::TranslateXRel => {
            let t = randomly_negate(frac * 0.45, rng) * w;
            *img = affine(img, [1.0, 0.0, t, 0.0, 1.0, 0.0], fill);
        }
        Op::TranslateYRel => {
            let t = randomly_negate(frac * 0.45, rng) * h;
            *img = affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, t], fill);
        }
    }
}

/// PIL's ITU-R 601-2 luma (`convert('L')`).
fn luma(p: &Rgb<u8>) -> u8 {
    ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8
}

fn map_lut(img: &mut RgbImage, f: impl Fn(u8) -> u8) {
    let lut: [u8; 256] = std::array::from_fn(|v| f(v as u8));
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

fn posterize(img: &mut RgbImage, bits: u32) {
    if bits >= 8 {
        return;
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    map_lut(img, |v| v & mask);
}

/// PIL's `Image.blend(degenerate, img, f)`: `degenerate + f·(img - degenerate)`, clipped.
fn blend(img: &mut RgbImage, degenerate: &RgbImage, f: f64) {
    let f = f as f32;
    for (v, &d) in img.iter_mut().zip(degenerate.iter()) {
        let d = d as f32;
        *v = ((d + f * (*v as f32 - d)).clamp(0.0, 255.0) + 0.5) as u8;
    }
}

/// PIL's SMOOTH filter (3×3, centre 5, others 1, /13); border pixels are kept.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let src = img.as_raw();
    let dst: &mut [u8] = &mut out;
    let stride = w * 3;
    for y in 1..h - 1 {
        let (up, mid, down) = (
            &src[(y - 1) * stride..y * stride],
            &src[y * stride..(y + 1) * stride],
            &src[(y + 1) * stride..(y + 2) * stride],
        );
        let row = &mut dst[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            let sum = up[i - 3] as u32
                + up[i] as u32
                + up[i + 3] as u32
                + mid[i - 3] as u32
                + 5 * mid[i] as u32
                + mid[i + 3] as u32
                + down[i - 3] as u32
                + down[i] as u32
                + down[i + 3] as u32;
            row[i] = ((sum + 6) / 13) as u8;
        }
    }
    out
}

/// Per-channel histogram of an RGB image.
fn histograms(img: &RgbImage) -> [[u32; 256]; 3] {
    let mut h = [[0u32; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            h[c][p[c] as usize] += 1;
        }
    }
    h
}

fn map_channels(img: &mut RgbImage, luts: &[[u8; 256]; 3]) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            p[c] = luts[c][p[c] as usize];
        }
    }
}

/// PIL's `ImageOps.autocontrast` (cutoff 0): stretch each channel to 0..255.
fn auto_contrast(img: &mut RgbImage) {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(255);
        std::array::from_fn(|v| {
            if hi <= lo {
                v as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                ((v as f64 - lo as f64) * scale).clamp(0.0, 255.0) as u8
            }
        })
    });
    map_channels(img, &luts);
}

/// PIL's `ImageOps.equalize`: per-channel histogram equalisation.
fn equalize(img: &mut RgbImage) {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let nonzero: Vec<u32> = h.iter().copied().filter(|&n| n > 0).collect();
        let identity: [u8; 256] = std::array::from_fn(|v| v as u8);
        if nonzero.len() <= 1 {
            return identity;
        }
        let step = (nonzero.iter().sum::<u32>() - nonzero[nonzero.len() - 1]) / 255;
        if step == 0 {
            return identity;
        }
        let mut n = step / 2;
        std::array::from_fn(|v| {
            let out = (n / step).min(255) as u8;
            n += h[v];
            out
        })
    });
    map_channels(img, &luts);
}

/// PIL-style affine warp with bilinear sampling: `m` maps output pixel centres to input
/// coordinates (`x_in = m0·x + m1·y + m2`, `y_in = m3·x + m4·y + m5`); outside is `fill`.
/// (timm picks bilinear or bicubic at random for these ops; we always use bilinear.)
fn affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (wf, hf) = (w as f32, h as f32);
    let m = m.map(|v| v as f32);
    let src = img.as_raw();
    let mut out = vec![0u8; w * h * 3];
    for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
        let yo = y as f32 + 0.5;
        let (bx, by) = (m[1] * yo + m[2], m[4] * yo + m[5]);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let xo = x as f32 + 0.5;
            let (xi, yi) = (m[0] * xo + bx, m[3] * xo + by);
            if !(xi >= 0.0 && yi >= 0.0 && xi < wf && yi < hf) {
                px.copy_from_slice(&fill);
                continue;
            }
            let (xs, ys) = ((xi - 0.5).max(0.0), (yi - 0.5).max(0.0));
            let (x0, y0) = (xs as usize, ys as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (fx, fy) = (xs - x0 as f32, ys - y0 as f32);
            let (r0, r1) = (y0 * w * 3, y1 * w * 3);
            for c in 0..3 {
                let top = src[r0 + x0 * 3 + c] as f32 * (1.0 - fx) + src[r0 + x1 * 3 + c] as f32 * fx;
                let bot = src[r1 + x0 * 3 + c] as f32 * (1.0 - fx) + src[r1 + x1 * 3 + c] as f32 * fx;
                px[c] = ((top * (1.0 - fy) + bot * fy).clamp(0.0, 255.0) + 0.5) as u8;
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer size matches")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 11 % 256) as u8,
                ((x + y) * 3 % 256) as u8,
            ])
        })
    }

    #[test]
    fn identity_affine_and_zero_level_ops_keep_the_image() {
        let img = gradient(16, 12);
        assert_eq!(affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0; 3]), img);
        let mut rng = Rng::new(1);
        // Level 0 in the non-increasing set: rotate/shear/translate by 0, solarize-add by 0.
        for op in [
            Op::Rotate,
            Op::ShearX,
            Op::ShearY,
            Op::TranslateXRel,
            Op::SolarizeAdd,
        ] {
            let mut x = img.clone();
            apply_op(&mut x, op, 0.0, true, [0; 3], &mut rng);
            assert_eq!(x, img, "{op:?}");
        }
        // Increasing set at level 0: enhance factor 1 keeps the image.
        for op in [Op::Color, Op::Contrast, Op::Brightness, Op::Sharpness] {
            let mut x = img.clone();
            apply_op(&mut x, op, 0.0, true, [0; 3], &mut rng);
            assert_eq!(x, img, "{op:?}");
        }
    }

    #[test]
    fn point_ops_match_pil() {
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([x as u8 * 60, 10, 200]));
        let mut inv = img.clone();
        apply_op(&mut inv, Op::Invert, 5.0, true, [0; 3], &mut Rng::new(0));
        assert_eq!(inv.get_pixel(1, 0).0, [195, 245, 55]);
        // Increasing solarize at level 10: threshold 0, everything inverted.
        let mut sol = img.clone();
        apply_op(&mut sol, Op::Solarize, 10.0, true, [0; 3], &mut Rng::new(0));
        assert_eq!(sol, inv);
        // Increasing posterize at level 10 keeps 0 bits: black.
        let mut post = img.clone();
        apply_op(&mut post, Op::Posterize, 10.0, true, [0; 3], &mut Rng::new(0));
        assert!(post.iter().all(|&v| v == 0));
        // Autocontrast stretches channel 0 (0..180) to 0..255.
        let mut ac = img.clone();
        auto_contrast(&mut ac);
        assert_eq!(ac.get_pixel(3, 0)[0], 255);
        assert_eq!(ac.get_pixel(0, 0)[0], 0);
        assert_eq!(ac.get_pixel(0, 0)[1], 10); // constant channel unchanged
    }

    #[test]
    fn rotate_90_moves_corners() {
        let img = RgbImage::from_fn(3, 3, |x, y| Rgb([(y * 3 + x) as u8 * 10, 0, 0]));
        // Level 10 → 30°, not 90; rotate by building the matrix directly through apply_op is
        // level-limited, so check a quarter turn of the affine helper instead.
        let (cx, cy) = (1.5, 1.5);
        let a: f64 = -90f64.to_radians();
        let (c, s) = (a.cos(), a.sin());
        let m = [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy];
        let out = affine(&img, m, [0; 3]);
        // Counter-clockwise: the top-right input pixel (2,0) lands at the top-left.
        assert_eq!(out.get_pixel(0, 0)[0], img.get_pixel(2, 0)[0]);
    }
}
