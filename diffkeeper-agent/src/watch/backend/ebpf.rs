//! The eBPF tracer as a backend: one set of programs for every attached
//! directory, a task that turns its ring buffer's events into notices
//! (woken by the ring buffer's descriptor), and the hooks a capture calls
//! (take the events first, clear the dirty marks of what it takes, the
//! kernel's change counts, files with a name outside every tree).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diffkeeper_common::{counter, InodeKey};

use super::{all_written, take, Dirty, Notices, Reported, Routes};
use crate::error::{AgentError, Context, Result};
use crate::events::{SyscallHooks, Tracer};

/// How often a file with live shared writable mappings is read.
const MAPPED_RECHECK: Duration = Duration::from_secs(1);

/// Files with shared writable mappings, by (tgid, root id) of their mapper.
type Mapped = HashMap<(u32, u32), HashSet<InodeKey>>;

/// The running tracer and what its events task and hooks share.
pub(super) struct Tracing {
    tracer: Arc<Mutex<Tracer>>,
    /// Inodes reported per root id and not yet taken by a capture.
    dirty: Reported,
    /// Files with shared writable mappings, by the (tgid, root id) of the
    /// process seen storing through them. No unfrozen read of their tree
    /// is quiet. A store to a page already writable reaches no hook:
    /// before each capture of such a file its dirty pages are written
    /// back, which makes them read-only again, so the next store faults
    /// and stamps a ctime. On a file system whose writeback does not
    /// (tmpfs, ramfs) the files are read every [`MAPPED_RECHECK`] while
    /// the process lives.
    mapped: Arc<Mutex<Mapped>>,
    /// Root ids whose file system's writeback does not protect mapped
    /// pages (see `mapped`).
    reread: Arc<Mutex<HashSet<u32>>>,
    routes: Routes,
    task: tokio::task::JoinHandle<()>,
}

fn poisoned() -> AgentError {
    AgentError::Refused("the tracer's lock is poisoned".to_string())
}

