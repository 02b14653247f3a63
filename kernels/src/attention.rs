//! Causal attention of new query rows over an f16 KV cache, with llama.cpp's CPU
//! numerics: the query meets the keys as f16, dot products run as ggml's
//! `ggml_vec_dot_f16` or llamafile's tinyBLAS (see `dot_vec`, `dot_tiled`), the softmax uses ggml's `expf` with a
//! double-precision sum over 16-wide chunks, and the probabilities meet the values as f16.
//! Small models are chaotic here: one changed bit in a score can move the logits by
//! tenths once activations are requantized, so "close" is not enough.
//!
//! Layout: the cache is paged. A sequence's tokens live in blocks of `block_size` cells
//! listed by its block table; within block `b`, keys are
//! `k[(b * block_size + cell) * kv_width + kv_head * head_dim + d]` and values are
//! transposed, `v[(b * kv_width + kv_head * head_dim + d) * block_size + cell]`, so the
//! value dot runs along contiguous cells. Block boundaries do not change any sum: rows are
//! gathered into one scratch row before each dot.

use crate::team;
use half::f16;

use crate::math::{expf, reduce16, widen_f16};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each position sees at most this many positions, itself included (Mistral's
    /// sliding window); `None`: every earlier position.
    pub window: Option<usize>,
}

/// Cells of a KV cache: f16 (llama.cpp's default, bit-compatible with it) or f32 (for
/// f32 models compared with f32 references).
#[derive(Clone, Copy, Debug)]
pub enum KvCells<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvCells<'_> {
    /// Cell `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            KvCells::F16(c) => c[i].to_f32(),
            KvCells::F32(c) => c[i],
        }
    }

    /// `len` cells from `at`, as f32.
    #[inline]
    fn widen_into(&self, at: usize, dst: &mut [f32]) {
        match self {
            KvCells::F16(c) => widen_f16(&c[at..at + dst.len()], dst),
            KvCells::F32(c) => dst.copy_from_slice(&c[at..at + dst.len()]),
        }
    }
}

/// One layer of a paged KV cache, seen through one sequence's block table.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// Keys of the whole pool, `[block][cell][kv_width]`.
    pub k: KvCells<'a>,
    /// Values of the whole pool, transposed per block: `[block][kv_width][cell]`.
    pub v: KvCells<'a>,
    /// The sequence's blocks, in token order.
    pub blocks: &'a [u32],
    pub block_size: usize,
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

/// Per-task scratch: the f16-rounded query, scores, probabilities.
struct Scratch {
    q: Vec<f32>,
    w: Vec<f32>,
    p: Vec<f32>,
}

/// What one (query row, head) task needs to know.
#[derive(Clone, Copy)]
struct HeadTask<'a> {
    /// This KV head's keys as f32, `[cell][head_dim]`.
    k: &'a [f32],
    /// This KV head's values as f32, `[d][cells]` (rows of `stride`, zero past the
    /// sequence).
    v: &'a [f32],
    stride: usize,
    shape: AttentionShape,
    scale: f32,
    /// Round the query and the attention weights to f16 (as llama.cpp does with an f16
    /// cache); not with an f32 cache.
    round: bool,
    /// Cells `first..visible` are seen.
    first: usize,
    visible: usize,
    tiled_scores: bool,
    tiled_values: bool,
}

/// Scores `w` (with their maximum) to probabilities `p`: ggml's `expf`, a double sum over
/// chunks of 16, and (with an f16 cache) probabilities rounded to f16.
#[inline(always)]
fn softmax(w: &mut [f32], p: &mut [f32], max: f32, round: bool) {
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
    // The probabilities meet the values as f16 (with an f16 cache).
    for (pj, &e) in p.iter_mut().zip(w.iter()) {
        *pj = if round {
            f16::from_f32(e * inv).to_f32()
        } else {
            e * inv
        };
    }
}

multiversion! {
    /// Attention of one query row of one head; `out` gets `head_dim` values.
    fn attend_head(task: HeadTask<'_>, q: &[f32], scratch: &mut Scratch, out: &mut [f32]) {
        let Scratch { q: qf, w, p } = scratch;
        let hd = task.shape.head_dim;
        // The query meets the keys as f16 (with an f16 cache).
        for (d, &x) in qf.iter_mut().zip(q) {
            *d = if task.round { f16::from_f32(x).to_f32() } else { x };
        }
        let mut max = f32::NEG_INFINITY;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = if j >= task.first && j < task.visible {
                let key = &task.k[j * hd..(j + 1) * hd];
                let dot = if task.tiled_scores {
                    dot_tiled(key, qf)
                } else {
                    dot_vec(key, qf)
                };
                dot * task.scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(*wj);
        }
        softmax(w, p, max, task.round);
        // Cells past the visible ones have probability 0 (and finite values).
        let n = round_up64(task.visible);
        for (d, od) in out.iter_mut().enumerate() {
            let row = &task.v[d * task.stride..][..n];
            *od = if task.tiled_values {
                dot_tiled(row, &p[..n])
            } else {
                dot_vec(row, &p[..n])
            };
        }
    }
}

/// `q`: `seq` rows of `heads * head_dim` (already rotated), for positions `pos..pos+seq`.
/// `kv`'s blocks hold at least `pos + seq` cells. Writes `out` like `q`. Spread over the
/// pool by (row, head).
pub fn attend(
    q: &[f32],
    seq: usize,
    pos: usize,
    kv: KvView<'_>,
    s: AttentionShape,
    scale: f32,
    out: &mut [f32],
) {
    attend_with(q, seq, pos, kv, s, scale, out, true, Paths::Best);
}

/// One sequence's part of a batched attention step: its query rows (already rotated)
/// for positions `pos..pos + seq`, its view of the layer's cache, its output rows.
pub struct AttendCall<'a> {
    pub q: &'a [f32],
    pub seq: usize,
    pub pos: usize,
    pub kv: KvView<'a>,
    pub out: &'a mut [f32],
}

/// The attention of every sequence of a batch. Calls of several query rows (prompts) run
/// one after another, each spread over the pool; single-row calls (decode steps) run one
/// per task in one parallel loop, so a step of many short calls forks the pool once
/// instead of three times per sequence. Each call's results are those of [`attend`].
pub fn attend_batch(calls: &mut [AttendCall<'_>], s: AttentionShape, scale: f32) {
    let singles = calls.iter().filter(|c| c.seq == 1).count();
    for c in calls.iter_mut().filter(|c| c.seq != 1 || singles == 1) {
        attend_with(c.q, c.seq, c.pos, c.kv, s, scale, c.out, true, Paths::Best);
    }
    if singles > 1 {
        team::for_each_chunk_mut(
            calls,
            1,
            || (),
            |_, _, c| {
                if let [c] = c {
                    if c.seq == 1 {
                        attend_with(c.q, c.seq, c.pos, c.kv, s, scale, c.out, false, Paths::Best);
                    }
                }
            },
        );
    }
}

/// Runs `task` on each `(row · heads + head, its head_dim outputs)` of `out`: across the
/// pool with a scratch per worker, or in order with one scratch.
fn for_each_head<S>(
    out: &mut [f32],
    hd: usize,
    parallel: bool,
    scratch: impl Fn() -> S + Sync + Send,
    task: impl Fn(&mut S, (usize, &mut [f32])) + Sync + Send,
) {
    if parallel {
        team::for_each_chunk_mut(out, hd, scratch, |sc, i, o| task(sc, (i, o)));
    } else {
        let mut sc = scratch();
        out.chunks_mut(hd)
            .enumerate()
            .for_each(|item| task(&mut sc, item));
    }
}

/// What the in-place decode paths read besides the query: the f16 cache, the sequence's
/// blocks, where its KV head sits in a cell (`offset` of `width`), the cells it sees
/// (`first..total`) and the score scale.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct InPlace<'a> {
    k: &'a [f16],
    v: &'a [f16],
    blocks: &'a [u32],
    offset: usize,
    width: usize,
    first: usize,
    total: usize,
    scale: f32,
}

