//! A small real segmentation dataset, composed: Fashion-MNIST garments (real photographs of
//! products, 28×28 grey) scaled, tinted and placed on textured canvases, each with a pixel-exact
//! mask (a garment owns the pixels where its photograph is brighter than [`THRESHOLD`]; later
//! garments cover earlier ones). 11 classes: background and the 10 garment kinds. Training
//! canvases draw garments from Fashion-MNIST's training set, validation canvases from its test
//! set, so no garment photograph appears in both.
//!
//! What its mIoU says: that a model and its training pipeline learn to find and delineate
//! objects of several scales on clutter, end to end. What it does not: anything about scene
//! parsing (ADE20K's 150 classes of stuff and things in real scenes). See docs/SEGMENTATION.md.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use crate::data::augment::Interpolation;
use crate::data::resample::resize;
use crate::data::rng::Rng;

/// Background first, then Fashion-MNIST's classes in its label order.
pub const CLASSES: [&str; 11] = [
    "background",
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Grey level (of 255) above which a garment's pixel belongs to it.
pub const THRESHOLD: u8 = 24;

/// Debian's `dataset-fashion-mnist` puts the files here.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// What to compose.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// Folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    pub source: PathBuf,
    pub out: PathBuf,
    pub train: usize,
    pub val: usize,
    /// Canvas side in pixels (a multiple of 32).
    pub size: usize,
    pub seed: u64,
}

/// Fashion-MNIST images (28×28 each, row-major) with their labels.
pub struct Garments {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub side: usize,
}

impl Garments {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// An IDX file's bytes, gunzipped when it ends in `.gz`; `stem` is tried with and without it.
fn read_idx(dir: &Path, stem: &str) -> Result<(PathBuf, Vec<u8>)> {
    for (name, gz) in [(format!("{stem}.gz"), true), (stem.to_string(), false)] {
        let path = dir.join(&name);
        if !path.exists() {
            continue;
        }
        let raw = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let bytes = if gz {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .with_context(|| format!("{} is not a readable gzip file", path.display()))?;
            out
        } else {
            raw
        };
        return Ok((path, bytes));
    }
    bail!(
        "{} has no {stem}[.gz]: point --fashion-mnist at a folder of Fashion-MNIST's IDX files \
         (Debian: apt install dataset-fashion-mnist → {DEBIAN_DIR})",
        dir.display()
    )
}

fn be_u32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Reads one split (`train` or `t10k`), checking the IDX headers against each other.
pub fn read_garments(dir: &Path, split: &str) -> Result<Garments> {
    let (ipath, images) = read_idx(dir, &format!("{split}-images-idx3-ubyte"))?;
    let (lpath, labels) = read_idx(dir, &format!("{split}-labels-idx1-ubyte"))?;
    ensure!(
        images.len() >= 16 && be_u32(&images, 0) == 2051,
        "{} is not an IDX image file (magic 2051)",
        ipath.display()
    );
    ensure!(
        labels.len() >= 8 && be_u32(&labels, 0) == 2049,
        "{} is not an IDX label file (magic 2049)",
        lpath.display()
    );
    let (n, rows, cols) = (be_u32(&images, 4), be_u32(&images, 8), be_u32(&images, 12));
    ensure!(
        rows == cols && (1..=256).contains(&rows),
        "{}: {rows}x{cols} images; square ones up to 256 are expected",
        ipath.display()
    );
    ensure!(
        images.len() == 16 + n * rows * cols,
        "{} is truncated: its header promises {n} images",
        ipath.display()
    );
    ensure!(
        be_u32(&labels, 4) == n && labels.len() == 8 + n,
        "{} does not hold one label for each of the {n} images of {}",
        lpath.display(),
        ipath.display()
    );
    let labels = labels[8..].to_vec();
    if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
        bail!(
            "{} holds label {bad}; Fashion-MNIST has 10 classes",
            lpath.display()
        );
    }
    ensure!(n > 0, "{} holds no images", ipath.display());
    Ok(Garments {
        images: images[16..].to_vec(),
        labels,
        side: rows,
    })
}

