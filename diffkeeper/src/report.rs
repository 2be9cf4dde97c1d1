//! Reports on a store's history: `log` (per-file versions) and `stats`
//! (totals and the store's size on disk).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::store::schema::{ChunkEncoding, EntryKind, VersionRecord};
use crate::store::{hex, Reader, Store};

pub use diffkeeper_engine::units::{bytes, time, time_millis};

/// One version in `log`.
#[derive(Debug, Serialize)]
pub struct LogVersion {
    pub batch: u64,
    pub time: String,
    /// base, packed (a base in a pack of the batch's new chunks, whose
    /// bytes count in the batch's stored bytes), delta, chunks, same
    /// (content reused), dir, symlink, deleted.
    pub kind: &'static str,
    pub size: u64,
    pub stored_bytes: u64,
    pub mode: String,
    pub sha256: String,
}

/// One path's history in `log`.
#[derive(Debug, Serialize)]
pub struct LogFile {
    pub root: String,
    /// The path as text (bytes that are not UTF-8 shown as U+FFFD).
    pub path: String,
    /// The path's raw bytes in hex, when they are not UTF-8 (Linux names
    /// need not be): what tools should use to name the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub versions: Vec<LogVersion>,
}

fn version_kind(
    reader: &Reader,
    record: &VersionRecord,
    previous: Option<&VersionRecord>,
) -> Result<&'static str> {
    Ok(match record.kind {
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Tombstone => "deleted",
        EntryKind::File
            if record.stored_bytes == 0 && previous.is_some_and(|p| p.chunks == record.chunks) =>
        {
            "same"
        }
        EntryKind::File if record.chunks.len() > 1 => "chunks",
        EntryKind::File => match record.chunks.first() {
            None => "base",
            Some(&id) => match reader.chunk_record(id)?.encoding {
                ChunkEncoding::ZstdDelta { .. } => "delta",
                // Its bytes are its pack's, counted in the batch.
                ChunkEncoding::Packed { .. } => "packed",
                _ => "base",
            },
        },
    })
}

/// Per-file history, optionally only paths equal to or under `filter`
/// (`PATH` or `ROOT:PATH`).
pub fn log(store_path: &Path, filter: Option<&[u8]>) -> Result<Vec<LogFile>> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let times: HashMap<u64, i64> = reader
        .batches()?
        .into_iter()
        .map(|(id, b)| (id, b.time_ms))
        .collect();
    let trim = |p: &[u8]| -> Vec<u8> {
        let start = p.iter().position(|&b| b != b'/').unwrap_or(p.len());
        let end = p.iter().rposition(|&b| b != b'/').map_or(start, |e| e + 1);
        p[start..end.max(start)].to_vec()
    };
    let (root_filter, path_filter): (Option<String>, Vec<u8>) = match filter {
        Some(f) => match f.iter().position(|&b| b == b':') {
            Some(i) if !f[..i].contains(&b'/') => (
                Some(String::from_utf8_lossy(&f[..i]).into_owned()),
                trim(&f[i + 1..]),
            ),
            _ => (None, trim(f)),
        },
        None => (None, Vec::new()),
    };
    let wanted = |root: &str, path: &[u8]| {
        root_filter.as_deref().is_none_or(|r| r == root)
            && (path_filter.is_empty()
                || path == path_filter.as_slice()
                || (path.starts_with(&path_filter) && path.get(path_filter.len()) == Some(&b'/')))
    };
    let mut files: Vec<LogFile> = Vec::new();
    let mut previous: Option<VersionRecord> = None;
    reader.for_each_version::<anyhow::Error>(|root, path, batch, record| {
        if !wanted(root, path) {
            return Ok(());
        }
        // "" is the state directory itself.
        let path_str = if path.is_empty() {
            ".".to_string()
        } else {
            String::from_utf8_lossy(path).into_owned()
        };
        let same_file = files
            .last()
            .is_some_and(|f| f.root == root && f.path == path_str);
        if !same_file {
            previous = None;
            files.push(LogFile {
                root: root.to_string(),
                path: path_str,
                path_hex: std::str::from_utf8(path)
                    .is_err()
                    .then(|| crate::store::hex(path)),
                versions: Vec::new(),
            });
        }
        let version = LogVersion {
            batch,
            time: time(times.get(&batch).copied().unwrap_or(0)),
            kind: version_kind(&reader, &record, previous.as_ref())?,
            size: record.size,
            stored_bytes: record.stored_bytes,
            mode: format!("{:04o}", record.mode),
            sha256: if record.kind == EntryKind::File {
                hex(&record.hash)
            } else {
                String::new()
            },
        };
        if let Some(file) = files.last_mut() {
            file.versions.push(version);
        }
        previous = Some(record);
        Ok(())
    })?;
    if files.is_empty() {
        if let Some(f) = filter {
            anyhow::bail!(
                "store {} has no history for {:?}",
                store_path.display(),
                String::from_utf8_lossy(f)
            );
        }
    }
    Ok(files)
}

