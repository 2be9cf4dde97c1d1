//! Staging: the changed files' bytes copied while the writers are frozen,
//! so that only this copy, not hashing, chunking, delta encoding or the
//! commit, has to happen during the pause.
//!
//! Small files are read into memory (up to [`MEMORY_BUDGET`] in all);
//! larger ones are copied with `copy_file_range(2)` into one unnamed spill
//! file beside the store (`O_TMPFILE`, so a crash leaves nothing behind).
//! That is a copy inside the kernel at page-cache speed, or a reflink on a
//! file system that shares extents; no byte passes through DiffKeeper's
//! memory; holes are not copied (see `holes`). Files are staged in
//! parallel. Staging stops once the pause reaches its limit; the rest is
//! then read live, and the batch is torn.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{Context, Result};
use rayon::prelude::*;

use crate::scan::{Change, RootChanges};
use crate::store::schema::EntryKind;

/// Bytes of small files kept in memory in all; the rest goes to the spill
/// file.
const MEMORY_BUDGET: u64 = 16 << 20;
/// Largest file read into memory.
const SMALL_FILE: u64 = 1 << 20;

/// A file as it was while the writers were stopped.
#[derive(Debug)]
pub struct StagedFile {
    pub len: u64,
    /// Data bytes copied (a hole is not).
    copied: u64,
    /// Mode, mtime, owner, extended attributes and stamp, as copied
    /// (`None` when it had vanished).
    pub attrs: Option<super::Attrs>,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Memory(Vec<u8>),
    Spill {
        offset: u64,
    },
    /// Not there any more when it was to be read.
    Vanished,
    /// The pause ran out while it was copied.
    OutOfTime,
}

impl StagedFile {
    pub fn vanished(&self) -> bool {
        matches!(self.place, Place::Vanished)
    }

    fn out_of_time(&self) -> bool {
        matches!(self.place, Place::OutOfTime)
    }
}

/// What was staged for one batch.
#[derive(Default)]
pub struct Staged {
    files: HashMap<(String, Vec<u8>), StagedFile>,
    spill: Option<File>,
    /// Content bytes copied (holes are not).
    pub bytes: u64,
    /// Bytes of the files left to be read live (staging ran out of time).
    pub left_bytes: u64,
    /// A staged file changed while it was copied: something outside the
    /// frozen cgroups writes the tree.
    pub changed_while_read: bool,
}

impl Staged {
    pub fn get(&self, root: &str, path: &[u8]) -> Option<&StagedFile> {
        // A lookup by borrowed parts would need a custom key type; the
        // allocation is small beside reading the file.
        self.files.get(&(root.to_owned(), path.to_vec()))
    }

    /// The staged bytes of `file`.
    pub fn reader<'a>(&'a self, file: &'a StagedFile) -> Box<dyn Read + 'a> {
        match (&file.place, &self.spill) {
            (Place::Memory(bytes), _) => Box::new(&bytes[..]),
            (Place::Spill { offset }, Some(spill)) => Box::new(SpillReader {
                file: spill,
                at: *offset,
                end: offset + file.len,
            }),
            _ => Box::new(std::io::empty()),
        }
    }
}

/// Reads a range of the spill file with `pread`, so readers share it.
struct SpillReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl Read for SpillReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = (self.end - self.at).min(buf.len() as u64) as usize;
        if left == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..left], self.at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the staging file is shorter than what was copied into it",
            ));
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// Copies the content of every changed file of `found` while the writers
/// are stopped, until `deadline`. `spill_dir` is where the spill file goes
/// (the store's directory). With `verify`, each file is stat-ed again after
/// the copy, to catch a writer outside the freeze; the eBPF tracer's
/// change counts catch one without that syscall a file.
pub fn stage(
    found: &[RootChanges],
    spill_dir: &Path,
    deadline: Instant,
    verify: bool,
) -> Result<Staged> {
    let dirs = super::RootDirs::of(found);
    let jobs: Vec<(&str, &[u8], u64)> = found
        .iter()
        .flat_map(|r| {
            r.changes.iter().filter_map(move |c| match c {
                Change::Write { path, entry, .. } if entry.kind == EntryKind::File => {
                    Some((r.root.name.as_str(), path.as_slice(), entry.size))
                }
                _ => None,
            })
        })
        .collect();
    let needs_spill = jobs.iter().any(|j| j.2 > SMALL_FILE)
        || jobs.iter().map(|j| j.2).sum::<u64>() > MEMORY_BUDGET;
    let spill = if needs_spill {
        Some(tempfile::tempfile_in(spill_dir).with_context(|| {
            format!(
                "cannot create a staging file in {} for the frozen read",
                spill_dir.display()
            )
        })?)
    } else {
        None
    };
    let memory = AtomicU64::new(0);
    let spill_end = AtomicU64::new(0);
    let copied = AtomicU64::new(0);
    let left = AtomicU64::new(0);
    let changed = AtomicBool::new(false);
    let files = Mutex::new(HashMap::with_capacity(jobs.len()));
    let stage_one = |(root, path, size): &(&str, &[u8], u64)| {
        if Instant::now() >= deadline {
            left.fetch_add(*size, Ordering::Relaxed);
            return;
        }
        let staged = match stage_file(
            dirs.open(root, path),
            spill.as_ref(),
            &memory,
            &spill_end,
            verify,
            deadline,
        ) {
            // Out of time in the middle: read live, like the rest.
            Ok(Some((file, _))) if file.out_of_time() => {
                left.fetch_add(*size, Ordering::Relaxed);
                return;
            }
            Ok(Some((file, steady))) => {
                if !steady {
                    changed.store(true, Ordering::Relaxed);
                }
                copied.fetch_add(file.copied, Ordering::Relaxed);
                file
            }
            // Unreadable: capture reads it live and reports why.
            Ok(None) | Err(_) => return,
        };
        if let Ok(mut files) = files.lock() {
            files.insert((root.to_string(), path.to_vec()), staged);
        }
    };
    // The writers wait while this runs: a small cut is not queued behind
    // another target's work in the shared pool.
    let bytes: u64 = jobs.iter().map(|(_, _, size)| size).sum();
    if super::worth_the_pool(jobs.len(), bytes) {
        jobs.par_iter().for_each(stage_one);
    } else {
        jobs.iter().for_each(stage_one);
    }
    if let Some(spill) = &spill {
        // Holes at the end of a file's range read as zeros only inside
        // the spill file's length.
        spill
            .set_len(spill_end.load(Ordering::Relaxed))
            .context("cannot size the staging file")?;
    }
    Ok(Staged {
        files: files
            .into_inner()
            .map_err(|_| crate::error::refused!("staging table lock poisoned"))?,
        spill,
        bytes: copied.into_inner(),
        left_bytes: left.into_inner(),
        changed_while_read: changed.into_inner(),
    })
}

