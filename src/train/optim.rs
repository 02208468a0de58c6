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
//!
//! Parameters are updated in groups that share flat buffers ([`Grouping`]). By default there are
//! two groups, with and without weight decay, so a step is a handful of kernels rather than a few
//! per parameter tensor (vvt_tiny has 200-odd): at CIFAR size, where a step takes tens of
//! milliseconds, issuing those kernels one tensor at a time kept the GPU waiting. The gradients
//! reach the flat buffers in one launch per group ([`crate::kernels::concat`]). One group per
//! tensor ([`Grouping::PerTensor`]) is the plain reference path, tested against the flat one.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, TensorData};

use super::params::{ParamInfo, PathStack, cast, collect_flat, param_info, to_f32};
use crate::kernels::concat::concat_flat;

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

/// How parameters share the optimizer's flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// One group with weight decay and one without (and one per parameter dtype): each parameter
    /// is a slice of its group's buffers.
    Flat,
    /// One group per parameter tensor: the plain reference path.
    PerTensor,
}

/// Parameters start at multiples of this many elements in a flat group (512 bytes in bf16, the
/// CUDA allocation alignment), so that each is handed back to the model as a view, not a copy.
const ALIGN: usize = 256;

/// Where one parameter lives in its group's buffers.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

impl Slot {
    fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Parameters updated together; every buffer is flat f32 of `len` elements (padding is zero).
#[derive(Clone)]
struct Group<B: Backend> {
    slots: Vec<Slot>,
    len: usize,
    weight_decay: bool,
    /// The parameters' dtype (the model's, bf16 or f32).
    dtype: FloatDType,
    /// The f32 weights: the master copy with bf16 parameters, the parameters themselves with f32.
    weights: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    ema: Option<Tensor<B, 1>>,
}

impl<B: Backend> Group<B> {
    /// `values` by slot, laid out as this group's buffer (zero where a slot has none).
    fn gather(&self, values: &mut HashMap<String, Tensor<B, 1>>, device: &B::Device) -> Option<Tensor<B, 1>> {
        if let [slot] = &self.slots[..]
            && slot.len == self.len
        {
            return values.remove(&slot.name);
        }
        if self.slots.iter().all(|s| values.contains_key(&s.name)) {
            // Every slot present: one launch (crate::kernels::concat) instead of one per slot.
            let parts = self
                .slots
                .iter()
                .map(|s| values.remove(&s.name).expect("checked above"))
                .collect();
            let offsets: Vec<usize> = self.slots.iter().map(|s| s.offset).collect();
            return Some(concat_flat(parts, &offsets, self.len));
        }
        let mut buf: Option<Tensor<B, 1>> = None;
        for slot in &self.slots {
            if let Some(t) = values.remove(&slot.name) {
                let b = buf.unwrap_or_else(|| Tensor::zeros([self.len], (device, t.dtype())));
                buf = Some(b.slice_assign(slot.range(), t));
            }
        }
        buf
    }

    /// This group's part of `values` (restored averages) as a buffer, with `fill`'s values where
    /// a slot has none; `None` when no slot has one.
    fn restore(
        &self,
        values: &mut BTreeMap<String, Tensor<B, 1>>,
        fill: &Tensor<B, 1>,
        device: &B::Device,
    ) -> Option<Tensor<B, 1>> {
        if !self.slots.iter().any(|s| values.contains_key(&s.name)) {
            return None;
        }
        let mut parts: HashMap<String, Tensor<B, 1>> = self
            .slots
            .iter()
            .map(|s| {
                let v = values.remove(&s.name);
                (s.name.clone(), v.unwrap_or_else(|| fill.clone().slice(s.range())))
            })
            .collect();
        self.gather(&mut parts, device)
    }

    /// Each slot's part of `buf` (views, no copies where the offsets are aligned).
    fn scatter(&self, buf: &Tensor<B, 1>, out: &mut BTreeMap<String, Tensor<B, 1>>) {
        for slot in &self.slots {
            let t = if slot.len == self.len {
                buf.clone()
            } else {
                buf.clone().slice(slot.range())
            };
            out.insert(slot.name.clone(), t);
        }
    }

    /// Each slot's part of a host copy of a buffer, flat or in the parameter's shape.
    fn scatter_host(&self, values: &[f32], prefix: &str, shaped: bool, out: &mut HostTensors) {
        for slot in &self.slots {
            let v = values[slot.range()].to_vec();
            let shape = if shaped {
                slot.shape.clone()
            } else {
                vec![slot.len]
            };
            out.insert(format!("{prefix}{}", slot.name), (shape, v));
        }
    }
}

/// The optimizer; `B` is the inner (non-autodiff) backend.
#[derive(Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Steps taken (the `t` of the bias correction).
    pub step: u64,
    master_weights: bool,
    grouping: Grouping,
    /// Laid out at the first step (or when a checkpoint is loaded).
    groups: Vec<Group<B>>,
    /// Averages the gradients over the ranks of a multi-process run.
    dist: crate::dist::Dist,
}

