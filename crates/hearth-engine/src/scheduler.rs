//! Continuous batching: one thread owns the model and, every step, runs all running
//! sequences together in one forward pass — each sequence's next prompt chunk or its one
//! new token — samples one token per sequence that finished its prompt, and sends it to
//! that request's channel. Requests join and leave between steps; nobody waits for
//! another request to finish.
//!
//! Memory is a paged KV cache ([`KvCache`]): a request is admitted when the pool has free
//! blocks for its prompt, each step takes the blocks its tokens need, and when the pool
//! runs dry the newest sequences are preempted — their blocks freed, their tokens so far
//! recomputed later — instead of failing anyone. Requests wait in a bounded queue; when
//! it is full, `submit` refuses (the server's 429).
//!
//! Fairness: every request names an owner (an opaque label; the server uses the API key,
//! or the client's address). An owner may have at most `max_per_owner` sequences queued
//! or running, so one owner cannot fill the queue; a freed running slot goes to the
//! waiting owner with the fewest running sequences, so owners are served side by side
//! rather than in arrival order; and when the batch is full while an owner waits with
//! nothing running, the newest sequence of an owner above its fair share is preempted
//! to make room.
//!
//! Prompts are cut into the same 512-token chunks as a lone [`LoadedModel::prefill`], and
//! a chunk is never split across steps, so a request's tokens are the same whether it runs
//! alone or among others (see `tests/scheduler.rs`). A preempted sequence is recomputed
//! in chunks too; its later tokens may then differ in the last bits, as in vLLM.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::constraint::{Constraint, GrammarError, Mask};
use crate::generate::{FinishReason, LoadedModel, PREFILL_CHUNK};
use crate::kv_cache::{BlockTable, KvCache};
use crate::llama::BatchItem;
use crate::sampler::{log_softmax, Sampler, SamplingParams};
use crate::EngineError;

/// What a client asks for.
#[derive(Clone, Debug)]
pub struct Request {
    /// Who the request belongs to, for fair shares and the per-owner cap: an opaque
    /// label (the engine gives it no meaning; requests with the same label share).
    pub owner: Arc<str>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Log-probabilities to return with each token: `Some(n)` gives the sampled token's
    /// and the `n` most likely tokens' (of the model's distribution, before penalties,
    /// bias and temperature).
    pub logprobs: Option<usize>,
    /// Generate past end-of-generation tokens (they are sent like any token), for
    /// benchmarks that need a fixed output length. Under a constraint, end-of-generation
    /// tokens are instead masked while the grammar allows anything else.
    pub ignore_eos: bool,
    /// A grammar the output must match (see [`LoadedModel::constraint`]). The output
    /// ends when the grammar is complete; end-of-sequence is allowed only where the
    /// grammar could end; tokens the grammar forces are appended without sampling and
    /// run through the model together in the next step.
    pub constraint: Option<Constraint>,
}

/// Log-probabilities at one position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Of the sampled token.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What the scheduler sends back, in order: tokens, then exactly one `Finished` or
/// `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
    /// The request's grammar failed while being followed (it exceeded a limit of the
    /// grammar library, e.g. a lexer too complex): the grammar is at fault, not the
    /// server.
    GrammarFailed(String),
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
    /// Blocks in the KV pool; `None`: enough for `max_running` full-context sequences.
    pub kv_blocks: Option<usize>,
    /// Sequences one owner may have queued or running at once; `None`:
    /// [`SchedulerConfig::default_max_per_owner`].
    pub max_per_owner: Option<usize>,
}

impl SchedulerConfig {
    /// A whole running batch and a quarter of the queue: one owner can keep every slot
    /// busy and sequences waiting behind them when alone, yet takes at most a quarter of
    /// the queue, so at least three others still find room; and at least the 128
    /// choices one API request may ask for, where the queue holds them (32 and 256 give
    /// 128).
    pub fn default_max_per_owner(max_running: usize, max_queue: usize) -> usize {
        (max_running + max_queue.div_ceil(4))
            .max(128)
            .min(max_running + max_queue)
            .max(1)
    }

