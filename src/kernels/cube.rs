//! How a fused kernel reaches the CubeCL backends: a [`FusedOp`] works on `CubeTensor`s; the
//! [`FusedBackend`] impls carry it through Burn's fusion streams and autodiff graph; [`run`]
//! recognises the concrete backend behind a generic `B`.

use std::any::{Any, TypeId};
use std::fmt::Debug;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{ComputeClient, CubeCount, CubeDim};
use std::marker::PhantomData;

/// A fused operation: `N` float inputs, one output. Its backward gets the same inputs back (the
/// kernels recompute what they need rather than keep intermediates alive).
pub trait FusedOp<const N: usize>: Clone + Debug + Send + Sync + 'static {
    /// The output's shape (its dtype is the first input's).
    fn output_shape(&self, inputs: &[Shape; N]) -> Shape;

    fn forward<R: CubeRuntime>(&self, inputs: [CubeTensor<R>; N]) -> CubeTensor<R>;

    /// Gradients of the inputs whose `wanted` flag is set.
    fn backward<R: CubeRuntime>(
        &self,
        inputs: [CubeTensor<R>; N],
        grad: CubeTensor<R>,
        wanted: [bool; N],
    ) -> [Option<CubeTensor<R>>; N];
}

// ---- host-side helpers shared by the kernels ----

/// Burn's tensor ops on any CubeCL runtime (they follow each tensor's own dtype).
pub type TensorOps<R> = CubeBackend<R, f32, i32, u8>;

/// `t` in `dtype`: cast only when it differs.
pub fn cast<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype {
        t
    } else {
        TensorOps::<R>::float_cast(t, dtype.into())
    }
}

/// `t` in `dtype`, densely laid out, as the kernels index it (bf16 runs keep f32 master weights).
pub fn dense<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    into_contiguous(cast(t, dtype))
}

/// A new dense tensor on `like`'s device. (burn-cubecl's `empty_device_dtype` may pitch rows on
/// CUDA, which the kernels' flat indexing would get wrong.)
pub fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: impl Into<Shape>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape.into(), dtype)
}

/// The widest vector (values per load) the device reads at once for `dtype` that divides every
/// length in `divides` (a row's length, offsets into it), so that no vector straddles two rows.
pub fn vector_width<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, divides: &[usize]) -> usize {
    client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|&n| divides.iter().all(|d| d % n == 0))
        .max()
        .unwrap_or(1)
}

/// Cube count and size for one thread per item.
pub fn launch_dims<R: CubeRuntime>(client: &ComputeClient<R>, threads: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, threads);
    (calculate_cube_count_elemwise(client, threads, cube_dim), cube_dim)
}

/// A backend a [`FusedOp`] runs on.
pub trait FusedBackend: Backend {
    fn fused<Op: FusedOp<N>, const N: usize>(op: &Op, inputs: [FloatTensor<Self>; N]) -> FloatTensor<Self>;

    fn fused_backward<Op: FusedOp<N>, const N: usize>(
        op: &Op,
        inputs: [FloatTensor<Self>; N],
        grad: FloatTensor<Self>,
        wanted: [bool; N],
    ) -> [Option<FloatTensor<Self>>; N];
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedBackend
    for CubeBackend<R, F, I, BT>
{
    fn fused<Op: FusedOp<N>, const N: usize>(op: &Op, inputs: [FloatTensor<Self>; N]) -> FloatTensor<Self> {
        op.forward(inputs)
    }

    fn fused_backward<Op: FusedOp<N>, const N: usize>(
        op: &Op,
        inputs: [FloatTensor<Self>; N],
        grad: FloatTensor<Self>,
        wanted: [bool; N],
    ) -> [Option<FloatTensor<Self>>; N] {
        op.backward(inputs, grad, wanted)
    }
}

/// A fused op's forward or backward queued in a fusion stream like any other operation, so that
/// it runs in stream order with the operations around it.
#[derive(Debug)]
struct FusionCall<B, Op, const N: usize> {
    desc: CustomOpIr,
    op: Op,
    /// `None`: the forward (inputs → output); `Some(wanted)`: the backward (inputs, output
    /// gradient → the wanted input gradients, in order).
    backward: Option<[bool; N]>,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedBackend, Op: FusedOp<N>, const N: usize> Operation<B::FusionRuntime>
    for FusionCall<B, Op, N>
{
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let inputs: [FloatTensor<B>; N] =
            std::array::from_fn(|i| handles.get_float_tensor::<B>(&self.desc.inputs[i]));
        match self.backward {
            None => {
                let out = B::fused(&self.op, inputs);
                handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
            }
            Some(wanted) => {
                let grad = handles.get_float_tensor::<B>(&self.desc.inputs[N]);
                let grads = B::fused_backward(&self.op, inputs, grad, wanted);
                for (g, out) in grads.into_iter().flatten().zip(&self.desc.outputs) {
                    handles.register_float_tensor::<B>(&out.id, g);
                }
            }
        }
    }
}

/// Queues `call` on the stream of `inputs`, with outputs of the given shapes and dtypes.
fn queue<B: FusionBackend + FusedBackend, Op: FusedOp<N>, const N: usize>(
    op: &Op,
    inputs: Vec<FloatTensor<Fusion<B>>>,
    outputs: Vec<(Shape, DType)>,
    backward: Option<[bool; N]>,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let outputs: Vec<_> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let desc = CustomOpIr::new(std::any::type_name::<Op>(), &inputs, &outputs);
    let call = FusionCall::<B, Op, N> {
        desc: desc.clone(),
        op: op.clone(),
        backward,
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), call)
}

