//! Change detection by scanning: walk a state directory and compare it with
//! the store's latest state of that root.
//!
//! This is the stage that finds *which* paths changed (the kernel tracer of
//! a later stage feeds the same [`Change`] list). Files whose size, mtime,
//! mode and owner match the store, and whose inode and ctime match a stamp
//! that proves them unchanged (see `store::schema`, Stamps), are not read at
//! all; everything else goes to capture, which drops files whose content
//! and metadata turn out unchanged.

pub mod filter;
pub use filter::PathFilter;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use diffkeeper_common::InodeKey;

use crate::roots::{StateDir, STAGING_PREFIX};
use crate::store::schema::{EntryKind, Owner, Stamp, VersionRecord};
use crate::store::{LatestEntry, Reader};

/// A file's modification time in nanoseconds since the Unix epoch.
pub fn mtime_ns(meta: &fs::Metadata) -> i64 {
    nanos(meta.mtime(), meta.mtime_nsec())
}

/// The inode and ctime of a stat: what proves a file unchanged.
pub fn stamp_of(meta: &fs::Metadata) -> Stamp {
    Stamp {
        ino: meta.ino(),
        ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
    }
}

/// A time in nanoseconds since the Unix epoch. Times past 2262 (or before
/// 1678) do not fit, and are held at the limit.
pub fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// What a path is on disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// Symlink target bytes.
    pub target: Vec<u8>,
    /// Which inode it is, as the kernel tracer names it.
    pub inode: InodeKey,
    pub owner: Owner,
    pub ctime_ns: i64,
    /// How many names the inode has, anywhere.
    pub nlink: u64,
}

impl FsEntry {
    /// The inode number and ctime it was seen with.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            ino: self.inode.ino,
            ctime_ns: self.ctime_ns,
        }
    }
}

/// The regular files of a tree by inode (hard links give an inode several
/// paths), as of its last full walk: what lets a capture look only at the
/// files the kernel tracer reported written.
pub type InodeIndex = HashMap<InodeKey, Vec<Vec<u8>>>;

/// The files of a tree that also have a name outside it (more links than
/// names in the tree: a hard link from elsewhere), each with one of its
/// names in the tree and the ctime it was seen with. The kernel tracer
/// cannot find their tree from the outside name, so it is told of them.
pub type LinkedOut = HashMap<InodeKey, (Vec<u8>, i64)>;

/// Adds `entry` (at `path`, with `names` names in the tree) to `linked`
/// when it has more.
fn note_linked_out(linked: &mut LinkedOut, path: &[u8], entry: &FsEntry, names: usize) {
    if entry.kind == EntryKind::File && entry.nlink > names as u64 {
        linked
            .entry(entry.inode)
            .or_insert_with(|| (path.to_vec(), entry.ctime_ns));
    }
}

/// An inode's identity from a stat: the kernel's device encoding.
pub fn inode_key(dev: u64, ino: u64) -> InodeKey {
    InodeKey {
        ino,
        dev: InodeKey::kernel_dev(rustix::fs::major(dev), rustix::fs::minor(dev)),
        pad: 0,
    }
}

impl FsEntry {
    /// Reads what `path` is, without following a final symlink. `Ok(None)`
    /// for special files (sockets, FIFOs, devices), which are not kept.
    pub fn read(path: &Path) -> io::Result<Option<FsEntry>> {
        FsEntry::at(rustix::fs::CWD, path.as_os_str())
    }

    /// What `name` in directory `dir` is, without following it: see
    /// [`FsEntry::read`].
    pub fn at(dir: impl std::os::fd::AsFd, name: &std::ffi::OsStr) -> io::Result<Option<FsEntry>> {
        use rustix::fs::{AtFlags, FileType};
        let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            _ => return Ok(None),
        };
        let target = if kind == EntryKind::Symlink {
            rustix::fs::readlinkat(&dir, name, Vec::new())?.into_bytes()
        } else {
            Vec::new()
        };
        Ok(Some(FsEntry {
            kind,
            mode: stat.st_mode & 0o7777,
            mtime_ns: nanos(stat.st_mtime as i64, stat.st_mtime_nsec as i64),
            size: match kind {
                EntryKind::Symlink => target.len() as u64,
                EntryKind::File => stat.st_size as u64,
                _ => 0,
            },
            target,
            inode: inode_key(stat.st_dev, stat.st_ino),
            owner: Owner {
                uid: stat.st_uid,
                gid: stat.st_gid,
            },
            ctime_ns: nanos(stat.st_ctime as i64, stat.st_ctime_nsec as i64),
            nlink: stat.st_nlink as u64,
        }))
    }
}

