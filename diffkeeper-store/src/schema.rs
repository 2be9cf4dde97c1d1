//! The on-disk format of a DiffKeeper store, in one place.
//!
//! A store is one [redb] file, the index, and (schema 3) a directory of
//! payload segments beside it, `FILE.payload/` (see [`crate::segments`]).
//! Records are encoded with [postcard] (varint integers, length-prefixed
//! bytes), whose wire format is frozen at 1.0.
//!
//! # Versions of the format
//!
//! `meta.schema_version` is the schema the store was last written with;
//! `meta.min_reader_version` the oldest schema whose readers understand it
//! (absent: the same as `schema_version`). A build of schema
//! [`SCHEMA_VERSION`]:
//!
//! - reads a store when `min_reader_version <= SCHEMA_VERSION` and
//!   `schema_version >= `[`OLDEST_READABLE`], and refuses anything else by
//!   name (see [`super::StoreError::UnknownSchema`]);
//! - writes only stores of its own schema or older: an older one is upgraded
//!   in place when first opened for writing (one transaction, below), a newer
//!   one it may read is not written.
//!
//! A change that older readers would misread bumps both numbers; one they can
//! safely ignore bumps only `schema_version`. Small stores written by each
//! released schema are kept in `tests/fixtures/` with the trees they restore
//! to, and every build must read them back (`tests/format.rs`).
//!
//! | schema | what changed | min reader |
//! |---|---|---|
//! | 1 | first released format (`gaps`, `settled` and `cuts` arrived within it, see below) | 1 |
//! | 2 | versions keep owner, extended attributes and the inode and ctime they were read with; the state directory itself is the path ""; `seen` replaces `settled` | 2 |
//! | 3 | bases are zstd frames ([`ChunkEncoding::Zstd`]), with a dictionary trained on the store's small files (`dicts`); payload in segment files, chunk records say where ([`ChunkRecord::at`], `meta.segment_end`); version records end with a check | 3 |
//! | 4 | a batch's new bases are compressed together, in packs ([`ChunkEncoding::Packed`], see Packs) | 4 |
//! | 5 | chunks are found by the first 8 bytes of their hash (`chunk_hashes` replaces `chunk_index`, see Finding a chunk by its content); version records begin with a tag and keep a content hash only for files of several chunks ([`VersionRecord::encode`]) | 5 |
//!
//! Upgrading a schema-1 store: `schema_version` and `min_reader_version`
//! become 2 and `settled` is dropped (its marks name no inode or ctime, so
//! under schema 2 they prove nothing). Its versions stay as written: they
//! decode with no owner, no extended attributes and no stamp, so replay
//! leaves ownership as it finds it and the first capture after the upgrade
//! reads each file once to take its stamp (see Stamps).
//!
//! Upgrading a schema-2 store: only the two numbers change. Its chunks
//! stay as written (raw, lz4 and deltas decode as before, their payload in
//! the `payload` table), and new chunks are written with zstd, their
//! payload in segments (a chunk compaction re-encodes moves there too); a store with no dictionary gets one when a batch
//! brings enough small files to train it.
//!
//! Upgrading a schema-3 store: only the two numbers change. Its chunks
//! stay as written; new small bases are packed from then on.
//!
//! Upgrading a schema-4 store: `chunk_index` is copied into `chunk_hashes`
//! (each entry under its hash's first 8 bytes) and dropped, in the
//! upgrade's transaction; a schema-4 store opened read-only is read
//! through its `chunk_index` as before. Its version records stay as
//! written (they read as before); new ones, and those compaction moves,
//! are written in schema 5's form.
//!
//! # Tables
//!
//! | table | key | value | what it holds |
//! |---|---|---|---|
//! | `meta` | `&str` | `&[u8]` | `schema_version` (u32 LE), `created_ms` (i64 LE), optionally `retention` ([`RetentionRecord`]) and `segment_end` ([`Location`]: the last segment and its length as of the last commit) |
//! | `batches` | `u64` batch id | [`BatchRecord`] | one row per committed capture batch, ids from 1 up |
//! | `versions` | `(&str root, &[u8] path, u64 batch)` | [`VersionRecord`] | every version of every path |
//! | `latest` | `(&str root, &[u8] path)` | `u64` batch | the batch of each path's newest version (tombstones included) |
//! | `chunks` | `u64` chunk id | [`ChunkRecord`] | how to rebuild one chunk of content |
//! | `chunk_hashes` | `u64`: the first 8 bytes of a chunk's SHA-256, big-endian | `u64` chunk id | content-addressed de-duplication (schema 5), see Finding a chunk by its content |
//! | `chunk_index` | `[u8; 32]` SHA-256 | `u64` chunk id | schema 4 and older: the same, keyed by the whole hash |
//! | `payload` | `(u64 chunk id, u32 piece)` | `&[u8]` | schema 2 and older: a chunk's stored bytes, in pieces of at most [`PIECE_BYTES`] (schema 3 writes payload to segments) |
//! | `gaps` | `u64` batch id | `i64` ms | after compaction: a kept batch followed by dropped ones, and when the first dropped one committed |
//! | `seen` | `(&str root, &[u8] path)` | [`SeenRecord`] | a path's version of that batch, found on disk again (another inode or ctime, same content and metadata) by a capture or replay |
//! | `settled` | `(&str root, &[u8] path)` | `(u64 batch, i64 ms)` | schema 1 only, see Settled versions |
//! | `cuts` | `u64` batch id | [`CutRecord`] | how the batch's cut was taken: quiet, frozen (and for how long) or torn (and why) |
//! | `dicts` | `u32` dictionary id, from 1 | `&[u8]` | zstd dictionaries (schema 3), trained on the store's own small files; never removed while a chunk names one |
//!
//! Paths are relative to their root, `/`-separated raw bytes (Linux names
//! need not be UTF-8), never with `.`/`..` components; this is checked again
//! on replay, so a hostile store cannot steer writes out of the state
//! directory. The empty path is the state directory itself (schema 2): a
//! directory version holding its owner, mode and extended attributes, which
//! replay sets and never removes.
//!
//! # Content: chunks, bases and deltas
//!
//! A file version's content is a list of chunk ids. Files up to
//! [`CHUNK_MAX`] bytes with no content-defined cut inside are one chunk;
//! larger files are cut with FastCDC (min [`CHUNK_MIN`], average
//! [`CHUNK_AVG`], max [`CHUNK_MAX`]), so an edit inside a large file changes
//! only the chunks around it and memory for capture and rebuild is bounded by
//! a few chunks whatever the file's size. A chunk whose SHA-256 is already
//! stored is stored once, across files and versions.
//!
//! A new chunk is stored either as a **base** (schema 4: in a pack with
//! the batch's other new bases, a zstd frame at level 9, see Packs; a lone
//! one, and schema 3, a zstd frame of its own at level 9 up to 64 KiB, level
//! 3 above (see `codec::SMALL_BASE_BYTES`), raw when that does not save at
//! least 1/8 (1/16 before 2026-12; either reads the same, see
//! `codec::RAW_UNLESS_SAVED`); schema 2 and older wrote [lz4_flex] blocks, which still
//! decode) or as a **delta** against the old
//! content at its place: a zstd frame (no magic, no checksum) compressed with the
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
//! Why zstd for bases (schema 3): lz4 has no entropy coding, so text-like
//! files (source, JSON, logs) were stored at about their own size. Measured
//! per file on 50,000 log-like text files of 100 B to 8 KiB (207 MB) and on
//! Debian's Python packages (41 MB): lz4 1.68x and 2.03x, zstd level 1 2.68x
//! and 2.69x, level 3 2.66x and 2.83x, level 6 2.80x and 2.99x in 2.5 times
//! level 3's time. Small files compress poorly alone (a frame has nothing
//! earlier to refer to), so the first batch with at least
//! [`DICTIONARY_MIN_FILES`] small files trains a zstd dictionary on up to
//! [`DICTIONARY_SAMPLE_BYTES`] of them, spread over the batch, and every
//! later base uses it: 3.07x and 2.92x, for 0.15 s of training and 110 KiB
//! stored once (samples of 1, 2 and 4 MiB gave the same ratio within 0.1%).
//! Bases of up to 64 KiB are encoded at level 9 (3.36x on the small files,
//! 3.13x on Python's packages, for about four times level 3's CPU); the
//! level is the writer's choice, frames of any level decode alike.
//! A store keeps the dictionary it trained first; chunks name theirs, so
//! one trained again later (none is, today) would not disturb older ones.
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
//! the SQLite pair.
//!
//! A chunk edited in place (its old version found whole in the reference,
//! at most 1/4 of its bytes changed) is first encoded by comparing it with
//! that old version position by position: equal runs are copies at the one
//! offset that aligns them, the rest literals, and zstd only entropy-codes
//! those sequences. The frame is an ordinary delta frame (same decoder,
//! same format, no schema change); making it costs a pass over the chunk
//! instead of indexing the reference. A dense result (a checkpoint's
//! perturbed floats: 50 MB with 2% changed, 1.08 MB in 38 ms against zstd
//! level 3's 1.08 MB in 114 ms) is kept as it is; a sparse one is set
//! against the level-6 match finder's and the smaller kept; content that
//! moved within the chunk (long literal runs) is left to the match finder.
//! bidiff measured again (2026-12-04, the SQLite pair): its control, diff
//! and extra streams compressed apart with zstd gave 110 KB per chunk at
//! level 9 (1.9 s), 77 KB for the whole file at once (4.7 s); bsdiff's
//! bzip2 gets 60 KB from the same kind of streams in 14.6 s.
//!
//! # Finding a chunk by its content (schema 5)
//!
//! `chunk_hashes` maps the first 8 bytes of a chunk's SHA-256 to its id;
//! a lookup then reads the chunk's record and compares the whole hash, so
//! a shared prefix never makes two contents one. When a new chunk's prefix
//! is already taken by another content (2^-64 by chance; an app that
//! searches ~2^32 hashes to make one only stops its own copies from being
//! shared), the entry stays with the older chunk and the new one is
//! stored unindexed: its later copies are stored again, nothing is lost.
//! Packs are never indexed (see Packs).
//!
//! Why not the whole hash: on 50,000 small files (about one chunk each)
//! `chunk_index` held 2.04 MB of rows, 40 bytes each (a 32-byte key and
//! the id), 13% of the index file; keyed by 8 bytes a row is 16 bytes.
//! The lookup that hits reads one chunk record more, which costs nothing
//! next to reading the file it came from.
//!
//! # Pieces (schema 2 and older)
//!
//! Before payload segments, chunk payloads were redb values. redb stores a
//! value that does not fit a 4 KiB leaf in a power-of-two sized
//! allocation, so a 70 KiB value would occupy 128 KiB on disk; payloads
//! were therefore split into pieces of at most [`PIECE_BYTES`], just under
//! 16 KiB so a full piece fills a 16 KiB leaf (364 MB of payload: 4.6% over
//! on disk with 16 KiB pieces, 7.3% with 4 KiB pieces, 11% with 64 KiB
//! pieces). Small payloads were the loss: 50,000 files of 100 B to 8 KiB
//! left 23.6 MB of fragments in 68 MB, and the file grew by doubling
//! (162 MiB long, 108 MiB allocated, for 64.6 MiB of payload), which is why
//! schema 3 keeps payload in segments. `stats` reports the file and the
//! segments beside the payload bytes so the overhead stays visible.
//!
//! # Packs (schema 4)
//!
//! Small files compress poorly one by one, even with the dictionary: a
//! frame can only refer back to its own bytes. A batch's new bases (any
//! chunk, `pack::MEMBER_MAX_BYTES`) are therefore held back as they come
//! (capture takes a window's files by name, so alike files meet) and
//! compressed together, up to [`PACK_BYTES`] of them, as one zstd frame at
//! the small-base level with the dictionary.
//! The frame is a chunk of its own, the **pack** (an ordinary base record:
//! its hash is the SHA-256 of the members' bytes back to back, its payload
//! lies in a segment); each member is a chunk record with encoding
//! [`ChunkEncoding::Packed`], naming the pack and where in it the member's
//! bytes start, and no payload of its own (`stored_len` 0, `at` none). No
//! version names a pack; a member is rebuilt by decoding its pack (readers
//! keep the last few packs decoded, and replay writes files in pack order)
//! and cutting its bytes out, checked against the member's own SHA-256. A
//! pack is only ever a base, never a delta or a member of another pack. A
//! pack of one is not written: that chunk becomes an ordinary base.
//!
//! Members are bases like any other: a later version's delta may name one
//! as its reference. Compaction keeps a pack while any member survives,
//! whether used by a version or kept as a delta's base, and releases it
//! with its last member. A pack whose surviving members are less than half
//! of it is written again with them alone (same member ids, new pack,
//! the old one released), so released members' bytes stay behind in at
//! most half of a kept pack.
//!
//! Measured (zstd at level 9 with the store's dictionary, files in path
//! order) on Debian's Python packages, its 2,815 files of up to 64 KiB
//! (27.0 MB): one frame per file 8.39 MB, packs of 64 KiB 7.91 MB, 256 KiB
//! 7.54 MB, 1 MiB 7.29 MB. A first snapshot of the whole tree (3,538
//! files, 52 MB) took 16.99 MB on disk without packs, 16.08 MB with packs
//! of 512 KiB, 15.87 MB with 1 MiB, and was no slower (1.2-1.3 s). A
//! pack is at most 1 MiB so that decoding one for a single member stays
//! about a millisecond.
//!
//! # Payload segments (schema 3)
//!
//! A chunk's payload lies at [`ChunkRecord::at`] in a segment file. A batch
//! appends its new chunks' payloads, makes them durable, and commits
//! `meta.segment_end` with its records; see [`crate::segments`] for how an
//! uncommitted tail is cut off and how compaction rewrites segments whose
//! payload is mostly dead.
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
//! # Stamps: what proves a file unchanged
//!
//! A capture does not read a file whose size, mtime, mode and owner match its
//! newest version only when the file's inode number and ctime also match a
//! stamp ([`Stamp`]) taken when that version's content was read, by a read
//! that started clearly after that ctime (`scan::RACY_WINDOW_NS`). The app
//! can set mtime to anything (`touch -r`, `tar -x`, `rsync -t`, `cp -p`) but
//! not ctime, which the kernel sets on every change, metadata included; a
//! file replaced by `mv` from elsewhere is another inode. This is git's index
//! rule. Stamps come from the version itself (the capture that stored it,
//! at its batch's `started_ms`) or from `seen`: a later capture that read the
//! file again, found content and metadata unchanged, and recorded the stamp
//! it read with and when its read started. A `seen` row whose batch is not
//! the path's newest version any more is ignored; compaction moves or drops
//! it with the version it names. Replay trusts a live file the same way and
//! rewrites one it cannot prove current.
//!
//! # Settled versions (schema 1)
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

