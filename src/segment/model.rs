//! A segmentation model: a VVT backbone's four stages (strides 4, 8, 16, 32, the way timm's
//! `features_only` gives them) under Semantic FPN or UPerNet, with serde configurations and
//! registered names `semfpn_<backbone>` / `upernet_<backbone>` for every registered VVT.
//!
//! Logits come out at stride 4 (`B×H/4×W/4×K`, channels-last like every grid here); the loss and
//! predictions bring them to the label's size with bilinear resizing, as mmseg does.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use super::fpn::{Fpn, FpnHead};
use super::metrics::IGNORE;
use super::upernet::{FcnHead, UperHead};
use crate::models::{Model, ModelConfig};
use crate::nn::{Resample, resize};
use crate::weights;

/// Metadata key under which native segmentation weights keep their [`SegmenterConfig`].
pub const SEGMENTER_METADATA_KEY: &str = "vicinity.segmenter";

/// The decode head and its sizes (mmseg's names; defaults are the papers' settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadConfig {
    /// PVT's Semantic FPN: FPN neck to `neck_channels` (256), FPN head at `channels` (128).
    SemanticFpn {
        neck_channels: usize,
        channels: usize,
        /// GroupNorm groups of the head's convs.
        groups: usize,
        dropout: f64,
    },
    /// Swin's UPerNet: `channels` (512), pooling at `pool_scales` (1, 2, 3, 6), and an auxiliary
    /// FCN head on stage 3 (`aux_channels` 256) whose loss counts `aux_weight` (0.4).
    Upernet {
        channels: usize,
        pool_scales: Vec<usize>,
        aux_channels: usize,
        aux_weight: f64,
        groups: usize,
        dropout: f64,
    },
}

impl HeadConfig {
    pub fn semantic_fpn() -> Self {
        Self::SemanticFpn {
            neck_channels: 256,
            channels: 128,
            groups: 32,
            dropout: 0.1,
        }
    }

    pub fn upernet() -> Self {
        Self::Upernet {
            channels: 512,
            pool_scales: vec![1, 2, 3, 6],
            aux_channels: 256,
            aux_weight: 0.4,
            groups: 32,
            dropout: 0.1,
        }
    }

    /// The auxiliary loss weight (0 without an auxiliary head).
    pub fn aux_weight(&self) -> f64 {
        match self {
            Self::SemanticFpn { .. } => 0.0,
            Self::Upernet { aux_weight, .. } => *aux_weight,
        }
    }
}

/// A backbone, a head and the class count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmenterConfig {
    /// The classification model whose stages feed the head (its classifier is left unused).
    pub backbone: ModelConfig,
    pub head: HeadConfig,
    pub num_classes: usize,
}

/// Registered heads by name prefix.
pub const HEAD_PREFIXES: [&str; 2] = ["semfpn_", "upernet_"];

