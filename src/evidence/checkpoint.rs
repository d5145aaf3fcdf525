//! Signed checkpoints: the log's tree head as a C2SP `tlog-checkpoint` signed
//! note.
//!
//! ```text
//! hj212-gateway/gw-01
//! 20852163
//! CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=
//!
//! — hj212-gateway/gw-01 Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=
//! ```
//!
//! [`sign`] makes one; [`open`] parses one and verifies it against the verifier
//! keys the caller trusts; [`parse_unverified`] only parses (for a note whose key
//! is not at hand) and says so in [`Checkpoint::verified_by`]. A note is text
//! from outside: it is refused above [`MAX_NOTE_BYTES`], and a tree size above
//! [`MAX_TREE_SIZE`] (SQLite's and the store's integers are signed 64-bit).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use signed_note::{Note, NoteError, Signature, StandardVerifier, Verifier, VerifierList};

/// The largest note [`open`] and [`parse_unverified`] read: the `signed_note`
/// crate's own limit (1,000,000 bytes, just under 1 MiB). A checkpoint with a few
/// dozen cosignatures is under 10 KB.
pub const MAX_NOTE_BYTES: usize = 1_000_000;

/// The largest tree size accepted: 2^63 - 1, so a size always fits the store's
/// signed 64-bit integers.
pub const MAX_TREE_SIZE: u64 = i64::MAX as u64;

/// A parsed checkpoint note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The origin line: the log's identity (the gateway uses its key name).
    pub origin: String,
    /// The tree size: the number of leaves (records).
    pub size: u64,
    /// The RFC 6962 Merkle tree root hash at `size`.
    pub root: [u8; 32],
    /// The note text (the checkpoint body with its extension lines, if any),
    /// ending in a newline: what signatures and cosignatures sign.
    pub text: String,
    /// The whole signed note: text, blank line, signature lines.
    pub note: String,
    /// The keys (`name+hex id`) whose signatures were verified; empty when the
    /// note came from [`parse_unverified`] and NOT verified.
    pub verified_by: Vec<String>,
    /// Every signature line's key (`name+hex id`), verified or not, in note order.
    pub signers: Vec<String>,
}

impl Checkpoint {
    /// True when at least one signature was verified against a trusted key.
    pub fn is_verified(&self) -> bool {
        !self.verified_by.is_empty()
    }
}

/// Why a checkpoint could not be made, parsed or verified.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The note is larger than [`MAX_NOTE_BYTES`].
    #[error("checkpoint note is {len} bytes, more than the {max} accepted")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The note breaks the signed-note format.
    #[error("not a signed note: {0}")]
    Note(String),
    /// The note text is not a checkpoint body.
    #[error("not a checkpoint: {0}")]
    Body(String),
    /// A verifier key given by the caller is malformed.
    #[error("verifier key {vkey:?}: {reason}")]
    BadVkey {
        /// The key as given.
        vkey: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No verifier key was given to [`open`].
    #[error("no verifier key given to check the checkpoint signature against")]
    NoVkeys,
    /// A signature from a trusted key does not verify: the note was altered or
    /// forged.
    #[error(
        "the signature of {key} does not verify: the checkpoint was altered or not signed by that key"
    )]
    BadSignature {
        /// `name+hex id` of the key.
        key: String,
    },
    /// No signature in the note is from a trusted key.
    #[error("the checkpoint is signed by none of the given keys (it is signed by: {})", signers.join(", "))]
    NotSigned {
        /// The keys that did sign it (`name+hex id`).
        signers: Vec<String>,
    },
    /// The origin cannot be written as a checkpoint's first line.
    #[error("origin {0:?} is invalid: it must be non-empty, one line, without control characters")]
    InvalidOrigin(String),
    /// The tree size is above [`MAX_TREE_SIZE`].
    #[error("tree size {0} is larger than 2^63 - 1")]
    SizeTooLarge(u64),
    /// The signer failed.
    #[error("signing the checkpoint failed: {0}")]
    Sign(String),
}

