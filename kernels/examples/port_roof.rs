//! The vector-unit roof of this core for the quantized matmul's inner loops: how many
//! 512-bit operations a second it retires in mixes of independent operations shaped like
//! the kernels' (eight accumulator chains each, registers only: no loads, no
//! dependencies beyond the chains). What the AVX-512 kernels cannot beat, per core:
//! `cargo run --release -p hearth-kernels --example port_roof` (x86-64 with AVX-512 VNNI;
//! best of `HEARTH_ROOF_RUNS=5` runs of each mix).
#[cfg(target_arch = "x86_64")]
mod roof {
    use std::arch::asm;
    use std::time::Instant;

    /// Repeats `$body` (a string of instructions on zmm0–zmm15, reading zmm28–zmm31)
    /// `$n` times and returns the seconds it took.
    macro_rules! timed {
        ($n:expr, $body:expr) => {{
            let n: u64 = $n;
            let t = Instant::now();
            asm!(
                "vpxord zmm28, zmm28, zmm28",
                "vpxord zmm29, zmm29, zmm29",
                "vpxord zmm30, zmm30, zmm30",
                "vpxord zmm31, zmm31, zmm31",
                "2:",
                $body,
                "dec {n}",
                "jnz 2b",
                n = inout(reg) n => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _,
                out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                options(nostack),
            );
            t.elapsed().as_secs_f64()
        }};
    }

    macro_rules! dp8 {
        () => {
            concat!(
                "vpdpbusd zmm0, zmm30, zmm31\n",
                "vpdpbusd zmm1, zmm30, zmm31\n",
                "vpdpbusd zmm2, zmm30, zmm31\n",
                "vpdpbusd zmm3, zmm30, zmm31\n",
                "vpdpbusd zmm4, zmm30, zmm31\n",
                "vpdpbusd zmm5, zmm30, zmm31\n",
                "vpdpbusd zmm6, zmm30, zmm31\n",
                "vpdpbusd zmm7, zmm30, zmm31\n",
            )
        };
    }
    macro_rules! fma8 {
        () => {
            concat!(
                "vfmadd231ps zmm8, zmm28, zmm29\n",
                "vfmadd231ps zmm9, zmm28, zmm29\n",
                "vfmadd231ps zmm10, zmm28, zmm29\n",
                "vfmadd231ps zmm11, zmm28, zmm29\n",
                "vfmadd231ps zmm12, zmm28, zmm29\n",
                "vfmadd231ps zmm13, zmm28, zmm29\n",
                "vfmadd231ps zmm14, zmm28, zmm29\n",
                "vfmadd231ps zmm15, zmm28, zmm29\n",
            )
        };
    }
    macro_rules! cvt8 {
        () => {
            concat!(
                "vcvtdq2ps zmm20, zmm30\n",
                "vcvtdq2ps zmm21, zmm31\n",
                "vcvtdq2ps zmm22, zmm30\n",
                "vcvtdq2ps zmm20, zmm31\n",
                "vcvtdq2ps zmm21, zmm30\n",
                "vcvtdq2ps zmm22, zmm31\n",
                "vcvtdq2ps zmm20, zmm30\n",
                "vcvtdq2ps zmm21, zmm31\n",
            )
        };
    }

    /// (name, operations per iteration, multiply-adds per iteration, seconds for `n`).
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn mixes(n: u64) -> Vec<(&'static str, f64, f64, f64)> {
        vec![
            ("8 vpdpbusd", 8.0, 0.0, timed!(n, dp8!())),
            ("8 vfmadd231ps", 8.0, 0.0, timed!(n, fma8!())),
            (
                "8 vpdpbusd + 8 vfmadd231ps",
                16.0,
                0.0,
                timed!(n, concat!(dp8!(), fma8!())),
            ),
            ("8 vcvtdq2ps", 8.0, 0.0, timed!(n, cvt8!())),
            // One activation row × 16 weight rows × one 32-value block, block sums:
            // 8 vpdpbusd, the halves' add, convert, d_w·d_a, FMA, the minimum's FMA.
            (
                "blocks: a block-row (13 ops)",
                13.0,
                512.0,
                timed!(
                    n,
                    concat!(
                        dp8!(),
                        "vpaddd zmm20, zmm30, zmm31\n",
                        "vcvtdq2ps zmm21, zmm30\n",
                        "vmulps zmm22, zmm28, zmm29\n",
                        "vfmadd231ps zmm8, zmm28, zmm29\n",
                        "vfmadd231ps zmm9, zmm28, zmm29\n",
                    )
                ),
            ),
            // The same in llama.cpp's lanes: each of the 8 sums converted and FMA'd on its
            // own, plus d_w·d_a and the minimum's FMA.
            (
                "lanes: a block-row (26 ops)",
                26.0,
                512.0,
                timed!(
                    n,
                    concat!(
                        dp8!(),
                        cvt8!(),
                        fma8!(),
                        "vmulps zmm22, zmm28, zmm29\n",
                        "vfmadd231ps zmm8, zmm28, zmm29\n",
                    )
                ),
            ),
        ]
    }

    pub fn run() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni"))
        {
            println!("this CPU has no AVX-512 VNNI: nothing to measure");
            return;
        }
        let runs: usize = std::env::var("HEARTH_ROOF_RUNS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(5)
            .max(1);
        let n = 50_000_000;
        // SAFETY: features detected above.
        let mut best = unsafe { mixes(n) };
        for _ in 1..runs {
            // SAFETY: as above.
            for (b, m) in best.iter_mut().zip(unsafe { mixes(n) }) {
                b.3 = b.3.min(m.3);
            }
        }
        for (name, ops, macs, secs) in best {
            let per_s = n as f64 / secs;
            print!(
                "{name:32} {:6.2} G iterations/s  {:6.2} G ops/s",
                per_s / 1e9,
                ops * per_s / 1e9
            );
            if macs > 0.0 {
                print!("  -> at most {:6.1} GMAC/s a core", macs * per_s / 1e9);
            }
            println!();
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    roof::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
