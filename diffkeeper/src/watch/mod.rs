//! Coalescing: turn a stream of "this tree was written" notices into capture
//! batches at consistent moments.
//!
//! A backend ([`backend`]) reports which state directory was written. Per
//! directory, a batch is captured once the directory has been quiet for the
//! debounce window, or once the maximum latency since its first unsaved
//! write has passed, whichever comes first. A batch read while the directory
//! is written again is dropped and retried (a bounded number of times, then
//! at the maximum latency it is taken anyway), so a committed batch is a
//! consistent cut: a database and its journal restore as the app left them
//! at one moment.
//!
//! A capture that fails (a full disk, an I/O error) is logged and retried,
//! 1 s later and then with doubling waits up to 30 s; the directory stays
//! dirty, so the retry takes every write made meanwhile. The loop never
//! exits over a failed capture: a watcher that stopped would capture
//! nothing more while the app kept writing.

pub mod backend;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::capture::{snapshot_cut, snapshot_files, BatchSummary};
use crate::roots::StateDir;
use crate::scan::InodeIndex;
pub use backend::Backend;
use diffkeeper_common::InodeKey;

/// How the capture loop behaves.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub backend: Backend,
    /// Quiet time after the last write before a directory is captured.
    pub debounce: Duration,
    /// Longest time a write may wait to be captured, even under continuous
    /// writes.
    pub max_latency: Duration,
    /// How often the scan backend walks the directories, and the inotify
    /// backend once the kernel's limit on watches left some unwatched.
    pub scan_interval: Duration,
    /// How often the eBPF backend walks them as a safety net, for what it
    /// cannot attribute in the kernel (a relative path descending into a
    /// tree from outside it, paths through symlinks or longer than 255
    /// bytes).
    pub rescan_interval: Duration,
    /// Applied every `compact_interval`; without rules, the store's saved
    /// policy is, if it has one.
    pub retention: crate::retention::Policy,
    pub compact_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            backend: Backend::Auto,
            debounce: Duration::from_millis(300),
            max_latency: Duration::from_secs(3),
            scan_interval: Duration::from_secs(2),
            rescan_interval: Duration::from_secs(30),
            retention: crate::retention::Policy::default(),
            compact_interval: Duration::from_secs(3600),
        }
    }
}

/// Drops of a disturbed batch before the next one is committed regardless
/// (once the maximum latency has passed).
const MAX_DROPS: u32 = 3;
/// Longest wait for the first scheduled compaction after start.
const FIRST_COMPACTION: Duration = Duration::from_secs(60);
/// How often due directories are looked for.
const TICK: Duration = Duration::from_millis(25);
/// Longest wait between tries of a capture that keeps failing.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// Tries of the final capture at a stop, a second apart: a stop cannot
/// wait for a full disk to be freed.
const FINAL_TRIES: u32 = 3;

/// One state directory's unsaved writes.
#[derive(Default)]
struct Pending {
    /// First write not yet in a committed batch.
    first: Option<Instant>,
    /// Latest write seen.
    last: Option<Instant>,
    /// Batches of this directory dropped in a row because it was written
    /// while they were read.
    drops: u32,
    /// Captures of this directory that failed in a row (a full disk, an
    /// I/O error), and when the next try is due.
    failures: u32,
    retry_at: Option<Instant>,
    /// What the backend reported written, kept until a batch takes it.
    dirty: backend::Dirty,
}

impl Pending {
    /// Keeps the unsaved writes and sets when to try again: 1 s after the
    /// first failure, doubling up to [`MAX_RETRY_WAIT`].
    fn failed(&mut self) -> Duration {
        self.failures += 1;
        let wait = Duration::from_secs(1)
            .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
            .min(MAX_RETRY_WAIT);
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last.get_or_insert(now);
        self.retry_at = Some(now + wait);
        wait
    }
}

/// What the loop did, for logs and tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoopSummary {
    pub batches: u64,
    pub dropped: u64,
    pub notices: u64,
    pub compactions: u64,
    /// Captures that failed and were retried.
    pub failures: u64,
}

/// A started capture loop: its backend is watching and the state that was
/// there at start has been captured.
pub struct CaptureLoop {
    store: PathBuf,
    roots: Vec<StateDir>,
    options: WatchOptions,
    notices: backend::Notices,
    rx: mpsc::UnboundedReceiver<usize>,
    _source: backend::Source,
    summary: LoopSummary,
    /// Per root, its files by inode as of its last walk.
    inodes: Vec<Option<InodeIndex>>,
}

