//! Quantized dot products: a weight row (Q4_0, Q4_1, Q8_0) against an activation row
//! quantized to Q8_0/Q8_1.
//!
//! Each scalar reference keeps eight f32 accumulator lanes; lane k takes, per block, the
//! integer sum of products of elements 4k..4k+4, scaled with a fused multiply-add. The
//! lanes are then summed as (l0+l4 + l2+l6) + (l1+l5 + l3+l7). The AVX2 kernels do the
//! same operations in registers, so both give identical bits.

use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

#[inline]
fn hsum8(l: &[f32; 8]) -> f32 {
    let r = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

#[inline]
fn lane_sums(x: &[i32; QK], y: &[i8; QK]) -> [i32; 8] {
    let mut s = [0i32; 8];
    for (k, sk) in s.iter_mut().enumerate() {
        for j in 4 * k..4 * k + 4 {
            *sk += x[j] * y[j] as i32;
        }
    }
    s
}

fn unpack_q4(qs: &[u8; QK / 2], offset: i32) -> [i32; QK] {
    let mut out = [0i32; QK];
    for j in 0..QK / 2 {
        out[j] = (qs[j] & 0x0f) as i32 - offset;
        out[j + QK / 2] = (qs[j] >> 4) as i32 - offset;
    }
    out
}

pub fn dot_q4_0_q8_0_ref(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (a, b) in x.iter().zip(y) {
        let d = a.d.to_f32() * b.d.to_f32();
        let s = lane_sums(&unpack_q4(&a.qs, 8), &b.qs);
        for k in 0..8 {
            acc[k] = d.mul_add(s[k] as f32, acc[k]);
        }
    }
    hsum8(&acc)
}

pub fn dot_q4_1_q8_1_ref(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (a, b) in x.iter().zip(y) {
        summs += a.m.to_f32() * b.s.to_f32();
        let d = a.d.to_f32() * b.d.to_f32();
        let s = lane_sums(&unpack_q4(&a.qs, 0), &b.qs);
        for k in 0..8 {
            acc[k] = d.mul_add(s[k] as f32, acc[k]);
        }
    }
    hsum8(&acc) + summs
}

pub fn dot_q8_0_q8_0_ref(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (a, b) in x.iter().zip(y) {
        let d = a.d.to_f32() * b.d.to_f32();
        let xi = a.qs.map(|v| v as i32);
        let s = lane_sums(&xi, &b.qs);
        for k in 0..8 {
            acc[k] = d.mul_add(s[k] as f32, acc[k]);
        }
    }
    hsum8(&acc)
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! The same dot products with AVX2 + FMA. Callers must check [`crate::has_avx2`].
    use std::arch::x86_64::*;

    use half::f16;

    use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

    /// Four f16 scales to f32 with one conversion (exact, like `f16::to_f32`). Packing
    /// them in a general register first keeps the compiler from inserting into a vector
    /// register that carries a loop dependency.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(a: f16, b: f16, c: f16, d: f16) -> [f32; 4] {
        let packed = a.to_bits() as u64
            | (b.to_bits() as u64) << 16
            | (c.to_bits() as u64) << 32
            | (d.to_bits() as u64) << 48;
        let v = _mm_cvtph_ps(_mm_cvtsi64_si128(packed as i64));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum8(x: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(x, 1);
        let r = _mm_add_ps(hi, _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// 16 bytes of nibbles -> 32 bytes: low nibbles first, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// Unsigned bytes times signed bytes, summed in groups of four, as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_us8(ux: __m256i, sy: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(ux, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Signed times signed: move the sign of x onto y, then as above.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_i8(x: __m256i, y: __m256i) -> __m256 {
        sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let eight = _mm256_set1_epi8(8);
        for (a, b) in x.iter().zip(y) {
            let [ad, bd, _, _] = scales(a.d, b.d, f16::ZERO, f16::ZERO);
            let d = _mm256_set1_ps(ad * bd);
            let qx = _mm256_sub_epi8(nibbles(a.qs.as_ptr()), eight);
            let qy = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, sum_i8(qx, qy), acc);
        }
        hsum8(acc)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (a, b) in x.iter().zip(y) {
            let [ad, am, bd, bs] = scales(a.d, a.m, b.d, b.s);
            summs += am * bs;
            let d = _mm256_set1_ps(ad * bd);
            let qx = nibbles(a.qs.as_ptr());
            let qy = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, sum_us8(qx, qy), acc);
        }
        hsum8(acc) + summs
    }

    /// Two weight rows against one activation row: the same operations as two calls of
    /// [`dot_q4_1_q8_1`], interleaved so the two dependency chains overlap.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_q8_1_x2(
        x0: &[BlockQ4_1],
        x1: &[BlockQ4_1],
        y: &[BlockQ8_1],
    ) -> [f32; 2] {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut summs0, mut summs1) = (0f32, 0f32);
        for ((a0, a1), b) in x0.iter().zip(x1).zip(y) {
            let [d0, m0, d1, m1] = scales(a0.d, a0.m, a1.d, a1.m);
            let [bd, bs, _, _] = scales(b.d, b.s, f16::ZERO, f16::ZERO);
            summs0 += m0 * bs;
            summs1 += m1 * bs;
            let qy = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            let p0 = sum_us8(nibbles(a0.qs.as_ptr()), qy);
            let p1 = sum_us8(nibbles(a1.qs.as_ptr()), qy);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * bd), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * bd), p1, acc1);
        }
        [hsum8(acc0) + summs0, hsum8(acc1) + summs1]
    }

    /// Two weight rows against one activation row, as two calls of [`dot_q8_0_q8_0`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_q8_0_x2(
        x0: &[BlockQ8_0],
        x1: &[BlockQ8_0],
        y: &[BlockQ8_0],
    ) -> [f32; 2] {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for ((a0, a1), b) in x0.iter().zip(x1).zip(y) {
            let [d0, d1, bd, _] = scales(a0.d, a1.d, b.d, f16::ZERO);
            let qy = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            let q0 = _mm256_loadu_si256(a0.qs.as_ptr() as *const __m256i);
            let q1 = _mm256_loadu_si256(a1.qs.as_ptr() as *const __m256i);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * bd), sum_i8(q0, qy), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * bd), sum_i8(q1, qy), acc1);
        }
        [hsum8(acc0), hsum8(acc1)]
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (a, b) in x.iter().zip(y) {
            let [ad, bd, _, _] = scales(a.d, b.d, f16::ZERO, f16::ZERO);
            let d = _mm256_set1_ps(ad * bd);
            let qx = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let qy = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, sum_i8(qx, qy), acc);
        }
        hsum8(acc)
    }
}

