//! The optimizer's gather of many 1-D tensors (the gradients of one parameter group) into one flat
//! buffer, each at its offset, zeros between them.
//!
//! Reference path: a zero buffer and one `slice_assign` per tensor, a launch per parameter (~190 in
//! a vvt_tiny training step, where each launch costs the host's device threads; docs/BENCH.md,
//! session 11). The fused path is one launch: a row of cubes per tensor, which also writes the
//! zeros up to the next tensor's offset.

use burn::prelude::*;

/// `parts[i]` at `offsets[i]` of a `len`-long buffer, zeros elsewhere. The offsets start at 0 and
/// grow, each part ending at or before the next offset (the last within `len`).
pub fn concat_flat<B: Backend>(parts: Vec<Tensor<B, 1>>, offsets: &[usize], len: usize) -> Tensor<B, 1> {
    if super::enabled("concat") {
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

    use crate::kernels::cube::{ManyOp, dense, empty};

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