/// One path whose stored state must be brought up to date.
#[derive(Debug, Clone)]
pub enum Change {
    /// New or changed: `previous` is the newest stored version, if any and
    /// not a tombstone. A file's content is always read (and stored again
    /// only where it differs).
    Write {
        path: Vec<u8>,
        entry: FsEntry,
        previous: Option<Box<VersionRecord>>,
    },
    /// Present in the store, gone from disk.
    Delete { path: Vec<u8> },
}

impl Change {
    pub fn path(&self) -> &[u8] {
        match self {
            Change::Write { path, .. } | Change::Delete { path } => path,
        }
    }
}

/// The changes found in one root.
#[derive(Debug)]
pub struct RootChanges {
    pub root: StateDir,
    pub changes: Vec<Change>,
    /// Paths seen on disk (for the summary).
    pub scanned: usize,
    /// The tree's files by inode, when the whole tree was walked.
    pub inodes: Option<InodeIndex>,
    /// The files looked at that have names outside the tree: all of the
    /// tree's when it was walked (`inodes` is there).
    pub linked_out: LinkedOut,
    /// Paths the walk could not look at, and why (what the store has of
    /// them is kept as it is).
    pub problems: Vec<(PathBuf, String)>,
}

/// Checks that a state directory exists and is a directory.
pub fn check_root(root: &Path) -> Result<()> {
    let meta = fs::metadata(root)
        .with_context(|| format!("state directory {} cannot be read", root.display()))?;
    if !meta.is_dir() {
        crate::error::bail!("state directory {} is not a directory", root.display());
    }
    Ok(())
}

/// Longest path the kernel takes, with its NUL.
const PATH_MAX: usize = 4096;

/// A tree as one walk found it.
#[derive(Debug, Default)]
pub struct Walked {
    /// Every entry below the root, keyed by its relative path, and the root
    /// itself as "".
    pub entries: HashMap<Vec<u8>, FsEntry>,
    /// Paths the walk could not look at (a directory that cannot be listed,
    /// a name too long to stat, an I/O error), with why. What the store
    /// has at or below them is left as it is: not seeing a path is not
    /// seeing it gone.
    pub problems: Vec<(Vec<u8>, PathBuf, String)>,
}

impl Walked {
    /// Whether `path` is at or below a path the walk could not look at.
    pub fn unseen(&self, path: &[u8]) -> bool {
        self.problems.iter().any(|(rel, _, _)| {
            rel.is_empty()
                || path == rel.as_slice()
                || (path.starts_with(rel) && path.get(rel.len()) == Some(&b'/'))
        })
    }
}

