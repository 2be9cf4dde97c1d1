//! Progress bars for long work, shown only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar that is hidden when stderr is not a terminal.
pub struct Progress(ProgressBar);

impl Progress {
    pub fn new(total: u64, label: &'static str) -> Progress {
        if !std::io::stderr().is_terminal() || total < 2 {
            return Progress(ProgressBar::hidden());
        }
        let bar = ProgressBar::new(total);
        let style =
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(label);
        Progress(bar)
    }

    pub fn inc(&self) {
        self.0.inc(1);
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
