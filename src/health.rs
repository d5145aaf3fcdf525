//! What `/healthz` reports besides the device listener and the frame log: the
//! long-running consumers of the log (MQTT publisher, upstream forwarders, alarm
//! detector).
//!
//! A consumer that ends while the gateway is not shutting down has stopped for
//! good: its cursor no longer moves, and nothing else would say so. Such a task
//! used to die with one ERROR line while `/healthz` kept answering 200; now the
//! gateway is reported unhealthy (503, naming the consumer) until it is restarted.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Consumers that stopped while the gateway was serving.
#[derive(Debug, Default)]
pub struct Health {
    stopped: Mutex<Vec<String>>,
}

impl Health {
    /// Records that `what` stopped.
    pub fn stopped(&self, what: String) {
        self.stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(what);
    }

    /// `None` while every consumer runs, else which ones stopped.
    pub fn problem(&self) -> Option<String> {
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!stopped.is_empty()).then(|| format!("consumer stopped: {}", stopped.join(", ")))
    }
}

/// Runs alongside consumer `task` (named `name`) and records in `health` when it
/// ends before `shutdown` is cancelled. Await the returned handle instead of `task`.
pub fn watch(
    name: String,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let ended = task.await;
        if shutdown.is_cancelled() {
            return;
        }
        let how = match ended {
            Err(e) if e.is_panic() => "panicked",
            _ => "ended",
        };
        tracing::error!(
            consumer = %name,
            how,
            "consumer stopped while the gateway serves: its cursor no longer moves and /healthz reports it; restart the gateway once the cause is fixed"
        );
        health.stopped(format!("{name} ({how})"));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer that ends (or panics) while serving is reported; one that ends
    /// because the gateway shuts down is not.
    #[tokio::test]
    async fn a_consumer_that_ends_while_serving_is_reported() {
        let shutdown = CancellationToken::new();
        let health = Arc::new(Health::default());
        assert_eq!(health.problem(), None);
        let ended = tokio::spawn(async {});
        watch(
            "alarm detector".into(),
            ended,
            shutdown.clone(),
            health.clone(),
        )
        .await
        .unwrap();
        let panicked = tokio::spawn(async { panic!("a record it cannot take") });
        watch("mqtt".into(), panicked, shutdown.clone(), health.clone())
            .await
            .unwrap();
        assert_eq!(
            health.problem().as_deref(),
            Some("consumer stopped: alarm detector (ended), mqtt (panicked)")
        );
        let calm = Arc::new(Health::default());
        let stop = shutdown.clone();
        let stopping = tokio::spawn(async move { stop.cancelled().await });
        shutdown.cancel();
        watch("upstream a".into(), stopping, shutdown, calm.clone())
            .await
            .unwrap();
        assert_eq!(calm.problem(), None);
    }
}