impl SegmenterConfig {
    /// `semfpn_<backbone>` or `upernet_<backbone>` for a registered VVT backbone, or a
    /// `.json`/`.toml` file holding a [`SegmenterConfig`].
    pub fn resolve(name_or_path: &str, num_classes: usize) -> Result<Self> {
        let path = Path::new(name_or_path);
        if matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "toml")) {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let config: Self = if path.extension().is_some_and(|e| e == "toml") {
                toml::from_str(&text)
                    .with_context(|| format!("{} is not a segmenter config", path.display()))?
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a segmenter config", path.display()))?
            };
            config.validate()?;
            return Ok(config);
        }
        let (head, backbone) = if let Some(b) = name_or_path.strip_prefix("semfpn_") {
            (HeadConfig::semantic_fpn(), b)
        } else if let Some(b) = name_or_path.strip_prefix("upernet_") {
            (HeadConfig::upernet(), b)
        } else {
            bail!(
                "'{name_or_path}' is not a segmentation model: name one `semfpn_<backbone>` or \
                 `upernet_<backbone>` (e.g. semfpn_vvt_tiny, upernet_vvt_small), or a .json/.toml config"
            )
        };
        let backbone = crate::models::config_by_name(backbone)
            .with_context(|| format!("'{name_or_path}' names an unknown backbone"))?;
        let config = Self {
            backbone,
            head,
            num_classes,
        };
        config.validate()?;
        Ok(config)
    }

    /// Fails with a message naming what the heads cannot be built on.
    pub fn validate(&self) -> Result<()> {
        let ModelConfig::Vvt(vvt) = &self.backbone else {
            bail!(
                "segmentation needs a VVT backbone: LSAGT's position embeddings are learned for one token \
                 grid, so it cannot take the varying image sizes of segmentation, and its stages sit at \
                 strides 7/14/28/56 rather than 4/8/16/32"
            );
        };
        self.backbone.validate()?;
        ensure!(
            (0..vvt.num_stages()).all(|i| vvt.attention.at(i) != crate::attention::AttentionKind::Linformer),
            "segmentation needs a backbone that takes any image size; Linformer's projections are built \
             for one token count"
        );
        ensure!(
            vvt.num_stages() == 4,
            "the heads take four stages (strides 4, 8, 16, 32); this backbone has {}",
            vvt.num_stages()
        );
        ensure!(
            (1..=255).contains(&self.num_classes),
            "num_classes = {}: masks are 8-bit with 255 ignored, so 1 to 255 classes",
            self.num_classes
        );
        let (groups, widths): (usize, Vec<usize>) = match &self.head {
            HeadConfig::SemanticFpn {
                neck_channels,
                channels,
                groups,
                dropout,
            } => {
                ensure!((0.0..1.0).contains(dropout), "dropout {dropout} is not in [0, 1)");
                ensure!(
                    (1..=1 << 13).contains(neck_channels),
                    "a neck width of {neck_channels} is beyond what vicinity builds (1 to 8192)"
                );
                // The FPN neck has no normalisation; the head's convs have.
                (*groups, vec![*channels])
            }
            HeadConfig::Upernet {
                channels,
                pool_scales,
                aux_channels,
                aux_weight,
                groups,
                dropout,
            } => {
                ensure!((0.0..1.0).contains(dropout), "dropout {dropout} is not in [0, 1)");
                ensure!(
                    !pool_scales.is_empty() && pool_scales.iter().all(|&s| (1..=64).contains(&s)),
                    "pool_scales {pool_scales:?}: one or more sizes from 1 to 64"
                );
                ensure!(
                    aux_weight.is_finite() && *aux_weight >= 0.0,
                    "aux_weight {aux_weight}"
                );
                (*groups, vec![*channels, *aux_channels])
            }
        };
        for w in widths {
            ensure!(
                (1..=1 << 13).contains(&w),
                "a head width of {w} is beyond what vicinity builds (1 to 8192)"
            );
            ensure!(
                groups > 0 && w.is_multiple_of(groups),
                "a head width of {w} does not split into {groups} GroupNorm groups"
            );
        }
        Ok(())
    }

    /// Fails unless the model takes an `h×w` image (VVT: multiples of 32).
    pub fn check_input(&self, h: usize, w: usize) -> Result<()> {
        self.backbone.check_input(h, w)
    }

    /// The stages' widths.
    pub fn stage_channels(&self) -> Vec<usize> {
        match &self.backbone {
            ModelConfig::Vvt(c) => c.embed_dims.clone(),
            ModelConfig::Lsagt(c) => c.dims.iter().map(|d| d[1]).collect(),
        }
    }

    /// Checks the configuration and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Segmenter<B>> {
        self.validate()?;
        let dims = self.stage_channels();
        let k = self.num_classes;
        let head = match &self.head {
            HeadConfig::SemanticFpn {
                neck_channels,
                channels,
                groups,
                dropout,
            } => SegHead::SemanticFpn(SemanticFpn {
                neck: Fpn::new(&dims, *neck_channels, device),
                decode_head: FpnHead::new(
                    *neck_channels,
                    dims.len(),
                    *channels,
                    *groups,
                    *dropout,
                    k,
                    device,
                ),
            }),
            HeadConfig::Upernet {
                channels,
                pool_scales,
                aux_channels,
                groups,
                dropout,
                ..
            } => SegHead::Upernet(Upernet {
                decode_head: UperHead::new(&dims, *channels, pool_scales, *groups, *dropout, k, device),
                auxiliary_head: FcnHead::new(dims[2], *aux_channels, *groups, *dropout, k, device),
            }),
        };
        Ok(Segmenter {
            backbone: self.backbone.init(device)?,
            head,
        })
    }
}

/// FPN neck + FPN head.
#[derive(Module, Debug)]
pub struct SemanticFpn<B: Backend> {
    pub neck: Fpn<B>,
    pub decode_head: FpnHead<B>,
}

/// UPerNet head + the auxiliary FCN head on stage 3.
#[derive(Module, Debug)]
pub struct Upernet<B: Backend> {
    pub decode_head: UperHead<B>,
    pub auxiliary_head: FcnHead<B>,
}

