//! Resizing a box of an RGB image, as PIL's `Image.resize(size, filter, box)`.
//!
//! A separable convolution with precomputed weights; when shrinking, the filter widens with the
//! scale (antialiasing, as PIL and torchvision do). Cropping and resizing in one pass saves a
//! copy, and this is several times faster than `image::imageops::resize`, which matters because
//! every training sample at 224×224 goes through it.

use image::RgbImage;

use super::augment::Interpolation;

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Keys' cubic with a = -0.5 (PIL's BICUBIC).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: first input index and normalised weights.
fn weights(
    in_size: usize,
    out_size: usize,
    start: f64,
    len: f64,
    interp: Interpolation,
) -> Vec<(usize, Vec<f32>)> {
    let (kernel, support): (fn(f64) -> f64, f64) = match interp {
        Interpolation::Bilinear => (bilinear, 1.0),
        Interpolation::Bicubic => (bicubic, 2.0),
    };
    let scale = len / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = support * filter_scale;
    (0..out_size)
        .map(|o| {
            let center = start + (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
            let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, in_size);
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| kernel((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum.abs() > 1e-12 {
                w.iter_mut().for_each(|v| *v /= sum);
            } else {
                // Degenerate (box entirely outside): nearest pixel.
                w.iter_mut().for_each(|v| *v = 0.0);
                w[0] = 1.0;
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Resizes the box `(x, y, w, h)` (fractional, in input pixels) of `img` to `out_w × out_h`.
pub fn resize_box(img: &RgbImage, bx: [f64; 4], out_w: u32, out_h: u32, interp: Interpolation) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let wx = weights(iw, ow, bx[0], bx[2], interp);
    let wy = weights(ih, oh, bx[1], bx[3], interp);
    // Only the input rows some output row reads.
    let row_lo = wy.iter().map(|(s, _)| *s).min().unwrap_or(0);
    let row_hi = wy.iter().map(|(s, w)| s + w.len()).max().unwrap_or(0);
    let src = img.as_raw();
    // Horizontal pass into f32 rows.
    let mut tmp = vec![0f32; (row_hi - row_lo) * ow * 3];
    for (r, y) in (row_lo..row_hi).enumerate() {
        let row = &src[y * iw * 3..(y + 1) * iw * 3];
        let out = &mut tmp[r * ow * 3..(r + 1) * ow * 3];
        for (o, (start, w)) in wx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let p = &row[(start + k) * 3..(start + k) * 3 + 3];
                acc[0] += wk * p[0] as f32;
                acc[1] += wk * p[1] as f32;
                acc[2] += wk * p[2] as f32;
            }
            out[o * 3..o * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass, accumulating whole rows (vectorises well).
    let mut out = vec![0u8; oh * ow * 3];
    let mut acc = vec![0f32; ow * 3];
    for (o, (start, w)) in wy.iter().enumerate() {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for (k, &wk) in w.iter().enumerate() {
            let r = start + k - row_lo;
            let row = &tmp[r * ow * 3..(r + 1) * ow * 3];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += wk * v;
            }
        }
        for (d, &a) in out[o * ow * 3..(o + 1) * ow * 3].iter_mut().zip(&acc) {
            *d = (a.clamp(0.0, 255.0) + 0.5) as u8;
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size matches")
}

/// Resizes the whole image.
pub fn resize(img: &RgbImage, out_w: u32, out_h: u32, interp: Interpolation) -> RgbImage {
    let bx = [0.0, 0.0, img.width() as f64, img.height() as f64];
    resize_box(img, bx, out_w, out_h, interp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn same_size_is_identity_and_constant_stays_constant() {
        let img = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 40, 9]));
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            assert_eq!(resize(&img, 7, 5, interp), img);
            let flat = RgbImage::from_pixel(9, 4, Rgb([10, 200, 77]));
            for (w, h) in [(3, 2), (20, 31), (9, 1)] {
                let r = resize(&flat, w, h, interp);
                assert!(r.pixels().all(|p| p.0 == [10, 200, 77]), "{w}x{h}");
            }
        }
    }

    #[test]
    fn box_selects_the_region() {
        // Black at x < 2, white elsewhere: the box 4..8 (and the filter support around it,
        // which PIL also reads) is all white.
        let img = RgbImage::from_fn(8, 4, |x, _| if x < 2 { Rgb([0; 3]) } else { Rgb([255; 3]) });
        let r = resize_box(&img, [4.0, 0.0, 4.0, 4.0], 2, 2, Interpolation::Bilinear);
        assert!(r.iter().all(|&v| v == 255));
        // Halving widens the filter (antialiasing): PIL gives 71 and 207 here.
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([[0, 100, 200, 250][x as usize]; 3]));
        let r = resize(&img, 2, 1, Interpolation::Bilinear);
        assert_eq!([r.get_pixel(0, 0)[0], r.get_pixel(1, 0)[0]], [71, 207]);
    }
}
