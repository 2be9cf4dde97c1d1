//! Capture: turn a list of changed paths into one committed batch.
//!
//! Files are read in parallel, cut into content-defined chunks (FastCDC),
//! hashed, de-duplicated against the store, and new chunks are encoded as a
//! base or as a delta against the chunks the previous version had at that
//! position ([`codec`]). Workers stream chunks to a single writer that owns
//! the redb write transaction, so memory stays bounded by a few chunks per
//! worker whatever the file sizes, and the batch commits whole or not at all.
//!
//! How the batch's cut is taken is the caller's [`Cut`]: read with the app
//! running and checked for writes meanwhile, or with the writers frozen
//! ([`crate::freeze`]) while the changes are found and the changed bytes
//! copied ([`stage`]), everything else after the thaw. The outcome is
//! recorded with the batch (`store::schema`, cuts).

mod dictionary;
pub mod holes;
pub mod stage;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{bail, Context, Result};
use fastcdc::v2020::{ChunkData, FastCDC, StreamCDC};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::freeze::FreezeSet;
use crate::progress::Progress;
use crate::roots::{join, StateDir};
use crate::scan::{
    check_root, diff_root, Change, FsEntry, InodeIndex, LinkedOut, PathFilter, RootChanges,
};
use crate::store::pack::PackBuilder;
use crate::store::schema::{
    BatchRecord, ChunkEncoding, ChunkRecord, CutKind, CutRecord, EntryKind, Owner, Stamp,
    VersionRecord, Xattr, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, MAX_DELTA_BASES,
};
use crate::store::{codec, now_ms, sha256, BaseCache, Check, Reader, Store};
use diffkeeper_common::InodeKey;
use stage::Staged;

/// How often a file that changes while it is read is read again before its
/// latest read is kept anyway.
const READ_ATTEMPTS: usize = 3;
/// New chunks of one file encoded in parallel at a time; bounds memory to
/// this many chunks and their references.
const ENCODE_WINDOW: usize = 16;

/// Less work than this in a batch, or one file, is done on the calling
/// thread rather than in rayon's pool. The pool is the process's: a
/// daemon's target rewriting a 500 MB file keeps its threads busy for
/// seconds, and another target's small batch handed to it would wait
/// behind that (`cargo xtask bench daemon`: p99 capture latency 0.43 s
/// alone, 3.0 s beside such a rewrite).
const PARALLEL_MIN_BYTES: u64 = 1 << 20;

/// Changes captured before the writer puts their rows in the store, in key
/// order (see `BatchWriter::flush`). The rows of a window are held meanwhile
/// (about 1.5 MB for this many small files), and the pool waits at each
/// window's end for its slowest file: on 50,000 small files the first
/// snapshot kept both cores 90% busy.
const WRITE_WINDOW: usize = 8192;

/// The order a window's changes are captured in, which is the order their
/// small new bases fill packs: by file name, then root and path. Files of
/// one name are alike (`__init__.py`, `METADATA`, `package.json`...) and far
/// apart in path order. Measured on Debian's Python packages (3,305
/// distinct files of up to 128 KiB, 38.3 MB, packs of 1 MiB at level 9
/// with a dictionary): 9.96 MB packed in path order, 9.33 MB by name;
/// by extension then name, 9.83 MB.
fn pack_order<'a>((root, change): &(&'a StateDir, &'a Change)) -> (&'a [u8], &'a str, &'a [u8]) {
    let path = change.path();
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    (name, root.name.as_str(), path)
}

/// Whether `jobs` pieces of work of `bytes` in all are worth the pool.
pub(crate) fn worth_the_pool(jobs: usize, bytes: u64) -> bool {
    jobs > 1 && bytes >= PARALLEL_MIN_BYTES
}

/// What one `snapshot` did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BatchSummary {
    /// The committed batch, or `None` when nothing changed.
    pub batch: Option<u64>,
    pub scanned: usize,
    pub new: usize,
    pub changed: usize,
    pub deleted: usize,
    /// Paths read again and found as stored, too close to their ctime to
    /// record that (they are read again next time).
    pub unchanged_content: usize,
    /// Paths read again (no stamp proved them unchanged) and found as
    /// stored: their new stamp is recorded (`seen`), no version.
    pub settled: usize,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// Paths that could not be read, with the reason; the rest was captured.
    pub failures: Vec<(PathBuf, String)>,
    /// The tree was written to while this batch was read: the batch was
    /// dropped, or committed marked torn (see [`Cut::accept_torn`]).
    pub disturbed: bool,
    /// How the committed batch's cut was taken; `None` when not checked.
    pub cut: Option<CutRecord>,
    #[serde(skip)]
    pub elapsed: Duration,
    /// What the batch learnt of each root's files, for the captures after
    /// it (see [`Looked`]).
    #[serde(skip)]
    pub looked: HashMap<String, Looked>,
}

/// What a batch learnt of one root's files.
#[derive(Debug, Default, Clone)]
pub struct Looked {
    /// The files by inode, when the root was walked whole: for later
    /// captures of only the files the tracer reports (see [`Cut::files`]).
    pub inodes: Option<InodeIndex>,
    /// The files looked at that have a name outside the tree (all of the
    /// tree's when `inodes` is there), for the tracer to attribute writes
    /// through that name.
    pub linked_out: LinkedOut,
}

impl std::fmt::Display for BatchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.batch {
            Some(b) => write!(f, "batch {b}: ")?,
            None if self.disturbed => write!(f, "dropped (written while read): ")?,
            None => write!(f, "no changes: ")?,
        }
        write!(
            f,
            "{} new, {} changed, {} deleted of {} scanned; {} logical, {} stored in {:.2?}",
            self.new,
            self.changed,
            self.deleted,
            self.scanned,
            crate::units::bytes(self.logical_bytes),
            crate::units::bytes(self.stored_bytes),
            self.elapsed
        )?;
        if self.settled > 0 {
            write!(f, "; {} re-read and unchanged", self.settled)?;
        }
        if !self.failures.is_empty() {
            write!(f, "; {} unreadable", self.failures.len())?;
        }
        match &self.cut {
            Some(cut) if cut.kind == CutKind::Frozen => write!(
                f,
                "; frozen {:.1?} ({} read)",
                Duration::from_micros(cut.pause_us),
                crate::units::bytes(cut.frozen_bytes)
            )?,
            Some(cut) if cut.kind == CutKind::Torn => write!(f, "; TORN: {}", cut.why)?,
            _ => {}
        }
        Ok(())
    }
}

/// Scans every root and records all changes since the last batch as one
/// batch in the store at `store_path`, creating it if needed. When nothing
/// changed the store is only read, never opened for writing, so an idle
/// snapshot leaves the file exactly as it was. Nothing checks that the tree
/// stood still meanwhile: such a batch has no cut record.
pub fn snapshot(store_path: &Path, roots: &[StateDir]) -> Result<BatchSummary> {
    take_batch(store_path, roots, &Cut::default(), None)
}

