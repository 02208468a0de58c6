//! Pieces of the trainer that need no training run: weight-decay groups and the optimizer's
//! groups in action, the learning-rate schedule and budget arithmetic, evaluation metrics on a
//! known case, top-k/softmax/class names of `predict`, checkpoint atomicity, flag parsing.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use vicinity::data::parse_randaug;
use vicinity::models::{self, Model};
use vicinity::train::budget::{BudgetInputs, parse_duration, plan_budget};
use vicinity::train::checkpoint::{self, STATE_FILE};
use vicinity::train::demo;
use vicinity::train::inference::{
    ClassSource, Prediction, TopClass, class_names, format_predictions, softmax, top_k,
};
use vicinity::train::metrics::EvalAccumulator;
use vicinity::train::optim::{AdamW, AdamWConfig, Ema, Grouping};
use vicinity::train::params::{collect_flat, decays, param_info};
use vicinity::train::schedule::{Schedule, Warmup};

type B = burn::backend::Flex;
type AB = Autodiff<B>;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicinity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn weight_decay_groups_exclude_norms_biases_and_position_embeddings() {
    let device = Default::default();
    let vvt: Model<B> = demo::micro_vvt(4).init(&device).unwrap();
    let lsagt: Model<B> = models::resolve_config(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/lsagt_cifar_mini.toml"
    ))
    .unwrap()
    .init(&device)
    .unwrap();
    for model in [&vvt, &lsagt] {
        let info = param_info(model);
        assert!(!info.is_empty());
        for p in &info {
            let pos = p.name.contains("pos_emb");
            let one_d = p.shape.len() == 1;
            assert_eq!(p.decay, !(pos || one_d), "{} {:?}", p.name, p.shape);
            if p.name.ends_with(".bias") || p.name.ends_with(".gamma") || p.name.ends_with(".beta") {
                assert!(!p.decay, "{} decays", p.name);
            }
        }
        assert!(info.iter().any(|p| p.decay), "some weights must decay");
    }
    let names: Vec<String> = param_info(&lsagt).into_iter().map(|p| p.name).collect();
    assert!(names.iter().any(|n| n == "stages.0.variant_pos_emb"), "{names:?}");
    assert!(names.iter().any(|n| n == "stages.1.pos_emb"), "{names:?}");
    // Multi-dimensional position embeddings are excluded by name, not by rank.
    assert!(!decays("stages.0.variant_pos_emb", 3));
    assert!(!decays("pos_embed", 3));
    assert!(decays("stages.0.blocks.0.mlp.fc1.weight", 2));
}

#[test]
fn optimizer_decays_only_the_decay_group_and_clips_globally() {
    let device = Default::default();
    let model: Model<AB> = demo::micro_vvt(3).init(&device).unwrap();
    let before = collect_flat(&model.valid());
    let info = param_info(&model.valid());
    // Zero gradients: Adam's update is 0, so only the decoupled weight decay moves weights.
    let x = Tensor::<AB, 4>::ones([2, 3, 32, 32], &device);
    let loss = model.forward(x).sum().mul_scalar(0.0);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut opt = AdamW::<B>::new(
        AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        },
        false,
    );
    let (model, stats) = opt.step(model, grads, 0.1, Some(1.0), None).unwrap();
    assert_eq!(stats.grad_norm.into_scalar(), 0.0);
    let after = collect_flat(&model.valid());
    for p in &info {
        let (b, a) = (before[&p.name].to_data(), after[&p.name].to_data());
        let (b, a) = (b.to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
        let factor = if p.decay { 0.95 } else { 1.0 };
        for (x, y) in b.iter().zip(&a) {
            assert!(
                (x * factor - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{}: {x} → {y}",
                p.name
            );
        }
    }

    // Global clipping: gradients scaled by clip/‖g‖ over all parameters; with Adam the first
    // update is sign-like, so check the reported norm and that clipping does not change the step
    // direction on a quadratic where it is known.
    let model: Model<AB> = demo::micro_vvt(3).init(&device).unwrap();
    let x = Tensor::<AB, 4>::ones([2, 3, 32, 32], &device);
    let loss = model.forward(x).powi_scalar(2).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let expected: f32 = {
        let mut s = 0.0f64;
        struct V<'a>(&'a GradientsParams, &'a mut f64);
        impl burn::module::ModuleVisitor<AB> for V<'_> {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<AB, D>>) {
                if let Some(g) = self.0.get::<B, D>(p.id) {
                    let v: Vec<f32> = g.into_data().to_vec().unwrap();
                    *self.1 += v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
                }
            }
        }
        model.visit(&mut V(&grads, &mut s));
        s.sqrt() as f32
    };
    let mut opt = AdamW::<B>::new(AdamWConfig::default(), false);
    let (_, stats) = opt.step(model, grads, 1e-3, Some(1e-3), None).unwrap();
    let norm = stats.grad_norm.into_scalar();
    assert!(expected > 0.0);
    assert!((norm - expected).abs() <= 1e-4 * expected, "{norm} vs {expected}");
}

