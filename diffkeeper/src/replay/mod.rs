//! Replay: bring a state directory to the store's state of its root at a
//! moment (the latest by default), and `restore`: the same into a new
//! directory.
//!
//! Replay runs in two phases so a damaged store never damages the target.
//! First every file that must be (re)written is rebuilt, chunk by chunk and
//! in parallel, into a staging directory inside the root, and its SHA-256 is
//! checked; any failure removes the staging directory and leaves the target
//! as it was. Only then are directories created, staged files renamed into
//! place (each rename atomic, so a crash never leaves half a file), symlinks
//! placed, deleted paths removed and modes set. Files the store never
//! tracked are left alone; all file-system work goes through [`beneath`],
//! which cannot leave the root.
//!
//! Replay does not fsync by default: the store is the durable copy, and a
//! crash during replay is followed by another replay. `--sync` flushes the
//! file system before replay returns, for callers (an init container before
//! a long-running app) that want the state on disk first.

pub mod beneath;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::history::{self, Moment};
use crate::progress::Progress;
use crate::roots::{check_relative, check_symlink_target, StateDir, STAGING_PREFIX};
use crate::store::schema::EntryKind;
use crate::store::{LatestEntry, Reader, Store};
use beneath::{Present, Root};

/// Directories in the staging directory (see [`Root::create_staging`]).
const STAGING_SHARDS: usize = 16;

/// What replay did to one root.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplaySummary {
    pub root: String,
    /// Files whose content was written.
    pub written: usize,
    pub written_bytes: u64,
    /// Entries already as the store has them.
    pub unchanged: usize,
    /// Paths removed because the store records them deleted.
    pub removed: usize,
    pub dirs: usize,
    pub symlinks: usize,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} files written ({}), {} dirs, {} symlinks, {} removed, {} already current in {:.2?}",
            self.root,
            self.written,
            crate::report::bytes(self.written_bytes),
            self.dirs,
            self.symlinks,
            self.removed,
            self.unchanged,
            self.elapsed
        )
    }
}

/// What replay must do with one stored entry.
enum Action {
    /// Rebuild the content into staging, then move it into place.
    Write,
    /// Content is current; set mode (and mtime) only.
    Meta,
    Symlink,
    Dir,
    Remove,
    Nothing,
}

/// Replays every root from the store at `store_path` to its state at
/// `moment`. `Ok(None)` when there is no store yet (a first start).
pub fn replay(
    store_path: &Path,
    roots: &[StateDir],
    moment: Moment,
    sync: bool,
) -> Result<Option<Vec<ReplaySummary>>> {
    let Some(store) = Store::open_read_only(store_path)? else {
        return Ok(None);
    };
    let reader = store.reader()?;
    let batch = match moment {
        Moment::Latest => None,
        other => Some(history::moment::resolve(&reader, other)?),
    };
    let mut summaries = Vec::new();
    for root in roots {
        summaries.push(replay_root(&reader, root, batch, sync).with_context(|| {
            format!("replay of {} ({}) failed", root.name, root.path.display())
        })?);
    }
    Ok(Some(summaries))
}

/// What [`keep_current_state`] did.
pub struct KeptState {
    /// The batch the rollback goes to.
    pub target: u64,
    /// The batch that recorded the directories as they were (none when
    /// nothing had changed since the last capture).
    pub recorded: Option<u64>,
}

/// Before rolling live directories to `moment`: checks that the store can
/// show it, then captures the directories as they are now, so that nothing
/// written since the last capture is lost and the rollback can be undone.
/// With `freeze` (the app's cgroups) that capture is a consistent cut taken
/// with the app frozen for at most `max_pause`. The moment comes back as a
/// batch id, which the new batch cannot shift.
pub fn keep_current_state(
    store: &Path,
    dirs: &[StateDir],
    moment: Moment,
    freeze: Option<&crate::freeze::FreezeSet>,
    max_pause: std::time::Duration,
) -> Result<KeptState> {
    let target = {
        let opened = Store::open_existing(store)?;
        history::moment::resolve(&opened.reader()?, moment)?
    };
    let cut = crate::capture::Cut {
        freeze,
        max_pause,
        accept_torn: true,
        ..crate::capture::Cut::default()
    };
    let summary = crate::capture::capture_cut(store, dirs, &cut).with_context(|| {
        format!(
            "cannot record the current state in {} before rolling back; nothing was changed",
            store.display()
        )
    })?;
    Ok(KeptState {
        target,
        recorded: summary.batch,
    })
}