/// Copies one file, as `opened`; returns it with whether it stayed the
/// same while read.
fn stage_file(
    opened: std::io::Result<File>,
    spill: Option<&File>,
    memory: &AtomicU64,
    spill_end: &AtomicU64,
    verify: bool,
    deadline: Instant,
) -> Result<Option<(StagedFile, bool)>> {
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some((
                StagedFile {
                    len: 0,
                    copied: 0,
                    attrs: None,
                    place: Place::Vanished,
                },
                true,
            )))
        }
        Err(_) => return Ok(None),
    };
    let before = file.metadata()?;
    if !before.is_file() {
        return Ok(None);
    }
    let attrs = super::Attrs::read(&file, &before)?;
    let len = before.len();
    let in_memory = len <= SMALL_FILE
        && memory
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + len <= MEMORY_BUDGET).then_some(used + len)
            })
            .is_ok();
    // What was read counts, should the file have shrunk meanwhile.
    let (place, read, copied) = match spill {
        Some(spill) if !in_memory => {
            let offset = spill_end.fetch_add(len, Ordering::Relaxed);
            match copy_range(&file, spill, offset, len, deadline)? {
                Some((read, copied)) => (Place::Spill { offset }, read, copied),
                None => (Place::OutOfTime, 0, 0),
            }
        }
        _ => {
            // Exactly `len` bytes, with no read(2) more to find the end.
            let mut bytes = vec![0u8; len as usize];
            let mut read = 0;
            while read < bytes.len() {
                match (&file).read(&mut bytes[read..]) {
                    Ok(0) => break,
                    Ok(n) => read += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            bytes.truncate(read);
            (Place::Memory(bytes), read as u64, read as u64)
        }
    };
    let steady = read == len
        && (!verify || {
            let after = file.metadata()?;
            super::same_stamps(&before, &after)
        });
    Ok(Some((
        StagedFile {
            len: read,
            attrs: Some(attrs),
            place,
            copied,
        },
        steady,
    )))
}

/// Bytes copied between looks at the deadline.
const COPY_SLICE: u64 = 4 << 20;

/// Copies `len` bytes of `from` into `to` at `offset`, in the kernel;
/// returns the length staged (less if the file shrank) and the data bytes
/// copied (holes are not), or `None` when `deadline` passed first.
fn copy_range(
    from: &File,
    to: &File,
    offset: u64,
    len: u64,
    deadline: Instant,
) -> Result<Option<(u64, u64)>> {
    let (mut at, mut copied) = (0u64, 0u64);
    // Only the data: a hole is left a hole in the spill file, which reads
    // back as zeros (its length covers every file's range, see `stage`).
    while let Some(data) =
        super::holes::next_data(from, at, len).context("cannot find the data of a file")?
    {
        let (mut off_in, mut off_out) = (data.start, offset + data.start);
        while off_in < data.end {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let want = (data.end - off_in).min(COPY_SLICE) as usize;
            let n =
                rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)
                    .context("cannot copy into the staging file")?;
            if n == 0 {
                // Shrunk meanwhile.
                return Ok(Some((off_in, copied)));
            }
            copied += n as u64;
        }
        at = data.end;
    }
    // A hole to the end, or a file that shrank: the end is what is left.
    let size = from
        .metadata()
        .context("cannot stat a file being staged")?
        .len();
    Ok(Some((len.min(size), copied)))
}
