//! A bounds-checked reader for GGUF files (versions 2 and 3).
//!
//! The file is memory-mapped and parsed in place. Every length read from the file is
//! checked against the bytes that remain before anything is allocated, so a truncated or
//! hostile file yields a [`GgufError`] instead of a panic or a garbage-sized allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;
const MAX_ARRAY_DEPTH: usize = 2;

/// Why a GGUF file could not be read. Messages name the problem; [`GgufFile::open`]
/// wraps them with the path.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: is a directory, not a GGUF file")]
    IsDirectory { path: PathBuf },
    #[error("{path}: file is empty")]
    Empty { path: PathBuf },
    #[error("{path}: not a GGUF file (magic bytes {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: String },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
}

/// A GGML tensor element type as stored in GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    /// All types Hearth can load, for error messages.
    pub const SUPPORTED: &'static [GgmlType] = &[
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ];

    /// Maps the on-disk type id; unknown or unsupported ids give their ggml name.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            16 => return Err("IQ2_XXS".into()),
            17 => return Err("IQ2_XS".into()),
            18 => return Err("IQ3_XXS".into()),
            19 => return Err("IQ1_S".into()),
            20 => return Err("IQ4_NL".into()),
            21 => return Err("IQ3_S".into()),
            22 => return Err("IQ2_S".into()),
            23 => return Err("IQ4_XS".into()),
            24 => return Err("I8".into()),
            25 => return Err("I16".into()),
            26 => return Err("I32".into()),
            27 => return Err("I64".into()),
            28 => return Err("F64".into()),
            29 => return Err("IQ1_M".into()),
            other => return Err(format!("unknown type id {other}")),
        })
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }
}

impl std::str::FromStr for GgmlType {
    type Err = String;
    /// `q8_0`, `Q4_K`, `f16`, … (case-insensitive).
    fn from_str(s: &str) -> Result<Self, String> {
        Self::SUPPORTED
            .iter()
            .copied()
            .find(|t| t.to_string().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<String> = Self::SUPPORTED
                    .iter()
                    .map(|t| t.to_string().to_lowercase())
                    .collect();
                format!("`{s}` is not a tensor type ({})", names.join(", "))
            })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Q8K => "Q8_K",
        };
        f.write_str(name)
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an integer of any width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, from any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub size_bytes: usize,
    /// Which file of a sharded model holds it (0 for GGUF).
    pub shard: usize,
}

impl TensorInfo {
    pub fn element_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Dimensions outermost first, the order candle and PyTorch use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Where the bytes of a GGUF file come from.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata, tensor directory, and the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(io)?;
        if meta.is_dir() {
            return Err(GgufError::IsDirectory { path });
        }
        if meta.len() == 0 {
            return Err(GgufError::Empty { path });
        }
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only. Model files are not expected to change while they
        // are served; if one is truncated under us the process may get SIGBUS, as with
        // every mmap-based loader (llama.cpp included).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mapped(mmap))
    }

    /// Parses GGUF bytes held in memory (used by tests and the fuzzer).
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        let path = name.into();
        if bytes.is_empty() {
            return Err(GgufError::Empty { path });
        }
        Self::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self, GgufError> {
        let parsed = {
            let data = bytes.as_slice();
            if data.len() < 4 || &data[..4] != MAGIC {
                let magic = String::from_utf8_lossy(&data[..data.len().min(4)]).into_owned();
                return Err(GgufError::BadMagic { path, magic });
            }
            Parser { data, pos: 4 }.header()
        };
        let (version, metadata, tensors) = parsed.map_err(|message| GgufError::Malformed {
            path: path.clone(),
            message,
        })?;
        Ok(Self {
            path,
            bytes,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> usize {
        self.bytes.as_slice().len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The raw bytes of a tensor's data; in bounds by construction.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes.as_slice()[info.offset..info.offset + info.size_bytes]
    }

    /// A metadata error that names this file.
    pub fn error(&self, message: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// A required unsigned integer.
    pub fn u64_key(&self, key: &str) -> Result<u64, GgufError> {
        match self.get(key) {
            None => Err(self.error(format!("missing metadata key `{key}`"))),
            Some(v) => v.as_u64().ok_or_else(|| {
                self.error(format!(
                    "metadata key `{key}` should be an unsigned integer, found {}",
                    v.type_name()
                ))
            }),
        }
    }

    /// An optional float (any numeric type accepted).
    pub fn f64_key(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key `{key}` should be a number, found {}",
                    v.type_name()
                ))
            }),
        }
    }

    /// An optional string.
    pub fn str_key(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key `{key}` should be a string, found {}",
                    v.type_name()
                ))
            }),
        }
    }
}

