//! Coalescing: turn a stream of "this tree was written" notices into capture
//! batches at consistent moments.
//!
//! A backend ([`backend`]) reports which state directory was written. Per
//! directory, a batch is captured once the directory has been quiet for the
//! debounce window, or once the maximum latency since its first unsaved
//! write has passed, whichever comes first.
//!
//! Each batch is meant to be a consistent cut, so a database and its
//! journal restore as the app left them at one moment ([`Consistency`]):
//! in `auto` a batch is read with the app running and, if its tree was
//! written meanwhile (the eBPF tracer's per-tree counts say so exactly),
//! taken again at once with the app's cgroups frozen ([`crate::freeze`]);
//! in `freeze` every batch is frozen; in `none`, or when nothing can be
//! frozen, a disturbed batch is dropped and retried at the next quiet
//! moment, and once the maximum latency has passed committed marked torn.
//! The files a cut looks at are asked of the backend when its read starts
//! (after the freeze), so a write made just before it is in the cut.
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
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use tokio::sync::mpsc;

use crate::capture::{capture_cut, Ask, BatchSummary, Cut, Looked};
use crate::freeze::{Cgroup, FreezeSet};
use crate::roots::StateDir;
use crate::scan::InodeIndex;
pub use backend::{Backend, Hub};
use diffkeeper_common::InodeKey;

/// How the capture loop behaves.
#[derive(Debug, Clone, PartialEq)]
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
    /// cannot attribute in the kernel (a file more than 32 directories
    /// deep, a hard link whose first name is outside the tree).
    pub rescan_interval: Duration,
    /// Where the eBPF backend attaches its syscall tracepoints.
    pub syscall_hooks: crate::events::SyscallHooks,
    /// Applied every `compact_interval`; without rules, the store's saved
    /// policy is, if it has one.
    pub retention: crate::retention::Policy,
    pub compact_interval: Duration,
    /// How a batch's cut is made consistent.
    pub consistency: Consistency,
    /// Longest the writers stay frozen for one batch; past it they are
    /// thawed and the batch is marked torn.
    pub max_pause: Duration,
    /// cgroups to freeze besides the one `run` starts its app in.
    pub freeze_cgroups: Vec<PathBuf>,
    /// The paths kept (include and exclude globs); `None`: every path.
    pub filter: Option<Arc<crate::scan::PathFilter>>,
}

/// How a batch's cut is made consistent (`--consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Read with the app running; a batch written while read is taken
    /// again at once with the app's writers frozen.
    Auto,
    /// Freeze the writers for every batch.
    Freeze,
    /// Never pause: a batch written while read is dropped and taken again
    /// at the next quiet moment, and past --max-latency committed marked
    /// torn.
    None,
}

impl Consistency {
    /// Each, by name, with what it does.
    pub const ALL: [(Consistency, &'static str, &'static str); 3] = [
        (Consistency::Auto, "auto", "Read with the app running; a batch written while read is taken again at once with the app's writers frozen"),
        (Consistency::Freeze, "freeze", "Freeze the writers for every batch"),
        (Consistency::None, "none", "Never pause: a batch written while read is dropped and taken again at the next quiet moment, and past --max-latency committed marked torn"),
    ];
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            backend: Backend::Auto,
            debounce: Duration::from_millis(300),
            max_latency: Duration::from_secs(3),
            scan_interval: Duration::from_secs(2),
            rescan_interval: Duration::from_secs(30),
            syscall_hooks: crate::events::SyscallHooks::Auto,
            retention: crate::retention::Policy::default(),
            compact_interval: Duration::from_secs(3600),
            consistency: Consistency::Auto,
            max_pause: Duration::from_millis(200),
            freeze_cgroups: Vec::new(),
            filter: None,
        }
    }
}

/// Drops of a disturbed batch before the next one is committed regardless
/// (once the maximum latency has passed).
const MAX_DROPS: u32 = 3;
/// Longest wait for the first scheduled compaction after start.
const FIRST_COMPACTION: Duration = Duration::from_secs(60);
/// How often due directories are looked for, while any has unsaved
/// writes.
const TICK: Duration = Duration::from_millis(25);
/// Longest wait between tries of a capture that keeps failing.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// Tries of the final capture at a stop, a second apart: a stop cannot
/// wait for a full disk to be freed.
const FINAL_TRIES: u32 = 3;

