//! `GET /v1/events` (long poll) and `GET /v1/events/stream` (Server-Sent Events) over the event log. Agents see
//! only events of the queues they serve; positions still advance past events they do not see.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::HeaderMap,
    response::sse::{self, KeepAlive, Sse},
};
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState,
    auth::{Caller, Principal},
    error::{ApiError, ApiQuery, ErrorBody},
};
use crate::events::{self, Event};

/// Longest long-poll wait.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Largest page.
pub const MAX_LIMIT: u64 = 1000;
const DEFAULT_LIMIT: u64 = 100;

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PollParams {
    /// Return events with a sequence number above this (the `next` of the previous page); default 0.
    #[serde(default)]
    pub after: i64,
    /// Most events to return (1..=1000, default 100).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Seconds to wait for an event when none is there yet (0..=60, default 0).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// A page of events.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventsPage {
    /// Oldest first.
    pub events: Vec<Event>,
    /// Pass as `after` to continue.
    pub next: i64,
}

fn visible(caller: &Principal) -> impl Fn(&Event) -> bool + '_ {
    move |e: &Event| !caller.is_agent() || e.queue.as_deref().is_some_and(|q| caller.sees_queue(q))
}

/// Events after `after`, oldest first, waiting up to `wait` seconds for one to appear.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    security(("bearer" = [])),
    params(PollParams),
    responses(
        (status = 200, description = "Events (possibly none) and the position to continue from", body = EventsPage),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    )
)]
pub async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<PollParams>,
) -> Result<Json<EventsPage>, ApiError> {
    let after = params.after.max(0);
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let wait = Duration::from_secs(params.wait.unwrap_or(0).min(MAX_WAIT_SECONDS));
    let read = events::read(&state.engine, after, limit, wait, visible(&caller));
    tokio::select! {
        r = read => {
            let (events, next) = r?;
            Ok(Json(EventsPage { events, next }))
        }
        // Shutting down: answer at once so the server can stop.
        _ = state.shutdown.cancelled() => Ok(Json(EventsPage { events: Vec::new(), next: after })),
    }
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Start after this sequence number; a `Last-Event-ID` header (sent by reconnecting clients) wins.
    #[serde(default)]
    pub after: i64,
}

/// The event log as Server-Sent Events: `id` is the sequence number, `event` the kind, `data` the event as JSON.
/// Reconnecting clients resume from `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    security(("bearer" = [])),
    params(
        StreamParams,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this sequence number"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`; each `data` is an Event",
            body = Event, content_type = "text/event-stream"),
        (status = 400, description = "Malformed query or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event sequence number")
            })?,
        None => params.after,
    };
    let cursor = Cursor {
        state,
        caller: caller.0,
        position: after.max(0),
        pending: VecDeque::new(),
    };
    Ok(Sse::new(futures::stream::unfold(cursor, next_event)).keep_alive(KeepAlive::default()))
}

struct Cursor {
    state: AppState,
    caller: Arc<Principal>,
    position: i64,
    pending: VecDeque<Event>,
}

/// The next SSE event; `None` ends the stream (shutdown or a database error; clients reconnect and resume).
async fn next_event(mut c: Cursor) -> Option<(Result<sse::Event, Infallible>, Cursor)> {
    loop {
        if let Some(e) = c.pending.pop_front() {
            let event = sse::Event::default()
                .id(e.seq.to_string())
                .event(e.kind.clone());
            let event = match event.json_data(&e) {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(seq = e.seq, error = %err, "event not serializable; skipped");
                    continue;
                }
            };
            return Some((Ok(event), c));
        }
        let read = events::read(
            &c.state.engine,
            c.position,
            DEFAULT_LIMIT,
            Duration::from_secs(15),
            visible(&c.caller),
        );
        let result = tokio::select! {
            r = read => r,
            _ = c.state.shutdown.cancelled() => return None,
        };
        match result {
            Ok((events, next)) => {
                c.position = next;
                c.pending.extend(events);
            }
            Err(e) => {
                tracing::error!(error = %e, "event stream: reading the event log failed; closing the stream");
                return None;
            }
        }
    }
}
