//! Weight matrices repacked at load for the CPU's vector units: rows in groups of 16, and
//! within a group, block by block, the same four value bytes of all 16 rows side by side
//! (64 bytes: one AVX-512 register). One `vpdpbusd` against four activation bytes
//! broadcast to every lane then advances 16 dot products at once, and a block's 16 scales
//! are one f16→f32 conversion — where a row-major layout needs a horizontal reduction per
//! row and block. Decode reads each weight byte once, and a batch of rows reuses each
//! unpacked weight register for every activation row.
//!
//! Arithmetic, identical on every path (AMX, AVX-512 VNNI, AVX2, scalar) and given by
//! [`dot_ref`]: integer sums of `(u − bias) · a` (exact), scaled into f32 accumulators as
//! [`QFormat::uses_lanes`] says — by default llama.cpp's eight lanes for the 32-element
//! formats, so our logits equal llama.cpp's to the bit; with [`Arithmetic::Blocks`] one
//! sum per block, as the K-quants always sum each half block. A row's result does not
//! depend on the batch it is computed in nor on the instruction set; the tests demand
//! equal bits.
//!
//! Layout of a group (all offsets multiples of 64 bytes):
//! - values, per block: bits ≤ 6: four 64-byte planes, plane `p` holding bytes
//!   `4p..4p+4` of each row's 16 nibble bytes (low nibble = elements `4p..4p+4`, high
//!   nibble = elements `16+4p..16+4p+4`); 8 bits: eight planes of elements `4p..4p+4`;
//! - extra high bits (5- and 6-bit formats), per block and bit: eight u64 masks, mask `p`
//!   bit `4r + i` = that bit of element `4p + i` of row `r`;
//! - scales, per block: 16 f16 d (and 16 f16 m); for the K-quants the file's own
//!   integer scales (16 6-bit scales and minimums, or 2 × 16 int8 scales for Q6_K);
//! - K-quants: per super-block of 8 blocks, 16 f16 scales (and minimums).

use crate::formats::{decode, Arithmetic, Decoded, QFormat, Scheme, QK};

/// Rows per group.
pub const ROWS: usize = 16;

/// One activation block: int8 values, scale, and what the weight side needs of their sum.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Act {
    pub qs: [i8; QK],
    /// Scale (an f16's value, as ggml stores it).
    pub d: f32,
    /// `d · Σqs` rounded to f16 (ggml's Q8_1), for formats with a minimum.
    pub s: f32,
    /// `−bias · Σqs` over each lane of four elements, and over the first and second 16:
    /// the corrections that turn `Σ u·a` into `Σ (u − bias)·a`.
    pub neg: [i32; 8],
    pub neg_lo: i32,
    pub neg_hi: i32,
}

/// Quantizes one activation row (ggml's Q8 rounding: `d = amax/127` stored as f16,
/// values `round_ties_even(x · 127/amax)`), for weights with this `bias`.
pub fn quantize_acts(x: &[f32], bias: i32, out: &mut [Act]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    crate::quantize::quantize_acts_into(x, bias, out);
}

/// A matrix of `n` rows × `nb` blocks, packed.
pub struct Packed {
    format: QFormat,
    arithmetic: Arithmetic,
    n: usize,
    nb: usize,
    /// Bytes of one group.
    stride: usize,
    /// The groups' bytes, `stride` each.
    data: crate::pages::Zeroed,
}

const fn value_bytes(bits: u32) -> usize {
    if bits == 8 {
        512
    } else {
        256
    }
}

const fn extra_bytes(bits: u32) -> usize {
    match bits {
        5 => 64,
        6 => 128,
        _ => 0,
    }
}

/// Where the parts of one group begin (the prefetch and unpacked fields serve the x86
/// kernels only).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Group {
    vals: *const u8,
    bits: *const u8,
    scales: *const u8,
    supers: *const u8,
    /// The next group's bytes to ask for (`stride` of them, all or a call's share;
    /// possibly past the matrix: only prefetched, never read), and how many of its
    /// 64-byte lines to ask for per block (0: none).
    next: *const u8,
    stride: usize,
    prefetch: usize,
    /// The group's value registers already unpacked (8 × 64 bytes per block), or null.
    unpacked: *const u8,
}

impl Group {
    /// This group as call `i` of `n` over it sees it: asking for the `i`-th of `n` equal
    /// shares of the next group's lines (spread over its `nb` blocks).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn share(self, i: usize, n: usize, nb: usize) -> Self {
        if self.prefetch == 0 || n == 1 {
            return self;
        }
        let lines = self.stride / 64;
        let per = lines.div_ceil(n);
        let first = (i * per).min(lines);
        Self {
            next: self.next.wrapping_add(64 * first),
            stride: 64 * per.min(lines - first),
            prefetch: per.div_ceil(nb),
            ..self
        }
    }
}

impl Packed {
    /// Packs `n` rows given as decoded blocks, `nb` per row, row after row.
    pub fn pack(
        format: QFormat,
        n: usize,
        nb: usize,
        rows: impl Fn(usize, &mut [Decoded]),
    ) -> Self {
        let (v, e, s, k) = Self::parts(format, nb);
        let stride = v + e + s + k;
        let groups = n.div_ceil(ROWS);
        let mut data = crate::pages::Zeroed::new(groups * stride);
        let bytes = data.as_mut_slice();
        let mut row = vec![Decoded::default(); nb];
        for r in 0..n {
            rows(r, &mut row);
            let (g, i) = (r / ROWS, r % ROWS);
            let group = &mut bytes[g * stride..(g + 1) * stride];
            let (vals, rest) = group.split_at_mut(v);
            let (extra, rest) = rest.split_at_mut(e);
            let (scales, supers) = rest.split_at_mut(s);
            for (b, blk) in row.iter().enumerate() {
                Self::put(format, blk, i, b, [vals, extra, scales, supers]);
            }
        }
        Self {
            format,
            arithmetic: Arithmetic::default(),
            n,
            nb,
            stride,
            data,
        }
    }

    /// Reads an `n × k` matrix of GGUF blocks.
    pub fn from_gguf(format: QFormat, bytes: &[u8], n: usize, k: usize) -> Self {
        let per_row = k / format.block_elems() * format.block_bytes();
        let sub = format.block_elems() / QK;
        Self::pack(format, n, k / QK, |r, out| {
            let row = &bytes[r * per_row..(r + 1) * per_row];
            for (fb, o) in row
                .chunks_exact(format.block_bytes())
                .zip(out.chunks_exact_mut(sub))
            {
                decode(format, fb, o);
            }
        })
    }

    /// Bytes of values, extra bits, scales and super-block scales per group.
    fn parts(format: QFormat, nb: usize) -> (usize, usize, usize, usize) {
        let bits = format.bits();
        let scheme = format.scheme();
        (
            nb * value_bytes(bits),
            nb * extra_bytes(bits),
            (nb * scheme.bytes()).div_ceil(64) * 64,
            (nb.div_ceil(8) * scheme.super_bytes()).div_ceil(64) * 64,
        )
    }

