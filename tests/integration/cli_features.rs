//! `vicinity features` end to end: the config files in `configs/` with the official checkpoints give
//! the fixtures' logits and stage tokens; `convert` to native safetensors gives the same again.

use std::path::PathBuf;

use crate::common::*;
use vicinity::cli::{FeatureInput, build_model, features};

const FIXTURES: [(&str, &str); 4] = [
    ("vvt_mini", "vvt_mini.json"),
    ("vvt_mini_sr", "vvt_mini_sr.json"),
    ("lsagt_cifar_mini", "lsagt_cifar_mini.toml"),
    ("lsagt_imagenet_mini", "lsagt_imagenet_mini.toml"),
];

fn config_path(file: &str) -> String {
    format!("{}/configs/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &std::path::Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    vicinity::io::read_safetensors_f32(path, key).unwrap()
}

/// Compares every tensor of a features file with the fixture.
fn assert_matches_fixture(name: &str, out: &std::path::Path) {
    let expected = fixtures_dir().join(format!("{name}_io.safetensors"));
    let stages = fixture_json(name)["tensors"].as_object().unwrap().len() - 2;
    let keys = std::iter::once("logits".to_string()).chain((1..=stages).map(|i| format!("stage{i}")));
    for key in keys {
        let (shape, got) = read(out, &key);
        let (want_shape, want) = read(&expected, &key);
        assert_eq!(shape, want_shape, "{name} {key} shape");
        let diff: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (diff / norm).sqrt();
        assert!(rel <= 1e-4, "{name} {key}: rel L2 {rel}");
    }
}

#[test]
fn features_of_every_fixture_match_and_native_weights_round_trip() {
    let device = Default::default();
    let dir = tempdir();
    for (name, file) in FIXTURES {
        let pth = fixtures_dir().join(format!("{name}.pth"));
        let input = FeatureInput::Tensor(fixtures_dir().join(format!("{name}_io.safetensors")));
        let out = dir.join(format!("{name}.safetensors"));
        features::<B>(Some(&config_path(file)), Some(&pth), input, None, &out, &device).unwrap();
        assert_matches_fixture(name, &out);

        // Official → native; the native file carries its config, so no --model is needed.
        let native = dir.join(format!("{name}_native.safetensors"));
        let (config, model) = build_model::<B>(Some(&config_path(file)), Some(&pth), &device).unwrap();
        vicinity::weights::save_native(&model, &config, &native).unwrap();
        let input = FeatureInput::Tensor(fixtures_dir().join(format!("{name}_io.safetensors")));
        let out2 = dir.join(format!("{name}_2.safetensors"));
        features::<B>(None, Some(&native), input, None, &out2, &device).unwrap();
        assert_matches_fixture(name, &out2);
    }
}

#[test]
fn config_files_describe_the_fixture_models() {
    for (name, file) in FIXTURES {
        let config = vicinity::models::resolve_config(&config_path(file)).unwrap();
        let device = Default::default();
        let model = config.init::<B>(&device).unwrap();
        let params = burn::module::Module::num_params(&model);
        assert_eq!(
            params as u64,
            fixture_json(name)["params"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn bad_inputs_get_clear_errors() {
    let device = Default::default();
    let dir = tempdir();
    let out = dir.join("x.safetensors");
    // Unknown model names list the valid ones.
    let err = features::<B>(
        Some("vvt_huge"),
        None,
        FeatureInput::Images(vec![]),
        None,
        &out,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vvt_tiny") && err.contains("lsagt_cifar_tiny"),
        "{err}"
    );
    // A checkpoint of the wrong family lists the names it could not place.
    let pth = fixtures_dir().join("lsagt_cifar_mini.pth");
    let input = FeatureInput::Tensor(fixtures_dir().join("vvt_mini_io.safetensors"));
    let err = features::<B>(
        Some(&config_path("vvt_mini.json")),
        Some(&pth),
        input,
        None,
        &out,
        &device,
    )
    .unwrap_err()
    .to_string();
    // A dozen names of each kind at most, sorted, and how many more there are.
    assert!(
        err.contains("122 tensors in the checkpoint that the model has no place for")
            && err.contains("layers.0.0.layers.0.0.Wkv_even.weight")
            && err.contains("... and 110 more"),
        "{err}"
    );
    assert!(err.lines().count() < 40, "{err}");
    // An input the model cannot take.
    let input = FeatureInput::Tensor(fixtures_dir().join("lsagt_cifar_mini_io.safetensors"));
    let err = features::<B>(
        Some(&config_path("vvt_mini.json")),
        None,
        input,
        None,
        &out,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("multiples of 32"), "{err}");
    // A corrupt image is named.
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let err = features::<B>(
        Some("vvt_tiny"),
        None,
        FeatureInput::Images(vec![bad]),
        None,
        &out,
        &device,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("broken.jpg"), "{err:#}");
    assert!(!out.exists(), "nothing is written on failure");
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vicinity-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