/// How a batch's cut is taken and checked (see `store::schema`, cuts).
#[derive(Clone, Copy, Default)]
pub struct Cut<'a> {
    /// Set by the backend on every write notice for the trees (one flag a
    /// tree); cleared when the read starts.
    pub written: &'a [Arc<AtomicBool>],
    /// The kernel's own count of changes under the trees (the eBPF tracer's
    /// counters), exact where `written` lags behind: preferred when there.
    pub clock: Option<&'a (dyn Fn() -> Option<Changes> + Sync)>,
    /// Freeze these writers while the changes are found and read.
    pub freeze: Option<&'a FreezeSet>,
    /// Longest freeze: past it the writers are thawed, the rest is read
    /// live and the batch is torn.
    pub max_pause: Duration,
    /// Commit a batch written while read, marked torn, instead of dropping
    /// it (the summary then says `disturbed`).
    pub accept_torn: bool,
    /// The files to look at instead of walking (one root; relative path
    /// and inode, from the kernel tracer's reports and an [`InodeIndex`]),
    /// asked for when the read starts ([`Ask`]); `None` from it, or no
    /// function, walks the trees.
    pub files: Option<&'a ReportedFn<'a>>,
    /// Only the paths this keeps are recorded (see
    /// [`crate::scan::PathFilter`]); `None` keeps every path.
    pub filter: Option<&'a PathFilter>,
    /// Index a walked tree's files by inode ([`Looked::inodes`]), for
    /// later cuts of only the files reported written. A one-shot snapshot
    /// has none: the index would be a tenth of its peak memory on 50,000
    /// small files (`cargo xtask bench peers`, small).
    pub index_inodes: bool,
}

/// A reading of [`Cut::clock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Changes counted so far.
    pub count: u64,
    /// A process holds a shared writable mapping of a file there: it can
    /// write with no syscall, so no count proves the tree stood still
    /// unless that process is frozen.
    pub mapped: bool,
}

/// See [`Cut::files`].
pub type ReportedFn<'a> = dyn Fn(Ask) -> Option<Vec<(Vec<u8>, InodeKey)>> + Sync + 'a;

/// When [`Cut::files`] is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// The read starts with the app running.
    Live,
    /// A freeze is about to start: take what is reported so far (clearing
    /// the tracer's marks costs a syscall a file, better spent before the
    /// pause); the answer is not used.
    BeforeFreeze,
    /// The writers are frozen: everything changed before now is reported.
    Frozen,
}

/// Records the changes under `roots` as one batch, its cut taken and
/// checked as `cut` says. With [`Cut::files`] the batch looks only at the
/// files reported written, so its cost follows what was written, not the
/// size of the tree; when any of them cannot be trusted to be the whole
/// change (see [`crate::scan::diff_files`]) the tree is walked after all.
pub fn capture_cut(store_path: &Path, roots: &[StateDir], cut: &Cut) -> Result<BatchSummary> {
    take_batch(store_path, roots, cut, None)
}

/// Like [`snapshot`], but the batch is recorded as committed at `time_ms`
/// (milliseconds since the Unix epoch) instead of now: for importing a
/// history, and for tests and benchmarks of long histories. Refused when
/// older than the store's newest batch, so batch times stay in order.
pub fn snapshot_at(store_path: &Path, roots: &[StateDir], time_ms: i64) -> Result<BatchSummary> {
    take_batch(store_path, roots, &Cut::default(), Some(time_ms))
}

/// A chunk's SHA-256. Zeros (a hole, a preallocated or zeroed region) cut
/// into chunks of the largest size, all alike: their hash is taken once.
fn chunk_hash(data: &[u8]) -> [u8; 32] {
    static ZEROS: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if data.len() == CHUNK_MAX && holes::all_zeros(data) {
        return *ZEROS.get_or_init(|| sha256(&vec![0u8; CHUNK_MAX]));
    }
    sha256(data)
}

/// Watches the trees for writes from the start of a read: the kernel's
/// count when there is one, else the backend's flag.
struct Disturbance<'a> {
    cut: &'a Cut<'a>,
    clock_at_start: Option<Changes>,
    /// The writers are frozen: a mapping of theirs writes nothing.
    frozen: bool,
}

impl<'a> Disturbance<'a> {
    fn start(cut: &'a Cut<'a>, frozen: bool) -> Disturbance<'a> {
        for flag in cut.written {
            flag.store(false, Ordering::SeqCst);
        }
        Disturbance {
            cut,
            clock_at_start: cut.clock.and_then(|clock| clock()),
            frozen,
        }
    }

    /// Whether anything can tell.
    fn checked(&self) -> bool {
        self.clock_at_start.is_some() || !self.cut.written.is_empty()
    }

    fn disturbed(&self) -> bool {
        match (
            self.clock_at_start,
            self.cut.clock.and_then(|clock| clock()),
        ) {
            (Some(before), Some(now)) => {
                before.count != now.count || (!self.frozen && (before.mapped || now.mapped))
            }
            _ => self
                .cut
                .written
                .iter()
                .any(|flag| flag.load(Ordering::SeqCst)),
        }
    }
}

/// What the batch's cut record says, decided before the commit (a frozen
/// cut) or at it (an optimistic one, which may still be disturbed by then).
enum Verdict<'a> {
    Known(Option<CutRecord>),
    AtCommit {
        watch: &'a Disturbance<'a>,
        accept_torn: bool,
        /// Why the writers could not be frozen for this batch, if that was
        /// tried.
        freeze_failed: Option<String>,
    },
}

fn torn(why: String, pause: Duration, frozen_bytes: u64) -> CutRecord {
    CutRecord {
        kind: CutKind::Torn,
        pause_us: pause.as_micros() as u64,
        frozen_bytes,
        why,
    }
}

fn take_batch(
    store_path: &Path,
    roots: &[StateDir],
    cut: &Cut,
    recorded_at: Option<i64>,
) -> Result<BatchSummary> {
    // Before the store is created, so a typo does not leave an empty store.
    for root in roots {
        check_root(&root.path)?;
    }
    if let Some(set) = cut.freeze {
        match take_frozen(store_path, roots, cut, set) {
            Err(e) if e.freeze_error().is_some() => {
                tracing::warn!("cannot freeze the writers of {}: {e:#}; reading without a freeze, a batch written meanwhile is marked torn", names(roots));
                let unfrozen = Cut {
                    freeze: None,
                    accept_torn: true,
                    ..*cut
                };
                return take_optimistic(store_path, roots, &unfrozen, None, Some(format!("{e:#}")));
            }
            other => return other,
        }
    }
    take_optimistic(store_path, roots, cut, recorded_at, None)
}