/// The wait before try `tries + 1` after `tries` failed in a row: 1 s,
/// doubling, at most `max`.
pub fn backoff(tries: u32, max: Duration) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << tries.saturating_sub(1).min(16))
        .min(max)
}

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
    /// The kernel's change count for the directory at the last tick (eBPF
    /// only): the tracer reports a file once until it is captured, so it
    /// is this count, not the notices, that tells whether the directory
    /// is still being written.
    changes: Option<u64>,
}

impl Pending {
    /// Keeps the unsaved writes and sets when to try again: 1 s after the
    /// first failure, doubling up to [`MAX_RETRY_WAIT`].
    fn failed(&mut self) -> Duration {
        self.failures += 1;
        let wait = backoff(self.failures, MAX_RETRY_WAIT);
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last.get_or_insert(now);
        self.retry_at = Some(now + wait);
        wait
    }
}

/// How a capture loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// With a final capture of whatever was written before the stop.
    Capture,
    /// Without one: the directories are being torn down (a pod gone).
    Skip,
}

/// A pod's volumes being captured: the pod's uid, and whether discovery
/// sees the pod ending. Once it is ending, a write by a process outside
/// the pod's cgroups (the kubelet deleting its volumes), or a volume
/// directory replaced or gone (a tmpfs unmounted), stops the loop
/// without capturing: the last batch stands as the pod's state.
#[derive(Debug, Clone)]
pub struct PodGuard {
    pub uid: String,
    pub ending: Arc<AtomicBool>,
}

/// What the loop knows of a guarded pod's writers and directories.
struct Guarded {
    guard: PodGuard,
    /// Per writer cgroup id: whether it is the pod's.
    writers: std::collections::HashMap<u64, bool>,
    /// Per root, its directory's device and inode at start.
    roots: Vec<Option<(u64, u64)>>,
    /// Whether a writer outside the pod was seen while it was ending.
    foreign: bool,
    /// Whether the loop stopped capturing (said once).
    torn_down: bool,
}

/// A directory's device and inode, when it is there.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
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
    /// Batches committed marked torn.
    pub torn: u64,
    /// Files left out of a batch because they could not be read whole,
    /// each time (their previous version stays the latest).
    pub unreadable: u64,
}

/// A started capture loop: its backend is watching and the state that was
/// there at start has been captured.
pub struct CaptureLoop {
    store: PathBuf,
    roots: Vec<StateDir>,
    options: WatchOptions,
    notices: backend::Notices,
    rx: mpsc::UnboundedReceiver<usize>,
    /// The roots attached to the backend; dropping it detaches them.
    _attachment: backend::Attachment,
    summary: LoopSummary,
    /// Per root, its files by inode as of its last walk.
    inodes: Vec<Option<Arc<InodeIndex>>>,
    /// What a consistent cut freezes, when it can.
    freeze: Option<Arc<FreezeSet>>,
    /// Add the cgroups of the processes seen writing the trees to
    /// `freeze` (`watch`; `run` freezes its app's cgroup alone).
    discover: bool,
    /// Writers' cgroups already looked at (named, and frozen or refused),
    /// by id.
    writers: std::collections::HashSet<u64>,
    /// Cgroup directories by id, for writers gone before they were looked at.
    cgroup_names: crate::containers::CgroupNames,
    /// Where batches, drops and failures are counted, when metrics are kept.
    metrics: Option<crate::metrics::TargetMetrics>,
    /// The pod whose volumes these are, when discovery found them.
    pod: Option<Guarded>,
    /// The containers seen writing, for metrics set after they were.
    containers: Vec<crate::containers::Container>,
}

