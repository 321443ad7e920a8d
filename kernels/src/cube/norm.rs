//! RMSNorm (Zhang & Sennrich, arXiv 1910.07467) of rows in one kernel: `x / √(mean(x²) + ε) · γ`,
//! as burn's `RmsNorm` computes it, one cube per row.
//!
//! With burn's tensor operations a norm is six launches (a square, a mean's reduction, the
//! `+ ε`, the root, a quotient and the gain); a decoder layer has two. Here it is one.
//!
//! ```
//! use arbor_kernels::cube::norm::rms_norm;
//! use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use cubecl::prelude::*;
//!
//! let client = WgpuRuntime::client(&WgpuDevice::default());
//! // One row (3, 4): mean of squares 12.5; with ε = 0 the row over √12.5, times γ = (1, 2).
//! let x = client.create_from_slice(f32::as_bytes(&[3.0, 4.0]));
//! let gamma = client.create_from_slice(f32::as_bytes(&[1.0, 2.0]));
//! let y = rms_norm(&client, &x, &gamma, 1, 2, 0.0).unwrap();
//! let y = f32::from_bytes(&client.read_one(y).unwrap()).to_vec();
//! let r = 12.5f32.sqrt();
//! assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6);
//! ```

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;

/// Units per row (a power of two: the sum of squares is reduced in halves).
const UNITS: u32 = 256;

/// `y[r] = x[r] / √(mean(x[r]²) + eps) · gamma` for rows of `dim`: cube per row, [`UNITS`]
/// units striding over it, the sum of squares reduced in shared memory.
#[cube(launch)]
fn rms_norm_rows(
    x: &Array<f32>,
    gamma: &Array<f32>,
    y: &mut Array<f32>,
    eps: f32,
    #[comptime] dim: u32,
) {
    let units = comptime!(UNITS as usize);
    let d = comptime!(dim as usize);
    let row = CUBE_POS_X as usize * d;
    let u = UNIT_POS_X as usize;
    let mut sums = SharedMemory::<f32>::new(units);
    let mut acc = 0.0f32;
    let mut i = u;
    while i < d {
        let v = x[row + i];
        acc += v * v;
        i += units;
    }
    sums[u] = acc;
    sync_cube();
    // A runtime variable (one set from `units` alone would be a compile-time constant).
    let mut half = 0usize;
    half += units / 2;
    while half > 0 {
        if u < half {
            sums[u] += sums[u + half];
        }
        sync_cube();
        half /= 2;
    }
    let n = f32::new(comptime!(dim as f32));
    let rms = (sums[0] / n + eps).sqrt();
    let mut i = u;
    while i < d {
        y[row + i] = x[row + i] / rms * gamma[i];
        i += units;
    }
}

/// RMSNorm of `rows` rows of `dim` f32 values in `x` (contiguous) with gain `gamma` (`dim`
/// values), into a new buffer of `x`'s shape.
///
/// # Errors
/// [`KernelError::Shape`] for no rows, `dim == 0`, more rows than one launch takes, a
/// negative or non-finite `eps`, or buffers smaller than the shape says (as allocated: a
/// buffer's size is rounded up to the allocator's alignment).
pub fn rms_norm<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    gamma: &Handle,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<Handle, KernelError> {
    let bad = |why: String| {
        Err(KernelError::Shape(format!(
            "RMSNorm of {rows} × {dim}: {why}"
        )))
    };
    let (Ok(rows32), Ok(dim32)) = (i32::try_from(rows), u32::try_from(dim)) else {
        return bad("more than a launch takes".into());
    };
    if rows == 0 || dim == 0 || !(eps.is_finite() && eps >= 0.0) {
        return bad(format!("rows and dim > 0 and a finite ε ≥ 0 (ε = {eps})"));
    }
    for (what, h, floats) in [("x", x, rows * dim), ("gamma", gamma, dim)] {
        if h.size() < (floats * 4) as u64 {
            return bad(format!(
                "{what} holds {} bytes, needs {}",
                h.size(),
                floats * 4
            ));
        }
    }
    let y = client.empty(rows * dim * 4);
    // SAFETY: `x` and `y` hold `rows · dim` floats and `gamma` `dim` (checked above); each
    // cube reads and writes its own row only.
    unsafe {
        rms_norm_rows::launch::<R>(
            client,
            CubeCount::Static(rows32 as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(x.clone(), rows * dim),
            ArrayArg::from_raw_parts(gamma.clone(), dim),
            ArrayArg::from_raw_parts(y.clone(), rows * dim),
            eps,
            dim32,
        );
    }
    Ok(y)
}