#[test]
fn adamw_matches_the_reference_update() {
    // One parameter tensor, two steps, against a hand-written AdamW (PyTorch formula).
    #[derive(burn::module::Module, Debug)]
    struct Lin<B: Backend> {
        w: burn::module::Param<Tensor<B, 2>>,
    }
    let device = Default::default();
    let w0 = [[0.5f32, -1.0], [2.0, 0.25]];
    let lin = Lin::<AB> {
        w: burn::module::Param::from_tensor(Tensor::from_data(w0, &device)),
    };
    let (lr, wd, b1, b2, eps) = (0.01f64, 0.1f64, 0.9f64, 0.999f64, 1e-8f64);
    let mut opt = AdamW::<B>::new(
        AdamWConfig {
            weight_decay: wd,
            ..Default::default()
        },
        false,
    );
    let mut lin = lin;
    let mut p: Vec<f64> = w0.iter().flatten().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
    for t in 1..=2 {
        // loss = Σ w³ → grad 3w²
        let loss = lin.w.val().powi_scalar(3).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &lin);
        lin = opt.step(lin, grads, lr, None, None).unwrap().0;
        for i in 0..4 {
            let g = 3.0 * p[i] * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            p[i] = p[i] * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps);
        }
    }
    let got: Vec<f32> = lin.w.val().into_data().to_vec().unwrap();
    for (g, e) in got.iter().zip(&p) {
        assert!((*g as f64 - e).abs() < 1e-6, "{got:?} vs {p:?}");
    }
    assert_eq!(opt.step, 2);
}

