//! Fused kernel against reference path on one backend: the output and every input gradient, on
//! random inputs. Used by the tests (WebGPU, on lavapipe in CI) and by `vicinity check-kernels`
//! (the CUDA build on a GPU).

use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;

/// One kernel checked on one shape.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub case: String,
    /// Relative L2 error of the output and of each input gradient: `(what, error)`.
    pub errors: Vec<(&'static str, f32)>,
}

impl KernelCheck {
    pub fn worst(&self) -> f32 {
        self.errors.iter().map(|(_, e)| *e).fold(0.0, f32::max)
    }
}

/// One line per check: kernel, case, then each error.
pub fn table(checks: &[KernelCheck]) -> String {
    let mut out = format!(
        "{:<20} {:<32} errors (relative L2, fused vs reference)\n",
        "kernel", "case"
    );
    for c in checks {
        let errs: Vec<String> = c
            .errors
            .iter()
            .map(|(what, e)| format!("{what} {e:.2e}"))
            .collect();
        out += &format!("{:<20} {:<32} {}\n", c.kernel, c.case, errs.join(", "));
    }
    out
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_err<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let a = a.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    let b = b.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt() as f32
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Every fused kernel on a few shapes. Fails if the backend has no fused kernels (so that a check
/// can never pass by comparing the reference with itself).
pub fn check_all<B: AutodiffBackend>(device: &B::Device) -> anyhow::Result<Vec<KernelCheck>> {
    anyhow::ensure!(
        super::available::<B>(),
        "this backend has no fused kernels (they run on the cuda and wgpu builds)"
    );
    let mut out = Vec::new();
    let timed = |check: &dyn Fn() -> anyhow::Result<KernelCheck>| {
        let start = std::time::Instant::now();
        let c = check()?;
        eprintln!(
            "checked {} {} in {:.1} s",
            c.kernel,
            c.case,
            start.elapsed().as_secs_f64()
        );
        anyhow::Ok(c)
    };
    for (b, h, w, c, k, pad) in [
        (2, 5, 6, 8, 3, 1),
        (3, 7, 7, 40, 3, 1),
        (1, 6, 5, 4, 5, 2),
        (2, 4, 4, 3, 3, 0),
    ] {
        out.push(timed(&|| check_depthwise::<B>([b, h, w, c], k, pad, device))?);
    }
    for (t, heads, kv_heads, head_dim) in [(5, 4, 1, 8), (3, 2, 2, 6), (18, 4, 1, 48), (4, 6, 3, 5)] {
        let h = super::local_attention::LocalHeads {
            heads,
            kv_heads,
            head_dim,
        };
        out.push(timed(&|| check_local_attention::<B>([2, 7], t, h, device))?);
    }
    use crate::attention::vicinity::Locality;
    for (heads, d, q_grid, k_grid, locality, clamp) in [
        (1, 8, (4, 5), (4, 5), Locality::TwoD, true),
        (2, 6, (6, 6), (3, 3), Locality::TwoD, true),
        (3, 4, (3, 5), (3, 5), Locality::OneD, false),
        (2, 5, (5, 4), (5, 4), Locality::None, true),
        (1, 32, (7, 7), (7, 7), Locality::TwoD, false),
        // Enough keys for the reduction to split them into chunks and partial tiles.
        (1, 16, (14, 14), (14, 14), Locality::TwoD, true),
        (2, 64, (9, 9), (9, 9), Locality::TwoD, false),
    ] {
        let cfg = super::vicinity::VicinityCore {
            heads,
            q_grid,
            k_grid,
            locality,
            clamp,
        };
        out.push(timed(&|| check_vicinity::<B>(2, d, cfg, device))?);
    }
    Ok(out)
}

/// Depth-wise convolution: output, input gradient and weight gradient.
pub fn check_depthwise<B: AutodiffBackend>(
    shape: [usize; 4],
    k: usize,
    pad: usize,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use super::depthwise::{depthwise_conv2d_reference, fused};
    let x = random::<B, 4>(shape, device);
    let w = random::<B, 2>([shape[3], k * k], device);
    // A random projection of the output as the loss, so every output value gets its own gradient.
    let [b, h, wd, c] = shape;
    let probe = random::<B, 4>([b, h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k, c], device);

    let run = |fast: bool| -> anyhow::Result<_> {
        let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
        let y = if fast {
            fused(x.clone(), w.clone(), k, pad)
                .map_err(|_| anyhow::anyhow!("the depthwise kernel did not run on this backend"))?
        } else {
            depthwise_conv2d_reference(x.clone(), w.clone(), k, 1, pad)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        let dx = x.grad(&grads).expect("x gradient");
        let dw = w.grad(&grads).expect("w gradient");
        Ok((y.inner(), dx, dw))
    };
    let (y1, dx1, dw1) = run(true)?;
    let (y0, dx0, dw0) = run(false)?;
    Ok(KernelCheck {
        kernel: "depthwise_conv2d",
        case: format!("x {shape:?}, k {k}, pad {pad}"),
        errors: vec![
            ("output", rel_err(y1, y0)),
            ("grad x", rel_err(dx1, dx0)),
            ("grad w", rel_err(dw1, dw0)),
        ],
    })
}

/// LSAGT's local attention: output, query gradient and key/value gradient.
pub fn check_local_attention<B: AutodiffBackend>(
    [b, n]: [usize; 2],
    t: usize,
    h: super::local_attention::LocalHeads,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use super::local_attention::{fused, local_attention_reference};
    let q = random::<B, 3>([b, n, h.heads * h.head_dim], device);
    let kv = random::<B, 4>([t, b, n, 2 * h.kv_heads * h.head_dim], device);
    let probe = random::<B, 3>([b, n, h.heads * h.head_dim], device);
    let run = |fast: bool| -> anyhow::Result<_> {
        let (q, kv) = (q.clone().require_grad(), kv.clone().require_grad());
        let y = if fast {
            fused(q.clone(), kv.clone(), h)
                .map_err(|_| anyhow::anyhow!("the local attention kernel did not run on this backend"))?
        } else {
            local_attention_reference(q.clone(), kv.clone(), h)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        Ok((
            y.inner(),
            q.grad(&grads).expect("q gradient"),
            kv.grad(&grads).expect("kv gradient"),
        ))
    };
    let (y1, dq1, dkv1) = run(true)?;
    let (y0, dq0, dkv0) = run(false)?;
    Ok(KernelCheck {
        kernel: "local_attention",
        case: format!("T {t}, heads {}/{} of {}", h.heads, h.kv_heads, h.head_dim),
        errors: vec![
            ("output", rel_err(y1, y0)),
            ("grad q", rel_err(dq1, dq0)),
            ("grad kv", rel_err(dkv1, dkv0)),
        ],
    })
}

/// The vicinity attention core: output and the gradients of queries, keys and values.
pub fn check_vicinity<B: AutodiffBackend>(
    batch: usize,
    head_dim: usize,
    cfg: super::vicinity::VicinityCore,
    device: &B::Device,
) -> anyhow::Result<KernelCheck> {
    use super::vicinity::{fused, vicinity_core_reference};
    let c = cfg.heads * head_dim;
    let (n, m) = (cfg.q_grid.0 * cfg.q_grid.1, cfg.k_grid.0 * cfg.k_grid.1);
    // Non-negative queries and keys, as after the model's ReLU.
    let q = random::<B, 3>([batch, n, c], device).abs();
    let k = random::<B, 3>([batch, m, c], device).abs();
    let v = random::<B, 3>([batch, m, c], device);
    let probe = random::<B, 3>([batch, n, c], device);
    let run = |fast: bool| -> anyhow::Result<_> {
        let (q, k, v) = (
            q.clone().require_grad(),
            k.clone().require_grad(),
            v.clone().require_grad(),
        );
        let y = if fast {
            fused(q.clone(), k.clone(), v.clone(), cfg)
                .map_err(|_| anyhow::anyhow!("the vicinity kernels did not run on this backend"))?
        } else {
            vicinity_core_reference(q.clone(), k.clone(), v.clone(), cfg)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        Ok((
            y.inner(),
            q.grad(&grads).expect("q gradient"),
            k.grad(&grads).expect("k gradient"),
            v.grad(&grads).expect("v gradient"),
        ))
    };
    let (y1, dq1, dk1, dv1) = run(true)?;
    let (y0, dq0, dk0, dv0) = run(false)?;
    Ok(KernelCheck {
        kernel: "vicinity_core",
        case: format!(
            "{}x{} <- {}x{}, {}x{}, {:?}{}",
            cfg.q_grid.0,
            cfg.q_grid.1,
            cfg.k_grid.0,
            cfg.k_grid.1,
            cfg.heads,
            head_dim,
            cfg.locality,
            if cfg.clamp { ", clamp" } else { "" }
        ),
        errors: vec![
            ("output", rel_err(y1, y0)),
            ("grad q", rel_err(dq1, dq0)),
            ("grad k", rel_err(dk1, dk0)),
            ("grad v", rel_err(dv1, dv0)),
        ],
    })
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;

    type G = burn::backend::Autodiff<burn::backend::Wgpu>;

    #[test]
    fn fused_kernels_match_reference_on_wgpu() {
        let device = Default::default();
        let checks = check_all::<G>(&device).expect("fused kernels run on wgpu");
        assert!(!checks.is_empty());
        eprint!("{}", table(&checks));
        for c in &checks {
            assert!(c.worst() < 1e-4, "{} {}: {:?}", c.kernel, c.case, c.errors);
        }
    }

    #[test]
    fn reference_backends_have_no_fused_kernels() {
        assert!(!crate::kernels::available::<crate::backend::Cpu>());
        assert!(crate::kernels::available::<G>());
        assert!(check_all::<burn::backend::Autodiff<crate::backend::Cpu>>(&Default::default()).is_err());
    }
}
