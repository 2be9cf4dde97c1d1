//! The store: one redb file indexing every batch, version and chunk, and
//! the chunks' payload in append-only segment files beside it.
//!
//! This crate owns opening and creating a store (schema check, lock and
//! corruption errors that name the file), reading records back
//! ([`Reader`]), rebuilding content chunk by chunk with every hash checked,
//! writing one batch in one transaction ([`BatchWriter`]), and editing
//! history in one ([`HistoryEditor`]). The format itself is documented in
//! [`schema`]; how one chunk's bytes are encoded, in [`codec`]; how payload
//! is appended and read back, in [`segments`].
//!
//! It knows nothing of state directories on disk, the kernel, async
//! runtimes or the command line: it builds and is tested anywhere, and its
//! failures are [`StoreError`]s a caller can match.

pub mod codec;
pub mod pack;
pub mod schema;
pub mod segments;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, ReadOnlyDatabase, ReadOnlyTable, ReadableDatabase, ReadableTable};
use sha2::{Digest, Sha256};

use schema::{
    decode, encode, BatchRecord, ChunkEncoding, ChunkRecord, EntryKind, SeenRecord, Stamp,
    VersionRecord, BATCHES, CHUNKS, CHUNK_HASHES, CHUNK_INDEX, CUTS, DICTS, GAPS, LATEST, META,
    META_CREATED_MS, META_MIN_READER_VERSION, META_RETENTION, META_SCHEMA_VERSION,
    META_SEGMENT_END, MIN_READER_VERSION, OLDEST_READABLE, PAYLOAD, SCHEMA_VERSION, SEEN, SETTLED,
    VERSIONS,
};

/// What a store operation can fail with.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed; each names the store file where it is
/// about the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} has schema version {found} (readable by schema {min_reader} and later); this diffkeeper reads schemas {oldest} to {newest}; use a matching diffkeeper release")]
    UnknownSchema {
        path: PathBuf,
        found: u32,
        min_reader: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("store {path} was written by a newer diffkeeper (schema {found}); this one (schema {newest}) can read it but not write it")]
    NewerSchema {
        path: PathBuf,
        found: u32,
        newest: u32,
    },
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("store {0} is in use by another diffkeeper process (one writer at a time)")]
    InUse(PathBuf),
    #[error("cannot open store {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create store {path}: directory {dir} does not exist")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("store {path} is a symlink to {target}, which does not exist; refusing to take it as a first start (create the target's directory, or point --store at the store itself)")]
    DanglingLink { path: PathBuf, target: String },
    #[error("store {path} cannot be opened, it is damaged or not a diffkeeper store: {source}")]
    Unopenable {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("store {path} is damaged or not a diffkeeper store")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("{0} is not a diffkeeper store (no schema version recorded)")]
    NotAStore(PathBuf),
    #[error("no store at {0}")]
    Missing(PathBuf),
    #[error("store {0} is open read-only")]
    ReadOnly(PathBuf),
    #[error("cannot compact the store file {path}")]
    Compact {
        path: PathBuf,
        #[source]
        source: redb::CompactionError,
    },
    #[error("reference of chunk {id}")]
    Reference {
        id: u64,
        #[source]
        source: Box<StoreError>,
    },
    #[error("not a file version")]
    NotAFile,
    #[error("chunk payload has too many pieces")]
    TooManyPieces,
    /// What content was being written to failed.
    #[error("cannot write the content out")]
    Sink(#[source] std::io::Error),
    /// redb failed underneath (I/O, a damaged page, a transaction).
    #[error(transparent)]
    Database(#[from] redb::Error),
}

/// Every redb error type becomes [`StoreError::Database`].
macro_rules! from_redb {
    ($($kind:ident),*) => {
        $(impl From<redb::$kind> for StoreError {
            fn from(e: redb::$kind) -> StoreError {
                StoreError::Database(e.into())
            }
        })*
    };
}

from_redb!(
    StorageError,
    TransactionError,
    TableError,
    CommitError,
    SetDurabilityError
);

enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

/// An open store file.
pub struct Store {
    db: Db,
    path: PathBuf,
}

fn describe_open_error(path: &Path, err: redb::DatabaseError) -> StoreError {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.to_path_buf()),
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            StoreError::Corrupt(format!(
                "store {} ends early ({len} bytes): the file is truncated or not a diffkeeper store",
                path.display()
            ))
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => StoreError::Io {
            path: path.to_path_buf(),
            source: io,
        },
        other => StoreError::Unopenable {
            path: path.to_path_buf(),
            source: other,
        },
    }
}

/// Refuses a store path that is a symlink to nothing: taking it as a first
/// start would replay nothing (a volume not mounted where the link points,
/// say) and then create a new, empty store behind the link.
fn refuse_dangling(path: &Path) -> Result<()> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && std::fs::metadata(path).is_err() {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        return Err(StoreError::DanglingLink {
            path: path.to_path_buf(),
            target,
        });
    }
    Ok(())
}