    fn put(format: QFormat, blk: &Decoded, i: usize, b: usize, parts: [&mut [u8]; 4]) {
        let [vals, extra, scales, supers] = parts;
        let bits = format.bits();
        let vals = &mut vals[b * value_bytes(bits)..];
        if bits == 8 {
            for p in 0..8 {
                vals[64 * p + 4 * i..64 * p + 4 * i + 4].copy_from_slice(&blk.u[4 * p..4 * p + 4]);
            }
        } else {
            for p in 0..4 {
                for j in 0..4 {
                    let (lo, hi) = (blk.u[4 * p + j], blk.u[16 + 4 * p + j]);
                    vals[64 * p + 4 * i + j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                }
            }
            let extra = &mut extra[b * extra_bytes(bits)..];
            for x in 0..(bits as usize - 4) {
                for p in 0..8 {
                    let mut mask = u64::from_le_bytes(
                        extra[64 * x + 8 * p..64 * x + 8 * p + 8]
                            .try_into()
                            .unwrap(),
                    );
                    for j in 0..4 {
                        let bit = (blk.u[4 * p + j] >> (4 + x)) & 1;
                        mask |= (bit as u64) << (4 * i + j);
                    }
                    extra[64 * x + 8 * p..64 * x + 8 * p + 8].copy_from_slice(&mask.to_le_bytes());
                }
            }
        }
        let scheme = format.scheme();
        let s = &mut scales[b * scheme.bytes()..];
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        match scheme {
            Scheme::D16 => s[2 * i..2 * i + 2].copy_from_slice(&f16(blk.d0)),
            Scheme::D16M16 => {
                s[2 * i..2 * i + 2].copy_from_slice(&f16(blk.d0));
                s[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&f16(blk.m));
            }
            Scheme::K4 | Scheme::K6 => {
                let second = if scheme == Scheme::K4 {
                    blk.mn
                } else {
                    blk.sc[1] as u8
                };
                s[i] = blk.sc[0] as u8;
                s[16 + i] = second;
                let k = &mut supers[b / 8 * scheme.super_bytes()..];
                k[2 * i..2 * i + 2].copy_from_slice(&f16(blk.sd));
                if scheme == Scheme::K4 {
                    k[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&f16(blk.sdmin));
                }
            }
        }
    }

    pub fn format(&self) -> QFormat {
        self.format
    }
    pub fn arithmetic(&self) -> Arithmetic {
        self.arithmetic
    }
    /// How dot products are summed from here on (the packed bytes serve both).
    pub fn set_arithmetic(&mut self, arithmetic: Arithmetic) {
        self.arithmetic = arithmetic;
    }
    pub fn rows(&self) -> usize {
        self.n
    }
    pub fn blocks(&self) -> usize {
        self.nb
    }
    pub fn groups(&self) -> usize {
        self.n.div_ceil(ROWS)
    }
    /// Bytes held (the packed weights).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn group(&self, g: usize) -> Group {
        let (v, e, sc, _) = Self::parts(self.format, self.nb);
        // SAFETY: g < groups; the parts lie inside the group's stride.
        unsafe {
            let base = self.data.as_ptr().add(g * self.stride);
            Group {
                vals: base,
                bits: base.add(v),
                scales: base.add(v + e),
                supers: base.add(v + e + sc),
                next: base.wrapping_add(self.stride),
                stride: self.stride,
                prefetch: (self.stride / 64).div_ceil(self.nb),
                unpacked: std::ptr::null(),
            }
        }
    }

    /// Row `r`'s block `b`, decoded back from the packed bytes.
    pub fn decoded(&self, r: usize, b: usize) -> Decoded {
        assert!(r < self.n && b < self.nb, "row {r} block {b} out of range");
        // SAFETY: the group holds nb blocks; r % 16 < 16.
        unsafe { scalar::decoded(self.format, self.group(r / ROWS), b, r % ROWS) }
    }

    /// `out[c][i]` = dot(row `16g + i`, activation row `c`) for the activation rows `a`
    /// (`nb` blocks each). With `prefetch`, the next group's bytes are requested meanwhile.
    /// The AMX path leaves its tile configuration loaded on this thread for the next
    /// group; [`crate::amx::release`] frees the tiles.
    pub fn group_dot(&self, g: usize, a: &[&[Act]], out: &mut [[f32; ROWS]], prefetch: bool) {
        assert!(g < self.groups() && !a.is_empty() && out.len() >= a.len());
        assert!(
            a.iter().all(|r| r.len() == self.nb),
            "activation rows of nb blocks"
        );
        let mut grp = self.group(g);
        if !prefetch {
            grp.prefetch = 0;
        }
        let lanes = self.format.uses_lanes(self.arithmetic);
        #[cfg(target_arch = "x86_64")]
        {
            if crate::has_avx512_vnni() {
                // SAFETY: features detected; lengths checked above.
                return unsafe {
                    x86::dispatch_512(
                        self.format,
                        lanes,
                        crate::amx::available(),
                        grp,
                        self.nb,
                        a,
                        out,
                    )
                };
            }
            if crate::has_avx2() {
                // SAFETY: as above.
                return unsafe { x86::dispatch_avx2(self.format, lanes, grp, self.nb, a, out) };
            }
        }
        #[cfg(target_arch = "aarch64")]
        if crate::has_dotprod() {
            // SAFETY: feature detected; the group's parts hold nb blocks.
            return unsafe { scalar::group_dot_dotprod(self.format, lanes, grp, self.nb, a, out) };
        }
        // SAFETY: the group's parts hold nb blocks.
        unsafe { scalar::group_dot(self.format, lanes, grp, self.nb, a, out) }
    }
}

/// The reference: one row of decoded blocks against one activation row, with exactly the
/// arithmetic of the packed kernels.
pub fn dot_ref(format: QFormat, arithmetic: Arithmetic, w: &[Decoded], a: &[Act]) -> f32 {
    let scheme = format.scheme();
    let bias = format.bias();
    let mut mins = 0f32;
    let sum = |wb: &Decoded, ab: &Act, j: std::ops::Range<usize>| -> i32 {
        j.map(|j| (wb.u[j] as i32 - bias) * ab.qs[j] as i32).sum()
    };
    let total = if format.uses_lanes(arithmetic) {
        let mut acc = [0f32; 8];
        for (wb, ab) in w.iter().zip(a) {
            if scheme.has_min() {
                mins += wb.m * ab.s;
            }
            let d = wb.d0 * ab.d;
            for (k, l) in acc.iter_mut().enumerate() {
                *l = d.mul_add(sum(wb, ab, 4 * k..4 * k + 4) as f32, *l);
            }
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    } else {
        let mut acc = 0f32;
        for (wb, ab) in w.iter().zip(a) {
            if scheme.has_min() {
                mins += wb.m * ab.s;
            }
            let (lo, hi) = (sum(wb, ab, 0..QK / 2), sum(wb, ab, QK / 2..QK));
            if scheme.two_scales() {
                acc = (wb.d0 * ab.d).mul_add(lo as f32, acc);
                acc = (wb.d1 * ab.d).mul_add(hi as f32, acc);
            } else {
                acc = (wb.d0 * ab.d).mul_add((lo + hi) as f32, acc);
            }
        }
        acc
    };
    if scheme.has_min() {
        total + mins
    } else {
        total
    }
}

/// Scales of block `b` as (d0, d1, m), whatever the register width (the portable path's
/// arrays of 16 rows, AVX-512's or AVX2's registers): `f16` loads the register's f16
/// scales at a pointer, `ints` its 8-bit integer scales (signed or not) as floats; the
/// K-quants' products formed as the decoder forms them (`D·sc`, `−(Dmin·mn)`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scales_with<V: Copy>(
    scheme: Scheme,
    g: Group,
    b: usize,
    zero: V,
    f16: impl Fn(*const u8) -> V,
    ints: impl Fn(*const u8, bool) -> V,
    mul: impl Fn(V, V) -> V,
    neg: impl Fn(V) -> V,
) -> (V, V, V) {
    let s = g.scales.add(b * scheme.bytes());
    match scheme {
        Scheme::D16 => {
            let d = f16(s);
            (d, d, zero)
        }
        Scheme::D16M16 => {
            let d = f16(s);
            (d, d, f16(s.add(32)))
        }
        Scheme::K4 => {
            let k = g.supers.add(b / 8 * 64);
            let d = mul(f16(k), ints(s, false));
            let m = mul(f16(k.add(32)), ints(s.add(16), false));
            (d, d, neg(m))
        }
        Scheme::K6 => {
            let sd = f16(g.supers.add(b / 8 * 32));
            (mul(sd, ints(s, true)), mul(sd, ints(s.add(16), true)), zero)
        }
    }
}

mod scalar {
    use super::*;

    /// Row `i`'s 32 values of block `b`.
    ///
    /// # Safety
    /// `g` must point at a group of at least `b + 1` blocks of this bit width.
    pub(super) unsafe fn values(g: Group, bits: u32, b: usize, i: usize) -> [u8; QK] {
        let mut u = [0u8; QK];
        let vals = g.vals.add(b * value_bytes(bits));
        if bits == 8 {
            for p in 0..8 {
                for j in 0..4 {
                    u[4 * p + j] = *vals.add(64 * p + 4 * i + j);
                }
            }
            return u;
        }
        for p in 0..4 {
            for j in 0..4 {
                let v = *vals.add(64 * p + 4 * i + j);
                u[4 * p + j] = v & 0x0f;
                u[16 + 4 * p + j] = v >> 4;
            }
        }
        let extra = g.bits.add(b * extra_bytes(bits));
        for x in 0..(bits as usize - 4) {
            for p in 0..8 {
                let mask = std::ptr::read_unaligned(extra.add(64 * x + 8 * p) as *const u64);
                for j in 0..4 {
                    u[4 * p + j] |= (((mask >> (4 * i + j)) & 1) as u8) << (4 + x);
                }
            }
        }
        u
    }

