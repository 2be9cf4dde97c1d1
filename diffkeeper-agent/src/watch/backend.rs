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

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Context, Result};
use diffkeeper_common::InodeKey;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::WatchOptions;
use crate::roots::{StateDir, STAGING_PREFIX};
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

/// What a backend reported per root and no capture has taken yet.
type Reported = Arc<std::sync::Mutex<Vec<Dirty>>>;

fn reported(roots: usize) -> Reported {
    Arc::new(std::sync::Mutex::new(
        (0..roots).map(|_| Dirty::default()).collect(),
    ))
}

/// Hands over what was reported for `root`.
fn take(reported: &Reported, root: usize) -> Dirty {
    reported
        .lock()
        .ok()
        .and_then(|mut r| r.get_mut(root).map(std::mem::take))
        .unwrap_or_default()
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
    /// Processes the backend saw write the trees (the eBPF tracer's
    /// events name them), not yet taken by [`Notices::take_writers`].
    writers: Arc<std::sync::Mutex<HashSet<u32>>>,
    /// Told of the files of a root with a name outside it (the eBPF
    /// tracer lists them for its programs).
    linked_out: Arc<std::sync::Mutex<Option<LinkedOutHook>>>,
}

type LinkedOutHook = Box<dyn Fn(usize, &LinkedOut, bool) + Send>;

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

    fn set_linked_out(&self, hook: LinkedOutHook) {
        if let Ok(mut slot) = self.linked_out.lock() {
            *slot = Some(hook);
        }
    }

    /// The processes seen writing the trees since the last call (eBPF
    /// only: inotify does not say who wrote).
    pub fn take_writers(&self) -> Vec<u32> {
        self.writers
            .lock()
            .map(|mut w| w.drain().collect())
            .unwrap_or_default()
    }

    fn wrote(&self, tgid: u32) {
        if let Ok(mut writers) = self.writers.lock() {
            writers.insert(tgid);
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

/// A running backend; dropping it stops it.
pub enum Source {
    Inotify {
        watcher: notify::RecommendedWatcher,
        /// Walks the trees every --scan-interval once inotify could not
        /// add a watch (its limit reached): directories without one report
        /// nothing.
        rescan: Box<Source>,
    },
    Scan(tokio::task::JoinHandle<()>),
    Ebpf {
        task: tokio::task::JoinHandle<()>,
        tracer: Arc<std::sync::Mutex<crate::events::Tracer>>,
        rescan: Box<Source>,
    },
}

impl Source {
    /// What is watching, for the start-up log line.
    pub fn describe(&self) -> &'static str {
        match self {
            Source::Ebpf { .. } => "the eBPF tracer",
            Source::Inotify { .. } => "inotify",
            Source::Scan(_) => "periodic scans",
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        match self {
            Source::Scan(task) => task.abort(),
            Source::Ebpf { task, tracer, .. } => {
                task.abort();
                if let Ok(tracer) = tracer.lock() {
                    if let Ok(c) = tracer.counters() {
                        tracing::info!(
                            writes = c[diffkeeper_common::counter::WRITES as usize],
                            events = c[diffkeeper_common::counter::EVENTS as usize],
                            ringbuf_full = c[diffkeeper_common::counter::RINGBUF_FULL as usize],
                            "eBPF tracer stopped"
                        );
                    }
                }
            }
            Source::Inotify { .. } => {}
        }
    }
}

/// Starts the backend `options` asks for.
pub fn start(
    options: &WatchOptions,
    roots: &[StateDir],
    store: &Path,
    notices: Notices,
) -> Result<Source> {
    match options.backend {
        Backend::Ebpf => ebpf(roots, options, notices),
        Backend::Inotify => inotify(roots, store, options.scan_interval, notices),
        Backend::Scan => Ok(scan(roots, options.scan_interval, notices, None)),
        Backend::Auto => match ebpf(roots, options, notices.clone()) {
            Ok(source) => Ok(source),
            Err(e) => {
                tracing::warn!("the eBPF tracer cannot run ({e:#}); falling back to inotify");
                match inotify(roots, store, options.scan_interval, notices.clone()) {
                    Ok(source) => Ok(source),
                    Err(e) => {
                        tracing::warn!(
                            "inotify cannot watch the state directories ({e:#}); falling back to scanning every {:?}",
                            options.scan_interval
                        );
                        Ok(scan(roots, options.scan_interval, notices, None))
                    }
                }
            }
        },
    }
}

/// How often a file with live shared writable mappings is read.
const MAPPED_RECHECK: Duration = Duration::from_secs(1);

/// Files with shared writable mappings, by (tgid, root) of their mapper.
type Mapped = std::collections::HashMap<(u32, usize), HashSet<InodeKey>>;

/// Starts the eBPF tracer on the trees, a task that turns its ring buffer's
/// events into notices (woken by the ring buffer's descriptor), and the
/// safety-net rescan.
fn ebpf(roots: &[StateDir], options: &WatchOptions, notices: Notices) -> Result<Source> {
    use std::sync::Mutex;

    use diffkeeper_common::counter;

    let paths = canonical_roots(roots)?;
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let tracer = crate::events::Tracer::start(&refs, options.syscall_hooks)?;
    tracing::info!("eBPF tracer reports through {}", tracer.hooks());
    let tracer = Arc::new(Mutex::new(tracer));
    // Inodes reported per root and not yet taken by a capture.
    let dirty = reported(roots.len());

    // Files with shared writable mappings, by the (tgid, root) of the
    // process seen storing through them. No unfrozen read of their tree is
    // quiet. A store to a page already writable reaches no hook: before
    // each capture of such a file its dirty pages are written back, which
    // makes them read-only again, so the next store faults and stamps a
    // ctime. On a file system whose writeback does not (tmpfs, ramfs) the
    // files are read every MAPPED_RECHECK while the process lives.
    let mapped: Arc<Mutex<Mapped>> = Arc::default();
    let reread: Vec<bool> = paths
        .iter()
        .map(|root| !crate::events::writeback_protects(root))
        .collect();
    {
        // Before a root is read, the ring buffer is taken (so every change
        // made before now is handed over) and the root's marks are cleared:
        // a write during the read is reported again and disturbs the batch.
        let (tracer, dirty, mapped, notices_for_hook) = (
            tracer.clone(),
            dirty.clone(),
            mapped.clone(),
            notices.clone(),
        );
        notices.set_before_capture(Box::new(move |root| {
            let Ok(mut tracer) = tracer.lock() else {
                return Dirty {
                    whole: true,
                    ..Dirty::default()
                };
            };
            take_events(&mut tracer, &dirty, &mapped, &notices_for_hook);
            let taken = take(&dirty, root);
            if taken
                .inodes
                .iter()
                .any(|key| *key == InodeKey::namespace(root as u32))
            {
                // Entries changed: files may have moved in that the
                // kernel cached as outside every tree.
                if let Err(e) = tracer.forget_memberships() {
                    tracing::warn!("{}", e.chain());
                }
            }
            for key in &taken.inodes {
                if let Err(e) = tracer.clear(key) {
                    tracing::warn!("{}", e.chain());
                }
            }
            // Writeback may take a while: the event task keeps draining.
            drop(tracer);
            protect_mapped(&mapped, root, &taken.inodes);
            taken
        }));
    }
    {
        // Files with a name outside every tree: the programs cannot find
        // their tree from that name, so they are listed for them.
        let (tracer, dirty, notices_for_hook, paths) = (
            tracer.clone(),
            dirty.clone(),
            notices.clone(),
            paths.clone(),
        );
        notices.set_linked_out(Box::new(move |root, files, walked| {
            let keys: HashSet<InodeKey> = files.keys().copied().collect();
            let added = match tracer.lock() {
                Ok(mut tracer) => tracer.set_linked(root as u32, &keys, walked),
                Err(_) => return,
            };
            let added = match added {
                Ok(added) => added,
                Err(e) => {
                    tracing::warn!("{}; writes through hard links from outside the trees are seen by the rescan only", e.chain());
                    return;
                }
            };
            // A write through the outside name before the file was listed
            // was not reported: those whose stamp moved since the capture
            // saw them are looked at again.
            let Some(tree) = paths.get(root) else { return };
            let moved: Vec<InodeKey> = added
                .into_iter()
                .filter(|key| {
                    let Some((path, ctime_ns)) = files.get(key) else {
                        return false;
                    };
                    match crate::scan::FsEntry::read(&tree.join(OsStr::from_bytes(path))) {
                        Ok(Some(now)) => now.inode != *key || now.ctime_ns != *ctime_ns,
                        _ => true,
                    }
                })
                .collect();
            if moved.is_empty() {
                return;
            }
            if let Ok(mut dirty) = dirty.lock() {
                if let Some(set) = dirty.get_mut(root) {
                    set.inodes.extend(moved);
                }
            }
            notices_for_hook.file_written(root);
        }));
    }
    {
        let (tracer, mapped) = (tracer.clone(), mapped.clone());
        notices.set_clock(Box::new(move |roots| {
            let count = tracer.lock().ok()?.root_changes(roots).ok()?;
            let mapped = mapped
                .lock()
                .is_ok_and(|m| m.keys().any(|(_, root)| roots.contains(root)));
            Some(crate::capture::Changes { count, mapped })
        }));
    }

    let ring_fd = tracer
        .lock()
        .map_err(|_| crate::error::AgentError::Refused("tracer lock poisoned".to_string()))?
        .events_fd()?;
    // SAFETY: `ring_fd` is an OwnedFd moved into the AsyncFd: it is open,
    // nothing else can close it, and it stays the same descriptor until the
    // AsyncFd is dropped.
    let wakeup = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring_fd, tokio::io::Interest::READABLE)
    }
    .context("cannot wait on the ring buffer")?;
    let task_notices = notices.clone();
    let task_tracer = tracer.clone();
    let (task_dirty, task_mapped) = (dirty.clone(), mapped.clone());
    let count = roots.len();
    let task = tokio::spawn(async move {
        let mut ringbuf_full = 0;
        let mut last_mapped_check = std::time::Instant::now();
        // Also wakes the loop now and then, for the lost-event counter and
        // for events that arrived between a drain and clearing readiness.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ready = wakeup.readable() => match ready {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        tracing::warn!("cannot wait on the eBPF ring buffer: {e}");
                        return;
                    }
                },
                _ = tick.tick() => {}
            }
            if last_mapped_check.elapsed() >= MAPPED_RECHECK {
                last_mapped_check = std::time::Instant::now();
                if let Ok(mut mapped) = task_mapped.lock() {
                    forget_exited(&mut mapped);
                    for ((_, root), files) in mapped.iter() {
                        if !reread.get(*root).copied().unwrap_or(true) {
                            continue;
                        }
                        if let Ok(mut dirty) = task_dirty.lock() {
                            if let Some(set) = dirty.get_mut(*root) {
                                set.inodes.extend(files.iter().copied());
                            }
                        }
                        task_notices.file_written(*root);
                    }
                }
            }
            let full = match task_tracer.lock() {
                Ok(mut tracer) => {
                    tracer.flush_logs();
                    // Taken and handed over under the lock, so a capture
                    // that takes the lock next sees every event before it.
                    take_events(&mut tracer, &task_dirty, &task_mapped, &task_notices);
                    tracer
                        .counters()
                        .map(|c| c[counter::RINGBUF_FULL as usize])
                        .unwrap_or(0)
                }
                Err(_) => return,
            };
            if full != ringbuf_full {
                // Events were lost: every tree is rescanned.
                tracing::warn!("eBPF ring buffer was full; rescanning every state directory");
                ringbuf_full = full;
                for root in 0..count {
                    task_notices.written(root);
                }
            }
        }
    });
    Ok(Source::Ebpf {
        task,
        tracer,
        rescan: Box::new(scan(roots, options.rescan_interval, notices, None)),
    })
}

