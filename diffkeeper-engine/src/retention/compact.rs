//! Compaction: drop the batches a policy does not keep, in one write
//! transaction, then give the freed space back to the file system.
//!
//! The plan is computed from one read snapshot (see the store's format doc
//! for the rules): which versions survive and under which batch, which
//! chunks are released, which surviving deltas lose a base and are rebased.
//! Applying it is one transaction, so a crash leaves either the old history
//! or the new one; shrinking the file afterwards is redb's own compaction,
//! whose every step is a commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use crate::error::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::Policy;
use crate::store::codec::BaseEncoder;
use crate::store::pack::PackBuilder;
use crate::store::schema::{BatchRecord, ChunkEncoding, ChunkRecord, EntryKind};
use crate::store::{HistoryEditor, Reader, Store};

/// What a compaction did (or, for a dry run, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct CompactSummary {
    pub store: String,
    pub policy: String,
    pub dry_run: bool,
    pub batches_before: u64,
    pub batches_kept: u64,
    pub batches_dropped: u64,
    /// Oldest and newest kept batch ids.
    pub oldest_kept: u64,
    pub newest_kept: u64,
    pub versions_dropped: u64,
    /// Versions carried forward to the oldest kept batch that shows them.
    pub versions_moved: u64,
    pub chunks_released: u64,
    /// Payload bytes of the released chunks.
    pub bytes_released: u64,
    /// Surviving deltas re-encoded as bases because their bases were released.
    pub chunks_rebased: u64,
    /// Payload bytes the rebased chunks and rewritten packs grew by (for a
    /// dry run: their uncompressed size, an upper bound).
    pub rebase_growth: u64,
    /// Old bases kept because several surviving deltas still need them.
    pub bases_kept: u64,
    /// Packs written again with only their surviving members (most of
    /// their bytes were released ones).
    pub packs_rewritten: u64,
    /// Payload bytes freed in all: released minus rebase growth.
    pub bytes_freed: u64,
    pub file_bytes_before: u64,
    pub file_bytes_after: u64,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for CompactSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::units::bytes;
        let verb = if self.dry_run {
            "would drop"
        } else {
            "dropped"
        };
        if self.batches_dropped == 0 {
            write!(
                f,
                "{} ({}): all {} batches are kept",
                self.store, self.policy, self.batches_before
            )?;
            if !self.dry_run {
                write!(
                    f,
                    "; store file {} -> {}",
                    bytes(self.file_bytes_before),
                    bytes(self.file_bytes_after)
                )?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "{} ({}): {verb} {} of {} batches (keeping {}, batches {}..={}), {} versions",
            self.store,
            self.policy,
            self.batches_dropped,
            self.batches_before,
            self.batches_kept,
            self.oldest_kept,
            self.newest_kept,
            self.versions_dropped
        )?;
        writeln!(
            f,
            "chunks: {} released ({}), {} rebased and {} packs rewritten (+{}), {} old bases still shared; payload freed {}",
            self.chunks_released,
            bytes(self.bytes_released),
            self.chunks_rebased,
            self.packs_rewritten,
            bytes(self.rebase_growth),
            self.bases_kept,
            bytes(self.bytes_freed)
        )?;
        if self.dry_run {
            write!(f, "store file is {}", bytes(self.file_bytes_before))
        } else {
            write!(
                f,
                "store file {} -> {} in {:.2} s",
                bytes(self.file_bytes_before),
                bytes(self.file_bytes_after),
                self.elapsed_ms as f64 / 1000.0
            )
        }
    }
}

/// What a compaction will change.
struct Plan {
    kept: BTreeSet<u64>,
    dropped: Vec<u64>,
    /// `(root, path, batch)` of versions to delete.
    drop_versions: Vec<(String, Vec<u8>, u64)>,
    /// `(root, path, from, to)`.
    move_versions: Vec<(String, Vec<u8>, u64, u64)>,
    /// `(root, path, new latest batch or none)`, where it changes.
    latest: Vec<(String, Vec<u8>, Option<u64>)>,
    /// `(id, hash)` of chunks no survivor uses.
    release: Vec<(u64, [u8; 32])>,
    /// Surviving deltas with a released base.
    rebase: Vec<u64>,
    /// Packs to write again, with their surviving members in pack order
    /// (the old pack is released).
    repack: Vec<(u64, Vec<u64>)>,
    /// `(kept batch, time the first dropped batch after it committed)`.
    gaps: Vec<(u64, i64)>,
    /// Kept batches whose record changes: versions moved in from older
    /// batches bring the older scan start (see `BatchRecord::started_ms`),
    /// so a file read too close to its mtime to be trusted stays untrusted.
    batch_records: Vec<(u64, BatchRecord)>,
    summary: CompactSummary,
}

