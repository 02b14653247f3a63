//! Causal attention of new query rows over an f16 KV cache, with llama.cpp's CPU
//! numerics: the query meets the keys as f16, dot products run as ggml's
//! `ggml_vec_dot_f16` (see [`dot_f16`]), the softmax uses ggml's `expf` with a
//! double-precision sum over 16-wide chunks, and the probabilities meet the values as f16.
//! Small models are chaotic here: one changed bit in a score can move the logits by
//! tenths once activations are requantized, so "close" is not enough.
//!
//! Layout: keys `[cell][kv_head * head_dim + d]`; values transposed per head,
//! `[kv_head][d][cell]`, so the value dot runs along contiguous cells.

use half::f16;
use rayon::prelude::*;

use crate::math::{expf, reduce16};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Cells allocated per value row (the stride of `[kv_head][d][..]`).
    pub capacity: usize,
}

/// Dot of two f16 rows the way ggml's `ggml_vec_dot_f16` does it with AVX-512: four
/// accumulators of sixteen f32 lanes over steps of 64 elements (fused multiply-adds),
/// folded as (a0+a2)+(a1+a3), reduced like `_mm512_reduce_add_ps`; the tail past the last
/// multiple of 64 is added product by product in f64.
#[inline]
fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let main = n / 64 * 64;
    let mut acc = [[0f32; 16]; 4];
    for (ca, cb) in a[..main].chunks_exact(64).zip(b[..main].chunks_exact(64)) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (x, lane) in lanes.iter_mut().enumerate() {
                *lane = ca[16 * j + x]
                    .to_f32()
                    .mul_add(cb[16 * j + x].to_f32(), *lane);
            }
        }
    }
    for x in 0..16 {
        acc[0][x] += acc[2][x];
        acc[1][x] += acc[3][x];
    }
    for x in 0..16 {
        acc[0][x] += acc[1][x];
    }
    let mut sum = reduce16(&acc[0]) as f64;
    for (x, y) in a[main..n].iter().zip(&b[main..n]) {
        sum += (x.to_f32() * y.to_f32()) as f64;
    }
    sum as f32
}

/// Dot of two f16 rows the way llamafile's tinyBLAS (ggml's matmul for two or more
/// query rows) does it with AVX-512: one accumulator of sixteen f32 lanes over steps of 16
/// (fused multiply-adds), reduced like `_mm512_reduce_add_ps`. Lengths are multiples of 16.
#[inline]
fn dot_f16_tiled(a: &[f16], b: &[f16]) -> f32 {
    let mut lanes = [0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for (x, lane) in lanes.iter_mut().enumerate() {
            *lane = ca[x].to_f32().mul_add(cb[x].to_f32(), *lane);
        }
    }
    reduce16(&lanes)
}

