//! `GET /metrics` in Prometheus' text exposition format (version 0.0.4): gauges of the
//! requests running and waiting, counters of tokens and finished requests, and
//! histograms of time to first token and end-to-end latency, named after vLLM's
//! (`vllm:num_requests_running`, ...) with a `gpt2kit:` prefix.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Shared between the scheduler (which updates it) and the handlers (which read it).
#[derive(Default)]
pub struct Metrics {
    /// Sequences in the engine / queued for it.
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sequences that finished, were cancelled (client gone or stop string), failed.
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Requests refused with 503 (queue full).
    pub rejected: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences the engine decodes at once (`--max-num-seqs`, or fewer where the memory
    /// left for KV caches holds fewer), and the bytes of their KV caches.
    pub num_seqs_max: AtomicUsize,
    pub kv_cache_bytes: AtomicUsize,
    /// The prefix cache's prompt tokens looked up and found, and its bytes held.
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_bytes: AtomicUsize,
    ttft: Mutex<Histogram>,
    e2e: Mutex<Histogram>,
    /// Why the model can no longer serve (a weight file changed under it), once it
    /// cannot: `/health` then answers 503 with it.
    broken: Mutex<Option<String>>,
}

impl Metrics {
    pub fn set_broken(&self, why: &str) {
        if let Ok(mut b) = self.broken.lock() {
            b.get_or_insert_with(|| why.to_string());
        }
    }

    pub fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }

    pub fn first_token(&self, seconds: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(seconds);
        }
    }

    pub fn end_to_end(&self, seconds: f64) {
        if let Ok(mut h) = self.e2e.lock() {
            h.observe(seconds);
        }
    }

    /// Takes the prefix cache's counts.
    pub fn prefix_cache(&self, c: &infer::prefix::PrefixCache) {
        self.prefix_queries
            .store(c.queried_tokens, Ordering::Relaxed);
        self.prefix_hits.store(c.hit_tokens, Ordering::Relaxed);
        self.prefix_bytes.store(c.used(), Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let gauges = [
            (
                "num_requests_running",
                "Sequences decoding now.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "num_requests_waiting",
                "Sequences queued for a slot.",
                self.waiting.load(Ordering::Relaxed),
            ),
            (
                "prefix_cache_bytes",
                "Bytes of keys and values the prefix cache holds.",
                self.prefix_bytes.load(Ordering::Relaxed),
            ),
            (
                "num_seqs_max",
                "Sequences decoded at once at most (--max-num-seqs, or what memory holds).",
                self.num_seqs_max.load(Ordering::Relaxed),
            ),
            (
                "kv_cache_bytes",
                "Bytes of the decoding sequences' KV caches, allocated at start.",
                self.kv_cache_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP gpt2kit:{name} {help}\n# TYPE gpt2kit:{name} gauge\ngpt2kit:{name} {v}"
            );
        }
        let counters = [
            (
                "prompt_tokens_total",
                "Prompt tokens prefilled.",
                load(&self.prompt_tokens),
            ),
            (
                "generation_tokens_total",
                "Tokens generated.",
                load(&self.generated_tokens),
            ),
            (
                "request_success_total",
                "Sequences that finished.",
                load(&self.finished),
            ),
            (
                "request_cancelled_total",
                "Sequences ended early (client gone, stop string).",
                load(&self.cancelled),
            ),
            (
                "request_failed_total",
                "Sequences whose generation failed.",
                load(&self.failed),
            ),
            (
                "request_rejected_total",
                "Requests refused because the queue was full.",
                load(&self.rejected),
            ),
            ("engine_steps_total", "Engine steps run.", load(&self.steps)),
            (
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                load(&self.prefix_queries),
            ),
            (
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (not prefilled again).",
                load(&self.prefix_hits),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP gpt2kit:{name} {help}\n# TYPE gpt2kit:{name} counter\ngpt2kit:{name} {v}"
            );
        }
        if let Ok(h) = self.ttft.lock() {
            h.write(
                &mut out,
                "gpt2kit:time_to_first_token_seconds",
                "From arrival to the first generated token.",
            );
        }
        if let Ok(h) = self.e2e.lock() {
            h.write(
                &mut out,
                "gpt2kit:e2e_request_latency_seconds",
                "From arrival to the last generated token.",
            );
        }
        out
    }
}
