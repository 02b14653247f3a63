//! Quantizing activation rows to int8 blocks of 32, the way ggml's x86 code does it for
//! Q8_0/Q8_1: scale `d = amax / 127` (stored as f16), multiplier `127 / amax`, round half
//! to even; with what the packed matmul needs of the sums.

use half::f16;

use crate::formats::QK;
use crate::packed::Act;

#[inline(always)]
fn quantize_block(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    // The largest magnitude, eight lanes at a time (a maximum is exact in any order; a
    // NaN is skipped, as `f32::max` skips it).
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            let a = v.abs();
            *l = if a > *l { a } else { *l };
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// Activation blocks for the packed matmul (see [`Act`]); `x.len()` must equal
/// `out.len() * 32`.
pub fn quantize_acts_into(x: &[f32], bias: i32, out: &mut [Act]) {
    assert_eq!(x.len(), out.len() * QK, "32 values per block");
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512_vnni() {
        // SAFETY: the features are detected; lengths checked above.
        return unsafe { x86::quantize512(x, bias, out) };
    }
    quantize_plain(x, bias, out);
}

multiversion! {
    /// [`quantize_acts_into`] without AVX-512 (the specification the AVX-512 path is
    /// tested against).
    fn quantize_plain(x: &[f32], bias: i32, out: &mut [Act]) {
        debug_assert_eq!(x.len(), out.len() * QK);
        for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
            let (d, sum) = quantize_block(xs, &mut b.qs);
            b.d = f16::from_f32(d).to_f32();
            // Q8_1's sum as ggml keeps it: an f16 of d · Σq, with the unrounded d.
            b.s = f16::from_f32(d * sum as f32).to_f32();
            for (k, n) in b.neg.iter_mut().enumerate() {
                let lane: i32 = b.qs[4 * k..4 * k + 4].iter().map(|&v| v as i32).sum();
                *n = -bias * lane;
            }
            b.neg_lo = b.neg[..4].iter().sum();
            b.neg_hi = b.neg[4..].iter().sum();
        }
    }
}

