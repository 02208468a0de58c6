//! Helpers shared by the integration tests: fixture paths, reading fixture tensors, errors.

use std::path::PathBuf;

use burn::prelude::*;

pub type B = burn::backend::Flex;

/// `../shared/fixtures` beside the checkout, or `$VICINITY_FIXTURES`. Missing fixtures fail the
/// test: parity with them is the definition of correct.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("VICINITY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        dir.join("vvt_mini.pth").exists(),
        "fixtures not found in {} (set VICINITY_FIXTURES)",
        dir.display()
    );
    dir
}

/// One tensor of a fixture `_io.safetensors` file on the CPU backend.
pub fn fixture_tensor<const D: usize>(name: &str, key: &str) -> Tensor<B, D> {
    let path = fixtures_dir().join(format!("{name}_io.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("{key} not in {}", path.display()));
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let data = burn::tensor::TensorData::new(values, view.shape().to_vec());
    Tensor::from_data(data, &Default::default())
}

/// The fixture's JSON description.
pub fn fixture_json(name: &str) -> serde_json::Value {
    let path = fixtures_dir().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff: f32 = (a - b.clone()).powi_scalar(2).sum().into_scalar();
    let norm: f32 = b.powi_scalar(2).sum().into_scalar();
    (diff / norm.max(1e-30)).sqrt()
}

/// Official (name, shape) pairs and the header JSON from `keys/NAME.tsv`.
pub fn official_keys(name: &str) -> (Vec<(String, Vec<usize>)>, serde_json::Value) {
    let text = std::fs::read_to_string(fixtures_dir().join(format!("keys/{name}.tsv"))).unwrap();
    let mut lines = text.lines();
    let header: serde_json::Value =
        serde_json::from_str(lines.next().unwrap().trim_start_matches("# ")).unwrap();
    let keys = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once('\t').unwrap();
            let shape = shape.split('x').map(|d| d.parse().unwrap()).collect();
            (name.to_string(), shape)
        })
        .collect();
    (keys, header)
}

/// Every parameter's path and shape in PyTorch layout (Linear weights transposed back, LayerNorm
/// `gamma`/`beta` named `weight`/`bias`), read without materialising the (lazily initialised)
/// weights.
pub fn param_shapes<M: burn_store::ModuleSnapshot<B>>(
    model: &M,
) -> std::collections::HashMap<String, Vec<usize>> {
    model
        .collect(None, Some(Box::new(burn_store::BurnToPyTorchAdapter)), false)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect()
}
