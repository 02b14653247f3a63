//! Times 1536x576 Q4_1 matmuls (the FFN shape of the default model) against 1, 4, 16 and
//! 64 activation rows: `RAYON_NUM_THREADS=1 cargo run --release -p hearth-kernels --example
//! mm_timing`.
use hearth_kernels::matmul::{QFormat, QMatrix};
fn main() {
    let (n, k) = (1536usize, 576usize);
    let bytes: Vec<u8> = (0..n * (k / 32) * 20)
        .map(|i| (i * 7 % 251) as u8 & 0x3f)
        .collect();
    let w = QMatrix::from_bytes(QFormat::Q4_1, &bytes, n, k).unwrap();
    for m in [1usize, 4, 16, 64] {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32).sin()).collect();
        let mut out = vec![0f32; m * n];
        let reps = 4000 / m.max(1) + 50;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            w.matmul(&x, &mut out);
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "m={m:3}: {:.2} GMAC/s, {:.1} us per call",
            (m * n * k * reps) as f64 / dt / 1e9,
            dt / reps as f64 * 1e6,
        );
    }
}