impl Store {
    /// Opens the store for writing, creating it (and its schema) if missing.
    pub fn create_or_open(path: &Path) -> Result<Store> {
        opened(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(StoreError::NoDirectory {
                    path: path.to_path_buf(),
                    dir: parent.to_path_buf(),
                });
            }
        }
        refuse_dangling(path)?;
        let existed = path.exists();
        let db = wait_for_writer(path, || {
            if existed {
                builder().open(path)
            } else {
                builder().create(path)
            }
        })
        .map_err(|e| describe_open_error(path, e))?;
        let store = Store {
            db: Db::ReadWrite(db),
            path: path.to_path_buf(),
        };
        if existed {
            store.check_schema()?;
        } else {
            store.init_schema()?;
        }
        Ok(store)
    }

    /// Opens an existing store without writing to it. `Ok(None)` when there
    /// is no file at `path`.
    pub fn open_read_only(path: &Path) -> Result<Option<Store>> {
        opened(path);
        refuse_dangling(path)?;
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let db = match wait_for_writer(path, || builder().open_read_only(path)) {
            Ok(db) => Db::ReadOnly(db),
            // Not closed cleanly (a crash or a full disk during a snapshot):
            // redb must roll back to the last committed batch, which needs
            // write access. Committed batches are untouched by this.
            Err(redb::DatabaseError::RepairAborted) => {
                tracing::info!(store = %path.display(), "store was not closed cleanly; recovering the last committed batch");
                Db::ReadWrite(
                    wait_for_writer(path, || builder().open(path))
                        .map_err(|e| describe_open_error(path, e))?,
                )
            }
            Err(e) => return Err(describe_open_error(path, e)),
        };
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        store.check_schema()?;
        Ok(Some(store))
    }

    /// Like [`Store::open_read_only`], but a missing file is an error.
    pub fn open_existing(path: &Path) -> Result<Store> {
        Store::open_read_only(path)?.ok_or_else(|| StoreError::Missing(path.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_schema(&self) -> Result<()> {
        let Db::ReadWrite(db) = &self.db else {
            return Err(StoreError::ReadOnly(self.path.clone()));
        };
        segments::clear_stale(&self.path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            stamp_schema(&mut meta)?;
            meta.insert(META_CREATED_MS, now_ms().to_le_bytes().as_slice())?;
            // Create every table so readers never meet a missing one.
            txn.open_table(BATCHES)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(LATEST)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(CHUNK_HASHES)?;
            txn.open_table(PAYLOAD)?;
            txn.open_table(DICTS)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Refuses a store this build cannot read, or (open for writing) one it
    /// must not write; upgrades an older one opened for writing (see
    /// `schema`, Versions of the format).
    fn check_schema(&self) -> Result<()> {
        let read_u32 =
            |meta: &redb::ReadOnlyTable<&str, &[u8]>, key: &str| -> Result<Option<u32>> {
                let Some(raw) = meta.get(key)? else {
                    return Ok(None);
                };
                let bytes: [u8; 4] = raw.value().try_into().map_err(|_| {
                    StoreError::Corrupt(format!("meta.{key} is not a 4-byte integer"))
                })?;
                Ok(Some(u32::from_le_bytes(bytes)))
            };
        let (found, min_reader) = (|| -> Result<(Option<u32>, Option<u32>)> {
            let txn = self.begin_read()?;
            let meta = txn.open_table(META)?;
            Ok((
                read_u32(&meta, META_SCHEMA_VERSION)?,
                read_u32(&meta, META_MIN_READER_VERSION)?,
            ))
        })()
        .map_err(|e| StoreError::Unreadable {
            path: self.path.clone(),
            source: Box::new(e),
        })?;
        let Some(found) = found else {
            return Err(StoreError::NotAStore(self.path.clone()));
        };
        let min_reader = min_reader.unwrap_or(found);
        if min_reader > SCHEMA_VERSION || found < OLDEST_READABLE {
            return Err(StoreError::UnknownSchema {
                path: self.path.clone(),
                found,
                min_reader,
                oldest: OLDEST_READABLE,
                newest: SCHEMA_VERSION,
            });
        }
        let Db::ReadWrite(db) = &self.db else {
            return Ok(());
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: self.path.clone(),
                found,
                newest: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            let txn = db.begin_write()?;
            {
                stamp_schema(&mut txn.open_table(META)?)?;
            }
            // Schema 1's settled marks name no stamp: they prove nothing now.
            match txn.delete_table(SETTLED) {
                Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            rekey_chunk_index(&txn)?;
            txn.commit()?;
            tracing::info!(store = %self.path.display(), from = found, to = SCHEMA_VERSION, "store upgraded to this build's schema");
        }
        Ok(())
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        Ok(match &self.db {
            Db::ReadWrite(db) => db.begin_read()?,
            Db::ReadOnly(db) => db.begin_read()?,
        })
    }

    /// A consistent read view of the store as of now.
    pub fn reader(&self) -> Result<Reader> {
        let txn = self.begin_read()?;
        Ok(Reader {
            batches: txn.open_table(BATCHES)?,
            versions: txn.open_table(VERSIONS)?,
            latest: txn.open_table(LATEST)?,
            chunks: txn.open_table(CHUNKS)?,
            chunk_index: match optional_table(&txn, CHUNK_HASHES)? {
                Some(table) => ChunkIndex::Short(table),
                None => ChunkIndex::Full(txn.open_table(CHUNK_INDEX)?),
            },
            payload: txn.open_table(PAYLOAD)?,
            // Tables that older stores may not have (see `schema`).
            gaps: optional_table(&txn, GAPS)?,
            seen: optional_table(&txn, SEEN)?,
            cuts: optional_table(&txn, CUTS)?,
            dicts: optional_table(&txn, DICTS)?,
            dictionaries: std::sync::Mutex::new(std::collections::HashMap::new()),
            packs: BaseCache::holding(PACKS_DECODED),
            segments: segments::SegmentReader::new(&self.path),
            path: self.path.clone(),
        })
    }

    /// The retention policy saved in the store, if any.
    pub fn retention(&self) -> Result<Option<schema::RetentionRecord>> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META)?;
        let found = meta.get(META_RETENTION)?;
        match found {
            Some(raw) => Ok(Some(decode(raw.value(), "retention policy")?)),
            None => Ok(None),
        }
    }

    /// Saves (or, with `None`, forgets) the store's retention policy.
    pub fn set_retention(&self, policy: Option<&schema::RetentionRecord>) -> Result<()> {
        let Db::ReadWrite(db) = &self.db else {
            return Err(StoreError::ReadOnly(self.path.clone()));
        };
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            match policy {
                Some(policy) => meta.insert(META_RETENTION, encode(policy).as_slice())?,
                None => meta.remove(META_RETENTION)?,
            };
        }
        txn.commit()?;
        Ok(())
    }

    /// Starts rewriting history (retention). One writer at a time.
    pub fn edit_history(&self) -> Result<HistoryEditor> {
        let Db::ReadWrite(db) = &self.db else {
            return Err(StoreError::ReadOnly(self.path.clone()));
        };
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(true);
        let committed = segment_end(&txn)?;
        Ok(HistoryEditor {
            txn,
            segments: segments::SegmentWriter::new(&self.path, committed),
            reader: segments::SegmentReader::new(&self.path),
            store: self.path.clone(),
            unused: Vec::new(),
            next_chunk: None,
        })
    }

    /// Gives the file's free space back to the file system: redb moves
    /// pages towards the start of the file and truncates it, each step a
    /// committed transaction of its own, so a crash midway leaves a valid
    /// (if not fully shrunk) store. No reader of this store may be alive.
    ///
    /// First it rewrites, in key order, each index table whose pages have
    /// come to hold more than a fifth of empty space (see `repack`): redb
    /// splits a full leaf in half to insert into it and never merges the
    /// halves again, so edits scattered over a table leave its leaves
    /// about a third empty. Failing that (a full disk: the copy needs room
    /// before the old pages are free) costs only those pages; the shrink
    /// goes on.
    pub fn shrink(&mut self) -> Result<()> {
        let Db::ReadWrite(db) = &mut self.db else {
            return Err(StoreError::ReadOnly(self.path.clone()));
        };
        if let Err(e) = repack(db) {
            tracing::warn!(store = %self.path.display(), error = %e, "cannot repack the store's index tables; shrinking without");
        }
        db.compact().map_err(|source| StoreError::Compact {
            path: self.path.clone(),
            source,
        })?;
        Ok(())
    }

    /// How full the index's pages are: the bytes its records take and the
    /// bytes of the pages that hold them, over every table. Walks every
    /// page of the index once.
    pub fn index_usage(&self) -> Result<IndexUsage> {
        use redb::{ReadableTableMetadata, TableHandle};
        let txn = self.begin_read()?;
        let mut usage = IndexUsage::default();
        for handle in txn.list_tables()? {
            let definition = redb::TableDefinition::<&[u8], &[u8]>::new(handle.name());
            let table = IndexUsage::of(&txn.open_untyped_table(definition)?.stats()?);
            usage.record_bytes += table.record_bytes;
            usage.page_bytes += table.page_bytes;
        }
        Ok(usage)
    }

    /// The store file's length (0 when it cannot be looked at).
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Shrinks the file (see [`Store::shrink`]) when a write made it grow
    /// by more than [`MAX_FILE_SLACK_BYTES`] from `before`, its length
    /// before that write; returns the length it shrank from, if it did. A write transaction
    /// copies every page it changes, and when the copies do not fit in the
    /// file's free pages redb doubles the file: a store of 50,000 small
    /// files with 21 MB of index became a 42 MB file (22 MB of it used) at
    /// its second batch, and stayed so. Growth is what says there is slack
    /// (the pages freed by the copies are free only once the write has
    /// committed), so this costs one `stat` when the file did not grow;
    /// giving the slack back after a batch of 100 files took 190-230 ms
    /// there (70 ms with redb's default 1 GiB cache instead of ours).
    pub fn shrink_if_grown(&mut self, before: u64) -> Result<Option<u64>> {
        let grown = self.file_len();
        if matches!(self.db, Db::ReadOnly(_)) || grown <= before + MAX_FILE_SLACK_BYTES {
            return Ok(None);
        }
        self.shrink()?;
        Ok(Some(grown))
    }

    /// Starts writing a new batch. One writer at a time per store.
    pub fn begin_batch(&self) -> Result<BatchWriter> {
        let Db::ReadWrite(db) = &self.db else {
            return Err(StoreError::ReadOnly(self.path.clone()));
        };
        let mut txn = db.begin_write()?;
        // Saves allocator state with each commit so that opening after a
        // crash is instant instead of a walk over the whole store.
        txn.set_quick_repair(true);
        let (batch, next_chunk) = {
            let batches = txn.open_table(BATCHES)?;
            let chunks = txn.open_table(CHUNKS)?;
            let last_batch = batches.last()?.map(|(k, _)| k.value()).unwrap_or(0);
            let last_chunk = chunks.last()?.map(|(k, _)| k.value()).unwrap_or(0);
            (last_batch + 1, last_chunk + 1)
        };
        let committed = segment_end(&txn)?;
        Ok(BatchWriter {
            segments: segments::SegmentWriter::new(&self.path, committed),
            txn,
            batch,
            next_chunk: Arc::new(AtomicU64::new(next_chunk)),
            pending: Pending::default(),
        })
    }
}

/// What [`Store::index_usage`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexUsage {
    /// Keys, values and B-tree branch keys.
    pub record_bytes: u64,
    /// The pages holding them, empty parts included: the file is these,
    /// the free pages and redb's own headers.
    pub page_bytes: u64,
}

impl IndexUsage {
    /// One table's, from what redb counted walking its pages.
    fn of(stats: &redb::TableStats) -> IndexUsage {
        let record_bytes = stats.stored_bytes() + stats.metadata_bytes();
        IndexUsage {
            record_bytes,
            page_bytes: record_bytes + stats.fragmented_bytes(),
        }
    }
}

/// Schema 4 and older to 5: `chunk_index`'s entries move to
/// `chunk_hashes`, each under its hash's first 8 bytes (an entry whose
/// prefix an earlier one took stays unindexed, see the schema's Finding a
/// chunk by its content), and `chunk_index` is dropped.
fn rekey_chunk_index(txn: &redb::WriteTransaction) -> Result<()> {
    let mut short = txn.open_table(CHUNK_HASHES)?;
    let full = match txn.open_table(CHUNK_INDEX) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for row in full.iter()? {
        let (hash, id) = row?;
        let key = schema::hash_key(hash.value());
        if short.get(key)?.is_none() {
            short.insert(key, id.value())?;
        }
    }
    txn.delete_table(full)?;
    Ok(())
}

/// Table that [`repack`] copies a table into before it takes its name.
const REPACKING: &str = "repacking";

/// A table smaller than this is left as it is: rewriting it gives back
/// less than the pages a shrink moves anyway.
const REPACK_MIN_BYTES: u64 = 1 << 20;

/// Rewrites each of the index tables that grow by scattered inserts
/// (versions, latest, chunks, chunk_hashes, seen) whose pages are more than
/// a fifth empty, in one transaction: rows copied in key order into a
/// fresh table fill its leaves, the old table is deleted and the copy takes
/// its name. A crash leaves either the old tables or the new ones.
///
/// 50,000 small files after ten rounds of 100 edits: versions 2,562 pages
/// against 1,826 for the same rows in key order, chunk_index (schema 4)
/// 728 against 514; the file 19.4 MB against 15.5 MB with every table repacked.
/// Rows inserted later split the packed leaves again, so a table comes
/// back here every few rounds; checking costs one walk over its pages.
fn repack(db: &Database) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    let mut repacked = false;
    repacked |= repack_table(&txn, VERSIONS)?;
    repacked |= repack_table(&txn, LATEST)?;
    repacked |= repack_table(&txn, CHUNKS)?;
    repacked |= repack_table(&txn, CHUNK_HASHES)?;
    repacked |= repack_table(&txn, SEEN)?;
    if repacked {
        txn.commit()?;
    } else {
        txn.abort()?;
    }
    Ok(())
}

/// Rewrites `table` in key order if it holds at least
/// [`REPACK_MIN_BYTES`] of pages and more than a fifth of them is empty;
/// whether it did. A table the store does not have is left alone.
fn repack_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::WriteTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<bool> {
    use redb::ReadableTableMetadata;
    let source = match txn.open_table(table) {
        Ok(open) => open,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let usage = IndexUsage::of(&source.stats()?);
    let empty = usage.page_bytes - usage.record_bytes;
    if usage.page_bytes < REPACK_MIN_BYTES || empty * 5 <= usage.page_bytes {
        return Ok(false);
    }
    let mut target = txn.open_table(redb::TableDefinition::<K, V>::new(REPACKING))?;
    for row in source.iter()? {
        let (key, value) = row?;
        target.insert(key.value(), value.value())?;
    }
    // Both take the open table and close it first.
    txn.delete_table(source)?;
    txn.rename_table(target, table)?;
    Ok(true)
}

/// Where the last commit left the payload segments (`meta.segment_end`).
fn segment_end(txn: &redb::WriteTransaction) -> Result<Option<schema::Location>> {
    let meta = txn.open_table(META)?;
    let found = meta.get(META_SEGMENT_END)?;
    found
        .map(|raw| decode(raw.value(), "meta.segment_end"))
        .transpose()
}

/// Commits `txn` with the payload `writer` appended: made durable first,
/// then `meta.segment_end` recorded with the records.
fn commit_with_segments(
    txn: redb::WriteTransaction,
    writer: &mut segments::SegmentWriter,
) -> Result<()> {
    if let Some(end) = writer.sync()? {
        txn.open_table(META)?
            .insert(META_SEGMENT_END, encode(&end).as_slice())?;
    }
    // From here the appends stay whatever the commit does: if it fails
    // after all, the next writer cuts them off by the segment end it finds
    // committed.
    writer.keep();
    txn.commit()?;
    Ok(())
}

/// `record` with `payload` appended to the segments: its place and length.
fn appended(
    writer: &mut segments::SegmentWriter,
    record: &ChunkRecord,
    payload: &[u8],
) -> Result<ChunkRecord> {
    Ok(ChunkRecord {
        at: Some(writer.append(payload)?),
        stored_len: u32::try_from(payload.len()).map_err(|_| StoreError::TooManyPieces)?,
        ..record.clone()
    })
}

/// `record` placed: its payload appended to the segments, or, for a
/// packed chunk (which has none of its own), as it is; a packed chunk
/// given payload is refused.
fn placed(
    writer: &mut segments::SegmentWriter,
    id: u64,
    record: &ChunkRecord,
    payload: &[u8],
) -> Result<ChunkRecord> {
    match record.pack() {
        Some(_) if !payload.is_empty() => Err(StoreError::Corrupt(format!(
            "packed chunk {id} was given {} bytes of payload",
            payload.len()
        ))),
        Some(_) => Ok(record.clone()),
        None => appended(writer, record, payload),
    }
}

/// A pack's `record` with its payload appended; a record that cannot hold
/// packed chunks is refused.
fn pack_appended(
    writer: &mut segments::SegmentWriter,
    id: u64,
    record: &ChunkRecord,
    payload: &[u8],
) -> Result<ChunkRecord> {
    if !record.can_be_pack() {
        return Err(StoreError::Corrupt(format!(
            "chunk {id} was given as a pack but is {:?}",
            record.encoding
        )));
    }
    appended(writer, record, payload)
}

/// Reads chunk `id`'s payload from the segments; damage names the chunk.
fn read_segment(
    reader: &segments::SegmentReader,
    id: u64,
    at: schema::Location,
    len: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    reader.read(at, len as usize, out).map_err(|e| match e {
        StoreError::Corrupt(why) => StoreError::Corrupt(format!("chunk {id}: {why}")),
        other => other,
    })
}

/// The bytes a store takes, apparent and allocated: its file and its
/// payload segments.
pub fn disk_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (file, file_blocks) = std::fs::metadata(path)
        .map(|m| (m.len(), m.blocks() * 512))
        .unwrap_or((0, 0));
    let (segments, segment_blocks) = segments::usage(path);
    (file + segments, file_blocks + segment_blocks)
}

