//! The compute team: the threads that run one parallel loop of the kernels, the caller
//! among them. A decode step forks a few hundred short loops (a matmul, an attention
//! layer: tens of microseconds each) with serial work in between. Rayon's workers fall
//! asleep in those gaps and each fork then pays a futex wake-up and a context switch (a
//! tenth of the CPU time in a 16-sequence decode profile). Our workers instead spin for
//! a short while after each loop, so the next one finds them awake, and park (no CPU)
//! once the work stops, e.g. between requests.
//!
//! The team's size is `rayon::current_num_threads()` of the calling thread (the engine
//! runs inside a rayon pool of `-t` threads), one team per size. A loop started while the
//! team is busy (a nested loop, or another engine on another thread) runs on the calling
//! thread alone. Every loop's tasks are independent, so how they are spread never changes
//! a result.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Runs of items per thread in a loop of many items.
const RUNS_PER_THREAD: usize = 16;

/// How long a worker spins for the next loop before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// Runs `f(i)` for every `i` in `0..n`, spread over the team.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    for_each_init(n, || (), |_, i| f(i));
}

/// [`for_each`] with a state per participating thread, made by `init` before its first
/// task (scratch buffers).
pub fn for_each_init<S>(n: usize, init: impl Fn() -> S + Sync, f: impl Fn(&mut S, usize) + Sync) {
    if n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let team = (n > 1 && threads > 1).then(|| Team::of(threads)).flatten();
    let Some(team) = team.filter(|t| t.enter()) else {
        let mut s = init();
        (0..n).for_each(|i| f(&mut s, i));
        return;
    };
    // One state slot per thread of the team; slot `t` is touched by thread `t` alone.
    let slots: Vec<Slot<S>> = (0..threads).map(|_| Slot(UnsafeCell::new(None))).collect();
    // Many small items go in runs, so that claiming costs little next to the work; a
    // few runs per thread still even out uneven items.
    let runs = n.min(threads * RUNS_PER_THREAD);
    let job = |thread: usize, run: usize| {
        // SAFETY: only thread `thread` runs with this index during this loop.
        let s = unsafe { &mut *slots[thread].0.get() };
        let s = s.get_or_insert_with(&init);
        (run * n / runs..(run + 1) * n / runs).for_each(|i| f(s, i));
    };
    team.run(runs, &job);
}

/// [`for_each_init`] over the `size`-element chunks of `data` (the last may be shorter):
/// `f(state, chunk index, chunk)`.
pub fn for_each_chunk_mut<T: Send, S>(
    data: &mut [T],
    size: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    assert!(size > 0, "chunks of at least one element");
    let (len, base) = (data.len(), Base(data.as_mut_ptr()));
    for_each_init(len.div_ceil(size), init, |s, i| {
        let start = i * size;
        let base = &base;
        // SAFETY: chunk `i` lies inside `data` and no other task touches it; `data` is
        // borrowed mutably for the whole loop.
        let chunk =
            unsafe { std::slice::from_raw_parts_mut(base.0.add(start), size.min(len - start)) };
        f(s, i, chunk)
    });
}

/// Runs `f(state, range)` over contiguous pieces of `0..n` that together cover it once,
/// spread over the team. Each thread starts on its own share (`n / threads` items in a
/// row) from the front, claiming pieces that shrink as the share empties; when its share
/// is done it takes half of what is left of another's from the back. So a thread's items
/// mostly come in order (what it prefetched for the next item is its own), and the
/// threads' last pieces are short (the loop's end waits little).
pub fn for_each_range<S>(
    n: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, std::ops::Range<usize>) + Sync,
) {
    assert!(n < 1 << 32, "ranges of fewer than 2^32 items");
    let threads = rayon::current_num_threads().clamp(1, n.max(1));
    if threads == 1 {
        if n > 0 {
            f(&mut init(), 0..n);
        }
        return;
    }
    // Share `t`: its next item from the front (low half) and its end (high half).
    let shares: Vec<Padded> = (0..threads)
        .map(|t| {
            let (front, end) = (t * n / threads, (t + 1) * n / threads);
            Padded(AtomicU64::new(front as u64 | (end as u64) << 32))
        })
        .collect();
    // Claims `take(left)` items of a share, from the front or the back.
    let claim = |share: &AtomicU64, back: bool, take: fn(usize) -> usize| {
        let mut word = share.load(Acquire);
        loop {
            let (front, end) = ((word & 0xffff_ffff) as usize, (word >> 32) as usize);
            if front >= end {
                return None;
            }
            let k = take(end - front).clamp(1, end - front);
            let (range, next) = if back {
                (end - k..end, front as u64 | ((end - k) as u64) << 32)
            } else {
                (front..front + k, (front + k) as u64 | (end as u64) << 32)
            };
            match share.compare_exchange_weak(word, next, AcqRel, Acquire) {
                Ok(_) => return Some(range),
                Err(now) => word = now,
            }
        }
    };
    for_each_init(threads, init, |s, t| {
        while let Some(r) = claim(&shares[t].0, false, |left| left / 4) {
            f(s, r);
        }
        for other in (1..threads).map(|d| (t + d) % threads) {
            while let Some(r) = claim(&shares[other].0, true, |left| left / 2) {
                f(s, r);
            }
        }
    });
}