/// Dispatches to AVX2 when present.
#[inline]
pub fn dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: checked above.
        return unsafe { avx2::dot_q4_0_q8_0(x, y) };
    }
    dot_q4_0_q8_0_ref(x, y)
}

#[inline]
pub fn dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: checked above.
        return unsafe { avx2::dot_q4_1_q8_1(x, y) };
    }
    dot_q4_1_q8_1_ref(x, y)
}

/// Two Q4_1 weight rows against one activation row; same bits as two [`dot_q4_1_q8_1`].
#[inline]
pub fn dot_q4_1_q8_1_x2(x0: &[BlockQ4_1], x1: &[BlockQ4_1], y: &[BlockQ8_1]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: checked above.
        return unsafe { avx2::dot_q4_1_q8_1_x2(x0, x1, y) };
    }
    [dot_q4_1_q8_1_ref(x0, y), dot_q4_1_q8_1_ref(x1, y)]
}

/// Two Q8_0 weight rows against one activation row; same bits as two [`dot_q8_0_q8_0`].
#[inline]
pub fn dot_q8_0_q8_0_x2(x0: &[BlockQ8_0], x1: &[BlockQ8_0], y: &[BlockQ8_0]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: checked above.
        return unsafe { avx2::dot_q8_0_q8_0_x2(x0, x1, y) };
    }
    [dot_q8_0_q8_0_ref(x0, y), dot_q8_0_q8_0_ref(x1, y)]
}

/// Two Q4_0 weight rows against one activation row.
#[inline]
pub fn dot_q4_0_q8_0_x2(x0: &[BlockQ4_0], x1: &[BlockQ4_0], y: &[BlockQ8_0]) -> [f32; 2] {
    [dot_q4_0_q8_0(x0, y), dot_q4_0_q8_0(x1, y)]
}