impl CaptureLoop {
    /// Starts the backend `options` names, then captures changes made
    /// while DiffKeeper was not running (see [`CaptureLoop::start_on`]).
    pub async fn start(
        store: &Path,
        roots: &[StateDir],
        options: &WatchOptions,
        app: Option<&Cgroup>,
    ) -> Result<CaptureLoop> {
        let hub = Hub::start(options.backend, options.syscall_hooks)?;
        CaptureLoop::start_on(&hub, store, roots, options, app).await
    }

    /// Attaches `roots` to `hub` (whose backend is used, whatever
    /// `options.backend` says), then captures changes made while
    /// DiffKeeper was not running. Writes from then on are noticed. `app`
    /// is the cgroup `run` starts its app in, frozen with
    /// --freeze-cgroup's.
    pub async fn start_on(
        hub: &Hub,
        store: &Path,
        roots: &[StateDir],
        options: &WatchOptions,
        app: Option<&Cgroup>,
    ) -> Result<CaptureLoop> {
        let (tx, rx) = mpsc::unbounded_channel::<usize>();
        let notices = backend::Notices::new(tx, roots.len());
        let attachment = hub.attach(roots, store, options, &notices)?;
        tracing::info!(
            "watching {} with {}",
            backend::describe_roots(roots),
            attachment.describe()
        );
        let discover = app.is_none() && options.consistency != Consistency::None;
        let freeze = freeze_set(options, app, discover).map(Arc::new);
        let mut capture = CaptureLoop {
            store: store.to_path_buf(),
            roots: roots.to_vec(),
            options: options.clone(),
            notices,
            rx,
            _attachment: attachment,
            summary: LoopSummary::default(),
            inodes: roots.iter().map(|_| None).collect(),
            freeze,
            discover,
            writers: Default::default(),
            cgroup_names: Default::default(),
            metrics: None,
            pod: None,
            containers: Vec::new(),
        };
        // Writers already at work are learnt from the tracer's events: a
        // start-up batch they disturb is taken again once their cgroups
        // are known, frozen.
        let mut first = capture.capture_all(capture.discover).await?;
        if first.disturbed && first.batch.is_none() {
            capture.note_writers();
            first = capture.capture_all(false).await?;
        }
        tracing::info!("start-up capture: {first}");
        if first.batch.is_some() {
            capture.summary.batches += 1;
        }
        for (index, root) in roots.iter().enumerate() {
            if let Some(looked) = first.looked.remove(&root.name) {
                capture.learn(index, looked);
            }
        }
        Ok(capture)
    }

    /// Keeps what a capture learnt of root `index`'s files: its files by
    /// inode when it walked the tree, and for the backend those with a
    /// name outside it.
    fn learn(&mut self, index: usize, looked: Looked) {
        let walked = looked.inodes.is_some();
        if let Some(inodes) = looked.inodes {
            self.inodes[index] = Some(Arc::new(inodes));
        }
        self.notices.linked_out(index, &looked.linked_out, walked);
    }

    /// Counts what the loop does into `metrics` from now on (the start-up
    /// batch included).
    pub fn set_metrics(&mut self, metrics: crate::metrics::TargetMetrics) {
        metrics.add_batches(self.summary.batches);
        metrics.store_size(&self.store);
        for container in &self.containers {
            metrics.writer(container);
        }
        self.metrics = Some(metrics);
    }

    /// Guards the directories as the volumes of pod `guard.uid` (see
    /// [`PodGuard`]).
    pub fn guard_pod(&mut self, guard: PodGuard) {
        let roots = self.roots.iter().map(|r| identity(&r.path)).collect();
        self.pod = Some(Guarded {
            guard,
            writers: Default::default(),
            roots,
            foreign: false,
            torn_down: false,
        });
    }

