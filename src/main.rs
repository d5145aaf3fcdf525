//! `hj212-gateway` binary (wired up as commands land).
fn main() {}
