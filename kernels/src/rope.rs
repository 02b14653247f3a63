//! Rotary position embeddings, computed the way ggml does it so results match llama.cpp
//! to the bit: per position, the angle of pair i is `pos * base^(-2i/n_dims)` built by
//! repeated f32 multiplication, with f32 `cos`/`sin`.
//!
//! Attention in small models can be very sensitive to the last bits of Q and K (they are
//! rounded to f16 next); computing the same angle a different way moves logits by
//! tenths. Hence the care.

/// `(cos, sin)` for each rotated pair of each position: `out[t * n_dims/2 + i]`.
/// `freq_scale` < 1 stretches positions (linear scaling); `freq_factors` divides the
/// angle of each pair (Llama 3.1 style).
pub fn rope_cache(
    positions: &[usize],
    n_dims: usize,
    freq_base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
) -> Vec<(f32, f32)> {
    let half = n_dims / 2;
    let theta_scale = freq_base.powf(-2.0 / n_dims as f32);
    let mut out = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        let mut theta = p as f32;
        for i in 0..half {
            let ff = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            let t = freq_scale * (theta / ff);
            out.push((t.cos(), t.sin()));
            theta *= theta_scale;
        }
    }
    out
}

multiversion! {
/// Rotates adjacent pairs (`x[2i]`, `x[2i+1]`) of the first `n_dims` elements of every head
/// ("normal" rope, as GGUF Llama weights expect). `x` holds `cache.len() / (n_dims/2)`
/// rows of `n_heads * head_dim`.
pub fn rope_interleaved(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    n_dims: usize,
    cache: &[(f32, f32)],
) {
    let half = n_dims / 2;
    let row = n_heads * head_dim;
    for (t, xrow) in x.chunks_exact_mut(row).enumerate() {
        let cs = &cache[t * half..(t + 1) * half];
        for head in xrow.chunks_exact_mut(head_dim) {
            for (pair, &(c, s)) in head[..n_dims].chunks_exact_mut(2).zip(cs) {
                let (x0, x1) = (pair[0], pair[1]);
                // ggml's `x0*c - x1*s` and `x0*s + x1*c`, as GCC contracts them into
                // fused multiply-adds on x86 with FMA.
                pair[0] = x0.mul_add(c, -(x1 * s));
                pair[1] = x0.mul_add(s, x1 * c);
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_rotation_keeps_norms() {
        let cache = rope_cache(&[0, 5], 4, 10_000.0, 1.0, None);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 9.0, 1.0, 2.0, 3.0, 4.0, 9.0];
        rope_interleaved(&mut x, 1, 5, 4, &cache);
        assert_eq!(&x[..5], &[1.0, 2.0, 3.0, 4.0, 9.0]);
        let n0 = (1f32 * 1.0 + 4.0).sqrt();
        let n1 = (x[5] * x[5] + x[6] * x[6]).sqrt();
        assert!((n0 - n1).abs() < 1e-5);
        assert_eq!(x[9], 9.0, "dimensions past n_dims are not rotated");
        // Pair 0 turns by exactly 5 radians.
        assert!((x[5] - (5f32.cos() - 2.0 * 5f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn relative_position_is_what_matters() {
        // <R(p)q, R(p+d)k> is the same for every p.
        let dot_at = |p: usize| {
            let cache = rope_cache(&[p, p + 3], 8, 10_000.0, 1.0, None);
            let mut q = vec![0.3, -1.2, 0.7, 0.1, 2.0, -0.4, 0.9, 1.1];
            let mut k = vec![1.0, 0.5, -0.3, 0.8, -1.5, 0.2, 0.6, -0.7];
            rope_interleaved(&mut q, 1, 8, 8, &cache[..4]);
            rope_interleaved(&mut k, 1, 8, 8, &cache[4..]);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(0) - dot_at(100)).abs() < 1e-3);
    }
}
