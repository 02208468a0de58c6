//! Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) at every stage's
//! output tokens, by the definitions of pytorch-grad-cam (`GradCAM`, `GradCAMPlusPlus`): with
//! `A` a stage's `N×C` tokens and `G = ∂y_c/∂A` the gradient of the class score (the logit, before
//! the softmax),
//!
//! - Grad-CAM: `w_k = mean_n G_nk`,
//! - Grad-CAM++: `w_k = Σ_n relu(G_nk)·α_nk`, `α = G² / (2·G² + (Σ_n A_nk)·G³ + 1e-6)` (0 where
//!   `G = 0`),
//!
//! and the map `relu(Σ_k w_k·A_nk)` on the stage's token grid (no class token: the Swin
//! convention). The gradients come from one backward pass: a zero tensor that requires a gradient
//! is added to each stage's output ([`crate::models::Probe`]), and its gradient is `∂y_c/∂A`.

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::backend::AutodiffBackend;

use crate::models::{Model, Probe};
#[cfg(test)]
use burn::module::AutodiffModule;

/// Which weighting of the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CamKind {
    /// Mean gradient per channel.
    #[default]
    GradCam,
    /// Grad-CAM++'s positive gradients weighted by `α`.
    GradCamPlusPlus,
}

/// The maps of a batch.
#[derive(Debug, Clone)]
pub struct StageCams<B: Backend> {
    /// Per stage, `B×h×w`: the map on the stage's token grid, not normalised.
    pub maps: Vec<Tensor<B, 3>>,
    /// Per image, the class explained (the predicted one unless one was given).
    pub classes: Vec<usize>,
    /// Per image, the logits.
    pub logits: Tensor<B, 2>,
}

/// Grad-CAM of `class` (default: each image's predicted class) at every stage of `model`, for a
/// `B×3×H×W` batch.
pub fn grad_cam<B: AutodiffBackend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    class: Option<usize>,
    kind: CamKind,
) -> Result<StageCams<B::InnerBackend>> {
    let grads = stage_gradients(model, x, class)?;
    let b = grads.classes.len();
    let maps = grads
        .stages
        .into_iter()
        .map(|s| cam(s.tokens, s.grad, kind).reshape([b, s.grid.0, s.grid.1]))
        .collect();
    Ok(StageCams {
        maps,
        classes: grads.classes,
        logits: grads.logits,
    })
}

/// A stage's output tokens `A` with `∂y_c/∂A`, both `B×N×C`, and the stage's grid.
pub struct StageGradient<B: Backend> {
    pub tokens: Tensor<B, 3>,
    pub grad: Tensor<B, 3>,
    pub grid: (usize, usize),
}

/// A zero added to a stage's output (its gradient is the stage's), and the tokens it was added to.
struct Probed<B: AutodiffBackend> {
    zero: Tensor<B, 3>,
    tokens: Tensor<B::InnerBackend, 3>,
    grid: (usize, usize),
}

/// Every stage's [`StageGradient`], the classes explained and the logits.
pub struct StageGradients<B: Backend> {
    pub stages: Vec<StageGradient<B>>,
    pub classes: Vec<usize>,
    pub logits: Tensor<B, 2>,
}

/// The class scores' gradients at every stage's output, from one backward pass, of the model as
/// it evaluates (its drop-path, dropout and Performer redraws off: [`Model::deterministic`]).
pub fn stage_gradients<B: AutodiffBackend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    class: Option<usize>,
) -> Result<StageGradients<B::InnerBackend>> {
    let device = x.device();
    let model = model.clone().deterministic();
    let mut probes: Vec<Probed<B>> = Vec::new();
    let out = model.forward_probed(x, &mut |site, tokens| match site {
        Probe::StageOutput { grid, .. } => {
            let zero = Tensor::<B, 3>::zeros(tokens.dims(), &device).require_grad();
            probes.push(Probed {
                zero: zero.clone(),
                tokens: tokens.clone().inner(),
                grid,
            });
            tokens + zero
        }
        Probe::BlockInput { .. } => tokens,
    });
    let logits = out.logits.clone().inner();
    let classes = explained_classes(&logits, class)?;
    let mask = one_hot::<B>(&classes, logits.dims()[1], &device);
    // Each image's score depends on that image alone: one backward of the sum serves the batch.
    let grads = (out.logits * mask).sum().backward();
    let stages = probes
        .into_iter()
        .map(|p| StageGradient {
            grad: p
                .zero
                .grad(&grads)
                .expect("every stage output is on the path to the logits"),
            tokens: p.tokens,
            grid: p.grid,
        })
        .collect();
    Ok(StageGradients {
        stages,
        classes,
        logits,
    })
}

