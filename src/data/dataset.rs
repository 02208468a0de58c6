//! Image classification datasets: ImageFolder directories and archives, CIFAR binaries, IDX.
//!
//! Readers only collect *encoded* samples (file paths, compressed bytes or raw pixels); decoding
//! happens later on the loader's worker threads, so opening even 50k images is fast and the
//! per-image cost is paid in parallel.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use image::RgbImage;
use rayon::prelude::*;

pub use super::classes::{CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES};

/// File extensions (lower case) that ImageFolder readers pick up; other files are ignored.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Where a sample's pixels come from. Encoded forms are decoded by the loader's workers.
#[derive(Clone, Debug)]
pub enum SampleData {
    /// An image file on disk, read when needed (keeps big ImageFolder trees out of memory).
    File(PathBuf),
    /// An encoded image (JPEG/PNG) held in memory, e.g. read from an archive.
    Encoded(Vec<u8>),
    /// Raw interleaved pixels (HWC, 1 or 3 channels), as in CIFAR and IDX files.
    Raw {
        width: u32,
        height: u32,
        channels: u8,
        pixels: Vec<u8>,
    },
}

/// One labelled image.
#[derive(Clone, Debug)]
pub struct Sample {
    pub data: SampleData,
    pub label: usize,
    /// Human-readable origin (file path, archive member, `file#record`) for error messages.
    pub source: String,
}

impl Sample {
    /// Decodes to 8-bit RGB; a grey image is replicated to three channels. Errors name the source.
    pub fn decode(&self) -> Result<RgbImage> {
        match &self.data {
            SampleData::File(path) => read_image(path),
            SampleData::Encoded(bytes) => decode_bytes(bytes, &self.source),
            SampleData::Raw {
                width,
                height,
                channels,
                pixels,
            } => {
                let rgb = match channels {
                    3 => pixels.clone(),
                    1 => pixels.iter().flat_map(|&g| [g, g, g]).collect(),
                    c => bail!("{}: unsupported channel count {c}", self.source),
                };
                RgbImage::from_raw(*width, *height, rgb)
                    .ok_or_else(|| anyhow!("{}: pixel buffer has the wrong size", self.source))
            }
        }
    }
}

/// Reads and decodes an image file to 8-bit RGB. The format is told by the content, not the
/// name, so a PNG named `.jpg` reads as what it is.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("unreadable image {}: {e}", path.display()))?;
    decode_bytes(&bytes, &path.display().to_string())
}

fn decode_bytes(bytes: &[u8], source: &str) -> Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|img| img.into_rgb8())
        .map_err(|e| anyhow!("corrupt or unreadable image {source}: {e}"))
}

/// The error when a dataset has no split of the requested name (as opposed to a split that
/// exists but cannot be read), so that a caller may try another name.
#[derive(Debug)]
pub struct MissingSplit {
    /// The split's name.
    pub split: String,
    pub message: String,
}

impl std::fmt::Display for MissingSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MissingSplit {}

/// A labelled split: samples plus the class names that labels index into.
#[derive(Clone, Debug, Default)]
pub struct ImageDataset {
    pub samples: Vec<Sample>,
    pub classes: Vec<String>,
    /// Where it came from, e.g. `data/cifar10-jpeg.tar.zst [train]`, for messages.
    pub name: String,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of samples of each class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for s in &self.samples {
            counts[s.label] += 1;
        }
        counts
    }

    /// Decodes every sample once (in parallel) to find corrupt or unreadable images up front.
    /// Without `skip_bad` the first bad image is an error naming it; with it, bad samples are
    /// removed and their number returned.
    pub fn verify(&mut self, skip_bad: bool) -> Result<usize> {
        let bad: Vec<(usize, anyhow::Error)> = self
            .samples
            .par_iter()
            .enumerate()
            .filter_map(|(i, s)| s.decode().err().map(|e| (i, e)))
            .collect();
        if bad.is_empty() {
            return Ok(0);
        }
        if !skip_bad {
            let (_, first) = bad.into_iter().next().expect("non-empty");
            return Err(first.context(format!(
                "{}: bad image (pass --skip-bad to leave such images out)",
                self.name
            )));
        }
        for (_, e) in &bad {
            eprintln!("warning: left out {e:#}");
        }
        let drop: BTreeSet<usize> = bad.iter().map(|(i, _)| *i).collect();
        let mut i = 0;
        self.samples.retain(|_| {
            i += 1;
            !drop.contains(&(i - 1))
        });
        Ok(drop.len())
    }
}