/// The store's length: its file and its payload segments.
fn file_bytes(path: &Path) -> u64 {
    crate::store::disk_usage(path).0
}

fn make_plan(reader: &Reader, policy: &Policy) -> Result<Plan> {
    let batches = reader.batches()?;
    let times: Vec<(u64, i64)> = batches.iter().map(|(id, b)| (*id, b.time_ms)).collect();
    let kept = policy.kept(&times);
    let dropped: Vec<u64> = times
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !kept.contains(id))
        .collect();
    let kept_list: Vec<u64> = kept.iter().copied().collect();
    let mut plan = Plan {
        summary: CompactSummary {
            store: reader.store_path().display().to_string(),
            policy: policy.to_string(),
            batches_before: batches.len() as u64,
            batches_kept: kept.len() as u64,
            batches_dropped: dropped.len() as u64,
            oldest_kept: kept.first().copied().unwrap_or(0),
            newest_kept: kept.last().copied().unwrap_or(0),
            file_bytes_before: file_bytes(reader.store_path()),
            ..CompactSummary::default()
        },
        kept,
        dropped,
        drop_versions: Vec::new(),
        move_versions: Vec::new(),
        latest: Vec::new(),
        release: Vec::new(),
        rebase: Vec::new(),
        repack: Vec::new(),
        gaps: Vec::new(),
        batch_records: Vec::new(),
    };
    let started_of: HashMap<u64, i64> = batches.iter().map(|(id, b)| (*id, b.started_ms)).collect();
    // Per kept batch, the earliest scan start of the batches it takes versions from.
    let mut earliest_start: HashMap<u64, i64> = HashMap::new();
    if plan.dropped.is_empty() {
        return Ok(plan);
    }

    // Versions, one path at a time (the table is ordered by root, path, batch).
    let mut live: HashSet<u64> = HashSet::new();
    let mut path_versions: Vec<(u64, EntryKind, Vec<u64>)> = Vec::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    let mut finish_path = |root: &str,
                           path: &[u8],
                           versions: &mut Vec<(u64, EntryKind, Vec<u64>)>,
                           plan: &mut Plan| {
        // The oldest kept batch at or after `b`.
        let first_kept_from = |b: u64| {
            let i = kept_list.partition_point(|&k| k < b);
            kept_list.get(i).copied()
        };
        let mut first_survivor = true;
        let mut newest_survivor = None;
        for (i, (batch, kind, chunks)) in versions.iter().enumerate() {
            let next = versions.get(i + 1).map(|v| v.0).unwrap_or(u64::MAX);
            let shown_at = first_kept_from(*batch).filter(|&k| k < next);
            match shown_at {
                // A deletion no kept moment needs: before it the path is
                // absent anyway.
                Some(_) if first_survivor && *kind == EntryKind::Tombstone => {
                    plan.drop_versions
                        .push((root.to_string(), path.to_vec(), *batch));
                }
                Some(k) => {
                    first_survivor = false;
                    newest_survivor = Some(k);
                    live.extend(chunks.iter().copied());
                    if k != *batch {
                        plan.move_versions
                            .push((root.to_string(), path.to_vec(), *batch, k));
                        if let Some(&started) = started_of.get(batch) {
                            let earliest = earliest_start.entry(k).or_insert(started);
                            *earliest = (*earliest).min(started);
                        }
                    }
                }
                None => plan
                    .drop_versions
                    .push((root.to_string(), path.to_vec(), *batch)),
            }
        }
        let old_latest = versions.last().map(|v| v.0);
        if newest_survivor != old_latest {
            plan.latest
                .push((root.to_string(), path.to_vec(), newest_survivor));
        }
        versions.clear();
    };
    reader.for_each_version::<crate::error::EngineError>(|root, path, batch, record| {
        let same = current
            .as_ref()
            .is_some_and(|(r, p)| r == root && p.as_slice() == path);
        if !same {
            if let Some((r, p)) = current.take() {
                finish_path(&r, &p, &mut path_versions, &mut plan);
            }
            current = Some((root.to_string(), path.to_vec()));
        }
        path_versions.push((batch, record.kind, record.chunks));
        Ok(())
    })?;
    if let Some((r, p)) = current.take() {
        finish_path(&r, &p, &mut path_versions, &mut plan);
    }
    for (id, record) in &batches {
        if let Some(&earliest) = earliest_start.get(id) {
            if earliest < record.started_ms {
                let mut record = record.clone();
                record.started_ms = earliest;
                plan.batch_records.push((*id, record));
            }
        }
    }
    plan.summary.versions_dropped = plan.drop_versions.len() as u64;
    plan.summary.versions_moved = plan.move_versions.len() as u64;

    // Chunks. A surviving delta whose bases are not all used by survivors
    // either keeps those bases or is rebased: rebased when no other
    // surviving delta needs them (one full copy either way, and the chain
    // is gone), kept when several do (one base stays instead of every
    // delta becoming a full copy). Measured on the week-long benchmark
    // history: rebasing every such delta grew the payload from 204 MiB to
    // 275 MiB where dropping 85% of the batches should shrink it.
    let mut chunks: Vec<(u64, ChunkRecord)> = Vec::new();
    reader.for_each_chunk::<crate::error::EngineError>(|id, record| {
        chunks.push((id, record));
        Ok(())
    })?;
    let missing_bases = |record: &ChunkRecord| -> Vec<u64> {
        match &record.encoding {
            ChunkEncoding::ZstdDelta { bases } => bases
                .iter()
                .copied()
                .filter(|b| !live.contains(b))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut needed_by: HashMap<u64, u32> = HashMap::new();
    for (id, record) in &chunks {
        if live.contains(id) {
            for base in missing_bases(record) {
                *needed_by.entry(base).or_default() += 1;
            }
        }
    }
    let mut kept_bases: HashSet<u64> = HashSet::new();
    for (id, record) in &chunks {
        if !live.contains(id) {
            continue;
        }
        let missing = missing_bases(record);
        if missing.is_empty() {
            continue;
        }
        if missing.iter().all(|b| needed_by.get(b) == Some(&1)) {
            plan.rebase.push(*id);
            plan.summary.rebase_growth += u64::from(record.len);
        } else {
            kept_bases.extend(missing);
        }
    }
    plan.summary.bases_kept = kept_bases.len() as u64;
    // A pack stays while any member does (see the store's Packs); one
    // whose surviving members are less than half of it is written again
    // with them alone.
    let kept = |id: &u64| live.contains(id) || kept_bases.contains(id);
    let mut survivors: HashMap<u64, (u64, Vec<(u32, u64)>)> = HashMap::new();
    for (id, record) in chunks.iter().filter(|(id, _)| kept(id)) {
        if let ChunkEncoding::Packed { pack, offset } = record.encoding {
            let entry = survivors.entry(pack).or_default();
            entry.0 += u64::from(record.len);
            entry.1.push((offset, *id));
        }
    }
    let mut kept_packs: HashSet<u64> = survivors.keys().copied().collect();
    for (id, record) in &chunks {
        let Some((bytes, members)) = survivors.get_mut(id) else {
            continue;
        };
        if !kept(id) && *bytes * REPACK_SHARE < u64::from(record.len) {
            members.sort_unstable();
            plan.summary.rebase_growth += *bytes;
            plan.repack
                .push((*id, members.iter().map(|(_, member)| *member).collect()));
            kept_packs.remove(id);
        }
    }
    plan.summary.packs_rewritten = plan.repack.len() as u64;
    for (id, record) in &chunks {
        if !live.contains(id) && !kept_bases.contains(id) && !kept_packs.contains(id) {
            plan.summary.bytes_released += u64::from(record.stored_len);
            plan.release.push((*id, record.hash));
        }
    }
    plan.summary.chunks_released = plan.release.len() as u64;
    plan.summary.chunks_rebased = plan.rebase.len() as u64;

    // Gaps: a kept batch directly followed by one dropped now.
    let time_of: HashMap<u64, i64> = times.iter().copied().collect();
    for &k in &plan.kept {
        if let Some(&next_ms) = time_of.get(&(k + 1)) {
            if !plan.kept.contains(&(k + 1)) {
                plan.gaps.push((k, next_ms));
            }
        }
    }
    Ok(plan)
}

/// What `policy` would do to the store at `store_path`, changing nothing.
pub fn plan(store_path: &Path, policy: &Policy) -> Result<CompactSummary> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let mut summary = make_plan(&reader, policy)?.summary;
    summary.dry_run = true;
    summary.bytes_freed = summary.bytes_released.saturating_sub(summary.rebase_growth);
    Ok(summary)
}