impl CaptureLoop {
    /// Starts the backend, then captures changes made while DiffKeeper was
    /// not running. Writes from then on are noticed.
    pub async fn start(
        store: &Path,
        roots: &[StateDir],
        options: &WatchOptions,
    ) -> Result<CaptureLoop> {
        let (tx, rx) = mpsc::unbounded_channel::<usize>();
        let notices = backend::Notices::new(tx, roots.len());
        let source = backend::start(options, roots, store, notices.clone())?;
        tracing::info!(
            "watching {} with {}",
            roots
                .iter()
                .map(|r| format!("{}={}", r.name, r.path.display()))
                .collect::<Vec<_>>()
                .join(", "),
            source.describe()
        );
        let mut summary = LoopSummary::default();
        let mut first = capture_now(store, roots, None, None).await?;
        tracing::info!("start-up capture: {first}");
        if first.batch.is_some() {
            summary.batches += 1;
        }
        let inodes = roots.iter().map(|r| first.inodes.remove(&r.name)).collect();
        Ok(CaptureLoop {
            store: store.to_path_buf(),
            roots: roots.to_vec(),
            options: options.clone(),
            notices,
            rx,
            _source: source,
            summary,
            inodes,
        })
    }

    /// Captures as writes come until `stop` resolves, then once more so
    /// nothing written before the stop is lost.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<LoopSummary> {
        let mut pending: Vec<Pending> = self.roots.iter().map(|_| Pending::default()).collect();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        // The first run comes soon after start, so an app restarted more
        // often than the interval still gets its history trimmed.
        let mut next_compaction =
            Instant::now() + self.options.compact_interval.min(FIRST_COMPACTION);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep_until(next_compaction.into()) => {
                    // Never a busy loop, whatever the option says.
                    next_compaction = Instant::now()
                        + self.options.compact_interval.max(Duration::from_millis(100));
                    self.compact().await;
                }
                notice = self.rx.recv() => {
                    let Some(root) = notice else { break };
                    self.summary.notices += 1;
                    if let Some(p) = pending.get_mut(root) {
                        let now = Instant::now();
                        p.first.get_or_insert(now);
                        p.last = Some(now);
                    }
                }
                _ = tick.tick() => {
                    for index in due(&pending, &self.options) {
                        let reported = self.notices.before_capture(index);
                        pending[index].dirty.absorb(reported);
                        let root = &self.roots[index];
                        let files = reported_files(&root.path, self.inodes[index].as_ref(), &pending[index].dirty);
                        let failures = pending[index].failures;
                        match capture_root(
                            &self.store,
                            root,
                            &mut pending[index],
                            self.notices.flag(index),
                            &self.options,
                            files,
                        )
                        .await
                        {
                            Ok(mut outcome) => {
                                if let Some(walked) = outcome.inodes.take() {
                                    self.inodes[index] = Some(walked);
                                }
                                pending[index].failures = 0;
                                pending[index].retry_at = None;
                                if failures > 0 {
                                    tracing::info!(root = %root.name, "capturing works again after {failures} failed tries");
                                }
                                self.summary.batches += u64::from(outcome.committed);
                                self.summary.dropped += u64::from(outcome.dropped);
                            }
                            // Writes keep being noticed; the retry takes
                            // them all, as the directory is read afresh.
                            Err(e) => {
                                let wait = pending[index].failed();
                                self.summary.failures += 1;
                                tracing::error!(
                                    root = %root.name,
                                    "capture of {} into store {} failed (try {}), retrying in {}: {e:#}",
                                    root.path.display(),
                                    self.store.display(),
                                    pending[index].failures,
                                    humantime::format_duration(wait)
                                );
                            }
                        }
                    }
                }
            }
        }
        // Whatever was written before the stop.
        let mut tries = 0;
        let last = loop {
            tries += 1;
            match capture_now(&self.store, &self.roots, None, None).await {
                Ok(last) => break last,
                Err(e) if tries < FINAL_TRIES => {
                    tracing::error!(
                        "final capture into store {} failed (try {tries} of {FINAL_TRIES}): {e:#}",
                        self.store.display()
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(e.context(format!("final capture failed {FINAL_TRIES} times")))
                }
            }
        };
        self.summary.batches += u64::from(last.batch.is_some());
        Ok(self.summary)
    }
}

impl CaptureLoop {
    /// Applies the retention policy (the options' rules, else the store's
    /// saved policy, read anew each time) between batches. A failure is
    /// logged, not fatal: capturing matters more than trimming history.
    async fn compact(&mut self) {
        let store = self.store.clone();
        if !store.exists() {
            return;
        }
        let given = self.options.retention.clone();
        let outcome =
            tokio::task::spawn_blocking(move || {
                match crate::retention::given_or_saved(&store, &given)? {
                    Some(policy) => crate::retention::compact(&store, &policy).map(Some),
                    None => Ok(None),
                }
            })
            .await;
        match outcome {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(summary))) => {
                self.summary.compactions += 1;
                tracing::info!("retention: {summary}");
            }
            Ok(Err(e)) => tracing::warn!("retention: compaction failed, will retry: {e:#}"),
            Err(e) => tracing::warn!("retention: compaction task failed: {e}"),
        }
    }
}