impl Tracing {
    /// Loads and attaches the programs, watching nothing yet, and starts
    /// the task that hands their events to `routes`.
    pub(super) fn start(hooks: SyscallHooks, routes: &Routes) -> Result<Tracing> {
        let tracer = Tracer::start(&[], hooks)?;
        tracing::info!("eBPF tracer reports through {}", tracer.hooks());
        let ring_fd = tracer.events_fd()?;
        let tracer = Arc::new(Mutex::new(tracer));
        let dirty = Reported::default();
        let mapped: Arc<Mutex<Mapped>> = Arc::default();
        let reread: Arc<Mutex<HashSet<u32>>> = Arc::default();
        // SAFETY: `ring_fd` is an OwnedFd moved into the AsyncFd: it is
        // open, nothing else can close it, and it stays the same descriptor
        // until the AsyncFd is dropped.
        let wakeup = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring_fd, tokio::io::Interest::READABLE)
        }
        .context("cannot wait on the ring buffer")?;
        let (task_tracer, task_dirty, task_mapped, task_reread, task_routes) = (
            tracer.clone(),
            dirty.clone(),
            mapped.clone(),
            reread.clone(),
            routes.clone(),
        );
        let task = tokio::spawn(async move {
            let mut ringbuf_full = 0;
            let mut last_mapped_check = std::time::Instant::now();
            // Also wakes the loop now and then, for the lost-event counter
            // and for events that arrived between a drain and clearing
            // readiness.
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
                    reread_mapped(&task_mapped, &task_reread, &task_dirty, &task_routes);
                }
                let full = match task_tracer.lock() {
                    Ok(mut tracer) => {
                        tracer.flush_logs();
                        // Taken and handed over under the lock, so a
                        // capture that takes the lock next sees every
                        // event before it.
                        take_events(&mut tracer, &task_dirty, &task_mapped, &task_routes);
                        tracer
                            .counters()
                            .map(|c| c[counter::RINGBUF_FULL as usize])
                            .unwrap_or(0)
                    }
                    Err(_) => return,
                };
                if full != ringbuf_full {
                    tracing::warn!("eBPF ring buffer was full; rescanning every state directory");
                    ringbuf_full = full;
                    all_written(&task_routes);
                }
            }
        });
        Ok(Tracing {
            tracer,
            dirty,
            mapped,
            reread,
            routes: routes.clone(),
            task,
        })
    }

    /// Watches `paths` as root `ids` and sets `notices`' hooks for them
    /// (by index in `ids`). Nothing is left watched if one fails.
    pub(super) fn attach(&self, ids: &[u32], paths: &[PathBuf], notices: &Notices) -> Result<()> {
        {
            let mut tracer = self.tracer.lock().map_err(|_| poisoned())?;
            for (done, (&id, path)) in ids.iter().zip(paths).enumerate() {
                if let Err(e) = tracer.watch(id, path) {
                    for &id in &ids[..done] {
                        if let Err(e) = tracer.unwatch(id) {
                            tracing::warn!("{}", e.chain());
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        if let Ok(mut reread) = self.reread.lock() {
            for (&id, path) in ids.iter().zip(paths) {
                if !crate::events::writeback_protects(path) {
                    reread.insert(id);
                }
            }
        }
        self.set_hooks(ids, paths, notices);
        Ok(())
    }

    /// Stops watching root `ids`; the kernel's dirty marks of what they
    /// reported and no capture took are cleared, so those files report
    /// again wherever they are watched next.
    pub(super) fn detach(&self, ids: &[u32]) {
        let left: Vec<Dirty> = ids.iter().map(|&id| take(&self.dirty, id)).collect();
        if let Ok(mut tracer) = self.tracer.lock() {
            for &id in ids {
                match tracer.unwatch(id) {
                    Ok(()) | Err(crate::events::TracerError::NotWatched(_)) => {}
                    Err(e) => tracing::warn!("{}", e.chain()),
                }
            }
            for key in left.iter().flat_map(|d| d.inodes.iter()) {
                if let Err(e) = tracer.clear(key) {
                    tracing::warn!("{}", e.chain());
                }
            }
        }
        if let Ok(mut mapped) = self.mapped.lock() {
            mapped.retain(|(_, id), _| !ids.contains(id));
        }
        if let Ok(mut reread) = self.reread.lock() {
            for id in ids {
                reread.remove(id);
            }
        }
    }

    /// Writes seen, events sent, ring-buffer overflows, summed over CPUs.
    pub(super) fn counters(&self) -> Option<[u64; 3]> {
        let c = self.tracer.lock().ok()?.counters().ok()?;
        Some([
            c[counter::WRITES as usize],
            c[counter::EVENTS as usize],
            c[counter::RINGBUF_FULL as usize],
        ])
    }

    fn set_hooks(&self, ids: &[u32], paths: &[PathBuf], notices: &Notices) {
        let ids: Arc<[u32]> = ids.into();
        {
            // Before a root is read, the ring buffer is taken (so every
            // change made before now is handed over) and the root's marks
            // are cleared: a write during the read is reported again and
            // disturbs the batch.
            let (tracer, dirty, mapped, ids) = (
                self.tracer.clone(),
                self.dirty.clone(),
                self.mapped.clone(),
                ids.clone(),
            );
            // Held weakly: the routes hold the notices this hook lives in.
            let routes = Arc::downgrade(&self.routes);
            notices.set_before_capture(Box::new(move |local| {
                let whole = Dirty {
                    whole: true,
                    ..Dirty::default()
                };
                let (Some(&id), Ok(mut tracer)) = (ids.get(local), tracer.lock()) else {
                    return whole;
                };
                if let Some(routes) = routes.upgrade() {
                    take_events(&mut tracer, &dirty, &mapped, &routes);
                }
                let taken = take(&dirty, id);
                if taken.inodes.contains(&InodeKey::namespace(id)) {
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
                protect_mapped(&mapped, id, &taken.inodes);
                taken
            }));
        }
        {
            // Files with a name outside every tree: the programs cannot
            // find their tree from that name, so they are listed for them.
            let (tracer, dirty, notices_for_hook, ids, paths) = (
                self.tracer.clone(),
                self.dirty.clone(),
                notices.clone(),
                ids.clone(),
                paths.to_vec(),
            );
            notices.set_linked_out(Box::new(move |local, files, walked| {
                let (Some(&id), Some(tree)) = (ids.get(local), paths.get(local)) else {
                    return;
                };
                let keys: HashSet<InodeKey> = files.keys().copied().collect();
                let added = match tracer.lock() {
                    Ok(mut tracer) => tracer.set_linked(id, &keys, walked),
                    Err(_) => return,
                };
                let added = match added {
                    Ok(added) => added,
                    Err(e) => {
                        tracing::warn!("{}; writes through hard links from outside the trees are seen by the rescan only", e.chain());
                        return;
                    }
                };
                // A write through the outside name before the file was
                // listed was not reported: those whose stamp moved since
                // the capture saw them are looked at again.
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
                    dirty.entry(id).or_default().inodes.extend(moved);
                }
                notices_for_hook.file_written(local);
            }));
        }
        {
            // The events the task has not taken yet, taken now under the
            // lock it takes them under.
            let (tracer, dirty, mapped) =
                (self.tracer.clone(), self.dirty.clone(), self.mapped.clone());
            let routes = Arc::downgrade(&self.routes);
            notices.set_drain(Box::new(move || {
                if let (Some(routes), Ok(mut tracer)) = (routes.upgrade(), tracer.lock()) {
                    take_events(&mut tracer, &dirty, &mapped, &routes);
                }
            }));
        }
        {
            let (tracer, mapped) = (self.tracer.clone(), self.mapped.clone());
            notices.set_clock(Box::new(move |locals| {
                let ids: Vec<u32> = locals.iter().filter_map(|&l| ids.get(l).copied()).collect();
                let count = tracer.lock().ok()?.root_changes(&ids).ok()?;
                let mapped = mapped
                    .lock()
                    .is_ok_and(|m| m.keys().any(|(_, id)| ids.contains(id)));
                Some(crate::capture::Changes { count, mapped })
            }));
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        self.task.abort();
        if let Some([writes, events, ringbuf_full]) = self.counters() {
            tracing::info!(writes, events, ringbuf_full, "eBPF tracer stopped");
        }
    }
}

/// Marks the mapped files of roots whose writeback does not protect their
/// pages written, so they are read again.
fn reread_mapped(
    mapped: &Mutex<Mapped>,
    reread: &Mutex<HashSet<u32>>,
    dirty: &Reported,
    routes: &Routes,
) {
    let Ok(reread) = reread.lock().map(|r| r.clone()) else {
        return;
    };
    let due: Vec<(u32, Vec<InodeKey>)> = match mapped.lock() {
        Ok(mut mapped) => {
            forget_exited(&mut mapped);
            mapped
                .iter()
                .filter(|((_, id), _)| reread.contains(id))
                .map(|((_, id), files)| (*id, files.iter().copied().collect()))
                .collect()
        }
        Err(_) => return,
    };
    if due.is_empty() {
        return;
    }
    if let Ok(mut dirty) = dirty.lock() {
        for (id, files) in &due {
            dirty.entry(*id).or_default().inodes.extend(files);
        }
    }
    if let Ok(routes) = routes.lock() {
        for (id, _) in &due {
            if let Some(route) = routes.get(id) {
                route.notices.file_written(route.local);
            }
        }
    }
}
/// Writes back the dirty pages of the mapped files among `taken` (under
/// `root`), through their mappers' `/proc/<pid>/map_files`, after a stat
/// (so the kernel stamps a fresh ctime at the next store, even in this
/// clock tick): their pages turn read-only, and a store after this faults
/// and is reported, where one to a page left writable would not be.
fn protect_mapped(mapped: &Mutex<Mapped>, root: u32, taken: &HashSet<InodeKey>) {
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
/// to their roots' targets: inodes into `dirty`, a notice per event,
/// mapping processes into `mapped`. An event for a root no longer attached
/// has its dirty mark cleared, so its file reports again if watched later.
fn take_events(tracer: &mut Tracer, dirty: &Reported, mapped: &Mutex<Mapped>, routes: &Routes) {
    let (events, lost) = match tracer.drain_events() {
        Ok(events) => (events, tracer.take_malformed()),
        Err(e) => {
            tracing::warn!("{}", e.chain());
            (Vec::new(), 1)
        }
    };
    if lost > 0 {
        // What they named is unknown: every tree is looked at.
        tracing::warn!(
            records = lost,
            "the tracer's ring buffer could not be read whole: walking every tree"
        );
        all_written(routes);
    }
    if events.is_empty() {
        return;
    }
    let Ok(routes) = routes.lock() else { return };
    for event in events {
        let Some(route) = routes.get(&event.root) else {
            if let Err(e) = tracer.clear(&event.key()) {
                tracing::warn!("{}", e.chain());
            }
            continue;
        };
        route.notices.wrote(event.tgid, event.cgroup);
        if event.flags & diffkeeper_common::WriteEvent::MAPPED != 0 {
            if let Ok(mut mapped) = mapped.lock() {
                mapped
                    .entry((event.tgid, event.root))
                    .or_default()
                    .insert(event.key());
            }
        }
        if let Ok(mut dirty) = dirty.lock() {
            dirty
                .entry(event.root)
                .or_default()
                .inodes
                .insert(event.key());
        }
        if event.is_namespace() {
            route.notices.written(route.local);
        } else {
            route.notices.file_written(route.local);
        }
    }
}