/// Renders `log` for a terminal.
pub fn log_text(files: &[LogFile]) -> String {
    let mut out = String::new();
    for file in files {
        let _ = writeln!(out, "{}:{}", file.root, file.path);
        for v in &file.versions {
            let _ = writeln!(
                out,
                "  batch {:>6}  {}  {:<7}  size {:>10}  stored {:>10}  mode {}",
                v.batch,
                v.time,
                v.kind,
                bytes(v.size),
                bytes(v.stored_bytes),
                v.mode
            );
        }
    }
    out
}

/// Totals for `stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub store: String,
    pub roots: Vec<String>,
    /// Paths that exist in the latest state (files, dirs, symlinks), below
    /// the state directories (not counting them).
    pub live_paths: u64,
    /// Distinct paths with any history.
    pub files: u64,
    pub versions: u64,
    pub batches: u64,
    pub chunks: u64,
    /// Sum of the sizes of every file version ever recorded.
    pub logical_bytes: u64,
    /// Sum of the stored chunk payloads (after de-duplication, deltas and
    /// compression).
    pub stored_bytes: u64,
    /// logical_bytes / stored_bytes.
    pub ratio: f64,
    /// The zstd dictionaries trained on the store's small files, in bytes
    /// (not in `stored_bytes`).
    pub dictionary_bytes: u64,
    /// The store's length (its file and its payload segments) and the disk
    /// space it occupies.
    pub file_bytes: u64,
    pub disk_bytes: u64,
    /// The length of the store file alone (the index; without segments).
    pub index_bytes: u64,
    /// What the index's records take, and the pages holding them (the
    /// rest of `index_bytes` is free pages).
    pub index_record_bytes: u64,
    pub index_page_bytes: u64,
}

/// One batch in `log --batches`.
#[derive(Debug, Serialize)]
pub struct BatchLine {
    pub batch: u64,
    pub time: String,
    pub time_ms: i64,
    pub roots: Vec<String>,
    /// Paths with a new version in this batch (after compaction, the
    /// oldest kept batch also carries the versions moved into it).
    pub files_changed: u64,
    /// Content bytes that differ from each path's previous version, at
    /// chunk granularity (a new file counts whole).
    pub bytes_changed: u64,
    /// Payload bytes the batch added to the store.
    pub stored_bytes: u64,
    /// Batches before this one were dropped by compaction.
    pub after_dropped: bool,
    /// How the batch's cut was taken: `quiet`, `frozen`, `torn`, or
    /// `unchecked` (a `snapshot`, or a store written before cuts were
    /// recorded).
    pub consistency: &'static str,
    /// How long the writers were frozen for it, in microseconds.
    pub pause_us: Option<u64>,
    /// Content bytes read while they were.
    pub frozen_bytes: Option<u64>,
    /// Why a torn batch is torn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_why: Option<String>,
}

