//! DiffKeeper keeps the file state of containerized apps as a compact
//! history of binary deltas in one small store, and rebuilds that state when
//! the container restarts.
//!
//! The crates follow the data's path:
//!
//! | stage | where | owns |
//! |---|---|---|
//! | kernel events | [`events`] (crate `diffkeeper-tracer`) | the embedded eBPF programs and their userspace half |
//! | coalescing, supervision | [`watch`], [`supervise`] (crate `diffkeeper-agent`) | write notices (eBPF, inotify, scanning) into batches, scheduled retention at quiet, consistent moments; `run` and `watch` |
//! | consistent cuts, change detection, capture / delta, replay, history, retention | [`engine`] (crate `diffkeeper-engine`) | see its table |
//! | store | [`store`] (crate `diffkeeper-store`) | the redb file; its format is documented in [`store::schema`], its chunk encodings in [`store::codec`] |
//!
//! This crate is the binary around them: [`cli`] (arguments, and what each
//! command prints), [`report`] (`log`, `log --batches`, `stats`) and
//! [`progress`] (bars on a terminal). The other crates' modules are
//! re-exported under their own names (`diffkeeper::capture`, ...).

pub mod cli;
pub mod progress;
pub mod report;

pub use diffkeeper_agent as agent;
pub use diffkeeper_agent::{supervise, watch};

pub use diffkeeper_engine as engine;
pub use diffkeeper_engine::{
    capture, freeze, history, meta, replay, retention, roots, scan, store, units, verify,
};
pub use diffkeeper_tracer as events;
pub use diffkeeper_tracer::mountinfo;
