//! Segmentation datasets on disk: the ADE20K layout and a generic folder of image/mask pairs.
//!
//! - ADE20K (`ADEChallengeData2016`): `images/{training,validation}/NAME.jpg` with
//!   `annotations/{training,validation}/NAME.png`, 150 classes; label 0 ("other") is ignored and
//!   every class moves down by one ([`super::metrics::reduce_zero_label`]).
//! - Pairs: `SPLIT/images/NAME.{jpg,png}` with `SPLIT/masks/NAME.png` and `classes.txt` (one name
//!   per line) at the root; labels are class indices, 255 ignored.
//!
//! Masks are single-channel 8-bit PNGs of their image's size. A corrupt image or mask, a mask of
//! another size, a label beyond the class count, and images without masks are refused by file name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use image::{GrayImage, RgbImage};

use super::metrics::{IGNORE, reduce_zero_label};

/// ADE20K's class count (SceneParsing's 150).
pub const ADE20K_CLASSES: usize = 150;

/// Which label convention a dataset's masks follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    /// Class indices from 0, 255 ignored.
    Plain,
    /// 0 ignored, class `c` stored as `c + 1` (ADE20K).
    ZeroIgnored,
}

/// One image and its mask.
#[derive(Debug, Clone, PartialEq)]
pub struct SegSample {
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// A split of a segmentation dataset.
#[derive(Debug, Clone)]
pub struct SegDataset {
    pub samples: Vec<SegSample>,
    pub classes: Vec<String>,
    pub labels: Labels,
    /// Where it came from, for messages.
    pub name: String,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Files of `dir` with one of `extensions` (lower case), by stem, sorted.
/// Two files of one stem (`x.jpg` and `x.png`) are refused: they would share one mask.
fn files_by_stem(dir: &Path, extensions: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_file() && ext.is_some_and(|e| extensions.contains(&e.as_str())) {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            out.push((stem, path));
        }
    }
    out.sort();
    if let Some(pair) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!(
            "{} and {} have one name; each image (and mask) needs a name of its own",
            pair[0].1.display(),
            pair[1].1.display()
        );
    }
    Ok(out)
}