fn names(roots: &[StateDir]) -> String {
    roots
        .iter()
        .map(|r| r.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the batch with the app running: a write during the read
/// disturbs it (see [`Cut::accept_torn`]).
fn take_optimistic(
    store_path: &Path,
    roots: &[StateDir],
    cut: &Cut,
    recorded_at: Option<i64>,
    freeze_failed: Option<String>,
) -> Result<BatchSummary> {
    let started = Instant::now();
    // The real clock even for a recorded time: it decides which mtimes are
    // too recent to prove a file unchanged.
    let started_ms = now_ms();
    let watch = Disturbance::start(cut, false);
    let files = cut.files.and_then(|files| files(Ask::Live));
    let files = files.as_deref();
    let mut scanned = None;
    if let Some(store) = Store::open_read_only(store_path)? {
        let reader = store.reader()?;
        let mut found = find_changes(store.path(), &reader, roots, files, cut)?;
        if found.iter().all(|r| r.changes.is_empty()) {
            return Ok(BatchSummary {
                scanned: found.iter().map(|r| r.scanned).sum(),
                elapsed: started.elapsed(),
                looked: take_looked(&mut found),
                ..BatchSummary::default()
            });
        }
        scanned = Some((reader.last_batch()?, found));
    }
    let store = Store::create_or_open(store_path)?;
    let reader = store.reader()?;
    if let Some(time_ms) = recorded_at {
        if let Some((_, newest)) = reader.batches()?.last() {
            if newest.time_ms > time_ms {
                bail!(
                    "cannot record a batch at {}: store {} already has a newer batch ({})",
                    crate::units::time(time_ms),
                    store_path.display(),
                    crate::units::time(newest.time_ms)
                );
            }
        }
    }
    // The scan made read-only stands unless another writer committed since.
    let mut found = match scanned {
        Some((last, found)) if last == reader.last_batch()? => found,
        _ => find_changes(store.path(), &reader, roots, files, cut)?,
    };
    let verdict = Verdict::AtCommit {
        watch: &watch,
        accept_torn: cut.accept_torn,
        freeze_failed,
    };
    let batch = Batch {
        started_ms,
        recorded_at,
        staged: None,
    };
    let mut summary = capture_and_tidy(store, reader, &found, &batch, verdict)?;
    summary.scanned = found.iter().map(|r| r.scanned).sum();
    summary.elapsed = started.elapsed();
    summary.looked = take_looked(&mut found);
    Ok(summary)
}

/// [`capture`], then, when a batch committed, gives back what the store
/// file grew by (see [`Store::shrink_if_grown`]), with `reader` closed. The
/// batch is durable by then: a failure to shrink costs only disk space, and
/// is said.
fn capture_and_tidy(
    mut store: Store,
    reader: Reader,
    roots: &[RootChanges],
    batch: &Batch,
    verdict: Verdict,
) -> Result<BatchSummary> {
    let before = store.file_len();
    let summary = capture(&store, &reader, roots, batch, verdict)?;
    drop(reader);
    if summary.batch.is_none() {
        return Ok(summary);
    }
    let started = Instant::now();
    match store.shrink_if_grown(before) {
        Ok(None) => {}
        Ok(Some(grown)) => tracing::debug!(
            grown_by = grown.saturating_sub(before),
            now = store.file_len(),
            took = ?started.elapsed(),
            "store file shrunk"
        ),
        Err(e) => tracing::warn!(
            "the batch is committed, but the store file keeps its free space: {:#}",
            crate::error::EngineError::from(e)
        ),
    }
    Ok(summary)
}

/// Tries of a frozen cut when another process commits to the store between
/// the cut and its commit (the cut was diffed against an older state).
const FROZEN_TRIES: usize = 3;

/// Freezes the writers, finds the changes and copies the changed bytes
/// ([`stage`]), thaws, then encodes and commits from the copy.
fn take_frozen(
    store_path: &Path,
    roots: &[StateDir],
    cut: &Cut,
    set: &FreezeSet,
) -> Result<BatchSummary> {
    let started = Instant::now();
    let started_ms = now_ms();
    // Opening may wait for another writer: never while frozen.
    if Store::open_read_only(store_path)?.is_none() {
        drop(Store::create_or_open(store_path)?);
    }
    let spill_dir = store_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for _ in 0..FROZEN_TRIES {
        let store = Store::open_read_only(store_path)?
            .with_context(|| format!("store {} vanished", store_path.display()))?;
        let reader = store.reader()?;
        let last = reader.last_batch()?;
        if let Some(files) = cut.files {
            files(Ask::BeforeFreeze);
        }
        let frozen = set.freeze(cut.max_pause)?;
        let freeze_took = frozen.elapsed();
        let watch = Disturbance::start(cut, true);
        let deadline = Instant::now() + cut.max_pause.saturating_sub(frozen.elapsed());
        let files = cut.files.and_then(|files| files(Ask::Frozen));
        let listed = frozen.elapsed();
        let found = find_changes(store.path(), &reader, roots, files.as_deref(), cut);
        let diffed = frozen.elapsed();
        let staged = match &found {
            Ok(found) if found.iter().any(|r| !r.changes.is_empty()) => Some(stage::stage(
                found,
                spill_dir,
                deadline,
                watch.clock_at_start.is_none(),
            )),
            _ => None,
        };
        // Judged before the thaw: the app writes again right after it.
        let disturbed = watch.disturbed();
        let pause = frozen.thaw();
        tracing::debug!(
            ?freeze_took,
            files = ?files.as_ref().map(Vec::len),
            listed = ?listed.saturating_sub(freeze_took),
            diffed = ?diffed.saturating_sub(listed),
            staged = ?pause.saturating_sub(diffed),
            "frozen cut"
        );
        let mut found = found?;
        let staged = staged.transpose()?;
        drop((reader, store));
        let Some(staged) = staged else {
            return Ok(BatchSummary {
                scanned: found.iter().map(|r| r.scanned).sum(),
                elapsed: started.elapsed(),
                looked: take_looked(&mut found),
                ..BatchSummary::default()
            });
        };
        let record = if staged.left_bytes > 0 || pause > cut.max_pause {
            let why = format!(
                "the frozen read took longer than --max-pause ({}): {} of {} read frozen",
                humantime::format_duration(cut.max_pause),
                crate::units::bytes(staged.bytes),
                crate::units::bytes(staged.bytes + staged.left_bytes),
            );
            tracing::warn!("{}: {why}; the batch is marked torn", names(roots));
            torn(why, pause, staged.bytes)
        } else if disturbed || staged.changed_while_read {
            let why = format!(
                "written while frozen, by a process outside the frozen cgroups ({})",
                set.describe()
            );
            tracing::warn!("{}: {why}; the batch is marked torn", names(roots));
            torn(why, pause, staged.bytes)
        } else {
            CutRecord {
                kind: CutKind::Frozen,
                pause_us: pause.as_micros() as u64,
                frozen_bytes: staged.bytes,
                why: String::new(),
            }
        };
        let store = Store::create_or_open(store_path)?;
        let reader = store.reader()?;
        if reader.last_batch()? != last {
            tracing::debug!(
                "another process committed to {} during the cut; taking it again",
                store_path.display()
            );
            continue;
        }
        let batch = Batch {
            started_ms,
            recorded_at: None,
            staged: Some(&staged),
        };
        let mut summary =
            capture_and_tidy(store, reader, &found, &batch, Verdict::Known(Some(record)))?;
        summary.scanned = found.iter().map(|r| r.scanned).sum();
        summary.elapsed = started.elapsed();
        summary.looked = take_looked(&mut found);
        return Ok(summary);
    }
    bail!(
        "store {} kept being written by another process during {FROZEN_TRIES} frozen cuts",
        store_path.display()
    )
}

fn take_looked(found: &mut [RootChanges]) -> HashMap<String, Looked> {
    found
        .iter_mut()
        .map(|r| {
            let looked = Looked {
                inodes: r.inodes.take(),
                linked_out: std::mem::take(&mut r.linked_out),
            };
            (r.root.name.clone(), looked)
        })
        .collect()
}

/// Diffs every root against the store's latest state: only `files` when
/// given (one root) and trustworthy, else each whole tree.
fn find_changes(
    store_path: &Path,
    reader: &Reader,
    roots: &[StateDir],
    files: Option<&[(Vec<u8>, InodeKey)]>,
    cut: &Cut,
) -> Result<Vec<RootChanges>> {
    let mut found = find_all_changes(store_path, reader, roots, files, cut.index_inodes)?;
    if let Some(filter) = cut.filter {
        for root in &mut found {
            root.changes.retain(|change| filter.keeps(change));
        }
    }
    Ok(found)
}

/// Every change under `roots`, as [`find_changes`] without a filter.
fn find_all_changes(
    store_path: &Path,
    reader: &Reader,
    roots: &[StateDir],
    files: Option<&[(Vec<u8>, InodeKey)]>,
    index_inodes: bool,
) -> Result<Vec<RootChanges>> {
    if let (Some(files), [root]) = (files, roots) {
        match crate::scan::diff_files(root, reader, files)? {
            Some(changes) => return Ok(vec![changes]),
            None => {
                tracing::debug!(root = %root.name, "reported files do not tell the whole change: walking the tree")
            }
        }
    }
    let batch_started = reader.batch_started()?;
    // The store may live inside a state directory; it is never captured.
    let store_canonical = std::fs::canonicalize(store_path).ok();
    roots
        .iter()
        .map(|root| {
            let exclude = store_canonical
                .as_deref()
                .zip(std::fs::canonicalize(&root.path).ok())
                .and_then(|(store, canon)| {
                    store
                        .strip_prefix(canon)
                        .ok()
                        .map(|rel| root.path.join(rel))
                });
            diff_root(
                root,
                reader,
                &batch_started,
                exclude.as_deref(),
                index_inodes,
            )
        })
        .collect()
}

enum Message {
    Chunk {
        id: u64,
        record: ChunkRecord,
        payload: Vec<u8>,
    },
    /// A pack of new chunks (see `BatchWriter::put_pack`).
    Pack {
        id: u64,
        record: ChunkRecord,
        payload: Vec<u8>,
    },
    Version {
        root: String,
        path: Vec<u8>,
        record: VersionRecord,
    },
    /// The path's newest version was read again and found unchanged, as
    /// `stamp`.
    Seen {
        root: String,
        path: Vec<u8>,
        stamp: Stamp,
    },
    /// Every change of a window of [`WRITE_WINDOW`] was captured: what
    /// they put can be written in key order.
    WindowDone,
}

enum Outcome {
    Recorded {
        new: bool,
        logical: u64,
        stored: u64,
    },
    UnchangedContent,
    /// Unchanged, and read clearly after its ctime: its stamp is recorded
    /// (`seen`), no new version.
    Settled,
    Vanished,
    Failed(PathBuf, String),
}

struct Workers<'a> {
    reader: &'a Reader,
    /// When this batch's scan started.
    started_ms: i64,
    /// The changed files' bytes as read frozen, if they were.
    staged: Option<&'a Staged>,
    next_chunk: Arc<AtomicU64>,
    /// Chunks first stored in this batch, by hash, so two files with the
    /// same new chunk store it once.
    fresh: Mutex<HashMap<[u8; 32], u64>>,
    tx: SyncSender<Message>,
    /// Each root's directory, opened once, that its files are opened
    /// beneath.
    dirs: RootDirs,
    /// What bases are compressed with.
    bases: codec::BaseEncoder<'a>,
    /// Packs being filled with small new bases, one per thread filling one
    /// (see the store's Packs).
    packs: Mutex<Vec<PackBuilder>>,
    /// Payload bytes of the packs sealed so far.
    packed: AtomicU64,
    /// Why a new chunk could not be stored, if one could not: the batch
    /// fails (see [`Workers::store_new_chunks`]).
    lost: Mutex<Option<String>>,
}

/// One batch in the making.
struct Batch<'a> {
    /// When its scan started.
    started_ms: i64,
    /// The commit time to record instead of now.
    recorded_at: Option<i64>,
    staged: Option<&'a Staged>,
}

