//! Chunk encodings: how one chunk's bytes become stored payload and back.
//!
//! Bases are zstd frames, with the store's dictionary when it has one (raw
//! when that saves less than 1/8; lz4_flex blocks in stores of schema 2 and
//! older); deltas are zstd frames compressed with the reference chunks as
//! prefix. The choices and their measurements are in [`crate::schema`].

use crate::schema::ChunkEncoding;

/// Why a chunk could not be encoded or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// zstd failed at `step`.
    #[error("zstd {step}")]
    Zstd {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A chunk names a dictionary the store does not have.
    #[error("no dictionary {0} in the store")]
    NoDictionary(u32),
    /// The delta decoded to the wrong length: damaged, or against the
    /// wrong reference.
    #[error("delta rebuilds {got} bytes, expected {expected}")]
    WrongLength { got: usize, expected: usize },
}

type Result<T> = std::result::Result<T, CodecError>;

/// Names a zstd failure by the step that failed.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|source| CodecError::Zstd { step, source })
    }
}

/// zstd level for deltas. Measured on a 48 MiB SQLite file with 1% of rows
/// updated: levels 1-2 lose the reference (tens of MiB), 3 gives 111 KB in
/// 0.05 s of CPU, 6 gives 88 KB in 0.18 s.
const DELTA_LEVEL: i32 = 3;

/// zstd level a sparse delta (at most 1/[`RETRY_WITH_LDM_DIVISOR`] of its
/// chunk at [`DELTA_LEVEL`]) is encoded at again, the smaller kept. On the
/// delta bench's pair (a 50 MB SQLite file, 1% of rows updated; 386 of
/// its 128 KiB blocks changed, each delta a few hundred bytes): level 3
/// 114 KB in 0.07 s of CPU, retried at 5 103 KB, at 6 96.6 KB in 0.39 s,
/// at 9 99 KB, at 12 98 KB in 2.1 s, at 19 92.6 KB in 2.8 s. A dense
/// delta (a checkpoint's perturbed floats) is not retried: it would cost
/// five times the encoding for a few percent. bidiff (bsdiff's method)
/// with its patch compressed at level 3 gave 137 KB there in 2.2 s, and
/// was smaller than zstd on none of the blocks, at any level. With the
/// contexts kept per thread (see `DELTA_ENCODERS`), the bench's whole
/// snapshot: 93.9 KB in 0.27 s at 6, 93.4 KB in 0.31 s at 7, 96.2 KB in
/// 0.84 s at 13, 90.2 KB in 1.09 s at 16 (xdelta3 -9: 92.8 KB in 0.79 s).
const SPARSE_DELTA_LEVEL: i32 = 6;

/// A delta bigger than this share of its chunk (1/64) is tried again with
/// long-distance matching.
const RETRY_WITH_LDM_DIVISOR: usize = 64;

/// A base is stored raw unless zstd saves at least 1/this of it. Raw, a
/// base rebuilds at the speed of a copy, and so does every delta's
/// reference: on a 200 MB float32 checkpoint (zstd level 3 saves 9.7%),
/// 2% of values perturbed a round, 6 rounds, raising this from 1/16 to 1/8
/// took the restore of the latest state from 0.47 to 0.24 s and rounds
/// from 0.68-1.14 s to 0.45-1.07 s, for a store 7.7% larger (288 to 310
/// MB). Text and databases save far more than 1/8 and are unaffected.
const RAW_UNLESS_SAVED: usize = 8;

/// zstd level for bases larger than [`SMALL_BASE_BYTES`]. Measured on
/// 50,000 log-like text files of 100 B to 8 KiB (207 MB) and on Debian's
/// Python packages (2,907 files, 41 MB), each file one frame: level 1 gave
/// 2.68x and 2.69x, level 3 2.66x and 2.83x, level 6 2.80x and 2.99x at 2.5
/// times level 3's time; lz4 1.68x and 2.03x. With a dictionary trained on
/// 1 MiB of the small files, level 3 gave 3.07x and 2.92x in 1.2 s and
/// 0.2 s of CPU. Large chunks stay at level 3: whether a changed chunk is
/// kept as a delta is decided against its base encoding, so every changed
/// chunk of a checkpoint is encoded at this level each round.
const BASE_LEVEL: i32 = 3;

/// zstd level for bases of at most [`SMALL_BASE_BYTES`] (whole small files,
/// mostly). With the dictionary, on the 50,000 files above: level 3 3.07x
/// in 1.2 s of CPU, 6 3.12x in 4.3 s, 9 3.36x in 8.7 s, 12 3.49x in 15 s,
/// 19 3.66x in 49 s. On Python's packages (3,538 files, 52 MB) level 3 gave
/// 2.88x in 0.32 s, and level 9 for files up to 64 KiB (3 above) 3.13x in
/// 0.99 s; up to 16 KiB only, 3.02x.
const SMALL_BASE_LEVEL: i32 = 9;

/// Largest base encoded at [`SMALL_BASE_LEVEL`].
pub const SMALL_BASE_BYTES: usize = 64 * 1024;

/// The level for a base of `len` bytes, and which of [`BaseEncoder`]'s
/// pools serves it.
fn base_tier(len: usize) -> usize {
    usize::from(len > SMALL_BASE_BYTES)
}

/// Packs (a batch's new bases compressed together) are encoded at the
/// small bases' level, with the match finder's tables bounded (see
/// [`PACK_TABLE_LOG`]): tier 2.
const TIER_LEVELS: [i32; 3] = [SMALL_BASE_LEVEL, BASE_LEVEL, SMALL_BASE_LEVEL];

/// The pack tier.
const PACK_TIER: usize = 2;

/// log2 of the entries in the match finder's hash and chain tables for
/// packs. At level 9 zstd sizes them for a 1 MiB input at 8 MiB each, and a
/// context is kept per thread (a first snapshot of Debian's Python
/// packages peaked at 52 MB of RSS so). Measured on that snapshot (52 MB):
/// 2^20 entries stored 14.27 MB in 39 MB of peak RSS, 2^19 14.26 MB in
/// 36 MB, 2^18 14.43 MB in 33 MB.
const PACK_TABLE_LOG: u32 = 19;

/// Size of a trained dictionary: zstd's default. 32 KiB gave 3.03x on the
/// small files above, 64 KiB 3.06x, 110 KiB 3.07x; it is stored once.
pub const DICTIONARY_BYTES: usize = 112_640;

