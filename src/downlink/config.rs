//! `[downlink]` is defined with the other sections in [`crate::config`], which
//! imports nothing from the modules that read it; the name is re-exported here
//! for code that takes it from the downlink module.

pub use crate::config::DownlinkSection;
