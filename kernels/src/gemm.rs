//! Tiles of a quantized matmul: four weight rows against up to four activation rows per
//! call. Each weight block is unpacked once and each activation block loaded once per
//! tile instead of once per dot product, and on CPUs with AVX-512 VNNI one `vpdpbusd`
//! replaces the `maddubs` + `madd` pair of plain AVX2.
//!
//! Every (weight row, activation row) result is computed with exactly the operations of
//! the single dot products in [`crate::dot`] — the integer lane sums are exact either
//! way, and each pair keeps its own f32 accumulator chain in block order — so a tile's
//! outputs equal the dot products' bit for bit (the tests check it for every shape).

use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use crate::dot;

/// Weight rows per tile.
pub const TILE_ROWS: usize = 4;
/// Activation rows per tile, at most.
pub const TILE_COLS: usize = 4;

/// Output of one tile: `out[r][c]` = dot(weight row r, activation row c).
pub type TileOut = [[f32; TILE_COLS]; TILE_ROWS];

/// Whether the CPU has AVX-VNNI (256-bit `vpdpbusd` without AVX-512); `HEARTH_NO_VNNI=1`
/// turns it off.
pub fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            crate::has_avx2()
                && !crate::switched_off("HEARTH_NO_VNNI")
                && std::is_x86_feature_detected!("avxvnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 VNNI tiles are usable (`HEARTH_NO_VNNI=1` turns them off, to test
/// the AVX2 tiles on a VNNI machine; `HEARTH_NO_AVX512=1` leaves AVX-VNNI on).
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            crate::has_avx2()
                && !crate::switched_off("HEARTH_NO_VNNI")
                && !crate::switched_off("HEARTH_NO_AVX512")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::TileOut;
    use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
    use crate::dot::avx2::{hsum8, nibbles};

    /// How a block's unsigned × signed byte products become eight i32 lane sums (four
    /// adjacent products each). Both ways give the same integers for GGML's value ranges.
    pub trait Products {
        unsafe fn lanes(ux: __m256i, sy: __m256i) -> __m256i;
    }

    pub struct Avx2;
    impl Products for Avx2 {
        #[inline(always)]
        unsafe fn lanes(ux: __m256i, sy: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(ux, sy), _mm256_set1_epi16(1))
        }
    }

    /// AVX-VNNI (VEX-encoded `vpdpbusd`, on CPUs without AVX-512).
    pub struct AvxVnni;
    impl Products for AvxVnni {
        #[inline(always)]
        unsafe fn lanes(ux: __m256i, sy: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ux, sy)
        }
    }

    /// The first four bytes of a block: its f16 scale and (Q4_1, Q8_1) its f16 min or
    /// sum; for the other formats the second half is data, never used as a number.
    #[inline(always)]
    unsafe fn head<B>(b: &B) -> i32 {
        const { assert!(std::mem::size_of::<B>() >= 4) };
        std::ptr::read_unaligned(b as *const B as *const i32)
    }

    /// The scale pairs of up to four blocks, as f32 (exact, like `f16::to_f32`), in one
    /// conversion: `[d0, m0, d1, m1, ...]`.
    #[inline(always)]
    unsafe fn scale_pairs<B, const N: usize>(blocks: [&B; N]) -> [f32; 8] {
        let h: [i32; 4] = std::array::from_fn(|i| if i < N { head(blocks[i]) } else { 0 });
        let v = _mm256_cvtph_ps(_mm_setr_epi32(h[0], h[1], h[2], h[3]));
        std::mem::transmute::<__m256, [f32; 8]>(v)
    }

    /// A weight format's block as the tile needs it: signed or unsigned bytes and scales.
    pub trait WeightBlock {
        /// Bytes to multiply: unsigned for Q4_1 (0..15), signed for Q4_0/Q8_0.
        unsafe fn bytes(&self) -> __m256i;
        const SIGNED: bool;
        const HAS_MIN: bool;
    }

    impl WeightBlock for BlockQ4_1 {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            nibbles(self.qs.as_ptr())
        }
        const SIGNED: bool = false;
        const HAS_MIN: bool = true;
    }

    impl WeightBlock for BlockQ4_0 {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            _mm256_sub_epi8(nibbles(self.qs.as_ptr()), _mm256_set1_epi8(8))
        }
        const SIGNED: bool = true;
        const HAS_MIN: bool = false;
    }

    impl WeightBlock for BlockQ8_0 {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
        }
        const SIGNED: bool = true;
        const HAS_MIN: bool = false;
    }

    /// An activation block: its bytes, scale, and (Q8_1) scaled sum.
    pub trait ActBlock {
        unsafe fn bytes(&self) -> __m256i;
    }

    impl ActBlock for BlockQ8_1 {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
        }
    }

    impl ActBlock for BlockQ8_0 {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
        }
    }

    /// `R` weight rows × `C` activation rows. Per pair, per block, in order: `summs +=
    /// m·s` (Q4_1), `acc = fma(d_w·d_a, lanes, acc)`; then `hsum8(acc) + summs` — the
    /// operations of `dot::avx2`'s single dot products.
    #[inline(always)]
    pub unsafe fn tile<P: Products, W: WeightBlock, A: ActBlock, const R: usize, const C: usize>(
        w: [&[W]; R],
        a: [&[A]; C],
        out: &mut TileOut,
    ) {
        let nb = a[0].len();
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut summs = [[0f32; C]; R];
        for b in 0..nb {
            let wb: [&W; R] = std::array::from_fn(|r| w[r].get_unchecked(b));
            let ab: [&A; C] = std::array::from_fn(|c| a[c].get_unchecked(b));
            let ws = scale_pairs(wb);
            let as_ = scale_pairs(ab);
            let wx: [__m256i; R] = std::array::from_fn(|r| wb[r].bytes());
            // Signed weights use the sign trick: |w| × (a with w's sign).
            let mut ux = wx;
            if W::SIGNED {
                for u in ux.iter_mut() {
                    *u = _mm256_sign_epi8(*u, *u);
                }
            }
            for c in 0..C {
                let ay = ab[c].bytes();
                let (ad, asum) = (as_[2 * c], as_[2 * c + 1]);
                for r in 0..R {
                    let (wd, wm) = (ws[2 * r], ws[2 * r + 1]);
                    if W::HAS_MIN {
                        summs[r][c] += wm * asum;
                    }
                    let sy = if W::SIGNED {
                        _mm256_sign_epi8(ay, wx[r])
                    } else {
                        ay
                    };
                    let p = _mm256_cvtepi32_ps(P::lanes(ux[r], sy));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * ad), p, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r][c] = if W::HAS_MIN {
                    hsum8(acc[r][c]) + summs[r][c]
                } else {
                    hsum8(acc[r][c])
                };
            }
        }
    }

    /// The AVX-512 VNNI tile: two weight rows share one 512-bit register (row r in the
    /// low half, row r+1 in the high half) against an activation block broadcast to both
    /// halves, so one `vpdpbusd`, one conversion and one FMA serve two (row, column)
    /// pairs. Each half is exactly the 256-bit computation of [`tile`]: same integer
    /// lanes, same scale products, same FMA chain per pair, same final sums.
    #[inline(always)]
    pub unsafe fn tile512<W: WeightBlock, A: ActBlock, const C: usize>(
        w: [&[W]; 4],
        a: [&[A]; C],
        out: &mut TileOut,
    ) {
        let nb = a[0].len();
        // acc[p][c]: pairs (2p, c) low and (2p+1, c) high.
        let mut acc = [[_mm512_setzero_ps(); C]; 2];
        // summs[c]: rows 0..4 for column c (Q4_1).
        let mut summs = [_mm_setzero_ps(); C];
        // Lane pattern picking d of rows (2p, 2p+1) out of [d0, m0, d1, m1, ...].
        let pick_d = [
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
            _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
        ];
        let pick_m = _mm_setr_epi32(1, 3, 5, 7);
        for b in 0..nb {
            let wb: [&W; 4] = std::array::from_fn(|r| w[r].get_unchecked(b));
            let ab: [&A; C] = std::array::from_fn(|c| a[c].get_unchecked(b));
            let ws = _mm256_cvtph_ps(_mm_setr_epi32(
                head(wb[0]),
                head(wb[1]),
                head(wb[2]),
                head(wb[3]),
            ));
            let as_ = scale_pairs(ab);
            let ws512 = _mm512_castps256_ps512(ws);
            let wd = [
                _mm512_permutexvar_ps(pick_d[0], ws512),
                _mm512_permutexvar_ps(pick_d[1], ws512),
            ];
            let wm = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(
                ws,
                _mm256_castsi128_si256(pick_m),
            ));
            let pair = |r: usize| {
                _mm512_inserti64x4(_mm512_castsi256_si512(wb[r].bytes()), wb[r + 1].bytes(), 1)
            };
            let wx = [pair(0), pair(2)];
            let ux = if W::SIGNED {
                [_mm512_abs_epi8(wx[0]), _mm512_abs_epi8(wx[1])]
            } else {
                wx
            };
            for c in 0..C {
                let ay = _mm512_broadcast_i64x4(ab[c].bytes());
                let ad = _mm512_set1_ps(as_[2 * c]);
                if W::HAS_MIN {
                    let s = _mm_mul_ps(wm, _mm_set1_ps(as_[2 * c + 1]));
                    summs[c] = _mm_add_ps(summs[c], s);
                }
                for p in 0..2 {
                    // Signed weights: |w| × (a with w's sign), as psignb does.
                    let sy = if W::SIGNED {
                        let neg = _mm512_movepi8_mask(wx[p]);
                        _mm512_mask_sub_epi8(ay, neg, _mm512_setzero_si512(), ay)
                    } else {
                        ay
                    };
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ux[p], sy);
                    let d = _mm512_mul_ps(wd[p], ad);
                    acc[p][c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), acc[p][c]);
                }
            }
        }
        for c in 0..C {
            let sm: [f32; 4] = std::mem::transmute(summs[c]);
            for (p, pair) in acc.iter().enumerate() {
                let lo = _mm512_castps512_ps256(pair[c]);
                let hi = _mm512_extractf32x8_ps(pair[c], 1);
                for (r, half) in [(2 * p, lo), (2 * p + 1, hi)] {
                    out[r][c] = if W::HAS_MIN {
                        hsum8(half) + sm[r]
                    } else {
                        hsum8(half)
                    };
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub unsafe fn tile_vnni512<W: WeightBlock, A: ActBlock>(
        w: [&[W]; 4],
        a: &[&[A]],
        out: &mut TileOut,
    ) {
        match a.len() {
            1 => tile512::<W, A, 1>(w, [a[0]], out),
            2 => tile512::<W, A, 2>(w, [a[0], a[1]], out),
            3 => tile512::<W, A, 3>(w, [a[0], a[1], a[2]], out),
            _ => tile512::<W, A, 4>(w, [a[0], a[1], a[2], a[3]], out),
        }
    }

    macro_rules! entry {
        ($name:ident, $p:ty, $features:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name<W: WeightBlock, A: ActBlock>(
                w: [&[W]; 4],
                a: &[&[A]],
                out: &mut TileOut,
            ) {
                match a.len() {
                    1 => tile::<$p, W, A, 4, 1>(w, [a[0]], out),
                    2 => tile::<$p, W, A, 4, 2>(w, [a[0], a[1]], out),
                    3 => tile::<$p, W, A, 4, 3>(w, [a[0], a[1], a[2]], out),
                    _ => tile::<$p, W, A, 4, 4>(w, [a[0], a[1], a[2], a[3]], out),
                }
            }
        };
    }
    entry!(tile_avx2, Avx2, "avx2,fma,f16c");
    entry!(tile_avxvnni, AvxVnni, "avx2,fma,f16c,avxvnni");
}

macro_rules! tile_fn {
    ($(#[$doc:meta])* $name:ident, $w:ty, $a:ty, $dot:path) => {
        $(#[$doc])*
        /// `a` holds 1 to [`TILE_COLS`] activation rows of the same number of blocks as
        /// each weight row.
        pub fn $name(w: [&[$w]; TILE_ROWS], a: &[&[$a]], out: &mut TileOut) {
            assert!((1..=TILE_COLS).contains(&a.len()), "1 to 4 activation rows");
            let nb = a[0].len();
            assert!(
                w.iter().all(|r| r.len() == nb) && a.iter().all(|r| r.len() == nb),
                "rows of equal length"
            );
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: the features were detected; lengths were checked above.
                if has_vnni() {
                    return unsafe { x86::tile_vnni512(w, a, out) };
                }
                if has_avx_vnni() {
                    return unsafe { x86::tile_avxvnni(w, a, out) };
                }
                if crate::has_avx2() {
                    return unsafe { x86::tile_avx2(w, a, out) };
                }
            }
            for (r, wr) in w.iter().enumerate() {
                for (c, ac) in a.iter().enumerate() {
                    out[r][c] = $dot(wr, ac);
                }
            }
        }
    };
}

tile_fn!(
    /// Q4_1 weights × Q8_1 activations.
    tile_q4_1,
    BlockQ4_1,
    BlockQ8_1,
    dot::dot_q4_1_q8_1
);
tile_fn!(
    /// Q4_0 weights × Q8_0 activations.
    tile_q4_0,
    BlockQ4_0,
    BlockQ8_0,
    dot::dot_q4_0_q8_0
);
tile_fn!(
    /// Q8_0 weights × Q8_0 activations.
    tile_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    dot::dot_q8_0_q8_0
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::QK;
    use crate::quantize::{quantize_row_q8_0, quantize_row_q8_1};
    use half::f16;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn acts(m: usize, k: usize, next: &mut impl FnMut() -> u64) -> Vec<f32> {
        (0..m * k)
            .map(|_| (next() % 20001) as f32 / 1000.0 - 10.0)
            .collect()
    }

    /// The tile implementations this CPU can run.
    fn isas() -> Vec<&'static str> {
        let mut v = vec!["dispatch"];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &[bool]| f.iter().all(|&x| x);
            use std::arch::is_x86_feature_detected as d;
            if has(&[d!("avx2"), d!("fma"), d!("f16c")]) {
                v.push("avx2");
                if d!("avxvnni") {
                    v.push("avxvnni");
                }
                if has(&[
                    d!("avx512f"),
                    d!("avx512bw"),
                    d!("avx512dq"),
                    d!("avx512vl"),
                    d!("avx512vnni"),
                ]) {
                    v.push("vnni512");
                }
            }
        }
        v
    }

    macro_rules! check {
        ($isa:expr, $public:ident, $reference:path, $w:expr, $a:expr, $nb:expr, $what:literal) => {{
            let (w, a, nb) = ($w, $a, $nb);
            let rows: [&[_]; 4] = std::array::from_fn(|r| &w[r * nb..(r + 1) * nb]);
            let mut out = [[0f32; 4]; 4];
            match $isa {
                "dispatch" => $public(rows, a, &mut out),
                #[cfg(target_arch = "x86_64")]
                "avx2" => unsafe { x86::tile_avx2(rows, a, &mut out) },
                #[cfg(target_arch = "x86_64")]
                "avxvnni" => unsafe { x86::tile_avxvnni(rows, a, &mut out) },
                #[cfg(target_arch = "x86_64")]
                "vnni512" => unsafe { x86::tile_vnni512(rows, a, &mut out) },
                other => unreachable!("{other}"),
            }
            for r in 0..4 {
                for c in 0..a.len() {
                    let want = $reference(rows[r], a[c]);
                    assert_eq!(
                        out[r][c].to_bits(),
                        want.to_bits(),
                        "{} {} nb {nb} r {r} c {c}",
                        $isa,
                        $what
                    );
                }
            }
        }};
    }

    #[test]
    fn tiles_equal_the_dot_products_bit_for_bit() {
        let mut next = rng(7);
        for nb in [1, 3, 18, 48] {
            let k = nb * QK;
            let w41: Vec<BlockQ4_1> = (0..4 * nb)
                .map(|_| BlockQ4_1 {
                    d: f16::from_f32((next() % 1000) as f32 / 1e4),
                    m: f16::from_f32(-((next() % 1000) as f32) / 1e3),
                    qs: std::array::from_fn(|_| next() as u8),
                })
                .collect();
            let w40: Vec<BlockQ4_0> = (0..4 * nb)
                .map(|_| BlockQ4_0 {
                    d: f16::from_f32((next() % 1000) as f32 / 1e4),
                    qs: std::array::from_fn(|_| next() as u8),
                })
                .collect();
            let w80: Vec<BlockQ8_0> = (0..4 * nb)
                .map(|_| BlockQ8_0 {
                    d: f16::from_f32((next() % 1000) as f32 / 1e4),
                    // -128 too: the sign trick must behave as psignb does.
                    qs: std::array::from_fn(|_| next() as u8 as i8),
                })
                .collect();
            let x = acts(4, k, &mut next);
            let mut a1 = vec![BlockQ8_1::default(); 4 * nb];
            let mut a0 = vec![BlockQ8_0::default(); 4 * nb];
            for i in 0..4 {
                quantize_row_q8_1(&x[i * k..(i + 1) * k], &mut a1[i * nb..(i + 1) * nb]);
                quantize_row_q8_0(&x[i * k..(i + 1) * k], &mut a0[i * nb..(i + 1) * nb]);
            }
            for isa in isas() {
                for cols in 1..=4 {
                    let ar1: Vec<&[BlockQ8_1]> =
                        (0..cols).map(|c| &a1[c * nb..(c + 1) * nb]).collect();
                    let ar0: Vec<&[BlockQ8_0]> =
                        (0..cols).map(|c| &a0[c * nb..(c + 1) * nb]).collect();
                    check!(
                        isa,
                        tile_q4_1,
                        dot::dot_q4_1_q8_1_ref,
                        &w41,
                        &ar1[..],
                        nb,
                        "q4_1"
                    );
                    check!(
                        isa,
                        tile_q4_0,
                        dot::dot_q4_0_q8_0_ref,
                        &w40,
                        &ar0[..],
                        nb,
                        "q4_0"
                    );
                    check!(
                        isa,
                        tile_q8_0,
                        dot::dot_q8_0_q8_0_ref,
                        &w80,
                        &ar0[..],
                        nb,
                        "q8_0"
                    );
                }
            }
        }
    }
}