/// Exponential moving average of the weights (f32), updated after each optimizer step with
/// decay `min(decay, (1+n)/(10+n))` after `n` updates, so that early averages are not dominated by
/// the random initialisation. The averages live in the optimizer's groups
/// ([`AdamW::ema_values`]); `pending` holds values restored from a checkpoint until then.
#[derive(Clone)]
pub struct Ema<B: Backend> {
    pub decay: f64,
    pub updates: u64,
    pub pending: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Ema<B> {
    pub fn new(decay: f64) -> Self {
        Ema {
            decay,
            updates: 0,
            pending: BTreeMap::new(),
        }
    }

    /// The decay used for the next update.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }
}

/// The optimizer's buffers on the host ([`AdamW::host_copy`]).
pub struct HostCopy {
    /// The f32 weights (the master copy with bf16), by name, in the parameters' shapes.
    pub weights: HostTensors,
    /// The moving averages, likewise, once there are any.
    pub ema: Option<HostTensors>,
    /// What [`AdamW::to_host`] returns: moments and (bf16) master weights, flat.
    pub state: HostTensors,
}

/// What a step measured, still on the device (read it back only when needed).
pub struct StepStats<B: Backend> {
    /// Global gradient norm before clipping, shape `[1]`.
    pub grad_norm: Tensor<B, 1>,
}

/// Every float parameter of `module` in module order, with its value flat in f32.
fn param_values<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamInfo, Tensor<B, 1>)> {
    let mut values = collect_flat(module);
    param_info(module)
        .into_iter()
        .map(|p| {
            let v = values
                .remove(&p.name)
                .expect("collect_flat visits the same parameters");
            (p, v)
        })
        .collect()
}

impl<B: Backend> AdamW<B> {
    /// Flat groups: each parameter a view of its group's buffers.
    pub fn new(config: AdamWConfig, master_weights: bool) -> Self {
        Self::with_grouping(config, master_weights, Grouping::Flat)
    }

    pub fn with_grouping(config: AdamWConfig, master_weights: bool, grouping: Grouping) -> Self {
        AdamW {
            config,
            step: 0,
            master_weights,
            grouping,
            groups: Vec::new(),
            dist: crate::dist::Dist::solo(),
        }
    }

    /// Averages each step's gradients over the ranks of `dist` (in f32, one collective per
    /// parameter group) before the norm, clipping and the update, so that every rank takes the
    /// step one rank would take with the whole global batch.
    pub fn set_dist(&mut self, dist: crate::dist::Dist) {
        self.dist = dist;
    }

    pub fn has_master_weights(&self) -> bool {
        self.master_weights
    }

    /// Lays out the groups over `params`, with zero moments.
    fn lay_out(&mut self, params: Vec<(ParamInfo, Tensor<B, 1>)>) {
        self.groups.clear();
        let mut keys: Vec<(bool, FloatDType)> = Vec::new();
        let mut members: Vec<Vec<(ParamInfo, Tensor<B, 1>)>> = Vec::new();
        for p in params {
            let key = (p.0.decay, p.0.dtype);
            match (self.grouping, keys.iter().position(|k| *k == key)) {
                (Grouping::Flat, Some(i)) => members[i].push(p),
                _ => {
                    keys.push(key);
                    members.push(vec![p]);
                }
            }
        }
        for ((weight_decay, dtype), ps) in keys.into_iter().zip(members) {
            let single = ps.len() == 1;
            let mut slots = Vec::with_capacity(ps.len());
            let mut len = 0;
            for (info, value) in &ps {
                let n = value.shape().num_elements();
                slots.push(Slot {
                    name: info.name.clone(),
                    shape: info.shape.clone(),
                    offset: len,
                    len: n,
                });
                len += if single { n } else { n.next_multiple_of(ALIGN) };
            }
            let device = ps[0].1.device();
            let zeros = || Tensor::zeros([len], (&device, DType::F32));
            let mut values: HashMap<String, Tensor<B, 1>> =
                ps.into_iter().map(|(info, value)| (info.name, value)).collect();
            let mut group = Group {
                slots,
                len,
                weight_decay,
                dtype,
                weights: Tensor::empty([0], &device),
                m: zeros(),
                v: zeros(),
                ema: None,
            };
            group.weights = group
                .gather(&mut values, &device)
                .expect("a group has parameters");
            self.groups.push(group);
        }
    }

