//! A choice's text as its tokens arrive: what may be sent so far, and where a stop string
//! ends it. Text is held back while it ends in an incomplete UTF-8 character (U+FFFD) or
//! in what could be the start of a stop string, so that streamed pieces add up to the
//! final text and never show a stop string (OpenAI leaves it out). End-of-sequence
//! tokens are not text (vLLM's `skip_special_tokens`), but count as generated.
use infer::Tokenizer;

pub struct ChoiceText {
    /// Generated tokens that make text (EOS and stop token ids left out).
    tokens: Vec<i64>,
    /// Every generated token, for `usage`.
    pub generated: usize,
    /// Every generated token up to the end (a stop string's included), EOS included.
    pub all: Vec<i64>,
    /// Bytes of the text already handed out.
    sent: usize,
    stops: Vec<String>,
    /// Token ids that end the sequence without being text.
    pub enders: Vec<i64>,
    /// Set once a stop string was found.
    pub stopped: bool,
    text: String,
}

impl ChoiceText {
    pub fn new(stops: Vec<String>, enders: Vec<i64>) -> Self {
        Self {
            tokens: Vec::new(),
            generated: 0,
            all: Vec::new(),
            sent: 0,
            stops,
            enders,
            stopped: false,
            text: String::new(),
        }
    }

    /// Takes a token; returns the text that may be sent now (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, token: i64) -> String {
        if self.stopped {
            return String::new();
        }
        self.generated += 1;
        self.all.push(token);
        if self.enders.contains(&token) {
            return String::new();
        }
        self.tokens.push(token);
        self.text = tok.decode(&self.tokens).unwrap_or_default();
        if let Some(at) = self.first_stop() {
            self.stopped = true;
            self.text.truncate(at);
            return self.take(at);
        }
        let end = self.text.trim_end_matches('\u{FFFD}').len();
        let mut safe = end;
        // The longest end of the text that begins a stop string stays back.
        for s in &self.stops {
            let held: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(1).collect();
            let longest = held
                .into_iter()
                .rev()
                .find(|&i| self.text[..end].ends_with(&s[..i]));
            if let Some(i) = longest {
                safe = safe.min(end - i);
            }
        }
        self.take(safe)
    }

    /// Where the earliest stop string starts, if the text holds one.
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.sent);
        let piece = self.text[self.sent..upto].to_string();
        self.sent = upto;
        piece
    }

    /// The sequence ended: the rest of the text.
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }
}