/// Records `roots`' changes as one batch. Returns an empty summary (and
/// writes nothing) when there is nothing to record, or when `verdict`
/// finds it disturbed and torn batches are not accepted.
fn capture(
    store: &Store,
    reader: &Reader,
    roots: &[RootChanges],
    batch: &Batch,
    verdict: Verdict,
) -> Result<BatchSummary> {
    let started_ms = batch.started_ms;
    let mut summary = BatchSummary::default();
    // Paths the scan could not look at: left as they are in the store,
    // reported like files that could not be read.
    for root in roots {
        summary.failures.extend(root.problems.iter().cloned());
    }
    let total: usize = roots.iter().map(|r| r.changes.len()).sum();
    if total == 0 {
        return Ok(summary);
    }
    let mut writer = store.begin_batch()?;
    let (tx, rx) = sync_channel::<Message>(64);
    // In key order, so the store appends each window's rows after the last
    // one's (see `BatchWriter::flush`).
    let mut jobs: Vec<(&StateDir, &Change)> = roots
        .iter()
        .flat_map(|r| r.changes.iter().map(move |c| (&r.root, c)))
        .collect();
    jobs.sort_by(|a, b| (a.0.name.as_str(), a.1.path()).cmp(&(b.0.name.as_str(), b.1.path())));
    // Within a window (whose rows are written sorted anyway), files of the
    // same name are captured side by side, so their small bases share packs
    // (see `pack_order`).
    for window in jobs.chunks_mut(WRITE_WINDOW) {
        window.sort_by(|a, b| pack_order(a).cmp(&pack_order(b)));
    }
    let dirs = RootDirs::of(roots);
    let bases = dictionary::for_batch(reader, &jobs, &dirs, writer.next_dictionary_id()?)?;
    if let (true, Some(dictionary)) = (bases.trained, &bases.dictionary) {
        writer.put_dictionary(dictionary)?;
    }
    let workers = Workers {
        reader,
        started_ms,
        staged: batch.staged,
        next_chunk: writer.chunk_ids(),
        fresh: Mutex::new(HashMap::new()),
        tx,
        dirs,
        bases: codec::BaseEncoder::new(bases.dictionary.as_deref()),
        packs: Mutex::new(Vec::new()),
        packed: AtomicU64::new(0),
        lost: Mutex::new(None),
    };
    let progress = Progress::new(total as u64, "capturing");

    let (outcomes, write_result) = std::thread::scope(|scope| {
        let progress = &progress;
        let jobs = &jobs;
        // The workers own the only sender: when they are done the channel
        // closes and the writer loop below ends.
        let bytes: u64 = jobs
            .iter()
            .map(|(_, change)| match change {
                Change::Write { entry, .. } => entry.size,
                Change::Delete { .. } => 0,
            })
            .sum();
        let handle = scope.spawn(move || {
            let capture = |(root, change): &(&StateDir, &Change)| {
                let outcome = workers.capture_change(root, change);
                progress.inc();
                outcome
            };
            let parallel = worth_the_pool(jobs.len(), bytes);
            let window_done = workers.tx.clone();
            let mut outcomes = Vec::with_capacity(jobs.len());
            for window in jobs.chunks(WRITE_WINDOW) {
                if parallel {
                    outcomes.par_extend(window.par_iter().map(capture));
                } else {
                    outcomes.extend(window.iter().map(capture));
                }
                // The writer is gone only after a failure it reports.
                let _ = window_done.send(Message::WindowDone);
            }
            let packed = workers.seal_packs();
            (outcomes, packed)
        });
        // The writer: the only thread touching the write transaction.
        let mut write_result = Ok(());
        for message in rx.iter() {
            if write_result.is_err() {
                continue; // drain so workers never block
            }
            write_result = match message {
                Message::Chunk {
                    id,
                    record,
                    payload,
                } => writer.put_chunk(id, &record, &payload),
                Message::Pack {
                    id,
                    record,
                    payload,
                } => writer.put_pack(id, &record, &payload),
                Message::Version { root, path, record } => {
                    writer.put_version(&root, &path, &record)
                }
                Message::Seen { root, path, stamp } => writer.see(&root, &path, stamp, started_ms),
                Message::WindowDone => writer.flush(),
            };
        }
        (handle.join(), write_result)
    });
    progress.finish();
    let (outcomes, packed) =
        outcomes.map_err(|_| crate::error::refused!("a capture worker panicked"))?;
    write_result?;
    // A pack's members count none of its bytes (see `Workers::pack`).
    summary.stored_bytes += packed?;

    for ((_, change), outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Outcome::Recorded {
                new,
                logical,
                stored,
            } => {
                if matches!(change, Change::Delete { .. }) {
                    summary.deleted += 1;
                } else if new {
                    summary.new += 1;
                } else {
                    summary.changed += 1;
                }
                summary.logical_bytes += logical;
                summary.stored_bytes += stored;
            }
            Outcome::UnchangedContent => summary.unchanged_content += 1,
            Outcome::Settled => summary.settled += 1,
            Outcome::Vanished => {}
            Outcome::Failed(path, why) => summary.failures.push((path, why)),
        }
    }
    let files_changed = (summary.new + summary.changed + summary.deleted) as u64;
    if files_changed == 0 && summary.settled == 0 {
        // Nothing to record: the transaction is dropped, which aborts it.
        return Ok(summary);
    }
    let cut = match verdict {
        Verdict::Known(cut) => cut,
        Verdict::AtCommit {
            watch,
            accept_torn,
            freeze_failed,
        } if watch.disturbed() => {
            summary.disturbed = true;
            if !accept_torn {
                return Ok(summary);
            }
            let why = match freeze_failed {
                Some(e) => format!("written while read (freezing failed: {e})"),
                None => "written while read (no freeze)".into(),
            };
            Some(torn(why, Duration::ZERO, 0))
        }
        Verdict::AtCommit { watch, .. } if watch.checked() => Some(CutRecord {
            kind: CutKind::Quiet,
            pause_us: 0,
            frozen_bytes: 0,
            why: String::new(),
        }),
        // Nothing can tell whether it was written meanwhile.
        Verdict::AtCommit {
            freeze_failed: Some(e),
            ..
        } => Some(torn(
            format!("not frozen ({e}), and nothing tells whether it was written while read"),
            Duration::ZERO,
            0,
        )),
        Verdict::AtCommit { .. } => None,
    };
    if files_changed == 0 {
        // Only files found unchanged: no new moment in the history.
        writer.commit_seen_only()?;
        return Ok(summary);
    }
    let record = BatchRecord {
        time_ms: batch.recorded_at.unwrap_or_else(now_ms),
        started_ms,
        roots: roots
            .iter()
            .filter(|r| !r.changes.is_empty())
            .map(|r| r.root.name.clone())
            .collect(),
        files_changed,
        logical_bytes: summary.logical_bytes,
        stored_bytes: summary.stored_bytes,
    };
    summary.batch = Some(writer.commit_cut(&record, cut.as_ref())?);
    summary.cut = cut;
    Ok(summary)
}

