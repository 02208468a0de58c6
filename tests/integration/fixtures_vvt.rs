//! VVT parity with the authors' code: official checkpoints of small configurations must give the
//! fixtures' logits and every stage's tokens, and full-size registry models must have exactly the
//! official parameter names, shapes and counts.

use crate::common::*;
use burn::module::Module;
use vicinity::models::vvt::{VvtConfig, rename_official};
use vicinity::models::{ModelConfig, config_by_name};

fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The small configuration a fixture was made with.
fn fixture_config(name: &str) -> VvtConfig {
    let j = fixture_json(name);
    let mut c = VvtConfig::tiny();
    c.embed_dims = usizes(&j["embed_dims"]);
    c.heads = usizes(&j["heads"]);
    c.mlp_ratios = usizes(&j["mlp"]);
    c.depths = usizes(&j["depths"]);
    c.sr_ratios = usizes(&j["sr"]);
    c.fr_ratios = usizes(&j["fr"]);
    c.num_classes = j["num_classes"].as_u64().unwrap() as usize;
    c
}

fn check_fixture(name: &str) {
    let config = fixture_config(name);
    config.validate().unwrap();
    let device = Default::default();
    let model = config.init::<B>(&device);
    let expected_params = fixture_json(name)["params"].as_u64().unwrap() as usize;
    assert_eq!(model.num_params(), expected_params, "{name}: parameter count");

    let path = fixtures_dir().join(format!("{name}.pth"));
    let model = vicinity::weights::load_official(model, &path, rename_official).unwrap();
    let out = model.forward_features(fixture_tensor::<4>(name, "input"));
    let err = rel_l2(out.logits, fixture_tensor::<2>(name, "logits"));
    println!("{name}: logits rel L2 {err:.2e}");
    assert!(err <= 1e-4, "{name}: logits rel L2 error {err}");
    assert_eq!(out.stages.len(), 4);
    for (i, stage) in out.stages.into_iter().enumerate() {
        let key = format!("stage{}", i + 1);
        let err = rel_l2(stage, fixture_tensor::<3>(name, &key));
        println!("{name}: {key} rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{name}: {key} rel L2 error {err}");
    }
}

#[test]
fn vvt_mini_matches_the_authors_code() {
    check_fixture("vvt_mini");
}

#[test]
fn vvt_mini_with_spatial_reduction_matches_the_authors_code() {
    check_fixture("vvt_mini_sr");
}

#[test]
fn a_checkpoint_of_another_model_is_refused_with_the_names() {
    let device = Default::default();
    // vvt_mini_sr has `attn.sr`/`attn.norm` tensors that vvt_mini has no place for.
    let model = fixture_config("vvt_mini").init::<B>(&device);
    let path = fixtures_dir().join("vvt_mini_sr.pth");
    let err = vicinity::weights::load_official(model, &path, rename_official)
        .unwrap_err()
        .to_string();
    assert!(err.contains("block1.0.attn.sr.weight"), "{err}");
    // And the other way round: missing names are listed too.
    let model = fixture_config("vvt_mini_sr").init::<B>(&device);
    let path = fixtures_dir().join("vvt_mini.pth");
    let err = vicinity::weights::load_official(model, &path, rename_official)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not provide") && err.contains("attn.sr"),
        "{err}"
    );
}

#[test]
fn full_size_models_have_the_official_names_shapes_and_counts() {
    let device = Default::default();
    for name in ["vvt_tiny", "vvt_small", "vvt_medium", "vvt_large"] {
        let ModelConfig::Vvt(config) = config_by_name(name).unwrap() else {
            panic!()
        };
        config.validate().unwrap();
        let model = config.init::<B>(&device);
        let (keys, header) = official_keys(name);
        let params = header["params"].as_u64().unwrap() as usize;
        assert_eq!(model.num_params(), params, "{name}: parameter count");
        let ours = param_shapes(&model);
        assert_eq!(ours.len(), keys.len(), "{name}: number of tensors");
        for (official, shape) in keys {
            let path = rename_official(&official);
            let theirs = ours
                .get(&path)
                .unwrap_or_else(|| panic!("{name}: {official} → {path} is not a model parameter"));
            assert_eq!(theirs, &shape, "{name}: shape of {official}");
        }
    }
}