/// The clipped update itself: two parameter tensors whose gradients are scaled together by
/// `clip/‖g‖` (the norm over both), two steps with different norms (Adam's first step alone is
/// sign-like, so it cannot tell), against AdamW written out in f64.
#[test]
fn adamw_clips_the_update_by_the_global_norm() {
    #[derive(burn::module::Module, Debug)]
    struct Two<B: Backend> {
        a: burn::module::Param<Tensor<B, 1>>,
        b: burn::module::Param<Tensor<B, 1>>,
    }
    let device = Default::default();
    let (a0, b0) = ([0.5f32, -1.0, 2.0], [0.25f32, 1.5]);
    let mut two = Two::<AB> {
        a: burn::module::Param::from_tensor(Tensor::from_data(a0, &device)),
        b: burn::module::Param::from_tensor(Tensor::from_data(b0, &device)),
    };
    let (lr, clip, b1, b2, eps) = (0.05f64, 0.5f64, 0.9f64, 0.999f64, 1e-8f64);
    let mut opt = AdamW::<B>::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        false,
    );
    // AdamW in f64 over three steps; `clipped` scales each step's gradients by clip/‖g‖.
    let reference = |clipped: bool| -> (Vec<f64>, Vec<f64>) {
        let mut p: Vec<f64> = a0.iter().chain(&b0).map(|&v| v as f64).collect();
        let (mut m, mut v, mut norms) = (vec![0.0; 5], vec![0.0; 5], Vec::new());
        for t in 1..=3 {
            // loss = Σ a³ + Σ b⁴ → gradients 3a², 4b³: the norm changes from step to step.
            let g: Vec<f64> = (0..5)
                .map(|i| {
                    if i < 3 {
                        3.0 * p[i] * p[i]
                    } else {
                        4.0 * p[i].powi(3)
                    }
                })
                .collect();
            let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            norms.push(norm);
            let scale = if clipped {
                (clip / (norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            for i in 0..5 {
                let g = g[i] * scale;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        (p, norms)
    };
    let (want, norms) = reference(true);
    for (t, norm) in norms.iter().enumerate() {
        let loss = two.a.val().powi_scalar(3).sum() + two.b.val().powi_scalar(4).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &two);
        let (next, stats) = opt.step(two, grads, lr, Some(clip), None).unwrap();
        two = next;
        assert!(*norm > clip, "step {t}: the clip must be active ({norm})");
        let got_norm = stats.grad_norm.into_scalar() as f64;
        assert!(
            (got_norm - norm).abs() <= 1e-5 * norm,
            "step {t}: norm {got_norm} vs {norm}"
        );
    }
    let got: Vec<f32> = [two.a.val(), two.b.val()]
        .into_iter()
        .flat_map(|t| t.into_data().to_vec::<f32>().unwrap())
        .collect();
    for (g, e) in got.iter().zip(&want) {
        assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    // Unclipped, the same steps end measurably elsewhere: the comparison above can tell.
    let (unclipped, _) = reference(false);
    let apart = want
        .iter()
        .zip(&unclipped)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(apart > 5e-4, "clipping changed the trajectory by only {apart}");
}

/// A copy of `grads` (which is not `Clone`), parameter by parameter.
fn copy_grads(model: &Model<AB>, grads: &GradientsParams) -> GradientsParams {
    struct Copy<'a> {
        from: &'a GradientsParams,
        to: GradientsParams,
    }
    impl burn::module::ModuleVisitor<AB> for Copy<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<AB, D>>) {
            if let Some(g) = self.from.get::<B, D>(param.id) {
                self.to.register(param.id, g);
            }
        }
    }
    let mut copy = Copy {
        from: grads,
        to: GradientsParams::new(),
    };
    model.visit(&mut copy);
    assert_eq!(copy.to.len(), grads.len(), "every gradient copied");
    copy.to
}

#[test]
fn flat_adamw_matches_the_per_tensor_reference_step_by_step() {
    // Each step of a trajectory is repeated by an optimizer of the other grouping restored from
    // the state (to_host → load_host, EMA included): weights, averages and the clipped gradient
    // norm must agree (the norm to 1e-5: f32 sums in a different order). (Whole trajectories drift apart at 1e-5 within three steps: Adam divides
    // by √v, which magnifies one-ulp differences in near-zero gradients.)
    type Host = std::collections::BTreeMap<String, Vec<f32>>;
    let host = |t: std::collections::BTreeMap<String, Tensor<B, 1>>| -> Host {
        t.into_iter()
            .map(|(k, v)| (k, v.into_data().to_vec::<f32>().unwrap()))
            .collect()
    };
    let close = |a: &Host, b: &Host, what: &str| {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (name, x) in a {
            for (u, v) in x.iter().zip(&b[name]) {
                assert!(
                    (u - v).abs() <= 1e-6 * u.abs().max(1.0),
                    "{what}: {name}: {u} vs {v}"
                );
            }
        }
    };
    let device = Default::default();
    let mut config = demo::micro_vvt(3);
    if let models::ModelConfig::Vvt(c) = &mut config {
        c.drop_path = 0.0;
    }
    let cfg = AdamWConfig {
        weight_decay: 0.3,
        ..Default::default()
    };
    for grouping in [Grouping::Flat, Grouping::PerTensor] {
        let other = match grouping {
            Grouping::Flat => Grouping::PerTensor,
            Grouping::PerTensor => Grouping::Flat,
        };
        let mut model: Model<AB> = config.init(&device).unwrap();
        let start = host(collect_flat(&model.valid()));
        let mut opt = AdamW::<B>::with_grouping(cfg, false, grouping);
        let mut ema = Ema::<B>::new(0.8);
        for step in 0..3 {
            let mut twin = AdamW::<B>::with_grouping(cfg, false, other);
            if step > 0 {
                twin.load_host(&model.valid(), opt.to_host().unwrap(), opt.step)
                    .unwrap();
            }
            let mut twin_ema = Ema::<B>::new(0.8);
            twin_ema.updates = ema.updates;
            twin_ema.pending = opt.ema_values(&ema);
            let x = Tensor::<AB, 1, Int>::arange(0..(2 * 3 * 32 * 32) as i64, &device)
                .float()
                .mul_scalar(0.01 * (step + 1) as f64)
                .sin()
                .reshape([2, 3, 32, 32]);
            // One backward pass, its gradients copied for the twin, so both groupings see the same
            // gradients.
            let g = GradientsParams::from_grads(
                model.forward(x.clone()).powi_scalar(2).mean().backward(),
                &model,
            );
            let g_twin = copy_grads(&model, &g);
            let (b, twin_stats) = twin
                .step(model.clone(), g_twin, 0.05, Some(0.05), Some(&mut twin_ema))
                .unwrap();
            let (a, stats) = opt.step(model, g, 0.05, Some(0.05), Some(&mut ema)).unwrap();
            let what = format!("{grouping:?} step {step}");
            let (n, n_twin) = (stats.grad_norm.into_scalar(), twin_stats.grad_norm.into_scalar());
            assert!(n > 0.05, "{what}: the clip must be active, norm {n}");
            // The norm is an f32 sum of squares over every gradient, in a different order per
            // grouping (and per thread split): CI measured 1.3e-5 apart twice, with identical
            // gradients, so 1e-4.
            assert!(
                (n - n_twin).abs() <= 1e-4 * n,
                "{what}: grad norm {n} vs {n_twin}"
            );
            close(
                &host(collect_flat(&a.valid())),
                &host(collect_flat(&b.valid())),
                &what,
            );
            close(
                &host(opt.ema_values(&ema)),
                &host(twin.ema_values(&twin_ema)),
                &format!("{what} ema"),
            );
            model = a;
        }
        let moved = host(collect_flat(&model.valid()));
        assert!(start.iter().all(|(k, v)| moved[k] != *v), "every parameter moves");
    }
}

#[test]
fn weights_written_from_the_optimizer_equal_the_models_own() {
    // The trainer writes checkpoints from the optimizer's host copy; the file must be the one
    // `native_bytes` writes from the model (names, shapes, values) and load back.
    let device = Default::default();
    let config = demo::micro_vvt(3);
    let model: Model<AB> = config.init(&device).unwrap();
    let mut opt = AdamW::<B>::new(AdamWConfig::default(), false);
    assert!(
        opt.host_copy(true).unwrap().is_none(),
        "no copy before the first step"
    );
    let x = Tensor::<AB, 4>::ones([2, 3, 32, 32], &device);
    let grads = GradientsParams::from_grads(model.forward(x).powi_scalar(2).sum().backward(), &model);
    let mut ema = Ema::<B>::new(0.5);
    let (model, _) = opt.step(model, grads, 1e-2, None, Some(&mut ema)).unwrap();
    let read = |bytes: &[u8]| -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| {
                let values = v
                    .data()
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (name, (v.shape().to_vec(), values))
            })
            .collect()
    };
    let copy = opt.host_copy(true).unwrap().unwrap();
    let from_host = vicinity::weights::native_bytes_from_host(&copy.weights, &config).unwrap();
    let own = vicinity::weights::native_bytes(&model.valid(), &config).unwrap();
    assert_eq!(read(&from_host), read(&own));
    let dir = tmp("host-weights");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, &from_host).unwrap();
    assert_eq!(
        vicinity::weights::native_config(&path).unwrap().as_ref(),
        Some(&config)
    );
    let fresh: Model<B> = config.init(&device).unwrap();
    let loaded = vicinity::weights::load_native(fresh, &path).unwrap();
    let own = vicinity::weights::native_bytes(&loaded, &config).unwrap();
    assert_eq!(read(&from_host), read(&own));
    // The averages: after one update they are the new weights.
    assert_eq!(copy.ema.as_ref(), Some(&copy.weights));
    // The optimizer state in the same copy is what `to_host` returns.
    assert_eq!(copy.state, opt.to_host().unwrap());
}