    /// One AdamW step on every parameter that has a gradient (with flat groups, a parameter
    /// without one takes a zero gradient: its moments decay and its weights keep moving).
    pub fn step<AB, M>(
        &mut self,
        model: M,
        mut grads: GradientsParams,
        lr: f64,
        clip: Option<f64>,
        mut ema: Option<&mut Ema<B>>,
    ) -> Result<(M, StepStats<B>)>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if self.groups.is_empty() {
            self.lay_out(param_values(&model.valid()));
        }
        let device = self.groups[0].weights.device();
        let mut named = take_grads::<AB, M>(&model, &mut grads);
        let mut gathered: Vec<Option<Tensor<B, 1>>> = self
            .groups
            .iter()
            .map(|g| g.gather(&mut named, &device))
            .collect();
        if self.dist.world() > 1 || self.dist.uses_nccl() {
            for g in gathered.iter_mut() {
                if let Some(t) = g.take() {
                    *g = Some(self.dist.mean(to_f32(t))?);
                }
            }
        }
        let grad_norm = gathered
            .iter()
            .flatten()
            .map(|g| to_f32(g.clone()).square().sum())
            .reduce(|a, b| a + b)
            .map_or_else(|| Tensor::zeros([1], (&device, DType::F32)), Tensor::sqrt);
        let coef =
            clip.map(|max| (grad_norm.clone().add_scalar(1e-6).recip().mul_scalar(max)).clamp_max(1.0));
        self.step += 1;
        let t = self.step as i32;
        let c = self.config;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let ema_decay = ema.as_ref().map(|e| e.current_decay());
        let mut restored = ema
            .as_mut()
            .map(|e| std::mem::take(&mut e.pending))
            .unwrap_or_default();
        let mut updated = BTreeMap::new();
        for (group, g) in self.groups.iter_mut().zip(gathered) {
            let Some(g) = g else { continue };
            let mut g = to_f32(g);
            if let Some(coef) = &coef {
                g = g.mul(coef.clone());
            }
            group.m = group.m.clone().mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
            group.v = group.v.clone().mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2);
            let update = group
                .m
                .clone()
                .div_scalar(bias1)
                .div(group.v.clone().div_scalar(bias2).sqrt().add_scalar(c.eps));
            let mut w = group.weights.clone();
            if group.weight_decay && c.weight_decay > 0.0 {
                w = w.mul_scalar(1.0 - lr * c.weight_decay);
            }
            group.weights = w - update.mul_scalar(lr);
            if let Some(decay) = ema_decay {
                let w = group.weights.clone();
                let previous = group
                    .ema
                    .take()
                    .or_else(|| group.restore(&mut restored, &w, &device));
                group.ema = Some(match previous {
                    Some(e) => e.mul_scalar(decay) + w.mul_scalar(1.0 - decay),
                    None => w,
                });
            }
            group.scatter(&cast(group.weights.clone(), group.dtype), &mut updated);
        }
        if let Some(e) = ema {
            e.updates += 1;
        }
        let model = model.map(&mut SetParams::<AB> {
            path: PathStack::default(),
            values: updated,
            _b: std::marker::PhantomData,
        });
        Ok((model, StepStats { grad_norm }))
    }

    /// The f32 master copy of each parameter (bf16 training), or `None`.
    pub fn master_weights(&self) -> Option<BTreeMap<String, Tensor<B, 1>>> {
        (self.master_weights && !self.groups.is_empty()).then(|| self.named(|g| Some(&g.weights)))
    }

    /// The moving averages by parameter name: those of the groups, else the ones restored into
    /// `ema` and not yet laid out.
    pub fn ema_values(&self, ema: &Ema<B>) -> BTreeMap<String, Tensor<B, 1>> {
        if self.groups.iter().any(|g| g.ema.is_some()) {
            self.named(|g| g.ema.as_ref())
        } else {
            ema.pending.clone()
        }
    }

    fn named(&self, buf: impl Fn(&Group<B>) -> Option<&Tensor<B, 1>>) -> BTreeMap<String, Tensor<B, 1>> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            if let Some(b) = buf(g) {
                g.scatter(b, &mut out);
            }
        }
        out
    }

    /// The state as named host tensors: `m/NAME`, `v/NAME` and (bf16) `master/NAME`.
    pub fn to_host(&self) -> Result<HostTensors> {
        Ok(self.host_copy(false)?.map(|c| c.state).unwrap_or_default())
    }

    /// What a checkpoint needs, each group buffer read from the device once; `None` before the
    /// first step (no buffers yet). `with_ema` also reads the moving averages (if any yet).
    pub fn host_copy(&self, with_ema: bool) -> Result<Option<HostCopy>> {
        if self.groups.is_empty() {
            return Ok(None);
        }
        let read = |t: &Tensor<B, 1>| crate::io::to_host(t.clone()).map(|(_, v)| v);
        let mut ema = (with_ema && self.groups.iter().all(|g| g.ema.is_some())).then(BTreeMap::new);
        let mut copy = HostCopy {
            weights: BTreeMap::new(),
            ema: None,
            state: BTreeMap::new(),
        };
        for g in &self.groups {
            let w = read(&g.weights)?;
            g.scatter_host(&w, "", true, &mut copy.weights);
            if self.master_weights {
                g.scatter_host(&w, "master/", false, &mut copy.state);
            }
            g.scatter_host(&read(&g.m)?, "m/", false, &mut copy.state);
            g.scatter_host(&read(&g.v)?, "v/", false, &mut copy.state);
            if let (Some(out), Some(e)) = (ema.as_mut(), &g.ema) {
                g.scatter_host(&read(e)?, "", true, out);
            }
        }
        copy.ema = ema;
        Ok(Some(copy))
    }

    /// Restores the state written by [`AdamW::to_host`] for the parameters of `model` (the step
    /// count comes separately). Parameters the state lacks start with zero moments.
    pub fn load_host<M: Module<B>>(&mut self, model: &M, tensors: HostTensors, step: u64) -> Result<()> {
        let mut state: [BTreeMap<String, Vec<f32>>; 3] = Default::default();
        for (key, (_, values)) in tensors {
            let (kind, name) = key.split_once('/').context("malformed optimizer state name")?;
            let i = match kind {
                "m" => 0,
                "v" => 1,
                "master" => 2,
                other => bail!("unknown optimizer state kind '{other}'"),
            };
            state[i].insert(name.to_string(), values);
        }
        if state[0].len() != state[1].len() {
            bail!(
                "optimizer state has {} first moments but {} second moments",
                state[0].len(),
                state[1].len()
            );
        }
        let params = param_values(model);
        for (i, kind) in ["m", "v", "master"].iter().enumerate() {
            if let Some(name) = state[i]
                .keys()
                .find(|n| !params.iter().any(|(p, _)| &p.name == *n))
            {
                bail!("the optimizer state has {kind}/{name}, a parameter this model does not have");
            }
        }
        if let Some(name) = state[0].keys().find(|n| !state[1].contains_key(*n)) {
            bail!("optimizer state lacks v/{name}");
        }
        self.lay_out(params);
        for g in &mut self.groups {
            let device = g.weights.device();
            for (i, buf) in [&mut g.m, &mut g.v, &mut g.weights].into_iter().enumerate() {
                if !g.slots.iter().any(|s| state[i].contains_key(&s.name)) {
                    continue;
                }
                let mut host = crate::io::to_host(buf.clone())?.1;
                for s in &g.slots {
                    if let Some(v) = state[i].get(&s.name) {
                        ensure!(
                            v.len() == s.len,
                            "optimizer state for {} has {} values, the parameter has {}",
                            s.name,
                            v.len(),
                            s.len
                        );
                        host[s.range()].copy_from_slice(v);
                    }
                }
                *buf = Tensor::from_data(TensorData::new(host, [g.len]), (&device, DType::F32));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Takes each parameter's gradient out of `grads`, flat and by name.
fn take_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: &mut GradientsParams,
) -> HashMap<String, Tensor<AB::InnerBackend, 1>> {
    struct V<'a, AB: AutodiffBackend> {
        path: PathStack,
        grads: &'a mut GradientsParams,
        out: HashMap<String, Tensor<AB::InnerBackend, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for V<'_, AB> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.remove::<AB::InnerBackend, D>(param.id) {
                let n = g.shape().num_elements();
                self.out.insert(self.path.name(), g.reshape([n]));
            }
        }
    }
    let mut v = V::<AB> {
        path: PathStack::default(),
        grads,
        out: HashMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Replaces each parameter that has a new (flat) value, keeping it trainable.
struct SetParams<AB: AutodiffBackend> {
    path: PathStack,
    values: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
    _b: std::marker::PhantomData<AB>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for SetParams<AB> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        match self.values.remove(&self.path.name()) {
            Some(v) => {
                let new = v.reshape(tensor.shape());
                Param::from_mapped_value(id, Tensor::from_inner(new).require_grad(), mapper)
            }
            None => Param::from_mapped_value(id, tensor, mapper),
        }
    }
}
