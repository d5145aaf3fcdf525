//! What every task of the daemon shares: the configuration, the device
//! registry, the frame log's handle, MN ownership, device presence and the
//! metrics registry.
//!
//! Sessions, the upstream forwarders, the control socket and `/metrics` all
//! hold one `Arc<App>`; none of them reaches into another's module for it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::presence::Presence;
use crate::registry::SharedRegistry;
use crate::store::StoreHandle;

pub mod sessions;

pub use sessions::{SessionEntry, SessionMap};

/// Everything the daemon's tasks share.
#[derive(Debug)]
pub struct App {
    /// Loaded configuration.
    pub cfg: Config,
    /// Device registry (reloadable).
    pub registry: Arc<SharedRegistry>,
    /// Frame log.
    pub store: StoreHandle,
    /// MN ownership.
    pub sessions: SessionMap,
    /// Session ids.
    pub next_id: AtomicU64,
    /// Device presence for the MQTT publisher (`None` when it is disabled).
    pub presence: Option<Arc<Presence>>,
    /// This gateway's metrics: what `/metrics` renders. The store writer, the
    /// commit feed and the log's consumers count in the same registry (the daemon
    /// hands it to each at start), so two gateways in one process count apart.
    pub metrics: Arc<Metrics>,
    /// The latest signed checkpoint (`/checkpoint`) and the notary's counters.
    pub checkpoint: Arc<crate::notary::Latest>,
}

/// The name the daemon's modules have always used for [`App`].
pub type Shared = App;