/// A table that stores written by older builds may lack.
fn optional_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How long opening a store waits for another process to release it.
/// Batches commit in milliseconds; a `compact` of a large store can take
/// seconds.
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens with `open`, retrying while another process holds the store (up
/// to [`WRITER_WAIT`]), so a `log` or `restore` run while a watcher commits
/// a batch waits for it instead of failing.
fn wait_for_writer<T>(
    path: &Path,
    open: impl Fn() -> Result<T, redb::DatabaseError>,
) -> Result<T, redb::DatabaseError> {
    let started = std::time::Instant::now();
    let mut logged = false;
    loop {
        match open() {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < WRITER_WAIT => {
                if !logged {
                    tracing::debug!(store = %path.display(), "store in use by another process; waiting");
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Growth of the store file in one write that [`Store::shrink_if_grown`]
/// leaves: shrinking a file of a few MiB each batch would cost more than it
/// gives back.
pub const MAX_FILE_SLACK_BYTES: u64 = 1 << 20;

/// redb's page cache: enough for the B-tree's upper levels, small enough
/// that capture and replay stay within tens of MiB (redb's default is 1 GiB).
const CACHE_BYTES: usize = 16 << 20;

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    builder
}

/// Records this build's schema and its minimum reader in `meta`.
fn stamp_schema(meta: &mut redb::Table<&str, &[u8]>) -> Result<()> {
    meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_le_bytes().as_slice())?;
    meta.insert(
        META_MIN_READER_VERSION,
        MIN_READER_VERSION.to_le_bytes().as_slice(),
    )?;
    Ok(())
}

/// Decodes chunk `id`'s record, refusing lengths no chunk can have before
/// anything is allocated for them (a damaged or crafted length must not
/// make a reader allocate gigabytes).
fn chunk_record_of(id: u64, bytes: &[u8]) -> std::result::Result<ChunkRecord, StoreError> {
    let record = ChunkRecord::decode(bytes, "chunk record")?;
    let max = schema::CHUNK_MAX.max(schema::PACK_BYTES) as u64;
    if u64::from(record.len) > max || u64::from(record.stored_len) > max {
        return Err(StoreError::Corrupt(format!(
            "chunk {id} claims {} bytes ({} stored), more than a chunk can hold ({max})",
            record.len, record.stored_len
        )));
    }
    Ok(record)
}

/// The store this process opened last, for naming it when a damaged file
/// makes redb fail an internal check (see `main`).
static LAST_OPENED: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The store this process opened last, if any.
pub fn last_opened() -> Option<PathBuf> {
    LAST_OPENED.lock().ok().and_then(|p| p.clone())
}

fn opened(path: &Path) {
    if let Ok(mut last) = LAST_OPENED.lock() {
        *last = Some(path.to_path_buf());
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One entry of a root's current state, as the store has it.
#[derive(Debug, Clone)]
pub struct LatestEntry {
    pub path: Vec<u8>,
    pub batch: u64,
    pub version: VersionRecord,
}

/// A snapshot view of the store. All reads see the same committed state.
pub struct Reader {
    batches: ReadOnlyTable<u64, &'static [u8]>,
    versions: ReadOnlyTable<(&'static str, &'static [u8], u64), &'static [u8]>,
    latest: ReadOnlyTable<PathKey, u64>,
    chunks: ReadOnlyTable<u64, &'static [u8]>,
    chunk_index: ChunkIndex,
    payload: ReadOnlyTable<(u64, u32), &'static [u8]>,
    gaps: Option<ReadOnlyTable<u64, i64>>,
    seen: Option<ReadOnlyTable<PathKey, &'static [u8]>>,
    cuts: Option<ReadOnlyTable<u64, &'static [u8]>>,
    dicts: Option<ReadOnlyTable<u32, &'static [u8]>>,
    /// Dictionaries loaded so far, by id.
    dictionaries: std::sync::Mutex<std::collections::HashMap<u32, Arc<codec::Dictionary>>>,
    /// Packs decoded last (see the schema's Packs): the members of one are
    /// read one after another.
    packs: BaseCache,
    segments: segments::SegmentReader,
    path: PathBuf,
}

/// Where a reader finds chunks by content: `chunk_hashes`, or in a
/// schema-4 store opened read-only, its `chunk_index`.
enum ChunkIndex {
    Short(ReadOnlyTable<u64, u64>),
    Full(ReadOnlyTable<&'static [u8; 32], u64>),
}

/// Packs a reader keeps decoded (each up to [`schema::PACK_BYTES`]): a
/// replay's two threads each read one pack's members at a time.
const PACKS_DECODED: usize = 4;

/// A `(root, path)` key, as `latest` and `seen` have.
type PathKey = (&'static str, &'static [u8]);

impl Reader {
    /// The store file this reader reads.
    pub fn store_path(&self) -> &Path {
        &self.path
    }

    /// Names of all roots with history, sorted.
    pub fn roots(&self) -> Result<Vec<String>> {
        let mut roots: Vec<String> = Vec::new();
        for item in self.latest.iter()? {
            let (key, _) = item?;
            let (root, _) = key.value();
            if roots.last().map(String::as_str) != Some(root) {
                roots.push(root.to_string());
            }
        }
        Ok(roots)
    }

    /// Every path of `root` with its newest version (tombstones included),
    /// sorted by path bytes.
    pub fn latest(&self, root: &str) -> Result<Vec<LatestEntry>> {
        let mut out = Vec::new();
        self.for_each_latest::<StoreError>(root, |entry| {
            out.push(entry);
            Ok(())
        })?;
        Ok(out)
    }

    /// Each path of `root` with its newest version, as [`Reader::latest`]
    /// lists them, one at a time: a scan of 50,000 files need not hold
    /// every record at once.
    pub fn for_each_latest<E: From<StoreError>>(
        &self,
        root: &str,
        mut f: impl FnMut(LatestEntry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_latest_of::<E>(root, |path, batch| {
            f(LatestEntry {
                path: path.to_vec(),
                batch,
                version: self.version(root, path, batch)?,
            })
        })
    }

    /// The newest version of one path (a tombstone if it was deleted), or
    /// `None` when the store never had it.
    pub fn latest_of(&self, root: &str, path: &[u8]) -> Result<Option<LatestEntry>> {
        let Some(batch) = self.latest.get((root, path))? else {
            return Ok(None);
        };
        let batch = batch.value();
        Ok(Some(LatestEntry {
            path: path.to_vec(),
            batch,
            version: self.version(root, path, batch)?,
        }))
    }

    /// Every path of `root` as it was right after batch `batch` committed,
    /// sorted by path bytes: the newest version at or before that batch,
    /// and a tombstone (with batch 0) for a path that only appeared later,
    /// so that rolling a directory back removes it.
    pub fn state_at(&self, root: &str, batch: u64) -> Result<Vec<LatestEntry>> {
        // `latest` names each path's newest version: at a moment at or
        // after it, that version and no other (a damaged key must not make
        // an older version stand in for a missing one). Both tables are in
        // path order, so they are read side by side: no map of every path
        // (5 MB on 50,000 files) stands beside the list.
        let mut count = 0;
        self.for_each_latest_of::<StoreError>(root, |_, _| {
            count += 1;
            Ok(())
        })?;
        // At most one entry per path the latest table knows: reserved at
        // once, so the list never stands in memory twice while it grows.
        let mut out = Vec::with_capacity(count);
        let mut newest = LatestCursor::new(self, root, batch)?;
        let mut current: Option<(Vec<u8>, u64)> = None;
        let mut finish = |path: Vec<u8>, best: u64| -> Result<()> {
            match newest.take(&path)? {
                Some(n) if n <= batch && n != best => {
                    return Err(StoreError::Corrupt(format!(
                        "{root}:{}: its newest version (batch {n}) is missing from the versions table; refusing to use another in its place",
                        String::from_utf8_lossy(&path)
                    )))
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "{root}:{} has versions but no entry in the latest table",
                        String::from_utf8_lossy(&path)
                    )))
                }
                _ => {}
            }
            let version = if best == 0 {
                VersionRecord::tombstone()
            } else {
                self.version(root, &path, best)?
            };
            out.push(LatestEntry {
                path,
                batch: best,
                version,
            });
            Ok(())
        };
        let lo: (&str, &[u8], u64) = (root, &[], 0);
        for item in self.versions.range(lo..)? {
            let (key, _) = item?;
            let (r, path, b) = key.value();
            if r != root {
                break;
            }
            match &mut current {
                Some((p, best)) if p.as_slice() == path => {
                    if b <= batch {
                        *best = b;
                    }
                }
                _ => {
                    if let Some((p, best)) = current.take() {
                        finish(p, best)?;
                    }
                    current = Some((path.to_vec(), if b <= batch { b } else { 0 }));
                }
            }
        }
        if let Some((p, best)) = current {
            finish(p, best)?;
        }
        newest.finish()?;
        Ok(out)
    }

    /// Every `latest` entry of `root`: `(path, batch)` by path.
    pub fn for_each_latest_of<E: From<StoreError>>(
        &self,
        root: &str,
        mut f: impl FnMut(&[u8], u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let lo: (&str, &[u8]) = (root, &[]);
        for item in self.latest.range(lo..).map_err(StoreError::from)? {
            let (key, batch) = item.map_err(StoreError::from)?;
            let (r, path) = key.value();
            if r != root {
                break;
            }
            f(path, batch.value())?;
        }
        Ok(())
    }

    /// Every entry of the chunk index: `(key, chunk id)`, the key being
    /// what [`schema::hash_key`] makes of the chunk's hash (in a schema-4
    /// store, of the hash the entry is under).
    pub fn for_each_index_entry<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        match &self.chunk_index {
            ChunkIndex::Short(table) => {
                for item in table.iter().map_err(StoreError::from)? {
                    let (key, id) = item.map_err(StoreError::from)?;
                    f(key.value(), id.value())?;
                }
            }
            ChunkIndex::Full(table) => {
                for item in table.iter().map_err(StoreError::from)? {
                    let (hash, id) = item.map_err(StoreError::from)?;
                    f(schema::hash_key(hash.value()), id.value())?;
                }
            }
        }
        Ok(())
    }

    /// Every version of one path, oldest first.
    pub fn versions_of(&self, root: &str, path: &[u8]) -> Result<Vec<(u64, VersionRecord)>> {
        let mut out = Vec::new();
        let lo: (&str, &[u8], u64) = (root, path, 0);
        let hi: (&str, &[u8], u64) = (root, path, u64::MAX);
        for item in self.versions.range(lo..=hi)? {
            let (key, value) = item?;
            out.push((key.value().2, self.decode_version(value.value())?));
        }
        Ok(out)
    }

    /// One batch's record, if the store has that batch.
    pub fn batch(&self, id: u64) -> Result<Option<BatchRecord>> {
        match self.batches.get(id)? {
            Some(raw) => Ok(Some(decode(raw.value(), "batch record")?)),
            None => Ok(None),
        }
    }

    /// How `batch`'s cut was taken; `None` when it was not checked (see
    /// `schema`, cuts).
    pub fn cut(&self, batch: u64) -> Result<Option<schema::CutRecord>> {
        let Some(cuts) = &self.cuts else {
            return Ok(None);
        };
        match cuts.get(batch)? {
            Some(raw) => Ok(Some(decode(raw.value(), "cut record")?)),
            None => Ok(None),
        }
    }

    /// When batches following `batch` were dropped by compaction: the time
    /// the first of them committed, until which `batch`'s state held.
    pub fn gap_after(&self, batch: u64) -> Result<Option<i64>> {
        match &self.gaps {
            Some(gaps) => Ok(gaps.get(batch)?.map(|v| v.value())),
            None => Ok(None),
        }
    }

    /// The stamp `root`/`path`'s version of `batch` was last found on disk
    /// with, if a capture or replay found it again after that batch (see
    /// `schema`, Stamps).
    pub fn seen(&self, root: &str, path: &[u8], batch: u64) -> Result<Option<SeenRecord>> {
        let Some(seen) = &self.seen else {
            return Ok(None);
        };
        let Some(raw) = seen.get((root, path))? else {
            return Ok(None);
        };
        let record: SeenRecord = decode(raw.value(), "seen record")?;
        Ok((record.batch == batch).then_some(record))
    }

    /// Decodes a version record, reading its chunk's hash where the
    /// record does not keep its own (schema 5, a one-chunk file). A chunk
    /// that is missing or damaged gives zeros: whatever reads the content
    /// meets that chunk and reports it (verify names it with the version).
    fn decode_version(&self, bytes: &[u8]) -> Result<VersionRecord> {
        VersionRecord::decode(bytes, "version record", |id| {
            Ok(match self.chunks.get(id)? {
                Some(raw) => chunk_record_of(id, raw.value()).map_or([0; 32], |c| c.hash),
                None => [0; 32],
            })
        })
    }

    /// One version record.
    pub fn version(&self, root: &str, path: &[u8], batch: u64) -> Result<VersionRecord> {
        let raw = self.versions.get((root, path, batch))?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{root}:{} has no version at batch {batch}",
                String::from_utf8_lossy(path)
            ))
        })?;
        self.decode_version(raw.value())
    }

    /// Every version of `root`'s paths: `(path, batch, record)` in key order.
    pub fn for_each_version_of<E: From<StoreError>>(
        &self,
        root: &str,
        mut f: impl FnMut(&[u8], u64, VersionRecord) -> Result<(), E>,
    ) -> Result<(), E> {
        let lo: (&str, &[u8], u64) = (root, &[], 0);
        for item in self.versions.range(lo..).map_err(StoreError::from)? {
            let (key, value) = item.map_err(StoreError::from)?;
            let (r, path, batch) = key.value();
            if r != root {
                break;
            }
            f(path, batch, self.decode_version(value.value())?)?;
        }
        Ok(())
    }

    /// Every version of every path: `(root, path, batch, record)` in key order.
    pub fn for_each_version<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(&str, &[u8], u64, VersionRecord) -> Result<(), E>,
    ) -> Result<(), E> {
        for item in self.versions.iter().map_err(StoreError::from)? {
            let (key, value) = item.map_err(StoreError::from)?;
            let (root, path, batch) = key.value();
            let record = self.decode_version(value.value())?;
            f(root, path, batch, record)?;
        }
        Ok(())
    }

    /// When each batch's scan started, by batch id.
    pub fn batch_started(&self) -> Result<std::collections::HashMap<u64, i64>> {
        Ok(self
            .batches()?
            .into_iter()
            .map(|(id, batch)| (id, batch.started_ms))
            .collect())
    }

    /// The newest batch's id (0 for an empty store).
    pub fn last_batch(&self) -> Result<u64> {
        Ok(self.batches.last()?.map(|(k, _)| k.value()).unwrap_or(0))
    }

    /// Every batch, oldest first.
    pub fn batches(&self) -> Result<Vec<(u64, BatchRecord)>> {
        let mut out = Vec::new();
        for item in self.batches.iter()? {
            let (k, v) = item?;
            out.push((k.value(), decode(v.value(), "batch record")?));
        }
        Ok(out)
    }

    /// Number of stored chunks and their total payload bytes.
    pub fn chunk_totals(&self) -> Result<(u64, u64)> {
        let mut count = 0u64;
        let mut bytes = 0u64;
        for item in self.chunks.iter()? {
            let (_, v) = item?;
            let record = ChunkRecord::decode(v.value(), "chunk record")?;
            count += 1;
            bytes += u64::from(record.stored_len);
        }
        Ok((count, bytes))
    }

    /// Every chunk id, ascending.
    pub fn chunk_ids(&self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for item in self.chunks.iter()? {
            ids.push(item?.0.value());
        }
        Ok(ids)
    }

    /// The id of a stored chunk with this content hash.
    pub fn find_chunk(&self, hash: &[u8; 32]) -> Result<Option<u64>> {
        match &self.chunk_index {
            ChunkIndex::Full(table) => Ok(table.get(hash)?.map(|v| v.value())),
            ChunkIndex::Short(table) => {
                let Some(id) = table.get(schema::hash_key(hash))?.map(|v| v.value()) else {
                    return Ok(None);
                };
                // The key is a prefix: the chunk's own hash decides.
                let found = self.chunk_record(id)?;
                Ok((found.hash == *hash).then_some(id))
            }
        }
    }

    /// Every chunk's id and record, ascending by id.
    pub fn for_each_chunk<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(u64, ChunkRecord) -> Result<(), E>,
    ) -> Result<(), E> {
        for item in self.chunks.iter().map_err(StoreError::from)? {
            let (k, v) = item.map_err(StoreError::from)?;
            f(k.value(), chunk_record_of(k.value(), v.value())?)?;
        }
        Ok(())
    }

    /// A chunk's record.
    pub fn chunk_record(&self, id: u64) -> Result<ChunkRecord> {
        let raw = self
            .chunks
            .get(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("chunk {id} is missing")))?;
        chunk_record_of(id, raw.value())
    }

    /// Dictionary `id`, loaded once per reader.
    pub fn dictionary_of(&self, id: u32) -> Result<Arc<codec::Dictionary>> {
        if let Some(found) = self
            .dictionaries
            .lock()
            .ok()
            .and_then(|d| d.get(&id).cloned())
        {
            return Ok(found);
        }
        let raw = match &self.dicts {
            Some(table) => table.get(id)?.map(|v| v.value().to_vec()),
            None => None,
        }
        .ok_or_else(|| StoreError::Corrupt(format!("dictionary {id} is missing")))?;
        let loaded = Arc::new(
            codec::Dictionary::new(id, raw)
                .map_err(|e| StoreError::Corrupt(format!("dictionary {id}: {e}")))?,
        );
        if let Ok(mut cache) = self.dictionaries.lock() {
            cache.insert(id, loaded.clone());
        }
        Ok(loaded)
    }

    /// The store's dictionary for new bases (the first trained), if it has
    /// one.
    pub fn dictionary(&self) -> Result<Option<Arc<codec::Dictionary>>> {
        let first = match &self.dicts {
            Some(table) => table.first()?.map(|(k, _)| k.value()),
            None => None,
        };
        first.map(|id| self.dictionary_of(id)).transpose()
    }

    /// Every stored dictionary's id and size.
    pub fn dictionaries(&self) -> Result<Vec<(u32, usize)>> {
        let mut out = Vec::new();
        if let Some(table) = &self.dicts {
            for item in table.iter()? {
                let (k, v) = item?;
                out.push((k.value(), v.value().len()));
            }
        }
        Ok(out)
    }

    /// Reads a chunk's stored payload into `out` (replacing its contents).
    fn payload_into(&self, id: u64, record: &ChunkRecord, out: &mut Vec<u8>) -> Result<()> {
        if let Some(at) = record.at {
            return read_segment(&self.segments, id, at, record.stored_len, out);
        }
        out.clear();
        out.reserve(record.stored_len as usize);
        for item in self.payload.range((id, 0)..=(id, u32::MAX))? {
            let (_, piece) = item?;
            out.extend_from_slice(piece.value());
        }
        if out.len() != record.stored_len as usize {
            return Err(StoreError::Corrupt(format!(
                "chunk {id} payload is {} bytes, its record says {}",
                out.len(),
                record.stored_len
            )));
        }
        Ok(())
    }

    /// Where a file version's content starts in a pack, `(pack, offset)`,
    /// when its first chunk is packed: reading files in this order decodes
    /// each pack once (see the schema's Packs).
    pub fn pack_place(&self, version: &VersionRecord) -> Result<Option<(u64, u32)>> {
        let Some(&first) = version.chunks.first() else {
            return Ok(None);
        };
        Ok(match self.chunk_record(first)?.encoding {
            ChunkEncoding::Packed { pack, offset } => Some((pack, offset)),
            _ => None,
        })
    }

    /// Rebuilds a chunk's bytes and checks them against its SHA-256.
    pub fn chunk_bytes(&self, id: u64) -> Result<Vec<u8>> {
        let record = self.chunk_record(id)?;
        self.decode_chunk(id, &record, Check::Chunk, &BaseCache::default())
    }

    /// The concatenated bytes of base chunks `bases` (a delta's reference),
    /// each checked against its SHA-256 when `check` says so. One base is
    /// not copied: a checkpoint's restore copied 200 MB of decoded bases
    /// into fresh buffers, mostly page faults.
    pub fn reference<'c>(
        &self,
        bases: &[u64],
        check: Check,
        cache: &'c BaseCache,
    ) -> Result<Reference<'c>> {
        if bases.len() > schema::MAX_DELTA_BASES {
            return Err(StoreError::Corrupt(format!(
                "a delta references {} chunks, more than {}",
                bases.len(),
                schema::MAX_DELTA_BASES
            )));
        }
        let mut decoded = Vec::with_capacity(bases.len());
        for &base in bases {
            let bytes = match cache.get(base) {
                Some(bytes) => bytes,
                None => {
                    let record = self.chunk_record(base)?;
                    if !record.is_base() {
                        return Err(StoreError::Corrupt(format!(
                            "chunk {base} is referenced as a delta base but is itself a delta"
                        )));
                    }
                    self.decode_cached(base, &record, check, cache, cache)?
                }
            };
            decoded.push(bytes);
        }
        if decoded.len() == 1 {
            if let Some(one) = decoded.pop() {
                return Ok(Reference {
                    bytes: ReferenceBytes::One(one),
                    cache,
                });
            }
        }
        let mut joined = cache.joined_buffer();
        joined.reserve(decoded.iter().map(|bytes| bytes.len()).sum());
        for bytes in &decoded {
            joined.extend_from_slice(bytes);
        }
        Ok(Reference {
            bytes: ReferenceBytes::Joined(joined),
            cache,
        })
    }

    /// The bytes of pack `pack`, decoded or from the packs decoded last.
    /// Its own hash is not checked here: each member is checked (its own
    /// SHA-256, or the whole file's), and `verify` checks the pack itself.
    fn pack_bytes(&self, pack: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(bytes) = self.packs.get(pack) {
            return Ok(bytes);
        }
        let record = self.chunk_record(pack)?;
        if !record.can_be_pack() {
            return Err(StoreError::Corrupt(format!(
                "chunk {pack} is named as a pack but is not a base of its own ({:?})",
                record.encoding
            )));
        }
        self.decode_cached(
            pack,
            &record,
            Check::Content,
            &self.packs,
            &BaseCache::default(),
        )
    }

    /// Rebuilds a chunk into `into`'s spare buffers and keeps it there;
    /// `bases` holds the bases of a delta.
    fn decode_cached(
        &self,
        id: u64,
        record: &ChunkRecord,
        check: Check,
        into: &BaseCache,
        bases: &BaseCache,
    ) -> Result<Arc<Vec<u8>>> {
        let (mut out, mut payload) = into.buffers();
        self.decode_chunk_into(id, record, check, bases, &mut payload, &mut out)?;
        into.keep_payload(payload);
        Ok(into.put(id, out))
    }

    /// Rebuilds a chunk whose record is already at hand.
    fn decode_chunk(
        &self,
        id: u64,
        record: &ChunkRecord,
        check: Check,
        cache: &BaseCache,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.decode_chunk_into(id, record, check, cache, &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    /// Rebuilds a chunk into `out`, using `scratch` for its payload; both
    /// buffers are reused across calls so that large chunks do not cost a
    /// fresh allocation (and its page faults) each.
    fn decode_chunk_into(
        &self,
        id: u64,
        record: &ChunkRecord,
        check: Check,
        cache: &BaseCache,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let len = record.len as usize;
        match &record.encoding {
            ChunkEncoding::Raw => self.payload_into(id, record, out)?,
            ChunkEncoding::Lz4 => {
                self.payload_into(id, record, scratch)?;
                // Only bytes the buffer never had are zeroed: lz4 overwrites
                // what it produces, and the length is checked below.
                out.resize(len, 0);
                let n = lz4_flex::block::decompress_into(scratch, out).map_err(|e| {
                    StoreError::Corrupt(format!("chunk {id} does not decompress: {e}"))
                })?;
                out.truncate(n);
            }
            ChunkEncoding::Zstd { dict } => {
                self.payload_into(id, record, scratch)?;
                let dictionary = match *dict {
                    0 => None,
                    dict => Some(self.dictionary_of(dict)?),
                };
                codec::decode_base_into(scratch, len, dictionary.as_deref(), out).map_err(|e| {
                    StoreError::Corrupt(format!("chunk {id} does not decompress: {e}"))
                })?;
            }
            ChunkEncoding::Packed { pack, offset } => {
                let bytes = self.pack_bytes(*pack).map_err(|e| StoreError::Reference {
                    id,
                    source: Box::new(e),
                })?;
                let start = *offset as usize;
                let member = bytes.get(start..start + len).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "chunk {id} lies at bytes {start}..{} of pack {pack}, which holds {}",
                        start + len,
                        bytes.len()
                    ))
                })?;
                out.clear();
                out.extend_from_slice(member);
            }
            ChunkEncoding::ZstdDelta { bases } => {
                self.payload_into(id, record, scratch)?;
                let reference =
                    self.reference(bases, check, cache)
                        .map_err(|e| StoreError::Reference {
                            id,
                            source: Box::new(e),
                        })?;
                codec::apply_delta_into(&reference, scratch, len, out).map_err(|e| {
                    StoreError::Corrupt(format!("chunk {id} delta does not apply: {e}"))
                })?;
            }
        }
        if out.len() != len {
            return Err(StoreError::Corrupt(format!(
                "chunk {id} rebuilds to {} bytes, its record says {}",
                out.len(),
                record.len
            )));
        }
        if check == Check::Chunk && sha256(out) != record.hash {
            return Err(StoreError::Corrupt(format!(
                "chunk {id} fails its SHA-256 check (store {})",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Streams a file version's content into `sink`, chunk by chunk, and
    /// checks the full SHA-256 and size. Memory: a few chunks, their bases
    /// and a few cached bases.
    ///
    /// A file of several chunks is rebuilt by [`CONTENT_WORKERS`] threads
    /// (chunk `i` by worker `i % CONTENT_WORKERS`, each at most
    /// [`CONTENT_AHEAD`] chunks ahead), while this one hashes and writes
    /// them in order: restoring a 200 MB checkpoint (a base and a delta
    /// per chunk) took 0.98-1.24 s on one thread, decoding most of it.
    pub fn write_content(
        &self,
        version: &VersionRecord,
        sink: &mut impl std::io::Write,
    ) -> Result<()> {
        if version.kind != EntryKind::File {
            return Err(StoreError::NotAFile);
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut put = |bytes: &[u8]| {
            hasher.update(bytes);
            size += bytes.len() as u64;
            sink.write_all(bytes).map_err(StoreError::Sink)
        };
        let cache = BaseCache::default();
        if version.chunks.len() < 2 {
            let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
            for &id in &version.chunks {
                self.rebuild_for_content(id, &cache, &mut scratch, &mut bytes)?;
                put(&bytes)?;
            }
        } else {
            self.rebuild_in_parallel(&version.chunks, &cache, &mut put)?;
        }
        let hash: [u8; 32] = hasher.finalize().into();
        if size != version.size || hash != version.hash {
            return Err(StoreError::Corrupt(format!(
                "content fails its SHA-256 check: rebuilt {size} bytes hashing to {}, the version records {} bytes hashing to {}",
                hex(&hash),
                version.size,
                hex(&version.hash)
            )));
        }
        Ok(())
    }

    /// Rebuilds chunk `id` of a content whose whole hash the caller checks
    /// (hashing each chunk again would only double the work).
    fn rebuild_for_content(
        &self,
        id: u64,
        cache: &BaseCache,
        scratch: &mut Vec<u8>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let record = self.chunk_record(id)?;
        self.decode_chunk_into(id, &record, Check::Content, cache, scratch, bytes)
    }

    /// Rebuilds `chunks` on [`CONTENT_WORKERS`] threads and hands each to
    /// `put` in order (see [`Reader::write_content`]). The first failure,
    /// a worker's or `put`'s, stops the others and is returned.
    fn rebuild_in_parallel(
        &self,
        chunks: &[u64],
        cache: &BaseCache,
        put: &mut impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        use std::sync::mpsc;
        std::thread::scope(|scope| {
            let mut rebuilt = Vec::with_capacity(CONTENT_WORKERS);
            let mut returned = Vec::with_capacity(CONTENT_WORKERS);
            for worker in 0..CONTENT_WORKERS {
                let (send, receive) = mpsc::sync_channel::<Result<Vec<u8>>>(CONTENT_AHEAD);
                let (give_back, take_back) = mpsc::channel::<Vec<u8>>();
                rebuilt.push(receive);
                returned.push(give_back);
                scope.spawn(move || {
                    let mut scratch = Vec::new();
                    for &id in chunks.iter().skip(worker).step_by(CONTENT_WORKERS) {
                        let mut bytes = take_back.try_recv().unwrap_or_default();
                        let result = self
                            .rebuild_for_content(id, cache, &mut scratch, &mut bytes)
                            .map(|()| bytes);
                        let failed = result.is_err();
                        // The writer gone (it failed) or this chunk failed:
                        // nothing more to do.
                        if send.send(result).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            for (n, id) in chunks.iter().enumerate() {
                let worker = n % CONTENT_WORKERS;
                let bytes = rebuilt[worker].recv().map_err(|_| {
                    StoreError::Corrupt(format!("chunk {id} was not rebuilt: its worker stopped"))
                })??;
                put(&bytes)?;
                // A worker that has finished has no use for it.
                let _ = returned[worker].send(bytes);
            }
            Ok(())
        })
    }
}

/// Threads that rebuild a file of several chunks (see
/// [`Reader::write_content`]); the caller's thread hashes and writes.
const CONTENT_WORKERS: usize = 2;

/// Chunks a content worker may have rebuilt ahead of the writer.
const CONTENT_AHEAD: usize = 2;

/// A file version's content as a [`std::io::Read`], rebuilt one chunk at
/// a time; the whole-content SHA-256 and size are checked when the end is
/// reached, and a mismatch is an `InvalidData` error instead of the end.
pub struct ContentReader<'r> {
    reader: &'r Reader,
    chunks: &'r [u64],
    expected: (u64, [u8; 32]),
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    scratch: Vec<u8>,
    cache: BaseCache,
    hasher: Sha256,
    size: u64,
    checked: bool,
}

impl Reader {
    /// Reads a file version's content, verified (see [`ContentReader`]).
    pub fn content<'r>(&'r self, version: &'r VersionRecord) -> ContentReader<'r> {
        ContentReader {
            reader: self,
            chunks: &version.chunks,
            expected: (version.size, version.hash),
            next: 0,
            buf: Vec::new(),
            pos: 0,
            scratch: Vec::new(),
            cache: BaseCache::default(),
            hasher: Sha256::new(),
            size: 0,
            checked: false,
        }
    }
}

impl std::io::Read for ContentReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(&id) = self.chunks.get(self.next) else {
                if !self.checked {
                    let hash: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                    if (self.size, hash) != self.expected {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "content fails its SHA-256 check (store {})",
                                self.reader.path.display()
                            ),
                        ));
                    }
                    self.checked = true;
                }
                return Ok(0);
            };
            self.next += 1;
            let rebuilt =
                self.reader
                    .rebuild_for_content(id, &self.cache, &mut self.scratch, &mut self.buf);
            if let Err(e) = rebuilt {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{e:#}"),
                ));
            }
            self.hasher.update(&self.buf);
            self.size += self.buf.len() as u64;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `latest`'s entries of one root read in path order beside the versions
/// table (see [`Reader::state_at`]).
struct LatestCursor<'r> {
    range: redb::Range<'r, PathKey, u64>,
    root: &'r str,
    /// The moment looked at: a path without versions whose newest version
    /// is at or before it has lost that version.
    batch: u64,
    /// The next entry, not yet taken.
    ahead: Option<(Vec<u8>, u64)>,
}

impl<'r> LatestCursor<'r> {
    fn new(reader: &'r Reader, root: &'r str, batch: u64) -> Result<LatestCursor<'r>> {
        let lo: (&str, &[u8]) = (root, &[]);
        let mut cursor = LatestCursor {
            range: reader.latest.range(lo..)?,
            root,
            batch,
            ahead: None,
        };
        cursor.ahead = cursor.next()?;
        Ok(cursor)
    }

    fn next(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        let Some(item) = self.range.next() else {
            return Ok(None);
        };
        let (key, batch) = item?;
        let (root, path) = key.value();
        Ok((root == self.root).then(|| (path.to_vec(), batch.value())))
    }

    /// Passes over the entries of paths before `path` (all of them for
    /// `None`): none may name a version at or before the moment.
    fn pass(&mut self, path: Option<&[u8]>) -> Result<()> {
        while let Some((p, n)) = &self.ahead {
            if path.is_some_and(|path| p.as_slice() >= path) {
                break;
            }
            if *n <= self.batch {
                return Err(StoreError::Corrupt(format!(
                    "{}:{}: its newest version (batch {n}) is missing from the versions table",
                    self.root,
                    String::from_utf8_lossy(p)
                )));
            }
            self.ahead = self.next()?;
        }
        Ok(())
    }

    /// The batch of `path`'s newest version, if `latest` has it; paths
    /// are asked for in order.
    fn take(&mut self, path: &[u8]) -> Result<Option<u64>> {
        self.pass(Some(path))?;
        match &self.ahead {
            Some((p, n)) if p.as_slice() == path => {
                let n = *n;
                self.ahead = self.next()?;
                Ok(Some(n))
            }
            _ => Ok(None),
        }
    }

    /// Checks the entries left, once every path with versions is taken.
    fn finish(mut self) -> Result<()> {
        self.pass(None)
    }
}

/// A delta's reference (see [`Reader::reference`]): its one base as
/// decoded, shared with the cache, or its bases joined; either buffer goes
/// back to the cache when dropped and free, for the next decode.
pub struct Reference<'c> {
    bytes: ReferenceBytes,
    cache: &'c BaseCache,
}

