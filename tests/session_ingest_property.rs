//! The session's ingest path (`hj212_gateway::fuzzing::ingest`) over the
//! committed seeds and a few thousand generated hostile sequences: the bounds
//! the fuzz target asserts hold in every `cargo test`.

use hj212_gateway::fuzzing::ingest::session_ingest;

#[test]
fn session_ingest_seeds_replay() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/corpus-seed/session_ingest"
    );
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("seed corpus") {
        session_ingest(&std::fs::read(entry.expect("entry").path()).expect("seed"));
        seen += 1;
    }
    assert!(seen >= 6, "only {seen} seeds");
}

/// xorshift64*: deterministic, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
}

/// Bytes a hostile stream is made of: header halves, digits, CP delimiters,
/// terminators, padding and binary.
const ALPHABET: &[u8] = b"####&&&;=0123456789\r\n\0 xAZ\xff";

/// One sequence of ops in the entry point's encoding, biased to what hurt:
/// `#` and `##` floods, frames for a few MNs from two addresses, closes and
/// clock steps past `idle_timeout`.
fn hostile(rng: &mut Rng) -> Vec<u8> {
    let mut d = vec![rng.byte()];
    let ops = 1 + rng.next() % 24;
    for _ in 0..ops {
        let slot = rng.byte() % 3;
        let kind = match rng.next() % 10 {
            0..=2 => 2, // `#` flood
            3 => 3,     // `##` junk flood
            4..=6 => 1, // frame
            7 => 0,     // chunk of hostile bytes
            8 => 4,     // close
            _ => 5,     // clock step
        };
        d.push(slot * 6 + kind);
        // Floods of up to ~1 KB each: several of them still cross the
        // smallest junk_record_bytes, at a debug build's pace.
        let arg = match kind {
            2 | 3 => rng.byte() % 64,
            _ => rng.byte(),
        };
        d.push(arg);
        if kind == 0 {
            for _ in 0..=arg {
                let b = ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize];
                d.push(b);
            }
        }
    }
    d
}

#[test]
fn generated_hostile_sequences_keep_the_bounds() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..2000 {
        let d = hostile(&mut rng);
        let r = std::panic::catch_unwind(|| session_ingest(&d));
        assert!(r.is_ok(), "sequence {i} failed: {d:?}");
    }
}

#[test]
fn entry_rejects_nothing() {
    session_ingest(&[]);
    session_ingest(&[0]);
    session_ingest(&[1, 0]);
    session_ingest(&[2, 2, 255, 2, 255, 1, 0, 4]);
}