/// Which code an attention call may take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Paths {
    /// The fastest this CPU has.
    Best,
    /// One query row over an f16 cache: the AVX2 in-place path, even where AVX-512 is
    /// (to test it).
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
    /// The portable path over widened rows: the specification the others are tested
    /// against.
    #[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
    Widened,
}

#[allow(clippy::too_many_arguments)]
fn attend_with(
    q: &[f32],
    seq: usize,
    pos: usize,
    kv: KvView<'_>,
    s: AttentionShape,
    scale: f32,
    out: &mut [f32],
    parallel: bool,
    paths: Paths,
) {
    let hd = s.head_dim;
    let n_rep = s.heads / s.kv_heads;
    let padded = round_up64(pos + seq);
    assert!(
        kv.blocks.len() * kv.block_size >= pos + seq,
        "the block table must cover every visible cell"
    );
    // llama.cpp hands matmuls with two or more query rows to tinyBLAS and single rows to
    // ggml_vec_dot_f16; the two sum in different orders. tinyBLAS declines a key length
    // that is not a multiple of 16 (scores) and a head size not a multiple of 4 (values).
    let tiled_scores = seq >= 2 && hd.is_multiple_of(16);
    let tiled_values = seq >= 2 && hd.is_multiple_of(4);
    // The sequence's keys and values as f32, converted once per call (not once per query
    // row and head): keys `[kv_head][cell][d]`, values `[kv_head][d][cell]` with rows of
    // `padded` cells, zero past the sequence.
    let total = pos + seq;
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let avx512 = paths == Paths::Best && crate::has_avx512_vnni();
    #[cfg(target_arch = "x86_64")]
    if seq >= 2 && hd.is_multiple_of(16) && hd <= 256 && avx512 {
        // Several query rows (a prompt): 16 keys' scores and 16 output dims at a time.
        let round = matches!(kv.k, KvCells::F16(_));
        return rows512::attend(q, seq, pos, kv, s, scale, out, round, parallel);
    }
    #[cfg(target_arch = "x86_64")]
    if let (1, KvCells::F16(kc), KvCells::F16(vc), 16, true, true) = (
        seq,
        kv.k,
        kv.v,
        kv.block_size,
        hd.is_multiple_of(64) && hd <= 128,
        paths != Paths::Widened && crate::has_avx2(),
    ) {
        // One query row over an f16 cache: read the paged cells where they are.
        let used = &kv.blocks[..total.div_ceil(16)];
        let cells = (used.iter().max().map_or(0, |&b| b as usize) + 1) * 16 * s.kv_heads * hd;
        assert!(
            cells <= kc.len() && cells <= vc.len(),
            "a block of the table lies outside the cache"
        );
        let first = s.window.map_or(0, |w| total.saturating_sub(w));
        // Query heads sharing a KV head go together, as many as keep their registers
        // (queries and accumulators) within the 32 of AVX-512; one at a time with AVX2's 16.
        let most = match (avx512, hd) {
            (false, _) => 1,
            (true, 64) => 4,
            (true, _) => 2,
        };
        let group = (1..=most)
            .rev()
            .find(|r| n_rep.is_multiple_of(*r))
            .unwrap_or(1);
        let scratch = || {
            (
                vec![0f32; group * padded],
                vec![0f32; group * padded],
                Vec::new(),
            )
        };
        let head = |(w, p, offs): &mut (Vec<f32>, Vec<f32>, Vec<usize>),
                    (i, o): (usize, &mut [f32])| {
            let h = i * group;
            let g = h / n_rep;
            let q = &q[h * hd..(h + group) * hd];
            let c = InPlace {
                k: kc,
                v: vc,
                blocks: kv.blocks,
                offset: g * hd,
                width: s.kv_heads * hd,
                first,
                total,
                scale,
            };
            // SAFETY: AVX-512 (or, for group 1 without it, AVX2) detected; the table
            // covers `total` cells (asserted above); `group` divides the heads of a KV
            // head, so the `group` heads share `g`.
            unsafe {
                match group {
                    1 if !avx512 => decode256::head(c, q, w, p, o),
                    1 if hd == 64 => decode512::heads::<1, 64>(c, q, w, p, offs, o),
                    1 => decode512::heads::<1, 128>(c, q, w, p, offs, o),
                    2 if hd == 64 => decode512::heads::<2, 64>(c, q, w, p, offs, o),
                    2 => decode512::heads::<2, 128>(c, q, w, p, offs, o),
                    3 if hd == 64 => decode512::heads::<3, 64>(c, q, w, p, offs, o),
                    3 => decode512::heads::<3, 128>(c, q, w, p, offs, o),
                    _ if hd == 64 => decode512::heads::<4, 64>(c, q, w, p, offs, o),
                    _ => decode512::heads::<4, 128>(c, q, w, p, offs, o),
                }
            }
        };
        for_each_head(out, group * hd, parallel, scratch, head);
        return;
    }
    crate::with_reused(&WIDE, |(kf, vf)| {
        kf.resize(s.kv_heads * total * hd, 0.0);
        vf.resize(s.kv_heads * hd * padded, 0.0);
        widen(kv, s, total, padded, kf, vf, parallel);
        let (kf, vf) = (&kf[..], &vf[..]);
        let scratch = || Scratch {
            q: vec![0f32; hd],
            w: vec![0f32; padded],
            p: vec![0f32; padded],
        };
        let head = |scratch: &mut Scratch, (idx, o): (usize, &mut [f32])| {
            let (t, h) = (idx / s.heads, idx % s.heads);
            let g = h / n_rep;
            let task = HeadTask {
                k: &kf[g * total * hd..(g + 1) * total * hd],
                v: &vf[g * hd * padded..(g + 1) * hd * padded],
                stride: padded,
                shape: s,
                scale,
                round: matches!(kv.k, KvCells::F16(_)),
                first: s.window.map_or(0, |w| (pos + t + 1).saturating_sub(w)),
                visible: pos + t + 1,
                tiled_scores,
                tiled_values,
            };
            attend_head(task, &q[idx * hd..(idx + 1) * hd], scratch, o);
        };
        for_each_head(out, hd, parallel, scratch, head);
    });
}

/// Asks for `lines` cache lines of f16 cells from `p` (prefetch `HINT`): the in-place
/// decode paths read a cache whose blocks lie scattered over the pool, where the
/// hardware's prefetchers find no stream.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ask<const HINT: i32>(p: *const f16, lines: usize) {
    crate::prefetch_lines::<HINT>(p as *const u8, lines)
}

