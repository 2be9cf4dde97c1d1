//! Where write notices come from: the eBPF tracer, inotify (through the
//! `notify` crate) or periodic scanning. Every backend feeds the same
//! [`Notices`], so the coalescer and capture do not care which one runs.
//!
//! The eBPF tracer sees every change in the kernel by the ctime the kernel
//! stamps on the inode (a directory's, for entries made or removed in it:
//! the tree is then walked), from any interface and mount namespace, at a
//! few ns per write and nothing for other syscalls; on file systems with
//! coarse ctimes it adds syscall tracepoints (see `events`). What it
//! cannot attribute there (see [`super::WatchOptions::rescan_interval`]) is
//! caught by a rescan every --rescan-interval. `auto` uses it when it
//! loads, and falls back to inotify, then scanning, saying why.
//!
//! The eBPF tracer names the files written by inode, inotify by path: a
//! capture of a tree where only existing files were written looks at those
//! files alone, and reads each (a report is a change, even one that kept
//! size and mtime). Anything else (a create, rename, removal, a lost
//! event) marks the tree [`Dirty::whole`], to be walked, as every notice of
//! the scan backend does. A file with a shared writable mapping has its
//! dirty pages written back before each capture, as a store to a page
//! already writable reaches no hook until writeback makes it read-only
//! (on tmpfs, which never does, it is read every second instead). inotify has no safety
//! net until the kernel's limit on watches leaves a directory unwatched;
//! from then on the trees are walked every --scan-interval.
//!
//! One backend serves every target of a process ([`Hub`]): the daemon's
//! targets share one set of eBPF programs or one inotify instance, and
//! attach and detach their state directories while it runs. Each
//! attached directory gets a root id of its own (the lowest free one, so
//! ids stay inside the kernel's per-root counters), and the hub routes
//! what the kernel reports for an id to its target's [`Notices`], under
//! the directory's index in that target: a target sees only its own
//! writes, and its capture loop counts its directories from 0 whatever
//! else is attached.

mod ebpf;
mod inotify;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{AgentError, Context, Result};
use diffkeeper_common::InodeKey;
use tokio::sync::mpsc::UnboundedSender;

use super::WatchOptions;
use crate::events::SyscallHooks;
use crate::roots::StateDir;
use crate::scan::LinkedOut;

/// Which source of write notices to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The best available: eBPF when it loads, else inotify, else
    /// scanning; says which and why.
    Auto,
    /// eBPF tracepoints, plus a safety-net rescan every --rescan-interval.
    Ebpf,
    /// inotify watches on every directory of the trees.
    Inotify,
    /// Walk the trees every --scan-interval.
    Scan,
}

impl Backend {
    /// Each, by name, with what it is.
    pub const ALL: [(Backend, &'static str, &'static str); 4] = [
        (Backend::Auto, "auto", "The best available: eBPF when it loads, else inotify, else scanning; says which and why"),
        (Backend::Ebpf, "ebpf", "eBPF tracepoints, plus a safety-net rescan every --rescan-interval"),
        (Backend::Inotify, "inotify", "inotify watches on every directory of the trees"),
        (Backend::Scan, "scan", "Walk the trees every --scan-interval"),
    ];
}

/// What a backend knows was written under a state directory since it was
/// last captured.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Anything, anywhere in it: the tree must be walked.
    pub whole: bool,
    /// Files the kernel tracer reported written, by inode.
    pub inodes: HashSet<InodeKey>,
    /// Files inotify reported written, by path relative to the root.
    pub paths: HashSet<Vec<u8>>,
}

impl Dirty {
    /// Adds what was reported since: a batch that was dropped or failed
    /// keeps what it was meant to take.
    pub fn absorb(&mut self, later: Dirty) {
        self.whole |= later.whole;
        self.inodes.extend(later.inodes);
        self.paths.extend(later.paths);
    }
}

/// The sink backends report into: which state directory was written.
#[derive(Clone)]
pub struct Notices {
    tx: UnboundedSender<usize>,
    written: Arc<Vec<Arc<AtomicBool>>>,
    /// Per directory: something other than a reported file changed.
    whole: Arc<Vec<AtomicBool>>,
    /// Called before a directory is captured (the eBPF backend clears its
    /// dirty marks there, so writes during the read are reported again,
    /// and hands over the inodes it had marked).
    before_capture: Arc<std::sync::Mutex<Option<BeforeCapture>>>,
    /// The kernel's count of changes under some roots (the eBPF tracer's
    /// `ROOT_CHANGES`), when the backend has one.
    clock: Arc<std::sync::Mutex<Option<Clock>>>,
    /// Processes the backend saw write the trees, with their cgroup ids
    /// (the eBPF tracer's events name them), not yet taken by
    /// [`Notices::take_writers`].
    writers: Arc<std::sync::Mutex<HashSet<(u32, u64)>>>,
    /// Hands over what the backend has received and not yet reported (the
    /// eBPF tracer's ring buffer), so [`Notices::take_writers`] sees every
    /// write made before it is called.
    drain: Arc<std::sync::Mutex<Option<Drain>>>,
    /// Told of the files of a root with a name outside it (the eBPF
    /// tracer lists them for its programs).
    linked_out: Arc<std::sync::Mutex<Option<LinkedOutHook>>>,
}

