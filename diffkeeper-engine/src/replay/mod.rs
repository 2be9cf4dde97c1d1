//! Replay: bring a state directory to the store's state of its root at a
//! moment (the latest by default), and `restore`: the same into a new
//! directory.
//!
//! Replay runs in two phases so a damaged store never damages the target.
//!
//! - **Plan.** Each stored entry is compared with what is on disk. A live
//!   file is current when its size, mtime, mode and owner match and a stamp
//!   (inode and ctime, see `store::schema`, Stamps) proves it unchanged; one
//!   that only looks current is read and its hash compared. Anything replay
//!   would replace or remove must be something the store has had at that
//!   path, as that kind (file, directory, symlink): a FIFO, a directory
//!   holding files never captured, a symlink where the store only ever had
//!   a file, stop the replay by name before anything changes, unless
//!   `--force`. Paths the store never had are left alone.
//! - **Stage.** Every file to (re)write is rebuilt, chunk by chunk and in
//!   parallel, into a staging directory inside the root, its SHA-256
//!   checked, and its owner, extended attributes, mode and mtime set (see
//!   [`crate::meta`]); any failure removes the staging directory and leaves
//!   the target as it was.
//! - **Apply.** Directories are created, staged files and symlinks moved
//!   into place (swapped with the old entry by `renameat2(RENAME_EXCHANGE)`,
//!   so each path changes in one step and the old content waits in
//!   staging), deleted paths moved aside into staging, directory metadata
//!   set. Every step is journaled; if one fails (an immutable file, a full
//!   disk, a permission) the journal is undone newest first and the
//!   directory is as it was before the replay. What was replaced or removed
//!   is deleted only once every step succeeded.
//!
//! All file-system work goes through [`beneath`], which cannot leave the
//! root. A crash midway leaves a mix, and the staging directory, which the
//! next replay removes before it completes the job.
//!
//! Replay does not fsync by default: the store is the durable copy, and a
//! crash during replay is followed by another replay. `--sync` flushes the
//! file system before replay returns, for callers (an init container before
//! a long-running app) that want the state on disk first.

pub mod beneath;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use rayon::prelude::*;

use crate::history::{self, Moment};
use crate::progress::Progress;
use crate::roots::{check_relative, check_symlink_target, StateDir, STAGING_PREFIX};
use crate::store::schema::{EntryKind, VersionRecord, PACK_BYTES};
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
    /// Paths whose owner or extended attributes could not be set (an
    /// unprivileged restore, a file system without them).
    pub not_kept: usize,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// How replay treats the directory it replays into.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Names of state directories starting now: replayed as nothing when
    /// the store has no history for them. Any other name the store lacks,
    /// while it has others, is refused (a name typed wrong would otherwise
    /// start from an empty directory).
    pub new_roots: Vec<String>,
    /// Flush the file system before returning.
    pub sync: bool,
    /// Replace or remove what the store does not track when a stored path
    /// needs its place (a directory where the store has a file, a FIFO, a
    /// file the store never captured); without it replay refuses, naming
    /// the path, and changes nothing.
    pub force: bool,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} files written ({}), {} dirs, {} symlinks, {} removed, {} already current in {:.2?}",
            self.root,
            self.written,
            crate::units::bytes(self.written_bytes),
            self.dirs,
            self.symlinks,
            self.removed,
            self.unchanged,
            self.elapsed
        )?;
        if self.not_kept > 0 {
            write!(
                f,
                "; owner or extended attributes of {} paths not kept",
                self.not_kept
            )?;
        }
        Ok(())
    }
}