enum ReferenceBytes {
    One(Arc<Vec<u8>>),
    Joined(Vec<u8>),
}

impl std::ops::Deref for Reference<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.bytes {
            ReferenceBytes::One(bytes) => bytes,
            ReferenceBytes::Joined(bytes) => bytes,
        }
    }
}

impl Drop for Reference<'_> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.bytes, ReferenceBytes::Joined(Vec::new())) {
            // Evicted from the cache meanwhile: its buffer is free now.
            ReferenceBytes::One(bytes) => self.cache.recycle(bytes),
            ReferenceBytes::Joined(bytes) => self.cache.keep_joined(bytes),
        }
    }
}

/// Which hashes a decode checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Every chunk against its own SHA-256.
    Chunk,
    /// Lengths only: the caller checks a hash over the whole content.
    Content,
}

/// Recently decoded base chunks. Neighbouring delta chunks mostly share
/// their bases, so a handful saves most repeated decoding.
///
/// It also keeps a few buffers it let go (chunks evicted when nobody else
/// held them, payloads read, joined references), for the next decodes: a
/// replay decoding a pack of 1 MiB every few files otherwise takes and
/// frees two large buffers each time, which glibc's malloc leaves
/// scattered (restore of 50,000 small files, `cargo xtask bench peers`:
/// peak RSS 71 MiB with fresh buffers); and a large buffer freed is
/// unmapped, so a fresh one costs a page fault per 4 KiB (restoring a 200
/// MB checkpoint on two threads sharing one cache, with one buffer of each
/// kind kept: 600 buffers mapped and unmapped, a third of its CPU in the
/// kernel).
pub struct BaseCache {
    entries: std::sync::Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
    /// Buffers free for reuse, at most [`SPARE_BUFFERS`] of each kind.
    spare: std::sync::Mutex<Spare>,
    capacity: usize,
}

