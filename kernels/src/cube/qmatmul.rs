//! Quantized matmul in CubeCL: `y = x · Wᵀ` with `W` held as affine groups of 4- or 8-bit
//! codes, `w = scale · code + min` per group.
//!
//! Every GGUF block format Arbor reads is affine per group: Q8_0, Q4_0 and Q5_0 are
//! `d · (q − offset)`, Q4_1 and Q5_1 `d · q + m`, Q4_K and Q5_K `d·sc · q − dmin·m` per 32,
//! Q6_K `d·sc · (q − 32)` per 16. [`AffineGroups::from_blocks`] reads each group's scale and
//! minimum from the block header and recovers the codes from the reference dequantization
//! (`(w − min) / scale`, exact up to rounding), so the bit layouts are decoded in one place
//! ([`crate::quant`]). 4-bit formats keep 4-bit codes; 5- and 6-bit ones are stored in bytes.
//!
//! The kernel runs one cube per (output column, row); its units split the row's groups and
//! reduce through shared memory. Per group it needs only `Σ x·code` and `Σ x`:
//! `Σ x·w = scale · Σ x·code + min · Σ x`.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;
use crate::qmatmul::QuantMatrix;
use crate::quant::{GgmlType, half, scale_min_k4};

/// Units per cube (they split a row's groups).
const UNITS: u32 = 32;

/// Weights as affine groups, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineGroups {
    /// Bits per code: 4 or 8.
    pub bits: u32,
    /// Weights per group: 16 or 32.
    pub group: usize,
    /// Codes packed little-end first, `32 / bits` per word, row-major `[n, k]`.
    pub codes: Vec<u32>,
    /// Per group (`[n, k / group]`), the scale.
    pub scale: Vec<f32>,
    /// Per group, the minimum (the weight of code 0).
    pub min: Vec<f32>,
}

impl AffineGroups {
    /// Repacks `w`'s blocks.
    ///
    /// # Errors
    /// [`KernelError::UnsupportedType`] for float weights (F32, F16, BF16 have no groups).
    pub fn from_blocks(w: &QuantMatrix) -> Result<Self, KernelError> {
        use GgmlType as T;
        let ty = w.ty();
        let (bits, group) = match ty {
            T::Q4_0 | T::Q4_1 | T::Q4_K => (4, 32),
            T::Q5_0 | T::Q5_1 | T::Q8_0 | T::Q5_K => (8, 32),
            T::Q6_K => (8, 16),
            other => {
                return Err(KernelError::UnsupportedType(format!(
                    "{other:?} weights on the GPU matmul (float weights use burn's matmul)"
                )));
            }
        };
        let (bs, bb) = (ty.block_size(), ty.block_bytes());
        let mut scale = Vec::with_capacity(w.n() * w.k() / group);
        let mut min = Vec::with_capacity(scale.capacity());
        for block in w.raw().chunks_exact(bb) {
            let per = bs / group;
            for j in 0..per {
                let (s, m) = match ty {
                    T::Q4_0 => (half(block, 0), -8.0 * half(block, 0)),
                    T::Q5_0 => (half(block, 0), -16.0 * half(block, 0)),
                    T::Q8_0 => (half(block, 0), -128.0 * half(block, 0)),
                    T::Q4_1 | T::Q5_1 => (half(block, 0), half(block, 2)),
                    T::Q4_K | T::Q5_K => {
                        let (sc, mn) = scale_min_k4(j, &block[4..16]);
                        (half(block, 0) * sc, -half(block, 2) * mn)
                    }
                    // Q6_K: the 16 signed scales sit at byte 192, d at 208.
                    _ => {
                        let s = half(block, 208) * f32::from(block[192 + j] as i8);
                        (s, -32.0 * s)
                    }
                };
                scale.push(s);
                min.push(m);
            }
        }
        let values = w.dequantize();
        let per_word = (32 / bits) as usize;
        let mut codes = vec![0u32; values.len() / per_word];
        let top = (1u32 << bits) - 1;
        for (i, &y) in values.iter().enumerate() {
            let (s, m) = (scale[i / group], min[i / group]);
            let code = if s == 0.0 {
                0
            } else {
                ((y - m) / s).round().clamp(0.0, top as f32) as u32
            };
            codes[i / per_word] |= code << (bits as usize * (i % per_word));
        }
        Ok(Self {
            bits,
            group,
            codes,
            scale,
            min,
        })
    }

    /// The weights these groups hold, `[n, k]` (the kernel's arithmetic, for tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let per_word = (32 / self.bits) as usize;
        let mask = (1u32 << self.bits) - 1;
        (0..self.codes.len() * per_word)
            .map(|i| {
                let code =
                    (self.codes[i / per_word] >> (self.bits as usize * (i % per_word))) & mask;
                self.scale[i / self.group] * code as f32 + self.min[i / self.group]
            })
            .collect()
    }
}

