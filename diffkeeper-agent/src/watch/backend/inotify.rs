//! inotify as a backend (through the `notify` crate): one instance for
//! every attached directory, watching each of its directories. A file
//! written in place is reported by path; anything else marks its tree to
//! be walked. Once the kernel's limit on watches leaves a directory
//! unwatched, every tree is also walked every --scan-interval.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use notify::{EventKind, RecursiveMode, Watcher};

use super::{all_written, take, Notices, Reported, Routes};
use crate::error::{AgentError, Context, Result};
use crate::roots::{StateDir, STAGING_PREFIX};

/// The running inotify instance.
pub(super) struct Watching {
    watcher: Mutex<notify::RecommendedWatcher>,
    /// Files written in place, by path, per root id, until a capture
    /// takes them.
    written: Reported,
    /// Set once a watch could not be added (the kernel's limit reached):
    /// directories without one report nothing.
    unwatched: Arc<AtomicBool>,
}

impl Watching {
    /// Starts inotify, watching nothing yet; its events go to `routes`.
    pub(super) fn start(routes: &Routes) -> Result<Watching> {
        let written = Reported::default();
        let unwatched = Arc::new(AtomicBool::new(false));
        let (routes, events_written, events_unwatched) =
            (routes.clone(), written.clone(), unwatched.clone());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            handle(event, &routes, &events_written, &events_unwatched)
        })
        .context("cannot start inotify")?;
        Ok(Watching {
            watcher: Mutex::new(watcher),
            written,
            unwatched,
        })
    }

    /// The flag set once a directory went unwatched.
    pub(super) fn unwatched(&self) -> Arc<AtomicBool> {
        self.unwatched.clone()
    }

    /// Watches `paths` (the real paths of `roots`) as root `ids`, and sets
    /// `notices`' hook for them. Nothing is left watched if one fails.
    pub(super) fn attach(
        &self,
        ids: &[u32],
        roots: &[StateDir],
        paths: &[PathBuf],
        notices: &Notices,
    ) -> Result<()> {
        {
            let mut watcher = self.watcher.lock().map_err(|_| {
                AgentError::Refused("the inotify watcher's lock is poisoned".to_string())
            })?;
            for (done, (root, path)) in roots.iter().zip(paths).enumerate() {
                if let Err(e) = watcher.watch(path, RecursiveMode::Recursive) {
                    for path in &paths[..done] {
                        let _ = watcher.unwatch(path);
                    }
                    return Err(e).with_context(|| {
                        format!("cannot watch {} ({})", root.path.display(), root.name)
                    });
                }
            }
        }
        let (written, ids) = (self.written.clone(), ids.to_vec());
        notices.set_before_capture(Box::new(move |local| match ids.get(local) {
            Some(&id) => take(&written, id),
            None => super::Dirty {
                whole: true,
                ..super::Dirty::default()
            },
        }));
        Ok(())
    }

    /// Stops watching `paths`, root `ids`.
    pub(super) fn detach(&self, ids: &[u32], paths: &[PathBuf]) {
        if let Ok(mut watcher) = self.watcher.lock() {
            for path in paths {
                // Gone already (the directory was removed): nothing to stop.
                let _ = watcher.unwatch(path);
            }
        }
        for &id in ids {
            take(&self.written, id);
        }
    }
}

/// Turns one inotify event into notices for the root it is under.
fn handle(
    event: notify::Result<notify::Event>,
    routes: &Routes,
    written: &Reported,
    unwatched: &AtomicBool,
) {
    // Events were lost: the kernel's queue overflowed (that event names
    // no path) or a watch could not be added. Every tree is walked.
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
                     --scan-interval from now on"
                );
            }
            Some(e.to_string())
        }
    };
    if let Some(why) = lost {
        tracing::warn!("inotify: {why}; rescanning every state directory");
        all_written(routes);
        return;
    }
    let Ok(event) = event else { return };
    if !changes_content(&event.kind) {
        return;
    }
    let Ok(routes) = routes.lock() else { return };
    for path in &event.paths {
        let Some((id, route, relative)) = routes.iter().find_map(|(id, route)| {
            path.strip_prefix(&route.path)
                .ok()
                .map(|relative| (*id, route, relative))
        }) else {
            continue;
        };
        if *path == route.store {
            continue;
        }
        let inside_staging = relative
            .components()
            .next()
            .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(STAGING_PREFIX));
        if inside_staging {
            continue;
        }
        let relative = relative.as_os_str().as_encoded_bytes();
        // Only an existing file's data changed: the capture may look at it
        // alone.
        if !relative.is_empty() && writes_data(&event.kind) {
            if let Ok(mut written) = written.lock() {
                written
                    .entry(id)
                    .or_default()
                    .paths
                    .insert(relative.to_vec());
            }
            route.notices.file_written(route.local);
        } else {
            route.notices.written(route.local);
        }
    }
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