impl Workers<'_> {
    fn send(&self, message: Message) -> Result<()> {
        self.tx
            .send(message)
            .map_err(|_| crate::error::refused!("the store writer stopped"))
    }

    fn capture_change(&self, root: &StateDir, change: &Change) -> Outcome {
        let full = match change {
            Change::Write { path, .. } | Change::Delete { path } => join(&root.path, path),
        };
        match self.record_change(root, change, &full) {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(full, format!("{e:#}")),
        }
    }

    fn record_change(&self, root: &StateDir, change: &Change, full: &Path) -> Result<Outcome> {
        let (path, record) = match change {
            Change::Delete { path } => (path, VersionRecord::tombstone()),
            Change::Write {
                path,
                entry,
                previous,
                ..
            } => {
                let record = match entry.kind {
                    EntryKind::File => {
                        match self.capture_file(root, path, full, previous.as_deref())? {
                            FileCapture::Vanished => return Ok(Outcome::Vanished),
                            FileCapture::Unchanged(stamp) => {
                                return self.seen_again(root, path, stamp)
                            }
                            FileCapture::Version(record) => record,
                        }
                    }
                    EntryKind::Dir => {
                        let dir = match self.dirs.open(&root.name, path) {
                            Ok(dir) => dir,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                return Ok(Outcome::Vanished)
                            }
                            Err(e) => {
                                return Err(e)
                                    .with_context(|| format!("cannot open {}", full.display()))
                            }
                        };
                        let xattrs = crate::meta::read_xattrs(&dir).with_context(|| {
                            format!("cannot read the extended attributes of {}", full.display())
                        })?;
                        let record = entry_record(entry, xattrs);
                        if previous.as_ref().is_some_and(|p| same_version(p, &record)) {
                            return self.seen_again(root, path, entry.stamp());
                        }
                        record
                    }
                    EntryKind::Symlink | EntryKind::Tombstone => entry_record(entry, Vec::new()),
                };
                (path, record)
            }
        };
        let new = matches!(change, Change::Write { previous: None, .. });
        let logical = if record.kind == EntryKind::File {
            record.size
        } else {
            0
        };
        let stored = record.stored_bytes;
        self.send(Message::Version {
            root: root.name.clone(),
            path: path.clone(),
            record,
        })?;
        Ok(Outcome::Recorded {
            new,
            logical,
            stored,
        })
    }

    /// A path found as its newest version says, read as `stamp`: the stamp
    /// is recorded when the read started clearly after its ctime, so size,
    /// mtime and the stamp prove it unchanged from then on.
    fn seen_again(&self, root: &StateDir, path: &[u8], stamp: Stamp) -> Result<Outcome> {
        if crate::scan::is_racy(stamp.ctime_ns, self.started_ms) {
            return Ok(Outcome::UnchangedContent);
        }
        self.send(Message::Seen {
            root: root.name.clone(),
            path: path.to_vec(),
            stamp,
        })?;
        Ok(Outcome::Settled)
    }

    fn capture_file(
        &self,
        root: &StateDir,
        path: &[u8],
        full: &Path,
        previous: Option<&VersionRecord>,
    ) -> Result<FileCapture> {
        let mut references =
            References::new(self.reader, previous.filter(|p| p.kind == EntryKind::File))?;
        if let Some((staged, file)) = self
            .staged
            .and_then(|staged| staged.get(&root.name, path).map(|file| (staged, file)))
        {
            if file.vanished() {
                return Ok(FileCapture::Vanished);
            }
            let content = self
                .read_content(streamed(staged.reader(file)), full, &mut references)
                .with_context(|| format!("staged copy of {}", full.display()))?;
            let attrs = file
                .attrs
                .clone()
                .with_context(|| format!("staged copy of {} has no attributes", full.display()))?;
            return Ok(content.record(attrs, previous));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let file = match self.dirs.open(&root.name, path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(FileCapture::Vanished)
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", full.display())),
            };
            let before = file
                .metadata()
                .with_context(|| format!("cannot stat {}", full.display()))?;
            let attrs = Attrs::read(&file, &before).with_context(|| {
                format!("cannot read the extended attributes of {}", full.display())
            })?;
            // A small file is read whole first and stored only when the
            // second stat shows no write, so the time a write can tear the
            // read is one read(2), not the hashing and encoding too; a
            // large one streams. `None`: torn, not stored.
            let (content, after) = if before.len() <= WHOLE_READ_BYTES {
                let mut bytes = Vec::with_capacity(before.len() as usize + 1);
                std::io::Read::read_to_end(&mut &file, &mut bytes)
                    .with_context(|| format!("cannot read {}", full.display()))?;
                let after = file
                    .metadata()
                    .with_context(|| format!("cannot stat {}", full.display()))?;
                let content = if bytes.len() as u64 == after.len() && same_stamps(&before, &after) {
                    Some(self.read_content(cut_whole(bytes), full, &mut references)?)
                } else {
                    None
                };
                (content, after)
            } else {
                let content = self.read_streamed(
                    holes::SparseReader::new(&file, before.len()),
                    full,
                    &mut references,
                )?;
                let after = file
                    .metadata()
                    .with_context(|| format!("cannot stat {}", full.display()))?;
                (Some(content), after)
            };
            match content.filter(|c| c.size == after.len() && same_stamps(&before, &after)) {
                Some(content) => return Ok(content.record(attrs, previous)),
                None if attempt < READ_ATTEMPTS => {
                    tracing::debug!(path = %full.display(), attempt, "file changed while read; reading again");
                }
                // What was read is a mix of versions that never existed as
                // a whole: never stored. The chunks a streamed read wrote
                // are referenced by no version, and compaction drops them.
                None => crate::error::bail!(
                    "{} kept changing while read ({READ_ATTEMPTS} reads, none of them whole); not captured this time: its previous version stays the latest, and it is read again by the next capture",
                    full.display()
                ),
            }
        }
    }

    /// Hashes and stores a file's `chunks` ([`cut_whole`], [`streamed`])
    /// on this thread (see [`Workers::store_chunks`]).
    fn read_content(
        &self,
        chunks: impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>>,
        full: &Path,
        references: &mut References,
    ) -> Result<Content> {
        let mut hasher = Sha256::new();
        let mut content = self.store_chunks(hashed(chunks, &mut hasher), full, references)?;
        content.hash = hasher.finalize().into();
        Ok(content)
    }

    /// Reads, cuts ([`streamed`]) and hashes a large file on a thread of
    /// its own, up to a window ahead of this one storing its chunks: the
    /// cutting and the whole-file hash, sequential, would otherwise leave
    /// the pool idle between windows.
    fn read_streamed(
        &self,
        from: impl std::io::Read + Send,
        full: &Path,
        references: &mut References,
    ) -> Result<Content> {
        std::thread::scope(|scope| {
            let (sender, chunks) = sync_channel(ENCODE_WINDOW);
            let cutter = scope.spawn(move || {
                let mut hasher = Sha256::new();
                for chunk in hashed(streamed(from), &mut hasher) {
                    let failed = chunk.is_err();
                    // Sending fails when storing stopped (its error is
                    // the one reported).
                    if sender.send(chunk).is_err() || failed {
                        break;
                    }
                }
                hasher
            });
            let stored = self.store_chunks(chunks.into_iter(), full, references);
            let hasher = cutter.join().map_err(|_| {
                crate::error::refused!("the thread reading {} panicked", full.display())
            })?;
            let mut content = stored?;
            content.hash = hasher.finalize().into();
            Ok(content)
        })
    }

    /// Stores a file's `chunks` a window at a time: chunk hashes and
    /// encoding run in parallel within a window. The whole-file hash is
    /// the caller's ([`Content::hash`] left empty).
    fn store_chunks(
        &self,
        chunks: impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>>,
        full: &Path,
        references: &mut References,
    ) -> Result<Content> {
        let mut content = Content::default();
        let mut window: Vec<ChunkData> = Vec::with_capacity(ENCODE_WINDOW);
        for chunk in chunks {
            let chunk = chunk.with_context(|| format!("cannot read {}", full.display()))?;
            content.size += chunk.data.len() as u64;
            window.push(chunk);
            if window.len() >= ENCODE_WINDOW {
                content.stored +=
                    self.store_window(&mut window, references, &mut content.chunks)?;
            }
        }
        content.stored += self.store_window(&mut window, references, &mut content.chunks)?;
        Ok(content)
    }

    /// Stores a window of consecutive chunks of one file, appending their
    /// ids to `ids`. Returns the payload bytes added.
    fn store_window(
        &self,
        window: &mut Vec<ChunkData>,
        refs: &mut References,
        ids: &mut Vec<u64>,
    ) -> Result<u64> {
        let bytes: u64 = window.iter().map(|c| c.data.len() as u64).sum();
        let hashes: Vec<[u8; 32]> = if worth_the_pool(window.len(), bytes) {
            window.par_iter().map(|c| chunk_hash(&c.data)).collect()
        } else {
            window.iter().map(|c| chunk_hash(&c.data)).collect()
        };
        let mut pending = Vec::new();
        for (chunk, hash) in window.drain(..).zip(hashes) {
            let (id, new) = self.place_chunk(hash, chunk.data, chunk.offset, refs)?;
            ids.push(id);
            pending.extend(new);
        }
        self.store_new_chunks(&mut pending, refs)
    }

    /// Gives a chunk its id: an existing one when its content is already
    /// stored, else a new one, returned with what encoding it needs.
    fn place_chunk(
        &self,
        hash: [u8; 32],
        data: Vec<u8>,
        offset: u64,
        refs: &mut References,
    ) -> Result<(u64, Option<NewChunk>)> {
        if let Some(id) = self.reader.find_chunk(&hash)? {
            refs.matched(id, offset);
            return Ok((id, None));
        }
        let mut fresh = self
            .fresh
            .lock()
            .map_err(|_| crate::error::refused!("chunk table lock poisoned"))?;
        if let Some(&id) = fresh.get(&hash) {
            return Ok((id, None));
        }
        let id = self.next_chunk.fetch_add(1, Ordering::Relaxed);
        fresh.insert(hash, id);
        let bases = refs.reference_for(offset, data.len() as u64);
        Ok((
            id,
            Some(NewChunk {
                id,
                hash,
                data,
                offset,
                bases,
            }),
        ))
    }

    /// Encodes new chunks in parallel and sends them to the writer. Returns
    /// the payload bytes added.
    ///
    /// A new chunk that cannot be stored fails the whole batch, not only
    /// its file: other files of the batch may name it already (`fresh`),
    /// and a pack that failed held other files' chunks.
    fn store_new_chunks(&self, pending: &mut Vec<NewChunk>, refs: &References) -> Result<u64> {
        let stored: Result<Vec<u64>> = pending
            .par_drain(..)
            .map(|chunk| self.lost_if_failed(self.store_new_chunk(chunk, refs)))
            .collect();
        Ok(stored?.iter().sum())
    }

    /// Records a failure to store a chunk, which the batch then fails
    /// with (see [`Workers::store_new_chunks`]).
    fn lost_if_failed<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if let Ok(mut lost) = self.lost.lock() {
                lost.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        result
    }

    /// Why the batch cannot be committed, if a chunk was lost.
    fn check_nothing_lost(&self) -> Result<()> {
        match self.lost.lock().ok().and_then(|lost| lost.clone()) {
            Some(why) => crate::error::bail!(
                "a new chunk could not be stored ({why}); nothing of this batch was committed"
            ),
            None => Ok(()),
        }
    }

    /// Stores one new chunk: sends it encoded, or puts it in a pack.
    fn store_new_chunk(&self, chunk: NewChunk, refs: &References) -> Result<u64> {
        let (encoding, payload) = match self.encode(&chunk, refs)? {
            Some(encoded) => encoded,
            None => {
                self.pack(&chunk)?;
                return Ok(0);
            }
        };
        let stored = payload.len() as u64;
        self.send(Message::Chunk {
            id: chunk.id,
            record: ChunkRecord {
                hash: chunk.hash,
                len: chunk.data.len() as u32,
                encoding,
                stored_len: payload.len() as u32,
                at: None,
            },
            payload,
        })?;
        Ok(stored)
    }

    /// The packs being filled, locked.
    fn packs(&self) -> Result<std::sync::MutexGuard<'_, Vec<PackBuilder>>> {
        self.packs
            .lock()
            .map_err(|_| crate::error::refused!("pack list lock poisoned"))
    }

    /// Puts a small new base in a pack, storing the pack when it is full.
    /// A thread takes a pack being filled (or a new one) and gives it back,
    /// so threads fill packs side by side.
    fn pack(&self, chunk: &NewChunk) -> Result<()> {
        let taken = self.packs()?.pop();
        let mut builder = taken.unwrap_or_default();
        if !builder.fits(chunk.data.len()) {
            self.store_pack(&mut builder)?;
        }
        builder.push(chunk.id, chunk.hash, &chunk.data);
        self.packs()?.push(builder);
        Ok(())
    }

    /// Compresses a pack and sends its chunks to the writer.
    fn store_pack(&self, builder: &mut PackBuilder) -> Result<()> {
        let sealed = builder.seal(&self.bases, || {
            self.next_chunk.fetch_add(1, Ordering::Relaxed)
        })?;
        let pack = sealed
            .pack
            .into_iter()
            .map(|(id, record, payload)| Message::Pack {
                id,
                record,
                payload,
            });
        let chunks = sealed
            .chunks
            .into_iter()
            .map(|(id, record, payload)| Message::Chunk {
                id,
                record,
                payload,
            });
        for message in pack.chain(chunks) {
            if let Message::Pack { payload, .. } | Message::Chunk { payload, .. } = &message {
                self.packed
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            self.send(message)?;
        }
        Ok(())
    }

    /// Stores the packs still being filled, once every change is captured.
    /// Returns the payload bytes of all the packs of the batch.
    fn seal_packs(&self) -> Result<u64> {
        let builders = std::mem::take(&mut *self.packs()?);
        for mut builder in builders {
            self.lost_if_failed(self.store_pack(&mut builder))?;
        }
        self.check_nothing_lost()?;
        Ok(self.packed.load(Ordering::Relaxed))
    }

    /// Whether a delta of `delta` bytes for a chunk of `len` is at most a
    /// quarter of what a base of it would take by its `bases`' measure
    /// (their stored bytes per byte; a packed one's, its pack's): half the
    /// base [`Self::encode`] asks of a delta, with room for the new
    /// version compressing twice as well as the old. Encoding the base to
    /// compare was a fifth of a checkpoint round's CPU (200 MB of float32,
    /// deltas 2-14% of their chunks, bases 90%) for deltas kept every time.
    /// `false` when a record cannot be read: the base is encoded then.
    fn far_below_its_bases(&self, bases: &[u64], delta: usize, len: usize) -> bool {
        let mut stored = 0u64;
        let mut whole = 0u64;
        for &id in bases {
            let Ok(record) = self.reader.chunk_record(id) else {
                return false;
            };
            let own = u64::from(record.len);
            let measured = match record.encoding {
                ChunkEncoding::Packed { pack, .. } => match self.reader.chunk_record(pack) {
                    Ok(pack) => pack,
                    Err(_) => return false,
                },
                _ => record,
            };
            if measured.len == 0 {
                return false;
            }
            // Scaled to this base's length.
            stored += u64::from(measured.stored_len) * own / u64::from(measured.len);
            whole += own;
        }
        whole > 0 && (delta as u64).saturating_mul(4).saturating_mul(whole) <= stored * len as u64
    }

    /// How a new chunk is stored: a delta or a base, or `None`: a small
    /// base the writer packs with others (see the store's Packs).
    fn encode(
        &self,
        chunk: &NewChunk,
        refs: &References,
    ) -> Result<Option<(ChunkEncoding, Vec<u8>)>> {
        let packed = PackBuilder::packable(chunk.data.len());
        let (data, offset, bases) = (&chunk.data[..], chunk.offset, chunk.bases.clone());
        let mut delta = None;
        if !bases.is_empty() {
            // References are not hashed again here: a delta encodes against the
            // reference bytes as they decode, and decoding is deterministic,
            // so the new chunk rebuilds exactly either way (and replay checks
            // the whole file's hash).
            match self.reader.reference(&bases, Check::Content, &refs.decoded) {
                Ok(reference) => {
                    let encoded = codec::encode_delta(&reference, data)?;
                    // A tiny delta wins outright, and so does one far below
                    // what its old version took as a base; otherwise it must
                    // beat half the chunk's own base encoding.
                    if encoded.len() <= data.len() / 16
                        || self.far_below_its_bases(&bases, encoded.len(), data.len())
                    {
                        return Ok(Some((ChunkEncoding::ZstdDelta { bases }, encoded)));
                    }
                    delta = Some(encoded);
                }
                Err(e) => {
                    tracing::warn!("chunks {bases:?} cannot serve as a delta reference, storing a new base: {e:#}");
                }
            }
        }
        if packed && delta.is_none() {
            return Ok(None);
        }
        // Packed, a base takes less than this alone: a delta kept against
        // it is kept at most as often.
        let (encoding, base) = self.bases.encode(data)?;
        tracing::trace!(
            offset,
            len = data.len(),
            base = base.len(),
            delta = delta.as_ref().map(Vec::len),
            "chunk"
        );
        match delta {
            Some(delta) if delta.len() * 2 <= base.len() => {
                Ok(Some((ChunkEncoding::ZstdDelta { bases }, delta)))
            }
            _ if packed => Ok(None),
            _ => Ok(Some((encoding, base))),
        }
    }
}

