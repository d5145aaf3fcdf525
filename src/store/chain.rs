//! The hash chain: the canonical encoding of a record and its hash.
//!
//! The format is specified in the [module documentation](super). The writer, the
//! start-up check and the verifier ([`super::verify`]) share [`record_hash`], which
//! encodes SQLite values exactly as stored, so what is verified is what is on disk,
//! not a re-interpretation of it. Pure: nothing here opens a connection.

use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

/// Column list of `records` in table order (the chain's field order, `hash` last).
pub(crate) const RECORD_COLUMNS: &str = "seq, received_at_ms, peer, session, direction, kind, raw, \
     dialect, st, cn, mn, qn, data_time, verdict, duplicate, findings, doc, hash";

/// The `prev_hash` of the first record.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Number of hashed columns (every column of `records` except `hash`).
pub(crate) const HASHED_COLUMNS: usize = 17;

/// The 17 hashed values of a record in table order, from any struct with the
/// record's field names (`NewRecord` as the writer stores it, `StoredRecord` as
/// read back): one list, so the writer and the Merkle leaf cannot disagree on it.
macro_rules! hashed_values {
    ($rec:expr, $seq:expr, $duplicate:expr) => {{
        use rusqlite::types::ValueRef;
        fn text(s: &Option<String>) -> ValueRef<'_> {
            s.as_deref()
                .map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes()))
        }
        let rec = $rec;
        [
            ValueRef::Integer($seq as i64),
            ValueRef::Integer(rec.received_at_ms),
            ValueRef::Text(rec.peer.as_bytes()),
            ValueRef::Integer(rec.session as i64),
            ValueRef::Text(rec.direction.as_str().as_bytes()),
            ValueRef::Text(rec.kind.as_str().as_bytes()),
            ValueRef::Blob(&rec.raw[..]),
            text(&rec.dialect),
            text(&rec.st),
            text(&rec.cn),
            text(&rec.mn),
            text(&rec.qn),
            text(&rec.data_time),
            ValueRef::Text(rec.verdict.as_str().as_bytes()),
            ValueRef::Integer(i64::from($duplicate)),
            ValueRef::Text(rec.findings.as_bytes()),
            ValueRef::Text(if rec.doc_stored {
                rec.doc.as_bytes()
            } else {
                b""
            }),
        ]
    }};
}
pub(crate) use hashed_values;

/// `SHA-256(prev || enc(c0) || ... || enc(c16))`; `None` if a value cannot be encoded
/// (a REAL, or longer than 4 GiB: neither can occur in an unaltered file).
pub(crate) fn record_hash(
    prev: &[u8; 32],
    cols: &[ValueRef<'_>; HASHED_COLUMNS],
) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(prev);
    encode(cols, |b| h.update(b))?;
    Some(h.finalize().into())
}

