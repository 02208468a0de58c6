//! Explanation maps (`vicinity explain`): what a model looks at, as arrays and pictures.
//!
//! - [`gradcam`]: Grad-CAM / Grad-CAM++ of a class at each stage's output tokens (VVT paper
//!   Figs. 6, 9);
//! - [`locality_maps`]: VVT's cos-Manhattan locality weights around a query and the attention
//!   row that query gets in each head (Fig. 3), [`attention_maps`] the row alone for any kind
//!   with one (Fig. 9);
//! - [`variant_maps`]: which of its shifted variants each patch of an LSAGT attends to, and how
//!   sharply (LSAGT paper Figs. 1–2).
//!
//! Every map is on a token grid; [`render`] turns maps into overlays and sheets.

pub mod gradcam;
pub mod render;

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

pub use gradcam::{CamKind, StageCams, grad_cam};
pub use render::Map;

use crate::attention::vicinity::locality_row;
use crate::models::{Model, Probe};

/// What `vicinity explain` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Grad-CAM of the predicted (or given) class at every stage.
    Gradcam,
    /// Grad-CAM++ at every stage.
    #[value(name = "gradcam++")]
    GradcamPlusPlus,
    /// VVT: the locality weights around a query and its attention row per head.
    Locality,
    /// LSAGT: the winning shifted variant of every patch and the entropy of its weights.
    Variants,
    /// The attention row of a query per head, for every attention kind that has one.
    Attention,
}

/// One map of one image, named by what it shows (`stage2`, `stage1-head1`, `winner`, ...).
#[derive(Debug, Clone)]
pub struct Named {
    pub name: String,
    /// 1-based stage the map belongs to.
    pub stage: usize,
    pub map: Map,
}

/// A query position as fractions `(x, y)` of the image's width and height, in [0, 1).
pub type Query = (f32, f32);

/// The token of a `rows×cols` grid under a query point.
pub fn query_token(query: Query, (rows, cols): (usize, usize)) -> usize {
    let at = |f: f32, len: usize| ((f.clamp(0.0, 1.0) * len as f32) as usize).min(len - 1);
    at(query.1, rows) * cols + at(query.0, cols)
}

fn host_map<B: Backend>(t: Tensor<B, 1>, (rows, cols): (usize, usize)) -> Map {
    let values = t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
    Map::new(rows, cols, values)
}

/// Grad-CAM maps of every image of the batch, per stage (`stageK`).
pub fn gradcam_maps<B: AutodiffBackend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    class: Option<usize>,
    kind: CamKind,
) -> Result<(Vec<Vec<Named>>, Vec<usize>)> {
    let cams = grad_cam(model, x, class, kind)?;
    let b = cams.classes.len();
    let mut per_image: Vec<Vec<Named>> = (0..b).map(|_| Vec::new()).collect();
    for (i, stage) in cams.maps.into_iter().enumerate() {
        let [_, h, w] = stage.dims();
        // One copy to the host per stage, split by image there.
        let values = stage
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data");
        for (maps, image) in per_image.iter_mut().zip(values.chunks_exact(h * w)) {
            maps.push(Named {
                name: format!("stage{}", i + 1),
                stage: i + 1,
                map: Map::new(h, w, image.to_vec()),
            });
        }
    }
    Ok((per_image, cams.classes))
}