/// What replay must do with one stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Rebuild the content into staging, then move it into place.
    Write,
    /// Size, mtime, mode and owner match, but no stamp proves the content:
    /// read it, and write it only if it differs.
    Verify,
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
    options: &ReplayOptions,
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
        summaries.push(replay_root(&reader, root, batch, options).with_context(|| {
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
                crate::error::bail!(
                    "{} is not empty; restore into a new or empty directory, or pass --force to replay into it",
                    to.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(to)
            .with_context(|| format!("cannot create {}", to.display()))?,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", to.display())),
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
            replay_root(
                &reader,
                &dir,
                Some(batch),
                &ReplayOptions {
                    sync,
                    force,
                    ..Default::default()
                },
            )
            .with_context(|| {
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
    options: &ReplayOptions,
) -> Result<ReplaySummary> {
    let started = Instant::now();
    let mut summary = ReplaySummary {
        root: root.name.clone(),
        ..Default::default()
    };
    // The latest state too is read as the state at the newest batch,
    // checked against the `latest` table both ways: a damaged key must
    // fail the replay, not drop a path from it.
    let at = match batch {
        Some(batch) => batch,
        None => reader.last_batch()?,
    };
    let entries = reader.state_at(&root.name, at)?;
    if entries.is_empty() {
        let others = reader.roots()?;
        if !others.is_empty() && !options.new_roots.contains(&root.name) {
            crate::error::bail!(
                "store {} has no history for a state directory named {:?}; it has {}. Give the directory one of those names ({}=DIR), or pass --new-root {} if it starts now",
                reader.store_path().display(),
                root.name,
                others
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                others[0],
                root.name
            );
        }
        tracing::info!(root = %root.name, store = %reader.store_path().display(), "the store has no history for this state directory yet: it starts empty");
        return Ok(summary);
    }
    // Refuse a hostile store before touching anything.
    for entry in &entries {
        // "" is the root itself, and can only be a directory (or a path
        // that appeared later, at a moment before it: left alone).
        if entry.path.is_empty() && entry.version.kind != EntryKind::File {
            if entry.version.kind == EntryKind::Symlink {
                crate::error::bail!(
                    "store {} records the state directory {} itself as a symlink",
                    reader.store_path().display(),
                    root.name
                );
            }
            continue;
        }
        check_relative(&entry.path)
            .with_context(|| format!("store {}", reader.store_path().display()))?;
        if entry.version.kind == EntryKind::Symlink {
            check_symlink_target(&entry.path, &entry.version.target)
                .with_context(|| format!("store {}", reader.store_path().display()))?;
        }
    }
    check_links(reader, &entries)?;
    let target = Root::open_or_create(&root.path)
        .with_context(|| format!("cannot open state directory {}", root.path.display()))?;
    // Leftovers of a replay that crashed.
    for name in target.top_names()? {
        if name.starts_with(STAGING_PREFIX.as_bytes()) {
            target.remove(&name)?;
        }
    }

    let planner = Planner {
        reader,
        root,
        target: &target,
        tracked: std::cell::OnceCell::new(),
        batch_started: reader.batch_started()?,
        force: options.force,
    };
    let mut actions = Vec::with_capacity(entries.len());
    for entry in &entries {
        actions.push(planner.plan(entry)?);
    }
    // Files that look current but that no stamp proves (written by another
    // replay, restored by a backup tool, edited with their mtime put back):
    // read, in parallel, and written only if their content differs.
    let verified: Vec<(usize, Action)> = actions
        .par_iter()
        .enumerate()
        .filter(|(_, a)| **a == Action::Verify)
        .map(|(i, _)| {
            let entry = &entries[i];
            let current = holds(&target, entry).with_context(|| {
                format!(
                    "cannot read {}",
                    crate::roots::join(&root.path, &entry.path).display()
                )
            })?;
            Ok((
                i,
                if current {
                    Action::Nothing
                } else {
                    Action::Write
                },
            ))
        })
        .collect::<Result<_>>()?;
    for (i, action) in verified {
        actions[i] = action;
    }

    tracing::debug!(entries = entries.len(), elapsed = ?started.elapsed(), "replay planned");
    // Phase 1: rebuild and verify new content in staging.
    let to_write: Vec<(usize, &LatestEntry)> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(actions[*i], Action::Write))
        .collect();
    // Largest first, one file per task: big files start at once on every
    // core instead of queueing behind each other in one worker's half.
    // Files of up to a pack's size after, in pack order: each pack is then
    // decoded once (see the store's Packs), not once per file. A record
    // that cannot be read here is reported by the file's rebuild.
    let mut order: Vec<_> = to_write
        .into_iter()
        .map(|(i, entry)| {
            let size = entry.version.size;
            let place = (size <= PACK_BYTES as u64)
                .then(|| reader.pack_place(&entry.version).ok().flatten())
                .flatten();
            (place, std::cmp::Reverse(size), i, entry)
        })
        .collect();
    order.sort_unstable_by_key(|(place, size, i, _)| (*place, *size, *i));
    let to_write: Vec<(usize, &LatestEntry)> = order
        .into_iter()
        .map(|(_, _, i, entry)| (i, entry))
        .collect();
    let staging_name = format!("{STAGING_PREFIX}{}", std::process::id());
    let shards = target
        .create_staging(&staging_name, STAGING_SHARDS)
        .with_context(|| format!("cannot create staging directory in {}", root.path.display()))?;
    // Removed on every way out, a panic's unwinding included (redb meets
    // some damage to a store file with one).
    let mut staging_guard = StagingGuard {
        target: &target,
        name: &staging_name,
        armed: true,
    };
    // Where entry `i` is staged, as `i` in that directory.
    let staging = |i: usize| &shards[i % shards.len()];
    let progress = Progress::new(to_write.len() as u64, "replaying");
    // Folded, not collected: a list of one result per file (50,000 small
    // files: about 8 MiB in rayon's per-task lists) would sit beside the
    // entries at the moment memory peaks; only what lost metadata is kept.
    let staged = to_write
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
            written.map(|(bytes, lost)| Staged {
                files: 1,
                bytes,
                not_kept: if lost.is_empty() {
                    Vec::new()
                } else {
                    vec![(entry.path.clone(), lost)]
                },
            })
        })
        .try_reduce(Staged::default, |a, b| Ok(a.and(b)));
    progress.finish();
    let staged = match staged {
        Ok(staged) => staged,
        Err(e) => {
            return Err(e.context("nothing in the state directory was changed"));
        }
    };
    summary.written = staged.files;
    summary.written_bytes = staged.bytes;
    let mut not_kept = staged.not_kept;

    tracing::debug!(files = summary.written, elapsed = ?started.elapsed(), "replay staged");
    // Phase 2: every change journaled, so a failure undoes them all.
    let mut journal = Journal {
        target: &target,
        shards: &shards,
        planner: &planner,
        done: Vec::new(),
        set_aside: 0,
    };
    let applied = apply(
        &mut journal,
        &entries,
        &actions,
        &mut summary,
        &mut not_kept,
    );
    if let Err(e) = applied {
        let failed_undo = journal.undo();
        if failed_undo.is_empty() {
            return Err(e.context(
                "every change replay had made was undone: nothing in the state directory was changed",
            ));
        }
        return Err(e.context(format!(
            "undoing what replay had changed failed for {} paths, which may be left at the new state: {}",
            failed_undo.len(),
            failed_undo.join("; ")
        )));
    }
    // Only now is what was replaced or removed really deleted.
    staging_guard.armed = false;
    target
        .remove(staging_name.as_bytes())
        .with_context(|| format!("cannot remove staging directory in {}", root.path.display()))?;
    if options.sync {
        target.sync().context("cannot flush the state directory")?;
    }
    not_kept.retain(|(_, what)| !what.is_empty());
    summary.not_kept = not_kept.len();
    if let Some((path, what)) = not_kept.first() {
        tracing::warn!(
            root = %root.name,
            "owner or extended attributes of {} paths could not be kept (first: {}: {})",
            not_kept.len(),
            crate::roots::join(&root.path, path).display(),
            what.join(", ")
        );
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Refuses a state whose symlinks leave the directory, alone or through
/// each other (see [`crate::roots::check_symlink_chains`]).
pub fn check_links(reader: &Reader, entries: &[LatestEntry]) -> Result<()> {
    let links: HashMap<&[u8], &[u8]> = entries
        .iter()
        .filter(|e| e.version.kind == EntryKind::Symlink)
        .map(|e| (e.path.as_slice(), e.version.target.as_slice()))
        .collect();
    crate::roots::check_symlink_chains(&links)
        .with_context(|| format!("store {}", reader.store_path().display()))
}

/// Removes replay's staging directory when dropped while armed.
struct StagingGuard<'a> {
    target: &'a Root,
    name: &'a str,
    armed: bool,
}

impl Drop for StagingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.target.remove(self.name.as_bytes()) {
                tracing::warn!("cannot remove staging directory {}: {e}", self.name);
            }
        }
    }
}