/// The checkpoint body `<origin>\n<size>\n<base64 root>\n` (C2SP
/// `tlog-checkpoint`, "Note text"), without extension lines.
pub fn body(origin: &str, size: u64, root: &[u8; 32]) -> Result<String, CheckpointError> {
    // "The origin MUST be non-empty"; a newline would make it two lines, and the
    // signed-note format forbids control characters anywhere.
    if origin.is_empty() || origin.chars().any(char::is_control) {
        return Err(CheckpointError::InvalidOrigin(origin.to_owned()));
    }
    if size > MAX_TREE_SIZE {
        return Err(CheckpointError::SizeTooLarge(size));
    }
    let c = tlog_tiles::Checkpoint::new(origin, size, tlog_tiles::Hash(*root), "")
        .map_err(|e| CheckpointError::Body(e.to_string()))?;
    String::from_utf8(c.to_bytes()).map_err(|_| CheckpointError::InvalidOrigin(origin.to_owned()))
}

/// Builds the checkpoint body for (`origin`, `size`, `root`) and signs it with
/// `signer`: the returned [`Checkpoint::note`] is the text to publish.
///
/// The origin should be the signer's key name (C2SP `tlog-checkpoint`: "The
/// log's key name in its signature line SHOULD match the origin line").
pub fn sign(
    signer: &dyn signed_note::Signer,
    origin: &str,
    size: u64,
    root: &[u8; 32],
) -> Result<Checkpoint, CheckpointError> {
    let text = body(origin, size, root)?;
    let mut note = Note::new(text.as_bytes(), &[]).map_err(note_error)?;
    note.add_sigs(&[signer])
        .map_err(|e| CheckpointError::Sign(e.to_string()))?;
    let note = String::from_utf8(note.to_bytes())
        .map_err(|_| CheckpointError::Sign("note is not UTF-8".into()))?;
    let key = key_label(signer.name(), signer.key_id());
    Ok(Checkpoint {
        origin: origin.to_owned(),
        size,
        root: *root,
        text,
        note,
        verified_by: vec![key.clone()],
        signers: vec![key],
    })
}

/// Parses a checkpoint note and verifies it against `vkeys` (verifier keys,
/// `<name>+<hex id>+<base64(0x01 || public key)>`).
///
/// C2SP `signed-note`: "Verifiers MUST ignore signatures from unknown keys ...
/// If the key name and ID match a known key, verifiers MUST verify the
/// signature. If a signature from a known key fails to verify, clients SHOULD
/// reject the whole note. If no signature from a known key verifies
/// successfully, clients MUST reject the note." All three are enforced:
/// [`CheckpointError::BadSignature`], [`CheckpointError::NotSigned`].
pub fn open(note: &[u8], vkeys: &[&str]) -> Result<Checkpoint, CheckpointError> {
    if vkeys.is_empty() {
        return Err(CheckpointError::NoVkeys);
    }
    let parsed = parse_note(note)?;
    let mut verifiers: Vec<Box<dyn Verifier>> = Vec::with_capacity(vkeys.len());
    let mut seen = std::collections::BTreeSet::new();
    for vkey in vkeys {
        let v = StandardVerifier::new(vkey).map_err(|e| CheckpointError::BadVkey {
            vkey: (*vkey).to_owned(),
            reason: e.to_string(),
        })?;
        // The same key given twice would make the lookup "ambiguous".
        if seen.insert((v.name().to_owned(), v.key_id())) {
            verifiers.push(Box::new(v));
        }
    }
    let signers = signature_keys(note);
    let verified = match parsed.verify(&VerifierList::new(verifiers)) {
        Ok((verified, _unknown)) => verified,
        Err(NoteError::InvalidSignature { name, id }) => {
            return Err(CheckpointError::BadSignature {
                key: key_label(&name, id),
            });
        }
        Err(NoteError::UnverifiedNote) => return Err(CheckpointError::NotSigned { signers }),
        Err(e) => return Err(note_error(e)),
    };
    let mut c = checkpoint_from(note, &parsed, signers)?;
    c.verified_by = verified
        .iter()
        .map(|s| key_label(s.name(), s.id()))
        .collect();
    Ok(c)
}

