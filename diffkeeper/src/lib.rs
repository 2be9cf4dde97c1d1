//! DiffKeeper keeps the file state of containerized apps as a compact
//! history of binary deltas in one small store, and rebuilds that state when
//! the container restarts.
//!
//! The modules follow the data's path:
//!
//! | stage | module | owns |
//! |---|---|---|
//! | kernel events | [`events`] (crate `diffkeeper-tracer`) | the embedded eBPF programs and their userspace half |
//! | coalescing | [`watch`] | write notices (eBPF, inotify, scanning) into batches, and scheduled retention at quiet, consistent moments |
//! | consistent cuts | [`freeze`] | freezing the app's cgroups while a batch is read, and the watchdog that always thaws them |
//! | change detection | [`scan`] | walking a state directory and diffing it with the store |
//! | capture / delta | [`capture`] | chunking, hashing, de-duplication, delta and compression, one batch per transaction |
//! | store | [`store`] (crate `diffkeeper-store`) | the redb file; its format is documented in [`store::schema`], its chunk encodings in [`store::codec`] |
//! | replay | [`replay`] | rebuilding a state directory at any kept moment, verified, confined to it |
//! | history | [`history`] | naming moments, `diff` between them, `export` as tar |
//! | retention | [`retention`] | which batches a policy keeps; compaction of the rest |
//!
//! Around them: [`roots`] (state directories and path safety), [`meta`]
//! (owner and extended attributes, read on capture and applied on replay), [`verify`],
//! [`report`] (`log`, `log --batches`, `stats`), [`supervise`] (`run`, `watch`), [`progress`]
//! and [`cli`].

pub mod capture;
pub mod cli;
pub use diffkeeper_tracer as events;
pub mod freeze;
pub mod history;
pub mod meta;
pub use diffkeeper_tracer::mountinfo;
pub mod progress;
pub mod replay;
pub mod report;
pub mod retention;
pub mod roots;
pub mod scan;
pub use diffkeeper_store as store;
pub mod supervise;
pub mod verify;
pub mod watch;
