//! Progress bars for the engine's long work, shown only when stderr is a
//! terminal (installed by `main`, see `diffkeeper_engine::progress`).

use std::io::IsTerminal;

use diffkeeper_engine::progress::{Display, Shown};
use indicatif::{ProgressBar, ProgressStyle};

/// Draws a bar on stderr when it is a terminal.
pub struct Bars;

impl Display for Bars {
    fn start(&self, total: u64, label: &'static str) -> Box<dyn Shown> {
        if !std::io::stderr().is_terminal() || total < 2 {
            return Box::new(Bar(ProgressBar::hidden()));
        }
        let bar = ProgressBar::new(total);
        let style =
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(label);
        Box::new(Bar(bar))
    }
}

struct Bar(ProgressBar);

impl Shown for Bar {
    fn inc(&self) {
        self.0.inc(1);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