/// The schema this build writes (see Versions of the format).
pub const SCHEMA_VERSION: u32 = 5;
/// The oldest schema this build reads.
pub const OLDEST_READABLE: u32 = 1;
/// The oldest schema whose readers understand what this build writes.
pub const MIN_READER_VERSION: u32 = 5;

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
pub const VERSIONS: TableDefinition<(&str, &[u8], u64), &[u8]> = TableDefinition::new("versions");
pub const LATEST: TableDefinition<(&str, &[u8]), u64> = TableDefinition::new("latest");
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
pub const CHUNK_HASHES: TableDefinition<u64, u64> = TableDefinition::new("chunk_hashes");
/// Schema 4 and older (see [`CHUNK_HASHES`]).
pub const CHUNK_INDEX: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_index");
pub const PAYLOAD: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("payload");
pub const GAPS: TableDefinition<u64, i64> = TableDefinition::new("gaps");
pub const SETTLED: TableDefinition<(&str, &[u8]), (u64, i64)> = TableDefinition::new("settled");
pub const SEEN: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("seen");
pub const CUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("cuts");
pub const DICTS: TableDefinition<u32, &[u8]> = TableDefinition::new("dicts");

pub const META_SCHEMA_VERSION: &str = "schema_version";
pub const META_MIN_READER_VERSION: &str = "min_reader_version";
pub const META_CREATED_MS: &str = "created_ms";
pub const META_RETENTION: &str = "retention";
pub const META_SEGMENT_END: &str = "segment_end";