/// A textured background: two random colours blended along a random direction, with stripes and
/// noise, so that "not garment" is not one flat colour.
fn background(size: usize, rng: &mut Rng) -> RgbImage {
    let colour = |rng: &mut Rng| [0, 1, 2].map(|_| rng.range(20.0, 235.0) as f32);
    let (a, b) = (colour(rng), colour(rng));
    let angle = rng.range(0.0, std::f64::consts::TAU) as f32;
    let (dx, dy) = (angle.cos(), angle.sin());
    let freq = rng.range(0.02, 0.15) as f32;
    let amp = rng.range(0.0, 30.0) as f32;
    let mut noise = Rng::new(rng.next_u64());
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let t = ((x as f32 * dx + y as f32 * dy) / size as f32 * 0.5 + 0.5).clamp(0.0, 1.0);
        let stripe = amp * ((x as f32 * dy - y as f32 * dx) * freq).sin();
        let n = noise.range(-12.0, 12.0) as f32;
        image::Rgb([0, 1, 2].map(|c| (a[c] * (1.0 - t) + b[c] * t + stripe + n).clamp(0.0, 255.0) as u8))
    })
}

/// One canvas and its mask.
pub fn compose_one(garments: &Garments, size: usize, rng: &mut Rng) -> (RgbImage, GrayImage) {
    let mut canvas = background(size, rng);
    let mut mask = GrayImage::new(size as u32, size as u32);
    let s = garments.side;
    let count = 2 + rng.below(4);
    for _ in 0..count {
        let i = rng.below(garments.len());
        let grey = &garments.images[i * s * s..(i + 1) * s * s];
        let class = garments.labels[i] + 1;
        let side = rng.range(size as f64 / 5.0, size as f64 / 2.0) as u32;
        let grey = RgbImage::from_fn(s as u32, s as u32, |x, y| {
            let v = grey[y as usize * s + x as usize];
            image::Rgb([v, v, v])
        });
        let scaled = resize(&grey, side, side, Interpolation::Bilinear);
        let tint = [0, 1, 2].map(|_| rng.range(0.3, 1.0) as f32);
        let (ox, oy) = (
            rng.below(size - side as usize + 1) as u32,
            rng.below(size - side as usize + 1) as u32,
        );
        for (x, y, p) in scaled.enumerate_pixels() {
            if p[0] > THRESHOLD {
                let v = f32::from(p[0]);
                canvas.put_pixel(ox + x, oy + y, image::Rgb(tint.map(|t| (v * t) as u8)));
                mask.put_pixel(ox + x, oy + y, image::Luma([class]));
            }
        }
    }
    (canvas, mask)
}

/// Writes `options.out/{train,val}/{images,masks}/NNNNNN.png` and `classes.txt`. The dataset is
/// built in a sibling folder and moved into place whole, so a crash leaves no half dataset, and
/// an existing folder is never written over.
pub fn compose(options: &ComposeOptions) -> Result<()> {
    ensure!(
        options.size >= 64 && options.size.is_multiple_of(32) && options.size <= 4096,
        "--size {} must be a multiple of 32 from 64 to 4096",
        options.size
    );
    ensure!(
        options.train > 0 && options.val > 0,
        "--train and --val must be at least 1"
    );
    let out = &options.out;
    if out.exists() {
        bail!(
            "{} already exists; the composed dataset goes to a new folder (pick another --out or remove it)",
            out.display()
        );
    }
    let train = read_garments(&options.source, "train")?;
    let test = read_garments(&options.source, "t10k")?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("composed")
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    for (split, garments, count, salt) in [
        ("train", &train, options.train, 1u64),
        ("val", &test, options.val, 2),
    ] {
        let images = staging.join(split).join("images");
        let masks = staging.join(split).join("masks");
        std::fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
        std::fs::create_dir_all(&masks).with_context(|| format!("cannot create {}", masks.display()))?;
        (0..count).into_par_iter().try_for_each(|i| -> Result<()> {
            let mut rng = Rng::for_item(options.seed, salt, crate::data::rng::Stream::Sample, i as u64);
            let (canvas, mask) = compose_one(garments, options.size, &mut rng);
            let name = format!("{i:06}.png");
            canvas
                .save(images.join(&name))
                .with_context(|| format!("cannot write {}", images.join(&name).display()))?;
            mask.save(masks.join(&name))
                .with_context(|| format!("cannot write {}", masks.join(&name).display()))?;
            Ok(())
        })?;
    }
    std::fs::write(staging.join("classes.txt"), CLASSES.join("\n") + "\n")?;
    std::fs::rename(&staging, out)
        .with_context(|| format!("cannot move {} to {}", staging.display(), out.display()))?;
    Ok(())
}