/// Writes back the dirty pages of the mapped files among `taken` (under
/// `root`), through their mappers' `/proc/<pid>/map_files`, after a stat
/// (so the kernel stamps a fresh ctime at the next store, even in this
/// clock tick): their pages turn read-only, and a store after this faults
/// and is reported, where one to a page left writable would not be.
fn protect_mapped(mapped: &std::sync::Mutex<Mapped>, root: usize, taken: &HashSet<InodeKey>) {
    let Ok(mut mapped) = mapped.lock() else {
        return;
    };
    forget_exited(&mut mapped);
    for ((tgid, _), files) in mapped.iter().filter(|((_, r), _)| *r == root) {
        let wanted: Vec<&InodeKey> = files.iter().filter(|key| taken.contains(key)).collect();
        if wanted.is_empty() {
            continue;
        }
        let maps = match std::fs::read_to_string(format!("/proc/{tgid}/maps")) {
            Ok(maps) => maps,
            Err(_) => continue,
        };
        for key in wanted {
            let Some(range) = mapping_of(&maps, key) else {
                continue;
            };
            let path = format!("/proc/{tgid}/map_files/{range}");
            let synced = std::fs::File::open(&path).and_then(|file| {
                rustix::fs::fstat(&file)?;
                rustix::fs::fdatasync(&file)?;
                Ok(())
            });
            if let Err(e) = synced {
                tracing::debug!("cannot write back the mapped file {path}: {e}");
            }
        }
    }
}