/// Smallest content-defined chunk.
pub const CHUNK_MIN: usize = 64 * 1024;
/// Target average content-defined chunk. Tried on 2026-12-06 and not
/// taken: an average of 256 KiB (smallest 128 KiB) made the delta bench's
/// SQLite pair 92,017 B instead of 93,850 (fewer frames, fewer entropy
/// tables), but the checkpoint peers workload's capture 65.1 MiB of RSS
/// instead of 45.6 and its store 516.6 MiB instead of 493.6; cut points
/// moved down to 4 KiB page boundaries gave the pair 94,096 B.
pub const CHUNK_AVG: usize = 128 * 1024;
/// Largest chunk; also the largest file kept as a single chunk.
pub const CHUNK_MAX: usize = 512 * 1024;
/// Most base chunks one delta may reference.
pub const MAX_DELTA_BASES: usize = 4;
/// A batch trains the store's dictionary when it has at least this many
/// files of up to [`DICTIONARY_FILE_MAX`] bytes (fewer make a dictionary
/// that zstd refuses or that does not pay for its own size).
pub const DICTIONARY_MIN_FILES: usize = 200;
/// Largest file sampled for the dictionary.
pub const DICTIONARY_FILE_MAX: u64 = 16 * 1024;
/// Bytes of small files read to train it.
pub const DICTIONARY_SAMPLE_BYTES: u64 = 1 << 20;
/// Most bytes of small bases compressed together as one pack (see Packs).
pub const PACK_BYTES: usize = 1024 * 1024;
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

