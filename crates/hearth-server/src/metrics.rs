//! `/metrics` in the Prometheus text format: requests by endpoint and status, the
//! scheduler's queue, running sequences and KV-cache use, token counters, and latency
//! histograms (time to first token, inter-token latency, request duration).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hearth_engine::scheduler::SchedulerStats;

/// A histogram with fixed bucket bounds, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

const TTFT: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
const ITL: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
const DURATION: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];

pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub duration: Histogram,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Client connections open and refused (the accept loop counts them).
    pub connections: crate::listen::ConnectionCounts,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
            duration: Histogram::new(DURATION),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            connections: crate::listen::ConnectionCounts::default(),
        }
    }
}

/// The embedding batcher's counters.
pub fn render_embeddings(s: &hearth_engine::embed::EmbedStats) -> String {
    let mut out = String::new();
    for (name, help, v) in [
        (
            "hearth_embedding_requests_total",
            "Embedding requests served.",
            &s.requests,
        ),
        (
            "hearth_embedding_inputs_total",
            "Texts embedded.",
            &s.inputs,
        ),
        (
            "hearth_embedding_batches_total",
            "Encoder passes run (inputs of concurrent requests share one).",
            &s.batches,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Relaxed)
        );
    }
    out
}

/// A `Key:   N kB` line of a /proc file (Linux), in bytes; `None` elsewhere.
pub fn proc_bytes(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process.
pub fn resident_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmRSS")
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint, status)).or_insert(0) += 1;
    }

    pub fn render(&self, stats: Option<&SchedulerStats>, model: &str) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP hearth_info The model being served.\n# TYPE hearth_info gauge\nhearth_info{{model=\"{}\",version=\"{}\"}} 1",
            model.replace('"', "'"),
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP hearth_requests_total HTTP requests by endpoint and status.\n# TYPE hearth_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hearth_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        if let Some(s) = stats {
            let used = s.kv_blocks_used.load(Relaxed);
            let total = s.kv_blocks_total.load(Relaxed).max(1);
            for (name, help, kind, v) in [
                (
                    "hearth_queue_depth",
                    "Requests waiting to start.",
                    "gauge",
                    s.waiting.load(Relaxed).to_string(),
                ),
                (
                    "hearth_running_sequences",
                    "Sequences in the running batch.",
                    "gauge",
                    s.running.load(Relaxed).to_string(),
                ),
                (
                    "hearth_kv_cache_blocks_used",
                    "KV-cache blocks held by sequences.",
                    "gauge",
                    used.to_string(),
                ),
                (
                    "hearth_kv_cache_blocks_total",
                    "KV-cache blocks in the pool.",
                    "gauge",
                    total.to_string(),
                ),
                (
                    "hearth_kv_cache_usage_ratio",
                    "Fraction of KV-cache blocks in use.",
                    "gauge",
                    format!("{}", used as f64 / total as f64),
                ),
                (
                    "hearth_preemptions_total",
                    "Sequences preempted (for lack of KV blocks, or to give a waiting key its share).",
                    "counter",
                    s.preemptions.load(Relaxed).to_string(),
                ),
                (
                    "hearth_engine_steps_total",
                    "Batched forward passes run.",
                    "counter",
                    s.steps.load(Relaxed).to_string(),
                ),
                (
                    "hearth_constraint_mask_seconds_total",
                    "Time spent computing grammar token masks (beside the forward pass).",
                    "counter",
                    format!("{}", s.mask_micros.load(Relaxed) as f64 / 1e6),
                ),
                (
                    "hearth_constraint_wait_seconds_total",
                    "Time steps waited for token masks after their forward pass.",
                    "counter",
                    format!("{}", s.mask_wait_micros.load(Relaxed) as f64 / 1e6),
                ),
                (
                    "hearth_engine_prompt_tokens_total",
                    "Prompt tokens run through the model, recomputation included.",
                    "counter",
                    s.prompt_tokens.load(Relaxed).to_string(),
                ),
            ] {
                gauge(&mut out, name, help, kind, v);
            }
        }
        gauge(
            &mut out,
            "hearth_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            "counter",
            self.prompt_tokens.load(Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "hearth_generation_tokens_total",
            "Tokens generated for finished requests.",
            "counter",
            self.completion_tokens.load(Relaxed).to_string(),
        );
        self.ttft.render(
            &mut out,
            "hearth_time_to_first_token_seconds",
            "From request received to first token generated.",
        );
        self.itl.render(
            &mut out,
            "hearth_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence.",
        );
        self.duration.render(
            &mut out,
            "hearth_request_duration_seconds",
            "From request received to its last token.",
        );
        gauge(
            &mut out,
            "hearth_open_connections",
            "Client connections open now.",
            "gauge",
            self.connections.open.load(Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "hearth_connections_refused_total",
            "Connections closed as soon as accepted: over --max-connections and its reserve, or out of file descriptors.",
            "counter",
            self.connections.refused.load(Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "hearth_connections_reserve_refused_total",
            "Requests answered 503 on a connection in the reserve above --max-connections (paths other than /health, /ready, /metrics).",
            "counter",
            self.connections.reserve_refused.load(Relaxed).to_string(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut out,
                "hearth_async_tasks",
                "Tasks alive in the HTTP runtime (connections, streams).",
                "gauge",
                rt.metrics().num_alive_tasks().to_string(),
            );
        }
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut out,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
                rss.to_string(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"));
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(s.contains("x_count 3\n"));
        assert!(s.contains("x_sum 5.55\n"));
    }
}
