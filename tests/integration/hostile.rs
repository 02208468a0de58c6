//! A corpus of damaged and hostile files, each written by the test, each with the error it must
//! give: weights (`.pth`, safetensors), archives, folder trees, run directories, inputs.

use std::io::Write;
use std::path::Path;

use vicinity::cli::{FeatureInput, features};
use vicinity::data::synth::{Compression, Encoding, pack_tar, write_image_folder};
use vicinity::data::{open_split, open_splits};
use vicinity::weights::{self, pth::PthTensor};

use crate::common::{B, TempDir, fixtures_dir};

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ------------------------------------------------------------------ a .pth writer

/// Storage blobs of a crafted file: (key, bytes).
pub type Blobs = Vec<(String, Vec<u8>)>;
/// A change made to a crafted file's entries and blobs.
type Damage<'a> = Box<dyn Fn(&mut Vec<Entry>, &mut Blobs) + 'a>;

/// One tensor entry of a crafted state dict.
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub key: String,
    pub storage: &'static str,
    pub numel: i64,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

fn pickle_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn pickle_int(out: &mut Vec<u8>, v: i64) {
    out.push(0x8a);
    out.push(8);
    out.extend(v.to_le_bytes());
}

/// The pickle `torch.save(state_dict)` writes, for `entries`.
pub fn state_dict_pickle(entries: &[Entry]) -> Vec<u8> {
    let mut out = vec![0x80, 2, b'}', b'('];
    for e in entries {
        pickle_str(&mut out, &e.name);
        out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        out.push(b'(');
        pickle_str(&mut out, "storage");
        out.extend(format!("ctorch\n{}\n", e.storage).as_bytes());
        pickle_str(&mut out, &e.key);
        pickle_str(&mut out, "cpu");
        pickle_int(&mut out, e.numel);
        out.extend(b"tQ");
        pickle_int(&mut out, e.offset);
        for dims in [&e.shape, &e.stride] {
            out.push(b'(');
            for &d in dims {
                pickle_int(&mut out, d);
            }
            out.push(b't');
        }
        out.push(0x89);
        out.extend(b"ccollections\nOrderedDict\n)R");
        out.extend(b"tR");
    }
    out.extend(b"u.");
    out
}

