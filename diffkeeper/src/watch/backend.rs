//! Where write notices come from: inotify (through the `notify` crate) or
//! periodic scanning. Every backend feeds the same [`Notices`], so the
//! coalescer and capture do not care which one runs. The eBPF tracer is the
//! next backend; until it lands, `auto` uses inotify and says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::WatchOptions;
use crate::roots::{StateDir, STAGING_PREFIX};

/// Which source of write notices to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The best available: eBPF when it is built and loads, else inotify,
    /// else scanning; says which and why.
    Auto,
    /// eBPF tracepoints (not built yet: refused with a clear message).
    Ebpf,
    /// inotify watches on every directory of the trees.
    Inotify,
    /// Walk the trees every --scan-interval.
    Scan,
}

/// The sink backends report into: which state directory was written.
#[derive(Clone)]
pub struct Notices {
    tx: UnboundedSender<usize>,
    written: Arc<Vec<Arc<AtomicBool>>>,
}

impl Notices {
    pub fn new(tx: UnboundedSender<usize>, roots: usize) -> Notices {
        Notices {
            tx,
            written: Arc::new(
                (0..roots)
                    .map(|_| Arc::new(AtomicBool::new(false)))
                    .collect(),
            ),
        }
    }

    /// State directory `root` was written.
    pub fn written(&self, root: usize) {
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
    Inotify(notify::RecommendedWatcher),
    Scan(tokio::task::JoinHandle<()>),
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Scan(task) = self {
            task.abort();
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
        Backend::Ebpf => bail!(
            "the eBPF capture backend is not built yet (diffkeeper doctor checks the kernel side); use --backend inotify or --backend scan"
        ),
        Backend::Inotify => inotify(roots, store, notices),
        Backend::Scan => Ok(scan(roots, options.scan_interval, notices)),
        Backend::Auto => {
            tracing::info!("eBPF capture is not built yet; using inotify");
            match inotify(roots, store, notices.clone()) {
                Ok(source) => Ok(source),
                Err(e) => {
                    tracing::warn!("inotify cannot watch the state directories ({e:#}); falling back to scanning every {:?}", options.scan_interval);
                    Ok(scan(roots, options.scan_interval, notices))
                }
            }
        }
    }
}

/// Marks every directory written each interval; capture then finds what
/// changed by size and mtime.
fn scan(roots: &[StateDir], interval: Duration, notices: Notices) -> Source {
    let count = roots.len();
    Source::Scan(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            for root in 0..count {
                notices.written(root);
            }
        }
    }))
}

fn inotify(roots: &[StateDir], store: &Path, notices: Notices) -> Result<Source> {
    let canonical: Vec<PathBuf> = roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(&r.path)
                .with_context(|| format!("cannot resolve {}", r.path.display()))
        })
        .collect::<Result<_>>()?;
    let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let roots_for_events = canonical.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                // Lost events (queue overflow): treat every tree as written
                // so the next capture rescans it.
                tracing::warn!("inotify: {e}; rescanning every state directory");
                for root in 0..roots_for_events.len() {
                    notices.written(root);
                }
                return;
            }
        };
        if !changes_content(&event.kind) {
            return;
        }
        for path in &event.paths {
            if *path == store {
                continue;
            }
            if let Some(root) = roots_for_events.iter().position(|r| path.starts_with(r)) {
                let inside_staging = path
                    .strip_prefix(&roots_for_events[root])
                    .ok()
                    .and_then(|rel| rel.components().next())
                    .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(STAGING_PREFIX));
                if !inside_staging {
                    notices.written(root);
                }
            }
        }
    })
    .context("cannot start inotify")?;
    for (root, path) in roots.iter().zip(&canonical) {
        watcher
            .watch(path, RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {} ({})", root.path.display(), root.name))?;
    }
    Ok(Source::Inotify(watcher))
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