#[test]
fn adamw_state_of_the_wrong_shape_is_refused_by_name() {
    let device = Default::default();
    let model: Model<B> = demo::micro_vvt(3).init(&device).unwrap();
    let info = param_info(&model);
    let name = &info[0].name;
    let mut state = vicinity::train::optim::HostTensors::new();
    state.insert(format!("m/{name}"), (vec![3], vec![0.0; 3]));
    state.insert(format!("v/{name}"), (vec![3], vec![0.0; 3]));
    let mut opt = AdamW::<B>::new(AdamWConfig::default(), false);
    let err = opt.load_host(&model, state.clone(), 1).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("has 3 values"), "{err}");
    state.insert(
        format!("m/{name}"),
        (vec![3], vec![0.0; info[0].shape.iter().product()]),
    );
    state.insert("master/no.such.weight".into(), (vec![3], vec![0.0; 3]));
    let err = opt.load_host(&model, state, 1).unwrap_err().to_string();
    assert!(err.contains("no.such.weight"), "{err}");
}

#[test]
fn learning_rate_schedule_warms_up_then_follows_a_cosine() {
    let s = Schedule {
        peak: 1e-3,
        min: 1e-5,
        warmup_steps: 10,
        total_steps: 110,
    };
    for i in 0..10 {
        assert!((s.lr(i) - 1e-3 * (i + 1) as f64 / 10.0).abs() < 1e-15);
    }
    assert!((s.lr(10) - 1e-3).abs() < 1e-15, "cosine starts at the peak");
    assert!((s.lr(109) - 1e-5).abs() < 1e-15, "the last step is at the floor");
    let mid = s.lr(10 + 99 / 2) + s.lr(10 + 99 - 99 / 2);
    assert!(
        (mid / 2.0 - (1e-3 + 1e-5) / 2.0).abs() < 1e-6,
        "symmetric about the midpoint"
    );
    for i in 10..109 {
        assert!(s.lr(i + 1) <= s.lr(i), "monotone after warm-up");
    }
    assert!((s.lr(500) - 1e-5).abs() < 1e-15, "stays at the floor");
    // Warm-up in epochs or as a share of the run.
    assert_eq!(Warmup::Epochs(5.0).steps(1000, 40), 200);
    assert_eq!(Warmup::Fraction(0.05).steps(1000, 40), 50);
    assert_eq!(Warmup::Epochs(5.0).steps(100, 40), 99, "never the whole run");
    assert_eq!(Warmup::parse("5%").unwrap(), Warmup::Fraction(0.05));
    assert_eq!(Warmup::parse("2.5").unwrap(), Warmup::Epochs(2.5));
    assert!(Warmup::parse("150%").is_err());
}