/// Directories whose batch is due: quiet for the debounce window, or
/// waiting for the maximum latency.
fn due(pending: &[Pending], options: &WatchOptions) -> Vec<usize> {
    let now = Instant::now();
    pending
        .iter()
        .enumerate()
        .filter(|(_, p)| p.retry_at.is_none_or(|at| now >= at))
        .filter(|(_, p)| match (p.first, p.last) {
            (Some(first), Some(last)) => {
                now.duration_since(last) >= options.debounce
                    || now.duration_since(first) >= options.max_latency
            }
            _ => false,
        })
        .map(|(i, _)| i)
        .collect()
}

struct CaptureOutcome {
    committed: bool,
    dropped: bool,
    /// The root's files by inode, when the capture walked it.
    inodes: Option<InodeIndex>,
}

/// The files to capture, with the inode each should be: every path of each
/// inode reported (by the tracer, or found from a path inotify reported),
/// so a write through one hard link captures all its names. `None`, to walk
/// the tree, when the reports do not tell the whole change or an inode is
/// not in the last walk (a new file: the tree has new paths).
fn reported_files(
    root: &Path,
    index: Option<&InodeIndex>,
    dirty: &backend::Dirty,
) -> Option<Vec<(Vec<u8>, InodeKey)>> {
    if dirty.whole {
        return None;
    }
    let index = index?;
    let mut inodes: Vec<InodeKey> = dirty.inodes.iter().copied().collect();
    for path in &dirty.paths {
        let meta = std::fs::symlink_metadata(root.join(OsStr::from_bytes(path))).ok()?;
        inodes.push(crate::scan::inode_key(meta.dev(), meta.ino()));
    }
    let mut files = Vec::new();
    for inode in inodes {
        for path in index.get(&inode)? {
            files.push((path.clone(), inode));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    Some(files)
}

/// Captures one due directory. `written` is set by the backend on every
/// write notice for it, including those that arrive while it is read.
async fn capture_root(
    store: &Path,
    root: &StateDir,
    pending: &mut Pending,
    written: Arc<AtomicBool>,
    options: &WatchOptions,
    files: Option<Vec<(Vec<u8>, InodeKey)>>,
) -> Result<CaptureOutcome> {
    let first = pending.first.unwrap_or_else(Instant::now);
    // Under continuous writes, or after repeated drops, the batch is taken
    // even if written while read: capture at least every max latency.
    let overdue = first.elapsed() >= options.max_latency || pending.drops >= MAX_DROPS;
    written.store(false, Ordering::SeqCst);
    let mut result = capture_now(
        store,
        std::slice::from_ref(root),
        files,
        (!overdue).then_some(written),
    )
    .await?;
    let inodes = result.inodes.remove(&root.name);
    if result.disturbed {
        pending.drops += 1;
        // Wait for the next quiet moment; `first` stays, so the maximum
        // latency still counts from the first unsaved write.
        pending.last = Some(Instant::now());
        tracing::debug!(root = %root.name, drops = pending.drops, "batch dropped: written while read");
        return Ok(CaptureOutcome {
            committed: false,
            dropped: true,
            inodes,
        });
    }
    if result.batch.is_some() {
        tracing::info!(root = %root.name, "{result}");
    }
    // Notices that arrived during the capture are still in the channel and
    // will mark the directory dirty again; the next batch takes them.
    *pending = Pending::default();
    Ok(CaptureOutcome {
        committed: result.batch.is_some(),
        dropped: false,
        inodes,
    })
}

/// How often a capture still waiting for the store says so.
const STORE_BUSY_WARNING: Duration = Duration::from_secs(60);

/// Captures `roots` now, off the async runtime's threads. While another
/// diffkeeper process holds the store, waits and retries: writes keep
/// being noticed meanwhile and are all in the batch taken afterwards. It
/// never gives up: a watcher that exited would capture nothing more.
async fn capture_now(
    store: &Path,
    roots: &[StateDir],
    files: Option<Vec<(Vec<u8>, InodeKey)>>,
    disturbed: Option<Arc<AtomicBool>>,
) -> Result<BatchSummary> {
    let mut last_said: Option<Instant> = None;
    loop {
        let (path, dirs, flag) = (store.to_path_buf(), roots.to_vec(), disturbed.clone());
        let files = files.clone();
        let result = tokio::task::spawn_blocking(move || match (files, dirs.as_slice()) {
            (Some(files), [root]) => snapshot_files(&path, root, &files, flag.as_deref()),
            _ => snapshot_cut(&path, &dirs, flag.as_deref()),
        })
        .await
        .context("capture task failed")?;
        match result {
            Err(e)
                if e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<crate::store::StoreError>(),
                        Some(crate::store::StoreError::InUse(_))
                    )
                }) =>
            {
                match last_said {
                    None => tracing::info!("{e:#}; capturing when it is released"),
                    Some(t) if t.elapsed() >= STORE_BUSY_WARNING => {
                        tracing::warn!("{e:#}; still waiting to capture")
                    }
                    Some(_) => {}
                }
                if last_said.is_none_or(|t| t.elapsed() >= STORE_BUSY_WARNING) {
                    last_said = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}
