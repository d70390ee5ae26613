//! Logits processors and warpers, with transformers' semantics and in its order
//! (`generation/utils.py::_get_logits_processor`, `generation/logits_process.py`):
//! sequence bias → repetition penalty → (OpenAI/vLLM presence and frequency penalties)
//! → no-repeat n-gram → bad words → min length → min new tokens → forced EOS →
//! suppressed tokens → tokens suppressed at the beginning; then, only when sampling,
//! temperature → top-k → top-p → min-p → typical-p → epsilon → eta.
//!
//! Each row's history is its own tokens (prompt and generated, never padding), so a
//! prompt in a padded batch is processed exactly as alone. (transformers includes the
//! pad tokens of a left-padded batch in `input_ids`: its repetition penalty then also
//! penalises the pad id and its min_length counts the padding.)
use std::collections::{HashMap, HashSet};

use tch::{Device, Kind, Tensor};

/// The knobs of decoding, with Hugging Face `GenerationConfig` names and defaults.
#[derive(Debug, Clone)]
pub struct Processing {
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables.
    pub top_k: i64,
    pub top_p: f64,
    pub min_p: Option<f64>,
    pub typical_p: f64,
    pub epsilon_cutoff: f64,
    pub eta_cutoff: f64,
    pub repetition_penalty: f64,
    /// Over generated tokens only, as OpenAI and vLLM define them.
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub bad_words_ids: Vec<Vec<i64>>,
    /// Counts the prompt, as transformers' `min_length`.
    pub min_length: usize,
    pub min_new_tokens: usize,
    /// transformers' `sequence_bias`: (tokens, bias) added to the last token's score when
    /// the history ends with the others (always, for one token).
    pub sequence_bias: Vec<(Vec<i64>, f64)>,
    /// `forced_eos_token_id`: the only tokens allowed as a sequence's last (at its length
    /// limit).
    pub forced_eos_token_id: Vec<i64>,
    /// `suppress_tokens`: never generated.
    pub suppress_tokens: Vec<i64>,
    /// `begin_suppress_tokens`: not generated as the first new token.
    pub begin_suppress_tokens: Vec<i64>,
    /// Warpers keep at least this many tokens (transformers: 1, or n_eos + 1 under beams).
    pub min_tokens_to_keep: i64,
}

impl Default for Processing {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            typical_p: 1.0,
            epsilon_cutoff: 0.0,
            eta_cutoff: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            no_repeat_ngram_size: 0,
            bad_words_ids: Vec::new(),
            min_length: 0,
            min_new_tokens: 0,
            sequence_bias: Vec::new(),
            forced_eos_token_id: Vec::new(),
            suppress_tokens: Vec::new(),
            begin_suppress_tokens: Vec::new(),
            min_tokens_to_keep: 1,
        }
    }
}

/// One row's history: its tokens (prompt then generated) and where the prompt ends.
pub struct Row<'a> {
    pub tokens: &'a [i64],
    pub prompt_len: usize,
    /// How many tokens the row may generate in all (for `forced_eos_token_id`:
    /// transformers forces at `max_length - 1`); `usize::MAX`: no limit.
    pub limit: usize,
}

/// Applies every enabled processor to `scores` (B, V) float, returning new scores.
pub fn process(p: &Processing, scores: &Tensor, rows: &[Row], eos: &[i64]) -> Tensor {
    let batch = Batch::new(scores, rows);
    let mut s = scores.shallow_clone();
    if !p.sequence_bias.is_empty() {
        s = batch.add_sequence_bias(s, &p.sequence_bias);
    }
    if p.repetition_penalty != 1.0 {
        s = batch.penalise_repetition(s, p.repetition_penalty);
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        s = batch.penalise_generated(s, p.presence_penalty, p.frequency_penalty);
    }
    if p.no_repeat_ngram_size > 0 {
        let n = p.no_repeat_ngram_size;
        s = batch.ban(&s, &|r| banned_ngram_tokens(r.tokens, n));
    }
    if !p.bad_words_ids.is_empty() {
        let banned = |r: &Row| {
            p.bad_words_ids
                .iter()
                .filter(|w| !w.is_empty() && r.tokens.ends_with(&w[..w.len() - 1]))
                .map(|w| w[w.len() - 1])
                .collect()
        };
        s = batch.ban(&s, &banned);
    }
    let too_short =
        |r: &Row| r.tokens.len() < p.min_length || r.tokens.len() - r.prompt_len < p.min_new_tokens;
    if p.min_length > 0 || p.min_new_tokens > 0 {
        let eos_if_short = |r: &Row| {
            if too_short(r) {
                eos.to_vec()
            } else {
                Vec::new()
            }
        };
        s = batch.ban(&s, &eos_if_short);
    }
    if !p.forced_eos_token_id.is_empty() {
        s = batch.force_eos(s, &p.forced_eos_token_id);
    }
    if !p.suppress_tokens.is_empty() {
        s = batch.ban(&s, &|_| p.suppress_tokens.clone());
    }
    if !p.begin_suppress_tokens.is_empty() {
        let at_begin = |r: &Row| {
            if r.tokens.len() == r.prompt_len {
                p.begin_suppress_tokens.clone()
            } else {
                Vec::new()
            }
        };
        s = batch.ban(&s, &at_begin);
    }
    if p.do_sample {
        s = warp(p, &s);
    }
    s
}

