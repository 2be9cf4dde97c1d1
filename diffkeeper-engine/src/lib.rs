//! DiffKeeper's engine: what happens to a state directory between the
//! kernel's reports and the store, and back. It knows no command line, no
//! async runtime and no eBPF: the agent (`diffkeeper::watch`) decides when
//! to capture, the binary how results look.
//!
//! | stage | module | owns |
//! |---|---|---|
//! | consistent cuts | [`freeze`] | freezing the writers' cgroups while a batch is read, and the watchdog that always thaws them |
//! | change detection | [`scan`] | walking a state directory and diffing it with the store |
//! | capture / delta | [`capture`] | chunking, hashing, de-duplication, delta and compression, one batch per transaction |
//! | replay | [`replay`] | rebuilding a state directory at any kept moment, verified, confined to it |
//! | history | [`history`] | naming moments, `diff` between them, `export` as tar |
//! | retention | [`retention`] | which batches a policy keeps; compaction of the rest |
//! | verify | [`verify`] | the store's structure and every hash, checked |
//!
//! Around them: [`roots`] (state directories and path safety), [`meta`]
//! (owner and extended attributes, read on capture and applied on replay),
//! [`progress`] (how far long work got, for the caller to show) and
//! [`units`] (sizes and times in messages). The store itself is the
//! `diffkeeper-store` crate, re-exported as [`store`].

pub mod capture;
pub mod error;
pub mod freeze;
pub mod history;
pub mod meta;
pub mod progress;
pub mod replay;
pub mod retention;
pub mod roots;
pub mod scan;
pub mod units;
pub mod verify;

pub use diffkeeper_store as store;
pub use error::{EngineError, Result};