/// Writes IDX files of `n` `side`×`side` images (tests and demos without Fashion-MNIST).
pub fn write_idx(dir: &Path, split: &str, images: &[u8], labels: &[u8], side: usize) -> Result<()> {
    let n = labels.len();
    let mut head = Vec::new();
    for v in [2051u32, n as u32, side as u32, side as u32] {
        head.extend(v.to_be_bytes());
    }
    head.extend(images);
    std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), head)?;
    let mut l = Vec::new();
    for v in [2049u32, n as u32] {
        l.extend(v.to_be_bytes());
    }
    l.extend(labels);
    std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), l)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Garments as filled squares of their class's grey level, so masks can be checked exactly.
    fn squares(dir: &Path, split: &str, n: usize) {
        let side = 28;
        let mut images = vec![0u8; n * side * side];
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for i in 0..n {
            for y in 4..24 {
                for x in 4..24 {
                    images[i * side * side + y * side + x] = 200;
                }
            }
        }
        write_idx(dir, split, &images, &labels, side).unwrap();
    }

    #[test]
    fn composes_pairs_that_the_reader_takes_and_masks_match_the_garments() {
        let dir = std::env::temp_dir().join(format!("vicinity-compose-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        squares(&dir, "train", 30);
        squares(&dir, "t10k", 10);
        let out = dir.join("composed");
        let options = ComposeOptions {
            source: dir.clone(),
            out: out.clone(),
            train: 6,
            val: 3,
            size: 64,
            seed: 7,
        };
        compose(&options).unwrap();
        let train = super::super::data::open_segmentation(&out, "train").unwrap();
        assert_eq!(train.samples.len(), 6);
        assert_eq!(train.classes.len(), 11);
        let val = super::super::data::open_segmentation(&out, "val").unwrap();
        assert_eq!(val.samples.len(), 3);
        for i in 0..6 {
            let (img, labels) = train.read(i).unwrap();
            assert!(labels.iter().any(|&l| l > 0), "canvas {i} has a garment");
            // A garment pixel is a tinted grey of 200 at most; every labelled garment pixel
            // differs from the background's texture only where the mask says so: check the
            // mask is exactly where the pixels were written, by recomposing.
            let mut rng = Rng::for_item(7, 1, crate::data::rng::Stream::Sample, i as u64);
            let garments = read_garments(&dir, "train").unwrap();
            let (canvas, mask) = compose_one(&garments, 64, &mut rng);
            assert_eq!(img, canvas);
            assert_eq!(labels, mask.into_raw());
        }
        // The same seed composes the same dataset; an existing folder is refused.
        let err = compose(&options).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_sources_are_named() {
        let dir = std::env::temp_dir().join(format!("vicinity-idx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_garments(&dir, "train").err().unwrap().to_string();
        assert!(err.contains("dataset-fashion-mnist"), "{err}");
        write_idx(&dir, "train", &[0u8; 28 * 28], &[3, 4], 28).unwrap();
        let err = read_garments(&dir, "train").err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        write_idx(&dir, "train", &[0u8; 2 * 28 * 28], &[3, 12], 28).unwrap();
        let err = read_garments(&dir, "train").err().unwrap().to_string();
        assert!(err.contains("label 12"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