/// The rows of a (B, V) score tensor and the cell-indexing the processors share.
struct Batch<'r, 'a> {
    rows: &'r [Row<'a>],
    b: i64,
    v: i64,
    device: Device,
}

impl<'r, 'a> Batch<'r, 'a> {
    fn new(scores: &Tensor, rows: &'r [Row<'a>]) -> Self {
        let (b, v) = scores.size2().expect("scores are (B, V)");
        Self {
            rows,
            b,
            v,
            device: scores.device(),
        }
    }

    /// The listed (row, token) cells as an index of (B, V) tensors.
    fn index_of(&self, cells: &[(i64, i64)]) -> [Option<Tensor>; 2] {
        let (r, c): (Vec<i64>, Vec<i64>) = cells.iter().copied().unzip();
        [
            Some(Tensor::from_slice(&r).to_device(self.device)),
            Some(Tensor::from_slice(&c).to_device(self.device)),
        ]
    }

    /// A (B, V) mask that is true at the listed cells.
    fn mask_of(&self, cells: &[(i64, i64)]) -> Tensor {
        let mask = Tensor::zeros([self.b, self.v], (Kind::Bool, self.device));
        mask.index_put(
            &self.index_of(cells),
            &Tensor::from(true).to_device(self.device),
            false,
        )
    }

    /// Puts `value` at the listed cells (a copy of s with them written: one pass over the
    /// scores, where a mask and `masked_fill` took three).
    fn fill(&self, s: &Tensor, cells: &[(i64, i64)], value: f64) -> Tensor {
        if cells.is_empty() {
            return s.shallow_clone();
        }
        let value = Tensor::from(value).to_kind(s.kind()).to_device(self.device);
        s.index_put(&self.index_of(cells), &value, false)
    }

    /// The cells (row, token) of the in-vocabulary tokens `f` lists for each row.
    fn cells(&self, f: &dyn Fn(&Row) -> Vec<i64>) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for (i, row) in self.rows.iter().enumerate() {
            out.extend(
                f(row)
                    .into_iter()
                    .filter(|&t| (0..self.v).contains(&t))
                    .map(|t| (i as i64, t)),
            );
        }
        out
    }

    /// Sets to -inf the in-vocabulary tokens `f` lists for each row.
    fn ban(&self, s: &Tensor, f: &dyn Fn(&Row) -> Vec<i64>) -> Tensor {
        self.fill(s, &self.cells(f), f64::NEG_INFINITY)
    }

    /// `sequence_bias`: each bias added to its last token where the row ends with the
    /// others.
    fn add_sequence_bias(&self, s: Tensor, sequence_bias: &[(Vec<i64>, f64)]) -> Tensor {
        let mut cells = Vec::new();
        let mut bias = Vec::new();
        for (i, row) in self.rows.iter().enumerate() {
            for (seq, b) in sequence_bias {
                let (last, prefix) = seq.split_last().expect("validated: not empty");
                if (0..self.v).contains(last) && row.tokens.ends_with(prefix) {
                    cells.push((i as i64, *last));
                    bias.push(*b as f32);
                }
            }
        }
        if cells.is_empty() {
            return s;
        }
        let bias = Tensor::from_slice(&bias)
            .to_device(self.device)
            .to_kind(s.kind());
        s.index_put(&self.index_of(&cells), &bias, true)
    }

    /// transformers' repetition penalty over each row's whole history: a seen token's
    /// score is divided by `pen` when positive, multiplied when negative.
    fn penalise_repetition(&self, s: Tensor, pen: f64) -> Tensor {
        let seen = self.cells(&|r| unique(r.tokens));
        if seen.is_empty() {
            return s;
        }
        let mask = self.mask_of(&seen);
        // tch's `a.where_self(cond, b)` is torch.where(cond, a, b).
        let penalised = (&s * pen).where_self(&s.lt(0.0), &(&s / pen));
        penalised.where_self(&mask, &s)
    }

    /// OpenAI's presence and frequency penalties, over each row's generated tokens.
    fn penalise_generated(&self, s: Tensor, presence: f64, frequency: f64) -> Tensor {
        let (b, v) = (self.b, self.v);
        let mut counts = vec![0f32; (b * v) as usize];
        for (i, row) in self.rows.iter().enumerate() {
            for &t in &row.tokens[row.prompt_len..] {
                if (0..v).contains(&t) {
                    counts[i * v as usize + t as usize] += 1.0;
                }
            }
        }
        let counts = Tensor::from_slice(&counts)
            .view([b, v])
            .to_device(self.device);
        &s - &counts * frequency - counts.gt(0.0).to_kind(Kind::Float) * presence
    }

    /// `forced_eos_token_id`: rows one token short of their limit may only end.
    fn force_eos(&self, s: Tensor, forced_eos: &[i64]) -> Tensor {
        let at_last: Vec<i64> = (0..self.rows.len() as i64)
            .filter(|&i| {
                let r = &self.rows[i as usize];
                r.tokens.len() - r.prompt_len + 1 == r.limit
            })
            .collect();
        if at_last.is_empty() {
            return s;
        }
        let mut forced = Tensor::full([self.v], f64::NEG_INFINITY, (s.kind(), self.device));
        let ids: Vec<i64> = forced_eos
            .iter()
            .copied()
            .filter(|t| (0..self.v).contains(t))
            .collect();
        let _ = forced.index_fill_(0, &Tensor::from_slice(&ids).to_device(self.device), 0.0);
        let at_last = Tensor::from_slice(&at_last).to_device(self.device);
        s.index_put(&[Some(at_last)], &forced, false)
    }
}

