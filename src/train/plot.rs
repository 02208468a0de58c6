//! `curves.png`: loss and accuracy against the epoch, drawn with the `image` crate and a built-in
//! 5×7 bitmap font (no system fonts needed).

use anyhow::Result;
use image::{Rgb, RgbImage};

use super::metrics::EpochMetrics;

const W: u32 = 960;
const H: u32 = 400;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
const GREEN: Rgb<u8> = Rgb([44, 160, 44]);
const RED: Rgb<u8> = Rgb([214, 39, 40]);

/// A named series of (epoch, value) points.
struct Series<'a> {
    name: &'a str,
    color: Rgb<u8>,
    points: Vec<(f64, f64)>,
}

/// The PNG bytes of the two panels: train/val loss, and val top-1/top-5 (and EMA top-1) in %.
pub fn curves_png(history: &[EpochMetrics], title: &str) -> Result<Vec<u8>> {
    let mut img = RgbImage::from_pixel(W, H, WHITE);
    let pts = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|m| f(m).filter(|v| v.is_finite()).map(|v| (m.epoch as f64, v)))
            .collect()
    };
    let loss = [
        Series {
            name: "train loss",
            color: BLUE,
            points: pts(&|m| Some(m.train_loss)),
        },
        Series {
            name: "val loss",
            color: ORANGE,
            points: pts(&|m| m.val_loss),
        },
    ];
    let acc = [
        Series {
            name: "val top-1",
            color: BLUE,
            points: pts(&|m| m.val_top1.map(|v| v * 100.0)),
        },
        Series {
            name: "val top-5",
            color: GREEN,
            points: pts(&|m| m.val_top5.map(|v| v * 100.0)),
        },
        Series {
            name: "ema top-1",
            color: RED,
            points: pts(&|m| m.ema_top1.map(|v| v * 100.0)),
        },
    ];
    let epochs = history.last().map_or(1, |m| m.epoch.max(1));
    text(&mut img, 20, 8, &truncate(title, 60), BLACK, 2);
    panel(&mut img, (60, 50, 440, 300), "loss", &loss, epochs, None, false);
    panel(
        &mut img,
        (560, 50, 380, 300),
        "accuracy %",
        &acc,
        epochs,
        Some((0.0, 100.0)),
        true,
    );
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One chart at (x, y, width, height) in pixels.
fn panel(
    img: &mut RgbImage,
    (x0, y0, w, h): (i64, i64, i64, i64),
    ylabel: &str,
    series: &[Series],
    epochs: usize,
    fixed: Option<(f64, f64)>,
    legend_below: bool,
) {
    let values: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    let (mut lo, mut hi) = match fixed {
        Some(r) => r,
        None if values.is_empty() => (0.0, 1.0),
        None => (
            values.iter().copied().fold(f64::INFINITY, f64::min).min(0.0),
            values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ),
    };
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let step = nice_step((hi - lo) / 5.0);
    lo = (lo / step).floor() * step;
    hi = (hi / step).ceil() * step;
    let (xmin, xmax) = (if epochs > 1 { 1.0 } else { 0.0 }, epochs.max(1) as f64);
    let px = |e: f64| x0 + ((e - xmin) / (xmax - xmin) * w as f64).round() as i64;
    let py = |v: f64| y0 + h - ((v - lo) / (hi - lo) * h as f64).round() as i64;
    // Grid and y ticks.
    let mut v = lo;
    while v <= hi + step * 0.5 {
        let y = py(v);
        line(img, (x0, y), (x0 + w, y), GRID, 1);
        let label = format_tick(v, step);
        text(img, x0 - 8 - 6 * label.len() as i64, y - 3, &label, BLACK, 1);
        v += step;
    }
    // x ticks at whole epochs (at most ~10 labels).
    let every = (epochs as f64 / 10.0).ceil().max(1.0) as usize;
    for e in (xmin as usize..=epochs).filter(|e| *e == epochs || e % every == 0) {
        if e == 0 {
            continue;
        }
        let x = px(e as f64);
        line(img, (x, y0 + h), (x, y0 + h + 4), BLACK, 1);
        let label = e.to_string();
        text(img, x - 3 * label.len() as i64, y0 + h + 8, &label, BLACK, 1);
    }
    line(img, (x0, y0), (x0, y0 + h), BLACK, 1);
    line(img, (x0, y0 + h), (x0 + w, y0 + h), BLACK, 1);
    text(img, x0 + w / 2 - 15, y0 + h + 22, "epoch", BLACK, 1);
    text(img, x0, y0 - 14, ylabel, BLACK, 1);
    // Curves and markers.
    for s in series {
        for pair in s.points.windows(2) {
            line(
                img,
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                s.color,
                2,
            );
        }
        for &(e, v) in &s.points {
            rect(img, px(e) - 2, py(v) - 2, 5, 5, s.color);
        }
    }
    // Legend (only series with data), on a white box, top or bottom right.
    let shown: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    let lx = x0 + w - 96;
    let mut ly = if legend_below {
        y0 + h - 8 - 12 * shown.len() as i64
    } else {
        y0 + 8
    };
    rect(img, lx - 4, ly - 4, 96, 12 * shown.len() as i64 + 4, WHITE);
    for s in shown {
        rect(img, lx, ly, 12, 7, s.color);
        text(img, lx + 16, ly, s.name, BLACK, 1);
        ly += 12;
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.abs().max(1e-12).log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn format_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
    for dy in 0..h {
        for dx in 0..w {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// Bresenham line of the given thickness.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>, thick: i64) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        rect(img, x - (thick - 1) / 2, y - (thick - 1) / 2, thick, thick, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Draws `s` (upper-cased) with the 5×7 font at `scale`.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>, scale: i64) {
    let mut cx = x;
    for ch in s.chars() {
        if let Some(rows) = glyph(ch.to_ascii_uppercase()) {
            for (r, row) in rows.iter().enumerate() {
                for (k, px) in row.bytes().enumerate() {
                    if px == b'#' {
                        rect(img, cx + k as i64 * scale, y + r as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
        cx += 6 * scale;
    }
}

fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c {
        '0' => [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
        '1' => ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
        '2' => [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
        '3' => ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
        '4' => ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
        '5' => ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
        '6' => ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
        '7' => ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
        '8' => [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
        '9' => [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
        'A' => [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'B' => ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
        'C' => [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
        'D' => ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."],
        'E' => ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
        'F' => ["#####", "#....", "#....", "####.", "#....", "#....", "#...."],
        'G' => [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"],
        'H' => ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'I' => [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
        'J' => ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."],
        'K' => ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
        'L' => ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
        'M' => ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
        'N' => ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"],
        'O' => [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
        'P' => ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
        'Q' => [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"],
        'R' => ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
        'S' => [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
        'T' => ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
        'U' => ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
        'V' => ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
        'W' => ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."],
        'X' => ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
        'Y' => ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."],
        'Z' => ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"],
        '.' => [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
        ',' => [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."],
        '-' => [".....", ".....", ".....", "#####", ".....", ".....", "....."],
        '_' => [".....", ".....", ".....", ".....", ".....", ".....", "#####"],
        '%' => ["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"],
        ':' => [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."],
        '/' => [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."],
        '(' => ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."],
        ')' => [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."],
        '+' => [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."],
        '=' => [".....", ".....", "#####", ".....", "#####", ".....", "....."],
        '[' => [".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."],
        ']' => [".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."],
        _ => return None,
    })
}