#[test]
fn budget_sizing_arithmetic() {
    let base = BudgetInputs {
        budget_s: 240.0,
        elapsed_s: 20.0,
        step_s: 0.1,
        steps_per_epoch: 100,
        eval_s: 3.0,
        eval_every: 1,
        reserve_s: 7.0,
        epoch_overhead_s: 1.0,
    };
    // available 213 s; an epoch costs 10 + 1 + 3 = 14 s → 15 epochs (210 s).
    let p = plan_budget(&base).unwrap();
    assert_eq!((p.epochs, p.total_steps), (15, 1500));
    // Evaluating every 4th epoch: 11 s/epoch + ⌈E/4⌉·3 → E = 18 gives 198 + 15 = 213.
    let p = plan_budget(&BudgetInputs {
        eval_every: 4,
        ..base
    })
    .unwrap();
    assert_eq!((p.epochs, p.total_steps), (18, 1800));
    // Not even one epoch: as many steps as fit before the final evaluation (213 − 3 − 1 = 209 s).
    let p = plan_budget(&BudgetInputs {
        step_s: 1.0,
        steps_per_epoch: 1000,
        ..base
    })
    .unwrap();
    assert_eq!((p.epochs, p.total_steps), (1, 209));
    // Nothing fits: a clear error.
    let e = plan_budget(&BudgetInputs {
        elapsed_s: 239.0,
        ..base
    })
    .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    assert_eq!(parse_duration("4m").unwrap(), 240.0);
    assert_eq!(parse_duration("90s").unwrap(), 90.0);
    assert_eq!(parse_duration("1h30m").unwrap(), 5400.0);
    assert_eq!(parse_duration("1.5h").unwrap(), 5400.0);
    assert_eq!(parse_duration("75").unwrap(), 75.0);
    assert!(parse_duration("4x").is_err());
    assert!(parse_duration("0s").is_err());
}