/// A file's owner, numeric (as `tar --numeric-owner` and restic keep it:
/// the names inside a container image are not the host's).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One extended attribute (`user.*`, `security.capability`, POSIX ACLs as
/// `system.posix_acl_*`, ...), raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// What a file was read with: the inode and its ctime, which the app cannot
/// set (see Stamps).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub ctime_ns: i64,
}

/// A version found on disk again (the `seen` table).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenRecord {
    /// The batch of the version it was found to be.
    pub batch: u64,
    pub stamp: Stamp,
    /// When the read that found it started, milliseconds since the epoch.
    pub checked_ms: i64,
}

/// One version of one path.
///
/// Schema 5 encodes it as [`VERSION_TAG`], the fields but the hash, the
/// hash only for a file of two chunks or more, then [`RECORD_CHECK_BYTES`]
/// of the SHA-256 of what precedes (see [`VersionRecord::encode`]). Older
/// records, which begin with the kind (0 to 3), are the schema-1 fields
/// (the hash among them), then the fields schema 2 added, then (schema 3)
/// the check; one that ends after the first part is a schema-1 record (no
/// owner, no extended attributes, no stamp), one that ends after the
/// second a schema-2 record (no check).
///
/// Why the hash is left out: every other version's hash is known without
/// it. A file of one chunk hashes to that chunk's hash, an empty file to
/// the hash of nothing, a symlink to its target's, and a directory or a
/// tombstone has none (zeros). On 50,000 small files (almost all of one
/// chunk) the 32 bytes were a quarter of the `versions` table (6.7 MB).
/// Reading such a version reads its chunk's record for the hash.
///
/// Why the check: redb does not checksum values, and a version's mode,
/// mtime, owner and extended attributes are restored as recorded, so a
/// flipped bit there would be restored silently (content is covered by its
/// SHA-256). Once payload moved out of the file into segments, every byte of
/// the file is such metadata; damage tests hit a version record's mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Logical size: file length, or symlink target length.
    pub size: u64,
    /// SHA-256 of the full content (file bytes, symlink target bytes; zero for
    /// dirs and tombstones). Writers keep to this: schema 5 stores it only
    /// where it cannot be told from the rest (see above).
    pub hash: [u8; 32],
    /// Content chunks in order (files only).
    pub chunks: Vec<u64>,
    /// Symlink target, raw bytes.
    pub target: Vec<u8>,
    /// Payload bytes this version added to the store (new chunks only; a
    /// chunk in a pack counts none, the pack counts in its batch's
    /// `stored_bytes`).
    pub stored_bytes: u64,
    /// Numeric owner (schema 2; `None` in schema-1 records and tombstones).
    pub owner: Option<Owner>,
    /// Extended attributes, sorted by name (schema 2; files and dirs).
    pub xattrs: Vec<Xattr>,
    /// The inode and ctime the content was read with (schema 2; files).
    pub stamp: Option<Stamp>,
}