/// Walks `root` and lists every entry below it, keyed by its relative
/// path. `exclude` is skipped (the store file, when it lives inside the
/// root), and so is the directory of its payload segments. A path that cannot be looked at is skipped and listed in
/// [`Walked::problems`]; only the root itself failing fails the walk.
///
/// The walk is relative to directory descriptors, each opened from its
/// parent's with `O_NOFOLLOW` and checked to be the inode its entry was
/// stat'ed as: an app that swaps a directory for a symlink while it is
/// walked cannot make the walk list what lies outside the tree, and no
/// path is ever too long to look at.
pub fn walk(root: &Path, exclude: Option<&Path>) -> Result<Walked> {
    use rustix::fs::{openat, Mode, OFlags};
    use std::sync::Arc;

    check_root(root)?;
    let open_flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open state directory {}", root.display()))?;
    // The store file and the directory of its payload segments.
    let excluded: Vec<InodeKey> = exclude
        .into_iter()
        .flat_map(|store| [store.to_path_buf(), crate::store::segments::dir_of(store)])
        .filter_map(|x| fs::symlink_metadata(x).ok())
        .map(|m| inode_key(m.dev(), m.ino()))
        .collect();
    let mut out = Walked::default();
    // Every symlink on disk, kept or not, and its target.
    let mut links: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    // The root itself, as "": its owner, mode and extended attributes are
    // kept like any directory's (a PostgreSQL data directory must be its
    // user's, mode 0700).
    match FsEntry::at(&root_fd, std::ffi::OsStr::new(".")) {
        Ok(Some(entry)) => {
            out.entries.insert(Vec::new(), entry);
        }
        Ok(None) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot stat state directory {}", root.display()))
        }
    }
    let shown = |rel: &[u8]| crate::roots::join(root, rel);
    // Directories still to list: the parent's descriptor, the name in it,
    // the inode it was stat'ed as, and its relative path (the root: none).
    type Pending = (Arc<std::os::fd::OwnedFd>, Option<(Vec<u8>, u64)>, Vec<u8>);
    let mut stack: Vec<Pending> = vec![(Arc::new(root_fd), None, Vec::new())];
    while let Some((parent, name, rel)) = stack.pop() {
        let dir = match name {
            None => parent,
            Some((name, ino)) => {
                let opened = openat(
                    &*parent,
                    std::ffi::OsStr::from_bytes(&name),
                    open_flags,
                    Mode::empty(),
                )
                .and_then(|fd| rustix::fs::fstat(&fd).map(|st| (fd, st.st_ino)));
                match opened {
                    Ok((fd, now)) if now == ino => Arc::new(fd),
                    // Removed while we walked: its entries are gone too.
                    Err(rustix::io::Errno::NOENT) => continue,
                    Ok(_) | Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                        out.problems.push((
                            rel.clone(),
                            shown(&rel),
                            "replaced while the tree was walked".into(),
                        ));
                        continue;
                    }
                    Err(e) => {
                        out.problems.push((
                            rel.clone(),
                            shown(&rel),
                            format!("cannot open the directory: {e}"),
                        ));
                        continue;
                    }
                }
            }
        };
        let entries = match rustix::fs::Dir::read_from(&*dir) {
            Ok(entries) => entries,
            Err(e) if rel.is_empty() => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot list directory {}", root.display()))
            }
            Err(e) => {
                out.problems.push((
                    rel.clone(),
                    shown(&rel),
                    format!("cannot list the directory: {e}"),
                ));
                continue;
            }
        };
        for item in entries {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    out.problems.push((
                        rel.clone(),
                        shown(&rel),
                        format!("cannot list the directory: {e}"),
                    ));
                    break;
                }
            };
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if rel.is_empty() && name.starts_with(STAGING_PREFIX.as_bytes()) {
                continue;
            }
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name);
            if child_rel.len() >= PATH_MAX {
                // Replay writes by relative path, which the kernel takes only
                // this long: a path it could not write back is not kept.
                out.problems.push((
                    child_rel.clone(),
                    shown(&rel),
                    format!(
                        "a path of {} bytes below it is longer than Linux takes ({} bytes): not kept",
                        child_rel.len(),
                        PATH_MAX - 1
                    ),
                ));
                continue;
            }
            let entry = match FsEntry::at(&*dir, std::ffi::OsStr::from_bytes(name)) {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    tracing::debug!(path = %shown(&child_rel).display(), "skipping special file");
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    out.problems.push((
                        child_rel.clone(),
                        shown(&child_rel),
                        format!("cannot stat: {e}"),
                    ));
                    continue;
                }
            };
            if excluded.contains(&entry.inode) {
                continue;
            }
            if entry.kind == EntryKind::Symlink {
                links.insert(child_rel.clone(), entry.target.clone());
                if let Err(why) = crate::roots::check_symlink_target(&child_rel, &entry.target) {
                    // Replay refuses such links, so recording one would make
                    // the whole store unreplayable.
                    tracing::warn!(path = %shown(&child_rel).display(), "not kept: {why:#}");
                    continue;
                }
            }
            if entry.kind == EntryKind::Dir {
                stack.push((
                    dir.clone(),
                    Some((name.to_vec(), entry.inode.ino)),
                    child_rel.clone(),
                ));
            }
            out.entries.insert(child_rel, entry);
        }
    }
    // A link can stay inside alone and leave through another (`d/up ->
    // ..`, `d/x -> up/..`): followed as the kernel would, through every
    // link on disk, kept or not.
    let all: HashMap<&[u8], &[u8]> = links
        .iter()
        .map(|(l, t)| (l.as_slice(), t.as_slice()))
        .collect();
    let mut escaping = Vec::new();
    for (path, entry) in &out.entries {
        if entry.kind == EntryKind::Symlink {
            if let Err(why) = crate::roots::check_symlink_chain(&all, path, &entry.target) {
                tracing::warn!(path = %shown(path).display(), "not kept: {why:#}");
                escaping.push(path.clone());
            }
        }
    }
    for path in escaping {
        out.entries.remove(&path);
    }
    Ok(out)
}