/// `class` for every image, or each image's arg-max logit.
fn explained_classes<B: Backend>(logits: &Tensor<B, 2>, class: Option<usize>) -> Result<Vec<usize>> {
    let [b, k] = logits.dims();
    Ok(match class {
        Some(c) if c >= k => bail!(
            "--class {c} is out of range: the model has {k} classes (0 to {})",
            k - 1
        ),
        Some(c) => vec![c; b],
        None => {
            let best = logits.clone().argmax(1).into_data().convert::<i64>();
            best.to_vec::<i64>()
                .expect("i64 data")
                .iter()
                .map(|&c| c as usize)
                .collect()
        }
    })
}

fn one_hot<B: Backend>(classes: &[usize], k: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut values = vec![0f32; classes.len() * k];
    for (row, &c) in classes.iter().enumerate() {
        values[row * k + c] = 1.0;
    }
    Tensor::from_data(TensorData::new(values, [classes.len(), k]), device)
}

/// `relu(Σ_k w_k·A_nk)` of tokens `a` and their gradients `g` (both `B×N×C`) → `B×N`.
pub fn cam<B: Backend>(a: Tensor<B, 3>, g: Tensor<B, 3>, kind: CamKind) -> Tensor<B, 2> {
    let weights = match kind {
        CamKind::GradCam => g.mean_dim(1),
        CamKind::GradCamPlusPlus => {
            let g2 = g.clone().powi_scalar(2);
            let g3 = g2.clone() * g.clone();
            let sum_a = a.clone().sum_dim(1);
            let alpha = g2.clone() / (g2.mul_scalar(2.0) + sum_a * g3).add_scalar(1e-6);
            let alpha = alpha.mask_fill(g.clone().equal_elem(0.0), 0.0);
            (relu(g) * alpha).sum_dim(1)
        }
    };
    let [b, n, _] = a.dims();
    relu((a * weights).sum_dim(2)).reshape([b, n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelConfig;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;
    type A = burn::backend::Autodiff<B>;

    fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// Both weightings against loops over the definitions.
    #[test]
    fn maps_follow_the_definitions() {
        let device = Default::default();
        let (b, n, c) = (2, 5, 3);
        let a = Tensor::<B, 3>::random([b, n, c], Distribution::Normal(0.0, 1.0), &device);
        let mut g = Tensor::<B, 3>::random([b, n, c], Distribution::Normal(0.0, 1.0), &device);
        g = g.slice_assign([0..1, 0..1, 0..1], Tensor::zeros([1, 1, 1], &device)); // a zero gradient
        let (av, gv) = (host(a.clone()), host(g.clone()));
        let at = |v: &[f32], bi: usize, ni: usize, ci: usize| v[(bi * n + ni) * c + ci];
        for kind in [CamKind::GradCam, CamKind::GradCamPlusPlus] {
            let got = host(cam(a.clone(), g.clone(), kind));
            for bi in 0..b {
                let weights: Vec<f32> = (0..c)
                    .map(|ci| match kind {
                        CamKind::GradCam => (0..n).map(|ni| at(&gv, bi, ni, ci)).sum::<f32>() / n as f32,
                        CamKind::GradCamPlusPlus => {
                            let sum_a: f32 = (0..n).map(|ni| at(&av, bi, ni, ci)).sum();
                            (0..n)
                                .map(|ni| {
                                    let g = at(&gv, bi, ni, ci);
                                    if g == 0.0 {
                                        return 0.0;
                                    }
                                    let alpha = g * g / (2.0 * g * g + sum_a * g * g * g + 1e-6);
                                    g.max(0.0) * alpha
                                })
                                .sum()
                        }
                    })
                    .collect();
                for ni in 0..n {
                    let want = (0..c)
                        .map(|ci| weights[ci] * at(&av, bi, ni, ci))
                        .sum::<f32>()
                        .max(0.0);
                    let have = got[bi * n + ni];
                    assert!(
                        (have - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kind:?} {bi},{ni}: {have} vs {want}"
                    );
                }
            }
        }
    }

    /// The gradient the probes read is the class score's derivative at the stage's output:
    /// central differences of the score with the stage's tokens nudged agree, for both families.
    #[test]
    fn stage_gradients_agree_with_finite_differences() {
        let device = Default::default();
        // Drop-path on (0.1 in both), and a Performer stage: the gradients must still be those
        // of the evaluation model, which the plain backend runs.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lsagt_cifar_mini.toml");
        let lsagt = crate::models::resolve_config(path).unwrap();
        let ModelConfig::Vvt(mut vvt) = crate::train::demo::micro_vvt(3) else {
            unreachable!("micro_vvt is a VVT")
        };
        assert!(vvt.drop_path > 0.0);
        vvt.attention = crate::models::PerStage::Each(vec![
            crate::attention::AttentionKind::Vicinity,
            crate::attention::AttentionKind::Performer,
            crate::attention::AttentionKind::Vicinity,
            crate::attention::AttentionKind::Vicinity,
        ]);
        for config in [ModelConfig::Vvt(vvt), lsagt] {
            let model = config.init::<A>(&device).unwrap();
            let valid = model.valid();
            let res = config.default_resolution();
            let x = Tensor::<A, 4>::random([2, 3, res, res], Distribution::Normal(0.0, 1.0), &device);
            let grads = stage_gradients(&model, x.clone(), None).unwrap();
            let classes = grads.classes.clone();
            let score = |stage: usize, at: [usize; 3], eps: f32| -> f32 {
                let out = valid.forward_probed(x.clone().inner(), &mut |site, t| match site {
                    Probe::StageOutput { stage: s, .. } if s == stage => {
                        let [bi, ni, ci] = at;
                        let bump = Tensor::<B, 3>::from_data(TensorData::new(vec![eps], [1, 1, 1]), &device);
                        t.clone().slice_assign(
                            [bi..bi + 1, ni..ni + 1, ci..ci + 1],
                            t.slice([bi..bi + 1, ni..ni + 1, ci..ci + 1]) + bump,
                        )
                    }
                    _ => t,
                });
                let logits = host(out.logits);
                let k = logits.len() / 2;
                classes
                    .iter()
                    .enumerate()
                    .map(|(bi, &c)| logits[bi * k + c])
                    .sum()
            };
            for (stage, s) in grads.stages.iter().enumerate() {
                let [_, n, c] = s.grad.dims();
                let gv = host(s.grad.clone());
                // The three largest gradients of this stage.
                let mut order: Vec<usize> = (0..gv.len()).collect();
                order.sort_by(|&i, &j| gv[j].abs().total_cmp(&gv[i].abs()));
                for &i in &order[..3] {
                    let at = [i / (n * c), (i / c) % n, i % c];
                    // One-sided differences: LSAGT's max-pools make the score piecewise smooth, and
                    // at a kink the gradient is the derivative of one side.
                    let eps = 1e-3;
                    let base = score(stage, at, 0.0);
                    let sides = [
                        (score(stage, at, eps) - base) / eps,
                        (base - score(stage, at, -eps)) / eps,
                    ];
                    let rel = sides.map(|d| (d - gv[i]).abs() / gv[i].abs().max(1e-3));
                    assert!(
                        rel[0].min(rel[1]) < 0.03,
                        "{config:?}\nstage {stage} at {at:?}: probe {} vs one-sided {sides:?}",
                        gv[i]
                    );
                }
            }
        }
    }
}