#[test]
fn eval_metrics_on_a_known_case() {
    let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let mut acc = EvalAccumulator::new(3);
    // Predictions: 0 (label 0, right), 2 (label 1, wrong), 2 (label 2, right), 0 (label 2, wrong).
    let logits = [
        3.0, 1.0, 0.0, //
        0.0, 1.0, 2.0, //
        0.0, 0.5, 1.0, //
        2.0, 0.0, 1.0,
    ];
    acc.add(&logits, &[0, 1, 2, 2]);
    assert_eq!(acc.count, 4);
    assert_eq!(acc.top1, 2);
    assert_eq!(acc.top5, 4, "with 3 classes everything is in the top 5");
    assert_eq!(acc.confusion, vec![1, 0, 0, 0, 0, 1, 1, 0, 1]);
    assert_eq!(acc.per_class(), vec![Some(1.0), Some(0.0), Some(0.5)]);
    assert_eq!(
        acc.confusion_csv(&classes),
        "true\\predicted,a,b,c\na,1,0,0\nb,0,0,1\nc,1,0,1\n"
    );
    assert_eq!(
        acc.per_class_csv(&classes),
        "class,index,samples,correct,accuracy\na,0,1,1,1.000000\nb,1,1,0,0.000000\nc,2,2,1,0.500000\n"
    );
    // Cross-entropy of the first row: logsumexp(3,1,0) − 3.
    let lse = |r: &[f64]| r.iter().map(|v| v.exp()).sum::<f64>().ln();
    let expected = (lse(&[3.0, 1.0, 0.0]) - 3.0 + lse(&[0.0, 1.0, 2.0]) - 1.0 + lse(&[0.0, 0.5, 1.0]) - 1.0
        + lse(&[2.0, 0.0, 1.0])
        - 1.0)
        / 4.0;
    assert!((acc.loss() - expected).abs() < 1e-6);
    // Top-5 boundary with 7 classes: the label ranked 5th counts, 6th does not.
    let mut acc = EvalAccumulator::new(7);
    let row = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
    acc.add(&row, &[4]);
    acc.add(&row, &[5]);
    assert_eq!((acc.top1, acc.top5), (0, 1));
    // A class without samples has no accuracy.
    assert_eq!(acc.per_class()[0], None);
}

#[test]
fn predict_helpers_softmax_topk_and_class_names() {
    let p = softmax(&[1.0, 3.0, 2.0, 3.0]);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let top = top_k(&p, 3);
    assert_eq!(
        top.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![1, 3, 2],
        "ties go to the lower index"
    );
    let (names, src) = class_names(10, None, None).unwrap();
    assert_eq!(
        (names[0].as_str(), src),
        ("airplane", ClassSource::Assumed("CIFAR-10".into()))
    );
    let (names, src) = class_names(7, None, None).unwrap();
    assert_eq!((names[6].as_str(), src), ("class 6", ClassSource::Indices));
    assert!(
        class_names(7, Some("cifar10"), None).is_err(),
        "wrong count is an error"
    );
    let text = format_predictions(
        &[Prediction {
            image: "cat.png".into(),
            top: vec![
                TopClass {
                    index: 3,
                    name: "cat".into(),
                    probability: 0.9,
                },
                TopClass {
                    index: 5,
                    name: "dog".into(),
                    probability: 0.05,
                },
            ],
        }],
        &ClassSource::Indices,
    );
    assert!(text.starts_with("note: class names unknown"), "{text}");
    assert!(
        text.contains("cat.png\n   90.00%  cat (3)\n    5.00%  dog (5)\n"),
        "{text}"
    );
}

