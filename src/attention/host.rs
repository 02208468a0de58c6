//! Host-memory helpers of the attention kinds' loop references.

use burn::prelude::*;

use crate::nn::Linear;

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax_vec(s: &[f32]) -> Vec<f32> {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// A `Linear` copied to host memory: weight `[in, out]` (Burn layout) and bias.
pub struct HostLinear {
    w: Vec<f32>,
    b: Vec<f32>,
    o: usize,
}

impl HostLinear {
    pub fn of<B: Backend>(linear: &Linear<B>) -> Self {
        let [_, o] = linear.weight.dims();
        let b = linear
            .bias
            .as_ref()
            .map(|b| host(b.val()))
            .unwrap_or_else(|| vec![0.0; o]);
        Self {
            w: host(linear.weight.val()),
            b,
            o,
        }
    }

    /// Several layers at once (the loop references copy all of a module's layers).
    pub fn all<B: Backend, const K: usize>(linears: [&Linear<B>; K]) -> [Self; K] {
        linears.map(Self::of)
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = self.b.clone();
        for (i, xi) in x.iter().enumerate() {
            let row = &self.w[i * self.o..(i + 1) * self.o];
            for (yo, wo) in y.iter_mut().zip(row) {
                *yo += xi * wo;
            }
        }
        y
    }
}

/// The Feature Preserving Connection by loops, on one image: `xs` its `n×c` input tokens,
/// `out` the attention's `n×c` output, which becomes `out + out·sigmoid(fc2·relu(fc1·mean(xs)))`.
pub fn fpc_host(fc1: &HostLinear, fc2: &HostLinear, xs: &[f32], out: &mut [f32]) {
    let c = fc2.o;
    let n = xs.len() / c;
    let mut mean = vec![0.0f32; c];
    for row in xs.chunks(c) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / n as f32);
    }
    let hidden: Vec<f32> = fc1.apply(&mean).into_iter().map(|v| v.max(0.0)).collect();
    let gate: Vec<f32> = fc2
        .apply(&hidden)
        .into_iter()
        .map(|v| 1.0 / (1.0 + (-v).exp()))
        .collect();
    for row in out.chunks_mut(c) {
        row.iter_mut().zip(&gate).for_each(|(o, g)| *o += *o * g);
    }
}

/// Softmax attention of one token's queries `q` (`heads` heads of `dh`) over `kv` rows (the keys
/// of `kv_heads` heads, then their values): query head `i` uses key/value head
/// `i / (heads / kv_heads)`, scores scaled by `1/√dh`. The heads' outputs, concatenated.
pub fn attend(q: &[f32], kv: &[Vec<f32>], heads: usize, kv_heads: usize, dh: usize) -> Vec<f32> {
    let g = heads / kv_heads;
    let mut out = vec![0.0f32; heads * dh];
    for hi in 0..heads {
        let kh = hi / g;
        let qh = &q[hi * dh..(hi + 1) * dh];
        let scores: Vec<f32> = kv
            .iter()
            .map(|kvt| dot(qh, &kvt[kh * dh..(kh + 1) * dh]) / (dh as f32).sqrt())
            .collect();
        for (kvt, w) in kv.iter().zip(softmax_vec(&scores)) {
            let v = &kvt[(kv_heads + kh) * dh..(kv_heads + kh + 1) * dh];
            for (o, x) in out[hi * dh..(hi + 1) * dh].iter_mut().zip(v) {
                *o += w * x;
            }
        }
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use burn::prelude::*;
    use burn::tensor::Distribution;

    use crate::nn::Linear;

    type B = burn::backend::Flex;

    /// ‖a − b‖ / ‖b‖.
    pub fn max_rel_err(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let diff: f32 = (a - b.clone()).powi_scalar(2).sum().into_scalar();
        let norm: f32 = b.powi_scalar(2).sum().into_scalar();
        (diff / norm).sqrt()
    }

    /// Random biases too, so that the reference checks also cover them.
    pub fn randomise_biases(layers: [&mut Linear<B>; 3]) {
        for l in layers {
            let [_, o] = l.weight.dims();
            let bias = Tensor::random([o], Distribution::Normal(0.0, 0.5), &l.weight.device());
            l.bias = Some(burn::module::Param::from_tensor(bias));
        }
    }

    // The loop references against the models' forward passes.
    use super::super::{LocalShiftAttention, SoftmaxAttention, SoftmaxAttentionConfig};

    #[test]
    fn local_attention_matches_reference() {
        let device = Default::default();
        for (heads, shared_kv) in [(2, true), (4, true), (2, false), (1, false)] {
            let cfg = SoftmaxAttentionConfig::new(8, heads).with_shared_kv(shared_kv);
            let mut attn: LocalShiftAttention<B> = cfg.init_local(&device);
            randomise_biases([&mut attn.wq, &mut attn.wkv, &mut attn.proj]);
            assert_eq!(attn.wkv.weight.dims(), [8, cfg.kv_dim()]);
            let x = Tensor::<B, 3>::random([2, 5, 8], Distribution::Normal(0.0, 3.0), &device);
            let variants = Tensor::<B, 4>::random([3, 2, 5, 8], Distribution::Normal(0.0, 3.0), &device);
            let fast = attn.forward(x.clone(), variants.clone());
            let slow = attn.forward_reference(x, variants);
            let err = max_rel_err(fast, slow);
            assert!(err < 1e-5, "heads {heads} shared_kv {shared_kv}: rel err {err}");
        }
    }

    #[test]
    fn global_attention_matches_reference() {
        let device = Default::default();
        for (heads, shared_kv) in [(2, true), (4, true), (2, false), (4, false), (1, false)] {
            let cfg = SoftmaxAttentionConfig::new(8, heads).with_shared_kv(shared_kv);
            let mut attn: SoftmaxAttention<B> = cfg.init(&device);
            randomise_biases([&mut attn.wq, &mut attn.wkv, &mut attn.proj]);
            let x = Tensor::<B, 3>::random([2, 7, 8], Distribution::Normal(0.0, 3.0), &device);
            let err = max_rel_err(attn.forward(x.clone()), attn.forward_reference(x));
            assert!(err < 1e-5, "heads {heads} shared_kv {shared_kv}: rel err {err}");
        }
    }
}