/// Drops the mappings of processes that have exited: their stores are over.
fn forget_exited(mapped: &mut Mapped) {
    mapped.retain(|(tgid, _), _| Path::new(&format!("/proc/{tgid}")).exists());
}

/// The address range (`start-end`, as `/proc/<pid>/map_files` names it)
/// of a shared mapping of inode `key` in a `/proc/<pid>/maps` text.
fn mapping_of(maps: &str, key: &InodeKey) -> Option<String> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let _offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let ino: u64 = fields.next()?.parse().ok()?;
        let dev = InodeKey::kernel_dev(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        );
        (perms.contains('s') && ino == key.ino && dev == key.dev).then(|| range.to_string())
    })
}

/// Takes the events waiting in the tracer's ring buffer and hands them
/// over: inodes into `dirty`, a notice per event, mapping processes into
/// `mapped`.
fn take_events(
    tracer: &mut crate::events::Tracer,
    dirty: &Reported,
    mapped: &std::sync::Mutex<Mapped>,
    notices: &Notices,
) {
    let (events, lost) = match tracer.drain_events() {
        Ok(events) => (events, tracer.take_malformed()),
        Err(e) => {
            tracing::warn!("{}", e.chain());
            (Vec::new(), 1)
        }
    };
    if lost > 0 {
        // What they named is unknown: every tree is looked at.
        let roots = dirty.lock().map(|d| d.len()).unwrap_or(0);
        tracing::warn!(
            records = lost,
            "the tracer's ring buffer could not be read whole: walking every tree"
        );
        for root in 0..roots {
            notices.written(root);
        }
    }
    for event in events {
        notices.wrote(event.tgid);
        if event.flags & diffkeeper_common::WriteEvent::MAPPED != 0 {
            if let Ok(mut mapped) = mapped.lock() {
                mapped
                    .entry((event.tgid, event.root as usize))
                    .or_default()
                    .insert(event.key());
            }
        }
        if let Ok(mut dirty) = dirty.lock() {
            if let Some(set) = dirty.get_mut(event.root as usize) {
                set.inodes.insert(event.key());
            }
        }
        if event.is_namespace() {
            notices.written(event.root as usize);
        } else {
            notices.file_written(event.root as usize);
        }
    }
}

