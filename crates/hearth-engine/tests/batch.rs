//! Batching must not change results: sequences of different lengths run together in one
//! forward pass give bit-identical logits to each run alone, through prefill and decode.

mod common;

use hearth_engine::sampler::argmax;
use hearth_engine::BatchItem;

#[test]
fn batched_logits_equal_solo_logits() {
    let model = common::default_model();
    let tok = &model.info.tokenizer;
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "Once",
        "List three colors and explain why the sky is blue, in detail, please.",
    ];
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect();
    let steps = 12;

    // Alone: prefill, then greedy decode.
    let mut solo = Vec::new();
    for p in &prompts {
        let mut cache = model.model.new_cache();
        let mut logits = vec![model.prefill(p, &mut cache).unwrap()];
        for _ in 0..steps {
            let next = argmax(logits.last().unwrap());
            logits.push(model.model.forward(&[next], &mut cache).unwrap());
        }
        solo.push(logits);
    }

    // Together: one batched prefill of all prompts, then batched decode steps.
    let mut caches: Vec<_> = prompts.iter().map(|_| model.model.new_cache()).collect();
    let mut items: Vec<BatchItem> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| BatchItem { tokens: p, cache })
        .collect();
    let mut batched: Vec<Vec<Vec<f32>>> = model
        .model
        .forward_batch(&mut items)
        .unwrap()
        .into_iter()
        .map(|l| vec![l])
        .collect();
    for _ in 0..steps {
        let next: Vec<u32> = batched.iter().map(|l| argmax(l.last().unwrap())).collect();
        let mut items: Vec<BatchItem> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| BatchItem {
                tokens: std::slice::from_ref(t),
                cache,
            })
            .collect();
        let out = model.model.forward_batch(&mut items).unwrap();
        for (seq, l) in batched.iter_mut().zip(out) {
            seq.push(l);
        }
    }
    for (i, (a, b)) in solo.iter().zip(&batched).enumerate() {
        for (step, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "sequence {i} step {step}: batched logits differ from solo"
            );
        }
    }
}
