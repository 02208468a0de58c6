//! Downloading CIFAR with checksum verification.
//!
//! The archive is streamed to `<name>.part` while hashing, renamed only once its MD5 matches,
//! and unpacked through a temporary folder, so an interrupted or corrupted download never leaves
//! something that looks like a dataset.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};

use super::dataset::decompressed;

/// The official host of the CIFAR archives.
pub const CIFAR_BASE_URL: &str = "https://www.cs.toronto.edu/~kriz";

/// Which CIFAR binary archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Cifar10,
    Cifar100,
}

impl Cifar {
    pub fn archive_name(self) -> &'static str {
        match self {
            Cifar::Cifar10 => "cifar-10-binary.tar.gz",
            Cifar::Cifar100 => "cifar-100-binary.tar.gz",
        }
    }

    /// MD5 published with the archive (torchvision uses the same values).
    pub fn md5(self) -> &'static str {
        match self {
            Cifar::Cifar10 => "c32a1d4ab5d03f1284b67883e8d87530",
            Cifar::Cifar100 => "03b5dce01913d631647c71ecec9e9cb8",
        }
    }

    /// Folder the archive unpacks to.
    pub fn dir_name(self) -> &'static str {
        match self {
            Cifar::Cifar10 => "cifar-10-batches-bin",
            Cifar::Cifar100 => "cifar-100-binary",
        }
    }

    fn complete(self, dir: &Path) -> bool {
        let files: &[&str] = match self {
            Cifar::Cifar10 => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
                "test_batch.bin",
            ],
            Cifar::Cifar100 => &["train.bin", "test.bin"],
        };
        files.iter().all(|f| dir.join(f).is_file())
    }
}

/// Downloads and unpacks a CIFAR binary archive from `base_url` (normally [`CIFAR_BASE_URL`])
/// into `dest`, verifying the official MD5. Returns the dataset folder; does nothing when it is
/// already complete. Open it with [`super::open_split`].
pub fn download_cifar(kind: Cifar, dest: &Path, base_url: &str) -> Result<PathBuf> {
    let dir = dest.join(kind.dir_name());
    if kind.complete(&dir) {
        return Ok(dir);
    }
    let url = format!("{}/{}", base_url.trim_end_matches('/'), kind.archive_name());
    download_and_unpack(&url, dest, kind.md5())?;
    if !kind.complete(&dir) {
        bail!(
            "{} did not unpack to a complete {}",
            kind.archive_name(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Downloads `url` into `dest` (file name = last URL segment) checking `md5_hex`, then unpacks
/// it there (tar, tar.gz or tar.zst). A verified archive already present is not fetched again.
pub fn download_and_unpack(url: &str, dest: &Path, md5_hex: &str) -> Result<PathBuf> {
    let name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("no file name in URL {url}"))?;
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let archive = dest.join(name);
    let present = archive.is_file() && md5_file(&archive)? == md5_hex.to_ascii_lowercase();
    if !present {
        download_verified(url, &archive, md5_hex)?;
    }
    unpack(&archive, dest)?;
    Ok(archive)
}

/// MD5 of a file as lower-case hex.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("{:x}", h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Streams `url` to `file`, hashing on the way; the file appears only if the MD5 matches.
pub fn download_verified(url: &str, file: &Path, md5_hex: &str) -> Result<()> {
    let part = file.with_file_name(format!(
        "{}.part",
        file.file_name().unwrap_or_default().to_string_lossy()
    ));
    let result = fetch_to(url, &part).and_then(|got| {
        if got != md5_hex.to_ascii_lowercase() {
            bail!(
                "checksum mismatch for {url}: expected MD5 {md5_hex}, got {got} (corrupted or wrong file; nothing was kept)"
            );
        }
        std::fs::rename(&part, file)
            .with_context(|| format!("cannot move {} into place", part.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// GET `url` into `path`; returns the MD5 of what was written.
fn fetch_to(url: &str, path: &Path) -> Result<String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .build();
    let response = agent
        .get(url)
        .call()
        .with_context(|| format!("cannot download {url}"))?;
    let mut reader = response.into_reader();
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("download of {url} interrupted"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush()?;
    Ok(format!("{:x}", h.finalize()))
}

/// Unpacks a (compressed) tar into `dest` via a temporary folder, then moves its top-level
/// entries into place, replacing older copies of them.
pub fn unpack(archive: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.join(format!(
        ".unpack-{}",
        archive.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        tar::Archive::new(decompressed(archive)?)
            .unpack(&tmp)
            .with_context(|| format!("cannot unpack {}", archive.display()))?;
        for entry in std::fs::read_dir(&tmp)? {
            let from = entry?.path();
            let to = dest.join(from.file_name().expect("entry has a name"));
            if to.is_dir() {
                std::fs::remove_dir_all(&to)?;
            } else if to.exists() {
                std::fs::remove_file(&to)?;
            }
            std::fs::rename(&from, &to)
                .with_context(|| format!("cannot move {} into place", to.display()))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
