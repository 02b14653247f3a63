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

multiversion! {
    /// Activation blocks for the packed matmul (see [`Act`]); `x.len()` must equal
    /// `out.len() * 32`.
    pub fn quantize_acts_into(x: &[f32], bias: i32, out: &mut [Act]) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