/// Materializes the state at `moment` into `to`, which must be missing or
/// empty unless `force` (then it is replayed into, leaving paths the store
/// never tracked alone). With one root (or `only` naming one) its state
/// goes into `to` itself; with several, each into `to/NAME`.
pub fn restore(
    store_path: &Path,
    to: &Path,
    only: Option<&str>,
    moment: Moment,
    force: bool,
    sync: bool,
) -> Result<Vec<ReplaySummary>> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let batch = history::moment::resolve(&reader, moment)?;
    let names = history::select_roots(&reader, only)?;
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                anyhow::bail!(
                    "{} is not empty; restore into a new or empty directory, or pass --force to replay into it",
                    to.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(to)
            .with_context(|| format!("cannot create {}", to.display()))?,
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", to.display())))
        }
    }
    let single = names.len() == 1;
    let mut summaries = Vec::new();
    for name in names {
        let dir = StateDir {
            path: if single {
                to.to_path_buf()
            } else {
                to.join(&name)
            },
            name,
        };
        summaries.push(
            replay_root(&reader, &dir, Some(batch), sync).with_context(|| {
                format!("restore of {} into {} failed", dir.name, dir.path.display())
            })?,
        );
    }
    Ok(summaries)
}

/// Brings one root to the store's state of it after `batch` (the latest
/// state when `None`).
pub fn replay_root(
    reader: &Reader,
    root: &StateDir,
    batch: Option<u64>,
    sync: bool,
) -> Result<ReplaySummary> {
    let started = Instant::now();
    let mut summary = ReplaySummary {
        root: root.name.clone(),
        ..Default::default()
    };
    let entries = match batch {
        None => reader.latest(&root.name)?,
        Some(batch) => reader.state_at(&root.name, batch)?,
    };
    if entries.is_empty() {
        tracing::warn!(root = %root.name, store = %reader.store_path().display(), "the store has no history for this root; nothing to replay");
        return Ok(summary);
    }
    // Refuse a hostile store before touching anything.
    for entry in &entries {
        check_relative(&entry.path)
            .with_context(|| format!("store {}", reader.store_path().display()))?;
        if entry.version.kind == EntryKind::Symlink {
            check_symlink_target(&entry.path, &entry.version.target)
                .with_context(|| format!("store {}", reader.store_path().display()))?;
        }
    }
    let target = Root::open_or_create(&root.path)
        .with_context(|| format!("cannot open state directory {}", root.path.display()))?;
    // Leftovers of a replay that crashed.
    for name in target.top_names()? {
        if name.starts_with(STAGING_PREFIX.as_bytes()) {
            target.remove(&name)?;
        }
    }

    let mut actions = Vec::with_capacity(entries.len());
    for entry in &entries {
        let action = plan(&target, entry).with_context(|| {
            format!(
                "cannot inspect {}",
                crate::roots::join(&root.path, &entry.path).display()
            )
        })?;
        actions.push(action);
    }

    tracing::debug!(entries = entries.len(), elapsed = ?started.elapsed(), "replay planned");
    // Phase 1: rebuild and verify new content in staging.
    let mut to_write: Vec<(usize, &LatestEntry)> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(actions[*i], Action::Write))
        .collect();
    // Largest first, one file per task: big files start at once on every
    // core instead of queueing behind each other in one worker's half.
    to_write.sort_by_key(|(_, e)| std::cmp::Reverse(e.version.size));
    let staging_name = format!("{STAGING_PREFIX}{}", std::process::id());
    let shards = target
        .create_staging(&staging_name, STAGING_SHARDS)
        .with_context(|| format!("cannot create staging directory in {}", root.path.display()))?;
    // Where entry `i` is staged, as `i` in that directory.
    let staging = |i: usize| &shards[i % shards.len()];
    let progress = Progress::new(to_write.len() as u64, "replaying");
    let staged: Result<Vec<u64>> = to_write
        .par_iter()
        .with_max_len(1)
        .map(|(i, entry)| {
            let written =
                stage_file(reader, staging(*i), &i.to_string(), entry).with_context(|| {
                    format!(
                        "cannot rebuild {} from store {}",
                        crate::roots::join(&root.path, &entry.path).display(),
                        reader.store_path().display()
                    )
                });
            progress.inc();
            written
        })
        .collect();
    progress.finish();
    let staged = match staged {
        Ok(sizes) => sizes,
        Err(e) => {
            if let Err(cleanup) = target.remove(staging_name.as_bytes()) {
                tracing::warn!("cannot remove staging directory {staging_name}: {cleanup}");
            }
            return Err(e.context("nothing in the state directory was changed"));
        }
    };
    summary.written = staged.len();
    summary.written_bytes = staged.iter().sum();

    tracing::debug!(files = summary.written, elapsed = ?started.elapsed(), "replay staged");
    // Phase 2: apply, parents before children (entries are sorted by path).
    let at = |entry: &LatestEntry| crate::roots::join(&root.path, &entry.path);
    for (i, (entry, action)) in entries.iter().zip(&actions).enumerate() {
        let v = &entry.version;
        let result = match action {
            Action::Dir => {
                summary.dirs += 1;
                target
                    .ensure_parents(&entry.path)
                    .and_then(|_| target.ensure_dir(&entry.path))
            }
            Action::Write => target
                .ensure_parents(&entry.path)
                .and_then(|_| target.install(staging(i), &i.to_string(), &entry.path)),
            Action::Symlink => {
                summary.symlinks += 1;
                let name = format!("l{i}");
                target.ensure_parents(&entry.path).and_then(|_| {
                    beneath::create_symlink(staging(i), &name, &v.target)?;
                    target.install(staging(i), &name, &entry.path)
                })
            }
            Action::Meta => {
                summary.unchanged += 1;
                target.set_meta(&entry.path, v.mode, Some(v.mtime_ns))
            }
            Action::Remove | Action::Nothing => Ok(()),
        };
        result.with_context(|| format!("cannot restore {}", at(entry).display()))?;
    }
    tracing::debug!(elapsed = ?started.elapsed(), "replay installed");
    // Deletions and directory modes, children before parents.
    for (entry, action) in entries.iter().zip(&actions).rev() {
        match action {
            Action::Remove => {
                summary.removed += 1;
                target.remove(&entry.path)
            }
            Action::Dir => target.set_meta(&entry.path, entry.version.mode, None),
            Action::Nothing if entry.version.kind != EntryKind::Tombstone => {
                summary.unchanged += 1;
                Ok(())
            }
            _ => Ok(()),
        }
        .with_context(|| format!("cannot restore {}", at(entry).display()))?;
    }
    target
        .remove(staging_name.as_bytes())
        .with_context(|| format!("cannot remove staging directory in {}", root.path.display()))?;
    if sync {
        target.sync().context("cannot flush the state directory")?;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn plan(target: &Root, entry: &LatestEntry) -> std::io::Result<Action> {
    let v = &entry.version;
    let now = target.present(&entry.path)?;
    Ok(match v.kind {
        EntryKind::Tombstone => match now {
            Present::Missing => Action::Nothing,
            _ => Action::Remove,
        },
        EntryKind::Dir => Action::Dir,
        EntryKind::Symlink => match now {
            Present::Symlink if target.read_link(&entry.path)? == v.target => Action::Nothing,
            _ => Action::Symlink,
        },
        EntryKind::File => match now {
            Present::File {
                size,
                mtime_ns,
                mode,
            } if size == v.size && mtime_ns == v.mtime_ns => {
                if mode == v.mode {
                    Action::Nothing
                } else {
                    Action::Meta
                }
            }
            _ => Action::Write,
        },
    })
}

/// Rebuilds one file into `staging/name`, verified, with its mode and mtime.
fn stage_file(
    reader: &Reader,
    staging: &std::os::fd::OwnedFd,
    name: &str,
    entry: &LatestEntry,
) -> Result<u64> {
    // Unbuffered: content arrives in whole chunks (64-512 KiB, or the whole
    // small file), so a buffer would only add a copy.
    let mut file = beneath::create_file(staging, name)?;
    reader.write_content(&entry.version, &mut file)?;
    beneath::set_fd_meta(&file, entry.version.mode, Some(entry.version.mtime_ns))?;
    Ok(entry.version.size)
}
