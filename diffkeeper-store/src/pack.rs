//! Packs: a batch's small new bases compressed together as one frame (the
//! format is in [`crate::schema`], Packs; this is how a writer builds one).
//!
//! Whoever captures holds small bases back in a [`PackBuilder`] as they
//! come and, when it fills, seals it into the chunks to store: the pack
//! (one base holding the members' bytes back to back) and one record per
//! member pointing into it. Several builders may fill at once (one per
//! capture thread); each pack is whole on its own.

use crate::codec::{BaseEncoder, CodecError};
use crate::schema::{ChunkEncoding, ChunkRecord, PACK_BYTES};

/// Largest chunk put in a pack: any (a chunk is at most
/// [`crate::schema::CHUNK_MAX`]). Measured on a first snapshot of Debian's
/// Python packages (3,538 files, 52 MB; packs of 1 MiB, files captured by
/// name): no packs 16.99 MB on disk, members up to 128 KiB 14.87 MB, up to
/// 512 KiB 14.42 MB, in the same time (1.2-1.3 s): a large file's new
/// chunks are compressed at the small-base level in packs, as well.
pub const MEMBER_MAX_BYTES: usize = crate::schema::CHUNK_MAX;

/// Small bases waiting to be compressed together.
#[derive(Default)]
pub struct PackBuilder {
    /// `(id, hash, offset)` of each member, in `bytes` order.
    members: Vec<(u64, [u8; 32], u32)>,
    /// The members' bytes, back to back.
    bytes: Vec<u8>,
}

/// A chunk to store: its id, record and payload (empty for a member).
pub type NewChunk = (u64, ChunkRecord, Vec<u8>);

/// What a sealed pack stores.
#[derive(Debug, Default)]
pub struct Sealed {
    /// The pack itself (`BatchWriter::put_pack`); none for a lone member.
    pub pack: Option<NewChunk>,
    /// The members (`BatchWriter::put_chunk`), or the lone one as a base.
    pub chunks: Vec<NewChunk>,
}

impl PackBuilder {
    /// Whether a chunk of `len` bytes may be packed at all.
    pub fn packable(len: usize) -> bool {
        len <= MEMBER_MAX_BYTES
    }

    /// Whether `len` more bytes fit in this pack.
    pub fn fits(&self, len: usize) -> bool {
        self.bytes.len() + len <= PACK_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds chunk `id` (SHA-256 `hash`). The caller checks [`Self::fits`]
    /// first and seals when it does not: a pack never exceeds
    /// [`PACK_BYTES`].
    pub fn push(&mut self, id: u64, hash: [u8; 32], bytes: &[u8]) {
        if self.bytes.capacity() == 0 {
            // Kept from pack to pack (see `seal`): one allocation per
            // builder rather than a doubling series per pack, which glibc's
            // malloc leaves scattered over its arenas.
            self.bytes.reserve_exact(PACK_BYTES);
        }
        // At most PACK_BYTES before this member: fits a u32.
        let offset = self.bytes.len() as u32;
        self.members.push((id, hash, offset));
        self.bytes.extend_from_slice(bytes);
    }

    /// Compresses what is held and empties the builder: the pack, under
    /// the id `pack_id` gives, and its members; a lone member is an
    /// ordinary base, and takes no pack id. On failure the members are
    /// gone: the caller fails the batch.
    pub fn seal(
        &mut self,
        encoder: &BaseEncoder,
        pack_id: impl FnOnce() -> u64,
    ) -> Result<Sealed, CodecError> {
        let members = std::mem::take(&mut self.members);
        let sealed = seal(&members, &self.bytes, encoder, pack_id);
        self.bytes.clear();
        sealed
    }
}

/// The chunks `members` (laid out in `bytes`) are stored as.
fn seal(
    members: &[(u64, [u8; 32], u32)],
    bytes: &[u8],
    encoder: &BaseEncoder,
    pack_id: impl FnOnce() -> u64,
) -> Result<Sealed, CodecError> {
    let whole = |hash: [u8; 32], encoding: ChunkEncoding, payload: &[u8]| ChunkRecord {
        hash,
        len: bytes.len() as u32,
        encoding,
        stored_len: payload.len() as u32,
        at: None,
    };
    Ok(match members {
        [] => Sealed::default(),
        [(id, hash, _)] => {
            let (encoding, payload) = encoder.encode(bytes)?;
            Sealed {
                pack: None,
                chunks: vec![(*id, whole(*hash, encoding, &payload), payload)],
            }
        }
        [..] => {
            let (encoding, payload) = encoder.encode_pack(bytes)?;
            let pack = pack_id();
            let record = whole(crate::sha256(bytes), encoding, &payload);
            let ends = members
                .iter()
                .skip(1)
                .map(|m| m.2)
                .chain([bytes.len() as u32]);
            let chunks = members
                .iter()
                .zip(ends)
                .map(|(&(id, hash, offset), end)| {
                    let record = ChunkRecord {
                        hash,
                        len: end - offset,
                        encoding: ChunkEncoding::Packed { pack, offset },
                        stored_len: 0,
                        at: None,
                    };
                    (id, record, Vec::new())
                })
                .collect();
            Sealed {
                pack: Some((pack, record, payload)),
                chunks,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_pack_names_where_each_member_lies() {
        let mut builder = PackBuilder::default();
        let members: [&[u8]; 3] = [b"first member ", b"", b"the third, and last"];
        for (i, m) in members.iter().enumerate() {
            assert!(builder.fits(m.len()));
            builder.push(10 + i as u64, crate::sha256(m), m);
        }
        let sealed = builder.seal(&BaseEncoder::new(None), || 99).expect("seals");
        assert!(builder.is_empty());
        assert_eq!(sealed.chunks.len(), 3);
        let (pack, record, _) = sealed.pack.as_ref().expect("a pack");
        assert_eq!(*pack, 99);
        let whole = members.concat();
        assert_eq!(record.hash, crate::sha256(&whole));
        assert_eq!(record.len as usize, whole.len());
        for (i, (id, record, payload)) in sealed.chunks.iter().enumerate() {
            assert_eq!(*id, 10 + i as u64);
            assert!(payload.is_empty());
            let ChunkEncoding::Packed { pack, offset } = record.encoding else {
                panic!("member {id} is {:?}", record.encoding);
            };
            assert_eq!(pack, 99);
            let at = offset as usize;
            assert_eq!(&whole[at..at + record.len as usize], members[i]);
            assert_eq!(record.hash, crate::sha256(members[i]));
        }
    }

    #[test]
    fn a_lone_member_is_an_ordinary_base() {
        let mut builder = PackBuilder::default();
        builder.push(5, crate::sha256(b"alone"), b"alone");
        let sealed = builder
            .seal(&BaseEncoder::new(None), || panic!("no pack id for one"))
            .expect("seals");
        assert!(sealed.pack.is_none());
        assert_eq!(sealed.chunks.len(), 1);
        assert_eq!(sealed.chunks[0].0, 5);
        assert!(sealed.chunks[0].1.pack().is_none());
        let empty = builder.seal(&BaseEncoder::new(None), || 1).expect("seals");
        assert!(empty.pack.is_none() && empty.chunks.is_empty());
    }

    #[test]
    fn a_pack_never_holds_more_than_its_limit() {
        let builder = PackBuilder::default();
        assert!(builder.fits(PACK_BYTES));
        assert!(!builder.fits(PACK_BYTES + 1));
        assert!(PackBuilder::packable(MEMBER_MAX_BYTES));
        assert!(!PackBuilder::packable(MEMBER_MAX_BYTES + 1));
    }
}
