//! Stochastic depth (drop-path) for every residual branch of a forward pass at once.

use burn::prelude::*;
use burn::tensor::Distribution;

/// Stochastic depth's keep-and-rescale factors for one forward pass, drawn and computed in a few
/// launches for every residual branch at once (a draw per branch took two to four launches each:
/// ~56 of a lsagt_cifar_tiny b128 training step, whose host launches set its pace). Row `i` holds
/// branch `i`'s factors: `1/keep` for a kept sample, `0` for a dropped one.
pub struct DropPathNoise<B: Backend> {
    /// `branches·pitch` factors (row-major), or `None` when nothing drops.
    scales: Option<Tensor<B, 1>>,
    rates: Vec<f64>,
    batch: usize,
    pitch: usize,
    next: usize,
}

impl<B: Backend> DropPathNoise<B> {
    /// The factors for a batch of `batch` images and one residual branch per entry of `rates`
    /// (the drop probabilities in `[0, 1)`, in the order the branches run). Nothing is drawn
    /// outside training (autodiff backends) or when no rate is positive.
    pub fn new(batch: usize, rates: Vec<f64>, device: &B::Device) -> Self {
        assert!(
            rates.iter().all(|r| (0.0..1.0).contains(r)),
            "drop_path: rates must be in [0, 1), got {rates:?}"
        );
        // Rows 256 values apart: each row is then a view of the factors rather than a copy (the
        // CUDA backend binds views at 512-byte boundaries).
        let pitch = batch.next_multiple_of(256);
        let drops = rates.iter().any(|&r| r > 0.0);
        let scales = (drops && B::ad_enabled(device)).then(|| {
            let n = rates.len();
            let keep: Vec<f32> = rates.iter().map(|&r| (1.0 - r) as f32).collect();
            let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [n, 1]), device).expand([n, pitch]);
            let u = Tensor::<B, 2>::random([n, pitch], Distribution::Uniform(0.0, 1.0), device);
            let kept = u.lower(keep.clone()).float();
            (kept * keep.recip()).reshape([n * pitch])
        });
        Self {
            scales,
            rates,
            batch,
            pitch,
            next: 0,
        }
    }

    /// The next branch's factors (`batch`), if it drops.
    fn next_row(&mut self) -> Option<Tensor<B, 1>> {
        let i = self.next;
        self.next += 1;
        let rate = *self.rates.get(i).unwrap_or_else(|| {
            panic!(
                "drop_path: branch {i} past the {} the noise was drawn for",
                self.rates.len()
            )
        });
        let start = i * self.pitch;
        let scales = self.scales.as_ref()?;
        (rate > 0.0).then(|| scales.clone().slice(start..start + self.batch))
    }
}

/// Stochastic depth: in training (autodiff backends) drops the residual branch per sample with
/// the probability `noise` was drawn with for it, and rescales the kept ones; the identity
/// otherwise. Each call takes the next branch of `noise`.
pub fn drop_path<B: Backend, const D: usize>(x: Tensor<B, D>, noise: &mut DropPathNoise<B>) -> Tensor<B, D> {
    let Some(scale) = noise.next_row() else {
        return x;
    };
    let batch = x.dims()[0];
    assert_eq!(
        batch, noise.batch,
        "drop_path: noise drawn for another batch size"
    );
    let mut shape = [1; D];
    shape[0] = batch;
    x * scale.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    type Cpu = crate::backend::Cpu;
    type Train = burn::backend::Autodiff<Cpu>;

    /// Each row's value (both of a row's values are checked to be equal).
    fn rows(y: Tensor<Train, 2>) -> Vec<f32> {
        let v = y.into_data().to_vec::<f32>().unwrap();
        v.chunks(2)
            .map(|r| {
                assert_eq!(r[0], r[1], "a sample is dropped or kept whole");
                r[0]
            })
            .collect()
    }

    #[test]
    fn drop_path_drops_samples_at_its_rate() {
        let device = Default::default();
        let batch = 4000;
        let x = Tensor::<Train, 2>::ones([batch, 2], &device);
        let rates = [0.25, 0.0, 0.25, 0.5];
        let mut noise = DropPathNoise::new(batch, rates.to_vec(), &device);
        let draws: Vec<Vec<f32>> = rates
            .iter()
            .map(|_| rows(drop_path(x.clone(), &mut noise)))
            .collect();
        for (d, rate) in draws.iter().zip(rates) {
            let keep = 1.0 - rate;
            let kept = d.iter().filter(|&&v| v != 0.0).count() as f64 / batch as f64;
            assert!((kept - keep).abs() < 0.03, "kept {kept}, expected {keep}");
            assert!(
                d.iter()
                    .all(|&v| v == 0.0 || (v as f64 - 1.0 / keep).abs() < 1e-6),
                "kept samples are rescaled by 1/keep"
            );
        }
        let same = draws[0].iter().zip(&draws[2]).filter(|(a, b)| a == b).count();
        assert!(same < batch * 3 / 4, "each branch has its own row of noise");
        // Not training: the identity, and no draw.
        let mut none = DropPathNoise::<Cpu>::new(batch, vec![0.5], &device);
        assert!(none.scales.is_none());
        let x = Tensor::<Cpu, 2>::ones([3, 2], &device);
        assert_eq!(drop_path(x.clone(), &mut none).into_data(), x.into_data());
    }

    #[test]
    #[should_panic(expected = "branch 2 past the 2 the noise was drawn for")]
    fn drop_path_names_a_branch_the_noise_was_not_drawn_for() {
        let device = Default::default();
        let x = Tensor::<Train, 2>::ones([4, 2], &device);
        let mut noise = DropPathNoise::new(4, vec![0.1, 0.2], &device);
        for _ in 0..3 {
            let _ = drop_path(x.clone(), &mut noise);
        }
    }
}
