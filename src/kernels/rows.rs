//! Building blocks of the row-wise kernels (LayerNorm, softmax): a row of `c` values, loaded as
//! `c / N` vectors of `N` values (16 bytes where the device reads that much at once), is spread
//! over [`LANES`] threads (vector `lane + 32·i` in the thread's registers), [`ROWS`] rows per cube,
//! and its sums and maxima are shared-memory trees (portable: no plane operations, which WebGPU
//! may lack).

use cubecl::prelude::*;

/// Threads per row.
pub const LANES: usize = 32;
/// Rows per cube.
pub const ROWS: usize = 8;
/// The widest row the row kernels take; wider rows go to the reference path. Each thread keeps
/// its share of a row in registers with the loops unrolled, so a row of 65,536 f32 values (GCNet's
/// context softmax over every token of VVT-Tiny's first stage at 1024²) makes a kernel of 512
/// unrolled steps: its check took 8 minutes on WebGPU on the CPU, and GCNet's 768² and 1024² bench
/// rows did not finish within a minute on the H200. Rows of 16,384 (512²) ran on the H200.
pub const MAX_WIDTH: usize = 16_384;

/// The sum of `value` over the [`LANES`] threads of row slot `slot`. Every thread of the cube
/// must call it (it synchronises the cube).
#[cube]
pub fn row_sum(sums: &mut SharedMemory<f32>, value: f32, lane: usize, slot: usize) -> f32 {
    row_reduce(sums, value, lane, slot, false)
}

/// The maximum of `value` over the threads of row slot `slot` (as [`row_sum`]).
#[cube]
pub fn row_max(sums: &mut SharedMemory<f32>, value: f32, lane: usize, slot: usize) -> f32 {
    row_reduce(sums, value, lane, slot, true)
}

#[cube]
fn row_reduce(
    sums: &mut SharedMemory<f32>,
    value: f32,
    lane: usize,
    slot: usize,
    #[comptime] max: bool,
) -> f32 {
    let base = slot * comptime!(LANES);
    sums[base + lane] = value;
    sync_cube();
    fold(sums, base, lane, 16usize, max);
    fold(sums, base, lane, 8usize, max);
    fold(sums, base, lane, 4usize, max);
    fold(sums, base, lane, 2usize, max);
    fold(sums, base, lane, 1usize, max);
    let total = sums[base];
    sync_cube();
    total
}

/// One step of the tree: lane `l < stride` takes in lane `l + stride`.
#[cube]
fn fold(
    sums: &mut SharedMemory<f32>,
    base: usize,
    lane: usize,
    #[comptime] stride: usize,
    #[comptime] max: bool,
) {
    if lane < stride {
        let other = sums[base + lane + stride];
        if max {
            sums[base + lane] = f32::max(sums[base + lane], other);
        } else {
            sums[base + lane] += other;
        }
    }
    sync_cube();
}

/// Cubes of [`ROWS`] rows × [`LANES`] threads; more than 65,535 cubes spill into a second axis
/// (WebGPU's limit per axis), which `CUBE_POS` counts through. Rows past the last must still take
/// part in the cube's synchronisations.
pub fn row_launch(rows: usize) -> (CubeCount, CubeDim) {
    let cubes = rows.div_ceil(ROWS) as u32;
    let count = if cubes <= 65_535 {
        CubeCount::Static(cubes, 1, 1)
    } else {
        CubeCount::Static(65_535, cubes.div_ceil(65_535), 1)
    };
    (count, CubeDim::new_2d(LANES as u32, ROWS as u32))
}

/// This thread's vectors of `row` (`cv` vectors of `N` values each) in f32, `fill` past the row's
/// end or past the last row.
#[cube]
pub fn load_vectors_or<E: Float, N: Size>(
    t: &Tensor<Vector<E, N>>,
    row: usize,
    live: bool,
    lane: usize,
    fill: f32,
    #[comptime] cv: usize,
    #[comptime] per: usize,
) -> Array<Vector<f32, N>> {
    let mut v = Array::<Vector<f32, N>>::new(per);
    #[unroll]
    for i in 0..per {
        let at = lane + i * comptime!(LANES);
        let mut value = Vector::<f32, N>::new(fill);
        if live && at < cv {
            value = Vector::<f32, N>::cast_from(t[row * cv + at]);
        }
        v[i] = value;
    }
    v
}

/// Writes this thread's vectors of `row` (as [`load_vectors_or`] spreads them), cast to `E`.
#[cube]
pub fn store_vectors<E: Float, N: Size>(
    t: &mut Tensor<Vector<E, N>>,
    values: &Array<Vector<f32, N>>,
    row: usize,
    live: bool,
    lane: usize,
    #[comptime] cv: usize,
    #[comptime] per: usize,
) {
    #[unroll]
    for i in 0..per {
        let at = lane + i * comptime!(LANES);
        if live && at < cv {
            t[row * cv + at] = Vector::<E, N>::cast_from(values[i]);
        }
    }
}

/// The sum of a vector's values.
#[cube]
pub fn vector_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let n = v.size().comptime();
    let mut s = f32::new(0.0);
    if comptime!(n > 1) {
        #[unroll]
        for j in 0..n {
            s += v[j];
        }
    } else {
        s = f32::cast_from(v);
    }
    s
}

/// The largest of a vector's values.
#[cube]
pub fn vector_max<N: Size>(v: Vector<f32, N>) -> f32 {
    let n = v.size().comptime();
    let mut m = f32::new(-3.0e38);
    if comptime!(n > 1) {
        #[unroll]
        for j in 0..n {
            m = f32::max(m, v[j]);
        }
    } else {
        m = f32::cast_from(v);
    }
    m
}
