//! Segmentation parity with a PyTorch reference of mmseg's heads (tests/fixtures/
//! make_seg_fixtures.py) on the authors' VVT backbone: the same `.pth` loaded into vicinity must
//! give the reference's stage features, neck levels, logits and upsampled logits.

use crate::common::*;
use burn::prelude::*;
use vicinity::models::resolve_config;
use vicinity::nn::{Resample, resize};
use vicinity::segment::model::load_segmenter;
use vicinity::segment::{HeadConfig, SegHead, Segmenter, SegmenterConfig};

/// Relative L2 of the heads' outputs (f32 sums in another order give ~1e-7).
const PARITY: f32 = 2e-6;

/// A `B×C×H×W` fixture tensor, channels-last like vicinity's grids.
fn nhwc(name: &str, key: &str) -> Tensor<B, 4> {
    fixture_tensor::<4>(name, key).permute([0, 2, 3, 1])
}

fn config(name: &str) -> SegmenterConfig {
    let j = fixture_json(name);
    let n = |k: &str| j[k].as_u64().unwrap() as usize;
    let dropout = j["dropout_ratio"].as_f64().unwrap();
    let head = match j["kind"].as_str().unwrap() {
        "semfpn" => HeadConfig::SemanticFpn {
            neck_channels: n("neck_channels"),
            channels: n("channels"),
            groups: n("groups"),
            dropout,
        },
        "upernet" => HeadConfig::Upernet {
            channels: n("channels"),
            pool_scales: j["pool_scales"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            aux_channels: n("aux_channels"),
            aux_weight: 0.4,
            groups: n("groups"),
            dropout,
        },
        other => panic!("unknown head kind {other}"),
    };
    let backbone = resolve_config(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs/vvt_mini.json")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    SegmenterConfig {
        backbone,
        head,
        num_classes: n("num_classes"),
    }
}

fn load(name: &str) -> Segmenter<B> {
    let path = fixtures_dir().join(format!("{name}.pth"));
    let (model, _) = load_segmenter::<B>(&path, Some(&config(name)), &Default::default()).unwrap();
    model.deterministic()
}

fn check(name: &str, what: &str, got: Tensor<B, 4>, key: &str) -> f32 {
    let err = rel_l2(got, nhwc(name, key));
    println!("{name}: {what} rel L2 {err:.2e}");
    assert!(err <= PARITY, "{name}: {what} rel L2 {err} above {PARITY}");
    err
}

#[test]
fn semantic_fpn_matches_the_pytorch_reference() {
    let name = "semfpn_vvt_mini";
    let model = load(name);
    let x = fixture_tensor::<4>(name, "input");
    let [_, _, h, w] = x.dims();
    let features = model.features(x.clone());
    for (i, f) in features.iter().enumerate() {
        check(
            name,
            &format!("stage {}", i + 1),
            f.clone(),
            &format!("stage{}", i + 1),
        );
    }
    let SegHead::SemanticFpn(head) = &model.head else {
        panic!("not a Semantic FPN")
    };
    let levels = head.neck.forward(features);
    for (i, l) in levels.iter().enumerate() {
        check(
            name,
            &format!("neck level {}", i + 1),
            l.clone(),
            &format!("neck{}", i + 1),
        );
    }
    let out = model.forward(x.clone(), true);
    assert!(out.aux.is_none());
    check(name, "logits", out.logits, "logits");
    check(
        name,
        "upsampled logits",
        model.forward_resized(x, (h, w)),
        "upsampled",
    );
}

#[test]
fn upernet_matches_the_pytorch_reference() {
    let name = "upernet_vvt_mini";
    let model = load(name);
    let x = fixture_tensor::<4>(name, "input");
    let [_, _, h, w] = x.dims();
    let out = model.forward(x.clone(), true);
    check(name, "logits", out.logits, "logits");
    check(
        name,
        "auxiliary logits",
        out.aux.expect("UPerNet has an auxiliary head"),
        "aux_logits",
    );
    check(
        name,
        "upsampled logits",
        model.forward_resized(x, (h, w)),
        "upsampled",
    );
}

/// The check can fail: GroupNorm's scale and shift exchanged in one conv of the head moves the
/// logits far past the tolerance.
#[test]
fn a_head_with_swapped_norm_parameters_fails_parity() {
    let name = "upernet_vvt_mini";
    let mut model = load(name);
    let SegHead::Upernet(head) = &mut model.head else {
        panic!("not UPerNet")
    };
    let gn = head.decode_head.fpn_bottleneck.gn.as_mut().unwrap();
    std::mem::swap(&mut gn.gamma, &mut gn.beta);
    let x = fixture_tensor::<4>(name, "input");
    let err = rel_l2(model.forward(x, false).logits, nhwc(name, "logits"));
    assert!(err > 100.0 * PARITY, "swapped norm parameters gave rel L2 {err}");
}

#[test]
fn resizing_matches_pytorch() {
    let x = nhwc("resize", "x");
    let cases: [(&str, (usize, usize), Resample); 10] = [
        ("bilinear_13x4", (13, 4), Resample::Bilinear),
        ("bilinear_3x11", (3, 11), Resample::Bilinear),
        ("bilinear_14x10", (14, 10), Resample::Bilinear),
        ("nearest_14x10", (14, 10), Resample::Nearest),
        ("nearest_4x3", (4, 3), Resample::Nearest),
        ("adaptive_1", (1, 1), Resample::AdaptiveAverage),
        ("adaptive_2", (2, 2), Resample::AdaptiveAverage),
        ("adaptive_3", (3, 3), Resample::AdaptiveAverage),
        ("adaptive_6", (6, 6), Resample::AdaptiveAverage),
        ("adaptive_4x2", (4, 2), Resample::AdaptiveAverage),
    ];
    for (key, size, mode) in cases {
        let err = rel_l2(resize(x.clone(), size, mode), nhwc("resize", key));
        assert!(err < 1e-6, "{key}: rel L2 {err}");
    }
}
