//! Evidence a third party can check: the signing key, signed checkpoints and
//! witness cosignatures, independent of the store.
//!
//! The hash chain in [`crate::store`] catches a naive edit, but whoever can write
//! `frames.db` can re-chain it. What closes that gap is a statement about the log
//! that leaves the machine and that the machine cannot later take back: a
//! *checkpoint* (the log's origin, tree size and Merkle root, per C2SP
//! `tlog-checkpoint`) signed with a key only the gateway holds (C2SP
//! `signed-note`, Ed25519), published, and ideally cosigned by independent
//! *witnesses* (C2SP `tlog-witness`, `tlog-cosignature`) that refuse to sign a
//! tree inconsistent with one they saw before.
//!
//! This module holds only the primitives; the store builds the tree and the
//! daemon decides when to cut and where to publish:
//! - [`key`]: the signing key file (`checkpoint.key`, mode 0600) and its
//!   verifier key.
//! - [`checkpoint`]: builds, signs, parses and verifies checkpoint notes.
//! - [`witness`]: the `add-checkpoint` client, with cosignature verification.
//!
//! Formats follow the C2SP specifications byte for byte, so stock tools (Go's
//! `golang.org/x/mod/sumdb/note`, any tlog witness) read what we write.

pub mod checkpoint;
pub mod key;
pub mod witness;