/// Rebased chunks are re-encoded this many at a time (bounded memory).
const REBASE_GROUP: usize = 32;

/// A kept pack is written again when its surviving members are less than
/// 1/this of it.
const REPACK_SHARE: u64 = 2;

/// Applies `policy` to the store at `store_path`: drops the batches it does
/// not keep, rebases, releases chunks and shrinks the file.
pub fn compact(store_path: &Path, policy: &Policy) -> Result<CompactSummary> {
    let started = Instant::now();
    policy.require_rules()?;
    if !store_path.exists() {
        crate::error::bail!("no store at {}", store_path.display());
    }
    let mut store = Store::create_or_open(store_path)?;
    let mut summary = {
        let reader = store.reader()?;
        let plan = make_plan(&reader, policy)?;
        if plan.dropped.is_empty() {
            // Nothing to drop, but many small commits leave free pages
            // scattered through the file; shrinking returns them.
            plan.summary
        } else {
            tracing::info!(
                store = %store_path.display(),
                dropping = plan.dropped.len(),
                rebasing = plan.rebase.len(),
                releasing = plan.release.len(),
                "compacting"
            );
            apply(&store, &reader, plan)?
        }
    };
    // The history is final here; what follows only returns free space.
    store.shrink()?;
    drop(store);
    summary.file_bytes_after = file_bytes(store_path);
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(store = %store_path.display(), "{summary}");
    Ok(summary)
}

