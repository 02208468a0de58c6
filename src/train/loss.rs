//! The training loss: soft-target cross-entropy, computed in f32 whatever the model's dtype.

use burn::prelude::*;

use super::params::to_f32;

/// Soft-target cross-entropy `mean_b(−Σ_k t_bk · log_softmax(logits)_bk)`, computed in f32.
pub fn soft_cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
    let logp = burn::tensor::activation::log_softmax(to_f32(logits), 1);
    (logp * to_f32(targets)).sum_dim(1).mean().neg()
}

/// One-hot rows (`labels.len() × k`).
pub fn one_hot(labels: &[usize], k: usize) -> Vec<f32> {
    let mut t = vec![0.0; labels.len() * k];
    for (i, &y) in labels.iter().enumerate() {
        t[i * k + y] = 1.0;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    /// With one-hot targets it is the usual cross-entropy: `−log softmax(logits)[label]`.
    #[test]
    fn one_hot_targets_give_the_cross_entropy() {
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_floats([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], &device);
        let targets = Tensor::<B, 2>::from_data(TensorData::new(one_hot(&[0, 2], 3), [2, 3]), &device);
        let got: f32 = soft_cross_entropy(logits, targets).into_scalar();
        let ce = |z: [f32; 3], y: usize| {
            let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
            lse - z[y]
        };
        let want = (ce([2.0, 0.0, -1.0], 0) + ce([0.5, 0.5, 3.0], 2)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} against {want}");
    }
}
