//! `diff`: what changed in one path between two moments. Text files get a
//! unified diff; anything else (or text too large to diff in memory) gets
//! the byte ranges that differ, found by streaming both versions side by
//! side, so memory stays a few chunks whatever the file's size.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use crate::error::{Context, Result};

use super::moment::{resolve, Moment};
use crate::store::schema::{EntryKind, VersionRecord};
use crate::store::{Reader, Store};
use crate::units::time_millis;

/// Largest version diffed as text; larger ones are compared as bytes.
const TEXT_LIMIT: u64 = 8 << 20;
/// Differing ranges closer than this are reported as one.
const MERGE_GAP: u64 = 16;
/// Most ranges listed; the rest are counted.
const MAX_RANGES: usize = 200;

/// One side of a diff: a batch and the path's version then (`None`:
/// the path did not exist).
struct Side {
    batch: u64,
    time_ms: i64,
    version: Option<VersionRecord>,
}

/// Renders the difference of `spec` (`PATH` or `ROOT:PATH`) between `from`
/// and `to`. Defaults: `to` is the path's newest version (or its version
/// at `to`), `from` the version before that.
pub fn diff(
    store_path: &Path,
    spec: &str,
    from: Option<Moment>,
    to: Option<Moment>,
) -> Result<String> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let (root, path) = super::locate(&reader, spec)?;
    let versions = reader.versions_of(&root, &path)?;
    let at = |batch: u64| -> Result<Side> {
        let version = versions
            .iter()
            .rev()
            .find(|(b, _)| *b <= batch)
            .map(|(_, v)| v.clone());
        let time_ms = reader.batch(batch)?.map(|b| b.time_ms).unwrap_or(0);
        Ok(Side {
            batch,
            time_ms,
            version,
        })
    };
    let to_batch = match to {
        Some(moment) => resolve(&reader, moment)?,
        None => versions.last().map(|(b, _)| *b).unwrap_or(0),
    };
    let from_batch = match from {
        Some(moment) => resolve(&reader, moment)?,
        None => {
            // The version before the one shown at `to`.
            let shown = versions.iter().rev().find(|(b, _)| *b <= to_batch);
            match shown {
                Some((b, _)) => versions
                    .iter()
                    .rev()
                    .find(|(older, _)| older < b)
                    .map(|(older, _)| *older)
                    .unwrap_or(0),
                None => 0,
            }
        }
    };
    let old = at(from_batch)?;
    let new = at(to_batch)?;
    let name = format!("{root}:{}", String::from_utf8_lossy(&path));
    render(&reader, &name, &old, &new)
        .with_context(|| format!("cannot diff {name} in store {}", store_path.display()))
}

fn label(name: &str, side: &Side) -> String {
    let state = match &side.version {
        None => " (absent)",
        Some(v) if v.kind == EntryKind::Tombstone => " (deleted)",
        Some(_) => "",
    };
    if side.batch == 0 {
        format!("{name}\t(before its first version)")
    } else {
        format!(
            "{name}\tbatch {} ({}){state}",
            side.batch,
            time_millis(side.time_ms)
        )
    }
}

fn describe(version: &Option<VersionRecord>) -> String {
    match version {
        None => "absent".into(),
        Some(v) => match v.kind {
            EntryKind::File => format!("file, {} bytes, mode {:o}", v.size, v.mode),
            EntryKind::Dir => format!("directory, mode {:o}", v.mode),
            EntryKind::Symlink => format!("symlink to {}", String::from_utf8_lossy(&v.target)),
            EntryKind::Tombstone => "deleted".into(),
        },
    }
}

