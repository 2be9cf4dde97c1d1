//! How long work (capture, replay, verify) says how far it got. The engine
//! only counts; what the counts look like is the caller's: the `diffkeeper`
//! binary installs a [`Display`] that draws a bar on a terminal, and
//! without one nothing is shown.

use std::sync::OnceLock;

/// Shows one piece of long work: `total` steps, named by `label`.
pub trait Display: Send + Sync {
    fn start(&self, total: u64, label: &'static str) -> Box<dyn Shown>;
}

/// One piece of long work being shown.
pub trait Shown: Send + Sync {
    /// One more step done.
    fn inc(&self);
    /// Done: the display goes away.
    fn finish(&self);
}

static DISPLAY: OnceLock<Box<dyn Display>> = OnceLock::new();

/// Sets how this process shows progress, once (later calls are ignored).
pub fn show_with(display: Box<dyn Display>) {
    let _ = DISPLAY.set(display);
}

/// The progress of one piece of long work.
pub struct Progress(Option<Box<dyn Shown>>);

impl Progress {
    pub fn new(total: u64, label: &'static str) -> Progress {
        Progress(DISPLAY.get().map(|display| display.start(total, label)))
    }

    pub fn inc(&self) {
        if let Some(shown) = &self.0 {
            shown.inc();
        }
    }

    pub fn finish(&self) {
        if let Some(shown) = &self.0 {
            shown.finish();
        }
    }
}
