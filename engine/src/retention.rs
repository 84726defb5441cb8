//! The retention job (`retention:` in the configuration, off by default): deletes closed contacts, drops the raw
//! bytes of old mail, and deletes old events, each once it is older than its configured age.
//!
//! It runs on every instance. Each batch is one short transaction of at most `batch_size` rows, so it never holds
//! locks for long; deletes are guarded by the state they expect (a contact must still be closed), and on PostgreSQL
//! candidate contacts are taken with `SKIP LOCKED`, so instances running at once share the work instead of
//! waiting on each other. The configuration is read at every pass, so a reload changes the ages at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mailqueue_config::Retention;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    engine::Engine,
    error::Result,
    store::{self, events::NewEvent},
};

/// How far back a raw-bytes pass re-scans what the previous pass covered: contacts whose close committed late.
const RAW_OVERLAP: Duration = Duration::from_secs(3600);

/// How often a raw-bytes pass scans every old closed contact again instead of only the recently closed ones: it
/// catches replies that were still being sent when their contact was first scanned.
const RAW_FULL_SCAN: Duration = Duration::from_secs(24 * 3600);

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Closed contacts deleted, with their messages, attachments and outbox rows.
    pub contacts: u64,
    /// Messages whose raw bytes were dropped.
    pub raw_messages: u64,
    /// Events deleted.
    pub events: u64,
}