/// [`decode512`] for CPUs with AVX2 but not AVX-512: one query row of one head over an
/// f16 cache with 16-cell blocks, read in place, with exactly [`attend_head`]'s operations
/// on widened rows; each 16-lane accumulator of `dot_vec` is a pair of 8-lane registers.
#[cfg(target_arch = "x86_64")]
mod decode256 {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline(always)]
    unsafe fn wide(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// `reduce16` of the 16 lanes `lo ++ hi`: `t3 = hi + lo`, then halves of 4, then
    /// `(0+2) + (1+3)`.
    #[inline(always)]
    unsafe fn reduce(lo: __m256, hi: __m256) -> f32 {
        let t3 = _mm256_add_ps(hi, lo);
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let r = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// `(a0 + a2) + (a1 + a3)` of one half.
    #[inline(always)]
    unsafe fn fold(a: &[[__m256; 2]; 4], h: usize) -> __m256 {
        _mm256_add_ps(
            _mm256_add_ps(a[0][h], a[2][h]),
            _mm256_add_ps(a[1][h], a[3][h]),
        )
    }

    /// # Safety
    /// AVX2, FMA and F16C; `q` holds one head of `hd` (64 or 128); `blocks` covers
    /// `total` cells of 16; `w`, `p` hold `total` rounded up to 64; `out` holds `hd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn head(
        c: super::InPlace<'_>,
        q: &[f32],
        w: &mut [f32],
        p: &mut [f32],
        out: &mut [f32],
    ) {
        let super::InPlace {
            k,
            v,
            blocks,
            offset,
            width,
            first,
            total,
            scale,
        } = c;
        let hd = q.len();
        // The query meets the keys as f16.
        let mut qf = [0f32; 128];
        for (d, &x) in qf.iter_mut().zip(q) {
            *d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(x),
            )));
        }
        let zero = _mm256_setzero_ps();
        let mut max = f32::NEG_INFINITY;
        // As `decode512` asks for them: the key 32 cells on, and a line or two of this
        // block's values, beside each key's products.
        let lines = hd / 32;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = if j >= first && j < total {
                let cell = blocks[j / 16] as usize * 16 + j % 16;
                if j + 32 < total {
                    let ahead = blocks[(j + 32) / 16] as usize * 16 + j % 16;
                    super::ask::<_MM_HINT_T0>(k.as_ptr().add(ahead * width + offset), lines);
                }
                let vals = v
                    .as_ptr()
                    .add((blocks[j / 16] as usize * width + offset) * 16);
                super::ask::<_MM_HINT_T1>(vals.add(hd * (j % 16)), lines);
                let key = k.as_ptr().add(cell * width + offset);
                let mut acc = [[zero; 2]; 4];
                for c in 0..hd / 64 {
                    for (i, a) in acc.iter_mut().enumerate() {
                        for (h, ah) in a.iter_mut().enumerate() {
                            let at = 64 * c + 16 * i + 8 * h;
                            let qv = _mm256_loadu_ps(qf.as_ptr().add(at));
                            *ah = _mm256_fmadd_ps(wide(key.add(at)), qv, *ah);
                        }
                    }
                }
                reduce(fold(&acc, 0), fold(&acc, 1)) * scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(*wj);
        }
        super::softmax(w, p, max, true);
        let used = total.div_ceil(16);
        // Cells past `total` in the last block: zero (as the widened rows are); blocks
        // past it add `0 · 0` to a +0-started accumulator, nothing, and are skipped.
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let keep = |h: i32| {
            let live = if total.is_multiple_of(16) {
                16
            } else {
                (total % 16) as i32
            };
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(live - 8 * h), lanes))
        };
        let tail = [keep(0), keep(1)];
        let all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (d, o) in out.iter_mut().enumerate() {
            let mut acc = [[zero; 2]; 4];
            for b4 in (0..used).step_by(4) {
                for (i, a) in acc.iter_mut().enumerate() {
                    let bi = b4 + i;
                    if bi >= used {
                        break;
                    }
                    let row = v
                        .as_ptr()
                        .add((blocks[bi] as usize * width + offset + d) * 16);
                    for (h, ah) in a.iter_mut().enumerate() {
                        let m = if bi + 1 == used { tail[h] } else { all };
                        let x = _mm256_and_ps(wide(row.add(8 * h)), m);
                        let pv = _mm256_loadu_ps(p.as_ptr().add(16 * bi + 8 * h));
                        *ah = _mm256_fmadd_ps(x, pv, *ah);
                    }
                }
            }
            *o = reduce(fold(&acc, 0), fold(&acc, 1));
        }
    }
}