/// Fails unless both splits have the same classes in the same order (labels would not match).
pub fn check_same_classes(train: &ImageDataset, val: &ImageDataset) -> Result<()> {
    if train.classes == val.classes {
        return Ok(());
    }
    let a: BTreeSet<&String> = train.classes.iter().collect();
    let b: BTreeSet<&String> = val.classes.iter().collect();
    let only_a: Vec<&&String> = a.difference(&b).collect();
    let only_b: Vec<&&String> = b.difference(&a).collect();
    if only_a.is_empty() && only_b.is_empty() {
        bail!(
            "class mismatch: {} and {} have the same classes in a different order",
            train.name,
            val.name
        );
    }
    bail!(
        "class mismatch between {} ({} classes) and {} ({} classes): only in the first: {:?}; only in the second: {:?}",
        train.name,
        train.classes.len(),
        val.name,
        val.classes.len(),
        only_a,
        only_b
    )
}

/// Opens one split (`train`, `test`, `val`, ...) of a dataset, detecting its format:
///
/// - a `.tar`, `.tar.gz`/`.tgz` or `.tar.zst` archive of an ImageFolder tree (read once,
///   in a stream, without unpacking),
/// - an ImageFolder directory `<path>/<split>/<class>/*.{jpg,png}`, or one level down
///   (`<path>/<root>/<split>/...`, as in the CIFAR JPEG archive),
/// - a CIFAR-10 binary folder (`data_batch_{1..5}.bin`, `test_batch.bin`, possibly inside
///   `cifar-10-batches-bin/`),
/// - a CIFAR-100 binary folder (`train.bin`, `test.bin`, possibly in `cifar-100-binary/`),
/// - a Fashion-MNIST folder of IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-...`).
///
/// CIFAR and IDX have no validation split: `val` and `test` both mean the test set.
pub fn open_split(path: impl AsRef<Path>, split: &str) -> Result<ImageDataset> {
    Ok(open_splits(path, &[split])?.remove(0))
}

/// Opens several splits at once; an archive is read only once for all of them.
pub fn open_splits(path: impl AsRef<Path>, splits: &[&str]) -> Result<Vec<ImageDataset>> {
    let path = path.as_ref();
    ensure!(!splits.is_empty(), "no split requested");
    if !path.exists() {
        bail!("dataset path {} does not exist", path.display());
    }
    if path.is_file() {
        return read_archive(path, splits);
    }
    if let Some(dir) = find_with(path, &["cifar-10-batches-bin"], |d| {
        d.join("data_batch_1.bin").exists() || d.join("test_batch.bin").exists()
    }) {
        return splits.iter().map(|s| read_cifar10(&dir, s)).collect();
    }
    if let Some(dir) = find_with(path, &["cifar-100-binary"], |d| {
        d.join("train.bin").exists() || d.join("test.bin").exists()
    }) {
        return splits.iter().map(|s| read_cifar100(&dir, s)).collect();
    }
    if let Some(dir) = find_with(path, &["fashion-mnist"], |d| {
        ["train", "t10k"]
            .iter()
            .any(|p| idx_file(d, &format!("{p}-images-idx3-ubyte")).is_some())
    }) {
        return splits.iter().map(|s| read_idx_split(&dir, s)).collect();
    }
    splits.iter().map(|s| read_folder(path, s)).collect()
}

/// `dir` itself or one of its known sub-folders, whichever satisfies `is_it`.
fn find_with(dir: &Path, subdirs: &[&str], is_it: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    std::iter::once(dir.to_path_buf())
        .chain(subdirs.iter().map(|s| dir.join(s)))
        .find(|d| is_it(d))
}

fn has_image_extension(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    IMAGE_EXTENSIONS
        .iter()
        .any(|ext| lower.rsplit_once('.').is_some_and(|(_, e)| e == *ext))
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Image files under `dir`, recursively, in sorted order. A folder reached twice (through a
/// symbolic link) is an error: its images would count more than once, or without end.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<()> {
    let real = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    ensure!(
        seen.insert(real.clone()),
        "{} is the folder {} a second time (a symbolic link?): each image must be found once",
        dir.display(),
        real.display()
    );
    for p in sorted_dir(dir)? {
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            collect_images(&p, out, seen)?;
        } else if p.to_str().is_some_and(has_image_extension) {
            out.push(p);
        }
    }
    Ok(())
}