    /// Whether the guarded pod's volumes are being torn down: it is ending,
    /// and a writer outside it was seen or a directory is not the one
    /// captured. Said once.
    fn torn_down(&mut self) -> bool {
        let Some(pod) = &mut self.pod else {
            return false;
        };
        if pod.torn_down {
            return true;
        }
        if !pod.guard.ending.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let replaced = self
            .roots
            .iter()
            .zip(&pod.roots)
            .find(|(root, was)| identity(&root.path) != **was)
            .map(|(root, _)| {
                format!(
                    "volume directory {} is gone or replaced",
                    root.path.display()
                )
            });
        let foreign = || {
            pod.foreign
                .then(|| "a process outside the pod writes its volumes".to_string())
        };
        let Some(why) = replaced.or_else(foreign) else {
            return false;
        };
        tracing::warn!(
            "pod {} is ending and {why} (the kubelet tearing them down): stopped without capturing that; its last batch stands as its state",
            pod.guard.uid
        );
        pod.torn_down = true;
        true
    }

    /// The backend this loop's directories are attached to.
    pub fn hub(&self) -> &Hub {
        self._attachment.hub()
    }

    /// The watchdog's process id, which `run` must not end as a leftover
    /// of the app.
    pub fn watchdog_pid(&self) -> Option<u32> {
        self.freeze.as_ref().and_then(|f| f.watchdog_pid())
    }

