//! The optimizer's gather of many 1-D tensors (the gradients of one parameter group) into one flat
//! buffer, each at its offset, zeros between them; and [`stack`], the same gather as a
//! differentiable stack of same-shaped tensors.
//!
//! Reference path: a zero buffer and one `slice_assign` per tensor, a launch per parameter (~190 in
//! a vvt_tiny training step, where each launch costs the host's device threads). The fused path is one launch: a row of cubes per tensor, which also writes the
//! zeros up to the next tensor's offset.

use burn::prelude::*;

/// `parts[i]` at `offsets[i]` of a `len`-long buffer, zeros elsewhere. The offsets start at 0 and
/// grow, each part ending at or before the next offset (the last within `len`).
pub fn concat_flat<B: Backend>(parts: Vec<Tensor<B, 1>>, offsets: &[usize], len: usize) -> Tensor<B, 1> {
    if super::available::<B>() {
        match fused(parts, offsets, len) {
            Ok(y) => return y,
            Err(parts) => return concat_flat_reference(parts, offsets, len),
        }
    }
    concat_flat_reference(parts, offsets, len)
}

fn check<B: Backend>(parts: &[Tensor<B, 1>], offsets: &[usize], len: usize) {
    assert!(
        !parts.is_empty() && parts.len() == offsets.len() && offsets[0] == 0,
        "concat: {} parts for {} offsets starting at {:?}",
        parts.len(),
        offsets.len(),
        offsets.first()
    );
    let ends = offsets[1..].iter().copied().chain([len]);
    for ((p, &start), end) in parts.iter().zip(offsets).zip(ends) {
        assert!(
            start + p.dims()[0] <= end,
            "concat: a part of {} values at offset {start} overruns the next at {end}",
            p.dims()[0]
        );
    }
}

/// The fused kernel, or the parts back when this backend has none.
pub fn fused<B: Backend>(
    parts: Vec<Tensor<B, 1>>,
    offsets: &[usize],
    len: usize,
) -> Result<Tensor<B, 1>, Vec<Tensor<B, 1>>> {
    check(&parts, offsets, len);
    #[cfg(feature = "kernels")]
    {
        use super::{primitive, tensor};
        let op = cube::Concat {
            offsets: offsets.to_vec(),
            len,
        };
        match super::cube::run_many::<B, _>(&op, parts.into_iter().map(primitive).collect()) {
            Ok(y) => Ok(tensor(y)),
            Err(parts) => Err(parts.into_iter().map(tensor).collect()),
        }
    }
    #[cfg(not(feature = "kernels"))]
    {
        let _ = len;
        Err(parts)
    }
}

/// Same-shaped tensors stacked along a new first axis (`D2 = D + 1`) in one launch, and their
/// gradients in at most one: Burn's `stack` takes a launch per tensor forward and a copy per
/// tensor backward, and LSAGT stacks its variant projections' weights and biases every step
/// (~100 launches of a b128 training step). Burn's autodiff takes a fixed count of
/// inputs, so this runs for the counts LSAGT has (10 and 18 variants); other counts, and
/// backends without the kernel, get the tensors back.
pub fn stack<B: Backend, const D: usize, const D2: usize>(
    ts: Vec<Tensor<B, D>>,
) -> Result<Tensor<B, D2>, Vec<Tensor<B, D>>> {
    assert!(
        D2 == D + 1 && !ts.is_empty() && ts.iter().all(|t| t.dims() == ts[0].dims()),
        "stack: {} tensors of rank {D} into rank {D2}, all of one shape",
        ts.len()
    );
    #[cfg(feature = "kernels")]
    {
        /// `ts` as an array of `N` primitives, stacked by the fused op.
        fn run<B: Backend, const D: usize, const D2: usize, const N: usize>(
            ts: Vec<Tensor<B, D>>,
        ) -> Result<Tensor<B, D2>, Vec<Tensor<B, D>>> {
            use super::{primitive, tensor};
            let inputs: Vec<_> = ts.into_iter().map(primitive).collect();
            let Ok(inputs) = <[_; N]>::try_from(inputs) else {
                unreachable!("the caller matched the count")
            };
            match super::cube::run::<B, _, N>(&cube::Stack, inputs) {
                Ok(y) => Ok(tensor(y)),
                Err(inputs) => Err(inputs.into_iter().map(tensor).collect()),
            }
        }
        match ts.len() {
            10 => run::<B, D, D2, 10>(ts),
            18 => run::<B, D, D2, 18>(ts),
            _ => Err(ts),
        }
    }
    #[cfg(not(feature = "kernels"))]
    Err(ts)
}