/// A zip in torch.save's layout: `archive/data.pkl` and `archive/data/<key>`, stored.
pub fn write_pth(path: &Path, pickle: &[u8], blobs: &[(String, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in blobs {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// The tensors of `vvt_mini.pth` as contiguous f32 entries with one storage each.
pub fn mini_entries() -> (Vec<Entry>, Blobs, Vec<(String, PthTensor)>) {
    let tensors = weights::read_pytorch(&fixtures_dir().join("vvt_mini.pth")).unwrap();
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let mut stride = vec![1i64; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1] as i64;
        }
        entries.push(Entry {
            name: name.clone(),
            key: i.to_string(),
            storage: "FloatStorage",
            numel: t.values.len() as i64,
            offset: 0,
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            stride,
        });
        blobs.push((
            i.to_string(),
            t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    (entries, blobs, tensors)
}

fn first_matrix(entries: &[Entry]) -> usize {
    entries
        .iter()
        .position(|e| e.shape.len() == 2 && e.shape[0] > 1 && e.shape[1] > 1)
        .unwrap()
}

#[test]
fn crafted_pth_files_read_exactly_or_fail_by_name() {
    let t = TempDir::new("pth");
    let (entries, blobs, reference) = mini_entries();
    let path = t.0.join("m.pth");

    // Rewritten as is: the same tensors.
    write_pth(&path, &state_dict_pickle(&entries), &blobs);
    assert_eq!(weights::read_pytorch(&path).unwrap(), reference);

    // A matrix saved as a transposed view of its storage (strides other than row-major) reads
    // as the view, and half-precision storages convert.
    let m = first_matrix(&entries);
    let (rows, cols) = (entries[m].shape[0] as usize, entries[m].shape[1] as usize);
    let mut view = entries.clone();
    view[m].stride = vec![1, rows as i64];
    let mut view_blobs = blobs.clone();
    let values = &reference[m].1.values;
    view_blobs[m].1 = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| values[r * cols + c]))
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let h = first_matrix(&entries[m + 1..]) + m + 1;
    view[h].storage = "HalfStorage";
    view_blobs[h].1 = reference[h]
        .1
        .values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_pth(&path, &state_dict_pickle(&view), &view_blobs);
    let read = weights::read_pytorch(&path).unwrap();
    assert_eq!(read[m], reference[m], "a strided view reads as the view");
    for (a, b) in read[h].1.values.iter().zip(&reference[h].1.values) {
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-2), "f16 storage converts");
    }

    // Each damage names the file, the tensor and the problem.
    let name = &entries[m].name;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "missing storage",
            Box::new(|_, b| {
                b.remove(m);
            }),
            "is missing",
        ),
        (
            "storage shorter than declared",
            Box::new(|_, b| b[m].1.truncate(8)),
            "should hold",
        ),
        (
            "storage shorter than the tensor",
            Box::new(|e, b| {
                b[m].1.truncate(8);
                e[m].numel = 2;
            }),
            "more elements than its storage",
        ),
        (
            "offset past the end",
            Box::new(|e, _| e[m].offset = 1 << 20),
            "past the end",
        ),
        (
            "shape past the storage",
            Box::new(|e, _| e[m].shape = vec![1 << 40, 1 << 20]),
            "more elements",
        ),
        (
            "stride past the storage",
            Box::new(|e, _| e[m].stride = vec![1 << 30, 1]),
            "past the end",
        ),
        (
            "negative stride",
            Box::new(|e, _| e[m].stride = vec![-1, 1]),
            "negative",
        ),
        (
            "rank 40",
            Box::new(|e, _| (e[m].shape, e[m].stride) = (vec![1; 40], vec![1; 40])),
            "at most 32",
        ),
        (
            "integer tensor",
            Box::new(|e, _| e[m].storage = "IntStorage"),
            "int32",
        ),
        ("ragged storage", Box::new(|_, b| b[m].1.push(0)), "whole number"),
        (
            "unknown storage type",
            Box::new(|e, _| e[m].storage = "EvilStorage"),
            "unknown storage type",
        ),
    ];
    for (what, damage, expected) in cases {
        let (mut e, mut b) = (entries.clone(), blobs.clone());
        damage(&mut e, &mut b);
        write_pth(&path, &state_dict_pickle(&e), &b);
        let err = err_text(weights::read_pytorch(&path));
        assert!(err.contains(expected) && err.contains("m.pth"), "{what}: {err}");
        if !matches!(what, "unknown storage type" | "negative stride" | "rank 40") {
            assert!(err.contains(name.as_str()), "{what} names the tensor: {err}");
        }
    }

    // A NaN weight is refused when it is loaded into a model.
    let mut b = blobs.clone();
    b[m].1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_pth(&path, &state_dict_pickle(&entries), &b);
    let model = vicinity::models::resolve_config(&config("vvt_mini.json"))
        .unwrap()
        .init::<B>(&Default::default())
        .unwrap();
    let err = err_text(weights::load_any(model, &path));
    assert!(
        err.contains("NaN or infinite") && err.contains(name.as_str()),
        "{err}"
    );

    // Not a zip at all, a zip without a pickle, a pickle that calls os.system.
    std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
    assert!(err_text(weights::read_pytorch(&path)).contains("zip format"));
    write_pth(&path, b"\x80\x02}.", &[]);
    assert!(err_text(weights::read_pytorch(&path)).contains("holds no tensors"));
    write_pth(&path, b"\x80\x02}(", &[]);
    assert!(err_text(weights::read_pytorch(&path)).contains("ends early"));
    write_pth(&path, b"\x80\x02cos\nsystem\nX\x05\x00\x00\x00touch\x85R.", &[]);
    assert!(err_text(weights::read_pytorch(&path)).contains("holds no tensors"));
}

