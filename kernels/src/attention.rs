//! Causal attention of new query rows over an f16 KV cache, with llama.cpp's CPU
//! numerics: the query meets the keys as f16, dot products run as ggml's
//! `ggml_vec_dot_f16` or llamafile's tinyBLAS (see `dot_vec`, `dot_tiled`), the softmax uses ggml's `expf` with a
//! double-precision sum over 16-wide chunks, and the probabilities meet the values as f16.
//! Small models are chaotic here: one changed bit in a score can move the logits by
//! tenths once activations are requantized, so "close" is not enough.
//!
//! Layout: keys `[cell][kv_head * head_dim + d]`; values transposed per head,
//! `[kv_head][d][cell]`, so the value dot runs along contiguous cells.

use half::f16;
use half::slice::HalfFloatSliceExt;
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

/// Dot of two rows (f16 values widened to f32) the way ggml's `ggml_vec_dot_f16` does it
/// with AVX-512: four accumulators of sixteen f32 lanes over steps of 64 elements (fused
/// multiply-adds), folded as (a0+a2)+(a1+a3), reduced like `_mm512_reduce_add_ps`; the
/// tail past the last multiple of 64 is added product by product in f64.
#[inline(always)]
fn dot_vec(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let main = n / 64 * 64;
    let mut acc = [[0f32; 16]; 4];
    for (ca, cb) in a[..main].chunks_exact(64).zip(b[..main].chunks_exact(64)) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (x, lane) in lanes.iter_mut().enumerate() {
                *lane = ca[16 * j + x].mul_add(cb[16 * j + x], *lane);
            }
        }
    }
    let mut folded = [0f32; 16];
    for (x, f) in folded.iter_mut().enumerate() {
        *f = (acc[0][x] + acc[2][x]) + (acc[1][x] + acc[3][x]);
    }
    let mut sum = reduce16(&folded) as f64;
    for (x, y) in a[main..n].iter().zip(&b[main..n]) {
        sum += (x * y) as f64;
    }
    sum as f32
}

/// Dot of two rows the way llamafile's tinyBLAS (ggml's matmul for two or more query
/// rows) does it with AVX-512: one accumulator of sixteen f32 lanes over steps of 16
/// (fused multiply-adds), reduced like `_mm512_reduce_add_ps`. Lengths are multiples of 16.
#[inline(always)]
fn dot_tiled(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for (x, lane) in lanes.iter_mut().enumerate() {
            *lane = ca[x].mul_add(cb[x], *lane);
        }
    }
    reduce16(&lanes)
}

/// Cells a value dot runs over: llama.cpp pads its KV window to a multiple of 256 with
/// probability-0 cells; any multiple of 64 gives the same sums.
fn round_up64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Per-task scratch: widened rows, scores, probabilities.
struct Scratch {
    q: Vec<f32>,
    row: Vec<f32>,
    w: Vec<f32>,
    p: Vec<f32>,
}

/// What one (query row, head) task needs to know.
#[derive(Clone, Copy)]
struct HeadTask<'a> {
    k: &'a [f16],
    v_t: &'a [f16],
    shape: AttentionShape,
    scale: f32,
    visible: usize,
    kv_head: usize,
    tiled_scores: bool,
    tiled_values: bool,
}

multiversion! {
    /// Attention of one query row of one head; `out` gets `head_dim` values.
    fn attend_head(task: HeadTask<'_>, q: &[f32], scratch: &mut Scratch, out: &mut [f32]) {
        let s = task.shape;
        let hd = s.head_dim;
        let kv_width = s.kv_heads * hd;
        let g = task.kv_head;
        let Scratch { q: qf, row, w, p } = scratch;
        // The query meets the keys as f16.
        for (d, &x) in qf.iter_mut().zip(q) {
            *d = f16::from_f32(x).to_f32();
        }
        let mut max = f32::NEG_INFINITY;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = if j < task.visible {
                let key = &task.k[j * kv_width + g * hd..j * kv_width + (g + 1) * hd];
                key.convert_to_f32_slice(&mut row[..hd]);
                let dot = if task.tiled_scores {
                    dot_tiled(&row[..hd], qf)
                } else {
                    dot_vec(&row[..hd], qf)
                };
                dot * task.scale
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
        // The probabilities meet the values as f16.
        for (pj, &e) in p.iter_mut().zip(w.iter()) {
            *pj = f16::from_f32(e * inv).to_f32();
        }
        let n = round_up64(task.visible);
        for (d, od) in out.iter_mut().enumerate() {
            task.v_t[(g * hd + d) * s.capacity..][..n].convert_to_f32_slice(&mut row[..n]);
            *od = if task.tiled_values {
                dot_tiled(&row[..n], &p[..n])
            } else {
                dot_vec(&row[..n], &p[..n])
            };
        }
    }
}

/// `q`: `seq` rows of `heads * head_dim` (already rotated), for positions `pos..pos+seq`.
/// `k` holds at least `pos + seq` cells, `v_t` the matching values with rows of
/// `capacity` cells, which must be at least `pos + seq` rounded up to 64 (cells past the
/// sequence are read with probability 0, so they must only be finite). Writes `out` like
/// `q`.
#[allow(clippy::too_many_arguments)]
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
    let hd = s.head_dim;
    let n_rep = s.heads / s.kv_heads;
    let padded = round_up64(pos + seq);
    assert!(
        s.capacity >= padded,
        "value rows must hold the padded length"
    );
    // llama.cpp hands matmuls with two or more query rows to tinyBLAS and single rows to
    // ggml_vec_dot_f16; the two sum in different orders. tinyBLAS declines a key length
    // that is not a multiple of 16 (scores) and a head size not a multiple of 4 (values).
    let tiled_scores = seq >= 2 && hd.is_multiple_of(16);
    let tiled_values = seq >= 2 && hd.is_multiple_of(4);
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || Scratch {
            q: vec![0f32; hd],
            row: vec![0f32; padded.max(hd)],
            w: vec![0f32; padded],
            p: vec![0f32; padded],
        },
        |scratch, (idx, o)| {
            let (t, h) = (idx / s.heads, idx % s.heads);
            let task = HeadTask {
                k,
                v_t,
                shape: s,
                scale,
                visible: pos + t + 1,
                kv_head: h / n_rep,
                tiled_scores,
                tiled_values,
            };
            attend_head(task, &q[idx * hd..(idx + 1) * hd], scratch, o);
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
        let f = |i: usize| (i * 7919 % 1000) as f32 / 500.0 - 1.0;
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
