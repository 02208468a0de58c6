//! Reading model inputs (image files or a safetensors tensor) and writing named tensors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;

/// ImageNet channel statistics used by both papers' preprocessing.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Reads a float32 tensor by name from a safetensors file.
pub fn read_safetensors_f32(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
    let view = st.tensor(name).map_err(|_| {
        anyhow::anyhow!(
            "{} has no tensor named '{name}' (it has: {})",
            path.display(),
            st.names().into_iter().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let values = floats(&view).with_context(|| format!("tensor '{name}' in {}", path.display()))?;
    Ok((view.shape().to_vec(), values))
}

/// The values of a safetensors tensor as f32: f32, f64, f16 and bf16 are read (converted); any
/// other dtype is an error naming it.
pub fn floats(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("it is {other:?}; a tensor here must be floating point"),
    })
}

/// Loads image files into a normalised `B×3×size×size` batch (resized with a bilinear filter).
pub fn load_images<B: Backend>(
    paths: &[impl AsRef<Path>],
    size: [usize; 2],
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let [h, w] = size;
    let mut values = Vec::with_capacity(paths.len() * 3 * h * w);
    for path in paths {
        let path = path.as_ref();
        let img = crate::data::read_image(path)?;
        let img = image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Triangle);
        for c in 0..3 {
            for p in img.pixels() {
                values.push((p[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]);
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [paths.len(), 3, h, w]),
        device,
    ))
}

/// Writes float tensors to a safetensors file (atomically).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    crate::weights::write_atomic(path, &safetensors_bytes(tensors, None)?)
}

/// The bytes of a safetensors file of f32 tensors, with optional header metadata.
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            let bytes: &[u8] = bytemuck_f32(values);
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, &metadata).map_err(|e| anyhow::anyhow!("{e}"))
}

fn bytemuck_f32(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; little-endian hosts only,
    // which is every platform Burn's CUDA and Flex backends run on.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// A tensor's shape and values on the host.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<(Vec<usize>, Vec<f32>)> {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((shape, values))
}