#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum SegHead<B: Backend> {
    SemanticFpn(SemanticFpn<B>),
    Upernet(Upernet<B>),
}

/// Stride-4 logits, `B×H/4×W/4×K`, and UPerNet's auxiliary logits (stride 16) when training.
#[derive(Debug, Clone)]
pub struct SegOutput<B: Backend> {
    pub logits: Tensor<B, 4>,
    pub aux: Option<Tensor<B, 4>>,
}

#[derive(Module, Debug)]
pub struct Segmenter<B: Backend> {
    pub backbone: Model<B>,
    pub head: SegHead<B>,
}

impl<B: Backend> Segmenter<B> {
    /// The backbone's stages as channels-last grids `B×Hᵢ×Wᵢ×Cᵢ`, finest first.
    pub fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        let out = self.backbone.forward_features(images);
        out.stages
            .into_iter()
            .zip(out.grids)
            .map(|(tokens, (h, w))| {
                let [b, _, c] = tokens.dims();
                tokens.reshape([b, h, w, c])
            })
            .collect()
    }

    /// `images`: `B×3×H×W` (normalised) → stride-4 logits, and the auxiliary logits if `aux`.
    pub fn forward(&self, images: Tensor<B, 4>, aux: bool) -> SegOutput<B> {
        let features = self.features(images);
        match &self.head {
            SegHead::SemanticFpn(h) => SegOutput {
                logits: h.decode_head.forward(h.neck.forward(features)),
                aux: None,
            },
            SegHead::Upernet(h) => {
                let aux = aux.then(|| h.auxiliary_head.forward(features[2].clone()));
                SegOutput {
                    logits: h.decode_head.forward(features),
                    aux,
                }
            }
        }
    }

    /// Logits brought to `(height, width)` (bilinear, as mmseg's `resize`), `B×height×width×K`.
    pub fn forward_resized(&self, images: Tensor<B, 4>, size: (usize, usize)) -> Tensor<B, 4> {
        resize(self.forward(images, false).logits, size, Resample::Bilinear)
    }

    /// The same model without its random parts (dropout, drop-path), also under autodiff.
    pub fn deterministic(mut self) -> Self {
        self.backbone = self.backbone.deterministic();
        match &mut self.head {
            SegHead::SemanticFpn(h) => h.decode_head.dropout.prob = 0.0,
            SegHead::Upernet(h) => {
                h.decode_head.dropout.prob = 0.0;
                h.auxiliary_head.dropout.prob = 0.0;
            }
        }
        self
    }
}

/// Mean cross-entropy over the labelled pixels of `logits` (`B×h×w×K`, any grid: brought to the
/// labels' size first) against `labels` (`B×H×W`, class indices, [`IGNORE`] skipped). Computed in
/// f32. Fails when no pixel of the batch is labelled.
pub fn pixel_cross_entropy<B: Backend>(
    logits: Tensor<B, 4>,
    labels: &[u8],
    size: [usize; 3],
) -> Result<Tensor<B, 1>> {
    let [b, h, w] = size;
    ensure!(
        labels.len() == b * h * w,
        "{} labels for a {b}×{h}×{w} batch",
        labels.len()
    );
    let device = logits.device();
    let logits = resize(logits, (h, w), Resample::Bilinear).cast(burn::tensor::DType::F32);
    // Counted exactly: an f32 sum stops growing at 2^24 pixels.
    let count = labels.iter().filter(|&&l| l != IGNORE).count();
    ensure!(
        count > 0,
        "a training batch has no labelled pixel (every label is {IGNORE})"
    );
    // One upload; the mask of labelled pixels and the gather index are made from it on the device.
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    let labels = Tensor::<B, 4, Int>::from_data(TensorData::new(labels, [b, h, w, 1]), &device);
    let ignored = labels.clone().equal_elem(i64::from(IGNORE));
    let index = labels.mask_fill(ignored.clone(), 0);
    let valid = ignored.bool_not().float().cast(burn::tensor::DType::F32);
    let picked = log_softmax(logits, 3).gather(3, index);
    Ok((picked * valid).sum().neg().div_scalar(count as f64))
}

/// The training loss: the decode head's, plus the auxiliary head's times its weight.
pub fn seg_loss<B: Backend>(
    out: SegOutput<B>,
    labels: &[u8],
    size: [usize; 3],
    aux_weight: f64,
) -> Result<Tensor<B, 1>> {
    let main = pixel_cross_entropy(out.logits, labels, size)?;
    Ok(match out.aux {
        Some(aux) if aux_weight > 0.0 => {
            main + pixel_cross_entropy(aux, labels, size)?.mul_scalar(aux_weight)
        }
        _ => main,
    })
}