/// A zstd dictionary trained on a store's own small files (the `dicts`
/// table), ready for both directions.
pub struct Dictionary {
    id: u32,
    raw: Vec<u8>,
    /// Prepared at each of [`TIER_LEVELS`] when first encoded with: a
    /// reader only decodes, and a prepared dictionary at level 9 takes
    /// memory.
    encoders: [std::sync::OnceLock<zstd::dict::EncoderDictionary<'static>>; 2],
    decoder: zstd::dict::DecoderDictionary<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dictionary({}, {} bytes)", self.id, self.raw.len())
    }
}

impl Dictionary {
    /// Prepares dictionary `id` from its stored bytes.
    pub fn new(id: u32, raw: Vec<u8>) -> Result<Dictionary> {
        let decoder = zstd::dict::DecoderDictionary::try_copy(&raw).step("dictionary load")?;
        Ok(Dictionary {
            id,
            raw,
            encoders: Default::default(),
            decoder,
        })
    }

    /// Trains dictionary `id` on `samples`; `None` when zstd finds too
    /// little in them to build one (too few or too alike), or cannot
    /// prepare it to encode with.
    pub fn train(id: u32, samples: &[Vec<u8>]) -> Option<Dictionary> {
        let raw = zstd::dict::from_samples(samples, DICTIONARY_BYTES).ok()?;
        let dictionary = Dictionary::new(id, raw).ok()?;
        for tier in 0..TIER_LEVELS.len() {
            dictionary.encoder(tier).ok()?;
        }
        Some(dictionary)
    }

    /// The dictionary prepared to encode bases of `tier`.
    fn encoder(&self, tier: usize) -> Result<&zstd::dict::EncoderDictionary<'static>> {
        // Packs are at the small bases' level: the same prepared dictionary.
        let slot = if tier == PACK_TIER { 0 } else { tier };
        if let Some(prepared) = self.encoders[slot].get() {
            return Ok(prepared);
        }
        let prepared = zstd::dict::EncoderDictionary::try_copy(&self.raw, TIER_LEVELS[slot])
            .step("dictionary load")?;
        Ok(self.encoders[slot].get_or_init(|| prepared))
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The bytes to store.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

/// Compresses base chunks, reusing zstd contexts: a fresh context costs
/// tens of microseconds to set up, which for small files was most of the
/// work (50,000 files of 100 B to 8 KiB: 8.4 s with a context per chunk).
/// Shared by the threads of one batch; each takes an idle context or makes
/// one.
pub struct BaseEncoder<'d> {
    dictionary: Option<&'d Dictionary>,
    /// Idle contexts per tier (see [`base_tier`]).
    idle: [std::sync::Mutex<Vec<zstd::zstd_safe::CCtx<'d>>>; 3],
}

impl<'d> BaseEncoder<'d> {
    /// Encodes with `dictionary` when given.
    pub fn new(dictionary: Option<&'d Dictionary>) -> BaseEncoder<'d> {
        BaseEncoder {
            dictionary,
            idle: Default::default(),
        }
    }

    /// A context with this encoder's settings (see [`small_frames`]).
    fn context(&self, tier: usize) -> Result<zstd::zstd_safe::CCtx<'d>> {
        use zstd::zstd_safe::CParameter;
        let failed = |what: &str| CodecError::Zstd {
            step: "base encoder",
            source: std::io::Error::other(what.to_string()),
        };
        let mut cctx = small_frames(TIER_LEVELS[tier], "base encoder")?;
        if let Some(d) = self.dictionary {
            cctx.ref_cdict(d.encoder(tier)?.as_cdict())
                .map_err(|code| failed(zstd::zstd_safe::get_error_name(code)))?;
        }
        if tier == PACK_TIER {
            let log = PACK_TABLE_LOG;
            for parameter in [CParameter::HashLog(log), CParameter::ChainLog(log)] {
                cctx.set_parameter(parameter)
                    .map_err(|code| failed(zstd::zstd_safe::get_error_name(code)))?;
            }
        }
        Ok(cctx)
    }

    /// Encodes a base chunk: a zstd frame when it saves at least 1/8
    /// ([`RAW_UNLESS_SAVED`]), else the bytes as they are.
    pub fn encode(&self, bytes: &[u8]) -> Result<(ChunkEncoding, Vec<u8>)> {
        self.encode_at(bytes, base_tier(bytes.len()))
    }

    /// Encodes a pack (new bases back to back, see the schema's Packs) as
    /// one base, at the small bases' level.
    pub fn encode_pack(&self, bytes: &[u8]) -> Result<(ChunkEncoding, Vec<u8>)> {
        self.encode_at(bytes, PACK_TIER)
    }

    fn encode_at(&self, bytes: &[u8], tier: usize) -> Result<(ChunkEncoding, Vec<u8>)> {
        let idle = self.idle[tier].lock().ok().and_then(|mut idle| idle.pop());
        let mut cctx = match idle {
            Some(cctx) => cctx,
            None => self.context(tier)?,
        };
        let mut compressed = Vec::with_capacity(zstd::zstd_safe::compress_bound(bytes.len()));
        let written = cctx.compress2(&mut compressed, bytes);
        if let Ok(mut idle) = self.idle[tier].lock() {
            idle.push(cctx);
        }
        written.map_err(|code| CodecError::Zstd {
            step: "base encode",
            source: std::io::Error::other(zstd::zstd_safe::get_error_name(code)),
        })?;
        Ok(
            if compressed.len() + bytes.len() / RAW_UNLESS_SAVED <= bytes.len() {
                // The payload waits in the writer's queue: hold its bytes, not
                // the worst case's room (a pack's is over 1 MiB).
                compressed.shrink_to_fit();
                (
                    ChunkEncoding::Zstd {
                        dict: self.dictionary.map_or(0, Dictionary::id),
                    },
                    compressed,
                )
            } else {
                (ChunkEncoding::Raw, bytes.to_vec())
            },
        )
    }
}

thread_local! {
    /// This thread's zstd context for applying deltas (kept, as the base
    /// decoder's and for the reason [`DELTA_ENCODERS`] gives: a streaming
    /// decoder made per delta mapped and zeroed its window each time).
    static DELTA_DECODER: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// This thread's zstd context for decoding bases (see [`BaseEncoder`]
    /// for why it is kept).
    static BASE_DECODER: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Rebuilds a zstd base chunk of `len` bytes into `out` (its contents are
/// replaced; its allocation is reused). `dictionary` is the one its
/// encoding names, or `None` for 0.
pub fn decode_base_into(
    payload: &[u8],
    len: usize,
    dictionary: Option<&Dictionary>,
    out: &mut Vec<u8>,
) -> Result<()> {
    use zstd::zstd_safe::{DCtx, DParameter, FrameFormat};
    let failed = |step: &'static str, what: &str| CodecError::Zstd {
        step,
        source: std::io::Error::other(what.to_string()),
    };
    out.clear();
    // One byte of room past `len` tells a too-long frame apart.
    out.reserve_exact(len + 1);
    BASE_DECODER.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| failed("base decoder", "in use"))?;
        if slot.is_none() {
            let mut dctx = DCtx::try_create().ok_or_else(|| failed("base decoder", "no memory"))?;
            dctx.set_parameter(DParameter::Format(FrameFormat::Magicless))
                .map_err(|code| failed("base decoder", zstd::zstd_safe::get_error_name(code)))?;
            *slot = Some(dctx);
        }
        let Some(dctx) = slot.as_mut() else {
            return Err(failed("base decoder", "no context"));
        };
        match dictionary {
            Some(d) => dctx.decompress_using_ddict(out, payload, d.decoder.as_ddict()),
            None => dctx.decompress(out, payload),
        }
        .map_err(|code| failed("base decode", zstd::zstd_safe::get_error_name(code)))
    })?;
    if out.len() != len {
        return Err(CodecError::WrongLength {
            got: out.len(),
            expected: len,
        });
    }
    Ok(())
}