/// An atomic alone on its cache line (two threads' shares are claimed at once).
#[repr(align(128))]
struct Padded(AtomicU64);

struct Base<T>(*mut T);
// SAFETY: tasks use the pointer for disjoint chunks of a slice of `Send` elements.
unsafe impl<T: Send> Sync for Base<T> {}

struct Slot<S>(UnsafeCell<Option<S>>);
// SAFETY: each slot is used by one thread at a time (see `for_each_init`), and handed
// back to the caller only after every worker has finished with the loop.
unsafe impl<S> Sync for Slot<S> {}

type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// The loop word: generation (16 bits), task count (24) and next unclaimed task (24),
/// so that one `fetch_add` claims a task and tells which loop it belongs to.
const NEXT_BITS: u32 = 24;
const N_BITS: u32 = 24;
const MASK: u64 = (1 << NEXT_BITS) - 1;

struct Team {
    word: AtomicU64,
    /// The current loop's job (valid while a task of it is unfinished).
    job: UnsafeCell<Option<&'static Job<'static>>>,
    done: AtomicUsize,
    busy: AtomicBool,
    sleepers: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    workers: OnceLock<Vec<Thread>>,
}

// SAFETY: `job` is written only by the thread that holds `busy`, before it publishes the
// loop through `word`, and read by workers only for a task they claimed from that loop,
// which the writer waits for before it writes again.
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

impl Team {
    /// The team of `threads` (the caller and `threads - 1` workers), started on first use.
    fn of(threads: usize) -> Option<&'static Team> {
        thread_local! {
            static LAST: std::cell::Cell<Option<(usize, &'static Team)>> =
                const { std::cell::Cell::new(None) };
        }
        if let Some((n, t)) = LAST.get() {
            if n == threads {
                return Some(t);
            }
        }
        let team = Self::lookup(threads);
        if let Some(t) = team {
            LAST.set(Some((threads, t)));
        }
        team
    }

