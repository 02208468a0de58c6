//! Channel dropout of channels-last grids, as PyTorch's `nn.Dropout2d` (what mmseg's decode heads
//! apply before their classifier): each image drops whole channels, not single values.

use burn::prelude::*;
use burn::tensor::Distribution;

/// `Dropout2d(prob)` on `B×H×W×C` grids; the identity outside training (non-autodiff backends).
#[derive(Module, Clone, Debug)]
pub struct Dropout2d {
    pub prob: f64,
}

impl Dropout2d {
    pub fn new(prob: f64) -> Self {
        assert!(
            (0.0..1.0).contains(&prob),
            "Dropout2d: probability {prob} is not in [0, 1)"
        );
        Self { prob }
    }

    pub fn forward<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = x.device();
        if self.prob == 0.0 || !B::ad_enabled(&device) {
            return x;
        }
        let [b, _, _, c] = x.dims();
        let keep = 1.0 - self.prob;
        let mask = Tensor::<B, 4>::random([b, 1, 1, c], Distribution::Bernoulli(keep), &device);
        let dtype = x.dtype();
        x * mask.div_scalar(keep).cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type AB = burn::backend::Autodiff<crate::backend::Cpu>;

    /// In training a channel of an image is either all zero or all scaled by 1/keep; outside
    /// training nothing changes.
    #[test]
    fn drops_whole_channels_in_training_only() {
        let device = Default::default();
        let x = Tensor::<AB, 4>::ones([3, 4, 5, 16], &device);
        let y: Vec<f32> = Dropout2d::new(0.5)
            .forward(x.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let (mut dropped, mut kept) = (0, 0);
        for img in 0..3 {
            for ch in 0..16 {
                let vals: Vec<f32> = (0..20).map(|p| y[(img * 20 + p) * 16 + ch]).collect();
                assert!(
                    vals.iter().all(|&v| v == vals[0]),
                    "channel {ch} of image {img} is mixed: {vals:?}"
                );
                match vals[0] {
                    0.0 => dropped += 1,
                    2.0 => kept += 1,
                    v => panic!("a kept value should be 1/keep = 2, got {v}"),
                }
            }
        }
        assert!(
            dropped > 0 && kept > 0,
            "48 channels at p = 0.5: {dropped} dropped, {kept} kept"
        );
        let plain = Tensor::<crate::backend::Cpu, 4>::ones([1, 2, 2, 3], &device);
        let same: Vec<f32> = Dropout2d::new(0.5).forward(plain).into_data().to_vec().unwrap();
        assert!(same.iter().all(|&v| v == 1.0));
    }
}