/// `y[r, j] = Σ_k x[r, k] · w[j, k]`: cube `(j, r)`, [`UNITS`] units over the groups.
#[cube(launch)]
fn affine_matmul(
    x: &Array<f32>,
    codes: &Array<u32>,
    scale: &Array<f32>,
    min: &Array<f32>,
    y: &mut Array<f32>,
    k: u32,
    n: u32,
    #[comptime] bits: u32,
    #[comptime] group: u32,
) {
    let j = CUBE_POS_X as usize;
    let r = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let k = k as usize;
    let per_word = comptime!((32 / bits) as usize);
    let words = comptime!((group / (32 / bits)) as usize);
    let group = comptime!(group as usize);
    let mask = comptime!((1u32 << bits) - 1);
    let groups = k / group;
    let mut acc = 0.0f32;
    let mut g = u;
    while g < groups {
        let mut dot = 0.0f32;
        let mut sum = 0.0f32;
        let base = r * k + g * group;
        #[unroll]
        for w in 0..words {
            let word = codes[(j * groups + g) * words + w];
            #[unroll]
            for t in 0..per_word {
                let code = f32::cast_from((word >> comptime!((t * bits as usize) as u32)) & mask);
                let xv = x[base + w * per_word + t];
                dot += xv * code;
                sum += xv;
            }
        }
        acc += scale[j * groups + g] * dot + min[j * groups + g] * sum;
        g += UNITS as usize;
    }
    let mut partial = SharedMemory::<f32>::new(UNITS as usize);
    partial[u] = acc;
    sync_cube();
    if u == 0 {
        let mut total = 0.0f32;
        for t in 0..UNITS as usize {
            total += partial[t];
        }
        y[r * n as usize + j] = total;
    }
}

/// Quantized weights on a CubeCL device.
pub struct CubeQuantMatrix<R: Runtime> {
    client: ComputeClient<R>,
    codes: Handle,
    scale: Handle,
    min: Handle,
    n: usize,
    k: usize,
    bits: u32,
    group: usize,
    bytes: usize,
}

impl<R: Runtime> std::fmt::Debug for CubeQuantMatrix<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubeQuantMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bits", &self.bits)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> CubeQuantMatrix<R> {
    /// Repacks `w` ([`AffineGroups`]) and uploads it.
    ///
    /// # Errors
    /// As [`AffineGroups::from_blocks`].
    pub fn upload(client: &ComputeClient<R>, w: &QuantMatrix) -> Result<Self, KernelError> {
        let a = AffineGroups::from_blocks(w)?;
        Ok(Self {
            client: client.clone(),
            codes: client.create_from_slice(u32::as_bytes(&a.codes)),
            scale: client.create_from_slice(f32::as_bytes(&a.scale)),
            min: client.create_from_slice(f32::as_bytes(&a.min)),
            n: w.n(),
            k: w.k(),
            bits: a.bits,
            group: a.group,
            bytes: 4 * (a.codes.len() + a.scale.len() + a.min.len()),
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `y = x · Wᵀ` for `m` rows of `x` (`[m, k]` f32 on the device); returns `[m, n]`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `m` is 0 or too many rows for one launch.
    pub fn matmul(&self, x: &Handle, m: usize) -> Result<Handle, KernelError> {
        if m == 0 || m > u16::MAX as usize {
            return Err(KernelError::Shape(format!("{m} rows for a GPU matmul")));
        }
        let y = self.client.empty(m * self.n * 4);
        // SAFETY: every handle holds exactly the elements given with it.
        unsafe {
            affine_matmul::launch::<R>(
                &self.client,
                CubeCount::Static(self.n as u32, m as u32, 1),
                CubeDim::new_1d(UNITS),
                ArrayArg::from_raw_parts(x.clone(), m * self.k),
                ArrayArg::from_raw_parts(
                    self.codes.clone(),
                    self.n * self.k * self.bits as usize / 32,
                ),
                ArrayArg::from_raw_parts(self.scale.clone(), self.n * self.k / self.group),
                ArrayArg::from_raw_parts(self.min.clone(), self.n * self.k / self.group),
                ArrayArg::from_raw_parts(y.clone(), m * self.n),
                self.k as u32,
                self.n as u32,
                self.bits,
                self.group as u32,
            );
        }
        Ok(y)
    }

    /// [`CubeQuantMatrix::matmul`] from and to host memory (`x`: `[m, k]`).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `x` is not `m × k`.
    pub fn matmul_host(&self, x: &[f32], m: usize) -> Result<Vec<f32>, KernelError> {
        if x.len() != m * self.k {
            return Err(KernelError::Shape(format!(
                "{} activations for {m} rows of {}",
                x.len(),
                self.k
            )));
        }
        let xh = self.client.create_from_slice(f32::as_bytes(x));
        let y = self.matmul(&xh, m)?;
        Ok(f32::from_bytes(&self.client.read_one_unchecked(y)).to_vec())
    }
}
