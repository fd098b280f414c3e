//! Progress bars on stderr and the closing throughput line.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Instant;

pub struct Progress {
    bar: ProgressBar,
    start: Instant,
}

impl Progress {
    pub fn new(total: usize, what: &str) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress {
            bar,
            start: Instant::now(),
        }
    }

    /// For runs whose total is not known in advance (a bound sweep that may extend).
    pub fn set_length_unknown(&self) {
        self.bar.set_length(u64::MAX);
        self.bar.set_style(
            ProgressStyle::with_template("{msg} {pos} {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }

    pub fn inc(&self, n: usize) {
        self.bar.inc(n as u64);
    }

    /// Clears the bar and prints `done: N prompts, T tokens, X tokens/s` to stderr.
    pub fn finish(self, prompts: usize, tokens: usize, what: &str) -> f64 {
        self.bar.finish_and_clear();
        let secs = self.start.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {prompts} prompts, {tokens} tokens in {secs:.2} s, {:.1} tokens/s",
            tokens as f64 / secs.max(1e-9)
        );
        secs
    }
}
