//! The on-disk format of a DiffKeeper store, in one place.
//!
//! A store is one [redb] file. Every table and record below is versioned by
//! [`SCHEMA_VERSION`]; a store whose `meta.schema_version` differs is refused
//! (see [`super::StoreError::UnknownSchema`]). Records are encoded with
//! [postcard] (varint integers, length-prefixed bytes), whose wire format is
//! frozen at 1.0.
//!
//! # Tables
//!
//! | table | key | value | what it holds |
//! |---|---|---|---|
//! | `meta` | `&str` | `&[u8]` | `schema_version` (u32 LE), `created_ms` (i64 LE), optionally `retention` ([`RetentionRecord`]) |
//! | `batches` | `u64` batch id | [`BatchRecord`] | one row per committed capture batch, ids from 1 up |
//! | `versions` | `(&str root, &[u8] path, u64 batch)` | [`VersionRecord`] | every version of every path |
//! | `latest` | `(&str root, &[u8] path)` | `u64` batch | the batch of each path's newest version (tombstones included) |
//! | `chunks` | `u64` chunk id | [`ChunkRecord`] | how to rebuild one chunk of content |
//! | `chunk_index` | `[u8; 32]` SHA-256 | `u64` chunk id | content-addressed de-duplication |
//! | `payload` | `(u64 chunk id, u32 piece)` | `&[u8]` | a chunk's stored bytes, in pieces of at most [`PIECE_BYTES`] |
//! | `gaps` | `u64` batch id | `i64` ms | after compaction: a kept batch followed by dropped ones, and when the first dropped one committed |
//! | `settled` | `(&str root, &[u8] path)` | `(u64 batch, i64 ms)` | a path's version of that batch, read again by a capture that started at that time and found unchanged |
//! | `cuts` | `u64` batch id | [`CutRecord`] | how the batch's cut was taken: quiet, frozen (and for how long) or torn (and why) |
//!
//! Paths are relative to their root, `/`-separated raw bytes (Linux names
//! need not be UTF-8), never empty, never with `.`/`..` components; this is
//! checked again on replay, so a hostile store cannot steer writes out of the
//! state directory.
//!
//! # Content: chunks, bases and deltas
//!
//! A file version's content is a list of chunk ids. Files up to
//! [`CHUNK_MAX`] bytes with no content-defined cut inside are one chunk;
//! larger files are cut with FastCDC (min [`CHUNK_MIN`], average
//! [`CHUNK_AVG`], max [`CHUNK_MAX`]), so an edit inside a large file changes
//! only the chunks around it and memory for capture and rebuild is bounded by
//! a few chunks whatever the file's size. A chunk whose SHA-256 is already in
//! `chunk_index` is stored once, across files and versions.
//!
//! A new chunk is stored either as a **base** (raw, or [lz4_flex]-compressed
//! when that saves at least 1/16) or as a **delta** against the old content
//! at its place: a zstd frame (no magic, no checksum) compressed with the
//! concatenation of the previous version's chunks that overlap the new
//! chunk's position as its reference prefix (`ZSTD_CCtx_refPrefix`, what
//! `zstd --patch-from` does for whole files). Positions follow the shift of
//! the last chunk that matched unchanged, so an insertion does not misalign
//! the rest of the file. The reference chunks are always bases: an old chunk
//! that is itself a delta is stood in for by its own bases, and a delta has
//! at most [`MAX_DELTA_BASES`] of them. Rebuilding any chunk therefore
//! decodes at most that many bases and one delta, whatever the history:
//! this is how chains stay bounded in length and cost. A delta is kept when
//! it is at most 1/16 of the chunk, or at most half the size of the chunk's
//! own base encoding; otherwise the chunk becomes a new base, which later
//! versions delta against.
//!
//! Why zstd for deltas: measured on the benchmark pair (a 48 MiB SQLite
//! file before and after updating 1% of its rows; ~280 changed chunks, same
//! references for both), zstd's ref-prefix mode at level 3 gave 111 KB of
//! deltas in 0.05 s of CPU (level 6: 95 KB in 0.16 s); bidiff per chunk gave
//! 50 MB of patch that compressed to 335 KB with lz4 or 128 KB with zstd,
//! and took 1.4 s. A delta that comes out larger than 1/64 of its chunk is
//! encoded again with long-distance matching, which finds the reference's
//! copy of record-structured data where the regular match finder prefers
//! nearby self-matches (a 16-byte edit in a 512 KiB chunk: 18 KB without,
//! 0.6 KB with); doing that for every chunk doubled the time for nothing on
//! the SQLite pair. lz4_flex stays for bases: replay decodes them at
//! several GB/s, which keeps restart time close to a plain copy.
//!
//! # Pieces
//!
//! redb stores a value that does not fit a 4 KiB leaf in a power-of-two
//! sized allocation, so a 70 KiB value would occupy 128 KiB on disk. Chunk
//! payloads are therefore split into pieces of at most [`PIECE_BYTES`], just
//! under 16 KiB so a full piece fills a 16 KiB leaf. Measured on 364 MB of
//! payload: 4.6% over on disk with 16 KiB pieces, 7.3% with 4 KiB pieces
//! (and four times the reads), 11% with 64 KiB pieces. `stats` reports the
//! file's size on disk beside the payload bytes so the overhead stays
//! visible.
//!
//! # Moments and compaction
//!
//! The state of a root "at batch N" is, for every path, its newest version
//! with a batch id at most N (a path whose first version is later is absent
//! then). Batch ids grow from 1 and are never reused.
//!
//! Compaction (`crate::retention`) drops batches a retention policy does
//! not keep, in one write transaction. A version survives when it is the
//! state of its path at some kept batch; it is then moved to the oldest kept
//! batch at which it is that state, so every kept moment reads back as it
//! was. Chunks no surviving version uses are deleted with their payload and
//! index entries, except the bases of surviving deltas: a surviving delta
//! whose bases no other surviving delta needs is re-encoded as a base
//! ("rebased", the oldest kept version becomes the base), and bases that
//! several surviving deltas share are kept (one copy instead of one per
//! delta). Either way no chunk refers to a deleted one. A kept batch that
//! takes versions from older batches takes the oldest of their
//! `started_ms` too, so a version read too close to its mtime to be
//! trusted stays untrusted.
//! The `gaps` table remembers, for a kept batch followed by dropped ones,
//! when the first dropped one committed: a time before it still reads as the
//! kept batch, a time after it (and before the next kept batch) is refused.
//! `gaps` appeared without a schema bump: a store without the table was
//! never compacted.
//!
//! # Settled versions
//!
//! A file whose mtime was too close to its batch's scan start to trust
//! (`scan::RACY_WINDOW_NS`) is read again by later captures until one that
//! started clearly after that mtime finds it unchanged. That capture does
//! not add a version or a batch (the file's history and the timeline stay
//! as they were); it records in `settled` which version it checked and
//! when its scan started, and size and mtime count from then on. An entry
//! whose batch is not the path's newest version any more is ignored.
//! Compaction moves or drops an entry with the version it names. `settled`
//! appeared without a schema bump: a store without the table has nothing
//! settled, and older builds, which ignore it, record a settled file as a
//! metadata-only version in a batch of its own.
//!
//! # Cuts
//!
//! A batch is meant to be a crash-consistent cut: the tree as it was at one
//! instant. `cuts` says, per batch, whether it is one and how that is known
//! ([`CutKind`]): `quiet` (nothing under the trees was written while the batch
//! was read, as the tracer or inotify saw it), `frozen` (the app's cgroups were
//! frozen while the changes were found and read; the pause and the bytes read
//! then are kept) or `torn` (written while read, with the reason). A batch with
//! no row was taken without a check (`snapshot`, or a build older than the
//! table). Compaction drops a dropped batch's row; a kept batch keeps its own,
//! since the state at a kept moment is that batch's cut. `cuts` appeared
//! without a schema bump: older builds ignore it.
//!
//! # Batches and atomicity
//!
//! A batch is written in one redb write transaction: its `batches` row, the
//! versions, the `latest` updates and the new chunks commit together or not
//! at all, so a reader sees a batch whole or not at all and a crash loses at
//! most the batch in flight.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// The schema this build reads and writes. Bump on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
pub const VERSIONS: TableDefinition<(&str, &[u8], u64), &[u8]> = TableDefinition::new("versions");
pub const LATEST: TableDefinition<(&str, &[u8]), u64> = TableDefinition::new("latest");
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
pub const CHUNK_INDEX: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_index");
pub const PAYLOAD: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("payload");
pub const GAPS: TableDefinition<u64, i64> = TableDefinition::new("gaps");
pub const SETTLED: TableDefinition<(&str, &[u8]), (u64, i64)> = TableDefinition::new("settled");
pub const CUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("cuts");

