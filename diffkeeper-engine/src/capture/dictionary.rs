//! The store's zstd dictionary for small files: which batch trains it, and
//! on what. A store has none until a batch brings at least
//! [`DICTIONARY_MIN_FILES`] files of up to [`DICTIONARY_FILE_MAX`] bytes;
//! that batch reads up to [`DICTIONARY_SAMPLE_BYTES`] of them, spread evenly
//! over its files, trains on them before any chunk is encoded, and stores
//! the dictionary with its chunks. Why, and what it saves:
//! `store::schema`, Content.

use std::io::Read;
use std::sync::Arc;

use super::RootDirs;
use crate::error::Result;
use crate::roots::StateDir;
use crate::scan::Change;
use crate::store::codec::Dictionary;
use crate::store::schema::{
    EntryKind, DICTIONARY_FILE_MAX, DICTIONARY_MIN_FILES, DICTIONARY_SAMPLE_BYTES,
};
use crate::store::Reader;

/// What a batch encodes its bases with.
pub(super) struct ForBatch {
    pub dictionary: Option<Arc<Dictionary>>,
    /// Trained by this batch: to be stored with it.
    pub trained: bool,
}

/// The store's dictionary, or one trained now on this batch's small files
/// when the store has none and the batch has enough of them (it takes id
/// `next_id`).
pub(super) fn for_batch(
    reader: &Reader,
    jobs: &[(&StateDir, &Change)],
    dirs: &RootDirs,
    next_id: u32,
) -> Result<ForBatch> {
    if let Some(dictionary) = reader.dictionary()? {
        return Ok(ForBatch {
            dictionary: Some(dictionary),
            trained: false,
        });
    }
    let small: Vec<(&StateDir, &[u8], u64)> = jobs
        .iter()
        .filter_map(|(root, change)| match change {
            Change::Write { path, entry, .. }
                if entry.kind == EntryKind::File
                    && (1..=DICTIONARY_FILE_MAX).contains(&entry.size) =>
            {
                Some((*root, path.as_slice(), entry.size))
            }
            _ => None,
        })
        .collect();
    let none = ForBatch {
        dictionary: None,
        trained: false,
    };
    if small.len() < DICTIONARY_MIN_FILES {
        return Ok(none);
    }
    let started = std::time::Instant::now();
    let total: u64 = small.iter().map(|(_, _, size)| size).sum();
    // Every step-th file, so the sample spans the batch's directories.
    let step = total.div_ceil(DICTIONARY_SAMPLE_BYTES).max(1) as usize;
    let mut samples = Vec::new();
    let mut sampled = 0u64;
    for (root, path, _) in small.iter().step_by(step) {
        if sampled >= DICTIONARY_SAMPLE_BYTES {
            break;
        }
        // A file gone or unreadable now is left out of the sample; its
        // capture reports it.
        let Ok(file) = dirs.open(&root.name, path) else {
            continue;
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut bytes = Vec::new();
        if file
            .take(DICTIONARY_FILE_MAX)
            .read_to_end(&mut bytes)
            .is_ok()
            && !bytes.is_empty()
        {
            sampled += bytes.len() as u64;
            samples.push(bytes);
        }
    }
    let Some(dictionary) = Dictionary::train(next_id, &samples) else {
        tracing::debug!(
            files = samples.len(),
            bytes = sampled,
            "small files too few or too alike for a dictionary"
        );
        return Ok(none);
    };
    tracing::info!(
        files = samples.len(),
        bytes = sampled,
        dictionary_bytes = dictionary.raw().len(),
        ms = started.elapsed().as_millis() as u64,
        "trained the store's dictionary for small files"
    );
    Ok(ForBatch {
        dictionary: Some(Arc::new(dictionary)),
        trained: true,
    })
}