/// Buffers of each kind a [`BaseCache`] keeps for reuse: enough for the
/// threads that share one (see [`Reader::write_content`]).
const SPARE_BUFFERS: usize = 3;

#[derive(Default)]
struct Spare {
    decoded: Vec<Vec<u8>>,
    payload: Vec<Vec<u8>>,
    joined: Vec<Vec<u8>>,
}

/// Keeps `buffer` in `pool` if there is room (else it is freed).
fn keep(pool: &mut Vec<Vec<u8>>, buffer: Vec<u8>) {
    if pool.len() < SPARE_BUFFERS && buffer.capacity() > 0 {
        pool.push(buffer);
    }
}

impl Default for BaseCache {
    fn default() -> BaseCache {
        BaseCache::holding(8)
    }
}

impl BaseCache {
    /// A cache of at most `capacity` chunks.
    fn holding(capacity: usize) -> BaseCache {
        BaseCache {
            entries: std::sync::Mutex::new(Vec::new()),
            spare: std::sync::Mutex::new(Spare::default()),
            capacity,
        }
    }

    fn get(&self, id: u64) -> Option<Arc<Vec<u8>>> {
        let entries = self.entries.lock().ok()?;
        entries
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, id: u64, bytes: Vec<u8>) -> Arc<Vec<u8>> {
        let bytes = Arc::new(bytes);
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= self.capacity {
                let (_, evicted) = entries.remove(0);
                self.recycle(evicted);
            }
            entries.push((id, bytes.clone()));
        }
        bytes
    }

    /// Takes a decoded chunk's buffer back when nobody else holds it.
    fn recycle(&self, chunk: Arc<Vec<u8>>) {
        if let (Ok(buffer), Ok(mut spare)) = (Arc::try_unwrap(chunk), self.spare.lock()) {
            keep(&mut spare.decoded, buffer);
        }
    }

    /// Buffers to decode into: `(decoded, payload)`, spare ones if any.
    fn buffers(&self) -> (Vec<u8>, Vec<u8>) {
        self.spare
            .lock()
            .map(|mut spare| {
                (
                    spare.decoded.pop().unwrap_or_default(),
                    spare.payload.pop().unwrap_or_default(),
                )
            })
            .unwrap_or_default()
    }

    /// An empty buffer to join a reference's bases in.
    fn joined_buffer(&self) -> Vec<u8> {
        let mut buffer = self
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.joined.pop())
            .unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Keeps a joined reference's buffer for the next one.
    fn keep_joined(&self, buffer: Vec<u8>) {
        if let Ok(mut spare) = self.spare.lock() {
            keep(&mut spare.joined, buffer);
        }
    }

    /// Keeps a payload buffer for the next decode.
    fn keep_payload(&self, payload: Vec<u8>) {
        if let Ok(mut spare) = self.spare.lock() {
            keep(&mut spare.payload, payload);
        }
    }
}