/// Parses a checkpoint note WITHOUT verifying any signature (for a note whose
/// key is not at hand, e.g. to show what it claims). The result's
/// [`Checkpoint::verified_by`] is empty: nothing in it may be trusted.
pub fn parse_unverified(note: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let parsed = parse_note(note)?;
    checkpoint_from(note, &parsed, signature_keys(note))
}

fn parse_note(note: &[u8]) -> Result<Note, CheckpointError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(CheckpointError::TooLarge {
            len: note.len(),
            max: MAX_NOTE_BYTES,
        });
    }
    Note::from_bytes(note).map_err(note_error)
}

fn checkpoint_from(
    note: &[u8],
    parsed: &Note,
    signers: Vec<String>,
) -> Result<Checkpoint, CheckpointError> {
    let text = std::str::from_utf8(parsed.text())
        .map_err(|_| CheckpointError::Note("not UTF-8".into()))?;
    let (origin, size, root) = parse_body(text)?;
    Ok(Checkpoint {
        origin,
        size,
        root,
        text: text.to_owned(),
        // from_bytes accepted it, so it is UTF-8.
        note: String::from_utf8_lossy(note).into_owned(),
        verified_by: Vec::new(),
        signers,
    })
}

/// Parses a checkpoint note text (C2SP `tlog-checkpoint`, "Note text"):
///
/// > The note text is a sequence of at least three non-empty lines, separated by
/// > newlines (U+000A).
/// > 1. The first line is the **origin** ... The origin MUST be non-empty ...
/// > 2. The second line is the **tree size**, the ASCII decimal representation
/// >    of the number of leaves in the tree, with no leading zeroes (unless the
/// >    tree is empty, in which case the tree size is `0`).
/// > 3. The third line is the **root hash**, the base64 encoding of the root of
/// >    the RFC 6962 Merkle hash tree at the specified tree size.
/// > 4. Any following lines are **extension lines** ... Extension lines, if
/// >    any, MUST be non-empty.
fn parse_body(text: &str) -> Result<(String, u64, [u8; 32]), CheckpointError> {
    let bad = |why: String| CheckpointError::Body(why);
    let Some(text) = text.strip_suffix('\n') else {
        return Err(bad("the text does not end in a newline".into()));
    };
    let mut lines = text.split('\n');
    let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next()) else {
        return Err(bad(
            "fewer than three lines (origin, tree size, root hash)".into()
        ));
    };
    if origin.is_empty() {
        return Err(bad("the origin line is empty".into()));
    }
    let digits_ok = !size.is_empty()
        && size.bytes().all(|b| b.is_ascii_digit())
        && (size == "0" || !size.starts_with('0'));
    if !digits_ok || size.len() > 19 {
        return Err(bad(format!(
            "tree size {size:?} is not a decimal number without leading zeroes"
        )));
    }
    let size: u64 = size
        .parse()
        .map_err(|_| bad(format!("tree size {size:?} is out of range")))?;
    if size > MAX_TREE_SIZE {
        return Err(CheckpointError::SizeTooLarge(size));
    }
    let root_bytes = BASE64
        .decode(root)
        .map_err(|e| bad(format!("root hash {root:?} is not base64: {e}")))?;
    let root: [u8; 32] = root_bytes.as_slice().try_into().map_err(|_| {
        bad(format!(
            "root hash is {} bytes, expected 32",
            root_bytes.len()
        ))
    })?;
    if lines.any(str::is_empty) {
        return Err(bad("an extension line is empty".into()));
    }
    Ok((origin.to_owned(), size, root))
}

/// `name+hex id` of every signature line, for messages (unparseable lines are
/// already refused by `Note::from_bytes`).
fn signature_keys(note: &[u8]) -> Vec<String> {
    let Ok(s) = std::str::from_utf8(note) else {
        return Vec::new();
    };
    let Some((_, sigs)) = s.rsplit_once("\n\n") else {
        return Vec::new();
    };
    sigs.lines()
        .filter_map(|l| Signature::from_bytes(l.as_bytes()).ok())
        .map(|s| key_label(s.name(), s.id()))
        .collect()
}

fn key_label(name: &str, id: u32) -> String {
    format!("{name}+{id:08x}")
}

