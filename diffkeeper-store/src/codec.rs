//! Chunk encodings: how one chunk's bytes become stored payload and back.
//!
//! Bases are zstd frames, with the store's dictionary when it has one (raw
//! when that saves less than 1/16; lz4_flex blocks in stores of schema 2 and
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

    /// Encodes a base chunk: a zstd frame when it saves at least 1/16, else
    /// the bytes as they are.
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
        Ok(if compressed.len() + bytes.len() / 16 <= bytes.len() {
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
        })
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
/// The regular match finder is tried first. On record-structured data it
/// can prefer nearby self-matches over the reference's copy (a 16-byte edit
/// in a 512 KiB chunk of fixed-size records gave 18 KB); long-distance
/// matching finds it (0.6 KB) but doubles the time, so it is the second try
/// for deltas that came out large.
///
/// A delta that came out small is a few edits in a chunk otherwise copied
/// (database pages); it is encoded again at [`SPARSE_DELTA_LEVEL`], which
/// spends the time on encoding those edits tighter.
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
    let quick = encode_delta_with(reference, bytes, QUICK)?;
    let retry = if quick.len() <= bytes.len() / RETRY_WITH_LDM_DIVISOR {
        encode_delta_with(reference, bytes, SPARSE)?
    } else if changed_in_place(reference, bytes)
        .is_some_and(|changed| quick.len() <= changed.saturating_mul(IN_PLACE_SLACK) + 64)
    {
        return Ok(quick);
    } else {
        encode_delta_with(reference, bytes, LONG)?
    };
    Ok(if retry.len() < quick.len() {
        retry
    } else {
        quick
    })
}

/// How many times the bytes changed in place a delta may be and still
/// count as about as small as them (see [`encode_delta`]).
const IN_PLACE_SLACK: usize = 4;

/// Bytes of the chunk looked up in the reference to find where its old
/// version lies.
const ANCHOR_BYTES: usize = 16;
/// How many anchors, spread over the chunk, are looked up.
const ANCHORS: usize = 8;

/// How many bytes of `bytes` differ from its old version in `reference`,
/// when it is an edit in place: the old version lies somewhere in the
/// reference (its start, or where one of [`ANCHORS`] anchors of the chunk is
/// found) with at most 1/8 of its bytes changed. `None` otherwise (moved
/// in pieces, grown, rewritten). The reference holds whole old chunks, so
/// where a cut point moved the old version starts inside it.
fn changed_in_place(reference: &[u8], bytes: &[u8]) -> Option<usize> {
    let changed_at = |start: usize| {
        let old = reference.get(start..start.checked_add(bytes.len())?)?;
        let changed = old.iter().zip(bytes).filter(|(a, b)| a != b).count();
        (changed <= bytes.len() / 8).then_some(changed)
    };
    if let Some(changed) = changed_at(0) {
        return Some(changed);
    }
    (0..ANCHORS).find_map(|nth| {
        let at = bytes.len() / ANCHORS * nth;
        let anchor = bytes.get(at..at + ANCHOR_BYTES)?;
        let found = memchr::memmem::find(reference, anchor)?;
        changed_at(found.checked_sub(at)?)
    })
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
    let window_log =
        (usize::BITS - (reference.len() + bytes.len()).max(1 << 10).leading_zeros()).clamp(10, 27);
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
        assert_eq!(changed_in_place(&old, &edited), Some(100));
        // The old chunk after another one, as a moved cut point leaves it.
        let mut reference = b"the chunk before".repeat(3000);
        reference.extend(&old);
        assert_eq!(changed_in_place(&reference, &edited), Some(100));
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
