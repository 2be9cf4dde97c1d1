//! Chunk encodings: how one chunk's bytes become stored payload and back.
//!
//! Bases are raw or lz4_flex blocks; deltas are zstd frames compressed with
//! the reference chunk as prefix (the choice is explained in
//! [`crate::schema`]).

use std::io::{Read, Write};

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

/// A delta bigger than this share of its chunk (1/64) is tried again with
/// long-distance matching.
const RETRY_WITH_LDM_DIVISOR: usize = 64;

/// Encodes a base chunk: lz4 when it saves at least 1/16, else raw.
/// Returns `(is_lz4, payload)`.
pub fn encode_base(bytes: &[u8]) -> (bool, Vec<u8>) {
    let compressed = lz4_flex::block::compress(bytes);
    if compressed.len() + bytes.len() / 16 <= bytes.len() {
        (true, compressed)
    } else {
        (false, bytes.to_vec())
    }
}

/// Encodes `bytes` as a zstd frame that references `reference` as a prefix.
///
/// The regular match finder is tried first. On record-structured data it
/// can prefer nearby self-matches over the reference's copy (a 16-byte edit
/// in a 512 KiB chunk of fixed-size records gave 18 KB); long-distance
/// matching finds it (0.6 KB) but doubles the time, so it is the second try
/// for deltas that came out large.
pub fn encode_delta(reference: &[u8], bytes: &[u8]) -> Result<Vec<u8>> {
    let quick = encode_delta_with(reference, bytes, false)?;
    if quick.len() <= bytes.len() / RETRY_WITH_LDM_DIVISOR {
        return Ok(quick);
    }
    let long = encode_delta_with(reference, bytes, true)?;
    Ok(if long.len() < quick.len() {
        long
    } else {
        quick
    })
}

fn encode_delta_with(reference: &[u8], bytes: &[u8], long_distance: bool) -> Result<Vec<u8>> {
    let mut encoder =
        zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), DELTA_LEVEL, reference)
            .step("delta encoder")?;
    // Long enough a window to see the whole reference plus the chunk.
    let window_log =
        (usize::BITS - (reference.len() + bytes.len()).max(1 << 10).leading_zeros()).clamp(10, 27);
    encoder.window_log(window_log).step("delta window")?;
    encoder
        .long_distance_matching(long_distance)
        .step("long-distance matching")?;
    encoder.include_checksum(false).step("checksum")?;
    encoder.include_contentsize(false).step("content size")?;
    encoder.include_magicbytes(false).step("magic")?;
    encoder.write_all(bytes).step("delta encode")?;
    encoder.finish().step("delta finish")
}

/// Rebuilds a chunk of `len` bytes from a delta against `reference` into
/// `out` (its contents are replaced; its allocation is reused).
pub fn apply_delta_into(
    reference: &[u8],
    delta: &[u8],
    len: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut decoder =
        zstd::stream::read::Decoder::with_ref_prefix(delta, reference).step("delta decoder")?;
    decoder.include_magicbytes(false).step("delta decoder")?;
    decoder.window_log_max(27).step("delta window")?;
    out.clear();
    // One byte past `len` tells a too-long delta apart from an exact one.
    decoder
        .take(len as u64 + 1)
        .read_to_end(out)
        .step("delta decode")?;
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
        let mut state = 0x1234_5678_u32;
        let noise: Vec<u8> = (0..65_536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        assert_eq!(encode_base(&noise), (false, noise.clone()));
        let (lz4, payload) = encode_base(&[7u8; 65_536]);
        assert!(lz4 && payload.len() < 1024);
    }
}
