//! `hearth-kernels` owns the hot CPU loops: GGML block formats, quantization of
//! activations, quantized dot products and the quantized matmul.
//!
//! Pure functions over slices. Every SIMD path has a scalar reference that computes the
//! *same* floating-point operations in the same order (8 accumulator lanes, fused
//! multiply-adds, the same horizontal sum), so the two agree bit for bit and tests can
//! demand equality. The arithmetic follows ggml's x86 kernels, which keeps our logits
//! within float rounding of llama.cpp's. Nothing here allocates per dot product or
//! knows about models.

pub mod attention;
pub mod blocks;
pub mod dot;
pub mod math;
pub mod matmul;
pub mod quantize;
pub mod rope;

pub use blocks::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
pub use matmul::{QMatrix, QMatrixError};

/// Whether the AVX2+FMA paths are usable on this CPU (checked once at run time, so one
/// portable binary runs everywhere).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
