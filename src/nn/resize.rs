//! Resizing channels-last grids (`B×H×W×C`) as PyTorch's `F.interpolate` and
//! `AdaptiveAvgPool2d` do, which the segmentation heads are defined with.
//!
//! Each of these maps is separable: output row `i` is a fixed weighted sum of input rows, and the
//! same for columns. So a resize is two matrix products with small host-built matrices
//! ([`resize_matrix`]), which runs on every backend, differentiates through autodiff for free and
//! lands on cuBLAS on the GPU. The matrices follow PyTorch's index rules exactly (half-pixel
//! centres for bilinear with `align_corners=False`, `floor(i·in/out)` for nearest, and
//! `[floor(i·in/out), ceil((i+1)·in/out))` windows for adaptive pooling); the tests check them
//! against a direct per-pixel loop and against PyTorch's outputs.

use burn::prelude::*;
use burn::tensor::TensorData;

/// How output samples are taken from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Bilinear, `align_corners=False` (mmseg's `resize` and `Upsample`).
    Bilinear,
    /// Nearest, PyTorch's legacy `mode='nearest'` (FPN's top-down path).
    Nearest,
    /// The mean of each adaptive window (`AdaptiveAvgPool2d`).
    AdaptiveAverage,
}

/// `out×inp` weights: row `i` says how output sample `i` mixes the input samples.
pub fn resize_matrix(inp: usize, out: usize, mode: Resample) -> Vec<f32> {
    assert!(inp > 0 && out > 0, "resize between empty sizes ({inp} → {out})");
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let row = &mut m[i * inp..(i + 1) * inp];
        match mode {
            Resample::Bilinear => {
                let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                let l1 = (src - i0 as f64) as f32;
                row[i0] += 1.0 - l1;
                row[i1] += l1;
            }
            Resample::Nearest => row[((i as f64 * scale).floor() as usize).min(inp - 1)] = 1.0,
            Resample::AdaptiveAverage => {
                let start = (i * inp) / out;
                let end = ((i + 1) * inp).div_ceil(out);
                let w = 1.0 / (end - start) as f32;
                row[start..end].iter_mut().for_each(|v| *v = w);
            }
        }
    }
    m
}

/// `x` (`B×H×W×C`) resized to `(height, width)`.
pub fn resize<B: Backend>(x: Tensor<B, 4>, (height, width): (usize, usize), mode: Resample) -> Tensor<B, 4> {
    let [b, h, w, c] = x.dims();
    if (h, w) == (height, width) && mode != Resample::AdaptiveAverage {
        return x;
    }
    let device = x.device();
    let dtype = x.dtype();
    let matrix = |inp, out| {
        let data = TensorData::new(resize_matrix(inp, out, mode), [out, inp]);
        Tensor::<B, 2>::from_data(data, &device)
            .cast(dtype)
            .unsqueeze_dim::<3>(0)
    };
    // Rows: (height×h) · (h × w·c) per image; then columns: (width×w) · (w × c) per image row.
    let y = if height == h {
        x.reshape([b, h, w * c])
    } else {
        matrix(h, height).matmul(x.reshape([b, h, w * c]))
    };
    let y = y.reshape([b * height, w, c]);
    let y = if width == w { y } else { matrix(w, width).matmul(y) };
    y.reshape([b, height, width, c])
}

/// [`resize`] sample by sample: the plain path the products must equal.
pub fn resize_reference(
    x: &[f32],
    [b, h, w, c]: [usize; 4],
    (height, width): (usize, usize),
    mode: Resample,
) -> Vec<f32> {
    let (mh, mw) = (resize_matrix(h, height, mode), resize_matrix(w, width, mode));
    let mut out = vec![0f32; b * height * width * c];
    for n in 0..b {
        for i in 0..height {
            for j in 0..width {
                for y in 0..h {
                    for xx in 0..w {
                        let weight = mh[i * h + y] * mw[j * w + xx];
                        if weight == 0.0 {
                            continue;
                        }
                        let src = ((n * h + y) * w + xx) * c;
                        let dst = ((n * height + i) * width + j) * c;
                        for k in 0..c {
                            out[dst + k] += weight * x[src + k];
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = crate::backend::Cpu;

    /// PyTorch's rules on hand-checked cases.
    #[test]
    fn matrices_follow_pytorch_index_rules() {
        // 2 → 4 bilinear, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25.
        let m = resize_matrix(2, 4, Resample::Bilinear);
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
        // 4 → 2 nearest: inputs 0 and 2.
        assert_eq!(
            resize_matrix(4, 2, Resample::Nearest),
            vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        );
        // 5 → 3 adaptive: windows [0,2), [1,4), [3,5).
        let a = resize_matrix(5, 3, Resample::AdaptiveAverage);
        let third = 1.0 / 3.0;
        assert_eq!(&a[0..5], &[0.5, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!(&a[5..10], &[0.0, third, third, third, 0.0]);
        assert_eq!(&a[10..15], &[0.0, 0.0, 0.0, 0.5, 0.5]);
        for mode in [Resample::Bilinear, Resample::Nearest, Resample::AdaptiveAverage] {
            for (i, o) in [(7, 13), (13, 7), (5, 1), (1, 5), (6, 6)] {
                let m = resize_matrix(i, o, mode);
                for row in m.chunks(i) {
                    let s: f32 = row.iter().sum();
                    assert!((s - 1.0).abs() < 1e-6, "{mode:?} {i}→{o}: a row sums to {s}");
                }
            }
        }
    }

    /// The two products equal the per-sample loop, up and down, in both directions at once.
    #[test]
    fn products_equal_the_reference() {
        let device = Default::default();
        let shape = [2, 7, 5, 3];
        let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let host = x.to_data().to_vec::<f32>().unwrap();
        for mode in [Resample::Bilinear, Resample::Nearest, Resample::AdaptiveAverage] {
            for size in [(13, 4), (3, 11), (14, 10), (7, 5), (1, 1), (6, 6)] {
                let got = resize(x.clone(), size, mode).to_data().to_vec::<f32>().unwrap();
                let want = resize_reference(&host, shape, size, mode);
                assert_eq!(got.len(), want.len());
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{mode:?} to {size:?}: max error {err}");
            }
        }
    }
}