type LinkedOutHook = Box<dyn Fn(usize, &LinkedOut, bool) + Send>;

type Drain = Box<dyn Fn() + Send>;

type BeforeCapture = Box<dyn Fn(usize) -> Dirty + Send>;
type Clock = Box<dyn Fn(&[usize]) -> Option<crate::capture::Changes> + Send>;

impl Notices {
    pub fn new(tx: UnboundedSender<usize>, roots: usize) -> Notices {
        Notices {
            tx,
            written: Arc::new(
                (0..roots)
                    .map(|_| Arc::new(AtomicBool::new(false)))
                    .collect(),
            ),
            whole: Arc::new((0..roots).map(|_| AtomicBool::new(false)).collect()),
            before_capture: Arc::new(std::sync::Mutex::new(None)),
            clock: Arc::new(std::sync::Mutex::new(None)),
            writers: Arc::default(),
            drain: Arc::default(),
            linked_out: Arc::default(),
        }
    }

    /// Tells the backend which files of `root` a capture found to have a
    /// name outside it: all of them when `walked`, else some.
    pub fn linked_out(&self, root: usize, files: &LinkedOut, walked: bool) {
        if files.is_empty() && !walked {
            // Nothing new: most batches, which look at a few files.
            return;
        }
        if let Ok(hook) = self.linked_out.lock() {
            if let Some(hook) = hook.as_ref() {
                hook(root, files, walked);
            }
        }
    }

    fn set_drain(&self, drain: Drain) {
        if let Ok(mut slot) = self.drain.lock() {
            *slot = Some(drain);
        }
    }

    fn set_linked_out(&self, hook: LinkedOutHook) {
        if let Ok(mut slot) = self.linked_out.lock() {
            *slot = Some(hook);
        }
    }

    /// The processes seen writing the trees since the last call, each
    /// with its cgroup v2 id (eBPF only: inotify does not say who wrote).
    /// The backend's pending events are taken first: a write made before
    /// the call has its writer here, even when the event task has not run
    /// since (a start-up batch disturbed by an app that was already
    /// writing is taken again frozen only if its writer is known by then).
    pub fn take_writers(&self) -> Vec<(u32, u64)> {
        // Not under the writers' lock: draining reports writers into it.
        if let Ok(drain) = self.drain.lock() {
            if let Some(drain) = drain.as_ref() {
                drain();
            }
        }
        self.writers
            .lock()
            .map(|mut w| w.drain().collect())
            .unwrap_or_default()
    }

    fn wrote(&self, tgid: u32, cgroup: u64) {
        if let Ok(mut writers) = self.writers.lock() {
            writers.insert((tgid, cgroup));
        }
    }

    /// The kernel's count of changes under `roots` so far, exact and
    /// immediate where notices lag behind: `None` unless the eBPF tracer
    /// runs. Two equal readings mean nothing under those roots changed in
    /// between (what the tracer attributes in the kernel).
    pub fn clock(&self, roots: &[usize]) -> Option<crate::capture::Changes> {
        self.clock
            .lock()
            .ok()?
            .as_ref()
            .and_then(|clock| clock(roots))
    }

    /// Whether [`Notices::before_capture`] hands over every file changed
    /// before the call (the eBPF tracer takes its ring buffer first), so a
    /// frozen cut may look at those files alone. inotify's queue may still
    /// hold events then: its frozen cuts walk the tree.
    pub fn exact(&self) -> bool {
        self.clock.lock().is_ok_and(|clock| clock.is_some())
    }

    fn set_clock(&self, clock: Clock) {
        if let Ok(mut slot) = self.clock.lock() {
            *slot = Some(clock);
        }
    }

    /// Tells the backend that `root` is about to be read; returns what it
    /// knows was written there.
    pub fn before_capture(&self, root: usize) -> Dirty {
        let files = match self.before_capture.lock() {
            Ok(hook) => hook.as_ref().map(|hook| hook(root)),
            Err(_) => None,
        };
        let whole = self
            .whole
            .get(root)
            .is_none_or(|flag| flag.swap(false, Ordering::SeqCst));
        let mut dirty = files.unwrap_or(Dirty {
            whole: true,
            ..Dirty::default()
        });
        dirty.whole |= whole;
        dirty
    }

    fn set_before_capture(&self, hook: BeforeCapture) {
        if let Ok(mut slot) = self.before_capture.lock() {
            *slot = Some(hook);
        }
    }

