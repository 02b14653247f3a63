//! Batching must not change results: sequences of different lengths run together in one
//! forward pass give bit-identical logits to each run alone, through prefill and decode.

mod common;

use hearth_engine::sampler::argmax;
use hearth_engine::{Arithmetic, BatchItem, BlockTable, LoadOptions};

#[test]
fn batched_logits_equal_solo_logits() {
    batched_equals_solo(Arithmetic::Lanes);
}

/// The block-sum arithmetic too: its matmul takes AMX tiles for 8 or more rows and the
/// vector units below that, so a batch and a sequence alone go different ways to the
/// same bits.
#[test]
fn batched_logits_equal_solo_logits_with_block_sums() {
    batched_equals_solo(Arithmetic::Blocks);
}

fn batched_equals_solo(arithmetic: Arithmetic) {
    let model = common::default_model_with(LoadOptions {
        arithmetic,
        ..LoadOptions::default()
    });
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

/// The candle-tensor path (what CUDA and Metal run) on the CPU: it agrees with the kernel
/// path on the next token, and where a sequence's blocks lie changes no bit of it.
#[test]
fn tensor_path_agrees_and_paging_is_transparent() {
    let mut model = common::default_model();
    model.model.use_tensor_path();
    let tok = &model.info.tokenizer;
    let prompt = tok.encode("The capital of France is", true).unwrap();

    let run = |cache: &mut hearth_engine::KvCache, table: &mut BlockTable| {
        let mut logits = vec![model.prefill(cache, table, &prompt).unwrap()];
        for _ in 0..20 {
            let next = argmax(logits.last().unwrap());
            logits.push(model.model.forward(cache, table, &[next]).unwrap());
        }
        logits
    };
    // Alone in a fresh pool: consecutive blocks.
    let mut cache = model.model.new_cache(64).unwrap();
    let mut table = BlockTable::new();
    let plain = run(&mut cache, &mut table);
    // In a pool whose free blocks are interleaved with another sequence's.
    let mut cache = model.model.new_cache(64).unwrap();
    let (mut other, mut table) = (BlockTable::new(), BlockTable::new());
    for n in 1..=4 {
        assert!(cache.allocate(&mut other, n * hearth_engine::BLOCK_SIZE));
        assert!(cache.allocate(&mut table, n * hearth_engine::BLOCK_SIZE));
    }
    let scattered = run(&mut cache, &mut table);
    assert!(table.blocks().windows(2).any(|w| w[1] != w[0] + 1));
    for (step, (a, b)) in plain.iter().zip(&scattered).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "step {step}: block placement changed the logits"
        );
    }

    // Against the kernel path: same first token, logits close.
    let host = common::default_model();
    let mut cache = host.model.cache_for_sequences(1).unwrap();
    let mut table = BlockTable::new();
    let want = host.prefill(&mut cache, &mut table, &prompt).unwrap();
    assert_eq!(argmax(&want), argmax(&plain[0]));
    let dot: f64 = want
        .iter()
        .zip(&plain[0])
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (norm(&want) * norm(&plain[0]));
    assert!(cosine > 0.999, "cosine similarity {cosine}");
}