    /// Row `i`'s block `b`: values and scales.
    ///
    /// # Safety
    /// `g` must point at a group of at least `b + 1` blocks of `format`.
    pub(super) unsafe fn decoded(format: QFormat, g: Group, b: usize, i: usize) -> Decoded {
        let [d0, d1, m] = row_scales(format, g, b);
        let mut d = Decoded {
            u: values(g, format.bits(), b, i),
            d0: d0[i],
            d1: d1[i],
            m: m[i],
            ..Decoded::default()
        };
        // The K-quants' raw scale bytes, which the decoded block also carries.
        let scheme = format.scheme();
        if let Scheme::K4 | Scheme::K6 = scheme {
            let s = g.scales.add(b * scheme.bytes());
            let k = g.supers.add(b / 8 * scheme.super_bytes());
            let (first, second) = (*s.add(i), *s.add(16 + i));
            d.sd = f16_row(k)[i];
            if scheme == Scheme::K4 {
                (d.sdmin, d.sc, d.mn) = (f16_row(k.add(32))[i], [first as i8, 0], second);
            } else {
                d.sc = [first as i8, second as i8];
            }
        }
        d
    }

    /// Block `b`'s scales for the group's 16 rows, `[d0, d1, m]` as [`Decoded`] holds
    /// them: the f16 scales (and minimums) converted side by side, the K-quants' `D·sc`
    /// and `−(Dmin·mn)` formed in f32. (A call per row that built a whole decoded block
    /// was half the instructions of a one-row matmul on aarch64, counted under qemu.)
    ///
    /// # Safety
    /// `g` must point at a group of at least `b + 1` blocks of `format`.
    #[inline(always)]
    unsafe fn row_scales(format: QFormat, g: Group, b: usize) -> [[f32; ROWS]; 3] {
        let (d0, d1, m) = scales_with(
            format.scheme(),
            g,
            b,
            [0.0; ROWS],
            |p| f16_row(p),
            |p, signed| {
                let x = std::ptr::read_unaligned(p as *const [u8; ROWS]);
                x.map(|v| if signed { v as i8 as f32 } else { v as f32 })
            },
            |x, y| std::array::from_fn(|i| x[i] * y[i]),
            |x| x.map(|v| -v),
        );
        [d0, d1, m]
    }

    /// One block of a group, decoded for the portable path: plane `k` holds elements
    /// `4k..4k+4` of each row as signed bytes (`u − bias`), as the SIMD kernels' registers
    /// do, so that each step below is one loop over the 16 rows; and the rows' scales.
    #[derive(Clone, Copy)]
    struct Block16 {
        w: [[[i8; 4]; ROWS]; 8],
        d0: [f32; ROWS],
        d1: [f32; ROWS],
        m: [f32; ROWS],
    }

    impl Default for Block16 {
        fn default() -> Self {
            Self {
                w: [[[0; 4]; ROWS]; 8],
                d0: [0.0; ROWS],
                d1: [0.0; ROWS],
                m: [0.0; ROWS],
            }
        }
    }

    std::thread_local! {
        /// A group decoded, reused across calls on this thread.
        static DECODED: std::cell::RefCell<Vec<Block16>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }

    /// Block `b` of the group into `blk`: each 64-byte plane of the packed values gives
    /// one plane (8 bits) or two (the low and high nibbles, plus their extra bits), with
    /// the bias taken off; every format's values minus its bias fit a signed byte.
    ///
    /// # Safety
    /// `g` must point at a group of at least `b + 1` blocks of `format`.
    unsafe fn decode_block(format: QFormat, g: Group, b: usize, blk: &mut Block16) {
        let (bits, bias) = (format.bits(), format.bias());
        let vals = std::slice::from_raw_parts(g.vals.add(b * value_bytes(bits)), value_bytes(bits));
        if bits == 8 {
            for (plane, v) in blk.w.iter_mut().zip(vals.chunks_exact(64)) {
                for (w, v) in plane.as_flattened_mut().iter_mut().zip(v) {
                    *w = (*v as i32 - bias) as i8;
                }
            }
        } else {
            let extra = g.bits.add(b * extra_bytes(bits)) as *const u64;
            let mask = |x: usize, p: usize| std::ptr::read_unaligned(extra.add(8 * x + p));
            let (lo, hi) = blk.w.split_at_mut(4);
            for (p, v) in vals.chunks_exact(64).enumerate() {
                let (lo, hi) = (lo[p].as_flattened_mut(), hi[p].as_flattened_mut());
                for (e, &v) in v.iter().enumerate() {
                    let (mut l, mut h) = ((v & 0x0f) as i32, (v >> 4) as i32);
                    for x in 0..(bits as usize - 4) {
                        l |= (((mask(x, p) >> e) & 1) as i32) << (4 + x);
                        h |= (((mask(x, p + 4) >> e) & 1) as i32) << (4 + x);
                    }
                    (lo[e], hi[e]) = ((l - bias) as i8, (h - bias) as i8);
                }
            }
        }
        [blk.d0, blk.d1, blk.m] = row_scales(format, g, b);
    }

    /// The 16 f16 values at `p` (any alignment) as f32.
    ///
    /// # Safety
    /// `p` must point at 32 readable bytes.
    #[inline(always)]
    unsafe fn f16_row(p: *const u8) -> [f32; ROWS] {
        use half::slice::HalfFloatSliceExt;
        let bits = std::ptr::read_unaligned(p as *const [u16; ROWS]);
        let mut out = [0f32; ROWS];
        bits.map(half::f16::from_bits)
            .convert_to_f32_slice(&mut out);
        out
    }

    /// Each row's eight four-element integer sums of one block against one activation
    /// block: `s[k][i]` for row `i`, elements `4k..4k+4`.
    #[inline(always)]
    fn sums(blk: &Block16, qs: &[i8; QK]) -> [[i32; ROWS]; 8] {
        let mut s = [[0i32; ROWS]; 8];
        for (k, sk) in s.iter_mut().enumerate() {
            let a: [i32; 4] = std::array::from_fn(|j| qs[4 * k + j] as i32);
            for (v, w) in sk.iter_mut().zip(&blk.w[k]) {
                *v = w[0] as i32 * a[0]
                    + w[1] as i32 * a[1]
                    + w[2] as i32 * a[2]
                    + w[3] as i32 * a[3];
            }
        }
        s
    }

    /// The portable path, in [`dot_ref`]'s arithmetic: the group is decoded once (signed
    /// values in planes, f32 scales; no allocation after a thread's first call) for all
    /// the activation rows, and every step is a plain loop over the 16 rows, which the
    /// compiler vectorises with whatever the target has (NEON on aarch64).
    ///
    /// # Safety
    /// `g` must point at a group of `nb` blocks of `format`.
    pub(super) unsafe fn group_dot(
        format: QFormat,
        lanes: bool,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
    ) {
        group_dot_with(format, lanes, g, nb, a, out, sums)
    }

    /// [`group_dot`] with each block's integer sums by ARMv8.2's `SDOT` (the `dotprod`
    /// extension, on every ARM server core since Neoverse N1 and on Apple M1 and later):
    /// one instruction sums four products for each of four rows, where the baseline
    /// vectorisation widens to 16 bits first and needs several. The same integers, so
    /// the same bits.
    ///
    /// # Safety
    /// As [`group_dot`], and the CPU must have `dotprod`.
    #[cfg(target_arch = "aarch64")]
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn group_dot_dotprod(
        format: QFormat,
        lanes: bool,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
    ) {
        // SAFETY: the caller checked the feature.
        group_dot_with(format, lanes, g, nb, a, out, |blk, qs| unsafe {
            sums_sdot(blk, qs)
        })
    }

    /// [`sums`] by `SDOT` (by element): plane `k`'s 64 bytes are four registers of four
    /// rows each, and the activations' four elements `4k..4k+4` one 32-bit element of a
    /// register.
    ///
    /// # Safety
    /// The CPU must have `dotprod` (the caller is compiled with it).
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn sums_sdot(blk: &Block16, qs: &[i8; QK]) -> [[i32; ROWS]; 8] {
        use std::arch::aarch64::*;
        let mut s = [[0i32; ROWS]; 8];
        let act = [vld1q_s8(qs.as_ptr()), vld1q_s8(qs.as_ptr().add(16))];
        macro_rules! plane {
            ($k:literal, $lane:literal) => {
                let w = blk.w[$k].as_flattened().as_ptr();
                for r in 0..4 {
                    let mut acc = vdupq_n_s32(0);
                    std::arch::asm!(
                        "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{lane}]",
                        acc = inout(vreg) acc,
                        w = in(vreg) vld1q_s8(w.add(16 * r)),
                        a = in(vreg) act[$k / 4],
                        lane = const $lane,
                        options(pure, nomem, nostack, preserves_flags),
                    );
                    vst1q_s32(s[$k][4 * r..].as_mut_ptr(), acc);
                }
            };
        }
        plane!(0, 0);
        plane!(1, 1);
        plane!(2, 2);
        plane!(3, 3);
        plane!(4, 0);
        plane!(5, 1);
        plane!(6, 2);
        plane!(7, 3);
        s
    }