/// How close to a batch's start a file's mtime may be before its size and
/// mtime stop proving it unchanged. Timestamps advance in ticks (a few ms on
/// Linux, whole seconds on some file systems): a write in the same tick
/// right after capture read the file leaves both as they were. 2 s covers
/// every file system Linux mounts for state, FAT's 2 s included.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Whether a file with `mtime_ns`, captured by a batch that started at
/// `started_ms`, might have changed again without its mtime moving.
pub fn is_racy(mtime_ns: i64, started_ms: i64) -> bool {
    mtime_ns >= started_ms.saturating_mul(1_000_000) - RACY_WINDOW_NS
}

/// Whether stamp `now` proves a path on disk (whose size, mtime, mode and
/// owner match `stored`, a version of `root`'s) unchanged since that
/// version was read: the stamp the version was read with, or one a later
/// read found it with (`seen`), matches, and that read started clearly after
/// the ctime (see `store::schema`, Stamps). `batch_started` maps batch ids
/// to their scan start times.
pub fn proven_unchanged(
    reader: &Reader,
    root: &str,
    stored: &LatestEntry,
    now: Stamp,
    batch_started: &HashMap<u64, i64>,
) -> Result<bool> {
    let proves = |stamp: Option<Stamp>, checked_ms: Option<i64>| {
        stamp == Some(now) && checked_ms.is_some_and(|ms| !is_racy(now.ctime_ns, ms))
    };
    if proves(
        stored.version.stamp,
        batch_started.get(&stored.batch).copied(),
    ) {
        return Ok(true);
    }
    Ok(reader
        .seen(root, &stored.path, stored.batch)?
        .is_some_and(|seen| proves(Some(seen.stamp), Some(seen.checked_ms))))
}

/// Compares a root on disk with the store's latest state of it.
/// `batch_started` maps batch ids to their scan start times; with
/// `index_inodes` the changes carry the tree's files by inode.
pub fn diff_root(
    root: &StateDir,
    reader: &Reader,
    batch_started: &HashMap<u64, i64>,
    exclude: Option<&Path>,
    index_inodes: bool,
) -> Result<RootChanges> {
    let mut walked = walk(&root.path, exclude)?;
    let mut on_disk = std::mem::take(&mut walked.entries);
    let scanned = on_disk.len();
    // Without the whole index, only files with other links are indexed: to
    // count their names in the tree.
    let mut inodes = InodeIndex::new();
    for (path, entry) in &on_disk {
        if entry.kind == EntryKind::File && (index_inodes || entry.nlink > 1) {
            inodes.entry(entry.inode).or_default().push(path.clone());
        }
    }
    let mut linked_out = LinkedOut::new();
    for (path, entry) in &on_disk {
        // A file left out has one link: its one name.
        let names = inodes.get(&entry.inode).map_or(1, Vec::len);
        note_linked_out(&mut linked_out, path, entry, names);
    }
    let mut changes = Vec::new();
    reader.for_each_latest::<crate::error::EngineError>(&root.name, |stored| {
        if stored.version.kind == EntryKind::Tombstone {
            return Ok(());
        }
        match on_disk.remove(&stored.path) {
            None if walked.unseen(&stored.path) => {}
            None => changes.push(Change::Delete { path: stored.path }),
            Some(entry) => {
                let proven = matches!(entry.kind, EntryKind::File | EntryKind::Dir)
                    && proven_unchanged(reader, &root.name, &stored, entry.stamp(), batch_started)?;
                if let Some(change) = compare(stored.path, entry, stored.version, proven) {
                    changes.push(change);
                }
            }
        }
        Ok(())
    })?;
    // What is left on disk is new to the store.
    for (path, entry) in on_disk {
        changes.push(Change::Write {
            path,
            entry,
            previous: None,
        });
    }
    changes.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(RootChanges {
        root: root.clone(),
        changes,
        scanned,
        inodes: index_inodes.then_some(inodes),
        linked_out,
        problems: walked
            .problems
            .into_iter()
            .map(|(_, full, why)| (full, why))
            .collect(),
    })
}

