//! AdamW with parameter groups, global gradient-norm clipping, optional f32 master weights and an
//! optional exponential moving average of the weights.
//!
//! Burn 0.21's `AdamW` applies one weight decay to every parameter and clips gradients one tensor
//! at a time, so the trainer has its own step (the same update as Burn's and PyTorch's AdamW):
//!
//! ```text
//! g  = grad · min(1, clip / ‖grad‖₂)        (‖·‖ over all parameters together)
//! m  = β₁m + (1−β₁)g,   v = β₂v + (1−β₂)g²
//! p  = p·(1 − lr·wd) − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
//! ```
//!
//! with `wd = 0` for the parameters that [`super::params::decays`] excludes (norms, biases,
//! position embeddings). All optimizer arithmetic is f32; with `master_weights` (bf16 training)
//! the optimizer keeps an f32 copy of every parameter and writes a bf16 cast back into the model.
//! The state is keyed by parameter name, so it survives a save/load round trip by name.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::params::{PathStack, cast, decays, float_dtype, to_f32};

/// Named host tensors (shape, f32 values), as written to and read from safetensors files.
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Hyper-parameters of [`AdamW`] (the learning rate comes with each step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of the decaying group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// Moments of one parameter, flat f32.
#[derive(Clone)]
struct Moments<B: Backend> {
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

/// The optimizer; `B` is the inner (non-autodiff) backend.
#[derive(Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Steps taken (the `t` of the bias correction).
    pub step: u64,
    moments: HashMap<String, Moments<B>>,
    /// f32 master weights (bf16 training), flat.
    master: Option<HashMap<String, Tensor<B, 1>>>,
}

/// Exponential moving average of the weights (f32, flat), updated after each optimizer step with
/// decay `min(decay, (1+n)/(10+n))` after `n` updates, so that early averages are not dominated by
/// the random initialisation.
#[derive(Clone)]
pub struct Ema<B: Backend> {
    pub decay: f64,
    pub updates: u64,
    pub values: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Ema<B> {
    pub fn new(decay: f64) -> Self {
        Ema {
            decay,
            updates: 0,
            values: BTreeMap::new(),
        }
    }

    /// The decay used for the next update.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }
}

/// What a step measured, still on the device (read it back only when needed).
pub struct StepStats<B: Backend> {
    /// Global gradient norm before clipping, shape `[1]`.
    pub grad_norm: Tensor<B, 1>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig, master_weights: bool) -> Self {
        AdamW {
            config,
            step: 0,
            moments: HashMap::new(),
            master: master_weights.then(HashMap::new),
        }
    }

    pub fn has_master_weights(&self) -> bool {
        self.master.is_some()
    }

    /// One AdamW step on every parameter that has a gradient.
    pub fn step<AB, M>(
        &mut self,
        model: M,
        mut grads: GradientsParams,
        lr: f64,
        clip: Option<f64>,
        ema: Option<&mut Ema<B>>,
    ) -> (M, StepStats<B>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let grad_norm = global_norm::<AB, M>(&model, &grads);
        let coef =
            clip.map(|max| (grad_norm.clone().add_scalar(1e-6).recip().mul_scalar(max)).clamp_max(1.0));
        self.step += 1;
        let t = self.step as i32;
        let c = self.config;
        let ema_decay = ema.as_ref().map(|e| e.current_decay());
        let mut mapper = StepMapper::<AB> {
            path: PathStack::default(),
            grads: &mut grads,
            opt: self,
            lr,
            coef,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            ema: ema.map(|e| (e, ema_decay.unwrap_or(0.0))),
        };
        let model = model.map(&mut mapper);
        if let Some((e, _)) = mapper.ema {
            e.updates += 1;
        }
        (model, StepStats { grad_norm })
    }

    /// The f32 master copy of each parameter (bf16 training), or `None`.
    pub fn master_weights(&self) -> Option<BTreeMap<String, Tensor<B, 1>>> {
        self.master
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// The state as named host tensors: `m/NAME`, `v/NAME` and (bf16) `master/NAME`.
    pub fn to_host(&self) -> Result<HostTensors> {
        let mut out = BTreeMap::new();
        for (name, mo) in &self.moments {
            out.insert(format!("m/{name}"), crate::io::to_host(mo.m.clone())?);
            out.insert(format!("v/{name}"), crate::io::to_host(mo.v.clone())?);
        }
        if let Some(master) = &self.master {
            for (name, p) in master {
                out.insert(format!("master/{name}"), crate::io::to_host(p.clone())?);
            }
        }
        Ok(out)
    }

    /// Restores the state written by [`AdamW::to_host`] (the step count comes separately).
    pub fn load_host(&mut self, tensors: HostTensors, step: u64, device: &B::Device) -> Result<()> {
        let to_dev = |(shape, v): (Vec<usize>, Vec<f32>)| {
            let n = shape.iter().product::<usize>();
            Tensor::<B, 1>::from_data(
                burn::tensor::TensorData::new(v, [n]),
                (device, burn::tensor::DType::F32),
            )
        };
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        let mut master = HashMap::new();
        for (key, t) in tensors {
            let (kind, name) = key.split_once('/').context("malformed optimizer state name")?;
            match kind {
                "m" => m.insert(name.to_string(), to_dev(t)),
                "v" => v.insert(name.to_string(), to_dev(t)),
                "master" => master.insert(name.to_string(), to_dev(t)),
                other => bail!("unknown optimizer state kind '{other}'"),
            };
        }
        if m.len() != v.len() {
            bail!(
                "optimizer state has {} first moments but {} second moments",
                m.len(),
                v.len()
            );
        }
        let mut moments = HashMap::new();
        for (name, m) in m {
            let v = v
                .remove(&name)
                .with_context(|| format!("optimizer state lacks v/{name}"))?;
            moments.insert(name, Moments { m, v });
        }
        self.moments = moments;
        self.step = step;
        if let Some(own) = &mut self.master {
            *own = master;
        }
        Ok(())
    }
}

/// ‖all gradients‖₂ as a `[1]` tensor (f32), without leaving the device.
fn global_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: &GradientsParams,
) -> Tensor<AB::InnerBackend, 1> {
    struct V<'a, AB: AutodiffBackend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<AB::InnerBackend, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for V<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let sq = to_f32(g).square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    let mut v = V::<AB> { grads, sum: None };
    model.visit(&mut v);
    match v.sum {
        Some(s) => s.sqrt(),
        None => Tensor::zeros([1], &Default::default()),
    }
}

struct StepMapper<'a, AB: AutodiffBackend> {
    path: PathStack,
    grads: &'a mut GradientsParams,
    opt: &'a mut AdamW<AB::InnerBackend>,
    lr: f64,
    coef: Option<Tensor<AB::InnerBackend, 1>>,
    bias1: f64,
    bias2: f64,
    ema: Option<(&'a mut Ema<AB::InnerBackend>, f64)>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for StepMapper<'_, AB> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let name = self.path.name();
        let c = self.opt.config;
        let inner = tensor.inner();
        let shape = inner.shape();
        let dtype = float_dtype(&inner);
        let n = shape.num_elements();
        let mut g = to_f32(grad).reshape([n]);
        if let Some(coef) = &self.coef {
            g = g.mul(coef.clone());
        }
        let (m, v) = match self.opt.moments.remove(&name) {
            Some(Moments { m, v }) => (
                m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1),
                v.mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2),
            ),
            None => (
                g.clone().mul_scalar(1.0 - c.beta1),
                g.square().mul_scalar(1.0 - c.beta2),
            ),
        };
        let update = m
            .clone()
            .div_scalar(self.bias1)
            .div(v.clone().div_scalar(self.bias2).sqrt().add_scalar(c.eps));
        let wd = if decays(&name, D) { c.weight_decay } else { 0.0 };
        let p = match &mut self.opt.master {
            Some(master) => master.remove(&name).unwrap_or_else(|| to_f32(inner.reshape([n]))),
            None => to_f32(inner.reshape([n])),
        };
        let p = if wd > 0.0 {
            p.mul_scalar(1.0 - self.lr * wd)
        } else {
            p
        };
        let p = p - update.mul_scalar(self.lr);
        self.opt.moments.insert(name.clone(), Moments { m, v });
        if let Some((ema, decay)) = &mut self.ema {
            let e = match ema.values.remove(&name) {
                Some(e) => e.mul_scalar(*decay) + p.clone().mul_scalar(1.0 - *decay),
                None => p.clone(),
            };
            ema.values.insert(name.clone(), e);
        }
        let new = cast(p.clone(), dtype).reshape(shape);
        if let Some(master) = &mut self.opt.master {
            master.insert(name, p);
        }
        Param::from_mapped_value(id, Tensor::from_inner(new).require_grad(), mapper)
    }
}
