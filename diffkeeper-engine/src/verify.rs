//! Verify: check the store's structure, rebuild every version of every file
//! and check every hash.
//!
//! Structure first: every `latest` entry names a version that exists and is
//! its path's newest, every version belongs to a batch that exists and to a
//! path that is valid and in `latest`, the chunk index and `chunks` agree
//! both ways, every chunk a version or a delta refers to exists, every packed
//! chunk lies within a pack that exists, and chunks no version reaches
//! (through deltas and packs) are counted (a capture that found a file torn leaves its
//! chunks so; the next `compact` releases them). Then each chunk is decoded
//! and checked once (against its own SHA-256), and each file version's full
//! SHA-256 is recomputed from its chunks. Memory is a chunk and its base per
//! worker, whatever the file sizes. Every problem is reported, not the
//! first.

use std::path::Path;

use crate::error::Result;
use rayon::prelude::*;

use crate::progress::Progress;
use crate::store::schema::{ChunkEncoding, EntryKind, VersionRecord};
use crate::store::Store;

/// One failed check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// `root:path@batch`, or `chunk N`.
    pub what: String,
    pub why: String,
}

/// What verify checked and found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub chunks: u64,
    pub versions: u64,
    pub bytes: u64,
    /// Chunks no version reaches (released by the next `compact`).
    pub unreferenced_chunks: u64,
    pub problems: Vec<Problem>,
}

/// One version: root, path, batch and record.
type Version = (String, Vec<u8>, u64, VersionRecord);

/// Checks the whole store. Problems are collected, not fatal, so one run
/// names every damaged version.
pub fn verify(store_path: &Path) -> Result<VerifyReport> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let mut report = VerifyReport::default();
    let mut versions: Vec<Version> = Vec::new();
    reader.for_each_version::<crate::error::EngineError>(|root, path, batch, record| {
        versions.push((root.to_string(), path.to_vec(), batch, record));
        Ok(())
    })?;
    let (problems, unreferenced) = structure(&reader, &versions)?;
    report.problems.extend(problems);
    report.unreferenced_chunks = unreferenced;

    // Chunks and versions in pack order: each pack is decoded once for its
    // members, not once each (see the store's Packs).
    let mut ids: Vec<(u64, u64)> = Vec::new();
    reader.for_each_chunk::<crate::error::EngineError>(|id, record| {
        ids.push((record.pack().unwrap_or(id), id));
        Ok(())
    })?;
    ids.sort_unstable();
    let progress = Progress::new(ids.len() as u64, "chunks");
    let chunk_problems: Vec<Problem> = ids
        .par_iter()
        .filter_map(|&(_, id)| {
            let result = reader.chunk_bytes(id);
            progress.inc();
            result.err().map(|e| Problem {
                what: format!("chunk {id}"),
                why: format!("{e:#}"),
            })
        })
        .collect();
    progress.finish();
    report.chunks = ids.len() as u64;
    report.problems.extend(chunk_problems);

    report.versions = versions.len() as u64;
    let progress = Progress::new(versions.len() as u64, "versions");
    let mut order: Vec<(Option<(u64, u32)>, &Version)> = versions
        .iter()
        .map(|v| (reader.pack_place(&v.3).ok().flatten(), v))
        .collect();
    order.sort_by_key(|(place, _)| *place);
    let version_problems: Vec<Problem> = order
        .par_iter()
        .filter_map(|(_, (root, path, batch, record))| {
            let result = match record.kind {
                EntryKind::File => reader
                    .write_content(record, &mut std::io::sink())
                    .map_err(crate::error::EngineError::from),
                EntryKind::Symlink if crate::store::sha256(&record.target) != record.hash => Err(
                    crate::error::refused!("symlink target does not match its SHA-256"),
                ),
                _ => Ok(()),
            };
            progress.inc();
            result.err().map(|e| Problem {
                what: format!("{root}:{}@{batch}", String::from_utf8_lossy(path)),
                why: format!("{e:#}"),
            })
        })
        .collect();
    progress.finish();
    report.bytes = versions
        .iter()
        .filter(|v| v.3.kind == EntryKind::File)
        .map(|v| v.3.size)
        .sum();
    report.problems.extend(version_problems);
    Ok(report)
}