/// A path and what of its metadata could not be kept.
type NotKept = (Vec<u8>, Vec<String>);

/// What phase 1 of [`replay_root`] staged: files, their bytes, and the
/// paths whose metadata could not all be kept.
#[derive(Default)]
struct Staged {
    files: usize,
    bytes: u64,
    not_kept: Vec<NotKept>,
}

impl Staged {
    fn and(mut self, mut other: Staged) -> Staged {
        self.files += other.files;
        self.bytes += other.bytes;
        self.not_kept.append(&mut other.not_kept);
        self
    }
}

/// Phase 2 of [`replay_root`]: directories created, staged files and
/// symlinks moved into place, parents before children (entries are sorted
/// by path); then deletions and directory metadata, children before
/// parents.
fn apply(
    journal: &mut Journal,
    entries: &[LatestEntry],
    actions: &[Action],
    summary: &mut ReplaySummary,
    not_kept: &mut Vec<NotKept>,
) -> Result<()> {
    let root = &journal.planner.root.path;
    let at = |entry: &LatestEntry| crate::roots::join(root, &entry.path);
    for (i, (entry, action)) in entries.iter().zip(actions).enumerate() {
        let v = &entry.version;
        let result = match action {
            Action::Dir if entry.path.is_empty() => Ok(()),
            Action::Dir => {
                summary.dirs += 1;
                journal.ensure_parents(&entry.path)?;
                journal.make_dir(&entry.path)
            }
            Action::Write => {
                journal.ensure_parents(&entry.path)?;
                journal.install(i, &i.to_string(), &entry.path)
            }
            Action::Symlink => {
                summary.symlinks += 1;
                journal.ensure_parents(&entry.path)?;
                let name = format!("l{i}");
                let shard = journal.shard(i);
                beneath::create_symlink(shard, &name, &v.target)
                    .and_then(|_| crate::meta::apply_to_symlink(shard, &name, v))
                    .map_err(crate::error::EngineError::from)
                    .and_then(|kept| {
                        not_kept.push((entry.path.clone(), kept));
                        journal.install(i, &name, &entry.path)
                    })
            }
            Action::Remove | Action::Nothing | Action::Verify => Ok(()),
        };
        result.with_context(|| format!("cannot restore {}", at(entry).display()))?;
    }
    tracing::debug!("replay installed");
    for (entry, action) in entries.iter().zip(actions).rev() {
        match action {
            Action::Remove => {
                summary.removed += 1;
                journal.remove(&entry.path)
            }
            Action::Dir => journal
                .set_dir_meta(&entry.path, &entry.version)
                .map(|kept| not_kept.push((entry.path.clone(), kept))),
            Action::Nothing
                if entry.version.kind != EntryKind::Tombstone && !entry.path.is_empty() =>
            {
                summary.unchanged += 1;
                Ok(())
            }
            _ => Ok(()),
        }
        .with_context(|| format!("cannot restore {}", at(entry).display()))?;
    }
    Ok(())
}

