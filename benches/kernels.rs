//! Criterion benchmarks of the CPU kernels on the default model's shapes:
//! `cargo bench --bench kernels` (threads: `RAYON_NUM_THREADS`, default all cores).
//! Each measurement runs on a rayon pool worker, as the engine calls the kernels, so a
//! parallel loop finds its helpers awake instead of waking them from outside.
//! Compare runs on the same machine, not across days: these machines are shared.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hearth_kernels::attention::{attend, AttentionShape, KvCells, KvView};
use hearth_kernels::matmul::{QFormat, QMatrix};
use hearth_kernels::packed::{quantize_acts, Act};

/// Runs `f` on a worker of rayon's global pool.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// An n × k matrix of `format` with plausible blocks: bytes from a fixed pattern, each
/// block's f16 scale(s) small and finite.
fn matrix(format: QFormat, n: usize, k: usize) -> QMatrix {
    let per_row = k / format.block_elems() * format.block_bytes();
    let scale = half::f16::from_f32(0.004).to_bits().to_le_bytes();
    let mut bytes: Vec<u8> = (0..n * per_row).map(|i| (i * 31 % 251) as u8).collect();
    for blk in bytes.chunks_exact_mut(format.block_bytes()) {
        match format {
            // Q6_K keeps its f16 scale last.
            QFormat::Q6K => blk[208..210].copy_from_slice(&scale),
            QFormat::Q4_1 | QFormat::Q5_1 | QFormat::Q4K | QFormat::Q5K => {
                blk[0..2].copy_from_slice(&scale);
                blk[2..4].copy_from_slice(&scale);
            }
            _ => blk[0..2].copy_from_slice(&scale),
        }
    }
    QMatrix::from_bytes(format, &bytes, n, k).expect("well-formed blocks")
}

fn matmul(c: &mut Criterion) {
    // The default model's FFN up/gate shape (Q4_1) and output projection (Q8_0), and the
    // other formats on a 3072 x 768 matrix; 1 activation row (decode), 16 (a batched
    // step), 64 (a prompt chunk).
    let shapes = [
        (QFormat::Q4_1, 3072usize, 576usize),
        (QFormat::Q8_0, 49152, 576),
        (QFormat::Q4_0, 3072, 768),
        (QFormat::Q5_0, 3072, 768),
        (QFormat::Q5_1, 3072, 768),
        (QFormat::Q4K, 3072, 768),
        (QFormat::Q5K, 3072, 768),
        (QFormat::Q6K, 3072, 768),
    ];
    for (format, n, k) in shapes {
        let w = matrix(format, n, k);
        let mut g = c.benchmark_group(format!("matmul_{format:?}_{n}x{k}"));
        for m in [1usize, 16, 64] {
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
    let mut q = vec![Act::default(); 1536 / 32];
    let mut g = c.benchmark_group("quantize_acts");
    g.throughput(Throughput::Elements(1536));
    g.bench_function("1536", |b| b.iter(|| quantize_acts(&x, 0, &mut q)));
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