    /// The per-owner cap in force.
    pub fn owner_cap(&self) -> usize {
        self.max_per_owner
            .unwrap_or_else(|| Self::default_max_per_owner(self.max_running, self.max_queue))
            .max(1)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_queue: 256,
            prefill_budget: PREFILL_CHUNK,
            kv_blocks: None,
            max_per_owner: None,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The owner would pass its cap of sequences queued or running (`asked` > `cap`:
    /// never, whatever else runs).
    #[error("the owner has {held} sequences queued or running; {asked} more would pass its cap of {cap}")]
    OwnerFull {
        cap: usize,
        held: usize,
        asked: usize,
    },
    #[error("the scheduler has stopped")]
    Stopped,
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Live numbers of the scheduler, for metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Requests submitted and not yet running (including preempted ones).
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub preemptions: AtomicU64,
    /// Prompt tokens run through the model (recomputation and grammar-forced tokens
    /// included).
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Time spent computing grammar token masks (on the helper thread), microseconds.
    pub mask_micros: AtomicU64,
    /// Of which the step waited after its forward pass (on the critical path).
    pub mask_wait_micros: AtomicU64,
    /// Set once the scheduler thread has ended.
    pub stopped: AtomicBool,
}

struct Submission {
    request: Request,
    slot: OwnerSlot,
    events: UnboundedSender<Event>,
}

/// Sequences each owner has queued or running (owners with none are not kept).
#[derive(Debug, Default)]
struct OwnerCounts(Mutex<HashMap<Arc<str>, usize>>);

impl OwnerCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Places for `wanted` (owner, sequences) all at once under `cap`, or none.
    fn take(
        self: &Arc<Self>,
        wanted: &[(Arc<str>, usize)],
        cap: usize,
    ) -> Result<Vec<OwnerSlot>, SubmitError> {
        let mut counts = self.lock();
        for (owner, k) in wanted {
            let held = counts.get(owner).copied().unwrap_or(0);
            if held + k > cap {
                return Err(SubmitError::OwnerFull {
                    cap,
                    held,
                    asked: *k,
                });
            }
        }
        let mut slots = Vec::new();
        for (owner, k) in wanted {
            *counts.entry(owner.clone()).or_insert(0) += k;
            slots.extend((0..*k).map(|_| OwnerSlot {
                counts: self.clone(),
                owner: owner.clone(),
                held: true,
            }));
        }
        Ok(slots)
    }

    fn held(&self, owner: &str) -> usize {
        self.lock().get(owner).copied().unwrap_or(0)
    }
}

/// One sequence's place in its owner's count, from submission until the sequence ends:
/// given back when its final event is sent, or when it is dropped, whichever comes
/// first — so no path that drops a sequence can forget it.
#[derive(Debug)]
struct OwnerSlot {
    counts: Arc<OwnerCounts>,
    owner: Arc<str>,
    held: bool,
}

impl OwnerSlot {
    fn release(&mut self) {
        if !std::mem::take(&mut self.held) {
            return;
        }
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.owner);
            }
        }
    }
}

impl Drop for OwnerSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// The client side: submit requests, get a stream of events for each.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: Sender<Submission>,
    max_queue: usize,
    owner_cap: usize,
    owners: Arc<OwnerCounts>,
    context: usize,
    kv_tokens: usize,
    stats: Arc<SchedulerStats>,
}