/// One query row of `R` heads that share a KV head, over an f16 cache with 16-cell
/// blocks, reading the cells in place: for each head exactly the operations of
/// [`attend_head`] on widened rows (`dot_vec`'s four accumulators of 16 lanes: one 16-cell
/// block per accumulator in turn for the values; `reduce16`'s tree), without converting
/// the sequence's cache to f32 first. Each key and value register is loaded once for the
/// `R` heads, and the horizontal sums of 16 cells (or 16 output dims) run as one
/// transposing tree ([`sums16`]) instead of 16 one-register reductions.
#[cfg(target_arch = "x86_64")]
mod decode512 {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline(always)]
    unsafe fn wide(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// Lane `j` = `reduce(f[j])` (`rows512::reduce`'s tree: halves of 8, then 4, then
    /// `(0+2) + (1+3)`), for 16 registers at once: each stage adds the same pairs, with
    /// shuffles gathering them from two registers into one.
    #[inline(always)]
    pub(super) unsafe fn sums16(f: &[__m512; 16]) -> __m512 {
        // t3 = v[i] + v[i+8]: two registers' halves side by side.
        let s: [__m512; 8] = std::array::from_fn(|a| {
            let (x, y) = (f[2 * a], f[2 * a + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xee>(x, y),
            )
        });
        // t6 = t3[i] + t3[i+4]: quarters hold cells 4b..4b+4.
        let u: [__m512; 4] = std::array::from_fn(|b| {
            let (x, y) = (s[2 * b], s[2 * b + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xdd>(x, y),
            )
        });
        // r = t6[i] + t6[i+2]: quarter q holds cells (8c + q, 8c + 4 + q).
        let v: [__m512; 2] = std::array::from_fn(|c| {
            let (x, y) = (u[2 * c], u[2 * c + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xee>(x, y),
            )
        });
        // r[0] + r[1]: lane 4q + e holds cell q + 4e; put cell j in lane j.
        let z = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(v[0], v[1]),
            _mm512_shuffle_ps::<0xdd>(v[0], v[1]),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, z)
    }

    /// # Safety
    /// AVX-512F/DQ and F16C; `q` holds `R` heads of `hd` (64 or 128); `blocks` covers
    /// `total` cells of 16; `w`, `p` hold `R` × (`total` rounded up to 64); `out` holds
    /// `R · hd`.
    // `r` indexes the heads' parallel arrays of registers (queries, accumulators, sums).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn heads<const R: usize, const HD: usize>(
        c: super::InPlace<'_>,
        q: &[f32],
        w: &mut [f32],
        p: &mut [f32],
        offs: &mut Vec<usize>,
        out: &mut [f32],
    ) {
        let super::InPlace {
            k,
            v,
            blocks,
            offset,
            width,
            first,
            total,
            scale,
        } = c;
        // A constant head size: the key loop unrolls and the queries stay in registers.
        let hd = HD;
        debug_assert_eq!(q.len(), R * HD);
        let chunks = hd / 16;
        let zero = _mm512_setzero_ps();
        // The queries meet the keys as f16.
        let mut qf = [[zero; 8]; R];
        for (r, qr) in qf.iter_mut().enumerate() {
            for (c, qc) in qr.iter_mut().enumerate().take(chunks) {
                let x = _mm512_loadu_ps(q.as_ptr().add(r * hd + 16 * c));
                *qc = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            }
        }
        let used = total.div_ceil(16);
        let padded = w.len() / R;
        let (w, p) = (w.as_mut_ptr(), p.as_mut_ptr());
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); R];
        let mut f = [[zero; 16]; R];
        // Each block's keys are asked for two blocks ahead, and its values (read after
        // the softmax) into L2 while its keys are scored, a line or two beside each key's
        // products (not in bursts).
        const AHEAD: usize = 2;
        let key_at =
            |block: u32, x: usize| k.as_ptr().add((block as usize * 16 + x) * width + offset);
        let lines = hd / 32;
        for &b in blocks.iter().take(used.min(AHEAD)) {
            (0..16).for_each(|x| super::ask::<_MM_HINT_T0>(key_at(b, x), lines));
        }
        for (bi, &block) in blocks.iter().enumerate().take(used) {
            // Asked for beside each key's products: a key of the block `AHEAD` on, and
            // a sixteenth of this block's values.
            let ahead = blocks.get(bi + AHEAD).filter(|_| bi + AHEAD < used);
            let vals = v.as_ptr().add((block as usize * width + offset) * 16);
            for (x, fx) in (0..16).zip(0..) {
                if let Some(&b) = ahead {
                    super::ask::<_MM_HINT_T0>(key_at(b, x), lines);
                }
                super::ask::<_MM_HINT_T1>(vals.add(hd * x), lines);
                let key = key_at(block, x);
                let mut acc = [[zero; 4]; R];
                for c in 0..hd / 64 {
                    for i in 0..4 {
                        let kx = wide(key.add(64 * c + 16 * i));
                        for r in 0..R {
                            acc[r][i] = _mm512_fmadd_ps(kx, qf[r][4 * c + i], acc[r][i]);
                        }
                    }
                }
                for r in 0..R {
                    let a = &acc[r];
                    f[r][fx] = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
                }
            }
            // Cells before the window or past the sequence: −∞.
            let j0 = 16 * bi;
            let seen = |j: usize| j >= first && j < total;
            let mask = (0..16).fold(0u16, |m, x| m | ((seen(j0 + x) as u16) << x));
            for r in 0..R {
                let sc = _mm512_mul_ps(sums16(&f[r]), _mm512_set1_ps(scale));
                let sc = _mm512_mask_blend_ps(mask, _mm512_set1_ps(f32::NEG_INFINITY), sc);
                _mm512_storeu_ps(w.add(r * padded + j0), sc);
                // max(s, m) keeps m where s is NaN, as `f32::max` does.
                max[r] = _mm512_max_ps(sc, max[r]);
            }
        }
        for r in 0..R {
            let (wr, pr) = (
                std::slice::from_raw_parts_mut(w.add(r * padded), padded),
                std::slice::from_raw_parts_mut(p.add(r * padded), padded),
            );
            super::rows512::softmax16(wr, pr, _mm512_reduce_max_ps(max[r]), used, true);
        }
        // Cells past `total` in the last block: zero (as the widened rows are). Blocks past
        // the last add `0 · 0` to a +0-started accumulator: nothing, so they are skipped.
        let tail: __mmask16 = if total.is_multiple_of(16) {
            0xffff
        } else {
            (1u16 << (total % 16)) - 1
        };
        // Where each block's values begin, looked up once for all output dims (not once
        // per dim and block), and how many blocks are read whole.
        offs.clear();
        offs.extend(
            blocks[..used]
                .iter()
                .map(|&b| (b as usize * width + offset) * 16),
        );
        let whole = if total.is_multiple_of(16) {
            used
        } else {
            used - 1
        };
        let vals = Values {
            v: v.as_ptr(),
            offs,
            p,
            padded,
            used,
            whole,
            tail,
        };
        // Two output dims a round where their accumulators fit the registers beside the
        // heads' (each head's probabilities are then loaded once for both).
        for d0 in (0..hd).step_by(16) {
            if R <= 3 {
                values::<R, 2>(&vals, d0, &mut f);
            } else {
                values::<R, 1>(&vals, d0, &mut f);
            }
            for r in 0..R {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * hd + d0), sums16(&f[r]));
            }
        }
    }

    /// What [`values`] reads: the value cache, where each used block's values begin,
    /// the heads' probabilities (`padded` apart), and which blocks are read whole.
    struct Values<'a> {
        v: *const f16,
        offs: &'a [usize],
        p: *const f32,
        padded: usize,
        used: usize,
        whole: usize,
        tail: __mmask16,
    }

    /// Output dims `d0..d0 + 16` of `R` heads, `D` dims a round: `f[r][x]` gets dim
    /// `d0 + x`'s four accumulators folded, block `bi` having gone into accumulator
    /// `bi % 4` (four whole blocks a round, so that the index is a constant).
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn values<const R: usize, const D: usize>(
        c: &Values<'_>,
        d0: usize,
        f: &mut [[__m512; 16]; R],
    ) {
        let zero = _mm512_setzero_ps();
        let (p, padded, offs) = (c.p, c.padded, c.offs);
        // Dim `d` of block `bi`'s 16 cells (`offs` has an entry for each used block).
        let row = |bi: usize, d: usize| c.v.add(*offs.get_unchecked(bi) + 16 * d) as *const __m256i;
        for x0 in (0..16).step_by(D) {
            let mut acc = [[[zero; 4]; R]; D];
            let mut b4 = 0;
            while b4 + 4 <= c.whole {
                for i in 0..4 {
                    let bi = b4 + i;
                    let mut xs = [zero; D];
                    for e in 0..D {
                        xs[e] = _mm512_cvtph_ps(_mm256_loadu_si256(row(bi, d0 + x0 + e)));
                    }
                    for r in 0..R {
                        let pv = _mm512_loadu_ps(p.add(r * padded + 16 * bi));
                        for e in 0..D {
                            acc[e][r][i] = _mm512_fmadd_ps(xs[e], pv, acc[e][r][i]);
                        }
                    }
                }
                b4 += 4;
            }
            // The rest: up to three whole blocks and the partly filled last one.
            for i in 0..4 {
                let bi = b4 + i;
                if bi >= c.used {
                    break;
                }
                let m = if bi < c.whole { 0xffff } else { c.tail };
                let mut xs = [zero; D];
                for e in 0..D {
                    xs[e] = _mm512_maskz_cvtph_ps(m, _mm256_loadu_si256(row(bi, d0 + x0 + e)));
                }
                for r in 0..R {
                    let pv = _mm512_loadu_ps(p.add(r * padded + 16 * bi));
                    for e in 0..D {
                        acc[e][r][i] = _mm512_fmadd_ps(xs[e], pv, acc[e][r][i]);
                    }
                }
            }
            for e in 0..D {
                for r in 0..R {
                    let a = &acc[e][r];
                    f[r][x0 + e] =
                        _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
                }
            }
        }
    }
}

/// Several query rows of a sequence with AVX-512, exactly the operations of
/// [`attend_head`]'s tiled paths (llamafile tinyBLAS's orders): the keys are widened
/// transposed (`[kv_head][d][cell]`) so that one register holds lane `x` of 16 keys'
/// score accumulators, and the values cell-major (`[kv_head][cell][d]`) so that one
/// register holds lane `x` of 16 output dims; `reduce16`'s tree then runs across
/// registers. The softmax uses [`crate::math::x86::expf16`], ggml's `expf` on 16 lanes.
#[cfg(target_arch = "x86_64")]
mod rows512 {
    use std::arch::x86_64::*;