/// Decides what replay does with each stored entry, and refuses to replace
/// what the store does not track.
struct Planner<'a> {
    reader: &'a Reader,
    root: &'a StateDir,
    target: &'a Root,
    /// The kinds each path of the root has had in any stored version:
    /// what replay may replace or remove (read when first needed).
    tracked: std::cell::OnceCell<HashMap<Vec<u8>, Kinds>>,
    batch_started: HashMap<u64, i64>,
    /// Replace untracked entries in the way too.
    force: bool,
}

impl Planner<'_> {
    fn plan(&self, entry: &LatestEntry) -> Result<Action> {
        let full = || crate::roots::join(&self.root.path, &entry.path);
        let v = &entry.version;
        if entry.path.is_empty() {
            // The root: its metadata set last, never removed or replaced.
            return Ok(match v.kind {
                EntryKind::Dir => Action::Dir,
                _ => Action::Nothing,
            });
        }
        let now = self
            .target
            .present(&entry.path)
            .with_context(|| format!("cannot inspect {}", full().display()))?;
        let action = match v.kind {
            EntryKind::Tombstone => match now {
                Present::Missing => return Ok(Action::Nothing),
                _ => Action::Remove,
            },
            EntryKind::Dir => match now {
                Present::Dir => return Ok(Action::Dir),
                _ => Action::Dir,
            },
            EntryKind::Symlink => match now {
                Present::Symlink { owner }
                    if v.owner.is_none_or(|o| o == owner)
                        && self
                            .target
                            .read_link(&entry.path)
                            .with_context(|| format!("cannot read {}", full().display()))?
                            == v.target =>
                {
                    return Ok(Action::Nothing)
                }
                _ => Action::Symlink,
            },
            EntryKind::File => match now {
                Present::File {
                    size,
                    mtime_ns,
                    mode,
                    owner,
                    stamp,
                } if size == v.size
                    && mtime_ns == v.mtime_ns
                    && mode == v.mode
                    && v.owner.is_none_or(|o| o == owner) =>
                {
                    let proven = crate::scan::proven_unchanged(
                        self.reader,
                        &self.root.name,
                        entry,
                        stamp,
                        &self.batch_started,
                    )?;
                    return Ok(if proven {
                        Action::Nothing
                    } else {
                        Action::Verify
                    });
                }
                _ => Action::Write,
            },
        };
        self.check_replaceable(&entry.path, now)?;
        Ok(action)
    }

    /// Fails, naming it, when replacing or removing what is at `rel`
    /// (`now`) would lose something the store never had: an entry of a
    /// kind no stored version of that path has, a FIFO, socket or device,
    /// or a directory holding any of these. `--force` replaces them anyway.
    fn check_replaceable(&self, rel: &[u8], now: Present) -> Result<()> {
        if self.force || now == Present::Missing {
            return Ok(());
        }
        if let Some((untracked, what)) = self.untracked_in(rel, now)? {
            let full = crate::roots::join(&self.root.path, rel);
            let found = if untracked.as_slice() == rel {
                format!("{} is {what} the store never had there", full.display())
            } else {
                format!(
                    "{} holds {}, {what} the store never had",
                    full.display(),
                    crate::roots::join(&self.root.path, &untracked).display()
                )
            };
            crate::error::bail!(
                "{found}, and replay would replace or remove it; nothing was changed (move it away, or pass --force to replace it)"
            );
        }
        Ok(())
    }

    /// The first path at or below `rel` that no stored version has as what
    /// it is now, and what it is.
    fn untracked_in(&self, rel: &[u8], now: Present) -> Result<Option<(Vec<u8>, &'static str)>> {
        let full = || crate::roots::join(&self.root.path, rel);
        let (kind, what) = match now {
            Present::Missing => return Ok(None),
            Present::File { .. } => (Kinds::FILE, "a file"),
            Present::Symlink { .. } => (Kinds::SYMLINK, "a symlink"),
            Present::Dir => (Kinds::DIR, "a directory"),
            Present::Other => return Ok(Some((rel.to_vec(), "a FIFO, socket or device"))),
        };
        if self.tracked()?.get(rel).is_none_or(|k| k.0 & kind.0 == 0) {
            return Ok(Some((rel.to_vec(), what)));
        }
        if now != Present::Dir {
            return Ok(None);
        }
        let names = self
            .target
            .names_in(rel)
            .with_context(|| format!("cannot list {}", full().display()))?;
        for name in names {
            let mut child = rel.to_vec();
            child.push(b'/');
            child.extend_from_slice(&name);
            let present = self
                .target
                .present(&child)
                .with_context(|| format!("cannot inspect {}", full().display()))?;
            if let Some(found) = self.untracked_in(&child, present)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    fn tracked(&self) -> Result<&HashMap<Vec<u8>, Kinds>> {
        if let Some(tracked) = self.tracked.get() {
            return Ok(tracked);
        }
        let mut tracked: HashMap<Vec<u8>, Kinds> = HashMap::new();
        self.reader
            .for_each_version_of::<crate::error::EngineError>(
                &self.root.name,
                |path, _, version| {
                    let kind = match version.kind {
                        EntryKind::File => Kinds::FILE,
                        EntryKind::Dir => Kinds::DIR,
                        EntryKind::Symlink => Kinds::SYMLINK,
                        EntryKind::Tombstone => return Ok(()),
                    };
                    tracked.entry(path.to_vec()).or_insert(Kinds(0)).0 |= kind.0;
                    Ok(())
                },
            )?;
        Ok(self.tracked.get_or_init(|| tracked))
    }
}

/// The kinds a path has had, as bits.
#[derive(Debug, Clone, Copy)]
struct Kinds(u8);

impl Kinds {
    const FILE: Kinds = Kinds(1);
    const DIR: Kinds = Kinds(2);
    const SYMLINK: Kinds = Kinds(4);
}

/// One change phase 2 made, and what takes it back.
enum Undo {
    /// Created this (then empty) directory.
    CreatedDir(Vec<u8>),
    /// Moved staged `name` of shard `shard` to `path`, where nothing was.
    Placed {
        shard: usize,
        name: String,
        path: Vec<u8>,
    },
    /// Swapped staged `name` with what was at `path`: the old entry is now
    /// `name` in staging.
    Exchanged {
        shard: usize,
        name: String,
        path: Vec<u8>,
    },
    /// Moved what was at `path` to `name` in staging.
    SetAside {
        shard: usize,
        name: String,
        path: Vec<u8>,
    },
    /// Changed the mode and owner of directory `path` from these.
    DirMeta {
        path: Vec<u8>,
        mode: u32,
        owner: crate::store::schema::Owner,
    },
}

/// The changes phase 2 makes to the state directory, each recorded as it
/// is made so [`Journal::undo`] can take them all back. Nothing replaced
/// or removed is deleted before replay succeeds: it waits in staging.
struct Journal<'a> {
    target: &'a Root,
    shards: &'a [std::os::fd::OwnedFd],
    planner: &'a Planner<'a>,
    done: Vec<Undo>,
    /// Entries set aside so far (their names in staging).
    set_aside: usize,
}