/// Compares only `files` (relative path and the inode the backend reported)
/// with the store. Each is read whatever its size and mtime say: it was
/// reported changed, and a change can keep both (a store through a shared
/// mapping whose page is already writable, a write in the clock tick of
/// the last read, `touch -r`). `None` when that cannot be trusted to be the
/// whole change, and the tree must be walked: a path that is gone, is no
/// longer a regular file, is another inode now, or is new to the store.
pub fn diff_files(
    root: &StateDir,
    reader: &Reader,
    files: &[(Vec<u8>, InodeKey)],
) -> Result<Option<RootChanges>> {
    use rayon::prelude::*;

    // One file's outcome: `None` when the reports do not tell the whole
    // change and the tree must be walked.
    let mut names: HashMap<InodeKey, usize> = HashMap::new();
    for (_, inode) in files {
        *names.entry(*inode).or_default() += 1;
    }
    let linked_out = std::sync::Mutex::new(LinkedOut::new());
    let look = |(path, inode): &(Vec<u8>, InodeKey)| -> Result<Option<Option<Change>>> {
        if crate::roots::check_relative(path).is_err() {
            return Ok(None);
        }
        let full = root.path.join(std::ffi::OsStr::from_bytes(path));
        let entry = match FsEntry::read(&full) {
            Ok(Some(entry)) if entry.kind == EntryKind::File && entry.inode == *inode => entry,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", full.display())),
        };
        if let Ok(mut linked) = linked_out.lock() {
            let names = names.get(inode).copied().unwrap_or(0);
            note_linked_out(&mut linked, path, &entry, names);
        }
        let Some(stored) = reader.latest_of(&root.name, path)? else {
            return Ok(None);
        };
        if stored.version.kind == EntryKind::Tombstone {
            return Ok(None);
        }
        Ok(Some(compare(path.clone(), entry, stored.version, false)))
    };
    // In parallel: a frozen cut looks at these files while the app waits.
    let looked: Vec<Option<Option<Change>>> = files.par_iter().map(look).collect::<Result<_>>()?;
    let Some(found) = looked.into_iter().collect::<Option<Vec<Option<Change>>>>() else {
        return Ok(None);
    };
    let mut changes: Vec<Change> = found.into_iter().flatten().collect();
    changes.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(Some(RootChanges {
        root: root.clone(),
        changes,
        scanned: files.len(),
        inodes: None,
        linked_out: linked_out.into_inner().unwrap_or_default(),
        problems: Vec::new(),
    }))
}

/// What `entry` on disk is to `previous`, its newest stored version: `None`
/// when nothing changed. A file is read unless its size, mtime, mode and
/// owner match and a stamp proves it unchanged (`proven`). A directory
/// whose mode and owner match but which no stamp proves unchanged is looked
/// at again for its extended attributes (its ctime also moves when an entry
/// is added or removed, so this is frequent and costs one `flistxattr`).
fn compare(path: Vec<u8>, entry: FsEntry, previous: VersionRecord, proven: bool) -> Option<Change> {
    let same_kind = entry.kind == previous.kind;
    let same_owner = previous.owner == Some(entry.owner);
    let changed = match entry.kind {
        _ if !same_kind => true,
        EntryKind::File => {
            let same_stat = entry.size == previous.size
                && entry.mtime_ns == previous.mtime_ns
                && entry.mode == previous.mode;
            !(same_stat && same_owner && proven)
        }
        EntryKind::Dir => entry.mode != previous.mode || !same_owner || !proven,
        EntryKind::Symlink => entry.target != previous.target || !same_owner,
        EntryKind::Tombstone => false,
    };
    changed.then_some(Change::Write {
        path,
        entry,
        previous: Some(Box::new(previous)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_below_an_unseen_path_is_unseen() {
        let walked = Walked {
            entries: HashMap::new(),
            problems: vec![(b"a/b".to_vec(), PathBuf::from("/r/a/b"), "EIO".into())],
        };
        assert!(walked.unseen(b"a/b"));
        assert!(walked.unseen(b"a/b/c/d"));
        assert!(!walked.unseen(b"a/bc"));
        assert!(!walked.unseen(b"a"));
        assert!(!walked.unseen(b"x/a/b"));
    }
}