impl SchedulerHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request at the next step and frees its blocks.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let mut rx = self.submit_all(vec![request])?;
        Ok(rx.pop().expect("one receiver per request"))
    }

    /// Queues several requests (the choices of one API call) together: all are checked
    /// and given queue places (and places under their owners' caps) at once, or none is.
    pub fn submit_all(
        &self,
        requests: Vec<Request>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, SubmitError> {
        let mut wanted: Vec<(Arc<str>, usize)> = Vec::new();
        for r in &requests {
            self.check(r)?;
            match wanted.iter_mut().find(|(o, _)| *o == r.owner) {
                Some((_, k)) => *k += 1,
                None => wanted.push((r.owner.clone(), 1)),
            }
        }
        // The whole queue first (a full queue is the answer whoever asks), then the
        // owner's share of it.
        let k = requests.len();
        let reserved = self.stats.waiting.fetch_update(Relaxed, Relaxed, |w| {
            (w + k <= self.max_queue).then_some(w + k)
        });
        if reserved.is_err() {
            return Err(SubmitError::QueueFull(self.max_queue));
        }
        let mut slots = match self.owners.take(&wanted, self.owner_cap) {
            Ok(s) => s,
            Err(e) => {
                self.stats.waiting.fetch_sub(k, Relaxed);
                return Err(e);
            }
        };
        let mut receivers = Vec::with_capacity(k);
        for (i, request) in requests.into_iter().enumerate() {
            let (events, rx) = unbounded_channel();
            let at = slots
                .iter()
                .position(|s| s.owner == request.owner)
                .expect("a slot per request");
            let slot = slots.swap_remove(at);
            if self
                .tx
                .send(Submission {
                    request,
                    slot,
                    events,
                })
                .is_err()
            {
                self.stats.waiting.fetch_sub(k - i, Relaxed);
                return Err(SubmitError::Stopped);
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }

    fn check(&self, request: &Request) -> Result<(), SubmitError> {
        let n = request.prompt.len();
        if n == 0 {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if n >= self.context {
            return Err(SubmitError::Invalid(format!(
                "the prompt is {n} tokens long but the model's context is {} tokens",
                self.context
            )));
        }
        if n >= self.kv_tokens {
            return Err(SubmitError::Invalid(format!(
                "the prompt is {n} tokens long but the KV cache holds only {} tokens",
                self.kv_tokens
            )));
        }
        request.params.validate().map_err(SubmitError::Invalid)
    }

    /// Sequences one owner may have queued or running at once.
    pub fn owner_cap(&self) -> usize {
        self.owner_cap
    }

    /// Sequences `owner` has queued or running now.
    pub fn owner_held(&self, owner: &str) -> usize {
        self.owners.held(owner)
    }

    /// Whether the scheduler thread is still running.
    pub fn is_running(&self) -> bool {
        !self.stats.stopped.load(Relaxed)
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// Tokens the KV pool holds, all sequences together.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_tokens
    }

    pub fn context_length(&self) -> usize {
        self.context
    }
}

struct Sequence {
    /// Its place in its owner's count (and the owner's label).
    slot: OwnerSlot,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already in the cache.
    done: usize,
    table: BlockTable,
    sampler: Sampler,
    max_tokens: usize,
    logprobs: Option<usize>,
    ignore_eos: bool,
    constraint: Option<Constraint>,
    events: UnboundedSender<Event>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The tokens this step feeds: the next prompt chunk (or, after a preemption, the
    /// next chunk of everything so far), or the last sampled token.
    fn next_input(&self) -> std::ops::Range<usize> {
        self.done..(self.done + PREFILL_CHUNK).min(self.tokens.len())
    }

    fn is_prefill(&self) -> bool {
        self.tokens.len() - self.done > 1
    }

    fn owner(&self) -> &str {
        &self.slot.owner
    }

    /// Sends the final event. The owner's place is given back first, so a client that
    /// saw its request end can submit again at once.
    fn end(&mut self, event: Event) {
        self.slot.release();
        let _ = self.events.send(event);
    }

    fn finish(&mut self, reason: FinishReason) {
        self.end(Event::Finished {
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
        });
    }

    fn fail(&mut self, message: String) {
        self.end(Event::Failed(message));
    }
}

/// Starts the scheduler thread; the model is shared, the compute runs on `pool`.
pub fn spawn(
    model: Arc<LoadedModel>,
    config: SchedulerConfig,
    pool: Arc<rayon::ThreadPool>,
) -> Result<(SchedulerHandle, JoinHandle<()>), EngineError> {
    let blocks = config
        .kv_blocks
        .unwrap_or_else(|| KvCache::blocks_for(model.context_length()) * config.max_running.max(1));
    let cache = model.model.new_cache(blocks)?;
    let stats = Arc::new(SchedulerStats::default());
    stats.kv_blocks_total.store(blocks, Relaxed);
    // The queue's bound is the `waiting` count, checked in `submit_all`.
    let (tx, rx) = mpsc::channel();
    let handle = SchedulerHandle {
        tx,
        max_queue: config.max_queue,
        owner_cap: config.owner_cap(),
        owners: Arc::default(),
        context: model.context_length(),
        kv_tokens: cache.capacity_tokens(),
        stats: stats.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("hearth-scheduler".into())
        .spawn(move || {
            // Marks the scheduler stopped however the thread ends, panics included.
            struct Stopped(Arc<SchedulerStats>);
            impl Drop for Stopped {
                fn drop(&mut self) {
                    self.0.stopped.store(true, Relaxed);
                }
            }
            let _stopped = Stopped(stats.clone());
            let mut s = Scheduler {
                model: &model,
                config,
                cache,
                running: Vec::new(),
                waiting: VecDeque::new(),
                stats,
                active: HashMap::new(),
            };
            pool.install(|| s.run(rx));
        })
        .map_err(|e| EngineError::Device(format!("cannot start the scheduler thread: {e}")))?;
    Ok((handle, thread))
}

struct Scheduler<'m> {
    model: &'m LoadedModel,
    config: SchedulerConfig,
    cache: KvCache,
    /// Oldest first.
    running: Vec<Sequence>,
    /// Taken from the channel (or preempted) and not yet admitted, next first.
    waiting: VecDeque<Sequence>,
    stats: Arc<SchedulerStats>,
    /// When each owner last had work (running or waiting): owners seen within
    /// [`ACTIVE_WINDOW`] share the batch.
    active: HashMap<Arc<str>, std::time::Instant>,
}

/// How long an owner counts as active after its last sequence: a client between two
/// requests keeps its share.
const ACTIVE_WINDOW: Duration = Duration::from_secs(2);

impl Scheduler<'_> {
    /// Notes who has work now, forgets owners idle past the window, and returns each
    /// active owner's share of the batch: `max_running` over the active owners (at
    /// least 1), or the whole batch for a lone owner.
    fn share(&mut self) -> usize {
        let now = std::time::Instant::now();
        for s in self.running.iter().chain(self.waiting.iter()) {
            match self.active.get_mut(s.owner()) {
                Some(t) => *t = now,
                None => {
                    self.active.insert(s.slot.owner.clone(), now);
                }
            }
        }
        self.active
            .retain(|_, t| now.duration_since(*t) < ACTIVE_WINDOW);
        (self.config.max_running / self.active.len().max(1)).max(1)
    }

    fn run(&mut self, rx: Receiver<Submission>) {
        // Everything submitted moves to `waiting` at once (its size is bounded by
        // `submit_all`), so cancelled requests are dropped wherever they wait.
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && open {
                // Nothing to do: wait, but wake now and then.
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(s) => self.accept(s),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(s) => self.accept(s),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            let share = self.share();
            self.shed(share);
            while self.running.len() < self.config.max_running && self.admit_next(share) {}
            self.rebalance(share);
            if !open && self.running.is_empty() && self.waiting.is_empty() {
                return;
            }
            self.step();
            self.publish();
        }
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Relaxed);
        self.stats
            .kv_blocks_used
            .store(self.cache.used_blocks(), Relaxed);
    }

    /// A submission becomes a waiting sequence.
    fn accept(&mut self, s: Submission) {
        let prompt_len = s.request.prompt.len();
        let max_tokens = s
            .request
            .max_tokens
            .min(self.model.context_length() - prompt_len);
        let mut seq = Sequence {
            slot: s.slot,
            tokens: s.request.prompt,
            prompt_len,
            done: 0,
            table: BlockTable::new(),
            sampler: Sampler::new(s.request.params),
            max_tokens,
            logprobs: s.request.logprobs,
            ignore_eos: s.request.ignore_eos,
            constraint: s.request.constraint,
            events: s.events,
        };
        if max_tokens == 0 || seq.events.is_closed() {
            self.stats.waiting.fetch_sub(1, Relaxed);
            seq.finish(FinishReason::Length);
            return;
        }
        self.waiting.push_back(seq);
    }

    /// Starts the next waiting sequence (see [`pick_next`]) when the pool has blocks for
    /// its first chunk and the tokens after it, leaving one block per running sequence
    /// for decoding.
    /// An owner already running its `share` waits while others are active.
    fn admit_next(&mut self, share: usize) -> bool {
        let Some(at) = pick_next(
            self.waiting.iter().map(Sequence::owner),
            self.running.iter().map(Sequence::owner),
        ) else {
            return false;
        };
        let seq = &self.waiting[at];
        let held = self
            .running
            .iter()
            .filter(|s| s.owner() == seq.owner())
            .count();
        if held >= share && self.active.len() > 1 {
            return false;
        }
        let needed = KvCache::blocks_for(seq.tokens.len() + 1) + self.running.len();
        if needed > self.cache.free_blocks() && !self.running.is_empty() {
            return false;
        }
        let seq = self.waiting.remove(at).expect("picked from the queue");
        self.stats.waiting.fetch_sub(1, Relaxed);
        self.running.push(seq);
        true
    }

    /// With the batch full, makes room for owners that wait with nothing running: an
    /// owner above its fair share gives up its newest sequence, and the waiting owner
    /// takes the slot. Each round serves one such owner, so it ends.
    fn rebalance(&mut self, share: usize) {
        loop {
            let running: Vec<&str> = self.running.iter().map(Sequence::owner).collect();
            let Some(i) = victim(
                &running,
                self.waiting.iter().map(Sequence::owner),
                self.config.max_running,
            ) else {
                return;
            };
            self.preempt(i);
            if !self.admit_next(share) {
                return;
            }
        }
    }

    /// While several owners are active, an owner running more than its `share` (it
    /// filled the batch while alone) gives back its newest sequences: a key with many
    /// choices cannot make everyone's steps slow by holding the whole batch.
    fn shed(&mut self, share: usize) {
        if self.active.len() < 2 {
            return;
        }
        loop {
            let running: Vec<&str> = self.running.iter().map(Sequence::owner).collect();
            let Some(i) = over_share(&running, share) else {
                return;
            };
            self.preempt(i);
        }
    }

    /// Forgets sequences whose client went away, freeing their blocks.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let mut s = self.running.remove(i);
                self.cache.release(&mut s.table);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        self.stats
            .waiting
            .fetch_sub(before - self.waiting.len(), Relaxed);
    }

    /// Moves the newest running sequence back to the front of the queue, freeing its
    /// blocks; it will be recomputed from its tokens so far.
    fn preempt_newest(&mut self) {
        self.preempt(self.running.len() - 1);
    }

    /// Moves running sequence `i` back to the front of the queue (ahead of its owner's
    /// other waiting sequences), freeing its blocks.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.cache.release(&mut s.table);
        s.done = 0;
        self.stats.preemptions.fetch_add(1, Relaxed);
        self.stats.waiting.fetch_add(1, Relaxed);
        tracing::debug!(tokens = s.tokens.len(), "preempted a sequence");
        self.waiting.push_front(s);
    }

    /// Chooses this step's work and takes its blocks: decodes always, whole prompt chunks
    /// while the prefill budget lasts (the first always, so a long prompt cannot starve).
    /// When the pool runs dry, the newest sequences make room.
    fn plan(&mut self) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut budget = self.config.prefill_budget;
        let mut chosen = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let input = self.running[i].next_input();
            let over_budget = input.len() > budget && budget < self.config.prefill_budget;
            if self.running[i].is_prefill() && over_budget {
                i += 1;
                continue;
            }
            loop {
                let s = &mut self.running[i];
                if self.cache.allocate(&mut s.table, input.end) {
                    break;
                }
                if i + 1 < self.running.len() {
                    self.preempt_newest();
                } else if i > 0 {
                    self.preempt_newest(); // this one; the older ones go on
                    return chosen;
                } else {
                    // Alone and still too big: the cache is its context.
                    let mut s = self.running.remove(0);
                    self.cache.release(&mut s.table);
                    s.finish(FinishReason::Length);
                    return chosen;
                }
            }
            if self.running[i].is_prefill() {
                budget = budget.saturating_sub(input.len());
            }
            chosen.push((i, input));
            i += 1;
        }
        chosen
    }

    /// One forward pass over the sequences that fit this step, then sampling.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let chosen = self.plan();
        if chosen.is_empty() {
            return;
        }
        let inputs: Vec<Vec<u32>> = chosen
            .iter()
            .map(|(i, r)| self.running[*i].tokens[r.clone()].to_vec())
            .collect();
        // Only sequences that sample this step need a mask.
        let samples: Vec<bool> = chosen
            .iter()
            .map(|(i, r)| r.end == self.running[*i].tokens.len())
            .collect();
        let (result, mut masks) = {
            let mut tables = Vec::with_capacity(self.running.len());
            let mut constraints = Vec::with_capacity(self.running.len());
            for s in self.running.iter_mut() {
                tables.push(Some(&mut s.table));
                constraints.push(s.constraint.as_mut());
            }
            let mut items: Vec<BatchItem> = chosen
                .iter()
                .zip(&inputs)
                .map(|((i, _), tokens)| BatchItem {
                    tokens,
                    table: tables[*i].take().expect("each sequence is chosen once"),
                })
                .collect();
            let wanted: Vec<(usize, &mut Constraint)> = chosen
                .iter()
                .enumerate()
                .filter(|(k, _)| samples[*k])
                .filter_map(|(k, (i, _))| constraints[*i].take().map(|c| (k, c)))
                .collect();
            let (model, cache) = (&self.model.model, &mut self.cache);
            if wanted.is_empty() {
                (model.forward_batch(cache, &mut items), Vec::new())
            } else {
                // Masks for this step's samples, computed while the model runs.
                let stats = &self.stats;
                let n = chosen.len();
                std::thread::scope(|scope| {
                    let masker = scope.spawn(move || {
                        let t = std::time::Instant::now();
                        let mut masks: Vec<Option<Result<Mask, GrammarError>>> =
                            (0..n).map(|_| None).collect();
                        for (k, c) in wanted {
                            masks[k] = Some(c.mask());
                        }
                        let us = t.elapsed().as_micros() as u64;
                        stats.mask_micros.fetch_add(us, Relaxed);
                        masks
                    });
                    let result = model.forward_batch(cache, &mut items);
                    let waited = std::time::Instant::now();
                    let masks = masker.join().unwrap_or_else(|_| {
                        tracing::error!("computing token masks panicked");
                        Vec::new()
                    });
                    let us = waited.elapsed().as_micros() as u64;
                    stats.mask_wait_micros.fetch_add(us, Relaxed);
                    (result, masks)
                })
            }
        };
        self.stats.steps.fetch_add(1, Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails the sequences in it; the others go on.
                tracing::error!("engine step failed: {e}");
                let msg = e.to_string();
                for &(i, _) in chosen.iter().rev() {
                    let mut s = self.running.remove(i);
                    self.cache.release(&mut s.table);
                    s.fail(msg.clone());
                }
                return;
            }
        };
        let mut finished = Vec::new();
        let mut mask_of = |k: usize| -> Result<Mask, GrammarError> {
            masks
                .get_mut(k)
                .and_then(Option::take)
                .unwrap_or_else(|| Err(GrammarError("the token mask was not computed".into())))
        };
        // First the sequences' bookkeeping, log-probabilities and grammar masks, one after
        // another; then the draws of all that sample, spread over the compute team (a
        // draw is a few passes over the vocabulary, 16 of them a step); then what each
        // drawn token does.
        let mut logits = logits;
        let mut pending = Vec::with_capacity(chosen.len());
        for (k, (i, input)) in chosen.into_iter().enumerate() {
            let s = &mut self.running[i];
            let l = &mut logits[k];
            let decode = input.len() == 1 && input.start >= s.prompt_len;
            if !decode {
                self.stats
                    .prompt_tokens
                    .fetch_add(input.len() as u64, Relaxed);
            }
            s.done = input.end;
            if s.done < s.tokens.len() {
                continue; // more prompt to go
            }
            let lp = s.logprobs.map(|n| (log_softmax(l), n));
            if s.constraint.is_some() {
                let masked = mask_of(k).and_then(|m| {
                    if m.apply(l) {
                        Ok(())
                    } else {
                        Err(GrammarError("the grammar allows no token here".into()))
                    }
                });
                if masked.is_ok() && s.ignore_eos {
                    // Past end-of-sequence too, wherever the grammar allows more.
                    let eog = self.model.info.tokenizer.eog_tokens();
                    let more = l
                        .iter()
                        .enumerate()
                        .any(|(t, x)| x.is_finite() && !eog.contains(&(t as u32)));
                    if more {
                        for &t in eog {
                            if let Some(x) = l.get_mut(t as usize) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                if let Err(e) = masked {
                    s.end(Event::GrammarFailed(e.0));
                    finished.push(i);
                    continue;
                }
            }
            pending.push((i, k, lp));
        }
        let rows: Vec<(usize, usize)> = pending.iter().map(|&(i, k, _)| (i, k)).collect();
        let toks = self.draw(&rows, &mut logits);
        for ((i, _, lp), tok) in pending.into_iter().zip(toks) {
            let s = &mut self.running[i];
            let eog = self.model.info.tokenizer.is_eog(tok);
            if eog && (!s.ignore_eos || s.constraint.is_some()) {
                s.finish(FinishReason::Stop);
                finished.push(i);
                continue;
            }
            let committed = s.constraint.as_mut().map_or(Ok(()), |c| c.commit(tok));
            if let Err(e) = committed {
                s.end(Event::GrammarFailed(e.0));
                finished.push(i);
                continue;
            }
            s.tokens.push(tok);
            self.stats.generated_tokens.fetch_add(1, Relaxed);
            let logprobs = lp.map(|(lp, n)| TokenLogprobs {
                logprob: lp[tok as usize],
                top: top_n(&lp, n),
            });
            if s.events.send(Event::Token { id: tok, logprobs }).is_err() {
                finished.push(i); // the client went away
                continue;
            }
            // Tokens the grammar forces next go in without sampling: the next step runs
            // them through the model as one chunk. (Not when log-probabilities are
            // asked for: every token then has the model's own.)
            if s.logprobs.is_none() && s.generated() < s.max_tokens {
                if let Some(c) = &mut s.constraint {
                    let mut gone = false;
                    for t in c.forced() {
                        if s.generated() >= s.max_tokens || self.model.info.tokenizer.is_eog(t) {
                            break;
                        }
                        s.tokens.push(t);
                        self.stats.generated_tokens.fetch_add(1, Relaxed);
                        if s.events
                            .send(Event::Token {
                                id: t,
                                logprobs: None,
                            })
                            .is_err()
                        {
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        finished.push(i);
                        continue;
                    }
                }
            }
            if s.constraint.as_ref().is_some_and(Constraint::is_finished) {
                s.finish(FinishReason::Stop);
                finished.push(i);
            } else if s.generated() >= s.max_tokens {
                s.finish(FinishReason::Length);
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.cache.release(&mut s.table);
        }
    }

    /// The next token of each `(sequence, logits row)` in `pending` (distinct
    /// sequences), drawn side by side over the compute team: each sequence's draw
    /// depends on its own sampler and history alone.
    fn draw(&mut self, pending: &[(usize, usize)], logits: &mut [Vec<f32>]) -> Vec<u32> {
        struct Draw<'a> {
            at: usize,
            sampler: &'a mut Sampler,
            history: &'a [u32],
            row: &'a mut Vec<f32>,
            tok: u32,
        }
        let mut row_of = vec![None; self.running.len()];
        for (at, &(i, k)) in pending.iter().enumerate() {
            row_of[i] = Some((at, k));
        }
        let mut rows: Vec<Option<&mut Vec<f32>>> = logits.iter_mut().map(Some).collect();
        let mut jobs: Vec<Draw> = self
            .running
            .iter_mut()
            .zip(&row_of)
            .filter_map(|(s, of)| {
                let (at, k) = (*of)?;
                let history = if s.sampler.params().penalize_prompt {
                    &s.tokens[..]
                } else {
                    &s.tokens[s.prompt_len..]
                };
                Some(Draw {
                    at,
                    sampler: &mut s.sampler,
                    history,
                    row: rows[k].take().expect("one row per sequence"),
                    tok: 0,
                })
            })
            .collect();
        hearth_kernels::team::for_each_chunk_mut(
            &mut jobs,
            1,
            || (),
            |_, _, job| {
                for d in job.iter_mut() {
                    d.tok = d.sampler.sample(d.row, d.history);
                }
            },
        );
        let mut toks = vec![0; pending.len()];
        for d in jobs {
            toks[d.at] = d.tok;
        }
        toks
    }
}

/// Which waiting sequence starts next, given the owners of the waiting sequences (queue
/// order) and of the running ones: the first waiting sequence of the owner with the
/// fewest running (ties: the one that waited first). Within one owner this keeps queue
/// order, preempted sequences (put back at the front) first.
fn pick_next<'a>(
    waiting: impl IntoIterator<Item = &'a str>,
    running: impl IntoIterator<Item = &'a str>,
) -> Option<usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for o in running {
        *counts.entry(o).or_insert(0) += 1;
    }
    let mut best: Option<(usize, usize)> = None;
    for (at, o) in waiting.into_iter().enumerate() {
        let n = counts.get(o).copied().unwrap_or(0);
        if best.is_none_or(|(m, _)| n < m) {
            best = Some((n, at));
            if n == 0 {
                break;
            }
        }
    }
    best.map(|(_, at)| at)
}