impl Journal<'_> {
    fn shard(&self, i: usize) -> &std::os::fd::OwnedFd {
        &self.shards[i % self.shards.len()]
    }

    /// Makes `rel` a directory: keeps one that is there, sets aside
    /// anything else (which the plan allowed).
    fn make_dir(&mut self, rel: &[u8]) -> Result<()> {
        match self.target.present(rel)? {
            Present::Dir => return Ok(()),
            Present::Missing => {}
            _ => self.set_aside(rel)?,
        }
        self.target.create_dir(rel)?;
        self.done.push(Undo::CreatedDir(rel.to_vec()));
        Ok(())
    }

    /// Makes every ancestor of `rel` a directory; one the store does not
    /// have as an entry of its own is checked like any entry in the way.
    fn ensure_parents(&mut self, rel: &[u8]) -> Result<()> {
        for (i, &b) in rel.iter().enumerate() {
            if b == b'/' {
                let parent = &rel[..i];
                let now = self.target.present(parent)?;
                if now != Present::Dir {
                    self.planner.check_replaceable(parent, now)?;
                    self.make_dir(parent)?;
                }
            }
        }
        Ok(())
    }

    /// Moves staged `name` (of entry `i`'s shard) to `rel`: swapped with a
    /// file or symlink there, placed after setting a directory aside.
    fn install(&mut self, i: usize, name: &str, rel: &[u8]) -> Result<()> {
        let shard = i % self.shards.len();
        let (name, path) = (name.to_string(), rel.to_vec());
        match self.target.present(rel)? {
            Present::Missing => {
                self.target.place(&self.shards[shard], &name, rel)?;
                self.done.push(Undo::Placed { shard, name, path });
            }
            Present::Dir => {
                self.set_aside(rel)?;
                self.target.place(&self.shards[shard], &name, rel)?;
                self.done.push(Undo::Placed { shard, name, path });
            }
            _ => match self.target.exchange(&self.shards[shard], &name, rel) {
                Ok(()) => self.done.push(Undo::Exchanged { shard, name, path }),
                // No RENAME_EXCHANGE here: the old entry is set aside
                // first, in two journaled steps.
                Err(e) if beneath::cannot_exchange(&e) => {
                    self.set_aside(rel)?;
                    self.target.place(&self.shards[shard], &name, rel)?;
                    self.done.push(Undo::Placed { shard, name, path });
                }
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    /// Removes `rel` (set aside until replay is done); missing is fine.
    fn remove(&mut self, rel: &[u8]) -> Result<()> {
        if self.target.present(rel)? != Present::Missing {
            self.set_aside(rel)?;
        }
        Ok(())
    }

    fn set_aside(&mut self, rel: &[u8]) -> Result<()> {
        let n = self.set_aside;
        self.set_aside += 1;
        let (shard, name) = (n % self.shards.len(), format!("a{n}"));
        self.target.set_aside(rel, &self.shards[shard], &name)?;
        self.done.push(Undo::SetAside {
            shard,
            name,
            path: rel.to_vec(),
        });
        Ok(())
    }

    fn set_dir_meta(&mut self, rel: &[u8], version: &VersionRecord) -> Result<Vec<String>> {
        let (mode, owner) = self.target.dir_meta(rel)?;
        self.done.push(Undo::DirMeta {
            path: rel.to_vec(),
            mode,
            owner,
        });
        Ok(self.target.set_meta(rel, version, false)?)
    }

    /// Takes back every change, newest first. Returns what could not be
    /// taken back.
    fn undo(self) -> Vec<String> {
        let mut failed = Vec::new();
        for step in self.done.into_iter().rev() {
            let (path, result) = match &step {
                Undo::CreatedDir(path) => (path, self.target.remove_empty_dir(path)),
                Undo::Placed { shard, name, path } => (
                    path,
                    self.target.set_aside(path, &self.shards[*shard], name),
                ),
                Undo::Exchanged { shard, name, path } => {
                    (path, self.target.exchange(&self.shards[*shard], name, path))
                }
                Undo::SetAside { shard, name, path } => {
                    (path, self.target.place(&self.shards[*shard], name, path))
                }
                Undo::DirMeta { path, mode, owner } => {
                    (path, self.target.reset_dir_meta(path, *mode, *owner))
                }
            };
            if let Err(e) = result {
                failed.push(format!(
                    "{}: {e}",
                    crate::roots::join(&self.planner.root.path, path).display()
                ));
            }
        }
        failed
    }
}

/// Whether the live file at `entry`'s path holds what the version does:
/// content (by hash) and extended attributes.
fn holds(target: &Root, entry: &LatestEntry) -> Result<bool> {
    let mut file = target.open_read(&entry.path)?;
    let v = &entry.version;
    if v.owner.is_some() && crate::meta::read_xattrs(&file)? != v.xattrs {
        return Ok(false);
    }
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(<[u8; 32]>::from(hasher.finalize()) == v.hash)
}

/// Rebuilds one file into `staging/name`, verified, with its owner,
/// extended attributes, mode and mtime. Returns its size and what of its
/// metadata could not be kept.
fn stage_file(
    reader: &Reader,
    staging: &std::os::fd::OwnedFd,
    name: &str,
    entry: &LatestEntry,
) -> Result<(u64, Vec<String>)> {
    // Unbuffered: content arrives in whole chunks (64-512 KiB, or the whole
    // small file), so a buffer would only add a copy. Zero blocks become
    // holes.
    let mut sparse = beneath::SparseFile::new(beneath::create_file(staging, name)?);
    reader.write_content(&entry.version, &mut sparse)?;
    let file = sparse.finish()?;
    let not_kept = crate::meta::apply(&file, &entry.version, true)?;
    Ok((entry.version.size, not_kept))
}
