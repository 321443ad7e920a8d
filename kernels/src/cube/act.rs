//! The gated MLP's activation in one kernel: `silu(g) · u = g / (1 + e^(−g)) · u` (SwiGLU,
//! Shazeer, arXiv 2002.05202), where burn's tensor operations issue three launches.
//!
//! ```
//! use arbor_kernels::cube::act::silu_mul;
//! use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use cubecl::prelude::*;
//!
//! let client = WgpuRuntime::client(&WgpuDevice::default());
//! let g = client.create_from_slice(f32::as_bytes(&[0.0, 2.0]));
//! let u = client.create_from_slice(f32::as_bytes(&[5.0, 3.0]));
//! let y = silu_mul(&client, &g, &u, 2).unwrap();
//! let y = f32::from_bytes(&client.read_one(y).unwrap()).to_vec();
//! assert_eq!(y[0], 0.0);
//! assert!((y[1] - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
//! ```

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;

/// Units per cube.
const UNITS: u32 = 256;

/// `y[i] = g[i] / (1 + exp(−g[i])) · u[i]` for `i < len`: unit per value.
#[cube(launch)]
fn silu_mul_values(g: &Array<f32>, u: &Array<f32>, y: &mut Array<f32>, len: u32) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        let x = g[i];
        y[i] = x / (1.0 + (-x).exp()) * u[i];
    }
}

/// `silu(g) · u` over `len` f32 values of `g` and `u` into a new buffer.
///
/// # Errors
/// [`KernelError::Shape`] for `len == 0`, more values than one launch takes, or buffers
/// smaller than `len` values (as allocated: a buffer's size is rounded up to the allocator's
/// alignment).
pub fn silu_mul<R: Runtime>(
    client: &ComputeClient<R>,
    g: &Handle,
    u: &Handle,
    len: usize,
) -> Result<Handle, KernelError> {
    let cubes = len.div_ceil(UNITS as usize);
    let (Ok(len32), Ok(cubes32)) = (u32::try_from(len), i32::try_from(cubes)) else {
        return Err(KernelError::Shape(format!(
            "silu·up of {len} values: too many"
        )));
    };
    if len == 0 || g.size() < (len * 4) as u64 || u.size() < (len * 4) as u64 {
        return Err(KernelError::Shape(format!(
            "silu·up of {len} values over buffers of {} and {} bytes",
            g.size(),
            u.size()
        )));
    }
    let y = client.empty(len * 4);
    // SAFETY: `g`, `u` and `y` hold `len` floats (checked above); units past `len` write
    // nothing.
    unsafe {
        silu_mul_values::launch::<R>(
            client,
            CubeCount::Static(cubes32 as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(g.clone(), len),
            ArrayArg::from_raw_parts(u.clone(), len),
            ArrayArg::from_raw_parts(y.clone(), len),
            len32,
        );
    }
    Ok(y)
}