/// The fields of a schema-1 version record, in order.
type VersionCore = (EntryKind, u32, i64, u64, [u8; 32], Vec<u64>, Vec<u8>, u64);
/// The fields schema 2 appended.
type VersionExt = (Option<Owner>, Vec<Xattr>, Option<Stamp>);
/// The fields a schema-5 record begins with, after its tag: the schema-1
/// fields but the hash.
type VersionCore5 = (EntryKind, u32, i64, u64, Vec<u64>, Vec<u8>, u64);

/// The first byte of a schema-5 version record; older records begin with
/// their kind, 0 to 3.
pub const VERSION_TAG: u8 = 5;

/// The SHA-256 of nothing: an empty file's hash.
const EMPTY_HASH: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

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
            owner: None,
            xattrs: Vec::new(),
            stamp: None,
        }
    }

    /// Whether the record stores its hash (schema 5): only a file of two
    /// chunks or more does; every other hash is told from the rest.
    fn stores_hash(kind: EntryKind, chunks: &[u64]) -> bool {
        kind == EntryKind::File && chunks.len() >= 2
    }

    /// Encodes the record for the `versions` table (schema 5).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION_TAG];
        out.extend(encode(&(
            &self.kind,
            self.mode,
            self.mtime_ns,
            self.size,
            &self.chunks,
            &self.target,
            self.stored_bytes,
        )));
        if Self::stores_hash(self.kind, &self.chunks) {
            out.extend_from_slice(&self.hash);
        }
        out.extend(encode(&(&self.owner, &self.xattrs, &self.stamp)));
        let check = record_check(&out);
        out.extend_from_slice(&check);
        out
    }

    /// Decodes a record of any schema; `what` names it in the error.
    /// `chunk_hash` gives the hash of a chunk, for a schema-5 record of a
    /// one-chunk file (which does not store its own).
    pub fn decode(
        bytes: &[u8],
        what: &str,
        chunk_hash: impl FnOnce(u64) -> Result<[u8; 32], super::StoreError>,
    ) -> Result<VersionRecord, super::StoreError> {
        let corrupt = |e: postcard::Error| super::StoreError::Corrupt(format!("{what}: {e}"));
        let Some(body) = bytes.strip_prefix(&[VERSION_TAG]) else {
            return Self::decode_before_5(bytes, what);
        };
        let (core, rest): (VersionCore5, &[u8]) =
            postcard::take_from_bytes(body).map_err(corrupt)?;
        let (kind, mode, mtime_ns, size, chunks, target, stored_bytes) = core;
        let (stored_hash, rest) = if Self::stores_hash(kind, &chunks) {
            let (hash, rest): ([u8; 32], &[u8]) =
                postcard::take_from_bytes(rest).map_err(corrupt)?;
            (Some(hash), rest)
        } else {
            (None, rest)
        };
        let (ext, rest): (VersionExt, &[u8]) = postcard::take_from_bytes(rest).map_err(corrupt)?;
        if rest.len() != RECORD_CHECK_BYTES {
            return Err(super::StoreError::Corrupt(format!(
                "{what}: {} bytes after the record where its {RECORD_CHECK_BYTES}-byte check belongs",
                rest.len()
            )));
        }
        if record_check(&bytes[..bytes.len() - RECORD_CHECK_BYTES]) != rest {
            return Err(super::StoreError::Corrupt(format!(
                "{what}: the record fails its check (damaged)"
            )));
        }
        let hash = match (stored_hash, kind, chunks.as_slice()) {
            (Some(hash), _, _) => hash,
            (None, EntryKind::File, []) => EMPTY_HASH,
            (None, EntryKind::File, [chunk]) => chunk_hash(*chunk)?,
            (None, EntryKind::Symlink, _) => super::sha256(&target),
            (None, _, _) => [0; 32],
        };
        // Schema 1's fields, in its order.
        #[rustfmt::skip]
        let core = (kind, mode, mtime_ns, size, hash, chunks, target, stored_bytes);
        Ok(Self::of_fields(core, ext))
    }

    /// Decodes a record of schema 4 or older.
    fn decode_before_5(bytes: &[u8], what: &str) -> Result<VersionRecord, super::StoreError> {
        let corrupt = |e: postcard::Error| super::StoreError::Corrupt(format!("{what}: {e}"));
        let (core, rest): (VersionCore, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(corrupt)?;
        let (owner, xattrs, stamp): VersionExt = if rest.is_empty() {
            (None, Vec::new(), None)
        } else {
            let (ext, rest): (VersionExt, &[u8]) =
                postcard::take_from_bytes(rest).map_err(corrupt)?;
            match rest.len() {
                0 => {}
                RECORD_CHECK_BYTES => {
                    let body = &bytes[..bytes.len() - RECORD_CHECK_BYTES];
                    if record_check(body) != rest {
                        return Err(super::StoreError::Corrupt(format!(
                            "{what}: the record fails its check (damaged)"
                        )));
                    }
                }
                extra => {
                    return Err(super::StoreError::Corrupt(format!(
                        "{what}: {extra} bytes after the record"
                    )))
                }
            }
            ext
        };
        Ok(Self::of_fields(core, (owner, xattrs, stamp)))
    }

    /// The record of the fields decoded, in schema 1's order and the ones
    /// schema 2 added.
    fn of_fields(core: VersionCore, ext: VersionExt) -> VersionRecord {
        let (kind, mode, mtime_ns, size, hash, chunks, target, stored_bytes) = core;
        let (owner, xattrs, stamp) = ext;
        VersionRecord {
            kind,
            mode,
            mtime_ns,
            size,
            hash,
            chunks,
            target,
            stored_bytes,
            owner,
            xattrs,
            stamp,
        }
    }
}