    use super::{round_up64, AttentionShape, KvView};
    use crate::math::x86::expf16;

    /// `reduce16` of one register's lanes: halves of 8, then 4, then (0+2) + (1+3).
    #[inline(always)]
    pub(super) unsafe fn reduce(v: __m512) -> f32 {
        let t3 = _mm256_add_ps(_mm512_extractf32x8_ps(v, 1), _mm512_castps512_ps256(v));
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let r = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// A widened value row's length: `padded` cells and one line more, so that the rows
    /// of a head (read 16 cells at a time down several of them) do not fall on the same
    /// few cache sets, as a power-of-two stride makes them.
    fn value_stride(padded: usize) -> usize {
        padded + 16
    }

    /// Keys `[kv_head][cell][d]` and values transposed, `[kv_head][d][cell]` (rows of
    /// [`value_stride`]), `padded` cells each, zero past `total`: both read as vectors
    /// along the dimension each product sums over.
    fn widen(
        kv: KvView<'_>,
        s: AttentionShape,
        total: usize,
        padded: usize,
        kn: &mut [f32],
        vt: &mut [f32],
    ) {
        let hd = s.head_dim;
        let vs = value_stride(padded);
        let width = s.kv_heads * hd;
        let bs = kv.block_size;
        kn.fill(0.0);
        vt.fill(0.0);
        for g in 0..s.kv_heads {
            let (kn, vt) = (
                &mut kn[g * padded * hd..(g + 1) * padded * hd],
                &mut vt[g * hd * vs..(g + 1) * hd * vs],
            );
            for j in 0..total {
                let cell = kv.blocks[j / bs] as usize * bs + j % bs;
                kv.k.widen_into(cell * width + g * hd, &mut kn[j * hd..(j + 1) * hd]);
            }
            for (bi, &b) in kv.blocks.iter().enumerate().take(total.div_ceil(bs)) {
                let cells = (total - bi * bs).min(bs);
                for d in 0..hd {
                    let at = d * vs + bi * bs;
                    kv.v.widen_into(
                        (b as usize * width + g * hd + d) * bs,
                        &mut vt[at..at + cells],
                    );
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        q: &[f32],
        seq: usize,
        pos: usize,
        kv: KvView<'_>,
        s: AttentionShape,
        scale: f32,
        out: &mut [f32],
        round: bool,
        parallel: bool,
    ) {
        let hd = s.head_dim;
        let n_rep = s.heads / s.kv_heads;
        let total = pos + seq;
        let padded = round_up64(total);
        let vs = value_stride(padded);
        // The widened cache in this thread's buffers, reused from call to call (`widen`
        // writes every element).
        crate::with_reused(&super::WIDE, |(kn, vt)| {
            kn.resize(s.kv_heads * padded * hd, 0.0);
            vt.resize(s.kv_heads * hd * vs, 0.0);
            let (kn, vt) = (
                &mut kn[..s.kv_heads * padded * hd],
                &mut vt[..s.kv_heads * hd * vs],
            );
            widen(kv, s, total, padded, kn, vt);
            let (kn, vt) = (&kn[..], &vt[..]);
            // One task per head and block of up to four query rows: each key and value
            // vector loaded serves the block's rows.
            let blocks = seq.div_ceil(ROWS);
            // Each task writes only its own rows of its head (see `block`).
            let out_at = crate::OutPtr(out.as_mut_ptr());
            let scratch = || (vec![0f32; ROWS * padded], vec![0f32; ROWS * padded]);
            let task = |(w, p): &mut (Vec<f32>, Vec<f32>), idx: usize| {
                let (h, t0) = (idx % s.heads, idx / s.heads * ROWS);
                let rows = (seq - t0).min(ROWS);
                let g = h / n_rep;
                let rows_of = Rows {
                    q,
                    heads: s.heads,
                    hd,
                    h,
                    t0,
                    rows,
                    pos,
                    window: s.window,
                    kn: &kn[g * padded * hd..(g + 1) * padded * hd],
                    vt: &vt[g * hd * vs..(g + 1) * hd * vs],
                    padded,
                    scale,
                    round,
                };
                // SAFETY: AVX-512 detected by the caller; the slices hold what the kernel
                // reads; this task alone writes rows t0.. of head h.
                unsafe {
                    let out = &out_at;
                    block(&rows_of, w, p, out.0)
                }
            };
            let n = blocks * s.heads;
            if parallel {
                crate::team::for_each_init(n, scratch, task);
            } else {
                let mut sc = scratch();
                (0..n).for_each(|i| task(&mut sc, i));
            }
        })
    }

    /// Query rows per task.
    const ROWS: usize = 4;

    /// Which query rows a task takes (rows `t0..t0 + rows` of the call, head `h`) and
    /// what it reads: its KV head's widened keys `kn` (`padded` cells of `hd`) and values
    /// `vt` (`hd` rows of [`value_stride`]), the score scale, whether to round to f16.
    struct Rows<'a> {
        q: &'a [f32],
        heads: usize,
        hd: usize,
        h: usize,
        t0: usize,
        rows: usize,
        pos: usize,
        window: Option<usize>,
        kn: &'a [f32],
        vt: &'a [f32],
        padded: usize,
        scale: f32,
        round: bool,
    }

    impl Rows<'_> {
        /// The cells row `r` of the block sees: `first..visible`.
        fn seen(&self, r: usize) -> (usize, usize) {
            let visible = self.pos + self.t0 + r + 1;
            (
                self.window.map_or(0, |w| visible.saturating_sub(w)),
                visible,
            )
        }
    }

    /// One head's block of query rows: exactly [`super::attend_head`]'s tiled operations
    /// per row (tinyBLAS's orders: each score sums its dims in 16 lanes, `d = x, x + 16,
    /// …` into lane `x`, then `reduce16`; each output dim its cells likewise), four
    /// products at a time against each loaded key (or value) vector, the 16 sums of a
    /// tile reduced at once ([`super::decode512::sums16`]). Rows past a row's last
    /// visible cell score −∞ there and weigh 0, which changes none of its sums.
    ///
    /// # Safety
    /// AVX-512F/DQ; `c.kn` holds `c.padded` keys of `c.hd`, `c.vt` `c.hd` rows of
    /// `value_stride(c.padded)`; `w`, `p` hold `ROWS · c.padded`; `out` is the call's
    /// output, rows `t0..t0 + rows` of head `h` written by this call alone.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn block(c: &Rows<'_>, w: &mut [f32], p: &mut [f32], out: *mut f32) {
        match c.rows {
            1 => tile::<1>(c, w, p, out),
            2 => tile::<2>(c, w, p, out),
            3 => tile::<3>(c, w, p, out),
            _ => tile::<4>(c, w, p, out),
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(c: &Rows<'_>, w: &mut [f32], p: &mut [f32], out: *mut f32) {
        let (kn, vt, padded, scale, round) = (c.kn, c.vt, c.padded, c.scale, c.round);
        let hd = c.hd;
        let vs = value_stride(padded);
        let zero = _mm512_setzero_ps();
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        // The queries meet the keys as f16 (with an f16 cache).
        let mut qf = [[0f32; 256]; R];
        for (r, qr) in qf.iter_mut().enumerate() {
            let at = ((c.t0 + r) * c.heads + c.h) * hd;
            for (d, &x) in qr.iter_mut().zip(&c.q[at..at + hd]) {
                *d = if round {
                    half::f16::from_f32(x).to_f32()
                } else {
                    x
                };
            }
        }
        let (w, p) = (w.as_mut_ptr(), p.as_mut_ptr());
        // Keys as far as the last row sees, in quads: 16 scores (R rows × 4 keys, the
        // rest unused) per reduction.
        let (_, last) = c.seen(R - 1);
        let first = c.seen(0).0;
        let keys = last.div_ceil(16) * 16;
        let mut f = [zero; 16];
        for k0 in (first / 4 * 4..keys).step_by(4) {
            let mut acc = [[zero; 4]; R];
            for s in 0..hd / 16 {
                let kv: [__m512; 4] = std::array::from_fn(|k| {
                    _mm512_loadu_ps(kn.as_ptr().add((k0 + k) * hd + 16 * s))
                });
                for r in 0..R {
                    let qv = _mm512_loadu_ps(qf[r].as_ptr().add(16 * s));
                    for k in 0..4 {
                        acc[r][k] = _mm512_fmadd_ps(kv[k], qv, acc[r][k]);
                    }
                }
            }
            for r in 0..R {
                for k in 0..4 {
                    f[4 * r + k] = acc[r][k];
                }
            }
            let sc = _mm512_mul_ps(super::decode512::sums16(&f), _mm512_set1_ps(scale));
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), sc);
            for r in 0..R {
                std::ptr::copy_nonoverlapping(lanes.as_ptr().add(4 * r), w.add(r * padded + k0), 4);
            }
        }
        // Each row: −∞ outside what it sees, its maximum, its probabilities.
        let mut most = 0;
        for r in 0..R {
            let (lo, hi) = c.seen(r);
            let wr = std::slice::from_raw_parts_mut(w.add(r * padded), padded);
            let pr = std::slice::from_raw_parts_mut(p.add(r * padded), padded);
            let chunks = hi.div_ceil(16);
            let mut maxv = ninf;
            for ch in 0..padded / 16 {
                let j0 = 16 * ch;
                let x = if ch < chunks && j0 + 16 > lo {
                    let a = (lo.saturating_sub(j0)).min(16);
                    let b = (hi - j0.min(hi)).min(16);
                    let seen: __mmask16 = (((1u32 << b) - 1) & !((1u32 << a) - 1)) as u16;
                    _mm512_mask_blend_ps(seen, ninf, _mm512_loadu_ps(wr.as_ptr().add(j0)))
                } else {
                    ninf
                };
                _mm512_storeu_ps(wr.as_mut_ptr().add(j0), x);
                // f32::max skips NaN as `max_ps(new, old)` does (it returns old then).
                maxv = _mm512_max_ps(x, maxv);
            }
            let lanes: [f32; 16] = std::mem::transmute(maxv);
            let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            softmax16(wr, pr, max, chunks, round);
            most = most.max(round_up64(hi));
        }
        // Values, four dims at a time against each row's probabilities: lane x of dim d
        // sums cells x, x + 16, ... in order (cells past a row's own end weigh 0).
        for d0 in (0..hd).step_by(4) {
            let mut acc = [[zero; 4]; R];
            for ch in 0..most / 16 {
                let pv: [__m512; R] =
                    std::array::from_fn(|r| _mm512_loadu_ps(p.add(r * padded + 16 * ch)));
                for k in 0..4 {
                    let v = _mm512_loadu_ps(vt.as_ptr().add((d0 + k) * vs + 16 * ch));
                    for r in 0..R {
                        acc[r][k] = _mm512_fmadd_ps(v, pv[r], acc[r][k]);
                    }
                }
            }
            for r in 0..R {
                for k in 0..4 {
                    f[4 * r + k] = acc[r][k];
                }
            }
            let o = super::decode512::sums16(&f);
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), o);
            for r in 0..R {
                let at = ((c.t0 + r) * c.heads + c.h) * hd + d0;
                std::ptr::copy_nonoverlapping(lanes.as_ptr().add(4 * r), out.add(at), 4);
            }
        }
    }

    /// [`super::softmax`] with [`expf16`]: the first `chunks` chunks of 16 scores hold
    /// every seen key (the later ones, all −∞, give exact zeros to the sum and to `p`).
    ///
    /// # Safety
    /// AVX-512F/DQ and F16C; `w` and `p` hold the same multiple of 16, at least
    /// `16 · chunks`.
    #[inline(always)]
    pub(super) unsafe fn softmax16(
        w: &mut [f32],
        p: &mut [f32],
        max: f32,
        chunks: usize,
        round: bool,
    ) {
        let mut sum = 0f64;
        let maxb = _mm512_set1_ps(max);
        for ch in 0..chunks {
            let e = expf16(_mm512_sub_ps(
                _mm512_loadu_ps(w.as_ptr().add(16 * ch)),
                maxb,
            ));
            _mm512_storeu_ps(w.as_mut_ptr().add(16 * ch), e);
            sum += reduce(e) as f64;
        }
        let inv = _mm512_set1_ps((1.0 / sum) as f32);
        for ch in 0..p.len() / 16 {
            let x = if ch < chunks {
                let e = _mm512_mul_ps(_mm512_loadu_ps(w.as_ptr().add(16 * ch)), inv);
                if round {
                    _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(e))
                } else {
                    e
                }
            } else {
                _mm512_setzero_ps()
            };
            _mm512_storeu_ps(p.as_mut_ptr().add(16 * ch), x);
        }
    }
}

