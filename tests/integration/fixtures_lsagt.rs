//! LSAGT parity with the authors' code: official checkpoints of small configurations must give the
//! fixtures' logits and every stage's tokens, and full-size registry models must have exactly the
//! official parameter names, shapes and counts.

use crate::common::*;
use burn::module::Module;
use vicinity::flops::totals;
use vicinity::models::lsagt::{LsagtConfig, rename_official};
use vicinity::models::{ModelConfig, config_by_name};

/// The small configuration a fixture was made with.
fn fixture_config(name: &str) -> LsagtConfig {
    let config = LsagtConfig::from_official_json(&fixture_json(name)).unwrap();
    // Fixtures were made in eval mode; rates only matter in training anyway.
    config.validate().unwrap();
    config
}

/// Largest relative L2 error of the logits and every stage against the authors' outputs: tight
/// enough that a LayerNorm ε of 1e-5 where the released code uses 1e-6 fails it
/// ([`a_wrong_layer_norm_epsilon_fails_parity`]); the models stay below 5e-7.
const PARITY: f32 = 2e-6;

/// Largest relative L2 error of a gradient (f32 sums in another order; the worst is ~2e-6).
const GRAD_PARITY: f32 = 1e-5;

/// The official checkpoint of a fixture, loaded into its configuration on backend `Bk`.
fn load<Bk: burn::prelude::Backend>(name: &str, config: &LsagtConfig) -> vicinity::models::Lsagt<Bk> {
    let model = config.init::<Bk>(&Default::default());
    let path = fixtures_dir().join(format!("{name}.pth"));
    vicinity::weights::load_official(model, &path, rename_official).unwrap()
}

/// The worst relative L2 error of a model's logits and stages against a fixture's.
fn parity_error(name: &str, model: &vicinity::models::Lsagt<B>, stages: usize) -> f32 {
    let out = model.forward_features(fixture_tensor::<4>(name, "input"));
    let mut worst = rel_l2(out.logits, fixture_tensor::<2>(name, "logits"));
    println!("{name}: logits rel L2 {worst:.2e}");
    assert_eq!(out.stages.len(), stages);
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
    let model = config.init::<B>(&Default::default());
    let expected_params = fixture_json(name)["params"].as_u64().unwrap() as usize;
    assert_eq!(model.num_params(), expected_params, "{name}: parameter count");
    let s = config.image_size;
    assert_eq!(
        totals(&config.costs(s, s)).1 as usize,
        expected_params,
        "{name}: costs params"
    );
    let input = fixture_tensor::<4>(name, "input");
    let [_, _, h, w] = input.dims();
    config.check_input(h, w).unwrap();
    let err = parity_error(name, &load(name, &config), config.num_stages());
    assert!(err <= PARITY, "{name}: rel L2 error {err} above {PARITY}");
}

#[test]
fn a_wrong_layer_norm_epsilon_fails_parity() {
    let config = fixture_config("lsagt_cifar_mini");
    let mut model = load::<B>("lsagt_cifar_mini", &config);
    for stage in &mut model.stages {
        stage.norm1.epsilon = 1e-5;
        stage.norm2.epsilon = 1e-5;
    }
    let err = parity_error("lsagt_cifar_mini", &model, config.num_stages());
    assert!(
        err > PARITY,
        "LayerNorm ε 1e-5 instead of 1e-6 gives {err}, within {PARITY}"
    );
}

/// The gradients of every official parameter and of the input, as the authors' code computes
/// them (stochastic depth off, as in their eval mode).
#[test]
fn gradients_match_the_authors_code() {
    for name in ["lsagt_cifar_mini", "lsagt_imagenet_mini"] {
        let config = LsagtConfig {
            drop_path: 0.0,
            ..fixture_config(name)
        };
        let model = load::<A>(name, &config);
        let worst = check_gradients(name, &model, |m, x| m.forward(x), rename_official);
        assert!(worst <= GRAD_PARITY, "{name}: gradient rel L2 error {worst}");
    }
}

#[test]
fn lsagt_cifar_mini_matches_the_authors_code() {
    check_fixture("lsagt_cifar_mini");
}

#[test]
fn lsagt_imagenet_mini_matches_the_authors_code() {
    check_fixture("lsagt_imagenet_mini");
}