/// The same operations on a block's 32 values at once: the maximum magnitude (NaN
/// skipped, as the scalar `>` skips it), `vcvtps2dq`'s round half to even (a NaN product,
/// from an infinite input, becomes 0 as Rust's `as i32` makes it), `vcvtps2ph` for the
/// f16 scale and sum, and the four-element lane sums by `vpdpbusd` against ones.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    #[inline(always)]
    unsafe fn round_f16(v: f32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(v),
        )))
    }

    /// Lane `j` = `op` over the 16 lanes of `f[j]`, for an `op` whose result does not
    /// depend on the order (a maximum of non-NaN values, an integer sum): a transpose by
    /// halves, so 16 reductions cost 43 operations instead of 16 × 8.
    #[inline(always)]
    unsafe fn across16(f: &[__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
        // Pairs of vectors: within each 128-bit lane, [a0∘a2, b0∘b2, a1∘a3, b1∘b3].
        let s: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (f[2 * i], f[2 * i + 1]);
            op(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Fours: 128-bit lane L, element p holds vector 4i + p over elements 4L..4L + 4.
        let t: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(s[2 * i]), _mm512_castps_pd(s[2 * i + 1]));
            op(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // Across the four 128-bit lanes: lane i of the result from `t[i]`'s four.
        let halves = |a: __m512, b: __m512| {
            op(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xee>(a, b),
            )
        };
        let (u, v) = (halves(t[0], t[1]), halves(t[2], t[3]));
        op(
            _mm512_shuffle_f32x4::<0x88>(u, v),
            _mm512_shuffle_f32x4::<0xdd>(u, v),
        )
    }

    /// # Safety
    /// AVX-512F/BW/VL/VNNI and F16C; `x.len() == out.len() * 32`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn quantize512(x: &[f32], bias: i32, out: &mut [Act]) {
        let whole = out.len() / 16 * 16;
        let (head, tail) = out.split_at_mut(whole);
        for (xs, acts) in x.chunks_exact(16 * QK).zip(head.chunks_exact_mut(16)) {
            sixteen(xs, bias, acts);
        }
        for (b, xs) in tail.iter_mut().zip(x[whole * QK..].chunks_exact(QK)) {
            one(xs, bias, b);
        }
    }

    /// Sixteen blocks at once: their maxima and sums reduced side by side, their scales
    /// divided and rounded as one vector; each block's values as [`one`] makes them.
    #[inline(always)]
    unsafe fn sixteen(x: &[f32], bias: i32, out: &mut [Act]) {
        let zero = _mm512_setzero_ps();
        let at = |j: usize, h: usize| _mm512_loadu_ps(x.as_ptr().add(QK * j + 16 * h));
        // max(a, acc) keeps acc where a is NaN, as `if a > acc { a } else { acc }`: no
        // lane of `m` is NaN, so their maximum is the same in any order.
        let m: [__m512; 16] = std::array::from_fn(|j| {
            _mm512_max_ps(
                _mm512_abs_ps(at(j, 1)),
                _mm512_max_ps(_mm512_abs_ps(at(j, 0)), zero),
            )
        });
        let amax = across16(&m, |a, b| _mm512_max_ps(a, b));
        let c127 = _mm512_set1_ps(127.0);
        let d = _mm512_div_ps(amax, c127);
        let id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(amax, zero), c127, amax);
        let mut sums = [_mm512_setzero_si512(); 16];
        for (j, (b, sum)) in out.iter_mut().zip(sums.iter_mut()).enumerate() {
            let idv = _mm512_permutexvar_ps(_mm512_set1_epi32(j as i32), id);
            *sum = values(at(j, 0), at(j, 1), idv, bias, b);
        }
        // A loop, not `sums.map(..)`: a closure does not inherit this function's target
        // features, and `map` left each cast as a call (seen in a serving profile).
        let mut sf = [zero; 16];
        for (f, &s) in sf.iter_mut().zip(&sums) {
            *f = _mm512_castsi512_ps(s);
        }
        let sum = across16(&sf, |a, b| {
            _mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_castps_si512(a),
                _mm512_castps_si512(b),
            ))
        });
        let round = |v: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
        let (mut ds, mut ss) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(ds.as_mut_ptr(), round(d));
        let s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_castps_si512(sum)));
        _mm512_storeu_ps(ss.as_mut_ptr(), round(s));
        for ((b, d), s) in out.iter_mut().zip(ds).zip(ss) {
            (b.d, b.s) = (d, s);
        }
    }

    /// One block.
    #[inline(always)]
    unsafe fn one(xs: &[f32], bias: i32, b: &mut Act) {
        let v0 = _mm512_loadu_ps(xs.as_ptr());
        let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
        // max(a, acc) keeps acc where a is NaN, as `if a > acc { a } else { acc }`.
        let zero = _mm512_setzero_ps();
        let m = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), zero));
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let sum = values(v0, v1, _mm512_set1_ps(id), bias, b);
        let sum = _mm512_reduce_add_epi32(sum);
        b.d = round_f16(d);
        b.s = round_f16(d * sum as f32);
    }

    /// A block's values `v0`, `v1` times `id`, rounded half to even into `b.qs` (a NaN
    /// product, from an infinite input, becomes 0 as Rust's `as i32` makes it), and the
    /// lane sums into `b.neg`; returns the values' sums by lane (16 pairs).
    #[inline(always)]
    unsafe fn values(v0: __m512, v1: __m512, id: __m512, bias: i32, b: &mut Act) -> __m512i {
        let (p0, p1) = (_mm512_mul_ps(v0, id), _mm512_mul_ps(v1, id));
        let r0 = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(p0, p0), p0);
        let r1 = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(p1, p1), p1);
        let q = _mm256_set_m128i(_mm512_cvtepi32_epi8(r1), _mm512_cvtepi32_epi8(r0));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, q);
        if bias == 0 {
            // Formats without a bias (a minimum, or signed values): every correction is 0.
            (b.neg, b.neg_lo, b.neg_hi) = ([0; 8], 0, 0);
            return _mm512_add_epi32(r0, r1);
        }
        let lanes = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), q);
        let neg = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(-bias));
        _mm256_storeu_si256(b.neg.as_mut_ptr() as *mut __m256i, neg);
        b.neg_lo = b.neg[..4].iter().sum();
        b.neg_hi = b.neg[4..].iter().sum();
        _mm512_add_epi32(r0, r1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 path equals the plain one on every field, for ordinary, tied,
    /// zero, huge, infinite and NaN inputs.
    #[test]
    fn every_path_quantizes_alike() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e30,
            -1e-30,
        ];
        let mut x = Vec::new();
        for block in 0..400 {
            for j in 0..QK {
                let r = next();
                let v = match block % 5 {
                    // Ties: amax 127 makes the multiplier 1.
                    0 if j == 0 => 127.0,
                    0 => ((r % 255) as f32 - 127.0) / 2.0,
                    1 => specials[(r % 7) as usize] * if r % 3 == 0 { 1.0 } else { 0.0 },
                    2 if r % 11 == 0 => specials[(r % 7) as usize],
                    3 => 0.0,
                    _ => (r as i64 as f32) * 1e-18,
                };
                x.push(v);
            }
        }
        // Lengths around the vector path's groups of 16 blocks.
        for (bias, n) in [0, 8, 128]
            .into_iter()
            .flat_map(|b| [1, 15, 16, 17, 18, 33, 48, 400].map(|n| (b, n)))
        {
            let x = &x[..n * QK];
            let (mut a, mut b) = (vec![Act::default(); n], vec![Act::default(); n]);
            quantize_acts_into(x, bias, &mut a);
            quantize_plain(x, bias, &mut b);
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert_eq!(a.qs, b.qs, "block {i}");
                assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}");
                assert_eq!(a.s.to_bits(), b.s.to_bits(), "block {i}");
                assert_eq!(
                    (a.neg, a.neg_lo, a.neg_hi),
                    (b.neg, b.neg_lo, b.neg_hi),
                    "block {i}"
                );
            }
        }
    }

    #[test]
    fn round_trip_is_close_and_ties_go_to_even() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let mut q = vec![Act::default(); 2];
        quantize_acts_into(&x, 8, &mut q);
        for (b, xs) in q.iter().zip(x.chunks(QK)) {
            for (&qi, &xi) in b.qs.iter().zip(xs) {
                assert!((qi as f32 * b.d - xi).abs() <= b.d * 0.51 + 1e-3);
            }
            let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert!((b.s - b.d * sum as f32).abs() <= 1e-2 * (1.0 + b.s.abs()));
            let lane0: i32 = b.qs[..4].iter().map(|&v| v as i32).sum();
            assert_eq!(b.neg[0], -8 * lane0);
            assert_eq!(b.neg_lo + b.neg_hi, -8 * sum);
        }
        // amax 127 -> id 1: 2.5 rounds to 2, 3.5 to 4, -2.5 to -2.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -2.5;
        let mut q = [Act::default()];
        quantize_acts_into(&x, 0, &mut q);
        assert_eq!(&q[0].qs[..4], &[127, 2, 4, -2]);
        assert_eq!(q[0].neg, [0; 8]);
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let mut q = [Act::default()];
        quantize_acts_into(&[0.0; 32], 128, &mut q);
        assert_eq!(q[0].qs, [0; 32]);
        assert_eq!(q[0].d, 0.0);
    }

    /// The largest magnitude may sit in any lane, negative too.
    #[test]
    fn amax_is_found_in_every_position() {
        for at in 0..QK {
            let mut x = vec![0.5f32; QK];
            x[at] = -100.0;
            let mut q = [Act::default()];
            quantize_acts_into(&x, 0, &mut q);
            assert_eq!(q[0].qs[at], -127, "position {at}");
            assert_eq!(q[0].d, half::f16::from_f32(100.0 / 127.0).to_f32());
        }
    }
}
