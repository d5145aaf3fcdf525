//! The `plan_record` fuzz entry point in every `cargo test`: its committed seeds,
//! then a few thousand generated hostile records (deterministic), each planned
//! for MQTT and an upstream (see `hj212_gateway::fuzzing::plan`).

use hj212_gateway::fuzzing::plan_record;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
        from[(self.next() % from.len() as u64) as usize]
    }
}

#[test]
fn seeds_replay() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus-seed/plan_record");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("seed corpus") {
        plan_record(&std::fs::read(entry.expect("entry").path()).expect("seed"));
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds");
}

#[test]
fn hostile_records_are_published_validly_or_refused_with_a_reason() {
    // Pieces an attacker controls: MN/CN text (wildcards, separators, control
    // characters, non-characters, NUL, long), docs (large, split, broken) and raw bytes.
    let levels: &[&[u8]] = &[
        b"010000A8900016F000000001",
        b"AB\x01CD",
        b"a/b",
        b"+",
        b"#",
        b"\x00",
        b"\x7f",
        "\u{85}x".as_bytes(),
        "\u{fffe}".as_bytes(),
        "\u{fdd0}".as_bytes(),
        "\u{10ffff}".as_bytes(),
        b"",
        b"2011",
        b"\xc3\x28",
    ];
    let docs: &[&[u8]] = &[
        b"{}",
        b"{\"pno\":1,\"pnum\":4294967295}",
        b"{\"broken\":",
        b"{\"raw\":1}",
        b"[]",
        b"",
    ];
    let findings: &[&[u8]] = &[
        b"[]",
        b"[{\"code\":\"x.y\",\"severity\":\"info\",\"detail\":\"d\\u0001\"}]",
        b"[{\"code\":",
        b"not json",
        b"[1,2]",
    ];
    const FRAME: &[u8] = b"##0101QN=20261128130501001;ST=32;CN=2011;PW=123456;MN=M1;Flag=5;\
CP=&&DataTime=20261128130501;a01012-Rtd=12.50,a01012-Flag=N&&ABCD\r\n";
    let mut rng = Rng(0x5EED_0F18);
    for i in 0..5000u32 {
        let mut data = vec![
            rng.next() as u8,
            rng.next() as u8,
            (rng.next() % 4) as u8,
            i as u8,
        ];
        for _ in 0..1 + rng.next() % 3 {
            data.extend_from_slice(rng.pick(levels));
        }
        data.push(0xFF);
        data.extend_from_slice(rng.pick(levels));
        data.push(0xFF);
        data.extend_from_slice(rng.pick(docs));
        if rng.next() % 8 == 0 {
            // A large doc: over most generated packet limits.
            data.extend(std::iter::repeat_n(b' ', (rng.next() % 70_000) as usize));
        }
        data.push(0xFF);
        // Findings as written, and as an altered file may hold them (an empty
        // doc is rebuilt from the raw bytes and these).
        data.extend_from_slice(rng.pick(findings));
        data.push(0xFF);
        if rng.next() % 2 == 0 {
            data.extend_from_slice(FRAME);
        } else {
            for _ in 0..rng.next() % 64 {
                data.push(rng.next() as u8);
            }
        }
        plan_record(&data);
    }
}
