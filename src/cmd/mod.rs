//! Command implementations behind the CLI.

pub mod decode;