pub const META_SCHEMA_VERSION: &str = "schema_version";
pub const META_CREATED_MS: &str = "created_ms";
pub const META_RETENTION: &str = "retention";

/// Smallest content-defined chunk.
pub const CHUNK_MIN: usize = 64 * 1024;
/// Target average content-defined chunk.
pub const CHUNK_AVG: usize = 128 * 1024;
/// Largest chunk; also the largest file kept as a single chunk.
pub const CHUNK_MAX: usize = 512 * 1024;
/// Most base chunks one delta may reference.
pub const MAX_DELTA_BASES: usize = 4;
/// Largest piece of a chunk payload stored as one redb value.
pub const PIECE_BYTES: usize = 16_320;

/// A committed capture batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchRecord {
    /// Commit time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// When the scan for this batch started. A file whose mtime is not
    /// clearly older than this may have changed again within the same
    /// timestamp tick after it was read, so its size and mtime alone do not
    /// prove it unchanged (see `scan::RACY_WINDOW_NS`).
    pub started_ms: i64,
    /// Roots this batch recorded changes for.
    pub roots: Vec<String>,
    /// Paths that got a new version (tombstones included).
    pub files_changed: u64,
    /// Logical bytes of the file versions recorded.
    pub logical_bytes: u64,
    /// Payload bytes this batch added to the store.
    pub stored_bytes: u64,
}