/// The timeline: one line per batch committed in `[since, until]` (ms).
pub fn timeline(
    store_path: &Path,
    since: Option<i64>,
    until: Option<i64>,
) -> Result<Vec<BatchLine>> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let batches = reader.batches()?;
    let mut chunk_len: HashMap<u64, u64> = HashMap::new();
    reader.for_each_chunk::<anyhow::Error>(|id, record| {
        chunk_len.insert(id, u64::from(record.len));
        Ok(())
    })?;
    let mut files: HashMap<u64, u64> = HashMap::new();
    let mut changed: HashMap<u64, u64> = HashMap::new();
    let mut previous: Option<(String, Vec<u8>, Vec<u64>)> = None;
    reader.for_each_version::<anyhow::Error>(|root, path, batch, record| {
        *files.entry(batch).or_default() += 1;
        let before: &[u64] = match &previous {
            Some((r, p, chunks)) if r == root && p.as_slice() == path => chunks,
            _ => &[],
        };
        let before: std::collections::HashSet<u64> = before.iter().copied().collect();
        let bytes: u64 = record
            .chunks
            .iter()
            .filter(|id| !before.contains(id))
            .map(|id| chunk_len.get(id).copied().unwrap_or(0))
            .sum();
        *changed.entry(batch).or_default() += bytes;
        previous = Some((root.to_string(), path.to_vec(), record.chunks));
        Ok(())
    })?;
    let mut out = Vec::new();
    let mut previous_id = 0;
    for (id, record) in batches {
        let after_dropped = id != previous_id + 1;
        previous_id = id;
        if since.is_some_and(|s| record.time_ms < s) || until.is_some_and(|u| record.time_ms > u) {
            continue;
        }
        let cut = reader.cut(id)?;
        out.push(BatchLine {
            consistency: cut.as_ref().map_or("unchecked", |c| c.kind.name()),
            pause_us: cut.as_ref().filter(|c| c.pause_us > 0).map(|c| c.pause_us),
            frozen_bytes: cut
                .as_ref()
                .filter(|c| c.pause_us > 0)
                .map(|c| c.frozen_bytes),
            torn_why: cut.filter(|c| !c.why.is_empty()).map(|c| c.why),
            batch: id,
            time: time_millis(record.time_ms),
            time_ms: record.time_ms,
            roots: record.roots,
            files_changed: files.get(&id).copied().unwrap_or(0),
            bytes_changed: changed.get(&id).copied().unwrap_or(0),
            stored_bytes: record.stored_bytes,
            after_dropped,
        });
    }
    Ok(out)
}

/// Renders `log --batches` for a terminal.
pub fn timeline_text(lines: &[BatchLine]) -> String {
    let mut out = format!(
        "{:>7}  {:<24}  {:>7}  {:>11}  {:>11}  {:<17}  roots\n",
        "batch", "time (UTC)", "files", "changed", "stored", "cut"
    );
    for l in lines {
        if l.after_dropped {
            out.push_str("         (earlier batches dropped by compaction)\n");
        }
        let cut = match l.pause_us {
            Some(us) => format!("{} {:.1}ms", l.consistency, us as f64 / 1000.0),
            None => l.consistency.to_string(),
        };
        let _ = writeln!(
            out,
            "{:>7}  {:<24}  {:>7}  {:>11}  {:>11}  {:<17}  {}",
            l.batch,
            l.time,
            l.files_changed,
            bytes(l.bytes_changed),
            bytes(l.stored_bytes),
            cut,
            l.roots.join(",")
        );
        if let Some(why) = &l.torn_why {
            let _ = writeln!(out, "         torn: {why}");
        }
    }
    out
}

/// Totals over the whole store.
pub fn stats(store_path: &Path) -> Result<Stats> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let roots = reader.roots()?;
    let mut live_paths = 0;
    for root in &roots {
        live_paths += reader
            .latest(root)?
            .iter()
            .filter(|e| e.version.kind != EntryKind::Tombstone && !e.path.is_empty())
            .count() as u64;
    }
    let mut files = 0u64;
    let mut versions = 0u64;
    let mut logical_bytes = 0u64;
    let mut last: Option<(String, Vec<u8>)> = None;
    reader.for_each_version::<anyhow::Error>(|root, path, _, record| {
        versions += 1;
        if record.kind == EntryKind::File {
            logical_bytes += record.size;
        }
        if last.as_ref().is_none_or(|(r, p)| r != root || p != path) {
            files += 1;
            last = Some((root.to_string(), path.to_vec()));
        }
        Ok(())
    })?;
    let (chunks, stored_bytes) = reader.chunk_totals()?;
    let meta = std::fs::metadata(store_path)
        .with_context(|| format!("cannot stat {}", store_path.display()))?;
    let (file_bytes, disk_bytes) = crate::store::disk_usage(store_path);
    let usage = store.index_usage()?;
    Ok(Stats {
        store: store_path.display().to_string(),
        roots,
        live_paths,
        files,
        versions,
        batches: reader.batches()?.len() as u64,
        chunks,
        logical_bytes,
        stored_bytes,
        ratio: if stored_bytes == 0 {
            0.0
        } else {
            logical_bytes as f64 / stored_bytes as f64
        },
        dictionary_bytes: reader
            .dictionaries()?
            .iter()
            .map(|(_, len)| *len as u64)
            .sum(),
        index_bytes: meta.len(),
        index_record_bytes: usage.record_bytes,
        index_page_bytes: usage.page_bytes,
        file_bytes,
        disk_bytes,
    })
}