impl Pass {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// State kept between passes of one instance.
#[derive(Debug, Default)]
pub struct Job {
    /// Contacts closed before this had their raw bytes dropped by an earlier complete pass; the next pass looks
    /// only at contacts closed since (less [`RAW_OVERLAP`]). Unknown at start: a full scan.
    raw_done: Option<RawDone>,
}

/// How far a complete raw-bytes pass got.
#[derive(Debug, Clone, Copy)]
struct RawDone {
    /// The `retention.raw_messages` it ran with; another age starts over.
    age: Duration,
    /// Contacts closed before this were covered.
    before: DateTime<Utc>,
    /// When the last full scan ran.
    full_scan_at: DateTime<Utc>,
}

impl Job {
    /// Runs one pass of `retention` as of `now`, batch after batch until each kind of data is done or `stop` is
    /// cancelled.
    pub async fn pass(
        &mut self,
        engine: &Engine,
        retention: &Retention,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<Pass> {
        let batch = retention.batch_size.max(1);
        let mut pass = Pass::default();
        if let Some(age) = retention.closed_contacts {
            let before = cutoff(now, age.0);
            pass.contacts = in_batches(batch, stop, move || async move {
                delete_closed_contacts(engine, before, batch).await
            })
            .await?;
        }
        if let Some(age) = retention.raw_messages {
            pass.raw_messages = self.drop_raw(engine, age.0, now, batch, stop).await?;
        }
        if let Some(age) = retention.events {
            let before = cutoff(now, age.0);
            pass.events = in_batches(batch, stop, move || async move {
                let txn = store::begin_write(&engine.db).await?;
                let n = store::events::delete_before(&txn, before, batch).await?;
                txn.commit().await?;
                Ok(n)
            })
            .await?;
        }
        Ok(pass)
    }

    /// Drops the raw bytes of the messages of contacts closed more than `age` ago: only of those closed since the
    /// previous complete pass, except for a full scan once a day.
    async fn drop_raw(
        &mut self,
        engine: &Engine,
        age: Duration,
        now: DateTime<Utc>,
        batch: u32,
        stop: &CancellationToken,
    ) -> Result<u64> {
        let before = cutoff(now, age);
        let done = self
            .raw_done
            .filter(|d| d.age == age && now < d.full_scan_at + RAW_FULL_SCAN);
        let since = done.map(|d| cutoff(d.before, RAW_OVERLAP));
        let dropped = in_batches(batch, stop, move || async move {
            let txn = store::begin_write(&engine.db).await?;
            let n = store::messages::drop_raw_of_closed(&txn, before, since, batch).await?;
            txn.commit().await?;
            Ok(n)
        })
        .await?;
        if !stop.is_cancelled() {
            self.raw_done = Some(RawDone {
                age,
                before,
                full_scan_at: done.map_or(now, |d| d.full_scan_at),
            });
        }
        Ok(dropped)
    }
}

/// Runs `batch_fn` (one transaction of at most `batch` rows, returning how many it handled) until a batch comes back
/// short or `stop` is cancelled; returns the total.
async fn in_batches<F>(
    batch: u32,
    stop: &CancellationToken,
    mut batch_fn: impl FnMut() -> F,
) -> Result<u64>
where
    F: std::future::Future<Output = Result<u64>>,
{
    let mut total = 0;
    while !stop.is_cancelled() {
        let n = batch_fn().await?;
        total += n;
        if n < u64::from(batch) {
            break;
        }
    }
    Ok(total)
}

/// `now - age`, or the beginning of time when the age reaches beyond it.
fn cutoff(now: DateTime<Utc>, age: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Deletes one batch of contacts closed before `before`, children first, with a `contact.deleted` event each, in
/// one transaction. Returns how many contacts it deleted.
async fn delete_closed_contacts(engine: &Engine, before: DateTime<Utc>, batch: u32) -> Result<u64> {
    let txn = store::begin_write(&engine.db).await?;
    let contacts = store::contacts::lock_closed_before(&txn, before, batch).await?;
    if contacts.is_empty() {
        txn.rollback().await?;
        return Ok(0);
    }
    let ids: Vec<i64> = contacts.iter().map(|c| c.id).collect();
    store::attachments::delete_for_contacts(&txn, &ids).await?;
    store::outbox::delete_for_contacts(&txn, &ids).await?;
    store::messages::delete_for_contacts(&txn, &ids).await?;
    let deleted = store::contacts::delete_closed(&txn, &ids).await?;
    let dir = engine.queues().await;
    let queue_names: Vec<Option<String>> = contacts
        .iter()
        .map(|c| dir.by_id(c.queue_id).map(|q| q.name.clone()))
        .collect();
    let events: Vec<NewEvent<'_>> = contacts
        .iter()
        .zip(&queue_names)
        .map(|(c, queue)| NewEvent {
            kind: "contact.deleted",
            contact_id: Some(c.id),
            queue: queue.as_deref(),
            actor: Some("retention"),
            data: json!({ "reason": "retention.closed_contacts", "closed_before": before }),
        })
        .collect();
    store::events::insert_many(&txn, &events).await?;
    txn.commit().await?;
    engine.events_appended();
    Ok(deleted)
}

/// Runs passes until `stop` is cancelled: one soon after start, then every `retention.interval`, and one after
/// each configuration reload (which may have changed the ages). Does nothing while no age is configured.
pub async fn run(engine: Engine, stop: CancellationToken) {
    let mut job = Job::default();
    let mut changes = engine.config_changes();
    loop {
        let retention = engine.config().await.retention.clone();
        if retention.is_enabled() {
            let span = tracing::info_span!("retention");
            async {
                match job.pass(&engine, &retention, Utc::now(), &stop).await {
                    Ok(pass) if pass.is_empty() => tracing::debug!("retention pass: nothing to delete"),
                    Ok(pass) => tracing::info!(
                        contacts = pass.contacts,
                        raw_messages = pass.raw_messages,
                        events = pass.events,
                        "retention pass: deleted {} closed contact(s), the raw bytes of {} message(s), {} event(s)",
                        pass.contacts,
                        pass.raw_messages,
                        pass.events,
                    ),
                    Err(e) => tracing::warn!(error = %e, "retention pass failed; retrying at the next interval"),
                }
            }
            .instrument(span)
            .await;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(retention.interval.0) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    // The engine is gone; nothing left to follow.
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_saturates_at_the_beginning_of_time() {
        let now = Utc::now();
        assert_eq!(
            cutoff(now, Duration::from_secs(60)),
            now - chrono::Duration::seconds(60)
        );
        assert_eq!(cutoff(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
    }

    #[test]
    fn retention_is_off_by_default() {
        let r = Retention::default();
        assert!(!r.is_enabled());
        assert_eq!(r.batch_size, 1000);
        assert_eq!(r.interval.0, Duration::from_secs(3600));
    }
}