    /// Captures as writes come until `stop` resolves, then once more so
    /// nothing written before the stop is lost.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<LoopSummary> {
        self.run_until_finish(async {
            stop.await;
            Finish::Capture
        })
        .await
    }

    /// Captures as writes come until `stop` resolves, then as it says; a
    /// guarded pod's loop also stops, without a final capture, when its
    /// volumes are torn down.
    pub async fn run_until_finish(
        mut self,
        stop: impl std::future::Future<Output = Finish>,
    ) -> Result<LoopSummary> {
        let mut finish = Finish::Capture;
        let mut pending: Vec<Pending> = self.roots.iter().map(|_| Pending::default()).collect();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        // Ticks only while a directory has unsaved writes (below): an idle
        // agent does not wake. Coming back, the first tick is at once.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first run comes soon after start, so an app restarted more
        // often than the interval still gets its history trimmed.
        let mut next_compaction =
            Instant::now() + self.options.compact_interval.min(FIRST_COMPACTION);
        loop {
            tokio::select! {
                how = &mut stop => {
                    finish = how;
                    break;
                }
                _ = tokio::time::sleep_until(next_compaction.into()) => {
                    // Never a busy loop, whatever the option says.
                    next_compaction = Instant::now()
                        + self.options.compact_interval.max(Duration::from_millis(100));
                    self.compact().await;
                }
                notice = self.rx.recv() => {
                    let Some(root) = notice else { break };
                    self.summary.notices += 1;
                    if let Some(m) = &self.metrics {
                        m.notice();
                    }
                    if let Some(p) = pending.get_mut(root) {
                        let now = Instant::now();
                        p.first.get_or_insert(now);
                        p.last = Some(now);
                    }
                }
                _ = tick.tick(), if pending.iter().any(|p| p.first.is_some()) => {
                    self.note_writers();
                    if self.torn_down() {
                        finish = Finish::Skip;
                        break;
                    }
                    for (index, p) in pending.iter_mut().enumerate() {
                        if p.first.is_none() {
                            continue;
                        }
                        let Some(now) = self.notices.clock(&[index]) else { break };
                        if p.changes.is_some_and(|seen| seen != now.count) {
                            p.last = Some(Instant::now());
                        }
                        p.changes = Some(now.count);
                    }
                    for index in due(&pending, &self.options) {
                        let root = self.roots[index].clone();
                        let failures = pending[index].failures;
                        match self.capture_root(index, &mut pending[index]).await {
                            Ok(outcome) => {
                                if let Some(looked) = outcome.looked {
                                    self.learn(index, looked);
                                }
                                if outcome.unreadable > 0 {
                                    // The rest is committed; these are
                                    // looked at again (a walk), backing off
                                    // from the tries before.
                                    self.summary.unreadable += outcome.unreadable;
                                    if let Some(m) = &self.metrics {
                                        m.unreadable(outcome.unreadable);
                                    }
                                    pending[index].failures = failures;
                                    pending[index].dirty.whole = true;
                                    let wait = pending[index].failed();
                                    tracing::warn!(root = %root.name, files = outcome.unreadable, "files not captured: trying again in {}", humantime::format_duration(wait));
                                } else {
                                    pending[index].failures = 0;
                                    pending[index].retry_at = None;
                                    if failures > 0 {
                                        tracing::info!(root = %root.name, "capturing works again after {failures} failed tries");
                                    }
                                }
                                self.summary.batches += u64::from(outcome.committed);
                                self.summary.dropped += u64::from(outcome.dropped);
                                self.summary.torn += u64::from(outcome.torn);
                            }
                            // Writes keep being noticed; the retry takes
                            // them all, as the directory is read afresh.
                            Err(e) => {
                                let wait = pending[index].failed();
                                self.summary.failures += 1;
                                if let Some(m) = &self.metrics {
                                    m.failed();
                                }
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
        self.note_writers();
        if finish == Finish::Skip || self.torn_down() {
            return Ok(self.summary);
        }
        // Whatever was written before the stop.
        let mut tries = 0;
        let last = loop {
            tries += 1;
            match self.capture_all(false).await {
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
        if last.batch.is_some() {
            tracing::info!("final capture: {last}");
            if let Some(m) = &self.metrics {
                m.batch(&last, None);
                m.store_size(&self.store);
            }
        }
        self.summary.batches += u64::from(last.batch.is_some());
        Ok(self.summary)
    }

    /// The plan for a cut of the roots `indices`.
    fn plan(&self, indices: &[usize]) -> CutPlan {
        CutPlan {
            written: indices.iter().map(|&i| self.notices.flag(i)).collect(),
            notices: self.notices.clone(),
            indices: indices.to_vec(),
            freeze: None,
            max_pause: self.options.max_pause,
            accept_torn: false,
            files: None,
            filter: self.options.filter.clone(),
        }
    }

    /// Every root at once, walked (at start and at a stop), as the
    /// consistency mode says. No later batch would take what these miss,
    /// so one that cannot be frozen and was written while read is
    /// committed marked torn (unless `may_drop`), never dropped.
    async fn capture_all(&self, may_drop: bool) -> Result<BatchSummary> {
        let indices: Vec<usize> = (0..self.roots.len()).collect();
        let plan = self.plan(&indices);
        self.capture_planned(&self.roots, plan, !may_drop, false)
            .await
    }

    /// Takes a batch of `roots` as the consistency mode says: frozen, or
    /// optimistic and (in `auto`) frozen again if written while read. In
    /// `auto` a tree still being written (`busy`: due by --max-latency, not
    /// by a quiet --debounce) is frozen at once: reading it with the app
    /// running would be disturbed, and reading it twice costs the app more
    /// than the pause. With `overdue`, an optimistic batch that cannot be
    /// frozen is committed marked torn rather than dropped.
    async fn capture_planned(
        &self,
        roots: &[StateDir],
        plan: CutPlan,
        overdue: bool,
        busy: bool,
    ) -> Result<BatchSummary> {
        let frozen = |plan: &CutPlan| CutPlan {
            freeze: self.freeze.clone(),
            accept_torn: true,
            ..plan.clone()
        };
        match (self.options.consistency, &self.freeze) {
            (Consistency::Freeze, Some(_)) => capture_now(&self.store, roots, frozen(&plan)).await,
            (Consistency::Auto, Some(_)) if busy => {
                capture_now(&self.store, roots, frozen(&plan)).await
            }
            (Consistency::Auto, Some(_)) => {
                let first = capture_now(&self.store, roots, plan.clone()).await?;
                if !first.disturbed {
                    return Ok(first);
                }
                tracing::debug!("batch written while read: taking it again frozen");
                capture_now(&self.store, roots, frozen(&plan)).await
            }
            _ => {
                let plan = CutPlan {
                    accept_torn: overdue,
                    ..plan
                };
                capture_now(&self.store, roots, plan).await
            }
        }
    }

    /// Captures one due directory. The backend's flag for it is set on
    /// every write notice, including those that arrive while it is read.
    async fn capture_root(&self, index: usize, pending: &mut Pending) -> Result<CaptureOutcome> {
        let root = &self.roots[index];
        let first = pending.first.unwrap_or_else(Instant::now);
        // Under continuous writes, or after repeated drops, a batch that
        // cannot be frozen is taken even if written while read (marked
        // torn): capture at least every max latency.
        let overdue = first.elapsed() >= self.options.max_latency || pending.drops >= MAX_DROPS;
        let busy = pending
            .last
            .is_some_and(|last| last.elapsed() < self.options.debounce);
        // What the backend reported is handed to the cut, which takes what
        // is new when its read starts; it comes back if no batch takes it.
        let dirty = Arc::new(Mutex::new(std::mem::take(&mut pending.dirty)));
        let files = ReportedFiles {
            notices: self.notices.clone(),
            index,
            root: root.path.clone(),
            inodes: self.inodes[index].clone(),
            dirty: dirty.clone(),
        };
        let plan = CutPlan {
            files: Some(Arc::new(files)),
            ..self.plan(&[index])
        };
        let result = self
            .capture_planned(std::slice::from_ref(root), plan, overdue, busy)
            .await;
        let give_back = |pending: &mut Pending| {
            if let Ok(mut dirty) = dirty.lock() {
                pending.dirty.absorb(std::mem::take(&mut *dirty));
            }
        };
        let mut result = match result {
            Ok(result) => result,
            Err(e) => {
                give_back(pending);
                return Err(e);
            }
        };
        let looked = result.looked.remove(&root.name);
        if result.disturbed && result.batch.is_none() {
            give_back(pending);
            pending.drops += 1;
            // Wait for the next quiet moment; `first` stays, so the maximum
            // latency still counts from the first unsaved write.
            pending.last = Some(Instant::now());
            tracing::debug!(root = %root.name, drops = pending.drops, "batch dropped: written while read");
            if let Some(m) = &self.metrics {
                m.dropped();
            }
            return Ok(CaptureOutcome {
                unreadable: 0,
                committed: false,
                dropped: true,
                torn: false,
                looked,
            });
        }
        if result.batch.is_some() {
            tracing::info!(root = %root.name, "{result}");
            if let Some(m) = &self.metrics {
                m.batch(&result, Some(first.elapsed()));
                m.store_size(&self.store);
            }
        }
        for (path, why) in &result.failures {
            tracing::warn!(root = %root.name, path = %path.display(), "not captured, kept as it was in the store, tried again: {why}");
        }
        // Notices that arrived during the capture are still in the channel and
        // will mark the directory dirty again; the next batch takes them.
        *pending = Pending::default();
        Ok(CaptureOutcome {
            unreadable: result.failures.len() as u64,
            committed: result.batch.is_some(),
            dropped: false,
            torn: result
                .cut
                .as_ref()
                .is_some_and(|c| c.kind == crate::store::schema::CutKind::Torn),
            looked,
        })
    }
}

impl CaptureLoop {
    /// Looks at the processes the tracer saw writing the trees: each new
    /// writer cgroup is named (the container it is, see
    /// [`crate::containers`]) and, when cuts find their writers
    /// (`discover`), added to what consistent cuts freeze; one that holds
    /// DiffKeeper itself, or the root cgroup, is refused with a warning,
    /// once.
    fn note_writers(&mut self) {
        let me = std::process::id();
        for (pid, id) in self.notices.take_writers() {
            if pid == me {
                continue;
            }
            if self.pod.is_some() {
                self.note_pod_writer(pid, id);
            }
            if self.writers.contains(&id) {
                continue;
            }
            // Gone already, and its cgroup with it: nothing to name or freeze.
            let Some(path) = self.cgroup_path(pid, id) else {
                continue;
            };
            let container = crate::containers::of_cgroup(&path);
            if let Some(c) = &container {
                if let Some(m) = &self.metrics {
                    m.writer(c);
                }
                self.containers.push(c.clone());
            }
            match &container {
                Some(c) => tracing::info!(
                    container = %c.id,
                    runtime = c.runtime,
                    pod_uid = c.pod_uid.as_deref().unwrap_or(""),
                    "{c} writes the state directories (process {pid}, cgroup {})",
                    path.display()
                ),
                None => tracing::debug!(
                    "process {pid} writes the state directories (cgroup {})",
                    path.display()
                ),
            }
            self.writers.insert(id);
            if self.discover {
                self.freeze_writer(pid, &path);
            }
        }
    }

    /// Notes whether writer cgroup `id` (process `pid`'s) is the guarded
    /// pod's, and whether one that is not wrote while the pod is ending.
    fn note_pod_writer(&mut self, pid: u32, id: u64) {
        let known = self.pod.as_ref().and_then(|p| p.writers.get(&id).copied());
        let own = match known {
            Some(own) => own,
            None => {
                // Unknown (the process and its cgroup gone already): taken
                // as the pod's, whose containers are the ones that end.
                let uid = self.pod.as_ref().map(|p| p.guard.uid.clone());
                let own = self
                    .cgroup_path(pid, id)
                    .is_none_or(|path| crate::containers::pod_of_cgroup(&path) == uid);
                if let Some(pod) = &mut self.pod {
                    pod.writers.insert(id, own);
                }
                own
            }
        };
        if let Some(pod) = &mut self.pod {
            if !own && pod.guard.ending.load(std::sync::atomic::Ordering::Relaxed) {
                pod.foreign = true;
            }
        }
    }

    /// The cgroup v2 directory of cgroup `id`, which process `pid` was in:
    /// its `/proc` entry says, if it still runs there; else the hierarchy
    /// is searched for the id.
    fn cgroup_path(&mut self, pid: u32, id: u64) -> Option<PathBuf> {
        if let Ok(path) = crate::freeze::cgroup_of_process(pid) {
            if id == 0 || std::fs::metadata(&path).is_ok_and(|m| m.ino() == id) {
                return Some(path);
            }
        }
        let hierarchy = crate::freeze::hierarchy().ok()?;
        self.cgroup_names.path(&hierarchy, id)
    }

    /// Adds the writer cgroup at `path` to what consistent cuts freeze.
    fn freeze_writer(&mut self, pid: u32, path: &Path) {
        match Cgroup::open(path) {
            Ok(cgroup) => match &self.freeze {
                Some(set) => {
                    if set.add(cgroup) {
                        tracing::info!("process {pid} writes the state directories: its cgroup {} is frozen for consistent cuts", path.display());
                    }
                }
                None => match FreezeSet::new(vec![cgroup]) {
                    Ok(set) => {
                        tracing::info!("process {pid} writes the state directories: its cgroup {} is frozen for consistent cuts", path.display());
                        self.freeze = Some(Arc::new(set));
                    }
                    Err(e) => tracing::warn!("{e}: batches written while read are marked torn"),
                },
            },
            Err(e) => tracing::warn!(
                "process {pid} writes the state directories but its cgroup cannot be frozen: {e}; \
                 batches it writes while they are read are dropped, and past --max-latency marked torn"
            ),
        }
    }
}

/// The freezer for `options`, if its consistency mode freezes and the
/// machine lets it; otherwise says what is missing (batches written while
/// read are then marked torn). With `discover`, writers' cgroups are added
/// later, so having none yet is no reason to warn.
fn freeze_set(options: &WatchOptions, app: Option<&Cgroup>, discover: bool) -> Option<FreezeSet> {
    if options.consistency == Consistency::None {
        return None;
    }
    let mut cgroups: Vec<Cgroup> = app.into_iter().cloned().collect();
    for path in &options.freeze_cgroups {
        match Cgroup::open(path) {
            Ok(cgroup) => cgroups.push(cgroup),
            Err(e) => tracing::warn!("--freeze-cgroup {}: {e}; not frozen", path.display()),
        }
    }
    if cgroups.is_empty() && discover {
        return None;
    }
    if cgroups.is_empty() {
        tracing::warn!(
            "no cgroup to freeze (`run` starts its app in one; `watch` needs --freeze-cgroup):              batches written while read are dropped and retaken, and past --max-latency marked torn"
        );
        return None;
    }
    match FreezeSet::new(cgroups) {
        Ok(set) => {
            tracing::info!("consistent cuts freeze {set:?} while they are read");
            Some(set)
        }
        Err(e) => {
            tracing::warn!("{e}: batches written while read are marked torn");
            None
        }
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
        let span = tracing::Span::current();
        let outcome = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
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
                if let Some(m) = &self.metrics {
                    m.compacted();
                    m.store_size(&self.store);
                }
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
    /// Files that could not be read whole (their previous version kept).
    unreadable: u64,
    committed: bool,
    dropped: bool,
    /// Committed, marked torn.
    torn: bool,
    /// What the capture learnt of the root's files.
    looked: Option<Looked>,
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

/// What the backend reported for one root, turned into the files a cut
/// looks at when its read starts (after the freeze, for a frozen cut).
struct ReportedFiles {
    notices: backend::Notices,
    index: usize,
    root: PathBuf,
    inodes: Option<Arc<InodeIndex>>,
    /// Reported so far and not yet in a batch.
    dirty: Arc<Mutex<backend::Dirty>>,
}

impl ReportedFiles {
    /// Takes what the backend learnt since, and lists the files to look
    /// at; `None` to walk the tree. A frozen cut walks unless the backend
    /// hands over every change made before the call (see
    /// [`backend::Notices::exact`]).
    fn take(&self, ask: Ask) -> Option<Vec<(Vec<u8>, InodeKey)>> {
        let reported = self.notices.before_capture(self.index);
        let mut dirty = self.dirty.lock().ok()?;
        dirty.absorb(reported);
        match ask {
            Ask::BeforeFreeze => return None,
            Ask::Frozen if !self.notices.exact() => return None,
            Ask::Frozen | Ask::Live => {}
        }
        reported_files(&self.root, self.inodes.as_deref(), &dirty)
    }
}

/// A cut to take, in a form that can move to a blocking thread.
#[derive(Clone)]
struct CutPlan {
    written: Vec<Arc<AtomicBool>>,
    notices: backend::Notices,
    /// The roots' indices, for the kernel's change counts.
    indices: Vec<usize>,
    freeze: Option<Arc<FreezeSet>>,
    max_pause: Duration,
    accept_torn: bool,
    /// One root's reported files; `None` walks every root.
    files: Option<Arc<ReportedFiles>>,
    filter: Option<Arc<crate::scan::PathFilter>>,
}

/// How often a capture still waiting for the store says so.
const STORE_BUSY_WARNING: Duration = Duration::from_secs(60);

/// Captures `roots` now, off the async runtime's threads. While another
/// diffkeeper process holds the store, waits and retries: writes keep
/// being noticed meanwhile and are all in the batch taken afterwards. It
/// never gives up: a watcher that exited would capture nothing more.
async fn capture_now(store: &Path, roots: &[StateDir], plan: CutPlan) -> Result<BatchSummary> {
    let mut last_said: Option<Instant> = None;
    loop {
        let (path, dirs, plan) = (store.to_path_buf(), roots.to_vec(), plan.clone());
        // The engine's log lines carry the caller's span (the daemon's
        // target) on the blocking thread too.
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            let clock = |notices: &backend::Notices, indices: &[usize]| notices.clock(indices);
            let clock = || clock(&plan.notices, &plan.indices);
            let files = plan
                .files
                .as_ref()
                .map(|files| move |ask: Ask| files.take(ask));
            let cut = Cut {
                written: &plan.written,
                clock: Some(&clock),
                freeze: plan.freeze.as_deref(),
                max_pause: plan.max_pause,
                accept_torn: plan.accept_torn,
                files: files.as_ref().map(|f| f as &crate::capture::ReportedFn),
                filter: plan.filter.as_deref(),
                index_inodes: true,
            };
            capture_cut(&path, &dirs, &cut)
        })
        .await
        .context("capture task failed")?;
        match result {
            Err(e) if matches!(e.store_error(), Some(crate::store::StoreError::InUse(_))) => {
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
            other => return Ok(other?),
        }
    }
}
