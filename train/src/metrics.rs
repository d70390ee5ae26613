//! What a person sees of training: TensorBoard scalars (event files under `OUTPUT/runs/`,
//! see `events`), an indicatif progress bar on a terminal's stderr (step, loss, lr,
//! tokens/s, peak RSS, ETA), and plain log lines on stderr when it is not a terminal.
//!
//! A closed or full stderr loses these messages and nothing else: `eprintln!` would
//! panic there (Rust ignores SIGPIPE, so a closed pipe is an EPIPE write error), which
//! would end a training run before its final model is written. Every write goes
//! through `util::stderr_line`, and indicatif ignores its own write errors.
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::events::EventFile;
use crate::memory::peak_suffix;
use crate::util::stderr_line;

pub struct Metrics {
    /// None once a write failed: TensorBoard logs are lost then, not the run.
    tb: Option<EventFile>,
    bar: ProgressBar,
    /// A data-parallel rank other than 0: nothing is shown or written.
    quiet: bool,
}

impl Metrics {
    pub fn new(runs: &Path, progress: bool, total_steps: i64, done: i64) -> Result<Self> {
        std::fs::create_dir_all(runs).with_context(|| format!("creating {}", runs.display()))?;
        let tb = EventFile::create(runs)
            .with_context(|| format!("creating a TensorBoard event file in {}", runs.display()))?;
        let target = if progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total_steps.max(0) as u64), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} step {pos}/{len} · {msg} · {elapsed_precise} < {eta_precise}",
            )
            .expect("a valid template"),
        );
        bar.set_position(done.max(0) as u64);
        Ok(Self {
            tb: Some(tb),
            bar,
            quiet: false,
        })
    }

    /// Metrics that show and write nothing (the ranks of a data-parallel run but 0).
    pub fn quiet() -> Self {
        Self {
            tb: None,
            bar: ProgressBar::hidden(),
            quiet: true,
        }
    }

    /// Called after every step: the bar's position and message.
    pub fn step(&mut self, step: i64, loss: f64, lr: f64, tokens_per_s: f64) {
        self.bar.set_position(step as u64);
        self.bar.set_message(format!(
            "loss {loss:.4} · lr {lr:.3e} · {tokens_per_s:.0} tok/s{}",
            peak_suffix()
        ));
    }

    /// Called every logging step: TensorBoard scalars, and a plain line without a bar.
    pub fn log(&mut self, step: i64, loss: f64, lr: f64, grad_norm: f64, tokens_per_s: f64) {
        self.scalars(
            step,
            &[
                ("train/loss", loss),
                ("train/lr", lr),
                ("train/grad_norm", grad_norm),
                ("train/tokens_per_s", tokens_per_s),
            ],
            false,
        );
        if self.bar.is_hidden() && !self.quiet {
            stderr_line(&format!(
                "step {step}/{}: loss {loss:.4} · lr {lr:.3e} · grad_norm {grad_norm:.3} · {tokens_per_s:.0} tok/s{}",
                self.bar.length().unwrap_or(0),
                peak_suffix()
            ));
        }
    }

    /// Called after every eval: its loss and perplexity as TensorBoard scalars.
    pub fn eval(&mut self, step: i64, loss: f64, perplexity: f64) {
        self.scalars(
            step,
            &[("eval/loss", loss), ("eval/perplexity", perplexity)],
            true,
        );
    }

    fn scalars(&mut self, step: i64, values: &[(&str, f64)], flush: bool) {
        let Some(tb) = &mut self.tb else {
            return;
        };
        let written = values
            .iter()
            .try_for_each(|(tag, v)| tb.scalar(tag, *v as f32, step))
            .and_then(|()| if flush { tb.flush() } else { Ok(()) });
        if let Err(e) = written {
            let path = tb.path().display().to_string();
            self.tb = None;
            self.line(&format!(
                "warning: writing {path} failed ({e}); training goes on without TensorBoard logs"
            ));
        }
    }

    /// A message that does not tear the bar.
    pub fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            stderr_line(text);
        } else {
            self.bar.println(text);
        }
    }

    pub fn finish_bar(&self) {
        self.bar.finish_and_clear();
    }

    /// Flushes and closes the event file.
    pub fn finish(&mut self) {
        self.bar.finish_and_clear();
        if let Some(mut tb) = self.tb.take() {
            if let Err(e) = tb.flush() {
                stderr_line(&format!(
                    "warning: writing {} failed: {e}",
                    tb.path().display()
                ));
            }
        }
    }
}
