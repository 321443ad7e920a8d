//! Rotary position embedding (RoFormer, arXiv 2104.09864) in one kernel: every pair of a
//! row rotated by its token's angle, in the half-split layout (channel `i` with
//! `i + head_dim/2`, as HF Llama and Qwen2 and `arbor_model`'s `RopeAngles`).
//!
//! Written with burn's tensor operations, a rotation of q or k is ten launches (two slices,
//! four products, a difference, a sum, and a concatenation's two slice-assigns); here it is
//! one. A forward of Qwen2.5-1.5B on the CUDA backend issued ~1 570 launches, 560 of them
//! for RoPE (README, "A dry run without a GPU").
//!
//! The angles come from the caller as cosines and sines per token (`[batch][n][head_dim/2]`),
//! so arbitrary positions — tree nodes at one depth share theirs — cost nothing here.
//!
//! ```
//! use arbor_kernels::cube::rope::rope;
//! use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use cubecl::prelude::*;
//!
//! let client = WgpuRuntime::client(&WgpuDevice::default());
//! // One head of 4 channels, one token at angle π/2: (x1, x2) → (−x2, x1) per pair.
//! let x = client.create_from_slice(f32::as_bytes(&[1.0, 2.0, 3.0, 4.0]));
//! let cos = client.create_from_slice(f32::as_bytes(&[0.0, 0.0]));
//! let sin = client.create_from_slice(f32::as_bytes(&[1.0, 1.0]));
//! let y = rope(&client, &x, (&cos, &sin), [1, 1, 1, 4]).unwrap();
//! let y = f32::from_bytes(&client.read_one(y).unwrap()).to_vec();
//! assert_eq!(y, [-3.0, -4.0, 1.0, 2.0]);
//! ```

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;

/// The widest head the kernel takes (one unit per pair: 256 units).
pub const MAX_HEAD_DIM: usize = 512;

/// `y = rope(x)` for rows `[batch][heads][n][head_dim]` and angles `[batch][n][head_dim/2]`:
/// cube `(token, head, batch)`, unit = pair.
#[cube(launch)]
fn rope_rows(
    x: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    y: &mut Array<f32>,
    heads: u32,
    n: u32,
    #[comptime] head_dim: u32,
) {
    let t = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let i = UNIT_POS_X as usize;
    let half = comptime!((head_dim / 2) as usize);
    let n = n as usize;
    let row = ((b * heads as usize + h) * n + t) * comptime!(head_dim as usize);
    let at = (b * n + t) * half + i;
    let (c, s) = (cos[at], sin[at]);
    let (x1, x2) = (x[row + i], x[row + half + i]);
    y[row + i] = x1 * c - x2 * s;
    y[row + half + i] = x2 * c + x1 * s;
}

/// Rotates `x` (`[batch, heads, n, head_dim]` f32, contiguous) by the angles whose cosines and
/// sines are `cos`, `sin` (`[batch, n, head_dim / 2]` f32) into a new buffer of `x`'s shape.
///
/// # Errors
/// [`KernelError::Shape`] for an empty shape, an odd `head_dim` or one over
/// [`MAX_HEAD_DIM`], or buffers smaller than the shape says (as allocated: a buffer's size
/// is rounded up to the allocator's alignment).
pub fn rope<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    (cos, sin): (&Handle, &Handle),
    [batch, heads, n, head_dim]: [usize; 4],
) -> Result<Handle, KernelError> {
    let half = head_dim / 2;
    if batch == 0
        || heads == 0
        || n == 0
        || half == 0
        || head_dim % 2 == 1
        || head_dim > MAX_HEAD_DIM
    {
        return Err(KernelError::Shape(format!(
            "rope of [{batch}, {heads}, {n}, {head_dim}]: every size > 0, head_dim even \
             and at most {MAX_HEAD_DIM}"
        )));
    }
    let (rows, angles) = (batch * heads * n * head_dim, batch * n * half);
    let short = |what: &str, h: &Handle, floats: usize| {
        (h.size() < (floats * 4) as u64).then(|| {
            KernelError::Shape(format!(
                "rope: {what} holds {} bytes, [{batch}, {heads}, {n}, {head_dim}] needs {}",
                h.size(),
                floats * 4
            ))
        })
    };
    if let Some(e) = short("x", x, rows)
        .or_else(|| short("cos", cos, angles))
        .or_else(|| short("sin", sin, angles))
    {
        return Err(e);
    }
    // Tokens along x (up to 2³¹ − 1 cubes), heads and batch along y and z (65 535 at most).
    let (Ok(n32), Ok(h32), Ok(b32)) = (
        i32::try_from(n).map(|v| v as u32),
        u16::try_from(heads).map(u32::from),
        u16::try_from(batch).map(u32::from),
    ) else {
        return Err(KernelError::Shape(format!(
            "rope of [{batch}, {heads}, {n}, {head_dim}]: more cubes than a launch takes"
        )));
    };
    let y = client.empty(rows * 4);
    // SAFETY: `x` and `y` hold `rows` floats and `cos`, `sin` `angles` (checked above); the
    // kernel indexes below those bounds for every cube and unit of this launch.
    unsafe {
        rope_rows::launch::<R>(
            client,
            CubeCount::Static(n32, h32, b32),
            CubeDim::new_1d(half as u32),
            ArrayArg::from_raw_parts(x.clone(), rows),
            ArrayArg::from_raw_parts(cos.clone(), angles),
            ArrayArg::from_raw_parts(sin.clone(), angles),
            ArrayArg::from_raw_parts(y.clone(), rows),
            h32,
            n32,
            head_dim as u32,
        );
    }
    Ok(y)
}