impl<B: FusionBackend + FusedBackend> FusedBackend for Fusion<B> {
    fn fused<Op: FusedOp<N>, const N: usize>(op: &Op, inputs: [FloatTensor<Self>; N]) -> FloatTensor<Self> {
        let shapes = inputs.each_ref().map(|t| t.shape.clone());
        let out = (op.output_shape(&shapes), inputs[0].dtype);
        queue::<B, Op, N>(op, inputs.into(), vec![out], None)
            .pop()
            .expect("one output")
    }

    fn fused_backward<Op: FusedOp<N>, const N: usize>(
        op: &Op,
        inputs: [FloatTensor<Self>; N],
        grad: FloatTensor<Self>,
        wanted: [bool; N],
    ) -> [Option<FloatTensor<Self>>; N] {
        let outputs = inputs
            .iter()
            .zip(wanted)
            .filter(|(_, w)| *w)
            .map(|(t, _)| (t.shape.clone(), t.dtype))
            .collect();
        let mut all: Vec<_> = inputs.into();
        all.push(grad);
        let mut grads = queue::<B, Op, N>(op, all, outputs, Some(wanted)).into_iter();
        wanted.map(|w| if w { grads.next() } else { None })
    }
}

/// The autodiff node of a fused op: keeps the inputs, calls the op's backward.
#[derive(Debug)]
struct FusedNode<Op>(Op);

impl<B: FusedBackend, Op: FusedOp<N>, const N: usize> Backward<B, N> for FusedNode<Op> {
    type State = [NodeId; N];

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let inputs = ops
            .state
            .map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let input_grads = B::fused_backward(&self.0, inputs, grad, wanted);
        for (parent, g) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn fused<Op: FusedOp<N>, const N: usize>(op: &Op, inputs: [FloatTensor<Self>; N]) -> FloatTensor<Self> {
        let nodes = inputs.each_ref().map(|t| t.node.clone());
        match FusedNode(op.clone())
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = inputs.each_ref().map(|t| prep.checkpoint(t));
                prep.finish(state, B::fused(op, inputs.map(|t| t.primitive)))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused(op, inputs.map(|t| t.primitive))),
        }
    }

    fn fused_backward<Op: FusedOp<N>, const N: usize>(
        _op: &Op,
        _inputs: [FloatTensor<Self>; N],
        _grad: FloatTensor<Self>,
        _wanted: [bool; N],
    ) -> [Option<FloatTensor<Self>>; N] {
        unimplemented!("second-order gradients of the fused kernels")
    }
}

/// Moves `a` into a `T` when they are the same type (checked by the callers with `TypeId`).
pub(crate) fn same<A: 'static, T: 'static>(a: A) -> T {
    let mut slot = Some(a);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
        .expect("cast between identical types")
}

/// Calls `$then!(K)` for every concrete backend type `K` the fused kernels know in this build.
macro_rules! for_each_backend {
    ($then:ident) => {
        #[cfg(feature = "cuda")]
        {
            for_each_wrapper!($then, CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>);
            for_each_wrapper!($then, CubeBackend<cubecl::cuda::CudaRuntime, burn::tensor::bf16, i32, u8>);
        }
        #[cfg(feature = "wgpu")]
        for_each_wrapper!($then, CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>);
    };
}