/// The sub-folders of `dir` (not hidden), sorted.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_dir(dir)?
        .into_iter()
        .filter(|p| p.is_dir() && !is_hidden(p))
        .collect())
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// ImageFolder: `<root>/<split>/<class>/**/<image>`, with `root` = `path` or its single child.
fn read_folder(path: &Path, split: &str) -> Result<ImageDataset> {
    let mut split_dir = path.join(split);
    if !split_dir.is_dir() {
        let children = subdirs(path)?;
        let nested: Vec<PathBuf> = children
            .iter()
            .map(|c| c.join(split))
            .filter(|d| d.is_dir())
            .collect();
        match nested.len() {
            1 => split_dir = nested[0].clone(),
            0 => {
                return Err(MissingSplit {
                    split: split.to_string(),
                    message: format!(
                        "no '{split}' split in {} (found folders: {:?}); expected <root>/{split}/<class>/<images>",
                        path.display(),
                        names(&children)
                    ),
                }
                .into());
            }
            _ => bail!("ambiguous '{split}' split in {}: {:?}", path.display(), nested),
        }
    }
    let name = format!("{} [{split}]", path.display());
    let class_dirs = subdirs(&split_dir)?;
    if class_dirs.is_empty() {
        bail!(
            "split {name} is empty: no class folders in {}",
            split_dir.display()
        );
    }
    let classes = names(&class_dirs);
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let mut files = Vec::new();
        collect_images(dir, &mut files, &mut seen)?;
        if files.is_empty() {
            bail!(
                "class '{}' of split {name} has no images (extensions {:?})",
                classes[label],
                IMAGE_EXTENSIONS
            );
        }
        samples.extend(files.into_iter().map(|f| Sample {
            source: f.display().to_string(),
            data: SampleData::File(f),
            label,
        }));
    }
    Ok(ImageDataset {
        samples,
        classes,
        name,
    })
}

/// A reader that undoes gzip or zstd compression, detected from the magic bytes.
pub(crate) fn decompressed(path: &Path) -> Result<Box<dyn Read>> {
    let mut file =
        BufReader::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?);
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic)?;
    let head = std::io::Cursor::new(magic[..n].to_vec()).chain(file);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(head)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(head)?),
        _ => Box::new(head),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Half the machine's memory: an archive's images are kept in memory, and a small compressed
/// file may unpack to far more.
fn memory_budget() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system parameters.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return pages as u64 * size as u64 / 2;
        }
    }
    u64::MAX
}

/// The largest archive member read as an image.
const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// A reader that records whether it reached the end of its stream.
struct EofWatch<R> {
    inner: R,
    eof: Rc<Cell<bool>>,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof.set(true);
        }
        Ok(n)
    }
}

/// Per-split state while streaming an archive.
#[derive(Default)]
struct ArchiveSplit {
    classes: BTreeSet<String>,
    images: Vec<(String, String, Vec<u8>)>, // (class, member path, bytes)
}