/// mmseg name → module path: `neck.X` / `decode_head.X` / `auxiliary_head.X` move under `head.`,
/// a scale head's convs (Sequential indices 0, 2, 4 between upsamplings) become `convs.0, 1, 2`,
/// a pooling branch's conv (index 1 after its pooling) becomes `conv`, and `backbone.X` takes the
/// VVT renaming of `X`.
pub fn rename_mmseg(name: &str) -> String {
    static RULES: std::sync::OnceLock<[(regex::Regex, &str); 2]> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            (
                regex::Regex::new(r"scale_heads\.(\d+)\.(\d+)\.").unwrap(),
                "scale_heads.$1.convs.$2.",
            ),
            (
                regex::Regex::new(r"psp_modules\.(\d+)\.1\.").unwrap(),
                "psp_modules.$1.conv.",
            ),
        ]
    });
    if let Some(rest) = name.strip_prefix("backbone.") {
        return format!("backbone.{}", crate::models::vvt::rename_official(rest));
    }
    let mut out = name.to_string();
    if let Some(c) = rules[0].0.captures(&out) {
        let k: usize = c[2].parse().unwrap_or(0);
        out = rules[0]
            .0
            .replace(&out, format!("scale_heads.$1.convs.{}.", k / 2))
            .into_owned();
    }
    out = rules[1].0.replace(&out, rules[1].1).into_owned();
    format!("head.{out}")
}

/// Native safetensors bytes of a segmenter, its configuration in the metadata.
pub fn segmenter_bytes<B: Backend>(model: &Segmenter<B>, config: &SegmenterConfig) -> Result<Vec<u8>> {
    weights::module_bytes(model, SEGMENTER_METADATA_KEY, &serde_json::to_string(config)?)
}

/// The configuration inside native segmentation weights.
pub fn segmenter_config(path: &Path) -> Result<SegmenterConfig> {
    let json = weights::metadata_entry(path, SEGMENTER_METADATA_KEY)?.with_context(|| {
        format!(
            "{} holds no segmentation model (no `{SEGMENTER_METADATA_KEY}` entry): pass a checkpoint \
             written by `vicinity seg-train`",
            path.display()
        )
    })?;
    let config: SegmenterConfig = serde_json::from_str(&json)
        .with_context(|| format!("{} carries an unreadable config", path.display()))?;
    config
        .validate()
        .with_context(|| format!("impossible segmenter config in {}", path.display()))?;
    Ok(config)
}

/// A segmenter from native weights (`.safetensors`, configuration inside) or from an mmseg-style
/// `.pth` whose configuration is given.
pub fn load_segmenter<B: Backend>(
    path: &Path,
    config: Option<&SegmenterConfig>,
    device: &B::Device,
) -> Result<(Segmenter<B>, SegmenterConfig)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => {
            let config = segmenter_config(path)?;
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let model = weights::load_module_bytes(config.init(device)?, bytes, &path.display().to_string())?;
            Ok((model, config))
        }
        Some("pth" | "pt") => {
            let config = config
                .context("an mmseg-style .pth carries no configuration: name the model (--model)")?
                .clone();
            let model = config.init(device)?;
            // mmseg's backbones have no classifier: the unused one here is filled with zeros.
            let mut tensors = weights::read_pytorch(path)?;
            if !tensors.iter().any(|(n, _)| n.starts_with("backbone.head.")) {
                let Model::Vvt(vvt) = &model.backbone else {
                    unreachable!("validate() admits VVT backbones only")
                };
                let [c, k] = vvt.head.weight.dims();
                let zeros = |shape: Vec<usize>| weights::pth::PthTensor {
                    values: vec![0.0; shape.iter().product()],
                    shape,
                };
                tensors.push(("backbone.head.weight".into(), zeros(vec![k, c])));
                tensors.push(("backbone.head.bias".into(), zeros(vec![k])));
            }
            let model = weights::load_official_tensors(model, tensors, path, rename_mmseg)?;
            Ok((model, config))
        }
        _ => bail!(
            "cannot tell the format of {}: .safetensors (vicinity) or .pth (mmseg-style)",
            path.display()
        ),
    }
}

