//! Intel AMX, the little of it the block-sum matmul uses: permission from the OS, tile
//! configuration, an int8 tile product and a tile store, as inline assembly (Rust has no
//! stable AMX intrinsics). A tile product `C += A · B` of 16 rows × 32 int8 values by
//! 32 × 16 takes a few nanoseconds on the tile unit, leaving the vector units only the
//! scaling of each block's exact integer sums.

/// Whether AMX int8 tiles are usable: the CPU has them, the OS lets this process use them
/// (Linux asks for that once per process), and `HEARTH_NO_AMX` does not turn them off.
#[inline]
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static AMX: OnceLock<bool> = OnceLock::new();
        *AMX.get_or_init(|| {
            if !crate::has_avx512_vnni() || crate::switched_off("HEARTH_NO_AMX") {
                return false;
            }
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let (tile, int8) = (edx >> 24 & 1 == 1, edx >> 25 & 1 == 1);
            // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first tile
            // instruction kills the process; with it, the kernel saves the tile state.
            // SAFETY: a plain system call with integer arguments.
            tile && int8 && unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) } == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// A tile configuration (palette 1): rows and bytes per row of each tile register.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
pub struct Config([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl Config {
    pub fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        Self(c)
    }

    /// Tile `t` holds `rows` rows of `bytes` bytes (at most 16 × 64).
    pub fn tile(mut self, t: usize, rows: usize, bytes: usize) -> Self {
        assert!(
            t < 8 && rows <= 16 && bytes <= 64,
            "tile {t}: {rows} × {bytes}"
        );
        self.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
        self.0[48 + t] = rows as u8;
        self
    }

    /// Makes this the thread's tile configuration (zeroing every tile).
    ///
    /// # Safety
    /// [`available`] must have returned true; call [`release`] when done.
    #[inline(always)]
    pub unsafe fn load(&self) {
        std::arch::asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly));
    }
}

#[cfg(target_arch = "x86_64")]
impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_arch = "x86_64")]
std::thread_local! {
    /// The key of the configuration this thread's tiles hold (0: none).
    static LOADED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes `make(Config::new())` this thread's tile configuration, unless the one loaded
/// last under the same nonzero `key` still is (a configuration load costs ~60 ns, a
/// tenth of a small matmul's group). [`release`] ends it.
///
/// # Safety
/// [`available`] must have returned true.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn configure(key: usize, make: impl FnOnce(Config) -> Config) {
    if LOADED.get() != key {
        make(Config::new()).load();
        LOADED.set(key);
    }
}

/// Returns this thread's tile registers to their unused state (so that context switches
/// do not save them), if a configuration is loaded.
pub fn release() {
    #[cfg(target_arch = "x86_64")]
    if LOADED.get() != 0 {
        LOADED.set(0);
        // SAFETY: a configuration was loaded, so the CPU has AMX and the OS allows it.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Tile `C` = the int32 products of tile `A`'s signed bytes, loaded from `a` (rows
/// `stride` bytes apart), and tile `B`'s signed bytes, loaded from `b` (rows 64 bytes
/// apart: four consecutive K values of each of 16 columns per row), summed over K
/// exactly. The configured shapes give the sizes.
///
/// # Safety
/// A loaded configuration gives tiles `A`, `B` and `C` shapes that fit the memory at
/// `a` and `b`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn product<const C: u8, const A: u8, const B: u8>(
    a: *const u8,
    stride: usize,
    b: *const u8,
) {
    std::arch::asm!(
        "tileloadd tmm{ta}, [{a} + {stride}*1]",
        "tileloadd tmm{tb}, [{b} + {line}*1]",
        "tilezero tmm{tc}",
        "tdpbssd tmm{tc}, tmm{ta}, tmm{tb}",
        ta = const A,
        tb = const B,
        tc = const C,
        a = in(reg) a,
        stride = in(reg) stride,
        b = in(reg) b,
        line = in(reg) 64usize,
        options(nostack, readonly, preserves_flags),
    );
}

/// Stores tile `C` at `out`, rows 64 bytes apart.
///
/// # Safety
/// A loaded configuration gives tile `C` a shape that fits the memory at `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store<const C: u8>(out: *mut u8) {
    std::arch::asm!(
        "tilestored [{out} + {line}*1], tmm{tc}",
        tc = const C,
        out = in(reg) out,
        line = in(reg) 64usize,
        options(nostack, preserves_flags),
    );
}