/// An ImageFolder archive, streamed once; only the requested splits' bytes are kept.
fn read_archive(path: &Path, splits: &[&str]) -> Result<Vec<ImageDataset>> {
    let mut found: BTreeMap<&str, ArchiveSplit> =
        splits.iter().map(|s| (*s, ArchiveSplit::default())).collect();
    let mut seen_tops = BTreeSet::new();
    let ended = Rc::new(Cell::new(false));
    let mut archive = tar::Archive::new(EofWatch {
        inner: decompressed(path)?,
        eof: ended.clone(),
    });
    let ctx = || format!("reading archive {}", path.display());
    let mut kept = 0u64;
    for entry in archive.entries().with_context(ctx)? {
        let mut entry = entry.with_context(ctx)?;
        let member = entry.path().with_context(ctx)?.into_owned();
        let comps: Vec<String> = member
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        if comps.iter().any(|c| c.starts_with('.')) {
            continue;
        }
        seen_tops.extend(comps.iter().take(2).cloned());
        // The split folder is at depth 0 (`train/cat/x.jpg`) or 1 (`cifar10/train/cat/x.jpg`).
        let Some((p, split)) = (0..2).find_map(|p| {
            let s = comps.get(p)?;
            found.contains_key(s.as_str()).then(|| (p, s.clone()))
        }) else {
            continue;
        };
        let Some(class) = comps.get(p + 1) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let slot = found.get_mut(split.as_str()).expect("requested split");
        if kind.is_dir() {
            slot.classes.insert(class.clone());
        } else if kind.is_file() && comps.len() > p + 2 && has_image_extension(&comps[comps.len() - 1]) {
            let size = entry.size();
            ensure!(
                size <= MAX_IMAGE_BYTES,
                "{} in {} claims {size} bytes, more than any image ({} MiB at most): the archive is damaged",
                member.display(),
                path.display(),
                MAX_IMAGE_BYTES >> 20
            );
            kept += size;
            ensure!(
                kept <= memory_budget(),
                "archive {} holds more image data than half this machine's memory; unpack it and \
                 pass the folder instead (images in a folder are read as they are used)",
                path.display()
            );
            let mut bytes = Vec::with_capacity(size as usize);
            (&mut entry)
                .take(size)
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {} in {}", member.display(), path.display()))?;
            ensure!(
                bytes.len() as u64 == size,
                "{} in {} is cut short ({} of {size} bytes): the archive is truncated",
                member.display(),
                path.display(),
                bytes.len()
            );
            slot.classes.insert(class.clone());
            slot.images
                .push((class.clone(), member.display().to_string(), bytes));
        }
    }
    // tar ends with zero blocks; running into the end of the stream instead means the archive
    // was cut at a member boundary, which the format does not notice by itself.
    ensure!(
        !ended.get(),
        "archive {} ends without tar's end-of-archive blocks: it is truncated (an interrupted \
         download or copy?); fetch it again",
        path.display()
    );
    let archive_name = path.display().to_string();
    splits
        .iter()
        .map(|split| {
            let s = found.remove(split).unwrap_or_default();
            let name = format!("{archive_name} [{split}]");
            if s.classes.is_empty() {
                return Err(MissingSplit {
                    split: split.to_string(),
                    message: format!(
                        "no '{split}' split in archive {archive_name} (top-level folders: {seen_tops:?}); expected [<root>/]{split}/<class>/<images>"
                    ),
                }
                .into());
            }
            let classes: Vec<String> = s.classes.into_iter().collect();
            let index: BTreeMap<&str, usize> = classes
                .iter()
                .enumerate()
                .map(|(i, c)| (c.as_str(), i))
                .collect();
            let mut samples: Vec<Sample> = s
                .images
                .into_iter()
                .map(|(class, member, bytes)| Sample {
                    data: SampleData::Encoded(bytes),
                    label: index[class.as_str()],
                    source: format!("{archive_name}:{member}"),
                })
                .collect();
            samples.sort_by(|a, b| (a.label, &a.source).cmp(&(b.label, &b.source)));
            let ds = ImageDataset {
                samples,
                classes,
                name,
            };
            if let Some(c) = ds.class_counts().iter().position(|&n| n == 0) {
                bail!(
                    "class '{}' of split {} has no images (extensions {:?})",
                    ds.classes[c],
                    ds.name,
                    IMAGE_EXTENSIONS
                );
            }
            Ok(ds)
        })
        .collect()
}

/// Class names from a `batches.meta.txt`-style file (one per line), or the built-in list.
fn class_names(file: &Path, default: &[&str]) -> Result<Vec<String>> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        ensure!(
            names.len() == default.len(),
            "{} lists {} classes, expected {}",
            file.display(),
            names.len(),
            default.len()
        );
        return Ok(names);
    }
    Ok(default.iter().map(|s| s.to_string()).collect())
}

/// Reads fixed-size CIFAR records: `label_bytes` label bytes (the last one is used), then
/// 3×32×32 pixels as three planes.
fn read_cifar_file(file: &Path, label_bytes: usize, num_classes: usize, out: &mut Vec<Sample>) -> Result<()> {
    const PIXELS: usize = 3 * 32 * 32;
    let record = label_bytes + PIXELS;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    ensure!(
        !bytes.is_empty() && bytes.len() % record == 0,
        "{}: size {} is not a positive multiple of the {record}-byte CIFAR record (corrupt or wrong format)",
        file.display(),
        bytes.len()
    );
    let fname = file.file_name().unwrap_or_default().to_string_lossy();
    for (r, chunk) in bytes.chunks_exact(record).enumerate() {
        let label = chunk[label_bytes - 1] as usize;
        ensure!(
            label < num_classes,
            "{}#{r}: label {label} out of range (0..{num_classes})",
            file.display()
        );
        let planes = &chunk[label_bytes..];
        let pixels = (0..1024)
            .flat_map(|i| [planes[i], planes[1024 + i], planes[2048 + i]])
            .collect();
        out.push(Sample {
            data: SampleData::Raw {
                width: 32,
                height: 32,
                channels: 3,
                pixels,
            },
            label,
            source: format!("{fname}#{r}"),
        });
    }
    Ok(())
}

fn cifar_split_files(dir: &Path, split: &str, train: &[&str], test: &[&str]) -> Result<Vec<PathBuf>> {
    let names = match split {
        "train" => train,
        "test" | "val" => test,
        other => bail!("CIFAR has no '{other}' split (use train, test or val)"),
    };
    names
        .iter()
        .map(|n| {
            let f = dir.join(n);
            if f.is_file() {
                Ok(f)
            } else {
                Err(anyhow!(
                    "missing {split} split file {} (incomplete CIFAR folder?)",
                    f.display()
                ))
            }
        })
        .collect()
}