/// Marks every directory written each interval, so capture walks it and
/// finds what changed by size and mtime; with `only_after`, only once that
/// flag is set.
fn scan(
    roots: &[StateDir],
    interval: Duration,
    notices: Notices,
    only_after: Option<Arc<AtomicBool>>,
) -> Source {
    let count = roots.len();
    Source::Scan(tokio::spawn(async move {
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
    }))
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

fn inotify(
    roots: &[StateDir],
    store: &Path,
    scan_interval: Duration,
    notices: Notices,
) -> Result<Source> {
    let canonical = canonical_roots(roots)?;
    let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let roots_for_events = canonical.clone();
    // Files written in place, by path, until a capture takes them.
    let written = reported(roots.len());
    {
        let written = written.clone();
        notices.set_before_capture(Box::new(move |root| take(&written, root)));
    }
    let unwatched = Arc::new(AtomicBool::new(false));
    let rescan = scan(
        roots,
        scan_interval,
        notices.clone(),
        Some(unwatched.clone()),
    );
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Events were lost: the kernel's queue overflowed (that event
        // names no path) or a watch could not be added. Every tree is
        // walked.
        let lost = match &event {
            Ok(event) if event.need_rescan() => Some("its event queue overflowed".to_string()),
            Ok(_) => None,
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
                    && !unwatched.swap(true, Ordering::SeqCst)
                {
                    tracing::warn!(
                        "inotify cannot watch every directory (raise the sysctl \
                         fs.inotify.max_user_watches): the state directories are walked every \
                         {} from now on",
                        humantime::format_duration(scan_interval)
                    );
                }
                Some(e.to_string())
            }
        };
        if let Some(why) = lost {
            tracing::warn!("inotify: {why}; rescanning every state directory");
            for root in 0..roots_for_events.len() {
                notices.written(root);
            }
            return;
        }
        let Ok(event) = event else { return };
        if !changes_content(&event.kind) {
            return;
        }
        for path in &event.paths {
            if *path == store {
                continue;
            }
            let Some((root, relative)) = roots_for_events
                .iter()
                .enumerate()
                .find_map(|(i, r)| path.strip_prefix(r).ok().map(|rel| (i, rel)))
            else {
                continue;
            };
            let inside_staging = relative
                .components()
                .next()
                .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(STAGING_PREFIX));
            if inside_staging {
                continue;
            }
            let relative = relative.as_os_str().as_encoded_bytes();
            // Only an existing file's data changed: the capture may look at
            // it alone.
            if !relative.is_empty() && writes_data(&event.kind) {
                if let Ok(mut written) = written.lock() {
                    if let Some(dirty) = written.get_mut(root) {
                        dirty.paths.insert(relative.to_vec());
                    }
                }
                notices.file_written(root);
            } else {
                notices.written(root);
            }
        }
    })
    .context("cannot start inotify")?;
    for (root, path) in roots.iter().zip(&canonical) {
        watcher
            .watch(path, RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {} ({})", root.path.display(), root.name))?;
    }
    Ok(Source::Inotify {
        watcher,
        rescan: Box::new(rescan),
    })
}

/// Whether an event says only that an existing file's data was written.
fn writes_data(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, DataChange, ModifyKind};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Data(
                DataChange::Any | DataChange::Content | DataChange::Size
            ))
    )
}

/// Whether an event may have changed what a capture records (our own reads
/// of the files produce access events, which must not trigger captures).
fn changes_content(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}