    /// [`group_dot`]'s body with the integer sums of a block by `sums`.
    #[inline(always)]
    unsafe fn group_dot_with(
        format: QFormat,
        lanes: bool,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
        sums: impl Fn(&Block16, &[i8; QK]) -> [[i32; ROWS]; 8],
    ) {
        crate::with_reused(&DECODED, |blocks| {
            if blocks.len() < nb {
                blocks.resize(nb, Block16::default());
            }
            let blocks = &mut blocks[..nb];
            for (b, blk) in blocks.iter_mut().enumerate() {
                decode_block(format, g, b, blk);
            }
            let scheme = format.scheme();
            let (has_min, two) = (scheme.has_min(), scheme.two_scales());
            for (ac, o) in a.iter().zip(out.iter_mut()) {
                let mut mins = [0f32; ROWS];
                let mut acc = [[0f32; ROWS]; 8];
                for (blk, ab) in blocks.iter().zip(ac.iter()) {
                    if has_min {
                        for (v, &m) in mins.iter_mut().zip(&blk.m) {
                            *v += m * ab.s;
                        }
                    }
                    let s = sums(blk, &ab.qs);
                    let d: [f32; ROWS] = std::array::from_fn(|i| blk.d0[i] * ab.d);
                    if lanes {
                        for (l, sk) in acc.iter_mut().zip(&s) {
                            for i in 0..ROWS {
                                l[i] = d[i].mul_add(sk[i] as f32, l[i]);
                            }
                        }
                    } else {
                        // One accumulator a row: acc[0].
                        for i in 0..ROWS {
                            let lo = s[0][i] + s[1][i] + s[2][i] + s[3][i];
                            let hi = s[4][i] + s[5][i] + s[6][i] + s[7][i];
                            acc[0][i] = if two {
                                let a0 = d[i].mul_add(lo as f32, acc[0][i]);
                                (blk.d1[i] * ab.d).mul_add(hi as f32, a0)
                            } else {
                                d[i].mul_add((lo + hi) as f32, acc[0][i])
                            };
                        }
                    }
                }
                for (i, v) in o.iter_mut().enumerate() {
                    let t = if lanes {
                        let l = |k: usize| acc[k][i];
                        ((l(0) + l(4)) + (l(2) + l(6))) + ((l(1) + l(5)) + (l(3) + l(7)))
                    } else {
                        acc[0][i]
                    };
                    *v = if has_min { t + mins[i] } else { t };
                }
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Scales of block `b` for 16 rows: (d0, d1, m) as f32.
    #[inline(always)]
    unsafe fn scales512(scheme: Scheme, g: Group, b: usize) -> (__m512, __m512, __m512) {
        scales_with(
            scheme,
            g,
            b,
            _mm512_setzero_ps(),
            |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            |p, signed| {
                let x = _mm_loadu_si128(p as *const __m128i);
                _mm512_cvtepi32_ps(if signed {
                    _mm512_cvtepi8_epi32(x)
                } else {
                    _mm512_cvtepu8_epi32(x)
                })
            },
            |x, y| _mm512_mul_ps(x, y),
            |x| _mm512_xor_ps(x, _mm512_set1_ps(-0.0)),
        )
    }

    /// Asks for block `b`'s share of the next group's bytes, so that group streams in
    /// while this one computes (the hardware prefetcher alone left half the memory
    /// bandwidth unused on these short streams).
    #[inline(always)]
    unsafe fn prefetch_next(g: Group, b: usize) {
        let first = b * g.prefetch;
        let end = (first + g.prefetch).min(g.stride / 64);
        crate::prefetch_lines::<_MM_HINT_T0>(
            g.next.wrapping_add(64 * first),
            end.saturating_sub(first),
        );
    }

    // ---- AVX-512 VNNI: 16 rows per register ----

    /// `mins + m·s`, a block's minimum term added to its accumulator (unchanged for a
    /// format without a minimum).
    #[inline(always)]
    unsafe fn add_min512(scheme: Scheme, mins: __m512, m: __m512, s: f32) -> __m512 {
        match scheme {
            // Exact as one FMA: both factors are f16 values.
            Scheme::D16M16 => _mm512_fmadd_ps(m, _mm512_set1_ps(s), mins),
            Scheme::K4 => _mm512_add_ps(mins, _mm512_mul_ps(m, _mm512_set1_ps(s))),
            Scheme::D16 | Scheme::K6 => mins,
        }
    }

    /// Eight zmm registers added as llama.cpp's `hsum8` adds the lanes of one.
    #[inline(always)]
    unsafe fn tree512(l: &[__m512; 8]) -> __m512 {
        let r = [
            _mm512_add_ps(l[0], l[4]),
            _mm512_add_ps(l[1], l[5]),
            _mm512_add_ps(l[2], l[6]),
            _mm512_add_ps(l[3], l[7]),
        ];
        _mm512_add_ps(_mm512_add_ps(r[0], r[2]), _mm512_add_ps(r[1], r[3]))
    }

    /// Lanes `p` and `p + 4` of block `b` (unsigned bytes, four elements of each row per
    /// 32-bit lane): one plane unpacked at a time keeps two weight registers live.
    #[inline(always)]
    unsafe fn plane512<const BITS: u32>(g: Group, b: usize, p: usize) -> (__m512i, __m512i) {
        if !g.unpacked.is_null() {
            let u = g.unpacked.add(512 * b);
            return (
                _mm512_load_si512(u.add(64 * p) as *const _),
                _mm512_load_si512(u.add(64 * (p + 4)) as *const _),
            );
        }
        let v = g.vals.add(b * value_bytes(BITS));
        if BITS == 8 {
            return (
                _mm512_load_si512(v.add(64 * p) as *const _),
                _mm512_load_si512(v.add(64 * (p + 4)) as *const _),
            );
        }
        let low = _mm512_set1_epi8(0x0f);
        let x = _mm512_load_si512(v.add(64 * p) as *const _);
        let (mut lo, mut hi) = (
            _mm512_and_si512(x, low),
            _mm512_and_si512(_mm512_srli_epi16(x, 4), low),
        );
        let e = g.bits.add(b * extra_bytes(BITS)) as *const u64;
        for x in 0..(BITS as usize - 4) {
            let add = _mm512_set1_epi8(16 << x);
            let (kl, kh): (__mmask64, __mmask64) = (
                std::ptr::read(e.add(8 * x + p)),
                std::ptr::read(e.add(8 * x + p + 4)),
            );
            lo = _mm512_mask_add_epi8(lo, kl, lo, add);
            hi = _mm512_mask_add_epi8(hi, kh, hi, add);
        }
        (lo, hi)
    }

    /// Lanes arithmetic: eight accumulators per activation row. `BIASED`: the format has
    /// an offset, so each lane sum starts from the activation's correction.
    #[inline(always)]
    unsafe fn lanes512<const BITS: u32, const C: usize>(
        scheme: Scheme,
        g: Group,
        nb: usize,
        a: [&[Act]; C],
        out: &mut [[f32; ROWS]],
    ) {
        let zero = _mm512_setzero_ps();
        let mut acc = [[zero; 8]; C];
        let mut mins = [zero; C];
        let biased = !scheme.has_min();
        for b in 0..nb {
            prefetch_next(g, b);
            let (d, _, m) = scales512(scheme, g, b);
            let mut dv = [zero; C];
            for c in 0..C {
                let ab = a[c].get_unchecked(b);
                mins[c] = add_min512(scheme, mins[c], m, ab.s);
                dv[c] = _mm512_mul_ps(d, _mm512_set1_ps(ab.d));
            }
            for p in 0..4 {
                let (wl, wh) = plane512::<BITS>(g, b, p);
                for c in 0..C {
                    let ab = a[c].get_unchecked(b);
                    let q = ab.qs.as_ptr() as *const i32;
                    let (il, ih) = if biased {
                        (
                            _mm512_set1_epi32(ab.neg[p]),
                            _mm512_set1_epi32(ab.neg[p + 4]),
                        )
                    } else {
                        (_mm512_setzero_si512(), _mm512_setzero_si512())
                    };
                    let sl = _mm512_dpbusd_epi32(
                        il,
                        wl,
                        _mm512_set1_epi32(std::ptr::read_unaligned(q.add(p))),
                    );
                    let sh = _mm512_dpbusd_epi32(
                        ih,
                        wh,
                        _mm512_set1_epi32(std::ptr::read_unaligned(q.add(p + 4))),
                    );
                    acc[c][p] = _mm512_fmadd_ps(dv[c], _mm512_cvtepi32_ps(sl), acc[c][p]);
                    acc[c][p + 4] = _mm512_fmadd_ps(dv[c], _mm512_cvtepi32_ps(sh), acc[c][p + 4]);
                }
            }
        }
        for c in 0..C {
            let mut r = tree512(&acc[c]);
            if scheme.has_min() {
                r = _mm512_add_ps(r, mins[c]);
            }
            _mm512_storeu_ps(out[c].as_mut_ptr(), r);
        }
    }

    /// Halves arithmetic: one accumulator per activation row.
    #[inline(always)]
    unsafe fn halves512<const BITS: u32, const C: usize>(
        scheme: Scheme,
        g: Group,
        nb: usize,
        a: [&[Act]; C],
        out: &mut [[f32; ROWS]],
    ) {
        let zero = _mm512_setzero_ps();
        let mut acc = [zero; C];
        let mut mins = [zero; C];
        let izero = _mm512_setzero_si512();
        for b in 0..nb {
            prefetch_next(g, b);
            let (d0, d1, m) = scales512(scheme, g, b);
            // Every row's sums first, plane by plane (the rows' chains side by side),
            // then their scaling.
            let mut lo = [izero; C];
            let mut hi = [izero; C];
            if !scheme.has_min() {
                // Formats with a minimum have no bias: nothing to correct.
                for c in 0..C {
                    let ab = a[c].get_unchecked(b);
                    (lo[c], hi[c]) = (_mm512_set1_epi32(ab.neg_lo), _mm512_set1_epi32(ab.neg_hi));
                }
            }
            for p in 0..4 {
                let (wl, wh) = plane512::<BITS>(g, b, p);
                for c in 0..C {
                    let q = a[c].get_unchecked(b).qs.as_ptr() as *const i32;
                    let (al, ah) = (
                        std::ptr::read_unaligned(q.add(p)),
                        std::ptr::read_unaligned(q.add(p + 4)),
                    );
                    lo[c] = _mm512_dpbusd_epi32(lo[c], wl, _mm512_set1_epi32(al));
                    hi[c] = _mm512_dpbusd_epi32(hi[c], wh, _mm512_set1_epi32(ah));
                }
            }
            for c in 0..C {
                let ab = a[c].get_unchecked(b);
                mins[c] = add_min512(scheme, mins[c], m, ab.s);
                let da = _mm512_set1_ps(ab.d);
                if scheme.two_scales() {
                    acc[c] =
                        _mm512_fmadd_ps(_mm512_mul_ps(d0, da), _mm512_cvtepi32_ps(lo[c]), acc[c]);
                    acc[c] =
                        _mm512_fmadd_ps(_mm512_mul_ps(d1, da), _mm512_cvtepi32_ps(hi[c]), acc[c]);
                } else {
                    let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[c], hi[c]));
                    acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(d0, da), sum, acc[c]);
                }
            }
        }
        for c in 0..C {
            let r = if scheme.has_min() {
                _mm512_add_ps(acc[c], mins[c])
            } else {
                acc[c]
            };
            _mm512_storeu_ps(out[c].as_mut_ptr(), r);
        }
    }

    /// One call of `$halves` for the (at most `$most`) activation rows `a`.
    macro_rules! halves_call {
        ($halves:ident, 4, $g:expr, $a:expr, $out:expr) => {{
            let (g, a, out) = ($g, $a, $out);
            match a.len() {
                1 => bits!($halves, 1, g, [a[0]], out),
                2 => bits!($halves, 2, g, [a[0], a[1]], out),
                3 => bits!($halves, 3, g, [a[0], a[1], a[2]], out),
                _ => bits!($halves, 4, g, [a[0], a[1], a[2], a[3]], out),
            }
        }};
        ($halves:ident, 6, $g:expr, $a:expr, $out:expr) => {{
            let (g, a, out) = ($g, $a, $out);
            match a.len() {
                1 => bits!($halves, 1, g, [a[0]], out),
                2 => bits!($halves, 2, g, [a[0], a[1]], out),
                3 => bits!($halves, 3, g, [a[0], a[1], a[2]], out),
                4 => bits!($halves, 4, g, [a[0], a[1], a[2], a[3]], out),
                5 => bits!($halves, 5, g, [a[0], a[1], a[2], a[3], a[4]], out),
                _ => bits!($halves, 6, g, [a[0], a[1], a[2], a[3], a[4], a[5]], out),
            }
        }};
    }

    /// Calls `$lanes` (at most 2 activation rows a call: 16 accumulators) or `$halves`
    /// (at most `$most`: 6 with AVX-512's 32 registers, 4 with AVX2's 16) for the format's
    /// bit width and arithmetic.
    macro_rules! dispatch {
        ($lanes:ident, $halves:ident, $most:tt, $format:expr, $use_lanes:expr, $g:expr, $nb:expr, $a:expr, $out:expr) => {{
            let (format, g, nb, a, out) = ($format, $g, $nb, $a, $out);
            macro_rules! bits {
                ($f:ident, $c:literal, $grp:expr, $cols:expr, $o:expr) => {{
                    let (grp, cols): (Group, [&[Act]; $c]) = ($grp, $cols);
                    // Each format's scheme as a constant, so that the kernel's branches
                    // on it fold away.
                    use Scheme::*;
                    match format {
                        QFormat::Q4_0 => $f::<4, $c>(D16, grp, nb, cols, $o),
                        QFormat::Q4_1 => $f::<4, $c>(D16M16, grp, nb, cols, $o),
                        QFormat::Q5_0 => $f::<5, $c>(D16, grp, nb, cols, $o),
                        QFormat::Q5_1 => $f::<5, $c>(D16M16, grp, nb, cols, $o),
                        QFormat::Q8_0 => $f::<8, $c>(D16, grp, nb, cols, $o),
                        QFormat::Q4K => $f::<4, $c>(K4, grp, nb, cols, $o),
                        QFormat::Q5K => $f::<5, $c>(K4, grp, nb, cols, $o),
                        QFormat::Q6K => $f::<6, $c>(K6, grp, nb, cols, $o),
                    }
                }};
            }
            // Each call over the group asks for its share of the next group's bytes:
            // spread over the whole group's work, the requests do not queue up behind
            // each other (16 rows, weights from L3: the output matrix 15–20% faster than
            // with the first call asking for all of it).
            if $use_lanes {
                let calls = a.len().div_ceil(2);
                for (i, (a, out)) in a.chunks(2).zip(out.chunks_mut(2)).enumerate() {
                    let first = g.share(i, calls, nb);
                    match a.len() {
                        1 => bits!($lanes, 1, first, [a[0]], out),
                        _ => bits!($lanes, 2, first, [a[0], a[1]], out),
                    }
                }
            } else {
                // As few calls as `$most` rows a call allows, their rows evened out.
                let calls = a.len().div_ceil($most);
                let per = a.len().div_ceil(calls);
                for (i, (a, out)) in a.chunks(per).zip(out.chunks_mut(per)).enumerate() {
                    let first = g.share(i, calls, nb);
                    halves_call!($halves, $most, first, a, out);
                }
            }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(super) unsafe fn dispatch_512(
        format: QFormat,
        lanes: bool,
        amx: bool,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
    ) {
        if amx
            && !lanes
            && a.len() >= AMX_MIN_ROWS
            && format.block_elems() == QK
            && blocks_amx(format, g, nb, a, out)
        {
            return;
        }
        let per_call = if lanes { 2 } else { 6 };
        if a.len() <= per_call {
            return dispatch!(lanes512, halves512, 6, format, lanes, g, nb, a, out);
        }
        // More activation rows than one kernel call takes: unpack the group's values once
        // (into L1) for all the calls, instead of once per call.
        crate::with_reused(&UNPACKED, |buf| {
            // Every register is written below before it is read: grow only.
            if buf.len() < 8 * nb {
                buf.resize(8 * nb, _mm512_setzero_si512());
            }
            macro_rules! unpack {
                ($bits:literal) => {
                    for b in 0..nb {
                        for p in 0..4 {
                            (buf[8 * b + p], buf[8 * b + p + 4]) = plane512::<$bits>(g, b, p);
                        }
                    }
                };
            }
            match format.bits() {
                4 => unpack!(4),
                5 => unpack!(5),
                6 => unpack!(6),
                _ => unpack!(8),
            }
            // The calls ask for the next group's bytes as they go, each its share (asked
            // for here, all at once, they would queue up behind each other).
            let gu = Group {
                unpacked: buf.as_ptr() as *const u8,
                ..g
            };
            dispatch!(lanes512, halves512, 6, format, lanes, gu, nb, a, out)
        })
    }

    /// Fewest activation rows for which the AMX tiles beat [`halves512`].
    const AMX_MIN_ROWS: usize = 8;

    /// Activation rows per tile product.
    const TILE_ROWS: usize = 16;

    /// [`halves512`]'s arithmetic for a 32-element format (one scale, maybe a minimum, per
    /// block) with each block's integer sums done by AMX tile products: the group's
    /// values are unpacked once, offset to signed bytes (`u − bias`, so the tile's signed
    /// product is `Σ (u − bias)·a` with no correction), then for up to 16 activation rows
    /// at a time each block is one tile product, and the vector units only scale its
    /// exact sums, in `halves512`'s operations and order. Returns false, having done
    /// nothing, when the activation rows are not evenly spaced in memory (a tile row
    /// stride).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn blocks_amx(
        format: QFormat,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
    ) -> bool {
        let base = a[0].as_ptr() as usize;
        let stride = a
            .get(1)
            .map_or(0, |r| (r.as_ptr() as usize).wrapping_sub(base));
        if !a
            .iter()
            .enumerate()
            .all(|(c, r)| r.as_ptr() as usize == base.wrapping_add(c.wrapping_mul(stride)))
        {
            return false;
        }
        crate::with_reused(&UNPACKED, |buf| {
            // Every register is written below before it is read: grow only.
            if buf.len() < 8 * nb {
                buf.resize(8 * nb, _mm512_setzero_si512());
            }
            let bias = _mm512_set1_epi8(format.bias() as u8 as i8);
            let dst = buf.as_mut_ptr();
            macro_rules! unpack {
                ($bits:literal) => {
                    |b: usize| {
                        for p in 0..4 {
                            let (lo, hi) = plane512::<$bits>(g, b, p);
                            *dst.add(8 * b + p) = _mm512_sub_epi8(lo, bias);
                            *dst.add(8 * b + p + 4) = _mm512_sub_epi8(hi, bias);
                        }
                    }
                };
            }
            let w = dst as *const u8;
            match format.bits() {
                4 => row_tiles(format, g, nb, a, out, (base, stride), w, &unpack!(4)),
                5 => row_tiles(format, g, nb, a, out, (base, stride), w, &unpack!(5)),
                _ => row_tiles(format, g, nb, a, out, (base, stride), w, &unpack!(8)),
            }
        });
        true
    }

    /// The activation rows `a` (from `base`, `stride` bytes apart) in tiles of up to 16,
    /// against the group that `unpack(block)` unpacks to `w` as the first tile row goes.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn row_tiles(
        format: QFormat,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
        (base, stride): (usize, usize),
        w: *const u8,
        unpack: &impl Fn(usize),
    ) {
        for (t, (rows, o)) in a
            .chunks(TILE_ROWS)
            .zip(out.chunks_mut(TILE_ROWS))
            .enumerate()
        {
            let first = base.wrapping_add((t * TILE_ROWS).wrapping_mul(stride));
            let (scheme, a0, m) = (format.scheme(), first as *const Act, rows.len());
            // The first tile row unpacks the group's values a few blocks ahead of its
            // tile products and asks for the next group's bytes: both spread over its
            // blocks, so that memory requests do not queue up behind each other.
            let (g, unpack) = if t == 0 {
                (g, Some(unpack))
            } else {
                (Group { prefetch: 0, ..g }, None)
            };
            if scheme.has_min() {
                tiles::<true>(scheme, g, nb, w, a0, stride, m, o, unpack);
            } else {
                tiles::<false>(scheme, g, nb, w, a0, stride, m, o, unpack);
            }
        }
    }

    /// `m` (≤ 16) activation rows from `a0`, `stride` bytes apart, against the group whose
    /// signed values are unpacked at `w`. Blocks go two at a time, each a tile product
    /// into its own tile: while the vector units scale one pair's sums, the next pair's
    /// tiles are stored and the pair after it multiplied (two stores of sums and two
    /// pairs of tiles, alternating). Measured against four blocks at a time with each
    /// tile stored right behind its product (one core, 16 rows): the Q8_0 output matrix
    /// 3.2 → 2.7 ms, the Q4_1 matrices unchanged.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tiles<const MIN: bool>(
        scheme: Scheme,
        g: Group,
        nb: usize,
        w: *const u8,
        a0: *const Act,
        stride: usize,
        m: usize,
        out: &mut [[f32; ROWS]],
        unpack: Option<&impl Fn(usize)>,
    ) {
        const CHUNK: usize = 2;
        const SUMS: usize = CHUNK * TILE_ROWS * ROWS;
        #[repr(C, align(64))]
        struct Sums([i32; 2 * SUMS]);
        // Each chunk's sums are stored by its tile products before they are read.
        let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
        let sums = sums.as_mut_ptr() as *mut i32;
        crate::amx::configure(m, |c| {
            c.tile(0, m, 64)
                .tile(1, m, 64)
                .tile(2, m, 64)
                .tile(3, m, 64)
                .tile(4, m, QK)
                .tile(5, m, QK)
                .tile(6, QK / 4, 64)
                .tile(7, QK / 4, 64)
        });
        // Chunk `k` (blocks `2k, 2k + 1`) is multiplied into tiles `2(k % 2)` and
        // `2(k % 2) + 1`, and stored a turn later, by when its products are likely done
        // (a tile store right behind its product waits for it).
        let products = |k: usize| {
            use crate::amx::product;
            let b = k * CHUNK;
            let n = (nb - b).min(CHUNK);
            // `qs` opens `Act` (repr C): a tile row is a block's 32 quantized values.
            let at = |j: usize| a0.add(b + j) as *const u8;
            let wt = |j: usize| w.add(512 * (b + j));
            if k.is_multiple_of(2) {
                product::<0, 4, 6>(at(0), stride, wt(0));
                if n > 1 {
                    product::<1, 5, 7>(at(1), stride, wt(1));
                }
            } else {
                product::<2, 4, 6>(at(0), stride, wt(0));
                if n > 1 {
                    product::<3, 5, 7>(at(1), stride, wt(1));
                }
            }
        };
        let stores = |k: usize| {
            use crate::amx::store;
            let b = k * CHUNK;
            let n = (nb - b).min(CHUNK);
            let st = |j: usize| sums.add((k % 2) * SUMS + j * TILE_ROWS * ROWS) as *mut u8;
            if k.is_multiple_of(2) {
                store::<0>(st(0));
                if n > 1 {
                    store::<1>(st(1));
                }
            } else {
                store::<2>(st(0));
                if n > 1 {
                    store::<3>(st(1));
                }
            }
        };
        // Unpacks (with `unpack`) the chunk from block `b`.
        let fill = |b: usize| {
            if let Some(unpack) = unpack {
                (b..(b + CHUNK).min(nb)).for_each(unpack);
            }
        };
        let chunks = nb.div_ceil(CHUNK);
        fill(0);
        fill(CHUNK);
        fill(2 * CHUNK);
        products(0);
        stores(0);
        if chunks > 1 {
            products(1);
        }
        let zero = _mm512_setzero_ps();
        let (mut acc, mut mins) = ([zero; TILE_ROWS], [zero; TILE_ROWS]);
        let mut b = 0;
        while b < nb {
            let (n, k) = ((nb - b).min(CHUNK), b / CHUNK);
            if k + 1 < chunks {
                stores(k + 1);
            }
            if k + 2 < chunks {
                products(k + 2);
            }
            // The chunk the tile products two turns on read.
            fill(b + 3 * CHUNK);
            let (mut d, mut mv) = ([zero; CHUNK], [zero; CHUNK]);
            for j in 0..n {
                prefetch_next(g, b + j);
                (d[j], _, mv[j]) = scales512(scheme, g, b + j);
            }
            let chunk = sums.add((b / CHUNK % 2) * SUMS) as *const i32;
            for c in 0..m {
                let row = ((a0 as *const u8).add(c * stride) as *const Act).add(b);
                let (mut s, mut mn) = (acc[c], mins[c]);
                let mut step = |j: usize| {
                    let ab = &*row.add(j);
                    if MIN {
                        // `halves512`'s product then sum, in one instruction: the product
                        // of two f16 values is exact in f32, so fusing rounds nothing
                        // differently.
                        mn = _mm512_fmadd_ps(mv[j], _mm512_set1_ps(ab.s), mn);
                    }
                    let sum = _mm512_load_si512(chunk.add((j * TILE_ROWS + c) * ROWS) as *const _);
                    let dv = _mm512_mul_ps(d[j], _mm512_set1_ps(ab.d));
                    s = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(sum), s);
                };
                if n == CHUNK {
                    step(0);
                    step(1);
                } else {
                    for j in 0..n {
                        step(j);
                    }
                }
                (acc[c], mins[c]) = (s, mn);
            }
            b += n;
        }
        for c in 0..m {
            let r = if MIN {
                _mm512_add_ps(acc[c], mins[c])
            } else {
                acc[c]
            };
            _mm512_storeu_ps(out[c].as_mut_ptr(), r);
        }
    }