/// Encodes `bytes` as a zstd frame that references `reference` as a prefix.
///
/// A chunk edited in place (see [`changed_in_place`]) is first encoded
/// aligned with its old version ([`encode_aligned`]), without a match
/// finder: kept as it is when dense, set against [`SPARSE_DELTA_LEVEL`]'s
/// when sparse. Everything else goes to zstd's match finder.
///
/// The regular match finder is tried first. On record-structured data it
/// can prefer nearby self-matches over the reference's copy (a 16-byte edit
/// in a 512 KiB chunk of fixed-size records gave 18 KB); long-distance
/// matching finds it (0.6 KB) but doubles the time, so it is the second try
/// for deltas that came out large.
///
/// A delta that came out small is a few edits in a chunk otherwise copied
/// (database pages); it is encoded again at [`SPARSE_DELTA_LEVEL`], which
/// spends the time on encoding those edits tighter. An edit in place that
/// the aligned encoding refused (content moved within it) goes to that
/// level first, and to the quick one only when it did not come out
/// sparse: on the delta bench's pair (a 50 MB SQLite file, half of its
/// changed pages with cells moved) the quick encoding was thrown away on
/// nearly every chunk, and skipping it took the snapshot from 0.42-0.52 s
/// to 0.30-0.32 s for the same 93,850 B; a SQLite round of the peers
/// bench from 0.59-0.70 s to 0.49-0.61 s.
///
/// A larger delta is retried with long-distance matching unless it is
/// already about as small as the bytes that differ in place: a chunk
/// edited where it lies (its old version found in the reference, see
/// [`changed_in_place`]) whose delta is at most [`IN_PLACE_SLACK`] times
/// the bytes changed has no reference copy left for that search to find.
/// On a 200 MB float32 checkpoint with 2% of its values perturbed a round
/// (deltas 1.5x the bytes changed) the retry found nothing in 3 rounds out
/// of 4 and 0.3% in the fourth, for 40% of each round's CPU; skipping it
/// where the edit is in place took a round from 1.8-3.1 s of CPU to
/// 1.2-2.0 s, the same bytes stored. Tried beside it and not taken: storing
/// a dense edit in place as its XOR with the old bytes at zstd level 1 (a
/// new chunk encoding) took the bench's checkpoint round from 1.80 to
/// 1.57 s but its store from 459 to 494 MiB, and restores no faster.
pub fn encode_delta(reference: &[u8], bytes: &[u8]) -> Result<Vec<u8>> {
    let in_place = changed_in_place(reference, bytes);
    let aligned = match in_place {
        Some(InPlace { start, .. }) => encode_aligned(reference, start, bytes)?,
        None => None,
    };
    let smaller = |a: Vec<u8>, b: Vec<u8>| if b.len() < a.len() { b } else { a };
    if let (Some(found), Some(aligned)) = (in_place, aligned) {
        // Past the reference's end the aligned encoding has only literals,
        // where zstd may find repeats (a database's new pages appended:
        // 7.9 KB aligned, 5.7 KB from zstd); the part in place is aligned
        // already, so no long-distance search either way.
        let best = if found.start + bytes.len() <= reference.len() {
            aligned
        } else {
            smaller(aligned, encode_delta_with(reference, bytes, QUICK)?)
        };
        // Sparse: the match finder may do better still.
        return Ok(if best.len() <= bytes.len() / RETRY_WITH_LDM_DIVISOR {
            smaller(best, encode_delta_with(reference, bytes, SPARSE)?)
        } else {
            best
        });
    }
    // An edit in place with moved content (a database page whose cells
    // were rearranged) is sparse as a rule: the encoding for sparse
    // deltas goes first, and the quick one only when that did not come
    // out sparse.
    let sparse = match in_place {
        Some(_) => {
            let sparse = encode_delta_with(reference, bytes, SPARSE)?;
            if sparse.len() <= bytes.len() / RETRY_WITH_LDM_DIVISOR {
                return Ok(sparse);
            }
            Some(sparse)
        }
        None => None,
    };
    let quick = encode_delta_with(reference, bytes, QUICK)?;
    let quick = match sparse {
        Some(sparse) => smaller(quick, sparse),
        None => quick,
    };
    let retry = if quick.len() <= bytes.len() / RETRY_WITH_LDM_DIVISOR {
        if in_place.is_some() {
            return Ok(quick);
        }
        encode_delta_with(reference, bytes, SPARSE)?
    } else if in_place.is_some_and(|InPlace { changed, .. }| {
        changed <= bytes.len() / 8 && quick.len() <= changed.saturating_mul(IN_PLACE_SLACK) + 64
    }) {
        return Ok(quick);
    } else {
        encode_delta_with(reference, bytes, LONG)?
    };
    Ok(smaller(quick, retry))
}

/// How many times the bytes changed in place a delta may be and still
/// count as about as small as them (see [`encode_delta`]).
const IN_PLACE_SLACK: usize = 4;

/// Bytes of the chunk looked up in the reference to find where its old
/// version lies.
const ANCHOR_BYTES: usize = 16;
/// How many anchors, spread over the chunk, are looked up.
const ANCHORS: usize = 8;

/// Where a chunk's old version lies in its reference, and how many of its
/// bytes differ from it (see [`changed_in_place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InPlace {
    /// Offset in the reference of the old version's first byte.
    start: usize,
    /// Bytes that differ from the old version, position by position.
    changed: usize,
}

