//! The event log read side: ordered, resumable reads with long polling. Events are appended by the operation
//! that causes them, in its own transaction (`store::events::insert`).
//!
//! Long polls wake on an append in this process (`Engine::events_appended`), on an append by any other instance
//! (PostgreSQL `NOTIFY`, sent after the commit by that instance's [`spawn_notifier`] and received by
//! [`spawn_listener`]), and every 250 ms as a fallback.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mailqueue_schema::entity::event;
use serde::Serialize;
use utoipa::ToSchema;

use crate::{engine::Engine, error::Result, store};

pub use store::events::NewEvent;

/// One event as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// Position in the log; resume with `after=<seq>`.
    pub seq: i64,
    /// E.g. `contact.created`, `contact.claimed`, `contact.closed`.
    pub kind: String,
    pub contact_id: Option<i64>,
    pub queue: Option<String>,
    /// Who caused it: an API token name, `ingest`, `rescuer`.
    pub actor: Option<String>,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl From<event::Model> for Event {
    fn from(m: event::Model) -> Self {
        Self {
            seq: m.seq.unwrap_or_default(),
            kind: m.kind,
            contact_id: m.contact_id,
            queue: m.queue,
            actor: m.actor,
            data: m.data,
            created_at: m.created_at,
        }
    }
}

/// Events after `after`, waiting up to `wait` for at least one. `visible` filters what the caller may see
/// (by queue name); filtered events still advance the position the caller resumes from.
pub async fn read(
    engine: &Engine,
    after: i64,
    limit: u64,
    wait: Duration,
    visible: impl Fn(&Event) -> bool,
) -> Result<(Vec<Event>, i64)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut position = after;
    loop {
        let notified = engine.events_notify().notified();
        if store::events::has_unsequenced(&engine.db).await? {
            store::events::sequence(&engine.db).await?;
        }
        let rows = store::events::after(&engine.db, position, limit).await?;
        if let Some(last) = rows.last() {
            position = last.seq.unwrap_or(position);
        }
        let events: Vec<Event> = rows
            .into_iter()
            .map(Event::from)
            .filter(|e| visible(e))
            .collect();
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok((events, position));
        }
        // Wake on an append here or (through LISTEN) on another instance; re-check periodically as a fallback.
        let tick = Duration::from_millis(250).min(deadline - tokio::time::Instant::now());
        let _ = tokio::time::timeout(tick, notified).await;
    }
}

/// The PostgreSQL channel every instance notifies after it committed events ([`spawn_notifier`]).
pub const CHANNEL: &str = "mailqueue_events";

/// The shortest time between two notifications of one instance: appends in between share one, so a busy instance
/// sends at most 100 a second, and another instance's readers learn of an append at most this much later.
const NOTIFY_GAP: Duration = Duration::from_millis(10);

/// PostgreSQL: starts this instance's notifier and returns the sender that asks it for a `NOTIFY` on [`CHANNEL`]
/// (`Engine::events_appended` does, after each commit that appended events); `None` on SQLite, where the one
/// instance wakes its readers in process.
///
/// The NOTIFY goes out after the commit, in a transaction of its own, never inside the writing transaction:
/// PostgreSQL serialises the commits of all transactions that sent a NOTIFY on one global lock held across the WAL
/// flush, so a NOTIFY in each claim capped the database at one commit per disk flush (880 claims/s instead of
/// 1,741 on the project's 2-core machine). Requests made while one is under way fold into the next. A lost
/// notification costs latency, never an event: readers re-check every 250 ms. The task ends with the last engine
/// handle (the sender).
pub(crate) fn spawn_notifier(
    db: &sea_orm::DatabaseConnection,
    backend: store::Backend,
) -> Option<tokio::sync::mpsc::Sender<()>> {
    if backend != store::Backend::Postgres {
        return None;
    }
    let (requests, mut pending) = tokio::sync::mpsc::channel(1);
    let db = db.clone();
    tokio::spawn(async move {
        while pending.recv().await.is_some() {
            if let Err(e) = store::events::notify(&db, CHANNEL).await {
                tracing::debug!(error = %e, "cannot notify other instances of new events; their readers re-check within 250 ms");
            }
            tokio::time::sleep(NOTIFY_GAP).await;
        }
    });
    Some(requests)
}

/// Wakes this instance's event readers when any instance appends events: one `LISTEN` connection per instance
/// (PostgreSQL only; `None` on SQLite, where the one instance wakes its readers in process). The events table stays
/// the source of truth and readers still re-check every 250 ms, so a notification lost while the connection is
/// re-established costs latency, never an event.
pub fn spawn_listener(
    engine: Engine,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if engine.backend != store::Backend::Postgres {
        return None;
    }
    Some(tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = listen(&engine) => {}
        }
    }))
}

/// Listens until the task is dropped; reconnects with backoff when the connection fails.
async fn listen(engine: &Engine) {
    use sea_orm::sqlx::postgres::PgListener;
    const RETRY_MIN: Duration = Duration::from_millis(500);
    const RETRY_MAX: Duration = Duration::from_secs(30);
    let pool = engine.db.get_postgres_connection_pool();
    let mut retry = RETRY_MIN;
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(l)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for events of other instances; retrying in {retry:?}");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        tracing::debug!("listening for events of every instance");
        // Whatever was appended while not listening.
        engine.wake_event_readers();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => {
                    retry = RETRY_MIN;
                    engine.wake_event_readers();
                }
                // The connection dropped and was re-established; notifications in between are lost.
                Ok(None) => {
                    tracing::info!("the events LISTEN connection was re-established");
                    engine.wake_event_readers();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the events LISTEN connection failed; reconnecting in {retry:?}");
                    break;
                }
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}
