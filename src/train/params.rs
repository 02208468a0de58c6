//! Parameters by name: the dotted module path of every float parameter (`stages.0.blocks.1.norm1.gamma`,
//! the names of native safetensors files), and the mappers that read or replace them by that name.
//!
//! The trainer keys its own state (Adam moments, f32 master weights, EMA weights) by these names,
//! not by Burn's `ParamId`s, which are not stored in safetensors files: a resumed run rebuilds the
//! model, loads the weights by name and finds its optimizer state under the same names.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// Tracks the dotted path while a visitor or mapper walks a module. Enum variants (`Model::Vvt`)
/// are left out of the names, as in native safetensors files.
#[derive(Default)]
pub struct PathStack {
    parts: Vec<Option<String>>,
}

impl PathStack {
    pub fn enter(&mut self, name: &str, container: &str) {
        self.parts
            .push((!container.starts_with("Enum")).then(|| name.to_string()));
    }

    pub fn exit(&mut self) {
        self.parts.pop();
    }

    /// The dotted name of the parameter being visited.
    pub fn name(&self) -> String {
        let parts: Vec<&str> = self.parts.iter().flatten().map(String::as_str).collect();
        parts.join(".")
    }
}

/// Whether a parameter gets weight decay: not 1-D parameters (norm scales and shifts, biases) and
/// not position embeddings or class tokens (the DeiT/timm rule, also the anchors').
pub fn decays(name: &str, rank: usize) -> bool {
    if rank <= 1 {
        return false;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if matches!(last, "bias" | "beta" | "gamma") {
        return false;
    }
    !name
        .split('.')
        .any(|p| p.contains("pos_emb") || p.contains("pos_embed") || p.contains("cls_token"))
}

/// Name, shape, dtype and whether it decays, for every float parameter of a module, in module
/// order.
pub fn param_info<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    struct V {
        path: PathStack,
        out: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let name = self.path.name();
            let value = param.val();
            self.out.push(ParamInfo {
                decay: decays(&name, D),
                shape: value.dims().to_vec(),
                dtype: float_dtype(&value),
                name,
            });
        }
    }
    let mut v = V {
        path: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// One parameter's name, shape and weight-decay group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: FloatDType,
    pub decay: bool,
}

/// Every float parameter, flattened to 1-D and converted to f32, by name.
pub fn collect_flat<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Tensor<B, 1>> {
    struct V<B: Backend> {
        path: PathStack,
        out: BTreeMap<String, Tensor<B, 1>>,
    }
    impl<B: Backend> ModuleVisitor<B> for V<B> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.shape().num_elements();
            self.out.insert(self.path.name(), to_f32(t.reshape([n])));
        }
    }
    let mut v = V {
        path: PathStack::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Replaces every parameter found in `values` (flat, any float dtype) by that value reshaped to the
/// parameter's shape; `dtype` picks the stored dtype (`None`: keep each parameter's own dtype).
/// Parameters without an entry keep their value.
pub fn replace_flat<B: Backend, M: Module<B>>(
    module: M,
    values: &BTreeMap<String, Tensor<B, 1>>,
    dtype: Option<FloatDType>,
) -> M {
    struct Mp<'a, B: Backend> {
        path: PathStack,
        values: &'a BTreeMap<String, Tensor<B, 1>>,
        dtype: Option<FloatDType>,
    }
    impl<B: Backend> ModuleMapper<B> for Mp<'_, B> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let tensor = match self.values.get(&self.path.name()) {
                Some(v) => {
                    let target = self.dtype.unwrap_or_else(|| float_dtype(&tensor));
                    let require_grad = tensor.is_require_grad();
                    let t = cast(v.clone(), target).reshape(tensor.shape()).detach();
                    if require_grad { t.require_grad() } else { t }
                }
                None => tensor,
            };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut Mp {
        path: PathStack::default(),
        values,
        dtype,
    })
}

/// Casts every float parameter to `dtype` (keeping the autodiff leaf flag).
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Mp(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Mp {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let require_grad = tensor.is_require_grad();
            let t = cast(tensor, self.0).detach();
            let t = if require_grad { t.require_grad() } else { t };
            Param::from_mapped_value(id, t, mapper)
        }
    }
    module.map(&mut Mp(dtype))
}

/// Initialises every lazily initialised parameter now, in module order, so that random
/// initialisation depends only on the backend seed and not on which parameter is used first.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct V;
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut V);
}

/// The float dtype of a tensor (f32 for anything unexpected).
pub fn float_dtype<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatDType {
    match t.dtype() {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// `t` in `dtype`, without a cast when it already is.
pub fn cast<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if float_dtype(&t) == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `t` in f32.
pub fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    cast(t, FloatDType::F32)
}
