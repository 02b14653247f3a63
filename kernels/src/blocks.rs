//! GGML's 32-element quantization blocks, laid out exactly as in GGUF files.

use half::f16;

/// Elements per block for every type here.
pub const QK: usize = 32;

/// 4-bit, symmetric: x = d * (q - 8). Element j in the low nibble of `qs[j]`, element
/// j + 16 in the high nibble.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 4-bit with a minimum: x = d * q + m.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 8-bit, symmetric: x = d * q.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 8-bit with the block sum: x = d * q, s = d * sum(q).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

impl Default for BlockQ8_0 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// A block type that can be read from GGUF bytes.
pub trait GgmlBlock: Copy + Default + Send + Sync + 'static {
    /// Bytes per block on disk.
    const BYTES: usize;
    /// Reads one block from exactly `BYTES` little-endian bytes.
    fn read(b: &[u8]) -> Self;
    /// The element values, for tests and dequantization.
    fn dequantize(&self) -> [f32; QK];
}

impl GgmlBlock for BlockQ4_0 {
    const BYTES: usize = 18;
    fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[2..18]);
        Self {
            d: f16_at(b, 0),
            qs,
        }
    }
    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        let mut out = [0f32; QK];
        for j in 0..QK / 2 {
            out[j] = d * ((self.qs[j] & 0x0f) as i32 - 8) as f32;
            out[j + QK / 2] = d * ((self.qs[j] >> 4) as i32 - 8) as f32;
        }
        out
    }
}

impl GgmlBlock for BlockQ4_1 {
    const BYTES: usize = 20;
    fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..20]);
        Self {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qs,
        }
    }
    fn dequantize(&self) -> [f32; QK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let mut out = [0f32; QK];
        for j in 0..QK / 2 {
            out[j] = d * (self.qs[j] & 0x0f) as f32 + m;
            out[j + QK / 2] = d * (self.qs[j] >> 4) as f32 + m;
        }
        out
    }
}

impl GgmlBlock for BlockQ8_0 {
    const BYTES: usize = 34;
    fn read(b: &[u8]) -> Self {
        let mut qs = [0i8; QK];
        for (q, &x) in qs.iter_mut().zip(&b[2..34]) {
            *q = x as i8;
        }
        Self {
            d: f16_at(b, 0),
            qs,
        }
    }
    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        self.qs.map(|q| d * q as f32)
    }
}

/// Reads a run of blocks; `bytes.len()` must be a multiple of `B::BYTES`.
pub fn read_blocks<B: GgmlBlock>(bytes: &[u8]) -> Vec<B> {
    bytes.chunks_exact(B::BYTES).map(B::read).collect()
}