/// Writes one batch inside one redb write transaction.
pub struct BatchWriter {
    txn: redb::WriteTransaction,
    segments: segments::SegmentWriter,
    batch: u64,
    /// The next chunk id free, shared with whoever places chunks (see
    /// [`BatchWriter::chunk_ids`]).
    next_chunk: Arc<AtomicU64>,
    /// Rows not yet in their tables, written in key order by
    /// [`BatchWriter::flush`] (see [`Pending`]).
    pending: Pending,
}

/// A batch's rows held back to be written in key order.
///
/// Why: capture workers deliver versions and chunks in the order they
/// finish, threads interleaved. redb splits a full leaf in half, so rows
/// inserted between keys already written leave half-full pages behind,
/// while rows appended in key order fill each page before the next. The
/// first snapshot of 50,000 small files took 5,110 pages (20.9 MB) written
/// as they came, 3,883 (15.9 MB) written sorted; after ten more rounds of
/// 100 files the file was 22.8 MB, now 19.4 MB. Capture hands its changes
/// over in path order, in windows, and flushes after each, so each
/// window's rows land after the last one's. `chunk_hashes` rows (hash
/// keys) are written as they come: packed full, that table doubled in
/// pages over the ten rounds, as every new hash splits a full page, while
/// written in no order it fills to about 70% and absorbs them.
#[derive(Default)]
struct Pending {
    versions: Vec<(String, Vec<u8>, Vec<u8>)>,
    chunks: Vec<(u64, Vec<u8>)>,
}

impl BatchWriter {
    /// The id this batch will have once committed.
    pub fn batch_id(&self) -> u64 {
        self.batch
    }

    /// The first chunk id not yet used; new chunks of this batch take ids
    /// from here up.
    pub fn next_chunk_id(&self) -> u64 {
        self.next_chunk.load(Ordering::Relaxed)
    }

    /// Where new chunk ids come from: whoever places this batch's chunks
    /// (and packs) takes ids here (`fetch_add`).
    pub fn chunk_ids(&self) -> Arc<AtomicU64> {
        self.next_chunk.clone()
    }

    /// Stores a new chunk under an id of this batch's, its payload
    /// appended to the segments (`record.at` is set here).
    /// A packed chunk ([`ChunkEncoding::Packed`]) has no payload of its own:
    /// `payload` must be empty, and nothing is appended.
    pub fn put_chunk(&mut self, id: u64, record: &ChunkRecord, payload: &[u8]) -> Result<()> {
        let record = placed(&mut self.segments, id, record, payload)?;
        self.pending.chunks.push((id, record.encode()));
        let mut index = self.txn.open_table(CHUNK_HASHES)?;
        let key = schema::hash_key(&record.hash);
        // Taken: by another content with the same first 8 bytes (this
        // batch's chunks are new), which keeps it.
        if index.get(key)?.is_none() {
            index.insert(key, id)?;
        }
        Ok(())
    }

    /// Stores a pack (see the schema's Packs) under an id of this batch's,
    /// its payload appended to the segments. A pack is not content of its
    /// own: it is not in `chunk_hashes` (a chunk whose bytes happen to be a
    /// pack's stays the one found by its hash).
    pub fn put_pack(&mut self, id: u64, record: &ChunkRecord, payload: &[u8]) -> Result<()> {
        let record = pack_appended(&mut self.segments, id, record, payload)?;
        self.pending.chunks.push((id, record.encode()));
        Ok(())
    }

    /// Writes the versions and chunks put so far to their tables, in key
    /// order (see [`Pending`]). Capture calls it after each window of
    /// changes; commit calls it last.
    pub fn flush(&mut self) -> Result<()> {
        let mut versions = std::mem::take(&mut self.pending.versions);
        versions.sort_by(|a, b| (a.0.as_str(), a.1.as_slice()).cmp(&(&b.0, &b.1)));
        {
            let mut table = self.txn.open_table(VERSIONS)?;
            for (root, path, record) in &versions {
                table.insert(
                    (root.as_str(), path.as_slice(), self.batch),
                    record.as_slice(),
                )?;
            }
        }
        {
            let mut table = self.txn.open_table(LATEST)?;
            for (root, path, _) in &versions {
                table.insert((root.as_str(), path.as_slice()), self.batch)?;
            }
        }
        let mut chunks = std::mem::take(&mut self.pending.chunks);
        chunks.sort_unstable_by_key(|(id, _)| *id);
        let mut table = self.txn.open_table(CHUNKS)?;
        for (id, record) in &chunks {
            table.insert(id, record.as_slice())?;
        }
        Ok(())
    }

    /// The id a dictionary trained for this batch takes: one no stored
    /// dictionary has, as this transaction sees them.
    pub fn next_dictionary_id(&self) -> Result<u32> {
        let last = self
            .txn
            .open_table(DICTS)?
            .last()?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        last.checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("dictionary ids are exhausted".into()))
    }

    /// Stores a dictionary trained in this batch, for its chunks and later
    /// ones. A stored dictionary is never replaced: chunks name it.
    pub fn put_dictionary(&mut self, dictionary: &codec::Dictionary) -> Result<()> {
        let mut table = self.txn.open_table(DICTS)?;
        if table.get(dictionary.id())?.is_some() {
            return Err(StoreError::Corrupt(format!(
                "dictionary {} is already stored",
                dictionary.id()
            )));
        }
        table.insert(dictionary.id(), dictionary.raw())?;
        Ok(())
    }

    /// Records a version of `root`/`path` in this batch.
    ///
    /// Written at the next [`BatchWriter::flush`]; a path takes at most one
    /// version a batch.
    pub fn put_version(&mut self, root: &str, path: &[u8], record: &VersionRecord) -> Result<()> {
        self.pending
            .versions
            .push((root.to_string(), path.to_vec(), record.encode()));
        Ok(())
    }

    /// Records that `root`/`path`'s newest version was found on disk again,
    /// as `stamp`, by a read that started at `checked_ms`.
    pub fn see(&mut self, root: &str, path: &[u8], stamp: Stamp, checked_ms: i64) -> Result<()> {
        let batch = self
            .txn
            .open_table(LATEST)?
            .get((root, path))?
            .map(|b| b.value())
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{root}:{} was compared with the store but has no version",
                    String::from_utf8_lossy(path)
                ))
            })?;
        let record = SeenRecord {
            batch,
            stamp,
            checked_ms,
        };
        self.txn
            .open_table(SEEN)?
            .insert((root, path), encode(&record).as_slice())?;
        Ok(())
    }

    /// Commits the batch durably, with no record of how its cut was taken.
    /// Nothing of it is visible before this returns.
    pub fn commit(self, record: &BatchRecord) -> Result<u64> {
        self.commit_cut(record, None)
    }

    /// Commits the batch durably with how its cut was taken (`None`: not
    /// checked). Nothing of it is visible before this returns.
    pub fn commit_cut(
        mut self,
        record: &BatchRecord,
        cut: Option<&schema::CutRecord>,
    ) -> Result<u64> {
        self.flush()?;
        self.txn
            .open_table(BATCHES)?
            .insert(self.batch, encode(record).as_slice())?;
        if let Some(cut) = cut {
            self.txn
                .open_table(CUTS)?
                .insert(self.batch, encode(cut).as_slice())?;
        }
        let BatchWriter {
            txn,
            mut segments,
            batch,
            ..
        } = self;
        commit_with_segments(txn, &mut segments)?;
        Ok(batch)
    }

    /// Commits what was seen (see [`BatchWriter::see`]) when nothing
    /// changed: no batch is recorded, the history stays as it was.
    pub fn commit_seen_only(mut self) -> Result<()> {
        self.flush()?;
        let BatchWriter {
            txn, mut segments, ..
        } = self;
        commit_with_segments(txn, &mut segments)?;
        Ok(())
    }
}

