//! The GGUF weight formats our matmul takes, decoded block by block into one common form:
//! 32 unsigned integer values, an offset subtracted from each, one or two scales (one per
//! half of the 32) and an optional additive minimum. Every format's value is then
//! `x = d · (u − bias) + m`, which is how ggml dequantizes them; the K-quants' 6-bit
//! sub-block scales are multiplied into f32 scales here, exactly (an f16 times a small
//! integer fits in an f32's mantissa), as ggml does when it dequantizes.
//!
//! Scalar and plain on purpose: this is the specification the packed SIMD kernels are
//! tested against, and it runs once per matrix at load.

use half::f16;

/// Elements per decoded block.
pub const QK: usize = 32;

/// A weight format from a GGUF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// How a format's scales are kept once packed.
/// How a 32-element format's integer block sums become an f32 dot product (the K-quants
/// have one arithmetic, their half-block sums, whatever this says).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Arithmetic {
    /// llama.cpp's x86 CPU backend, operation for operation ([`QFormat::lanes`]): the
    /// logits equal llama.cpp's to the bit.
    #[default]
    Lanes,
    /// One exact integer sum per block, scaled with one FMA (the K-quants' arithmetic):
    /// a third of the vector work per product, and the integer sums can run on Intel AMX
    /// tiles. Results differ from llama.cpp's in the last bits of each dot product, which
    /// activations requantized every layer carry on as quantization noise.
    Blocks,
}