/// `chunks`, each added to the whole-file hash `hasher` as it passes.
fn hashed<'h>(
    chunks: impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>> + 'h,
    hasher: &'h mut Sha256,
) -> impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>> + 'h {
    chunks.inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            hasher.update(&chunk.data);
        }
    })
}

/// The chunks of a file read as it streams in (one buffer of
/// [`CHUNK_MAX`] bytes a file).
fn streamed(
    from: impl std::io::Read,
) -> impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>> {
    StreamCDC::new(from, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
}

/// The chunks of a file read whole into `bytes`, cut where [`streamed`]
/// cuts (the same cut points over the same bytes), without its buffer: a
/// [`CHUNK_MAX`] one zeroed and filled for every file, which on 50,000
/// small files was 25 GB of writes, a fifth of the first snapshot's CPU
/// and, freed and taken again by threads in turn, most of the heap's
/// scattering (`cargo xtask bench peers`, small). A one-chunk file's
/// buffer becomes its chunk.
fn cut_whole(mut bytes: Vec<u8>) -> impl Iterator<Item = Result<ChunkData, fastcdc::v2020::Error>> {
    let cuts: Vec<fastcdc::v2020::Chunk> =
        FastCDC::new(&bytes, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX).collect();
    cuts.into_iter().map(move |cut| {
        let data = if cut.offset == 0 && cut.length == bytes.len() {
            std::mem::take(&mut bytes)
        } else {
            bytes[cut.offset..cut.offset + cut.length].to_vec()
        };
        Ok(ChunkData {
            hash: cut.hash,
            offset: cut.offset as u64,
            length: cut.length,
            data,
        })
    })
}

/// Files up to this size are read whole into memory before they are
/// stored (see [`Workers::capture_file`]).
const WHOLE_READ_BYTES: u64 = 1 << 20;

/// Whether two stats of one file show no write between them: size, mtime
/// and ctime. ctime because the app cannot set it, and on file systems with
/// fine-grained timestamps the first stat makes the next write stamp a new
/// one, even within one clock tick.
pub(crate) fn same_stamps(before: &std::fs::Metadata, after: &std::fs::Metadata) -> bool {
    before.len() == after.len()
        && crate::scan::mtime_ns(before) == crate::scan::mtime_ns(after)
        && (before.ctime(), before.ctime_nsec()) == (after.ctime(), after.ctime_nsec())
}

/// A chunk whose content is not in the store yet.
struct NewChunk {
    id: u64,
    hash: [u8; 32],
    data: Vec<u8>,
    offset: u64,
    /// Base chunks to try a delta against.
    bases: Vec<u64>,
}

/// The directories of the roots a capture reads, each opened once, and
/// the files in them opened beneath them. A root that cannot be opened
/// fails each of its files' opens, as a file that cannot be opened does.
struct RootDirs(HashMap<String, Result<std::os::fd::OwnedFd, (std::io::ErrorKind, String)>>);

impl RootDirs {
    /// Opens the directory of every root with changes in `roots`.
    fn of(roots: &[RootChanges]) -> RootDirs {
        use rustix::fs::{Mode, OFlags};
        let dirs = roots
            .iter()
            .filter(|r| !r.changes.is_empty())
            .map(|r| {
                let dir = rustix::fs::open(
                    &r.root.path,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| {
                    let e = std::io::Error::from(e);
                    (
                        e.kind(),
                        format!("cannot open state directory {}: {e}", r.root.path.display()),
                    )
                });
                (r.root.name.clone(), dir)
            })
            .collect();
        RootDirs(dirs)
    }

    /// Opens `rel` below root `name` to read it, never through a symlink,
    /// in any component: resolved by the kernel within the root
    /// (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so an app that
    /// swaps a directory of its tree for a symlink while it is read cannot
    /// make a root agent read what lies outside the tree.
    fn open(&self, name: &str, rel: &[u8]) -> std::io::Result<File> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let dir = match self.0.get(name) {
            Some(Ok(dir)) => dir,
            Some(Err((kind, why))) => return Err(std::io::Error::new(*kind, why.clone())),
            None => {
                return Err(std::io::Error::other(format!(
                    "state directory {name} was not opened"
                )))
            }
        };
        // "" is the root itself.
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        let fd = rustix::fs::openat2(
            dir,
            std::ffi::OsStr::from_bytes(rel),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )?;
        Ok(File::from(fd))
    }
}

