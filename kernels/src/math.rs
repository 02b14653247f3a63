//! Elementwise math with ggml's exact numerics: `expf` as its vectorised polynomial
//! (ARM optimized-routines, max error 1.45 ulp), SiLU built on it, RMS norm with a
//! double-precision sum of squares.

/// ggml's vector `expf`: inputs above ~88.4 give +inf, below ~-104 give 0.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x * log2(e) + r
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // scalef: j * 2^n with one correct rounding (j * 2^n is exact in f64; |n| <= 192).
    let two_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * two_n) as f32
}

/// f16 → f32, exact: eight at a time with F16C where the CPU has it.
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: AVX2/F16C detected; equal lengths checked above.
        return unsafe { widen_f16_x86(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_f16_x86(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in n..src.len() {
        let h = _mm_cvtsi32_si128(src[i].to_bits() as i32);
        dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(h));
    }
}

/// `x / (1 + exp(-x))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// `gate[i] = silu(gate[i]) * up[i]`; long inputs spread over the compute team.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    const CHUNK: usize = 4096;
    if gate.len() <= CHUNK {
        return swiglu_chunk(gate, up);
    }
    crate::team::for_each_chunk_mut(
        gate,
        CHUNK,
        || (),
        |_, i, g| swiglu_chunk(g, &up[i * CHUNK..i * CHUNK + g.len()]),
    );
}

/// [`swiglu_in_place`] on this thread alone (for a caller that is itself one of the
/// team's tasks).
pub fn swiglu_here(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    swiglu_chunk(gate, up)
}

fn swiglu_chunk(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512_vnni() {
        // SAFETY: AVX-512 detected; equal lengths (checked by the caller).
        return unsafe { x86::swiglu512(gate, up) };
    }
    swiglu_plain(gate, up);
}

multiversion! {
    /// [`swiglu_in_place`] one element at a time (the specification of the vector path).
    fn swiglu_plain(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
}

/// RMS norm of each row of `x` (length `w.len()`), scaled by `w`, into `out`; several
/// rows spread over the compute team (each row's arithmetic is the same either way).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert_eq!(x.len(), out.len(), "input and output differ in length");
    if x.len() <= 4 * n {
        return rms_norm_rows(x, w, eps, out);
    }
    crate::team::for_each_chunk_mut(
        out,
        4 * n,
        || (),
        |_, i, o| rms_norm_rows(&x[i * 4 * n..i * 4 * n + o.len()], w, eps, o),
    );
}

/// [`rms_norm`] on this thread alone (for a caller that is itself one of the team's
/// tasks).
pub fn rms_norm_here(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "input and output differ in length");
    rms_norm_rows(x, w, eps, out)
}

multiversion! {
    fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = w.len();
        // Each row's sum of squares is added in order in f64, as ggml does: a chain of
        // additions that each wait for the last. Four rows' chains run side by side
        // (nothing in one waits for another), so a batch's norms take a quarter of the
        // time; every row's sum is the same as alone.
        if n == 0 {
            return;
        }
        for (xs, os) in x.chunks(4 * n).zip(out.chunks_mut(4 * n)) {
            let rows = xs.len() / n;
            let mut sums = [0f64; 4];
            if rows == 4 {
                let (a, rest) = xs.split_at(n);
                let (b, rest) = rest.split_at(n);
                let (c, d) = rest.split_at(n);
                for (((&a, &b), &c), &d) in a.iter().zip(b).zip(c).zip(d) {
                    sums[0] += (a * a) as f64;
                    sums[1] += (b * b) as f64;
                    sums[2] += (c * c) as f64;
                    sums[3] += (d * d) as f64;
                }
            } else {
                for (s, row) in sums.iter_mut().zip(xs.chunks_exact(n)) {
                    *s = row.iter().fold(0.0, |s, &v| s + (v * v) as f64);
                }
            }
            let pairs = xs.chunks_exact(n).zip(os.chunks_exact_mut(n));
            for ((row, o), &sum) in pairs.zip(&sums) {
                let mean = (sum / n as f64) as f32;
                let scale = 1.0 / (mean + eps).sqrt();
                for ((o, &v), &wi) in o.iter_mut().zip(row).zip(w) {
                    *o = (v * scale) * wi;
                }
            }
        }
    }
}

