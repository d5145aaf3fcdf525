//! hj212-gateway: the front door of a pollution-source monitoring network.
//!
//! (crate documentation is completed as modules land)

pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod store;