fn config(file: &str) -> String {
    format!("{}/configs/{file}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn native_weights_of_other_dtypes_convert_or_fail_by_name() {
    let t = TempDir::new("native");
    let device = Default::default();
    let cfg = vicinity::models::resolve_config(&config("vvt_mini.json")).unwrap();
    let model = cfg.init::<B>(&device).unwrap();
    let bytes = weights::native_bytes(&model, &cfg).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let names: Vec<String> = file.names().into_iter().cloned().collect();
    let rewrite = |dtype: safetensors::Dtype, width: usize, encode: &dyn Fn(f32) -> Vec<u8>| -> Vec<u8> {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = names
            .iter()
            .map(|n| {
                let v = file.tensor(n).unwrap();
                let values = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                let bytes: Vec<u8> = values.flat_map(encode).collect();
                assert_eq!(bytes.len(), v.shape().iter().product::<usize>() * width);
                (n.clone(), v.shape().to_vec(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, meta.metadata()).unwrap()
    };
    // bf16 and f64 files load (as f32).
    for (dtype, width, encode) in [
        (
            safetensors::Dtype::BF16,
            2,
            &(|v: f32| half::bf16::from_f32(v).to_le_bytes().to_vec()) as &dyn Fn(f32) -> Vec<u8>,
        ),
        (safetensors::Dtype::F64, 8, &|v: f32| {
            (v as f64).to_le_bytes().to_vec()
        }),
    ] {
        let bytes = rewrite(dtype, width, encode);
        weights::load_native_bytes(cfg.init::<B>(&device).unwrap(), bytes, "x.safetensors")
            .unwrap_or_else(|e| panic!("{dtype:?}: {e:#}"));
    }
    // I32 is refused by name, without a crash.
    let bytes = rewrite(safetensors::Dtype::I32, 4, &|v: f32| {
        (v as i32).to_le_bytes().to_vec()
    });
    let path = t.0.join("int.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let err = err_text(weights::load_any(cfg.init::<B>(&device).unwrap(), &path));
    assert!(
        err.contains("I32") && err.contains("int.safetensors") && err.contains("floating point"),
        "{err}"
    );
    // A header that lies about offsets.
    let mut bad = bytes.clone();
    bad.truncate(bad.len() - 100);
    let err = err_text(weights::load_native_bytes(
        cfg.init::<B>(&device).unwrap(),
        bad,
        "cut.safetensors",
    ));
    assert!(
        err.contains("cut.safetensors") && err.contains("not a readable safetensors"),
        "{err}"
    );
}

#[test]
fn features_refuse_an_empty_batch() {
    let t = TempDir::new("features");
    let input = t.0.join("empty.safetensors");
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("input".to_string(), (vec![0, 3, 64, 64], vec![]));
    vicinity::io::write_safetensors(&input, &tensors).unwrap();
    let out = t.0.join("f.safetensors");
    let err = err_text(features::<B>(
        Some(&config("vvt_mini.json")),
        None,
        FeatureInput::Tensor(input),
        None,
        &out,
        &Default::default(),
    ));
    assert!(
        err.contains("[0, 3, 64, 64]") && err.contains("at least one image"),
        "{err}"
    );
}

// ------------------------------------------------------------------ archives and folders

/// A tar with one member whose header claims `size` bytes, followed by nothing.
fn tar_claiming(size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path("train/cat/0.jpg").unwrap();
    header.set_size(size);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend(vec![0u8; 1536]);
    out
}

#[test]
fn damaged_archives_are_refused() {
    let t = TempDir::new("damaged-archives");
    // A 2 KB archive claiming a 2^40-byte member: refused before any allocation.
    let bomb = t.0.join("bomb.tar");
    std::fs::write(&bomb, tar_claiming(1 << 40)).unwrap();
    let err = err_text(open_split(&bomb, "train"));
    assert!(
        err.contains("claims 1099511627776 bytes") && err.contains("bomb.tar"),
        "{err}"
    );
    // A member that says 4 KB but the file ends first.
    std::fs::write(&bomb, tar_claiming(4096)).unwrap();
    let err = err_text(open_split(&bomb, "train"));
    assert!(err.contains("cut short") || err.contains("truncated"), "{err}");

    // An archive cut at a member boundary: tar itself does not notice.
    let tree = t.0.join("tree");
    write_image_folder(&tree, &["train", "val"], &["a", "b"], 3, [8, 8], Encoding::Png).unwrap();
    let whole = t.0.join("whole.tar");
    pack_tar(&tree, &whole, Compression::None).unwrap();
    assert_eq!(open_splits(&whole, &["train", "val"]).unwrap()[0].len(), 6);
    let bytes = std::fs::read(&whole).unwrap();
    // Cut just after the first member's data (its 512-byte blocks), where a header would follow.
    let mut archive = tar::Archive::new(bytes.as_slice());
    let first_end = {
        let mut entries = archive.entries().unwrap();
        let mut end = 0;
        for e in entries.by_ref() {
            let e = e.unwrap();
            if e.header().entry_type().is_file() {
                end = e.raw_file_position() + e.size().div_ceil(512) * 512;
                break;
            }
        }
        end as usize
    };
    let cut = t.0.join("cut.tar");
    std::fs::write(&cut, &bytes[..first_end]).unwrap();
    let err = err_text(open_splits(&cut, &["train", "val"]));
    assert!(err.contains("truncated") && err.contains("cut.tar"), "{err}");
}

#[test]
#[cfg(unix)]
fn a_folder_reached_twice_is_refused() {
    let t = TempDir::new("loop");
    write_image_folder(&t.0, &["train"], &["a", "b"], 2, [8, 8], Encoding::Png).unwrap();
    // a/loop -> .. (the split): every image would be found again, without end.
    std::os::unix::fs::symlink(t.0.join("train"), t.0.join("train/a/loop")).unwrap();
    let err = err_text(open_split(&t.0, "train"));
    assert!(err.contains("a second time"), "{err}");
}