/// Bytes of SHA-256 that end a version record (schema 3).
pub const RECORD_CHECK_BYTES: usize = 8;

/// The check that ends a version record: the first bytes of the SHA-256
/// of the record before it.
fn record_check(body: &[u8]) -> [u8; RECORD_CHECK_BYTES] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let mut check = [0; RECORD_CHECK_BYTES];
    check.copy_from_slice(&digest[..RECORD_CHECK_BYTES]);
    check
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
    /// zstd frame of the chunk alone (schema 3), compressed with
    /// dictionary `dict` of the `dicts` table, or none when 0.
    Zstd { dict: u32 },
    /// The chunk's bytes lie in chunk `pack` (a base holding several small
    /// chunks back to back, see Packs), from `offset` on (schema 4). The
    /// chunk has no payload of its own.
    Packed { pack: u64, offset: u32 },
}

/// Where a chunk's payload lies in the payload segments (schema 3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
}

/// One stored chunk.
///
/// Encoded as the schema-2 fields, then where its payload lies (schema
/// 3); a record that ends after the first part keeps its payload in the
/// `payload` table. See [`ChunkRecord::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    /// SHA-256 of the chunk's bytes.
    pub hash: [u8; 32],
    /// Uncompressed length.
    pub len: u32,
    pub encoding: ChunkEncoding,
    /// Length of the stored payload.
    pub stored_len: u32,
    /// Where the payload lies in the segments; `None`: in the `payload`
    /// table (written by schema 2 and older).
    pub at: Option<Location>,
}