/// Which running sequence (by index, oldest first) to preempt so that an owner who waits
/// with nothing running gets a slot: only when the batch is full (`max_running`), and
/// only from the owner with the most running sequences when that is more than its fair
/// share (`max_running` over the owners with work, at least 1) — its newest sequence.
fn victim<'a>(
    running: &[&'a str],
    waiting: impl IntoIterator<Item = &'a str>,
    max_running: usize,
) -> Option<usize> {
    if running.len() < max_running {
        return None;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for &o in running {
        *counts.entry(o).or_insert(0) += 1;
    }
    let mut idle = false;
    let mut owners = counts.len();
    let mut seen = std::collections::HashSet::new();
    for o in waiting {
        if !counts.contains_key(o) && seen.insert(o) {
            idle = true;
            owners += 1;
        }
    }
    if !idle {
        return None;
    }
    let share = (max_running / owners).max(1);
    // The biggest holder; among equals, the one whose newest sequence is newest.
    let (at, _) = running
        .iter()
        .enumerate()
        .max_by_key(|&(i, o)| (counts[o], i))?;
    (counts[running[at]] > share).then_some(at)
}

/// The newest running sequence (by index, oldest first) of an owner that runs more than
/// `share` sequences.
fn over_share(running: &[&str], share: usize) -> Option<usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for &o in running {
        *counts.entry(o).or_insert(0) += 1;
    }
    (0..running.len())
        .rev()
        .find(|&i| counts[running[i]] > share)
}