#[inline]
pub fn dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: checked above.
        return unsafe { avx2::dot_q8_0_q8_0(x, y) };
    }
    dot_q8_0_q8_0_ref(x, y)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::blocks::GgmlBlock;
    use crate::quantize::{quantize_row_q8_0, quantize_row_q8_1};

    /// A small deterministic generator for test data.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn f(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    fn random_q4_1(r: &mut Lcg, n: usize) -> Vec<BlockQ4_1> {
        (0..n)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32(r.f() * 0.1),
                m: f16::from_f32(r.f() * 0.5),
                qs: std::array::from_fn(|_| r.byte()),
            })
            .collect()
    }

    fn random_q4_0(r: &mut Lcg, n: usize) -> Vec<BlockQ4_0> {
        (0..n)
            .map(|_| BlockQ4_0 {
                d: f16::from_f32(r.f() * 0.1),
                qs: std::array::from_fn(|_| r.byte()),
            })
            .collect()
    }

    fn random_q8_0(r: &mut Lcg, n: usize) -> Vec<BlockQ8_0> {
        let x: Vec<f32> = (0..n * QK).map(|_| r.f() * 3.0).collect();
        let mut q = vec![BlockQ8_0::default(); n];
        quantize_row_q8_0(&x, &mut q);
        q
    }

    fn random_q8_1(r: &mut Lcg, n: usize) -> Vec<BlockQ8_1> {
        let x: Vec<f32> = (0..n * QK).map(|_| r.f() * 3.0).collect();
        let mut q = vec![BlockQ8_1::default(); n];
        quantize_row_q8_1(&x, &mut q);
        q
    }

    fn plain_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn deq<B: GgmlBlock>(b: &[B]) -> Vec<f32> {
        b.iter().flat_map(|x| x.dequantize()).collect()
    }

    fn deq8_1(b: &[BlockQ8_1]) -> Vec<f32> {
        b.iter()
            .flat_map(|x| x.qs.map(|q| q as f32 * x.d.to_f32()))
            .collect()
    }

    #[test]
    fn references_agree_with_dequantized_math() {
        let mut r = Lcg(1);
        for n in [1, 2, 3, 18, 48] {
            let w = random_q4_1(&mut r, n);
            let a = random_q8_1(&mut r, n);
            let want = plain_dot(&deq(&w), &deq8_1(&a));
            let got = dot_q4_1_q8_1_ref(&w, &a) as f64;
            // `s` is stored as f16, so allow its rounding.
            assert!(
                (got - want).abs() < 1e-2 * (1.0 + want.abs()),
                "{got} vs {want}"
            );

            let w = random_q4_0(&mut r, n);
            let a = random_q8_0(&mut r, n);
            let want = plain_dot(&deq(&w), &deq(&a));
            let got = dot_q4_0_q8_0_ref(&w, &a) as f64;
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "{got} vs {want}"
            );

            let w = random_q8_0(&mut r, n);
            let want = plain_dot(&deq(&w), &deq(&a));
            let got = dot_q8_0_q8_0_ref(&w, &a) as f64;
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_is_bit_identical_to_the_reference() {
        if !crate::has_avx2() {
            eprintln!("no AVX2 on this CPU; skipping");
            return;
        }
        let mut r = Lcg(7);
        for n in 1..40 {
            for _ in 0..20 {
                let w = random_q4_1(&mut r, n);
                let a = random_q8_1(&mut r, n);
                // SAFETY: AVX2 checked above.
                let simd = unsafe { avx2::dot_q4_1_q8_1(&w, &a) };
                assert_eq!(simd.to_bits(), dot_q4_1_q8_1_ref(&w, &a).to_bits());

                let w = random_q4_0(&mut r, n);
                let a = random_q8_0(&mut r, n);
                let simd = unsafe { avx2::dot_q4_0_q8_0(&w, &a) };
                assert_eq!(simd.to_bits(), dot_q4_0_q8_0_ref(&w, &a).to_bits());

                let w = random_q8_0(&mut r, n);
                let simd = unsafe { avx2::dot_q8_0_q8_0(&w, &a) };
                assert_eq!(simd.to_bits(), dot_q8_0_q8_0_ref(&w, &a).to_bits());
                let w2 = random_q8_0(&mut r, n);
                let pair = unsafe { avx2::dot_q8_0_q8_0_x2(&w, &w2, &a) };
                assert_eq!(pair[0].to_bits(), dot_q8_0_q8_0_ref(&w, &a).to_bits());
                assert_eq!(pair[1].to_bits(), dot_q8_0_q8_0_ref(&w2, &a).to_bits());

                let (w, w2) = (random_q4_1(&mut r, n), random_q4_1(&mut r, n));
                let a = random_q8_1(&mut r, n);
                let pair = unsafe { avx2::dot_q4_1_q8_1_x2(&w, &w2, &a) };
                assert_eq!(pair[0].to_bits(), dot_q4_1_q8_1_ref(&w, &a).to_bits());
                assert_eq!(pair[1].to_bits(), dot_q4_1_q8_1_ref(&w2, &a).to_bits());
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // All nibbles 15 against all +127 / -127: the largest pair sums.
        let w = [BlockQ4_1 {
            d: f16::ONE,
            m: f16::ZERO,
            qs: [0xff; 16],
        }];
        let mut a = [BlockQ8_1::default()];
        a[0].d = f16::ONE;
        a[0].qs = [127; 32];
        assert_eq!(dot_q4_1_q8_1(&w, &a), (15 * 127 * 32) as f32);
        a[0].qs = [-127; 32];
        assert_eq!(dot_q4_1_q8_1(&w, &a), -(15 * 127 * 32) as f32);
        let x = [BlockQ8_0 {
            d: f16::ONE,
            qs: [-127; 32],
        }];
        let y = [BlockQ8_0 {
            d: f16::ONE,
            qs: [-127; 32],
        }];
        assert_eq!(dot_q8_0_q8_0(&x, &y), (127 * 127 * 32) as f32);
    }
}