    /// Something in state directory `root` changed: the tree is walked.
    pub fn written(&self, root: usize) {
        if let Some(flag) = self.whole.get(root) {
            flag.store(true, Ordering::SeqCst);
        }
        self.file_written(root);
    }

    /// A file the backend hands over by inode or path (see
    /// [`Notices::before_capture`]) was written in `root`; nothing else
    /// changed.
    pub fn file_written(&self, root: usize) {
        if let Some(flag) = self.written.get(root) {
            flag.store(true, Ordering::SeqCst);
        }
        // The loop is gone only when shutting down; nothing to report to.
        let _ = self.tx.send(root);
    }

    /// The flag set on every write to `root` (read by a capture in flight).
    pub fn flag(&self, root: usize) -> Arc<AtomicBool> {
        self.written
            .get(root)
            .cloned()
            .unwrap_or_else(|| Arc::new(AtomicBool::new(false)))
    }
}

/// What a backend reported per root id and no capture has taken yet.
type Reported = Arc<Mutex<HashMap<u32, Dirty>>>;

/// Hands over what was reported for root `id`.
fn take(reported: &Reported, id: u32) -> Dirty {
    reported
        .lock()
        .ok()
        .and_then(|mut r| r.remove(&id))
        .unwrap_or_default()
}

/// Where what is reported for a root id goes.
struct Route {
    notices: Notices,
    /// The directory's index in its target, which its notices count by.
    local: usize,
    /// Its real path, as events name it.
    path: PathBuf,
    /// Its target's store, whose own writes are no change to capture.
    store: PathBuf,
}

/// Every attached root, by id.
type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// Tells every attached root's target that its tree must be walked
/// (events were lost: what they named is unknown).
fn all_written(routes: &Routes) {
    if let Ok(routes) = routes.lock() {
        for route in routes.values() {
            route.notices.written(route.local);
        }
    }
}

/// The one backend of a process, shared by every target: targets attach
/// their state directories ([`Hub::attach`]) and detach them (dropping the
/// [`Attachment`]) while it runs. Cloning shares it; it stops when the
/// last clone and attachment are gone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    source: Source,
    routes: Routes,
    /// What was asked for: under `auto`, a directory the source cannot
    /// watch is scanned instead of refused.
    backend: Backend,
}

enum Source {
    Ebpf(ebpf::Tracing),
    Inotify(inotify::Watching),
    Scan,
}

impl Hub {
    /// Starts the source `backend` names (under `auto` the best that
    /// starts, saying why the others did not), watching nothing yet. Must
    /// be called from within the async runtime.
    pub fn start(backend: Backend, hooks: SyscallHooks) -> Result<Hub> {
        let routes = Routes::default();
        let source = match backend {
            Backend::Ebpf => Source::Ebpf(ebpf::Tracing::start(hooks, &routes)?),
            Backend::Inotify => Source::Inotify(inotify::Watching::start(&routes)?),
            Backend::Scan => Source::Scan,
            Backend::Auto => match ebpf::Tracing::start(hooks, &routes) {
                Ok(tracing) => Source::Ebpf(tracing),
                Err(e) => {
                    tracing::warn!("the eBPF tracer cannot run ({e:#}); falling back to inotify");
                    match inotify::Watching::start(&routes) {
                        Ok(watching) => Source::Inotify(watching),
                        Err(e) => {
                            tracing::warn!(
                                "inotify cannot start ({e:#}); falling back to scanning every --scan-interval"
                            );
                            Source::Scan
                        }
                    }
                }
            },
        };
        Ok(Hub {
            shared: Arc::new(Shared {
                source,
                routes,
                backend,
            }),
        })
    }

    /// The tracer's counters (writes it saw, events it sent, ring-buffer
    /// overflows), when the eBPF tracer runs.
    pub fn tracer_counters(&self) -> Option<[u64; 3]> {
        match &self.shared.source {
            Source::Ebpf(tracing) => tracing.counters(),
            _ => None,
        }
    }

