//! What generation returns for one sequence: its tokens, their log-probabilities, its
//! score and why it ended. Below `generate` so that what consumes sequences
//! (`ensemble`'s pooled selection) does not depend on how they are made.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    Time,
    /// The caller ended it (`Engine::cancel`).
    Cancelled,
    /// No token could be picked under the request's own settings
    /// (`Engine::take_error` says why); only requests with their own settings end so,
    /// others fail the whole run.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Time => "time",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// One returned sequence: the generated tokens only, each token's log-probability under
/// the processed distribution, and the sequence score (beam: transformers'
/// `sequences_scores`; otherwise the sum of the log-probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f64>,
    pub score: f64,
    pub finish_reason: FinishReason,
    /// Per token, its log-probability under the model's own distribution and the most
    /// likely tokens' (only when `GenerationConfig::logprobs` asks; else empty).
    pub raw_logprobs: Vec<Logprobs>,
}

/// One generated token's log-probability under the model's raw scores, and the `n` most
/// likely tokens with theirs, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub logprob: f64,
    pub top: Vec<(i64, f64)>,
}

impl Generated {
    /// A sequence that ended before its first token.
    pub fn empty(finish_reason: FinishReason) -> Self {
        Self {
            tokens: vec![],
            logprobs: vec![],
            score: 0.0,
            finish_reason,
            raw_logprobs: vec![],
        }
    }
}