/// A file's content as stored by [`Workers::read_content`].
#[derive(Default)]
struct Content {
    hash: [u8; 32],
    chunks: Vec<u64>,
    size: u64,
    /// Payload bytes its new chunks added.
    stored: u64,
}

impl Content {
    /// The version this content makes with `attrs`; `Unchanged` when it is
    /// `previous` but for the stamp.
    fn record(self, attrs: Attrs, previous: Option<&VersionRecord>) -> FileCapture {
        let record = VersionRecord {
            kind: EntryKind::File,
            mode: attrs.mode,
            mtime_ns: attrs.mtime_ns,
            size: self.size,
            hash: self.hash,
            chunks: self.chunks,
            target: Vec::new(),
            stored_bytes: self.stored,
            owner: Some(attrs.owner),
            xattrs: attrs.xattrs,
            stamp: Some(attrs.stamp),
        };
        if previous.is_some_and(|p| same_version(p, &record)) {
            FileCapture::Unchanged(attrs.stamp)
        } else {
            FileCapture::Version(record)
        }
    }
}

/// What a file's version keeps beside its content, as read with it.
#[derive(Debug, Clone)]
pub struct Attrs {
    /// Permission bits.
    pub mode: u32,
    pub mtime_ns: i64,
    pub owner: Owner,
    pub xattrs: Vec<Xattr>,
    pub stamp: Stamp,
}