/// The structural checks (see the module doc). Returns the problems found
/// and how many chunks no version reaches.
fn structure(reader: &crate::store::Reader, versions: &[Version]) -> Result<(Vec<Problem>, u64)> {
    use std::collections::{HashMap, HashSet};
    let mut problems = Vec::new();
    let mut problem = |what: String, why: String| problems.push(Problem { what, why });
    let shown = |root: &str, path: &[u8], batch: u64| {
        format!("{root}:{}@{batch}", String::from_utf8_lossy(path))
    };
    let batches: HashSet<u64> = reader.batches()?.into_iter().map(|(id, _)| id).collect();
    // Chunks, with what each refers to.
    let mut chunks: HashMap<u64, ([u8; 32], Vec<u64>)> = HashMap::new();
    // Packs, with their length and whether each can be one.
    let mut packs: HashMap<u64, (u32, bool)> = HashMap::new();
    let mut members: Vec<(u64, u64, u32, u32)> = Vec::new();
    reader.for_each_chunk::<crate::error::EngineError>(|id, record| {
        if let ChunkEncoding::Packed { pack, offset } = record.encoding {
            members.push((id, pack, offset, record.len));
        }
        packs.insert(id, (record.len, record.can_be_pack()));
        chunks.insert(id, (record.hash, record.refers_to().to_vec()));
        Ok(())
    })?;
    let member_ids: HashSet<u64> = members.iter().map(|m| m.0).collect();
    // Packs are not content of their own: not in the chunk index.
    let pack_ids: HashSet<u64> = members.iter().map(|m| m.1).collect();
    for (id, pack, offset, len) in members {
        match packs.get(&pack) {
            None => problem(
                format!("chunk {id}"),
                format!("lies in pack {pack}, which does not exist"),
            ),
            Some((_, false)) => problem(
                format!("chunk {id}"),
                format!("lies in chunk {pack}, which is not a base of its own"),
            ),
            Some((pack_len, true)) if u64::from(offset) + u64::from(len) > u64::from(*pack_len) => {
                problem(
                    format!("chunk {id}"),
                    format!(
                        "lies at bytes {offset}..{} of pack {pack}, which holds {pack_len}",
                        u64::from(offset) + u64::from(len)
                    ),
                )
            }
            Some(_) => {}
        }
    }
    // Index key -> chunk id (see the schema's Finding a chunk by its content).
    let mut indexed: HashMap<u64, u64> = HashMap::new();
    reader.for_each_index_entry::<crate::error::EngineError>(|key, id| {
        match chunks.get(&id) {
            None => problem(
                format!("chunk index entry {key:016x}"),
                format!("names chunk {id}, which does not exist"),
            ),
            Some((h, _)) if crate::store::schema::hash_key(h) != key => problem(
                format!("chunk index entry {key:016x}"),
                format!("names chunk {id}, whose hash is {}", crate::store::hex(h)),
            ),
            Some(_) => {}
        }
        indexed.insert(key, id);
        Ok(())
    })?;
    for (id, (hash, bases)) in &chunks {
        let entry = indexed.get(&crate::store::schema::hash_key(hash));
        // Found under its hash, or its key taken by another content.
        let findable = entry == Some(id)
            || entry
                .and_then(|other| chunks.get(other))
                .is_some_and(|(other, _)| other != hash);
        if !findable && !pack_ids.contains(id) {
            problem(
                format!("chunk {id}"),
                "is not in the chunk index under its hash".into(),
            );
        }
        // A member's pack is checked above.
        for base in bases.iter().filter(|_| !member_ids.contains(id)) {
            if !chunks.contains_key(base) {
                problem(
                    format!("chunk {id}"),
                    format!("is a delta against chunk {base}, which does not exist"),
                );
            }
        }
    }
    // Versions: batch, path, chunks, and what `latest` says.
    let mut newest: HashMap<(String, Vec<u8>), u64> = HashMap::new();
    let mut reached: HashSet<u64> = HashSet::new();
    for (root, path, batch, record) in versions {
        let (root, path, batch) = (root.as_str(), path.as_slice(), *batch);
        if !batches.contains(&batch) {
            problem(
                shown(root, path, batch),
                format!("belongs to batch {batch}, which does not exist"),
            );
        }
        let valid = if path.is_empty() {
            matches!(record.kind, EntryKind::Dir | EntryKind::Tombstone)
                .then_some(())
                .ok_or_else(|| {
                    crate::error::refused!(
                        "the state directory itself recorded as a {:?}",
                        record.kind
                    )
                })
        } else {
            crate::roots::check_relative(path)
        };
        if let Err(e) = valid {
            problem(shown(root, path, batch), format!("{e:#}"));
        }
        for id in &record.chunks {
            if !chunks.contains_key(id) {
                problem(
                    shown(root, path, batch),
                    format!("refers to chunk {id}, which does not exist"),
                );
            }
            reached.insert(*id);
        }
        let entry = newest.entry((root.to_string(), path.to_vec())).or_insert(0);
        *entry = (*entry).max(batch);
    }
    for root in reader.roots()? {
        reader.for_each_latest_of::<crate::error::EngineError>(&root, |path, batch| {
            match newest.remove(&(root.clone(), path.to_vec())) {
                None => problem(
                    shown(&root, path, batch),
                    "is in the latest table, but the path has no version".into(),
                ),
                Some(n) if n != batch => problem(
                    shown(&root, path, batch),
                    format!(
                        "is the latest table's newest version, but the versions table's newest is batch {n}"
                    ),
                ),
                Some(_) => {}
            }
            Ok(())
        })?;
    }
    for ((root, path), batch) in newest {
        problem(
            shown(&root, &path, batch),
            "has versions but no entry in the latest table".into(),
        );
    }
    // Bases of reached deltas are reached too.
    let mut pending: Vec<u64> = reached.iter().copied().collect();
    while let Some(id) = pending.pop() {
        if let Some((_, bases)) = chunks.get(&id) {
            for base in bases {
                if reached.insert(*base) {
                    pending.push(*base);
                }
            }
        }
    }
    let unreferenced = chunks.keys().filter(|id| !reached.contains(id)).count() as u64;
    Ok((problems, unreferenced))
}