/// How `bytes` differs from its old version in `reference`, when it is an
/// edit in place: the old version lies somewhere in the reference (its
/// start, or where one of [`ANCHORS`] anchors of the chunk is found) with
/// at most 1/4 of its bytes changed. `None` otherwise (moved in pieces,
/// grown, rewritten). The reference holds whole old chunks, so where a cut
/// point moved the old version starts inside it. (A checkpoint's deltas
/// are against its first version: after ten rounds of 2% of its floats
/// perturbed, 14% of a chunk's bytes differ.)
fn changed_in_place(reference: &[u8], bytes: &[u8]) -> Option<InPlace> {
    let changed_at = |start: usize| {
        let old = old_version(reference, start, bytes.len())?;
        // Bytes past the reference's end count as changed.
        let changed =
            old.iter().zip(bytes).filter(|(a, b)| a != b).count() + (bytes.len() - old.len());
        (changed <= bytes.len() / 4).then_some(InPlace { start, changed })
    };
    if let Some(found) = changed_at(0) {
        return Some(found);
    }
    (0..ANCHORS).find_map(|nth| {
        let at = bytes.len() / ANCHORS * nth;
        let anchor = bytes.get(at..at + ANCHOR_BYTES)?;
        let found = memchr::memmem::find(reference, anchor)?;
        changed_at(found.checked_sub(at)?)
    })
}

/// The `len` bytes of `reference` from `start` on, or as many as it has
/// (a chunk that grew over cut points that moved can outrun its bases,
/// which are at most [`crate::schema::MAX_DELTA_BASES`]); `None` when
/// `start` is past its end.
fn old_version(reference: &[u8], start: usize, len: usize) -> Option<&[u8]> {
    let end = start.saturating_add(len).min(reference.len());
    reference.get(start..end)
}

/// Shortest run of equal bytes the aligned encoding copies; shorter ones
/// are literals. zstd's smallest match is 3; 4 measured the same.
const ALIGNED_MIN_MATCH: usize = 4;

/// Literal runs longer than this are moved or new content, which the
/// aligned encoding cannot copy from elsewhere.
const ALIGNED_LONG_RUN: usize = 16;

/// A delta of `bytes` against its old version at `start` of `reference`,
/// parsed by comparing the two position by position: the runs that are
/// equal are copies of the reference at the one offset that aligns them
/// (every one after the first a zstd repeat offset, the cheapest code),
/// the bytes that differ literals. zstd only entropy-codes those
/// sequences (`ZSTD_compressSequences`), so the frame decodes as any other
/// delta, against the same reference, and no match finder indexes the
/// reference: the cost of a delta is a pass over the chunk.
///
/// `None` when more than 1/8 of the literals lie in runs longer than
/// [`ALIGNED_LONG_RUN`]: content that moved (a database page whose cells
/// were rearranged), which zstd's match finder finds where it went.
///
/// Measured on a 50 MB float32 checkpoint with 2% of its values perturbed
/// (the 279 chunks' old versions in place): 1,082,735 B in 38 ms, against
/// 1,084,513 B in 114 ms for zstd level 3 with the reference as prefix;
/// with 10% perturbed, 4.72 MB either way.
fn encode_aligned(reference: &[u8], start: usize, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    let Some(old) = old_version(reference, start, bytes.len()) else {
        return Ok(None);
    };
    // The old version is `reference.len() - start` bytes back from any
    // position of the chunk, counted through the prefix.
    let offset = u32::try_from(reference.len() - start).map_err(|_| CodecError::Zstd {
        step: "aligned delta",
        source: std::io::Error::other("reference too large"),
    })?;
    let mut sequences = Vec::new();
    let (mut literals, mut long_runs) = (0usize, 0usize);
    let (mut at, mut literal_start) = (0usize, 0usize);
    while at < old.len() {
        let equal = equal_prefix(&bytes[at..], &old[at..]);
        if equal >= ALIGNED_MIN_MATCH {
            let run = at - literal_start;
            literals += run;
            if run > ALIGNED_LONG_RUN {
                long_runs += run;
            }
            sequences.push(zstd::zstd_safe::zstd_sys::ZSTD_Sequence {
                offset,
                // Both at most a chunk (CHUNK_MAX): fit a u32.
                litLength: run as u32,
                matchLength: equal as u32,
                rep: 0,
            });
            at += equal;
            literal_start = at;
        } else {
            // The equal bytes and the one that differs after them.
            at += equal + 1;
        }
    }
    // The last literals; those past the old version's end have nothing
    // to be copied from in the reference, wherever they went.
    let run = old.len().saturating_sub(literal_start);
    literals += bytes.len().saturating_sub(literal_start);
    if run > ALIGNED_LONG_RUN {
        long_runs += run;
    }
    if long_runs > literals / 8 {
        return Ok(None);
    }
    SEQUENCE_ENCODER.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|_| CodecError::Zstd {
            step: "aligned delta",
            source: std::io::Error::other("this thread's sequence encoder is in use"),
        })?;
        let encoder = match &mut *slot {
            Some(encoder) => encoder,
            empty => empty.insert(SequenceEncoder::new()?),
        };
        encoder.encode(reference, &sequences, bytes).map(Some)
    })
}

/// How many leading bytes `a` and `b` share.
fn equal_prefix(a: &[u8], b: &[u8]) -> usize {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let words = a.chunks_exact(8).zip(b.chunks_exact(8));
    for (i, (x, y)) in words.enumerate() {
        let differ = u64::from_ne_bytes(x.try_into().unwrap_or_default())
            ^ u64::from_ne_bytes(y.try_into().unwrap_or_default());
        if differ != 0 {
            let first = if cfg!(target_endian = "little") {
                differ.trailing_zeros()
            } else {
                differ.leading_zeros()
            };
            return i * 8 + (first / 8) as usize;
        }
    }
    let tail = len - len % 8;
    tail + a[tail..]
        .iter()
        .zip(&b[tail..])
        .take_while(|(x, y)| x == y)
        .count()
}

thread_local! {
    /// This thread's context for [`encode_aligned`] (kept, as the other
    /// delta contexts, see [`DELTA_ENCODERS`]).
    static SEQUENCE_ENCODER: std::cell::RefCell<Option<SequenceEncoder>> =
        const { std::cell::RefCell::new(None) };
}

/// A zstd context that entropy-codes sequences given to it into frames as
/// small as [`small_frames`] writes. zstd-safe has no binding for
/// `ZSTD_compressSequences`, so this holds the raw context.
struct SequenceEncoder(std::ptr::NonNull<zstd::zstd_safe::zstd_sys::ZSTD_CCtx>);

