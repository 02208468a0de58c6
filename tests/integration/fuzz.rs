//! Byte-mutation fuzzing of every reader of untrusted files: the `.pth` reader, native
//! safetensors weights, dataset archives and model configurations. Each target mutates a valid
//! file (bit flips, boundary integers, cuts, repeats) for a fixed time and asks only that the
//! reader answers: a value or an error, never a panic, an abort or a huge allocation (the test
//! binary's allocator refuses any single allocation over 1 GiB, see `main.rs`).
//!
//! `VICINITY_FUZZ_SECONDS` sets the time per target (default 5); `VICINITY_FUZZ_SEED` replays a
//! run. Each target prints how many inputs it tried. The input being tried is kept in
//! `target/tmp/fuzz-failures/<target>-current` while it runs, so an abort (which no test can
//! catch) leaves it behind; a panicking input is kept under its seed and number.

use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use vicinity::data::synth::{Compression, Encoding, pack_tar, write_image_folder};

use crate::common::{B, TempDir, fixtures_dir};

fn seconds() -> Duration {
    let s = std::env::var("VICINITY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(s)
}

fn rng(target: &str) -> (StdRng, u64) {
    let seed = std::env::var("VICINITY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mixed = target.bytes().fold(seed, |h, b| h.rotate_left(5) ^ b as u64);
    (StdRng::seed_from_u64(mixed), seed)
}

/// Integers at the edges where sizes, offsets and counts go wrong.
const INTERESTING: [u64; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    u64::MAX,
];

/// One to four mutations of `bytes`.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..6) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = [0, 0xff, 0x7f, 0x80, b'(', b't', b'R'][rng.random_range(0..7)],
            2 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
                let n = [1, 2, 4, 8][rng.random_range(0..4)];
                let end = (at + n).min(bytes.len());
                bytes[at..end].copy_from_slice(&v[..end - at]);
            }
            3 => {
                let end = rng.random_range(at..=bytes.len().min(at + 64));
                bytes.drain(at..end);
            }
            4 => {
                let end = rng.random_range(at..=bytes.len().min(at + 64));
                let piece = bytes[at..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, piece);
            }
            _ => bytes.truncate(at),
        }
    }
}

/// Runs `attempt` on mutations of `seed_input` until the time is up; panics name the input.
fn fuzz(target: &str, seed_input: &[u8], mut attempt: impl FnMut(&[u8]) -> bool) {
    let (mut rng, seed) = rng(target);
    let (start, limit) = (Instant::now(), seconds());
    let (mut tried, mut accepted) = (0u64, 0u64);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let current = dir.join(format!("{target}-current"));
    // The unmutated file must read: a reader refusing everything would pass the loop below.
    assert!(
        attempt(seed_input),
        "fuzz {target}: the valid seed input is refused"
    );
    while start.elapsed() < limit {
        let mut input = seed_input.to_vec();
        mutate(&mut rng, &mut input);
        tried += 1;
        std::fs::write(&current, &input).unwrap();
        match catch_unwind(AssertUnwindSafe(|| attempt(&input))) {
            Ok(ok) => accepted += ok as u64,
            Err(_) => {
                let kept = dir.join(format!("{target}-{seed}-{tried}"));
                std::fs::rename(&current, &kept).unwrap();
                panic!(
                    "fuzz {target}: input {tried} panicked (seed {seed}); kept in {}",
                    kept.display()
                );
            }
        }
    }
    let _ = std::fs::remove_file(&current);
    // Straight to stderr, past the test harness's capture, so that CI's log shows the counts.
    let line = format!(
        "fuzz {target}: {tried} inputs in {:.1} s, {accepted} read, {} refused with an error, 0 crashes (seed {seed})\n",
        start.elapsed().as_secs_f64(),
        tried - accepted
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    assert!(
        tried > 0 && accepted > 0,
        "fuzz {target}: no mutated input was read"
    );
}

/// The members of a zip file, in order.
fn unzip(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            (f.name().to_string(), bytes)
        })
        .collect()
}

fn rezip(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        zip.start_file(name.as_str(), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn fuzz_pth_reader() {
    let t = TempDir::new("fuzz-pth");
    let fixture = fixtures_dir().join("vvt_mini.pth");
    let members = unzip(&fixture);
    let pkl = members.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let path = t.0.join("m.pth");
    // The pickle mutated inside a valid zip (so the zip's checksums pass and the pickle machine
    // and the storage checks are what is tested).
    fuzz("pth-pickle", &members[pkl].1, |pickle| {
        let mut m = members.clone();
        m[pkl].1 = pickle.to_vec();
        rezip(&path, &m);
        vicinity::weights::read_pytorch(&path).is_ok()
    });
    // The zip's own bytes (directory, headers, lengths).
    let raw = std::fs::read(&fixture).unwrap();
    fuzz("pth-zip", &raw, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        vicinity::weights::read_pytorch(&path).is_ok()
    });
}

#[test]
fn fuzz_native_weights() {
    let cfg = vicinity::train::demo::micro_vvt(3);
    let device = Default::default();
    let model = cfg.init::<B>(&device).unwrap();
    let bytes = vicinity::weights::native_bytes(&model, &cfg).unwrap();
    fuzz("safetensors", &bytes, |b| {
        vicinity::weights::load_native_bytes(model.clone(), b.to_vec(), "fuzz.safetensors").is_ok()
    });
}

#[test]
fn fuzz_dataset_archives() {
    let t = TempDir::new("fuzz-tar");
    let tree = t.0.join("tree");
    write_image_folder(&tree, &["train", "val"], &["a", "b"], 2, [6, 6], Encoding::Png).unwrap();
    let path = t.0.join("d.tar");
    for (comp, name) in [(Compression::None, "tar"), (Compression::Gzip, "tar-gz")] {
        pack_tar(&tree, &path, comp).unwrap();
        let archive = std::fs::read(&path).unwrap();
        fuzz(name, &archive, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            match vicinity::data::open_splits(&path, &["train", "val"]) {
                Ok(mut splits) => splits.iter_mut().all(|s| s.verify(true).is_ok()),
                Err(_) => false,
            }
        });
    }
}

#[test]
fn fuzz_model_configs() {
    let t = TempDir::new("fuzz-config");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    // The fixture models as written by hand, and two ablation models with every optional field
    // written out (attention kinds, Performer and Linformer sizes, LSAGT's variant switches).
    let mut seeds: Vec<(String, Vec<u8>)> = ["vvt_mini.json", "lsagt_cifar_mini.toml"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(configs.join(f)).unwrap()))
        .collect();
    for name in ["vvt_tiny_linformer", "lsagt_cifar_tiny_translated"] {
        let c = vicinity::models::config_by_name(name).unwrap();
        seeds.push((format!("{name}.json"), serde_json::to_vec_pretty(&c).unwrap()));
    }
    for (file, text) in seeds {
        let file = file.as_str();
        let path = t.0.join(file);
        fuzz(file, &text, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            match vicinity::models::resolve_config(path.to_str().unwrap()) {
                // A configuration that parses and validates also gets its costs counted.
                Ok(c) => {
                    c.validate().is_ok() && {
                        let r = c.default_resolution();
                        c.check_input(r, r).is_err() || !c.costs(r, r).is_empty()
                    }
                }
                Err(_) => false,
            }
        });
    }
}
