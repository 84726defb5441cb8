//! The rescuer: a background service that returns contacts whose claim lease expired (the agent's client died or
//! stopped sending heartbeats) to their queues. Safe to run on every instance at once.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::Engine;

/// Runs until `stop` is cancelled, checking every `every`.
pub async fn run(engine: Engine, every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let span = tracing::info_span!("rescuer");
        async {
            match engine.rescue_expired(Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    rescued = n,
                    "returned contacts with expired leases to their queues"
                ),
                Err(e) => tracing::warn!(error = %e, "rescuer pass failed"),
            }
        }
        .instrument(span)
        .await;
    }
}
