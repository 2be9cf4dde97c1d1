//! DiffKeeper's agent: what runs beside an app and keeps its state
//! directories captured.
//!
//! | part | module | owns |
//! |---|---|---|
//! | backends and coalescing | [`watch`] | write notices (eBPF, inotify, scanning) turned into batches at quiet, consistent moments, and scheduled retention |
//! | supervision | [`supervise`] | `run` (an app, its signals, its orphans, its stop) and `watch` (until a signal) |
//!
//! It drives the engine (`diffkeeper-engine`) and the tracer
//! (`diffkeeper-tracer`), whose modules it re-exports under their own names
//! so its code reads `crate::capture`, `crate::events`, ... It knows no
//! command line: the binary turns arguments into [`watch::WatchOptions`].
//! Its failures are [`AgentError`]s, which keep the engine's and the
//! tracer's errors as they are.

pub mod containers;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod supervise;
pub mod watch;

pub use error::{AgentError, Result};

pub use diffkeeper_engine::{capture, freeze, history, replay, retention, roots, scan, store};
pub use diffkeeper_tracer as events;