/// The fields of a schema-2 chunk record, in order.
type ChunkCore = ([u8; 32], u32, ChunkEncoding, u32);

impl ChunkRecord {
    pub fn is_base(&self) -> bool {
        !matches!(self.encoding, ChunkEncoding::ZstdDelta { .. })
    }

    /// The chunks this one is rebuilt from: a delta's bases, a packed
    /// chunk's pack; none for a chunk with its own base payload.
    pub fn refers_to(&self) -> &[u64] {
        match &self.encoding {
            ChunkEncoding::ZstdDelta { bases } => bases,
            ChunkEncoding::Packed { pack, .. } => std::slice::from_ref(pack),
            ChunkEncoding::Raw | ChunkEncoding::Lz4 | ChunkEncoding::Zstd { .. } => &[],
        }
    }

    /// Whether this chunk can hold packed ones: a base with a payload of
    /// its own.
    pub fn can_be_pack(&self) -> bool {
        matches!(
            self.encoding,
            ChunkEncoding::Raw | ChunkEncoding::Zstd { .. }
        )
    }

    /// The pack this chunk lies in, if it is packed.
    pub fn pack(&self) -> Option<u64> {
        match self.encoding {
            ChunkEncoding::Packed { pack, .. } => Some(pack),
            _ => None,
        }
    }

    /// Encodes the record for the `chunks` table.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode(&(&self.hash, self.len, &self.encoding, self.stored_len));
        if let Some(at) = &self.at {
            out.extend(encode(at));
        }
        out
    }

    /// Decodes a record of any schema; `what` names it in the error.
    pub fn decode(bytes: &[u8], what: &str) -> Result<ChunkRecord, super::StoreError> {
        let corrupt = |e: postcard::Error| super::StoreError::Corrupt(format!("{what}: {e}"));
        let ((hash, len, encoding, stored_len), rest): (ChunkCore, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(corrupt)?;
        let at = if rest.is_empty() {
            None
        } else {
            let (at, rest): (Location, &[u8]) = postcard::take_from_bytes(rest).map_err(corrupt)?;
            if !rest.is_empty() {
                return Err(super::StoreError::Corrupt(format!(
                    "{what}: {} bytes after the record",
                    rest.len()
                )));
            }
            Some(at)
        };
        Ok(ChunkRecord {
            hash,
            len,
            encoding,
            stored_len,
            at,
        })
    }
}