impl SequenceEncoder {
    fn new() -> Result<SequenceEncoder> {
        use zstd::zstd_safe::zstd_sys::{self, ZSTD_cParameter as P};
        let failed = |what: &str| CodecError::Zstd {
            step: "sequence encoder",
            source: std::io::Error::other(what.to_string()),
        };
        // SAFETY: creates a context; null is checked below.
        let raw = unsafe { zstd_sys::ZSTD_createCCtx() };
        let encoder = SequenceEncoder(
            std::ptr::NonNull::new(raw).ok_or_else(|| failed("no memory for a context"))?,
        );
        for (parameter, value) in [
            // ZSTD_c_format: ZSTD_f_zstd1_magicless.
            (P::ZSTD_c_experimentalParam2, 1),
            (P::ZSTD_c_checksumFlag, 0),
            (P::ZSTD_c_contentSizeFlag, 0),
            (P::ZSTD_c_dictIDFlag, 0),
            // No match finding is done: the smallest tables, so that
            // loading the reference as prefix costs next to nothing.
            (
                P::ZSTD_c_strategy,
                zstd_sys::ZSTD_strategy::ZSTD_fast as i32,
            ),
            (P::ZSTD_c_hashLog, 6),
            (P::ZSTD_c_chainLog, 6),
            (P::ZSTD_c_minMatch, ALIGNED_MIN_MATCH as i32),
            // ZSTD_c_literalCompressionMode: ZSTD_ps_enable (the fast
            // strategy would otherwise store literals raw).
            (P::ZSTD_c_experimentalParam5, 1),
            // ZSTD_c_validateSequences off: zstd's check does not count
            // the prefix, and would refuse every copy of the reference.
            // The sequences are built above to lie within chunk and
            // reference, and every delta is checked when applied.
            (P::ZSTD_c_experimentalParam12, 0),
        ] {
            // SAFETY: the context is valid (owned by `encoder`).
            let code =
                unsafe { zstd_sys::ZSTD_CCtx_setParameter(encoder.0.as_ptr(), parameter, value) };
            check(code, "sequence encoder")?;
        }
        Ok(encoder)
    }

    /// One frame of `bytes`, made of `sequences` against `reference`.
    fn encode(
        &mut self,
        reference: &[u8],
        sequences: &[zstd::zstd_safe::zstd_sys::ZSTD_Sequence],
        bytes: &[u8],
    ) -> Result<Vec<u8>> {
        use zstd::zstd_safe::zstd_sys::{self, ZSTD_ResetDirective, ZSTD_cParameter as P};
        let cctx = self.0.as_ptr();
        let window_log = window_log(reference.len() + bytes.len());
        let mut out: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(bytes.len()));
        // SAFETY: `cctx` is valid; the prefix is only read by the
        // compression below (zstd keeps it for the next frame only) and the
        // session is reset before returning, whatever the outcome; `out`
        // has `capacity()` writable bytes, and zstd writes at most that
        // many and returns how many it wrote.
        let written = unsafe {
            let prepared = check(
                zstd_sys::ZSTD_CCtx_setParameter(cctx, P::ZSTD_c_windowLog, window_log as i32),
                "delta window",
            )
            .and_then(|_| {
                check(
                    zstd_sys::ZSTD_CCtx_refPrefix(cctx, reference.as_ptr().cast(), reference.len()),
                    "delta reference",
                )
            });
            let written = prepared.and_then(|_| {
                check(
                    zstd_sys::ZSTD_compressSequences(
                        cctx,
                        out.as_mut_ptr().cast(),
                        out.capacity(),
                        sequences.as_ptr(),
                        sequences.len(),
                        bytes.as_ptr().cast(),
                        bytes.len(),
                    ),
                    "aligned delta",
                )
            });
            let reset = check(
                zstd_sys::ZSTD_CCtx_reset(cctx, ZSTD_ResetDirective::ZSTD_reset_session_only),
                "delta reset",
            );
            let written = written?;
            reset?;
            out.set_len(written);
            written
        };
        debug_assert!(written <= out.capacity());
        out.shrink_to_fit();
        Ok(out)
    }
}

impl Drop for SequenceEncoder {
    fn drop(&mut self) {
        // SAFETY: the context is owned, and freed once.
        unsafe {
            zstd::zstd_safe::zstd_sys::ZSTD_freeCCtx(self.0.as_ptr());
        }
    }
}

/// A zstd return code as a result: the value, or the error named.
fn check(code: usize, step: &'static str) -> Result<usize> {
    // SAFETY: ZSTD_isError takes any code.
    if unsafe { zstd::zstd_safe::zstd_sys::ZSTD_isError(code) } != 0 {
        return Err(CodecError::Zstd {
            step,
            source: std::io::Error::other(zstd::zstd_safe::get_error_name(code)),
        });
    }
    Ok(code)
}

/// The window (log2) a delta needs to see its whole reference and chunk.
fn window_log(len: usize) -> u32 {
    (usize::BITS - len.max(1 << 10).leading_zeros()).clamp(10, 27)
}

/// The delta encodings [`encode_delta`] tries: (level, long-distance
/// matching). Each has a context of its own per thread, so that reusing
/// one never changes its tables' shape.
const DELTA_SETTINGS: [(i32, bool); 3] = [
    (DELTA_LEVEL, false),
    (SPARSE_DELTA_LEVEL, false),
    (DELTA_LEVEL, true),
];
/// Indices into [`DELTA_SETTINGS`]: the first try, the sparse delta's
/// retry, the long-distance retry.
const QUICK: usize = 0;
const SPARSE: usize = 1;
const LONG: usize = 2;

thread_local! {
    /// This thread's zstd contexts for deltas, one per [`DELTA_SETTINGS`].
    /// Why kept: setting one up for a chunk's reference (a few MB of match
    /// tables, mapped, zeroed and unmapped again) was most of a delta's
    /// cost. On the delta bench's pair, `perf` put 57% of the snapshot's
    /// CPU in starting frames, 34% of it in page faults, against 5% in
    /// compressing; a reused context keeps its tables and zstd moves its
    /// indices past the old entries instead of clearing them.
    static DELTA_ENCODERS: std::cell::RefCell<[Option<zstd::zstd_safe::CCtx<'static>>; 3]> =
        const { std::cell::RefCell::new([None, None, None]) };
}

/// A delta context with settings `DELTA_SETTINGS[which]` (see
/// [`small_frames`]).
fn delta_context(which: usize) -> Result<zstd::zstd_safe::CCtx<'static>> {
    let (level, long_distance) = DELTA_SETTINGS[which];
    let mut cctx = small_frames(level, "delta encoder")?;
    cctx.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
        long_distance,
    ))
    .map_err(|code| CodecError::Zstd {
        step: "delta encoder",
        source: std::io::Error::other(zstd::zstd_safe::get_error_name(code)),
    })?;
    Ok(cctx)
}

