//! `vicinity explain` as a user runs it, on the fixtures' official checkpoints: the files it
//! writes, their maps' shapes, and clear errors for what cannot be drawn.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{TempDir, fixtures_dir};
use vicinity::data::synth::{Encoding, write_image_folder};

fn vicinity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicinity"))
        .args(["--backend", "flex", "explain"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `(name, shape)` of every tensor of a safetensors file, sorted by name.
fn shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    out.sort();
    out
}

/// A 32×32 PNG.
fn image(dir: &Path) -> String {
    let path = dir.join("img.png");
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 90]));
    img.save(&path).unwrap();
    path.to_str().unwrap().to_string()
}

fn weights(name: &str) -> String {
    fixtures_dir()
        .join(format!("{name}.pth"))
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn gradcam_writes_an_overlay_sheet_and_every_stage_map() {
    let dir = TempDir::new("explain-gradcam");
    let img = image(&dir.0);
    let out = dir.0.join("out");
    let (w, out_s) = (weights("vvt_mini"), out.to_str().unwrap());
    let o = vicinity(&[
        &img,
        "--weights",
        &w,
        "--model",
        "configs/vvt_mini.json",
        "-o",
        out_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("img: explaining class"), "{text}");
    assert!(out.join("img-gradcam.png").is_file());
    // The model's own 64² input (the image is resized): stage grids 16², 8², 4², 2².
    let want: Vec<(String, Vec<usize>)> = (1..=4)
        .map(|s| (format!("stage{s}"), vec![64 >> (s + 1), 64 >> (s + 1)]))
        .collect();
    assert_eq!(shapes(&out.join("img-gradcam.safetensors")), want);

    // One stage: its overlay alone; Grad-CAM++ as well.
    let o = vicinity(&[
        &img,
        "--weights",
        &w,
        "--model",
        "configs/vvt_mini.json",
        "--method",
        "gradcam++",
        "--stage",
        "2",
        "-o",
        out_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("img-gradcampp-stage2.png").is_file());
    assert_eq!(
        shapes(&out.join("img-gradcampp.safetensors")),
        vec![("stage2".into(), vec![8, 8])]
    );
}

#[test]
fn locality_and_variants_maps_have_their_grids() {
    let dir = TempDir::new("explain-maps");
    let img = image(&dir.0);
    let out = dir.0.join("out");
    let out_s = out.to_str().unwrap();
    // vvt_mini_sr at 64²: stage 1's 16×16 queries attend to keys reduced by its sr ratio.
    let w = weights("vvt_mini_sr");
    let o = vicinity(&[
        &img,
        "--weights",
        &w,
        "--model",
        "configs/vvt_mini_sr.json",
        "--method",
        "locality",
        "--query",
        "5,60",
        "--stage",
        "1",
        "-o",
        out_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let maps = shapes(&out.join("img-locality.safetensors"));
    let names: Vec<&str> = maps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "stage1-head1");
    assert_eq!(names.last(), Some(&"stage1-locality"));
    let sr =
        vicinity::models::resolve_config(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/vvt_mini_sr.json"))
            .unwrap();
    let vicinity::models::ModelConfig::Vvt(sr) = sr else {
        unreachable!()
    };
    let key_side = 16 / sr.sr_ratios[0];
    assert!(key_side < 16);
    assert!(
        maps.iter().all(|(_, s)| s == &vec![key_side, key_side]),
        "{maps:?}"
    );

    let w = weights("lsagt_cifar_mini");
    let o = vicinity(&[
        &img,
        "--weights",
        &w,
        "--model",
        "configs/lsagt_cifar_mini.toml",
        "--method",
        "variants",
        "-o",
        out_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // 16² input, every pixel a token.
    assert_eq!(
        shapes(&out.join("img-variants.safetensors")),
        vec![("entropy".into(), vec![16, 16]), ("winner".into(), vec![16, 16])]
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("mean weight of each variant"));
}

#[test]
fn a_dataset_gives_a_contact_sheet() {
    let dir = TempDir::new("explain-data");
    write_image_folder(
        &dir.0.join("data"),
        &["test"],
        &["a", "b", "c"],
        2,
        [32, 32],
        Encoding::Png,
    )
    .unwrap();
    let out = dir.0.join("out");
    let (data, w) = (dir.0.join("data"), weights("vvt_mini"));
    let o = vicinity(&[
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "4",
        "--weights",
        &w,
        "--model",
        "configs/vvt_mini.json",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("sheet-gradcam.png").is_file());
    // The first image of each class, then a second: a, b, c, a.
    let mut stems: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix("-gradcam.safetensors")
                .map(String::from)
        })
        .collect();
    stems.sort();
    assert_eq!(stems.len(), 4, "{stems:?}");
    let classes: Vec<&str> = stems.iter().map(|s| s.rsplit('-').next().unwrap()).collect();
    assert_eq!(classes.iter().filter(|c| **c == "a").count(), 2, "{stems:?}");
}

#[test]
fn what_cannot_be_drawn_is_refused_with_a_reason() {
    let dir = TempDir::new("explain-errors");
    let img = image(&dir.0);
    let out = dir.0.join("out");
    let out_s = out.to_str().unwrap();
    let (vvt, lsagt) = (weights("vvt_mini"), weights("lsagt_cifar_mini"));
    let vvt_args = ["--weights", &vvt, "--model", "configs/vvt_mini.json", "-o", out_s];
    for (extra, expected) in [
        (&["--method", "variants"][..], "variant maps are drawn for LSAGT"),
        (&["--stage", "5"][..], "--stage 5: this model has stages 1 to 4"),
        (&["--class", "10"][..], "--class 10 is out of range"),
        (
            &["--method", "locality", "--query", "70,3"][..],
            "lies outside the 64x64 input",
        ),
    ] {
        let mut args = vec![img.as_str()];
        args.extend(extra);
        args.extend(vvt_args);
        let o = vicinity(&args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        assert!(stderr(&o).contains(expected), "{extra:?}: {}", stderr(&o));
    }
    let o = vicinity(&[
        &img,
        "--weights",
        &lsagt,
        "--model",
        "configs/lsagt_cifar_mini.toml",
        "--method",
        "locality",
        "-o",
        out_s,
    ]);
    assert!(stderr(&o).contains("drawn for VVT models"), "{}", stderr(&o));
    let o = vicinity(&[
        &img,
        "--weights",
        &lsagt,
        "--model",
        "configs/lsagt_cifar_mini.toml",
        "--method",
        "variants",
        "--stage",
        "2",
        "-o",
        out_s,
    ]);
    assert!(stderr(&o).contains("draws no map of stage 2"), "{}", stderr(&o));
    let o = vicinity(&[
        &img,
        "--weights",
        &format!("{vvt},{vvt}"),
        "--model",
        "configs/vvt_mini.json",
        "-o",
        out_s,
    ]);
    assert!(
        stderr(&o).contains("two --weights would write files named vvt_mini"),
        "{}",
        stderr(&o)
    );
    let o = vicinity(&[
        "--data",
        "nowhere",
        "--limit",
        "0",
        "--weights",
        &vvt,
        "--model",
        "configs/vvt_mini.json",
        "-o",
        out_s,
    ]);
    assert!(stderr(&o).contains("--limit 0"), "{}", stderr(&o));
    let o = vicinity(&["--weights", &vvt, "--model", "configs/vvt_mini.json", "-o", out_s]);
    assert!(stderr(&o).contains("name image files"), "{}", stderr(&o));
}

/// Grad-CAM and Grad-CAM++ of the official fixture checkpoints equal the authors' models'
/// (`tests/fixtures/NAME_gradcam.safetensors`, made by `make_gradcam_fixtures.py` with the same
/// definitions on PyTorch's autograd): the explained classes, and every stage's map.
#[test]
fn gradcam_equals_pytorchs_on_the_official_fixtures() {
    use burn::prelude::*;
    use vicinity::explain::{CamKind, grad_cam};
    let device = Default::default();
    for (name, config) in [
        ("lsagt_cifar_mini", "configs/lsagt_cifar_mini.toml"),
        ("lsagt_imagenet_mini", "configs/lsagt_imagenet_mini.toml"),
        ("vvt_mini", "configs/vvt_mini.json"),
        ("vvt_mini_sr", "configs/vvt_mini_sr.json"),
    ] {
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(config);
        let pth = fixtures_dir().join(format!("{name}.pth"));
        let (_, model) =
            vicinity::cli::build_model::<crate::common::A>(config.to_str(), Some(pth.as_path()), &device)
                .unwrap();
        let x = crate::common::fixture_tensor::<4>(name, "input");
        let want = crate::common::fixture_file(name, "_gradcam");
        let classes: Vec<usize> = want["classes"]
            .to_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&c| c as usize)
            .collect();
        for (kind, key) in [
            (CamKind::GradCam, "gradcam"),
            (CamKind::GradCamPlusPlus, "gradcampp"),
        ] {
            let cams = grad_cam(&model, Tensor::from_inner(x.clone()), None, kind).unwrap();
            assert_eq!(cams.classes, classes, "{name}: explained classes");
            for (i, map) in cams.maps.into_iter().enumerate() {
                let reference = &want[&format!("{key}.stage{}", i + 1)];
                let n = map.dims().iter().product::<usize>();
                assert_eq!(n, reference.dims()[0], "{name} {key} stage {}", i + 1);
                let err = crate::common::rel_l2(map.reshape([n]), reference.clone());
                println!("{name} {key} stage{}: rel L2 {err:.2e}", i + 1);
                assert!(err < 1e-4, "{name} {key} stage {}: rel L2 {err}", i + 1);
            }
        }
    }
}

/// Several weights (here the two VVT fixtures, converted to native files that carry their
/// configurations) are explained side by side: files named by model, one sheet of all rows.
#[test]
fn several_weights_are_compared_on_one_sheet() {
    let dir = TempDir::new("explain-compare");
    let img = image(&dir.0);
    let mut natives = Vec::new();
    for name in ["vvt_mini", "vvt_mini_sr"] {
        let native = dir.0.join(format!("{name}.safetensors"));
        let o = Command::new(env!("CARGO_BIN_EXE_vicinity"))
            .args([
                "--backend",
                "flex",
                "convert",
                "--model",
                &format!("configs/{name}.json"),
                "--weights",
            ])
            .arg(weights(name))
            .arg("-o")
            .arg(&native)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        natives.push(native.to_str().unwrap().to_string());
    }
    let out = dir.0.join("out");
    let o = vicinity(&[
        &img,
        "--weights",
        &natives.join(","),
        "--method",
        "attention",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["vvt_mini", "vvt_mini_sr"] {
        assert!(
            out.join(format!("img-{name}-attention.safetensors")).is_file(),
            "{name}"
        );
    }
    assert!(out.join("sheet-attention.png").is_file());
}