/// The record's Merkle leaf hash, RFC 6962 section 2.1: `SHA-256(0x00 || leaf)`, where
/// the leaf is the canonical encoding `enc(c0) || ... || enc(c16)` (what the chain
/// hashes after `prev`). `None` exactly when [`record_hash`] is `None`.
pub(crate) fn leaf_hash(cols: &[ValueRef<'_>; HASHED_COLUMNS]) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update([0x00]);
    encode(cols, |b| h.update(b))?;
    Some(h.finalize().into())
}

/// The chain hash and the leaf hash of one record (the writer's hot path): its
/// values are encoded once into `scratch` (reused across records), then hashed
/// twice in one piece each, where feeding both hashers the encoding's 34 small
/// pieces paid for buffering each piece twice.
pub(crate) fn record_and_leaf_hash(
    prev: &[u8; 32],
    cols: &[ValueRef<'_>; HASHED_COLUMNS],
    scratch: &mut Vec<u8>,
) -> Option<([u8; 32], [u8; 32])> {
    scratch.clear();
    encode(cols, |b| scratch.extend_from_slice(b))?;
    let mut chain = Sha256::new();
    chain.update(prev);
    chain.update(&scratch[..]);
    let mut leaf = Sha256::new();
    leaf.update([0x00]);
    leaf.update(&scratch[..]);
    Some((chain.finalize().into(), leaf.finalize().into()))
}

/// The canonical encoding itself: the Merkle leaf that proofs carry, so that a
/// verifier can hash it and read the record's values back out of it.
pub(crate) fn leaf_bytes(cols: &[ValueRef<'_>; HASHED_COLUMNS]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    encode(cols, |b| out.extend_from_slice(b))?;
    Some(out)
}

/// Feeds `enc(c0) || ... || enc(c16)` to `sink` piece by piece (format in the module
/// documentation of [`super`]).
pub(crate) fn encode(
    cols: &[ValueRef<'_>; HASHED_COLUMNS],
    mut sink: impl FnMut(&[u8]),
) -> Option<()> {
    for v in cols {
        match *v {
            ValueRef::Null => sink(&u32::MAX.to_be_bytes()),
            ValueRef::Integer(i) => {
                sink(&8u32.to_be_bytes());
                sink(&i.to_be_bytes());
            }
            ValueRef::Text(b) | ValueRef::Blob(b) => {
                let len = u32::try_from(b.len()).ok().filter(|&l| l != u32::MAX)?;
                sink(&len.to_be_bytes());
                sink(b);
            }
            ValueRef::Real(_) => return None,
        }
    }
    Some(())
}

/// The chain head recorded in `meta`: the last committed `seq` and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Last committed seq (0 for an empty log).
    pub last_seq: u64,
    /// Its hash (32 zero bytes for an empty log).
    pub last_hash: [u8; 32],
}

/// The 17 hashed values and the stored hash of a `SELECT {RECORD_COLUMNS}` row.
pub(crate) fn row_values<'r>(
    row: &'r rusqlite::Row<'_>,
) -> rusqlite::Result<([ValueRef<'r>; HASHED_COLUMNS], ValueRef<'r>)> {
    let mut vals = [ValueRef::Null; HASHED_COLUMNS];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = row.get_ref(i)?;
    }
    Ok((vals, row.get_ref(HASHED_COLUMNS)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vector, computed independently (Python `hashlib` + `struct`) from the
    /// format in the module documentation. Covers NULL, empty text, integers, a
    /// non-UTF-8 blob with NUL, and the zero genesis hash.
    #[test]
    fn known_answer_vector() {
        let cols: [ValueRef<'_>; HASHED_COLUMNS] = [
            ValueRef::Integer(1),
            ValueRef::Integer(1_795_870_701_123),
            ValueRef::Text(b"1.2.3.4:5678"),
            ValueRef::Integer(7),
            ValueRef::Text(b"in"),
            ValueRef::Text(b"frame"),
            ValueRef::Blob(b"##\x00\xff\r\n"),
            ValueRef::Text(b"2017"),
            ValueRef::Null,
            ValueRef::Text(b"2011"),
            ValueRef::Text(b"MN1"),
            ValueRef::Text(b""),
            ValueRef::Null,
            ValueRef::Text(b"rejected"),
            ValueRef::Integer(1),
            ValueRef::Text(b"[]"),
            ValueRef::Text(br#"{"a":12.50}"#),
        ];
        assert_eq!(
            hex::encode(record_hash(&GENESIS, &cols).unwrap()),
            "122cd997a3874991de2dc58355733f5dd7216e4c3fdc50785d4f1f534d63d69e"
        );
    }

    #[test]
    fn null_and_empty_text_differ_and_reals_are_refused() {
        let mut cols = [ValueRef::Null; HASHED_COLUMNS];
        let with_null = record_hash(&GENESIS, &cols).unwrap();
        cols[8] = ValueRef::Text(b"");
        assert_ne!(record_hash(&GENESIS, &cols).unwrap(), with_null);
        cols[8] = ValueRef::Real(1.0);
        assert_eq!(record_hash(&GENESIS, &cols), None);
    }

    #[test]
    fn the_leaf_is_the_chain_encoding_without_prev() {
        let cols = [ValueRef::Integer(3), ValueRef::Text(b"x"), ValueRef::Null]
            .into_iter()
            .cycle()
            .take(HASHED_COLUMNS)
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        let leaf = leaf_bytes(&cols).unwrap();
        let mut chained = GENESIS.to_vec();
        chained.extend_from_slice(&leaf);
        let (chain, leaf_h) = record_and_leaf_hash(&GENESIS, &cols, &mut Vec::new()).unwrap();
        assert_eq!(chain, <[u8; 32]>::from(Sha256::digest(&chained)));
        assert_eq!(chain, record_hash(&GENESIS, &cols).unwrap());
        let mut prefixed = vec![0u8];
        prefixed.extend_from_slice(&leaf);
        assert_eq!(leaf_h, <[u8; 32]>::from(Sha256::digest(&prefixed)));
        assert_eq!(leaf_h, leaf_hash(&cols).unwrap());
    }

    #[test]
    fn the_previous_hash_is_chained() {
        let cols = [ValueRef::Integer(1); HASHED_COLUMNS];
        assert_ne!(record_hash(&GENESIS, &cols), record_hash(&[1; 32], &cols));
    }
}
