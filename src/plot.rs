//! PNG line charts drawn with the `image` crate and a built-in 5×7 bitmap font (no system fonts
//! needed): training curves (`curves.png`) and bench sweeps.

use anyhow::Result;
use image::{Rgb, RgbImage};

const W: u32 = 960;
const H: u32 = 400;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Line colours, in order of use.
pub const PALETTE: [Rgb<u8>; 10] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
];

/// A named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub color: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
}

/// One chart: its y label, x label and ticks, and its series.
pub struct Panel {
    pub ylabel: String,
    pub xlabel: String,
    /// Labelled x positions; the axis spans their minimum to maximum.
    pub xticks: Vec<f64>,
    /// A fixed y range (otherwise from 0, or the data minimum, to the data maximum).
    pub yrange: Option<(f64, f64)>,
    /// Legend at the bottom right instead of the top right.
    pub legend_below: bool,
    pub series: Vec<Series>,
}

/// The PNG bytes of a titled figure of two side-by-side panels.
pub fn two_panels_png(title: &str, left: &Panel, right: &Panel) -> Result<Vec<u8>> {
    let mut img = RgbImage::from_pixel(W, H, WHITE);
    text(&mut img, 20, 8, &truncate(title, 60), BLACK, 2);
    panel(&mut img, (60, 50, 380, 300), left);
    panel(&mut img, (560, 50, 380, 300), right);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// The PNG bytes of a titled horizontal bar chart: one bar per label, its value written beside
/// it, and each label's individual points (seeds) as black ticks across the bar's end.
pub fn bars_png(title: &str, xlabel: &str, bars: &[(String, f64, Vec<f64>)]) -> Result<Vec<u8>> {
    let row = 22i64;
    let height = (70 + row * bars.len() as i64 + 40).max(160) as u32;
    let mut img = RgbImage::from_pixel(W, height, WHITE);
    text(&mut img, 20, 8, &truncate(title, 70), BLACK, 2);
    let label_w = 6 * bars.iter().map(|b| b.0.len()).max().unwrap_or(0) as i64;
    let (x0, y0) = (30 + label_w, 50i64);
    let w = W as i64 - x0 - 110;
    let hi = bars
        .iter()
        .flat_map(|b| std::iter::once(b.1).chain(b.2.iter().copied()))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let step = nice_step(hi / 5.0);
    let top = (hi / step).ceil() * step;
    let px = |v: f64| x0 + (v.max(0.0) / top * w as f64).round() as i64;
    let bottom = y0 + row * bars.len() as i64;
    let mut v = 0.0;
    while v <= top + step * 0.5 {
        line(&mut img, (px(v), y0 - 4), (px(v), bottom), GRID, 1);
        let label = format_tick(v, step);
        text(
            &mut img,
            px(v) - 3 * label.len() as i64,
            bottom + 6,
            &label,
            BLACK,
            1,
        );
        v += step;
    }
    text(
        &mut img,
        x0 + w / 2 - 3 * xlabel.len() as i64,
        bottom + 20,
        xlabel,
        BLACK,
        1,
    );
    for (i, (label, value, points)) in bars.iter().enumerate() {
        let y = y0 + row * i as i64;
        text(&mut img, x0 - 8 - 6 * label.len() as i64, y + 6, label, BLACK, 1);
        rect(
            &mut img,
            x0,
            y + 2,
            px(*value) - x0,
            row - 6,
            PALETTE[i % PALETTE.len()],
        );
        for &p in points {
            rect(&mut img, px(p) - 1, y, 3, row - 2, BLACK);
        }
        let end = points.iter().copied().fold(*value, f64::max);
        text(&mut img, px(end) + 6, y + 6, &format!("{value:.2}"), BLACK, 1);
    }
    line(&mut img, (x0, y0 - 4), (x0, bottom), BLACK, 1);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// The first `n` characters of `s`.
pub fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One chart at (x, y, width, height) in pixels.
fn panel(img: &mut RgbImage, (x0, y0, w, h): (i64, i64, i64, i64), p: &Panel) {
    let values: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.1))
        .collect();
    let (mut lo, mut hi) = match p.yrange {
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
    let xmin = p.xticks.iter().copied().fold(f64::INFINITY, f64::min);
    let xmax = p.xticks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (0.0, xmin.max(0.0) + 1.0)
    };
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
    for &t in &p.xticks {
        let x = px(t);
        line(img, (x, y0 + h), (x, y0 + h + 4), BLACK, 1);
        let label = format_tick(t, 1.0);
        text(img, x - 3 * label.len() as i64, y0 + h + 8, &label, BLACK, 1);
    }
    line(img, (x0, y0), (x0, y0 + h), BLACK, 1);
    line(img, (x0, y0 + h), (x0 + w, y0 + h), BLACK, 1);
    text(
        img,
        x0 + w / 2 - 3 * p.xlabel.len() as i64,
        y0 + h + 22,
        &p.xlabel,
        BLACK,
        1,
    );
    text(img, x0, y0 - 14, &p.ylabel, BLACK, 1);
    // Curves and markers.
    for s in &p.series {
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
    let shown: Vec<&Series> = p.series.iter().filter(|s| !s.points.is_empty()).collect();
    let width = 24 + 6 * shown.iter().map(|s| s.name.len()).max().unwrap_or(0) as i64;
    let lx = x0 + w - width;
    let mut ly = if p.legend_below {
        y0 + h - 8 - 12 * shown.len() as i64
    } else {
        y0 + 8
    };
    rect(img, lx - 4, ly - 4, width, 12 * shown.len() as i64 + 4, WHITE);
    for s in shown {
        rect(img, lx, ly, 12, 7, s.color);
        text(img, lx + 16, ly, &s.name, BLACK, 1);
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
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>, scale: i64) {
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
