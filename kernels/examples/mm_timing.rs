//! Times the quantized matmul on the default model's shapes, for 1, 2, 4 and 16
//! activation rows, and prints weight bytes streamed per second: `RAYON_NUM_THREADS=1
//! cargo run --release -p hearth-kernels --example mm_timing`; `HEARTH_ARITHMETIC=blocks`
//! for the block-sum arithmetic; `HEARTH_MM_COPIES=40` cycles through that many copies
//! of each matrix, so that the weights stream from L3 or memory as a whole model's do
//! rather than sit in L2. A quick look while working
//! on a kernel; `cargo bench --bench kernels` is the measurement.
use hearth_kernels::matmul::{Arithmetic, QFormat, QMatrix};

fn main() {
    // On a pool worker, as the engine calls it: a parallel loop started from outside the
    // pool would time thread wake-ups.
    rayon::scope(|_| run());
}

fn run() {
    let shapes = [
        ("qkv", QFormat::Q4_1, 960usize, 576usize),
        ("gate_up", QFormat::Q4_1, 3072, 576),
        ("down", QFormat::Q4_1, 576, 1536),
        ("output", QFormat::Q8_0, 49152, 576),
        ("q4_k", QFormat::Q4K, 3072, 768),
        ("q6_k", QFormat::Q6K, 3072, 768),
    ];
    // `HEARTH_MM_GMAC=20`: multiply-adds per timing, in billions (default 2).
    let work: f64 = std::env::var("HEARTH_MM_GMAC")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2.0);
    // `HEARTH_MM_ROWS=1,16` times only those row counts.
    let rows: Vec<usize> = std::env::var("HEARTH_MM_ROWS")
        .ok()
        .map(|r| r.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 64]);
    // `HEARTH_MM_SHAPES=qkv,down` times only those matrices.
    let only = std::env::var("HEARTH_MM_SHAPES").ok();
    let shapes = shapes.into_iter().filter(|s| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|n| n.trim() == s.0))
    });
    for (name, format, n, k) in shapes {
        let per_row = k / format.block_elems() * format.block_bytes();
        let bytes: Vec<u8> = (0..n * per_row)
            .map(|i| {
                // Scales (every block's first bytes) small and finite; the rest anything.
                let at = i % format.block_bytes();
                if at < 4 || (format == QFormat::Q6K && at >= 208) {
                    0x10
                } else {
                    (i * 7 % 251) as u8
                }
            })
            .collect();
        let arithmetic = match std::env::var("HEARTH_ARITHMETIC").as_deref() {
            Ok("blocks") => Arithmetic::Blocks,
            _ => Arithmetic::Lanes,
        };
        let copies: usize = std::env::var("HEARTH_MM_COPIES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
            .max(1);
        let ws: Vec<QMatrix> = (0..copies)
            .map(|_| {
                let mut w = QMatrix::from_bytes(format, &bytes, n, k).unwrap();
                w.set_arithmetic(arithmetic);
                w
            })
            .collect();
        for &m in &rows {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32).sin()).collect();
            let mut out = vec![0f32; m * n];
            let reps = (work * 1e9 / (n * k * m) as f64) as usize + 5;
            let t = std::time::Instant::now();
            for r in 0..reps {
                ws[r % copies].matmul(&x, &mut out);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name:8} {format:?} {n}x{k} m={m:2}: {:7.1} us  {:5.1} GB/s  {:6.1} GMAC/s",
                dt * 1e6,
                bytes.len() as f64 / dt / 1e9,
                (m * n * k) as f64 / dt / 1e9,
            );
        }
    }
}