/// A context at `level` that writes frames as small as they can be: no
/// magic number, no checksum (every chunk has its SHA-256), no content
/// size (the chunk record has it), no dictionary id (the encoding names
/// it). `step` names it in errors.
fn small_frames<'a>(level: i32, step: &'static str) -> Result<zstd::zstd_safe::CCtx<'a>> {
    use zstd::zstd_safe::{CCtx, CParameter, FrameFormat};
    let failed = |what: &str| CodecError::Zstd {
        step,
        source: std::io::Error::other(what.to_string()),
    };
    let mut cctx = CCtx::try_create().ok_or_else(|| failed("no memory for a context"))?;
    for parameter in [
        CParameter::CompressionLevel(level),
        CParameter::Format(FrameFormat::Magicless),
        CParameter::ChecksumFlag(false),
        CParameter::ContentSizeFlag(false),
        CParameter::DictIdFlag(false),
    ] {
        cctx.set_parameter(parameter)
            .map_err(|code| failed(zstd::zstd_safe::get_error_name(code)))?;
    }
    Ok(cctx)
}

fn encode_delta_with(reference: &[u8], bytes: &[u8], which: usize) -> Result<Vec<u8>> {
    use zstd::zstd_safe::{CParameter, ResetDirective};
    let failed = |step: &'static str, code: usize| CodecError::Zstd {
        step,
        source: std::io::Error::other(zstd::zstd_safe::get_error_name(code)),
    };
    // Long enough a window to see the whole reference plus the chunk.
    let window_log = window_log(reference.len() + bytes.len());
    DELTA_ENCODERS.with(|contexts| {
        let mut contexts = contexts.try_borrow_mut().map_err(|_| CodecError::Zstd {
            step: "delta encoder",
            source: std::io::Error::other("this thread's delta contexts are in use"),
        })?;
        let cctx = match &mut contexts[which] {
            Some(cctx) => cctx,
            empty => empty.insert(delta_context(which)?),
        };
        cctx.set_parameter(CParameter::WindowLog(window_log))
            .map_err(|code| failed("delta window", code))?;
        // SAFETY: zstd keeps a pointer to the prefix for the next frame
        // only; the session is reset below, whatever the outcome, before
        // this context is used again or dropped, so nothing reads
        // `reference` after this call returns (the 'static is never relied
        // on).
        let prefix: &'static [u8] =
            unsafe { std::slice::from_raw_parts(reference.as_ptr(), reference.len()) };
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(bytes.len()));
        let written = cctx
            .ref_prefix(prefix)
            .map_err(|code| failed("delta reference", code))
            .and_then(|_| {
                cctx.compress2(&mut out, bytes)
                    .map_err(|code| failed("delta encode", code))
            });
        let reset = cctx.reset(ResetDirective::SessionOnly);
        written?;
        reset.map_err(|code| failed("delta reset", code))?;
        out.shrink_to_fit();
        Ok(out)
    })
}

