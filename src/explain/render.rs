//! Maps as pictures: a map scaled to [0, 1] and resized to the image (bilinear, as OpenCV's
//! `resize`), coloured with the jet colour map and laid over the image at half weight, as
//! pytorch-grad-cam's `show_cam_on_image` does; and sheets of such pictures side by side.

use image::{Rgb, RgbImage};

use crate::plot;

/// A map of `rows × cols` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Map {
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "a {rows}x{cols} map needs {} values",
            rows * cols
        );
        Self { rows, cols, values }
    }

    /// `(v − min) / (max − min + 1e-7)`, pytorch-grad-cam's `scale_cam_image`: the map in [0, 1].
    pub fn scaled(&self) -> Map {
        let min = self.values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = self.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let values = self
            .values
            .iter()
            .map(|v| (v - min) / (max - min + 1e-7))
            .collect();
        Map::new(self.rows, self.cols, values)
    }

    /// Bilinear resize to `rows × cols` with pixel centres aligned (OpenCV's `INTER_LINEAR`,
    /// PyTorch's `align_corners=False`).
    pub fn resized(&self, rows: usize, cols: usize) -> Map {
        let sample = |pos: usize, from: usize, to: usize| {
            let x = ((pos as f32 + 0.5) * from as f32 / to as f32 - 0.5).clamp(0.0, (from - 1) as f32);
            let i = (x.floor() as usize).min(from - 1);
            (i, (i + 1).min(from - 1), x - i as f32)
        };
        let mut values = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let (r0, r1, fr) = sample(r, self.rows, rows);
            for c in 0..cols {
                let (c0, c1, fc) = sample(c, self.cols, cols);
                let at = |r: usize, c: usize| self.values[r * self.cols + c];
                let top = at(r0, c0) * (1.0 - fc) + at(r0, c1) * fc;
                let bottom = at(r1, c0) * (1.0 - fc) + at(r1, c1) * fc;
                values.push(top * (1.0 - fr) + bottom * fr);
            }
        }
        Map::new(rows, cols, values)
    }
}

/// The jet colour map at `t` in [0, 1]: blue, cyan, yellow, red.
pub fn jet(t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    let channel = |centre: f32| ((1.5 - (4.0 * t - centre).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    Rgb([channel(3.0), channel(2.0), channel(1.0)])
}

/// `map` (any range) scaled to [0, 1], resized to `image`, in jet, over `image` at half weight and
/// the sum scaled so that its brightest channel is 255 (`show_cam_on_image`).
pub fn overlay(image: &RgbImage, map: &Map) -> RgbImage {
    let (w, h) = image.dimensions();
    let heat = map.scaled().resized(h as usize, w as usize);
    let mut mixed = Vec::with_capacity((w * h * 3) as usize);
    for (p, &v) in image.pixels().zip(&heat.values) {
        let c = jet(v);
        for k in 0..3 {
            mixed.push(0.5 * f32::from(c[k]) / 255.0 + 0.5 * f32::from(p[k]) / 255.0);
        }
    }
    let max = mixed.iter().copied().fold(0.0f32, f32::max).max(1e-7);
    let bytes = mixed.iter().map(|v| (v / max * 255.0).round() as u8).collect();
    RgbImage::from_raw(w, h, bytes).expect("w·h·3 bytes")
}

/// Colours of variant indices (the winner map): matplotlib's tab20.
pub const TAB20: [[u8; 3]; 20] = [
    [31, 119, 180],
    [174, 199, 232],
    [255, 127, 14],
    [255, 187, 120],
    [44, 160, 44],
    [152, 223, 138],
    [214, 39, 40],
    [255, 152, 150],
    [148, 103, 189],
    [197, 176, 213],
    [140, 86, 75],
    [196, 156, 148],
    [227, 119, 194],
    [247, 182, 210],
    [127, 127, 127],
    [199, 199, 199],
    [188, 189, 34],
    [219, 219, 141],
    [23, 190, 207],
    [158, 218, 229],
];

/// A map of category indices (LSAGT's winning variants) in [`TAB20`]'s colours over `image` at
/// half weight, each token a block of pixels.
pub fn categories(image: &RgbImage, map: &Map) -> RgbImage {
    let (w, h) = image.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let r = (y as usize * map.rows / h as usize).min(map.rows - 1);
        let c = (x as usize * map.cols / w as usize).min(map.cols - 1);
        let colour = TAB20[map.values[r * map.cols + c] as usize % TAB20.len()];
        let p = image.get_pixel(x, y);
        Rgb(std::array::from_fn(|k| {
            ((u16::from(colour[k]) + u16::from(p[k])) / 2) as u8
        }))
    })
}

