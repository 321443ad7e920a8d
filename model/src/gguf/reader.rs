//! A bounds-checked GGUF (v2, v3) reader over a memory map.
//!
//! Every length read from the file is checked against the bytes that remain before anything is
//! allocated, so a corrupt or hostile file yields [`ModelError::Gguf`], never a panic or a huge
//! allocation. Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arbor_kernels::quant::GgmlType;
use memmap2::Mmap;

use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, as llama.cpp tolerates it).
    String(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F64(v) => Some(v),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions in ggml order (`ne[0]` is the contiguous one).
    pub dims: Vec<usize>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte range in the file.
    pub range: std::ops::Range<usize>,
}

impl TensorInfo {
    /// Element count.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
    /// Shape in row-major (PyTorch) order: the reverse of ggml's.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file: metadata and tensor directory, data memory-mapped.
#[derive(Debug)]
pub struct GgufFile {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata key → value.
    pub metadata: HashMap<String, Value>,
    /// Tensor name → location. Tensors of unsupported types are kept with their error so a
    /// model only fails if it actually needs one.
    tensors: HashMap<String, std::result::Result<TensorInfo, String>>,
    mmap: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                ModelError::Gguf(format!(
                    "truncated: {what} needs {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    /// A length that must fit in what remains, given at least `unit` bytes per item.
    fn len(&mut self, unit: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(unit as u64) > remaining {
            return Err(ModelError::Gguf(format!(
                "{what}: length {n} exceeds the {remaining} bytes left at offset {}",
                self.pos
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(1, what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        let what = key;
        Ok(match ty {
            0 => Value::U64(u64::from(self.take(1, what)?[0])),
            1 => Value::I64(i64::from(self.take(1, what)?[0] as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(
                self.take(2, what)?.try_into().expect("2"),
            ))),
            3 => Value::I64(i64::from(i16::from_le_bytes(
                self.take(2, what)?.try_into().expect("2"),
            ))),
            4 => Value::U64(u64::from(self.u32(what)?)),
            5 => Value::I64(i64::from(self.u32(what)? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32(what)?))),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(ModelError::Gguf(format!(
                        "{key}: nested arrays are not supported"
                    )));
                }
                let elem = self.u32(what)?;
                let unit = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => {
                        return Err(ModelError::Gguf(format!(
                            "{key}: bad array element type {elem}"
                        )));
                    }
                };
                let n = self.len(unit, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(ModelError::Gguf(format!("{key}: bad value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file.
    ///
    /// # Errors
    /// [`ModelError::Io`] if it cannot be read, [`ModelError::Gguf`] if it is malformed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; Arbor never writes model files while they are open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(mmap)
    }

    fn parse(mmap: Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        if c.take(4, "magic")? != MAGIC {
            return Err(ModelError::Gguf("bad magic: not a GGUF file".into()));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Gguf(format!(
                "unsupported GGUF version {version}"
            )));
        }
        // Each tensor info takes at least 8+4+8+4+8 bytes, each KV at least 8+4+1.
        let n_tensors = c.len(32, "tensor count")?;
        let n_kv = c.len(13, "metadata count")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| ModelError::Gguf(format!("bad general.alignment {v:?}")))?,
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ModelError::Gguf(format!("{name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(
                    usize::try_from(d).map_err(|_| ModelError::Gguf(format!("{name}: dim {d}")))?,
                );
            }
            let ty = c.u32(&name)?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = HashMap::with_capacity(n_tensors);
        for (name, dims, ty, offset) in infos {
            let info = GgmlType::from_id(ty)
                .map_err(|e| e.to_string())
                .and_then(|ty| {
                    let elements = dims
                        .iter()
                        .try_fold(1usize, |a, &d| a.checked_mul(d))
                        .ok_or_else(|| "element count overflows".to_string())?;
                    let bytes = ty.bytes_for(elements).map_err(|e| e.to_string())?;
                    Ok((ty, bytes))
                });
            let entry = match info {
                Err(e) => Err(e),
                Ok((ty, bytes)) => {
                    let start = data_start.checked_add(offset);
                    let end = start.and_then(|s| s.checked_add(bytes as u64));
                    match (start, end) {
                        (Some(s), Some(e)) if e <= file_len => Ok(TensorInfo {
                            dims,
                            ty,
                            range: s as usize..e as usize,
                        }),
                        _ => {
                            return Err(ModelError::Gguf(format!(
                                "truncated: tensor `{name}` ({bytes} bytes at offset {offset}) \
                                 runs past the end of the file ({file_len} bytes)"
                            )));
                        }
                    }
                }
            };
            tensors.insert(name, entry);
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value, converted by `f`.
    ///
    /// # Errors
    /// [`ModelError::Metadata`] when absent or of the wrong type.
    pub fn require<T>(&self, key: &str, f: impl FnOnce(&Value) -> Option<T>) -> Result<T> {
        let v = self.get(key).ok_or_else(|| ModelError::Metadata {
            key: key.to_string(),
            why: "absent".into(),
        })?;
        f(v).ok_or_else(|| ModelError::Metadata {
            key: key.to_string(),
            why: format!("unexpected value {}", short_debug(v)),
        })
    }

    /// Names of all tensors.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether the file has a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's location and raw bytes.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] or [`ModelError::TensorType`] for an undecodable type.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        match self.tensors.get(name) {
            None => Err(ModelError::MissingTensor(name.to_string())),
            Some(Err(why)) => Err(ModelError::TensorType {
                name: name.to_string(),
                source: arbor_kernels::KernelError::UnsupportedType(why.clone()),
            }),
            Some(Ok(info)) => Ok((info, &self.mmap[info.range.clone()])),
        }
    }

    /// A tensor dequantized to f32, with its row-major shape.
    ///
    /// # Errors
    /// As [`GgufFile::tensor`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, bytes) = self.tensor(name)?;
        let data = arbor_kernels::quant::dequantize(info.ty, bytes, info.elements()).map_err(
            |source| ModelError::TensorType {
                name: name.to_string(),
                source,
            },
        )?;
        Ok((info.shape(), data))
    }
}

fn short_debug(v: &Value) -> String {
    let s = format!("{v:?}");
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary(80)])
    } else {
        s
    }
}