/// Cells a value dot runs over: llama.cpp pads its KV window to a multiple of 256 with
/// probability-0 cells; any multiple of 64 gives the same sums.
fn round_up64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// `q`: `seq` rows of `heads * head_dim` (already rotated), for positions `pos..pos+seq`.
/// `k` holds at least `pos + seq` cells, `v_t` the matching values with rows of
/// `capacity` cells, which must be at least `pos + seq` rounded up to 64 (cells past the
/// sequence are read with probability 0, so they must only be finite). Writes `out` like
/// `q`.
pub fn attend(
    q: &[f32],
    seq: usize,
    pos: usize,
    k: &[f16],
    v_t: &[f16],
    s: AttentionShape,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, n_rep) = (s.head_dim, s.heads / s.kv_heads);
    let kv_width = s.kv_heads * hd;
    let total = pos + seq;
    let padded = round_up64(total);
    assert!(
        s.capacity >= padded,
        "value rows must hold the padded length"
    );
    // llama.cpp hands matmuls with two or more query rows to tinyBLAS and single rows to
    // ggml_vec_dot_f16; the two sum in different orders.
    // tinyBLAS also declines a key length that is not a multiple of 16 (scores) and a
    // head size that is not a multiple of 4 (values).
    let score_dot: fn(&[f16], &[f16]) -> f32 = if seq >= 2 && hd % 16 == 0 {
        dot_f16_tiled
    } else {
        dot_f16
    };
    let value_dot: fn(&[f16], &[f16]) -> f32 = if seq >= 2 && hd % 4 == 0 {
        dot_f16_tiled
    } else {
        dot_f16
    };
    // One task per (query row, head).
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || {
            (
                vec![f16::ZERO; hd],
                vec![0f32; padded],
                vec![f16::ZERO; padded],
            )
        },
        |(q16, w, p16), (idx, o)| {
            let (t, h) = (idx / s.heads, idx % s.heads);
            let g = h / n_rep;
            let visible = pos + t + 1;
            for (d, qv) in q16.iter_mut().zip(&q[idx * hd..(idx + 1) * hd]) {
                *d = f16::from_f32(*qv);
            }
            let mut max = f32::NEG_INFINITY;
            for (j, wj) in w.iter_mut().enumerate() {
                *wj = if j < visible {
                    let key = &k[j * kv_width + g * hd..j * kv_width + (g + 1) * hd];
                    score_dot(key, q16) * scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*wj);
            }
            let mut sum = 0f64;
            for chunk in w.chunks_exact_mut(16) {
                let mut lanes = [0f32; 16];
                for (l, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
                    *x = expf(*x - max);
                    *l = *x;
                }
                sum += reduce16(&lanes) as f64;
            }
            let inv = (1.0 / sum) as f32;
            for (p, &e) in p16.iter_mut().zip(w.iter()) {
                *p = f16::from_f32(e * inv);
            }
            let n = round_up64(visible);
            for (d, od) in o.iter_mut().enumerate() {
                let row = &v_t[(g * hd + d) * s.capacity..][..n];
                *od = value_dot(row, &p16[..n]);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention on the same f16-rounded inputs, for comparison.
    fn reference(
        q: &[f32],
        seq: usize,
        pos: usize,
        k: &[f16],
        v_t: &[f16],
        s: AttentionShape,
        scale: f32,
    ) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; q.len()];
        for t in 0..seq {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qrow: Vec<f64> = q[(t * s.heads + h) * hd..][..hd]
                    .iter()
                    .map(|&x| f16::from_f32(x).to_f64())
                    .collect();
                let vis = pos + t + 1;
                let scores: Vec<f64> = (0..vis)
                    .map(|j| {
                        let key = &k[j * s.kv_heads * hd + g * hd..][..hd];
                        key.iter()
                            .zip(&qrow)
                            .map(|(a, b)| a.to_f64() * b)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let row = &v_t[(g * hd + d) * s.capacity..];
                    out[(t * s.heads + h) * hd + d] =
                        (0..vis).map(|j| e[j] / z * row[j].to_f64()).sum::<f64>() as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_plain_attention_within_f16_rounding() {
        let s = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            capacity: 64,
        };
        let (pos, seq) = (5, 3);
        let total = pos + seq;
        let f = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0);
        let k: Vec<f16> = (0..total * s.kv_heads * s.head_dim)
            .map(|i| f16::from_f32(f(i)))
            .collect();
        let mut v_t = vec![f16::ZERO; s.kv_heads * s.head_dim * s.capacity];
        for (i, x) in v_t.iter_mut().enumerate() {
            if i % s.capacity < total {
                *x = f16::from_f32(f(i + 3));
            }
        }
        let q: Vec<f32> = (0..seq * s.heads * s.head_dim)
            .map(|i| f(i + 11) * 2.0)
            .collect();
        let mut out = vec![0f32; q.len()];
        attend(&q, seq, pos, &k, &v_t, s, 0.2, &mut out);
        let want = reference(&q, seq, pos, &k, &v_t, s, 0.2);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        // The first query row of a fresh sequence sees only itself: output = its value.
        let mut one = vec![0f32; s.heads * s.head_dim];
        attend(&q[..s.heads * s.head_dim], 1, 0, &k, &v_t, s, 0.2, &mut one);
        for d in 0..s.head_dim {
            assert_eq!(one[d], v_t[d * s.capacity].to_f32());
        }
    }
}