#[test]
fn a_checkpoint_of_another_model_is_refused_with_the_names() {
    let device = Default::default();
    let model = fixture_config("lsagt_cifar_mini").init::<B>(&device);
    let path = fixtures_dir().join("lsagt_imagenet_mini.pth");
    let err = vicinity::weights::load_official(model, &path, rename_official)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn full_size_models_have_the_official_names_shapes_and_counts() {
    let device = Default::default();
    for name in [
        "lsagt_cifar_tiny",
        "lsagt_cifar_small",
        "lsagt_cifar_base",
        "lsagt_imagenet_tiny",
        "lsagt_imagenet_small",
    ] {
        let ModelConfig::Lsagt(config) = config_by_name(name).unwrap() else {
            panic!("{name} is not LSAGT")
        };
        config.validate().unwrap();
        let (keys, header) = official_keys(name);
        assert_eq!(
            config,
            LsagtConfig::from_official_json(&header).unwrap(),
            "{name}: registry config"
        );
        let params = header["params"].as_u64().unwrap() as usize;

        let model = config.init::<B>(&device);
        let ours = param_shapes(&model);
        let count: usize = ours.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(count, params, "{name}: parameter count");
        let s = config.image_size;
        assert_eq!(
            totals(&config.costs(s, s)).1 as usize,
            params,
            "{name}: costs params"
        );
        assert_eq!(ours.len(), keys.len(), "{name}: number of tensors");
        for (official, shape) in keys {
            let path = rename_official(&official);
            // The PyTorch adapter of `param_shapes` names LayerNorm parameters weight/bias again.
            let key = match path.rsplit_once('.') {
                Some((module, "gamma")) => format!("{module}.weight"),
                Some((module, "beta")) => format!("{module}.bias"),
                _ => path.clone(),
            };
            let theirs = ours
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: {official} → {path} is not a model parameter"));
            assert_eq!(theirs, &shape, "{name}: shape of {official}");
        }
    }
}

#[test]
fn costs_params_equal_the_model_parameter_count() {
    let device = Default::default();
    let mut config = LsagtConfig::imagenet_small();
    config.image_size = 56;
    config.num_classes = 7;
    config.validate().unwrap();
    let model = config.init::<B>(&device);
    let (macs, params) = totals(&config.costs(56, 56));
    assert_eq!(params as usize, model.num_params());
    assert!(macs > 0);
    // Through the model-level entry point too.
    let (_, p) = totals(&ModelConfig::Lsagt(config).costs(56, 56));
    assert_eq!(p, params);
}

#[test]
fn impossible_configs_fail_with_a_clear_message() {
    let err_of = |c: LsagtConfig| c.validate().unwrap_err().to_string();

    let mut c = LsagtConfig::cifar_tiny();
    c.heads[2] = 5;
    let err = err_of(c);
    assert!(err.contains("stage 3") && err.contains("divisible"), "{err}");

    let mut c = LsagtConfig::cifar_tiny();
    c.layers.pop();
    let err = err_of(c);
    assert!(err.contains("layers") && err.contains("one per stage"), "{err}");

    let mut c = LsagtConfig::cifar_tiny();
    c.layers[0] = 0;
    let err = err_of(c);
    assert!(err.contains("local"), "{err}");

    let mut c = LsagtConfig::cifar_tiny();
    c.layers[2] = 0;
    let err = err_of(c);
    assert!(err.contains("stage 3") && err.contains("zero layers"), "{err}");

    let mut c = LsagtConfig::imagenet_small();
    c.dims[1] = [256, 384];
    let err = err_of(c);
    assert!(err.contains("reduces to dim 192") && err.contains("256"), "{err}");

    let mut c = LsagtConfig::imagenet_small();
    c.dims[2] = [384, 512];
    let err = err_of(c);
    assert!(err.contains("last stage"), "{err}");

    let mut c = LsagtConfig::imagenet_tiny();
    c.kernel = 300;
    let err = err_of(c);
    assert!(err.contains("token grid"), "{err}");

    let mut c = LsagtConfig::cifar_tiny();
    c.drop_path = 1.5;
    assert!(err_of(c).contains("drop_path"));

    // Through the registry-level API, and from a file-like JSON.
    let bad: Result<ModelConfig, _> = serde_json::from_str(
        r#"{"family": "lsagt", "scheme": "cifar", "image_size": 32, "dims": [[30, 30]], "heads": 4,
            "layers": [2], "num_classes": 10, "kernel": 3, "stride": 1, "padding": 1}"#,
    );
    let err = bad.unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("30") && err.contains("heads = 4"), "{err}");

    let err = LsagtConfig::cifar_tiny()
        .check_input(28, 28)
        .unwrap_err()
        .to_string();
    assert!(err.contains("32x32"), "{err}");
}
