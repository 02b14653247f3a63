//! Criterion benchmarks of the CPU kernels on the default model's shapes:
//! `cargo bench --bench kernels` (threads: `RAYON_NUM_THREADS`, default all cores).
//! Each measurement runs on a rayon pool worker, as the engine calls the kernels, so a
//! parallel loop finds its helpers awake instead of waking them from outside.
//! Compare runs on the same machine, not across days: these machines are shared.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hearth_kernels::attention::{attend, AttentionShape, KvCells, KvView};
use hearth_kernels::blocks::BlockQ8_1;
use hearth_kernels::matmul::{QFormat, QMatrix};
use hearth_kernels::quantize::quantize_row_q8_1;

/// Runs `f` on a worker of rayon's global pool.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// A Q4_1 matrix of plausible blocks (scales ~0.01, mins ~-0.05).
fn q4_1(n: usize, k: usize) -> QMatrix {
    let mut bytes = Vec::with_capacity(n * k / 32 * 20);
    for r in 0..n {
        for b in 0..k / 32 {
            let d = half::f16::from_f32(0.005 + 0.001 * ((r + b) % 7) as f32);
            let m = half::f16::from_f32(-0.04 - 0.002 * (r % 5) as f32);
            bytes.extend(d.to_bits().to_le_bytes());
            bytes.extend(m.to_bits().to_le_bytes());
            bytes.extend((0..16).map(|j| ((r * 31 + b * 7 + j * 13) % 256) as u8));
        }
    }
    QMatrix::from_bytes(QFormat::Q4_1, &bytes, n, k).expect("well-formed blocks")
}

fn matmul(c: &mut Criterion) {
    // The FFN up/gate shape and the attention output shape of SmolLM2-135M.
    for (n, k) in [(1536usize, 576usize), (576, 576)] {
        let w = q4_1(n, k);
        let mut g = c.benchmark_group(format!("matmul_q4_1_{n}x{k}"));
        for m in [1usize, 4, 16, 64] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_with_input(BenchmarkId::new("rows", m), &m, |b, _| {
                on_pool(|| b.iter(|| w.matmul(&x, &mut out)))
            });
        }
        g.finish();
    }
}

fn quantize(c: &mut Criterion) {
    let x: Vec<f32> = (0..1536).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut q = vec![BlockQ8_1::default(); 1536 / 32];
    let mut g = c.benchmark_group("quantize_row_q8_1");
    g.throughput(Throughput::Elements(1536));
    g.bench_function("1536", |b| b.iter(|| quantize_row_q8_1(&x, &mut q)));
    g.finish();
}

fn attention(c: &mut Criterion) {
    // One decode step of one sequence: 9 query heads over 3 KV heads of 64, paged in
    // 16-token blocks, at several context lengths.
    let s = AttentionShape {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        window: None,
    };
    let width = s.kv_heads * s.head_dim;
    let bs = 16;
    let mut g = c.benchmark_group("attention_decode");
    for pos in [128usize, 1024, 4096] {
        let blocks_n = (pos + 1).div_ceil(bs);
        // Blocks in reverse order, as a shared pool would hand them out.
        let blocks: Vec<u32> = (0..blocks_n as u32).rev().collect();
        let k: Vec<half::f16> = (0..blocks_n * bs * width)
            .map(|i| half::f16::from_f32(((i * 7 % 97) as f32 - 48.0) / 64.0))
            .collect();
        let v = k.clone();
        let q: Vec<f32> = (0..s.heads * s.head_dim)
            .map(|i| (i as f32).sin())
            .collect();
        let mut out = vec![0f32; q.len()];
        let kv = KvView {
            k: KvCells::F16(&k),
            v: KvCells::F16(&v),
            blocks: &blocks,
            block_size: bs,
        };
        g.throughput(Throughput::Elements((pos + 1) as u64));
        g.bench_with_input(BenchmarkId::new("context", pos + 1), &pos, |b, &pos| {
            on_pool(|| b.iter(|| attend(&q, 1, pos, kv, s, 0.125, &mut out)))
        });
    }
    g.finish();
}

criterion_group!(benches, matmul, quantize, attention);
criterion_main!(benches);