/// The `n` largest entries of `lp` with their indices, largest first (lower index first
/// among equals).
fn top_n(lp: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by);
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_slot_goes_to_the_owner_with_fewest_running() {
        // FIFO among equals.
        assert_eq!(pick_next(["a", "b"], []), Some(0));
        assert_eq!(pick_next([], ["a"]), None);
        // `a` runs two, `b` none: `b` goes first though it came later.
        assert_eq!(pick_next(["a", "a", "b"], ["a", "a"]), Some(2));
        // `a` 2, `b` 1, `c` 1: the earliest of `b` and `c`.
        assert_eq!(
            pick_next(["a", "c", "b", "c"], ["a", "b", "a", "c"]),
            Some(1)
        );
        // One owner alone: plain queue order.
        assert_eq!(pick_next(["a", "a"], ["a"; 5]), Some(0));
    }

    #[test]
    fn interleaving_serves_owners_in_turn() {
        // Owner `a` queued 6 before `b` queued 2; 4 slots fill a, b, a, b, then a.
        let mut waiting = vec!["a", "a", "a", "a", "a", "a", "b", "b"];
        let mut running = Vec::new();
        while running.len() < 5 {
            let at = pick_next(waiting.iter().copied(), running.iter().copied()).unwrap();
            running.push(waiting.remove(at));
        }
        assert_eq!(running, ["a", "b", "a", "b", "a"]);
    }

    #[test]
    fn an_idle_owner_preempts_the_biggest_holder_above_its_share() {
        // Batch not full: nothing to preempt, a slot is free.
        assert_eq!(victim(&["a", "a"], ["b"], 4), None);
        // Full, `b` waits with nothing running: `a`'s newest goes.
        assert_eq!(victim(&["a", "a", "a", "a"], ["a", "b"], 4), Some(3));
        assert_eq!(victim(&["a", "c", "a", "a"], ["b"], 4), Some(3));
        assert_eq!(victim(&["a", "a", "a", "c"], ["b"], 4), Some(2));
        // Nobody waits with nothing running: no preemption (`b` has one).
        assert_eq!(victim(&["a", "a", "a", "b"], ["b", "b"], 4), None);
        assert_eq!(victim(&["a", "a", "a", "a"], ["a"], 4), None);
        // Five owners with work for 4 slots (share 1): nobody is above it.
        assert_eq!(victim(&["a", "b", "c", "d"], ["e"], 4), None);
        // Three owners (share 1); `a` holds 3 of 4.
        assert_eq!(victim(&["b", "a", "a", "a"], ["c"], 4), Some(3));
        // Equal holders: the one whose newest sequence is newest gives it up.
        assert_eq!(victim(&["a", "b", "b", "a"], ["c"], 4), Some(3));
        // Repeated preemption ends: after each, the idle owner runs one.
        let mut running = vec!["a"; 8];
        let waiting = ["b", "c", "d"];
        let mut rounds = 0;
        while let Some(i) = victim(&running, waiting.iter().copied(), 8) {
            running.remove(i);
            let mut w: Vec<&str> = waiting.to_vec();
            w.retain(|o| !running.contains(o));
            running.push(w[0]);
            rounds += 1;
            assert!(rounds <= 3);
        }
        assert_eq!(rounds, 3);
        assert_eq!(running.iter().filter(|&&o| o == "a").count(), 5);
    }

    #[test]
    fn owner_slots_cap_and_come_back_when_dropped() {
        let counts = Arc::new(OwnerCounts::default());
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let two = counts.take(&[(a.clone(), 2)], 3).unwrap();
        assert_eq!(counts.held("a"), 2);
        assert_eq!(
            counts.take(&[(a.clone(), 2)], 3).unwrap_err(),
            SubmitError::OwnerFull {
                cap: 3,
                held: 2,
                asked: 2
            }
        );
        // All or nothing across owners: `b` fits, `a` does not, neither is counted.
        assert!(counts.take(&[(b.clone(), 1), (a.clone(), 2)], 3).is_err());
        assert_eq!(counts.held("b"), 0);
        let mut one = counts.take(&[(b.clone(), 1)], 3).unwrap();
        // Released once, whether by `release` or by drop.
        one[0].release();
        one[0].release();
        assert_eq!(counts.held("b"), 0);
        drop(one);
        assert_eq!(counts.held("b"), 0);
        drop(two);
        assert_eq!(counts.held("a"), 0);
        assert!(counts.lock().is_empty(), "owners with none are not kept");
    }

    #[test]
    fn owners_over_their_share_give_back_their_newest() {
        assert_eq!(over_share(&["a", "b", "a", "a"], 2), Some(3));
        assert_eq!(over_share(&["a", "b", "a", "b"], 2), None);
        assert_eq!(over_share(&["b", "a", "a", "b", "b"], 1), Some(4));
        assert_eq!(over_share(&[], 1), None);
    }

    #[test]
    fn the_default_cap_is_a_batch_and_a_quarter_of_the_queue() {
        assert_eq!(SchedulerConfig::default().owner_cap(), 128);
        assert_eq!(SchedulerConfig::default_max_per_owner(32, 16), 48);
        assert_eq!(SchedulerConfig::default_max_per_owner(64, 512), 192);
        assert_eq!(SchedulerConfig::default_max_per_owner(1, 1), 2);
        let c = SchedulerConfig {
            max_per_owner: Some(5),
            ..Default::default()
        };
        assert_eq!(c.owner_cap(), 5);
    }

    #[test]
    fn top_n_is_sorted_and_stable() {
        let lp = [-3.0, -1.0, -2.0, -1.0, -5.0];
        assert_eq!(top_n(&lp, 3), vec![(1, -1.0), (3, -1.0), (2, -2.0)]);
        assert_eq!(top_n(&lp, 0), vec![]);
        assert_eq!(top_n(&lp, 9).len(), 5);
    }
}