fn read_cifar10(dir: &Path, split: &str) -> Result<ImageDataset> {
    let files = cifar_split_files(
        dir,
        split,
        &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        &["test_batch.bin"],
    )?;
    let mut samples = Vec::new();
    for f in &files {
        read_cifar_file(f, 1, 10, &mut samples)?;
    }
    Ok(ImageDataset {
        samples,
        classes: class_names(&dir.join("batches.meta.txt"), &CIFAR10_CLASSES)?,
        name: format!("{} [{split}]", dir.display()),
    })
}

fn read_cifar100(dir: &Path, split: &str) -> Result<ImageDataset> {
    let files = cifar_split_files(dir, split, &["train.bin"], &["test.bin"])?;
    let mut samples = Vec::new();
    for f in &files {
        // Records carry (coarse, fine) labels; we train on the 100 fine classes.
        read_cifar_file(f, 2, 100, &mut samples)?;
    }
    Ok(ImageDataset {
        samples,
        classes: class_names(&dir.join("fine_label_names.txt"), &CIFAR100_CLASSES)?,
        name: format!("{} [{split}]", dir.display()),
    })
}

/// `dir/<stem>` or `dir/<stem>.gz`, whichever exists.
fn idx_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Reads an IDX file (optionally gzipped): returns its dimensions and data bytes.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut bytes = Vec::new();
    decompressed(path)?
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read IDX file {}", path.display()))?;
    ensure!(
        bytes.len() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08,
        "{} is not an unsigned-byte IDX file (bad magic)",
        path.display()
    );
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    ensure!(bytes.len() >= header, "{}: truncated header", path.display());
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expect: usize = dims.iter().product();
    ensure!(
        bytes.len() - header == expect,
        "{}: {} data bytes for dimensions {dims:?} (expected {expect}; truncated?)",
        path.display(),
        bytes.len() - header
    );
    bytes.drain(..header);
    Ok((dims, bytes))
}

fn read_idx_split(dir: &Path, split: &str) -> Result<ImageDataset> {
    let prefix = match split {
        "train" => "train",
        "test" | "val" => "t10k",
        other => bail!("Fashion-MNIST has no '{other}' split (use train, test or val)"),
    };
    let find = |stem: String| {
        idx_file(dir, &stem)
            .ok_or_else(|| anyhow!("missing {split} split file {}[.gz]", dir.join(&stem).display()))
    };
    let images_file = find(format!("{prefix}-images-idx3-ubyte"))?;
    let labels_file = find(format!("{prefix}-labels-idx1-ubyte"))?;
    let (dims, pixels) = read_idx(&images_file)?;
    let (ldims, labels) = read_idx(&labels_file)?;
    ensure!(
        dims.len() == 3 && ldims.len() == 1,
        "{} / {}: expected 3-d images and 1-d labels, got {dims:?} and {ldims:?}",
        images_file.display(),
        labels_file.display()
    );
    ensure!(
        dims[0] == ldims[0],
        "{} has {} images but {} has {} labels",
        images_file.display(),
        dims[0],
        labels_file.display(),
        ldims[0]
    );
    ensure!(dims[0] > 0, "split {split} in {} is empty", dir.display());
    let (h, w) = (dims[1], dims[2]);
    let fname = images_file.file_name().unwrap_or_default().to_string_lossy();
    let samples = pixels
        .chunks_exact(h * w)
        .zip(&labels)
        .enumerate()
        .map(|(i, (px, &label))| {
            ensure!(
                (label as usize) < FASHION_MNIST_CLASSES.len(),
                "{}#{i}: label {label} out of range",
                labels_file.display()
            );
            Ok(Sample {
                data: SampleData::Raw {
                    width: w as u32,
                    height: h as u32,
                    channels: 1,
                    pixels: px.to_vec(),
                },
                label: label as usize,
                source: format!("{fname}#{i}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageDataset {
        samples,
        classes: FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
        name: format!("{} [{split}]", dir.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_are_complete_and_sorted() {
        assert_eq!(CIFAR100_CLASSES.len(), 100);
        assert!(CIFAR100_CLASSES.windows(2).all(|w| w[0] < w[1]));
        assert!(CIFAR10_CLASSES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn extensions_are_case_insensitive() {
        assert!(has_image_extension("a/b/X.JPEG"));
        assert!(has_image_extension("x.png"));
        assert!(!has_image_extension("notes.txt"));
        assert!(!has_image_extension("jpg"));
    }
}
