//! Small synthetic datasets written to disk: for tests and smoke runs that must not depend on
//! real data (the readers, the loader, the trainer's end-to-end checks).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

use super::dataset::{ImageDataset, Sample, SampleData};

/// A deterministic picture for (label, index): a per-class colour with a per-sample gradient,
/// so classes are visibly distinct and every sample differs.
pub fn synthetic_image(label: usize, index: usize, width: u32, height: u32) -> RgbImage {
    let base = [
        (label * 97 % 256) as u32,
        (label * 57 % 256) as u32,
        (label * 151 % 256) as u32,
    ];
    RgbImage::from_fn(width, height, |x, y| {
        let g = (x * 255 / width.max(1) + y * 127 / height.max(1) + index as u32 * 13) % 256;
        Rgb(std::array::from_fn(|c| {
            ((base[c] + g * (c as u32 + 1)) % 256) as u8
        }))
    })
}

/// An in-memory dataset of `n` synthetic images cycling through `classes` classes.
pub fn synthetic_dataset(n: usize, classes: usize, width: u32, height: u32) -> ImageDataset {
    ImageDataset {
        samples: (0..n)
            .map(|i| Sample {
                data: SampleData::Raw {
                    width,
                    height,
                    channels: 3,
                    pixels: synthetic_image(i % classes, i, width, height).into_raw(),
                },
                label: i % classes,
                source: format!("synthetic#{i}"),
            })
            .collect(),
        classes: (0..classes).map(|c| format!("class{c}")).collect(),
        name: "synthetic".into(),
    }
}

/// Encoding of the files written by [`write_image_folder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Jpeg,
    Png,
}

/// Writes `root/<split>/<class>/NNNN.{jpg,png}` with `per_class` synthetic images per class.
pub fn write_image_folder(
    root: &Path,
    splits: &[&str],
    classes: &[&str],
    per_class: usize,
    size: [u32; 2],
    encoding: Encoding,
) -> Result<()> {
    for split in splits {
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir)?;
            for i in 0..per_class {
                let img = synthetic_image(label, i, size[1], size[0]);
                let (ext, format) = match encoding {
                    Encoding::Jpeg => ("jpg", image::ImageFormat::Jpeg),
                    Encoding::Png => ("png", image::ImageFormat::Png),
                };
                let path = dir.join(format!("{i:04}.{ext}"));
                img.save_with_format(&path, format)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Archive compression for [`pack_tar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Packs the contents of `dir` (paths relative to it) into a tar archive.
pub fn pack_tar(dir: &Path, archive: &Path, compression: Compression) -> Result<()> {
    let file = BufWriter::new(
        File::create(archive).with_context(|| format!("cannot create {}", archive.display()))?,
    );
    let writer: Box<dyn Write> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast())),
        Compression::Zstd => Box::new(zstd::stream::write::Encoder::new(file, 3)?.auto_finish()),
    };
    let mut builder = tar::Builder::new(writer);
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            builder.append_dir_all(e.file_name(), &path)?;
        } else {
            builder.append_path_with_name(&path, e.file_name())?;
        }
    }
    // Finish the tar, then the compressor (dropping it writes the zstd / gzip trailer).
    let mut writer = builder.into_inner()?;
    writer.flush()?;
    drop(writer);
    Ok(())
}
