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

/// Largest relative L2 error of the logits and every stage against the authors' outputs: tight
/// enough that a LayerNorm ε of 1e-6 where the released code uses 1e-5 fails it
/// ([`a_wrong_layer_norm_epsilon_fails_parity`]); the models stay below 8e-7.
const PARITY: f32 = 2e-6;

/// Largest relative L2 error of a gradient (f32 sums in another order; the worst is ~5e-6).
const GRAD_PARITY: f32 = 1e-5;

/// The official checkpoint of a fixture, loaded into its configuration on backend `Bk`.
fn load<Bk: burn::prelude::Backend>(name: &str, config: &VvtConfig) -> vicinity::models::Vvt<Bk> {
    let model = config.init::<Bk>(&Default::default());
    let path = fixtures_dir().join(format!("{name}.pth"));
    vicinity::weights::load_official(model, &path, rename_official).unwrap()
}

/// The worst relative L2 error of a model's logits and stages against a fixture's.
fn parity_error(name: &str, model: &vicinity::models::Vvt<B>) -> f32 {
    let out = model.forward_features(fixture_tensor::<4>(name, "input"));
    let mut worst = rel_l2(out.logits, fixture_tensor::<2>(name, "logits"));
    println!("{name}: logits rel L2 {worst:.2e}");
    assert_eq!(out.stages.len(), 4);
    for (i, stage) in out.stages.into_iter().enumerate() {
        let key = format!("stage{}", i + 1);
        let err = rel_l2(stage, fixture_tensor::<3>(name, &key));
        println!("{name}: {key} rel L2 {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

fn check_fixture(name: &str) {
    let config = fixture_config(name);
    config.validate().unwrap();
    let model = config.init::<B>(&Default::default());
    let expected_params = fixture_json(name)["params"].as_u64().unwrap() as usize;
    assert_eq!(model.num_params(), expected_params, "{name}: parameter count");
    let err = parity_error(name, &load(name, &config));
    assert!(err <= PARITY, "{name}: rel L2 error {err} above {PARITY}");
}

/// The patch embeddings' norms use ε = 1e-5 in the released code, the stage norms 1e-6: either
/// one swapped takes the error past [`PARITY`] (by 2×; the correct model is 3× below it).
#[test]
fn a_wrong_layer_norm_epsilon_fails_parity() {
    type Swap = fn(&mut vicinity::models::vvt::Stage<B>);
    let swaps: [(&str, Swap); 2] = [
        ("patch embedding ε 1e-6", |s| s.patch_embed.norm.epsilon = 1e-6),
        ("stage norm ε 1e-5", |s| s.norm.epsilon = 1e-5),
    ];
    for (what, swap) in swaps {
        let mut model = load::<B>("vvt_mini", &fixture_config("vvt_mini"));
        model.stages.iter_mut().for_each(swap);
        let err = parity_error("vvt_mini", &model);
        assert!(err > PARITY, "{what} gives {err}, within {PARITY}");
    }
}

/// The gradients of every official parameter and of the input, as the authors' code computes
/// them (stochastic depth off, as in their eval mode).
#[test]
fn gradients_match_the_authors_code() {
    for name in ["vvt_mini", "vvt_mini_sr"] {
        let config = VvtConfig {
            drop_path: 0.0,
            ..fixture_config(name)
        };
        let model = load::<A>(name, &config);
        let worst = check_gradients(name, &model, |m, x| m.forward(x), rename_official);
        assert!(worst <= GRAD_PARITY, "{name}: gradient rel L2 error {worst}");
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
