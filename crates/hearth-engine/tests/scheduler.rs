//! The scheduler on the real model: sixteen concurrent requests of different lengths give
//! each the same tokens as running it alone; a client that goes away does not disturb the
//! others; a full queue refuses instead of growing.

mod common;

use common::{collect, pool};

use std::sync::Arc;

use std::sync::atomic::Ordering::Relaxed;

use hearth_engine::scheduler::{spawn, Event, Request, SchedulerConfig, SubmitError};
use hearth_engine::{FinishReason, LoadedModel, SamplingParams};

fn model() -> Arc<LoadedModel> {
    Arc::new(common::default_model())
}

fn solo_tokens(model: &LoadedModel, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut out = Vec::new();
    model
        .generate(prompt, SamplingParams::default(), max_tokens, |t| {
            out.push(t);
            true
        })
        .unwrap();
    out
}

/// Waits up to two seconds for `f` to hold.
fn eventually(f: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

#[test]
fn concurrent_requests_get_their_solo_tokens() {
    let model = model();
    let tok = &model.info.tokenizer;
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let text = format!(
                "Request {i}: {}",
                "tell me about hearths and fire. ".repeat(i % 5 + 1)
            );
            tok.encode(&text, true).unwrap()
        })
        .collect();
    let greedy = SamplingParams::default();
    let max_tokens = 20;

    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| solo_tokens(&model, p, max_tokens))
        .collect();

    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool()).unwrap();
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            handle
                .submit(Request {
                    owner: "test".into(),
                    prompt: p.clone(),
                    params: greedy.clone(),
                    max_tokens,
                    logprobs: None,
                    ignore_eos: false,
                    constraint: None,
                })
                .unwrap()
        })
        .collect();
    for (i, (rx, want)) in receivers.into_iter().zip(&solo).enumerate() {
        let (got, end) = collect(rx);
        assert_eq!(&got, want, "request {i}: batched tokens differ from solo");
        match end {
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                assert_eq!(prompt_tokens, prompts[i].len());
                assert_eq!(completion_tokens, got.len());
                let expected = if got.len() == max_tokens {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                assert_eq!(reason, expected);
            }
            other => panic!("request {i}: {other:?}"),
        }
    }
}

#[test]
fn cancellation_and_backpressure() {
    let model = model();
    let prompt = model
        .info
        .tokenizer
        .encode("Once upon a time", true)
        .unwrap();
    let config = SchedulerConfig {
        max_running: 1,
        max_queue: 1,
        ..Default::default()
    };
    let (handle, _thread) = spawn(model.clone(), config, pool()).unwrap();
    let stats = handle.stats().clone();
    let req = |n| Request {
        owner: "test".into(),
        prompt: prompt.clone(),
        params: SamplingParams::default(),
        max_tokens: n,
        logprobs: None,
        ignore_eos: false,
        constraint: None,
    };

    // A long request occupies the only running slot; the queue holds one more; the next
    // is refused.
    let mut long = handle.submit(req(200)).unwrap();
    assert!(
        matches!(long.blocking_recv().unwrap(), Event::Token { .. }),
        "the first request is running"
    );
    let queued = handle.submit(req(3)).unwrap();
    assert_eq!(
        handle.submit(req(3)).unwrap_err(),
        SubmitError::QueueFull(1)
    );

    // The long request's client goes away: its slot frees and the queued one completes.
    drop(long);
    let (tokens, end) = collect(queued);
    assert_eq!(tokens.len(), 3);
    assert!(matches!(
        end,
        Event::Finished {
            reason: FinishReason::Length,
            ..
        }
    ));
    // Every block is back in the pool once nothing runs.
    assert!(
        eventually(|| stats.kv_blocks_used.load(Relaxed) == 0),
        "blocks still held: {}",
        stats.kv_blocks_used.load(Relaxed)
    );
    assert_eq!(stats.running.load(Relaxed), 0);

    // Bad requests are refused up front.
    let empty = Request {
        owner: "test".into(),
        prompt: vec![],
        params: SamplingParams::default(),
        max_tokens: 1,
        logprobs: None,
        ignore_eos: false,
        constraint: None,
    };
    assert!(matches!(handle.submit(empty), Err(SubmitError::Invalid(_))));
}

#[test]
fn a_small_pool_preempts_instead_of_failing() {
    let model = model();
    let tok = &model.info.tokenizer;
    // 12 blocks = 192 tokens; four requests of ~20 prompt + 60 new tokens need ~320.
    let config = SchedulerConfig {
        kv_blocks: Some(12),
        ..Default::default()
    };
    let (handle, _thread) = spawn(model.clone(), config, pool()).unwrap();
    let stats = handle.stats().clone();
    let max_tokens = 60;
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            tok.encode(&format!("Story {i}: once upon a time, a fox"), true)
                .unwrap()
        })
        .collect();
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            handle
                .submit(Request {
                    owner: "test".into(),
                    prompt: p.clone(),
                    params: SamplingParams::default(),
                    max_tokens,
                    logprobs: None,
                    ignore_eos: false,
                    constraint: None,
                })
                .unwrap()
        })
        .collect();
    let mut same_as_solo = 0;
    for (p, rx) in prompts.iter().zip(receivers) {
        let (got, end) = collect(rx);
        let Event::Finished {
            completion_tokens, ..
        } = end
        else {
            panic!("{end:?}");
        };
        assert_eq!(completion_tokens, got.len());
        let solo = solo_tokens(&model, p, max_tokens);
        assert_eq!(got.len(), solo.len(), "every request runs to its end");
        same_as_solo += usize::from(got == solo);
    }
    assert!(
        stats.preemptions.load(Relaxed) > 0,
        "the pool was too small not to preempt"
    );
    eprintln!(
        "{} preemptions; {same_as_solo}/4 outputs identical to solo",
        stats.preemptions.load(Relaxed)
    );
    assert!(eventually(|| stats.kv_blocks_used.load(Relaxed) == 0));

    // A prompt longer than the whole pool is refused up front, with the reason.
    let long = vec![prompts[0][1]; 200];
    let err = handle
        .submit(Request {
            owner: "test".into(),
            prompt: long,
            params: SamplingParams::default(),
            max_tokens: 1,
            logprobs: None,
            ignore_eos: false,
            constraint: None,
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("KV cache holds only 192 tokens"),
        "{err}"
    );
}

#[test]
fn logprobs_describe_the_sampled_token() {
    let model = model();
    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool()).unwrap();
    let prompt = model.info.tokenizer.encode("The sky is", true).unwrap();
    let mut rx = handle
        .submit(Request {
            owner: "test".into(),
            prompt: prompt.clone(),
            params: SamplingParams::default(),
            max_tokens: 5,
            logprobs: Some(3),
            ignore_eos: false,
            constraint: None,
        })
        .unwrap();
    let mut ids = Vec::new();
    while let Some(Event::Token { id, logprobs }) = rx.blocking_recv() {
        let lp = logprobs.expect("logprobs were asked for");
        assert_eq!(lp.top.len(), 3);
        assert_eq!(
            lp.top[0],
            (id, lp.logprob),
            "greedy takes the most likely token"
        );
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.logprob <= 0.0);
        ids.push(id);
    }
    assert_eq!(ids, solo_tokens(&model, &prompt, 5));
}
