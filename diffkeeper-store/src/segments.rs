//! Payload segments: chunk payloads appended to plain files beside the
//! redb file, which holds where each one lies (schema 3).
//!
//! Why not in redb: redb keeps values in B-tree leaves of power-of-two
//! pages and grows its file by doubling. Measured on 50,000 small files
//! (64.6 MiB of payload): 23.6 MB of the `payload` table's pages were
//! fragments, and the file was 162 MiB long for 108 MiB allocated. A
//! segment holds payloads back to back, so its length is their sum.
//!
//! The files are `STORE.payload/NNNNNNNN.seg`, numbered from 1; the highest
//! is the one appended to, and a segment is not appended to once it holds
//! [`SEGMENT_BYTES`]. A batch appends its chunks' payloads, syncs them,
//! then commits its redb transaction with `meta.segment_end` (the last
//! segment and its length as of that commit): bytes past it were written
//! by a batch that never committed, and the next writer cuts them off
//! before it appends. A reader reads only what committed records point at,
//! so it never sees them. Compaction leaves a deleted chunk's bytes where
//! they are, and rewrites a segment whose dead bytes pass
//! [`DEAD_SHARE_DIVISOR`] of it (its live chunks are appended anew, then
//! the file is deleted after the commit), so the segments stay within
//! 1/10 of their payload.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::schema::Location;
use crate::StoreError;

/// A segment is not appended to once it is this long (a chunk is never
/// split, so one may end up to a chunk longer). Small enough that
/// rewriting one for its dead bytes is quick, and a future replication
/// ships immutable objects of a sensible size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Compaction rewrites a segment whose dead bytes are more than this
/// share (1/10) of its length.
pub const DEAD_SHARE_DIVISOR: u64 = 10;

/// The directory of a store's segments.
pub fn dir_of(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_os_string();
    name.push(".payload");
    PathBuf::from(name)
}

fn file_name(segment: u32) -> String {
    format!("{segment:08}.seg")
}

/// The segment number a file name stands for, if it is one.
fn number_of(name: &std::ffi::OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a segment directory that is a symlink or not a directory:
/// payload is never written or read through a link out of it.
fn check_dir(dir: &Path) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(StoreError::Corrupt(format!(
            "{} is not a directory (a store's payload segments live there)",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(dir, e)),
    }
}

/// The segment files in `dir`, by number.
pub fn list(dir: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    if !check_dir(dir)? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if let Some(n) = number_of(&entry.file_name()) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The apparent and allocated bytes of a store's segments.
pub fn usage(store: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(files) = list(&dir_of(store)) else {
        return (0, 0);
    };
    files
        .iter()
        .filter_map(|(_, path)| std::fs::symlink_metadata(path).ok())
        .fold((0, 0), |(len, blocks), m| {
            (len + m.len(), blocks + m.blocks() * 512)
        })
}

/// Reads payloads out of segments; files are opened once each.
pub struct SegmentReader {
    dir: PathBuf,
    open: Mutex<HashMap<u32, Arc<File>>>,
}

impl SegmentReader {
    pub fn new(store: &Path) -> SegmentReader {
        SegmentReader {
            dir: dir_of(store),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, StoreError> {
        if let Some(file) = self.open.lock().ok().and_then(|o| o.get(&segment).cloned()) {
            return Ok(file);
        }
        check_dir(&self.dir)?;
        let path = self.dir.join(file_name(segment));
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc_nofollow())
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StoreError::Corrupt(format!("payload segment {} is missing", path.display()))
                } else {
                    io_error(&path, e)
                }
            })?;
        let file = Arc::new(file);
        if let Ok(mut open) = self.open.lock() {
            open.insert(segment, file.clone());
        }
        Ok(file)
    }

    /// Reads `len` bytes at `at` into `out` (its contents are replaced).
    pub fn read(&self, at: Location, len: usize, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let file = self.file(at.segment)?;
        // Only bytes the buffer never had are zeroed (the read overwrites
        // the rest): zeroing every payload before reading it was 1-5% of a
        // checkpoint restore's CPU.
        out.truncate(len);
        out.resize(len, 0);
        file.read_exact_at(out, at.offset).map_err(|e| {
            let path = self.dir.join(file_name(at.segment));
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt(format!(
                    "payload segment {} ends before the {len} bytes at {}",
                    path.display(),
                    at.offset
                ))
            } else {
                io_error(&path, e)
            }
        })
    }
}

/// `O_NOFOLLOW`: a segment that is a symlink is refused, not followed.
fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The segment being appended to.
struct Active {
    segment: u32,
    file: File,
    end: u64,
    /// Appended to since the last sync.
    dirty: bool,
}