/// Pairs the images of `images` with the masks of `masks` by file stem; images without a mask are
/// an error naming the first few.
fn pair(images: &Path, mask_dir: &Path) -> Result<Vec<SegSample>> {
    let imgs = files_by_stem(images, &IMAGE_EXTENSIONS)?;
    let masks: std::collections::HashMap<String, PathBuf> =
        files_by_stem(mask_dir, &["png"])?.into_iter().collect();
    let mut samples = Vec::with_capacity(imgs.len());
    let mut missing = Vec::new();
    for (stem, image) in imgs {
        match masks.get(&stem) {
            Some(mask) => samples.push(SegSample {
                image,
                mask: mask.clone(),
            }),
            None => missing.push(image),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(5).map(|p| p.display().to_string()).collect();
        bail!(
            "{} image(s) of {} have no mask of the same name in {} (e.g. {})",
            missing.len(),
            images.display(),
            mask_dir.display(),
            shown.join(", ")
        );
    }
    if samples.is_empty() {
        bail!("{} holds no images (.jpg, .jpeg, .png)", images.display());
    }
    Ok(samples)
}

/// ADE20K's `split` (`training` or `validation`) under `root` (the `ADEChallengeData2016` folder).
pub fn open_ade20k(root: &Path, split: &str) -> Result<SegDataset> {
    let samples = pair(
        &root.join("images").join(split),
        &root.join("annotations").join(split),
    )
    .with_context(|| format!("reading ADE20K's {split} split under {}", root.display()))?;
    Ok(SegDataset {
        samples,
        classes: (0..ADE20K_CLASSES).map(|c| format!("class {c}")).collect(),
        labels: Labels::ZeroIgnored,
        name: format!("{} [{split}]", root.display()),
    })
}

/// A folder of pairs: `root/SPLIT/images`, `root/SPLIT/masks`, `root/classes.txt`.
pub fn open_pairs(root: &Path, split: &str) -> Result<SegDataset> {
    let list = root.join("classes.txt");
    let text = std::fs::read_to_string(&list).with_context(|| {
        format!(
            "a folder of image/mask pairs needs {} (one class name per line)",
            list.display()
        )
    })?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if classes.is_empty() || classes.len() > IGNORE as usize {
        bail!(
            "{} names {} classes; 1 to 255 are possible with 8-bit masks",
            list.display(),
            classes.len()
        );
    }
    let dir = root.join(split);
    let samples = pair(&dir.join("images"), &dir.join("masks"))?;
    Ok(SegDataset {
        samples,
        classes,
        labels: Labels::Plain,
        name: format!("{} [{split}]", root.display()),
    })
}

/// Either layout: ADE20K when `root/images` and `root/annotations` exist, else pairs.
pub fn open_segmentation(root: &Path, split: &str) -> Result<SegDataset> {
    if root.join("images").is_dir() && root.join("annotations").is_dir() {
        open_ade20k(root, split)
    } else {
        open_pairs(root, split)
    }
}

impl SegDataset {
    /// Decodes sample `i`: the image and its labels (class indices, [`IGNORE`] for ignored pixels),
    /// row-major at the image's size. Every failure names the file.
    pub fn read(&self, i: usize) -> Result<(RgbImage, Vec<u8>)> {
        let s = &self.samples[i];
        let image = crate::data::read_image(&s.image)?;
        let bytes =
            std::fs::read(&s.mask).map_err(|e| anyhow!("unreadable mask {}: {e}", s.mask.display()))?;
        let decoded = image::load_from_memory(&bytes)
            .map_err(|e| anyhow!("corrupt or unreadable mask {}: {e}", s.mask.display()))?;
        let mask: GrayImage = match decoded {
            image::DynamicImage::ImageLuma8(m) => m,
            other => bail!(
                "mask {} is {:?}; masks are single-channel 8-bit label images",
                s.mask.display(),
                other.color()
            ),
        };
        if mask.dimensions() != image.dimensions() {
            let ((mw, mh), (iw, ih)) = (mask.dimensions(), image.dimensions());
            bail!(
                "mask {} is {mw}x{mh} but its image {} is {iw}x{ih}",
                s.mask.display(),
                s.image.display()
            );
        }
        let mut labels = mask.into_raw();
        if self.labels == Labels::ZeroIgnored {
            reduce_zero_label(&mut labels);
        }
        let k = self.classes.len();
        if let Some(&bad) = labels.iter().find(|&&l| l != IGNORE && l as usize >= k) {
            let stored = if self.labels == Labels::ZeroIgnored {
                bad as usize + 1
            } else {
                bad as usize
            };
            bail!(
                "mask {} has label {stored}, beyond the {k} classes of {} (255 marks ignored pixels)",
                s.mask.display(),
                self.name
            );
        }
        Ok((image, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vicinity-seg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ade(root: &Path, stem: &str, image: (u32, u32), mask: (u32, u32), label: u8) {
        let (i, a) = (root.join("images/training"), root.join("annotations/training"));
        std::fs::create_dir_all(&i).unwrap();
        std::fs::create_dir_all(&a).unwrap();
        RgbImage::from_pixel(image.0, image.1, Rgb([10, 20, 30]))
            .save(i.join(format!("{stem}.jpg")))
            .unwrap();
        GrayImage::from_pixel(mask.0, mask.1, Luma([label]))
            .save(a.join(format!("{stem}.png")))
            .unwrap();
    }

    #[test]
    fn ade20k_reads_and_shifts_labels() {
        let root = tmp("ade");
        ade(&root, "ADE_train_1", (6, 4), (6, 4), 0);
        ade(&root, "ADE_train_2", (6, 4), (6, 4), 150);
        let ds = open_segmentation(&root, "training").unwrap();
        assert_eq!(
            (ds.samples.len(), ds.classes.len(), ds.labels),
            (2, 150, Labels::ZeroIgnored)
        );
        let (img, labels) = ds.read(0).unwrap();
        assert_eq!((img.dimensions(), labels.len()), ((6, 4), 24));
        assert!(labels.iter().all(|&l| l == IGNORE), "label 0 is ignored");
        assert!(ds.read(1).unwrap().1.iter().all(|&l| l == 149));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn bad_pairs_are_refused_by_file_name() {
        let root = tmp("ade-bad");
        ade(&root, "a", (6, 4), (5, 4), 1);
        ade(&root, "b", (6, 4), (6, 4), 151);
        ade(&root, "c", (6, 4), (6, 4), 1);
        std::fs::write(root.join("images/training/c.jpg"), b"not a jpeg").unwrap();
        let ds = open_ade20k(&root, "training").unwrap();
        let err = |i: usize| format!("{:#}", ds.read(i).unwrap_err());
        assert!(
            err(0).contains("a.png is 5x4 but its image") && err(0).contains("a.jpg is 6x4"),
            "{}",
            err(0)
        );
        assert!(
            err(1).contains("b.png has label 151, beyond the 150 classes"),
            "{}",
            err(1)
        );
        assert!(err(2).contains("c.jpg"), "{}", err(2));
        // An RGB mask, and an image without a mask.
        RgbImage::from_pixel(6, 4, Rgb([1, 1, 1]))
            .save(root.join("annotations/training/a.png"))
            .unwrap();
        let ds = open_ade20k(&root, "training").unwrap();
        assert!(format!("{:#}", ds.read(0).unwrap_err()).contains("single-channel"));
        RgbImage::from_pixel(6, 4, Rgb([1, 1, 1]))
            .save(root.join("images/training/d.jpg"))
            .unwrap();
        let err = format!("{:#}", open_ade20k(&root, "training").unwrap_err());
        assert!(err.contains("1 image(s)") && err.contains("d.jpg"), "{err}");
        RgbImage::from_pixel(6, 4, Rgb([1, 1, 1]))
            .save(root.join("images/training/c.png"))
            .unwrap();
        let err = format!("{:#}", open_ade20k(&root, "training").unwrap_err());
        assert!(
            err.contains("c.jpg") && err.contains("c.png") && err.contains("one name"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn pairs_need_a_class_list_and_take_plain_labels() {
        let root = tmp("pairs");
        let err = format!("{:#}", open_segmentation(&root, "train").unwrap_err());
        assert!(err.contains("classes.txt"), "{err}");
        std::fs::write(root.join("classes.txt"), "background\nshirt\n").unwrap();
        for sub in ["train/images", "train/masks"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        RgbImage::from_pixel(3, 3, Rgb([9, 9, 9]))
            .save(root.join("train/images/x.png"))
            .unwrap();
        let mut mask = GrayImage::from_pixel(3, 3, Luma([1]));
        mask.put_pixel(0, 0, Luma([IGNORE]));
        mask.save(root.join("train/masks/x.png")).unwrap();
        let ds = open_segmentation(&root, "train").unwrap();
        assert_eq!(ds.labels, Labels::Plain);
        let (_, labels) = ds.read(0).unwrap();
        assert_eq!(labels[0], IGNORE);
        assert!(labels[1..].iter().all(|&l| l == 1));
        let _ = std::fs::remove_dir_all(&root);
    }
}
