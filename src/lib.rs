//! hj212-gateway: the front door of a pollution-source monitoring network.
//!
//! (crate documentation is completed as modules land)

pub mod cli;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod systemd;
pub mod telemetry;
