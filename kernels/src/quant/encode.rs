//! Encoders into ggml block formats (Q4_1, Q8_0): for re-quantizing a draft model's weights at load (a
//! draft's precision changes only its acceptance, never the verified output).

use half::f16 as F16;

use super::GgmlType;
use crate::KernelError;

/// `x` encoded as `ty` blocks. Supported: Q4_1 (per 32 values: the minimum `m` and the step
/// `d = (max − min) / 15` as f16, codes `round((x − m) / d)` against the f16-rounded `d` and
/// `m`, clamped to 0..=15; low nibbles hold values 0–15, high nibbles 16–31) and Q8_0 (per 32
/// values the step `max|x| / 127` as f16, codes rounded against it).
///
/// # Errors
/// [`KernelError::UnsupportedType`] for other formats; [`KernelError::Shape`] when `x` does
/// not fill whole blocks or holds a non-finite value.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, KernelError> {
    if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        return Err(KernelError::UnsupportedType(format!(
            "quantizing into {ty:?} (only Q4_1 and Q8_0)"
        )));
    }
    if !x.len().is_multiple_of(32) {
        return Err(KernelError::Shape(format!(
            "{} values do not fill blocks of 32",
            x.len()
        )));
    }
    if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
        return Err(KernelError::Shape(format!("cannot quantize {bad}")));
    }
    if ty == GgmlType::Q8_0 {
        return Ok(q8_0(x));
    }
    let mut out = Vec::with_capacity(x.len() / 32 * 20);
    for block in x.chunks_exact(32) {
        let (lo, hi) = block
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let d = F16::from_f32((hi - lo) / 15.0);
        let m = F16::from_f32(lo);
        let (df, mf) = (d.to_f32(), m.to_f32());
        let code = |v: f32| -> u8 {
            if df == 0.0 {
                return 0;
            }
            ((v - mf) / df).round().clamp(0.0, 15.0) as u8
        };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        for j in 0..16 {
            out.push(code(block[j]) | (code(block[j + 16]) << 4));
        }
    }
    Ok(out)
}

/// Q8_0: per 32 values the step `d = max|x| / 127` as f16 and codes `round(x / d)` against
/// the f16-rounded step, clamped to ±127.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = F16::from_f32(amax / 127.0);
        let df = d.to_f32();
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(block.iter().map(|&v| {
            let q = if df == 0.0 {
                0.0
            } else {
                (v / df).round().clamp(-127.0, 127.0)
            };
            q as i8 as u8
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize;

    #[test]
    fn q4_1_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..32 * 40)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.3) * (1.0 + (i / 32) as f32))
            .collect();
        let q = quantize(GgmlType::Q4_1, &x).unwrap();
        assert_eq!(q.len(), GgmlType::Q4_1.bytes_for(x.len()).unwrap());
        let y = dequantize(GgmlType::Q4_1, &q, x.len()).unwrap();
        for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let (lo, hi) = xb
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, c), &v| (a.min(v), c.max(v)));
            let step = (hi - lo) / 15.0;
            for (i, (a, b2)) in xb.iter().zip(yb).enumerate() {
                // Half a step, plus the f16 rounding of the step (×15) and of the minimum.
                let tol = 0.5 * step + 15.0 * step * 1e-3 + lo.abs() * 1e-3 + 1e-6;
                assert!((a - b2).abs() <= tol, "block {b} value {i}: {a} vs {b2}");
            }
        }
    }

    #[test]
    fn q4_1_values_on_the_grid_are_exact() {
        // Steps of 0.5 from −2: d and m are exact in f16.
        let x: Vec<f32> = (0..32).map(|i| -2.0 + 0.5 * (i % 16) as f32).collect();
        let y = dequantize(GgmlType::Q4_1, &quantize(GgmlType::Q4_1, &x).unwrap(), 32).unwrap();
        assert_eq!(x, y);
        // A constant block (zero step) decodes to its value.
        let c = vec![0.25f32; 32];
        let y = dequantize(GgmlType::Q4_1, &quantize(GgmlType::Q4_1, &c).unwrap(), 32).unwrap();
        assert_eq!(c, y);
    }

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..32 * 20)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i / 32) as f32))
            .collect();
        let q = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(q.len(), GgmlType::Q8_0.bytes_for(x.len()).unwrap());
        let y = dequantize(GgmlType::Q8_0, &q, x.len()).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let step = xb.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b) in xb.iter().zip(yb) {
                // Half a step, plus the f16 rounding of the step (×127).
                assert!(
                    (a - b).abs() <= 0.5 * step + 127.0 * step * 1e-3 + 1e-6,
                    "{a} vs {b}"
                );
            }
        }
        let zero = quantize(GgmlType::Q8_0, &[0.0; 32]).unwrap();
        assert_eq!(
            dequantize(GgmlType::Q8_0, &zero, 32).unwrap(),
            vec![0.0; 32]
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            quantize(GgmlType::Q4_K, &[0.0; 256]),
            Err(KernelError::UnsupportedType(_))
        ));
        assert!(matches!(
            quantize(GgmlType::Q4_1, &[0.0; 31]),
            Err(KernelError::Shape(_))
        ));
        let mut x = vec![0.0; 32];
        x[3] = f32::NAN;
        assert!(matches!(
            quantize(GgmlType::Q4_1, &x),
            Err(KernelError::Shape(_))
        ));
    }
}