/// Rebuilds a chunk of `len` bytes from a delta against `reference` into
/// `out` (its contents are replaced; its allocation is reused).
pub fn apply_delta_into(
    reference: &[u8],
    delta: &[u8],
    len: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    use zstd::zstd_safe::{DCtx, DParameter, FrameFormat};
    let failed = |step: &'static str, what: &str| CodecError::Zstd {
        step,
        source: std::io::Error::other(what.to_string()),
    };
    out.clear();
    // One byte of room past `len` tells a too-long delta apart.
    out.reserve_exact(len + 1);
    DELTA_DECODER.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| failed("delta decoder", "in use"))?;
        let dctx = match &mut *slot {
            Some(dctx) => dctx,
            empty => {
                let mut dctx =
                    DCtx::try_create().ok_or_else(|| failed("delta decoder", "no memory"))?;
                for parameter in [
                    DParameter::Format(FrameFormat::Magicless),
                    DParameter::WindowLogMax(27),
                ] {
                    dctx.set_parameter(parameter).map_err(|code| {
                        failed("delta decoder", zstd::zstd_safe::get_error_name(code))
                    })?;
                }
                empty.insert(dctx)
            }
        };
        // SAFETY: zstd keeps a pointer to the prefix for the next frame
        // only, and the dictionary is cleared below, whatever the outcome,
        // before this context is used again or dropped: nothing reads
        // `reference` after this call returns (the 'static is never relied
        // on).
        let prefix: &'static [u8] =
            unsafe { std::slice::from_raw_parts(reference.as_ptr(), reference.len()) };
        let decoded = dctx
            .ref_prefix(prefix)
            .and_then(|_| dctx.decompress(out, delta));
        let cleared = dctx.disable_dictionary();
        decoded.map_err(|code| failed("delta decode", zstd::zstd_safe::get_error_name(code)))?;
        cleared.map_err(|code| failed("delta decoder", zstd::zstd_safe::get_error_name(code)))
    })?;
    if out.len() != len {
        return Err(CodecError::WrongLength {
            got: out.len(),
            expected: len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_delta(reference: &[u8], delta: &[u8], len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        apply_delta_into(reference, delta, len, &mut out)?;
        Ok(out)
    }

    #[test]
    fn delta_round_trips_and_is_small_for_small_edits() {
        let reference: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut edited = reference.clone();
        edited[1000] ^= 0xff;
        edited[150_000..150_010].copy_from_slice(b"0123456789");
        let delta = encode_delta(&reference, &edited).expect("encode");
        assert!(delta.len() < 200, "delta is {} bytes", delta.len());
        assert_eq!(
            apply_delta(&reference, &delta, edited.len()).expect("apply"),
            edited
        );
        assert!(apply_delta(&reference, &delta, edited.len() - 1).is_err());
    }

    /// The thread's contexts are reused: each delta refers to its own
    /// reference only, whatever came before it on the thread, of whatever
    /// size (a smaller window after a larger one, and back).
    #[test]
    fn deltas_one_after_another_each_refer_to_their_own_reference() {
        let mut pairs = Vec::new();
        for (seed, len) in [(3u32, 300_000usize), (5, 20_000), (11, 1_500_000), (13, 64)] {
            let reference: Vec<u8> = (0..len as u32).map(|i| (i * seed % 251) as u8).collect();
            let mut edited = reference.clone();
            edited[len / 2] ^= 0x5a;
            pairs.push((reference, edited));
        }
        let deltas: Vec<Vec<u8>> = pairs
            .iter()
            .chain(pairs.iter().rev())
            .map(|(reference, edited)| encode_delta(reference, edited).expect("encode"))
            .collect();
        for ((reference, edited), delta) in pairs.iter().chain(pairs.iter().rev()).zip(&deltas) {
            assert_eq!(
                &apply_delta(reference, delta, edited.len()).expect("apply"),
                edited
            );
        }
    }

    /// `len` bytes of xorshift noise: incompressible, no repeats.
    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// An edit in place is told from a move or a rewrite, wherever in the
    /// reference the old version starts.
    #[test]
    fn changes_in_place_are_counted_where_the_old_version_lies() {
        let old = noise(100_000);
        let mut edited = old.clone();
        for at in (500..100_000).step_by(1000) {
            edited[at] ^= 0x80;
        }
        assert_eq!(
            changed_in_place(&old, &edited),
            Some(InPlace {
                start: 0,
                changed: 100
            })
        );
        // The old chunk after another one, as a moved cut point leaves it.
        let mut reference = b"the chunk before".repeat(3000);
        reference.extend(&old);
        assert_eq!(
            changed_in_place(&reference, &edited).map(|found| found.changed),
            Some(100)
        );
        // Its first bytes edited too: another anchor finds it.
        edited[..ANCHOR_BYTES].fill(0);
        assert!(changed_in_place(&reference, &edited).is_some());
        // Shifted by an insertion, or rewritten: not in place.
        let mut shifted = old.clone();
        shifted.splice(50_000..50_000, *b"inserted");
        assert_eq!(changed_in_place(&old, &shifted), None);
        let rewritten: Vec<u8> = old.iter().map(|b| b ^ 0x55).collect();
        assert_eq!(changed_in_place(&reference, &rewritten), None);
    }

    /// `len` bytes of float32 weights near zero, and a copy with one in
    /// `every` of them perturbed: a checkpoint saved after a training step.
    fn weights(len: usize, every: usize) -> (Vec<u8>, Vec<u8>) {
        let old = noise(len)
            .chunks_exact(4)
            .flat_map(|w| {
                let unit = f32::from(u16::from_le_bytes([w[0], w[1]])) / 65_536.0;
                ((unit - 0.5) * 0.2).to_le_bytes()
            })
            .collect::<Vec<u8>>();
        let mut new = old.clone();
        for (i, w) in new.chunks_exact_mut(4).enumerate() {
            if i % every == 7 {
                let v = f32::from_le_bytes([w[0], w[1], w[2], w[3]]) + 0.003;
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        (old, new)
    }

    /// A dense edit in place is encoded by aligning it with its old
    /// version, no larger than zstd's match finder makes it, and rebuilds;
    /// wherever the old version starts in the reference.
    #[test]
    fn a_dense_edit_in_place_is_encoded_aligned_with_its_old_version() {
        let (old, new) = weights(256 * 1024, 40);
        for before in [0usize, 70_001] {
            let mut reference = noise(before);
            reference.extend(&old);
            let aligned = encode_aligned(&reference, before, &new)
                .expect("encode")
                .expect("aligned");
            let delta = encode_delta(&reference, &new).expect("encode");
            assert_eq!(delta, aligned, "the aligned encoding is the one kept");
            let quick = encode_delta_with(&reference, &new, QUICK).expect("encode");
            assert!(
                delta.len() <= quick.len(),
                "{} bytes aligned, {} from zstd's match finder",
                delta.len(),
                quick.len()
            );
            assert_eq!(
                apply_delta(&reference, &delta, new.len()).expect("apply"),
                new
            );
            // Against another reference it does not rebuild the chunk.
            let other = noise(reference.len());
            let wrong = apply_delta(&other, &delta, new.len());
            assert!(wrong.is_err() || wrong.is_ok_and(|out| out != new));
        }
        // A reference that ends before the chunk does (its bases run out):
        // the rest is literals, and the match finder's delta is kept when
        // it is smaller.
        let short = &old[..old.len() * 7 / 8];
        let found = changed_in_place(short, &new).expect("in place");
        assert_eq!(found.start, 0);
        let aligned = encode_aligned(short, 0, &new)
            .expect("encode")
            .expect("aligned");
        assert_eq!(apply_delta(short, &aligned, new.len()).expect("apply"), new);
        let delta = encode_delta(short, &new).expect("encode");
        assert!(delta.len() <= aligned.len());
        assert!(delta.len() <= encode_delta_with(short, &new, QUICK).expect("encode").len());
        assert_eq!(apply_delta(short, &delta, new.len()).expect("apply"), new);
        // Frames from one context one after another stay independent.
        let (old2, new2) = weights(64 * 1024, 10);
        let first = encode_aligned(&old2, 0, &new2)
            .expect("encode")
            .expect("aligned");
        let again = encode_aligned(&old2, 0, &new2)
            .expect("encode")
            .expect("aligned");
        assert_eq!(first, again);
        assert_eq!(apply_delta(&old2, &first, new2.len()).expect("apply"), new2);
    }

    /// Content that moved within the chunk is not encoded aligned: the
    /// match finder finds where it went.
    #[test]
    fn moved_content_is_left_to_the_match_finder() {
        let old = noise(128 * 1024);
        let mut moved = old.clone();
        // Records shifted by 99 bytes over a stretch, as a database page
        // rewritten by compaction.
        moved.copy_within(40_000..44_000, 40_099);
        assert!(changed_in_place(&old, &moved).is_some());
        assert_eq!(encode_aligned(&old, 0, &moved).expect("encode"), None);
        let delta = encode_delta(&old, &moved).expect("encode");
        assert!(delta.len() < 1024, "delta is {} bytes", delta.len());
        assert!(delta.len() <= encode_delta_with(&old, &moved, QUICK).expect("quick").len());
        assert_eq!(
            apply_delta(&old, &delta, moved.len()).expect("apply"),
            moved
        );
        // Moved and rewritten in many places (not sparse): the quick
        // encoding is tried as well, and the smaller kept.
        let mut dense = moved.clone();
        for at in (0..dense.len() - 600).step_by(1_000) {
            dense.copy_within(at..at + 180, at + 7);
            dense[at + 560..at + 600]
                .iter_mut()
                .for_each(|b| *b ^= 0x5a);
        }
        assert!(changed_in_place(&old, &dense).is_some());
        let delta = encode_delta(&old, &dense).expect("encode");
        assert!(delta.len() > dense.len() / RETRY_WITH_LDM_DIVISOR);
        let quick = encode_delta_with(&old, &dense, QUICK).expect("quick");
        let sparse = encode_delta_with(&old, &dense, SPARSE).expect("sparse");
        assert_eq!(delta.len(), quick.len().min(sparse.len()));
        assert_eq!(
            apply_delta(&old, &delta, dense.len()).expect("apply"),
            dense
        );
    }

    #[test]
    fn equal_prefixes_are_measured_to_the_byte() {
        let a = noise(100);
        for at in [0usize, 1, 7, 8, 9, 63, 64, 99] {
            let mut b = a.clone();
            b[at] ^= 1;
            assert_eq!(equal_prefix(&a, &b), at);
        }
        assert_eq!(equal_prefix(&a, &a), 100);
        assert_eq!(equal_prefix(&a[..50], &a), 50);
        assert_eq!(equal_prefix(&[], &a), 0);
    }

    #[test]
    fn a_sparse_delta_is_encoded_tighter_than_the_quick_level() {
        // 128 KiB of 100-byte records (an id, a 3-byte score, random
        // bytes), 40 of whose scores change: a database chunk after an
        // UPDATE of a few rows.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut reference = Vec::with_capacity(128 << 10);
        for id in 0u32.. {
            if reference.len() + 100 > 128 << 10 {
                break;
            }
            reference.extend(id.to_le_bytes());
            reference.extend(&next().to_le_bytes()[..3]);
            reference.extend((0..93).map(|_| next() as u8));
        }
        let mut edited = reference.clone();
        for _ in 0..40 {
            let at = (next() as usize % (reference.len() / 100)) * 100 + 4;
            edited[at..at + 3].copy_from_slice(&next().to_le_bytes()[..3]);
        }
        let quick = encode_delta_with(&reference, &edited, QUICK).expect("encode");
        let delta = encode_delta(&reference, &edited).expect("encode");
        assert!(
            delta.len() < quick.len(),
            "{} bytes, {} at the quick level",
            delta.len(),
            quick.len()
        );
        assert_eq!(
            apply_delta(&reference, &delta, edited.len()).expect("apply"),
            edited
        );
    }

    #[test]
    fn delta_of_repetitive_records_finds_the_reference() {
        let reference: Vec<u8> = (0..524_288u64)
            .map(|i| (((i * 2_654_435_761) & 0xffff_ffff) >> 24) as u8)
            .collect();
        let mut edited = reference.clone();
        edited[100_000..100_016].copy_from_slice(b"player 7 joined!");
        let delta = encode_delta(&reference, &edited).expect("encode");
        assert!(delta.len() < 2048, "delta is {} bytes", delta.len());
        assert_eq!(
            apply_delta(&reference, &delta, edited.len()).expect("apply"),
            edited
        );
    }

    #[test]
    fn base_falls_back_to_raw_for_incompressible_bytes() {
        let noise = noise(65_536);
        let (encoding, payload) = BaseEncoder::new(None).encode(&noise).expect("encode");
        assert_eq!((encoding, payload), (ChunkEncoding::Raw, noise.clone()));
        let (encoding, payload) = BaseEncoder::new(None)
            .encode(&[7u8; 65_536])
            .expect("encode");
        assert_eq!(encoding, ChunkEncoding::Zstd { dict: 0 });
        assert!(payload.len() < 1024);
        let mut out = Vec::new();
        decode_base_into(&payload, 65_536, None, &mut out).expect("decode");
        assert_eq!(out, vec![7u8; 65_536]);
        assert!(decode_base_into(&payload, 65_535, None, &mut out).is_err());
    }

    /// Bytes zstd saves about a tenth of (float32 weights near zero, as a
    /// checkpoint's) are kept raw; bytes it saves half of are compressed.
    #[test]
    fn a_base_is_compressed_only_when_that_saves_an_eighth() {
        let floats: Vec<u8> = noise(262_144)
            .chunks_exact(4)
            .flat_map(|b| {
                let unit = (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8) as f32;
                ((unit / (1u32 << 24) as f32 - 0.5) * 0.2).to_le_bytes()
            })
            .collect();
        let (encoding, payload) = BaseEncoder::new(None).encode(&floats).expect("encode");
        assert_eq!((encoding, &payload), (ChunkEncoding::Raw, &floats));
        let nibbles: Vec<u8> = noise(65_536).iter().map(|b| b & 0x0f).collect();
        let (encoding, payload) = BaseEncoder::new(None).encode(&nibbles).expect("encode");
        assert_eq!(encoding, ChunkEncoding::Zstd { dict: 0 });
        assert!(
            payload.len() < nibbles.len() * 5 / 8,
            "{} bytes",
            payload.len()
        );
    }

    fn text(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.max(1);
        let mut out = Vec::new();
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(
                format!(
                    "{{\"id\": {}, \"name\": \"player-{}\", \"score\": {}}},\n",
                    state % 100_000,
                    (state >> 20) % 500,
                    (state >> 40) % 1000
                )
                .as_bytes(),
            );
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_trained_dictionary_makes_small_files_smaller_and_round_trips() {
        let samples: Vec<Vec<u8>> = (0..400).map(|i| text(i + 1, 2000)).collect();
        let dictionary = Dictionary::train(1, &samples).expect("trains");
        // Reloaded from its stored bytes, as a reader gets it.
        let reloaded = Dictionary::new(1, dictionary.raw().to_vec()).expect("loads");
        let file = text(9999, 1500);
        let (plain, plain_bytes) = BaseEncoder::new(None).encode(&file).expect("encode");
        let (with, with_bytes) = BaseEncoder::new(Some(&dictionary))
            .encode(&file)
            .expect("encode");
        assert_eq!(plain, ChunkEncoding::Zstd { dict: 0 });
        assert_eq!(with, ChunkEncoding::Zstd { dict: 1 });
        assert!(
            with_bytes.len() * 10 < plain_bytes.len() * 9,
            "{} bytes with the dictionary, {} without",
            with_bytes.len(),
            plain_bytes.len()
        );
        let mut out = Vec::new();
        decode_base_into(&with_bytes, file.len(), Some(&reloaded), &mut out).expect("decode");
        assert_eq!(out, file);
        // Without its dictionary the frame does not decode to the file.
        let wrong = decode_base_into(&with_bytes, file.len(), None, &mut out);
        assert!(wrong.is_err() || out != file);
    }

    #[test]
    fn too_few_samples_train_no_dictionary() {
        assert!(Dictionary::train(1, &[text(1, 100)]).is_none());
    }
}