/// `$then!` on a CubeCL backend, plain, fused and under autodiff.
macro_rules! for_each_wrapper {
    ($then:ident, $k:ty) => {
        $then!($k);
        $then!(Fusion<$k>);
        $then!(Autodiff<$k>);
        $then!(Autodiff<Fusion<$k>>);
    };
}

/// Whether `B` is one of the backends [`run`] handles.
pub fn supports<B: Backend>() -> bool {
    macro_rules! check {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                return true;
            }
        };
    }
    for_each_backend!(check);
    false
}

/// Runs `op` if `B` is a CubeCL backend this build knows; hands the inputs back otherwise.
pub fn run<B: Backend, Op: FusedOp<N>, const N: usize>(
    op: &Op,
    inputs: [FloatTensor<B>; N],
) -> Result<FloatTensor<B>, [FloatTensor<B>; N]> {
    macro_rules! attempt {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                let inputs = inputs.map(same::<FloatTensor<B>, FloatTensor<$k>>);
                return Ok(same(<$k as FusedBackend>::fused(op, inputs)));
            }
        };
    }
    for_each_backend!(attempt);
    Err(inputs)
}

/// A forward-only operation over any number of float inputs, one output (the optimizer's gather
/// of every gradient into one flat buffer). No autodiff: it runs on the inner backends.
pub trait ManyOp: Clone + Debug + Send + Sync + 'static {
    /// The output's shape (its dtype is the first input's).
    fn output_shape(&self, inputs: &[Shape]) -> Shape;

    fn forward<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> CubeTensor<R>;
}

/// A backend a [`ManyOp`] runs on: CubeCL's, plain or fused.
pub trait ManyBackend: Backend {
    fn many<Op: ManyOp>(op: &Op, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self>;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ManyBackend
    for CubeBackend<R, F, I, BT>
{
    fn many<Op: ManyOp>(op: &Op, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        op.forward(inputs)
    }
}

/// A [`ManyOp`] queued in a fusion stream.
#[derive(Debug)]
struct FusionMany<B, Op> {
    desc: CustomOpIr,
    op: Op,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + ManyBackend, Op: ManyOp> Operation<B::FusionRuntime> for FusionMany<B, Op> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<B>(t))
            .collect();
        let out = B::many(&self.op, inputs);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

impl<B: FusionBackend + ManyBackend> ManyBackend for Fusion<B> {
    fn many<Op: ManyOp>(op: &Op, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        let client = inputs[0].client.clone();
        let dtype = inputs[0].dtype;
        let shapes: Vec<Shape> = inputs.iter().map(|t| t.shape.clone()).collect();
        let streams = OperationStreams::with_inputs(&inputs);
        let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let out = TensorIr::uninit(client.create_empty_handle(), op.output_shape(&shapes), dtype);
        let desc = CustomOpIr::new(std::any::type_name::<Op>(), &inputs, &[out]);
        let call = FusionMany::<B, Op> {
            desc: desc.clone(),
            op: op.clone(),
            _backend: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), call)
            .pop()
            .expect("one output")
    }
}

/// Runs `op` if `B` is a (non-autodiff) CubeCL backend this build knows; hands the inputs back
/// otherwise.
pub fn run_many<B: Backend, Op: ManyOp>(
    op: &Op,
    inputs: Vec<FloatTensor<B>>,
) -> Result<FloatTensor<B>, Vec<FloatTensor<B>>> {
    macro_rules! attempt {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                let inputs = inputs
                    .into_iter()
                    .map(same::<FloatTensor<B>, FloatTensor<$k>>)
                    .collect();
                return Ok(same(<$k as ManyBackend>::many(op, inputs)));
            }
        };
    }
    macro_rules! plain_and_fused {
        ($k:ty) => {
            attempt!($k);
            attempt!(Fusion<$k>);
        };
    }
    #[cfg(feature = "cuda")]
    {
        plain_and_fused!(CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>);
        plain_and_fused!(CubeBackend<cubecl::cuda::CudaRuntime, burn::tensor::bf16, i32, u8>);
    }
    #[cfg(feature = "wgpu")]
    plain_and_fused!(CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>);
    Err(inputs)
}
