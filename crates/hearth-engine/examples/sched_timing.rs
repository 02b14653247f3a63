//! One request of 128 tokens through the scheduler (no HTTP), to compare with `hearth bench`
//! (tg128) and with a served stream: `cargo run --release -p hearth-engine --example
//! sched_timing -- MODEL.gguf`.
use std::sync::Arc;
use std::time::Instant;

use hearth_engine::scheduler::{spawn, Event, Request, SchedulerConfig};
use hearth_engine::{LoadedModel, SamplingParams};

fn main() {
    let path = std::env::args().nth(1).expect("a GGUF path");
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    );
    let model = Arc::new(
        pool.install(|| LoadedModel::load(&path, &candle_core::Device::Cpu))
            .unwrap(),
    );
    let prompt = model
        .info
        .tokenizer
        .encode("Tell me a long story about hearths.", true)
        .unwrap();
    let n = 128;
    let (handle, _t) = spawn(model.clone(), SchedulerConfig::default(), pool.clone()).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let mut rx = handle
            .submit(Request {
                owner: "bench".into(),
                prompt: prompt.clone(),
                params: SamplingParams::default(),
                max_tokens: n,
                logprobs: None,
                ignore_eos: true,
                constraint: None,
            })
            .unwrap();
        let mut count = 0;
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Token { .. } = ev {
                count += 1;
            }
        }
        println!(
            "scheduler: {:.1} t/s ({count} tokens)",
            count as f64 / t.elapsed().as_secs_f64()
        );
    }
}
