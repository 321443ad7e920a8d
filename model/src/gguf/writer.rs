//! A minimal GGUF v3 writer, used to build test fixtures (tiny models, malformed files).

use std::io::Write;

use arbor_kernels::quant::GgmlType;

use super::Value;

/// Accumulates metadata and tensors, then serializes a GGUF v3 file.
///
/// ```
/// use arbor_model::gguf::{GgufWriter, GgufFile, Value};
/// let mut w = GgufWriter::default();
/// w.meta("general.architecture", Value::String("llama".into()));
/// w.tensor_f32("x", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
/// let dir = std::env::temp_dir().join(format!("arbor-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("x.gguf");
/// std::fs::write(&path, w.to_bytes()).unwrap();
/// let f = GgufFile::open(&path).unwrap();
/// assert_eq!(f.tensor_f32("x").unwrap().0, vec![2, 3]);
/// ```
#[derive(Debug, Default)]
pub struct GgufWriter {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl GgufWriter {
    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.meta.push((key.to_string(), v));
        self
    }

    /// Adds an f32 tensor with a row-major `shape`.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor_raw(name, shape, GgmlType::F32.id(), bytes)
    }

    /// Adds a tensor of any type id with its raw bytes (not checked: fixtures may be broken
    /// on purpose).
    pub fn tensor_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), shape.to_vec(), ty, bytes));
        self
    }

    /// Serializes the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut out, k);
            put_value(&mut out, v, true);
        }
        let mut offset = 0u64;
        for (name, shape, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (bytes.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.write_all(bytes).expect("write to Vec");
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, with_type: bool) {
    if with_type {
        out.extend_from_slice(&type_id(v).to_le_bytes());
    }
    match v {
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(8, type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it, false);
            }
        }
    }
}