/// Writes a pack of surviving members (see `apply`); returns its payload
/// bytes.
fn store_pack(
    editor: &mut HistoryEditor,
    bases: &BaseEncoder,
    builder: &mut PackBuilder,
) -> Result<i64> {
    let id = editor.new_chunk_id()?;
    let sealed = builder.seal(bases, || id)?;
    let mut stored = 0i64;
    if let Some((id, record, payload)) = &sealed.pack {
        stored += payload.len() as i64;
        editor.put_pack(*id, record, payload)?;
    }
    for (id, record, payload) in &sealed.chunks {
        stored += payload.len() as i64;
        editor.replace_chunk(*id, record, payload)?;
    }
    Ok(stored)
}

fn apply(store: &Store, reader: &Reader, plan: Plan) -> Result<CompactSummary> {
    let mut summary = plan.summary;
    let mut editor = store.edit_history()?;
    // Rebase first, reading the snapshot the plan was made from.
    let mut growth = 0i64;
    // Rebased chunks are compressed as new ones are.
    let dictionary = reader.dictionary()?;
    let bases = BaseEncoder::new(dictionary.as_deref());
    for group in plan.rebase.chunks(REBASE_GROUP) {
        let encoded: Vec<(u64, ChunkRecord, Vec<u8>, u32)> = group
            .par_iter()
            .map(|&id| {
                let old = reader.chunk_record(id)?;
                let bytes = reader
                    .chunk_bytes(id)
                    .with_context(|| format!("cannot rebase chunk {id}"))?;
                let (encoding, payload) = bases.encode(&bytes)?;
                let record = ChunkRecord {
                    hash: old.hash,
                    len: old.len,
                    encoding,
                    stored_len: u32::try_from(payload.len()).context("chunk too large")?,
                    at: None,
                };
                Ok((id, record, payload, old.stored_len))
            })
            .collect::<Result<_>>()?;
        for (id, record, payload, old_len) in encoded {
            growth += i64::from(record.stored_len) - i64::from(old_len);
            editor.replace_chunk(id, &record, &payload)?;
        }
    }
    // Packs mostly released: their survivors packed again, before the old
    // pack is released below.
    for (pack, members) in &plan.repack {
        let mut builder = PackBuilder::default();
        for &id in members {
            let record = reader.chunk_record(id)?;
            let bytes = reader
                .chunk_bytes(id)
                .with_context(|| format!("cannot pack chunk {id} of pack {pack} again"))?;
            if !builder.fits(bytes.len()) {
                growth += store_pack(&mut editor, &bases, &mut builder)?;
            }
            builder.push(id, record.hash, &bytes);
        }
        growth += store_pack(&mut editor, &bases, &mut builder)?;
    }
    for (id, hash) in &plan.release {
        editor.remove_chunk(*id, hash)?;
    }
    for (root, path, batch) in &plan.drop_versions {
        editor.remove_version(root, path, *batch)?;
    }
    for (root, path, from, to) in &plan.move_versions {
        editor.move_version(root, path, *from, *to)?;
    }
    for (root, path, batch) in &plan.latest {
        editor.set_latest(root, path, *batch)?;
    }
    for &id in &plan.dropped {
        editor.remove_batch(id)?;
    }
    for &(kept, ms) in &plan.gaps {
        editor.set_gap(kept, ms)?;
    }
    for (id, record) in &plan.batch_records {
        editor.put_batch(*id, record)?;
    }
    // Released and re-encoded chunks leave dead bytes in the segments.
    let segments_freed = editor.collect_garbage()?;
    tracing::debug!(bytes = segments_freed, "payload segments rewritten");
    editor.commit()?;
    debug_assert!(plan.kept.iter().all(|k| !plan.dropped.contains(k)));
    summary.rebase_growth = growth.max(0) as u64;
    summary.bytes_freed = (summary.bytes_released as i64 - growth).max(0) as u64;
    Ok(summary)
}