/// The attention row of `query` in each head of the first block of every stage, for the first
/// image of `x` (`stageK-headH`, on the keys' grid), and for VVT's vicinity attention also the
/// locality weights alone (`stageK-locality`) when `locality` is set.
fn rows<B: Backend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    query: Query,
    only: Option<usize>,
    locality: bool,
) -> Result<Vec<Named>> {
    let Model::Vvt(vvt) = model else {
        bail!(
            "attention and locality maps are drawn for VVT models; for LSAGT use --method variants or gradcam"
        )
    };
    let vvt = vvt.clone().deterministic();
    let mut inputs = Vec::new();
    vvt.forward_probed(x.slice_dim(0, 0..1), &mut |site, t| {
        if let Probe::BlockInput {
            stage,
            block: 0,
            grid,
        } = site
        {
            inputs.push((stage, grid, t.clone()));
        }
        t
    });
    let mut maps = Vec::new();
    for (stage, grid, tokens) in inputs {
        if only.is_some_and(|s| s != stage + 1) {
            continue;
        }
        let block = &vvt.stages[stage].blocks[0];
        let token = query_token(query, grid);
        let x = block.norm1.forward(tokens);
        let (row, kgrid) = block.attn.attention_row(x, grid, token);
        if locality {
            let crate::attention::Attention::Vicinity(attn) = &block.attn else {
                bail!(
                    "stage {} has no vicinity attention, so no locality weights",
                    stage + 1
                )
            };
            let weights = locality_row::<B>(attn.locality, grid, kgrid, token, &row.device());
            maps.push(Named {
                name: format!("stage{}-locality", stage + 1),
                stage: stage + 1,
                map: host_map(weights, kgrid),
            });
        }
        let [heads, m] = row.dims();
        for h in 0..heads {
            maps.push(Named {
                name: format!("stage{}-head{}", stage + 1, h + 1),
                stage: stage + 1,
                map: host_map(row.clone().slice_dim(0, h..h + 1).reshape([m]), kgrid),
            });
        }
    }
    Ok(maps)
}

/// VVT's locality weights around `query` and the attention row of `query` per head, at the first
/// block of every stage (or of stage `only`, 1-based), for the first image of `x`.
pub fn locality_maps<B: Backend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    query: Query,
    only: Option<usize>,
) -> Result<Vec<Named>> {
    rows(model, x, query, only, true)
}

/// The attention row of `query` per head at the first block of every stage (or of stage `only`,
/// 1-based) of a VVT of any attention kind, for the first image of `x`.
pub fn attention_maps<B: Backend>(
    model: &Model<B>,
    x: Tensor<B, 4>,
    query: Query,
    only: Option<usize>,
) -> Result<Vec<Named>> {
    rows(model, x, query, only, false)
}

/// LSAGT's local attention over the shifted variants, for the first image of `x`: the weights
/// averaged over heads (`T×N` values, returned), the index of the variant with the largest
/// weight per patch (`winner`) and the entropy of the weights in nats (`entropy`, at most
/// `ln T`).
pub fn variant_maps<B: Backend>(model: &Model<B>, x: Tensor<B, 4>) -> Result<(Vec<Named>, Vec<Vec<f32>>)> {
    let Model::Lsagt(lsagt) = model else {
        bail!("variant maps are drawn for LSAGT models (VVT has no shifted variants); use --method locality")
    };
    let lsagt = lsagt.clone().deterministic();
    let Some((weights, (rows, cols))) = lsagt.variant_weights(x.slice_dim(0, 0..1)) else {
        bail!("this LSAGT has no locally shifted attention (variants = 1), so no variant weights")
    };
    let [_, _, n, t] = weights.dims();
    let mean = weights.mean_dim(1).reshape([n, t]);
    let values = mean
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    let per_patch: Vec<&[f32]> = values.chunks(t).collect();
    let winner = per_patch
        .iter()
        .map(|w| {
            w.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0 as f32
        })
        .collect();
    let entropy = per_patch
        .iter()
        .map(|w| -w.iter().filter(|&&p| p > 0.0).map(|&p| p * p.ln()).sum::<f32>())
        .collect();
    let by_variant = (0..t).map(|v| per_patch.iter().map(|w| w[v]).collect()).collect();
    let named = |name: &str, values| Named {
        name: name.into(),
        stage: 1,
        map: Map::new(rows, cols, values),
    };
    Ok((
        vec![named("winner", winner), named("entropy", entropy)],
        by_variant,
    ))
}
