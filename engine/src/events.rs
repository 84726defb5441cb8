//! The event log read side: ordered, resumable reads with long polling. Events are appended by the operation
//! that causes them, in its own transaction (`store::events::insert`).

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
        // Wake on an in-process append, or re-check periodically for appends by other processes.
        let tick = Duration::from_millis(250).min(deadline - tokio::time::Instant::now());
        let _ = tokio::time::timeout(tick, notified).await;
    }
}