/// Renders `stats` for a terminal.
pub fn stats_text(s: &Stats) -> String {
    format!(
        "store        {}\nroots        {}\nlive paths   {}\nfiles        {}\nversions     {}\nbatches      {}\nchunks       {}\nlogical      {} ({} B)\nstored       {} ({} B)\nratio        {:.1}x\ndictionary   {}\non disk      {} ({} B, {} allocated; the file {}, payload segments {})\nindex        {} of records in {} of pages ({:.0}% full; the rest of the file is free pages)\n",
        s.store,
        s.roots.join(", "),
        s.live_paths,
        s.files,
        s.versions,
        s.batches,
        s.chunks,
        bytes(s.logical_bytes),
        s.logical_bytes,
        bytes(s.stored_bytes),
        s.stored_bytes,
        s.ratio,
        if s.dictionary_bytes == 0 {
            "none".to_string()
        } else {
            bytes(s.dictionary_bytes)
        },
        bytes(s.file_bytes),
        s.file_bytes,
        bytes(s.disk_bytes),
        bytes(s.index_bytes),
        bytes(s.file_bytes.saturating_sub(s.index_bytes)),
        bytes(s.index_record_bytes),
        bytes(s.index_page_bytes),
        100.0 * s.index_record_bytes as f64 / s.index_page_bytes.max(1) as f64
    )
}

/// `daemon --check`: each target with its store, directories and the
/// settings that differ from `watch`'s defaults.
pub fn daemon_config_text(config: &crate::agent::daemon::Config) -> String {
    let mut out = String::new();
    let backend = name_in(&crate::watch::Backend::ALL, config.backend);
    let _ = writeln!(
        out,
        "backend {backend}, reloaded every {}, metrics {}, control socket {}; {} target(s)",
        humantime::format_duration(config.reload_interval),
        config
            .metrics_addr
            .map_or("none".to_string(), |addr| format!("http://{addr}/metrics")),
        config
            .socket
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
        config.targets.len()
    );
    for target in config.targets.values() {
        let o = &target.options;
        let _ = writeln!(
            out,
            "target {}: store {}",
            target.name,
            target.store.display()
        );
        for root in &target.roots {
            let _ = writeln!(out, "  {}={}", root.name, root.path.display());
        }
        let _ = writeln!(
            out,
            "  debounce {}, max latency {}, consistency {}, max pause {}, compact every {}, restore {}{}",
            humantime::format_duration(o.debounce),
            humantime::format_duration(o.max_latency),
            name_in(&crate::watch::Consistency::ALL, o.consistency),
            humantime::format_duration(o.max_pause),
            humantime::format_duration(o.compact_interval),
            if target.restore_if_empty { "if-empty" } else { "never" },
            if o.retention == crate::retention::Policy::default() {
                String::new()
            } else {
                format!(", retention {}", o.retention)
            }
        );
        if let Some(filter) = &o.filter {
            let _ = writeln!(
                out,
                "  include {:?}, exclude {:?}",
                filter.includes(),
                filter.excludes()
            );
        }
    }
    if let Some(k) = &config.kubernetes {
        let _ = writeln!(
            out,
            "kubernetes: the pods of node {} annotated {}, volumes under {}/pods, stores under {}, API from {}",
            k.node_name,
            crate::agent::daemon::kubernetes::VOLUMES,
            k.kubelet_root.display(),
            k.stores.display(),
            k.kubeconfig
                .as_ref()
                .map_or("$KUBECONFIG, ~/.kube/config or in-cluster".to_string(), |p| p.display().to_string())
        );
    }
    out
}

/// The name of `value` in a table of values with names and help
/// (`Backend::ALL`, `Consistency::ALL`).
fn name_in<T: PartialEq>(all: &[(T, &'static str, &'static str)], value: T) -> &'static str {
    all.iter()
        .find(|(v, _, _)| *v == value)
        .map_or("?", |(_, name, _)| *name)
}
