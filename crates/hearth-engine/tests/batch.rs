//! Batching must not change results: sequences of different lengths run together in one
//! forward pass give bit-identical logits to each run alone, through prefill and decode.

mod common;

use hearth_engine::sampler::argmax;
use hearth_engine::{BatchItem, BlockTable};

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
        let mut cache = model.model.cache_for_sequences(1).unwrap();
        let mut table = BlockTable::new();
        let mut logits = vec![model.prefill(&mut cache, &mut table, p).unwrap()];
        for _ in 0..steps {
            let next = argmax(logits.last().unwrap());
            let l = model.model.forward(&mut cache, &mut table, &[next]);
            logits.push(l.unwrap());
        }
        solo.push(logits);
    }

    // Together: one batched prefill of all prompts, then batched decode steps.
    // One shared block pool; a sequence's blocks are scattered among the others'.
    let mut cache = model.model.cache_for_sequences(prompts.len()).unwrap();
    let mut tables: Vec<_> = prompts.iter().map(|_| BlockTable::new()).collect();
    let mut items: Vec<BatchItem> = prompts
        .iter()
        .zip(tables.iter_mut())
        .map(|(p, table)| BatchItem { tokens: p, table })
        .collect();
    let mut batched: Vec<Vec<Vec<f32>>> = model
        .model
        .forward_batch(&mut cache, &mut items)
        .unwrap()
        .into_iter()
        .map(|l| vec![l])
        .collect();
    for _ in 0..steps {
        let next: Vec<u32> = batched.iter().map(|l| argmax(l.last().unwrap())).collect();
        let mut items: Vec<BatchItem> = next
            .iter()
            .zip(tables.iter_mut())
            .map(|(t, table)| BatchItem {
                tokens: std::slice::from_ref(t),
                table,
            })
            .collect();
        let out = model.model.forward_batch(&mut cache, &mut items).unwrap();
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