    std::thread_local! {
        /// A group's unpacked value registers, reused across calls on this thread.
        static UNPACKED: std::cell::RefCell<Vec<__m512i>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }

    // ---- AVX2: the same group as two halves of 8 rows ----

    /// Bits `4r + i` of a 32-bit mask (rows r of this half) as bytes 0 or `value`.
    #[inline(always)]
    unsafe fn expand(mask: u32, value: i8) -> __m256i {
        let v = _mm256_set1_epi32(mask as i32);
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, pick), bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(value))
    }

    #[inline(always)]
    unsafe fn values256<const BITS: u32>(g: Group, b: usize, h: usize) -> [__m256i; 8] {
        let mut w = [_mm256_setzero_si256(); 8];
        let v = g.vals.add(b * value_bytes(BITS) + 32 * h);
        if BITS == 8 {
            for (p, wp) in w.iter_mut().enumerate() {
                *wp = _mm256_load_si256(v.add(64 * p) as *const _);
            }
            return w;
        }
        let low = _mm256_set1_epi8(0x0f);
        for p in 0..4 {
            let x = _mm256_load_si256(v.add(64 * p) as *const _);
            w[p] = _mm256_and_si256(x, low);
            w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
        }
        let e = g.bits.add(b * extra_bytes(BITS)) as *const u32;
        for x in 0..(BITS as usize - 4) {
            for (p, wp) in w.iter_mut().enumerate() {
                let k = std::ptr::read(e.add(2 * (8 * x + p) + h));
                *wp = _mm256_or_si256(*wp, expand(k, 16 << x));
            }
        }
        w
    }

    /// Σ (w·a) over groups of four bytes: for values < 64 straight (`maddubs` cannot
    /// saturate), for 8-bit values (offset by 128) with the sign trick on the signed value.
    #[inline(always)]
    unsafe fn products<const BITS: u32>(w: __m256i, a: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        if BITS == 8 {
            let s = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(s, s), _mm256_sign_epi8(a, s));
            _mm256_madd_epi16(p, ones)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones)
        }
    }

    /// This half's scales (rows 8h..8h+8) of block `b`: (d0, d1, m).
    #[inline(always)]
    unsafe fn scales256(scheme: Scheme, g: Group, b: usize, h: usize) -> (__m256, __m256, __m256) {
        scales_with(
            scheme,
            g,
            b,
            _mm256_setzero_ps(),
            |p| _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h) as *const __m128i)),
            |p, signed| {
                let x = _mm_loadl_epi64(p.add(8 * h) as *const __m128i);
                _mm256_cvtepi32_ps(if signed {
                    _mm256_cvtepi8_epi32(x)
                } else {
                    _mm256_cvtepu8_epi32(x)
                })
            },
            |x, y| _mm256_mul_ps(x, y),
            |x| _mm256_xor_ps(x, _mm256_set1_ps(-0.0)),
        )
    }

    /// One lane's integer sum for 8 rows: `Σ (u − bias)·a` over four elements.
    #[inline(always)]
    unsafe fn lane_sum<const BITS: u32>(w: __m256i, q: i32, neg: i32) -> __m256i {
        let p = products::<BITS>(w, _mm256_set1_epi32(q));
        // 8-bit values are summed signed: no correction.
        if BITS == 8 {
            p
        } else {
            _mm256_add_epi32(p, _mm256_set1_epi32(neg))
        }
    }

    #[inline(always)]
    unsafe fn lanes256<const BITS: u32, const C: usize>(
        scheme: Scheme,
        g: Group,
        nb: usize,
        a: [&[Act]; C],
        out: &mut [[f32; ROWS]],
    ) {
        for h in 0..2 {
            let zero = _mm256_setzero_ps();
            let mut acc = [[zero; 8]; C];
            let mut mins = [zero; C];
            for b in 0..nb {
                if h == 0 {
                    prefetch_next(g, b);
                }
                let w = values256::<BITS>(g, b, h);
                let (d, _, m) = scales256(scheme, g, b, h);
                for c in 0..C {
                    let ab = a[c].get_unchecked(b);
                    let q = ab.qs.as_ptr() as *const i32;
                    if scheme.has_min() {
                        mins[c] = _mm256_add_ps(mins[c], _mm256_mul_ps(m, _mm256_set1_ps(ab.s)));
                    }
                    let dv = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                    for k in 0..8 {
                        let s =
                            lane_sum::<BITS>(w[k], std::ptr::read_unaligned(q.add(k)), ab.neg[k]);
                        acc[c][k] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(s), acc[c][k]);
                    }
                }
            }
            for c in 0..C {
                let l = &acc[c];
                let r = [
                    _mm256_add_ps(l[0], l[4]),
                    _mm256_add_ps(l[1], l[5]),
                    _mm256_add_ps(l[2], l[6]),
                    _mm256_add_ps(l[3], l[7]),
                ];
                let mut t = _mm256_add_ps(_mm256_add_ps(r[0], r[2]), _mm256_add_ps(r[1], r[3]));
                if scheme.has_min() {
                    t = _mm256_add_ps(t, mins[c]);
                }
                _mm256_storeu_ps(out[c].as_mut_ptr().add(8 * h), t);
            }
        }
    }

    #[inline(always)]
    unsafe fn halves256<const BITS: u32, const C: usize>(
        scheme: Scheme,
        g: Group,
        nb: usize,
        a: [&[Act]; C],
        out: &mut [[f32; ROWS]],
    ) {
        for h in 0..2 {
            let zero = _mm256_setzero_ps();
            let mut acc = [zero; C];
            let mut mins = [zero; C];
            for b in 0..nb {
                if h == 0 {
                    prefetch_next(g, b);
                }
                let w = values256::<BITS>(g, b, h);
                let (d0, d1, m) = scales256(scheme, g, b, h);
                for c in 0..C {
                    let ab = a[c].get_unchecked(b);
                    let q = ab.qs.as_ptr() as *const i32;
                    if scheme.has_min() {
                        mins[c] = _mm256_add_ps(mins[c], _mm256_mul_ps(m, _mm256_set1_ps(ab.s)));
                    }
                    let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for p in 0..4 {
                        let (al, ah) = (
                            std::ptr::read_unaligned(q.add(p)),
                            std::ptr::read_unaligned(q.add(p + 4)),
                        );
                        lo = _mm256_add_epi32(lo, lane_sum::<BITS>(w[p], al, ab.neg[p]));
                        hi = _mm256_add_epi32(hi, lane_sum::<BITS>(w[p + 4], ah, ab.neg[p + 4]));
                    }
                    let da = _mm256_set1_ps(ab.d);
                    if scheme.two_scales() {
                        acc[c] =
                            _mm256_fmadd_ps(_mm256_mul_ps(d0, da), _mm256_cvtepi32_ps(lo), acc[c]);
                        acc[c] =
                            _mm256_fmadd_ps(_mm256_mul_ps(d1, da), _mm256_cvtepi32_ps(hi), acc[c]);
                    } else {
                        let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
                        acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d0, da), sum, acc[c]);
                    }
                }
            }
            for c in 0..C {
                let r = if scheme.has_min() {
                    _mm256_add_ps(acc[c], mins[c])
                } else {
                    acc[c]
                };
                _mm256_storeu_ps(out[c].as_mut_ptr().add(8 * h), r);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dispatch_avx2(
        format: QFormat,
        lanes: bool,
        g: Group,
        nb: usize,
        a: &[&[Act]],
        out: &mut [[f32; ROWS]],
    ) {
        dispatch!(lanes256, halves256, 4, format, lanes, g, nb, a, out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::formats::QFormat::*;

    pub(crate) const FORMATS: [QFormat; 8] = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K];

    pub(crate) fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_bits().to_le_bytes()
    }

    /// Random file blocks of `format` with finite, plausible scales.
    pub(crate) fn random_blocks(
        format: QFormat,
        count: usize,
        next: &mut impl FnMut() -> u64,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(count * format.block_bytes());
        for _ in 0..count {
            let mut b: Vec<u8> = (0..format.block_bytes()).map(|_| next() as u8).collect();
            let scale = (next() % 1000 + 1) as f32 / 1e4;
            let min = -((next() % 1000) as f32) / 1e3;
            match format {
                Q4_0 | Q5_0 | Q8_0 => b[0..2].copy_from_slice(&f16_bytes(scale)),
                Q4_1 | Q5_1 | Q4K | Q5K => {
                    b[0..2].copy_from_slice(&f16_bytes(scale));
                    b[2..4].copy_from_slice(&f16_bytes(min.abs() / 10.0));
                }
                Q6K => b[208..210].copy_from_slice(&f16_bytes(scale / 10.0)),
            }
            out.extend(b);
        }
        out
    }

    pub(crate) fn random_acts(m: usize, k: usize, next: &mut impl FnMut() -> u64) -> Vec<f32> {
        (0..m * k)
            .map(|_| (next() % 20001) as f32 / 1000.0 - 10.0)
            .collect()
    }

    fn decoded_rows(format: QFormat, bytes: &[u8], n: usize, k: usize) -> Vec<Vec<Decoded>> {
        let per_row = k / format.block_elems() * format.block_bytes();
        let sub = format.block_elems() / QK;
        (0..n)
            .map(|r| {
                let mut row = vec![Decoded::default(); k / QK];
                for (fb, o) in bytes[r * per_row..(r + 1) * per_row]
                    .chunks_exact(format.block_bytes())
                    .zip(row.chunks_exact_mut(sub))
                {
                    decode(format, fb, o);
                }
                row
            })
            .collect()
    }

    /// The paths this CPU can run.
    fn isas() -> Vec<&'static str> {
        let mut v = vec!["dispatch", "scalar"];
        if crate::has_avx2() {
            v.push("avx2");
        }
        if crate::has_avx512_vnni() {
            v.push("avx512");
        }
        if crate::amx::available() {
            v.push("amx");
        }
        if crate::has_dotprod() {
            v.push("dotprod");
        }
        v
    }

    const ARITHMETICS: [Arithmetic; 2] = [Arithmetic::Lanes, Arithmetic::Blocks];

    fn run(isa: &str, p: &Packed, g: usize, a: &[&[Act]], out: &mut [[f32; ROWS]]) {
        let grp = p.group(g);
        let lanes = p.format.uses_lanes(p.arithmetic);
        match isa {
            "dispatch" => p.group_dot(g, a, out, true),
            "scalar" => unsafe { scalar::group_dot(p.format, lanes, grp, p.nb, a, out) },
            #[cfg(target_arch = "aarch64")]
            "dotprod" => unsafe { scalar::group_dot_dotprod(p.format, lanes, grp, p.nb, a, out) },
            #[cfg(target_arch = "x86_64")]
            "avx2" => unsafe { x86::dispatch_avx2(p.format, lanes, grp, p.nb, a, out) },
            #[cfg(target_arch = "x86_64")]
            "avx512" => unsafe { x86::dispatch_512(p.format, lanes, false, grp, p.nb, a, out) },
            #[cfg(target_arch = "x86_64")]
            "amx" => unsafe { x86::dispatch_512(p.format, lanes, true, grp, p.nb, a, out) },
            other => unreachable!("{other}"),
        }
    }

    #[test]
    fn every_path_equals_the_reference_bit_for_bit() {
        let mut next = rng(11);
        for format in FORMATS {
            let be = format.block_elems();
            // Row counts around the group size; one to three file blocks per row (for the
            // AMX path's chunks of two blocks: half a chunk, one, one and a half), and nine
            // (four chunks and a remainder).
            for (n, fblocks) in [(1, 1), (15, 2), (16, 1), (17, 3), (40, 2), (16, 9)] {
                let k = fblocks * be;
                let bytes = random_blocks(format, n * fblocks, &mut next);
                let mut p = Packed::from_gguf(format, &bytes, n, k);
                let rows = decoded_rows(format, &bytes, n, k);
                let x = random_acts(40, k, &mut next);
                let acts: Vec<Vec<Act>> = x
                    .chunks_exact(k)
                    .map(|row| {
                        let mut a = vec![Act::default(); k / QK];
                        quantize_acts(row, format.bias(), &mut a);
                        a
                    })
                    .collect();
                for (r, row) in rows.iter().enumerate() {
                    for (b, blk) in row.iter().enumerate() {
                        assert_eq!(p.decoded(r, b), *blk, "{format:?} unpack r {r} b {b}");
                    }
                }
                // Contiguous activation rows, as the matmul holds them (the AMX path
                // needs even spacing), and rows scattered in memory.
                let contiguous: Vec<Act> = acts.concat();
                let nb = k / QK;
                for (arithmetic, isa) in ARITHMETICS
                    .into_iter()
                    .flat_map(|ar| isas().into_iter().map(move |i| (ar, i)))
                {
                    p.set_arithmetic(arithmetic);
                    for cols in [1, 2, 3, 4, 5, 7, 16, 17, 40] {
                        for spread in [false, true] {
                            let a: Vec<&[Act]> = if spread {
                                acts[..cols].iter().map(|v| &v[..]).collect()
                            } else {
                                contiguous.chunks_exact(nb).take(cols).collect()
                            };
                            for g in 0..p.groups() {
                                let mut out = [[f32::NAN; ROWS]; 40];
                                run(isa, &p, g, &a, &mut out);
                                for i in 0..ROWS.min(n - g * ROWS) {
                                    for c in 0..cols {
                                        let want =
                                            dot_ref(format, arithmetic, &rows[g * ROWS + i], a[c]);
                                        assert_eq!(
                                            out[c][i].to_bits(),
                                            want.to_bits(),
                                            "{format:?} {arithmetic:?} {isa} n {n} k {k} cols {cols} \
                                             spread {spread} row {} col {c}",
                                            g * ROWS + i
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Extreme values: all-zero and all-maximum bytes against ±127/-128 activations
    /// (the 8-bit sign trick's corner, and no saturation in the AVX2 products).
    #[test]
    fn extreme_values_agree() {
        for format in FORMATS {
            let k = format.block_elems();
            for fill in [0x00u8, 0xff, 0x80, 0x7f] {
                let mut bytes = random_blocks(format, 16, &mut rng(3));
                // Keep the scales random, saturate everything else.
                for blk in bytes.chunks_exact_mut(format.block_bytes()) {
                    let keep: std::ops::Range<usize> = match format {
                        Q4_0 | Q5_0 | Q8_0 => 0..2,
                        Q4_1 | Q5_1 | Q4K | Q5K => 0..4,
                        Q6K => 208..210,
                    };
                    for (j, v) in blk.iter_mut().enumerate() {
                        let scales = matches!(format, Q4K | Q5K) && (4..16).contains(&j)
                            || format == Q6K && (192..208).contains(&j);
                        if !keep.contains(&j) && !scales {
                            *v = fill;
                        }
                    }
                }
                let mut p = Packed::from_gguf(format, &bytes, 16, k);
                let rows = decoded_rows(format, &bytes, 16, k);
                for av in [127.0f32, -128.0 / 127.0 * 10.0, 10.0] {
                    let x = vec![av; k];
                    // Five equal rows, contiguous: one row takes the vector paths, five
                    // the AMX tiles where there are any.
                    let mut a = vec![Act::default(); 5 * k / QK];
                    for r in a.chunks_exact_mut(k / QK) {
                        quantize_acts(&x, format.bias(), r);
                    }
                    let a: Vec<&[Act]> = a.chunks_exact(k / QK).collect();
                    for arithmetic in ARITHMETICS {
                        p.set_arithmetic(arithmetic);
                        for isa in isas() {
                            for cols in [1, 5] {
                                let mut out = [[0f32; ROWS]; 5];
                                run(isa, &p, 0, &a[..cols], &mut out);
                                for (i, row) in rows.iter().enumerate() {
                                    assert_eq!(
                                        out[cols - 1][i].to_bits(),
                                        dot_ref(format, arithmetic, row, a[0]).to_bits(),
                                        "{format:?} {arithmetic:?} {isa} fill {fill:#x} act {av}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