/// The sampling warpers, in transformers' order.
pub fn warp(p: &Processing, scores: &Tensor) -> Tensor {
    let v = *scores.size().last().unwrap();
    let keep = p.min_tokens_to_keep;
    let ninf = f64::NEG_INFINITY;
    let mut s = scores.shallow_clone();
    if p.temperature != 1.0 {
        s = &s / p.temperature;
    }
    // The k-th largest score per row: (B, 1).
    let kth = |s: &Tensor, k: i64| {
        s.topk(k.min(v), -1, true, true)
            .0
            .narrow(-1, k.min(v) - 1, 1)
    };
    // At most this many scores per row can be above -inf (top-k's survivors), and
    // top-k's own (values, indices), descending, when they are exactly those.
    let mut live = v;
    let mut survivors = None;
    if p.top_k != 0 {
        let k = p.top_k.max(keep).min(v);
        let (top, idx) = s.topk(k, -1, true, true);
        let remove = s.lt_tensor(&top.narrow(-1, k - 1, 1));
        // Ties with the k-th score survive too: count them.
        let removed = remove
            .sum_dim_intlist([-1].as_slice(), false, Kind::Int64)
            .min();
        live = v - i64::try_from(removed).unwrap_or(0);
        s = s.masked_fill(&remove, ninf);
        if live == k {
            survivors = Some((top, idx));
        }
    }
    if p.top_p < 1.0 {
        // Ascending sort; drop the low tail whose mass is ≤ 1 - top_p. Only the `live`
        // largest scores can be kept: the rest are -inf, with no mass, removed whatever
        // their place in the sort. So after top-k, sorting its survivors (topk, reversed)
        // replaces a sort of the whole vocabulary (~8 ms a step at 50257 tokens).
        let n = live.max(keep.min(v));
        let (sorted, idx) = if n < v {
            // Top-k's survivors are exactly the n = live = k largest when it kept them.
            let (top, idx) = survivors
                .take()
                .unwrap_or_else(|| s.topk(n, -1, true, true));
            (top.flip([-1]), idx.flip([-1]))
        } else {
            s.sort(-1, false)
        };
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cum.le(1.0 - p.top_p);
        let _ = remove.narrow(-1, n - keep.min(n), keep.min(n)).fill_(0);
        // Back to vocabulary order (idx covers the whole row when n = v).
        let base = if n < v {
            Tensor::zeros(s.size(), (Kind::Bool, s.device()))
        } else {
            remove.shallow_clone()
        };
        s = s.masked_fill(&base.scatter(1, &idx, &remove), ninf);
    }
    if let Some(min_p) = p.min_p {
        let probs = s.softmax(-1, Kind::Float);
        let top = probs.amax([-1].as_slice(), true);
        let remove = probs.lt_tensor(&(top * min_p));
        let top_idx = probs.topk(keep.min(v), -1, true, true).1;
        let remove = remove.scatter_value(-1, &top_idx, 0);
        s = s.masked_fill(&remove, ninf);
    }
    if p.typical_p < 1.0 {
        let logp = s.log_softmax(-1, Kind::Float);
        let prob = logp.exp();
        let ent = -(&logp * &prob).nansum([-1].as_slice(), true, Kind::Float);
        let shifted = (-&logp - ent).abs();
        let (sorted_shift, idx) = shifted.sort(-1, false);
        let cum = s
            .gather(-1, &idx, false)
            .softmax(-1, Kind::Float)
            .cumsum(-1, Kind::Float);
        let last = cum
            .lt(p.typical_p)
            .sum_dim_intlist([1].as_slice(), true, Kind::Int64)
            .clamp_max(v - 1);
        let remove = sorted_shift.gt_tensor(&sorted_shift.gather(1, &last, false));
        let _ = remove.narrow(-1, 0, keep.min(v)).fill_(0);
        let remove = remove.scatter(1, &idx, &remove);
        s = s.masked_fill(&remove, ninf);
    }
    if 0.0 < p.epsilon_cutoff && p.epsilon_cutoff < 1.0 {
        let remove = s
            .softmax(-1, Kind::Float)
            .lt(p.epsilon_cutoff)
            .logical_and(&s.lt_tensor(&kth(&s, keep)));
        s = s.masked_fill(&remove, ninf);
    }
    if 0.0 < p.eta_cutoff && p.eta_cutoff < 1.0 {
        let logp = s.log_softmax(-1, Kind::Float);
        // Entropy as torch.distributions.Categorical computes it (-inf·0 counts as 0).
        let plogp = (&logp * logp.exp()).nan_to_num(0.0, None, None);
        let ent = -plogp.sum_dim_intlist([-1].as_slice(), true, Kind::Float);
        let eps = p.eta_cutoff;
        let eta = (-ent)
            .exp()
            .f_mul_scalar(eps.sqrt())
            .unwrap()
            .clamp_max(eps);
        let remove = s
            .softmax(-1, Kind::Float)
            .lt_tensor(&eta)
            .logical_and(&s.lt_tensor(&kth(&s, keep)));
        s = s.masked_fill(&remove, ninf);
    }
    s
}