#[test]
fn checkpoint_directories_are_replaced_atomically() {
    let run = tmp("atomic");
    let last = run.join("last");
    checkpoint::commit_dir(&last, |d| {
        checkpoint::write_synced(&d.join(STATE_FILE), b"one")?;
        checkpoint::write_synced(&d.join("model.safetensors"), b"weights one")
    })
    .unwrap();
    assert_eq!(std::fs::read(last.join(STATE_FILE)).unwrap(), b"one");
    // A write that fails half-way (e.g. a full disk) leaves the old checkpoint whole.
    let err = checkpoint::commit_dir(&last, |d| {
        checkpoint::write_synced(&d.join("model.safetensors"), b"half")?;
        anyhow::bail!("No space left on device")
    })
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("previous checkpoint is untouched"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(last.join(STATE_FILE)).unwrap(), b"one");
    assert_eq!(
        std::fs::read(last.join("model.safetensors")).unwrap(),
        b"weights one"
    );
    assert!(
        !run.join(".last.new").exists(),
        "the partial directory is removed"
    );
    // A successful replacement.
    checkpoint::commit_dir(&last, |d| checkpoint::write_synced(&d.join(STATE_FILE), b"two")).unwrap();
    assert_eq!(std::fs::read(last.join(STATE_FILE)).unwrap(), b"two");
    assert!(!last.join("model.safetensors").exists());
    // A crash between the two renames leaves `.last.old`, which resolve() finds.
    std::fs::rename(&last, run.join(".last.old")).unwrap();
    assert_eq!(checkpoint::resolve(&run, "last").unwrap(), run.join(".last.old"));
    // Best as hard links of last.
    checkpoint::link_dir(&run.join(".last.old"), &run.join("best")).unwrap();
    assert_eq!(std::fs::read(run.join("best").join(STATE_FILE)).unwrap(), b"two");
    // An unwritable run directory is reported clearly.
    let file = run.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = checkpoint::check_writable(&file.join("run")).unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot create the run directory"),
        "{err:#}"
    );
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn checkpoint_writer_writes_in_order_and_reports_failures() {
    use std::sync::{Arc, Mutex};
    let run = tmp("writer");
    std::fs::create_dir_all(&run).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut writer = checkpoint::Writer::default();
    for i in 0..4 {
        let (order, path) = (order.clone(), run.join("n"));
        writer
            .submit(move || {
                // A slow first write: the next one must still wait for it.
                std::thread::sleep(std::time::Duration::from_millis(if i == 0 { 200 } else { 1 }));
                order.lock().unwrap().push(i);
                checkpoint::write_synced(&path, format!("{i}").as_bytes())
            })
            .unwrap();
    }
    writer.wait().unwrap();
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
    assert_eq!(std::fs::read(run.join("n")).unwrap(), b"3");
    // A failed write (a full disk, say) surfaces at the next submit, and the writer goes on.
    writer
        .submit(|| anyhow::bail!("No space left on device"))
        .unwrap();
    let err = writer.submit(|| Ok(())).unwrap_err();
    assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    writer.wait().unwrap();
    // Dropping the writer waits for the write in flight.
    let done = run.join("done");
    let path = done.clone();
    writer
        .submit(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            checkpoint::write_synced(&path, b"ok")
        })
        .unwrap();
    drop(writer);
    assert!(done.exists());
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn mirror_tta_averages_an_image_and_its_mirror() {
    let device = Default::default();
    let model: Model<B> = demo::micro_vvt(4).init(&device).unwrap();
    let x = Tensor::<B, 4>::random(
        [2, 3, 32, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let tta = model.forward_tta(x.clone(), true);
    // The same for an image and its mirror image (flipping the wrong axis would break this)…
    let mirrored = model.forward_tta(x.clone().flip([3]), true);
    let diff = |a: Tensor<B, 2>, b: Tensor<B, 2>| a.sub(b).abs().max().into_scalar();
    assert!(diff(tta.clone(), mirrored) < 1e-5);
    // …but not the plain logits, since the model is not mirror-symmetric.
    let plain = model.forward_tta(x.clone(), false);
    assert!(diff(plain.clone(), model.forward(x)) == 0.0);
    assert!(diff(plain, tta) > 1e-4);
}

#[test]
fn randaugment_strings() {
    let ra = parse_randaug("rand-m9-mstd0.5-inc1").unwrap().unwrap();
    assert_eq!(
        (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing),
        (2, 9.0, 0.5, true)
    );
    let ra = parse_randaug("rand-m7-n3").unwrap().unwrap();
    assert_eq!(
        (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing),
        (3, 7.0, 0.0, false)
    );
    assert!(parse_randaug("off").unwrap().is_none());
    assert!(parse_randaug("m9").is_err());
}
