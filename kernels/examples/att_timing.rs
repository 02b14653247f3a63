//! Times batched decode attention on the default model's shapes (9 query heads over 3
//! KV heads of 64, f16 cache in 16-cell blocks): 16 sequences one token each, through
//! 30 layers' pools, as a decode step reads them. The sequences' blocks are scattered
//! over the pool as a shared pool hands them out, so the cache streams from L3 or memory
//! as in serving. `RAYON_NUM_THREADS=2 cargo run --release -p hearth-kernels --example
//! att_timing`; `HEARTH_ATT_CONTEXT=64,128,512` sets the context lengths,
//! `HEARTH_ATT_SEQS=16` the sequences, `HEARTH_ATT_HOT=1` has every sequence and layer
//! read the same blocks (in cache: the arithmetic alone). A quick look while working on
//! the kernel.
use half::f16;
use hearth_kernels::attention::{attend_batch, AttendCall, AttentionShape, KvCells, KvView};

fn main() {
    // On a pool worker, as the engine calls it.
    rayon::scope(|_| run());
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|r| r.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn run() {
    let s = AttentionShape {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        window: None,
    };
    let (layers, bs, width) = (30usize, 16usize, 3 * 64);
    let seqs = env_list("HEARTH_ATT_SEQS", &[16])[0];
    for context in env_list("HEARTH_ATT_CONTEXT", &[64, 128, 512]) {
        let per_seq = (context + 1).div_ceil(bs);
        // A pool with room to spare; each sequence's blocks drawn from all over it.
        let pool = seqs * per_seq * 2;
        let mut order: Vec<u32> = (0..pool as u32).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut tables: Vec<&[u32]> = order[..seqs * per_seq].chunks(per_seq).collect();
        let hot = std::env::var("HEARTH_ATT_HOT").is_ok();
        if hot {
            tables = vec![tables[0]; seqs];
        }
        let cells = pool * bs * width;
        let caches: Vec<(Vec<f16>, Vec<f16>)> = (0..layers)
            .map(|l| {
                let c: Vec<f16> = (0..cells)
                    .map(|i| f16::from_f32((((i + l) * 7 % 97) as f32 - 48.0) / 64.0))
                    .collect();
                (c.clone(), c)
            })
            .collect();
        let q: Vec<f32> = (0..seqs * s.heads * s.head_dim)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut out = vec![0f32; q.len()];
        let qw = s.heads * s.head_dim;
        let step = |out: &mut [f32]| {
            for l in 0..layers {
                let (k, v) = &caches[if hot { 0 } else { l }];
                let mut calls: Vec<AttendCall> = out
                    .chunks_mut(qw)
                    .zip(q.chunks(qw))
                    .zip(&tables)
                    .map(|((out, q), blocks)| AttendCall {
                        q,
                        seq: 1,
                        pos: context,
                        kv: KvView {
                            k: KvCells::F16(k),
                            v: KvCells::F16(v),
                            blocks,
                            block_size: bs,
                        },
                        out,
                    })
                    .collect();
                attend_batch(&mut calls, s, 0.125);
            }
        };
        step(&mut out);
        let reps = (2000 / context).max(3);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            step(&mut out);
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        let bytes = (seqs * (context + 1) * width * 2 * 2 * layers) as f64;
        println!(
            "{seqs} seqs, context {context:4}: {:7.1} us a step ({layers} layers)  {:5.1} GB/s of cache",
            dt * 1e6,
            bytes / dt / 1e9
        );
    }
}