fn note_error(e: NoteError) -> CheckpointError {
    CheckpointError::Note(match e {
        NoteError::MalformedNote => "malformed (C2SP signed-note: a text ending in a newline, a blank line, then \
             one or more lines \"— <key name> <base64 signature>\"; UTF-8 without control characters)"
            .to_owned(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::key::SigningKey;

    // C2SP signed-note, "Verifier keys", "Example".
    const SPEC_VKEY: &str = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
    const SPEC_NOTE: &str = "This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";

    // C2SP tlog-checkpoint example (its key is not published: parse only).
    const SPEC_CHECKPOINT: &str = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n";

    fn key() -> SigningKey {
        SigningKey::from_seed("hj212-gateway/test", &[42u8; 32]).unwrap()
    }

    #[test]
    fn spec_signed_note_example_verifies_and_tampering_is_caught() {
        // The spec note's text is not a checkpoint, so check the signature layer
        // on its own with the same verifier path `open` uses.
        let n = Note::from_bytes(SPEC_NOTE.as_bytes()).unwrap();
        let v = StandardVerifier::new(SPEC_VKEY).unwrap();
        assert!(n.verify(&VerifierList::new(vec![Box::new(v)])).is_ok());
        let e = open(SPEC_NOTE.as_bytes(), &[SPEC_VKEY]).unwrap_err();
        assert!(matches!(e, CheckpointError::Body(_)), "{e}");
        let tampered = SPEC_NOTE.replace("example message", "example massage");
        let e = open(tampered.as_bytes(), &[SPEC_VKEY]).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::BadSignature { key } if key == "example.com/foo+530d903a"),
            "{e}"
        );
    }

    #[test]
    fn spec_checkpoint_example_parses_unverified() {
        let c = parse_unverified(SPEC_CHECKPOINT.as_bytes()).unwrap();
        assert_eq!(c.origin, "example.com/behind-the-sofa");
        assert_eq!(c.size, 20852163);
        assert_eq!(
            BASE64.encode(c.root),
            "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
        );
        assert!(!c.is_verified());
        assert_eq!(c.signers.len(), 1);
        assert!(c.signers[0].starts_with("example.com/behind-the-sofa+"));
        assert_eq!(c.note, SPEC_CHECKPOINT);
        // With a key that did not sign it, `open` refuses and names the signer.
        let e = open(SPEC_CHECKPOINT.as_bytes(), &[SPEC_VKEY]).unwrap_err();
        assert!(
            e.to_string().contains("example.com/behind-the-sofa+"),
            "{e}"
        );
    }

    #[test]
    fn sign_writes_the_exact_c2sp_format_and_open_round_trips() {
        let k = key();
        let root = tlog_tiles::record_hash(b"leaf").0;
        let c = sign(k.signer(), k.name(), 7, &root).unwrap();
        let want_body = format!("hj212-gateway/test\n7\n{}\n", BASE64.encode(root));
        assert_eq!(c.text, want_body);
        assert!(
            c.note
                .starts_with(&format!("{want_body}\n— hj212-gateway/test "))
        );
        assert!(c.note.ends_with("\n") && c.note.lines().count() == 5);
        // The signature is base64(key id BE || 64-byte Ed25519 signature over the text).
        let sig_line = c.note.lines().last().unwrap();
        let raw = BASE64.decode(sig_line.rsplit(' ').next().unwrap()).unwrap();
        assert_eq!(raw.len(), 68);
        assert_eq!(raw[..4], k.key_id().to_be_bytes());
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&k.public_key()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&raw[4..]).unwrap();
        vk.verify_strict(want_body.as_bytes(), &sig).unwrap();
        // tlog_tiles reads the same body.
        let tc = tlog_tiles::Checkpoint::from_bytes(c.text.as_bytes()).unwrap();
        assert_eq!((tc.origin(), tc.size(), tc.hash().0), (k.name(), 7, root));

        let vkey = k.verifier_key();
        let o = open(c.note.as_bytes(), &[&vkey]).unwrap();
        assert_eq!(
            o.verified_by,
            vec![format!("hj212-gateway/test+{:08x}", k.key_id())]
        );
        assert_eq!((o.origin.as_str(), o.size, o.root), (k.name(), 7, root));
        assert_eq!(o.note, c.note);
        // Given twice, or next to an unrelated key: still fine.
        assert!(open(c.note.as_bytes(), &[&vkey, &vkey, SPEC_VKEY]).is_ok());
    }

    #[test]
    fn open_ignores_unknown_signatures_but_rejects_a_bad_known_one() {
        let k = key();
        let other = SigningKey::from_seed("witness.example/w1", &[1u8; 32]).unwrap();
        let c = sign(k.signer(), k.name(), 3, &[9u8; 32]).unwrap();
        let mut n = Note::from_bytes(c.note.as_bytes()).unwrap();
        n.add_sigs(&[other.signer()]).unwrap();
        let both = String::from_utf8(n.to_bytes()).unwrap();
        let o = open(both.as_bytes(), &[&k.verifier_key()]).unwrap();
        assert_eq!(o.signers.len(), 2);
        assert_eq!(o.verified_by.len(), 1);

        // Changing the size breaks the log's signature.
        let forged = c.note.replacen("\n3\n", "\n4\n", 1);
        let e = open(forged.as_bytes(), &[&k.verifier_key()]).unwrap_err();
        assert!(matches!(e, CheckpointError::BadSignature { .. }), "{e}");
        // Only an unknown key signed it.
        let e = open(c.note.as_bytes(), &[&other.verifier_key()]).unwrap_err();
        assert!(matches!(e, CheckpointError::NotSigned { .. }), "{e}");
        assert!(matches!(
            open(c.note.as_bytes(), &[]),
            Err(CheckpointError::NoVkeys)
        ));
        let e = open(c.note.as_bytes(), &["nope"]).unwrap_err();
        assert!(matches!(e, CheckpointError::BadVkey { .. }), "{e}");
    }

    #[test]
    fn body_grammar_is_enforced() {
        let k = key();
        let root = BASE64.encode([5u8; 32]);
        let sign_text = |text: &str| {
            let mut n = Note::new(text.as_bytes(), &[]).unwrap();
            n.add_sigs(&[k.signer()]).unwrap();
            n.to_bytes()
        };
        let vkey = k.verifier_key();
        let ok = [
            format!("o\n0\n{root}\n"),
            format!("o\n9223372036854775807\n{root}\n"),
            format!("o\n1\n{root}\next one\next two\n"),
        ];
        for t in &ok {
            assert!(open(&sign_text(t), &[&vkey]).is_ok(), "{t:?}");
        }
        let bad = [
            (format!("\n1\n{root}\n"), "origin"),
            (format!("o\n01\n{root}\n"), "leading zeroes"),
            (format!("o\n-1\n{root}\n"), "decimal"),
            (format!("o\n+1\n{root}\n"), "decimal"),
            (format!("o\n 1\n{root}\n"), "decimal"),
            (format!("o\n9223372036854775808\n{root}\n"), "2^63"),
            (format!("o\n99999999999999999999\n{root}\n"), "decimal"),
            ("o\n1\nAAAA\n".to_owned(), "expected 32"),
            ("o\n1\n!!\n".to_owned(), "base64"),
            ("o\n1\n".to_owned(), "three lines"),
        ];
        for (t, want) in &bad {
            let e = open(&sign_text(t), &[&vkey]).unwrap_err().to_string();
            assert!(e.contains(want), "{t:?}: {e}");
        }
        // An empty extension line cannot be signed at all: it would end the text.
        assert!(body("a\nb", 1, &[0; 32]).is_err());
        assert!(body("", 1, &[0; 32]).is_err());
        assert!(matches!(
            body("o", u64::MAX, &[0; 32]),
            Err(CheckpointError::SizeTooLarge(_))
        ));
    }

    #[test]
    fn notes_over_the_cap_are_refused_before_parsing() {
        let big = vec![b'a'; MAX_NOTE_BYTES + 1];
        assert!(matches!(
            parse_unverified(&big),
            Err(CheckpointError::TooLarge { .. })
        ));
        let e = parse_unverified(b"no signature here\n").unwrap_err();
        assert!(matches!(e, CheckpointError::Note(_)), "{e}");
    }
}