impl Attrs {
    /// The attributes of the open file `file`, whose stat is `stat`.
    pub fn read(file: &File, stat: &std::fs::Metadata) -> std::io::Result<Attrs> {
        Ok(Attrs {
            mode: stat.mode() & 0o7777,
            mtime_ns: crate::scan::mtime_ns(stat),
            owner: Owner {
                uid: stat.uid(),
                gid: stat.gid(),
            },
            xattrs: crate::meta::read_xattrs(file)?,
            stamp: crate::scan::stamp_of(stat),
        })
    }
}

/// Whether `now` records what `previous` does (content, mode, mtime, owner,
/// extended attributes), whatever the stamps it was read with. A
/// directory's mtime, which moves with its entries, is not compared.
fn same_version(previous: &VersionRecord, now: &VersionRecord) -> bool {
    previous.kind == now.kind
        && previous.mode == now.mode
        && (previous.mtime_ns == now.mtime_ns || now.kind == EntryKind::Dir)
        && previous.size == now.size
        && previous.hash == now.hash
        && previous.target == now.target
        && previous.owner == now.owner
        && previous.xattrs == now.xattrs
}

/// The version of a directory, symlink (or, for completeness, tombstone)
/// as the walk saw it, with `xattrs`.
fn entry_record(entry: &FsEntry, xattrs: Vec<Xattr>) -> VersionRecord {
    if entry.kind == EntryKind::Tombstone {
        return VersionRecord::tombstone();
    }
    VersionRecord {
        kind: entry.kind,
        mode: entry.mode,
        mtime_ns: entry.mtime_ns,
        size: entry.size,
        hash: if entry.kind == EntryKind::Symlink {
            sha256(&entry.target)
        } else {
            [0; 32]
        },
        chunks: Vec::new(),
        target: entry.target.clone(),
        stored_bytes: 0,
        owner: Some(entry.owner),
        xattrs,
        stamp: Some(entry.stamp()),
    }
}

enum FileCapture {
    Version(VersionRecord),
    /// Same content and metadata as the previous version, read as this
    /// stamp.
    Unchanged(Stamp),
    Vanished,
}

/// Finds, for a new chunk, the old content at its place: the base chunks
/// of the previous version that overlap it. Positions follow the shift of
/// the last chunk that matched, so an insertion early in a file does not
/// misalign the rest.
struct References {
    /// `(old start, old length, bases standing for that old chunk)`.
    layout: Vec<(u64, u64, Vec<u64>)>,
    old_start: HashMap<u64, u64>,
    shift: i64,
    /// Recently decoded bases: neighbouring new chunks share most of them.
    decoded: BaseCache,
}

impl References {
    fn new(reader: &Reader, previous: Option<&VersionRecord>) -> Result<References> {
        let mut layout = Vec::new();
        let mut old_start = HashMap::new();
        let mut start = 0u64;
        for &id in previous.map(|p| p.chunks.as_slice()).unwrap_or_default() {
            let record = reader.chunk_record(id)?;
            let len = u64::from(record.len);
            let bases = match record.encoding {
                ChunkEncoding::ZstdDelta { bases } => bases,
                _ => vec![id],
            };
            layout.push((start, len, bases));
            old_start.entry(id).or_insert(start);
            start += len;
        }
        Ok(References {
            layout,
            old_start,
            shift: 0,
            decoded: BaseCache::default(),
        })
    }

    /// A chunk at `new_offset` matched stored chunk `id`.
    fn matched(&mut self, id: u64, new_offset: u64) {
        if let Some(&old) = self.old_start.get(&id) {
            self.shift = new_offset as i64 - old as i64;
        }
    }

    /// The bases to delta a new chunk at `new_offset` of `len` bytes against.
    fn reference_for(&self, new_offset: u64, len: u64) -> Vec<u64> {
        let Some(last) = self.layout.last() else {
            return Vec::new();
        };
        let end_of_old = last.0 + last.1;
        // The old range this chunk most likely replaced. Widening it to catch
        // moved cut points measured slower for no smaller deltas.
        let from =
            (new_offset as i64 - self.shift).clamp(0, end_of_old.saturating_sub(1) as i64) as u64;
        let to = from + len;
        let first = self
            .layout
            .partition_point(|&(start, len, _)| start + len <= from);
        let mut bases: Vec<u64> = Vec::new();
        for (start, _, chunk_bases) in &self.layout[first..] {
            if *start >= to {
                break;
            }
            for &b in chunk_bases {
                if bases.last() != Some(&b) && bases.len() < MAX_DELTA_BASES {
                    bases.push(b);
                }
            }
        }
        bases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that cut into chunks of every kind (xorshift noise, with runs
    /// of zeros the gear hash cannot cut in).
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 4096) % 7 == 3 {
                    0
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn a_file_read_whole_is_cut_as_a_streamed_one() {
        for len in [
            0,
            1,
            100,
            CHUNK_MIN,
            CHUNK_MAX,
            CHUNK_MAX + 1,
            1 << 20,
            3 << 20,
        ] {
            let bytes = noise(len);
            let whole: Vec<(u64, u64, Vec<u8>)> = cut_whole(bytes.clone())
                .map(|c| c.map(|c| (c.hash, c.offset, c.data)))
                .collect::<Result<_, _>>()
                .expect("cuts");
            let streamed: Vec<(u64, u64, Vec<u8>)> = streamed(bytes.as_slice())
                .map(|c| c.map(|c| (c.hash, c.offset, c.data)))
                .collect::<Result<_, _>>()
                .expect("cuts");
            assert_eq!(whole, streamed, "{len} bytes");
            let joined: Vec<u8> = whole.iter().flat_map(|c| c.2.iter().copied()).collect();
            assert_eq!(joined, bytes, "{len} bytes");
            assert!(
                len < 3 * CHUNK_MAX || whole.len() > 3,
                "{len} bytes in {} chunks",
                whole.len()
            );
        }
    }
}