    /// What is watching, for logs.
    pub fn describe(&self) -> &'static str {
        match self.shared.source {
            Source::Ebpf(_) => "the eBPF tracer",
            Source::Inotify(_) => "inotify",
            Source::Scan => "periodic scans",
        }
    }

    /// Starts reporting writes under `roots` into `notices` (by each
    /// root's index in `roots`), with the safety-net scan `options` sets.
    /// A directory inside or around another target's is refused: each
    /// write must reach one store.
    pub fn attach(
        &self,
        roots: &[StateDir],
        store: &Path,
        options: &WatchOptions,
        notices: &Notices,
    ) -> Result<Attachment> {
        let paths = canonical_roots(roots)?;
        let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
        let ids = self.route(&paths, &store, notices)?;
        let mut attachment = Attachment {
            hub: self.clone(),
            ids: ids.clone(),
            rescan: None,
            via: self.describe(),
        };
        let attached = match &self.shared.source {
            Source::Ebpf(tracing) => tracing.attach(&ids, &paths, notices),
            Source::Inotify(watching) => watching.attach(&ids, roots, &paths, notices),
            Source::Scan => Ok(()),
        };
        let only_after = match (&self.shared.source, attached) {
            (_, Err(e)) if self.shared.backend != Backend::Auto => return Err(e),
            (_, Err(e)) => {
                tracing::warn!(
                    "{} cannot watch {} ({e:#}); scanning them every {} instead",
                    self.describe(),
                    describe_roots(roots),
                    humantime::format_duration(options.scan_interval)
                );
                attachment.via = "periodic scans";
                attachment.rescan = Some(scan(roots.len(), options.scan_interval, notices, None));
                return Ok(attachment);
            }
            (Source::Inotify(watching), Ok(())) => Some(watching.unwatched()),
            (_, Ok(())) => None,
        };
        let interval = match self.shared.source {
            Source::Ebpf(_) => options.rescan_interval,
            _ => options.scan_interval,
        };
        attachment.rescan = Some(scan(roots.len(), interval, notices, only_after));
        Ok(attachment)
    }

    /// Gives each of `paths` the lowest free root id, routed to `notices`;
    /// refuses one inside or around an attached directory.
    fn route(&self, paths: &[PathBuf], store: &Path, notices: &Notices) -> Result<Vec<u32>> {
        let mut routes =
            self.shared.routes.lock().map_err(|_| {
                AgentError::Refused("the backend's routes are poisoned".to_string())
            })?;
        for path in paths {
            if let Some(other) = routes
                .values()
                .find(|r| r.path.starts_with(path) || path.starts_with(&r.path))
            {
                return Err(AgentError::Refused(format!(
                    "{} overlaps {}, which another target watches: a write there would belong to two stores",
                    path.display(),
                    other.path.display()
                )));
            }
        }
        let mut ids = Vec::with_capacity(paths.len());
        let mut next = 0u32;
        for (local, path) in paths.iter().enumerate() {
            while routes.contains_key(&next) {
                next += 1;
            }
            routes.insert(
                next,
                Route {
                    notices: notices.clone(),
                    local,
                    path: path.clone(),
                    store: store.to_path_buf(),
                },
            );
            ids.push(next);
        }
        Ok(ids)
    }

    /// Stops reporting root `ids`, and frees them.
    fn detach(&self, ids: &[u32]) {
        let paths: Vec<PathBuf> = match self.shared.routes.lock() {
            Ok(routes) => ids
                .iter()
                .filter_map(|id| routes.get(id).map(|r| r.path.clone()))
                .collect(),
            Err(_) => Vec::new(),
        };
        match &self.shared.source {
            Source::Ebpf(tracing) => tracing.detach(ids),
            Source::Inotify(watching) => watching.detach(ids, &paths),
            Source::Scan => {}
        }
        if let Ok(mut routes) = self.shared.routes.lock() {
            for id in ids {
                routes.remove(id);
            }
        }
    }
}

/// A target's directories attached to a [`Hub`]; dropping it detaches them.
pub struct Attachment {
    hub: Hub,
    ids: Vec<u32>,
    /// The safety-net (or only) scan of these directories.
    rescan: Option<tokio::task::JoinHandle<()>>,
    via: &'static str,
}

impl Attachment {
    /// What reports these directories' writes, for logs.
    pub fn describe(&self) -> &'static str {
        self.via
    }

    /// The backend they are attached to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The root ids the directories were given, in their order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(task) = self.rescan.take() {
            task.abort();
        }
        self.hub.detach(&self.ids);
    }
}

/// `name=path, ...`, for logs.
pub fn describe_roots(roots: &[StateDir]) -> String {
    roots
        .iter()
        .map(|r| format!("{}={}", r.name, r.path.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Marks a target's `count` directories written each interval, so capture
/// walks them and finds what changed by size and mtime; with `only_after`,
/// only once that flag is set.
fn scan(
    count: usize,
    interval: Duration,
    notices: &Notices,
    only_after: Option<Arc<AtomicBool>>,
) -> tokio::task::JoinHandle<()> {
    let notices = notices.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if only_after
                .as_ref()
                .is_some_and(|flag| !flag.load(Ordering::SeqCst))
            {
                continue;
            }
            for root in 0..count {
                notices.written(root);
            }
        }
    })
}

/// The state directories' real paths, as events name them.
fn canonical_roots(roots: &[StateDir]) -> Result<Vec<PathBuf>> {
    roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(&r.path)
                .with_context(|| format!("cannot resolve {}", r.path.display()))
        })
        .collect()
}
