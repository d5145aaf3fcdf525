//! The daemon's archiver: seals the log's complete periods (`[store] seal_every`),
//! applies `[store] retain`, and keeps the store-size gauges current.
//!
//! It only calls [`store::archive::maintain`] on a blocking thread: once at start
//! (which also finishes whatever a crash interrupted) and then every
//! [`MAINTAIN_EVERY`]. A seal reads and deletes in small transactions, so the
//! writer is never held up for long; a failed run is logged and tried again at
//! the next one. Sizes are refreshed every [`SIZES_EVERY`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::evidence::key::SigningKey;
use crate::metrics::Metrics;
use crate::store::archive::{self, ArchivePolicy};

/// How often complete periods are looked for. A period is at least a minute
/// long and usually days: an hour late is nothing, and the look is one query.
pub const MAINTAIN_EVERY: Duration = Duration::from_secs(3600);

/// How often `hj212_store_size_bytes` and its neighbours are refreshed.
pub const SIZES_EVERY: Duration = Duration::from_secs(60);

/// Runs until `shutdown`. `key` signs the tombstones retention leaves; without it
/// retention refuses to delete (and says so) while sealing goes on.
pub async fn run(
    db: PathBuf,
    policy: ArchivePolicy,
    key: Option<Arc<SigningKey>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut sizes = tokio::time::interval(SIZES_EVERY);
    sizes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seal = tokio::time::interval(MAINTAIN_EVERY);
    seal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let maintain = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = seal.tick() => true,
            _ = sizes.tick() => false,
        };
        let (db, key, metrics) = (db.clone(), key.clone(), Arc::clone(&metrics));
        let done = tokio::task::spawn_blocking(move || {
            let report = maintain.then(|| {
                let now = chrono::Utc::now().timestamp_millis();
                let signer = key.as_deref().map(|k| k as &dyn signed_note::Signer);
                archive::maintain(&db, &policy, now, signer)
            });
            (report, archive::refresh_metrics(&db, &metrics))
        })
        .await;
        match done {
            Ok((report, sizes)) => {
                match report {
                    Some(Ok(r)) => {
                        for a in &r.sealed {
                            tracing::info!(
                                first_seq = a.first_seq,
                                last_seq = a.last_seq,
                                bytes = a.bytes,
                                file = %a.file,
                                "period sealed into an archive"
                            );
                        }
                        for a in &r.deleted {
                            tracing::info!(
                                first_seq = a.first_seq,
                                last_seq = a.last_seq,
                                file = %a.file,
                                "archive past [store] retain deleted; its signed tombstone stays"
                            );
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "archiving failed; retrying in an hour");
                    }
                    None => {}
                }
                if let Err(e) = sizes {
                    crate::log_repeated!(warn, error = %e, "store sizes not read");
                }
            }
            Err(e) => tracing::error!(error = %e, "archiver task failed"),
        }
    }
}