fn render(reader: &Reader, name: &str, old: &Side, new: &Side) -> Result<String> {
    let mut out = String::new();
    let (a, b) = (label(name, old), label(name, new));
    let file =
        |v: &Option<VersionRecord>| v.as_ref().filter(|v| v.kind == EntryKind::File).cloned();
    let (old_file, new_file) = (file(&old.version), file(&new.version));
    // What each side is, a deletion counting as absent.
    let kind = |v: &Option<VersionRecord>| {
        v.as_ref()
            .map(|v| v.kind)
            .filter(|k| *k != EntryKind::Tombstone)
    };
    let (old_kind, new_kind) = (kind(&old.version), kind(&new.version));
    let became_other = old_kind.is_some() && new_kind.is_some() && old_kind != new_kind;
    let same_entry = match (&old.version, &new.version) {
        (Some(x), Some(y)) => x.kind == y.kind && x.hash == y.hash && x.mode == y.mode,
        (None, None) => true,
        _ => false,
    };
    if same_entry || became_other || (old_file.is_none() && new_file.is_none()) {
        if same_entry {
            writeln!(
                out,
                "{name}: no change between {} and {}",
                where_(old),
                where_(new)
            )?;
        } else {
            writeln!(out, "--- {a}\n+++ {b}")?;
            writeln!(
                out,
                "-{}\n+{}",
                describe(&old.version),
                describe(&new.version)
            )?;
        }
        return Ok(out);
    }
    let empty = VersionRecord::tombstone();
    let old_v = old_file.as_ref().unwrap_or(&empty);
    let new_v = new_file.as_ref().unwrap_or(&empty);
    if old_v.mode != new_v.mode && old_file.is_some() && new_file.is_some() {
        writeln!(out, "mode {:o} -> {:o}", old_v.mode, new_v.mode)?;
    }
    if old_v.hash == new_v.hash && old_file.is_some() && new_file.is_some() {
        if out.is_empty() {
            writeln!(out, "{name}: no change")?;
        }
        return Ok(out);
    }
    if old_v.size <= TEXT_LIMIT && new_v.size <= TEXT_LIMIT {
        let old_text = read_all(reader, old_file.as_ref())?;
        let new_text = read_all(reader, new_file.as_ref())?;
        if let (Some(x), Some(y)) = (as_text(&old_text), as_text(&new_text)) {
            let diff = similar::TextDiff::from_lines(x, y);
            write!(
                out,
                "{}",
                diff.unified_diff().context_radius(3).header(&a, &b)
            )?;
            return Ok(out);
        }
    }
    writeln!(out, "binary {name}")?;
    writeln!(out, "--- {a}: {}", describe(&old.version))?;
    writeln!(out, "+++ {b}: {}", describe(&new.version))?;
    let ranges = changed_ranges(reader, old_file.as_ref(), new_file.as_ref())?;
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    writeln!(
        out,
        "{} changed byte range{}, {total} bytes in all:",
        ranges.len(),
        if ranges.len() == 1 { "" } else { "s" }
    )?;
    for (start, end) in ranges.iter().take(MAX_RANGES) {
        writeln!(out, "  {start}..{end} ({} bytes)", end - start)?;
    }
    if ranges.len() > MAX_RANGES {
        writeln!(out, "  ... and {} more", ranges.len() - MAX_RANGES)?;
    }
    Ok(out)
}

fn where_(side: &Side) -> String {
    if side.batch == 0 {
        "the start".into()
    } else {
        format!("batch {}", side.batch)
    }
}

fn as_text(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

fn read_all(reader: &Reader, version: Option<&VersionRecord>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(v) = version {
        reader.content(v).read_to_end(&mut out)?;
    }
    Ok(out)
}

/// Byte ranges `[start, end)` where the two versions differ; bytes past
/// the end of the shorter one count as changed.
fn changed_ranges(
    reader: &Reader,
    old: Option<&VersionRecord>,
    new: Option<&VersionRecord>,
) -> Result<Vec<(u64, u64)>> {
    const BLOCK: usize = 64 * 1024;
    let mut a: Box<dyn Read> = match old {
        Some(v) => Box::new(reader.content(v)),
        None => Box::new(std::io::empty()),
    };
    let mut b: Box<dyn Read> = match new {
        Some(v) => Box::new(reader.content(v)),
        None => Box::new(std::io::empty()),
    };
    let (mut x, mut y) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut mark = |start: u64, stop: u64| match ranges.last_mut() {
        Some((_, end)) if start <= *end + MERGE_GAP => *end = (*end).max(stop),
        _ => ranges.push((start, stop)),
    };
    let mut offset = 0u64;
    loop {
        let n = fill(&mut a, &mut x)?;
        let m = fill(&mut b, &mut y)?;
        if n == 0 && m == 0 {
            break;
        }
        let common = n.min(m);
        if x[..common] != y[..common] {
            for i in 0..common {
                if x[i] != y[i] {
                    mark(offset + i as u64, offset + i as u64 + 1);
                }
            }
        }
        if n != m {
            mark(offset + common as u64, offset + n.max(m) as u64);
        }
        offset += n.max(m) as u64;
    }
    Ok(ranges)
}

/// Reads until `buf` is full or the end.
fn fill(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