thread_local! {
    /// Widened keys and values, reused across calls on the calling thread.
    static WIDE: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Gathers the first `total` cells of the sequence from its blocks into f32 `kf`
/// (`[kv_head][cell][d]`) and `vf` (`[kv_head][d][padded]`, zero past `total`).
fn widen(
    kv: KvView<'_>,
    s: AttentionShape,
    total: usize,
    padded: usize,
    kf: &mut [f32],
    vf: &mut [f32],
    parallel: bool,
) {
    let hd = s.head_dim;
    let width = s.kv_heads * hd;
    let bs = kv.block_size;
    let keys = |(g, kg): (usize, &mut [f32])| {
        for (j, dst) in kg.chunks_exact_mut(hd).enumerate() {
            let cell = kv.blocks[j / bs] as usize * bs + j % bs;
            kv.k.widen_into(cell * width + g * hd, dst);
        }
    };
    let values = |(r, row): (usize, &mut [f32])| {
        // r = kv_head * hd + d: the row index inside each block's [width][bs] values.
        for (bi, dst) in row[..total].chunks_mut(bs).enumerate() {
            let b = kv.blocks[bi] as usize;
            kv.v.widen_into((b * width + r) * bs, dst);
        }
        row[total..].fill(0.0);
    };
    if parallel {
        team::for_each_chunk_mut(kf, total * hd, || (), |_, i, c| keys((i, c)));
        team::for_each_chunk_mut(vf, padded, || (), |_, i, c| values((i, c)));
    } else {
        kf.chunks_mut(total * hd).enumerate().for_each(keys);
        vf.chunks_mut(padded).enumerate().for_each(values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention on the same f16-rounded inputs; `k`, `v` are `[pos][kv_width]`.
    fn reference(
        q: &[f32],
        seq: usize,
        pos: usize,
        k: &[f16],
        v: &[f16],
        s: AttentionShape,
        scale: f32,
    ) -> Vec<f32> {
        reference_with(q, seq, pos, k, v, s, scale, true)
    }

    /// `reference`, with the query rounded to f16 (as the f16 cache path does) or not.
    #[allow(clippy::too_many_arguments)]
    fn reference_with(
        q: &[f32],
        seq: usize,
        pos: usize,
        k: &[f16],
        v: &[f16],
        s: AttentionShape,
        scale: f32,
        round_q: bool,
    ) -> Vec<f32> {
        let hd = s.head_dim;
        let width = s.kv_heads * hd;
        let mut out = vec![0f32; q.len()];
        for t in 0..seq {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qrow: Vec<f64> = q[(t * s.heads + h) * hd..][..hd]
                    .iter()
                    .map(|&x| {
                        if round_q {
                            f16::from_f32(x).to_f64()
                        } else {
                            x as f64
                        }
                    })
                    .collect();
                let vis = pos + t + 1;
                let first = s.window.map_or(0, |w| vis.saturating_sub(w));
                let scores: Vec<f64> = (first..vis)
                    .map(|j| {
                        let key = &k[j * width + g * hd..][..hd];
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
                    out[(t * s.heads + h) * hd + d] = (first..vis)
                        .map(|j| e[j - first] / z * v[j * width + g * hd + d].to_f64())
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    /// Lays `[pos][width]` rows into a pool of `pool_blocks` blocks along `blocks`.
    fn paged(
        k: &[f16],
        v: &[f16],
        width: usize,
        bs: usize,
        pool_blocks: usize,
        blocks: &[u32],
    ) -> (Vec<f16>, Vec<f16>) {
        let mut kp = vec![f16::from_f32(7.0); pool_blocks * bs * width];
        let mut vp = vec![f16::from_f32(-7.0); pool_blocks * bs * width];
        for j in 0..k.len() / width {
            let b = blocks[j / bs] as usize;
            let cell = j % bs;
            for d in 0..width {
                kp[(b * bs + cell) * width + d] = k[j * width + d];
                vp[(b * width + d) * bs + cell] = v[j * width + d];
            }
        }
        (kp, vp)
    }

    #[test]
    fn paged_attention_matches_plain_attention_and_ignores_the_block_order() {
        for window in [None, Some(4)] {
            check_paged(AttentionShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
                window,
            });
        }
    }

    fn check_paged(s: AttentionShape) {
        let width = s.kv_heads * s.head_dim;
        let bs = 4;
        let (pos, seq) = (5, 6);
        let total = pos + seq; // 11 cells: three blocks, the last one partly used
        let f = |i: usize| (i * 7919 % 1000) as f32 / 500.0 - 1.0;
        let k: Vec<f16> = (0..total * width).map(|i| f16::from_f32(f(i))).collect();
        let v: Vec<f16> = (0..total * width)
            .map(|i| f16::from_f32(f(i + 3)))
            .collect();
        let q: Vec<f32> = (0..seq * s.heads * s.head_dim)
            .map(|i| f(i + 11) * 2.0)
            .collect();
        let want = reference(&q, seq, pos, &k, &v, s, 0.2);
        let mut results = Vec::new();
        for blocks in [[0u32, 1, 2], [4, 0, 2]] {
            let (kp, vp) = paged(&k, &v, width, bs, 5, &blocks);
            let kv = KvView {
                k: KvCells::F16(&kp),
                v: KvCells::F16(&vp),
                blocks: &blocks,
                block_size: bs,
            };
            let mut out = vec![0f32; q.len()];
            attend(&q, seq, pos, kv, s, 0.2, &mut out);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 2e-3, "{a} vs {b}");
            }
            results.push(out);
        }
        assert_eq!(
            results[0], results[1],
            "where the blocks are changes no bit"
        );

        // The first query row of a fresh sequence sees only itself: output = its value.
        let blocks = [3u32];
        let (kp, vp) = paged(&k[..width], &v[..width], width, bs, 5, &blocks);
        let kv = KvView {
            k: KvCells::F16(&kp),
            v: KvCells::F16(&vp),
            blocks: &blocks,
            block_size: bs,
        };
        let mut one = vec![0f32; s.heads * s.head_dim];
        attend(&q[..s.heads * s.head_dim], 1, 0, kv, s, 0.2, &mut one);
        for d in 0..s.head_dim {
            assert_eq!(one[d], v[d].to_f32());
        }

        // An f32 cache holding the same values gives the unrounded result: closer to
        // f64 attention over those values than the f16 path.
        let blocks = [0u32, 1, 2];
        let (kp, vp) = paged(&k, &v, width, bs, 5, &blocks);
        let (k32, v32): (Vec<f32>, Vec<f32>) = (
            kp.iter().map(|x| x.to_f32()).collect(),
            vp.iter().map(|x| x.to_f32()).collect(),
        );
        let kv = KvView {
            k: KvCells::F32(&k32),
            v: KvCells::F32(&v32),
            blocks: &blocks,
            block_size: bs,
        };
        let mut exact = vec![0f32; q.len()];
        attend(&q, seq, pos, kv, s, 0.2, &mut exact);
        let exact_ref = reference_with(&q, seq, pos, &k, &v, s, 0.2, false);
        for (a, b) in exact.iter().zip(&exact_ref) {
            assert!((a - b).abs() < 2e-5, "{a} vs {b}");
        }
    }

    /// The decode path that reads f16 cells in place gives the bits of the path that
    /// widens the cache first: head sizes 64 and 128, positions around block and 64-cell
    /// boundaries, with and without a window, stale cells (NaN too) past the sequence.
    #[test]
    fn in_place_decode_equals_the_widened_path_bit_for_bit() {
        let bs = 16;
        // Query heads per KV head 3, 4 and 1: grouped by 3, 4 or 2 (head size 128), and 1.
        let shapes = [(6, 2), (8, 2), (2, 2)];
        for ((heads, kv_heads), hd) in shapes.into_iter().flat_map(|h| [(h, 64), (h, 128)]) {
            for window in [None, Some(5)] {
                let s = AttentionShape {
                    heads,
                    kv_heads,
                    head_dim: hd,
                    window,
                };
                let width = s.kv_heads * hd;
                let pool = 12;
                let f = |i: usize| (i * 7919 % 1000) as f32 / 500.0 - 1.0;
                let k0: Vec<f16> = (0..pool * bs * width)
                    .map(|i| f16::from_f32(f(i)))
                    .collect();
                let v0: Vec<f16> = (0..pool * bs * width)
                    .map(|i| f16::from_f32(f(i + 5)))
                    .collect();
                let q: Vec<f32> = (0..s.heads * hd).map(|i| f(i + 13) * 3.0).collect();
                for pos in [0usize, 14, 15, 16, 17, 63, 64, 65, 100, 127, 128, 143, 191] {
                    let used = (pos + 1).div_ceil(bs);
                    // Blocks out of order; the last block's unused cells hold stale values.
                    let blocks: Vec<u32> = (0..used as u32).map(|b| (b * 5 + 11) % 12).collect();
                    // Stale NaN in the cells past the sequence of the last block.
                    let (mut kp, mut vp) = (k0.clone(), v0.clone());
                    let last = *blocks.last().unwrap() as usize;
                    if (pos + 1) % bs != 0 {
                        vp[(last * width) * bs + bs - 1] = f16::NAN;
                        kp[(last * bs + bs - 1) * width] = f16::NAN;
                    }
                    let kv = KvView {
                        k: KvCells::F16(&kp),
                        v: KvCells::F16(&vp),
                        blocks: &blocks,
                        block_size: bs,
                    };
                    let mut slow = vec![1f32; q.len()];
                    attend_with(&q, 1, pos, kv, s, 0.125, &mut slow, true, Paths::Widened);
                    for paths in [Paths::Best, Paths::Avx2] {
                        let mut fast = vec![0f32; q.len()];
                        attend_with(&q, 1, pos, kv, s, 0.125, &mut fast, false, paths);
                        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{paths:?} hd {hd} {window:?} pos {pos} [{i}]: {a} vs {b}"
                            );
                        }
                        assert!(fast.iter().all(|x| x.is_finite()));
                    }
                }
            }
        }
    }

    /// The transposing tree gives each register's own `reduce`, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_sums_at_once_equal_one_at_a_time() {
        use std::arch::x86_64::*;
        if !crate::has_avx512_vnni() {
            return;
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Magnitudes over many binades, so that the order of the additions shows.
            let m = ((rng >> 8) % 2000) as f32 / 1000.0 - 1.0;
            m * 2f32.powi((rng % 24) as i32 - 12)
        };
        for _ in 0..200 {
            let vals: Vec<f32> = (0..256).map(|_| next()).collect();
            // SAFETY: AVX-512 detected above.
            unsafe {
                let f: [__m512; 16] =
                    std::array::from_fn(|j| _mm512_loadu_ps(vals.as_ptr().add(16 * j)));
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), decode512::sums16(&f));
                for j in 0..16 {
                    assert_eq!(
                        got[j].to_bits(),
                        rows512::reduce(f[j]).to_bits(),
                        "lane {j}"
                    );
                }
            }
        }
    }

    /// A batch of single-row and multi-row calls gives each call's `attend` result.
    #[test]
    fn a_batch_gives_what_each_call_gives_alone() {
        let s = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
            window: None,
        };
        let (bs, width) = (16, 2 * 64);
        let f = |i: usize| (i * 7919 % 1000) as f32 / 500.0 - 1.0;
        let kp: Vec<f16> = (0..20 * bs * width).map(|i| f16::from_f32(f(i))).collect();
        let vp: Vec<f16> = (0..20 * bs * width)
            .map(|i| f16::from_f32(f(i + 9)))
            .collect();
        // (pos, seq, blocks): two decode steps, one prompt chunk, one more decode step.
        let items: [(usize, usize, Vec<u32>); 4] = [
            (20, 1, vec![3, 7]),
            (0, 1, vec![1]),
            (5, 9, vec![0]),
            (47, 1, vec![2, 4, 6]),
        ];
        let qs: Vec<Vec<f32>> = items
            .iter()
            .enumerate()
            .map(|(n, (_, seq, _))| (0..seq * 6 * 64).map(|i| f(i + 31 * n) * 2.0).collect())
            .collect();
        let alone: Vec<Vec<f32>> = items
            .iter()
            .zip(&qs)
            .map(|((pos, seq, blocks), q)| {
                let mut out = vec![0f32; q.len()];
                let kv = KvView {
                    k: KvCells::F16(&kp),
                    v: KvCells::F16(&vp),
                    blocks,
                    block_size: bs,
                };
                attend(q, *seq, *pos, kv, s, 0.125, &mut out);
                out
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = qs.iter().map(|q| vec![0f32; q.len()]).collect();
        let mut calls: Vec<AttendCall<'_>> = items
            .iter()
            .zip(&qs)
            .zip(outs.iter_mut())
            .map(|(((pos, seq, blocks), q), out)| AttendCall {
                q,
                seq: *seq,
                pos: *pos,
                kv: KvView {
                    k: KvCells::F16(&kp),
                    v: KvCells::F16(&vp),
                    blocks,
                    block_size: bs,
                },
                out,
            })
            .collect();
        attend_batch(&mut calls, s, 0.125);
        drop(calls);
        assert_eq!(outs, alone);
    }

    /// The 16-lane `expf` gives the scalar one's bits: around zero, the ends of the range
    /// (overflow to inf, underflow through subnormals to 0), infinities and NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_expf_equals_the_scalar_one() {
        if !crate::has_avx512_vnni() {
            return;
        }
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0537).collect();
        xs.extend((0..4000).map(|i| -110.0 + i as f32 * 0.05));
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.72,
            88.73,
            -87.3,
        ]);
        xs.extend((0..1000).map(|i| f32::from_bits(0x3f80_0000 ^ (i * 7919))));
        while !xs.len().is_multiple_of(16) {
            xs.push(1.0);
        }
        for chunk in xs.chunks_exact(16) {
            use std::arch::x86_64::__m512;
            let x: [f32; 16] = chunk.try_into().unwrap();
            let got: [f32; 16] = unsafe {
                std::mem::transmute::<__m512, [f32; 16]>(expf16_for_test(std::mem::transmute::<
                    [f32; 16],
                    __m512,
                >(x)))
            };
            for (x, g) in chunk.iter().zip(got) {
                let want = crate::math::expf(*x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "expf({x}): {g} vs {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    unsafe fn expf16_for_test(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        crate::math::x86::expf16(x)
    }

    /// Prompt rows (several query rows) on the AVX-512 path give the bits of the tiled
    /// path: head sizes 32, 64 and 128, f16 and f32 caches, windows, chunks that start
    /// inside a block and end past 64-cell boundaries.
    #[test]
    fn prompt_rows_equal_the_tiled_path_bit_for_bit() {
        let bs = 16;
        let f = |i: usize| (i * 7919 % 1000) as f32 / 500.0 - 1.0;
        for hd in [32usize, 64, 128] {
            for window in [None, Some(7)] {
                let s = AttentionShape {
                    heads: 4,
                    kv_heads: 2,
                    head_dim: hd,
                    window,
                };
                let width = s.kv_heads * hd;
                let pool = 10;
                let k16: Vec<f16> = (0..pool * bs * width)
                    .map(|i| f16::from_f32(f(i)))
                    .collect();
                let v16: Vec<f16> = (0..pool * bs * width)
                    .map(|i| f16::from_f32(f(i + 3)))
                    .collect();
                let k32: Vec<f32> = k16.iter().map(|x| x.to_f32() * 1.1).collect();
                let v32: Vec<f32> = v16.iter().map(|x| x.to_f32() * 0.9).collect();
                for (pos, seq) in [(0usize, 2usize), (0, 17), (5, 60), (30, 70), (64, 9)] {
                    let used = (pos + seq).div_ceil(bs);
                    let blocks: Vec<u32> = (0..used as u32).map(|b| (b * 3 + 2) % 10).collect();
                    let q: Vec<f32> = (0..seq * s.heads * hd).map(|i| f(i + 17) * 3.0).collect();
                    for cells in [0, 1] {
                        let kv = KvView {
                            k: if cells == 0 {
                                KvCells::F16(&k16)
                            } else {
                                KvCells::F32(&k32)
                            },
                            v: if cells == 0 {
                                KvCells::F16(&v16)
                            } else {
                                KvCells::F32(&v32)
                            },
                            blocks: &blocks,
                            block_size: bs,
                        };
                        let mut fast = vec![0f32; q.len()];
                        let mut slow = vec![1f32; q.len()];
                        attend_with(&q, seq, pos, kv, s, 0.17, &mut fast, true, Paths::Best);
                        attend_with(&q, seq, pos, kv, s, 0.17, &mut slow, false, Paths::Widened);
                        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "hd {hd} {window:?} pos {pos} seq {seq} cells {cells} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