/// How a batch's cut was taken (the `cuts` table).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum CutKind {
    /// Nothing wrote under the trees while the batch was read.
    Quiet,
    /// The writers were frozen while the batch's changes were found and read.
    Frozen,
    /// Written while read: not the tree of one instant.
    Torn,
}

impl CutKind {
    pub fn name(self) -> &'static str {
        match self {
            CutKind::Quiet => "quiet",
            CutKind::Frozen => "frozen",
            CutKind::Torn => "torn",
        }
    }
}

/// A batch's cut, as recorded in `cuts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CutRecord {
    pub kind: CutKind,
    /// How long the writers were stopped, in microseconds (0 unless a
    /// freeze was tried).
    pub pause_us: u64,
    /// Content bytes read while they were.
    pub frozen_bytes: u64,
    /// Why a torn batch is torn; empty otherwise.
    pub why: String,
}

/// The store's own retention policy (`compact --save`), applied by
/// `compact` without rules and by `run`/`watch` without `--keep-*`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetentionRecord {
    pub keep_within_ms: Option<u64>,
    pub keep_last: Option<u64>,
    pub keep_hourly: Option<u64>,
    pub keep_daily: Option<u64>,
    pub keep_weekly: Option<u64>,
}

/// What a path is in one version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// The path was deleted in this version.
    Tombstone,
}

/// One version of one path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionRecord {
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Logical size: file length, or symlink target length.
    pub size: u64,
    /// SHA-256 of the full content (file bytes, symlink target bytes; zero for
    /// dirs and tombstones).
    pub hash: [u8; 32],
    /// Content chunks in order (files only).
    pub chunks: Vec<u64>,
    /// Symlink target, raw bytes.
    pub target: Vec<u8>,
    /// Payload bytes this version added to the store (new chunks only).
    pub stored_bytes: u64,
}

impl VersionRecord {
    /// A deletion.
    pub fn tombstone() -> VersionRecord {
        VersionRecord {
            kind: EntryKind::Tombstone,
            mode: 0,
            mtime_ns: 0,
            size: 0,
            hash: [0; 32],
            chunks: Vec::new(),
            target: Vec::new(),
            stored_bytes: 0,
        }
    }
}

/// How a chunk's payload encodes its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ChunkEncoding {
    /// The bytes as they are.
    Raw,
    /// lz4_flex block format, uncompressed length in [`ChunkRecord::len`].
    Lz4,
    /// zstd frame whose reference prefix is the concatenation of `bases`
    /// (base chunks, in order: the old content around this chunk's place).
    ZstdDelta { bases: Vec<u64> },
}

/// One stored chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkRecord {
    /// SHA-256 of the chunk's bytes.
    pub hash: [u8; 32],
    /// Uncompressed length.
    pub len: u32,
    pub encoding: ChunkEncoding,
    /// Length of the payload stored in the `payload` table.
    pub stored_len: u32,
}

impl ChunkRecord {
    pub fn is_base(&self) -> bool {
        !matches!(self.encoding, ChunkEncoding::ZstdDelta { .. })
    }
}

/// Encodes a record for storage.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // postcard only fails to serialize into a Vec on types it does not
    // support (none here), so an empty value would be the only outcome.
    postcard::to_stdvec(record).unwrap_or_default()
}

/// Decodes a stored record; `what` names it in the error.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, super::StoreError> {
    postcard::from_bytes(bytes).map_err(|e| super::StoreError::Corrupt(format!("{what}: {e}")))
}