/// A zero buffer and one `slice_assign` per part.
pub fn concat_flat_reference<B: Backend>(
    parts: Vec<Tensor<B, 1>>,
    offsets: &[usize],
    len: usize,
) -> Tensor<B, 1> {
    check(&parts, offsets, len);
    let device = parts[0].device();
    let mut buf = Tensor::zeros([len], (&device, parts[0].dtype()));
    for (part, &start) in parts.into_iter().zip(offsets) {
        let n = part.dims()[0];
        buf = buf.slice_assign(start..start + n, part);
    }
    buf
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::Shape;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use crate::kernels::cube::{FusedOp, ManyOp, TensorOps, dense, empty, launch_dims};
    use burn::tensor::Slice;
    use burn::tensor::ops::FloatTensorOps;

    /// Cube row `y` copies part `y` to its offset, then zeros up to the next offset.
    #[cube(launch_unchecked)]
    fn concat_kernel<E: Float>(
        parts: &Sequence<Tensor<E>>,
        starts: &Sequence<usize>,
        ends: &Sequence<usize>,
        out: &mut Tensor<E>,
        #[define(E)] _dtype: StorageType,
    ) {
        let part = CUBE_POS_Y as usize;
        let stride = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
        let n = parts.len().comptime();
        #[unroll]
        for i in 0..n {
            if part == i {
                let input = &parts[i];
                let start = starts[i];
                let span = ends[i] - start;
                let len = input.len();
                let mut p = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
                while p < span {
                    if p < len {
                        out[start + p] = input[p];
                    } else {
                        out[start + p] = E::from_int(0);
                    }
                    p += stride;
                }
            }
        }
    }

    /// The stack's gradient, `N×n`, into rows of `pitch ≥ n` values (so that each row starts
    /// where the device can bind a view of it). One thread per value.
    #[cube(launch_unchecked)]
    fn split_kernel<E: Float>(
        grad: &Tensor<E>,
        out: &mut Tensor<E>,
        #[comptime] n: usize,
        #[comptime] pitch: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= grad.len() {
            terminate!();
        }
        out[(at / n) * pitch + at % n] = grad[at];
    }

    /// [`super::stack`]: forward is [`Concat`] of the flattened inputs; backward hands each input
    /// a view of one buffer of the gradient's rows.
    #[derive(Clone, Debug)]
    pub struct Stack;

    impl<const N: usize> FusedOp<N> for Stack {
        fn output_shape(&self, inputs: &[Shape; N]) -> Shape {
            let mut dims = vec![N];
            dims.extend(inputs[0].iter().copied());
            Shape::from(dims)
        }

        fn forward<R: CubeRuntime>(&self, inputs: [CubeTensor<R>; N]) -> CubeTensor<R> {
            let shape = self.output_shape(&inputs.each_ref().map(|t| t.meta.shape().clone()));
            let n = inputs[0].meta.shape().num_elements();
            let flat: Vec<_> = inputs
                .into_iter()
                .map(|t| TensorOps::<R>::float_reshape(t, Shape::new([n])))
                .collect();
            let concat = Concat {
                offsets: (0..N).map(|i| i * n).collect(),
                len: N * n,
            };
            TensorOps::<R>::float_reshape(concat.forward(flat), shape)
        }

        fn backward<R: CubeRuntime>(
            &self,
            inputs: [CubeTensor<R>; N],
            grad: CubeTensor<R>,
            wanted: [bool; N],
        ) -> [Option<CubeTensor<R>>; N] {
            let dtype = inputs[0].dtype;
            let grad = dense(grad, dtype);
            let n = inputs[0].meta.shape().num_elements();
            // Rows a multiple of the binding alignment apart: views of one buffer, no copies.
            let align = (grad.client.properties().memory.alignment as usize / dtype.size()).max(1);
            let pitch = n.next_multiple_of(align);
            let rows = if pitch == n {
                TensorOps::<R>::float_reshape(grad, Shape::new([N * n]))
            } else {
                let out = empty(&grad, [N * pitch], dtype);
                let (count, dim) = launch_dims(&grad.client, N * n);
                unsafe {
                    split_kernel::launch_unchecked(
                        &grad.client,
                        count,
                        dim,
                        grad.clone().into_tensor_arg(),
                        out.clone().into_tensor_arg(),
                        n,
                        pitch,
                        dtype.into(),
                    )
                };
                out
            };
            std::array::from_fn(|i| {
                wanted[i].then(|| {
                    let start = i * pitch;
                    let row = TensorOps::<R>::float_slice(
                        rows.clone(),
                        &[Slice::new(start as isize, Some((start + n) as isize), 1)],
                    );
                    TensorOps::<R>::float_reshape(row, inputs[i].meta.shape().clone())
                })
            })
        }
    }

    #[derive(Clone, Debug)]
    pub struct Concat {
        pub offsets: Vec<usize>,
        pub len: usize,
    }

    /// Threads per cube, and most cubes per part (each thread strides over its part).
    const THREADS: u32 = 256;
    const CUBES_PER_PART: usize = 64;
    /// Most parts per launch (CUDA takes a kernel's arguments in 32 KiB; vvt_tiny's larger
    /// parameter group has ~130 tensors, measured in one launch on the H100).
    const MAX_PARTS: usize = 256;

    impl ManyOp for Concat {
        fn output_shape(&self, _: &[Shape]) -> Shape {
            Shape::new([self.len])
        }

        fn forward<R: CubeRuntime>(&self, parts: Vec<CubeTensor<R>>) -> CubeTensor<R> {
            let dtype = parts[0].dtype;
            let parts: Vec<_> = parts.into_iter().map(|t| dense(t, dtype)).collect();
            let out = empty(&parts[0], [self.len], dtype);
            let ends = self.offsets[1..].iter().copied().chain([self.len]);
            let spans: Vec<(usize, usize)> = self.offsets.iter().copied().zip(ends).collect();
            let client = out.client.clone();
            // One launch per chunk of parts, within the device's buffer bindings (WebGPU allows
            // a few; besides the parts the kernel binds its output, metadata and scalars).
            let bindings = client.properties().hardware.max_bindings as usize;
            let per_launch = bindings.saturating_sub(3).clamp(1, MAX_PARTS);
            for (chunk, spans) in parts.chunks(per_launch).zip(spans.chunks(per_launch)) {
                let widest = spans.iter().map(|(s, e)| e - s).max().unwrap_or(0);
                let cubes = widest.div_ceil(THREADS as usize).clamp(1, CUBES_PER_PART) as u32;
                let mut args = SequenceArg::new();
                for p in chunk {
                    args.push(p.clone().into_tensor_arg());
                }
                let mut starts = SequenceArg::new();
                let mut stops = SequenceArg::new();
                for (s, e) in spans {
                    starts.push(*s);
                    stops.push(*e);
                }
                unsafe {
                    concat_kernel::launch_unchecked(
                        &client,
                        CubeCount::Static(cubes, chunk.len() as u32, 1),
                        CubeDim::new_1d(THREADS),
                        args,
                        starts,
                        stops,
                        out.clone().into_tensor_arg(),
                        dtype.into(),
                    )
                };
            }
            out
        }
    }
}
