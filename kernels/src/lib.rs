//! `hearth-kernels` owns the hot CPU loops: GGUF weight formats (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q4_K, Q5_K, Q6_K) decoded and repacked for SIMD, quantization of activations,
//! the quantized matmul, rope, attention over an f16 KV cache, and the elementwise math
//! (expf, SiLU, RMS norm).
//!
//! Parallel loops run on [`team`], a pool that spins between the short loops of a step
//! and parks when the work stops. Packed weights live on huge pages where Linux gives
//! them (`pages`).
//!
//! Pure functions over slices. Every SIMD path (AVX-512 VNNI, AVX2, picked at run time)
//! has a scalar twin that computes the *same* floating-point operations in the same order
//! (accumulator lanes, fused multiply-adds, horizontal sums), so they agree bit for bit
//! and tests demand equality. For the 32-element formats the arithmetic reproduces
//! llama.cpp's x86 CPU backend by default, so logits equal llama.cpp's to the bit;
//! [`Arithmetic::Blocks`] trades that for one exact integer sum per block, on Intel AMX
//! tiles ([`amx`]) for batches. Nothing here allocates per dot product or knows about
//! models.
//!
//! `HEARTH_NO_SIMD=1` forces the scalar paths (to test them on a SIMD machine). They are
//! what other architectures run, so the matmul's is written as loops over a group's 16
//! rows that the compiler vectorises for the target's baseline (NEON on aarch64;
//! `scripts/test-aarch64` runs these tests there under qemu).

/// Defines a public function whose body is compiled twice: once for the baseline target
/// and once with AVX2, FMA and F16C enabled, picked at run time. Both compile the same
/// operations in the same order (no fast-math), so they give identical bits; the fast one
/// just gets vector instructions and hardware `fma`/`f16` conversions instead of calls.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if $crate::has_avx2() {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

pub mod amx;
pub mod attention;
pub mod formats;
pub mod math;
pub mod matmul;
pub mod packed;
mod pages;
pub mod quantize;
pub mod rope;
pub mod team;

pub use formats::QK;
pub use matmul::{Arithmetic, Input, Output, QFormat, QMatrix, QMatrixError};

/// Runs `f` with this thread's buffer `key`, kept from call to call, or with a fresh one
/// when it is in use further up this thread's stack (a re-entrant call).
pub(crate) fn with_reused<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut T::default()),
    })
}

/// Raw output pointer shared by parallel tasks that write disjoint elements (each user
/// says which elements are whose).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: a plain address; its users' tasks write disjoint elements through it: the
// matmul's, the columns of their own groups of weight rows; prompt attention's, their
// own query rows of their own head.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Asks for `lines` 64-byte cache lines from `p` (prefetch `HINT`). A prefetch never
/// faults, so `p` may point anywhere, even past the end of an allocation.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_lines<const HINT: i32>(p: *const u8, lines: usize) {
    for l in 0..lines {
        // SAFETY: SSE is baseline on x86-64; a prefetch reads nothing the program sees.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(64 * l) as *const i8) };
    }
}

/// Whether the switch `HEARTH_NO_<name>` (set, non-empty, not `0`) turns a path off.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) fn switched_off(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether the AVX2+FMA+F16C paths are usable on this CPU (checked once at run time, so one
/// portable binary runs everywhere).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            !switched_off("HEARTH_NO_SIMD")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the ARMv8.2 `dotprod` matmul path is usable (`HEARTH_NO_SIMD=1` turns it off,
/// as it does the x86 paths).
#[inline]
pub fn has_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        use std::sync::OnceLock;
        static DOTPROD: OnceLock<bool> = OnceLock::new();
        *DOTPROD.get_or_init(|| {
            !switched_off("HEARTH_NO_SIMD") && std::arch::is_aarch64_feature_detected!("dotprod")
        })
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// Whether the AVX-512 VNNI kernels are usable (`HEARTH_NO_AVX512=1` turns them off, to
/// test the AVX2 paths on such a machine).
#[inline]
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            has_avx2()
                && !switched_off("HEARTH_NO_AVX512")
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
