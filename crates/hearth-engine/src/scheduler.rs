//! Continuous batching: one thread owns the model and, every step, runs all running
//! sequences together in one forward pass — each sequence's next prompt chunk or its one
//! new token — samples one token per sequence that finished its prompt, and sends it to
//! that request's channel. Requests join and leave between steps; nobody waits for
//! another request to finish.
//!
//! Prompts are cut into the same 512-token chunks as a lone [`LoadedModel::prefill`], and
//! a chunk is never split across steps, so a request's tokens are the same whether it runs
//! alone or among others (see `tests/scheduler.rs`).
//!
//! The KV cache is per sequence and contiguous for now; a paged block pool with admission
//! by free blocks is the next step (issue 3).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::generate::{FinishReason, LoadedModel, PREFILL_CHUNK};
use crate::kv_cache::KvCache;
use crate::llama::BatchItem;
use crate::sampler::{Sampler, SamplingParams};

/// What a client asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
}

/// What the scheduler sends back, in order: tokens, then exactly one `Finished` or
/// `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(u32),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Sequences decoding at once.
    pub max_running: usize,
    /// Requests waiting to start; more are refused (backpressure).
    pub max_queue: usize,
    /// Prompt tokens processed per step, across all sequences (at least one chunk).
    pub prefill_budget: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_queue: 256,
            prefill_budget: PREFILL_CHUNK,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the scheduler has stopped")]
    Stopped,
    #[error("invalid request: {0}")]
    Invalid(String),
}

struct Submission {
    request: Request,
    events: Sender<Event>,
}

/// The client side: submit requests, get a stream of events for each.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: SyncSender<Submission>,
    max_queue: usize,
    context: usize,
}

impl SchedulerHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request at the next step.
    pub fn submit(&self, request: Request) -> Result<Receiver<Event>, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if request.prompt.len() >= self.context {
            return Err(SubmitError::Invalid(format!(
                "the prompt is {} tokens long but the model's context is {} tokens",
                request.prompt.len(),
                self.context
            )));
        }
        request.params.validate().map_err(SubmitError::Invalid)?;
        let (events, rx) = mpsc::channel();
        match self.tx.try_send(Submission { request, events }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull(self.max_queue)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already in the cache.
    done: usize,
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    events: Sender<Event>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The tokens this step feeds: the next prompt chunk, or the last sampled token.
    fn next_input(&self) -> std::ops::Range<usize> {
        if self.done < self.prompt_len {
            let chunk_start = self.done;
            chunk_start..(chunk_start + PREFILL_CHUNK).min(self.prompt_len)
        } else {
            self.done..self.tokens.len()
        }
    }

    fn finish(&self, reason: FinishReason) {
        let _ = self.events.send(Event::Finished {
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
        });
    }
}

/// Starts the scheduler thread; the model is shared, the compute runs on `pool`.
pub fn spawn(
    model: Arc<LoadedModel>,
    config: SchedulerConfig,
    pool: Arc<rayon::ThreadPool>,
) -> (SchedulerHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel(config.max_queue.max(1));
    let handle = SchedulerHandle {
        tx,
        max_queue: config.max_queue,
        context: model.context_length(),
    };
    let thread = std::thread::Builder::new()
        .name("hearth-scheduler".into())
        .spawn(move || pool.install(|| run(&model, &config, rx)))
        .expect("spawning the scheduler thread");
    (handle, thread)
}

fn run(model: &LoadedModel, config: &SchedulerConfig, rx: Receiver<Submission>) {
    // The channel is the waiting queue: requests are taken from it only when they can
    // start, so a full channel is real backpressure.
    let mut running: Vec<Sequence> = Vec::new();
    loop {
        while running.len() < config.max_running {
            let next = if running.is_empty() {
                // Nothing to do: wait, but wake now and then to notice shutdown.
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(s) => s,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(s) => s,
                    Err(_) => break,
                }
            };
            admit(model, next, &mut running);
        }
        step(model, config, &mut running);
    }
}

fn admit(model: &LoadedModel, s: Submission, running: &mut Vec<Sequence>) {
    let prompt_len = s.request.prompt.len();
    let max_tokens = s
        .request
        .max_tokens
        .min(model.context_length() - prompt_len);
    let seq = Sequence {
        tokens: s.request.prompt,
        prompt_len,
        done: 0,
        cache: model.model.new_cache(),
        sampler: Sampler::new(s.request.params),
        max_tokens,
        events: s.events,
    };
    if max_tokens == 0 {
        seq.finish(FinishReason::Length);
        return;
    }
    running.push(seq);
}

/// One forward pass over the sequences that fit this step, then sampling.
fn step(model: &LoadedModel, config: &SchedulerConfig, running: &mut Vec<Sequence>) {
    if running.is_empty() {
        return;
    }
    // Decodes always run; whole prompt chunks run while the prefill budget lasts (the
    // first one always, so a long prompt cannot starve).
    let mut budget = config.prefill_budget;
    let mut chosen = Vec::new();
    for (i, s) in running.iter().enumerate() {
        let input = s.next_input();
        if s.done < s.prompt_len {
            if input.len() > budget && budget < config.prefill_budget {
                continue;
            }
            budget = budget.saturating_sub(input.len());
        }
        chosen.push((i, input));
    }
    let inputs: Vec<Vec<u32>> = chosen
        .iter()
        .map(|(i, r)| running[*i].tokens[r.clone()].to_vec())
        .collect();
    let result = {
        let mut caches: Vec<Option<&mut KvCache>> =
            running.iter_mut().map(|s| Some(&mut s.cache)).collect();
        let mut items: Vec<BatchItem> = chosen
            .iter()
            .zip(&inputs)
            .map(|((i, _), tokens)| BatchItem {
                tokens,
                cache: caches[*i].take().expect("each sequence is chosen once"),
            })
            .collect();
        model.model.forward_batch(&mut items)
    };
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            // A failed step fails the sequences in it; the others go on.
            let msg = e.to_string();
            let failed: Vec<usize> = chosen.iter().map(|(i, _)| *i).collect();
            for &i in failed.iter().rev() {
                let s = running.remove(i);
                let _ = s.events.send(Event::Failed(msg.clone()));
            }
            return;
        }
    };
    let mut finished = Vec::new();
    for ((i, input), mut l) in chosen.into_iter().zip(logits) {
        let s = &mut running[i];
        s.done = input.end;
        if s.done < s.prompt_len {
            continue; // more prompt to go
        }
        let tok = s.sampler.sample(&mut l, &s.tokens);
        if model.info.tokenizer.is_eog(tok) {
            s.finish(FinishReason::Stop);
            finished.push(i);
            continue;
        }
        s.tokens.push(tok);
        if s.events.send(Event::Token(tok)).is_err() {
            finished.push(i); // the client went away
            continue;
        }
        if s.generated() >= s.max_tokens {
            s.finish(FinishReason::Length);
            finished.push(i);
        }
    }
    finished.sort_unstable();
    for i in finished.into_iter().rev() {
        running.remove(i);
    }
}