/// Index of the largest value (NaNs never win; the lowest index wins ties; 0 when no
/// value exceeds −∞): a logit row's greedy token. The maximum is found 16 lanes at a
/// time, then its first position, where a one-at-a-time scan of a vocabulary took tens
/// of microseconds a token.
pub fn argmax(x: &[f32]) -> usize {
    let m = max_above_neg_inf(x);
    if m == f32::NEG_INFINITY {
        return 0;
    }
    // The first lane block holding the maximum, then its place in that block.
    const L: usize = 16;
    let block = x
        .chunks(L)
        .position(|c| c.iter().fold(false, |any, &v| any | (v == m)))
        .expect("the maximum is one of the values");
    let at = x[block * L..]
        .iter()
        .position(|&v| v == m)
        .expect("the block holds the maximum");
    block * L + at
}

multiversion! {
    /// The largest value of `x` that is not NaN, or −∞: sixteen running maxima side by side
    /// (`if v > m { v } else { m }`, a vector max), then across them.
    pub fn max_above_neg_inf(x: &[f32]) -> f32 {
        const L: usize = 16;
        let mut lanes = [f32::NEG_INFINITY; L];
        let chunks = x.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        lanes
            .iter()
            .chain(rest)
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

/// `x[i] = expf(x[i] − max)` for every element (−∞ gives 0): a distribution's unnormalised
/// weights, 16 at a time where the CPU has AVX-512, with the same bits either way.
pub fn exp_below(x: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512_vnni() {
        // SAFETY: AVX-512 detected.
        return unsafe { x86::exp_below512(x, max) };
    }
    exp_below_plain(x, max)
}

multiversion! {
    /// [`exp_below`] one element at a time (the specification of the vector path).
    fn exp_below_plain(x: &mut [f32], max: f32) {
        for v in x.iter_mut() {
            *v = expf(*v - max);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::expf`] on 16 lanes: the same fused multiply-adds, and `vscalefps`
    /// for the one correctly rounded `j · 2^n` the scalar code gets through f64.
    #[inline(always)]
    pub(crate) unsafe fn expf16(x: __m512) -> __m512 {
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let r = c(0x4b40_0000);
        let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm512_sub_ps(z, r);
        let neg = _mm512_xor_ps(n, _mm512_set1_ps(-0.0));
        let b = _mm512_fmadd_ps(neg, c(0x35bf_be8e), _mm512_fmadd_ps(neg, c(0x3f31_7200), x));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
        );
        let scaled = _mm512_scalef_ps(j, n);
        let abs = _mm512_andnot_ps(_mm512_set1_ps(-0.0), n);
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs, _mm512_set1_ps(192.0));
        let nonpos = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let saturated =
            _mm512_mask_blend_ps(nonpos, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
        _mm512_mask_blend_ps(big, scaled, saturated)
    }

    /// [`super::exp_below_plain`] 16 lanes at a time.
    ///
    /// # Safety
    /// AVX-512F/DQ.
    #[target_feature(enable = "avx2,fma,avx512f,avx512dq")]
    pub(super) unsafe fn exp_below512(x: &mut [f32], max: f32) {
        let n = x.len() / 16 * 16;
        let m = _mm512_set1_ps(max);
        for i in (0..n).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            _mm512_storeu_ps(x.as_mut_ptr().add(i), expf16(_mm512_sub_ps(v, m)));
        }
        super::exp_below_plain(&mut x[n..], max);
    }

    /// [`super::swiglu_plain`] 16 lanes at a time: the same operations (IEEE division).
    ///
    /// # Safety
    /// AVX-512F/DQ; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512dq")]
    pub(super) unsafe fn swiglu512(gate: &mut [f32], up: &[f32]) {
        let n = gate.len() / 16 * 16;
        let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
        for i in (0..n).step_by(16) {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let e = expf16(_mm512_sub_ps(zero, g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            let r = _mm512_mul_ps(s, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), r);
        }
        super::swiglu_plain(&mut gate[n..], &up[n..]);
    }
}

/// Sum of 16 lanes in the order GCC's `_mm512_reduce_add_ps` uses.
#[inline(always)]
pub fn reduce16(l: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = l[8 + i] + l[i];
    }
    let mut t6 = [0f32; 4];
    for i in 0..4 {
        t6[i] = t3[4 + i] + t3[i];
    }
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `argmax` is the first index of the largest non-NaN value, as a one-at-a-time scan
    /// finds it, at every length and position, with ties, NaNs and infinities.
    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |x: &[f32]| {
            let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
            for (i, &v) in x.iter().enumerate() {
                if v > best_v {
                    (best, best_v) = (i, v);
                }
            }
            best
        };
        let mut next = crate::packed::tests::rng(5);
        for len in [0usize, 1, 2, 15, 16, 17, 31, 33, 100, 1000] {
            for case in 0..40 {
                let mut x: Vec<f32> = (0..len)
                    .map(|_| (next() % 7) as f32 - 3.0) // many ties
                    .collect();
                if len > 0 {
                    let at = next() as usize % len;
                    x[at] = match case % 5 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::NEG_INFINITY,
                        3 => 9.0,
                        _ => x[at],
                    };
                }
                if case == 7 {
                    x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
                if case == 8 {
                    x.iter_mut().for_each(|v| *v = f32::NAN);
                }
                assert_eq!(argmax(&x), scan(&x), "{x:?}");
            }
        }
    }

    /// The vector weights equal the scalar `expf`'s, specials too.
    #[test]
    fn exp_below_paths_agree() {
        let mut x: Vec<f32> = (0..1_003).map(|i| (i as f32 - 900.0) * 0.137).collect();
        x.extend([f32::NEG_INFINITY, f32::NAN, 0.0, -0.0, 150.0, -150.0]);
        let mut want = x.clone();
        exp_below_plain(&mut want, 3.5);
        let mut got = x.clone();
        exp_below(&mut got, 3.5);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "[{i}] {} -> {a} vs {b}",
                x[i]
            );
        }
        assert_eq!(want[1_003], 0.0, "−∞ weighs nothing");
    }

    /// The vector SwiGLU and the team's split give the element-wise bits, specials too.
    #[test]
    fn swiglu_paths_agree() {
        let mut g: Vec<f32> = (0..20_011)
            .map(|i| ((i * 7919 % 20_000) as f32 - 10_000.0) / 97.0)
            .collect();
        g.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.8,
            -104.5,
            1e-40,
        ]);
        let up: Vec<f32> = (0..g.len())
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let mut want = g.clone();
        swiglu_plain(&mut want, &up);
        let mut got = g.clone();
        swiglu_in_place(&mut got, &up);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "[{i}] {} -> {a} vs {b}",
                g[i]
            );
        }
        // Rows of RMS norm spread over the team: the same bits as one after another.
        let w: Vec<f32> = (0..576).map(|i| 1.0 + i as f32 / 1000.0).collect();
        let x = &g[..576 * 17];
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        rms_norm(x, &w, 1e-5, &mut a);
        rms_norm_rows(x, &w, 1e-5, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn expf_is_within_two_ulp_of_libm() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let want = x.exp();
            let got = expf(x);
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || (want < 1e-37 && got < 1e-37),
                "x={x}: {got} vs {want}"
            );
            x += 0.0173;
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert_eq!(expf(0.0), 1.0);
    }

    #[test]
    fn rows_normed_side_by_side_equal_rows_normed_alone() {
        // ggml's row: the squares summed in order in f64.
        let alone = |x: &[f32], w: &[f32], eps: f32| -> Vec<f32> {
            let mut sum = 0f64;
            for &v in x {
                sum += (v * v) as f64;
            }
            let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
            x.iter().zip(w).map(|(&v, &wi)| (v * scale) * wi).collect()
        };
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            // Wide magnitudes, so that the order of the f64 additions shows.
            f32::from_bits(seed % 0x7000_0000 + 0x0800_0000)
                * if seed & 1 == 0 { 1.0 } else { -1.0 }
        };
        for n in [1, 7, 64, 576] {
            let w: Vec<f32> = (0..n).map(|_| next()).collect();
            for rows in 0..=9 {
                let x: Vec<f32> = (0..rows * n).map(|_| next() * 1e-20).collect();
                let want: Vec<f32> = x.chunks_exact(n).flat_map(|r| alone(r, &w, 1e-5)).collect();
                for f in [rms_norm, rms_norm_here] {
                    let mut out = vec![f32::NAN; rows * n];
                    f(&x, &w, 1e-5, &mut out);
                    let same = out
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rows} rows of {n}");
                }
            }
        }
    }

    #[test]
    fn silu_and_rms_norm() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(2.0) - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
        let mut out = [0f32; 4];
        rms_norm(
            &[1.0, -1.0, 1.0, -1.0],
            &[1.0, 2.0, 3.0, 4.0],
            0.0,
            &mut out,
        );
        assert_eq!(out, [1.0, -2.0, 3.0, -4.0]);
    }

    #[test]
    fn reduce16_adds_everything() {
        let l: [f32; 16] = std::array::from_fn(|i| i as f32);
        assert_eq!(reduce16(&l), 120.0);
    }
}
