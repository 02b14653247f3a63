//! The scheduler on the real model: sixteen concurrent requests of different lengths give
//! each the same tokens as running it alone; a client that goes away does not disturb the
//! others; a full queue refuses instead of growing.

mod common;

use std::sync::Arc;

use hearth_engine::scheduler::{spawn, Event, Request, SchedulerConfig, SubmitError};
use hearth_engine::{FinishReason, LoadedModel, SamplingParams};

fn model() -> Arc<LoadedModel> {
    Arc::new(common::default_model())
}

fn pool() -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    )
}

fn collect(rx: std::sync::mpsc::Receiver<Event>) -> (Vec<u32>, Event) {
    let mut tokens = Vec::new();
    for ev in rx {
        match ev {
            Event::Token(t) => tokens.push(t),
            end => return (tokens, end),
        }
    }
    panic!("the event stream ended without Finished or Failed");
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
        .map(|p| {
            let mut out = Vec::new();
            model
                .generate(p, greedy.clone(), max_tokens, |t| {
                    out.push(t);
                    true
                })
                .unwrap();
            out
        })
        .collect();

    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool());
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            handle
                .submit(Request {
                    prompt: p.clone(),
                    params: greedy.clone(),
                    max_tokens,
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
    let (handle, _thread) = spawn(model.clone(), config, pool());
    let req = |n| Request {
        prompt: prompt.clone(),
        params: SamplingParams::default(),
        max_tokens: n,
    };

    // A long request occupies the only running slot; the queue holds one more; the next
    // is refused.
    let long = handle.submit(req(200)).unwrap();
    assert!(
        matches!(long.recv().unwrap(), Event::Token(_)),
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

    // Bad requests are refused up front.
    let empty = Request {
        prompt: vec![],
        params: SamplingParams::default(),
        max_tokens: 1,
    };
    assert!(matches!(handle.submit(empty), Err(SubmitError::Invalid(_))));
}