/// The key of a chunk in `chunk_hashes`: the first 8 bytes of its
/// SHA-256, big-endian (so `chunk_index`'s order is the same).
pub fn hash_key(hash: &[u8; 32]) -> u64 {
    let mut first = [0; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VersionRecord {
        VersionRecord {
            kind: EntryKind::File,
            mode: 0o640,
            mtime_ns: 1_700_000_000_123_456_789,
            size: 5,
            hash: [7; 32],
            chunks: vec![1, 300],
            target: Vec::new(),
            stored_bytes: 5,
            owner: Some(Owner { uid: 999, gid: 70 }),
            xattrs: vec![Xattr {
                name: b"user.k".to_vec(),
                value: vec![0, 1, 2],
            }],
            stamp: Some(Stamp {
                ino: 12345,
                ctime_ns: 1_700_000_001_000_000_000,
            }),
        }
    }

    /// Decodes with no chunk records at hand.
    fn decoded(bytes: &[u8]) -> Result<VersionRecord, crate::StoreError> {
        VersionRecord::decode(bytes, "v", |id| {
            Err(crate::StoreError::Corrupt(format!("no chunk {id} here")))
        })
    }

    /// What schema 4 and older wrote: the schema-1 fields, those of
    /// schema 2, and the check.
    fn encoded_before_5(record: &VersionRecord) -> Vec<u8> {
        let mut out = encode(&(
            record.kind,
            record.mode,
            record.mtime_ns,
            record.size,
            record.hash,
            &record.chunks,
            &record.target,
            record.stored_bytes,
        ));
        out.extend(encode(&(&record.owner, &record.xattrs, &record.stamp)));
        let check = record_check(&out);
        out.extend_from_slice(&check);
        out
    }

    #[test]
    fn a_version_record_reads_back_as_written() {
        let record = sample();
        assert_eq!(decoded(&record.encode()).ok(), Some(record));
    }

    /// A one-chunk file's record leaves its hash out (32 bytes shorter)
    /// and reads it from the chunk; an empty file, a symlink, a directory
    /// and a tombstone need no chunk to read theirs.
    #[test]
    fn a_hash_told_by_the_rest_is_not_stored() {
        let two = sample();
        let one = VersionRecord {
            chunks: vec![300],
            hash: [9; 32],
            ..two.clone()
        };
        // 32 bytes of hash out, the tag in.
        assert_eq!(one.encode().len() + 31, encoded_before_5(&one).len());
        let read = VersionRecord::decode(&one.encode(), "v", |id| {
            assert_eq!(id, 300);
            Ok([9; 32])
        });
        assert_eq!(read.ok(), Some(one));
        let empty = VersionRecord {
            chunks: Vec::new(),
            size: 0,
            hash: crate::sha256(b""),
            ..two.clone()
        };
        let link = VersionRecord {
            kind: EntryKind::Symlink,
            chunks: Vec::new(),
            target: b"../elsewhere".to_vec(),
            hash: crate::sha256(b"../elsewhere"),
            ..two.clone()
        };
        let dir = VersionRecord {
            kind: EntryKind::Dir,
            chunks: Vec::new(),
            hash: [0; 32],
            ..two.clone()
        };
        for record in [empty, link, dir, VersionRecord::tombstone()] {
            assert_eq!(decoded(&record.encode()).ok(), Some(record));
        }
    }

    #[test]
    fn a_schema_4_version_record_reads_as_written() {
        let record = sample();
        assert_eq!(decoded(&encoded_before_5(&record)).ok(), Some(record));
    }

    #[test]
    fn a_schema_1_version_record_reads_with_no_owner_xattrs_or_stamp() {
        let new = sample();
        // What schema 1 wrote: the eight first fields as a struct.
        let old = encode(&(
            new.kind,
            new.mode,
            new.mtime_ns,
            new.size,
            new.hash,
            &new.chunks,
            &new.target,
            new.stored_bytes,
        ));
        let read = decoded(&old).expect("decodes");
        assert_eq!(
            read,
            VersionRecord {
                owner: None,
                xattrs: Vec::new(),
                stamp: None,
                ..new
            }
        );
    }

    #[test]
    fn a_schema_2_version_record_reads_without_a_check() {
        let new = sample();
        let mut old = encoded_before_5(&new);
        old.truncate(old.len() - RECORD_CHECK_BYTES);
        assert_eq!(decoded(&old).ok(), Some(new));
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_version_record_is_caught() {
        let one = VersionRecord {
            chunks: vec![300],
            ..sample()
        };
        for bytes in [sample().encode(), one.encode(), encoded_before_5(&sample())] {
            for at in 0..bytes.len() {
                for bit in 0..8 {
                    let mut damaged = bytes.clone();
                    damaged[at] ^= 1 << bit;
                    let read = VersionRecord::decode(&damaged, "v", |_| Ok([7; 32]));
                    assert!(
                        read.is_err(),
                        "bit {bit} of byte {at} flipped went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_after_a_version_record_are_damage() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(decoded(&bytes).is_err());
        let short = &sample().encode()[..20];
        assert!(decoded(short).is_err());
    }
}