fn unique(tokens: &[i64]) -> Vec<i64> {
    let set: HashSet<i64> = tokens.iter().copied().collect();
    set.into_iter().collect()
}

/// Tokens that would complete an n-gram already present in `tokens`.
fn banned_ngram_tokens(tokens: &[i64], n: usize) -> Vec<i64> {
    if tokens.len() + 1 < n {
        return Vec::new();
    }
    let mut seen: HashMap<&[i64], Vec<i64>> = HashMap::new();
    for w in tokens.windows(n) {
        seen.entry(&w[..n - 1]).or_default().push(w[n - 1]);
    }
    let prefix = &tokens[tokens.len() + 1 - n..];
    seen.get(prefix).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_bans_follow_the_last_n_minus_one_tokens() {
        assert_eq!(banned_ngram_tokens(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert_eq!(banned_ngram_tokens(&[1, 2, 3, 1], 2), vec![2]);
        assert!(banned_ngram_tokens(&[1, 2], 3).is_empty());
        // n = 1 bans every token seen.
        let mut one = banned_ngram_tokens(&[5, 6, 5], 1);
        one.sort();
        assert_eq!(one, vec![5, 5, 6]);
    }

    #[test]
    fn bias_forced_eos_and_suppression_follow_the_history() {
        let p = Processing {
            sequence_bias: vec![(vec![1], 0.5), (vec![2, 3], -2.0), (vec![9, 3], 7.0)],
            forced_eos_token_id: vec![4],
            suppress_tokens: vec![0],
            begin_suppress_tokens: vec![1],
            ..Processing::default()
        };
        let scores = Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu));
        // Row 0: prompt only (begin suppression); row 1: ends with 2 (bias on 3); row 2:
        // one token left of its limit of 3 (forced EOS).
        let rows = [
            Row {
                tokens: &[7, 2],
                prompt_len: 2,
                limit: 3,
            },
            Row {
                tokens: &[7, 5, 2],
                prompt_len: 2,
                limit: 3,
            },
            Row {
                tokens: &[7, 5, 6],
                prompt_len: 1,
                limit: 3,
            },
        ];
        let out = process(&p, &scores, &rows, &[]);
        let got: Vec<Vec<f32>> = Vec::try_from(out).unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(got[0], vec![ninf, ninf, 0.0, -2.0, 0.0]);
        assert_eq!(got[1], vec![ninf, 0.5, 0.0, -2.0, 0.0]);
        assert_eq!(got[2], vec![ninf, ninf, ninf, ninf, 0.0]);
        // With no length limit, nothing is forced.
        let unlimited = Row {
            limit: usize::MAX,
            ..rows[2]
        };
        let free = process(&p, &scores, &[unlimited], &[]);
        assert_eq!(
            Vec::<Vec<f32>>::try_from(free).unwrap()[0],
            vec![ninf, 0.5, 0.0, 0.0, 0.0]
        );
    }
}