    fn lookup(threads: usize) -> Option<&'static Team> {
        static TEAMS: Mutex<Vec<(usize, &'static Team)>> = Mutex::new(Vec::new());
        let mut teams = TEAMS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, t)) = teams.iter().find(|(n, _)| *n == threads) {
            return Some(t);
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            word: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            panic: Mutex::new(None),
            workers: OnceLock::new(),
        }));
        let mut handles = Vec::with_capacity(threads - 1);
        for index in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("hearth-team-{index}"))
                .spawn(move || team.work(index));
            match spawned {
                Ok(h) => handles.push(h.thread().clone()),
                // No more threads to be had: the team works with those it got (with
                // none, every loop runs on its caller).
                Err(_) => break,
            }
        }
        let _ = team.workers.set(handles);
        teams.push((threads, team));
        Some(team)
    }

    fn enter(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_ok()
    }

    fn run(&self, n: usize, job: &Job<'_>) {
        // Room for the failed claims (one per thread) past the last task.
        assert!(n < 1 << (NEXT_BITS - 1), "too many tasks for one loop");
        // SAFETY: the lifetime is erased only while this call waits for every task.
        let job: &'static Job<'static> = unsafe { std::mem::transmute(job) };
        // SAFETY: no worker reads `job` now: every task of the last loop is finished.
        unsafe { *self.job.get() = Some(job) };
        self.done.store(0, Relaxed);
        let gen = (self.word.load(Relaxed) >> (NEXT_BITS + N_BITS)).wrapping_add(1) & 0xffff;
        self.word.store(
            (gen << (NEXT_BITS + N_BITS)) | ((n as u64) << NEXT_BITS),
            SeqCst,
        );
        if self.sleepers.load(SeqCst) > 0 {
            for w in self.workers.get().into_iter().flatten() {
                w.unpark();
            }
        }
        self.claim(0);
        // The other threads finish their last tasks; one descheduled by the OS gets the
        // core back sooner if we yield after a while instead of spinning on it.
        let start = Instant::now();
        let (mut spins, mut yielding) = (0u32, false);
        while self.done.load(Acquire) < n {
            spins = spins.wrapping_add(1);
            yielding = yielding || (spins.is_multiple_of(64) && start.elapsed() > SPIN / 4);
            if yielding {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.busy.store(false, Release);
        if let Some(p) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }

    /// Runs tasks of the current loop until none is left.
    fn claim(&self, thread: usize) {
        loop {
            let w = self.word.fetch_add(1, AcqRel);
            let (n, i) = ((w >> NEXT_BITS) & MASK, w & MASK);
            if i >= n {
                return;
            }
            // SAFETY: task `i` is ours and unfinished, so the loop's caller is waiting
            // and its job is alive.
            let Some(job) = (unsafe { *self.job.get() }) else {
                unreachable!("a claimed task has its job")
            };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(thread, i as usize))) {
                *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
            self.done.fetch_add(1, Release);
        }
    }

    fn work(&self, thread: usize) -> ! {
        let generation = |w: u64| w >> (NEXT_BITS + N_BITS);
        let mut seen = generation(self.word.load(Acquire));
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            while generation(self.word.load(Acquire)) == seen {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                    self.sleepers.fetch_add(1, SeqCst);
                    while generation(self.word.load(SeqCst)) == seen {
                        std::thread::park();
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                    break;
                }
                std::hint::spin_loop();
            }
            seen = generation(self.word.load(Acquire));
            self.claim(thread);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_with_a_state_per_thread() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let inits = AtomicUsize::new(0);
                for_each_init(
                    n,
                    || {
                        inits.fetch_add(1, Relaxed);
                        Vec::<usize>::new()
                    },
                    |mine, i| {
                        mine.push(i);
                        hits[i].fetch_add(1, Relaxed);
                    },
                );
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
                assert!(inits.load(Relaxed) <= 3);
            }
        });
    }

    #[test]
    fn ranges_cover_every_item_once_in_contiguous_pieces() {
        for threads in [1usize, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for n in [0usize, 1, 2, 3, 7, 64, 1000, 3072] {
                    for _ in 0..20 {
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        let (pieces, inits) = (AtomicUsize::new(0), AtomicUsize::new(0));
                        for_each_range(
                            n,
                            || inits.fetch_add(1, Relaxed),
                            |_, r| {
                                assert!(!r.is_empty() && r.end <= n, "{r:?} of {n}");
                                pieces.fetch_add(1, Relaxed);
                                for i in r {
                                    hits[i].fetch_add(1, Relaxed);
                                    // Uneven items, so that the shares end at different times.
                                    if i % 7 == 0 {
                                        std::hint::black_box((0..200).sum::<usize>());
                                    }
                                }
                            },
                        );
                        assert!(
                            hits.iter().all(|h| h.load(Relaxed) == 1),
                            "n {n}, {threads} threads"
                        );
                        assert!(inits.load(Relaxed) <= threads);
                        // Pieces shrink geometrically: far fewer pieces than items.
                        if n >= 1000 {
                            assert!(
                                pieces.load(Relaxed) < n / 10,
                                "{} pieces",
                                pieces.load(Relaxed)
                            );
                        }
                    }
                }
            });
        }
    }

    #[test]
    fn nested_and_concurrent_loops_run_and_panics_reach_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let total = AtomicUsize::new(0);
            for_each(8, |_| for_each(8, |_| _ = total.fetch_add(1, Relaxed)));
            assert_eq!(total.load(Relaxed), 64);
        });
        // Loops from several threads at once: each completes.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    pool.install(|| {
                        for _ in 0..200 {
                            let sum = AtomicUsize::new(0);
                            for_each(50, |i| _ = sum.fetch_add(i, Relaxed));
                            assert_eq!(sum.load(Relaxed), 49 * 50 / 2);
                        }
                    })
                });
            }
        });
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| {
                for_each(64, |i| {
                    if i == 40 {
                        panic!("task 40");
                    }
                })
            })
        }));
        assert!(caught.is_err());
        // The team is usable after a panic.
        pool.install(|| {
            let sum = AtomicUsize::new(0);
            for_each(10, |i| _ = sum.fetch_add(i, Relaxed));
            assert_eq!(sum.load(Relaxed), 45);
        });
    }
}
