//! Softmax attention for inference through CubeCL's flash-attention kernels (`cubek`, which Burn
//! 0.21 ships but calls only with autotuning on): the `N×N` scores are never written, which is
//! what LSAGT's first global layer (1,024 tokens, four query heads per key/value head) spends its
//! time on. Forward only: Burn's autodiff has no flash backward, so training keeps the reference
//! path (and so does every backend without the kernels). Opt-in: on the H100 it is slower than the
//! composed path (session 10: lsagt_cifar_tiny b128 inference 3,030 against 5,370 img/s).

use super::softmax::softmax_scaled;
use burn::prelude::*;

/// `softmax(q·kᵀ/√d)·v` over `[batch, heads, tokens, d]` inputs (keys and values have the same
/// token count; queries may have another).
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    check(&q, &k, &v);
    if super::enabled("flash_attention") && !B::ad_enabled(&q.device()) {
        match fused(q, k, v) {
            Ok(y) => y,
            Err((q, k, v)) => attention_reference(q, k, v),
        }
    } else {
        attention_reference(q, k, v)
    }
}

fn check<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) {
    let ([qb, qh, _, qd], [kb, kh, kn, kd], [vb, vh, vn, _]) = (q.dims(), k.dims(), v.dims());
    assert!(
        (qb, qh, qd) == (kb, kh, kd) && (kb, kh, kn) == (vb, vh, vn),
        "attention: queries {:?}, keys {:?} and values {:?} do not fit",
        q.dims(),
        k.dims(),
        v.dims()
    );
}

/// The flash kernel, or the inputs back when this backend has none.
#[allow(clippy::type_complexity)]
pub fn fused<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    check(&q, &k, &v);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        match super::cube::run::<B, _, 3>(&cube::Flash, [primitive(q), primitive(k), primitive(v)]) {
            Ok(y) => Ok(tensor(y)),
            Err([q, k, v]) => Err((tensor(q), tensor(k), tensor(v))),
        }
    }
    #[cfg(not(feature = "kernels"))]
    Err((q, k, v))
}

/// Composed tensor ops: the scores, a softmax over the keys (the fused row kernel where the
/// backend has it, [`super::softmax`]), the weighted values.
pub fn attention_reference<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    check(&q, &k, &v);
    let d = q.dims()[3];
    softmax_scaled(q.matmul(k.swap_dims(2, 3)), (d as f64).powf(-0.5)).matmul(v)
}

/// Which kernel the last fused call ran (`vicinity check-kernels` reports it): the flash kernels
/// can refuse a shape or a device, and the call then falls back to Burn's composed attention.
pub fn last_strategy() -> &'static str {
    #[cfg(feature = "kernels")]
    {
        cube::last_strategy()
    }
    #[cfg(not(feature = "kernels"))]
    {
        "none"
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use std::sync::atomic::{AtomicU8, Ordering};

    use burn::tensor::Shape;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
    use burn_cubecl::kernel::attention::{AttentionStrategy, attention};
    use burn_cubecl::tensor::CubeTensor;

    use crate::kernels::cube::{FusedOp, dense};

    const NAMES: [&str; 4] = [
        "none",
        "flash (tensor cores)",
        "flash (units)",
        "composed (fallback)",
    ];
    static LAST: AtomicU8 = AtomicU8::new(0);

    pub fn last_strategy() -> &'static str {
        NAMES[LAST.load(Ordering::Relaxed) as usize]
    }

    #[derive(Clone, Debug)]
    pub struct Flash;

    impl FusedOp<3> for Flash {
        fn output_shape(&self, [q, _, v]: &[Shape; 3]) -> Shape {
            Shape::new([q[0], q[1], q[2], v[3]])
        }

        fn forward<R: CubeRuntime>(&self, [q, k, v]: [CubeTensor<R>; 3]) -> CubeTensor<R> {
            let dtype = q.dtype;
            let (q, k, v) = (dense(q, dtype), dense(k, dtype), dense(v, dtype));
            let strategies = [
                (
                    1,
                    AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
                        num_planes: 4,
                        seq_q: 1,
                        seq_kv: 1,
                    }),
                ),
                (2, AttentionStrategy::FlashUnit),
            ];
            for (id, strategy) in strategies {
                let run = attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                    strategy,
                );
                if let Ok(out) = run {
                    LAST.store(id, Ordering::Relaxed);
                    return out;
                }
            }
            LAST.store(3, Ordering::Relaxed);
            attention(
                q,
                k,
                v,
                None,
                None,
                AttentionModuleOptions::default(),
                AttentionStrategy::Fallback,
            )
            .expect("the composed attention runs on every CubeCL backend")
        }

        fn backward<R: CubeRuntime>(
            &self,
            _: [CubeTensor<R>; 3],
            _: CubeTensor<R>,
            _: [bool; 3],
        ) -> [Option<CubeTensor<R>>; 3] {
            unreachable!("flash attention is used for inference only (kernels::flash_attention::attention)")
        }
    }
}