/// Appends payloads for one write transaction (a batch, or compaction).
pub struct SegmentWriter {
    dir: PathBuf,
    /// The last segment and its length as the last commit left them.
    committed: Option<Location>,
    active: Option<Active>,
    /// A segment file was created: the directory must be synced too.
    created: bool,
    /// Each segment appended to, with its length before: what is cut back
    /// to if the transaction does not commit.
    touched: Vec<(u32, u64)>,
    /// The transaction committed: the appends stay.
    kept: bool,
}

impl SegmentWriter {
    /// A writer continuing from `committed` (`meta.segment_end`).
    pub fn new(store: &Path, committed: Option<Location>) -> SegmentWriter {
        SegmentWriter {
            dir: dir_of(store),
            committed,
            active: None,
            created: false,
            touched: Vec::new(),
            kept: false,
        }
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(file_name(segment))
    }

    /// Opens segment `segment` for appending at `end`, cutting off what an
    /// uncommitted batch left past it; creates it (and the directory) when
    /// missing.
    fn open(&mut self, segment: u32, end: u64) -> Result<Active, StoreError> {
        if !check_dir(&self.dir)? {
            std::fs::create_dir(&self.dir).map_err(|e| io_error(&self.dir, e))?;
            self.created = true;
            // A store named relative to the working directory has "" for
            // parent: that is ".".
            let parent = match self.dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            sync_dir(parent)?;
        }
        let path = self.path(segment);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc_nofollow())
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        self.created |= !existed;
        let len = file.metadata().map_err(|e| io_error(&path, e))?.len();
        if len < end {
            return Err(StoreError::Corrupt(format!(
                "payload segment {} is {len} bytes, shorter than the {end} committed",
                path.display()
            )));
        }
        if len > end {
            tracing::debug!(segment = %path.display(), from = len, to = end, "cutting off payload of a batch that never committed");
            file.set_len(end).map_err(|e| io_error(&path, e))?;
        }
        self.touched.push((segment, end));
        Ok(Active {
            segment,
            file,
            end,
            dirty: len > end,
        })
    }

    /// Appends `payload`, returning where it lies.
    pub fn append(&mut self, payload: &[u8]) -> Result<Location, StoreError> {
        let full = self
            .active
            .as_ref()
            .is_some_and(|a| a.end > 0 && a.end + payload.len() as u64 > SEGMENT_BYTES);
        if full {
            self.roll()?;
        }
        if self.active.is_none() {
            let (segment, end) = match self.committed {
                Some(at) if at.offset + payload.len() as u64 <= SEGMENT_BYTES || at.offset == 0 => {
                    (at.segment, at.offset)
                }
                Some(at) => (next(at.segment)?, 0),
                None => (1, 0),
            };
            self.active = Some(self.open(segment, end)?);
        }
        let path = self.active.as_ref().map(|a| self.path(a.segment));
        let Some(active) = self.active.as_mut() else {
            return Err(StoreError::Corrupt(
                "no payload segment to append to".into(),
            ));
        };
        let at = Location {
            segment: active.segment,
            offset: active.end,
        };
        active
            .file
            .write_all_at(payload, active.end)
            .map_err(|e| io_error(&path.unwrap_or_default(), e))?;
        active.end += payload.len() as u64;
        active.dirty = true;
        Ok(at)
    }

    /// The segment appends go to now (or would, from the last commit).
    pub fn current(&self) -> Option<u32> {
        match (&self.active, self.committed) {
            (Some(active), _) => Some(active.segment),
            (None, Some(at)) => Some(at.segment),
            (None, None) => None,
        }
    }

    /// Ends the active segment: later appends go to a new one.
    pub fn roll(&mut self) -> Result<(), StoreError> {
        let segment = match (&self.active, self.committed) {
            (Some(active), _) => {
                if active.end == 0 {
                    return Ok(());
                }
                active.segment
            }
            (None, Some(at)) => at.segment,
            (None, None) => 0,
        };
        self.sync_active()?;
        let segment = next(segment)?;
        self.active = Some(self.open(segment, 0)?);
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StoreError> {
        if let Some(active) = self.active.as_mut().filter(|a| a.dirty) {
            let path = self.dir.join(file_name(active.segment));
            active.file.sync_data().map_err(|e| io_error(&path, e))?;
            active.dirty = false;
        }
        Ok(())
    }

    /// Makes every appended byte durable; returns the `meta.segment_end` to
    /// commit with, or `None` when nothing was appended.
    pub fn sync(&mut self) -> Result<Option<Location>, StoreError> {
        self.sync_active()?;
        if self.created {
            sync_dir(&self.dir)?;
            self.created = false;
        }
        Ok(self.active.as_ref().map(|a| Location {
            segment: a.segment,
            offset: a.end,
        }))
    }
}

