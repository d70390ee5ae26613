//! The prefix cache: keys and values of recent prompts, kept so that a prompt sharing a
//! prefix with one of them (a few-shot preamble, a system prompt) prefills only the rest.
//! Bounded by bytes, least recently used evicted first. Entries are keyed by the LoRA
//! adapter the prompt ran with too (`model::lora`): the same tokens under another
//! adapter (or the base) have other keys and values, and never match.
//!
//! Exactness: a reused prefix holds the keys and values computed when its first prompt
//! was prefilled. A prompt that reuses it gets the tokens of that prompt prefilled in two
//! pieces (the prefix, then the rest), which can differ from one pass over the whole
//! prompt by rounding in the matrix products: where two candidates are within rounding of
//! each other, a greedy token may differ from the same request with the cache off.
use crate::cache::KvRows;

/// One cached prompt: its tokens and, per model of the ensemble, its keys and values.
struct Entry {
    adapter: Option<usize>,
    tokens: Vec<i64>,
    kv: Vec<KvRows>,
    bytes: usize,
    last_used: u64,
}

/// Prompts' keys and values under a byte budget.
pub struct PrefixCache {
    budget: usize,
    used: usize,
    entries: Vec<Entry>,
    clock: u64,
    /// Prompt tokens looked up, and of them, tokens found cached (vLLM counts the same).
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

/// Prompts shorter than this are not kept: their prefill is cheap, and a hit shorter than
/// this saves less than looking it up and copying it costs.
pub const MIN_PREFIX: usize = 16;

impl PrefixCache {
    /// A cache of at most `budget` bytes of keys and values.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            entries: Vec::new(),
            clock: 0,
            queried_tokens: 0,
            hit_tokens: 0,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The longest cached prefix of `prompt` that leaves at least its last token to
    /// prefill (whose hidden state the first new token needs): its length and keys and
    /// values, per model. `None` below `MIN_PREFIX` tokens. Only entries of `adapter`.
    pub fn lookup(&mut self, adapter: Option<usize>, prompt: &[i64]) -> Option<(usize, &[KvRows])> {
        self.queried_tokens += prompt.len() as u64;
        let limit = prompt.len().saturating_sub(1);
        let (best, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if n < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        self.hit_tokens += n as u64;
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some((n, &e.kv))
    }

    /// Whether `prompt` under `adapter` is worth keeping: long enough, and not already
    /// held whole.
    pub fn wants(&self, adapter: Option<usize>, prompt: &[i64]) -> bool {
        self.budget > 0
            && prompt.len() >= MIN_PREFIX
            && !self
                .entries
                .iter()
                .any(|e| e.adapter == adapter && e.tokens.starts_with(prompt))
    }

    /// Keeps `tokens`' keys and values (per model) under `adapter`, evicting the least
    /// recently used entries to make room, and any entry of `adapter` that is a prefix of
    /// `tokens` (this one holds it). Nothing is kept when it alone is over the budget.
    pub fn insert(&mut self, adapter: Option<usize>, tokens: Vec<i64>, kv: Vec<KvRows>) {
        let bytes: usize = kv.iter().map(KvRows::bytes).sum();
        if bytes > self.budget {
            return;
        }
        self.entries.retain(|e| {
            let covered = e.adapter == adapter && tokens.starts_with(&e.tokens);
            if covered {
                self.used -= e.bytes;
            }
            !covered
        });
        while self.used + bytes > self.budget {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
            else {
                break;
            };
            self.used -= self.entries.swap_remove(oldest).bytes;
        }
        self.clock += 1;
        self.used += bytes;
        self.entries.push(Entry {
            adapter,
            tokens,
            kv,
            bytes,
            last_used: self.clock,
        });
    }
}

fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    fn rows(len: i64) -> Vec<KvRows> {
        let t = || {
            vec![vec![Tensor::zeros(
                [2, len, 4],
                (Kind::Float, tch::Device::Cpu),
            )]]
        };
        vec![KvRows {
            k: t(),
            v: t(),
            len,
        }]
    }

    #[test]
    fn longest_prefix_wins_and_the_budget_evicts_the_least_recent() {
        let bytes_per_token = 2 * 2 * 4 * 4; // k and v, 2 heads × 4 floats × 4 bytes
        let mut c = PrefixCache::new(100 * bytes_per_token);
        let a: Vec<i64> = (0..40).collect();
        let mut b: Vec<i64> = (0..30).collect();
        b.extend(100..130);
        c.insert(None, a.clone(), rows(40));
        c.insert(None, b.clone(), rows(60));
        assert_eq!(c.used(), 100 * bytes_per_token);
        // Shares 35 tokens with a, 30 with b; the whole of a but its last token.
        let mut p: Vec<i64> = (0..35).collect();
        p.push(7);
        assert_eq!(c.lookup(None, &p).map(|(n, _)| n), Some(35));
        assert_eq!(
            c.lookup(None, &a).map(|(n, _)| n),
            Some(39),
            "the last token is left to prefill"
        );
        assert_eq!(
            c.lookup(None, &(0..10).collect::<Vec<_>>()).map(|(n, _)| n),
            None,
            "under MIN_PREFIX"
        );
        // b is now the least recently used: a new 30-token entry evicts it, not a.
        c.insert(None, (500..530).collect(), rows(30));
        assert_eq!(
            c.lookup(None, &b).map(|(n, _)| n),
            Some(30),
            "b's first 30 are a's"
        );
        assert_eq!(c.used(), 70 * bytes_per_token);
        // A longer prompt replaces the entry it extends.
        let mut a2 = a.clone();
        a2.extend(200..210);
        c.insert(None, a2.clone(), rows(50));
        assert_eq!(c.used(), 80 * bytes_per_token);
        assert!(!c.wants(None, &a), "held whole by a2");
        assert!(c.wants(Some(0), &a), "not under another adapter");
        assert_eq!(c.queried_tokens, (36 + 40 + 10 + 60) as u64);
        assert_eq!(c.hit_tokens, (35 + 39 + 30) as u64);
        assert_eq!(
            c.lookup(Some(0), &a2).map(|(n, _)| n),
            None,
            "the same tokens under an adapter have other keys and values"
        );
        c.insert(Some(0), a2.clone(), rows(50));
        assert_eq!(c.lookup(Some(0), &a2).map(|(n, _)| n), Some(49));
        assert_eq!(c.lookup(None, &a2).map(|(n, _)| n), Some(49));
    }
}