type Header = (u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>);

struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file is truncated: {what} needs {n} bytes at offset {}, only {} remain",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that cannot be larger than what the rest of the file could hold, given
    /// that each item takes at least `min_item_bytes`.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > fits {
            return Err(format!(
                "{what} at offset {at} is {n}, but the rest of the file can hold at most {fits}: the file is truncated or corrupt"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("invalid bool byte {b} at offset {}", self.pos - 1)),
            },
            8 => Value::String(self.string("string length")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem_ty = self.u32("array element type")?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(format!("unknown metadata array element type {other}")),
                };
                let n = self.count("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }

    fn header(mut self) -> Result<Header, String> {
        let version = self.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(
                    "GGUF version 1 is not supported (convert with a newer llama.cpp)".into(),
                )
            }
            v => return Err(format!("unsupported GGUF version {v} (supported: 2, 3)")),
        }
        // A tensor entry takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes;
        // a metadata entry at least 8 (key) + 4 (type) + 1.
        let n_tensors = self.count("tensor count", 24)?;
        let n_kv = self.count("metadata entry count", 13)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string("metadata key length")?;
            let ty = self.u32("metadata value type")?;
            let value = self
                .value(ty, 0)
                .map_err(|e| format!("metadata `{key}`: {e}"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("duplicate metadata key `{key}`"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && (8..=1 << 20).contains(&a) => a,
                _ => {
                    return Err(format!(
                        "invalid general.alignment {v:?} (must be a power of two, 8..=1048576)"
                    ))
                }
            },
        };

        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = self.string("tensor name length")?;
            let n_dims = self.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = self.u64("tensor dimension")?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(format!("tensor `{name}` has invalid dimension {d}"));
                }
                dims.push(d as usize);
            }
            let type_id = self.u32("tensor type")?;
            let dtype = GgmlType::from_id(type_id).map_err(|t| {
                format!(
                    "tensor `{name}` has type {t}, which is not supported (supported: {})",
                    GgmlType::SUPPORTED
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let offset = self.u64("tensor offset")?;
            raw.push((name, dims, dtype, offset));
        }

        let data_start = (self.pos as u64).div_ceil(alignment) * alignment;
        let file_len = self.data.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, dtype, offset) in raw {
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| format!("tensor `{name}` dimensions {dims:?} overflow"))?;
            let block = dtype.block_size() as u64;
            if !(dims[0] as u64).is_multiple_of(block) {
                return Err(format!(
                    "tensor `{name}` row length {} is not a multiple of the {dtype} block size {block}",
                    dims[0]
                ));
            }
            let size = (elements / block)
                .checked_mul(dtype.block_bytes() as u64)
                .ok_or_else(|| format!("tensor `{name}` size overflows"))?;
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor `{name}` offset {offset} is not aligned to {alignment}"
                ));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(size).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    format!(
                        "tensor `{name}` ({size} bytes at data offset {offset}) lies beyond the end of the file ({file_len} bytes); the file is truncated or corrupt"
                    )
                })?;
            let info = TensorInfo {
                name: name.clone(),
                dims,
                dtype,
                offset: start as usize,
                size_bytes: size as usize,
                shard: 0,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format!("duplicate tensor `{name}`"));
            }
        }
        Ok((version, metadata, tensors))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds small GGUF files for tests.
    #[derive(Default)]
    pub struct GgufBuilder {
        kv: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    fn gguf_string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    impl GgufBuilder {
        pub fn str(mut self, k: &str, v: &str) -> Self {
            self.kv.push((k.into(), 8, gguf_string(v)));
            self
        }
        pub fn u32(mut self, k: &str, v: u32) -> Self {
            self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
            self
        }
        pub fn f32(mut self, k: &str, v: f32) -> Self {
            self.kv.push((k.into(), 6, v.to_le_bytes().to_vec()));
            self
        }
        pub fn str_array(mut self, k: &str, items: &[&str]) -> Self {
            let mut v = 8u32.to_le_bytes().to_vec();
            v.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                v.extend(gguf_string(s));
            }
            self.kv.push((k.into(), 9, v));
            self
        }
        pub fn f32_tensor(mut self, name: &str, dims: &[u64], values: &[f32]) -> Self {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensors.push((name.into(), dims.to_vec(), 0, bytes));
            self
        }
        pub fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
            for (k, ty, v) in &self.kv {
                out.extend(gguf_string(k));
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(v);
            }
            let mut offset = 0u64;
            for (name, dims, ty, data) in &self.tensors {
                out.extend(gguf_string(name));
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                offset += (data.len() as u64).div_ceil(32) * 32;
            }
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            for (_, _, _, data) in &self.tensors {
                out.extend_from_slice(data);
                while !out.len().is_multiple_of(32) {
                    out.push(0);
                }
            }
            out
        }
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes("test.gguf", bytes)
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let bytes = GgufBuilder::default()
            .str("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .f32("llama.rope.freq_base", 10000.0)
            .str_array("tokenizer.ggml.tokens", &["a", "b"])
            .f32_tensor("w", &[4, 2], &[1.0; 8])
            .build();
        let f = parse(bytes).unwrap();
        assert_eq!(f.str_key("general.architecture").unwrap(), Some("llama"));
        assert_eq!(f.u64_key("llama.block_count").unwrap(), 2);
        assert_eq!(f.f64_key("llama.rope.freq_base").unwrap(), Some(10000.0));
        let w = &f.tensors["w"];
        assert_eq!(w.shape(), vec![2, 4]);
        assert_eq!(f.tensor_data(w).len(), 32);
        assert_eq!(&f.tensor_data(w)[..4], &1.0f32.to_le_bytes());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = GgufBuilder::default()
            .str("general.architecture", "llama")
            .str_array("tokenizer.ggml.tokens", &["a", "bb", "ccc"])
            .f32_tensor("w", &[8], &[0.5; 8])
            .build();
        assert!(parse(bytes.clone()).is_ok());
        // Cutting inside the tensor data must be caught too; cutting in the trailing
        // padding after the last tensor is harmless.
        let data_end = bytes.len();
        for len in 0..data_end {
            let r = parse(bytes[..len].to_vec());
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        }
    }

    #[test]
    fn absurd_counts_are_refused_before_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(bytes).unwrap_err().to_string();
        assert!(err.contains("metadata entry count"), "{err}");

        // A string claiming to be 2^60 bytes long.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        let err = parse(bytes).unwrap_err().to_string();
        assert!(err.contains("key length"), "{err}");
    }

    #[test]
    fn corrupt_tensor_offset_is_refused() {
        let mut bytes = GgufBuilder::default()
            .f32_tensor("w", &[8], &[0.5; 8])
            .build();
        // The tensor offset is the 8 bytes before the padding that ends the header.
        let header_end = 4 + 4 + 8 + 8 + (8 + 1) + 4 + 8 + 4;
        bytes[header_end..header_end + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = parse(bytes).unwrap_err().to_string();
        assert!(err.contains("beyond the end of the file"), "{err}");
    }

    #[test]
    fn bad_magic_and_version() {
        let err = parse(b"GGML\0\0\0\0".to_vec()).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&7u32.to_le_bytes());
        let err = parse(bytes).unwrap_err().to_string();
        assert!(err.contains("unsupported GGUF version 7"), "{err}");
    }

    #[test]
    fn unsupported_tensor_type_is_named() {
        let mut b = GgufBuilder::default().f32_tensor("w", &[32], &[0.0; 32]);
        b.tensors[0].2 = 20; // IQ4_NL
        let err = parse(b.build()).unwrap_err().to_string();
        assert!(err.contains("IQ4_NL") && err.contains("Q4_K"), "{err}");
    }
}