impl SegmentWriter {
    /// The transaction these appends belong to committed: they stay.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for SegmentWriter {
    /// A transaction that did not commit (an error, a full disk) gives
    /// back what it appended at once, rather than at the next write.
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.active = None;
        for &(segment, start) in &self.touched {
            let path = self.dir.join(file_name(segment));
            let given_back = if start == 0 {
                std::fs::remove_file(&path)
            } else {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc_nofollow())
                    .open(&path)
                    .and_then(|f| f.set_len(start))
            };
            if let Err(e) = given_back {
                tracing::debug!(segment = %path.display(), "cannot give back an uncommitted append (the next writer cuts it off): {e}");
            }
        }
    }
}

fn next(segment: u32) -> Result<u32, StoreError> {
    segment
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("payload segment numbers are exhausted".into()))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

/// Deletes segments `segments` of the store in `dir` (after the commit
/// that stopped referring to them); one already gone is fine.
pub fn remove(store: &Path, segments: &[u32]) -> Result<(), StoreError> {
    let dir = dir_of(store);
    for &segment in segments {
        let path = dir.join(file_name(segment));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, e)),
        }
    }
    if !segments.is_empty() {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Removes the segments a new store finds beside it: left by a store file
/// that was deleted, they belong to no index and would be overwritten.
pub fn clear_stale(store: &Path) -> Result<(), StoreError> {
    let stale = list(&dir_of(store))?;
    if stale.is_empty() {
        return Ok(());
    }
    tracing::warn!(dir = %dir_of(store).display(), segments = stale.len(), "removing payload segments of a deleted store");
    let numbers: Vec<u32> = stale.iter().map(|(n, _)| *n).collect();
    remove(store, &numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_land_back_to_back_and_an_uncommitted_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("s.dk");
        let mut writer = SegmentWriter::new(&store, None);
        let a = writer.append(b"hello").expect("append");
        let b = writer.append(b", world").expect("append");
        assert_eq!((a.segment, a.offset, b.offset), (1, 0, 5));
        let committed = writer.sync().expect("sync");
        writer.keep();
        drop(writer);
        assert_eq!(
            committed,
            Some(Location {
                segment: 1,
                offset: 12
            })
        );
        // A batch that appends and fails: what it appended is given back.
        let mut failed = SegmentWriter::new(&store, committed);
        failed.append(b"never committed").expect("append");
        drop(failed);
        assert_eq!(usage(&store).0, 12, "given back at once");
        // One that appends and dies before it can: cut off by the next.
        let mut died = SegmentWriter::new(&store, committed);
        died.append(b"never committed").expect("append");
        died.keep();
        drop(died);
        assert_eq!(usage(&store).0, 27);
        let mut next = SegmentWriter::new(&store, committed);
        let c = next.append(b"!").expect("append");
        assert_eq!(c.offset, 12, "the uncommitted bytes are cut off");
        next.sync().expect("sync");
        next.keep();
        let reader = SegmentReader::new(&store);
        let mut out = Vec::new();
        reader.read(b, 7, &mut out).expect("read");
        assert_eq!(out, b", world");
        reader.read(c, 1, &mut out).expect("read");
        assert_eq!(out, b"!");
        assert!(reader.read(c, 2, &mut out).is_err(), "past the end");
        assert_eq!(usage(&store).0, 13);
    }

    #[test]
    fn a_segment_shorter_than_committed_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("s.dk");
        let mut writer = SegmentWriter::new(&store, None);
        writer.append(&[1; 100]).expect("append");
        let committed = writer.sync().expect("sync");
        writer.keep();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir_of(&store).join(file_name(1)))
            .and_then(|f| f.set_len(10))
            .expect("truncate");
        let err = SegmentWriter::new(&store, committed)
            .append(b"x")
            .expect_err("refused");
        assert!(format!("{err}").contains("shorter than"), "{err}");
    }

    #[test]
    fn a_symlinked_segment_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("s.dk");
        std::fs::create_dir(dir.path().join("elsewhere")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir_of(&store)).expect("link");
        let err = SegmentWriter::new(&store, None)
            .append(b"x")
            .expect_err("refused");
        assert!(format!("{err}").contains("not a directory"), "{err}");
        assert!(std::fs::read_dir(dir.path().join("elsewhere"))
            .expect("dir")
            .next()
            .is_none());
    }

    #[test]
    fn a_full_segment_rolls_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("s.dk");
        let mut writer = SegmentWriter::new(
            &store,
            Some(Location {
                segment: 3,
                offset: 0,
            }),
        );
        let a = writer.append(b"abc").expect("append");
        writer.roll().expect("roll");
        let b = writer.append(b"def").expect("append");
        assert_eq!((a.segment, b.segment, b.offset), (3, 4, 0));
        assert_eq!(
            writer.sync().expect("sync"),
            Some(Location {
                segment: 4,
                offset: 3
            })
        );
        writer.keep();
        assert_eq!(
            list(&dir_of(&store))
                .expect("list")
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