/// The key of [`categories`]: category `v`'s colour beside `v{v}`, two columns, in a `side²` picture.
pub fn legend(count: usize, side: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    let rows = count.div_ceil(2).max(1) as u32;
    let step = (side / rows).max(8);
    for v in 0..count {
        let (x, y) = ((v as u32 % 2) * side / 2 + 4, (v as u32 / 2) * step + 2);
        let colour = Rgb(TAB20[v % TAB20.len()]);
        for dy in 0..step.saturating_sub(4).min(12) {
            for dx in 0..12 {
                if x + dx < side && y + dy < side {
                    img.put_pixel(x + dx, y + dy, colour);
                }
            }
        }
        plot::text(
            &mut img,
            (x + 16) as i64,
            y as i64,
            &format!("v{v}"),
            Rgb([30, 30, 30]),
            1,
        );
    }
    img
}

/// Pictures of one size in a row, each under its caption, on a white sheet; several rows stack.
pub fn sheet(rows: &[Vec<(String, RgbImage)>]) -> RgbImage {
    let (cell_w, cell_h) = rows
        .iter()
        .flatten()
        .map(|(_, img)| img.dimensions())
        .fold((1, 1), |(w, h), (iw, ih)| (w.max(iw), h.max(ih)));
    let (pad, caption) = (8u32, 14u32);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
    let width = pad + cols * (cell_w + pad);
    let height = pad + rows.len().max(1) as u32 * (cell_h + caption + pad);
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (ri, row) in rows.iter().enumerate() {
        let y = pad + ri as u32 * (cell_h + caption + pad);
        for (ci, (label, img)) in row.iter().enumerate() {
            let x = pad + ci as u32 * (cell_w + pad);
            let fit = (cell_w as usize / 6).max(1);
            plot::text(
                &mut out,
                x as i64,
                y as i64,
                &plot::truncate(label, fit),
                Rgb([30, 30, 30]),
                1,
            );
            image::imageops::overlay(&mut out, img, x as i64, (y + caption) as i64);
        }
    }
    out
}

/// `img` enlarged by an integer factor (nearest neighbour) so that its longer side is at least
/// `min_side`: CIFAR's 32² images become visible.
pub fn enlarge(img: &RgbImage, min_side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let factor = min_side.div_ceil(w.max(h).max(1)).max(1);
    image::imageops::resize(img, w * factor, h * factor, image::imageops::FilterType::Nearest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_resize_keeps_constants_and_interpolates_between_centres() {
        let flat = Map::new(2, 3, vec![0.25; 6]);
        assert!(flat.resized(7, 5).values.iter().all(|v| (v - 0.25).abs() < 1e-6));
        // 1×2 → 1×4: centres at 0.25 and 0.75 of the way; OpenCV gives 0, 0.25, 0.75, 1.
        let ramp = Map::new(1, 2, vec![0.0, 1.0]).resized(1, 4);
        for (got, want) in ramp.values.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{:?}", ramp.values);
        }
    }

    #[test]
    fn jet_runs_from_blue_to_red_and_the_overlay_marks_the_hot_spot() {
        assert_eq!(jet(0.0), Rgb([0, 0, 128]));
        assert_eq!(jet(1.0), Rgb([128, 0, 0]));
        assert_eq!(jet(0.5), Rgb([128, 255, 128]));
        let gray = RgbImage::from_pixel(8, 8, Rgb([100, 100, 100]));
        let mut values = vec![0.0; 16];
        values[0] = 5.0; // top-left token hot
        let out = overlay(&gray, &Map::new(4, 4, values));
        let (hot, cold) = (out.get_pixel(0, 0), out.get_pixel(7, 7));
        assert!(hot[0] > hot[2] && cold[2] > cold[0], "hot {hot:?}, cold {cold:?}");
        assert_eq!(out.pixels().flat_map(|p| p.0).max(), Some(255));
    }
}