impl std::str::FromStr for Arithmetic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lanes" => Ok(Self::Lanes),
            "blocks" => Ok(Self::Blocks),
            other => Err(format!("unknown arithmetic `{other}` (lanes, blocks)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// One f16 scale per block.
    D16,
    /// An f16 scale and an f16 minimum.
    D16M16,
    /// Q4_K/Q5_K as in the file: an f16 scale and minimum per super-block of 256, a
    /// 6-bit scale and minimum per block; `d = D·sc`, `m = −(Dmin·mn)` in f32.
    K4,
    /// Q6_K as in the file: an f16 scale per super-block, two int8 scales per block (one
    /// per half); `d0 = D·sc0`, `d1 = D·sc1` in f32.
    K6,
}

impl Scheme {
    /// Bytes of scales per block of 16 rows.
    pub const fn bytes(self) -> usize {
        match self {
            Scheme::D16 => 32,
            Scheme::D16M16 => 64,
            Scheme::K4 | Scheme::K6 => 32,
        }
    }
    /// Bytes of super-block scales per super-block (8 blocks) of 16 rows.
    pub const fn super_bytes(self) -> usize {
        match self {
            Scheme::K4 => 64,
            Scheme::K6 => 32,
            Scheme::D16 | Scheme::D16M16 => 0,
        }
    }
    pub const fn has_min(self) -> bool {
        matches!(self, Scheme::D16M16 | Scheme::K4)
    }
    /// Two scales per block, one per half.
    pub const fn two_scales(self) -> bool {
        matches!(self, Scheme::K6)
    }
}

impl QFormat {
    /// Elements per block in the file (32, or 256 for K-quants).
    pub const fn block_elems(self) -> usize {
        match self {
            QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block in the file.
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q5_0 => 22,
            QFormat::Q5_1 => 24,
            QFormat::Q8_0 => 34,
            QFormat::Q4K => 144,
            QFormat::Q5K => 176,
            QFormat::Q6K => 210,
        }
    }

    /// Bits per value once decoded (4, 5, 6 or 8).
    pub const fn bits(self) -> u32 {
        match self {
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q4K => 4,
            QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q5K => 5,
            QFormat::Q6K => 6,
            QFormat::Q8_0 => 8,
        }
    }

    /// The offset subtracted from each unsigned value.
    pub const fn bias(self) -> i32 {
        match self {
            QFormat::Q4_0 => 8,
            QFormat::Q5_0 => 16,
            QFormat::Q6K => 32,
            QFormat::Q8_0 => 128,
            QFormat::Q4_1 | QFormat::Q5_1 | QFormat::Q4K | QFormat::Q5K => 0,
        }
    }

    /// Whether products are summed as llama.cpp's x86 code does for this format: eight
    /// f32 lanes per dot product (lane `k` takes, per block, the integer sum over
    /// elements `4k..4k+4`, scaled with an FMA), summed at the end as
    /// `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`, then `+ Σ m·s`. With activations
    /// quantized to int8 every layer, a last-bit difference in one output can flip a
    /// rounding downstream, so only the same operations give the same logits; these are
    /// the formats where we match them. The K-quants (whose llama.cpp dot products work
    /// on 256-element activation blocks) sum each half block exactly instead: one FMA per
    /// block, or per half with Q6_K's two scales.
    pub const fn lanes(self) -> bool {
        matches!(
            self,
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q8_0
        )
    }

    /// Whether this format, under `arithmetic`, sums products in llama.cpp's eight lanes.
    pub const fn uses_lanes(self, arithmetic: Arithmetic) -> bool {
        self.lanes() && matches!(arithmetic, Arithmetic::Lanes)
    }

    pub const fn scheme(self) -> Scheme {
        match self {
            QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => Scheme::D16,
            QFormat::Q4_1 | QFormat::Q5_1 => Scheme::D16M16,
            QFormat::Q4K | QFormat::Q5K => Scheme::K4,
            QFormat::Q6K => Scheme::K6,
        }
    }
}

/// One block of 32 decoded: `x[j] = d(j) · (u[j] − bias) + m`, where `d(j)` is `d0` for
/// `j < 16` and `d1` after (equal except for Q6_K). For the K-quants, also the parts
/// these are made of, as the file keeps them: the super-block's scale (and minimum) and
/// the block's integer scales (`sc[0]`, `sc[1]` for Q6_K's halves; `sc[0]` and the
/// minimum `mn` for Q4_K/Q5_K).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decoded {
    pub u: [u8; QK],
    pub d0: f32,
    pub d1: f32,
    pub m: f32,
    pub sd: f32,
    pub sdmin: f32,
    pub sc: [i8; 2],
    pub mn: u8,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K/Q5_K's 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one file block (`format.block_bytes()` bytes) into `format.block_elems() / 32`
/// decoded blocks.
pub fn decode(format: QFormat, b: &[u8], out: &mut [Decoded]) {
    debug_assert_eq!(b.len(), format.block_bytes());
    debug_assert_eq!(out.len(), format.block_elems() / QK);
    let one = |d: f32, m: f32| Decoded {
        d0: d,
        d1: d,
        m,
        ..Decoded::default()
    };
    match format {
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let (d, m, qs) = match format {
                QFormat::Q4_0 => (f16_at(b, 0), 0.0, &b[2..18]),
                _ => (f16_at(b, 0), f16_at(b, 2), &b[4..20]),
            };
            let o = &mut out[0];
            *o = one(d, m);
            for (j, &q) in qs.iter().enumerate() {
                o.u[j] = q & 0x0f;
                o.u[j + 16] = q >> 4;
            }
        }
        QFormat::Q5_0 | QFormat::Q5_1 => {
            let (d, m, at) = match format {
                QFormat::Q5_0 => (f16_at(b, 0), 0.0, 2),
                _ => (f16_at(b, 0), f16_at(b, 2), 4),
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            let o = &mut out[0];
            *o = one(d, m);
            for (j, &q) in qs.iter().enumerate() {
                o.u[j] = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                o.u[j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        QFormat::Q8_0 => {
            let o = &mut out[0];
            *o = one(f16_at(b, 0), 0.0);
            for j in 0..QK {
                o.u[j] = (b[2 + j] as i8 as i32 + 128) as u8;
            }
        }
        QFormat::Q4K | QFormat::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = match format {
                QFormat::Q4K => (None, &b[16..144]),
                _ => (Some(&b[16..48]), &b[48..176]),
            };
            for (j, o) in out.iter_mut().enumerate() {
                let (sc, mn) = scale_min_k4(j, scales);
                *o = Decoded {
                    sd: d,
                    sdmin: dmin,
                    sc: [sc as i8, 0],
                    mn,
                    ..one(d * sc as f32, -(dmin * mn as f32))
                };
                // Sub-blocks 2i and 2i+1 are the low and high nibbles of qs[32i..32i+32].
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                for l in 0..QK {
                    let nib = if j % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                    let high = qh.map_or(0, |h| ((h[l] >> j) & 1) << 4);
                    o.u[l] = nib | high;
                }
            }
        }
        QFormat::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            // Each half of 128 elements: ql[64], qh[32], 8 scales of 16 elements.
            for half in 0..2 {
                let (ql, qh, sc) = (
                    &ql[64 * half..64 * half + 64],
                    &qh[32 * half..32 * half + 32],
                    &sc[8 * half..8 * half + 8],
                );
                // Quarter q (0..4) of the half is elements 32q..32q+32: one decoded block,
                // scales sc[2q] (first 16) and sc[2q + 1] (last 16).
                for q in 0..4 {
                    let o = &mut out[4 * half + q];
                    let (s0, s1) = (sc[2 * q] as i8, sc[2 * q + 1] as i8);
                    *o = Decoded {
                        d0: d * s0 as f32,
                        d1: d * s1 as f32,
                        sd: d,
                        sc: [s0, s1],
                        ..Decoded::default()
                    };
                    for l in 0..QK {
                        let low = match q {
                            0 => ql[l] & 0x0f,
                            1 => ql[l + 32] & 0x0f,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        o.u[l] = low | (((qh[l] >> (2 * q)) & 3) << 4);
                    }
                }
            }
        }
    }
}

/// Dequantizes a decoded block (ggml's arithmetic: `d · q`, then `+ m` where there is one).
pub fn dequantize(format: QFormat, blk: &Decoded, out: &mut [f32]) {
    let bias = format.bias();
    for (j, o) in out.iter_mut().enumerate().take(QK) {
        let d = if j < QK / 2 { blk.d0 } else { blk.d1 };
        let v = d * (blk.u[j] as i32 - bias) as f32;
        *o = if format.scheme().has_min() {
            v + blk.m
        } else {
            v
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_to_nibbles_scale_and_min() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4] = 0x3a; // element 0 = 0xa, element 16 = 0x3
        let mut out = [Decoded::default()];
        decode(QFormat::Q4_1, &b, &mut out);
        let mut x = [0f32; 32];
        dequantize(QFormat::Q4_1, &out[0], &mut x);
        assert_eq!(x[0], 0.5 * 10.0 - 1.0);
        assert_eq!(x[16], 0.5 * 3.0 - 1.0);
        assert_eq!(x[1], -1.0);
    }

    #[test]
    fn q8_0_values_are_offset_by_128() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2] = (-128i8) as u8;
        b[3] = 127;
        let mut out = [Decoded::default()];
        decode(QFormat::Q8_0, &b, &mut out);
        assert_eq!((out[0].u[0], out[0].u[1], out[0].u[2]), (0, 255, 128));
        let mut x = [0f32; 32];
        dequantize(QFormat::Q8_0, &out[0], &mut x);
        assert_eq!((x[0], x[1], x[2]), (-256.0, 254.0, 0.0));
    }

    /// Our decoders dequantize every format exactly as candle's (ggml's) code does.
    #[test]
    fn dequantization_equals_candles() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        let mut next = crate::packed::tests::rng(5);
        for format in crate::packed::tests::FORMATS {
            let dtype = match format {
                QFormat::Q4_0 => GgmlDType::Q4_0,
                QFormat::Q4_1 => GgmlDType::Q4_1,
                QFormat::Q5_0 => GgmlDType::Q5_0,
                QFormat::Q5_1 => GgmlDType::Q5_1,
                QFormat::Q8_0 => GgmlDType::Q8_0,
                QFormat::Q4K => GgmlDType::Q4K,
                QFormat::Q5K => GgmlDType::Q5K,
                QFormat::Q6K => GgmlDType::Q6K,
            };
            let count = 6;
            let bytes = crate::packed::tests::random_blocks(format, count, &mut next);
            let n = count * format.block_elems();
            let t = qtensor_from_ggml(dtype, &bytes, vec![n], &candle_core::Device::Cpu).unwrap();
            let want = t
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut got = vec![0f32; n];
            let sub = format.block_elems() / QK;
            let mut blocks = vec![Decoded::default(); sub];
            for (fb, o) in bytes
                .chunks_exact(format.block_bytes())
                .zip(got.chunks_exact_mut(format.block_elems()))
            {
                decode(format, fb, &mut blocks);
                for (blk, o) in blocks.iter().zip(o.chunks_exact_mut(QK)) {
                    dequantize(format, blk, o);
                }
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{format:?} element {i}: {g} vs {w}"
                );
            }
        }
    }
}