/// Rewrites history in one write transaction, for retention: versions
/// dropped or moved to a later batch, chunks released or re-encoded,
/// batches dropped. Nothing is visible before [`HistoryEditor::commit`]; a
/// crash before it leaves the history exactly as it was.
pub struct HistoryEditor {
    txn: redb::WriteTransaction,
    segments: segments::SegmentWriter,
    /// Reads what segments held when this edit began, to move it.
    reader: segments::SegmentReader,
    store: PathBuf,
    /// Segments nothing refers to once this edit commits, deleted then.
    unused: Vec<u32>,
    /// The next id [`HistoryEditor::new_chunk_id`] gives, once it gave one.
    next_chunk: Option<u64>,
}

impl HistoryEditor {
    pub fn remove_version(&mut self, root: &str, path: &[u8], batch: u64) -> Result<()> {
        self.txn.open_table(VERSIONS)?.remove((root, path, batch))?;
        self.move_seen(root, path, batch, None)
    }

    /// Moves a version to another batch id, record unchanged.
    pub fn move_version(&mut self, root: &str, path: &[u8], from: u64, to: u64) -> Result<()> {
        let mut table = self.txn.open_table(VERSIONS)?;
        let record = table
            .remove((root, path, from))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{root}:{} has no version at batch {from}",
                    String::from_utf8_lossy(path)
                ))
            })?;
        table.insert((root, path, to), record.as_slice())?;
        drop(table);
        self.move_seen(root, path, from, Some(to))
    }

    /// Keeps a path's `seen` row with the version it names: moved to batch
    /// `to`, or dropped with the version.
    fn move_seen(&mut self, root: &str, path: &[u8], from: u64, to: Option<u64>) -> Result<()> {
        let mut seen = self.txn.open_table(SEEN)?;
        let Some(mut record) = seen
            .get((root, path))?
            .map(|v| decode::<SeenRecord>(v.value(), "seen record"))
            .transpose()?
        else {
            return Ok(());
        };
        if record.batch != from {
            return Ok(());
        }
        match to {
            Some(to) => {
                record.batch = to;
                seen.insert((root, path), encode(&record).as_slice())?
            }
            None => seen.remove((root, path))?,
        };
        Ok(())
    }

    /// Points a path's newest version at `batch`, or forgets the path.
    pub fn set_latest(&mut self, root: &str, path: &[u8], batch: Option<u64>) -> Result<()> {
        let mut table = self.txn.open_table(LATEST)?;
        match batch {
            Some(batch) => table.insert((root, path), batch)?,
            None => table.remove((root, path))?,
        };
        Ok(())
    }

    /// Replaces a chunk's encoding and payload; its id and content stay.
    /// The new payload is appended to the segments; the old one, in a
    /// segment, is left for [`HistoryEditor::collect_garbage`]. A packed
    /// chunk has no payload: `payload` must be empty.
    pub fn replace_chunk(&mut self, id: u64, record: &ChunkRecord, payload: &[u8]) -> Result<()> {
        self.remove_payload(id)?;
        let record = placed(&mut self.segments, id, record, payload)?;
        self.txn
            .open_table(CHUNKS)?
            .insert(id, record.encode().as_slice())?;
        Ok(())
    }

    /// A chunk id no chunk has, for a pack this edit writes.
    pub fn new_chunk_id(&mut self) -> Result<u64> {
        let last = match self.next_chunk {
            Some(next) => next,
            None => self
                .txn
                .open_table(CHUNKS)?
                .last()?
                .map_or(1, |(k, _)| k.value() + 1),
        };
        self.next_chunk = Some(last + 1);
        Ok(last)
    }

    /// Stores a new pack (see the schema's Packs), its payload appended to
    /// the segments; not in `chunk_hashes`, as a batch's.
    pub fn put_pack(&mut self, id: u64, record: &ChunkRecord, payload: &[u8]) -> Result<()> {
        let record = pack_appended(&mut self.segments, id, record, payload)?;
        self.txn
            .open_table(CHUNKS)?
            .insert(id, record.encode().as_slice())?;
        Ok(())
    }

    /// Deletes a chunk, its payload (in the `payload` table; in a segment
    /// its bytes are dead from then on) and its index entry.
    pub fn remove_chunk(&mut self, id: u64, hash: &[u8; 32]) -> Result<()> {
        self.remove_payload(id)?;
        self.txn.open_table(CHUNKS)?.remove(id)?;
        let mut index = self.txn.open_table(CHUNK_HASHES)?;
        let key = schema::hash_key(hash);
        // Only if the index points at this chunk (not at another content
        // with the same first 8 bytes).
        if index.get(key)?.map(|v| v.value()) == Some(id) {
            index.remove(key)?;
        }
        Ok(())
    }

    fn remove_payload(&mut self, id: u64) -> Result<()> {
        self.txn
            .open_table(PAYLOAD)?
            .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
        Ok(())
    }

    /// Replaces a batch's record.
    pub fn put_batch(&mut self, id: u64, record: &BatchRecord) -> Result<()> {
        self.txn
            .open_table(BATCHES)?
            .insert(id, encode(record).as_slice())?;
        Ok(())
    }

    pub fn remove_batch(&mut self, id: u64) -> Result<()> {
        self.txn.open_table(BATCHES)?.remove(id)?;
        self.txn.open_table(GAPS)?.remove(id)?;
        self.txn.open_table(CUTS)?.remove(id)?;
        Ok(())
    }

    /// Records that batches after `batch` were dropped, the first of them
    /// committed at `time_ms`.
    pub fn set_gap(&mut self, batch: u64, time_ms: i64) -> Result<()> {
        self.txn.open_table(GAPS)?.insert(batch, time_ms)?;
        Ok(())
    }

    /// Rewrites the segments whose dead bytes (payload of deleted or
    /// re-encoded chunks) pass 1/[`segments::DEAD_SHARE_DIVISOR`] of them:
    /// their live chunks are appended anew and the files deleted after the
    /// commit, with any segment no chunk refers to. Returns the bytes the
    /// segments shrink by.
    pub fn collect_garbage(&mut self) -> Result<u64> {
        use std::collections::HashMap;
        let mut live: HashMap<u32, u64> = HashMap::new();
        // Every chunk in a segment, by id, for the moves below.
        let mut placed: Vec<(u64, u32)> = Vec::new();
        {
            let chunks = self.txn.open_table(CHUNKS)?;
            for item in chunks.iter()? {
                let (k, v) = item?;
                let record = chunk_record_of(k.value(), v.value())?;
                if let Some(at) = record.at {
                    *live.entry(at.segment).or_default() += u64::from(record.stored_len);
                    placed.push((k.value(), at.segment));
                }
            }
        }
        let files = segments::list(&segments::dir_of(&self.store))?;
        let mut rewrite = Vec::new();
        let mut freed = 0u64;
        for (segment, path) in &files {
            let len = std::fs::symlink_metadata(path)
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?
                .len();
            let alive = live.get(segment).copied().unwrap_or(0);
            let dead = len.saturating_sub(alive);
            if alive == 0 {
                self.unused.push(*segment);
                freed += len;
            } else if dead * segments::DEAD_SHARE_DIVISOR > len {
                rewrite.push(*segment);
                self.unused.push(*segment);
                freed += dead;
            }
        }
        // The segment appended to is deleted only once appends have moved
        // on; the live chunks moved go to a segment of their own, after
        // the others.
        let current = self.segments.current();
        if !rewrite.is_empty() || current.is_some_and(|c| self.unused.contains(&c)) {
            self.segments.roll()?;
        }
        if rewrite.is_empty() {
            return Ok(freed);
        }
        let mut payload = Vec::new();
        let mut chunks = self.txn.open_table(CHUNKS)?;
        for (id, _) in placed.iter().filter(|(_, s)| rewrite.contains(s)) {
            let record = match chunks.get(*id)? {
                Some(raw) => chunk_record_of(*id, raw.value())?,
                None => continue,
            };
            let Some(at) = record.at else { continue };
            read_segment(&self.reader, *id, at, record.stored_len, &mut payload)?;
            let moved = appended(&mut self.segments, &record, &payload)?;
            chunks.insert(*id, moved.encode().as_slice())?;
        }
        Ok(freed)
    }

    /// Commits every change at once, durably, then deletes the segments
    /// nothing refers to any more.
    pub fn commit(self) -> Result<()> {
        let HistoryEditor {
            txn,
            mut segments,
            store,
            unused,
            ..
        } = self;
        // Only what no record refers to now goes, and never the segment
        // appends continue in: one found unused may have been appended to
        // since (an orphan of a crashed compaction, reused by a roll).
        let mut unused = unused;
        if !unused.is_empty() {
            let mut referenced = std::collections::HashSet::new();
            for item in txn.open_table(CHUNKS)?.iter()? {
                let (k, v) = item?;
                if let Some(at) = chunk_record_of(k.value(), v.value())?.at {
                    referenced.insert(at.segment);
                }
            }
            let current = segments.current();
            unused.retain(|s| !referenced.contains(s) && Some(*s) != current);
        }
        commit_with_segments(txn, &mut segments)?;
        segments::remove(&store, &unused)?;
        Ok(())
    }
}