/// `config`'s backbone with its classifier sized like the one in `path` (an official `.pth` or
/// native classification weights), so the checkpoint loads strictly; the classifier stays unused.
pub fn backbone_matching(config: &SegmenterConfig, path: &Path) -> Result<SegmenterConfig> {
    let classes = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => weights::native_config(path)?
            .with_context(|| format!("{} holds no model configuration", path.display()))?
            .num_classes(),
        _ => weights::read_pytorch(path)?
            .into_iter()
            .find(|(n, _)| n == "head.weight")
            .map(|(_, t)| t.shape[0])
            .with_context(|| format!("{} has no `head.weight`: is it a VVT checkpoint?", path.display()))?,
    };
    let mut out = config.clone();
    out.backbone = out.backbone.with_num_classes(classes);
    Ok(out)
}

/// Fills the backbone of `model` from classification weights (official `.pth` or native).
pub fn load_backbone<B: Backend>(mut model: Segmenter<B>, path: &Path) -> Result<Segmenter<B>> {
    model.backbone = weights::load_any(model.backbone, path)
        .with_context(|| format!("cannot initialise the backbone from {}", path.display()))?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmseg_names_map_onto_the_modules() {
        assert_eq!(
            rename_mmseg("decode_head.scale_heads.2.2.conv.weight"),
            "head.decode_head.scale_heads.2.convs.1.conv.weight"
        );
        assert_eq!(
            rename_mmseg("decode_head.scale_heads.0.0.gn.bias"),
            "head.decode_head.scale_heads.0.convs.0.gn.bias"
        );
        assert_eq!(
            rename_mmseg("decode_head.psp_modules.3.1.conv.weight"),
            "head.decode_head.psp_modules.3.conv.conv.weight"
        );
        assert_eq!(
            rename_mmseg("neck.lateral_convs.0.conv.bias"),
            "head.neck.lateral_convs.0.conv.bias"
        );
        assert_eq!(rename_mmseg("backbone.norm4.bias"), "backbone.stages.3.norm.bias");
    }

    /// The mean of −log softmax at the label over the labelled pixels, computed by hand.
    #[test]
    fn pixel_loss_averages_over_labelled_pixels() {
        type C = crate::backend::Cpu;
        let device = Default::default();
        let (b, h, w, k) = (2, 3, 4, 5);
        let logits: Vec<f32> = (0..b * h * w * k)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5)
            .collect();
        let labels: Vec<u8> = (0..b * h * w)
            .map(|i| if i % 5 == 0 { IGNORE } else { (i % k) as u8 })
            .collect();
        let (mut sum, mut n) = (0.0f64, 0);
        for (p, &l) in labels.iter().enumerate() {
            if l == IGNORE {
                continue;
            }
            let row = &logits[p * k..(p + 1) * k];
            let lse = row.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
            sum += lse - f64::from(row[l as usize]);
            n += 1;
        }
        let x = Tensor::<C, 4>::from_data(TensorData::new(logits, [b, h, w, k]), &device);
        let loss: f32 = pixel_cross_entropy(x, &labels, [b, h, w])
            .unwrap()
            .into_scalar()
            .elem();
        assert!(
            (f64::from(loss) - sum / n as f64).abs() < 1e-5,
            "{loss} against {}",
            sum / n as f64
        );
    }

    #[test]
    fn names_and_impossible_configurations() {
        let c = SegmenterConfig::resolve("semfpn_vvt_tiny", 150).unwrap();
        assert_eq!(c.head, HeadConfig::semantic_fpn());
        assert_eq!(c.stage_channels(), vec![96, 160, 320, 512]);
        let u = SegmenterConfig::resolve("upernet_vvt_small", 19).unwrap();
        assert_eq!(u.head.aux_weight(), 0.4);
        let err = SegmenterConfig::resolve("vvt_tiny", 150).unwrap_err().to_string();
        assert!(err.contains("semfpn_<backbone>"), "{err}");
        let err = format!(
            "{:#}",
            SegmenterConfig::resolve("semfpn_lsagt_imagenet_tiny", 150).unwrap_err()
        );
        assert!(err.contains("position embeddings"), "{err}");
        let err = format!(
            "{:#}",
            SegmenterConfig::resolve("semfpn_vvt_tiny", 256).unwrap_err()
        );
        assert!(err.contains("1 to 255"), "{err}");
        let mut odd = c.clone();
        odd.head = HeadConfig::SemanticFpn {
            neck_channels: 100,
            channels: 100,
            groups: 32,
            dropout: 0.1,
        };
        let err = odd.validate().unwrap_err().to_string();
        assert!(
            err.contains("a head width of 100 does not split into 32"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            SegmenterConfig::resolve("semfpn_vvt_tiny_linformer", 150).unwrap_err()
        );
        assert!(err.contains("Linformer"), "{err}");
    }
}
