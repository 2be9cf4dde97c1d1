//! Verify: rebuild every version of every file and check every hash.
//!
//! Each chunk is decoded and checked once (against its own SHA-256), then
//! each file version's full SHA-256 is recomputed from its chunks. Memory is
//! a chunk and its base per worker, whatever the file sizes.

use std::path::Path;

use anyhow::Result;
use rayon::prelude::*;

use crate::progress::Progress;
use crate::store::schema::{EntryKind, VersionRecord};
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
    pub problems: Vec<Problem>,
}

/// Checks the whole store. Problems are collected, not fatal, so one run
/// names every damaged version.
pub fn verify(store_path: &Path) -> Result<VerifyReport> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let mut report = VerifyReport::default();

    let ids = reader.chunk_ids()?;
    let progress = Progress::new(ids.len() as u64, "chunks");
    let chunk_problems: Vec<Problem> = ids
        .par_iter()
        .filter_map(|&id| {
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

    let mut versions: Vec<(String, Vec<u8>, u64, VersionRecord)> = Vec::new();
    reader.for_each_version(|root, path, batch, record| {
        versions.push((root.to_string(), path.to_vec(), batch, record));
        Ok(())
    })?;
    report.versions = versions.len() as u64;
    let progress = Progress::new(versions.len() as u64, "versions");
    let version_problems: Vec<Problem> = versions
        .par_iter()
        .filter_map(|(root, path, batch, record)| {
            let result = match record.kind {
                EntryKind::File => reader.write_content(record, &mut std::io::sink()),
                EntryKind::Symlink if crate::store::sha256(&record.target) != record.hash => {
                    Err(anyhow::anyhow!("symlink target does not match its SHA-256"))
                }
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