/// SHA-256 of a byte slice.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch record for a batch of chunks alone.
    fn empty_batch() -> BatchRecord {
        BatchRecord {
            time_ms: 1,
            started_ms: 1,
            roots: Vec::new(),
            files_changed: 0,
            logical_bytes: 0,
            stored_bytes: 0,
        }
    }

    #[test]
    fn a_state_whose_latest_and_versions_tables_disagree_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        let store = Store::create_or_open(&path).expect("create");
        let mut writer = store.begin_batch().expect("batch");
        let version = VersionRecord {
            kind: EntryKind::Dir,
            mode: 0o755,
            ..VersionRecord::tombstone()
        };
        for name in ["a", "b", "c"] {
            writer
                .put_version("data", name.as_bytes(), &version)
                .expect("version");
        }
        let batch = writer.commit(&empty_batch()).expect("commit");
        drop(store);
        let state = |moment: u64| {
            let store = Store::open_read_only(&path)
                .expect("open")
                .expect("a store");
            let reader = store.reader().expect("reader");
            reader.state_at("data", moment).map(|entries| {
                entries
                    .into_iter()
                    .map(|e| (String::from_utf8_lossy(&e.path).into_owned(), e.batch))
                    .collect::<Vec<_>>()
            })
        };
        let names = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(n, b)| (n.to_string(), *b)).collect()
        };
        assert_eq!(
            state(batch).expect("state"),
            names(&[("a", batch), ("b", batch), ("c", batch)])
        );
        // Before the batch, each path is to be removed.
        assert_eq!(
            state(0).expect("state"),
            names(&[("a", 0), ("b", 0), ("c", 0)])
        );
        let edit = |f: &dyn Fn(&redb::WriteTransaction)| {
            let db = Database::open(&path).expect("open");
            let txn = db.begin_write().expect("write");
            f(&txn);
            txn.commit().expect("commit");
        };
        // A path with versions but no latest entry.
        edit(&|txn| {
            let mut latest = txn.open_table(LATEST).expect("latest");
            latest.remove(("data", b"b".as_slice())).expect("remove");
        });
        let err = format!("{}", state(batch).expect_err("refused"));
        assert!(
            err.contains("data:b has versions but no entry in the latest table"),
            "{err}"
        );
        edit(&|txn| {
            let mut latest = txn.open_table(LATEST).expect("latest");
            latest
                .insert(("data", b"b".as_slice()), batch)
                .expect("insert");
        });
        // Paths whose newest version is gone, first and last in path order.
        for name in ["a", "c"] {
            edit(&|txn| {
                let mut versions = txn.open_table(VERSIONS).expect("versions");
                versions
                    .remove(("data", name.as_bytes(), batch))
                    .expect("remove");
            });
            let err = format!("{}", state(batch).expect_err("refused"));
            assert!(
                err.contains(&format!(
                    "data:{name}: its newest version (batch {batch}) is missing"
                )),
                "{err}"
            );
            // The moment before that version still reads.
            assert!(state(0).is_ok());
            edit(&|txn| {
                let mut versions = txn.open_table(VERSIONS).expect("versions");
                versions
                    .insert(
                        ("data", name.as_bytes(), batch),
                        version.encode().as_slice(),
                    )
                    .expect("insert");
            });
        }
        assert_eq!(
            state(batch).expect("state"),
            names(&[("a", batch), ("b", batch), ("c", batch)])
        );
    }

    #[test]
    fn a_store_of_another_schema_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        drop(Store::create_or_open(&path).expect("create"));
        let set = |schema: u32, min_reader: u32| {
            let db = Database::open(&path).expect("open");
            let txn = db.begin_write().expect("write");
            {
                let mut meta = txn.open_table(META).expect("meta");
                meta.insert(META_SCHEMA_VERSION, schema.to_le_bytes().as_slice())
                    .expect("insert");
                meta.insert(META_MIN_READER_VERSION, min_reader.to_le_bytes().as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        };
        // Needs a newer reader: refused for reading and writing.
        set(99, 99);
        for result in [
            Store::create_or_open(&path).err(),
            Store::open_read_only(&path).err(),
        ] {
            let err = result.expect("must be refused");
            let msg = format!("{err:#}");
            assert!(
                msg.contains("schema version 99") && msg.contains("s.dkstore"),
                "{msg}"
            );
            assert!(
                matches!(err, StoreError::UnknownSchema { found: 99, .. }),
                "{msg}"
            );
        }
        // Newer, but readable by this schema: read, never written.
        set(SCHEMA_VERSION + 1, SCHEMA_VERSION);
        assert!(Store::open_read_only(&path).is_ok());
        let err = Store::create_or_open(&path).err().expect("not written");
        assert!(matches!(err, StoreError::NewerSchema { .. }), "{err:#}");
    }

    /// Schema 2 and older wrote lz4 bases into the `payload` table; no
    /// fixture holds one (their files are random or tiny), so one is
    /// written here as those builds did and read back.
    #[test]
    fn an_lz4_base_in_the_payload_table_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        let store = Store::create_or_open(&path).expect("create");
        let content: Vec<u8> = b"an old lz4 base, ".repeat(2000);
        let payload = lz4_flex::block::compress(&content);
        let record = ChunkRecord {
            hash: sha256(&content),
            len: content.len() as u32,
            encoding: ChunkEncoding::Lz4,
            stored_len: payload.len() as u32,
            at: None,
        };
        let writer = store.begin_batch().expect("batch");
        {
            let mut chunks = writer.txn.open_table(CHUNKS).expect("chunks");
            chunks.insert(1, record.encode().as_slice()).expect("chunk");
            let mut pieces = writer.txn.open_table(PAYLOAD).expect("payload");
            for (i, piece) in payload.chunks(schema::PIECE_BYTES).enumerate() {
                pieces.insert((1, i as u32), piece).expect("piece");
            }
        }
        writer.commit(&empty_batch()).expect("commit");
        let reader = store.reader().expect("reader");
        assert_eq!(reader.chunk_bytes(1).expect("rebuilt"), content);
    }

    /// A file of many chunks is rebuilt on worker threads and written in
    /// order; a chunk that cannot be rebuilt, wherever it is, fails the
    /// whole content by name and stops the workers (no hang), and a
    /// content that rebuilds to other bytes fails its hash.
    #[test]
    fn a_content_of_many_chunks_is_rebuilt_in_order_or_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        let store = Store::create_or_open(&path).expect("create");
        let pieces: Vec<Vec<u8>> = (0..9u32)
            .map(|i| format!("chunk {i} ").repeat(3000 + i as usize).into_bytes())
            .collect();
        let mut writer = store.begin_batch().expect("batch");
        let encoder = codec::BaseEncoder::new(None);
        let mut ids = Vec::new();
        for (n, piece) in pieces.iter().enumerate() {
            let (encoding, payload) = encoder.encode(piece).expect("encode");
            let record = ChunkRecord {
                hash: sha256(piece),
                len: piece.len() as u32,
                encoding,
                stored_len: payload.len() as u32,
                at: None,
            };
            let id = 10 + n as u64;
            writer.put_chunk(id, &record, &payload).expect("put");
            ids.push(id);
        }
        writer.commit(&empty_batch()).expect("commit");
        let whole: Vec<u8> = pieces.concat();
        let version = |chunks: Vec<u64>, hash: [u8; 32]| VersionRecord {
            kind: EntryKind::File,
            size: whole.len() as u64,
            hash,
            chunks,
            ..VersionRecord::tombstone()
        };
        let reader = store.reader().expect("reader");
        let mut out = Vec::new();
        reader
            .write_content(&version(ids.clone(), sha256(&whole)), &mut out)
            .expect("rebuilt");
        assert_eq!(out, whole);
        for missing_at in [0usize, 1, 4, 8] {
            let mut chunks = ids.clone();
            chunks[missing_at] = 999;
            let err = reader
                .write_content(&version(chunks, sha256(&whole)), &mut Vec::new())
                .expect_err("a chunk is missing");
            assert!(err.to_string().contains("chunk 999 is missing"), "{err}");
        }
        let mut swapped = ids.clone();
        swapped.swap(2, 3);
        let err = reader
            .write_content(&version(swapped, sha256(&whole)), &mut Vec::new())
            .expect_err("other bytes");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        // A sink that fails stops it too.
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no space left"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let err = reader
            .write_content(&version(ids, sha256(&whole)), &mut Full)
            .expect_err("the sink fails");
        assert!(matches!(err, StoreError::Sink(_)), "{err}");
    }

    /// Members of a pack read back through it; a member pointing past its
    /// pack's end, or at a chunk that is not a base of its own, is refused
    /// by name.
    #[test]
    fn packed_chunks_read_back_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        let store = Store::create_or_open(&path).expect("create");
        let contents: Vec<Vec<u8>> = (0..5u8)
            .map(|i| {
                format!("small file {i}, ")
                    .repeat(50 + usize::from(i))
                    .into_bytes()
            })
            .collect();
        let mut writer = store.begin_batch().expect("batch");
        let ids = writer.chunk_ids();
        let mut builder = pack::PackBuilder::default();
        for content in &contents {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            builder.push(id, sha256(content), content);
        }
        let sealed = builder
            .seal(&codec::BaseEncoder::new(None), || {
                ids.fetch_add(1, Ordering::Relaxed)
            })
            .expect("sealed");
        let (pack, pack_record, pack_payload) = sealed.pack.expect("a pack");
        let member = |offset: u32, pack: u64| ChunkRecord {
            hash: sha256(b"x"),
            len: 10,
            encoding: ChunkEncoding::Packed { pack, offset },
            stored_len: 0,
            at: None,
        };
        writer
            .put_pack(pack, &pack_record, &pack_payload)
            .expect("put");
        for (id, record, payload) in &sealed.chunks {
            writer.put_chunk(*id, record, payload).expect("put");
        }
        let total = pack_record.len;
        writer
            .put_chunk(100, &member(total - 5, pack), &[])
            .expect("put");
        writer
            .put_chunk(101, &member(0, sealed.chunks[0].0), &[])
            .expect("put");
        assert!(writer.put_chunk(102, &member(0, pack), b"payload").is_err());
        writer.commit(&empty_batch()).expect("commit");
        let reader = store.reader().expect("reader");
        for ((id, _, _), content) in sealed.chunks.iter().zip(&contents) {
            assert_eq!(&reader.chunk_bytes(*id).expect("rebuilt"), content);
        }
        let chain = |e: StoreError| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                text += &format!(": {inner}");
                source = inner.source();
            }
            text
        };
        let past = chain(reader.chunk_bytes(100).expect_err("past the end"));
        assert!(
            past.contains("chunk 100") && past.contains(&format!("pack {pack}")),
            "{past}"
        );
        let nested = chain(reader.chunk_bytes(101).expect_err("a member as a pack"));
        assert!(
            nested.contains("chunk 101") && nested.contains("not a base of its own"),
            "{nested}"
        );
    }

    /// Two contents whose hashes share their first 8 bytes (crafted here;
    /// 2^-64 by chance): the first keeps the index entry, the second is
    /// stored but not found by content, and removing the second leaves the first's entry.
    #[test]
    fn contents_whose_hashes_share_a_prefix_stay_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.dkstore");
        let store = Store::create_or_open(&path).expect("create");
        let raw = |hash: [u8; 32], bytes: &[u8]| ChunkRecord {
            hash,
            len: bytes.len() as u32,
            encoding: ChunkEncoding::Raw,
            stored_len: bytes.len() as u32,
            at: None,
        };
        let first = sha256(b"first");
        let mut second = first;
        second[8..].copy_from_slice(&sha256(b"second")[8..]);
        let mut writer = store.begin_batch().expect("batch");
        writer
            .put_chunk(1, &raw(first, b"first"), b"first")
            .expect("put");
        writer
            .put_chunk(2, &raw(second, b"other"), b"other")
            .expect("put");
        writer.commit(&empty_batch()).expect("commit");
        let reader = store.reader().expect("reader");
        assert_eq!(reader.find_chunk(&first).expect("find"), Some(1));
        assert_eq!(reader.find_chunk(&second).expect("find"), None);
        assert_eq!(reader.chunk_record(2).expect("stored").hash, second);
        drop(reader);
        let mut editor = store.edit_history().expect("edit");
        editor.remove_chunk(2, &second).expect("remove");
        editor.commit().expect("commit");
        let reader = store.reader().expect("reader");
        assert_eq!(reader.find_chunk(&first).expect("find"), Some(1));
        let mut entries = Vec::new();
        reader
            .for_each_index_entry::<StoreError>(|key, id| {
                entries.push((key, id));
                Ok(())
            })
            .expect("index");
        assert_eq!(entries, vec![(schema::hash_key(&first), 1)]);
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "just some text, not a database\n".repeat(100)).expect("write");
        let err = Store::open_read_only(&path).err().expect("refused");
        assert!(format!("{err:#}").contains("notes.txt"), "{err:#}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            "just some text, not a database\n".repeat(100).into_bytes(),
            "the file must be left as it was"
        );
    }
}
