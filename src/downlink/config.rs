//! `[downlink]`: the section now lives in [`crate::config`] with the others; this
//! path stays for the code that names it here.

pub use crate::config::DownlinkSection;
