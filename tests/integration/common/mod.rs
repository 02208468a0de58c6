//! Helpers shared by the integration tests: fixture paths, reading fixture tensors, errors.

use std::path::PathBuf;

use burn::prelude::*;

pub type B = burn::backend::Flex;

/// `tests/fixtures`: official checkpoints of small configurations with the authors' outputs
/// (tests/fixtures/README.md). Parity with them is the definition of correct.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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
        .collect(None, Some(Box::new(burn_store::BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect()
}

/// The CPU backend with autodiff, for gradient parity.
pub type A = burn::backend::Autodiff<B>;

/// Every tensor of `tests/fixtures/{name}{suffix}.safetensors`, by name.
pub fn fixture_file(name: &str, suffix: &str) -> std::collections::BTreeMap<String, Tensor<B, 1>> {
    let path = fixtures_dir().join(format!("{name}{suffix}.safetensors"));
    let tensors = vicinity::train::checkpoint::read_all_f32(&path).unwrap();
    tensors
        .into_iter()
        .map(|(k, (shape, values))| {
            let n = shape.iter().product::<usize>();
            let t =
                Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values, [n]), &Default::default());
            (k, t)
        })
        .collect()
}

/// Every float parameter's gradient (flattened, with its shape), by its dotted module path.
pub fn gradients_by_name<M: burn::module::Module<A>>(
    model: &M,
    grads: &<A as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> std::collections::HashMap<String, (Vec<usize>, Tensor<B, 1>)> {
    use burn::module::{ModuleVisitor, Param};
    use vicinity::train::params::PathStack;
    struct V<'a> {
        path: PathStack,
        grads: &'a <A as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: std::collections::HashMap<String, (Vec<usize>, Tensor<B, 1>)>,
    }
    impl ModuleVisitor<A> for V<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                let shape = g.dims().to_vec();
                let n = shape.iter().product::<usize>();
                self.out.insert(self.path.name(), (shape, g.reshape([n])));
            }
        }
    }
    let mut v = V {
        path: PathStack::default(),
        grads,
        out: Default::default(),
    };
    model.visit(&mut v);
    v.out
}

/// Gradient parity with the authors' code: `loss = Σ logits · probe` (the fixture's probe) on the
/// fixture's input, backward; the input's gradient and every official parameter's against
/// `tests/fixtures/{name}_grads.safetensors` (made by `tests/fixtures/make_fixtures.py`). Returns
/// the worst relative L2 error.
pub fn check_gradients<M: burn::module::Module<A>>(
    name: &str,
    model: &M,
    forward: impl Fn(&M, Tensor<A, 4>) -> Tensor<A, 2>,
    rename: impl Fn(&str) -> String,
) -> f32 {
    let want = fixture_file(name, "_grads");
    let input = fixture_tensor::<4>(name, "input");
    let x = Tensor::<A, 4>::from_inner(input).require_grad();
    let logits = forward(model, x.clone());
    let probe = want["probe"].clone().reshape(logits.dims());
    let grads = (logits * Tensor::from_inner(probe)).sum().backward();
    let gx = x.grad(&grads).expect("input gradient");
    let n = gx.dims().iter().product::<usize>();
    let mut worst = rel_l2(gx.reshape([n]), want["input_grad"].clone());
    let ours = gradients_by_name(model, &grads);
    let mut checked = 0;
    for (key, expected) in &want {
        let Some(official) = key.strip_prefix("grad.") else {
            continue;
        };
        let path = rename(official);
        let alt = path
            .strip_suffix(".weight")
            .map(|s| format!("{s}.gamma"))
            .into_iter()
            .chain(path.strip_suffix(".bias").map(|s| format!("{s}.beta")));
        let found = std::iter::once(path.clone())
            .chain(alt)
            .find_map(|p| ours.get(&p).cloned());
        let (shape, got) = found.unwrap_or_else(|| panic!("{name}: no gradient for {official} ({path})"));
        // Linear weights are [in, out] here and [out, in] in PyTorch.
        let got = if shape.len() == 2 && official.ends_with(".weight") {
            got.reshape([shape[0], shape[1]])
                .transpose()
                .reshape([shape[0] * shape[1]])
        } else {
            got
        };
        let err = rel_l2(got, expected.clone());
        assert!(err.is_finite(), "{name}: {official} gradient is not finite");
        worst = worst.max(err);
        checked += 1;
    }
    assert_eq!(checked + 2, want.len(), "{name}: every official gradient checked");
    println!("{name}: {checked} parameter gradients and the input's, worst rel L2 {worst:.2e}");
    worst
}

/// A fresh temporary folder for one test, removed on drop (names must differ between tests:
/// they run in parallel in one process).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vicinity-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
